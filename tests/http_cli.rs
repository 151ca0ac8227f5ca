//! `wan models` through the real binary: usage errors exit 2 with clap's usage line, a
//! missing or empty selection among them, so no command reads "no selection" as every model.

mod common;

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

/// A port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `wan models --config CONFIG --manifest M --cache-dir C ARGS` with no `WAN_*` of the
/// caller's environment, plus `env`.
fn models(config: &Path, spec: &MountSpec, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(wan_bin());
    cmd.arg("models")
        .arg("--config")
        .arg(config)
        .arg("--manifest")
        .arg(&spec.manifest)
        .arg("--cache-dir")
        .arg(&spec.cache_dir)
        .args(args)
        .stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("WAN_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_with_timeout(cmd, Duration::from_secs(60))
}

#[test]
fn usage_errors_exit_2() {
    let work = workdir();
    let spec = MountSpec::new(work.path(), &work.path().join("models.toml"));
    let config = work.path().join("cli.toml");
    fs::write(
        &config,
        format!("[http]\naddr = \"127.0.0.1:{}\"\n", free_port()),
    )
    .unwrap();
    let empty: PathBuf = work.path().join("empty.txt");
    fs::write(&empty, "# nobody\n\n").unwrap();
    let empty = empty.to_str().unwrap();
    for args in [
        &["ensure"][..],
        &["verify"],
        &["verify", "--report-only"],
        &["mark-corrupted"],
        &["mark-corrupted", "--all"],
        &["ensure", "--only", ","],
        &["verify", "--only", ""],
        &["ensure", "--model-list", empty],
        &["mark-corrupted", "--model-list", empty],
        &["ensure", "--all", "--only", GEN],
        &["gc", "--auto", "--aggressive"],
        &["report", "--daily", "--storage"],
        &["pin"],
        &["status", "--bogus"],
    ] {
        let out = models(&config, &spec, &[], args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "wan models {args:?}: {err}");
        assert!(err.contains("Usage:"), "wan models {args:?}: {err}");
    }
    let out = run_wan(
        &[
            "manifest",
            "build",
            work.path().to_str().unwrap(),
            "--id",
            "x@1.0.0",
            "--chunked",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}
