//! `FileCtx`: one file of one model together with the sources to fetch it from, and
//! `file_contexts`, which resolves them for a whole manifest. Shared by the filesystem,
//! control, the CLI and the daemon; it holds no state of its own.

use std::sync::Arc;

use crate::manifest::{FileEntry, ModelId};
use crate::source::SourceHandle;

/// One file of one model, with the sources to fetch it from.
pub struct FileCtx {
    pub model: ModelId,
    pub entry: FileEntry,
    pub sources: Vec<Arc<SourceHandle>>,
}

/// The files of model `m`, each fetched from `sources` (in priority order).
pub fn model_files(m: &crate::manifest::Model, sources: &[Arc<SourceHandle>]) -> Vec<Arc<FileCtx>> {
    m.files
        .iter()
        .map(|f| {
            Arc::new(FileCtx {
                model: m.id.clone(),
                entry: f.clone(),
                sources: sources.to_vec(),
            })
        })
        .collect()
}

/// Every file of every model, with its sources resolved, by model id.
pub fn file_contexts(
    manifest: &crate::manifest::Manifest,
    sources: &crate::source::SourceRegistry,
) -> std::collections::BTreeMap<ModelId, Vec<Arc<FileCtx>>> {
    manifest
        .models
        .values()
        .map(|m| (m.id.clone(), model_files(m, &sources.for_model(m))))
        .collect()
}
