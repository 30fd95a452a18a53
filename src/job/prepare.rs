//! The first steps of a conversion: choosing the mapping table (by name, by file, or by
//! detection from the checkpoint's keys), checking the options against the checkpoint, and
//! planning.

use std::io;
use std::path::{Path, PathBuf};

use crate::formats::checkpoint::{Checkpoint, TensorEntry};
use crate::formats::Value;
use crate::mapping::plan::{plan, Plan, PlanOptions, SourceTensor};
use crate::mapping::table::{self, MappingTable};

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

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("{path}: cannot read mapping table: {source}")]
    TableFile { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Table(Box<crate::mapping::table::TableError>),
    #[error("{file}: {source}")]
    Detect { file: PathBuf, source: Box<crate::mapping::table::TableError> },
    #[error("{file}: mapping table {table}: {source}")]
    Plan { file: PathBuf, table: String, source: Box<crate::mapping::plan::PlanError> },
    #[error("{}: already in the MMSeg layout (it has keys like {example}): it needs no conversion; MMSeg loads it as it is, and `ckptmap verify` checks it", file.display())]
    AlreadyConverted { file: PathBuf, example: String },
    #[error("{}: {msg}", file.display())]
    BadOption { file: PathBuf, msg: String },
    #[error("{file}: the checkpoint holds no tensors: nothing to convert")]
    NoTensors { file: PathBuf },
    #[error("{file}: none of the containers {containers:?} that mapping table {table} unwraps holds tensors")]
    NoContainer { file: PathBuf, table: String, containers: Vec<String> },
}

impl From<crate::mapping::table::TableError> for PrepareError {
    fn from(e: crate::mapping::table::TableError) -> Self {
        PrepareError::Table(Box::new(e))
    }
}

/// `spec` is a built-in table name or a path to a TOML file; `None` detects the table from
/// the checkpoint's key names.
pub fn choose_table(spec: Option<&str>, ckpt: &Checkpoint) -> Result<TableChoice, PrepareError> {
    if ckpt.tensors().is_empty() {
        return Err(PrepareError::NoTensors { file: ckpt.path().to_path_buf() });
    }
    match spec {
        Some(s) if s.ends_with(".toml") || Path::new(s).is_file() => {
            let text =
                std::fs::read_to_string(s).map_err(|source| PrepareError::TableFile { path: s.into(), source })?;
            Ok(TableChoice::User(Box::new(MappingTable::parse(&text, s)?)))
        }
        Some(name) => Ok(TableChoice::Builtin(MappingTable::builtin(name)?)),
        None => {
            let root = crate::inspect::find_state_dict(ckpt).unwrap_or("");
            let names: Vec<String> = ckpt.tensors_under(root).unwrap_or_default().into_iter().map(|t| t.name).collect();
            table::detect(&names).map(TableChoice::Builtin).map_err(|source| {
                let file = ckpt.path().to_path_buf();
                match mmseg_layout_key(&names) {
                    Some(example) => PrepareError::AlreadyConverted { file, example },
                    None => PrepareError::Detect { file, source: Box::new(source) },
                }
            })
        }
    }
}

/// A key only MMSeg's MAE / BEiT backbone layout has (our output, or beit2mmseg's), if the
/// names have one.
fn mmseg_layout_key(names: &[String]) -> Option<String> {
    let strip = |n: &str| n.strip_prefix("module.").unwrap_or(n).strip_prefix("backbone.").unwrap_or(n).to_string();
    let stripped: Vec<String> = names.iter().map(|n| strip(n)).collect();
    let layer = stripped
        .iter()
        .find(|n| n.starts_with("layers.") && (n.ends_with(".ln1.weight") || n.contains(".ffn.layers.")));
    layer.or_else(|| stripped.iter().find(|n| *n == "patch_embed.projection.weight")).cloned()
}

