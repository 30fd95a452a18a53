//! The ViT backbone of MMSeg's `MAE` / `BEiT` (mmseg/models/backbones/beit.py, mae.py), built
//! from weights in either layout. The computation is the same for both; only the names and
//! which tensors may be absent differ:
//!
//! | | MMSeg layout | original layout |
//! |---|---|---|
//! | relative table per block | required (MMSeg always adds one) | optional; else the shared `rel_pos_bias` table; else none |
//! | `relative_position_index` | generated (MMSeg rebuilds it); a stored one must equal it | the stored one; else generated |
//! | `gamma_1` / `gamma_2` | required | optional (absent = 1, as in MAE) |
//! | `pos_embed` | MAE: required; BEiT: ignored (MMSeg's BEiT has none) | used when present |
//!
//! Per block, in eval mode: `x += γ₁·attn(ln1(x))`, `x += γ₂·fc2(gelu(fc1(ln2(x))))`, where
//! `attn` scales q by `head_dim^-0.5`, adds the relative bias `table[index[i,j], h]` to the
//! logits, and GELU is the exact erf form.

use candle_core::{DType, Device, Tensor};

use super::config::{Layout, SHARED_INDEX, SHARED_TABLE};
use super::layers::{check_shape, softmax_last, LayerNorm, Linear, PatchEmbed, Weights};
use super::{Arch, BackboneConfig, Features, Result, VerifyError, WeightMap, LOAD_READY_HINT};

/// Runs the MMSeg backbone on MMSeg-layout weights; `input` is `[B, 3, img_size, img_size]`.
/// Returns the patch tokens after each block in `cfg.out_indices`, as `[B, C, H/p, W/p]`.
pub fn mmseg_forward(w: &WeightMap, cfg: &BackboneConfig, input: &Tensor) -> Result<Features> {
    Backbone::new(w, cfg, Layout::MMSeg, input.device())?.forward(input)
}

/// Runs the same network on the official MAE (timm `VisionTransformer`) or BEiT (unilm)
/// layout, at the checkpoint's native size (no resizing of `pos_embed` or tables).
pub fn original_forward(w: &WeightMap, cfg: &BackboneConfig, input: &Tensor) -> Result<Features> {
    Backbone::new(w, cfg, Layout::Original, input.device())?.forward(input)
}

/// The relative-position index MMSeg, unilm and timm build for a `window`×`window` patch grid
/// plus a cls token: `[T, T]` i64 with `T = window² + 1`. For patches a=(h_a,w_a), b=(h_b,w_b):
/// `index[1+a, 1+b] = (h_a-h_b+W-1)·(2W-1) + (w_a-w_b+W-1)`; row 0 is `R` (cls → patch),
/// column 0 is `R+1` (patch → cls), `index[0,0] = R+2`, with `R = (2W-1)²`.
pub fn relative_position_index(window: usize, device: &Device) -> Result<Tensor> {
    let v = relative_position_index_vec(window);
    let t = window * window + 1;
    Ok(Tensor::from_vec(v, (t, t), device)?)
}

fn relative_position_index_vec(window: usize) -> Vec<i64> {
    let w = window as i64;
    let n = window * window;
    let t = n + 1;
    let r = (2 * w - 1) * (2 * w - 1);
    let mut idx = vec![0i64; t * t];
    for a in 0..n {
        let (ha, wa) = ((a / window) as i64, (a % window) as i64);
        for b in 0..n {
            let (hb, wb) = ((b / window) as i64, (b % window) as i64);
            idx[(1 + a) * t + 1 + b] = (ha - hb + w - 1) * (2 * w - 1) + (wa - wb + w - 1);
        }
    }
    for j in 0..t {
        idx[j] = r; // cls query → any key
        idx[j * t] = r + 1; // any query → cls key
    }
    idx[0] = r + 2;
    idx
}

/// A relative-position table with the index that reads it.
struct RelBias {
    table: Tensor, // [rows, H]
    index: Tensor, // [T*T] i64
    tokens: usize,
}

impl RelBias {
    /// `[H, T, T]`: `bias[h, i, j] = table[index[i, j], h]`.
    fn bias(&self) -> Result<Tensor> {
        let h = self.table.dim(1)?;
        let g = self.table.index_select(&self.index, 0)?; // [T*T, H]
        Ok(g.reshape((self.tokens, self.tokens, h))?
            .permute((2, 0, 1))?
            .contiguous()?)
    }
}

struct Attention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    scale: f64,
    rel: Option<RelBias>,
}

impl Attention {
    fn forward(&self, x: &Tensor, shared_bias: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let h = self.num_heads;
        let hd = c / h;
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((b, t, 3, h, hd))?
            .permute((2, 0, 3, 1, 4))?; // [3, B, H, T, hd]
        let q = qkv.get(0)?.contiguous()?.affine(self.scale, 0.0)?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let mut attn = q.matmul(&k.t()?)?; // [B, H, T, T]
        if let Some(rel) = &self.rel {
            attn = attn.broadcast_add(&rel.bias()?)?;
        } else if let Some(bias) = shared_bias {
            attn = attn.broadcast_add(bias)?;
        }
        let attn = softmax_last(&attn)?;
        let out = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))?;
        self.proj.forward(&out)
    }
}

