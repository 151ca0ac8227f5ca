//! A small read of a cold `blake3-tree` chunk, answered from its sub-blocks: when the file has
//! an outboard (`chunk::outboard`), the read fetches only the 64 KiB sub-blocks it covers (one
//! ranged request each), verifies each against its value (proven against the chunk's digest
//! first), serves them, and then fetches the whole chunk behind it once such reads pause,
//! committed as any chunk is. Without an outboard, or for any read it does not fit, the caller's path is
//! exactly the chunk's (`None` here). Owns nothing but that decision and those requests.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;

use crate::chunk::{ChunkHash, ChunkOutboard, Digest, Outboard, VerifiedChunk, outboard_path};
use crate::metrics::METRICS;

use super::{Fetcher, FileCtx, Priority};

/// The most sub-blocks a read is served from: a read that needs more (a large read, or one
/// the kernel widened) is near enough the chunk's own size that the chunk serves it.
const MAX_SUB_BLOCKS: u64 = 4;

/// Outboards kept in memory: 64 MiB holds those of 128 GB of files. Each is read whole at its
/// file's first cold read (512 KiB for a 1 GiB file), because a random read that must first
/// read a 4 KiB piece of it from a cold disk waited milliseconds for it, longer than the
/// sub-block's request.
const OUTBOARDS_KEPT: usize = 64 << 20;

/// Where outboards are found, and those read lately.
pub(super) struct Outboards {
    dir: OnceLock<PathBuf>,
    kept: Mutex<HashMap<Digest, Arc<Outboard>>>,
    /// Files found with no usable outboard, and when: not looked for again for
    /// `ABSENT_RECHECK`, so a cold read of such a file costs no open on the read path.
    absent: Mutex<HashMap<Digest, tokio::time::Instant>>,
    /// When the last sub-block read was served (see [`Fetcher::fetch_behind`]).
    last_read: Mutex<tokio::time::Instant>,
}

impl Default for Outboards {
    fn default() -> Outboards {
        Outboards {
            dir: OnceLock::new(),
            kept: Mutex::new(HashMap::new()),
            absent: Mutex::new(HashMap::new()),
            last_read: Mutex::new(tokio::time::Instant::now()),
        }
    }
}

impl Outboards {
    /// The outboard of the file `sha` of `size` bytes, if it has one: from memory, else read
    /// whole (on a blocking thread) and kept.
    async fn get(&self, sha: Digest, size: u64) -> Option<Arc<Outboard>> {
        let dir = self.dir.get()?;
        if let Some(o) = self.kept.lock().expect("not poisoned").get(&sha) {
            return Some(o.clone());
        }
        let now = tokio::time::Instant::now();
        {
            let mut absent = self.absent.lock().expect("not poisoned");
            absent.retain(|_, t| now.duration_since(*t) < ABSENT_RECHECK);
            if absent.contains_key(&sha) {
                return None;
            }
        }
        let path = outboard_path(dir, &sha);
        let read = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(path).ok()?;
            Outboard::read(&file, size).ok()?
        });
        let Some(o) = read.await.ok().flatten() else {
            self.absent.lock().expect("not poisoned").insert(sha, now);
            return None;
        };
        let o = Arc::new(o);
        let mut kept = self.kept.lock().expect("not poisoned");
        let mut held: usize = kept.values().map(|o| o.len_bytes()).sum();
        while held + o.len_bytes() > OUTBOARDS_KEPT
            && let Some(k) = kept.keys().next().copied()
        {
            held -= kept.remove(&k).map_or(0, |o| o.len_bytes());
        }
        kept.insert(sha, o.clone());
        Some(o)
    }
}

/// How long a file found with no outboard is taken to have none (one dropped in later is
/// used from then on).
const ABSENT_RECHECK: Duration = Duration::from_secs(60);

/// How long no sub-block read must have started before the chunks behind them are fetched
/// (see [`Fetcher::fetch_behind`]), and the longest a chunk waits for that.
const QUIET: Duration = Duration::from_millis(50);
const MAX_DEFER: Duration = Duration::from_secs(1);

