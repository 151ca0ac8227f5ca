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
//! reaches next, so they are the last to give up). A chunk is spent once reads have been
//! served every page of it, from here or from the blob file. A spent chunk that is not being
//! cached (`when_cache_behind = "skip"`) is still kept for `SPENT_GRACE`, or until a new chunk
//! needs its room: the kernel may ask for pages again after they were served (a read racing
//! its own read-ahead), and such a chunk would otherwise be fetched again for them. A cached
//! one is let go at once: a repeated read finds it in the blob file.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::chunk::{Digest, Layout, VerifiedChunk};

pub(super) struct Landed {
    cap: usize,
    ttl: Duration,
    used: usize,
    /// (when it landed, the chunk, which of its pages have been served, whether it is served
    /// without being cached).
    chunks: HashMap<(Digest, u64), (Instant, VerifiedChunk, Served, bool)>,
    /// Uncached chunks every page of which was served, and when; still answered from, counted
    /// in `used`, and the first to give their room to a new chunk.
    spent: HashMap<(Digest, u64), (Instant, VerifiedChunk)>,
    /// Chunks let go after every page was served, and when: read-ahead, which a reader's
    /// last reads of a chunk can still trigger, does not fetch them again for `ttl`.
    done: HashMap<(Digest, u64), Instant>,
}

/// How long a spent chunk is kept for repeated reads when nothing needs its room: the kernel's
/// repeats come within milliseconds.
const SPENT_GRACE: Duration = Duration::from_secs(1);

impl Landed {
    pub(super) fn new(cap: usize, ttl: Duration) -> Landed {
        Landed {
            cap,
            ttl,
            used: 0,
            chunks: HashMap::new(),
            spent: HashMap::new(),
            done: HashMap::new(),
        }
    }

    /// Keeps chunk `idx` of blob `blob`, if there is room once expired entries are gone;
    /// returns whether it is kept. `uncached`: it will not be in the store (skipped).
    pub(super) fn insert(
        &mut self,
        blob: Digest,
        idx: u64,
        chunk: VerifiedChunk,
        uncached: bool,
    ) -> bool {
        if self.chunks.contains_key(&(blob, idx)) {
            return true;
        }
        // Landed again after it was spent: a reader wants it anew, so its pages count afresh.
        if let Some((_, c)) = self.spent.remove(&(blob, idx)) {
            self.used -= c.bytes().len();
        }
        let now = Instant::now();
        let ttl = self.ttl;
        let mut freed = 0;
        self.chunks.retain(|_, (t, c, _, _)| {
            let keep = now.duration_since(*t) < ttl;
            if !keep {
                freed += c.bytes().len();
            }
            keep
        });
        let grace = SPENT_GRACE.min(ttl);
        self.spent.retain(|_, (t, c)| {
            let keep = now.duration_since(*t) < grace;
            if !keep {
                freed += c.bytes().len();
            }
            keep
        });
        self.used -= freed;
        self.done.retain(|_, t| now.duration_since(*t) < ttl);
        let len = chunk.bytes().len();
        // Spent chunks give their room, oldest first, before a new chunk is refused.
        while self.used + len > self.cap {
            let Some((&key, _)) = self.spent.iter().min_by_key(|(_, (t, _))| *t) else {
                return false;
            };
            let (_, c) = self.spent.remove(&key).expect("just found");
            self.used -= c.bytes().len();
        }
        self.used += len;
        let served = Served::new(len);
        self.chunks
            .insert((blob, idx), (now, chunk, served, uncached));
        true
    }

