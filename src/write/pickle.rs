//! Emits the `data.pkl` that `torch.save` writes for a flat `OrderedDict` of tensors, byte
//! for byte as CPython's protocol-2 pickler does (memo PUTs, GETs of repeated globals and
//! strings, SETITEMS batches of 1000). Only opcodes and globals that
//! `torch.load(weights_only=True)` accepts are used.

use std::collections::HashMap;

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

/// The `data.pkl` of a flat state dict whose i-th tensor lives in storage `"i"`.
pub fn state_dict_pickle(tensors: &[PickledTensor]) -> Vec<u8> {
    let mut e = Emitter { out: vec![0x80, 2], memo_len: 0, shared: HashMap::new() };
    e.empty_ordered_dict();
    let mut next = 0usize;
    for batch in tensors.chunks(BATCH) {
        if batch.len() > 1 {
            e.out.push(b'(');
        }
        for t in batch {
            e.str(t.name);
            e.tensor(t, &next.to_string());
            next += 1;
        }
        e.out.push(if batch.len() > 1 { b'u' } else { b's' });
    }
    e.out.push(b'.');
    e.out
}
