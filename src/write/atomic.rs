//! Atomic output files: write to a temporary file in the destination folder, fsync, rename.
//! A failed or interrupted run leaves no partial file and never replaces a good one.
//!
//! On Linux the temporary file is anonymous (`O_TMPFILE`): it has no name until `commit`
//! links it into the folder and renames it over the destination, so even a SIGKILL or a
//! power cut mid-write leaves nothing behind. Where the file system cannot do that, a named
//! `.<name>.<random>.tmp` is used instead.
//!
//! Every live temporary file is listed in a process-wide registry. A program that installs
//! [`remove_temporaries_on_signal`] gets them deleted when it is interrupted (SIGINT,
//! SIGTERM, SIGHUP): the handler removes them and exits with 128 + the signal number.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// A live temporary file: its name on disk (none while anonymous) and its destination.
struct LiveEntry {
    named: Option<PathBuf>,
    dest: PathBuf,
}

/// Live temporary files by id.
static LIVE: Mutex<Option<HashMap<u64, LiveEntry>>> = Mutex::new(None);
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// Whether `a` and `b` name one existing file (same device and inode: also through a
/// symlink or a hard link). False when either cannot be looked up (the caller's next step
/// reports why).
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Creates the folders above `dest` that do not exist yet (as `mkdir -p`).
pub fn create_parent_dirs(dest: &Path) -> io::Result<()> {
    match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() && !p.is_dir() => std::fs::create_dir_all(p),
        _ => Ok(()),
    }
}

fn live() -> MutexGuard<'static, Option<HashMap<u64, LiveEntry>>> {
    // A panic while the lock was held cannot leave the map half-updated: keep using it.
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The named temporary files that exist right now (what an interrupt would remove;
/// anonymous ones vanish with the process by themselves).
pub fn live_temporaries() -> Vec<PathBuf> {
    live().as_ref().map(|m| m.values().filter_map(|e| e.named.clone()).collect()).unwrap_or_default()
}

/// Removes every registered temporary file whose destination passes `which`; returns those
/// destinations. Holding the registry lock while removing means a concurrent `commit`
/// either finished (its file is in place, complete) or has not started its rename (it never
/// will: the caller exits).
fn remove_live_temporaries(
    which: impl Fn(&Path) -> bool,
) -> (MutexGuard<'static, Option<HashMap<u64, LiveEntry>>>, Vec<PathBuf>) {
    let mut guard = live();
    let mut dests = Vec::new();
    if let Some(map) = guard.as_mut() {
        map.retain(|_, entry| {
            if !which(&entry.dest) {
                return true;
            }
            if let Some(named) = &entry.named {
                let _ = std::fs::remove_file(named);
            }
            dests.push(entry.dest.clone());
            false
        });
    }
    (guard, dests)
}

/// An interrupting signal, after every live temporary file was removed.
#[derive(Debug)]
pub struct Interrupted {
    /// The signal number (SIGINT 2, SIGTERM 15, SIGHUP 1).
    pub signal: i32,
    pub name: &'static str,
    /// The destinations whose unfinished outputs were removed (each left as it was).
    pub left_as_they_were: Vec<PathBuf>,
}

/// Installs handlers for SIGINT, SIGTERM and SIGHUP that remove every live temporary file
/// and then call `on_signal`, which must end the process (the CLI prints one line and exits
/// with 128 + the signal number). The registry stays locked while it runs, so no commit can
/// start after the signal. SIGXFSZ (a file-size limit reached) is ignored, so the write fails
/// with an error instead of killing the process and leaving its temporary file behind. Call
/// once, early in `main`.
pub fn remove_temporaries_on_signal(on_signal: impl Fn(Interrupted) + Send + 'static) -> io::Result<()> {
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
            let (_guard, dests) = remove_live_temporaries(|_| true);
            on_signal(Interrupted { signal: sig, name, left_as_they_were: dests });
        }
    })?;
    Ok(())
}

/// Whether temporary files in `dir` can be anonymous (no name on disk until committed).
pub fn anonymous_supported(dir: &Path) -> bool {
    open_anonymous(dir).is_some()
}

/// An unnamed file in `dir` (Linux `O_TMPFILE`), when the file system supports it and
/// `/proc` is there to give it a name later.
#[cfg(target_os = "linux")]
fn open_anonymous(dir: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    if !Path::new("/proc/self/fd").is_dir() {
        return None;
    }
    std::fs::OpenOptions::new().read(true).write(true).mode(0o666).custom_flags(libc::O_TMPFILE).open(dir).ok()
}

