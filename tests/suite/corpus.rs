//! The bad-input corpus (issue 7): every case run through the `ckptmap` binary. Each must
//! end with exit code 2 and exactly one line on stderr that names the file (and the key,
//! rule or line where there is one) and says what is wrong, write no output file and leave
//! no temporary file in the output folder. No case may panic.
//!
//! The bad files are made here, from the fixtures (bytes corrupted on purpose) and from
//! pickles written by hand.

use std::io::Write;
use std::path::{Path, PathBuf};

use ckptmap::write::pth::{write_pth, TensorToWrite};
use ckptmap::DType;

use crate::util::bin::cmd;
use crate::util::pickle::{checkpoint_zip, op_int, op_str, state_dict_pickle, Tensor};
use crate::util::{fixture, noise, root, write_file as write};

/// A small good checkpoint written by our writer: `cls_token` [1,1,4] and `pos_embed` [1,5,4].
fn good_small_zip() -> Vec<u8> {
    let shapes = [vec![1usize, 1, 4], vec![1, 5, 4]];
    let tensors = [
        TensorToWrite { name: "cls_token", dtype: DType::F32, shape: &shapes[0] },
        TensorToWrite { name: "pos_embed", dtype: DType::F32, shape: &shapes[1] },
    ];
    let out = write_pth(std::io::Cursor::new(Vec::new()), "small", &tensors, |i, w| {
        w.write_all(&vec![1u8; tensors[i].nbytes() as usize])
    })
    .unwrap();
    out.into_inner()
}

/// Calls `edit(header, is_central)` on the local and central headers of the entry whose
/// name ends with `suffix`.
fn patch_zip_entry(zip: &mut [u8], suffix: &str, edit: impl Fn(&mut [u8], bool)) {
    let mut found = 0;
    let mut i = 0;
    while i + 46 <= zip.len() {
        let sig = &zip[i..i + 4];
        let (central, name_at, name_len) = if sig == b"PK\x01\x02" {
            (true, i + 46, u16::from_le_bytes([zip[i + 28], zip[i + 29]]) as usize)
        } else if sig == b"PK\x03\x04" {
            (false, i + 30, u16::from_le_bytes([zip[i + 26], zip[i + 27]]) as usize)
        } else {
            i += 1;
            continue;
        };
        if name_at + name_len <= zip.len() && zip[name_at..name_at + name_len].ends_with(suffix.as_bytes()) {
            edit(&mut zip[i..name_at], central);
            found += 1;
        }
        i += 4;
    }
    assert_eq!(found, 2, "entry {suffix}: expected a local and a central header");
}

