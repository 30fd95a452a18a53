//! Synthetic checkpoints in the official MAE pretrain layout (key set and shapes of
//! facebookresearch/mae's encoder), for benchmarks and tests. Weights are zeros or cheap
//! pseudo-random values; the files come from our own writer and are never committed.

use std::io::{self, Write};
use std::path::Path;

use crate::write::pth::{write_pth, TensorToWrite};
use crate::DType;

/// Names and shapes of an MAE ViT encoder checkpoint (`mae_pretrain_vit_*.pth` layout) for
/// width `dim`, `depth` blocks, `patch` size, at 224 px.
pub fn mae_pretrain_layout(dim: usize, depth: usize, patch: usize) -> Vec<(String, Vec<usize>)> {
    mae_pretrain_layout_at(dim, depth, patch, 224)
}

/// [`mae_pretrain_layout`] for a model trained at `img_size` px (`pos_embed` holds
/// `(img_size / patch)² + 1` tokens), e.g. the tiny test fixtures at 112.
pub fn mae_pretrain_layout_at(dim: usize, depth: usize, patch: usize, img_size: usize) -> Vec<(String, Vec<usize>)> {
    let tokens = (img_size / patch) * (img_size / patch) + 1;
    let mut specs: Vec<(String, Vec<usize>)> = vec![
        ("cls_token".into(), vec![1, 1, dim]),
        ("pos_embed".into(), vec![1, tokens, dim]),
        ("patch_embed.proj.weight".into(), vec![dim, 3, patch, patch]),
        ("patch_embed.proj.bias".into(), vec![dim]),
    ];
    for i in 0..depth {
        for (name, shape) in [
            ("norm1.weight", vec![dim]),
            ("norm1.bias", vec![dim]),
            ("attn.qkv.weight", vec![3 * dim, dim]),
            ("attn.qkv.bias", vec![3 * dim]),
            ("attn.proj.weight", vec![dim, dim]),
            ("attn.proj.bias", vec![dim]),
            ("norm2.weight", vec![dim]),
            ("norm2.bias", vec![dim]),
            ("mlp.fc1.weight", vec![4 * dim, dim]),
            ("mlp.fc1.bias", vec![4 * dim]),
            ("mlp.fc2.weight", vec![dim, 4 * dim]),
            ("mlp.fc2.bias", vec![dim]),
        ] {
            specs.push((format!("blocks.{i}.{name}"), shape));
        }
    }
    specs.push(("norm.weight".into(), vec![dim]));
    specs.push(("norm.bias".into(), vec![dim]));
    specs
}

/// The layout of a named size: `base` (ViT-B/16), `large` (ViT-L/16), `huge` (ViT-H/14).
pub fn mae_pretrain_preset(size: &str) -> Option<Vec<(String, Vec<usize>)>> {
    match size {
        "base" => Some(mae_pretrain_layout(768, 12, 16)),
        "large" => Some(mae_pretrain_layout(1024, 24, 16)),
        "huge" => Some(mae_pretrain_layout(1280, 32, 14)),
        _ => None,
    }
}

/// Writes `layout` as an fp32 state dict: zeros, or small xorshift values when `random`.
pub fn write_synthetic(path: &Path, layout: &[(String, Vec<usize>)], random: bool) -> io::Result<()> {
    let tensors: Vec<TensorToWrite> =
        layout.iter().map(|(n, s)| TensorToWrite { name: n, dtype: DType::F32, shape: s }).collect();
    let file = std::fs::File::create(path)?;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut buf = Vec::new();
    write_pth(&file, "synth", &tensors, |i, w| {
        let n = tensors[i].shape.iter().product::<usize>();
        buf.clear();
        if random {
            for _ in 0..n {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let v = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04;
                buf.extend_from_slice(&v.to_le_bytes());
            }
        } else {
            buf.resize(n * 4, 0);
        }
        w.write_all(&buf)
    })?;
    Ok(())
}
