//! `ckptmap batch` end to end against a loopback HTTP server (no internet): good, missing,
//! wrong-hash, corrupt and badly converted items in one list; the report, the outputs, the
//! exit code; a rerun that skips what is done and retries what failed; list errors.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::time::Duration;

use ckptmap::batch::{parse_list, ListItem, Source};
use ckptmap::formats::checkpoint::Checkpoint;
use serde_json::Value;

use crate::util::bin::{ckptmap, cmd, text};
use crate::util::http::Server;
use crate::util::{fixture, names_in, noise, sha256_hex, swapped_norm_table};

fn report(dir: &Path) -> Value {
    serde_json::from_slice(&fs::read(dir.join("report.json")).unwrap()).unwrap()
}

fn item<'a>(report: &'a Value, output: &str) -> &'a Value {
    report["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["output"] == output)
        .unwrap_or_else(|| panic!("no item {output} in {report:#}"))
}

// ---------------------------------------------------------------------------------------
// The list parser

#[test]
fn list_syntax() {
    let list = Path::new("/lists/zoo.txt");
    let hex = "AB".repeat(32);
    let text = format!(
        "# a comment\n\
         \n\
         https://example.com/mae/mae_pretrain_vit_base.pth   # trailing comment\n\
         \thttps://example.com/x/beit.pth?sig=1#frag name=beit_b.safetensors mapping=beit sha256={hex}\n\
         local/ckpt.pth mapping=tables/my.toml\n\
         /abs/other.pth name=o.pth\n"
    );
    let items = parse_list(&text, list).unwrap();
    let expected = vec![
        ListItem {
            line: 3,
            source: Source::Url("https://example.com/mae/mae_pretrain_vit_base.pth".into()),
            output: "mae_pretrain_vit_base_mmseg.pth".into(),
            mapping: None,
            sha256: None,
        },
        ListItem {
            line: 4,
            source: Source::Url("https://example.com/x/beit.pth?sig=1#frag".into()),
            output: "beit_b.safetensors".into(),
            mapping: Some("beit".into()),
            sha256: Some(hex.to_ascii_lowercase()),
        },
        ListItem {
            line: 5,
            source: Source::Path("/lists/local/ckpt.pth".into()),
            output: "ckpt_mmseg.pth".into(),
            mapping: Some("/lists/tables/my.toml".into()),
            sha256: None,
        },
        ListItem {
            line: 6,
            source: Source::Path("/abs/other.pth".into()),
            output: "o.pth".into(),
            mapping: None,
            sha256: None,
        },
    ];
    assert_eq!(items, expected);
    assert_eq!(parse_list("# nothing\n\n   \n", list).unwrap(), vec![]);

    // Each bad line names the file and its line; the message says what is wrong.
    let bad = [
        ("a.pth name", "not a key=value field"),
        ("a.pth color=red", "unknown field \"color\""),
        ("a.pth name=b.pth name=c.pth", "name= given twice"),
        ("a.pth name=", "name= has no value"),
        ("a.pth sha256=abc", "not 64 hex digits"),
        ("a.pth name=sub/b.pth", "must be a file name"),
        ("a.pth name=b.txt", "must end in .pth"),
        ("a.pth name=report.json", "report"),
        ("ftp://host/a.pth", "not an http(s) URL"),
        ("https://host/", "cannot name an output"),
        ("https://host/dir/a.pth\nb/a.pth", "also written by line 2"),
    ];
    for (line, message) in bad {
        let text = format!("# header\n{line}\n");
        let e = parse_list(&text, list).unwrap_err();
        let last = text.lines().count();
        assert_eq!(e.line, last, "{line:?}: {e}");
        assert!(e.to_string().starts_with(&format!("/lists/zoo.txt:{last}: ")), "{e}");
        assert!(e.message.contains(message), "{line:?}: {e}");
    }
}

// ---------------------------------------------------------------------------------------
// End to end

