//! Chunks that landed (fetched and verified) but that no reader has finished with yet.
//!
//! A cold sequential reader asks for a chunk 1 MiB at a time; read-ahead fetches the chunks
//! after it. Without this, every read after a chunk's commit (a few ms after it is verified)
//! went to the blob file, which `O_DIRECT` commits leave out of the page cache: a disk read,
//! a fresh buffer and a copy for bytes that were in memory a moment earlier (a third of the
//! bytes of a cold read, and ~10 % of the daemon's CPU, in perf). Here those reads are served
//! from the verified buffer itself, so a chunk's bytes reach the reader as a `VerifiedChunk`
//! slice, never re-read.
//!
//! Bounded: at most `cap` bytes, entries expire after `ttl` (a reader that went elsewhere), and
//! when full a new chunk is not kept (the oldest entries are the ones a sequential reader
//! reaches next, so they are the last to give up). A chunk is let go when a read reaches its
//! last byte.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::chunk::{Digest, Layout, VerifiedChunk};

pub(super) struct Landed {
    cap: usize,
    ttl: Duration,
    used: usize,
    chunks: HashMap<(Digest, u64), (Instant, VerifiedChunk)>,
}

impl Landed {
    pub(super) fn new(cap: usize, ttl: Duration) -> Landed {
        Landed {
            cap,
            ttl,
            used: 0,
            chunks: HashMap::new(),
        }
    }

    /// Keeps chunk `idx` of blob `blob`, if there is room once expired entries are gone.
    pub(super) fn insert(&mut self, blob: Digest, idx: u64, chunk: VerifiedChunk) {
        let now = Instant::now();
        let ttl = self.ttl;
        let mut freed = 0;
        self.chunks.retain(|_, (t, c)| {
            let keep = now.duration_since(*t) < ttl;
            if !keep {
                freed += c.bytes().len();
            }
            keep
        });
        self.used -= freed;
        let len = chunk.bytes().len();
        if self.used + len > self.cap || self.chunks.contains_key(&(blob, idx)) {
            return;
        }
        self.used += len;
        self.chunks.insert((blob, idx), (now, chunk));
    }

    /// `offset..end` of blob `blob` if one kept chunk covers it and is the chunk the file's
    /// manifest names there (`expected`: same digest, so the same bytes, whatever manifest
    /// put it here). A read that reaches the chunk's end lets it go.
    pub(super) fn slice(
        &mut self,
        blob: Digest,
        layout: &Layout,
        expected: &dyn Fn(u64) -> Digest,
        offset: u64,
        end: u64,
    ) -> Option<Bytes> {
        let covering = layout.covering(offset, end - offset);
        if covering.end - covering.start != 1 {
            return None;
        }
        let idx = covering.start;
        let r = layout.range(idx);
        let key = (blob, idx);
        let (_, c) = self.chunks.get(&key)?;
        if c.digest() != expected(idx) || c.bytes().len() as u64 != r.end - r.start {
            return None;
        }
        let out = c
            .bytes()
            .slice((offset - r.start) as usize..(end - r.start) as usize);
        if end == r.end {
            let (_, c) = self.chunks.remove(&key).expect("just looked up");
            self.used -= c.bytes().len();
        }
        Some(out)
    }

    /// Lets chunk `idx` of `blob` go (a reader was served its last byte another way).
    pub(super) fn let_go(&mut self, blob: Digest, idx: u64) {
        if let Some((_, c)) = self.chunks.remove(&(blob, idx)) {
            self.used -= c.bytes().len();
        }
    }

    #[cfg(test)]
    fn used(&self) -> usize {
        self.used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(data: &[u8]) -> VerifiedChunk {
        VerifiedChunk::verify(
            crate::chunk::ChunkHash::Sha256,
            Digest::of(data),
            Bytes::copy_from_slice(data),
        )
        .unwrap()
    }

    fn setup() -> (Digest, Layout, Vec<Vec<u8>>) {
        let data: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 16]).collect();
        (Digest::of(b"blob"), Layout::new(64, 16), data)
    }

    #[test]
    fn serves_slices_and_lets_go_at_the_chunk_end() {
        let (blob, layout, data) = setup();
        let digests: Vec<Digest> = data.iter().map(|d| Digest::of(d)).collect();
        let expected = |i: u64| digests[i as usize];
        let mut l = Landed::new(1 << 20, Duration::from_secs(60));
        l.insert(blob, 1, chunk(&data[1]));
        assert_eq!(l.used(), 16);
        assert_eq!(
            l.slice(blob, &layout, &expected, 16, 20).unwrap(),
            &data[1][..4]
        );
        // Across two chunks, or a chunk not kept: not served from here.
        assert!(l.slice(blob, &layout, &expected, 12, 20).is_none());
        assert!(l.slice(blob, &layout, &expected, 0, 4).is_none());
        assert_eq!(
            l.slice(blob, &layout, &expected, 20, 32).unwrap(),
            &data[1][4..]
        );
        assert_eq!(l.used(), 0, "reading to the chunk's end lets it go");
        assert!(l.slice(blob, &layout, &expected, 16, 20).is_none());
    }

    #[test]
    fn refuses_a_chunk_the_manifest_does_not_name_there() {
        let (blob, layout, data) = setup();
        let mut l = Landed::new(1 << 20, Duration::from_secs(60));
        l.insert(blob, 2, chunk(&data[2]));
        let other = Digest::of(b"something else");
        assert!(l.slice(blob, &layout, &|_| other, 32, 36).is_none());
        // Another layout of the same blob (different chunk size): lengths differ, refused.
        let wide = Layout::new(64, 32);
        let d2 = Digest::of(&data[2]);
        assert!(l.slice(blob, &wide, &|_| d2, 64 - 32, 40).is_none());
    }

    #[test]
    fn bounded_and_expiring() {
        let (blob, _, data) = setup();
        let mut l = Landed::new(32, Duration::from_millis(50));
        l.insert(blob, 0, chunk(&data[0]));
        l.insert(blob, 1, chunk(&data[1]));
        l.insert(blob, 2, chunk(&data[2]));
        assert_eq!(
            l.used(),
            32,
            "full: the third is not kept, the first two stay"
        );
        assert!(l.chunks.contains_key(&(blob, 0)) && !l.chunks.contains_key(&(blob, 2)));
        std::thread::sleep(Duration::from_millis(60));
        l.insert(blob, 3, chunk(&data[3]));
        assert_eq!(l.used(), 16, "expired entries make room");
        assert!(l.chunks.contains_key(&(blob, 3)));
    }
}
