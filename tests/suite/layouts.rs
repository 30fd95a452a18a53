//! Every layout of fixtures/layouts (HF transformers 4.x/5.x ViTMAE / BEiT / Data2Vec,
//! mmpretrain MAE / BEiT / BEiT v2, MMSeg 0.x/1.x segmentors, already-MMSeg files; see
//! fixtures/layouts/README.md and manifest.json): detection picks the family's table, the
//! conversion succeeds, renamed tensors are bit-identical, concatenated qkv is the byte
//! concatenation of q, k, v, outputs follow MMSeg's state-dict order, and the MMSeg backbone
//! on the converted weights computes what the source library computed (its own forward pass,
//! `ref_*.safetensors`). Conversions broken on purpose (a user table with one change)
//! fail that check. Also: the `concat` rule's compile- and plan-time errors, detection's
//! nearest-miss messages, optional `relative_position_index` keys, and docs/sources.md.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::layouts;
use ckptmap::formats::checkpoint::Checkpoint;
use ckptmap::job::{choose_table, prepare};
use ckptmap::mapping::{detect, plan, MappingTable, Origin, Plan, PlanError, PlanOptions, SourceTensor, TableError};
use ckptmap::verify::{verify_with_reference, Tolerance, VerifyOptions};
use ckptmap::write::execute::write_plan;
use ckptmap::DType;

/// One checkpoint of fixtures/layouts/manifest.json.
struct Fixture {
    name: String,
    family: String,
    reference: Option<String>,
    /// (name, dtype, shape) in file order, relative to the state-dict root.
    tensors: Vec<(String, String, Vec<usize>)>,
}

/// The sizes every layout fixture shares (manifest.json → common).
struct Common {
    img: usize,
    patch: usize,
    dim: usize,
    depth: usize,
    heads: usize,
}

fn common() -> Common {
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(layouts().join("manifest.json")).unwrap()).unwrap();
    let n = |k: &str| j["common"][k].as_u64().unwrap_or_else(|| panic!("manifest common.{k}")) as usize;
    Common { img: n("img_size"), patch: n("patch_size"), dim: n("embed_dim"), depth: n("depth"), heads: n("num_heads") }
}

fn manifest() -> Vec<Fixture> {
    let path = layouts().join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("{}: {e} (the layout fixtures are made by fixtures/make_layout_fixtures.py)", path.display())
    });
    let j: serde_json::Value = serde_json::from_str(&text).unwrap();
    let files = j["files"].as_object().unwrap();
    let mut out = Vec::new();
    for (name, f) in files {
        let Some(family) = f["family"].as_str() else { continue };
        let tensors = f["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                let shape = t[2].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
                (t[0].as_str().unwrap().to_string(), t[1].as_str().unwrap().to_string(), shape)
            })
            .collect();
        out.push(Fixture {
            name: name.clone(),
            family: family.to_string(),
            reference: f["reference"].as_str().map(String::from),
            tensors,
        });
    }
    // Every family of the issue is there.
    for family in [
        "hf-vitmae",
        "hf-beit",
        "hf-data2vec",
        "mmpretrain-mae",
        "mmpretrain-beit",
        "mmseg0-segmentor",
        "mmseg1-segmentor",
        "mmseg-mae",
        "mmseg-beit",
    ] {
        assert!(out.iter().any(|f| f.family.starts_with(family)), "no {family} fixture in the manifest");
    }
    out
}

fn fixture(name: &str) -> Fixture {
    manifest().into_iter().find(|f| f.name == name).unwrap_or_else(|| panic!("{name} is not in the manifest"))
}

/// The built-in table each family of the manifest belongs to.
fn expected_table(family: &str) -> &'static str {
    match family {
        f if f.starts_with("hf-vitmae") => "hf-vitmae",
        f if f.starts_with("hf-beit") || f.starts_with("hf-data2vec") => "hf-beit",
        "mmpretrain-mae" => "mmpretrain-mae",
        f if f.starts_with("mmpretrain-beit") => "mmpretrain-beit",
        f if f.starts_with("mmseg") && f.ends_with("-mae") => "mmseg-mae",
        f if f.starts_with("mmseg") && f.ends_with("-beit") => "mmseg-beit",
        other => panic!("family {other} has no table in this test"),
    }
}

fn dtype(name: &str) -> DType {
    match name {
        "float32" => DType::F32,
        "float16" => DType::F16,
        "bfloat16" => DType::BF16,
        "int64" => DType::I64,
        other => panic!("dtype {other}"),
    }
}

