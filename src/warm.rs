//! Warm read-ahead: when a complete cached file is opened, its blob is read into the page cache
//! ahead of the reader, with many reads in flight (`mount.warm_readahead`).
//!
//! Why: a warm read is the kernel reading the blob file (FUSE passthrough, or the daemon's
//! preads), one sequential stream whose read-ahead keeps a window or two in flight. A virtio or
//! NVMe disk gives several times that to parallel readers (benches/warm.sh: four streams of the
//! same blob read 1.2–2.7× one, the spread being this machine's disk), which is how
//! mountpoint-s3's cache, reading its blocks in parallel, beat a passthrough read. In passthrough
//! mode the daemon never sees the reads, so it cannot follow the reader: it asks the kernel for
//! the whole file at open (`POSIX_FADV_WILLNEED`, one read-ahead window per call, which
//! returns once the reads are queued), and the reader then finds its pages in memory or in
//! flight. The pages are the blob inode's, the same ones a passthrough read or an mmap maps.
//!
//! Bounded: only files of at least `MIN_SIZE`; at most half of `MemAvailable` per file (page
//! cache the reader did not ask for is reclaimable, but must not push out what others use); one
//! pass per blob per `AGAIN_AFTER` (a loader opens a shard several times); `PASSES` at once.
//! The cost, for a reader touching a few tensors of a large file, is disk reads it did not
//! need; turn it off there.

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::chunk::Digest;

/// Smaller files are read in a window or two by the kernel's own read-ahead.
const MIN_SIZE: u64 = 32 << 20;
/// One `WILLNEED` call: the kernel reads at most one read-ahead window per call anyway.
const STEP: u64 = 8 << 20;
const AGAIN_AFTER: Duration = Duration::from_secs(30);
const PASSES: usize = 2;

pub struct WarmReadAhead {
    enabled: bool,
    rt: tokio::runtime::Handle,
    recent: Mutex<HashMap<Digest, Instant>>,
    passes: Arc<tokio::sync::Semaphore>,
}

impl WarmReadAhead {
    pub fn new(enabled: bool, rt: tokio::runtime::Handle) -> WarmReadAhead {
        WarmReadAhead {
            enabled,
            rt,
            recent: Mutex::new(HashMap::new()),
            passes: Arc::new(tokio::sync::Semaphore::new(PASSES)),
        }
    }

    /// Whether a complete file of `size` bytes gets a pass at open (else its blob need not be
    /// opened for it).
    pub fn wants(&self, size: u64) -> bool {
        self.enabled && size >= MIN_SIZE
    }

    /// Blob `sha` of `size` bytes, complete and checked, was opened through `file`: start its
    /// pass unless one ran lately.
    pub fn opened(&self, sha: Digest, file: &File, size: u64) {
        if !self.wants(size) {
            return;
        }
        {
            let mut recent = self.recent.lock().unwrap();
            let now = Instant::now();
            recent.retain(|_, t| now.duration_since(*t) < AGAIN_AFTER);
            if recent.contains_key(&sha) {
                return;
            }
            recent.insert(sha, now);
        }
        let limit = size.min(mem_available() / 2);
        let Ok(file) = file.try_clone() else {
            return;
        };
        let passes = self.passes.clone();
        self.rt.spawn(async move {
            let Ok(_pass) = passes.acquire_owned().await else {
                return;
            };
            let t0 = Instant::now();
            let r = tokio::task::spawn_blocking(move || advise(&file, limit)).await;
            tracing::debug!(blob = %sha, bytes = limit, seconds = t0.elapsed().as_secs_f64(),
                ok = matches!(r, Ok(Ok(()))), "warm read-ahead queued");
        });
    }
}

/// Asks the kernel to read `0..limit` of `file` into the page cache, one window per call.
fn advise(file: &File, limit: u64) -> nix::Result<()> {
    let mut off = 0;
    while off < limit {
        let len = STEP.min(limit - off);
        nix::fcntl::posix_fadvise(
            file,
            off as i64,
            len as i64,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
        )?;
        off += len;
    }
    Ok(())
}

/// `MemAvailable` from /proc/meminfo, in bytes; 0 where it cannot be read (no read-ahead).
fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| parse_mem_available(&s))
        .unwrap_or(0)
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_available() {
        let m = "MemTotal:       24589800 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(parse_mem_available(m), Some(20_000_000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
        assert!(mem_available() > 0, "this machine has /proc/meminfo");
    }

    #[test]
    fn advises_a_whole_file_and_a_prefix() {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &vec![7u8; (STEP * 2 + 5) as usize]).unwrap();
        advise(&f, STEP * 2 + 5).unwrap();
        advise(&f, 1).unwrap();
        advise(&f, 0).unwrap();
    }

    /// A blob gets one pass per `AGAIN_AFTER`, however often it is opened.
    #[test]
    fn one_pass_per_blob() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let w = WarmReadAhead::new(true, rt.handle().clone());
        let f = tempfile::tempfile().unwrap();
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        w.opened(a, &f, MIN_SIZE);
        w.opened(a, &f, MIN_SIZE);
        w.opened(b, &f, MIN_SIZE - 1);
        let recent = w.recent.lock().unwrap();
        assert!(recent.contains_key(&a) && !recent.contains_key(&b));
        assert_eq!(recent.len(), 1);
        drop(recent);
        let off = WarmReadAhead::new(false, rt.handle().clone());
        off.opened(a, &f, MIN_SIZE);
        assert!(off.recent.lock().unwrap().is_empty());
    }
}
