//! The ephemeral key a KBS encrypts a released resource to, and the decryption of that reply: a JWE in
//! flattened JSON serialization (RFC 7516 7.2.2) with `alg` ECDH-ES+A256KW on P-256 (RFC 7518 4.6:
//! Concat KDF over SHA-256, AlgorithmID = the `alg` value, apu/apv from the header or empty, 256 bits;
//! the 32-byte content key is AES-KW wrapped) and `enc` A256GCM (the AAD is the ASCII of the
//! `protected` member as received, followed by `.` and the `aad` member when one is present).
//!
//! The client only offers an EC key, so RSA-OAEP-256 replies are refused as unsupported. Every parser
//! here takes untrusted bytes: it checks each field and never panics.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use aes_kw::KwAes256;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kbs_types::TeePubKey;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use serde::Deserialize;
use zeroize::Zeroizing;

/// The key-wrapping algorithm this client asks for and accepts.
pub const ALG_ECDH_ES_A256KW: &str = "ECDH-ES+A256KW";
/// The content encryption this client accepts.
pub const ENC_A256GCM: &str = "A256GCM";
/// The longest reply body this client reads (a resource of a few KiB, base64url in JSON).
pub const MAX_REPLY_LEN: usize = 64 * 1024;

/// Why a reply could not be decrypted. The messages never include plaintext or key bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JweError {
    #[error("the reply is not a flattened JWE: {0}")]
    Malformed(String),
    #[error("the reply uses {0}, which this client does not accept")]
    Unsupported(String),
    #[error("the reply does not decrypt with this session's key (altered, or for another key)")]
    Decrypt,
    #[error("no randomness for the ephemeral key: {0}")]
    Random(String),
    #[error("the bytes are not a P-256 private key")]
    Key,
}

/// A fresh P-256 key for one KBS session; its private half never leaves this process.
pub struct EphemeralKey {
    secret: p256::SecretKey,
}

impl std::fmt::Debug for EphemeralKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EphemeralKey(<redacted>)")
    }
}

impl EphemeralKey {
    pub fn generate() -> Result<Self, JweError> {
        // A uniformly random 32-byte string is a valid scalar except with probability ~2^-32.
        for _ in 0..16 {
            let mut bytes = Zeroizing::new([0u8; 32]);
            getrandom::fill(bytes.as_mut()).map_err(|e| JweError::Random(e.to_string()))?;
            if let Ok(secret) = p256::SecretKey::from_slice(bytes.as_ref()) {
                return Ok(Self { secret });
            }
        }
        Err(JweError::Random("no valid P-256 scalar drawn".into()))
    }

    /// A key from the caller's 32-byte P-256 scalar (big-endian). Only for tests that record a
    /// session and decrypt its reply later; a node uses [`Self::generate`].
    pub fn from_secret_bytes(bytes: &[u8]) -> Result<Self, JweError> {
        p256::SecretKey::from_slice(bytes)
            .map(|secret| Self { secret })
            .map_err(|_| JweError::Key)
    }

    /// The public half as the KBS protocol's `tee-pubkey` (an EC JWK with `alg` ECDH-ES+A256KW).
    pub fn tee_pubkey(&self) -> TeePubKey {
        let point = self.secret.public_key().to_encoded_point(false);
        let coord =
            |c: Option<&p256::FieldBytes>| URL_SAFE_NO_PAD.encode(c.map(|c| &c[..]).unwrap_or(&[]));
        TeePubKey::EC {
            crv: "P-256".into(),
            alg: ALG_ECDH_ES_A256KW.into(),
            x: coord(point.x()),
            y: coord(point.y()),
        }
    }

    /// Decrypts a resource reply addressed to this key.
    pub fn decrypt(&self, reply: &[u8]) -> Result<Zeroizing<Vec<u8>>, JweError> {
        let jwe = FlattenedJwe::parse(reply)?;
        let epk = jwe
            .header
            .epk
            .as_ref()
            .ok_or_else(|| JweError::Malformed("the protected header has no epk".into()))?;
        let epk = p256::PublicKey::from_jwk(epk)
            .map_err(|_| JweError::Malformed("the epk is not a P-256 public key".into()))?;
        let shared = p256::ecdh::diffie_hellman(self.secret.to_nonzero_scalar(), epk.as_affine());
        let mut other_info = Vec::new();
        for field in [ALG_ECDH_ES_A256KW.as_bytes(), &jwe.apu, &jwe.apv] {
            other_info.extend_from_slice(&(field.len() as u32).to_be_bytes());
            other_info.extend_from_slice(field);
        }
        other_info.extend_from_slice(&256u32.to_be_bytes());
        let mut kek = Zeroizing::new([0u8; 32]);
        concat_kdf::derive_key_into::<sha2_010::Sha256>(
            shared.raw_secret_bytes(),
            &other_info,
            kek.as_mut(),
        )
        .map_err(|_| JweError::Decrypt)?;
        let kw = KwAes256::new_from_slice(kek.as_ref()).map_err(|_| JweError::Decrypt)?;
        let mut cek = Zeroizing::new([0u8; 32]);
        kw.unwrap_key(&jwe.encrypted_key, cek.as_mut())
            .map_err(|_| JweError::Decrypt)?;
        let cipher = Aes256Gcm::new_from_slice(cek.as_ref()).map_err(|_| JweError::Decrypt)?;
        let nonce = Nonce::try_from(jwe.iv.as_slice())
            .map_err(|_| JweError::Malformed("the iv is not 12 bytes".into()))?;
        let mut sealed = jwe.ciphertext;
        sealed.extend_from_slice(&jwe.tag);
        let plain = cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: &sealed,
                    aad: &jwe.aad,
                },
            )
            .map_err(|_| JweError::Decrypt)?;
        Ok(Zeroizing::new(plain))
    }
}

