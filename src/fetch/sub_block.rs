//! A small read of a cold `blake3-tree` chunk, answered from its sub-blocks: when the file has
//! an outboard (`chunk::outboard`), the read fetches only the 64 KiB sub-blocks it covers (one
//! ranged request each), verifies each against its value (proven against the chunk's digest
//! first), serves them, and then starts the whole chunk's fetch behind it, which is committed
//! as any chunk is. Without an outboard, or for any read it does not fit, the caller's path is
//! exactly the chunk's (`None` here). Owns nothing but that decision and those requests.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

use crate::chunk::{ChunkHash, ChunkOutboard, VerifiedChunk, outboard_path, read_outboard};
use crate::metrics::METRICS;

use super::{Fetcher, FileCtx, Priority};

/// The most sub-blocks a read is served from: a read that needs more (a large read, or one
/// the kernel widened) is near enough the chunk's own size that the chunk serves it.
const MAX_SUB_BLOCKS: u64 = 4;

impl Fetcher {
    /// Where outboards are looked for (`<sha256>.wanobao`): set once, at wiring, to the
    /// manifest's directory's `outboards/`; unset, no read takes this path.
    pub fn outboards_from(&self, dir: PathBuf) {
        let _ = self.outboards.set(dir);
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
        let dir = self.outboards.get()?;
        let expected = f.verification.chunk(idx)?;
        if f.chunk_hash != ChunkHash::Blake3Tree || self.table().chunk(f.sha256, idx).is_some() {
            return None;
        }
        let layout = f.layout();
        let range = layout.range(idx);
        let path = outboard_path(dir, &f.sha256);
        let (size, r) = (f.size, range.clone());
        let values = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(path).ok()?;
            read_outboard(&file, size, r).ok()?
        })
        .await
        .ok()??;
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
        // The chunk behind the sub-blocks, committed and kept for the reads that follow. At
        // read-ahead priority: no reader waits for it, and the next cold read's sub-blocks
        // must find a free connection.
        drop(self.chunk(file, idx, Priority::ReadAhead, None));
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
