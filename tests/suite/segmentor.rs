//! Issue 15: a whole MMSeg segmentor rewritten (`--mapping mmseg-segmentor`) as
//! `{'meta': <plain values>, 'state_dict': OrderedDict(tensors)}` that
//! `torch.load(weights_only=True)` reads. CI has no Python, so the properties that make
//! weights_only succeed are asserted on the written `data.pkl` itself: every opcode is one
//! torch's weights-only unpickler implements and every global is on its allow-list (an
//! opcode scan written here, independent of the writer), and our unpickler finds no object
//! other than torch's tensor rebuilds. The scan is calibrated against torch's verdict on the
//! sources (torch 2.15: the 0.x file loads, the 1.x files are refused for
//! `mmengine.logging.history_buffer.HistoryBuffer`; `fixtures/check_segmentor_rewrite.py`
//! runs the real torch.load on the rewrites).

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::util::bin::ckptmap;
use ckptmap::formats::checkpoint::Checkpoint;
use ckptmap::formats::pth::unpickle::unpickle;
use ckptmap::formats::Value;
use ckptmap::mapping::MappingTable;
use ckptmap::write::pickle::{checkpoint_pickle, TopEntry};

const SEGMENTORS: [&str; 3] = ["mmseg0_segmentor_mae", "mmseg1_segmentor_mae", "mmseg1_segmentor_beit"];

fn fixture(name: &str) -> PathBuf {
    crate::util::layouts().join(format!("{name}.pth"))
}

/// `ckptmap convert SRC OUT --json [extra]`: the report, or the failed run's stderr.
fn convert(src: &Path, out: &Path, extra: &[&str]) -> Result<serde_json::Value, String> {
    let mut args = vec!["convert", src.to_str().unwrap(), out.to_str().unwrap(), "--json", "--quiet"];
    args.extend_from_slice(extra);
    let o = ckptmap(&args);
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&o.stdout).expect("a JSON report"))
}

/// The `data.pkl` record of a torch zip file.
fn data_pkl(path: &Path) -> Vec<u8> {
    let mut zip = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    let name = zip
        .file_names()
        .filter_map(Result::ok)
        .find(|n| n.ends_with("/data.pkl"))
        .expect("a data.pkl record")
        .to_string();
    let mut out = Vec::new();
    zip.by_name(&name).unwrap().read_to_end(&mut out).unwrap();
    out
}

// ---------------------------------------------------------------------------------------
// What torch.load(weights_only=True) accepts.

/// Globals torch's weights-only unpickler resolves for a state dict: the OrderedDict, the
/// tensor rebuilds, the storage classes and dtypes.
fn allowed_global(module: &str, name: &str) -> bool {
    match module {
        "collections" => name == "OrderedDict",
        "torch._utils" => matches!(name, "_rebuild_tensor_v2" | "_rebuild_tensor_v3"),
        "torch.storage" => name == "UntypedStorage",
        "torch" => {
            name.ends_with("Storage")
                || matches!(
                    name,
                    "float32"
                        | "float64"
                        | "float16"
                        | "bfloat16"
                        | "int8"
                        | "uint8"
                        | "int16"
                        | "int32"
                        | "int64"
                        | "bool"
                        | "uint16"
                        | "uint32"
                        | "uint64"
                        | "float8_e4m3fn"
                        | "float8_e5m2"
                        | "complex64"
                        | "complex128"
                )
        }
        _ => false,
    }
}