fn set_u32(h: &mut [u8], at: usize, v: u32) {
    h[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

// ---------------------------------------------------------------------------------------
// The cases.

struct Case {
    what: &'static str,
    /// The source checkpoint.
    src: PathBuf,
    extra: Vec<String>,
    /// The file the message must name (the source, or a mapping table).
    names: String,
    /// Further text the message must contain (what is wrong; the key or rule).
    needles: Vec<String>,
}

fn case(what: &'static str, src: PathBuf, needles: &[&str]) -> Case {
    let names = src.file_name().unwrap().to_string_lossy().into_owned();
    Case { what, src, extra: Vec::new(), names, needles: needles.iter().map(|s| s.to_string()).collect() }
}

fn bad_checkpoints(dir: &Path, marker: &Path) -> Vec<Case> {
    let mut cases = Vec::new();
    cases.push(case("empty file", write(dir, "empty.pth", b""), &["empty file"]));
    let sub = dir.join("a_folder.pth");
    std::fs::create_dir(&sub).unwrap();
    cases.push(case("a directory", sub, &["directory"]));
    cases.push(case("random bytes", write(dir, "noise.pth", &noise(65536, 7)), &["not a PyTorch checkpoint"]));
    let mut png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x06\x00\x00\x00".to_vec();
    png.extend(noise(200, 1));
    cases.push(case("a PNG", write(dir, "picture.pth", &png), &["not a PyTorch checkpoint"]));

    let mae = std::fs::read(fixture("mae_tiny.pth")).unwrap();
    cases.push(case("a truncated zip", write(dir, "cut.pth", &mae[..mae.len() / 2]), &["zip archive is unreadable"]));
    cases.push(case(
        "a zip cut inside its central directory",
        write(dir, "cut_cd.pth", &mae[..mae.len() - 30]),
        &["zip archive is unreadable"],
    ));

    // The central directory claims a storage entry is far larger than the file ...
    let mut z = good_small_zip();
    patch_zip_entry(&mut z, "data/1", |h, central| {
        if central {
            set_u32(h, 20, 0x7fff_0000);
            set_u32(h, 24, 0x7fff_0000);
        }
    });
    cases.push(case(
        "central directory: sizes past the end",
        write(dir, "lying_big.pth", &z),
        &["small/data/1", "past the end"],
    ));
    // ... or smaller than the tensor stored in it.
    let mut z = good_small_zip();
    patch_zip_entry(&mut z, "data/1", |h, central| {
        if central {
            set_u32(h, 20, 12);
            set_u32(h, 24, 12);
        }
    });
    cases.push(case(
        "central directory: sizes too small",
        write(dir, "lying_small.pth", &z),
        &["storage 1 holds 12 bytes but its header says 80"],
    ));

    // A storage entry marked deflated.
    let mut z = good_small_zip();
    patch_zip_entry(&mut z, "data/0", |h, central| {
        let at = if central { 10 } else { 8 };
        h[at..at + 2].copy_from_slice(&8u16.to_le_bytes());
    });
    cases.push(case("a deflated storage entry", write(dir, "deflated.pth", &z), &["small/data/0", "compressed"]));
    // A compressed pickle: this build reads stored entries only, so nothing is decompressed
    // (no decompression bomb can get in).
    let mut z = good_small_zip();
    patch_zip_entry(&mut z, "data.pkl", |h, central| {
        let at = if central { 10 } else { 8 };
        h[at..at + 2].copy_from_slice(&8u16.to_le_bytes());
    });
    cases.push(case("a deflated data.pkl", write(dir, "deflated_pkl.pth", &z), &["small/data.pkl", "not supported"]));

    let w = |shape: &'static [i64], stride: &'static [i64], numel: i64, offset: i64| Tensor {
        name: "blocks.0.w",
        key: "0",
        numel,
        offset,
        shape,
        stride,
    };
    let zip_of = |t: Tensor, bytes: usize| checkpoint_zip(&state_dict_pickle(&[t]), &[&vec![0u8; bytes]]);
    cases.push(case(
        "a storage shorter than its tensor needs",
        write(dir, "short_storage.pth", &zip_of(w(&[4], &[1], 2, 0), 8)),
        &["tensor blocks.0.w needs 4 elements of storage 0, which has only 2"],
    ));
    cases.push(case(
        "a storage entry shorter than its header says",
        write(dir, "short_entry.pth", &zip_of(w(&[4], &[1], 4, 0), 10)),
        &["storage 0 holds 10 bytes but its header says 16"],
    ));
    cases.push(case(
        "a negative stride",
        write(dir, "neg_stride.pth", &zip_of(w(&[2, 2], &[2, -1], 4, 0), 16)),
        &["tensor blocks.0.w", "negative stride -1"],
    ));
    cases.push(case(
        "a negative offset",
        write(dir, "neg_offset.pth", &zip_of(w(&[2], &[1], 4, -3), 16)),
        &["tensor blocks.0.w", "negative storage offset -3"],
    ));
    cases.push(case(
        "an overflowing stride",
        write(dir, "big_stride.pth", &zip_of(w(&[8, 2], &[1 << 62, 1], 4, 0), 16)),
        &["tensor blocks.0.w", "overflow"],
    ));
    cases.push(case(
        "an overflowing size",
        write(dir, "big_size.pth", &zip_of(w(&[1 << 40, 1 << 40, 0], &[0, 0, 1], 4, 0), 16)),
        &["tensor blocks.0.w", "overflows"],
    ));
    cases.push(case(
        "an overflowing offset",
        write(dir, "big_offset.pth", &zip_of(w(&[2], &[1], 4, i64::MAX), 16)),
        &["tensor blocks.0.w needs 9223372036854775809 elements"],
    ));
    cases.push(case(
        "a view that expands a tiny storage to 4 TB",
        write(dir, "expanded.pth", &zip_of(w(&[1 << 20, 1 << 20], &[0, 0], 1, 0), 4)),
        &["tensor blocks.0.w", "expands 4 bytes"],
    ));

    let good = state_dict_pickle(&[w(&[4], &[1], 4, 0)]);
    cases.push(case(
        "a pickle that stops early",
        write(dir, "stops_early.pth", &checkpoint_zip(&good[..good.len() - 5], &[&[0u8; 16]])),
        &["pickle ends before its STOP opcode"],
    ));

    // REDUCEs of os.system and builtins.eval: read as opaque values, never called. The file
    // holds no tensors, so there is nothing to convert.
    let cmd = format!("touch {}", marker.display());
    let mut p = vec![0x80, 2, b'}', b'('];
    p.extend(op_str("cmd"));
    p.extend_from_slice(b"cos\nsystem\n");
    p.extend(op_str(&cmd));
    p.extend_from_slice(b"\x85R");
    p.extend(op_str("eval"));
    p.extend_from_slice(b"cbuiltins\neval\n");
    p.extend(op_str(&format!("open({:?}, 'w')", marker.display().to_string())));
    p.extend_from_slice(b"\x85Ru.");
    cases.push(case(
        "REDUCE of os.system and builtins.eval",
        write(dir, "evil.pth", &checkpoint_zip(&p, &[])),
        &["no tensors"],
    ));
    // The same as the whole state dict.
    let mut p = vec![0x80, 2];
    p.extend_from_slice(b"cos\nsystem\n");
    p.extend(op_str(&cmd));
    p.extend_from_slice(b"\x85R.");
    cases.push(case(
        "a state dict that is os.system(...)",
        write(dir, "evil_root.pth", &checkpoint_zip(&p, &[])),
        &["no tensors"],
    ));

    // A memo bomb: a list of 10 000 items, then a list of 5 000 references to it (50 million
    // values once expanded).
    let mut p = vec![0x80, 2, b']', b'('];
    p.extend(std::iter::repeat_n(b'N', 10_000));
    p.extend_from_slice(b"eq\x00(");
    for _ in 0..5_000 {
        p.extend_from_slice(b"h\x00");
    }
    p.extend_from_slice(b"l.");
    cases.push(case("a memo bomb", write(dir, "memo_bomb.pth", &checkpoint_zip(&p, &[])), &["memo bomb"]));
    // Deep nesting: 100 000 lists inside each other.
    let mut p = vec![0x80, 2];
    p.extend(std::iter::repeat_n(b']', 100_000));
    p.extend(std::iter::repeat_n(b'a', 99_999));
    p.push(b'.');
    cases.push(case(
        "deep nesting",
        write(dir, "deep.pth", &checkpoint_zip(&p, &[])),
        &["nests deeper than 256 levels"],
    ));

    let legacy = std::fs::read(fixture("mae_tiny_legacy.pth")).unwrap();
    let mut wrong_magic = legacy.clone();
    wrong_magic[6] ^= 0x55;
    cases.push(case(
        "a legacy file with a wrong magic number",
        write(dir, "legacy_magic.pth", &wrong_magic),
        &["legacy checkpoint", "wrong magic number"],
    ));
    cases.push(case(
        "a legacy file with a short storage",
        write(dir, "legacy_short.pth", &legacy[..legacy.len() - 100]),
        &["legacy checkpoint", "storage", "cut short"],
    ));

    // A checkpoint whose state dict holds no tensors.
    let mut p = vec![0x80, 2, b'}', b'('];
    p.extend(op_str("epoch"));
    p.extend(op_int(3));
    p.extend(op_str("state_dict"));
    p.extend_from_slice(b"}u.");
    cases.push(case(
        "a state dict without tensors",
        write(dir, "no_tensors.pth", &checkpoint_zip(&p, &[])),
        &["no tensors"],
    ));
    cases
}

/// Mapping tables with mistakes, each derived from the built-in MAE table.
fn bad_tables(dir: &Path) -> Vec<Case> {
    let mae = std::fs::read_to_string(root().join("mappings/mae.toml")).unwrap();
    let edit = |from: &str, to: &str| {
        assert!(mae.contains(from), "mae.toml changed: {from}");
        mae.replacen(from, to, 1)
    };
    let mut cases = Vec::new();
    let mut add = |what: &'static str, file: &str, text: String, needles: &[&str]| {
        let table = write(dir, file, text.as_bytes());
        cases.push(Case {
            what,
            src: fixture("mae_tiny.pth"),
            extra: vec!["--mapping".into(), table.display().to_string()],
            names: file.to_string(),
            needles: needles.iter().map(|s| s.to_string()).collect(),
        });
    };
    add(
        "a table with an invalid regex",
        "bad_regex.toml",
        edit("match = 'cls_token'", "match = 'cls_token('"),
        &["rule 'cls-token'", "invalid regex 'cls_token('"],
    );
    add(
        "a table with an unknown transform",
        "bad_transform.toml",
        edit("name = \"resize_abs_pos_embed\"", "name = \"resize_magic\""),
        &["rule 'pos-embed-resize'", "unknown transform 'resize_magic'"],
    );
    add(
        "a table whose rule maps two keys to one",
        "two_to_one.toml",
        edit("rename = \"layers.${1}.ln${2}.${3}\"", "rename = \"layers.0.ln${2}.${3}\""),
        &[
            "two_to_one.toml",
            "target 'layers.0.ln1.weight' is produced twice",
            "rule 'block-norm'",
            "blocks.0.norm1.weight",
            "blocks.1.norm1.weight",
        ],
    );
    add("a table that is not TOML", "not_toml.toml", "[[rule]\nid = 'x'\n".into(), &["line 1"]);
    cases
}

struct Outcome {
    code: Option<i32>,
    stderr: String,
    leftovers: Vec<String>,
}

fn run_case(c: &Case, command: &str, dir: &Path, i: usize) -> Outcome {
    let out_dir = dir.join(format!("out{i}-{command}"));
    std::fs::create_dir(&out_dir).unwrap();
    let mut cmd = cmd();
    cmd.arg(command).arg(&c.src);
    if command == "convert" {
        cmd.arg(out_dir.join("OUT.pth"));
    }
    cmd.args(&c.extra).env("RUST_BACKTRACE", "1");
    let r = cmd.output().unwrap();
    let leftovers =
        std::fs::read_dir(&out_dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    Outcome { code: r.status.code(), stderr: String::from_utf8_lossy(&r.stderr).into_owned(), leftovers }
}

fn check(c: &Case, o: &Outcome, command: &str, failures: &mut Vec<String>) {
    let mut wrong = Vec::new();
    if o.code != Some(2) {
        wrong.push(format!("exit code {:?}, not 2", o.code));
    }
    if o.stderr.contains("panicked") {
        wrong.push("panicked".into());
    }
    let lines: Vec<&str> = o.stderr.lines().collect();
    if lines.len() != 1 || !lines[0].starts_with("error: ") {
        wrong.push(format!("{} stderr lines, not one 'error: ' line", lines.len()));
    }
    if !o.stderr.contains(&c.names) {
        wrong.push(format!("does not name {}", c.names));
    }
    if command == "convert" || !c.what.contains("table") {
        for n in &c.needles {
            if !o.stderr.contains(n.as_str()) {
                wrong.push(format!("does not say {n:?}"));
            }
        }
    }
    if !o.leftovers.is_empty() {
        wrong.push(format!("left files in the output folder: {:?}", o.leftovers));
    }
    if !wrong.is_empty() {
        failures.push(format!("{command} / {}: {}\n    stderr: {}", c.what, wrong.join("; "), o.stderr.trim()));
    }
}

#[test]
fn every_bad_input_is_one_clear_error_with_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("PWNED");
    let mut cases = bad_checkpoints(dir.path(), &marker);
    cases.extend(bad_tables(dir.path()));
    let mut failures = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let o = run_case(c, "convert", dir.path(), i);
        eprintln!("{:<45} -> {}", c.what, o.stderr.trim());
        check(c, &o, "convert", &mut failures);
        // `inspect` reads the same files the same way (tables aside: it takes none; and a
        // file without tensors is fine to inspect).
        if c.extra.is_empty() && !c.needles.iter().any(|n| n == "no tensors") {
            let o = run_case(c, "inspect", dir.path(), i);
            check(c, &o, "inspect", &mut failures);
        }
    }
    assert!(!marker.exists(), "a pickle's os.system or eval ran");
    assert!(failures.is_empty(), "{} of {} cases wrong:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

/// Every good fixture still converts: the limits above do not catch real checkpoints.
#[test]
fn the_limits_let_real_checkpoints_through() {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "mae_tiny.pth",
        "mae_tiny_legacy.pth",
        "mae_tiny_train.pth",
        "beit_tiny_pt.pth",
        "mae_tiny.safetensors",
        "views.pth",
    ] {
        let r = cmd().args(["inspect"]).arg(fixture(f)).output().unwrap();
        assert!(r.status.success(), "{f}: {}", String::from_utf8_lossy(&r.stderr));
    }
    let out = dir.path().join("o.pth");
    let r = cmd().arg("convert").arg(fixture("mae_tiny_train.pth")).arg(&out).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
}

/// A URL list with a malformed line: `batch` refuses it before fetching or writing anything.
#[test]
fn a_malformed_list_line_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mae = fixture("mae_tiny.pth").display().to_string();
    let cases: [(&str, String, &[&str]); 3] = [
        ("unknown field", format!("# list\n{mae} name=a.pth\n{mae} frobnicate=3\n"), &["list.txt:3", "frobnicate"]),
        ("name with a folder", format!("{mae} name=../escape.pth\n"), &["list.txt:1", "../escape.pth"]),
        ("bad sha256", format!("\n{mae} sha256=xyz\n"), &["list.txt:2", "sha256"]),
    ];
    for (i, (what, text, needles)) in cases.iter().enumerate() {
        let case_dir = dir.path().join(format!("case{i}"));
        std::fs::create_dir(&case_dir).unwrap();
        let list = write(&case_dir, "list.txt", text.as_bytes());
        let out = case_dir.join("out");
        let r = cmd().arg("batch").arg(&list).arg("--out-dir").arg(&out).env("RUST_BACKTRACE", "1").output().unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{what}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{what}: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
        for n in *needles {
            assert!(err.contains(n), "{what}: {err} does not say {n:?}");
        }
        let written: Vec<_> =
            std::fs::read_dir(&out).map(|d| d.map(|e| e.unwrap().file_name()).collect()).unwrap_or_default();
        assert!(written.is_empty(), "{what}: wrote {written:?}");
    }
}

