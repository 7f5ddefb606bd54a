use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use proptest::prelude::*;

use super::*;

/// A QGS test double: a real server on a Unix socket that speaks the QGS wire protocol, one
/// connection per request as the QGS takes them. `answer` makes the reply from the request bytes (the
/// GET_QUOTE_REQ without its length prefix); `None` closes the connection without a reply. Every
/// request it saw is kept.
struct QgsDouble {
    path: std::path::PathBuf,
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
    _dir: tempfile::TempDir,
}

type Answer = dyn Fn(&[u8]) -> Option<Vec<u8>> + Send + Sync;

impl QgsDouble {
    fn start(answer: Box<Answer>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qgs.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut len = [0u8; 4];
                if stream.read_exact(&mut len).is_err() {
                    continue;
                }
                let mut request = vec![0u8; u32::from_be_bytes(len) as usize];
                if stream.read_exact(&mut request).is_err() {
                    continue;
                }
                seen.lock().unwrap().push(request.clone());
                if let Some(reply) = answer(&request) {
                    let mut framed = (reply.len() as u32).to_be_bytes().to_vec();
                    framed.extend_from_slice(&reply);
                    let _ = stream.write_all(&framed);
                }
            }
        });
        Self {
            path,
            requests,
            _dir: dir,
        }
    }

    /// A QGS that answers like the real one: a quote of the TDREPORT in the request.
    fn quoting() -> Self {
        Self::start(Box::new(|request| {
            let tdreport = &request[QGS_HEADER_LEN + 8..];
            Some(test_quote_response(&test_quote_for(tdreport), b"key-id", 0))
        }))
    }

    fn connector(&self) -> Box<dyn QgsConnector> {
        Box::new(UnixQgs(self.path.clone()))
    }
}

struct UnixQgs(std::path::PathBuf);

impl QgsConnector for UnixQgs {
    fn describe(&self) -> String {
        format!("the QGS at {}", self.0.display())
    }
    fn connect(&self) -> std::io::Result<Box<dyn QgsStream>> {
        Ok(Box::new(UnixStream::connect(&self.0)?))
    }
}

fn evidence_from(qgs: &QgsDouble, data: &ReportData) -> Result<Evidence, AttestError> {
    QgsEvidence::with(Box::new(MemoryTdxDevice), qgs.connector()).evidence(data)
}

#[test]
fn the_quote_from_the_qgs_is_the_evidence_in_the_tdx_verifiers_shape() {
    let qgs = QgsDouble::quoting();
    let data = [7u8; 64];
    let ev = evidence_from(&qgs, &data).unwrap();
    assert_eq!(ev.kind, EvidenceKind::Tdx);
    let body: serde_json::Value = serde_json::from_slice(&ev.body).unwrap();
    assert!(body["cc_eventlog"].is_null());
    let quote = STANDARD.decode(body["quote"].as_str().unwrap()).unwrap();
    assert_eq!(quote_report_data(&quote), Some(&data[..]));
    // The QGS got one GET_QUOTE_REQ of version 1.0 carrying the TDREPORT and no id list.
    let requests = qgs.requests.lock().unwrap();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    let tdreport = MemoryTdxDevice.tdreport(&data).unwrap();
    assert_eq!(request.len(), 16 + 8 + TDREPORT_LEN);
    assert_eq!(&request[0..4], &[1, 0, 0, 0], "version 1.0");
    assert_eq!(&request[4..8], &0u32.to_le_bytes(), "GET_QUOTE_REQ");
    assert_eq!(&request[8..12], &(request.len() as u32).to_le_bytes());
    assert_eq!(&request[16..20], &1024u32.to_le_bytes());
    assert_eq!(&request[20..24], &0u32.to_le_bytes());
    assert_eq!(&request[24..], &tdreport[..]);
}

#[test]
fn a_qgs_error_code_is_refused_and_named() {
    let qgs = QgsDouble::start(Box::new(|_| Some(test_quote_response(&[], &[], 0x12))));
    let err = evidence_from(&qgs, &[1; 64]).unwrap_err();
    assert!(matches!(err, AttestError::Malformed { .. }), "{err}");
    assert!(err.to_string().contains("error code 0x12"), "{err}");
}

#[test]
fn a_qgs_that_hangs_up_or_is_absent_makes_evidence_unavailable() {
    let qgs = QgsDouble::start(Box::new(|_| None));
    let err = evidence_from(&qgs, &[1; 64]).unwrap_err();
    assert!(matches!(err, AttestError::Unavailable { .. }), "{err}");
    assert!(err.to_string().contains("qgs.sock"), "{err}");
    let gone = UnixQgs(qgs.path.with_file_name("nobody.sock"));
    let err = QgsEvidence::with(Box::new(MemoryTdxDevice), Box::new(gone))
        .evidence(&[1; 64])
        .unwrap_err();
    assert!(matches!(err, AttestError::Unavailable { .. }), "{err}");
}

#[test]
fn a_quote_for_other_report_data_is_refused() {
    // The untrusted host answers with a quote it kept from an earlier request.
    let stale = test_quote_for(&MemoryTdxDevice.tdreport(&[9u8; 64]).unwrap());
    let qgs = QgsDouble::start(Box::new(move |_| Some(test_quote_response(&stale, &[], 0))));
    let err = evidence_from(&qgs, &[1; 64]).unwrap_err();
    assert!(err.to_string().contains("report data"), "{err}");
}

#[test]
fn a_reply_longer_than_the_limit_is_not_read() {
    let qgs = QgsDouble::start(Box::new(|_| Some(vec![0u8; QGS_MAX_REPLY + 1])));
    let err = evidence_from(&qgs, &[1; 64]).unwrap_err();
    assert!(err.to_string().contains("more than"), "{err}");
}

