//! Writes a flat state dict as the zip container `torch.save` produces: stored entries,
//! 64-byte aligned data, everything under one folder, records `data.pkl`, `byteorder`,
//! `data/0..N`, `version`. `.format_version` is left out on purpose: with it, newer torch
//! computes storage offsets arithmetically assuming miniz's exact layout.

use std::io::{self, Write};

pub use super::pickle::TopEntry;
use super::pickle::{checkpoint_pickle, PickledTensor};
use super::zip::ZipOut;
pub use super::zip::{EntryWriter, ZipSink};
use crate::DType;

/// One tensor to write: contiguous bytes, `nbytes` long, produced by the caller on demand.
pub struct TensorToWrite<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
}

impl TensorToWrite<'_> {
    pub fn nbytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.dtype.size() as u64
    }
}

/// Writes the archive to `out`. `folder` is the record prefix torch uses (the file stem).
/// `fill(i, w)` must write exactly the i-th tensor's bytes, little-endian, row-major, by
/// `w.write_all` or (file to file) `TensorSink::copy_from`.
pub fn write_pth<S: ZipSink>(
    out: S,
    folder: &str,
    tensors: &[TensorToWrite],
    fill: impl FnMut(usize, &mut EntryWriter<S>) -> io::Result<()>,
) -> io::Result<S> {
    write_pth_nested(out, folder, tensors, &[], fill)
}

/// [`write_pth`] of a file whose top level is a plain dict of `top`'s entries (the state dict
/// under one key, plain values under the others: `{'meta': …, 'state_dict': …}`); empty
/// `top`: the flat state dict. A value that is not plain is an `InvalidInput` error before
/// anything is written.
pub fn write_pth_nested<S: ZipSink>(
    out: S,
    folder: &str,
    tensors: &[TensorToWrite],
    top: &[TopEntry],
    mut fill: impl FnMut(usize, &mut EntryWriter<S>) -> io::Result<()>,
) -> io::Result<S> {
    let folder = sanitize_folder(folder);
    let pickled: Vec<PickledTensor> =
        tensors.iter().map(|t| PickledTensor { name: t.name, dtype: t.dtype, shape: t.shape }).collect();
    let pkl = checkpoint_pickle(&pickled, top).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut zip = ZipOut::new(out);
    zip.entry(&format!("{folder}/data.pkl"), pkl.len() as u64, |w| w.write_all(&pkl))?;
    zip.entry(&format!("{folder}/byteorder"), 6, |w| w.write_all(b"little"))?;
    for (i, t) in tensors.iter().enumerate() {
        let nbytes = t.nbytes();
        zip.entry(&format!("{folder}/data/{i}"), nbytes, |w| fill(i, w))
            .map_err(|e| io::Error::new(e.kind(), format!("tensor {}: {e}", t.name)))?;
    }
    zip.entry(&format!("{folder}/version"), 2, |w| w.write_all(b"3\n"))?;
    zip.finish()
}

/// torch names the folder after the file stem; keep it to safe characters.
fn sanitize_folder(stem: &str) -> String {
    let s: String =
        stem.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    if s.is_empty() || s.starts_with('.') {
        "archive".into()
    } else {
        s
    }
}
