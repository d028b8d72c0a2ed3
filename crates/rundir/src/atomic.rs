//! Writing a file whole or not at all.

use std::path::Path;

use crate::{Error, Result};

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one
/// (`layerwise_data::atomic::write_atomic`, its error naming the file that failed).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    layerwise_data::atomic::write_atomic(path, bytes).map_err(|(file, e)| Error::io(&file, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file planted under the temporary name an older version used (a link to a victim
    /// file) is neither written through nor followed: the temporary name is fresh and
    /// created exclusively, and none is left behind.
    #[test]
    fn an_atomic_write_never_writes_through_a_planted_link() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep me").unwrap();
        let target = dir.path().join("x.json");
        for planted in ["x.json.tmp", ".x.json.tmp"] {
            std::os::unix::fs::symlink(&victim, dir.path().join(planted)).unwrap();
        }
        write_atomic(&target, b"{}").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"{}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
        let mut left: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        left.sort();
        assert_eq!(left, [".x.json.tmp", "victim", "x.json", "x.json.tmp"]);
    }
}
