//! Sources: where chunk bytes come from, behind one small trait.
//!
//! A `Source` answers one question: "give me these bytes of this file". Everything about
//! trying sources in priority order, retrying, backing off and cooling a failing source down
//! lives in `SourceHandle` and fetch/attempt.rs, so a new kind of source (S3, a peer) is one impl.
//! Sources return raw bytes; they never verify: the fetcher does, before anything is stored.

pub(crate) mod answer;
mod file;
pub(crate) mod http;
#[cfg(any(test, feature = "mock"))]
pub mod mock;
pub(crate) mod oci;
pub(crate) mod oci_chunks;
pub(crate) mod oci_packed;
mod rawhttp;
mod s3;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;

use crate::chunk::Filler;
use crate::config::{FetchConfig, PeersConfig};
use crate::manifest::SourceUrl;

pub use file::DirSource;
pub use http::{HttpSource, http_client};
pub use s3::S3Source;

/// Why a source could not deliver.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    #[error("not found")]
    NotFound,
    #[error("access denied (HTTP {0}): check credentials")]
    Denied(u16),
    #[error("HTTP {0}")]
    Status(u16),
    /// A 429 or 503 that says when to ask again (`Retry-After`).
    #[error("HTTP {status}, retry after {} s", .after.as_secs())]
    RetryAfter { status: u16, after: Duration },
    #[error("transport: {0}")]
    Transport(String),
    /// No connection could be made (refused, no route, no such host): nothing is serving.
    #[error("unreachable: {0}")]
    Unreachable(String),
    #[error("timed out")]
    Timeout,
    #[error("short body: wanted {want} bytes, got {got}")]
    Short { want: u64, got: u64 },
    #[error("{0}")]
    Unsupported(String),
}

impl SourceError {
    /// Whether trying the same source again may help.
    pub fn retryable(&self) -> bool {
        match self {
            SourceError::NotFound | SourceError::Denied(_) | SourceError::Unsupported(_) => false,
            SourceError::Status(s) => *s >= 500 || *s == 408 || *s == 429,
            SourceError::RetryAfter { .. }
            | SourceError::Transport(_)
            | SourceError::Unreachable(_)
            | SourceError::Timeout
            | SourceError::Short { .. } => true,
        }
    }

    /// Whether the source answered but failed (5xx, a reset, a stall): such a source is
    /// flaky, and worth more rounds until the read deadline. One that refuses connections is
    /// down: a read fails fast rather than wait out `read_timeout` against it.
    pub fn flaky(&self) -> bool {
        self.retryable() && !matches!(self, SourceError::Unreachable(_))
    }
}

/// `fetch` for a source that [`streams`](Source::streams): a fresh buffer filled by its
/// `fetch_filling`.
pub fn fetch_filled<'a, S: Source + ?Sized>(
    src: &'a S,
    path: &'a str,
    range: Range<u64>,
) -> BoxFuture<'a, Result<Bytes, SourceError>> {
    Box::pin(async move {
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        src.fetch_filling(path, range, &mut Filler::plain(&mut buf))
            .await?;
        Ok(Bytes::from(buf))
    })
}

