//! The TOML side of a manifest: reading `models.toml` into a [`Manifest`] that keeps every
//! rule (`Manifest::load`, `parse`, `parse_fast`), every problem collected before it is refused.
//! A text in the plain shape `wan manifest build` writes is cut by model ([`segments`]) and
//! parsed one model per core ([`parse_models`]), with exactly the whole parse's result.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::rules::{PathRules, aligned_rule, grid_rule, same_content};
use super::{
    ChunkList, DEFAULT_CHUNK_SIZE, FileEntry, Manifest, ManifestError, Model, ModelId, Problem,
    SourceUrl, Verification, size_rule,
};
use crate::chunk::{ChunkHash, Digest, Layout, LayoutKind};

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    schema_version: u32,
    #[serde(default)]
    models: BTreeMap<String, RawModel>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawModel {
    #[serde(default)]
    description: String,
    #[serde(default)]
    pinned: bool,
    #[serde(default)]
    sources: RawSources,
    #[serde(default)]
    files: Vec<RawFile>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct RawSources {
    #[serde(default)]
    priority: Vec<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawFile {
    path: String,
    size: u64,
    sha256: String,
    chunk_size: Option<u64>,
    head_size: Option<u64>,
    chunk_hash: Option<String>,
    chunks: Option<Vec<HexDigest>>,
}

/// A digest as the manifest writes it, decoded as it is read: no `String` per digest (a fleet
/// manifest has over half a million). A bad one keeps its error for the problem list.
#[derive(Debug)]
struct HexDigest(Result<Digest, crate::chunk::BadHex>);

impl<'de> Deserialize<'de> for HexDigest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<HexDigest, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = HexDigest;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<HexDigest, E> {
                Ok(HexDigest(s.parse()))
            }
        }
        d.deserialize_str(V)
    }
}

