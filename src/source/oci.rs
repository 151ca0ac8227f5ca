//! `oci://registry[:port]/repo@sha256:…` and `oci://…/repo:tag` sources: a model published as
//! an OCI artifact (CNCF ModelPack: one layer per file), read lazily by ranged blob GETs from
//! any registry (distribution, Zot, Harbor, the clouds').
//!
//! Owns what is OCI about it: the reference's manifest (resolved once per source, an index
//! narrowed to its one model artifact by `artifactType`), the layer each file path maps to
//! (`org.cncf.model.filepath`, else `org.opencontainers.image.title`), the registry's auth
//! (anonymous, HTTP Basic, the Bearer token flow with tokens renewed before their `expires_in`,
//! with credentials from docker-style `config.json` files) and plain HTTP only where docker allows it. Retries, failover and
//! verification stay the fetcher's, as for every source: a raw layer's digest is the file's
//! sha256, which the entry lists and the fetcher checks.
//!
//! An uncompressed `…tar` layer holds several files: its headers are read by range (a window
//! at a time, at first use of the layer) and each regular file in it is served by range from
//! its span of the blob, as a raw layer is. A compressed tar layer (tar+gzip, tar+zstd) cannot
//! be read by range: at first use it is fetched whole, checked and unpacked once into the
//! spool `oci_packed` owns, and its files are served from their spans of the unpacked tar
//! (docs/MANIFEST.md, DESIGN-NOTES "OCI registries").
//!
//! Secrets (passwords, identity tokens, bearer tokens) live in [`Secret`] and the
//! `Authorization` header only: no error, log line or `Debug` output carries one, and a redirect
//! to another host (a presigned URL) is followed without the header (reqwest drops it when the
//! host or port changes).

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderValue, RANGE, WWW_AUTHENTICATE};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::answer::{body_too_long, check_status, retry_after_header};
use super::oci_packed::{self, Codec, Unpacked};
use super::{Source, SourceError};
use crate::chunk::Filler;
use crate::config::OciConfig;

/// The manifest kinds asked for, OCI's and Docker's, as docker, podman and oras send them.
const MANIFEST_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";

/// The largest manifest read: one of a model with thousands of files is a few hundred KB.
const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// What a token or manifest request may take; blob reads have the fetcher's deadlines.
pub(crate) const META_TIMEOUT: Duration = Duration::from_secs(30);

/// How much of a tar layer one header read asks for: the headers of many small files at once,
/// and little waste when the next header is a large file away.
const TAR_WINDOW: u64 = 64 << 10;

/// The largest pax or GNU long-name record read: a path, never data.
const MAX_TAR_META: u64 = 1 << 20;

/// One file of the artifact: the layer that holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct Layer {
    pub path: String,
    pub media_type: String,
    /// `sha256:<hex>`: for a raw layer, the file's own sha256.
    pub digest: String,
    pub size: u64,
}

impl Layer {
    /// `None` for a raw layer (the file's bytes, read by range); else what it is packed as:
    /// `tar` (its files served by range) or a compressed tar (fetched whole and unpacked).
    pub fn packed(&self) -> Option<&'static str> {
        let mt = self.media_type.split(';').next().unwrap_or("").trim();
        if mt.ends_with("tar+gzip") || mt.ends_with("tar.gzip") {
            Some("tar+gzip")
        } else if mt.ends_with("tar+zstd") || mt.ends_with("tar.zstd") {
            Some("tar+zstd")
        } else if mt.ends_with(".tar") || mt.ends_with("+tar") {
            Some("tar")
        } else {
            None
        }
    }

    /// The layer's sha256 as hex, when it is one.
    pub fn sha256_hex(&self) -> Option<&str> {
        self.digest.strip_prefix("sha256:")
    }

    /// How a compressed tar layer is compressed; `None` for a raw or an uncompressed tar one.
    pub(crate) fn codec(&self) -> Option<Codec> {
        self.packed().and_then(Codec::of)
    }
}

/// Where one file's bytes are: a span of a layer's blob. A raw layer's file is the whole
/// blob; a tar layer's are the spans its headers give.
#[derive(Clone, Debug, PartialEq)]
pub struct Placed {
    pub path: String,
    pub layer: Layer,
    /// Where the file starts in the blob.
    pub offset: u64,
    pub size: u64,
}

impl Placed {
    /// The file's sha256 when the manifest already says it: a raw layer's digest. A file in
    /// a tar has none there; a build hashes its bytes.
    pub fn sha256_hex(&self) -> Option<&str> {
        match self.layer.packed() {
            None => self.layer.sha256_hex(),
            Some(_) => None,
        }
    }

    /// What it is packed in, for a build and status to say: `None` for a raw layer's file.
    pub fn packed_in(&self) -> Option<String> {
        self.layer
            .packed()
            .map(|k| format!("{k} layer {} ({:?})", self.layer.digest, self.layer.path))
    }

    /// Whether its layer is compressed: fetched whole and unpacked at first read.
    pub fn compressed(&self) -> bool {
        self.layer.codec().is_some()
    }
}

/// The artifact a reference names: its manifest's digest (what a built entry pins) and files.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub digest: String,
    pub layers: Vec<Layer>,
}

/// A credential from a `config.json`. Its `Debug` shows no secret.
#[derive(Clone)]
enum Secret {
    Basic { user: String, pass: String },
    Identity(String),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Secret::Basic { .. } => "Basic(***)",
            Secret::Identity(_) => "Identity(***)",
        })
    }
}

#[derive(Clone, Debug)]
struct Creds {
    secret: Secret,
    /// The file it came from: what an error names.
    from: PathBuf,
}

pub struct OciSource {
    client: reqwest::Client,
    /// `host[:port]` as written in the URL (what credentials and messages name).
    registry: String,
    repo: String,
    reference: String,
    /// `http(s)://host[:port]/v2/repo`.
    base: String,
    insecure: Vec<String>,
    auth_file: Option<PathBuf>,
    /// The most bytes a compressed layer may unpack to, and the spool may hold.
    unpack_max: u64,
    /// The credentials, read from the files at first use (`None`: anonymous).
    creds: tokio::sync::OnceCell<Result<Option<Creds>, String>>,
    /// The `Authorization` the registry last asked for (Basic, or a Bearer token and when to
    /// renew it).
    auth: Mutex<Option<Auth>>,
    /// Held while a token is renewed before its expiry, so concurrent reads ask once.
    renewing: tokio::sync::Mutex<()>,
    /// Resolved once per source; an error is not kept, so the next read asks again.
    resolved: tokio::sync::OnceCell<Resolved>,
    /// Every file with its span, tar layers' headers read: once per source, and only when a
    /// path is not a raw layer's (an error is not kept either).
    placed: tokio::sync::OnceCell<Vec<Placed>>,
    /// Each tar layer's files, by layer digest, as they are first needed: one layer that
    /// fails (a compressed one whose bytes are wrong) leaves the others' files served.
    tar_files: Mutex<HashMap<String, Vec<Placed>>>,
}

