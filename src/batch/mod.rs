//! Many conversions from one list: downloads in parallel, conversions as inputs arrive, each
//! item isolated, one report that a rerun uses to skip what is already done.
//!
//! # The list
//!
//! One item per line: a source (an `http(s)` URL or a path) followed by optional
//! `key=value` fields, separated by whitespace:
//!
//! ```text
//! # comment lines and blank lines are ignored; '#' after whitespace starts a comment too
//! https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth name=mae_b.pth mapping=mae
//! ../ckpts/beit_base_patch16_224_pt22k.pth sha256=<64 hex digits>
//! ```
//!
//! * `name=FILE` — the output's file name inside the output folder (`.pth` or
//!   `.safetensors`; no folders). Default: the source's file stem + `_mmseg.pth`.
//! * `mapping=NAME|FILE.toml` — the mapping table for this item (default: the run's
//!   `mapping`, else detected from the keys).
//! * `sha256=HEX` — the whole input file must have this sha256 (64 hex digits).
//!
//! Relative paths (sources and mapping files) are relative to the list file's folder. A bad
//! line is a [`ListError`] naming the file and line, found before anything is fetched.
//!
//! # A run
//!
//! [`run_batch`] first checks which items are already done: an item is skipped when the
//! previous `report.json` in the output folder records it as done with the same source,
//! output name and settings, and the output file still has the recorded sha256 (for a local
//! source, the input must also still have its recorded sha256). Everything else is (re)done:
//! up to `jobs` worker threads fetch inputs (or hash local files) and hand them through a
//! bounded channel to the calling thread, which converts (and verifies) one item at a time,
//! so memory does not grow with `jobs`. Each item is one [`crate::job::run`], the same
//! conversion `ckptmap convert` runs: its output is nameless until written, re-read, hashed
//! and (with `verify`) verified, then moved into place.
//!
//! `report.json` is rewritten atomically (temporary file + rename) before any work starts
//! (every item to do is `pending`) and after every item finishes, so a killed run leaves a
//! report that claims only outputs that are complete and hashed.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use crate::fetch::{self, FetchOptions};
use crate::job::{self, JobError};
use crate::mapping::plan::PlanOptions;
use crate::progress::{NoProgress, Progress};
use crate::write::atomic::AtomicFile;
use crate::DType;

/// The report's file name inside the output folder.
pub const REPORT_FILE: &str = "report.json";
/// Held (advisory lock) while a batch writes into the output folder.
pub const LOCK_FILE: &str = ".ckptmap-batch.lock";
/// Appended to a source's file stem to name its output when the list gives no `name=`.
pub const DEFAULT_SUFFIX: &str = "_mmseg.pth";

mod list;
mod report;

pub use list::{default_output_name, parse_list, ListError, ListItem, Source};
pub use report::{
    BatchReport, InputRecord, ItemError, ItemReport, ItemSettings, PlanSummary, RunRecord, Stage, Status, Summary,
};

/// How to run a batch.
#[derive(Clone, Debug)]
pub struct BatchOptions {
    pub out_dir: PathBuf,
    /// Inputs fetched at once (at least 1).
    pub jobs: usize,
    /// Check each output against its original with the forward pass.
    pub verify: bool,
    /// How each item is planned (load-ready size, heads, init values, keep_unused): the
    /// options `convert` takes.
    pub plan: PlanOptions,
    /// Cast floating-point tensors to this dtype.
    pub dtype: Option<DType>,
    /// The mapping for lines without `mapping=`; `None` = detect.
    pub mapping: Option<String>,
    /// Download settings (cache folder, retries, timeouts); `sha256` is set per item.
    pub fetch: FetchOptions,
}

/// Where the library reports a run's progress; the CLI decides what to draw.
pub trait BatchEvents: Sync {
    /// A progress sink for one stage of one item (`Input` from worker threads, `Write` and
    /// `Verify` from the converting thread).
    fn progress(&self, _item: &ListItem, _stage: Stage) -> Box<dyn Progress + '_> {
        Box::new(NoProgress)
    }
    /// An item reached its state for this run (converted, skipped or failed).
    fn finished(&self, _item: &ItemReport) {}
}

/// Reports nothing.
pub struct NoEvents;
impl BatchEvents for NoEvents {}

