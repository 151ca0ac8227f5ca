//! What a validated manifest holds: each `Model` (id, sources, files), each `FileEntry` (size,
//! sha256, chunk grid, `Verification`), the `ModelId` checked once where it is made, the
//! shared `ChunkList` of a file's digests, a `SourceUrl`, and the grid's constants. Nothing
//! here reads text or checks a rule beyond its own type's (`parse`, `rules` do).

use std::fmt;
use std::ops::{Deref, Range};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::valid_id;
use crate::chunk::{ChunkCheck, ChunkHash, Digest, Layout};

/// Default chunk size: 8 MiB. Large enough that a 60 GB model is ~7,000 chunks (index rows,
/// digests in the manifest, requests) and per-request overhead is noise; small enough that one
/// chunk, fetched as parallel 1 MiB parts, reaches a reader in tens of milliseconds even from a
/// slow origin, and that an mmap touching one tensor does not pull in hundreds of MB.
pub const DEFAULT_CHUNK_SIZE: u64 = 8 << 20;

#[derive(Clone, Debug)]
pub struct Model {
    pub id: ModelId,
    pub description: String,
    pub pinned: bool,
    /// In priority order.
    pub sources: Vec<SourceUrl>,
    pub files: Vec<FileEntry>,
}

#[derive(Clone, Debug)]
pub struct FileEntry {
    /// Relative, `/`-separated, no `..`.
    pub path: String,
    pub size: u64,
    pub sha256: Digest,
    pub chunk_size: u64,
    /// Size of the first chunk (`head_size` in the manifest; `chunk_size` when absent).
    pub head_size: u64,
    /// What the chunk digests are taken with (`chunk_hash`; sha256 when absent).
    pub chunk_hash: ChunkHash,
    /// How its bytes are checked before a reader sees them: chunk by chunk, or only whole.
    pub verification: Verification,
}

/// How a file's bytes are checked, which decides how it is fetched: the manifest lists the
/// file's chunk digests (`chunks = [...]`) or it does not.
#[derive(Clone, Debug, PartialEq)]
pub enum Verification {
    /// Each chunk against its digest (under `chunk_hash`): a read fetches only the chunks it
    /// covers, and each reaches a reader as soon as it is checked.
    Chunked(ChunkList),
    /// Only the whole file, against `sha256`: no byte reaches a reader before the whole file
    /// has been fetched and checked (its chunk grid only splits the fetch into requests).
    Whole,
}

impl Verification {
    /// The digest chunk `idx` must have; `None` for a whole-only file, whose chunks have none.
    /// Panics if `idx` is past the file's last chunk.
    pub fn chunk(&self, idx: u64) -> Option<Digest> {
        match self {
            Verification::Chunked(digests) => Some(digests[idx as usize]),
            Verification::Whole => None,
        }
    }

    /// The chunk digests, in order; `None` for a whole-only file.
    pub fn chunks(&self) -> Option<&ChunkList> {
        match self {
            Verification::Chunked(digests) => Some(digests),
            Verification::Whole => None,
        }
    }
}

/// A file's chunk digests, in order: a shared, read-only slice. Cloning is a reference count.
///
/// From a compiled manifest (`crate::compiled`) it is a window on the one digest table read
/// from the cache dir at open, so 500k digests are one allocation, not 100k; from TOML it owns
/// its digests.
#[derive(Clone)]
pub struct ChunkList {
    table: Arc<dyn AsRef<[Digest]> + Send + Sync>,
    start: usize,
    len: usize,
}

impl ChunkList {
    /// Digests `range` of a shared table. Panics if the range is outside it.
    pub fn shared(table: Arc<dyn AsRef<[Digest]> + Send + Sync>, range: Range<usize>) -> ChunkList {
        assert!(range.start <= range.end && range.end <= (*table).as_ref().len());
        ChunkList {
            table,
            start: range.start,
            len: range.end - range.start,
        }
    }
}

impl Deref for ChunkList {
    type Target = [Digest];
    fn deref(&self) -> &[Digest] {
        &(*self.table).as_ref()[self.start..self.start + self.len]
    }
}

impl From<Vec<Digest>> for ChunkList {
    fn from(v: Vec<Digest>) -> ChunkList {
        let len = v.len();
        ChunkList {
            table: Arc::new(v),
            start: 0,
            len,
        }
    }
}

