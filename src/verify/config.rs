//! The backbone's hyper-parameters, and how they are read off a weight map.

use super::{Result, VerifyError, WeightMap};

/// Which MMSeg backbone the weights are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// MMSeg `MAE`: full `attn.qkv.bias`, absolute `pos_embed`.
    Mae,
    /// MMSeg `BEiT`: `attn.q_bias` + `attn.v_bias` (k bias is zero), no `pos_embed`.
    Beit,
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Arch::Mae => "mae",
            Arch::Beit => "beit",
        })
    }
}

impl std::str::FromStr for Arch {
    type Err = VerifyError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "mae" => Ok(Arch::Mae),
            "beit" => Ok(Arch::Beit),
            other => Err(VerifyError::Config(format!("unknown architecture '{other}' (expected mae or beit)"))),
        }
    }
}

/// How the weights are named.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// MMSegmentation backbone names: `layers.i.ln1`, `ffn.layers.0.0`, `patch_embed.projection`.
    MMSeg,
    /// Official MAE (timm `VisionTransformer`) / unilm BEiT names: `blocks.i.norm1`, `mlp.fc1`,
    /// `patch_embed.proj`.
    Original,
}

/// Key names of one layout (the parts that differ between the two).
pub(crate) struct Names {
    pub blocks: &'static str,
    pub ln1: &'static str,
    pub ln2: &'static str,
    pub fc1: &'static str,
    pub fc2: &'static str,
    pub patch: &'static str,
}

impl Layout {
    pub(crate) fn names(self) -> Names {
        match self {
            Layout::MMSeg => Names {
                blocks: "layers",
                ln1: "ln1",
                ln2: "ln2",
                fc1: "ffn.layers.0.0",
                fc2: "ffn.layers.1",
                patch: "patch_embed.projection",
            },
            Layout::Original => Names {
                blocks: "blocks",
                ln1: "norm1",
                ln2: "norm2",
                fc1: "mlp.fc1",
                fc2: "mlp.fc2",
                patch: "patch_embed.proj",
            },
        }
    }
}

/// The shared relative-position table of BEiT pre-training checkpoints (original layout).
pub(crate) const SHARED_TABLE: &str = "rel_pos_bias.relative_position_bias_table";
pub(crate) const SHARED_INDEX: &str = "rel_pos_bias.relative_position_index";

/// Hyper-parameters of a ViT backbone as MMSeg builds it (eval mode, `final_norm=False`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BackboneConfig {
    pub arch: Arch,
    /// Square input side in pixels; the input must be exactly this size.
    pub img_size: usize,
    pub patch_size: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    /// Hidden width of the MLP (`mlp_ratio * embed_dim`).
    pub mlp_hidden: usize,
    /// Blocks (0-based) whose outputs are returned, in this order.
    pub out_indices: Vec<usize>,
    /// LayerNorm epsilon: 1e-6 as in the MMSeg configs and the original models.
    pub ln_eps: f64,
}

impl BackboneConfig {
    /// Patches per side (`img_size / patch_size`), the attention window.
    pub fn grid(&self) -> usize {
        self.img_size / self.patch_size
    }

