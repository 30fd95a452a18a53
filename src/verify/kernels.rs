//! The fused CPU kernels behind the layers' feature-major (`_t`) forms: LayerNorm over
//! columns, bias (+GELU), bias + residual, a cache-blocked transpose, and multi-head attention
//! with the relative-position bias read in place.
//!
//! candle runs each elementwise op as its own pass over memory with a freshly allocated
//! result; a ViT block written with them makes a dozen passes over every activation. These
//! kernels do the same arithmetic in one pass, in place where the input is a fresh matmul
//! result, split over as many threads as the matmul uses (see `for_rows`).
//!
//! # Safety contract
//! This is the only module (with `matmul`) that uses raw pointers. Every kernel takes
//! contiguous f32 CPU tensors whose shapes it checks first (returning an error, never
//! reading out of bounds); threads are handed disjoint row ranges of the output (`for_rows`,
//! `RowsPtr`), and a pointer never outlives the storage guard it was taken under.

use candle_core::{CpuStorage, CustomOp1, DType, InplaceOp1, InplaceOp2, Layout, Shape, Tensor};

use super::layers::BiasTable;
use super::{Result, VerifyError};

/// How the fused softmax reads one head's relative bias.
#[derive(Clone, Copy)]
enum RowBias<'a> {
    None,
    /// `column[index[i·T + j]]`.
    Gather {
        column: &'a [f32],
        index: &'a [u32],
    },
    /// The standard index of a `window`×`window` grid, without reading it: for query patch
    /// (h_a, w_a) and the W keys of key row h_b, the index runs down by one from
    /// `(h_a − h_b + W − 1)(2W − 1) + w_a + W − 1`, i.e. a contiguous run of `reversed`.
    Window {
        column: &'a [f32],
        reversed: &'a [f32],
        window: usize,
    },
}

/// In place on one head's attention logits `s [T, T]` (contiguous f32 on the CPU):
/// `softmax_j(s[i, j] · scale + table[index[i, j], head])`, the row maximum subtracted first:
/// scaling q, adding the gathered bias and [`softmax_last`] in one pass while the row is in
/// cache.
#[cfg(test)]
pub(crate) fn softmax_scaled_biased_(s: &Tensor, scale: f32, bias: Option<(&BiasTable, usize)>) -> Result<()> {
    Ok(s.inplace_op1(&SoftmaxOp { scale, bias: row_bias(bias)? })?)
}

fn row_bias(bias: Option<(&BiasTable, usize)>) -> Result<RowBias<'_>> {
    let Some((table, head)) = bias else { return Ok(RowBias::None) };
    let column =
        table.columns.get(head).ok_or_else(|| VerifyError::Config(format!("no head {head} in the bias table")))?;
    Ok(match table.window {
        Some(window) => RowBias::Window { column, reversed: &table.reversed[head], window },
        None => RowBias::Gather { column, index: &table.index },
    })
}