#[test]
fn mixed_list_reports_each_item_and_a_rerun_skips_the_good_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, cache, out) = (tmp.path(), tmp.path().join("cache"), tmp.path().join("out"));
    let mae = fs::read(fixture("mae_tiny.pth")).unwrap();
    let beit = fs::read(fixture("beit_tiny_pt.pth")).unwrap();
    let server = Server::routes(HashMap::from([
        ("/mae/mae_tiny.pth".to_string(), mae.clone()),
        ("/beit/beit_tiny_pt.pth".to_string(), beit.clone()),
        ("/beit/beit_copy.pth".to_string(), beit.clone()),
        ("/corrupt.pth".to_string(), noise(100_000, 0x2545_F491_4F6C_DD1D)),
    ]));
    fs::create_dir(dir.join("local")).unwrap();
    fs::write(dir.join("local/mae_copy.pth"), &mae).unwrap();
    fs::write(dir.join("swapped.toml"), swapped_norm_table()).unwrap();
    let list = format!(
        "# good: two downloads and a local file\n\
         {mae_url}\n\
         {beit_url} name=beit_pt.safetensors\n\
         {local_ft}\n\
         # bad: 404, wrong sha256, not a checkpoint, a table that computes something else\n\
         {missing}\n\
         {copy} name=beit_wrong_hash.pth sha256={zeros}\n\
         {corrupt}\n\
         local/mae_copy.pth mapping=swapped.toml\n",
        mae_url = server.url("/mae/mae_tiny.pth"),
        beit_url = server.url("/beit/beit_tiny_pt.pth"),
        local_ft = fixture("beit_tiny_ft.pth").display(),
        missing = server.url("/missing.pth"),
        copy = server.url("/beit/beit_copy.pth"),
        zeros = "0".repeat(64),
        corrupt = server.url("/corrupt.pth"),
    );
    let list_path = dir.join("zoo.txt");
    fs::write(&list_path, list).unwrap();
    let args = [
        "batch",
        list_path.to_str().unwrap(),
        "--out-dir",
        out.to_str().unwrap(),
        "-j",
        "3",
        "--verify",
        "--num-heads",
        "2",
        "--cache-dir",
        cache.to_str().unwrap(),
        "--retries",
        "1",
        "--timeout",
        "10",
    ];

    let run = ckptmap(&args);
    assert_eq!(run.status.code(), Some(1), "{}", text(&run));
    let good = ["mae_tiny_mmseg.pth", "beit_pt.safetensors", "beit_tiny_ft_mmseg.pth"];
    let bad = ["missing_mmseg.pth", "beit_wrong_hash.pth", "corrupt_mmseg.pth", "mae_copy_mmseg.pth"];
    // Only finished outputs and the report: no staging folder, no temporary files.
    let mut expected: Vec<String> =
        good.iter().map(|s| s.to_string()).chain([".ckptmap-batch.lock".into(), "report.json".into()]).collect();
    expected.sort();
    assert_eq!(names_in(&out), expected);
    let stdout = String::from_utf8_lossy(&run.stdout);
    for name in good.iter().chain(&bad) {
        assert!(stdout.contains(name), "table lacks {name}:\n{stdout}");
    }
    assert!(stdout.contains("7 items: 3 converted, 0 skipped, 4 failed"), "{stdout}");

    let r = report(&out);
    assert_eq!(r["complete"], true);
    assert_eq!(r["summary"]["failed"], 4);
    for name in good {
        let it = item(&r, name);
        assert_eq!(it["status"], "converted", "{it:#}");
        assert!(it["error"].is_null(), "{it:#}");
        let path = out.join(name);
        let bytes = fs::read(&path).unwrap();
        assert_eq!(it["output_sha256"], sha256_hex(&bytes), "{name}");
        assert_eq!(it["output_bytes"], bytes.len() as u64);
        // It reads back with the planned number of tensors.
        let back = Checkpoint::open(&path).unwrap();
        assert_eq!(back.tensors().len() as u64, it["plan"]["outputs"].as_u64().unwrap(), "{name}");
        assert!(it["plan"]["dropped"].as_u64().unwrap() > 0);
        assert_eq!(it["verify"]["passed"], true, "{it:#}");
        assert_eq!(it["verify"]["subject"], "output");
        assert!(it["verify"]["max_rel"].as_f64().unwrap() <= 1e-4);
        assert!(!it["verify"]["outcome"]["outputs"].as_array().unwrap().is_empty());
    }
    assert_eq!(item(&r, "mae_tiny_mmseg.pth")["input"]["sha256"], sha256_hex(&mae));
    assert_eq!(item(&r, "mae_tiny_mmseg.pth")["source"], server.url("/mae/mae_tiny.pth"));
    assert_eq!(item(&r, "mae_tiny_mmseg.pth")["mapping"], "builtin:mae");
    assert_eq!(item(&r, "beit_pt.safetensors")["input"]["sha256"], sha256_hex(&beit));
    assert_eq!(item(&r, "beit_pt.safetensors")["mapping"], "builtin:beit");
    assert_eq!(item(&r, "beit_pt.safetensors")["plan"]["container"], "model");
    assert_eq!(item(&r, "beit_tiny_ft_mmseg.pth")["source"], fixture("beit_tiny_ft.pth").display().to_string());

    let failure = |name: &str, stage: &str, message: &str| {
        let it = item(&r, name);
        assert_eq!(it["status"], "failed", "{it:#}");
        assert_eq!(it["error"]["stage"], stage, "{it:#}");
        assert!(it["error"]["message"].as_str().unwrap().contains(message), "{it:#}");
        assert!(it["output_sha256"].is_null());
    };
    failure("missing_mmseg.pth", "input", "HTTP 404");
    failure("beit_wrong_hash.pth", "input", "sha256 mismatch");
    failure("corrupt_mmseg.pth", "read", "");
    failure("mae_copy_mmseg.pth", "verify", "do not compute what the original computes");
    let swapped = item(&r, "mae_copy_mmseg.pth");
    assert_eq!(swapped["verify"]["passed"], false);
    assert!(swapped["verify"]["max_rel"].as_f64().unwrap() > 1e-3, "{swapped:#}");
    assert!(swapped["mapping"].as_str().unwrap().ends_with("swapped.toml"));

    // The same command again: the good items are skipped without a request, the failures
    // are retried (the corrupt file comes from the cache, so it needs no request either).
    let before: HashMap<&str, usize> =
        ["/mae/mae_tiny.pth", "/beit/beit_tiny_pt.pth", "/missing.pth", "/beit/beit_copy.pth"]
            .into_iter()
            .map(|p| (p, server.hits(p)))
            .collect();
    assert_eq!(before["/mae/mae_tiny.pth"], 1);
    let mtimes: Vec<_> = good.iter().map(|n| fs::metadata(out.join(n)).unwrap().modified().unwrap()).collect();
    let again = ckptmap(&args);
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));
    assert_eq!(server.hits("/mae/mae_tiny.pth"), before["/mae/mae_tiny.pth"]);
    assert_eq!(server.hits("/beit/beit_tiny_pt.pth"), before["/beit/beit_tiny_pt.pth"]);
    assert_eq!(server.hits("/missing.pth"), before["/missing.pth"] + 1);
    assert_eq!(server.hits("/beit/beit_copy.pth"), before["/beit/beit_copy.pth"] + 1);
    let r2 = report(&out);
    for (name, mtime) in good.iter().zip(&mtimes) {
        let it = item(&r2, name);
        assert_eq!(it["status"], "skipped", "{it:#}");
        assert_eq!(it["output_sha256"], item(&r, name)["output_sha256"]);
        assert_eq!(it["verify"]["passed"], true);
        assert_eq!(&fs::metadata(out.join(name)).unwrap().modified().unwrap(), mtime, "{name} was rewritten");
    }
    for name in bad {
        assert_eq!(item(&r2, name)["status"], "failed");
        assert!(!out.join(name).exists());
    }
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("7 items: 0 converted, 3 skipped, 4 failed"),
        "{}",
        text(&again)
    );

    // Only the good lines: exit 0, nothing fetched. Then a damaged output is made again.
    let good_list = dir.join("good.txt");
    let full = fs::read_to_string(&list_path).unwrap();
    fs::write(&good_list, full.lines().take(4).collect::<Vec<_>>().join("\n")).unwrap();
    let args_good: Vec<&str> =
        args.iter().map(|a| if *a == list_path.to_str().unwrap() { good_list.to_str().unwrap() } else { a }).collect();
    let requests = server.count();
    let clean = ckptmap(&args_good);
    assert_eq!(clean.status.code(), Some(0), "{}", text(&clean));
    assert_eq!(report(&out)["summary"]["skipped"], 3);
    assert_eq!(report(&out)["items"].as_array().unwrap().len(), 3);
    let damaged = out.join("beit_tiny_ft_mmseg.pth");
    let mut bytes = fs::read(&damaged).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&damaged, bytes).unwrap();
    let redo = ckptmap(&args_good);
    assert_eq!(redo.status.code(), Some(0), "{}", text(&redo));
    let r4 = report(&out);
    assert_eq!(item(&r4, "beit_tiny_ft_mmseg.pth")["status"], "converted");
    assert_eq!(item(&r4, "beit_tiny_ft_mmseg.pth")["output_sha256"], sha256_hex(&fs::read(&damaged).unwrap()));
    assert_eq!(
        item(&r4, "beit_tiny_ft_mmseg.pth")["output_sha256"],
        item(&r, "beit_tiny_ft_mmseg.pth")["output_sha256"]
    );
    assert_eq!(item(&r4, "mae_tiny_mmseg.pth")["status"], "skipped");
    assert_eq!(server.count(), requests, "nothing is fetched for done items");
}