    /// `offset..end` of blob `blob` if one kept chunk covers it and is the chunk the file's
    /// manifest names there (`digests`, the file's chunk list: same digest, so the same bytes,
    /// whatever manifest put it here); the pages it covers count as served.
    pub(super) fn slice(
        &mut self,
        blob: Digest,
        layout: &Layout,
        digests: &[Digest],
        offset: u64,
        end: u64,
    ) -> Option<Bytes> {
        let covering = layout.covering(offset, end - offset);
        if covering.end - covering.start != 1 {
            return None;
        }
        let idx = covering.start;
        let r = layout.range(idx);
        let (a, b) = (offset - r.start, end - r.start);
        let Some((_, c, served, _)) = self.chunks.get_mut(&(blob, idx)) else {
            let (_, c) = self.spent.get(&(blob, idx))?;
            let same =
                c.digest() == digests[idx as usize] && c.bytes().len() as u64 == r.end - r.start;
            return same.then(|| c.bytes().slice(a as usize..b as usize));
        };
        if c.digest() != digests[idx as usize] || c.bytes().len() as u64 != r.end - r.start {
            return None;
        }
        let out = c.bytes().slice(a as usize..b as usize);
        if served.mark(a, b) {
            self.let_go(blob, idx);
        }
        Some(out)
    }

    /// Records `offset..end` of blob `blob` as served to a reader, however it was answered
    /// (from a kept chunk, from the fetch itself, from the blob file); lets each chunk it
    /// covers go once every page of it has been. Pages, not a byte count: the kernel may ask
    /// for a range twice (a read racing its own read-ahead), and a count would then let a
    /// chunk go before its last bytes were read; nor a read reaching a chunk's end, since the
    /// kernel may send a chunk's reads out of order.
    pub(super) fn served(&mut self, blob: Digest, layout: &Layout, offset: u64, end: u64) {
        if self.chunks.is_empty() || offset >= end {
            return;
        }
        for idx in layout.covering(offset, end - offset) {
            let r = layout.range(idx);
            let Some((_, _, served, _)) = self.chunks.get_mut(&(blob, idx)) else {
                continue;
            };
            if served.mark(offset.max(r.start) - r.start, end.min(r.end) - r.start) {
                self.let_go(blob, idx);
            }
        }
    }

    fn let_go(&mut self, blob: Digest, idx: u64) {
        if let Some((_, c, _, uncached)) = self.chunks.remove(&(blob, idx)) {
            let now = Instant::now();
            if uncached {
                self.spent.insert((blob, idx), (now, c));
            } else {
                self.used -= c.bytes().len();
            }
            self.done.insert((blob, idx), now);
        }
    }

    /// Chunk `idx` of `blob`, if kept and it is the one `expected` names with `len` bytes (for
    /// a read across chunks; the caller records what it served with [`Landed::served`]).
    pub(super) fn get(
        &self,
        blob: Digest,
        idx: u64,
        expected: Digest,
        len: u64,
    ) -> Option<VerifiedChunk> {
        let c = match self.chunks.get(&(blob, idx)) {
            Some((_, c, _, _)) => c,
            None => &self.spent.get(&(blob, idx))?.1,
        };
        (c.digest() == expected && c.bytes().len() as u64 == len).then(|| c.clone())
    }

    /// Whether read-ahead should leave chunk `idx` of `blob` alone: it is kept (fetching it
    /// again would be waste: it may be one a reader was served without caching it), or a
    /// reader was just served all of it.
    pub(super) fn holds(&self, blob: Digest, idx: u64) -> bool {
        self.chunks.contains_key(&(blob, idx))
            || self.spent.contains_key(&(blob, idx))
            || self
                .done
                .get(&(blob, idx))
                .is_some_and(|t| t.elapsed() < self.ttl)
    }

    #[cfg(test)]
    fn used(&self) -> usize {
        self.used
    }

    /// Bytes of chunks some page of which no reader has been served yet.
    #[cfg(test)]
    fn unspent(&self) -> usize {
        self.chunks
            .values()
            .map(|(_, c, _, _)| c.bytes().len())
            .sum()
    }
}

/// Which 4 KiB pages of a chunk have been served.
struct Served {
    pages: Vec<u64>,
    left: u64,
}

const PAGE: u64 = 4096;

impl Served {
    fn new(len: usize) -> Served {
        let n = (len as u64).div_ceil(PAGE).max(1);
        Served {
            pages: vec![0; n.div_ceil(64) as usize],
            left: n,
        }
    }