/// Every reason `torch.load(weights_only=True)` would refuse this pickle: an opcode outside
/// the set its weights-only unpickler implements for these files, or a global off the
/// allow-list. Empty when it loads.
fn weights_only_violations(pkl: &[u8]) -> Vec<String> {
    let mut bad = Vec::new();
    let mut pos = 0usize;
    let mut strings: Vec<String> = Vec::new(); // for STACK_GLOBAL
    let take = |pos: &mut usize, n: usize| -> &[u8] {
        let s = &pkl[*pos..*pos + n];
        *pos += n;
        s
    };
    let le = |b: &[u8]| b.iter().rev().fold(0usize, |acc, &x| acc << 8 | x as usize);
    let line = |pos: &mut usize| -> String {
        let end = pkl[*pos..].iter().position(|&b| b == b'\n').expect("a line") + *pos;
        let s = String::from_utf8_lossy(&pkl[*pos..end]).into_owned();
        *pos = end + 1;
        s
    };
    loop {
        let op = pkl[pos];
        pos += 1;
        match op {
            b'.' => break,
            0x80 | b'q' | b'h' | b'K' => {
                take(&mut pos, 1);
            }
            b'M' => {
                take(&mut pos, 2);
            }
            b'r' | b'j' | b'J' => {
                take(&mut pos, 4);
            }
            b'G' | 0x95 => {
                take(&mut pos, 8);
            }
            b'X' | 0x8c => {
                let n = if op == b'X' { le(take(&mut pos, 4)) } else { le(take(&mut pos, 1)) };
                strings.push(String::from_utf8_lossy(take(&mut pos, n)).into_owned());
            }
            0x8a => {
                let n = le(take(&mut pos, 1));
                take(&mut pos, n);
            }
            b'}' | b']' | b')' | b'(' | b'N' | 0x88 | 0x89 | b'R' | b'u' | b's' | b'e' | b'a' | b't' | 0x85 | 0x86
            | 0x87 | b'Q' | b'b' | 0x81 | 0x94 => {}
            b'c' => {
                let (module, name) = (line(&mut pos), line(&mut pos));
                if !allowed_global(&module, &name) {
                    bad.push(format!("global {module}.{name}"));
                }
            }
            0x93 => {
                let n = strings.len();
                let (module, name) =
                    if n >= 2 { (strings[n - 2].clone(), strings[n - 1].clone()) } else { Default::default() };
                if !allowed_global(&module, &name) {
                    bad.push(format!("global {module}.{name}"));
                }
            }
            other => {
                bad.push(format!("opcode 0x{other:02x} at byte {}", pos - 1));
                break; // its argument length is unknown here
            }
        }
    }
    bad
}

/// Paths of the objects our unpickler found (anything not a plain value or a tensor).
fn objects(v: &Value, path: &str, out: &mut Vec<String>) {
    match v {
        Value::None | Value::Bool(_) | Value::Int(_) | Value::Float(_) | Value::Str(_) | Value::Tensor(_) => {}
        Value::List(items) | Value::Tuple(items) => {
            for (i, x) in items.iter().enumerate() {
                objects(x, &format!("{path}[{i}]"), out);
            }
        }
        Value::Dict(items) => {
            for (k, x) in items {
                objects(k, &format!("{path}[key]"), out);
                let key = k.as_str().map(str::to_string).unwrap_or_else(|| k.summary());
                objects(x, &format!("{path}.{key}"), out);
            }
        }
        other => out.push(format!("{path}: {}", other.summary())),
    }
}

/// Both structural checks on a file: the opcode/global scan and the object walk.
fn weights_only_problems(path: &Path) -> Vec<String> {
    let pkl = data_pkl(path);
    let mut problems = weights_only_violations(&pkl);
    let tree = unpickle(&pkl).expect("our unpickler reads it").value;
    objects(&tree, "", &mut problems);
    problems
}

// ---------------------------------------------------------------------------------------
// The rewrite.

/// `out` holds exactly the plain part of `src` (compared with the source's tree, not with
/// ckptmap's own reduction): every dict entry of `src` is either equal in `out` or its path
/// is in `dropped`; a list or tuple is equal item for item, or dropped whole.
fn assert_plain_subset(src: &Value, out: &Value, path: &str, dropped: &[String]) {
    match (src, out) {
        (Value::Dict(s), Value::Dict(o)) => {
            let mut o = o.iter();
            for (k, v) in s {
                let p = match k {
                    Value::Str(name) if !name.is_empty() && name.chars().all(|c| c.is_alphanumeric() || c == '_') => {
                        format!("{path}.{name}")
                    }
                    Value::Str(name) => format!("{path}[{name:?}]"),
                    other => format!("{path}[{}]", other.summary()),
                };
                if dropped.contains(&p) {
                    continue;
                }
                let (ok, ov) =
                    o.next().unwrap_or_else(|| panic!("{p}: missing from the output and not listed as dropped"));
                assert_eq!(ok, k, "{path}: keys out of order");
                assert_plain_subset(v, ov, &p, dropped);
            }
            assert!(o.next().is_none(), "{path}: the output has entries the source lacks");
        }
        (Value::List(s), Value::List(o)) | (Value::Tuple(s), Value::Tuple(o)) => {
            assert_eq!(s.len(), o.len(), "{path}: length");
            for (i, (a, b)) in s.iter().zip(o).enumerate() {
                assert_plain_subset(a, b, &format!("{path}[{i}]"), dropped);
            }
        }
        (Value::None | Value::Bool(_) | Value::Int(_) | Value::Float(_) | Value::Str(_), _) => {
            assert_eq!(src, out, "{path}");
        }
        _ => panic!("{path}: {} written as {}", src.summary(), out.summary()),
    }
}

