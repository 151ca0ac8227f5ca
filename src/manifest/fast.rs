//! A fast reader for manifests in the plain shape `wan manifest build` writes, producing the
//! same `RawManifest` the `toml` crate would, so validation is shared and unchanged.
//!
//! It accepts a strict subset of TOML and gives up (`None`) on anything else: then the caller
//! parses with the `toml` crate, which accepts or refuses the text with its own words (line
//! numbers included). So it never has to produce an error, only to be exact where it accepts:
//! table headers `[models."ID"]`, `[models."ID".sources]` and `[[models."ID".files]]` alone on
//! their line; bare keys, each known for its table and given once; values that are basic strings
//! without escapes or control characters, decimal integers, `true`/`false`, and arrays of such
//! strings (over several lines, with comments and a trailing comma); comments; `\n` line ends.
//! A fleet manifest (57 MB, 540k digests) takes the `toml` crate about a second and ~500 MiB;
//! this reads it in a fraction of that, holding only the result.

use std::collections::BTreeMap;

use super::{HexDigest, RawFile, RawManifest, RawModel, RawSources};

/// The table the next keys belong to.
enum Table {
    Top,
    Model(String),
    Sources(String),
    /// The last file of the model.
    File(String),
}

/// A `[[files]]` entry as read so far: required keys may still be missing.
#[derive(Default)]
struct PartFile {
    path: Option<String>,
    size: Option<u64>,
    sha256: Option<String>,
    chunk_size: Option<u64>,
    head_size: Option<u64>,
    chunks: Option<Vec<HexDigest>>,
}

#[derive(Default)]
struct PartModel {
    /// `[models."ID"]` seen (a second one is a TOML error).
    defined: bool,
    sources_defined: bool,
    description: Option<String>,
    pinned: Option<bool>,
    priority: Option<Vec<String>>,
    files: Vec<PartFile>,
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, b: u8) -> Option<()> {
        (self.peek()? == b).then(|| self.i += 1)
    }

    fn eat_str(&mut self, lit: &str) -> Option<()> {
        self.s[self.i..]
            .starts_with(lit.as_bytes())
            .then(|| self.i += lit.len())
    }

    fn spaces(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }

    /// A comment runs to the end of the line; TOML refuses control characters in it.
    fn comment(&mut self) -> Option<()> {
        if self.peek() == Some(b'#') {
            while let Some(c) = self.peek() {
                if c == b'\n' {
                    break;
                }
                if c < 0x20 && c != b'\t' || c == 0x7f {
                    return None;
                }
                self.i += 1;
            }
        }
        Some(())
    }

    /// Spaces and a comment, then the end of the line (or of the text).
    fn end_of_line(&mut self) -> Option<()> {
        self.spaces();
        self.comment()?;
        match self.peek() {
            None => Some(()),
            Some(b'\n') => {
                self.i += 1;
                Some(())
            }
            Some(_) => None,
        }
    }

    /// Blank lines, spaces and comments (between key lines, and inside arrays).
    fn gaps(&mut self) -> Option<()> {
        loop {
            self.spaces();
            self.comment()?;
            if self.eat(b'\n').is_none() {
                return Some(());
            }
        }
    }

    /// `"…"` without escapes or control characters.
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.i;
        loop {
            match self.peek()? {
                b'"' => break,
                b'\\' => return None,
                c if c < 0x20 || c == 0x7f => return None,
                _ => self.i += 1,
            }
        }
        let s = std::str::from_utf8(&self.s[start..self.i]).ok()?;
        self.i += 1;
        Some(s)
    }

    /// A decimal integer TOML accepts (no sign, `_` or leading zero), within `i64` (TOML's
    /// range: the `toml` crate refuses more even for a `u64` field).
    fn integer(&mut self) -> Option<u64> {
        let start = self.i;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
        let digits = &self.s[start..self.i];
        if digits.is_empty() || (digits.len() > 1 && digits[0] == b'0') {
            return None;
        }
        if matches!(
            self.peek(),
            Some(b'_' | b'.' | b'e' | b'E' | b'x' | b'o' | b'b')
        ) {
            return None;
        }
        let v: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
        (v <= i64::MAX as u64).then_some(v)
    }

    fn boolean(&mut self) -> Option<bool> {
        if self.eat_str("true").is_some() {
            Some(true)
        } else {
            self.eat_str("false").map(|()| false)
        }
    }

    /// `[ "a", "b", ]` over any number of lines.
    fn strings(&mut self) -> Option<Vec<&'a str>> {
        self.eat(b'[')?;
        let mut out = Vec::new();
        loop {
            self.gaps()?;
            if self.eat(b']').is_some() {
                return Some(out);
            }
            out.push(self.string()?);
            self.gaps()?;
            if self.eat(b',').is_none() {
                self.gaps()?;
                self.eat(b']')?;
                return Some(out);
            }
        }
    }

    /// A bare key of the letters TOML allows.
    fn key(&mut self) -> Option<&'a str> {
        let start = self.i;
        while matches!(
            self.peek(),
            Some(b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-')
        ) {
            self.i += 1;
        }
        (self.i > start).then(|| std::str::from_utf8(&self.s[start..self.i]).unwrap())
    }
}

