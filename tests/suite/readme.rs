//! Every ```sh block of README.md runs as written. The official checkpoints' URLs are
//! served by a loopback HTTP server (127.0.0.1): `mae_pretrain_vit_base.pth` is a ViT-B/16
//! of the official layout and size made by `ckptmap::synth`, the BEiT URL serves the tiny
//! BEiT fixture (same key layout). Blocks that need what a test cannot have (PyTorch, a
//! release build, the wheel tools) are skipped with the reason printed; ```text blocks are
//! synopses and not run.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

/// The hosts README's URLs name, and the file each of their names is served from.
const SERVED_PREFIXES: [&str; 2] = ["https://dl.fbaipublicfiles.com/mae/pretrain/", "https://unilm.blob.core.windows.net/beit/"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The ```sh blocks of `text`: each a list of logical lines (continuations joined,
/// comment lines dropped, trailing `# ...` comments cut).
fn sh_blocks(text: &str) -> Vec<Vec<String>> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<String>> = None;
    let mut pending = String::new();
    for line in text.lines() {
        match (&mut current, line.trim_start()) {
            (None, l) if l.starts_with("```sh") => current = Some(Vec::new()),
            (Some(_), l) if l.starts_with("```") => blocks.push(current.take().unwrap()),
            (Some(block), l) => {
                if l.starts_with('#') || l.is_empty() {
                    continue;
                }
                let l = l.split(" # ").next().unwrap().trim_end();
                match l.strip_suffix('\\') {
                    Some(head) => pending.push_str(head),
                    None => {
                        pending.push_str(l);
                        block.push(std::mem::take(&mut pending));
                    }
                }
            }
            (None, _) => {}
        }
    }
    assert!(current.is_none(), "README.md has an unclosed ```sh block");
    blocks
}

/// Why a block cannot run in a test, if it cannot.
fn skip_reason(block: &[String]) -> Option<&'static str> {
    let has = |w: &str| block.iter().any(|l| l.contains(w));
    if has("scripts/build-wheel.sh") {
        return Some("the pip install block runs in scripts/test-wheel.sh (a step of .ci/run, where Python is present)");
    }
    if has("make_reference.py") {
        return Some("needs PyTorch, timm and SciPy; verify --reference runs on the committed references in tests/suite/cli.rs");
    }
    None
}

/// Serves `files` (name → bytes) at any path ending in that name; 404 otherwise.
fn serve(files: Vec<(String, Arc<Vec<u8>>)>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let files = Arc::new(files);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let files = files.clone();
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                match files.iter().find(|(name, _)| path.ends_with(&format!("/{name}"))) {
                    Some((_, body)) => {
                        let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                        let _ = s.write_all(body);
                    }
                    None => {
                        let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

#[test]
fn every_readme_sh_block_runs_as_written() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let blocks = sh_blocks(&readme);
    assert!(blocks.len() >= 3, "README.md has {} ```sh blocks", blocks.len());

    // A working folder that looks like a checkout (fixtures/ and mappings/), with a cache of
    // its own.
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    for sub in ["fixtures", "mappings"] {
        std::os::unix::fs::symlink(root().join(sub), work.join(sub)).unwrap();
    }
    let vit_b = dir.path().join("mae_pretrain_vit_base.pth");
    ckptmap::synth::write_synthetic(&vit_b, &ckptmap::synth::mae_pretrain_preset("base").unwrap(), false).unwrap();
    let base = serve(vec![
        ("mae_pretrain_vit_base.pth".into(), Arc::new(std::fs::read(&vit_b).unwrap())),
        ("beit_base_patch16_224_pt22k_ft22k.pth".into(), Arc::new(std::fs::read(root().join("fixtures/beit_tiny_ft.pth")).unwrap())),
    ]);

    let mut ran = 0;
    for block in &blocks {
        if let Some(why) = skip_reason(block) {
            eprintln!("README block skipped ({why}):\n  {}", block.join("\n  "));
            continue;
        }
        for line in block {
            let args: Vec<String> = if let Some(rest) = line.strip_prefix("ckptmap ") {
                rest.split_whitespace().map(str::to_string).collect()
            } else if let Some(rest) = line.strip_prefix("cargo run --locked -- ") {
                rest.split_whitespace().map(str::to_string).collect()
            } else if line.starts_with("cargo test") {
                eprintln!("README line skipped (it is this test run): {line}");
                continue;
            } else {
                panic!("README.md: a ```sh line this test cannot run: {line:?} (make it runnable here, or put a synopsis in a ```text block)");
            };
            let args: Vec<String> = args
                .into_iter()
                .map(|a| {
                    if !a.starts_with("http") {
                        return a;
                    }
                    let p = SERVED_PREFIXES.iter().find(|p| a.starts_with(**p)).unwrap_or_else(|| panic!("README.md uses a URL this test does not serve: {a}"));
                    a.replacen(p, &format!("{base}/"), 1)
                })
                .collect();
            let out = Command::new(env!("CARGO_BIN_EXE_ckptmap"))
                .args(&args)
                .current_dir(&work)
                .env("CKPTMAP_CACHE", dir.path().join("cache"))
                .output()
                .unwrap();
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success(), "README command failed: {line}\n{text}");
            if args.iter().any(|a| a == "--verify") {
                assert!(text.contains("PASS"), "{line}: {text}");
            }
            ran += 1;
        }
    }
    assert!(ran >= 6, "only {ran} README commands ran");
    // The main command's output lies where git does not show it.
    let main_out = work.join("target/mae_tiny_mmseg.pth");
    assert!(main_out.is_file(), "README's main command did not write {}", main_out.display());
    let ignore = std::fs::read_to_string(root().join(".gitignore")).unwrap();
    assert!(ignore.lines().any(|l| l == "/target"), ".gitignore does not cover target/");
    assert!(work.join("pretrain/beit_base.pth").is_file());
}

/// What README says about the fixture matches the fixture.
#[test]
fn readme_describes_the_tiny_mae_as_it_is() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let ckpt = ckptmap::formats::checkpoint::Checkpoint::open(&root().join("fixtures/mae_tiny.pth")).unwrap();
    let root_name = ckptmap::inspect::find_state_dict(&ckpt).unwrap();
    let names: Vec<String> = ckpt.tensors_under(root_name).unwrap().into_iter().map(|t| t.name).collect();
    let blocks = names.iter().filter(|n| n.starts_with("blocks.") && n.ends_with(".norm1.weight")).count();
    assert!(readme.contains(&format!("`mae_tiny.pth` is a {blocks}-block MAE of width 32")), "README's fixture sentence does not say {blocks} blocks");
}
