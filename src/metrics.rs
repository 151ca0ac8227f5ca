//! Counters of the read path, in one place.
//!
//! Plain atomics for now; the control plane exposes them (Prometheus text, `.wan/metrics`).
//! Names here are the ones the exporter will use.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Metrics {
    /// Chunks fetched from a source, verified and committed.
    pub chunks_fetched: AtomicU64,
    /// Bytes fetched from sources (verified or not).
    pub bytes_fetched: AtomicU64,
    /// Chunks or files whose bytes did not match their sha256.
    pub integrity_failures: AtomicU64,
    /// Failed source requests (after which a retry or the next source is tried).
    pub source_errors: AtomicU64,
    /// Reads that failed with EIO because they could not be served in time.
    pub read_timeouts: AtomicU64,
    /// Reads that failed for any other reason.
    pub read_errors: AtomicU64,
    /// FUSE reads served entirely from the cache.
    pub cache_hits: AtomicU64,
    /// FUSE reads that had to wait for at least one fetch.
    pub cache_misses: AtomicU64,
    /// Files completed (every chunk present and verified).
    pub files_completed: AtomicU64,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }
}

/// The process-wide metrics.
pub static METRICS: std::sync::LazyLock<Metrics> = std::sync::LazyLock::new(Metrics::default);