fn sources(f: &Fixture) -> Vec<SourceTensor> {
    f.tensors.iter().map(|(n, d, s)| SourceTensor { name: n.clone(), shape: s.clone(), dtype: dtype(d) }).collect()
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// Converts with the library (table: detected, a built-in name or a TOML path).
fn convert(src: &Path, table: Option<&str>, opts: &PlanOptions, dest: &Path) -> Result<Plan, String> {
    let ckpt = Checkpoint::open(src).map_err(|e| e.to_string())?;
    let choice = choose_table(table, &ckpt).map_err(|e| e.to_string())?;
    let (_, entries, plan) = prepare(&ckpt, choice.table(), opts).map_err(|e| e.to_string())?;
    write_plan(&ckpt, &entries, &plan, dest, None, &ckptmap::progress::NoProgress).map_err(|e| e.to_string())?;
    Ok(plan)
}

fn verify(out: &Path, reference: &Path) -> ckptmap::verify::VerifyOutcome {
    let opts = VerifyOptions {
        img_size: None,
        num_heads: None,
        out_indices: None,
        tolerance: Tolerance::default(),
        init_values: 1.0,
    };
    verify_with_reference(&Checkpoint::open(out).unwrap(), reference, &opts, &candle_core::Device::Cpu)
        .unwrap_or_else(|e| panic!("verify {}: {e}", out.display()))
}

/// Source tensors' bytes by name, relative to the root the table unwrapped.
fn source_bytes(path: &Path) -> HashMap<String, Vec<u8>> {
    let c = Checkpoint::open(path).unwrap();
    let root = ckptmap::inspect::find_state_dict(&c).unwrap_or("");
    c.tensors_under(root).unwrap().into_iter().map(|t| (t.name.clone(), c.read(t.view).unwrap())).collect()
}

/// Output tensors in file order: (name, dtype, bytes).
fn output(path: &Path) -> Vec<(String, DType, Vec<u8>)> {
    let c = Checkpoint::open(path).unwrap();
    c.tensors().into_iter().map(|t| (t.name.clone(), t.view.dtype, c.read(t.view).unwrap())).collect()
}

/// MMSeg's own state-dict order for the backbone, from the real segmentor fixtures (torch
/// writes parameters in module order).
fn mmseg_order(arch: &str) -> Vec<String> {
    fixture(&format!("mmseg1_segmentor_{arch}.pth"))
        .tensors
        .iter()
        .filter_map(|(n, _, _)| n.strip_prefix("backbone.").map(String::from))
        .collect()
}

fn arch_of(table: &str) -> &'static str {
    if table.ends_with("mae") {
        "mae"
    } else {
        "beit"
    }
}

#[test]
fn every_layout_is_detected_converted_bit_exact_in_mmseg_order_and_computes_the_reference() {
    let dir = tmp();
    let order = HashMap::from([("mae", mmseg_order("mae")), ("beit", mmseg_order("beit"))]);
    let mut concat_checked = 0;
    for f in manifest() {
        let src = layouts().join(&f.name);
        let want = expected_table(&f.family);
        let ckpt = Checkpoint::open(&src).unwrap();
        let chosen = choose_table(None, &ckpt).unwrap_or_else(|e| panic!("{}: {e}", f.name));
        assert_eq!(chosen.table().name(), want, "{}: detected table", f.name);
        // The manifest's key list is what detection sees.
        let names: Vec<&str> = f.tensors.iter().map(|t| t.0.as_str()).collect();
        assert_eq!(detect(&names).unwrap().name(), want, "{}: detect() on the manifest keys", f.name);

        let dest = dir.path().join(format!("{}.pth", f.name));
        let plan = convert(&src, None, &PlanOptions::default(), &dest).unwrap_or_else(|e| panic!("{}: {e}", f.name));
        let src_bytes = source_bytes(&src);
        let out = output(&dest);
        let out_bytes: HashMap<&str, &Vec<u8>> = out.iter().map(|(n, _, b)| (n.as_str(), b)).collect();
        assert_eq!(out.len(), plan.outputs.len());
        for t in &plan.outputs {
            let got = out_bytes[t.target.as_str()];
            match &t.origin {
                Origin::Rename { source } | Origin::Keep { source } | Origin::Expand { source } => {
                    assert_eq!(got, &src_bytes[source], "{}: {} is not bit-identical to {source}", f.name, t.target)
                }
                Origin::Concat { sources, dim } => {
                    assert_eq!(*dim, 0);
                    let cat: Vec<u8> = sources.iter().flat_map(|s| src_bytes[s].clone()).collect();
                    assert_eq!(got, &cat, "{}: {} is not the byte concatenation of {sources:?}", f.name, t.target);
                    let order: Vec<&str> = sources.iter().map(|s| s.rsplit('.').nth(1).unwrap()).collect();
                    assert_eq!(order, ["query", "key", "value"], "{}: {}", f.name, t.target);
                    concat_checked += 1;
                }
                other => panic!("{}: a rename-only conversion made {} as {other}", f.name, t.target),
            }
        }
        // Every source key is accounted for: written or dropped with a reason.
        let fed: usize = plan.source_fates().len();
        assert_eq!(fed, f.tensors.len(), "{}", f.name);
        assert!(plan.dropped.iter().all(|d| !d.reason.trim().is_empty() && d.rule != "(no rule)"), "{}", f.name);
        // MMSeg's order, whatever the source order (HF safetensors are sorted by name).
        let mmseg = &order[arch_of(want)];
        let mut last = 0;
        for (name, _, _) in &out {
            let at = mmseg
                .iter()
                .position(|k| k == name)
                .unwrap_or_else(|| panic!("{}: {name} is not an MMSeg backbone key", f.name));
            assert!(at >= last, "{}: {name} is out of MMSeg's order", f.name);
            last = at;
        }
        let reference = layouts().join(f.reference.as_deref().expect("every layout fixture has a reference"));
        let outcome = verify(&dest, &reference);
        assert!(outcome.passed, "{}: {:?}", f.name, outcome.outputs);
    }
    assert!(concat_checked >= 14 * 4, "only {concat_checked} concatenations checked");
}

