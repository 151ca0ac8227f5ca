//! The compiled form's on-disk format: a header (magic, [`FORMAT_VERSION`], the manifest's
//! sha256, section lengths), a meta section (models, sources, paths, sizes), a table of
//! 32-byte chunk digests (most of a fleet manifest), and a trailing sha256 over all of it.
//! [`write`] puts a form in place, [`open`] reads one back and decides whether to trust it.
//!
//! Everything is read into memory at open and checked against the trailing checksum as it is
//! read: what the daemon uses is exactly what was checked, and nothing done to the file
//! afterwards (a truncation, a rewrite, a read error) can reach it. A form is trusted only if
//! it is a regular file and its magic, format version, manifest hash, base directory and
//! trailing checksum all match; anything else is compiled again. Files are written to a temp
//! name and renamed into place, so a reader never sees half of one (not synced: a form torn by
//! a crash fails its checksum).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use super::{Compiled, form_path};
use crate::chunk::{ChunkHash, Digest, Layout};
use crate::manifest::{
    ChunkList, FileEntry, Manifest, Model, ModelId, SourceUrl, Verification, bounds_rule,
};

/// Bumped whenever the layout below changes: a form of another version is compiled again.
pub const FORMAT_VERSION: u32 = 2;
const MAGIC: &[u8; 8] = b"WANMFST\0";
/// magic, version, reserved, manifest sha256, meta length, digest count.
const HEADER_LEN: usize = 8 + 4 + 4 + 32 + 8 + 8;
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
pub(super) fn encode(
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
                SourceUrl::Oci {
                    registry,
                    repo,
                    reference,
                } => {
                    me.u8(4);
                    me.str(registry);
                    me.str(repo);
                    me.str(reference);
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
                ChunkHash::Blake3Tree => 2,
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
                4 => SourceUrl::Oci {
                    registry: d.str()?,
                    repo: d.str()?,
                    reference: d.str()?,
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
                2 => ChunkHash::Blake3Tree,
                _ => return Err(Malformed("a chunk hash")),
            };
            let (first, n) = (d.u64()?, d.u64()?);
            let kind = chunk_hash.layout_kind();
            if bounds_rule(&path, size, chunk_size, head_size).is_some()
                || !kind.fits(chunk_size, head_size)
            {
                return Err(Malformed("a file the manifest rules refuse"));
            }
            let verification = if first == NO_CHUNKS {
                Verification::Whole
            } else {
                let want = Layout::of(kind, size, chunk_size, head_size).count();
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
#[cfg(test)]
mod tests {
    use super::*;
    use crate::compiled::tests::{D, forms, load_here, setup, text};
    use crate::compiled::{CompileIn, dir, hash_file, load};

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
        let t = &again.manifest.models["b@2.0.0"].files[1];
        assert_eq!(t.chunk_hash, crate::chunk::ChunkHash::Blake3Tree);
        assert_eq!(t.layout(), Layout::aligned(10_000, 8192, 4096));
        assert_eq!(
            t.verification.chunks().unwrap().len(),
            3,
            "4, 4, then 2 KiB"
        );
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
}
