//! Helpers the topics share: where the fixtures are, files and folders made for a test,
//! and the pieces several topics build checkpoints or tables from. The `ckptmap` binary
//! runner is [`bin`], the loopback HTTP server [`http`], the pickle builder [`pickle`].

use std::fs;
use std::path::{Path, PathBuf};

pub mod bin;
pub mod http;
pub mod pickle;

/// The repository root (`CARGO_MANIFEST_DIR`).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `fixtures/<name>` (a file or a folder; `name` may hold slashes).
/// `fixtures/layouts/`: the checkpoints of every source layout (HF, mmpretrain, MMSeg) with
/// their real-library references and manifest.json.
pub fn layouts() -> PathBuf {
    root().join("fixtures").join("layouts")
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("fixtures").join(name)
}

/// Writes `bytes` to `dir/name` and returns the path.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, bytes).unwrap();
    p
}

/// The names in a folder, sorted (hidden ones included).
pub fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

/// Bytes that look random (a fixed LCG) and are no checkpoint.
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect()
}

/// MMSeg's ViT-B backbone at 512 (`arch` "mae" or "beit"): names, shapes and order, from
/// `fixtures/mmseg_vit_b_512_keys.json` (written independently in fixtures/make_fixtures.py).
pub fn mmseg_vit_b_512_keys(arch: &str) -> Vec<(String, Vec<usize>)> {
    let j: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(fixture("mmseg_vit_b_512_keys.json")).unwrap()).unwrap();
    serde_json::from_value(j[arch].clone()).unwrap()
}

/// The built-in MAE table with norm1 and norm2 swapped: it plans fine (same shapes) and
/// computes something else, so --verify must catch it.
pub fn swapped_norm_table() -> String {
    let table = ckptmap::mapping::table::builtin_table_text("mae").unwrap();
    let rule = "match = 'blocks\\.(\\d+)\\.norm([12])\\.(weight|bias)'\nrename = \"layers.${1}.ln${2}.${3}\"";
    assert!(table.contains(rule), "the built-in mae table changed; update this test's rule text");
    table.replace(
        rule,
        "match = 'blocks\\.(\\d+)\\.norm1\\.(weight|bias)'\nrename = \"layers.${1}.ln2.${2}\"\n\n[[rule]]\nid = \"swapped-norm2\"\nmatch = 'blocks\\.(\\d+)\\.norm2\\.(weight|bias)'\nrename = \"layers.${1}.ln1.${2}\"",
    )
}
