//! The rules a manifest keeps, and how a broken one is reported (`ManifestError`, one
//! `Problem` per broken rule): model ids (and the "did you mean" for an unknown one), paths
//! (each alone, then against the model's others: duplicates, case, Unicode normalization, a
//! file that is also a directory), sizes, chunk grids, and one content described alike in
//! every file that holds it. `parse` applies them to a manifest, `build` to a local tree,
//! `check_listing` to a remote one, `bounds_rule` to a compiled form as it opens.

use std::collections::{HashMap, HashSet};
use std::fmt;

use super::{FileEntry, HEAD_ALIGN, Manifest, Verification};
use crate::chunk::{Digest, LayoutKind};

/// Everything wrong with a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{file}: cannot read: {err}")]
    Io { file: String, err: std::io::Error },
    #[error("{file}: {msg}")]
    Syntax { file: String, msg: String },
    #[error("{}", .problems.iter().map(|p| format!("{}: {p}", .file)).collect::<Vec<_>>().join("\n"))]
    Invalid {
        file: String,
        problems: Vec<Problem>,
    },
}

/// One broken rule.
#[derive(Debug, Clone)]
pub struct Problem {
    pub model: String,
    pub path: Option<String>,
    pub rule: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "model {:?}", self.model)?;
        if let Some(p) = &self.path {
            write!(f, ", file {}", Shown(p, PATH_MAX))?;
        }
        write!(f, ": {}", self.rule)
    }
}

/// Whether two files with one sha256 describe its content alike: the same size, chunk grid
/// (chunk_size, head_size, and the layout: aligned for `blake3-tree`, the head grid for the
/// others) and, where both list chunks under the same hash, the same chunks. Lists under
/// different hashes differ anyway and describe the same bytes (an old sha256 entry beside a
/// new BLAKE3 one), so they are not compared. The store keeps one grid per blob, so a
/// `blake3-tree` entry and another of the same content must agree on that too.
pub(super) fn same_content(a: &FileEntry, b: &FileEntry) -> bool {
    a.size == b.size
        && a.layout() == b.layout()
        && match (&a.verification, &b.verification) {
            (Verification::Chunked(ac), Verification::Chunked(bc)) => {
                a.chunk_hash != b.chunk_hash || ac == bc
            }
            (Verification::Whole, _) | (_, Verification::Whole) => true,
        }
}

impl Manifest {
    /// Whether files with the same sha256 are described identically everywhere (the rule
    /// `parse` enforces across models), for a manifest assembled from models parsed apart.
    pub fn shared_content_consistent(&self) -> bool {
        let mut first: HashMap<Digest, &FileEntry> = HashMap::new();
        for f in self.models.values().flat_map(|m| &m.files) {
            match first.get(&f.sha256) {
                Some(o) if !same_content(o, f) => return false,
                Some(_) => {}
                None => {
                    first.insert(f.sha256, f);
                }
            }
        }
        true
    }
}

/// Checks a model id against `^[A-Za-z0-9][A-Za-z0-9_-]*@\d+\.\d+\.\d+$` (see
/// [`ModelId`](super::ModelId)).
pub fn valid_id(id: &str) -> bool {
    let Some((name, version)) = id.split_once('@') else {
        return false;
    };
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let parts: Vec<&str> = version.split('.').collect();
    let version_ok = parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    first_ok && rest_ok && version_ok
}

/// The id among `known` that an unknown `id` was probably meant to be, for a "did you mean"
/// hint wherever an id is refused (ids are case sensitive): the same id ignoring case, else
/// the only id within two edits (e.g. a mistyped version). `None` when nothing is close or the
/// guess would be ambiguous.
pub fn suggest_id<'a>(id: &str, known: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let known: Vec<&str> = known.into_iter().collect();
    if let Some(k) = known.iter().find(|k| k.eq_ignore_ascii_case(id)) {
        return Some(k);
    }
    let lower = id.to_ascii_lowercase();
    let near: Vec<&str> = known
        .into_iter()
        .filter(|k| edit_distance(&k.to_ascii_lowercase(), &lower) <= 2)
        .collect();
    match near[..] {
        [one] => Some(one),
        _ => None,
    }
}

