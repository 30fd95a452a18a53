//! End-to-end checks of the verifier: against PyTorch/timm references (fixtures/), against a
//! naive scalar implementation, and — the point of it all — that broken conversions fail.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

use super::config::Layout;
use super::random::random_weights;
use super::*;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

fn load(name: &str) -> WeightMap {
    let p = fixture(name);
    assert!(p.exists(), "fixture {} is missing (see fixtures/make_fixtures.py)", p.display());
    load_safetensors_f32(&p, &Device::Cpu).unwrap()
}

fn reference(name: &str) -> Reference {
    Reference::load(fixture(name), &Device::Cpu).unwrap()
}

/// The beit2mmseg renames, plus (for MAE) what MMSeg holds after loading: zero relative
/// tables and gamma = 1.
fn to_mmseg(orig: &WeightMap, cfg: &BackboneConfig) -> WeightMap {
    let mut out = WeightMap::new();
    for (k, v) in orig {
        let k = if let Some(rest) = k.strip_prefix("patch_embed.proj.") {
            format!("patch_embed.projection.{rest}")
        } else if let Some(rest) = k.strip_prefix("blocks.") {
            format!("layers.{rest}")
                .replace(".norm1.", ".ln1.")
                .replace(".norm2.", ".ln2.")
                .replace(".mlp.fc1.", ".ffn.layers.0.0.")
                .replace(".mlp.fc2.", ".ffn.layers.1.")
        } else {
            k.clone()
        };
        out.insert(k, v.clone());
    }
    if cfg.arch == Arch::Mae {
        let d = cfg.embed_dim;
        for i in 0..cfg.depth {
            out.insert(
                format!("layers.{i}.attn.relative_position_bias_table"),
                Tensor::zeros((cfg.table_rows(), cfg.num_heads), DType::F32, &Device::Cpu).unwrap(),
            );
            for g in ["gamma_1", "gamma_2"] {
                out.insert(format!("layers.{i}.{g}"), Tensor::ones(d, DType::F32, &Device::Cpu).unwrap());
            }
        }
    }
    out
}

fn worst(reports: &[OutputReport]) -> (f64, f64) {
    let rel = reports.iter().map(|r| r.max_rel.unwrap_or(f64::INFINITY)).fold(0.0, f64::max);
    let cos = reports.iter().map(|r| r.cosine.unwrap_or(-1.0)).fold(1.0, f64::min);
    (rel, cos)
}

fn run_and_compare(layout: Layout, w: &WeightMap, cfg: &BackboneConfig, r: &Reference) -> Vec<OutputReport> {
    let out = match layout {
        Layout::MMSeg => mmseg_forward(w, cfg, &r.input),
        Layout::Original => original_forward(w, cfg, &r.input),
    }
    .unwrap();
    compare(&out, &r.outputs, &Tolerance::default()).unwrap()
}

/// Asserts the reports pass, and prints the measured error (`--nocapture` to see it).
fn assert_pass(label: &str, reports: &[OutputReport]) {
    let (rel, cos) = worst(reports);
    eprintln!(
        "PASS-CASE {label}: max_rel {rel:.3e}, 1-cosine {:.3e}, max_abs {:?}",
        1.0 - cos,
        reports.iter().map(|r| r.max_abs.unwrap()).collect::<Vec<_>>()
    );
    assert!(reports.iter().all(|r| r.passed), "{label}: {reports:#?}");
}

/// Asserts the reports fail, with an error more than `factor` times the tolerance.
fn assert_broken(label: &str, reports: &[OutputReport], factor: f64) {
    let (rel, cos) = worst(reports);
    eprintln!("BROKEN-CASE {label}: max_rel {rel:.3e}, 1-cosine {:.3e}", 1.0 - cos);
    assert!(reports.iter().any(|r| !r.passed), "{label} passed: {reports:#?}");
    assert!(
        rel > factor * Tolerance::default().max_rel,
        "{label}: max_rel {rel:e} is not {factor}x outside the tolerance"
    );
}

fn cfg_for(layout: Layout, w: &WeightMap, r: &Reference, heads: Option<usize>) -> BackboneConfig {
    let cfg = BackboneConfig::infer(layout, w, None, heads, Some(r.out_indices())).unwrap();
    assert_eq!(cfg.img_size, r.img_size());
    assert_eq!(Some(cfg.num_heads), r.meta_usize("num_heads").unwrap());
    assert_eq!(Some(cfg.depth), r.meta_usize("depth").unwrap());
    cfg
}

