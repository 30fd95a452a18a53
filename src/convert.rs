//! Executes a mapping `Plan` against an open checkpoint and writes the result atomically:
//! renamed tensors stream their bytes straight from the input; transformed ones are
//! computed one at a time. Also the JSON report of a run.

use std::cell::RefCell;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use sha2::Digest;

use crate::atomic::AtomicFile;
use crate::checkpoint::{Checkpoint, TensorEntry};
use crate::mapping::plan::{Origin, Plan, PlannedTensor};
use crate::mapping::transforms;
use crate::progress::Progress;
use crate::pth::write::{write_pth, TensorToWrite};
use crate::DType;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{path}: {msg}")]
    Output { path: PathBuf, msg: String },
    #[error("plan refers to source key {0}, which the checkpoint does not have")]
    MissingSource(String),
    #[error("tensor {target}: {msg}")]
    Transform { target: String, msg: String },
    #[error("{0}: output format must be .pth or .safetensors (by extension)")]
    UnknownFormat(PathBuf),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    Pth,
    Safetensors,
}

impl OutputFormat {
    pub fn from_path(path: &Path) -> Result<OutputFormat, ConvertError> {
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("pth") | Some("pt") | Some("bin") | Some("ckpt") => Ok(OutputFormat::Pth),
            Some("safetensors") => Ok(OutputFormat::Safetensors),
            _ => Err(ConvertError::UnknownFormat(path.to_path_buf())),
        }
    }
}

/// What a finished conversion wrote.
#[derive(Debug, Serialize)]
pub struct WriteSummary {
    pub output: String,
    pub format: OutputFormat,
    pub tensors: usize,
    pub bytes: u64,
    pub seconds: f64,
}

/// The output dtype of a planned tensor: `--dtype` applies to floating-point tensors only.
pub fn output_dtype(t: &PlannedTensor, cast: Option<DType>) -> DType {
    match cast {
        Some(to) if t.dtype.is_float() => to,
        _ => t.dtype,
    }
}

/// Produces output tensors' bytes from the checkpoint and the plan.
struct Producer<'a> {
    ckpt: &'a Checkpoint,
    sources: std::collections::HashMap<&'a str, &'a TensorEntry<'a>>,
    cast: Option<DType>,
}

impl<'a> Producer<'a> {
    fn source(&self, name: &str) -> Result<&'a TensorEntry<'a>, ConvertError> {
        self.sources.get(name).copied().ok_or_else(|| ConvertError::MissingSource(name.to_string()))
    }

    fn terr(t: &PlannedTensor, e: impl std::fmt::Display) -> ConvertError {
        ConvertError::Transform { target: t.target.clone(), msg: e.to_string() }
    }

    fn read_f32(&self, t: &PlannedTensor, src: &str) -> Result<(Vec<f32>, DType), ConvertError> {
        let s = self.source(src)?;
        let bytes = self.ckpt.read(s.view).map_err(|e| Self::terr(t, e))?;
        let vals = transforms::f32_from_bytes(&bytes, s.view.dtype).map_err(|e| Self::terr(t, e))?;
        Ok((vals, s.view.dtype))
    }

