//! `.wan/` control files: the [`Request`] reading or writing one makes, and how its answer is
//! shown (no logic of their own: `Control::handle` answers, as it does HTTP and the CLI).
//!
//! Reads are rendered once at open, so a reader sees one consistent snapshot however it
//! reads. A write is one command: ids (whitespace separated) or a mode, plus optional flags
//! (`--force-redownload` for ensure, `--report-only` for verify, `--dry-run` for gc), parsed
//! into requests ([`parse`]). It is validated at once — every id it names before any part acts;
//! a bad id or mode fails the write with EINVAL and a log line, where the written text is
//! escaped and cut (`logging::untrusted`: a write must not forge or flood log lines) — and the
//! work then runs in the background; `status` shows its progress.

use std::sync::Arc;

use super::tree::ControlFile;
use crate::control::{Control, ControlError, GcMode, Request, Response, Selection};

/// The bytes a read of `cf` shows.
pub fn render(control: &Arc<Control>, rt: &tokio::runtime::Handle, cf: ControlFile) -> Vec<u8> {
    let request = match cf {
        ControlFile::Status => Request::Overview,
        // Reading this file proves the mount answers, so the mount check is not repeated
        // (it would be a FUSE request to ourselves from inside a FUSE request).
        ControlFile::Health => Request::Health { check_mount: false },
        ControlFile::Metrics => Request::Metrics,
        ControlFile::Config => Request::Config,
        ControlFile::Events => Request::Events {
            limit: Request::EVENTS_LIMIT,
        },
        ControlFile::Ensure
        | ControlFile::Verify
        | ControlFile::Gc
        | ControlFile::Pin
        | ControlFile::Unpin
        | ControlFile::Evict
        | ControlFile::MarkCorrupted => return usage(cf).into_bytes(),
    };
    match rt.block_on(control.handle(request)) {
        Ok(Response::Metrics(text)) => text.into_bytes(),
        // One JSON object per line, oldest first.
        Ok(Response::Events(events)) => {
            let mut out = String::new();
            for e in events {
                out.push_str(&serde_json::to_string(&e).unwrap_or_default());
                out.push('\n');
            }
            out.into_bytes()
        }
        // Through a `Value`, so keys come sorted.
        Ok(answer) => {
            let v = serde_json::to_value(answer).unwrap_or_default();
            let mut s = serde_json::to_string_pretty(&v).unwrap_or_default();
            s.push('\n');
            s.into_bytes()
        }
        Err(e) => format!("error: {e}\n").into_bytes(),
    }
}

/// What to write to a write file, as a shell line that works once the placeholder is filled in.
fn usage(cf: ControlFile) -> String {
    format!(
        "write to act: echo \"{}\" > .wan/{}\n",
        match cf {
            ControlFile::Gc => "auto|aggressive|deep-clean [--dry-run]",
            ControlFile::Ensure => "MODEL_ID... [--force-redownload]",
            ControlFile::Verify => "MODEL_ID... [--report-only]",
            _ => "MODEL_ID...",
        },
        cf.name(),
    )
}

/// The requests a write of `data` to `cf` makes: one for ensure, verify, gc and
/// mark-corrupted, one per model for pin, unpin and evict. Refuses what no request can carry:
/// text that is not UTF-8, an unknown flag, no id, a gc mode that is not one word, or a write
/// to a read file.
pub fn parse(cf: ControlFile, data: &[u8]) -> Result<Vec<Request>, ControlError> {
    let text =
        std::str::from_utf8(data).map_err(|_| ControlError::BadRequest("not UTF-8 text".into()))?;
    let mut words: Vec<&str> = text.split_whitespace().collect();
    let mut flag = |name: &str| {
        let had = words.contains(&name);
        words.retain(|w| *w != name);
        had
    };
    let force = flag("--force-redownload");
    let report_only = flag("--report-only");
    let dry_run = flag("--dry-run");
    if let Some(unknown) = words.iter().find(|w| w.starts_with("--")) {
        return Err(ControlError::BadRequest(format!(
            "unknown option {unknown}"
        )));
    }
    // Each model once, in the order written.
    let mut ids: Vec<String> = Vec::new();
    for w in words {
        if !ids.iter().any(|id| id == w) {
            ids.push(w.to_string());
        }
    }
    if ids.is_empty() && cf.writable() && cf != ControlFile::Gc {
        return Err(ControlError::BadRequest(format!(
            "write a model id to .wan/{}",
            cf.name()
        )));
    }
    let each = |make: fn(String) -> Request| ids.iter().cloned().map(make).collect();
    Ok(match cf {
        ControlFile::Ensure => vec![Request::Ensure {
            models: Selection::Ids(ids),
            force,
        }],
        ControlFile::Verify => vec![Request::Verify {
            models: Selection::Ids(ids),
            report_only,
        }],
        ControlFile::Gc => {
            let [mode] = ids.as_slice() else {
                return Err(ControlError::BadRequest(
                    "write one gc mode: auto, aggressive or deep-clean (optionally --dry-run)"
                        .into(),
                ));
            };
            let mode: GcMode = mode.parse()?;
            vec![Request::Gc { mode, dry_run }]
        }
        ControlFile::Pin => each(|id| Request::Pin { id, pinned: true }),
        ControlFile::Unpin => each(|id| Request::Pin { id, pinned: false }),
        ControlFile::Evict => each(|id| Request::Evict { id }),
        ControlFile::MarkCorrupted => vec![Request::MarkCorrupted { ids }],
        ControlFile::Status
        | ControlFile::Health
        | ControlFile::Metrics
        | ControlFile::Config
        | ControlFile::Events => {
            return Err(ControlError::BadRequest(format!(
                ".wan/{} is read-only",
                cf.name()
            )));
        }
    })
}

