//! A minimal zip writer for torch.save-style archives: stored entries only, every payload
//! aligned to 64 bytes (torch's "FB" padding field), ZIP64 where sizes or offsets need it.
//! Payloads can be written from memory or copied file-to-file inside the kernel
//! (`copy_file_range`), and a CRC-32 already known (from the source archive) is reused, so
//! renamed tensors are never pulled through user space.

use super::outfile::{copy_file_range_all, TensorSink};
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

const ALIGN: u64 = 64;
const PAD_FIELD: u16 = 0x4246; // "FB", the id torch's writer uses for its padding field
const ZIP64_FIELD: u16 = 0x0001;
const U32_MAX: u64 = 0xFFFF_FFFF;

/// Where an archive is written: a file (positioned writes; kernel copies possible) or memory.
pub trait ZipSink {
    fn put_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()>;
    /// Cuts the output at `len` (a reused file may have been longer).
    fn truncate(&mut self, len: u64) -> io::Result<()>;
    /// The file, when copies can go file-to-file inside the kernel.
    fn file(&self) -> Option<&File>;
}

impl ZipSink for File {
    fn put_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.write_all_at(bytes, offset)
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.set_len(len)
    }
    fn file(&self) -> Option<&File> {
        Some(self)
    }
}

impl ZipSink for &File {
    fn put_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.write_all_at(bytes, offset)
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.set_len(len)
    }
    fn file(&self) -> Option<&File> {
        Some(self)
    }
}

impl ZipSink for io::BufWriter<File> {
    fn put_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.flush()?;
        self.get_ref().write_all_at(bytes, offset)
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.flush()?;
        self.get_ref().set_len(len)
    }
    fn file(&self) -> Option<&File> {
        Some(self.get_ref())
    }
}

impl ZipSink for io::Cursor<Vec<u8>> {
    fn put_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let v = self.get_mut();
        let end = offset as usize + bytes.len();
        if v.len() < end {
            v.resize(end, 0);
        }
        v[offset as usize..end].copy_from_slice(bytes);
        Ok(())
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.get_mut().truncate(len as usize);
        Ok(())
    }
    fn file(&self) -> Option<&File> {
        None
    }
}

struct Entry {
    name: String,
    header_offset: u64,
    size: u64,
    crc: u32,
}

/// Writes an archive with positioned writes (no seeking, no buffering layer).
pub struct ZipOut<S: ZipSink> {
    sink: S,
    pos: u64,
    entries: Vec<Entry>,
    /// Bytes before this offset have been handed to the disk (see `start_writeback`).
    written_back: u64,
}

/// The payload of one entry being written; tracks length and CRC.
pub struct EntryWriter<'z, S: ZipSink> {
    zip: &'z mut ZipOut<S>,
    written: u64,
    hasher: crc32fast::Hasher,
}

fn le16(v: u16) -> [u8; 2] {
    v.to_le_bytes()
}
fn le32(v: u32) -> [u8; 4] {
    v.to_le_bytes()
}