// ---------------------------------------------------------------------------------------
// Against the timm references
// ---------------------------------------------------------------------------------------

#[test]
fn mae_original_layout_matches_timm() {
    let w = load("mae_tiny.safetensors");
    let r = reference("ref_mae_tiny_112.safetensors");
    // Width 32 has no head preset and MAE has no table: the heads must be given.
    let e = BackboneConfig::infer_original(&w, None, None, None).unwrap_err().to_string();
    assert!(e.contains("--num-heads"), "{e}");
    let cfg = cfg_for(Layout::Original, &w, &r, Some(2));
    assert_eq!(cfg.arch, Arch::Mae);
    assert_pass("mae original", &run_and_compare(Layout::Original, &w, &cfg, &r));
}

#[test]
fn beit_original_layout_matches_timm() {
    let w = load("beit_tiny_ft.safetensors");
    let r = reference("ref_beit_tiny_ft_112.safetensors");
    let cfg = cfg_for(Layout::Original, &w, &r, None); // heads and size from the table
    assert_eq!(cfg.arch, Arch::Beit);
    assert_pass("beit-ft original", &run_and_compare(Layout::Original, &w, &cfg, &r));

    // Without the stored index the generated one is used: same result.
    let mut no_index = w.clone();
    no_index.retain(|k, _| !k.ends_with("relative_position_index"));
    assert_pass("beit-ft original, generated index", &run_and_compare(Layout::Original, &no_index, &cfg, &r));
}

#[test]
fn beit_shared_table_is_used_by_every_block() {
    // An original checkpoint with one shared table behaves like per-block copies of it.
    let w = load("beit_tiny_ft.safetensors");
    let r = reference("ref_beit_tiny_ft_112.safetensors");
    let cfg = cfg_for(Layout::Original, &w, &r, None);
    let mut shared = w.clone();
    shared.retain(|k, _| !k.contains("relative_position"));
    let table = w["blocks.0.attn.relative_position_bias_table"].clone();
    shared.insert("rel_pos_bias.relative_position_bias_table".into(), table.clone());
    let mut copies = shared.clone();
    copies.remove("rel_pos_bias.relative_position_bias_table");
    for i in 0..cfg.depth {
        copies.insert(format!("blocks.{i}.attn.relative_position_bias_table"), table.clone());
    }
    let a = original_forward(&shared, &cfg, &r.input).unwrap();
    let b = original_forward(&copies, &cfg, &r.input).unwrap();
    let rep = compare(&a, &b, &Tolerance { max_rel: 0.0, min_cosine: 1.0 - 1e-12 }).unwrap();
    assert!(rep.iter().all(|r| r.passed), "{rep:#?}");
}

#[test]
fn mae_mmseg_layout_matches_timm() {
    let orig = load("mae_tiny.safetensors");
    let r = reference("ref_mae_tiny_112.safetensors");
    let ocfg = cfg_for(Layout::Original, &orig, &r, Some(2));
    let w = to_mmseg(&orig, &ocfg);
    let cfg = cfg_for(Layout::MMSeg, &w, &r, None); // heads now from the zero tables
    assert_eq!(cfg, ocfg);
    assert_pass("mae mmseg", &run_and_compare(Layout::MMSeg, &w, &cfg, &r));
}

#[test]
fn beit_mmseg_layout_matches_timm() {
    let orig = load("beit_tiny_ft.safetensors");
    let r = reference("ref_beit_tiny_ft_112.safetensors");
    let w = to_mmseg(&orig, &cfg_for(Layout::Original, &orig, &r, None));
    let cfg = cfg_for(Layout::MMSeg, &w, &r, None);
    assert_pass("beit-ft mmseg", &run_and_compare(Layout::MMSeg, &w, &cfg, &r));
}

// ---------------------------------------------------------------------------------------
// The check can fail: broken conversions land far outside the tolerance
// ---------------------------------------------------------------------------------------

fn broken_mmseg(
    label: &str,
    factor: f64,
    w: &WeightMap,
    cfg: &BackboneConfig,
    r: &Reference,
    edit: impl FnOnce(&mut WeightMap),
) {
    let mut w = w.clone();
    edit(&mut w);
    assert_broken(label, &run_and_compare(Layout::MMSeg, &w, cfg, r), factor);
}

