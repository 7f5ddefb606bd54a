//! The key hierarchy: sealing secret -> per-keyslot key-encryption key -> volume key.
//!
//! docs/keys.md describes it for people; this module is its only implementation. Every secret type here
//! zeroizes on drop and prints as `<redacted>`, so a stray `{:?}` or a tracing field can never leak key bytes.
//! Their bytes live in [`SecretBuf`]s (their own pages: left out of core dumps, locked against swap where
//! the memlock limit allows; see `hardening`), and HKDF's pseudorandom key is zeroized after use.

use std::fmt;

use aes_gcm_siv::aead::{AeadInOut, KeyInit};
use aes_gcm_siv::{Aes256GcmSiv, Nonce, Tag};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use crate::hardening::SecretBuf;

/// Length of a sealing secret and of a key-encryption key.
pub const SECRET_LEN: usize = 32;
/// Length of the random salt of a keyslot.
pub const SALT_LEN: usize = 32;
/// Length of an AES-GCM-SIV nonce.
pub const NONCE_LEN: usize = 12;
/// Length of the AES-GCM-SIV authentication tag appended to a wrapped key.
pub const WRAP_TAG_LEN: usize = 16;
/// Length of an identity digest.
pub const DIGEST_LEN: usize = 32;

/// Label mixed into every KEK derivation; a new format version gets a new label.
const KEK_LABEL: &[u8] = b"sealcsi/v1/kek";
/// Label of the identity digest, a public commitment to a sealing secret.
const DIGEST_LABEL: &[u8] = b"sealcsi/v1/identity-digest";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// The operating system's random number generator failed.
    #[error("the OS random number generator failed: {0}")]
    Random(String),
    /// The wrapped key did not authenticate: wrong key-encryption key, or the header was altered.
    #[error("the wrapped volume key does not authenticate")]
    Unwrap,
    /// No memory could be mapped for key material.
    #[error("{0}")]
    Memory(String),
    /// A key of the wrong length was handed in; the message names lengths only.
    #[error("key length {actual} does not match the expected {expected}")]
    Length { expected: usize, actual: usize },
}

/// Fills `buf` from the OS random number generator.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), KeyError> {
    getrandom::fill(buf).map_err(|e| KeyError::Random(e.to_string()))
}

/// A [`SecretBuf`] holding a copy of `bytes`. Key material cannot be kept if its pages cannot even be
/// mapped (out of memory): that is fatal, like any allocation failure.
fn secret_copy(bytes: &[u8]) -> SecretBuf {
    SecretBuf::copy_from(bytes).expect("mapping a page for key material")
}

/// HKDF-SHA256 extract then expand into `out`. The PRK that extract returns is zeroized here at once;
/// the HMAC state that holds it inside `Hkdf` is zeroized when `hk` drops (sha2's `zeroize` feature).
/// What this cannot reach: copies of the 32-byte PRK left on the stack by moves inside the hkdf crate.
fn hkdf_sha256(salt: Option<&[u8]>, ikm: &[u8], info: &[u8], out: &mut [u8]) {
    let (mut prk, hk) = Hkdf::<Sha256>::extract(salt, ikm);
    prk.as_mut_slice().zeroize();
    hk.expand(info, out)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
}

/// A 32-byte secret bound to a TEE identity, produced by a sealing source.
pub struct SealingSecret(SecretBuf);

impl SealingSecret {
    /// Takes the secret; the caller's array is a copy the compiler may have left elsewhere, so pass
    /// it straight from the source and let it go out of scope.
    pub fn new(mut bytes: [u8; SECRET_LEN]) -> Self {
        let s = Self(secret_copy(&bytes));
        bytes.zeroize();
        s
    }

    /// The public digest that names this secret in a keyslot: HKDF-Expand of the secret under a fixed label.
    /// Two nodes share a digest exactly when they share the secret, so a slot whose digest matches but whose
    /// key does not unwrap was altered, not merely sealed to someone else.
    pub fn digest(&self) -> [u8; DIGEST_LEN] {
        let mut out = [0u8; DIGEST_LEN];
        hkdf_sha256(None, self.as_bytes(), DIGEST_LABEL, &mut out);
        out
    }

    fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SealingSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealingSecret(<redacted>)")
    }
}

/// The key that the device-mapper stack uses: 96 bytes (XTS + HMAC) or 64 bytes (XTS only).
pub struct VolumeKey(SecretBuf);

impl VolumeKey {
    /// A fresh random key of `len` bytes, generated in place in its locked buffer.
    pub fn generate(len: usize) -> Result<Self, KeyError> {
        let mut key = SecretBuf::zeroed(len).map_err(|e| KeyError::Memory(e.to_string()))?;
        random_bytes(&mut key)?;
        Ok(Self(key))
    }

