//! `FileCtx`: one file of one model together with the sources to fetch it from, and
//! `file_contexts`, which resolves them for a whole manifest. Shared by the filesystem,
//! control, the CLI and the daemon; it holds no state of its own.

use std::sync::Arc;

use crate::manifest::FileEntry;
use crate::source::SourceHandle;

/// One file of one model, with the sources to fetch it from.
pub struct FileCtx {
    pub model: String,
    pub entry: FileEntry,
    pub sources: Vec<Arc<SourceHandle>>,
}

/// Every file of every model, with its sources resolved, by model id.
pub fn file_contexts(
    manifest: &crate::manifest::Manifest,
    sources: &crate::source::SourceRegistry,
) -> std::collections::BTreeMap<String, Vec<Arc<FileCtx>>> {
    manifest
        .models
        .values()
        .map(|m| {
            let handles: Vec<_> = m.sources.iter().map(|u| sources.get(u)).collect();
            let files = m
                .files
                .iter()
                .map(|f| {
                    Arc::new(FileCtx {
                        model: m.id.clone(),
                        entry: f.clone(),
                        sources: handles.clone(),
                    })
                })
                .collect();
            (m.id.clone(), files)
        })
        .collect()
}
