//! The differential corpus (issue 12): files written by real `torch.save` in every container
//! (zip, legacy), pickle protocol 2–5, CRC on and off, every stem length, every dtype, views
//! of every kind and objects torch's weights-only loader would refuse. Each file is read and
//! compared, tensor by tensor and byte by byte, with what `torch.load` gave for it
//! (`fixtures/torch_corpus/expected.json`, written by `fixtures/make_torch_corpus.py`), then
//! carried through a keep-everything table into `.pth` and `.safetensors` and read back.
//! Files torch holds tensors in that ckptmap cannot carry must be refused by name.

use std::path::PathBuf;

use ckptmap::formats::checkpoint::Checkpoint;
use ckptmap::formats::Value;
use ckptmap::job::{choose_table, prepare};
use ckptmap::mapping::plan::PlanOptions;
use ckptmap::progress::NoProgress;
use ckptmap::write::execute::write_plan;
use serde_json::Value as Json;

use crate::util::bin::ckptmap;
use crate::util::fixture;

fn corpus() -> PathBuf {
    fixture("torch_corpus")
}

fn expected() -> Json {
    let text = std::fs::read_to_string(corpus().join("expected.json")).expect("fixtures/torch_corpus/expected.json");
    serde_json::from_str(&text).unwrap()
}

fn files(expect: &str) -> Vec<Json> {
    let e = expected();
    e["files"].as_array().unwrap().iter().filter(|f| f["expect"] == expect).cloned().collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every tensor of `ckpt` equals the list torch recorded: names in order, dtypes, shapes and
/// the logical values' bytes.
fn assert_tensors(ckpt: &Checkpoint, want: &[Json], what: &str) {
    let got = ckpt.tensors();
    let names: Vec<&str> = got.iter().map(|t| t.name.as_str()).collect();
    let want_names: Vec<&str> = want.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, want_names, "{what}: tensor names");
    for (t, w) in got.iter().zip(want) {
        let name = &t.name;
        assert_eq!(t.view.dtype.name(), w["dtype"].as_str().unwrap(), "{what}: {name}: dtype");
        let shape: Vec<usize> = serde_json::from_value(w["shape"].clone()).unwrap();
        assert_eq!(t.view.shape, shape, "{what}: {name}: shape");
        let bytes = ckpt.read(t.view).unwrap_or_else(|e| panic!("{what}: {name}: {e}"));
        assert_eq!(hex(&bytes), w["hex"].as_str().unwrap(), "{what}: {name}: values");
    }
}

fn value_text(v: &Value) -> String {
    match v {
        Value::Int(i) => i.to_string(),
        Value::BigInt(d) => d.clone(),
        Value::Str(s) => s.clone(),
        other => other.summary(),
    }
}

#[test]
fn the_corpus_is_big_enough_and_records_its_versions() {
    let e = expected();
    assert!(e["generator"]["torch"].as_str().is_some_and(|v| !v.is_empty()), "versions recorded");
    let all = e["files"].as_array().unwrap();
    assert!(all.len() >= 60, "only {} corpus files", all.len());
    for f in all {
        assert!(corpus().join(f["file"].as_str().unwrap()).is_file(), "{} is listed but missing", f["file"]);
    }
    let protocols: std::collections::BTreeSet<(String, i64)> = all
        .iter()
        .filter(|f| f["expect"] == "ok")
        .map(|f| (f["container"].as_str().unwrap().to_string(), f["protocol"].as_i64().unwrap()))
        .collect();
    for c in ["zip", "legacy"] {
        for p in 2..=5 {
            assert!(protocols.contains(&(c.to_string(), p)), "no readable {c} file with pickle protocol {p}");
        }
    }
}

