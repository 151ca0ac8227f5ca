//! The inode table: the manifest laid out as a directory tree, built once, never changing
//! while mounted. Inode numbers are indices (root = 1), so lookups are a map probe.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::fetch::FileCtx;
use crate::manifest::Manifest;
use crate::source::SourceRegistry;

pub const ROOT: u64 = 1;

pub enum NodeKind {
    Dir(BTreeMap<String, u64>),
    File(Arc<FileCtx>),
}

pub struct Node {
    pub name: String,
    pub parent: u64,
    pub kind: NodeKind,
}

pub struct Tree {
    nodes: Vec<Node>,
}

impl Tree {
    /// Lays out every model of `manifest` as a top-level directory.
    pub fn build(manifest: &Manifest, sources: &SourceRegistry) -> Tree {
        let mut t = Tree {
            nodes: vec![Node {
                name: String::new(),
                parent: ROOT,
                kind: NodeKind::Dir(BTreeMap::new()),
            }],
        };
        for model in manifest.models.values() {
            let handles: Vec<_> = model.sources.iter().map(|u| sources.get(u)).collect();
            let top = t.dir(ROOT, &model.id);
            for f in &model.files {
                let segs: Vec<&str> = f.path.split('/').collect();
                let (name, dirs) = segs.split_last().expect("validated: non-empty path");
                let mut parent = top;
                for d in dirs {
                    parent = t.dir(parent, d);
                }
                let ctx = Arc::new(FileCtx {
                    model: model.id.clone(),
                    entry: f.clone(),
                    sources: handles.clone(),
                });
                t.add(parent, name, NodeKind::File(ctx));
            }
        }
        t
    }

    fn add(&mut self, parent: u64, name: &str, kind: NodeKind) -> u64 {
        let ino = self.nodes.len() as u64 + 1;
        self.nodes.push(Node {
            name: name.to_string(),
            parent,
            kind,
        });
        if let NodeKind::Dir(children) = &mut self.nodes[(parent - 1) as usize].kind {
            children.insert(name.to_string(), ino);
        }
        ino
    }

    fn dir(&mut self, parent: u64, name: &str) -> u64 {
        if let Some(ino) = self.lookup(parent, name) {
            return ino;
        }
        self.add(parent, name, NodeKind::Dir(BTreeMap::new()))
    }

    pub fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(ino.checked_sub(1)? as usize)
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Option<u64> {
        match &self.get(parent)?.kind {
            NodeKind::Dir(children) => children.get(name).copied(),
            NodeKind::File(_) => None,
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}
