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

/// An HTTPS server on 127.0.0.1 with a certificate signed by tests/data/tls's test CA,
/// serving `body` to every connection that completes a handshake. Returns its base URL and
/// a counter of TCP connections accepted.
fn serve_https(body: Vec<u8>) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use std::io::{Read, Write};
    let tls = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tls");
    let cert = CertificateDer::from(std::fs::read(tls.join("server.der")).unwrap());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(std::fs::read(tls.join("server.key.der")).unwrap()));
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    let config = std::sync::Arc::new(config);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(tcp) = stream else { continue };
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let conn = rustls::ServerConnection::new(config.clone()).unwrap();
            let mut s = rustls::StreamOwned::new(conn, tcp);
            let mut req = [0u8; 4096];
            if s.read(&mut req).unwrap_or(0) == 0 {
                continue; // the client gave up during the handshake
            }
            let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = s.write_all(&body);
            s.conn.send_close_notify();
            let _ = s.flush();
        }
    });
    (format!("https://127.0.0.1:{}", addr.port()), count)
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
    let out = Command::new(env!("CARGO_BIN_EXE_ckptmap"))
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

    let out = Command::new(env!("CARGO_BIN_EXE_ckptmap"))
        .args(["inspect", &url, "--cache-dir", s(&cache)])
        .env("SSL_CERT_FILE", Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tls/ca.pem"))
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
        (&["convert", s(&mae), s(&out), "--num-heads", "2", "--img-size", "100"], &["--img-size 100", "multiple of", "patch size 16", "96 and 112"]),
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
}

/// A file that is already in the MMSeg layout says so, instead of asking for --mapping.
#[test]
fn an_already_converted_file_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let conv = dir.path().join("conv.pth");
    ok(&["convert", s(&fixture("mae_tiny.pth")), s(&conv), "--num-heads", "2"]);
    let err = fails(&["convert", s(&conv), s(&dir.path().join("again.pth"))]);
    assert!(err.contains("already in the MMSeg layout") && err.contains("layers.0.ln1.weight"), "{err}");
    assert!(!err.contains("--mapping"), "{err}");
}
