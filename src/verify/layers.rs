//! The few neural-network layers a ViT needs, on candle-core tensors (no candle-nn).
//!
//! Numerics follow PyTorch: LayerNorm with biased variance and eps inside the square root,
//! `Linear` as `x · Wᵀ + b`, softmax with the row maximum subtracted, the exact (erf) GELU.
//!
//! Each layer has two forms. The plain one (`forward`) takes token-major activations
//! `[..., tokens, features]` and is written with candle ops only, so it runs on any device.
//! The `_t` one takes and returns feature-major activations `[features, tokens]` and, on the
//! CPU, runs the fused kernels of `kernels.rs`. Feature-major is what candle's CPU matmul (the `gemm`
//! crate) wants here: it computes `Y = W · X` with `W` the weight exactly as the checkpoint
//! stores it (`[out, in]`) and `X` `[in, tokens]`, a layout gemm reads without packing the
//! weight and packs the activations with plain block copies. The token-major product
//! `X · Wᵀ` makes gemm gather-pack the whole weight on every call (a third of the time at
//! 224 px), and pre-transposing the weights costs a copy of all of them per model build.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};

use super::kernels;
pub(crate) use super::kernels::{attention_t, fused, transposed};
use super::matmul::matmul;
use super::{Result, VerifyError, WeightMap};

/// Looks up weights under one prefix, moving them to the compute device as f32 and checking
/// shapes, so every error names the full key. As candle's `VarBuilder`: `w.pp("attn")`
/// scopes to `<prefix>.attn`, so each layer's constructor names only its own parameters.
#[derive(Clone)]
pub(crate) struct Weights<'a> {
    map: &'a WeightMap,
    device: Device,
    prefix: String,
}

impl<'a> Weights<'a> {
    pub fn new(map: &'a WeightMap, device: &Device) -> Self {
        Weights { map, device: device.clone(), prefix: String::new() }
    }

    /// The same weights under `<prefix>.<name>` (a dotted `name` scopes several levels).
    pub fn pp(&self, name: impl std::fmt::Display) -> Weights<'a> {
        Weights { map: self.map, device: self.device.clone(), prefix: self.key(&name.to_string()) }
    }

    /// The full key of `name` under this prefix.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The tensor `name`, if present, as f32 on the compute device.
    pub fn opt(&self, name: &str) -> Result<Option<Tensor>> {
        match self.map.get(&self.key(name)) {
            None => Ok(None),
            Some(t) => Ok(Some(t.to_dtype(DType::F32)?.to_device(&self.device)?)),
        }
    }

    /// The tensor `name`, or a [`VerifyError::MissingKey`] carrying `hint`.
    pub fn req(&self, name: &str, hint: &str) -> Result<Tensor> {
        self.opt(name)?.ok_or_else(|| VerifyError::MissingKey { key: self.key(name), hint: hint.to_string() })
    }

    /// Like [`Weights::req`], and the shape must be `expected`.
    pub fn req_shaped(&self, name: &str, expected: &[usize], hint: &str) -> Result<Tensor> {
        let t = self.req(name, hint)?;
        check_shape(&self.key(name), &t, expected, "")?;
        Ok(t)
    }

    /// Like [`Weights::opt`], and a present tensor must have shape `expected`.
    pub fn opt_shaped(&self, name: &str, expected: &[usize]) -> Result<Option<Tensor>> {
        let t = self.opt(name)?;
        if let Some(t) = &t {
            check_shape(&self.key(name), t, expected, "")?;
        }
        Ok(t)
    }

    /// The raw tensor (any dtype), e.g. an integer index.
    pub fn raw(&self, name: &str) -> Option<&'a Tensor> {
        self.map.get(&self.key(name))
    }
}

pub(crate) fn check_shape(key: &str, t: &Tensor, expected: &[usize], hint: &str) -> Result<()> {
    if t.dims() != expected {
        return Err(VerifyError::Shape {
            key: key.to_string(),
            got: t.dims().to_vec(),
            expected: expected.to_vec(),
            hint: hint.to_string(),
        });
    }
    Ok(())
}

const WEIGHT_HINT: &str = "every block needs it; is the checkpoint complete?";

