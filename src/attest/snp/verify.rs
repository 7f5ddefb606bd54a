//! Offline verification of SEV-SNP evidence (docs/keys.md, "SNP expectation"): the certificate chain
//! the operator gives as files (ARK, ASK, VCEK), the report's signature by the VCEK, the VCEK's own
//! statement of the chip and TCB it was issued for, then the report's fields against the operator's
//! [`SnpExpectation`]. The signature checks are the `sev` crate's (RustCrypto: RSA-PSS SHA-384 for the
//! certificates, ECDSA P-384 SHA-384 for the report); this module decides what is trusted and in which
//! order the checks run, and says which one failed.
//!
//! What is trusted ([`RootOfTrust`]): by default only AMD. The ARK must have the public key of one of
//! AMD's ARKs built into the `sev` crate (Milan, Genoa, Turin), of the product the report names; the ASK,
//! when no file is given, is AMD's built-in ASK of that product. [`RootOfTrust::OperatorArk`] trusts the
//! ARK file as the root instead (test chains; a private root): it proves nothing about AMD hardware.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use sev::Generation;
use sev::certs::snp::{Certificate, Verifiable, builtin};
use sev::firmware::guest::AttestationReport;
use x509_cert::der::asn1::{ObjectIdentifier, OctetString};
use x509_cert::der::{Decode, Encode};

use super::SnpEvidenceBody;
use crate::attest::ReportData;
use crate::error::{Classify, Kind};

/// Report versions this build verifies: 3 is the first to name the product (CPUID family and model),
/// 5 the newest the `sev` crate decodes.
pub const MIN_REPORT_VERSION: u32 = 3;
pub const MAX_REPORT_VERSION: u32 = 5;
/// SIG_ALGO 1: ECDSA P-384 with SHA-384.
const SIG_ALGO_ECDSA_P384_SHA384: u32 = 1;
/// Offsets in the report of POLICY (u64) and KEY_INFO (u32).
const REPORT_POLICY_AT: usize = 0x08;
const REPORT_KEY_INFO_AT: usize = 0x48;
/// The signature field of a report (the SNP ABI's ECDSA P-384 format): R and S, 72 bytes each, little
/// endian, of which a P-384 value uses the first 48; then reserved bytes to the end of the report.
const REPORT_SIGNATURE_AT: usize = 0x2A0;
const SIGNATURE_COMPONENT_LEN: usize = 72;
const P384_SCALAR_LEN: usize = 48;
/// KEY_INFO bits 4:2, SIGNING_KEY: 0 is the VCEK.
const KEY_INFO_SIGNING_KEY_SHIFT: u32 = 2;
const KEY_INFO_SIGNING_KEY_MASK: u32 = 0b111;
/// POLICY bit 19: DEBUG allowed.
pub const POLICY_DEBUG: u64 = 1 << 19;

/// AMD's VCEK extensions (the VCEK certificate specification, "VCEK Certificate Extensions").
const OID_BL_SPL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.1");
const OID_TEE_SPL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.2");
const OID_SNP_SPL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.3");
const OID_UCODE_SPL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.8");
const OID_FMC_SPL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.9");
const OID_HW_ID: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.4");

