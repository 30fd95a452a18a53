//! The original checkpoint read in its own family's names, for `verify --against` and
//! `convert --verify`.
//!
//! A conversion is checked by running the original next to the converted weights, so the
//! original must be read without the mapping tables: a wrong table must not be able to make
//! both sides wrong the same way. This module recognises the family that wrote a checkpoint
//! from its key names and gives its weights the names of the model verify runs it with,
//! written out here once per family:
//!
//! | family | fingerprint | run as |
//! |---|---|---|
//! | official MAE (timm / facebookresearch) and unilm BEiT | `patch_embed.proj.weight` | the original-layout model, names as stored (no copies) |
//! | Hugging Face ViTMAE / ViT / BEiT / Data2VecVision | `[vit.\|beit.\|data2vec_vision.]embeddings.patch_embeddings.projection.weight` | the original-layout model: `query`/`key`/`value` concatenated here in q, k, v order (key bias present: full `qkv.bias`, else `q_bias`/`v_bias`), `lambda_1/2` as `gamma_1/2`, `encoder.relative_position_bias` as the shared table |
//! | mmpretrain / mmselfsup 1.x pretraining | `backbone.patch_embed.projection.weight`, no `decode_head.` | MMSeg names read as stored: `backbone.` removed, the shared `rel_pos_bias` table used by every block, absent gammas = 1 (MAE has no layer scale), `attn.gamma1.weight`/`ffn.gamma2.weight` as `gamma_1/2` |
//! | MMSeg segmentor (0.x / 1.x) | `backbone.patch_embed.projection.weight` + `decode_head.` | MMSeg names: `backbone.` removed, what MMSeg's constructor adds filled in as for the converted side |
//! | already MMSeg (`beit2mmseg.py` output) | `patch_embed.projection.weight` | as a segmentor, without the prefix |
//!
//! Everything else in a file (decoders, heads, necks, tokenizers, final norms) is not read.

use candle_core::Tensor;

use super::config::{Layout, SHARED_INDEX, SHARED_TABLE};
use super::{VerifyError, WeightMap};

/// The family of a source checkpoint, recognised from its key names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceFamily {
    /// Official MAE (timm `VisionTransformer`) or unilm BEiT names: `blocks.i.norm1`, `patch_embed.proj`.
    Official,
    /// Hugging Face transformers ViTMAE / ViT / BEiT / Data2VecVision under `prefix`
    /// (`""`, `vit.`, `beit.`, `data2vec_vision.`).
    HuggingFace { prefix: String },
    /// mmpretrain / mmselfsup 1.x pretraining: `backbone.` + MMSeg layer names.
    MmPretrain,
    /// An MMSeg segmentor: `backbone.` + MMSeg names, with decode heads.
    Segmentor,
    /// A file already in the MMSeg backbone layout.
    MMSeg,
}

const HF_PATCH: &str = "embeddings.patch_embeddings.projection.weight";

