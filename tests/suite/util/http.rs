//! A loopback HTTP server (127.0.0.1 only, no internet) with scripted answers: fixed routes,
//! files by name, `Range` requests, any status, bodies cut half-way, stalls and servers
//! that never answer; it records every request.
//!
//! The server is a few lines over `std::net::TcpListener` rather than tiny_http because the
//! faults need control of the socket: a body cut half-way needs the connection closed under
//! the client, which tiny_http does not offer. One request per connection
//! (`Connection: close`), each on its own thread; the server stops when dropped.
//!
//! [`serve_https`] is the TLS one, for certificate handling: it answers every request the
//! same way and counts connections.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A request as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// What the server does with one request.
pub enum Reply {
    /// A complete answer.
    Send { status: u16, headers: Vec<(String, String)>, body: Vec<u8> },
    /// A 200 with a body shared between requests (no copy per request: large files).
    Shared(Arc<Vec<u8>>),
    /// Announces `len` body bytes, sends `body` (fewer), then closes the connection.
    Cut { headers: Vec<(String, String)>, len: usize, body: Vec<u8> },
    /// Announces `len` body bytes, sends `body` (fewer), then goes silent for `pause`
    /// (or until the server stops), then closes. `None`: not even the status line.
    Stall { head: Option<(usize, Vec<u8>)>, pause: Duration },
}

impl Reply {
    /// 200 with `body`.
    pub fn ok(body: &[u8]) -> Reply {
        Reply::Send { status: 200, headers: vec![], body: body.to_vec() }
    }

    /// `code` with the body `status <code>`.
    pub fn status(code: u16) -> Reply {
        Reply::Send { status: code, headers: vec![], body: format!("status {code}").into_bytes() }
    }

    /// 404 with the body `not found`.
    pub fn not_found() -> Reply {
        Reply::Send { status: 404, headers: vec![], body: b"not found".to_vec() }
    }

    /// Honours `Range: bytes=N-` with a 206 (416 past the end), else answers 200 with the
    /// whole body. `headers` go with the 200 and the 206.
    pub fn ranged(request: &Seen, body: &[u8], headers: Vec<(String, String)>) -> Reply {
        let from = request
            .header("range")
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse::<usize>().ok());
        match from {
            Some(from) if from < body.len() => {
                let mut headers = headers;
                headers.push(("Content-Range".into(), format!("bytes {from}-{}/{}", body.len() - 1, body.len())));
                Reply::Send { status: 206, headers, body: body[from..].to_vec() }
            }
            Some(_) => Reply::Send {
                status: 416,
                headers: vec![("Content-Range".into(), format!("bytes */{}", body.len()))],
                body: vec![],
            },
            None => Reply::Send { status: 200, headers, body: body.to_vec() },
        }
    }
}

type Handler = dyn Fn(usize, &Seen) -> Reply + Send + Sync;

pub struct Server {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    /// Serves on 127.0.0.1:0; `handler(i, request)` answers the i-th request (0-based).
    pub fn start(handler: impl Fn(usize, &Seen) -> Reply + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let accept = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut connections = Vec::new();
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let (seen, stop, handler) = (seen.clone(), stop.clone(), handler.clone());
                    connections.push(std::thread::spawn(move || serve_one(stream, &seen, &stop, &*handler)));
                }
                for c in connections {
                    let _ = c.join();
                }
            })
        };
        Server { addr, seen, stop, accept: Some(accept) }
    }

    /// Fixed routes (exact paths); everything else 404.
    pub fn routes(routes: HashMap<String, Vec<u8>>) -> Server {
        Server::start(move |_, r| match routes.get(&r.path) {
            Some(body) => Reply::ok(body),
            None => Reply::not_found(),
        })
    }

    /// Files by name: `(name, bytes)` is served at any path ending in `/name`; 404 otherwise.
    pub fn files(files: Vec<(String, Arc<Vec<u8>>)>) -> Server {
        Server::start(move |_, r| match files.iter().find(|(name, _)| r.path.ends_with(&format!("/{name}"))) {
            Some((_, body)) => Reply::Shared(body.clone()),
            None => Reply::not_found(),
        })
    }

    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base())
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The requested paths, in order.
    pub fn paths(&self) -> Vec<String> {
        self.seen.lock().unwrap().iter().map(|r| r.path.clone()).collect()
    }

    /// How many requests there were.
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// How many requests asked for `path`.
    pub fn hits(&self, path: &str) -> usize {
        self.seen.lock().unwrap().iter().filter(|r| r.path == path).count()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wakes the accept loop
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

fn serve_one(stream: TcpStream, seen: &Mutex<Vec<Seen>>, stop: &AtomicBool, handler: &Handler) {
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return; // the wake-up connection, or a client that gave up
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let request = Seen { path, headers };
    let index = {
        let mut seen = seen.lock().unwrap();
        seen.push(request.clone());
        seen.len() - 1
    };
    let mut out = stream;
    let head = |status: u16, headers: &[(String, String)], len: usize| {
        let mut text = format!("HTTP/1.1 {status} Scripted\r\nContent-Length: {len}\r\nConnection: close\r\n");
        for (k, v) in headers {
            text.push_str(&format!("{k}: {v}\r\n"));
        }
        text.push_str("\r\n");
        text.into_bytes()
    };
    let _ = match handler(index, &request) {
        Reply::Send { status, headers, body } => {
            out.write_all(&head(status, &headers, body.len())).and_then(|_| out.write_all(&body))
        }
        Reply::Shared(body) => out.write_all(&head(200, &[], body.len())).and_then(|_| out.write_all(&body)),
        Reply::Cut { headers, len, body } => {
            out.write_all(&head(200, &headers, len)).and_then(|_| out.write_all(&body))
        }
        Reply::Stall { head: first, pause } => {
            if let Some((len, body)) = first {
                let _ = out.write_all(&head(200, &[], len)).and_then(|_| out.write_all(&body));
                let _ = out.flush();
            }
            let start = Instant::now();
            while start.elapsed() < pause && !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        }
    };
    let _ = out.flush();
    let _ = out.shutdown(Shutdown::Both);
}

// ---------------------------------------------------------------------------------------
// HTTPS

/// An HTTPS server on 127.0.0.1 with a certificate signed by tests/data/tls's test CA,
/// serving `body` to every connection that completes a handshake. Returns its base URL and
/// a counter of TCP connections accepted.
pub fn serve_https(body: Vec<u8>) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use std::io::{Read, Write};
    let tls = crate::util::root().join("tests/data/tls");
    let cert = CertificateDer::from(std::fs::read(tls.join("server.der")).unwrap());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(std::fs::read(tls.join("server.key.der")).unwrap()));
    let config =
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
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