#[test]
fn a_malformed_line_is_exit_2_before_any_download() {
    let tmp = tempfile::tempdir().unwrap();
    let server =
        Server::routes(HashMap::from([("/mae_tiny.pth".to_string(), fs::read(fixture("mae_tiny.pth")).unwrap())]));
    let list = tmp.path().join("list.txt");
    fs::write(
        &list,
        format!("{}\n\n{} name=x.pth mapping\n", server.url("/mae_tiny.pth"), server.url("/mae_tiny.pth")),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let run = ckptmap(&[
        "batch",
        list.to_str().unwrap(),
        "--out-dir",
        out.to_str().unwrap(),
        "--cache-dir",
        tmp.path().join("c").to_str().unwrap(),
    ]);
    assert_eq!(run.status.code(), Some(2), "{}", text(&run));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains(&format!("{}:3: ", list.display())), "{stderr}");
    assert!(stderr.contains("\"mapping\" is not a key=value field"), "{stderr}");
    assert_eq!(server.count(), 0);
    assert!(!out.exists());

    // A list that cannot be read, and a global --sha256, are exit 2 too.
    let run = ckptmap(&["batch", tmp.path().join("none.txt").to_str().unwrap(), "--out-dir", out.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(2), "{}", text(&run));
    fs::write(&list, format!("{}\n", server.url("/mae_tiny.pth"))).unwrap();
    let run =
        ckptmap(&["batch", list.to_str().unwrap(), "--out-dir", out.to_str().unwrap(), "--sha256", &"0".repeat(64)]);
    assert_eq!(run.status.code(), Some(2), "{}", text(&run));
    assert_eq!(server.count(), 0);
}

#[test]
fn resized_outputs_are_verified_through_a_clean_conversion() {
    // The original runs at its own size (112); an output load-ready at 224 cannot be run
    // against it, so the same mapping without resizing is checked and the report says so.
    let tmp = tempfile::tempdir().unwrap();
    let list = tmp.path().join("list.txt");
    fs::write(&list, format!("{}\n{}\n", fixture("mae_tiny.pth").display(), fixture("beit_tiny_pt.pth").display()))
        .unwrap();
    let out = tmp.path().join("out");
    let run = ckptmap(&[
        "batch",
        list.to_str().unwrap(),
        "--out-dir",
        out.to_str().unwrap(),
        "--img-size",
        "224",
        "--num-heads",
        "2",
        "--verify",
        "--json",
    ]);
    assert_eq!(run.status.code(), Some(0), "{}", text(&run));
    let printed: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(printed["items"], report(&out)["items"]);
    for name in ["mae_tiny_mmseg.pth", "beit_tiny_pt_mmseg.pth"] {
        let it = item(&printed, name);
        assert_eq!(it["plan"]["img_size"], 224);
        assert_eq!(it["verify"]["subject"], "clean conversion", "{it:#}");
        assert_eq!(it["verify"]["passed"], true);
        assert!(it["verify"]["not_checked"].as_str().unwrap().contains("img_size 224"));
        let back = Checkpoint::open(&out.join(name)).unwrap();
        let pos = back.tensors().into_iter().find(|t| t.name.ends_with("relative_position_bias_table")).unwrap();
        assert_eq!(pos.view.shape[0], 27 * 27 + 3, "{name}: tables sized for 224/16 = 14x14 patches");
    }
    assert_eq!(
        names_in(&out),
        vec![".ckptmap-batch.lock", "beit_tiny_pt_mmseg.pth", "mae_tiny_mmseg.pth", "report.json"]
    );
}

#[test]
fn a_second_batch_into_the_same_folder_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    let lock = fs::File::create(out.join(".ckptmap-batch.lock")).unwrap();
    lock.lock().unwrap(); // as a running batch holds it
    let list = tmp.path().join("list.txt");
    fs::write(&list, format!("{}\n", fixture("mae_tiny.pth").display())).unwrap();
    let run = ckptmap(&["batch", list.to_str().unwrap(), "--out-dir", out.to_str().unwrap(), "--num-heads", "2"]);
    assert_eq!(run.status.code(), Some(2), "{}", text(&run));
    assert!(
        String::from_utf8_lossy(&run.stderr).contains("another `ckptmap batch` is writing into this folder"),
        "{}",
        text(&run)
    );
    assert!(!out.join("report.json").exists());
    drop(lock);
    let run = ckptmap(&["batch", list.to_str().unwrap(), "--out-dir", out.to_str().unwrap(), "--num-heads", "2"]);
    assert_eq!(run.status.code(), Some(0), "{}", text(&run));
}