impl SourceFamily {
    /// Recognises the family from the key names (relative to the state-dict root).
    pub fn recognise<'a>(names: impl IntoIterator<Item = &'a str> + Clone) -> Option<SourceFamily> {
        let has = |k: &str| names.clone().into_iter().any(|n| n == k);
        if has("patch_embed.proj.weight") {
            return Some(SourceFamily::Official);
        }
        // The HF encoder's patch embedding; the prefix is whatever precedes it, provided the
        // same prefix has encoder layers (a ViTMAE decoder has no patch embedding).
        let mut hf: Vec<&str> = names
            .clone()
            .into_iter()
            .filter_map(|n| n.strip_suffix(HF_PATCH))
            .filter(|p| p.is_empty() || p.ends_with('.'))
            .filter(|p| names.clone().into_iter().any(|n| n.starts_with(&format!("{p}encoder.layer."))))
            .collect();
        hf.sort_by_key(|p| p.len());
        if let Some(p) = hf.first() {
            return Some(SourceFamily::HuggingFace { prefix: p.to_string() });
        }
        if has("backbone.patch_embed.projection.weight") {
            let heads =
                names.clone().into_iter().any(|n| n.starts_with("decode_head.") || n.starts_with("auxiliary_head."));
            return Some(if heads { SourceFamily::Segmentor } else { SourceFamily::MmPretrain });
        }
        if has("patch_embed.projection.weight") {
            return Some(SourceFamily::MMSeg);
        }
        None
    }

    /// A short name for messages and the check's report.
    pub fn describe(&self) -> String {
        match self {
            SourceFamily::Official => "official MAE/BEiT layout".to_string(),
            SourceFamily::HuggingFace { prefix } if prefix.is_empty() => "Hugging Face layout".to_string(),
            SourceFamily::HuggingFace { prefix } => format!("Hugging Face layout, prefix '{prefix}'"),
            SourceFamily::MmPretrain => "mmpretrain layout (backbone.)".to_string(),
            SourceFamily::Segmentor => "MMSeg segmentor (backbone.)".to_string(),
            SourceFamily::MMSeg => "MMSeg layout".to_string(),
        }
    }

    /// The names of the model the weights run in once renamed.
    pub fn layout(&self) -> Layout {
        match self {
            SourceFamily::Official | SourceFamily::HuggingFace { .. } => Layout::Original,
            _ => Layout::MMSeg,
        }
    }

    /// True when the source is what MMSeg itself loads (segmentors, MMSeg-layout files), so
    /// the tensors MMSeg's constructor creates are filled in as MMSeg would.
    pub fn mmseg_semantics(&self) -> bool {
        matches!(self, SourceFamily::Segmentor | SourceFamily::MMSeg)
    }

    /// The name a stored tensor gets in the model's layout; `None` = not read. For HF, q, k
    /// and v keep their own (temporary) names until [`SourceFamily::assemble`].
    pub fn rename(&self, name: &str) -> Option<String> {
        match self {
            SourceFamily::Official | SourceFamily::MMSeg => Some(name.to_string()),
            SourceFamily::MmPretrain | SourceFamily::Segmentor => {
                let rest = name.strip_prefix("backbone.")?;
                Some(mmpretrain_layer_scale(rest).unwrap_or_else(|| rest.to_string()))
            }
            SourceFamily::HuggingFace { prefix } => hf_rename(name.strip_prefix(prefix.as_str())?),
        }
    }

    /// Finishes the renamed weights: HF q/k/v concatenated in q, k, v order.
    pub fn assemble(&self, w: &mut WeightMap) -> super::Result<()> {
        if let SourceFamily::HuggingFace { prefix } = self {
            hf_assemble_qkv(w, prefix)?;
        }
        Ok(())
    }

    /// The key a weight of the model's layout was read from, for messages.
    pub fn source_key(&self, key: &str) -> String {
        match self {
            SourceFamily::Official | SourceFamily::MMSeg => key.to_string(),
            SourceFamily::MmPretrain | SourceFamily::Segmentor => format!("backbone.{key}"),
            SourceFamily::HuggingFace { prefix } => format!("{prefix}{}", hf_source_key(key)),
        }
    }

    /// An error about the model's weights, restated with the source's own key names.
    pub fn explain(&self, e: VerifyError) -> VerifyError {
        if *self == SourceFamily::Official {
            return e;
        }
        let layout = self.describe();
        match e {
            VerifyError::MissingKey { key, hint } => VerifyError::MissingKey {
                key: self.source_key(&key),
                hint: format!("{hint} (the original, read in the {layout})"),
            },
            VerifyError::Shape { key, got, expected, hint } => VerifyError::Shape {
                key: self.source_key(&key),
                got,
                expected,
                hint: if hint.is_empty() { format!("the original, read in the {layout}") } else { hint },
            },
            other => other,
        }
    }
}