/// A failure of the run as a whole (an item's failure is in its [`ItemReport`] instead).
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("{}: cannot read the list: {source}", path.display())]
    ReadList { path: PathBuf, source: io::Error },
    #[error(transparent)]
    List(#[from] ListError),
    #[error("invalid option: {0}")]
    Options(String),
    #[error("{}: {source}", path.display())]
    OutDir { path: PathBuf, source: io::Error },
    #[error("{}: another `ckptmap batch` is writing into this folder", path.display())]
    Busy { path: PathBuf },
    #[error("{}: cannot write the report: {source}", path.display())]
    Report { path: PathBuf, source: io::Error },
}

/// Reads and parses a list file.
pub fn read_list(path: &Path) -> Result<Vec<ListItem>, BatchError> {
    let text = fs::read_to_string(path).map_err(|source| BatchError::ReadList { path: path.to_path_buf(), source })?;
    Ok(parse_list(&text, path)?)
}

/// Runs the batch; see the module docs. Returns the final report (also in
/// `<out_dir>/report.json`); an `Err` means the run itself could not go on.
pub fn run_batch(
    list: &Path,
    items: &[ListItem],
    opts: &BatchOptions,
    events: &dyn BatchEvents,
) -> Result<BatchReport, BatchError> {
    if opts.jobs == 0 {
        return Err(BatchError::Options("jobs must be at least 1".into()));
    }
    let out_dir = &opts.out_dir;
    let dir_err = |path: &Path, source: io::Error| BatchError::OutDir { path: path.to_path_buf(), source };
    fs::create_dir_all(out_dir).map_err(|e| dir_err(out_dir, e))?;
    let lock_path = out_dir.join(LOCK_FILE);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| dir_err(&lock_path, e))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => return Err(BatchError::Busy { path: out_dir.clone() }),
        Err(fs::TryLockError::Error(e)) => return Err(dir_err(&lock_path, e)),
    }
    // Leftovers of a run that was killed (we hold the lock, so no run is using them): the
    // staging folder of versions before 0.1 and named temporaries of the report.
    let _ = fs::remove_dir_all(out_dir.join(".ckptmap-staging"));
    if let Ok(entries) = fs::read_dir(out_dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!(".{REPORT_FILE}.")) && name.ends_with(".tmp") {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    let report_path = out_dir.join(REPORT_FILE);
    let previous = read_previous(&report_path);

    let mut report = BatchReport {
        tool: concat!("ckptmap ", env!("CARGO_PKG_VERSION")).to_string(),
        list: list.display().to_string(),
        out_dir: out_dir.display().to_string(),
        options: RunRecord {
            jobs: opts.jobs,
            verify: opts.verify,
            img_size: opts.plan.img_size,
            num_heads: opts.plan.num_heads,
            mapping: opts.mapping.clone(),
        },
        complete: false,
        summary: Summary::default(),
        items: items.iter().map(|it| pending_report(it, opts)).collect(),
    };

    // What is already done (outputs hashed in parallel).
    let skipped = parallel_map(items, opts.jobs, |item| up_to_date(item, opts, previous.as_ref()));
    for (slot, done) in report.items.iter_mut().zip(skipped) {
        if let Some(done) = done {
            *slot = done;
            events.finished(slot);
        }
    }
    save(&mut report, &report_path)?;

    let todo: Vec<usize> = (0..items.len()).filter(|&i| report.items[i].status == Status::Pending).collect();
    if !todo.is_empty() {
        let mut fatal: Option<BatchError> = None;
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            // Capacity `jobs`: what waits in the channel is a path, not data; conversions
            // happen one at a time on this thread.
            let (tx, rx) = sync_channel::<(usize, Result<InputRecord, ItemError>)>(opts.jobs);
            for _ in 0..opts.jobs.min(todo.len()) {
                let tx = tx.clone();
                let (next, stop, todo) = (&next, &stop, &todo);
                scope.spawn(move || loop {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let k = next.fetch_add(1, Ordering::SeqCst);
                    let Some(&i) = todo.get(k) else { break };
                    let item = &items[i];
                    let got = guarded(Stage::Input, || acquire(item, opts, events)).and_then(|r| r);
                    if tx.send((i, got)).is_err() {
                        break;
                    }
                });
            }
            drop(tx);
            for (i, got) in rx {
                if fatal.is_some() {
                    continue; // nothing more can be recorded; let the workers wind down
                }
                let item = &items[i];
                let mut done = report.items[i].clone();
                match got {
                    Ok(input) => {
                        let start = Instant::now();
                        let result = guarded(Stage::Internal, || convert_item(item, &input, opts, events, &mut done))
                            .and_then(|r| r);
                        done.seconds = Some(input.seconds + start.elapsed().as_secs_f64());
                        done.input = Some(input);
                        match result {
                            Ok(()) => done.status = Status::Converted,
                            Err(e) => fail(&mut done, e),
                        }
                    }
                    Err(e) => fail(&mut done, e),
                }
                report.items[i] = done;
                events.finished(&report.items[i]);
                if let Err(e) = save(&mut report, &report_path) {
                    // Without a report no result can be recorded: start nothing new.
                    fatal = Some(e);
                    stop.store(true, Ordering::SeqCst);
                }
            }
        });
        if let Some(e) = fatal {
            return Err(e);
        }
    }
    report.complete = true;
    save(&mut report, &report_path)?;
    drop(lock);
    Ok(report)
}