/// Levenshtein distance over chars (ids are short).
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (diag + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// The longest name of one path component, in bytes: NAME_MAX. The kernel takes no longer
/// name, and a directory listing that holds one fails whole (`ls` of the model gives EIO).
pub const NAME_MAX: usize = 255;

/// The longest path of a file within its model, in bytes: PATH_MAX (4096) counts the
/// terminating NUL, so a path the kernel can take is at most 4095 bytes.
pub const PATH_MAX: usize = 4095;

/// The largest file size: `stat` reports a size as a signed 64-bit `off_t`.
pub const MAX_FILE_SIZE: u64 = i64::MAX as u64;

/// The largest `chunk_size` (and so `head_size`): 64 MiB. A chunk is fetched, held in memory
/// and verified whole before any of its bytes reach a reader, so its size is memory the
/// daemon allocates at once and the wait of a reader's first byte. 64 MiB is the default
/// `fetch.max_inflight_mib` (one chunk may take the whole fetch budget, no more) and 8x the
/// default chunk; a manifest that said 64 GiB made the daemon abort allocating one chunk.
/// Whole-only files (no `chunks`) of any size are fine: only their grid is bounded.
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;

/// The rule a file's path breaks on its own, if any.
pub fn path_rule(path: &str) -> Option<String> {
    path_rule_static(path)
        .map(str::to_string)
        .or_else(|| length_rule(path))
}

/// The rule a path's length breaks, if any: each component at most [`NAME_MAX`] bytes, the
/// whole at most [`PATH_MAX`].
fn length_rule(path: &str) -> Option<String> {
    if let Some(long) = path.split('/').find(|s| s.len() > NAME_MAX) {
        return Some(format!(
            "path component {} is {} bytes long; the longest is {NAME_MAX} (NAME_MAX)",
            Shown(long, NAME_MAX),
            long.len()
        ));
    }
    (path.len() > PATH_MAX).then(|| {
        format!(
            "path is {} bytes long; the longest is {PATH_MAX} (PATH_MAX)",
            path.len()
        )
    })
}

/// A name as errors show it: quoted and escaped, and cut short past the longest it may be
/// (a 5,000-byte name in full would bury the rule it breaks).
struct Shown<'a>(&'a str, usize);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const KEEP: usize = 48;
        if self.0.len() <= self.1 {
            return write!(f, "{:?}", self.0);
        }
        let mut cut = KEEP;
        while !self.0.is_char_boundary(cut) {
            cut -= 1;
        }
        write!(f, "{:?}… ({} bytes)", &self.0[..cut], self.0.len())
    }
}

/// The rule a file's size breaks, if any.
pub fn size_rule(size: u64) -> Option<String> {
    (size > MAX_FILE_SIZE).then(|| {
        format!(
            "size {size} is larger than {MAX_FILE_SIZE} (i64::MAX, the largest a stat can report)"
        )
    })
}

/// The rule a chunk grid (`chunk_size`, `head_size`) breaks, if any.
pub(super) fn grid_rule(chunk_size: u64, head_size: u64) -> Option<String> {
    if chunk_size == 0 {
        return Some("chunk_size must be positive".into());
    }
    if chunk_size > MAX_CHUNK_SIZE {
        return Some(format!(
            "chunk_size {chunk_size} is larger than {MAX_CHUNK_SIZE} (64 MiB: a chunk is held in memory whole)"
        ));
    }
    if head_size == 0
        || head_size > chunk_size
        || (head_size != chunk_size && !head_size.is_multiple_of(HEAD_ALIGN))
    {
        return Some(format!(
            "head_size {head_size} must be chunk_size ({chunk_size}) or a positive multiple of {HEAD_ALIGN} below it"
        ));
    }
    None
}

/// The rule a `blake3-tree` file's grid breaks, if any: its chunks must be whole aligned
/// BLAKE3 subtrees ([`LayoutKind::Aligned`]), so `head_size` and `chunk_size` are powers of
/// two of at least 1 KiB (on top of [`grid_rule`]).
pub(super) fn aligned_rule(chunk_size: u64, head_size: u64) -> Option<String> {
    (!LayoutKind::Aligned.fits(chunk_size, head_size)).then(|| {
        format!(
            "chunk_hash \"blake3-tree\" wants head_size ({head_size}) and chunk_size ({chunk_size}) powers of two of at least {} (each chunk a whole, aligned BLAKE3 subtree)",
            blake3::CHUNK_LEN
        )
    })
}

/// The bounds [`Manifest::parse`] puts on every file (its path's length, its size, its chunk
/// grid), for a compiled form to check as it opens: a form written by an older wanfs, whose
/// rules had no bounds, is then compiled again and refused as its manifest is. Cheaper than
/// every path rule, which forms of this format always passed.
pub fn bounds_rule(path: &str, size: u64, chunk_size: u64, head_size: u64) -> Option<String> {
    length_rule(path)
        .or_else(|| size_rule(size))
        .or_else(|| grid_rule(chunk_size, head_size))
}

