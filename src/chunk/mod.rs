//! Content digests, chunk arithmetic and `VerifiedChunk`.
//!
//! Everything in wanfs is named by a digest: blobs by the whole-file sha256, chunks by their
//! own digest under the file's `ChunkHash` (sha256, or BLAKE3 where the manifest says so).
//! `VerifiedChunk` can only be built by hashing the bytes and comparing with the expected
//! digest, so the type system keeps unverified bytes away from readers and from the cache.
//! A `Filler` does the hashing while a source's bytes land (so no second pass over the chunk
//! is needed), and `VerifiedChunk::verify_landed` takes what it hashed only for the very
//! memory it filled.
//!
//! - `mod.rs`: `Digest`, `ChunkHash`, `Layout` (chunk arithmetic with a head chunk),
//!   `VerifiedChunk`.
//! - `filler.rs`: `Filler` (a request's bytes hashed as they land), `Hashed`, and the BLAKE3
//!   subtree arithmetic that joins parallel parts into a chunk's digest.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

mod filler;

use filler::landed_digest;
pub use filler::{Filler, Hashed, blocks_fit};

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
