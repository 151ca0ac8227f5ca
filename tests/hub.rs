//! `wan manifest build hf://org/repo@rev` against a local server shaped like the Hub: the test
//! origin serves `api/models/{repo}/tree/{rev}` (the tree listing, as JSON) and
//! `{repo}/resolve/{rev}/{path}` (the files), logging every request. Whole-file entries come
//! from the listing alone (LFS files are never downloaded), `--chunked` fetches each file once
//! and matches a local build of the same files, a listing that lies is refused, and the entry
//! mounts and reads back through the `hf://` source.

mod common;

use std::fs;
use std::process::Command;
use std::time::Duration;

use common::*;

const REPO: &str = "org/demo";
const ID: &str = "demo@1.0.0";
const TOKEN: &str = "hf_t3st";

/// A small but real safetensors file: 8-byte header length, JSON header, then the data.
fn safetensors(data_len: usize, seed: u64) -> Vec<u8> {
    let header = format!(
        "{{\"w\":{{\"dtype\":\"F16\",\"shape\":[{}],\"data_offsets\":[0,{data_len}]}}}}",
        data_len / 2
    );
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&random_bytes(data_len, seed));
    out
}

struct Hub {
    work: tempfile::TempDir,
    origin: Origin,
    /// The files as the repository holds them: (path, bytes, stored in LFS).
    files: Vec<(String, Vec<u8>, bool)>,
}

impl Hub {
    /// A repository with an LFS safetensors file, a git-stored config and a nested file;
    /// `lie` makes the listing give the safetensors file a wrong sha256.
    fn new(lie: bool) -> Hub {
        let work = workdir();
        let root = work.path().join("hub");
        let files = vec![
            (
                "config.json".to_string(),
                b"{\"dim\": 64}\n".to_vec(),
                false,
            ),
            (
                "model.safetensors".to_string(),
                safetensors(3 << 20, 7),
                true,
            ),
            (
                "tokenizer/vocab.txt".to_string(),
                b"a\nb\nc\n".to_vec(),
                false,
            ),
        ];
        let resolve = root.join(REPO).join("resolve/main");
        let mut tree = Vec::new();
        for (path, data, lfs) in &files {
            let p = resolve.join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, data).unwrap();
            let mut e = serde_json::json!({
                "type": "file", "oid": "0000000000000000000000000000000000000000",
                "size": if *lfs { 134 } else { data.len() }, "path": path,
            });
            if *lfs {
                let oid = if lie {
                    sha256_hex(b"something else")
                } else {
                    sha256_hex(data)
                };
                e["lfs"] = serde_json::json!({"oid": oid, "size": data.len(), "pointerSize": 134});
            }
            tree.push(e);
        }
        tree.push(
            serde_json::json!({"type": "directory", "oid": "1", "size": 0, "path": "tokenizer"}),
        );
        let api = root.join("api/models").join(REPO).join("tree");
        fs::create_dir_all(&api).unwrap();
        fs::write(api.join("main"), serde_json::to_vec(&tree).unwrap()).unwrap();
        let origin = Origin::start(&root);
        Hub {
            work,
            origin,
            files,
        }
    }

    /// `wan manifest build hf://org/demo@main --id demo@1.0.0 EXTRA...` with the Hub's
    /// variables set.
    fn build(&self, extra: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(wan_bin());
        cmd.args([
            "manifest",
            "build",
            &format!("hf://{REPO}@main"),
            "--id",
            ID,
        ])
        .args(extra)
        .env("HF_ENDPOINT", self.origin.url())
        .env("HF_TOKEN", TOKEN);
        run_with_timeout(cmd, Duration::from_secs(60))
    }

    fn data(&self, path: &str) -> &[u8] {
        &self.files.iter().find(|f| f.0 == path).unwrap().1
    }
}

fn stdout_ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn whole_file_entry_from_the_listing_alone_mounts_and_reads() {
    let hub = Hub::new(false);
    let entry = stdout_ok(&hub.build(&[]));
    let files = manifest_files(&entry, ID);
    assert_eq!(
        files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
        ["config.json", "model.safetensors", "tokenizer/vocab.txt"]
    );
    for f in &files {
        let data = hub.data(&f.path);
        assert_eq!(
            (f.size, &f.sha256),
            (data.len() as u64, &sha256_hex(data)),
            "{}",
            f.path
        );
        assert!(f.chunks.is_empty(), "{}: whole-file digests only", f.path);
    }
    assert!(entry.contains(&format!("\"hf://{REPO}@main\"")), "{entry}");
    // The LFS file was never downloaded; the git-stored ones were, to hash them.
    assert!(hub.origin.gets("model.safetensors").is_empty());
    assert_eq!(hub.origin.gets("resolve/main/config.json").len(), 1);
    let api = hub.origin.gets("tree/main");
    assert_eq!(api.len(), 1);
    assert_eq!(
        api[0].header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );

    // The entry mounts, and the hf:// source serves it.
    let manifest = hub.work.path().join("models.toml");
    write_manifest(&manifest, &[entry]);
    let spec = MountSpec::new(hub.work.path(), &manifest)
        .env("HF_ENDPOINT", &hub.origin.url())
        .env("HF_TOKEN", TOKEN);
    let m = Mount::start(spec);
    for (path, data, _) in &hub.files {
        let got = fs::read(m.path(&format!("{ID}/{path}"))).unwrap();
        assert_bytes_eq(&got, data, path);
    }
}

#[test]
fn chunked_build_fetches_each_file_once_and_matches_a_local_build() {
    let hub = Hub::new(false);
    let cs = 1 << 20;
    let entry = stdout_ok(&hub.build(&["--chunked", "--chunk-size", &cs.to_string()]));
    let local = manifest_build(
        &hub.work.path().join("hub").join(REPO).join("resolve/main"),
        ID,
        &BuildOpts {
            chunk_size: Some(cs),
            sources: vec![format!("hf://{REPO}@main")],
            ..BuildOpts::default()
        },
    );
    let (remote, local) = (manifest_files(&entry, ID), manifest_files(&local, ID));
    assert_eq!(remote.len(), local.len());
    for (r, l) in remote.iter().zip(&local) {
        assert_eq!(
            (&r.path, r.size, &r.sha256, r.chunk_size, &r.chunks),
            (&l.path, l.size, &l.sha256, l.chunk_size, &l.chunks),
            "{}",
            r.path
        );
    }
    assert!(remote.iter().any(|f| f.chunks.len() > 1));
    // Once per file: the bytes requested add up to the file, plus the safetensors length.
    let asked: u64 = hub
        .origin
        .gets("model.safetensors")
        .iter()
        .filter_map(|r| r.range)
        .map(|(a, b)| b - a + 1)
        .sum();
    assert_eq!(asked, hub.data("model.safetensors").len() as u64 + 8);
}

#[test]
fn a_listing_that_lies_or_refuses_is_an_error_naming_it() {
    let hub = Hub::new(true);
    let out = hub.build(&["--chunked"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("model.safetensors") && err.contains("hash to"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "no entry is printed");

    hub.origin
        .add_fault(Fault::Status(401), Some("/api/"), None);
    let out = hub.build(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("HF_TOKEN") && err.contains("401"),
        "{err}"
    );
    // A local directory with --chunked is a usage error, not a silent no-op.
    let out = run_wan(
        &[
            "manifest",
            "build",
            &hub.work.path().to_string_lossy(),
            "--id",
            ID,
            "--chunked",
        ],
        Duration::from_secs(10),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--chunked is for"));
}
