//! In-memory [`VolumeEngine`] for host tests of the node core and the CSI services. It keeps the rules
//! of the real engine (format only a blank device, never one holding something; a wrong identity is an
//! error; open and close idempotent) but seals nothing: its "header" is a plain marker with the
//! identity's digest, written in both header copies of the backing file, and its device-mapper stack
//! lives in a [`MemoryDm`]. Never what a user runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use super::engine::{
    EngineError, StagedDevice, VolumeEngine, announce_opened, dm_size_bytes, failure_problem,
    failures_of, integrity_problem,
};
use crate::dm::{CryptKey, DeviceMapper, DmError, MemoryDm};
use crate::header::{
    COPY_OFFSETS, DATA_OFFSET, FsKind, HEADER_SIZE, Header, HeaderError, Journal, Profile,
};
use crate::sealing::SourceKind;
use crate::volume::header_io::read_region;
use crate::volume::init::InitMode;
use crate::volume::stack::{self, SECTOR, StackNames};
use crate::volume::{Condition, FormatOptions, VolumeError};

/// Magic of the in-memory engine's marker header.
pub const MEMORY_MAGIC: &[u8; 8] = b"MEMSEAL\0";
const MARKER_LEN: usize = 96;

/// The in-memory engine.
#[derive(Debug)]
pub struct MemoryEngine {
    dm: Arc<MemoryDm>,
    identity: String,
    source_down: AtomicBool,
    mismatches: Mutex<BTreeMap<String, u64>>,
    formats: Mutex<Vec<(PathBuf, FormatOptions)>>,
    grown: Mutex<Vec<(FsKind, PathBuf)>>,
    inits: Mutex<Vec<(String, u64, u64)>>,
    fail_inits: Mutex<u32>,
    stage_delay: Mutex<std::time::Duration>,
    failures: Option<Arc<crate::health::IntegrityFailures>>,
}

fn profile_code(p: Profile) -> u8 {
    match p {
        Profile::AeadHmacSha256 {
            journal: Journal::Journal,
        } => 1,
        Profile::AeadHmacSha256 {
            journal: Journal::Direct,
        } => 2,
        Profile::XtsOnly => 3,
    }
}

fn profile_from(code: u8) -> Option<Profile> {
    Some(match code {
        1 => Profile::AeadHmacSha256 {
            journal: Journal::Journal,
        },
        2 => Profile::AeadHmacSha256 {
            journal: Journal::Direct,
        },
        3 => Profile::XtsOnly,
        _ => return None,
    })
}

fn fs_code(fs: FsKind) -> u8 {
    match fs {
        FsKind::None => 0,
        FsKind::Ext4 => 1,
        FsKind::Xfs => 2,
    }
}

fn fs_from(code: u8) -> Option<FsKind> {
    Some(match code {
        0 => FsKind::None,
        1 => FsKind::Ext4,
        2 => FsKind::Xfs,
        _ => return None,
    })
}

/// A decoded marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Marker {
    identity: [u8; 32],
    fs: FsKind,
    profile: Profile,
}

impl Marker {
    fn encode(&self) -> [u8; MARKER_LEN] {
        let mut b = [0u8; MARKER_LEN];
        b[..8].copy_from_slice(MEMORY_MAGIC);
        b[8..40].copy_from_slice(&self.identity);
        b[40] = fs_code(self.fs);
        b[41] = profile_code(self.profile);
        let sum = Sha256::digest(&b[..64]);
        b[64..96].copy_from_slice(&sum);
        b
    }

    fn decode(b: &[u8]) -> Result<Self, HeaderError> {
        if &b[..8] != MEMORY_MAGIC {
            return Err(HeaderError::NotSealcsi);
        }
        if Sha256::digest(&b[..64]).as_slice() != &b[64..96] {
            return Err(HeaderError::Checksum);
        }
        let bad = |field| HeaderError::Invalid {
            field,
            reason: "unknown code".into(),
        };
        Ok(Marker {
            identity: b[8..40].try_into().expect("32 bytes"),
            fs: fs_from(b[40]).ok_or_else(|| bad("fs"))?,
            profile: profile_from(b[41]).ok_or_else(|| bad("profile"))?,
        })
    }
}

/// Both copies: the first that decodes, and the error of the other if it does not.
fn read_markers(region: &[u8]) -> Result<(Marker, Option<(usize, HeaderError)>), HeaderError> {
    let copies: Vec<Result<Marker, HeaderError>> = COPY_OFFSETS
        .iter()
        .map(|&o| Marker::decode(&region[o as usize..o as usize + MARKER_LEN]))
        .collect();
    match (&copies[0], &copies[1]) {
        (Ok(m), Ok(_)) => Ok((*m, None)),
        (Ok(m), Err(e)) => Ok((*m, Some((1, e.clone())))),
        (Err(e), Ok(m)) => Ok((*m, Some((0, e.clone())))),
        (Err(e), Err(_)) => Err(e.clone()),
    }
}

