//! Downloads against a loopback HTTP server with scripted faults (no internet; the server
//! is `util::http`).

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ckptmap::fetch::{fetch, is_url, name_embedded_hash, sha256_file, FetchError, FetchOptions, HashSource};
use ckptmap::progress::{NoProgress, Progress};

use crate::util::http::{Reply, Server};
use crate::util::sha256_hex;

// ---------------------------------------------------------------------------------------
// Helpers

const SIZE: usize = 3 * 1024 * 1024;

/// 3 MiB of deterministic pseudo-random bytes (xorshift64).
fn data() -> Arc<Vec<u8>> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(SIZE);
    while out.len() < SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(SIZE);
    Arc::new(out)
}

fn options(cache: &Path) -> FetchOptions {
    FetchOptions {
        cache_dir: Some(cache.to_path_buf()),
        retries: 3,
        backoff: Duration::from_millis(1),
        connect_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_secs(2),
        ..FetchOptions::default()
    }
}

/// Every file under `dir`, relative, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.push(path.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The file names (no folder) under `dir`, sorted.
fn names_under(dir: &Path) -> Vec<String> {
    files_under(dir).iter().map(|p| Path::new(p).file_name().unwrap().to_string_lossy().into_owned()).collect()
}

fn part_of(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".part");
    PathBuf::from(p)
}

/// Serves `data` at every path, honouring `Range`.
fn serving(data: &Arc<Vec<u8>>) -> Server {
    let body = data.clone();
    Server::start(move |_, r| Reply::ranged(r, &body, vec![]))
}

/// Simulates a run killed before `got` was finished: no finished file, no record, and a
/// `.part` holding `part`.
fn leave_only_a_part(got: &Path, part: &[u8]) {
    fs::remove_file(got).unwrap();
    fs::remove_file(got.with_extension("pth.json")).unwrap();
    fs::write(part_of(got), part).unwrap();
}

// ---------------------------------------------------------------------------------------
// Plain downloads and the cache

#[test]
fn downloads_then_reuses_cache_without_a_request() {
    let data = data();
    let server = serving(&data);
    let cache = tempfile::tempdir().unwrap();
    let url = server.url("/pretrain/mae_pretrain_vit_base.pth");

    let first = fetch(&url, &options(cache.path()), &NoProgress).unwrap();
    assert!(!first.from_cache);
    assert_eq!(first.bytes, SIZE as u64);
    assert_eq!(first.sha256, sha256_hex(&data));
    assert_eq!(first.resumed_from, 0);
    assert_eq!(first.path.file_name().unwrap(), "mae_pretrain_vit_base.pth");
    assert!(first.path.starts_with(cache.path()));
    assert_eq!(fs::read(&first.path).unwrap(), *data);
    assert_eq!(server.count(), 1);
    assert!(server.requests()[0].header("user-agent").unwrap().starts_with("ckptmap/"));

    let second = fetch(&url, &options(cache.path()), &NoProgress).unwrap();
    assert!(second.from_cache);
    assert_eq!(second.path, first.path);
    assert_eq!(second.sha256, first.sha256);
    assert_eq!(second.bytes, first.bytes);
    assert_eq!(server.count(), 1, "a cached URL must not be requested again");

    // Only the file, its record and the lock: no .part left behind.
    let names = names_under(cache.path());
    assert_eq!(names, vec![".lock", "mae_pretrain_vit_base.pth", "mae_pretrain_vit_base.pth.json"]);
    let record: serde_json::Value =
        serde_json::from_slice(&fs::read(first.path.with_extension("pth.json")).unwrap()).unwrap();
    assert_eq!(record["url"], url.as_str());
    assert_eq!(record["size"], SIZE as u64);
    assert_eq!(record["sha256"], first.sha256.as_str());
}

#[test]
fn corrupted_cache_file_is_downloaded_again() {
    let data = data();
    let server = serving(&data);
    let cache = tempfile::tempdir().unwrap();
    let url = server.url("/m.pth");

    let first = fetch(&url, &options(cache.path()), &NoProgress).unwrap();
    // Same size, one byte flipped: only re-hashing can notice.
    let mut bytes = fs::read(&first.path).unwrap();
    bytes[SIZE / 2] ^= 0xFF;
    fs::write(&first.path, &bytes).unwrap();

    let second = fetch(&url, &options(cache.path()), &NoProgress).unwrap();
    assert!(!second.from_cache);
    assert_eq!(server.count(), 2);
    assert_eq!(fs::read(&second.path).unwrap(), *data);

    // A truncated cache file too.
    fs::write(&second.path, &data[..100]).unwrap();
    let third = fetch(&url, &options(cache.path()), &NoProgress).unwrap();
    assert!(!third.from_cache);
    assert_eq!(server.count(), 3);
    assert_eq!(fs::read(&third.path).unwrap(), *data);
}

