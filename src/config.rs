//! The daemon's configuration file (`/etc/wan22/wan.toml`): keys, defaults, validation.
//!
//! Every key is optional; unknown keys are refused with their name and line so a typo never
//! silently falls back to a default. Command-line flags override the file (see `cli.rs`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The whole configuration.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub mountpoint: Option<PathBuf>,
    pub manifest: Option<PathBuf>,
    pub cache_dir: Option<PathBuf>,
    pub fetch: FetchConfig,
    pub mount: MountConfig,
    pub gc: GcConfig,
    pub http: HttpConfig,
    pub peers: PeersConfig,
    pub log: crate::logging::LogConfig,
    /// Publisher signatures accepted (`trust/policy.rs`).
    pub trust: crate::trust::TrustConfig,
    pub oci: OciConfig,
}

/// `oci://` registries (`source/oci.rs`): which may be asked over plain HTTP, and where their
/// credentials are. Names a file, never holds a secret, so `/config` may show it.
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OciConfig {
    /// Registries (`host` or `host:port`) asked over `http://`, as docker's
    /// `insecure-registries`; loopback ones always are.
    pub insecure_registries: Vec<String>,
    /// A docker-style `config.json` read before `$REGISTRY_AUTH_FILE` and
    /// `$DOCKER_CONFIG/config.json`: the daemon's own credentials.
    pub auth_file: Option<PathBuf>,
    /// The most a compressed (`tar+gzip`, `tar+zstd`) layer may unpack to, in MiB: also what
    /// the spool of unpacked layers holds at most (least recently read let go first).
    pub unpack_max_mib: u64,
}

impl Default for OciConfig {
    fn default() -> Self {
        OciConfig {
            insecure_registries: Vec::new(),
            auth_file: None,
            unpack_max_mib: 4096,
        }
    }
}

/// Other wanfs daemons of the fleet, asked for a chunk before the manifest's sources.
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PeersConfig {
    /// Base URLs of the peers' HTTP endpoints (`http://10.0.0.2:8000`), tried in this order.
    pub urls: Vec<String>,
    /// Connecting to a peer: a peer that is down costs at most this, once per cool-down.
    pub connect_timeout_secs: f64,
    /// How long a peer that failed (down, erring, stalled or sending wrong bytes) is skipped.
    /// A peer that lacks a chunk (404) has not failed.
    pub cooldown_secs: f64,
}

impl Default for PeersConfig {
    fn default() -> Self {
        PeersConfig {
            urls: Vec::new(),
            connect_timeout_secs: 1.0,
            cooldown_secs: 30.0,
        }
    }
}

/// Most peers a daemon names: each cold chunk may ask every one of them in turn.
pub const MAX_PEERS: usize = 64;

impl PeersConfig {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.connect_timeout_secs)
    }
    pub fn cooldown(&self) -> Duration {
        Duration::from_secs_f64(self.cooldown_secs)
    }

    /// Each URL: `http(s)://host[:port]`, with no path, query, credentials or repeats (the
    /// token goes in a header, from `http.token_env`).
    fn validate(&self) -> Result<(), String> {
        if self.urls.len() > MAX_PEERS {
            return Err(format!(
                "peers.urls names {} peers; at most {MAX_PEERS}",
                self.urls.len()
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, raw) in self.urls.iter().enumerate() {
            let bad = |why: &str| format!("peers.urls[{i}] {raw:?}: {why}");
            let url = reqwest::Url::parse(raw).map_err(|e| bad(&e.to_string()))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(bad("must be an http:// or https:// URL"));
            }
            if url.host_str().is_none_or(str::is_empty) {
                return Err(bad("has no host"));
            }
            if !url.username().is_empty() || url.password().is_some() {
                return Err(bad(
                    "must not carry credentials (peers send the token of http.token_env)",
                ));
            }
            if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
                return Err(bad(
                    "must be a daemon's base URL, like http://10.0.0.2:8000, with no path or query",
                ));
            }
            if !seen.insert(url.as_str().to_string()) {
                return Err(bad("is listed twice"));
            }
        }
        Ok(())
    }
}

