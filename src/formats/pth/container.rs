//! Finds the pickle and the storages in a `.pth` file: the zip container torch writes since
//! 1.6, and the legacy stream (`_use_new_zipfile_serialization=False`). Reads only the
//! pickle and the zip directory; storage bytes stay on disk.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use super::unpickle::unpickle;
use super::zip_read::{self, ZipEntry};
use crate::formats::{ContainerKind, FormatError, ParsedFile, RecordedCrc, StorageLocation, Value};

/// Largest pickle we accept (a state dict's pickle is a few hundred KB).
const MAX_PICKLE_BYTES: u64 = 1 << 30;
/// Most entries a zip may have (a checkpoint has one per storage).
const MAX_ZIP_ENTRIES: usize = 1_000_000;

/// The 15 bytes that open every legacy torch.save stream: the pickled magic number.
const LEGACY_MAGIC: [u8; 15] =
    [0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e];

/// Reads the container of an open `.pth` file.
pub fn read_container(file: &mut File) -> Result<ParsedFile, FormatError> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Err(FormatError::Empty);
    }
    let mut head = [0u8; 512];
    let n = file.read_at(&mut head, 0)?;
    let head = &head[..n];
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        return read_zip(file);
    }
    match legacy_magic(head) {
        Some(Ok(end)) => return read_legacy(file, len, end),
        // A pickled 10-byte integer where the magic number goes: a legacy stream, damaged.
        Some(Err(found)) => {
            return Err(FormatError::Legacy(format!(
                "wrong magic number 0x{} (torch's is 0x{})",
                hex_le(found),
                hex_le(&LEGACY_MAGIC[4..14])
            )))
        }
        None => {}
    }
    if head.len() >= 262 && &head[257..262] == b"ustar" {
        return Err(FormatError::TarFormat);
    }
    Err(FormatError::NotACheckpoint)
}

fn read_zip(file: &mut File) -> Result<ParsedFile, FormatError> {
    let file_len = file.metadata()?.len();
    let entries = zip_read::read_directory(file, file_len, MAX_ZIP_ENTRIES)?;
    // torch puts every record under one folder; the shortest `*/data.pkl` is the pickle
    // (a nested archive could contain others).
    let pkl = entries
        .iter()
        .filter(|e| e.name == "data.pkl" || e.name.ends_with("/data.pkl"))
        .min_by_key(|e| e.name.len())
        .ok_or(FormatError::NoDataPkl)?;
    let prefix = pkl.name[..pkl.name.len() - "data.pkl".len()].to_string();
    if entries.iter().any(|e| e.name.starts_with(&prefix) && e.name.ends_with("constants.pkl")) {
        return Err(FormatError::Zip(
            "this is a TorchScript archive (constants.pkl), not a torch.save checkpoint".into(),
        ));
    }
    let by_name: HashMap<&str, &ZipEntry> = entries.iter().map(|e| (e.name.as_str(), e)).collect();
    // torch >= 2.6 can save with CRC computation off: every CRC is then recorded as 0, and
    // nothing can be checked (an empty entry's CRC is 0 too, so those say nothing).
    let crcs_absent = entries.iter().filter(|e| e.size > 0).all(|e| e.crc32 == 0) && entries.iter().any(|e| e.size > 0);

    if let Some(order) = by_name.get(format!("{prefix}byteorder").as_str()) {
        let bytes = read_stored(file, file_len, order, 16)?;
        if bytes.trim_ascii() == b"big" {
            return Err(FormatError::Zip("saved on a big-endian machine (byteorder says big): not supported".into()));
        }
    }

    if pkl.method != 0 {
        return Err(FormatError::Zip(format!(
            "{}: compressed with {}, not supported (torch.save stores entries uncompressed)",
            pkl.name,
            pkl.method_name()
        )));
    }
    if pkl.size > MAX_PICKLE_BYTES {
        return Err(FormatError::Zip(format!(
            "{} is {} bytes, larger than the {} allowed",
            pkl.name, pkl.size, MAX_PICKLE_BYTES
        )));
    }
    let pickle_bytes = read_stored(file, file_len, pkl, MAX_PICKLE_BYTES)?;
    if !crcs_absent {
        let actual = crc32fast::hash(&pickle_bytes);
        if actual != pkl.crc32 {
            return Err(FormatError::CrcMismatch { what: pkl.name.clone(), recorded: pkl.crc32, actual });
        }
    }
    let unpickled = unpickle(&pickle_bytes)?;

    let mut storages = Vec::with_capacity(unpickled.storages.len());
    for s in unpickled.storages {
        let name = format!("{prefix}data/{}", s.key);
        let entry = by_name.get(name.as_str()).ok_or_else(|| FormatError::MissingStorage { key: s.key.clone() })?;
        if entry.method != 0 {
            return Err(FormatError::Compressed(name, entry.method_name()));
        }
        let expected = (s.numel as u64).saturating_mul(s.dtype.size() as u64);
        if entry.size < expected || entry.compressed_size != entry.size {
            return Err(FormatError::StorageSize { key: s.key.clone(), expected, actual: entry.size });
        }
        let file_offset = entry.data_start(file, file_len)?;
        if file_offset.checked_add(entry.compressed_size).is_none_or(|end| end > file_len) {
            return Err(FormatError::Zip(format!(
                "{name}: the directory says {} bytes at offset {file_offset}, past the end of the {file_len}-byte file",
                entry.compressed_size
            )));
        }
        let crc32 = (!crcs_absent).then_some(RecordedCrc { crc: entry.crc32, len: entry.size });
        storages.push(StorageLocation { storage: s, file_offset, byte_len: expected, crc32 });
    }
    check_within(&storages, file_len)?;
    Ok(ParsedFile { kind: ContainerKind::Zip, value: unpickled.value, storages, crcs_absent })
}

