//! Compiling a manifest into its compiled form: [`compile`] (what `wan manifest compile`
//! runs), and how [`load`](super::load) gets it done: in a child process, so the parse's
//! transient memory never lands in the daemon's heap, else in this process. On a reload only
//! the models whose text changed are parsed. A cache where no form can be written still
//! mounts, with the manifest kept in memory ([`in_memory`]).

use std::collections::BTreeMap;
use std::path::Path;

use super::{Compiled, codec, form_path};
use crate::chunk::Digest;
use crate::manifest::{Manifest, ManifestError, segments};

/// `wan manifest compile`'s exit status when the manifest is good but its form could not be
/// written (a full or read-only cache disk): the daemon then keeps the manifest in memory.
pub const EXIT_NOT_WRITTEN: u8 = 3;

/// [`compile`] in this process; `None` when the manifest is good but the form could not be
/// written.
pub(super) fn compile_here(
    path: &Path,
    dir: &Path,
    prev: Option<&Digest>,
) -> anyhow::Result<Option<Digest>> {
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
pub(super) fn in_memory(path: &Path, sha: Digest) -> anyhow::Result<Compiled> {
    tracing::warn!(manifest = %path.display(),
        "manifest: kept in memory without a compiled form; the next start parses it again");
    let manifest = Manifest::load(path)?;
    let (_, _, fingerprints) =
        codec::encode(&Manifest::base_dir(path), &manifest, &BTreeMap::new());
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
pub(super) fn compile_in_child(
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
    let old = prev.and_then(|prev| codec::open(&form_path(dir, prev), prev, &base).ok());
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
    codec::write(dir, &sha, &base, &manifest, &texts).map_err(|err| CompileError::Write {
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
#[cfg(test)]
mod tests {
    use super::*;
    use crate::compiled::tests::{D, forms, load_here, setup, text};
    use crate::compiled::{CompileIn, dir, load, write};

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
