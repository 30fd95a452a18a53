//! Downloads: a URL becomes a verified file in a local cache.
//!
//! # Cache layout
//!
//! The cache root is [`FetchOptions::cache_dir`], else `$CKPTMAP_CACHE`, else
//! `$XDG_CACHE_HOME/ckptmap`, else `~/.cache/ckptmap` (see [`cache_dir`]). Each URL gets its
//! own folder, named by the sha256 of the URL, holding:
//!
//! ```text
//! <root>/<sha256 of the URL>/
//!     .lock                  one fetch of this URL at a time (advisory file lock)
//!     <name>                 the finished file, under the URL's own file name
//!     <name>.json            its record: url, size, sha256, etag / last-modified
//!     <name>.part            a download in progress (never taken for a finished file)
//!     <name>.part.json       what the server said when the .part was started
//! ```
//!
//! A cached file is reused without any request only when its record names the same URL and
//! size and a fresh sha256 of the file still equals the recorded one, so a corrupted cache
//! file is downloaded again.
//!
//! # Integrity
//!
//! The file's sha256 is computed while it streams in. It must match
//! [`FetchOptions::sha256`] when given, and the hex prefix embedded in the file name
//! (`…-f92a2975.pth`, the torch.hub / MMCV convention, see [`name_embedded_hash`]) when there
//! is one. On a mismatch the download is deleted and [`FetchError::Sha256Mismatch`] returned.
//! The finished file only appears by renaming the `.part` after that check.
//!
//! # Resume and retries
//!
//! An interrupted download keeps its `.part`; the next attempt (or the next run) asks for
//! `Range: bytes=N-` (with `If-Range` when the server gave a validator) and appends when the
//! server answers `206` with a matching `Content-Range`; any `200` restarts from byte 0.
//! Connection errors, timeouts, truncated bodies and `5xx` answers are retried with
//! exponential backoff; other `4xx` answers fail at once.

use std::error::Error as StdError;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::blocking::{Client, Response};
use reqwest::header::{HeaderMap, CONTENT_RANGE, ETAG, IF_RANGE, LAST_MODIFIED, RANGE};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::progress::Progress;

/// Bytes moved per read; the only buffer a download needs, whatever the file size.
const CHUNK: usize = 64 * 1024;
/// The longest pause between two attempts, however many retries are configured.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How many times one fetch may throw its `.part` away and start again from byte 0 because
/// the server's answer to a range request did not fit (these do not use up retries).
const MAX_RESTARTS: u32 = 2;
/// The shortest hex prefix in a file name that counts as an embedded sha256.
const MIN_NAME_HASH_LEN: usize = 6;

/// How to fetch a URL.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Cache root; `None` means `$CKPTMAP_CACHE`, else the platform cache folder.
    pub cache_dir: Option<PathBuf>,
    /// The expected sha256 of the whole file, 64 hex digits (any case).
    pub sha256: Option<String>,
    /// How many times to try again after a failed attempt (connection error, timeout,
    /// truncated body, HTTP 5xx). 0 means a single attempt.
    pub retries: u32,
    /// The pause before the first retry; it doubles for each further one (capped at 60 s).
    pub backoff: Duration,
    /// Limit for opening the TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Limit for waiting on the response headers, and then on each read of the body: a
    /// server that stalls longer fails the attempt.
    pub read_timeout: Duration,
    /// The `User-Agent` header sent with each request.
    pub user_agent: String,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            cache_dir: None,
            sha256: None,
            retries: 4,
            backoff: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(15),
            read_timeout: Duration::from_secs(60),
            user_agent: concat!("ckptmap/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

/// A fetched, verified file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The file in the cache.
    pub path: PathBuf,
    /// Its sha256, lowercase hex.
    pub sha256: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// True when the cached file was reused and no request was made.
    pub from_cache: bool,
    /// The byte offset the successful download resumed from (0 when it started at 0).
    pub resumed_from: u64,
}

/// Where a sha256 that a file must match came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashSource {
    /// [`FetchOptions::sha256`].
    Option,
    /// The `-<hex>` suffix of the file name (compared as a prefix of the sha256).
    FileName,
}

impl std::fmt::Display for HashSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HashSource::Option => "given sha256",
            HashSource::FileName => "hash in the file name",
        })
    }
}

