//! The `ckptmap` command line: parses flags, calls the library, prints, picks the exit code.
//! Exit codes: 0 success, 1 a check said "different"/"wrong", 2 bad input or failure.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use ckptmap::checkpoint::Checkpoint;
use ckptmap::inspect;

#[derive(Parser)]
#[command(name = "ckptmap", version, about = "Convert MAE / BEiT PyTorch checkpoints to the MMSegmentation backbone layout, and check the result with a forward pass", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what a checkpoint holds: container, state-dict location, every tensor, metadata.
    Inspect {
        /// A .pth (zip or legacy) or .safetensors file.
        file: PathBuf,
        /// Print one JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Compare two checkpoints' state dicts: names, shapes, dtypes, values (exit 1 if they differ).
    Diff {
        a: PathBuf,
        b: PathBuf,
        /// Dotted path of A's state dict (default: state_dict, model, module or top level).
        #[arg(long)]
        root_a: Option<String>,
        /// Dotted path of B's state dict.
        #[arg(long)]
        root_b: Option<String>,
        /// Print one JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Inspect { file, json } => {
            let ckpt = Checkpoint::open(&file)?;
            let report = inspect::inspect(&ckpt);
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
    }
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
    println!("file:       {}", r.file);
    println!("container:  {}", r.container);
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
    println!();
    let width = r.tensors.iter().map(|t| t.name.len()).max().unwrap_or(4).max(4);
    println!("{:<width$}  {:<5}  {:<20}  {:>12}  {:>10}", "name", "dtype", "shape", "numel", "bytes");
    for t in &r.tensors {
        println!("{:<width$}  {:<5}  {:<20}  {:>12}  {:>10}", t.name, t.dtype, format!("{:?}", t.shape), t.numel, human_bytes(t.bytes));
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
        println!("values:    {}: max abs diff {:e}", d.name, d.max_abs_diff);
    }
    if r.same() {
        println!("same: {} tensors compared, identical names, shapes, dtypes and values", r.compared);
    } else {
        println!(
            "different: {} only in A, {} only in B, {} shape/dtype mismatches, {} of {} compared tensors differ in value",
            r.only_in_a.len(),
            r.only_in_b.len(),
            r.mismatched.len(),
            r.value_diffs.len(),
            r.compared
        );
    }
}
