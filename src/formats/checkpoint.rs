//! A checkpoint on disk, opened lazily: its container kind, its value tree with tensor views,
//! and positioned reads of tensor bytes when (and only when) they are asked for.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::pth::read_container;
use super::{ContainerKind, FormatError, StorageLocation, TensorView, Value};

/// Bytes moved per read when streaming a contiguous tensor.
const CHUNK: usize = 8 << 20;
/// Most bytes a view with overlapping strides may expand its storage to when read.
pub const MAX_EXPANDED_VIEW_BYTES: u64 = 1 << 30;
/// Longest dotted tensor name, and most bytes all tensor names may take together (names
/// are paths of dict keys; a pickle could nest long keys deeply).
pub const MAX_NAME_BYTES: usize = 64 << 10;
pub const MAX_ALL_NAMES_BYTES: usize = 64 << 20;

/// An error about one checkpoint file: `<path>: <what is wrong>`.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct CheckpointError {
    pub path: PathBuf,
    #[source]
    pub source: FormatError,
}

/// An open checkpoint. Opening parses the pickle (or safetensors header) and the container
/// directory and checks every tensor view against its storage; no tensor data is read.
pub struct Checkpoint {
    path: PathBuf,
    file: File,
    kind: ContainerKind,
    root: Value,
    storages: Vec<StorageLocation>,
    metadata: HashMap<String, String>,
    crcs_absent: bool,
}

/// A tensor with its dotted path in the value tree.
#[derive(Clone, Debug)]
pub struct TensorEntry<'a> {
    pub name: String,
    pub view: &'a TensorView,
}

impl Checkpoint {
    pub fn open(path: &Path) -> Result<Checkpoint, CheckpointError> {
        let err = |source: FormatError| CheckpointError { path: path.to_path_buf(), source };
        let meta = std::fs::metadata(path).map_err(|e| err(e.into()))?;
        if meta.is_dir() {
            return Err(err(FormatError::Io(io::Error::other("is a directory, not a checkpoint file"))));
        }
        let mut file = File::open(path).map_err(|e| err(e.into()))?;
        let mut head = [0u8; 16];
        let n = file.read_at(&mut head, 0).map_err(|e| err(e.into()))?;
        let (parsed, metadata) = if super::safetensors::looks_like_safetensors(&head[..n], meta.len()) {
            super::safetensors::read_safetensors(&file).map_err(err)?
        } else {
            (read_container(&mut file).map_err(err)?, HashMap::new())
        };
        let ckpt = Checkpoint {
            path: path.to_path_buf(),
            file,
            kind: parsed.kind,
            root: parsed.value,
            storages: parsed.storages,
            metadata,
            crcs_absent: parsed.crcs_absent,
        };
        ckpt.check_views().map_err(err)?;
        Ok(ckpt)
    }

