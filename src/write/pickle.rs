//! Emits the `data.pkl` that `torch.save` writes for a flat `OrderedDict` of tensors, byte
//! for byte as CPython's protocol-2 pickler does (memo PUTs, GETs of repeated globals and
//! strings, SETITEMS batches of 1000), or for a plain dict around one
//! (`{'meta': {…}, 'state_dict': OrderedDict(…)}`, a segmentor) whose other values are plain
//! (None, bools, ints, floats, strings, lists, tuples, dicts), pickled as CPython pickles
//! them. Only opcodes and globals that `torch.load(weights_only=True)` accepts are used: the
//! only globals are `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2/v3`, the
//! storage classes and dtypes; anything else is refused, never written.

use std::collections::HashMap;

use crate::formats::Value;
use crate::DType;

/// One entry of the state dict: storage `storage_key` holds exactly this tensor,
/// contiguous, from offset 0.
pub struct PickledTensor<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
}

/// CPython pickles dict items in batches of this many.
const BATCH: usize = 1000;

struct Emitter {
    out: Vec<u8>,
    memo_len: u32,
    /// Objects that are the same Python object every time (globals, literal strings).
    shared: HashMap<String, u32>,
}

impl Emitter {
    fn put(&mut self) {
        let id = self.memo_len;
        if id < 256 {
            self.out.extend_from_slice(&[b'q', id as u8]);
        } else {
            self.out.push(b'r');
            self.out.extend_from_slice(&id.to_le_bytes());
        }
        self.memo_len += 1;
    }

    fn get(&mut self, id: u32) {
        if id < 256 {
            self.out.extend_from_slice(&[b'h', id as u8]);
        } else {
            self.out.push(b'j');
            self.out.extend_from_slice(&id.to_le_bytes());
        }
    }

    /// Emits a shared object once, then memo GETs of it.
    fn shared(&mut self, key: &str, emit: impl FnOnce(&mut Self)) {
        if let Some(&id) = self.shared.get(key) {
            self.get(id);
        } else {
            emit(self);
            self.shared.insert(key.to_string(), self.memo_len);
            self.put();
        }
    }

    fn global(&mut self, module: &str, name: &str) {
        self.shared(&format!("global:{module}.{name}"), |e| {
            e.out.push(b'c');
            e.out.extend_from_slice(module.as_bytes());
            e.out.push(b'\n');
            e.out.extend_from_slice(name.as_bytes());
            e.out.push(b'\n');
        });
    }

    fn raw_str(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }

    /// A string that is a fresh object (memoized, never referenced again).
    fn str(&mut self, s: &str) {
        self.raw_str(s);
        self.put();
    }

    /// A string literal of torch's code, hence the same object on every use.
    fn literal(&mut self, s: &str) {
        self.shared(&format!("str:{s}"), |e| e.raw_str(s));
    }

    fn int(&mut self, v: i64) {
        if (0..256).contains(&v) {
            self.out.extend_from_slice(&[b'K', v as u8]);
        } else if (0..65536).contains(&v) {
            self.out.push(b'M');
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else if let Ok(v) = i32::try_from(v) {
            self.out.push(b'J');
            self.out.extend_from_slice(&v.to_le_bytes());
        } else {
            // LONG1: minimal little-endian two's complement.
            let bytes = v.to_le_bytes();
            let mut n = 8;
            while n > 1 {
                let top = bytes[n - 1];
                let next_sign = bytes[n - 2] & 0x80;
                if (top == 0 && next_sign == 0) || (top == 0xff && next_sign != 0) {
                    n -= 1;
                } else {
                    break;
                }
            }
            self.out.extend_from_slice(&[0x8a, n as u8]);
            self.out.extend_from_slice(&bytes[..n]);
        }
    }

    /// A tuple of ints, as CPython writes a fresh tuple object.
    fn int_tuple(&mut self, items: &[usize]) {
        match items.len() {
            0 => self.out.push(b')'),
            n @ 1..=3 => {
                for &i in items {
                    self.int(i as i64);
                }
                self.out.push(0x84 + n as u8);
                self.put();
            }
            _ => {
                self.out.push(b'(');
                for &i in items {
                    self.int(i as i64);
                }
                self.out.push(b't');
                self.put();
            }
        }
    }

    fn empty_ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.out.push(b')');
        self.out.push(b'R');
        self.put();
    }

    /// `_rebuild_tensor_v2` over a typed storage, or, for the dtypes with no legacy storage
    /// class (float8s, uint16-64), `_rebuild_tensor_v3` over an untyped one with the dtype
    /// last, as torch writes them.
    fn tensor(&mut self, t: &PickledTensor, storage_key: &str) {
        let class = t.dtype.storage_class();
        let numel = t.shape.iter().product::<usize>();
        self.global("torch._utils", if class.is_some() { "_rebuild_tensor_v2" } else { "_rebuild_tensor_v3" });
        self.out.push(b'(');
        // Persistent id ('storage', <Type>Storage, key, 'cpu', numel); untyped: in bytes.
        self.out.push(b'(');
        self.literal("storage");
        match class {
            Some(class) => self.global("torch", class),
            None => self.global("torch.storage", "UntypedStorage"),
        }
        self.str(storage_key);
        self.literal("cpu");
        self.int(if class.is_some() { numel } else { numel * t.dtype.size() } as i64);
        self.out.push(b't');
        self.put();
        self.out.push(b'Q');
        self.int(0);
        self.int_tuple(t.shape);
        self.int_tuple(&crate::formats::TensorView::contiguous_strides(t.shape));
        self.out.push(0x89); // requires_grad=False
        self.empty_ordered_dict(); // backward_hooks
        if class.is_none() {
            self.global("torch", t.dtype.torch_name());
        }
        self.out.push(b't');
        self.put();
        self.out.push(b'R');
        self.put();
    }
}