struct Block {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    gamma_1: Option<Tensor>,
    gamma_2: Option<Tensor>,
}

impl Block {
    fn forward(&self, x: &Tensor, shared_bias: Option<&Tensor>) -> Result<Tensor> {
        let mut y = self.attn.forward(&self.ln1.forward(x)?, shared_bias)?;
        if let Some(g) = &self.gamma_1 {
            y = y.broadcast_mul(g)?;
        }
        let x = (x + y)?;
        let mut y = self
            .fc2
            .forward(&self.fc1.forward(&self.ln2.forward(&x)?)?.gelu_erf()?)?;
        if let Some(g) = &self.gamma_2 {
            y = y.broadcast_mul(g)?;
        }
        Ok((x + y)?)
    }
}

struct Backbone {
    cfg: BackboneConfig,
    patch_embed: PatchEmbed,
    cls_token: Tensor,
    pos_embed: Option<Tensor>,
    shared: Option<RelBias>,
    blocks: Vec<Block>,
}

impl Backbone {
    fn new(map: &WeightMap, cfg: &BackboneConfig, layout: Layout, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let w = Weights::new(map, device);
        let n = layout.names();
        let (d, t, rows) = (cfg.embed_dim, cfg.tokens(), cfg.table_rows());
        let generated = relative_position_index_vec(cfg.grid());
        let size_hint = format!(
            "the model is built for img_size {} (patch {}, {} tokens); weights at another \
             size must be resized by the conversion",
            cfg.img_size, cfg.patch_size, t
        );

        let patch_embed = PatchEmbed::new(&w, n.patch, d, cfg.patch_size)?;
        let cls_token = w.req_shaped(
            "cls_token",
            &[1, 1, d],
            "the cls token is prepended to the patches",
        )?;
        let pos_embed = match (layout, cfg.arch) {
            (Layout::MMSeg, Arch::Beit) => None, // MMSeg's BEiT has no absolute positions
            (Layout::MMSeg, Arch::Mae) => Some(w.req(
                "pos_embed",
                "MMSeg's MAE adds an absolute position embedding",
            )?),
            (Layout::Original, Arch::Mae) => Some(w.req(
                "pos_embed",
                "the MAE encoder adds an absolute position embedding",
            )?),
            (Layout::Original, Arch::Beit) => w.opt("pos_embed")?,
        };
        if let Some(pe) = &pos_embed {
            check_shape("pos_embed", pe, &[1, t, d], &size_hint)?;
        }

        let load_index = |key: &str, must_equal_generated: bool| -> Result<Tensor> {
            match w.raw(key) {
                None => Ok(Tensor::from_vec(generated.clone(), t * t, device)?),
                Some(stored) => {
                    check_shape(key, stored, &[t, t], &size_hint)?;
                    let v: Vec<i64> = stored.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
                    if must_equal_generated && v != generated {
                        return Err(VerifyError::Config(format!(
                            "'{key}' is not the index MMSeg builds for a {0}x{0} window; \
                             regenerate it in the conversion (or drop it: MMSeg rebuilds it)",
                            cfg.grid()
                        )));
                    }
                    if let Some(bad) = v.iter().find(|&&i| i < 0 || i as usize >= rows) {
                        return Err(VerifyError::Config(format!(
                            "'{key}' holds {bad}, outside the table's {rows} rows"
                        )));
                    }
                    Ok(Tensor::from_vec(v, t * t, device)?)
                }
            }
        };

        let shared = if layout == Layout::Original {
            match w.opt(SHARED_TABLE)? {
                Some(table) => {
                    check_shape(SHARED_TABLE, &table, &[rows, cfg.num_heads], &size_hint)?;
                    Some(RelBias {
                        table,
                        index: load_index(SHARED_INDEX, false)?,
                        tokens: t,
                    })
                }
                None => None,
            }
        } else {
            None
        };

        let mut blocks = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let p = format!("{}.{i}", n.blocks);
            let qkv_w = w.req_shaped(
                &format!("{p}.attn.qkv.weight"),
                &[3 * d, d],
                "every block has a fused q/k/v projection",
            )?;
            let qkv_b = match cfg.arch {
                Arch::Mae => w.req_shaped(
                    &format!("{p}.attn.qkv.bias"),
                    &[3 * d],
                    "MAE blocks have a full q/k/v bias",
                )?,
                Arch::Beit => {
                    let hint = "BEiT blocks have q and v biases (the k bias is zero)";
                    let q = w.req_shaped(&format!("{p}.attn.q_bias"), &[d], hint)?;
                    let v = w.req_shaped(&format!("{p}.attn.v_bias"), &[d], hint)?;
                    Tensor::cat(&[&q, &q.zeros_like()?, &v], 0)?
                }
            };
            let table_key = format!("{p}.attn.relative_position_bias_table");
            let index_key = format!("{p}.attn.relative_position_index");
            let table = match layout {
                Layout::MMSeg => Some(w.req(&table_key, LOAD_READY_HINT)?),
                Layout::Original => w.opt(&table_key)?,
            };
            let rel = match table {
                Some(table) => {
                    check_shape(&table_key, &table, &[rows, cfg.num_heads], &size_hint)?;
                    Some(RelBias {
                        table,
                        index: load_index(&index_key, layout == Layout::MMSeg)?,
                        tokens: t,
                    })
                }
                None => None,
            };
            let gamma = |name: &str| -> Result<Option<Tensor>> {
                let key = format!("{p}.{name}");
                match layout {
                    Layout::MMSeg => Ok(Some(w.req_shaped(&key, &[d], LOAD_READY_HINT)?)),
                    Layout::Original => w.opt_shaped(&key, &[d]),
                }
            };
            blocks.push(Block {
                ln1: LayerNorm::new(&w, &format!("{p}.{}", n.ln1), d, cfg.ln_eps)?,
                attn: Attention {
                    qkv: Linear::from_parts(qkv_w, Some(qkv_b))?,
                    proj: Linear::new(&w, &format!("{p}.attn.proj"), d, d)?,
                    num_heads: cfg.num_heads,
                    scale: (cfg.head_dim() as f64).powf(-0.5),
                    rel,
                },
                ln2: LayerNorm::new(&w, &format!("{p}.{}", n.ln2), d, cfg.ln_eps)?,
                fc1: Linear::new(&w, &format!("{p}.{}", n.fc1), d, cfg.mlp_hidden)?,
                fc2: Linear::new(&w, &format!("{p}.{}", n.fc2), cfg.mlp_hidden, d)?,
                gamma_1: gamma("gamma_1")?,
                gamma_2: gamma("gamma_2")?,
            });
        }

