//! Content digests, chunk arithmetic and `VerifiedChunk`.
//!
//! Everything in wanfs is named by a digest: blobs by the whole-file sha256, chunks by their
//! own digest under the file's `ChunkHash` (sha256, or BLAKE3 where the manifest says so).
//! `VerifiedChunk` can only be built by hashing the bytes and comparing with the expected
//! digest, so the type system keeps unverified bytes away from readers and from the cache.
//! A `Filler` does the hashing while a source's bytes land (so no second pass over the chunk
//! is needed), and `VerifiedChunk::verify_landed` takes what it hashed only for the very
//! memory it filled.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};
use bytes::Bytes;
use sha2::{Digest as _, Sha256};

/// A 32-byte digest (sha256, or a BLAKE3 chunk digest): a compiled manifest's digest table is
/// 32-byte records of these (`crate::compiled`).
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
/// Two ways to hash, by how the chunk is fetched:
/// - [`whole`](Filler::whole): one request fills the whole chunk; its digest comes out.
/// - [`blocks`](Filler::blocks): the chunk comes as parts fetched side by side (parallel
///   requests), each a run of whole `block`-byte blocks at a multiple of `block` into the
///   chunk. Each block is hashed as a BLAKE3 subtree of its own (`blake3::hazmat`), and
///   [`VerifiedChunk::verify_landed`] joins the parts' subtrees into the chunk's root, so
///   parts may land in any order and none is read twice. A power-of-two block of at least
///   1 KiB is always a whole subtree of BLAKE3's tree, wherever the chunk ends. sha256 has
///   no tree: parallel parts of a sha256 chunk are hashed after they all landed.
///
/// Why the digest can be trusted to describe the buffer: a source writes only into
/// [`unfilled`](Filler::unfilled), the tail not yet hashed, and [`advance`](Filler::advance)
/// hashes those bytes and moves them behind the cursor, where nothing hands out a `&mut` to
/// them again. [`Hashed`] keeps the address and length of the memory it describes, and
/// [`VerifiedChunk::verify_landed`] re-hashes `Bytes` that are not exactly that memory.
pub struct Filler<'a> {
    buf: &'a mut [u8],
    filled: usize,
    hashing: Hashing,
}

enum Hashing {
    Plain,
    Whole(ChunkHash, ChunkHasher),
    Blocks(Box<Blocks>),
}

struct Blocks {
    size: usize,
    /// Index in the chunk of this part's first block (the one being hashed is
    /// `first + cvs.len()`).
    first: u64,
    cur: blake3::Hasher,
    in_cur: usize,
    cvs: Vec<ChainingValue>,
}

/// What a full [`Filler`] hashed, and which memory that is of. It names the memory by
/// address and length only, and the buffer pool hands the same memory to the next chunk: use
/// it only with the `Bytes` frozen from the buffer it was filled into (as `fetch_range`
/// returns the two together, or keeps them together between rounds), never apart from it.
#[derive(Debug, Clone)]
pub struct Hashed {
    at: usize,
    len: usize,
    kind: HashedKind,
}

#[derive(Debug, Clone)]
enum HashedKind {
    Whole(ChunkHash, Digest),
    /// BLAKE3 chaining values of `block`-byte subtrees, the first at `first * block` bytes
    /// into the chunk.
    Blocks {
        block: usize,
        first: u64,
        cvs: Vec<ChainingValue>,
    },
}

impl Hashed {
    /// The digest of a whole chunk hashed by one filler.
    pub fn digest(&self) -> Option<Digest> {
        match self.kind {
            HashedKind::Whole(_, d) => Some(d),
            HashedKind::Blocks { .. } => None,
        }
    }
}

/// Whether a chunk fetched as parts of `part` bytes can be hashed part by part: BLAKE3,
/// and parts that are whole subtrees (a power of two of at least 1 KiB).
pub fn blocks_fit(hash: ChunkHash, part: usize) -> bool {
    hash == ChunkHash::Blake3 && part.is_power_of_two() && part >= blake3::CHUNK_LEN
}

