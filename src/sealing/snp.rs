//! The AMD SEV-SNP sealing source: a key derived by the AMD Secure Processor (`MSG_KEY_REQ`, reached
//! through the guest driver's `SNP_GET_DERIVED_KEY` ioctl on `/dev/sev-guest`).
//!
//! **Not yet run on SEV-SNP hardware.** The request and response layouts, the ioctl number and the
//! field-select bits are checked by unit tests against the kernel's `include/uapi/linux/sev-guest.h` and
//! the SEV-SNP firmware ABI; the device itself is only exercised through [`FakeSnpDevice`].
//!
//! The firmware derives a 32-byte key from the chip's VCEK (never the VMRK: that key is chosen by the
//! host's migration agent) mixed with the launch fields selected by `guest_field_select`. Two named
//! policies decide which fields a new keyslot binds to (docs/keys.md):
//!
//! - `strict`: measurement + guest policy. Any change of the launch image breaks it.
//! - `upgradable`: family ID + image ID + guest SVN + guest policy. Any image whose ID block, signed by
//!   the same ID key, carries the same family and image IDs and a guest SVN at least the recorded one
//!   derives the same key.
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

/// `guest_field_select` bits (SEV-SNP firmware ABI, `MSG_KEY_REQ`).
pub mod field {
    pub const GUEST_POLICY: u64 = 1 << 0;
    pub const IMAGE_ID: u64 = 1 << 1;
    pub const FAMILY_ID: u64 = 1 << 2;
    pub const MEASUREMENT: u64 = 1 << 3;
    pub const GUEST_SVN: u64 = 1 << 4;
    pub const TCB_VERSION: u64 = 1 << 5;
}

/// `root_key_select` 0: the VCEK (chip-unique, versioned). 1 would be the VMRK, which sealcsi never uses.
const ROOT_KEY_VCEK: u32 = 0;
/// The `msg_version` the kernel requires to be non-zero; version 1 of the guest message format.
const MSG_VERSION: u8 = 1;
/// Bytes of `struct snp_derived_key_req` and of the response (`struct snp_derived_key_resp`).
pub const REQUEST_LEN: usize = 32;
pub const RESPONSE_LEN: usize = 64;
/// Where the 32-byte key sits in the response (after STATUS and 28 reserved bytes).
const RESPONSE_KEY_AT: usize = 32;

const SECRET_LABEL: &[u8] = b"sealcsi/v1/snp-secret";
const BINDING_VERSION: u8 = 1;
/// Encoded length of an SNP keyslot binding.
pub const BINDING_LEN: usize = 32;

/// Which launch fields a new keyslot binds to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnpPolicy {
    /// Measurement + guest policy: only this exact launch image opens the slot.
    Strict,
    /// Family ID + image ID + guest SVN + guest policy: images signed with the same ID key, with the same
    /// family and image IDs and a guest SVN of at least `min_guest_svn`, open the slot.
    Upgradable { min_guest_svn: u32 },
}

impl SnpPolicy {
    fn code(self) -> u8 {
        match self {
            SnpPolicy::Strict => 1,
            SnpPolicy::Upgradable { .. } => 2,
        }
    }

    /// The `guest_field_select` mask of the policy.
    pub fn fields(self) -> u64 {
        match self {
            SnpPolicy::Strict => field::MEASUREMENT | field::GUEST_POLICY,
            SnpPolicy::Upgradable { .. } => {
                field::FAMILY_ID | field::IMAGE_ID | field::GUEST_SVN | field::GUEST_POLICY
            }
        }
    }

    /// The binding a new keyslot under this policy records.
    pub fn binding(self) -> SnpBinding {
        SnpBinding {
            policy: self,
            vmpl: 0,
            tcb_version: 0,
        }
    }
}

impl fmt::Display for SnpPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnpPolicy::Strict => f.write_str("strict"),
            SnpPolicy::Upgradable { min_guest_svn: 0 } => f.write_str("upgradable"),
            SnpPolicy::Upgradable { min_guest_svn } => write!(f, "upgradable:svn={min_guest_svn}"),
        }
    }
}

