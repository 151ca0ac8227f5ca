//! Manifest entries built from where models live, with no local copy:
//! `wan manifest build hf://org/repo@rev` (the Hub's tree API), `s3://bucket/prefix`
//! (ListObjectsV2) and `oci://registry/repo:tag` (the artifact's manifest: each raw layer's
//! digest is its file's sha256; the entry pins the manifest's digest, never the tag).
//!
//! The Hub lists each LFS file's sha256 (`lfs.oid`) and size, so a whole-file entry needs no
//! download: only small files stored in git (configs) are fetched and hashed. S3 lists sizes
//! only, so every object is fetched and hashed. With `--chunked`, every file is fetched once
//! to compute its chunk digests (lazy reads then work), and a listed sha256 must match what
//! the bytes hash to. Bytes are read through the same `Source` the daemon would use, so
//! HF_ENDPOINT, HF_TOKEN and the AWS_* variables mean the same here as in `wan mount`.
//!
//! A listing is a description from the network, believed no more than a byte is: every
//! request has a timeout and a bounded number of retries (429 and 5xx, honouring a bounded
//! `Retry-After`); pages are bounded in number and size, never asked twice (a cycle) and never
//! asked of a server other than HF_ENDPOINT's (HF_TOKEN goes with them); every listed name and
//! size passes the manifest's rules before any file is fetched; and a fetched file must be
//! exactly the size listed.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures::{StreamExt, TryStreamExt};
use reqwest::header::{AUTHORIZATION, LINK};
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::chunk::{ChunkCheck, ChunkHash, Digest, Layout};
use crate::config::{Config, FetchConfig};
use crate::manifest::{BuildOptions, BuiltFile, SourceUrl, check_listing, render_entry};
use crate::source::oci::OciSource;
use crate::source::oci_chunks::{self, ChunkDoc, Pushed};
use crate::source::{Source, SourceError, SourceRegistry};

/// A file as a listing gives it.
#[derive(Debug, PartialEq)]
struct Listed {
    path: String,
    size: u64,
    /// The Hub's `lfs.oid`; unknown for git-stored files and for S3 objects.
    sha256: Option<Digest>,
}

/// Whether `arg` names a remote model rather than a local directory.
pub fn is_remote(arg: &str) -> bool {
    arg.starts_with("hf://") || arg.starts_with("s3://") || arg.starts_with("oci://")
}

/// Builds the entry for the model at `url`. `opts.whole_only` is the default for remote
/// builds; `--chunked` clears it. `url` is the entry's first source, then `opts.sources`.
///
/// `chunk_lists` is false only under an explicit `--whole-only`. Otherwise every file the
/// build downloads anyway (all of an `s3://` prefix, the Hub's git-stored files: no listed
/// sha256) gets its chunk list, which costs no byte more and makes its reads lazy; and for
/// `oci://`, chunk lists published with `wan manifest publish-chunks` are used when they fit:
/// then no layer is read ([`adopt`]).
pub fn build(url: &str, opts: &BuildOptions, chunk_lists: bool) -> anyhow::Result<String> {
    let published = chunk_lists;
    let mut opts_sources = vec![url.to_string()];
    opts_sources.extend(opts.sources.iter().cloned());
    let mut opts = BuildOptions {
        sources: opts_sources,
        ..opts.clone()
    };
    let base = Path::new(".");
    opts.check(base)?;
    let parsed = SourceUrl::parse(url, base).map_err(|e| anyhow!("{url}: {e}"))?;
    // `[fetch]` as `wan mount` reads it from WAN_FETCH_* (there is no config file here): the
    // timeouts of every request below.
    let cfg = Config::default()
        .with_env(std::env::vars())
        .context("reading the WAN_* variables")?;
    let fetch = cfg.fetch;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (files, pinned, signed) = rt.block_on(async {
        // One client for the listing and the bytes: the daemon's sources, as `wan mount` builds them.
        let registry = SourceRegistry::new(&fetch)?.with_oci(cfg.oci.clone());
        let (listed, pinned) = match &parsed {
            SourceUrl::Hf { repo, rev } => {
                (list_hf(registry.client(), repo, rev, &fetch).await?, None)
            }
            SourceUrl::S3 { bucket, prefix } => (list_s3(bucket, prefix, url).await?, None),
            SourceUrl::Oci {
                registry: host,
                repo,
                reference,
            } => {
                let (listed, digest) =
                    list_oci(registry.client(), &cfg.oci, host, repo, reference, url).await?;
                let pinned = SourceUrl::Oci {
                    registry: host.clone(),
                    repo: repo.clone(),
                    reference: digest,
                };
                (listed, Some(pinned))
            }
            _ => bail!("{url}: only hf://, s3:// and oci:// models can be built remotely"),
        };
        if listed.is_empty() {
            bail!("{url} lists no files");
        }
        // Before any file is asked for: a listing naming `../x` gets no request for it (nor
        // the token with one), and one that could never mount fails here, not after hours.
        check_listing(
            &opts.id,
            url,
            listed.iter().map(|f| (f.path.as_str(), f.size)),
        )?;
        // The bytes of the artifact listed, not of whatever the tag names by now.
        let handle = registry.get(pinned.as_ref().unwrap_or(&parsed));
        if published
            && let Some(SourceUrl::Oci {
                registry: host,
                repo,
                reference,
            }) = &pinned
        {
            let oci = OciSource::new(registry.client().clone(), &cfg.oci, host, repo, reference);
            if let Some(files) = published_chunks(&oci, reference, &listed, &opts, url).await? {
                let signed = blake3_statement(&*handle.source, &listed, &fetch, url).await?;
                return Ok((files, pinned, signed));
            }
        }
        // A build that cuts every file into chunks (`--chunked`, or by default where every
        // file is downloaded anyway) is held to a BLAKE3 signature as published lists are:
        // lists that could never bind fail the build, not the mount.
        let every_file_chunked =
            !opts.whole_only || (chunk_lists && listed.iter().all(|f| f.sha256.is_none()));
        let signed = match every_file_chunked {
            false => None,
            true => blake3_statement(&*handle.source, &listed, &fetch, url).await?,
        };
        let files = hash_all(&*handle.source, url, listed, &opts, chunk_lists, &fetch).await?;
        Ok((files, pinned, signed))
    })?;
    if let Some(pinned) = pinned {
        opts.sources[0] = pinned.to_string();
    }
    let text = render_entry(&opts.id, &opts.sources, files, base)?;
    if let Some(st) = signed {
        bound(&text, &opts.id, &st).map_err(|e| {
            anyhow!("{url}: the chunk lists do not bind to the model's signature: {e}")
        })?;
    }
    Ok(text)
}

