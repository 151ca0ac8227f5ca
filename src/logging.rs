//! Logging: text or JSON lines, to stderr (journald) or a file that SIGHUP reopens (logrotate).
//!
//! Secrets never reach a log line: sources are logged by their display form, which carries no
//! credentials, and URLs that might (userinfo, signed query strings) go through
//! `source::mask_url` before they are logged or shown (source names are masked once, where
//! the source is built).
//!
//! Text a client supplied (a `.wan/` write, an HTTP path or header) goes through [`untrusted`]
//! before it reaches a log line, so it can neither forge lines nor flood the log. Every other
//! field is escaped on its way out ([`Escaped`]): names from a manifest or a Hub listing (a
//! file called `a\u{1b}[2J` or `x\u{2028}y`), and the errors that quote them, cannot start a
//! line of their own or send escape codes to a terminal, in text or JSON.
//!
//! A filter (`[log] level`, `WAN_LOG`) is a list of levels and `TARGET=LEVEL` directives,
//! checked here ([`check_filter`]): nothing an operator writes may leave the daemon silent.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};
use tracing::field::{Field, Visit};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::{FormatFields, Writer};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;

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
        check_filter(&self.level).map_err(|e| format!("log.level {:?}: {e}", self.level))
    }
}

/// The level names a filter directive may use.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Checks a log filter the way an operator means it: each comma-separated directive is a level
/// (`info`) or `target=level` (`wanfs=debug`). `EnvFilter` itself takes a bare word as a target
/// name that enables that target alone, so a typo (`inf`) would silence every line.
pub fn check_filter(filter: &str) -> Result<(), String> {
    let filter = normalized(filter);
    if filter.is_empty() {
        return Err(format!("is empty; use a level: {}", LEVELS.join(", ")));
    }
    for directive in filter.split(',') {
        let level = match directive.rsplit_once('=') {
            Some((target, level)) if !target.trim().is_empty() => level,
            _ => directive,
        };
        if !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level.trim())) {
            return Err(format!(
                "directive {directive:?} is neither a level ({}) nor TARGET=LEVEL",
                LEVELS.join(", ")
            ));
        }
    }
    // The targets' own syntax (`target[span{field}]=level`) is EnvFilter's to judge.
    EnvFilter::try_new(&filter).map_err(|e| e.to_string())?;
    Ok(())
}

/// `filter` without blanks around its directives or empty ones (`info, wanfs=debug,`), which
/// EnvFilter would otherwise take as part of a target's name.
fn normalized(filter: &str) -> String {
    let parts: Vec<&str> = filter
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    parts.join(",")
}

/// The filter in force: `WAN_LOG` when it is set and valid, else `level`. An invalid `WAN_LOG`
/// must not leave the daemon silent: it is reported (as the returned warning) and ignored.
fn filter(level: &str, wan_log: Option<String>) -> (EnvFilter, Option<String>) {
    let fallback =
        || EnvFilter::try_new(normalized(level)).unwrap_or_else(|_| EnvFilter::new("info"));
    match wan_log {
        None => (fallback(), None),
        Some(v) => match check_filter(&v) {
            Ok(()) => (EnvFilter::new(normalized(&v)), None),
            Err(e) => (
                fallback(),
                Some(format!(
                    "WAN_LOG \"{}\": {e}; ignored, logging at level {level:?}",
                    untrusted(&v)
                )),
            ),
        },
    }
}

