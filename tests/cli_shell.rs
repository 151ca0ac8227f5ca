//! The CLI as the shell meets it, through the real binary: completion scripts that the shells
//! accept, man pages, `--json` on commands that print, human tables by default, and the
//! progress of `wan models ensure` when its output is not a terminal (plain lines with bytes,
//! rate and ETA, and the same figures in the job status).

mod common;

use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use wanfs::config::Config;

fn wan(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(wan_bin());
    cmd.args(args).stdin(Stdio::null());
    run_with_timeout(cmd, Duration::from_secs(60))
}

fn stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn completions_load_in_their_shell_and_name_the_commands() {
    let bash = stdout(&wan(&["completions", "bash"]));
    for word in ["models", "manifest", "ensure", "--json"] {
        assert!(bash.contains(word), "bash completion lacks {word}");
    }
    // bash parses it (syntax only: nothing is run).
    let dir = workdir();
    let script = dir.path().join("wan.bash");
    fs::write(&script, &bash).unwrap();
    let ok = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .status()
        .unwrap();
    assert!(ok.success(), "bash -n refused the completion script");
    for shell in ["zsh", "fish", "elvish"] {
        let text = stdout(&wan(&["completions", shell]));
        assert!(text.contains("ensure"), "{shell}");
    }
    let out = wan(&["completions", "tcsh"]);
    assert!(!out.status.success());
}

