//! `[trust]` as `wan config check` meets it, through the real binary: the key, CA and trusted
//! root files it names are read, and one that is missing or not PEM fails the check, naming it.

mod common;

use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn check(cfg: &std::path::Path) -> std::process::Output {
    let mut cmd = Command::new(wan_bin());
    cmd.args(["config", "check"]).arg(cfg).stdin(Stdio::null());
    run_with_timeout(cmd, Duration::from_secs(60))
}

#[test]
fn config_check_reads_the_trust_files_and_names_a_bad_one() {
    let dir = workdir();
    let trust = fixtures().join("trust");
    let cfg = dir.path().join("wan.toml");
    let good = format!(
        "[trust]\nrequire_signature = true\nkeys = [{:?}, {:?}]\nca_roots = [{:?}]\n\
         trusted_root = {:?}\n[[trust.identities]]\nidentity = \"release@example.com\"\n\
         issuer = \"https://accounts.google.com\"\n",
        trust.join("p256.pub"),
        trust.join("p384.pub"),
        trust.join("ca/root.pem"),
        trust.join("keyless/trusted_root.json"),
    );
    fs::write(&cfg, &good).unwrap();
    let out = check(&cfg);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let missing = dir.path().join("gone.pub");
    let not_pem = dir.path().join("notes.txt");
    fs::write(&not_pem, "this is not a key\n").unwrap();
    for (bad, what) in [
        (format!("[trust]\nkeys = [{missing:?}]\n"), "gone.pub"),
        (format!("[trust]\nkeys = [{not_pem:?}]\n"), "notes.txt"),
        (format!("[trust]\nca_roots = [{not_pem:?}]\n"), "notes.txt"),
        (
            format!("[trust]\ntrusted_root = {:?}\n", trust.join("p256.pub")),
            "p256.pub",
        ),
        (
            "[trust]\n[[trust.identities]]\nidentity = \"a@b\"\nissuer = \"https://i\"\n".into(),
            "trusted_root",
        ),
        ("[trust]\nkey = []\n".into(), "key"),
    ] {
        fs::write(&cfg, &bad).unwrap();
        let out = check(&cfg);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{bad}: {stderr}");
        assert!(stderr.contains(what), "{bad}: {stderr}");
    }
}
