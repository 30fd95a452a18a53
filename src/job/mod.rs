//! One conversion, start to finish, written once: open the source → choose the table → plan
//! → write the output without a name → check it with the forward pass (one rule for what is
//! checked) → move it into place. `ckptmap convert` and every `batch` item call [`run`], and
//! both report the same [`Report`].

use std::path::{Path, PathBuf};

use serde::Serialize;

mod prepare;

pub use prepare::{choose_table, prepare, table_root, PrepareError, TableChoice};

use crate::fetch::sha256_file;
use crate::formats::checkpoint::{Checkpoint, CheckpointError, TensorEntry};
use crate::mapping::plan::{Origin, Plan, PlanOptions};
use crate::progress::{NoProgress, Progress};
use crate::verify::{verify_against_original, Tolerance, VerifyError, VerifyOptions, VerifyOutcome};
use crate::write::execute::{write_plan_uncommitted, ConvertError, WriteSummary};
use crate::DType;

/// What one conversion is asked to do.
#[derive(Clone, Debug)]
pub struct Request {
    /// The source as the user named it (a path or a URL), for the report.
    pub source: String,
    /// The local file to read (for a URL, the download cache's copy).
    pub input: PathBuf,
    pub output: PathBuf,
    /// A built-in table's name or a TOML file; `None` detects the table.
    pub mapping: Option<String>,
    pub plan: PlanOptions,
    /// Cast floating-point tensors to this dtype.
    pub dtype: Option<DType>,
    /// Run the forward-pass check before the output is moved into place.
    pub verify: bool,
    /// Put both files' sha256 in the report (the input's may be given when already known).
    pub hashes: bool,
    pub input_sha256: Option<String>,
}

/// Everything about a finished conversion: what was read, the plan, what was written and
/// what was checked. `convert --json` prints it; batch items carry it.
#[derive(Debug, Serialize)]
pub struct Report {
    pub input: String,
    pub input_file: String,
    pub input_sha256: Option<String>,
    /// `recorded`, `absent` (a zip saved with CRC computation off: nothing could be checked)
    /// or `none` (legacy and safetensors files carry no checksums).
    pub input_crc32: &'static str,
    /// The container the tensors came from (`model`, `state_dict`, `""` = top level).
    pub container: String,
    /// The table, by origin: `builtin:mae` or a file path.
    pub mapping: String,
    pub output: WriteSummary,
    pub output_sha256: Option<String>,
    pub verify: Option<VerifyRecord>,
    pub plan: Plan,
}

/// The forward-pass check of one conversion.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct VerifyRecord {
    /// What ran against the original: `output`, or `clean conversion` when the output is
    /// resized to an img_size the original does not run at (the same table applied to the
    /// same checkpoint without resizing).
    pub subject: String,
    pub passed: bool,
    /// The largest max |ours - original| / max |original| over the outputs compared.
    pub max_rel: Option<f64>,
    /// The smallest cosine similarity over the outputs compared.
    pub min_cosine: Option<f64>,
    /// What the check did not cover (the resize of a resized output).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub not_checked: Option<String>,
    /// The whole outcome: per-output figures, tolerance, configuration.
    pub outcome: serde_json::Value,
}

impl VerifyRecord {
    fn new(outcome: &VerifyOutcome, subject: &str, not_checked: Option<String>) -> VerifyRecord {
        let max_rel = outcome
            .outputs
            .iter()
            .filter_map(|o| o.max_rel)
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
        let min_cosine = outcome
            .outputs
            .iter()
            .filter_map(|o| o.cosine)
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.min(x))));
        VerifyRecord {
            subject: subject.to_string(),
            passed: outcome.passed,
            max_rel,
            min_cosine,
            not_checked,
            outcome: serde_json::to_value(outcome).unwrap_or(serde_json::Value::Null),
        }
    }

    /// The outcome back as its type (for rendering).
    pub fn outcome(&self) -> Option<VerifyOutcome> {
        serde_json::from_value(self.outcome.clone()).ok()
    }
}

/// Where a conversion stopped.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Read(#[from] CheckpointError),
    #[error(transparent)]
    Plan(#[from] PrepareError),
    #[error(transparent)]
    Write(#[from] ConvertError),
    #[error("{path}: {source}")]
    Hash { path: PathBuf, source: std::io::Error },
    #[error("the forward-pass check could not run: {0}")]
    Verify(#[from] VerifyError),
    /// The converted weights do not compute what the original computes: nothing was
    /// moved into place.
    #[error("{output}: not written: the converted weights fail the forward-pass check (max rel {max_rel}, min cosine {min_cosine})", max_rel = fmt_opt(record.max_rel), min_cosine = fmt_opt(record.min_cosine))]
    CheckFailed { output: PathBuf, record: Box<VerifyRecord> },
}

fn fmt_opt(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.3e}")).unwrap_or_else(|| "-".into())
}

/// An opened and planned conversion: what `--dry-run` shows, and what [`run`] writes.
pub struct Planned {
    pub ckpt: Checkpoint,
    pub table: TableChoice,
    pub container: String,
    pub plan: Plan,
}

impl Planned {
    /// Bytes the plan reads from the source.
    pub fn source_bytes(&self) -> u64 {
        self.entries().iter().map(|t| t.view.nbytes() as u64).sum()
    }

    fn entries(&self) -> Vec<TensorEntry<'_>> {
        self.ckpt.tensors_under(&self.container).unwrap_or_default()
    }
}

