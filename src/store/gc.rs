//! The GC policy: which blobs a collection removes, decided by a pure function over a snapshot
//! of the cache, so the rules of docs/CONTROL.md ("Garbage collection") can be tested without a
//! disk. Carrying the plan out (unlinking, events, deep-clean's orphans and re-verify) is the
//! control plane's job (`control::jobs`); nothing here touches the store.

use serde::{Deserialize, Serialize};

use crate::chunk::Digest;
use crate::config::GcConfig;

/// GC modes (DESIGN §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GcMode {
    /// Down to the low watermark and the free-space target, then stop.
    Auto,
    /// Every candidate.
    Aggressive,
    /// Every candidate, then orphans, re-verify and vacuum (done by the caller).
    DeepClean,
}

impl GcMode {
    /// The mode as written on the command line, in HTTP queries and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            GcMode::Auto => "auto",
            GcMode::Aggressive => "aggressive",
            GcMode::DeepClean => "deep-clean",
        }
    }
}

/// One blob as GC sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GcBlob {
    pub digest: Digest,
    /// The blob's full size (an empty blob holds no bytes but is still removable).
    pub size: u64,
    /// Verified bytes held: what removing it frees.
    pub cached_bytes: u64,
    /// Unix time of the last read, ensure or verify.
    pub last_access: u64,
    /// A pinned model lists it: never removed.
    pub pinned: bool,
    /// A file backed by it is open through the mount: never removed.
    pub open: bool,
    /// Some model of the manifest lists it; blobs no model lists go first.
    pub listed: bool,
}

/// Usage when the plan is made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GcUsage {
    /// Verified bytes held in the cache.
    pub used: u64,
    /// Free space of the cache's filesystem, in percent.
    pub free_percent: f64,
    /// Size of that filesystem in bytes (0 when unknown: freed bytes then raise no percentage).
    pub fs_total: u64,
}

/// What a collection removes, in order, and where usage ends.
#[derive(Debug, Clone, PartialEq)]
pub struct GcPlan {
    pub evict: Vec<GcBlob>,
    /// Sum of the evicted blobs' cached bytes.
    pub freed: u64,
    /// Usage once they are gone (the projection a dry run reports).
    pub used_after: u64,
    pub free_percent_after: f64,
}

/// Which blobs `mode` removes from `blobs`, least valuable first.
///
/// A candidate holds bytes (or is empty), is not pinned and is not open. Candidates go in this
/// order: blobs no model lists, then least recently used first. `Auto` stops as soon as usage
/// is at most `low_watermark × max_bytes` and free space is at least
/// `min_free_percent + (high − low) × 100` % (each limit only when set: with neither set it
/// removes nothing); the gap between the watermarks keeps auto GC from running again at the
/// next tick. `Aggressive` and `DeepClean` take every candidate. A dry run uses the same plan.
pub fn plan_gc(blobs: &[GcBlob], limits: &GcConfig, usage: GcUsage, mode: GcMode) -> GcPlan {
    let mut candidates: Vec<GcBlob> = blobs
        .iter()
        .filter(|b| b.cached_bytes > 0 || b.size == 0)
        .filter(|b| !b.pinned && !b.open)
        .copied()
        .collect();
    // Stable: blobs with equal keys keep the order they came in.
    candidates.sort_by_key(|b| (b.listed, b.last_access));
    let mut plan = GcPlan {
        evict: Vec::new(),
        freed: 0,
        used_after: usage.used,
        free_percent_after: usage.free_percent,
    };
    for b in candidates {
        if mode == GcMode::Auto && target_reached(limits, plan.used_after, plan.free_percent_after)
        {
            break;
        }
        plan.used_after = plan.used_after.saturating_sub(b.cached_bytes);
        if usage.fs_total > 0 {
            plan.free_percent_after += b.cached_bytes as f64 * 100.0 / usage.fs_total as f64;
        }
        plan.freed += b.cached_bytes;
        plan.evict.push(b);
    }
    plan
}

