//! `.safetensors` files: reading the header into the same shape a `.pth` takes (a dict of
//! tensor views over storages in the file), and the layout of files we write.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::pth::container::{ContainerKind, PthFile, StorageLocation};
use crate::pth::unpickle::StorageRef;
use crate::pth::{PthError, TensorView, Value};
use crate::DType;

/// The safetensors header limit (the crate's own).
const MAX_HEADER: u64 = 100_000_000;

/// True when the file starts like a safetensors file (u64 header length, then `{`).
pub fn looks_like_safetensors(head: &[u8], file_len: u64) -> bool {
    if head.len() < 9 || head[8] != b'{' {
        return false;
    }
    let n = u64::from_le_bytes(head[..8].try_into().unwrap());
    n <= MAX_HEADER && n + 8 <= file_len
}

/// Reads the header; each tensor becomes a view over its own storage (its byte range).
/// Tensors are listed in file order.
pub fn read_safetensors(file: &File) -> Result<(PthFile, HashMap<String, String>), PthError> {
    let len = file.metadata()?.len();
    let mut n = [0u8; 8];
    file.read_exact_at(&mut n, 0)?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || n + 8 > len {
        return Err(PthError::Safetensors(format!("header length {n} does not fit the file")));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact_at(&mut header, 8)?;
    let meta: safetensors::tensor::Metadata =
        serde_json::from_slice(&header).map_err(|e| PthError::Safetensors(format!("bad header: {e}")))?;
    let data_start = 8 + n;
    let mut entries: Vec<(String, &safetensors::tensor::TensorInfo)> = meta.tensors().into_iter().collect();
    entries.sort_by_key(|(_, info)| info.data_offsets);
    let mut items = Vec::with_capacity(entries.len());
    let mut storages = Vec::with_capacity(entries.len());
    for (name, info) in entries {
        let dtype = DType::from_safetensors_code(info.dtype)
            .ok_or_else(|| PthError::Safetensors(format!("tensor {name}: unsupported dtype {:?}", info.dtype)))?;
        let (start, end) = info.data_offsets;
        let numel = info.shape.iter().try_fold(1usize, |a, &n| a.checked_mul(n));
        let numel = numel.ok_or_else(|| PthError::Safetensors(format!("tensor {name}: shape {:?} overflows", info.shape)))?;
        let byte_len = end.saturating_sub(start) as u64;
        let fits = end >= start && (end as u64).checked_add(data_start).is_some_and(|e| e <= len);
        if !fits || Some(byte_len) != (numel as u64).checked_mul(dtype.size() as u64) {
            return Err(PthError::Safetensors(format!("tensor {name}: data offsets {start}..{end} do not fit its shape or the file")));
        }
        let storage = storages.len();
        storages.push(StorageLocation {
            storage: StorageRef { key: name.clone(), dtype, numel },
            file_offset: data_start + start as u64,
            byte_len,
            crc32: None,
        });
        let view = TensorView {
            dtype,
            strides: TensorView::contiguous_strides(&info.shape),
            shape: info.shape.clone(),
            offset: 0,
            storage,
            neg: false,
            conj: false,
        };
        items.push((Value::Str(name), Value::Tensor(view)));
    }
    let metadata = meta.metadata().clone().unwrap_or_default();
    Ok((PthFile { kind: ContainerKind::Safetensors, value: Value::Dict(items), storages, crcs_absent: false }, metadata))
}

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
        infos.push((name.to_string(), safetensors::tensor::TensorInfo { dtype: dtype.safetensors_code(), shape: shape.to_vec(), data_offsets: (offset, offset + n) }));
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
