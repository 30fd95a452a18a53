//! The `ckptmap` binary end to end on the fixtures: convert every variant with both tables,
//! check key sets, shapes and bytes, verify against PyTorch references, and show that
//! conversions broken on purpose are reported as FAIL.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use ckptmap::formats::checkpoint::Checkpoint;
use ckptmap::write::pth::{write_pth, TensorToWrite};

use crate::util::bin::{ckptmap, ok};
use crate::util::http::{Reply, Server};
use crate::util::pickle::expanded_checkpoint;
use crate::util::{fixture, mmseg_vit_b_512_keys, swapped_norm_table};

/// Reads every tensor of a converted file: name → (shape, bytes).
fn tensors(path: &Path) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let c = Checkpoint::open(path).unwrap();
    c.tensors().into_iter().map(|t| (t.name.clone(), t.view.shape.clone(), c.read(t.view).unwrap())).collect()
}

fn source_bytes(path: &Path) -> HashMap<String, Vec<u8>> {
    let c = Checkpoint::open(path).unwrap();
    let root = ckptmap::inspect::find_state_dict(&c).unwrap();
    c.tensors_under(root).unwrap().into_iter().map(|t| (t.name.clone(), c.read(t.view).unwrap())).collect()
}

/// Copies a checkpoint with some tensors replaced, through our writer.
fn rewrite(src: &Path, dest: &Path, edit: impl Fn(&str, &mut Vec<u8>, &HashMap<String, Vec<u8>>)) {
    let all = tensors(src);
    let originals: HashMap<String, Vec<u8>> = all.iter().map(|(n, _, b)| (n.clone(), b.clone())).collect();
    let c = Checkpoint::open(src).unwrap();
    let entries = c.tensors();
    let specs: Vec<TensorToWrite> =
        entries.iter().map(|t| TensorToWrite { name: &t.name, dtype: t.view.dtype, shape: &t.view.shape }).collect();
    let file = std::fs::File::create(dest).unwrap();
    write_pth(file, "broken", &specs, |i, w| {
        let mut bytes = originals[&entries[i].name].clone();
        edit(&entries[i].name, &mut bytes, &originals);
        w.write_all(&bytes)
    })
    .unwrap();
}

#[test]
fn every_mae_variant_converts_to_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("ref.pth");
    ok(&["convert", fixture("mae_tiny.pth").to_str().unwrap(), reference.to_str().unwrap()]);
    let want = tensors(&reference);
    let src = source_bytes(&fixture("mae_tiny.pth"));
    // Renamed tensors are bit-identical to their source.
    let map = [
        ("layers.0.ffn.layers.0.0.weight", "blocks.0.mlp.fc1.weight"),
        ("layers.3.ln2.bias", "blocks.3.norm2.bias"),
        ("patch_embed.projection.weight", "patch_embed.proj.weight"),
    ];
    for (dst, s) in map {
        let got = &want.iter().find(|(n, _, _)| n == dst).unwrap().2;
        assert_eq!(got, &src[s], "{dst}");
    }
    assert!(want.iter().all(|(n, _, _)| !n.starts_with("blocks.") && n != "norm.weight"));
    for variant in [
        "mae_tiny_legacy.pth",
        "mae_tiny_bare.pth",
        "mae_tiny_state_dict.pth",
        "mae_tiny_module.pth",
        "mae_tiny_train.pth",
        "mae_tiny_full.pth",
        "mae_tiny_finetuned.pth",
        "mae_tiny.safetensors",
    ] {
        let out = dir.path().join(format!("{variant}.pth"));
        ok(&["convert", fixture(variant).to_str().unwrap(), out.to_str().unwrap(), "--mapping", "mae"]);
        let got = tensors(&out);
        let names: Vec<&str> = got.iter().map(|t| t.0.as_str()).collect();
        let want_names: Vec<&str> = want.iter().map(|t| t.0.as_str()).collect();
        assert_eq!(names, want_names, "{variant}");
        assert_eq!(got, want, "{variant}: bytes differ");
    }
    // fp16 / bf16 keep their dtype and bytes: same key set, half the size.
    for variant in ["mae_tiny_fp16.pth", "mae_tiny_bf16.pth"] {
        let out = dir.path().join(format!("{variant}.pth"));
        ok(&["convert", fixture(variant).to_str().unwrap(), out.to_str().unwrap()]);
        let got = tensors(&out);
        assert_eq!(got.len(), want.len());
        let src = source_bytes(&fixture(variant));
        assert_eq!(got.iter().find(|t| t.0 == "layers.1.attn.qkv.weight").unwrap().2, src["blocks.1.attn.qkv.weight"]);
    }
}