/// Parses `strict`, `upgradable` or `upgradable:svn=N`.
impl FromStr for SnpPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(':');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("strict"), None, None) => Ok(SnpPolicy::Strict),
            (Some("upgradable"), None, None) => Ok(SnpPolicy::Upgradable { min_guest_svn: 0 }),
            (Some("upgradable"), Some(svn), None) => {
                let n = svn
                    .strip_prefix("svn=")
                    .ok_or_else(|| format!("unknown SNP policy option {svn:?} (expected svn=N)"))?;
                let min_guest_svn = n
                    .parse()
                    .map_err(|_| format!("guest SVN {n:?} is not a 32-bit unsigned number"))?;
                Ok(SnpPolicy::Upgradable { min_guest_svn })
            }
            _ => Err(format!(
                "unknown SNP policy {s:?} (expected strict, upgradable or upgradable:svn=N)"
            )),
        }
    }
}

/// The parameters an SNP keyslot records: the whole derived-key request.
///
/// Encoding (version 1, 32 bytes, little-endian):
///
/// | Offset | Size | Field                | Rule                                              |
/// |-------:|-----:|----------------------|---------------------------------------------------|
/// | 0      | 1    | version              | 1                                                 |
/// | 1      | 1    | policy               | 1 = strict, 2 = upgradable                        |
/// | 2      | 2    | reserved             | 0                                                 |
/// | 4      | 4    | vmpl                 | 0 (the VMPL mixed into the key)                   |
/// | 8      | 8    | guest_field_select   | exactly the policy's mask                         |
/// | 16     | 4    | guest_svn            | 0 for strict; the minimum guest SVN for upgradable |
/// | 20     | 4    | reserved             | 0                                                 |
/// | 24     | 8    | tcb_version          | 0 (TCB not selected by either policy)             |
///
/// Decoding is strict: a host that edits a binding to select fewer fields (a key other guests on the
/// same chip could derive) gets it refused, not honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnpBinding {
    pub policy: SnpPolicy,
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
        match self.policy {
            SnpPolicy::Strict => 0,
            SnpPolicy::Upgradable { min_guest_svn } => min_guest_svn,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; BINDING_LEN];
        out[0] = BINDING_VERSION;
        out[1] = self.policy.code();
        out[4..8].copy_from_slice(&self.vmpl.to_le_bytes());
        out[8..16].copy_from_slice(&self.policy.fields().to_le_bytes());
        out[16..20].copy_from_slice(&self.guest_svn().to_le_bytes());
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
        if buf[0] != BINDING_VERSION {
            return Err(binding_error(format!(
                "unknown SNP binding version {}",
                buf[0]
            )));
        }
        let u32_at = |at: usize| u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
        if buf[2..4] != [0, 0] || buf[20..24] != [0; 4] {
            return Err(binding_error(
                "reserved bytes of the SNP binding are not zero",
            ));
        }
        let guest_svn = u32_at(16);
        let policy = match buf[1] {
            1 if guest_svn == 0 => SnpPolicy::Strict,
            1 => return Err(binding_error("a strict SNP binding records no guest SVN")),
            2 => SnpPolicy::Upgradable {
                min_guest_svn: guest_svn,
            },
            other => return Err(binding_error(format!("unknown SNP policy code {other}"))),
        };
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
        if tcb_version != 0 {
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

    /// The firmware request this binding stands for.
    pub fn request(&self) -> DerivedKeyRequest {
        DerivedKeyRequest {
            root_key_select: ROOT_KEY_VCEK,
            guest_field_select: self.policy.fields(),
            vmpl: self.vmpl,
            guest_svn: self.guest_svn(),
            tcb_version: self.tcb_version,
        }
    }
}

/// `struct snp_derived_key_req` of include/uapi/linux/sev-guest.h (= `MSG_KEY_REQ` of the firmware ABI).
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
    #[error(
        "SNP_GET_DERIVED_KEY failed: {errno}; firmware error {fw_error:#x}, VMM error {vmm_error:#x}"
    )]
    Ioctl {
        errno: nix::errno::Errno,
        fw_error: u32,
        vmm_error: u32,
    },
    /// The firmware answered with a non-zero status (0x16: invalid parameters).
    #[error("the firmware refused the key request with status {0:#x}")]
    Status(u32),
}

