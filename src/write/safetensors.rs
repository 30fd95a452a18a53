//! The layout of the `.safetensors` files we write (the bytes are written by the converter,
//! file to file where it can).

use std::collections::HashMap;

use crate::formats::safetensors::MAX_HEADER;
use crate::DType;

/// Where everything goes in a safetensors file, laid out byte for byte as
/// `safetensors::serialize` lays out the same tensors with `{"format": "pt"}` metadata
/// (data in descending dtype order, then by name; the header padded to 8 bytes).
pub struct SafetensorsLayout {
    /// The first bytes of the file: the header's length (u64) and the header.
    pub head: Vec<u8>,
    /// Indices into the caller's tensors, in the order their bytes follow the head.
    pub order: Vec<usize>,
}

/// Lays out `tensors` (name, dtype, shape). We write the bytes ourselves, into the caller's
/// file: the crate's `serialize_to_file` makes a temporary file of its own next to the
/// destination, which an interrupt would leave behind, and it cannot copy file to file.
pub fn safetensors_layout(tensors: &[(&str, DType, &[usize])]) -> Result<SafetensorsLayout, String> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&l, &r| {
        let (ln, ld, _) = tensors[l];
        let (rn, rd, _) = tensors[r];
        rd.safetensors_code().cmp(&ld.safetensors_code()).then(ln.cmp(rn))
    });
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for &i in &order {
        let (name, dtype, shape) = tensors[i];
        let n = shape.iter().product::<usize>() * dtype.size();
        infos.push((
            name.to_string(),
            safetensors::tensor::TensorInfo {
                dtype: dtype.safetensors_code(),
                shape: shape.to_vec(),
                data_offsets: (offset, offset + n),
            },
        ));
        offset += n;
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let metadata = safetensors::tensor::Metadata::new(Some(metadata), infos).map_err(|e| e.to_string())?;
    let mut header = serde_json::to_string(&metadata).map_err(|e| e.to_string())?.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    if header.len() as u64 > MAX_HEADER {
        return Err(format!("safetensors header of {} bytes is too large", header.len()));
    }
    let mut head = (header.len() as u64).to_le_bytes().to_vec();
    head.extend_from_slice(&header);
    Ok(SafetensorsLayout { head, order })
}