#[test]
fn dtype_cast_matches_torch_half() {
    // Converting the fp32 fixture with --dtype f16 gives exactly the bytes torch's .half() gave.
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.pth");
    let b = dir.path().join("b.pth");
    ok(&["convert", fixture("mae_tiny.pth").to_str().unwrap(), a.to_str().unwrap(), "--dtype", "f16"]);
    ok(&["convert", fixture("mae_tiny_fp16.pth").to_str().unwrap(), b.to_str().unwrap()]);
    assert_eq!(tensors(&a), tensors(&b));
}

/// An MAE ViT-B/16 pretrain checkpoint: the official key set and shapes, every tensor an
/// expanded view of one 4-byte storage (a few KB instead of 343 MB: a dry run reads names
/// and shapes only).
fn write_vit_b(dest: &Path) {
    std::fs::write(dest, expanded_checkpoint(&ckptmap::synth::mae_pretrain_layout(768, 12, 16))).unwrap();
}

/// Target names and shapes of a dry-run plan.
fn planned(src: &Path, extra: &[&str]) -> HashMap<String, Vec<usize>> {
    let dst = src.with_file_name("unused.pth");
    let mut args = vec!["convert", src.to_str().unwrap(), dst.to_str().unwrap(), "--dry-run", "--json"];
    args.extend_from_slice(extra);
    let v: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    v["plan"]["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["target"].as_str().unwrap().to_string(), serde_json::from_value(o["shape"].clone()).unwrap()))
        .collect()
}

#[test]
fn mae_vit_b_key_sets_match_mmseg() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("vitb.pth");
    write_vit_b(&src);
    assert!(std::fs::metadata(&src).unwrap().len() < 1 << 20, "the ViT-B stand-in is meant to be small");
    let mmseg: HashMap<String, Vec<usize>> = mmseg_vit_b_512_keys("mae").into_iter().collect();
    let unfillable = |k: &str| {
        k.ends_with("relative_position_bias_table") || k.ends_with("relative_position_index") || k.contains("gamma_")
    };
    // Clean: MMSeg's keys minus those the source cannot fill (pos_embed at its source size).
    let clean = planned(&src, &[]);
    let mut want: HashMap<String, Vec<usize>> =
        mmseg.iter().filter(|(k, _)| !unfillable(k)).map(|(k, s)| (k.clone(), s.clone())).collect();
    want.insert("pos_embed".into(), vec![1, 197, 768]);
    assert_eq!(clean, want);
    // Load-ready at 512: all of them, with MMSeg's shapes.
    assert_eq!(
        planned(&src, &["--img-size", "512"]),
        mmseg,
        "load-ready MAE ViT-B at 512 must equal MMSeg's state dict"
    );
    assert!(!src.with_file_name("unused.pth").exists(), "a dry run wrote its output");
}

fn verify(converted: &Path, reference: &str) -> (bool, String) {
    let out = ckptmap(&["verify", converted.to_str().unwrap(), "--reference", fixture(reference).to_str().unwrap()]);
    assert!(matches!(out.status.code(), Some(0) | Some(1)), "{}", String::from_utf8_lossy(&out.stderr));
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn conversions_match_pytorch_references() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[&str], &str); 5] = [
        ("mae_tiny.pth", &[], "ref_mae_tiny_112.safetensors"),
        ("mae_tiny.pth", &["--img-size", "224", "--num-heads", "2"], "ref_mae_tiny_224.safetensors"),
        ("beit_tiny_ft.pth", &[], "ref_beit_tiny_ft_112.safetensors"),
        ("beit_tiny_ft.pth", &["--img-size", "224"], "ref_beit_tiny_ft_224.safetensors"),
        ("beit_tiny_pt.pth", &[], "ref_beit_tiny_pt_112.safetensors"),
    ];
    for (i, (src, extra, reference)) in cases.iter().enumerate() {
        let out = dir.path().join(format!("{i}.pth"));
        let mut args = vec![
            "convert",
            fixture(src).to_str().unwrap().to_string().leak() as &str,
            out.to_str().unwrap().to_string().leak(),
        ];
        args.extend_from_slice(extra);
        ok(&args);
        let (passed, text) = verify(&out, reference);
        assert!(passed, "{src} {extra:?}: {text}");
        assert!(text.contains("PASS"));
    }
}

