//! A user's first hour (issue 16): the mistakes a new user makes get one-line answers in
//! their words, nothing they own is lost, and the conventions of CLI tools hold (help,
//! dtype names, quiet mode, completions, man page, cache listing).

use crate::util::bin::{ckptmap, cmd, fails, ok, s};
use crate::util::http::serve_https;
use crate::util::{fixture, root};

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
    let text =
        ok(&["convert", s(&fixture("mae_tiny.pth")), s(&dir.path().join("pretrain/sub/out.pth")), "--num-heads", "2"]);
    assert!(text.contains("out.pth"), "{text}");
    assert!(dir.path().join("pretrain/sub/out.pth").is_file());
    // A folder that cannot be made is named, with no hidden temporary file in the message.
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"x").unwrap();
    let err = fails(&["convert", s(&fixture("mae_tiny.pth")), s(&blocker.join("out.pth")), "--num-heads", "2"]);
    assert!(err.contains("cannot create the folder") && err.contains("file"), "{err}");
    assert!(!err.contains(".out.pth"), "{err}");
}

/// A certificate the client does not trust cannot heal: one connection, a hint naming the
/// trust store and SSL_CERT_FILE, no retries; with SSL_CERT_FILE naming the CA it works.
#[test]
fn untrusted_tls_certificate_fails_at_once_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let (base, count) = serve_https(std::fs::read(fixture("mae_tiny.pth")).unwrap());
    let url = format!("{base}/mae_tiny.pth");
    let cache = dir.path().join("cache");
    let start = std::time::Instant::now();
    let out = cmd()
        .args(["inspect", &url, "--cache-dir", s(&cache)])
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("certificate") && err.contains("SSL_CERT_FILE") && err.contains("trust store"), "{err}");
    assert!(!err.contains("gave up"), "{err}");
    assert!(start.elapsed() < std::time::Duration::from_secs(3), "took {:?}", start.elapsed());
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1, "retried a certificate error");

    let out = cmd()
        .args(["inspect", &url, "--cache-dir", s(&cache)])
        .env("SSL_CERT_FILE", root().join("tests/data/tls/ca.pem"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("state dict"), "{text}");
}

/// Bad option values are answered in the option's terms, not the mapping table's.
#[test]
fn bad_option_values_say_what_was_passed_and_what_works() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.pth");
    let (mae, beit) = (fixture("mae_tiny.pth"), fixture("beit_tiny_ft.pth"));
    let cases: [(&[&str], &[&str]); 5] = [
        (
            &["convert", s(&mae), s(&out), "--num-heads", "2", "--img-size", "100"],
            &["--img-size 100", "multiple of", "patch size 16", "96 and 112"],
        ),
        (&["convert", s(&beit), s(&out), "--img-size", "100"], &["--img-size 100", "96 and 112"]),
        (&["convert", s(&beit), s(&out), "--img-size", "8"], &["--img-size 8", "smallest that works is 16"]),
        (&["convert", s(&mae), s(&out), "--num-heads", "3"], &["--num-heads 3", "width 32", "1, 2, 4, 8, 16, 32"]),
        (&["convert", s(&beit), s(&out), "--num-heads", "4"], &["--num-heads 4", "tables have 2 heads"]),
    ];
    for (args, needles) in cases {
        let err = fails(args);
        for n in needles {
            assert!(err.contains(n), "{args:?}: no {n:?} in {err}");
        }
        for internal in ["option(", "shape(", "2 * grid", "dim % heads", "rule '"] {
            assert!(!err.contains(internal), "{args:?}: table internals in {err}");
        }
        assert!(!out.exists());
    }
    // verify's own --num-heads too.
    let conv = dir.path().join("conv.pth");
    ok(&["convert", s(&mae), s(&conv), "--num-heads", "2"]);
    let err = fails(&["verify", s(&conv), "--against", s(&mae), "--num-heads", "3"]);
    assert!(err.contains("--num-heads 3") && err.contains("1, 2, 4, 8, 16, 32"), "{err}");
}