/// Errors of SNP verification: each check that can refuse has its own variant.
#[derive(Debug, thiserror::Error)]
pub enum SnpError {
    /// A chain file the operator named cannot be read or is not a certificate.
    #[error("SNP certificate {what} ({path}): {reason}")]
    ChainFile {
        what: &'static str,
        path: String,
        reason: String,
    },
    /// The chain options do not fit the root of trust.
    #[error("SNP chain: {0}")]
    ChainOptions(String),
    /// The evidence body does not parse.
    #[error("SNP evidence refused: {0}")]
    Evidence(String),
    /// The report names no product whose AMD root this build has.
    #[error("SNP evidence refused: {0}")]
    UnknownProduct(String),
    /// The ARK given is not AMD's.
    #[error(
        "SNP evidence refused: the ARK is not one of AMD's roots (Milan, Genoa, Turin) built into \
         this build; --trust-given-ark trusts a root of your own (it proves nothing about AMD \
         hardware)"
    )]
    ArkNotAmd,
    /// The ARK is AMD's root of another product than the report's.
    #[error("SNP evidence refused: the ARK is AMD's {ark} root, and the report is from a {report}")]
    ProductMismatch { ark: String, report: String },
    #[error("SNP evidence refused: the ARK is not self-signed: {0}")]
    ArkNotSelfSigned(String),
    #[error("SNP evidence refused: the ASK is not signed by the ARK: {0}")]
    AskNotSignedByArk(String),
    #[error("SNP evidence refused: the VCEK is not signed by the ASK: {0}")]
    VcekNotSignedByAsk(String),
    #[error("SNP evidence refused: the report is not signed by the VCEK: {0}")]
    ReportSignature(String),
    /// The VCEK was issued for another chip or another TCB than the report names.
    #[error("SNP evidence refused: the VCEK does not match the report: {0}")]
    VcekMismatch(String),
    #[error("SNP evidence refused: {0}")]
    ReportFormat(String),
    #[error(
        "SNP evidence refused: the report data does not bind the request (its key, nonce, volume \
         and identity): a forged or altered request"
    )]
    ReportData,
    #[error("SNP evidence refused: the launch measurement is {got}, not the expected {want}")]
    Measurement { got: String, want: String },
    #[error(
        "SNP evidence refused: the guest policy {got:#x} allows debugging (the host can read and \
         change the guest's memory); the expectation does not allow it"
    )]
    DebugPolicy { got: u64 },
    #[error("SNP evidence refused: the guest policy is {got:#x}, not the expected {want:#x}")]
    Policy { got: u64, want: u64 },
    #[error("SNP evidence refused: the reported TCB {got} is below the floor {floor}")]
    TcbBelowFloor { got: String, floor: String },
    #[error("SNP evidence refused: the report is from VMPL {got}, not the expected VMPL {want}")]
    Vmpl { got: u32, want: u32 },
}

impl Classify for SnpError {
    fn kind(&self) -> Kind {
        match self {
            SnpError::ChainFile { .. } | SnpError::ChainOptions(_) => Kind::InvalidArgument,
            _ => Kind::Refused,
        }
    }
}

/// A TCB floor: each component of the reported TCB must be at least the floor's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcbFloor {
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
    /// Turin and later: the FMC's SVN. `None`: not constrained.
    pub fmc: Option<u8>,
}

impl fmt::Display for TcbFloor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}.{}.{}",
            self.bootloader, self.tee, self.snp, self.microcode
        )?;
        if let Some(fmc) = self.fmc {
            write!(f, ".{fmc}")?;
        }
        Ok(())
    }
}

fn tcb_text(tcb: &sev::firmware::host::TcbVersion) -> String {
    TcbFloor {
        bootloader: tcb.bootloader,
        tee: tcb.tee,
        snp: tcb.snp,
        microcode: tcb.microcode,
        fmc: tcb.fmc,
    }
    .to_string()
}

/// What the operator expects of the target's report (`--expect snp:<this>`):
/// `measurement=<96 hex>,policy=<hex>,tcb-min=<bl>.<tee>.<snp>.<ucode>[.<fmc>]`, then optionally
/// `vmpl=<n>` (default 0) and `debug=allow` (a debug policy is refused otherwise), in any order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnpExpectation {
    pub measurement: [u8; 48],
    /// The exact guest POLICY the report must carry.
    pub policy: u64,
    pub tcb_min: TcbFloor,
    pub vmpl: u32,
    pub allow_debug: bool,
}

