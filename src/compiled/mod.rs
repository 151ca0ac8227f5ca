//! The compiled form of a manifest: a binary file in the cache dir, named by the manifest
//! file's sha256, that a restart opens instead of parsing the TOML again.
//!
//! Owns its on-disk format (`<cache_dir>/v1/manifests/<sha256>.bin`), compiling (in a child
//! process, so the parse's transient memory never lands in the daemon's heap; on a reload only
//! the models whose text changed), opening, and pruning old forms. Validation stays in `manifest.rs`: a compiled form is only ever
//! written from a manifest that passed it, and a manifest it refuses is reported by the child
//! exactly as `Manifest::load` words it.
//!
//! The chunk digests (most of a fleet manifest) are a table of 32-byte records, read into
//! memory at open together with the rest (models, sources, paths, sizes), and checked against
//! the trailing checksum as they are read: what the daemon uses is exactly what was checked,
//! and nothing done to the file afterwards (a truncation, a rewrite, a read error) can reach
//! it. A form is trusted only if it is a regular file and its magic, format version, manifest
//! hash, base directory and trailing checksum all match; anything else is compiled again.
//! Files are written to a temp name and renamed into place, so a reader never sees half of one
//! (not synced: a form torn by a crash fails its checksum). A cache where no form can be
//! written still mounts, with the manifest kept in memory. Nothing else touches this
//! directory: GC and eviction work on `blobs/` only.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use sha2::{Digest as _, Sha256};

use crate::chunk::{ChunkHash, Digest, Layout};
use crate::manifest::{
    ChunkList, FileEntry, Manifest, ManifestError, Model, ModelId, SourceUrl, Verification,
    bounds_rule, segments,
};

/// Bumped whenever the layout below changes: a form of another version is compiled again.
pub const FORMAT_VERSION: u32 = 2;
const MAGIC: &[u8; 8] = b"WANMFST\0";
/// magic, version, reserved, manifest sha256, meta length, digest count.
const HEADER_LEN: usize = 8 + 4 + 4 + 32 + 8 + 8;
/// Compiled forms kept besides the one in use: enough to go back and forth between a few
/// manifest versions without a compile, few enough that the directory stays small (a fleet
/// manifest compiles to ~30 MB).
const KEEP: usize = 4;
/// A temp file older than this is left over from a compile that died.
const STALE_TMP_SECS: u64 = 3600;

/// A manifest opened from its compiled form.
pub struct Compiled {
    pub manifest: Manifest,
    /// sha256 of the manifest file's bytes that were compiled.
    pub sha256: Digest,
    /// Per model, a digest of everything the compiled form holds for it: a reload rebuilds
    /// only the models whose fingerprint changed.
    pub fingerprints: BTreeMap<ModelId, Digest>,
    /// Per model, the sha256 of its text in the manifest (see [`segments`]), when the
    /// manifest has the plain shape that allows cutting it by model: the next compile parses
    /// again only the models whose text changed.
    pub texts: BTreeMap<String, Digest>,
    /// Whether an existing compiled form was used (false: compiled just now).
    pub reused: bool,
}

/// Why a compiled form cannot be used (it is then compiled again).
#[derive(Debug, thiserror::Error)]
pub enum CompiledError {
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a compiled manifest (bad magic)")]
    Magic,
    #[error("format version {0}, want {FORMAT_VERSION}")]
    Version(u32),
    #[error("compiled from another manifest")]
    OtherManifest,
    #[error("compiled for another base directory ({0})")]
    OtherBase(String),
    #[error("checksum mismatch (corrupt)")]
    Checksum,
    #[error("malformed: {0}")]
    Malformed(&'static str),
}

/// `<cache_dir>/v1/manifests`.
pub fn dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("v1").join("manifests")
}

fn form_path(dir: &Path, sha256: &Digest) -> PathBuf {
    dir.join(format!("{}.bin", sha256.to_hex()))
}

/// sha256 of a file, read in 1 MiB pieces (a fleet manifest is ~50 MB: never held whole).
pub fn hash_file(path: &Path) -> std::io::Result<Digest> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Digest(h.finalize().into()))
}

/// Where a missing or unusable compiled form is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompileIn {
    /// `wan manifest compile` as a child process (the daemon: see the module doc).
    Child,
    /// This process (tests, where the executable is not `wan`).
    Process,
}