#[test]
fn every_readable_file_reads_exactly_what_torch_load_gave() {
    for f in files("ok") {
        let file = f["file"].as_str().unwrap();
        let ckpt = Checkpoint::open(&corpus().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(ckpt.kind().name(), f["container"].as_str().unwrap(), "{file}: container");
        let crc = match (&f["container"], &f["crc"]) {
            (c, Json::Bool(true)) if c == "zip" => "recorded",
            (c, Json::Bool(false)) if c == "zip" => "absent",
            _ => "none",
        };
        assert_eq!(ckpt.crc32_status(), crc, "{file}: crc32 status");
        assert_tensors(&ckpt, f["tensors"].as_array().unwrap(), file);
        if let Some(values) = f["values"].as_object() {
            for (k, v) in values {
                let got = ckpt.root().get(k).unwrap_or_else(|| panic!("{file}: no top-level value {k}"));
                assert_eq!(value_text(got), v.as_str().unwrap(), "{file}: value {k}");
            }
        }
    }
}

const KEEP_ALL: &str = r#"
name = "keep-all"
description = "every tensor of the file under its own dotted name"
containers = [""]
[[rule]]
match = '(?s).*'
keep = true
"#;

#[test]
fn every_readable_file_round_trips_through_pth_and_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("keep_all.toml");
    std::fs::write(&table, KEEP_ALL).unwrap();
    let mut carried = 0;
    for f in files("ok") {
        let file = f["file"].as_str().unwrap();
        let want = f["tensors"].as_array().unwrap();
        let names: Vec<&str> = want.iter().map(|t| t["name"].as_str().unwrap()).collect();
        let unique: std::collections::HashSet<&&str> = names.iter().collect();
        if want.is_empty() || unique.len() != names.len() {
            // No tensors, or two that flatten to one name: a flat output cannot hold them
            // (the conversion refuses; `a_name_collision_says_what_collided` checks that).
            continue;
        }
        let src = Checkpoint::open(&corpus().join(file)).unwrap();
        let choice = choose_table(Some(table.to_str().unwrap()), &src).unwrap();
        let opts = PlanOptions { img_size: None, num_heads: None, keep_unused: false, init_values: None };
        let (_, sources, plan) = prepare(&src, choice.table(), &opts).unwrap_or_else(|e| panic!("{file}: {e}"));
        for ext in ["pth", "safetensors"] {
            let out = dir.path().join(format!("out.{ext}"));
            write_plan(&src, &sources, &plan, &out, None, &NoProgress)
                .unwrap_or_else(|e| panic!("{file} -> .{ext}: {e}"));
            let back = Checkpoint::open(&out).unwrap_or_else(|e| panic!("{file} -> .{ext}: {e}"));
            let mut want_sorted: Vec<&Json> = want.iter().collect();
            let mut got: Vec<_> = back.tensors();
            if ext == "safetensors" {
                // safetensors orders its header by name.
                want_sorted.sort_by_key(|t| t["name"].as_str().unwrap());
                got.sort_by(|a, b| a.name.cmp(&b.name));
            }
            assert_eq!(got.len(), want.len(), "{file} -> .{ext}: tensor count");
            for (t, w) in got.iter().zip(want_sorted) {
                assert_eq!(t.name, w["name"].as_str().unwrap(), "{file} -> .{ext}");
                assert_eq!(t.view.dtype.name(), w["dtype"].as_str().unwrap(), "{file} -> .{ext}: {}", t.name);
                let bytes = back.read(t.view).unwrap();
                assert_eq!(hex(&bytes), w["hex"].as_str().unwrap(), "{file} -> .{ext}: {}: values", t.name);
            }
        }
        carried += 1;
    }
    assert!(carried >= 40, "only {carried} corpus files were carried through");
}

#[test]
fn every_file_of_tensors_ckptmap_cannot_carry_is_refused_by_name() {
    let refusals = files("refuse");
    assert!(refusals.len() >= 8, "only {} refusal cases", refusals.len());
    let dir = tempfile::tempdir().unwrap();
    for f in refusals {
        let file = f["file"].as_str().unwrap();
        let path = corpus().join(file);
        let dst = dir.path().join("out.pth");
        for args in
            [vec!["inspect", path.to_str().unwrap()], vec!["convert", path.to_str().unwrap(), dst.to_str().unwrap()]]
        {
            let out = ckptmap(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{file}: {args:?} must refuse with exit 2; stderr: {stderr}");
            assert_eq!(stderr.trim_end().lines().count(), 1, "{file}: one line: {stderr}");
            let lower = stderr.to_lowercase();
            assert!(lower.contains(&file.to_lowercase()), "{file}: the error names the file: {stderr}");
            for word in f["refuse_contains"].as_array().unwrap() {
                assert!(lower.contains(word.as_str().unwrap()), "{file}: error lacks {word}: {stderr}");
            }
            assert!(!dst.exists(), "{file}: nothing written");
        }
    }
}

#[test]
fn zip_archives_of_every_stem_length_and_the_official_names_are_read() {
    // torch names the archive's inner folder after the file stem, and a 21-byte stem
    // (`mae_pretrain_vit_base`) once put a local header where a reader ignoring torch's
    // ZIP64 end records looked for the central directory.
    let mut lengths = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(corpus().join("stems")).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
        let ckpt = Checkpoint::open(&path).unwrap_or_else(|e| panic!("stem of {} bytes: {e}", stem.len()));
        assert_eq!(ckpt.tensors().len(), 1, "{stem}");
        lengths.insert(stem.len());
    }
    assert!((1..=64).all(|n| lengths.contains(&n)), "stem lengths present: {lengths:?}");
    for name in
        ["mae_pretrain_vit_base", "mae_pretrain_vit_large", "mae_pretrain_vit_huge", "beit_base_patch16_224_pt22k"]
    {
        assert!(corpus().join("stems").join(format!("{name}.pth")).is_file(), "{name}.pth is in the corpus");
    }
}

