//! The AMD SEV-SNP sealing source: a key derived by the AMD Secure Processor (`MSG_KEY_REQ`, reached
//! through the guest driver's `SNP_GET_DERIVED_KEY` ioctl on `/dev/sev-guest`).
//!
//! **Not yet run on SEV-SNP hardware.** The request and response layouts, the ioctl numbers and the
//! field-select and key-select bits are checked by unit tests against the kernel's
//! `include/uapi/linux/sev-guest.h` and the SEV-SNP firmware ABI (`MSG_KEY_REQ`, `MSG_REPORT_REQ`,
//! `ATTESTATION_REPORT`); the device itself is only exercised through [`FakeSnpDevice`].
//!
//! The firmware derives a 32-byte key from the chip's VCEK (`ROOT_KEY_SELECT` 0, never the VMRK: that
//! key is chosen by the host's migration agent; `KEY_SEL` 1, never a VLEK: a VLEK is shared across a
//! cloud provider's fleet) mixed with the launch fields selected by `guest_field_select`. Every policy
//! binds the launch MEASUREMENT: the firmware accepts whatever ID block (and ID key) the host supplies at
//! launch and the derived-key request cannot select the ID-key digest, so any binding without the
//! measurement (family ID, image ID, guest SVN) is a key the host can derive with an image of its own.
//! Named policies (docs/keys.md):
//!
//! - `strict`: measurement + guest policy. Any change of the launch image breaks it.
//! - `strict+tcb`: measurement + guest policy + the platform's committed TCB version at sealing time:
//!   firmware whose committed TCB is below it (older, vulnerable firmware) cannot derive the key.
//!
//! Version-1 bindings (before KEY_SEL was set) are still decoded: `strict` ones open (the request is
//! repeated exactly as recorded, KEY_SEL 0); the removed `upgradable` ones are listed but refused at
//! unseal unless the operator opts in ([`SnpSource::allow_legacy_upgradable`]), because the host can
//! mint such a slot for a volume key of its choosing.
//!
//! The binding records the whole request, so the same request is repeated at unseal. The secret handed
//! to the key hierarchy is `HKDF-SHA256(ikm = derived key, info = "sealcsi/v1/snp-secret" || binding)`.

use std::fmt;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use crate::keys::{SECRET_LEN, SealingSecret};
use crate::sealing::{SealError, SealingSource, SourceKind};

/// The guest driver's device node.
pub const SEV_GUEST_DEVICE: &str = "/dev/sev-guest";

/// `guest_field_select` bits (SEV-SNP firmware ABI, `MSG_KEY_REQ` offset 08h).
pub mod field {
    pub const GUEST_POLICY: u64 = 1 << 0;
    pub const IMAGE_ID: u64 = 1 << 1;
    pub const FAMILY_ID: u64 = 1 << 2;
    pub const MEASUREMENT: u64 = 1 << 3;
    pub const GUEST_SVN: u64 = 1 << 4;
    pub const TCB_VERSION: u64 = 1 << 5;
}

/// The first 32-bit word of `MSG_KEY_REQ` (the uapi's `root_key_select`): `ROOT_KEY_SELECT` in bit 0,
/// `KEY_SEL` in bits 2:1.
pub mod key_select {
    /// `ROOT_KEY_SELECT` = 1 would derive from the VMRK (chosen by the migration agent): never used.
    pub const ROOT_KEY_VMRK: u32 = 1 << 0;
    /// `KEY_SEL` = 0: the VLEK if the host installed one, otherwise the VCEK. Only in legacy bindings.
    pub const KEY_SEL_VLEK_IF_INSTALLED: u32 = 0 << 1;
    /// `KEY_SEL` = 1: the VCEK, whatever the host installed.
    pub const KEY_SEL_VCEK: u32 = 1 << 1;
    /// `KEY_SEL` = 2: the VLEK (shared across a provider's fleet): never used.
    pub const KEY_SEL_VLEK: u32 = 2 << 1;
    /// The word every current binding sends: VCEK root, KEY_SEL = VCEK.
    pub const VCEK: u32 = KEY_SEL_VCEK;
}

/// The `msg_version` the kernel requires to be non-zero; version 1 of the guest message format (the
/// 32-byte `MSG_KEY_REQ` of include/uapi/linux/sev-guest.h; version 2 adds LAUNCH_MIT_VECTOR, unused).
const MSG_VERSION: u8 = 1;
/// Bytes of `struct snp_derived_key_req` and of the response (`struct snp_derived_key_resp`).
pub const REQUEST_LEN: usize = 32;
pub const RESPONSE_LEN: usize = 64;
/// Where the 32-byte key sits in the response (after STATUS and 28 reserved bytes).
const RESPONSE_KEY_AT: usize = 32;

/// Bytes of `struct snp_report_req` (64 bytes of user data, u32 vmpl, 28 reserved) and of
/// `struct snp_report_resp` (the `MSG_REPORT_RSP` buffer).
pub const REPORT_REQUEST_LEN: usize = 96;
pub const REPORT_RESPONSE_LEN: usize = 4000;
/// `MSG_REPORT_RSP`: u32 STATUS, u32 REPORT_SIZE, 24 reserved bytes, then the report.
const REPORT_AT: usize = 0x20;
/// `ATTESTATION_REPORT`: u32 VERSION at 0, COMMITTED_TCB (u64) at 1E0h (report versions 2 and later).
const REPORT_COMMITTED_TCB_AT: usize = 0x1E0;
const REPORT_MIN_VERSION: u32 = 2;

const SECRET_LABEL: &[u8] = b"sealcsi/v1/snp-secret";
/// Binding version 1: no KEY_SEL (word 0 of the request was 0); policies strict and upgradable.
const BINDING_V1: u8 = 1;
/// Binding version 2: KEY_SEL = VCEK recorded at offset 20; policies strict and strict+tcb.
const BINDING_V2: u8 = 2;
/// Encoded length of an SNP keyslot binding.
pub const BINDING_LEN: usize = 32;

/// What a removed policy name gets: the reason, so an operator's old configuration fails with it.
const UPGRADABLE_REMOVED: &str = "the SNP policy `upgradable` was removed: it binds family ID, image ID \
     and guest SVN but no signer (the derived-key request cannot select the ID-key digest, and the \
     firmware accepts any ID block the host supplies), so the host can launch its own image with the \
     same IDs and derive the key; use strict or strict+tcb, and move volumes to a new image with the \
     attested transfer (docs/keys.md, docs/runbooks/image-upgrade-snp.md)";

/// Which launch fields a new keyslot binds to (`--snp-policy`, `add-slot --for snp:<policy>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnpPolicy {
    /// Measurement + guest policy: only this exact launch image opens the slot.
    Strict,
    /// Measurement + guest policy + TCB version: as `Strict`, and only on firmware whose committed TCB
    /// is at least the one recorded at sealing.
    StrictTcb,
}