fn fail(done: &mut ItemReport, e: ItemError) {
    done.status = Status::Failed;
    done.output_sha256 = None;
    done.output_bytes = None;
    done.error = Some(e);
}

fn settings(item: &ListItem, opts: &BatchOptions) -> ItemSettings {
    ItemSettings {
        mapping: item.mapping.clone().or_else(|| opts.mapping.clone()),
        sha256: item.sha256.clone(),
        img_size: opts.plan.img_size,
        num_heads: opts.plan.num_heads,
        init_values: opts.plan.init_values,
        keep_unused: opts.plan.keep_unused,
        dtype: opts.dtype,
        verify: opts.verify,
    }
}

fn pending_report(item: &ListItem, opts: &BatchOptions) -> ItemReport {
    ItemReport {
        line: item.line,
        source: item.source.text(),
        output: item.output.clone(),
        status: Status::Pending,
        settings: settings(item, opts),
        seconds: None,
        input: None,
        output_sha256: None,
        output_bytes: None,
        mapping: None,
        plan: None,
        verify: None,
        error: None,
        report: None,
    }
}

/// The previous report, if there is a readable one (an unreadable one is ignored: then
/// everything is done again).
fn read_previous(path: &Path) -> Option<BatchReport> {
    let text = fs::read(path).ok()?;
    serde_json::from_slice(&text).ok()
}

/// The previous run's record of `item` as a `Skipped` report, when it is still true.
fn up_to_date(item: &ListItem, opts: &BatchOptions, previous: Option<&BatchReport>) -> Option<ItemReport> {
    let start = Instant::now();
    let prev = previous?.items.iter().find(|p| p.output == item.output)?;
    let wanted = settings(item, opts);
    if !prev.status.succeeded() || prev.source != item.source.text() || prev.settings != wanted {
        return None;
    }
    let recorded = prev.output_sha256.as_deref()?;
    let out = opts.out_dir.join(&item.output);
    if !out.is_file() || fetch::sha256_file(&out, &NoProgress).ok()? != recorded {
        return None;
    }
    if let Source::Path(p) = &item.source {
        let input = prev.input.as_ref()?;
        if fetch::sha256_file(p, &NoProgress).ok()? != input.sha256 {
            return None;
        }
    }
    let mut done = prev.clone();
    done.line = item.line;
    done.status = Status::Skipped;
    done.error = None;
    done.seconds = Some(start.elapsed().as_secs_f64());
    Some(done)
}

fn save(report: &mut BatchReport, path: &Path) -> Result<(), BatchError> {
    report.recount();
    let err = |source: io::Error| BatchError::Report { path: path.to_path_buf(), source };
    let mut text = serde_json::to_vec_pretty(report).map_err(|e| err(io::Error::other(e)))?;
    text.push(b'\n');
    let mut file = AtomicFile::create(path).map_err(err)?;
    file.file().write_all(&text).map_err(err)?;
    file.commit().map_err(err)
}

/// Runs `f`, turning a panic into an item error so one bad item cannot stop the run.
fn guarded<T>(stage: Stage, f: impl FnOnce() -> T) -> Result<T, ItemError> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        ItemError { stage, message: format!("internal error (please report it): {what}") }
    })
}

