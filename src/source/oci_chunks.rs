//! A model's chunk lists published once, next to its OCI artifact, for the whole fleet: an
//! OCI 1.1 referrer of the model's manifest (`subject` set, artifactType
//! [`ARTIFACT_TYPE`]) whose one layer is a [`ChunkDoc`]. `wan manifest publish-chunks`
//! pushes it; `wan manifest build oci://…` finds it, so no host hashes the layers itself.
//!
//! Owns the referrer's wire format and the registry conversation about it: blob uploads,
//! the referrer manifest, and where a registry has no referrers API (distribution 2.8) the
//! spec's fallback, an index tagged `sha256-<hex of the subject's digest>` that lists the
//! referrers. Auth is the [`OciSource`]'s (a push gets a push-scoped token from the same
//! 401 challenge). What the document may claim is not decided here: `remote` checks it
//! against the manifest's digests and, for a BLAKE3-signed model, against the signature.

use bytes::Bytes;
use futures::StreamExt;
use reqwest::header::{ACCEPT, CONTENT_TYPE, LOCATION};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::SourceError;
use super::oci::OciSource;

/// The referrer's artifactType and its layer's media type.
pub const ARTIFACT_TYPE: &str = "application/vnd.wanfs.chunks.v1+json";

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI 1.1's empty config (`{}`), what an artifact without a config carries.
const EMPTY_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY: &[u8] = b"{}";

/// The largest chunk document read: a 1 TB model in 8 MiB chunks lists 131,072 digests
/// (about 9 MB of JSON); 256 MiB is far past any model and bounds what a registry can make a
/// build hold.
const MAX_DOC_BYTES: usize = 256 << 20;

/// The largest referrer manifest or referrers index read.
const MAX_META_BYTES: usize = 4 << 20;

/// The published document: the manifest it describes, and each file's entry as
/// `wan manifest build --chunked` would write it (path, size, sha256, chunk_size,
/// head_size, chunk_hash, chunks).
#[derive(Serialize, Deserialize, Debug)]
pub struct ChunkDoc<F> {
    /// `sha256:<hex>` of the model manifest (the referrer's `subject`).
    pub manifest: String,
    pub files: Vec<F>,
}

/// The model manifest a referrer points at: its digest, size and media type, as the
/// registry serves them.
#[derive(Clone, Debug)]
pub struct Subject {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
}

/// Where a referrer was recorded.
#[derive(Debug, PartialEq)]
pub enum Pushed {
    /// The registry indexes `subject` itself (it answered `OCI-Subject`).
    Referrers { digest: String },
    /// No referrers API: listed in the index tagged `tag`.
    Tag { digest: String, tag: String },
}

/// `sha256-<hex>`: the spec's fallback tag for referrers of `digest`.
pub fn fallback_tag(digest: &str) -> String {
    digest.replacen(':', "-", 1)
}

/// The manifest `digest` names, as served: its size and media type, for a `subject`.
pub async fn subject(src: &OciSource, digest: &str) -> Result<Subject, SourceError> {
    let (bytes, media_type) = get_manifest(src, digest, OCI_MANIFEST).await?;
    Ok(Subject {
        digest: digest.to_string(),
        size: bytes.len() as u64,
        media_type: media_type.unwrap_or_else(|| OCI_MANIFEST.to_string()),
    })
}

