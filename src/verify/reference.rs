//! Reference outputs recorded by PyTorch, and safetensors weight loading.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::{Result, VerifyError, WeightMap};

/// Loads every tensor of a `.safetensors` file onto `device`; floating-point tensors (f16,
/// bf16, f64, ...) become f32, integer tensors (an index) keep their type.
pub fn load_safetensors_f32(path: impl AsRef<Path>, device: &Device) -> Result<WeightMap> {
    let path = path.as_ref();
    let bytes = read(path)?;
    load_buffer_f32(&bytes, path, device)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| VerifyError::Io { path: path.display().to_string(), source })
}

fn load_buffer_f32(bytes: &[u8], path: &Path, device: &Device) -> Result<WeightMap> {
    let raw = candle_core::safetensors::load_buffer(bytes, device)
        .map_err(|e| VerifyError::Safetensors { path: path.display().to_string(), msg: e.to_string() })?;
    raw.into_iter()
        .map(|(k, t)| {
            let t = if t.dtype().is_float() && t.dtype() != DType::F32 { t.to_dtype(DType::F32)? } else { t };
            Ok((k, t))
        })
        .collect()
}

/// Outputs of a real PyTorch backbone on a known input, read from a `.safetensors` file with
/// tensors `input` `[B,3,N,N]` and `out.<block index>` `[B,C,N/p,N/p]`, and string metadata
/// (`arch`, `img_size`, `patch_size`, `embed_dim`, `depth`, `num_heads`, `out_indices` as
/// "1,3", `source`, `made_by`).
#[derive(Debug, Clone)]
pub struct Reference {
    pub input: Tensor,
    /// `(block index, output)`, sorted by index.
    pub outputs: Vec<(usize, Tensor)>,
    pub metadata: HashMap<String, String>,
}

impl Reference {
    /// Reads a reference onto `device` (f32).
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let err = |msg: String| VerifyError::Reference { path: path.display().to_string(), msg };
        let bytes = read(path)?;
        let (_, header) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| err(format!("not a safetensors file: {e}")))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let mut tensors = load_buffer_f32(&bytes, path, device)?;

        let input = tensors
            .remove("input")
            .ok_or_else(|| err("no 'input' tensor (the image the outputs were computed from)".to_string()))?;
        if input.rank() != 4 || input.dim(1)? != 3 {
            return Err(err(format!("'input' has shape {:?}; expected [B, 3, N, N]", input.dims())));
        }
        let mut outputs = Vec::new();
        let mut others = Vec::new();
        for (name, t) in tensors {
            match name.strip_prefix("out.").map(str::parse::<usize>) {
                Some(Ok(i)) => outputs.push((i, t.to_dtype(DType::F32)?)),
                _ => others.push(name),
            }
        }
        if outputs.is_empty() {
            others.sort();
            return Err(err(format!(
                "no 'out.<block index>' tensors (found: {})",
                if others.is_empty() { "only 'input'".to_string() } else { others.join(", ") }
            )));
        }
        outputs.sort_by_key(|(i, _)| *i);
        let reference = Reference { input: input.to_dtype(DType::F32)?, outputs, metadata };
        if let Some(listed) = reference.metadata.get("out_indices") {
            let listed = parse_indices(listed).map_err(err)?;
            let mut sorted = listed.clone();
            sorted.sort_unstable();
            if sorted != reference.out_indices() {
                return Err(err(format!(
                    "metadata out_indices {listed:?} disagree with the stored outputs {:?}",
                    reference.out_indices()
                )));
            }
        }
        Ok(reference)
    }

    /// The block indices with a stored output, ascending.
    pub fn out_indices(&self) -> Vec<usize> {
        self.outputs.iter().map(|(i, _)| *i).collect()
    }

    /// The input's side in pixels.
    pub fn img_size(&self) -> usize {
        self.input.dims()[3]
    }

    /// A metadata entry parsed as a number: `None` when absent, an error when malformed.
    pub fn meta_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| VerifyError::Config(format!("reference metadata {key}='{v}' is not a number"))),
        }
    }
}

fn parse_indices(s: &str) -> std::result::Result<Vec<usize>, String> {
    s.split(',')
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<usize>().map_err(|_| format!("metadata out_indices '{s}' is not a comma-separated list")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, tensors: &[(&str, Tensor)], meta: &[(&str, &str)]) {
        let data: Vec<(String, Tensor)> = tensors.iter().map(|(k, t)| (k.to_string(), t.clone())).collect();
        let meta: HashMap<String, String> = meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        safetensors::serialize_to_file(data, Some(meta), path).unwrap();
    }

    #[test]
    fn reference_roundtrip_and_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let input = Tensor::zeros((1, 3, 32, 32), DType::F32, &dev).unwrap();
        let out = Tensor::ones((1, 8, 2, 2), DType::F16, &dev).unwrap();

        let good = dir.path().join("good.safetensors");
        write(
            &good,
            &[("input", input.clone()), ("out.3", out.clone()), ("out.1", out.clone())],
            &[("arch", "mae"), ("out_indices", "1,3"), ("img_size", "32")],
        );
        let r = Reference::load(&good, &dev).unwrap();
        assert_eq!(r.out_indices(), vec![1, 3]);
        assert_eq!(r.outputs[0].1.dtype(), DType::F32);
        assert_eq!(r.img_size(), 32);
        assert_eq!(r.meta_usize("img_size").unwrap(), Some(32));
        assert_eq!(r.metadata["arch"], "mae");

        let no_input = dir.path().join("no_input.safetensors");
        write(&no_input, &[("out.1", out.clone())], &[]);
        let e = Reference::load(&no_input, &dev).unwrap_err().to_string();
        assert!(e.contains("no 'input'"), "{e}");

        let no_out = dir.path().join("no_out.safetensors");
        write(&no_out, &[("input", input.clone()), ("x", out.clone())], &[]);
        let e = Reference::load(&no_out, &dev).unwrap_err().to_string();
        assert!(e.contains("no 'out.<block index>'") && e.contains("x"), "{e}");

        let bad_meta = dir.path().join("bad_meta.safetensors");
        write(&bad_meta, &[("input", input), ("out.1", out)], &[("out_indices", "1,3")]);
        let e = Reference::load(&bad_meta, &dev).unwrap_err().to_string();
        assert!(e.contains("disagree"), "{e}");

        let e = Reference::load(dir.path().join("absent.safetensors"), &dev).unwrap_err().to_string();
        assert!(e.contains("absent.safetensors"), "{e}");
    }
}