#[test]
fn load_ready_outputs_of_every_layout_compute_the_reference_and_resize() {
    let dir = tmp();
    let c = common();
    for f in manifest() {
        let src = layouts().join(&f.name);
        let reference = layouts().join(f.reference.as_deref().unwrap());
        let dest = dir.path().join(format!("{}.native.safetensors", f.name));
        let opts = PlanOptions { img_size: Some(c.img), num_heads: Some(c.heads), ..Default::default() };
        let plan = convert(&src, None, &opts, &dest).unwrap_or_else(|e| panic!("{}: {e}", f.name));
        assert_eq!(
            plan.outputs.iter().filter(|t| t.target.ends_with("relative_position_index")).count(),
            c.depth,
            "{}",
            f.name
        );
        assert!(verify(&dest, &reference).passed, "{}: load-ready at {}", f.name, c.img);
        let big = dir.path().join(format!("{}.big.pth", f.name));
        let opts = PlanOptions { img_size: Some(2 * c.img), num_heads: Some(c.heads), ..Default::default() };
        let plan = convert(&src, None, &opts, &big).unwrap_or_else(|e| panic!("{}: {e}", f.name));
        let table = plan.outputs.iter().find(|t| t.target == "layers.0.attn.relative_position_bias_table").unwrap();
        let w = 2 * c.img / c.patch;
        assert_eq!(table.shape, [(2 * w - 1) * (2 * w - 1) + 3, c.heads], "{}", f.name);
    }
}

#[test]
fn segmentors_keep_their_trained_backbone_and_drop_the_rest_with_reasons() {
    let dir = tmp();
    for name in ["mmseg0_segmentor_mae.pth", "mmseg1_segmentor_mae.pth", "mmseg1_segmentor_beit.pth"] {
        let f = fixture(name);
        let src = layouts().join(name);
        let dest = dir.path().join(name);
        let plan =
            convert(&src, None, &PlanOptions { img_size: Some(common().img), ..Default::default() }, &dest).unwrap();
        let src_bytes = source_bytes(&src);
        let out: HashMap<String, Vec<u8>> = output(&dest).into_iter().map(|(n, _, b)| (n, b)).collect();
        for i in 0..common().depth {
            for k in ["gamma_1", "gamma_2", "attn.relative_position_bias_table"] {
                let key = format!("layers.{i}.{k}");
                let trained = &src_bytes[&format!("backbone.{key}")];
                assert_eq!(&out[&key], trained, "{name}: {key} must be the trained tensor");
                let values: Vec<f32> =
                    trained.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
                assert!(values.iter().any(|v| *v != values[0]), "{name}: {key} looks like a constant fill");
            }
        }
        let kept = |k: &str| k.starts_with("backbone.");
        for (k, _, _) in f.tensors.iter().filter(|t| !kept(&t.0)) {
            let d = plan
                .dropped
                .iter()
                .find(|d| &d.source == k)
                .unwrap_or_else(|| panic!("{name}: {k} is neither written nor dropped"));
            assert!(d.rule.starts_with("segmentor-") && !d.reason.is_empty(), "{name}: {k}: {} {}", d.rule, d.reason);
        }
        // The optimizer's tensors are not part of the state dict.
        assert_eq!(plan.sources.len(), f.tensors.len());
    }
}

#[test]
fn safetensors_and_bin_of_one_model_convert_to_the_same_bytes() {
    let dir = tmp();
    for (a, b) in [
        ("hf5_beit_cls.safetensors", "hf4_beit_cls.bin"),
        ("hf5_beit_mim.safetensors", "hf4_beit_mim.bin"),
        ("hf5_vitmae_pretraining.safetensors", "hf4_vitmae_pretraining.bin"),
        ("hf5_data2vec_model.safetensors", "hf4_data2vec_model.bin"),
    ] {
        // Sorted-by-name (safetensors) and module-order (.bin) sources: same output file.
        assert_ne!(
            fixture(a).tensors.iter().map(|t| &t.0).collect::<Vec<_>>(),
            fixture(b).tensors.iter().map(|t| &t.0).collect::<Vec<_>>()
        );
        let (da, db) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&da).unwrap();
        std::fs::create_dir_all(&db).unwrap();
        convert(&layouts().join(a), None, &PlanOptions::default(), &da.join("out.pth")).unwrap();
        convert(&layouts().join(b), None, &PlanOptions::default(), &db.join("out.pth")).unwrap();
        assert!(std::fs::read(da.join("out.pth")).unwrap() == std::fs::read(db.join("out.pth")).unwrap(), "{a} vs {b}");
    }
}

