//! The PyTorch checkpoint format as `torch.save` writes it: the zip container (since torch
//! 1.6; our own central-directory reader, ZIP64 included) and the legacy stream, each holding
//! a pickle that [`unpickle`] interprets into a value tree without executing anything.

pub mod container;
pub mod unpickle;
mod zip_read;

pub use container::read_container;
