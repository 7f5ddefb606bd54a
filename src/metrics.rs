//! Prometheus metrics, served on `--metrics-address` (off by default).
//!
//! Label values are bounded: gRPC method names and status codes come from fixed sets, failure reasons
//! from [`UnsealFailure`], and the only per-volume series are the integrity mismatch and integrity failure
//! gauges, labelled with the CSI volume id as Kubernetes' own volume metrics are. Volume-level gauges are read from the kernel
//! at scrape time (observed state), not from bookkeeping that could drift.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::dm::{DeviceMapper, integrity_status};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeLabels {
    volume_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InitLabels {
    mode: &'static str,
    phase: &'static str,
}

/// Why a volume could not be unsealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnsealFailure {
    /// No keyslot is sealed to this node's identity.
    WrongIdentity,
    /// The header is missing, damaged, altered or unsupported.
    InvalidHeader,
    /// The sealing source did not answer.
    SourceUnavailable,
}

impl UnsealFailure {
    fn label(self) -> &'static str {
        match self {
            UnsealFailure::WrongIdentity => "wrong_identity",
            UnsealFailure::InvalidHeader => "invalid_header",
            UnsealFailure::SourceUnavailable => "source_unavailable",
        }
    }
}

/// The plugin's metrics.
pub struct Metrics {
    registry: Registry,
    rpc_total: Family<RpcLabels, Counter>,
    rpc_seconds: Family<MethodLabels, Histogram>,
    staged: Gauge,
    integrity_mismatches: Family<VolumeLabels, Gauge>,
    unseal_failures: Family<ReasonLabels, Counter>,
    init_seconds: Family<InitLabels, Histogram>,
    integrity_failures: Family<VolumeLabels, Gauge>,
    dm: Option<Arc<dyn DeviceMapper>>,
    failure_counts: Option<FailureCounts>,
}

/// The integrity failures counted for an open volume's top device-mapper device (by its name), where
/// they are counted (`crate::node::VolumeEngine::integrity_failures`).
pub type FailureCounts = Box<dyn Fn(&str) -> Option<u64> + Send + Sync>;

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Prefix of the crypt devices' device-mapper UUIDs (see `mapping::dm_uuid`).
const CRYPT_UUID_PREFIX: &str = "SEALCSI-";
/// The CSI node service names a volume's top device `sealcsi-<volume id>`.
const DM_NAME_PREFIX: &str = "sealcsi-";
const INTEGRITY_SUFFIX: &str = "-integrity";

impl Metrics {
    /// Metrics whose volume gauges are read from `dm` at scrape time (none without it).
    pub fn new(dm: Option<Arc<dyn DeviceMapper>>) -> Arc<Self> {
        Self::with_failure_counts(dm, None)
    }

