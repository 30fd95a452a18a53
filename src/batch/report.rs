//! `report.json`: every item's status, settings, input, plan summary, check and report.

use serde::{Deserialize, Serialize};

use crate::job::{self, VerifyRecord};
use crate::DType;

/// Where a run stands with one item.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Converted (and verified, when asked) in this run.
    Converted,
    /// Already done by an earlier run: the output still has the recorded sha256.
    Skipped,
    /// Failed in this run; see `error`.
    Failed,
    /// Not finished yet (only seen in the report of a run that is still going or was killed).
    Pending,
}

impl Status {
    pub fn succeeded(self) -> bool {
        matches!(self, Status::Converted | Status::Skipped)
    }
}

/// What an item was doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Downloading (or finding and hashing a local file), checking the sha256.
    Input,
    /// Opening the checkpoint.
    Read,
    /// Choosing the table and planning.
    Plan,
    /// Writing, re-reading and hashing the output.
    Write,
    /// The forward-pass check.
    Verify,
    /// A bug (a panic), caught so the other items go on.
    Internal,
}

/// The settings an item was converted with; a rerun skips an item only when they are equal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ItemSettings {
    /// The mapping requested (the line's, else the run's); `None` = detected.
    pub mapping: Option<String>,
    /// The sha256 the input had to have.
    pub sha256: Option<String>,
    pub img_size: Option<usize>,
    pub num_heads: Option<usize>,
    #[serde(default)]
    pub init_values: Option<f64>,
    #[serde(default)]
    pub keep_unused: bool,
    #[serde(default)]
    pub dtype: Option<DType>,
    pub verify: bool,
}

/// The input file of an item.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InputRecord {
    /// The local file read (the download cache's copy for a URL).
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
    /// For URLs: true when the cached copy was reused without a request.
    pub from_cache: bool,
    /// Time spent downloading or hashing it.
    pub seconds: f64,
}

/// The plan's counts.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlanSummary {
    pub table: String,
    /// The container the tensors came from (`model`, `state_dict`, `""` = top level).
    pub container: String,
    pub outputs: usize,
    pub dropped: usize,
    pub generated: usize,
    pub img_size: Option<usize>,
    pub notes: Vec<String>,
}

impl PlanSummary {
    pub(super) fn of(p: &job::Planned) -> PlanSummary {
        PlanSummary {
            table: p.table.table().name().to_string(),
            container: p.container.clone(),
            outputs: p.plan.outputs.len(),
            dropped: p.plan.dropped.len(),
            generated: p.plan.generated().count(),
            img_size: p.plan.img_size,
            notes: p.plan.notes.clone(),
        }
    }
}

/// Why an item failed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ItemError {
    pub stage: Stage,
    pub message: String,
}

/// Everything about one item.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ItemReport {
    pub line: usize,
    /// The URL, or the local path.
    pub source: String,
    /// The output's file name inside the output folder.
    pub output: String,
    pub status: Status,
    pub settings: ItemSettings,
    /// This run's time on the item (fetch + conversion + verification; for a skipped item,
    /// the check that it is up to date).
    pub seconds: Option<f64>,
    pub input: Option<InputRecord>,
    /// Set only for a complete output: converted, re-read, hashed and (if asked) verified.
    pub output_sha256: Option<String>,
    pub output_bytes: Option<u64>,
    /// The table used (`builtin:mae`, or a file).
    pub mapping: Option<String>,
    pub plan: Option<PlanSummary>,
    /// The forward-pass check (also when it failed).
    pub verify: Option<VerifyRecord>,
    pub error: Option<ItemError>,
    /// A converted item's whole report: the same document `ckptmap convert --json` prints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<serde_json::Value>,
}

/// Counts of items by status.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Summary {
    pub total: usize,
    pub converted: usize,
    pub skipped: usize,
    pub failed: usize,
    pub pending: usize,
}

/// The run-wide options, as recorded.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    pub jobs: usize,
    pub verify: bool,
    pub img_size: Option<usize>,
    pub num_heads: Option<usize>,
    pub mapping: Option<String>,
}

/// `report.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BatchReport {
    /// `ckptmap <version>`.
    pub tool: String,
    pub list: String,
    pub out_dir: String,
    pub options: RunRecord,
    /// False while the run is going (or when it was killed).
    pub complete: bool,
    pub summary: Summary,
    pub items: Vec<ItemReport>,
}

impl BatchReport {
    /// True when every item was converted or skipped.
    pub fn all_succeeded(&self) -> bool {
        self.items.iter().all(|i| i.status.succeeded())
    }

    pub(super) fn recount(&mut self) {
        let mut s = Summary { total: self.items.len(), ..Summary::default() };
        for i in &self.items {
            match i.status {
                Status::Converted => s.converted += 1,
                Status::Skipped => s.skipped += 1,
                Status::Failed => s.failed += 1,
                Status::Pending => s.pending += 1,
            }
        }
        self.summary = s;
    }
}