/// What is sent as `Authorization`, and for a Bearer token when it is renewed.
#[derive(Clone)]
struct Auth {
    /// Marked sensitive: hyper and reqwest show it as `Sensitive`.
    header: HeaderValue,
    /// `None` for Basic, which does not expire.
    renew_at: Option<std::time::Instant>,
    /// The `WWW-Authenticate` that got it: what a renewal answers again.
    challenge: String,
}

impl Auth {
    fn due(&self, now: std::time::Instant) -> bool {
        self.renew_at.is_some_and(|at| now >= at)
    }
}

/// A token's lifetime when the token server names none (the docker token spec's default).
const DEFAULT_TOKEN_LIFE: Duration = Duration::from_secs(60);

/// When a token asked for at `asked`, living `expires_in` seconds, is renewed: a fifth of its
/// life (at most 30 s) before it expires, so a read in flight never carries an expired one and
/// no 401 round trip is paid (the 401 path stays for a token revoked early).
fn renew_at(asked: std::time::Instant, expires_in: Option<u64>) -> std::time::Instant {
    let life = expires_in
        .filter(|s| *s > 0)
        .map_or(DEFAULT_TOKEN_LIFE, Duration::from_secs);
    asked + life - (life / 5).min(Duration::from_secs(30))
}

/// Whether `registry` (`host[:port]`) is on this machine: asked over plain HTTP, as docker does.
fn loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => registry.rsplit_once(':').map_or(registry, |(h, _)| h),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Where a registry's API is: Docker Hub's `docker.io` is served by `registry-1.docker.io`.
fn api_host(registry: &str) -> &str {
    match registry {
        "docker.io" | "index.docker.io" => "registry-1.docker.io",
        r => r,
    }
}

impl OciSource {
    pub fn new(
        client: reqwest::Client,
        cfg: &OciConfig,
        registry: &str,
        repo: &str,
        reference: &str,
    ) -> OciSource {
        let scheme =
            match loopback(registry) || cfg.insecure_registries.iter().any(|r| r == registry) {
                true => "http",
                false => "https",
            };
        OciSource {
            client,
            registry: registry.to_string(),
            repo: repo.to_string(),
            reference: reference.to_string(),
            base: format!("{scheme}://{}/v2/{repo}", api_host(registry)),
            insecure: cfg.insecure_registries.clone(),
            auth_file: cfg.auth_file.clone(),
            unpack_max: cfg.unpack_max_mib.saturating_mul(1 << 20),
            creds: tokio::sync::OnceCell::new(),
            auth: Mutex::new(None),
            renewing: tokio::sync::Mutex::new(()),
            resolved: tokio::sync::OnceCell::new(),
            placed: tokio::sync::OnceCell::new(),
            tar_files: Mutex::new(HashMap::new()),
        }
    }

    /// `http(s)://host[:port]/v2/repo`: where `oci_chunks` asks too.
    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    /// How this source asks, for an error to say (never the secret): anonymously, or with
    /// the credentials for the registry in a named file.
    pub async fn asked_as(&self) -> String {
        match self.credentials().await {
            Ok(None) => format!("registry {}, asked anonymously", self.registry),
            Ok(Some(c)) => format!(
                "registry {}, asked with its credentials from {}",
                self.registry,
                c.from.display()
            ),
            Err(e) => e,
        }
    }

    async fn credentials(&self) -> Result<Option<Creds>, String> {
        self.creds
            .get_or_init(|| async { credentials(&self.registry, self.auth_file.as_deref()) })
            .await
            .clone()
    }

    /// The artifact: its manifest's digest and its layers, asked of the registry once.
    pub async fn resolve(&self) -> Result<&Resolved, SourceError> {
        self.resolved.get_or_try_init(|| self.resolve_now()).await
    }

    async fn resolve_now(&self) -> Result<Resolved, SourceError> {
        let (digest, doc) = self.manifest(&self.reference).await?;
        if let Some(manifests) = doc.manifests {
            // An index: the one model artifact in it, by artifactType.
            let models: Vec<&Descriptor> = manifests
                .iter()
                .filter(|m| m.artifact_type.as_deref().is_some_and(model_type))
                .collect();
            let chosen: &Descriptor = match (models.as_slice(), manifests.as_slice()) {
                ([one], _) => one,
                ([], [one]) => one,
                _ => {
                    let choices: Vec<String> = manifests
                        .iter()
                        .map(|m| {
                            format!(
                                "{} ({})",
                                m.digest,
                                m.artifact_type.as_deref().unwrap_or("no artifactType")
                            )
                        })
                        .collect();
                    return Err(SourceError::Unsupported(format!(
                        "oci://{}/{}: index {digest} holds {} manifests and not one model \
                         artifact among them: {}; name one as oci://{}/{}@<digest>",
                        self.registry,
                        self.repo,
                        manifests.len(),
                        choices.join(", "),
                        self.registry,
                        self.repo
                    )));
                }
            };
            let (digest, doc) = self.manifest(&chosen.digest).await?;
            if doc.manifests.is_some() {
                return Err(SourceError::Unsupported(format!(
                    "oci://{}/{}: index entry {digest} is an index itself",
                    self.registry, self.repo
                )));
            }
            return self.files(digest, doc);
        }
        self.files(digest, doc)
    }

    /// The layers of a manifest as files; those that name no file are left out.
    fn files(&self, digest: String, doc: ManifestDoc) -> Result<Resolved, SourceError> {
        let mut layers: Vec<Layer> = Vec::new();
        for l in doc.layers.unwrap_or_default() {
            let path = l.annotations.as_ref().and_then(|a| {
                a.get("org.cncf.model.filepath")
                    .or_else(|| a.get("org.opencontainers.image.title"))
            });
            let Some(path) = path else { continue };
            if !is_sha256(&l.digest) {
                return Err(SourceError::Unsupported(format!(
                    "layer {} of {path:?} in {digest}: only sha256 digests are read",
                    l.digest
                )));
            }
            if layers.iter().any(|x| &x.path == path) {
                return Err(SourceError::Unsupported(format!(
                    "manifest {digest} names {path:?} in two layers"
                )));
            }
            layers.push(Layer {
                path: path.clone(),
                media_type: l.media_type.unwrap_or_default(),
                digest: l.digest,
                size: l.size,
            });
        }
        layers.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(Resolved { digest, layers })
    }

