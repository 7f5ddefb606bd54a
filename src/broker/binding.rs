//! The binding bytes of a `kbs` keyslot: which broker and which resource release the slot's secret.
//!
//! Encoding (version 1), all integers big-endian:
//!
//! ```text
//! u8   version = 1
//! u16  broker length B (>= 1)   B bytes  broker: the KBS URL or a configured name, UTF-8
//! u16  path length P (>= 5)     P bytes  resource path <repo>/<type>/<tag>, ASCII
//! ```
//!
//! Nothing may follow; the whole is at most 128 bytes (a keyslot's binding field), so B + P <= 123. The bytes sit in the keyslot's binding field, which the keyslot AEAD
//! authenticates like every other slot field (docs/format.md), so neither the broker nor the path can be
//! changed without the slot failing to unwrap.

use std::fmt;
use std::str::FromStr;

/// The binding format this build writes and reads.
pub const BINDING_VERSION: u8 = 1;
/// The longest broker name or URL plus resource path a binding holds (the keyslot binding field is
/// 128 bytes; five are the version and the two lengths).
pub const MAX_NAMES_LEN: usize = crate::header::MAX_BINDING_LEN - 5;
/// The longest resource path.
pub const MAX_PATH_LEN: usize = MAX_NAMES_LEN - 1;

/// Why a binding or a resource path is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BindingError(pub String);

/// A KBS resource path: three non-empty segments `<repo>/<type>/<tag>` of URL-safe characters
/// (ASCII letters, digits, `-`, `_`, `.`; a segment is never `.` or `..`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResourcePath {
    repo: String,
    kind: String,
    tag: String,
}

impl ResourcePath {
    pub fn parse(text: &str) -> Result<Self, BindingError> {
        let bad = |why: &str| BindingError(format!("resource path {text:?}: {why}"));
        if text.len() > MAX_PATH_LEN {
            return Err(bad("too long"));
        }
        let parts: Vec<&str> = text.split('/').collect();
        let [repo, kind, tag] = parts.as_slice() else {
            return Err(bad("expected <repo>/<type>/<tag>"));
        };
        for segment in [repo, kind, tag] {
            if segment.is_empty() || *segment == "." || *segment == ".." {
                return Err(bad("empty, '.' or '..' segment"));
            }
            if !segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return Err(bad("segments take only A-Z a-z 0-9 - _ ."));
            }
        }
        Ok(Self {
            repo: (*repo).to_owned(),
            kind: (*kind).to_owned(),
            tag: (*tag).to_owned(),
        })
    }
}

impl fmt::Display for ResourcePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.repo, self.kind, self.tag)
    }
}

impl FromStr for ResourcePath {
    type Err = BindingError;
    fn from_str(s: &str) -> Result<Self, BindingError> {
        ResourcePath::parse(s)
    }
}

/// The decoded binding of a `kbs` keyslot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KbsBinding {
    /// The broker's URL or configured name, as given when the slot was added.
    pub broker: String,
    pub resource: ResourcePath,
}

impl KbsBinding {
    pub fn new(broker: impl Into<String>, resource: ResourcePath) -> Result<Self, BindingError> {
        let broker = broker.into();
        let path_len = resource.to_string().len();
        if broker.is_empty() || broker.len() + path_len > MAX_NAMES_LEN {
            return Err(BindingError(format!(
                "the broker name ({} bytes) and the resource path ({path_len} bytes) must fit in \
                 {MAX_NAMES_LEN} bytes (use a short --kbs-name)",
                broker.len()
            )));
        }
        if broker.chars().any(char::is_control) {
            return Err(BindingError(
                "the broker name has control characters".into(),
            ));
        }
        Ok(Self { broker, resource })
    }

