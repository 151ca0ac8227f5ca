//! All metric handles and names, in one place (Prometheus, text format).
//!
//! The runbook's names are kept as they were (`model_downloads_total`, …); everything else is
//! `wan_*`. Handles are process-wide statics so any module can count without plumbing; the
//! exporter (`.wan/metrics`, `GET /metrics`) renders `REGISTRY`. Every labelled series whose
//! labels are known in advance is created at 0 before its first event: per model
//! ([`register_models`]), per source ([`register_source`]) and per FUSE operation, so an
//! `increase()` sees the first event too. Every name passes `promtool check metrics`.

use std::sync::LazyLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

fn counter(name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    REGISTRY
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    REGISTRY
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn gauge(name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    REGISTRY
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    REGISTRY
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

fn histogram_vec(name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric");
    REGISTRY
        .register(Box::new(h.clone()))
        .expect("unique metric");
    h
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric");
    REGISTRY
        .register(Box::new(h.clone()))
        .expect("unique metric");
    h
}

/// Seconds, from 100 µs to ~100 s: FUSE requests and first bytes live at the low end, whole
/// downloads at the high end.
fn latency_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.0001, 4.0, 11).expect("valid buckets")
}

pub struct Metrics {
    /// Files downloaded (every chunk verified), by model and `status` = success | failed.
    pub downloads: IntCounterVec,
    pub download_seconds: HistogramVec,
    /// Errors by `kind`: source, integrity, read_timeout, read, store, verify.
    pub errors: IntCounterVec,
    pub storage_used: IntGauge,
    /// Cache capacity. A gauge: it is set, and goes down when a reload lowers `gc.max_bytes`.
    /// Exported as `model_storage_capacity_bytes`: the runbook's `model_storage_bytes_total`
    /// is a counter's name (promtool refuses it on a gauge), and lives on as a recording rule
    /// (ops/prometheus/wan-recording.yml) for the dashboards and queries that use it.
    pub storage_capacity: IntGauge,
    /// Chunk fetches in flight.
    pub downloads_active: IntGauge,
    pub cache_hits: IntCounter,
    pub cache_misses: IntCounter,
    pub chunks_fetched: IntCounter,
    /// Reads of cold chunks served from verified sub-blocks (`fetch/sub_block.rs`).
    pub sub_block_reads: IntCounter,
    /// Bytes of chunks served to readers but not cached (`fetch.when_cache_behind = "skip"`).
    pub cache_skipped_bytes: IntCounter,
    pub source_bytes: IntCounterVec,
    pub source_requests: IntCounterVec,
    /// Bytes received by kind of source: `peer` (another daemon of the fleet) or `origin`
    /// (the manifest's sources): what the fleet saved the origin.
    pub source_kind_bytes: IntCounterVec,
    /// `/blobs` requests this daemon answered for its peers, by result (hit|miss).
    pub peer_requests: IntCounterVec,
    pub peer_served_bytes: IntCounter,
    pub first_byte_seconds: Histogram,
    pub fuse_seconds: HistogramVec,
    /// FUSE requests answered with an error, by operation.
    pub fuse_errors: IntCounterVec,
    pub integrity_failures: IntCounter,
    /// Models refused under the trust policy, by reason (`crate::trust::RefusalReason`),
    /// counted once per verdict (a reload that re-verifies counts again).
    pub trust_refusals: IntCounterVec,
    /// Models refused now, by reason: set from what is in force whenever metrics are read.
    pub models_untrusted: IntGaugeVec,
    /// Complete cached files whose chunks verified but whose whole-file sha256 did not match
    /// the manifest's: refused (fetch/check.rs).
    pub whole_file_failures: IntCounter,
    pub evictions: IntCounter,
    pub evicted_bytes: IntCounter,
    /// Chunks per group commit (one `fdatasync` per blob file and one index transaction for
    /// all of them): how much batching the cache write gets under the current load.
    pub commit_batch_chunks: Histogram,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    downloads: counter_vec(
        "model_downloads_total",
        "Files downloaded and verified completely, by model and status (success|failed).",
        &["model", "status"],
    ),
    download_seconds: histogram_vec(
        "model_download_duration_seconds",
        "Time from a file's first fetched chunk to its last.",
        &["model"],
        latency_buckets(),
    ),
    errors: counter_vec(
        "model_errors_total",
        "Errors by kind: source, integrity, read_timeout, read, store, verify.",
        &["kind"],
    ),
    storage_used: gauge(
        "model_storage_bytes_used",
        "Verified bytes held in the cache.",
    ),
    storage_capacity: gauge(
        "model_storage_capacity_bytes",
        "Cache capacity in bytes: gc.max_bytes if set, else the size of the cache's filesystem (set, not accumulated).",
    ),
    downloads_active: gauge("model_downloads_active", "Chunk fetches in flight."),
    cache_hits: counter(
        "wan_cache_hits_total",
        "FUSE reads served from the cache alone.",
    ),
    cache_misses: counter(
        "wan_cache_misses_total",
        "FUSE reads that waited for a fetch.",
    ),
    chunks_fetched: counter(
        "wan_chunks_fetched_total",
        "Chunks fetched, verified and stored.",
    ),
    sub_block_reads: counter(
        "wan_sub_block_reads_total",
        "Reads of a cold chunk answered from its sub-blocks, verified by the file's outboard, before the whole chunk.",
    ),
    cache_skipped_bytes: counter(
        "wan_cache_skipped_bytes_total",
        "Bytes fetched and served to readers but not cached, because the cache disk was behind (fetch.when_cache_behind = \"skip\").",
    ),
    source_bytes: counter_vec(
        "wan_source_bytes_total",
        "Bytes received from each source.",
        &["source"],
    ),
    source_requests: counter_vec(
        "wan_source_requests_total",
        "Requests to each source by result (ok|error|wrong_bytes: delivered bytes that failed verification|miss: a peer without the chunk).",
        &["source", "result"],
    ),
    source_kind_bytes: counter_vec(
        "wan_source_kind_bytes_total",
        "Bytes received by kind of source (peer|origin).",
        &["kind"],
    ),
    peer_requests: counter_vec(
        "wan_peer_requests_total",
        "Requests to /blobs from peers by result (hit|miss|busy).",
        &["result"],
    ),
    peer_served_bytes: counter(
        "wan_peer_served_bytes_total",
        "Bytes served to peers from /blobs.",
    ),
    first_byte_seconds: histogram(
        "wan_time_to_first_byte_seconds",
        "From a FUSE read that missed the cache to its reply.",
        latency_buckets(),
    ),
    fuse_seconds: histogram_vec(
        "wan_fuse_request_seconds",
        "FUSE request latency by operation.",
        &["op"],
        latency_buckets(),
    ),
    fuse_errors: counter_vec(
        "wan_fuse_errors_total",
        "FUSE requests answered with an error, by operation (a lookup's ENOENT excepted).",
        &["op"],
    ),
    integrity_failures: counter(
        "wan_integrity_failures_total",
        "Chunks or files whose bytes did not match their sha256 (discarded).",
    ),
    trust_refusals: counter_vec(
        "wan_trust_refusals_total",
        "Models refused under [trust] (signature missing, invalid, untrusted, not matching the entry, unsupported), by reason.",
        &["reason"],
    ),
    models_untrusted: gauge_vec(
        "wan_models_untrusted",
        "Models refused under [trust] right now (listed, their reads fail with EACCES), by reason.",
        &["reason"],
    ),
    whole_file_failures: counter(
        "wan_whole_file_failures_total",
        "Complete cached files whose chunks verified but whose whole-file sha256 did not match the manifest's (refused and dropped).",
    ),
    evictions: counter("wan_evictions_total", "Blobs evicted from the cache."),
    evicted_bytes: counter("wan_evicted_bytes_total", "Bytes evicted from the cache."),
    commit_batch_chunks: histogram(
        "wan_commit_batch_chunks",
        "Chunks made durable and indexed together per group commit.",
        prometheus::exponential_buckets(1.0, 2.0, 8).expect("valid buckets"),
    ),
});

