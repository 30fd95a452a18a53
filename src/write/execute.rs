//! Executes a mapping `Plan` against an open checkpoint and writes the result atomically:
//! renamed tensors stream their bytes straight from the input; transformed ones are
//! computed one at a time.

use std::cell::RefCell;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::atomic::AtomicFile;
use crate::formats::checkpoint::{Checkpoint, TensorEntry};
use crate::formats::Value;
use crate::mapping::plan::{Origin, Plan, PlannedTensor};
use crate::mapping::transforms;
use crate::progress::Progress;
use crate::write::outfile::{OutFile, TensorSink};
use crate::write::pth::{write_pth_nested, TensorToWrite, TopEntry};
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
    #[error("{}: mapping table {table} writes {layout}, which only a .pth file holds (safetensors is one flat dict of tensors, and MMSeg reads segmentors with torch.load); write a .pth, or extract the backbone into .safetensors with mmseg-mae / mmseg-beit", path.display())]
    NestedSafetensors { path: PathBuf, table: String, layout: String },
    #[error("{}: is the input checkpoint itself (the same file{}); write the output to another path", dst.display(), if dst == src { String::new() } else { format!(" as {}", src.display()) })]
    SameFile { dst: PathBuf, src: PathBuf },
    #[error(transparent)]
    Input(#[from] crate::formats::checkpoint::CheckpointError),
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
    /// Reused by `cast_f32_stream`.
    cast_buffers: RefCell<(Vec<f32>, Vec<u16>)>,
    /// Relative-position indices by window (every layer gets the same one).
    index_cache: RefCell<std::collections::HashMap<usize, CachedIndex>>,
}

/// A relative-position index's bytes, their CRC-32, and where the first copy went in the
/// output archive (later layers copy that inside the file).
struct CachedIndex {
    bytes: std::rc::Rc<Vec<u8>>,
    crc: u32,
    written_at: Option<u64>,
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

    /// Casts a contiguous f32 range of the input to f16/bf16 while copying, a chunk at a
    /// time through reused buffers (no per-tensor allocations, one pass, vectorised).
    fn cast_f32_stream(&self, offset: u64, len: u64, to: DType, out: &mut dyn Write) -> io::Result<()> {
        use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
        use std::os::unix::fs::FileExt;
        const CHUNK: usize = 1 << 20; // elements
        let mut bufs = self.cast_buffers.borrow_mut();
        let (src, dst) = &mut *bufs;
        src.resize(CHUNK, 0.0);
        dst.resize(CHUNK, 0);
        let mut done = 0u64;
        while done < len {
            let n = (((len - done) / 4) as usize).min(CHUNK);
            // SAFETY: an f32 buffer viewed as its bytes (any bit pattern is a valid f32).
            let bytes = unsafe { std::slice::from_raw_parts_mut(src.as_mut_ptr() as *mut u8, n * 4) };
            self.ckpt.file().read_exact_at(bytes, offset + done)?;
            if cfg!(target_endian = "big") {
                return Err(io::Error::other("big-endian hosts are not supported"));
            }
            match to {
                DType::F16 => {
                    HalfBitsSliceExt::reinterpret_cast_mut::<half::f16>(&mut dst[..n]).convert_from_f32_slice(&src[..n])
                }
                _ => HalfBitsSliceExt::reinterpret_cast_mut::<half::bf16>(&mut dst[..n])
                    .convert_from_f32_slice(&src[..n]),
            }
            // SAFETY: a u16 buffer viewed as its (little-endian) bytes.
            out.write_all(unsafe { std::slice::from_raw_parts(dst.as_ptr() as *const u8, n * 2) })?;
            done += n as u64 * 4;
        }
        Ok(())
    }

