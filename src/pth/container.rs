//! Finds the pickle and the storages in a `.pth` file: the zip container torch writes since
//! 1.6, and the legacy stream (`_use_new_zipfile_serialization=False`). Reads only the
//! pickle and the zip directory; storage bytes stay on disk.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use super::unpickle::{unpickle, StorageRef};
use super::{PthError, Value};

/// Largest pickle we accept (a state dict's pickle is a few hundred KB).
const MAX_PICKLE_BYTES: u64 = 1 << 30;
/// Most entries a zip may have (a checkpoint has one per storage).
const MAX_ZIP_ENTRIES: usize = 1_000_000;

/// The 15 bytes that open every legacy torch.save stream: the pickled magic number.
const LEGACY_MAGIC: [u8; 15] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerKind {
    Zip,
    Legacy,
    Safetensors,
}

impl ContainerKind {
    pub fn name(self) -> &'static str {
        match self {
            ContainerKind::Zip => "zip",
            ContainerKind::Legacy => "legacy",
            ContainerKind::Safetensors => "safetensors",
        }
    }
}

/// Where a storage's bytes are in the file.
#[derive(Clone, Debug)]
pub struct StorageLocation {
    pub storage: StorageRef,
    pub file_offset: u64,
    pub byte_len: u64,
    /// The CRC-32 the container records (zip), over the whole entry from `file_offset`.
    pub crc32: Option<RecordedCrc>,
}

/// A zip entry's CRC-32 and the number of bytes it covers (the entry may hold more than
/// the storage needs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordedCrc {
    pub crc: u32,
    pub len: u64,
}

/// A parsed `.pth`: its value tree and where each storage lies.
#[derive(Debug)]
pub struct PthFile {
    pub kind: ContainerKind,
    pub value: Value,
    pub storages: Vec<StorageLocation>,
}

/// Reads the container of an open `.pth` file.
pub fn read_container(file: &mut File) -> Result<PthFile, PthError> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Err(PthError::Empty);
    }
    let mut head = [0u8; 512];
    let n = file.read_at(&mut head, 0)?;
    let head = &head[..n];
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        return read_zip(file);
    }
    if head.starts_with(&LEGACY_MAGIC) {
        return read_legacy(file, len);
    }
    // A pickled 10-byte integer where the magic number goes: a legacy stream, damaged.
    if head.len() >= LEGACY_MAGIC.len() && head[..4] == LEGACY_MAGIC[..4] {
        return Err(PthError::Legacy(format!(
            "wrong magic number 0x{} (torch's is 0x{})",
            hex_le(&head[4..14]),
            hex_le(&LEGACY_MAGIC[4..14])
        )));
    }
    if head.len() >= 262 && &head[257..262] == b"ustar" {
        return Err(PthError::TarFormat);
    }
    Err(PthError::NotACheckpoint)
}

fn read_zip(file: &mut File) -> Result<PthFile, PthError> {
    let file_len = file.metadata()?.len();
    file.seek(SeekFrom::Start(0))?;
    let mut archive = zip::ZipArchive::new(&*file).map_err(|e| PthError::Zip(e.to_string()))?;
    if archive.len() > MAX_ZIP_ENTRIES {
        return Err(PthError::Zip(format!("{} entries, more than the {} allowed", archive.len(), MAX_ZIP_ENTRIES)));
    }
    // torch puts every record under one folder; the shortest `*/data.pkl` is the pickle
    // (a nested archive could contain others).
    let names: Vec<String> = archive.file_names_raw().map(|n| String::from_utf8_lossy(n).into_owned()).collect();
    let pkl = names
        .iter()
        .filter(|n| n.as_str() == "data.pkl" || n.ends_with("/data.pkl"))
        .min_by_key(|n| n.len())
        .ok_or(PthError::NoDataPkl)?
        .clone();
    let prefix = &pkl[..pkl.len() - "data.pkl".len()];
    if names.iter().any(|n| n.starts_with(prefix) && n.ends_with("constants.pkl")) {
        return Err(PthError::Zip("this is a TorchScript archive (constants.pkl), not a torch.save checkpoint".into()));
    }

    let pickle_bytes = {
        let idx = archive.index_for_name(&pkl).ok_or(PthError::NoDataPkl)?;
        let mut entry = archive.by_index(idx).map_err(|e| PthError::Zip(format!("{pkl}: {e}")))?;
        if entry.size() > MAX_PICKLE_BYTES {
            return Err(PthError::Zip(format!("{pkl} is {} bytes, larger than the {} allowed", entry.size(), MAX_PICKLE_BYTES)));
        }
        // (The declared size may lie: reserve no more than the file can hold.)
        let mut buf = Vec::with_capacity(entry.size().min(file_len) as usize);
        entry
            .by_ref()
            .take(MAX_PICKLE_BYTES)
            .read_to_end(&mut buf)
            .map_err(|e| PthError::Zip(format!("{pkl}: {e}")))?;
        buf
    };
    let unpickled = unpickle(&pickle_bytes)?;

    let mut storages = Vec::with_capacity(unpickled.storages.len());
    for s in unpickled.storages {
        let name = format!("{prefix}data/{}", s.key);
        let idx = archive.index_for_name(&name).ok_or_else(|| PthError::MissingStorage { key: s.key.clone() })?;
        let entry = archive.by_index_raw(idx).map_err(|e| PthError::Zip(format!("{name}: {e}")))?;
        if entry.compression() != zip::CompressionMethod::Stored {
            #[allow(deprecated)]
            let method = match entry.compression().to_u16() {
                8 => "deflate".to_string(),
                9 => "deflate64".to_string(),
                12 => "bzip2".to_string(),
                14 => "lzma".to_string(),
                93 => "zstd".to_string(),
                n => format!("compression method {n}"),
            };
            return Err(PthError::Compressed(name, method));
        }
        let expected = (s.numel as u64).checked_mul(s.dtype.size() as u64).unwrap_or(u64::MAX);
        if entry.size() < expected || entry.compressed_size() != entry.size() {
            return Err(PthError::StorageSize { key: s.key.clone(), expected, actual: entry.size() });
        }
        let file_offset = entry.data_start().ok_or_else(|| PthError::Zip(format!("{name}: no data offset")))?;
        if file_offset.checked_add(entry.compressed_size()).is_none_or(|end| end > file_len) {
            return Err(PthError::Zip(format!(
                "{name}: the directory says {} bytes at offset {file_offset}, past the end of the {file_len}-byte file",
                entry.compressed_size()
            )));
        }
        let crc32 = Some(RecordedCrc { crc: entry.crc32(), len: entry.size() });
        storages.push(StorageLocation { storage: s, file_offset, byte_len: expected, crc32 });
    }
    check_within(&storages, file_len)?;
    Ok(PthFile { kind: ContainerKind::Zip, value: unpickled.value, storages })
}