impl Manifest {
    /// Reads and validates a manifest file.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|err| ManifestError::Io {
            file: file.clone(),
            err,
        })?;
        Manifest::parse_fast(&text, &file, &Manifest::base_dir(path))
    }

    /// What [`Manifest::parse`] returns, one model at a time on all cores when the text cuts
    /// by model ([`segments`]): the models parse alone, then the rule that spans models is
    /// checked. Any problem, or a text that does not cut, is a parse of the whole text, so the
    /// errors are always exactly `parse`'s.
    pub fn parse_fast(text: &str, file: &str, base_dir: &Path) -> Result<Manifest, ManifestError> {
        if let Some(segs) = segments(text) {
            let segs: Vec<&str> = segs.values().map(String::as_str).collect();
            if let Some(models) = parse_models(&segs, file, base_dir) {
                let m = Manifest {
                    models: models.into_iter().collect(),
                };
                if m.shared_content_consistent() {
                    return Ok(m);
                }
            }
        }
        Manifest::parse(text, file, base_dir)
    }

    /// The directory `local://` sources of the manifest at `path` are relative to.
    pub fn base_dir(path: &Path) -> PathBuf {
        path.canonicalize()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("."))
    }

    /// Parses and validates manifest text; `file` names it in errors.
    pub fn parse(text: &str, file: &str, base_dir: &Path) -> Result<Manifest, ManifestError> {
        let raw: RawManifest = toml::from_str(text).map_err(|e| ManifestError::Syntax {
            file: file.to_string(),
            msg: e.to_string().trim_end().to_string(),
        })?;
        let mut problems = Vec::new();
        if raw.schema_version != 1 {
            problems.push(Problem {
                model: "-".into(),
                path: None,
                rule: format!(
                    "schema_version {} is not supported (want 1)",
                    raw.schema_version
                ),
            });
        }
        let mut models = BTreeMap::new();
        // Identical content must be described identically everywhere it appears, since it is
        // stored once: each sha256's first file, and its model, to compare the others with.
        let mut by_digest: HashMap<Digest, (String, FileEntry)> = HashMap::new();
        for (id, m) in raw.models {
            let mut bad = |path: Option<&str>, rule: String| {
                problems.push(Problem {
                    model: id.clone(),
                    path: path.map(str::to_string),
                    rule,
                })
            };
            // A bad id is one problem among the model's others: its files are still checked.
            let model_id = ModelId::new(id.clone()).ok();
            if model_id.is_none() {
                bad(
                    None,
                    "bad model id (want NAME@X.Y.Z, NAME of letters, digits, '_' and '-')".into(),
                );
            }
            let mut sources = Vec::new();
            for url in &m.sources.priority {
                match SourceUrl::parse(url, base_dir) {
                    Ok(s) => sources.push(s),
                    Err(e) => bad(None, format!("source {url:?}: {e}")),
                }
            }
            let mut rules = PathRules::default();
            let mut files = Vec::new();
            for f in m.files {
                if let Err(rule) = rules.check(&f.path) {
                    bad(Some(&f.path), rule);
                    continue;
                }
                let sha256 = match f.sha256.parse::<Digest>() {
                    Ok(d) => d,
                    Err(e) => {
                        bad(Some(&f.path), format!("sha256: {e}"));
                        continue;
                    }
                };
                if let Some(rule) = size_rule(f.size) {
                    bad(Some(&f.path), rule);
                    continue;
                }
                let chunk_size = f.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE);
                let head_size = f.head_size.unwrap_or(chunk_size);
                if let Some(rule) = grid_rule(chunk_size, head_size) {
                    bad(Some(&f.path), rule);
                    continue;
                }
                let chunk_hash = match f.chunk_hash.as_deref().map(str::parse::<ChunkHash>) {
                    None => ChunkHash::Sha256,
                    Some(Ok(h)) => h,
                    Some(Err(e)) => {
                        bad(Some(&f.path), e);
                        continue;
                    }
                };
                if chunk_hash == ChunkHash::Blake3Tree
                    && let Some(rule) = aligned_rule(chunk_size, head_size)
                {
                    bad(Some(&f.path), rule);
                    continue;
                }
                if f.chunk_hash.is_some() && f.chunks.is_none() {
                    bad(
                        Some(&f.path),
                        "chunk_hash names the hash of chunk digests, but the file lists no chunks"
                            .into(),
                    );
                    continue;
                }
                let verification = match f.chunks {
                    None => Verification::Whole,
                    Some(list) => {
                        let kind = chunk_hash.layout_kind();
                        let want = Layout::of(kind, f.size, chunk_size, head_size).count();
                        if list.len() as u64 != want {
                            let aligned = match kind {
                                LayoutKind::Aligned => " in the aligned blake3-tree layout",
                                LayoutKind::Head => "",
                            };
                            bad(
                                Some(&f.path),
                                format!(
                                    "chunk count {} does not match size {} / chunk_size {} with head_size {head_size}{aligned} (want {want})",
                                    list.len(),
                                    f.size,
                                    chunk_size
                                ),
                            );
                            continue;
                        }
                        let n = list.len();
                        let mut out = Vec::with_capacity(n);
                        for (i, h) in list.into_iter().enumerate() {
                            match h.0 {
                                Ok(d) => out.push(d),
                                Err(e) => {
                                    bad(Some(&f.path), format!("chunks[{i}]: {e}"));
                                    break;
                                }
                            }
                        }
                        if out.len() != n {
                            continue;
                        }
                        Verification::Chunked(ChunkList::from(out))
                    }
                };
                let entry = FileEntry {
                    path: f.path,
                    size: f.size,
                    sha256,
                    chunk_size,
                    head_size,
                    chunk_hash,
                    verification,
                };
                match by_digest.get(&sha256) {
                    Some((om, o)) if !same_content(o, &entry) => {
                        bad(
                            Some(&entry.path),
                            format!(
                                "same sha256 as {om:?} file {:?} but a different size, chunk_size, head_size, layout (blake3-tree or not) or chunks",
                                o.path
                            ),
                        );
                        continue;
                    }
                    Some(_) => {}
                    None => {
                        by_digest.insert(sha256, (id.clone(), entry.clone()));
                    }
                }
                files.push(entry);
            }
            // A file path may not also be a directory of another file.
            for f in &files {
                for dir in rules.files_above(&f.path) {
                    bad(
                        Some(dir),
                        format!("path is both a file and a directory of {:?}", f.path),
                    );
                }
            }
            if sources.is_empty() && m.sources.priority.is_empty() {
                bad(None, "no sources (sources.priority is empty)".into());
            }
            if let Some(id) = model_id {
                models.insert(
                    id.clone(),
                    Model {
                        id,
                        description: m.description,
                        pinned: m.pinned,
                        sources,
                        files,
                    },
                );
            }
        }
        if !problems.is_empty() {
            return Err(ManifestError::Invalid {
                file: file.to_string(),
                problems,
            });
        }
        Ok(Manifest { models })
    }
}

/// The manifest text cut by model: for each model id, `schema_version = 1` and the lines of
/// every table under `models."<id>"`, in order. `None` unless the text has the plain shape `wan manifest build`
/// writes: before the first table only `schema_version = 1`, comments and blank lines; every
/// table header `[models."<id>"...]` or `[[models."<id>"...]]` on a line of its own; no
/// multi-line strings (whose lines could look like headers). Parsing one model's lines alone
/// then gives what a parse of the whole text gives for it.
pub fn segments(text: &str) -> Option<BTreeMap<String, String>> {
    if text.contains("\"\"\"") || text.contains("'''") {
        return None;
    }
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.split_inclusive('\n') {
        let t = line.trim();
        if t.starts_with('[') {
            let id = header_model(t)?;
            // Each model's text parses alone as a manifest of one model.
            out.entry(id.clone())
                .or_insert_with(|| SEGMENT_START.to_string());
            current = Some(id);
        }
        match &current {
            Some(id) => out.get_mut(id)?.push_str(line),
            None => {
                let bare = t.split('#').next().unwrap_or("").trim();
                if !bare.is_empty() && bare.replace(' ', "") != "schema_version=1" {
                    return None;
                }
            }
        }
    }
    Some(out)
}