/// The bytes of a stored entry (at most `limit` of them).
fn read_stored(file: &File, file_len: u64, entry: &ZipEntry, limit: u64) -> Result<Vec<u8>, FormatError> {
    let start = entry.data_start(file, file_len)?;
    let len = entry.size.min(limit);
    if entry.compressed_size != entry.size || start.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(FormatError::Zip(format!(
            "{}: the directory says {} bytes at offset {start}, past the end of the {file_len}-byte file",
            entry.name, entry.size
        )));
    }
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, start)?;
    Ok(buf)
}

/// Reads a pickle starting at `offset`, growing the window until the pickle fits.
fn unpickle_at(file: &File, offset: u64, file_len: u64) -> Result<(super::unpickle::Unpickled, u64), FormatError> {
    let mut window = 1u64 << 16;
    loop {
        let want = window.min(file_len.saturating_sub(offset));
        let mut buf = vec![0u8; want as usize];
        file.read_exact_at(&mut buf, offset)?;
        match unpickle(&buf) {
            Err(FormatError::PickleTruncated) if offset + want < file_len && window < MAX_PICKLE_BYTES => {
                window *= 4;
            }
            Err(e) => return Err(e),
            Ok(u) => {
                let end = offset + u.consumed as u64;
                return Ok((u, end));
            }
        }
    }
}

/// Where the pickled magic number that opens a legacy stream ends. torch pickles it with the
/// protocol it saves with: `PROTO n`, a `FRAME` from protocol 4 on, `LONG1` of 10 bytes, `STOP`.
/// `Some(Err(bytes))`: a 10-byte integer that is not the magic number.
fn legacy_magic(head: &[u8]) -> Option<Result<u64, &[u8]>> {
    let proto = *head.get(1)?;
    if head[0] != 0x80 || !(2..=5).contains(&proto) {
        return None;
    }
    let mut at = 2;
    if proto >= 4 && head.get(at) == Some(&0x95) {
        at += 9;
    }
    let int = head.get(at..at + 13)?;
    if int[..2] != [0x8a, 0x0a] {
        return None;
    }
    if int[2..12] != LEGACY_MAGIC[4..14] || int[12] != b'.' {
        return Some(Err(&head[at + 2..at + 12]));
    }
    Some(Ok((at + 13) as u64))
}

