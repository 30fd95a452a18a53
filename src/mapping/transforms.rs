//! Pure tensor transforms: the numbers MMSegmentation computes at load time when a
//! checkpoint's position tables were trained at another image size, plus the dtype casts the
//! converter needs to run them on tensors of any float type.
//!
//! Each resize reproduces one upstream computation (the table resize bit for bit, the bicubic
//! one within an f32 ulp), so that a converted file loads into MMSeg with no size fix left to
//! do and holds the numbers MMSeg's own load-time fix would have computed:
//! * [`resize_abs_pos_embed`]: MAE `pos_embed`, torch `F.interpolate(mode='bicubic')`;
//! * [`resize_rel_pos_bias_table`]: BEiT `relative_position_bias_table`, SciPy
//!   `interp2d(kind='cubic')` on MMSeg's geometric source grid ([`geometric_ratio`]);
//! * [`relative_position_index`]: the buffer MMSeg rebuilds in `__init__`.
//!
//! Tensors are flat row-major `f32` slices; shapes are passed as sizes and checked.

use crate::DType;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};

pub type Result<T> = std::result::Result<T, TransformError>;

/// What is wrong with a transform's input. Each message names the sizes involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransformError {
    #[error("position embedding has {got} values, expected {expected} = ({num_extra} extra + {grid}x{grid} grid) tokens x {dim} channels")]
    PosEmbedLen { got: usize, expected: usize, num_extra: usize, grid: usize, dim: usize },
    #[error("position embedding has {tokens} tokens: after {num_extra} extra tokens, {tokens} - {num_extra} is not a square grid")]
    NotSquareGrid { tokens: usize, num_extra: usize },
    #[error("cannot resize a position grid from {from}x{from} to {to}x{to}: both sides must be at least 1")]
    EmptyGrid { from: usize, to: usize },
    #[error("relative position bias table has {got} values, expected {expected} = ((2x{window}-1)^2 + 3) rows x {num_heads} heads")]
    TableLen { got: usize, expected: usize, window: usize, num_heads: usize },
    #[error("relative position bias table has {rows} rows, which is not (2w-1)^2 + 3 for any window w")]
    NotSquareTable { rows: usize },
    #[error("window {window} is too small for this relative position table resize (need at least {min})")]
    WindowTooSmall { window: usize, min: usize },
    #[error("{len} bytes is not a whole number of {dtype} elements ({size} bytes each)")]
    ByteLen { len: usize, dtype: DType, size: usize },
    #[error("cannot cast {from} to {to}: only f64, f32, f16 and bf16 tensors can be cast")]
    NotFloat { from: DType, to: DType },
    #[error("cannot concatenate along dim {dim}: {why}")]
    Concat { dim: usize, why: String },
}

/// Rows of a relative position bias table that are not on the (2w-1)² grid: cls→token,
/// token→cls and cls→cls, in that order (see [`relative_position_index`]).
pub const REL_TABLE_EXTRA_ROWS: usize = 3;

// ---------------------------------------------------------------------------------------------
// Absolute position embedding (MAE)

/// The side of the square patch grid in a `[1, tokens, dim]` position embedding whose first
/// `num_extra` tokens are not patches. MMSeg takes `int(sqrt(...))` and would silently misread
/// a non-square count; we refuse it.
pub fn pos_embed_grid(tokens: usize, num_extra: usize) -> Result<usize> {
    let err = TransformError::NotSquareGrid { tokens, num_extra };
    let patches = tokens.checked_sub(num_extra).ok_or(err.clone())?;
    let grid = patches.isqrt();
    if grid * grid == patches {
        Ok(grid)
    } else {
        Err(err)
    }
}

/// Resizes a `[1, num_extra + old_grid², dim]` position embedding to
/// `[1, num_extra + new_grid², dim]`, as MMSeg's `MAE.resize_abs_pos_embed` does: the extra
/// (cls) rows are kept, and the patch grid is resized as torch's
/// `F.interpolate(mode='bicubic', align_corners=False, antialias=False)` does. The same grid
/// returns the input (MMSeg skips the resize then).
///
/// Torch computes in f32 for f32 tensors, so this does too (f64 lands further from torch's
/// numbers), in torch's per-pixel order: 4 taps along W, then those 4 sums along H.
pub fn resize_abs_pos_embed(
    data: &[f32],
    num_extra: usize,
    dim: usize,
    old_grid: usize,
    new_grid: usize,
) -> Result<Vec<f32>> {
    let expected = (num_extra + old_grid * old_grid) * dim;
    if data.len() != expected {
        return Err(TransformError::PosEmbedLen { got: data.len(), expected, num_extra, grid: old_grid, dim });
    }
    if old_grid == 0 || new_grid == 0 {
        return Err(TransformError::EmptyGrid { from: old_grid, to: new_grid });
    }
    if old_grid == new_grid {
        return Ok(data.to_vec());
    }
    let (extra, grid) = data.split_at(num_extra * dim);
    let mut out = Vec::with_capacity((num_extra + new_grid * new_grid) * dim);
    out.extend_from_slice(extra);
    out.extend(resize_grid(grid, dim, old_grid, new_grid, torch_cubic_weights));
    Ok(out)
}

/// The 4 taps of torch's cubic convolution (Keys kernel with A = -0.75) at fractional offset
/// `t` in [0, 1): weights for `floor(src) - 1 ..= floor(src) + 2`.
fn torch_cubic_weights(t: f32) -> [f32; 4] {
    keys_cubic_weights(t, -0.75)
}