impl SnpPolicy {
    /// The `guest_field_select` mask of the policy. Both contain MEASUREMENT.
    pub fn fields(self) -> u64 {
        match self {
            SnpPolicy::Strict => field::MEASUREMENT | field::GUEST_POLICY,
            SnpPolicy::StrictTcb => field::MEASUREMENT | field::GUEST_POLICY | field::TCB_VERSION,
        }
    }

    /// The binding a new keyslot under this policy records; `committed_tcb` is used by `StrictTcb` only.
    pub fn binding(self, committed_tcb: u64) -> SnpBinding {
        match self {
            SnpPolicy::Strict => SnpBinding {
                policy: SnpBindingPolicy::Strict,
                vmpl: 0,
                tcb_version: 0,
            },
            SnpPolicy::StrictTcb => SnpBinding {
                policy: SnpBindingPolicy::StrictTcb,
                vmpl: 0,
                tcb_version: committed_tcb,
            },
        }
    }
}

impl fmt::Display for SnpPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SnpPolicy::Strict => "strict",
            SnpPolicy::StrictTcb => "strict+tcb",
        })
    }
}

/// Parses `strict` or `strict+tcb`; `upgradable[...]` is refused with the reason it was removed.
impl FromStr for SnpPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "strict" => Ok(SnpPolicy::Strict),
            "strict+tcb" => Ok(SnpPolicy::StrictTcb),
            _ if s.starts_with("upgradable") => Err(UPGRADABLE_REMOVED.to_owned()),
            _ => Err(format!(
                "unknown SNP policy {s:?} (expected strict or strict+tcb)"
            )),
        }
    }
}

/// The policy a recorded binding stands for, current or legacy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnpBindingPolicy {
    /// v2 strict: measurement + guest policy, KEY_SEL = VCEK.
    Strict,
    /// v2 strict+tcb: measurement + guest policy + TCB version, KEY_SEL = VCEK.
    StrictTcb,
    /// v1 strict: measurement + guest policy, KEY_SEL 0 (a VLEK if the host installed one).
    LegacyStrict,
    /// v1 upgradable: family ID + image ID + guest SVN + guest policy. Binds no signer: refused at
    /// unseal unless the operator opts in.
    LegacyUpgradable { min_guest_svn: u32 },
}

impl SnpBindingPolicy {
    fn version(self) -> u8 {
        match self {
            SnpBindingPolicy::Strict | SnpBindingPolicy::StrictTcb => BINDING_V2,
            SnpBindingPolicy::LegacyStrict | SnpBindingPolicy::LegacyUpgradable { .. } => {
                BINDING_V1
            }
        }
    }

    fn code(self) -> u8 {
        match self {
            SnpBindingPolicy::Strict | SnpBindingPolicy::LegacyStrict => 1,
            SnpBindingPolicy::LegacyUpgradable { .. } => 2,
            SnpBindingPolicy::StrictTcb => 3,
        }
    }

    /// The `guest_field_select` mask the binding must carry.
    pub fn fields(self) -> u64 {
        match self {
            SnpBindingPolicy::Strict | SnpBindingPolicy::LegacyStrict => SnpPolicy::Strict.fields(),
            SnpBindingPolicy::StrictTcb => SnpPolicy::StrictTcb.fields(),
            SnpBindingPolicy::LegacyUpgradable { .. } => {
                field::FAMILY_ID | field::IMAGE_ID | field::GUEST_SVN | field::GUEST_POLICY
            }
        }
    }

    /// The first word of the request: KEY_SEL = VCEK for current bindings, 0 (as recorded) for legacy.
    pub fn key_select(self) -> u32 {
        match self.version() {
            BINDING_V2 => key_select::VCEK,
            _ => key_select::KEY_SEL_VLEK_IF_INSTALLED,
        }
    }

    fn guest_svn(self) -> u32 {
        match self {
            SnpBindingPolicy::LegacyUpgradable { min_guest_svn } => min_guest_svn,
            _ => 0,
        }
    }
}

/// What `sealcsi volume slots` prints as the slot's policy: legacy bindings say what is wrong with them.
impl fmt::Display for SnpBindingPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnpBindingPolicy::Strict => f.write_str("strict"),
            SnpBindingPolicy::StrictTcb => f.write_str("strict+tcb"),
            SnpBindingPolicy::LegacyStrict => f.write_str(
                "strict (legacy v1 binding: KEY_SEL 0, a host-installed VLEK would be used; re-seal \
                 with add-slot --for snp:strict)",
            ),
            SnpBindingPolicy::LegacyUpgradable { min_guest_svn } => write!(
                f,
                "upgradable:svn={min_guest_svn} (LEGACY, INSECURE: binds no signer, the host can \
                 derive its key; refused at unseal, see docs/keys.md)"
            ),
        }
    }
}

/// The parameters an SNP keyslot records: the whole derived-key request.
///
/// Encoding (32 bytes, little-endian); version 2 is what new slots get, version 1 is only decoded:
///
/// | Offset | Size | Field              | Version 2 (current)                | Version 1 (legacy)               |
/// |-------:|-----:|--------------------|------------------------------------|----------------------------------|
/// | 0      | 1    | version            | 2                                  | 1                                |
/// | 1      | 1    | policy             | 1 = strict, 3 = strict+tcb         | 1 = strict, 2 = upgradable       |
/// | 2      | 2    | reserved           | 0                                  | 0                                |
/// | 4      | 4    | vmpl               | 0                                  | 0                                |
/// | 8      | 8    | guest_field_select | exactly the policy's mask          | exactly the policy's mask        |
/// | 16     | 4    | guest_svn          | 0                                  | 0 strict; N upgradable           |
/// | 20     | 4    | key select word    | 2 (ROOT_KEY_SELECT 0, KEY_SEL 1)   | 0 (reserved)                     |
/// | 24     | 8    | tcb_version        | 0 strict; committed TCB strict+tcb | 0                                |
///
/// Decoding is strict: a host that edits a binding to select fewer fields (a key other guests on the
/// same chip could derive), another root key or KEY_SEL gets it refused, not honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnpBinding {
    pub policy: SnpBindingPolicy,
    pub vmpl: u32,
    pub tcb_version: u64,
}

fn binding_error(reason: impl Into<String>) -> SealError {
    SealError::Binding {
        kind: SourceKind::Snp,
        reason: reason.into(),
    }
}