/// mmpretrain's layer scale (`layer_scale_init_value > 0`): `layers.i.attn.gamma1.weight`
/// and `layers.i.ffn.gamma2.weight` are MMSeg's `layers.i.gamma_1` / `gamma_2`.
fn mmpretrain_layer_scale(rest: &str) -> Option<String> {
    let tail = rest.strip_prefix("layers.")?;
    let (i, what) = tail.split_once('.')?;
    i.parse::<usize>().ok()?;
    let g = match what {
        "attn.gamma1.weight" => "gamma_1",
        "ffn.gamma2.weight" => "gamma_2",
        _ => return None,
    };
    Some(format!("layers.{i}.{g}"))
}

/// HF layer names (after `encoder.layer.i.`) and the original-layout names (after `blocks.i.`).
const HF_LAYER: &[(&str, &str)] = &[
    ("layernorm_before.weight", "norm1.weight"),
    ("layernorm_before.bias", "norm1.bias"),
    ("layernorm_after.weight", "norm2.weight"),
    ("layernorm_after.bias", "norm2.bias"),
    ("attention.attention.query.weight", "attn.query.weight"),
    ("attention.attention.query.bias", "attn.query.bias"),
    ("attention.attention.key.weight", "attn.key.weight"),
    ("attention.attention.key.bias", "attn.key.bias"),
    ("attention.attention.value.weight", "attn.value.weight"),
    ("attention.attention.value.bias", "attn.value.bias"),
    ("attention.output.dense.weight", "attn.proj.weight"),
    ("attention.output.dense.bias", "attn.proj.bias"),
    ("intermediate.dense.weight", "mlp.fc1.weight"),
    ("intermediate.dense.bias", "mlp.fc1.bias"),
    ("output.dense.weight", "mlp.fc2.weight"),
    ("output.dense.bias", "mlp.fc2.bias"),
    ("lambda_1", "gamma_1"),
    ("lambda_2", "gamma_2"),
    ("attention.attention.relative_position_bias.relative_position_bias_table", "attn.relative_position_bias_table"),
    ("attention.attention.relative_position_bias.relative_position_index", "attn.relative_position_index"),
];

/// HF names outside the layers and the original-layout names.
const HF_TOP: &[(&str, &str)] = &[
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.patch_embeddings.projection.weight", "patch_embed.proj.weight"),
    ("embeddings.patch_embeddings.projection.bias", "patch_embed.proj.bias"),
    ("encoder.relative_position_bias.relative_position_bias_table", SHARED_TABLE),
    ("encoder.relative_position_bias.relative_position_index", SHARED_INDEX),
];

fn hf_rename(rest: &str) -> Option<String> {
    if let Some(&(_, to)) = HF_TOP.iter().find(|(from, _)| *from == rest) {
        return Some(to.to_string());
    }
    let (i, what) = rest.strip_prefix("encoder.layer.")?.split_once('.')?;
    i.parse::<usize>().ok()?;
    let &(_, to) = HF_LAYER.iter().find(|(from, _)| *from == what)?;
    Some(format!("blocks.{i}.{to}"))
}

/// The HF name (without prefix) of an original-layout key, including the assembled ones.
fn hf_source_key(key: &str) -> String {
    if let Some(&(from, _)) = HF_TOP.iter().find(|(_, to)| *to == key) {
        return from.to_string();
    }
    let Some((i, what)) = key.strip_prefix("blocks.").and_then(|r| r.split_once('.')) else {
        return key.to_string();
    };
    let from = match what {
        "attn.qkv.weight" => "attention.attention.{query,key,value}.weight",
        "attn.qkv.bias" => "attention.attention.{query,key,value}.bias",
        "attn.q_bias" => "attention.attention.query.bias",
        "attn.v_bias" => "attention.attention.value.bias",
        w => match HF_LAYER.iter().find(|(_, to)| *to == w) {
            Some(&(from, _)) => from,
            None => return key.to_string(),
        },
    };
    format!("encoder.layer.{i}.{from}")
}