#[test]
fn broken_conversions_fail_verification() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.pth");
    ok(&["convert", fixture("mae_tiny.pth").to_str().unwrap(), good.to_str().unwrap()]);
    assert!(verify(&good, "ref_mae_tiny_112.safetensors").0, "control case must pass");

    // fc1 of layers 0 and 1 swapped (same shapes, wrong weights).
    let swapped = dir.path().join("swapped.pth");
    rewrite(&good, &swapped, |n, b, all| match n {
        "layers.0.ffn.layers.0.0.weight" => *b = all["layers.1.ffn.layers.0.0.weight"].clone(),
        "layers.1.ffn.layers.0.0.weight" => *b = all["layers.0.ffn.layers.0.0.weight"].clone(),
        _ => {}
    });
    // qkv bias dropped (zeroed).
    let no_bias = dir.path().join("nobias.pth");
    rewrite(&good, &no_bias, |n, b, _| {
        if n.ends_with("attn.qkv.bias") {
            b.iter_mut().for_each(|x| *x = 0)
        }
    });
    for (file, what) in [(&swapped, "fc1 swapped"), (&no_bias, "qkv bias dropped")] {
        let (passed, text) = verify(file, "ref_mae_tiny_112.safetensors");
        assert!(!passed && text.contains("FAIL"), "{what}: {text}");
    }

    // BEiT pretrain: the shared table not expanded (layers keep zero tables, as MMSeg would).
    let beit = dir.path().join("beit.pth");
    ok(&["convert", fixture("beit_tiny_pt.pth").to_str().unwrap(), beit.to_str().unwrap()]);
    assert!(verify(&beit, "ref_beit_tiny_pt_112.safetensors").0, "control case must pass");
    let unexpanded = dir.path().join("unexpanded.pth");
    rewrite(&beit, &unexpanded, |n, b, _| {
        if n.ends_with("relative_position_bias_table") {
            b.iter_mut().for_each(|x| *x = 0)
        }
    });
    let (passed, text) = verify(&unexpanded, "ref_beit_tiny_pt_112.safetensors");
    assert!(!passed, "unexpanded shared bias: {text}");

    // pos_embed resized with the wrong interpolation (nearest instead of bicubic).
    let ready = dir.path().join("ready.pth");
    ok(&[
        "convert",
        fixture("mae_tiny.pth").to_str().unwrap(),
        ready.to_str().unwrap(),
        "--img-size",
        "224",
        "--num-heads",
        "2",
    ]);
    assert!(verify(&ready, "ref_mae_tiny_224.safetensors").0, "control case must pass");
    let nearest = dir.path().join("nearest.pth");
    let src = source_bytes(&fixture("mae_tiny.pth"));
    rewrite(&ready, &nearest, |n, b, _| {
        if n == "pos_embed" {
            let old: Vec<f32> =
                src["pos_embed"].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            let dim = 32;
            let mut out = old[..dim].to_vec();
            for y in 0..14 {
                for x in 0..14 {
                    let s = 1 + (y / 2) * 7 + x / 2;
                    out.extend_from_slice(&old[s * dim..(s + 1) * dim]);
                }
            }
            *b = out.iter().flat_map(|v| v.to_le_bytes()).collect();
        }
    });
    let (passed, text) = verify(&nearest, "ref_mae_tiny_224.safetensors");
    assert!(!passed, "nearest pos_embed: {text}");
}

