//! SEV-SNP and TDX evidence through configfs-tsm (Linux >= 6.7): create
//! `/sys/kernel/config/tsm/report/<name>/`, write the 64 report-data bytes to `inblob`, read `outblob`
//! (the SNP attestation report, or the TDX quote), check `provider` (`sev_guest` / `tdx_guest`) and
//! that `generation` did not move while reading (another writer on the same entry), remove the entry.
//!
//! Bodies, as Trustee's verifiers take them:
//! - TDX: `{"cc_eventlog": null, "quote": base64(outblob)}` (the tdx verifier's `TdxEvidence`);
//! - SNP: `{"attestation_report": <report>, "cert_chain": <table or null>}` (the snp verifier's
//!   `SnpEvidence`; [`super::snp::SnpEvidenceBody`]): the report in the `sev` crate's serde form, and
//!   the certificate table the host attached to the extended report (configfs-tsm `auxblob`), or null
//!   when there is none (docs/keys.md, "SEV-SNP evidence").
//!
//! Without configfs-tsm, SNP evidence comes from `/dev/sev-guest` ([`SevGuestEvidence`]) and TDX
//! evidence from `/dev/tdx_guest` and the host's quoting service ([`super::tdx::QgsEvidence`]).
//!
//! NEVER RUN ON SNP OR TDX HARDWARE: tested only against the in-memory [`MemoryTsm`] and a fake
//! sev-guest device.

use std::path::PathBuf;

use super::snp::{REPORT_DATA_RANGE, REPORT_LEN, SnpEvidenceBody};
use super::{AttestError, Evidence, EvidenceKind, EvidenceSource, ReportData};

/// Where configfs-tsm lives on a node.
pub const TSM_REPORT_DIR: &str = "/sys/kernel/config/tsm/report";

/// The configfs-tsm report interface: one real implementation over a directory, one in memory.
pub trait TsmFs: Send + Sync {
    fn create(&self, entry: &str) -> std::io::Result<()>;
    fn write(&self, entry: &str, attr: &str, bytes: &[u8]) -> std::io::Result<()>;
    fn read(&self, entry: &str, attr: &str) -> std::io::Result<Vec<u8>>;
    fn remove(&self, entry: &str) -> std::io::Result<()>;
}

/// configfs-tsm under a root directory ([`TSM_REPORT_DIR`] on a node).
#[derive(Debug, Clone)]
pub struct ConfigfsTsm {
    pub root: PathBuf,
}

impl TsmFs for ConfigfsTsm {
    fn create(&self, entry: &str) -> std::io::Result<()> {
        std::fs::create_dir(self.root.join(entry))
    }
    fn write(&self, entry: &str, attr: &str, bytes: &[u8]) -> std::io::Result<()> {
        std::fs::write(self.root.join(entry).join(attr), bytes)
    }
    fn read(&self, entry: &str, attr: &str) -> std::io::Result<Vec<u8>> {
        std::fs::read(self.root.join(entry).join(attr))
    }
    fn remove(&self, entry: &str) -> std::io::Result<()> {
        std::fs::remove_dir(self.root.join(entry))
    }
}

/// Evidence of `kind` (Snp or Tdx) through configfs-tsm.
pub struct TsmEvidence {
    kind: EvidenceKind,
    fs: Box<dyn TsmFs>,
}

impl TsmEvidence {
    /// The node's configfs-tsm, if present.
    pub fn open(kind: EvidenceKind) -> Result<Self, AttestError> {
        let root = PathBuf::from(TSM_REPORT_DIR);
        if !root.is_dir() {
            return Err(AttestError::Unavailable {
                kind,
                reason: format!("{TSM_REPORT_DIR} is absent (configfs-tsm needs Linux >= 6.7)"),
            });
        }
        Ok(Self::with_fs(kind, Box::new(ConfigfsTsm { root })))
    }

    pub fn with_fs(kind: EvidenceKind, fs: Box<dyn TsmFs>) -> Self {
        Self { kind, fs }
    }

