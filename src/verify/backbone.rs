//! The ViT backbone of MMSeg's `MAE` / `BEiT` (mmseg/models/backbones/beit.py, mae.py), built
//! from weights in either layout. The computation is the same for both; only the names and
//! which tensors may be absent differ. The names come from the [`Layout`]; which tensors may
//! be absent from the reading: strict for the converted weights ([`mmseg_forward`]), as stored
//! for an original ([`original_forward`], and [`source_forward`] for sources in MMSeg names
//! such as mmpretrain's):
//!
//! | | MMSeg layout (strict) | original layout (as stored) |
//! |---|---|---|
//! | relative table per block | required (MMSeg always adds one) | optional; else the shared `rel_pos_bias` table; else none |
//! | `relative_position_index` | generated (MMSeg rebuilds it); a stored one must equal it | the stored one; else generated |
//! | `gamma_1` / `gamma_2` | required | optional (absent = 1, as in MAE) |
//! | `pos_embed` | MAE: required; BEiT: ignored (MMSeg's BEiT has none) | used when present |
//!
//! Per block, in eval mode: `x += γ₁·attn(ln1(x))`, `x += γ₂·fc2(gelu(fc1(ln2(x))))`, where
//! `attn` scales q by `head_dim^-0.5`, adds the relative bias `table[index[i,j], h]` to the
//! logits, and GELU is the exact erf form.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, TensorId};

use super::config::{Layout, SHARED_INDEX, SHARED_TABLE};
use super::layers::{
    attention_t, check_shape, fused, softmax_last, transposed, BiasTable, LayerNorm, Linear, PatchEmbed, Weights,
};
use super::{Arch, BackboneConfig, Features, Result, VerifyError, WeightMap, LOAD_READY_HINT};

/// Runs the MMSeg backbone on MMSeg-layout weights; `input` is `[B, 3, img_size, img_size]`.
/// Returns the patch tokens after each block in `cfg.out_indices`, as `[B, C, H/p, W/p]`.
pub fn mmseg_forward(w: &WeightMap, cfg: &BackboneConfig, input: &Tensor) -> Result<Features> {
    keep_freed_memory();
    Backbone::new(w, cfg, Layout::MMSeg, Reading::Strict, input.device())?.forward(input)
}

/// Runs the same network on the official MAE (timm `VisionTransformer`) or BEiT (unilm)
/// layout, at the checkpoint's native size (no resizing of `pos_embed` or tables).
pub fn original_forward(w: &WeightMap, cfg: &BackboneConfig, input: &Tensor) -> Result<Features> {
    keep_freed_memory();
    Backbone::new(w, cfg, Layout::Original, Reading::AsStored, input.device())?.forward(input)
}

/// Runs the network on a source checkpoint's weights in `layout`'s names, read as the source
/// model reads them (the original-layout rules of the table above, whatever the names): a
/// per-block table, else the shared `rel_pos_bias` table, else none; stored indexes as
/// stored; absent gammas = 1; `pos_embed` used when present (required for MAE). This is how
/// an mmpretrain checkpoint (MMSeg names, shared BEiT table, no MAE layer scale) runs.
pub fn source_forward(w: &WeightMap, cfg: &BackboneConfig, layout: Layout, input: &Tensor) -> Result<Features> {
    keep_freed_memory();
    Backbone::new(w, cfg, layout, Reading::AsStored, input.device())?.forward(input)
}

/// How the weights are read: as MMSeg's backbone after `load_state_dict` (every tensor it
/// holds required, its own relative index), or as the source model stored them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reading {
    Strict,
    AsStored,
}

/// Tells glibc's allocator to keep large freed blocks for reuse instead of handing each back
/// to the kernel: a forward pass allocates and frees activations of many MB per layer, and
/// every fresh block is page faults plus the kernel zeroing its pages (16% of a 512-px ViT-B
/// forward). Affects the whole process: the heap keeps its peak size until exit.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator tunables; any value is valid.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
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
    cpu: BiasTable, // the same, laid out for the fused CPU softmax
}

impl RelBias {
    /// `index` must have been checked against the table's rows.
    fn new(table: Tensor, index: &Index, tokens: usize) -> Result<Self> {
        let cpu = BiasTable::new(&table, index.flat.clone(), index.window)?
            .ok_or_else(|| VerifyError::Config("a relative-position index reads outside its table".to_string()))?;
        Ok(RelBias { table, index: index.tensor.clone(), tokens, cpu })
    }