/// Cache size limits and garbage collection.
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GcConfig {
    /// Most bytes the cache may hold (0 = no byte limit).
    pub max_bytes: u64,
    /// Least free space, in percent, on the cache's filesystem (0 = no floor).
    pub min_free_percent: f64,
    /// GC starts when usage passes this fraction of `max_bytes`…
    pub high_watermark: f64,
    /// …and evicts least recently used, unpinned blobs until usage is below this fraction.
    pub low_watermark: f64,
    /// How often usage is checked (and last-access times saved).
    pub interval_secs: f64,
}

impl GcConfig {
    /// Auto GC's byte threshold, `high_watermark × max_bytes` (0: no byte limit). Usage above
    /// it is what the store's wake-up, `gc_due` and health's `disk_watermark` each look for.
    pub fn high_bytes(&self) -> u64 {
        if self.max_bytes == 0 {
            return 0;
        }
        (self.high_watermark * self.max_bytes as f64) as u64
    }

    /// Whether `used` bytes are past the high watermark (never, without a byte limit).
    pub fn above_high(&self, used: u64) -> bool {
        self.max_bytes > 0 && used > self.high_bytes()
    }
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            max_bytes: 0,
            min_free_percent: 0.0,
            high_watermark: 0.9,
            low_watermark: 0.8,
            interval_secs: 30.0,
        }
    }
}

/// The HTTP endpoint.
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Listen address; empty disables the endpoint.
    pub addr: String,
    /// Name of the environment variable holding the bearer token that lets non-local clients
    /// call mutating routes (the token itself never goes in this file).
    pub token_env: String,
    /// Require the token from loopback clients too (any local user can reach 127.0.0.1,
    /// while `.wan/` writes need the mount owner).
    pub require_token: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            addr: "127.0.0.1:8000".into(),
            token_env: "WAN_HTTP_TOKEN".into(),
            require_token: false,
        }
    }
}

/// How bytes are fetched from sources.
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FetchConfig {
    /// Concurrent source requests, all files together. 16 keeps a 10–25 Gbit/s link busy with
    /// 1 MiB parts from a per-connection-limited origin without flooding a small mirror.
    pub connections: usize,
    /// Bytes held in memory by fetches in flight; bounds daemon memory whatever is open.
    pub max_inflight_mib: u64,
    /// A read that cannot be served within this fails with EIO.
    pub read_timeout_secs: f64,
    /// One request to a source.
    pub request_timeout_secs: f64,
    /// Attempts per part at one source before moving to the next source.
    pub retries: u32,
    /// Base of the exponential backoff between attempts (with full jitter).
    pub backoff_ms: u64,
    /// How long a source that keeps failing is skipped.
    pub cooldown_secs: f64,
    /// Largest read-ahead window, in chunks (0 disables read-ahead).
    pub readahead_chunks: u32,
    /// A chunk is fetched as parallel sub-ranges of this size, to cut time to first byte.
    pub part_size_kib: u64,
    /// What a reader's chunk does when the cache disk is behind the network.
    pub when_cache_behind: WhenCacheBehind,
}

/// When chunks arrive faster than the cache disk takes them (`fetch.when_cache_behind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenCacheBehind {
    /// Every chunk read is cached; while commits are behind, fetch memory stays full and
    /// readers go at the disk's speed. The default (`FetchConfig::default`).
    Wait,
    /// A chunk fetched for a reader, while chunks holding more than half of
    /// `max_inflight_mib` wait for the disk, is served and not cached (counted in
    /// `wan_cache_skipped_bytes_total`): readers go at the network's speed, and what was
    /// skipped is fetched again by a later read or `wan models ensure`.
    Skip,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            connections: 16,
            max_inflight_mib: 64,
            read_timeout_secs: 30.0,
            request_timeout_secs: 10.0,
            retries: 3,
            backoff_ms: 100,
            cooldown_secs: 5.0,
            readahead_chunks: 4,
            part_size_kib: 1024,
            when_cache_behind: WhenCacheBehind::Wait,
        }
    }
}

