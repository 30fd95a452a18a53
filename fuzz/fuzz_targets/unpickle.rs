//! The pickle VM on arbitrary bytes: any input gives a value tree or an error, never a
//! panic, a hang or unbounded memory.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ckptmap::formats::pth::unpickle::unpickle(data);
});