        Ok(Backbone {
            cfg: cfg.clone(),
            patch_embed,
            cls_token,
            pos_embed,
            shared,
            blocks,
        })
    }

    fn forward(&self, input: &Tensor) -> Result<Features> {
        let cfg = &self.cfg;
        let dims = input.dims().to_vec();
        if dims.len() != 4 || dims[1] != 3 || dims[2] != cfg.img_size || dims[3] != cfg.img_size {
            return Err(VerifyError::Input(format!(
                "shape {dims:?}; the backbone takes [B, 3, {0}, {0}] exactly (img_size {0})",
                cfg.img_size
            )));
        }
        let input = input.to_dtype(DType::F32)?;
        let b = dims[0];
        let x = self.patch_embed.forward(&input)?; // [B, N, D]
        let cls = self.cls_token.broadcast_as((b, 1, cfg.embed_dim))?;
        let mut x = Tensor::cat(&[&cls, &x], 1)?;
        if let Some(pe) = &self.pos_embed {
            x = x.broadcast_add(pe)?;
        }
        let shared_bias = self.shared.as_ref().map(RelBias::bias).transpose()?;
        let last = *cfg.out_indices.iter().max().expect("validated non-empty");
        let g = cfg.grid();
        let mut kept: Vec<(usize, Tensor)> = Vec::with_capacity(cfg.out_indices.len());
        for (i, block) in self.blocks.iter().enumerate().take(last + 1) {
            x = block.forward(&x, shared_bias.as_ref())?;
            if cfg.out_indices.contains(&i) {
                let map = x
                    .narrow(1, 1, g * g)?
                    .reshape((b, g, g, cfg.embed_dim))?
                    .permute((0, 3, 1, 2))?
                    .contiguous()?;
                kept.push((i, map));
            }
        }
        Ok(cfg
            .out_indices
            .iter()
            .map(|&i| {
                let t = kept.iter().find(|(k, _)| *k == i).expect("computed above");
                (i, t.1.clone())
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_matches_mmseg_layout_for_a_2x2_window() {
        // W = 2: R = 9. Patches (0,0),(0,1),(1,0),(1,1).
        let v = relative_position_index_vec(2);
        let t = 5;
        let at = |i: usize, j: usize| v[i * t + j];
        assert_eq!(at(0, 0), 11);
        assert_eq!(at(0, 3), 9);
        assert_eq!(at(2, 0), 10);
        // a = (0,0), b = (0,0): (0+1)*3 + (0+1) = 4 (the centre of the 3x3 grid)
        assert_eq!(at(1, 1), 4);
        // a = (0,0), b = (1,1): (0-1+1)*3 + (0-1+1) = 0
        assert_eq!(at(1, 4), 0);
        // a = (1,1), b = (0,0): (1+1)*3 + (1+1) = 8
        assert_eq!(at(4, 1), 8);
        // a = (0,1), b = (1,0): (0-1+1)*3 + (1-0+1) = 2
        assert_eq!(at(2, 3), 2);
    }
}