/// Keys cubic convolution weights for parameter `a`, rounded as torch's compiled f32 kernel
/// rounds them (`get_cubic_upsample_coefficients`: taps at `t+1, t, 1-t, (1-t)+1`), with
/// the multiply-adds its build fuses. Near |x| = 2 the polynomial cancels to a small weight,
/// so each rounding there moves it by many ulps: plain f32 Horner missed torch's weights by
/// up to 1.2e-6 (outputs by 3e-6) at scales that are not a power of two (14→40, 2→9, 16→14);
/// these match torch 2.15's weights bit for bit on every fixture size.
fn keys_cubic_weights(t: f32, a: f32) -> [f32; 4] {
    // |x| <= 1: ((a+2)x - (a+3))·x·x + 1, the first step fused.
    let near = |x: f32| ((a + 2.0).mul_add(x, -(a + 3.0)) * x) * x + 1.0;
    // 1 < |x| < 2: ((ax - 5a)x + 8a)x - 4a, the first two steps fused.
    let far = |x: f32| a.mul_add(x, -5.0 * a).mul_add(x, 8.0 * a) * x - 4.0 * a;
    let x2 = 1.0 - t;
    [far(t + 1.0), near(t), near(x2), far(x2 + 1.0)]
}

/// For each output index along one axis: the 4 input indices (clamped to the edge, as torch
/// replicates edges) and their weights. Source coordinates follow torch's
/// `area_pixel_compute_source_index` with `align_corners=False`: `(dst + 0.5) * in/out - 0.5`,
/// not clamped for cubic, with the scale `in/out` computed in f32 and the multiply-add fused
/// as torch does (an ulp of `src` moves the weights by up to 1e-6 on larger grids).
fn cubic_taps(input: usize, output: usize, kernel: fn(f32) -> [f32; 4]) -> Vec<([usize; 4], [f32; 4])> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|o| {
            let src = scale.mul_add(o as f32 + 0.5, -0.5);
            let floor = src.floor();
            let first = floor as isize - 1;
            let idx = std::array::from_fn(|k| (first + k as isize).clamp(0, input as isize - 1) as usize);
            (idx, kernel(src - floor))
        })
        .collect()
}

/// Separable resize of a row-major `[old, old, dim]` grid to `[new, new, dim]`. The W pass runs
/// first and the H pass sums its results, which is the order torch accumulates each pixel in.
fn resize_grid(grid: &[f32], dim: usize, old: usize, new: usize, kernel: fn(f32) -> [f32; 4]) -> Vec<f32> {
    let taps = cubic_taps(old, new, kernel);
    // W pass: [old rows, new cols, dim].
    let mut rows = vec![0f32; old * new * dim];
    for y in 0..old {
        for (ox, (idx, w)) in taps.iter().enumerate() {
            let dst = &mut rows[(y * new + ox) * dim..][..dim];
            weighted_sum(dst, w, |k| &grid[(y * old + idx[k]) * dim..][..dim]);
        }
    }
    // H pass: [new rows, new cols, dim].
    let mut out = vec![0f32; new * new * dim];
    for (oy, (idx, w)) in taps.iter().enumerate() {
        let dst = &mut out[oy * new * dim..][..new * dim];
        weighted_sum(dst, w, |k| &rows[idx[k] * new * dim..][..new * dim]);
    }
    out
}