fn mae_mmseg() -> (WeightMap, BackboneConfig, Reference) {
    let orig = load("mae_tiny.safetensors");
    let r = reference("ref_mae_tiny_112.safetensors");
    let cfg = cfg_for(Layout::Original, &orig, &r, Some(2));
    (to_mmseg(&orig, &cfg), cfg, r)
}

fn beit_mmseg() -> (WeightMap, BackboneConfig, Reference) {
    let orig = load("beit_tiny_ft.safetensors");
    let r = reference("ref_beit_tiny_ft_112.safetensors");
    let cfg = cfg_for(Layout::Original, &orig, &r, None);
    (to_mmseg(&orig, &cfg), cfg, r)
}

fn swap(w: &mut WeightMap, a: &str, b: &str) {
    let ta = w.remove(a).unwrap();
    let tb = w.remove(b).unwrap();
    w.insert(a.to_string(), tb);
    w.insert(b.to_string(), ta);
}

fn zero(w: &mut WeightMap, key: &str) {
    let t = w[key].zeros_like().unwrap();
    w.insert(key.to_string(), t);
}

#[test]
fn broken_mae_conversions_fail() {
    let (w, cfg, r) = mae_mmseg();
    // fc1 and fc2 exchanged (transposed so the shapes fit), in block 0.
    broken_mmseg("mae fc1<->fc2 transposed, block 0", 100.0, &w, &cfg, &r, |w| {
        let f1 = w["layers.0.ffn.layers.0.0.weight"].t().unwrap().contiguous().unwrap();
        let f2 = w["layers.0.ffn.layers.1.weight"].t().unwrap().contiguous().unwrap();
        w.insert("layers.0.ffn.layers.0.0.weight".into(), f2);
        w.insert("layers.0.ffn.layers.1.weight".into(), f1);
    });
    // fc1 weights of two blocks exchanged (a block-number mix-up).
    broken_mmseg("mae fc1 of blocks 0 and 1 swapped", 100.0, &w, &cfg, &r, |w| {
        swap(w, "layers.0.ffn.layers.0.0.weight", "layers.1.ffn.layers.0.0.weight")
    });
    // qkv bias dropped (what loading MAE weights into MMSeg's BEiT does).
    broken_mmseg("mae qkv.bias zeroed", 100.0, &w, &cfg, &r, |w| {
        for i in 0..cfg.depth {
            zero(w, &format!("layers.{i}.attn.qkv.bias"));
        }
    });
    // pos_embed grid transposed (rows and columns of patches exchanged).
    broken_mmseg("mae pos_embed grid transposed", 100.0, &w, &cfg, &r, |w| {
        let pe = &w["pos_embed"];
        let g = cfg.grid();
        let cls = pe.narrow(1, 0, 1).unwrap();
        let grid = pe
            .narrow(1, 1, g * g)
            .unwrap()
            .reshape((1, g, g, cfg.embed_dim))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((1, g * g, cfg.embed_dim))
            .unwrap();
        w.insert("pos_embed".into(), Tensor::cat(&[&cls, &grid], 1).unwrap());
    });
    // q and k rows of the fused projection exchanged.
    broken_mmseg("mae q/k rows swapped in qkv", 100.0, &w, &cfg, &r, |w| {
        let d = cfg.embed_dim;
        for i in 0..cfg.depth {
            for suffix in ["weight", "bias"] {
                let key = format!("layers.{i}.attn.qkv.{suffix}");
                let t = &w[&key];
                let (q, k, v) =
                    (t.narrow(0, 0, d).unwrap(), t.narrow(0, d, d).unwrap(), t.narrow(0, 2 * d, d).unwrap());
                w.insert(key, Tensor::cat(&[&k, &q, &v], 0).unwrap());
            }
        }
    });
    // gamma = 0.1 (the config's init_values default) instead of the 1.0 MAE needs.
    broken_mmseg("mae gamma 0.1 instead of 1", 100.0, &w, &cfg, &r, |w| {
        for i in 0..cfg.depth {
            for g in ["gamma_1", "gamma_2"] {
                let key = format!("layers.{i}.{g}");
                let t = w[&key].affine(0.1, 0.0).unwrap();
                w.insert(key, t);
            }
        }
    });
}

