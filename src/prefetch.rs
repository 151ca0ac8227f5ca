//! Read-ahead: detects sequential reads per open file and decides which chunks to fetch ahead.
//!
//! Design: the kernel already reads ahead within the page cache (up to the mount's
//! `read_ahead_kb`), but a FUSE request for a missing chunk costs a network round trip, so we
//! fetch whole chunks ahead of the reader. Each open handle tracks the last chunk it read; a
//! read that moves on to the next chunk is sequential and doubles the window (1, 2, 4, … up to
//! `readahead_chunks`), any other read resets it to zero (random access, e.g. an mmap touching
//! one tensor, must not drag in the rest of the file). The window starts at zero even at offset
//! 0: a safetensors loader reads the header first and may then jump, so only a reader that
//! actually crosses into the next chunk has shown it is sequential. Read-ahead fetches run at lower priority
//! than on-demand reads (see fetch/mod.rs, "Budgets"). Pure logic; the fetcher does the I/O.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;

use crate::chunk::Layout;

#[derive(Clone, Copy)]
struct Seq {
    last_chunk: u64,
    window: u32,
}

pub struct ReadAhead {
    max_window: u32,
    handles: Mutex<HashMap<u64, Seq>>,
}

impl ReadAhead {
    pub fn new(max_window: u32) -> ReadAhead {
        ReadAhead {
            max_window,
            handles: Mutex::new(HashMap::new()),
        }
    }

    /// Records a read of `offset..offset+len` on handle `fh`; returns chunks to fetch ahead.
    pub fn on_read(&self, fh: u64, layout: Layout, offset: u64, len: u64) -> Range<u64> {
        let covering = layout.covering(offset, len);
        if self.max_window == 0 || covering.is_empty() {
            return 0..0;
        }
        let (first, last) = (covering.start, covering.end - 1);
        let small_head = layout.head < layout.chunk_size;
        let mut handles = self.handles.lock().unwrap();
        let seq = match handles.get(&fh) {
            None => Seq {
                last_chunk: last,
                window: 0,
            },
            Some(s) if first == s.last_chunk || first == s.last_chunk + 1 => Seq {
                last_chunk: last.max(s.last_chunk),
                // Leaving a small head chunk is not yet a sign of a sequential reader: the
                // kernel's own read-ahead of a header read already reaches into chunk 1.
                window: if last > s.last_chunk && !(s.last_chunk == 0 && small_head) {
                    (s.window * 2).clamp(1, self.max_window)
                } else {
                    s.window
                },
            },
            Some(_) => Seq {
                last_chunk: last,
                window: 0,
            },
        };
        handles.insert(fh, seq);
        let start = seq.last_chunk + 1;
        start.min(layout.count())..(start + seq.window as u64).min(layout.count())
    }

    /// Forgets a handle (on release).
    pub fn forget(&self, fh: u64) {
        self.handles.lock().unwrap().remove(&fh);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    #[test]
    fn sequential_reads_grow_the_window() {
        let ra = ReadAhead::new(4);
        let l = Layout::new(100 * MB, 8 * MB);
        assert_eq!(ra.on_read(1, l, 0, MB), 1..1); // a header read fetches nothing ahead
        assert_eq!(ra.on_read(1, l, MB, MB), 1..1); // same chunk: window kept
        assert_eq!(ra.on_read(1, l, 8 * MB, MB), 2..3);
        assert_eq!(ra.on_read(1, l, 16 * MB, MB), 3..5);
        assert_eq!(ra.on_read(1, l, 24 * MB, MB), 4..8);
        assert_eq!(ra.on_read(1, l, 32 * MB, MB), 5..9); // capped at 4
    }

    #[test]
    fn leaving_a_small_head_chunk_does_not_start_read_ahead() {
        let ra = ReadAhead::new(4);
        let l = Layout::with_head(100 * MB, 8 * MB, MB);
        assert_eq!(ra.on_read(1, l, 0, MB), 1..1); // the header read
        assert_eq!(ra.on_read(1, l, MB, MB), 2..2); // the kernel's read-ahead of it
        assert_eq!(ra.on_read(1, l, 9 * MB, MB), 3..4); // a reader moving on: sequential
    }

    #[test]
    fn random_reads_fetch_nothing_ahead() {
        let ra = ReadAhead::new(4);
        let l = Layout::new(100 * MB, 8 * MB);
        assert_eq!(ra.on_read(1, l, 50 * MB, MB), 7..7);
        assert_eq!(ra.on_read(1, l, 10 * MB, MB), 2..2);
        assert_eq!(ra.on_read(2, l, 0, MB), 1..1);
        assert_eq!(ra.on_read(2, l, 8 * MB, MB), 2..3); // handles are independent
    }

    #[test]
    fn window_stops_at_end_of_file_and_can_be_disabled() {
        let l = Layout::new(20 * MB, 8 * MB);
        let ra = ReadAhead::new(8);
        ra.on_read(1, l, 0, MB);
        ra.on_read(1, l, 8 * MB, MB);
        assert_eq!(ra.on_read(1, l, 16 * MB, MB), 3..3);
        assert_eq!(ReadAhead::new(0).on_read(1, l, 0, MB), 0..0);
    }
}
