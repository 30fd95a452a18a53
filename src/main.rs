//! The `ckptmap` command line: parses flags, calls the library, prints, picks the exit code.
//! Exit codes: 0 success, 1 a check said "different"/"wrong", 2 bad input or failure.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use ckptmap::formats::checkpoint::Checkpoint;
use ckptmap::write::execute as convert;
use ckptmap::inspect;
use ckptmap::mapping::plan::{Fate, Plan, PlanOptions};
use ckptmap::progress::Progress;
use ckptmap::DType;

const CACHE_NOTE: &str = "Downloads are cached in --cache-dir, else $CKPTMAP_CACHE, else $XDG_CACHE_HOME/ckptmap, else ~/.cache/ckptmap; `ckptmap cache list` shows them, `ckptmap cache clean` removes them.";

#[derive(Parser)]
#[command(name = "ckptmap", version, about = "Convert MAE / BEiT PyTorch checkpoints to the MMSegmentation backbone layout, and check the result with a forward pass", long_about = None, after_help = CACHE_NOTE)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Print nothing but errors (and the documents --json asks for): no progress, no
    /// summaries or notes; the exit code tells the outcome.
    #[arg(long, short, global = true)]
    quiet: bool,
}

/// How http(s) sources are fetched (for the commands that take a URL).
#[derive(clap::Args, Clone)]
struct DownloadArgs {
    /// Download cache folder (default: $CKPTMAP_CACHE, else $XDG_CACHE_HOME/ckptmap, else
    /// ~/.cache/ckptmap; see `ckptmap cache list`).
    #[arg(long, value_name = "DIR", help_heading = "Download options (http(s) sources)")]
    cache_dir: Option<PathBuf>,
    /// Expected sha256 of a downloaded source (a `-<hex>` suffix in the file name is
    /// checked automatically).
    #[arg(long, value_name = "HEX", help_heading = "Download options (http(s) sources)")]
    sha256: Option<String>,
    /// Retries on connection errors, timeouts and HTTP 5xx (not on 4xx or certificate errors).
    #[arg(long, value_name = "N", default_value_t = 4, help_heading = "Download options (http(s) sources)")]
    retries: u32,
    /// Seconds without data before a download attempt is abandoned.
    #[arg(long, value_name = "SECONDS", default_value_t = 60, help_heading = "Download options (http(s) sources)")]
    timeout: u64,
    /// Set from the global --quiet after parsing.
    #[arg(skip)]
    quiet: bool,
}