impl FetchConfig {
    pub fn read_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.read_timeout_secs)
    }
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.request_timeout_secs)
    }
    pub fn cooldown(&self) -> Duration {
        Duration::from_secs_f64(self.cooldown_secs)
    }
    pub fn part_size(&self) -> u64 {
        self.part_size_kib * 1024
    }
}

/// How the FUSE mount behaves.
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MountConfig {
    /// Open complete blobs in FUSE passthrough mode (kernel ≥ 6.9, needs CAP_SYS_ADMIN).
    pub passthrough: bool,
    /// When a complete cached file of 32 MiB or more is opened, read its blob into the page
    /// cache ahead of the reader, many reads in flight (src/warm.rs). Off where readers touch
    /// a few pages of large files and the disk reads for the rest are not wanted.
    pub warm_readahead: bool,
    /// Let other users read the mount (needs root, or `user_allow_other` in /etc/fuse.conf).
    /// Default: on when running as root.
    pub allow_other: Option<bool>,
    /// Kernel read-ahead for the mount in KiB; FUSE's default of 128 KiB keeps requests small.
    pub read_ahead_kb: u32,
    /// FUSE dispatch threads.
    pub threads: usize,
    /// Mount over a directory that holds files, hiding them while mounted (`wan mount
    /// --allow-non-empty`). Off: such a mountpoint is refused, since it is most often a wrong
    /// path or a copy someone meant to keep.
    pub allow_non_empty: bool,
}

impl Default for MountConfig {
    fn default() -> Self {
        MountConfig {
            passthrough: true,
            warm_readahead: true,
            allow_other: None,
            read_ahead_kb: 4096,
            threads: 2,
            allow_non_empty: false,
        }
    }
}

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("{path}: {msg}")]
    Invalid { path: String, msg: String },
}

