//! Writing a file front to back with positioned writes: bytes from memory, ranges of other
//! files copied inside the kernel (`copy_file_range`), and writeback to disk started while
//! the file grows, so that copying and disk writes overlap instead of following each other.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// How many written bytes to let accumulate before asking the kernel to write them out.
const WRITEBACK_STEP: u64 = 32 << 20;

/// A file being written sequentially from `pos`.
pub struct OutFile<'f> {
    file: &'f File,
    pos: u64,
    written_back: u64,
}

/// Where a conversion appends a tensor's bytes (a zip entry, a plain file): besides plain
/// writes, copies that stay inside the kernel.
pub trait TensorSink: Write {
    /// Where the next byte goes in the output file.
    fn position(&self) -> u64;
    /// Appends `len` bytes at `offset` of `src`; `crc` is their CRC-32 when known.
    fn copy_from(&mut self, src: &File, offset: u64, len: u64, crc: Option<u32>) -> io::Result<()>;
    /// Appends again `len` bytes (CRC-32 `crc`) this output already holds at `offset`:
    /// a copy inside the file, or a shared extent where the file system can. `false`,
    /// writing nothing, when the output cannot (it is not a file).
    fn repeat_earlier(&mut self, offset: u64, len: u64, crc: u32) -> io::Result<bool>;
}

impl<'f> OutFile<'f> {
    pub fn new(file: &'f File, pos: u64) -> OutFile<'f> {
        OutFile { file, pos, written_back: pos }
    }
}

impl TensorSink for OutFile<'_> {
    fn position(&self) -> u64 {
        self.pos
    }

    fn copy_from(&mut self, src: &File, offset: u64, len: u64, _crc: Option<u32>) -> io::Result<()> {
        copy_file_range_all(src, offset, self.file, self.pos, len)?;
        self.pos += len;
        self.written_back = start_writeback(self.file, self.written_back, self.pos);
        Ok(())
    }

    fn repeat_earlier(&mut self, offset: u64, len: u64, _crc: u32) -> io::Result<bool> {
        if offset + len > self.pos {
            return Err(io::Error::other("repeat_earlier: the range is not written yet"));
        }
        let file = self.file;
        self.copy_from(file, offset, len, None)?;
        Ok(true)
    }
}

impl Write for OutFile<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, self.pos)?;
        self.pos += buf.len() as u64;
        self.written_back = start_writeback(self.file, self.written_back, self.pos);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Asks the kernel to start writing `from..to` of `file` to disk, without waiting, once at
/// least `WRITEBACK_STEP` bytes are pending. Returns the new written-back mark.
/// Failing only costs the head start, so errors are ignored: the final fsync reports them.
pub(crate) fn start_writeback(file: &File, from: u64, to: u64) -> u64 {
    if to <= from || to - from < WRITEBACK_STEP {
        return from;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: an open descriptor and plain integers.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), from as i64, (to - from) as i64, libc::SYNC_FILE_RANGE_WRITE);
    }
    to
}

/// `copy_file_range` until done, falling back to positioned read/write where the kernel or
/// file system refuses (EXDEV, ENOSYS, EINVAL, EOPNOTSUPP, EPERM on some file systems).
pub(crate) fn copy_file_range_all(
    src: &File,
    mut src_off: u64,
    dst: &File,
    mut dst_off: u64,
    mut len: u64,
) -> io::Result<()> {
    while len > 0 {
        let mut so = src_off as i64;
        let mut d = dst_off as i64;
        let chunk = len.min(1 << 30) as usize;
        // SAFETY: both descriptors are open files owned by the caller; the offsets are
        // plain integers the kernel reads and updates.
        let n = unsafe { libc::copy_file_range(src.as_raw_fd(), &mut so, dst.as_raw_fd(), &mut d, chunk, 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EXDEV)
                | Some(libc::ENOSYS)
                | Some(libc::EINVAL)
                | Some(libc::EOPNOTSUPP)
                | Some(libc::EPERM) => copy_by_reads(src, src_off, dst, dst_off, len),
                _ => Err(err),
            };
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "source ended before the copy did"));
        }
        src_off += n as u64;
        dst_off += n as u64;
        len -= n as u64;
    }
    Ok(())
}

fn copy_by_reads(src: &File, src_off: u64, dst: &File, dst_off: u64, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; (len as usize).min(8 << 20)];
    let mut done = 0u64;
    while done < len {
        let n = ((len - done) as usize).min(buf.len());
        src.read_exact_at(&mut buf[..n], src_off + done)?;
        dst.write_all_at(&buf[..n], dst_off + done)?;
        done += n as u64;
    }
    Ok(())
}
