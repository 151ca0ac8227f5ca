//! Chunk buffers: [`AlignedBuf`] (page-aligned so a chunk can be written with `O_DIRECT`,
//! 2 MiB-aligned and huge-page backed from 2 MiB), and a pool of them, reused from one chunk
//! fetch to the next.
//!
//! Why: with a fresh 8 MiB buffer per chunk, a cold read spent about 13 % of the daemon's CPU
//! on page faults, the kernel zeroing new pages and `memset` (the allocator maps buffers of
//! 1 MiB and more on their own and unmaps them when freed, see `daemon.rs`). A buffer taken
//! from the pool is already mapped and faulted in.
//!
//! Why reuse is safe:
//! - A buffer goes back to the pool only when the last `Bytes` referencing it drops: the pool
//!   hands out a [`PooledBuf`] that becomes the `Bytes` owner (`Bytes::from_owner`), and its
//!   `Drop` returns the buffer. A reader holding a slice of a chunk keeps the whole buffer out
//!   of the pool, so its bytes cannot be overwritten under it.
//! - A reused buffer is not zeroed. The fetch overwrites every byte of it or fails
//!   (`Source::fetch_into` fills the whole slice or errs), and nothing reaches a reader or the
//!   cache without being hashed first (`VerifiedChunk`), so stale bytes of an earlier chunk
//!   cannot be served even if a source broke that contract.
//!
//! Bound: the pool keeps at most `max_idle` bytes of free buffers (the fetch memory budget,
//! `max_inflight_mib`). Buffers in use are bounded by that budget already (a chunk's permit is
//! held until it is committed), and the pool only allocates when no free buffer fits, so the
//! buffers alive at once stay near the budget: RSS is what it was, minus the churn. Once no
//! buffer has been taken for a while (`trim_if_idle`, run by the fetcher), the free ones are
//! let go, so an idle daemon gives that memory back as it did before the pool, all but a small
//! reserve for head chunks (`with_reserve`: 2 MiB, made at start).

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Free page-aligned buffers, shared by every fetch of one daemon.
#[derive(Clone)]
pub struct BufPool {
    inner: Arc<Inner>,
}

struct Inner {
    free: Mutex<Free>,
    max_idle: usize,
    /// (length, count): free buffers of this length that trimming keeps (`with_reserve`).
    reserve: (usize, usize),
}

struct Free {
    bufs: Vec<AlignedBuf>,
    bytes: usize,
    last_take: Instant,
}

impl BufPool {
    /// A pool that keeps at most `max_idle` bytes of free buffers.
    pub fn new(max_idle: usize) -> BufPool {
        BufPool::with_reserve(max_idle, 0, 0)
    }

    /// The same, with `count` buffers of `len` bytes made (and their pages touched) now and
    /// kept through idle trims.
    ///
    /// Why: a file's first read waits for its head chunk (1 MiB as `wan manifest build` makes
    /// it), and a fresh buffer's first touch sits on that path: 0.6 ms of the ~5 ms of a cold
    /// first MiB on the bench VM, where a page touched for the first time also faults on the
    /// host. Made at start, off any reader's path, they cost `count * len` bytes of RSS.
    pub fn with_reserve(max_idle: usize, len: usize, count: usize) -> BufPool {
        let count = max_idle.checked_div(len).map_or(0, |fit| count.min(fit));
        BufPool {
            inner: Arc::new(Inner {
                free: Mutex::new(Free {
                    bufs: (0..count).map(|_| AlignedBuf::zeroed(len)).collect(),
                    bytes: count * len,
                    last_take: Instant::now(),
                }),
                max_idle,
                reserve: (len, count),
            }),
        }
    }