#[test]
fn broken_beit_conversions_fail() {
    let (w, cfg, r) = beit_mmseg();
    broken_mmseg("beit fc1<->fc2 transposed, block 0", 100.0, &w, &cfg, &r, |w| {
        let f1 = w["layers.0.ffn.layers.0.0.weight"].t().unwrap().contiguous().unwrap();
        let f2 = w["layers.0.ffn.layers.1.weight"].t().unwrap().contiguous().unwrap();
        w.insert("layers.0.ffn.layers.0.0.weight".into(), f2);
        w.insert("layers.0.ffn.layers.1.weight".into(), f1);
    });
    broken_mmseg("beit fc1 of blocks 0 and 1 swapped", 100.0, &w, &cfg, &r, |w| {
        swap(w, "layers.0.ffn.layers.0.0.weight", "layers.1.ffn.layers.0.0.weight")
    });
    // The tiny BEiT has gamma ~0.1, so each block adds little to the residual stream (the
    // patch embedding dominates the outputs), and the q/v biases (rms 0.08) and the tables move
    // the outputs least: measured max_rel 2.2e-3 .. 3.2e-3, 20-30x the tolerance and ~3000x
    // the pass cases' error. They fail clearly, just not by 100x.
    broken_mmseg("beit q_bias and v_bias zeroed", 10.0, &w, &cfg, &r, |w| {
        for i in 0..cfg.depth {
            zero(w, &format!("layers.{i}.attn.q_bias"));
            zero(w, &format!("layers.{i}.attn.v_bias"));
        }
    });
    broken_mmseg("beit relative tables zeroed", 10.0, &w, &cfg, &r, |w| {
        for i in 0..cfg.depth {
            zero(w, &format!("layers.{i}.attn.relative_position_bias_table"));
        }
    });
    broken_mmseg("beit relative tables of blocks 0 and 1 swapped", 10.0, &w, &cfg, &r, |w| {
        swap(w, "layers.0.attn.relative_position_bias_table", "layers.1.attn.relative_position_bias_table")
    });
    broken_mmseg("beit gamma = 1 instead of the checkpoint's", 100.0, &w, &cfg, &r, |w| {
        for i in 0..cfg.depth {
            for g in ["gamma_1", "gamma_2"] {
                let key = format!("layers.{i}.{g}");
                let t = w[&key].ones_like().unwrap();
                w.insert(key, t);
            }
        }
    });
}

// ---------------------------------------------------------------------------------------
// Errors that name the key and the fix
// ---------------------------------------------------------------------------------------

#[test]
fn plain_rename_without_load_ready_tensors_is_an_error_naming_key_and_flag() {
    let (w, cfg, r) = mae_mmseg();
    let mut no_table = w.clone();
    no_table.remove("layers.2.attn.relative_position_bias_table");
    let e = mmseg_forward(&no_table, &cfg, &r.input).unwrap_err().to_string();
    assert!(e.contains("layers.2.attn.relative_position_bias_table") && e.contains("--img-size"), "{e}");

    let mut no_gamma = w.clone();
    no_gamma.remove("layers.3.gamma_2");
    let e = mmseg_forward(&no_gamma, &cfg, &r.input).unwrap_err().to_string();
    assert!(e.contains("layers.3.gamma_2") && e.contains("--img-size"), "{e}");

    // An index that is not MMSeg's for this window.
    let mut bad_index = w.clone();
    let idx = relative_position_index(cfg.grid(), &Device::Cpu).unwrap().t().unwrap().contiguous().unwrap();
    bad_index.insert("layers.1.attn.relative_position_index".into(), idx);
    let e = mmseg_forward(&bad_index, &cfg, &r.input).unwrap_err().to_string();
    assert!(e.contains("layers.1.attn.relative_position_index"), "{e}");
    // The right one is accepted.
    let mut good_index = w.clone();
    good_index.insert(
        "layers.1.attn.relative_position_index".into(),
        relative_position_index(cfg.grid(), &Device::Cpu).unwrap(),
    );
    mmseg_forward(&good_index, &cfg, &r.input).unwrap();
}

