//! `.safetensors` files, read into the neutral model: a flat dict of tensor views, each over
//! its own storage (its byte range in the file).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use super::{ContainerKind, FormatError, ParsedFile, StorageLocation, StorageRef, TensorView, Value};
use crate::DType;

/// The safetensors header limit (the crate's own).
pub(crate) const MAX_HEADER: u64 = 100_000_000;

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
pub fn read_safetensors(file: &File) -> Result<(ParsedFile, HashMap<String, String>), FormatError> {
    let len = file.metadata()?.len();
    let mut n = [0u8; 8];
    file.read_exact_at(&mut n, 0)?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || n + 8 > len {
        return Err(FormatError::Safetensors(format!("header length {n} does not fit the file")));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact_at(&mut header, 8)?;
    let meta: safetensors::tensor::Metadata =
        serde_json::from_slice(&header).map_err(|e| FormatError::Safetensors(format!("bad header: {e}")))?;
    let data_start = 8 + n;
    let mut entries: Vec<(String, &safetensors::tensor::TensorInfo)> = meta.tensors().into_iter().collect();
    entries.sort_by_key(|(_, info)| info.data_offsets);
    let mut items = Vec::with_capacity(entries.len());
    let mut storages = Vec::with_capacity(entries.len());
    for (name, info) in entries {
        let dtype = DType::from_safetensors_code(info.dtype)
            .ok_or_else(|| FormatError::Safetensors(format!("tensor {name}: unsupported dtype {:?}", info.dtype)))?;
        let (start, end) = info.data_offsets;
        let numel = info.shape.iter().try_fold(1usize, |a, &n| a.checked_mul(n));
        let numel = numel
            .ok_or_else(|| FormatError::Safetensors(format!("tensor {name}: shape {:?} overflows", info.shape)))?;
        let byte_len = end.saturating_sub(start) as u64;
        let fits = end >= start && (end as u64).checked_add(data_start).is_some_and(|e| e <= len);
        if !fits || Some(byte_len) != (numel as u64).checked_mul(dtype.size() as u64) {
            return Err(FormatError::Safetensors(format!(
                "tensor {name}: data offsets {start}..{end} do not fit its shape or the file"
            )));
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
    Ok((
        ParsedFile { kind: ContainerKind::Safetensors, value: Value::Dict(items), storages, crcs_absent: false },
        metadata,
    ))
}