    /// The manifest `reference` names, and its digest (the sha256 of the bytes read, which a
    /// digest reference must equal: a registry is believed no more than a byte is).
    async fn manifest(&self, reference: &str) -> Result<(String, ManifestDoc), SourceError> {
        let url = format!("{}/manifests/{reference}", self.base);
        let resp = self
            .send(|c| {
                c.get(&url)
                    .header(ACCEPT, MANIFEST_TYPES)
                    .timeout(META_TIMEOUT)
            })
            .await?;
        match resp.status().as_u16() {
            200 => {}
            404 => return Err(SourceError::NotFound),
            401 | 403 => return Err(SourceError::Denied(resp.status().as_u16())),
            429 | 503 if let Some(after) = retry_after_header(resp.headers()) => {
                return Err(SourceError::RetryAfter {
                    status: resp.status().as_u16(),
                    after,
                });
            }
            s => return Err(SourceError::Status(s)),
        }
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(piece) = stream.next().await {
            body.extend_from_slice(&piece.map_err(super::http::transport)?);
            if body.len() > MAX_MANIFEST_BYTES {
                return Err(SourceError::Unsupported(format!(
                    "manifest {reference} is larger than {MAX_MANIFEST_BYTES} bytes"
                )));
            }
        }
        let digest = format!("sha256:{}", hex(&Sha256::digest(&body)));
        if reference.starts_with("sha256:") && reference != digest {
            return Err(SourceError::Unsupported(format!(
                "registry {} answered manifest {reference} with bytes whose digest is {digest}",
                self.registry
            )));
        }
        let doc: ManifestDoc = serde_json::from_slice(&body).map_err(|e| {
            SourceError::Unsupported(format!("manifest {digest} is not an OCI manifest: {e}"))
        })?;
        Ok((digest, doc))
    }