/// Why a fetch failed. Each message is one line naming the URL and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The source is not an `http://` or `https://` URL.
    #[error("not an http(s) URL: {url}")]
    NotUrl { url: String },
    /// [`FetchOptions::sha256`] is not 64 hex digits.
    #[error("expected sha256 for {url} must be 64 hex digits, got {given:?}")]
    BadExpectedSha256 { url: String, given: String },
    /// The server answered with a status that retrying will not change (4xx, unexpected).
    #[error("HTTP {status} for {url}")]
    Http { url: String, status: u16 },
    /// The downloaded bytes do not have the expected sha256; nothing was kept.
    #[error("sha256 mismatch for {url}: expected {expected} ({source_of}) got {actual}; the download was discarded")]
    Sha256Mismatch { url: String, expected: String, actual: String, source_of: HashSource },
    /// The cached copy is intact (it still has the sha256 recorded when it was downloaded)
    /// but not the expected one: the expectation is more likely wrong than the file, so the
    /// copy is kept and nothing is downloaded.
    #[error("sha256 mismatch for {url}: expected {expected} ({source_of}) but the cached copy {} (intact: it has the sha256 recorded when it was downloaded) has {actual}; kept it and downloaded nothing. Check the expected hash; if the file on the server changed, run `ckptmap cache clean {url}` and try again", path.display())]
    CachedSha256Mismatch { url: String, path: PathBuf, expected: String, actual: String, source_of: HashSource },
    /// The server's TLS certificate was rejected: retrying cannot change that.
    #[error("TLS certificate of {url} rejected: {message}. If a proxy or private CA signs it, add that CA to the system trust store or point SSL_CERT_FILE at a PEM bundle that includes it")]
    Certificate { url: String, message: String },
    /// Every attempt failed with a retryable error.
    #[error("gave up on {url} after {attempts} attempts: last error: {last}")]
    GaveUp { url: String, attempts: u32, last: String },
    /// The request could not be made at all (bad URL, too many redirects, client setup).
    #[error("request for {url} failed: {message}")]
    Request { url: String, message: String },
    /// Reading or writing the cache failed.
    #[error("cache for {url} at {}: {source}", path.display())]
    Cache {
        url: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// True for `http://` and `https://` URLs (with a host); false for paths.
pub fn is_url(s: &str) -> bool {
    match reqwest::Url::parse(s) {
        Ok(u) => matches!(u.scheme(), "http" | "https") && u.has_host(),
        Err(_) => false,
    }
}

/// The cache root: `opts.cache_dir`, else `$CKPTMAP_CACHE`, else `$XDG_CACHE_HOME/ckptmap`,
/// else `~/.cache/ckptmap` (`%LOCALAPPDATA%\ckptmap` on Windows), else a folder in the
/// system temp dir. Empty environment variables count as unset.
pub fn cache_dir(opts: &FetchOptions) -> PathBuf {
    resolve_cache_dir(opts.cache_dir.as_deref(), |key| std::env::var_os(key))
}

fn resolve_cache_dir(explicit: Option<&Path>, env: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    if let Some(dir) = explicit {
        return dir.to_path_buf();
    }
    let var = |key: &str| env(key).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = var("CKPTMAP_CACHE") {
        return dir;
    }
    if let Some(dir) = var("XDG_CACHE_HOME").filter(|d| d.is_absolute()) {
        return dir.join("ckptmap");
    }
    if cfg!(windows) {
        if let Some(dir) = var("LOCALAPPDATA") {
            return dir.join("ckptmap");
        }
    }
    if let Some(home) = var("HOME") {
        return home.join(".cache").join("ckptmap");
    }
    std::env::temp_dir().join("ckptmap")
}

/// The sha256 prefix embedded in a file name by the torch.hub / MMCV convention: the hex
/// digits (at least 6) between the last `-` and the following `.` of the file name, as in
/// `upernet_beit-base_8x2_640x640_160k_ade20k-eead221d.pth` → `eead221d`. Works on URLs
/// (query and fragment ignored) and paths; lowercase result.
pub fn name_embedded_hash(url_or_path: &str) -> Option<String> {
    let mut s = url_or_path;
    if is_url(s) {
        s = s.split(['?', '#']).next().unwrap_or(s);
    }
    let name = s.rsplit(['/', '\\']).next().unwrap_or(s);
    let after_dash = &name[name.rfind('-')? + 1..];
    let hex = &after_dash[..after_dash.find('.')?];
    let plausible = hex.len() >= MIN_NAME_HASH_LEN && hex.len() <= 64 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    plausible.then(|| hex.to_ascii_lowercase())
}

/// The sha256 of a file, lowercase hex, read with a fixed-size buffer.
pub fn sha256_file(path: impl AsRef<Path>, progress: &dyn Progress) -> io::Result<String> {
    let mut file = File::open(path)?;
    progress.begin("hashing", file.metadata().map(|m| m.len()).ok());
    let mut hasher = Sha256::new();
    let done = hash_prefix(&mut file, u64::MAX, &mut hasher, &mut |n| progress.advance(n));
    progress.end();
    done?;
    Ok(hex::encode(hasher.finalize()))
}

/// Feeds up to `limit` bytes of `reader` into `hasher`; returns how many it read.
fn hash_prefix(
    reader: &mut impl Read,
    limit: u64,
    hasher: &mut Sha256,
    on_chunk: &mut dyn FnMut(u64),
) -> io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < limit {
        let want = (limit - done).min(CHUNK as u64) as usize;
        let n = match reader.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        done += n as u64;
        on_chunk(n as u64);
    }
    Ok(done)
}

