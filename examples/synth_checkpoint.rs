//! Writes an MAE-layout ViT checkpoint (the official pretrain key set and shapes) with
//! pseudo-random fp32 weights, using our own writer — for benchmarks, never committed.
//!
//! usage: cargo run --release --example synth_checkpoint -- base|large|huge OUT.pth

use std::io::Write;

use ckptmap::pth::write::{write_pth, TensorToWrite};
use ckptmap::DType;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: synth_checkpoint base|large|huge OUT.pth");
        std::process::exit(2);
    }
    let (dim, depth, patch) = match args[1].as_str() {
        "base" => (768, 12, 16),
        "large" => (1024, 24, 16),
        "huge" => (1280, 32, 14),
        other => {
            eprintln!("unknown size {other}");
            std::process::exit(2);
        }
    };
    let tokens = (224 / patch) * (224 / patch) + 1;
    let mut specs: Vec<(String, Vec<usize>)> = vec![
        ("cls_token".into(), vec![1, 1, dim]),
        ("pos_embed".into(), vec![1, tokens, dim]),
        ("patch_embed.proj.weight".into(), vec![dim, 3, patch, patch]),
        ("patch_embed.proj.bias".into(), vec![dim]),
    ];
    for i in 0..depth {
        let b = format!("blocks.{i}");
        for (name, shape) in [
            ("norm1.weight", vec![dim]),
            ("norm1.bias", vec![dim]),
            ("attn.qkv.weight", vec![3 * dim, dim]),
            ("attn.qkv.bias", vec![3 * dim]),
            ("attn.proj.weight", vec![dim, dim]),
            ("attn.proj.bias", vec![dim]),
            ("norm2.weight", vec![dim]),
            ("norm2.bias", vec![dim]),
            ("mlp.fc1.weight", vec![4 * dim, dim]),
            ("mlp.fc1.bias", vec![4 * dim]),
            ("mlp.fc2.weight", vec![dim, 4 * dim]),
            ("mlp.fc2.bias", vec![dim]),
        ] {
            specs.push((format!("{b}.{name}"), shape));
        }
    }
    specs.push(("norm.weight".into(), vec![dim]));
    specs.push(("norm.bias".into(), vec![dim]));
    let tensors: Vec<TensorToWrite> =
        specs.iter().map(|(n, s)| TensorToWrite { name: n, dtype: DType::F32, shape: s }).collect();
    let file = std::fs::File::create(&args[2]).expect("create output");
    let out = std::io::BufWriter::with_capacity(1 << 20, file);
    // xorshift values scaled to small floats: cheap, deterministic, not all equal.
    let mut state = 0x9E3779B97F4A7C15u64;
    let mut buf = Vec::new();
    write_pth(out, "synth", &tensors, |i, w| {
        let n = tensors[i].shape.iter().product::<usize>();
        buf.clear();
        for _ in 0..n {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let v = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04;
            buf.extend_from_slice(&v.to_le_bytes());
        }
        w.write_all(&buf)
    })
    .expect("write checkpoint")
    .flush()
    .expect("flush");
}
