//! TDX evidence without configfs-tsm (Linux 6.2 to 6.6, where `/dev/tdx_guest` exists but the
//! configfs-tsm report interface does not): the TD asks its TDX module for a TDREPORT through the
//! `TDX_CMD_GET_REPORT0` ioctl, then hands it to the host's Quote Generation Service (QGS) over vsock,
//! which returns the signed quote. That is the path Intel's `libtdx_attest` takes on those kernels.
//!
//! A TDREPORT is MAC'd with a key only the platform knows, so it proves nothing to a remote party;
//! the quote does. The QGS is untrusted (it runs on the host): it cannot forge a quote, but it can
//! answer anything, so its reply is parsed as hostile bytes and the quote must carry the report data
//! asked for.
//!
//! QGS wire protocol (message library version 1.0), all integers little-endian, each message on the
//! stream preceded by its length as a 4-byte **big-endian** integer:
//! - header (16 bytes): major version u16 (1), minor version u16, type u32 (0 = GET_QUOTE_REQ,
//!   1 = GET_QUOTE_RESP), size u32 (the whole message, header included), error code u32 (0 = success,
//!   response only);
//! - GET_QUOTE_REQ body: report size u32 (1024), id-list size u32 (0: the QGS picks the key), the
//!   TDREPORT;
//! - GET_QUOTE_RESP body: selected-id size u32, quote size u32, the selected id, the quote.
//!
//! The QGS listens on the host (vsock CID 2) at the port of `port=` in `/etc/tdx-attest.conf`
//! (QGS's default 4050 when that file names none).
//!
//! NEVER RUN ON TDX HARDWARE: tested against an in-memory TDX device and a QGS test double that
//! speaks the protocol above over a real socket.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::{AttestError, Evidence, EvidenceKind, EvidenceSource, REPORT_DATA_LEN, ReportData};

/// The TDX guest device (the probe's constant: one name for it in the tree).
pub use crate::sealing::probe::TDX_GUEST as TDX_GUEST_DEVICE;
/// Intel's attestation library configuration: names the QGS vsock port.
pub const TDX_ATTEST_CONF: &str = "/etc/tdx-attest.conf";
/// The QGS's default vsock port.
pub const QGS_DEFAULT_PORT: u32 = 4050;
/// The host's vsock CID (`VMADDR_CID_HOST`).
const VSOCK_CID_HOST: u32 = 2;

/// TDREPORT_STRUCT: REPORTMACSTRUCT (256 bytes), TEE_TCB_INFO (239), reserved (17), TDINFO (512).
pub const TDREPORT_LEN: usize = 1024;
/// REPORTMACSTRUCT: REPORTTYPE (4: type, subtype, version, reserved), reserved (12), CPUSVN (16),
/// TEE_TCB_INFO_HASH (48), TEE_INFO_HASH (48), REPORTDATA (64), reserved (32), MAC (32).
const TDREPORT_REPORT_DATA: std::ops::Range<usize> = 128..192;
/// REPORTTYPE.TYPE of a TDX report.
const TDREPORT_TYPE_TDX: u8 = 0x81;

const QGS_MAJOR_VERSION: u16 = 1;
const QGS_GET_QUOTE_REQ: u32 = 0;
const QGS_GET_QUOTE_RESP: u32 = 1;
const QGS_HEADER_LEN: usize = 16;
/// Header plus the two sizes of a GET_QUOTE_RESP.
const QGS_RESPONSE_FIXED_LEN: usize = QGS_HEADER_LEN + 8;
/// The largest reply read from the QGS: a quote with its PCK certificate chain is 5-8 KiB.
pub const QGS_MAX_REPLY: usize = 64 * 1024;
/// A TDX quote's header, before the TD report body (version 4) or its 6-byte descriptor (version 5).
const QUOTE_HEADER_LEN: usize = 48;
/// REPORTDATA's offset in the TD report body of a quote.
const QUOTE_BODY_REPORT_DATA_AT: usize = 520;
/// How long the QGS may take to answer (quote generation takes milliseconds; the host may be slow).
const QGS_TIMEOUT: Duration = Duration::from_secs(30);