    fn check_views(&self) -> Result<(), FormatError> {
        check_names(&self.root)?;
        for t in self.tensors() {
            let loc = &self.storages[t.view.storage];
            let storage = &loc.storage;
            let nbytes = t
                .view
                .checked_nbytes()
                .ok_or_else(|| FormatError::BadView(format!("tensor {}: size {:?} overflows", t.name, t.view.shape)))?;
            let needed = t
                .view
                .extent()
                .ok_or_else(|| FormatError::BadView(format!("tensor {}: size/stride overflow", t.name)))?;
            // In bytes: a `_rebuild_tensor_v3` tensor counts its elements in its own dtype
            // over an untyped (byte) storage.
            let elem = t.view.dtype.size() as u64;
            let available = storage.numel as u64 * storage.dtype.size() as u64;
            if (needed as u64).saturating_mul(elem) > available {
                return Err(FormatError::ViewOutOfBounds {
                    name: t.name,
                    key: storage.key.clone(),
                    needed: needed as u64,
                    available: available / elem,
                });
            }
            // A view with overlapping strides (stride 0: torch's expand) has more elements
            // than its storage; reading it materializes them, so bound what a small file
            // can make us allocate.
            if nbytes as u64 > loc.byte_len && nbytes as u64 > MAX_EXPANDED_VIEW_BYTES {
                return Err(FormatError::BadView(format!(
                    "tensor {}: shape {:?} with strides {:?} expands {} bytes of storage {} to {nbytes} bytes (more than the {} allowed)",
                    t.name, t.view.shape, t.view.strides, loc.byte_len, storage.key, MAX_EXPANDED_VIEW_BYTES
                )));
            }
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn kind(&self) -> ContainerKind {
        self.kind
    }

    pub fn root(&self) -> &Value {
        &self.root
    }

    /// What integrity record the file carries: `recorded` (zip CRC-32s, checked whenever
    /// bytes are read), `absent` (a zip saved with CRC computation off: every CRC is 0, so
    /// nothing can be checked), `none` (legacy and safetensors files have none).
    pub fn crc32_status(&self) -> &'static str {
        match self.kind {
            ContainerKind::Zip if self.crcs_absent => "absent",
            ContainerKind::Zip => "recorded",
            _ => "none",
        }
    }

    /// Safetensors `__metadata__` (empty for `.pth`).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// The open file, for copies that go straight from it to an output.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Where a contiguous view's bytes lie in the file, and their CRC-32 when the container
    /// recorded one for exactly those bytes (a view that is its whole storage).
    pub fn byte_range(&self, view: &TensorView) -> Option<(u64, u64, Option<u32>)> {
        if !view.is_contiguous() || !view.is_raw() {
            return None;
        }
        let loc = &self.storages[view.storage];
        let elem = view.dtype.size() as u64;
        let start = loc.file_offset + view.offset as u64 * elem;
        let len = view.nbytes() as u64;
        let crc = loc.crc32.filter(|c| view.offset == 0 && c.len == len).map(|c| c.crc);
        Some((start, len, crc))
    }

    pub fn storage(&self, view: &TensorView) -> &StorageLocation {
        &self.storages[view.storage]
    }

    /// Checks the bytes under the given tensors against the CRC-32s the zip records for
    /// their storages (each storage once); storages without one (legacy, safetensors) pass.
    pub fn check_crcs<'t>(
        &self,
        tensors: impl IntoIterator<Item = &'t TensorEntry<'t>>,
    ) -> Result<(), CheckpointError> {
        let err = |source: FormatError| CheckpointError { path: self.path.clone(), source };
        let mut buf = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for t in tensors {
            if !seen.insert(t.view.storage) {
                continue;
            }
            let loc = &self.storages[t.view.storage];
            let Some(recorded) = loc.crc32 else { continue };
            buf.resize(CHUNK.min(recorded.len as usize), 0);
            let mut h = crc32fast::Hasher::new();
            let mut done = 0u64;
            while done < recorded.len {
                let n = ((recorded.len - done) as usize).min(buf.len());
                self.file.read_exact_at(&mut buf[..n], loc.file_offset + done).map_err(|e| err(e.into()))?;
                h.update(&buf[..n]);
                done += n as u64;
            }
            let actual = h.finalize();
            if actual != recorded.crc {
                let what = format!("tensor {} (storage {})", t.name, loc.storage.key);
                return Err(err(FormatError::CrcMismatch { what, recorded: recorded.crc, actual }));
            }
        }
        Ok(())
    }

    /// The value at a dotted path of dict keys (`state_dict.backbone`); `""` is the root.
    /// A key may itself contain dots: the longest matching key is tried first.
    pub fn subtree(&self, path: &str) -> Option<&Value> {
        subtree(&self.root, path)
    }

