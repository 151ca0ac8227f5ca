//! `wan manifest build` from a local tree: every regular file hashed in one pass (whole-file
//! sha256, chunk digests under the chosen hash, `blake3-tree` by default on its aligned
//! layout, a small first chunk where it helps) into a
//! model's TOML entry, which is parsed back under the manifest's rules before it is printed.
//! A name the rules refuse refuses the whole build, before anything is hashed.
//! `remote` builds entries from the Hub or S3 with `BuiltFile` and `render_entry`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::rules::PathRules;
use super::{
    DEFAULT_HEAD_SIZE, HEAD_ALIGN, MAX_CHUNK_SIZE, Manifest, ManifestError, Problem, SourceUrl,
    valid_id,
};
use crate::chunk::{
    ChunkCheck, ChunkHash, Digest, Layout, LayoutKind, OUTBOARD_GRAIN, OutboardHasher,
    outboard_path,
};

/// Options for [`build`].
#[derive(Clone)]
pub struct BuildOptions {
    pub id: String,
    pub chunk_size: u64,
    /// The first chunk's size: `None` = [`head_size_for`] per file, `Some(0)` = none (uniform).
    pub head_size: Option<u64>,
    pub sources: Vec<String>,
    /// Omit chunk digests: files are then fetched whole on first read.
    pub whole_only: bool,
    /// What chunk digests are taken with (`blake3-tree` by default: the chunks are cut on
    /// the aligned layout, and a BLAKE3 signature of a file binds its chunk list).
    pub chunk_hash: ChunkHash,
    /// Where each `blake3-tree` file's outboard is written (`<sha256>.wanobao`, see
    /// `chunk::outboard`), from the bytes the build hashes anyway; `None`: none is.
    pub outboards: Option<std::path::PathBuf>,
}

/// The entry `build` prints, serialized by the toml crate so that any name the rules accept
/// (quotes, control characters, any Unicode) comes out as TOML that reads back the same.
#[derive(Serialize)]
struct OutEntry<'a> {
    models: BTreeMap<&'a str, OutModel<'a>>,
}

#[derive(Serialize)]
struct OutModel<'a> {
    description: &'a str,
    sources: OutSources<'a>,
    files: Vec<OutFile>,
}

#[derive(Serialize)]
struct OutSources<'a> {
    priority: &'a [String],
}

#[derive(Serialize)]
struct OutFile {
    path: String,
    size: u64,
    sha256: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    chunk_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    head_size: Option<u64>,
    /// Absent for sha256, so manifests without BLAKE3 read as they always did.
    #[serde(skip_serializing_if = "Option::is_none")]
    chunk_hash: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    chunks: Option<Vec<String>>,
}

impl BuildOptions {
    /// Each file's first-chunk size when the options fix it (whole-only or uniform: the
    /// chunk size; `--head-size N`: N); `None`: taken from the file (a safetensors header).
    pub fn fixed_head(&self) -> Option<u64> {
        match (self.whole_only, self.head_size) {
            (true, _) | (false, Some(0)) => Some(self.chunk_size),
            (false, Some(h)) => Some(h),
            (false, None) => None,
        }
    }

    /// How files of this build are cut: the aligned layout for `blake3-tree` chunks, the
    /// head grid otherwise (a whole-only file has no chunk digests).
    pub fn layout_kind(&self) -> LayoutKind {
        match self.whole_only {
            true => LayoutKind::Head,
            false => self.chunk_hash.layout_kind(),
        }
    }

    /// The layout of a file of `size` bytes with a first chunk of `head`.
    pub fn layout(&self, size: u64, head: u64) -> Layout {
        Layout::of(self.layout_kind(), size, self.chunk_size, head)
    }