    /// `[H, T, T]`: `bias[h, i, j] = table[index[i, j], h]`.
    fn bias(&self) -> Result<Tensor> {
        let h = self.table.dim(1)?;
        let g = self.table.index_select(&self.index, 0)?; // [T*T, H]
        Ok(g.reshape((self.tokens, self.tokens, h))?.permute((2, 0, 1))?.contiguous()?)
    }
}

/// A checked relative-position index, both as a tensor (for the generic path) and as plain
/// u32s (for the fused CPU softmax). Blocks whose stored index is one shared tensor share it.
#[derive(Clone)]
struct Index {
    tensor: Tensor,
    flat: Arc<[u32]>,
    /// `Some(W)` when this is the standard index of a W×W window (the one MMSeg builds).
    window: Option<usize>,
}

struct Attention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    scale: f64,
    rel: Option<RelBias>,
}

impl Attention {
    /// Attention up to (not including) the output projection, token-major, any device:
    /// `[B, T, C]` → `[B, T, C]` with the heads side by side, as
    /// `(attn @ v).transpose(1, 2).reshape(B, T, C)`.
    fn heads(&self, x: &Tensor, shared_bias: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let h = self.num_heads;
        let hd = c / h;
        let qkv = self.qkv.forward(x)?.reshape((b, t, 3, h, hd))?.permute((2, 0, 3, 1, 4))?; // [3, B, H, T, hd]
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
        Ok(attn.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))?)
    }

    /// The same on the CPU, feature-major: `xt [C, B·T]` → `[C, B·T]`.
    ///
    /// One head of one image at a time per thread, so a head's `[T, T]` logits stay in cache
    /// (at 512 px all heads' logits would be 50 MB per block); see [`attention_t`].
    fn heads_t(&self, xt: &Tensor, b: usize, shared: Option<&RelBias>) -> Result<Tensor> {
        let qkv = self.qkv.forward_t(xt, false)?; // [3C, B·T]
        let rel = self.rel.as_ref().or(shared);
        attention_t(&qkv, b, self.num_heads, self.scale as f32, rel.map(|r| &r.cpu))
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
    /// Token-major, any device: `[B, T, C]` → `[B, T, C]`.
    fn forward(&self, x: &Tensor, shared_bias: Option<&Tensor>) -> Result<Tensor> {
        let mut y = self.attn.proj.forward(&self.attn.heads(&self.ln1.forward(x)?, shared_bias)?)?;
        if let Some(g) = &self.gamma_1 {
            y = y.broadcast_mul(g)?;
        }
        let x = (x + y)?;
        let mut y = self.fc2.forward(&self.fc1.forward(&self.ln2.forward(&x)?)?.gelu_erf()?)?;
        if let Some(g) = &self.gamma_2 {
            y = y.broadcast_mul(g)?;
        }
        Ok((x + y)?)
    }

    /// Feature-major (the CPU path): `xt [C, B·T]` → `[C, B·T]`, `b` images.
    fn forward_t(&self, xt: &Tensor, b: usize, shared: Option<&RelBias>) -> Result<Tensor> {
        let a = self.attn.heads_t(&self.ln1.forward_t(xt)?, b, shared)?;
        let xt = self.attn.proj.forward_residual_t(&a, xt, self.gamma_1.as_ref())?;
        let hidden = self.fc1.forward_t(&self.ln2.forward_t(&xt)?, true)?;
        self.fc2.forward_residual_t(&hidden, &xt, self.gamma_2.as_ref())
    }
}

/// A checked index and whether it was checked against the generated one.
struct MemoIndex {
    index: Index,
    checked_generated: bool,
}

/// What every layer's constructor needs besides its weights: the configuration, the layout,
/// and the relative-position indexes read so far (blocks often share one stored tensor, so
/// each distinct index is read, checked and converted once).
struct Build<'a> {
    cfg: &'a BackboneConfig,
    layout: Layout,
    reading: Reading,
    device: &'a Device,
    /// The index MMSeg builds for this grid.
    generated: Vec<i64>,
    /// Why a tensor sized for another image size is wrong here.
    size_hint: String,
    memo: RefCell<HashMap<Option<TensorId>, MemoIndex>>,
}

