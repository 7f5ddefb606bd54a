//! SEV-SNP evidence: the body in the form Trustee's snp verifier deserializes, the certificate table an
//! extended report comes with, and ([`verify`]) the offline verification of a report against an
//! operator's expectation and the AMD certificate chain (the source side of an attested transfer).
//!
//! The body (docs/keys.md, "SEV-SNP evidence"): the JSON object
//! `{"attestation_report": <report>, "cert_chain": <table or null>}`, where `<report>` is the serde form of
//! the `sev` crate's `AttestationReport` (one member per report field; byte fields as arrays of numbers,
//! TCB versions as `{"fmc", "bootloader", "tee", "snp", "microcode"}`) and `<table>` the serde form of a
//! list of `sev` `CertTableEntry` (`{"cert_type": "ARK" | "ASK" | "VCEK" | "VLEK" | "CRL" |
//! {"OTHER": "<guid>"}, "data": [bytes]}`), taken from the certificate table the host attaches to an
//! extended report (configfs-tsm `auxblob`).
//!
//! Everything here reads untrusted bytes (a report from a node, a table from a host) and never panics on
//! them (property tests below, and the `snp_evidence` fuzz target).
//!
//! NEVER RUN ON SNP HARDWARE: tested with a chain and reports made by the tests (tests/data/snp/).

pub mod verify;

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};
pub use sev::firmware::guest::AttestationReport;
pub use sev::firmware::host::{CertTableEntry, CertType, TcbVersion};
use sev::parser::ByteParser;

pub use verify::{RootOfTrust, SnpChain, SnpError, SnpExpectation, SnpVerified, TcbFloor};

/// Bytes of an `ATTESTATION_REPORT` (SEV-SNP firmware ABI, table 22).
pub const REPORT_LEN: usize = 1184;
/// Where the 64 bytes of REPORT_DATA sit in the report.
pub const REPORT_DATA_RANGE: std::ops::Range<usize> = 0x50..0x90;
/// One entry of the certificate table: a 16-byte GUID, a u32 offset and a u32 length (little-endian).
pub const CERT_TABLE_ENTRY_LEN: usize = 24;
/// The most entries a table may have (AMD defines five kinds; hosts may add a few of their own).
pub const MAX_CERT_TABLE_ENTRIES: usize = 16;

/// The SNP evidence body, as Trustee's snp verifier deserializes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnpEvidenceBody {
    pub attestation_report: AttestationReport,
    pub cert_chain: Option<Vec<CertTableEntry>>,
}

impl SnpEvidenceBody {
    /// The body of a report as the firmware returned it (`raw`, at least [`REPORT_LEN`] bytes; what
    /// follows is ignored) and, when the host attached one, its certificate table (`cert_table`, the
    /// extended report's table; empty means none).
    pub fn from_report(raw: &[u8], cert_table: Option<&[u8]>) -> Result<Self, String> {
        let raw = raw
            .get(..REPORT_LEN)
            .ok_or_else(|| format!("a report of {} bytes (expected {REPORT_LEN})", raw.len()))?;
        let attestation_report = AttestationReport::from_bytes(raw)
            .map_err(|e| format!("the report does not parse: {e}"))?;
        let cert_chain = match cert_table {
            Some(table) if !table.is_empty() => Some(parse_cert_table(table)?),
            _ => None,
        };
        Ok(Self {
            attestation_report,
            cert_chain,
        })
    }

    /// The body's JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a report serializes")
    }

    /// Parses a body (untrusted). Strict: the report must be one the firmware could have produced, that
    /// is, re-encoding it to the 1184 firmware bytes and decoding those again gives the same report
    /// (so no field carries a value the binary form cannot hold, and every later check and the
    /// signature check see the same fields).
    pub fn decode(json: &[u8]) -> Result<Self, String> {
        let body: Self = serde_json::from_slice(json)
            .map_err(|e| format!("the SNP evidence is not Trustee's snp form: {e}"))?;
        let bytes = body
            .attestation_report
            .to_bytes()
            .map_err(|e| format!("the report has no firmware encoding: {e}"))?;
        let again = AttestationReport::from_bytes(&bytes)
            .map_err(|e| format!("the report's firmware encoding does not parse: {e}"))?;
        if again != body.attestation_report {
            return Err("the report holds values its firmware encoding cannot carry".into());
        }
        Ok(body)
    }

    /// The report's firmware bytes.
    pub fn report_bytes(&self) -> Result<[u8; REPORT_LEN], String> {
        self.attestation_report
            .to_bytes()
            .map_err(|e| format!("the report has no firmware encoding: {e}"))
    }
}

/// Parses the certificate table of an extended report (the GHCB `SNP_EXTENDED_GUEST_REQUEST` format,
/// which configfs-tsm hands out as `auxblob`): entries of a 16-byte GUID (in the byte order of its
/// textual form), a u32 offset from the start of the table and a u32 length, ended by an entry whose GUID
/// is all zero; each certificate is the `length` bytes at `offset`. Untrusted (the host writes it):
/// bounded, never panics.
pub fn parse_cert_table(table: &[u8]) -> Result<Vec<CertTableEntry>, String> {
    let mut entries = Vec::new();
    for index in 0..=MAX_CERT_TABLE_ENTRIES {
        let at = index * CERT_TABLE_ENTRY_LEN;
        let entry = table
            .get(at..at + CERT_TABLE_ENTRY_LEN)
            .ok_or("the certificate table has no terminating entry")?;
        let guid: [u8; 16] = entry[..16].try_into().expect("16 bytes");
        if guid == [0; 16] {
            return Ok(entries);
        }
        if index == MAX_CERT_TABLE_ENTRIES {
            break;
        }
        let offset = u32::from_le_bytes(entry[16..20].try_into().expect("4 bytes")) as usize;
        let length = u32::from_le_bytes(entry[20..24].try_into().expect("4 bytes")) as usize;
        let data = offset
            .checked_add(length)
            .and_then(|end| table.get(offset..end))
            .ok_or_else(|| {
                format!(
                    "certificate table entry {index} points outside the table ({length} bytes at \
                     {offset}, table of {})",
                    table.len()
                )
            })?;
        let entry = CertTableEntry::from_guid(&uuid::Uuid::from_bytes(guid), data.to_vec())
            .map_err(|e| format!("certificate table entry {index}: {e}"))?;
        entries.push(entry);
    }
    Err(format!(
        "the certificate table has more than {MAX_CERT_TABLE_ENTRIES} entries"
    ))
}

/// The inverse of [`parse_cert_table`] (the entries in order, then the data in the same order).
pub fn encode_cert_table(entries: &[CertTableEntry]) -> Vec<u8> {
    let header = (entries.len() + 1) * CERT_TABLE_ENTRY_LEN;
    let mut table = vec![0u8; header];
    for (i, entry) in entries.iter().enumerate() {
        let guid = uuid::Uuid::try_from(entry.cert_type.clone()).expect("known GUIDs parse");
        let at = i * CERT_TABLE_ENTRY_LEN;
        table[at..at + 16].copy_from_slice(guid.as_bytes());
        let offset = table.len() as u32;
        table[at + 16..at + 20].copy_from_slice(&offset.to_le_bytes());
        table[at + 20..at + 24].copy_from_slice(&(entry.data.len() as u32).to_le_bytes());
        table.extend_from_slice(&entry.data);
    }
    table
}
