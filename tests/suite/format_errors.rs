//! The format layer on hand-made inputs: writer round trips and one clear error for each
//! kind of bad file.

use std::io::Write;
use std::path::Path;

use ckptmap::formats::checkpoint::Checkpoint;
use ckptmap::formats::pth::unpickle::unpickle;
use ckptmap::formats::{FormatError, Value};
use ckptmap::write::pth::{write_pth, TensorToWrite};
use ckptmap::DType;

use crate::util::pickle::{op_str, tensor_ops, zip_stored as zip_with, Tensor};
use crate::util::write_file as temp_file;

fn open_err(path: &Path) -> String {
    match Checkpoint::open(path) {
        Ok(_) => panic!("{} opened but should not", path.display()),
        Err(e) => e.to_string(),
    }
}

/// The pickle of `{'w': tensor}` where the tensor has `shape` (contiguous) over a float
/// storage of `numel` elements.
fn tensor_pickle(shape: &[i64], numel: i64) -> Vec<u8> {
    // contiguous strides
    let mut stride = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        stride[i] = stride[i + 1] * shape[i + 1];
    }
    let mut p = vec![0x80, 2, b'}'];
    p.extend(op_str("w"));
    p.extend(tensor_ops(&Tensor { name: "w", key: "0", numel, offset: 0, shape, stride: &stride }));
    p.extend_from_slice(b"s.");
    p
}

#[test]
fn writer_round_trip_all_dtypes() {
    let dir = tempfile::tempdir().unwrap();
    let shapes: Vec<Vec<usize>> = vec![vec![2, 3], vec![4], vec![], vec![0, 4], vec![1, 2, 2, 1]];
    let mut specs = Vec::new();
    for (i, dtype) in DType::ALL.iter().enumerate() {
        specs.push((format!("t{i}.{}", dtype.name()), *dtype, shapes[i % shapes.len()].clone()));
    }
    let tensors: Vec<TensorToWrite> =
        specs.iter().map(|(n, d, s)| TensorToWrite { name: n, dtype: *d, shape: s }).collect();
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            (0..t.nbytes())
                .map(|b| if t.dtype == DType::Bool { (b % 2) as u8 } else { (b as usize * 7 + i) as u8 })
                .collect()
        })
        .collect();
    let path = dir.path().join("rt.pth");
    let file = std::fs::File::create(&path).unwrap();
    write_pth(file, "rt", &tensors, |i, w| w.write_all(&data[i])).unwrap();

    let ckpt = Checkpoint::open(&path).unwrap();
    let read = ckpt.tensors();
    assert_eq!(read.len(), tensors.len());
    for ((entry, spec), bytes) in read.iter().zip(&specs).zip(&data) {
        assert_eq!(entry.name, spec.0);
        assert_eq!(entry.view.dtype, spec.1);
        assert_eq!(entry.view.shape, spec.2);
        assert_eq!(&ckpt.read(entry.view).unwrap(), bytes, "{}", entry.name);
    }
}

#[test]
fn writer_refuses_wrong_byte_count() {
    let dir = tempfile::tempdir().unwrap();
    let shape = [4usize];
    let tensors = [TensorToWrite { name: "a", dtype: DType::F32, shape: &shape }];
    let file = std::fs::File::create(dir.path().join("x.pth")).unwrap();
    let err = write_pth(file, "x", &tensors, |_, w| w.write_all(&[0u8; 15])).unwrap_err();
    assert!(err.to_string().contains("produced 15 bytes, expected 16"), "{err}");
}

#[test]
fn empty_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = temp_file(dir.path(), "empty.pth", b"");
    let e = open_err(&p);
    assert!(e.contains("empty.pth") && e.contains("empty file"), "{e}");
}

#[test]
fn random_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let bytes: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let p = temp_file(dir.path(), "noise.pth", &bytes);
    assert!(open_err(&p).contains("not a PyTorch checkpoint"));
}

#[test]
fn directory() {
    let dir = tempfile::tempdir().unwrap();
    let e = open_err(dir.path());
    assert!(e.contains("directory"), "{e}");
}

#[test]
fn truncated_zip() {
    let dir = tempfile::tempdir().unwrap();
    let full = zip_with(&[("a/data.pkl", &tensor_pickle(&[2], 2)), ("a/data/0", &[0u8; 8]), ("a/version", b"3\n")]);
    let p = temp_file(dir.path(), "cut.pth", &full[..full.len() / 2]);
    let e = open_err(&p);
    assert!(e.contains("cut.pth") && e.contains("zip"), "{e}");
}

#[test]
fn zip_without_data_pkl() {
    let dir = tempfile::tempdir().unwrap();
    let p = temp_file(dir.path(), "nopkl.pth", &zip_with(&[("a/version", b"3\n")]));
    assert!(open_err(&p).contains("no data.pkl"));
}