/// The manifest at `path`, from its compiled form in `cache_dir` when there is a good one,
/// else compiled now and then opened. A manifest that fails validation is an error worded as
/// `Manifest::load` words it.
///
/// `prev` names the form in force (a reload): only models whose text changed are parsed.
pub fn load(
    path: &Path,
    cache_dir: &Path,
    how: CompileIn,
    prev: Option<&Digest>,
) -> anyhow::Result<Compiled> {
    let file = path.display().to_string();
    let sha = hash_file(path).map_err(|err| ManifestError::Io {
        file: file.clone(),
        err,
    })?;
    let dir = dir(cache_dir);
    let base = Manifest::base_dir(path);
    match open(&form_path(&dir, &sha), &sha, &base) {
        Ok(mut c) => {
            c.reused = true;
            tracing::info!(manifest = %file, sha256 = %sha, "manifest: using its compiled form");
            keep_newest(&dir, &sha);
            return Ok(c);
        }
        Err(CompiledError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(manifest = %file, sha256 = %sha, reason = %e,
            "manifest: its compiled form is unusable; compiling it again"),
    }
    let t0 = std::time::Instant::now();
    // The child hashes what it parses: if the file changed since we hashed it, its hash names
    // the form it wrote.
    let written = match how {
        CompileIn::Child => compile_in_child(path, &dir, prev)?,
        CompileIn::Process => compile_here(path, &dir, prev)?,
    };
    let Some(sha) = written else {
        return in_memory(path, sha);
    };
    let c = match open(&form_path(&dir, &sha), &sha, &base) {
        Ok(c) => c,
        // The executable on disk may be another wanfs version than this process (upgraded
        // while running) and write another format: compile here instead.
        Err(e) if how == CompileIn::Child => {
            tracing::warn!(manifest = %file, reason = %e,
                "manifest: the form compiled by the child is unusable; compiling in process");
            let Some(sha) = compile_here(path, &dir, prev)? else {
                return in_memory(path, sha);
            };
            open(&form_path(&dir, &sha), &sha, &base)
                .with_context(|| format!("opening the manifest just compiled ({file})"))?
        }
        Err(e) => {
            return Err(e).with_context(|| format!("opening the manifest just compiled ({file})"));
        }
    };
    tracing::info!(manifest = %file, sha256 = %sha, secs = t0.elapsed().as_secs_f64(),
        "manifest: compiled");
    keep_newest(&dir, &sha);
    Ok(c)
}

/// `wan manifest compile`'s exit status when the manifest is good but its form could not be
/// written (a full or read-only cache disk): the daemon then keeps the manifest in memory.
pub const EXIT_NOT_WRITTEN: u8 = 3;

/// [`compile`] in this process; `None` when the manifest is good but the form could not be
/// written.
fn compile_here(path: &Path, dir: &Path, prev: Option<&Digest>) -> anyhow::Result<Option<Digest>> {
    match compile(path, dir, prev) {
        Ok(sha) => Ok(Some(sha)),
        Err(e @ CompileError::Write { .. }) => {
            tracing::warn!(error = %e, "manifest: cannot write its compiled form");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// The manifest parsed into this process's memory, for when no compiled form can be written:
/// a cache disk that is full (or read-only) must not stop a mount. Costs the parse's memory in
/// the daemon and a parse at every start until a form can be written again.
fn in_memory(path: &Path, sha: Digest) -> anyhow::Result<Compiled> {
    tracing::warn!(manifest = %path.display(),
        "manifest: kept in memory without a compiled form; the next start parses it again");
    let manifest = Manifest::load(path)?;
    let (_, _, fingerprints) = encode(&Manifest::base_dir(path), &manifest, &BTreeMap::new());
    Ok(Compiled {
        manifest,
        sha256: sha,
        fingerprints,
        texts: BTreeMap::new(),
        reused: false,
    })
}

/// Runs `wan manifest compile` (this executable) so the parse's peak memory is the child's.
/// Falls back to compiling in this process if the executable cannot be run or fails other
/// than by refusing the manifest (exit status 1).
fn compile_in_child(
    path: &Path,
    dir: &Path,
    prev: Option<&Digest>,
) -> anyhow::Result<Option<Digest>> {
    let exe = std::env::current_exe().ok();
    let out = exe.and_then(|exe| {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new(exe);
        // As `wan` whatever the file is called (`mount.fuse.wan` would start the helper).
        cmd.arg0("wan")
            .args(["manifest", "compile"])
            .arg(path)
            .arg("--out")
            .arg(dir);
        if let Some(prev) = prev {
            cmd.arg("--prev").arg(prev.to_hex());
        }
        cmd.stdin(std::process::Stdio::null()).output().ok()
    });
    let Some(out) = out else {
        tracing::warn!("cannot run this executable to compile the manifest; compiling in process");
        return compile_here(path, dir, prev);
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => {}
        // The child printed the manifest's problems as `Manifest::load` words them.
        Some(1) => anyhow::bail!("{}", stderr.trim_end()),
        Some(c) if c == i32::from(EXIT_NOT_WRITTEN) => {
            tracing::warn!(error = %stderr.trim_end(), "manifest: cannot write its compiled form");
            return Ok(None);
        }
        // Killed, or an executable that does not know the command (another version on disk):
        // the manifest may be fine, so compile here rather than refuse it.
        _ => {
            tracing::warn!(status = %out.status, stderr = %stderr.trim_end(),
                "manifest compile in a child failed; compiling in process");
            return compile_here(path, dir, prev);
        }
    }
    stdout
        .trim()
        .parse::<Digest>()
        .map(Some)
        .map_err(|e| anyhow::anyhow!("manifest compile printed no digest ({e}); {stderr}"))
}

/// Why `compile` failed: the manifest itself, or writing its compiled form.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("writing the compiled manifest in {dir}: {err}")]
    Write { dir: String, err: std::io::Error },
}

/// Parses and validates the manifest at `path` and writes its compiled form into `dir`;
/// returns the sha256 of the bytes parsed (the form's name). `wan manifest compile` runs this.
///
/// A text that cuts cleanly by model ([`segments`]) is parsed one model at a time, on all
/// cores, and with `prev` (the form of the manifest in force) only the models whose text
/// changed are parsed at all, the others taken from `prev`; the rule that spans models
/// (identical content described identically) is then checked on the result. Anything else (a
/// problem, a shape that does not cut) parses the whole text as one, so errors are always
/// those of a full parse.
pub fn compile(path: &Path, dir: &Path, prev: Option<&Digest>) -> Result<Digest, CompileError> {
    let file = path.display().to_string();
    let text = std::fs::read(path).map_err(|err| ManifestError::Io {
        file: file.clone(),
        err,
    })?;
    let sha = Digest::of(&text);
    let text = String::from_utf8(text).map_err(|e| ManifestError::Io {
        file: file.clone(),
        err: std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()),
    })?;
    let base = Manifest::base_dir(path);
    let segs = segments(&text);
    let texts: BTreeMap<String, Digest> = segs
        .iter()
        .flatten()
        .map(|(id, seg)| (id.clone(), Digest::of(seg.as_bytes())))
        .collect();
    let old = prev.and_then(|prev| open(&form_path(dir, prev), prev, &base).ok());
    let partial = segs
        .as_ref()
        .and_then(|segs| assemble(old.as_ref(), segs, &texts, &file, &base));
    drop(old);
    let manifest = match partial {
        Some(m) => m,
        None => Manifest::parse(&text, &file, &base)?,
    };
    drop(segs);
    drop(text);
    write(dir, &sha, &base, &manifest, &texts).map_err(|err| CompileError::Write {
        dir: dir.display().to_string(),
        err,
    })?;
    Ok(sha)
}

/// The manifest from `old`'s models whose text is unchanged (with an `old` form) and the
/// others parsed one model at a time ([`crate::manifest::parse_models`]); `None` when any of
/// that fails (the caller then parses everything, for exact errors).
fn assemble(
    old: Option<&Compiled>,
    segs: &BTreeMap<String, String>,
    texts: &BTreeMap<String, Digest>,
    file: &str,
    base: &Path,
) -> Option<Manifest> {
    let mut models = BTreeMap::new();
    let mut todo = Vec::new();
    for (id, seg) in segs {
        match old {
            Some(old) if old.texts.get(id).is_some_and(|t| Some(t) == texts.get(id)) => {
                let model = old.manifest.models.get(id.as_str())?.clone();
                models.insert(model.id.clone(), model);
            }
            _ => todo.push(seg.as_str()),
        }
    }
    models.extend(crate::manifest::parse_models(&todo, file, base)?);
    let merged = Manifest { models };
    merged.shared_content_consistent().then_some(merged)
}

/// Serializes `manifest` (compiled from bytes hashing to `sha`, `local://` resolved against
/// `base`) and puts it in place atomically: temp file, then rename.
pub fn write(
    dir: &Path,
    sha: &Digest,
    base: &Path,
    manifest: &Manifest,
    texts: &BTreeMap<String, Digest>,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let (meta, digests, _) = encode(base, manifest, texts);
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&sha.0);
    header.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    header.extend_from_slice(&(digests.len() as u64).to_le_bytes());
    let mut sum = Sha256::new();
    let tmp = dir.join(format!(".tmp-{}-{}", sha.to_hex(), std::process::id()));
    let result = (|| {
        let mut f = std::io::BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        sum.update(&header);
        f.write_all(&header)?;
        sum.update(&meta);
        f.write_all(&meta)?;
        for d in &digests {
            sum.update(d.0);
            f.write_all(&d.0)?;
        }
        f.write_all(&sum.finalize())?;
        // No fsync: a form lost or torn by a crash fails its checksum and is compiled again,
        // and syncing 30 MB would cost every first mount tens of milliseconds.
        f.into_inner().map_err(|e| e.into_error())?;
        std::fs::rename(&tmp, form_path(dir, sha))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Little-endian encoder of the meta section.
#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
    fn str(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.bytes(s.as_bytes());
    }
}

/// Marks a file listed with only a whole-file sha256 (no chunk digests).
const NO_CHUNKS: u64 = u64::MAX;

/// (meta section, digest table, fingerprints). Meta: base dir, model count, then per model: id,
/// fingerprint, text hash, description, pinned, sources (kind tag + fields, `local://` already resolved
/// against the base dir), files (path, size, sha256,
/// chunk_size, head_size, chunk hash (0 sha256, 1 blake3; format 2), first digest index or
/// `NO_CHUNKS`, digest count).
fn encode(
    base: &Path,
    manifest: &Manifest,
    texts: &BTreeMap<String, Digest>,
) -> (Vec<u8>, Vec<Digest>, BTreeMap<ModelId, Digest>) {
    let mut fingerprints = BTreeMap::new();
    let mut e = Enc::default();
    let mut digests = Vec::new();
    e.str(&base.to_string_lossy());
    e.u32(manifest.models.len() as u32);
    for m in manifest.models.values() {
        let mut me = Enc::default();
        let first = digests.len();
        me.str(&m.description);
        me.u8(m.pinned as u8);
        me.u32(m.sources.len() as u32);
        for s in &m.sources {
            match s {
                SourceUrl::Dir(p) => {
                    me.u8(0);
                    me.str(&p.to_string_lossy());
                }
                SourceUrl::Http(u) => {
                    me.u8(1);
                    me.str(u);
                }
                SourceUrl::Hf { repo, rev } => {
                    me.u8(2);
                    me.str(repo);
                    me.str(rev);
                }
                SourceUrl::S3 { bucket, prefix } => {
                    me.u8(3);
                    me.str(bucket);
                    me.str(prefix);
                }
            }
        }
        me.u32(m.files.len() as u32);
        for f in &m.files {
            me.str(&f.path);
            me.u64(f.size);
            me.bytes(&f.sha256.0);
            me.u64(f.chunk_size);
            me.u64(f.head_size);
            me.u8(match f.chunk_hash {
                ChunkHash::Sha256 => 0,
                ChunkHash::Blake3 => 1,
            });
            match &f.verification {
                Verification::Chunked(c) => {
                    me.u64(digests.len() as u64);
                    me.u64(c.len() as u64);
                    digests.extend_from_slice(c);
                }
                Verification::Whole => {
                    me.u64(NO_CHUNKS);
                    me.u64(0);
                }
            }
        }
        // Positions in the digest table shift when an earlier model changes, so the
        // fingerprint covers the model's own digests, not where they sit.
        let mut fp = Sha256::new();
        fp.update(m.id.as_bytes());
        fp.update([0]);
        fp.update(&me.0);
        for d in &digests[first..] {
            fp.update(d.0);
        }
        let fp = Digest(fp.finalize().into());
        fingerprints.insert(m.id.clone(), fp);
        e.str(&m.id);
        e.bytes(&fp.0);
        // All zeros: the text could not be cut by model (never the sha256 of anything).
        e.bytes(&texts.get(m.id.as_str()).map_or([0; 32], |t| t.0));
        e.bytes(&me.0);
    }
    (e.0, digests, fingerprints)
}

/// Opens the compiled form at `path`, checking that it is the form of the manifest hashing
/// to `sha` with `local://` resolved against `base`, and that it is intact.
pub fn open(path: &Path, sha: &Digest, base: &Path) -> Result<Compiled, CompiledError> {
    use CompiledError::Malformed;
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking: a FIFO at this name must fail the check below, not hang the start.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)?;
    let stat = file.metadata()?;
    if !stat.file_type().is_file() {
        return Err(Malformed("not a regular file"));
    }
    let len = stat.len() as usize;
    if len < HEADER_LEN + 32 {
        return Err(Malformed("shorter than a header"));
    }
    let mut header = [0u8; HEADER_LEN];
    file.read_exact_at(&mut header, 0)?;
    if &header[..8] != MAGIC {
        return Err(CompiledError::Magic);
    }
    let le32 = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap());
    let le64 = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap());
    let version = le32(&header[8..12]);
    if version != FORMAT_VERSION {
        return Err(CompiledError::Version(version));
    }
    if header[16..48] != sha.0 {
        return Err(CompiledError::OtherManifest);
    }
    let meta_len = le64(&header[48..56]) as usize;
    let count = le64(&header[56..64]) as usize;
    let digests_at = HEADER_LEN
        .checked_add(meta_len)
        .ok_or(Malformed("meta length"))?;
    let end = count
        .checked_mul(32)
        .and_then(|n| n.checked_add(digests_at))
        .ok_or(Malformed("digest count"))?;
    if end.checked_add(32) != Some(len) {
        return Err(Malformed("length does not match the header"));
    }
    // Everything is read into memory once, and the checksum is over exactly those bytes: a
    // form truncated or rewritten after this point (by another hand, or a failing disk)
    // cannot reach a digest the daemon uses, nor fault it (a mapping would: SIGBUS).
    let mut sum = Sha256::new();
    sum.update(header);
    let mut meta = vec![0u8; meta_len];
    file.read_exact_at(&mut meta, HEADER_LEN as u64)?;
    sum.update(&meta);
    let mut digests: Vec<Digest> = Vec::with_capacity(count);
    let mut buf = vec![0u8; 1 << 20];
    let mut at = digests_at;
    while at < end {
        let n = buf.len().min(end - at);
        file.read_exact_at(&mut buf[..n], at as u64)?;
        sum.update(&buf[..n]);
        digests.extend(
            buf[..n]
                .chunks_exact(32)
                .map(|d| Digest(d.try_into().expect("32 bytes"))),
        );
        at += n;
    }
    let mut trailer = [0u8; 32];
    file.read_exact_at(&mut trailer, end as u64)?;
    if sum.finalize()[..] != trailer {
        return Err(CompiledError::Checksum);
    }
    let table: Arc<dyn AsRef<[Digest]> + Send + Sync> = Arc::new(digests);
    let (manifest, fingerprints, texts) = decode(&meta, base, &table, count)?;
    Ok(Compiled {
        manifest,
        sha256: *sha,
        fingerprints,
        texts,
        reused: false,
    })
}

