//! Runs a parsed command: calls the library, renders its result, picks the exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};

use super::args::*;
use super::bars::*;
use super::render::*;
use ckptmap::formats::checkpoint::Checkpoint;
use ckptmap::inspect;

impl DownloadArgs {
    /// The download settings these flags give.
    pub(crate) fn fetch_options(&self) -> ckptmap::fetch::FetchOptions {
        ckptmap::fetch::FetchOptions {
            cache_dir: self.cache_dir.clone(),
            sha256: self.sha256.clone(),
            retries: self.retries,
            read_timeout: std::time::Duration::from_secs(self.timeout),
            ..Default::default()
        }
    }

    /// A local path as is; an http(s) URL downloaded into the cache first.
    pub(crate) fn resolve(&self, source: &str) -> Result<PathBuf> {
        if !ckptmap::fetch::is_url(source) {
            return Ok(PathBuf::from(source));
        }
        let opts = self.fetch_options();
        let bar = Bar::new(!self.quiet);
        let fetched = ckptmap::fetch::fetch(source, &opts, &bar)?;
        Ok(fetched.path)
    }
}

/// Points stdout at /dev/null (for -q), so no summary, note or table reaches the terminal.
pub(crate) fn silence_stdout() {
    use std::os::fd::AsRawFd;
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 on two valid descriptors, before anything is printed.
        unsafe {
            libc::dup2(null.as_raw_fd(), 1);
        }
    }
}

