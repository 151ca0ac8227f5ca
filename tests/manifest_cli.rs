//! `wan manifest build` / `wan manifest check` end to end, and `wan mount` refusing a bad
//! manifest: every rule broken yields one line naming the model, the file and the rule.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use toml::{Table, Value};

const ID: &str = "base@1.0.0";
const CS: u64 = 4096;

/// A valid manifest for a small generated tree, as a TOML document to break.
fn base_manifest(work: &Path) -> Table {
    let src = work.join("src");
    gen_files(
        &src,
        ID,
        &[
            ("a.bin", 10_000),
            ("sub/b.bin", 5_000),
            ("c.bin", 2 * CS as usize),
        ],
        31,
    );
    let opts = BuildOpts {
        chunk_size: Some(CS),
        sources: vec![format!("local://src/{ID}")],
        whole_only: false,
    };
    let entry = manifest_build(&src.join(ID), ID, &opts);
    let files = manifest_files(&entry, ID);
    assert_eq!(files.len(), 3, "manifest build listed {files:?}");
    for f in &files {
        let data = fs::read(src.join(ID).join(&f.path)).expect("generated file");
        assert_eq!(f.size, data.len() as u64, "{}: size", f.path);
        assert_eq!(f.sha256, sha256_hex(&data), "{}: sha256", f.path);
        assert_eq!(f.chunk_size, Some(CS), "{}: chunk_size", f.path);
        // Chunk digests are BLAKE3 (the helpers build with `--chunk-hash blake3`; the whole-file
        // digest stays sha256).
        let chunks: Vec<String> = data.chunks(CS as usize).map(blake3_hex).collect();
        assert_eq!(f.chunks, chunks, "{}: chunk digests", f.path);
    }
    let doc: Table = toml::from_str(&entry).expect("entry parses");
    for f in doc["models"][ID]["files"].as_array().expect("files") {
        assert_eq!(f["chunk_hash"].as_str(), Some("blake3"), "{f}");
    }
    assert!(
        doc["models"][ID]["sources"]["priority"]
            .as_array()
            .is_some_and(|p| p.len() == 1)
    );
    doc
}

fn model(doc: &mut Table) -> &mut Table {
    doc.get_mut("models")
        .and_then(Value::as_table_mut)
        .and_then(|m| m.get_mut(ID))
        .and_then(Value::as_table_mut)
        .expect("model table")
}

fn files(doc: &mut Table) -> &mut Vec<Value> {
    model(doc)
        .get_mut("files")
        .and_then(Value::as_array_mut)
        .expect("files")
}

/// The file entry whose path is `path`.
fn file<'a>(doc: &'a mut Table, path: &str) -> &'a mut Table {
    files(doc)
        .iter_mut()
        .filter_map(Value::as_table_mut)
        .find(|f| f["path"].as_str() == Some(path))
        .expect("file entry")
}

fn write(work: &Path, name: &str, doc: &Table) -> PathBuf {
    let path = work.join(name);
    fs::write(
        &path,
        format!(
            "schema_version = 1\n\n{}",
            toml::to_string(doc).expect("serialize")
        ),
    )
    .expect("write");
    path
}