    /// Every tensor in the file, with its full dotted path, in pickle order.
    pub fn tensors(&self) -> Vec<TensorEntry<'_>> {
        let mut out = Vec::new();
        collect_tensors(&self.root, String::new(), &mut out);
        out
    }

    /// The tensors below `path`, named relative to it.
    pub fn tensors_under(&self, path: &str) -> Option<Vec<TensorEntry<'_>>> {
        let v = self.subtree(path)?;
        // A container is a dict (or list); a tensor that happens to be named `model` in a
        // flat state dict is not one.
        if matches!(v, Value::Tensor(_)) && !path.is_empty() {
            return None;
        }
        let mut out = Vec::new();
        collect_tensors(v, String::new(), &mut out);
        Some(out)
    }

    /// Reads a tensor's elements as contiguous little-endian bytes (strided views gathered).
    pub fn read(&self, view: &TensorView) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(view.nbytes());
        self.write_to(view, &mut out)?;
        Ok(out)
    }

    /// Streams a tensor's contiguous bytes into `out`: positioned reads in large chunks for
    /// contiguous views, a gather for strided ones. A view that is a whole zip entry is
    /// checked against the entry's CRC-32 (an error after the last byte: the caller must
    /// not keep what it wrote).
    pub fn write_to(&self, view: &TensorView, out: &mut dyn Write) -> io::Result<()> {
        if !view.is_raw() {
            // A view with torch's negative or conjugate bit: gather the stored values, then
            // apply the bit, as torch does when it reads the tensor.
            let mut bytes = Vec::with_capacity(view.nbytes());
            let raw = TensorView { neg: false, conj: false, ..view.clone() };
            self.write_to(&raw, &mut bytes)?;
            apply_sign_bits(&mut bytes, view);
            return out.write_all(&bytes);
        }
        let loc = &self.storages[view.storage];
        let elem = view.dtype.size() as u64;
        let start = loc.file_offset + view.offset as u64 * elem;
        if view.is_contiguous() {
            let mut remaining = view.nbytes();
            let recorded = loc.crc32.filter(|c| view.offset == 0 && c.len == remaining as u64);
            let mut h = crc32fast::Hasher::new();
            let mut pos = start;
            let mut buf = vec![0u8; remaining.min(CHUNK)];
            while remaining > 0 {
                let n = remaining.min(CHUNK);
                self.file.read_exact_at(&mut buf[..n], pos)?;
                if recorded.is_some() {
                    h.update(&buf[..n]);
                }
                out.write_all(&buf[..n])?;
                pos += n as u64;
                remaining -= n;
            }
            if let Some(recorded) = recorded {
                let actual = h.finalize();
                if actual != recorded.crc {
                    let e = FormatError::CrcMismatch {
                        what: format!("storage {}", loc.storage.key),
                        recorded: recorded.crc,
                        actual,
                    };
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()));
                }
            }
            return Ok(());
        }
        // Strided: read the span the view covers once, then pick elements row-major.
        let extent = view.extent().unwrap_or(0) - view.offset;
        let mut span = vec![0u8; extent * elem as usize];
        self.file.read_exact_at(&mut span, start)?;
        let mut gathered = Vec::with_capacity(view.nbytes());
        let e = elem as usize;
        for_each_index(&view.shape, &view.strides, |i| gathered.extend_from_slice(&span[i * e..(i + 1) * e]));
        out.write_all(&gathered)
    }
}

/// Negates the values of a view read with its negative bit (every component) or conjugate
/// bit (imaginary parts of complex values), in place, as torch's `resolve_neg`/`resolve_conj`.
fn apply_sign_bits(bytes: &mut [u8], view: &TensorView) {
    use crate::DType as D;
    let complex = view.dtype == D::C64;
    // (component size, which components of an element to negate)
    let (size, real, imag) = match view.dtype {
        D::C64 => (4, view.neg, view.neg != view.conj),
        d => (d.size(), view.neg, false),
    };
    let step = if complex { 2 * size } else { size };
    for el in bytes.chunks_exact_mut(step) {
        let (re, im) = el.split_at_mut(size);
        if real {
            negate(re, view.dtype);
        }
        if complex && imag {
            negate(im, view.dtype);
        }
    }
}