#[test]
/// A wrong `--sha256` for a cached copy that is intact (it has the sha256 recorded when it
/// was downloaded) is the expectation's fault: the copy is kept and nothing is requested.
fn cached_intact_file_not_matching_a_wrong_expected_sha256_is_kept() {
    let data = data();
    let server = serving(&data);
    let cache = tempfile::tempdir().unwrap();
    let url = server.url("/m.pth");
    let first = fetch(&url, &options(cache.path()), &NoProgress).unwrap();
    let before = names_under(cache.path());

    let mut opts = options(cache.path());
    opts.sha256 = Some("0".repeat(64));
    let err = fetch(&url, &opts, &NoProgress).unwrap_err();
    assert!(matches!(err, FetchError::CachedSha256Mismatch { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("kept") && text.contains("cache clean") && text.contains(&first.sha256), "{text}");
    assert_eq!(server.count(), 1);
    assert_eq!(names_under(cache.path()), before);
    assert_eq!(fs::read(&first.path).unwrap(), *data);
    // The right hash still finds it, without a request.
    let mut opts = options(cache.path());
    opts.sha256 = Some(first.sha256.clone());
    assert!(fetch(&url, &opts, &NoProgress).unwrap().from_cache);
    assert_eq!(server.count(), 1);
}

#[test]
fn concurrent_fetches_of_one_url_make_one_request() {
    let data = data();
    let server = serving(&data);
    let cache = tempfile::tempdir().unwrap();
    let url = server.url("/m.pth");
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> =
            (0..3).map(|_| s.spawn(|| fetch(&url, &options(cache.path()), &NoProgress).unwrap())).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(server.count(), 1);
    assert_eq!(results.iter().filter(|f| !f.from_cache).count(), 1);
    for f in &results {
        assert_eq!(f.sha256, sha256_hex(&data));
    }
}

#[test]
fn redirect_is_followed_and_cached_under_the_original_url() {
    let data = data();
    let body = data.clone();
    let server = Server::start(move |_, r| {
        if r.path == "/old/model.pth" {
            Reply::Send { status: 302, headers: vec![("Location".into(), "/new/blob".into())], body: vec![] }
        } else {
            Reply::ranged(r, &body, vec![])
        }
    });
    let cache = tempfile::tempdir().unwrap();
    let url = server.url("/old/model.pth");
    let got = fetch(&url, &options(cache.path()), &NoProgress).unwrap();
    assert_eq!(fs::read(&got.path).unwrap(), *data);
    assert_eq!(got.path.file_name().unwrap(), "model.pth");
    let paths: Vec<_> = server.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, vec!["/old/model.pth", "/new/blob"]);

    let again = fetch(&url, &options(cache.path()), &NoProgress).unwrap();
    assert!(again.from_cache);
    assert_eq!(server.count(), 2);
}

// ---------------------------------------------------------------------------------------
// HTTP errors and retries

#[test]
fn not_found_fails_at_once() {
    let server = Server::start(|_, _| Reply::status(404));
    let cache = tempfile::tempdir().unwrap();
    let url = server.url("/missing.pth");
    let err = fetch(&url, &options(cache.path()), &NoProgress).unwrap_err();
    assert!(matches!(err, FetchError::Http { status: 404, .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("404") && message.contains(&url), "{message}");
    assert!(!message.contains('\n'));
    assert_eq!(server.count(), 1, "a 4xx must not be retried");
    assert_eq!(names_under(cache.path()), vec![".lock"]);
}

#[test]
fn forbidden_is_not_retried_either() {
    let server = Server::start(|_, _| Reply::status(403));
    let cache = tempfile::tempdir().unwrap();
    let err = fetch(&server.url("/x.pth"), &options(cache.path()), &NoProgress).unwrap_err();
    assert!(matches!(err, FetchError::Http { status: 403, .. }), "{err:?}");
    assert_eq!(server.count(), 1);
}

#[test]
fn server_error_then_success_is_retried() {
    let data = data();
    let body = data.clone();
    let server = Server::start(move |i, r| if i == 0 { Reply::status(500) } else { Reply::ranged(r, &body, vec![]) });
    let cache = tempfile::tempdir().unwrap();
    let got = fetch(&server.url("/m.pth"), &options(cache.path()), &NoProgress).unwrap();
    assert_eq!(fs::read(&got.path).unwrap(), *data);
    assert_eq!(server.count(), 2);
}

#[test]
fn persistent_server_errors_give_up_after_the_configured_attempts_with_backoff() {
    let server = Server::start(|_, _| Reply::status(503));
    let cache = tempfile::tempdir().unwrap();
    let url = server.url("/m.pth");
    let mut opts = options(cache.path());
    opts.retries = 2;
    opts.backoff = Duration::from_millis(40);
    let start = Instant::now();
    let err = fetch(&url, &opts, &NoProgress).unwrap_err();
    let elapsed = start.elapsed();
    assert!(matches!(err, FetchError::GaveUp { attempts: 3, .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("503") && message.contains(&url) && message.contains("3 attempts"), "{message}");
    assert_eq!(server.count(), 3);
    // 40 ms, then 80 ms.
    assert!(elapsed >= Duration::from_millis(120), "{elapsed:?}");
}

#[test]
fn connection_refused_is_retried_then_reported() {
    let addr = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    }; // closed again: connections are refused
    let cache = tempfile::tempdir().unwrap();
    let url = format!("http://{addr}/m.pth");
    let mut opts = options(cache.path());
    opts.retries = 2;
    let err = fetch(&url, &opts, &NoProgress).unwrap_err();
    assert!(matches!(err, FetchError::GaveUp { attempts: 3, .. }), "{err:?}");
    assert!(err.to_string().contains(&url));
}

// ---------------------------------------------------------------------------------------
// Resume

#[test]
fn cut_connection_resumes_with_a_range_request() {
    let data = data();
    let body = data.clone();
    let half = SIZE / 2;
    let etag = "\"v1\"".to_string();
    let tag = etag.clone();
    let server = Server::start(move |i, r| {
        let headers = vec![("ETag".to_string(), tag.clone())];
        if i == 0 {
            Reply::Cut { headers, len: body.len(), body: body[..half].to_vec() }
        } else {
            Reply::ranged(r, &body, headers)
        }
    });
    let cache = tempfile::tempdir().unwrap();
    let got = fetch(&server.url("/m.pth"), &options(cache.path()), &NoProgress).unwrap();
    assert_eq!(fs::read(&got.path).unwrap(), *data, "resumed file must be byte-identical");
    assert_eq!(got.sha256, sha256_hex(&data));
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].header("range"), None);
    let range = requests[1].header("range").expect("second request must carry Range");
    assert_eq!(got.resumed_from, half as u64);
    assert_eq!(range, format!("bytes={half}-"));
    assert_eq!(requests[1].header("if-range"), Some(etag.as_str()));
    assert!(!part_of(&got.path).exists());
}

#[test]
fn server_ignoring_range_restarts_cleanly() {
    let data = data();
    let body = data.clone();
    let server = Server::start(move |i, _| {
        if i == 0 {
            Reply::Cut { headers: vec![], len: body.len(), body: body[..SIZE / 3].to_vec() }
        } else {
            Reply::ok(&body) // 200 with the whole body, whatever the Range
        }
    });
    let cache = tempfile::tempdir().unwrap();
    let got = fetch(&server.url("/m.pth"), &options(cache.path()), &NoProgress).unwrap();
    assert_eq!(fs::read(&got.path).unwrap(), *data);
    assert_eq!(got.resumed_from, 0);
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    assert!(requests[1].header("range").is_some());
}

#[test]
fn content_range_not_matching_the_request_restarts_from_zero() {
    let data = data();
    let body = data.clone();
    let server = Server::start(move |i, r| match i {
        0 => Reply::Cut { headers: vec![], len: body.len(), body: body[..SIZE / 2].to_vec() },
        // A 206 for the wrong range: the .part cannot be continued with it.
        1 => Reply::Send {
            status: 206,
            headers: vec![("Content-Range".into(), format!("bytes 0-{}/{}", body.len() - 1, body.len()))],
            body: body.to_vec(),
        },
        _ => Reply::ranged(r, &body, vec![]),
    });
    let cache = tempfile::tempdir().unwrap();
    let got = fetch(&server.url("/m.pth"), &options(cache.path()), &NoProgress).unwrap();
    assert_eq!(fs::read(&got.path).unwrap(), *data);
    assert_eq!(got.resumed_from, 0);
    let requests = server.requests();
    assert_eq!(requests.len(), 3);
    assert!(requests[1].header("range").is_some());
    assert_eq!(requests[2].header("range"), None);
}

#[test]
fn a_part_left_by_an_earlier_run_is_resumed_and_never_taken_as_finished() {
    let data = data();
    let server = serving(&data);
    let cache = tempfile::tempdir().unwrap();
    let url = server.url("/m.pth");
    let first = fetch(&url, &options(cache.path()), &NoProgress).unwrap();

    // Simulate a run killed half-way: no finished file, half a .part.
    let third = SIZE / 3;
    leave_only_a_part(&first.path, &data[..third]);

    let got = fetch(&url, &options(cache.path()), &NoProgress).unwrap();
    assert!(!got.from_cache);
    assert_eq!(got.resumed_from, third as u64);
    assert_eq!(fs::read(&got.path).unwrap(), *data);
    assert_eq!(server.requests()[1].header("range"), Some(format!("bytes={third}-").as_str()));

    // A complete .part is still not a finished file: it is checked through the server.
    leave_only_a_part(&got.path, &data);
    let again = fetch(&url, &options(cache.path()), &NoProgress).unwrap();
    assert!(!again.from_cache);
    assert_eq!(fs::read(&again.path).unwrap(), *data);
    // Range past the end → 416 → restart from zero.
    let requests = server.requests();
    assert_eq!(requests.len(), 4);
    assert_eq!(requests[2].header("range"), Some(format!("bytes={SIZE}-").as_str()));
    assert_eq!(requests[3].header("range"), None);
}

#[test]
fn a_stale_part_that_fails_the_hash_is_downloaded_again_from_zero() {
    let data = data();
    let server = serving(&data);
    let cache = tempfile::tempdir().unwrap();
    let url = server.url("/m.pth");
    let first = fetch(&url, &options(cache.path()), &NoProgress).unwrap();
    leave_only_a_part(&first.path, &[0xAB; SIZE / 2]); // wrong bytes

    let mut opts = options(cache.path());
    opts.sha256 = Some(sha256_hex(&data).to_uppercase());
    let got = fetch(&url, &opts, &NoProgress).unwrap();
    assert_eq!(fs::read(&got.path).unwrap(), *data);
    assert_eq!(got.resumed_from, 0);
    let requests = server.requests();
    assert_eq!(requests.len(), 3);
    assert!(requests[1].header("range").is_some());
    assert_eq!(requests[2].header("range"), None);
}

// ---------------------------------------------------------------------------------------
// Timeouts

#[test]
fn stall_mid_body_times_out_and_the_retry_resumes() {
    let data = data();
    let body = data.clone();
    let first = 256 * 1024;
    let server = Server::start(move |i, r| {
        if i == 0 {
            Reply::Stall { head: Some((body.len(), body[..first].to_vec())), pause: Duration::from_secs(5) }
        } else {
            Reply::ranged(r, &body, vec![])
        }
    });
    let cache = tempfile::tempdir().unwrap();
    let mut opts = options(cache.path());
    opts.read_timeout = Duration::from_millis(200);
    let start = Instant::now();
    let got = fetch(&server.url("/m.pth"), &opts, &NoProgress).unwrap();
    assert!(start.elapsed() < Duration::from_secs(4), "{:?}", start.elapsed());
    assert_eq!(fs::read(&got.path).unwrap(), *data);
    assert_eq!(server.count(), 2);
    assert!(got.resumed_from > 0 && got.resumed_from <= first as u64, "{}", got.resumed_from);
}

#[test]
fn server_that_never_answers_fails_after_bounded_retries() {
    let server = Server::start(|_, _| Reply::Stall { head: None, pause: Duration::from_secs(5) });
    let cache = tempfile::tempdir().unwrap();
    let url = server.url("/m.pth");
    let mut opts = options(cache.path());
    opts.read_timeout = Duration::from_millis(150);
    opts.retries = 1;
    let start = Instant::now();
    let err = fetch(&url, &opts, &NoProgress).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(4), "{:?}", start.elapsed());
    assert!(matches!(err, FetchError::GaveUp { attempts: 2, .. }), "{err:?}");
    assert!(err.to_string().contains(&url));
    assert_eq!(server.count(), 2);
}

// ---------------------------------------------------------------------------------------
// Integrity

#[test]
fn wrong_expected_sha256_fails_and_leaves_nothing() {
    let data = data();
    let server = serving(&data);
    let cache = tempfile::tempdir().unwrap();
    let url = server.url("/m.pth");
    let wrong = "ab".repeat(32);
    let mut opts = options(cache.path());
    opts.sha256 = Some(wrong.clone());
    let err = fetch(&url, &opts, &NoProgress).unwrap_err();
    match &err {
        FetchError::Sha256Mismatch { expected, actual, source_of, .. } => {
            assert_eq!(expected, &wrong);
            assert_eq!(actual, &sha256_hex(&data));
            assert_eq!(*source_of, HashSource::Option);
        }
        other => panic!("{other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains(&wrong) && message.contains(&sha256_hex(&data)) && message.contains(&url));
    assert_eq!(server.count(), 1, "a mismatch is not retried");
    assert_eq!(names_under(cache.path()), vec![".lock"], "no file, no .part kept");
}

#[test]
fn right_expected_sha256_is_accepted() {
    let data = data();
    let server = serving(&data);
    let cache = tempfile::tempdir().unwrap();
    let mut opts = options(cache.path());
    opts.sha256 = Some(sha256_hex(&data));
    let got = fetch(&server.url("/m.pth"), &opts, &NoProgress).unwrap();
    assert_eq!(got.sha256, sha256_hex(&data));
}

#[test]
fn malformed_expected_sha256_is_refused_before_any_request() {
    let server = Server::start(|_, _| Reply::status(200));
    let cache = tempfile::tempdir().unwrap();
    let mut opts = options(cache.path());
    opts.sha256 = Some("f92a2975".into());
    let err = fetch(&server.url("/m.pth"), &opts, &NoProgress).unwrap_err();
    assert!(matches!(err, FetchError::BadExpectedSha256 { .. }), "{err:?}");
    assert_eq!(server.count(), 0);
}

#[test]
fn wrong_hash_in_the_file_name_is_refused() {
    let data = data();
    let server = serving(&data);
    let cache = tempfile::tempdir().unwrap();
    let url = server.url("/upernet_beit-base_ade20k-deadbeef.pth");
    let err = fetch(&url, &options(cache.path()), &NoProgress).unwrap_err();
    match &err {
        FetchError::Sha256Mismatch { expected, source_of, .. } => {
            assert_eq!(expected, "deadbeef");
            assert_eq!(*source_of, HashSource::FileName);
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains(&sha256_hex(&data)));
    assert_eq!(names_under(cache.path()), vec![".lock"]);
}

#[test]
fn right_hash_in_the_file_name_is_accepted() {
    let data = data();
    let server = serving(&data);
    let cache = tempfile::tempdir().unwrap();
    let prefix = &sha256_hex(&data)[..8];
    let url = server.url(&format!("/beit_base_20220426_174752-{prefix}.pth?download=1"));
    let got = fetch(&url, &options(cache.path()), &NoProgress).unwrap();
    assert!(got.sha256.starts_with(prefix));
    assert_eq!(got.path.file_name().unwrap().to_string_lossy(), format!("beit_base_20220426_174752-{prefix}.pth"));
}

// ---------------------------------------------------------------------------------------
// Progress and small functions

/// One progress job as the library reported it.
#[derive(Clone, Debug)]
struct Job {
    label: String,
    total: Option<u64>,
    advanced: u64,
    ended: bool,
}

#[derive(Default)]
struct Recorder {
    jobs: Mutex<Vec<Job>>,
}

impl Progress for Recorder {
    fn begin(&self, label: &str, total: Option<u64>) {
        let job = Job { label: label.to_string(), total, advanced: 0, ended: false };
        self.jobs.lock().unwrap().push(job);
    }
    fn advance(&self, bytes: u64) {
        self.jobs.lock().unwrap().last_mut().unwrap().advanced += bytes;
    }
    fn end(&self) {
        self.jobs.lock().unwrap().last_mut().unwrap().ended = true;
    }
}

#[test]
fn progress_sees_the_whole_size() {
    let data = data();
    let body = data.clone();
    let server = Server::start(move |i, r| {
        if i == 0 {
            Reply::Cut { headers: vec![], len: body.len(), body: body[..SIZE / 2].to_vec() }
        } else {
            Reply::ranged(r, &body, vec![])
        }
    });
    let cache = tempfile::tempdir().unwrap();
    let url = server.url("/m.pth");
    let recorder = Recorder::default();
    fetch(&url, &options(cache.path()), &recorder).unwrap();
    let jobs = recorder.jobs.lock().unwrap().clone();
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    for job in &jobs {
        assert_eq!(job.label, "m.pth");
        assert_eq!(job.total, Some(SIZE as u64));
        assert!(job.ended);
    }
    assert_eq!(jobs[0].advanced, (SIZE / 2) as u64);
    assert_eq!(jobs[1].advanced, SIZE as u64, "resumed job counts the kept prefix too");

    let recorder = Recorder::default();
    assert!(fetch(&url, &options(cache.path()), &recorder).unwrap().from_cache);
    let jobs = recorder.jobs.lock().unwrap().clone();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].label, "checking m.pth");
    assert_eq!(jobs[0].total, Some(SIZE as u64));
    assert_eq!(jobs[0].advanced, SIZE as u64);
    assert!(jobs[0].ended);
}

#[test]
fn not_a_url_is_refused() {
    let cache = tempfile::tempdir().unwrap();
    let err = fetch("/tmp/model.pth", &options(cache.path()), &NoProgress).unwrap_err();
    assert!(matches!(err, FetchError::NotUrl { .. }), "{err:?}");
}

#[test]
fn is_url_accepts_only_http_and_https() {
    assert!(is_url("https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth"));
    assert!(is_url("http://127.0.0.1:8080/x"));
    assert!(is_url("HTTPS://example.org/x"));
    assert!(!is_url("ftp://example.org/x"));
    assert!(!is_url("file:///tmp/x.pth"));
    assert!(!is_url("/tmp/x.pth"));
    assert!(!is_url("C:\\models\\x.pth"));
    assert!(!is_url("model.pth"));
    assert!(!is_url("https://"));
}

#[test]
fn name_embedded_hash_follows_the_torch_hub_convention() {
    assert_eq!(
        name_embedded_hash(
            "https://download.openmmlab.com/mmsegmentation/v0.5/beit/upernet_beit-base_8x2_640x640_160k_ade20k/upernet_beit-base_8x2_640x640_160k_ade20k-eead221d.pth"
        ),
        Some("eead221d".to_string())
    );
    assert_eq!(name_embedded_hash("mae_vit_base_20220426_174752-f92a2975.pth"), Some("f92a2975".to_string()));
    assert_eq!(name_embedded_hash("/a/b/model-DEADBEEF.pth.tar"), Some("deadbeef".to_string()));
    assert_eq!(name_embedded_hash("https://h/x-abcdef.pth?v=1-0123456.bin"), Some("abcdef".to_string()));
    assert_eq!(name_embedded_hash("mae_pretrain_vit_base.pth"), None);
    assert_eq!(name_embedded_hash("model-abcde.pth"), None, "fewer than 6 hex digits");
    assert_eq!(name_embedded_hash("model-deadbeef"), None, "no extension");
    assert_eq!(name_embedded_hash("vit-base.pth"), None);
    assert_eq!(name_embedded_hash("model-abc-xyz123.pth"), None, "only the last dash counts");
    assert_eq!(name_embedded_hash("dir-abcdef12/model.pth"), None, "folders do not count");
}

#[test]
fn sha256_file_matches_a_known_digest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("abc");
    fs::write(&path, b"abc").unwrap();
    assert_eq!(
        sha256_file(&path, &ckptmap::progress::NoProgress).unwrap(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let data = data();
    fs::write(&path, &*data).unwrap();
    assert_eq!(sha256_file(&path, &ckptmap::progress::NoProgress).unwrap(), sha256_hex(&data));
    assert!(sha256_file(dir.path().join("missing"), &ckptmap::progress::NoProgress).is_err());
}
