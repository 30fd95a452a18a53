//! Regression tests for what fuzzing and the hardening review of the readers found (issue 7).
//! Each input here once panicked, overflowed the stack, or made the reader allocate without
//! bound; now each is a clear error (or, where the input is valid, a quick answer).
//!
//! The fuzz targets themselves live in `fuzz/` (see fuzz/README.md).

use std::time::{Duration, Instant};

use ckptmap::formats::checkpoint::Checkpoint;
use ckptmap::formats::pth::unpickle::unpickle;
use ckptmap::formats::FormatError;

use crate::util::pickle::{op_long, op_str, zip_stored};
use crate::util::{fixture, root, write_file as write};

/// Runs `f` and fails if it takes longer than `limit` (a hang or a quadratic blow-up).
fn quickly<T>(limit: Duration, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let r = f();
    assert!(start.elapsed() < limit, "took {:?}", start.elapsed());
    r
}

#[test]
fn string_opcode_with_a_multibyte_first_character() {
    // STRING's argument was unquoted by byte position: 'é' made it slice inside a character.
    for arg in ["\u{e9}x", "\u{e9}", "'a\u{e9}", "\u{1F600}\u{1F600}"] {
        let mut p = vec![0x80, 2, b'S'];
        p.extend_from_slice(arg.as_bytes());
        p.extend_from_slice(b"\n.");
        let e = unpickle(&p).unwrap_err();
        assert!(e.to_string().contains("STRING argument is not quoted"), "{arg:?}: {e}");
    }
    // Quoted ones still read.
    let v = unpickle(b"\x80\x02S'\xc3\xa9t\xc3\xa9'\n.").unwrap().value;
    assert_eq!(v.as_str(), Some("\u{e9}t\u{e9}"));
}

#[test]
fn rebuild_from_type_that_contains_itself() {
    // L = [_rebuild_from_type_v2, None, L]; _rebuild_from_type_v2(*L) called itself forever
    // (a stack overflow: an abort, not an error).
    let p = b"\x80\x02ctorch._tensor\n_rebuild_from_type_v2\nq\x00]q\x01(h\x00Nh\x01eR.";
    let e = unpickle(p).unwrap_err();
    assert!(e.to_string().contains("nest too deeply"), "{e}");
}

#[test]
fn parameters_of_one_big_list_are_not_copied() {
    // 100 000 `_rebuild_parameter((L,))` of a 200 000-item list copied the list each time
    // (160 GB). A Parameter now refers to what it wraps.
    let mut p = vec![0x80, 2, b']', b'('];
    p.extend(std::iter::repeat_n(b'N', 200_000));
    p.extend_from_slice(b"eq\x00h\x00\x85q\x01ctorch._utils\n_rebuild_parameter\nq\x02");
    for _ in 0..100_000 {
        p.extend_from_slice(b"h\x02h\x01R0");
    }
    p.extend_from_slice(b"N.");
    let v = quickly(Duration::from_secs(20), || unpickle(&p)).unwrap();
    assert_eq!(v.value, ckptmap::formats::Value::None);
}

#[test]
fn copies_made_by_reduce_count_against_the_memory_limit() {
    // builtins.list(L) copies L: 100 000 copies of a 200 000-item list would be 160 GB.
    let mut p = vec![0x80, 2, b']', b'('];
    p.extend(std::iter::repeat_n(b'N', 200_000));
    p.extend_from_slice(b"eq\x00h\x00\x85q\x01cbuiltins\nlist\nq\x02");
    for _ in 0..100_000 {
        p.extend_from_slice(b"h\x02h\x01R0");
    }
    p.extend_from_slice(b"N.");
    let e = quickly(Duration::from_secs(20), || unpickle(&p)).unwrap_err();
    assert!(matches!(e, FormatError::TooBig { .. }), "{e}");
}