/// Downloads `url` into the cache (or reuses the cached copy) and returns the verified file.
///
/// Progress: one `begin`/`advance`/`end` job per file hashed or response body streamed.
pub fn fetch(url: &str, opts: &FetchOptions, progress: &dyn Progress) -> Result<Fetched, FetchError> {
    if !is_url(url) {
        return Err(FetchError::NotUrl { url: url.to_string() });
    }
    let expected = expected_hashes(url, opts)?;
    let entry = CacheEntry::new(&cache_dir(opts), url);
    entry.create_dir()?;
    let _lock = entry.lock()?;

    match entry.reuse(&expected, progress)? {
        Reuse::Hit(hit) => return Ok(hit),
        Reuse::IntactButUnexpected { path, actual, bad } => {
            return Err(FetchError::CachedSha256Mismatch {
                url: url.to_string(),
                path,
                expected: bad.hex.clone(),
                actual,
                source_of: bad.source,
            })
        }
        Reuse::Miss => {}
    }
    entry.forget_finished()?;

    let client = build_client(url, opts)?;
    let attempts = opts.retries.saturating_add(1);
    let mut attempt = 0u32;
    let mut restarts = 0u32;
    loop {
        attempt += 1;
        let failure = match entry.download_once(&client, progress) {
            Ok(done) => match first_mismatch(&expected, &done.sha256) {
                None => return entry.commit(done),
                Some(bad) => {
                    entry.discard_part();
                    if done.resumed_from > 0 && restarts < MAX_RESTARTS {
                        // The kept prefix may be from an older version of the file.
                        Failure::Restart
                    } else {
                        return Err(FetchError::Sha256Mismatch {
                            url: url.to_string(),
                            expected: bad.hex.clone(),
                            actual: done.sha256,
                            source_of: bad.source,
                        });
                    }
                }
            },
            Err(failure) => failure,
        };
        match failure {
            Failure::Fatal(e) => return Err(e),
            Failure::Restart if restarts < MAX_RESTARTS => {
                restarts += 1;
                attempt -= 1;
                entry.discard_part();
            }
            Failure::Restart => {
                entry.discard_part();
                if attempt >= attempts {
                    return Err(entry.gave_up(attempt, "the server's range answers did not fit".into()));
                }
                std::thread::sleep(backoff_delay(opts.backoff, attempt));
            }
            Failure::Transient(message) => {
                if attempt >= attempts {
                    return Err(entry.gave_up(attempt, message));
                }
                std::thread::sleep(backoff_delay(opts.backoff, attempt));
            }
        }
    }
}

/// The pause after failed attempt `attempt` (1-based): `base · 2^(attempt-1)`, capped.
fn backoff_delay(base: Duration, attempt: u32) -> Duration {
    let factor = 1u32 << attempt.saturating_sub(1).min(20);
    base.saturating_mul(factor).min(MAX_BACKOFF)
}

/// A sha256 (full or prefix) the downloaded file must match.
struct ExpectedHash {
    hex: String,
    source: HashSource,
}