/// Every `kind` of `model_errors_total` (docs/METRICS.md).
pub const ERROR_KINDS: [&str; 6] = [
    "source",
    "integrity",
    "read",
    "read_timeout",
    "store",
    "verify",
];

/// Every `status` of `model_downloads_total`.
pub const DOWNLOAD_STATUSES: [&str; 2] = ["success", "failed"];

/// The `result` of a request in `wan_source_requests_total`.
pub mod source_result {
    /// Delivered bytes that verified, or that no check judged (a sibling part failed first).
    pub const OK: &str = "ok";
    /// Failed: an error status, a reset, a timeout.
    pub const ERROR: &str = "error";
    /// Delivered bytes of a chunk (or whole file) that did not match its digest.
    pub const WRONG_BYTES: &str = "wrong_bytes";
    /// A peer that does not hold the chunk (404): not an error.
    pub const MISS: &str = "miss";
}

/// Every `op` of `wan_fuse_request_seconds` and `wan_fuse_errors_total`.
pub const FUSE_OPS: [&str; 9] = [
    "lookup",
    "getattr",
    "open",
    "read",
    "release",
    "readdir",
    "statfs",
    "getxattr",
    "listxattr",
];

/// Creates every documented label set known at start at 0: the error kinds, the source kinds,
/// the peer results, the FUSE operations, and for each of `models` both download statuses and
/// its download-duration histogram. A series that first appears at its first event has no
/// earlier sample, so `increase()` over it stays 0 and an alert would miss that first event.
/// Called at start and for the models a reload adds (a model a reload removes keeps its
/// series: counters count since the daemon started).
pub fn register_models<'a>(models: impl IntoIterator<Item = &'a str>) {
    for kind in ERROR_KINDS {
        METRICS.errors.with_label_values(&[kind]);
    }
    for kind in ["peer", "origin"] {
        METRICS.source_kind_bytes.with_label_values(&[kind]);
    }
    for result in ["hit", "miss", "busy"] {
        METRICS.peer_requests.with_label_values(&[result]);
    }
    for reason in crate::trust::RefusalReason::ALL {
        METRICS
            .trust_refusals
            .with_label_values(&[reason.as_label()]);
        METRICS
            .models_untrusted
            .with_label_values(&[reason.as_label()]);
    }
    for op in FUSE_OPS {
        METRICS.fuse_seconds.with_label_values(&[op]);
        METRICS.fuse_errors.with_label_values(&[op]);
    }
    for model in models {
        for status in DOWNLOAD_STATUSES {
            METRICS.downloads.with_label_values(&[model, status]);
        }
        METRICS.download_seconds.with_label_values(&[model]);
    }
}

