//! Content digests, chunk arithmetic and `VerifiedChunk`.
//!
//! Everything in wanfs is named by a digest: blobs by the whole-file sha256, chunks by their
//! own digest under the file's `ChunkHash` (sha256, or BLAKE3 where the manifest says so).
//! `VerifiedChunk` can only be built by hashing the bytes and comparing with the expected
//! digest, so the type system keeps unverified bytes away from readers and from the cache.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

/// A sha256 digest. `repr(transparent)`: a compiled manifest's digest table is 32-byte records
/// mapped from disk and viewed as `[Digest]` (`crate::compiled`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(transparent)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Hashes `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest(Sha256::digest(data).into())
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(HEX[(b >> 4) as usize] as char);
            s.push(HEX[(b & 15) as usize] as char);
        }
        s
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", &self.to_hex()[..12])
    }
}

/// The hash a file's chunk digests are taken with (`chunk_hash` in the manifest). The
/// whole-file digest that names a blob is always sha256 (it is the Hub's LFS oid); chunk
/// digests are only ever compared with bytes of their own file, so each file may pick.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub enum ChunkHash {
    /// The manifest's original form, and what a file without `chunk_hash` uses.
    #[default]
    Sha256,
    /// BLAKE3 (32-byte output): several times sha256's speed per core where AVX-512 or
    /// AVX2 is available and no SHA-NI, about equal on SHA-NI CPUs without AVX-512.
    Blake3,
}

impl ChunkHash {
    pub const ALL: [ChunkHash; 2] = [ChunkHash::Sha256, ChunkHash::Blake3];

    /// Hashes `data`.
    pub fn digest(self, data: &[u8]) -> Digest {
        match self {
            ChunkHash::Sha256 => Digest::of(data),
            ChunkHash::Blake3 => Digest(*blake3::hash(data).as_bytes()),
        }
    }

    /// An incremental hasher, for data that arrives in pieces.
    pub fn hasher(self) -> ChunkHasher {
        match self {
            ChunkHash::Sha256 => ChunkHasher::Sha256(Sha256::new()),
            ChunkHash::Blake3 => ChunkHasher::Blake3(Box::new(blake3::Hasher::new())),
        }
    }

    /// The name the manifest uses.
    pub fn as_str(self) -> &'static str {
        match self {
            ChunkHash::Sha256 => "sha256",
            ChunkHash::Blake3 => "blake3",
        }
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ChunkHash {
    type Err = String;
    fn from_str(s: &str) -> Result<ChunkHash, String> {
        ChunkHash::ALL
            .into_iter()
            .find(|h| h.as_str() == s)
            .ok_or_else(|| format!("unknown chunk_hash {s:?} (want \"sha256\" or \"blake3\")"))
    }
}

/// [`ChunkHash::hasher`]: one of the two, fed piece by piece.
pub enum ChunkHasher {
    Sha256(Sha256),
    Blake3(Box<blake3::Hasher>),
}

impl ChunkHasher {
    pub fn update(&mut self, data: &[u8]) {
        match self {
            ChunkHasher::Sha256(h) => h.update(data),
            ChunkHasher::Blake3(h) => {
                h.update(data);
            }
        }
    }

    pub fn finalize(self) -> Digest {
        match self {
            ChunkHasher::Sha256(h) => Digest(h.finalize().into()),
            ChunkHasher::Blake3(h) => Digest(*h.finalize().as_bytes()),
        }
    }
}

/// A chunk buffer filled front to back by a source, each piece hashed as it lands.
///
/// Why: hashing a chunk after the whole of it arrived reads 8 MiB back from memory that the
/// socket copy wrote moments before and that has left the CPU's cache since; hashing each
/// piece right after the `read` that wrote it finds it in cache. On this project's bench VM
/// that pass was about a tenth of the daemon's CPU on a cold read (docs/DESIGN-NOTES.md).
///
/// Why the digest can be trusted to describe the buffer: a source writes only into
/// [`unfilled`](Filler::unfilled), the tail not yet hashed, and [`advance`](Filler::advance)
/// hashes those bytes and moves them behind the cursor, where nothing hands out a `&mut` to
/// them again. [`Hashed`] keeps the buffer's address and length, and
/// [`VerifiedChunk::verify_hashed`] refuses `Bytes` that are not that same memory.
pub struct Filler<'a> {
    buf: &'a mut [u8],
    filled: usize,
    hash: Option<(ChunkHash, ChunkHasher)>,
}