/// Whether auto GC may stop: at or under the low watermark and over the free-space target.
fn target_reached(gc: &GcConfig, used: u64, free_percent: f64) -> bool {
    let bytes_ok = gc.max_bytes == 0 || (used as f64) <= gc.low_watermark * gc.max_bytes as f64;
    let free_target = gc.min_free_percent + (gc.high_watermark - gc.low_watermark) * 100.0;
    let free_ok = gc.min_free_percent == 0.0 || free_percent >= free_target;
    bytes_ok && free_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(n: u8, bytes: u64, last_access: u64) -> GcBlob {
        GcBlob {
            digest: Digest::of(&[n]),
            size: bytes,
            cached_bytes: bytes,
            last_access,
            pinned: false,
            open: false,
            listed: true,
        }
    }

    fn limits(max_bytes: u64, min_free_percent: f64) -> GcConfig {
        GcConfig {
            max_bytes,
            min_free_percent,
            high_watermark: 0.9,
            low_watermark: 0.8,
            ..GcConfig::default()
        }
    }

    fn usage(used: u64) -> GcUsage {
        GcUsage {
            used,
            free_percent: 50.0,
            fs_total: 0,
        }
    }

    fn evicted(p: &GcPlan) -> Vec<u64> {
        p.evict.iter().map(|b| b.last_access).collect()
    }

    #[test]
    fn least_recently_used_first_and_unlisted_before_all() {
        let mut unlisted = blob(9, 10, 500);
        unlisted.listed = false;
        let blobs = [
            blob(1, 10, 300),
            blob(2, 10, 100),
            unlisted,
            blob(3, 10, 200),
        ];
        let p = plan_gc(&blobs, &limits(0, 0.0), usage(40), GcMode::Aggressive);
        assert_eq!(evicted(&p), [500, 100, 200, 300]);
        assert_eq!((p.freed, p.used_after), (40, 0));
    }

    #[test]
    fn pinned_and_open_are_never_evicted() {
        let mut pinned = blob(1, 10, 1);
        pinned.pinned = true;
        let mut open = blob(2, 10, 2);
        open.open = true;
        let blobs = [pinned, open, blob(3, 10, 3)];
        for mode in [GcMode::Auto, GcMode::Aggressive, GcMode::DeepClean] {
            let p = plan_gc(&blobs, &limits(10, 0.0), usage(30), mode);
            assert_eq!(evicted(&p), [3], "{mode:?}");
            assert_eq!(
                p.used_after, 20,
                "{mode:?}: the rest is kept, over the limit"
            );
        }
    }

    #[test]
    fn auto_stops_at_the_low_watermark() {
        // max 100: low watermark 80. At 100 used, two 10-byte blobs reach 80.
        let blobs: Vec<GcBlob> = (0..10).map(|i| blob(i, 10, u64::from(i))).collect();
        let p = plan_gc(&blobs, &limits(100, 0.0), usage(100), GcMode::Auto);
        assert_eq!(evicted(&p), [0, 1]);
        assert_eq!((p.freed, p.used_after), (20, 80));
        // Already under it: nothing.
        let p = plan_gc(&blobs, &limits(100, 0.0), usage(80), GcMode::Auto);
        assert!(p.evict.is_empty());
    }

    #[test]
    fn auto_frees_up_to_the_free_space_target() {
        // Floor 5 %: the target is 5 + (0.9 − 0.8) × 100 = 15 %. Each 10-byte blob of a
        // 1000-byte filesystem frees 1 %, so from 10 % free five blobs go.
        let blobs: Vec<GcBlob> = (0..10).map(|i| blob(i, 10, u64::from(i))).collect();
        let u = GcUsage {
            used: 100,
            free_percent: 10.0,
            fs_total: 1000,
        };
        let p = plan_gc(&blobs, &limits(0, 5.0), u, GcMode::Auto);
        assert_eq!(evicted(&p), [0, 1, 2, 3, 4]);
        assert!((p.free_percent_after - 15.0).abs() < 1e-9);
        // Both limits: the stricter one decides.
        let p = plan_gc(&blobs, &limits(100, 5.0), u, GcMode::Auto);
        assert_eq!(p.evict.len(), 5);
    }

    #[test]
    fn aggressive_evicts_every_unpinned_unopened_blob() {
        let mut pinned = blob(1, 10, 1);
        pinned.pinned = true;
        let empty = blob(2, 0, 2);
        let mut partial_nothing_held = blob(3, 0, 3);
        partial_nothing_held.size = 100;
        let blobs = [pinned, empty, partial_nothing_held, blob(4, 10, 4)];
        // Under every limit: aggressive does not care.
        let p = plan_gc(&blobs, &limits(1000, 0.0), usage(20), GcMode::Aggressive);
        assert_eq!(
            evicted(&p),
            [2, 4],
            "the empty blob goes; one holding nothing stays"
        );
    }

    #[test]
    fn no_limits_means_auto_removes_nothing() {
        let blobs: Vec<GcBlob> = (0..5).map(|i| blob(i, 10, u64::from(i))).collect();
        let p = plan_gc(&blobs, &limits(0, 0.0), usage(1 << 40), GcMode::Auto);
        assert!(p.evict.is_empty());
        assert_eq!((p.freed, p.used_after), (0, 1 << 40));
    }
}
