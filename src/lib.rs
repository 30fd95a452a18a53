//! ckptmap: rewrite MAE / BEiT PyTorch checkpoints into the MMSegmentation backbone layout,
//! and check the result by running the backbone forward pass in candle.
//!
//! The flow runs one way: `fetch` → `pth` (read) → `mapping` (plan) → `convert` (execute,
//! write) → `verify`; `batch` drives many of them.

pub mod batch;
pub mod dtype;
pub mod fetch;
pub mod formats;
pub mod inspect;
pub mod job;
pub mod mapping;
pub mod progress;
pub mod synth;
pub mod verify;
pub mod write;

pub use dtype::DType;