    /// As [`Metrics::new`], with the per-volume integrity failure gauge read from `counts`.
    pub fn with_failure_counts(
        dm: Option<Arc<dyn DeviceMapper>>,
        failure_counts: Option<FailureCounts>,
    ) -> Arc<Self> {
        let mut registry = Registry::with_prefix("sealcsi");
        let rpc_total = Family::<RpcLabels, Counter>::default();
        registry.register(
            "csi_rpc",
            "CSI calls by method and gRPC status code",
            rpc_total.clone(),
        );
        let rpc_seconds = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        registry.register(
            "csi_rpc_duration_seconds",
            "CSI call latency by method",
            rpc_seconds.clone(),
        );
        let staged = Gauge::default();
        registry.register(
            "volumes_staged",
            "Sealed volumes open on this node",
            staged.clone(),
        );
        let integrity_mismatches = Family::<VolumeLabels, Gauge>::default();
        registry.register(
            "integrity_mismatches",
            "Tag mismatches counted by dm-integrity, per open volume (in AEAD mode dm-crypt checks the tags and \
             this stays 0; failed reads surface as I/O errors)",
            integrity_mismatches.clone(),
        );
        let unseal_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "unseal_failures",
            "Volumes this node could not unseal, by reason",
            unseal_failures.clone(),
        );
        let init_seconds = Family::<InitLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.05, 2.0, 14))
        });
        registry.register(
            "init_duration_seconds",
            "Time to initialize a new volume, by init mode and phase (wipe = zeros written, mkfs)",
            init_seconds.clone(),
        );
        let integrity_failures = Family::<VolumeLabels, Gauge>::default();
        registry.register(
            "integrity_failures",
            "Blocks dm-crypt (AEAD tag) or dm-integrity refused to read, per open volume since it was staged, \
             counted from the kernel log: changed outside the node. A lower bound (the kernel rate-limits the \
             messages)",
            integrity_failures.clone(),
        );
        Arc::new(Self {
            registry,
            rpc_total,
            rpc_seconds,
            staged,
            integrity_mismatches,
            unseal_failures,
            init_seconds,
            integrity_failures,
            dm,
            failure_counts,
        })
    }

    /// Records one finished CSI call.
    pub fn observe_rpc(&self, method: &str, code: tonic::Code, seconds: f64) {
        let method = method.to_string();
        self.rpc_total
            .get_or_create(&RpcLabels {
                method: method.clone(),
                code: format!("{code:?}"),
            })
            .inc();
        self.rpc_seconds
            .get_or_create(&MethodLabels { method })
            .observe(seconds);
    }

    pub fn unseal_failed(&self, reason: UnsealFailure) {
        self.unseal_failures
            .get_or_create(&ReasonLabels {
                reason: reason.label(),
            })
            .inc();
    }

    /// Records the phases of one volume initialization.
    pub fn observe_init(&self, fast: bool, wipe_seconds: f64, mkfs_seconds: f64) {
        let mode = if fast { "fast" } else { "full" };
        for (phase, seconds) in [("wipe", wipe_seconds), ("mkfs", mkfs_seconds)] {
            self.init_seconds
                .get_or_create(&InitLabels { mode, phase })
                .observe(seconds);
        }
    }

    /// Reads the open volumes and their integrity counters from device-mapper.
    fn refresh_volume_gauges(&self) {
        let Some(dm) = &self.dm else { return };
        let devices = match dm.list() {
            Ok(devices) => devices,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot list device-mapper devices");
                return;
            }
        };
        self.integrity_mismatches.clear();
        self.integrity_failures.clear();
        let mut staged = 0;
        for info in &devices {
            let uuid = info.uuid.as_deref().unwrap_or("");
            let name = info.name.as_str();
            if uuid.starts_with(CRYPT_UUID_PREFIX) && uuid.ends_with("-crypt") {
                staged += 1;
                if let Some(volume) = name.strip_prefix(DM_NAME_PREFIX)
                    && let Some(n) = self.failure_counts.as_ref().and_then(|f| f(name))
                {
                    self.integrity_failures
                        .get_or_create(&VolumeLabels {
                            volume_id: volume.to_string(),
                        })
                        .set(i64::try_from(n).unwrap_or(i64::MAX));
                }
            }
            let Some(volume) = name
                .strip_prefix(DM_NAME_PREFIX)
                .and_then(|rest| rest.strip_suffix(INTEGRITY_SUFFIX))
            else {
                continue;
            };
            let mismatches = dm.status(&info.name).ok().and_then(|lines| {
                let (_, _, target, status) = lines.first()?;
                (target == "integrity").then(|| integrity_status(status).ok())?
            });
            if let Some(status) = mismatches {
                self.integrity_mismatches
                    .get_or_create(&VolumeLabels {
                        volume_id: volume.to_string(),
                    })
                    .set(status.mismatches as i64);
            }
        }
        self.staged.set(staged);
    }

    /// The text exposition format, volume gauges read now.
    pub fn render(&self) -> String {
        self.refresh_volume_gauges();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// A timer for one call: `finish` records it.
pub struct RpcTimer {
    started: Instant,
}

impl RpcTimer {
    pub fn start() -> Self {
        Self {
            started: Instant::now(),
        }
    }

    pub fn finish(self, metrics: &Metrics, method: &str, code: tonic::Code) {
        metrics.observe_rpc(method, code, self.started.elapsed().as_secs_f64());
    }
}

/// The CSI method of a gRPC path: `/csi.v1.Node/NodeStageVolume` -> `NodeStageVolume`. Unknown paths
/// map to one label so that a client cannot create unbounded series.
pub fn method_label(path: &str) -> &str {
    match path.rsplit_once('/') {
        Some((service, method)) if service.starts_with("/csi.v1.") && !method.is_empty() => method,
        _ => "unknown",
    }
}

/// A tower layer for the gRPC server that counts and times every call by method and status code.
#[derive(Clone)]
pub struct MetricsLayer {
    metrics: Arc<Metrics>,
}

impl MetricsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for MetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        use tracing::Instrument;
        let method = method_label(request.uri().path()).to_string();
        // Every call gets a span with a process-unique request id; the handlers' spans (with the volume
        // id) nest inside it, so each log line of a call can be told apart from a concurrent retry's.
        let request_id = NEXT_REQUEST_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let span = tracing::info_span!("rpc", request.id = request_id, rpc.method = %method);
        let timer = RpcTimer::start();
        let metrics = self.metrics.clone();
        let response = span.in_scope(|| self.inner.call(request));
        Box::pin(
            async move {
                let response = response.await;
                // A unary call that fails carries its status in the response headers ("trailers only");
                // a successful one carries OK in the trailers, after the body.
                let code = match &response {
                    Ok(r) => r
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .map(tonic::Code::from_i32)
                        .unwrap_or(tonic::Code::Ok),
                    Err(_) => tonic::Code::Unknown,
                };
                timer.finish(&metrics, &method, code);
                response
            }
            .instrument(span),
        )
    }
}