fn read_legacy(file: &mut File, file_len: u64, magic_end: u64) -> Result<ParsedFile, FormatError> {
    let mut pos = magic_end;
    let (protocol, next) = unpickle_at(file, pos, file_len)?;
    pos = next;
    if protocol.value != Value::Int(1001) {
        return Err(FormatError::Legacy(format!("unknown protocol version {:?}", protocol.value)));
    }
    let (sys_info, next) = unpickle_at(file, pos, file_len)?;
    pos = next;
    if sys_info.value.get("little_endian") == Some(&Value::Bool(false)) {
        return Err(FormatError::Legacy("written on a big-endian machine: not supported".into()));
    }
    let (main, next) = unpickle_at(file, pos, file_len)?;
    pos = next;
    let (keys, next) = unpickle_at(file, pos, file_len)?;
    pos = next;
    let keys: Vec<String> = match &keys.value {
        Value::List(items) => items
            .iter()
            .map(|k| {
                k.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| FormatError::Legacy("storage key list holds a non-string".into()))
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(FormatError::Legacy("storage key list is missing".into())),
    };
    // Raw storages follow in the key list's order: an i64 element count, then the bytes.
    let elem_of: std::collections::HashMap<&str, usize> =
        main.storages.iter().map(|s| (s.key.as_str(), s.dtype.size())).collect();
    let mut by_key = std::collections::HashMap::new();
    for key in &keys {
        let mut count = [0u8; 8];
        file.read_exact_at(&mut count, pos).map_err(|_| FormatError::Legacy(format!("storage {key} is cut short")))?;
        let numel = u64::from_le_bytes(count);
        let nbytes_of = |size: usize| numel.checked_mul(size as u64);
        by_key.insert(key.clone(), (pos + 8, numel));
        // The element size comes from the pickle's reference to this storage.
        let elem = elem_of.get(key.as_str()).copied().unwrap_or(1);
        let nbytes = nbytes_of(elem).ok_or_else(|| FormatError::Legacy(format!("storage {key} size overflows")))?;
        pos = nbytes.checked_add(8).and_then(|n| pos.checked_add(n)).filter(|&p| p <= file_len).ok_or_else(|| {
            FormatError::Legacy(format!("storage {key} is cut short: the file ends before its {nbytes} bytes"))
        })?;
    }
    let mut storages = Vec::with_capacity(main.storages.len());
    for s in main.storages {
        let &(file_offset, numel) =
            by_key.get(&s.key).ok_or_else(|| FormatError::MissingStorage { key: s.key.clone() })?;
        let elem = s.dtype.size() as u64;
        if numel < s.numel as u64 {
            return Err(FormatError::StorageSize {
                key: s.key.clone(),
                expected: (s.numel as u64).saturating_mul(elem),
                actual: numel.saturating_mul(elem),
            });
        }
        let byte_len = (s.numel as u64).saturating_mul(elem);
        storages.push(StorageLocation { storage: s, file_offset, byte_len, crc32: None });
    }
    check_within(&storages, file_len)?;
    Ok(ParsedFile { kind: ContainerKind::Legacy, value: main.value, storages, crcs_absent: false })
}

/// A little-endian integer's bytes as big-endian hex.
fn hex_le(bytes: &[u8]) -> String {
    bytes.iter().rev().map(|b| format!("{b:02x}")).collect()
}

fn check_within(storages: &[StorageLocation], file_len: u64) -> Result<(), FormatError> {
    for s in storages {
        if s.file_offset.checked_add(s.byte_len).is_none_or(|end| end > file_len) {
            return Err(FormatError::StorageSize {
                key: s.storage.key.clone(),
                expected: s.byte_len,
                actual: file_len.saturating_sub(s.file_offset),
            });
        }
    }
    Ok(())
}
