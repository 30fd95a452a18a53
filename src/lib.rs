//! ckptmap: rewrite MAE / BEiT PyTorch checkpoints into the MMSegmentation backbone layout,
//! and check the result by running the backbone forward pass in candle.
//!
//! The flow runs one way: `fetch` → `pth` (read) → `mapping` (plan) → `convert` (execute,
//! write) → `verify`; `batch` drives many of them.

pub mod atomic;
pub mod batch;
pub mod checkpoint;
pub mod convert;
pub mod dtype;
pub mod fetch;
pub mod inspect;
pub mod mapping;
pub mod outfile;
pub mod progress;
pub mod pth;
pub mod safetensors_io;
pub mod synth;
pub mod verify;

pub use dtype::DType;
