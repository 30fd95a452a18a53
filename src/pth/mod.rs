//! The PyTorch checkpoint format: a safe pickle VM, the zip and legacy containers, and a
//! writer whose output `torch.load(weights_only=True)` reads. Knows nothing of mappings,
//! models or URLs.

pub mod container;
pub mod pickle_write;
pub mod unpickle;
pub mod value;
pub mod write;
pub mod zip_read;
pub mod zip_write;

pub use container::{read_container, ContainerKind, PthFile, RecordedCrc, StorageLocation};
pub use value::{TensorView, Value};

impl PthError {
    /// The same error seen from one level up the value tree: an invalid tensor's name gets
    /// the parent key in front (`blocks.0.w`).
    pub(crate) fn under(self, key: &str) -> PthError {
        match self {
            PthError::InvalidTensor { name, msg } => {
                let name = if name.is_empty() { key.to_string() } else { format!("{key}.{name}") };
                PthError::InvalidTensor { name, msg }
            }
            other => other,
        }
    }
}

/// What can be wrong with a checkpoint file. Messages say what is wrong; the caller adds
/// the file name.
#[derive(Debug, thiserror::Error)]
pub enum PthError {
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