    /// Copies `bytes` into a locked buffer; `bytes` is zeroized when the caller's value drops.
    pub fn from_bytes(bytes: Zeroizing<Vec<u8>>) -> Self {
        Self(secret_copy(&bytes))
    }

    /// Whether the key's pages are locked against swap (best effort, see `hardening`).
    pub fn is_locked(&self) -> bool {
        self.0.is_locked()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The raw key, for handing to the kernel (keyring payload or a secure table load) only.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VolumeKey(<{} bytes redacted>)", self.0.len())
    }
}

/// The per-keyslot key-encryption key.
pub struct Kek(SecretBuf);

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kek(<redacted>)")
    }
}

impl Kek {
    /// KEK = HKDF-SHA256(ikm = sealing secret, salt = keyslot salt,
    ///                   info = "sealcsi/v1/kek" || volume UUID (16 bytes) || identity digest (32 bytes)).
    pub fn derive(
        secret: &SealingSecret,
        salt: &[u8; SALT_LEN],
        volume_uuid: &[u8; 16],
        identity_digest: &[u8; DIGEST_LEN],
    ) -> Self {
        let mut info = Vec::with_capacity(KEK_LABEL.len() + 16 + DIGEST_LEN);
        info.extend_from_slice(KEK_LABEL);
        info.extend_from_slice(volume_uuid);
        info.extend_from_slice(identity_digest);
        let mut kek = secret_copy(&[0u8; SECRET_LEN]);
        hkdf_sha256(Some(salt), secret.as_bytes(), &info, &mut kek);
        Self(kek)
    }

    fn cipher(&self) -> Aes256GcmSiv {
        // The cipher's key schedule is zeroized when it drops (the `zeroize` features in Cargo.toml).
        Aes256GcmSiv::new_from_slice(&self.0).expect("KEK is 32 bytes")
    }