/// `dst = Σk w[k]·src(k)` elementwise, rounded as torch's compiled f32 kernel rounds: the first
/// product, then fused multiply-adds. Against the fixtures this matches torch bit for bit on
/// 68-69% of values (plain f32 multiply-adds: 55-57%, f64: 45%); the rest differ by one ulp.
fn weighted_sum<'a>(dst: &mut [f32], w: &[f32; 4], src: impl Fn(usize) -> &'a [f32]) {
    for (d, s) in dst.iter_mut().zip(src(0)) {
        *d = s * w[0];
    }
    for (k, &wk) in w.iter().enumerate().skip(1) {
        for (d, s) in dst.iter_mut().zip(src(k)) {
            *d = s.mul_add(wk, *d);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Relative position bias table (BEiT)

/// The window `w` of a relative position bias table with `rows = (2w-1)² + 3` rows. MMSeg
/// takes `int(sqrt(rows - 3))` and would silently misread another count; we refuse it.
pub fn rel_table_window(rows: usize) -> Result<usize> {
    let side = rows.checked_sub(REL_TABLE_EXTRA_ROWS).map_or(0, usize::isqrt);
    if side % 2 == 1 && side * side + REL_TABLE_EXTRA_ROWS == rows {
        Ok(side.div_ceil(2))
    } else {
        Err(TransformError::NotSquareTable { rows })
    }
}

/// The ratio `q` of MMSeg's geometric source grid (`_geometric_sequence_interpolation`):
/// bisection on [1.01, 1.5] until the bracket is at most 1e-6 wide, for the `q` whose
/// `1 + q + … + q^(src_half-1)` reaches `dst_half`. Returns the last midpoint computed, not
/// the bracket's centre, because that is the value MMSeg goes on to use.
pub fn geometric_ratio(src_half: usize, dst_half: usize) -> f64 {
    // gp(1, q, n) = (1 - q^n) / (1 - q); powf matches Python's float ** int (C pow).
    let sum = |q: f64| (1.0 - q.powf(src_half as f64)) / (1.0 - q);
    let (mut left, mut right) = (1.01f64, 1.5f64);
    let mut q = (left + right) / 2.0;
    while right - left > 1e-6 {
        q = (left + right) / 2.0;
        if sum(q) > dst_half as f64 {
            right = q;
        } else {
            left = q;
        }
    }
    q
}

/// MMSeg's source coordinates for a `side`-point axis: `0, ±1, ±(1+q), ±(1+q+q²), …`,
/// increasing. Growing gaps stretch the source so its outermost offset lands near the target's.
fn geometric_axis(side: usize, q: f64) -> Vec<f64> {
    let mut dis = Vec::with_capacity(side / 2);
    let mut cur = 1.0f64;
    for i in 0..side / 2 {
        dis.push(cur);
        cur += q.powf((i + 1) as f64);
    }
    dis.iter().rev().map(|d| -d).chain([0.0]).chain(dis.iter().copied()).collect()
}

/// Resizes a `[(2·src_window-1)² + 3, num_heads]` relative position bias table to
/// `[(2·dst_window-1)² + 3, num_heads]`, as MMSeg's `BEiT.resize_rel_pos_embed` does. The 3
/// cls rows are kept; each head's grid is sampled at integer offsets `-(d/2) ..= d/2` from the
/// cubic spline through it placed on [`geometric_axis`] coordinates.
///
/// MMSeg calls SciPy `interp2d(kind='cubic')`, removed in SciPy 1.14. On a full grid that is a
/// FITPACK s=0 bicubic spline with interior knots `x[2..n-2]`, i.e. the not-a-knot spline,
/// which is separable: a 1-D not-a-knot spline along one axis, then the other. Offsets beyond
/// the source grid (a window grown so far that `q` is pinned at 1.5) take the grid's edge
/// value, as FITPACK's evaluation does (see [`spline_weights`]). Computed in f64 (as SciPy
/// does) and rounded to f32 (as MMSeg does). The same window returns the input.
pub fn resize_rel_pos_bias_table(
    table: &[f32],
    num_heads: usize,
    src_window: usize,
    dst_window: usize,
) -> Result<Vec<f32>> {
    let src = (2 * src_window).saturating_sub(1);
    let expected = (src * src + REL_TABLE_EXTRA_ROWS) * num_heads;
    if table.len() != expected {
        return Err(TransformError::TableLen { got: table.len(), expected, window: src_window, num_heads });
    }
    if src_window == dst_window {
        return Ok(table.to_vec());
    }
    // A cubic spline needs 4 points per axis; the target needs at least its centre.
    if src_window < 3 {
        return Err(TransformError::WindowTooSmall { window: src_window, min: 3 });
    }
    if dst_window < 1 {
        return Err(TransformError::WindowTooSmall { window: dst_window, min: 1 });
    }
    Ok(resize_table(table, num_heads, src, 2 * dst_window - 1, SplineEnds::NotAKnot))
}

/// The resize itself, for grid sides `src` ≥ 4 and `dst` ≥ 1 (already checked).
fn resize_table(table: &[f32], num_heads: usize, src: usize, dst: usize, ends: SplineEnds) -> Vec<f32> {
    let q = geometric_ratio(src / 2, dst / 2);
    let x = geometric_axis(src, q);
    let half = (dst / 2) as f64;
    let t: Vec<f64> = (0..dst).map(|i| i as f64 - half).collect();
    let w = spline_weights(&x, &t, ends);

    let mut out = vec![0f32; (dst * dst + REL_TABLE_EXTRA_ROWS) * num_heads];
    let mut grid = vec![0f64; src * src];
    let mut cols = vec![0f64; src * dst];
    for h in 0..num_heads {
        for (g, row) in grid.iter_mut().zip(table.chunks_exact(num_heads)) {
            *g = row[h] as f64;
        }
        // Along the columns: cols[r][j] = Σc grid[r][c]·w[j][c].
        for r in 0..src {
            for j in 0..dst {
                cols[r * dst + j] = dot(&grid[r * src..][..src], &w[j * src..][..src]);
            }
        }
        // Along the rows: out[i][j] = Σr w[i][r]·cols[r][j].
        for i in 0..dst {
            for j in 0..dst {
                let v: f64 = (0..src).map(|r| w[i * src + r] * cols[r * dst + j]).sum();
                out[(i * dst + j) * num_heads + h] = v as f32;
            }
        }
    }
    let extras = REL_TABLE_EXTRA_ROWS * num_heads;
    out[dst * dst * num_heads..].copy_from_slice(&table[table.len() - extras..]);
    out
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// End conditions of a cubic interpolating spline.
#[derive(Clone, Copy)]
enum SplineEnds {
    /// Third derivative continuous at the second and second-to-last knots (SciPy/FITPACK s=0).
    NotAKnot,
    /// Zero second derivative at both ends; kept only to show the fixture tests tell them apart.
    #[cfg(test)]
    Natural,
}

/// The `[t.len(), x.len()]` matrix `W` with `spline(t[j]) = Σk W[j][k]·y[k]` for the cubic
/// spline interpolating `(x, y)`. The spline is linear in `y`, so one matrix resizes every row
/// and every head. Needs `x` strictly increasing with at least 4 points.
///
/// A `t` outside `[x0, xn]` is evaluated at the nearer end: FITPACK's `bispev` (behind SciPy's
/// `interp2d.__call__`) moves every point outside the knot range onto its end knot, so the
/// surface is constant beyond its edge, not a continued cubic. MMSeg reaches this when `q` is
/// pinned at 1.5 and the target offsets outrun the geometric source grid. The clamp is per
/// axis, so the separable evaluation stays equal to the bicubic one.
fn spline_weights(x: &[f64], t: &[f64], ends: SplineEnds) -> Vec<f64> {
    let n = x.len();
    let h: Vec<f64> = x.windows(2).map(|p| p[1] - p[0]).collect();
    // Unknowns: second derivatives m. System a·m = b·y; its solution m = s·y, s = a⁻¹b.
    let mut a = vec![0f64; n * n];
    let mut b = vec![0f64; n * n];
    for i in 1..n - 1 {
        a[i * n + i - 1] = h[i - 1];
        a[i * n + i] = 2.0 * (h[i - 1] + h[i]);
        a[i * n + i + 1] = h[i];
        b[i * n + i - 1] = 6.0 / h[i - 1];
        b[i * n + i] = -6.0 / h[i - 1] - 6.0 / h[i];
        b[i * n + i + 1] = 6.0 / h[i];
    }
    match ends {
        SplineEnds::NotAKnot => {
            // (m1 - m0)/h0 = (m2 - m1)/h1, and its mirror at the right end.
            a[..3].copy_from_slice(&[h[1], -(h[0] + h[1]), h[0]]);
            let last = (n - 1) * n + n - 3;
            a[last..last + 3].copy_from_slice(&[h[n - 2], -(h[n - 3] + h[n - 2]), h[n - 3]]);
        }
        #[cfg(test)]
        SplineEnds::Natural => {
            a[0] = 1.0;
            a[n * n - 1] = 1.0;
        }
    }
    let s = solve_dense(a, b, n);
    let mut w = vec![0f64; t.len() * n];
    for (row, &tj) in w.chunks_exact_mut(n).zip(t) {
        let tj = tj.clamp(x[0], x[n - 1]);
        let i = x.partition_point(|&xk| xk <= tj).clamp(1, n - 1) - 1;
        let (hi, u, v) = (h[i], x[i + 1] - tj, tj - x[i]);
        let (c0, c1) = ((u * u * u / hi - hi * u) / 6.0, (v * v * v / hi - hi * v) / 6.0);
        for k in 0..n {
            row[k] = c0 * s[i * n + k] + c1 * s[(i + 1) * n + k];
        }
        row[i] += u / hi;
        row[i + 1] += v / hi;
    }
    w
}

/// Solves `a·X = b` for square `n×n` row-major `a` and `b` by Gauss-Jordan elimination with
/// partial pivoting. The not-a-knot rows are not diagonally dominant, so pivoting is needed;
/// n is at most a few hundred, so a dense solve is simplest.
fn solve_dense(mut a: Vec<f64>, mut b: Vec<f64>, n: usize) -> Vec<f64> {
    for col in 0..n {
        let p = (col..n).max_by(|&i, &j| a[i * n + col].abs().total_cmp(&a[j * n + col].abs())).unwrap();
        if p != col {
            for k in 0..n {
                a.swap(p * n + k, col * n + k);
                b.swap(p * n + k, col * n + k);
            }
        }
        let pivot = a[col * n + col];
        for k in 0..n {
            a[col * n + k] /= pivot;
            b[col * n + k] /= pivot;
        }
        for i in (0..n).filter(|&i| i != col) {
            let f = a[i * n + col];
            if f != 0.0 {
                for k in 0..n {
                    a[i * n + k] -= f * a[col * n + k];
                    b[i * n + k] -= f * b[col * n + k];
                }
            }
        }
    }
    b
}

/// MMSeg's (and unilm's) `relative_position_index` buffer, `[(w²+1)²]` row-major `[N, N]` for
/// N = w² patches + cls: patch pair (a, b) reads row `(ha-hb+w-1)(2w-1) + (wa-wb+w-1)`;
/// cls→patch reads `nrd-3`, patch→cls `nrd-2`, cls→cls `nrd-1`, with `nrd = (2w-1)² + 3`.
/// Rebuilt rather than copied: MMSeg drops the checkpoint's copy and uses its own.
pub fn relative_position_index(window: usize) -> Vec<i64> {
    let w = window as i64;
    let side = 2 * w - 1;
    let nrd = side * side + 3;
    let n = window * window + 1;
    let mut index = vec![0i64; n * n];
    for i in 0..n {
        for j in 0..n {
            index[i * n + j] = match (i, j) {
                (0, 0) => nrd - 1,
                (_, 0) => nrd - 2,
                (0, _) => nrd - 3,
                _ => {
                    let (a, b) = ((i - 1) as i64, (j - 1) as i64);
                    (a / w - b / w + w - 1) * side + (a % w - b % w + w - 1)
                }
            };
        }
    }
    index
}

// ---------------------------------------------------------------------------------------------
// Float dtype casts

fn float_len(bytes: &[u8], dtype: DType) -> Result<usize> {
    let size = dtype.size();
    if bytes.len().is_multiple_of(size) {
        Ok(bytes.len() / size)
    } else {
        Err(TransformError::ByteLen { len: bytes.len(), dtype, size })
    }
}

/// Decodes little-endian elements of `N` bytes (the length was checked by [`float_len`]).
fn from_le<const N: usize, T>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    bytes.chunks_exact(N).map(|c| f(c.try_into().unwrap())).collect()
}

/// Encodes elements as `N` little-endian bytes each, into a buffer sized up front (an
/// iterator of byte arrays collected into a `Vec` is several times slower).
fn to_le<const N: usize, T: Copy>(values: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    let mut out = vec![0u8; values.len() * N];
    for (chunk, &v) in out.chunks_exact_mut(N).zip(values) {
        chunk.copy_from_slice(&f(v));
    }
    out
}

/// Decodes little-endian float bytes to f32 (exact for f16/bf16; f64 rounds to nearest), so
/// the resizes, which torch runs in the tensor's own precision, can run on any float tensor.
pub fn f32_from_bytes(bytes: &[u8], dtype: DType) -> Result<Vec<f32>> {
    if !dtype.is_float() {
        return Err(TransformError::NotFloat { from: dtype, to: DType::F32 });
    }
    float_len(bytes, dtype)?;
    Ok(match dtype {
        DType::F64 => from_le(bytes, |b| f64::from_le_bytes(b) as f32),
        DType::F16 => from_le(bytes, u16::from_le_bytes).reinterpret_cast::<f16>().to_f32_vec(),
        DType::BF16 => from_le(bytes, u16::from_le_bytes).reinterpret_cast::<bf16>().to_f32_vec(),
        _ => from_le(bytes, f32::from_le_bytes),
    })
}

/// Encodes f32 values as little-endian bytes of a float dtype, rounding to nearest even for
/// f16/bf16 like torch's `.half()` / `.bfloat16()` (`half`'s slice conversions, which use the
/// CPU's f16 instructions where it has them).
pub fn f32_to_bytes(values: &[f32], dtype: DType) -> Result<Vec<u8>> {
    Ok(match dtype {
        DType::F32 => to_le(values, f32::to_le_bytes),
        DType::F64 => to_le(values, |v| (v as f64).to_le_bytes()),
        DType::F16 => {
            let mut h = vec![f16::ZERO; values.len()];
            h.convert_from_f32_slice(values);
            to_le(h.reinterpret_cast(), u16::to_le_bytes)
        }
        DType::BF16 => {
            let mut h = vec![bf16::ZERO; values.len()];
            h.convert_from_f32_slice(values);
            to_le(h.reinterpret_cast(), u16::to_le_bytes)
        }
        _ => return Err(TransformError::NotFloat { from: DType::F32, to: dtype }),
    })
}

/// Casts little-endian tensor bytes between float dtypes, through f32: widening is exact, and
/// f64 narrows through f32 as torch does (its `Half`/`BFloat16` are built from `float`), so a
/// cast file matches torch's bit for bit.
pub fn cast(bytes: &[u8], from: DType, to: DType) -> Result<Vec<u8>> {
    if !(from.is_float() && to.is_float()) {
        return Err(TransformError::NotFloat { from, to });
    }
    float_len(bytes, from)?;
    if from == to {
        return Ok(bytes.to_vec());
    }
    f32_to_bytes(&f32_from_bytes(bytes, from)?, to)
}

// ---------------------------------------------------------------------------------------------
// Concatenation (HF query/key/value → qkv)

/// One source tensor of a concatenation: its little-endian bytes, dtype and shape.
#[derive(Debug, Clone)]
pub struct ConcatPart {
    pub bytes: Vec<u8>,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// `torch.cat(parts, dim)` on raw bytes, then a cast to `to` (only when `to` differs, and
/// then only between float dtypes). Without a cast the bytes are copied unchanged: along
/// axis 0 the output is the byte concatenation of the parts, in order. Parts must share the
/// dtype and every axis but `dim`.
pub fn concat(parts: &[ConcatPart], dim: usize, to: DType) -> Result<Vec<u8>> {
    let err = |why: String| TransformError::Concat { dim, why };
    let Some(first) = parts.first() else {
        return Err(err("no parts".into()));
    };
    if dim >= first.shape.len() {
        return Err(err(format!("the first part has shape {:?}", first.shape)));
    }
    let size = first.dtype.size();
    for (n, p) in parts.iter().enumerate() {
        if p.dtype != first.dtype {
            return Err(err(format!("part {} is {}, part 1 is {}", n + 1, p.dtype, first.dtype)));
        }
        let agree =
            p.shape.len() == first.shape.len() && (0..p.shape.len()).all(|a| a == dim || p.shape[a] == first.shape[a]);
        if !agree {
            return Err(err(format!("part {} has shape {:?}, part 1 {:?}", n + 1, p.shape, first.shape)));
        }
        let expected = p.shape.iter().product::<usize>() * size;
        if p.bytes.len() != expected {
            return Err(err(format!(
                "part {} has {} bytes, expected {expected} for shape {:?}",
                n + 1,
                p.bytes.len(),
                p.shape
            )));
        }
    }
    // Rows of the axes before `dim`; each part contributes a contiguous run per row.
    let outer: usize = first.shape[..dim].iter().product();
    let runs: Vec<usize> = parts.iter().map(|p| p.shape[dim..].iter().product::<usize>() * size).collect();
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.bytes.len()).sum());
    for row in 0..outer {
        for (p, &run) in parts.iter().zip(&runs) {
            out.extend_from_slice(&p.bytes[row * run..(row + 1) * run]);
        }
    }
    if to == first.dtype {
        Ok(out)
    } else {
        cast(&out, first.dtype, to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::SafeTensors;

    #[test]
    fn concat_along_dim_0_is_byte_concatenation_and_dim_1_interleaves_rows() {
        let part = |vals: &[f32], shape: &[usize]| ConcatPart {
            bytes: f32_to_bytes(vals, DType::F32).unwrap(),
            dtype: DType::F32,
            shape: shape.to_vec(),
        };
        let a = part(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
        let b = part(&[5.0, 6.0], &[1, 2]);
        let out = concat(&[a.clone(), b.clone()], 0, DType::F32).unwrap();
        assert_eq!(out, [a.bytes.clone(), b.bytes.clone()].concat());
        let c = part(&[7.0, 8.0], &[2, 1]);
        let out = concat(&[a.clone(), c], 1, DType::F32).unwrap();
        assert_eq!(f32_from_bytes(&out, DType::F32).unwrap(), [1.0, 2.0, 7.0, 3.0, 4.0, 8.0]);
        // A shape that disagrees off the axis, a dtype mix and a missing axis are errors.
        assert!(concat(&[a.clone(), b.clone()], 1, DType::F32).is_err());
        let h = ConcatPart { dtype: DType::F16, bytes: vec![0; 4], shape: vec![1, 2] };
        assert!(concat(&[a.clone(), h], 0, DType::F32).is_err());
        assert!(concat(&[a.clone(), b.clone()], 2, DType::F32).is_err());
        // A cast applies to the concatenated values.
        let out = concat(&[a, b], 0, DType::F16).unwrap();
        assert_eq!(out.len(), 6 * 2);
    }

    const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/transforms.safetensors");

    fn fixture_bytes() -> Vec<u8> {
        std::fs::read(FIXTURE).unwrap_or_else(|e| panic!("{FIXTURE}: {e} (made by fixtures/make_fixtures.py)"))
    }

    /// A fixture tensor as f32 (or i64 as f64) with its shape.
    fn load(st: &SafeTensors, name: &str) -> (Vec<f32>, Vec<usize>) {
        let t = st.tensor(name).unwrap_or_else(|e| panic!("fixture tensor {name}: {e}"));
        let dtype = DType::from_safetensors_code(t.dtype()).unwrap();
        (f32_from_bytes(t.data(), dtype).unwrap(), t.shape().to_vec())
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f64 {
        assert_eq!(a.len(), b.len(), "length");
        a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max)
    }

    const TOL: f64 = 1e-6;

    fn pos_embed_case(st: &SafeTensors, input: &str, output: &str) {
        let (x, xs) = load(st, input);
        let (y, ys) = load(st, output);
        let dim = xs[2];
        let old = pos_embed_grid(xs[1], 1).unwrap();
        let new = pos_embed_grid(ys[1], 1).unwrap();
        let got = resize_abs_pos_embed(&x, 1, dim, old, new).unwrap();
        let d = max_diff(&got, &y);
        eprintln!("{output}: max |diff| = {d:e}");
        assert!(d <= TOL, "{output}: max diff {d:e}");
        // The same grid with a wrong kernel must miss the reference by far more than TOL.
        let (extra, grid) = x.split_at(dim);
        for (what, kernel) in [
            ("A=-0.5", (|t| keys_cubic_weights(t, -0.5)) as fn(f32) -> [f32; 4]),
            ("bilinear", |t| [0.0, 1.0 - t, t, 0.0]),
        ] {
            let wrong: Vec<f32> = extra.iter().copied().chain(resize_grid(grid, dim, old, new, kernel)).collect();
            let d = max_diff(&wrong, &y);
            eprintln!("{output}: {what} kernel misses by {d:e}");
            assert!(d > 100.0 * TOL, "{output}: {what} kernel only differs by {d:e}");
        }
    }

    #[test]
    fn pos_embed_matches_torch_bicubic() {
        let bytes = fixture_bytes();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        pos_embed_case(&st, "pos_embed.in", "pos_embed.out_14");
        pos_embed_case(&st, "pos_embed_b.in", "pos_embed_b.out_32");
    }

    fn rel_table_case(st: &SafeTensors, input: &str, output: &str) {
        let (x, xs) = load(st, input);
        let (y, ys) = load(st, output);
        let heads = xs[1];
        let (src, dst) = (rel_table_window(xs[0]).unwrap(), rel_table_window(ys[0]).unwrap());
        let got = resize_rel_pos_bias_table(&x, heads, src, dst).unwrap();
        let d = max_diff(&got, &y);
        eprintln!("{output}: max |diff| = {d:e}");
        assert!(d <= TOL, "{output}: max diff {d:e}");
        assert_eq!(got[got.len() - 3 * heads..], x[x.len() - 3 * heads..], "extras kept");
        // A natural spline on the same coordinates must miss by far more than TOL.
        let natural = resize_table(&x, heads, 2 * src - 1, 2 * dst - 1, SplineEnds::Natural);
        let worst = max_diff(&natural, &y);
        eprintln!("{output}: natural spline misses by {worst:e}");
        assert!(worst > 100.0 * TOL, "{output}: natural spline only differs by {worst:e}");
    }

    #[test]
    fn rel_table_matches_scipy_interp2d() {
        let bytes = fixture_bytes();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        rel_table_case(&st, "rel_table.in", "rel_table.out_27");
        rel_table_case(&st, "rel_table_b.in", "rel_table_b.out_63");
        rel_table_case(&st, "rel_table_b.in", "rel_table_b.out_79");
    }

    // Issue #13: every resize regime, against numbers made by real SciPy 1.13 / torch
    // (fixtures/make_resize_fixtures.py; versions in the file's `versions` metadata).
    const RESIZE_FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/resize_cases.safetensors");

    /// Bit-close: each value within 1e-6 of the reference, relative to its magnitude (or
    /// absolutely below 1, where f32 rounding of a tiny value has no relative meaning).
    const REL_TOL: f64 = 1e-6;

    /// (max |diff|, max |diff| / max(|want|, 1)).
    fn diffs(got: &[f32], want: &[f32]) -> (f64, f64) {
        assert_eq!(got.len(), want.len(), "length");
        got.iter()
            .zip(want)
            .map(|(g, w)| {
                let d = (*g as f64 - *w as f64).abs();
                (d, d / (*w as f64).abs().max(1.0))
            })
            .fold((0.0, 0.0), |(a, r), (d, q)| (a.max(d), r.max(q)))
    }

    /// The fixture bytes and its `cases` metadata (name → parameters).
    fn resize_cases() -> (Vec<u8>, serde_json::Map<String, serde_json::Value>) {
        let bytes = std::fs::read(RESIZE_FIXTURE)
            .unwrap_or_else(|e| panic!("{RESIZE_FIXTURE}: {e} (made by fixtures/make_resize_fixtures.py)"));
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().clone().unwrap_or_default();
        eprintln!("fixture versions: {}", meta["versions"]);
        let cases = serde_json::from_str(&meta["cases"]).unwrap();
        (bytes, cases)
    }

    /// Runs every BEiT table case whose MMSeg `q` satisfies `regime`; returns their names.
    fn rel_table_regime(regime: fn(f64) -> bool) -> Vec<String> {
        let (bytes, cases) = resize_cases();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (mut checked, mut failed) = (Vec::new(), Vec::new());
        for (name, case) in cases.iter().filter(|(k, _)| k.starts_with("rel_")) {
            let want_q: f64 = case["q"].as_str().unwrap().parse().unwrap();
            if !regime(want_q) {
                continue;
            }
            let num = |k: &str| case[k].as_u64().unwrap() as usize;
            let (sw, dw, heads) = (num("src_window"), num("dst_window"), num("heads"));
            let (src, dst) = (2 * sw - 1, 2 * dw - 1);
            let q = geometric_ratio(src / 2, dst / 2);
            assert_eq!(q, want_q, "{name}: q");
            // The case really is in the regime it claims: as many targets beyond the grid.
            let x = geometric_axis(src, q);
            let half = (dst / 2) as f64;
            let outside = (0..dst).map(|i| i as f64 - half).filter(|t| *t < x[0] || *t > x[src - 1]).count();
            assert_eq!(outside, num("targets_outside_source"), "{name}: targets outside");

            let (table, _) = load(&st, &format!("{name}.in"));
            let (want, shape) = load(&st, &format!("{name}.out"));
            assert_eq!(shape, [dst * dst + REL_TABLE_EXTRA_ROWS, heads], "{name}: shape");
            let got = resize_rel_pos_bias_table(&table, heads, sw, dw).unwrap();
            let (abs, rel) = diffs(&got, &want);
            eprintln!("{name}: q = {q:.10}, {outside} targets outside, max |diff| = {abs:.3e}, relative {rel:.3e}");
            // Every case is measured before any assertion, so a failure shows all of them.
            if rel > REL_TOL {
                failed.push(format!("{name}: max diff {abs:e} (relative {rel:e})"));
            }
            let extras = REL_TABLE_EXTRA_ROWS * heads;
            assert_eq!(got[got.len() - extras..], table[table.len() - extras..], "{name}: extra rows copied");
            checked.push(name.clone());
        }
        assert!(failed.is_empty(), "{failed:#?}");
        checked
    }

    #[test]
    fn rel_table_q_pinned_high_clamps_like_fitpack() {
        // q ends at the 1.5 bound: the outer targets lie beyond the source grid, where
        // FITPACK evaluates at the edge instead of continuing the cubic.
        let names = rel_table_regime(|q| q > 1.4999);
        for must in ["rel_4_6", "rel_4_7", "rel_4_8", "rel_4_10", "rel_7_24", "rel_3_5", "rel_5_10"] {
            assert!(names.iter().any(|n| n == must), "case {must} missing: {names:?}");
        }
    }

    #[test]
    fn rel_table_q_inside_bounds_matches_scipy() {
        let names = rel_table_regime(|q| q > 1.0101 && q < 1.4999);
        for must in ["rel_14_32", "rel_14_40", "rel_4_5"] {
            assert!(names.iter().any(|n| n == must), "case {must} missing: {names:?}");
        }
    }

    #[test]
    fn rel_table_q_pinned_low_matches_scipy() {
        // A smaller window: q ends at the 1.01 bound and every target lies inside the grid.
        let names = rel_table_regime(|q| q < 1.0101);
        for must in ["rel_14_7", "rel_7_3", "rel_4_3", "rel_4_2"] {
            assert!(names.iter().any(|n| n == must), "case {must} missing: {names:?}");
        }
    }

    #[test]
    fn pos_embed_matches_torch_at_the_borders() {
        // Strong up- and downscales, where torch clamps the cubic taps to the grid's edge.
        let (bytes, cases) = resize_cases();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (mut checked, mut failed) = (0, Vec::new());
        for (name, case) in cases.iter().filter(|(k, _)| k.starts_with("pos_")) {
            let num = |k: &str| case[k].as_u64().unwrap() as usize;
            let (old, new, dim) = (num("old_grid"), num("new_grid"), num("dim"));
            let (x, _) = load(&st, &format!("{name}.in"));
            let (want, shape) = load(&st, &format!("{name}.out"));
            assert_eq!(shape, [1, 1 + new * new, dim], "{name}: shape");
            let got = resize_abs_pos_embed(&x, 1, dim, old, new).unwrap();
            let (abs, rel) = diffs(&got, &want);
            eprintln!("{name}: max |diff| = {abs:.3e}, relative {rel:.3e}");
            if rel > REL_TOL {
                failed.push(format!("{name}: max diff {abs:e} (relative {rel:e})"));
            }
            checked += 1;
        }
        assert!(failed.is_empty(), "{failed:#?}");
        assert!(checked >= 9, "only {checked} pos_embed cases in the fixture");
    }

    #[test]
    fn rel_index_matches_mmseg() {
        let bytes = fixture_bytes();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for w in [7, 14] {
            let t = st.tensor(&format!("rel_index.{w}")).unwrap();
            assert_eq!(t.dtype(), safetensors::Dtype::I64);
            let want: Vec<i64> = t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
            assert_eq!(relative_position_index(w), want, "window {w}");
        }
    }

    #[test]
    fn geometric_ratio_matches_reference() {
        assert!((geometric_ratio(13, 31) - 1.1349178123).abs() < 1e-9);
        assert!((geometric_ratio(13, 39) - 1.1685036278).abs() < 1e-9);
        let bytes = fixture_bytes();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().clone().unwrap_or_default();
        let mut checked = 0;
        for (key, value) in meta.iter().filter(|(k, _)| k.starts_with("q_")) {
            let sides: Vec<usize> = key[2..].split('_').map(|s| s.parse().unwrap()).collect();
            let want: f64 = value.parse().unwrap();
            assert_eq!(geometric_ratio(sides[0] / 2, sides[1] / 2), want, "{key}");
            checked += 1;
        }
        eprintln!("checked {checked} q values from fixture metadata");
    }

    #[test]
    fn same_window_is_identity_and_index_layout() {
        let table: Vec<f32> = (0..172 * 2).map(|i| i as f32).collect();
        assert_eq!(resize_rel_pos_bias_table(&table, 2, 7, 7).unwrap(), table);
        let pos = [f32::INFINITY, 1.0, -0.0, f32::NAN, 2.0];
        let same = resize_abs_pos_embed(&pos, 1, 1, 2, 2).unwrap();
        assert_eq!(same.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), pos.map(f32::to_bits));
        let idx = relative_position_index(2);
        // 5×5: nrd = 9 + 3 = 12.
        assert_eq!(&idx[..5], &[11, 9, 9, 9, 9]);
        assert_eq!(idx[5], 10);
        assert_eq!(idx[5 + 1], 4); // patch 0 → patch 0: centre of the 3×3 grid
        assert_eq!(idx[5 + 4], 0); // patch (0,0) → patch (1,1): dy = dx = -1, the grid's first row
        assert_eq!(idx[4 * 5 + 1], 8); // patch (1,1) → patch (0,0): dy = dx = +1, its last row
    }

    #[test]
    fn spline_reproduces_cubics() {
        // A not-a-knot spline is exact on any cubic; a natural spline is not.
        let x = geometric_axis(9, 1.2);
        let f = |v: f64| 0.3 * v * v * v - v * v + 2.0 * v - 1.0;
        let t: Vec<f64> = (-4..=4).map(|i| i as f64 * 1.1).collect();
        let y: Vec<f64> = x.iter().map(|&v| f(v)).collect();
        let worst = |ends| {
            let w = spline_weights(&x, &t, ends);
            t.iter().enumerate().map(|(j, &tj)| (dot(&w[j * 9..][..9], &y) - f(tj)).abs()).fold(0.0, f64::max)
        };
        assert!(worst(SplineEnds::NotAKnot) < 1e-9);
        assert!(worst(SplineEnds::Natural) > 1e-3);
    }

    #[test]
    fn size_errors() {
        assert_eq!(
            resize_rel_pos_bias_table(&[0.0; 171 * 2], 2, 7, 14),
            Err(TransformError::TableLen { got: 342, expected: 344, window: 7, num_heads: 2 })
        );
        assert!(matches!(resize_abs_pos_embed(&[0.0; 49 * 4], 1, 4, 7, 14), Err(TransformError::PosEmbedLen { .. })));
        assert!(matches!(resize_abs_pos_embed(&[0.0; 4], 1, 4, 0, 14), Err(TransformError::EmptyGrid { .. })));
        assert!(matches!(resize_rel_pos_bias_table(&[0.0; 12], 1, 2, 7), Err(TransformError::WindowTooSmall { .. })));
        assert_eq!(pos_embed_grid(197, 1), Ok(14));
        assert_eq!(pos_embed_grid(198, 1), Err(TransformError::NotSquareGrid { tokens: 198, num_extra: 1 }));
        assert!(pos_embed_grid(0, 1).is_err());
        assert_eq!(rel_table_window(732), Ok(14));
        assert_eq!(rel_table_window(3972), Ok(32));
        for rows in [0, 2, 3, 7, 733, 4 * 4 + 3] {
            assert_eq!(rel_table_window(rows), Err(TransformError::NotSquareTable { rows }), "{rows}");
        }
        let msg = TransformError::TableLen { got: 342, expected: 344, window: 7, num_heads: 2 }.to_string();
        assert!(!msg.contains('\n') && msg.contains("342") && msg.contains("344"), "{msg}");
    }

    #[test]
    fn casts() {
        let vals = [1.0f32, -2.5, 65504.0, 1.0 + 2f32.powi(-11), 3.0e-8, f32::INFINITY];
        let f32b = f32_to_bytes(&vals, DType::F32).unwrap();
        // f32 → f16: 1 + 2^-11 is a tie between 1 and 1 + 2^-10 and rounds to even (1.0).
        let h = cast(&f32b, DType::F32, DType::F16).unwrap();
        let back = f32_from_bytes(&h, DType::F16).unwrap();
        assert_eq!(back[..4], [1.0, -2.5, 65504.0, 1.0]);
        assert_eq!(back[5], f32::INFINITY);
        // bf16 keeps 8 mantissa bits: 1 + 2^-11 → 1.
        let b = cast(&f32b, DType::F32, DType::BF16).unwrap();
        assert_eq!(b[..2], 0x3F80u16.to_le_bytes());
        // Widening is exact and round-trips.
        let d = cast(&h, DType::F16, DType::F64).unwrap();
        assert_eq!(cast(&d, DType::F64, DType::F16).unwrap(), h);
        assert_eq!(cast(&f32b, DType::F32, DType::F32).unwrap(), f32b);
        // f64 → f16 goes through f32 as torch does: 2^-40 is lost in f32, leaving a tie that
        // rounds to even (a direct f64 → f16 rounding would give 1 + 2^-10).
        let x = 1.0 + 2f64.powi(-11) + 2f64.powi(-40);
        let h = cast(&x.to_le_bytes(), DType::F64, DType::F16).unwrap();
        assert_eq!(f32_from_bytes(&h, DType::F16).unwrap(), [1.0]);
    }

    #[test]
    fn cast_errors() {
        assert_eq!(
            cast(&[0; 8], DType::I64, DType::F32),
            Err(TransformError::NotFloat { from: DType::I64, to: DType::F32 })
        );
        assert_eq!(
            cast(&[0; 4], DType::F32, DType::I32),
            Err(TransformError::NotFloat { from: DType::F32, to: DType::I32 })
        );
        let msg = cast(&[0; 8], DType::I64, DType::F32).unwrap_err().to_string();
        assert!(msg.contains("i64") && msg.contains("f32"), "{msg}");
        assert!(f32_from_bytes(&[0; 2], DType::Bool).is_err());
        assert!(f32_to_bytes(&[0.0], DType::U8).is_err());
        assert_eq!(
            f32_from_bytes(&[0; 3], DType::F16),
            Err(TransformError::ByteLen { len: 3, dtype: DType::F16, size: 2 })
        );
    }
}