/// `struct tdx_report_req` of the kernel's uapi: report data in, TDREPORT out.
#[repr(C)]
struct TdxReportReq {
    reportdata: [u8; REPORT_DATA_LEN],
    tdreport: [u8; TDREPORT_LEN],
}

/// `TDX_CMD_GET_REPORT0 = _IOWR('T', 1, struct tdx_report_req)`.
pub const TDX_CMD_GET_REPORT0: nix::sys::ioctl::ioctl_num_type =
    nix::request_code_readwrite!(b'T', 1, std::mem::size_of::<TdxReportReq>());

/// The TDX guest driver's report call, behind a trait so host tests run without TDX.
pub trait TdxDevice: Send + Sync {
    /// The TDREPORT binding `report_data`.
    fn tdreport(&self, report_data: &ReportData) -> Result<Vec<u8>, AttestError>;
}

/// The real device: `/dev/tdx_guest`.
#[derive(Debug, Clone)]
pub struct TdxGuestDevice {
    path: PathBuf,
}

impl TdxGuestDevice {
    /// Checks that the device node opens read-write (it is re-opened for each report).
    pub fn open(path: &Path) -> Result<Self, AttestError> {
        Self::open_file(path)?;
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    fn open_file(path: &Path) -> Result<std::fs::File, AttestError> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| unavailable(format!("opening {}: {e}", path.display())))
    }
}

impl TdxDevice for TdxGuestDevice {
    fn tdreport(&self, report_data: &ReportData) -> Result<Vec<u8>, AttestError> {
        let file = Self::open_file(&self.path)?;
        let mut req = Box::new(TdxReportReq {
            reportdata: *report_data,
            tdreport: [0; TDREPORT_LEN],
        });
        // SAFETY: TDX_CMD_GET_REPORT0 reads the 64 report-data bytes of one `struct tdx_report_req`
        // at `arg` and writes the 1024-byte TDREPORT into the same struct; `req` is a live, exactly
        // sized `#[repr(C)]` copy of that uapi struct for the whole call, and `file` keeps the
        // descriptor open until it returns.
        let rc = unsafe {
            nix::libc::ioctl(
                file.as_raw_fd(),
                TDX_CMD_GET_REPORT0 as _,
                &mut *req as *mut TdxReportReq,
            )
        };
        if rc < 0 {
            return Err(unavailable(format!(
                "TDX_CMD_GET_REPORT0 on {}: {}",
                self.path.display(),
                nix::errno::Errno::last()
            )));
        }
        Ok(req.tdreport.to_vec())
    }
}

/// A byte stream to the QGS.
pub trait QgsStream: Read + Write + Send {}
impl<T: Read + Write + Send> QgsStream for T {}

/// How to reach the QGS: one real implementation (vsock to the host), tests bring their own socket.
pub trait QgsConnector: Send + Sync {
    /// Where the QGS is, for error messages.
    fn describe(&self) -> String;
    fn connect(&self) -> std::io::Result<Box<dyn QgsStream>>;
}

/// The host's QGS over vsock.
#[derive(Debug, Clone)]
pub struct VsockQgs {
    pub cid: u32,
    pub port: u32,
}

impl VsockQgs {
    /// The host QGS at the port `/etc/tdx-attest.conf` names (the default port without one).
    pub fn from_conf(conf: &Path) -> Self {
        let port = std::fs::read_to_string(conf)
            .ok()
            .and_then(|text| conf_port(&text))
            .unwrap_or(QGS_DEFAULT_PORT);
        Self {
            cid: VSOCK_CID_HOST,
            port,
        }
    }
}