#[test]
fn size_mismatches_are_errors_not_panics() {
    let (w, cfg, _) = beit_mmseg();
    // A table for another window (a conversion that forgot to resize).
    let mut big = cfg.clone();
    big.img_size = 224;
    let input = deterministic_input(224, &Device::Cpu).unwrap();
    let e = mmseg_forward(&w, &big, &input).unwrap_err().to_string();
    assert!(e.contains("relative_position_bias_table") && e.contains("img_size 224"), "{e}");
    // An input of the wrong size.
    let small = deterministic_input(96, &Device::Cpu).unwrap();
    let e = mmseg_forward(&w, &cfg, &small).unwrap_err().to_string();
    assert!(e.contains("[B, 3, 112, 112]"), "{e}");

    let (w, cfg, _) = mae_mmseg();
    let mut big = cfg.clone();
    big.img_size = 224;
    let mut w2 = w.clone();
    w2.retain(|k, _| !k.contains("relative_position"));
    for i in 0..cfg.depth {
        w2.insert(
            format!("layers.{i}.attn.relative_position_bias_table"),
            Tensor::zeros((big.table_rows(), 2), DType::F32, &Device::Cpu).unwrap(),
        );
    }
    let e = mmseg_forward(&w2, &big, &input).unwrap_err().to_string();
    assert!(e.contains("pos_embed") && e.contains("[1, 197, 32]"), "{e}");
}

#[test]
fn infer_reads_the_fixture_configs() {
    let (w, cfg, _) = beit_mmseg();
    let c = BackboneConfig::infer_mmseg(&w, None, None, None).unwrap();
    assert_eq!(
        (c.arch, c.img_size, c.patch_size, c.embed_dim, c.depth, c.num_heads, c.mlp_hidden),
        (Arch::Beit, 112, 16, 32, 4, 2, 128)
    );
    assert_eq!(c.out_indices, vec![0, 1, 2, 3]);
    let e = BackboneConfig::infer_mmseg(&w, None, Some(4), None).unwrap_err().to_string();
    assert!(e.contains("contradicts"), "{e}");
    let e = BackboneConfig::infer_mmseg(&w, Some(100), None, None).unwrap_err().to_string();
    assert!(e.contains("multiple"), "{e}");
    let e = BackboneConfig::infer_mmseg(&w, None, None, Some(vec![4])).unwrap_err().to_string();
    assert!(e.contains("past the last block"), "{e}");
    // Original-layout weights are not MMSeg-layout weights.
    let e = BackboneConfig::infer_mmseg(&load("beit_tiny_ft.safetensors"), None, None, None).unwrap_err().to_string();
    assert!(e.contains("patch_embed.projection.weight"), "{e}");
    let _ = cfg;
}

// ---------------------------------------------------------------------------------------
// Against a naive scalar implementation (independent of candle), on random weights
// ---------------------------------------------------------------------------------------

fn vals(w: &WeightMap, k: &str) -> Vec<f64> {
    w[k].to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): independent of candle's.
fn erf(x: f64) -> f64 {
    let s = x.signum();
    let x = x.abs();
    let t = 1.0 / (1.0 + 0.3275911 * x);
    let y = 1.0
        - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592)
            * t
            * (-x * x).exp();
    s * y
}