fn dropped_paths(report: &serde_json::Value) -> Vec<String> {
    report["plan"]["layout"]["meta_dropped"]
        .as_array()
        .expect("plan.layout.meta_dropped")
        .iter()
        .map(|d| d["path"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn segmentors_rewrite_bit_identical_with_plain_meta() {
    let dir = tempfile::tempdir().unwrap();
    for name in SEGMENTORS {
        let src_path = fixture(name);
        let out_path = dir.path().join(format!("{name}.pth"));
        let report =
            convert(&src_path, &out_path, &["--mapping", "mmseg-segmentor"]).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(report["mapping"], "builtin:mmseg-segmentor");
        let src = Checkpoint::open(&src_path).unwrap();
        let out = Checkpoint::open(&out_path).unwrap();

        // The top level: meta, then state_dict, nothing else.
        let Value::Dict(top) = out.root() else { panic!("{name}: top level is not a dict") };
        let keys: Vec<&str> = top.iter().map(|(k, _)| k.as_str().unwrap()).collect();
        assert_eq!(keys, ["meta", "state_dict"], "{name}");

        // Every state_dict tensor: names, order, dtype, shape, bytes.
        let a = src.tensors_under("state_dict").unwrap();
        let b = out.tensors_under("state_dict").unwrap();
        assert_eq!(
            a.iter().map(|t| &t.name).collect::<Vec<_>>(),
            b.iter().map(|t| &t.name).collect::<Vec<_>>(),
            "{name}: names/order"
        );
        assert!(
            a.iter().any(|t| t.name.starts_with("decode_head."))
                && a.iter().any(|t| t.name.starts_with("auxiliary_head."))
        );
        for (x, y) in a.iter().zip(&b) {
            assert_eq!((x.view.dtype, &x.view.shape), (y.view.dtype, &y.view.shape), "{name}: {}", x.name);
            assert_eq!(src.read(x.view).unwrap(), out.read(y.view).unwrap(), "{name}: {} bytes", x.name);
        }
        assert_eq!(out.tensors().len(), b.len(), "{name}: tensors outside the state dict");

        // meta: the source's plain values, exactly; what is left out is listed.
        let dropped = dropped_paths(&report);
        assert_plain_subset(src.root().get("meta").unwrap(), out.root().get("meta").unwrap(), "meta", &dropped);
        // These fixtures' meta is all plain (cfg, dataset_meta / CLASSES, PALETTE …): all of it kept.
        assert!(dropped.is_empty(), "{name}: {dropped:?}");
        let meta = out.root().get("meta").unwrap();
        if name.starts_with("mmseg1") {
            let classes = meta.get("dataset_meta").and_then(|d| d.get("classes")).expect("dataset_meta.classes");
            assert!(matches!(classes, Value::Tuple(c) | Value::List(c) if c.len() == 5), "{classes:?}");
            let not_carried = report["plan"]["layout"]["not_carried"].as_array().unwrap();
            assert_eq!(
                not_carried.iter().map(|v| v.as_str().unwrap()).collect::<Vec<_>>(),
                ["message_hub", "param_schedulers"]
            );
            assert!(report["plan"]["notes"].to_string().contains("message_hub"));
        } else {
            assert!(meta.get("CLASSES").is_some() && meta.get("PALETTE").is_some());
        }

        // What makes torch.load(weights_only=True) succeed.
        assert_eq!(weights_only_problems(&out_path), Vec::<String>::new(), "{name}");
    }
}

#[test]
fn the_weights_only_check_agrees_with_torch_on_the_sources() {
    // torch 2.15 loads the 0.x file with weights_only=True and refuses the 1.x ones.
    assert_eq!(weights_only_problems(&fixture("mmseg0_segmentor_mae")), Vec::<String>::new());
    for name in ["mmseg1_segmentor_mae", "mmseg1_segmentor_beit"] {
        let pkl = data_pkl(&fixture(name));
        let scan = weights_only_violations(&pkl);
        assert!(scan.iter().any(|v| v == "global mmengine.logging.history_buffer.HistoryBuffer"), "{name}: {scan:?}");
        assert!(scan.iter().all(|v| v.starts_with("global ")), "{name}: the scan read the whole pickle: {scan:?}");
        let mut found = Vec::new();
        objects(&unpickle(&pkl).unwrap().value, "", &mut found);
        assert!(
            found.iter().any(|o| o.starts_with(".message_hub") && o.contains("HistoryBuffer")),
            "{name}: {found:?}"
        );
    }
}

/// What a careless writer would emit for a tree: objects as `GLOBAL` + `NEWOBJ`, as pickle
/// writes an instance (what torch.save did for the 1.x message_hub).
fn naive_pickle(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::None => out.push(b'N'),
        Value::Int(i) => {
            out.push(b'J');
            out.extend_from_slice(&(*i as i32).to_le_bytes());
        }
        Value::Str(s) => {
            out.push(b'X');
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        Value::Dict(items) => {
            out.extend_from_slice(b"}(");
            for (k, x) in items {
                naive_pickle(k, out);
                naive_pickle(x, out);
            }
            out.push(b'u');
        }
        Value::Opaque(name) => {
            let (module, class) = name.rsplit_once('.').unwrap();
            out.extend_from_slice(format!("c{module}\n{class}\n").as_bytes());
            out.extend_from_slice(b")\x81");
        }
        other => panic!("naive_pickle: {other:?}"),
    }
}

#[test]
fn a_writer_that_keeps_an_object_in_meta_is_caught() {
    let s = |x: &str| Value::Str(x.into());
    let meta = Value::Dict(vec![
        (s("seed"), Value::Int(1234)),
        (s("hub"), Value::Opaque("mmengine.logging.history_buffer.HistoryBuffer".into())),
    ]);
    let top = Value::Dict(vec![(s("meta"), meta.clone()), (s("state_dict"), Value::Dict(vec![]))]);

    // Our writer refuses to write it at all …
    let err = checkpoint_pickle(&[], &[TopEntry::Plain("meta", &meta), TopEntry::StateDict("state_dict")]).unwrap_err();
    assert!(err.contains("hub") && err.contains("HistoryBuffer"), "{err}");

    // … and the check catches a writer that does, by the global and by the object.
    let mut bad = vec![0x80, 2];
    naive_pickle(&top, &mut bad);
    bad.push(b'.');
    assert_eq!(weights_only_violations(&bad), ["global mmengine.logging.history_buffer.HistoryBuffer"]);
    let mut found = Vec::new();
    objects(&unpickle(&bad).unwrap().value, "", &mut found);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("hub") && found[0].contains("HistoryBuffer"), "{found:?}");

    // The same tree without the object passes both (the check is not simply failing).
    let (plain, dropped) = ckptmap::write::meta::plain_values(&meta, "meta");
    assert_eq!(dropped.len(), 1);
    assert_eq!(dropped[0].path, "meta.hub");
    let good =
        checkpoint_pickle(&[], &[TopEntry::Plain("meta", plain.as_ref().unwrap()), TopEntry::StateDict("state_dict")])
            .unwrap();
    assert_eq!(weights_only_violations(&good), Vec::<String>::new());
    let mut found = Vec::new();
    objects(&unpickle(&good).unwrap().value, "", &mut found);
    assert!(found.is_empty(), "{found:?}");
}

#[test]
fn a_table_keeping_message_hub_drops_each_history_buffer_by_path() {
    // A deliberately wrong table: it keeps the 1.x message_hub, whose log_scalars are
    // HistoryBuffer objects. They are left out (each named), and the file still loads.
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("hub.toml");
    std::fs::write(
        &table,
        "name = \"keep-hub\"\ndescription = \"d\"\ncontainers = [\"state_dict\"]\noutput_container = \"state_dict\"\nkeep_meta = \"message_hub\"\n\n[[rule]]\nmatch = '.*'\nkeep = true\n",
    )
    .unwrap();
    let src_path = fixture("mmseg1_segmentor_mae");
    let out_path = dir.path().join("hub.pth");
    let report = convert(&src_path, &out_path, &["--mapping", table.to_str().unwrap()]).unwrap();
    let dropped = dropped_paths(&report);
    let src = Checkpoint::open(&src_path).unwrap();
    let mut objs = Vec::new();
    objects(src.root().get("message_hub").unwrap(), "message_hub", &mut objs);
    assert!(!objs.is_empty() && objs.iter().any(|o| o.contains("HistoryBuffer")), "{objs:?}");
    assert!(dropped.iter().any(|p| p.starts_with("message_hub.log_scalars")), "{dropped:?}");
    let whats = report["plan"]["layout"]["meta_dropped"].to_string();
    assert!(whats.contains("mmengine.logging.history_buffer.HistoryBuffer"), "{whats}");
    assert!(report["plan"]["notes"].to_string().contains("left out"));

    let out = Checkpoint::open(&out_path).unwrap();
    let keys: Vec<&str> = match out.root() {
        Value::Dict(top) => top.iter().map(|(k, _)| k.as_str().unwrap()).collect(),
        _ => panic!(),
    };
    assert_eq!(keys, ["state_dict", "message_hub"], "the source's order");
    assert_plain_subset(
        src.root().get("message_hub").unwrap(),
        out.root().get("message_hub").unwrap(),
        "message_hub",
        &dropped,
    );
    assert_eq!(weights_only_problems(&out_path), Vec::<String>::new());
}

#[test]
fn detection_still_chooses_the_backbone_tables() {
    let dir = tempfile::tempdir().unwrap();
    for (name, table) in [
        ("mmseg0_segmentor_mae", "mmseg-mae"),
        ("mmseg1_segmentor_mae", "mmseg-mae"),
        ("mmseg1_segmentor_beit", "mmseg-beit"),
    ] {
        let report = convert(&fixture(name), &dir.path().join("b.pth"), &[]).unwrap();
        assert_eq!(report["mapping"], format!("builtin:{table}"), "{name}");
        assert!(report["plan"].get("layout").is_none(), "{name}: a backbone is a flat state dict");
    }
}

#[test]
fn mappings_lists_the_segmentor_table() {
    let o = ckptmap(&["mappings"]);
    let text = String::from_utf8_lossy(&o.stdout);
    let line = text.lines().find(|l| l.starts_with("mmseg-segmentor")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("weights_only"), "{line}");
    let o = ckptmap(&["mappings", "mmseg-segmentor"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("keep_meta = \"meta\""));
}

#[test]
fn safetensors_output_of_a_segmentor_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("seg.safetensors");
    let err = convert(&fixture("mmseg1_segmentor_mae"), &out, &["--mapping", "mmseg-segmentor"]).unwrap_err();
    assert!(err.contains("only a .pth file holds") && err.contains("mmseg-mae"), "{err}");
    assert!(!out.exists());
}

#[test]
fn output_fields_are_checked_when_the_table_is_loaded() {
    let table = |extra: &str| MappingTable::parse(&format!("name = \"t\"\ndescription = \"d\"\n{extra}\n"), "t.toml");
    let err = |extra: &str| table(extra).unwrap_err().to_string();
    assert!(err("keep_meta = \"meta\"").contains("needs output_container"));
    assert!(err("output_container = \"meta\"\nkeep_meta = \"meta\"").contains("also the output_container"));
    assert!(err("output_container = \"a.b\"").contains("no dots"));
    assert!(err("output_container = \"\"").contains("empty"));
    assert!(err("keep_metta = \"meta\"").contains("keep_metta"));
    let t = table("output_container = \"state_dict\"\nkeep_meta = \"meta\"").unwrap();
    assert_eq!((t.output_container(), t.keep_meta()), (Some("state_dict"), Some("meta")));
    let t = MappingTable::builtin("mmseg-segmentor").unwrap();
    assert_eq!((t.output_container(), t.keep_meta()), (Some("state_dict"), Some("meta")));
}

#[test]
fn verify_of_a_whole_segmentor_says_how_to_check_the_backbone() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("seg.pth");
    let err =
        convert(&fixture("mmseg1_segmentor_beit"), &out, &["--mapping", "mmseg-segmentor", "--verify"]).unwrap_err();
    assert!(err.contains("--verify") && err.contains("backbone.pth --verify"), "{err}");
    assert!(!out.exists());
}
