//! `.wan/` control files: what reading one shows and what writing one does, in terms of the
//! `Control` vocabulary (no logic of their own).
//!
//! Reads are rendered once at open, so a reader sees one consistent snapshot however it
//! reads. A write is one command: ids (whitespace separated) or a mode, plus optional flags
//! (`--force-redownload` for ensure, `--report-only` for verify, `--dry-run` for gc). It is
//! validated at once — a bad id or mode fails the write with EINVAL and a log line, where the
//! written text is escaped and cut (`logging::untrusted`: a write must not forge or flood log
//! lines) — and the work then runs in the background; `status` shows its progress.

use std::sync::Arc;

use super::tree::ControlFile;
use crate::control::{Control, ControlError, GcMode};
use crate::metrics;

/// The bytes a read of `cf` shows.
pub fn render(control: &Arc<Control>, rt: &tokio::runtime::Handle, cf: ControlFile) -> Vec<u8> {
    let json = |v: serde_json::Value| {
        let mut s = serde_json::to_string_pretty(&v).unwrap_or_default();
        s.push('\n');
        s.into_bytes()
    };
    match cf {
        ControlFile::Status => match control.status(&[]) {
            Ok(models) => json(serde_json::json!({
                "summary": control.summary(&models),
                "models": models.into_iter().map(|m| (m.id.clone(), m)).collect::<std::collections::BTreeMap<_, _>>(),
            })),
            Err(e) => format!("error: {e}\n").into_bytes(),
        },
        // Reading this file proves the mount answers, so the mount check is not repeated
        // (it would be a FUSE request to ourselves from inside a FUSE request).
        ControlFile::Health => {
            json(serde_json::to_value(rt.block_on(control.health(false))).unwrap_or_default())
        }
        ControlFile::Metrics => {
            control.usage();
            metrics::render().into_bytes()
        }
        ControlFile::Config => json(control.config_view()),
        ControlFile::Events => {
            let mut out = String::new();
            for e in control.events(200).unwrap_or_default() {
                out.push_str(&serde_json::to_string(&e).unwrap_or_default());
                out.push('\n');
            }
            out.into_bytes()
        }
        // What to write, as a shell line that works once the placeholder is filled in.
        w => format!(
            "write to act: echo \"{}\" > .wan/{}\n",
            match w {
                ControlFile::Gc => "auto|aggressive|deep-clean [--dry-run]",
                ControlFile::Ensure => "MODEL_ID... [--force-redownload]",
                ControlFile::Verify => "MODEL_ID... [--report-only]",
                _ => "MODEL_ID...",
            },
            w.name(),
        )
        .into_bytes(),
    }
}

/// Validates and starts the command written to `cf`.
pub fn write(
    control: &Arc<Control>,
    rt: &tokio::runtime::Handle,
    cf: ControlFile,
    data: &[u8],
) -> Result<String, ControlError> {
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
    let ids: Vec<String> = words.iter().map(|w| w.to_string()).collect();
    let need_ids = || {
        if ids.is_empty() {
            Err(ControlError::BadRequest(format!(
                "write a model id to .wan/{}",
                cf.name()
            )))
        } else {
            Ok(())
        }
    };
    let _enter = rt.enter();
    match cf {
        ControlFile::Ensure => {
            need_ids()?;
            let started = control.ensure(&ids, force)?;
            Ok(format!("ensure started: {}", started.join(" ")))
        }
        ControlFile::Verify => {
            need_ids()?;
            let started = control.verify(&ids, report_only)?;
            Ok(format!("verify started: {}", started.join(" ")))
        }
        ControlFile::Gc => {
            let [mode] = ids.as_slice() else {
                return Err(ControlError::BadRequest(
                    "write one gc mode: auto, aggressive or deep-clean (optionally --dry-run)"
                        .into(),
                ));
            };
            let mode: GcMode = mode.parse()?;
            let control = control.clone();
            rt.spawn(async move {
                match control.gc(mode, dry_run).await {
                    Ok(r) => tracing::info!(mode = ?mode, dry_run, freed = r.freed_bytes, blobs = r.removed.len(), "gc from .wan/gc finished"),
                    Err(e) => tracing::error!(mode = ?mode, error = %e, "gc from .wan/gc failed"),
                }
            });
            Ok(format!("gc {mode:?} started"))
        }
        ControlFile::Pin | ControlFile::Unpin => {
            need_ids()?;
            let ids = control.resolve(&ids)?;
            for id in &ids {
                control.set_pinned(id, cf == ControlFile::Pin)?;
            }
            Ok(format!("{}: {}", cf.name(), ids.join(" ")))
        }
        ControlFile::Evict => {
            need_ids()?;
            let ids = control.resolve(&ids)?;
            for id in &ids {
                control.evict(id, false)?;
            }
            Ok(format!("evicted: {}", ids.join(" ")))
        }
        ControlFile::MarkCorrupted => {
            need_ids()?;
            let ids = control.mark_corrupted(&ids)?;
            Ok(format!("marked corrupted: {}", ids.join(" ")))
        }
        _ => Err(ControlError::BadRequest(format!(
            ".wan/{} is read-only",
            cf.name()
        ))),
    }
}