impl SnpBinding {
    pub fn guest_svn(&self) -> u32 {
        self.policy.guest_svn()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; BINDING_LEN];
        out[0] = self.policy.version();
        out[1] = self.policy.code();
        out[4..8].copy_from_slice(&self.vmpl.to_le_bytes());
        out[8..16].copy_from_slice(&self.policy.fields().to_le_bytes());
        out[16..20].copy_from_slice(&self.guest_svn().to_le_bytes());
        out[20..24].copy_from_slice(&self.policy.key_select().to_le_bytes());
        out[24..32].copy_from_slice(&self.tcb_version.to_le_bytes());
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, SealError> {
        if buf.len() != BINDING_LEN {
            return Err(binding_error(format!(
                "SNP binding is {} bytes, expected {BINDING_LEN}",
                buf.len()
            )));
        }
        let u32_at = |at: usize| u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
        if buf[2..4] != [0, 0] {
            return Err(binding_error(
                "reserved bytes of the SNP binding are not zero",
            ));
        }
        let policy = Self::decode_policy(buf[0], buf[1], u32_at(16))?;
        let word = u32_at(20);
        if word != policy.key_select() {
            return Err(binding_error(format!(
                "key select word {word:#x} is not the {:#x} of a version {} binding (VCEK root, KEY_SEL \
                 VCEK for version 2)",
                policy.key_select(),
                policy.version()
            )));
        }
        let fields = u64_at(8);
        if fields != policy.fields() {
            return Err(binding_error(format!(
                "guest_field_select {fields:#x} is not the {policy} policy's {:#x}",
                policy.fields()
            )));
        }
        let vmpl = u32_at(4);
        if vmpl != 0 {
            return Err(binding_error(format!("VMPL {vmpl} (only VMPL 0 is used)")));
        }
        let tcb_version = u64_at(24);
        if tcb_version != 0 && policy.fields() & field::TCB_VERSION == 0 {
            return Err(binding_error(
                "a TCB version in a binding that does not select the TCB",
            ));
        }
        Ok(SnpBinding {
            policy,
            vmpl,
            tcb_version,
        })
    }

    fn decode_policy(version: u8, code: u8, guest_svn: u32) -> Result<SnpBindingPolicy, SealError> {
        let policy = match (version, code) {
            (BINDING_V2, 1) => SnpBindingPolicy::Strict,
            (BINDING_V2, 3) => SnpBindingPolicy::StrictTcb,
            (BINDING_V1, 1) => SnpBindingPolicy::LegacyStrict,
            (BINDING_V1, 2) => {
                return Ok(SnpBindingPolicy::LegacyUpgradable {
                    min_guest_svn: guest_svn,
                });
            }
            (BINDING_V1 | BINDING_V2, other) => {
                return Err(binding_error(format!(
                    "unknown SNP policy code {other} in a version {version} binding"
                )));
            }
            (other, _) => {
                return Err(binding_error(format!(
                    "unknown SNP binding version {other}"
                )));
            }
        };
        if guest_svn != 0 {
            return Err(binding_error(format!(
                "a {policy} binding records no guest SVN"
            )));
        }
        Ok(policy)
    }

    /// The firmware request this binding stands for.
    pub fn request(&self) -> DerivedKeyRequest {
        DerivedKeyRequest {
            root_key_select: self.policy.key_select(),
            guest_field_select: self.policy.fields(),
            vmpl: self.vmpl,
            guest_svn: self.guest_svn(),
            tcb_version: self.tcb_version,
        }
    }
}

/// `struct snp_derived_key_req` of include/uapi/linux/sev-guest.h (= `MSG_KEY_REQ` of the firmware ABI,
/// message version 1). `root_key_select` is the whole first word: ROOT_KEY_SELECT bit 0, KEY_SEL 2:1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DerivedKeyRequest {
    pub root_key_select: u32,
    pub guest_field_select: u64,
    pub vmpl: u32,
    pub guest_svn: u32,
    pub tcb_version: u64,
}

impl DerivedKeyRequest {
    /// The 32 bytes the kernel copies in: u32 root_key_select, u32 rsvd, u64 guest_field_select,
    /// u32 vmpl, u32 guest_svn, u64 tcb_version (little-endian, naturally aligned, no padding).
    pub fn to_bytes(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[0..4].copy_from_slice(&self.root_key_select.to_le_bytes());
        out[8..16].copy_from_slice(&self.guest_field_select.to_le_bytes());
        out[16..20].copy_from_slice(&self.vmpl.to_le_bytes());
        out[20..24].copy_from_slice(&self.guest_svn.to_le_bytes());
        out[24..32].copy_from_slice(&self.tcb_version.to_le_bytes());
        out
    }
}

/// The `struct snp_report_req` sealcsi sends: no user data, VMPL 0. The report is only read for its
/// COMMITTED_TCB, inside this guest (the channel to the firmware is encrypted with the VMPCK, which
/// the host does not have), so nothing needs to be bound into it.
pub fn report_request() -> [u8; REPORT_REQUEST_LEN] {
    [0u8; REPORT_REQUEST_LEN]
}

/// The COMMITTED_TCB of the attestation report inside a `MSG_REPORT_RSP`.
pub fn parse_committed_tcb(resp: &[u8]) -> Result<u64, SnpDeviceError> {
    let u32_at = |at: usize| u32::from_le_bytes(resp[at..at + 4].try_into().expect("4 bytes"));
    if resp.len() < REPORT_AT {
        return Err(SnpDeviceError::Report(format!(
            "response is {} bytes",
            resp.len()
        )));
    }
    let status = u32_at(0);
    if status != 0 {
        return Err(SnpDeviceError::Status(status));
    }
    let size = u32_at(4) as usize;
    let end = REPORT_COMMITTED_TCB_AT + 8;
    if size < end || REPORT_AT + size > resp.len() {
        return Err(SnpDeviceError::Report(format!(
            "report size {size} (need at least {end}, at most {})",
            resp.len() - REPORT_AT
        )));
    }
    let version = u32_at(REPORT_AT);
    if version < REPORT_MIN_VERSION {
        return Err(SnpDeviceError::Report(format!(
            "report version {version} has no COMMITTED_TCB (need {REPORT_MIN_VERSION} or later)"
        )));
    }
    let at = REPORT_AT + REPORT_COMMITTED_TCB_AT;
    Ok(u64::from_le_bytes(
        resp[at..at + 8].try_into().expect("8 bytes"),
    ))
}

/// Failures of the SNP guest device, with the firmware's and the VMM's error codes where the kernel
/// returned them.
#[derive(Debug, thiserror::Error)]
pub enum SnpDeviceError {
    /// The device node could not be opened.
    #[error("opening {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The ioctl failed.
    #[error("{request} failed: {errno}; firmware error {fw_error:#x}, VMM error {vmm_error:#x}")]
    Ioctl {
        request: &'static str,
        errno: nix::errno::Errno,
        fw_error: u32,
        vmm_error: u32,
    },
    /// The firmware answered with a non-zero status (0x16: invalid parameters).
    #[error("the firmware refused the request with status {0:#x}")]
    Status(u32),
    /// The attestation report does not have the expected shape.
    #[error("unexpected attestation report: {0}")]
    Report(String),
}