fn path_rule_static(path: &str) -> Option<&'static str> {
    if path.is_empty() {
        return Some("path is empty");
    }
    if path.starts_with('/') {
        return Some("path must be relative, not absolute");
    }
    if path.contains('\\') {
        return Some("path must not contain a backslash (separate directories with '/')");
    }
    if path.contains('\0') {
        return Some("path must not contain NUL");
    }
    // One path per line is what `find`, logs and shell loops assume.
    if path.contains(['\n', '\r']) {
        return Some("path must not contain a newline (\\n or \\r)");
    }
    for seg in path.split('/') {
        match seg {
            ".." => return Some("path must not contain '..'"),
            "" | "." => return Some("path must not contain empty or '.' segments"),
            s if s.starts_with(".wan") && path.split('/').next() == Some(s) => {
                return Some("path must not start with the reserved name .wan");
            }
            _ => {}
        }
    }
    None
}

/// The path rules of one model: each path alone ([`path_rule`]), then against the paths
/// before it. Two names that differ only in Unicode normalization (NFC "caf\u{e9}" vs NFD
/// "cafe\u{301}") look identical to a person and are one file on a filesystem that normalizes
/// (macOS, some NFS and SMB servers), so they are refused like a case collision.
#[derive(Default)]
pub(super) struct PathRules {
    seen: HashSet<String>,
    /// NFC form -> the first path with it.
    seen_nfc: HashMap<String, String>,
    /// Lower-cased NFC form -> the first path with it.
    seen_lower: HashMap<String, String>,
}

impl PathRules {
    /// The rule `path` breaks, if any; a path that breaks none is remembered.
    pub(super) fn check(&mut self, path: &str) -> Result<(), String> {
        use unicode_normalization::UnicodeNormalization;
        if let Some(rule) = path_rule(path) {
            return Err(rule);
        }
        if self.seen.contains(path) {
            return Err("duplicate path".into());
        }
        let nfc: String = path.nfc().collect();
        if let Some(other) = self.seen_nfc.get(&nfc) {
            return Err(format!(
                "path equals {other:?} under Unicode normalization (NFC); name each file once"
            ));
        }
        let lower = nfc.to_lowercase();
        if let Some(other) = self.seen_lower.get(&lower) {
            return Err(format!("path collides with {other:?} when case is ignored"));
        }
        self.seen.insert(path.to_string());
        self.seen_nfc.insert(nfc, path.to_string());
        self.seen_lower.insert(lower, path.to_string());
        Ok(())
    }

    /// The directories of `path` (`a`, `a/b` of `a/b/c`) that are remembered as files.
    pub(super) fn files_above<'p>(&self, path: &'p str) -> impl Iterator<Item = &'p str> {
        path.match_indices('/')
            .map(|(i, _)| &path[..i])
            .filter(|dir| self.seen.contains(*dir))
    }
}