    /// Sends a request with the registry's current `Authorization`, renewing a Bearer token
    /// that is about to expire first; on a 401, does what its `WWW-Authenticate` asks (Basic,
    /// or a new Bearer token) and sends it once more: the first request of a source, and a
    /// token revoked or expired early in the middle of a read.
    pub(crate) async fn send(
        &self,
        make: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, SourceError> {
        let mut answered = false;
        loop {
            let mut req = make(&self.client);
            if let Some(h) = self.current_auth().await? {
                req = req.header(AUTHORIZATION, h);
            }
            let resp = req.send().await.map_err(super::http::transport)?;
            if resp.status().as_u16() != 401 || answered {
                return Ok(resp);
            }
            answered = true;
            let challenge = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            match self.authorize(&challenge).await? {
                Some(a) => *self.auth.lock().unwrap() = Some(a),
                None => return Ok(resp),
            }
        }
    }

    /// The `Authorization` to send now: a token past its renewal time is renewed first (once,
    /// whichever read gets here first), from the challenge that got it. A renewal that fails
    /// is the read's error: the fetcher retries, or the next source serves.
    async fn current_auth(&self) -> Result<Option<HeaderValue>, SourceError> {
        let now = std::time::Instant::now();
        let due = |a: &Option<Auth>| a.as_ref().is_some_and(|a| a.due(now));
        let auth = self.auth.lock().unwrap().clone();
        if !due(&auth) {
            return Ok(auth.map(|a| a.header));
        }
        let _one = self.renewing.lock().await;
        let auth = self.auth.lock().unwrap().clone();
        let Some(stale) = auth.filter(|a| a.due(now)) else {
            return Ok(self.auth.lock().unwrap().clone().map(|a| a.header));
        };
        let fresh = self.authorize(&stale.challenge).await?;
        *self.auth.lock().unwrap() = fresh.clone();
        Ok(fresh.map(|a| a.header))
    }

    /// The `Authorization` that answers `challenge`, or `None` when there is nothing to try
    /// (anonymous, and the registry wants a password).
    async fn authorize(&self, challenge: &str) -> Result<Option<Auth>, SourceError> {
        let creds = self.credentials().await.map_err(SourceError::Unsupported)?;
        let (scheme, params) = parse_challenge(challenge);
        if scheme.eq_ignore_ascii_case("basic") {
            return Ok(match creds.map(|c| c.secret) {
                Some(Secret::Basic { user, pass }) => Some(Auth {
                    header: basic(&user, &pass),
                    renew_at: None,
                    challenge: challenge.to_string(),
                }),
                _ => None,
            });
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Ok(None);
        }
        let realm = params.get("realm").cloned().unwrap_or_default();
        let Some(realm_url) = super::http_url(&realm) else {
            return Err(SourceError::Unsupported(format!(
                "registry {} asks for a token from realm {:?}, which is no http(s) URL",
                self.registry,
                super::mask_url(&realm)
            )));
        };
        let realm_host = realm_url.authority().to_string();
        if realm_url.scheme() == "http"
            && !loopback(&realm_host)
            && !self
                .insecure
                .iter()
                .any(|r| *r == realm_host || *r == self.registry)
        {
            return Err(SourceError::Unsupported(format!(
                "registry {} asks for a token over plain http from {realm_host}: only loopback \
                 or [oci] insecure_registries may be",
                self.registry
            )));
        }
        let scope = params
            .get("scope")
            .cloned()
            .unwrap_or_else(|| format!("repository:{}:pull", self.repo));
        let service = params.get("service").cloned().unwrap_or_default();
        let req = match creds.map(|c| c.secret) {
            Some(Secret::Identity(refresh)) => self.client.post(realm_url).form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh.as_str()),
                ("service", service.as_str()),
                ("scope", scope.as_str()),
                ("client_id", "wanfs"),
            ]),
            Some(Secret::Basic { user, pass }) => self
                .client
                .get(realm_url)
                .query(&[("service", &service), ("scope", &scope)])
                .header(AUTHORIZATION, basic(&user, &pass)),
            None => self
                .client
                .get(realm_url)
                .query(&[("service", &service), ("scope", &scope)]),
        };
        let asked = std::time::Instant::now();
        let resp = req
            .timeout(META_TIMEOUT)
            .send()
            .await
            .map_err(super::http::transport)?;
        let status = resp.status().as_u16();
        if status == 401 || status == 403 {
            return Err(SourceError::Denied(status));
        }
        if status != 200 {
            return Err(SourceError::Status(status));
        }
        #[derive(Deserialize)]
        struct TokenAnswer {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let answer: TokenAnswer = resp.json().await.map_err(|e| {
            SourceError::Transport(format!(
                "token server {realm_host} answered no token: {}",
                super::error_chain(&e.without_url())
            ))
        })?;
        let token = answer.token.or(answer.access_token).unwrap_or_default();
        match HeaderValue::from_str(&format!("Bearer {token}")) {
            Ok(mut h) if !token.is_empty() => {
                h.set_sensitive(true);
                Ok(Some(Auth {
                    header: h,
                    renew_at: Some(renew_at(asked, answer.expires_in)),
                    challenge: challenge.to_string(),
                }))
            }
            _ => Err(SourceError::Transport(format!(
                "token server {realm_host} answered an empty or malformed token"
            ))),
        }
    }

    /// Every file of the artifact with where its bytes are: raw layers as they are, each
    /// uncompressed tar layer's regular files from its headers (read by range), each
    /// compressed one's from the headers of its unpacked tar (fetched whole, once).
    pub async fn placed_files(&self) -> Result<&[Placed], SourceError> {
        let placed = self
            .placed
            .get_or_try_init(|| async {
                let resolved = self.resolve().await?;
                let mut out = Vec::new();
                for layer in &resolved.layers {
                    if layer.packed().is_some() {
                        out.extend(self.tar_files(layer).await?);
                    } else {
                        out.push(Placed {
                            path: layer.path.clone(),
                            layer: layer.clone(),
                            offset: 0,
                            size: layer.size,
                        });
                    }
                }
                out.sort_by(|a, b| a.path.cmp(&b.path));
                if let Some(w) = out.windows(2).find(|w| w[0].path == w[1].path) {
                    return Err(SourceError::Unsupported(format!(
                        "manifest {} names {:?} twice: in layer {} and in layer {}",
                        resolved.digest, w[0].path, w[0].layer.digest, w[1].layer.digest
                    )));
                }
                Ok(out)
            })
            .await?;
        Ok(placed)
    }

    /// Where `path`'s bytes are. A raw layer's file is found from the manifest alone; only a
    /// path that is none reads the tar layers' headers (and unpacks the compressed ones).
    async fn place(&self, path: &str) -> Result<Placed, SourceError> {
        let resolved = self.resolve().await?;
        let raw = resolved
            .layers
            .iter()
            .find(|l| l.path == path && l.packed().is_none());
        let placed = match raw {
            Some(layer) => Placed {
                path: path.to_string(),
                layer: layer.clone(),
                offset: 0,
                size: layer.size,
            },
            None => {
                // Uncompressed tars first: their headers cost a few ranged GETs, a compressed
                // layer a whole fetch. A layer that fails is the answer only if no other
                // layer holds the path.
                let mut tars: Vec<&Layer> = resolved
                    .layers
                    .iter()
                    .filter(|l| l.packed().is_some())
                    .collect();
                tars.sort_by_key(|l| l.codec().is_some());
                let mut failed = None;
                for layer in tars {
                    match self.tar_files(layer).await {
                        Ok(files) => {
                            if let Some(p) = files.into_iter().find(|p| p.path == path) {
                                return Ok(p);
                            }
                        }
                        Err(e) => {
                            failed.get_or_insert(e);
                        }
                    }
                }
                return Err(failed.unwrap_or(SourceError::NotFound));
            }
        };
        Ok(placed)
    }

    /// A tar layer's files with their spans: its headers read by range, or (compressed) from
    /// its unpacked tar. Kept once found; an error is not.
    async fn tar_files(&self, layer: &Layer) -> Result<Vec<Placed>, SourceError> {
        if let Some(files) = self.tar_files.lock().unwrap().get(&layer.digest) {
            return Ok(files.clone());
        }
        let files = match layer.codec() {
            Some(_) => {
                let unpacked = self.unpacked(layer).await?;
                self.scan_tar(layer, Some(&unpacked)).await?
            }
            None => self.scan_tar(layer, None).await?,
        };
        self.tar_files
            .lock()
            .unwrap()
            .insert(layer.digest.clone(), files.clone());
        Ok(files)
    }

    /// A compressed layer unpacked: from the spool, or fetched whole now (once, however many
    /// reads ask: they wait on the same download, which a reader's deadline does not cancel).
    async fn unpacked(&self, layer: &Layer) -> Result<std::sync::Arc<Unpacked>, SourceError> {
        let spool = oci_packed::spool();
        if let Some(p) = spool.pending(&layer.digest) {
            return p.await;
        }
        let codec = layer.codec().expect("a compressed layer");
        let url = format!("{}/blobs/{}", self.base, layer.digest);
        // No deadline on the whole body (reqwest's `timeout` would cut a large layer off):
        // the answer's head within META_TIMEOUT, then the body may not stall (`oci_packed`).
        let resp = tokio::time::timeout(META_TIMEOUT, self.send(|c| c.get(&url)))
            .await
            .map_err(|_| SourceError::Timeout)??;
        match resp.status().as_u16() {
            200 => {}
            404 => return Err(SourceError::NotFound),
            401 | 403 => return Err(SourceError::Denied(resp.status().as_u16())),
            429 | 503 if let Some(after) = retry_after_header(resp.headers()) => {
                return Err(SourceError::RetryAfter {
                    status: resp.status().as_u16(),
                    after,
                });
            }
            s => return Err(SourceError::Status(s)),
        }
        let what = format!(
            "{} layer {} ({:?}) of registry {}",
            layer.packed().unwrap_or(""),
            layer.digest,
            layer.path,
            self.registry
        );
        spool
            .start(
                &layer.digest,
                layer.size,
                codec,
                self.unpack_max,
                what,
                resp,
            )
            .await
    }

    /// `range` of a tar: the blob's, by range, or the unpacked one's.
    async fn read_tar(
        &self,
        layer: &Layer,
        unpacked: Option<&std::sync::Arc<Unpacked>>,
        range: Range<u64>,
    ) -> Result<Vec<u8>, SourceError> {
        match unpacked {
            Some(u) => u.read(range).await,
            None => self.read_blob(layer, range).await,
        }
    }

    /// `range` of a layer's blob, whole in memory: a tar layer's headers, never a file's data.
    async fn read_blob(&self, layer: &Layer, range: Range<u64>) -> Result<Vec<u8>, SourceError> {
        let url = format!("{}/blobs/{}", self.base, layer.digest);
        let value = format!("bytes={}-{}", range.start, range.end - 1);
        let resp = self
            .send(|c| c.get(&url).header(RANGE, &value).timeout(META_TIMEOUT))
            .await?;
        let status = resp.status().as_u16();
        if status == 200 && !(range.start == 0 && range.end == layer.size) {
            return Err(SourceError::Unsupported(format!(
                "registry {} answered a ranged GET of tar layer {} with 200 and the whole \
                 blob: it does not serve ranges",
                self.registry, layer.digest
            )));
        }
        check_status(
            status,
            &range,
            resp.content_length(),
            retry_after_header(resp.headers()),
        )?;
        let want = range.end - range.start;
        let mut buf = vec![0u8; want as usize];
        super::http::fill_body(resp, want, &mut Filler::plain(&mut buf)).await?;
        Ok(buf)
    }

    /// The regular files of a tar layer and their spans, from its headers read by range,
    /// [`TAR_WINDOW`] at a time: of the blob, or of the unpacked tar of a compressed layer
    /// (spans then of that). A link, or a header that does not check, is refused naming the
    /// layer: a file left out or put at the wrong offset would be served wrong.
    async fn scan_tar(
        &self,
        layer: &Layer,
        unpacked: Option<&std::sync::Arc<Unpacked>>,
    ) -> Result<Vec<Placed>, SourceError> {
        let size = unpacked.map_or(layer.size, |u| u.size);
        let bad = |why: String| {
            SourceError::Unsupported(format!(
                "tar layer {} ({:?}): {why}",
                layer.digest, layer.path
            ))
        };
        let mut window: (u64, Vec<u8>) = (0, Vec::new());
        let mut tar = TarWalk::default();
        let mut at = 0u64;
        let mut out = Vec::new();
        while at + 512 <= size {
            let need = match tar.wants() {
                TarWants::Header => 512,
                TarWants::Meta(len) => len,
            };
            let end = at
                .checked_add(need)
                .filter(|e| *e <= size)
                .ok_or_else(|| bad(format!("an entry at offset {at} runs past the layer's end")))?;
            let covered = window.0 <= at && end <= window.0 + window.1.len() as u64;
            if !covered {
                let to = end.max(at + TAR_WINDOW).min(size);
                window = (at, self.read_tar(layer, unpacked, at..to).await?);
            }
            let lo = (at - window.0) as usize;
            let bytes = &window.1[lo..lo + need as usize];
            match tar.step(at, bytes).map_err(bad)? {
                TarStep::Next(next) => at = next,
                TarStep::File {
                    path,
                    offset,
                    size,
                    next,
                } => {
                    out.push(Placed {
                        path,
                        layer: layer.clone(),
                        offset,
                        size,
                    });
                    at = next;
                }
                TarStep::End => break,
            }
        }
        Ok(out)
    }
}

