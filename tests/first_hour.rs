//! A user's first hour (issue 16): the mistakes a new user makes get one-line answers in
//! their words, nothing they own is lost, and the conventions of CLI tools hold (help,
//! dtype names, quiet mode, completions, man page, cache listing).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

fn ckptmap(args: &[&str]) -> Output {
    ckptmap_in(args, Path::new("."))
}

fn ckptmap_in(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ckptmap")).args(args).current_dir(dir).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = ckptmap(args);
    assert!(out.status.success(), "{args:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Exit 2 and one line on stderr; returns that line.
fn fails(args: &[&str]) -> String {
    let out = ckptmap(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {}{err}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(err.trim().lines().count(), 1, "{args:?}: not one line: {err}");
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn convert_refuses_to_write_over_its_input() {
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x.pth");
    std::fs::copy(fixture("mae_tiny.pth"), &x).unwrap();
    let original = std::fs::read(&x).unwrap();
    let link = dir.path().join("link.pth");
    std::os::unix::fs::symlink(&x, &link).unwrap();
    let hard = dir.path().join("hard.pth");
    std::fs::hard_link(&x, &hard).unwrap();
    let dotted = dir.path().join(".").join("x.pth");
    for dst in [&x, &link, &hard, &dotted] {
        for extra in [&[][..], &["--verify"][..], &["--img-size", "64"][..]] {
            let mut args = vec!["convert", s(&x), s(dst), "--num-heads", "2"];
            args.extend_from_slice(extra);
            let err = fails(&args);
            assert!(err.contains("is the input checkpoint itself") && err.contains("another path"), "{err}");
        }
        // The source given as the link, the destination as the file.
        let err = fails(&["convert", s(&link), s(&x), "--num-heads", "2"]);
        assert!(err.contains("is the input checkpoint itself"), "{err}");
    }
    assert_eq!(std::fs::read(&x).unwrap(), original);
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    let mut names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["hard.pth", "link.pth", "x.pth"]);
}

#[test]
fn convert_creates_missing_output_folders() {
    let dir = tempfile::tempdir().unwrap();
    let text = ok(&["convert", s(&fixture("mae_tiny.pth")), s(&dir.path().join("pretrain/sub/out.pth")), "--num-heads", "2"]);
    assert!(text.contains("out.pth"), "{text}");
    assert!(dir.path().join("pretrain/sub/out.pth").is_file());
    // A folder that cannot be made is named, with no hidden temporary file in the message.
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"x").unwrap();
    let err = fails(&["convert", s(&fixture("mae_tiny.pth")), s(&blocker.join("out.pth")), "--num-heads", "2"]);
    assert!(err.contains("cannot create the folder") && err.contains("file"), "{err}");
    assert!(!err.contains(".out.pth"), "{err}");
}