/// `f` over `items` on up to `jobs` threads, results in order.
fn parallel_map<T: Sync, R: Send>(items: &[T], jobs: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let mut out: Vec<(usize, R)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..jobs.min(items.len()))
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let Some(item) = items.get(i) else { break };
                        mine.push((i, f(item)));
                    }
                    mine
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
    });
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, r)| r).collect()
}

/// Fetches a URL (through the cache) or finds and hashes a local file; checks the sha256.
fn acquire(item: &ListItem, opts: &BatchOptions, events: &dyn BatchEvents) -> Result<InputRecord, ItemError> {
    let start = Instant::now();
    let err = |message: String| ItemError { stage: Stage::Input, message };
    let progress = events.progress(item, Stage::Input);
    let record = match &item.source {
        Source::Url(url) => {
            let mut fopts = opts.fetch.clone();
            fopts.sha256 = item.sha256.clone();
            let got = fetch::fetch(url, &fopts, &*progress).map_err(|e| err(e.to_string()))?;
            InputRecord {
                path: got.path.display().to_string(),
                sha256: got.sha256,
                bytes: got.bytes,
                from_cache: got.from_cache,
                seconds: 0.0,
            }
        }
        Source::Path(path) => {
            let meta = fs::metadata(path).map_err(|e| err(format!("{}: {e}", path.display())))?;
            if !meta.is_file() {
                return Err(err(format!("{}: not a file", path.display())));
            }
            let sha256 = fetch::sha256_file(path, &*progress).map_err(|e| err(format!("{}: {e}", path.display())))?;
            if let Some(expected) = &item.sha256 {
                if &sha256 != expected {
                    return Err(err(format!(
                        "sha256 mismatch for {}: expected {expected} (given sha256) got {sha256}",
                        path.display()
                    )));
                }
            }
            InputRecord { path: path.display().to_string(), sha256, bytes: meta.len(), from_cache: false, seconds: 0.0 }
        }
    };
    Ok(InputRecord { seconds: start.elapsed().as_secs_f64(), ..record })
}

/// Converts one acquired input into `<out_dir>/<output>` through [`job::run`] (the same
/// conversion, check and commit as `ckptmap convert`), filling `done` as it goes. The output
/// appears only when it is complete, hashed and (if asked) verified.
fn convert_item(
    item: &ListItem,
    input: &InputRecord,
    opts: &BatchOptions,
    events: &dyn BatchEvents,
    done: &mut ItemReport,
) -> Result<(), ItemError> {
    let req = job::Request {
        source: item.source.text(),
        input: PathBuf::from(&input.path),
        output: opts.out_dir.join(&item.output),
        mapping: done.settings.mapping.clone(),
        plan: opts.plan.clone(),
        dtype: opts.dtype,
        verify: opts.verify,
        hashes: true,
        input_sha256: Some(input.sha256.clone()),
    };
    let stage_of = |e: &JobError| match e {
        JobError::Read(_) => Stage::Read,
        JobError::Plan(_) => Stage::Plan,
        JobError::Write(_) | JobError::Hash { .. } => Stage::Write,
        JobError::Verify(_) | JobError::CheckFailed { .. } => Stage::Verify,
    };
    let at = |e: JobError| ItemError { stage: stage_of(&e), message: e.to_string() };
    let planned = job::plan(&req).map_err(at)?;
    done.mapping = Some(planned.table.table().origin().to_string());
    done.plan = Some(PlanSummary::of(&planned));
    let write = events.progress(item, Stage::Write);
    let verify = events.progress(item, Stage::Verify);
    let result = job::run_planned(&req, &planned, &*write, &*verify);
    drop((write, verify));
    match result {
        Ok(report) => {
            done.verify = report.verify.clone();
            done.output_sha256 = report.output_sha256.clone();
            done.output_bytes = Some(report.output.bytes);
            done.report = serde_json::to_value(&report).ok();
            Ok(())
        }
        Err(JobError::CheckFailed { record, .. }) => {
            let message = format!(
                "the converted weights do not compute what the original computes (max rel {}, min cosine {})",
                record.max_rel.map(|x| format!("{x:.3e}")).unwrap_or_else(|| "-".into()),
                record.min_cosine.map(|x| format!("{x:.9}")).unwrap_or_else(|| "-".into()),
            );
            done.verify = Some(*record);
            Err(ItemError { stage: Stage::Verify, message })
        }
        Err(e) => Err(at(e)),
    }
}