    /// A buffer of `len` bytes: a free one at least that large if there is one (its contents
    /// are whatever it held last: the caller overwrites every byte), else a new zeroed one.
    pub fn take(&self, len: usize) -> PooledBuf {
        let reused = {
            let mut free = self.inner.free.lock().unwrap();
            free.last_take = Instant::now();
            // The smallest that fits: a file's short last chunk does not take a full-size
            // buffer that the next full chunk would need.
            let best = (free.bufs.iter().enumerate())
                .filter(|(_, b)| b.len() >= len)
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i);
            match best {
                Some(i) => {
                    let b = free.bufs.swap_remove(i);
                    free.bytes -= b.len();
                    Some(b)
                }
                None => {
                    // Nothing fits: free buffers of another size (another chunk size) would
                    // only hold memory, so one makes room for the buffer about to be made
                    // (not one of the reserve: those stay).
                    let reserve = self.inner.reserve.0;
                    let others = (0..free.bufs.len()).filter(|&i| free.bufs[i].len() != reserve);
                    if let Some(i) = others.max_by_key(|&i| free.bufs[i].len()) {
                        let b = free.bufs.swap_remove(i);
                        free.bytes -= b.len();
                    }
                    None
                }
            }
        };
        PooledBuf {
            buf: Some(reused.unwrap_or_else(|| AlignedBuf::zeroed(len))),
            len,
            pool: Arc::downgrade(&self.inner),
        }
    }

    /// Frees every free buffer but the reserve if none was taken for `idle`; returns the
    /// bytes freed.
    pub fn trim_if_idle(&self, idle: Duration) -> usize {
        let mut free = self.inner.free.lock().unwrap();
        if free.last_take.elapsed() < idle {
            return 0;
        }
        let (len, count) = self.inner.reserve;
        let mut kept = 0;
        free.bufs.retain(|b| {
            let keep = b.len() == len && kept < count;
            kept += keep as usize;
            keep
        });
        let freed = free.bytes - kept * len;
        free.bytes = kept * len;
        freed
    }

    /// Runs `trim_if_idle(every)` every `every` on the current tokio runtime, for as long as
    /// the pool exists.
    pub fn spawn_trimmer(&self, every: Duration) {
        let pool = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(inner) = pool.upgrade() else { return };
                BufPool { inner }.trim_if_idle(every);
            }
        });
    }

    /// Bytes held in free buffers.
    pub fn idle_bytes(&self) -> usize {
        self.inner.free.lock().unwrap().bytes
    }
}

/// A buffer from a [`BufPool`], returned to it when dropped (after `freeze`: when the last
/// `Bytes` referencing it drops).
pub struct PooledBuf {
    /// `None` only while being dropped.
    buf: Option<AlignedBuf>,
    /// The bytes in use; the buffer may be larger.
    len: usize,
    /// Weak: buffers outliving the pool (a reply in flight at shutdown) are simply freed.
    pool: Weak<Inner>,
}

impl PooledBuf {
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.buf.as_mut().expect("live buffer").as_mut_slice()[..len]
    }

    /// Shares the buffer without a copy; it returns to the pool when the last clone or slice
    /// of the `Bytes` drops.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf.as_ref().expect("live buffer").as_ref()[..self.len]
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let (Some(buf), Some(pool)) = (self.buf.take(), self.pool.upgrade()) else {
            return;
        };
        let mut free = pool.free.lock().unwrap();
        if free.bytes + buf.len() <= pool.max_idle {
            free.bytes += buf.len();
            free.bufs.push(buf);
        }
    }
}

/// Alignment of chunk buffers: the page size, so a chunk can be written with `O_DIRECT`.
pub const BUF_ALIGN: usize = 4096;

/// Buffers at least this large are 2 MiB-aligned and asked to be backed by huge pages.
const HUGE_PAGE: usize = 2 << 20;