#[test]
fn man_pages_render_for_the_command_and_each_subcommand() {
    let page = stdout(&wan(&["man"]));
    assert!(page.contains(".TH wan"), "{}", &page[..page.len().min(300)]);
    assert!(page.contains("models"));
    // What clap cannot derive: where things are, what the environment changes, what exits mean.
    let sections = |page: &str, what: &str| {
        for want in [
            ".SH FILES",
            "/etc/wan22/wan.toml",
            "/var/cache/wan22",
            ".SH ENVIRONMENT",
            "WAN_LOG",
            "HF_TOKEN",
            "HF_ENDPOINT",
            "AWS_ACCESS_KEY_ID",
            "WAN_HTTP_TOKEN",
            ".SH \"EXIT STATUS\"",
        ] {
            assert!(page.contains(want), "{what} lacks {want}");
        }
        let exit = &page[page.find("EXIT STATUS").unwrap()..];
        for code in ["\\fB0\\fR", "\\fB1\\fR", "\\fB2\\fR"] {
            assert!(
                exit.contains(code),
                "{what}: exit status {code} missing:\n{exit}"
            );
        }
    };
    sections(&page, "wan man");
    // The page renders as man(1) reads it, if man is here.
    if let Ok(out) = Command::new("sh")
        .args([
            "-c",
            "command -v groff >/dev/null && groff -k -man -Tutf8 -ww -z 2>&1",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(page.as_bytes())?;
            c.wait_with_output()
        })
    {
        let warnings = String::from_utf8_lossy(&out.stdout);
        assert!(warnings.trim().is_empty(), "groff: {warnings}");
    }
    let dir = workdir();
    let out = stdout(&wan(&["man", "--out", &dir.path().to_string_lossy()]));
    assert!(out.contains("wrote man pages"));
    sections(
        &fs::read_to_string(dir.path().join("wan.1")).unwrap(),
        "wan.1",
    );
    for name in [
        "wan.1",
        "wan-models.1",
        "wan-manifest.1",
        "wan-models-ensure.1",
    ] {
        let text =
            fs::read_to_string(dir.path().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{name}");
    }
}

#[test]
fn checks_print_json_with_json_and_text_without() {
    let dir = workdir();
    let cfg = dir.path().join("wan.toml");
    fs::write(&cfg, "[gc]\nmax_bytes = 1000\n").unwrap();
    let text = stdout(&wan(&["config", "check", &cfg.to_string_lossy()]));
    assert!(text.starts_with("ok: "));
    let v: serde_json::Value = serde_json::from_str(&stdout(&wan(&[
        "--json",
        "config",
        "check",
        &cfg.to_string_lossy(),
    ])))
    .unwrap();
    assert_eq!(v["ok"], true);
    fs::write(&cfg, "[gc]\nmax_bytes = -1\n").unwrap();
    let out = wan(&["config", "check", "--json", &cfg.to_string_lossy()]);
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert!(v["error"].as_str().unwrap().contains("max_bytes"), "{v}");

    let manifest = fixtures().join("models.toml");
    let v: serde_json::Value = serde_json::from_str(&stdout(&wan(&[
        "manifest",
        "check",
        "--json",
        &manifest.to_string_lossy(),
    ])))
    .unwrap();
    assert_eq!(v["ok"], true);
    assert!(v["files"].as_u64().unwrap() > 0, "{v}");
    let bad = dir.path().join("bad.toml");
    fs::write(&bad, "schema_version = 1\n[models.\"x\"]\n").unwrap();
    let out = wan(&["manifest", "check", "--json", &bad.to_string_lossy()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert!(!v["problems"].as_array().unwrap().is_empty(), "{v}");
}

#[test]
fn ensure_piped_prints_plain_progress_lines_and_tables_are_human() {
    // A slow origin: the ensure takes a few polls, so its progress shows while running.
    // 8 MiB at about 0.9 MiB/s: about 9 s, past the first plain
    // line (at once) and the second (5 s later).
    let setup = GenSetup::new(&[("w.bin", 8 << 20)], 1 << 20, 31);
    setup.origin.add_fault(Fault::Trickle(1 << 20), None, None);
    let work = setup.work.path();
    let cfg = work.join("wan.toml");
    // No daemon: the CLI opens the cache itself (the same job code as the daemon's).
    let mut config = Config::default();
    config.http.addr = String::new();
    config.fetch.connections = 2;
    config.fetch.part_size_kib = 1024;
    write_config(&cfg, &config);
    let base = [
        "models".to_string(),
        "--config".into(),
        cfg.to_string_lossy().into_owned(),
        "--manifest".into(),
        setup.manifest.to_string_lossy().into_owned(),
        "--cache-dir".into(),
        work.join("cache").to_string_lossy().into_owned(),
    ];
    let args = |extra: &[&str]| -> Vec<String> {
        base.iter()
            .cloned()
            .chain(extra.iter().map(|s| s.to_string()))
            .collect()
    };
    let out = run_wan(&args(&["ensure", "--only", GEN]), Duration::from_secs(60));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("ensure ")).collect();
    // At once, 5 s later (running, with a rate and an ETA), and at the end (done, 100 %).
    assert!(lines.len() >= 3, "{err}");
    assert!(
        lines[1].contains(&format!("ensure {GEN}: "))
            && lines[1].contains("/s, ETA ")
            && lines[1].ends_with("(running)"),
        "{err}"
    );
    assert!(
        lines.last().unwrap().contains(": 100% 8.0 MiB / 8.0 MiB")
            && lines.last().unwrap().ends_with("(done)"),
        "{err}"
    );
    assert!(
        !err.contains('\r') && !err.contains('\x1b'),
        "no terminal codes when piped"
    );

    let status =
        String::from_utf8(run_wan(&args(&["status"]), Duration::from_secs(30)).stdout).unwrap();
    assert!(
        status.contains("LAST ACCESS") && status.contains("COMPLETE"),
        "{status}"
    );
    let daily =
        String::from_utf8(run_wan(&args(&["report", "--daily"]), Duration::from_secs(30)).stdout)
            .unwrap();
    assert!(
        daily.starts_with("DAY") && daily.contains("download_success"),
        "{daily}"
    );
    let storage =
        String::from_utf8(run_wan(&args(&["report", "--storage"]), Duration::from_secs(30)).stdout)
            .unwrap();
    assert!(
        storage.starts_with("now: ") && storage.contains(GEN),
        "{storage}"
    );
}