    /// The first chunk a file gets when the options do not fix it ([`head_size_from`] its
    /// safetensors header, if any): on the aligned layout, the power of two at or above it
    /// (a 1.5 MB header: a 2 MiB head, then 2, 4, 8 MiB chunks), so the header is still one
    /// chunk.
    pub fn head_from(&self, safetensors_len: Option<[u8; 8]>) -> u64 {
        let head = head_size_from(safetensors_len, self.chunk_size);
        match self.layout_kind() {
            LayoutKind::Head => head,
            LayoutKind::Aligned => head.next_power_of_two().min(self.chunk_size),
        }
    }

    /// The outboard hasher a file of `size` bytes gets: one for a `blake3-tree` chunk list
    /// when [`BuildOptions::outboards`] names a directory.
    pub fn outboard_of(&self, size: u64) -> Option<OutboardHasher> {
        (self.outboards.is_some() && !self.whole_only && self.chunk_hash == ChunkHash::Blake3Tree)
            .then(|| OutboardHasher::new(size, OUTBOARD_GRAIN))
    }

    /// Writes the outboard `hasher` made of the file whose sha256 is `sha` (temp file, then
    /// rename: a reader never sees half of one); nothing for a file of one sub-block.
    pub fn write_outboard(
        &self,
        hasher: Option<OutboardHasher>,
        sha: &Digest,
    ) -> anyhow::Result<()> {
        use anyhow::Context;
        let (Some(dir), Some(bytes)) = (&self.outboards, hasher.and_then(OutboardHasher::finish))
        else {
            return Ok(());
        };
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = outboard_path(dir, sha);
        let tmp = path.with_extension("wanobao.tmp");
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Refuses options no build can use, naming the flag (relative `local://` sources resolve
    /// against `base`).
    pub fn check(&self, base: &Path) -> anyhow::Result<()> {
        use anyhow::bail;
        if !valid_id(&self.id) {
            bail!("bad model id {:?} (want NAME@X.Y.Z)", self.id);
        }
        if self.chunk_size == 0 || self.chunk_size > MAX_CHUNK_SIZE {
            bail!(
                "--chunk-size {} must be positive and at most {MAX_CHUNK_SIZE} (64 MiB: a chunk is held in memory whole)",
                self.chunk_size
            );
        }
        if let Some(h) = self.head_size.filter(|h| *h != 0)
            && (h > self.chunk_size || (h != self.chunk_size && h % HEAD_ALIGN != 0))
        {
            bail!(
                "--head-size {h} must be 0 (none), --chunk-size, or a multiple of {HEAD_ALIGN} below it"
            );
        }
        if self.layout_kind() == LayoutKind::Aligned {
            let head = self
                .head_size
                .filter(|h| *h != 0)
                .unwrap_or(DEFAULT_HEAD_SIZE);
            if !LayoutKind::Aligned.fits(self.chunk_size, head.min(self.chunk_size)) {
                bail!(
                    "--chunk-hash blake3-tree cuts files into aligned BLAKE3 subtrees: --chunk-size ({}) and --head-size ({head}) must be powers of two of at least {} (or build with --chunk-hash blake3)",
                    self.chunk_size,
                    blake3::CHUNK_LEN
                );
            }
        }
        for s in &self.sources {
            SourceUrl::parse(s, base).map_err(|e| anyhow::anyhow!("--source {s:?}: {e}"))?;
        }
        Ok(())
    }
}

/// Hashes every regular file under `dir` and returns the manifest entry as TOML text.
///
/// A file name the manifest rules refuse (a backslash, a newline, a name that is not UTF-8,
/// two names equal under Unicode normalization...) refuses the whole build, naming every such
/// file before anything is hashed: a partial entry would silently leave files out.
pub fn build(dir: &Path, opts: &BuildOptions) -> anyhow::Result<String> {
    use anyhow::Context;
    opts.check(dir)?;
    let mut found = Vec::new();
    walk(dir, dir, &mut found).with_context(|| format!("walking {}", dir.display()))?;
    found.sort();
    let mut rules = PathRules::default();
    let mut problems = Vec::new();
    let mut paths = Vec::new();
    for rel in found {
        let checked = match rel.to_str() {
            Some(p) => rules.check(p).map(|()| p.to_string()),
            None => Err("file name is not UTF-8 (a manifest is UTF-8 text)".into()),
        };
        match checked {
            Ok(p) => paths.push((p, rel)),
            Err(rule) => problems.push(Problem {
                model: opts.id.clone(),
                path: Some(rel.to_string_lossy().into_owned()),
                rule,
            }),
        }
    }
    if !problems.is_empty() {
        return Err(ManifestError::Invalid {
            file: dir.display().to_string(),
            problems,
        }
        .into());
    }
    // No --source: the tree itself, by its absolute path, which means the same wherever the
    // entry's manifest is kept (a `local://` path would depend on that).
    let sources = match &opts.sources[..] {
        [] => {
            let abs = dir
                .canonicalize()
                .with_context(|| format!("resolving {}", dir.display()))?;
            let Some(abs) = abs.to_str() else {
                anyhow::bail!(
                    "{}: not a UTF-8 path, so not a file:// source; name one with --source",
                    abs.display()
                );
            };
            vec![format!("file://{abs}")]
        }
        given => given.to_vec(),
    };
    let mut files = Vec::with_capacity(paths.len());
    for (path, rel) in paths {
        files.push(build_file(dir, path, &rel, opts)?);
    }
    render_entry(&opts.id, &sources, files, dir)
}

/// Hashes one file of a local build.
fn build_file(
    dir: &Path,
    path: String,
    rel: &Path,
    opts: &BuildOptions,
) -> anyhow::Result<BuiltFile> {
    use anyhow::Context;
    let full = dir.join(rel);
    let head = match opts.fixed_head() {
        Some(h) => h,
        None => safetensors_len(&full)
            .map(|len| opts.head_from(len))
            .with_context(|| format!("reading {}", full.display()))?,
    };
    // A whole-only entry lists no chunk digests: no chunk hash of every byte for it.
    let hash = (!opts.whole_only).then_some(opts.chunk_hash);
    let mut outboard = opts.outboard_of(std::fs::metadata(&full)?.len());
    let (size, whole, chunks) =
        hash_file_into(&full, opts.chunk_size, head, hash, outboard.as_mut())
            .with_context(|| format!("hashing {}", full.display()))?;
    opts.write_outboard(outboard, &whole)?;
    Ok(BuiltFile::new(
        path,
        size,
        whole,
        chunks.map(|chunks| (opts.chunk_size, head, opts.chunk_hash, chunks)),
    ))
}

/// One file of a built entry (serialized as its entry: what a published chunk list holds).
#[derive(Serialize)]
#[serde(transparent)]
pub struct BuiltFile {
    out: OutFile,
}

impl BuiltFile {
    /// `chunked`: the chunk size, the first chunk's size, the chunk hash and the chunk
    /// digests; `None` for a whole-only file.
    pub fn new(
        path: String,
        size: u64,
        sha256: Digest,
        chunked: Option<(u64, u64, ChunkHash, Vec<Digest>)>,
    ) -> BuiltFile {
        let (chunk_size, head_size, chunk_hash, chunks) = match chunked {
            // A head only where it cuts something: a file within it is one chunk either way.
            Some((cs, head, hash, chunks)) => (
                Some(cs),
                (head < cs && size > head).then_some(head),
                (hash != ChunkHash::Sha256).then_some(hash.as_str()),
                Some(chunks.iter().map(Digest::to_hex).collect()),
            ),
            None => (None, None, None, None),
        };
        BuiltFile {
            out: OutFile {
                path,
                size,
                sha256: sha256.to_hex(),
                chunk_size,
                head_size,
                chunk_hash,
                chunks,
            },
        }
    }
}

/// The TOML entry of one model, checked by parsing it back under the manifest's rules
/// (relative `local://` sources against `base`).
pub fn render_entry(
    id: &str,
    sources: &[String],
    files: Vec<BuiltFile>,
    base: &Path,
) -> anyhow::Result<String> {
    use anyhow::Context;
    let entry = OutEntry {
        models: BTreeMap::from([(
            id,
            OutModel {
                description: "",
                sources: OutSources { priority: sources },
                files: files.into_iter().map(|f| f.out).collect(),
            },
        )]),
    };
    let text = toml::to_string_pretty(&entry).context("serializing the manifest entry")?;
    // What build writes, check and mount must accept: parse it back under the same rules.
    Manifest::parse(&format!("schema_version = 1\n{text}"), "build output", base)
        .context("manifest build produced an entry the manifest rules refuse")?;
    Ok(text)
}

/// Regular files under `dir` (symlinks followed), relative to `root`, as the OS names them.
fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let meta = std::fs::metadata(&path)?;
        if meta.is_dir() {
            walk(root, &path, out)?;
        } else if meta.is_file() {
            out.push(path.strip_prefix(root)?.to_path_buf());
        }
    }
    Ok(())
}