impl DownloadArgs {
    /// A local path as is; an http(s) URL downloaded into the cache first.
    fn resolve(&self, source: &str) -> Result<PathBuf> {
        if !ckptmap::fetch::is_url(source) {
            return Ok(PathBuf::from(source));
        }
        let opts = ckptmap::fetch::FetchOptions {
            cache_dir: self.cache_dir.clone(),
            sha256: self.sha256.clone(),
            retries: self.retries,
            read_timeout: std::time::Duration::from_secs(self.timeout),
            ..Default::default()
        };
        let bar = Bar::new(!self.quiet);
        let fetched = ckptmap::fetch::fetch(source, &opts, &bar)?;
        Ok(fetched.path)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Rewrite an MAE / BEiT checkpoint into the MMSeg backbone layout.
    ///
    /// By default the output is clean: exactly the MMSeg backbone keys the source can fill,
    /// renamed tensors bit-identical to the source. With --img-size it is load-ready: position
    /// tables resized, indices regenerated and MAE tables/gammas filled so that MMSeg's
    /// load_state_dict(strict=True) finds nothing missing or unexpected.
    Convert {
        /// Source checkpoint: a path or an http(s) URL (.pth zip or legacy, or .safetensors).
        src: String,
        /// Output file: .pth (torch.load(weights_only=True) reads it) or .safetensors.
        /// Missing folders are created; it cannot be SRC itself.
        dst: PathBuf,
        #[command(flatten)]
        conversion: ConversionArgs,
        /// Print the plan (every source key's fate, every target's origin) and write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print one JSON report (input and output sha256, the plan, what was written, the
        /// check when --verify) on stdout instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        download: DownloadArgs,
    },
    /// Check converted weights by running the MMSeg backbone forward pass (candle, fp32).
    ///
    /// Either against a reference file made by PyTorch (fixtures/make_reference.py makes one
    /// from an original checkpoint with timm), or against the original checkpoint run through
    /// the original-layout model on the same deterministic input. Exit 0 = pass, 1 = fail.
    /// Default tolerance: max |ours - ref| / max |ref| <= 1e-4 and cosine >= 1 - 1e-7 per
    /// output (fp32 CPU vs PyTorch differs by ~1e-6; broken conversions by 1e-3 and more).
    Verify {
        /// The converted checkpoint (MMSeg layout).
        converted: PathBuf,
        /// A .safetensors reference made by PyTorch: 'input' and 'out.<index>' tensors
        /// (one of --reference and --against is needed).
        #[arg(long, value_name = "REF.safetensors", conflicts_with = "against")]
        reference: Option<PathBuf>,
        /// The original checkpoint the conversion came from (a path or an http(s) URL).
        #[arg(long, value_name = "ORIGINAL")]
        against: Option<String>,
        #[command(flatten)]
        check: CheckArgs,
        /// Print one JSON document instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        download: DownloadArgs,
    },
    /// List the built-in mapping tables, or print one's TOML text.
    Mappings {
        /// Print this table's TOML text.
        name: Option<String>,
    },
    /// Show what a checkpoint holds: container, state-dict location, every tensor, metadata.
    Inspect {
        /// A .pth (zip or legacy) or .safetensors file, or an http(s) URL.
        file: String,
        /// Print one JSON document instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        download: DownloadArgs,
    },
    /// Compare two checkpoints' state dicts: names, shapes, dtypes, values (exit 1 if they differ).
    ///
    /// Tensors of one shape are compared by value, also across dtypes (both cast to f64:
    /// max abs and max relative difference).
    Diff {
        /// The first checkpoint (.pth or .safetensors), e.g. the original.
        a: PathBuf,
        /// The second checkpoint, compared with A, e.g. a conversion or a cast of it.
        b: PathBuf,
        /// Dotted path of A's state dict (default: state_dict, model, module or top level).
        #[arg(long, value_name = "PATH")]
        root_a: Option<String>,
        /// Dotted path of B's state dict.
        #[arg(long, value_name = "PATH")]
        root_b: Option<String>,
        /// Print one JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Convert every checkpoint of a list (URLs and paths) into one folder, with a report.
    ///
    /// LIST has one item per line: `SOURCE [name=OUT.pth] [mapping=NAME|FILE.toml]
    /// [sha256=HEX]`; `#` starts a comment. Outputs default to `<source stem>_mmseg.pth`.
    /// Downloads run in parallel, conversions one at a time as inputs arrive; a failed item
    /// does not stop the others. DIR/report.json records every item; a rerun skips items
    /// whose output still has the recorded sha256 and retries the rest.
    /// Exit 0 every item done, 1 some item failed, 2 bad list or options.
    Batch {
        /// The list file.
        list: PathBuf,
        /// Folder for the outputs and report.json (created if needed).
        #[arg(long, value_name = "DIR")]
        out_dir: PathBuf,
        /// Downloads at once.
        #[arg(long, short = 'j', value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
        jobs: u16,
        /// How every item is converted (a line's mapping= wins over --mapping).
        #[command(flatten)]
        conversion: ConversionArgs,
        /// Print the report (as in DIR/report.json) instead of the table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        download: DownloadArgs,
    },
    /// List or remove cached downloads.
    #[command(after_help = CACHE_NOTE)]
    Cache {
        #[command(subcommand)]
        action: CacheAction,
    },
    /// Print a shell completion script to stdout.
    ///
    /// bash: `ckptmap completions bash > ~/.local/share/bash-completion/completions/ckptmap`;
    /// zsh: `ckptmap completions zsh > ~/.zfunc/_ckptmap`; fish:
    /// `ckptmap completions fish > ~/.config/fish/completions/ckptmap.fish`.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout: `ckptmap man > ckptmap.1; man ./ckptmap.1`.
    Man,
}

#[derive(Subcommand)]
enum CacheAction {
    /// Show the cache folder and every cached download: URL, size, file.
    List {
        /// Print one JSON document instead of text.
        #[arg(long)]
        json: bool,
        /// The cache folder (default: $CKPTMAP_CACHE, else $XDG_CACHE_HOME/ckptmap, else ~/.cache/ckptmap).
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
    },
    /// Remove the cached downloads of these URLs, or every cached download when none is given.
    Clean {
        /// URLs whose downloads to remove (default: all).
        urls: Vec<String>,
        /// The cache folder (default: $CKPTMAP_CACHE, else $XDG_CACHE_HOME/ckptmap, else ~/.cache/ckptmap).
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
    },
}

/// How a checkpoint is converted: the options `convert` and `batch` share.
#[derive(clap::Args, Clone)]
struct ConversionArgs {
    /// Mapping table: a built-in name (see `ckptmap mappings`) or a TOML file.
    /// Default: detected from the checkpoint's keys.
    #[arg(long, short, value_name = "NAME|FILE")]
    mapping: Option<String>,
    /// Make the output load-ready for MMSeg's backbone at this input size in pixels, a
    /// multiple of the patch size (e.g. 512, 640).
    #[arg(long, value_name = "PIXELS")]
    img_size: Option<usize>,
    /// Attention heads, when the checkpoint cannot tell (MAE widths without a preset).
    #[arg(long, value_name = "N")]
    num_heads: Option<usize>,
    /// Value for filled layer-scale gammas (MAE load-ready; default: the table's, 1.0).
    #[arg(long, value_name = "VALUE")]
    init_values: Option<f64>,
    /// Cast floating-point tensors to this dtype: float32 (fp32, float, f32), float16
    /// (fp16, half, f16), bfloat16 (bf16). Default: keep each tensor's source dtype and,
    /// for renames, its exact bytes.
    #[arg(long, value_name = "DTYPE", value_parser = parse_float_dtype)]
    dtype: Option<DType>,
    /// Pass keys the table drops (decoder, head, norm, ...) through unchanged instead
    /// (beit2mmseg's behaviour).
    #[arg(long)]
    keep_unused: bool,
    /// Before the output is moved into place, run the forward-pass check against the
    /// original (as verify --against); a failing output is not written (exit 1).
    #[arg(long)]
    verify: bool,
}

impl ConversionArgs {
    fn plan_options(&self) -> PlanOptions {
        PlanOptions { img_size: self.img_size, num_heads: self.num_heads, keep_unused: self.keep_unused, init_values: self.init_values }
    }
}

extern "C" {
    fn signal(signum: i32, handler: usize) -> usize;
}

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of our output goes away
    // (`ckptmap inspect big.pth | head`) instead of panicking on a failed print.
    // SAFETY: restores the default action of SIGPIPE (13) before any thread starts.
    unsafe {
        signal(13, 0);
    }
    let cli = Cli::parse();
    // -q: nothing on stdout but the documents --json asks for (and what completions / man
    // are for); errors still go to stderr.
    if cli.quiet && !cli.command.prints_a_document() {
        silence_stdout();
    }
    // Ctrl-C / SIGTERM / SIGHUP remove unfinished outputs' temporary files (exit 130/143/129).
    let on_signal = |i: ckptmap::write::atomic::Interrupted| {
        let what = match i.left_as_they_were.as_slice() {
            [] => String::new(),
            [one] => format!("; {} left as it was", one.display()),
            many => format!("; {} outputs left as they were", many.len()),
        };
        eprintln!("error: interrupted by {}{what}", i.name);
        std::process::exit(128 + i.signal);
    };
    if let Err(e) = ckptmap::write::atomic::remove_temporaries_on_signal(on_signal) {
        eprintln!("warning: cannot install signal handlers: {e}");
    }
    match run(cli.command, cli.quiet) {
        Ok(code) => code,
        Err(e) => {
            // One line: each cause once (many errors already quote their source).
            let mut line = e.to_string();
            for cause in e.chain().skip(1).map(|c| c.to_string()) {
                if !line.contains(&cause) {
                    line = format!("{line}: {cause}");
                }
            }
            eprintln!("error: {}", line.replace('\n', " "));
            ExitCode::from(2)
        }
    }
}

/// Options of the forward-pass check.
#[derive(clap::Args, Clone)]
struct CheckArgs {
    /// Input size in pixels to run at (default: the reference's, or the original's native size).
    #[arg(long = "img-size", value_name = "PIXELS")]
    check_img_size: Option<usize>,
    /// Attention heads, when the weights cannot tell.
    #[arg(long = "num-heads", value_name = "N")]
    check_num_heads: Option<usize>,
    /// Blocks whose outputs are compared, e.g. 3,5,7,11 (default: the reference's, or
    /// MMSeg's defaults for the depth).
    #[arg(long, value_name = "BLOCKS", value_delimiter = ',')]
    out_indices: Option<Vec<usize>>,
    /// Largest allowed max|ours-ref| / max|ref| per output.
    #[arg(long, value_name = "RATIO", default_value_t = 1e-4)]
    tolerance: f64,
    /// cpu, or cuda / cuda:N in a binary built with the `cuda` feature.
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    device: String,
}

impl CheckArgs {
    fn options(&self) -> ckptmap::verify::VerifyOptions {
        let mut tolerance = ckptmap::verify::Tolerance::default();
        tolerance.max_rel = self.tolerance;
        ckptmap::verify::VerifyOptions {
            img_size: self.check_img_size,
            num_heads: self.check_num_heads,
            out_indices: self.out_indices.clone(),
            tolerance,
            init_values: 1.0,
        }
    }
}

fn print_outcome(o: &ckptmap::verify::VerifyOutcome) {
    println!("checked against {} ({}, img_size {}, blocks {:?})", o.against, o.arch, o.img_size, o.out_indices);
    if o.filled_defaults > 0 {
        println!("({} keys absent from the file were given MMSeg's constructor values: zero MAE tables, gamma 1, generated indices)", o.filled_defaults);
    }
    for r in &o.outputs {
        let f = |v: Option<f64>| v.map(|x| format!("{x:.3e}")).unwrap_or_else(|| "-".into());
        println!(
            "  out {:>2} {:?}: max abs {} max rel {} cosine {} {}",
            r.index,
            r.shape,
            f(r.max_abs),
            f(r.max_rel),
            r.cosine.map(|c| format!("{c:.9}")).unwrap_or_else(|| "-".into()),
            if r.passed { "ok" } else { "FAIL" }
        );
        if let Some(n) = &r.note {
            println!("         {n}");
        }
    }
    if o.passed {
        println!("PASS: every output within tolerance (max rel {:e}, cosine >= {})", o.tolerance.max_rel, o.tolerance.min_cosine);
    } else {
        println!("FAIL: the converted weights do not compute what the reference computed");
    }
}

/// A `convert --verify` record: what it did not cover, then the outcome.
fn print_verify_record(r: &ckptmap::job::VerifyRecord) {
    if let Some(n) = &r.not_checked {
        println!("note: {n}");
    }
    match r.outcome() {
        Some(o) => print_outcome(&o),
        None => println!("{}", if r.passed { "PASS" } else { "FAIL" }),
    }
}

/// A floating-point dtype as torch users write it (`float16`, `fp16`, `half`, `torch.bfloat16`, ...).
fn parse_float_dtype(s: &str) -> Result<DType, String> {
    let lower = s.to_ascii_lowercase();
    let canonical = match lower.strip_prefix("torch.").unwrap_or(&lower) {
        "float32" | "fp32" | "float" | "f32" => "f32",
        "float16" | "fp16" | "half" | "f16" => "f16",
        "bfloat16" | "bf16" => "bf16",
        "float64" | "fp64" | "double" | "f64" => "f64",
        other => other,
    };
    match DType::from_name(canonical) {
        Some(d) if d.is_float() => Ok(d),
        _ => Err(format!("{s:?} is not a floating-point dtype: use float32 (fp32), float16 (fp16, half), bfloat16 (bf16) or float64")),
    }
}

/// A progress bar on an interactive stderr; nothing otherwise.
struct Bar(Option<indicatif::ProgressBar>);

impl Bar {
    fn new(show: bool) -> Bar {
        use std::io::IsTerminal;
        Bar((show && std::io::stderr().is_terminal()).then(indicatif::ProgressBar::hidden))
    }
}

impl Progress for Bar {
    fn begin(&self, label: &str, total: Option<u64>) {
        if let Some(b) = &self.0 {
            b.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            if let Some(t) = total {
                b.set_length(t);
            }
            b.set_style(
                indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.set_message(label.to_string());
        }
    }
    fn advance(&self, bytes: u64) {
        if let Some(b) = &self.0 {
            b.inc(bytes);
        }
    }
    fn end(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

impl Command {
    /// Whether this command's stdout is a document the user asked for (kept with -q).
    fn prints_a_document(&self) -> bool {
        match self {
            Command::Convert { json, .. }
            | Command::Verify { json, .. }
            | Command::Inspect { json, .. }
            | Command::Diff { json, .. }
            | Command::Batch { json, .. } => *json,
            Command::Cache { action: CacheAction::List { json, .. } } => *json,
            Command::Cache { action: CacheAction::Clean { .. } } => false,
            Command::Mappings { .. } | Command::Completions { .. } | Command::Man => true,
        }
    }
}

/// Points stdout at /dev/null (for -q), so no summary, note or table reaches the terminal.
fn silence_stdout() {
    use std::os::fd::AsRawFd;
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 on two valid descriptors, before anything is printed.
        unsafe {
            libc::dup2(null.as_raw_fd(), 1);
        }
    }
}

/// A spinner on an interactive stderr while a long step runs (the forward passes of
/// `verify`: seconds for ViT-L); nothing with --json, -q or a redirected stderr.
fn spinner(show: bool, message: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    (show && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_message(message.to_string());
        b.enable_steady_tick(std::time::Duration::from_millis(120));
        b
    })
}

/// A spinner for a job stage without a byte count (the forward-pass check), drawn only on an
/// interactive stderr.
struct Spinner {
    show: bool,
    message: &'static str,
    bar: std::sync::Mutex<Option<indicatif::ProgressBar>>,
}

impl Spinner {
    fn new(show: bool, message: &'static str) -> Spinner {
        Spinner { show, message, bar: std::sync::Mutex::new(None) }
    }
}

impl Progress for Spinner {
    fn begin(&self, _label: &str, _total: Option<u64>) {
        *self.bar.lock().unwrap_or_else(|e| e.into_inner()) = spinner(self.show, self.message);
    }
    fn advance(&self, _bytes: u64) {}
    fn end(&self) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take() {
            b.finish_and_clear();
        }
    }
}

fn run(command: Command, quiet: bool) -> Result<ExitCode> {
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
            let report = match ckptmap::job::run_planned(&req, &planned, &bar, &Spinner::new(!json && !quiet, "checking the output with the forward pass")) {
                Err(ckptmap::job::JobError::CheckFailed { output, record }) => {
                    // The check failed: nothing was moved into place.
                    if json {
                        let doc = serde_json::json!({ "input": req.source, "output": null, "written": false, "verify": record });
                        println!("{}", serde_json::to_string_pretty(&doc)?);
                    } else {
                        print_verify_record(&record);
                    }
                    eprintln!("error: {}: not written: the converted weights fail the forward-pass check", output.display());
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
                    for (n, d) in ckptmap::mapping::table::builtin_tables() {
                        println!("{n:<8} {d}");
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
            let report = inspect::diff(&ca, &cb, root_a.as_deref(), root_b.as_deref()).context("reading tensor data")?;
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

fn print_plan(plan: &Plan, mapping: &str, root: &str, dtype: Option<DType>) {
    let root = if root.is_empty() { "top level" } else { root };
    println!("mapping {mapping}; tensors under {root}");
    if let Some(n) = plan.img_size {
        println!("load-ready for MMSeg at img_size {n}");
    }
    let vars: Vec<String> = plan.vars.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("variables: {}", vars.join(" "));
    println!();
    println!("source keys:");
    for fate in plan.source_fates() {
        match fate.fate {
            Fate::Produces(outs) if outs.len() == 1 => println!("  {} -> {}  [{}]", fate.source, outs[0].target, outs[0].rule),
            Fate::Produces(outs) => {
                let targets: Vec<&str> = outs.iter().map(|o| o.target.as_str()).collect();
                println!("  {} -> {} targets: {}", fate.source, outs.len(), targets.join(", "));
            }
            Fate::Dropped(d) => println!("  {} dropped [{}]: {}", fate.source, d.rule, d.reason),
        }
    }
    println!();
    println!("targets:");
    for t in &plan.outputs {
        let to = convert::output_dtype(t, dtype);
        println!("  {} {} {:?} <- {}", t.target, to, t.shape, t.origin);
    }
    for note in &plan.notes {
        println!("note: {note}");
    }
    println!();
    println!(
        "{} targets ({} generated), {} source keys dropped; dry run: nothing written",
        plan.outputs.len(),
        plan.generated().count(),
        plan.dropped.len()
    );
}

fn human_bytes(n: usize) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1} MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} kB", n / 1e3)
    } else {
        format!("{n} B")
    }
}

fn print_inspect(r: &inspect::InspectReport) {
    if let Some(url) = &r.url {
        println!("url:        {url}");
    }
    println!("file:       {}", r.file);
    println!("container:  {}", r.container);
    match r.crc32 {
        "recorded" => println!("crc32:      recorded in the zip (checked when tensor bytes are read)"),
        "absent" => println!("crc32:      absent (saved with CRC computation off): nothing can be checked"),
        _ => {}
    }
    match &r.state_dict {
        Some(p) if p.is_empty() => println!("state dict: top level"),
        Some(p) => println!("state dict: {p}"),
        None => println!("state dict: none found (no tensors)"),
    }
    for root in &r.roots {
        let name = if root.path.is_empty() { "(top level)" } else { &root.path };
        println!("  {name}: {} tensors, {} params, {}", root.tensors, root.params, human_bytes(root.bytes));
    }
    for (k, v) in &r.other {
        println!("  {k}: {v}");
    }
    if !r.metadata.is_empty() {
        println!("metadata:   (safetensors __metadata__)");
        for (k, v) in &r.metadata {
            println!("  {k}: {v}");
        }
    }
    println!();
    let width = r.tensors.iter().map(|t| t.name.len()).max().unwrap_or(4).max(4);
    let dw = r.tensors.iter().map(|t| t.dtype.len()).max().unwrap_or(5).max(5);
    println!("{:<width$}  {:<dw$}  {:<20}  {:>12}  {:>10}", "name", "dtype", "shape", "numel", "bytes");
    for t in &r.tensors {
        println!("{:<width$}  {:<dw$}  {:<20}  {:>12}  {:>10}", t.name, t.dtype, format!("{:?}", t.shape), t.numel, human_bytes(t.bytes));
    }
    println!();
    println!("total: {} tensors, {} params, {}", r.tensors.len(), r.total_params, human_bytes(r.total_bytes));
}

fn print_diff(r: &inspect::DiffReport) {
    for n in &r.only_in_a {
        println!("only in A: {n}");
    }
    for n in &r.only_in_b {
        println!("only in B: {n}");
    }
    for (n, a, b) in &r.mismatched {
        println!("differs:   {n}: {a} vs {b}");
    }
    for d in &r.value_diffs {
        println!("values:    {}: max abs diff {:e}, max rel {:.3e}", d.name, d.max_abs_diff, d.max_rel_diff);
    }
    for d in &r.dtype_diffs {
        println!(
            "dtype:     {}: {} vs {}; values as f64: max abs diff {:.3e}, max rel {:.3e}",
            d.name, d.dtype_a, d.dtype_b, d.max_abs_diff, d.max_rel_diff
        );
    }
    if r.same() {
        println!("same: {} tensors compared, identical names, shapes, dtypes and values", r.compared);
    } else {
        println!(
            "different: {} only in A, {} only in B, {} shape mismatches, {} in another dtype, {} of {} compared tensors differ in value",
            r.only_in_a.len(),
            r.only_in_b.len(),
            r.mismatched.len(),
            r.dtype_diffs.len(),
            r.value_diffs.len(),
            r.compared
        );
    }
}

// ---------------------------------------------------------------------------------------
// cache

fn run_cache_command(action: CacheAction) -> Result<ExitCode> {
    let root = |dir: Option<PathBuf>| ckptmap::fetch::cache_dir(&ckptmap::fetch::FetchOptions { cache_dir: dir, ..Default::default() });
    match action {
        CacheAction::List { json, cache_dir } => {
            let root = root(cache_dir);
            let files = ckptmap::fetch::list_cache(&root).with_context(|| format!("cannot read the cache folder {}", root.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "cache_dir": root, "files": files }))?);
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

// ---------------------------------------------------------------------------------------
// batch

fn run_batch_command(list: PathBuf, out_dir: PathBuf, jobs: u16, c: ConversionArgs, json: bool, download: &DownloadArgs) -> Result<ExitCode> {
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
        fetch: ckptmap::fetch::FetchOptions {
            cache_dir: download.cache_dir.clone(),
            retries: download.retries,
            read_timeout: std::time::Duration::from_secs(download.timeout),
            ..Default::default()
        },
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

/// One progress bar per running download / conversion on an interactive stderr; nothing
/// otherwise.
struct BatchBars(Option<indicatif::MultiProgress>);

impl BatchBars {
    fn new(show: bool) -> BatchBars {
        use std::io::IsTerminal;
        BatchBars((show && std::io::stderr().is_terminal()).then(indicatif::MultiProgress::new))
    }
}

impl ckptmap::batch::BatchEvents for BatchBars {
    fn progress(&self, item: &ckptmap::batch::ListItem, _stage: ckptmap::batch::Stage) -> Box<dyn Progress + '_> {
        Box::new(ItemBar { multi: self.0.as_ref(), name: item.output.clone(), bar: std::sync::Mutex::new(None) })
    }
    fn finished(&self, item: &ckptmap::batch::ItemReport) {
        if let Some(m) = &self.0 {
            let what = match (&item.status, &item.error) {
                (_, Some(e)) => format!("failed ({}): {}", format!("{:?}", e.stage).to_lowercase(), e.message),
                (s, None) => format!("{s:?}").to_lowercase(),
            };
            let _ = m.println(format!("{}: {what}", item.output));
        }
    }
}

/// One item's bar inside the batch's MultiProgress.
struct ItemBar<'a> {
    multi: Option<&'a indicatif::MultiProgress>,
    name: String,
    bar: std::sync::Mutex<Option<indicatif::ProgressBar>>,
}

impl Progress for ItemBar<'_> {
    fn begin(&self, label: &str, total: Option<u64>) {
        let Some(m) = self.multi else { return };
        let mut slot = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = slot.take() {
            old.finish_and_clear();
            m.remove(&old);
        }
        let bar = match total {
            Some(t) => m.add(indicatif::ProgressBar::new(t)).with_style(
                indicatif::ProgressStyle::with_template("{prefix} {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            ),
            None => {
                let b = m.add(indicatif::ProgressBar::new_spinner());
                b.enable_steady_tick(std::time::Duration::from_millis(200));
                b
            }
        };
        bar.set_prefix(self.name.clone());
        bar.set_message(label.to_string());
        *slot = Some(bar);
    }
    fn advance(&self, bytes: u64) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            b.inc(bytes);
        }
    }
    fn end(&self) {
        if let (Some(m), Some(b)) = (self.multi, self.bar.lock().unwrap_or_else(|e| e.into_inner()).take()) {
            b.finish_and_clear();
            m.remove(&b);
        }
    }
}