#[cfg(not(target_os = "linux"))]
fn open_anonymous(_dir: &Path) -> Option<File> {
    None
}

/// The temporary file behind an [`AtomicFile`].
enum Temp {
    Anonymous(File),
    Named(tempfile::NamedTempFile),
}

impl Temp {
    fn file(&self) -> &File {
        match self {
            Temp::Anonymous(f) => f,
            Temp::Named(t) => t.as_file(),
        }
    }
}

/// A file being written; it appears at its destination only on `commit`.
pub struct AtomicFile {
    temp: Option<Temp>,
    id: u64,
    dir: PathBuf,
    dest: PathBuf,
}

impl AtomicFile {
    /// Creates an anonymous temporary file in `dest`'s folder (a named `.<name>.<random>.tmp`
    /// where the file system cannot).
    pub fn create(dest: &Path) -> io::Result<AtomicFile> {
        AtomicFile::create_with(dest, true)
    }

    fn create_with(dest: &Path, try_anonymous: bool) -> io::Result<AtomicFile> {
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // Registered under the lock that an interrupt takes, so no temporary escapes it.
        let mut guard = live();
        let (temp, named) = match try_anonymous.then(|| open_anonymous(&dir)).flatten() {
            Some(f) => (Temp::Anonymous(f), None),
            None => {
                let t = temp_builder(&temp_prefix(dest)).tempfile_in(&dir)?;
                let path = t.path().to_path_buf();
                (Temp::Named(t), Some(path))
            }
        };
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        guard.get_or_insert_with(HashMap::new).insert(id, LiveEntry { named, dest: dest.to_path_buf() });
        Ok(AtomicFile { temp: Some(temp), id, dir, dest: dest.to_path_buf() })
    }

    pub fn file(&mut self) -> &mut File {
        match self.temp.as_mut().expect("temporary file exists until commit") {
            Temp::Anonymous(f) => f,
            Temp::Named(t) => t.as_file_mut(),
        }
    }

    /// Reserves disk space for `len` bytes up front (`fallocate`): a full disk fails here,
    /// before anything is written, and the file system maps the file's blocks once instead
    /// of page by page as it grows (a conversion spends much of its time there). A file
    /// system that cannot reserve space is not an error.
    pub fn reserve(&mut self, len: u64) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let Ok(len) = i64::try_from(len) else { return Ok(()) };
            if len == 0 {
                return Ok(());
            }
            // SAFETY: an open descriptor and plain integers.
            if unsafe { libc::fallocate(self.file().as_raw_fd(), 0, 0, len) } != 0 {
                let err = io::Error::last_os_error();
                return match err.raw_os_error() {
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => Ok(()),
                    _ => Err(err),
                };
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = len;
        Ok(())
    }

