//! Scratch directories under $TMPDIR named like the lab's namespaces, so a
//! killed run's leftovers are swept with them.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::LabError;
use crate::netns::{PREFIX, unique_stem};

/// `$TMPDIR/xlblab-PID-SEQ`, removed on drop.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// A new, empty `$TMPDIR/xlblab-PID-SEQ`.
    pub fn new() -> Result<ScratchDir, LabError> {
        ScratchDir::create(&unique_stem())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write `contents` to `name` in this directory, atomically (write a
    /// temporary file, then rename it); returns its path.
    pub fn write(&self, name: &str, contents: &str) -> Result<PathBuf, LabError> {
        let path = self.path.join(name);
        let temporary = self.path.join(format!(".{name}.tmp"));
        std::fs::write(&temporary, contents)
            .and_then(|()| std::fs::rename(&temporary, &path))
            .map_err(|source| LabError::io(format!("writing {}", path.display()), source))?;
        Ok(path)
    }

    pub fn create(stem: &str) -> Result<ScratchDir, LabError> {
        debug_assert!(stem.starts_with(PREFIX));
        let path = std::env::temp_dir().join(stem);
        std::fs::create_dir_all(&path)
            .map_err(|source| LabError::io(format!("creating {}", path.display()), source))?;
        Ok(ScratchDir { path })
    }

    pub fn create_file(&self, name: &str) -> Result<File, LabError> {
        let path = self.path.join(name);
        File::create(&path)
            .map_err(|source| LabError::io(format!("creating {}", path.display()), source))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