fn has_marker_magic(region: &[u8]) -> bool {
    COPY_OFFSETS
        .iter()
        .any(|&o| &region[o as usize..o as usize + 8] == MEMORY_MAGIC)
}

impl MemoryEngine {
    /// The fake does no initialization work: a format reports zero-length phases.
    fn timing(formatted: bool, format: &FormatOptions) -> Option<super::engine::InitTiming> {
        formatted.then_some(super::engine::InitTiming {
            fast: format.init == InitMode::Fast,
            wipe_seconds: 0.0,
            mkfs_seconds: 0.0,
        })
    }

    /// An engine whose "sealing identity" is `identity`, over `dm`.
    pub fn new(dm: Arc<MemoryDm>, identity: &str) -> Self {
        Self {
            dm,
            identity: identity.to_string(),
            source_down: AtomicBool::new(false),
            mismatches: Mutex::default(),
            formats: Mutex::default(),
            grown: Mutex::default(),
            inits: Mutex::default(),
            fail_inits: Mutex::default(),
            stage_delay: Mutex::default(),
            failures: None,
        }
    }

    /// The same engine, counting integrity failures with `failures` (over an in-memory log), as
    /// [`super::KernelEngine::with_integrity_failures`].
    pub fn with_integrity_failures(
        mut self,
        failures: Arc<crate::health::IntegrityFailures>,
    ) -> Self {
        self.failures = Some(failures);
        self
    }

    fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.identity.as_bytes()).into()
    }

    /// Makes the sealing source stop (or start again) answering.
    pub fn set_source_down(&self, down: bool) {
        self.source_down.store(down, Ordering::SeqCst);
    }

    /// Makes the integrity layer of `dm_name` report `n` tag mismatches.
    pub fn inject_mismatches(&self, dm_name: &str, n: u64) {
        self.mismatches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(dm_name.to_string(), n);
    }

    /// Makes every stage take at least `delay` (to hold an operation open in concurrency tests).
    pub fn set_stage_delay(&self, delay: std::time::Duration) {
        *self.stage_delay.lock().unwrap_or_else(|e| e.into_inner()) = delay;
    }

    /// Every format this engine did: (backing file, options).
    pub fn formats(&self) -> Vec<(PathBuf, FormatOptions)> {
        self.formats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every filesystem grow: (filesystem, device or mount point given to the tool).
    pub fn grown(&self) -> Vec<(FsKind, PathBuf)> {
        self.grown.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Every completed [`VolumeEngine::init_new_space`]: (dm name, from, to).
    pub fn inits(&self) -> Vec<(String, u64, u64)> {
        self.inits.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Makes the next `n` calls of [`VolumeEngine::init_new_space`] fail (as a crash between growing the
    /// mapping and initializing the new space would leave it).
    pub fn fail_next_inits(&self, n: u32) {
        *self.fail_inits.lock().unwrap_or_else(|e| e.into_inner()) = n;
    }

    fn data_sectors(backing: &Path) -> Result<u64, EngineError> {
        let size = std::fs::metadata(backing)
            .map_err(|source| EngineError::Io {
                context: format!("stat {}", backing.display()),
                source,
            })?
            .len();
        Ok(size.saturating_sub(DATA_OFFSET) / 4096 * (4096 / SECTOR))
    }

    fn write_marker(backing: &Path, marker: &Marker) -> Result<(), EngineError> {
        use std::os::unix::fs::FileExt;
        let mut region = vec![0u8; 2 * HEADER_SIZE];
        for &o in &COPY_OFFSETS {
            region[o as usize..o as usize + MARKER_LEN].copy_from_slice(&marker.encode());
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(backing)
            .and_then(|f| {
                f.write_all_at(&region, 0)?;
                f.sync_all()
            })
            .map_err(|source| EngineError::Io {
                context: format!("writing the marker of {}", backing.display()),
                source,
            })
    }

    fn header_error(backing: &Path, source: HeaderError) -> EngineError {
        EngineError::Volume(VolumeError::Header {
            device: backing.display().to_string(),
            source,
        })
    }

    fn wrong_identity(&self) -> EngineError {
        EngineError::Volume(VolumeError::WrongIdentity {
            kind: SourceKind::Sim,
            digest: hex::encode(self.digest()),
            slots: 1,
        })
    }

    fn lines(
        backing: &Path,
        names: &StackNames,
        profile: Profile,
        fs: FsKind,
        sectors: u64,
        workqueues: stack::Workqueues,
    ) -> Result<(Option<crate::dm::TargetLine>, crate::dm::TargetLine), EngineError> {
        let header = Header::new([7; 16], profile, fs, 0);
        let integrity = stack::integrity_line(backing, &header, sectors);
        let lower = match integrity {
            Some(_) => names.integrity.node(),
            None => backing.to_path_buf(),
        };
        let key = CryptKey::Hex(zeroize::Zeroizing::new(vec![0; profile.key_len()]));
        let crypt = stack::crypt_line(&lower, &header, sectors, key, workqueues)?;
        Ok((integrity, crypt))
    }
}

impl VolumeEngine for MemoryEngine {
    /// The in-memory volumes carry no volume binding: nothing to re-bind.
    fn rebind(
        &self,
        _backing: &Path,
        _source: &str,
        _from: &[u8; crate::header::BINDING_DIGEST_LEN],
        _to: &[u8; crate::header::BINDING_DIGEST_LEN],
        _recipients: &[crate::keyslots::RecoveryPublicKey],
    ) -> Result<Option<Vec<crate::volume::RebindSlot>>, EngineError> {
        Ok(None)
    }

    fn stage_device(
        &self,
        backing: &Path,
        dm_name: &str,
        format: &FormatOptions,
        known_uuid: Option<[u8; 16]>,
        workqueues: stack::Workqueues,
    ) -> Result<StagedDevice, EngineError> {
        let names = StackNames::new(dm_name)?;
        let delay = *self.stage_delay.lock().unwrap_or_else(|e| e.into_inner());
        std::thread::sleep(delay);
        let mut region = read_region(backing)?;
        let mut formatted = false;
        // The marker has no UUID of its own: one derived from the backing file stands in for it.
        let volume_uuid: [u8; 16] = Sha256::digest(backing.as_os_str().as_encoded_bytes())[..16]
            .try_into()
            .expect("16 bytes");
        if !has_marker_magic(&region) {
            if known_uuid.is_some() {
                return Err(EngineError::HeaderGone {
                    uuid: hex::encode(volume_uuid),
                });
            }
            if region.iter().any(|&b| b != 0) {
                return Err(EngineError::Volume(VolumeError::Refused {
                    device: backing.display().to_string(),
                    found: "data that is not a sealcsi volume".into(),
                }));
            }
            if format.fs == FsKind::None && format.init == InitMode::Fast {
                return Err(EngineError::Volume(VolumeError::InvalidArgument(
                    "fast init needs a filesystem".into(),
                )));
            }
            let marker = Marker {
                identity: self.digest(),
                fs: format.fs,
                profile: format.profile,
            };
            Self::write_marker(backing, &marker)?;
            self.formats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((backing.to_path_buf(), *format));
            formatted = true;
            region = read_region(backing)?;
        }
        let (marker, _) = read_markers(&region).map_err(|e| Self::header_error(backing, e))?;
        if marker.identity != self.digest() {
            return Err(self.wrong_identity());
        }
        if let Some(info) = self.dm.info(&names.crypt)? {
            return Ok(StagedDevice {
                uuid: volume_uuid,
                device: info.node,
                fs: marker.fs,
                formatted,
                init: Self::timing(formatted, format),
            });
        }
        let sectors = Self::data_sectors(backing)?;
        let (integrity, crypt) = Self::lines(
            backing,
            &names,
            marker.profile,
            marker.fs,
            sectors,
            workqueues,
        )?;
        let uuid = hex::encode(&Sha256::digest(backing.as_os_str().as_encoded_bytes())[..8]);
        if let Some(line) = integrity {
            // A stale integrity device without its crypt device is removed first, as the real stack does.
            self.dm.remove(&names.integrity)?;
            self.dm.create(
                &names.integrity,
                &stack::dm_uuid(&uuid, "integrity"),
                &[line],
            )?;
        }
        let info = self
            .dm
            .create(&names.crypt, &stack::dm_uuid(&uuid, "crypt"), &[crypt])?;
        announce_opened(self.failures.as_deref(), &names);
        Ok(StagedDevice {
            uuid: volume_uuid,
            device: info.node,
            fs: marker.fs,
            formatted,
            init: Self::timing(formatted, format),
        })
    }

    fn open_device(&self, dm_name: &str) -> Result<Option<PathBuf>, EngineError> {
        let name = crate::dm::DmName::try_from(dm_name)?;
        Ok(self.dm.info(&name)?.map(|i| i.node))
    }

    fn close(&self, dm_name: &str) -> Result<bool, EngineError> {
        let names = StackNames::new(dm_name)?;
        Ok(stack::close_stack(&*self.dm, &names)?)
    }

    fn condition(&self, dm_name: &str, backing: &Path) -> Result<Condition, EngineError> {
        let names = StackNames::new(dm_name)?;
        let mut problems = Vec::new();
        problems.extend(integrity_problem(&*self.dm, &names)?);
        if let Some(&n) = self
            .mismatches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(dm_name)
            && n > 0
        {
            problems.push(format!("dm-integrity counted {n} tag mismatch(es)"));
        }
        problems.extend(failure_problem(self.failures.as_deref(), &names)?);
        let region = read_region(backing)?;
        match read_markers(&region) {
            Err(e) => problems.push(format!("the volume header no longer decodes: {e}")),
            Ok((m, damaged)) => {
                if m.identity != self.digest() {
                    problems.push("the volume header no longer unseals on this node".into());
                }
                if let Some((copy, e)) = damaged {
                    problems.push(format!("header copy {copy} is damaged ({e})"));
                }
            }
        }
        Ok(Condition::from_problems(problems))
    }

    fn size_bytes(&self, dm_name: &str) -> Result<u64, EngineError> {
        dm_size_bytes(&*self.dm, &crate::dm::DmName::try_from(dm_name)?)
    }

    fn expand(
        &self,
        dm_name: &str,
        backing: &Path,
        _expected: crate::volume::Expected<'_>,
    ) -> Result<u64, EngineError> {
        let names = StackNames::new(dm_name)?;
        let old = dm_size_bytes(&*self.dm, &names.crypt)?;
        let region = read_region(backing)?;
        let (marker, _) = read_markers(&region).map_err(|e| Self::header_error(backing, e))?;
        let sectors = Self::data_sectors(backing)?;
        if sectors * SECTOR <= old {
            return Ok(old);
        }
        let workqueues = match stack::live_workqueues(&*self.dm, &names) {
            Err(stack::MappingError::Dm(DmError::NotFound(n))) => {
                return Err(EngineError::NotOpen(n));
            }
            other => other?,
        };
        let (integrity, crypt) = Self::lines(
            backing,
            &names,
            marker.profile,
            marker.fs,
            sectors,
            workqueues,
        )?;
        if let Some(line) = integrity {
            self.dm.reload(&names.integrity, &[line])?;
        }
        match self.dm.reload(&names.crypt, &[crypt]) {
            Ok(_) => Ok(sectors * SECTOR),
            Err(DmError::NotFound(n)) => Err(EngineError::NotOpen(n)),
            Err(e) => Err(e.into()),
        }
    }

    fn init_new_space(&self, dm_name: &str, from: u64, to: u64) -> Result<(), EngineError> {
        let names = StackNames::new(dm_name)?;
        let size = dm_size_bytes(&*self.dm, &names.crypt)?;
        {
            let mut fail = self.fail_inits.lock().unwrap_or_else(|e| e.into_inner());
            if *fail > 0 {
                *fail -= 1;
                return Err(EngineError::Io {
                    context: format!("initializing bytes {from}..{to} of {dm_name}"),
                    source: std::io::Error::other("injected failure"),
                });
            }
        }
        let to = to.min(size);
        if to > from {
            self.inits.lock().unwrap_or_else(|e| e.into_inner()).push((
                dm_name.to_string(),
                from,
                to,
            ));
        }
        Ok(())
    }

    fn grow_fs(&self, fs: FsKind, device: &Path, mount_point: &Path) -> Result<(), EngineError> {
        if fs == FsKind::None {
            return Err(crate::volume::mkfs::FsError::NoFilesystem("grow").into());
        }
        let target = if fs == FsKind::Xfs {
            mount_point
        } else {
            device
        };
        self.grown
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((fs, target.to_path_buf()));
        Ok(())
    }

    fn integrity_failures(&self, dm_name: &str) -> Option<u64> {
        failures_of(self.failures.as_deref(), dm_name)
    }

    fn probe_source(&self) -> Result<(), String> {
        if self.source_down.load(Ordering::SeqCst) {
            Err("sealing source: the (in-memory) sealing source does not answer".into())
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_and_detect_damage() {
        let m = Marker {
            identity: [3; 32],
            fs: FsKind::Xfs,
            profile: Profile::XtsOnly,
        };
        let mut region = vec![0u8; 2 * HEADER_SIZE];
        region[..MARKER_LEN].copy_from_slice(&m.encode());
        region[HEADER_SIZE..HEADER_SIZE + MARKER_LEN].copy_from_slice(&m.encode());
        assert_eq!(read_markers(&region).unwrap(), (m, None));
        region[50] ^= 1;
        assert_eq!(
            read_markers(&region).unwrap(),
            (m, Some((0, HeaderError::Checksum)))
        );
        region[HEADER_SIZE + 50] ^= 1;
        assert_eq!(read_markers(&region).unwrap_err(), HeaderError::Checksum);
    }
}
