//! Atomic output files: write to a temporary file in the destination folder, fsync, rename.
//! A failed or interrupted run leaves no partial file and never replaces a good one.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// A file being written; it appears at its destination only on `commit`.
pub struct AtomicFile {
    temp: tempfile::NamedTempFile,
    dest: PathBuf,
}

impl AtomicFile {
    /// Creates `.<name>.<random>.tmp` next to `dest`.
    pub fn create(dest: &Path) -> io::Result<AtomicFile> {
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let temp = tempfile::Builder::new().prefix(&format!(".{name}.")).suffix(".tmp").tempfile_in(&dir)?;
        Ok(AtomicFile { temp, dest: dest.to_path_buf() })
    }

    pub fn file(&mut self) -> &mut File {
        self.temp.as_file_mut()
    }

    pub fn temp_path(&self) -> &Path {
        self.temp.path()
    }

    /// Flushes the data to disk and renames the file into place (then syncs the folder so
    /// the rename itself survives a crash).
    pub fn commit(self) -> io::Result<()> {
        self.temp.as_file().sync_all()?;
        let dest = self.dest.clone();
        self.temp.persist(&dest).map_err(|e| e.error)?;
        if let Some(dir) = dest.parent() {
            let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}