/// Multi-head attention up to the output projection, feature-major, on the CPU:
/// `qkv [3C, B·T]` (the fused projection, contiguous f32) → `[C, B·T]`.
///
/// Heads (of all images) are split over threads, each running its heads start to finish on
/// one core: `logits [T, T] = qᵀ · k`, the fused scale + bias + softmax in place, then
/// `v · attnᵀ`, which is the head's `[hd, T]` rows of the feature-major output, written in
/// place (no concatenation, no transpose). One start and one join per block instead of
/// three synchronised parallel steps per head.
pub(crate) fn attention_t(
    qkv: &Tensor,
    images: usize,
    heads: usize,
    scale: f32,
    bias: Option<&BiasTable>,
) -> Result<Tensor> {
    let (three_c, cols) = qkv.dims2()?;
    let c = three_c / 3;
    let t = cols / images.max(1);
    if three_c != 3 * c || c % heads != 0 || t * images != cols {
        return Err(VerifyError::Config(format!("attention: qkv {three_c}x{cols} for {images} images, {heads} heads")));
    }
    let hd = c / heads;
    let qkv = qkv.contiguous()?;
    let (storage, layout) = qkv.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(VerifyError::Config("attention_t: expects a CPU tensor".into()));
    };
    let (data, _, _) = matrix_ref(cpu, layout, "ckptmap-attention")?;
    // Every head's bias reader, checked before any thread starts.
    let biases: Vec<RowBias> = (0..heads).map(|h| row_bias(bias.map(|b| (b, h)))).collect::<Result<_>>()?;
    if let Some(RowBias::Window { window, .. }) = biases.first() {
        if t != window * window + 1 {
            return Err(VerifyError::Config(format!("attention: {t} tokens for a {window}x{window} window")));
        }
    }
    if let Some(RowBias::Gather { index, .. }) = biases.first() {
        if index.len() != t * t {
            return Err(VerifyError::Config(format!(
                "attention: bias index has {} entries for {t} tokens",
                index.len()
            )));
        }
    }
    let mut out = vec![0f32; c * cols];
    let dst = super::matmul::SendPtr(out.as_mut_ptr());
    let ld = cols as isize;
    let jobs = images * heads;
    let run = |range: std::ops::Range<usize>| {
        let mut logits = vec![0f32; t * t];
        for job in range {
            let (image, head) = (job / heads, job % heads);
            let col0 = image * t;
            let q = data[(head * hd) * cols + col0..].as_ptr();
            let k = data[(c + head * hd) * cols + col0..].as_ptr();
            let v = data[(2 * c + head * hd) * cols + col0..].as_ptr();
            // SAFETY: q, k, v are hd×t blocks of rows of `data` (row stride `cols`), inside
            // it by the shape checks above; `logits` is this thread's own t×t buffer; each
            // job writes only its head's hd rows × t columns of `out`.
            unsafe {
                super::matmul::gemm_into(t, t, hd, logits.as_mut_ptr(), t as isize, 1, q, 1, ld, k, ld, 1);
                softmax_rows(RowsPtr(logits.as_mut_ptr()), 0..t, t, scale, biases[head]);
                let o = dst.get().add((head * hd) * cols + col0);
                super::matmul::gemm_into(hd, t, t, o, ld, 1, v, ld, 1, logits.as_ptr(), 1, t as isize);
            }
        }
    };
    let threads = candle_core::utils::get_num_threads().clamp(1, jobs.max(1));
    if threads < 2 {
        run(0..jobs);
    } else {
        let chunk = jobs.div_ceil(threads);
        let run = &run;
        std::thread::scope(|s| {
            for start in (chunk..jobs).step_by(chunk) {
                s.spawn(move || run(start..(start + chunk).min(jobs)));
            }
            run(0..chunk.min(jobs));
        });
    }
    drop(storage);
    Ok(Tensor::from_vec(out, (c, cols), qkv.device())?)
}

/// The transpose of a 2-D tensor, materialised: `[R, C]` → `[C, R]` contiguous (on the CPU a
/// cache-blocked parallel copy; elsewhere candle's).
pub(crate) fn transposed(x: &Tensor) -> Result<Tensor> {
    if fused(x) {
        return Ok(x.contiguous()?.apply_op1_no_bwd(&TransposeOp)?);
    }
    Ok(x.t()?.contiguous()?)
}

/// True when the fused CPU kernels below apply: an f32 tensor in main memory.
pub(crate) fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

// ---- Fused CPU kernels ---------------------------------------------------------------------
//
// candle runs each elementwise op as its own pass over memory with a freshly allocated
// result; a ViT block written with them makes a dozen passes over every activation. These
// kernels do the same arithmetic in one pass, in place where the input is a fresh matmul
// result, split over as many threads as the matmul uses (see `for_rows`). The exp and erf
// are vectorisable f32 versions (see `exp_f32`, `gelu_f32`); everything else is the plain
// f32 arithmetic of the candle ops.

/// LayerNorm of each column of `xt [C, N]` (f32 on the CPU), one pass.
pub(crate) fn layer_norm_columns(xt: &Tensor, weight: &[f32], bias: &[f32], eps: f32) -> Result<Tensor> {
    Ok(xt.contiguous()?.apply_op1_no_bwd(&ColumnNormOp { weight, bias, eps })?)
}