impl Fetcher {
    /// Fetches chunk `idx` behind the sub-blocks just served, committed and kept like any, once
    /// sub-block reads have paused for [`QUIET`] (at most [`MAX_DEFER`] later), at read-ahead
    /// priority. Started at once, 48 random 4 KiB reads in a row each waited for the fetches
    /// (8 MiB landing, hashed, written) the reads before had started: a 6.8-10.7 ms median,
    /// against 0.21-0.27 ms with no chunk fetched behind (benches/subblock.sh, 2 loaded
    /// cores). A reader that jumps about is served from sub-blocks meanwhile.
    fn fetch_behind(self: &Arc<Self>, file: &Arc<FileCtx>, idx: u64) {
        let this = self.clone();
        let file = file.clone();
        let now = tokio::time::Instant::now();
        *self.outboards.last_read.lock().expect("not poisoned") = now;
        self.rt.spawn(async move {
            let give_up = now + MAX_DEFER;
            loop {
                let last = *this.outboards.last_read.lock().expect("not poisoned");
                let at = (last + QUIET).min(give_up);
                if tokio::time::Instant::now() >= at {
                    break;
                }
                tokio::time::sleep_until(at).await;
            }
            drop(this.chunk(&file, idx, Priority::ReadAhead, None));
        });
    }

    /// Where outboards are looked for (`<sha256>.wanobao`): set once, at wiring, to the
    /// manifest's directory's `outboards/`; unset, no read takes this path.
    pub fn outboards_from(&self, dir: PathBuf) {
        let _ = self.outboards.dir.set(dir);
    }

    /// Bytes `offset..end` of chunk `idx` (missing, and nothing of it in flight or in memory)
    /// from its sub-blocks, verified; `None` where this path does not apply or failed, so the
    /// caller fetches the chunk as always (which reports the failure, if it is one).
    pub(super) async fn read_sub_blocks(
        self: &Arc<Self>,
        file: &Arc<FileCtx>,
        idx: u64,
        offset: u64,
        end: u64,
    ) -> Option<Bytes> {
        let f = &file.entry;
        let expected = f.verification.chunk(idx)?;
        if f.chunk_hash != ChunkHash::Blake3Tree || self.table().chunk(f.sha256, idx).is_some() {
            return None;
        }
        let range = f.layout().range(idx);
        let values = self
            .outboards
            .get(f.sha256, f.size)
            .await?
            .values(range.clone())?;
        let outboard =
            match ChunkOutboard::verify(f.check(idx), range, expected, values.0, values.1) {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(model = %file.model, file = %f.path, chunk = idx, error = %e,
                    "outboard refused: the chunk is fetched whole");
                    return None;
                }
            };
        let blocks = outboard.covering(offset, end);
        if blocks.is_empty() || blocks.end - blocks.start > MAX_SUB_BLOCKS {
            return None;
        }
        let got = futures::future::try_join_all(blocks.map(|i| {
            let b = outboard.block(i);
            let what = format!("{}/{} chunk {idx} sub-block {i}", file.model, f.path);
            self.fetch_verified(file, b.range, b.digest, b.check, Priority::OnDemand, what)
        }))
        .await;
        self.fetch_behind(file, idx);
        let got = match got {
            Ok(got) => got,
            Err(e) => {
                tracing::debug!(model = %file.model, file = %f.path, chunk = idx, error = %e,
                    "sub-block fetch failed: waiting for the whole chunk");
                return None;
            }
        };
        METRICS.sub_block_reads.inc();
        Some(slice(&got, &outboard, offset, end))
    }
}

/// File bytes `offset..end` out of `got`, the verified sub-blocks of `outboard` that cover
/// them, in order: one slice when one sub-block holds them.
fn slice(got: &[VerifiedChunk], outboard: &ChunkOutboard, offset: u64, end: u64) -> Bytes {
    let first = outboard.covering(offset, end).start;
    let at = outboard.block(first).range.start;
    if let [one] = got {
        return one
            .bytes()
            .slice((offset - at) as usize..(end - at) as usize);
    }
    let mut out = Vec::with_capacity((end - offset) as usize);
    let mut pos = at;
    for b in got {
        let len = b.bytes().len() as u64;
        let (s, e) = (offset.max(pos), end.min(pos + len));
        if s < e {
            out.extend_from_slice(&b.bytes()[(s - pos) as usize..(e - pos) as usize]);
        }
        pos += len;
    }
    Bytes::from(out)
}