/// A place that can serve byte ranges of a model's files.
pub trait Source: Send + Sync {
    /// Exactly the bytes `range` of `path` (relative to the model root), or an error.
    fn fetch<'a>(
        &'a self,
        path: &'a str,
        range: Range<u64>,
    ) -> BoxFuture<'a, Result<Bytes, SourceError>>;

    /// The same bytes, written into `buf` (exactly `range`'s length). A source that
    /// [`streams`](Source::streams) lands them there through its
    /// [`fetch_filling`](Source::fetch_filling), with no copy; the others copy from `fetch`.
    fn fetch_into<'a>(
        &'a self,
        path: &'a str,
        range: Range<u64>,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            if self.streams() {
                return self
                    .fetch_filling(path, range, &mut Filler::plain(buf))
                    .await;
            }
            let b = self.fetch(path, range).await?;
            if b.len() != buf.len() {
                return Err(SourceError::Short {
                    want: buf.len() as u64,
                    got: b.len() as u64,
                });
            }
            buf.copy_from_slice(&b);
            Ok(())
        })
    }

    /// Whether [`fetch_filling`](Source::fetch_filling) hands bytes over as they arrive, so
    /// that hashing them as they land saves a pass over memory. A source that says so
    /// overrides `fetch_filling` (the default goes through `fetch_into`, which then comes
    /// back to it), and may answer `fetch` with [`fetch_filled`]. Where it does not (the
    /// default), the fetcher fills a plain buffer and hashes the chunk after, on a blocking
    /// thread, rather than in one long step on an async worker.
    fn streams(&self) -> bool {
        false
    }

    /// The same bytes, landing in `into` (empty, exactly `range`'s length) front to back:
    /// sources that read a stream override this and [`advance`](Filler::advance) after each
    /// read, so every piece is hashed while still in cache (and say so in
    /// [`streams`](Source::streams)). The default fills the buffer first and advances once.
    fn fetch_filling<'a>(
        &'a self,
        path: &'a str,
        range: Range<u64>,
        into: &'a mut Filler<'_>,
    ) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            let n = into.unfilled().len();
            self.fetch_into(path, range, into.unfilled()).await?;
            into.advance(n);
            Ok(())
        })
    }

    /// What `path` is packed in, where this source knows it without asking anything (an OCI
    /// file in a compressed layer, fetched whole at first read): for status. `None` for
    /// every other file, and before the source has looked.
    fn packed(&self, _path: &str) -> Option<String> {
        None
    }
}

/// Folds `now` (bytes per second) into a moving rate. Down fast, up slowly: a source that
/// slows down gets small parts again after a request or two (a large part on a slow
/// connection keeps a chunk waiting), while one fast request does not make the next parts
/// large.
fn fold_rate(rate: &Mutex<Option<(f64, Instant)>>, now: f64) {
    const DOWN: f64 = 0.5;
    const UP: f64 = 0.125;
    let mut r = rate.lock().unwrap();
    let next = r.map_or(now, |(old, _)| {
        old + if now < old { DOWN } else { UP } * (now - old)
    });
    *r = Some((next, Instant::now()));
}

/// A source plus its health, shared by every model that lists the same URL.
pub struct SourceHandle {
    /// Safe to log: no credentials.
    pub name: String,
    pub source: Box<dyn Source>,
    /// A model's own source or another daemon: how it is addressed and what its errors mean.
    pub kind: SourceKind,
    health: Mutex<Health>,
    /// What one request to this source delivers, in bytes per second (a moving average over
    /// completed requests, latency included), and when a request last completed; `None` until
    /// one does. Sizes read-ahead parts (`fetch::attempt::part_len`), and ranks a peer against
    /// the origin (`fetch::attempt::live_peers`).
    rate: Mutex<Option<(f64, Instant)>>,
    /// The same, over requests that ran alone (no other request to this source started or
    /// was in flight while they ran), and when one last did: what the source delivers to
    /// one request when nothing shares it (see [`SourceHandle::solo_rate`]).
    solo_rate: Mutex<Option<(f64, Instant)>>,
    /// What the source delivers in all: each completed request's rate times the requests in
    /// flight when it ended (see [`SourceHandle::total_rate`]).
    total_rate: Mutex<Option<(f64, Instant)>>,
    /// Requests to this source in flight now, and how many ever started: what tells a request
    /// that ran alone ([`InFlight::alone`]).
    in_flight: AtomicUsize,
    started: AtomicU64,
    /// Set once a fetch skipped the peers to measure this origin (see `probe_once`).
    probed: std::sync::atomic::AtomicBool,
}

/// One request to a source, counted in flight while this lives ([`SourceHandle::request`]).
pub struct InFlight<'a> {
    src: &'a SourceHandle,
    /// Its number among the source's requests, and whether it found none in flight.
    ticket: u64,
    first: bool,
}