    /// Wraps the volume key: AES-256-GCM-SIV, returning ciphertext || 16-byte tag.
    pub fn wrap(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], key: &VolumeKey) -> Vec<u8> {
        let mut buf = key.expose().to_vec();
        let tag = self
            .cipher()
            .encrypt_inout_detached(&Nonce::from(*nonce), aad, buf.as_mut_slice().into())
            .expect("a volume key is far below the AES-GCM-SIV length limit");
        buf.extend_from_slice(&tag);
        buf
    }

    /// Unwraps ciphertext || tag into a volume key; fails if anything (key, nonce, AAD, bytes) differs.
    pub fn unwrap(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        wrapped: &[u8],
    ) -> Result<VolumeKey, KeyError> {
        let body_len = wrapped
            .len()
            .checked_sub(WRAP_TAG_LEN)
            .ok_or(KeyError::Unwrap)?;
        let (body, tag) = wrapped.split_at(body_len);
        let tag = Tag::try_from(tag).map_err(|_| KeyError::Unwrap)?;
        // Decrypted in place in the locked buffer: the plaintext key never lands on the ordinary heap.
        let mut buf = SecretBuf::copy_from(body).map_err(|e| KeyError::Memory(e.to_string()))?;
        self.cipher()
            .decrypt_inout_detached(&Nonce::from(*nonce), aad, (&mut *buf).into(), &tag)
            .map_err(|_| KeyError::Unwrap)?;
        Ok(VolumeKey(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed_secret() -> SealingSecret {
        SealingSecret::new([0x11; SECRET_LEN])
    }

    // Known-answer vectors: computed once with this implementation and checked against an independent
    // computation (Python `cryptography`: HKDF-SHA256 and AESGCMSIV), then frozen here. A change to the
    // derivation or the wrap, however small, makes existing volumes unreadable; these tests catch that.
    const DIGEST_KAT: &str = "723718fc3f3753dbc6fc7f4a5de83092b2cd233c1a7dd73ba88c9f35290e05a2";
    const KEK_KAT: &str = "1660cd7ea54156b9936dd75a664d27520fa24d1a4b19a857b9f6fe01c2f025a1";
    const WRAP_KAT: &str = concat!(
        "6104b46a20a3f936a71fd15009c3d94af48408c1d82c34e09c8f669496bd8a6dc6f510e40a104e31536f20900c5b1d1c",
        "edcdec9eb318ce35ade1c1190564da7337163daca868c07cf11f2081ef2b3233eb51decd7f5e0654932a5334d33d29dc",
        "855f704b99a7e2b08a49ef398d716b84"
    );

    fn kat_kek() -> Kek {
        let secret = fixed_secret();
        Kek::derive(&secret, &[0x22; SALT_LEN], &[0x33; 16], &secret.digest())
    }

    #[test]
    fn digest_known_answer() {
        assert_eq!(hex::encode(fixed_secret().digest()), DIGEST_KAT);
    }

    #[test]
    fn kek_known_answer() {
        assert_eq!(hex::encode(&*kat_kek().0), KEK_KAT);
    }

    #[test]
    fn wrap_known_answer() {
        let key = VolumeKey::from_bytes(Zeroizing::new((0..96u8).collect()));
        let wrapped = kat_kek().wrap(&[0x44; NONCE_LEN], b"aad", &key);
        assert_eq!(wrapped.len(), 96 + WRAP_TAG_LEN);
        assert_eq!(hex::encode(&wrapped), WRAP_KAT);
    }

    #[test]
    fn wrap_round_trips() {
        let key = VolumeKey::generate(96).unwrap();
        let kek = kat_kek();
        let wrapped = kek.wrap(&[7; NONCE_LEN], b"header", &key);
        let back = kek.unwrap(&[7; NONCE_LEN], b"header", &wrapped).unwrap();
        assert_eq!(back.expose(), key.expose());
    }

    #[test]
    fn unwrap_fails_on_any_change() {
        let key = VolumeKey::generate(64).unwrap();
        let kek = kat_kek();
        let nonce = [7; NONCE_LEN];
        let wrapped = kek.wrap(&nonce, b"header", &key);
        assert_eq!(
            kek.unwrap(&nonce, b"headeR", &wrapped).unwrap_err(),
            KeyError::Unwrap
        );
        assert_eq!(
            kek.unwrap(&[8; NONCE_LEN], b"header", &wrapped)
                .unwrap_err(),
            KeyError::Unwrap
        );
        for i in 0..wrapped.len() {
            let mut bad = wrapped.clone();
            bad[i] ^= 1;
            assert!(
                kek.unwrap(&nonce, b"header", &bad).is_err(),
                "byte {i} flip not detected"
            );
        }
        assert!(kek.unwrap(&nonce, b"header", &wrapped[..10]).is_err());
        let other = SealingSecret::new([0x12; SECRET_LEN]);
        let other_kek = Kek::derive(&other, &[0x22; SALT_LEN], &[0x33; 16], &other.digest());
        assert!(other_kek.unwrap(&nonce, b"header", &wrapped).is_err());
    }

    #[test]
    fn kek_depends_on_every_input() {
        let secret = fixed_secret();
        let d = secret.digest();
        let base = Kek::derive(&secret, &[0; SALT_LEN], &[0; 16], &d).0;
        assert_ne!(*base, *Kek::derive(&secret, &[1; SALT_LEN], &[0; 16], &d).0);
        assert_ne!(*base, *Kek::derive(&secret, &[0; SALT_LEN], &[1; 16], &d).0);
        assert_ne!(
            *base,
            *Kek::derive(&secret, &[0; SALT_LEN], &[0; 16], &[9; DIGEST_LEN]).0
        );
    }

    #[test]
    fn key_material_lives_in_pages_left_out_of_core_dumps() {
        // VolumeKey from both constructors, an unwrapped one, the KEK and the sealing secret: each in
        // its own MADV_DONTDUMP mapping (`dd` in /proc/self/smaps), not on the ordinary heap.
        let generated = VolumeKey::generate(96).unwrap();
        let copied = VolumeKey::from_bytes(Zeroizing::new(vec![3; 64]));
        let kek = kat_kek();
        let unwrapped = kek
            .unwrap(
                &[1; NONCE_LEN],
                b"",
                &kek.wrap(&[1; NONCE_LEN], b"", &generated),
            )
            .unwrap();
        let secret = fixed_secret();
        for (what, buf) in [
            ("generated volume key", &generated.0),
            ("copied volume key", &copied.0),
            ("unwrapped volume key", &unwrapped.0),
            ("kek", &kek.0),
            ("sealing secret", &secret.0),
        ] {
            assert!(buf.is_excluded_from_dumps(), "{what} is not MADV_DONTDUMP");
        }
        assert_eq!(unwrapped.expose(), generated.expose());
    }

    #[test]
    fn debug_never_prints_key_bytes() {
        let key = VolumeKey::from_bytes(Zeroizing::new(vec![0xAB; 96]));
        let shown = format!("{key:?} {:?} {:?}", fixed_secret(), kat_kek());
        assert!(!shown.to_lowercase().contains("ab, ") && !shown.contains("171"));
        assert!(shown.contains("redacted"));
    }
}
