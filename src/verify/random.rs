//! Deterministic pseudo-random numbers: the fixed verification input and random weights for
//! benchmarks and tests. No `rand` crate: SplitMix64 is a few lines and fully specified, so
//! another program (a Python fixture script) can reproduce the same input bit for bit.

use candle_core::{Device, Tensor};

use super::backbone::relative_position_index;
use super::config::Layout;
use super::{Arch, BackboneConfig, Result, WeightMap};

/// SplitMix64 (Steele, Lea & Flood 2014; the seeding generator of `java.util.SplittableRandom`
/// and xoshiro): `state += 0x9E3779B97F4A7C15`, then two xor-shift-multiply rounds.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1): the top 24 bits as `k / 2^24 * 2 - 1`, exact in f32.
    pub fn next_signed_unit(&mut self) -> f32 {
        let k = (self.next_u64() >> 40) as f32; // 0 ..= 2^24 - 1
        k / 16_777_216.0 * 2.0 - 1.0
    }
}

/// Seed of [`deterministic_input`]: the bytes of "ckptmap" read as a big-endian integer.
pub const INPUT_SEED: u64 = 0x0063_6b70_746d_6170;

/// The fixed verification image `[1, 3, img_size, img_size]` f32: element k (row-major
/// NCHW order) is the k-th [`SplitMix64::next_signed_unit`] from seed [`INPUT_SEED`],
/// uniform in [-1, 1) — the range of a normalised image, no real picture needed.
pub fn deterministic_input(img_size: usize, device: &Device) -> Result<Tensor> {
    let mut rng = SplitMix64::new(INPUT_SEED);
    let n = 3 * img_size * img_size;
    let v: Vec<f32> = (0..n).map(|_| rng.next_signed_unit()).collect();
    Ok(Tensor::from_vec(v, (1, 3, img_size, img_size), device)?)
}

/// Random MMSeg-layout weights for `cfg` (all keys `mmseg_forward` reads, including
/// `relative_position_index`), deterministic (seed 0). Scales are ViT-like: linear and
/// embedding weights uniform with std 0.02, LayerNorm weight ≈ 1, gamma ≈ 0.1. For benchmarks
/// (`BackboneConfig::vit_base`) and tests; the numbers mean nothing.
pub fn random_mmseg_weights(cfg: &BackboneConfig, device: &Device) -> Result<WeightMap> {
    random_weights(cfg, Layout::MMSeg, 0, device)
}

/// Random weights in either layout (see [`random_mmseg_weights`]). In the original layout
/// every block gets its own table and gammas, like a fine-tuned BEiT.
pub(crate) fn random_weights(cfg: &BackboneConfig, layout: Layout, seed: u64, device: &Device) -> Result<WeightMap> {
    let mut rng = SplitMix64::new(seed);
    let mut w = WeightMap::new();
    // std of U(-a, a) is a/sqrt(3).
    let mut put = |w: &mut WeightMap, key: String, shape: &[usize], centre: f32, std: f32| {
        let a = std * 3f32.sqrt();
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| centre + a * rng.next_signed_unit()).collect();
        Tensor::from_vec(v, shape, device).map(|t| {
            w.insert(key, t);
        })
    };
    let n = layout.names();
    let (d, p, h, t) = (cfg.embed_dim, cfg.patch_size, cfg.mlp_hidden, cfg.tokens());
    put(&mut w, "cls_token".into(), &[1, 1, d], 0.0, 0.02)?;
    if cfg.arch == Arch::Mae {
        put(&mut w, "pos_embed".into(), &[1, t, d], 0.0, 0.02)?;
    }
    put(&mut w, format!("{}.weight", n.patch), &[d, 3, p, p], 0.0, 0.02)?;
    put(&mut w, format!("{}.bias", n.patch), &[d], 0.0, 0.02)?;
    let index = relative_position_index(cfg.grid(), device)?;
    for i in 0..cfg.depth {
        let b = format!("{}.{i}", n.blocks);
        for ln in [n.ln1, n.ln2] {
            put(&mut w, format!("{b}.{ln}.weight"), &[d], 1.0, 0.1)?;
            put(&mut w, format!("{b}.{ln}.bias"), &[d], 0.0, 0.02)?;
        }
        put(&mut w, format!("{b}.attn.qkv.weight"), &[3 * d, d], 0.0, 0.02)?;
        match cfg.arch {
            Arch::Mae => put(&mut w, format!("{b}.attn.qkv.bias"), &[3 * d], 0.0, 0.02)?,
            Arch::Beit => {
                put(&mut w, format!("{b}.attn.q_bias"), &[d], 0.0, 0.02)?;
                put(&mut w, format!("{b}.attn.v_bias"), &[d], 0.0, 0.02)?;
            }
        }
        put(&mut w, format!("{b}.attn.relative_position_bias_table"), &[cfg.table_rows(), cfg.num_heads], 0.0, 0.5)?;
        w.insert(format!("{b}.attn.relative_position_index"), index.clone());
        put(&mut w, format!("{b}.attn.proj.weight"), &[d, d], 0.0, 0.02)?;
        put(&mut w, format!("{b}.attn.proj.bias"), &[d], 0.0, 0.02)?;
        put(&mut w, format!("{b}.{}.weight", n.fc1), &[h, d], 0.0, 0.02)?;
        put(&mut w, format!("{b}.{}.bias", n.fc1), &[h], 0.0, 0.02)?;
        put(&mut w, format!("{b}.{}.weight", n.fc2), &[d, h], 0.0, 0.02)?;
        put(&mut w, format!("{b}.{}.bias", n.fc2), &[d], 0.0, 0.02)?;
        put(&mut w, format!("{b}.gamma_1"), &[d], 0.1, 0.02)?;
        put(&mut w, format!("{b}.gamma_2"), &[d], 0.1, 0.02)?;
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_the_published_sequence() {
        // First outputs of SplitMix64 seeded with 1234567 (reference values from the
        // xoshiro authors' splitmix64.c).
        let mut r = SplitMix64::new(1234567);
        assert_eq!(r.next_u64(), 6457827717110365317);
        assert_eq!(r.next_u64(), 3203168211198807973);
    }

    #[test]
    fn input_is_fixed_and_in_range() {
        let a = deterministic_input(32, &Device::Cpu).unwrap();
        let b = deterministic_input(32, &Device::Cpu).unwrap();
        assert_eq!(a.dims(), &[1, 3, 32, 32]);
        let va: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let vb: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(va, vb);
        assert!(va.iter().all(|&x| (-1.0..1.0).contains(&x)));
        let mean = va.iter().sum::<f32>() / va.len() as f32;
        assert!(mean.abs() < 0.05, "mean {mean}");
    }
}