impl Config {
    /// Reads and validates a config file (without environment overrides).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Io {
            path: p.clone(),
            err,
        })?;
        let cfg: Config = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: p.clone(),
            msg: e.to_string().trim_end().to_string(),
        })?;
        cfg.validate()
            .map_err(|msg| ConfigError::Invalid { path: p, msg })?;
        Ok(cfg)
    }

    /// Applies `WAN_<KEY>` / `WAN_<SECTION>_<KEY>` environment variables (e.g.
    /// `WAN_CACHE_DIR`, `WAN_FETCH_CONNECTIONS=32`, `WAN_GC_MAX_BYTES`), then validates.
    /// Values are TOML literals (a bare word is taken as a string). Variables that name no
    /// key are left alone here; [`unknown_env`] says which of them look like mistakes.
    pub fn with_env(
        self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        // Out-of-range values (a u64 past i64::MAX) cannot be serialized: refuse them first.
        self.validate().map_err(|msg| ConfigError::Invalid {
            path: "configuration".into(),
            msg,
        })?;
        let mut tree = toml::Value::try_from(&self).map_err(|e| ConfigError::Invalid {
            path: "configuration".into(),
            msg: e.to_string(),
        })?;
        let table = tree.as_table_mut().expect("a table");
        // Optional top-level keys are absent when unset; list them so they can be set.
        let top = ["mountpoint", "manifest", "cache_dir"];
        for (name, raw) in vars {
            let Some(rest) = name.strip_prefix("WAN_") else {
                continue;
            };
            let rest = rest.to_ascii_lowercase();
            let value = raw
                .parse::<toml::Value>()
                .ok()
                .or_else(|| {
                    format!("v = {raw}")
                        .parse::<toml::Table>()
                        .ok()
                        .and_then(|t| t.get("v").cloned())
                })
                .unwrap_or_else(|| toml::Value::String(raw.clone()));
            if top.contains(&rest.as_str()) {
                table.insert(rest, toml::Value::String(raw));
                continue;
            }
            let Some((section, key)) = rest.split_once('_') else {
                continue;
            };
            let Some(sec) = table.get_mut(section).and_then(toml::Value::as_table_mut) else {
                continue;
            };
            if let Some(slot) = sec.get_mut(key) {
                // Keep the key's type: a string key takes the raw text.
                *slot = if slot.is_str() {
                    toml::Value::String(raw)
                } else {
                    value
                };
            } else if section == "mount" && key == "allow_other" {
                sec.insert(key.into(), value);
            } else if (section == "trust" && key == "trusted_root")
                || (section == "oci" && key == "auth_file")
            {
                sec.insert(key.into(), toml::Value::String(raw));
            }
        }
        let cfg: Config = tree
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid {
                path: "environment (WAN_*)".into(),
                msg: e.to_string().trim_end().to_string(),
            })?;
        cfg.validate().map_err(|msg| ConfigError::Invalid {
            path: "environment (WAN_*)".into(),
            msg,
        })?;
        Ok(cfg)
    }

    /// Rejects values that cannot work, naming the key and its range. Every number has a
    /// range: past it a value would overflow a `Duration`, SQLite's signed integers or the
    /// serializer (TOML integers are signed), or spawn absurd numbers of threads.
    pub fn validate(&self) -> Result<(), String> {
        let f = &self.fetch;
        let g = &self.gc;
        let m = &self.mount;
        const DAY: f64 = 86_400.0;
        // (key, value, least, most, unit); bounds are inclusive.
        let ints: [(&str, u64, u64, u64, &str); 10] = [
            ("fetch.connections", f.connections as u64, 1, 1024, ""),
            (
                "fetch.max_inflight_mib",
                f.max_inflight_mib,
                1,
                65_536,
                " MiB",
            ),
            ("fetch.retries", u64::from(f.retries), 1, 100, " attempts"),
            ("fetch.backoff_ms", f.backoff_ms, 0, 600_000, " ms"),
            (
                "fetch.readahead_chunks",
                u64::from(f.readahead_chunks),
                0,
                1024,
                " chunks",
            ),
            (
                "fetch.part_size_kib",
                f.part_size_kib,
                64,
                1_048_576,
                " KiB",
            ),
            ("gc.max_bytes", g.max_bytes, 0, i64::MAX as u64, " bytes"),
            (
                "mount.read_ahead_kb",
                u64::from(m.read_ahead_kb),
                0,
                1_048_576,
                " KiB",
            ),
            ("mount.threads", m.threads as u64, 1, 256, " threads"),
            (
                "oci.unpack_max_mib",
                self.oci.unpack_max_mib,
                1,
                1 << 30,
                " MiB",
            ),
        ];
        for (key, v, lo, hi, unit) in ints {
            if !(lo..=hi).contains(&v) {
                return Err(format!("{key} must be in [{lo}, {hi}]{unit}, got {v}"));
            }
        }
        // (key, value, least, least allowed itself, most).
        let floats: [(&str, f64, f64, bool, f64); 7] = [
            (
                "fetch.read_timeout_secs",
                f.read_timeout_secs,
                0.0,
                false,
                DAY,
            ),
            (
                "fetch.request_timeout_secs",
                f.request_timeout_secs,
                0.0,
                false,
                DAY,
            ),
            ("fetch.cooldown_secs", f.cooldown_secs, 0.0, true, DAY),
            ("gc.interval_secs", g.interval_secs, 0.0, false, DAY),
            ("gc.min_free_percent", g.min_free_percent, 0.0, true, 99.0),
            (
                "peers.connect_timeout_secs",
                self.peers.connect_timeout_secs,
                0.0,
                false,
                DAY,
            ),
            (
                "peers.cooldown_secs",
                self.peers.cooldown_secs,
                0.0,
                true,
                DAY,
            ),
        ];
        for (key, v, lo, lo_ok, hi) in floats {
            let above = if lo_ok { v >= lo } else { v > lo };
            if !(v.is_finite() && above && v <= hi) {
                let open = if lo_ok { '[' } else { '(' };
                return Err(format!("{key} must be in {open}{lo}, {hi}], got {v}"));
            }
        }
        if !(0.0 < g.low_watermark && g.low_watermark < g.high_watermark && g.high_watermark <= 1.0)
        {
            return Err(format!(
                "gc watermarks must satisfy 0 < low_watermark ({}) < high_watermark ({}) <= 1",
                g.low_watermark, g.high_watermark
            ));
        }
        if !self.http.addr.is_empty() && self.http.addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(format!(
                "http.addr {:?} is not an address like 127.0.0.1:8000",
                self.http.addr
            ));
        }
        self.peers.validate()?;
        self.log.validate()?;
        self.trust.validate()?;
        Ok(())
    }
}