/// A file that is already in the MMSeg layout says so, instead of asking for --mapping.
#[test]
fn an_already_converted_file_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let conv = dir.path().join("conv.pth");
    ok(&["convert", s(&fixture("mae_tiny.pth")), s(&conv), "--num-heads", "2"]);
    // Issue 15: an already-MMSeg file is recognised (table mmseg-mae) and still converts
    // (clean / cast / load-ready), saying that it is already in the MMSeg layout.
    let out = ok(&["convert", s(&conv), s(&dir.path().join("again.pth"))]);
    assert!(
        out.contains("already in the MMSeg MAE layout")
            && out.contains("layers.0.ln1.weight")
            && out.contains("mmseg-mae"),
        "{out}"
    );
}

fn help(args: &[&str]) -> String {
    let mut a = args.to_vec();
    a.push("--help");
    ok(&a)
}

#[test]
fn help_groups_download_options_and_names_values_in_the_users_words() {
    for cmd in ["convert", "inspect", "verify", "batch"] {
        let text = help(&[cmd]);
        let heading = text.find("Download options").unwrap_or_else(|| panic!("{cmd}: no download heading:\n{text}"));
        let cache = text.find("--cache-dir").unwrap();
        assert!(cache > heading, "{cmd}: --cache-dir is not under the download heading:\n{text}");
        assert!(text.contains("XDG_CACHE_HOME"), "{cmd}: cache location not said");
    }
    for cmd in ["mappings", "diff", "completions", "man"] {
        let text = help(&[cmd]);
        for flag in ["Download options", "--cache-dir", "--retries", "--sha256", "--timeout"] {
            assert!(!text.contains(flag), "{cmd} --help shows {flag}:\n{text}");
        }
    }
    let convert = help(&["convert"]);
    for name in
        ["--img-size <PIXELS>", "--num-heads <N>", "--dtype <DTYPE>", "--mapping <NAME|FILE>", "--timeout <SECONDS>"]
    {
        assert!(convert.contains(name), "convert --help lacks {name}:\n{convert}");
    }
    let diff = help(&["diff"]);
    assert!(diff.contains("The first checkpoint") && diff.contains("The second checkpoint"), "{diff}");
    assert!(ok(&["--help"]).contains("cache list"));
}

#[test]
fn dtype_accepts_the_names_torch_users_write() {
    let dir = tempfile::tempdir().unwrap();
    let mae = fixture("mae_tiny.pth");
    for (names, want) in [
        (&["float16", "fp16", "half", "torch.float16", "F16"][..], "f16"),
        (&["bfloat16", "bf16"][..], "bf16"),
        (&["float32", "fp32", "float"][..], "f32"),
    ] {
        for n in names {
            let out = dir.path().join(format!("{n}.pth"));
            ok(&["convert", s(&mae), s(&out), "--num-heads", "2", "--dtype", n]);
            let text = ok(&["inspect", s(&out), "--json"]);
            let j: serde_json::Value = serde_json::from_str(&text).unwrap();
            let w = j["tensors"].as_array().unwrap().iter().find(|t| t["name"] == "layers.0.ln1.weight").unwrap();
            assert_eq!(w["dtype"], want, "--dtype {n}");
        }
    }
    let r = ckptmap(&["convert", s(&mae), s(&dir.path().join("x.pth")), "--dtype", "int8"]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2));
    assert!(err.contains("float16 (fp16, half)"), "{err}");
}

#[test]
fn verify_without_a_reference_names_both_options() {
    let err = fails(&["verify", s(&fixture("mae_tiny.pth"))]);
    assert!(err.contains("--reference") && err.contains("--against"), "{err}");
}