#[test]
fn an_already_mmseg_file_is_recognised_and_can_be_made_load_ready_cast_and_cleaned() {
    let dir = tmp();
    for (name, table, dropped) in [
        ("mmseg_beit.pth", "mmseg-beit", ["fc_norm.weight", "head.weight"]),
        ("mmseg_mae.pth", "mmseg-mae", ["norm.weight", "norm.bias"]),
    ] {
        let src = layouts().join(name);
        let dest = dir.path().join(format!("{name}.f16.pth"));
        let ckpt = Checkpoint::open(&src).unwrap();
        assert_eq!(choose_table(None, &ckpt).unwrap().table().name(), table);
        let (_, entries, plan) =
            prepare(&ckpt, MappingTable::builtin(table).unwrap(), &PlanOptions::default()).unwrap();
        for d in dropped {
            assert!(plan.dropped.iter().any(|k| k.source == d), "{name}: {d} is cleaned away");
        }
        write_plan(&ckpt, &entries, &plan, &dest, Some(DType::F16), &ckptmap::progress::NoProgress).unwrap();
        let src_bytes = source_bytes(&src);
        for (n, dt, bytes) in output(&dest) {
            if n.ends_with("relative_position_index") {
                assert_eq!(dt, DType::I64);
                assert_eq!(bytes, src_bytes[&n]);
            } else {
                assert_eq!(dt, DType::F16, "{n}");
                assert_eq!(
                    bytes,
                    ckptmap::mapping::transforms::cast(&src_bytes[&n], DType::F32, DType::F16).unwrap(),
                    "{n}"
                );
            }
        }
        let lr = dir.path().join(format!("{name}.lr.pth"));
        convert(
            &src,
            None,
            &PlanOptions { img_size: Some(common().img), num_heads: Some(common().heads), ..Default::default() },
            &lr,
        )
        .unwrap();
        let reference = layouts().join(fixture(name).reference.unwrap());
        assert!(verify(&lr, &reference).passed, "{name}");
    }
}

// ---------------------------------------------------------------------------------------
// Broken on purpose: a user table that is the real one with one change must FAIL the
// reference check (and the unchanged copy must pass, so the check tells them apart).

