//! Writes an MAE-layout ViT checkpoint (the official pretrain key set and shapes) with
//! pseudo-random fp32 weights, using our own writer — for benchmarks, never committed.
//!
//! usage: cargo run --release --example synth_checkpoint -- base|large|huge OUT.pth

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let layout = match args.get(1).and_then(|s| ckptmap::synth::mae_pretrain_preset(s)) {
        Some(l) if args.len() == 3 => l,
        _ => {
            eprintln!("usage: synth_checkpoint base|large|huge OUT.pth");
            std::process::exit(2);
        }
    };
    if let Err(e) = ckptmap::synth::write_synthetic(std::path::Path::new(&args[2]), &layout, true) {
        eprintln!("error: {}: {e}", args[2]);
        std::process::exit(2);
    }
}