/// The `port=N` line of a tdx-attest.conf (`#` starts a comment).
fn conf_port(text: &str) -> Option<u32> {
    text.lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter_map(|line| line.strip_prefix("port"))
        .filter_map(|rest| rest.trim_start().strip_prefix('='))
        .find_map(|value| value.trim().parse().ok())
}

impl QgsConnector for VsockQgs {
    fn describe(&self) -> String {
        format!("the QGS at vsock {}:{}", self.cid, self.port)
    }

    fn connect(&self) -> std::io::Result<Box<dyn QgsStream>> {
        use nix::sys::socket::{
            AddressFamily, SockFlag, SockType, VsockAddr, connect, setsockopt, socket, sockopt,
        };
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let timeout = nix::sys::time::TimeVal::new(QGS_TIMEOUT.as_secs() as _, 0);
        setsockopt(&fd, sockopt::ReceiveTimeout, &timeout)?;
        setsockopt(&fd, sockopt::SendTimeout, &timeout)?;
        connect(fd.as_raw_fd(), &VsockAddr::new(self.cid, self.port))?;
        // read(2) and write(2) on a connected stream socket: a File is the plain std wrapper.
        Ok(Box::new(std::fs::File::from(fd)))
    }
}

/// Why a QGS reply was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QgsReplyError {
    #[error("a reply of {0} bytes is shorter than a GET_QUOTE_RESP")]
    Short(usize),
    #[error("message library version {0}, not {QGS_MAJOR_VERSION}")]
    Version(u16),
    #[error("message type {0}, not GET_QUOTE_RESP")]
    Type(u32),
    #[error("the header's size {header} is not the {actual} bytes received")]
    Size { header: u32, actual: usize },
    #[error("the QGS answered error code {0:#x}")]
    Refused(u32),
    #[error(
        "the selected id ({id}) and quote ({quote}) sizes do not fill the {body} bytes after the sizes"
    )]
    Sizes { id: u32, quote: u32, body: usize },
    #[error("the reply holds no quote")]
    Empty,
}

/// A QGS message: the 16-byte header (version 1.0, `kind`, the whole size, `error_code`), the two
/// sizes of the body, then `first` and `second`.
fn qgs_message(kind: u32, error_code: u32, first: &[u8], second: &[u8]) -> Vec<u8> {
    let size = (QGS_HEADER_LEN + 8 + first.len() + second.len()) as u32;
    let mut msg = Vec::with_capacity(size as usize);
    msg.extend_from_slice(&QGS_MAJOR_VERSION.to_le_bytes());
    msg.extend_from_slice(&0u16.to_le_bytes());
    msg.extend_from_slice(&kind.to_le_bytes());
    msg.extend_from_slice(&size.to_le_bytes());
    msg.extend_from_slice(&error_code.to_le_bytes());
    msg.extend_from_slice(&(first.len() as u32).to_le_bytes());
    msg.extend_from_slice(&(second.len() as u32).to_le_bytes());
    msg.extend_from_slice(first);
    msg.extend_from_slice(second);
    msg
}

/// The GET_QUOTE_REQ message for `tdreport` (without the stream's length prefix): the report, no
/// id list.
pub fn quote_request(tdreport: &[u8]) -> Vec<u8> {
    qgs_message(QGS_GET_QUOTE_REQ, 0, tdreport, &[])
}