/// The hardware calls the source needs, behind a trait so host tests can run without SNP.
pub trait SnpDevice: Send + Sync {
    /// Sends `request` (a `struct snp_derived_key_req`) and returns the 64-byte response.
    fn derived_key(
        &self,
        request: &[u8; REQUEST_LEN],
    ) -> Result<Zeroizing<[u8; RESPONSE_LEN]>, SnpDeviceError>;

    /// Sends `request` (a `struct snp_report_req`) and returns the `MSG_REPORT_RSP` buffer.
    fn report(&self, request: &[u8; REPORT_REQUEST_LEN]) -> Result<Vec<u8>, SnpDeviceError>;
}

/// `struct snp_guest_request_ioctl`: u8 msg_version, (7 bytes padding), u64 req_data, u64 resp_data,
/// u64 exitinfo2 (= u32 fw_error, u32 vmm_error on little-endian).
#[repr(C)]
#[derive(Debug, Default)]
pub struct GuestRequestIoctl {
    pub msg_version: u8,
    pub req_data: u64,
    pub resp_data: u64,
    pub exitinfo2: u64,
}

/// `SNP_GET_REPORT = _IOWR('S', 0x0, struct snp_guest_request_ioctl)`.
pub const SNP_GET_REPORT: nix::sys::ioctl::ioctl_num_type =
    nix::request_code_readwrite!(b'S', 0x0, std::mem::size_of::<GuestRequestIoctl>());
/// `SNP_GET_DERIVED_KEY = _IOWR('S', 0x1, struct snp_guest_request_ioctl)`.
pub const SNP_GET_DERIVED_KEY: nix::sys::ioctl::ioctl_num_type =
    nix::request_code_readwrite!(b'S', 0x1, std::mem::size_of::<GuestRequestIoctl>());

/// The real device: `/dev/sev-guest` (not yet run on SNP hardware).
#[derive(Debug, Clone)]
pub struct SevGuestDevice {
    path: PathBuf,
}

impl SevGuestDevice {
    /// Checks that the device node can be opened read-write (it is re-opened for each request).
    pub fn open(path: &Path) -> Result<Self, SnpDeviceError> {
        Self::open_file(path)?;
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    fn open_file(path: &Path) -> Result<std::fs::File, SnpDeviceError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| SnpDeviceError::Open {
                path: path.display().to_string(),
                source,
            })
    }

    /// One guest request: `req` is copied in by the kernel, `resp` written by it.
    fn guest_request(
        &self,
        name: &'static str,
        number: nix::sys::ioctl::ioctl_num_type,
        req: &[u8],
        resp: &mut [u8],
    ) -> Result<(), SnpDeviceError> {
        let file = Self::open_file(&self.path)?;
        let mut arg = GuestRequestIoctl {
            msg_version: MSG_VERSION,
            req_data: req.as_ptr() as u64,
            resp_data: resp.as_mut_ptr() as u64,
            exitinfo2: 0,
        };
        // SAFETY: the SNP guest ioctls read one `snp_guest_request_ioctl` from `arg` and write it back;
        // the kernel copies the request struct (`req.len()` bytes, the exact uapi size for `number`,
        // checked by the callers' array types) from `req_data` and writes the response struct to
        // `resp_data` (`resp.len()` bytes, the exact uapi size). `arg`, `req` and `resp` are live,
        // correctly sized buffers for the whole call, and `file` keeps the descriptor open until it
        // returns.
        let rc = unsafe {
            nix::libc::ioctl(
                file.as_raw_fd(),
                number as _,
                &mut arg as *mut GuestRequestIoctl,
            )
        };
        if rc < 0 {
            return Err(SnpDeviceError::Ioctl {
                request: name,
                errno: nix::errno::Errno::last(),
                fw_error: arg.exitinfo2 as u32,
                vmm_error: (arg.exitinfo2 >> 32) as u32,
            });
        }
        Ok(())
    }
}

impl SnpDevice for SevGuestDevice {
    fn derived_key(
        &self,
        request: &[u8; REQUEST_LEN],
    ) -> Result<Zeroizing<[u8; RESPONSE_LEN]>, SnpDeviceError> {
        let mut resp = Zeroizing::new([0u8; RESPONSE_LEN]);
        self.guest_request(
            "SNP_GET_DERIVED_KEY",
            SNP_GET_DERIVED_KEY,
            request,
            resp.as_mut(),
        )?;
        Ok(resp)
    }

    fn report(&self, request: &[u8; REPORT_REQUEST_LEN]) -> Result<Vec<u8>, SnpDeviceError> {
        let mut resp = vec![0u8; REPORT_RESPONSE_LEN];
        self.guest_request("SNP_GET_REPORT", SNP_GET_REPORT, request, &mut resp)?;
        Ok(resp)
    }
}

/// An in-memory stand-in for tests: derives a key from a fixed chip secret and the request bytes, and
/// records every request. It is never what a user runs.
#[derive(Default)]
pub struct FakeSnpDevice {
    /// Stands in for the launch fields: change it and every key changes, as a new image would.
    pub launch: Vec<u8>,
    /// Requests seen, in order.
    pub requests: std::sync::Mutex<Vec<[u8; REQUEST_LEN]>>,
    /// If set, the firmware status every request gets.
    pub status: u32,
    /// The COMMITTED_TCB the fake report carries. As the firmware does, a key request that selects
    /// the TCB and asks for a TCB above it (in any byte) gets status 0x16.
    pub committed_tcb: u64,
}

/// True if `tcb` exceeds `committed` in any of the TCB_VERSION's component bytes.
fn tcb_exceeds(tcb: u64, committed: u64) -> bool {
    tcb.to_le_bytes()
        .iter()
        .zip(committed.to_le_bytes())
        .any(|(t, c)| *t > c)
}

impl SnpDevice for FakeSnpDevice {
    fn derived_key(
        &self,
        request: &[u8; REQUEST_LEN],
    ) -> Result<Zeroizing<[u8; RESPONSE_LEN]>, SnpDeviceError> {
        self.requests
            .lock()
            .expect("request log lock")
            .push(*request);
        let fields = u64::from_le_bytes(request[8..16].try_into().expect("8 bytes"));
        let tcb = u64::from_le_bytes(request[24..32].try_into().expect("8 bytes"));
        let status = if self.status == 0
            && fields & field::TCB_VERSION != 0
            && tcb_exceeds(tcb, self.committed_tcb)
        {
            0x16
        } else {
            self.status
        };
        let mut resp = Zeroizing::new([0u8; RESPONSE_LEN]);
        resp[0..4].copy_from_slice(&status.to_le_bytes());
        if status == 0 {
            let hk = Hkdf::<Sha256>::new(Some(&self.launch), b"fake-vcek");
            hk.expand(request, &mut resp[RESPONSE_KEY_AT..])
                .expect("32 bytes is a valid HKDF output length");
        }
        Ok(resp)
    }