#[test]
fn verify_against_original_passes_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.pth");
    let text = ok(&["convert", fixture("beit_tiny_ft.pth").to_str().unwrap(), out.to_str().unwrap(), "--verify"]);
    assert!(text.contains("PASS") && !text.contains("not checked"), "{text}");
    // A load-ready output at another size is checked through the unresized mapping.
    let resized = dir.path().join("r.pth");
    let text = ok(&[
        "convert",
        fixture("beit_tiny_ft.pth").to_str().unwrap(),
        resized.to_str().unwrap(),
        "--img-size",
        "224",
        "--verify",
    ]);
    assert!(text.contains("without resizing") && text.contains("PASS"), "{text}");
    // It says the resize itself was not checked, in text and in the JSON outcome.
    assert!(
        text.contains("img_size 224 (pos_embed / relative position tables) was not checked by the forward pass"),
        "{text}"
    );
    let r = ckptmap(&[
        "convert",
        fixture("beit_tiny_ft.pth").to_str().unwrap(),
        resized.to_str().unwrap(),
        "--img-size",
        "224",
        "--verify",
        "--json",
    ]);
    assert!(r.status.success());
    // One JSON document on stdout, the check inside it; nothing on stderr.
    let doc: serde_json::Value =
        serde_json::from_slice(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&r.stdout)));
    assert!(r.stderr.is_empty(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(doc["output_sha256"].as_str().is_some_and(|h| h.len() == 64), "{doc}");
    let v = &doc["verify"];
    assert_eq!(v["passed"], true, "{v}");
    assert_eq!(v["subject"], "clean conversion", "{v}");
    assert!(v["not_checked"].as_str().is_some_and(|n| n.contains("not checked by the forward pass")), "{v}");
    let broken = dir.path().join("b.pth");
    rewrite(&out, &broken, |n, b, _| {
        if n == "layers.2.gamma_1" {
            b.iter_mut().for_each(|x| *x = 0)
        }
    });
    let r = ckptmap(&["verify", broken.to_str().unwrap(), "--against", fixture("beit_tiny_ft.pth").to_str().unwrap()]);
    assert_eq!(r.status.code(), Some(1), "{}", String::from_utf8_lossy(&r.stdout));
}

#[test]
fn dry_run_writes_nothing_and_explains() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.pth");
    let text = ok(&["convert", fixture("mae_tiny_full.pth").to_str().unwrap(), out.to_str().unwrap(), "--dry-run"]);
    assert!(!out.exists());
    assert!(text.contains("blocks.0.mlp.fc1.weight -> layers.0.ffn.layers.0.0.weight"), "{text}");
    assert!(text.contains("decoder_pred.weight dropped"), "{text}");
    let json =
        ok(&["convert", fixture("beit_tiny_pt.pth").to_str().unwrap(), out.to_str().unwrap(), "--dry-run", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["plan"]["table"], "beit");
    assert!(!out.exists());
}

#[test]
fn bad_inputs_give_one_line_errors_and_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.pth");
    let junk = dir.path().join("junk.pth");
    std::fs::write(&junk, b"hello world, not a checkpoint").unwrap();
    let views = fixture("views.pth");
    let mae = fixture("mae_tiny.pth");
    let txt = dir.path().join("out.txt");
    let cases: [(&[&str], &str); 4] = [
        (&["convert", junk.to_str().unwrap(), out.to_str().unwrap()], "not a PyTorch checkpoint"),
        (&["convert", views.to_str().unwrap(), out.to_str().unwrap()], "views.pth"),
        (&["convert", mae.to_str().unwrap(), out.to_str().unwrap(), "--mapping", "nosuch"], "nosuch"),
        (&["convert", mae.to_str().unwrap(), txt.to_str().unwrap()], ".pth or .safetensors"),
    ];
    for (args, needle) in cases {
        let r = ckptmap(args);
        assert_eq!(r.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!out.exists());
    }
    // No stray temporaries either.
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 1, "{left:?}");
}

#[test]
fn a_failed_conversion_never_replaces_a_good_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("keep.pth");
    std::fs::write(&out, b"previous good file").unwrap();
    let r = ckptmap(&["convert", fixture("views.pth").to_str().unwrap(), out.to_str().unwrap(), "--mapping", "mae"]);
    assert_eq!(r.status.code(), Some(2));
    assert_eq!(std::fs::read(&out).unwrap(), b"previous good file");
}