impl InFlight<'_> {
    /// Requests to the source in flight now, this one included.
    pub fn sharing(&self) -> usize {
        self.src.in_flight.load(Ordering::Relaxed).max(1)
    }

    /// Whether the request ran alone: none was in flight when it started, and none started
    /// since.
    pub fn alone(&self) -> bool {
        self.first && self.src.started.load(Ordering::Relaxed) == self.ticket
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.src.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a source is, which decides how it is asked and what its errors say of it. Every rule
/// that tells a peer from an origin is a method here, so a fetch never asks "is it a peer?".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// One of a model's own sources (`[sources] priority`): addressed by the file's path, asked
    /// in rounds until the read deadline while its failures may pass.
    Origin,
    /// Another wanfs daemon (`[peers]`): addressed by blob digest (`/blobs/<sha256>`), asked
    /// once per fetch with one attempt, before the origins. A chunk it lacks (404) is a miss,
    /// not a failure; any other error cools it down at once: it is an optimisation, and the
    /// origin behind it is never more than one timeout away.
    Peer,
}

/// What a failed request says of the source that answered it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A peer without the chunk: not a failure of it; the next source is asked.
    Miss,
    /// A failure, counted toward the source's cool-down.
    Failed,
    /// A failure that cools the source down at once.
    FailedHard,
}

impl SourceKind {
    /// What error `e` from a source of this kind says of it (a request that did not answer
    /// before the read deadline is judged as [`SourceError::Timeout`]).
    pub fn judge(self, e: &SourceError) -> Verdict {
        match self {
            SourceKind::Origin if matches!(e, SourceError::Denied(_)) => Verdict::FailedHard,
            SourceKind::Origin => Verdict::Failed,
            SourceKind::Peer if matches!(e, SourceError::NotFound) => Verdict::Miss,
            SourceKind::Peer => Verdict::FailedHard,
        }
    }

    /// Whether this source's errors tell whether the origin is flaky, and so whether another
    /// round may help: a peer's miss or failure says nothing of the origin behind it.
    pub fn speaks_for_origin(self) -> bool {
        match self {
            SourceKind::Origin => true,
            SourceKind::Peer => false,
        }
    }

    /// Where a source of this kind finds `entry`'s bytes: its path under the model's base URL,
    /// or for a peer the blob's digest (a peer's cache is content-addressed and knows no
    /// models).
    pub fn locator<'a>(self, entry: &'a crate::manifest::FileEntry, hex: &'a str) -> &'a str {
        match self {
            SourceKind::Origin => &entry.path,
            SourceKind::Peer => hex,
        }
    }

    /// The kind, as metrics label it.
    pub fn label(self) -> &'static str {
        match self {
            SourceKind::Origin => "origin",
            SourceKind::Peer => "peer",
        }
    }
}

#[derive(Default)]
struct Health {
    consecutive_failures: u32,
    cooled_until: Option<Instant>,
    last_failure: Option<Instant>,
}

/// How long after its last failure a source still counts as failing for health, unless a
/// request to it succeeds first: a failover-only mirror may see no traffic once it recovers.
const FAILING_FOR: Duration = Duration::from_secs(60);

/// Consecutive failures after which a source is cooled down.
const FAILURES_BEFORE_COOLDOWN: u32 = 3;

impl SourceHandle {
    /// An origin: one of a model's own sources.
    pub fn new(name: String, source: Box<dyn Source>) -> SourceHandle {
        SourceHandle::of_kind(SourceKind::Origin, name, source)
    }

