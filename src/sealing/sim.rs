//! The simulated sealing source: a random seed file plus an operator-chosen identity string standing in for
//! a launch measurement. Same seed + same string = same secret; change either and the volume will not open.
//! It exists so that the whole stack can be developed and tested on machines without a TEE. It protects
//! nothing: anyone who can read the seed file can open the volumes.

use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::{SealError, SealingSource, SourceKind};
use crate::keys::{SECRET_LEN, SealingSecret, random_bytes};

/// Identity string used when the operator gives none.
pub const DEFAULT_IDENTITY: &str = "sim-default";
const SEED_FILE: &str = "sim-seed";
const SIM_LABEL: &[u8] = b"sealcsi/v1/sim-secret";

pub struct SimSource {
    seed: Zeroizing<[u8; SECRET_LEN]>,
    identity: String,
    seed_path: PathBuf,
}

impl std::fmt::Debug for SimSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimSource")
            .field("identity", &self.identity)
            .field("seed_path", &self.seed_path)
            .finish_non_exhaustive()
    }
}

fn state_error(path: &Path, reason: impl std::fmt::Display) -> SealError {
    SealError::State {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

impl SimSource {
    /// Loads the seed under `state_dir`, creating it (mode 0600) on first use.
    pub fn open(state_dir: &Path, identity: &str) -> Result<Self, SealError> {
        if identity.is_empty() {
            return Err(state_error(
                state_dir,
                "the simulated identity string is empty",
            ));
        }
        fs::create_dir_all(state_dir).map_err(|e| state_error(state_dir, e))?;
        let seed_path = state_dir.join(SEED_FILE);
        let seed = match read_seed(&seed_path) {
            Ok(seed) => seed,
            Err(e) if e.kind() == ErrorKind::NotFound => create_seed(&seed_path)?,
            Err(e) => return Err(state_error(&seed_path, e)),
        };
        Ok(Self {
            seed,
            identity: identity.to_owned(),
            seed_path,
        })
    }
}

fn read_seed(path: &Path) -> std::io::Result<Zeroizing<[u8; SECRET_LEN]>> {
    let mut file = fs::File::open(path)?;
    let mut seed = Zeroizing::new([0u8; SECRET_LEN]);
    file.read_exact(seed.as_mut_slice())?;
    let mut extra = [0u8; 1];
    if file.read(&mut extra)? != 0 {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            "seed file is longer than 32 bytes",
        ));
    }
    Ok(seed)
}

/// Creates the seed with O_EXCL so two processes racing on first use cannot end up with different seeds:
/// the loser reads the winner's file.
fn create_seed(path: &Path) -> Result<Zeroizing<[u8; SECRET_LEN]>, SealError> {
    let mut seed = Zeroizing::new([0u8; SECRET_LEN]);
    random_bytes(seed.as_mut_slice()).map_err(|e| state_error(path, e))?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(seed.as_slice())?;
        file.sync_all()?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))?;
        // hard_link fails if the seed appeared meanwhile: then the existing seed wins.
        let linked = fs::hard_link(&tmp, path);
        fs::remove_file(&tmp)?;
        linked
    };
    match write() {
        Ok(()) => Ok(seed),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            read_seed(path).map_err(|e| state_error(path, e))
        }
        Err(e) => Err(state_error(path, e)),
    }
}

impl SealingSource for SimSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Sim
    }

    fn is_simulated(&self) -> bool {
        true
    }

    fn default_binding(&self) -> Vec<u8> {
        Vec::new()
    }

    /// secret = HKDF-SHA256(ikm = seed, salt = none, info = "sealcsi/v1/sim-secret" || identity string).
    fn secret(&self, binding: &[u8]) -> Result<SealingSecret, SealError> {
        if !binding.is_empty() {
            return Err(SealError::Binding {
                kind: SourceKind::Sim,
                reason: "the simulated source takes no binding parameters".into(),
            });
        }
        let hk = Hkdf::<Sha256>::new(None, self.seed.as_slice());
        let mut info = SIM_LABEL.to_vec();
        info.extend_from_slice(self.identity.as_bytes());
        let mut out = [0u8; SECRET_LEN];
        hk.expand(&info, &mut out)
            .expect("32 bytes is a valid HKDF output length");
        let secret = SealingSecret::new(out);
        zeroize::Zeroize::zeroize(&mut out);
        Ok(secret)
    }

    fn describe(&self) -> String {
        format!(
            "simulated TEE, identity string {:?}, seed {}",
            self.identity,
            self.seed_path.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = SimSource::open(dir.path(), "img-1").unwrap();
        let b = SimSource::open(dir.path(), "img-1").unwrap();
        assert_eq!(
            a.secret(&[]).unwrap().digest(),
            b.secret(&[]).unwrap().digest()
        );
        let mode = fs::metadata(dir.path().join(SEED_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn identity_string_and_seed_both_matter() {
        let dir = tempfile::tempdir().unwrap();
        let other_dir = tempfile::tempdir().unwrap();
        let a = SimSource::open(dir.path(), "img-1")
            .unwrap()
            .secret(&[])
            .unwrap()
            .digest();
        let b = SimSource::open(dir.path(), "img-2")
            .unwrap()
            .secret(&[])
            .unwrap()
            .digest();
        let c = SimSource::open(other_dir.path(), "img-1")
            .unwrap()
            .secret(&[])
            .unwrap()
            .digest();
        assert_ne!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn known_answer_for_a_fixed_seed() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(SEED_FILE), [0x5a; 32]).unwrap();
        let digest = SimSource::open(dir.path(), "img-1")
            .unwrap()
            .secret(&[])
            .unwrap()
            .digest();
        assert_eq!(hex::encode(digest), SIM_KAT);
    }

    // HKDF-SHA256(ikm = 0x5a * 32, info = "sealcsi/v1/sim-secret" || "img-1"), then the identity digest;
    // computed independently with Python's `cryptography`.
    const SIM_KAT: &str = "e8972de964fc1d2b434b5c638bae6870e6f1d0fb2b58f30f5482570ade02f758";

    #[test]
    fn rejects_bad_seed_files_and_bindings() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(SEED_FILE), [1; 5]).unwrap();
        assert!(SimSource::open(dir.path(), "x").is_err());
        fs::write(dir.path().join(SEED_FILE), [1; 33]).unwrap();
        assert!(SimSource::open(dir.path(), "x").is_err());
        fs::write(dir.path().join(SEED_FILE), [1; 32]).unwrap();
        let source = SimSource::open(dir.path(), "x").unwrap();
        assert!(source.secret(&[1]).is_err());
        assert!(SimSource::open(dir.path(), "").is_err());
        assert!(!format!("{source:?}").contains("[1, 1"));
    }
}