/// Validates and starts the command written to `cf`; returns what was done, for the log.
pub fn write(
    control: &Arc<Control>,
    rt: &tokio::runtime::Handle,
    cf: ControlFile,
    data: &[u8],
) -> Result<String, ControlError> {
    let requests = parse(cf, data)?;
    // One write is one command: an unknown id among several refuses it whole, before any acts.
    let named: Vec<String> = requests
        .iter()
        .flat_map(|r| r.model_ids().iter().cloned())
        .collect();
    control.resolve(&named)?;
    let mut done = Vec::new();
    for request in requests {
        // A GC runs for minutes: the write returns at once, and the log says how it ended.
        if let Request::Gc { mode, dry_run } = request {
            let control = control.clone();
            rt.spawn(async move {
                match control.handle(request).await {
                    Ok(Response::Gc(r)) => tracing::info!(mode = ?mode, dry_run, freed = r.freed_bytes, blobs = r.removed.len(), "gc from .wan/gc finished"),
                    Ok(_) => tracing::info!(mode = ?mode, dry_run, "gc from .wan/gc finished"),
                    Err(e) => tracing::error!(mode = ?mode, error = %e, "gc from .wan/gc failed"),
                }
            });
            return Ok(format!("gc {mode:?} started"));
        }
        // The jobs an ensure or verify starts are spawned on `rt`; nothing here waits on them.
        done.extend(match rt.block_on(control.handle(request))? {
            Response::Started(s) => s.started.into_iter().map(String::from).collect(),
            Response::Model(m) => vec![m.id.into()],
            Response::Evicted(e) => vec![e.evicted],
            Response::Marked(m) => m.marked.into_iter().map(String::from).collect(),
            _ => Vec::new(),
        });
    }
    let what = match cf {
        ControlFile::Ensure => "ensure started",
        ControlFile::Verify => "verify started",
        ControlFile::Evict => "evicted",
        ControlFile::MarkCorrupted => "marked corrupted",
        other => other.name(),
    };
    Ok(format!("{what}: {}", done.join(" ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_parse_into_requests() {
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse(ControlFile::Ensure, b"--force-redownload a@1 b@2 a@1\n").unwrap(),
            vec![Request::Ensure {
                models: Selection::Ids(ids(&["a@1", "b@2"])),
                force: true
            }]
        );
        assert_eq!(
            parse(ControlFile::Verify, b"a@1 --report-only").unwrap(),
            vec![Request::Verify {
                models: Selection::Ids(ids(&["a@1"])),
                report_only: true
            }]
        );
        assert_eq!(
            parse(ControlFile::Gc, b"deep-clean --dry-run").unwrap(),
            vec![Request::Gc {
                mode: GcMode::DeepClean,
                dry_run: true
            }]
        );
        assert_eq!(
            parse(ControlFile::Unpin, b"a@1 b@2").unwrap(),
            vec![
                Request::Pin {
                    id: "a@1".into(),
                    pinned: false
                },
                Request::Pin {
                    id: "b@2".into(),
                    pinned: false
                }
            ]
        );
        assert_eq!(
            parse(ControlFile::MarkCorrupted, b"a@1").unwrap(),
            vec![Request::MarkCorrupted { ids: ids(&["a@1"]) }]
        );
        let refused = |cf, data: &[u8]| parse(cf, data).unwrap_err().to_string();
        assert_eq!(
            refused(ControlFile::Ensure, b"\n"),
            "write a model id to .wan/ensure"
        );
        assert_eq!(
            refused(ControlFile::Evict, b"a --force"),
            "unknown option --force"
        );
        assert!(refused(ControlFile::Gc, b"auto aggressive").contains("one gc mode"));
        assert!(refused(ControlFile::Gc, b"everything").contains("unknown gc mode"));
        assert_eq!(refused(ControlFile::Pin, b"\xff"), "not UTF-8 text");
        assert_eq!(
            refused(ControlFile::Status, b"x"),
            ".wan/status is read-only"
        );
    }
}