/// Negates one little-endian value in place: floats flip their sign bit (as torch's neg
/// does, NaN included), integers wrap.
fn negate(v: &mut [u8], dtype: crate::DType) {
    use crate::DType as D;
    match dtype {
        D::I64 => v.copy_from_slice(&i64::from_le_bytes(v[..].try_into().unwrap()).wrapping_neg().to_le_bytes()),
        D::I32 => v.copy_from_slice(&i32::from_le_bytes(v[..].try_into().unwrap()).wrapping_neg().to_le_bytes()),
        D::I16 => v.copy_from_slice(&i16::from_le_bytes(v[..].try_into().unwrap()).wrapping_neg().to_le_bytes()),
        D::I8 => v[0] = (v[0] as i8).wrapping_neg() as u8,
        D::U64 => v.copy_from_slice(&u64::from_le_bytes(v[..].try_into().unwrap()).wrapping_neg().to_le_bytes()),
        D::U32 => v.copy_from_slice(&u32::from_le_bytes(v[..].try_into().unwrap()).wrapping_neg().to_le_bytes()),
        D::U16 => v.copy_from_slice(&u16::from_le_bytes(v[..].try_into().unwrap()).wrapping_neg().to_le_bytes()),
        D::U8 => v[0] = v[0].wrapping_neg(),
        D::Bool => {}
        // Every float format here keeps its sign in the top bit.
        _ => *v.last_mut().unwrap() ^= 0x80,
    }
}

/// Calls `f` with the element index (relative to the view's offset) of each element, in
/// row-major order.
fn for_each_index(shape: &[usize], strides: &[usize], mut f: impl FnMut(usize)) {
    if shape.contains(&0) {
        return;
    }
    let mut idx = vec![0usize; shape.len()];
    loop {
        f(idx.iter().zip(strides).map(|(i, s)| i * s).sum());
        let mut d = shape.len();
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// Checks the length of every tensor's dotted name, without building the names.
fn check_names(root: &Value) -> Result<(), FormatError> {
    fn walk(v: &Value, len: usize, total: &mut usize) -> Result<(), FormatError> {
        let child = |k: usize| if len == 0 { k } else { len + 1 + k };
        match v {
            Value::Tensor(_) => {
                if len > MAX_NAME_BYTES {
                    return Err(FormatError::BadView(format!(
                        "a tensor's name is {len} bytes long, more than the {MAX_NAME_BYTES} allowed"
                    )));
                }
                *total += len;
                if *total > MAX_ALL_NAMES_BYTES {
                    return Err(FormatError::BadView(format!(
                        "tensor names take more than {MAX_ALL_NAMES_BYTES} bytes"
                    )));
                }
            }
            Value::Dict(items) => {
                for (k, c) in items {
                    let klen = match k {
                        Value::Str(s) => s.len(),
                        other => key_text(other).len(),
                    };
                    walk(c, child(klen), total)?;
                }
            }
            Value::List(items) | Value::Tuple(items) => {
                for (i, c) in items.iter().enumerate() {
                    walk(c, child(i.to_string().len()), total)?;
                }
            }
            _ => {}
        }
        Ok(())
    }
    walk(root, 0, &mut 0)
}

fn subtree<'v>(v: &'v Value, path: &str) -> Option<&'v Value> {
    if path.is_empty() {
        return Some(v);
    }
    let Value::Dict(items) = v else { return None };
    // Longest key first, so `a.b` as one key wins over `a` then `b`.
    let mut candidates: Vec<&(Value, Value)> = items
        .iter()
        .filter(|(k, _)| k.as_str().is_some_and(|k| path == k || path.starts_with(&format!("{k}."))))
        .collect();
    candidates.sort_by_key(|(k, _)| std::cmp::Reverse(k.as_str().map_or(0, str::len)));
    for (k, child) in candidates {
        let k = k.as_str().unwrap();
        let rest = if path.len() == k.len() { "" } else { &path[k.len() + 1..] };
        if let Some(found) = subtree(child, rest) {
            return Some(found);
        }
    }
    None
}

fn key_text(k: &Value) -> String {
    match k {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        other => other.summary(),
    }
}

fn collect_tensors<'v>(v: &'v Value, prefix: String, out: &mut Vec<TensorEntry<'v>>) {
    let join = |k: String| if prefix.is_empty() { k } else { format!("{prefix}.{k}") };
    match v {
        Value::Tensor(t) => out.push(TensorEntry { name: prefix, view: t }),
        Value::Dict(items) => {
            for (k, child) in items {
                collect_tensors(child, join(key_text(k)), out);
            }
        }
        Value::List(items) | Value::Tuple(items) => {
            for (i, child) in items.iter().enumerate() {
                collect_tensors(child, join(i.to_string()), out);
            }
        }
        _ => {}
    }
}
