//! The safetensors reader, directly and through `Checkpoint::open`, on a file holding the
//! input.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    thread_local!(static PATH: std::path::PathBuf = common::scratch_path("safetensors"));
    PATH.with(|p| {
        std::fs::write(p, data).expect("scratch file");
        if let Ok(f) = std::fs::File::open(p) {
            let _ = ckptmap::formats::safetensors::read_safetensors(&f);
        }
        common::open_and_walk(p, data);
    });
});
