//! What happened and how full the cache was: the event log (written by every control action
//! and read by `.wan/events` and `/events`), and the daily and storage reports built from it and
//! from the hourly storage samples.

use std::collections::BTreeMap;

use super::{Control, ControlError, failed};
use crate::store::index::Event;
use crate::store::now_secs;

impl Control {
    pub fn events(&self, limit: usize) -> Result<Vec<Event>, ControlError> {
        self.store().index().events(0, limit).map_err(failed)
    }

    pub(super) fn record(
        &self,
        kind: &str,
        model: &str,
        status: &str,
        bytes: u64,
        seconds: f64,
        detail: String,
    ) {
        let e = Event {
            ts: now_secs(),
            kind: kind.into(),
            model: model.into(),
            file: String::new(),
            bytes,
            seconds,
            status: status.into(),
            detail,
        };
        if let Err(err) = self.store().index().add_event(&e) {
            tracing::warn!(error = %err, "could not record an event");
        }
    }
    /// Downloads, failures, evictions and verifications per day over the last `days`.
    pub fn report_daily(&self, days: u64) -> Result<serde_json::Value, ControlError> {
        let since = now_secs().saturating_sub(days * 86400);
        let events = self
            .store()
            .index()
            .events(since, 1_000_000)
            .map_err(failed)?;
        let mut by_day: BTreeMap<String, BTreeMap<String, serde_json::Value>> = BTreeMap::new();
        for e in &events {
            let day = day_of(e.ts);
            let key = format!("{}_{}", e.kind.replace('-', "_"), e.status);
            let entry = by_day.entry(day).or_default();
            let slot = entry
                .entry(key)
                .or_insert_with(|| serde_json::json!({"count": 0, "bytes": 0}));
            slot["count"] = (slot["count"].as_u64().unwrap_or(0) + 1).into();
            slot["bytes"] = (slot["bytes"].as_u64().unwrap_or(0) + e.bytes).into();
        }
        Ok(serde_json::json!({ "since": since, "days": by_day }))
    }

    /// Storage use over the last `days`, from hourly samples, plus the current figure.
    pub fn report_storage(&self, days: u64) -> Result<serde_json::Value, ControlError> {
        let since = now_secs().saturating_sub(days * 86400);
        let samples = self
            .store()
            .index()
            .storage_samples(since)
            .map_err(failed)?;
        let mut by_day: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
        for (ts, used, cap) in samples {
            let e = by_day.entry(day_of(ts)).or_insert((u64::MAX, 0, cap));
            e.0 = e.0.min(used);
            e.1 = e.1.max(used);
            e.2 = cap;
        }
        let (used, cap, free_pct) = self.usage();
        let per_model: BTreeMap<String, u64> = self
            .model_ids()
            .into_iter()
            .filter_map(|id| self.model_status(&id).ok().map(|s| (id, s.bytes_cached)))
            .collect();
        Ok(serde_json::json!({
            "since": since,
            "current": {"used_bytes": used, "capacity_bytes": cap, "free_percent": free_pct, "per_model": per_model},
            "days": by_day.into_iter().map(|(d, (min, max, cap))| (d, serde_json::json!({"min_used": min, "max_used": max, "capacity": cap}))).collect::<BTreeMap<_, _>>(),
        }))
    }
}

/// `YYYY-MM-DD` (UTC) of a unix time.
pub fn day_of(ts: u64) -> String {
    chrono::DateTime::from_timestamp(ts.min(i64::MAX as u64) as i64, 0)
        .map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| "out-of-range".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_masks() {
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(1_795_000_000), "2026-11-18");
        use crate::source::mask_url;
        assert_eq!(
            mask_url("https://u:p@host/x?sig=1"),
            "https://***@host/x?sig=***"
        );
        assert_eq!(mask_url("hf://org/repo@main"), "hf://org/repo@main");
    }
}