/// Checks `--img-size` and `--num-heads` against the checkpoint's patch size, width and
/// relative-position tables, so a bad value is answered in the option's terms (what was
/// passed, what is wrong, what would work) rather than by the table expression it breaks.
fn check_options(sources: &[SourceTensor], opts: &PlanOptions) -> Result<(), String> {
    let find = |suffix: &str| sources.iter().find(|t| t.name == suffix || t.name.ends_with(&format!(".{suffix}")));
    // The patch-embedding conv under its unilm/timm, MMSeg/mmpretrain or HF name.
    let proj =
        ["patch_embed.proj.weight", "patch_embed.projection.weight", "embeddings.patch_embeddings.projection.weight"]
            .into_iter()
            .find_map(|k| find(k).filter(|t| t.shape.len() == 4));
    if let Some(n) = opts.img_size {
        let patch = proj.map(|t| t.shape[2]).unwrap_or(16);
        let fits = n > 0 && n % patch == 0;
        if !fits {
            let below = n / patch * patch;
            let above = below + patch;
            let suggest = match below {
                0 => format!("the smallest that works is {above}"),
                _ => format!("the nearest that work are {below} and {above}"),
            };
            return Err(format!(
                "--img-size {n}: must be a multiple of the checkpoint's patch size {patch} (the image is cut into {patch}x{patch} patches); {suggest} (MMSeg's configs use 512 or 640)"
            ));
        }
    }
    if let (Some(h), Some(dim)) = (opts.num_heads, proj.map(|t| t.shape[0])) {
        let table_heads = find("relative_position_bias_table").filter(|t| t.shape.len() == 2).map(|t| t.shape[1]);
        if let Some(th) = table_heads.filter(|&th| th != h) {
            return Err(format!("--num-heads {h}: the checkpoint's relative position tables have {th} heads; pass --num-heads {th} or leave it out"));
        }
        if h == 0 || dim % h != 0 {
            let divisors: Vec<String> = (1..=dim).filter(|d| dim % d == 0).take(16).map(|d| d.to_string()).collect();
            return Err(format!(
                "--num-heads {h}: the checkpoint's width {dim} must split evenly into the heads; numbers that divide it: {} (the official models use 64 channels per head, e.g. 12 heads at width 768)",
                divisors.join(", ")
            ));
        }
    }
    Ok(())
}

/// The container a table unwraps in this checkpoint: the first of its list that holds tensors.
pub fn table_root<'t>(table: &'t MappingTable, ckpt: &Checkpoint) -> Option<&'t str> {
    table.containers().iter().map(String::as_str).find(|c| ckpt.tensors_under(c).is_some_and(|t| !t.is_empty()))
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
    check_options(&sources, opts).map_err(|msg| PrepareError::BadOption { file: ckpt.path().to_path_buf(), msg })?;
    let mut plan = plan(table, &sources, opts).map_err(|source| PrepareError::Plan {
        file: ckpt.path().to_path_buf(),
        // A user's table by its path; a built-in one as `builtin:NAME`.
        table: table.origin().to_string(),
        source: Box::new(source),
    })?;
    describe_layout(ckpt, root, &mut plan);
    Ok((root.to_string(), entries, plan))
}

/// For a table that writes a nested file (`output_container`, `keep_meta`): what of the
/// source's kept values is left out, and which of its top-level keys the file does not carry,
/// into the plan's layout and notes.
fn describe_layout(ckpt: &Checkpoint, root: &str, plan: &mut Plan) {
    if plan.layout.is_flat() {
        return;
    }
    let mut notes = Vec::new();
    if let Some(key) = plan.layout.meta.clone() {
        match ckpt.root().get(&key) {
            None => notes.push(format!("the source has no '{key}': an empty dict is written as '{key}'")),
            Some(v) => {
                let (_, dropped) = crate::write::meta::output_meta(ckpt.root(), &key);
                if dropped.is_empty() {
                    notes.push(format!("'{key}' ({}) is written whole: it holds only plain values", v.summary()));
                } else {
                    let list: Vec<String> = dropped.iter().map(|d| format!("{} ({})", d.path, d.what)).collect();
                    notes.push(format!(
                        "'{key}' is written with plain values only (str, int, float, bool, None, lists/tuples/dicts of them), so torch.load(weights_only=True) reads it; left out: {}",
                        list.join("; ")
                    ));
                }
                plan.layout.meta_dropped = dropped;
            }
        }
    }
    if !root.is_empty() {
        if let Value::Dict(items) = ckpt.root() {
            let carried = [Some(root), plan.layout.meta.as_deref()];
            plan.layout.not_carried = items
                .iter()
                .map(|(k, _)| k.as_str().map(str::to_string).unwrap_or_else(|| k.summary()))
                .filter(|k| !carried.contains(&Some(k.as_str())))
                .collect();
        }
    }
    if !plan.layout.not_carried.is_empty() {
        notes.push(format!(
            "not carried into the output: {} (training state: logs, schedulers, optimizer; MMSeg's init_model reads only meta and state_dict)",
            plan.layout.not_carried.join(", ")
        ));
    }
    if plan.layout.container.is_some() {
        notes.push("an _metadata attribute of the source state dict (per-module versions, not a key) is not carried; load_state_dict loads without it".into());
    }
    plan.notes.extend(notes);
}
