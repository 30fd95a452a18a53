//! Atomic output files: write to a temporary file in the destination folder, fsync, rename.
//! A failed or interrupted run leaves no partial file and never replaces a good one.
//!
//! Every live temporary file is listed in a process-wide registry. A program that installs
//! [`remove_temporaries_on_signal`] gets them deleted when it is interrupted (SIGINT,
//! SIGTERM, SIGHUP): the handler removes them and exits with 128 + the signal number.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// Live temporary files: temporary path → destination.
static LIVE: Mutex<Option<HashMap<PathBuf, PathBuf>>> = Mutex::new(None);

fn live() -> MutexGuard<'static, Option<HashMap<PathBuf, PathBuf>>> {
    // A panic while the lock was held cannot leave the map half-updated: keep using it.
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The temporary files that exist right now (what an interrupt would remove).
pub fn live_temporaries() -> Vec<PathBuf> {
    live().as_ref().map(|m| m.keys().cloned().collect()).unwrap_or_default()
}

/// Removes every registered temporary file; returns the destinations they were for.
/// Holding the registry lock while removing means a concurrent `commit` either finished
/// (its file is in place, complete) or has not started its rename (it never will: the
/// caller exits).
fn remove_live_temporaries(
    which: impl Fn(&Path) -> bool,
) -> (MutexGuard<'static, Option<HashMap<PathBuf, PathBuf>>>, Vec<PathBuf>) {
    let mut guard = live();
    let mut dests = Vec::new();
    if let Some(map) = guard.as_mut() {
        map.retain(|temp, dest| {
            if !which(temp) {
                return true;
            }
            let _ = std::fs::remove_file(temp);
            dests.push(dest.clone());
            false
        });
    }
    (guard, dests)
}

/// Installs handlers for SIGINT, SIGTERM and SIGHUP that remove every live temporary file,
/// print one line on stderr and exit with 128 + the signal number (130, 143, 129). SIGXFSZ
/// (a file-size limit reached) is ignored, so the write fails with an error instead of
/// killing the process and leaving its temporary file behind. Call once, early in `main`.
pub fn remove_temporaries_on_signal() -> io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGXFSZ};
    // With a handler registered, the kernel no longer kills the process on SIGXFSZ; the
    // write that crossed the limit returns EFBIG.
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP, SIGXFSZ])?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        for sig in signals.forever() {
            if sig == SIGXFSZ {
                continue;
            }
            let name = match sig {
                SIGINT => "SIGINT",
                SIGTERM => "SIGTERM",
                _ => "SIGHUP",
            };
            // Keep the registry locked until exit, so no commit can start after this.
            let (_guard, dests) = remove_live_temporaries(|_| true);
            let what = match dests.as_slice() {
                [] => String::new(),
                [one] => format!("; {} left as it was", one.display()),
                many => format!("; {} outputs left as they were", many.len()),
            };
            eprintln!("error: interrupted by {name}{what}");
            std::process::exit(128 + sig);
        }
    })?;
    Ok(())
}

/// A file being written; it appears at its destination only on `commit`.
pub struct AtomicFile {
    temp: Option<tempfile::NamedTempFile>,
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
        // Registered under the lock that an interrupt takes, so no temporary escapes it.
        let mut guard = live();
        let temp = tempfile::Builder::new().prefix(&format!(".{name}.")).suffix(".tmp").tempfile_in(&dir)?;
        guard.get_or_insert_with(HashMap::new).insert(temp.path().to_path_buf(), dest.to_path_buf());
        Ok(AtomicFile { temp: Some(temp), dest: dest.to_path_buf() })
    }

    pub fn file(&mut self) -> &mut File {
        self.temp.as_mut().expect("temporary file exists until commit").as_file_mut()
    }

    pub fn temp_path(&self) -> &Path {
        self.temp.as_ref().expect("temporary file exists until commit").path()
    }

    /// Flushes the data to disk and renames the file into place (then syncs the folder so
    /// the rename itself survives a crash).
    pub fn commit(mut self) -> io::Result<()> {
        let temp = self.temp.take().expect("temporary file exists until commit");
        temp.as_file().sync_all()?;
        let dest = self.dest.clone();
        {
            let mut guard = live();
            let path = temp.path().to_path_buf();
            // Still registered: no interrupt has removed it.
            let registered = guard.as_mut().and_then(|m| m.remove(&path)).is_some();
            if !registered {
                return Err(io::Error::other("interrupted: the temporary file was removed"));
            }
            if let Err(e) = temp.persist(&dest) {
                // Put it back: it is still ours to remove (dropping `e.file` removes it).
                drop(e.file);
                return Err(e.error);
            }
        }
        if let Some(dir) = dest.parent() {
            let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if let Some(temp) = self.temp.take() {
            // Unregister and remove under the lock (NamedTempFile's drop removes the file).
            let mut guard = live();
            if let Some(m) = guard.as_mut() {
                m.remove(temp.path());
            }
            drop(temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn registered_while_live_and_gone_after_commit_or_drop() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.pth");
        let mut a = AtomicFile::create(&dest).unwrap();
        let temp = a.temp_path().to_path_buf();
        assert!(live_temporaries().contains(&temp));
        a.file().write_all(b"new").unwrap();
        a.commit().unwrap();
        assert!(!live_temporaries().contains(&temp));
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");

        let b = AtomicFile::create(&dest).unwrap();
        let temp = b.temp_path().to_path_buf();
        drop(b);
        assert!(!live_temporaries().contains(&temp));
        assert!(leftovers(dir.path()).is_empty());
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
    }

    /// A writer that fails with "no space left" after `left` bytes, like a full disk.
    struct FullAfter<W> {
        inner: W,
        left: usize,
    }

    impl<W: Write> Write for FullAfter<W> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.left == 0 {
                return Err(io::Error::from_raw_os_error(28)); // ENOSPC
            }
            let n = buf.len().min(self.left);
            let n = self.inner.write(&buf[..n])?;
            self.left -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.inner.flush()
        }
    }

    #[test]
    fn a_write_that_fails_midway_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("keep.pth");
        std::fs::write(&dest, b"previous good file").unwrap();
        for fail_after in [0usize, 1, 100, 4096, 50_000] {
            let mut a = AtomicFile::create(&dest).unwrap();
            let file = a.file().try_clone().unwrap();
            let mut w = FullAfter { inner: file, left: fail_after };
            let r = w.write_all(&vec![7u8; 100_000]);
            assert!(r.is_err(), "the writer must fail after {fail_after} bytes");
            drop(a); // the caller's error path: the file is never committed
            assert_eq!(std::fs::read(&dest).unwrap(), b"previous good file");
            assert!(leftovers(dir.path()).is_empty(), "{:?}", leftovers(dir.path()));
        }
    }

    #[test]
    fn interrupt_cleanup_removes_live_temporaries_and_blocks_their_commit() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x.pth");
        std::fs::write(&dest, b"old").unwrap();
        let mut a = AtomicFile::create(&dest).unwrap();
        a.file().write_all(b"half").unwrap();
        let temp = a.temp_path().to_path_buf();
        let (guard, dests) = remove_live_temporaries(|t| t.starts_with(dir.path()));
        drop(guard);
        assert!(dests.contains(&dest));
        assert!(!temp.exists());
        // A commit after the cleanup fails instead of renaming anything.
        assert!(a.commit().is_err());
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
    }
}
