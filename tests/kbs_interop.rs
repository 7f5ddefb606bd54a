//! By hand: the KBS client against the REAL Trustee KBS (built outside this repository), started and
//! stopped by the test on 127.0.0.1 with its builtin attestation service and plain http.
//!
//! ```text
//! SEALCSI_TRUSTEE_KBS=/path/to/kbs [SEALCSI_KBS_RECORD_DIR=tests/data/kbs] \
//!     cargo test --test kbs_interop -- --ignored --nocapture
//! ```
//!
//! Without `SEALCSI_TRUSTEE_KBS` it prints one line and passes. With it: uploads an allow-all and then
//! a deny-all resource policy (its own Rego) and a 32-byte test resource through the admin API
//! (`authorization_mode = "InsecureAllowAll"`), fetches the resource with `sample` evidence, checks the
//! denial, and, with `SEALCSI_KBS_RECORD_DIR`, writes each exchange (method, path, request body, status,
//! Set-Cookie, reply body) as JSON there. The resource is random test data, not a secret.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sealcsi::attest::SampleEvidence;
use sealcsi::broker::rcar::Reply;
use sealcsi::broker::{
    BrokerError, HttpOptions, HttpTransport, KbsClient, ResourcePath, Retry, Transport,
};
use serde_json::{Value, json};

struct Kbs(Child);

impl Drop for Kbs {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(binary: &Path, dir: &Path, port: u16) -> Kbs {
    let config = format!(
        "[http_server]\nsockets = [\"127.0.0.1:{port}\"]\ninsecure_http = true\n\n\
         [attestation_token]\ninsecure_header_jwk = true\n\n\
         [attestation_service]\ntype = \"coco_as_builtin\"\n\n\
         [attestation_service.attestation_token_broker]\nduration_min = 5\n\n\
         [attestation_service.rvps_config]\ntype = \"BuiltIn\"\n\n\
         [admin]\nauthorization_mode = \"InsecureAllowAll\"\n\n\
         [storage_backend]\nstorage_type = \"LocalFs\"\n\n\
         [storage_backend.backends.local_fs]\ndir_path = \"{}\"\n\n\
         [[plugins]]\nname = \"resource\"\nstorage_backend_type = \"kvstorage\"\n",
        dir.join("storage").display()
    );
    let path = dir.join("kbs.toml");
    std::fs::write(&path, config).unwrap();
    let child = Command::new(binary)
        .arg("--config-file")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("kbs.log")).unwrap())
        .spawn()
        .expect("start the KBS");
    let kbs = Kbs(child);
    for _ in 0..300 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return kbs;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "the KBS did not listen on 127.0.0.1:{port} within 30 s; log:\n{}",
        std::fs::read_to_string(dir.join("kbs.log")).unwrap_or_default()
    );
}

/// A transport that records every exchange.
struct Recording {
    inner: HttpTransport,
    log: Arc<Mutex<Vec<Value>>>,
}

fn body_json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| json!({ "non_json_bytes": bytes.len() }))
}

impl Recording {
    fn record(&self, method: &str, path: &str, body: Option<&[u8]>, reply: &Result<Reply, String>) {
        let entry = match reply {
            Ok(r) => json!({
                "method": method, "path": path,
                "request": body.map(body_json),
                "status": r.status, "set_cookie": r.set_cookies, "reply": body_json(&r.body),
            }),
            Err(e) => json!({ "method": method, "path": path, "error": e }),
        };
        self.log.lock().unwrap().push(entry);
    }
}

impl Transport for Recording {
    fn url(&self) -> &str {
        self.inner.url()
    }
    fn post_json(&self, path: &str, cookie: Option<&str>, body: &[u8]) -> Result<Reply, String> {
        let reply = self.inner.post_json(path, cookie, body);
        self.record("POST", path, Some(body), &reply);
        reply
    }
    fn get(&self, path: &str, cookie: Option<&str>) -> Result<Reply, String> {
        let reply = self.inner.get(path, cookie);
        self.record("GET", path, None, &reply);
        reply
    }
}

fn admin(transport: &HttpTransport, path: &str, body: &[u8]) {
    let reply = transport
        .post_json(path, None, body)
        .expect("admin request");
    assert_eq!(
        reply.status,
        200,
        "admin {path}: {}",
        String::from_utf8_lossy(&reply.body)
    );
}

fn save(dir: Option<&Path>, name: &str, log: &Arc<Mutex<Vec<Value>>>) {
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir).unwrap();
        let text = serde_json::to_string_pretty(&*log.lock().unwrap()).unwrap();
        std::fs::write(dir.join(format!("{name}.json")), text + "\n").unwrap();
    }
    log.lock().unwrap().clear();
}

#[test]
#[ignore = "by hand: needs the real Trustee KBS in SEALCSI_TRUSTEE_KBS"]
fn the_client_interoperates_with_the_real_trustee_kbs() {
    let Some(binary) = std::env::var_os("SEALCSI_TRUSTEE_KBS") else {
        println!(
            "kbs_interop: SEALCSI_TRUSTEE_KBS is not set: the real-KBS interop test did not run"
        );
        return;
    };
    let record = std::env::var_os("SEALCSI_KBS_RECORD_DIR").map(std::path::PathBuf::from);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _kbs = start(Path::new(&binary), dir.path(), port);
    let url = format!("http://127.0.0.1:{port}");
    let opts = HttpOptions {
        insecure_http: true,
        ..HttpOptions::default()
    };
    let plain = HttpTransport::new(&url, &opts).unwrap();

    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).unwrap();
    admin(&plain, "/kbs/v0/resource/default/sealcsi/interop", &secret);
    let allow = "package policy\n\ndefault allow = true\n";
    let body = json!({ "policy": URL_SAFE_NO_PAD.encode(allow) }).to_string();
    admin(&plain, "/kbs/v0/resource-policy", body.as_bytes());

    let log = Arc::new(Mutex::new(Vec::new()));
    let client = KbsClient::new(
        Box::new(Recording {
            inner: HttpTransport::new(&url, &opts).unwrap(),
            log: log.clone(),
        }),
        Retry::default(),
    );
    let resource = ResourcePath::parse("default/sealcsi/interop").unwrap();
    let evidence = SampleEvidence::new("interop-node");
    let got = client
        .fetch_resource(&evidence, &resource)
        .expect("allowed release");
    assert_eq!(got.as_slice(), &secret, "the released resource");
    println!("kbs_interop: allow: released 32 bytes through auth, attest, resource");
    save(record.as_deref(), "allow", &log);

    let missing = ResourcePath::parse("default/sealcsi/missing").unwrap();
    let err = client.fetch_resource(&evidence, &missing).unwrap_err();
    println!("kbs_interop: missing resource: {err}");
    assert!(matches!(
        err,
        BrokerError::ResourceRefused { .. } | BrokerError::NotFound { .. }
    ));
    save(record.as_deref(), "missing", &log);

    let deny = "package policy\n\ndefault allow = false\n";
    let body = json!({ "policy": URL_SAFE_NO_PAD.encode(deny) }).to_string();
    admin(&plain, "/kbs/v0/resource-policy", body.as_bytes());
    let err = client.fetch_resource(&evidence, &resource).unwrap_err();
    println!("kbs_interop: deny: {err}");
    assert!(matches!(err, BrokerError::PolicyDenied { .. }), "{err}");
    save(record.as_deref(), "deny", &log);
}
