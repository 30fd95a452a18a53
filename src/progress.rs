//! Progress reporting from library code: the library calls a `Progress`, the CLI decides
//! whether and how to draw it (only `main.rs` prints).

/// Receives progress of one long job (a download, a conversion). Implementations must be
/// cheap: `advance` is called once per chunk of bytes.
pub trait Progress: Sync {
    /// A job starts; `total` is its size in bytes when known.
    fn begin(&self, label: &str, total: Option<u64>);
    /// `bytes` more bytes are done.
    fn advance(&self, bytes: u64);
    /// The job is over (successfully or not).
    fn end(&self);
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn begin(&self, _label: &str, _total: Option<u64>) {}
    fn advance(&self, _bytes: u64) {}
    fn end(&self) {}
}