    fn provider(&self) -> &'static str {
        match self.kind {
            EvidenceKind::Tdx => "tdx_guest",
            _ => "sev_guest",
        }
    }

    /// The report (`outblob`) and, for SNP, the host's certificate table (`auxblob`; `None` when the
    /// attribute is absent or empty).
    fn outblob(&self, report_data: &ReportData) -> Result<(Vec<u8>, Option<Vec<u8>>), AttestError> {
        let kind = self.kind;
        let io = |what: &str, e: std::io::Error| AttestError::Unavailable {
            kind,
            reason: format!("configfs-tsm {what}: {e}"),
        };
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|e| AttestError::Unavailable {
            kind,
            reason: e.to_string(),
        })?;
        let entry = format!("sealcsi-{}", hex::encode(id));
        self.fs.create(&entry).map_err(|e| io("mkdir", e))?;
        let result = (|| {
            let provider = self
                .fs
                .read(&entry, "provider")
                .map_err(|e| io("provider", e))?;
            let provider = String::from_utf8_lossy(&provider).trim().to_owned();
            if provider != self.provider() {
                return Err(AttestError::Unavailable {
                    kind,
                    reason: format!(
                        "configfs-tsm provider is {provider:?}, not {}",
                        self.provider()
                    ),
                });
            }
            self.fs
                .write(&entry, "inblob", report_data)
                .map_err(|e| io("inblob", e))?;
            let before = self
                .fs
                .read(&entry, "generation")
                .map_err(|e| io("generation", e))?;
            let out = self
                .fs
                .read(&entry, "outblob")
                .map_err(|e| io("outblob", e))?;
            let aux = match self.kind {
                EvidenceKind::Snp => match self.fs.read(&entry, "auxblob") {
                    Ok(aux) if aux.is_empty() => None,
                    Ok(aux) => Some(aux),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => return Err(io("auxblob", e)),
                },
                _ => None,
            };
            let after = self
                .fs
                .read(&entry, "generation")
                .map_err(|e| io("generation", e))?;
            if before != after {
                return Err(AttestError::Malformed {
                    kind,
                    reason: "the report entry changed while it was read".into(),
                });
            }
            Ok((out, aux))
        })();
        let _ = self.fs.remove(&entry);
        result
    }
}

/// SNP evidence through `/dev/sev-guest` (the fallback without configfs-tsm), with the SNP_GET_REPORT
/// wrapper of `sealing::snp` ([`SnpDevice::report`](crate::sealing::snp::SnpDevice::report)). The
/// request is `struct snp_report_req`: user_data = the report data, VMPL 0; the response
/// (`MSG_REPORT_RSP`) is status (u32), report size (u32), 24 reserved bytes, then the report.
pub struct SevGuestEvidence {
    device: Box<dyn crate::sealing::snp::SnpDevice>,
}

impl SevGuestEvidence {
    pub fn open() -> Result<Self, AttestError> {
        let path = std::path::Path::new(crate::sealing::SEV_GUEST_DEVICE);
        let device = crate::sealing::snp::SevGuestDevice::open(path).map_err(|e| {
            AttestError::Unavailable {
                kind: EvidenceKind::Snp,
                reason: e.to_string(),
            }
        })?;
        Ok(Self::with_device(Box::new(device)))
    }

    pub fn with_device(device: Box<dyn crate::sealing::snp::SnpDevice>) -> Self {
        Self { device }
    }
}

/// Where the report starts in a `MSG_REPORT_RSP`, and its size.
const SNP_RESPONSE_REPORT_AT: usize = 0x20;
const SNP_REPORT_LEN: usize = REPORT_LEN;

impl EvidenceSource for SevGuestEvidence {
    fn kind(&self) -> EvidenceKind {
        EvidenceKind::Snp
    }

