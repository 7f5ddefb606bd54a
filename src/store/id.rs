//! Volume ids: made from a CreateVolume name, checked once where a request enters the core, and the
//! source of every name derived from them (backing file, device-mapper stack).

use std::fmt;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

use crate::volume::stack::StackNames;

/// A volume id of the shape this plugin makes: `sv-` + the first 32 hex digits of SHA-256(name).
/// Anything else cannot exist here, so it is refused where it enters ([`VolumeId::parse`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolumeId(String);

impl VolumeId {
    /// Prefix of every volume id.
    pub const PREFIX: &'static str = "sv-";

    /// The id for a CreateVolume name: a retried create finds the volume of the first one.
    pub fn for_name(name: &str) -> Self {
        let digest = Sha256::digest(name.as_bytes());
        Self(format!("{}{}", Self::PREFIX, &hex::encode(digest)[..32]))
    }

    /// `Some` if `id` has the shape of a volume id this plugin makes.
    pub fn parse(id: &str) -> Option<Self> {
        let digits = id.strip_prefix(Self::PREFIX)?;
        let ok = digits.len() == 32
            && digits
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        ok.then(|| Self(id.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The device-mapper names of this volume's stack (`sealcsi-<id>`, `sealcsi-<id>-integrity`).
    pub fn stack_names(&self) -> StackNames {
        StackNames::for_volume(&self.0)
            .expect("a checked volume id makes valid device-mapper names")
    }

    /// The top device node of this volume's stack.
    pub fn device_node(&self) -> PathBuf {
        self.stack_names().crypt.node()
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_and_checked() {
        let id = VolumeId::for_name("pvc-1");
        assert_eq!(id, VolumeId::for_name("pvc-1"));
        assert_ne!(id, VolumeId::for_name("pvc-2"));
        assert_eq!(VolumeId::parse(id.as_str()), Some(id.clone()));
        assert_eq!(id.as_str().len(), 35);
        for bad in [
            "",
            "sv-",
            "sv-XYZ",
            "../etc",
            "sv-0123456789abcdef0123456789abcdeg",
        ] {
            assert!(VolumeId::parse(bad).is_none(), "{bad}");
        }
        let names = id.stack_names();
        assert_eq!(names.crypt.to_string(), format!("sealcsi-{id}"));
        assert_eq!(
            names.integrity.to_string(),
            format!("sealcsi-{id}-integrity")
        );
    }
}