fn expected_hashes(url: &str, opts: &FetchOptions) -> Result<Vec<ExpectedHash>, FetchError> {
    let mut expected = Vec::new();
    if let Some(given) = &opts.sha256 {
        let hex = given.trim().to_ascii_lowercase();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(FetchError::BadExpectedSha256 { url: url.to_string(), given: given.clone() });
        }
        expected.push(ExpectedHash { hex, source: HashSource::Option });
    }
    if let Some(hex) = name_embedded_hash(url) {
        expected.push(ExpectedHash { hex, source: HashSource::FileName });
    }
    Ok(expected)
}

fn first_mismatch<'a>(expected: &'a [ExpectedHash], actual: &str) -> Option<&'a ExpectedHash> {
    expected.iter().find(|e| !actual.starts_with(&e.hex))
}

fn build_client(url: &str, opts: &FetchOptions) -> Result<Client, FetchError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::builder()
        .user_agent(opts.user_agent.clone())
        .connect_timeout(opts.connect_timeout)
        // In the blocking client this bounds the wait for the headers and each body read.
        .timeout(opts.read_timeout)
        .build()
        .map_err(|e| FetchError::Request { url: url.to_string(), message: error_chain(&e) })
}

/// An error and its sources on one line, without repeating a message its cause repeats.
fn error_chain(e: &dyn StdError) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// What the cache holds for a URL.
enum Reuse<'e> {
    /// Nothing usable (absent, incomplete, or changed since it was recorded).
    Miss,
    /// An intact copy with the expected hashes.
    Hit(Fetched),
    /// An intact copy (its recorded sha256) that does not have an expected hash.
    IntactButUnexpected { path: PathBuf, actual: String, bad: &'e ExpectedHash },
}

/// The certificate error in a failed request's causes, if that is why it failed (rustls
/// reports it as `invalid peer certificate: ...`, possibly inside an `io::Error`).
fn certificate_problem(e: &(dyn StdError + 'static)) -> Option<String> {
    let mut next = Some(e);
    while let Some(err) = next {
        let tls = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<io::Error>().and_then(|io| io.get_ref()).and_then(|i| i.downcast_ref::<rustls::Error>())
        });
        if let Some(
            t @ (rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::UnsupportedNameType),
        ) = tls
        {
            return Some(t.to_string());
        }
        next = err.source();
    }
    // Some layers between reqwest and rustls keep only the message.
    let text = error_chain(e);
    text.find("invalid peer certificate").map(|at| text[at..].to_string())
}

/// How one attempt went wrong.
enum Failure {
    /// Try again after a pause (network trouble, 5xx, truncated body).
    Transient(String),
    /// The `.part` cannot be continued: drop it and start from byte 0 right away.
    Restart,
    /// Stop now.
    Fatal(FetchError),
}

/// A body that streamed in completely.
struct Downloaded {
    sha256: String,
    bytes: u64,
    resumed_from: u64,
    etag: Option<String>,
    last_modified: Option<String>,
}

/// The record kept next to a finished file.
#[derive(Debug, Serialize, Deserialize)]
struct FinishedRecord {
    url: String,
    size: u64,
    sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_modified: Option<String>,
}

/// The record kept next to a `.part`: what the server said when it was started.
#[derive(Debug, Serialize, Deserialize)]
struct PartRecord {
    url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_modified: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    total: Option<u64>,
}

impl PartRecord {
    /// The `If-Range` value: a strong ETag, else the Last-Modified date.
    fn validator(&self) -> Option<&str> {
        match &self.etag {
            Some(tag) if !tag.starts_with("W/") => Some(tag),
            _ => self.last_modified.as_deref(),
        }
    }
}

/// One URL's files in the cache, as [`list_cache`] finds them.
#[derive(Debug, Clone, Serialize)]
pub struct CachedFile {
    /// The URL it was downloaded from.
    pub url: String,
    /// The file: the finished download, or the `.part` of an unfinished one.
    pub path: PathBuf,
    /// Its size on disk.
    pub bytes: u64,
    /// The sha256 recorded when it finished (none for an unfinished download).
    pub sha256: Option<String>,
    /// True for a finished download, false for a `.part` a later fetch resumes.
    pub complete: bool,
}