/// Reads a pickle starting at `offset`, growing the window until the pickle fits.
fn unpickle_at(file: &File, offset: u64, file_len: u64) -> Result<(super::unpickle::Unpickled, u64), PthError> {
    let mut window = 1u64 << 16;
    loop {
        let want = window.min(file_len.saturating_sub(offset));
        let mut buf = vec![0u8; want as usize];
        file.read_exact_at(&mut buf, offset)?;
        match unpickle(&buf) {
            Err(PthError::PickleTruncated) if offset + want < file_len && window < MAX_PICKLE_BYTES => {
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

fn read_legacy(file: &mut File, file_len: u64) -> Result<PthFile, PthError> {
    let mut pos = LEGACY_MAGIC.len() as u64;
    let (protocol, next) = unpickle_at(file, pos, file_len)?;
    pos = next;
    if protocol.value != Value::Int(1001) {
        return Err(PthError::Legacy(format!("unknown protocol version {:?}", protocol.value)));
    }
    let (sys_info, next) = unpickle_at(file, pos, file_len)?;
    pos = next;
    if sys_info.value.get("little_endian") == Some(&Value::Bool(false)) {
        return Err(PthError::Legacy("written on a big-endian machine: not supported".into()));
    }
    let (main, next) = unpickle_at(file, pos, file_len)?;
    pos = next;
    let (keys, next) = unpickle_at(file, pos, file_len)?;
    pos = next;
    let keys: Vec<String> = match &keys.value {
        Value::List(items) => items
            .iter()
            .map(|k| k.as_str().map(str::to_string).ok_or_else(|| PthError::Legacy("storage key list holds a non-string".into())))
            .collect::<Result<_, _>>()?,
        _ => return Err(PthError::Legacy("storage key list is missing".into())),
    };
    // Raw storages follow in the key list's order: an i64 element count, then the bytes.
    let elem_of: std::collections::HashMap<&str, usize> =
        main.storages.iter().map(|s| (s.key.as_str(), s.dtype.size())).collect();
    let mut by_key = std::collections::HashMap::new();
    for key in &keys {
        let mut count = [0u8; 8];
        file.read_exact_at(&mut count, pos).map_err(|_| PthError::Legacy(format!("storage {key} is cut short")))?;
        let numel = u64::from_le_bytes(count);
        let nbytes_of = |size: usize| numel.checked_mul(size as u64);
        by_key.insert(key.clone(), (pos + 8, numel));
        // The element size comes from the pickle's reference to this storage.
        let elem = elem_of.get(key.as_str()).copied().unwrap_or(1);
        let nbytes = nbytes_of(elem).ok_or_else(|| PthError::Legacy(format!("storage {key} size overflows")))?;
        pos = nbytes
            .checked_add(8)
            .and_then(|n| pos.checked_add(n))
            .filter(|&p| p <= file_len)
            .ok_or_else(|| PthError::Legacy(format!("storage {key} is cut short: the file ends before its {nbytes} bytes")))?;
    }
    let mut storages = Vec::with_capacity(main.storages.len());
    for s in main.storages {
        let &(file_offset, numel) = by_key.get(&s.key).ok_or_else(|| PthError::MissingStorage { key: s.key.clone() })?;
        let elem = s.dtype.size() as u64;
        if numel < s.numel as u64 {
            return Err(PthError::StorageSize {
                key: s.key.clone(),
                expected: (s.numel as u64).saturating_mul(elem),
                actual: numel.saturating_mul(elem),
            });
        }
        let byte_len = (s.numel as u64).saturating_mul(elem);
        storages.push(StorageLocation { storage: s, file_offset, byte_len, crc32: None });
    }
    check_within(&storages, file_len)?;
    Ok(PthFile { kind: ContainerKind::Legacy, value: main.value, storages })
}

/// A little-endian integer's bytes as big-endian hex.
fn hex_le(bytes: &[u8]) -> String {
    bytes.iter().rev().map(|b| format!("{b:02x}")).collect()
}

fn check_within(storages: &[StorageLocation], file_len: u64) -> Result<(), PthError> {
    for s in storages {
        if s.file_offset.checked_add(s.byte_len).is_none_or(|end| end > file_len) {
            return Err(PthError::StorageSize {
                key: s.storage.key.clone(),
                expected: s.byte_len,
                actual: file_len.saturating_sub(s.file_offset),
            });
        }
    }
    Ok(())
}
