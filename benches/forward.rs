//! Forward-pass benchmark: the candle MMSeg MAE backbone (ViT-B/16, random weights, out
//! indices 3,5,7,11, batch 1, fp32, CPU) next to PyTorch timm on the same machine, the same
//! thread counts, in the same run.
//!
//! ```text
//! cargo bench --bench forward -- --python /path/to/venv/bin/python      # the README table
//! cargo bench --bench forward -- --sizes 224 --threads 1 --runs 9 --rounds 3
//! cargo bench --bench forward -- --matmul     # the MLP matmul alone (3072x768 by 768xT), GFLOP/s
//! ```
//!
//! Options (after `--`):
//! * `--sizes A,B` image sizes (default 224,512); `--threads A,B` (default 1,2);
//! * `--runs N` timed runs per cell and round (default 5), after `--warmup N` (default 1);
//! * `--rounds N` (default 1): the whole grid again, cells interleaved, for a busy machine;
//! * `--python PATH` (default `$CKPTMAP_BENCH_PYTHON`, else `python3`), an interpreter with
//!   torch and timm; `--torch-models vit,beit` (default both) or `none`
//!   (see `benches/forward_torch.py` for what each model is);
//! * `--matmul`: time only the MLP's matmul shape instead (GFLOP/s, higher is better).
//!
//! Each cell runs in a child process (this executable with `--child`), because candle sizes
//! its thread pools once per process from `RAYON_NUM_THREADS`/`CANDLE_NUM_THREADS`, both set
//! to the cell's thread count; PyTorch gets `torch.set_num_threads` with the same number.
//! Timed on our side: `ckptmap::verify::mmseg_forward`, exactly what `ckptmap verify` runs
//! (it builds the backbone from the weight map, copying no weights, then runs it); weights and
//! input are made before the clock starts. Reported per cell: the median (and minimum) wall
//! time, and the median CPU time of the process (all threads) per forward pass. On a machine
//! shared with other work, the single-thread CPU times are the steadier comparison.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ckptmap::verify::{deterministic_input, mmseg_forward, random_mmseg_weights, Arch, BackboneConfig};

struct Options {
    sizes: Vec<usize>,
    threads: Vec<usize>,
    runs: usize,
    warmup: usize,
    rounds: usize,
    python: String,
    torch_models: Vec<String>,
    child: bool,
    matmul: bool,
}

fn parse_list(s: &str) -> Vec<usize> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| p.trim().parse().unwrap_or_else(|_| panic!("not a number: {p}")))
        .collect()
}

fn parse_args() -> Options {
    let mut o = Options {
        sizes: vec![224, 512],
        threads: vec![1, 2],
        runs: 5,
        warmup: 1,
        rounds: 1,
        python: std::env::var("CKPTMAP_BENCH_PYTHON").unwrap_or_else(|_| "python3".into()),
        torch_models: vec!["vit".into(), "beit".into()],
        child: false,
        matmul: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--sizes" | "--size" => o.sizes = parse_list(&val()),
            "--threads" => o.threads = parse_list(&val()),
            "--runs" => o.runs = val().parse().expect("--runs N"),
            "--warmup" => o.warmup = val().parse().expect("--warmup N"),
            "--rounds" => o.rounds = val().parse().expect("--rounds N"),
            "--python" => o.python = val(),
            "--torch-models" => {
                o.torch_models = val()
                    .split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty() && *m != "none")
                    .map(String::from)
                    .collect()
            }
            "--child" => o.child = true,
            "--matmul" => o.matmul = true,
            // `cargo bench` passes `--bench`; a filter word may follow. Ignore both.
            _ => {}
        }
    }
    o
}