/// Refuses a remote listing (each file's path and size, as the Hub or S3 gives them) that no
/// manifest could hold, before any of its files is fetched: a name the path rules refuse
/// (`../x`, `/etc/passwd`, a 5,000-byte name...), a size `stat` cannot report, a file that
/// is also a directory. Every problem is named, one per file, under `what` (the URL).
pub fn check_listing<'a>(
    id: &str,
    what: &str,
    files: impl IntoIterator<Item = (&'a str, u64)>,
) -> Result<(), ManifestError> {
    let mut rules = PathRules::default();
    let mut problems = Vec::new();
    let mut bad = |path: &str, rule: String| {
        problems.push(Problem {
            model: id.to_string(),
            path: Some(path.to_string()),
            rule,
        })
    };
    let mut kept = Vec::new();
    for (path, size) in files {
        match rules.check(path).err().or_else(|| size_rule(size)) {
            Some(rule) => bad(path, rule),
            None => kept.push(path),
        }
    }
    for path in kept {
        for dir in rules.files_above(path) {
            bad(
                dir,
                format!("path is both a file and a directory of {path:?}"),
            );
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(ManifestError::Invalid {
        file: what.to_string(),
        problems,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::manifest::ModelId;
    use crate::manifest::tests::{entry, parse, problems};

    #[test]
    fn ids() {
        for ok in ["t2v-A14B@2.2.0", "a@0.0.0", "A_b-c@10.20.30"] {
            assert!(valid_id(ok), "{ok}");
        }
        for bad in [
            "-a@1.0.0",
            "a@1.0",
            "a@1.0.x",
            "a",
            "a b@1.0.0",
            "a@1.0.0.0",
            "@1.0.0",
        ] {
            assert!(!valid_id(bad), "{bad}");
            assert!(bad.parse::<ModelId>().is_err(), "{bad}");
            assert!(
                serde_json::from_str::<ModelId>(&format!("{bad:?}")).is_err(),
                "{bad}"
            );
        }
    }
    #[test]
    fn suggestions() {
        let known = ["ti2v-5B@2.2.0", "t2v-A14B@2.2.0", "i2v-A14B@2.2.0"];
        let s = |id| suggest_id(id, known);
        assert_eq!(s("ti2v-5b@2.2.0"), Some("ti2v-5B@2.2.0"));
        assert_eq!(s("TI2V-5B@2.2.0"), Some("ti2v-5B@2.2.0"));
        assert_eq!(s("ti2v-5b@2.2.1"), Some("ti2v-5B@2.2.0"));
        assert_eq!(s("flux-dev@1.0.0"), None);
        // t2v and i2v are both one edit from "x2v-A14B@2.2.0": no guess.
        assert_eq!(s("x2v-A14B@2.2.0"), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
    #[test]
    fn rules_name_model_file_and_rule() {
        let e = problems(&entry("../x", ""));
        assert!(
            e.contains("\"m@1.0.0\"") && e.contains("\"../x\"") && e.contains(".."),
            "{e}"
        );
        assert!(problems(&entry("/abs", "")).contains("absolute"));
        let e = problems(&(entry("a", "") + &entry("a", "")));
        assert!(e.contains("duplicate"), "{e}");
        let e = problems(&(entry("A", "") + &entry("a", "")));
        assert!(e.contains("case"), "{e}");
        let e = problems(&entry("a\\b", ""));
        assert!(e.contains("backslash") && e.contains(r#""a\\b""#), "{e}");
        let e = problems(&entry("a\nb", ""));
        assert!(e.contains("newline"), "{e}");
        let e = problems(&(entry("caf\u{e9}", "") + &entry("cafe\u{301}", "")));
        assert!(
            e.contains("normalization") && e.contains("caf\u{e9}"),
            "{e}"
        );
        let e = problems(&(entry("Caf\u{e9}", "") + &entry("cafe\u{301}", "")));
        assert!(e.contains("case"), "{e}");
        let e = problems(&entry("a", "chunk_size = 2\nchunks = [\"00\"]"));
        assert!(e.contains("chunk count 1") && e.contains("want 2"), "{e}");
        let bad_hex = "[[models.\"m@1.0.0\".files]]\npath = \"z\"\nsize = 1\nsha256 = \"XYZ\"\n";
        assert!(problems(bad_hex).contains("sha256"));
        let text = "schema_version = 1\n[models.\"m@1.0.0\".sources]\npriority = [\"ftp://x\"]\n";
        let e = Manifest::parse(text, "t.toml", Path::new("/"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("scheme") && e.contains("ftp://x"), "{e}");
        let text = "schema_version = 1\n[models.\"bad id\".sources]\npriority = [\"local://x\"]\n";
        let e = Manifest::parse(text, "t.toml", Path::new("/"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bad model id") && e.contains("\"bad id\""),
            "{e}"
        );
    }
    /// Names, sizes and chunk grids are bounded: what `check` accepts, the mount can serve.
    #[test]
    fn names_sizes_and_chunk_grids_are_bounded() {
        let long = "n".repeat(NAME_MAX + 1);
        let e = problems(&entry(&format!("dir/{long}"), ""));
        assert!(
            e.contains("256 bytes long") && e.contains("NAME_MAX"),
            "{e}"
        );
        assert!(parse(&entry(&"n".repeat(NAME_MAX), "")).is_ok());
        let deep = vec!["d".repeat(200); 21].join("/");
        let e = problems(&entry(&deep, ""));
        assert!(e.contains("PATH_MAX") && e.contains("4220 bytes"), "{e}");
        let e = problems(&entry("a", "").replace("size = 3", "size = 9223372036854775808"));
        assert!(
            e.contains("size 9223372036854775808") && e.contains("i64::MAX"),
            "{e}"
        );
        // A whole-only file of any size a stat can report is fine; its grid is bounded.
        let max = entry("a", "").replace("size = 3", "size = 9223372036854775807");
        assert!(parse(&max).is_ok());
        let e = problems(&entry("a", "chunk_size = 68719476736"));
        assert!(
            e.contains("chunk_size 68719476736") && e.contains("64 MiB"),
            "{e}"
        );
        assert!(parse(&entry("a", &format!("chunk_size = {MAX_CHUNK_SIZE}"))).is_ok());
        let e = problems(&entry("a", "chunk_size = 68719476736\nhead_size = 4096"));
        assert!(e.contains("chunk_size 68719476736"), "{e}");
    }
    /// A remote listing is checked as a manifest's files would be, every problem named.
    #[test]
    fn listings_are_checked_before_anything_is_fetched() {
        let ok = [("a/b", 1), ("c", 0)];
        assert!(check_listing("m@1.0.0", "hf://o/r@main", ok).is_ok());
        let long = "x".repeat(5000);
        let bad = [
            ("../x", 1),
            ("/etc/passwd", 1),
            (long.as_str(), 1),
            ("big", u64::MAX),
            ("d", 0),
            ("d/e", 1),
            ("", 0),
        ];
        let e = check_listing("m@1.0.0", "hf://o/r@main", bad)
            .unwrap_err()
            .to_string();
        for want in [
            "hf://o/r@main: model \"m@1.0.0\", file \"../x\": path must not contain '..'",
            "file \"/etc/passwd\": path must be relative",
            "file \"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"… (5000 bytes): path component",
            "file \"big\": size 18446744073709551615",
            "file \"d\": path is both a file and a directory of \"d/e\"",
            "file \"\": path is empty",
        ] {
            assert!(e.contains(want), "{want:?} not in:\n{e}");
        }
        assert_eq!(e.lines().count(), 6, "{e}");
    }
    #[test]
    fn head_size_rules() {
        let d = Digest::of(b"abc");
        let e = problems(&entry("f", "chunk_size = 8192\nhead_size = 100"));
        assert!(e.contains("head_size 100"), "{e}");
        let e = problems(&entry("f", "chunk_size = 8192\nhead_size = 16384"));
        assert!(e.contains("head_size 16384"), "{e}");
        // size 3 with a 4096 head: one chunk.
        let ok = parse(&entry(
            "f",
            &format!("chunk_size = 8192\nhead_size = 4096\nchunks = [\"{d}\"]"),
        ));
        assert_eq!(ok.unwrap().models["m@1.0.0"].files[0].layout().count(), 1);
    }

    /// A `blake3-tree` file: powers of two of at least 1 KiB, the aligned layout's chunk
    /// count; each broken rule named with model, file and field. Its blob is not described
    /// under another layout elsewhere.
    #[test]
    fn blake3_tree_rules() {
        let d = Digest::of(b"abc");
        let tree = |size: u64, grid: &str, n: usize| {
            let chunks = vec![format!("\"{d}\""); n].join(", ");
            entry(
                "t",
                &format!("{grid}\nchunk_hash = \"blake3-tree\"\nchunks = [{chunks}]"),
            )
            .replace("size = 3", &format!("size = {size}"))
        };
        // 20 KiB, head 4 KiB, chunk 8 KiB: 4, 4, 8, then 4 of the last 8.
        let ok = parse(&tree(20 << 10, "chunk_size = 8192\nhead_size = 4096", 4)).unwrap();
        let f = &ok.models["m@1.0.0"].files[0];
        assert_eq!(
            f.layout(),
            crate::chunk::Layout::aligned(20 << 10, 8192, 4096)
        );
        // The head grid would want 1 + ceil(16 / 8) = 3.
        let e = problems(&tree(20 << 10, "chunk_size = 8192\nhead_size = 4096", 3));
        assert!(
            e.contains("model \"m@1.0.0\", file \"t\": chunk count 3")
                && e.contains("aligned blake3-tree layout (want 4)"),
            "{e}"
        );
        for grid in [
            "chunk_size = 12288\nhead_size = 4096",
            "chunk_size = 24576",
            "chunk_size = 512",
        ] {
            let e = problems(&tree(3, grid, 1));
            assert!(
                e.contains("file \"t\": chunk_hash \"blake3-tree\" wants head_size")
                    && e.contains("powers of two of at least 1024"),
                "{grid}: {e}"
            );
        }
        assert!(parse(&tree(3, "chunk_size = 1024", 1)).is_ok());
        // The same content under the head grid, whose chunks are other ranges.
        let other = entry("o", "chunk_size = 8192\nhead_size = 4096")
            .replace("size = 3", &format!("size = {}", 20 << 10));
        let both = format!(
            "{}{other}",
            tree(20 << 10, "chunk_size = 8192\nhead_size = 4096", 4)
        );
        let e = problems(&both);
        assert!(e.contains("layout (blake3-tree or not)"), "{e}");
        // A uniform grid is one grid under every hash: the same content may be listed both ways.
        let uniform = entry("u", &format!("chunk_size = 4096\nchunks = [\"{d}\"]"));
        assert!(parse(&format!("{}{uniform}", tree(3, "chunk_size = 4096", 1))).is_ok());
    }
}