impl FromStr for SnpExpectation {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut measurement = None;
        let mut policy = None;
        let mut tcb_min = None;
        let mut vmpl = None;
        let mut allow_debug = None;
        for item in text.split(',') {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?} is not key=value"))?;
            let twice = || format!("{key} is given twice");
            match key {
                "measurement" => {
                    let mut m = [0u8; 48];
                    hex::decode_to_slice(value, &mut m)
                        .map_err(|_| "the measurement is 96 hex digits".to_owned())?;
                    measurement.replace(m).map_or(Ok(()), |_| Err(twice()))?;
                }
                "policy" => {
                    let digits = value.strip_prefix("0x").unwrap_or(value);
                    let p = u64::from_str_radix(digits, 16)
                        .map_err(|_| "the policy is a 64-bit hex number".to_owned())?;
                    policy.replace(p).map_or(Ok(()), |_| Err(twice()))?;
                }
                "tcb-min" => {
                    let parts = value
                        .split('.')
                        .map(u8::from_str)
                        .collect::<Result<Vec<u8>, _>>()
                        .map_err(|_| "tcb-min is <bl>.<tee>.<snp>.<ucode>[.<fmc>], each 0..255")?;
                    let floor = match parts[..] {
                        [bootloader, tee, snp, microcode] => TcbFloor {
                            bootloader,
                            tee,
                            snp,
                            microcode,
                            fmc: None,
                        },
                        [bootloader, tee, snp, microcode, fmc] => TcbFloor {
                            bootloader,
                            tee,
                            snp,
                            microcode,
                            fmc: Some(fmc),
                        },
                        _ => return Err("tcb-min is <bl>.<tee>.<snp>.<ucode>[.<fmc>]".into()),
                    };
                    tcb_min.replace(floor).map_or(Ok(()), |_| Err(twice()))?;
                }
                "vmpl" => {
                    let v = value
                        .parse::<u32>()
                        .ok()
                        .filter(|v| *v <= 3)
                        .ok_or("vmpl is 0, 1, 2 or 3")?;
                    vmpl.replace(v).map_or(Ok(()), |_| Err(twice()))?;
                }
                "debug" if value == "allow" => {
                    allow_debug.replace(true).map_or(Ok(()), |_| Err(twice()))?;
                }
                "debug" => return Err("debug takes only the value allow".into()),
                other => {
                    return Err(format!(
                        "unknown key {other:?} (measurement, policy, tcb-min, vmpl, debug)"
                    ));
                }
            }
        }
        let expect = SnpExpectation {
            measurement: measurement.ok_or("measurement=<96 hex> is required")?,
            policy: policy.ok_or("policy=<hex> is required")?,
            tcb_min: tcb_min.ok_or("tcb-min=<bl>.<tee>.<snp>.<ucode> is required")?,
            vmpl: vmpl.unwrap_or(0),
            allow_debug: allow_debug.unwrap_or(false),
        };
        if expect.policy & POLICY_DEBUG != 0 && !expect.allow_debug {
            return Err(
                "the policy has the DEBUG bit (19) set: add debug=allow if that is meant".into(),
            );
        }
        Ok(expect)
    }
}

/// Whose root the chain ends in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootOfTrust {
    /// AMD's: the ARK must have the public key of one of the ARKs built into the `sev` crate.
    Amd,
    /// The operator's ARK file, whatever it is (`--trust-given-ark`): test chains, private roots.
    OperatorArk,
}

/// The certificates the operator gave (`--vcek`, `--ask`, `--ark`) and the root they end in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnpChain {
    pub vcek: Certificate,
    pub ask: Option<Certificate>,
    pub ark: Option<Certificate>,
    pub root: RootOfTrust,
}

/// A certificate from PEM (`-----BEGIN`) or DER bytes.
pub fn certificate_from_bytes(bytes: &[u8]) -> Result<Certificate, String> {
    let text = bytes.trim_ascii_start();
    let parsed = if text.starts_with(b"-----BEGIN") {
        Certificate::from_pem(text)
    } else {
        Certificate::from_der(bytes)
    };
    parsed.map_err(|e| e.to_string())
}

impl SnpChain {
    /// Checks the combination: [`RootOfTrust::OperatorArk`] needs both the ARK and the ASK.
    pub fn new(
        vcek: Certificate,
        ask: Option<Certificate>,
        ark: Option<Certificate>,
        root: RootOfTrust,
    ) -> Result<Self, SnpError> {
        if root == RootOfTrust::OperatorArk && (ark.is_none() || ask.is_none()) {
            return Err(SnpError::ChainOptions(
                "trusting the given ARK needs both --ark and --ask".into(),
            ));
        }
        Ok(Self {
            vcek,
            ask,
            ark,
            root,
        })
    }

