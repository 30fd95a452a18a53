//! Reading checkpoint files. Two formats, as peers over one neutral model: [`pth`] (the
//! zip and legacy containers torch.save writes, through a pickle VM that never executes
//! anything) and [`safetensors`]. Each parses a file into a [`ParsedFile`]: a [`Value`] tree
//! whose tensors are [`TensorView`]s into storages, and where each storage's bytes lie.
//! [`checkpoint::Checkpoint`] opens a file of either format lazily and reads tensor bytes on
//! demand. Knows nothing of mappings, models or URLs.

pub mod checkpoint;
pub mod pth;
pub mod safetensors;
pub mod value;

pub use value::{TensorView, Value};

use crate::DType;

/// A storage: its key (a pickle's persistent id `('storage', <Type>Storage, key, location,
/// numel)`, a safetensors tensor's name), element type and element count.
#[derive(Clone, Debug, PartialEq)]
pub struct StorageRef {
    pub key: String,
    pub dtype: DType,
    pub numel: usize,
}

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

/// A parsed file, whatever its format: its value tree and where each storage lies.
#[derive(Debug)]
pub struct ParsedFile {
    pub kind: ContainerKind,
    pub value: Value,
    pub storages: Vec<StorageLocation>,
    /// A zip saved with CRC computation off (every CRC recorded as 0): nothing was checked.
    pub crcs_absent: bool,
}

impl FormatError {
    /// The same error seen from one level up the value tree: an invalid tensor's name gets
    /// the parent key in front (`blocks.0.w`).
    pub(crate) fn under(self, key: &str) -> FormatError {
        match self {
            FormatError::InvalidTensor { name, msg } => {
                let name = if name.is_empty() { key.to_string() } else { format!("{key}.{name}") };
                FormatError::InvalidTensor { name, msg }
            }
            other => other,
        }
    }
}

/// What can be wrong with a checkpoint file, in either format. Messages say what is wrong;
/// the caller adds the file name.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("empty file: not a PyTorch checkpoint")]
    Empty,
    #[error("not a PyTorch checkpoint (neither a zip archive, a legacy torch.save stream, nor safetensors)")]
    NotACheckpoint,
    #[error("old tar-format checkpoint (torch < 0.4): not supported; load it with torch and save it again")]
    TarFormat,
    #[error("zip archive is unreadable: {0}")]
    Zip(String),
    #[error("zip archive has no data.pkl: not a torch.save checkpoint")]
    NoDataPkl,
    #[error("zip entry {0} is compressed ({1}); torch.save writes stored entries only")]
    Compressed(String, String),
    #[error("storage {key} is missing from the file")]
    MissingStorage { key: String },
    #[error("storage {key} holds {actual} bytes but its header says {expected}")]
    StorageSize { key: String, expected: u64, actual: u64 },
    /// `what`: `storage KEY`, or `tensor NAME (storage KEY)`.
    #[error("{what} is corrupt: its bytes have CRC-32 {actual:08x} but the zip records {recorded:08x}")]
    CrcMismatch { what: String, recorded: u32, actual: u32 },
    #[error("tensor {name} needs {needed} elements of storage {key}, which has only {available}")]
    ViewOutOfBounds { name: String, key: String, needed: u64, available: u64 },
    #[error("invalid tensor view: {0}")]
    BadView(String),
    #[error("tensor {name}: {msg}")]
    InvalidTensor { name: String, msg: String },
    #[error("pickle ends before its STOP opcode (file truncated?)")]
    PickleTruncated,
    #[error("pickle refers to memo entry {0}, which was never stored")]
    MemoMissing(u32),
    #[error("pickle nests deeper than {0} levels")]
    TooDeep(usize),
    #[error("pickle expands to more than {0} values (a memo bomb?)")]
    TooLarge(usize),
    #[error("pickle holds more than {limit} {what}: refusing a malicious or corrupt file")]
    TooMany { what: &'static str, limit: usize },
    #[error("pickle expands to more than {mib} MiB in memory (a memo bomb?)")]
    TooBig { mib: usize },
    #[error("malformed pickle: {0}")]
    Pickle(String),
    #[error("legacy checkpoint: {0}")]
    Legacy(String),
    #[error("safetensors: {0}")]
    Safetensors(String),
}