// ---------------------------------------------------------------------------------------
// Killed mid-run (issue 7).

/// The report on disk, if there is one yet (it is replaced atomically, so it always parses).
fn report_now(out: &Path) -> Option<Value> {
    let bytes = fs::read(out.join("report.json")).ok()?;
    Some(serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("report.json does not parse ({e}): a torn write")))
}

fn count_status(report: &Value, status: &str) -> usize {
    report["items"].as_array().unwrap().iter().filter(|i| i["status"] == status).count()
}

/// Files the process has open under `dir` that are not in place yet (anonymous temporaries).
fn writing_under(pid: u32, dir: &Path) -> bool {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .any(|t| t.starts_with(dir) && t.to_string_lossy().ends_with(" (deleted)"))
}

/// What a report may claim after any kill: every item it records as done has its output in
/// place, complete, with the recorded sha256 and size; the run is not called complete.
fn assert_claims_hold(out: &Path, when: &str) {
    let Some(report) = report_now(out) else { return };
    assert_eq!(report["complete"], false, "{when}: a killed run's report says complete");
    for it in report["items"].as_array().unwrap() {
        let status = it["status"].as_str().unwrap();
        let name = it["output"].as_str().unwrap();
        match status {
            "converted" | "skipped" => {
                let bytes = fs::read(out.join(name))
                    .unwrap_or_else(|e| panic!("{when}: {name} is {status} but cannot be read: {e}"));
                assert_eq!(
                    it["output_sha256"].as_str(),
                    Some(sha256_hex(&bytes).as_str()),
                    "{when}: {name} is {status} with another sha256"
                );
                assert_eq!(it["output_bytes"].as_u64(), Some(bytes.len() as u64), "{when}: {name} size");
                Checkpoint::open(&out.join(name)).unwrap_or_else(|e| panic!("{when}: {name} does not read: {e}"));
            }
            "pending" => assert!(it["output_sha256"].is_null(), "{when}: pending {name} claims a hash"),
            other => panic!("{when}: {name} is {other}"),
        }
    }
}