/// One flipped byte inside a storage of a well-formed zip: the zip's CRC-32 catches it,
/// whichever way the conversion uses the bytes (copied inside the kernel, cast, resized,
/// written as safetensors), and `verify` catches it too. Nothing is written.
#[test]
fn a_corrupted_storage_byte_fails_its_crc_check() {
    let dir = tempfile::tempdir().unwrap();
    let good = fixture("mae_tiny.pth");
    let ckpt = ckptmap::formats::checkpoint::Checkpoint::open(&good).unwrap();
    let corrupt = |tensor: &str| -> PathBuf {
        let t = ckpt.tensors().into_iter().find(|t| t.name == tensor).unwrap();
        let loc = ckpt.storage(t.view);
        let mut bytes = std::fs::read(&good).unwrap();
        bytes[(loc.file_offset + loc.byte_len / 2) as usize] ^= 0x10;
        write(dir.path(), &format!("{}.pth", tensor.replace('.', "_")), &bytes)
    };
    let fc1 = corrupt("model.blocks.0.mlp.fc1.weight");
    let pos = corrupt("model.pos_embed");
    let runs: Vec<(&str, &PathBuf, &str, Vec<&str>)> = vec![
        ("renamed tensor, copied inside the kernel", &fc1, "OUT.pth", vec![]),
        ("renamed tensor, cast to f16", &fc1, "OUT.pth", vec!["--dtype", "f16"]),
        ("renamed tensor, to safetensors", &fc1, "OUT.safetensors", vec![]),
        ("resized tensor", &pos, "OUT.pth", vec!["--img-size", "64", "--num-heads", "2"]),
    ];
    let mut failures = Vec::new();
    for (i, (what, src, out_name, extra)) in runs.iter().enumerate() {
        let out_dir = dir.path().join(format!("crc{i}"));
        std::fs::create_dir(&out_dir).unwrap();
        let r = cmd()
            .arg("convert")
            .arg(src)
            .arg(out_dir.join(out_name))
            .args(extra)
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        let tensor = if *src == &fc1 { "tensor blocks.0.mlp.fc1.weight" } else { "tensor pos_embed" };
        let left: Vec<_> = std::fs::read_dir(&out_dir).unwrap().collect();
        if r.status.code() != Some(2)
            || err.trim().lines().count() != 1
            || !err.contains(&src.display().to_string())
            || !err.contains(tensor)
            || !err.contains("is corrupt")
            || !err.contains("CRC-32")
            || !left.is_empty()
        {
            failures.push(format!(
                "{what}: exit {:?}, {} files left, stderr: {}",
                r.status.code(),
                left.len(),
                err.trim()
            ));
        }
    }
    // verify reads the original through the same checked reads.
    let converted = dir.path().join("good.pth");
    let r = cmd().arg("convert").arg(&good).arg(&converted).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let r = cmd().arg("verify").arg(&converted).arg("--against").arg(&fc1).output().unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    if r.status.code() != Some(2) || !err.contains("is corrupt") || !err.contains(&fc1.display().to_string()) {
        failures.push(format!(
            "verify --against a corrupt original: exit {:?}, stderr: {}",
            r.status.code(),
            err.trim()
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