fn check(manifest: &Path) -> (bool, String) {
    let out = run_wan(
        &[Path::new("manifest"), Path::new("check"), manifest],
        Duration::from_secs(30),
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One expected error line: it must contain every group, each group satisfied by any of its
/// alternatives (rule words are matched case-insensitively).
struct Expect {
    what: &'static str,
    groups: Vec<Vec<String>>,
}

impl Expect {
    fn new(what: &'static str, id: &str, path: Option<&[&str]>, rule: &str) -> Expect {
        let mut groups = vec![vec![id.to_owned()]];
        if let Some(paths) = path {
            groups.push(paths.iter().map(|p| p.to_string()).collect());
        }
        groups.push(vec![rule.to_lowercase()]);
        Expect { what, groups }
    }

    fn matches(&self, line: &str) -> bool {
        let lower = line.to_lowercase();
        self.groups.iter().all(|g| {
            g.iter()
                .any(|alt| line.contains(alt.as_str()) || lower.contains(alt.as_str()))
        })
    }

    #[track_caller]
    fn assert_in(&self, stderr: &str) {
        assert!(
            stderr.lines().any(|l| self.matches(l)),
            "{}: no stderr line contains all of {:?}; stderr:\n{stderr}",
            self.what,
            self.groups
        );
    }
}

type Breakage = (&'static str, fn(&mut Table), Expect);

/// Turns `path`'s chunk digests into blake3-tree ones (each chunk's BLAKE3 subtree at its
/// offset), as `wan manifest build` writes by default; its uniform grid of 4 KiB chunks is
/// already aligned.
fn to_blake3_tree(doc: &mut Table, work: &Path, path: &str) {
    use wanfs::chunk::{ChunkCheck, ChunkHash, Layout};
    let data = fs::read(work.join("src").join(ID).join(path)).expect("generated file");
    let layout = Layout::new(data.len() as u64, CS);
    let f = file(doc, path);
    f.insert("chunk_hash".into(), "blake3-tree".into());
    let chunks: Vec<Value> = data
        .chunks(CS as usize)
        .enumerate()
        .map(|(i, c)| {
            ChunkCheck::of(ChunkHash::Blake3Tree, &layout, i as u64)
                .digest(c)
                .to_hex()
                .into()
        })
        .collect();
    f.insert("chunks".into(), Value::Array(chunks));
}

fn blake3_hex(data: &[u8]) -> String {
    wanfs::chunk::ChunkHash::Blake3.digest(data).to_hex()
}

/// Turns `path`'s chunk digests into sha256 ones (no `chunk_hash`), as an older build wrote
/// them: a manifest mixing both hashes.
fn to_sha256(doc: &mut Table, work: &Path, path: &str) {
    let data = fs::read(work.join("src").join(ID).join(path)).expect("generated file");
    let f = file(doc, path);
    f.remove("chunk_hash")
        .expect("a built file names its chunk hash");
    let chunks: Vec<Value> = data
        .chunks(CS as usize)
        .map(|c| sha256_hex(c).into())
        .collect();
    f.insert("chunks".into(), Value::Array(chunks));
}

fn breakages() -> Vec<Breakage> {
    vec![
        (
            "bad id",
            |d| {
                let m = d["models"].as_table_mut().expect("models");
                let v = m.remove(ID).expect("model");
                m.insert("Bad.Model@1.0".into(), v);
            },
            Expect::new("bad id", "Bad.Model@1.0", None, "id"),
        ),
        (
            "dotdot",
            |d| {
                file(d, "a.bin").insert("path".into(), "../escape.bin".into());
            },
            Expect::new("path with ..", ID, Some(&["../escape.bin"]), ".."),
        ),
        (
            "absolute",
            |d| {
                file(d, "a.bin").insert("path".into(), "/etc/escape.bin".into());
            },
            Expect::new("absolute path", ID, Some(&["/etc/escape.bin"]), "absolute"),
        ),
        (
            "duplicate",
            |d| {
                let dup = file(d, "a.bin").clone();
                files(d).push(Value::Table(dup));
            },
            Expect::new("duplicate path", ID, Some(&["a.bin"]), "duplicate"),
        ),
        (
            "case",
            |d| {
                let mut twin = file(d, "a.bin").clone();
                twin.insert("path".into(), "A.BIN".into());
                files(d).push(Value::Table(twin));
            },
            Expect::new("case collision", ID, Some(&["A.BIN", "a.bin"]), "case"),
        ),
        (
            "newline",
            |d| {
                file(d, "a.bin").insert("path".into(), "a\nb.bin".into());
            },
            Expect::new("newline in a path", ID, Some(&["a\\nb.bin"]), "newline"),
        ),
        (
            "normalization",
            |d| {
                // The same name twice: precomposed (NFC) and decomposed (NFD) "café".
                file(d, "a.bin").insert("path".into(), "caf\u{e9}.bin".into());
                let mut twin = file(d, "caf\u{e9}.bin").clone();
                twin.insert("path".into(), "cafe\u{301}.bin".into());
                files(d).push(Value::Table(twin));
            },
            Expect::new(
                "names equal under Unicode normalization",
                ID,
                Some(&["caf\u{e9}.bin"]),
                "normaliz",
            ),
        ),
        (
            "chunk count",
            |d| {
                file(d, "a.bin")
                    .get_mut("chunks")
                    .and_then(Value::as_array_mut)
                    .expect("chunks")
                    .pop();
            },
            Expect::new("chunk count", ID, Some(&["a.bin"]), "chunk"),
        ),
        (
            "uppercase hex",
            |d| {
                let f = file(d, "sub/b.bin");
                let upper = f["sha256"].as_str().expect("sha").to_uppercase();
                f.insert("sha256".into(), upper.into());
            },
            Expect::new("uppercase sha256", ID, Some(&["sub/b.bin"]), "hex"),
        ),
        (
            "short hex",
            |d| {
                let chunks = file(d, "c.bin")
                    .get_mut("chunks")
                    .and_then(Value::as_array_mut)
                    .expect("chunks");
                chunks[0] = "abc123".into();
            },
            Expect::new("short chunk digest", ID, Some(&["c.bin"]), "hex"),
        ),
        (
            "unknown chunk hash",
            |d| {
                file(d, "a.bin").insert("chunk_hash".into(), "md5".into());
            },
            Expect::new(
                "unknown chunk_hash",
                ID,
                Some(&["a.bin", "md5"]),
                "chunk_hash",
            ),
        ),
        (
            "chunk hash without chunks",
            |d| {
                file(d, "a.bin").remove("chunks");
            },
            Expect::new(
                "chunk_hash on a whole-only file",
                ID,
                Some(&["a.bin"]),
                "chunk_hash",
            ),
        ),
        (
            "long name",
            |d| {
                let name = format!("sub/{}.bin", "n".repeat(5000));
                file(d, "a.bin").insert("path".into(), name.into());
            },
            Expect::new("a 5,000-byte name", ID, Some(&["nnnn"]), "NAME_MAX"),
        ),
        (
            "long path",
            |d| {
                let name = vec!["d".repeat(250); 17].join("/");
                file(d, "a.bin").insert("path".into(), name.into());
            },
            Expect::new("a 4,266-byte path", ID, Some(&["dddd"]), "PATH_MAX"),
        ),
        (
            "huge chunk",
            |d| {
                // A whole-only file is not exempt: its grid is what a whole fetch commits by.
                let f = file(d, "a.bin");
                f.remove("chunks");
                f.remove("chunk_hash");
                f.insert("chunk_size".into(), Value::Integer(64 << 30));
            },
            Expect::new(
                "a 64 GiB chunk",
                ID,
                Some(&["a.bin"]),
                "chunk_size 68719476736",
            ),
        ),
        (
            "scheme",
            |d| {
                let sources = model(d)
                    .get_mut("sources")
                    .and_then(Value::as_table_mut)
                    .expect("sources");
                sources.insert(
                    "priority".into(),
                    Value::Array(vec!["ftp://mirror.invalid/x".into()]),
                );
            },
            Expect::new("unknown scheme", ID, Some(&["ftp"]), "scheme"),
        ),
    ]
}

#[test]
fn manifest_check_accepts_built_manifest() {
    let work = workdir();
    let doc = base_manifest(work.path());
    let (ok, stderr) = check(&write(work.path(), "good.toml", &doc));
    assert!(
        ok,
        "a manifest from `wan manifest build` was refused:\n{stderr}"
    );
}

/// One manifest, all three chunk hashes: accepted as is, and a broken digest in a file of
/// any hash is reported, each naming its file.
#[test]
fn manifest_check_takes_mixed_chunk_hashes_and_reports_errors_in_either() {
    let work = workdir();
    let mut doc = base_manifest(work.path());
    to_sha256(&mut doc, work.path(), "sub/b.bin");
    to_blake3_tree(&mut doc, work.path(), "a.bin");
    let (ok, stderr) = check(&write(work.path(), "mixed.toml", &doc));
    assert!(
        ok,
        "a manifest mixing sha256, blake3 and blake3-tree chunks was refused:\n{stderr}"
    );
    for (path, i) in [("sub/b.bin", 0), ("c.bin", 1), ("a.bin", 2)] {
        let chunks = file(&mut doc, path)
            .get_mut("chunks")
            .and_then(Value::as_array_mut)
            .expect("chunks");
        chunks[i] = "abc123".into();
    }
    let (ok, stderr) = check(&write(work.path(), "mixed-bad.toml", &doc));
    assert!(!ok, "broken digests were accepted");
    Expect::new(
        "sha256 file's bad digest",
        ID,
        Some(&["sub/b.bin"]),
        "chunks[0]",
    )
    .assert_in(&stderr);
    Expect::new(
        "blake3 file's bad digest",
        ID,
        Some(&["c.bin"]),
        "chunks[1]",
    )
    .assert_in(&stderr);
    Expect::new(
        "blake3-tree file's bad digest",
        ID,
        Some(&["a.bin"]),
        "chunks[2]",
    )
    .assert_in(&stderr);
}

#[test]
fn manifest_check_refuses_each_broken_rule_precisely() {
    let work = workdir();
    let base = base_manifest(work.path());
    for (name, breakit, expect) in breakages() {
        let mut doc = base.clone();
        breakit(&mut doc);
        let path = write(
            work.path(),
            &format!("{}.toml", name.replace(' ', "-")),
            &doc,
        );
        let (ok, stderr) = check(&path);
        assert!(
            !ok,
            "{name}: `wan manifest check` accepted:\n{}",
            fs::read_to_string(&path).unwrap_or_default()
        );
        expect.assert_in(&stderr);
    }
}

#[test]
fn manifest_check_reports_every_error_one_per_line() {
    let work = workdir();
    let mut doc = base_manifest(work.path());
    let all = breakages();
    let picked: Vec<&Breakage> = all
        .iter()
        .filter(|(n, _, _)| ["chunk count", "uppercase hex", "short hex", "scheme"].contains(n))
        .collect();
    for (_, breakit, _) in &picked {
        breakit(&mut doc);
    }
    let (ok, stderr) = check(&write(work.path(), "many.toml", &doc));
    assert!(!ok, "a manifest with four errors was accepted");
    eprintln!("{stderr}");
    for (_, _, expect) in &picked {
        expect.assert_in(&stderr);
    }
}

/// A size above i64::MAX (what `stat` can report) is refused; whole-only files up to it are
/// fine, and their total is right, not wrapped around a u64 (it once printed `8191 bytes`).
#[test]
fn manifest_check_bounds_sizes_and_adds_them_without_wrapping() {
    let work = workdir();
    let mut doc = base_manifest(work.path());
    for f in files(&mut doc).iter_mut().filter_map(Value::as_table_mut) {
        f.remove("chunks");
        f.remove("chunk_hash");
        f.insert("size".into(), Value::Integer(i64::MAX));
    }
    let path = write(work.path(), "max.toml", &doc);
    let out = run_wan(
        &[Path::new("manifest"), Path::new("check"), &path],
        Duration::from_secs(30),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("3 files, {} bytes", 3 * i64::MAX as u128)),
        "{stdout}"
    );
    let out = run_wan(
        &[
            Path::new("--json"),
            Path::new("manifest"),
            Path::new("check"),
            &path,
        ],
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["bytes"].as_f64(), Some(3.0 * i64::MAX as f64), "{v}");
    // One past i64::MAX: not a TOML integer the toml crate writes, so edited as text.
    let text = fs::read_to_string(&path).unwrap().replacen(
        &i64::MAX.to_string(),
        "9223372036854775808",
        1,
    );
    fs::write(&path, text).unwrap();
    let (ok, stderr) = check(&path);
    assert!(!ok, "a size past i64::MAX was accepted");
    Expect::new("size past i64::MAX", ID, None, "size 9223372036854775808").assert_in(&stderr);
}

/// A manifest with no models is a mistake (an entry appended to another file), not `ok`.
#[test]
fn manifest_check_refuses_an_empty_manifest() {
    let work = workdir();
    let path = work.path().join("empty.toml");
    fs::write(&path, "schema_version = 1\n").unwrap();
    let (ok, stderr) = check(&path);
    assert!(!ok, "an empty manifest was accepted");
    assert!(
        stderr.contains("empty.toml") && stderr.contains("no models"),
        "{stderr}"
    );
}

#[test]
fn mount_refuses_bad_manifest_naming_the_error() {
    if no_fuse() {
        return;
    }
    for name in ["dotdot", "long name", "huge chunk"] {
        mount_refuses(name);
    }
}

fn mount_refuses(name: &str) {
    let work = workdir();
    let mut doc = base_manifest(work.path());
    let (_, breakit, expect) = breakages()
        .into_iter()
        .find(|(n, _, _)| *n == name)
        .expect(name);
    breakit(&mut doc);
    let manifest = write(work.path(), "bad.toml", &doc);
    let spec = MountSpec::new(work.path(), &manifest);
    let (mut child, log) = spec.spawn();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            force_unmount(&spec.mountpoint);
            panic!(
                "wan mount with a bad manifest still running after 20 s; log:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !status.success(),
        "wan mount with a bad manifest exited {status}; log:\n{log}"
    );
    expect.assert_in(&log);
    assert_eq!(
        mount_count(&spec.mountpoint),
        0,
        "a bad manifest was mounted"
    );
}

/// `wan manifest build DIR` with no `--source` (the synopsis says it is optional): the tree
/// itself is the source, by its absolute path, so the entry checks and mounts from any
/// directory the manifest is kept in.
#[test]
fn build_without_a_source_serves_the_tree_it_was_built_from() {
    if no_fuse() {
        return;
    }
    let work = workdir();
    let src = work.path().join("src");
    let files = gen_files(&src, ID, &[("a.bin", 10_000), ("sub/b.bin", 5_000)], 32);
    let entry = manifest_build(&src.join(ID), ID, &BuildOpts::default());
    let abs = src.join(ID).canonicalize().unwrap();
    assert!(
        entry.contains(&format!("\"file://{}\"", abs.display())),
        "{entry}"
    );
    let elsewhere = work.path().join("etc");
    fs::create_dir_all(&elsewhere).unwrap();
    let manifest = elsewhere.join("models.toml");
    write_manifest(&manifest, &[entry]);
    let (ok, stderr) = check(&manifest);
    assert!(ok, "{stderr}");
    let m = Mount::start(MountSpec::new(work.path(), &manifest));
    for (rel, data) in &files {
        let got = fs::read(m.path(&format!("{ID}/{rel}"))).unwrap();
        assert_bytes_eq(&got, data, rel);
    }
}
