//! Weights for the candle backbones, read from a checkpoint file, and the two checks the CLI
//! runs: against a PyTorch reference file, or against the original checkpoint.

use candle_core::{DType as CDType, Device, Tensor};

use super::{
    compare, deterministic_input, mmseg_forward, original_forward, relative_position_index, source_forward,
    SourceFamily,
};
use super::{Arch, BackboneConfig, OutputReport, Reference, Tolerance, VerifyError, WeightMap};
use crate::dtype::decode_f64;
use crate::formats::checkpoint::Checkpoint;
use crate::DType;

/// Reads the state dict of `ckpt` (found automatically) into a weight map: floats as f32,
/// integers as i64. A `module.` prefix on every key is removed.
pub fn weights_from_checkpoint(ckpt: &Checkpoint, device: &Device) -> super::Result<WeightMap> {
    read_weights(ckpt, device, |_| None).map(|(w, _)| w)
}

/// Reads the original checkpoint `ckpt` in its own family's names (see [`SourceFamily`]):
/// the weights renamed for the model that runs them, and the family. Only the tensors that
/// model reads are read; official layouts are read exactly as [`weights_from_checkpoint`].
pub fn original_weights(ckpt: &Checkpoint, device: &Device) -> super::Result<(WeightMap, SourceFamily)> {
    let (mut w, family) = read_weights(ckpt, device, |names| {
        let family = SourceFamily::recognise(names.iter().map(String::as_str)).ok_or_else(|| {
            VerifyError::Config(format!(
                "{}: cannot tell which layout the original is in: none of its keys is a patch embedding of a known family \
                 (patch_embed.proj.weight: official MAE/BEiT; [vit.|beit.|data2vec_vision.]embeddings.patch_embeddings.projection.weight: \
                 Hugging Face; backbone.patch_embed.projection.weight: mmpretrain / MMSeg segmentor; patch_embed.projection.weight: MMSeg)",
                ckpt.path().display()
            ))
        });
        Some(family)
    })?;
    let family = family.expect("read_weights returns the family it was given");
    family.assemble(&mut w).map_err(|e| family.explain(e))?;
    Ok((w, family))
}

/// The converted checkpoint's weights: the MMSeg layout, at the top level or under a
/// segmentor's `backbone.` (then only the backbone is read).
fn converted_weights(ckpt: &Checkpoint, device: &Device) -> super::Result<WeightMap> {
    let (w, _) = read_weights(ckpt, device, |names| {
        let top = names.iter().any(|n| n == "patch_embed.projection.weight");
        let under = names.iter().any(|n| n == "backbone.patch_embed.projection.weight");
        (!top && under).then_some(Ok(SourceFamily::Segmentor))
    })?;
    Ok(w)
}

/// Reads the tensors of `ckpt`'s state dict. `family` sees every name (after a common
/// `module.` is removed) and may pick a family, whose [`SourceFamily::rename`] then says
/// which tensors are read and under which names; with none every tensor is read as named.
fn read_weights(
    ckpt: &Checkpoint,
    device: &Device,
    family: impl FnOnce(&[String]) -> Option<super::Result<SourceFamily>>,
) -> super::Result<(WeightMap, Option<SourceFamily>)> {
    let root = crate::inspect::find_state_dict(ckpt).unwrap_or("");
    let entries = ckpt.tensors_under(root).unwrap_or_default();
    let all_module = !entries.is_empty() && entries.iter().all(|t| t.name.starts_with("module."));
    let names: Vec<String> = entries
        .iter()
        .map(|t| if all_module { t.name["module.".len()..].to_string() } else { t.name.clone() })
        .collect();
    let family = family(&names).transpose()?;
    let mut w = WeightMap::new();
    for (t, name) in entries.into_iter().zip(names) {
        let name = match &family {
            None => name,
            Some(f) => match f.rename(&name) {
                Some(n) => n,
                None => continue,
            },
        };
        let io = |e: std::io::Error| VerifyError::Io { path: ckpt.path().display().to_string(), source: e };
        let bytes = ckpt.read(t.view).map_err(io)?;
        let shape = t.view.shape.clone();
        let tensor = match t.view.dtype {
            d if d.is_float() => {
                let v: Vec<f32> = match d {
                    DType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
                    _ => decode_f64(&bytes, d).into_iter().map(|x| x as f32).collect(),
                };
                Tensor::from_vec(v, shape, device)
            }
            d => {
                let v: Vec<i64> = decode_f64(&bytes, d).into_iter().map(|x| x as i64).collect();
                Tensor::from_vec(v, shape, device)
            }
        }
        .map_err(VerifyError::from)?;
        w.insert(name, tensor);
    }
    Ok((w, family))
}