/// What the tar walk needs next: a 512-byte header, or the record a pax or GNU long-name
/// header announced.
enum TarWants {
    Header,
    Meta(u64),
}

enum TarStep {
    /// Go on at this offset.
    Next(u64),
    /// A regular file: its path, its data's offset and size, and where the next header is.
    File {
        path: String,
        offset: u64,
        size: u64,
        next: u64,
    },
    /// Two zero blocks: the archive's end.
    End,
}

/// The tar headers seen so far that bear on the next entry: a pax `path`/`size`, a GNU long
/// name, a record waiting to be read.
#[derive(Default)]
struct TarWalk {
    path: Option<String>,
    size: Option<u64>,
    /// A pax (`x`, `g`) or GNU long-name (`L`, `K`) record of this size is next.
    meta: Option<(u8, u64)>,
}

impl TarWalk {
    fn wants(&self) -> TarWants {
        match self.meta {
            Some((_, len)) => TarWants::Meta(len),
            None => TarWants::Header,
        }
    }

    /// Reads what [`TarWalk::wants`] asked for, found at `at`.
    fn step(&mut self, at: u64, bytes: &[u8]) -> Result<TarStep, String> {
        if let Some((kind, len)) = self.meta.take() {
            match kind {
                b'x' => {
                    for (k, v) in pax_records(bytes)? {
                        match k.as_str() {
                            "path" => self.path = Some(v),
                            "size" => {
                                self.size = Some(v.parse().map_err(|_| {
                                    format!("pax size {v:?} at offset {at} is not a number")
                                })?)
                            }
                            _ => {}
                        }
                    }
                }
                b'L' => {
                    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
                    self.path = Some(
                        String::from_utf8(bytes[..end].to_vec())
                            .map_err(|_| format!("long name at offset {at} is not UTF-8"))?,
                    );
                }
                // A global pax record or a long link name: nothing a file's span needs.
                _ => {}
            }
            return Ok(TarStep::Next(at + pad512(len)));
        }
        let h = bytes;
        if h.iter().all(|b| *b == 0) {
            return Ok(TarStep::End);
        }
        let stored = octal(&h[148..156])
            .ok_or_else(|| format!("header at offset {at}: bad checksum field"))?;
        let sum: u64 = h
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    *b as u64
                }
            })
            .sum();
        if sum != stored {
            return Err(format!("header at offset {at} does not check (not a tar?)"));
        }
        let kind = h[156];
        let size = match self.size.take() {
            Some(s) => s,
            None => number(&h[124..136])
                .ok_or_else(|| format!("header at offset {at}: bad size field"))?,
        };
        let data = at + 512;
        let next = data
            .checked_add(pad512(size))
            .ok_or_else(|| format!("header at offset {at}: size {size} overflows"))?;
        match kind {
            b'x' | b'g' | b'L' | b'K' => {
                if size > MAX_TAR_META {
                    return Err(format!(
                        "a {} byte {:?} record at offset {at}",
                        size, kind as char
                    ));
                }
                self.meta = Some((kind, size));
                Ok(TarStep::Next(data))
            }
            b'0' | 0 | b'7' => {
                let name = match self.path.take() {
                    Some(p) => p,
                    None => ustar_name(h).map_err(|e| format!("header at offset {at}: {e}"))?,
                };
                let path = name.trim_start_matches("./").to_string();
                if path.is_empty() || path.ends_with('/') {
                    return Err(format!("a file at offset {at} has no name"));
                }
                Ok(TarStep::File {
                    path,
                    offset: data,
                    size,
                    next,
                })
            }
            b'1' | b'2' => {
                let name = self.path.take().map_or_else(|| ustar_name(h), Ok)?;
                Err(format!(
                    "{name:?} is a link, which is not served: pack the file itself"
                ))
            }
            // Directories, devices, fifos: no bytes to serve.
            _ => {
                self.path = None;
                Ok(TarStep::Next(next))
            }
        }
    }
}

fn pad512(n: u64) -> u64 {
    n.div_ceil(512).saturating_mul(512)
}

/// A header's octal field (NUL or space ended).
fn octal(f: &[u8]) -> Option<u64> {
    let t = std::str::from_utf8(f).ok()?;
    let t = t.trim_matches(|c: char| c == '\0' || c == ' ');
    if t.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(t, 8).ok()
}

/// A size field: octal, or GNU's base-256 (high bit set) for sizes past 8 GiB.
fn number(f: &[u8]) -> Option<u64> {
    if f[0] & 0x80 != 0 {
        let mut v: u64 = (f[0] & 0x7f) as u64;
        for b in &f[1..] {
            v = v.checked_mul(256)?.checked_add(*b as u64)?;
        }
        return Some(v);
    }
    octal(f)
}

