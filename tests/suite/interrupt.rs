//! Nothing lost when anything fails (issue 7): a conversion that runs out of disk space, or
//! is interrupted by SIGTERM / SIGINT while it writes, leaves the previous file at DST
//! untouched and no temporary file behind.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::bin::cmd;
use crate::util::fixture;

const PREVIOUS: &[u8] = b"previous good file: must survive every failed conversion";

/// Every file in DST's folder but DST: temporaries of ours or of any library.
fn others(dst: &Path) -> Vec<String> {
    std::fs::read_dir(dst.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.as_str() != dst.file_name().unwrap())
        .collect()
}

/// Asserts the aftermath of a failed conversion: exit code, one line on stderr, the old
/// DST, no temporaries.
fn assert_nothing_lost(what: &str, out: &std::process::Output, code: i32, needle: &str, dst: &Path) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{what}: {err}");
    assert!(!err.contains("panicked"), "{what}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{what}: {err}");
    assert!(err.contains(needle), "{what}: {err}");
    let now = std::fs::read(dst).unwrap();
    assert!(now == PREVIOUS, "{what}: DST was replaced ({} bytes now)", now.len());
    assert!(others(dst).is_empty(), "{what}: files left next to DST: {:?}", others(dst));
}

/// A size-limited tmpfs mounted for the life of the value (root only).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_leaves_the_previous_file_and_no_temporary() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    // 256 KiB of space; the converted MAE fixture needs about 320 KB.
    let Some(_tmpfs) = Tmpfs::mount(&disk, "256k") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (not root?); the RLIMIT_FSIZE test still runs");
        return;
    };
    for name in ["out.pth", "out.safetensors"] {
        let dst = disk.join(name);
        std::fs::write(&dst, PREVIOUS).unwrap();
        let out = cmd().arg("convert").arg(fixture("mae_tiny.pth")).arg(&dst).output().unwrap();
        assert_nothing_lost(&format!("full tmpfs, {name}"), &out, 2, "No space left on device", &dst);
        std::fs::remove_file(&dst).unwrap();
    }
}

#[test]
fn a_file_size_limit_leaves_the_previous_file_and_no_temporary() {
    // RLIMIT_FSIZE makes writes past the limit fail (EFBIG) once SIGXFSZ no longer kills the
    // process: the same path as a full disk, without needing root.
    let dir = tempfile::tempdir().unwrap();
    for name in ["out.pth", "out.safetensors"] {
        let dst = dir.path().join(name);
        std::fs::write(&dst, PREVIOUS).unwrap();
        let out = Command::new("sh")
            .arg("-c")
            .arg("ulimit -f 200 && exec \"$0\" convert \"$1\" \"$2\"")
            .arg(env!("CARGO_BIN_EXE_ckptmap"))
            .arg(fixture("mae_tiny.pth"))
            .arg(&dst)
            .output()
            .unwrap();
        assert_nothing_lost(&format!("ulimit -f, {name}"), &out, 2, "File too large", &dst);
        std::fs::remove_file(&dst).unwrap();
    }
}

/// An MAE ViT-B/16 pretrain checkpoint with `depth` blocks (official key set and shapes,
/// zero weights): large enough that converting it takes a while.
fn write_big_mae(dest: &Path, depth: usize) {
    ckptmap::synth::write_synthetic(dest, &ckptmap::synth::mae_pretrain_layout(768, depth, 16), false).unwrap();
}

fn kill(signal: &str, pid: u32) {
    let sent = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().unwrap();
    assert!(sent.success(), "kill -{signal} {pid}");
}

/// The child's output files in `dir` that are not in place yet: anonymous temporaries
/// (`O_TMPFILE`, which /proc shows as `dir/#inode (deleted)`) or named `.tmp` ones.
fn unfinished_outputs(pid: u32, dir: &Path) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return 0 };
    fds.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.starts_with(dir))
        .filter(|t| {
            let t = t.to_string_lossy();
            t.ends_with(" (deleted)") || t.ends_with(".tmp")
        })
        .count()
}

