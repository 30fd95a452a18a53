//! Reads the central directory of a torch.save zip archive. Our own, because torch always
//! writes a ZIP64 end record and locator in front of the classic end record, and a reader
//! that works out the directory's start without them lands 76 bytes late (the `zip` crate
//! 9.8 fails on every archive whose inner folder name puts a local header exactly there:
//! any 21-byte stem such as `mae_pretrain_vit_base`). The directory's position is taken
//! from the end records themselves, ZIP64 first; nothing is inferred. Entries are only
//! located, never decompressed: torch writes stored entries only.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::formats::FormatError;

const EOCD_SIG: u32 = 0x0605_4b50;
const EOCD_LEN: u64 = 22;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const ZIP64_LOCATOR_LEN: u64 = 20;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const LOCAL_SIG: u32 = 0x0403_4b50;
const LOCAL_HEADER_LEN: u64 = 30;
const ZIP64_EXTRA: u16 = 0x0001;
/// The end record may be followed by a comment of at most this many bytes.
const MAX_COMMENT: u64 = 0xFFFF;

/// One entry of the archive, located: where its bytes start and how many there are.
#[derive(Clone, Debug)]
pub struct ZipEntry {
    pub name: String,
    /// Compression method (0 = stored).
    pub method: u16,
    pub crc32: u32,
    pub compressed_size: u64,
    pub size: u64,
    pub local_header_offset: u64,
}

impl ZipEntry {
    /// A name for the compression method, for messages.
    pub fn method_name(&self) -> String {
        match self.method {
            8 => "deflate".into(),
            9 => "deflate64".into(),
            12 => "bzip2".into(),
            14 => "lzma".into(),
            93 => "zstd".into(),
            n => format!("compression method {n}"),
        }
    }

    /// The file offset of the entry's first data byte, read from its local header (torch
    /// pads the local extra field so data lands on a 64-byte boundary).
    pub fn data_start(&self, file: &File, file_len: u64) -> Result<u64, FormatError> {
        let at = self.local_header_offset;
        let mut h = [0u8; LOCAL_HEADER_LEN as usize];
        if at.checked_add(LOCAL_HEADER_LEN).is_none_or(|e| e > file_len) {
            return Err(unreadable(format!("{}: its local header lies past the end of the file", self.name)));
        }
        file.read_exact_at(&mut h, at)?;
        if le32(&h, 0) != LOCAL_SIG {
            return Err(unreadable(format!("{}: no local header at offset {at}", self.name)));
        }
        let name_len = le16(&h, 26) as u64;
        let extra_len = le16(&h, 28) as u64;
        Ok(at + LOCAL_HEADER_LEN + name_len + extra_len)
    }
}

