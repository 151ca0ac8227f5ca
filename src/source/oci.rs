//! `oci://registry[:port]/repo@sha256:…` and `oci://…/repo:tag` sources: a model published as
//! an OCI artifact (CNCF ModelPack: one layer per file), read lazily by ranged blob GETs from
//! any registry (distribution, Zot, Harbor, the clouds').
//!
//! Owns what is OCI about it: the reference's manifest (resolved once per source, an index
//! narrowed to its one model artifact by `artifactType`), the layer each file path maps to
//! (`org.cncf.model.filepath`, else `org.opencontainers.image.title`), the registry's auth
//! (anonymous, HTTP Basic, the Bearer token flow, with credentials from docker-style
//! `config.json` files) and plain HTTP only where docker allows it. Retries, failover and
//! verification stay the fetcher's, as for every source: a raw layer's digest is the file's
//! sha256, which the entry lists and the fetcher checks.
//!
//! Packed layers (tar, tar+gzip, tar+zstd) are refused, naming the layer and its media type:
//! they are not served yet (docs/MANIFEST.md).
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
    /// `None` for a raw layer (the file's bytes, read by range); else what it is packed as,
    /// which is not served yet.
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

    /// Why a packed layer is not served, naming it.
    pub fn refusal(&self, kind: &str) -> String {
        format!(
            "layer {} ({}) of {:?} is {kind}, which is not served yet: only raw layers are \
             (publish the file as a raw layer, e.g. application/vnd.cncf.model.weight.v1.raw)",
            self.digest, self.media_type, self.path
        )
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
    /// The credentials, read from the files at first use (`None`: anonymous).
    creds: tokio::sync::OnceCell<Result<Option<Creds>, String>>,
    /// The `Authorization` value the registry last asked for (Basic, or a Bearer token).
    auth: Mutex<Option<HeaderValue>>,
    /// Resolved once per source; an error is not kept, so the next read asks again.
    resolved: tokio::sync::OnceCell<Resolved>,
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
            creds: tokio::sync::OnceCell::new(),
            auth: Mutex::new(None),
            resolved: tokio::sync::OnceCell::new(),
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

    /// Sends a request with the registry's current `Authorization`; on a 401, does what its
    /// `WWW-Authenticate` asks (Basic, or a new Bearer token) and sends it once more: the
    /// first request of a source, and a token that expired in the middle of a read.
    pub(crate) async fn send(
        &self,
        make: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, SourceError> {
        let mut answered = false;
        loop {
            let mut req = make(&self.client);
            let auth = self.auth.lock().unwrap().clone();
            if let Some(h) = auth {
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
                Some(h) => *self.auth.lock().unwrap() = Some(h),
                None => return Ok(resp),
            }
        }
    }

    /// The `Authorization` that answers `challenge`, or `None` when there is nothing to try
    /// (anonymous, and the registry wants a password).
    async fn authorize(&self, challenge: &str) -> Result<Option<HeaderValue>, SourceError> {
        let creds = self.credentials().await.map_err(SourceError::Unsupported)?;
        let (scheme, params) = parse_challenge(challenge);
        if scheme.eq_ignore_ascii_case("basic") {
            return Ok(match creds.map(|c| c.secret) {
                Some(Secret::Basic { user, pass }) => Some(basic(&user, &pass)),
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
                Ok(Some(h))
            }
            _ => Err(SourceError::Transport(format!(
                "token server {realm_host} answered an empty or malformed token"
            ))),
        }
    }

    /// The layer that holds `path`, served only if raw.
    async fn layer(&self, path: &str) -> Result<Layer, SourceError> {
        let resolved = self.resolve().await?;
        let layer = resolved
            .layers
            .iter()
            .find(|l| l.path == path)
            .ok_or(SourceError::NotFound)?;
        if let Some(kind) = layer.packed() {
            return Err(SourceError::Unsupported(layer.refusal(kind)));
        }
        Ok(layer.clone())
    }
}

impl Source for OciSource {
    fn fetch<'a>(
        &'a self,
        path: &'a str,
        range: Range<u64>,
    ) -> BoxFuture<'a, Result<Bytes, SourceError>> {
        Box::pin(async move {
            let mut buf = vec![0u8; (range.end - range.start) as usize];
            self.fetch_filling(path, range, &mut Filler::plain(&mut buf))
                .await?;
            Ok(Bytes::from(buf))
        })
    }

    fn fetch_into<'a>(
        &'a self,
        path: &'a str,
        range: Range<u64>,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            self.fetch_filling(path, range, &mut Filler::plain(buf))
                .await
        })
    }

    fn streams(&self) -> bool {
        true
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
            let layer = self.layer(path).await?;
            let url = format!("{}/blobs/{}", self.base, layer.digest);
            let value = format!("bytes={}-{}", range.start, range.end - 1);
            let resp = self.send(|c| c.get(&url).header(RANGE, &value)).await?;
            let status = resp.status().as_u16();
            let whole = range.start == 0 && range.end == layer.size;
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
            let mut body = resp.bytes_stream();
            while let Some(piece) = body.next().await {
                let piece = piece.map_err(super::http::transport)?;
                if !into.fill(&piece) {
                    return Err(body_too_long(want));
                }
            }
            if (into.filled() as u64) < want {
                return Err(SourceError::Short {
                    want,
                    got: into.filled() as u64,
                });
            }
            Ok(())
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
            auth_file: None,
        };
        let s = OciSource::new(c, &cfg, "reg.example", "m", "v1");
        assert!(s.base.starts_with("http://reg.example/v2/m"));
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
        let why = l("application/vnd.cncf.model.weight.v1.tar+gzip").refusal("tar+gzip");
        assert!(why.contains("w.bin") && why.contains("tar+gzip") && why.contains("not served"));
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