    /// Reads the chain files (each PEM or DER).
    pub fn load(
        vcek: &Path,
        ask: Option<&Path>,
        ark: Option<&Path>,
        root: RootOfTrust,
    ) -> Result<Self, SnpError> {
        let read = |what: &'static str, path: &Path| -> Result<Certificate, SnpError> {
            let error = |reason: String| SnpError::ChainFile {
                what,
                path: path.display().to_string(),
                reason,
            };
            let bytes = std::fs::read(path).map_err(|e| error(e.to_string()))?;
            certificate_from_bytes(&bytes).map_err(error)
        };
        Self::new(
            read("VCEK", vcek)?,
            ask.map(|p| read("ASK", p)).transpose()?,
            ark.map(|p| read("ARK", p)).transpose()?,
            root,
        )
    }
}

/// What a successful verification established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnpVerified {
    /// The root the chain ends in: "AMD <product>" or "operator ARK (not AMD)".
    pub root: String,
    /// The reported TCB, `<bl>.<tee>.<snp>.<ucode>[.<fmc>]`.
    pub reported_tcb: String,
    /// The chip's ID (hex), as the report and the VCEK name it.
    pub chip_id: String,
}

/// The SNP products whose AMD roots the `sev` crate has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Product {
    Milan,
    Genoa,
    Turin,
}

impl Product {
    const ALL: [Product; 3] = [Product::Milan, Product::Genoa, Product::Turin];

    fn name(self) -> &'static str {
        match self {
            Product::Milan => "Milan",
            Product::Genoa => "Genoa",
            Product::Turin => "Turin",
        }
    }

    fn ark(self) -> Certificate {
        match self {
            Product::Milan => builtin::milan::ark(),
            Product::Genoa => builtin::genoa::ark(),
            Product::Turin => builtin::turin::ark(),
        }
        .expect("the built-in ARKs parse")
    }

    fn ask(self) -> Certificate {
        match self {
            Product::Milan => builtin::milan::ask(),
            Product::Genoa => builtin::genoa::ask(),
            Product::Turin => builtin::turin::ask(),
        }
        .expect("the built-in ASKs parse")
    }

    /// The product the report names (CPUID family and model, report version 3 and later).
    fn of_report(report: &AttestationReport) -> Option<Self> {
        match Generation::identify_cpu(report.cpuid_fam_id?, report.cpuid_mod_id?).ok()? {
            Generation::Milan => Some(Product::Milan),
            Generation::Genoa => Some(Product::Genoa),
            Generation::Turin => Some(Product::Turin),
        }
    }
}

fn x509(cert: &Certificate) -> Result<x509_cert::Certificate, String> {
    let der = cert.to_der().map_err(|e| e.to_string())?;
    x509_cert::Certificate::from_der(&der).map_err(|e| e.to_string())
}

fn spki_der(cert: &Certificate) -> Option<Vec<u8>> {
    x509(cert)
        .ok()?
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .ok()
}