impl FromIterator<Digest> for ChunkList {
    fn from_iter<I: IntoIterator<Item = Digest>>(iter: I) -> ChunkList {
        iter.into_iter().collect::<Vec<_>>().into()
    }
}

impl PartialEq for ChunkList {
    fn eq(&self, other: &ChunkList) -> bool {
        **self == **other
    }
}

impl fmt::Debug for ChunkList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl FileEntry {
    /// How the file is cut into chunks: the aligned layout exactly when its chunks are
    /// `blake3-tree` subtrees, else a head chunk then the grid.
    pub fn layout(&self) -> Layout {
        Layout::of(
            self.chunk_hash.layout_kind(),
            self.size,
            self.chunk_size,
            self.head_size,
        )
    }

    /// How chunk `idx`'s bytes are checked: its digest's hash and, for `blake3-tree`, where
    /// it sits in the file.
    pub fn check(&self, idx: u64) -> ChunkCheck {
        ChunkCheck::of(self.chunk_hash, &self.layout(), idx)
    }
}

/// A small first chunk ends at a multiple of this, so every later chunk starts page-aligned
/// (chunks are committed with `O_DIRECT`).
pub const HEAD_ALIGN: u64 = 4096;

/// The first chunk `wan manifest build` gives a file larger than it: 1 MiB, or a safetensors
/// header rounded up to 1 MiB. A loader's first read (the header) then waits for one 1 MiB
/// chunk, which arrives in about the time of one 1 MiB range request, instead of a whole
/// 8 MiB chunk; later reads stream the usual large chunks.
pub const DEFAULT_HEAD_SIZE: u64 = 1 << 20;

/// Where a model's bytes can be fetched from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SourceUrl {
    /// A directory: `local://dir` (relative to the manifest's directory) or `file:///abs`.
    Dir(PathBuf),
    /// `http(s)://base`: `GET base/path`.
    Http(String),
    /// `hf://org/repo@rev`.
    Hf { repo: String, rev: String },
    /// `s3://bucket/prefix`.
    S3 { bucket: String, prefix: String },
    /// `oci://registry[:port]/repo@sha256:…` or `oci://registry/repo:tag`: an OCI artifact,
    /// one layer per file (`source/oci.rs`). `reference` is the digest or the tag.
    Oci {
        registry: String,
        repo: String,
        reference: String,
    },
}

impl SourceUrl {
    /// Parses a source URL; relative `local://` paths resolve against `base_dir`.
    pub fn parse(url: &str, base_dir: &Path) -> Result<SourceUrl, String> {
        if let Some(rest) = url.strip_prefix("local://") {
            if rest.is_empty() {
                return Err("local:// needs a directory".into());
            }
            return Ok(SourceUrl::Dir(base_dir.join(rest)));
        }
        if let Some(rest) = url.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err("file:// needs an absolute path (file:///dir)".into());
            }
            return Ok(SourceUrl::Dir(PathBuf::from(rest)));
        }
        if url.starts_with("http://") || url.starts_with("https://") {
            let host = url.split("://").nth(1).unwrap_or("");
            if host.is_empty() || host.starts_with('/') {
                return Err("http(s) URL has no host".into());
            }
            return Ok(SourceUrl::Http(url.trim_end_matches('/').to_string()));
        }
        if let Some(rest) = url.strip_prefix("hf://") {
            let (repo, rev) = rest.split_once('@').unwrap_or((rest, "main"));
            if repo.split('/').count() != 2 || repo.split('/').any(str::is_empty) || rev.is_empty()
            {
                return Err("hf:// wants hf://org/repo@revision".into());
            }
            return Ok(SourceUrl::Hf {
                repo: repo.into(),
                rev: rev.into(),
            });
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err("s3:// wants s3://bucket/prefix".into());
            }
            return Ok(SourceUrl::S3 {
                bucket: bucket.into(),
                prefix: prefix.trim_matches('/').into(),
            });
        }
        if let Some(rest) = url.strip_prefix("oci://") {
            return parse_oci(rest);
        }
        Err(
            "unknown source scheme (want local://, file://, http://, https://, hf://, s3://, oci://)"
                .into(),
        )
    }
}

