//! Health checks. Critical: the mount answers, the cache is writable, the index answers, disk
//! use is within its limits. Not critical: usage under the high watermark, no source failing,
//! no model refused under `[trust]`.
//! One failing critical check makes the daemon unhealthy (HTTP 503), any other degraded.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Control;

/// One health check.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub ok: bool,
    /// Whether failing it makes the whole daemon unhealthy (else only degraded).
    pub critical: bool,
    pub detail: String,
}

/// The daemon's health (serialized `healthy`, `degraded`, `unhealthy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Healthy,
    /// A check that is not critical fails: still serving.
    Degraded,
    /// A critical check fails: HTTP 503, so a load balancer or systemd can act.
    Unhealthy,
}

/// The answer of `/health` and `.wan/health`: the overall status and every check by name.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub status: HealthStatus,
    pub checks: BTreeMap<String, Check>,
}

impl Control {
    /// Health: unhealthy (HTTP 503) if a critical check fails, degraded if another does.
    /// `check_mount`: stat the mountpoint (not from inside a FUSE request: it would ask
    /// ourselves).
    pub async fn health(&self, check_mount: bool) -> Health {
        let mut checks = BTreeMap::new();
        let mut add = |name: &str, ok: bool, critical: bool, detail: String| {
            checks.insert(
                name.to_string(),
                Check {
                    ok,
                    critical,
                    detail,
                },
            );
        };
        if let Some(mp) = self.mountpoint.as_ref().filter(|_| check_mount) {
            let mp2 = mp.clone();
            let answer = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::task::spawn_blocking(move || std::fs::read_dir(&mp2).map(|_| ())),
            )
            .await;
            let (ok, detail) = match answer {
                Ok(Ok(Ok(()))) => (true, format!("{} answers", mp.display())),
                Ok(Ok(Err(e))) => (false, format!("{}: {e}", mp.display())),
                _ => (false, format!("{} did not answer within 2 s", mp.display())),
            };
            add("mount", ok, true, detail);
        }
        let probe = self.store().root().join(".health-probe");
        let writable = std::fs::write(&probe, b"ok").and_then(|_| std::fs::remove_file(&probe));
        add(
            "cache_writable",
            writable.is_ok(),
            true,
            match (writable, self.store().read_only()) {
                (Ok(()), _) => format!("{} is writable", self.store().root().display()),
                (Err(e), Some(why)) => format!(
                    "{}: {e}: {why}; nothing is stored, reads are served from the sources",
                    self.store().root().display()
                ),
                (Err(e), None) => format!("{}: {e}", self.store().root().display()),
            },
        );
        let index = self.store().index().model("-");
        add(
            "index",
            index.is_ok(),
            true,
            index
                .map(|_| "index answers".to_string())
                .unwrap_or_else(|e| e.to_string()),
        );
        let (used, cap, free_pct) = self.usage();
        let cfg = self.cfg();
        let gc = &cfg.gc;
        let over = gc.max_bytes > 0 && used > gc.max_bytes;
        let floor = gc.min_free_percent > 0.0 && free_pct < gc.min_free_percent / 2.0;
        add(
            "disk",
            !(over || floor),
            true,
            format!("{used} of {cap} bytes used, {free_pct:.1}% of the filesystem free"),
        );
        let high = gc.above_high(used);
        add(
            "disk_watermark",
            !high,
            false,
            if high {
                "above the high watermark: GC is due".into()
            } else {
                "below the high watermark".into()
            },
        );
        let cooling: Vec<String> = self
            .sources
            .all()
            .into_iter()
            .filter(|s| s.failing())
            .map(|s| s.name.clone())
            .collect();
        add(
            "sources",
            cooling.is_empty(),
            false,
            if cooling.is_empty() {
                "no source is failing".into()
            } else {
                format!(
                    "failing (cooling down): {}; cached data is still served",
                    cooling.join(", ")
                )
            },
        );
        let refused: Vec<String> = self
            .cat()
            .trust
            .iter()
            .filter_map(|(id, t)| Some(format!("{id} ({})", t.refusal()?.reason.as_label())))
            .collect();
        add(
            "trust",
            refused.is_empty(),
            false,
            if refused.is_empty() {
                "no model is refused under [trust]".into()
            } else {
                format!(
                    "{} model(s) refused under [trust], their reads fail with EACCES: {}{}",
                    refused.len(),
                    refused
                        .iter()
                        .take(5)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "),
                    if refused.len() > 5 { ", …" } else { "" }
                )
            },
        );
        let status = if checks.values().any(|c| !c.ok && c.critical) {
            HealthStatus::Unhealthy
        } else if checks.values().any(|c| !c.ok) {
            HealthStatus::Degraded
        } else {
            HealthStatus::Healthy
        };
        Health { status, checks }
    }
}