/// What every model's text in [`segments`] starts with.
const SEGMENT_START: &str = "schema_version = 1\n";

/// The model id of a table header line `[models."ID"…]` / `[[models."ID"…]]` (a trailing
/// comment allowed); `None` for any other header.
fn header_model(line: &str) -> Option<String> {
    let (inner, rest) = if let Some(r) = line.strip_prefix("[[") {
        let end = r.find("]]")?;
        (&r[..end], &r[end + 2..])
    } else {
        let r = line.strip_prefix('[')?;
        let end = r.find(']')?;
        (&r[..end], &r[end + 1..])
    };
    let rest = rest.trim();
    if !(rest.is_empty() || rest.starts_with('#')) {
        return None;
    }
    let key = inner.trim().strip_prefix("models.\"")?;
    let end = key.find('"')?;
    let (id, after) = (&key[..end], &key[end + 1..]);
    // Escapes would need decoding; an id never has one (ids are letters, digits, _-@.).
    if id.contains('\\') || !(after.is_empty() || after.starts_with('.')) {
        return None;
    }
    Some(id.to_string())
}

/// Parses each model's text ([`segments`]) alone, spread over the machine's cores; `None` if
/// any fails. Each model's TOML document is freed as soon as it is converted, so the peak is a
/// few models' documents rather than the whole manifest's.
pub fn parse_models(segs: &[&str], file: &str, base: &Path) -> Option<Vec<(ModelId, Model)>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(segs.len())
        .max(1);
    let parse_one = |seg: &str| {
        let one = Manifest::parse(seg, file, base).ok()?;
        one.models.into_iter().next()
    };
    let parsed: Vec<Option<Vec<(ModelId, Model)>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let mine: Vec<&str> = segs.iter().skip(t).step_by(threads).copied().collect();
                s.spawn(move || mine.into_iter().map(parse_one).collect::<Option<Vec<_>>>())
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().ok().flatten())
            .collect()
    });
    let mut out = Vec::new();
    for part in parsed {
        out.extend(part?);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::{entry, parse, problems};

    #[test]
    fn good_manifest_parses_and_resolves_local() {
        let m = parse(&entry("a/b.bin", "")).unwrap();
        let model = &m.models["m@1.0.0"];
        assert_eq!(model.sources, vec![SourceUrl::Dir("/base/x".into())]);
        assert_eq!(model.files[0].chunk_size, DEFAULT_CHUNK_SIZE);
        assert_eq!(model.files[0].verification, Verification::Whole);
    }
    #[test]
    fn unknown_field_names_line() {
        let e = problems(&entry("a", "chunk_szie = 4"));
        assert!(e.contains("chunk_szie") && e.contains("line"), "{e}");
    }
    /// `parse_fast` (used by `load`) gives what `parse` gives: the same models when the text
    /// cuts by model, the same errors when it does not or when a rule is broken.
    #[test]
    fn parse_fast_equals_parse() {
        let d = Digest::of(b"abc");
        let model = |id: &str, size: u64| {
            format!(
                "[models.\"{id}\"]\ndescription = \"{id}\"\n[models.\"{id}\".sources]\n\
                 priority = [\"local://x\"]\n[[models.\"{id}\".files]]\npath = \"f\"\n\
                 size = {size}\nsha256 = \"{d}\"\n# a comment\n"
            )
        };
        let fast = |t: &str| Manifest::parse_fast(t, "t.toml", Path::new("/b"));
        let full = |t: &str| Manifest::parse(t, "t.toml", Path::new("/b"));
        let good = format!(
            "schema_version = 1\n\n{}{}",
            model("a@1.0.0", 3),
            model("b@1.0.0", 3)
        );
        assert!(segments(&good).is_some());
        assert_eq!(format!("{:?}", fast(&good)), format!("{:?}", full(&good)));
        assert_eq!(fast(&good).unwrap().models.len(), 2);
        for bad in [
            // Same content, another size, across models: only the whole manifest sees it.
            format!(
                "schema_version = 1\n{}{}",
                model("a@1.0.0", 3),
                model("b@1.0.0", 4)
            ),
            // Problems inside a model, and a syntax error with its line.
            good.replace("path = \"f\"", "path = \"../f\""),
            good.replace("size = 3", "size = [\n"),
            // Does not cut: a key before the first table.
            format!("schema_version = 1\nextra = 1\n{}", model("a@1.0.0", 3)),
        ] {
            let want = full(&bad).unwrap_err().to_string();
            assert_eq!(fast(&bad).unwrap_err().to_string(), want, "{bad}");
        }
    }
}