/// In place on a fresh product `y [R, N]`: `y[r, :] += bias[r]`, then the exact GELU if `gelu`.
pub(crate) fn add_row_bias(y: &Tensor, bias: &[f32], gelu: bool) -> Result<()> {
    Ok(y.inplace_op1(&RowBiasOp { bias, gelu })?)
}

/// In place on a fresh product `y [R, N]`: `y = residual + gamma ⊙ (y + bias)` row-wise.
pub(crate) fn add_row_residual(y: &Tensor, residual: &Tensor, bias: &[f32], gamma: Option<&[f32]>) -> Result<()> {
    Ok(y.inplace_op2(&residual.contiguous()?, &RowResidualOp { bias, gamma })?)
}

/// Compiles `$body` twice, as is and with AVX2 enabled, and picks at run time. Only the
/// vector width changes: Rust never contracts `a * b + c` into an FMA, so both versions
/// compute bit-identical results.
macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn generic($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) {
                    generic($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: this CPU has the feature `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}

/// Below this many elements a kernel runs on the calling thread only: splitting costs a thread
/// start (tens of µs).
const PAR_MIN_ELEMS: usize = 64 * 1024;

/// Calls `f(range)` over `items` work items of about `item_len` elements each, split into
/// equal contiguous ranges over as many threads as candle's matmul uses
/// (`RAYON_NUM_THREADS`, else the physical cores) when the work is large enough.
///
/// Scoped threads rather than candle's own elementwise pool: that pool's worker spins for a
/// while after every job, and on a machine with as many cores as matmul threads it then
/// competes with the matmul that follows (measured: 13% of all samples at 224 px on 2 cores).
fn for_rows(items: usize, item_len: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    let threads = candle_core::utils::get_num_threads().min(items);
    if threads < 2 || items * item_len < PAR_MIN_ELEMS {
        f(0..items);
        return;
    }
    let chunk = items.div_ceil(threads);
    let f = &f;
    std::thread::scope(|s| {
        for t in 1..threads {
            let range = t * chunk..((t + 1) * chunk).min(items);
            if !range.is_empty() {
                s.spawn(move || f(range));
            }
        }
        f(0..chunk.min(items));
    });
}

/// A raw pointer the workers share; each worker touches only its own part.
#[derive(Clone, Copy)]
struct RowsPtr(*mut f32);
unsafe impl Send for RowsPtr {}
unsafe impl Sync for RowsPtr {}

impl RowsPtr {
    /// Row `i` of width `n`.
    ///
    /// # Safety
    /// The parts handed out concurrently must be distinct and inside the buffer.
    unsafe fn row<'a>(self, i: usize, n: usize) -> &'a mut [f32] {
        self.slice(i * n, n)
    }

    /// Elements `start .. start + len`; the same contract as [`RowsPtr::row`].
    unsafe fn slice<'a>(self, start: usize, len: usize) -> &'a mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

/// The contiguous f32 data of a CPU storage under a 2-D `layout`, as (data, rows, columns).
fn matrix_mut<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<(&'a mut [f32], usize, usize)> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: expects f32");
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: expects a contiguous tensor")))?;
    let (rows, cols) = layout.shape().dims2()?;
    Ok((&mut data[start..end], rows, cols))
}

fn matrix_ref<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<(&'a [f32], usize, usize)> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: expects f32");
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: expects a contiguous tensor")))?;
    let (rows, cols) = layout.shape().dims2()?;
    Ok((&data[start..end], rows, cols))
}

/// Columns per work item of the column-wise LayerNorm: 64 floats wide, a `[C, 64]` block
/// (192 KiB at C = 768) stays in L2 across its three sweeps.
const NORM_BLOCK: usize = 64;

/// LayerNorm of each column of `x [C, N]`: `(x - mean) / sqrt(var + eps) · w + b`, mean and
/// (biased) variance over the C rows of the column, the variance from the centred values.
struct ColumnNormOp<'a> {
    weight: &'a [f32],
    bias: &'a [f32],
    eps: f32,
}

impl CustomOp1 for ColumnNormOp<'_> {
    fn name(&self) -> &'static str {
        "ckptmap-layer-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, c, n) = matrix_ref(storage, layout, self.name())?;
        if c != self.weight.len() || c == 0 {
            candle_core::bail!("{}: {c} features, weight has {}", self.name(), self.weight.len());
        }
        let mut out = vec![0f32; x.len()];
        let dst = RowsPtr(out.as_mut_ptr());
        for_rows(n.div_ceil(NORM_BLOCK), c * NORM_BLOCK, |blocks| {
            for blk in blocks {
                let j0 = blk * NORM_BLOCK;
                let w = NORM_BLOCK.min(n - j0);
                column_norm_block(x, dst, c, n, j0, w, self.weight, self.bias, self.eps);
            }
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

multiversion! {
    /// Columns `j0 .. j0 + w` of [`ColumnNormOp`].
    #[allow(clippy::too_many_arguments)]
    fn column_norm_block(
        x: &[f32],
        dst: RowsPtr,
        c: usize,
        n: usize,
        j0: usize,
        w: usize,
        weight: &[f32],
        bias: &[f32],
        eps: f32,
    ) {
        let mut mean = [0f32; NORM_BLOCK];
        let mut var = [0f32; NORM_BLOCK];
        let (mean, var) = (&mut mean[..w], &mut var[..w]);
        for r in 0..c {
            for (m, &v) in mean.iter_mut().zip(&x[r * n + j0..r * n + j0 + w]) {
                *m += v;
            }
        }
        for m in mean.iter_mut() {
            *m /= c as f32;
        }
        for r in 0..c {
            for ((s, &v), &m) in var.iter_mut().zip(&x[r * n + j0..r * n + j0 + w]).zip(mean.iter()) {
                let d = v - m;
                *s += d * d;
            }
        }
        for s in var.iter_mut() {
            *s = (*s / c as f32 + eps).sqrt();
        }
        for r in 0..c {
            // SAFETY: this block alone writes columns j0 .. j0 + w.
            let o = unsafe { dst.slice(r * n + j0, w) };
            let (wr, br) = (weight[r], bias[r]);
            for (((o, &v), &m), &sd) in o.iter_mut().zip(&x[r * n + j0..r * n + j0 + w]).zip(mean.iter()).zip(var.iter()) {
                *o = (v - m) / sd * wr + br;
            }
        }
    }
}

multiversion! {
    /// `y[r] += bias[r]` on each row in `rows` (of width `n`), then the GELU if asked.
    fn bias_rows(ptr: RowsPtr, rows: std::ops::Range<usize>, n: usize, bias: &[f32], gelu: bool) {
        for i in rows {
            // SAFETY: each row index is visited by exactly one worker.
            let r = unsafe { ptr.row(i, n) };
            let b = bias[i];
            if gelu {
                for v in r.iter_mut() {
                    *v = gelu_f32(*v + b);
                }
            } else {
                for v in r.iter_mut() {
                    *v += b;
                }
            }
        }
    }
}

/// In place on `y [R, N]`: `y[r, :] += bias[r]`, then optionally the exact GELU.
struct RowBiasOp<'a> {
    bias: &'a [f32],
    gelu: bool,
}

impl InplaceOp1 for RowBiasOp<'_> {
    fn name(&self) -> &'static str {
        "ckptmap-bias-gelu"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (data, rows, n) = matrix_mut(storage, layout, self.name())?;
        if rows != self.bias.len() {
            candle_core::bail!("{}: {rows} rows, bias has {}", self.name(), self.bias.len());
        }
        let ptr = RowsPtr(data.as_mut_ptr());
        for_rows(rows, n, |range| bias_rows(ptr, range, n, self.bias, self.gelu));
        Ok(())
    }
}

/// In place on `y [R, N]` with `res [R, N]`: `y[r, :] = res[r, :] + gamma[r] · (y[r, :] + bias[r])`.
struct RowResidualOp<'a> {
    bias: &'a [f32],
    gamma: Option<&'a [f32]>,
}

impl InplaceOp2 for RowResidualOp<'_> {
    fn name(&self) -> &'static str {
        "ckptmap-residual"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let (res, rr, rn) = matrix_ref(s2, l2, self.name())?;
        let (data, rows, n) = matrix_mut(s1, l1, self.name())?;
        if (rr, rn) != (rows, n) || rows != self.bias.len() || self.gamma.is_some_and(|g| g.len() != rows) {
            candle_core::bail!("{}: shapes do not match", self.name());
        }
        let ptr = RowsPtr(data.as_mut_ptr());
        for_rows(rows, n, |range| {
            for i in range {
                // SAFETY: each row index is visited by exactly one worker.
                let y = unsafe { ptr.row(i, n) };
                let r = &res[i * n..(i + 1) * n];
                let b = self.bias[i];
                match self.gamma {
                    Some(g) => {
                        let g = g[i];
                        for (y, &r) in y.iter_mut().zip(r) {
                            *y = r + (*y + b) * g;
                        }
                    }
                    None => {
                        for (y, &r) in y.iter_mut().zip(r) {
                            *y = r + (*y + b);
                        }
                    }
                }
            }
        });
        Ok(())
    }
}

/// `[R, C]` → `[C, R]`, 16 source rows at a time so that every write is a run of 16.
struct TransposeOp;

impl CustomOp1 for TransposeOp {
    fn name(&self) -> &'static str {
        "ckptmap-transpose"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (src, r, c) = matrix_ref(storage, layout, self.name())?;
        const BLOCK: usize = 16;
        let mut out = vec![0f32; src.len()];
        let dst = RowsPtr(out.as_mut_ptr());
        for_rows(r.div_ceil(BLOCK), BLOCK * c, |blocks| {
            for blk in blocks {
                let i0 = blk * BLOCK;
                let rows = BLOCK.min(r - i0);
                for j in 0..c {
                    // SAFETY: block `blk` alone writes columns i0 .. i0 + rows of output row j.
                    let o = unsafe { dst.slice(j * r + i0, rows) };
                    for (k, o) in o.iter_mut().enumerate() {
                        *o = src[(i0 + k) * c + j];
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((c, r))))
    }
}

/// Sum of a row with eight partial sums (vectorisable), then the partials pairwise.
fn sum_f32(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            acc[k] += c[k];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for &v in tail {
        s += v;
    }
    s
}

/// `e^x` in f32 in a form the compiler vectorises (Cephes `expf`: `x = n·ln2 + r` with n the
/// nearest integer, a degree-7 polynomial for `e^r` on |r| ≤ ln2/2, the exponent bits set
/// directly); within 2 ulp of the true value, like the vectorised exp PyTorch's CPU softmax
/// uses. Below −87.34 (where `e^x` is subnormal) it returns 0, above 88.72 infinity, and NaN
/// for NaN.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // ln 2 = LN2_HI + LN2_LO, LN2_HI exact in 9 bits
    const LN2_LO: f32 = -2.121_944_4e-4;
    const LO: f32 = -87.336_55; // n = -126, the smallest normal exponent
    const HI: f32 = 88.722_83;
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding and subtracting it rounds to integer
    let xc = if x < LO { LO } else { x };
    let xc = if xc > HI { HI } else { xc }; // NaN passes through both
    let shifted = xc * LOG2E + ROUND; // n = round(x·log2 e) sits in the low mantissa bits
    let n = shifted - ROUND;
    // n as an integer without a float→int conversion (whose saturating semantics would keep
    // the loop from vectorising): -126 ..= 128 for finite x.
    let ni = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5; // Cephes: 5.0000001201e-1, the same f32
    let y = p * r * r + r + 1.0;
    let pow2 = f32::from_bits((ni.min(127).wrapping_add(127) as u32).wrapping_shl(23));
    let e = y * pow2;
    let e = if ni > 127 { e * 2.0 } else { e };
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        e
    }
}

/// The exact (erf) GELU, `0.5·x·(1 + erf(x/√2))`, evaluated as `0.5·x·erfc(−x/√2)` (the same
/// function; erfc keeps its relative accuracy where `1 + erf` cancels, for x ≪ 0) with a
/// vectorisable erfc: `t·exp(−z² + P(t))`, `t = 1/(1 + |z|/2)`, P the degree-9 Chebyshev fit
/// of Numerical Recipes (`erfcc`, fractional error < 1.2e-7). Within a few ulp of the true
/// value (see the test). PyTorch's own CPU GELU is coarser (3.7e-7 absolute; relative error
/// up to 100% below x = −3).
#[inline(always)]
fn gelu_f32(x: f32) -> f32 {
    let z = -x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / (1.0 + 0.5 * a);
    let p = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204 + t * (1.488_515_9 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    // exp(−a² + p) as exp(−a_hi²)·exp(−(a² − a_hi²) + p): a_hi keeps 12 significant bits so
    // a_hi² is exact in f32, and a² − a_hi² = a_lo·(a + a_hi) is small; the f32 rounding of a
    // large −a² would otherwise cost up to ~1e-6 relative for |x| near 4.
    let a_hi = f32::from_bits(a.to_bits() & 0xffff_f000);
    let a_lo = a - a_hi;
    let r = t * exp_f32(-(a_hi * a_hi)) * exp_f32(-(a_lo * (a + a_hi)) + p);
    let erfc = if z < 0.0 { 2.0 - r } else { r };
    0.5 * x * erfc
}

multiversion! {
    /// Softmax of each row in `rows` (of width `n`, at `ptr`), after `v·scale + bias`.
    fn softmax_rows(
        ptr: RowsPtr,
        rows: std::ops::Range<usize>,
        n: usize,
        scale: f32,
        bias: RowBias<'_>,
    ) {
        for i in rows {
            // SAFETY: each row index is visited by exactly one worker.
            let r = unsafe { ptr.row(i, n) };
            match bias {
                RowBias::Gather { column, index } => {
                    for (v, &k) in r.iter_mut().zip(&index[i * n..(i + 1) * n]) {
                        // SAFETY: BiasTable::new checked every index entry against the table.
                        *v = *v * scale + unsafe { *column.get_unchecked(k as usize) };
                    }
                }
                RowBias::Window { column, reversed, window: w } => {
                    // BiasTable::new checked n = W² + 1 and the table's (2W-1)² + 3 rows.
                    let big_r = (2 * w - 1) * (2 * w - 1);
                    if i == 0 {
                        r[0] = r[0] * scale + column[big_r + 2];
                        for v in r[1..].iter_mut() {
                            *v = *v * scale + column[big_r];
                        }
                    } else {
                        let (ha, wa) = ((i - 1) / w, (i - 1) % w);
                        r[0] = r[0] * scale + column[big_r + 1];
                        let last = reversed.len() - 1;
                        for (hb, keys) in r[1..].chunks_exact_mut(w).enumerate() {
                            let base = (ha + w - 1 - hb) * (2 * w - 1) + wa + w - 1;
                            let run = &reversed[last - base..last - base + w];
                            for (v, &b) in keys.iter_mut().zip(run) {
                                *v = *v * scale + b;
                            }
                        }
                    }
                }
                RowBias::None => {
                    for v in r.iter_mut() {
                        *v *= scale;
                    }
                }
            }
            let mut m = [f32::NEG_INFINITY; 8];
            let chunks = r.chunks_exact(8);
            let tail = chunks.remainder();
            for c in chunks {
                for k in 0..8 {
                    m[k] = if c[k] > m[k] { c[k] } else { m[k] };
                }
            }
            let mut max = m.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            for &v in tail {
                max = max.max(v);
            }
            for v in r.iter_mut() {
                *v = exp_f32(*v - max);
            }
            let sum = sum_f32(r);
            for v in r.iter_mut() {
                *v /= sum;
            }
        }
    }
}

#[cfg(test)]
struct SoftmaxOp<'a> {
    scale: f32,
    bias: RowBias<'a>,
}

#[cfg(test)]
impl InplaceOp1 for SoftmaxOp<'_> {
    fn name(&self) -> &'static str {
        "ckptmap-softmax"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (data, rows, n) = matrix_mut(storage, layout, self.name())?;
        match self.bias {
            RowBias::Gather { index, .. } if index.len() != rows * n => {
                candle_core::bail!("{}: index has {} entries for {rows}x{n} logits", self.name(), index.len());
            }
            RowBias::Window { window, .. } if rows != n || n != window * window + 1 => {
                candle_core::bail!("{}: {rows}x{n} logits for a {window}x{window} window", self.name());
            }
            _ => {}
        }
        let ptr = RowsPtr(data.as_mut_ptr());
        for_rows(rows, n, |range| softmax_rows(ptr, range, n, self.scale, self.bias));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::Device;

    use super::super::layers::{softmax_last, LayerNorm, Linear};
    use super::*;
    use crate::verify::SplitMix64;

    fn random(shape: &[usize], seed: u64, scale: f32) -> Tensor {
        let mut rng = SplitMix64::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| scale * rng.next_signed_unit()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp_and_handles_the_edges() {
        let mut worst = 0;
        let mut x = -87.3f32;
        while x < 88.7 {
            let want = (x as f64).exp() as f32;
            let u = ulps(exp_f32(x), want);
            assert!(u <= 2, "exp({x}) = {} want {want}", exp_f32(x));
            worst = worst.max(u);
            x += 0.000_37;
        }
        assert!(worst <= 2, "worst error {worst} ulp");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_is_the_erf_gelu_to_a_few_ulp() {
        // The reference takes the same f32 argument x/√2 as any f32 GELU does (candle's and
        // PyTorch's included): its rounding alone moves erfc by up to ~1e-5 relative near
        // x = -12, where the value is 2e-32.
        let exact = |x: f32| {
            let z = (-x * std::f32::consts::FRAC_1_SQRT_2) as f64;
            0.5 * x as f64 * candle_core::cpu::erf::erfc_f64(z)
        };
        let mut worst = 0f64;
        let mut x = -12.0f32;
        while x < 12.0 {
            let want = exact(x);
            let got = gelu_f32(x) as f64;
            let err = (got - want).abs();
            // Below 1e-37 the f32 result is subnormal: count absolute error there.
            let rel = if want.abs() < 1e-37 { err * 1e30 } else { err / want.abs() };
            assert!(rel < 5e-7, "gelu({x}) = {got}, want {want}");
            worst = worst.max(rel);
            x += 0.000_61;
        }
        eprintln!("gelu: worst relative error {worst:.2e}");
        assert_eq!(gelu_f32(0.0), 0.0);
        assert_eq!(gelu_f32(-100.0), 0.0);
        assert_eq!(gelu_f32(100.0), 100.0);
        assert!(gelu_f32(f32::NAN).is_nan());
    }

    /// The fused feature-major CPU kernels against the plain token-major candle ops (the
    /// path other devices take), on shapes with remainders after every block size.
    #[test]
    fn fused_kernels_match_the_generic_ops() {
        // Small shapes run on one thread; the larger ones pass PAR_MIN_ELEMS and split.
        fused_kernels_match_at(37, 44, 70);
        fused_kernels_match_at(301, 260, 300);
    }

    fn fused_kernels_match_at(t: usize, d: usize, hidden: usize) {
        let x = random(&[t, d], 1, 2.0);
        let xt = transposed(&x).unwrap();
        assert_eq!(max_abs_diff(&xt, &x.t().unwrap()), 0.0);
        let w = random(&[d], 2, 1.0).affine(0.5, 1.0).unwrap();
        let b = random(&[d], 3, 0.1);
        let ln =
            LayerNorm { weight_v: w.to_vec1().unwrap(), bias_v: b.to_vec1().unwrap(), weight: w, bias: b, eps: 1e-6 };
        let normed_t = ln.forward_t(&xt).unwrap();
        assert!(max_abs_diff(&normed_t.t().unwrap(), &ln.forward(&x).unwrap()) < 1e-5);

        let fc1 = Linear::from_parts(random(&[hidden, d], 4, 0.2), random(&[hidden], 5, 0.1)).unwrap();
        let fc2 = Linear::from_parts(random(&[d, hidden], 6, 0.2), random(&[d], 7, 0.1)).unwrap();
        let h_t = fc1.forward_t(&xt, true).unwrap();
        let h = fc1.forward(&x).unwrap().gelu_erf().unwrap();
        assert!(max_abs_diff(&h_t.t().unwrap(), &h) < 1e-5);
        let plain = fc1.forward(&x).unwrap();
        assert!(max_abs_diff(&fc1.forward_t(&xt, false).unwrap().t().unwrap(), &plain) < 1e-5);
        let gamma = random(&[d], 8, 0.1);
        let y_t = fc2.forward_residual_t(&h_t, &xt, Some(&gamma)).unwrap();
        let y = (&x + fc2.forward(&h).unwrap().broadcast_mul(&gamma).unwrap()).unwrap();
        assert!(max_abs_diff(&y_t.t().unwrap(), &y) < 1e-5);
        let y_t = fc2.forward_residual_t(&h_t, &xt, None).unwrap();
        let y = (&x + fc2.forward(&h).unwrap()).unwrap();
        assert!(max_abs_diff(&y_t.t().unwrap(), &y) < 1e-5);

        // Softmax with a gathered relative bias, against scale, index_select and softmax_last:
        // a random index (gathered entry by entry), and the standard index of a window both
        // gathered and read by its structure.
        let heads = 3;
        let rows = 11;
        let table = random(&[rows, heads], 9, 3.0);
        let mut rng = SplitMix64::new(10);
        let index: Vec<u32> = (0..t * t).map(|_| (rng.next_u64() % rows as u64) as u32).collect();
        check_softmax(&table, &index, None, 20);
        let w = if t > 100 { 17 } else { 6 }; // 290 tokens: the split path
        let table = random(&[(2 * w - 1) * (2 * w - 1) + 3, heads], 12, 3.0);
        let index: Vec<u32> = crate::verify::relative_position_index(w, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|&i| i as u32)
            .collect();
        check_softmax(&table, &index, None, 30);
        check_softmax(&table, &index, Some(w), 40);

        let out_of_range: Arc<[u32]> = vec![rows as u32; t * t].into();
        let small = random(&[rows, heads], 9, 3.0);
        assert!(BiasTable::new(&small, out_of_range, None).unwrap().is_none());
        let index: Arc<[u32]> = index.into();
        assert!(BiasTable::new(&table, index, Some(w + 1)).unwrap().is_none());
    }

    fn check_softmax(table: &Tensor, index: &[u32], window: Option<usize>, seed: u64) {
        let (rows, heads) = table.dims2().unwrap();
        let t = (index.len() as f64).sqrt() as usize;
        let bias = BiasTable::new(table, index.to_vec().into(), window).unwrap().unwrap();
        let index_t =
            Tensor::from_vec(index.iter().map(|&i| i as i64).collect::<Vec<_>>(), t * t, &Device::Cpu).unwrap();
        assert!(index.iter().all(|&i| (i as usize) < rows));
        for head in 0..heads {
            let logits = random(&[t, t], seed + head as u64, 20.0);
            let fused_s = logits.copy().unwrap();
            softmax_scaled_biased_(&fused_s, 0.125, Some((&bias, head))).unwrap();
            let gathered =
                table.index_select(&index_t, 0).unwrap().narrow(1, head, 1).unwrap().reshape((t, t)).unwrap();
            let plain_s = softmax_last(&(logits.affine(0.125, 0.0).unwrap() + gathered).unwrap()).unwrap();
            assert!(max_abs_diff(&fused_s, &plain_s) < 1e-6, "window {window:?} head {head}");
        }
    }
}
