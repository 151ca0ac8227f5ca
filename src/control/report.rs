//! What happened and how full the cache was: the event log (written by every control action
//! and read by `.wan/events` and `/events`), and the daily and storage reports built from it and
//! from the hourly storage samples.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Control, ControlError, failed};
use crate::manifest::ModelId;
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
    pub fn report_daily(&self, days: u64) -> Result<DailyReport, ControlError> {
        let since = now_secs().saturating_sub(days * 86400);
        let events = self
            .store()
            .index()
            .events(since, 1_000_000)
            .map_err(failed)?;
        let mut by_day: BTreeMap<String, BTreeMap<String, Tally>> = BTreeMap::new();
        for e in &events {
            let key = format!("{}_{}", e.kind.replace('-', "_"), e.status);
            let tally = by_day
                .entry(day_of(e.ts))
                .or_default()
                .entry(key)
                .or_default();
            tally.count += 1;
            tally.bytes += e.bytes;
        }
        Ok(DailyReport {
            days: by_day,
            since,
        })
    }

    /// Storage use over the last `days`, from hourly samples, plus the current figure, which
    /// today's row includes too.
    pub fn report_storage(&self, days: u64) -> Result<StorageReport, ControlError> {
        let now = now_secs();
        let since = now.saturating_sub(days * 86400);
        let samples = self
            .store()
            .index()
            .storage_samples(since)
            .map_err(failed)?;
        let mut by_day: BTreeMap<String, StorageDay> = BTreeMap::new();
        for (ts, used, cap) in samples {
            fold(&mut by_day, ts, used, cap);
        }
        let (used, cap, free_pct) = self.usage();
        // Samples are hourly, the first taken at start: a fresh cache's only sample today was
        // 0 B, whatever was fetched since. Today's row is the day so far, now included.
        fold(&mut by_day, now, used, cap);
        let per_model: BTreeMap<ModelId, u64> = self
            .model_ids()
            .into_iter()
            .filter_map(|id| self.model_status(&id).ok().map(|s| (id, s.bytes_cached)))
            .collect();
        Ok(StorageReport {
            current: StorageNow {
                capacity_bytes: cap,
                free_percent: free_pct,
                per_model,
                used_bytes: used,
            },
            days: by_day,
            since,
        })
    }
}

// The report structs list their fields in alphabetical order: these reports were built as JSON
// maps, whose keys come out sorted, and the HTTP answers keep that order.

/// `report --daily`: per UTC day, per `{kind}_{status}` of event, how many and how many bytes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DailyReport {
    pub days: BTreeMap<String, BTreeMap<String, Tally>>,
    /// Unix time the period starts.
    pub since: u64,
}

/// Events of one kind and status in one day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub bytes: u64,
    pub count: u64,
}

/// `report --storage`: now, then per UTC day from the hourly samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StorageReport {
    pub current: StorageNow,
    pub days: BTreeMap<String, StorageDay>,
    /// Unix time the period starts.
    pub since: u64,
}

/// Storage use now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StorageNow {
    /// `gc.max_bytes`, or the filesystem's size when there is no byte limit.
    pub capacity_bytes: u64,
    /// Free space of the cache's filesystem, in percent.
    pub free_percent: f64,
    /// Cached bytes per model (a blob two models share counts for both).
    pub per_model: BTreeMap<ModelId, u64>,
    pub used_bytes: u64,
}

/// Storage use over one day's samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageDay {
    pub capacity: u64,
    pub max_used: u64,
    pub min_used: u64,
}

/// Folds a storage figure taken at `ts` into its day's row.
fn fold(by_day: &mut BTreeMap<String, StorageDay>, ts: u64, used: u64, cap: u64) {
    let d = by_day.entry(day_of(ts)).or_insert(StorageDay {
        capacity: cap,
        max_used: used,
        min_used: used,
    });
    d.min_used = d.min_used.min(used);
    d.max_used = d.max_used.max(used);
    d.capacity = cap;
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

    #[test]
    fn a_day_folds_its_figures_into_min_max_and_the_last_capacity() {
        let mut by_day = BTreeMap::new();
        let day = 1_795_000_000 - 1_795_000_000 % 86400;
        fold(&mut by_day, day + 10, 0, 100);
        fold(&mut by_day, day + 3600, 70, 100);
        fold(&mut by_day, day + 7200, 40, 90);
        fold(&mut by_day, day + 86400, 5, 90);
        assert_eq!(
            by_day[&day_of(day)],
            StorageDay {
                capacity: 90,
                max_used: 70,
                min_used: 0
            }
        );
        assert_eq!(by_day[&day_of(day + 86400)].max_used, 5);
    }

    #[test]
    fn reports_serialize_as_the_maps_they_were() {
        // Field order is the JSON key order of the HTTP answer: sorted, as a map's was.
        let daily = DailyReport {
            days: BTreeMap::from([(
                "2026-11-18".into(),
                BTreeMap::from([("download_success".into(), Tally { bytes: 5, count: 2 })]),
            )]),
            since: 7,
        };
        let storage = StorageReport {
            current: StorageNow {
                capacity_bytes: 100,
                free_percent: 12.5,
                per_model: BTreeMap::from([("m@1.0.0".parse().unwrap(), 3)]),
                used_bytes: 3,
            },
            days: BTreeMap::from([(
                "2026-11-18".into(),
                StorageDay {
                    capacity: 100,
                    max_used: 4,
                    min_used: 1,
                },
            )]),
            since: 7,
        };
        for text in [
            serde_json::to_string(&daily).unwrap(),
            serde_json::to_string(&storage).unwrap(),
        ] {
            let as_map = serde_json::from_str::<serde_json::Value>(&text).unwrap();
            assert_eq!(text, as_map.to_string());
        }
        let back: StorageReport =
            serde_json::from_str(&serde_json::to_string(&storage).unwrap()).unwrap();
        assert_eq!(back, storage);
    }
}
