//! Measuring our outputs against a reference's.

use candle_core::{DType, Tensor};

use super::Result;

/// When an output counts as equal to its reference.
///
/// The outputs are unnormalised block features whose scale depends on the model (MAE-B
/// features reach magnitudes in the tens to hundreds), so a fixed absolute tolerance like
/// HF's `atol=1e-4` on logits would be too strict for one model and too loose for another.
/// We measure the largest absolute difference relative to the reference's largest magnitude
/// (`max_rel = max|ours - ref| / max|ref|`) plus the cosine similarity of the flattened maps.
///
/// Default: `max_rel ≤ 1e-4`, `cosine ≥ 1 - 1e-7`. fp32 on CPU against PyTorch fp32 differs
/// by summation order only: ~1e-7 relative per op (the 4-block fixtures measure max_rel ≈ 1e-6
/// and 1 - cosine ≈ 2e-13 against timm), growing slowly with depth and width, so 1e-4 leaves
/// two orders of magnitude of headroom for ViT-L/H at 512-640. Conversion errors measured on
/// the same fixtures (a swapped fc1/fc2, zeroed qkv bias, transposed pos_embed grid, zeroed or
/// swapped relative tables, wrong gamma) land at max_rel 2e-3 .. 0.25: 20x to 2500x beyond.
/// The cosine is the secondary, whole-map measure; since `1 - cos ≈ ‖a-b‖²/(2‖b‖²)`, the bound
/// 1e-7 corresponds to a relative L2 error of about 4.5e-4, in line with `max_rel`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Tolerance {
    pub max_rel: f64,
    pub min_cosine: f64,
}

impl Default for Tolerance {
    fn default() -> Self {
        Tolerance { max_rel: 1e-4, min_cosine: 1.0 - 1e-7 }
    }
}

/// How one output compares with its reference.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OutputReport {
    /// The block index (`out.<index>` in the reference).
    pub index: usize,
    /// The reference's shape.
    pub shape: Vec<usize>,
    /// Our shape, when it differs from the reference's (then no numbers are measured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub our_shape: Option<Vec<usize>>,
    /// `max |ours - ref|`.
    pub max_abs: Option<f64>,
    /// `max_abs / max |ref|`.
    pub max_rel: Option<f64>,
    /// Cosine similarity of the flattened outputs.
    pub cosine: Option<f64>,
    /// `max |ref|`, the scale `max_rel` is relative to.
    pub ref_max_abs: Option<f64>,
    pub passed: bool,
    /// Why it failed when no number says so (a missing output, a shape mismatch, NaN).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Compares each reference output with ours of the same index. One report per reference
/// output, in the reference's order; an output of ours the reference lacks is not reported.
/// A missing output, a shape mismatch or a non-finite value is a failing report, not an error.
pub fn compare(ours: &[(usize, Tensor)], reference: &[(usize, Tensor)], tol: &Tolerance) -> Result<Vec<OutputReport>> {
    reference
        .iter()
        .map(|(index, r)| {
            let shape = r.dims().to_vec();
            let mut report = OutputReport {
                index: *index,
                shape: shape.clone(),
                our_shape: None,
                max_abs: None,
                max_rel: None,
                cosine: None,
                ref_max_abs: None,
                passed: false,
                note: None,
            };
            let Some((_, o)) = ours.iter().find(|(i, _)| i == index) else {
                report.note = Some(format!("no output computed for block {index}"));
                return Ok(report);
            };
            if o.dims() != shape.as_slice() {
                report.our_shape = Some(o.dims().to_vec());
                report.note = Some(format!("shape {:?} differs from the reference's {:?}", o.dims(), shape));
                return Ok(report);
            }
            let a = to_f64(o)?;
            let b = to_f64(r)?;
            let (mut max_abs, mut ref_max, mut dot, mut na, mut nb) = (0f64, 0f64, 0f64, 0f64, 0f64);
            let mut finite = true;
            for (&x, &y) in a.iter().zip(&b) {
                if !x.is_finite() || !y.is_finite() {
                    finite = false;
                }
                max_abs = max_abs.max((x - y).abs());
                ref_max = ref_max.max(y.abs());
                dot += x * y;
                na += x * x;
                nb += y * y;
            }
            let max_rel = if ref_max > 0.0 {
                max_abs / ref_max
            } else if max_abs == 0.0 {
                0.0
            } else {
                f64::INFINITY
            };
            let cosine = if na > 0.0 && nb > 0.0 {
                dot / (na.sqrt() * nb.sqrt())
            } else if na == 0.0 && nb == 0.0 {
                1.0
            } else {
                0.0
            };
            report.max_abs = Some(max_abs);
            report.max_rel = Some(max_rel);
            report.cosine = Some(cosine);
            report.ref_max_abs = Some(ref_max);
            if !finite {
                report.note = Some("non-finite values (NaN or infinity)".to_string());
            } else {
                report.passed = max_rel <= tol.max_rel && cosine >= tol.min_cosine;
            }
            Ok(report)
        })
        .collect()
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.to_device(&candle_core::Device::Cpu)?.flatten_all()?.to_vec1()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn measures_and_judges() {
        let r = vec![(1, t(&[1.0, -2.0, 4.0, 0.0], &[1, 1, 2, 2]))];
        let same = vec![(1, t(&[1.0, -2.0, 4.0, 0.0], &[1, 1, 2, 2]))];
        let rep = compare(&same, &r, &Tolerance::default()).unwrap();
        assert!(rep[0].passed);
        assert_eq!(rep[0].max_abs, Some(0.0));
        assert!((rep[0].cosine.unwrap() - 1.0).abs() < 1e-12);

        let off = vec![(1, t(&[1.0, -2.0, 4.002, 0.0], &[1, 1, 2, 2]))];
        let rep = compare(&off, &r, &Tolerance::default()).unwrap();
        assert!(!rep[0].passed);
        assert!((rep[0].max_rel.unwrap() - 0.0005).abs() < 1e-6);
    }

    #[test]
    fn shape_mismatch_missing_output_and_nan_fail_without_error() {
        let r = vec![
            (1, t(&[1.0, 2.0, 3.0, 4.0], &[1, 1, 2, 2])),
            (3, t(&[1.0, 2.0], &[1, 2, 1, 1])),
            (5, t(&[1.0], &[1, 1, 1, 1])),
        ];
        let ours = vec![(1, t(&[1.0, 2.0, 3.0, 4.0], &[1, 4, 1, 1])), (5, t(&[f32::NAN], &[1, 1, 1, 1]))];
        let rep = compare(&ours, &r, &Tolerance::default()).unwrap();
        assert_eq!(rep.len(), 3);
        assert!(rep.iter().all(|r| !r.passed));
        assert_eq!(rep[0].our_shape, Some(vec![1, 4, 1, 1]));
        assert!(rep[1].note.as_deref().unwrap().contains("no output"));
        assert!(rep[2].note.as_deref().unwrap().contains("non-finite"));
        let json = serde_json::to_string(&rep).unwrap();
        assert!(json.contains("\"passed\":false"));
    }
}
