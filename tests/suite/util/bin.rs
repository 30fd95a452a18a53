//! The `ckptmap` binary under test (`CARGO_BIN_EXE_ckptmap`), run with arguments.

use std::path::Path;
use std::process::{Command, Output};

/// A `Command` for the binary, for what the helpers below do not cover (environment,
/// spawning, `Path` arguments).
pub fn cmd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ckptmap"))
}

/// Runs the binary in the current folder.
pub fn ckptmap(args: &[&str]) -> Output {
    cmd().args(args).output().unwrap()
}

/// Success required; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let out = ckptmap(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Exit 2 and one line on stderr; returns that line.
pub fn fails(args: &[&str]) -> String {
    let out = ckptmap(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {}{err}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(err.trim().lines().count(), 1, "{args:?}: not one line: {err}");
    err
}

/// Both streams of a run, for assertion messages.
pub fn text(out: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A path as an argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
