//! Every ```sh block of README.md runs as written. The official checkpoints' URLs are
//! served by a loopback HTTP server (127.0.0.1): `mae_pretrain_vit_base.pth` is a ViT-B/16
//! of the official layout and size made by `ckptmap::synth`, the BEiT URL serves the tiny
//! BEiT fixture (same key layout). Blocks that need what a test cannot have (PyTorch, a
//! release build, the wheel tools) are skipped with the reason printed; ```text blocks are
//! synopses and not run.

use std::sync::Arc;

use crate::util::bin::cmd;
use crate::util::http::Server;
use crate::util::{fixture, root};

/// The hosts README's URLs name, and the file each of their names is served from.
const SERVED_PREFIXES: [&str; 2] =
    ["https://dl.fbaipublicfiles.com/mae/pretrain/", "https://unilm.blob.core.windows.net/beit/"];

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
        return Some(
            "the pip install block runs in scripts/test-wheel.sh (a step of .ci/run, where Python is present)",
        );
    }
    if has("make_reference.py") {
        return Some(
            "needs PyTorch, timm and SciPy; verify --reference runs on the committed references in tests/suite/cli.rs",
        );
    }
    None
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
    let server = Server::files(vec![
        ("mae_pretrain_vit_base.pth".into(), Arc::new(std::fs::read(&vit_b).unwrap())),
        ("beit_base_patch16_224_pt22k_ft22k.pth".into(), Arc::new(std::fs::read(fixture("beit_tiny_ft.pth")).unwrap())),
    ]);
    let base = server.base();

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
                    let p = SERVED_PREFIXES
                        .iter()
                        .find(|p| a.starts_with(**p))
                        .unwrap_or_else(|| panic!("README.md uses a URL this test does not serve: {a}"));
                    a.replacen(p, &format!("{base}/"), 1)
                })
                .collect();
            let out =
                cmd().args(&args).current_dir(&work).env("CKPTMAP_CACHE", dir.path().join("cache")).output().unwrap();
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
    let ckpt = ckptmap::formats::checkpoint::Checkpoint::open(&fixture("mae_tiny.pth")).unwrap();
    let root_name = ckptmap::inspect::find_state_dict(&ckpt).unwrap();
    let names: Vec<String> = ckpt.tensors_under(root_name).unwrap().into_iter().map(|t| t.name).collect();
    let blocks = names.iter().filter(|n| n.starts_with("blocks.") && n.ends_with(".norm1.weight")).count();
    assert!(
        readme.contains(&format!("`mae_tiny.pth` is a {blocks}-block MAE of width 32")),
        "README's fixture sentence does not say {blocks} blocks"
    );
}