fn print_batch(r: &ckptmap::batch::BatchReport, report_path: &std::path::Path) {
    use ckptmap::batch::Status;
    let size = |n: u64| {
        let n = n as f64;
        if n >= 1e9 {
            format!("{:.2} GB", n / 1e9)
        } else if n >= 1e6 {
            format!("{:.1} MB", n / 1e6)
        } else {
            format!("{:.1} kB", n / 1e3)
        }
    };
    let rows: Vec<[String; 6]> = r
        .items
        .iter()
        .map(|i| {
            let status = match i.status {
                Status::Converted => "converted",
                Status::Skipped => "skipped",
                Status::Failed => "FAILED",
                Status::Pending => "pending",
            };
            let verify = match &i.verify {
                None => "-".to_string(),
                Some(v) => format!(
                    "{} {}{}",
                    if v.passed { "pass" } else { "FAIL" },
                    v.max_rel.map(|x| format!("{x:.1e}")).unwrap_or_else(|| "-".into()),
                    if v.subject == "output" { "" } else { " (clean)" }
                ),
            };
            let error = i.error.as_ref().map(|e| format!("{}: {}", format!("{:?}", e.stage).to_lowercase(), e.message)).unwrap_or_default();
            [
                format!("{}:{}", i.line, i.output),
                status.to_string(),
                i.seconds.map(|s| format!("{s:.2}")).unwrap_or_else(|| "-".into()),
                i.output_bytes.map(size).unwrap_or_else(|| "-".into()),
                verify,
                error,
            ]
        })
        .collect();
    let head = ["item", "status", "seconds", "size", "verify", "error"];
    let mut width = [0usize; 5];
    for row in rows.iter().map(|r| r.each_ref().map(String::as_str)).chain([head]) {
        for (w, cell) in width.iter_mut().zip(row.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |c: [&str; 6]| {
        let text = format!(
            "{:<w0$}  {:<w1$}  {:>w2$}  {:>w3$}  {:<w4$}  {}",
            c[0], c[1], c[2], c[3], c[4], c[5],
            w0 = width[0], w1 = width[1], w2 = width[2], w3 = width[3], w4 = width[4]
        );
        println!("{}", text.trim_end());
    };
    line(head);
    for row in &rows {
        line(row.each_ref().map(String::as_str));
    }
    let s = &r.summary;
    println!(
        "{} items: {} converted, {} skipped, {} failed; report: {}",
        s.total,
        s.converted,
        s.skipped,
        s.failed,
        report_path.display()
    );
}