/// The quote in a GET_QUOTE_RESP message (without the stream's length prefix). Every size field is
/// checked against the bytes received: the QGS is the untrusted host.
pub fn parse_quote_response(msg: &[u8]) -> Result<&[u8], QgsReplyError> {
    if msg.len() < QGS_RESPONSE_FIXED_LEN {
        return Err(QgsReplyError::Short(msg.len()));
    }
    let u16_at = |at: usize| u16::from_le_bytes([msg[at], msg[at + 1]]);
    let u32_at = |at: usize| u32::from_le_bytes(msg[at..at + 4].try_into().expect("4 bytes"));
    let version = u16_at(0);
    if version != QGS_MAJOR_VERSION {
        return Err(QgsReplyError::Version(version));
    }
    let kind = u32_at(4);
    if kind != QGS_GET_QUOTE_RESP {
        return Err(QgsReplyError::Type(kind));
    }
    let header = u32_at(8);
    if header as usize != msg.len() {
        return Err(QgsReplyError::Size {
            header,
            actual: msg.len(),
        });
    }
    let code = u32_at(12);
    if code != 0 {
        return Err(QgsReplyError::Refused(code));
    }
    let (id, quote) = (u32_at(16), u32_at(20));
    let body = &msg[QGS_RESPONSE_FIXED_LEN..];
    if id as u64 + quote as u64 != body.len() as u64 {
        return Err(QgsReplyError::Sizes {
            id,
            quote,
            body: body.len(),
        });
    }
    let quote = &body[id as usize..];
    if quote.is_empty() {
        return Err(QgsReplyError::Empty);
    }
    Ok(quote)
}

/// One GET_QUOTE exchange on `stream`: the length-prefixed request, then the length-prefixed reply
/// (at most [`QGS_MAX_REPLY`] bytes).
pub fn exchange(stream: &mut dyn QgsStream, tdreport: &[u8]) -> std::io::Result<Vec<u8>> {
    let request = quote_request(tdreport);
    let mut framed = (request.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(&request);
    stream.write_all(&framed)?;
    stream.flush()?;
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > QGS_MAX_REPLY {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a reply of {len} bytes (more than {QGS_MAX_REPLY})"),
        ));
    }
    let mut reply = vec![0u8; len];
    stream.read_exact(&mut reply)?;
    Ok(reply)
}

/// Where a TDX quote carries REPORTDATA: after the 48-byte header, the TD report body (version 4),
/// or a 6-byte body descriptor (type u16, size u32) and then the body (version 5); REPORTDATA is at
/// offset 520 of the body in both.
pub fn quote_report_data(quote: &[u8]) -> Option<&[u8]> {
    let version = u16::from_le_bytes(quote.get(0..2)?.try_into().ok()?);
    let body = match version {
        4 => QUOTE_HEADER_LEN,
        5 => QUOTE_HEADER_LEN + 6,
        _ => return None,
    };
    let at = body + QUOTE_BODY_REPORT_DATA_AT;
    quote.get(at..at + REPORT_DATA_LEN)
}

/// TDX evidence as Trustee's tdx verifier takes it (`TdxEvidence`): `{"cc_eventlog": null,
/// "quote": base64(quote)}`, after checking the quote carries `report_data`. `from` names the source
/// for the error.
pub fn tdx_evidence(
    quote: &[u8],
    report_data: &ReportData,
    from: &str,
) -> Result<Evidence, AttestError> {
    if quote_report_data(quote) != Some(&report_data[..]) {
        return Err(AttestError::Malformed {
            kind: EvidenceKind::Tdx,
            reason: format!(
                "the {} bytes from {from} are not a version 4 or 5 TDX quote carrying the report data asked for",
                quote.len()
            ),
        });
    }
    let body = serde_json::json!({ "cc_eventlog": null, "quote": STANDARD.encode(quote) });
    Ok(Evidence {
        kind: EvidenceKind::Tdx,
        report_data: *report_data,
        body: serde_json::to_vec(&body).expect("JSON of strings"),
    })
}

fn unavailable(reason: String) -> AttestError {
    AttestError::Unavailable {
        kind: EvidenceKind::Tdx,
        reason,
    }
}

/// TDX evidence from `/dev/tdx_guest` and the host's QGS (the fallback without configfs-tsm).
pub struct QgsEvidence {
    device: Box<dyn TdxDevice>,
    qgs: Box<dyn QgsConnector>,
}

impl QgsEvidence {
    /// The node's TDX guest device and the QGS `/etc/tdx-attest.conf` names.
    pub fn open() -> Result<Self, AttestError> {
        let device = TdxGuestDevice::open(Path::new(TDX_GUEST_DEVICE))?;
        Ok(Self::with(
            Box::new(device),
            Box::new(VsockQgs::from_conf(Path::new(TDX_ATTEST_CONF))),
        ))
    }