/// The first-chunk size `build` picks for `path` by default: [`DEFAULT_HEAD_SIZE`], or for a
/// `.safetensors` file its header (8-byte length + JSON) rounded up to a multiple of it;
/// `chunk_size` (no head) when that would not be smaller than a chunk.
pub fn head_size_for(path: &Path, chunk_size: u64) -> std::io::Result<u64> {
    Ok(head_size_from(safetensors_len(path)?, chunk_size))
}

/// A `.safetensors` file's first 8 bytes (its header's length); `None` for another file or
/// one shorter than 8 bytes.
fn safetensors_len(path: &Path) -> std::io::Result<Option<[u8; 8]>> {
    if path.extension().is_some_and(|e| e == "safetensors") {
        let mut len = [0u8; 8];
        if File::open(path)?.read_exact(&mut len).is_ok() {
            return Ok(Some(len));
        }
    }
    Ok(None)
}

/// [`head_size_for`] from a safetensors file's first 8 bytes (`None`: not a safetensors file,
/// or shorter than 8 bytes).
pub fn head_size_from(safetensors_len: Option<[u8; 8]>, chunk_size: u64) -> u64 {
    let head = match safetensors_len {
        Some(len) => u64::from_le_bytes(len)
            .saturating_add(8)
            .div_ceil(DEFAULT_HEAD_SIZE)
            .max(1)
            .saturating_mul(DEFAULT_HEAD_SIZE),
        None => DEFAULT_HEAD_SIZE,
    };
    if head < chunk_size { head } else { chunk_size }
}