/// Bytes the process has passed to write calls so far (`wchar` in /proc/PID/io).
fn bytes_written(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    io.lines().find_map(|l| l.strip_prefix("wchar:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// Starts `convert SRC DST --dtype f16`, waits until its output is being written, freezes it
/// (SIGSTOP), checks that it is indeed mid-write (its temporary output open, DST unchanged),
/// sends `signal` and lets it run on (SIGCONT). `None` when the conversion had already
/// finished by the time it was frozen (then the caller tries again).
fn interrupt(src: &Path, dst: &Path, signal: &str) -> Option<std::process::Output> {
    let dir = dst.parent().unwrap();
    let child = cmd()
        .arg("convert")
        .arg(src)
        .arg(dst)
        .args(["--dtype", "f16"])
        .env("RUST_BACKTRACE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let start = Instant::now();
    // Wait until the output is being written: a temporary is open and data has gone out.
    while !(unfinished_outputs(pid, dir) > 0 && bytes_written(pid) > 1 << 20) {
        assert!(start.elapsed() < Duration::from_secs(120), "the conversion never started writing");
        std::thread::sleep(Duration::from_millis(1));
    }
    kill("STOP", pid);
    let mid_write = unfinished_outputs(pid, dir) > 0 && std::fs::read(dst).unwrap() == PREVIOUS;
    if mid_write {
        kill(signal, pid);
    }
    kill("CONT", pid);
    let out = child.wait_with_output().unwrap();
    if mid_write {
        Some(out)
    } else {
        std::fs::write(dst, PREVIOUS).unwrap();
        None
    }
}

/// A temporary folder with a 6-block ViT-B MAE checkpoint and an empty `out` folder.
fn big_source_and_out_dir() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big_mae.pth");
    write_big_mae(&src, 6);
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    (dir, src, out_dir)
}

#[test]
fn sigterm_and_sigint_mid_write_leave_the_previous_file_and_no_temporary() {
    let (_dir, src, out_dir) = big_source_and_out_dir();
    for (signal, code) in [("TERM", 143), ("INT", 130)] {
        for name in ["big.pth", "big.safetensors"] {
            let dst = out_dir.join(name);
            std::fs::write(&dst, PREVIOUS).unwrap();
            let out =
                (0..5).find_map(|_| interrupt(&src, &dst, signal)).expect("never caught the conversion mid-write");
            let what = format!("SIG{signal} during {name}");
            assert_nothing_lost(&what, &out, code, &format!("interrupted by SIG{signal}"), &dst);
            assert!(String::from_utf8_lossy(&out.stderr).contains(name), "{what}: the message names DST");
            std::fs::remove_file(&dst).unwrap();
        }
    }
}

/// SIGKILL cannot be handled: nothing is cleaned up. The output is an anonymous file
/// (O_TMPFILE) until it is complete, so the kernel frees it with the process.
#[test]
fn sigkill_mid_write_leaves_the_previous_file_and_nothing_else() {
    let (_dir, src, out_dir) = big_source_and_out_dir();
    if !ckptmap::write::atomic::anonymous_supported(&out_dir) {
        eprintln!("SKIPPED: {} cannot hold O_TMPFILE files; a SIGKILL there leaves a .tmp file", out_dir.display());
        return;
    }
    for name in ["big.pth", "big.safetensors"] {
        let dst = out_dir.join(name);
        std::fs::write(&dst, PREVIOUS).unwrap();
        let out = (0..5).find_map(|_| interrupt(&src, &dst, "KILL")).expect("never caught the conversion mid-write");
        assert_eq!(out.status.signal(), Some(9), "SIGKILL during {name}");
        assert!(std::fs::read(&dst).unwrap() == PREVIOUS, "SIGKILL during {name}: DST was replaced");
        assert!(others(&dst).is_empty(), "SIGKILL during {name}: files left next to DST: {:?}", others(&dst));
        std::fs::remove_file(&dst).unwrap();
    }
}

#[test]
fn safetensors_layout_matches_the_crate_byte_for_byte() {
    // We write safetensors into our own temporary file (the crate's serialize_to_file makes
    // a second temporary of its own, which an interrupt would leave behind); the bytes must
    // still be the crate's.
    use ckptmap::DType;
    let specs: Vec<(&str, DType, Vec<usize>)> = vec![
        ("b.weight", DType::F32, vec![3, 2]),
        ("a.index", DType::I64, vec![4]),
        ("c.half", DType::F16, vec![5]),
        ("a.weight", DType::F32, vec![1]),
        ("flag", DType::Bool, vec![2]),
        ("bf", DType::BF16, vec![3]),
    ];
    let bytes = |i: usize| vec![i as u8 + 1; specs[i].2.iter().product::<usize>() * specs[i].1.size()];
    let refs: Vec<(&str, DType, &[usize])> = specs.iter().map(|(n, d, s)| (*n, *d, s.as_slice())).collect();
    let layout = ckptmap::write::safetensors::safetensors_layout(&refs).unwrap();
    let mut ours = layout.head.clone();
    for &i in &layout.order {
        ours.extend(bytes(i));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = (0..specs.len())
        .map(|i| {
            let (n, d, s) = &specs[i];
            let data: &'static [u8] = Box::leak(bytes(i).into_boxed_slice());
            (n.to_string(), safetensors::tensor::TensorView::new(d.safetensors_code(), s.clone(), data).unwrap())
        })
        .collect();
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let theirs = safetensors::serialize(views, Some(meta)).unwrap();
    assert!(ours == theirs, "ours {} bytes, theirs {} bytes", ours.len(), theirs.len());
}