/// Whether `name` is a cache entry's folder name (the sha256 of a URL): only such folders
/// are ever listed or removed, whatever else the cache root holds.
fn is_entry_folder(name: &std::ffi::OsStr) -> bool {
    name.to_str().is_some_and(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Every download in the cache at `root` (finished ones and `.part`s), sorted by URL. A
/// missing root is an empty cache.
pub fn list_cache(root: &Path) -> io::Result<Vec<CachedFile>> {
    let mut found = Vec::new();
    let folders = match fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e),
    };
    for folder in folders {
        let folder = folder?;
        if !is_entry_folder(&folder.file_name()) || !folder.file_type()?.is_dir() {
            continue;
        }
        for file in fs::read_dir(folder.path())? {
            let file = file?.path();
            let Some(name) = file.file_name().and_then(|n| n.to_str()) else { continue };
            let size = |p: &Path| fs::metadata(p).map(|m| m.len()).ok();
            if let Some(stem) = name.strip_suffix(".part.json") {
                let part = file.with_file_name(format!("{stem}.part"));
                if let (Some(rec), Some(bytes)) = (read_json::<PartRecord>(&file), size(&part)) {
                    found.push(CachedFile { url: rec.url, path: part, bytes, sha256: None, complete: false });
                }
            } else if let Some(stem) = name.strip_suffix(".json") {
                let done = file.with_file_name(stem);
                if let (Some(rec), Some(bytes)) = (read_json::<FinishedRecord>(&file), size(&done)) {
                    found.push(CachedFile {
                        url: rec.url,
                        path: done,
                        bytes,
                        sha256: Some(rec.sha256),
                        complete: true,
                    });
                }
            }
        }
    }
    found.sort_by(|a, b| (&a.url, a.complete).cmp(&(&b.url, b.complete)));
    Ok(found)
}