    fn evidence(&self, report_data: &ReportData) -> Result<Evidence, AttestError> {
        let malformed = |reason: String| AttestError::Malformed {
            kind: EvidenceKind::Snp,
            reason,
        };
        let mut request = crate::sealing::snp::report_request();
        request[..report_data.len()].copy_from_slice(report_data);
        let resp = self
            .device
            .report(&request)
            .map_err(|e| AttestError::Unavailable {
                kind: EvidenceKind::Snp,
                reason: e.to_string(),
            })?;
        let u32_at = |at: usize| {
            resp.get(at..at + 4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        };
        match u32_at(0) {
            Some(0) => {}
            Some(status) => return Err(malformed(format!("firmware status {status:#x}"))),
            None => return Err(malformed(format!("response of {} bytes", resp.len()))),
        }
        let size = u32_at(4).unwrap_or(0) as usize;
        let report = resp
            .get(SNP_RESPONSE_REPORT_AT..SNP_RESPONSE_REPORT_AT + size)
            .filter(|_| size >= SNP_REPORT_LEN)
            .ok_or_else(|| malformed(format!("report size {size}")))?;
        snp_evidence(&report[..SNP_REPORT_LEN], None, report_data)
    }
}

/// The SNP body of a firmware report and the host's certificate table, if any.
fn snp_evidence(
    report: &[u8],
    cert_table: Option<&[u8]>,
    report_data: &ReportData,
) -> Result<Evidence, AttestError> {
    let malformed = |reason: String| AttestError::Malformed {
        kind: EvidenceKind::Snp,
        reason,
    };
    if report.get(SNP_REPORT_DATA) != Some(&report_data[..]) {
        return Err(malformed(
            "the report does not carry the report data asked for".into(),
        ));
    }
    let body = SnpEvidenceBody::from_report(report, cert_table).map_err(malformed)?;
    Ok(Evidence {
        kind: EvidenceKind::Snp,
        report_data: *report_data,
        body: body.to_json(),
    })
}

/// The SNP report's report-data field: bytes 0x50..0x90.
const SNP_REPORT_DATA: std::ops::Range<usize> = REPORT_DATA_RANGE;

impl EvidenceSource for TsmEvidence {
    fn kind(&self) -> EvidenceKind {
        self.kind
    }

    fn evidence(&self, report_data: &ReportData) -> Result<Evidence, AttestError> {
        let (out, aux) = self.outblob(report_data)?;
        match self.kind {
            EvidenceKind::Tdx => super::tdx::tdx_evidence(&out, report_data, "configfs-tsm"),
            _ => snp_evidence(&out, aux.as_deref(), report_data),
        }
    }
}

/// An in-memory configfs-tsm that answers like the kernel: an entry has `provider`, `generation`
/// (bumped by each `inblob` write), an `outblob` that embeds the last inblob where the report format
/// puts it (for SNP an unsigned version-3 Milan report, zero elsewhere), and for SNP an `auxblob` (the
/// certificate table given to [`MemoryTsm::with_auxblob`]; absent otherwise).
pub struct MemoryTsm {
    provider: String,
    kind: EvidenceKind,
    auxblob: Option<Vec<u8>>,
    entries: std::sync::Mutex<std::collections::HashMap<String, (u64, Vec<u8>)>>,
}

impl MemoryTsm {
    pub fn new(kind: EvidenceKind, provider: &str) -> Self {
        Self {
            provider: provider.to_owned(),
            kind,
            auxblob: None,
            entries: Default::default(),
        }
    }

