//! Writes a flat state dict as the zip container `torch.save` produces: stored entries,
//! 64-byte aligned data, everything under one folder, records `data.pkl`, `byteorder`,
//! `data/0..N`, `version`. `.format_version` is left out on purpose: with it, newer torch
//! computes storage offsets arithmetically assuming miniz's exact layout.

use std::io::{self, Write};

use zip::write::SimpleFileOptions;

use super::pickle_write::{state_dict_pickle, PickledTensor};
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

/// Counts bytes on their way to the zip entry, to hold the caller to `nbytes`.
struct Counted<'w, W: Write> {
    inner: &'w mut W,
    written: u64,
}

impl<W: Write> Write for Counted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.inner.write_all(buf)?;
        self.written += buf.len() as u64;
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn zip_err(e: zip::result::ZipError) -> io::Error {
    io::Error::other(e)
}

/// Writes the archive to `out`. `folder` is the record prefix torch uses (the file stem).
/// `fill(i, w)` must write exactly the i-th tensor's bytes, little-endian, row-major.
pub fn write_pth<W: Write + io::Seek>(
    out: W,
    folder: &str,
    tensors: &[TensorToWrite],
    mut fill: impl FnMut(usize, &mut dyn Write) -> io::Result<()>,
) -> io::Result<W> {
    let folder = sanitize_folder(folder);
    let mut zip = zip::ZipWriter::new(out);
    let options = |len: u64| {
        SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .with_alignment(64)
            .large_file(len >= u32::MAX as u64)
            .last_modified_time(zip::DateTime::default())
    };

    let pickled: Vec<PickledTensor> =
        tensors.iter().map(|t| PickledTensor { name: t.name, dtype: t.dtype, shape: t.shape }).collect();
    let pkl = state_dict_pickle(&pickled);
    zip.start_file(format!("{folder}/data.pkl"), options(pkl.len() as u64)).map_err(zip_err)?;
    zip.write_all(&pkl)?;
    zip.start_file(format!("{folder}/byteorder"), options(6)).map_err(zip_err)?;
    zip.write_all(b"little")?;
    for (i, t) in tensors.iter().enumerate() {
        let nbytes = t.nbytes();
        zip.start_file(format!("{folder}/data/{i}"), options(nbytes)).map_err(zip_err)?;
        let mut counted = Counted { inner: &mut zip, written: 0 };
        fill(i, &mut counted)?;
        if counted.written != nbytes {
            return Err(io::Error::other(format!(
                "tensor {} produced {} bytes, expected {nbytes}",
                t.name, counted.written
            )));
        }
    }
    zip.start_file(format!("{folder}/version"), options(2)).map_err(zip_err)?;
    zip.write_all(b"3\n")?;
    zip.finish().map_err(zip_err)
}

/// torch names the folder after the file stem; keep it to safe characters.
fn sanitize_folder(stem: &str) -> String {
    let s: String = stem
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' })
        .collect();
    if s.is_empty() || s.starts_with('.') { "archive".into() } else { s }
}