/// Removes the cache entries of `urls` (every entry when `urls` is empty) from the cache at
/// `root` and returns what was removed. Only entry folders are touched; an entry another
/// process is downloading into is an error, and nothing of it is removed.
pub fn clean_cache(root: &Path, urls: &[String]) -> Result<Vec<CachedFile>, FetchError> {
    let all = list_cache(root).map_err(|source| FetchError::Cache {
        url: String::new(),
        path: root.to_path_buf(),
        source,
    })?;
    let folders: Vec<(String, PathBuf)> = if urls.is_empty() {
        let mut dirs: Vec<(String, PathBuf)> = Vec::new();
        let rd = match fs::read_dir(root) {
            Ok(rd) => rd.filter_map(|e| e.ok()).collect::<Vec<_>>(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(FetchError::Cache { url: String::new(), path: root.to_path_buf(), source }),
        };
        for e in rd {
            if is_entry_folder(&e.file_name()) && e.file_type().is_ok_and(|t| t.is_dir()) {
                let url =
                    all.iter().find(|f| f.path.parent() == Some(&e.path())).map(|f| f.url.clone()).unwrap_or_default();
                dirs.push((url, e.path()));
            }
        }
        dirs
    } else {
        urls.iter().map(|u| (u.clone(), CacheEntry::new(root, u).dir)).collect()
    };
    let mut removed = Vec::new();
    for (url, dir) in folders {
        if !dir.is_dir() {
            continue;
        }
        let err =
            |path: &Path, source: io::Error| FetchError::Cache { url: url.clone(), path: path.to_path_buf(), source };
        let lock_path = dir.join(".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .map_err(|e| err(&lock_path, e))?;
        if lock.try_lock().is_err() {
            return Err(err(
                &dir,
                io::Error::other("another ckptmap is downloading into it; try again when it has finished"),
            ));
        }
        fs::remove_dir_all(&dir).map_err(|e| err(&dir, e))?;
        removed.extend(all.iter().filter(|f| f.path.parent() == Some(dir.as_path())).cloned());
    }
    Ok(removed)
}

/// Calls `Progress::end` when dropped, so every `begin` gets its `end`.
struct ProgressJob<'a>(&'a dyn Progress);

impl<'a> ProgressJob<'a> {
    fn begin(progress: &'a dyn Progress, label: &str, total: Option<u64>) -> Self {
        progress.begin(label, total);
        ProgressJob(progress)
    }
}

impl Drop for ProgressJob<'_> {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// One URL's folder in the cache.
struct CacheEntry {
    url: String,
    dir: PathBuf,
    name: String,
}

impl CacheEntry {
    fn new(root: &Path, url: &str) -> Self {
        let key = hex::encode(Sha256::digest(url.as_bytes()));
        CacheEntry { url: url.to_string(), dir: root.join(key), name: file_name_for(url) }
    }

    fn finished(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    fn finished_record(&self) -> PathBuf {
        self.dir.join(format!("{}.json", self.name))
    }

    fn part(&self) -> PathBuf {
        self.dir.join(format!("{}.part", self.name))
    }

    fn part_record(&self) -> PathBuf {
        self.dir.join(format!("{}.part.json", self.name))
    }

    fn cache_err(&self, path: &Path, source: io::Error) -> FetchError {
        FetchError::Cache { url: self.url.clone(), path: path.to_path_buf(), source }
    }

    fn gave_up(&self, attempts: u32, last: String) -> FetchError {
        FetchError::GaveUp { url: self.url.clone(), attempts, last }
    }

    fn create_dir(&self) -> Result<(), FetchError> {
        fs::create_dir_all(&self.dir).map_err(|e| self.cache_err(&self.dir, e))
    }

    /// Holds this URL's lock until the returned file is dropped: two fetches of one URL
    /// (threads or processes) never write the same `.part`; the second finds the first's file.
    fn lock(&self) -> Result<File, FetchError> {
        let path = self.dir.join(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| self.cache_err(&path, e))?;
        file.lock().map_err(|e| self.cache_err(&path, e))?;
        Ok(file)
    }

    /// The cached file, if its record matches it (re-hashed) and the expected hashes.
    fn reuse<'e>(&self, expected: &'e [ExpectedHash], progress: &dyn Progress) -> Result<Reuse<'e>, FetchError> {
        let Some(record) = read_json::<FinishedRecord>(&self.finished_record()) else {
            return Ok(Reuse::Miss);
        };
        let path = self.finished();
        let size = match fs::metadata(&path) {
            Ok(meta) if meta.is_file() => meta.len(),
            _ => return Ok(Reuse::Miss),
        };
        if record.url != self.url || record.size != size {
            return Ok(Reuse::Miss);
        }
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(_) => return Ok(Reuse::Miss),
        };
        let mut hasher = Sha256::new();
        {
            let _job = ProgressJob::begin(progress, &format!("checking {}", self.name), Some(size));
            hash_prefix(&mut file, u64::MAX, &mut hasher, &mut |n| progress.advance(n))
                .map_err(|e| self.cache_err(&path, e))?;
        }
        let actual = hex::encode(hasher.finalize());
        if actual != record.sha256 {
            return Ok(Reuse::Miss);
        }
        if let Some(bad) = first_mismatch(expected, &actual) {
            return Ok(Reuse::IntactButUnexpected { path, actual, bad });
        }
        Ok(Reuse::Hit(Fetched { path, sha256: actual, bytes: size, from_cache: true, resumed_from: 0 }))
    }

    /// Removes a finished file that cannot be reused (record first, then the file).
    fn forget_finished(&self) -> Result<(), FetchError> {
        for path in [self.finished_record(), self.finished()] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.cache_err(&path, e)),
            }
        }
        Ok(())
    }

    fn discard_part(&self) {
        let _ = fs::remove_file(self.part());
        let _ = fs::remove_file(self.part_record());
    }

    /// One request: resumes the `.part` when there is one, streams the body into it while
    /// hashing, and checks that the body was complete.
    fn download_once(&self, client: &Client, progress: &dyn Progress) -> Result<Downloaded, Failure> {
        let part_path = self.part();
        let offset = fs::metadata(&part_path).map(|m| m.len()).unwrap_or(0);
        let part_record = read_json::<PartRecord>(&self.part_record()).filter(|r| r.url == self.url);

        let mut request = client.get(&self.url);
        if offset > 0 {
            request = request.header(RANGE, format!("bytes={offset}-"));
            if let Some(validator) = part_record.as_ref().and_then(PartRecord::validator) {
                request = request.header(IF_RANGE, validator);
            }
        }
        let response = request.send().map_err(|e| self.classify(e))?;
        let status = response.status().as_u16();
        let etag = header_text(response.headers(), ETAG);
        let last_modified = header_text(response.headers(), LAST_MODIFIED);

        let resume_at = match status {
            206 if offset > 0 => {
                let range = header_text(response.headers(), CONTENT_RANGE).as_deref().and_then(parse_content_range);
                let fits = match (range, &part_record) {
                    (Some((start, total)), record) => {
                        start == offset
                            && match (record, total) {
                                (Some(r), Some(t)) => r.total.is_none_or(|rt| rt == t),
                                _ => true,
                            }
                            && match (record.as_ref().and_then(|r| r.etag.as_ref()), &etag) {
                                (Some(old), Some(new)) => old == new,
                                _ => true,
                            }
                    }
                    (None, _) => false,
                };
                if !fits {
                    return Err(Failure::Restart);
                }
                offset
            }
            416 if offset > 0 => return Err(Failure::Restart),
            200..=299 if status != 206 => 0,
            500..=599 => return Err(Failure::Transient(format!("HTTP {status}"))),
            _ => return Err(Failure::Fatal(FetchError::Http { url: self.url.clone(), status })),
        };
        let total = if resume_at > 0 {
            header_text(response.headers(), CONTENT_RANGE)
                .as_deref()
                .and_then(parse_content_range)
                .and_then(|(_, total)| total)
                .or_else(|| response.content_length().map(|n| resume_at + n))
        } else {
            response.content_length()
        };

        let mut hasher = Sha256::new();
        let mut file;
        let _job = ProgressJob::begin(progress, &self.name, total);
        if resume_at > 0 {
            file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&part_path)
                .map_err(|e| self.fatal_cache(&part_path, e))?;
            let hashed = hash_prefix(&mut file, resume_at, &mut hasher, &mut |n| progress.advance(n))
                .map_err(|e| self.fatal_cache(&part_path, e))?;
            if hashed != resume_at {
                return Err(Failure::Restart);
            }
            file.seek(SeekFrom::Start(resume_at)).map_err(|e| self.fatal_cache(&part_path, e))?;
        } else {
            // A fresh start: record the validators first, so a cut download can resume.
            let record =
                PartRecord { url: self.url.clone(), etag: etag.clone(), last_modified: last_modified.clone(), total };
            let _ = fs::remove_file(self.part_record());
            file = File::create(&part_path).map_err(|e| self.fatal_cache(&part_path, e))?;
            write_json(&self.part_record(), &record).map_err(|e| self.fatal_cache(&self.part_record(), e))?;
        }

        let written = self.stream_body(response, &mut file, &mut hasher, progress, resume_at)?;
        let size = resume_at + written;
        if let Some(total) = total {
            if size != total {
                return Err(Failure::Transient(format!("the body ended after {size} of {total} bytes")));
            }
        }
        file.sync_all().map_err(|e| self.fatal_cache(&part_path, e))?;
        Ok(Downloaded {
            sha256: hex::encode(hasher.finalize()),
            bytes: size,
            resumed_from: resume_at,
            etag,
            last_modified,
        })
    }

    /// Copies the body into `file` with a fixed buffer; returns the bytes written.
    fn stream_body(
        &self,
        mut response: Response,
        file: &mut File,
        hasher: &mut Sha256,
        progress: &dyn Progress,
        resume_at: u64,
    ) -> Result<u64, Failure> {
        let part_path = self.part();
        let mut buf = vec![0u8; CHUNK];
        let mut written = 0u64;
        loop {
            let n = match response.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // What arrived stays in the .part for the next attempt.
                    let _ = file.flush();
                    return Err(Failure::Transient(format!(
                        "reading the body failed at byte {}: {}",
                        resume_at + written,
                        error_chain(&e)
                    )));
                }
            };
            file.write_all(&buf[..n]).map_err(|e| self.fatal_cache(&part_path, e))?;
            hasher.update(&buf[..n]);
            written += n as u64;
            progress.advance(n as u64);
        }
        Ok(written)
    }

    /// Publishes a verified `.part`: rename to the final name, then write its record.
    fn commit(&self, done: Downloaded) -> Result<Fetched, FetchError> {
        let path = self.finished();
        fs::rename(self.part(), &path).map_err(|e| self.cache_err(&path, e))?;
        let record = FinishedRecord {
            url: self.url.clone(),
            size: done.bytes,
            sha256: done.sha256.clone(),
            etag: done.etag,
            last_modified: done.last_modified,
        };
        let record_path = self.finished_record();
        write_json(&record_path, &record).map_err(|e| self.cache_err(&record_path, e))?;
        let _ = fs::remove_file(self.part_record());
        Ok(Fetched { path, sha256: done.sha256, bytes: done.bytes, from_cache: false, resumed_from: done.resumed_from })
    }

    fn fatal_cache(&self, path: &Path, source: io::Error) -> Failure {
        Failure::Fatal(self.cache_err(path, source))
    }

    /// Sorts a failed request: bad URLs and redirect loops are final, the rest is retried.
    fn classify(&self, e: reqwest::Error) -> Failure {
        // The error names the URL already carried by every FetchError.
        let e = e.without_url();
        if let Some(message) = certificate_problem(&e) {
            return Failure::Fatal(FetchError::Certificate { url: self.url.clone(), message });
        }
        if e.is_builder() || e.is_redirect() {
            Failure::Fatal(FetchError::Request { url: self.url.clone(), message: error_chain(&e) })
        } else {
            Failure::Transient(error_chain(&e))
        }
    }
}