    fn report(&self, _request: &[u8; REPORT_REQUEST_LEN]) -> Result<Vec<u8>, SnpDeviceError> {
        let mut resp = vec![0u8; REPORT_RESPONSE_LEN];
        resp[0..4].copy_from_slice(&self.status.to_le_bytes());
        resp[4..8].copy_from_slice(&0x4A0u32.to_le_bytes());
        resp[REPORT_AT..REPORT_AT + 4].copy_from_slice(&3u32.to_le_bytes());
        let at = REPORT_AT + REPORT_COMMITTED_TCB_AT;
        resp[at..at + 8].copy_from_slice(&self.committed_tcb.to_le_bytes());
        Ok(resp)
    }
}

/// The SEV-SNP sealing source.
pub struct SnpSource {
    device: Box<dyn SnpDevice>,
    policy: SnpPolicy,
    /// The platform's COMMITTED_TCB when the source opened (read only for `strict+tcb`, else 0).
    committed_tcb: u64,
    /// Whether legacy `upgradable` slots may be unsealed (operator opt-in for migrating off them).
    allow_legacy_upgradable: bool,
}

impl fmt::Debug for SnpSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnpSource")
            .field("policy", &self.policy)
            .field(
                "committed_tcb",
                &format_args!("{:#018x}", self.committed_tcb),
            )
            .field("allow_legacy_upgradable", &self.allow_legacy_upgradable)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: impl fmt::Display) -> SealError {
    SealError::Unavailable {
        kind: SourceKind::Snp,
        reason: e.to_string(),
    }
}

impl SnpSource {
    /// Opens `/dev/sev-guest`; new keyslots bind to `policy`. Slots of every current policy unseal.
    pub fn open(policy: SnpPolicy) -> Result<Self, SealError> {
        Self::open_at(Path::new(SEV_GUEST_DEVICE), policy)
    }

    /// As [`SnpSource::open`], with the device node at `path`.
    pub fn open_at(path: &Path, policy: SnpPolicy) -> Result<Self, SealError> {
        let device = SevGuestDevice::open(path).map_err(|e| {
            unavailable(format!(
                "{e} (is this an SEV-SNP guest with the sev-guest driver loaded?)"
            ))
        })?;
        Self::with_device(policy, Box::new(device))
    }

    /// A source on `device`. For `strict+tcb` it reads the committed TCB from an attestation report now,
    /// so a node that cannot bind the TCB fails at start, not at its first format.
    pub fn with_device(policy: SnpPolicy, device: Box<dyn SnpDevice>) -> Result<Self, SealError> {
        let committed_tcb = match policy {
            SnpPolicy::Strict => 0,
            SnpPolicy::StrictTcb => device
                .report(&report_request())
                .and_then(|resp| parse_committed_tcb(&resp))
                .map_err(|e| {
                    unavailable(format!("reading the committed TCB for strict+tcb: {e}"))
                })?,
        };
        Ok(Self {
            device,
            policy,
            committed_tcb,
            allow_legacy_upgradable: false,
        })
    }

    /// Lets this source unseal legacy `upgradable` slots. **This trusts the host**: anyone who can
    /// launch an image with the same family and image IDs (the host can, with its own ID key) derives
    /// the same key, and can write such a slot around a volume key it knows. Only for moving the data
    /// of a volume that has no other slot to a new volume (docs/keys.md).
    pub fn allow_legacy_upgradable(mut self, allow: bool) -> Self {
        self.allow_legacy_upgradable = allow;
        self
    }

    pub fn policy(&self) -> SnpPolicy {
        self.policy
    }

    /// The binding new keyslots record.
    pub fn binding(&self) -> SnpBinding {
        self.policy.binding(self.committed_tcb)
    }

    /// Refuses (or, with the opt-in, loudly admits) bindings that are not current.
    fn check_legacy(&self, binding: &SnpBinding) -> Result<(), SealError> {
        match binding.policy {
            SnpBindingPolicy::LegacyUpgradable { .. } if !self.allow_legacy_upgradable => {
                tracing::warn!(
                    policy = %binding.policy,
                    "refusing a legacy SNP upgradable keyslot: the host can derive its key, and can \
                     write such a slot around a volume key it knows; open the volume with a recovery \
                     slot, or (trusting the host, to move the data off) with \
                     --snp-allow-legacy-upgradable"
                );
                Err(binding_error(
                    "legacy SNP upgradable binding refused: it binds no signer, so the host can \
                     derive its key (see docs/keys.md; --snp-allow-legacy-upgradable trusts the host)",
                ))
            }
            SnpBindingPolicy::LegacyUpgradable { .. } => {
                tracing::warn!(
                    policy = %binding.policy,
                    "INSECURE: unsealing a legacy SNP upgradable keyslot because \
                     --snp-allow-legacy-upgradable is set; this trusts the host. Move the data to a new \
                     volume and stop using this one"
                );
                Ok(())
            }
            SnpBindingPolicy::LegacyStrict => {
                tracing::warn!(
                    "unsealing a legacy (v1) SNP strict keyslot, derived with KEY_SEL 0 (a VLEK if the \
                     host installed one); add a current slot with add-slot --for snp:strict and remove \
                     this one"
                );
                Ok(())
            }
            SnpBindingPolicy::Strict | SnpBindingPolicy::StrictTcb => Ok(()),
        }
    }
}

/// The derived key inside a firmware response, if the status says success.
pub fn parse_response(resp: &[u8; RESPONSE_LEN]) -> Result<&[u8], SnpDeviceError> {
    let status = u32::from_le_bytes(resp[0..4].try_into().expect("4 bytes"));
    if status != 0 {
        return Err(SnpDeviceError::Status(status));
    }
    Ok(&resp[RESPONSE_KEY_AT..RESPONSE_KEY_AT + SECRET_LEN])
}

