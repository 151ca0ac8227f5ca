//! Logging: text or JSON lines, to stderr (journald) or a file that SIGHUP reopens (logrotate).
//!
//! Secrets never reach a log line: sources are logged by their display form, which carries no
//! credentials, and URLs that might (userinfo, signed query strings) go through
//! `source::mask_url` before they are logged or shown (source names are masked once, where
//! the source is built).
//!
//! Text a client supplied (a `.wan/` write, an HTTP path or header) goes through [`untrusted`]
//! before it reaches a log line, so it can neither forge lines nor flood the log.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// `[log]` in the config file.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// A file to append to; empty = stderr (journald under systemd).
    pub file: String,
    /// A tracing filter (`info`, `debug`, `wanfs=debug,info`); `WAN_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
            file: String::new(),
            level: "info".into(),
        }
    }
}

impl LogConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !matches!(self.format.as_str(), "text" | "json") {
            return Err(format!(
                "log.format must be \"text\" or \"json\", got {:?}",
                self.format
            ));
        }
        EnvFilter::try_new(&self.level).map_err(|e| format!("log.level {:?}: {e}", self.level))?;
        Ok(())
    }
}

struct Reopenable {
    path: PathBuf,
    file: Mutex<File>,
}

static LOG_FILE: OnceLock<Arc<Reopenable>> = OnceLock::new();

fn open(path: &PathBuf) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

#[derive(Clone)]
struct FileWriter(Arc<Reopenable>);

impl Write for FileWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.file.lock().unwrap().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.file.lock().unwrap().flush()
    }
}

impl<'a> MakeWriter<'a> for FileWriter {
    type Writer = FileWriter;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Installs the global subscriber. `WAN_LOG`, if set, overrides `cfg.level`.
pub fn init(cfg: &LogConfig) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_env("WAN_LOG").unwrap_or_else(|_| EnvFilter::new(&cfg.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let json = cfg.format == "json";
    if cfg.file.is_empty() {
        use std::io::IsTerminal;
        let b = builder
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal());
        if json { b.json().init() } else { b.init() }
    } else {
        let path = PathBuf::from(&cfg.file);
        let file = open(&path).map_err(|e| anyhow::anyhow!("log.file {}: {e}", path.display()))?;
        let r = LOG_FILE.get_or_init(|| {
            Arc::new(Reopenable {
                path,
                file: Mutex::new(file),
            })
        });
        let b = builder.with_writer(FileWriter(r.clone())).with_ansi(false);
        if json { b.json().init() } else { b.init() }
    }
    Ok(())
}

/// Reopens the log file (after logrotate moved it); no-op when logging to stderr.
pub fn reopen() {
    if let Some(r) = LOG_FILE.get() {
        match open(&r.path) {
            Ok(f) => *r.file.lock().unwrap() = f,
            Err(e) => {
                tracing::error!(path = %r.path.display(), error = %e, "could not reopen the log file")
            }
        }
    }
}

/// How many characters of client-supplied text a log line keeps.
const UNTRUSTED_MAX_CHARS: usize = 200;

/// `text` fit for a log line: control characters (newlines included) escaped as `\n`, `\u{1b}`,
/// …, so a client cannot start a line of its own, and cut to 200 characters with a
/// `… (N bytes)` suffix, so a refused 1 MiB write costs one short line.
pub fn untrusted(text: &str) -> String {
    let mut out: String = text.chars().take(UNTRUSTED_MAX_CHARS).collect();
    let cut = out.len() < text.len();
    out = out.escape_debug().to_string();
    if cut {
        out.push_str(&format!("… ({} bytes)", text.len()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::untrusted;

    #[test]
    fn untrusted_text_stays_on_one_short_line() {
        assert_eq!(untrusted("wan22-t2v@1.0.0"), "wan22-t2v@1.0.0");
        let forged = untrusted("x\n2026-01-01T00:00:00Z  INFO ensure completed\r\u{1b}[2J");
        assert!(!forged.contains('\n') && !forged.contains('\r') && !forged.contains('\u{1b}'));
        assert!(forged.starts_with("x\\n2026"), "{forged}");
        let big = "a".repeat(1 << 20);
        let line = untrusted(&big);
        assert!(line.len() < 300, "{} bytes", line.len());
        assert!(line.ends_with("… (1048576 bytes)"), "{line}");
    }
}