/// Opens the source, chooses the table and plans; writes nothing.
pub fn plan(req: &Request) -> Result<Planned, JobError> {
    let ckpt = Checkpoint::open(&req.input)?;
    let table = choose_table(req.mapping.as_deref(), &ckpt)?;
    let (container, _, plan) = prepare(&ckpt, table.table(), &req.plan)?;
    Ok(Planned { ckpt, table, container, plan })
}

/// Runs the whole conversion. `write` sees the output being written; `verify` the check.
/// Nothing appears at the output unless it is complete, re-read and, when asked, passed
/// the check.
pub fn run(req: &Request, write: &dyn Progress, verify: &dyn Progress) -> Result<Report, JobError> {
    let planned = plan(req)?;
    run_planned(req, &planned, write, verify)
}

/// [`run`] on an already planned conversion.
pub fn run_planned(
    req: &Request,
    planned: &Planned,
    write: &dyn Progress,
    verify: &dyn Progress,
) -> Result<Report, JobError> {
    let Planned { ckpt, table, container, plan } = planned;
    if req.verify && !plan.layout.is_flat() {
        let msg = format!(
            "--verify runs the MMSeg backbone's forward pass on a backbone file; mapping table {} rewrites the whole file, every tensor a byte-for-byte copy (the input CRC-checked, the output re-read before it is moved into place); to check the backbone, extract it: ckptmap convert {} backbone.pth --verify",
            plan.table,
            req.source
        );
        return Err(JobError::Plan(PrepareError::BadOption { file: req.input.clone(), msg }));
    }
    let sources = planned.entries();
    let written = write_plan_uncommitted(ckpt, &sources, plan, &req.output, req.dtype, write)?;
    let record = if req.verify {
        verify.begin("verifying", None);
        let r = check(ckpt, table, plan, &req.plan, &written.read_path(), &req.output);
        verify.end();
        Some(r?)
    } else {
        None
    };
    if let Some(r) = record.as_ref().filter(|r| !r.passed) {
        return Err(JobError::CheckFailed { output: req.output.clone(), record: Box::new(r.clone()) });
    }
    let output = written.commit()?;
    let (input_sha256, output_sha256) = if req.hashes {
        let hash =
            |p: &Path| sha256_file(p, &NoProgress).map_err(|source| JobError::Hash { path: p.to_path_buf(), source });
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| match &req.input_sha256 {
                Some(h) => Ok(h.clone()),
                None => hash(&req.input),
            });
            let b = s.spawn(|| hash(&req.output));
            (a.join().expect("hash thread"), b.join().expect("hash thread"))
        });
        (Some(a?), Some(b?))
    } else {
        (req.input_sha256.clone(), None)
    };
    Ok(Report {
        input: req.source.clone(),
        input_file: req.input.display().to_string(),
        input_sha256,
        input_crc32: ckpt.crc32_status(),
        container: container.clone(),
        mapping: table.table().origin().to_string(),
        output,
        output_sha256,
        verify: record,
        plan: plan.clone(),
    })
}

/// True when the plan resizes something (pos_embed, relative-position tables).
pub fn resizes(plan: &Plan) -> bool {
    plan.outputs.iter().any(|t| matches!(t.origin, Origin::ResizeAbsPosEmbed { .. } | Origin::ResizeRelPosTable { .. }))
}

/// The one rule for what the forward pass checks. An output at its source's size runs next
/// to the original. A resized output cannot (the original runs at its native size only), so
/// the same table applied to the same checkpoint without resizing is written (nameless, never
/// moved into place) and checked instead; the record says the resize was not checked.
fn check(
    ckpt: &Checkpoint,
    table: &TableChoice,
    plan: &Plan,
    plan_opts: &PlanOptions,
    written: &Path,
    output: &Path,
) -> Result<VerifyRecord, JobError> {
    let opts = VerifyOptions {
        img_size: None,
        num_heads: plan_opts.num_heads,
        out_indices: None,
        tolerance: Tolerance::default(),
        init_values: plan_opts.init_values.unwrap_or(1.0),
    };
    let device = candle_core::Device::Cpu;
    if !resizes(plan) {
        let out = Checkpoint::open(written)?;
        let outcome = verify_against_original(&out, ckpt, &opts, &device)?;
        return Ok(VerifyRecord::new(&outcome, "output", None));
    }
    let clean_opts = PlanOptions { img_size: None, keep_unused: false, ..plan_opts.clone() };
    let (_, sources, clean_plan) = prepare(ckpt, table.table(), &clean_opts)?;
    let clean = write_plan_uncommitted(
        ckpt,
        &sources,
        &clean_plan,
        &output.with_extension("unresized.pth"),
        None,
        &NoProgress,
    )?;
    let conv = Checkpoint::open(&clean.read_path())?;
    let outcome = verify_against_original(&conv, ckpt, &opts, &device)?;
    let n = plan.img_size.unwrap_or_default();
    let not_checked = format!(
        "the output is resized to img_size {n}: the forward pass ran on the same mapping without resizing, which checks every tensor's mapping; the resize to img_size {n} (pos_embed / relative position tables) was not checked by the forward pass (the resizes themselves are tested against PyTorch/SciPy numbers in the test suite)"
    );
    Ok(VerifyRecord::new(&outcome, "clean conversion", Some(not_checked)))
}
