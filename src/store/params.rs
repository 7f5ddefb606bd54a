//! The StorageClass parameters sealcsi takes, in the core's own vocabulary ([`Integrity`], [`InitMode`],
//! [`Journal`]: the same enums the CLI's options use). They are recorded with each volume and handed to
//! the node in the volume context.

use std::collections::HashMap;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::header::{Integrity, Journal, Profile};
use crate::volume::init::InitMode;
use crate::volume::stack::Workqueues;

/// StorageClass parameter keys with this prefix are the CO's (csi-provisioner's extra metadata), not ours.
pub const CO_PARAMETER_PREFIX: &str = "csi.storage.k8s.io/";

/// The parameter keys, with their allowed values (first is the default).
pub const PARAMETERS: &[(&str, &[&str])] = &[
    ("integrity", &["hmac-sha256", "none"]),
    ("init", &["fast", "full"]),
    ("journal", &["journal", "direct"]),
    (
        "workqueues",
        &["queued", "inline", "read-inline", "write-inline"],
    ),
];

/// The StorageClass parameters of one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeParams {
    pub integrity: Integrity,
    /// Filesystem volumes only; block volumes are always fully initialized.
    pub init: InitMode,
    pub journal: Journal,
    /// dm-crypt's workqueue flags at every stage (tuning: not in the header). Records written before
    /// the parameter existed read as the default.
    #[serde(default)]
    pub workqueues: Workqueues,
}

impl Default for VolumeParams {
    fn default() -> Self {
        Self {
            integrity: Integrity::HmacSha256,
            init: InitMode::Fast,
            journal: Journal::Journal,
            workqueues: Workqueues::default(),
        }
    }
}