    pub fn encode(&self) -> Vec<u8> {
        let path = self.resource.to_string();
        let mut out = Vec::with_capacity(5 + self.broker.len() + path.len());
        out.push(BINDING_VERSION);
        for field in [self.broker.as_bytes(), path.as_bytes()] {
            // Both lengths are bounded by 512 at construction.
            out.extend_from_slice(&(field.len() as u16).to_be_bytes());
            out.extend_from_slice(field);
        }
        out
    }

    /// Decodes binding bytes from a keyslot (untrusted until the slot authenticates: every field is
    /// checked, nothing panics).
    pub fn decode(bytes: &[u8]) -> Result<Self, BindingError> {
        let bad = |why: String| BindingError(format!("kbs binding: {why}"));
        let (&version, mut rest) = bytes.split_first().ok_or_else(|| bad("empty".into()))?;
        if version != BINDING_VERSION {
            return Err(bad(format!("unknown version {version}")));
        }
        let mut field = |name: &str| -> Result<String, BindingError> {
            let (len, tail) = rest
                .split_at_checked(2)
                .ok_or_else(|| bad(format!("{name} length truncated")))?;
            let len = u16::from_be_bytes([len[0], len[1]]) as usize;
            let (value, tail) = tail
                .split_at_checked(len)
                .ok_or_else(|| bad(format!("{name} truncated")))?;
            rest = tail;
            String::from_utf8(value.to_vec()).map_err(|_| bad(format!("{name} is not UTF-8")))
        };
        let broker = field("broker")?;
        let path = field("resource path")?;
        if !rest.is_empty() {
            return Err(bad(format!("{} trailing bytes", rest.len())));
        }
        KbsBinding::new(broker, ResourcePath::parse(&path)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn binding_bytes_are_as_documented() {
        let b = KbsBinding::new("kbs", ResourcePath::parse("a/b/c").unwrap()).unwrap();
        assert_eq!(
            b.encode(),
            [
                1, 0, 3, b'k', b'b', b's', 0, 5, b'a', b'/', b'b', b'/', b'c'
            ]
        );
        assert_eq!(KbsBinding::decode(&b.encode()).unwrap(), b);
    }

    #[test]
    fn a_binding_never_outgrows_the_slot_field() {
        let path = ResourcePath::parse("a/b/c").unwrap();
        let long = "k".repeat(MAX_NAMES_LEN - 5);
        let b = KbsBinding::new(long.clone(), path.clone()).unwrap();
        assert_eq!(b.encode().len(), crate::header::MAX_BINDING_LEN);
        assert!(KbsBinding::new(long + "k", path).is_err());
    }

    #[test]
    fn bad_paths_are_refused() {
        for p in ["a/b", "a/b/c/d", "a//c", "../b/c", "a/b/c?x", "a/b/ c", ""] {
            assert!(ResourcePath::parse(p).is_err(), "{p}");
        }
        assert!(ResourcePath::parse("default/sealcsi/vol-1.key").is_ok());
    }

    #[test]
    fn trailing_bytes_and_other_versions_are_refused() {
        let mut bytes = KbsBinding::new("k", ResourcePath::parse("a/b/c").unwrap())
            .unwrap()
            .encode();
        bytes.push(0);
        assert!(
            KbsBinding::decode(&bytes)
                .unwrap_err()
                .0
                .contains("trailing")
        );
        bytes.pop();
        bytes[0] = 2;
        assert!(
            KbsBinding::decode(&bytes)
                .unwrap_err()
                .0
                .contains("version")
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = KbsBinding::decode(&bytes);
        }

        #[test]
        fn encode_decode_round_trips(
            broker in "[a-z:/.0-9]{1,40}",
            repo in "[a-z0-9_-]{1,10}", kind in "[a-z0-9_-]{1,10}", tag in "[a-z0-9_.-]{1,10}",
        ) {
            prop_assume!(tag != "." && tag != "..");
            let b = KbsBinding::new(broker, ResourcePath::parse(&format!("{repo}/{kind}/{tag}")).unwrap()).unwrap();
            prop_assert_eq!(KbsBinding::decode(&b.encode()).unwrap(), b);
        }
    }
}
