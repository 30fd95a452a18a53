//! Forward-pass check: candle MMSeg backbones (and original-layout models) vs references.
//!
//! A conversion is proved right by running the backbone it feeds and comparing what comes
//! out with something real:
//!
//! * [`mmseg_forward`] runs the MMSegmentation `MAE` / `BEiT` backbone (eval mode,
//!   `final_norm=False`) on weights in the MMSeg layout (`layers.i.ln1`, `ffn.layers.0.0`,
//!   ...), exactly as `mmseg/models/backbones/beit.py` computes it once the weights are loaded.
//! * [`original_forward`] runs the same network on the official layout (MAE = timm
//!   `VisionTransformer` names, BEiT = unilm names), so a conversion can be checked against
//!   its own source with no PyTorch: same input, same outputs expected. Sources in other
//!   families' names (Hugging Face, mmpretrain, segmentors, MMSeg files) are read by
//!   `sources` ([`SourceFamily`], [`original_weights`]) with verify's own code, never the
//!   mapping tables, and run by [`original_forward`] or [`source_forward`].
//! * [`Reference`] holds outputs recorded by PyTorch (a `.safetensors` file), and [`compare`]
//!   measures the difference per output against a [`Tolerance`].
//!
//! Outputs are the patch tokens (cls token removed) after the blocks in
//! [`BackboneConfig::out_indices`], as NCHW maps `[B, C, H/p, W/p]`, with no final norm.
//!
//! Weights arrive as a [`WeightMap`]: names → f32 tensors (integer tensors such as
//! `relative_position_index` may keep their integer type). This module knows no file format
//! beyond safetensors ([`load_safetensors_f32`], used by tests and references).

mod backbone;
mod compare;
mod config;
mod kernels;
mod layers;
mod matmul;
mod random;
mod reference;
mod sources;

#[cfg(test)]
mod tests;

pub use backbone::{mmseg_forward, original_forward, relative_position_index, source_forward};
pub use compare::{compare, OutputReport, Tolerance};
pub use config::{Arch, BackboneConfig, Layout};
pub use random::{deterministic_input, random_mmseg_weights, SplitMix64};
pub use reference::{load_safetensors_f32, Reference};
pub use sources::SourceFamily;

/// Weight names → tensors, all on one device. Float tensors are f32.
pub type WeightMap = std::collections::HashMap<String, candle_core::Tensor>;

/// The forward pass's outputs: `(block index, NCHW feature map)`, in `out_indices` order.
pub type Features = Vec<(usize, candle_core::Tensor)>;

/// What a user should do when an MMSeg-layout file lacks the tensors MMSeg creates at load
/// time (relative-position tables, layer-scale gammas). The CLI owns the flag's name.
pub const LOAD_READY_HINT: &str = "this key is filled in by MMSeg at load time, not by a plain \
     rename; convert with --img-size N to write it (zero relative tables and gamma = \
     init_values for MAE, tables resized to img_size for BEiT), or verify the original \
     checkpoint instead";

/// Everything that can go wrong while building a backbone, running it or reading references.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A weight the backbone needs is absent.
    #[error("missing weight '{key}': {hint}")]
    MissingKey { key: String, hint: String },
    /// A weight has a shape the configuration contradicts.
    #[error("weight '{key}' has shape {got:?}, expected {expected:?}{}", hint_suffix(.hint))]
    Shape { key: String, got: Vec<usize>, expected: Vec<usize>, hint: String },
    /// The configuration cannot be inferred or is inconsistent.
    #[error("backbone configuration: {0}")]
    Config(String),
    /// The input tensor does not fit the configuration.
    #[error("input: {0}")]
    Input(String),
    /// A reference file is unreadable or incomplete.
    #[error("reference {path}: {msg}")]
    Reference { path: String, msg: String },
    /// The device name is unknown or unavailable.
    #[error("device '{name}': {msg}")]
    Device { name: String, msg: String },
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("safetensors {path}: {msg}")]
    Safetensors { path: String, msg: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn hint_suffix(hint: &str) -> String {
    if hint.is_empty() {
        String::new()
    } else {
        format!(" ({hint})")
    }
}

pub type Result<T> = std::result::Result<T, VerifyError>;

/// Parses a device name: `cpu`, and with the `cuda` feature `cuda` (= `cuda:0`) or `cuda:N`.
pub fn device(name: &str) -> Result<candle_core::Device> {
    let name = name.trim();
    if name.eq_ignore_ascii_case("cpu") {
        return Ok(candle_core::Device::Cpu);
    }
    let ordinal = if name.eq_ignore_ascii_case("cuda") {
        Some(0)
    } else if let Some(n) = name.strip_prefix("cuda:") {
        Some(n.parse::<usize>().map_err(|_| VerifyError::Device {
            name: name.to_string(),
            msg: format!("'{n}' is not a GPU number (use cuda or cuda:N)"),
        })?)
    } else {
        None
    };
    let Some(ordinal) = ordinal else {
        return Err(VerifyError::Device {
            name: name.to_string(),
            msg: "unknown device; use cpu, cuda or cuda:N".to_string(),
        });
    };
    cuda_device(name, ordinal)
}

#[cfg(feature = "cuda")]
fn cuda_device(name: &str, ordinal: usize) -> Result<candle_core::Device> {
    candle_core::Device::new_cuda(ordinal).map_err(|e| VerifyError::Device {
        name: name.to_string(),
        msg: format!("cannot open CUDA device {ordinal}: {e}"),
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(name: &str, _ordinal: usize) -> Result<candle_core::Device> {
    Err(VerifyError::Device {
        name: name.to_string(),
        msg: "this binary was built without the `cuda` feature; rebuild with \
              `cargo build --release --features cuda` (needs the CUDA toolkit) or use --device cpu"
            .to_string(),
    })
}

mod from_checkpoint;
pub use from_checkpoint::{
    add_load_time_defaults, original_weights, verify_against_original, verify_with_reference, weights_from_checkpoint,
    VerifyOptions, VerifyOutcome,
};