/// A table with the default containers (`state_dict`, `model`, `module`, top level) that
/// keeps every tensor.
const KEEP_ALL_DEFAULT_CONTAINERS: &str = r#"
name = "keep-all-default"
description = "every tensor under its own name, default containers"
[[rule]]
match = '(?s).*'
keep = true
"#;

#[test]
fn a_tensor_named_like_a_container_is_not_unwrapped() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("keep.toml");
    std::fs::write(&table, KEEP_ALL_DEFAULT_CONTAINERS).unwrap();
    for name in ["model", "module", "state_dict"] {
        let file = corpus().join(format!("flat_tensor_named_{name}.pth"));
        // Through .pth, then again through our own flat .safetensors of the same tensors.
        let st = dir.path().join(format!("flat_{name}.safetensors"));
        for (input, out) in [(file.clone(), st.clone()), (st.clone(), dir.path().join("again.pth"))] {
            let out = ckptmap(&[
                "convert",
                input.to_str().unwrap(),
                out.to_str().unwrap(),
                "--mapping",
                table.to_str().unwrap(),
            ]);
            assert!(out.status.success(), "{}: {}", input.display(), String::from_utf8_lossy(&out.stderr));
        }
        let back = Checkpoint::open(&dir.path().join("again.pth")).unwrap();
        let mut names: Vec<String> = back.tensors().into_iter().map(|t| t.name).collect();
        names.sort();
        let mut want: Vec<String> = Checkpoint::open(&file).unwrap().tensors().into_iter().map(|t| t.name).collect();
        want.sort();
        assert!(
            want.contains(&name.to_string()) && want.len() >= 2,
            "{name}: fixture holds the tensor {name} and others"
        );
        assert_eq!(names, want, "{name}: every tensor kept under its own name");
    }
}

#[test]
fn a_name_collision_says_what_collided() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("keep.toml");
    std::fs::write(&table, KEEP_ALL).unwrap();
    let src = corpus().join("key_collision.pth");
    let out = ckptmap(&[
        "convert",
        src.to_str().unwrap(),
        dir.path().join("o.pth").to_str().unwrap(),
        "--mapping",
        table.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("both named 'a.b'") && stderr.contains("dots"), "{stderr}");
    assert!(!stderr.contains("stripping"), "no prefix was stripped: {stderr}");
}

#[test]
fn damaged_zip_directories_are_errors_not_panics() {
    // Every byte of the end records and central directory of a few corpus archives, set
    // to values that matter to a directory reader (0, 0xff, off by one), one at a time.
    // Each read must return (a checkpoint or an error); none may panic.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("damaged.pth");
    let mut cases = 0;
    for file in ["stems/mae_pretrain_vit_base.pth", "zip_crc_off.pth", "dtype_all.pth"] {
        let good = std::fs::read(corpus().join(file)).unwrap();
        let cd = good.windows(4).position(|w| w == b"PK\x01\x02").unwrap();
        for at in cd..good.len() {
            for v in [0u8, 0xff, good[at].wrapping_add(1)] {
                let mut bad = good.clone();
                bad[at] = v;
                std::fs::write(&path, &bad).unwrap();
                let _ = Checkpoint::open(&path);
                cases += 1;
            }
        }
    }
    assert!(cases > 1000, "{cases} damaged archives");
}
