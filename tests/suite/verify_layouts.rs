//! `convert --verify` and `verify --against` for every source layout of fixtures/layouts
//! (Hugging Face 4.x/5.x ViTMAE / BEiT / Data2Vec, mmpretrain MAE / BEiT / BEiT v2, MMSeg
//! 0.x/1.x segmentors, already-MMSeg files; the list is read from manifest.json): the check
//! runs the original in its own names (src/verify/sources.rs, not the mapping tables) next
//! to the converted weights, passes for the real conversions, plain and resized, and fails
//! (exit 1) for conversions broken on purpose: q/k/v order swapped in the table, HF lambdas
//! not copied, shared tables not expanded, segmentor gammas refilled, and edits of the
//! output of every layout.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Output;

use crate::util::bin::ckptmap;
use crate::util::layouts;
use ckptmap::formats::checkpoint::Checkpoint;
use ckptmap::write::pth::{write_pth, TensorToWrite};

/// One checkpoint of manifest.json (the entries with a `family`; references have none).
struct Fixture {
    name: String,
    family: String,
    arch: String,
}

fn manifest() -> (Vec<Fixture>, serde_json::Value) {
    let path = layouts().join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let j: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for (name, f) in j["files"].as_object().unwrap() {
        let Some(family) = f["family"].as_str() else { continue };
        let arch = f["arch"].as_str().unwrap_or_else(|| panic!("{name}: no arch")).to_string();
        out.push(Fixture { name: name.clone(), family: family.to_string(), arch });
    }
    assert!(out.len() >= 20, "only {} checkpoints in the manifest", out.len());
    (out, j["common"].clone())
}