/// What a full [`Filler`] hashed: its digest, and which memory that digest is of.
#[derive(Debug, Clone, Copy)]
pub struct Hashed {
    hash: ChunkHash,
    digest: Digest,
    at: usize,
    len: usize,
}

impl Hashed {
    pub fn digest(&self) -> Digest {
        self.digest
    }
}

impl<'a> Filler<'a> {
    /// A filler that hashes with `hash`.
    pub fn hashing(hash: ChunkHash, buf: &'a mut [u8]) -> Filler<'a> {
        Filler {
            buf,
            filled: 0,
            hash: Some((hash, hash.hasher())),
        }
    }

    /// A filler that only fills (a caller that verifies otherwise, or not at all).
    pub fn plain(buf: &'a mut [u8]) -> Filler<'a> {
        Filler {
            buf,
            filled: 0,
            hash: None,
        }
    }

    /// Where the next bytes go.
    pub fn unfilled(&mut self) -> &mut [u8] {
        &mut self.buf[self.filled..]
    }

    /// The next `n` bytes of [`unfilled`](Filler::unfilled) are written: hash them and move on.
    pub fn advance(&mut self, n: usize) {
        let piece = &self.buf[self.filled..self.filled + n];
        if let Some((_, h)) = &mut self.hash {
            h.update(piece);
        }
        self.filled += n;
    }

    /// Bytes written so far.
    pub fn filled(&self) -> usize {
        self.filled
    }

    /// Every byte written and hashed.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Starts over, for a new attempt at the same bytes.
    pub fn reset(&mut self) {
        self.filled = 0;
        if let Some((hash, h)) = &mut self.hash {
            *h = hash.hasher();
        }
    }

    /// The digest of the whole buffer; `None` unless every byte was written and hashed.
    pub fn finish(self) -> Option<Hashed> {
        let (hash, h) = self.hash?;
        (self.filled == self.buf.len()).then(|| Hashed {
            hash,
            digest: h.finalize(),
            at: self.buf.as_ptr() as usize,
            len: self.buf.len(),
        })
    }
}

/// Why a string is not a digest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a digest (want 64 lowercase hex characters): {0:?}")]
pub struct BadHex(pub String);

impl FromStr for Digest {
    type Err = BadHex;
    fn from_str(s: &str) -> Result<Digest, BadHex> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return Err(BadHex(s.to_string()));
        }
        // A table and one check at the end: a fleet manifest holds over half a million
        // digests, and this was a tenth of parsing it.
        const VAL: [u8; 256] = {
            let mut t = [0xffu8; 256];
            let mut c = 0;
            while c < 10 {
                t[b'0' as usize + c] = c as u8;
                c += 1;
            }
            let mut c = 0;
            while c < 6 {
                t[b'a' as usize + c] = 10 + c as u8;
                c += 1;
            }
            t
        };
        let mut out = [0u8; 32];
        let mut bad = 0u8;
        for (o, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            let (h, l) = (VAL[pair[0] as usize], VAL[pair[1] as usize]);
            bad |= h | l;
            *o = (h << 4) | (l & 0x0f);
        }
        if bad > 0x0f {
            return Err(BadHex(s.to_string()));
        }
        Ok(Digest(out))
    }
}

/// How a file of `size` bytes is cut into chunks: a first ("head") chunk of `head` bytes, then
/// chunks of `chunk_size` (the last may be short). A small head makes the first read of a file
/// (a loader reading a safetensors header) wait for one small chunk instead of a whole large
/// one; `head == chunk_size` is the uniform grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub size: u64,
    pub chunk_size: u64,
    pub head: u64,
}

impl Layout {
    /// The uniform grid.
    pub fn new(size: u64, chunk_size: u64) -> Layout {
        Layout::with_head(size, chunk_size, chunk_size)
    }