#[test]
fn a_killed_batch_claims_only_finished_outputs_and_the_next_run_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("mae_b2.pth");
    ckptmap::synth::write_synthetic(&src, &ckptmap::synth::mae_pretrain_layout(768, 2, 16), false).unwrap();
    let names: Vec<String> = (0..6).map(|i| format!("out{i}.pth")).collect();
    let list = tmp.path().join("list.txt");
    fs::write(&list, names.iter().map(|n| format!("{} name={n}\n", src.display())).collect::<String>()).unwrap();
    let out = tmp.path().join("out");
    let args = ["batch", list.to_str().unwrap(), "--out-dir", out.to_str().unwrap(), "--quiet"];

    // Each run is SIGKILLed at a later point: right after its first report, after two items,
    // and while an output is half written.
    type When = Box<dyn Fn(u32) -> bool>;
    let out2 = out.clone();
    let out3 = out.clone();
    // Outputs are nameless (O_TMPFILE) files in the output folder until committed.
    let out4 = out.clone();
    let points: Vec<(&str, When)> = vec![
        (
            "after the first report",
            Box::new(move |_| report_now(&out2).is_some_and(|r| count_status(&r, "pending") == 6)),
        ),
        ("after two items", Box::new(move |_| report_now(&out3).is_some_and(|r| count_status(&r, "converted") >= 2))),
        ("mid-write", Box::new(move |pid| writing_under(pid, &out4))),
    ];
    for (when, ready) in &points {
        let mut child = cmd().args(args).env("RUST_BACKTRACE", "1").spawn().unwrap();
        let start = std::time::Instant::now();
        let mut caught = false;
        while child.try_wait().unwrap().is_none() {
            if ready(child.id()) {
                child.kill().unwrap(); // SIGKILL
                caught = true;
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(120), "{when}: never reached");
        }
        child.wait().unwrap();
        assert!(caught, "{when}: the run finished before it could be killed");
        assert_claims_hold(&out, when);
    }
    let done_before: Vec<String> = report_now(&out).unwrap()["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["status"] == "converted" || i["status"] == "skipped")
        .map(|i| i["output"].as_str().unwrap().to_string())
        .collect();
    assert!(done_before.len() >= 2, "the killed runs finished {done_before:?}");

    // The next run finishes the job, skipping what the killed runs completed.
    let run = ckptmap(&args);
    assert_eq!(run.status.code(), Some(0), "{}", text(&run));
    let r = report(&out);
    assert_eq!(r["complete"], true);
    for name in &names {
        let it = item(&r, name);
        let expected = if done_before.contains(name) { "skipped" } else { "converted" };
        assert_eq!(it["status"], expected, "{name}");
        let bytes = fs::read(out.join(name)).unwrap();
        assert_eq!(it["output_sha256"].as_str(), Some(sha256_hex(&bytes).as_str()), "{name}");
    }
    let mut expected: Vec<String> = names.clone();
    expected.extend([".ckptmap-batch.lock".into(), "report.json".into()]);
    expected.sort();
    assert_eq!(names_in(&out), expected, "no staging folder or temporaries left");
}