fn common(key: &str) -> String {
    manifest().1[key].as_u64().unwrap_or_else(|| panic!("manifest common.{key}")).to_string()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// `--num-heads` for MAE fixtures (width 16 has no head preset and MAE has no relative table
/// to count heads from); BEiT fixtures are left to find the heads in their tables.
fn heads_args(f: &Fixture) -> Vec<String> {
    if f.arch == "mae" {
        vec!["--num-heads".into(), common("num_heads")]
    } else {
        vec![]
    }
}

fn run(args: &[String]) -> Output {
    ckptmap(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// `verify OUT --against SRC`: its exit code and output.
fn against(out: &Path, src: &Path, f: &Fixture) -> (Option<i32>, String) {
    let mut args = vec!["verify".to_string(), s(out), "--against".into(), s(src)];
    args.extend(heads_args(f));
    let o = run(&args);
    (o.status.code(), text(&o))
}

/// Copies a checkpoint's tensors through our writer; `edit` may change a tensor's bytes or
/// return false to leave it out.
fn rewrite(src: &Path, dest: &Path, edit: impl Fn(&str, &[usize], &mut Vec<u8>) -> bool) {
    let c = Checkpoint::open(src).unwrap();
    let root = ckptmap::inspect::find_state_dict(&c).unwrap_or("");
    let entries = c.tensors_under(root).unwrap();
    let mut kept = Vec::new();
    for t in &entries {
        let mut bytes = c.read(t.view).unwrap();
        if edit(&t.name, &t.view.shape, &mut bytes) {
            kept.push((t, bytes));
        }
    }
    let specs: Vec<TensorToWrite> =
        kept.iter().map(|(t, _)| TensorToWrite { name: &t.name, dtype: t.view.dtype, shape: &t.view.shape }).collect();
    write_pth(std::fs::File::create(dest).unwrap(), "edited", &specs, |i, w| w.write_all(&kept[i].1)).unwrap();
}

fn fill_f32(bytes: &mut [u8], v: f32) {
    for c in bytes.chunks_exact_mut(4) {
        c.copy_from_slice(&v.to_le_bytes());
    }
}

#[test]
fn every_layout_passes_convert_verify_and_verify_against_plain_and_resized() {
    let dir = tempfile::tempdir().unwrap();
    let (fixtures, _) = manifest();
    let big = (2 * common("img_size").parse::<usize>().unwrap()).to_string();
    for f in &fixtures {
        let src = layouts().join(&f.name);
        let out = dir.path().join(format!("{}.pth", f.name));
        // convert --verify: the check runs against the original before the file is moved in.
        let mut args = vec!["convert".to_string(), s(&src), s(&out), "--verify".into()];
        args.extend(heads_args(f));
        let o = run(&args);
        assert_eq!(o.status.code(), Some(0), "convert --verify {} ({}): {}", f.name, f.family, text(&o));
        assert!(text(&o).contains("PASS"), "{}: {}", f.name, text(&o));
        // verify --against on what convert wrote.
        let (code, t) = against(&out, &src, f);
        assert_eq!(code, Some(0), "verify --against {} ({}): {t}", f.name, f.family);
        assert!(t.contains("PASS"), "{}: {t}", f.name);
        // A load-ready output at twice the size: checked through the clean conversion.
        let resized = dir.path().join(format!("{}.{big}.pth", f.name));
        let args = vec![
            "convert".to_string(),
            s(&src),
            s(&resized),
            "--verify".into(),
            "--img-size".into(),
            big.clone(),
            "--num-heads".into(),
            common("num_heads"),
        ];
        let o = run(&args);
        assert_eq!(o.status.code(), Some(0), "convert --img-size {big} --verify {}: {}", f.name, text(&o));
        assert!(text(&o).contains("PASS") && text(&o).contains("without resizing"), "{}: {}", f.name, text(&o));
    }
}

#[test]
fn the_json_outcome_names_the_family_the_original_was_read_in() {
    let dir = tempfile::tempdir().unwrap();
    for (name, family) in [
        ("hf5_beit_mim.safetensors", "Hugging Face layout, prefix 'beit.'"),
        ("hf4_data2vec_model.bin", "Hugging Face layout"),
        ("mmpretrain_beitv2.pth", "mmpretrain layout"),
        ("mmseg0_segmentor_mae.pth", "MMSeg segmentor"),
        ("mmseg_beit.pth", "MMSeg layout"),
    ] {
        let src = layouts().join(name);
        let out = dir.path().join(format!("{name}.pth"));
        let o =
            ckptmap(&["convert", src.to_str().unwrap(), out.to_str().unwrap(), "--num-heads", &common("num_heads")]);
        assert!(o.status.success(), "{}", text(&o));
        let o = ckptmap(&[
            "verify",
            out.to_str().unwrap(),
            "--against",
            src.to_str().unwrap(),
            "--num-heads",
            &common("num_heads"),
            "--json",
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(v["against"].as_str().unwrap().contains(family), "{name}: {v}");
        assert_eq!(v["passed"], true);
    }
}

/// The built-in table's TOML as `ckptmap mappings NAME` prints it, with each `(from, to)`
/// replaced (each `from` must occur), written to a file for `--mapping`.
fn broken_table(dir: &Path, base: &str, edits: &[(&str, &str)]) -> PathBuf {
    let o = ckptmap(&["mappings", base]);
    assert!(o.status.success(), "{}", text(&o));
    let mut toml = String::from_utf8(o.stdout).unwrap();
    for (from, to) in edits {
        assert!(toml.contains(from), "{base}: '{from}' is not in the table");
        toml = toml.replace(from, to);
    }
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("{base}-broken-{n}.toml"));
    std::fs::write(&path, toml).unwrap();
    path
}

const SHARED_EXPAND: &str = "expand = \"layers.{i}.attn.relative_position_bias_table\"\nnote";
const TABLE_SHAPE: &str = "shape = [\"(2 * window - 1) * (2 * window - 1) + 3\", \"heads\"]\n";
const TABLE_ZEROS: &str = "shape = [\"(2 * window - 1) * (2 * window - 1) + 3\", \"heads\"]\nrequired = false\nmake = { name = \"fill\", value = 0.0 }\n";
const DROP_GAMMAS: &str = "[[rule]]\nid = \"broken-gammas\"\nmatch = 'layers\\.\\d+\\.gamma_[12]'\ndrop = \"broken on purpose\"\n\n[[rule]]\nid = \"backbone\"";

#[test]
fn broken_tables_fail_verify_against_and_convert_verify_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (fixtures, _) = manifest();
    let find =
        |name: &str| fixtures.iter().find(|f| f.name == name).unwrap_or_else(|| panic!("{name} not in the manifest"));
    let native = ["--img-size".to_string(), common("img_size")];
    let qk = ("parts = [\"${1}query.${4}\", \"${1}key.${4}\"", "parts = [\"${1}key.${4}\", \"${1}query.${4}\"");
    let kv = ("\"${1}key.weight\", \"${1}value.weight\"", "\"${1}value.weight\", \"${1}key.weight\"");
    let qk_beit = ("[\"${1}query.weight\", \"${1}key.weight\"", "[\"${1}key.weight\", \"${1}query.weight\"");
    let no_lambda = ("rename = \"layers.${1}.gamma_${2}\"", "drop = \"broken on purpose\"");
    let cases: Vec<(&str, &str, PathBuf, &[String])> = vec![
        ("control: hf-vitmae unchanged", "hf5_vitmae_pretraining.safetensors", broken_table(d, "hf-vitmae", &[]), &[]),
        ("ViTMAE q/k order swapped", "hf5_vitmae_pretraining.safetensors", broken_table(d, "hf-vitmae", &[qk]), &[]),
        ("ViTMAE q/k order swapped", "hf4_vitmae_model.bin", broken_table(d, "hf-vitmae", &[qk]), &[]),
        ("control: hf-beit unchanged", "hf5_beit_cls.safetensors", broken_table(d, "hf-beit", &[]), &[]),
        ("BEiT k/v order swapped", "hf5_beit_cls.safetensors", broken_table(d, "hf-beit", &[kv]), &[]),
        ("Data2Vec q/k order swapped", "hf5_data2vec_model.safetensors", broken_table(d, "hf-beit", &[qk_beit]), &[]),
        (
            "lambda not copied (gamma filled with 1)",
            "hf5_data2vec_cls.safetensors",
            broken_table(d, "hf-beit", &[no_lambda]),
            &native,
        ),
        (
            "lambda not copied (gamma filled with 1)",
            "hf4_beit_mim.bin",
            broken_table(d, "hf-beit", &[no_lambda]),
            &native,
        ),
        (
            "HF shared table not expanded (zeros)",
            "hf5_beit_mim.safetensors",
            broken_table(
                d,
                "hf-beit",
                &[(SHARED_EXPAND, "drop = \"broken on purpose\"\nnote"), (TABLE_SHAPE, TABLE_ZEROS)],
            ),
            &[],
        ),
        (
            "HF shared table not expanded (zeros)",
            "hf5_data2vec_model.safetensors",
            broken_table(
                d,
                "hf-beit",
                &[(SHARED_EXPAND, "drop = \"broken on purpose\"\nnote"), (TABLE_SHAPE, TABLE_ZEROS)],
            ),
            &[],
        ),
        ("control: mmpretrain-beit unchanged", "mmpretrain_beit.pth", broken_table(d, "mmpretrain-beit", &[]), &[]),
        (
            "mmpretrain shared table not expanded (zeros)",
            "mmpretrain_beit.pth",
            broken_table(
                d,
                "mmpretrain-beit",
                &[(SHARED_EXPAND, "drop = \"broken on purpose\"\nnote"), (TABLE_SHAPE, TABLE_ZEROS)],
            ),
            &[],
        ),
        (
            "mmpretrain v2 shared table not expanded (zeros)",
            "mmpretrain_beitv2.pth",
            broken_table(
                d,
                "mmpretrain-beit",
                &[(SHARED_EXPAND, "drop = \"broken on purpose\"\nnote"), (TABLE_SHAPE, TABLE_ZEROS)],
            ),
            &[],
        ),
        ("control: mmseg-mae unchanged", "mmseg1_segmentor_mae.pth", broken_table(d, "mmseg-mae", &[]), &native),
        (
            "MAE segmentor gammas refilled",
            "mmseg1_segmentor_mae.pth",
            broken_table(d, "mmseg-mae", &[("[[rule]]\nid = \"backbone\"", DROP_GAMMAS)]),
            &native,
        ),
        (
            "MAE 0.x segmentor gammas refilled",
            "mmseg0_segmentor_mae.pth",
            broken_table(d, "mmseg-mae", &[("[[rule]]\nid = \"backbone\"", DROP_GAMMAS)]),
            &native,
        ),
        (
            "BEiT segmentor gammas refilled",
            "mmseg1_segmentor_beit.pth",
            broken_table(d, "mmseg-beit", &[("[[rule]]\nid = \"backbone\"", DROP_GAMMAS)]),
            &native,
        ),
    ];
    for (n, (what, name, table, extra)) in cases.iter().enumerate() {
        let f = find(name);
        let src = layouts().join(name);
        let out = d.join(format!("case{n}.pth"));
        let mut args = vec!["convert".to_string(), s(&src), s(&out), "--mapping".into(), s(table)];
        args.extend(extra.iter().cloned());
        if !extra.is_empty() || f.arch == "mae" {
            args.extend(["--num-heads".to_string(), common("num_heads")]);
        }
        let o = run(&args);
        assert!(o.status.success(), "{what} on {name}: the broken table must still convert: {}", text(&o));
        let (code, t) = against(&out, &src, f);
        let control = what.starts_with("control");
        assert_eq!(code, Some(if control { 0 } else { 1 }), "{what} on {name}: verify --against: {t}");
        // convert --verify refuses to write the broken output.
        let checked = d.join(format!("case{n}.verified.pth"));
        let mut args = args.clone();
        args[2] = s(&checked);
        args.push("--verify".into());
        let o = run(&args);
        assert_eq!(
            o.status.code(),
            Some(if control { 0 } else { 1 }),
            "{what} on {name}: convert --verify: {}",
            text(&o)
        );
        assert_eq!(checked.exists(), control, "{what} on {name}");
        if !control {
            assert!(text(&o).contains("fail the forward-pass check"), "{what}: {}", text(&o));
        }
    }
}

#[test]
fn edited_outputs_of_every_layout_fail_verify_against() {
    let dir = tempfile::tempdir().unwrap();
    let (fixtures, _) = manifest();
    let dim: usize = common("embed_dim").parse().unwrap();
    let mut broken = 0;
    for f in &fixtures {
        let src = layouts().join(&f.name);
        let out = dir.path().join(format!("{}.pth", f.name));
        let mut args = vec!["convert".to_string(), s(&src), s(&out)];
        args.extend(heads_args(f));
        let o = run(&args);
        assert!(o.status.success(), "{}: {}", f.name, text(&o));
        let names: Vec<String> = Checkpoint::open(&out).unwrap().tensors().into_iter().map(|t| t.name).collect();
        let has = |k: &str| names.iter().any(|n| n == k);
        type Edit = Box<dyn Fn(&str, &[usize], &mut Vec<u8>) -> bool>;
        let mut edits: Vec<(&str, Edit)> = vec![(
            "q and k rows of layers.1.attn.qkv.weight swapped",
            Box::new(move |n, _, b| {
                if n == "layers.1.attn.qkv.weight" {
                    let row = dim * dim * 4;
                    let (q, k) = b.split_at_mut(row);
                    q.swap_with_slice(&mut k[..row]);
                }
                true
            }),
        )];
        if has("layers.1.gamma_1") {
            edits.push((
                "layers.1.gamma_1 filled with 1",
                Box::new(|n, _, b| {
                    if n == "layers.1.gamma_1" {
                        fill_f32(b, 1.0);
                    }
                    true
                }),
            ));
            edits.push((
                "every gamma zeroed",
                Box::new(|n, _, b| {
                    if n.ends_with(".gamma_1") || n.ends_with(".gamma_2") {
                        fill_f32(b, 0.0);
                    }
                    true
                }),
            ));
        }
        if has("layers.0.attn.relative_position_bias_table") && f.arch == "beit" {
            edits.push((
                "every relative table zeroed",
                Box::new(|n, _, b| {
                    if n.ends_with("relative_position_bias_table") {
                        fill_f32(b, 0.0);
                    }
                    true
                }),
            ));
        }
        for (what, edit) in edits {
            let bad = dir.path().join(format!("{}.bad.pth", f.name));
            rewrite(&out, &bad, edit);
            let (code, t) = against(&bad, &src, f);
            assert_eq!(code, Some(1), "{} ({}): {what}: {t}", f.name, f.family);
            assert!(t.contains("FAIL"), "{}: {t}", f.name);
            broken += 1;
        }
    }
    assert!(broken >= 2 * fixtures.len(), "{broken} edits");
}

#[test]
fn a_tensor_missing_from_the_original_is_named_as_its_family_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let (fixtures, _) = manifest();
    let heads = common("num_heads");
    let cases = [
        (
            "hf4_beit_model.bin",
            "encoder.layer.1.attention.attention.key.weight",
            "encoder.layer.1.attention.attention.key.weight",
        ),
        (
            "hf5_vitmae_pretraining.safetensors",
            "vit.encoder.layer.2.layernorm_after.bias",
            "vit.encoder.layer.2.layernorm_after.bias",
        ),
        ("mmpretrain_mae.pth", "backbone.layers.0.ln1.weight", "backbone.layers.0.ln1.weight"),
    ];
    for (name, drop, named) in cases {
        let f = fixtures.iter().find(|f| f.name == name).unwrap();
        let src = layouts().join(name);
        let out = dir.path().join(format!("{name}.out.pth"));
        let o = ckptmap(&["convert", src.to_str().unwrap(), out.to_str().unwrap(), "--num-heads", &heads]);
        assert!(o.status.success(), "{}", text(&o));
        let partial = dir.path().join(format!("{name}.partial.pth"));
        rewrite(&src, &partial, |n, _, _| n != drop);
        let (code, t) = against(&out, &partial, f);
        assert_eq!(code, Some(2), "{name} without {drop}: {t}");
        assert!(t.contains(&format!("'{named}'")), "{name} without {drop}: {t}");
    }
    // A file of no known family says so.
    let junk = dir.path().join("junk.pth");
    rewrite(&layouts().join("mmseg_mae.pth"), &junk, |n, _, _| !n.starts_with("patch_embed"));
    let out = dir.path().join("mmseg_mae.pth.out.pth");
    assert!(ckptmap(&["convert", layouts().join("mmseg_mae.pth").to_str().unwrap(), out.to_str().unwrap()])
        .status
        .success());
    let o = ckptmap(&["verify", out.to_str().unwrap(), "--against", junk.to_str().unwrap(), "--num-heads", &heads]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("cannot tell which layout the original is in"), "{}", text(&o));
}
