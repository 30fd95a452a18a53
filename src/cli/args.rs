//! The command line's definition (clap derive): every command, flag and its help text, and
//! the argument groups commands share (download options, conversion options, check options).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use ckptmap::mapping::plan::PlanOptions;
use ckptmap::DType;

pub(crate) const CACHE_NOTE: &str = "Downloads are cached in --cache-dir, else $CKPTMAP_CACHE, else $XDG_CACHE_HOME/ckptmap, else ~/.cache/ckptmap; `ckptmap cache list` shows them, `ckptmap cache clean` removes them.";

#[derive(Parser)]
#[command(name = "ckptmap", version, about = "Convert MAE / BEiT PyTorch checkpoints to the MMSegmentation backbone layout, and check the result with a forward pass", long_about = None, after_help = CACHE_NOTE)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
    /// Print nothing but errors (and the documents --json asks for): no progress, no
    /// summaries or notes; the exit code tells the outcome.
    #[arg(long, short, global = true)]
    pub(crate) quiet: bool,
}

/// How http(s) sources are fetched (for the commands that take a URL).
#[derive(clap::Args, Clone)]
pub(crate) struct DownloadArgs {
    /// Download cache folder (default: $CKPTMAP_CACHE, else $XDG_CACHE_HOME/ckptmap, else
    /// ~/.cache/ckptmap; see `ckptmap cache list`).
    #[arg(long, value_name = "DIR", help_heading = "Download options (http(s) sources)")]
    pub(crate) cache_dir: Option<PathBuf>,
    /// Expected sha256 of a downloaded source (a `-<hex>` suffix in the file name is
    /// checked automatically).
    #[arg(long, value_name = "HEX", help_heading = "Download options (http(s) sources)")]
    pub(crate) sha256: Option<String>,
    /// Retries on connection errors, timeouts and HTTP 5xx (not on 4xx or certificate errors).
    #[arg(long, value_name = "N", default_value_t = 4, help_heading = "Download options (http(s) sources)")]
    pub(crate) retries: u32,
    /// Seconds without data before a download attempt is abandoned.
    #[arg(long, value_name = "SECONDS", default_value_t = 60, help_heading = "Download options (http(s) sources)")]
    pub(crate) timeout: u64,
    /// Set from the global --quiet after parsing.
    #[arg(skip)]
    pub(crate) quiet: bool,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
pub(crate) enum CacheAction {
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
pub(crate) struct ConversionArgs {
    /// Mapping table: a built-in name (see `ckptmap mappings`) or a TOML file.
    /// Default: detected from the checkpoint's keys.
    #[arg(long, short, value_name = "NAME|FILE")]
    pub(crate) mapping: Option<String>,
    /// Make the output load-ready for MMSeg's backbone at this input size in pixels, a
    /// multiple of the patch size (e.g. 512, 640).
    #[arg(long, value_name = "PIXELS")]
    pub(crate) img_size: Option<usize>,
    /// Attention heads, when the checkpoint cannot tell (MAE widths without a preset).
    #[arg(long, value_name = "N")]
    pub(crate) num_heads: Option<usize>,
    /// Value for filled layer-scale gammas (MAE load-ready; default: the table's, 1.0).
    #[arg(long, value_name = "VALUE")]
    pub(crate) init_values: Option<f64>,
    /// Cast floating-point tensors to this dtype: float32 (fp32, float, f32), float16
    /// (fp16, half, f16), bfloat16 (bf16). Default: keep each tensor's source dtype and,
    /// for renames, its exact bytes.
    #[arg(long, value_name = "DTYPE", value_parser = parse_float_dtype)]
    pub(crate) dtype: Option<DType>,
    /// Pass keys the table drops (decoder, head, norm, ...) through unchanged instead
    /// (beit2mmseg's behaviour).
    #[arg(long)]
    pub(crate) keep_unused: bool,
    /// Before the output is moved into place, run the forward-pass check against the
    /// original (as verify --against); a failing output is not written (exit 1).
    #[arg(long)]
    pub(crate) verify: bool,
}

impl ConversionArgs {
    pub(crate) fn plan_options(&self) -> PlanOptions {
        PlanOptions {
            img_size: self.img_size,
            num_heads: self.num_heads,
            keep_unused: self.keep_unused,
            init_values: self.init_values,
        }
    }
}

/// Options of the forward-pass check.
#[derive(clap::Args, Clone)]
pub(crate) struct CheckArgs {
    /// Input size in pixels to run at (default: the reference's, or the original's native size).
    #[arg(long = "img-size", value_name = "PIXELS")]
    pub(crate) check_img_size: Option<usize>,
    /// Attention heads, when the weights cannot tell.
    #[arg(long = "num-heads", value_name = "N")]
    pub(crate) check_num_heads: Option<usize>,
    /// Blocks whose outputs are compared, e.g. 3,5,7,11 (default: the reference's, or
    /// MMSeg's defaults for the depth).
    #[arg(long, value_name = "BLOCKS", value_delimiter = ',')]
    pub(crate) out_indices: Option<Vec<usize>>,
    /// Largest allowed max|ours-ref| / max|ref| per output.
    #[arg(long, value_name = "RATIO", default_value_t = 1e-4)]
    pub(crate) tolerance: f64,
    /// cpu, or cuda / cuda:N in a binary built with the `cuda` feature.
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    pub(crate) device: String,
}

impl CheckArgs {
    pub(crate) fn options(&self) -> ckptmap::verify::VerifyOptions {
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

impl Command {
    /// Whether this command's stdout is a document the user asked for (kept with -q).
    pub(crate) fn prints_a_document(&self) -> bool {
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

/// A floating-point dtype as torch users write it (`float16`, `fp16`, `half`, `torch.bfloat16`, ...).
pub(crate) fn parse_float_dtype(s: &str) -> Result<DType, String> {
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
        _ => Err(format!(
            "{s:?} is not a floating-point dtype: use float32 (fp32), float16 (fp16, half), bfloat16 (bf16) or float64"
        )),
    }
}