/// The `WAN_*` variables that override a config key, one per key (`WAN_FETCH_CONNECTIONS`):
/// `WAN_<KEY>` for a top-level key, `WAN_<SECTION>_<KEY>` for a section's.
pub fn override_vars() -> Vec<String> {
    let mut names: Vec<String> = ["mountpoint", "manifest", "cache_dir"]
        .iter()
        .map(|k| k.to_string())
        .collect();
    // Every section's keys, from the defaults (`mount.allow_other` is unset by default).
    if let Ok(toml::Value::Table(t)) = toml::Value::try_from(Config::default()) {
        for (section, keys) in t {
            if let toml::Value::Table(keys) = keys {
                names.extend(keys.keys().map(|k| format!("{section}_{k}")));
                if section == "mount" {
                    names.push("mount_allow_other".into());
                }
                if section == "trust" {
                    names.push("trust_trusted_root".into());
                }
                if section == "oci" {
                    names.push("oci_auth_file".into());
                }
            }
        }
    }
    names
        .iter()
        .map(|n| format!("WAN_{}", n.to_ascii_uppercase()))
        .collect()
}

/// The `WAN_*` variables that mean something: the overrides, `WAN_LOG`, the default token
/// variable and the one `http.token_env` names.
fn known_env(token_env: &str) -> Vec<String> {
    let mut names = override_vars();
    names.push("WAN_LOG".into());
    names.push(HttpConfig::default().token_env);
    names.push(token_env.to_string());
    names
}

/// The known name `name` was probably meant to be: the only one within an edit per four
/// characters after `WAN_` (so `WAN_FOO` is not taken for `WAN_LOG`), at most two.
fn meant<'a>(name: &str, known: &'a [String]) -> Option<&'a str> {
    let most = (name.len().saturating_sub(4) / 4).min(2);
    let near: Vec<&str> = known
        .iter()
        .filter(|k| crate::manifest::edit_distance(k, name) <= most)
        .map(String::as_str)
        .collect();
    match near[..] {
        [one] => Some(one),
        _ => None,
    }
}