/// The members of a flattened JWE as the KBS sends it (base64url without padding).
#[derive(Deserialize)]
struct WireJwe {
    protected: String,
    encrypted_key: String,
    iv: String,
    ciphertext: String,
    tag: String,
    #[serde(default)]
    aad: Option<String>,
}

/// The protected header members this client reads; others are ignored.
#[derive(Deserialize)]
struct ProtectedHeader {
    alg: String,
    enc: String,
    #[serde(default)]
    epk: Option<p256::elliptic_curve::JwkEcKey>,
    #[serde(default)]
    apu: Option<String>,
    #[serde(default)]
    apv: Option<String>,
}

/// A parsed reply: decoded members, the header, and the AEAD's additional data.
struct FlattenedJwe {
    header: ProtectedHeader,
    encrypted_key: Vec<u8>,
    iv: Vec<u8>,
    ciphertext: Vec<u8>,
    tag: Vec<u8>,
    aad: Vec<u8>,
    apu: Vec<u8>,
    apv: Vec<u8>,
}

fn b64(name: &str, text: &str) -> Result<Vec<u8>, JweError> {
    URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| JweError::Malformed(format!("{name} is not base64url")))
}

impl FlattenedJwe {
    fn parse(reply: &[u8]) -> Result<Self, JweError> {
        if reply.len() > MAX_REPLY_LEN {
            return Err(JweError::Malformed(format!(
                "{} bytes; at most {MAX_REPLY_LEN} are read",
                reply.len()
            )));
        }
        let wire: WireJwe = serde_json::from_slice(reply)
            .map_err(|e| JweError::Malformed(format!("not JWE JSON ({})", e.classify_name())))?;
        let header: ProtectedHeader =
            serde_json::from_slice(&b64("protected", &wire.protected)?)
                .map_err(|_| JweError::Malformed("the protected header is not JSON".into()))?;
        if header.alg != ALG_ECDH_ES_A256KW {
            return Err(JweError::Unsupported(format!("alg {:?}", header.alg)));
        }
        if header.enc != ENC_A256GCM {
            return Err(JweError::Unsupported(format!("enc {:?}", header.enc)));
        }
        let mut aad = wire.protected.clone().into_bytes();
        if let Some(extra) = &wire.aad {
            aad.push(b'.');
            aad.extend_from_slice(extra.as_bytes());
        }
        let tag = b64("tag", &wire.tag)?;
        if tag.len() != 16 {
            return Err(JweError::Malformed("the tag is not 16 bytes".into()));
        }
        let encrypted_key = b64("encrypted_key", &wire.encrypted_key)?;
        if encrypted_key.len() != 40 {
            return Err(JweError::Malformed(
                "the wrapped content key is not 40 bytes".into(),
            ));
        }
        Ok(Self {
            apu: header
                .apu
                .as_deref()
                .map(|a| b64("apu", a))
                .transpose()?
                .unwrap_or_default(),
            apv: header
                .apv
                .as_deref()
                .map(|a| b64("apv", a))
                .transpose()?
                .unwrap_or_default(),
            header,
            encrypted_key,
            iv: b64("iv", &wire.iv)?,
            ciphertext: b64("ciphertext", &wire.ciphertext)?,
            tag,
            aad,
        })
    }
}

/// serde_json error categories, so messages never quote reply bytes.
trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "I/O",
            serde_json::error::Category::Syntax => "syntax",
            serde_json::error::Category::Data => "missing or mistyped member",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_public_key_is_a_p256_jwk() {
        let key = EphemeralKey::generate().unwrap();
        let TeePubKey::EC { crv, alg, x, y } = key.tee_pubkey() else {
            panic!("not EC")
        };
        assert_eq!((crv.as_str(), alg.as_str()), ("P-256", ALG_ECDH_ES_A256KW));
        assert_eq!(URL_SAFE_NO_PAD.decode(x).unwrap().len(), 32);
        assert_eq!(URL_SAFE_NO_PAD.decode(y).unwrap().len(), 32);
    }

    #[test]
    fn rsa_and_other_encodings_are_unsupported() {
        let key = EphemeralKey::generate().unwrap();
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RSA-OAEP-256","enc":"A256GCM"}"#);
        let reply = format!(
            r#"{{"protected":"{header}","encrypted_key":"","iv":"","ciphertext":"","tag":""}}"#
        );
        assert!(matches!(
            key.decrypt(reply.as_bytes()),
            Err(JweError::Unsupported(_))
        ));
    }

    proptest! {
        #[test]
        fn decrypt_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let key = EphemeralKey::generate().unwrap();
            let _ = key.decrypt(&bytes);
        }

        #[test]
        fn decrypt_of_jwe_shaped_garbage_never_panics(
            protected in "[A-Za-z0-9_-]{0,80}", ek in "[A-Za-z0-9_-]{0,60}", iv in "[A-Za-z0-9_-]{0,20}",
            ct in "[A-Za-z0-9_-]{0,40}", tag in "[A-Za-z0-9_-]{0,24}",
        ) {
            let key = EphemeralKey::generate().unwrap();
            let reply = format!(r#"{{"protected":"{protected}","encrypted_key":"{ek}","iv":"{iv}","ciphertext":"{ct}","tag":"{tag}"}}"#);
            prop_assert!(key.decrypt(reply.as_bytes()).is_err());
        }
    }
}