    /// Appends `t` to a zip entry or a plain file: a plain rename of a contiguous tensor is
    /// copied file to file (inside the kernel, reusing the source's CRC when it covers
    /// exactly these bytes), and a relative-position index already written is copied from
    /// its first place in the output.
    fn write_to_sink(&self, t: &PlannedTensor, w: &mut impl TensorSink) -> Result<(), ConvertError> {
        if let Origin::RelPosIndex { window } = &t.origin {
            let (bytes, crc, written_at) = self.index_for(*window);
            if let Some(at) = written_at {
                if w.repeat_earlier(at, bytes.len() as u64, crc).map_err(|e| Self::terr(t, e))? {
                    return Ok(());
                }
            }
            let at = w.position();
            w.write_all(&bytes).map_err(|e| Self::terr(t, e))?;
            if let Some(c) = self.index_cache.borrow_mut().get_mut(window) {
                c.written_at = Some(at);
            }
            return Ok(());
        }
        if let Some((offset, len, crc)) = self.copy_source(t)? {
            return w.copy_from(self.ckpt.file(), offset, len, crc).map_err(|e| Self::terr(t, e));
        }
        self.write(t, w)
    }

    /// Where `t`'s bytes lie in the input (offset, length, CRC-32 if known) when it is a
    /// plain copy of a contiguous source in the same dtype.
    fn copy_source(&self, t: &PlannedTensor) -> Result<Option<(u64, u64, Option<u32>)>, ConvertError> {
        if let Origin::Rename { source } | Origin::Expand { source } | Origin::Keep { source } = &t.origin {
            let s = self.source(source)?;
            if s.view.dtype == output_dtype(t, self.cast) {
                return Ok(self.ckpt.byte_range(s.view));
            }
        }
        Ok(None)
    }

