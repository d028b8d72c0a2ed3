//! The list of a streamed split's images: where each one's bytes are (a file of an image
//! folder, or a member of a tar shard) and its label. Indexing reads directories and tar
//! headers, never pixels; the result is cached beside the data (`.layerwise-index-SPLIT`)
//! with a stamp of what it was made from (directory and shard times and sizes), and made
//! again when the stamp no longer matches.

use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::{DataError, Result};

/// Largest image file (or shard member) read, in bytes.
pub const MAX_IMAGE_FILE: u64 = 64 << 20;
/// Most images in one split.
pub const MAX_IMAGES: usize = 1 << 31;

/// Where the bytes of a split's images live.
#[derive(Debug, Clone, PartialEq)]
pub enum Layout {
    /// `dir/<class>/<file>`: an entry's name is `<class>/<file>`.
    Folder(PathBuf),
    /// Tar shards, in order: an entry's name is its member's name.
    Shards(Vec<PathBuf>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Entry {
    label: u32,
    file: u32,
    offset: u64,
    len: u64,
    name: (u32, u32),
}

/// A split's images, in a fixed order: by class then file name for a folder, shard by
/// shard in member order for shards.
#[derive(Debug, Clone, PartialEq)]
pub struct Index {
    pub layout: Layout,
    pub classes: Vec<String>,
    entries: Vec<Entry>,
    names: String,
    /// What indexing skipped (with `data.skip_bad`), one line each.
    pub skipped: Vec<String>,
}

impl Index {
    pub fn new(layout: Layout, classes: Vec<String>) -> Self {
        Self { layout, classes, entries: Vec::new(), names: String::new(), skipped: Vec::new() }
    }

    pub fn push(&mut self, label: u32, file: u32, offset: u64, len: u64, name: &str) -> Result<()> {
        if self.entries.len() >= MAX_IMAGES || self.names.len() + name.len() > u32::MAX as usize {
            return Err(DataError::Config(format!("more than {MAX_IMAGES} images in one split")));
        }
        self.entries.push(Entry { label, file, offset, len, name: (self.names.len() as u32, name.len() as u32) });
        self.names.push_str(name);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn label(&self, i: usize) -> i64 {
        self.entries[i].label as i64
    }

    pub fn name(&self, i: usize) -> &str {
        let (at, len) = self.entries[i].name;
        &self.names[at as usize..(at + len) as usize]
    }

    /// The image, for messages: its file, or its shard and member.
    pub fn describe(&self, i: usize) -> String {
        match &self.layout {
            Layout::Folder(dir) => dir.join(self.name(i)).display().to_string(),
            Layout::Shards(files) => {
                format!("{}: member {}", files[self.entries[i].file as usize].display(), self.name(i))
            }
        }
    }

    /// Runs of consecutive images in one file (shards) or one class (folders): the units a
    /// shuffle buffer reads in a shuffled order.
    pub fn groups(&self) -> Vec<Range<usize>> {
        let key = |e: &Entry| match self.layout {
            Layout::Folder(_) => e.label,
            Layout::Shards(_) => e.file,
        };
        let mut groups: Vec<Range<usize>> = Vec::new();
        for (i, e) in self.entries.iter().enumerate() {
            match groups.last_mut() {
                Some(g) if key(&self.entries[g.start]) == key(e) => g.end = i + 1,
                _ => groups.push(i..i + 1),
            }
        }
        groups
    }

    /// The bytes of image `i`. The error names the file (or shard and member).
    pub fn read(&self, i: usize) -> std::result::Result<Vec<u8>, String> {
        let e = self.entries[i];
        let fail = |what: String| format!("{}: {what}", self.describe(i));
        match &self.layout {
            Layout::Folder(dir) => {
                let path = dir.join(self.name(i));
                let file = std::fs::File::open(&path).map_err(|e| fail(format!("cannot read: {e}")))?;
                let len = file.metadata().map_err(|e| fail(format!("cannot read: {e}")))?.len();
                if len > MAX_IMAGE_FILE {
                    return Err(fail(format!("{len} bytes: expected an image file of at most {MAX_IMAGE_FILE}")));
                }
                let mut bytes = vec![0; len as usize];
                file.read_exact_at(&mut bytes, 0).map_err(|e| fail(format!("cannot read {len} bytes: {e}")))?;
                Ok(bytes)
            }
            Layout::Shards(files) => {
                let shard = &files[e.file as usize];
                let file = std::fs::File::open(shard).map_err(|e| fail(format!("cannot read: {e}")))?;
                let mut bytes = vec![0; e.len as usize];
                file.read_exact_at(&mut bytes, e.offset)
                    .map_err(|err| fail(format!("cannot read {} bytes at byte {}: {err}", e.len, e.offset)))?;
                Ok(bytes)
            }
        }
    }

    /// The cache's text: a header, the classes, the shards, then one line per image.
    pub fn to_text(&self, stamp: u64) -> Option<String> {
        use std::fmt::Write;
        let files: Vec<String> = match &self.layout {
            Layout::Folder(_) => vec![],
            Layout::Shards(f) => f.iter().map(|p| p.file_name().unwrap_or_default().to_string_lossy().into()).collect(),
        };
        let sections = [("classes", &self.classes), ("files", &files), ("skipped", &self.skipped)];
        if sections.iter().any(|(_, l)| l.iter().any(|l| l.contains(['\n', '\t']))) || self.names.contains(['\n', '\t'])
        {
            return None; // names a line-based cache cannot hold: index again each time
        }
        // writing to a String cannot fail
        let mut out = format!("layerwise-index 1\nstamp {stamp:016x}\n");
        for (key, lines) in sections {
            let _ = writeln!(out, "{key} {}", lines.len());
            for line in lines {
                let _ = writeln!(out, "{line}");
            }
        }
        let _ = writeln!(out, "entries {}", self.entries.len());
        for (i, e) in self.entries.iter().enumerate() {
            let _ = writeln!(out, "{}\t{}\t{}\t{}\t{}", e.label, e.file, e.offset, e.len, self.name(i));
        }
        Some(out)
    }

    /// Reads a cache written by [`Index::to_text`] for `dir` if its stamp is `stamp`; any
    /// line out of place or out of range makes it unusable (None), never trusted.
    pub fn from_text(text: &str, stamp: u64, dir: &Path, shards: bool) -> Option<Index> {
        let mut lines = text.lines();
        if lines.next()? != "layerwise-index 1" {
            return None;
        }
        if u64::from_str_radix(lines.next()?.strip_prefix("stamp ")?, 16).ok()? != stamp {
            return None;
        }
        let k = count(&mut lines, "classes ")?;
        let classes: Vec<String> = (&mut lines).take(k).map(str::to_string).collect();
        let f = count(&mut lines, "files ")?;
        let files: Vec<PathBuf> = (&mut lines).take(f).map(|n| dir.join(n)).collect();
        let s = count(&mut lines, "skipped ")?;
        let skipped: Vec<String> = (&mut lines).take(s).map(str::to_string).collect();
        let n = count(&mut lines, "entries ")?;
        if classes.len() != k || files.len() != f || skipped.len() != s || n > MAX_IMAGES || shards != (f > 0) {
            return None;
        }
        let sizes: Vec<u64> =
            files.iter().map(|p| std::fs::metadata(p).map(|m| m.len())).collect::<std::io::Result<_>>().ok()?;
        let layout = if shards { Layout::Shards(files) } else { Layout::Folder(dir.to_path_buf()) };
        let mut index = Index { skipped, ..Index::new(layout, classes) };
        for line in lines {
            let mut parts = line.splitn(5, '\t');
            let mut num = || parts.next()?.parse::<u64>().ok();
            let (label, file, offset, len) = (num()?, num()?, num()?, num()?);
            let name = parts.next()?;
            let fits = offset.checked_add(len).zip(sizes.get(file as usize)).is_some_and(|(end, size)| end <= *size);
            if label >= k as u64 || len > MAX_IMAGE_FILE || (shards && !fits) || (!shards && file != 0) {
                return None;
            }
            // a folder's image is `<its class>/<file name>`: nothing else is opened
            let in_class = |n: &str| {
                n.split_once('/')
                    .is_some_and(|(c, f)| c == index.classes[label as usize] && crate::system::is_file_name(f))
            };
            if !shards && !in_class(name) {
                return None;
            }
            index.push(label as u32, file as u32, offset, len, name).ok()?;
        }
        (index.len() == n).then_some(index)
    }
}

fn count(lines: &mut std::str::Lines<'_>, key: &str) -> Option<usize> {
    lines.next()?.strip_prefix(key)?.parse().ok()
}

/// FNV-1a over what the index was made from.
#[derive(Debug, Clone, Copy)]
pub struct Stamp(pub u64);

impl Stamp {
    pub fn new() -> Self {
        Stamp(0xcbf2_9ce4_8422_2325)
    }

    pub fn bytes(mut self, bytes: &[u8]) -> Self {
        for b in bytes {
            self.0 = (self.0 ^ *b as u64).wrapping_mul(0x100_0000_01b3);
        }
        self
    }

    /// A file's or folder's name, size and modification time.
    pub fn add_file(self, path: &Path) -> Result<Self> {
        let m = std::fs::metadata(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
        let name = path.file_name().unwrap_or_default().as_encoded_bytes();
        Ok(self
            .bytes(name)
            .bytes(&m.len().to_le_bytes())
            .bytes(&m.mtime().to_le_bytes())
            .bytes(&m.mtime_nsec().to_le_bytes()))
    }
}

impl Default for Stamp {
    fn default() -> Self {
        Self::new()
    }
}

/// The cached index of `dir` when it is current, else `build()`'s, cached for next time
/// (a data folder we may not write to is indexed again each run).
pub fn cached(dir: &Path, stamp: Stamp, shards: bool, build: impl FnOnce() -> Result<Index>) -> Result<Index> {
    let split = dir.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let cache = dir.parent().unwrap_or(dir).join(format!(".layerwise-index-{split}"));
    if let Ok(text) = std::fs::read_to_string(&cache) {
        if let Some(index) = Index::from_text(&text, stamp.0, dir, shards) {
            return Ok(index);
        }
    }
    let index = build()?;
    if let Some(text) = index.to_text(stamp.0) {
        // best effort: a folder we may not write to is indexed again on each start
        let _ = crate::atomic::write_atomic(&cache, text.as_bytes());
    }
    Ok(index)
}