    /// Tokens per image: patches plus the cls token.
    pub fn tokens(&self) -> usize {
        self.grid() * self.grid() + 1
    }

    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }

    /// Rows of a relative-position table for this window: `(2W-1)^2 + 3`.
    pub fn table_rows(&self) -> usize {
        let w = self.grid();
        (2 * w - 1) * (2 * w - 1) + 3
    }

    /// ViT-B/16 (768 wide, 12 blocks, 12 heads, MLP 3072) with the MMSeg out indices.
    pub fn vit_base(arch: Arch, img_size: usize) -> Self {
        BackboneConfig {
            arch,
            img_size,
            patch_size: 16,
            embed_dim: 768,
            depth: 12,
            num_heads: 12,
            mlp_hidden: 3072,
            out_indices: Self::default_out_indices(12),
            ln_eps: 1e-6,
        }
    }

    /// The out indices MMSeg's configs use for this depth: 12 → 3,5,7,11 (MAE/BEiT base),
    /// 24 → 7,11,15,23 (large), 32 → 7,15,23,31 (huge). Any other depth gets four blocks
    /// spaced evenly and ending at the last one, `ceil(k*depth/4) - 1` for k = 1..4
    /// (duplicates removed), so a 4-block model returns 0,1,2,3 and a 6-block one 1,2,4,5.
    pub fn default_out_indices(depth: usize) -> Vec<usize> {
        match depth {
            12 => vec![3, 5, 7, 11],
            24 => vec![7, 11, 15, 23],
            32 => vec![7, 15, 23, 31],
            0 => vec![],
            d => {
                let mut v: Vec<usize> = (1..=4).map(|k| (k * d).div_ceil(4) - 1).collect();
                v.dedup();
                v
            }
        }
    }

    /// Reads the configuration off MMSeg-layout weights (see [`BackboneConfig::infer`]).
    pub fn infer_mmseg(
        w: &WeightMap,
        img_size: Option<usize>,
        num_heads: Option<usize>,
        out_indices: Option<Vec<usize>>,
    ) -> Result<Self> {
        Self::infer(Layout::MMSeg, w, img_size, num_heads, out_indices)
    }

    /// Reads the configuration off original-layout (official MAE / BEiT) weights.
    pub fn infer_original(
        w: &WeightMap,
        img_size: Option<usize>,
        num_heads: Option<usize>,
        out_indices: Option<Vec<usize>>,
    ) -> Result<Self> {
        Self::infer(Layout::Original, w, img_size, num_heads, out_indices)
    }

    /// Reads the configuration off weight shapes:
    /// * width and patch from the patch-embedding conv `[D, 3, p, p]`; depth from the block
    ///   numbers; MLP width from `fc1`;
    /// * arch: `attn.q_bias` → BEiT, `attn.qkv.bias` → MAE;
    /// * heads: `num_heads` if given, else the columns of a relative-position table, else a
    ///   preset by width (768 → 12, 1024 → 16, 1280 → 16), else an error;
    /// * img_size: if not given, from the `pos_embed` length, else from a table's window;
    /// * out_indices: if not given, [`BackboneConfig::default_out_indices`].
    pub fn infer(
        layout: Layout,
        w: &WeightMap,
        img_size: Option<usize>,
        num_heads: Option<usize>,
        out_indices: Option<Vec<usize>>,
    ) -> Result<Self> {
        let n = layout.names();
        let patch_key = format!("{}.weight", n.patch);
        let pw = shape_of(w, &patch_key, "the patch-embedding convolution")?;
        if pw.len() != 4 || pw[2] != pw[3] {
            return Err(VerifyError::Config(format!("'{patch_key}' has shape {pw:?}; expected [embed_dim, 3, p, p]")));
        }
        let (embed_dim, patch_size) = (pw[0], pw[2]);

        let depth = block_count(w, n.blocks)?;
        if depth == 0 {
            return Err(VerifyError::Config(format!(
                "no '{}.<i>.' keys: these weights are not in the {} layout",
                n.blocks,
                match layout {
                    Layout::MMSeg => "MMSeg",
                    Layout::Original => "original (MAE/BEiT)",
                }
            )));
        }
        let fc1_key = format!("{}.0.{}.weight", n.blocks, n.fc1);
        let fc1 = shape_of(w, &fc1_key, "the first MLP layer")?;
        if fc1.len() != 2 || fc1[1] != embed_dim {
            return Err(VerifyError::Config(format!("'{fc1_key}' has shape {fc1:?}; expected [hidden, {embed_dim}]")));
        }
        let mlp_hidden = fc1[0];

        let q_bias = format!("{}.0.attn.q_bias", n.blocks);
        let qkv_bias = format!("{}.0.attn.qkv.bias", n.blocks);
        let arch = if w.contains_key(&q_bias) {
            Arch::Beit
        } else if w.contains_key(&qkv_bias) {
            Arch::Mae
        } else {
            return Err(VerifyError::Config(format!(
                "cannot tell MAE from BEiT: neither '{q_bias}' (BEiT) nor '{qkv_bias}' (MAE) is present"
            )));
        };

        // A relative-position table tells the head count and the window.
        // The shared table of BEiT pretraining checkpoints (unilm, mmpretrain, HF) when the
        // blocks have none.
        let tables = [format!("{}.0.attn.relative_position_bias_table", n.blocks), SHARED_TABLE.to_string()];
        let table = tables.iter().find_map(|k| w.get(k).map(|t| (k.clone(), t.dims().to_vec())));
        if let Some((k, s)) = &table {
            if s.len() != 2 {
                return Err(VerifyError::Config(format!("'{k}' has shape {s:?}; expected [(2W-1)^2+3, num_heads]")));
            }
        }

        let num_heads = match (num_heads, &table) {
            (Some(h), Some((k, s))) if s[1] != h => {
                return Err(VerifyError::Config(format!(
                    "--num-heads {h} contradicts '{k}' with {} columns (one per head)",
                    s[1]
                )))
            }
            (Some(h), _) => h,
            (None, Some((_, s))) => s[1],
            (None, None) => match embed_dim {
                768 => 12,
                1024 => 16,
                1280 => 16,
                d => {
                    return Err(VerifyError::Config(format!(
                        "cannot tell the number of attention heads for width {d} (no \
                         relative-position table, no preset); pass --num-heads"
                    )))
                }
            },
        };
        if num_heads == 0 || !embed_dim.is_multiple_of(num_heads) {
            let divisors: Vec<String> =
                (1..=embed_dim).filter(|d| embed_dim % d == 0).take(16).map(|d| d.to_string()).collect();
            return Err(VerifyError::Config(format!(
                "--num-heads {num_heads}: the width {embed_dim} must split evenly into the heads; numbers that divide it: {} (the official models use 64 channels per head)",
                divisors.join(", ")
            )));
        }

        let img_size = match img_size {
            Some(s) => s,
            None => {
                if let Some(pe) = w.get("pos_embed") {
                    let s = pe.dims();
                    let len = if s.len() == 3 { s[1] } else { 0 };
                    let g = isqrt(len.saturating_sub(1));
                    if len < 2 || g * g != len - 1 {
                        return Err(VerifyError::Config(format!(
                            "'pos_embed' has shape {s:?}; expected [1, 1 + g*g, D]; pass --img-size"
                        )));
                    }
                    g * patch_size
                } else if let Some((k, s)) = &table {
                    let r = isqrt(s[0].saturating_sub(3));
                    if s[0] < 4 || r * r != s[0] - 3 || r.is_multiple_of(2) {
                        return Err(VerifyError::Config(format!(
                            "'{k}' has {} rows, not (2W-1)^2+3; pass --img-size",
                            s[0]
                        )));
                    }
                    r.div_ceil(2) * patch_size
                } else {
                    return Err(VerifyError::Config(
                        "no pos_embed and no relative-position table to read the input size \
                         from; pass --img-size"
                            .to_string(),
                    ));
                }
            }
        };
        if img_size == 0 || !img_size.is_multiple_of(patch_size) {
            return Err(VerifyError::Config(format!(
                "img_size {img_size} is not a positive multiple of the patch size {patch_size}"
            )));
        }

        let out_indices = match out_indices {
            Some(v) => v,
            None => Self::default_out_indices(depth),
        };
        let cfg = BackboneConfig {
            arch,
            img_size,
            patch_size,
            embed_dim,
            depth,
            num_heads,
            mlp_hidden,
            out_indices,
            ln_eps: 1e-6,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that the numbers fit together (out indices in range and distinct, ...).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(VerifyError::Config(m));
        if self.patch_size == 0 || self.img_size == 0 || !self.img_size.is_multiple_of(self.patch_size) {
            return bad(format!(
                "img_size {} is not a positive multiple of patch_size {}",
                self.img_size, self.patch_size
            ));
        }
        if self.num_heads == 0 || !self.embed_dim.is_multiple_of(self.num_heads) {
            return bad(format!("{} heads do not divide the width {}", self.num_heads, self.embed_dim));
        }
        if self.out_indices.is_empty() {
            return bad("no out indices".to_string());
        }
        for (k, &i) in self.out_indices.iter().enumerate() {
            if i >= self.depth {
                return bad(format!(
                    "out index {i} is past the last block ({} blocks, indices 0..={})",
                    self.depth,
                    self.depth - 1
                ));
            }
            if self.out_indices[..k].contains(&i) {
                return bad(format!("out index {i} is listed twice"));
            }
        }
        Ok(())
    }
}