/// Creates the series of one source at 0: its bytes and each `result` its requests can have
/// (`miss` only for a peer). Called where a source's handle is built: at start and at the
/// reload that adds it.
pub fn register_source(name: &str, kind: crate::source::SourceKind) {
    use crate::source::SourceKind;
    use source_result::*;
    METRICS.source_bytes.with_label_values(&[name]);
    // Only a peer can miss.
    let results: &[&str] = match kind {
        SourceKind::Peer => &[OK, ERROR, WRONG_BYTES, MISS],
        SourceKind::Origin => &[OK, ERROR, WRONG_BYTES],
    };
    for result in results {
        METRICS.source_requests.with_label_values(&[name, result]);
    }
}

/// The Prometheus text exposition of every metric.
pub fn render() -> String {
    LazyLock::force(&METRICS);
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&REGISTRY.gather(), &mut buf)
        .expect("text encoding cannot fail");
    String::from_utf8(buf).expect("utf-8")
}

#[cfg(test)]
mod tests {
    use crate::source::SourceKind;

    #[test]
    fn runbook_names_are_exported() {
        super::METRICS.errors.with_label_values(&["source"]).inc();
        super::METRICS
            .downloads
            .with_label_values(&["m@1.0.0", "success"])
            .inc();
        let text = super::render();
        for name in [
            "model_downloads_total",
            "model_errors_total",
            "model_storage_bytes_used",
            "model_storage_capacity_bytes",
            "model_downloads_active",
            "wan_cache_hits_total",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
    }

    #[test]
    fn registered_models_show_every_documented_series_at_zero() {
        super::register_models(["zero@1.0.0"]);
        super::register_source("https://zero.example/m", SourceKind::Origin);
        super::register_source("peer http://10.9.9.9:8000", SourceKind::Peer);
        let text = super::render();
        for line in [
            "model_downloads_total{model=\"zero@1.0.0\",status=\"success\"} 0",
            "model_downloads_total{model=\"zero@1.0.0\",status=\"failed\"} 0",
            "model_download_duration_seconds_bucket{model=\"zero@1.0.0\",le=\"104.8576\"} 0",
            "model_download_duration_seconds_count{model=\"zero@1.0.0\"} 0",
            "model_errors_total{kind=\"read_timeout\"}",
            "model_errors_total{kind=\"store\"}",
            "wan_source_bytes_total{source=\"https://zero.example/m\"} 0",
            "wan_source_requests_total{result=\"error\",source=\"https://zero.example/m\"} 0",
            "wan_source_requests_total{result=\"ok\",source=\"https://zero.example/m\"} 0",
            "wan_source_requests_total{result=\"wrong_bytes\",source=\"https://zero.example/m\"} 0",
            "wan_source_requests_total{result=\"miss\",source=\"peer http://10.9.9.9:8000\"} 0",
            "wan_fuse_errors_total{op=\"listxattr\"}",
            "wan_fuse_request_seconds_count{op=\"statfs\"}",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(line)),
                "{line} missing:\n{text}"
            );
        }
    }

    #[test]
    fn storage_capacity_is_a_gauge_under_a_gauge_name() {
        super::METRICS.storage_capacity.set(10);
        super::METRICS.storage_capacity.set(4);
        let text = super::render();
        assert!(
            text.contains("# TYPE model_storage_capacity_bytes gauge"),
            "{text}"
        );
        assert!(text.contains("model_storage_capacity_bytes 4"), "{text}");
        // promtool: "non-counter metrics should not have \"_total\" suffix".
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let mut words = line.split(' ').skip(2);
            let (name, kind) = (words.next().unwrap(), words.next().unwrap());
            assert!(
                kind == "counter" || !name.ends_with("_total"),
                "{kind} {name} ends in _total"
            );
        }
    }

    #[test]
    fn a_source_that_is_not_a_peer_has_no_miss_series() {
        super::register_source("https://nomiss.example/m", SourceKind::Origin);
        let text = super::render();
        assert!(!text.contains("result=\"miss\",source=\"https://nomiss.example/m\""));
    }
}