/// `wan manifest publish-chunks oci://…`: every raw layer read once and cut into chunks as
/// `opts` say (each checked against its layer's sha256), and the lists pushed as a referrer
/// of the artifact's manifest ([`oci_chunks`]). A BLAKE3-signed model's lists must bind to
/// its signature before they are pushed. Returns what was pushed, for the operator.
pub fn publish_chunks(url: &str, opts: &BuildOptions) -> anyhow::Result<String> {
    let base = Path::new(".");
    let opts = BuildOptions {
        id: PUBLISH_ID.to_string(),
        sources: vec![url.to_string()],
        whole_only: false,
        ..opts.clone()
    };
    opts.check(base)?;
    let SourceUrl::Oci {
        registry: host,
        repo,
        reference,
    } = SourceUrl::parse(url, base).map_err(|e| anyhow!("{url}: {e}"))?
    else {
        bail!("{url}: chunk lists are published to oci:// artifacts only");
    };
    let cfg = Config::default()
        .with_env(std::env::vars())
        .context("reading the WAN_* variables")?;
    let fetch = cfg.fetch;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let registry = SourceRegistry::new(&fetch)?.with_oci(cfg.oci.clone());
        let (listed, digest) =
            list_oci(registry.client(), &cfg.oci, &host, &repo, &reference, url).await?;
        if listed.is_empty() {
            bail!("{url} lists no files");
        }
        check_listing(
            &opts.id,
            url,
            listed.iter().map(|f| (f.path.as_str(), f.size)),
        )?;
        let oci = OciSource::new(registry.client().clone(), &cfg.oci, &host, &repo, &digest);
        let signed = blake3_statement(&oci, &listed, &fetch, url).await?;
        let files = hash_all(&oci, url, listed, &opts, true, &fetch).await?;
        let doc = ChunkDoc {
            manifest: digest.clone(),
            files,
        };
        let body = serde_json::to_vec(&doc).context("serializing the chunk lists")?;
        if let Some(st) = &signed {
            let text = render_entry(&opts.id, &opts.sources, doc.files, base)?;
            bound(&text, &opts.id, st).map_err(|e| {
                anyhow!("{url}: these chunk lists do not bind to the model's signature, so no host could use them: {e}")
            })?;
        }
        let subject = oci_chunks::subject(&oci, &digest)
            .await
            .map_err(|e| anyhow!("{url}: reading manifest {digest}: {e}"))?;
        let pushed = match oci_chunks::push(&oci, &subject, body.into()).await {
            Ok(p) => p,
            Err(e) => bail!(
                "{url}: pushing the chunk lists: {e} ({})",
                oci.asked_as().await
            ),
        };
        let pinned = format!("oci://{host}/{repo}@{digest}");
        Ok(match pushed {
            Pushed::Referrers { digest: r } => {
                format!("published the chunk lists of {pinned} as referrer {r}")
            }
            Pushed::Tag { digest: r, tag } => format!(
                "published the chunk lists of {pinned} as referrer {r}, listed under tag {tag} \
                 (the registry has no referrers API)"
            ),
        })
    })
}

/// The model id a publish checks its lists under (no entry is printed).
const PUBLISH_ID: &str = "published@0.0.0";

/// One file of a published chunk document: its entry as `manifest build --chunked` writes it.
#[derive(Deserialize, Debug)]
struct PublishedFile {
    path: String,
    size: u64,
    sha256: String,
    chunk_size: u64,
    head_size: Option<u64>,
    chunk_hash: Option<String>,
    chunks: Vec<String>,
}