#[test]
fn a_string_memo_bomb_is_an_error() {
    // A 1 MB string referenced 200 000 times: 200 GB once the tree is built.
    let big = "x".repeat(1 << 20);
    let mut p = vec![0x80, 2];
    p.extend(op_str(&big));
    p.extend_from_slice(b"q\x00(");
    for _ in 0..200_000 {
        p.extend_from_slice(b"h\x00");
    }
    p.extend_from_slice(b"l.");
    let e = quickly(Duration::from_secs(20), || unpickle(&p)).unwrap_err();
    assert!(e.to_string().contains("memo bomb"), "{e}");
}

#[test]
fn a_tensor_with_a_million_dimensions() {
    // Each REDUCE of the same huge size tuple made a new million-entry shape.
    let mut p = vec![0x80, 2, b'}', b'('];
    p.extend(op_str("w"));
    p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n((");
    p.extend(op_str("storage"));
    p.extend_from_slice(b"ctorch\nFloatStorage\n");
    p.extend(op_str("0"));
    p.extend(op_str("cpu"));
    p.extend_from_slice(b"K\x01tQK\x00(");
    p.extend(std::iter::repeat_n([b'K', 1], 1_000_000).flatten());
    p.extend_from_slice(b"tq\x00h\x00\x89}tRu.");
    let e = quickly(Duration::from_secs(20), || unpickle(&p)).unwrap_err();
    assert!(e.to_string().contains("tensor w") && e.to_string().contains("1000000 dimensions"), "{e}");
}

/// A legacy (`_use_new_zipfile_serialization=False`) file: magic, protocol, sys_info, the
/// state dict `{w: FloatStorage '0' of `declared` elements viewed as [1]}`, the key list, then
/// storage '0' holding `actual` float elements.
fn legacy_file(declared: i64, actual: u64) -> Vec<u8> {
    let mut f = vec![0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e];
    f.extend_from_slice(b"\x80\x02M\xe9\x03.");
    f.extend_from_slice(b"\x80\x02}.");
    let mut p = vec![0x80, 2, b'}', b'('];
    p.extend(op_str("w"));
    p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n((");
    p.extend(op_str("storage"));
    p.extend_from_slice(b"ctorch\nFloatStorage\n");
    p.extend(op_str("0"));
    p.extend(op_str("cpu"));
    p.extend(op_long(declared));
    p.extend_from_slice(b"NtQK\x00(K\x01t(K\x01t\x89}tRu.");
    f.extend(p);
    f.extend_from_slice(b"\x80\x02]q\x00X\x01\x00\x00\x000a.");
    f.extend_from_slice(&actual.to_le_bytes());
    f.extend(std::iter::repeat_n(0u8, actual as usize * 4));
    f
}

#[test]
fn legacy_storage_larger_than_its_record_does_not_overflow() {
    let dir = tempfile::tempdir().unwrap();
    // Control: consistent sizes read.
    let ok = write(dir.path(), "ok.pth", &legacy_file(1, 1));
    assert_eq!(Checkpoint::open(&ok).unwrap().tensors().len(), 1);
    // The pickle declares 2^62 floats (2^64 bytes: the size computation overflowed).
    let bad = write(dir.path(), "huge.pth", &legacy_file(1 << 62, 1));
    let e = Checkpoint::open(&bad).err().unwrap().to_string();
    assert!(e.contains("storage 0") && e.contains("huge.pth"), "{e}");
}

#[test]
fn legacy_storage_record_with_a_huge_count() {
    // Found by the `container` fuzz target: a record claiming u64::MAX / 4 floats made the
    // next record's position overflow (a panic; a wrong offset where overflow wraps).
    let dir = tempfile::tempdir().unwrap();
    let mut f = legacy_file(1, 1);
    let at = f.len() - 4 - 8;
    f[at..at + 8].copy_from_slice(&(u64::MAX / 4).to_le_bytes());
    let p = write(dir.path(), "count.pth", &f);
    let e = Checkpoint::open(&p).err().unwrap().to_string();
    assert!(e.contains("storage 0 is cut short"), "{e}");
}

/// A zip checkpoint whose pickle is `p` and whose storage `0` holds `bytes`.
fn zip_checkpoint(p: &[u8], bytes: &[u8]) -> Vec<u8> {
    zip_stored(&[("a/data.pkl", p), ("a/data/0", bytes), ("a/version", b"3\n")])
}

#[test]
fn long_tensor_names_are_bounded() {
    // 200 dicts deep, each key 60 KB (one memoized string): every tensor's name is 12 MB,
    // and a list of 10 000 references to one tensor at the bottom would make 120 GB of names.
    let key = "k".repeat(60_000);
    let mut p = vec![0x80, 2];
    p.extend(op_str(&key));
    p.extend_from_slice(b"q\x00");
    for _ in 0..200 {
        p.extend_from_slice(b"}h\x00");
    }
    p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n((");
    p.extend(op_str("storage"));
    p.extend_from_slice(b"ctorch\nFloatStorage\n");
    p.extend(op_str("0"));
    p.extend(op_str("cpu"));
    p.extend_from_slice(b"K\x01tQK\x00(K\x01t(K\x01t\x89}tRq\x010(");
    for _ in 0..10_000 {
        p.extend_from_slice(b"h\x01");
    }
    p.push(b'l');
    p.extend(std::iter::repeat_n(b's', 200));
    p.push(b'.');
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "names.pth", &zip_checkpoint(&p, &[0u8; 4]));
    let e = quickly(Duration::from_secs(20), || Checkpoint::open(&f)).err().unwrap().to_string();
    assert!(e.contains("names.pth") && e.contains("name is") && e.contains("bytes long"), "{e}");
}

/// The MAE table with `check` added to its checks, compiled and planned against the MAE
/// fixture: the error text (from compiling or planning), or "" when both succeed.
fn table_with_check(check: &str) -> String {
    use ckptmap::mapping::plan::{plan, PlanOptions, SourceTensor};
    use ckptmap::mapping::table::MappingTable;
    let text = std::fs::read_to_string(root().join("mappings/mae.toml")).unwrap();
    assert!(text.contains("checks = [\n"));
    let text = text.replacen("checks = [\n", &format!("checks = [\n    {check:?},\n"), 1);
    let table = match MappingTable::parse(&text, "t.toml") {
        Ok(t) => t,
        Err(e) => return e.to_string(),
    };
    let c = Checkpoint::open(&fixture("mae_tiny.pth")).unwrap();
    let sources: Vec<SourceTensor> = c
        .tensors_under(ckptmap::inspect::find_state_dict(&c).unwrap())
        .unwrap()
        .into_iter()
        .map(|t| SourceTensor { name: t.name, shape: t.view.shape.clone(), dtype: t.view.dtype })
        .collect();
    match plan(&table, &sources, &PlanOptions::default()) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn table_arithmetic_that_overflows_is_an_error() {
    // i64::MIN negated, divided or taken modulo -1, and sqrt near i64::MAX panicked.
    let min = "(-9223372036854775807 - 1)";
    for check in
        [format!("-{min} > 0"), format!("{min} % -1 == 0"), format!("{min} / -1 == 0"), format!("{min} // -1 == 0")]
    {
        let e = table_with_check(&check);
        assert!(e.contains("arithmetic overflow"), "{check}: {e:?}");
    }
    let e = table_with_check("sqrt(9223372036854775807) > 0");
    assert!(e.contains("not a perfect square"), "{e:?}");
    // Control: the check itself works.
    assert_eq!(table_with_check("sqrt(9223372030926249001) == 3037000499"), "");
}

#[test]
fn deeply_nested_table_expressions_are_an_error() {
    // A recursive-descent parser, evaluator and drop: 100 000 levels overflowed the stack.
    for check in
        [format!("{}1 > 0", "-".repeat(100_000)), format!("{}1{} > 0", "(".repeat(100_000), ")".repeat(100_000))]
    {
        let e = table_with_check(&check);
        assert!(e.contains("nests deeper than 64 levels"), "{}", &e[..e.len().min(300)]);
    }
    // 60 levels are fine.
    assert_eq!(table_with_check(&format!("{}1{} > 0", "(".repeat(60), ")".repeat(60))), "");
}