/// `registry[:port]/repo@sha256:<64 hex>` or `registry[:port]/repo[:tag]` (tag `latest` when
/// none is given, as docker reads it). Repository names are the distribution spec's: lower
/// case, digits and `._-/` separators.
fn parse_oci(rest: &str) -> Result<SourceUrl, String> {
    const WANT: &str =
        "oci:// wants oci://registry[:port]/repo@sha256:<digest> or oci://registry[:port]/repo:tag";
    let (registry, path) = rest.split_once('/').ok_or(WANT)?;
    if registry.is_empty() || path.is_empty() {
        return Err(WANT.into());
    }
    let (repo, reference) = match path.split_once('@') {
        Some((repo, digest)) => {
            let hex = digest.strip_prefix("sha256:").ok_or(WANT)?;
            if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return Err(format!(
                    "{WANT} (a digest is sha256: and 64 lower-case hex digits)"
                ));
            }
            (repo, digest)
        }
        None => {
            let last = path.rfind('/').map_or(0, |i| i + 1);
            match path[last..].split_once(':') {
                Some((_, tag)) => (&path[..last + path[last..].find(':').expect("found")], tag),
                None => (path, "latest"),
            }
        }
    };
    let tag_ok = reference.starts_with("sha256:")
        || (!reference.is_empty()
            && reference.len() <= 128
            && reference
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')));
    let repo_ok = !repo.is_empty()
        && repo.split('/').all(|c| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
        });
    if !tag_ok || !repo_ok {
        return Err(format!(
            "{WANT}: {rest:?} is not a repository and a tag or digest"
        ));
    }
    Ok(SourceUrl::Oci {
        registry: registry.into(),
        repo: repo.into(),
        reference: reference.into(),
    })
}

impl fmt::Display for SourceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceUrl::Dir(p) => write!(f, "file://{}", p.display()),
            SourceUrl::Http(u) => f.write_str(u),
            SourceUrl::Hf { repo, rev } => write!(f, "hf://{repo}@{rev}"),
            SourceUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            SourceUrl::Oci {
                registry,
                repo,
                reference,
            } => match reference.starts_with("sha256:") {
                true => write!(f, "oci://{registry}/{repo}@{reference}"),
                false => write!(f, "oci://{registry}/{repo}:{reference}"),
            },
        }
    }
}

/// A model's id, `NAME@X.Y.Z`: checked once, where it is made ([`ModelId::new`], `parse`, serde),
/// so a value of this type is always one the manifest rules accept. It reads and writes as the
/// plain string, and a map keyed by it is looked up by `&str` (`Borrow<str>`).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ModelId(String);

/// Why a string is not a model id.
#[derive(Debug, Clone, thiserror::Error)]
#[error("bad model id {0:?} (want NAME@X.Y.Z, NAME of letters, digits, '_' and '-')")]
pub struct BadModelId(pub String);

impl ModelId {
    /// `id` when it is `^[A-Za-z0-9][A-Za-z0-9_-]*@\d+\.\d+\.\d+$`.
    pub fn new(id: impl Into<String>) -> Result<ModelId, BadModelId> {
        let id = id.into();
        if valid_id(&id) {
            Ok(ModelId(id))
        } else {
            Err(BadModelId(id))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for ModelId {
    type Err = BadModelId;
    fn from_str(s: &str) -> Result<ModelId, BadModelId> {
        ModelId::new(s)
    }
}

impl<'de> Deserialize<'de> for ModelId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ModelId, D::Error> {
        ModelId::new(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// Debug as the string does, so logs and `{:?}` read as they did with a `String` id.
impl fmt::Debug for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl Deref for ModelId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for ModelId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for ModelId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for ModelId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for ModelId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl From<ModelId> for String {
    fn from(id: ModelId) -> String {
        id.0
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// A model id reads and writes as its plain string, and a map keyed by it is looked up by
    /// `&str`.
    #[test]
    fn model_id_is_its_string() {
        let id: ModelId = "t2v-A14B@2.2.0".parse().unwrap();
        assert_eq!(id.to_string(), "t2v-A14B@2.2.0");
        assert_eq!(format!("{id:?}"), r#""t2v-A14B@2.2.0""#);
        assert_eq!(serde_json::to_string(&id).unwrap(), r#""t2v-A14B@2.2.0""#);
        let back: ModelId = serde_json::from_str(r#""t2v-A14B@2.2.0""#).unwrap();
        assert_eq!(back, id);
        let map = BTreeMap::from([(id.clone(), 1)]);
        assert_eq!(map.get("t2v-A14B@2.2.0"), Some(&1));
        assert_eq!(ModelId::new("a@1.0").unwrap_err().0, "a@1.0");
    }
}