    pub fn of_kind(kind: SourceKind, name: String, source: Box<dyn Source>) -> SourceHandle {
        SourceHandle {
            name,
            source,
            kind,
            health: Mutex::new(Health::default()),
            rate: Mutex::new(None),
            solo_rate: Mutex::new(None),
            total_rate: Mutex::new(None),
            in_flight: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            probed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Counts a request to this source in flight until the guard is dropped.
    pub fn request(&self) -> InFlight<'_> {
        let first = self.in_flight.fetch_add(1, Ordering::Relaxed) == 0;
        let ticket = self.started.fetch_add(1, Ordering::Relaxed) + 1;
        InFlight {
            src: self,
            ticket,
            first,
        }
    }

    /// Folds one completed request of `bytes` that took `secs` into the source's rate; and
    /// into its rate alone, where it ran alone (see [`InFlight::alone`]) and its bytes took
    /// `alone` seconds from the first.
    pub fn record_rate(&self, bytes: u64, secs: f64, alone: Option<f64>) {
        self.record_shared_rate(bytes, secs, alone, 1);
    }

    /// [`record_rate`](SourceHandle::record_rate), for a request that ended with `sharing`
    /// requests to the source in flight (itself included).
    pub fn record_shared_rate(&self, bytes: u64, secs: f64, alone: Option<f64>, sharing: usize) {
        fold_rate(&self.rate, bytes as f64 / secs.max(1e-6));
        fold_rate(
            &self.total_rate,
            bytes as f64 / secs.max(1e-6) * sharing as f64,
        );
        if let Some(secs) = alone {
            fold_rate(&self.solo_rate, bytes as f64 / secs.max(1e-6));
        }
    }

    /// Bytes per second one request to this source delivers, once one has completed.
    pub fn rate(&self) -> Option<f64> {
        self.rate.lock().unwrap().map(|(r, _)| r)
    }

    /// Bytes per second the source delivers to all its requests together: a request's rate
    /// times the requests that shared it.
    pub fn total_rate(&self) -> Option<f64> {
        self.total_rate.lock().unwrap().map(|(r, _)| r)
    }

    /// Bytes per second a request that ran alone delivered, if one did within `fresh`.
    ///
    /// Why apart from [`rate`](SourceHandle::rate): requests that share a source which is
    /// bound by its own CPU (a radosgw, a busy mirror) each get a share of it, so with 16 in
    /// flight each looks as slow as a per-connection limit, and read-ahead kept cutting
    /// chunks into 1 MiB parts: a thousand GETs per GiB, each costing the server a request.
    /// A request alone shows what one connection can carry: parts are sized from the larger
    /// of the two (`fetch::attempt::part_len`). A source limited per connection delivers the
    /// same alone or not, and keeps small parts.
    pub fn solo_rate(&self, fresh: Duration) -> Option<f64> {
        self.solo_rate
            .lock()
            .unwrap()
            .filter(|(_, at)| at.elapsed() < fresh)
            .map(|(r, _)| r)
    }

    /// [`SourceHandle::rate`], if a request completed within `fresh`.
    pub fn rate_within(&self, fresh: Duration) -> Option<f64> {
        self.rate
            .lock()
            .unwrap()
            .filter(|(_, at)| at.elapsed() < fresh)
            .map(|(r, _)| r)
    }

    /// True the first time only: the one fetch that goes to this origin before the peers, so
    /// its rate is known and a slow peer can be told from a fast one.
    pub fn probe_once(&self) -> bool {
        !self.probed.swap(true, std::sync::atomic::Ordering::Relaxed)
    }

    /// When the cool-down ends, if the source is cooling down now.
    pub fn cooling_until(&self) -> Option<Instant> {
        let h = self.health.lock().unwrap();
        h.cooled_until.filter(|t| *t > Instant::now())
    }

    /// Whether the last request to this source failed (or it is cooling down).
    pub fn failing(&self) -> bool {
        let h = self.health.lock().unwrap();
        let now = Instant::now();
        h.cooled_until.is_some_and(|t| t > now)
            || (h.consecutive_failures > 0
                && h.last_failure
                    .is_some_and(|t| now.duration_since(t) < FAILING_FOR))
    }

    pub fn record_success(&self) {
        let mut h = self.health.lock().unwrap();
        h.consecutive_failures = 0;
        h.cooled_until = None;
    }

    /// Counts a failure; `hard` (wrong bytes, denied) cools the source down at once.
    pub fn record_failure(&self, hard: bool, cooldown: Duration) {
        let mut h = self.health.lock().unwrap();
        h.consecutive_failures += 1;
        h.last_failure = Some(Instant::now());
        if hard || h.consecutive_failures >= FAILURES_BEFORE_COOLDOWN {
            h.cooled_until = Some(Instant::now() + cooldown);
        }
    }
}

/// The Hub's endpoint (HF_ENDPOINT, default huggingface.co, no trailing slash) and token
/// (HF_TOKEN), as `hf://` sources and `wan manifest build hf://…` read them.
pub fn hub() -> (String, Option<String>) {
    let endpoint =
        std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".to_string());
    let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty());
    (endpoint.trim_end_matches('/').to_string(), token)
}