#[test]
fn a_tdreport_that_does_not_bind_the_report_data_never_reaches_the_qgs() {
    struct Forgetful;
    impl TdxDevice for Forgetful {
        fn tdreport(&self, _: &ReportData) -> Result<Vec<u8>, AttestError> {
            MemoryTdxDevice.tdreport(&[0; 64])
        }
    }
    let qgs = QgsDouble::quoting();
    let err = QgsEvidence::with(Box::new(Forgetful), qgs.connector())
        .evidence(&[1; 64])
        .unwrap_err();
    assert!(err.to_string().contains("TDREPORT"), "{err}");
    assert!(qgs.requests.lock().unwrap().is_empty());
}

#[test]
fn the_real_device_fails_clearly_on_a_file_that_is_not_tdx_guest() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let device = TdxGuestDevice::open(file.path()).unwrap();
    let err = device.tdreport(&[0; 64]).unwrap_err();
    assert!(err.to_string().contains("TDX_CMD_GET_REPORT0"), "{err}");
    let err = TdxGuestDevice::open(Path::new("/nonexistent/tdx_guest")).unwrap_err();
    assert!(matches!(err, AttestError::Unavailable { .. }), "{err}");
}

#[test]
fn the_ioctl_number_is_iowr_t_1_of_the_1088_byte_request() {
    // _IOWR('T', 1, struct tdx_report_req): dir read|write (3) << 30, size 1088 << 16, 'T' << 8, 1.
    assert_eq!(std::mem::size_of::<TdxReportReq>(), 64 + 1024);
    assert_eq!(TDX_CMD_GET_REPORT0, 0xC440_5401);
}

#[test]
fn the_conf_names_the_port_and_the_default_stands_without_it() {
    assert_eq!(conf_port("# comment\nport=4051\n"), Some(4051));
    assert_eq!(conf_port("  port = 5000 # the QGS\n"), Some(5000));
    assert_eq!(conf_port("#port=4051\n"), None);
    assert_eq!(conf_port("portal=1\nport=x\n"), None);
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("tdx-attest.conf");
    assert_eq!(VsockQgs::from_conf(&conf).port, QGS_DEFAULT_PORT);
    std::fs::write(&conf, "port=4060\n").unwrap();
    let qgs = VsockQgs::from_conf(&conf);
    assert_eq!((qgs.cid, qgs.port), (2, 4060));
}

#[test]
fn report_data_is_found_in_version_4_and_5_quotes_only() {
    let mut quote = vec![0u8; 1200];
    quote[0..2].copy_from_slice(&4u16.to_le_bytes());
    quote[568..632].fill(1);
    assert_eq!(quote_report_data(&quote), Some(&[1u8; 64][..]));
    quote[0..2].copy_from_slice(&5u16.to_le_bytes());
    quote[574..638].fill(2);
    assert_eq!(quote_report_data(&quote), Some(&[2u8; 64][..]));
    quote[0..2].copy_from_slice(&3u16.to_le_bytes());
    assert_eq!(quote_report_data(&quote), None);
    assert_eq!(quote_report_data(&quote[..600]), None);
}

#[test]
fn each_malformed_header_field_is_refused() {
    let good = test_quote_response(&[0xAB; 40], b"id", 0);
    assert_eq!(parse_quote_response(&good), Ok(&[0xAB; 40][..]));
    let with = |at: usize, value: u32| {
        let mut msg = good.clone();
        msg[at..at + 4].copy_from_slice(&value.to_le_bytes());
        parse_quote_response(&msg).unwrap_err()
    };
    assert_eq!(with(0, 2), QgsReplyError::Version(2));
    assert_eq!(with(4, 0), QgsReplyError::Type(0));
    assert!(matches!(with(8, 10), QgsReplyError::Size { .. }));
    assert_eq!(with(12, 7), QgsReplyError::Refused(7));
    assert!(matches!(with(16, 3), QgsReplyError::Sizes { .. }));
    assert!(matches!(with(20, u32::MAX), QgsReplyError::Sizes { .. }));
    assert_eq!(
        parse_quote_response(&test_quote_response(&[], b"id", 0)),
        Err(QgsReplyError::Empty)
    );
    assert_eq!(
        parse_quote_response(&good[..10]),
        Err(QgsReplyError::Short(10))
    );
}

proptest! {
    /// The parser of the host's reply: any bytes give a quote or an error, never a panic, and a
    /// quote is always a sub-slice that ends where the message ends.
    #[test]
    fn any_reply_bytes_parse_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(quote) = parse_quote_response(&bytes) {
            prop_assert!(!quote.is_empty());
            prop_assert!(bytes.ends_with(quote));
        }
    }

    /// A well-formed reply gives back exactly its quote, whatever the selected id.
    #[test]
    fn a_well_formed_reply_gives_back_its_quote(
        quote in proptest::collection::vec(any::<u8>(), 1..300),
        id in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let msg = test_quote_response(&quote, &id, 0);
        prop_assert_eq!(parse_quote_response(&msg), Ok(&quote[..]));
    }

    /// Cutting or extending a well-formed reply by any amount is refused (the header's size).
    #[test]
    fn a_reply_of_another_length_than_its_header_says_is_refused(
        quote in proptest::collection::vec(any::<u8>(), 1..100),
        cut in 1usize..124,
        extra in proptest::collection::vec(any::<u8>(), 1..20),
    ) {
        let msg = test_quote_response(&quote, &[], 0);
        let cut = cut.min(msg.len());
        prop_assert!(parse_quote_response(&msg[..msg.len() - cut]).is_err());
        let mut longer = msg.clone();
        longer.extend_from_slice(&extra);
        prop_assert!(parse_quote_response(&longer).is_err());
    }
}