/// Pushes `doc` (a serialized [`ChunkDoc`]) as a referrer of `subject`.
pub async fn push(src: &OciSource, subject: &Subject, doc: Bytes) -> Result<Pushed, SourceError> {
    let empty = upload(src, Bytes::from_static(EMPTY)).await?;
    let layer = upload(src, doc.clone()).await?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_TYPE, "digest": empty, "size": EMPTY.len()},
        "layers": [{"mediaType": ARTIFACT_TYPE, "digest": layer, "size": doc.len()}],
        "subject": {
            "mediaType": subject.media_type,
            "digest": subject.digest,
            "size": subject.size,
        },
    });
    let body = Bytes::from(serde_json::to_vec(&manifest).expect("JSON"));
    let digest = sha256_digest(&body);
    let resp = put_manifest(src, &digest, OCI_MANIFEST, body.clone()).await?;
    if resp.headers().contains_key("oci-subject") {
        return Ok(Pushed::Referrers { digest });
    }
    // No referrers API: the spec's fallback, read-modify-write of the tagged index (a
    // concurrent publisher can lose this entry; publishing is an operator's step, rerun).
    let tag = fallback_tag(&subject.digest);
    let mut index = match get_manifest(src, &tag, OCI_INDEX).await {
        Ok((bytes, _)) => serde_json::from_slice::<serde_json::Value>(&bytes).map_err(|e| {
            SourceError::Unsupported(format!("the referrers index tagged {tag} is not JSON: {e}"))
        })?,
        Err(SourceError::NotFound) => {
            serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})
        }
        Err(e) => return Err(e),
    };
    let entries = index
        .get_mut("manifests")
        .and_then(|m| m.as_array_mut())
        .ok_or_else(|| {
            SourceError::Unsupported(format!("the index tagged {tag} has no manifests"))
        })?;
    entries.retain(|m| m.get("digest").and_then(|d| d.as_str()) != Some(digest.as_str()));
    entries.push(serde_json::json!({
        "mediaType": OCI_MANIFEST,
        "digest": digest,
        "size": body.len(),
        "artifactType": ARTIFACT_TYPE,
    }));
    let index = Bytes::from(serde_json::to_vec(&index).expect("JSON"));
    put_manifest(src, &tag, OCI_INDEX, index).await?;
    Ok(Pushed::Tag { digest, tag })
}

/// The newest chunk document published for `subject` (`sha256:<hex>`), raw, and the
/// referrer it came from; `None` when none is. Asks the referrers API, then the fallback tag.
pub async fn find(src: &OciSource, subject: &str) -> Result<Option<(Bytes, String)>, SourceError> {
    let url = format!(
        "{}/referrers/{subject}?artifactType={}",
        src.base(),
        ARTIFACT_TYPE.replace('+', "%2B")
    );
    let index = match get_bounded(src, &url, OCI_INDEX, MAX_META_BYTES).await {
        Ok((b, _)) => Some(b),
        // 404: no referrers API (or nothing of this subject); 400/405: an older registry.
        Err(SourceError::NotFound | SourceError::Status(400 | 405)) => None,
        Err(e) => return Err(e),
    };
    let index = match index {
        Some(b) => Some(b),
        None => match get_manifest(src, &fallback_tag(subject), OCI_INDEX).await {
            Ok((b, _)) => Some(b),
            Err(SourceError::NotFound) => None,
            Err(e) => return Err(e),
        },
    };
    let Some(index) = index else { return Ok(None) };
    let index: Index = serde_json::from_slice(&index).map_err(|e| {
        SourceError::Unsupported(format!("referrers of {subject}: not an index: {e}"))
    })?;
    // The last one listed is the newest (the fallback appends).
    let Some(referrer) = index
        .manifests
        .iter()
        .rev()
        .find(|m| m.artifact_type.as_deref() == Some(ARTIFACT_TYPE))
    else {
        return Ok(None);
    };
    let (bytes, _) = get_manifest(src, &referrer.digest, OCI_MANIFEST).await?;
    let m: Referrer = serde_json::from_slice(&bytes).map_err(|e| {
        SourceError::Unsupported(format!("referrer {}: not a manifest: {e}", referrer.digest))
    })?;
    if m.subject.as_ref().map(|s| s.digest.as_str()) != Some(subject)
        || m.artifact_type.as_deref() != Some(ARTIFACT_TYPE)
    {
        return Err(SourceError::Unsupported(format!(
            "referrer {} listed for {subject} is not a {ARTIFACT_TYPE} of it",
            referrer.digest
        )));
    }
    let [layer] = m.layers.as_slice() else {
        return Err(SourceError::Unsupported(format!(
            "referrer {} has {} layers, not one chunk document",
            referrer.digest,
            m.layers.len()
        )));
    };
    if layer.size > MAX_DOC_BYTES as u64 {
        return Err(SourceError::Unsupported(format!(
            "referrer {}: a chunk document of {} bytes, more than {} MiB",
            referrer.digest,
            layer.size,
            MAX_DOC_BYTES >> 20
        )));
    }
    let url = format!("{}/blobs/{}", src.base(), layer.digest);
    let (doc, _) = get_bounded(src, &url, "*/*", MAX_DOC_BYTES).await?;
    if sha256_digest(&doc) != layer.digest {
        return Err(SourceError::Unsupported(format!(
            "referrer {}: the registry answered chunk document {} with other bytes",
            referrer.digest, layer.digest
        )));
    }
    Ok(Some((doc, referrer.digest.clone())))
}