impl<S: ZipSink> ZipOut<S> {
    pub fn new(sink: S) -> ZipOut<S> {
        ZipOut { sink, pos: 0, entries: Vec::new(), written_back: 0 }
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.sink.put_at(self.pos, bytes)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Starts an entry of exactly `size` bytes; `fill` writes them.
    pub fn entry(
        &mut self,
        name: &str,
        size: u64,
        fill: impl FnOnce(&mut EntryWriter<S>) -> io::Result<()>,
    ) -> io::Result<()> {
        let header_offset = self.pos;
        let zip64 = size >= U32_MAX;
        let zip64_len = if zip64 { 20 } else { 0 };
        let fixed = 30 + name.len() as u64 + zip64_len + 4;
        let pad = (ALIGN - (header_offset + fixed) % ALIGN) % ALIGN;
        let mut h = Vec::with_capacity((fixed + pad) as usize);
        h.extend_from_slice(&le32(0x0403_4b50));
        h.extend_from_slice(&le16(if zip64 { 45 } else { 20 })); // version needed
        h.extend_from_slice(&le16(0x0800)); // flags: UTF-8 names
        h.extend_from_slice(&le16(0)); // stored
        h.extend_from_slice(&le16(0)); // time
        h.extend_from_slice(&le16(0x21)); // date: 1980-01-01
        h.extend_from_slice(&le32(0)); // crc, patched below
        let small = if zip64 { U32_MAX as u32 } else { size as u32 };
        h.extend_from_slice(&le32(small));
        h.extend_from_slice(&le32(small));
        h.extend_from_slice(&le16(name.len() as u16));
        h.extend_from_slice(&le16((zip64_len + 4 + pad) as u16));
        h.extend_from_slice(name.as_bytes());
        if zip64 {
            h.extend_from_slice(&le16(ZIP64_FIELD));
            h.extend_from_slice(&le16(16));
            h.extend_from_slice(&size.to_le_bytes());
            h.extend_from_slice(&size.to_le_bytes());
        }
        h.extend_from_slice(&le16(PAD_FIELD));
        h.extend_from_slice(&le16(pad as u16));
        h.resize(h.len() + pad as usize, b'Z');
        self.put(&h)?;

        let mut w = EntryWriter { zip: self, written: 0, hasher: crc32fast::Hasher::new() };
        fill(&mut w)?;
        let (written, crc) = (w.written, w.hasher.clone().finalize());
        if written != size {
            return Err(io::Error::other(format!("produced {written} bytes, expected {size}")));
        }
        self.sink.put_at(header_offset + 14, &le32(crc))?;
        self.entries.push(Entry { name: name.to_string(), header_offset, size, crc });
        self.start_writeback();
        Ok(())
    }

    /// Starts writeback of what is finished (see `crate::outfile`).
    fn start_writeback(&mut self) {
        if let Some(file) = self.sink.file() {
            self.written_back = super::outfile::start_writeback(file, self.written_back, self.pos);
        }
    }

    /// Writes the central directory (and ZIP64 end records when needed).
    pub fn finish(mut self) -> io::Result<S> {
        let cd_start = self.pos;
        let mut cd = Vec::new();
        for e in &self.entries {
            let big_size = e.size >= U32_MAX;
            let big_off = e.header_offset >= U32_MAX;
            let mut extra = Vec::new();
            if big_size {
                extra.extend_from_slice(&e.size.to_le_bytes());
                extra.extend_from_slice(&e.size.to_le_bytes());
            }
            if big_off {
                extra.extend_from_slice(&e.header_offset.to_le_bytes());
            }
            cd.extend_from_slice(&le32(0x0201_4b50));
            cd.extend_from_slice(&le16(if extra.is_empty() { 20 } else { 45 })); // made by
            cd.extend_from_slice(&le16(if extra.is_empty() { 20 } else { 45 })); // needed
            cd.extend_from_slice(&le16(0x0800));
            cd.extend_from_slice(&le16(0));
            cd.extend_from_slice(&le16(0));
            cd.extend_from_slice(&le16(0x21));
            cd.extend_from_slice(&le32(e.crc));
            let small = if big_size { U32_MAX as u32 } else { e.size as u32 };
            cd.extend_from_slice(&le32(small));
            cd.extend_from_slice(&le32(small));
            cd.extend_from_slice(&le16(e.name.len() as u16));
            cd.extend_from_slice(&le16(if extra.is_empty() { 0 } else { extra.len() as u16 + 4 }));
            cd.extend_from_slice(&le16(0)); // comment
            cd.extend_from_slice(&le16(0)); // disk
            cd.extend_from_slice(&le16(0)); // internal attributes
            cd.extend_from_slice(&le32(0)); // external attributes
            cd.extend_from_slice(&le32(if big_off { U32_MAX as u32 } else { e.header_offset as u32 }));
            cd.extend_from_slice(e.name.as_bytes());
            if !extra.is_empty() {
                cd.extend_from_slice(&le16(ZIP64_FIELD));
                cd.extend_from_slice(&le16(extra.len() as u16));
                cd.extend_from_slice(&extra);
            }
        }
        self.put(&cd)?;
        let cd_size = cd.len() as u64;
        let count = self.entries.len() as u64;
        let need64 = cd_start >= U32_MAX || cd_size >= U32_MAX || count >= 0xFFFF;
        let mut end = Vec::new();
        if need64 {
            let z64_start = self.pos;
            end.extend_from_slice(&le32(0x0606_4b50));
            end.extend_from_slice(&44u64.to_le_bytes());
            end.extend_from_slice(&le16(45));
            end.extend_from_slice(&le16(45));
            end.extend_from_slice(&le32(0));
            end.extend_from_slice(&le32(0));
            end.extend_from_slice(&count.to_le_bytes());
            end.extend_from_slice(&count.to_le_bytes());
            end.extend_from_slice(&cd_size.to_le_bytes());
            end.extend_from_slice(&cd_start.to_le_bytes());
            end.extend_from_slice(&le32(0x0706_4b50));
            end.extend_from_slice(&le32(0));
            end.extend_from_slice(&z64_start.to_le_bytes());
            end.extend_from_slice(&le32(1));
        }
        end.extend_from_slice(&le32(0x0605_4b50));
        end.extend_from_slice(&le16(0));
        end.extend_from_slice(&le16(0));
        let c16 = count.min(0xFFFF) as u16;
        end.extend_from_slice(&le16(c16));
        end.extend_from_slice(&le16(c16));
        end.extend_from_slice(&le32(cd_size.min(U32_MAX) as u32));
        end.extend_from_slice(&le32(cd_start.min(U32_MAX) as u32));
        end.extend_from_slice(&le16(0));
        self.put(&end)?;
        // A file that already existed could be longer (we write at offsets): cut it here.
        self.sink.truncate(self.pos)?;
        Ok(self.sink)
    }
}

impl<S: ZipSink> TensorSink for EntryWriter<'_, S> {
    fn position(&self) -> u64 {
        self.zip.pos
    }