/// The one hardware call the source needs, behind a trait so host tests can run without SNP.
pub trait SnpDevice: Send + Sync {
    /// Sends `request` (a `struct snp_derived_key_req`) and returns the 64-byte response.
    fn derived_key(
        &self,
        request: &[u8; REQUEST_LEN],
    ) -> Result<Zeroizing<[u8; RESPONSE_LEN]>, SnpDeviceError>;
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
}

impl SnpDevice for SevGuestDevice {
    fn derived_key(
        &self,
        request: &[u8; REQUEST_LEN],
    ) -> Result<Zeroizing<[u8; RESPONSE_LEN]>, SnpDeviceError> {
        let file = Self::open_file(&self.path)?;
        let req = *request;
        let mut resp = Zeroizing::new([0u8; RESPONSE_LEN]);
        let mut arg = GuestRequestIoctl {
            msg_version: MSG_VERSION,
            req_data: req.as_ptr() as u64,
            resp_data: resp.as_mut_ptr() as u64,
            exitinfo2: 0,
        };
        // SAFETY: SNP_GET_DERIVED_KEY reads one `snp_guest_request_ioctl` from `arg` and writes it back;
        // the kernel copies REQUEST_LEN bytes from `req_data` and writes RESPONSE_LEN bytes to `resp_data`.
        // `arg`, `req` and `resp` are live, correctly sized buffers for the whole call, and `file` keeps
        // the descriptor open until it returns.
        let rc = unsafe {
            nix::libc::ioctl(
                file.as_raw_fd(),
                SNP_GET_DERIVED_KEY as _,
                &mut arg as *mut GuestRequestIoctl,
            )
        };
        if rc < 0 {
            return Err(SnpDeviceError::Ioctl {
                errno: nix::errno::Errno::last(),
                fw_error: arg.exitinfo2 as u32,
                vmm_error: (arg.exitinfo2 >> 32) as u32,
            });
        }
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
        let mut resp = Zeroizing::new([0u8; RESPONSE_LEN]);
        resp[0..4].copy_from_slice(&self.status.to_le_bytes());
        if self.status == 0 {
            let hk = Hkdf::<Sha256>::new(Some(&self.launch), b"fake-vcek");
            hk.expand(request, &mut resp[RESPONSE_KEY_AT..])
                .expect("32 bytes is a valid HKDF output length");
        }
        Ok(resp)
    }
}

/// The SEV-SNP sealing source.
pub struct SnpSource {
    device: Box<dyn SnpDevice>,
    policy: SnpPolicy,
}