fn shape_of(w: &WeightMap, key: &str, what: &str) -> Result<Vec<usize>> {
    w.get(key).map(|t| t.dims().to_vec()).ok_or_else(|| VerifyError::MissingKey {
        key: key.to_string(),
        hint: format!("{what} is needed to read the model size"),
    })
}

/// Number of blocks: one more than the largest `i` in `<prefix>.<i>.`; every block below it
/// must be present.
fn block_count(w: &WeightMap, prefix: &str) -> Result<usize> {
    let mut seen = std::collections::BTreeSet::new();
    let p = format!("{prefix}.");
    for k in w.keys() {
        if let Some(rest) = k.strip_prefix(&p) {
            if let Some(i) = rest.split('.').next().and_then(|s| s.parse::<usize>().ok()) {
                seen.insert(i);
            }
        }
    }
    let depth = seen.iter().next_back().map_or(0, |&m| m + 1);
    if let Some(missing) = (0..depth).find(|i| !seen.contains(i)) {
        return Err(VerifyError::Config(format!(
            "block {missing} is missing: keys exist for '{prefix}.{}.' but not for '{prefix}.{missing}.'",
            depth - 1
        )));
    }
    Ok(depth)
}

pub(crate) fn isqrt(n: usize) -> usize {
    let mut r = (n as f64).sqrt() as usize;
    while r * r > n {
        r -= 1;
    }
    while (r + 1) * (r + 1) <= n {
        r += 1;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_out_indices_follow_mmseg_configs_and_space_evenly_otherwise() {
        assert_eq!(BackboneConfig::default_out_indices(12), vec![3, 5, 7, 11]);
        assert_eq!(BackboneConfig::default_out_indices(24), vec![7, 11, 15, 23]);
        assert_eq!(BackboneConfig::default_out_indices(32), vec![7, 15, 23, 31]);
        assert_eq!(BackboneConfig::default_out_indices(4), vec![0, 1, 2, 3]);
        assert_eq!(BackboneConfig::default_out_indices(6), vec![1, 2, 4, 5]);
        assert_eq!(BackboneConfig::default_out_indices(2), vec![0, 1]);
        assert_eq!(BackboneConfig::default_out_indices(1), vec![0]);
        assert_eq!(BackboneConfig::default_out_indices(8), vec![1, 3, 5, 7]);
    }

    #[test]
    fn validate_rejects_bad_out_indices() {
        let mut c = BackboneConfig::vit_base(Arch::Mae, 224);
        c.out_indices = vec![3, 12];
        assert!(c.validate().unwrap_err().to_string().contains("past the last block"));
        c.out_indices = vec![3, 3];
        assert!(c.validate().unwrap_err().to_string().contains("twice"));
    }
}
