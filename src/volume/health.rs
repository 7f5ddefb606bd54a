//! A volume's health as seen from its header region: the one check the controller (no key) and the node
//! (which also unseals) both make.

use crate::header::{self, Header};

/// Health of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    Healthy,
    Abnormal(String),
}

impl Condition {
    /// Healthy when there is no problem, else abnormal with the problems joined.
    pub fn from_problems(problems: Vec<String>) -> Self {
        if problems.is_empty() {
            Condition::Healthy
        } else {
            Condition::Abnormal(problems.join("; "))
        }
    }
}

/// How much a header check may know.
pub enum Check<'a> {
    /// No key: a volume never formatted (an all-zero region) is healthy.
    Public,
    /// The volume is open here: it must have a header, and the header must still unseal with `unseal`.
    Unseal(&'a dyn Fn(&Header) -> Result<(), String>),
}

/// What is wrong with the header region `region` (both copies), if anything.
pub fn header_problem(region: &[u8], check: Check<'_>) -> Option<String> {
    if !header::has_magic(region) {
        return match check {
            Check::Public if region.iter().all(|&b| b == 0) => None,
            Check::Public => {
                Some("the header region holds data that is not a sealcsi header".into())
            }
            Check::Unseal(_) => Some("the volume has no sealcsi header any more".into()),
        };
    }
    let active = match header::select(region) {
        Ok(active) => active,
        Err(e) => return Some(format!("the volume header no longer decodes: {e}")),
    };
    if let Check::Unseal(unseal) = check
        && let Err(e) = unseal(&active.header)
    {
        return Some(format!(
            "the volume header no longer unseals on this node: {e}"
        ));
    }
    active.other_copy_error.as_ref().map(|e| {
        format!(
            "header copy {} is damaged ({e}); copy {} is intact",
            active.inactive_copy(),
            active.copy
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::{FsKind, HEADER_SIZE, Journal, Profile};

    fn region(header: &Header) -> Vec<u8> {
        let mut region = header.encode().to_vec();
        region.extend_from_slice(&header.encode());
        region
    }

    #[test]
    fn blank_is_healthy_only_without_a_key() {
        let blank = vec![0u8; 2 * HEADER_SIZE];
        assert_eq!(header_problem(&blank, Check::Public), None);
        let ok = |_: &Header| Ok(());
        assert!(header_problem(&blank, Check::Unseal(&ok)).is_some());
        let mut junk = blank.clone();
        junk[100] = 1;
        assert!(header_problem(&junk, Check::Public).is_some());
    }

    #[test]
    fn damage_and_unseal_failures_are_reported() {
        let profile = Profile::AeadHmacSha256 {
            journal: Journal::Journal,
        };
        let header = Header::new([3; 16], profile, FsKind::Ext4, 1);
        let mut r = region(&header);
        assert_eq!(header_problem(&r, Check::Public), None);
        let refuse = |_: &Header| Err("wrong identity".to_string());
        let problem = header_problem(&r, Check::Unseal(&refuse)).unwrap();
        assert!(problem.contains("no longer unseals"), "{problem}");
        r[HEADER_SIZE + 200] ^= 1;
        let problem = header_problem(&r, Check::Public).unwrap();
        assert!(problem.contains("copy 1 is damaged"), "{problem}");
        r[200] ^= 1;
        let problem = header_problem(&r, Check::Public).unwrap();
        assert!(problem.contains("no longer decodes"), "{problem}");
    }
}
