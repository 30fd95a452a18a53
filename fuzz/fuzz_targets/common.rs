//! Shared by the file-reading targets: the input goes to a file (in /dev/shm when it exists)
//! and is opened the way `ckptmap convert` opens a source, then everything convert would do
//! before writing is done to it: list and read every tensor, find the state dict, detect a
//! table and plan.

use std::path::PathBuf;

use ckptmap::formats::checkpoint::Checkpoint;

/// Reading stops after this many tensor bytes (the readers bound each tensor by the file).
const READ_BUDGET: usize = 64 << 20;

pub fn scratch_path(tag: &str) -> PathBuf {
    let dir = if std::path::Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    dir.join(format!("ckptmap-fuzz-{tag}-{}", std::process::id()))
}

pub fn open_and_walk(path: &std::path::Path, data: &[u8]) {
    std::fs::write(path, data).expect("scratch file");
    let Ok(ckpt) = Checkpoint::open(path) else { return };
    let mut budget = READ_BUDGET;
    for t in ckpt.tensors() {
        let n = t.view.nbytes();
        if n > budget {
            break;
        }
        budget -= n;
        // A view that opened reads, unless its bytes fail the zip's CRC-32 (the fuzzer
        // mutates storage bytes too): that is the one error a read may give.
        match ckpt.read(t.view) {
            Ok(bytes) => assert_eq!(bytes.len(), n),
            Err(e) => assert!(e.to_string().contains("is corrupt: its bytes have CRC-32"), "read error: {e}"),
        }
    }
    // What convert runs next to the writer.
    let tensors = ckpt.tensors();
    if let Err(e) = ckpt.check_crcs(tensors.iter()) {
        assert!(e.to_string().contains("is corrupt: its bytes have CRC-32"), "CRC check error: {e}");
    }
    let _ = ckptmap::inspect::inspect(&ckpt);
    if let Ok(choice) = ckptmap::job::choose_table(None, &ckpt) {
        let _ = ckptmap::job::prepare(&ckpt, choice.table(), &Default::default());
    }
}