    /// A first chunk of `head` bytes (`0 < head <= chunk_size`), then `chunk_size` chunks.
    pub fn with_head(size: u64, chunk_size: u64, head: u64) -> Layout {
        assert!(chunk_size > 0, "chunk_size must be positive");
        assert!(
            head > 0 && head <= chunk_size,
            "head must be in (0, chunk_size]"
        );
        Layout {
            size,
            chunk_size,
            head,
        }
    }

    /// Number of chunks; an empty file has none.
    pub fn count(&self) -> u64 {
        match self.size {
            0 => 0,
            s if s <= self.head => 1,
            s => 1 + (s - self.head).div_ceil(self.chunk_size),
        }
    }

    /// Byte range of chunk `idx` within the file.
    pub fn range(&self, idx: u64) -> Range<u64> {
        let start = match idx {
            0 => 0,
            i => self.head + (i - 1) * self.chunk_size,
        };
        let len = if idx == 0 { self.head } else { self.chunk_size };
        start.min(self.size)..(start + len).min(self.size)
    }

    /// The chunk holding byte `offset` (< size).
    fn index_of(&self, offset: u64) -> u64 {
        if offset < self.head {
            0
        } else {
            1 + (offset - self.head) / self.chunk_size
        }
    }

    /// Chunks covering `offset..offset+len`, clipped to the file.
    pub fn covering(&self, offset: u64, len: u64) -> Range<u64> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return 0..0;
        }
        self.index_of(offset)..self.index_of(end - 1) + 1
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

/// Bytes whose chunk digest (sha256 or BLAKE3) was checked against the one the manifest gives.
#[derive(Clone, Debug)]
pub struct VerifiedChunk {
    digest: Digest,
    data: Bytes,
}

/// Bytes that did not hash to what the manifest says.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("{hash} mismatch: expected {expected}, got {actual}")]
pub struct Mismatch {
    pub hash: ChunkHash,
    pub expected: Digest,
    pub actual: Digest,
}

impl VerifiedChunk {
    /// The only way to make one: hash `data` with `hash` and compare.
    pub fn verify(
        hash: ChunkHash,
        expected: Digest,
        data: Bytes,
    ) -> Result<VerifiedChunk, Mismatch> {
        let actual = hash.digest(&data);
        if actual != expected {
            return Err(Mismatch {
                hash,
                expected,
                actual,
            });
        }
        Ok(VerifiedChunk {
            digest: expected,
            data,
        })
    }

    /// The same check for bytes a [`Filler`] hashed as they landed: no second pass. `data`
    /// must be the very memory that was filled; anything else is re-hashed, so a caller's
    /// mix-up costs time, never a wrong byte.
    pub fn verify_hashed(
        expected: Digest,
        data: Bytes,
        hashed: Hashed,
    ) -> Result<VerifiedChunk, Mismatch> {
        if data.as_ptr() as usize != hashed.at || data.len() != hashed.len {
            debug_assert!(
                false,
                "verify_hashed given bytes other than the ones hashed"
            );
            return VerifiedChunk::verify(hashed.hash, expected, data);
        }
        if hashed.digest != expected {
            return Err(Mismatch {
                hash: hashed.hash,
                expected,
                actual: hashed.digest,
            });
        }
        Ok(VerifiedChunk {
            digest: expected,
            data,
        })
    }

    pub fn digest(&self) -> Digest {
        self.digest
    }