    /// Marks the pages `start..end` touches; returns whether every page is now served.
    fn mark(&mut self, start: u64, end: u64) -> bool {
        for p in start / PAGE..end.div_ceil(PAGE) {
            let (w, b) = ((p / 64) as usize, p % 64);
            if w < self.pages.len() && self.pages[w] & (1 << b) == 0 {
                self.pages[w] |= 1 << b;
                self.left = self.left.saturating_sub(1);
            }
        }
        self.left == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 1024;

    fn chunk(data: &[u8]) -> VerifiedChunk {
        VerifiedChunk::verify(
            crate::chunk::ChunkHash::Sha256,
            Digest::of(data),
            Bytes::copy_from_slice(data),
        )
        .unwrap()
    }

    /// A blob of 4 chunks of 16 KiB (4 pages each).
    fn setup() -> (Digest, Layout, Vec<Vec<u8>>) {
        let data: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 16 * K as usize]).collect();
        (Digest::of(b"blob"), Layout::new(64 * K, 16 * K), data)
    }

    #[test]
    fn serves_slices_and_lets_go_once_every_page_was_served() {
        let (blob, layout, data) = setup();
        let digests: Vec<Digest> = data.iter().map(|d| Digest::of(d)).collect();
        let expected = &digests[..];
        let mut l = Landed::new(1 << 20, Duration::from_secs(60));
        let at = |a: u64, b: u64| (a * K) as usize..(b * K) as usize;
        assert!(l.insert(blob, 1, chunk(&data[1]), false));
        assert_eq!(l.used(), 16 * K as usize);
        let got = l.slice(blob, &layout, expected, 16 * K, 20 * K).unwrap();
        assert_eq!(got, &data[1][at(0, 4)]);
        // Across two chunks, or a chunk not kept: not served from here.
        assert!(l.slice(blob, &layout, expected, 12 * K, 20 * K).is_none());
        assert!(l.slice(blob, &layout, expected, 0, 4 * K).is_none());
        let got = l.slice(blob, &layout, expected, 20 * K, 32 * K).unwrap();
        assert_eq!(got, &data[1][at(4, 16)]);
        assert_eq!(
            l.used(),
            0,
            "serving all of its pages lets a cached chunk go"
        );
        assert!(l.slice(blob, &layout, expected, 16 * K, 20 * K).is_none());
        // One served without being cached is kept for the grace: the kernel asking again for
        // pages it was served is still answered from memory, not by a second fetch.
        assert!(l.insert(blob, 3, chunk(&data[3]), true));
        assert!(l.slice(blob, &layout, expected, 48 * K, 64 * K).is_some());
        assert_eq!(l.unspent(), 0, "serving all of its pages spends it");
        assert_eq!(l.used(), 16 * K as usize, "spent, and kept for the grace");
        let again = l.slice(blob, &layout, expected, 48 * K, 52 * K).unwrap();
        assert_eq!(again, &data[3][at(0, 4)]);
        assert!(l.get(blob, 3, expected[3], 16 * K).is_some());
        assert!(
            l.insert(blob, 3, chunk(&data[3]), true),
            "landed again: counted afresh"
        );
        assert_eq!((l.used(), l.unspent()), (16 * K as usize, 16 * K as usize));
        assert!(l.slice(blob, &layout, expected, 48 * K, 64 * K).is_some());
        // Out of order (the kernel's concurrent reads): the end first, then the start.
        l.insert(blob, 1, chunk(&data[1]), false);
        assert!(l.slice(blob, &layout, expected, 24 * K, 32 * K).is_some());
        assert_eq!(l.unspent(), 16 * K as usize, "half served: still kept");
        assert!(l.slice(blob, &layout, expected, 16 * K, 24 * K).is_some());
        assert_eq!(l.unspent(), 0);
        // The same pages twice (a read racing its read-ahead) do not count twice.
        l.insert(blob, 2, chunk(&data[2]), false);
        for _ in 0..4 {
            assert!(l.slice(blob, &layout, expected, 32 * K, 36 * K).is_some());
        }
        assert!(l.holds(blob, 2), "kept until every page is served");
        assert!(l.slice(blob, &layout, expected, 36 * K, 48 * K).is_some());
        assert_eq!(l.unspent(), 0);
        assert!(l.holds(blob, 2), "just served: read-ahead leaves it alone");
    }

    /// Reads answered from the blob file (across two chunks) count as well: a kept chunk whose
    /// first and last pages only such reads covered is still let go.
    #[test]
    fn reads_answered_elsewhere_count_as_served() {
        let (blob, layout, data) = setup();
        let mut l = Landed::new(1 << 20, Duration::from_secs(60));
        l.insert(blob, 1, chunk(&data[1]), false);
        l.insert(blob, 2, chunk(&data[2]), false);
        // 12..20 KiB spans chunks 0 and 1; 28..36 KiB spans 1 and 2.
        l.served(blob, &layout, 12 * K, 20 * K);
        l.served(blob, &layout, 28 * K, 36 * K);
        assert!(
            l.slice(blob, &layout, &[Digest::of(&data[1]); 4], 20 * K, 28 * K)
                .is_some()
        );
        assert_eq!(
            l.unspent(),
            16 * K as usize,
            "chunk 1 is spent, chunk 2 is not"
        );
        l.served(blob, &layout, 36 * K, 64 * K);
        assert_eq!(l.unspent(), 0);
    }

    #[test]
    fn refuses_a_chunk_the_manifest_does_not_name_there() {
        let (blob, layout, data) = setup();
        let mut l = Landed::new(1 << 20, Duration::from_secs(60));
        l.insert(blob, 2, chunk(&data[2]), false);
        let other = Digest::of(b"something else");
        assert!(
            l.slice(blob, &layout, &[other; 4], 32 * K, 36 * K)
                .is_none()
        );
        // Another layout of the same blob (different chunk size): lengths differ, refused.
        let wide = Layout::new(64 * K, 32 * K);
        let d2 = Digest::of(&data[2]);
        assert!(l.slice(blob, &wide, &[d2; 2], 32 * K, 40 * K).is_none());
    }

    #[test]
    fn bounded_and_expiring() {
        let (blob, _, data) = setup();
        let mut l = Landed::new(32 * K as usize, Duration::from_millis(50));
        assert!(l.insert(blob, 0, chunk(&data[0]), false));
        assert!(l.insert(blob, 1, chunk(&data[1]), false));
        assert!(
            !l.insert(blob, 2, chunk(&data[2]), false),
            "full: the third is not kept"
        );
        assert!(l.holds(blob, 0) && !l.holds(blob, 2));
        std::thread::sleep(Duration::from_millis(60));
        assert!(
            l.insert(blob, 3, chunk(&data[3]), false),
            "expired entries make room"
        );
        assert_eq!(l.used(), 16 * K as usize);
    }

    /// A spent chunk gives its room to a new one, rather than the new one being refused, and
    /// read-ahead still leaves it alone afterwards.
    #[test]
    fn spent_chunks_give_their_room_first() {
        let (blob, layout, data) = setup();
        let digests: Vec<Digest> = data.iter().map(|d| Digest::of(d)).collect();
        let mut l = Landed::new(32 * K as usize, Duration::from_secs(60));
        assert!(l.insert(blob, 0, chunk(&data[0]), true));
        assert!(l.insert(blob, 1, chunk(&data[1]), true));
        assert!(l.slice(blob, &layout, &digests, 0, 16 * K).is_some());
        assert_eq!((l.used(), l.unspent()), (32 * K as usize, 16 * K as usize));
        assert!(
            l.insert(blob, 2, chunk(&data[2]), true),
            "chunk 0's room is taken"
        );
        assert!(l.slice(blob, &layout, &digests, 0, 4 * K).is_none());
        assert!(l.holds(blob, 0), "just served: read-ahead leaves it alone");
        assert!(
            !l.insert(blob, 3, chunk(&data[3]), true),
            "nothing spent is left to give room"
        );
        assert_eq!(l.used(), 32 * K as usize);
    }
}
