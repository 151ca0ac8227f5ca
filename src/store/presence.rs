//! The in-memory presence of one blob: a bitmap of its verified chunks, its generation and
//! its last access. Readers consult only this (under `Store::blobs`), never the index, so a
//! cache hit costs a lock and a bit test. No I/O here: the index rows that make a bit durable
//! are written by `store/mod.rs` before the bit is set.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::chunk::Layout;

use super::now_secs;

static GENERATION: AtomicU64 = AtomicU64::new(1);

/// What the cache holds of one blob.
pub(super) struct BlobState {
    pub(super) layout: Layout,
    /// One bit per chunk of `layout`.
    present: Vec<u64>,
    /// How many bits of `present` are set, so `complete` is O(1).
    pub(super) count: u64,
    /// Unique per state ever created: a commit prepared against an evicted (then re-created)
    /// blob finds another generation and is dropped.
    pub(super) generation: u64,
    pub(super) last_access: u64,
    /// `last_access` changed since the index was last told (`flush_access_times`).
    pub(super) access_dirty: bool,
    /// The blob file was created by this process for this state: every byte in it was
    /// written by a commit of this process, so there is nothing on disk to adopt.
    pub(super) fresh: bool,
    /// The complete blob's bytes were hashed whole and matched its name (`checked.rs`).
    /// Cleared with any chunk: only then may it back a passthrough open or a whole-only read.
    pub(super) whole_checked: bool,
    /// Bumped by every chunk cleared: a whole-file check that read the file while this moved
    /// may have hashed bytes that are no longer the blob's, and does not count.
    pub(super) clears: u64,
}

impl BlobState {
    pub(super) fn new(layout: Layout, last_access: u64) -> BlobState {
        BlobState {
            layout,
            present: vec![0; layout.count().div_ceil(64) as usize],
            count: 0,
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
            last_access,
            access_dirty: false,
            fresh: false,
            whole_checked: false,
            clears: 0,
        }
    }
    pub(super) fn has(&self, idx: u64) -> bool {
        idx < self.layout.count() && self.present[(idx / 64) as usize] & (1 << (idx % 64)) != 0
    }
    /// Marks chunk `idx` present; returns the bytes this added (0 if it already was).
    pub(super) fn set(&mut self, idx: u64) -> u64 {
        if idx < self.layout.count() && !self.has(idx) {
            self.present[(idx / 64) as usize] |= 1 << (idx % 64);
            self.count += 1;
            return self.chunk_len(idx);
        }
        0
    }
    /// Marks chunk `idx` absent; returns the bytes this removed (0 if it was not present).
    pub(super) fn clear(&mut self, idx: u64) -> u64 {
        if self.has(idx) {
            self.present[(idx / 64) as usize] &= !(1 << (idx % 64));
            self.count -= 1;
            self.whole_checked = false;
            self.clears += 1;
            return self.chunk_len(idx);
        }
        0
    }
    fn chunk_len(&self, idx: u64) -> u64 {
        let r = self.layout.range(idx);
        r.end - r.start
    }
    pub(super) fn complete(&self) -> bool {
        self.count == self.layout.count()
    }
    pub(super) fn bytes(&self) -> u64 {
        if self.complete() {
            return self.layout.size;
        }
        (0..self.layout.count())
            .filter(|i| self.has(*i))
            .map(|i| self.chunk_len(i))
            .sum()
    }
    pub(super) fn touch(&mut self) {
        let now = now_secs();
        if now != self.last_access {
            self.last_access = now;
            self.access_dirty = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_count_and_bytes_follow_set_and_clear() {
        // 3 chunks of 30 bytes and a last one of 10.
        let mut s = BlobState::new(Layout::new(100, 30), 0);
        assert!(!s.has(0) && s.count == 0 && s.bytes() == 0);
        assert_eq!(s.set(3), 10);
        assert_eq!(s.set(3), 0);
        assert_eq!((s.count, s.bytes()), (1, 10), "setting twice counts once");
        s.set(0);
        assert_eq!((s.count, s.bytes()), (2, 40));
        assert_eq!(s.clear(3), 10);
        assert_eq!(s.clear(3), 0);
        assert_eq!((s.count, s.bytes()), (1, 30), "clearing twice counts once");
        for i in 0..4 {
            s.set(i);
        }
        assert!(s.complete());
        assert_eq!(s.bytes(), 100);
    }

    #[test]
    fn out_of_range_chunks_are_never_present() {
        let mut s = BlobState::new(Layout::new(100, 30), 0);
        s.set(4);
        s.set(1000);
        assert!(!s.has(4) && !s.has(1000) && s.count == 0);
    }

    #[test]
    fn a_bitmap_spans_several_words() {
        let layout = Layout::new(200 * 10, 10);
        let mut s = BlobState::new(layout, 0);
        for i in (0..200).step_by(3) {
            s.set(i);
        }
        assert!((0..200).all(|i| s.has(i) == (i % 3 == 0)));
        assert_eq!(s.count, 67);
    }

    #[test]
    fn generations_are_unique() {
        let a = BlobState::new(Layout::new(10, 10), 0);
        let b = BlobState::new(Layout::new(10, 10), 0);
        assert_ne!(a.generation, b.generation);
    }

    #[test]
    fn touch_marks_the_access_dirty_only_when_it_changes() {
        let mut s = BlobState::new(Layout::new(10, 10), 0);
        s.touch();
        assert!(s.access_dirty && s.last_access > 0);
        s.access_dirty = false;
        let t = s.last_access;
        s.touch();
        // Within the same second: nothing to save (unless the second just turned).
        assert!(!s.access_dirty || s.last_access > t);
    }
}