/// A ustar header's name: `prefix/name` where there is a prefix.
fn ustar_name(h: &[u8]) -> Result<String, String> {
    let field = |f: &[u8]| {
        let end = f.iter().position(|b| *b == 0).unwrap_or(f.len());
        String::from_utf8(f[..end].to_vec()).map_err(|_| "a name that is not UTF-8".to_string())
    };
    let name = field(&h[0..100])?;
    let prefix = if &h[257..262] == b"ustar" {
        field(&h[345..500])?
    } else {
        String::new()
    };
    Ok(match prefix.is_empty() {
        true => name,
        false => format!("{prefix}/{name}"),
    })
}

/// A pax record list: `LEN key=value\n`…
fn pax_records(mut b: &[u8]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    while !b.is_empty() && b[0] != 0 {
        let sp = b
            .iter()
            .position(|c| *c == b' ')
            .ok_or("a pax record without a length")?;
        let len: usize = std::str::from_utf8(&b[..sp])
            .ok()
            .and_then(|t| t.parse().ok())
            .filter(|l| *l > sp + 1 && *l <= b.len())
            .ok_or("a pax record with a bad length")?;
        let rec = &b[sp + 1..len - 1];
        let eq = rec
            .iter()
            .position(|c| *c == b'=')
            .ok_or("a pax record without =")?;
        let text =
            |x: &[u8]| String::from_utf8(x.to_vec()).map_err(|_| "a pax record that is not UTF-8");
        out.push((text(&rec[..eq])?, text(&rec[eq + 1..])?));
        b = &b[len..];
    }
    Ok(out)
}

impl Source for OciSource {
    fn fetch<'a>(
        &'a self,
        path: &'a str,
        range: Range<u64>,
    ) -> BoxFuture<'a, Result<Bytes, SourceError>> {
        super::fetch_filled(self, path, range)
    }

    fn streams(&self) -> bool {
        true
    }

    fn packed(&self, path: &str) -> Option<String> {
        let tars = self.tar_files.lock().unwrap();
        let p = tars.values().flatten().find(|p| p.path == path)?;
        let kind = p.layer.packed().filter(|_| p.compressed())?;
        let spooled = match oci_packed::spool().holds(&p.layer.digest) {
            true => "unpacked in the spool now",
            false => "not in the spool now",
        };
        Some(format!(
            "{kind} layer {}, fetched whole at first read ({spooled})",
            p.layer.digest
        ))
    }

    fn fetch_filling<'a>(
        &'a self,
        path: &'a str,
        range: Range<u64>,
        into: &'a mut Filler<'_>,
    ) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            let want = range.end - range.start;
            if want == 0 {
                return Ok(());
            }
            let Placed {
                layer,
                offset: at,
                size,
                ..
            } = self.place(path).await?;
            if range.end > size {
                // Past the file's end, as a server says it: a tar layer's next bytes are
                // another file's, never this one's.
                return Err(SourceError::Status(416));
            }
            if layer.codec().is_some() {
                // A span of the unpacked tar, checked by the fetcher as any source's bytes.
                let unpacked = self.unpacked(&layer).await?;
                let bytes = unpacked.read(range.start + at..range.end + at).await?;
                if !into.fill(&bytes) {
                    return Err(body_too_long(want));
                }
                return Ok(());
            }
            // A file in a tar layer is a span of its blob.
            let blob = range.start + at..range.end + at;
            let url = format!("{}/blobs/{}", self.base, layer.digest);
            let value = format!("bytes={}-{}", blob.start, blob.end - 1);
            let resp = self.send(|c| c.get(&url).header(RANGE, &value)).await?;
            let status = resp.status().as_u16();
            let whole = blob.start == 0 && blob.end == layer.size;
            if status == 200 && !whole {
                // Never the wrong range: the next source is asked instead.
                return Err(SourceError::Unsupported(format!(
                    "registry {} answered a ranged GET of layer {} ({path:?}) with 200 and the \
                     whole blob: it does not serve ranges",
                    self.registry, layer.digest
                )));
            }
            check_status(
                status,
                &range,
                resp.content_length(),
                retry_after_header(resp.headers()),
            )?;
            super::http::fill_body(resp, want, into).await
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestDoc {
    /// An index's entries.
    manifests: Option<Vec<Descriptor>>,
    /// A manifest's layers.
    layers: Option<Vec<LayerDesc>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    digest: String,
    artifact_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayerDesc {
    media_type: Option<String>,
    digest: String,
    size: u64,
    annotations: Option<HashMap<String, String>>,
}

/// Whether an index entry's `artifactType` is a model: ModelPack's, Docker model runner's,
/// KitOps'.
fn model_type(t: &str) -> bool {
    [
        "application/vnd.cncf.model.",
        "application/vnd.docker.ai.",
        "application/vnd.kitops.",
    ]
    .iter()
    .any(|p| t.starts_with(p))
}

fn is_sha256(d: &str) -> bool {
    d.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn basic(user: &str, pass: &str) -> HeaderValue {
    let enc = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    let mut h = HeaderValue::from_str(&format!("Basic {enc}")).expect("base64 is a header value");
    h.set_sensitive(true);
    h
}

/// `Bearer realm="…",service="…",scope="…"`: the scheme and its parameters (values may be
/// quoted and hold commas, as a scope of several actions does).
fn parse_challenge(text: &str) -> (String, HashMap<String, String>) {
    let text = text.trim();
    let (scheme, rest) = text.split_once(' ').unwrap_or((text, ""));
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = chars.by_ref().take_while(|c| *c != ',').collect();
        }
        params.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    (scheme.to_string(), params)
}

/// The files credentials are read from, first match wins: `[oci] auth_file`,
/// `$REGISTRY_AUTH_FILE` (podman's), `$DOCKER_CONFIG/config.json` (default
/// `~/.docker/config.json`).
fn auth_files(configured: Option<&Path>) -> Vec<(PathBuf, bool)> {
    let mut out = Vec::new();
    if let Some(p) = configured {
        out.push((p.to_path_buf(), true));
    }
    if let Some(p) = std::env::var_os("REGISTRY_AUTH_FILE").filter(|p| !p.is_empty()) {
        out.push((PathBuf::from(p), true));
    }
    match std::env::var_os("DOCKER_CONFIG").filter(|p| !p.is_empty()) {
        Some(dir) => out.push((PathBuf::from(dir).join("config.json"), false)),
        None => {
            if let Some(home) = std::env::var_os("HOME") {
                out.push((PathBuf::from(home).join(".docker/config.json"), false));
            }
        }
    }
    out
}

/// `https://index.docker.io/v1/`, `http://reg:5000`, `reg:5000/`: the `host[:port]` an
/// `auths` key names, as docker matches them.
fn auth_key_host(key: &str) -> &str {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let k = k.split('/').next().unwrap_or(k);
    match k {
        "index.docker.io" | "registry-1.docker.io" => "docker.io",
        k => k,
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct AuthFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default)]
    cred_helpers: HashMap<String, String>,
    creds_store: Option<String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    auth: Option<String>,
    identitytoken: Option<String>,
}