#[test]
fn convert_and_inspect_accept_urls() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    // `body` at any path except `/missing*` (404).
    let body = std::fs::read(fixture("beit_tiny_ft.pth")).unwrap();
    let server =
        Server::start(move |_, r| if r.path.starts_with("/missing") { Reply::not_found() } else { Reply::ok(&body) });
    let base = server.base();
    let out = dir.path().join("o.pth");
    let url = format!("{base}/beit_tiny_ft.pth");
    ok(&["convert", &url, out.to_str().unwrap(), "--cache-dir", cache.to_str().unwrap(), "--verify"]);
    // Same bytes as converting the local file.
    let local = dir.path().join("l.pth");
    ok(&["convert", fixture("beit_tiny_ft.pth").to_str().unwrap(), local.to_str().unwrap()]);
    assert_eq!(tensors(&out), tensors(&local));
    // The second use comes from the cache (the server sees only 2 requests: this one
    // and the 404 below).
    let text = ok(&["inspect", &url, "--cache-dir", cache.to_str().unwrap()]);
    assert!(text.contains("state dict: model"), "{text}");
    let r =
        ckptmap(&["inspect", &format!("{base}/missing.pth"), "--cache-dir", cache.to_str().unwrap(), "--retries", "0"]);
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("404"));
    assert_eq!(server.paths(), ["/beit_tiny_ft.pth", "/missing.pth"]);
}

/// `convert --verify` checks the finished output before it is moved into place: a table
/// that computes something else (norm1 and norm2 swapped: same shapes) exits 1 and leaves
/// DST as it was; the correct table replaces it.
#[test]
fn convert_verify_failure_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let swapped = swapped_norm_table();
    let swapped_path = dir.path().join("swapped.toml");
    std::fs::write(&swapped_path, swapped).unwrap();
    let dst = dir.path().join("out.pth");
    std::fs::write(&dst, b"previous").unwrap();
    let mae = fixture("mae_tiny.pth");
    let r = ckptmap(&[
        "convert",
        mae.to_str().unwrap(),
        dst.to_str().unwrap(),
        "--num-heads",
        "2",
        "--verify",
        "--mapping",
        swapped_path.to_str().unwrap(),
    ]);
    let (stdout, stderr) = (String::from_utf8_lossy(&r.stdout), String::from_utf8_lossy(&r.stderr));
    assert_eq!(r.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("FAIL"), "{stdout}");
    assert!(stderr.contains("not written") && stderr.contains("out.pth"), "{stderr}");
    assert_eq!(std::fs::read(&dst).unwrap(), b"previous", "DST was replaced by a conversion that failed its check");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 2, "files next to DST: {left:?}");

    // Cast to f16: checked against the original rounded the same way, so a wrong mapping
    // still fails and the right one passes.
    let r = ckptmap(&[
        "convert",
        mae.to_str().unwrap(),
        dst.to_str().unwrap(),
        "--num-heads",
        "2",
        "--verify",
        "--dtype",
        "f16",
        "--mapping",
        swapped_path.to_str().unwrap(),
    ]);
    assert_eq!(r.status.code(), Some(1), "{}", String::from_utf8_lossy(&r.stdout));
    assert_eq!(std::fs::read(&dst).unwrap(), b"previous");
    let text = ok(&[
        "convert",
        mae.to_str().unwrap(),
        dst.to_str().unwrap(),
        "--num-heads",
        "2",
        "--verify",
        "--dtype",
        "f16",
    ]);
    assert!(text.contains("PASS") && text.contains("rounded to f16"), "{text}");

    let text = ok(&["convert", mae.to_str().unwrap(), dst.to_str().unwrap(), "--num-heads", "2", "--verify"]);
    assert!(text.contains("PASS") && !text.contains("rounded"), "{text}");
    assert_ne!(std::fs::read(&dst).unwrap(), b"previous");
}

// README's commands (the main one included) run in tests/suite/readme.rs.