impl SealingSource for SnpSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Snp
    }

    fn default_binding(&self) -> Vec<u8> {
        self.binding().encode()
    }

    fn secret(&self, binding: &[u8]) -> Result<SealingSecret, SealError> {
        let decoded = SnpBinding::decode(binding)?;
        self.check_legacy(&decoded)?;
        let resp = self
            .device
            .derived_key(&decoded.request().to_bytes())
            .map_err(unavailable)?;
        let key = parse_response(&resp).map_err(|e| match e {
            // A TCB above this platform's committed one: a slot for newer firmware (or another
            // platform), not a failure of this node.
            SnpDeviceError::Status(0x16) if decoded.policy == SnpBindingPolicy::StrictTcb => {
                binding_error(format!(
                    "the firmware refused TCB version {:#018x} (above this platform's committed TCB?)",
                    decoded.tcb_version
                ))
            }
            other => unavailable(other),
        })?;
        let hk = Hkdf::<Sha256>::new(None, key);
        let mut info = SECRET_LABEL.to_vec();
        info.extend_from_slice(binding);
        let mut out = [0u8; SECRET_LEN];
        hk.expand(&info, &mut out)
            .expect("32 bytes is a valid HKDF output length");
        let secret = SealingSecret::new(out);
        out.zeroize();
        Ok(secret)
    }

    fn describe(&self) -> String {
        let binds = match self.policy {
            SnpPolicy::Strict => "launch measurement + guest policy".to_owned(),
            SnpPolicy::StrictTcb => format!(
                "launch measurement + guest policy + TCB version {:#018x} (the committed TCB)",
                self.committed_tcb
            ),
        };
        format!(
            "AMD SEV-SNP derived key (VCEK root, KEY_SEL VCEK), policy {}: new keyslots bind to the \
             {binds} (this source has not yet been run on SEV-SNP hardware)",
            self.policy
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};
    use std::sync::Arc;

    #[test]
    fn ioctl_numbers_are_iowr_s_0_and_1_of_the_32_byte_request() {
        // _IOWR('S', nr, struct snp_guest_request_ioctl): dir read|write (3) << 30, size 32 << 16,
        // type 'S' (0x53) << 8, nr 0 (SNP_GET_REPORT) or 1 (SNP_GET_DERIVED_KEY).
        assert_eq!(size_of::<GuestRequestIoctl>(), 32);
        assert_eq!(SNP_GET_REPORT, 0xC020_5300);
        assert_eq!(SNP_GET_DERIVED_KEY, 0xC020_5301);
    }

    #[test]
    fn guest_request_struct_matches_the_uapi_layout() {
        assert_eq!(offset_of!(GuestRequestIoctl, msg_version), 0);
        assert_eq!(offset_of!(GuestRequestIoctl, req_data), 8);
        assert_eq!(offset_of!(GuestRequestIoctl, resp_data), 16);
        assert_eq!(offset_of!(GuestRequestIoctl, exitinfo2), 24);
        // struct snp_report_req: u8 user_data[64], u32 vmpl, u8 rsvd[28].
        assert_eq!(REPORT_REQUEST_LEN, 64 + 4 + 28);
        assert_eq!(report_request(), [0u8; 96]);
    }

    #[test]
    fn request_encoding_is_byte_exact() {
        let req = DerivedKeyRequest {
            root_key_select: 0x2,
            guest_field_select: 0x17,
            vmpl: 2,
            guest_svn: 0x0102_0304,
            tcb_version: 0x1122_3344_5566_7788,
        };
        let expected: [u8; 32] = [
            0x02, 0, 0, 0, // ROOT_KEY_SELECT (bit 0) = VCEK root, KEY_SEL (bits 2:1) = 1
            0, 0, 0, 0, // rsvd
            0x17, 0, 0, 0, 0, 0, 0, 0, // guest_field_select
            2, 0, 0, 0, // vmpl
            0x04, 0x03, 0x02, 0x01, // guest_svn
            0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // tcb_version
        ];
        assert_eq!(req.to_bytes(), expected);
    }

    #[test]
    fn key_select_is_vcek_root_and_key_sel_vcek() {
        assert_eq!(key_select::ROOT_KEY_VMRK, 0b001);
        assert_eq!(key_select::KEY_SEL_VLEK_IF_INSTALLED, 0b000);
        assert_eq!(key_select::KEY_SEL_VCEK, 0b010);
        assert_eq!(key_select::KEY_SEL_VLEK, 0b100);
        for policy in [SnpPolicy::Strict, SnpPolicy::StrictTcb] {
            let bytes = policy.binding(7).request().to_bytes();
            let word = u32::from_le_bytes(bytes[0..4].try_into().unwrap());
            assert_eq!(
                word & 1,
                0,
                "{policy}: ROOT_KEY_SELECT must be the VCEK root"
            );
            assert_eq!((word >> 1) & 0b11, 1, "{policy}: KEY_SEL must be VCEK");
            assert_eq!(word >> 3, 0, "{policy}: reserved bits");
        }
    }

    #[test]
    fn field_select_bits_and_every_policy_binds_the_measurement() {
        assert_eq!(
            [
                field::GUEST_POLICY,
                field::IMAGE_ID,
                field::FAMILY_ID,
                field::MEASUREMENT,
                field::GUEST_SVN,
                field::TCB_VERSION
            ],
            [1, 2, 4, 8, 16, 32]
        );
        assert_eq!(SnpPolicy::Strict.fields(), 0b00_1001);
        assert_eq!(SnpPolicy::StrictTcb.fields(), 0b10_1001);
        for policy in [SnpPolicy::Strict, SnpPolicy::StrictTcb] {
            assert_ne!(policy.fields() & field::MEASUREMENT, 0, "{policy}");
        }
        let strict = SnpPolicy::Strict.binding(0x55).request();
        assert_eq!(
            (
                strict.guest_field_select,
                strict.vmpl,
                strict.guest_svn,
                strict.tcb_version
            ),
            (0x09, 0, 0, 0),
            "strict ignores the TCB"
        );
    }

    #[test]
    fn strict_tcb_sets_bit_5_and_sends_the_committed_tcb() {
        let tcb = 0xDB00_0000_0000_1703; // microcode 0xDB, SNP 0, TEE 0x17, boot loader 3
        let device = Arc::new(FakeSnpDevice {
            launch: b"image-1".to_vec(),
            committed_tcb: tcb,
            ..Default::default()
        });
        let source =
            SnpSource::with_device(SnpPolicy::StrictTcb, Box::new(Shared(device.clone()))).unwrap();
        source.secret(&source.default_binding()).unwrap();
        let sent = device.requests.lock().unwrap()[0];
        assert_eq!(u64::from_le_bytes(sent[8..16].try_into().unwrap()), 0x29);
        assert_eq!(u64::from_le_bytes(sent[24..32].try_into().unwrap()), tcb);
        assert!(source.describe().contains("0xdb00000000001703"));
    }

    #[test]
    fn binding_encoding_is_as_documented_and_round_trips() {
        let s = SnpPolicy::Strict.binding(0);
        let mut expected = [0u8; 32];
        expected[0] = 2;
        expected[1] = 1;
        expected[8] = 0x09;
        expected[20] = 0x02;
        assert_eq!(s.encode(), expected);
        assert_eq!(SnpBinding::decode(&s.encode()).unwrap(), s);
        let t = SnpPolicy::StrictTcb.binding(0x0102_0304_0506_0708);
        let bytes = t.encode();
        let mut expected = [0u8; 32];
        expected[0] = 2;
        expected[1] = 3;
        expected[8] = 0x29;
        expected[20] = 0x02;
        expected[24..32].copy_from_slice(&[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(bytes, expected);
        assert!(bytes.len() <= crate::header::MAX_BINDING_LEN);
        assert_eq!(SnpBinding::decode(&bytes).unwrap(), t);
    }

    /// The bytes earlier builds wrote: version 1, no key-select word.
    fn legacy(code: u8, fields: u8, svn: u8) -> Vec<u8> {
        let mut b = vec![0u8; 32];
        b[0] = 1;
        b[1] = code;
        b[8] = fields;
        b[16] = svn;
        b
    }

    #[test]
    fn legacy_bindings_still_decode_for_listing() {
        let strict = SnpBinding::decode(&legacy(1, 0x09, 0)).unwrap();
        assert_eq!(strict.policy, SnpBindingPolicy::LegacyStrict);
        assert_eq!(strict.request().root_key_select, 0, "repeated as recorded");
        assert_eq!(strict.encode(), legacy(1, 0x09, 0));
        let up = SnpBinding::decode(&legacy(2, 0x17, 5)).unwrap();
        assert_eq!(
            up.policy,
            SnpBindingPolicy::LegacyUpgradable { min_guest_svn: 5 }
        );
        assert_eq!(up.encode(), legacy(2, 0x17, 5));
        let shown = up.policy.to_string();
        assert!(shown.starts_with("upgradable:svn=5"), "{shown}");
        assert!(
            shown.contains("INSECURE") && shown.contains("refused"),
            "{shown}"
        );
        assert!(strict.policy.to_string().contains("legacy"));
    }

    #[test]
    fn binding_decode_rejects_weakened_or_unknown_bindings() {
        let good = SnpPolicy::Strict.binding(0).encode();
        let edit = |at: usize, v: u8| {
            let mut b = good.clone();
            b[at] = v;
            SnpBinding::decode(&b)
        };
        assert!(edit(0, 3).is_err(), "version");
        assert!(edit(1, 2).is_err(), "upgradable is not a version 2 policy");
        assert!(edit(1, 4).is_err(), "policy code");
        assert!(edit(2, 1).is_err(), "reserved");
        assert!(edit(4, 1).is_err(), "vmpl");
        assert!(edit(8, 0x08).is_err(), "measurement without policy");
        assert!(edit(8, 0x01).is_err(), "policy without measurement");
        assert!(edit(8, 0x00).is_err(), "no fields at all");
        assert!(edit(8, 0x29).is_err(), "TCB bit in a strict binding");
        assert!(edit(16, 1).is_err(), "strict with an SVN");
        assert!(edit(20, 0x00).is_err(), "KEY_SEL 0 in a version 2 binding");
        assert!(edit(20, 0x03).is_err(), "VMRK root");
        assert!(edit(20, 0x04).is_err(), "KEY_SEL VLEK");
        assert!(edit(21, 1).is_err(), "key select reserved bits");
        assert!(edit(24, 1).is_err(), "tcb version without the TCB bit");
        assert!(SnpBinding::decode(&good[..31]).is_err());
        assert!(SnpBinding::decode(&[]).is_err());
        let mut tcb = SnpPolicy::StrictTcb.binding(9).encode();
        tcb[8] = 0x21; // drop the measurement
        assert!(SnpBinding::decode(&tcb).is_err());
        // Legacy bindings are held to their own layout.
        assert!(
            SnpBinding::decode(&legacy(1, 0x09, 1)).is_err(),
            "strict v1 SVN"
        );
        assert!(
            SnpBinding::decode(&legacy(2, 0x13, 1)).is_err(),
            "upgradable minus image ID"
        );
        assert!(
            SnpBinding::decode(&legacy(3, 0x29, 0)).is_err(),
            "strict+tcb is not v1"
        );
        let mut v1_with_word = legacy(1, 0x09, 0);
        v1_with_word[20] = 2;
        assert!(SnpBinding::decode(&v1_with_word).is_err());
    }

    #[test]
    fn policy_parses_strict_and_strict_tcb_and_refuses_upgradable() {
        for (text, policy) in [
            ("strict", SnpPolicy::Strict),
            ("strict+tcb", SnpPolicy::StrictTcb),
        ] {
            assert_eq!(text.parse::<SnpPolicy>().unwrap(), policy);
            assert_eq!(policy.to_string(), text);
        }
        for removed in ["upgradable", "upgradable:svn=12", "upgradable:svn=x"] {
            let err = removed.parse::<SnpPolicy>().unwrap_err();
            assert!(
                err.contains("removed") && err.contains("no signer"),
                "{err}"
            );
        }
        for bad in ["", "vmrk", "strict:svn=1", "strict+", "tcb", "Strict"] {
            assert!(bad.parse::<SnpPolicy>().is_err(), "{bad:?}");
        }
    }

    fn fake(launch: &[u8]) -> FakeSnpDevice {
        FakeSnpDevice {
            launch: launch.to_vec(),
            ..Default::default()
        }
    }

    struct Shared(Arc<FakeSnpDevice>);
    impl SnpDevice for Shared {
        fn derived_key(
            &self,
            request: &[u8; REQUEST_LEN],
        ) -> Result<Zeroizing<[u8; RESPONSE_LEN]>, SnpDeviceError> {
            self.0.derived_key(request)
        }
        fn report(&self, request: &[u8; REPORT_REQUEST_LEN]) -> Result<Vec<u8>, SnpDeviceError> {
            self.0.report(request)
        }
    }

    fn source_on(policy: SnpPolicy, device: &Arc<FakeSnpDevice>) -> SnpSource {
        SnpSource::with_device(policy, Box::new(Shared(device.clone()))).unwrap()
    }

    #[test]
    fn source_sends_the_recorded_request_and_derives_a_stable_secret() {
        let device = Arc::new(fake(b"image-1"));
        let source = source_on(SnpPolicy::Strict, &device);
        let binding = source.default_binding();
        let a = source.secret(&binding).unwrap().digest();
        let b = source.secret(&binding).unwrap().digest();
        assert_eq!(a, b);
        let requests = device.requests.lock().unwrap().clone();
        assert_eq!(requests.len(), 2);
        let expected = DerivedKeyRequest {
            root_key_select: key_select::VCEK,
            guest_field_select: 0x09,
            vmpl: 0,
            guest_svn: 0,
            tcb_version: 0,
        };
        assert_eq!(requests[0], expected.to_bytes());
        // Bindings from elsewhere are binding errors (a slot for someone else), never a request.
        let before = device.requests.lock().unwrap().len();
        assert!(matches!(source.secret(&[]), Err(SealError::Binding { .. })));
        assert_eq!(device.requests.lock().unwrap().len(), before);
    }

    #[test]
    fn legacy_upgradable_slot_is_refused_unless_the_operator_opts_in() {
        let device = Arc::new(fake(b"image-1"));
        let slot = legacy(2, 0x17, 3);
        let err = source_on(SnpPolicy::Strict, &device)
            .secret(&slot)
            .unwrap_err();
        assert!(matches!(err, SealError::Binding { .. }), "{err}");
        assert!(
            err.to_string().contains("--snp-allow-legacy-upgradable"),
            "{err}"
        );
        assert!(
            device.requests.lock().unwrap().is_empty(),
            "refused before asking the firmware"
        );
        let trusting = source_on(SnpPolicy::Strict, &device).allow_legacy_upgradable(true);
        trusting.secret(&slot).unwrap();
        let sent = device.requests.lock().unwrap()[0];
        let expected = DerivedKeyRequest {
            root_key_select: 0,
            guest_field_select: 0x17,
            vmpl: 0,
            guest_svn: 3,
            tcb_version: 0,
        };
        assert_eq!(
            sent,
            expected.to_bytes(),
            "the legacy request, exactly as recorded"
        );
    }

    #[test]
    fn legacy_strict_slot_opens_with_its_recorded_request() {
        let device = Arc::new(fake(b"image-1"));
        let source = source_on(SnpPolicy::Strict, &device);
        let old = legacy(1, 0x09, 0);
        let secret = source.secret(&old).unwrap().digest();
        assert_eq!(device.requests.lock().unwrap()[0][0..4], [0, 0, 0, 0]);
        // A different secret from the current binding: the identity digest changes with the upgrade.
        assert_ne!(
            secret,
            source.secret(&source.default_binding()).unwrap().digest()
        );
    }

    #[test]
    fn strict_tcb_slot_needs_a_committed_tcb_at_least_the_recorded_one() {
        let with_tcb = |tcb: u64| {
            Arc::new(FakeSnpDevice {
                launch: b"image-1".to_vec(),
                committed_tcb: tcb,
                ..Default::default()
            })
        };
        let sealed_on = source_on(SnpPolicy::StrictTcb, &with_tcb(0x0800_0000_0000_0305));
        let binding = sealed_on.default_binding();
        let digest = sealed_on.secret(&binding).unwrap().digest();
        // Older firmware (microcode 0x07 < 0x08) is refused by the firmware: a slot for someone else.
        let older = source_on(SnpPolicy::Strict, &with_tcb(0x0700_0000_0000_0305));
        assert!(matches!(
            older.secret(&binding),
            Err(SealError::Binding { .. })
        ));
        // Newer firmware may derive the key of an older TCB (the ABI only bounds TCB_VERSION by the
        // committed TCB); the fake models that reading of the specification.
        let newer = source_on(SnpPolicy::Strict, &with_tcb(0x0900_0000_0000_0306));
        assert_eq!(newer.secret(&binding).unwrap().digest(), digest);
    }

    #[test]
    fn strict_tcb_without_a_report_is_unavailable() {
        let device = FakeSnpDevice {
            status: 0x16,
            ..Default::default()
        };
        let err = SnpSource::with_device(SnpPolicy::StrictTcb, Box::new(device)).unwrap_err();
        assert!(matches!(err, SealError::Unavailable { .. }), "{err}");
        assert!(err.to_string().contains("committed TCB"), "{err}");
    }

    #[test]
    fn committed_tcb_is_read_from_report_offset_1e0() {
        let mut resp = vec![0u8; REPORT_RESPONSE_LEN];
        resp[4..8].copy_from_slice(&0x4A0u32.to_le_bytes()); // REPORT_SIZE
        resp[0x20] = 2; // report VERSION
        resp[0x20 + 0x1E0..0x20 + 0x1E8].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        resp[0x20 + 0x180..0x20 + 0x188].fill(0xEE); // REPORTED_TCB: host-chosen, not used
        assert_eq!(parse_committed_tcb(&resp).unwrap(), 0x0807_0605_0403_0201);
        let mut old = resp.clone();
        old[0x20] = 1;
        assert!(matches!(
            parse_committed_tcb(&old),
            Err(SnpDeviceError::Report(_))
        ));
        let mut short = resp.clone();
        short[4..8].copy_from_slice(&0x100u32.to_le_bytes());
        assert!(matches!(
            parse_committed_tcb(&short),
            Err(SnpDeviceError::Report(_))
        ));
        let mut huge = resp.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            parse_committed_tcb(&huge),
            Err(SnpDeviceError::Report(_))
        ));
        resp[0] = 0x16;
        assert!(matches!(
            parse_committed_tcb(&resp),
            Err(SnpDeviceError::Status(0x16))
        ));
        assert!(parse_committed_tcb(&resp[..8]).is_err());
    }

    #[test]
    fn another_launch_gets_another_secret() {
        let a = SnpSource::with_device(SnpPolicy::Strict, Box::new(fake(b"image-1"))).unwrap();
        let b = SnpSource::with_device(SnpPolicy::Strict, Box::new(fake(b"image-2"))).unwrap();
        let binding = a.default_binding();
        assert_ne!(
            a.secret(&binding).unwrap().digest(),
            b.secret(&binding).unwrap().digest()
        );
    }

    #[test]
    fn firmware_status_is_an_error() {
        let device = FakeSnpDevice {
            status: 0x16,
            ..Default::default()
        };
        let source = SnpSource::with_device(SnpPolicy::Strict, Box::new(device)).unwrap();
        let err = source.secret(&source.default_binding()).unwrap_err();
        assert!(matches!(err, SealError::Unavailable { .. }), "{err}");
        assert!(err.to_string().contains("0x16"), "{err}");
    }

    #[test]
    fn response_key_is_at_offset_32() {
        let mut resp = [0u8; RESPONSE_LEN];
        resp[32..].copy_from_slice(&[0xAB; 32]);
        resp[4..32].fill(0xEE); // reserved bytes are not part of the key
        assert_eq!(parse_response(&resp).unwrap(), &[0xAB; 32]);
        resp[0] = 0x16;
        assert!(matches!(
            parse_response(&resp),
            Err(SnpDeviceError::Status(0x16))
        ));
    }

    #[test]
    fn missing_device_is_unavailable() {
        let err = SevGuestDevice::open(Path::new("/nonexistent/sev-guest")).unwrap_err();
        assert!(matches!(err, SnpDeviceError::Open { .. }));
        assert!(matches!(
            SnpSource::open_at(Path::new("/nonexistent/sev-guest"), SnpPolicy::Strict),
            Err(SealError::Unavailable { .. })
        ));
    }

    #[test]
    fn describe_says_untested_on_hardware() {
        let s = SnpSource::with_device(SnpPolicy::Strict, Box::new(fake(b"x"))).unwrap();
        assert!(
            s.describe()
                .contains("not yet been run on SEV-SNP hardware")
        );
    }
}
