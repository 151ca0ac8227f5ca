//! The inode table: the manifest laid out as a directory tree, plus the `.wan/` control
//! directory. A tree never changes once built; a reload builds the next one (keeping the
//! inode numbers of paths that stay) and swaps it in whole. Inode numbers are indices
//! (root = 1), so lookups are a map probe.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::fetch::FileCtx;
use crate::manifest::ModelId;

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
    /// Inode of every path ever laid out, so a reload keeps inode numbers stable.
    by_path: std::collections::HashMap<String, u64>,
}

impl Tree {
    /// Lays out every model as a top-level directory, and `.wan/`.
    ///
    /// With `prev` (a reload), a path that is still there keeps its inode; a file whose content
    /// changed gets a new one (the kernel may cache pages by inode). Nodes that are gone stay
    /// in the table, unreachable from any directory, so files still open keep reading.
    pub fn build(models: &BTreeMap<ModelId, Vec<Arc<FileCtx>>>, prev: Option<&Tree>) -> Tree {
        let mut t = match prev {
            Some(p) => Tree {
                nodes: p
                    .nodes
                    .iter()
                    .map(|n| Node {
                        name: n.name.clone(),
                        parent: n.parent,
                        kind: match &n.kind {
                            NodeKind::Dir(_) => NodeKind::Dir(BTreeMap::new()),
                            NodeKind::File(f) => NodeKind::File(f.clone()),
                            NodeKind::Control(c) => NodeKind::Control(*c),
                        },
                    })
                    .collect(),
                by_path: p.by_path.clone(),
            },
            None => Tree {
                nodes: vec![Node {
                    name: String::new(),
                    parent: ROOT,
                    kind: NodeKind::Dir(BTreeMap::new()),
                }],
                by_path: std::collections::HashMap::new(),
            },
        };
        let control = t.dir(ROOT, CONTROL_DIR, CONTROL_DIR);
        for cf in ControlFile::ALL {
            let path = format!("{CONTROL_DIR}/{}", cf.name());
            t.add(control, cf.name(), &path, NodeKind::Control(cf));
        }
        for (id, files) in models {
            let top = t.dir(ROOT, id, id);
            for f in files {
                let segs: Vec<&str> = f.entry.path.split('/').collect();
                let (name, dirs) = segs.split_last().expect("validated: non-empty path");
                let mut parent = top;
                let mut path = id.to_string();
                for d in dirs {
                    path.push('/');
                    path.push_str(d);
                    parent = t.dir(parent, d, &path);
                }
                t.add(
                    parent,
                    name,
                    &format!("{id}/{}", f.entry.path),
                    NodeKind::File(f.clone()),
                );
            }
        }
        t
    }

    /// Links `name` under `parent`, reusing the path's inode when its kind and content match.
    fn add(&mut self, parent: u64, name: &str, path: &str, kind: NodeKind) -> u64 {
        let reuse = self.by_path.get(path).copied().filter(|ino| {
            match (&self.nodes[(*ino - 1) as usize].kind, &kind) {
                (NodeKind::Dir(_), NodeKind::Dir(_)) => true,
                (NodeKind::Control(a), NodeKind::Control(b)) => a == b,
                (NodeKind::File(a), NodeKind::File(b)) => {
                    a.entry.sha256 == b.entry.sha256 && a.entry.size == b.entry.size
                }
                _ => false,
            }
        });
        let ino = match reuse {
            Some(ino) => {
                let node = &mut self.nodes[(ino - 1) as usize];
                node.parent = parent;
                if let NodeKind::File(_) = kind {
                    node.kind = kind;
                }
                ino
            }
            None => {
                self.nodes.push(Node {
                    name: name.to_string(),
                    parent,
                    kind,
                });
                let ino = self.nodes.len() as u64;
                self.by_path.insert(path.to_string(), ino);
                ino
            }
        };
        if let NodeKind::Dir(children) = &mut self.nodes[(parent - 1) as usize].kind {
            children.insert(name.to_string(), ino);
        }
        ino
    }

    fn dir(&mut self, parent: u64, name: &str, path: &str) -> u64 {
        if let Some(ino) = self.lookup(parent, name) {
            return ino;
        }
        self.add(parent, name, path, NodeKind::Dir(BTreeMap::new()))
    }

    /// Top-level names (models) of `self` that `next` no longer has.
    pub fn removed_models(&self, next: &Tree) -> Vec<String> {
        let names = |t: &Tree| match &t.nodes[0].kind {
            NodeKind::Dir(c) => c.keys().cloned().collect::<Vec<_>>(),
            _ => Vec::new(),
        };
        let keep = names(next);
        names(self)
            .into_iter()
            .filter(|n| !keep.contains(n))
            .collect()
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

    /// Entries (parent inode, name) reachable in `self` that `next` removed or gave another
    /// inode: the kernel's cached dentries for them must be dropped on reload.
    pub fn stale_entries(&self, next: &Tree) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        let mut stack = vec![ROOT];
        while let Some(dir) = stack.pop() {
            let Some(NodeKind::Dir(children)) = self.get(dir).map(|n| &n.kind) else {
                continue;
            };
            for (name, &ino) in children {
                if next.lookup(dir, name) == Some(ino) {
                    stack.push(ino);
                } else {
                    out.push((dir, name.clone()));
                }
            }
        }
        out
    }

    /// Every file reachable from the root (for statfs).
    pub fn live_files(&self) -> Vec<&Arc<FileCtx>> {
        let mut out = Vec::new();
        let mut stack = vec![ROOT];
        while let Some(ino) = stack.pop() {
            match self.get(ino).map(|n| &n.kind) {
                Some(NodeKind::Dir(c)) => stack.extend(c.values()),
                Some(NodeKind::File(f)) => out.push(f),
                _ => {}
            }
        }
        out
    }
}