/// Reader over the meta section; every read is bounds-checked (a form is only trusted after
/// its checksum, but a malformed one must still fail cleanly, never panic).
struct Dec<'a>(&'a [u8]);

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CompiledError> {
        if self.0.len() < n {
            return Err(CompiledError::Malformed("meta section ends early"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, CompiledError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, CompiledError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, CompiledError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn digest(&mut self) -> Result<Digest, CompiledError> {
        Ok(Digest(self.take(32)?.try_into().unwrap()))
    }
    fn str(&mut self) -> Result<String, CompiledError> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| CompiledError::Malformed("a string is not UTF-8"))
    }
}

type Decoded = (
    Manifest,
    BTreeMap<ModelId, Digest>,
    BTreeMap<String, Digest>,
);

fn decode(
    meta: &[u8],
    base: &Path,
    table: &Arc<dyn AsRef<[Digest]> + Send + Sync>,
    count: usize,
) -> Result<Decoded, CompiledError> {
    use CompiledError::Malformed;
    let mut d = Dec(meta);
    let compiled_base = d.str()?;
    if Path::new(&compiled_base) != base {
        return Err(CompiledError::OtherBase(compiled_base));
    }
    let n_models = d.u32()?;
    let mut models = BTreeMap::new();
    let mut fingerprints = BTreeMap::new();
    let mut texts = BTreeMap::new();
    for _ in 0..n_models {
        let id = ModelId::new(d.str()?).map_err(|_| Malformed("a model id"))?;
        let fp = d.digest()?;
        let text = d.digest()?;
        if text.0 != [0; 32] {
            texts.insert(id.to_string(), text);
        }
        let description = d.str()?;
        let pinned = d.u8()? != 0;
        let n_sources = d.u32()?;
        let mut sources = Vec::with_capacity(n_sources as usize);
        for _ in 0..n_sources {
            sources.push(match d.u8()? {
                0 => SourceUrl::Dir(PathBuf::from(d.str()?)),
                1 => SourceUrl::Http(d.str()?),
                2 => SourceUrl::Hf {
                    repo: d.str()?,
                    rev: d.str()?,
                },
                3 => SourceUrl::S3 {
                    bucket: d.str()?,
                    prefix: d.str()?,
                },
                _ => return Err(Malformed("a source kind")),
            });
        }
        let n_files = d.u32()? as usize;
        let mut files = Vec::with_capacity(n_files.min(meta.len()));
        for _ in 0..n_files {
            let path = d.str()?;
            let size = d.u64()?;
            let sha256 = d.digest()?;
            let chunk_size = d.u64()?;
            let head_size = d.u64()?;
            let chunk_hash = match d.u8()? {
                0 => ChunkHash::Sha256,
                1 => ChunkHash::Blake3,
                _ => return Err(Malformed("a chunk hash")),
            };
            let (first, n) = (d.u64()?, d.u64()?);
            if bounds_rule(&path, size, chunk_size, head_size).is_some() {
                return Err(Malformed("a file the manifest rules refuse"));
            }
            let verification = if first == NO_CHUNKS {
                Verification::Whole
            } else {
                let want = Layout::with_head(size, chunk_size, head_size).count();
                let end = first.checked_add(n).ok_or(Malformed("a digest range"))?;
                if n != want || end > count as u64 {
                    return Err(Malformed("a digest range"));
                }
                Verification::Chunked(ChunkList::shared(
                    table.clone(),
                    first as usize..end as usize,
                ))
            };
            files.push(FileEntry {
                path,
                size,
                sha256,
                chunk_size,
                head_size,
                chunk_hash,
                verification,
            });
        }
        fingerprints.insert(id.clone(), fp);
        models.insert(
            id.clone(),
            Model {
                id,
                description,
                pinned,
                sources,
                files,
            },
        );
    }
    if !d.0.is_empty() {
        return Err(Malformed("bytes after the last model"));
    }
    Ok((Manifest { models }, fingerprints, texts))
}

/// Keeps the form in use (`current`, marked newest) and the [`KEEP`] most recently used
/// others; removes temp files left by compiles that died. Errors only cost disk space.
fn keep_newest(dir: &Path, current: &Digest) {
    let now = std::time::SystemTime::now();
    if let Ok(f) = File::options().write(true).open(form_path(dir, current)) {
        let _ = f.set_modified(now);
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut forms = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(modified) = e.metadata().and_then(|m| m.modified()) else {
            continue;
        };
        let age = now.duration_since(modified).unwrap_or_default().as_secs();
        if name.starts_with(".tmp-") {
            if age > STALE_TMP_SECS {
                let _ = std::fs::remove_file(e.path());
            }
        } else if name.ends_with(".bin") && name != format!("{}.bin", current.to_hex()) {
            forms.push((modified, e.path()));
        }
    }
    forms.sort_by_key(|f| std::cmp::Reverse(f.0));
    for (_, path) in forms.into_iter().skip(KEEP) {
        tracing::debug!(path = %path.display(), "pruning an old compiled manifest");
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    /// Two models: chunked files (with and without a head; chunks under sha256 and BLAKE3), a
    /// whole-only file, local and remote sources.
    fn text(size_b: u64) -> String {
        let c = |n: usize| format!("[{}]", vec![format!("\"{D}\""); n].join(", "));
        format!(
            "schema_version = 1\n\
             [models.\"a@1.0.0\"]\ndescription = \"first\"\npinned = true\n\
             [models.\"a@1.0.0\".sources]\npriority = [\"local://src\", \"https://m.example/a\"]\n\
             [[models.\"a@1.0.0\".files]]\npath = \"x/y.bin\"\nsize = 10\nsha256 = \"{D}\"\n\
             chunk_size = 4\nchunks = {}\n\
             [[models.\"a@1.0.0\".files]]\npath = \"whole\"\nsize = 3\nsha256 = \"{}\"\n\
             [models.\"b@2.0.0\".sources]\npriority = [\"hf://org/repo@rev\", \"s3://bk/p\"]\n\
             [[models.\"b@2.0.0\".files]]\npath = \"h\"\nsize = {size_b}\nsha256 = \"{}\"\n\
             chunk_size = 8192\nhead_size = 4096\nchunk_hash = \"blake3\"\nchunks = {}\n",
            c(3),
            Digest::of(b"w"),
            Digest::of(b"h"),
            c(Layout::with_head(size_b, 8192, 4096).count() as usize),
        )
    }

    fn setup(body: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("models.toml");
        std::fs::write(&manifest, body).unwrap();
        let cache = dir.path().join("cache");
        (dir, manifest, cache)
    }

    fn load_here(manifest: &Path, cache: &Path) -> Compiled {
        load(manifest, cache, CompileIn::Process, None).unwrap()
    }

    fn forms(cache: &Path) -> Vec<PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(dir(cache))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn round_trip_equals_the_parsed_manifest() {
        let (_d, manifest, cache) = setup(&text(10_000));
        let parsed = Manifest::load(&manifest).unwrap();
        let first = load_here(&manifest, &cache);
        assert!(!first.reused);
        let again = load_here(&manifest, &cache);
        assert!(again.reused, "the second load opens the compiled form");
        assert_eq!(again.sha256, Digest::of(&std::fs::read(&manifest).unwrap()));
        assert_eq!(forms(&cache), vec![form_path(&dir(&cache), &again.sha256)]);
        // Debug shows every field, chunk digests included.
        assert_eq!(format!("{:?}", again.manifest), format!("{parsed:?}"));
        let b = &again.manifest.models["b@2.0.0"].files[0];
        assert_eq!(b.verification.chunks().unwrap().len(), 2);
        assert_eq!(b.verification.chunk(1).unwrap(), D.parse().unwrap());
        assert_eq!(
            again.manifest.models["a@1.0.0"].files[1].verification,
            Verification::Whole
        );
    }

    #[test]
    fn corrupt_or_old_forms_are_compiled_again() {
        let (_d, manifest, cache) = setup(&text(10_000));
        let sha = load_here(&manifest, &cache).sha256;
        let form = form_path(&dir(&cache), &sha);
        let good = std::fs::read(&form).unwrap();
        let reason = |bytes: &[u8]| {
            std::fs::write(&form, bytes).unwrap();
            let why = open(&form, &sha, &Manifest::base_dir(&manifest))
                .err()
                .map(|e| e.to_string());
            let c = load_here(&manifest, &cache);
            assert!(!c.reused, "an unusable form is never used");
            assert_eq!(std::fs::read(&form).unwrap(), good, "compiled again");
            why.unwrap()
        };
        // A flipped bit in the digest table, in the meta section, a truncation.
        let mut bad = good.clone();
        let n = bad.len();
        bad[n - 40] ^= 1;
        assert!(reason(&bad).contains("checksum"));
        let mut bad = good.clone();
        bad[HEADER_LEN + 3] ^= 0x80;
        assert!(reason(&bad).contains("checksum"));
        assert!(reason(&good[..good.len() - 1]).contains("length"));
        assert!(reason(b"").contains("header"));
        // An older format version.
        let mut old = good.clone();
        old[8..12].copy_from_slice(&(FORMAT_VERSION - 1).to_le_bytes());
        assert!(reason(&old).contains("format version"));
    }

    /// What was checked at open is what is used: a form truncated afterwards (by another hand
    /// or a failing disk) changes nothing the daemon reads, where a mapping of it faulted
    /// (SIGBUS) at the next cold read. A FIFO at the form's name is refused at once, not read
    /// (opening it blocked the start forever).
    #[test]
    fn an_open_form_is_immune_to_its_file_and_a_fifo_is_refused() {
        let (_d, manifest, cache) = setup(&text(10_000));
        let sha = load_here(&manifest, &cache).sha256;
        let form = form_path(&dir(&cache), &sha);
        let c = open(&form, &sha, &Manifest::base_dir(&manifest)).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&form)
            .unwrap()
            .set_len(0)
            .unwrap();
        let digests = |m: &Manifest| -> Vec<Digest> {
            m.models
                .values()
                .flat_map(|m| &m.files)
                .flat_map(|f| {
                    f.verification
                        .chunks()
                        .into_iter()
                        .flat_map(|c| c.iter().copied())
                })
                .collect()
        };
        let parsed = Manifest::load(&manifest).unwrap();
        assert!(!digests(&c.manifest).is_empty());
        assert_eq!(digests(&c.manifest), digests(&parsed));
        assert_eq!(format!("{:?}", c.manifest), format!("{parsed:?}"));

        std::fs::remove_file(&form).unwrap();
        nix::unistd::mkfifo(&form, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let t0 = std::time::Instant::now();
        let why = open(&form, &sha, &Manifest::base_dir(&manifest)).err();
        assert!(
            why.as_ref()
                .is_some_and(|e| e.to_string().contains("regular")),
            "{why:?}"
        );
        let c = load_here(&manifest, &cache);
        assert!(!c.reused && t0.elapsed() < std::time::Duration::from_secs(5));
        assert!(
            std::fs::metadata(&form).unwrap().is_file(),
            "compiled again"
        );
    }

    #[test]
    fn another_manifest_never_uses_the_form() {
        let (_d, manifest, cache) = setup(&text(10_000));
        let a = load_here(&manifest, &cache);
        std::fs::write(&manifest, text(20_000)).unwrap();
        let b_sha = hash_file(&manifest).unwrap();
        // Even a form put under the new manifest's name is refused: its header says whose.
        std::fs::copy(
            form_path(&dir(&cache), &a.sha256),
            form_path(&dir(&cache), &b_sha),
        )
        .unwrap();
        let b = load_here(&manifest, &cache);
        assert!(!b.reused);
        assert_eq!(b.sha256, b_sha);
        assert_eq!(b.manifest.models["b@2.0.0"].files[0].size, 20_000);
        assert_eq!(
            b.manifest.models["b@2.0.0"].files[0]
                .verification
                .chunks()
                .unwrap()
                .len(),
            3
        );
        // Only the changed model's fingerprint moved.
        assert_eq!(a.fingerprints["a@1.0.0"], b.fingerprints["a@1.0.0"]);
        assert_ne!(a.fingerprints["b@2.0.0"], b.fingerprints["b@2.0.0"]);
    }

    #[test]
    fn the_same_text_elsewhere_resolves_local_sources_there() {
        let (d, manifest, cache) = setup(&text(10_000));
        load_here(&manifest, &cache);
        let other = d.path().join("elsewhere");
        std::fs::create_dir(&other).unwrap();
        std::fs::copy(&manifest, other.join("models.toml")).unwrap();
        let c = load_here(&other.join("models.toml"), &cache);
        assert!(!c.reused, "compiled for another base directory");
        assert_eq!(
            c.manifest.models["a@1.0.0"].sources[0],
            SourceUrl::Dir(other.canonicalize().unwrap().join("src"))
        );
    }

    #[test]
    fn bad_manifests_are_refused_as_load_words_them() {
        let (_d, manifest, cache) = setup(&text(10_000).replace("x/y.bin", "../y"));
        let want = Manifest::load(&manifest).unwrap_err().to_string();
        let got = load(&manifest, &cache, CompileIn::Process, None)
            .err()
            .unwrap();
        assert_eq!(format!("{got:#}"), want);
        assert!(!dir(&cache).exists() || forms(&cache).is_empty());
    }

    /// A form written under looser rules (an older wanfs took a 64 GiB chunk grid, which
    /// aborted the daemon) is not used: the manifest is compiled again, and refused as
    /// `Manifest::load` words it.
    #[test]
    fn a_form_of_a_manifest_the_rules_now_refuse_is_not_used() {
        let huge = 64u64 << 30;
        let bad_text = text(10_000).replace(
            "path = \"whole\"\nsize = 3\n",
            &format!("path = \"whole\"\nsize = 3\nchunk_size = {huge}\n"),
        );
        let (_d, manifest, cache) = setup(&bad_text);
        let want = Manifest::load(&manifest).unwrap_err().to_string();
        assert!(want.contains(&format!("chunk_size {huge}")), "{want}");
        // What an older wanfs compiled from this text.
        let mut older =
            Manifest::parse(&text(10_000), "t", &Manifest::base_dir(&manifest)).unwrap();
        let whole = &mut older.models.get_mut("a@1.0.0").unwrap().files[1];
        (whole.chunk_size, whole.head_size) = (huge, huge);
        let sha = hash_file(&manifest).unwrap();
        let base = Manifest::base_dir(&manifest);
        write(&dir(&cache), &sha, &base, &older, &BTreeMap::new()).unwrap();
        let why = open(&form_path(&dir(&cache), &sha), &sha, &base)
            .err()
            .unwrap();
        assert!(why.to_string().contains("rules refuse"), "{why}");
        let got = load(&manifest, &cache, CompileIn::Process, None)
            .err()
            .unwrap();
        assert_eq!(format!("{got:#}"), want);
    }

    #[test]
    fn old_forms_are_pruned_keeping_the_newest() {
        let (_d, manifest, cache) = setup(&text(10_000));
        let mut shas = Vec::new();
        for i in 0..7u64 {
            std::fs::write(&manifest, text(10_000 + i)).unwrap();
            shas.push(load_here(&manifest, &cache).sha256);
            // Forms are ordered by mtime (last use): make each older than the next.
            let used = std::time::SystemTime::now() - std::time::Duration::from_secs(100 - i);
            File::options()
                .write(true)
                .open(form_path(&dir(&cache), &shas[i as usize]))
                .unwrap()
                .set_modified(used)
                .unwrap();
        }
        // Each load kept its form and the KEEP newest others: shas[0] and shas[1] are gone.
        // Using shas[2] (the oldest left) again marks it newest, and nothing more goes.
        std::fs::write(&manifest, text(10_002)).unwrap();
        assert!(load_here(&manifest, &cache).reused);
        let left = forms(&cache);
        let want: Vec<_> = [2, 3, 4, 5, 6]
            .iter()
            .map(|&i| form_path(&dir(&cache), &shas[i]))
            .collect();
        assert_eq!(left, {
            let mut w = want;
            w.sort();
            w
        });
    }

    #[test]
    fn segments_cut_plain_manifests_only() {
        let segs = segments(&text(10_000)).unwrap();
        assert_eq!(segs.keys().collect::<Vec<_>>(), ["a@1.0.0", "b@2.0.0"]);
        assert!(segs["b@2.0.0"].starts_with("schema_version = 1\n[models.\"b@2.0.0\".sources]"));
        for odd in [
            "schema_version = 1\ntitle = \"x\"\n",
            "schema_version = 1\n[models . \"a@1.0.0\"]\n",
            "schema_version = 1\n[models]\n",
            "schema_version = 1\n[models.\"a@1.0.0\"]\ndescription = \"\"\"\n[x]\n\"\"\"\n",
            "schema_version = 1\n[models.\"a@1.0.0\"] x = 1\n",
        ] {
            assert!(segments(odd).is_none(), "{odd}");
        }
    }

    /// A reload's compile takes the models whose text did not change from the form in force
    /// (trusting its text hash), and parses the others.
    #[test]
    fn a_compile_with_prev_parses_only_changed_models() {
        let (_d, manifest, cache) = setup(&text(10_000));
        let base = Manifest::base_dir(&manifest);
        // The form in force: the real texts' hashes, but model a planted with another
        // description, to see where the new form's model a comes from.
        let a_text = std::fs::read(&manifest).unwrap();
        let mut planted = Manifest::load(&manifest).unwrap();
        planted.models.get_mut("a@1.0.0").unwrap().description = "planted".into();
        let texts = segments(&text(10_000))
            .unwrap()
            .into_iter()
            .map(|(id, t)| (id, Digest::of(t.as_bytes())))
            .collect();
        let prev = Digest::of(&a_text);
        write(&dir(&cache), &prev, &base, &planted, &texts).unwrap();

        std::fs::write(&manifest, text(20_000)).unwrap();
        let c = load(&manifest, &cache, CompileIn::Process, Some(&prev)).unwrap();
        assert_eq!(c.manifest.models["a@1.0.0"].description, "planted");
        assert_eq!(c.manifest.models["b@2.0.0"].files[0].size, 20_000);
        // Without a prev, everything is parsed: the same result as `Manifest::load`.
        std::fs::remove_dir_all(dir(&cache)).unwrap();
        let full = load(&manifest, &cache, CompileIn::Process, Some(&prev)).unwrap();
        assert_eq!(
            format!("{:?}", full.manifest),
            format!("{:?}", Manifest::load(&manifest).unwrap())
        );
        assert_eq!(full.texts.len(), 2, "text hashes kept for the next reload");
    }

    /// A changed model that breaks the rule spanning models (same sha256, other size) is
    /// refused with the full parse's words.
    #[test]
    fn a_compile_with_prev_still_checks_across_models() {
        let (_d, manifest, cache) = setup(&text(10_000));
        let prev = load_here(&manifest, &cache).sha256;
        let clash = text(10_000).replace(&Digest::of(b"h").to_hex(), D);
        std::fs::write(&manifest, &clash).unwrap();
        let want = Manifest::load(&manifest).unwrap_err().to_string();
        assert!(want.contains("same sha256"), "{want}");
        let got = load(&manifest, &cache, CompileIn::Process, Some(&prev))
            .err()
            .unwrap();
        assert_eq!(format!("{got:#}"), want);
    }

    /// A cache disk where no form can be written (full, read-only) must not stop a mount: the
    /// manifest is then kept in memory, fingerprints included (a reload compares them).
    #[test]
    fn a_form_that_cannot_be_written_leaves_the_manifest_in_memory() {
        let (_d, manifest, cache) = setup(&text(10_000));
        std::fs::create_dir_all(cache.join("v1")).unwrap();
        std::fs::write(dir(&cache), b"a file where the directory should be").unwrap();
        let c = load_here(&manifest, &cache);
        assert!(!c.reused);
        assert_eq!(
            format!("{:?}", c.manifest),
            format!("{:?}", Manifest::load(&manifest).unwrap())
        );
        assert_eq!(c.fingerprints.len(), 2);
        // The same fingerprints a compiled form gets.
        std::fs::remove_file(dir(&cache)).unwrap();
        assert_eq!(load_here(&manifest, &cache).fingerprints, c.fingerprints);
    }
}
