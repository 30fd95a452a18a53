//! The .pth readers (zip container and legacy stream) through `Checkpoint::open`, on a file
//! holding the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    thread_local!(static PATH: std::path::PathBuf = common::scratch_path("container"));
    PATH.with(|p| common::open_and_walk(p, data));
});