    pub fn bytes(&self) -> &Bytes {
        &self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hex_round_trip_and_rejects() {
        let d = Digest::of(b"abc");
        assert_eq!(
            d.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d.to_hex().parse::<Digest>().unwrap(), d);
        assert!(
            "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD"
                .parse::<Digest>()
                .is_err()
        );
        assert!("abc".parse::<Digest>().is_err());
        assert!("g".repeat(64).parse::<Digest>().is_err());
    }

    #[test]
    fn verify_refuses_wrong_bytes() {
        let good = Bytes::from_static(b"hello");
        let d = Digest::of(&good);
        assert!(VerifiedChunk::verify(ChunkHash::Sha256, d, good.clone()).is_ok());
        assert!(VerifiedChunk::verify(ChunkHash::Sha256, d, Bytes::from_static(b"hellp")).is_err());
        let b3 = ChunkHash::Blake3.digest(&good);
        assert_ne!(b3, d);
        assert!(VerifiedChunk::verify(ChunkHash::Blake3, b3, good.clone()).is_ok());
        assert!(VerifiedChunk::verify(ChunkHash::Sha256, b3, good.clone()).is_err());
        let e = VerifiedChunk::verify(ChunkHash::Blake3, d, good).unwrap_err();
        assert!(e.to_string().starts_with("blake3 mismatch"), "{e}");
        // BLAKE3's published digest of "abc".
        assert_eq!(
            ChunkHash::Blake3.digest(b"abc").to_hex(),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
        let mut h = ChunkHash::Blake3.hasher();
        h.update(b"ab");
        h.update(b"c");
        assert_eq!(h.finalize(), ChunkHash::Blake3.digest(b"abc"));
    }

    /// A chunk filled in pieces and hashed as it lands verifies as one hashed after: with
    /// no second pass, with wrong bytes refused, with a restarted attempt hashed afresh, and
    /// never for a buffer left short.
    #[test]
    fn a_filler_hashes_what_lands_and_only_that() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        for hash in ChunkHash::ALL {
            let mut buf = AlignedBuf::zeroed(data.len());
            let mut into = Filler::hashing(hash, buf.as_mut_slice());
            // A failed attempt wrote garbage, then the retry starts over.
            into.unfilled()[..5000].fill(0xee);
            into.advance(5000);
            into.reset();
            let mut at = 0;
            for n in [1, 4095, 16384, 1, 60_000, 19_519] {
                into.unfilled()[..n].copy_from_slice(&data[at..at + n]);
                into.advance(n);
                at += n;
            }
            assert_eq!(at, data.len());
            let hashed = into.finish().expect("full");
            let want = hash.digest(&data);
            assert_eq!(hashed.digest(), want);
            let bytes = buf.freeze();
            let chunk = VerifiedChunk::verify_hashed(want, bytes.clone(), hashed).unwrap();
            assert_eq!(chunk.bytes(), &data[..]);
            let other = ChunkHash::ALL.into_iter().find(|h| *h != hash).unwrap();
            let e = VerifiedChunk::verify_hashed(other.digest(&data), bytes, hashed).unwrap_err();
            assert_eq!((e.hash, e.actual), (hash, want));

            let mut short = vec![0u8; 10];
            let mut into = Filler::hashing(hash, &mut short);
            into.advance(9);
            assert!(into.finish().is_none(), "a short buffer has no digest");
            assert!(Filler::plain(&mut short).finish().is_none());
        }
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

    #[test]
    fn layout_edges() {
        let l = Layout::new(10, 4);
        assert_eq!(l.count(), 3);
        assert_eq!(l.range(2), 8..10);
        assert_eq!(l.covering(0, 0), 0..0);
        assert_eq!(l.covering(3, 2), 0..2);
        assert_eq!(l.covering(9, 100), 2..3);
        assert_eq!(l.covering(10, 1), 0..0);
        assert_eq!(Layout::new(0, 4).count(), 0);
        let h = Layout::with_head(10, 4, 1);
        assert_eq!(h.count(), 4);
        assert_eq!((h.range(0), h.range(1), h.range(3)), (0..1, 1..5, 9..10));
        assert_eq!(h.covering(0, 2), 0..2);
        assert_eq!(Layout::with_head(1, 4, 2).count(), 1);
    }

    proptest! {
        #[test]
        fn covering_is_exact(size in 0u64..10_000, cs in 1u64..700, head_pct in 1u64..=100, off in 0u64..11_000, len in 0u64..3_000) {
            let head = (cs * head_pct / 100).max(1);
            let l = Layout::with_head(size, cs, head);
            // The chunks tile the file exactly.
            let mut at = 0;
            for i in 0..l.count() {
                let r = l.range(i);
                prop_assert!(r.start == at && r.end > r.start);
                at = r.end;
            }
            prop_assert_eq!(at, size);
            let r = l.covering(off, len);
            let end = (off + len).min(size);
            if off >= end {
                prop_assert!(r.is_empty());
            } else {
                prop_assert!(l.range(r.start).start <= off && off < l.range(r.start).end);
                prop_assert!(l.range(r.end - 1).end >= end && l.range(r.end - 1).start < end);
            }
        }
    }
}
