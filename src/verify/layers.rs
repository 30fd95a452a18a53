//! The few neural-network layers a ViT needs, on candle-core tensors (no candle-nn).
//!
//! Numerics follow PyTorch: LayerNorm with biased variance and eps inside the square root,
//! `Linear` as `x · Wᵀ + b`, softmax with the row maximum subtracted.

use candle_core::{DType, Device, Tensor, D};

use super::{Result, VerifyError, WeightMap};

/// Looks up weights under one prefix, moving them to the compute device as f32 and checking
/// shapes, so every error names the full key.
pub(crate) struct Weights<'a> {
    map: &'a WeightMap,
    device: Device,
}

impl<'a> Weights<'a> {
    pub fn new(map: &'a WeightMap, device: &Device) -> Self {
        Weights {
            map,
            device: device.clone(),
        }
    }

    /// The tensor at `key`, if present, as f32 on the compute device.
    pub fn opt(&self, key: &str) -> Result<Option<Tensor>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(t) => Ok(Some(t.to_dtype(DType::F32)?.to_device(&self.device)?)),
        }
    }

    /// The tensor at `key`, or a [`VerifyError::MissingKey`] carrying `hint`.
    pub fn req(&self, key: &str, hint: &str) -> Result<Tensor> {
        self.opt(key)?.ok_or_else(|| VerifyError::MissingKey {
            key: key.to_string(),
            hint: hint.to_string(),
        })
    }

    /// Like [`Weights::req`], and the shape must be `expected`.
    pub fn req_shaped(&self, key: &str, expected: &[usize], hint: &str) -> Result<Tensor> {
        let t = self.req(key, hint)?;
        check_shape(key, &t, expected, "")?;
        Ok(t)
    }

    /// Like [`Weights::opt`], and a present tensor must have shape `expected`.
    pub fn opt_shaped(&self, key: &str, expected: &[usize]) -> Result<Option<Tensor>> {
        let t = self.opt(key)?;
        if let Some(t) = &t {
            check_shape(key, t, expected, "")?;
        }
        Ok(t)
    }

    /// The raw tensor (any dtype), e.g. an integer index.
    pub fn raw(&self, key: &str) -> Option<&'a Tensor> {
        self.map.get(key)
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

/// `nn.LayerNorm(dim, eps)` over the last dimension.
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(w: &Weights, prefix: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.req_shaped(&format!("{prefix}.weight"), &[dim], WEIGHT_HINT)?,
            bias: w.req_shaped(&format!("{prefix}.bias"), &[dim], WEIGHT_HINT)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?)
    }
}

/// `nn.Linear(in, out)`: weight `[out, in]`, optional bias `[out]`.
pub(crate) struct Linear {
    weight_t: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Reads `<prefix>.weight` and `<prefix>.bias` (both required).
    pub fn new(w: &Weights, prefix: &str, inp: usize, out: usize) -> Result<Self> {
        let weight = w.req_shaped(&format!("{prefix}.weight"), &[out, inp], WEIGHT_HINT)?;
        let bias = w.req_shaped(&format!("{prefix}.bias"), &[out], WEIGHT_HINT)?;
        Self::from_parts(weight, Some(bias))
    }

    pub fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        // Stored transposed and contiguous: [in, out], so the matmul runs on plain rows.
        Ok(Linear {
            weight_t: weight.t()?.contiguous()?,
            bias,
        })
    }

    /// `x [..., in]` → `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (lead, inp) = dims.split_at(dims.len() - 1);
        let rows: usize = lead.iter().product();
        let x2 = x.contiguous()?.reshape((rows, inp[0]))?;
        let mut y = x2.matmul(&self.weight_t)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let mut out_dims = lead.to_vec();
        out_dims.push(self.weight_t.dim(1)?);
        Ok(y.reshape(out_dims)?)
    }
}

/// Softmax over the last dimension, with the row maximum subtracted first.
pub(crate) fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// `Conv2d(3, D, kernel=p, stride=p, padding=0)` followed by `flatten(2).transpose(1,2)`:
/// since the patches do not overlap this is one matmul over the unfolded patches.
pub(crate) struct PatchEmbed {
    weight_t: Tensor, // [3*p*p, D], rows in (channel, ky, kx) order like the conv kernel
    bias: Tensor,
    patch: usize,
    in_chans: usize,
}

impl PatchEmbed {
    pub fn new(w: &Weights, prefix: &str, dim: usize, patch: usize) -> Result<Self> {
        let key = format!("{prefix}.weight");
        let weight = w.req(&key, "the patch embedding is the model's first layer")?;
        let d = weight.dims().to_vec();
        if d.len() != 4 || d[0] != dim || d[2] != patch || d[3] != patch {
            return Err(VerifyError::Shape {
                key,
                got: d,
                expected: vec![dim, 3, patch, patch],
                hint: String::new(),
            });
        }
        let in_chans = d[1];
        let bias = w.req_shaped(
            &format!("{prefix}.bias"),
            &[dim],
            "the patch-embedding convolution has a bias",
        )?;
        let weight_t = weight
            .reshape((dim, in_chans * patch * patch))?
            .t()?
            .contiguous()?;
        Ok(PatchEmbed {
            weight_t,
            bias,
            patch,
            in_chans,
        })
    }

    /// `[B, C, H, W]` → `[B, (H/p)*(W/p), D]`, patches row-major.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let p = self.patch;
        if c != self.in_chans || h % p != 0 || w % p != 0 {
            return Err(VerifyError::Input(format!(
                "shape [{b}, {c}, {h}, {w}] does not fit a {}-channel patch-{p} embedding",
                self.in_chans
            )));
        }
        let (hp, wp) = (h / p, w / p);
        let patches = x
            .reshape((b, c, hp, p, wp, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * hp * wp, c * p * p))?;
        let y = patches.matmul(&self.weight_t)?.broadcast_add(&self.bias)?;
        Ok(y.reshape((b, hp * wp, self.weight_t.dim(1)?))?)
    }
}