/// The cache file name for a URL: its last path segment, with characters that are not
/// safe in file names replaced by `_`.
fn file_name_for(url: &str) -> String {
    let segment = reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.path_segments().and_then(|mut segments| segments.next_back().map(str::to_string)))
        .unwrap_or_default();
    let mut name: String =
        segment.chars().map(|c| if c.is_ascii_alphanumeric() || "._-+=@,%".contains(c) { c } else { '_' }).collect();
    if name.len() > 200 {
        name.truncate(200);
    }
    if name.is_empty() || name.chars().all(|c| c == '.') {
        return "download".to_string();
    }
    if name.starts_with('.') {
        name.insert(0, '_');
    }
    name
}

/// `bytes START-END/TOTAL` → (START, TOTAL); TOTAL is `None` for `*`.
fn parse_content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.trim().split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    if end < start {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => {
            let t: u64 = t.parse().ok()?;
            if end >= t {
                return None;
            }
            Some(t)
        }
    };
    Some((start, total))
}

fn header_text(headers: &HeaderMap, name: reqwest::header::HeaderName) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let text = fs::read(path).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Writes JSON next to `path` and renames it into place.
fn write_json<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let text = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut file = File::create(&tmp)?;
        file.write_all(&text)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_dir_precedence() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |key: &str| pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| OsString::from(v))
        };
        let all: &[(&str, &str)] = &[("CKPTMAP_CACHE", "/c"), ("XDG_CACHE_HOME", "/x"), ("HOME", "/h")];
        assert_eq!(resolve_cache_dir(Some(Path::new("/o")), env(all)), PathBuf::from("/o"));
        assert_eq!(resolve_cache_dir(None, env(all)), PathBuf::from("/c"));
        let no_ckpt: &[(&str, &str)] = &[("CKPTMAP_CACHE", ""), ("XDG_CACHE_HOME", "/x"), ("HOME", "/h")];
        assert_eq!(resolve_cache_dir(None, env(no_ckpt)), PathBuf::from("/x/ckptmap"));
        let relative_xdg: &[(&str, &str)] = &[("XDG_CACHE_HOME", "rel"), ("HOME", "/h")];
        if !cfg!(windows) {
            assert_eq!(resolve_cache_dir(None, env(relative_xdg)), PathBuf::from("/h/.cache/ckptmap"));
        }
        assert_eq!(resolve_cache_dir(None, env(&[])), std::env::temp_dir().join("ckptmap"));
    }

    #[test]
    fn content_range_parsing() {
        assert_eq!(parse_content_range("bytes 100-199/200"), Some((100, Some(200))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("bytes */200"), None);
        assert_eq!(parse_content_range("bytes 9-5/200"), None);
        assert_eq!(parse_content_range("bytes 0-200/200"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }

    #[test]
    fn file_names_from_urls() {
        assert_eq!(file_name_for("https://h/a/b/model-abc.pth?x=1#f"), "model-abc.pth");
        assert_eq!(file_name_for("https://h/"), "download");
        assert_eq!(file_name_for("https://h"), "download");
        assert_eq!(file_name_for("https://h/a%20b.pth"), "a%20b.pth");
        assert_eq!(file_name_for("https://h/.lock"), "_.lock");
        assert_eq!(file_name_for("https://h/a/.."), "download");
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let base = Duration::from_millis(100);
        assert_eq!(backoff_delay(base, 1), Duration::from_millis(100));
        assert_eq!(backoff_delay(base, 2), Duration::from_millis(200));
        assert_eq!(backoff_delay(base, 4), Duration::from_millis(800));
        assert_eq!(backoff_delay(base, 1000), MAX_BACKOFF);
    }
}