    /// The relative-position index for `window` (computed once): its bytes, CRC-32, and
    /// where it was first written in the output (if it was).
    fn index_for(&self, window: usize) -> (std::rc::Rc<Vec<u8>>, u32, Option<u64>) {
        let mut cache = self.index_cache.borrow_mut();
        let c = cache.entry(window).or_insert_with(|| {
            let idx = transforms::relative_position_index(window);
            let bytes: Vec<u8> = idx.iter().flat_map(|v| v.to_le_bytes()).collect();
            CachedIndex { crc: crc32fast::hash(&bytes), bytes: std::rc::Rc::new(bytes), written_at: None }
        });
        (c.bytes.clone(), c.crc, c.written_at)
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
                if s.view.dtype == DType::F32 && matches!(to, DType::F16 | DType::BF16) {
                    if let Some((offset, len, _)) = self.ckpt.byte_range(s.view) {
                        return self.cast_f32_stream(offset, len, to, out).map_err(|e| Self::terr(t, e));
                    }
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
                let (bytes, _, _) = self.index_for(*window);
                return out.write_all(&bytes).map_err(|e| Self::terr(t, e));
            }
            Origin::Concat { sources, dim } => {
                let parts = sources
                    .iter()
                    .map(|s| {
                        self.source(s).and_then(|e| {
                            Ok(transforms::ConcatPart {
                                bytes: self.ckpt.read(e.view).map_err(|err| Self::terr(t, err))?,
                                dtype: e.view.dtype,
                                shape: e.view.shape.clone(),
                            })
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                transforms::concat(&parts, *dim, to).map_err(|e| Self::terr(t, e))?
            }
            Origin::Fill { value } => {
                let n: usize = t.shape.iter().product();
                transforms::f32_to_bytes(&vec![*value as f32; n], to).map_err(|e| Self::terr(t, e))?
            }
        };
        let expected = t.shape.iter().product::<usize>() * to.size();
        if bytes.len() != expected {
            return Err(Self::terr(
                t,
                format!("produced {} bytes, expected {expected} for shape {:?}", bytes.len(), t.shape),
            ));
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
    write_plan_uncommitted(ckpt, sources, plan, dest, cast, progress)?.commit()
}

/// A finished, re-read output that is not at its destination yet (on Linux it has no name
/// at all): [`Written::commit`] moves it into place; dropping it leaves nothing behind.
/// `convert --verify` runs the forward pass on it in between, so a conversion that computes
/// something else never replaces anything.
pub struct Written {
    file: AtomicFile,
    summary: WriteSummary,
}

impl Written {
    /// A path that opens the written file.
    pub fn read_path(&self) -> PathBuf {
        self.file.read_path()
    }

    pub fn commit(self) -> Result<WriteSummary, ConvertError> {
        let dest = PathBuf::from(&self.summary.output);
        self.file.commit().map_err(|e| ConvertError::Output {
            path: dest,
            msg: format!("cannot move the finished file into place: {e}"),
        })?;
        Ok(self.summary)
    }
}

/// [`write_plan`] up to, not including, moving the file into place.
pub fn write_plan_uncommitted(
    ckpt: &Checkpoint,
    sources: &[TensorEntry],
    plan: &Plan,
    dest: &Path,
    cast: Option<DType>,
    progress: &dyn Progress,
) -> Result<Written, ConvertError> {
    let start = Instant::now();
    let format = OutputFormat::from_path(dest)?;
    if format == OutputFormat::Safetensors && !plan.layout.is_flat() {
        let mut keys: Vec<String> = plan.layout.meta.iter().map(|m| format!("'{m}': {{…}}")).collect();
        keys.extend(plan.layout.container.iter().map(|c| format!("'{c}': {{tensors}}")));
        let layout = format!("a nested file {{{}}}", keys.join(", "));
        return Err(ConvertError::NestedSafetensors { path: dest.to_path_buf(), table: plan.table.clone(), layout });
    }
    // The plain values kept next to the state dict (a segmentor's meta), and the file's
    // top-level entries in the source's order.
    let meta: Option<(String, Value)> =
        plan.layout.meta.as_ref().map(|k| (k.clone(), super::meta::output_meta(ckpt.root(), k).0));
    let top = top_entries(ckpt.root(), &plan.layout, meta.as_ref());
    let out_err = |msg: String| ConvertError::Output { path: dest.to_path_buf(), msg };
    let producer = Producer {
        ckpt,
        sources: sources.iter().map(|s| (s.name.as_str(), s)).collect(),
        cast,
        cast_buffers: RefCell::new((Vec::new(), Vec::new())),
        index_cache: RefCell::new(std::collections::HashMap::new()),
    };
    let dtypes: Vec<DType> = plan.outputs.iter().map(|t| output_dtype(t, cast)).collect();
    let total: u64 =
        plan.outputs.iter().zip(&dtypes).map(|(t, d)| (t.shape.iter().product::<usize>() * d.size()) as u64).sum();
    // Writing over the input would replace the only copy of the original (the rename at the
    // end succeeds): refuse before anything is touched.
    if super::atomic::same_file(ckpt.path(), dest) {
        return Err(ConvertError::SameFile { dst: dest.to_path_buf(), src: ckpt.path().to_path_buf() });
    }
    let folder = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    super::atomic::create_parent_dirs(dest)
        .map_err(|e| out_err(format!("cannot create the folder {}: {e}", folder.display())))?;
    let mut atomic = AtomicFile::create(dest)
        .map_err(|e| out_err(format!("cannot write into the folder {}: {e}", folder.display())))?;
    progress.begin("converting", Some(total));
    atomic.reserve(total).map_err(|e| out_err(format!("cannot reserve {total} bytes for it: {e}")))?;

    // While the output is written, a second thread checks the input bytes it uses against
    // the zip's CRC-32s (renamed tensors are copied inside the kernel and never pass through
    // this process, so this is where corruption is caught). The output is committed only
    // if they match.
    let mut used = Vec::new();
    for src in plan.outputs.iter().flat_map(|t| t.origin.sources()) {
        used.push(producer.source(src)?);
    }
    let (result, crc_check) = std::thread::scope(|scope| {
        let checker = scope.spawn(|| ckpt.check_crcs(used.iter().copied()));
        let result = write_outputs(&producer, plan, &dtypes, format, &top, dest, &mut atomic, progress);
        (result, checker.join())
    });
    progress.end();
    match crc_check {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(ConvertError::Input(e)),
        Err(_) => return Err(out_err("the input check failed unexpectedly".into())),
    }
    result?;

    // Re-read what we wrote before it replaces anything: names, order and shapes must be
    // the plan's.
    let reread = Checkpoint::open(&atomic.read_path())
        .map_err(|e| out_err(format!("written file does not read back: {}", e.source)))?;
    let written = match &plan.layout.container {
        Some(c) => reread.tensors_under(c).unwrap_or_default(),
        None => reread.tensors(),
    };
    let others = written.len() != reread.tensors().len();
    if others || meta.as_ref().is_some_and(|(k, v)| reread.root().get(k) != Some(v)) {
        return Err(out_err("written file does not hold the planned layout (tensors outside the state dict, or the kept values changed)".into()));
    }
    // (safetensors orders tensors its own way, so compare as sets of name and shape.)
    let written: std::collections::HashMap<&str, &[usize]> =
        written.iter().map(|w| (w.name.as_str(), w.view.shape.as_slice())).collect();
    let matches = written.len() == plan.outputs.len()
        && plan.outputs.iter().all(|p| written.get(p.target.as_str()) == Some(&p.shape.as_slice()));
    if !matches {
        return Err(out_err("written file does not hold the planned tensors".into()));
    }
    let bytes = atomic.file().metadata().map(|m| m.len()).unwrap_or(0);
    let summary = WriteSummary {
        output: dest.display().to_string(),
        format,
        tensors: plan.outputs.len(),
        bytes,
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok(Written { file: atomic, summary })
}

/// The top-level entries of a nested file, in the source's order of those keys (a key the
/// source lacks goes first, as MMSeg writes `meta` before `state_dict`); empty for a flat one.
fn top_entries<'a>(
    root: &Value,
    layout: &'a crate::mapping::plan::OutputLayout,
    meta: Option<&'a (String, Value)>,
) -> Vec<TopEntry<'a>> {
    let Some(container) = layout.container.as_deref() else { return Vec::new() };
    let mut top = vec![TopEntry::StateDict(container)];
    if let Some((key, value)) = meta {
        let position = |k: &str| match root {
            Value::Dict(items) => items.iter().position(|(x, _)| x.as_str() == Some(k)),
            _ => None,
        };
        let meta_first = match (position(key), position(container)) {
            (Some(m), Some(c)) => m < c,
            _ => true,
        };
        let entry = TopEntry::Plain(key, value);
        if meta_first {
            top.insert(0, entry);
        } else {
            top.push(entry);
        }
    }
    top
}

/// Writes every planned tensor into the (temporary) output file in `format`.
#[allow(clippy::too_many_arguments)]
fn write_outputs(
    producer: &Producer,
    plan: &Plan,
    dtypes: &[DType],
    format: OutputFormat,
    top: &[TopEntry],
    dest: &Path,
    atomic: &mut AtomicFile,
    progress: &dyn Progress,
) -> Result<(), ConvertError> {
    let out_err = |msg: String| ConvertError::Output { path: dest.to_path_buf(), msg };
    let nbytes = |i: usize| (plan.outputs[i].shape.iter().product::<usize>() * dtypes[i].size()) as u64;
    let file: &std::fs::File = atomic.file();
    match format {
        OutputFormat::Pth => {
            let stem = dest.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let to_write: Vec<TensorToWrite> = plan
                .outputs
                .iter()
                .zip(dtypes)
                .map(|(t, &dtype)| TensorToWrite { name: &t.target, dtype, shape: &t.shape })
                .collect();
            let mut failure: Option<ConvertError> = None;
            let res = write_pth_nested(file, &stem, &to_write, top, |i, w| {
                let r = producer.write_to_sink(&plan.outputs[i], w);
                progress.advance(nbytes(i));
                r.map_err(|e| {
                    let msg = e.to_string();
                    failure = Some(e);
                    io::Error::other(msg)
                })
            });
            match (res, failure) {
                (_, Some(e)) => Err(e),
                (Err(e), None) => Err(out_err(e.to_string())),
                (Ok(_), None) => Ok(()),
            }
        }
        OutputFormat::Safetensors => {
            let specs: Vec<(&str, DType, &[usize])> =
                plan.outputs.iter().zip(dtypes).map(|(t, &d)| (t.target.as_str(), d, t.shape.as_slice())).collect();
            let layout = crate::write::safetensors::safetensors_layout(&specs).map_err(out_err)?;
            let mut out = OutFile::new(file, 0);
            out.write_all(&layout.head).map_err(|e| out_err(e.to_string()))?;
            for &i in &layout.order {
                let start = out.position();
                producer.write_to_sink(&plan.outputs[i], &mut out)?;
                if out.position() - start != nbytes(i) {
                    let msg = format!(
                        "tensor {}: produced {} bytes, expected {}",
                        plan.outputs[i].target,
                        out.position() - start,
                        nbytes(i)
                    );
                    return Err(out_err(msg));
                }
                progress.advance(nbytes(i));
            }
            // The file may have been reserved longer than it turned out.
            file.set_len(out.position()).map_err(|e| out_err(e.to_string()))
        }
    }
}