/// The chunk lists published for manifest `digest`, as entry files, when there are some that
/// fit; `None`: hash as usual. A document that is there but contradicts the manifest is an
/// error, not a silent fallback: a registry or publisher is wrong, and an operator must know.
async fn published_chunks(
    oci: &OciSource,
    digest: &str,
    listed: &[Listed],
    opts: &BuildOptions,
    url: &str,
) -> anyhow::Result<Option<Vec<BuiltFile>>> {
    let found = match oci_chunks::find(oci, digest).await {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{url}: no published chunk lists read ({e}); building without them");
            return Ok(None);
        }
    };
    let Some((doc, referrer)) = found else {
        return Ok(None);
    };
    let doc: ChunkDoc<PublishedFile> = serde_json::from_slice(&doc)
        .map_err(|e| anyhow!("{url}: chunk lists {referrer} are not a chunk document: {e}"))?;
    match adopt(doc, listed, digest, opts) {
        Ok(Some(files)) => {
            eprintln!("{url}: using the chunk lists published as {referrer}; no layer is read");
            Ok(Some(files))
        }
        Ok(None) => {
            eprintln!(
                "{url}: the chunk lists published as {referrer} are cut otherwise than \
                 --chunk-size/--chunk-hash ask; hashing the layers"
            );
            Ok(None)
        }
        Err(e) => bail!("{url}: chunk lists {referrer}: {e}"),
    }
}

/// A published document as entry files: it must describe manifest `digest`, list exactly
/// the listed files with their sizes and sha256 (the layers' digests), and chunk each file
/// as its layout says. `Ok(None)`: sound, but a `--chunked` build asked for another chunk
/// size or hash.
fn adopt(
    doc: ChunkDoc<PublishedFile>,
    listed: &[Listed],
    digest: &str,
    opts: &BuildOptions,
) -> Result<Option<Vec<BuiltFile>>, String> {
    if doc.manifest != digest {
        return Err(format!(
            "they describe manifest {}, not {digest}",
            doc.manifest
        ));
    }
    if doc.files.len() != listed.len() {
        return Err(format!(
            "they list {} files, the manifest {}",
            doc.files.len(),
            listed.len()
        ));
    }
    let mut out = Vec::with_capacity(listed.len());
    let mut fits = true;
    for l in listed {
        let Some(p) = doc.files.iter().find(|p| p.path == l.path) else {
            return Err(format!("they do not list {:?}", l.path));
        };
        let sha256: Digest = p
            .sha256
            .parse()
            .map_err(|_| format!("{:?}: sha256 {:?} is not a digest", p.path, p.sha256))?;
        if p.size != l.size || Some(sha256) != l.sha256 {
            return Err(format!(
                "{:?}: they give {} bytes, sha256 {sha256}; the manifest {} bytes, layer {}",
                p.path,
                p.size,
                l.size,
                l.sha256.map(|d| d.to_hex()).unwrap_or_default()
            ));
        }
        let hash: ChunkHash = p.chunk_hash.as_deref().unwrap_or("sha256").parse()?;
        if p.chunk_size == 0 || p.chunk_size > crate::manifest::MAX_CHUNK_SIZE {
            return Err(format!("{:?}: chunk_size {}", p.path, p.chunk_size));
        }
        let head = p.head_size.unwrap_or(p.chunk_size);
        if head == 0 || head > p.chunk_size {
            return Err(format!("{:?}: head_size {head}", p.path));
        }
        let count = Layout::of(hash.layout_kind(), p.size, p.chunk_size, head).count();
        if count != p.chunks.len() as u64 {
            return Err(format!(
                "{:?}: {} chunk digests where its layout has {count} chunks",
                p.path,
                p.chunks.len()
            ));
        }
        let chunks = p
            .chunks
            .iter()
            .map(|c| c.parse::<Digest>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| format!("{:?}: a chunk digest is not 32 bytes of hex", p.path))?;
        fits &= opts.whole_only || (p.chunk_size == opts.chunk_size && hash == opts.chunk_hash);
        out.push(BuiltFile::new(
            l.path.clone(),
            l.size,
            sha256,
            Some((p.chunk_size, head, hash, chunks)),
        ));
    }
    Ok(fits.then_some(out))
}

/// The statement in the artifact's `model.sig` when it signs with BLAKE3 (the only hash a
/// chunk list binds to); `None` when there is no signature or it signs with sha256. Not
/// verified here (a build has no `[trust]`): the daemon verifies it at mount, and binds
/// the same lists again; this check only keeps lists that could never bind out of entries
/// and registries.
async fn blake3_statement(
    source: &dyn Source,
    listed: &[Listed],
    fetch: &FetchConfig,
    url: &str,
) -> anyhow::Result<Option<crate::trust::Statement>> {
    use crate::trust::bind::SIGNATURE_FILE;
    let Some(sig) = listed.iter().find(|f| f.path == SIGNATURE_FILE) else {
        return Ok(None);
    };
    let fetcher = Fetcher { source, url, fetch };
    let bytes = fetcher.piece(sig, 0..sig.size).await?;
    let bundle = crate::trust::bundle::Bundle::parse(&bytes)
        .map_err(|e| anyhow!("{url}: {SIGNATURE_FILE}: {e}"))?;
    let st = crate::trust::Statement::parse(&bundle.envelope.payload)
        .map_err(|e| anyhow!("{url}: {SIGNATURE_FILE}: {e}"))?;
    Ok((st.hash_type == crate::trust::SignedHash::Blake3).then_some(st))
}