/// HF_ENDPOINT as a URL, and HF_TOKEN: refused here, naming the variable, rather than as a
/// `builder error` at the first request (of a build, or of the daemon's `hf://` sources).
pub fn hub_checked() -> anyhow::Result<(reqwest::Url, Option<String>)> {
    let (endpoint, token) = hub();
    let url = http_url(&endpoint).ok_or_else(|| {
        anyhow::anyhow!(
            "HF_ENDPOINT {endpoint:?} is not an http(s) URL with a host (such as https://huggingface.co)"
        )
    })?;
    if let Some(t) = &token
        && reqwest::header::HeaderValue::from_str(&format!("Bearer {t}")).is_err()
    {
        anyhow::bail!("HF_TOKEN holds characters an HTTP header cannot carry (a newline?)");
    }
    Ok((url, token))
}

/// `text` as a URL an HTTP client can ask: `http` or `https`, with a host. `None` for
/// anything else (`127.0.0.1:9000` without a scheme parses, with `127.0.0.1` as its scheme).
pub(crate) fn http_url(text: &str) -> Option<reqwest::Url> {
    reqwest::Url::parse(text)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
}

/// An error and its sources, each once: the cause (connection refused, DNS, TLS, a timeout) is
/// often only in the chain, under a top line like `error sending request`.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let part = s.to_string();
        if !msg.contains(&part) {
            msg.push_str(": ");
            msg.push_str(&part);
        }
        src = s.source();
    }
    msg
}

/// Hides credentials in a URL: userinfo and query strings (signed URLs).
pub fn mask_url(url: &str) -> String {
    let mut out = url.to_string();
    // Keys stay (they say what kind of URL it is), every value goes.
    if let Some((base, query)) = url.split_once('?') {
        let masked: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) => format!("{k}=***"),
                None => "***".into(),
            })
            .collect();
        out = format!("{base}?{}", masked.join("&"));
    }
    if let Some(scheme_end) = out.find("://")
        && let Some(at) = out[scheme_end + 3..].find('@')
    {
        let host_start = scheme_end + 3;
        let slash = out[host_start..]
            .find('/')
            .map_or(out.len(), |s| host_start + s);
        if host_start + at < slash {
            out.replace_range(host_start..host_start + at, "***");
        }
    }
    out
}

/// Builds and shares source handles by URL, so health is tracked once per mirror.
pub struct SourceRegistry {
    client: reqwest::Client,
    by_url: Mutex<HashMap<SourceUrl, Arc<SourceHandle>>>,
    /// Peer handles by what defines them, so a reload that keeps a peer keeps its health.
    peers: Mutex<HashMap<PeerKey, Arc<SourceHandle>>>,
    fetch: FetchConfig,
    /// Set by [`SourceRegistry::with_sources`]: every model's sources, whatever it lists.
    fixed: Option<Vec<Arc<SourceHandle>>>,
    /// `[oci]`: what `oci://` sources are built with.
    oci: crate::config::OciConfig,
}

/// A peer's URL, connect timeout (in µs) and token: a change to any needs a new handle.
type PeerKey = (String, u64, Option<String>);

impl SourceRegistry {
    pub fn new(cfg: &FetchConfig) -> anyhow::Result<SourceRegistry> {
        // `hf://` sources read the Hub's variables when they are first used: a malformed one
        // is refused at start, not answered `builder error` at a first read.
        hub_checked()?;
        Ok(SourceRegistry {
            client: http_client(cfg, cfg.request_timeout())?,
            by_url: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            fetch: cfg.clone(),
            fixed: None,
            oci: Default::default(),
        })
    }

    /// The `[oci]` section `oci://` sources are built with (plain HTTP, credentials).
    pub fn with_oci(self, oci: crate::config::OciConfig) -> SourceRegistry {
        SourceRegistry { oci, ..self }
    }

    /// A registry that gives every model `sources` (in this order) instead of the ones its
    /// manifest lists: how a test puts an in-memory origin under the daemon's wiring
    /// (`daemon::Services::builder`). Peers are still built by URL.
    pub fn with_sources(self, sources: Vec<Arc<SourceHandle>>) -> SourceRegistry {
        SourceRegistry {
            fixed: Some(sources),
            ..self
        }
    }

    /// The handles model `m` is fetched from, in priority order.
    pub fn for_model(&self, m: &crate::manifest::Model) -> Vec<Arc<SourceHandle>> {
        match &self.fixed {
            Some(fixed) => fixed.clone(),
            None => m.sources.iter().map(|u| self.get(u)).collect(),
        }
    }