#[test]
fn quiet_prints_nothing_but_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mae = fixture("mae_tiny.pth");
    let out = dir.path().join("o.pth");
    let resized = dir.path().join("r.pth");
    for args in [
        vec!["convert", s(&mae), s(&out), "--num-heads", "2", "-q"],
        vec!["-q", "convert", s(&mae), s(&resized), "--num-heads", "2", "--verify", "--img-size", "64"],
        vec!["verify", s(&out), "--against", s(&mae), "--num-heads", "2", "--quiet"],
        vec!["inspect", s(&mae), "-q"],
        vec!["cache", "list", "-q", "--cache-dir", s(dir.path())],
    ] {
        let r = ckptmap(&args);
        assert!(r.status.success(), "{args:?}: {}", String::from_utf8_lossy(&r.stderr));
        assert!(
            r.stdout.is_empty() && r.stderr.is_empty(),
            "{args:?} printed: {}{}",
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        );
    }
    // --json documents are what was asked for: still printed.
    let r = ckptmap(&["inspect", s(&mae), "-q", "--json"]);
    assert!(serde_json::from_slice::<serde_json::Value>(&r.stdout).is_ok());
    // Errors still show.
    let r = ckptmap(&["convert", s(&dir.path().join("none.pth")), s(&out), "-q"]);
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).starts_with("error: "));
}

/// With --img-size and --verify the note on the unresized check comes after the summary,
/// next to the figures it qualifies, and says what the check covers.
#[test]
fn resized_verify_note_follows_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    let text = ok(&[
        "convert",
        s(&fixture("mae_tiny.pth")),
        s(&dir.path().join("o.pth")),
        "--num-heads",
        "2",
        "--img-size",
        "64",
        "--verify",
    ]);
    let summary = text.find(" -> ").unwrap();
    let note = text.find("without resizing").unwrap_or_else(|| panic!("{text}"));
    let checked = text.find("checked against").unwrap();
    assert!(summary < note && note < checked, "{text}");
    let line = text.lines().find(|l| l.contains("without resizing")).unwrap();
    assert!(line.contains("checks every tensor's mapping") && line.contains("resizes themselves"), "{line}");
}

/// Forward passes run silently when stderr is not a terminal (the spinner is for terminals).
#[test]
fn no_spinner_when_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.pth");
    let r = ckptmap(&["convert", s(&fixture("mae_tiny.pth")), s(&out), "--num-heads", "2", "--verify"]);
    assert!(r.status.success() && r.stderr.is_empty(), "{}", String::from_utf8_lossy(&r.stderr));
    let r = ckptmap(&["verify", s(&out), "--against", s(&fixture("mae_tiny.pth")), "--num-heads", "2"]);
    assert!(r.status.success() && r.stderr.is_empty(), "{}", String::from_utf8_lossy(&r.stderr));
}

/// With a terminal on stderr (`script` gives one), a verify run shows the spinner; -q and
/// --json do not.
#[test]
fn spinner_on_a_terminal_unless_quiet_or_json() {
    if std::process::Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: `script` (util-linux) is not installed, so no terminal can be made");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.pth");
    ok(&["convert", s(&fixture("mae_tiny.pth")), s(&out), "--num-heads", "2"]);
    let run = |extra: &str| {
        let cmd = format!(
            "{} verify {} --against {} --num-heads 2 {extra} >/dev/null",
            env!("CARGO_BIN_EXE_ckptmap"),
            s(&out),
            s(&fixture("mae_tiny.pth"))
        );
        let r = std::process::Command::new("script").args(["-qec", &cmd, "/dev/null"]).output().unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stdout));
        String::from_utf8_lossy(&r.stdout).to_string()
    };
    assert!(run("").contains("running the forward passes"), "no spinner on a terminal");
    assert!(!run("-q").contains("forward passes"));
    assert!(!run("--json").contains("forward passes"));
}