/// Writes the built-in table `base` with each `(from, to)` replaced (each `from` must occur).
fn user_table(dir: &Path, base: &str, edits: &[(&str, &str)]) -> PathBuf {
    let mut text = ckptmap::mapping::builtin_table_text(base).unwrap().to_string();
    for (from, to) in edits {
        assert!(text.contains(from), "{base}: '{from}' is not in the table");
        text = text.replace(from, to);
    }
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("{base}-{n}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn check_with(table: &Path, fixture_name: &str, opts: &PlanOptions) -> bool {
    let f = fixture(fixture_name);
    let dir = tmp();
    let dest = dir.path().join("out.pth");
    convert(&layouts().join(fixture_name), Some(table.to_str().unwrap()), opts, &dest)
        .unwrap_or_else(|e| panic!("{fixture_name}: {e}"));
    let vopts = VerifyOptions {
        img_size: None,
        num_heads: None,
        out_indices: None,
        tolerance: Tolerance::default(),
        init_values: 1.0,
    };
    match verify_with_reference(
        &Checkpoint::open(&dest).unwrap(),
        &layouts().join(f.reference.unwrap()),
        &vopts,
        &candle_core::Device::Cpu,
    ) {
        Ok(outcome) => outcome.passed,
        Err(e) => panic!("{fixture_name} with {}: the check must run and compare, not stop: {e}", table.display()),
    }
}

const SHARED_EXPAND: &str = "expand = \"layers.{i}.attn.relative_position_bias_table\"\nnote";
const TABLE_SHAPE: &str = "shape = [\"(2 * window - 1) * (2 * window - 1) + 3\", \"heads\"]\n";
const TABLE_ZEROS: &str = "shape = [\"(2 * window - 1) * (2 * window - 1) + 3\", \"heads\"]\nrequired = false\nmake = { name = \"fill\", value = 0.0 }\n";
const DROP_GAMMAS: &str = "[[rule]]\nid = \"broken-gammas\"\nmatch = 'layers\\.\\d+\\.gamma_[12]'\ndrop = \"broken on purpose\"\n\n[[rule]]\nid = \"backbone\"";

#[test]
fn broken_tables_fail_the_reference_check() {
    let dir = tmp();
    let d = dir.path();
    let rename_only = PlanOptions::default();
    let load_ready =
        PlanOptions { img_size: Some(common().img), num_heads: Some(common().heads), ..Default::default() };
    let cases: Vec<(&str, &str, PathBuf, &PlanOptions)> = vec![
        (
            "control: unchanged copy",
            "hf5_vitmae_pretraining.safetensors",
            user_table(d, "hf-vitmae", &[]),
            &rename_only,
        ),
        (
            "MAE q/k order swapped",
            "hf5_vitmae_pretraining.safetensors",
            user_table(
                d,
                "hf-vitmae",
                &[("parts = [\"${1}query.${4}\", \"${1}key.${4}\"", "parts = [\"${1}key.${4}\", \"${1}query.${4}\"")],
            ),
            &rename_only,
        ),
        ("control: unchanged copy", "hf5_beit_cls.safetensors", user_table(d, "hf-beit", &[]), &rename_only),
        (
            "BEiT k/v order swapped",
            "hf5_beit_cls.safetensors",
            user_table(
                d,
                "hf-beit",
                &[("\"${1}key.weight\", \"${1}value.weight\"", "\"${1}value.weight\", \"${1}key.weight\"")],
            ),
            &rename_only,
        ),
        (
            "lambda not copied (gamma filled with 1)",
            "hf5_data2vec_cls.safetensors",
            user_table(d, "hf-beit", &[("rename = \"layers.${1}.gamma_${2}\"", "drop = \"broken on purpose\"")]),
            &load_ready,
        ),
        (
            "HF shared table not expanded (zeros)",
            "hf5_beit_mim.safetensors",
            user_table(
                d,
                "hf-beit",
                &[(SHARED_EXPAND, "drop = \"broken on purpose\"\nnote"), (TABLE_SHAPE, TABLE_ZEROS)],
            ),
            &rename_only,
        ),
        ("control: unchanged copy", "mmpretrain_beit.pth", user_table(d, "mmpretrain-beit", &[]), &rename_only),
        (
            "mmpretrain shared table not expanded (zeros)",
            "mmpretrain_beit.pth",
            user_table(
                d,
                "mmpretrain-beit",
                &[(SHARED_EXPAND, "drop = \"broken on purpose\"\nnote"), (TABLE_SHAPE, TABLE_ZEROS)],
            ),
            &rename_only,
        ),
        ("control: unchanged copy", "mmseg1_segmentor_mae.pth", user_table(d, "mmseg-mae", &[]), &load_ready),
        (
            "MAE segmentor gammas refilled",
            "mmseg1_segmentor_mae.pth",
            user_table(d, "mmseg-mae", &[("[[rule]]\nid = \"backbone\"", DROP_GAMMAS)]),
            &load_ready,
        ),
        (
            "BEiT segmentor gammas refilled",
            "mmseg1_segmentor_beit.pth",
            user_table(d, "mmseg-beit", &[("[[rule]]\nid = \"backbone\"", DROP_GAMMAS)]),
            &load_ready,
        ),
    ];
    for (what, fixture_name, table, opts) in cases {
        let passed = check_with(&table, fixture_name, opts);
        assert_eq!(passed, what.starts_with("control"), "{what} on {fixture_name}: reference check passed = {passed}");
    }
}

// ---------------------------------------------------------------------------------------
// The concat rule: checked when the table is loaded and when it is applied.

const CONCAT_TABLE: &str = r#"
name = "t"
description = "d"
[vars]
depth = 'count("l\.(\d+)\..*")'
[[rule]]
id = "qkv"
match = '(l\.(\d+)\.)(q|k|v)'
concat = { into = "layers.${2}.qkv", parts = ["${1}q", "${1}k", "${1}v"], dim = 0 }
"#;

fn st(name: &str, shape: &[usize]) -> SourceTensor {
    SourceTensor { name: name.into(), shape: shape.to_vec(), dtype: DType::F32 }
}

#[test]
fn concat_tables_are_checked_when_loaded() {
    let with = |from: &str, to: &str| {
        MappingTable::parse(&CONCAT_TABLE.replace(from, to), "t.toml").map(|_| ()).unwrap_err().to_string()
    };
    let e = with("parts = [\"${1}q\", \"${1}k\", \"${1}v\"]", "parts = [\"${1}q\"]");
    assert!(e.contains("rule 'qkv'") && e.contains("at least two parts"), "{e}");
    let e = with("\"${1}k\", \"${1}v\"", "\"${1}q\", \"${1}v\"");
    assert!(e.contains("listed twice"), "{e}");
    let e = with("\"${1}v\"", "\"${7}v\"");
    assert!(e.contains("${7}") && e.contains("qkv"), "{e}");
    let e = with("dim = 0", "dim = -1");
    assert!(e.contains("negative"), "{e}");
    let e = with("dim = 0 }", "dim = 0 }\nrename = \"x\"");
    assert!(e.contains("exactly one of"), "{e}");
    let e = with(
        "dim = 0 }",
        "dim = 0 }\ntransform = { name = \"resize_abs_pos_embed\", num_extra = 1, old_grid = 1, new_grid = 1 }",
    );
    assert!(e.contains("transform"), "{e}");
    let e = with("dim = 0 }", "dim = 0, axis = 1 }");
    assert!(e.contains("axis"), "{e}");
    assert!(MappingTable::parse(CONCAT_TABLE, "t.toml").is_ok());
    for e in [with("parts = [\"${1}q\", \"${1}k\", \"${1}v\"]", "parts = [\"${1}q\"]"), with("dim = 0", "dim = -1")] {
        assert!(!e.contains('\n'), "{e}");
    }
}

#[test]
fn concat_parts_are_checked_when_applied() {
    let table = MappingTable::parse(CONCAT_TABLE, "t.toml").unwrap();
    let good = vec![
        st("l.0.q", &[4, 3]),
        st("l.0.k", &[4, 3]),
        st("l.0.v", &[4, 3]),
        st("l.1.v", &[2, 3]),
        st("l.1.k", &[2, 3]),
        st("l.1.q", &[2, 3]),
    ];
    let p = plan(&table, &good, &PlanOptions::default()).unwrap();
    assert_eq!(p.outputs.len(), 2);
    // Source order does not matter: parts are concatenated in the table's order.
    assert_eq!(
        p.outputs[1].origin,
        Origin::Concat { sources: vec!["l.1.q".into(), "l.1.k".into(), "l.1.v".into()], dim: 0 }
    );
    assert_eq!(p.outputs[1].shape, [6, 3]);
    assert_eq!(
        p.source_fates()
            .iter()
            .filter(|f| matches!(&f.fate, ckptmap::mapping::Fate::Produces(v) if v.len() == 1))
            .count(),
        6
    );

    let err =
        |sources: Vec<SourceTensor>, table: &MappingTable| plan(table, &sources, &PlanOptions::default()).unwrap_err();
    // A missing part.
    let e = err(good.iter().filter(|s| s.name != "l.1.k").cloned().collect(), &table);
    assert!(
        matches!(e, PlanError::ConcatPart { .. }) && e.to_string().contains("'l.1.k' is not in the checkpoint"),
        "{e}"
    );
    // Shapes that disagree off the concatenation axis, and mixed dtypes.
    let mut bad = good.clone();
    bad[1].shape = vec![4, 2];
    let e = err(bad, &table);
    assert!(matches!(e, PlanError::ConcatShapes { .. }) && e.to_string().contains("'l.0.k' has shape [4, 2]"), "{e}");
    let mut bad = good.clone();
    bad[2].dtype = DType::F16;
    assert!(err(bad, &table).to_string().contains("f16"));
    // A part taken by an earlier rule.
    let first = CONCAT_TABLE.replace(
        "[[rule]]\nid = \"qkv\"",
        "[[rule]]\nid = \"early\"\nmatch = 'l\\.1\\.k'\ndrop = \"x\"\n[[rule]]\nid = \"qkv\"",
    );
    let e = err(good.clone(), &MappingTable::parse(&first, "t.toml").unwrap());
    assert!(e.to_string().contains("'l.1.k' is taken by rule 'early'"), "{e}");
    // A matched key that is not one of its own parts.
    let wrong = CONCAT_TABLE.replace("\"${1}v\"]", "\"${1}w\"]");
    let e = err(good.clone(), &MappingTable::parse(&wrong, "t.toml").unwrap());
    assert!(matches!(e, PlanError::ConcatNotAPart { .. }) && e.to_string().contains("'l.0.v'"), "{e}");
    // Each part is consumed once: a part that another group of the rule already took.
    let literal = CONCAT_TABLE.replace("parts = [\"${1}q\"", "parts = [\"l.0.q\"");
    let no_l1q: Vec<SourceTensor> = good.iter().filter(|s| s.name != "l.1.q").cloned().collect();
    let e = err(no_l1q, &MappingTable::parse(&literal, "t.toml").unwrap());
    assert!(e.to_string().contains("'l.0.q' is already a part of 'layers.0.qkv'"), "{e}");
    assert!(!e.to_string().contains('\n'));
}

#[test]
fn hf_concat_names_the_rule_and_the_key_when_a_part_is_missing() {
    let f = fixture("hf5_vitmae_model.safetensors");
    let mut s = sources(&f);
    s.retain(|t| t.name != "encoder.layer.2.attention.attention.key.bias");
    let e = plan(MappingTable::builtin("hf-vitmae").unwrap(), &s, &PlanOptions::default()).unwrap_err().to_string();
    assert!(
        e.contains("rule 'qkv'")
            && e.contains("'encoder.layer.2.attention.attention.key.bias' is not in the checkpoint")
            && e.contains("layers.2.attn.qkv.bias"),
        "{e}"
    );
    let mut s = sources(&f);
    for t in s.iter_mut().filter(|t| t.name == "encoder.layer.1.attention.attention.value.weight") {
        t.shape = vec![t.shape[0], t.shape[1] + 1];
    }
    let d = common().dim;
    let e = plan(MappingTable::builtin("hf-vitmae").unwrap(), &s, &PlanOptions::default()).unwrap_err().to_string();
    assert!(e.contains("layers.1.attn.qkv.weight") && e.contains(&format!("[{d}, {}]", d + 1)), "{e}");
}

// ---------------------------------------------------------------------------------------
// Optional keys and detection messages.

#[test]
fn relative_position_index_is_optional_in_hf_files() {
    let table = MappingTable::builtin("hf-beit").unwrap();
    let c = common();
    let (window, tokens) = (c.img / c.patch, (c.img / c.patch).pow(2) + 1);
    for (name, index_keys) in [
        (
            "hf5_beit_cls.safetensors",
            (0..c.depth)
                .map(|i| {
                    format!("beit.encoder.layer.{i}.attention.attention.relative_position_bias.relative_position_index")
                })
                .collect::<Vec<_>>(),
        ),
        ("hf5_beit_mim.safetensors", vec!["beit.encoder.relative_position_bias.relative_position_index".to_string()]),
        ("hf5_data2vec_model.safetensors", vec!["encoder.relative_position_bias.relative_position_index".to_string()]),
    ] {
        let without = sources(&fixture(name));
        let mut with = without.clone();
        for k in &index_keys {
            with.push(SourceTensor { name: k.clone(), shape: vec![tokens, tokens], dtype: DType::I64 });
        }
        for s in [&without, &with] {
            let clean = plan(table, s, &PlanOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(clean.outputs.iter().all(|o| !o.target.ends_with("relative_position_index")), "{name}");
            let ready = plan(table, s, &PlanOptions { img_size: Some(c.img), ..Default::default() })
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let made: Vec<_> = ready.outputs.iter().filter(|o| o.target.ends_with("relative_position_index")).collect();
            assert_eq!(made.len(), c.depth);
            assert!(made.iter().all(|o| o.origin == Origin::RelPosIndex { window }));
            for p in [&clean, &ready] {
                for k in &index_keys {
                    if s.len() > without.len() {
                        assert!(p.dropped.iter().any(|d| &d.source == k && d.rule == "rel-index"), "{name}: {k}");
                    }
                }
            }
        }
    }
}

#[test]
fn detection_explains_the_nearest_miss() {
    // A bare ViTMAE without its position embedding: hf-vitmae is the nearest table.
    let f = fixture("hf5_vitmae_model.safetensors");
    let names: Vec<&str> =
        f.tensors.iter().map(|t| t.0.as_str()).filter(|n| *n != "embeddings.position_embeddings").collect();
    let e = detect(&names).unwrap_err();
    assert!(matches!(e, TableError::NoTableMatches { .. }));
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "{msg}");
    let nearest = msg.split("nearest first: ").nth(1).unwrap();
    assert!(nearest.starts_with("hf-vitmae: 2 of 3 required fingerprints match"), "{msg}");
    assert!(nearest.contains("no key matches 'embeddings\\.position_embeddings'"), "{msg}");
    for t in ckptmap::mapping::builtin_tables() {
        assert!(msg.contains(&format!("{}: ", t.0)), "{msg} lacks {}", t.0);
    }
    // A forbidden key is named with the pattern it hits.
    let mut names: Vec<String> = fixture("hf5_beit_cls.safetensors").tensors.iter().map(|t| t.0.clone()).collect();
    names.push("beit.encoder.layer.0.attention.attention.key.bias".into());
    let msg = detect(&names).unwrap_err().to_string();
    assert!(
        msg.contains("hf-beit: 2 of 2 required fingerprints match")
            && msg.contains("key 'beit.encoder.layer.0.attention.attention.key.bias' matches forbidden"),
        "{msg}"
    );
    // Several matches: each is named with what matched.
    let a = MappingTable::parse("name = \"a\"\ndescription = \"x\"\n[detect]\nrequire = ['w']\n", "a.toml").unwrap();
    let b =
        MappingTable::parse("name = \"b\"\ndescription = \"x\"\n[detect]\nrequire = ['w']\nforbid = ['z']\n", "b.toml")
            .unwrap();
    let msg = ckptmap::mapping::detect_among([&a, &b], &["w"]).unwrap_err().to_string();
    assert!(
        msg.contains("(a, b)")
            && msg.contains("a: 1 of 1 required fingerprints match ('w' as 'w')")
            && msg.contains("nothing forbidden"),
        "{msg}"
    );
}

#[test]
fn detection_is_unambiguous_on_the_official_fixtures_too() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let is_ckpt = name.starts_with("mae_tiny") || name.starts_with("beit_tiny");
        if !is_ckpt {
            continue;
        }
        let ckpt = Checkpoint::open(&path).unwrap();
        let want = if name.starts_with("mae") { "mae" } else { "beit" };
        assert_eq!(choose_table(None, &ckpt).unwrap_or_else(|e| panic!("{name}: {e}")).table().name(), want, "{name}");
        n += 1;
    }
    assert!(n >= 10, "{n} official fixtures");
}