/// `nn.LayerNorm(dim, eps)` over the features.
pub(crate) struct LayerNorm {
    pub(super) weight: Tensor,
    pub(super) bias: Tensor,
    pub(super) eps: f64,
    // The same weight and bias as plain numbers, for the fused CPU kernel.
    pub(super) weight_v: Vec<f32>,
    pub(super) bias_v: Vec<f32>,
}

impl LayerNorm {
    /// Reads `weight` and `bias` of `w`'s prefix.
    pub fn new(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        let weight = w.req_shaped("weight", &[dim], WEIGHT_HINT)?;
        let bias = w.req_shaped("bias", &[dim], WEIGHT_HINT)?;
        Ok(LayerNorm { weight_v: weight.to_vec1()?, bias_v: bias.to_vec1()?, weight, bias, eps })
    }

    /// Token-major: normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(normed.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }

    /// Feature-major: `xt [C, N]`, each column normalised.
    pub fn forward_t(&self, xt: &Tensor) -> Result<Tensor> {
        if !fused(xt) {
            return Ok(self.forward(&xt.t()?)?.t()?.contiguous()?);
        }
        kernels::layer_norm_columns(xt, &self.weight_v, &self.bias_v, self.eps as f32)
    }
}

/// `nn.Linear(in, out)`: weight `[out, in]`, bias `[out]`. The weight is kept as the
/// checkpoint stores it: building a model copies no weights.
pub(crate) struct Linear {
    weight: Tensor,
    bias: Tensor,
    bias_v: Vec<f32>,
}

impl Linear {
    /// Reads `weight` and `bias` of `w`'s prefix.
    pub fn new(w: &Weights, inp: usize, out: usize) -> Result<Self> {
        let weight = w.req_shaped("weight", &[out, inp], WEIGHT_HINT)?;
        let bias = w.req_shaped("bias", &[out], WEIGHT_HINT)?;
        Self::from_parts(weight, bias)
    }

    pub fn from_parts(weight: Tensor, bias: Tensor) -> Result<Self> {
        Ok(Linear { bias_v: bias.to_vec1()?, weight, bias })
    }

    /// Token-major: `x [..., in]` → `x · Wᵀ + b`, `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (lead, inp) = dims.split_at(dims.len() - 1);
        let rows: usize = lead.iter().product();
        let x2 = x.contiguous()?.reshape((rows, inp[0]))?;
        let y = x2.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?;
        let mut out_dims = lead.to_vec();
        out_dims.push(self.weight.dim(0)?);
        Ok(y.reshape(out_dims)?)
    }

    /// Feature-major: `xt [in, N]` → `W · xt + b`, `[out, N]`; then the exact GELU if `gelu`.
    /// On the CPU the bias and the GELU are applied in place on the fresh product.
    pub fn forward_t(&self, xt: &Tensor, gelu: bool) -> Result<Tensor> {
        let y = matmul(&self.weight, xt)?;
        if fused(&y) {
            kernels::add_row_bias(&y, &self.bias_v, gelu)?;
            return Ok(y);
        }
        let y = y.broadcast_add(&self.bias.unsqueeze(1)?)?;
        Ok(if gelu { y.gelu_erf()? } else { y })
    }

    /// Feature-major end of a residual branch: `residual + gamma ⊙ (W · xt + b)` (without
    /// gamma: `residual + (W · xt + b)`), evaluated in that order; `residual [out, N]`.
    pub fn forward_residual_t(&self, xt: &Tensor, residual: &Tensor, gamma: Option<&Tensor>) -> Result<Tensor> {
        let y = matmul(&self.weight, xt)?;
        if fused(&y) && fused(residual) && y.dims() == residual.dims() {
            let gamma_v = gamma.map(|g| g.to_vec1::<f32>()).transpose()?;
            kernels::add_row_residual(&y, residual, &self.bias_v, gamma_v.as_deref())?;
            return Ok(y);
        }
        let mut y = y.broadcast_add(&self.bias.unsqueeze(1)?)?;
        if let Some(g) = gamma {
            y = y.broadcast_mul(&g.unsqueeze(1)?)?;
        }
        Ok((residual + y)?)
    }
}

/// `Conv2d(3, D, kernel=p, stride=p, padding=0)` followed by `flatten(2).transpose(1,2)`:
/// since the patches do not overlap this is one matmul over the unfolded patches.
pub(crate) struct PatchEmbed {
    proj: Linear, // weight [D, 3*p*p], columns in (channel, ky, kx) order like the conv kernel
    patch: usize,
    in_chans: usize,
}

