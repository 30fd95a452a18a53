//! The list format of `ckptmap batch` (see the module docs of [`crate::batch`]).

use std::path::{Path, PathBuf};

use super::{DEFAULT_SUFFIX, REPORT_FILE};
use crate::fetch;
use crate::write::execute::OutputFormat;

/// Where an item's checkpoint comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// An `http://` or `https://` URL, fetched through the download cache.
    Url(String),
    /// A local file (relative paths already resolved against the list's folder).
    Path(PathBuf),
}

impl Source {
    /// The URL, or the path as text; what the report records.
    pub fn text(&self) -> String {
        match self {
            Source::Url(u) => u.clone(),
            Source::Path(p) => p.display().to_string(),
        }
    }
}

/// One line of a list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListItem {
    /// 1-based line number in the list file.
    pub line: usize,
    pub source: Source,
    /// The output's file name inside the output folder.
    pub output: String,
    /// `mapping=`: a built-in table name or a TOML file (resolved like sources).
    pub mapping: Option<String>,
    /// `sha256=`: the expected sha256 of the input, lowercase hex.
    pub sha256: Option<String>,
}

/// A line of the list that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {message}", file.display())]
pub struct ListError {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    pub message: String,
}

/// Parses a list's text. `list_file` names the file in errors, and its folder anchors
/// relative paths. Checks every line (syntax, hashes, output names, duplicates) and returns
/// the first problem.
pub fn parse_list(text: &str, list_file: &Path) -> Result<Vec<ListItem>, ListError> {
    let base = list_file.parent().unwrap_or(Path::new(""));
    let err = |line: usize, message: String| ListError { file: list_file.to_path_buf(), line, message };
    let mut items: Vec<ListItem> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let mut tokens = Vec::new();
        for token in raw.split_whitespace() {
            if token.starts_with('#') {
                break;
            }
            tokens.push(token);
        }
        let Some((&first, fields)) = tokens.split_first() else {
            continue;
        };
        let source = if fetch::is_url(first) {
            Source::Url(first.to_string())
        } else if first.contains("://") {
            return Err(err(line, format!("{first:?} is not an http(s) URL (only http:// and https:// can be fetched; write local files as paths)")));
        } else {
            Source::Path(resolve(base, first))
        };
        let (mut name, mut mapping, mut sha256) = (None, None, None);
        for field in fields {
            let Some((key, value)) = field.split_once('=') else {
                return Err(err(line, format!("{field:?} is not a key=value field (fields after the source: name=FILE, mapping=NAME|FILE.toml, sha256=HEX)")));
            };
            if value.is_empty() {
                return Err(err(line, format!("{key}= has no value")));
            }
            let slot = match key {
                "name" => &mut name,
                "mapping" => &mut mapping,
                "sha256" => &mut sha256,
                _ => return Err(err(line, format!("unknown field {key:?} (known: name, mapping, sha256)"))),
            };
            if slot.is_some() {
                return Err(err(line, format!("{key}= given twice")));
            }
            *slot = Some(value.to_string());
        }
        if let Some(h) = &sha256 {
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err(line, format!("sha256={h} is not 64 hex digits")));
            }
        }
        let output = match name {
            Some(n) => {
                check_output_name(&n).map_err(|m| err(line, m))?;
                n
            }
            None => default_output_name(&source).ok_or_else(|| {
                err(line, format!("cannot name an output after {first:?} (no file name in it); add name=FILE.pth"))
            })?,
        };
        if let Some(prev) = items.iter().find(|it| it.output == output) {
            return Err(err(
                line,
                format!("output {output} is also written by line {}; give one of them another name=", prev.line),
            ));
        }
        let mapping = mapping.map(|m| {
            if m.ends_with(".toml") || m.contains('/') {
                resolve(base, &m).display().to_string()
            } else {
                m
            }
        });
        items.push(ListItem { line, source, output, mapping, sha256: sha256.map(|h| h.to_ascii_lowercase()) });
    }
    Ok(items)
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() || base.as_os_str().is_empty() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// An output name must be a plain file name with a .pth-family or .safetensors extension.
fn check_output_name(name: &str) -> Result<(), String> {
    if name.contains('/') || name.contains('\\') || name == "." || name == ".." {
        return Err(format!("name={name} must be a file name, not a path (outputs go into --out-dir)"));
    }
    if name.starts_with('.') {
        return Err(format!("name={name} must not start with '.'"));
    }
    if name == REPORT_FILE {
        return Err(format!("name={name} is the batch report's name"));
    }
    OutputFormat::from_path(Path::new(name))
        .map(|_| ())
        .map_err(|_| format!("name={name} must end in .pth, .pt, .bin, .ckpt or .safetensors"))
}

/// `<stem of the source's file name>_mmseg.pth`, e.g. `mae_pretrain_vit_base_mmseg.pth`.
pub fn default_output_name(source: &Source) -> Option<String> {
    let file = match source {
        Source::Url(u) => {
            let path = reqwest::Url::parse(u).ok()?.path().to_string();
            path.rsplit('/').next().unwrap_or("").to_string()
        }
        Source::Path(p) => p.file_name()?.to_string_lossy().into_owned(),
    };
    let stem = Path::new(&file).file_stem()?.to_string_lossy().into_owned();
    if stem.is_empty() || stem.starts_with('.') {
        return None;
    }
    Some(format!("{stem}{DEFAULT_SUFFIX}"))
}