/// The VCEK's statement of what it was issued for: its hwID and TCB extensions.
fn check_vcek_extensions(vcek: &Certificate, report: &AttestationReport) -> Result<(), SnpError> {
    let mismatch = SnpError::VcekMismatch;
    let cert = x509(vcek).map_err(mismatch)?;
    let extensions = cert.tbs_certificate.extensions.unwrap_or_default();
    let value = |oid: ObjectIdentifier, name: &str| -> Result<&[u8], SnpError> {
        let mut found = extensions.iter().filter(|e| e.extn_id == oid);
        match (found.next(), found.next()) {
            (Some(e), None) => Ok(e.extn_value.as_bytes()),
            (None, _) => Err(mismatch(format!("the VCEK has no {name} extension"))),
            _ => Err(mismatch(format!("the VCEK has two {name} extensions"))),
        }
    };
    // hwID: a DER OCTET STRING of 64 bytes (older VCEKs: the 64 bytes themselves).
    let hw_id = value(OID_HW_ID, "hwID")?;
    let hw_id = if hw_id.len() == 64 {
        hw_id.to_vec()
    } else {
        OctetString::from_der(hw_id)
            .map_err(|e| mismatch(format!("the VCEK's hwID does not parse: {e}")))?
            .into_bytes()
    };
    if hw_id != report.chip_id {
        return Err(mismatch(format!(
            "it was issued for chip {}, and the report is from chip {}",
            hex::encode(&hw_id),
            hex::encode(report.chip_id)
        )));
    }
    let spl = |oid, name: &str| -> Result<u8, SnpError> {
        u8::from_der(value(oid, name)?)
            .map_err(|e| mismatch(format!("the VCEK's {name} does not parse: {e}")))
    };
    let tcb = &report.reported_tcb;
    let mut issued = TcbFloor {
        bootloader: spl(OID_BL_SPL, "bootloader SPL")?,
        tee: spl(OID_TEE_SPL, "TEE SPL")?,
        snp: spl(OID_SNP_SPL, "SNP SPL")?,
        microcode: spl(OID_UCODE_SPL, "microcode SPL")?,
        fmc: None,
    };
    if tcb.fmc.is_some() {
        issued.fmc = Some(spl(OID_FMC_SPL, "FMC SPL")?);
    }
    let reported = TcbFloor {
        bootloader: tcb.bootloader,
        tee: tcb.tee,
        snp: tcb.snp,
        microcode: tcb.microcode,
        fmc: tcb.fmc,
    };
    if issued != reported {
        return Err(mismatch(format!(
            "it was issued for TCB {issued}, and the report's reported TCB is {reported}"
        )));
    }
    Ok(())
}

/// Refuses a report whose signature field has non-zero bytes beyond R's and S's 48 significant bytes
/// (the reserved area after S is not carried by the parsed report): the signature check reads only
/// the significant bytes, so without this one signed report would have many encodings (a report the
/// host altered there would still verify, and any record or replay check keyed on the report's bytes
/// would see a new report).
fn check_signature_encoding(raw: &[u8]) -> Result<(), SnpError> {
    let signature = &raw[REPORT_SIGNATURE_AT..];
    let r_pad = P384_SCALAR_LEN..SIGNATURE_COMPONENT_LEN;
    let s_pad = SIGNATURE_COMPONENT_LEN + P384_SCALAR_LEN..signature.len();
    if signature[r_pad]
        .iter()
        .chain(&signature[s_pad])
        .any(|&b| b != 0)
    {
        return Err(SnpError::ReportFormat(
            "the signature field has non-zero bytes beyond the P-384 R and S values".into(),
        ));
    }
    Ok(())
}

