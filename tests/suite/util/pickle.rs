//! Pickle bytes, written opcode by opcode (protocol 2, as torch.save writes them), and the
//! zip archives torch.save puts them in. For inputs our own writer cannot make: broken
//! files, hostile pickles, views no writer produces.

use std::io::Write;

/// `BINUNICODE s`.
pub fn op_str(s: &str) -> Vec<u8> {
    let mut v = vec![b'X'];
    v.extend_from_slice(&(s.len() as u32).to_le_bytes());
    v.extend_from_slice(s.as_bytes());
    v
}

/// `i` in the shortest opcode: `BININT1`, `BININT` or an 8-byte `LONG1`.
pub fn op_int(i: i64) -> Vec<u8> {
    if (0..256).contains(&i) {
        vec![b'K', i as u8]
    } else if i32::try_from(i).is_ok() {
        let mut v = vec![b'J'];
        v.extend_from_slice(&(i as i32).to_le_bytes());
        v
    } else {
        op_long(i)
    }
}

/// `i` as an 8-byte `LONG1`, whatever its size.
pub fn op_long(i: i64) -> Vec<u8> {
    let mut v = vec![0x8a, 8];
    v.extend_from_slice(&i.to_le_bytes());
    v
}

/// `MARK int... TUPLE`.
pub fn op_tuple(items: &[i64]) -> Vec<u8> {
    let mut v = vec![b'('];
    for &i in items {
        v.extend(op_int(i));
    }
    v.push(b't');
    v
}

/// One tensor as torch pickles it: `_rebuild_tensor_v2(storage, offset, size, stride, False, {})`
/// over FloatStorage `key` of `numel` elements.
pub struct Tensor<'a> {
    pub name: &'a str,
    pub key: &'a str,
    pub numel: i64,
    pub offset: i64,
    pub shape: &'a [i64],
    pub stride: &'a [i64],
}

/// The tensor's value (its name not included).
pub fn tensor_ops(t: &Tensor) -> Vec<u8> {
    let mut p = b"ctorch._utils\n_rebuild_tensor_v2\n(".to_vec();
    p.push(b'(');
    p.extend(op_str("storage"));
    p.extend_from_slice(b"ctorch\nFloatStorage\n");
    p.extend(op_str(t.key));
    p.extend(op_str("cpu"));
    p.extend(op_int(t.numel));
    p.extend_from_slice(b"tQ");
    p.extend(op_int(t.offset));
    p.extend(op_tuple(t.shape));
    p.extend(op_tuple(t.stride));
    p.extend_from_slice(b"\x89}tR");
    p
}

/// `{name: tensor, ...}` as a whole pickle.
pub fn state_dict_pickle(tensors: &[Tensor]) -> Vec<u8> {
    let mut p = vec![0x80, 2, b'}', b'('];
    for t in tensors {
        p.extend(op_str(t.name));
        p.extend(tensor_ops(t));
    }
    p.extend_from_slice(b"u.");
    p
}

/// A zip holding the given entries (full names), stored.
pub fn zip_stored(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        for (name, data) in entries {
            let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
            z.start_file(*name, opts).unwrap();
            z.write_all(data).unwrap();
        }
        z.finish().unwrap();
    }
    buf.into_inner()
}

/// A torch.save-style zip under one folder (`archive/`): the pickle, `byteorder`, storages
/// `data/0`, `data/1`, ... with the given bytes, `version`.
pub fn checkpoint_zip(pickle: &[u8], storages: &[&[u8]]) -> Vec<u8> {
    let names: Vec<String> = (0..storages.len()).map(|i| format!("archive/data/{i}")).collect();
    let mut entries: Vec<(&str, &[u8])> = vec![("archive/data.pkl", pickle), ("archive/byteorder", b"little")];
    for (n, s) in names.iter().zip(storages) {
        entries.push((n, s));
    }
    entries.push(("archive/version", b"3\n"));
    zip_stored(&entries)
}

/// A checkpoint with the names and shapes of `layout` whose every tensor is an expanded view
/// (all strides 0) of one 1-element float storage: a ViT-B's key set in a few kilobytes,
/// for what reads names and shapes only (planning, `--dry-run`). Reading a tensor's values
/// materializes it (zeros).
pub fn expanded_checkpoint(layout: &[(String, Vec<usize>)]) -> Vec<u8> {
    let shapes: Vec<(Vec<i64>, Vec<i64>)> =
        layout.iter().map(|(_, s)| (s.iter().map(|&d| d as i64).collect(), vec![0; s.len()])).collect();
    let tensors: Vec<Tensor> = layout
        .iter()
        .zip(&shapes)
        .map(|((name, _), (shape, stride))| Tensor { name, key: "0", numel: 1, offset: 0, shape, stride })
        .collect();
    checkpoint_zip(&state_dict_pickle(&tensors), &[&[0u8; 4]])
}