/// Adds what MMSeg's constructor creates and a clean conversion does not carry: for MAE, zero
/// relative-position tables and gammas of `init_values`; for both, the relative-position
/// index of the configured window. Returns the keys it added.
pub fn add_load_time_defaults(w: &mut WeightMap, cfg: &BackboneConfig, init_values: f64) -> super::Result<Vec<String>> {
    let device = w.values().next().map(|t| t.device().clone()).unwrap_or(Device::Cpu);
    let mut added = Vec::new();
    for i in 0..cfg.depth {
        let table = format!("layers.{i}.attn.relative_position_bias_table");
        if cfg.arch == Arch::Mae && !w.contains_key(&table) {
            w.insert(table.clone(), Tensor::zeros((cfg.table_rows(), cfg.num_heads), CDType::F32, &device)?);
            added.push(table);
        }
        let index = format!("layers.{i}.attn.relative_position_index");
        if !w.contains_key(&index) {
            w.insert(index.clone(), relative_position_index(cfg.grid(), &device)?);
            added.push(index);
        }
        for g in ["gamma_1", "gamma_2"] {
            let key = format!("layers.{i}.{g}");
            if cfg.arch == Arch::Mae && !w.contains_key(&key) {
                w.insert(key.clone(), (Tensor::ones(cfg.embed_dim, CDType::F32, &device)? * init_values)?);
                added.push(key);
            }
        }
    }
    Ok(added)
}

/// The outcome of one check.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VerifyOutcome {
    /// What the converted weights were compared with.
    pub against: String,
    pub arch: String,
    pub img_size: usize,
    pub out_indices: Vec<usize>,
    pub tolerance: Tolerance,
    /// Keys added as MMSeg's constructor would hold them (clean conversions).
    pub filled_defaults: usize,
    pub outputs: Vec<OutputReport>,
    pub passed: bool,
}

/// Options shared by both checks.
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    pub img_size: Option<usize>,
    pub num_heads: Option<usize>,
    pub out_indices: Option<Vec<usize>>,
    pub tolerance: Tolerance,
    pub init_values: f64,
}

fn outcome(
    against: String,
    cfg: &BackboneConfig,
    filled: usize,
    outputs: Vec<OutputReport>,
    tol: Tolerance,
) -> VerifyOutcome {
    let passed = !outputs.is_empty() && outputs.iter().all(|o| o.passed);
    VerifyOutcome {
        against,
        arch: cfg.arch.to_string(),
        img_size: cfg.img_size,
        out_indices: cfg.out_indices.clone(),
        tolerance: tol,
        filled_defaults: filled,
        outputs,
        passed,
    }
}

/// Runs the MMSeg backbone on the converted weights with the reference's input and compares
/// with the reference's outputs.
pub fn verify_with_reference(
    converted: &Checkpoint,
    reference: &std::path::Path,
    opts: &VerifyOptions,
    device: &Device,
) -> super::Result<VerifyOutcome> {
    let r = Reference::load(reference, device)?;
    let mut w = converted_weights(converted, device)?;
    let img = opts.img_size.unwrap_or(r.img_size());
    let heads = opts.num_heads.or(r.meta_usize("num_heads")?);
    let indices = opts.out_indices.clone().unwrap_or_else(|| r.out_indices());
    let cfg = BackboneConfig::infer_mmseg(&w, Some(img), heads, Some(indices))?;
    let filled = add_load_time_defaults(&mut w, &cfg, opts.init_values)?.len();
    let ours = mmseg_forward(&w, &cfg, &r.input)?;
    let reports = compare(&ours, &r.outputs, &opts.tolerance)?;
    Ok(outcome(format!("reference {}", reference.display()), &cfg, filled, reports, opts.tolerance))
}