impl Build<'_> {
    /// The index stored at `w`'s `name` (or the generated one when absent), checked against
    /// the table's rows and, when `must_equal_generated`, against MMSeg's own.
    fn index(&self, w: &Weights, name: &str, must_equal_generated: bool) -> Result<Index> {
        let (cfg, t, rows) = (self.cfg, self.cfg.tokens(), self.cfg.table_rows());
        let key = w.key(name);
        let stored = w.raw(name);
        let id = stored.map(Tensor::id);
        if let Some(hit) = self.memo.borrow().get(&id) {
            if stored.is_none() || !must_equal_generated || hit.checked_generated {
                return Ok(hit.index.clone());
            }
        }
        let to_index = |v: Vec<i64>| -> Result<Index> {
            let flat: Arc<[u32]> = v.iter().map(|&i| i as u32).collect();
            Ok(Index {
                window: (v == self.generated).then_some(cfg.grid()),
                tensor: Tensor::from_vec(v, t * t, self.device)?,
                flat,
            })
        };
        let index = match stored {
            None => to_index(self.generated.clone())?,
            Some(stored) => {
                check_shape(&key, stored, &[t, t], &self.size_hint)?;
                let v: Vec<i64> = stored.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
                if must_equal_generated && v != self.generated {
                    return Err(VerifyError::Config(format!(
                        "'{key}' is not the index MMSeg builds for a {0}x{0} window; \
                         regenerate it in the conversion (or drop it: MMSeg rebuilds it)",
                        cfg.grid()
                    )));
                }
                if let Some(bad) = v.iter().find(|&&i| i < 0 || i as usize >= rows) {
                    return Err(VerifyError::Config(format!("'{key}' holds {bad}, outside the table's {rows} rows")));
                }
                to_index(v)?
            }
        };
        let checked_generated = stored.is_none() || must_equal_generated;
        self.memo.borrow_mut().insert(id, MemoIndex { index: index.clone(), checked_generated });
        Ok(index)
    }

    /// A relative-position table at `w`'s `table` with its index, shape-checked.
    fn rel_bias(&self, w: &Weights, table: Tensor, index_name: &str, must_equal_generated: bool) -> Result<RelBias> {
        let key = w.key("relative_position_bias_table");
        check_shape(&key, &table, &[self.cfg.table_rows(), self.cfg.num_heads], &self.size_hint)?;
        RelBias::new(table, &self.index(w, index_name, must_equal_generated)?, self.cfg.tokens())
    }
}

impl Attention {
    /// `w` is the block's `attn`: `qkv` (with a full bias for MAE, `q_bias`/`v_bias` for
    /// BEiT), `proj`, and the block's relative-position table.
    fn new(w: &Weights, b: &Build) -> Result<Self> {
        let (cfg, d) = (b.cfg, b.cfg.embed_dim);
        let qkv_w = w.req_shaped("qkv.weight", &[3 * d, d], "every block has a fused q/k/v projection")?;
        let qkv_b = match cfg.arch {
            Arch::Mae => w.req_shaped("qkv.bias", &[3 * d], "MAE blocks have a full q/k/v bias")?,
            Arch::Beit => {
                let hint = "BEiT blocks have q and v biases (the k bias is zero)";
                let q = w.req_shaped("q_bias", &[d], hint)?;
                let v = w.req_shaped("v_bias", &[d], hint)?;
                Tensor::cat(&[&q, &q.zeros_like()?, &v], 0)?
            }
        };
        let strict = b.reading == Reading::Strict;
        let table = match b.reading {
            Reading::Strict => Some(w.req("relative_position_bias_table", LOAD_READY_HINT)?),
            Reading::AsStored => w.opt("relative_position_bias_table")?,
        };
        let rel = match table {
            // MMSeg rebuilds its index, so a stored one must be that one.
            Some(table) => Some(b.rel_bias(w, table, "relative_position_index", strict)?),
            None => None,
        };
        Ok(Attention {
            qkv: Linear::from_parts(qkv_w, qkv_b)?,
            proj: Linear::new(&w.pp("proj"), d, d)?,
            num_heads: cfg.num_heads,
            scale: (cfg.head_dim() as f64).powf(-0.5),
            rel,
        })
    }
}