    /// The same, with this `auxblob` (an SNP certificate table).
    pub fn with_auxblob(mut self, auxblob: Vec<u8>) -> Self {
        self.auxblob = Some(auxblob);
        self
    }
}

impl TsmFs for MemoryTsm {
    fn create(&self, entry: &str) -> std::io::Result<()> {
        let mut entries = self.entries.lock().expect("not poisoned");
        if entries.contains_key(entry) {
            return Err(std::io::ErrorKind::AlreadyExists.into());
        }
        entries.insert(entry.to_owned(), (0, Vec::new()));
        Ok(())
    }
    fn write(&self, entry: &str, attr: &str, bytes: &[u8]) -> std::io::Result<()> {
        let mut entries = self.entries.lock().expect("not poisoned");
        let e = entries.get_mut(entry).ok_or(std::io::ErrorKind::NotFound)?;
        if attr != "inblob" || bytes.len() > 64 {
            return Err(std::io::ErrorKind::InvalidInput.into());
        }
        e.0 += 1;
        e.1 = bytes.to_vec();
        Ok(())
    }
    fn read(&self, entry: &str, attr: &str) -> std::io::Result<Vec<u8>> {
        let entries = self.entries.lock().expect("not poisoned");
        let e = entries.get(entry).ok_or(std::io::ErrorKind::NotFound)?;
        match attr {
            "provider" => Ok(format!("{}\n", self.provider).into_bytes()),
            "generation" => Ok(format!("{}\n", e.0).into_bytes()),
            "auxblob" if self.kind == EvidenceKind::Snp => self
                .auxblob
                .clone()
                .ok_or(std::io::ErrorKind::NotFound.into()),
            "outblob" => {
                let mut data = [0u8; 64];
                data[..e.1.len()].copy_from_slice(&e.1);
                let (mut out, range) = match self.kind {
                    EvidenceKind::Tdx => return Ok(super::tdx::test_quote(&data)),
                    _ => {
                        let mut report = vec![0u8; SNP_REPORT_LEN];
                        report[0] = 3; // VERSION
                        report[0x188] = 0x19; // CPUID family: Zen 3/4
                        report[0x189] = 0x01; // CPUID model: Milan
                        report[0x1A0..0x1E0].fill(0x5c); // CHIP_ID
                        (report, SNP_REPORT_DATA)
                    }
                };
                out[range].copy_from_slice(&data);
                Ok(out)
            }
            _ => Err(std::io::ErrorKind::NotFound.into()),
        }
    }
    fn remove(&self, entry: &str) -> std::io::Result<()> {
        self.entries
            .lock()
            .expect("not poisoned")
            .remove(entry)
            .map(|_| ())
            .ok_or(std::io::ErrorKind::NotFound.into())
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;

    use super::*;

    #[test]
    fn tdx_evidence_is_the_quote_in_the_tdx_verifiers_shape() {
        let tsm = TsmEvidence::with_fs(
            EvidenceKind::Tdx,
            Box::new(MemoryTsm::new(EvidenceKind::Tdx, "tdx_guest")),
        );
        let data = [9u8; 64];
        let ev = tsm.evidence(&data).unwrap();
        let body: serde_json::Value = serde_json::from_slice(&ev.body).unwrap();
        let quote = STANDARD.decode(body["quote"].as_str().unwrap()).unwrap();
        assert_eq!(
            super::super::tdx::quote_report_data(&quote),
            Some(&data[..])
        );
        assert!(body["cc_eventlog"].is_null());
    }

    #[test]
    fn snp_evidence_is_the_report_and_the_cert_table_in_the_snp_verifiers_shape() {
        use crate::attest::snp::{CertTableEntry, CertType, encode_cert_table};
        let tsm = TsmEvidence::with_fs(
            EvidenceKind::Snp,
            Box::new(MemoryTsm::new(EvidenceKind::Snp, "sev_guest")),
        );
        let ev = tsm.evidence(&[3u8; 64]).unwrap();
        let body = SnpEvidenceBody::decode(&ev.body).unwrap();
        assert_eq!(body.attestation_report.report_data, [3u8; 64]);
        assert_eq!(body.attestation_report.version, 3);
        assert_eq!(body.cert_chain, None);
        let json: serde_json::Value = serde_json::from_slice(&ev.body).unwrap();
        assert!(json["cert_chain"].is_null());
        assert_eq!(json["attestation_report"]["report_data"][63], 3);
        // With the host's certificate table (auxblob): its entries, in order.
        let entries = vec![
            CertTableEntry::new(CertType::VCEK, vec![1, 2, 3]),
            CertTableEntry::new(CertType::ASK, vec![4, 5]),
        ];
        let tsm = TsmEvidence::with_fs(
            EvidenceKind::Snp,
            Box::new(
                MemoryTsm::new(EvidenceKind::Snp, "sev_guest")
                    .with_auxblob(encode_cert_table(&entries)),
            ),
        );
        let ev = tsm.evidence(&[3u8; 64]).unwrap();
        let body = SnpEvidenceBody::decode(&ev.body).unwrap();
        assert_eq!(body.cert_chain, Some(entries));
        let json: serde_json::Value = serde_json::from_slice(&ev.body).unwrap();
        assert_eq!(json["cert_chain"][0]["cert_type"], "VCEK");
        assert_eq!(json["cert_chain"][1]["data"], serde_json::json!([4, 5]));
        // A table the host garbled is an error, not silently dropped.
        let tsm = TsmEvidence::with_fs(
            EvidenceKind::Snp,
            Box::new(MemoryTsm::new(EvidenceKind::Snp, "sev_guest").with_auxblob(vec![1; 10])),
        );
        let err = tsm.evidence(&[3u8; 64]).unwrap_err();
        assert!(err.to_string().contains("certificate table"), "{err}");
    }

    /// A sev-guest device that answers SNP_GET_REPORT like the firmware: the request's user data at
    /// the report's REPORT_DATA.
    struct EchoDevice(u32);

    impl crate::sealing::snp::SnpDevice for EchoDevice {
        fn derived_key(
            &self,
            _request: &[u8; crate::sealing::snp::REQUEST_LEN],
        ) -> Result<
            zeroize::Zeroizing<[u8; crate::sealing::snp::RESPONSE_LEN]>,
            crate::sealing::snp::SnpDeviceError,
        > {
            unreachable!("not used for evidence")
        }
        fn report(
            &self,
            request: &[u8; crate::sealing::snp::REPORT_REQUEST_LEN],
        ) -> Result<Vec<u8>, crate::sealing::snp::SnpDeviceError> {
            let mut resp = vec![0u8; crate::sealing::snp::REPORT_RESPONSE_LEN];
            resp[0..4].copy_from_slice(&self.0.to_le_bytes());
            resp[4..8].copy_from_slice(&(SNP_REPORT_LEN as u32).to_le_bytes());
            let at = SNP_RESPONSE_REPORT_AT + SNP_REPORT_DATA.start;
            resp[at..at + 64].copy_from_slice(&request[..64]);
            // A version-3 Milan report (VERSION, CPUID family and model, CHIP_ID).
            resp[SNP_RESPONSE_REPORT_AT] = 3;
            resp[SNP_RESPONSE_REPORT_AT + 0x188] = 0x19;
            resp[SNP_RESPONSE_REPORT_AT + 0x189] = 0x01;
            resp[SNP_RESPONSE_REPORT_AT + 0x1A0..SNP_RESPONSE_REPORT_AT + 0x1E0].fill(0x5c);
            Ok(resp)
        }
    }

    #[test]
    fn sev_guest_evidence_binds_the_report_data() {
        let ev = SevGuestEvidence::with_device(Box::new(EchoDevice(0)))
            .evidence(&[5u8; 64])
            .unwrap();
        let body = SnpEvidenceBody::decode(&ev.body).unwrap();
        assert_eq!(body.attestation_report.report_data, [5u8; 64]);
        assert_eq!(body.cert_chain, None);
        let err = SevGuestEvidence::with_device(Box::new(EchoDevice(0x16)))
            .evidence(&[5u8; 64])
            .unwrap_err();
        assert!(err.to_string().contains("0x16"), "{err}");
    }

    #[test]
    fn another_provider_is_refused_and_the_entry_removed() {
        let fs = std::sync::Arc::new(MemoryTsm::new(EvidenceKind::Snp, "tdx_guest"));
        struct Shared(std::sync::Arc<MemoryTsm>);
        impl TsmFs for Shared {
            fn create(&self, e: &str) -> std::io::Result<()> {
                self.0.create(e)
            }
            fn write(&self, e: &str, a: &str, b: &[u8]) -> std::io::Result<()> {
                self.0.write(e, a, b)
            }
            fn read(&self, e: &str, a: &str) -> std::io::Result<Vec<u8>> {
                self.0.read(e, a)
            }
            fn remove(&self, e: &str) -> std::io::Result<()> {
                self.0.remove(e)
            }
        }
        let tsm = TsmEvidence::with_fs(EvidenceKind::Snp, Box::new(Shared(fs.clone())));
        let err = tsm.evidence(&[0u8; 64]).unwrap_err();
        assert!(err.to_string().contains("tdx_guest"), "{err}");
        assert!(fs.entries.lock().unwrap().is_empty());
    }

    #[test]
    fn the_real_interface_works_on_a_directory_tree() {
        // A plain directory is not configfs: mkdir creates no `provider` attribute, so the real
        // interface fails at that step, names it, and still removes the entry it made.
        let dir = tempfile::tempdir().unwrap();
        let tsm = TsmEvidence::with_fs(
            EvidenceKind::Tdx,
            Box::new(ConfigfsTsm {
                root: dir.path().to_owned(),
            }),
        );
        let err = tsm.evidence(&[0u8; 64]).unwrap_err();
        assert!(err.to_string().contains("provider"), "{err}");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "entry removed"
        );
    }
}