/// The credentials for `registry`, from the first file that names it; `None`: anonymous.
/// A credential helper is refused, naming it: wanfs runs no helper programs.
fn credentials(registry: &str, configured: Option<&Path>) -> Result<Option<Creds>, String> {
    let want = auth_key_host(registry);
    for (file, required) in auth_files(configured) {
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => continue,
            Err(e) => {
                return Err(format!(
                    "reading registry credentials {}: {e}",
                    file.display()
                ));
            }
        };
        let parsed: AuthFile = serde_json::from_str(&text).map_err(|e| {
            // serde_json's message names a line and column, never the value read.
            format!("{} is not a docker config.json: {e}", file.display())
        })?;
        if let Some(helper) = parsed
            .cred_helpers
            .iter()
            .find(|(k, _)| auth_key_host(k) == want)
            .map(|(_, h)| h)
        {
            return Err(format!(
                "{} names credential helper docker-credential-{helper} for registry {registry}: \
                 wanfs runs no credential helpers; give it an \"auths\" entry in a file of its \
                 own ([oci] auth_file)",
                file.display()
            ));
        }
        let Some(entry) = parsed
            .auths
            .iter()
            .find(|(k, _)| auth_key_host(k) == want)
            .map(|(_, e)| e)
        else {
            continue;
        };
        let secret = if let Some(t) = entry.identitytoken.as_ref().filter(|t| !t.is_empty()) {
            Secret::Identity(t.clone())
        } else if let Some(a) = entry.auth.as_ref().filter(|a| !a.is_empty()) {
            let bad = || {
                format!(
                    "{}: the \"auth\" of registry {registry} is not base64 of user:password",
                    file.display()
                )
            };
            let raw = base64::engine::general_purpose::STANDARD
                .decode(a.trim())
                .map_err(|_| bad())?;
            let text = String::from_utf8(raw).map_err(|_| bad())?;
            let (user, pass) = text.split_once(':').ok_or_else(bad)?;
            Secret::Basic {
                user: user.to_string(),
                pass: pass.to_string(),
            }
        } else if let Some(store) = &parsed.creds_store {
            return Err(format!(
                "{} keeps registry {registry}'s credentials in credential store \
                 docker-credential-{store}: wanfs runs no credential helpers; give it an \
                 \"auths\" entry in a file of its own ([oci] auth_file)",
                file.display()
            ));
        } else {
            continue;
        };
        return Ok(Some(Creds { secret, from: file }));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bearer_challenge_is_read_with_quoted_commas() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(s, "Bearer");
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "reg");
        assert_eq!(p["scope"], "repository:a/b:pull,push");
        let (s, p) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!(s, "Basic");
        assert_eq!(p["realm"], "Registry Realm");
    }

    #[test]
    fn a_token_is_renewed_a_fifth_of_its_life_before_it_expires() {
        let t = std::time::Instant::now();
        assert_eq!(renew_at(t, Some(10)), t + Duration::from_secs(8));
        // At most 30 s early, and the docker spec's 60 s when the server names no lifetime.
        assert_eq!(renew_at(t, Some(3600)), t + Duration::from_secs(3570));
        assert_eq!(renew_at(t, None), t + Duration::from_secs(48));
        assert_eq!(renew_at(t, Some(0)), t + Duration::from_secs(48));
        let a = Auth {
            header: HeaderValue::from_static("Bearer x"),
            renew_at: Some(t + Duration::from_secs(1)),
            challenge: String::new(),
        };
        assert!(!a.due(t) && a.due(t + Duration::from_secs(1)));
        let basic = Auth {
            renew_at: None,
            ..a
        };
        assert!(!basic.due(t + Duration::from_secs(1 << 30)));
    }

    #[test]
    fn plain_http_only_for_loopback_or_listed_registries() {
        assert!(loopback("127.0.0.1:5000"));
        assert!(loopback("localhost"));
        assert!(loopback("[::1]:5000"));
        assert!(!loopback("registry.example:5000"));
        let c = reqwest::Client::new();
        let s = OciSource::new(c.clone(), &OciConfig::default(), "reg.example", "m", "v1");
        assert!(s.base.starts_with("https://reg.example/v2/m"));
        let cfg = OciConfig {
            insecure_registries: vec!["reg.example".into()],
            ..Default::default()
        };
        let s = OciSource::new(c, &cfg, "reg.example", "m", "v1");
        assert!(s.base.starts_with("http://reg.example/v2/m"));
    }

    /// The media types Docker model runner (docker/model-runner, model-distribution) and
    /// KitOps (kitops-ml/kitops `pkg/lib/constants/mediatype`) write, as they write them.
    #[test]
    fn docker_model_runner_and_kitops_layers_are_recognised() {
        let l = |mt: &str| Layer {
            path: "x".into(),
            media_type: mt.into(),
            digest: "sha256:00".into(),
            size: 1,
        };
        // Docker model runner: one file per layer, raw; a config archive is an uncompressed tar.
        for raw in [
            "application/vnd.docker.ai.gguf.v3",
            "application/vnd.docker.ai.safetensors",
            "application/vnd.docker.ai.license",
            "application/vnd.docker.ai.mmproj",
            "application/vnd.docker.ai.dduf",
            "application/vnd.docker.ai.chat.template.jinja",
            "application/vnd.docker.ai.model.file.v1+gguf",
        ] {
            assert_eq!((raw, l(raw).packed()), (raw, None));
        }
        assert_eq!(
            l("application/vnd.docker.ai.vllm.config.tar").packed(),
            Some("tar")
        );
        // KitOps ModelKits: every layer a tar, gzip-compressed by default.
        for part in ["model", "modelpart", "dataset", "code", "docs"] {
            let tar = format!("application/vnd.kitops.modelkit.{part}.v1.tar");
            assert_eq!(l(&tar).packed(), Some("tar"), "{tar}");
            assert_eq!(l(&tar).codec(), None, "{tar}");
            let gz = format!("{tar}+gzip");
            assert_eq!(l(&gz).codec(), Some(Codec::Gzip), "{gz}");
        }
        // Index entries of all three are models.
        for t in [
            "application/vnd.cncf.model.manifest.v1+json",
            "application/vnd.docker.ai.model.config.v0.2+json",
            "application/vnd.kitops.modelkit.manifest.v1+json",
        ] {
            assert!(model_type(t), "{t}");
        }
        assert!(!model_type("application/vnd.oci.image.config.v1+json"));
    }

    #[test]
    fn layers_are_raw_or_named_packed() {
        let l = |mt: &str| Layer {
            path: "w.bin".into(),
            media_type: mt.into(),
            digest: "sha256:00".into(),
            size: 1,
        };
        assert_eq!(l("application/vnd.cncf.model.weight.v1.raw").packed(), None);
        assert_eq!(l("application/vnd.docker.ai.gguf.v3").packed(), None);
        assert_eq!(
            l("application/vnd.cncf.model.weight.v1.tar").packed(),
            Some("tar")
        );
        assert_eq!(
            l("application/vnd.cncf.model.weight.v1.tar+gzip").packed(),
            Some("tar+gzip")
        );
        assert_eq!(
            l("application/vnd.oci.image.layer.v1.tar+zstd").packed(),
            Some("tar+zstd")
        );
        // Every tar is served: an uncompressed one by range, a compressed one unpacked.
        assert_eq!(l("application/vnd.cncf.model.weight.v1.tar").codec(), None);
        assert_eq!(l("application/vnd.cncf.model.weight.v1.raw").codec(), None);
        assert_eq!(
            l("application/vnd.cncf.model.weight.v1.tar+gzip").codec(),
            Some(Codec::Gzip)
        );
        assert_eq!(
            l("application/vnd.cncf.model.weight.v1.tar+zstd").codec(),
            Some(Codec::Zstd)
        );
    }

    /// Walks `tar` as [`OciSource::scan_tar`] does, from memory: each file's path and span.
    fn walk(tar: &[u8]) -> Result<Vec<(String, u64, u64)>, String> {
        let mut w = TarWalk::default();
        let (mut at, mut out) = (0u64, Vec::new());
        while at + 512 <= tar.len() as u64 {
            let need = match w.wants() {
                TarWants::Header => 512,
                TarWants::Meta(n) => n,
            };
            match w.step(at, &tar[at as usize..(at + need) as usize])? {
                TarStep::Next(n) => at = n,
                TarStep::File {
                    path,
                    offset,
                    size,
                    next,
                } => {
                    out.push((path, offset, size));
                    at = next;
                }
                TarStep::End => break,
            }
        }
        Ok(out)
    }

    /// A ustar header block for `name` of `size` bytes of type `kind`.
    fn header(name: &str, size: u64, kind: u8) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..108].copy_from_slice(b"0000644\0");
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        let sum: u64 = h.iter().map(|b| *b as u64).sum::<u64>() + 8 * 32;
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        h
    }

    fn entry(tar: &mut Vec<u8>, name: &str, kind: u8, data: &[u8]) {
        tar.extend(header(name, data.len() as u64, kind));
        tar.extend(data);
        tar.resize(tar.len().div_ceil(512) * 512, 0);
    }

    #[test]
    fn a_tar_is_walked_to_each_files_span_through_pax_and_long_names() {
        let long = format!("tokenizer/{}.json", "n".repeat(120));
        let mut tar = Vec::new();
        entry(&mut tar, "./tokenizer/", b'5', b"");
        entry(&mut tar, "./tokenizer/vocab.json", b'0', b"{\"a\": 1}");
        let rec = format!("path={long}\n");
        let len = rec.len() + 4; // "NNN " with a 3-digit length
        entry(
            &mut tar,
            "PaxHeaders/x",
            b'x',
            format!("{len} {rec}").as_bytes(),
        );
        entry(&mut tar, "short", b'0', &[7u8; 700]);
        entry(&mut tar, "././@LongLink", b'L', b"gnu/long/name.bin\0");
        entry(&mut tar, "gnu/long/na", b'0', b"xyz");
        entry(&mut tar, "empty", b'0', b"");
        tar.extend([0u8; 1024]);
        let files = walk(&tar).unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "tokenizer/vocab.json",
                long.as_str(),
                "gnu/long/name.bin",
                "empty"
            ]
        );
        for (path, offset, size) in &files {
            let bytes = &tar[*offset as usize..(offset + size) as usize];
            match path.as_str() {
                "tokenizer/vocab.json" => assert_eq!(bytes, b"{\"a\": 1}"),
                "gnu/long/name.bin" => assert_eq!(bytes, b"xyz"),
                "empty" => assert!(bytes.is_empty()),
                _ => assert_eq!(bytes, &[7u8; 700][..]),
            }
        }
    }

    #[test]
    fn a_tar_size_is_octal_or_base_256_past_8_gib() {
        assert_eq!(number(b"00000001750\0"), Some(1000));
        assert_eq!(number(b"           \0"), Some(0));
        let mut f = [0u8; 12];
        f[0] = 0x80;
        f[7] = 0x02; // 2 << 32: 8 GiB, past what 11 octal digits hold
        assert_eq!(number(&f), Some(8 << 30));
        assert_eq!(number(b"0000000z750\0"), None);
    }

    #[test]
    fn a_tar_link_or_a_header_that_does_not_check_is_refused() {
        let mut tar = Vec::new();
        entry(&mut tar, "model.bin", b'0', b"abc");
        entry(&mut tar, "alias.bin", b'2', b"");
        let e = walk(&tar).unwrap_err();
        assert!(e.contains("alias.bin") && e.contains("link"), "{e}");
        let mut tar = Vec::new();
        entry(&mut tar, "model.bin", b'0', b"abc");
        tar[0] = b'M';
        let e = walk(&tar).unwrap_err();
        assert!(e.contains("does not check"), "{e}");
    }

    #[test]
    fn credentials_come_from_auths_and_a_helper_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("wan-oci-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret:x");
        std::fs::write(
            &f,
            format!(
                r#"{{"auths":{{"https://reg.example:5000/v1/":{{"auth":"{auth}"}},
                "tok.example":{{"identitytoken":"idt"}}}},
                "credHelpers":{{"ecr.example":"ecr-login"}}}}"#
            ),
        )
        .unwrap();
        let c = credentials("reg.example:5000", Some(&f)).unwrap().unwrap();
        match &c.secret {
            Secret::Basic { user, pass } => {
                assert_eq!((user.as_str(), pass.as_str()), ("alice", "s3cret:x"))
            }
            other => panic!("{other:?}"),
        }
        assert!(!format!("{c:?}").contains("s3cret"));
        assert!(matches!(
            credentials("tok.example", Some(&f))
                .unwrap()
                .unwrap()
                .secret,
            Secret::Identity(_)
        ));
        let e = credentials("ecr.example", Some(&f)).unwrap_err();
        assert!(
            e.contains("docker-credential-ecr-login") && e.contains("ecr.example"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