impl Block {
    /// `w` is `blocks.i` (original) or `layers.i` (MMSeg).
    fn new(w: &Weights, b: &Build) -> Result<Self> {
        let (cfg, n, d) = (b.cfg, b.layout.names(), b.cfg.embed_dim);
        let gamma = |name: &str| -> Result<Option<Tensor>> {
            match b.reading {
                Reading::Strict => Ok(Some(w.req_shaped(name, &[d], LOAD_READY_HINT)?)),
                Reading::AsStored => w.opt_shaped(name, &[d]),
            }
        };
        Ok(Block {
            ln1: LayerNorm::new(&w.pp(n.ln1), d, cfg.ln_eps)?,
            attn: Attention::new(&w.pp("attn"), b)?,
            ln2: LayerNorm::new(&w.pp(n.ln2), d, cfg.ln_eps)?,
            fc1: Linear::new(&w.pp(n.fc1), d, cfg.mlp_hidden)?,
            fc2: Linear::new(&w.pp(n.fc2), cfg.mlp_hidden, d)?,
            gamma_1: gamma("gamma_1")?,
            gamma_2: gamma("gamma_2")?,
        })
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
    fn new(map: &WeightMap, cfg: &BackboneConfig, layout: Layout, reading: Reading, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let w = Weights::new(map, device);
        let n = layout.names();
        let (d, t) = (cfg.embed_dim, cfg.tokens());
        let b = Build {
            cfg,
            layout,
            reading,
            device,
            generated: relative_position_index_vec(cfg.grid()),
            size_hint: format!(
                "the model is built for img_size {} (patch {}, {} tokens); weights at another \
                 size must be resized by the conversion",
                cfg.img_size, cfg.patch_size, t
            ),
            memo: RefCell::new(HashMap::new()),
        };

        let patch_embed = PatchEmbed::new(&w.pp(n.patch), d, cfg.patch_size)?;
        let cls_token = w.req_shaped("cls_token", &[1, 1, d], "the cls token is prepended to the patches")?;
        let pos_embed = match (reading, cfg.arch) {
            (Reading::Strict, Arch::Beit) => None, // MMSeg's BEiT has no absolute positions
            (Reading::Strict, Arch::Mae) => {
                Some(w.req("pos_embed", "MMSeg's MAE adds an absolute position embedding")?)
            }
            (Reading::AsStored, Arch::Mae) => {
                Some(w.req("pos_embed", "the MAE encoder adds an absolute position embedding")?)
            }
            (Reading::AsStored, Arch::Beit) => w.opt("pos_embed")?,
        };
        if let Some(pe) = &pos_embed {
            check_shape("pos_embed", pe, &[1, t, d], &b.size_hint)?;
        }
        // BEiT pretraining checkpoints (unilm, mmpretrain) share one table among all blocks.
        let shared = match (reading, w.opt(SHARED_TABLE)?) {
            (Reading::AsStored, Some(table)) => {
                let rel = w.pp(SHARED_TABLE.rsplit_once('.').map_or("", |(p, _)| p));
                let index_name = SHARED_INDEX.rsplit('.').next().unwrap_or(SHARED_INDEX);
                Some(b.rel_bias(&rel, table, index_name, false)?)
            }
            _ => None,
        };
        let blocks =
            (0..cfg.depth).map(|i| Block::new(&w.pp(format!("{}.{i}", n.blocks)), &b)).collect::<Result<_>>()?;
        Ok(Backbone { cfg: cfg.clone(), patch_embed, cls_token, pos_embed, shared, blocks })
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
        let kept = if fused(&input) { self.blocks_t(&input)? } else { self.blocks(&input)? };
        Ok(cfg
            .out_indices
            .iter()
            .map(|&i| {
                let t = kept.iter().find(|(k, _)| *k == i).expect("computed above");
                (i, t.1.clone())
            })
            .collect())
    }

    /// Token-major, any device: the maps after the blocks in `out_indices`, block order.
    fn blocks(&self, input: &Tensor) -> Result<Vec<(usize, Tensor)>> {
        let cfg = &self.cfg;
        let b = input.dim(0)?;
        let x = self.patch_embed.forward(input)?; // [B, N, D]
        let cls = self.cls_token.broadcast_as((b, 1, cfg.embed_dim))?;
        let mut x = Tensor::cat(&[&cls, &x], 1)?;
        if let Some(pe) = &self.pos_embed {
            x = x.broadcast_add(pe)?;
        }
        let shared_bias = self.shared.as_ref().map(RelBias::bias).transpose()?;
        let last = *cfg.out_indices.iter().max().expect("validated non-empty");
        let g = cfg.grid();
        let mut kept = Vec::with_capacity(cfg.out_indices.len());
        for (i, block) in self.blocks.iter().enumerate().take(last + 1) {
            x = block.forward(&x, shared_bias.as_ref())?;
            if cfg.out_indices.contains(&i) {
                let map =
                    x.narrow(1, 1, g * g)?.reshape((b, g, g, cfg.embed_dim))?.permute((0, 3, 1, 2))?.contiguous()?;
                kept.push((i, map));
            }
        }
        Ok(kept)
    }

    /// The same computation feature-major on the CPU (see `layers`): activations `[D, B·T]`,
    /// images side by side, so an output map is a column block reshaped, no permute.
    fn blocks_t(&self, input: &Tensor) -> Result<Vec<(usize, Tensor)>> {
        let cfg = &self.cfg;
        let (b, d, g) = (input.dim(0)?, cfg.embed_dim, cfg.grid());
        let (n, t) = (g * g, cfg.tokens());
        let patches = self.patch_embed.forward_t(input)?; // [D, B·N]
        let cls = self.cls_token.reshape((d, 1))?;
        let pos = self.pos_embed.as_ref().map(|pe| transposed(&pe.reshape((t, d))?)).transpose()?; // [D, T]
        let mut images = Vec::with_capacity(b);
        for bi in 0..b {
            let mut image = Tensor::cat(&[&cls, &patches.narrow(1, bi * n, n)?], 1)?; // [D, T]
            if let Some(pos) = &pos {
                image = (image + pos)?;
            }
            images.push(image);
        }
        let mut xt = Tensor::cat(&images, 1)?; // [D, B·T]
        let last = *cfg.out_indices.iter().max().expect("validated non-empty");
        let mut kept = Vec::with_capacity(cfg.out_indices.len());
        for (i, block) in self.blocks.iter().enumerate().take(last + 1) {
            xt = block.forward_t(&xt, b, self.shared.as_ref())?;
            if cfg.out_indices.contains(&i) {
                let maps = (0..b)
                    .map(|bi| xt.narrow(1, bi * t + 1, n)?.reshape((d, g, g)))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                kept.push((i, Tensor::stack(&maps, 0)?)); // [B, D, g, g]
            }
        }
        Ok(kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::random::random_weights;
    use crate::verify::SplitMix64;

    /// The CPU path (feature-major, fused kernels) against the generic token-major path
    /// that other devices take, on the same CPU: MAE and BEiT, both layouts, two images,
    /// per-block tables, a shared table, and a non-standard index (the gathering softmax).
    #[test]
    fn cpu_path_matches_the_generic_path() {
        let cfg = |arch| BackboneConfig {
            arch,
            img_size: 48,
            patch_size: 16,
            embed_dim: 32,
            depth: 3,
            num_heads: 4,
            mlp_hidden: 64,
            out_indices: vec![2, 0],
            ln_eps: 1e-6,
        };
        let mut rng = SplitMix64::new(5);
        let v: Vec<f32> = (0..2 * 3 * 48 * 48).map(|_| rng.next_signed_unit()).collect();
        let input = Tensor::from_vec(v, (2, 3, 48, 48), &Device::Cpu).unwrap();
        let mut cases = Vec::new();
        for arch in [Arch::Mae, Arch::Beit] {
            for layout in [Layout::MMSeg, Layout::Original] {
                let c = cfg(arch);
                cases.push((c.clone(), layout, random_weights(&c, layout, 3, &Device::Cpu).unwrap()));
            }
        }
        let c = cfg(Arch::Beit);
        let (rows, t) = (c.table_rows(), c.tokens());
        // Original BEiT with one shared table instead of per-block ones.
        let mut shared = random_weights(&c, Layout::Original, 4, &Device::Cpu).unwrap();
        let table = shared.remove("blocks.0.attn.relative_position_bias_table").unwrap();
        let index = shared.remove("blocks.0.attn.relative_position_index").unwrap();
        for i in 1..c.depth {
            shared.remove(&format!("blocks.{i}.attn.relative_position_bias_table"));
            shared.remove(&format!("blocks.{i}.attn.relative_position_index"));
        }
        shared.insert(SHARED_TABLE.to_string(), table);
        shared.insert(SHARED_INDEX.to_string(), index);
        cases.push((c.clone(), Layout::Original, shared));
        // Original BEiT whose stored index is valid but not the standard one.
        let mut odd = random_weights(&c, Layout::Original, 6, &Device::Cpu).unwrap();
        let reversed: Vec<i64> = (0..t * t).map(|k| (rows - 1 - (k % rows)) as i64).collect();
        let reversed = Tensor::from_vec(reversed, (t, t), &Device::Cpu).unwrap();
        for i in 0..c.depth {
            odd.insert(format!("blocks.{i}.attn.relative_position_index"), reversed.clone());
        }
        cases.push((c, Layout::Original, odd));

        for (n, (cfg, layout, w)) in cases.iter().enumerate() {
            let reading = if *layout == Layout::MMSeg { Reading::Strict } else { Reading::AsStored };
            let bb = Backbone::new(w, cfg, *layout, reading, &Device::Cpu).unwrap();
            let generic = bb.blocks(&input).unwrap();
            let fused = bb.blocks_t(&input).unwrap();
            assert_eq!(generic.len(), fused.len());
            for ((i, a), (j, b)) in generic.iter().zip(&fused) {
                assert_eq!((i, a.dims()), (j, b.dims()));
                let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(diff <= 1e-5 * scale, "case {n} block {i}: max diff {diff}, scale {scale}");
            }
        }
    }

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
