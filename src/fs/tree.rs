//! The inode table: the manifest laid out as a directory tree, plus the `.wan/` control
//! directory, built once, never changing while mounted. Inode numbers are indices (root = 1),
//! so lookups are a map probe.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::fetch::FileCtx;

pub const ROOT: u64 = 1;

pub enum NodeKind {
    Dir(BTreeMap<String, u64>),
    File(Arc<FileCtx>),
    Control(ControlFile),
}

/// The files of `.wan/`: read ones render a view, write ones take a model id or a mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlFile {
    Status,
    Health,
    Metrics,
    Config,
    Events,
    Ensure,
    Verify,
    Gc,
    Pin,
    Unpin,
    Evict,
    MarkCorrupted,
}

impl ControlFile {
    pub const ALL: [ControlFile; 12] = [
        ControlFile::Status,
        ControlFile::Health,
        ControlFile::Metrics,
        ControlFile::Config,
        ControlFile::Events,
        ControlFile::Ensure,
        ControlFile::Verify,
        ControlFile::Gc,
        ControlFile::Pin,
        ControlFile::Unpin,
        ControlFile::Evict,
        ControlFile::MarkCorrupted,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ControlFile::Status => "status",
            ControlFile::Health => "health",
            ControlFile::Metrics => "metrics",
            ControlFile::Config => "config",
            ControlFile::Events => "events",
            ControlFile::Ensure => "ensure",
            ControlFile::Verify => "verify",
            ControlFile::Gc => "gc",
            ControlFile::Pin => "pin",
            ControlFile::Unpin => "unpin",
            ControlFile::Evict => "evict",
            ControlFile::MarkCorrupted => "mark-corrupted",
        }
    }

    pub fn writable(self) -> bool {
        !matches!(
            self,
            ControlFile::Status
                | ControlFile::Health
                | ControlFile::Metrics
                | ControlFile::Config
                | ControlFile::Events
        )
    }
}

/// The control directory at the mount root.
pub const CONTROL_DIR: &str = ".wan";

pub struct Node {
    pub name: String,
    pub parent: u64,
    pub kind: NodeKind,
}

pub struct Tree {
    nodes: Vec<Node>,
}

impl Tree {
    /// Lays out every model as a top-level directory, and `.wan/`.
    pub fn build(models: &BTreeMap<String, Vec<Arc<FileCtx>>>) -> Tree {
        let mut t = Tree {
            nodes: vec![Node {
                name: String::new(),
                parent: ROOT,
                kind: NodeKind::Dir(BTreeMap::new()),
            }],
        };
        let control = t.dir(ROOT, CONTROL_DIR);
        for cf in ControlFile::ALL {
            t.add(control, cf.name(), NodeKind::Control(cf));
        }
        for (id, files) in models {
            let top = t.dir(ROOT, id);
            for f in files {
                let segs: Vec<&str> = f.entry.path.split('/').collect();
                let (name, dirs) = segs.split_last().expect("validated: non-empty path");
                let mut parent = top;
                for d in dirs {
                    parent = t.dir(parent, d);
                }
                t.add(parent, name, NodeKind::File(f.clone()));
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
            NodeKind::File(_) | NodeKind::Control(_) => None,
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}