impl PatchEmbed {
    pub fn new(w: &Weights, dim: usize, patch: usize) -> Result<Self> {
        let key = w.key("weight");
        let weight = w.req("weight", "the patch embedding is the model's first layer")?;
        let d = weight.dims().to_vec();
        if d.len() != 4 || d[0] != dim || d[2] != patch || d[3] != patch {
            return Err(VerifyError::Shape { key, got: d, expected: vec![dim, 3, patch, patch], hint: String::new() });
        }
        let in_chans = d[1];
        let bias = w.req_shaped("bias", &[dim], "the patch-embedding convolution has a bias")?;
        let proj = Linear::from_parts(weight.reshape((dim, in_chans * patch * patch))?, bias)?;
        Ok(PatchEmbed { proj, patch, in_chans })
    }

    fn grid(&self, x: &Tensor) -> Result<(usize, usize, usize, usize)> {
        let (b, c, h, w) = x.dims4()?;
        let p = self.patch;
        if c != self.in_chans || h % p != 0 || w % p != 0 {
            return Err(VerifyError::Input(format!(
                "shape [{b}, {c}, {h}, {w}] does not fit a {}-channel patch-{p} embedding",
                self.in_chans
            )));
        }
        Ok((b, c, h / p, w / p))
    }

    /// Token-major: `[B, C, H, W]` → `[B, (H/p)*(W/p), D]`, patches row-major.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, hp, wp) = self.grid(x)?;
        let p = self.patch;
        let patches = x
            .reshape((b, c, hp, p, wp, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * hp * wp, c * p * p))?;
        let y = self.proj.forward(&patches)?;
        let d = y.dim(1)?;
        Ok(y.reshape((b, hp * wp, d))?)
    }

    /// Feature-major: `[B, C, H, W]` → `[D, B·(H/p)·(W/p)]`, images one after the other,
    /// patches row-major within each.
    pub fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, hp, wp) = self.grid(x)?;
        let p = self.patch;
        let patches_t = x
            .reshape((b, c, hp, p, wp, p))?
            .permute((1, 3, 5, 0, 2, 4))?
            .contiguous()?
            .reshape((c * p * p, b * hp * wp))?;
        self.proj.forward_t(&patches_t, false)
    }
}

/// Softmax over the last dimension, with the row maximum subtracted first.
pub(crate) fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// A relative-position bias table split by head, with the flat index that reads it, checked
/// once so that every index entry reads inside the table (the fused softmax relies on it).
pub(crate) struct BiasTable {
    pub(super) columns: Vec<Vec<f32>>,  // [H][rows]
    pub(super) reversed: Vec<Vec<f32>>, // [H][rows], each column back to front (for `window`)
    pub(super) index: Arc<[u32]>,       // [T*T]
    pub(super) window: Option<usize>,
}

impl BiasTable {
    /// `table [rows, H]` and `index [T*T]`; `None` if an index entry is outside the table.
    /// `window: Some(W)` promises that `index` is the standard relative-position index of a
    /// W×W window (`relative_position_index`), whose structure lets the softmax read the
    /// table in contiguous runs instead of gathering it entry by entry.
    pub fn new(table: &Tensor, index: Arc<[u32]>, window: Option<usize>) -> Result<Option<Self>> {
        let rows: Vec<Vec<f32>> = table.to_vec2()?;
        match window {
            // The structured read indexes the table with bounds checks; only the sizes matter.
            Some(w) => {
                let tokens = w * w + 1;
                if index.len() != tokens * tokens || rows.len() != (2 * w - 1) * (2 * w - 1) + 3 {
                    return Ok(None);
                }
            }
            // The gathering read does not check bounds: check every entry here, once.
            None => {
                if index.iter().any(|&i| i as usize >= rows.len()) {
                    return Ok(None);
                }
            }
        }
        let heads = table.dim(1)?;
        let columns: Vec<Vec<f32>> = (0..heads).map(|h| rows.iter().map(|r| r[h]).collect()).collect();
        let reversed = match window {
            Some(_) => columns.iter().map(|c| c.iter().rev().copied().collect()).collect(),
            None => Vec::new(),
        };
        Ok(Some(BiasTable { columns, reversed, index, window }))
    }
}