    /// A path that opens the file being written, to read it back before it is committed
    /// (`/proc/self/fd/N` while it is anonymous).
    pub fn read_path(&self) -> PathBuf {
        match self.temp.as_ref().expect("temporary file exists until commit") {
            Temp::Anonymous(f) => {
                use std::os::fd::AsRawFd;
                PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()))
            }
            Temp::Named(t) => t.path().to_path_buf(),
        }
    }

    /// Flushes the data to disk and moves the file into place (then syncs the folder so the
    /// rename itself survives a crash).
    pub fn commit(mut self) -> io::Result<()> {
        let temp = self.temp.take().expect("temporary file exists until commit");
        temp.file().sync_all()?;
        {
            let mut guard = live();
            // Still registered: no interrupt has removed it.
            let registered = guard.as_mut().and_then(|m| m.remove(&self.id)).is_some();
            if !registered {
                return Err(io::Error::other("interrupted: the temporary file was removed"));
            }
            match temp {
                Temp::Named(t) => {
                    if let Err(e) = t.persist(&self.dest) {
                        // Dropping `e.file` removes the temporary.
                        drop(e.file);
                        return Err(e.error);
                    }
                }
                Temp::Anonymous(f) => {
                    // Give the inode a (random, hidden) name, then rename that over `dest`;
                    // if the rename fails the name is removed again.
                    let prefix = temp_prefix(&self.dest);
                    let linked = temp_builder(&prefix).make_in(&self.dir, |path| link_fd(&f, path))?;
                    linked.persist(&self.dest).map_err(|e| e.error)?;
                }
            }
        }
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

fn temp_prefix(dest: &Path) -> String {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    format!(".{name}.")
}

/// Names `<prefix><random>.tmp`; files created with the usual permissions (0666 less the
/// umask), not tempfile's 0600.
fn temp_builder(prefix: &str) -> tempfile::Builder<'_, 'static> {
    use std::os::unix::fs::PermissionsExt;
    let mut b = tempfile::Builder::new();
    b.prefix(prefix).suffix(".tmp").permissions(std::fs::Permissions::from_mode(0o666));
    b
}

/// Gives an anonymous file a name (`linkat` through `/proc/self/fd`, which needs no
/// privilege, unlike `AT_EMPTY_PATH`).
#[cfg(target_os = "linux")]
fn link_fd(file: &File, path: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let from = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())).map_err(io::Error::other)?;
    let to = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: two NUL-terminated paths that outlive the call.
    let r =
        unsafe { libc::linkat(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::AT_SYMLINK_FOLLOW) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn link_fd(_file: &File, _path: &Path) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if let Some(temp) = self.temp.take() {
            // Unregister and remove under the lock (dropping a named temporary removes it;
            // an anonymous one is freed when closed).
            let mut guard = live();
            if let Some(m) = guard.as_mut() {
                m.remove(&self.id);
            }
            drop(temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn others(dir: &Path, dest: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p != dest)
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    /// Both kinds of temporary: anonymous (where supported) and named.
    fn kinds(dir: &Path) -> Vec<bool> {
        if anonymous_supported(dir) {
            vec![true, false]
        } else {
            eprintln!("O_TMPFILE is not supported in {}: testing named temporaries only", dir.display());
            vec![false]
        }
    }

    #[test]
    fn registered_while_live_and_gone_after_commit_or_drop() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.pth");
        for anonymous in kinds(dir.path()) {
            let mut a = AtomicFile::create_with(&dest, anonymous).unwrap();
            let id = a.id;
            assert!(live().as_ref().unwrap().contains_key(&id));
            // A named temporary is visible in the folder; an anonymous one is not.
            assert_eq!(others(dir.path(), &dest).len(), if anonymous { 0 } else { 1 }, "anonymous: {anonymous}");
            a.file().write_all(b"new").unwrap();
            assert_eq!(std::fs::read(a.read_path()).unwrap(), b"new");
            a.commit().unwrap();
            assert!(!live().as_ref().unwrap().contains_key(&id));
            assert_eq!(std::fs::read(&dest).unwrap(), b"new");
            let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&dest).unwrap().permissions());
            assert_ne!(mode & 0o044, 0, "the output is readable by others as umask allows, not 0600 ({mode:o})");

            let b = AtomicFile::create_with(&dest, anonymous).unwrap();
            let id = b.id;
            drop(b);
            assert!(!live().as_ref().unwrap().contains_key(&id));
            assert!(others(dir.path(), &dest).is_empty());
            assert_eq!(std::fs::read(&dest).unwrap(), b"new");
            std::fs::remove_file(&dest).unwrap();
        }
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
        for anonymous in kinds(dir.path()) {
            for fail_after in [0usize, 1, 100, 4096, 50_000] {
                let mut a = AtomicFile::create_with(&dest, anonymous).unwrap();
                let file = a.file().try_clone().unwrap();
                let mut w = FullAfter { inner: file, left: fail_after };
                let r = w.write_all(&vec![7u8; 100_000]);
                assert!(r.is_err(), "the writer must fail after {fail_after} bytes");
                drop(a); // the caller's error path: the file is never committed
                assert_eq!(std::fs::read(&dest).unwrap(), b"previous good file");
                assert!(others(dir.path(), &dest).is_empty(), "{:?}", others(dir.path(), &dest));
            }
        }
    }

    #[test]
    fn interrupt_cleanup_removes_live_temporaries_and_blocks_their_commit() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x.pth");
        std::fs::write(&dest, b"old").unwrap();
        for anonymous in kinds(dir.path()) {
            let mut a = AtomicFile::create_with(&dest, anonymous).unwrap();
            a.file().write_all(b"half").unwrap();
            let (guard, dests) = remove_live_temporaries(|d| d.starts_with(dir.path()));
            drop(guard);
            assert!(dests.contains(&dest));
            assert!(others(dir.path(), &dest).is_empty(), "{:?}", others(dir.path(), &dest));
            // A commit after the cleanup fails instead of renaming anything.
            assert!(a.commit().is_err());
            assert_eq!(std::fs::read(&dest).unwrap(), b"old");
            assert!(others(dir.path(), &dest).is_empty());
        }
    }
}