/// Whether the entry `text` (model `id`) binds to `st`: every signed file's chunk list
/// merges into its signed BLAKE3 digest ([`crate::trust::bind`]).
fn bound(text: &str, id: &str, st: &crate::trust::Statement) -> anyhow::Result<()> {
    let m = crate::manifest::Manifest::parse(
        &format!("schema_version = 1\n{text}"),
        "build output",
        Path::new("."),
    )?;
    let model = m
        .models
        .values()
        .find(|m| m.id.as_str() == id)
        .ok_or_else(|| anyhow!("no model {id} in the entry"))?;
    let files: Vec<&crate::manifest::FileEntry> = model.files.iter().collect();
    crate::trust::bind::bind(&files, st).map_err(|r| anyhow!("{r}"))?;
    Ok(())
}

#[derive(Deserialize)]
struct TreeEntry {
    #[serde(rename = "type")]
    kind: String,
    path: String,
    #[serde(default)]
    size: u64,
    lfs: Option<Lfs>,
}

#[derive(Deserialize)]
struct Lfs {
    oid: String,
    size: u64,
}

/// Pages one listing may have. The Hub pages a recursive tree at most 1,000 entries at a
/// time; 10,000 pages (ten million files) is far past any model repository, and ends, in
/// bounded time and memory, a listing whose server never stops linking to new pages.
const MAX_PAGES: usize = 10_000;

/// The largest page body read: a Hub page of 1,000 entries is about 300 KB.
const MAX_PAGE_BYTES: usize = 16 << 20;

/// Attempts of one listing request: a Hub that throttles (429) or fails (5xx) for a moment
/// must not end a build, nor be asked forever.
const LIST_ATTEMPTS: u32 = 5;

/// The longest `Retry-After` a build waits; asked to wait longer, it fails, saying so.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// The wait before attempt `attempt` (1 = the first retry) when the server names none:
/// 0.5 s, doubling, at most 8 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(500u64 << attempt.saturating_sub(1).min(4))
}