/// One warning per `WAN_*` variable that names nothing wanfs reads (`WAN_FETCH_CONECTIONS`),
/// with the variable it was probably meant to be: a misspelt override is otherwise ignored
/// without a word. `token_env` is the configured `http.token_env`.
pub fn unknown_env(
    vars: impl IntoIterator<Item = (String, String)>,
    token_env: &str,
) -> Vec<String> {
    let known = known_env(token_env);
    let mut unknown: Vec<String> = vars
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("WAN_") && !known.contains(k))
        .collect();
    unknown.sort();
    unknown
        .into_iter()
        .map(|name| {
            let shown = crate::logging::untrusted(&name);
            match meant(&name, &known) {
                Some(meant) => format!(
                    "unknown environment variable {shown} is ignored: did you mean {meant}?"
                ),
                None => format!(
                    "unknown environment variable {shown} is ignored: it names no config key \
                     (WAN_<SECTION>_<KEY>, docs/CONFIGURATION.md)"
                ),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oci_section_is_set_from_the_file_and_the_environment() {
        let c: Config = toml::from_str(
            "[oci]\ninsecure_registries = [\"reg:5000\"]\nauth_file = \"/etc/wan22/auth.json\"\n",
        )
        .unwrap();
        assert_eq!(c.oci.insecure_registries, vec!["reg:5000".to_string()]);
        assert_eq!(c.oci.auth_file, Some(PathBuf::from("/etc/wan22/auth.json")));
        let c = Config::default()
            .with_env([
                ("WAN_OCI_AUTH_FILE".into(), "/run/auth.json".into()),
                ("WAN_OCI_INSECURE_REGISTRIES".into(), "[\"a:1\"]".into()),
            ])
            .unwrap();
        assert_eq!(c.oci.auth_file, Some(PathBuf::from("/run/auth.json")));
        assert_eq!(c.oci.insecure_registries, vec!["a:1".to_string()]);
        assert!(override_vars().contains(&"WAN_OCI_AUTH_FILE".to_string()));
    }

    #[test]
    fn unknown_wan_variables_are_named_with_the_one_meant() {
        let vars = [
            ("WAN_FETCH_CONECTIONS", "3"),
            ("WAN_FETCH_CONNECTIONS", "3"),
            ("WAN_LOG", "debug"),
            ("WAN_HTTP_TOKEN", "t"),
            ("WAN_FLEET_TOKEN", "t"),
            ("WAN_MOUNT_ALLOW_OTHER", "true"),
            ("WAN_MOUNT_ALLOW_NON_EMPTY", "true"),
            ("WAN_CACHE_DIR", "/c"),
            ("WAN_LOG_LEVEL", "info"),
            ("WAN_FOO", "1"),
            ("PATH", "/bin"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let w = unknown_env(vars, "WAN_FLEET_TOKEN");
        assert_eq!(w.len(), 2, "{w:#?}");
        assert!(
            w[0].contains("WAN_FETCH_CONECTIONS")
                && w[0].contains("did you mean WAN_FETCH_CONNECTIONS?"),
            "{}",
            w[0]
        );
        assert!(
            w[1].contains("WAN_FOO") && !w[1].contains("did you mean"),
            "{}",
            w[1]
        );
        // Every documented override is known, so none of them is warned about.
        let all: Vec<(String, String)> = known_env("WAN_HTTP_TOKEN")
            .into_iter()
            .map(|k| (k, String::new()))
            .collect();
        assert!(all.iter().any(|(k, _)| k == "WAN_PEERS_URLS"));
        assert!(unknown_env(all, "WAN_HTTP_TOKEN").is_empty());
    }

    #[test]
    fn unknown_key_is_named() {
        let e = toml::from_str::<Config>("[fetch]\nconections = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("conections") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn env_overrides_apply_with_types() {
        let vars = [
            ("WAN_FETCH_CONNECTIONS", "32"),
            ("WAN_CACHE_DIR", "/srv/cache"),
            ("WAN_HTTP_ADDR", "127.0.0.1:9000"),
            ("WAN_GC_HIGH_WATERMARK", "0.95"),
            ("WAN_LOG", "debug"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let c = Config::default().with_env(vars).unwrap();
        assert_eq!(c.fetch.connections, 32);
        assert_eq!(c.cache_dir.as_deref(), Some(Path::new("/srv/cache")));
        assert_eq!(c.http.addr, "127.0.0.1:9000");
        assert_eq!(c.gc.high_watermark, 0.95);
        let bad = Config::default().with_env([("WAN_FETCH_CONNECTIONS".into(), "many".into())]);
        assert!(bad.unwrap_err().to_string().contains("connections"));
    }

    #[test]
    fn trust_section_reads_and_overrides() {
        let c: Config = toml::from_str(
            "[trust]\nrequire_signature = true\nkeys = [\"/k.pub\"]\n\
             trusted_root = \"/r.json\"\n[[trust.identities]]\nidentity = \"a@b\"\n\
             issuer = \"https://i\"\n",
        )
        .unwrap();
        assert!(c.trust.require_signature);
        assert_eq!(c.trust.identities[0].issuer, "https://i");
        assert!(c.validate().is_ok());
        let e = toml::from_str::<Config>("[[trust.identities]]\nidentity = \"a@b\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("issuer"), "{e}");
        let vars = [
            ("WAN_TRUST_TRUSTED_ROOT", "/etc/wan22/root.json"),
            ("WAN_TRUST_KEYS", r#"["/a.pub", "/b.pub"]"#),
            (
                "WAN_TRUST_IDENTITIES",
                r#"[{identity = "a@b", issuer = "https://i"}]"#,
            ),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let c = Config::default().with_env(vars).unwrap();
        assert_eq!(
            c.trust.trusted_root.as_deref(),
            Some(Path::new("/etc/wan22/root.json"))
        );
        assert_eq!(c.trust.keys.len(), 2);
        assert_eq!(c.trust.identities.len(), 1);
        // Identities with nothing to check them against.
        let bad = Config::default().with_env([(
            "WAN_TRUST_IDENTITIES".into(),
            r#"[{identity = "a@b", issuer = "https://i"}]"#.into(),
        )]);
        assert!(bad.unwrap_err().to_string().contains("trusted_root"));
    }

    #[test]
    fn impossible_values_are_refused() {
        let mut c = Config::default();
        c.fetch.read_timeout_secs = 0.0;
        assert!(c.validate().unwrap_err().contains("read_timeout_secs"));
        let c: Config = toml::from_str("[fetch]\nretries = 0\n").unwrap();
        assert!(c.validate().unwrap_err().contains("retries"));
        assert!(Config::default().validate().is_ok());
    }

    #[test]
    fn peers_are_checked_naming_the_entry() {
        let ok: Config = toml::from_str(
            "[peers]\nurls = [\"http://10.0.0.2:8000\", \"https://gpu-3.example:8443/\"]\n",
        )
        .unwrap();
        assert!(ok.validate().is_ok());
        let cases = [
            ("ftp://10.0.0.2", "http:// or https://"),
            ("http://u:p@10.0.0.2:8000", "credentials"),
            ("http://10.0.0.2:8000/blobs", "no path"),
            ("http://10.0.0.2:8000?x=1", "no path or query"),
            ("10.0.0.2:8000", "peers.urls[1]"),
        ];
        for (url, want) in cases {
            let text = format!("[peers]\nurls = [\"http://10.0.0.9:8000\", {url:?}]\n");
            let c: Config = toml::from_str(&text).unwrap();
            let e = c.validate().unwrap_err();
            assert!(
                e.contains(want) && e.contains("peers.urls[1]"),
                "{url}: {e}"
            );
        }
        let twice: Config =
            toml::from_str("[peers]\nurls = [\"http://a:1\", \"http://a:1/\"]\n").unwrap();
        assert!(twice.validate().unwrap_err().contains("listed twice"));
        let slow: Config = toml::from_str("[peers]\nconnect_timeout_secs = 0\n").unwrap();
        assert!(
            slow.validate()
                .unwrap_err()
                .contains("peers.connect_timeout_secs")
        );
        let vars = [("WAN_PEERS_URLS".into(), "[\"http://127.0.0.1:9\"]".into())];
        let c = Config::default().with_env(vars).unwrap();
        assert_eq!(c.peers.urls, ["http://127.0.0.1:9"]);
    }

    /// Each of these once panicked (serializing, building a `Duration`, spawning threads).
    #[test]
    fn out_of_range_values_are_refused_naming_key_and_range() {
        let cases = [
            ("[gc]\nmax_bytes = 10000000000000000000\n", "gc.max_bytes"),
            (
                "[fetch]\nbackoff_ms = 9223372036854775808\n",
                "fetch.backoff_ms",
            ),
            (
                "[fetch]\nread_timeout_secs = 1e300\n",
                "fetch.read_timeout_secs",
            ),
            (
                "[fetch]\nrequest_timeout_secs = 1e300\n",
                "fetch.request_timeout_secs",
            ),
            ("[fetch]\ncooldown_secs = inf\n", "fetch.cooldown_secs"),
            ("[mount]\nthreads = 20000\n", "mount.threads"),
            ("[fetch]\nconnections = 100000\n", "fetch.connections"),
            ("[gc]\ninterval_secs = 1e20\n", "gc.interval_secs"),
        ];
        for (text, key) in cases {
            let c: Config = toml::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            let e = c.validate().unwrap_err();
            assert!(e.contains(key) && e.contains("must be in"), "{text}: {e}");
            let e = c.with_env([]).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }
}