/// Wall and CPU times (ms) of a series of runs; in `--matmul` mode `wall` holds GFLOP/s.
#[derive(Clone, Default)]
struct Series {
    wall: Vec<f64>,
    cpu: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// CPU time (ms) used so far by all threads of this process, from `/proc/self/task/*/schedstat`
/// (nanoseconds on the CPU); `NaN` where that is unavailable.
fn process_cpu_ms() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return f64::NAN;
    };
    let mut ns = 0u64;
    for entry in dir.flatten() {
        if let Ok(s) = std::fs::read_to_string(entry.path().join("schedstat")) {
            ns += s.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    ns as f64 / 1e6
}

/// The MLP's first matmul alone, as the CPU forward pass computes it: `W · Xᵀ` with the
/// weight `W [3072, 768]` as a checkpoint stores it and the activations feature-major
/// (`Xᵀ [768, T]`, T = tokens at `size`). The arithmetic the forward pass is mostly made of;
/// the weight stays in cache here, unlike in the model.
fn child_matmul(o: &Options, size: usize) -> Series {
    let t = (size / 16) * (size / 16) + 1;
    let dev = Device::Cpu;
    let xt = Tensor::ones((768, t), DType::F32, &dev).unwrap();
    let w = Tensor::ones((3072, 768), DType::F32, &dev).unwrap();
    let reps = 10;
    for _ in 0..o.warmup {
        w.matmul(&xt).unwrap();
    }
    let wall = (0..o.runs)
        .map(|_| {
            let t0 = Instant::now();
            for _ in 0..reps {
                w.matmul(&xt).unwrap();
            }
            let secs = t0.elapsed().as_secs_f64() / reps as f64;
            2.0 * (t * 768 * 3072) as f64 / secs / 1e9
        })
        .collect();
    Series { wall, cpu: vec![] }
}

/// In the child: time `mmseg_forward` at one size with the pool sizes this process got.
fn child(o: &Options) {
    let size = o.sizes[0];
    let series = if o.matmul {
        child_matmul(o, size)
    } else {
        let dev = Device::Cpu;
        let cfg = BackboneConfig::vit_base(Arch::Mae, size);
        let w = random_mmseg_weights(&cfg, &dev).expect("random weights");
        let x = deterministic_input(size, &dev).expect("input");
        for _ in 0..o.warmup {
            mmseg_forward(&w, &cfg, &x).expect("forward");
        }
        let mut s = Series::default();
        for _ in 0..o.runs {
            let (c0, t0) = (process_cpu_ms(), Instant::now());
            let out = mmseg_forward(&w, &cfg, &x).expect("forward");
            s.wall.push(t0.elapsed().as_secs_f64() * 1e3);
            s.cpu.push(process_cpu_ms() - c0);
            assert_eq!(out.len(), 4);
        }
        s
    };
    let join = |v: &[f64]| v.iter().map(|t| format!("{t:.3}")).collect::<Vec<_>>().join(",");
    println!("RESULT {};{}", join(&series.wall), join(&series.cpu));
}

fn parse_floats(s: &str) -> Vec<f64> {
    s.split(',').filter_map(|t| t.trim().parse().ok()).collect()
}

fn run_ours(o: &Options, size: usize, threads: usize) -> Result<Series, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    if o.matmul {
        cmd.arg("--matmul");
    }
    let out = cmd
        .args(["--child", "--sizes", &size.to_string()])
        .args(["--runs", &o.runs.to_string(), "--warmup", &o.warmup.to_string()])
        .env("RAYON_NUM_THREADS", threads.to_string())
        .env("CANDLE_NUM_THREADS", threads.to_string())
        .output()
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .ok_or_else(|| format!("child failed: {}", String::from_utf8_lossy(&out.stderr)))?;
    let (wall, cpu) = line.split_once(';').unwrap_or((line, ""));
    Ok(Series { wall: parse_floats(wall), cpu: parse_floats(cpu) })
}

fn torch_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/forward_torch.py")
}

/// Runs `forward_torch.py`; returns its series and the torch/timm versions.
fn run_torch(o: &Options, model: &str, size: usize, threads: usize) -> Result<(Series, String), String> {
    let mut cmd = Command::new(&o.python);
    cmd.arg(torch_script());
    if o.matmul {
        cmd.arg("--matmul");
    }
    let out = cmd
        .args(["--model", model, "--size", &size.to_string()])
        .args(["--threads", &threads.to_string(), "--runs", &o.runs.to_string()])
        .args(["--warmup", &o.warmup.to_string()])
        .output()
        .map_err(|e| format!("{}: {e}", o.python))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(line) = stdout.lines().find_map(|l| l.strip_prefix("RESULT ")) else {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(err.lines().last().unwrap_or("no output").to_string());
    };
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let floats = |key: &str| -> Vec<f64> {
        v[key].as_array().map(|a| a.iter().filter_map(|t| t.as_f64()).collect()).unwrap_or_default()
    };
    let versions = format!(
        "torch {} / timm {} (ATen CPU capability {})",
        v["torch"].as_str().unwrap_or("?"),
        v["timm"].as_str().unwrap_or("?"),
        v["cpu_capability"].as_str().unwrap_or("?")
    );
    Ok((Series { wall: floats("times_ms"), cpu: floats("cpu_ms") }, versions))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "?".into())
}

