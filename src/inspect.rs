//! What `ckptmap inspect` reports about a checkpoint, and what `ckptmap diff` finds between
//! two: plain data, printed by the CLI as text or JSON.

use serde::Serialize;

use crate::dtype::decode_f64;
use crate::formats::checkpoint::{Checkpoint, TensorEntry};
use crate::formats::value::count_tensors;
use crate::formats::Value;

/// Containers tried, in order, when looking for the state dict (the unwrap order of
/// beit2mmseg and unilm, plus a bare state dict).
pub const STATE_DICT_ROOTS: [&str; 4] = crate::mapping::table::DEFAULT_CONTAINERS;

#[derive(Serialize)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub numel: usize,
    pub bytes: usize,
}

#[derive(Serialize)]
pub struct RootInfo {
    pub path: String,
    pub tensors: usize,
    pub params: usize,
    pub bytes: usize,
}

#[derive(Serialize)]
pub struct InspectReport {
    /// The URL the file was downloaded from (set by the caller; `file` is the cached copy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    pub file: String,
    pub container: &'static str,
    /// `recorded`, `absent` (zip saved with CRC computation off: nothing was checked) or
    /// `none` (the format has no checksums).
    pub crc32: &'static str,
    /// The dict most likely to be the state dict (first of `STATE_DICT_ROOTS` holding tensors).
    pub state_dict: Option<String>,
    /// Top-level entries that hold tensors.
    pub roots: Vec<RootInfo>,
    /// Top-level entries without tensors, summarised (`epoch: 3`).
    pub other: Vec<(String, String)>,
    /// Safetensors `__metadata__` (string keys and values), sorted by key; empty for `.pth`.
    pub metadata: std::collections::BTreeMap<String, String>,
    pub tensors: Vec<TensorInfo>,
    pub total_params: usize,
    pub total_bytes: usize,
}

/// The first container of `STATE_DICT_ROOTS` that holds tensors.
pub fn find_state_dict(ckpt: &Checkpoint) -> Option<&'static str> {
    STATE_DICT_ROOTS
        .into_iter()
        .find(|p| ckpt.subtree(p).is_some_and(|v| matches!(v, Value::Dict(_)) && count_tensors(v) > 0))
}

fn tensor_info(t: &TensorEntry) -> TensorInfo {
    TensorInfo {
        name: t.name.clone(),
        dtype: t.view.dtype.name().to_string(),
        shape: t.view.shape.clone(),
        numel: t.view.numel(),
        bytes: t.view.nbytes(),
    }
}

pub fn inspect(ckpt: &Checkpoint) -> InspectReport {
    let tensors: Vec<TensorInfo> = ckpt.tensors().iter().map(tensor_info).collect();
    let mut roots = Vec::new();
    let mut other = Vec::new();
    match ckpt.root() {
        Value::Dict(items) if items.iter().any(|(_, v)| !matches!(v, Value::Tensor(_))) => {
            for (k, v) in items {
                let key = match k {
                    Value::Str(s) => s.clone(),
                    other => other.summary(),
                };
                if count_tensors(v) > 0 {
                    let ts = ckpt.tensors_under(&key).unwrap_or_default();
                    roots.push(RootInfo {
                        path: key,
                        tensors: ts.len(),
                        params: ts.iter().map(|t| t.view.numel()).sum(),
                        bytes: ts.iter().map(|t| t.view.nbytes()).sum(),
                    });
                } else {
                    other.push((key, v.summary()));
                }
            }
        }
        _ => roots.push(RootInfo {
            path: String::new(),
            tensors: tensors.len(),
            params: tensors.iter().map(|t| t.numel).sum(),
            bytes: tensors.iter().map(|t| t.bytes).sum(),
        }),
    }
    InspectReport {
        url: None,
        file: ckpt.path().display().to_string(),
        metadata: ckpt.metadata().iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        container: ckpt.kind().name(),
        crc32: ckpt.crc32_status(),
        state_dict: find_state_dict(ckpt).map(str::to_string),
        roots,
        other,
        total_params: tensors.iter().map(|t| t.numel).sum(),
        total_bytes: tensors.iter().map(|t| t.bytes).sum(),
        tensors,
    }
}

#[derive(Serialize)]
pub struct ValueDiff {
    pub name: String,
    /// max |a - b| after casting both to f64.
    pub max_abs_diff: f64,
    /// `max_abs_diff / max |a|` (infinite when A is all zeros and B is not).
    pub max_rel_diff: f64,
}