/// Sets a key once: a second value for it is a TOML error, left to the `toml` crate.
fn once<T>(slot: &mut Option<T>, v: T) -> Option<()> {
    slot.is_none().then(|| *slot = Some(v))
}

/// The manifest as the `toml` crate would deserialize it, or `None` (see the module doc).
pub(super) fn read(text: &str) -> Option<RawManifest> {
    let mut c = Cursor {
        s: text.as_bytes(),
        i: 0,
    };
    let mut schema_version = None;
    let mut models: BTreeMap<String, PartModel> = BTreeMap::new();
    let mut table = Table::Top;
    loop {
        c.gaps()?;
        let Some(first) = c.peek() else { break };
        if first == b'[' {
            let array = c.eat_str("[[").is_some();
            if !array {
                c.eat(b'[')?;
            }
            c.eat_str("models.")?;
            let id = c.string()?.to_string();
            let model = models.entry(id.clone()).or_default();
            table = match (array, c.peek()?) {
                (false, b']') => {
                    if std::mem::replace(&mut model.defined, true) {
                        return None;
                    }
                    Table::Model(id)
                }
                (false, _) => {
                    c.eat_str(".sources")?;
                    if std::mem::replace(&mut model.sources_defined, true) {
                        return None;
                    }
                    Table::Sources(id)
                }
                (true, _) => {
                    c.eat_str(".files")?;
                    model.files.push(PartFile::default());
                    Table::File(id)
                }
            };
            c.eat_str(if array { "]]" } else { "]" })?;
            c.end_of_line()?;
            continue;
        }
        let key = c.key()?;
        c.spaces();
        c.eat(b'=')?;
        c.spaces();
        match (&table, key) {
            (Table::Top, "schema_version") => {
                let v = u32::try_from(c.integer()?).ok()?;
                once(&mut schema_version, v)?;
            }
            (Table::Model(id), "description") => {
                let v = c.string()?.to_string();
                once(&mut models.get_mut(id)?.description, v)?;
            }
            (Table::Model(id), "pinned") => {
                let v = c.boolean()?;
                once(&mut models.get_mut(id)?.pinned, v)?;
            }
            (Table::Sources(id), "priority") => {
                let v = c.strings()?.into_iter().map(str::to_string).collect();
                once(&mut models.get_mut(id)?.priority, v)?;
            }
            (Table::File(id), key) => {
                let f = models.get_mut(id)?.files.last_mut()?;
                match key {
                    "path" => once(&mut f.path, c.string()?.to_string())?,
                    "size" => once(&mut f.size, c.integer()?)?,
                    "sha256" => once(&mut f.sha256, c.string()?.to_string())?,
                    "chunk_size" => once(&mut f.chunk_size, c.integer()?)?,
                    "head_size" => once(&mut f.head_size, c.integer()?)?,
                    "chunks" => {
                        let v = c.strings()?.into_iter().map(|s| HexDigest(s.parse()));
                        once(&mut f.chunks, v.collect())?
                    }
                    _ => return None,
                }
            }
            _ => return None,
        }
        c.end_of_line()?;
    }
    let models = models
        .into_iter()
        .map(|(id, m)| {
            let files = m
                .files
                .into_iter()
                .map(|f| {
                    Some(RawFile {
                        path: f.path?,
                        size: f.size?,
                        sha256: f.sha256?,
                        chunk_size: f.chunk_size,
                        head_size: f.head_size,
                        chunks: f.chunks,
                    })
                })
                .collect::<Option<Vec<_>>>()?;
            let model = RawModel {
                description: m.description.unwrap_or_default(),
                pinned: m.pinned.unwrap_or_default(),
                sources: RawSources {
                    priority: m.priority.unwrap_or_default(),
                },
                files,
            };
            Some((id, model))
        })
        .collect::<Option<BTreeMap<_, _>>>()?;
    Some(RawManifest {
        schema_version: schema_version?,
        models,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    /// Wherever `read` accepts a text, it must give exactly what the `toml` crate gives.
    fn same_as_toml(text: &str) -> bool {
        let Some(fast) = read(text) else {
            return false;
        };
        let toml: RawManifest = toml::from_str(text)
            .unwrap_or_else(|e| panic!("read accepted what toml refuses ({e}):\n{text}"));
        assert_eq!(format!("{fast:?}"), format!("{toml:?}"), "{text}");
        true
    }

    fn plain() -> String {
        format!(
            "# fleet\nschema_version = 1\n\n[models.\"a@1.0.0\"]\ndescription = \"caf\u{e9} # not a comment\"\n\
             pinned = true # a comment\n[models.\"a@1.0.0\".sources]\npriority = [\"local://x\", \"https://h/p\"]\n\n\
             [[models.\"a@1.0.0\".files]]\npath = \"d/f.bin\"\nsize = 10\nsha256 = \"{D}\"\n\
             chunk_size = 4\nchunks = [\n  \"{D}\",\n  # a comment in an array\n  \"{D}\", \"nothex\",\n]\n\
             [[models.\"a@1.0.0\".files]]\nsize = 0\npath = \"e\"\nsha256 = \"{D}\"\nchunks = []\n\
             [models.\"b@1.0.0\".sources]\npriority = []\n[[models.\"b@1.0.0\".files]]\npath = \"w\"\n\
             size = 9223372036854775807\nsha256 = \"x\"\nhead_size = 0\n[models.\"b@1.0.0\"]\npinned = false\n\
             [models.\"\"]\n"
        )
    }

    #[test]
    fn accepts_the_plain_shape_exactly() {
        assert!(same_as_toml(&plain()));
        assert!(same_as_toml("schema_version = 1"));
        assert!(same_as_toml("schema_version=1\n[models.\"bad id\"]\n"));
        // What `wan manifest build` writes.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("s")).unwrap();
        std::fs::write(dir.path().join("s/x.bin"), vec![1u8; 5000]).unwrap();
        std::fs::write(dir.path().join("y"), b"").unwrap();
        let opts = crate::manifest::BuildOptions {
            id: "m@1.0.0".into(),
            chunk_size: 4096,
            head_size: None,
            sources: vec!["local://s".into(), "hf://o/r@main".into()],
            whole_only: false,
        };
        let built = crate::manifest::build(dir.path(), &opts).unwrap();
        assert!(
            same_as_toml(&format!("schema_version = 1\n{built}")),
            "{built}"
        );
    }

    /// Everything outside the subset is left to the `toml` crate, which may read it another
    /// way (`1_000`, escapes, literal strings) or refuse it with a line number.
    #[test]
    fn gives_up_outside_the_subset() {
        let p = plain();
        for odd in [
            p.replace("size = 10", "size = 1_0"),
            p.replace("size = 10", "size = 0x0a"),
            p.replace("size = 10", "size = +10"),
            p.replace("size = 10", "size = 010"),
            p.replace("size = 10", "size = 10.0"),
            p.replace("size = 10", "size = 9223372036854775808"),
            p.replace("size = 10", "size = \"10\""),
            p.replace("size = 10", "size = 10\nsize = 10"),
            p.replace("path = \"d/f.bin\"", "path = 'd/f.bin'"),
            p.replace("path = \"d/f.bin\"", "path = \"d\\u0066.bin\""),
            p.replace("path = \"d/f.bin\"", "path = \"d\tf\""),
            p.replace("path = \"d/f.bin\"", "\"path\" = \"d/f.bin\""),
            p.replace("path = \"d/f.bin\"", "path = \"\"\"d\"\"\""),
            p.replace("path = \"d/f.bin\"", ""),
            p.replace("pinned = true", "pinned = \"true\""),
            p.replace("pinned = true", "sources.priority = []"),
            p.replace("pinned = true", "pinnd = true"),
            p.replace(
                "[models.\"a@1.0.0\"]\n",
                "[models.\"a@1.0.0\"]\n[models.\"a@1.0.0\"]\n",
            ),
            p.replace("[models.\"a@1.0.0\"]", "[ models.\"a@1.0.0\" ]"),
            p.replace("[models.\"a@1.0.0\"]", "[models.'a@1.0.0']"),
            p.replace("[models.\"a@1.0.0\"]", "[models.a]"),
            p.replace("schema_version = 1", "schema_version = 4294967296"),
            p.replace("schema_version = 1", ""),
            p.replace("schema_version = 1", "schema_version = 1\ntitle = \"x\""),
            p.replace('\n', "\r\n"),
            p.replace("chunks = []", "chunks = [1]"),
            p.replace("chunks = []", "chunks = [\"a\" \"b\"]"),
            p.replace("# a comment\n", "# a \u{7f} comment\n"),
            format!("{p}[models.\"b@1.0.0\".files]\n"),
        ] {
            assert!(!same_as_toml(&odd), "{odd}");
        }
    }
}