#[test]
fn batch_takes_every_convert_option_and_embeds_convert_s_report() {
    // The same options as `convert` (one shared group): --dtype, --keep-unused,
    // --init-values, and each item carries the report `convert --json` prints.
    let tmp = tempfile::tempdir().unwrap();
    let list = tmp.path().join("list.txt");
    fs::write(&list, format!("{} name=mae.pth\n", fixture("mae_tiny_full.pth").display())).unwrap();
    let out = tmp.path().join("out");
    let run = ckptmap(&[
        "batch",
        list.to_str().unwrap(),
        "--out-dir",
        out.to_str().unwrap(),
        "--dtype",
        "f16",
        "--keep-unused",
        "--num-heads",
        "2",
        "--quiet",
    ]);
    assert_eq!(run.status.code(), Some(0), "{}", text(&run));
    let r = report(&out);
    let it = item(&r, "mae.pth");
    assert_eq!(it["settings"]["dtype"], "f16", "{it:#}");
    assert_eq!(it["settings"]["keep_unused"], true);
    let back = Checkpoint::open(&out.join("mae.pth")).unwrap();
    let tensors = back.tensors();
    assert!(tensors.iter().all(|t| t.view.dtype == ckptmap::DType::F16), "every float tensor cast");
    assert!(tensors.iter().any(|t| t.name.starts_with("decoder_")), "keep_unused passed the decoder through");
    // The embedded report is convert's: same fields, same output hash as the item's.
    let conv = &it["report"];
    assert_eq!(conv["output_sha256"], it["output_sha256"], "{conv:#}");
    assert_eq!(conv["mapping"], "builtin:mae");
    assert_eq!(conv["output"]["tensors"].as_u64(), Some(tensors.len() as u64));
    assert!(conv["plan"]["outputs"].as_array().is_some_and(|o| !o.is_empty()));
    // convert --json prints the same document shape.
    // (Same file name: a .pth archive's inner folder is named after it.)
    fs::create_dir(tmp.path().join("one")).unwrap();
    let dst = tmp.path().join("one").join("mae.pth");
    let one = ckptmap(&[
        "convert",
        fixture("mae_tiny_full.pth").to_str().unwrap(),
        dst.to_str().unwrap(),
        "--dtype",
        "f16",
        "--keep-unused",
        "--json",
    ]);
    assert!(one.status.success(), "{}", text(&one));
    let doc: Value = serde_json::from_slice(&one.stdout).unwrap();
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&doc), keys(conv));
    assert_eq!(doc["output_sha256"], conv["output_sha256"], "the same conversion gives the same bytes");
}