/// A shared name of equal shape stored in two dtypes: its values compared after casting
/// both to f64.
#[derive(Serialize)]
pub struct DtypeDiff {
    pub name: String,
    pub dtype_a: String,
    pub dtype_b: String,
    pub max_abs_diff: f64,
    pub max_rel_diff: f64,
}

#[derive(Serialize)]
pub struct DiffReport {
    pub a: String,
    pub b: String,
    pub only_in_a: Vec<String>,
    pub only_in_b: Vec<String>,
    /// Shared names whose shape differs: (name, A's dtype and shape, B's).
    pub mismatched: Vec<(String, String, String)>,
    /// Shared names of equal shape and dtype whose values differ.
    pub value_diffs: Vec<ValueDiff>,
    /// Shared names of equal shape in different dtypes, with their value differences.
    pub dtype_diffs: Vec<DtypeDiff>,
    pub compared: usize,
}

impl DiffReport {
    pub fn same(&self) -> bool {
        self.only_in_a.is_empty()
            && self.only_in_b.is_empty()
            && self.mismatched.is_empty()
            && self.value_diffs.is_empty()
            && self.dtype_diffs.is_empty()
    }
}

/// The tensors of the state dict at `root` (found automatically when None).
pub fn state_dict_tensors<'c>(c: &'c Checkpoint, root: Option<&str>) -> std::io::Result<Vec<TensorEntry<'c>>> {
    let root = root.or_else(|| find_state_dict(c)).unwrap_or("");
    c.tensors_under(root).ok_or_else(|| std::io::Error::other(format!("{}: no entry {root:?}", c.path().display())))
}

/// Compares the state dicts of two checkpoints (`root_*` = None: found automatically).
pub fn diff(a: &Checkpoint, b: &Checkpoint, root_a: Option<&str>, root_b: Option<&str>) -> std::io::Result<DiffReport> {
    let ta = state_dict_tensors(a, root_a)?;
    let tb = state_dict_tensors(b, root_b)?;
    let index_b: std::collections::HashMap<&str, &TensorEntry> = tb.iter().map(|t| (t.name.as_str(), t)).collect();
    let names_a: std::collections::HashSet<&str> = ta.iter().map(|t| t.name.as_str()).collect();
    let mut report = DiffReport {
        a: a.path().display().to_string(),
        b: b.path().display().to_string(),
        only_in_a: Vec::new(),
        only_in_b: tb.iter().filter(|t| !names_a.contains(t.name.as_str())).map(|t| t.name.clone()).collect(),
        mismatched: Vec::new(),
        value_diffs: Vec::new(),
        dtype_diffs: Vec::new(),
        compared: 0,
    };
    for t in &ta {
        let Some(u) = index_b.get(t.name.as_str()) else {
            report.only_in_a.push(t.name.clone());
            continue;
        };
        if t.view.shape != u.view.shape {
            let desc = |e: &TensorEntry| format!("{} {:?}", e.view.dtype, e.view.shape);
            report.mismatched.push((t.name.clone(), desc(t), desc(u)));
            continue;
        }
        report.compared += 1;
        let va = decode_f64(&a.read(t.view)?, t.view.dtype);
        let vb = decode_f64(&b.read(u.view)?, u.view.dtype);
        let mut max = 0.0f64;
        let mut scale = 0.0f64;
        for (x, y) in va.iter().zip(&vb) {
            let d = if x == y || (x.is_nan() && y.is_nan()) { 0.0 } else { (x - y).abs() };
            max = max.max(if d.is_nan() { f64::INFINITY } else { d });
            if x.is_finite() {
                scale = scale.max(x.abs());
            }
        }
        let rel = if max == 0.0 {
            0.0
        } else if scale > 0.0 {
            max / scale
        } else {
            f64::INFINITY
        };
        if t.view.dtype != u.view.dtype {
            report.dtype_diffs.push(DtypeDiff {
                name: t.name.clone(),
                dtype_a: t.view.dtype.name().to_string(),
                dtype_b: u.view.dtype.name().to_string(),
                max_abs_diff: max,
                max_rel_diff: rel,
            });
        } else if max > 0.0 {
            report.value_diffs.push(ValueDiff { name: t.name.clone(), max_abs_diff: max, max_rel_diff: rel });
        }
    }
    Ok(report)
}