impl Emitter {
    /// The state dict: an `OrderedDict` whose i-th tensor lives in storage `"i"`.
    fn state_dict(&mut self, tensors: &[PickledTensor]) {
        self.empty_ordered_dict();
        let mut next = 0usize;
        for batch in tensors.chunks(BATCH) {
            if batch.len() > 1 {
                self.out.push(b'(');
            }
            for t in batch {
                self.str(t.name);
                self.tensor(t, &next.to_string());
                next += 1;
            }
            self.out.push(if batch.len() > 1 { b'u' } else { b's' });
        }
    }

    /// A plain value as CPython's protocol-2 pickler writes a fresh object of it (every
    /// container and string memoized, never referenced again). `path` names it in the error
    /// for anything that is not plain.
    fn plain(&mut self, v: &Value, path: &str) -> Result<(), String> {
        match v {
            Value::None => self.out.push(b'N'),
            Value::Bool(b) => self.out.push(if *b { 0x88 } else { 0x89 }),
            Value::Int(i) => self.int(*i),
            Value::Float(f) => {
                self.out.push(b'G');
                self.out.extend_from_slice(&f.to_be_bytes());
            }
            Value::Str(s) => self.str(s),
            Value::List(items) => {
                self.out.push(b']');
                self.put();
                for (n, batch) in items.chunks(BATCH).enumerate() {
                    if batch.len() > 1 {
                        self.out.push(b'(');
                    }
                    for (i, item) in batch.iter().enumerate() {
                        self.plain(item, &format!("{path}[{}]", n * BATCH + i))?;
                    }
                    self.out.push(if batch.len() > 1 { b'e' } else { b'a' });
                }
            }
            Value::Tuple(items) => match items.len() {
                0 => self.out.push(b')'),
                n => {
                    if n > 3 {
                        self.out.push(b'(');
                    }
                    for (i, item) in items.iter().enumerate() {
                        self.plain(item, &format!("{path}[{i}]"))?;
                    }
                    self.out.push(if n > 3 { b't' } else { 0x84 + n as u8 });
                    self.put();
                }
            },
            Value::Dict(items) => {
                self.out.push(b'}');
                self.put();
                for batch in items.chunks(BATCH) {
                    if batch.len() > 1 {
                        self.out.push(b'(');
                    }
                    for (k, item) in batch {
                        let p = format!("{path}[{}]", k.summary());
                        if !matches!(
                            k,
                            Value::None
                                | Value::Bool(_)
                                | Value::Int(_)
                                | Value::Float(_)
                                | Value::Str(_)
                                | Value::Tuple(_)
                        ) {
                            return Err(format!("{p}: a dict key that is not a plain value ({})", k.summary()));
                        }
                        self.plain(k, &p)?;
                        self.plain(item, &p)?;
                    }
                    self.out.push(if batch.len() > 1 { b'u' } else { b's' });
                }
            }
            other => {
                return Err(format!(
                    "{path}: {} is not a plain value; torch.load(weights_only=True) would refuse it",
                    other.summary()
                ))
            }
        }
        Ok(())
    }
}

/// The `data.pkl` of a flat state dict whose i-th tensor lives in storage `"i"`.
pub fn state_dict_pickle(tensors: &[PickledTensor]) -> Vec<u8> {
    checkpoint_pickle(tensors, &[]).expect("a flat state dict has no values to refuse")
}

/// One entry of a nested file's top-level dict.
pub enum TopEntry<'a> {
    /// The state dict (the tensors), under this key.
    StateDict(&'a str),
    /// A plain value under this key (a segmentor's `meta`).
    Plain(&'a str, &'a Value),
}

/// The `data.pkl` of a file: the flat state dict when `top` is empty, else a plain dict of
/// `top`'s entries in order (`{'meta': …, 'state_dict': OrderedDict(…)}`). Refuses a value
/// that is not plain (its path in the error): such a file would not load with
/// `weights_only=True`.
pub fn checkpoint_pickle(tensors: &[PickledTensor], top: &[TopEntry]) -> Result<Vec<u8>, String> {
    let mut e = Emitter { out: vec![0x80, 2], memo_len: 0, shared: HashMap::new() };
    if top.is_empty() {
        e.state_dict(tensors);
    } else {
        if top.iter().filter(|t| matches!(t, TopEntry::StateDict(_))).count() != 1 {
            return Err("a nested file holds exactly one state dict".into());
        }
        e.out.push(b'}');
        e.put();
        if top.len() > 1 {
            e.out.push(b'(');
        }
        for entry in top {
            match entry {
                TopEntry::StateDict(key) => {
                    e.str(key);
                    e.state_dict(tensors);
                }
                TopEntry::Plain(key, v) => {
                    e.str(key);
                    e.plain(v, key)?;
                }
            }
        }
        e.out.push(if top.len() > 1 { b'u' } else { b's' });
    }
    e.out.push(b'.');
    Ok(e.out)
}
