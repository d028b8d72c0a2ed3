//! Tar shards in the WebDataset layout: `split/*.tar` in name order, each holding samples
//! as consecutive members `KEY.jpg` (or `.jpeg`, `.png`) and `KEY.cls` (the class number
//! as text); other members are ignored. Indexing reads the tar headers and the `.cls`
//! members and seeks past the images; an image is later read by offset.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::index::{self, Index, Layout, Stamp, MAX_IMAGE_FILE};
use crate::{DataError, Result};

/// Most classes a shard set may number.
pub const MAX_CLASSES: u32 = 1 << 16;

/// The `.tar` files of `dir`, in name order.
pub fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|source| DataError::Io { path: dir.to_path_buf(), source })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "tar") && p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(DataError::file(dir, "no .tar shards: expected shard-000000.tar ... in the WebDataset layout"));
    }
    Ok(files)
}

/// The index of the shards in `dir`; labels must be below `classes` where given (an
/// evaluation split), else the classes are 0 to the largest label.
pub fn index(dir: &Path, classes: Option<usize>, skip_bad: bool) -> Result<Index> {
    let files = list(dir)?;
    let mut stamp = Stamp::new().bytes(&[skip_bad as u8]).bytes(&classes.unwrap_or(0).to_le_bytes());
    for f in &files {
        stamp = stamp.add_file(f)?;
    }
    index::cached(dir, stamp, true, || build(files, classes, skip_bad))
}

/// One sample being read: its key, image member (offset, length, name) and label.
#[derive(Default)]
struct Sample {
    key: String,
    image: Option<(u64, u64, String)>,
    label: Option<u32>,
}

fn build(files: Vec<PathBuf>, classes: Option<usize>, skip_bad: bool) -> Result<Index> {
    let mut index = Index::new(Layout::Shards(files.clone()), vec![]);
    let mut bad = |index: &mut Index, what: String| {
        if skip_bad {
            index.skipped.push(what);
            Ok(())
        } else {
            Err(DataError::Config(format!("{what} (data.skip_bad skips such samples)")))
        }
    };
    for (f, path) in files.iter().enumerate() {
        let mut sample = Sample::default();
        let io = |source| DataError::Io { path: path.clone(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        let mut archive = tar::Archive::new(file);
        let mut members = archive.entries_with_seek().map_err(io)?;
        loop {
            let member = match members.next() {
                None => break,
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    let after =
                        if sample.key.is_empty() { "at its start".into() } else { format!("after {}", sample.key) };
                    bad(&mut index, format!("{}: damaged {after}: {e}", path.display()))?;
                    break;
                }
            };
            if !member.header().entry_type().is_file() {
                continue;
            }
            let name = member.path().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
            let (offset, len) = (member.raw_file_position(), member.size());
            if offset.checked_add(len).is_none_or(|end| end > size) {
                bad(
                    &mut index,
                    format!(
                        "{}: cut short: member {name} needs bytes to {offset} + {len}, the file has {size}",
                        path.display()
                    ),
                )?;
                break;
            }
            let (key, ext) = split_name(&name);
            if key != sample.key {
                finish(&mut index, std::mem::take(&mut sample), f, path, &mut bad)?;
                sample.key = key.to_string();
            }
            match ext.to_ascii_lowercase().as_str() {
                "jpg" | "jpeg" | "png" if len <= MAX_IMAGE_FILE => sample.image = Some((offset, len, name)),
                "jpg" | "jpeg" | "png" => bad(
                    &mut index,
                    format!("{}: member {name}: {len} bytes, expected at most {MAX_IMAGE_FILE}", path.display()),
                )?,
                "cls" => match read_label(member) {
                    Ok(l) => sample.label = Some(l),
                    Err(e) => bad(&mut index, format!("{}: member {name}: {e}", path.display()))?,
                },
                _ => {}
            }
        }
        finish(&mut index, sample, f, path, &mut bad)?;
    }
    let labels_end = (0..index.len()).map(|i| index.label(i) + 1).max().unwrap_or(0) as usize;
    let k = classes.unwrap_or(labels_end);
    if let Some(i) = (0..index.len()).find(|&i| index.label(i) as usize >= k) {
        return Err(DataError::Config(format!(
            "{}: class {} is not among the {k} training classes",
            index.describe(i),
            index.label(i)
        )));
    }
    index.classes = (0..k).map(|c| c.to_string()).collect();
    Ok(index)
}

/// `dir/KEY.ext.more` -> (`dir/KEY`, `ext.more`): WebDataset's key is everything before the
/// first dot of the base name.
fn split_name(name: &str) -> (&str, &str) {
    let base = name.rfind('/').map_or(0, |i| i + 1);
    match name[base..].find('.') {
        Some(dot) => (&name[..base + dot], &name[base + dot + 1..]),
        None => (name, ""),
    }
}

fn read_label(member: impl Read) -> std::result::Result<u32, String> {
    let mut text = String::new();
    member.take(32).read_to_string(&mut text).map_err(|e| format!("cannot read the class: {e}"))?;
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|l| *l < MAX_CLASSES)
        .ok_or_else(|| format!("class {:?}: expected a number below {MAX_CLASSES}", text.trim()))
}

fn finish(
    index: &mut Index,
    sample: Sample,
    file: usize,
    path: &Path,
    bad: &mut impl FnMut(&mut Index, String) -> Result<()>,
) -> Result<()> {
    match (sample.image, sample.label) {
        (Some((offset, len, name)), Some(label)) => index.push(label, file as u32, offset, len, &name),
        (None, None) => Ok(()),
        (None, Some(_)) => {
            bad(index, format!("{}: sample {} has a .cls but no .jpg or .png", path.display(), sample.key))
        }
        (Some(_), None) => bad(index, format!("{}: sample {} has an image but no .cls", path.display(), sample.key)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_name_up_to_the_first_dot_of_the_base_name() {
        assert_eq!(split_name("a/b.c/n01.x.jpg"), ("a/b.c/n01", "x.jpg"));
        assert_eq!(split_name("k.cls"), ("k", "cls"));
        assert_eq!(split_name("plain"), ("plain", ""));
    }
}