/// Runs the original in its own family's layout ([`original_weights`]: official, Hugging
/// Face, mmpretrain, segmentor or MMSeg names, read by verify's own code, not the mapping
/// tables) and the MMSeg backbone on the converted weights, on the same deterministic input,
/// and compares.
pub fn verify_against_original(
    converted: &Checkpoint,
    original: &Checkpoint,
    opts: &VerifyOptions,
    device: &Device,
) -> super::Result<VerifyOutcome> {
    let (mut wo, family) = original_weights(original, device)?;
    // A conversion cast to a narrower float type is checked against the original rounded the
    // same way, so the check is about the mapping (which must be exact), not the rounding
    // (tested against torch's `.half()` in the test suite).
    let narrowed = narrower_float_dtype(converted, original);
    if let Some(d) = narrowed {
        round_floats(&mut wo, d)?;
    }
    let ocfg = BackboneConfig::infer(family.layout(), &wo, None, opts.num_heads, opts.out_indices.clone())
        .map_err(|e| family.explain(e))?;
    if let Some(n) = opts.img_size {
        if n != ocfg.img_size {
            return Err(VerifyError::Config(format!(
                "--against runs the original at its native size {}; --img-size {n} differs (convert without --img-size to check against the original, or use --reference)",
                ocfg.img_size
            )));
        }
    }
    let input = deterministic_input(ocfg.img_size, device)?;
    // What MMSeg itself loads (segmentors, MMSeg-layout files) gets what MMSeg's constructor
    // adds, as the converted side does; other families run as their own model stored them.
    if family.mmseg_semantics() {
        add_load_time_defaults(&mut wo, &ocfg, opts.init_values)?;
    }
    let expected = match family {
        SourceFamily::Official => original_forward(&wo, &ocfg, &input)?,
        _ => source_forward(&wo, &ocfg, family.layout(), &input).map_err(|e| family.explain(e))?,
    };
    drop(wo);
    let mut w = converted_weights(converted, device)?;
    let cfg =
        BackboneConfig::infer_mmseg(&w, Some(ocfg.img_size), Some(ocfg.num_heads), Some(ocfg.out_indices.clone()))?;
    let filled = add_load_time_defaults(&mut w, &cfg, opts.init_values)?.len();
    let ours = mmseg_forward(&w, &cfg, &input)?;
    let reports = compare(&ours, &expected, &opts.tolerance)?;
    let rounded = narrowed.map(|d| format!(" (weights rounded to {})", d.name())).unwrap_or_default();
    let layout = match family {
        SourceFamily::Official => String::new(),
        f => format!(", {}", f.describe()),
    };
    Ok(outcome(
        format!("original {}{rounded}{layout}", original.path().display()),
        &cfg,
        filled,
        reports,
        opts.tolerance,
    ))
}

/// The float type of `converted`'s tensors when it is narrower than every float tensor of
/// `original` (f16 or bf16 from f32, say).
fn narrower_float_dtype(converted: &Checkpoint, original: &Checkpoint) -> Option<DType> {
    let floats =
        |c: &Checkpoint| -> Vec<DType> { c.tensors().iter().map(|t| t.view.dtype).filter(|d| d.is_float()).collect() };
    let conv = floats(converted);
    let first = *conv.first()?;
    let narrow = matches!(first, DType::F16 | DType::BF16) && conv.iter().all(|&d| d == first);
    let wider = floats(original).iter().all(|d| d.size() > first.size());
    (narrow && wider).then_some(first)
}

/// Rounds every float tensor of `w` to `dtype` and back to f32 (round to nearest even).
fn round_floats(w: &mut WeightMap, dtype: DType) -> super::Result<()> {
    let to = match dtype {
        DType::F16 => CDType::F16,
        DType::BF16 => CDType::BF16,
        _ => return Ok(()),
    };
    for t in w.values_mut() {
        if t.dtype() == CDType::F32 {
            *t = t.to_dtype(to)?.to_dtype(CDType::F32)?;
        }
    }
    Ok(())
}