pub(crate) fn run(command: Command, quiet: bool) -> Result<ExitCode> {
    match command {
        Command::Verify { converted, reference, against, check, json, mut download } => {
            download.quiet = quiet;
            let device = ckptmap::verify::device(&check.device)?;
            let conv = Checkpoint::open(&converted)?;
            let opts = check.options();
            let orig = match (&reference, &against) {
                (None, None) => anyhow::bail!(
                    "verify needs something to compare {} with: --reference REF.safetensors (outputs PyTorch computed; fixtures/make_reference.py makes one) or --against ORIGINAL (the checkpoint it was converted from)",
                    converted.display()
                ),
                (None, Some(a)) => Some(Checkpoint::open(&download.resolve(a)?)?),
                (Some(_), _) => None,
            };
            let spin = spinner(!json && !quiet, "running the forward passes");
            let outcome = match (reference, orig) {
                (Some(r), _) => ckptmap::verify::verify_with_reference(&conv, &r, &opts, &device),
                (None, Some(orig)) => ckptmap::verify::verify_against_original(&conv, &orig, &opts, &device),
                (None, None) => unreachable!("checked above"),
            };
            if let Some(b) = spin {
                b.finish_and_clear();
            }
            let outcome = outcome?;
            if json {
                println!("{}", serde_json::to_string_pretty(&outcome)?);
            } else {
                print_outcome(&outcome);
            }
            Ok(if outcome.passed { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Convert { src: source, dst, conversion: c, dry_run, json, mut download } => {
            download.quiet = quiet;
            let dtype = c.dtype;
            let req = ckptmap::job::Request {
                input: download.resolve(&source)?,
                source,
                output: dst,
                mapping: c.mapping.clone(),
                plan: c.plan_options(),
                dtype,
                verify: c.verify,
                hashes: json,
                input_sha256: None,
            };
            let planned = ckptmap::job::plan(&req)?;
            let table = planned.table.table();
            if dry_run {
                if json {
                    let doc = serde_json::json!({ "input": req.source, "container": planned.container, "mapping": table.origin(), "plan": planned.plan });
                    println!("{}", serde_json::to_string_pretty(&doc)?);
                } else {
                    print_plan(&planned.plan, table.origin(), &planned.container, dtype);
                }
                return Ok(ExitCode::SUCCESS);
            }
            // Large files get a progress bar on a terminal (unless --json).
            let bar = Bar::new(!json && !download.quiet && planned.source_bytes() > 64 << 20);
            let report = match ckptmap::job::run_planned(
                &req,
                &planned,
                &bar,
                &Spinner::new(!json && !quiet, "checking the output with the forward pass"),
            ) {
                Err(ckptmap::job::JobError::CheckFailed { output, record }) => {
                    // The check failed: nothing was moved into place.
                    if json {
                        let doc = serde_json::json!({ "input": req.source, "output": null, "written": false, "verify": record });
                        println!("{}", serde_json::to_string_pretty(&doc)?);
                    } else {
                        print_verify_record(&record);
                    }
                    eprintln!(
                        "error: {}: not written: the converted weights fail the forward-pass check",
                        output.display()
                    );
                    return Ok(ExitCode::from(1));
                }
                other => other?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                let plan = &report.plan;
                println!(
                    "{} -> {}: {} tensors ({} generated), {} source keys dropped, {:.1} MB in {:.2} s [mapping {}{}]",
                    report.input,
                    report.output.output,
                    report.output.tensors,
                    plan.generated().count(),
                    plan.dropped.len(),
                    report.output.bytes as f64 / 1e6,
                    report.output.seconds,
                    table.name(),
                    plan.img_size.map(|n| format!(", load-ready at {n}")).unwrap_or_default()
                );
                for note in &plan.notes {
                    println!("note: {note}");
                }
                if let Some(r) = &report.verify {
                    print_verify_record(r);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Mappings { name } => {
            match name {
                Some(n) => {
                    let text = ckptmap::mapping::table::builtin_table_text(&n)
                        .with_context(|| format!("no built-in mapping table {n:?} (see `ckptmap mappings`)"))?;
                    print!("{text}");
                }
                None => {
                    let tables = ckptmap::mapping::table::builtin_tables();
                    let width = tables.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
                    for (n, d) in tables {
                        println!("{n:<width$}  {d}");
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect { file, json, mut download } => {
            download.quiet = quiet;
            let ckpt = Checkpoint::open(&download.resolve(&file)?)?;
            let mut report = inspect::inspect(&ckpt);
            report.url = ckptmap::fetch::is_url(&file).then(|| file.clone());
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_inspect(&report);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Diff { a, b, root_a, root_b, json } => {
            let ca = Checkpoint::open(&a)?;
            let cb = Checkpoint::open(&b)?;
            let report =
                inspect::diff(&ca, &cb, root_a.as_deref(), root_b.as_deref()).context("reading tensor data")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_diff(&report);
            }
            Ok(if report.same() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Batch { list, out_dir, jobs, conversion, json, mut download } => {
            download.quiet = quiet;
            run_batch_command(list, out_dir, jobs, conversion, json, &download)
        }
        Command::Cache { action } => run_cache_command(action),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "ckptmap", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            use clap::CommandFactory;
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub(crate) fn run_cache_command(action: CacheAction) -> Result<ExitCode> {
    let root = |dir: Option<PathBuf>| {
        ckptmap::fetch::cache_dir(&ckptmap::fetch::FetchOptions { cache_dir: dir, ..Default::default() })
    };
    match action {
        CacheAction::List { json, cache_dir } => {
            let root = root(cache_dir);
            let files = ckptmap::fetch::list_cache(&root)
                .with_context(|| format!("cannot read the cache folder {}", root.display()))?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({ "cache_dir": root, "files": files }))?
                );
                return Ok(ExitCode::SUCCESS);
            }
            println!("cache: {}", root.display());
            for f in &files {
                let state = if f.complete { "" } else { " (unfinished; resumed by the next download)" };
                println!("  {}  {}{state}\n    {}", human_bytes(f.bytes as usize), f.url, f.path.display());
            }
            let total: u64 = files.iter().map(|f| f.bytes).sum();
            println!("{} files, {}", files.len(), human_bytes(total as usize));
        }
        CacheAction::Clean { urls, cache_dir } => {
            let root = root(cache_dir);
            let removed = ckptmap::fetch::clean_cache(&root, &urls)?;
            for f in &removed {
                println!("removed {} ({})", f.url, human_bytes(f.bytes as usize));
            }
            let total: u64 = removed.iter().map(|f| f.bytes).sum();
            println!("{} files removed from {}, {} freed", removed.len(), root.display(), human_bytes(total as usize));
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn run_batch_command(
    list: PathBuf,
    out_dir: PathBuf,
    jobs: u16,
    c: ConversionArgs,
    json: bool,
    download: &DownloadArgs,
) -> Result<ExitCode> {
    use ckptmap::batch;
    if download.sha256.is_some() {
        anyhow::bail!("--sha256 does not apply to batch: put sha256=HEX on the list's lines");
    }
    let items = batch::read_list(&list)?;
    let opts = batch::BatchOptions {
        out_dir,
        jobs: jobs as usize,
        verify: c.verify,
        plan: c.plan_options(),
        dtype: c.dtype,
        mapping: c.mapping.clone(),
        // The sha256 is per item (a list line's sha256=), never the run's.
        fetch: ckptmap::fetch::FetchOptions { sha256: None, ..download.fetch_options() },
    };
    let events = BatchBars::new(!download.quiet);
    let report = batch::run_batch(&list, &items, &opts, &events)?;
    if let Some(m) = &events.0 {
        let _ = m.clear();
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_batch(&report, &opts.out_dir.join(batch::REPORT_FILE));
    }
    Ok(if report.all_succeeded() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