    /// The handles of `cfg`'s peers, in its order. Each sends `token` (the fleet's bearer
    /// token, from `http.token_env`), which `/blobs` asks for under `http.require_token`.
    pub fn peers(
        &self,
        cfg: &PeersConfig,
        token: Option<String>,
    ) -> anyhow::Result<Vec<Arc<SourceHandle>>> {
        let mut map = self.peers.lock().unwrap();
        let micros = cfg.connect_timeout().as_micros() as u64;
        let mut client = None;
        let mut out = Vec::new();
        for url in &cfg.urls {
            let key = (url.clone(), micros, token.clone());
            if let Some(h) = map.get(&key) {
                out.push(h.clone());
                continue;
            }
            if client.is_none() {
                // The origin's client waits `request_timeout` to connect; a peer is asked
                // first for every cold chunk, so one that is down must fail fast.
                client = Some(http::peer_client(&self.fetch, cfg.connect_timeout())?);
            }
            let base = format!("{}/blobs", url.trim_end_matches('/'));
            let source = HttpSource::new(
                client.clone().expect("built"),
                base,
                token.clone(),
                cfg.connect_timeout(),
                self.fetch.connections,
            );
            let h = SourceHandle::of_kind(
                SourceKind::Peer,
                format!("peer {}", mask_url(url)),
                Box::new(source),
            );
            crate::metrics::register_source(&h.name, h.kind);
            let h = Arc::new(h);
            map.insert(key, h.clone());
            out.push(h);
        }
        // Handles of peers no longer listed go; those in flight hold their own reference.
        map.retain(|_, h| out.iter().any(|o| Arc::ptr_eq(o, h)));
        Ok(out)
    }

    /// The HTTP client every `http(s)://` and `hf://` source shares.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// The handle for `url`, created on first use.
    pub fn get(&self, url: &SourceUrl) -> Arc<SourceHandle> {
        let mut map = self.by_url.lock().unwrap();
        map.entry(url.clone())
            .or_insert_with(|| Arc::new(self.build(url)))
            .clone()
    }

    /// Every source handle built so far, and those given by [`SourceRegistry::with_sources`]
    /// (for health).
    pub fn all(&self) -> Vec<Arc<SourceHandle>> {
        let mut all: Vec<_> = self.by_url.lock().unwrap().values().cloned().collect();
        all.extend(self.fixed.iter().flatten().cloned());
        all
    }

    fn build(&self, url: &SourceUrl) -> SourceHandle {
        // The name is what logs, metrics and health show: never a credential.
        let name = mask_url(&url.to_string());
        let source: Box<dyn Source> = match url {
            SourceUrl::Dir(dir) => Box::new(DirSource::new(dir.clone())),
            SourceUrl::Http(base) => Box::new(HttpSource::new(
                self.client.clone(),
                base.clone(),
                None,
                self.fetch.request_timeout(),
                self.fetch.connections,
            )),
            SourceUrl::Hf { repo, rev } => {
                let (endpoint, token) = hub();
                let base = format!("{endpoint}/{repo}/resolve/{rev}");
                Box::new(HttpSource::new(
                    self.client.clone(),
                    base,
                    token,
                    self.fetch.request_timeout(),
                    self.fetch.connections,
                ))
            }
            SourceUrl::S3 { bucket, prefix } => Box::new(s3::S3Source::new(bucket, prefix)),
            SourceUrl::Oci {
                registry,
                repo,
                reference,
            } => Box::new(oci::OciSource::new(
                self.client.clone(),
                &self.oci,
                registry,
                repo,
                reference,
            )),
        };
        crate::metrics::register_source(&name, SourceKind::Origin);
        SourceHandle::new(name, source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Unsupported(String);

    impl Source for Unsupported {
        fn fetch<'a>(
            &'a self,
            _: &'a str,
            _: Range<u64>,
        ) -> BoxFuture<'a, Result<Bytes, SourceError>> {
            Box::pin(async move { Err(SourceError::Unsupported(self.0.clone())) })
        }
    }