    /// Writes the bytes of `t` to `out`. A plain rename without a dtype change streams the
    /// source bytes unchanged; everything else is computed in memory, one tensor at a time.
    fn write(&self, t: &PlannedTensor, out: &mut dyn Write) -> Result<(), ConvertError> {
        let to = output_dtype(t, self.cast);
        let bytes = match &t.origin {
            Origin::Rename { source } | Origin::Expand { source } | Origin::Keep { source } => {
                let s = self.source(source)?;
                if s.view.dtype == to {
                    return self.ckpt.write_to(s.view, out).map_err(|e| Self::terr(t, e));
                }
                let raw = self.ckpt.read(s.view).map_err(|e| Self::terr(t, e))?;
                transforms::cast(&raw, s.view.dtype, to).map_err(|e| Self::terr(t, e))?
            }
            Origin::ResizeAbsPosEmbed { source, num_extra, old_grid, new_grid } => {
                let (vals, _) = self.read_f32(t, source)?;
                let dim = *t.shape.last().unwrap_or(&1);
                let out_vals = transforms::resize_abs_pos_embed(&vals, *num_extra, dim, *old_grid, *new_grid)
                    .map_err(|e| Self::terr(t, e))?;
                transforms::f32_to_bytes(&out_vals, to).map_err(|e| Self::terr(t, e))?
            }
            Origin::ResizeRelPosTable { source, src_window, dst_window, num_heads } => {
                let (vals, _) = self.read_f32(t, source)?;
                let out_vals = transforms::resize_rel_pos_bias_table(&vals, *num_heads, *src_window, *dst_window)
                    .map_err(|e| Self::terr(t, e))?;
                transforms::f32_to_bytes(&out_vals, to).map_err(|e| Self::terr(t, e))?
            }
            Origin::RelPosIndex { window } => {
                let idx = transforms::relative_position_index(*window);
                idx.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            Origin::Fill { value } => {
                let n: usize = t.shape.iter().product();
                transforms::f32_to_bytes(&vec![*value as f32; n], to).map_err(|e| Self::terr(t, e))?
            }
        };
        let expected = t.shape.iter().product::<usize>() * to.size();
        if bytes.len() != expected {
            return Err(Self::terr(t, format!("produced {} bytes, expected {expected} for shape {:?}", bytes.len(), t.shape)));
        }
        out.write_all(&bytes).map_err(|e| Self::terr(t, e))
    }
}

/// Writes the plan's outputs to `dest` (.pth or .safetensors by extension), atomically:
/// nothing appears at `dest` unless the whole file was written, synced and re-read.
pub fn write_plan(
    ckpt: &Checkpoint,
    sources: &[TensorEntry],
    plan: &Plan,
    dest: &Path,
    cast: Option<DType>,
    progress: &dyn Progress,
) -> Result<WriteSummary, ConvertError> {
    let start = Instant::now();
    let format = OutputFormat::from_path(dest)?;
    let out_err = |msg: String| ConvertError::Output { path: dest.to_path_buf(), msg };
    let producer = Producer {
        ckpt,
        sources: sources.iter().map(|s| (s.name.as_str(), s)).collect(),
        cast,
    };
    let dtypes: Vec<DType> = plan.outputs.iter().map(|t| output_dtype(t, cast)).collect();
    let total: u64 = plan.outputs.iter().zip(&dtypes).map(|(t, d)| (t.shape.iter().product::<usize>() * d.size()) as u64).sum();
    let mut atomic = AtomicFile::create(dest).map_err(|e| out_err(format!("cannot create a temporary file next to it: {e}")))?;
    progress.begin("converting", Some(total));

    let result = match format {
        OutputFormat::Pth => {
            let stem = dest.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let to_write: Vec<TensorToWrite> = plan
                .outputs
                .iter()
                .zip(&dtypes)
                .map(|(t, &dtype)| TensorToWrite { name: &t.target, dtype, shape: &t.shape })
                .collect();
            let file = atomic.file().try_clone().map_err(|e| out_err(e.to_string()))?;
            let writer = BufWriter::with_capacity(1 << 20, file);
            let mut failure: Option<ConvertError> = None;
            let res = write_pth(writer, &stem, &to_write, |i, w| {
                let t = &plan.outputs[i];
                let r = producer.write(t, w);
                progress.advance((t.shape.iter().product::<usize>() * dtypes[i].size()) as u64);
                r.map_err(|e| {
                    let msg = e.to_string();
                    failure = Some(e);
                    io::Error::other(msg)
                })
            });
            match (res, failure) {
                (_, Some(e)) => Err(e),
                (Err(e), None) => Err(out_err(e.to_string())),
                (Ok(mut w), None) => w.flush().map_err(|e| out_err(e.to_string())),
            }
        }
        OutputFormat::Safetensors => {
            let error = RefCell::new(None);
            let tensors: Vec<(String, crate::safetensors_io::LazyTensor)> = plan
                .outputs
                .iter()
                .zip(&dtypes)
                .map(|(t, &dtype)| {
                    let producer = &producer;
                    let lazy = crate::safetensors_io::LazyTensor {
                        dtype,
                        shape: t.shape.clone(),
                        produce: Box::new(move || {
                            let mut buf = Vec::new();
                            producer.write(t, &mut buf).map_err(|e| e.to_string())?;
                            progress.advance(buf.len() as u64);
                            Ok(buf)
                        }),
                        error: &error,
                    };
                    (t.target.clone(), lazy)
                })
                .collect();
            crate::safetensors_io::write_safetensors(atomic.file(), tensors, &error).map_err(out_err)
        }
    };
    progress.end();
    result?;

    // Re-read what we wrote before it replaces anything: names, order and shapes must be
    // the plan's.
    let reread = Checkpoint::open(atomic.temp_path()).map_err(|e| out_err(format!("written file does not read back: {}", e.source)))?;
    let written = reread.tensors();
    // (safetensors orders tensors its own way, so compare as sets of name and shape.)
    let written: std::collections::HashMap<&str, &[usize]> =
        written.iter().map(|w| (w.name.as_str(), w.view.shape.as_slice())).collect();
    let matches = written.len() == plan.outputs.len()
        && plan.outputs.iter().all(|p| written.get(p.target.as_str()) == Some(&p.shape.as_slice()));
    if !matches {
        return Err(out_err("written file does not hold the planned tensors".into()));
    }
    let bytes = std::fs::metadata(atomic.temp_path()).map(|m| m.len()).unwrap_or(0);
    atomic.commit().map_err(|e| out_err(format!("cannot move the finished file into place: {e}")))?;
    Ok(WriteSummary {
        output: dest.display().to_string(),
        format,
        tensors: plan.outputs.len(),
        bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// A mapping table chosen by name, by file, or by detection.
pub enum TableChoice {
    Builtin(&'static MappingTable),
    User(Box<MappingTable>),
}

impl TableChoice {
    pub fn table(&self) -> &MappingTable {
        match self {
            TableChoice::Builtin(t) => t,
            TableChoice::User(t) => t,
        }
    }
}

use crate::mapping::table::{self, MappingTable};
use crate::mapping::plan::{plan, PlanOptions, SourceTensor};

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("{path}: cannot read mapping table: {source}")]
    TableFile { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Table(#[from] crate::mapping::table::TableError),
    #[error("{file}: {source}")]
    Detect { file: PathBuf, source: crate::mapping::table::TableError },
    #[error("{file}: mapping table {table}: {source}")]
    Plan { file: PathBuf, table: String, source: crate::mapping::plan::PlanError },
    #[error("{file}: the checkpoint holds no tensors: nothing to convert")]
    NoTensors { file: PathBuf },
    #[error("{file}: none of the containers {containers:?} that mapping table {table} unwraps holds tensors")]
    NoContainer { file: PathBuf, table: String, containers: Vec<String> },
}

/// `spec` is a built-in table name or a path to a TOML file; `None` detects the table from
/// the checkpoint's key names.
pub fn choose_table(spec: Option<&str>, ckpt: &Checkpoint) -> Result<TableChoice, PrepareError> {
    if ckpt.tensors().is_empty() {
        return Err(PrepareError::NoTensors { file: ckpt.path().to_path_buf() });
    }
    match spec {
        Some(s) if s.ends_with(".toml") || Path::new(s).is_file() => {
            let text = std::fs::read_to_string(s).map_err(|source| PrepareError::TableFile { path: s.into(), source })?;
            Ok(TableChoice::User(Box::new(MappingTable::parse(&text, s)?)))
        }
        Some(name) => Ok(TableChoice::Builtin(MappingTable::builtin(name)?)),
        None => {
            let root = crate::inspect::find_state_dict(ckpt).unwrap_or("");
            let names: Vec<String> = ckpt.tensors_under(root).unwrap_or_default().into_iter().map(|t| t.name).collect();
            table::detect(&names)
                .map(TableChoice::Builtin)
                .map_err(|source| PrepareError::Detect { file: ckpt.path().to_path_buf(), source })
        }
    }
}

/// The container a table unwraps in this checkpoint: the first of its list that holds tensors.
pub fn table_root<'t>(table: &'t MappingTable, ckpt: &Checkpoint) -> Option<&'t str> {
    table
        .containers()
        .iter()
        .map(String::as_str)
        .find(|c| ckpt.tensors_under(c).is_some_and(|t| !t.is_empty()))
}

/// Plans a conversion of `ckpt` with `table`: returns the unwrapped container and the plan.
pub fn prepare<'c>(
    ckpt: &'c Checkpoint,
    table: &MappingTable,
    opts: &PlanOptions,
) -> Result<(String, Vec<TensorEntry<'c>>, Plan), PrepareError> {
    let root = table_root(table, ckpt).ok_or_else(|| PrepareError::NoContainer {
        file: ckpt.path().to_path_buf(),
        table: table.name().to_string(),
        containers: table.containers().to_vec(),
    })?;
    let entries = ckpt.tensors_under(root).unwrap_or_default();
    let sources: Vec<SourceTensor> = entries
        .iter()
        .map(|t| SourceTensor { name: t.name.clone(), shape: t.view.shape.clone(), dtype: t.view.dtype })
        .collect();
    let plan = plan(table, &sources, opts).map_err(|source| PrepareError::Plan {
        file: ckpt.path().to_path_buf(),
        // A user's table by its path; a built-in one as `builtin:NAME`.
        table: table.origin().to_string(),
        source,
    })?;
    Ok((root.to_string(), entries, plan))
}