    pub fn with(device: Box<dyn TdxDevice>, qgs: Box<dyn QgsConnector>) -> Self {
        Self { device, qgs }
    }

    fn quote(&self, tdreport: &[u8]) -> Result<Vec<u8>, AttestError> {
        let at = self.qgs.describe();
        let reply = self
            .qgs
            .connect()
            .and_then(|mut stream| exchange(stream.as_mut(), tdreport))
            .map_err(|e| unavailable(format!("{at}: {e}")))?;
        parse_quote_response(&reply)
            .map(<[u8]>::to_vec)
            .map_err(|e| AttestError::Malformed {
                kind: EvidenceKind::Tdx,
                reason: format!("{at}: {e}"),
            })
    }
}

impl EvidenceSource for QgsEvidence {
    fn kind(&self) -> EvidenceKind {
        EvidenceKind::Tdx
    }

    fn evidence(&self, report_data: &ReportData) -> Result<Evidence, AttestError> {
        let tdreport = self.device.tdreport(report_data)?;
        let bound = tdreport.len() == TDREPORT_LEN
            && tdreport[0] == TDREPORT_TYPE_TDX
            && tdreport[TDREPORT_REPORT_DATA] == report_data[..];
        if !bound {
            return Err(AttestError::Malformed {
                kind: EvidenceKind::Tdx,
                reason: "the TDREPORT is not a TDX report carrying the report data asked for"
                    .into(),
            });
        }
        let quote = self.quote(&tdreport)?;
        tdx_evidence(&quote, report_data, &self.qgs.describe())
    }
}

/// An in-memory TDX device: a TDREPORT of the TDX type carrying the report data, the rest a fixed
/// pattern. Never what a user runs.
pub struct MemoryTdxDevice;

impl TdxDevice for MemoryTdxDevice {
    fn tdreport(&self, report_data: &ReportData) -> Result<Vec<u8>, AttestError> {
        let mut report = vec![0x3c; TDREPORT_LEN];
        report[0..4].copy_from_slice(&[TDREPORT_TYPE_TDX, 0, 0, 0]);
        report[TDREPORT_REPORT_DATA].copy_from_slice(report_data);
        Ok(report)
    }
}

/// What a QGS test double answers to one GET_QUOTE_REQ: a version-4 quote carrying the TDREPORT's
/// report data (unsigned: the bytes where a real quote has its signature are a pattern). Public for
/// the test double servers (tests/); never what a user runs.
pub fn test_quote_for(tdreport: &[u8]) -> Vec<u8> {
    let mut data = [0u8; REPORT_DATA_LEN];
    if let Some(bound) = tdreport.get(TDREPORT_REPORT_DATA) {
        data.copy_from_slice(bound);
    }
    test_quote(&data)
}

/// An unsigned version-4 quote (TEE type TDX) carrying `report_data`, the rest a pattern: what the
/// in-memory configfs-tsm and the QGS test double hand out. Never what a user runs.
pub fn test_quote(report_data: &ReportData) -> Vec<u8> {
    let mut quote = vec![0xA5u8; 5006];
    quote[0..2].copy_from_slice(&4u16.to_le_bytes());
    quote[4..8].copy_from_slice(&0x81u32.to_le_bytes());
    let at = QUOTE_HEADER_LEN + QUOTE_BODY_REPORT_DATA_AT;
    quote[at..at + REPORT_DATA_LEN].copy_from_slice(report_data);
    quote
}

/// A GET_QUOTE_RESP carrying `quote` (and a selected id of `id` bytes), without the length prefix.
pub fn test_quote_response(quote: &[u8], id: &[u8], error_code: u32) -> Vec<u8> {
    qgs_message(QGS_GET_QUOTE_RESP, error_code, id, quote)
}

#[cfg(test)]
mod tests;
