//! A pickle virtual machine that interprets opcodes into a `Value` tree and never executes
//! anything. torch's tensor-rebuild functions and storage classes are recognised by name;
//! every other global becomes an opaque value.
//!
//! The VM keeps objects in an arena and lets the stack and memo hold indices into it, so a
//! memo reference is O(1) and mutations through one reference are seen through all (as in
//! Python). The tree is built at the end, with limits on depth and total size that stop
//! memo bombs and deep nesting with an error instead of a crash.

use std::collections::HashMap;

use crate::formats::{FormatError, StorageRef, TensorView, Value};
use crate::DType;

/// Deepest nesting the tree may have (a state dict needs about 5).
pub const MAX_DEPTH: usize = 256;
/// Most values the tree may expand to (memo references count each time they are used).
pub const MAX_TREE_NODES: usize = 2_000_000;
/// Most objects the VM may create, and most entries its stack may hold at once (a state
/// dict's pickle makes about 20 per tensor).
pub const MAX_OBJECTS: usize = 10_000_000;
/// Most entries the memo may hold.
pub const MAX_MEMO: usize = 10_000_000;
/// Memory the VM's objects and the tree's values may take beyond twice the pickle's own
/// length: copies made by REDUCEs of a big list or string, or memo references expanded in
/// the tree, count each time.
pub const MAX_EXPANSION_BYTES: usize = 256 << 20;
/// Most dimensions a tensor may have (torch's own limit is 64 too).
pub const MAX_DIMS: usize = 64;
/// How deeply `_rebuild_from_type_v2` calls may nest (torch nests one).
const MAX_REBUILD_NESTING: usize = 8;

/// The result of unpickling: the tree, the storages it references (in order of first
/// reference) and how many bytes of input the pickle used.
#[derive(Debug)]
pub struct Unpickled {
    pub value: Value,
    pub storages: Vec<StorageRef>,
    pub consumed: usize,
}

type Id = usize;

#[derive(Clone, Debug)]
enum Node {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Id>),
    Tuple(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Global(String, String),
    /// A storage from a persistent id: index into `storages`, extra element offset (legacy views).
    Storage(usize, usize),
    Tensor(TensorView),
    /// A tensor whose rebuild arguments are invalid: an error once the tree is built, when
    /// the tensor's place (its dotted key) is known.
    BadTensor(String),
    /// A storage of a type ckptmap cannot carry: what it is, for the tensors built on it.
    BadStorage(String),
    BigInt(String),
    Opaque(String),
}

#[derive(Clone, Copy)]
enum Slot {
    Mark,
    Obj(Id),
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    arena: Vec<Node>,
    stack: Vec<Slot>,
    memo: HashMap<u32, Id>,
    storages: Vec<StorageRef>,
    storage_index: HashMap<String, usize>,
    /// Approximate bytes held by the arena's nodes and what they own.
    weight: usize,
    /// The most `weight` (and the tree's size) may reach.
    weight_limit: usize,
}

/// Unpickles one pickle from the start of `data`. Bytes after STOP are ignored (legacy
/// checkpoints put several pickles and raw data one after another).
pub fn unpickle(data: &[u8]) -> Result<Unpickled, FormatError> {
    let mut vm = Vm {
        data,
        pos: 0,
        arena: Vec::new(),
        stack: Vec::new(),
        memo: HashMap::new(),
        storages: Vec::new(),
        storage_index: HashMap::new(),
        weight: 0,
        weight_limit: MAX_EXPANSION_BYTES.saturating_add(data.len().saturating_mul(2)),
    };
    let root = vm.run()?;
    let mut budget = TreeBudget { nodes: MAX_TREE_NODES, bytes: vm.weight_limit, open: vec![false; vm.arena.len()] };
    let value = vm.to_value(root, 0, &mut budget)?;
    Ok(Unpickled { value, storages: vm.storages, consumed: vm.pos })
}

fn bad(msg: impl Into<String>) -> FormatError {
    FormatError::Pickle(msg.into())
}

/// What the tree may still grow by: values, and bytes (values plus their strings).
struct TreeBudget {
    nodes: usize,
    bytes: usize,
    /// The containers being built on the path from the root: meeting one again is a cycle.
    open: Vec<bool>,
}

/// Approximate memory a node takes, with what it owns.
fn node_weight(node: &Node) -> usize {
    let id = std::mem::size_of::<Id>();
    std::mem::size_of::<Node>()
        + match node {
            Node::Str(s) | Node::Opaque(s) | Node::BadTensor(s) | Node::BadStorage(s) | Node::BigInt(s) => s.len(),
            Node::Bytes(b) => b.len(),
            Node::List(v) | Node::Tuple(v) => v.len() * id,
            Node::Dict(v) => v.len() * 2 * id,
            Node::Global(m, n) => m.len() + n.len(),
            Node::Tensor(t) => (t.shape.len() + t.strides.len()) * std::mem::size_of::<usize>(),
            _ => 0,
        }
}