/// `GET /api/models/{repo}/tree/{rev}?recursive=true`, following the `Link: <…>; rel="next"`
/// pages the Hub sends for large repositories.
async fn list_hf(
    client: &reqwest::Client,
    repo: &str,
    rev: &str,
    fetch: &FetchConfig,
) -> anyhow::Result<Vec<Listed>> {
    let what = format!("hf://{repo}@{rev}");
    let (endpoint, token) = crate::source::hub_checked()?;
    let mut first = endpoint.clone();
    first
        .path_segments_mut()
        .map_err(|()| anyhow!("HF_ENDPOINT {endpoint} cannot have a path"))?
        .pop_if_empty()
        .extend(["api", "models"])
        .extend(repo.split('/'))
        .extend(["tree", rev]);
    first.set_query(Some("recursive=true"));
    let mut pages = Pages::new(endpoint);
    let mut next = Some(first);
    let mut out = Vec::new();
    while let Some(url) = next.take() {
        let page = get_page(client, &url, token.as_deref(), fetch, &what).await?;
        if let Some(link) = &page.next {
            next = Some(
                pages
                    .next(&url, link)
                    .map_err(|e| anyhow!("listing {what}: {e}"))?,
            );
        }
        for e in page.entries.into_iter().filter(|e| e.kind == "file") {
            let listed = match e.lfs {
                Some(lfs) => Listed {
                    sha256: Some(lfs.oid.parse().map_err(|_| {
                        anyhow!(
                            "listing {what}: {}: lfs.oid {:?} is not a sha256",
                            e.path,
                            lfs.oid
                        )
                    })?),
                    size: lfs.size,
                    path: e.path,
                },
                None => Listed {
                    path: e.path,
                    size: e.size,
                    sha256: None,
                },
            };
            out.push(listed);
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// The pages a listing has asked for. A next page must be new (a page linking to itself, or
/// two linking to each other, once ran 685 pages in 30 s and never ended), one of at most
/// [`MAX_PAGES`], and on HF_ENDPOINT's origin (scheme, host, port): HF_TOKEN goes with every
/// page, and a listing is not taken from, nor the token given to, a server it names.
struct Pages {
    endpoint: Url,
    seen: HashSet<String>,
}

impl Pages {
    fn new(endpoint: Url) -> Pages {
        Pages {
            endpoint,
            seen: HashSet::new(),
        }
    }

    /// The page `link` (a `Link` target, relative to the page `from`) names, if it may be
    /// asked for.
    fn next(&mut self, from: &Url, link: &str) -> Result<Url, String> {
        self.seen.insert(from.to_string());
        let next = from
            .join(link)
            .map_err(|e| format!("page {} links to {link:?}: {e}", shown(from)))?;
        if next.origin() != self.endpoint.origin() {
            return Err(format!(
                "page {} links to a next page on another server, {}; a listing is followed only \
                 on HF_ENDPOINT's ({}), where HF_TOKEN may go",
                shown(from),
                next.origin().ascii_serialization(),
                self.endpoint.origin().ascii_serialization()
            ));
        }
        if self.seen.contains(next.as_str()) {
            return Err(format!(
                "page {} links back to {}, already listed: the server's pages form a cycle",
                shown(from),
                shown(&next)
            ));
        }
        if self.seen.len() >= MAX_PAGES {
            return Err(format!(
                "more than {MAX_PAGES} pages (each of up to 1,000 files): not a model repository"
            ));
        }
        Ok(next)
    }
}

/// A listing URL as errors show it: without userinfo (HF_ENDPOINT may carry a password), with
/// its query, whose cursor says which page (no credential travels in it).
fn shown(url: &Url) -> String {
    let mut url = url.clone();
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.to_string()
}

/// One page of a tree listing, and the `rel="next"` target its `Link` header names.
struct Page {
    entries: Vec<TreeEntry>,
    next: Option<String>,
}

/// Why a page could not be had: for good, or for now (with the wait the server asked for).
enum PageError {
    Fatal(String),
    Again(String, Option<Duration>),
}

/// One page, retried while the server throttles or fails for a moment; errors name the URL
/// and the cause.
async fn get_page(
    client: &reqwest::Client,
    url: &Url,
    token: Option<&str>,
    fetch: &FetchConfig,
    what: &str,
) -> anyhow::Result<Page> {
    let shown = shown(url);
    for attempt in 1.. {
        let (why, asked) = match try_page(client, url, token, fetch).await {
            Ok(page) => return Ok(page),
            Err(PageError::Fatal(why)) => bail!("listing {what}: GET {shown}: {why}"),
            Err(PageError::Again(why, asked)) => (why, asked),
        };
        if attempt >= LIST_ATTEMPTS {
            bail!("listing {what}: GET {shown}: {why} (tried {attempt} times)");
        }
        let wait = match asked {
            Some(w) if w > MAX_RETRY_AFTER => bail!(
                "listing {what}: GET {shown}: {why}, and asked to retry after {} s, longer than \
                 the {} s a build waits",
                w.as_secs(),
                MAX_RETRY_AFTER.as_secs()
            ),
            Some(w) => w,
            None => backoff(attempt),
        };
        eprintln!(
            "listing {what}: GET {shown}: {why}; retrying in {:.1} s",
            wait.as_secs_f64()
        );
        tokio::time::sleep(wait).await;
    }
    unreachable!("the loop returns")
}

async fn try_page(
    client: &reqwest::Client,
    url: &Url,
    token: Option<&str>,
    fetch: &FetchConfig,
) -> Result<Page, PageError> {
    // The client connects within fetch.request_timeout; the whole answer, body included,
    // must come within read_timeout: a server that stalls cannot hang a build.
    let mut req = client.get(url.clone()).timeout(fetch.read_timeout());
    if let Some(t) = token {
        req = req.header(AUTHORIZATION, format!("Bearer {t}"));
    }
    let mut resp = req.send().await.map_err(|e| request_error(e, fetch))?;
    let status = resp.status();
    match status {
        StatusCode::OK => {}
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            return Err(PageError::Fatal(format!(
                "access denied (HTTP {}): set HF_TOKEN to a token that can read it",
                status.as_u16()
            )));
        }
        StatusCode::NOT_FOUND => {
            return Err(PageError::Fatal(
                "no such repository or revision (HTTP 404)".into(),
            ));
        }
        s if s == StatusCode::TOO_MANY_REQUESTS
            || s == StatusCode::REQUEST_TIMEOUT
            || s.is_server_error() =>
        {
            let asked = crate::source::answer::retry_after_header(resp.headers());
            return Err(PageError::Again(format!("HTTP {}", s.as_u16()), asked));
        }
        s => return Err(PageError::Fatal(format!("HTTP {}", s.as_u16()))),
    }
    let next = resp
        .headers()
        .get_all(LINK)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(next_link);
    let mut body = Vec::new();
    while let Some(piece) = resp.chunk().await.map_err(|e| request_error(e, fetch))? {
        if body.len() + piece.len() > MAX_PAGE_BYTES {
            return Err(PageError::Fatal(format!(
                "a page larger than {} MiB: not a tree listing",
                MAX_PAGE_BYTES >> 20
            )));
        }
        body.extend_from_slice(&piece);
    }
    let entries = serde_json::from_slice(&body)
        .map_err(|e| PageError::Fatal(format!("not a tree listing: {e}")))?;
    Ok(Page { entries, next })
}

/// What went wrong with a request, cause included ("error sending request" alone says
/// nothing): a stall or a reset may pass; a host that refuses connections or has no address
/// will not within a build.
fn request_error(e: reqwest::Error, fetch: &FetchConfig) -> PageError {
    let e = e.without_url();
    if e.is_timeout() && e.is_connect() {
        return PageError::Again(
            format!(
                "could not connect within {} s (fetch.request_timeout_secs)",
                fetch.request_timeout_secs
            ),
            None,
        );
    }
    if e.is_timeout() {
        return PageError::Again(
            format!(
                "no whole answer within {} s (fetch.read_timeout_secs)",
                fetch.read_timeout_secs
            ),
            None,
        );
    }
    let why = crate::source::error_chain(&e);
    if e.is_connect() || e.is_builder() {
        PageError::Fatal(why)
    } else {
        PageError::Again(why, None)
    }
}

/// The `rel="next"` target of one `Link` header value.
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        params
            .split(';')
            .any(|p| {
                let p = p.trim().replace(' ', "");
                p == "rel=\"next\"" || p == "rel=next"
            })
            .then(|| {
                target
                    .trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_string()
            })
    })
}