impl fmt::Debug for SnpSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnpSource")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl SnpSource {
    /// Opens `/dev/sev-guest`; new keyslots bind to `policy`. Slots of either policy unseal.
    pub fn open(policy: SnpPolicy) -> Result<Self, SealError> {
        let device = SevGuestDevice::open(Path::new(SEV_GUEST_DEVICE)).map_err(|e| {
            SealError::Unavailable {
                kind: SourceKind::Snp,
                reason: format!("{e} (is this an SEV-SNP guest with the sev-guest driver loaded?)"),
            }
        })?;
        Ok(Self::with_device(policy, Box::new(device)))
    }

    pub fn with_device(policy: SnpPolicy, device: Box<dyn SnpDevice>) -> Self {
        Self { device, policy }
    }

    pub fn policy(&self) -> SnpPolicy {
        self.policy
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
        self.policy.binding().encode()
    }

    fn secret(&self, binding: &[u8]) -> Result<SealingSecret, SealError> {
        let decoded = SnpBinding::decode(binding)?;
        let resp = self
            .device
            .derived_key(&decoded.request().to_bytes())
            .map_err(|e| SealError::Unavailable {
                kind: SourceKind::Snp,
                reason: e.to_string(),
            })?;
        let key = parse_response(&resp).map_err(|e| SealError::Unavailable {
            kind: SourceKind::Snp,
            reason: e.to_string(),
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
            SnpPolicy::Upgradable { min_guest_svn } => {
                format!("family ID + image ID + guest SVN >= {min_guest_svn} + guest policy")
            }
        };
        format!(
            "AMD SEV-SNP derived key (VCEK root), policy {}: new keyslots bind to the {binds} \
             (this source has not yet been run on SEV-SNP hardware)",
            self.policy
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn ioctl_number_is_iowr_s_1_of_the_32_byte_request() {
        // _IOWR('S', 0x1, struct snp_guest_request_ioctl): dir read|write (3) << 30, size 32 << 16,
        // type 'S' (0x53) << 8, nr 1.
        assert_eq!(size_of::<GuestRequestIoctl>(), 32);
        assert_eq!(SNP_GET_DERIVED_KEY, 0xC020_5301);
    }

    #[test]
    fn guest_request_struct_matches_the_uapi_layout() {
        assert_eq!(offset_of!(GuestRequestIoctl, msg_version), 0);
        assert_eq!(offset_of!(GuestRequestIoctl, req_data), 8);
        assert_eq!(offset_of!(GuestRequestIoctl, resp_data), 16);
        assert_eq!(offset_of!(GuestRequestIoctl, exitinfo2), 24);
    }

    #[test]
    fn request_encoding_is_byte_exact() {
        let req = DerivedKeyRequest {
            root_key_select: 0,
            guest_field_select: 0x17,
            vmpl: 2,
            guest_svn: 0x0102_0304,
            tcb_version: 0x1122_3344_5566_7788,
        };
        let expected: [u8; 32] = [
            0, 0, 0, 0, // root_key_select (VCEK)
            0, 0, 0, 0, // rsvd
            0x17, 0, 0, 0, 0, 0, 0, 0, // guest_field_select
            2, 0, 0, 0, // vmpl
            0x04, 0x03, 0x02, 0x01, // guest_svn
            0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // tcb_version
        ];
        assert_eq!(req.to_bytes(), expected);
    }

    #[test]
    fn field_select_bits_and_policies() {
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
        assert_eq!(
            SnpPolicy::Upgradable { min_guest_svn: 0 }.fields(),
            0b01_0111
        );
        let strict = SnpPolicy::Strict.binding().request();
        assert_eq!(
            (
                strict.root_key_select,
                strict.vmpl,
                strict.guest_svn,
                strict.tcb_version
            ),
            (0, 0, 0, 0)
        );
        let up = SnpPolicy::Upgradable { min_guest_svn: 7 }
            .binding()
            .request();
        assert_eq!((up.guest_field_select, up.guest_svn), (0x17, 7));
    }

    #[test]
    fn binding_encoding_is_as_documented_and_round_trips() {
        let b = SnpPolicy::Upgradable { min_guest_svn: 5 }.binding();
        let bytes = b.encode();
        let mut expected = [0u8; 32];
        expected[0] = 1;
        expected[1] = 2;
        expected[8] = 0x17;
        expected[16] = 5;
        assert_eq!(bytes, expected);
        assert!(bytes.len() <= crate::header::MAX_BINDING_LEN);
        assert_eq!(SnpBinding::decode(&bytes).unwrap(), b);
        let s = SnpPolicy::Strict.binding();
        let mut expected = [0u8; 32];
        expected[0] = 1;
        expected[1] = 1;
        expected[8] = 0x09;
        assert_eq!(s.encode(), expected);
        assert_eq!(SnpBinding::decode(&s.encode()).unwrap(), s);
    }

    #[test]
    fn binding_decode_rejects_weakened_or_unknown_bindings() {
        let good = SnpPolicy::Strict.binding().encode();
        let edit = |at: usize, v: u8| {
            let mut b = good.clone();
            b[at] = v;
            SnpBinding::decode(&b)
        };
        assert!(edit(0, 2).is_err(), "version");
        assert!(edit(1, 3).is_err(), "policy code");
        assert!(edit(2, 1).is_err(), "reserved");
        assert!(edit(4, 1).is_err(), "vmpl");
        assert!(edit(8, 0x08).is_err(), "measurement without policy");
        assert!(edit(8, 0x00).is_err(), "no fields at all");
        assert!(edit(8, 0x29).is_err(), "extra TCB bit");
        assert!(edit(16, 1).is_err(), "strict with an SVN");
        assert!(edit(21, 1).is_err(), "reserved");
        assert!(edit(24, 1).is_err(), "tcb version");
        assert!(SnpBinding::decode(&good[..31]).is_err());
        assert!(SnpBinding::decode(&[]).is_err());
        let mut upgradable = SnpPolicy::Upgradable { min_guest_svn: 1 }
            .binding()
            .encode();
        upgradable[8] = 0x13; // drop the image ID
        assert!(SnpBinding::decode(&upgradable).is_err());
    }

    #[test]
    fn policy_parses_and_prints() {
        for (text, policy) in [
            ("strict", SnpPolicy::Strict),
            ("upgradable", SnpPolicy::Upgradable { min_guest_svn: 0 }),
            (
                "upgradable:svn=12",
                SnpPolicy::Upgradable { min_guest_svn: 12 },
            ),
        ] {
            assert_eq!(text.parse::<SnpPolicy>().unwrap(), policy);
            assert_eq!(policy.to_string(), text);
        }
        for bad in [
            "",
            "vmrk",
            "strict:svn=1",
            "upgradable:svn=",
            "upgradable:svn=-1",
            "upgradable:svn=4294967296",
            "upgradable:tcb=1",
            "upgradable:svn=1:x",
        ] {
            assert!(bad.parse::<SnpPolicy>().is_err(), "{bad:?}");
        }
    }

    fn fake(launch: &[u8]) -> FakeSnpDevice {
        FakeSnpDevice {
            launch: launch.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn source_sends_the_recorded_request_and_derives_a_stable_secret() {
        let device = std::sync::Arc::new(fake(b"image-1"));
        struct Shared(std::sync::Arc<FakeSnpDevice>);
        impl SnpDevice for Shared {
            fn derived_key(
                &self,
                request: &[u8; REQUEST_LEN],
            ) -> Result<Zeroizing<[u8; RESPONSE_LEN]>, SnpDeviceError> {
                self.0.derived_key(request)
            }
        }
        let source = SnpSource::with_device(
            SnpPolicy::Upgradable { min_guest_svn: 3 },
            Box::new(Shared(device.clone())),
        );
        let binding = source.default_binding();
        let a = source.secret(&binding).unwrap().digest();
        let b = source.secret(&binding).unwrap().digest();
        assert_eq!(a, b);
        let requests = device.requests.lock().unwrap().clone();
        assert_eq!(requests.len(), 2);
        let expected = DerivedKeyRequest {
            root_key_select: 0,
            guest_field_select: 0x17,
            vmpl: 0,
            guest_svn: 3,
            tcb_version: 0,
        };
        assert_eq!(requests[0], expected.to_bytes());
        // A strict slot opens on the same node whatever the node's own policy.
        let strict = SnpPolicy::Strict.binding().encode();
        assert_ne!(source.secret(&strict).unwrap().digest(), a);
        // Bindings from elsewhere are binding errors (a slot for someone else), never a request.
        let before = device.requests.lock().unwrap().len();
        assert!(matches!(source.secret(&[]), Err(SealError::Binding { .. })));
        assert_eq!(device.requests.lock().unwrap().len(), before);
    }

    #[test]
    fn another_launch_gets_another_secret() {
        let a = SnpSource::with_device(SnpPolicy::Strict, Box::new(fake(b"image-1")));
        let b = SnpSource::with_device(SnpPolicy::Strict, Box::new(fake(b"image-2")));
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
        let source = SnpSource::with_device(SnpPolicy::Strict, Box::new(device));
        let err = source.secret(&source.default_binding()).unwrap_err();
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
        if !Path::new(SEV_GUEST_DEVICE).exists() {
            assert!(matches!(
                SnpSource::open(SnpPolicy::Strict),
                Err(SealError::Unavailable { .. })
            ));
        }
    }

    #[test]
    fn describe_says_untested_on_hardware() {
        let s = SnpSource::with_device(SnpPolicy::Strict, Box::new(fake(b"x")));
        assert!(
            s.describe()
                .contains("not yet been run on SEV-SNP hardware")
        );
    }
}