#[derive(Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<IndexEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexEntry {
    digest: String,
    artifact_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Referrer {
    artifact_type: Option<String>,
    subject: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
    #[serde(default)]
    size: u64,
}

fn sha256_digest(b: &[u8]) -> String {
    let d = Sha256::digest(b);
    format!(
        "sha256:{}",
        d.iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

/// The manifest `reference` names, its bytes checked against a digest reference, and the
/// media type served.
async fn get_manifest(
    src: &OciSource,
    reference: &str,
    accept: &str,
) -> Result<(Bytes, Option<String>), SourceError> {
    let url = format!("{}/manifests/{reference}", src.base());
    let (b, mt) = get_bounded(src, &url, accept, MAX_META_BYTES).await?;
    if reference.starts_with("sha256:") && sha256_digest(&b) != reference {
        return Err(SourceError::Unsupported(format!(
            "manifest {reference} was answered with other bytes"
        )));
    }
    Ok((b, mt))
}

/// A GET's body, at most `max` bytes, and its media type.
async fn get_bounded(
    src: &OciSource,
    url: &str,
    accept: &str,
    max: usize,
) -> Result<(Bytes, Option<String>), SourceError> {
    let resp = src
        .send(|c| {
            c.get(url)
                .header(ACCEPT, accept)
                .timeout(super::oci::META_TIMEOUT)
        })
        .await?;
    status(&resp)?;
    let mt = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or(v).trim().to_string());
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(piece) = stream.next().await {
        body.extend_from_slice(&piece.map_err(super::http::transport)?);
        if body.len() > max {
            return Err(SourceError::Unsupported(format!(
                "{url}: an answer larger than {max} bytes"
            )));
        }
    }
    Ok((Bytes::from(body), mt))
}

fn status(resp: &reqwest::Response) -> Result<(), SourceError> {
    match resp.status().as_u16() {
        200..=299 => Ok(()),
        404 => Err(SourceError::NotFound),
        s @ (401 | 403) => Err(SourceError::Denied(s)),
        s => Err(SourceError::Status(s)),
    }
}

/// Uploads `blob` unless the repository has it (POST, then one PUT with its digest: the
/// spec's monolithic upload that every registry serves); its digest.
async fn upload(src: &OciSource, blob: Bytes) -> Result<String, SourceError> {
    let digest = sha256_digest(&blob);
    let url = format!("{}/blobs/{digest}", src.base());
    let resp = src
        .send(|c| c.head(&url).timeout(super::oci::META_TIMEOUT))
        .await?;
    if resp.status().is_success() {
        return Ok(digest);
    }
    let start = format!("{}/blobs/uploads/", src.base());
    let resp = src
        .send(|c| c.post(&start).timeout(super::oci::META_TIMEOUT))
        .await?;
    status(&resp)?;
    let location = resp
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| SourceError::Unsupported("an upload answered with no Location".into()))?;
    // Location may be relative to the registry; its query (the upload's state) is kept.
    let mut put = reqwest::Url::parse(&start)
        .and_then(|u| u.join(location))
        .map_err(|e| SourceError::Unsupported(format!("upload Location {location:?}: {e}")))?;
    put.query_pairs_mut().append_pair("digest", &digest);
    let resp = src
        .send(|c| {
            c.put(put.clone())
                .header(CONTENT_TYPE, "application/octet-stream")
                .body(blob.clone())
                .timeout(super::oci::META_TIMEOUT)
        })
        .await?;
    status(&resp)?;
    Ok(digest)
}

async fn put_manifest(
    src: &OciSource,
    reference: &str,
    media_type: &str,
    body: Bytes,
) -> Result<reqwest::Response, SourceError> {
    let url = format!("{}/manifests/{reference}", src.base());
    let resp = src
        .send(|c| {
            c.put(&url)
                .header(CONTENT_TYPE, media_type)
                .body(body.clone())
                .timeout(super::oci::META_TIMEOUT)
        })
        .await?;
    status(&resp)?;
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fallback_tag_is_the_digest_with_a_dash() {
        assert_eq!(fallback_tag("sha256:ab12"), "sha256-ab12");
    }

    #[test]
    fn the_empty_config_has_the_spec_digest() {
        assert_eq!(
            sha256_digest(EMPTY),
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
    }
}