fn naive_forward(w: &WeightMap, cfg: &BackboneConfig, img: &[f64]) -> Vec<(usize, Vec<f64>)> {
    let (d, p, g, hs, nh) = (cfg.embed_dim, cfg.patch_size, cfg.grid(), cfg.mlp_hidden, cfg.num_heads);
    let n = cfg.img_size;
    let t = g * g + 1;
    let hd = d / nh;
    let pw = vals(w, "patch_embed.projection.weight");
    let pb = vals(w, "patch_embed.projection.bias");
    let mut x = vec![vec![0f64; d]; t];
    x[0] = vals(w, "cls_token");
    for py in 0..g {
        for px in 0..g {
            let tok = &mut x[1 + py * g + px];
            for o in 0..d {
                let mut s = pb[o];
                for c in 0..3 {
                    for ky in 0..p {
                        for kx in 0..p {
                            s += pw[((o * 3 + c) * p + ky) * p + kx] * img[(c * n + py * p + ky) * n + px * p + kx];
                        }
                    }
                }
                tok[o] = s;
            }
        }
    }
    if cfg.arch == Arch::Mae {
        let pe = vals(w, "pos_embed");
        for (i, tok) in x.iter_mut().enumerate() {
            for o in 0..d {
                tok[o] += pe[i * d + o];
            }
        }
    }
    let ln = |v: &[f64], wt: &[f64], b: &[f64]| -> Vec<f64> {
        let m = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / v.len() as f64;
        v.iter().enumerate().map(|(i, a)| (a - m) / (var + cfg.ln_eps).sqrt() * wt[i] + b[i]).collect()
    };
    let lin = |v: &[f64], wt: &[f64], b: &[f64], out: usize| -> Vec<f64> {
        (0..out).map(|o| b[o] + (0..v.len()).map(|i| wt[o * v.len() + i] * v[i]).sum::<f64>()).collect()
    };
    let index: Vec<i64> = relative_position_index(g, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let mut outs = Vec::new();
    for l in 0..cfg.depth {
        let k = |s: &str| format!("layers.{l}.{s}");
        let (l1w, l1b) = (vals(w, &k("ln1.weight")), vals(w, &k("ln1.bias")));
        let qkvw = vals(w, &k("attn.qkv.weight"));
        let qkvb = match cfg.arch {
            Arch::Mae => vals(w, &k("attn.qkv.bias")),
            Arch::Beit => [vals(w, &k("attn.q_bias")), vec![0.0; d], vals(w, &k("attn.v_bias"))].concat(),
        };
        let table = vals(w, &k("attn.relative_position_bias_table"));
        let y: Vec<Vec<f64>> = x.iter().map(|v| lin(&ln(v, &l1w, &l1b), &qkvw, &qkvb, 3 * d)).collect();
        let mut att = vec![vec![0f64; d]; t];
        for h in 0..nh {
            for i in 0..t {
                let logits: Vec<f64> = (0..t)
                    .map(|j| {
                        let dot: f64 = (0..hd).map(|e| y[i][h * hd + e] * y[j][d + h * hd + e]).sum();
                        dot / (hd as f64).sqrt() + table[index[i * t + j] as usize * nh + h]
                    })
                    .collect();
                let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = logits.iter().map(|a| (a - m).exp()).collect();
                let s: f64 = e.iter().sum();
                for e2 in 0..hd {
                    att[i][h * hd + e2] = (0..t).map(|j| e[j] / s * y[j][2 * d + h * hd + e2]).sum();
                }
            }
        }
        let (pjw, pjb) = (vals(w, &k("attn.proj.weight")), vals(w, &k("attn.proj.bias")));
        let (g1, g2) = (vals(w, &k("gamma_1")), vals(w, &k("gamma_2")));
        let (l2w, l2b) = (vals(w, &k("ln2.weight")), vals(w, &k("ln2.bias")));
        let (f1w, f1b) = (vals(w, &k("ffn.layers.0.0.weight")), vals(w, &k("ffn.layers.0.0.bias")));
        let (f2w, f2b) = (vals(w, &k("ffn.layers.1.weight")), vals(w, &k("ffn.layers.1.bias")));
        for i in 0..t {
            let a = lin(&att[i], &pjw, &pjb, d);
            for o in 0..d {
                x[i][o] += g1[o] * a[o];
            }
            let hdn: Vec<f64> = lin(&ln(&x[i], &l2w, &l2b), &f1w, &f1b, hs)
                .into_iter()
                .map(|v| 0.5 * v * (1.0 + erf(v / std::f64::consts::SQRT_2)))
                .collect();
            let f = lin(&hdn, &f2w, &f2b, d);
            for o in 0..d {
                x[i][o] += g2[o] * f[o];
            }
        }
        if cfg.out_indices.contains(&l) {
            // NCHW: [c][py][px]
            let mut m = vec![0f64; d * g * g];
            for pi in 0..g * g {
                for c in 0..d {
                    m[c * g * g + pi] = x[1 + pi][c];
                }
            }
            outs.push((l, m));
        }
    }
    outs
}

#[test]
fn mmseg_forward_matches_a_naive_scalar_implementation() {
    for arch in [Arch::Mae, Arch::Beit] {
        let cfg = BackboneConfig {
            arch,
            img_size: 48,
            patch_size: 16,
            embed_dim: 16,
            depth: 3,
            num_heads: 2,
            mlp_hidden: 24,
            out_indices: vec![2, 0],
            ln_eps: 1e-6,
        };
        let w = random_weights(&cfg, Layout::MMSeg, 7, &Device::Cpu).unwrap();
        let input = deterministic_input(48, &Device::Cpu).unwrap();
        let img: Vec<f64> = input.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let ours = mmseg_forward(&w, &cfg, &input).unwrap();
        assert_eq!(ours.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![2, 0]);
        let naive: Vec<(usize, Tensor)> = naive_forward(&w, &cfg, &img)
            .into_iter()
            .map(|(i, v)| (i, Tensor::from_vec(v, (1, 16, 3, 3), &Device::Cpu).unwrap()))
            .collect();
        let rep = compare(&ours, &naive, &Tolerance::default()).unwrap();
        let (rel, _) = worst(&rep);
        eprintln!("PASS-CASE naive {arch}: max_rel {rel:.3e}");
        assert!(rep.iter().all(|r| r.passed), "{arch}: {rep:#?}");
        assert_eq!(rep.len(), 2);
    }
}

#[test]
fn random_weights_infer_back_and_run_in_both_layouts() {
    for arch in [Arch::Mae, Arch::Beit] {
        let mut cfg = BackboneConfig::vit_base(arch, 64);
        cfg.embed_dim = 64;
        cfg.num_heads = 4;
        cfg.mlp_hidden = 96;
        cfg.depth = 3;
        cfg.out_indices = BackboneConfig::default_out_indices(3);
        let m = random_mmseg_weights(&cfg, &Device::Cpu).unwrap();
        assert_eq!(BackboneConfig::infer_mmseg(&m, None, None, None).unwrap(), cfg);
        let o = random_weights(&cfg, Layout::Original, 0, &Device::Cpu).unwrap();
        assert_eq!(BackboneConfig::infer_original(&o, None, None, None).unwrap(), cfg);
        // Same seed, same values: the two layouts compute the same thing.
        let x = deterministic_input(64, &Device::Cpu).unwrap();
        let a = mmseg_forward(&m, &cfg, &x).unwrap();
        let b = original_forward(&o, &cfg, &x).unwrap();
        let rep = compare(&a, &b, &Tolerance { max_rel: 0.0, min_cosine: 1.0 - 1e-12 }).unwrap();
        assert!(rep.iter().all(|r| r.passed), "{rep:#?}");
        assert_eq!(a[0].1.dims(), &[1, 64, 4, 4]);
    }
}

#[test]
fn device_names() {
    assert!(matches!(device("cpu").unwrap(), Device::Cpu));
    assert!(device("tpu").unwrap_err().to_string().contains("unknown device"));
    assert!(device("cuda:x").unwrap_err().to_string().contains("cuda:N"));
    #[cfg(not(feature = "cuda"))]
    assert!(device("cuda").unwrap_err().to_string().contains("without the `cuda` feature"));
}

/// Rough CPU timing of a ViT-B/16 at 224 (random weights). Run with
/// `cargo test --release --lib verify::tests::vit_b_timing -- --ignored --nocapture`.
#[test]
#[ignore]
fn vit_b_timing() {
    for arch in [Arch::Mae, Arch::Beit] {
        let cfg = BackboneConfig::vit_base(arch, 224);
        let t0 = std::time::Instant::now();
        let w = random_mmseg_weights(&cfg, &Device::Cpu).unwrap();
        let gen = t0.elapsed();
        let x = deterministic_input(224, &Device::Cpu).unwrap();
        mmseg_forward(&w, &cfg, &x).unwrap(); // warm-up
        let n = 3;
        let t1 = std::time::Instant::now();
        for _ in 0..n {
            mmseg_forward(&w, &cfg, &x).unwrap();
        }
        eprintln!("TIMING vit-b/16 {arch} 224: weights {:.2?}, forward {:.2?} per image", gen, t1.elapsed() / n);
    }
    // The same machine's plain matmul throughput, to tell overhead from arithmetic:
    // ViT-B/16 at 224 is ~35 GFLOP (2 per multiply-add), almost all in such matmuls.
    let a = Tensor::ones((197, 768), DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::ones((768, 3072), DType::F32, &Device::Cpu).unwrap();
    a.matmul(&b).unwrap();
    let t = std::time::Instant::now();
    for _ in 0..20 {
        a.matmul(&b).unwrap();
    }
    let secs = t.elapsed().as_secs_f64() / 20.0;
    eprintln!(
        "TIMING matmul 197x768x3072: {:.2} GFLOP/s -> ~{:.2} s for ViT-B/16 at 224 if matmul-bound",
        2.0 * 197.0 * 768.0 * 3072.0 / secs / 1e9,
        35.0e9 / (2.0 * 197.0 * 768.0 * 3072.0 / secs)
    );
}
