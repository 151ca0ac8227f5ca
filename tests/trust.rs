//! Publisher-signed models against a real mount (issue 19's tamper matrix). Bundles are made
//! by OpenSSF's own `model_signing` (its CLI for sha256 with a key, its Python API for BLAKE3,
//! shards and certificates: tests/support/sign_model.py), keys by openssl, certificates by
//! `cryptography` (tests/support/make_pki.py). Every tampered model must end refused, visible
//! (status, health, metric, log) and with 0 bytes of the other content served; every good one
//! must read back exactly, and `model_signing` itself must accept what the daemon accepts.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const MIB: usize = 1 << 20;

/// What `wan manifest build` writes by default (the tests' helper asks for plain BLAKE3 unless
/// told).
const TREE: &[&str] = &["--chunk-hash", "blake3-tree"];

/// Runs `cmd` in `cwd`; panics with its output if it fails.
#[track_caller]
fn sh(cwd: &Path, cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (install it: see .ci/run)"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} in {} failed ({}):\n{}{}",
        cwd.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn support(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/support")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// Where everything of one test lives: keys, certificates, the publisher's model
/// directories (`pub/`), other content of the same sizes (`evil/`), and the manifest.
struct Lab {
    work: tempfile::TempDir,
    entries: BTreeMap<String, String>,
}

impl Lab {
    fn new() -> Lab {
        let work = workdir();
        let root = work.path();
        for k in ["key1", "key2"] {
            sh(
                root,
                "openssl",
                &[
                    "ecparam",
                    "-name",
                    "prime256v1",
                    "-genkey",
                    "-noout",
                    "-out",
                    &format!("{k}.pem"),
                ],
            );
            sh(
                root,
                "openssl",
                &[
                    "ec",
                    "-in",
                    &format!("{k}.pem"),
                    "-pubout",
                    "-out",
                    &format!("{k}.pub"),
                ],
            );
        }
        sh(root, "python3", &[&support("make_pki.py"), "pki"]);
        Lab {
            work,
            entries: BTreeMap::new(),
        }
    }

    fn root(&self) -> &Path {
        self.work.path()
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root().join(rel)
    }

    /// A model directory `pub/NAME` (or `evil/NAME` for `seed` 2) with a.bin (3 MiB + 123,
    /// several chunks) and sub/b.txt.
    fn model_dir(&self, top: &str, name: &str, seed: u64) -> PathBuf {
        let dir = self.path(&format!("{top}/{name}"));
        fs::create_dir_all(dir.join("sub")).unwrap();
        write_random(&dir.join("a.bin"), 3 * MIB + 123, seed);
        write_random(&dir.join("sub/b.txt"), 5000, seed + 1000);
        dir
    }

    /// Signs `dir` as `model.sig`: `how` is `cli` (model_signing's CLI, sha256, key1), or
    /// arguments for sign_model.py.
    fn sign(&self, dir: &Path, how: &[&str]) {
        let _ = fs::remove_file(dir.join("model.sig"));
        if how == ["cli"] {
            let key = self.path("key1.pem");
            sh(
                dir,
                "model_signing",
                &[
                    "sign",
                    "key",
                    ".",
                    "--private_key",
                    key.to_str().unwrap(),
                    "--signature",
                    "model.sig",
                ],
            );
            return;
        }
        let mut args = vec![
            support("sign_model.py"),
            "sign".into(),
            ".".into(),
            "model.sig".into(),
        ];
        args.extend(
            how.iter()
                .map(|a| a.replace("@", self.root().to_str().unwrap())),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        sh(dir, "python3", &args);
    }

    /// Whether `model_signing` accepts `dir`'s signature (`how`: `--pub …` or `--ca …`, and
    /// the hash).
    fn tool_accepts(&self, dir: &Path, how: &[&str]) -> bool {
        let mut args = vec![
            support("sign_model.py"),
            "verify".into(),
            ".".into(),
            "model.sig".into(),
        ];
        args.extend(
            how.iter()
                .map(|a| a.replace("@", self.root().to_str().unwrap())),
        );
        Command::new("python3")
            .args(&args)
            .current_dir(dir)
            .status()
            .unwrap()
            .success()
    }

    /// `wan manifest build DIR --id ID`'s entry, with `edit` applied to its text.
    fn add(&mut self, id: &str, dir: &Path, edit: impl FnOnce(String) -> String) {
        let entry = manifest_build_with(dir, id, &BuildOpts::default(), TREE);
        self.entries.insert(id.into(), edit(entry));
    }

    fn write_manifest(&self) -> PathBuf {
        let path = self.path("models.toml");
        write_manifest(&path, &self.entries.values().cloned().collect::<Vec<_>>());
        path
    }
}

/// The sha256 the entry `text` lists for `path`.
fn sha_of(text: &str, id: &str, path: &str) -> String {
    manifest_files(text, id)
        .into_iter()
        .find(|f| f.path == path)
        .unwrap_or_else(|| panic!("{path} not in {id}"))
        .sha256
}

fn config(lab: &Lab, require: bool) -> wanfs::config::Config {
    let mut c = test_config();
    c.trust.require_signature = require;
    c.trust.keys = vec![lab.path("key1.pub")];
    c.trust.ca_roots = vec![lab.path("pki/ca1.pem")];
    c
}

fn status(m: &Mount) -> Value {
    serde_json::from_str(&fs::read_to_string(m.path(".wan/status")).unwrap()).unwrap()
}

/// Every file of model `id` under the mount: relative path → bytes, or the errno of the
/// first failure.
fn read_all(m: &Mount, id: &str, files: &[&str]) -> BTreeMap<String, Result<Vec<u8>, i32>> {
    files
        .iter()
        .map(|f| {
            let r = fs::read(m.path(&format!("{id}/{f}"))).map_err(|e| errno(&e));
            (f.to_string(), r)
        })
        .collect()
}

/// The verdict of `id` settles (the daemon verifies in the background after mounting).
fn settled(m: &Mount, id: &str) -> Value {
    let mut last = Value::Null;
    wait_until(Duration::from_secs(20), || {
        last = status(m)["models"][id].clone();
        last["trust"]["state"] != "pending"
    });
    last
}

/// `id` is refused for `reason`: UNTRUSTED with the reason in status, its reads fail with
/// EACCES, one log line names it; `fetched_before`: whether it was read while trusted (else
/// none of its bytes may be in the cache).
#[track_caller]
fn assert_refused(m: &Mount, id: &str, reason: &str, fetched_before: bool) {
    let files: &[&str] = if id == "stmt-extra@1.0.0" {
        &["a.bin"] // its entry lists no sub/b.txt
    } else {
        &["a.bin", "sub/b.txt"]
    };
    let s = settled(m, id);
    assert_eq!(s["state"], "UNTRUSTED", "{id}: {s:#}\n{}", m.log());
    assert_eq!(s["trust"]["reason"], reason, "{id}: {s:#}");
    assert!(
        s["trust"]["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{id}: a refusal says why: {s:#}"
    );
    for (f, r) in read_all(m, id, files) {
        match r {
            Err(e) => assert_eq!(e, libc::EACCES, "{id}/{f}: EACCES"),
            Ok(b) => panic!("{id}/{f}: {} bytes served from a refused model", b.len()),
        }
    }
    // Nothing of it was fetched: its files hold no cached byte.
    for f in files.iter().filter(|_| !fetched_before) {
        assert_eq!(
            cached_bytes(&m.path(&format!("{id}/{f}"))),
            0,
            "{id}/{f}: fetched although refused"
        );
    }
    assert!(
        m.log().contains(id) && m.log().contains("model refused"),
        "{id}: one log line names the model and the reason:\n{}",
        m.log()
    );
}

/// The whole matrix on one daemon: one model per case, so the mount, the verdicts in the
/// background and the reload are each paid once.
#[test]
fn signed_models_are_served_and_every_tampered_one_is_refused() {
    if no_fuse() {
        return;
    }
    let mut lab = Lab::new();
    // Good models, one per signing form.
    let good_sha = lab.model_dir("pub", "good-sha", 1);
    lab.sign(&good_sha, &["cli"]);
    lab.add("good-sha@1.0.0", &good_sha, |e| e);
    let good_b3 = lab.model_dir("pub", "good-b3", 2);
    lab.sign(&good_b3, &["--key", "@/key1.pem", "--hash", "blake3"]);
    lab.add("good-b3@1.0.0", &good_b3, |e| e);
    let good_shards = lab.model_dir("pub", "good-shards", 3);
    lab.sign(
        &good_shards,
        &[
            "--key",
            "@/key1.pem",
            "--hash",
            "shards",
            "--shard-size",
            "1048576",
        ],
    );
    lab.add("good-shards@1.0.0", &good_shards, |e| e);
    let good_cert = lab.model_dir("pub", "good-cert", 4);
    lab.sign(
        &good_cert,
        &[
            "--key",
            "@/pki/leaf1.key",
            "--cert",
            "@/pki/leaf1.pem",
            "--chain",
            "@/pki/int1.pem",
            "--hash",
            "blake3",
        ],
    );
    lab.add("good-cert@1.0.0", &good_cert, |e| e);
    let unsigned = lab.model_dir("pub", "unsigned", 5);
    lab.add("unsigned@1.0.0", &unsigned, |e| e);
    // `model_signing` accepts every good one.
    assert!(lab.tool_accepts(&good_sha, &["--pub", "@/key1.pub"]));
    assert!(lab.tool_accepts(&good_b3, &["--pub", "@/key1.pub"]));
    assert!(lab.tool_accepts(
        &good_shards,
        &[
            "--pub",
            "@/key1.pub",
            "--hash",
            "shards",
            "--shard-size",
            "1048576"
        ]
    ));
    assert!(lab.tool_accepts(&good_cert, &["--ca", "@/pki/ca1.pem"]));

    // Tampered: each its own directory of content (`pub/`), signed, and other content of
    // the same sizes (`evil/`).
    let tampered = |lab: &mut Lab, name: &str, seed: u64, sign: &[&str]| -> (PathBuf, PathBuf) {
        let good = lab.model_dir("pub", name, seed);
        lab.sign(&good, sign);
        let evil = lab.model_dir("evil", name, seed + 500);
        fs::copy(good.join("model.sig"), evil.join("model.sig")).unwrap();
        (good, evil)
    };
    // A digest changed in the entry: a.bin's sha256 line names the other content.
    let (good, evil) = tampered(&mut lab, "digest", 10, &["cli"]);
    let evil_sha = sha_of(
        &manifest_build_with(&evil, "x@1.0.0", &BuildOpts::default(), TREE),
        "x@1.0.0",
        "a.bin",
    );
    lab.add("digest@1.0.0", &good, |e| {
        let s = sha_of(&e, "digest@1.0.0", "a.bin");
        e.replace(&s, &evil_sha)
    });
    // Forged chunk lists, the signed sha256 lines kept: the entry of the other content with
    // the good sha256 lines (sha256-signed: served whole-checked, so the check fails).
    let forge = |lab: &mut Lab, id: &str, good: &Path, evil: &Path| {
        let real = manifest_build_with(good, "x@1.0.0", &BuildOpts::default(), TREE);
        lab.add(id, evil, |mut e| {
            for f in ["a.bin", "sub/b.txt"] {
                e = e.replace(&sha_of(&e, id, f), &sha_of(&real, "x@1.0.0", f));
            }
            e
        });
    };
    let (good, evil) = tampered(&mut lab, "forged-sha", 20, &["cli"]);
    forge(&mut lab, "forged-sha@1.0.0", &good, &evil);
    // The same for BLAKE3: the chunk list merges into another root than the signed one.
    let (good, evil) = tampered(
        &mut lab,
        "forged-b3",
        30,
        &["--key", "@/key1.pem", "--hash", "blake3"],
    );
    forge(&mut lab, "forged-b3@1.0.0", &good, &evil);
    // A wrong key, an untrusted CA, an expired certificate.
    let (good, _) = tampered(&mut lab, "wrong-key", 40, &["--key", "@/key2.pem"]);
    lab.add("wrong-key@1.0.0", &good, |e| e);
    let (good, _) = tampered(
        &mut lab,
        "cert-untrusted",
        50,
        &[
            "--key",
            "@/pki/leaf2.key",
            "--cert",
            "@/pki/leaf2.pem",
            "--chain",
            "@/pki/int2.pem",
        ],
    );
    lab.add("cert-untrusted@1.0.0", &good, |e| e);
    let (good, _) = tampered(
        &mut lab,
        "cert-expired",
        60,
        &[
            "--key",
            "@/pki/expired.key",
            "--cert",
            "@/pki/expired.pem",
            "--chain",
            "@/pki/int1.pem",
        ],
    );
    lab.add("cert-expired@1.0.0", &good, |e| e);
    // Another model's bundle.
    let (good, _) = tampered(&mut lab, "other-bundle", 70, &["cli"]);
    fs::copy(good_sha.join("model.sig"), good.join("model.sig")).unwrap();
    lab.add("other-bundle@1.0.0", &good, |e| e);
    // A truncated bundle, a garbled one.
    let (good, _) = tampered(&mut lab, "truncated", 80, &["cli"]);
    let sig = fs::read(good.join("model.sig")).unwrap();
    fs::write(good.join("model.sig"), &sig[..sig.len() / 2]).unwrap();
    lab.add("truncated@1.0.0", &good, |e| e);
    let (good, _) = tampered(&mut lab, "garbled", 90, &["cli"]);
    let text = fs::read_to_string(good.join("model.sig")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let s = v["dsseEnvelope"]["signatures"][0]["sig"].as_str().unwrap();
    let flipped = format!("{}{}", if s.starts_with('M') { "N" } else { "M" }, &s[1..]);
    fs::write(good.join("model.sig"), text.replace(s, &flipped)).unwrap();
    lab.add("garbled@1.0.0", &good, |e| e);
    // A file in the statement but not in the entry, and the reverse.
    let (good, _) = tampered(&mut lab, "stmt-extra", 100, &["cli"]);
    lab.add("stmt-extra@1.0.0", &good, |e| {
        let at = e.find("path = \"sub/b.txt\"").unwrap();
        let start = e[..at].rfind("[[models").unwrap();
        let end = e[at..].find("[[models").map_or(e.len(), |n| at + n);
        format!("{}{}", &e[..start], &e[end..])
    });
    let (good, _) = tampered(&mut lab, "entry-extra", 110, &["cli"]);
    write_random(&good.join("c.bin"), 1000, 111);
    lab.add("entry-extra@1.0.0", &good, |e| e);
    let manifest = lab.write_manifest();

    let m = Mount::start(MountSpec::new(lab.root(), &manifest).config(config(&lab, false)));

    // The good ones: exact bytes, who signed them in status.
    for (id, dir) in [
        ("good-sha@1.0.0", &good_sha),
        ("good-b3@1.0.0", &good_b3),
        ("good-shards@1.0.0", &good_shards),
        ("good-cert@1.0.0", &good_cert),
        ("unsigned@1.0.0", &unsigned),
    ] {
        if id == "good-b3@1.0.0" {
            // BLAKE3-signed: lazy, chunk by chunk. One 4 KiB read fetches a chunk, not the file.
            let got =
                read_range(&m.path(&format!("{id}/a.bin")), 2 * MIB as u64 + 4096, 4096).unwrap();
            let want = fs::read(dir.join("a.bin")).unwrap();
            assert_eq!(got, want[2 * MIB + 4096..2 * MIB + 8192]);
            let cached = cached_bytes(&m.path(&format!("{id}/a.bin")));
            assert!(
                cached < want.len() as u64,
                "{id}: a 4 KiB read fetched {cached} bytes: not lazy"
            );
        }
        for (f, r) in read_all(&m, id, &["a.bin", "sub/b.txt"]) {
            let want = fs::read(dir.join(&f)).unwrap();
            assert_bytes_eq(
                &r.unwrap_or_else(|e| panic!("{id}/{f}: errno {e}\n{}", m.log())),
                &want,
                &format!("{id}/{f}"),
            );
        }
        let s = settled(&m, id);
        assert_ne!(s["state"], "UNTRUSTED", "{id}: {s:#}\n{}", m.log());
    }
    let signer = |id: &str| {
        settled(&m, id)["trust"]["signed_by"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    assert!(
        signer("good-sha@1.0.0").starts_with("key sha256:"),
        "{}",
        signer("good-sha@1.0.0")
    );
    assert!(
        signer("good-cert@1.0.0").contains("publisher 1"),
        "{}",
        signer("good-cert@1.0.0")
    );
    assert_eq!(
        settled(&m, "good-sha@1.0.0")["trust"]["whole_checked_files"],
        2
    );
    assert_eq!(settled(&m, "unsigned@1.0.0")["trust"]["state"], "unsigned");

    // Every tampered one: refused, visible, nothing served.
    for (id, reason) in [
        ("digest@1.0.0", "mismatch"),
        ("forged-b3@1.0.0", "mismatch"),
        ("wrong-key@1.0.0", "untrusted"),
        ("cert-untrusted@1.0.0", "untrusted"),
        ("cert-expired@1.0.0", "untrusted"),
        ("other-bundle@1.0.0", "mismatch"),
        ("truncated@1.0.0", "invalid"),
        ("garbled@1.0.0", "invalid"),
        ("stmt-extra@1.0.0", "mismatch"),
        ("entry-extra@1.0.0", "mismatch"),
    ] {
        assert_refused(&m, id, reason, false);
    }
    // The forged sha256 chunk list binds (its sha256 lines are the signed ones), so its files
    // are fetched whole and checked: the check fails, the read fails, nothing is served.
    let failures = m.metric("wan_integrity_failures_total");
    for (f, r) in read_all(&m, "forged-sha@1.0.0", &["a.bin", "sub/b.txt"]) {
        assert_eq!(r.map(|b| b.len()), Err(libc::EIO), "forged-sha@1.0.0/{f}");
    }
    // Visible: each file's whole-file check failed and was counted, and nothing of it is
    // cached.
    assert!(
        m.metric("wan_integrity_failures_total") >= failures + 2.0,
        "the failed whole-file checks are not counted"
    );
    for f in ["a.bin", "sub/b.txt"] {
        assert_eq!(cached_bytes(&m.path(&format!("forged-sha@1.0.0/{f}"))), 0);
    }
    let health: Value =
        serde_json::from_str(&fs::read_to_string(m.path(".wan/health")).unwrap()).unwrap();
    assert_eq!(health["status"], "degraded", "{health:#}");
    assert_eq!(health["checks"]["trust"]["ok"], false, "{health:#}");
    let metrics = fs::read_to_string(m.path(".wan/metrics")).unwrap();
    for (reason, n) in [("mismatch", 5), ("untrusted", 3), ("invalid", 2)] {
        let line = format!("wan_models_untrusted{{reason=\"{reason}\"}} {n}");
        assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
    }

    // A reload that swaps good-sha's bundle for another model's, and sets require_signature
    // ([trust] applies on reload): both models are refused from then on.
    fs::copy(good_b3.join("model.sig"), good_sha.join("model.sig")).unwrap();
    lab.add("good-sha@1.0.0", &good_sha, |e| e);
    lab.write_manifest();
    for e in fs::read_dir(lab.root()).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("wan-") && name.ends_with(".toml") {
            write_config(&p, &config(&lab, true));
        }
    }
    hup(m.pid());
    assert!(
        wait_until(Duration::from_secs(10), || m
            .log()
            .contains("reloaded configuration")),
        "no reload:\n{}",
        m.log()
    );
    assert_refused(&m, "good-sha@1.0.0", "mismatch", true);
    assert_refused(&m, "unsigned@1.0.0", "missing", true);
    // A model still signed by a trusted key stays trusted under the new policy.
    let s = settled(&m, "good-b3@1.0.0");
    assert_eq!(s["trust"]["state"], "trusted", "{s:#}");
}