    fn repeat_earlier(&mut self, offset: u64, len: u64, crc: u32) -> io::Result<bool> {
        let Some(file) = self.zip.sink.file() else { return Ok(false) };
        if offset + len > self.zip.pos {
            return Err(io::Error::other("repeat_earlier: the range is not written yet"));
        }
        copy_file_range_all(file, offset, file, self.zip.pos, len)?;
        self.zip.pos += len;
        self.written += len;
        self.hasher.combine(&crc32fast::Hasher::new_with_initial_len(crc, len));
        Ok(true)
    }

    /// Inside the kernel when `crc` is known (nothing is read here); otherwise the bytes are
    /// read once to compute it, and written from that read.
    fn copy_from(&mut self, src: &File, offset: u64, len: u64, crc: Option<u32>) -> io::Result<()> {
        match (crc, self.zip.sink.file()) {
            (Some(c), Some(dst)) => {
                let dst_start = self.zip.pos;
                copy_file_range_all(src, offset, dst, dst_start, len)?;
                self.zip.pos += len;
                self.written += len;
                self.hasher.combine(&crc32fast::Hasher::new_with_initial_len(c, len));
                Ok(())
            }
            _ => {
                let mut buf = vec![0u8; (len as usize).min(8 << 20)];
                let mut done = 0u64;
                while done < len {
                    let n = ((len - done) as usize).min(buf.len());
                    src.read_exact_at(&mut buf[..n], offset + done)?;
                    self.write_all(&buf[..n])?;
                    done += n as u64;
                }
                Ok(())
            }
        }
    }
}

impl<S: ZipSink> Write for EntryWriter<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.hasher.update(buf);
        self.zip.put(buf)?;
        self.written += buf.len() as u64;
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
