//! The value tree a checkpoint's pickle decodes into. Nothing in it is executable: torch
//! tensors become `TensorView`s, builtin containers become values, and any other object
//! keeps only the qualified name of the class or function that would have built it.

use crate::DType;

/// One decoded pickle value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// Dicts and OrderedDicts, in pickle (insertion) order.
    Dict(Vec<(Value, Value)>),
    Tensor(TensorView),
    /// An integer beyond 64 bits, as its decimal digits (`-1267650600228229401496703205376`).
    BigInt(String),
    /// Anything else (argparse.Namespace, numpy scalars, mmengine objects …), by the
    /// qualified name of the global that would have built it. Never called.
    Opaque(String),
    /// A reference back to a container that encloses it (`d['self'] = d`): the cycle is cut
    /// here, so the tree stays finite.
    Cycle,
}

/// A tensor as torch's `_rebuild_tensor_v2` describes it: a strided view into a storage.
/// `offset` and `strides` are in elements, like torch's.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorView {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub strides: Vec<usize>,
    pub offset: usize,
    /// Index into the checkpoint's storage list.
    pub storage: usize,
    /// torch's negative bit (`_neg_view`, `z.conj().imag`): the values are the storage's
    /// negated. Applied whenever the tensor is read; such a view is never copied raw.
    pub neg: bool,
    /// torch's conjugate bit (complex only): the imaginary parts are the storage's negated.
    pub conj: bool,
}

impl TensorView {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }

    /// Row-major (C-contiguous) strides for `shape`.
    pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
        let mut strides = vec![0; shape.len()];
        let mut acc = 1usize;
        for i in (0..shape.len()).rev() {
            strides[i] = acc;
            acc = acc.saturating_mul(shape[i]);
        }
        strides
    }

    /// True when the tensor's values are its storage's bytes as they lie (no sign bit to
    /// apply), so they may be copied raw.
    pub fn is_raw(&self) -> bool {
        !(self.neg || (self.conj && self.dtype == DType::C64))
    }

    /// True when the elements lie row-major and gap-free from `offset` on (dimensions of
    /// size 1 may have any stride, as in torch).
    pub fn is_contiguous(&self) -> bool {
        if self.numel() == 0 {
            return true;
        }
        let mut expected = 1usize;
        for (&n, &s) in self.shape.iter().zip(&self.strides).rev() {
            if n != 1 && s != expected {
                return false;
            }
            expected *= n;
        }
        true
    }

    /// Number of elements, or `None` when the shape's product overflows.
    pub fn checked_numel(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |acc, &n| acc.checked_mul(n))
    }

    /// Bytes of the contiguous tensor, or `None` on overflow.
    pub fn checked_nbytes(&self) -> Option<usize> {
        self.checked_numel()?.checked_mul(self.dtype.size())
    }

    /// One past the largest element index the view touches (0 for an empty view), or
    /// `None` on overflow.
    pub fn extent(&self) -> Option<usize> {
        if self.checked_numel()? == 0 {
            return Some(0);
        }
        let mut last = self.offset;
        for (&n, &s) in self.shape.iter().zip(&self.strides) {
            last = last.checked_add((n - 1).checked_mul(s)?)?;
        }
        last.checked_add(1)
    }
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Looks a string key up in a dict.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v),
            _ => None,
        }
    }

    /// A short human summary of a non-tensor value (`3`, `opaque argparse.Namespace`,
    /// `dict (4 entries)`).
    pub fn summary(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => {
                if *b {
                    "True".into()
                } else {
                    "False".into()
                }
            }
            Value::Int(i) => i.to_string(),
            Value::Float(f) => format!("{f:?}"),
            Value::Str(s) if s.chars().count() <= 60 => format!("{s:?}"),
            Value::Str(s) => format!("str ({} chars)", s.chars().count()),
            Value::Bytes(b) => format!("bytes ({} bytes)", b.len()),
            Value::List(v) => format!("list ({} items)", v.len()),
            Value::Tuple(v) => format!("tuple ({} items)", v.len()),
            Value::Dict(v) => {
                let tensors = count_tensors(self);
                if tensors > 0 {
                    format!("dict ({} entries, {} tensors)", v.len(), tensors)
                } else {
                    format!("dict ({} entries)", v.len())
                }
            }
            Value::Tensor(t) => format!("tensor {} {:?}", t.dtype, t.shape),
            Value::BigInt(digits) => digits.clone(),
            Value::Opaque(name) => format!("opaque {name}"),
            Value::Cycle => "a reference back to an enclosing container (a cycle)".into(),
        }
    }
}

/// Number of tensors anywhere below `v`.
pub fn count_tensors(v: &Value) -> usize {
    match v {
        Value::Tensor(_) => 1,
        Value::List(items) | Value::Tuple(items) => items.iter().map(count_tensors).sum(),
        Value::Dict(items) => items.iter().map(|(_, v)| count_tensors(v)).sum(),
        _ => 0,
    }
}