#[test]
fn every_table_is_listed_with_a_one_line_description_of_where_files_come_from() {
    let out = Command::new(env!("CARGO_BIN_EXE_ckptmap")).arg("mappings").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for name in ["hf-vitmae", "hf-beit", "mmpretrain-mae", "mmpretrain-beit", "mmseg-mae", "mmseg-beit"] {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{name} not listed:\n{text}"));
        assert!(line.contains("->") && line.len() > name.len() + 40, "{line}");
    }
}

// ---------------------------------------------------------------------------------------
// docs/sources.md: every row's command, run as written on a fixture of that family.

#[test]
fn docs_sources_commands_run_as_written() {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/sources.md")).unwrap();
    // (table cell, input file in the command) → (fixture, reference), relative to fixtures/;
    // a layouts/ fixture's reference is the manifest's.
    let layout = |name: &str| (format!("layouts/{name}"), format!("layouts/{}", fixture(name).reference.unwrap()));
    let official = |name: &str, reference: &str| (name.to_string(), reference.to_string());
    let fixtures: HashMap<(&str, &str), (String, String)> = HashMap::from([
        (("`hf-vitmae`", "model.safetensors"), layout("hf5_vitmae_pretraining.safetensors")),
        (("`hf-beit`", "pytorch_model.bin"), layout("hf4_beit_mim.bin")),
        (("`hf-beit`", "model.safetensors"), layout("hf5_data2vec_model.safetensors")),
        (("`mae`", "model.safetensors"), official("mae_tiny.safetensors", "ref_mae_tiny_112.safetensors")),
        (("`mae`", "mae_pretrain_vit_base.pth"), official("mae_tiny.pth", "ref_mae_tiny_112.safetensors")),
        (
            ("`beit`", "beit_base_patch16_224_pt22k.pth"),
            official("beit_tiny_pt.pth", "ref_beit_tiny_pt_112.safetensors"),
        ),
        (("`mmpretrain-mae`", "mae_vit-base-p16_8xb512-coslr-300e_in1k.pth"), layout("mmpretrain_mae.pth")),
        (("`mmpretrain-beit`", "beitv2_vit-base-p16_8xb256-amp-coslr-300e_in1k.pth"), layout("mmpretrain_beitv2.pth")),
        (("`mmseg-mae`", "upernet_mae-base_fp16_8x2_512x512_160k_ade20k.pth"), layout("mmseg0_segmentor_mae.pth")),
        (("`mmseg-beit`", "upernet_beit-base_8x2_640x640_160k_ade20k.pth"), layout("mmseg1_segmentor_beit.pth")),
        (("`mmseg-mae` / `mmseg-beit`", "beit2mmseg_out.pth"), layout("mmseg_beit.pth")),
    ]);
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let dir = tmp();
    let mut rows = 0;
    for line in doc.lines().filter(|l| l.starts_with("| ") && l.contains("`ckptmap ")) {
        let cells: Vec<&str> = line.split(" | ").collect();
        let table = cells[2].trim();
        let command = cells[3].trim().trim_end_matches(" |").trim_matches('`');
        let args: Vec<&str> = command.split_whitespace().collect();
        assert_eq!(args[..2], ["ckptmap", "convert"], "{line}");
        let (fixture_rel, reference) =
            fixtures.get(&(table, args[2])).unwrap_or_else(|| panic!("no fixture for the row {line}"));
        let out = dir.path().join(format!("{rows}-{}", args[3]));
        let mut run: Vec<String> = args[1..].iter().map(|s| s.to_string()).collect();
        run[1] = base.join(fixture_rel).display().to_string();
        run[2] = out.display().to_string();
        let r = Command::new(env!("CARGO_BIN_EXE_ckptmap")).args(&run).output().unwrap();
        assert!(r.status.success(), "{command} on {fixture_rel}: {}", String::from_utf8_lossy(&r.stderr));
        let stdout = String::from_utf8_lossy(&r.stdout);
        let names: Vec<&str> = table.split(" / ").map(|t| t.trim_matches('`')).collect();
        assert!(names.iter().any(|n| stdout.contains(&format!("[mapping {n}]"))), "{command}: {stdout}");
        let v = Command::new(env!("CARGO_BIN_EXE_ckptmap"))
            .args(["verify", out.to_str().unwrap(), "--reference", base.join(reference).to_str().unwrap()])
            .output()
            .unwrap();
        assert!(v.status.success(), "verify after {command}: {}", String::from_utf8_lossy(&v.stdout));
        rows += 1;
    }
    assert_eq!(rows, fixtures.len(), "every row of docs/sources.md runs");
}