impl<'a> Vm<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        match end {
            Some(end) => {
                let s = &self.data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(FormatError::PickleTruncated),
        }
    }

    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn len_u64(&mut self) -> Result<usize, FormatError> {
        usize::try_from(self.u64()?).map_err(|_| bad("length does not fit in memory"))
    }

    fn line(&mut self) -> Result<&'a str, FormatError> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or(FormatError::PickleTruncated)?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| bad("text opcode argument is not UTF-8"))?;
        self.pos += n + 1;
        Ok(s)
    }

    fn alloc(&mut self, node: Node) -> Id {
        self.weight = self.weight.saturating_add(node_weight(&node));
        self.arena.push(node);
        self.arena.len() - 1
    }

    /// The limits on what the VM holds, checked before each opcode (one opcode can add at
    /// most one object's worth, bounded by what already exists).
    fn check_limits(&self) -> Result<(), FormatError> {
        if self.arena.len() > MAX_OBJECTS {
            return Err(FormatError::TooMany { what: "objects", limit: MAX_OBJECTS });
        }
        if self.stack.len() > MAX_OBJECTS {
            return Err(FormatError::TooMany { what: "stack entries", limit: MAX_OBJECTS });
        }
        if self.memo.len() > MAX_MEMO {
            return Err(FormatError::TooMany { what: "memo entries", limit: MAX_MEMO });
        }
        if self.weight > self.weight_limit {
            return Err(FormatError::TooBig { mib: self.weight_limit >> 20 });
        }
        Ok(())
    }

    fn push(&mut self, node: Node) {
        let id = self.alloc(node);
        self.stack.push(Slot::Obj(id));
    }

    fn pop(&mut self) -> Result<Id, FormatError> {
        match self.stack.pop() {
            Some(Slot::Obj(id)) => Ok(id),
            Some(Slot::Mark) => Err(bad("unexpected MARK on the stack")),
            None => Err(bad("stack underflow")),
        }
    }

    fn top(&self) -> Result<Id, FormatError> {
        match self.stack.last() {
            Some(Slot::Obj(id)) => Ok(*id),
            Some(Slot::Mark) => Err(bad("unexpected MARK on the stack")),
            None => Err(bad("stack underflow")),
        }
    }

    /// Pops everything down to the topmost MARK (and the mark itself).
    fn pop_mark(&mut self) -> Result<Vec<Id>, FormatError> {
        let at = self.stack.iter().rposition(|s| matches!(s, Slot::Mark)).ok_or_else(|| bad("no MARK on the stack"))?;
        let items = self.stack.drain(at + 1..).map(|s| match s {
            Slot::Obj(id) => id,
            Slot::Mark => unreachable!(),
        });
        let items = items.collect();
        self.stack.pop();
        Ok(items)
    }

    fn memo_get(&self, key: u32) -> Result<Id, FormatError> {
        self.memo.get(&key).copied().ok_or(FormatError::MemoMissing(key))
    }

    fn memo_put(&mut self, key: u32) -> Result<(), FormatError> {
        let id = self.top()?;
        self.memo.insert(key, id);
        Ok(())
    }

    fn run(&mut self) -> Result<Id, FormatError> {
        loop {
            self.check_limits()?;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(bad(format!("unsupported pickle protocol {proto}")));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint only
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Slot::Mark),
                b'0' => {
                    self.stack.pop().ok_or_else(|| bad("stack underflow"))?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let id = self.top()?;
                    self.stack.push(Slot::Obj(id));
                }
                b'N' => self.push(Node::None),
                0x88 => self.push(Node::Bool(true)),
                0x89 => self.push(Node::Bool(false)),
                b'I' => {
                    let s = self.line()?;
                    let node = match s {
                        "01" => Node::Bool(true),
                        "00" => Node::Bool(false),
                        _ => Node::Int(s.trim().parse().map_err(|_| bad(format!("bad INT {s:?}")))?),
                    };
                    self.push(node);
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Node::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Node::Int(v as i64));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Node::Int(v as i64));
                }
                b'L' => {
                    let s = self.line()?;
                    let s = s.trim_end_matches('L');
                    let node = match s.parse::<i64>() {
                        Ok(v) => Node::Int(v),
                        Err(_) if is_decimal(s) => Node::BigInt(s.trim_start_matches('+').to_string()),
                        Err(_) => return Err(bad(format!("bad LONG {s:?}"))),
                    };
                    self.push(node);
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let bytes = self.take(n)?;
                    self.push(long_from_le(bytes));
                }
                0x8b => {
                    let n = self.u32()? as usize;
                    let bytes = self.take(n)?;
                    self.push(long_from_le(bytes));
                }
                b'F' => {
                    let s = self.line()?;
                    let v = s.trim().parse().map_err(|_| bad(format!("bad FLOAT {s:?}")))?;
                    self.push(Node::Float(v));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.push(Node::Float(v));
                }
                b'S' => {
                    // STRING: a quoted Python literal; escapes are kept as written.
                    let s = self.line()?.trim();
                    let inner = ['\'', '"']
                        .iter()
                        .find_map(|&q| s.strip_prefix(q).and_then(|r| r.strip_suffix(q)))
                        .ok_or_else(|| bad(format!("STRING argument is not quoted: {s:?}")))?;
                    self.push(Node::Str(inner.to_string()));
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?;
                    self.push(Node::Str(latin1(b)));
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    self.push(Node::Str(latin1(b)));
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(Node::Bytes(b));
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(Node::Bytes(b));
                }
                0x8e | 0x96 => {
                    let n = self.len_u64()?;
                    let b = self.take(n)?.to_vec();
                    self.push(Node::Bytes(b));
                }
                b'V' => {
                    let s = self.line()?.to_string();
                    self.push(Node::Str(s));
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.utf8()(self.take(n)?)?;
                    self.push(Node::Str(s));
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.utf8()(self.take(n)?)?;
                    self.push(Node::Str(s));
                }
                0x8d => {
                    let n = self.len_u64()?;
                    let s = self.utf8()(self.take(n)?)?;
                    self.push(Node::Str(s));
                }
                b')' => self.push(Node::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Node::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(bad("stack underflow"));
                    }
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Node::Tuple(items));
                }
                b']' => self.push(Node::List(Vec::new())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Node::List(items));
                }
                b'a' => {
                    let item = self.pop()?;
                    let list = self.top()?;
                    self.extend_list(list, vec![item]);
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let list = self.top()?;
                    self.extend_list(list, items);
                }
                b'}' => self.push(Node::Dict(Vec::new())),
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = pairs(items)?;
                    self.push(Node::Dict(pairs));
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let dict = self.top()?;
                    self.extend_dict(dict, vec![(k, v)]);
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let dict = self.top()?;
                    let pairs = pairs(items)?;
                    self.extend_dict(dict, pairs);
                }
                0x8f => self.push(Node::List(Vec::new())),
                0x90 => {
                    let items = self.pop_mark()?;
                    let set = self.top()?;
                    self.extend_list(set, items);
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push(Node::List(items));
                }
                b'c' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    self.push(Node::Global(module, name));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (&self.arena[module], &self.arena[name]) {
                        (Node::Str(m), Node::Str(n)) => {
                            let g = Node::Global(m.clone(), n.clone());
                            self.push(g);
                        }
                        _ => return Err(bad("STACK_GLOBAL needs two strings")),
                    }
                }
                b'i' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    self.pop_mark()?;
                    self.push(Node::Opaque(format!("{module}.{name}")));
                }
                b'o' => {
                    let items = self.pop_mark()?;
                    let class = items.first().map(|&c| self.global_name(c)).unwrap_or_default();
                    self.push(Node::Opaque(class));
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let id = self.reduce(func, args, 0)?;
                    self.stack.push(Slot::Obj(id));
                }
                0x81 => {
                    let _args = self.pop()?;
                    let class = self.pop()?;
                    let node = self.new_object(class);
                    self.push(node);
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let _args = self.pop()?;
                    let class = self.pop()?;
                    let node = self.new_object(class);
                    self.push(node);
                }
                b'b' => {
                    // BUILD sets state on the object below; opaque objects keep no state and
                    // dicts / tensors keep theirs unchanged (an OrderedDict's `_metadata`).
                    self.pop()?;
                    self.top()?;
                }
                b'P' => {
                    let s = self.line()?.to_string();
                    let pid = self.alloc(Node::Str(s));
                    let node = self.persistent_load(pid)?;
                    self.push(node);
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let node = self.persistent_load(pid)?;
                    self.push(node);
                }
                b'g' => {
                    let s = self.line()?;
                    let key = s.trim().parse().map_err(|_| bad(format!("bad GET {s:?}")))?;
                    let id = self.memo_get(key)?;
                    self.stack.push(Slot::Obj(id));
                }
                b'h' => {
                    let key = self.u8()? as u32;
                    let id = self.memo_get(key)?;
                    self.stack.push(Slot::Obj(id));
                }
                b'j' => {
                    let key = self.u32()?;
                    let id = self.memo_get(key)?;
                    self.stack.push(Slot::Obj(id));
                }
                b'p' => {
                    let s = self.line()?;
                    let key = s.trim().parse().map_err(|_| bad(format!("bad PUT {s:?}")))?;
                    self.memo_put(key)?;
                }
                b'q' => {
                    let key = self.u8()? as u32;
                    self.memo_put(key)?;
                }
                b'r' => {
                    let key = self.u32()?;
                    self.memo_put(key)?;
                }
                0x94 => {
                    let key = self.memo.len() as u32;
                    self.memo_put(key)?;
                }
                _ => {
                    return Err(bad(format!("unsupported opcode 0x{op:02x} at byte {}", self.pos - 1)));
                }
            }
        }
    }

    fn utf8(&self) -> impl Fn(&[u8]) -> Result<String, FormatError> {
        |b| match String::from_utf8(b.to_vec()) {
            Ok(s) => Ok(s),
            Err(_) => utf8_surrogatepass(b).ok_or_else(|| bad("string is not valid UTF-8")),
        }
    }

    fn extend_list(&mut self, list: Id, items: Vec<Id>) {
        // Appending to something that is not a list (a list subclass we keep opaque) is
        // accepted and ignored, like every other effect on opaque objects.
        if let Node::List(v) = &mut self.arena[list] {
            self.weight = self.weight.saturating_add(items.len() * std::mem::size_of::<Id>());
            v.extend(items);
        }
    }

    fn extend_dict(&mut self, dict: Id, pairs: Vec<(Id, Id)>) {
        if let Node::Dict(v) = &mut self.arena[dict] {
            self.weight = self.weight.saturating_add(pairs.len() * 2 * std::mem::size_of::<Id>());
            v.extend(pairs);
        }
    }

    fn global_name(&self, id: Id) -> String {
        match &self.arena[id] {
            Node::Global(m, n) => format!("{m}.{n}"),
            Node::Opaque(n) => n.clone(),
            _ => "<unknown>".into(),
        }
    }

    fn new_object(&self, class: Id) -> Node {
        match self.global_name(class).as_str() {
            "collections.OrderedDict" | "builtins.dict" | "collections.defaultdict" => Node::Dict(Vec::new()),
            "builtins.list" => Node::List(Vec::new()),
            name => Node::Opaque(name.to_string()),
        }
    }

    fn tuple_items(&self, id: Id) -> Option<&[Id]> {
        match &self.arena[id] {
            Node::Tuple(items) | Node::List(items) => Some(items),
            _ => None,
        }
    }

    /// Interprets a REDUCE of a known global; any other callable gives an opaque value.
    /// Returns the result's id: a new object, or (for a Parameter) the tensor it wraps.
    fn reduce(&mut self, func: Id, args: Id, nesting: usize) -> Result<Id, FormatError> {
        let name = self.global_name(func);
        let node = match name.as_str() {
            "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => {
                let data = self.tuple_items(args).and_then(|a| a.first().copied());
                return data.ok_or_else(|| bad("_rebuild_parameter without arguments"));
            }
            "torch._tensor._rebuild_from_type_v2" => {
                // (func, type, args, state): the tensor is func(*args).
                let items = self.tuple_items(args).unwrap_or_default();
                if items.len() < 3 {
                    return Err(bad("_rebuild_from_type_v2 needs 3 arguments"));
                }
                if nesting >= MAX_REBUILD_NESTING {
                    return Err(bad("_rebuild_from_type_v2 calls nest too deeply"));
                }
                let (f, a) = (items[0], items[2]);
                return self.reduce(f, a, nesting + 1);
            }
            _ => self.reduce_new(&name, args)?,
        };
        Ok(self.alloc(node))
    }

    /// A REDUCE that builds a new object.
    fn reduce_new(&mut self, name: &str, args: Id) -> Result<Node, FormatError> {
        let name = name.to_string();
        let items = self.tuple_items(args).map(|a| a.to_vec()).unwrap_or_default();
        match name.as_str() {
            "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" | "torch._utils._rebuild_tensor_v3" => {
                let v3 = name.ends_with("_v3");
                Ok(self.rebuild_tensor(&items, v3).unwrap_or_else(|e| match e {
                    FormatError::InvalidTensor { msg, .. } => Node::BadTensor(msg),
                    e => Node::BadTensor(e.to_string()),
                }))
            }
            n if n.starts_with("torch._utils._rebuild_") => Ok(Node::BadTensor(self.unsupported_rebuild(n, &items))),
            "collections.OrderedDict" | "builtins.dict" => {
                let mut pairs = Vec::new();
                if let Some(&seq) = items.first() {
                    for &p in self.tuple_items(seq).unwrap_or_default() {
                        if let Some([k, v]) = self.tuple_items(p).map(|kv| kv.to_vec()).as_deref() {
                            pairs.push((*k, *v));
                        }
                    }
                }
                Ok(Node::Dict(pairs))
            }
            "collections.defaultdict" => Ok(Node::Dict(Vec::new())),
            // How torch pickles a sparse tensor's layout: _get_layout('torch.sparse_coo').
            "torch.serialization._get_layout" => match items.first().map(|&s| &self.arena[s]) {
                Some(Node::Str(layout)) => Ok(Node::Opaque(layout.clone())),
                _ => Ok(Node::Opaque(name)),
            },
            "builtins.set" | "builtins.frozenset" | "builtins.list" => {
                let list = items.first().and_then(|&s| self.tuple_items(s)).map(|l| l.to_vec()).unwrap_or_default();
                Ok(Node::List(list))
            }
            "torch.Size" | "builtins.tuple" => {
                let list = items.first().and_then(|&s| self.tuple_items(s)).map(|l| l.to_vec()).unwrap_or_default();
                Ok(Node::Tuple(list))
            }
            "_codecs.encode" => match items.first().map(|&s| &self.arena[s]) {
                // How protocol-2 pickles carry bytes: _codecs.encode(text, 'latin1').
                Some(Node::Str(s)) => Ok(Node::Bytes(s.chars().map(|c| c as u32 as u8).collect())),
                _ => Ok(Node::Opaque(name)),
            },
            _ => Ok(Node::Opaque(name)),
        }
    }

    fn int_arg(&self, id: Id, what: &str) -> Result<usize, FormatError> {
        match &self.arena[id] {
            Node::Int(v) if *v >= 0 => Ok(*v as usize),
            Node::Int(v) => Err(FormatError::BadView(format!("negative {what} {v}"))),
            Node::Bool(b) => Ok(*b as usize),
            _ => Err(FormatError::BadView(format!("{what} is not an integer"))),
        }
    }

    fn int_tuple(&self, id: Id, what: &str) -> Result<Vec<usize>, FormatError> {
        let items = self.tuple_items(id).ok_or_else(|| FormatError::BadView(format!("{what} is not a tuple")))?;
        items.iter().map(|&i| self.int_arg(i, what)).collect()
    }

    /// What a tensor that torch rebuilds with `func` is, and why ckptmap refuses it.
    fn unsupported_rebuild(&self, func: &str, args: &[Id]) -> String {
        let short = func.trim_start_matches("torch._utils.");
        let layout = args.first().map(|&a| self.global_name(a)).unwrap_or_default();
        match short {
            "_rebuild_sparse_tensor" | "_rebuild_sparse_csr_tensor" => format!(
                "is a sparse tensor (layout {layout}): ckptmap carries dense tensors only (MMSeg backbones hold none); save it with .to_dense()"
            ),
            "_rebuild_meta_tensor_no_storage" => {
                "is a meta tensor: it has no values to carry; materialize it (e.g. load real weights) before saving".into()
            }
            "_rebuild_qtensor" => {
                "is a quantized tensor: ckptmap does not carry quantized tensors (MMSeg backbones hold none); save t.dequantize() instead".into()
            }
            "_rebuild_nested_tensor" => "is a nested tensor: ckptmap carries dense tensors only".into(),
            _ => format!("is rebuilt by torch with {short}, which ckptmap does not read: save a plain dense CPU tensor instead"),
        }
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`,
    /// and `_rebuild_tensor_v3(..., hooks, dtype[, metadata])` for the dtypes torch stores
    /// in an untyped storage (float8s, uint16-64): offset and strides in elements of `dtype`.
    fn rebuild_tensor(&mut self, args: &[Id], v3: bool) -> Result<Node, FormatError> {
        let func = if v3 { "_rebuild_tensor_v3" } else { "_rebuild_tensor_v2" };
        if args.len() < if v3 { 7 } else { 4 } {
            return Err(bad(format!("{func} needs at least {} arguments, got {}", if v3 { 7 } else { 4 }, args.len())));
        }
        let (storage, extra) = match &self.arena[args[0]] {
            Node::Storage(s, extra) => (*s, *extra),
            Node::BadStorage(what) => {
                return Err(FormatError::InvalidTensor { name: String::new(), msg: what.clone() })
            }
            _ => return Err(bad("tensor rebuilt from something that is not a storage")),
        };
        let dtype = if v3 {
            let name = self.global_name(args[6]);
            let torch_name = name.strip_prefix("torch.").unwrap_or(&name);
            DType::from_torch_name(torch_name)
                .ok_or_else(|| FormatError::InvalidTensor { name: String::new(), msg: unsupported_dtype(torch_name) })?
        } else {
            self.storages[storage].dtype
        };
        let metadata = args.get(if v3 { 7 } else { 6 }).copied();
        let (neg, conj) = self.sign_bits(metadata)?;
        let offset = self.int_arg(args[1], "storage offset")?;
        for (id, what) in [(args[2], "size"), (args[3], "stride")] {
            let n = self.tuple_items(id).map_or(0, <[Id]>::len);
            if n > MAX_DIMS {
                return Err(FormatError::BadView(format!(
                    "{what} has {n} dimensions; at most {MAX_DIMS} are supported"
                )));
            }
        }
        let shape = self.int_tuple(args[2], "size")?;
        let strides = self.int_tuple(args[3], "stride")?;
        if shape.len() != strides.len() {
            return Err(FormatError::BadView(format!(
                "size has {} dims but stride has {}",
                shape.len(),
                strides.len()
            )));
        }
        let offset =
            offset.checked_add(extra).ok_or_else(|| FormatError::BadView("storage offset overflows".into()))?;
        Ok(Node::Tensor(TensorView { dtype, shape, strides, offset, storage, neg, conj }))
    }

    /// The negative and conjugate bits from a tensor's metadata dict (`{'neg': True}`);
    /// any other flag set there is refused rather than ignored.
    fn sign_bits(&self, metadata: Option<Id>) -> Result<(bool, bool), FormatError> {
        let Some(id) = metadata else { return Ok((false, false)) };
        let pairs = match &self.arena[id] {
            Node::Dict(pairs) => pairs,
            Node::None => return Ok((false, false)),
            _ => return Err(bad("tensor metadata is not a dict")),
        };
        let (mut neg, mut conj) = (false, false);
        for &(k, v) in pairs {
            let set = match &self.arena[v] {
                Node::Bool(b) => *b,
                Node::Int(i) => *i != 0,
                _ => true,
            };
            match &self.arena[k] {
                Node::Str(k) if k == "neg" => neg = set,
                Node::Str(k) if k == "conj" => conj = set,
                Node::Str(_) if !set => {}
                Node::Str(k) => {
                    return Err(FormatError::InvalidTensor {
                        name: String::new(),
                        msg: format!("carries the tensor flag {k:?}, which ckptmap does not know how to apply"),
                    })
                }
                _ => return Err(bad("tensor metadata has a key that is not a string")),
            }
        }
        Ok((neg, conj))
    }

    fn persistent_load(&mut self, pid: Id) -> Result<Node, FormatError> {
        let items = self.tuple_items(pid).ok_or_else(|| bad("persistent id is not a tuple"))?.to_vec();
        let is_storage = matches!(items.first().map(|&i| &self.arena[i]), Some(Node::Str(s)) if s == "storage");
        if !is_storage || items.len() < 5 {
            return Err(bad("persistent id is not a ('storage', type, key, location, numel) tuple"));
        }
        let class = self.global_name(items[1]);
        let class_name = class.rsplit('.').next().unwrap_or("");
        let dtype = if class_name == "UntypedStorage" {
            DType::U8
        } else {
            match DType::from_storage_class(class_name) {
                Some(d) => d,
                None => return Ok(Node::BadStorage(unsupported_storage(&class))),
            }
        };
        let key = match &self.arena[items[2]] {
            Node::Str(s) => s.clone(),
            Node::Int(i) => i.to_string(),
            _ => return Err(bad("storage key is not a string")),
        };
        let numel = self.int_arg(items[4], "storage size")?;
        // Legacy files may name a view of a storage: (view_key, offset, size).
        let mut extra = 0;
        if let Some(&view) = items.get(5) {
            if let Some(v) = self.tuple_items(view).map(|v| v.to_vec()) {
                if v.len() == 3 {
                    extra = self.int_arg(v[1], "storage view offset")?;
                }
            }
        }
        let index = match self.storage_index.get(&key) {
            Some(&i) => {
                if self.storages[i].dtype != dtype {
                    return Err(bad(format!(
                        "storage {key} is referenced as {} and as {dtype}",
                        self.storages[i].dtype
                    )));
                }
                i
            }
            None => {
                self.storages.push(StorageRef { key: key.clone(), dtype, numel });
                self.storage_index.insert(key, self.storages.len() - 1);
                self.storages.len() - 1
            }
        };
        Ok(Node::Storage(index, extra))
    }

    fn to_value(&self, id: Id, depth: usize, budget: &mut TreeBudget) -> Result<Value, FormatError> {
        let container = matches!(self.arena[id], Node::List(_) | Node::Tuple(_) | Node::Dict(_));
        if container {
            if budget.open[id] {
                return Ok(Value::Cycle);
            }
            budget.open[id] = true;
        }
        let value = self.to_value_inner(id, depth, budget);
        if container {
            budget.open[id] = false;
        }
        value
    }

    fn to_value_inner(&self, id: Id, depth: usize, budget: &mut TreeBudget) -> Result<Value, FormatError> {
        if depth > MAX_DEPTH {
            return Err(FormatError::TooDeep(MAX_DEPTH));
        }
        if budget.nodes == 0 {
            return Err(FormatError::TooLarge(MAX_TREE_NODES));
        }
        budget.nodes -= 1;
        let size = std::mem::size_of::<Value>()
            + match &self.arena[id] {
                Node::Str(s) | Node::Opaque(s) => s.len(),
                Node::Bytes(b) => b.len(),
                Node::Global(m, n) => m.len() + n.len() + 1,
                _ => 0,
            };
        budget.bytes = budget.bytes.checked_sub(size).ok_or(FormatError::TooBig { mib: self.weight_limit >> 20 })?;
        let list = |items: &[Id], budget: &mut TreeBudget| -> Result<Vec<Value>, FormatError> {
            let mut out = Vec::with_capacity(items.len());
            for (n, &i) in items.iter().enumerate() {
                out.push(self.to_value(i, depth + 1, budget).map_err(|e| e.under(&n.to_string()))?);
            }
            Ok(out)
        };
        Ok(match &self.arena[id] {
            Node::None => Value::None,
            Node::Bool(b) => Value::Bool(*b),
            Node::Int(i) => Value::Int(*i),
            Node::Float(f) => Value::Float(*f),
            Node::Str(s) => Value::Str(s.clone()),
            Node::Bytes(b) => Value::Bytes(b.clone()),
            Node::List(items) => Value::List(list(items, budget)?),
            Node::Tuple(items) => Value::Tuple(list(items, budget)?),
            Node::Dict(pairs) => {
                let mut out = Vec::with_capacity(pairs.len());
                for &(k, v) in pairs {
                    let key = self.to_value(k, depth + 1, budget)?;
                    let value = self.to_value(v, depth + 1, budget).map_err(|e| match &key {
                        Value::Str(s) => e.under(s),
                        Value::Int(i) => e.under(&i.to_string()),
                        _ => e,
                    })?;
                    out.push((key, value));
                }
                Value::Dict(out)
            }
            Node::Global(m, n) => Value::Opaque(format!("{m}.{n}")),
            Node::Storage(..) => Value::Opaque("torch.storage".into()),
            Node::Tensor(t) => Value::Tensor(t.clone()),
            Node::BadTensor(msg) => return Err(FormatError::InvalidTensor { name: String::new(), msg: msg.clone() }),
            Node::BadStorage(what) => Value::Opaque(format!("torch storage ({what})")),
            Node::BigInt(d) => Value::BigInt(d.clone()),
            Node::Opaque(n) => Value::Opaque(n.clone()),
        })
    }
}

fn pairs(items: Vec<Id>) -> Result<Vec<(Id, Id)>, FormatError> {
    if !items.len().is_multiple_of(2) {
        return Err(bad("odd number of items for a dict"));
    }
    Ok(items.chunks(2).map(|c| (c[0], c[1])).collect())
}

fn latin1(b: &[u8]) -> String {
    b.iter().map(|&c| c as char).collect()
}

/// A little-endian two's-complement integer (LONG1 / LONG4).
fn long_from_le(bytes: &[u8]) -> Node {
    if bytes.is_empty() {
        return Node::Int(0);
    }
    if bytes.len() > 8 {
        // Fits only if the extra bytes are pure sign extension.
        let sign = if bytes[bytes.len() - 1] & 0x80 != 0 { 0xff } else { 0 };
        if bytes[8..].iter().any(|&b| b != sign) || (bytes[7] & 0x80 != 0) != (sign == 0xff) {
            return Node::BigInt(decimal_from_le(bytes));
        }
        return long_from_le(&bytes[..8]);
    }
    let negative = bytes[bytes.len() - 1] & 0x80 != 0;
    let mut buf = if negative { [0xffu8; 8] } else { [0u8; 8] };
    buf[..bytes.len()].copy_from_slice(bytes);
    Node::Int(i64::from_le_bytes(buf))
}

fn is_decimal(s: &str) -> bool {
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// The decimal digits of a little-endian two's-complement integer of any length.
fn decimal_from_le(bytes: &[u8]) -> String {
    let negative = bytes.last().is_some_and(|&b| b & 0x80 != 0);
    let mut mag: Vec<u8> = bytes.to_vec();
    if negative {
        // Two's complement: invert and add one.
        let mut carry = true;
        for b in &mut mag {
            let (v, c) = (!*b).overflowing_add(carry as u8);
            *b = v;
            carry = c;
        }
    }
    // Base 256 (little-endian) to base 10^9 by repeated division.
    let mut limbs: Vec<u32> = mag.iter().rev().map(|&b| b as u32).collect(); // big-endian
    let mut chunks = Vec::new();
    while limbs.iter().any(|&l| l != 0) {
        let mut rem = 0u64;
        for l in &mut limbs {
            let cur = (rem << 8) | *l as u64;
            *l = (cur / 1_000_000_000) as u32;
            rem = cur % 1_000_000_000;
        }
        chunks.push(rem as u32);
    }
    let mut out = String::from(if negative { "-" } else { "" });
    match chunks.split_last() {
        None => out.push('0'),
        Some((top, rest)) => {
            out.push_str(&top.to_string());
            for c in rest.iter().rev() {
                out.push_str(&format!("{c:09}"));
            }
        }
    }
    out
}

/// Decodes text CPython pickled with `surrogatepass` (a str holding lone surrogates, such
/// as an `os.fsdecode`d path): each surrogate is kept as its escape `\udcff`, the rest as
/// text. `None` when the bytes are not UTF-8 even so.
fn utf8_surrogatepass(b: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(b.len());
    let mut rest = b;
    while !rest.is_empty() {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                break;
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(good).ok()?);
                // A surrogate U+D800..U+DFFF encoded as UTF-8: ED A0..BF 80..BF.
                match bad {
                    [0xED, b1 @ 0xA0..=0xBF, b2 @ 0x80..=0xBF, ..] => {
                        let unit = 0xD000 | ((*b1 as u32 & 0x3F) << 6) | (*b2 as u32 & 0x3F);
                        out.push_str(&format!("\\u{unit:04x}"));
                        rest = &bad[3..];
                    }
                    _ => return None,
                }
            }
        }
    }
    Some(out)
}

/// Why a tensor of a torch dtype that has no counterpart here is refused.
fn unsupported_dtype(torch_name: &str) -> String {
    let what = match torch_name {
        "complex32" | "complex128" | "bcomplex32" => {
            "MMSeg backbones hold no complex tensors; drop it, or save its .real/.imag as separate tensors"
        }
        n if n.starts_with("bits") => "it is raw bits with no numeric meaning; drop it or .view() it as uint8",
        n if n.starts_with("float4") => "safetensors and MMSeg have no packed float4; dequantize it before saving",
        _ => "save it as float32, float16 or bfloat16 instead",
    };
    format!("has dtype torch.{torch_name}, which ckptmap cannot carry: {what}")
}

/// Why a storage class with no dtype here is refused (its tensors get this message).
fn unsupported_storage(class: &str) -> String {
    let short = class.rsplit('.').next().unwrap_or(class);
    match short {
        "ComplexDoubleStorage" => unsupported_dtype("complex128"),
        "ComplexHalfStorage" => unsupported_dtype("complex32"),
        s if s.starts_with("QInt") || s.starts_with("QUInt") => format!(
            "is a quantized tensor ({class}): ckptmap does not carry quantized tensors (MMSeg backbones hold none); save t.dequantize() instead"
        ),
        _ => format!("has storage type {class}, which ckptmap cannot carry: save it as float32, float16 or bfloat16 instead"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_integers_keep_their_digits() {
        let le = |v: i128| {
            let b = v.to_le_bytes();
            b.to_vec()
        };
        for v in [
            0i128,
            1,
            -1,
            1 << 64,
            -(1 << 70),
            i64::MAX as i128 + 1,
            i64::MIN as i128 - 1,
            i128::MAX,
            i128::MIN,
            10i128.pow(30),
        ] {
            assert_eq!(decimal_from_le(&le(v)), v.to_string(), "{v}");
        }
        // LONG1 of 9 bytes, 2**64 exactly: beyond i64, so its digits.
        let mut p = vec![0x80, 2, 0x8a, 9];
        p.extend_from_slice(&le(1 << 64)[..9]);
        p.push(b'.');
        assert_eq!(unpickle(&p).unwrap().value, Value::BigInt("18446744073709551616".into()));
    }

    #[test]
    fn lone_surrogates_are_kept_as_escapes() {
        // 'a\udcffz' pickled by CPython (utf-8, surrogatepass).
        assert_eq!(utf8_surrogatepass(b"a\xed\xb3\xbfz").as_deref(), Some("a\\udcffz"));
        assert_eq!(utf8_surrogatepass(b"\xff"), None, "other invalid UTF-8 is still refused");
    }

    #[test]
    fn a_self_containing_dict_is_cut_at_the_cycle() {
        // d = {}; d['self'] = d; d['x'] = 1
        let p = b"\x80\x02}q\x00(X\x04\x00\x00\x00selfq\x01h\x00X\x01\x00\x00\x00xq\x02K\x01u.";
        let v = unpickle(p).unwrap().value;
        assert_eq!(v.get("self"), Some(&Value::Cycle));
        assert_eq!(v.get("x"), Some(&Value::Int(1)));
    }
}
