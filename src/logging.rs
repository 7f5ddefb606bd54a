//! The process's log subscriber: the operator's filter (`SEALCSI_LOG`), text or JSON on stderr, and a
//! cap on the devicemapper crate that no filter can lift.
//!
//! Why the cap: the devicemapper crate logs (through the `log` crate, bridged into tracing) whole
//! tables at trace level and device operations at debug level. A crypt table can carry key material
//! (sealcsi loads keys through the kernel keyring and never builds a hex-key table from a volume key,
//! see `mapping::table_key`, but a table read back or a future code path must not become a leak
//! through a verbose log). Appending `,devicemapper=info` to the operator's filter was not enough: a
//! more specific directive (`devicemapper::core::dm=trace`) wins over it in an `EnvFilter`. So the
//! cap is a separate per-layer filter ANDed with the env filter: an event or span whose target is
//! `devicemapper` or below it, more verbose than INFO, is refused before the env filter is consulted,
//! whatever the env filter says.

use tracing::{Level, Metadata, Subscriber};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, filter};

/// The filter used when the operator's does not parse.
pub const FALLBACK_FILTER: &str = "warn";

/// Whether `target` belongs to the devicemapper crate (not `devicemapper_sys`, `devicemapperx`, ...
/// which are other crates; their records are not capped, and none of them logs tables).
fn devicemapper_target(target: &str) -> bool {
    target == "devicemapper" || target.starts_with("devicemapper::")
}

/// The cap: false for a devicemapper record more verbose than INFO (tracing orders levels by
/// verbosity: TRACE > DEBUG > INFO).
pub fn allowed(meta: &Metadata<'_>) -> bool {
    !(devicemapper_target(meta.target()) && *meta.level() > Level::INFO)
}

/// The operator's filter, or [`FALLBACK_FILTER`] if it does not parse.
fn env_filter(filter: &str) -> EnvFilter {
    EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new(FALLBACK_FILTER))
}

/// The subscriber writing to `writer`: `filter` is an `EnvFilter` directive string; `json` selects one
/// JSON object per line (with the current span) instead of text. Text has ANSI colours only when
/// `writer` is a terminal (`ansi`): a log file or a collector gets plain text.
pub fn subscriber<W>(
    filter: &str,
    json: bool,
    ansi: bool,
    writer: W,
) -> impl Subscriber + Send + Sync + 'static
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi && !json)
        .with_writer(writer);
    let fmt = if json {
        fmt.json().with_current_span(true).boxed()
    } else {
        fmt.boxed()
    };
    tracing_subscriber::registry().with(
        fmt.with_filter(env_filter(filter))
            .with_filter(filter::filter_fn(allowed)),
    )
}

/// Installs the subscriber on stderr as the global default, and bridges `log` records (the
/// devicemapper crate uses `log`) into it. A second call does nothing.
pub fn init(filter: &str, json: bool) {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = subscriber(filter, json, ansi, std::io::stderr).try_init();
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'w self) -> Self::Writer {
            self.clone()
        }
    }

    impl Buffer {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    fn emit() {
        tracing::trace!(target: "devicemapper::core::dm", "Loading table MARKER-TRACE-0123abcd");
        tracing::debug!(target: "devicemapper", "MARKER-DEBUG-0123abcd");
        let span = tracing::trace_span!(target: "devicemapper::core::dm", "load", table = "MARKER-SPAN-0123abcd");
        let _in = span.enter();
        tracing::info!(target: "devicemapper::core::dm", "devicemapper info stays visible");
        tracing::trace!(target: "sealcsi::mapping", "sealcsi trace stays visible");
    }

    #[test]
    fn colours_only_for_a_terminal() {
        for ansi in [false, true] {
            let buf = Buffer::default();
            tracing::subscriber::with_default(subscriber("info", false, ansi, buf.clone()), || {
                tracing::info!(volume.id = "v1", "staged")
            });
            assert_eq!(buf.text().contains('\x1b'), ansi, "{}", buf.text());
        }
    }

    #[test]
    fn no_filter_lifts_the_devicemapper_cap() {
        for filter in [
            "trace",
            "devicemapper::core::dm=trace",
            "trace,devicemapper=trace,devicemapper::core=trace,devicemapper::core::dm=trace",
            "[{table}]=trace,trace",
        ] {
            for json in [false, true] {
                let buf = Buffer::default();
                tracing::subscriber::with_default(
                    subscriber(filter, json, false, buf.clone()),
                    emit,
                );
                let out = buf.text();
                assert!(
                    !out.contains("MARKER"),
                    "{filter} (json {json}) leaked:\n{out}"
                );
                assert!(
                    out.contains("devicemapper info stays visible"),
                    "{filter} (json {json}): the cap must only remove verbose records:\n{out}"
                );
                if filter.starts_with("trace") {
                    assert!(
                        out.contains("sealcsi trace stays visible"),
                        "{filter}:\n{out}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_cap_is_by_crate_and_level() {
        let meta = |target, level| {
            struct Cs;
            impl tracing::callsite::Callsite for Cs {
                fn set_interest(&self, _: tracing::subscriber::Interest) {}
                fn metadata(&self) -> &Metadata<'_> {
                    unreachable!()
                }
            }
            static CS: Cs = Cs;
            Metadata::new(
                "t",
                target,
                level,
                None,
                None,
                None,
                tracing::field::FieldSet::new(&[], tracing::callsite::Identifier(&CS)),
                tracing::metadata::Kind::EVENT,
            )
        };
        assert!(!allowed(&meta("devicemapper", Level::DEBUG)));
        assert!(!allowed(&meta("devicemapper::core::dm", Level::TRACE)));
        assert!(allowed(&meta("devicemapper::core::dm", Level::INFO)));
        assert!(allowed(&meta("devicemapper", Level::WARN)));
        assert!(allowed(&meta("sealcsi::dm", Level::TRACE)));
        assert!(allowed(&meta("devicemapper_sys", Level::TRACE)));
    }

    #[test]
    fn a_bad_filter_falls_back() {
        let buf = Buffer::default();
        tracing::subscriber::with_default(subscriber("=[[[", false, false, buf.clone()), || {
            tracing::warn!("warned");
            tracing::info!("not shown");
        });
        let out = buf.text();
        assert!(
            out.contains("warned") && !out.contains("not shown"),
            "{out}"
        );
    }
}
