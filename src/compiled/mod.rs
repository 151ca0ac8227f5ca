//! The compiled form of a manifest: a binary file in the cache dir, named by the manifest
//! file's sha256, that a restart opens instead of parsing the TOML again.
//!
//! Owns `<cache_dir>/v1/manifests/`: what callers use ([`load`], and [`Compiled`], what it
//! returns), and pruning old forms. Validation stays in `manifest/rules.rs`: a compiled form is
//! only ever written from a manifest that passed it, and a manifest it refuses is reported by
//! the child exactly as `Manifest::load` words it. Nothing else touches this directory: GC and
//! eviction work on `blobs/` only.
//!
//! - `mod.rs`: [`load`] (open the form of the manifest, else compile it, then open it), the
//!   form's name and directory, and pruning to the newest few.
//! - `codec.rs`: the on-disk format ([`FORMAT_VERSION`], header, meta section, digest table,
//!   trailing checksum): [`write`](fn@write) and [`open`], and what makes a form trusted.
//! - `compile.rs`: compiling a manifest into its form ([`compile`], what `wan manifest
//!   compile` runs), in a child process so the parse's transient memory never lands in the
//!   daemon's heap, on a reload only the models whose text changed; and the manifest kept in
//!   memory when no form can be written.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::chunk::Digest;
use crate::manifest::{Manifest, ManifestError, ModelId};

mod codec;
mod compile;

pub use codec::{CompiledError, FORMAT_VERSION, open, write};
pub use compile::{CompileError, EXIT_NOT_WRITTEN, compile};
use compile::{compile_here, compile_in_child, in_memory};

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
    /// Per model, the sha256 of its text in the manifest (see
    /// [`segments`](crate::manifest::segments)), when the manifest has the plain shape that
    /// allows cutting it by model: the next compile parses again only the models whose text
    /// changed.
    pub texts: BTreeMap<String, Digest>,
    /// Whether an existing compiled form was used (false: compiled just now).
    pub reused: bool,
}

/// `<cache_dir>/v1/manifests`.
pub fn dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("v1").join("manifests")
}

fn form_path(dir: &Path, sha256: &Digest) -> PathBuf {
    dir.join(format!("{}.bin", sha256.to_hex()))
}

/// sha256 of a file, read in 1 MiB pieces (a fleet manifest is ~50 MB: never held whole):
/// [`crate::manifest::hash_file`]'s whole-file digest, with no chunk digests.
pub fn hash_file(path: &Path) -> std::io::Result<Digest> {
    const PIECE: u64 = 1 << 20;
    crate::manifest::hash_file(path, PIECE, PIECE, None).map(|(_, sha256, _)| sha256)
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
    use crate::chunk::Layout;
    use crate::manifest::SourceUrl;

    pub(super) const D: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    /// Two models: chunked files (with and without a head; chunks under sha256, BLAKE3 and
    /// blake3-tree), a whole-only file, local and remote sources.
    pub(super) fn text(size_b: u64) -> String {
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
             chunk_size = 8192\nhead_size = 4096\nchunk_hash = \"blake3\"\nchunks = {}\n\
             [[models.\"b@2.0.0\".files]]\npath = \"t\"\nsize = {size_b}\nsha256 = \"{}\"\n\
             chunk_size = 8192\nhead_size = 4096\nchunk_hash = \"blake3-tree\"\nchunks = {}\n",
            c(3),
            Digest::of(b"w"),
            Digest::of(b"h"),
            c(Layout::with_head(size_b, 8192, 4096).count() as usize),
            Digest::of(b"t"),
            c(Layout::aligned(size_b, 8192, 4096).count() as usize),
        )
    }

    pub(super) fn setup(body: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("models.toml");
        std::fs::write(&manifest, body).unwrap();
        let cache = dir.path().join("cache");
        (dir, manifest, cache)
    }

    pub(super) fn load_here(manifest: &Path, cache: &Path) -> Compiled {
        load(manifest, cache, CompileIn::Process, None).unwrap()
    }

    pub(super) fn forms(cache: &Path) -> Vec<PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(dir(cache))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
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
}