/// What is wrong with `WAN_LOG`, if it is set and not a valid filter (`wan config check`).
pub fn wan_log_problem() -> Option<String> {
    let v = std::env::var("WAN_LOG").ok()?;
    check_filter(&v)
        .err()
        .map(|e| format!("WAN_LOG \"{}\": {e}; ignored", untrusted(&v)))
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

/// Installs the global subscriber. `WAN_LOG`, if set and valid, overrides `cfg.level`; an
/// invalid one is warned about on stderr (and in the log) and ignored.
/// Text lines have their fields escaped ([`EscapedFields`]); JSON escapes control characters
/// itself, and [`SafeLines`] the line breaks and direction overrides JSON leaves raw.
pub fn init(cfg: &LogConfig) -> anyhow::Result<()> {
    let wan_log = std::env::var_os("WAN_LOG").map(|v| v.to_string_lossy().into_owned());
    let (filter, warning) = filter(&cfg.level, wan_log);
    if let Some(w) = &warning
        && !cfg.file.is_empty()
    {
        // The log line below goes to the file; the one starting the daemon sees this.
        eprintln!("warning: {w}");
    }
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let json = cfg.format == "json";
    if cfg.file.is_empty() {
        use std::io::IsTerminal;
        let b = builder
            .with_writer(|| SafeLines(std::io::stderr()))
            .with_ansi(std::io::stderr().is_terminal());
        if json {
            b.json().finish().with(CutShort).init()
        } else {
            b.fmt_fields(EscapedFields).finish().with(CutShort).init()
        }
    } else {
        let path = PathBuf::from(&cfg.file);
        let file = open(&path).map_err(|e| anyhow::anyhow!("log.file {}: {e}", path.display()))?;
        let r = LOG_FILE.get_or_init(|| {
            Arc::new(Reopenable {
                path,
                file: Mutex::new(file),
            })
        });
        let r = r.clone();
        let b = builder
            .with_writer(move || SafeLines(FileWriter(r.clone())))
            .with_ansi(false);
        if json {
            b.json().finish().with(CutShort).init()
        } else {
            b.fmt_fields(EscapedFields).finish().with(CutShort).init()
        }
    }
    if let Some(w) = warning {
        tracing::warn!("{w}");
    }
    Ok(())
}

/// Whether `c` must not reach a log line raw: control characters (a newline starts a forged
/// line, ESC drives the terminal), the Unicode line and paragraph separators (line breaks to
/// editors, browsers and some log viewers), and the bidirectional controls (which reorder what
/// a reader sees).
fn must_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// `text` with every character [`must_escape`] names written as an escape (`\n`, `\u{1b}`,
/// `\u{2028}`), and nothing cut: for names from a manifest or a listing, which are bounded
/// already. Client text, which is not, goes through [`untrusted`].
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find(must_escape) {
            f.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().expect("found a char");
            write!(f, "{}", c.escape_debug())?;
            rest = &rest[at + c.len_utf8()..];
        }
        f.write_str(rest)
    }
}

/// The text format's fields, as tracing-subscriber's default writes them (the message, then
/// `name=value` separated by spaces), each value [`Escaped`].
pub struct EscapedFields;

impl<'w> FormatFields<'w> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut v = EscapingVisitor {
            writer: &mut writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

struct EscapingVisitor<'a, 'w> {
    writer: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl Visit for EscapingVisitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let name = field.name();
        // What the `log` crate bridge adds; the default format leaves it out too.
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        let sep = if std::mem::take(&mut self.first) {
            ""
        } else {
            " "
        };
        let text = format!("{value:?}");
        self.result = if name == "message" {
            write!(self.writer, "{sep}{}", Escaped(&text))
        } else {
            let name = name.strip_prefix("r#").unwrap_or(name);
            write!(self.writer, "{sep}{name}={}", Escaped(&text))
        };
    }
}

/// A log writer that escapes, as JSON does (`\u2028`), what [`must_escape`] names beyond
/// ASCII: JSON leaves the line separators, C1 controls and direction overrides raw, and the
/// text format's [`Escaped`] fields never reach here with any. One event is one `write`.
pub struct SafeLines<W>(pub W);