/// `s3://bucket/prefix` by ListObjectsV2 (the client's own timeouts: 5 s to connect, 30 s an
/// answer), retried while the server throttles or fails for a moment.
/// An OCI artifact's files and the manifest's digest: raw layers from the manifest alone, an
/// uncompressed tar layer's files from its headers, read by range, a compressed one's from
/// its headers once it is fetched whole and unpacked.
async fn list_oci(
    client: &reqwest::Client,
    cfg: &crate::config::OciConfig,
    host: &str,
    repo: &str,
    reference: &str,
    url: &str,
) -> anyhow::Result<(Vec<Listed>, String)> {
    let source = crate::source::oci::OciSource::new(client.clone(), cfg, host, repo, reference);
    let mut attempt = 0;
    // A raw layer's sha256 is its digest; a file in a tar layer has none in the manifest and
    // is hashed from its span of the blob, as an S3 object is. Its headers are read here,
    // retried as the manifest is.
    let files = loop {
        attempt += 1;
        match source.placed_files().await {
            Ok(r) => break r,
            Err(e) if e.flaky() && attempt < LIST_ATTEMPTS => {
                let wait = backoff(attempt);
                eprintln!(
                    "resolving {url}: {e}; retrying in {:.1} s",
                    wait.as_secs_f64()
                );
                tokio::time::sleep(wait).await;
            }
            Err(e) => bail!("resolving {url}: {e} ({})", source.asked_as().await),
        }
    };
    let digest = source.resolve().await?.digest.clone();
    let mut listed = Vec::with_capacity(files.len());
    for f in files {
        if let Some(packed) = f.packed_in() {
            let how = match f.compressed() {
                true => "fetched whole and unpacked at first read",
                false => "served by range",
            };
            eprintln!("{url}: {} is packed in {packed}, {how}", f.path);
        }
        let sha256 =
            match f.sha256_hex() {
                Some(hex) => Some(hex.parse().map_err(|_| {
                    anyhow!("{url}: layer {} is not a sha256 digest", f.layer.digest)
                })?),
                None => None,
            };
        listed.push(Listed {
            path: f.path.clone(),
            size: f.size,
            sha256,
        });
    }
    Ok((listed, digest))
}

async fn list_s3(bucket: &str, prefix: &str, url: &str) -> anyhow::Result<Vec<Listed>> {
    let source = crate::source::S3Source::new(bucket, prefix);
    for attempt in 1.. {
        match source.list().await {
            Ok(objects) => {
                return Ok(objects
                    .into_iter()
                    .map(|(path, size)| Listed {
                        path,
                        size,
                        sha256: None,
                    })
                    .collect());
            }
            // A server that answered badly may answer well; one that refuses connections or
            // has no address will not within a build.
            Err(e) if e.flaky() && attempt < LIST_ATTEMPTS => {
                let wait = backoff(attempt);
                eprintln!(
                    "listing {url}: {e}; retrying in {:.1} s",
                    wait.as_secs_f64()
                );
                tokio::time::sleep(wait).await;
            }
            Err(e) => bail!("listing {url}: {e}"),
        }
    }
    unreachable!("the loop returns")
}