static NEXT_REQUEST_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Serves `GET /metrics` on `addr` until the task is dropped. A minimal HTTP/1.1 responder: Prometheus
/// scrapes need nothing more, and it keeps a web framework out of a privileged storage daemon.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving metrics");
    loop {
        let (mut stream, _) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut request = [0u8; 2048];
            let n = match stream.read(&mut request).await {
                Ok(n) => n,
                Err(_) => return,
            };
            let head = String::from_utf8_lossy(&request[..n]);
            let (status, body) =
                if head.starts_with("GET /metrics ") || head.starts_with("GET /metrics?") {
                    let body = tokio::task::spawn_blocking(move || metrics.render())
                        .await
                        .unwrap_or_default();
                    ("200 OK", body)
                } else {
                    ("404 Not Found", "not found\n".to_string())
                };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dm::{
        CryptCipher, CryptKey, CryptTarget, DmName, IntegrityTarget, JournalMode, MemoryDm, Target,
        TargetLine,
    };
    use std::path::PathBuf;

    fn open_volume(dm: &MemoryDm, id: &str) {
        let integrity = DmName::try_from(format!("sealcsi-{id}-integrity")).unwrap();
        let crypt = DmName::try_from(format!("sealcsi-{id}")).unwrap();
        let line = TargetLine {
            start: 0,
            length: 8,
            target: Target::Integrity(IntegrityTarget {
                device: PathBuf::from("/dev/loop0"),
                offset_sectors: 2048,
                tag_size: 48,
                mode: JournalMode::Journal,
                block_size: 4096,
                fix_padding: true,
                journal_sectors: None,
            }),
        };
        dm.create(&integrity, &format!("SEALCSI-{id}-integrity"), &[line])
            .unwrap();
        let key = CryptKey::Keyring {
            description: "sealcsi:test".into(),
        };
        let target = CryptTarget::new(
            CryptCipher::AuthencHmacSha256XtsPlainRandom,
            key,
            integrity.node(),
            0,
            4096,
        )
        .unwrap();
        let line = TargetLine {
            start: 0,
            length: 8,
            target: Target::Crypt(target),
        };
        dm.create(&crypt, &format!("SEALCSI-{id}-crypt"), &[line])
            .unwrap();
    }

    #[test]
    fn exposes_rpc_counts_latency_and_failures_with_bounded_labels() {
        let metrics = Metrics::new(None);
        metrics.observe_rpc("NodeStageVolume", tonic::Code::Ok, 0.2);
        metrics.observe_rpc("NodeStageVolume", tonic::Code::Ok, 0.3);
        metrics.observe_rpc("CreateVolume", tonic::Code::AlreadyExists, 0.01);
        metrics.unseal_failed(UnsealFailure::WrongIdentity);
        metrics.observe_init(true, 0.5, 0.4);
        let text = metrics.render();
        assert!(
            text.contains(r#"sealcsi_csi_rpc_total{method="NodeStageVolume",code="Ok"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"sealcsi_csi_rpc_total{method="CreateVolume",code="AlreadyExists"} 1"#)
        );
        assert!(
            text.contains(r#"sealcsi_csi_rpc_duration_seconds_count{method="NodeStageVolume"} 2"#)
        );
        assert!(text.contains(r#"sealcsi_unseal_failures_total{reason="wrong_identity"} 1"#));
        assert!(
            text.contains(r#"sealcsi_init_duration_seconds_count{mode="fast",phase="wipe"} 1"#)
        );
        assert!(text.contains("sealcsi_volumes_staged 0"));
    }

    #[test]
    fn volume_gauges_come_from_device_mapper_state() {
        let dm = Arc::new(MemoryDm::default());
        open_volume(&dm, "sv-aaa");
        open_volume(&dm, "sv-bbb");
        let metrics = Metrics::new(Some(dm.clone()));
        let text = metrics.render();
        assert!(text.contains("sealcsi_volumes_staged 2"), "{text}");
        assert!(
            text.contains(r#"sealcsi_integrity_mismatches{volume_id="sv-aaa"} 0"#),
            "{text}"
        );
        dm.remove(&DmName::try_from("sealcsi-sv-bbb").unwrap())
            .unwrap();
        dm.remove(&DmName::try_from("sealcsi-sv-bbb-integrity").unwrap())
            .unwrap();
        let text = metrics.render();
        assert!(text.contains("sealcsi_volumes_staged 1"));
        assert!(
            !text.contains("sv-bbb"),
            "a closed volume's series disappears"
        );
    }

    #[test]
    fn integrity_failures_per_volume_come_from_the_kernel_log() {
        use crate::health::{IntegrityFailures, MemoryLog};
        let dm = Arc::new(MemoryDm::default());
        let log = MemoryLog::default();
        let failures = IntegrityFailures::new(dm.clone(), Arc::new(log.clone())).unwrap();
        open_volume(&dm, "sv-aaa");
        open_volume(&dm, "sv-bbb");
        let crypt = DmName::try_from("sealcsi-sv-aaa").unwrap();
        let integrity = DmName::try_from("sealcsi-sv-aaa-integrity").unwrap();
        failures.opened(&[&crypt, &integrity]);
        let minor = dm.info(&crypt).unwrap().unwrap().minor;
        for _ in 0..3 {
            log.kernel(&format!(
                "device-mapper: crypt: dm-{minor}: INTEGRITY AEAD ERROR, sector 8"
            ));
        }
        failures.pump().unwrap();
        let f = failures.clone();
        let metrics = Metrics::with_failure_counts(
            Some(dm.clone()),
            Some(Box::new(move |name| {
                let names = crate::volume::stack::StackNames::new(name).ok()?;
                f.count(&[&names.crypt, &names.integrity]).ok()
            })),
        );
        let text = metrics.render();
        assert!(
            text.contains(r#"sealcsi_integrity_failures{volume_id="sv-aaa"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"sealcsi_integrity_failures{volume_id="sv-bbb"} 0"#),
            "{text}"
        );
    }

    #[test]
    fn method_labels_are_bounded() {
        assert_eq!(
            method_label("/csi.v1.Node/NodeStageVolume"),
            "NodeStageVolume"
        );
        assert_eq!(method_label("/evil/aaaaaaaa"), "unknown");
        assert_eq!(method_label("garbage"), "unknown");
    }

    #[tokio::test]
    async fn the_layer_records_method_and_status() {
        use tower::{Layer, Service};
        let metrics = Metrics::new(None);
        let mut service = MetricsLayer::new(metrics.clone()).layer(tower::service_fn(
            |req: http::Request<()>| async move {
                let mut response = http::Response::new(());
                if req.uri().path().ends_with("CreateVolume") {
                    response
                        .headers_mut()
                        .insert("grpc-status", http::HeaderValue::from_static("6"));
                }
                Ok::<_, std::convert::Infallible>(response)
            },
        ));
        for path in [
            "/csi.v1.Controller/CreateVolume",
            "/csi.v1.Identity/Probe",
            "/other/x",
        ] {
            let request = http::Request::builder().uri(path).body(()).unwrap();
            service.call(request).await.unwrap();
        }
        let text = metrics.render();
        assert!(
            text.contains(r#"sealcsi_csi_rpc_total{method="CreateVolume",code="AlreadyExists"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"sealcsi_csi_rpc_total{method="Probe",code="Ok"} 1"#));
        assert!(text.contains(r#"sealcsi_csi_rpc_total{method="unknown",code="Ok"} 1"#));
    }

    #[tokio::test]
    async fn serves_metrics_over_http() {
        let metrics = Metrics::new(None);
        metrics.observe_rpc("Probe", tonic::Code::Ok, 0.001);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let server = tokio::spawn(serve(addr, metrics));
        let mut body = String::new();
        for _ in 0..50 {
            if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                    .await
                    .unwrap();
                s.read_to_string(&mut body).await.unwrap();
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        server.abort();
        assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
        assert!(
            body.contains(r#"sealcsi_csi_rpc_total{method="Probe",code="Ok"} 1"#),
            "{body}"
        );
    }
}