impl<W: Write> Write for SafeLines<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        if !text.chars().any(|c| !c.is_ascii() && must_escape(c)) {
            self.0.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut out = String::with_capacity(text.len() + 16);
        for c in text.chars() {
            if !c.is_ascii() && must_escape(c) {
                out.push_str(&format!("\\u{:04x}", c as u32));
            } else {
                out.push(c);
            }
        }
        self.0.write_all(out.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Set once the daemon stops (see [`stopping`]).
static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The daemon is stopping: from now on fuser's complaints about replies are not logged. The
/// unmount ends the kernel connection under reads still waiting for a fetch (the kernel's
/// read-ahead, mostly), so their replies can no longer be sent, and fuser logs each one
/// (`Reply not sent …`, `Failed to send FUSE reply …`) as if something had gone wrong.
pub fn stopping() {
    STOPPING.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Drops `fuser::reply` events once [`stopping`] was called.
struct CutShort;

impl CutShort {
    fn concerns(target: &str) -> bool {
        // fuser logs through the `log` crate: its records reach us under the callsite `log`.
        target.starts_with("fuser::reply") || target == "log"
    }
}

impl<S: tracing::Subscriber> Layer<S> for CutShort {
    fn register_callsite(
        &self,
        meta: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if Self::concerns(meta.target()) {
            tracing::subscriber::Interest::sometimes()
        } else {
            tracing::subscriber::Interest::always()
        }
    }

    fn enabled(&self, meta: &tracing::Metadata<'_>, _: Context<'_, S>) -> bool {
        !(STOPPING.load(std::sync::atomic::Ordering::Relaxed)
            && meta.target().starts_with("fuser::reply"))
    }
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
    use super::{Escaped, EscapedFields, SafeLines, check_filter, filter, untrusted};
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[test]
    fn filters_are_levels_or_target_levels() {
        for ok in [
            "info",
            "DEBUG",
            "warn",
            "off",
            "wanfs=debug,info",
            "info, fuser=warn",
            "wanfs::fetch=trace",
        ] {
            assert_eq!(check_filter(ok), Ok(()), "{ok}");
        }
        for (bad, named) in [
            ("inf", "\"inf\""),
            ("verbose!!", "\"verbose!!\""),
            ("wanfs=debug,inf", "\"inf\""),
            ("wanfs=verbose", "\"wanfs=verbose\""),
            ("=info", "\"=info\""),
            ("wanfs", "\"wanfs\""),
        ] {
            let e = check_filter(bad).unwrap_err();
            assert!(e.contains(named) && e.contains("info"), "{bad}: {e}");
        }
        assert!(check_filter("").unwrap_err().contains("empty"));
        assert!(check_filter(" ").is_err());
    }

    #[test]
    fn an_invalid_wan_log_falls_back_to_the_config_level() {
        let (f, w) = filter("info", Some("verbose!!".into()));
        assert_eq!(f.to_string(), "info");
        let w = w.expect("a warning");
        assert!(w.contains("WAN_LOG") && w.contains("verbose!!"), "{w}");
        let (f, w) = filter("info", Some("wanfs=debug,warn".into()));
        assert!(w.is_none());
        assert!(f.to_string().contains("wanfs=debug"), "{f}");
        let (f, w) = filter("warn", None);
        assert_eq!((f.to_string().as_str(), w), ("warn", None));
    }

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

    #[test]
    fn escaped_names_keep_their_length_and_lose_their_control() {
        assert_eq!(
            Escaped("t2v-A14B@2.2.0/ä ö.bin").to_string(),
            "t2v-A14B@2.2.0/ä ö.bin"
        );
        let name = "a\u{1b}[2Jb\nc\u{2028}d\u{202e}e\u{7f}f";
        assert_eq!(
            Escaped(name).to_string(),
            "a\\u{1b}[2Jb\\nc\\u{2028}d\\u{202e}e\\u{7f}f"
        );
        let long = "x\n".repeat(1000);
        assert_eq!(Escaped(&long).to_string().len(), 3000, "not cut");
    }

    /// What a subscriber with the daemon's text and JSON formats writes for one event.
    fn logged(json: bool, emit: impl Fn()) -> String {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let b = tracing_subscriber::fmt()
            .with_writer(move || SafeLines(buf.clone()))
            .with_ansi(false);
        if json {
            tracing::subscriber::with_default(b.json().finish(), emit);
        } else {
            tracing::subscriber::with_default(b.fmt_fields(EscapedFields).finish(), emit);
        }
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn a_name_from_a_manifest_cannot_break_a_log_line_in_either_format() {
        let file = "evil\n2026-01-01T00:00:00Z  INFO forged\u{1b}[31m\u{2028}\u{202e}.bin";
        let emit = || {
            tracing::info!(model = %"m@1.0.0", file = %file, bytes = 3, "download completed");
            tracing::warn!(error = %format!("reading {file}: gone"), "source failed");
        };
        let text = logged(false, emit);
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(
            !text.contains(['\u{1b}', '\u{2028}', '\u{202e}']),
            "{text:?}"
        );
        assert!(
            text.contains(r"download completed model=m@1.0.0 file=evil\n2026-01-01T00:00:00Z  INFO forged\u{1b}[31m\u{2028}\u{202e}.bin bytes=3"),
            "{text}"
        );
        let json = logged(true, emit);
        assert_eq!(json.lines().count(), 2, "{json}");
        assert!(
            !json.contains(['\u{1b}', '\u{2028}', '\u{202e}']),
            "{json:?}"
        );
        for line in json.lines() {
            let v: serde_json::Value = serde_json::from_str(line).expect("still JSON");
            let back = v["fields"]["file"]
                .as_str()
                .or(v["fields"]["error"].as_str());
            assert!(back.unwrap().contains(file), "{line}");
        }
    }
}
