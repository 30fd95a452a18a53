//! Reduces a value tree (a segmentor's `meta`) to the plain values `torch.load(weights_only=True)`
//! reads back without any global: `None`, bools, 64-bit ints, floats, strings, and lists,
//! tuples and dicts of them. What is not plain is left out and named by its path.
//!
//! A dict entry that is not plain is dropped on its own (its key is its meaning). A list or
//! tuple that holds an item that is not plain is dropped whole: removing the item would shift
//! the ones after it, and a `PALETTE` whose colours no longer line up with `CLASSES` is worse
//! than none. Containers inside are reduced first, so only leaves (objects, tensors, bytes,
//! big ints, cycles) make a sequence go.

use crate::formats::Value;
use crate::mapping::plan::DroppedValue;

/// The plain part of `v` (rooted at `path`, e.g. `meta`) and what was left out. `None` when
/// `v` itself is not plain.
pub fn plain_values(v: &Value, path: &str) -> (Option<Value>, Vec<DroppedValue>) {
    let mut dropped = Vec::new();
    let kept = reduce(v, path, &mut dropped);
    (kept, dropped)
}

/// The value written under `key` (a segmentor's `meta`) for a source whose top level is
/// `root`: its plain part, an empty dict when the source has none (MMSeg 1.x's `init_model`
/// reads `checkpoint['meta']` unconditionally), and what was left out.
pub fn output_meta(root: &Value, key: &str) -> (Value, Vec<DroppedValue>) {
    match root.get(key) {
        None => (Value::Dict(Vec::new()), Vec::new()),
        Some(v) => {
            let (kept, dropped) = plain_values(v, key);
            (kept.unwrap_or_else(|| Value::Dict(Vec::new())), dropped)
        }
    }
}

/// True when `v` holds nothing but plain values (what [`plain_values`] keeps whole).
pub fn is_plain(v: &Value) -> bool {
    match v {
        Value::None | Value::Bool(_) | Value::Int(_) | Value::Float(_) | Value::Str(_) => true,
        Value::List(items) | Value::Tuple(items) => items.iter().all(is_plain),
        Value::Dict(items) => items.iter().all(|(k, v)| is_plain_key(k) && is_plain(v)),
        _ => false,
    }
}

/// Keys Python can hash and weights_only can build: scalars and tuples of them.
fn is_plain_key(k: &Value) -> bool {
    match k {
        Value::None | Value::Bool(_) | Value::Int(_) | Value::Float(_) | Value::Str(_) => true,
        Value::Tuple(items) => items.iter().all(is_plain_key),
        _ => false,
    }
}

fn key_path(path: &str, k: &Value) -> String {
    match k {
        Value::Str(s) if !s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || c == '_') => format!("{path}.{s}"),
        Value::Str(s) => format!("{path}[{s:?}]"),
        other => format!("{path}[{}]", other.summary()),
    }
}

fn what(v: &Value) -> String {
    match v {
        Value::Opaque(name) => format!("an object of {name}"),
        Value::Tensor(t) => format!("a tensor {} {:?} (tensors go in the state dict)", t.dtype, t.shape),
        Value::Bytes(b) => format!("bytes ({} bytes)", b.len()),
        Value::BigInt(d) => format!("an integer beyond 64 bits ({d})"),
        Value::Cycle => "a reference back to an enclosing container".into(),
        other => other.summary(),
    }
}

fn reduce(v: &Value, path: &str, dropped: &mut Vec<DroppedValue>) -> Option<Value> {
    match v {
        Value::None | Value::Bool(_) | Value::Int(_) | Value::Float(_) | Value::Str(_) => Some(v.clone()),
        Value::List(items) | Value::Tuple(items) => {
            let mut kept = Vec::with_capacity(items.len());
            let mut inner = Vec::new();
            for (i, item) in items.iter().enumerate() {
                match reduce(item, &format!("{path}[{i}]"), &mut inner) {
                    Some(x) => kept.push(x),
                    None => {
                        let kind = if matches!(v, Value::List(_)) { "list" } else { "tuple" };
                        dropped.push(DroppedValue {
                            path: path.to_string(),
                            what: format!("a {kind} whose item [{i}] is {} (the whole {kind} is left out, so that no item shifts)", what(item)),
                        });
                        return None;
                    }
                }
            }
            dropped.extend(inner);
            Some(if matches!(v, Value::List(_)) { Value::List(kept) } else { Value::Tuple(kept) })
        }
        Value::Dict(items) => {
            let mut kept = Vec::with_capacity(items.len());
            for (k, item) in items {
                let p = key_path(path, k);
                if !is_plain_key(k) {
                    dropped.push(DroppedValue { path: p, what: format!("an entry whose key is {}", what(k)) });
                    continue;
                }
                if let Some(x) = reduce(item, &p, dropped) {
                    kept.push((k.clone(), x));
                }
            }
            Some(Value::Dict(kept))
        }
        other => {
            dropped.push(DroppedValue { path: path.to_string(), what: what(other) });
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Value {
        Value::Str(x.into())
    }

    #[test]
    fn keeps_plain_values_and_names_the_rest() {
        let meta = Value::Dict(vec![
            (s("seed"), Value::Int(1234)),
            (s("classes"), Value::Tuple(vec![s("road"), s("sky")])),
            (s("palette"), Value::List(vec![Value::List(vec![Value::Int(1)]), Value::Opaque("numpy.ndarray".into())])),
            (
                s("hub"),
                Value::Dict(vec![
                    (s("loss"), Value::Opaque("mmengine.logging.history_buffer.HistoryBuffer".into())),
                    (s("n"), Value::Float(0.5)),
                ]),
            ),
            (Value::Tuple(vec![Value::Int(1), s("a")]), Value::None),
            (Value::Opaque("x.Y".into()), Value::Bool(true)),
        ]);
        let (kept, dropped) = plain_values(&meta, "meta");
        let kept = kept.unwrap();
        assert!(is_plain(&kept));
        assert_eq!(
            kept,
            Value::Dict(vec![
                (s("seed"), Value::Int(1234)),
                (s("classes"), Value::Tuple(vec![s("road"), s("sky")])),
                (s("hub"), Value::Dict(vec![(s("n"), Value::Float(0.5))])),
                (Value::Tuple(vec![Value::Int(1), s("a")]), Value::None),
            ])
        );
        let paths: Vec<&str> = dropped.iter().map(|d| d.path.as_str()).collect();
        assert_eq!(paths, ["meta.palette", "meta.hub.loss", "meta[opaque x.Y]"]);
        assert!(dropped[0].what.contains("item [1]"), "{}", dropped[0].what);
        assert!(!is_plain(&meta));
        assert_eq!(plain_values(&Value::Opaque("a.B".into()), "meta").0, None);
    }
}
