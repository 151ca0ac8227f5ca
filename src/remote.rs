//! Manifest entries built from where models live, with no local copy:
//! `wan manifest build hf://org/repo@rev` (the Hub's tree API) and `s3://bucket/prefix`
//! (ListObjectsV2).
//!
//! The Hub lists each LFS file's sha256 (`lfs.oid`) and size, so a whole-file entry needs no
//! download: only small files stored in git (configs) are fetched and hashed. S3 lists sizes
//! only, so every object is fetched and hashed. With `--chunked`, every file is fetched once
//! to compute its chunk digests (lazy reads then work), and a listed sha256 must match what
//! the bytes hash to. Bytes are read through the same `Source` the daemon would use, so
//! HF_ENDPOINT, HF_TOKEN and the AWS_* variables mean the same here as in `wan mount`.

use std::io::IsTerminal;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, LINK};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::chunk::{Digest, Layout};
use crate::config::FetchConfig;
use crate::manifest::{BuildOptions, BuiltFile, SourceUrl, head_size_from, render_entry};
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
    arg.starts_with("hf://") || arg.starts_with("s3://")
}

/// Builds the entry for the model at `url`. `opts.whole_only` is the default for remote
/// builds; `--chunked` clears it. `url` is the entry's first source, then `opts.sources`.
pub fn build(url: &str, opts: &BuildOptions) -> anyhow::Result<String> {
    let mut opts_sources = vec![url.to_string()];
    opts_sources.extend(opts.sources.iter().cloned());
    let opts = BuildOptions {
        sources: opts_sources,
        ..opts.clone()
    };
    let base = Path::new(".");
    opts.check(base)?;
    let parsed = SourceUrl::parse(url, base).map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let files = rt.block_on(async {
        // One client for the listing and the bytes: the daemon's sources, as `wan mount` builds them.
        let registry = SourceRegistry::new(&FetchConfig::default())?;
        let listed = match &parsed {
            SourceUrl::Hf { repo, rev } => list_hf(registry.client(), repo, rev).await?,
            SourceUrl::S3 { bucket, prefix } => crate::source::S3Source::new(bucket, prefix)
                .list()
                .await
                .map_err(|e| anyhow::anyhow!("listing {url}: {e}"))?
                .into_iter()
                .map(|(path, size)| Listed {
                    path,
                    size,
                    sha256: None,
                })
                .collect(),
            _ => bail!("{url}: only hf:// and s3:// models can be built remotely"),
        };
        if listed.is_empty() {
            bail!("{url} lists no files");
        }
        let handle = registry.get(&parsed);
        hash_all(&*handle.source, url, listed, &opts).await
    })?;
    render_entry(&opts.id, &opts.sources, files, base)
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

/// `GET /api/models/{repo}/tree/{rev}?recursive=true`, following the `Link: <…>; rel="next"`
/// pages the Hub sends for large repositories.
async fn list_hf(client: &reqwest::Client, repo: &str, rev: &str) -> anyhow::Result<Vec<Listed>> {
    let (endpoint, token) = crate::source::hub();
    let mut rev_seg = String::new();
    crate::source::http::encode_segment(rev, &mut rev_seg);
    let mut next = Some(format!(
        "{endpoint}/api/models/{repo}/tree/{rev_seg}?recursive=true"
    ));
    let what = format!("hf://{repo}@{rev}");
    let mut out = Vec::new();
    while let Some(url) = next.take() {
        let mut req = client.get(&url);
        if let Some(t) = &token {
            req = req.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("listing {what}: {}", e.without_url()))?;
        match resp.status() {
            StatusCode::OK => {}
            s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => bail!(
                "listing {what}: access denied (HTTP {}): set HF_TOKEN to a token that can read it",
                s.as_u16()
            ),
            StatusCode::NOT_FOUND => {
                bail!("listing {what}: no such repository or revision (HTTP 404 from {endpoint})")
            }
            s => bail!("listing {what}: HTTP {} from {endpoint}", s.as_u16()),
        }
        next = resp
            .headers()
            .get_all(LINK)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(next_link);
        let page: Vec<TreeEntry> = resp
            .json()
            .await
            .map_err(|e| anyhow::anyhow!("listing {what}: not a tree listing: {e}"))?;
        for e in page.into_iter().filter(|e| e.kind == "file") {
            let listed = match e.lfs {
                Some(lfs) => Listed {
                    sha256: Some(lfs.oid.parse().map_err(|_| {
                        anyhow::anyhow!(
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

/// Fetches what must be fetched and returns every file's entry, showing progress on stderr:
/// a bar on a terminal, a plain line per fetched file otherwise.
async fn hash_all(
    source: &dyn Source,
    url: &str,
    listed: Vec<Listed>,
    opts: &BuildOptions,
) -> anyhow::Result<Vec<BuiltFile>> {
    let to_fetch: u64 = listed
        .iter()
        .filter(|f| !opts.whole_only || f.sha256.is_none())
        .map(|f| f.size)
        .sum();
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
        let built = hash_one(source, url, &f, opts, &bar).await?;
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

async fn fetch_piece(
    source: &dyn Source,
    url: &str,
    path: &str,
    r: Range<u64>,
) -> anyhow::Result<bytes::Bytes> {
    let mut last: Option<SourceError> = None;
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
        match source.fetch(path, r.clone()).await {
            Ok(b) => return Ok(b),
            Err(e) => {
                let retry = e.retryable();
                last = Some(e);
                if !retry {
                    break;
                }
            }
        }
    }
    bail!(
        "fetching {url} {path} bytes {}..{}: {}",
        r.start,
        r.end,
        last.expect("an attempt failed")
    )
}

/// One file: fetched once, in chunk-sized pieces, hashing the whole file and each chunk.
async fn hash_one(
    source: &dyn Source,
    url: &str,
    f: &Listed,
    opts: &BuildOptions,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<BuiltFile> {
    let head = match opts.fixed_head() {
        Some(h) => h,
        None => {
            let header = if f.path.ends_with(".safetensors") && f.size >= 8 {
                let b = fetch_piece(source, url, &f.path, 0..8).await?;
                b.as_ref().try_into().ok()
            } else {
                None
            };
            head_size_from(header, opts.chunk_size)
        }
    };
    let layout = Layout::with_head(f.size, opts.chunk_size, head);
    let mut whole = Sha256::new();
    let mut chunks = Vec::with_capacity(layout.count() as usize);
    let mut pieces = futures::stream::iter(0..layout.count())
        .map(|i| fetch_piece(source, url, &f.path, layout.range(i)))
        .buffered(PIECES_IN_FLIGHT);
    while let Some(bytes) = pieces.try_next().await? {
        whole.update(&bytes);
        // A whole-only entry lists no chunk digests: no second hash of every byte for it.
        if !opts.whole_only {
            chunks.push(opts.chunk_hash.digest(&bytes));
        }
        bar.inc(bytes.len() as u64);
    }
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
    Ok(BuiltFile::new(
        f.path.clone(),
        f.size,
        actual,
        (!opts.whole_only).then_some((opts.chunk_size, head, opts.chunk_hash, chunks)),
    ))
}

#[cfg(test)]
mod tests {
    use super::next_link;

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