/// Verifies an SNP evidence body against `expect`, with `chain`, requiring REPORT_DATA to be
/// `report_data`. The order: the body parses; the root (AMD's, or the operator's ARK); the chain (ARK
/// self-signed, ASK by ARK, VCEK by ASK); the report's signature by the VCEK; the VCEK issued for this
/// chip and this reported TCB; then the report's fields: version, signature algorithm and key, report
/// data, measurement, debug policy, policy, TCB floor, VMPL. The first failed check is the error. A
/// certificate table in the body is not used: the operator's files are the chain.
pub fn verify_evidence(
    body: &[u8],
    expect: &SnpExpectation,
    chain: &SnpChain,
    report_data: &ReportData,
) -> Result<SnpVerified, SnpError> {
    let body = SnpEvidenceBody::decode(body).map_err(SnpError::Evidence)?;
    let report = &body.attestation_report;
    let product = Product::of_report(report);
    let (ark, ask, root) = match chain.root {
        RootOfTrust::OperatorArk => (
            chain.ark.clone().expect("checked by SnpChain::new"),
            chain.ask.clone().expect("checked by SnpChain::new"),
            "operator ARK (not AMD)".to_owned(),
        ),
        RootOfTrust::Amd => {
            let generation = match &chain.ark {
                Some(ark) => {
                    let given = spki_der(ark);
                    Product::ALL
                        .into_iter()
                        .find(|p| given.is_some() && spki_der(&p.ark()) == given)
                        .ok_or(SnpError::ArkNotAmd)?
                }
                None => product.ok_or_else(|| {
                    SnpError::UnknownProduct(format!(
                        "the report (version {}, CPUID family {:?} model {:?}) names no product \
                         whose AMD root this build has; give --ark",
                        report.version, report.cpuid_fam_id, report.cpuid_mod_id
                    ))
                })?,
            };
            if let Some(p) = product
                && p != generation
            {
                return Err(SnpError::ProductMismatch {
                    ark: generation.name().into(),
                    report: p.name().into(),
                });
            }
            (
                chain.ark.clone().unwrap_or_else(|| generation.ark()),
                chain.ask.clone().unwrap_or_else(|| generation.ask()),
                format!("AMD {}", generation.name()),
            )
        }
    };
    (&ark, &ark)
        .verify()
        .map_err(|e| SnpError::ArkNotSelfSigned(e.to_string()))?;
    (&ark, &ask)
        .verify()
        .map_err(|e| SnpError::AskNotSignedByArk(e.to_string()))?;
    (&ask, &chain.vcek)
        .verify()
        .map_err(|e| SnpError::VcekNotSignedByAsk(e.to_string()))?;
    (&chain.vcek, report)
        .verify()
        .map_err(|e| SnpError::ReportSignature(e.to_string()))?;
    check_vcek_extensions(&chain.vcek, report)?;
    if !(MIN_REPORT_VERSION..=MAX_REPORT_VERSION).contains(&report.version) {
        return Err(SnpError::ReportFormat(format!(
            "report version {} (this build verifies {MIN_REPORT_VERSION} to {MAX_REPORT_VERSION})",
            report.version
        )));
    }
    if report.sig_algo != SIG_ALGO_ECDSA_P384_SHA384 {
        return Err(SnpError::ReportFormat(format!(
            "signature algorithm {} (expected 1, ECDSA P-384 with SHA-384)",
            report.sig_algo
        )));
    }
    let raw = body.report_bytes().map_err(SnpError::Evidence)?;
    check_signature_encoding(&raw)?;
    let word = |at: usize| u32::from_le_bytes(raw[at..at + 4].try_into().expect("4 bytes"));
    let signing_key =
        (word(REPORT_KEY_INFO_AT) >> KEY_INFO_SIGNING_KEY_SHIFT) & KEY_INFO_SIGNING_KEY_MASK;
    if signing_key != 0 {
        return Err(SnpError::ReportFormat(format!(
            "the report is signed by key {signing_key} (KEY_INFO), not the VCEK (0)"
        )));
    }
    if report.report_data != *report_data {
        return Err(SnpError::ReportData);
    }
    if report.measurement != expect.measurement {
        return Err(SnpError::Measurement {
            got: hex::encode(report.measurement),
            want: hex::encode(expect.measurement),
        });
    }
    let policy = u64::from(word(REPORT_POLICY_AT)) | (u64::from(word(REPORT_POLICY_AT + 4)) << 32);
    if policy & POLICY_DEBUG != 0 && !expect.allow_debug {
        return Err(SnpError::DebugPolicy { got: policy });
    }
    if policy != expect.policy {
        return Err(SnpError::Policy {
            got: policy,
            want: expect.policy,
        });
    }
    let tcb = &report.reported_tcb;
    let floor = &expect.tcb_min;
    let below = tcb.bootloader < floor.bootloader
        || tcb.tee < floor.tee
        || tcb.snp < floor.snp
        || tcb.microcode < floor.microcode
        || floor.fmc.is_some_and(|f| tcb.fmc.is_none_or(|got| got < f));
    if below {
        return Err(SnpError::TcbBelowFloor {
            got: tcb_text(tcb),
            floor: floor.to_string(),
        });
    }
    if report.vmpl != expect.vmpl {
        return Err(SnpError::Vmpl {
            got: report.vmpl,
            want: expect.vmpl,
        });
    }
    Ok(SnpVerified {
        root,
        reported_tcb: tcb_text(tcb),
        chip_id: hex::encode(report.chip_id),
    })
}