fn unreadable(msg: String) -> FormatError {
    FormatError::Zip(msg)
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Where the central directory is, from the end records.
struct Directory {
    offset: u64,
    size: u64,
    entries: u64,
}

/// Finds the end of central directory record (searching back over a possible comment),
/// then the ZIP64 record when the locator in front of it points to one.
fn find_directory(file: &File, file_len: u64) -> Result<Directory, FormatError> {
    if file_len < EOCD_LEN {
        return Err(unreadable("too short for a zip archive (no end of central directory record)".into()));
    }
    let tail_len = file_len.min(EOCD_LEN + MAX_COMMENT);
    let tail_start = file_len - tail_len;
    let mut tail = vec![0u8; tail_len as usize];
    file.read_exact_at(&mut tail, tail_start)?;
    let eocd_at = (0..=tail.len() - EOCD_LEN as usize)
        .rev()
        .find(|&i| le32(&tail, i) == EOCD_SIG && i + EOCD_LEN as usize + le16(&tail, i + 20) as usize <= tail.len())
        .ok_or_else(|| unreadable("no end of central directory record (file truncated?)".into()))?;
    let e = &tail[eocd_at..];
    let mut dir = Directory { entries: le16(e, 10) as u64, size: le32(e, 12) as u64, offset: le32(e, 16) as u64 };
    let eocd_pos = tail_start + eocd_at as u64;

    if eocd_pos >= ZIP64_LOCATOR_LEN {
        let mut loc = [0u8; ZIP64_LOCATOR_LEN as usize];
        file.read_exact_at(&mut loc, eocd_pos - ZIP64_LOCATOR_LEN)?;
        if le32(&loc, 0) == ZIP64_LOCATOR_SIG {
            let rec_at = le64(&loc, 8);
            let mut rec = [0u8; 56];
            if rec_at.checked_add(56).is_none_or(|end| end > eocd_pos) {
                return Err(unreadable(format!("the ZIP64 end record offset {rec_at} lies outside the file")));
            }
            file.read_exact_at(&mut rec, rec_at)?;
            if le32(&rec, 0) != ZIP64_EOCD_SIG {
                return Err(unreadable(format!("no ZIP64 end record at offset {rec_at}")));
            }
            dir = Directory { entries: le64(&rec, 32), size: le64(&rec, 40), offset: le64(&rec, 48) };
        }
    }
    if dir.offset.checked_add(dir.size).is_none_or(|end| end > eocd_pos) {
        return Err(unreadable(format!(
            "the central directory ({} bytes at offset {}) does not fit before its end record at {eocd_pos}",
            dir.size, dir.offset
        )));
    }
    Ok(dir)
}

/// Reads every entry of the central directory, in directory order. `max_entries` bounds
/// what a lying end record can make us allocate.
pub fn read_directory(file: &File, file_len: u64, max_entries: usize) -> Result<Vec<ZipEntry>, FormatError> {
    let dir = find_directory(file, file_len)?;
    // Each entry takes at least 46 bytes of the directory.
    if dir.entries > dir.size / 46 {
        return Err(unreadable(format!(
            "the end record claims {} entries, more than its {}-byte directory can hold",
            dir.entries, dir.size
        )));
    }
    if dir.entries > max_entries as u64 {
        return Err(unreadable(format!("{} entries, more than the {max_entries} allowed", dir.entries)));
    }
    let mut cd = vec![0u8; dir.size as usize];
    file.read_exact_at(&mut cd, dir.offset)?;
    let mut entries = Vec::with_capacity(dir.entries as usize);
    let mut pos = 0usize;
    for n in 0..dir.entries {
        let cut = || unreadable(format!("the central directory ends inside entry {n}"));
        let h = cd.get(pos..pos + 46).ok_or_else(cut)?;
        if le32(h, 0) != CENTRAL_SIG {
            return Err(unreadable(format!("entry {n} of the central directory has no header signature")));
        }
        let method = le16(h, 10);
        let crc32 = le32(h, 16);
        let mut compressed_size = le32(h, 20) as u64;
        let mut size = le32(h, 24) as u64;
        let (name_len, extra_len, comment_len) = (le16(h, 28) as usize, le16(h, 30) as usize, le16(h, 32) as usize);
        let mut local_header_offset = le32(h, 42) as u64;
        let body = pos + 46;
        let name = cd.get(body..body + name_len).ok_or_else(cut)?;
        let name = String::from_utf8_lossy(name).into_owned();
        let extra = cd.get(body + name_len..body + name_len + extra_len).ok_or_else(cut)?;
        // ZIP64 extended information: the 64-bit values, in this order, of exactly the
        // fields whose 32-bit slot holds 0xFFFFFFFF.
        let mut x = 0usize;
        while x + 4 <= extra.len() {
            let (id, len) = (le16(extra, x), le16(extra, x + 2) as usize);
            let data =
                extra.get(x + 4..x + 4 + len).ok_or_else(|| unreadable(format!("{name}: extra field cut short")))?;
            if id == ZIP64_EXTRA {
                let mut vals = data.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap()));
                let mut wide = |slot: &mut u64| -> Result<(), FormatError> {
                    if *slot == 0xFFFF_FFFF {
                        *slot =
                            vals.next().ok_or_else(|| unreadable(format!("{name}: ZIP64 field missing a value")))?;
                    }
                    Ok(())
                };
                wide(&mut size)?;
                wide(&mut compressed_size)?;
                wide(&mut local_header_offset)?;
            }
            x += 4 + len;
        }
        entries.push(ZipEntry { name, method, crc32, compressed_size, size, local_header_offset });
        pos = body + name_len + extra_len + comment_len;
    }
    Ok(entries)
}