#[test]
fn storage_smaller_than_view() {
    let dir = tempfile::tempdir().unwrap();
    // Shape [4] over a storage that says it has 2 elements.
    let z = zip_with(&[("a/data.pkl", &tensor_pickle(&[4], 2)), ("a/data/0", &[0u8; 8]), ("a/version", b"3\n")]);
    let p = temp_file(dir.path(), "short.pth", &z);
    let e = open_err(&p);
    assert!(e.contains("tensor w needs 4 elements of storage 0, which has only 2"), "{e}");
    // And a storage record shorter than its header claims.
    let z = zip_with(&[("a/data.pkl", &tensor_pickle(&[2], 2)), ("a/data/0", &[0u8; 5]), ("a/version", b"3\n")]);
    let p = temp_file(dir.path(), "short2.pth", &z);
    let e = open_err(&p);
    assert!(e.contains("storage 0 holds 5 bytes but its header says 8"), "{e}");
}

#[test]
fn good_handmade_zip_reads() {
    // The control case for the two above: the same construction with consistent sizes works.
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let z = zip_with(&[("a/data.pkl", &tensor_pickle(&[2, 2], 4)), ("a/data/0", &data), ("a/version", b"3\n")]);
    let p = temp_file(dir.path(), "ok.pth", &z);
    let c = Checkpoint::open(&p).unwrap();
    let t = c.tensors();
    assert_eq!(t[0].name, "w");
    assert_eq!(c.read(t[0].view).unwrap(), data);
}

#[test]
fn memo_reference_to_nothing() {
    let e = unpickle(b"\x80\x02h\x05.").unwrap_err();
    assert!(matches!(e, FormatError::MemoMissing(5)), "{e}");
    assert!(e.to_string().contains("memo entry 5"));
}

#[test]
fn pickle_that_stops_early() {
    let e = unpickle(b"\x80\x02}q\x00(X\x01\x00\x00\x00a").unwrap_err();
    assert!(matches!(e, FormatError::PickleTruncated), "{e}");
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    // 100k nested lists: a naive recursive reader overflows its stack.
    let mut p = vec![0x80, 2];
    p.extend(std::iter::repeat_n(b']', 100_000));
    p.extend(std::iter::repeat_n(b'a', 99_999));
    p.push(b'.');
    let e = unpickle(&p).unwrap_err();
    assert!(matches!(e, FormatError::TooDeep(_)), "{e}");
}

#[test]
fn memo_bomb_is_an_error() {
    // A list of 10_000 items, then lists of 5_000 references to it, nested: 10^4 * 5*10^3 values.
    let mut p = vec![0x80, 2, b']', b'('];
    p.extend(std::iter::repeat_n(b'N', 10_000));
    p.extend_from_slice(b"eq\x00(");
    for _ in 0..5_000 {
        p.extend_from_slice(b"h\x00");
    }
    p.extend_from_slice(b"l.");
    let e = unpickle(&p).unwrap_err();
    assert!(matches!(e, FormatError::TooLarge(_)), "{e}");
}

#[test]
fn reduce_of_os_system_is_opaque_and_not_executed() {
    let marker = std::env::temp_dir().join(format!("ckptmap-pwned-{}", std::process::id()));
    let cmd = format!("touch {}", marker.display());
    let mut p = vec![0x80, 2];
    p.extend_from_slice(b"}(X\x03\x00\x00\x00cmdcos\nsystem\nX");
    p.extend_from_slice(&(cmd.len() as u32).to_le_bytes());
    p.extend_from_slice(cmd.as_bytes());
    p.extend_from_slice(b"\x85RX\x04\x00\x00\x00evalcbuiltins\neval\nX\x03\x00\x00\x001+1\x85Ru.");
    let v = unpickle(&p).unwrap().value;
    assert_eq!(v.get("cmd"), Some(&Value::Opaque("os.system".into())));
    assert_eq!(v.get("eval"), Some(&Value::Opaque("builtins.eval".into())));
    assert!(!marker.exists(), "the pickle's command ran");
}

#[test]
fn tar_format_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let mut tar = vec![0u8; 1024];
    tar[..7].copy_from_slice(b"storage");
    tar[257..262].copy_from_slice(b"ustar");
    let p = temp_file(dir.path(), "old.tar.pth", &tar);
    let e = open_err(&p);
    assert!(e.contains("tar-format") && e.contains("not supported"), "{e}");
}

#[test]
fn unknown_opcode_names_itself() {
    let e = unpickle(b"\x80\x02\xff.").unwrap_err();
    assert!(e.to_string().contains("unsupported opcode 0xff"), "{e}");
}