#[test]
fn inspect_shows_safetensors_metadata_and_the_url() {
    let text = ok(&["inspect", s(&fixture("mae_tiny.safetensors"))]);
    assert!(text.contains("__metadata__") && text.contains("format: pt"), "{text}");
    let j: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", s(&fixture("mae_tiny.safetensors")), "--json"])).unwrap();
    assert_eq!(j["metadata"]["format"], "pt");
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = serve_https(std::fs::read(fixture("mae_tiny.pth")).unwrap());
    let url = format!("{base}/mae_tiny.pth");
    let ca = root().join("tests/data/tls/ca.pem");
    let out = cmd().args(["inspect", &url, "--cache-dir", s(dir.path())]).env("SSL_CERT_FILE", &ca).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("url:        {url}")) && text.contains(s(dir.path())), "{text}");
    let out = cmd()
        .args(["inspect", &url, "--cache-dir", s(dir.path()), "--json"])
        .env("SSL_CERT_FILE", &ca)
        .output()
        .unwrap();
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["url"], url.as_str());

    // ... and `cache list` / `cache clean` show and remove it.
    let list = ok(&["cache", "list", "--cache-dir", s(dir.path())]);
    assert!(list.contains(&url) && list.contains("1 files"), "{list}");
    let j: serde_json::Value =
        serde_json::from_str(&ok(&["cache", "list", "--json", "--cache-dir", s(dir.path())])).unwrap();
    assert_eq!(j["files"][0]["url"], url.as_str());
    std::fs::write(dir.path().join("keep-me.txt"), b"not a cache entry").unwrap();
    let other = "https://example.invalid/other.pth";
    let cleaned = ok(&["cache", "clean", other, "--cache-dir", s(dir.path())]);
    assert!(cleaned.contains("0 files removed"), "{cleaned}");
    let cleaned = ok(&["cache", "clean", "--cache-dir", s(dir.path())]);
    assert!(cleaned.contains(&url) && cleaned.contains("1 files removed"), "{cleaned}");
    assert!(ok(&["cache", "list", "--cache-dir", s(dir.path())]).contains("0 files"));
    assert!(dir.path().join("keep-me.txt").is_file(), "cache clean removed a file that is not a cache entry");
}

#[test]
fn diff_compares_values_across_dtypes() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.pth"), dir.path().join("b.pth"));
    ok(&["convert", s(&fixture("mae_tiny.pth")), s(&a), "--num-heads", "2"]);
    ok(&["convert", s(&fixture("mae_tiny.pth")), s(&b), "--num-heads", "2", "--dtype", "f16"]);
    let r = ckptmap(&["diff", s(&a), s(&b)]);
    assert_eq!(r.status.code(), Some(1));
    let text = String::from_utf8_lossy(&r.stdout);
    let line = text.lines().find(|l| l.contains("layers.0.ln1.weight")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("f32 vs f16") && line.contains("max abs diff") && line.contains("max rel"), "{line}");
    let j: serde_json::Value = serde_json::from_slice(&ckptmap(&["diff", s(&a), s(&b), "--json"]).stdout).unwrap();
    let d = j["dtype_diffs"].as_array().unwrap();
    assert_eq!(d.len(), 52);
    let worst = d.iter().map(|x| x["max_rel_diff"].as_f64().unwrap()).fold(0.0, f64::max);
    assert!(worst > 0.0 && worst < 1e-3, "f16 rounding is about 5e-4 relative: {worst}");
}

#[test]
fn json_uses_the_names_the_cli_uses() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.pth");
    ok(&["convert", s(&fixture("mae_tiny.pth")), s(&out), "--num-heads", "2"]);
    let j: serde_json::Value = serde_json::from_str(&ok(&[
        "verify",
        s(&out),
        "--against",
        s(&fixture("mae_tiny.pth")),
        "--num-heads",
        "2",
        "--json",
    ]))
    .unwrap();
    assert_eq!(j["arch"], "mae");
    let text = ok(&["verify", s(&out), "--against", s(&fixture("mae_tiny.pth")), "--num-heads", "2"]);
    assert!(text.contains("(mae, img_size"), "{text}");
}

#[test]
fn completions_and_man_page_come_from_the_cli_definition() {
    let bash = ok(&["completions", "bash"]);
    assert!(
        bash.contains("_ckptmap") && bash.contains("--img-size") && bash.contains("cache"),
        "bash completion incomplete"
    );
    for shell in ["zsh", "fish"] {
        assert!(ok(&["completions", shell]).contains("img-size"), "{shell}");
    }
    let man = ok(&["man"]);
    assert!(man.contains(".TH ckptmap 1") && man.contains("convert"), "{man}");
}