fn allowed_keys() -> String {
    PARAMETERS
        .iter()
        .map(|(k, v)| format!("{k} ({})", v.join("|")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The parameter value's name, as the StorageClass spells it.
fn name_of(value: &impl ValueEnum) -> String {
    value
        .to_possible_value()
        .expect("no variant is skipped")
        .get_name()
        .to_string()
}

/// Parses `value` of parameter `key` as one of `T`'s names.
fn value_of<T: ValueEnum>(key: &str, value: &str) -> Result<T, StoreError> {
    T::from_str(value, false).map_err(|_| {
        let allowed: Vec<String> = T::value_variants().iter().map(name_of).collect();
        StoreError::InvalidArgument(format!(
            "parameter {key}: {value:?} is not one of {}",
            allowed.join("|")
        ))
    })
}

impl VolumeParams {
    /// Parses StorageClass parameters; unknown keys and values are refused, naming what is allowed. Keys
    /// under `csi.storage.k8s.io/` belong to the CO and are ignored.
    pub fn parse(params: &HashMap<String, String>) -> Result<Self, StoreError> {
        let mut out = VolumeParams::default();
        let mut keys: Vec<&String> = params.keys().collect();
        keys.sort();
        for key in keys {
            let value = params[key].as_str();
            if key.starts_with(CO_PARAMETER_PREFIX) {
                continue;
            }
            match key.as_str() {
                "integrity" => out.integrity = value_of(key, value)?,
                "init" => out.init = value_of(key, value)?,
                "journal" => out.journal = value_of(key, value)?,
                "workqueues" => out.workqueues = value_of(key, value)?,
                _ => {
                    return Err(StoreError::InvalidArgument(format!(
                        "unknown parameter {key:?}; allowed parameters: {}",
                        allowed_keys()
                    )));
                }
            }
        }
        if out.integrity == Integrity::None && params.contains_key("journal") {
            return Err(StoreError::InvalidArgument(
                "parameter journal applies only to integrity=hmac-sha256".into(),
            ));
        }
        Ok(out)
    }

    /// The parameters as the volume context handed to the node: every key that applies, explicit
    /// values, so that [`Self::parse`] reads back exactly these parameters (`journal` is left out with
    /// `integrity: none`, which refuses it).
    pub fn to_map(self) -> HashMap<String, String> {
        let mut map = HashMap::from([
            ("integrity".to_string(), name_of(&self.integrity)),
            ("init".to_string(), name_of(&self.init)),
            ("workqueues".to_string(), name_of(&self.workqueues)),
        ]);
        if self.integrity != Integrity::None {
            map.insert("journal".to_string(), name_of(&self.journal));
        }
        map
    }

    /// The mapping profile these parameters ask for.
    /// Refuses these parameters for a volume the CO may stage with a filesystem (any Mount capability)
    /// when they say `journal: direct` (see [`crate::volume::check_format_options`]).
    pub fn check_filesystem_use(self, filesystem: bool) -> Result<(), StoreError> {
        if filesystem && self.profile().journal() == Some(Journal::Direct) {
            return Err(StoreError::InvalidArgument(
                crate::volume::DIRECT_FILESYSTEM_REFUSED.into(),
            ));
        }
        Ok(())
    }

    pub fn profile(self) -> Profile {
        Profile::new(self.integrity, self.journal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parameters_parse_and_refuse_unknown_keys() {
        assert_eq!(
            VolumeParams::parse(&params(&[])).unwrap(),
            VolumeParams::default()
        );
        let p = VolumeParams::parse(&params(&[("integrity", "none"), ("init", "full")])).unwrap();
        assert_eq!(p.profile(), Profile::XtsOnly);
        assert_eq!(p.init, InitMode::Full);
        let p = VolumeParams::parse(&params(&[("journal", "direct")])).unwrap();
        assert_eq!(
            p.profile(),
            Profile::AeadHmacSha256 {
                journal: Journal::Direct
            }
        );
        let err = VolumeParams::parse(&params(&[("fs", "ext4")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"fs\"")
                && err.contains("integrity")
                && err.contains("init")
                && err.contains("journal"),
            "{err}"
        );
        let err = VolumeParams::parse(&params(&[("init", "slow")])).unwrap_err();
        assert!(err.to_string().contains("fast|full"), "{err}");
        assert!(
            VolumeParams::parse(&params(&[("integrity", "none"), ("journal", "direct")])).is_err()
        );
        // The CO's own keys are not ours to judge.
        VolumeParams::parse(&params(&[("csi.storage.k8s.io/pvc/name", "x")])).unwrap();
        let round = VolumeParams::parse(&p.to_map()).unwrap();
        assert_eq!(round, p);
    }

    #[test]
    fn the_allowed_values_are_the_enums_names() {
        fn names<T: ValueEnum>() -> Vec<String> {
            T::value_variants().iter().map(name_of).collect()
        }
        assert_eq!(names::<Integrity>(), PARAMETERS[0].1);
        assert_eq!(names::<InitMode>(), PARAMETERS[1].1);
        assert_eq!(names::<Journal>(), PARAMETERS[2].1);
        assert_eq!(names::<Workqueues>(), PARAMETERS[3].1);
    }

    #[test]
    fn records_keep_their_on_disk_spelling() {
        let json = serde_json::to_string(&VolumeParams::default()).unwrap();
        assert_eq!(
            json,
            r#"{"integrity":"hmac-sha256","init":"fast","journal":"journal","workqueues":"queued"}"#
        );
        // A record written before the workqueues parameter existed reads as the default.
        let old: VolumeParams = serde_json::from_str(
            r#"{"integrity":"hmac-sha256","init":"fast","journal":"journal"}"#,
        )
        .unwrap();
        assert_eq!(old, VolumeParams::default());
    }

    #[test]
    fn workqueues_apply_to_both_profiles() {
        let p = VolumeParams::parse(&params(&[("workqueues", "inline")])).unwrap();
        assert_eq!(p.workqueues, Workqueues::Inline);
        let p = VolumeParams::parse(&params(&[
            ("integrity", "none"),
            ("workqueues", "read-inline"),
        ]))
        .unwrap();
        assert_eq!(p.workqueues, Workqueues::ReadInline);
        assert_eq!(p.to_map()["workqueues"], "read-inline");
        // Every combination reads back from the volume context it makes (a stacked node parses it).
        for integrity in Integrity::value_variants() {
            for workqueues in Workqueues::value_variants() {
                let p = VolumeParams {
                    integrity: *integrity,
                    workqueues: *workqueues,
                    ..VolumeParams::default()
                };
                assert_eq!(VolumeParams::parse(&p.to_map()).unwrap(), p, "{p:?}");
            }
        }
        let err = VolumeParams::parse(&params(&[("workqueues", "none")])).unwrap_err();
        assert!(
            err.to_string()
                .contains("queued|inline|read-inline|write-inline"),
            "{err}"
        );
    }
}