impl<'a> Filler<'a> {
    /// A filler for a whole chunk, hashed with `hash`.
    pub fn whole(hash: ChunkHash, buf: &'a mut [u8]) -> Filler<'a> {
        Filler {
            buf,
            filled: 0,
            hashing: Hashing::Whole(hash, hash.hasher()),
        }
    }

    /// A filler for the part of a BLAKE3 chunk that starts `offset` bytes into it, hashed as
    /// subtrees of `block` bytes. `offset` must be a multiple of `block`, and `block` must
    /// pass [`blocks_fit`].
    pub fn blocks(block: usize, offset: u64, buf: &'a mut [u8]) -> Filler<'a> {
        assert!(blocks_fit(ChunkHash::Blake3, block) && offset.is_multiple_of(block as u64));
        Filler {
            buf,
            filled: 0,
            hashing: Hashing::Blocks(Box::new(Blocks::new(block, offset))),
        }
    }

    /// A filler that only fills (a caller that verifies otherwise, or not at all).
    pub fn plain(buf: &'a mut [u8]) -> Filler<'a> {
        Filler {
            buf,
            filled: 0,
            hashing: Hashing::Plain,
        }
    }

    /// Where the next bytes go.
    pub fn unfilled(&mut self) -> &mut [u8] {
        &mut self.buf[self.filled..]
    }

    /// The next `n` bytes of [`unfilled`](Filler::unfilled) are written: hash them and move on.
    pub fn advance(&mut self, n: usize) {
        let piece = &self.buf[self.filled..self.filled + n];
        match &mut self.hashing {
            Hashing::Plain => {}
            Hashing::Whole(_, h) => h.update(piece),
            Hashing::Blocks(b) => b.update(piece),
        }
        self.filled += n;
    }

    /// Copies `piece` in at the cursor and [`advance`](Filler::advance)s past it; false (and
    /// nothing written) if it does not fit in what is left.
    pub fn fill(&mut self, piece: &[u8]) -> bool {
        let Some(to) = self.unfilled().get_mut(..piece.len()) else {
            return false;
        };
        to.copy_from_slice(piece);
        self.advance(piece.len());
        true
    }

    /// Bytes written so far.
    pub fn filled(&self) -> usize {
        self.filled
    }

    /// Starts over, for a new attempt at the same bytes.
    pub fn reset(&mut self) {
        self.filled = 0;
        match &mut self.hashing {
            Hashing::Plain => {}
            Hashing::Whole(hash, h) => *h = hash.hasher(),
            Hashing::Blocks(b) => **b = Blocks::new(b.size, b.first * b.size as u64),
        }
    }

    /// What was hashed; `None` unless every byte was written and hashed.
    pub fn finish(self) -> Option<Hashed> {
        if self.filled != self.buf.len() {
            return None;
        }
        let kind = match self.hashing {
            Hashing::Plain => return None,
            Hashing::Whole(hash, h) => HashedKind::Whole(hash, h.finalize()),
            Hashing::Blocks(mut b) => {
                if b.in_cur > 0 {
                    b.cvs.push(b.cur.finalize_non_root());
                }
                if b.cvs.is_empty() {
                    return None;
                }
                HashedKind::Blocks {
                    block: b.size,
                    first: b.first,
                    cvs: b.cvs,
                }
            }
        };
        Some(Hashed {
            at: self.buf.as_ptr() as usize,
            len: self.buf.len(),
            kind,
        })
    }
}

impl Blocks {
    fn new(size: usize, offset: u64) -> Blocks {
        let mut cur = blake3::Hasher::new();
        cur.set_input_offset(offset);
        Blocks {
            size,
            first: offset / size as u64,
            cur,
            in_cur: 0,
            cvs: Vec::new(),
        }
    }

    fn update(&mut self, mut piece: &[u8]) {
        while !piece.is_empty() {
            let take = (self.size - self.in_cur).min(piece.len());
            self.cur.update(&piece[..take]);
            self.in_cur += take;
            piece = &piece[take..];
            if self.in_cur == self.size {
                self.cvs.push(self.cur.finalize_non_root());
                let next = (self.first + self.cvs.len() as u64) * self.size as u64;
                self.cur = blake3::Hasher::new();
                self.cur.set_input_offset(next);
                self.in_cur = 0;
            }
        }
    }
}

/// The chaining value of the subtree of `cvs` (`block`-byte subtrees, the last maybe short),
/// `len` bytes in all, joined as BLAKE3 splits its tree: the left side is the largest power of
/// two below `len`.
fn subtree(cvs: &[ChainingValue], block: u64, len: u64) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let left = left_subtree_len(len);
    let k = (left / block) as usize;
    merge_subtrees_non_root(
        &subtree(&cvs[..k], block, left),
        &subtree(&cvs[k..], block, len - left),
        Mode::Hash,
    )
}

/// The root digest of a chunk of `len` bytes from its `block`-byte subtrees (at least two).
fn root(cvs: &[ChainingValue], block: u64, len: u64) -> Digest {
    let left = left_subtree_len(len);
    let k = (left / block) as usize;
    let h = merge_subtrees_root(
        &subtree(&cvs[..k], block, left),
        &subtree(&cvs[k..], block, len - left),
        Mode::Hash,
    );
    Digest(*h.as_bytes())
}

/// The digest `parts` give for `data`, if they cover exactly its memory, end to end, hashed
/// with `hash`.
fn landed_digest(hash: ChunkHash, data: &[u8], parts: &[Hashed]) -> Option<Digest> {
    let mut at = data.as_ptr() as usize;
    for p in parts {
        if p.at != at {
            return None;
        }
        at += p.len;
    }
    if at != data.as_ptr() as usize + data.len() {
        return None;
    }
    match parts {
        [
            Hashed {
                kind: HashedKind::Whole(h, d),
                ..
            },
        ] => (*h == hash).then_some(*d),
        [first, ..] if hash == ChunkHash::Blake3 => {
            let HashedKind::Blocks { block, .. } = first.kind else {
                return None;
            };
            let mut cvs = Vec::new();
            for p in parts {
                let HashedKind::Blocks {
                    block: b,
                    first: f,
                    cvs: c,
                } = &p.kind
                else {
                    return None;
                };
                // Each part starts at the block after the last one's, and only the chunk's
                // last part may end inside a block.
                if *b != block || cvs.len() as u64 != *f {
                    return None;
                }
                cvs.extend_from_slice(c);
            }
            let all_whole = parts[..parts.len() - 1].iter().all(|p| p.len % block == 0);
            let count_right = cvs.len() == data.len().div_ceil(block);
            (all_whole && count_right && cvs.len() >= 2)
                .then(|| root(&cvs, block as u64, data.len() as u64))
        }
        _ => None,
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
        VerifiedChunk::checked(hash, expected, actual, data)
    }

    /// The same check for bytes that [`Filler`]s hashed as they landed, in `parts` (in the
    /// chunk's order): no second pass, only a comparison (and, for parts hashed as BLAKE3
    /// subtrees, joining them into the root). `parts` must describe exactly the memory of
    /// `data`, end to end; if they do not (none given, a gap, other memory), `data` is hashed
    /// here as [`verify`](VerifiedChunk::verify) does, so a caller's mix-up costs time, never
    /// a wrong byte.
    pub(crate) fn verify_landed(
        hash: ChunkHash,
        expected: Digest,
        data: Bytes,
        parts: &[Hashed],
    ) -> Result<VerifiedChunk, Mismatch> {
        let Some(actual) = landed_digest(hash, &data, parts) else {
            return VerifiedChunk::verify(hash, expected, data);
        };
        VerifiedChunk::checked(hash, expected, actual, data)
    }

    /// `data` as a verified chunk if `actual`, its digest under `hash`, is `expected`.
    fn checked(
        hash: ChunkHash,
        expected: Digest,
        actual: Digest,
        data: Bytes,
    ) -> Result<VerifiedChunk, Mismatch> {
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
    use crate::bufpool::AlignedBuf;
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
            let mut into = Filler::whole(hash, buf.as_mut_slice());
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
            assert_eq!(hashed.digest(), Some(want));
            let bytes = buf.freeze();
            let parts = [hashed];
            let chunk = VerifiedChunk::verify_landed(hash, want, bytes.clone(), &parts).unwrap();
            assert_eq!(chunk.bytes(), &data[..]);
            let other = ChunkHash::ALL.into_iter().find(|h| *h != hash).unwrap();
            let e =
                VerifiedChunk::verify_landed(hash, other.digest(&data), bytes, &parts).unwrap_err();
            assert_eq!((e.hash, e.actual), (hash, want));

            let mut short = vec![0u8; 10];
            let mut into = Filler::whole(hash, &mut short);
            into.advance(9);
            assert!(into.finish().is_none(), "a short buffer has no digest");
            assert!(Filler::plain(&mut short).finish().is_none());
        }
    }

    /// Parts that describe other memory than the bytes given (a copy, a gap) are not trusted:
    /// the bytes are hashed again, so the answer is still right.
    #[test]
    fn landed_parts_of_other_memory_are_hashed_again() {
        let data = vec![5u8; 8192];
        let mut buf = data.clone();
        let mut into = Filler::whole(ChunkHash::Blake3, &mut buf);
        into.unfilled().copy_from_slice(&data);
        into.advance(data.len());
        let hashed = into.finish().unwrap();
        let copy = Bytes::copy_from_slice(&data);
        assert_eq!(
            landed_digest(ChunkHash::Blake3, &copy, std::slice::from_ref(&hashed)),
            None
        );
        assert_eq!(
            landed_digest(ChunkHash::Blake3, &buf, std::slice::from_ref(&hashed)),
            Some(ChunkHash::Blake3.digest(&data))
        );
        // The same memory, but the digest is of the other hash.
        assert_eq!(landed_digest(ChunkHash::Sha256, &buf, &[hashed]), None);
    }

    proptest! {
        /// A BLAKE3 chunk fetched as parallel parts (runs of whole blocks, landing in pieces
        /// of any size) verifies exactly when its bytes are right.
        #[test]
        fn parts_hashed_as_subtrees_join_into_the_chunks_digest(
            len in 2049usize..200_000,
            block_log in 10u32..15,
            run in 1usize..4,
            pieces in proptest::collection::vec(1usize..9000, 1..8),
            flip in proptest::option::of(0usize..200_000),
        ) {
            let block = 1usize << block_log;
            prop_assume!(len > block);
            let data: Vec<u8> = (0..len).map(|i| (i * 31 + i / 977) as u8).collect();
            let mut buf = AlignedBuf::zeroed(len);
            let part = block * run;
            let mut landed = Vec::new();
            for (i, slice) in buf.as_mut_slice().chunks_mut(part).enumerate() {
                let off = i * part;
                let mut into = Filler::blocks(block, off as u64, slice);
                let mut k = 0;
                while into.filled() < into.buf.len() {
                    let n = pieces[k % pieces.len()].min(into.buf.len() - into.filled());
                    let at = off + into.filled();
                    into.unfilled()[..n].copy_from_slice(&data[at..at + n]);
                    if let Some(f) = flip.filter(|f| (at..at + n).contains(f)) {
                        into.unfilled()[f - at] ^= 1;
                    }
                    into.advance(n);
                    k += 1;
                }
                landed.push(into.finish().expect("full"));
            }
            let want = ChunkHash::Blake3.digest(&data);
            let got = VerifiedChunk::verify_landed(ChunkHash::Blake3, want, buf.freeze(), &landed);
            let flipped = flip.is_some_and(|f| f < len);
            prop_assert_eq!(got.is_ok(), !flipped);
            if let Err(e) = got {
                prop_assert_ne!(e.actual, want);
            }
        }
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