    #[test]
    fn the_request_rate_follows_the_source_without_jumping_on_one_outlier() {
        let h = SourceHandle::new("x".into(), Box::new(Unsupported(String::new())));
        assert_eq!(h.rate(), None);
        h.record_rate(1_000_000, 0.001, None);
        assert_eq!(h.rate(), Some(1e9));
        // A slow request halves the distance to it; a fast one closes an eighth of it.
        h.record_rate(1_000_000, 1.0, None);
        let r = h.rate().unwrap();
        assert!((r - (1e9 + 1e6) / 2.0).abs() < 1.0, "{r}");
        h.record_rate(2_000_000_000, 1.0, None);
        let up = h.rate().unwrap();
        assert!((up - (r + (2e9 - r) / 8.0)).abs() < 1.0, "{up}");
        // A source that stays slow is followed within a few requests.
        for _ in 0..8 {
            h.record_rate(1_000_000, 1.0, None);
        }
        assert!(h.rate().unwrap() < 1e7, "{:?}", h.rate());
        // A zero duration does not divide by zero.
        h.record_rate(1, 0.0, None);
        assert!(h.rate().unwrap().is_finite());
    }

    /// A request is alone when none was in flight at its start and none started before its
    /// end; only such requests move the solo rate.
    #[test]
    fn only_requests_that_ran_alone_measure_the_solo_rate() {
        let h = SourceHandle::new("x".into(), Box::new(Unsupported(String::new())));
        let fresh = Duration::from_secs(60);
        let a = h.request();
        assert!(a.alone());
        let b = h.request();
        assert!(!a.alone() && !b.alone(), "overlapping");
        h.record_rate(1_000_000, 0.1, b.alone().then_some(0.1));
        drop((a, b));
        assert_eq!(h.solo_rate(fresh), None);
        assert_eq!(h.rate(), Some(1e7));
        let c = h.request();
        assert!(c.alone(), "the others ended");
        h.record_rate(8_000_000, 0.02, c.alone().then_some(0.01));
        assert_eq!(h.solo_rate(fresh), Some(8e8));
        assert_eq!(h.solo_rate(Duration::ZERO), None, "too old");
        // One that started while another was in flight is not alone even once that ended.
        let d = h.request();
        drop(c);
        assert!(!d.alone());
    }

    #[test]
    fn cooldown_after_repeated_or_hard_failures() {
        let h = SourceHandle::new("x".into(), Box::new(Unsupported(String::new())));
        let cd = Duration::from_secs(60);
        h.record_failure(false, cd);
        h.record_failure(false, cd);
        assert!(h.cooling_until().is_none());
        h.record_failure(false, cd);
        assert!(h.cooling_until().is_some());
        h.record_success();
        assert!(h.cooling_until().is_none());
        h.record_failure(true, cd);
        assert!(h.cooling_until().is_some());
    }

    #[test]
    fn sources_given_to_the_registry_replace_every_models_own() {
        let model = |sources| crate::manifest::Model {
            id: "m@1.0.0".parse().unwrap(),
            description: String::new(),
            pinned: false,
            sources,
            files: Vec::new(),
        };
        let dir = SourceUrl::Dir("/nonexistent".into());
        let by_url = SourceRegistry::new(&FetchConfig::default()).unwrap();
        let own = by_url.for_model(&model(vec![dir.clone()]));
        assert_eq!(own.len(), 1);
        assert!(Arc::ptr_eq(&own[0], &by_url.get(&dir)));
        assert_eq!(by_url.for_model(&model(Vec::new())).len(), 0);

        let given = Arc::new(SourceHandle::new(
            "given".into(),
            Box::new(Unsupported(String::new())),
        ));
        let fixed = SourceRegistry::new(&FetchConfig::default())
            .unwrap()
            .with_sources(vec![given.clone()]);
        for m in [model(vec![dir]), model(Vec::new())] {
            let got = fixed.for_model(&m);
            assert_eq!(got.len(), 1);
            assert!(Arc::ptr_eq(&got[0], &given));
        }
        // Health sees them too.
        assert!(fixed.all().iter().any(|h| Arc::ptr_eq(h, &given)));
    }

    #[test]
    fn retryable_classes() {
        assert!(SourceError::Status(503).retryable());
        assert!(!SourceError::Status(404).retryable());
        assert!(!SourceError::NotFound.retryable());
        assert!(SourceError::Short { want: 2, got: 1 }.retryable());
    }
}