/// Replaces each block's HF `query` / `key` / `value` with the fused projection the model
/// runs: `qkv.weight = [Wq; Wk; Wv]` (rows in q, k, v order, as `x @ qkv.T` splits them);
/// biases: all three → `qkv.bias = [bq; bk; bv]` (ViTMAE), no key bias → `q_bias` and
/// `v_bias` (BEiT: k has no bias), none at all → a zero `qkv.bias` (a Linear without bias).
fn hf_assemble_qkv(w: &mut WeightMap, prefix: &str) -> super::Result<()> {
    let mut blocks: Vec<usize> = w
        .keys()
        .filter_map(|k| {
            let (i, what) = k.strip_prefix("blocks.")?.split_once('.')?;
            what.starts_with("attn.").then(|| i.parse::<usize>().ok()).flatten()
        })
        .collect();
    blocks.sort_unstable();
    blocks.dedup();
    for i in blocks {
        let part = |w: &mut WeightMap, p: &str, kind: &str| w.remove(&format!("blocks.{i}.attn.{p}.{kind}"));
        let missing = |p: &str, kind: &str| VerifyError::MissingKey {
            key: format!("{prefix}encoder.layer.{i}.attention.attention.{p}.{kind}"),
            hint: "HF attention has query, key and value projections; verify joins them in q, k, v order".to_string(),
        };
        let (q, k, v) = (part(w, "query", "weight"), part(w, "key", "weight"), part(w, "value", "weight"));
        let (qb, kb, vb) = (part(w, "query", "bias"), part(w, "key", "bias"), part(w, "value", "bias"));
        if q.is_none() && k.is_none() && v.is_none() {
            continue; // a block without attention weights: the model reports what is missing
        }
        let q = q.ok_or_else(|| missing("query", "weight"))?;
        let k = k.ok_or_else(|| missing("key", "weight"))?;
        let v = v.ok_or_else(|| missing("value", "weight"))?;
        let rows = q.dim(0)?;
        w.insert(format!("blocks.{i}.attn.qkv.weight"), Tensor::cat(&[&q, &k, &v], 0)?);
        match (qb, kb, vb) {
            (Some(qb), Some(kb), Some(vb)) => {
                w.insert(format!("blocks.{i}.attn.qkv.bias"), Tensor::cat(&[&qb, &kb, &vb], 0)?);
            }
            (qb, Some(_), _) => return Err(missing(if qb.is_none() { "query" } else { "value" }, "bias")),
            (None, None, None) => {
                w.insert(format!("blocks.{i}.attn.qkv.bias"), Tensor::zeros(3 * rows, q.dtype(), q.device())?);
            }
            (qb, None, vb) => {
                let zeros = || -> super::Result<Tensor> { Ok(Tensor::zeros(rows, q.dtype(), q.device())?) };
                w.insert(format!("blocks.{i}.attn.q_bias"), qb.map_or_else(zeros, Ok)?);
                w.insert(format!("blocks.{i}.attn.v_bias"), vb.map_or_else(zeros, Ok)?);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_told_apart_by_their_names() {
        let f = |names: &[&str]| SourceFamily::recognise(names.iter().copied());
        assert_eq!(f(&["patch_embed.proj.weight", "blocks.0.attn.qkv.weight"]), Some(SourceFamily::Official));
        assert_eq!(
            f(&[
                "vit.embeddings.patch_embeddings.projection.weight",
                "vit.encoder.layer.0.output.dense.weight",
                "decoder.decoder_embed.weight"
            ]),
            Some(SourceFamily::HuggingFace { prefix: "vit.".into() })
        );
        assert_eq!(
            f(&["embeddings.patch_embeddings.projection.weight", "encoder.layer.0.lambda_1"]),
            Some(SourceFamily::HuggingFace { prefix: String::new() })
        );
        assert_eq!(
            f(&["backbone.patch_embed.projection.weight", "neck.decoder_embed.weight"]),
            Some(SourceFamily::MmPretrain)
        );
        assert_eq!(
            f(&["backbone.patch_embed.projection.weight", "decode_head.conv_seg.weight"]),
            Some(SourceFamily::Segmentor)
        );
        assert_eq!(f(&["patch_embed.projection.weight", "layers.0.ln1.weight"]), Some(SourceFamily::MMSeg));
        assert_eq!(f(&["foo.weight"]), None);
    }

    #[test]
    fn hf_names_map_to_the_original_layout_and_back() {
        let hf = SourceFamily::HuggingFace { prefix: "beit.".into() };
        assert_eq!(hf.rename("beit.encoder.layer.3.lambda_2").as_deref(), Some("blocks.3.gamma_2"));
        assert_eq!(hf.rename("beit.encoder.layer.0.layernorm_before.bias").as_deref(), Some("blocks.0.norm1.bias"));
        assert_eq!(
            hf.rename("beit.encoder.relative_position_bias.relative_position_bias_table").as_deref(),
            Some(SHARED_TABLE)
        );
        assert_eq!(hf.rename("beit.layernorm.weight"), None);
        assert_eq!(hf.rename("lm_head.weight"), None);
        assert_eq!(hf.source_key("blocks.3.gamma_2"), "beit.encoder.layer.3.lambda_2");
        assert_eq!(hf.source_key("blocks.1.attn.q_bias"), "beit.encoder.layer.1.attention.attention.query.bias");
        assert_eq!(hf.source_key("patch_embed.proj.weight"), "beit.embeddings.patch_embeddings.projection.weight");
        let mm = SourceFamily::MmPretrain;
        assert_eq!(mm.rename("backbone.layers.2.attn.gamma1.weight").as_deref(), Some("layers.2.gamma_1"));
        assert_eq!(mm.rename("backbone.layers.2.ffn.gamma2.weight").as_deref(), Some("layers.2.gamma_2"));
        assert_eq!(
            mm.rename("backbone.layers.2.ffn.layers.0.0.weight").as_deref(),
            Some("layers.2.ffn.layers.0.0.weight")
        );
        assert_eq!(mm.rename("neck.decoder_embed.weight"), None);
    }

    #[test]
    fn hf_qkv_is_joined_in_q_k_v_order() {
        let dev = candle_core::Device::Cpu;
        let t = |v: f32, n: usize| Tensor::full(v, (n, 2), &dev).unwrap();
        let b = |v: f32| Tensor::full(v, 2, &dev).unwrap();
        let mut w = WeightMap::new();
        w.insert("blocks.0.attn.query.weight".into(), t(1.0, 2));
        w.insert("blocks.0.attn.key.weight".into(), t(2.0, 2));
        w.insert("blocks.0.attn.value.weight".into(), t(3.0, 2));
        w.insert("blocks.0.attn.query.bias".into(), b(4.0));
        w.insert("blocks.0.attn.value.bias".into(), b(6.0));
        SourceFamily::HuggingFace { prefix: String::new() }.assemble(&mut w).unwrap();
        let qkv: Vec<Vec<f32>> = w["blocks.0.attn.qkv.weight"].to_vec2().unwrap();
        assert_eq!(qkv.iter().map(|r| r[0]).collect::<Vec<_>>(), vec![1.0, 1.0, 2.0, 2.0, 3.0, 3.0]);
        assert_eq!(w["blocks.0.attn.q_bias"].to_vec1::<f32>().unwrap(), vec![4.0, 4.0]);
        assert_eq!(w["blocks.0.attn.v_bias"].to_vec1::<f32>().unwrap(), vec![6.0, 6.0]);
        assert!(!w.contains_key("blocks.0.attn.qkv.bias") && !w.contains_key("blocks.0.attn.query.weight"));
        // A key bias makes it the full MAE bias.
        let mut w2 = WeightMap::new();
        for (p, v) in [("query", 1.0), ("key", 2.0), ("value", 3.0)] {
            w2.insert(format!("blocks.1.attn.{p}.weight"), t(v, 2));
            w2.insert(format!("blocks.1.attn.{p}.bias"), b(v));
        }
        SourceFamily::HuggingFace { prefix: String::new() }.assemble(&mut w2).unwrap();
        assert_eq!(w2["blocks.1.attn.qkv.bias"].to_vec1::<f32>().unwrap(), vec![1.0, 1.0, 2.0, 2.0, 3.0, 3.0]);
    }
}