/// Returns (size, whole-file sha256, chunk digests under `hash`) in one pass over the file, the
/// first chunk `head` bytes long and the others `chunk_size` (for `blake3-tree`, the aligned
/// layout of them). `hash` `None` (a whole-only entry): no chunk digests, so no second hash of
/// every byte.
pub fn hash_file(
    path: &Path,
    chunk_size: u64,
    head: u64,
    hash: Option<ChunkHash>,
) -> std::io::Result<(u64, Digest, Option<Vec<Digest>>)> {
    hash_file_into(path, chunk_size, head, hash, None)
}

/// [`hash_file`], feeding every byte to `outboard` too, in the same pass.
fn hash_file_into(
    path: &Path,
    chunk_size: u64,
    head: u64,
    hash: Option<ChunkHash>,
    mut outboard: Option<&mut OutboardHasher>,
) -> std::io::Result<(u64, Digest, Option<Vec<Digest>>)> {
    use sha2::{Digest as _, Sha256};
    let mut f = File::open(path)?;
    let mut whole = Sha256::new();
    let mut chunks = hash.map(|_| Vec::new());
    let mut buf = vec![0u8; chunk_size.min(64 << 20) as usize];
    let mut size = 0u64;
    // A `blake3-tree` chunk is hashed as the subtree it is in a file of its size, so that
    // size is taken before reading, and a file that then reads otherwise is an error.
    let kind = hash.map_or(LayoutKind::Head, ChunkHash::layout_kind);
    let expect = match hash {
        Some(ChunkHash::Blake3Tree) => f.metadata()?.len(),
        _ => u64::MAX,
    };
    let layout = Layout::of(kind, expect, chunk_size, head);
    for idx in 0.. {
        // Fill one chunk (or the buffer) completely: chunk digests need exact boundaries.
        let r = layout.range(idx);
        let this_chunk = r.end - r.start;
        if this_chunk == 0 {
            break;
        }
        let mut chunk = hash.map(|h| ChunkCheck::of(h, &layout, idx).hasher());
        let mut in_chunk = 0u64;
        while in_chunk < this_chunk {
            let want = (this_chunk - in_chunk).min(buf.len() as u64) as usize;
            let n = match f.read(&mut buf[..want]) {
                // A signal during a read (NFS mounted `intr`) is no error: read again.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => r?,
            };
            if n == 0 {
                break;
            }
            whole.update(&buf[..n]);
            if let Some(o) = outboard.as_deref_mut() {
                o.update(&buf[..n]);
            }
            if let Some(chunk) = &mut chunk {
                chunk.update(&buf[..n]);
            }
            in_chunk += n as u64;
        }
        if in_chunk == 0 {
            break;
        }
        size += in_chunk;
        if let (Some(chunks), Some(chunk)) = (&mut chunks, chunk) {
            chunks.push(chunk.finalize());
        }
        if in_chunk < this_chunk {
            break;
        }
    }
    if expect != u64::MAX && (size != expect || f.read(&mut [0u8; 1])? != 0) {
        return Err(std::io::Error::other(format!(
            "the file changed while it was hashed ({expect} bytes, then {size} read)"
        )));
    }
    Ok((size, Digest(whole.finalize().into()), chunks))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the tests build with: model `m@1.2.3`, chunks of `chunk_size`, the default head.
    fn options(chunk_size: u64) -> BuildOptions {
        BuildOptions {
            id: "m@1.2.3".into(),
            chunk_size,
            head_size: None,
            sources: vec!["local://x".into()],
            whole_only: false,
            chunk_hash: ChunkHash::Sha256,
            outboards: None,
        }
    }

    #[test]
    fn build_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/w.bin"), vec![7u8; 10]).unwrap();
        std::fs::write(dir.path().join("e"), b"").unwrap();
        let opts = options(4);
        let text = format!("schema_version = 1\n{}", build(dir.path(), &opts).unwrap());
        let m = Manifest::parse(&text, "b", dir.path()).unwrap();
        let files = &m.models["m@1.2.3"].files;
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].path, "e");
        assert_eq!(files[0].verification.chunks().unwrap().len(), 0);
        let w = &files[1];
        assert_eq!((w.size, w.sha256), (10, Digest::of(&[7u8; 10])));
        assert_eq!(w.verification.chunk(2).unwrap(), Digest::of(&[7u8; 2]));
    }
    /// With `blake3-tree` (the CLI's default) files are cut on the aligned layout (a
    /// safetensors header's head rounded up to a power of two), each chunk digest is its
    /// subtree, and a file's chunk list merges into BLAKE3 of the file; sizes that cannot
    /// be aligned are refused naming the flags.
    #[test]
    fn blake3_tree_builds_aligned_chunks_that_merge_into_each_files_blake3() {
        use crate::chunk::blake3_tree_root;
        let dir = tempfile::tempdir().unwrap();
        let mib = 1usize << 20;
        let big: Vec<u8> = (0..3 * mib + 5).map(|i| (i * 7 + i / 4093) as u8).collect();
        std::fs::write(dir.path().join("big.bin"), &big).unwrap();
        let mut st = (1_500_000u64).to_le_bytes().to_vec();
        st.resize(5 * mib, 2);
        std::fs::write(dir.path().join("m.safetensors"), &st).unwrap();
        std::fs::write(dir.path().join("small.bin"), vec![3u8; 1000]).unwrap();
        std::fs::write(dir.path().join("empty"), b"").unwrap();
        let mut opts = options(4 * mib as u64);
        opts.chunk_hash = ChunkHash::Blake3Tree;
        let text = format!("schema_version = 1\n{}", build(dir.path(), &opts).unwrap());
        assert!(text.contains("chunk_hash = \"blake3-tree\""), "{text}");
        let m = Manifest::parse(&text, "b", dir.path()).unwrap();
        let mut heads = Vec::new();
        for f in &m.models["m@1.2.3"].files {
            let data = std::fs::read(dir.path().join(&f.path)).unwrap();
            let layout = f.layout();
            let chunks = f.verification.chunks().unwrap();
            assert_eq!(
                blake3_tree_root(&layout, chunks),
                Some(Digest(*blake3::hash(&data).as_bytes())),
                "{}",
                f.path
            );
            heads.push((f.path.as_str(), f.head_size, chunks.len()));
        }
        let m = mib as u64;
        assert_eq!(
            heads,
            [
                ("big.bin", m, 3),           // 1, 1, then 1 MiB + 5 of the 2 MiB one
                ("empty", 4 * m, 0),         // no head where none cuts
                ("m.safetensors", 2 * m, 3), // header 1.5 MB -> 2 MiB, 2, then 1 of 4
                ("small.bin", 4 * m, 1),
            ]
        );
        opts.chunk_size = 3 * m;
        let e = build(dir.path(), &opts).unwrap_err().to_string();
        assert!(
            e.contains("--chunk-size (3145728)") && e.contains("blake3"),
            "{e}"
        );
        opts.chunk_size = 4 * m;
        opts.head_size = Some(12288);
        let e = build(dir.path(), &opts).unwrap_err().to_string();
        assert!(e.contains("--head-size (12288)"), "{e}");
        opts.head_size = Some(0);
        assert!(!build(dir.path(), &opts).unwrap().contains("head_size"));
    }

    /// By default a large file gets a 1 MiB first chunk, a safetensors file one that holds its
    /// header (rounded up to 1 MiB); the entry reads back with that grid.
    #[test]
    fn build_gives_large_files_a_small_head() {
        let dir = tempfile::tempdir().unwrap();
        let mib = 1usize << 20;
        std::fs::write(dir.path().join("big.bin"), vec![1u8; 3 * mib]).unwrap();
        let mut st = (1_500_000u64).to_le_bytes().to_vec();
        st.resize(4 * mib, 2);
        std::fs::write(dir.path().join("m.safetensors"), &st).unwrap();
        std::fs::write(dir.path().join("small.bin"), vec![3u8; 1000]).unwrap();
        let mut opts = options(2 * mib as u64);
        let text = format!("schema_version = 1\n{}", build(dir.path(), &opts).unwrap());
        let m = Manifest::parse(&text, "b", dir.path()).unwrap();
        let head = |p: &str| {
            let f = m.models["m@1.2.3"]
                .files
                .iter()
                .find(|f| f.path == p)
                .unwrap();
            (f.head_size, f.verification.chunks().unwrap().len())
        };
        assert_eq!(head("big.bin"), (1 << 20, 2));
        assert_eq!(
            head("m.safetensors"),
            (2 << 20, 2),
            "header 1.5 MB -> 2 MiB"
        );
        assert_eq!(head("small.bin"), (2 << 20, 1));
        assert!(
            !text.contains("head_size = 2097152"),
            "no head where none cuts:\n{text}"
        );
        opts.head_size = Some(0);
        let text = build(dir.path(), &opts).unwrap();
        assert!(!text.contains("head_size"), "{text}");
        opts.head_size = Some(1000);
        assert!(
            build(dir.path(), &opts).is_err(),
            "a head not a multiple of 4096"
        );
        opts.head_size = None;
        opts.chunk_size = MAX_CHUNK_SIZE + 4096;
        let e = build(dir.path(), &opts).unwrap_err().to_string();
        assert!(
            e.contains("--chunk-size 67112960") && e.contains("64 MiB"),
            "{e}"
        );
    }
}