/// Fetches what must be fetched and returns every file's entry, showing progress on stderr:
/// a bar on a terminal, a plain line per fetched file otherwise.
///
/// A file whose sha256 is not listed is downloaded to hash it: under `chunk_lists` it gets
/// its chunk list too (a whole-file entry made the first MiB of a cold `s3://` read wait for
/// the whole file, 4–6 s for 1 GiB, and the cold read run at half the chunked speed).
async fn hash_all(
    source: &dyn Source,
    url: &str,
    listed: Vec<Listed>,
    opts: &BuildOptions,
    chunk_lists: bool,
    fetch: &FetchConfig,
) -> anyhow::Result<Vec<BuiltFile>> {
    let to_fetch: u64 = listed
        .iter()
        .filter(|f| !opts.whole_only || f.sha256.is_none())
        .fold(0u64, |sum, f| sum.saturating_add(f.size));
    let bar = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(to_fetch);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let plain = bar.is_hidden();
    let fetcher = Fetcher { source, url, fetch };
    let mut out = Vec::with_capacity(listed.len());
    for f in listed {
        let whole_known = opts.whole_only && f.sha256.is_some();
        if whole_known {
            out.push(BuiltFile::new(
                f.path,
                f.size,
                f.sha256.expect("known"),
                None,
            ));
            continue;
        }
        bar.set_message(f.path.clone());
        let t0 = std::time::Instant::now();
        let chunked;
        let opts = match opts.whole_only && chunk_lists && f.sha256.is_none() {
            true => {
                chunked = BuildOptions {
                    whole_only: false,
                    ..opts.clone()
                };
                &chunked
            }
            false => opts,
        };
        let built = hash_one(&fetcher, &f, opts, &bar).await?;
        if plain {
            eprintln!(
                "hashed {}: {} bytes in {:.1} s",
                f.path,
                f.size,
                t0.elapsed().as_secs_f64()
            );
        }
        out.push(built);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// Pieces of a file fetched at once: a few requests in flight keep a high-latency link busy.
const PIECES_IN_FLIGHT: usize = 4;

/// Attempts per piece: a transient error must not end a build of many gigabytes.
const ATTEMPTS: u32 = 4;

/// How a build asks a source for bytes: bounded in time, retried, and honest about sizes.
struct Fetcher<'a> {
    source: &'a dyn Source,
    url: &'a str,
    fetch: &'a FetchConfig,
}

impl Fetcher<'_> {
    /// Bytes `r` of the file `f`, retried while the error may pass (a 429 or 5xx after the
    /// wait its `Retry-After` asks, up to [`MAX_RETRY_AFTER`]).
    async fn piece(&self, f: &Listed, r: Range<u64>) -> anyhow::Result<bytes::Bytes> {
        let (url, path) = (self.url, &f.path);
        match self.attempts(path, r.clone()).await {
            Ok(b) => Ok(b),
            // Asked for bytes the file does not have, again and again: it is shorter than
            // listed.
            Err(e @ (SourceError::Status(416) | SourceError::Short { .. })) => bail!(
                "{url} {path}: the listing gives {} bytes, but the file is shorter (bytes {}..{}: \
                 {e})",
                f.size,
                r.start,
                r.end
            ),
            Err(e) => bail!("fetching {url} {path} bytes {}..{}: {e}", r.start, r.end),
        }
    }

    async fn attempts(&self, path: &str, r: Range<u64>) -> Result<bytes::Bytes, SourceError> {
        // The whole piece within read_timeout, plus a second per MiB (a 64 MiB chunk over a
        // slow link): a source that stalls cannot hang a build.
        let limit = self.fetch.read_timeout() + Duration::from_secs((r.end - r.start) >> 20);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let e = match tokio::time::timeout(limit, self.source.fetch(path, r.clone())).await {
                Ok(Ok(b)) => return Ok(b),
                Ok(Err(e)) => e,
                Err(_) => SourceError::Timeout,
            };
            if !e.retryable() || attempt >= ATTEMPTS {
                return Err(e);
            }
            let wait = match &e {
                SourceError::RetryAfter { after, .. } if *after > MAX_RETRY_AFTER => {
                    return Err(e);
                }
                SourceError::RetryAfter { after, .. } => *after,
                _ => Duration::from_millis(200 << attempt),
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Checks that `path` ends at `size`, as listed: a byte asked for at `size` must be
    /// refused as past the end (416). A file longer than listed (a git-stored file listed
    /// at 10 bytes, really 4096) would otherwise become a silently truncated entry.
    async fn ends_at(&self, path: &str, size: u64) -> anyhow::Result<()> {
        match self.attempts(path, size..size + 1).await {
            Err(SourceError::Status(416)) => Ok(()),
            Ok(_) => bail!(
                "{} {path}: the listing gives {size} bytes, but the file is longer; no entry \
                 is written, since it would leave bytes out",
                self.url
            ),
            Err(e) => bail!(
                "fetching {} {path} past its listed end ({size} bytes): {e}",
                self.url
            ),
        }
    }
}

/// One file: fetched once, in chunk-sized pieces, hashing the whole file and each chunk.
async fn hash_one(
    fetcher: &Fetcher<'_>,
    f: &Listed,
    opts: &BuildOptions,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<BuiltFile> {
    let url = fetcher.url;
    let head = match opts.fixed_head() {
        Some(h) => h,
        None => {
            let header = if f.path.ends_with(".safetensors") && f.size >= 8 {
                let b = fetcher.piece(f, 0..8).await?;
                b.as_ref().try_into().ok()
            } else {
                None
            };
            opts.head_from(header)
        }
    };
    let layout = opts.layout(f.size, head);
    let mut whole = Sha256::new();
    let mut chunks = Vec::with_capacity(layout.count() as usize);
    let mut outboard = opts.outboard_of(f.size);
    let mut pieces = futures::stream::iter(0..layout.count())
        .map(|i| fetcher.piece(f, layout.range(i)))
        .buffered(PIECES_IN_FLIGHT);
    while let Some(bytes) = pieces.try_next().await? {
        whole.update(&bytes);
        if let Some(o) = &mut outboard {
            o.update(&bytes);
        }
        // A whole-only entry lists no chunk digests: no second hash of every byte for it.
        if !opts.whole_only {
            let idx = chunks.len() as u64;
            chunks.push(ChunkCheck::of(opts.chunk_hash, &layout, idx).digest(&bytes));
        }
        bar.inc(bytes.len() as u64);
    }
    fetcher.ends_at(&f.path, f.size).await?;
    let actual = Digest(whole.finalize().into());
    if let Some(listed) = f.sha256
        && listed != actual
    {
        bail!(
            "{url} {}: the listing gives sha256 {listed}, but its bytes hash to {actual}; \
             no entry is written, since it could never verify",
            f.path
        );
    }
    opts.write_outboard(outboard, &actual)?;
    Ok(BuiltFile::new(
        f.path.clone(),
        f.size,
        actual,
        (!opts.whole_only).then_some((opts.chunk_size, head, opts.chunk_hash, chunks)),
    ))
}

#[cfg(test)]
mod tests {
    use super::{
        BuildOptions, ChunkDoc, ChunkHash, Digest, Listed, MAX_PAGES, Pages, PublishedFile, Url,
        adopt, backoff, next_link,
    };

    fn opts(whole_only: bool) -> BuildOptions {
        BuildOptions {
            id: "m@1.0.0".into(),
            chunk_size: 4,
            head_size: Some(0),
            sources: vec![],
            whole_only,
            chunk_hash: ChunkHash::Sha256,
            outboards: None,
        }
    }

    fn doc(manifest: &str, size: u64, sha: &str, chunks: usize) -> ChunkDoc<PublishedFile> {
        ChunkDoc {
            manifest: manifest.into(),
            files: vec![PublishedFile {
                path: "w.bin".into(),
                size,
                sha256: sha.into(),
                chunk_size: 4,
                head_size: None,
                chunk_hash: None,
                chunks: vec!["11".repeat(32); chunks],
            }],
        }
    }

    /// A published document is adopted only if it describes this manifest, its files with
    /// the layers' sizes and digests, and as many chunks as each layout has; a `--chunked`
    /// build that asks for another cut hashes instead.
    #[test]
    fn published_lists_must_match_the_manifest_and_their_layout() {
        let sha = "22".repeat(32);
        let listed = [Listed {
            path: "w.bin".into(),
            size: 10,
            sha256: Some(sha.parse::<Digest>().unwrap()),
        }];
        let try_adopt = |d| adopt(d, &listed, "sha256:m", &opts(true));
        let refusal = |d| try_adopt(d).err().unwrap();
        assert_eq!(
            try_adopt(doc("sha256:m", 10, &sha, 3))
                .unwrap()
                .unwrap()
                .len(),
            1
        );
        assert!(refusal(doc("sha256:x", 10, &sha, 3)).contains("not sha256:m"));
        assert!(refusal(doc("sha256:m", 11, &sha, 3)).contains("11 bytes"));
        assert!(refusal(doc("sha256:m", 10, &"33".repeat(32), 3)).contains("w.bin"));
        assert!(
            refusal(doc("sha256:m", 10, &sha, 2))
                .contains("2 chunk digests where its layout has 3")
        );
        let mut other = opts(false);
        other.chunk_size = 8;
        let fits = adopt(doc("sha256:m", 10, &sha, 3), &listed, "sha256:m", &other);
        assert!(fits.unwrap().is_none());
    }

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    /// Next pages stay on HF_ENDPOINT's origin, are never asked twice, and are bounded.
    #[test]
    fn pages_are_new_same_origin_and_bounded() {
        let mut p = Pages::new(url("http://127.0.0.1:8000"));
        let a = url("http://127.0.0.1:8000/api/models/o/r/tree/main?recursive=true");
        let b = p.next(&a, "?recursive=true&cursor=2").unwrap();
        assert_eq!(
            b.as_str(),
            "http://127.0.0.1:8000/api/models/o/r/tree/main?recursive=true&cursor=2"
        );
        // Back to the first page, or to itself: a cycle.
        let e = p.next(&b, a.as_str()).unwrap_err();
        assert!(
            e.contains("cycle") && e.contains("main?recursive=true&cursor=2 links back"),
            "{e}"
        );
        let e = p.next(&b, b.as_str()).unwrap_err();
        assert!(e.contains("cycle"), "{e}");
        // Another port, scheme or host is another server.
        for other in [
            "http://127.0.0.1:8001/x",
            "https://127.0.0.1:8000/x",
            "http://evil.example:8000/x",
        ] {
            let e = p.next(&b, other).unwrap_err();
            assert!(
                e.contains("another server") && e.contains("http://127.0.0.1:8000"),
                "{other}: {e}"
            );
        }
        // Distinct pages forever: ended at the cap.
        let mut p = Pages::new(url("http://h"));
        let mut page = url("http://h/p?cursor=0");
        let mut n = 1;
        let e = loop {
            match p.next(&page, &format!("/p?cursor={n}")) {
                Ok(next) => page = next,
                Err(e) => break e,
            }
            n += 1;
        };
        assert_eq!(n, MAX_PAGES);
        assert!(e.contains("more than 10000 pages"), "{e}");
    }

    #[test]
    fn backoff_doubles_up_to_8_s() {
        let waits: Vec<u64> = (1..=7).map(|a| backoff(a).as_millis() as u64).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 8000, 8000]);
    }

    #[test]
    fn link_header_next_page() {
        let h = "<https://hf.co/api/models/a/b/tree/main?recursive=true&cursor=xyz>; rel=\"next\"";
        assert_eq!(
            next_link(h).as_deref(),
            Some("https://hf.co/api/models/a/b/tree/main?recursive=true&cursor=xyz")
        );
        assert_eq!(next_link("<https://x/prev>; rel=\"prev\""), None);
        assert_eq!(
            next_link("<https://x/1>; rel=\"prev\", <https://x/3>; rel=\"next\"").as_deref(),
            Some("https://x/3")
        );
    }
}