/// A zeroed, page-aligned heap buffer; frozen into `Bytes` without a copy.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access is read-only (`AsRef`), like a Vec<u8>.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn layout(len: usize) -> std::alloc::Layout {
        let align = if len >= HUGE_PAGE {
            HUGE_PAGE
        } else {
            BUF_ALIGN
        };
        std::alloc::Layout::from_size_align(len.max(1), align).expect("valid layout")
    }

    pub fn zeroed(len: usize) -> AlignedBuf {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc(layout) };
        let ptr =
            std::ptr::NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        if len >= HUGE_PAGE {
            // Chunk buffers are pinned page by page twice per chunk (the FUSE reply's
            // `writev` and the `O_DIRECT` commit); backed by 2 MiB pages, that is 512× fewer
            // pages to pin. Advisory: where THP is off this changes nothing.
            // SAFETY: the range is this allocation, 2 MiB-aligned; MADV_HUGEPAGE changes no
            // contents.
            unsafe {
                libc::madvise(raw.cast(), len / HUGE_PAGE * HUGE_PAGE, libc::MADV_HUGEPAGE);
            }
        }
        // Zeroed after the advice, so the first touch already faults in huge pages.
        // SAFETY: raw is valid for len bytes (allocated above).
        unsafe { std::ptr::write_bytes(raw, 0, len) };
        AlignedBuf { ptr, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes and uniquely borrowed through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes for as long as self lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this same layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn a_returned_buffer_is_reused_and_stays_aligned() {
        let pool = BufPool::new(4 * MIB);
        let mut b = pool.take(MIB);
        b.as_mut_slice().fill(7);
        let frozen = b.freeze();
        let p = frozen.as_ptr();
        assert_eq!(p as usize % BUF_ALIGN, 0);
        drop(frozen);
        assert_eq!(pool.idle_bytes(), MIB);
        let mut again = pool.take(MIB);
        assert_eq!(again.as_mut_slice().as_ptr(), p);
        assert_eq!(pool.idle_bytes(), 0);
    }

    #[test]
    fn a_buffer_is_not_reused_while_a_reader_holds_a_slice() {
        let pool = BufPool::new(4 * MIB);
        let mut b = pool.take(MIB);
        b.as_mut_slice().fill(1);
        let chunk = b.freeze();
        let reply = chunk.slice(4096..8192);
        drop(chunk);
        // The reader's slice still pins the buffer: the next take must get another one, and
        // writing into it must not change what the reader sees.
        assert_eq!(pool.idle_bytes(), 0);
        let mut other = pool.take(MIB);
        assert_ne!(other.as_mut_slice().as_ptr(), chunk_base(&reply));
        other.as_mut_slice().fill(2);
        assert!(reply.iter().all(|&x| x == 1));
        drop(reply);
        assert_eq!(pool.idle_bytes(), MIB);
    }

    fn chunk_base(slice: &Bytes) -> *const u8 {
        slice.as_ptr().wrapping_sub(4096)
    }

    #[test]
    fn stale_bytes_of_a_reused_buffer_never_verify() {
        use crate::chunk::{Digest, VerifiedChunk};
        let pool = BufPool::new(4 * MIB);
        let mut a = pool.take(MIB);
        a.as_mut_slice().fill(0xaa);
        drop(a.freeze());
        // A fetch of chunk B into the same buffer that fails half-way leaves A's bytes behind;
        // were it ever handed to `verify`, the hash would refuse it.
        let want = vec![0xbbu8; MIB];
        let mut b = pool.take(MIB);
        b.as_mut_slice()[..MIB / 2].copy_from_slice(&want[..MIB / 2]);
        assert!(
            VerifiedChunk::verify(
                crate::chunk::ChunkHash::Sha256,
                Digest::of(&want),
                b.freeze()
            )
            .is_err()
        );
    }

    /// The reserve is there from the start, serves a short take such as a head chunk's, is
    /// not evicted for a buffer of another size, survives idle trims, and stays within the
    /// bound.
    #[test]
    fn the_reserve_is_made_at_once_and_kept_through_trims() {
        let pool = BufPool::with_reserve(4 * MIB, MIB, 2);
        assert_eq!(pool.idle_bytes(), 2 * MIB);
        let (a, b) = (pool.take(300_000), pool.take(MIB));
        let reserve = [a.as_ref().as_ptr(), b.as_ref().as_ptr()];
        drop((a, b));
        let chunk = pool.take(2 * MIB); // nothing fits: a new one; the reserve is not evicted
        assert_eq!(pool.idle_bytes(), 2 * MIB);
        drop(chunk);
        assert_eq!(pool.idle_bytes(), 4 * MIB);
        assert_eq!(pool.trim_if_idle(Duration::ZERO), 2 * MIB);
        assert_eq!(pool.idle_bytes(), 2 * MIB);
        let (a, b) = (pool.take(MIB), pool.take(MIB));
        let mut kept = [a.as_ref().as_ptr(), b.as_ref().as_ptr()];
        kept.sort();
        let mut reserve = reserve;
        reserve.sort();
        assert_eq!(kept, reserve, "the trim kept the reserve's own buffers");
        let small = BufPool::with_reserve(MIB, MIB, 3);
        assert_eq!(small.idle_bytes(), MIB, "the reserve stays within max_idle");
        assert_eq!(BufPool::new(MIB).idle_bytes(), 0);
    }

    #[test]
    fn idle_buffers_are_bounded() {
        let pool = BufPool::new(2 * MIB);
        let bufs: Vec<_> = (0..5).map(|_| pool.take(MIB).freeze()).collect();
        drop(bufs);
        assert_eq!(pool.idle_bytes(), 2 * MIB);
        let none = BufPool::new(0);
        drop(none.take(MIB));
        assert_eq!(none.idle_bytes(), 0);
    }

    #[test]
    fn short_takes_use_the_smallest_fit_and_expose_only_their_length() {
        let pool = BufPool::new(8 * MIB);
        let (big, small) = (pool.take(2 * MIB), pool.take(MIB));
        let small_ptr = small.as_ref().as_ptr();
        drop((big, small));
        let short = pool.take(10);
        assert_eq!(short.as_ref().as_ptr(), small_ptr);
        assert_eq!(short.freeze().len(), 10);
        // A size that nothing fits: a new buffer, and a free one of the other size is let go.
        let _huge = pool.take(3 * MIB);
        assert!(pool.idle_bytes() <= MIB);
    }

    #[test]
    fn an_idle_pool_lets_its_buffers_go() {
        let pool = BufPool::new(4 * MIB);
        drop(pool.take(MIB));
        assert_eq!(pool.trim_if_idle(Duration::from_secs(3600)), 0);
        assert_eq!(pool.idle_bytes(), MIB);
        assert_eq!(pool.trim_if_idle(Duration::ZERO), MIB);
        assert_eq!(pool.idle_bytes(), 0);
    }

    #[test]
    fn buffers_outliving_the_pool_are_freed() {
        let pool = BufPool::new(4 * MIB);
        let b = pool.take(MIB).freeze();
        drop(pool);
        drop(b);
    }

    #[test]
    fn large_buffers_are_huge_page_aligned_and_zeroed() {
        let mut b = AlignedBuf::zeroed(HUGE_PAGE + 4096);
        assert_eq!(b.as_mut_slice().as_ptr() as usize % HUGE_PAGE, 0);
        assert!(b.as_mut_slice().iter().all(|x| *x == 0));
        let small = AlignedBuf::zeroed(8192);
        assert!(small.as_ref().iter().all(|x| *x == 0));
    }

    #[test]
    fn aligned_buffers_are_aligned_and_frozen_without_copy() {
        let mut b = AlignedBuf::zeroed(10_000);
        b.as_mut_slice()[9_999] = 7;
        let p = b.as_mut_slice().as_ptr();
        let frozen = b.freeze();
        assert_eq!(frozen.as_ptr(), p);
        assert_eq!(frozen.as_ptr() as usize % BUF_ALIGN, 0);
        assert_eq!((frozen.len(), frozen[9_999], frozen[0]), (10_000, 7, 0));
    }
}