fn fmt_cell(v: &[f64], higher_is_better: bool) -> String {
    if v.is_empty() || v.iter().all(|x| x.is_nan()) {
        return "-".into();
    }
    if higher_is_better {
        let max = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        format!("{:.1} (max {:.1})", median(v), max)
    } else {
        let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
        format!("{:.0} (min {:.0})", median(v), min)
    }
}

/// Our time over torch's (so < 1 means we are faster), from medians.
fn ratio(ours: &[f64], torch: &[f64], higher_is_better: bool) -> String {
    if ours.is_empty() || torch.is_empty() {
        return "-".into();
    }
    let r = if higher_is_better { median(torch) / median(ours) } else { median(ours) / median(torch) };
    if r.is_nan() {
        "-".into()
    } else {
        format!("{r:.2}")
    }
}

fn model_name(m: &str, matmul: bool) -> &str {
    match m {
        _ if matmul => "torch F.linear",
        "vit" => "timm vit_base_patch16",
        "beit" => "timm beit_base_patch16 (+rel. bias)",
        other => other,
    }
}

type Cell = (usize, usize, Series, Vec<Series>);

fn print_table(o: &Options, cells: &[Cell], cpu: bool) {
    let unit = if o.matmul { "GFLOP/s" } else { "ms" };
    let pick = |s: &Series| if cpu { s.cpu.clone() } else { s.wall.clone() };
    let mut header = format!("| size | threads | ckptmap (candle) {unit} |");
    let mut rule = "|---:|---:|---:|".to_string();
    for m in &o.torch_models {
        let short = if o.matmul { "torch (time)" } else { m.as_str() };
        header.push_str(&format!(" {} {unit} | ours / {short} |", model_name(m, o.matmul)));
        rule.push_str("---:|---:|");
    }
    println!("{header}");
    println!("{rule}");
    for (s, t, ours, torch) in cells {
        let mut row = format!("| {s} | {t} | {} |", fmt_cell(&pick(ours), o.matmul));
        for tv in torch {
            row.push_str(&format!(
                " {} | {} |",
                fmt_cell(&pick(tv), o.matmul),
                ratio(&pick(ours), &pick(tv), o.matmul)
            ));
        }
        println!("{row}");
    }
}

fn main() {
    let mut o = parse_args();
    if o.child {
        child(&o);
        return;
    }
    if o.matmul && !o.torch_models.is_empty() {
        o.torch_models = vec!["vit".into()]; // the script ignores the model in --matmul mode
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let what = if o.matmul {
        "matmul [3072,768]x[768,T] (T = tokens at the size), GFLOP/s, median (max)"
    } else {
        "ViT-B/16 MAE backbone forward, batch 1, fp32, ms per image, median (min)"
    };
    println!(
        "{what}; CPU: {} ({cores} cores); {} timed runs per cell x {} round(s) after {} warm-up",
        cpu_name(),
        o.runs,
        o.rounds,
        o.warmup
    );
    println!("load average at start: {}", loadavg());

    let mut cells: Vec<Cell> = Vec::new();
    for &s in &o.sizes {
        for &t in &o.threads {
            cells.push((s, t, Series::default(), vec![Series::default(); o.torch_models.len()]));
        }
    }
    let mut versions = String::new();
    let mut torch_errors: Vec<String> = Vec::new();
    for round in 0..o.rounds {
        for (s, t, ours, torch) in cells.iter_mut() {
            match run_ours(&o, *s, *t) {
                Ok(v) => {
                    ours.wall.extend(v.wall);
                    ours.cpu.extend(v.cpu);
                }
                Err(e) => eprintln!("ours {s}/{t}: {e}"),
            }
            for (m, acc) in o.torch_models.iter().zip(torch.iter_mut()) {
                match run_torch(&o, m, *s, *t) {
                    Ok((v, ver)) => {
                        acc.wall.extend(v.wall);
                        acc.cpu.extend(v.cpu);
                        versions = ver;
                    }
                    Err(e) => {
                        if !torch_errors.iter().any(|x| x == &e) {
                            eprintln!("torch ({m}) unavailable: {e}");
                            torch_errors.push(e);
                        }
                    }
                }
            }
            eprintln!("round {} size {s} threads {t} done (load {})", round + 1, loadavg());
        }
    }

    println!();
    if o.matmul {
        print_table(&o, &cells, false);
    } else {
        println!("Wall time:");
        print_table(&o, &cells, false);
        println!();
        println!("CPU time of the process (all threads) per image:");
        print_table(&o, &cells, true);
    }
    println!();
    if !versions.is_empty() {
        println!("PyTorch: {versions}, via {}", o.python);
    }
    println!("load average at end: {}", loadavg());
}
