//! Mapping tables: the TOML format (documented for users in `mappings/README.md`), its
//! compiler, the built-in tables, and family detection from key fingerprints.
//!
//! A table is data: containers to unwrap, key prefixes to strip, a detection fingerprint,
//! variables read from the checkpoint's names and shapes (or from command-line options),
//! ordered rules (first match wins per source key) and the target key set with shapes.
//! Compiling checks everything that can be checked without a checkpoint: regexes, `${n}`
//! capture references, transform names and parameters, expressions, variable references
//! and cycles. Applying a table to a checkpoint is `plan::plan`'s job.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::OnceLock;

use regex::Regex;
use serde::Deserialize;

/// The only table format version this build reads (`format = 1` in the file; optional).
pub const FORMAT_VERSION: i64 = 1;

/// Container keys tried when a table names none: the converter takes the first that exists
/// in the checkpoint and holds tensors; `""` is the top level.
pub const DEFAULT_CONTAINERS: [&str; 4] = ["state_dict", "model", "module", ""];

/// The tables compiled into the binary: (name, TOML text).
const BUILTIN_SOURCES: [(&str, &str); 2] = [
    ("mae", include_str!("../../mappings/mae.toml")),
    ("beit", include_str!("../../mappings/beit.toml")),
];

/// Everything that can be wrong with a table, or with choosing one. Each message is one line
/// and names the table (by origin: a built-in name or a file path) and the place in it.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("{origin}: {message}")]
    Toml { origin: String, message: String },
    #[error("{origin}: table format {found} is not supported (this build reads format {FORMAT_VERSION})")]
    Format { origin: String, found: i64 },
    #[error("{origin}: {place}: invalid regex '{pattern}': {message}")]
    InvalidRegex {
        origin: String,
        place: String,
        pattern: String,
        message: String,
    },
    #[error("{origin}: {place}: unknown transform '{name}' ({known})")]
    UnknownTransform {
        origin: String,
        place: String,
        name: String,
        known: String,
    },
    #[error("{origin}: {place}: transform '{transform}': {message}")]
    TransformParam {
        origin: String,
        place: String,
        transform: String,
        message: String,
    },
    #[error("{origin}: rule '{rule}': template '{template}' refers to capture ${{{capture}}}, but {pattern}")]
    BadCapture {
        origin: String,
        rule: String,
        template: String,
        capture: String,
        pattern: String,
    },
    #[error("{origin}: {place}: template '{template}': {message}")]
    BadTemplate {
        origin: String,
        place: String,
        template: String,
        message: String,
    },
    #[error("{origin}: {place}: expression '{expr}': {message}")]
    BadExpression {
        origin: String,
        place: String,
        expr: String,
        message: String,
    },
    #[error("{origin}: {place}: {message}")]
    Invalid {
        origin: String,
        place: String,
        message: String,
    },
    #[error(
        "unknown mapping table '{name}' (built in: {known}); pass the path of a table file instead"
    )]
    UnknownTable { name: String, known: String },
    #[error("no mapping table recognises this checkpoint ({reasons}); choose one with --mapping")]
    NoTableMatches { reasons: String },
    #[error(
        "several mapping tables recognise this checkpoint ({names}); choose one with --mapping"
    )]
    SeveralTablesMatch { names: String },
}

/// What happens to a source key that no rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownKeys {
    /// A planning error naming the key (the default: nothing silent).
    #[default]
    Error,
    /// Dropped, and listed in the plan's `dropped` with the reason "no rule matches".
    Drop,
}

/// When a rule or a target maker is active.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum When {
    #[default]
    Always,
    /// Only when `img_size` is given (load-ready output).
    LoadReady,
    /// Only when `img_size` is not given (renames only).
    RenameOnly,
}

impl When {
    pub(crate) fn active(self, load_ready: bool) -> bool {
        match self {
            When::Always => true,
            When::LoadReady => load_ready,
            When::RenameOnly => !load_ready,
        }
    }
}

/// A compiled mapping table.
#[derive(Debug)]
pub struct MappingTable {
    name: String,
    description: String,
    origin: String,
    unknown_keys: UnknownKeys,
    containers: Vec<String>,
    strip_prefixes: Vec<String>,
    require: Vec<Pattern>,
    forbid: Vec<Pattern>,
    pub(crate) vars: BTreeMap<String, VarDef>,
    pub(crate) checks: Vec<Check>,
    pub(crate) rules: Vec<Rule>,
    pub(crate) targets: Vec<TargetSpec>,
}

/// The names and descriptions of the tables built into the binary.
pub fn builtin_tables() -> Vec<(&'static str, &'static str)> {
    builtins()
        .iter()
        .map(|t| (t.name.as_str(), t.description.as_str()))
        .collect()
}

/// The TOML text of a built-in table (for `--show`-style listings).
pub fn builtin_table_text(name: &str) -> Option<&'static str> {
    BUILTIN_SOURCES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, text)| *text)
}

fn builtins() -> &'static [MappingTable] {
    static TABLES: OnceLock<Vec<MappingTable>> = OnceLock::new();
    TABLES.get_or_init(|| {
        BUILTIN_SOURCES
            .iter()
            .map(|(name, text)| {
                MappingTable::parse(text, &format!("builtin:{name}"))
                    .unwrap_or_else(|e| panic!("built-in mapping table '{name}' is invalid: {e}"))
            })
            .collect()
    })
}

/// Picks the built-in table whose fingerprint matches `names` (checkpoint keys, relative to
/// the unwrapped container, prefixes not yet stripped). Exactly one must match.
pub fn detect<S: AsRef<str>>(names: &[S]) -> Result<&'static MappingTable, TableError> {
    detect_among(builtins(), names)
}

/// [`detect`] over any set of tables.
pub fn detect_among<'t, S: AsRef<str>>(
    tables: impl IntoIterator<Item = &'t MappingTable>,
    names: &[S],
) -> Result<&'t MappingTable, TableError> {
    let mut matched = Vec::new();
    let mut reasons = Vec::new();
    for table in tables {
        match table.recognises(names) {
            Ok(()) => matched.push(table),
            Err(why) => reasons.push(format!("{}: {why}", table.name)),
        }
    }
    match matched.len() {
        1 => Ok(matched[0]),
        0 => Err(TableError::NoTableMatches {
            reasons: if reasons.is_empty() {
                "no tables".into()
            } else {
                reasons.join("; ")
            },
        }),
        _ => Err(TableError::SeveralTablesMatch {
            names: matched
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

impl MappingTable {
    /// A built-in table by name.
    pub fn builtin(name: &str) -> Result<&'static MappingTable, TableError> {
        builtins()
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| TableError::UnknownTable {
                name: name.to_string(),
                known: builtins()
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Compiles a table from TOML text. `origin` names it in every error (a path or
    /// `builtin:NAME`).
    pub fn parse(text: &str, origin: &str) -> Result<MappingTable, TableError> {
        let raw: RawTable = toml::from_str(text).map_err(|e| TableError::Toml {
            origin: origin.to_string(),
            message: toml_message(text, &e),
        })?;
        Compiler { origin }.table(raw)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn description(&self) -> &str {
        &self.description
    }
    /// Where the table came from (`builtin:mae` or the path the caller gave).
    pub fn origin(&self) -> &str {
        &self.origin
    }
    /// Container keys to unwrap, in the order to try them; `""` is the top level.
    pub fn containers(&self) -> &[String] {
        &self.containers
    }
    pub fn strip_prefixes(&self) -> &[String] {
        &self.strip_prefixes
    }
    pub fn unknown_keys(&self) -> UnknownKeys {
        self.unknown_keys
    }

    /// The key with the table's prefixes stripped: repeatedly, the first listed prefix the
    /// key starts with is removed, until none matches (`module.encoder.x` → `x`).
    pub fn strip<'k>(&self, key: &'k str) -> &'k str {
        let mut key = key;
        'again: loop {
            for prefix in &self.strip_prefixes {
                if let Some(rest) = key.strip_prefix(prefix.as_str()) {
                    key = rest;
                    continue 'again;
                }
            }
            return key;
        }
    }

    /// `Ok` when this table's fingerprint matches the (unstripped) names; otherwise why not.
    /// A table without `detect.require` patterns is never detected (only chosen by name).
    pub fn recognises<S: AsRef<str>>(&self, names: &[S]) -> Result<(), String> {
        if self.require.is_empty() {
            return Err("the table has no detect.require patterns".into());
        }
        let keys: Vec<&str> = names.iter().map(|n| self.strip(n.as_ref())).collect();
        for p in &self.require {
            if !keys.iter().any(|k| p.regex.is_match(k)) {
                return Err(format!("no key matches '{}'", p.text));
            }
        }
        for p in &self.forbid {
            if let Some(k) = keys.iter().find(|k| p.regex.is_match(k)) {
                return Err(format!("key '{k}' matches forbidden '{}'", p.text));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Compiled pieces (used by the planner).

/// A regex that must match a whole key.
#[derive(Debug, Clone)]
pub(crate) struct Pattern {
    pub text: String,
    pub regex: Regex,
}

#[derive(Debug)]
pub(crate) struct Rule {
    pub id: String,
    pub pattern: Pattern,
    pub action: Action,
    pub transform: Option<RuleTransform>,
    pub when: When,
    pub note: Option<String>,
}

#[derive(Debug)]
pub(crate) enum Action {
    Rename(Template),
    Keep,
    Drop(String),
    /// One source to every layer: the template holds `{i}`, which runs over 0..depth.
    Expand(Template),
}

#[derive(Debug)]
pub(crate) enum RuleTransform {
    ResizeAbsPosEmbed {
        num_extra: Formula,
        old_grid: Formula,
        new_grid: Formula,
    },
    ResizeRelPosTable {
        src_window: Formula,
        dst_window: Formula,
        num_heads: Formula,
    },
}

impl RuleTransform {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            RuleTransform::ResizeAbsPosEmbed { .. } => "resize_abs_pos_embed",
            RuleTransform::ResizeRelPosTable { .. } => "resize_rel_pos_table",
        }
    }
}

#[derive(Debug)]
pub(crate) struct TargetSpec {
    pub key: Template,
    pub shape: Vec<Formula>,
    pub required: bool,
    pub make: Option<Make>,
}

#[derive(Debug)]
pub(crate) struct Make {
    pub kind: MakeKind,
    pub when: When,
    pub note: Option<String>,
}

#[derive(Debug)]
pub(crate) enum MakeKind {
    Fill(FillValue),
    RelPosIndex { window: Formula },
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum FillValue {
    Const(f64),
    /// The `init_values` option, or this default.
    InitValues {
        default: f64,
    },
}

#[derive(Debug)]
pub(crate) struct VarDef {
    pub alternatives: Vec<Formula>,
    pub missing: Option<String>,
}

#[derive(Debug)]
pub(crate) struct Check {
    pub text: String,
    pub left: Expr,
    pub op: CmpOp,
    pub right: Expr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    pub(crate) fn holds(self, a: i64, b: i64) -> bool {
        match self {
            CmpOp::Eq => a == b,
            CmpOp::Ne => a != b,
            CmpOp::Lt => a < b,
            CmpOp::Le => a <= b,
            CmpOp::Gt => a > b,
            CmpOp::Ge => a >= b,
        }
    }
}

impl Check {
    pub(crate) fn vars_used(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.left.vars_used(&mut out);
        self.right.vars_used(&mut out);
        out
    }
}

// ---------------------------------------------------------------------------------------
// Templates: `${n}` / `${name}` regex captures, `{i}` the layer index.

#[derive(Debug, Clone)]
enum Piece {
    Lit(String),
    CaptureIndex(usize),
    CaptureName(String),
    Layer,
}

#[derive(Debug, Clone)]
pub(crate) struct Template {
    pub text: String,
    pieces: Vec<Piece>,
}

impl Template {
    fn parse(text: &str, captures: bool, layer: bool) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            if c == '$' {
                if !captures {
                    return Err(
                        "'$' has no meaning here (captures exist only in rule targets)".into(),
                    );
                }
                let Some(inner) = rest.strip_prefix("${") else {
                    return Err("write captures as ${1} or ${name}; a bare $1 is not accepted (in regex replacement syntax $1x means a group named '1x')".into());
                };
                let Some(end) = inner.find('}') else {
                    return Err("'${' without a closing '}'".into());
                };
                let name = &inner[..end];
                if !lit.is_empty() {
                    pieces.push(Piece::Lit(std::mem::take(&mut lit)));
                }
                if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) {
                    pieces
                        .push(Piece::CaptureIndex(name.parse().map_err(|_| {
                            format!("capture number '{name}' is too large")
                        })?));
                } else if !name.is_empty()
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    pieces.push(Piece::CaptureName(name.to_string()));
                } else {
                    return Err(format!("'${{{name}}}' is not a capture reference"));
                }
                rest = &inner[end + 1..];
            } else if c == '{' {
                let Some(after) = rest.strip_prefix("{i}") else {
                    return Err("'{' is only allowed as the layer placeholder {i}".into());
                };
                if !layer {
                    return Err("the layer placeholder {i} is only allowed in `expand` templates and target keys".into());
                }
                if !lit.is_empty() {
                    pieces.push(Piece::Lit(std::mem::take(&mut lit)));
                }
                pieces.push(Piece::Layer);
                rest = after;
            } else if c == '}' {
                return Err("unbalanced '}'".into());
            } else {
                lit.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
        if !lit.is_empty() {
            pieces.push(Piece::Lit(lit));
        }
        if pieces.is_empty() {
            return Err("empty template".into());
        }
        Ok(Template {
            text: text.to_string(),
            pieces,
        })
    }

    pub(crate) fn has_layer(&self) -> bool {
        self.pieces.iter().any(|p| matches!(p, Piece::Layer))
    }

    /// Fills the template. A capture group that did not take part in the match is empty.
    pub(crate) fn render(
        &self,
        caps: Option<&regex::Captures<'_>>,
        layer: Option<usize>,
    ) -> String {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Lit(s) => out.push_str(s),
                Piece::CaptureIndex(n) => {
                    out.push_str(caps.and_then(|c| c.get(*n)).map_or("", |m| m.as_str()))
                }
                Piece::CaptureName(n) => {
                    out.push_str(caps.and_then(|c| c.name(n)).map_or("", |m| m.as_str()))
                }
                Piece::Layer => {
                    out.push_str(&layer.map_or_else(|| "{i}".to_string(), |i| i.to_string()))
                }
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------
// Expressions: integer arithmetic over variables, source shapes, key counts and options.

/// An expression with the text it was written as (for messages).
#[derive(Debug, Clone)]
pub(crate) struct Formula {
    pub text: String,
    pub expr: Expr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinOp {
    Add,
    Sub,
    Mul,
    /// Exact division: an error when there is a remainder.
    Div,
    /// Floor division.
    FloorDiv,
    Rem,
}

/// Command-line options an expression may read with `option("...")`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OptName {
    ImgSize,
    NumHeads,
}

impl OptName {
    fn parse(s: &str) -> Option<OptName> {
        match s {
            "img_size" => Some(OptName::ImgSize),
            "num_heads" => Some(OptName::NumHeads),
            _ => None,
        }
    }
    pub(crate) fn name(self) -> &'static str {
        match self {
            OptName::ImgSize => "img_size",
            OptName::NumHeads => "num_heads",
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) enum Expr {
    Int(i64),
    Var(String),
    Neg(Box<Expr>),
    Bin(BinOp, Box<Expr>, Box<Expr>),
    Shape(String, Box<Expr>),
    Count(Pattern),
    Opt(OptName),
    Sqrt(Box<Expr>),
    Lookup(Box<Expr>, Vec<(i64, i64)>),
}

/// Why an expression has no value.
#[derive(Debug, Clone)]
pub(crate) enum EvalError {
    /// Something it reads is absent (a key, an option, a lookup entry): a variable with
    /// alternatives tries the next one.
    Unavailable(String),
    /// A contradiction (not a perfect square, inexact division, missing axis): an error.
    Failed(String),
}

/// What an expression can read; the planner implements it.
pub(crate) trait Env {
    fn var(&mut self, name: &str) -> Result<i64, EvalError>;
    fn shape(&self, key: &str) -> Option<Vec<usize>>;
    fn keys(&self) -> Vec<String>;
    fn option(&self, name: OptName) -> Option<i64>;
}

impl Expr {
    pub(crate) fn vars_used(&self, out: &mut Vec<String>) {
        match self {
            Expr::Int(_) | Expr::Count(_) | Expr::Opt(_) => {}
            Expr::Var(v) => {
                if !out.contains(v) {
                    out.push(v.clone())
                }
            }
            Expr::Neg(e) | Expr::Sqrt(e) | Expr::Shape(_, e) | Expr::Lookup(e, _) => {
                e.vars_used(out)
            }
            Expr::Bin(_, a, b) => {
                a.vars_used(out);
                b.vars_used(out);
            }
        }
    }

    pub(crate) fn eval(&self, env: &mut dyn Env) -> Result<i64, EvalError> {
        let fail = |m: String| Err(EvalError::Failed(m));
        match self {
            Expr::Int(v) => Ok(*v),
            Expr::Var(name) => env.var(name),
            Expr::Neg(e) => {
                let v = e.eval(env)?;
                v.checked_neg().ok_or_else(|| EvalError::Failed(format!("arithmetic overflow in -({v})")))
            }
            Expr::Bin(op, a, b) => {
                let (a, b) = (a.eval(env)?, b.eval(env)?);
                let overflow =
                    || EvalError::Failed(format!("arithmetic overflow in {a} {} {b}", op.symbol()));
                match op {
                    BinOp::Add => a.checked_add(b).ok_or_else(overflow),
                    BinOp::Sub => a.checked_sub(b).ok_or_else(overflow),
                    BinOp::Mul => a.checked_mul(b).ok_or_else(overflow),
                    BinOp::Div | BinOp::FloorDiv | BinOp::Rem if b == 0 => {
                        fail(format!("division by zero ({a} {} 0)", op.symbol()))
                    }
                    // (checked: i64::MIN / -1 overflows)
                    BinOp::Div if a.checked_rem(b).ok_or_else(overflow)? != 0 => {
                        fail(format!("{a} / {b} is not a whole number"))
                    }
                    BinOp::Div => a.checked_div(b).ok_or_else(overflow),
                    BinOp::FloorDiv => a.checked_div_euclid(b).ok_or_else(overflow),
                    BinOp::Rem => a.checked_rem_euclid(b).ok_or_else(overflow),
                }
            }
            Expr::Shape(key, axis) => {
                let axis = axis.eval(env)?;
                let Some(shape) = env.shape(key) else {
                    return Err(EvalError::Unavailable(format!("no source key '{key}'")));
                };
                let idx = if axis < 0 {
                    shape.len() as i64 + axis
                } else {
                    axis
                };
                match usize::try_from(idx).ok().and_then(|i| shape.get(i)) {
                    Some(&d) => Ok(d as i64),
                    None => fail(format!(
                        "'{key}' has shape {shape:?}, which has no axis {axis}"
                    )),
                }
            }
            Expr::Count(pattern) => count_distinct(&env.keys(), pattern).map_err(EvalError::Failed),
            Expr::Opt(name) => env
                .option(*name)
                .ok_or_else(|| EvalError::Unavailable(format!("option {} not given", name.name()))),
            Expr::Sqrt(e) => {
                let v = e.eval(env)?;
                match exact_sqrt(v) {
                    Some(r) => Ok(r),
                    None => fail(format!("sqrt({v}): {v} is not a perfect square")),
                }
            }
            Expr::Lookup(e, pairs) => {
                let v = e.eval(env)?;
                pairs
                    .iter()
                    .find(|(k, _)| *k == v)
                    .map(|(_, r)| *r)
                    .ok_or_else(|| EvalError::Unavailable(format!("lookup has no entry for {v}")))
            }
        }
    }
}

impl BinOp {
    fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::FloorDiv => "//",
            BinOp::Rem => "%",
        }
    }
}

fn exact_sqrt(v: i64) -> Option<i64> {
    if v < 0 {
        return None;
    }
    // In i128: near i64::MAX the square of the estimate (or of one more) overflows i64.
    let v = v as i128;
    let mut r = (v as f64).sqrt() as i128;
    while r * r > v {
        r -= 1;
    }
    while (r + 1) * (r + 1) <= v {
        r += 1;
    }
    (r * r == v).then_some(r as i64)
}

/// `count("regex")`: the number of distinct values of capture group 1 over the keys the
/// pattern matches. When every value is a number they must be exactly 0..n-1.
fn count_distinct(keys: &[String], pattern: &Pattern) -> Result<i64, String> {
    let mut values: Vec<String> = Vec::new();
    let mut seen = HashSet::new();
    for key in keys {
        if let Some(c) = pattern.regex.captures(key) {
            let v = c.get(1).map_or("", |m| m.as_str()).to_string();
            if seen.insert(v.clone()) {
                values.push(v);
            }
        }
    }
    let numbers: Option<Vec<u64>> = values.iter().map(|v| v.parse().ok()).collect();
    if let Some(mut numbers) = numbers {
        numbers.sort_unstable();
        if numbers.iter().enumerate().any(|(i, &n)| n != i as u64) {
            let shown: Vec<String> = numbers.iter().take(12).map(|n| n.to_string()).collect();
            return Err(format!(
                "count(\"{}\"): the captured indices are not 0..{} (found {}{})",
                pattern.text,
                numbers.len(),
                shown.join(","),
                if numbers.len() > 12 { ",…" } else { "" }
            ));
        }
    }
    Ok(values.len() as i64)
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Int(i64),
    Ident(String),
    Str(String),
    Sym(&'static str),
}

fn tokenize(text: &str) -> Result<Vec<Tok>, String> {
    const SYMS: [&str; 16] = [
        "//", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "<", ">", "(", ")", ",", ":",
    ];
    let mut toks = Vec::new();
    let mut rest = text;
    'outer: while let Some(c) = rest.chars().next() {
        if c.is_whitespace() {
            rest = &rest[c.len_utf8()..];
        } else if c.is_ascii_digit() {
            let end = rest
                .find(|ch: char| !ch.is_ascii_digit())
                .unwrap_or(rest.len());
            let n = rest[..end]
                .parse()
                .map_err(|_| format!("number '{}' is too large", &rest[..end]))?;
            toks.push(Tok::Int(n));
            rest = &rest[end..];
        } else if c.is_ascii_alphabetic() || c == '_' {
            let end = rest
                .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                .unwrap_or(rest.len());
            toks.push(Tok::Ident(rest[..end].to_string()));
            rest = &rest[end..];
        } else if c == '"' {
            let Some(end) = rest[1..].find('"') else {
                return Err("string without a closing '\"'".into());
            };
            toks.push(Tok::Str(rest[1..1 + end].to_string()));
            rest = &rest[end + 2..];
        } else {
            for s in SYMS {
                if let Some(r) = rest.strip_prefix(s) {
                    toks.push(Tok::Sym(s));
                    rest = r;
                    continue 'outer;
                }
            }
            return Err(format!("unexpected character '{c}'"));
        }
    }
    Ok(toks)
}

/// How deeply an expression may nest (parentheses, function arguments, unary minus): the
/// parser, evaluation and dropping all recurse.
const MAX_EXPR_DEPTH: usize = 64;

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }
    fn eat(&mut self, sym: &str) -> bool {
        if self.peek()
            == Some(&Tok::Sym(match sym {
                "(" => "(",
                ")" => ")",
                "," => ",",
                ":" => ":",
                _ => return false,
            }))
        {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, sym: &str) -> Result<(), String> {
        if self.eat(sym) {
            Ok(())
        } else {
            Err(format!("expected '{sym}'{}", self.found()))
        }
    }
    fn found(&self) -> String {
        match self.peek() {
            None => " but the expression ends".into(),
            Some(Tok::Int(n)) => format!(" but found {n}"),
            Some(Tok::Ident(s)) => format!(" but found '{s}'"),
            Some(Tok::Str(s)) => format!(" but found \"{s}\""),
            Some(Tok::Sym(s)) => format!(" but found '{s}'"),
        }
    }
    fn nested<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, String>) -> Result<T, String> {
        if self.depth >= MAX_EXPR_DEPTH {
            return Err(format!("expression nests deeper than {MAX_EXPR_DEPTH} levels"));
        }
        self.depth += 1;
        let r = f(self);
        self.depth -= 1;
        r
    }
    fn sum(&mut self) -> Result<Expr, String> {
        self.nested(Self::sum_inner)
    }
    fn sum_inner(&mut self) -> Result<Expr, String> {
        let mut e = self.product()?;
        loop {
            let op = match self.peek() {
                Some(Tok::Sym("+")) => BinOp::Add,
                Some(Tok::Sym("-")) => BinOp::Sub,
                _ => return Ok(e),
            };
            self.pos += 1;
            e = Expr::Bin(op, Box::new(e), Box::new(self.product()?));
        }
    }
    fn product(&mut self) -> Result<Expr, String> {
        let mut e = self.unary()?;
        loop {
            let op = match self.peek() {
                Some(Tok::Sym("*")) => BinOp::Mul,
                Some(Tok::Sym("/")) => BinOp::Div,
                Some(Tok::Sym("//")) => BinOp::FloorDiv,
                Some(Tok::Sym("%")) => BinOp::Rem,
                _ => return Ok(e),
            };
            self.pos += 1;
            e = Expr::Bin(op, Box::new(e), Box::new(self.unary()?));
        }
    }
    fn unary(&mut self) -> Result<Expr, String> {
        if self.peek() == Some(&Tok::Sym("-")) {
            self.pos += 1;
            return Ok(Expr::Neg(Box::new(self.nested(Self::unary)?)));
        }
        self.atom()
    }
    fn string_arg(&mut self, func: &str) -> Result<String, String> {
        match self.next() {
            Some(Tok::Str(s)) => Ok(s),
            _ => {
                self.pos -= 1;
                Err(format!(
                    "{func}() takes a \"quoted\" first argument{}",
                    self.found()
                ))
            }
        }
    }
    fn atom(&mut self) -> Result<Expr, String> {
        match self.next() {
            Some(Tok::Int(n)) => Ok(Expr::Int(n)),
            Some(Tok::Sym("(")) => {
                let e = self.sum()?;
                self.expect(")")?;
                Ok(e)
            }
            Some(Tok::Ident(name)) if self.peek() == Some(&Tok::Sym("(")) => {
                self.pos += 1;
                let e = match name.as_str() {
                    "shape" => {
                        let key = self.string_arg("shape")?;
                        self.expect(",")?;
                        Expr::Shape(key, Box::new(self.sum()?))
                    }
                    "count" => {
                        let text = self.string_arg("count")?;
                        let pattern = compile_pattern(&text)
                            .map_err(|m| format!("count(): invalid regex '{text}': {m}"))?;
                        if pattern.regex.captures_len() < 2 {
                            return Err(format!("count(): pattern '{text}' needs a capture group, e.g. 'blocks\\.(\\d+)\\..*'"));
                        }
                        Expr::Count(pattern)
                    }
                    "option" => {
                        let opt = self.string_arg("option")?;
                        Expr::Opt(OptName::parse(&opt).ok_or_else(|| {
                            format!("unknown option \"{opt}\" (options: \"img_size\", \"num_heads\")")
                        })?)
                    }
                    "sqrt" => Expr::Sqrt(Box::new(self.sum()?)),
                    "lookup" => {
                        let e = self.sum()?;
                        let mut pairs = Vec::new();
                        while self.eat(",") {
                            let k = self.int_literal()?;
                            self.expect(":")?;
                            let v = self.int_literal()?;
                            pairs.push((k, v));
                        }
                        if pairs.is_empty() {
                            return Err("lookup(x, key: value, ...) needs at least one entry".into());
                        }
                        Expr::Lookup(Box::new(e), pairs)
                    }
                    other => {
                        return Err(format!(
                            "unknown function '{other}' (functions: shape, count, option, sqrt, lookup)"
                        ))
                    }
                };
                self.expect(")")?;
                Ok(e)
            }
            Some(Tok::Ident(name)) => Ok(Expr::Var(name)),
            _ => {
                self.pos -= 1;
                Err(format!(
                    "expected a number, a variable, a function or '('{}",
                    self.found()
                ))
            }
        }
    }
    fn int_literal(&mut self) -> Result<i64, String> {
        let neg = self.peek() == Some(&Tok::Sym("-"));
        if neg {
            self.pos += 1;
        }
        match self.next() {
            Some(Tok::Int(n)) => Ok(if neg { -n } else { n }),
            _ => {
                self.pos -= 1;
                Err(format!(
                    "lookup entries are 'number: number'{}",
                    self.found()
                ))
            }
        }
    }
    fn finish(&self) -> Result<(), String> {
        if self.pos < self.toks.len() {
            Err(format!(
                "unexpected text after the expression{}",
                self.found()
            ))
        } else {
            Ok(())
        }
    }
}

fn parse_expr(text: &str) -> Result<Expr, String> {
    let mut p = Parser {
        toks: tokenize(text)?,
        pos: 0,
        depth: 0,
    };
    let e = p.sum()?;
    p.finish()?;
    Ok(e)
}

fn parse_check(text: &str) -> Result<(Expr, CmpOp, Expr), String> {
    let mut p = Parser {
        toks: tokenize(text)?,
        pos: 0,
        depth: 0,
    };
    let left = p.sum()?;
    let op = match p.next() {
        Some(Tok::Sym("==")) => CmpOp::Eq,
        Some(Tok::Sym("!=")) => CmpOp::Ne,
        Some(Tok::Sym("<")) => CmpOp::Lt,
        Some(Tok::Sym("<=")) => CmpOp::Le,
        Some(Tok::Sym(">")) => CmpOp::Gt,
        Some(Tok::Sym(">=")) => CmpOp::Ge,
        _ => {
            p.pos -= 1;
            return Err(format!(
                "a check compares two expressions (==, !=, <, <=, >, >=){}",
                p.found()
            ));
        }
    };
    let right = p.sum()?;
    p.finish()?;
    Ok((left, op, right))
}

/// Anchors a pattern so that it must match the whole key.
fn compile_pattern(text: &str) -> Result<Pattern, String> {
    Regex::new(&format!("^(?:{text})$"))
        .map(|regex| Pattern {
            text: text.to_string(),
            regex,
        })
        .map_err(|e| one_line_regex_error(&e))
}

fn one_line_regex_error(e: &regex::Error) -> String {
    let text = e.to_string();
    text.lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("error:")
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| text.lines().next().unwrap_or("").trim().to_string())
}

fn toml_message(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {col}: {message}")
        }
        None => message,
    }
}

// ---------------------------------------------------------------------------------------
// The TOML schema, as read by serde.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    format: Option<i64>,
    name: String,
    description: String,
    #[serde(default)]
    unknown_keys: UnknownKeys,
    containers: Option<Vec<String>>,
    #[serde(default)]
    strip_prefixes: Vec<String>,
    #[serde(default)]
    checks: Vec<String>,
    #[serde(default)]
    detect: RawDetect,
    #[serde(default)]
    vars: BTreeMap<String, toml::Value>,
    #[serde(default, rename = "rule")]
    rules: Vec<RawRule>,
    #[serde(default, rename = "target")]
    targets: Vec<RawTarget>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDetect {
    #[serde(default)]
    require: Vec<String>,
    #[serde(default)]
    forbid: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: Option<String>,
    #[serde(rename = "match")]
    pattern: String,
    rename: Option<String>,
    keep: Option<bool>,
    drop: Option<String>,
    expand: Option<String>,
    transform: Option<toml::Table>,
    #[serde(default)]
    when: When,
    note: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    key: String,
    shape: Vec<toml::Value>,
    #[serde(default = "yes")]
    required: bool,
    make: Option<toml::Table>,
}

fn yes() -> bool {
    true
}

/// Transforms a rule may apply to its source tensor, with their parameters.
const RULE_TRANSFORMS: [(&str, &[&str]); 2] = [
    (
        "resize_abs_pos_embed",
        &["num_extra", "old_grid", "new_grid"],
    ),
    (
        "resize_rel_pos_table",
        &["src_window", "dst_window", "num_heads"],
    ),
];
/// Makers a target may use when no source produces it.
const MAKERS: [(&str, &[&str]); 2] = [("fill", &["value"]), ("rel_pos_index", &["window"])];

fn known_transforms() -> String {
    format!(
        "rule transforms: {}; target makers: {}",
        RULE_TRANSFORMS.map(|(n, _)| n).join(", "),
        MAKERS.map(|(n, _)| n).join(", ")
    )
}

struct Compiler<'a> {
    origin: &'a str,
}

impl Compiler<'_> {
    fn invalid(&self, place: impl Into<String>, message: impl Into<String>) -> TableError {
        TableError::Invalid {
            origin: self.origin.into(),
            place: place.into(),
            message: message.into(),
        }
    }

    fn pattern(&self, place: &str, text: &str) -> Result<Pattern, TableError> {
        compile_pattern(text).map_err(|message| TableError::InvalidRegex {
            origin: self.origin.into(),
            place: place.into(),
            pattern: text.into(),
            message,
        })
    }

    fn formula(&self, place: &str, text: &str) -> Result<Formula, TableError> {
        parse_expr(text)
            .map(|expr| Formula {
                text: text.to_string(),
                expr,
            })
            .map_err(|message| TableError::BadExpression {
                origin: self.origin.into(),
                place: place.into(),
                expr: text.into(),
                message,
            })
    }

    /// An integer or an expression string.
    fn value_formula(&self, place: &str, v: &toml::Value) -> Result<Formula, TableError> {
        match v {
            toml::Value::Integer(n) => Ok(Formula {
                text: n.to_string(),
                expr: Expr::Int(*n),
            }),
            toml::Value::String(s) => self.formula(place, s),
            other => Err(self.invalid(
                place,
                format!(
                    "expected an integer or an expression string, found {}",
                    other.type_str()
                ),
            )),
        }
    }

    fn template(
        &self,
        place: &str,
        text: &str,
        captures: bool,
        layer: bool,
    ) -> Result<Template, TableError> {
        Template::parse(text, captures, layer).map_err(|message| TableError::BadTemplate {
            origin: self.origin.into(),
            place: place.into(),
            template: text.into(),
            message,
        })
    }

    fn table(&self, raw: RawTable) -> Result<MappingTable, TableError> {
        if let Some(found) = raw.format {
            if found != FORMAT_VERSION {
                return Err(TableError::Format {
                    origin: self.origin.into(),
                    found,
                });
            }
        }
        if raw.name.trim().is_empty() {
            return Err(self.invalid("name", "the table needs a non-empty name"));
        }
        for p in &raw.strip_prefixes {
            if p.is_empty() {
                return Err(self.invalid(
                    "strip_prefixes",
                    "an empty prefix strips nothing; remove it",
                ));
            }
        }
        let require = raw
            .detect
            .require
            .iter()
            .map(|t| self.pattern("detect.require", t))
            .collect::<Result<Vec<_>, _>>()?;
        let forbid = raw
            .detect
            .forbid
            .iter()
            .map(|t| self.pattern("detect.forbid", t))
            .collect::<Result<Vec<_>, _>>()?;

        let mut vars = BTreeMap::new();
        for (name, value) in &raw.vars {
            if !is_identifier(name) {
                return Err(self.invalid(
                    format!("variable '{name}'"),
                    "names are letters, digits and '_'",
                ));
            }
            vars.insert(name.clone(), self.var(name, value)?);
        }

        let checks = raw
            .checks
            .iter()
            .map(|text| {
                parse_check(text)
                    .map(|(left, op, right)| Check {
                        text: text.clone(),
                        left,
                        op,
                        right,
                    })
                    .map_err(|message| TableError::BadExpression {
                        origin: self.origin.into(),
                        place: "checks".into(),
                        expr: text.clone(),
                        message,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;

        let mut rules = Vec::new();
        let mut ids = HashSet::new();
        for (n, r) in raw.rules.into_iter().enumerate() {
            let rule = self.rule(n + 1, r)?;
            if !ids.insert(rule.id.clone()) {
                return Err(self.invalid(format!("rule '{}'", rule.id), "two rules have this id"));
            }
            rules.push(rule);
        }

        let mut targets = Vec::new();
        let mut keys = HashSet::new();
        for t in raw.targets {
            let spec = self.target(t)?;
            if !keys.insert(spec.key.text.clone()) {
                return Err(self.invalid(format!("target '{}'", spec.key.text), "listed twice"));
            }
            targets.push(spec);
        }

        let table = MappingTable {
            name: raw.name,
            description: raw.description,
            origin: self.origin.to_string(),
            unknown_keys: raw.unknown_keys,
            containers: raw
                .containers
                .unwrap_or_else(|| DEFAULT_CONTAINERS.iter().map(|s| s.to_string()).collect()),
            strip_prefixes: raw.strip_prefixes,
            require,
            forbid,
            vars,
            checks,
            rules,
            targets,
        };
        self.check_var_references(&table)?;
        Ok(table)
    }

    fn var(&self, name: &str, value: &toml::Value) -> Result<VarDef, TableError> {
        let place = format!("variable '{name}'");
        let alternatives = |v: &toml::Value| -> Result<Vec<Formula>, TableError> {
            match v {
                toml::Value::Array(items) if !items.is_empty() => items
                    .iter()
                    .map(|i| self.value_formula(&place, i))
                    .collect(),
                toml::Value::Array(_) => Err(self.invalid(&place, "an empty list of alternatives")),
                other => Ok(vec![self.value_formula(&place, other)?]),
            }
        };
        match value {
            toml::Value::Table(t) => {
                for k in t.keys() {
                    if k != "from" && k != "missing" {
                        return Err(self.invalid(
                            &place,
                            format!("unknown field '{k}' (fields: from, missing)"),
                        ));
                    }
                }
                let from = t
                    .get("from")
                    .ok_or_else(|| self.invalid(&place, "needs 'from'"))?;
                let missing = match t.get("missing") {
                    None => None,
                    Some(toml::Value::String(s)) => Some(s.clone()),
                    Some(_) => return Err(self.invalid(&place, "'missing' is a message string")),
                };
                Ok(VarDef {
                    alternatives: alternatives(from)?,
                    missing,
                })
            }
            other => Ok(VarDef {
                alternatives: alternatives(other)?,
                missing: None,
            }),
        }
    }

    fn rule(&self, position: usize, r: RawRule) -> Result<Rule, TableError> {
        let id = r.id.clone().unwrap_or_else(|| format!("#{position}"));
        let place = format!("rule '{id}'");
        let pattern = self.pattern(&place, &r.pattern)?;
        let actions = [
            r.rename.is_some(),
            r.keep.is_some(),
            r.drop.is_some(),
            r.expand.is_some(),
        ];
        if actions.iter().filter(|&&a| a).count() != 1 {
            return Err(self.invalid(&place, "needs exactly one of rename, keep, drop, expand"));
        }
        let action = if let Some(t) = &r.rename {
            Action::Rename(self.template(&place, t, true, false)?)
        } else if let Some(keep) = r.keep {
            if !keep {
                return Err(self.invalid(
                    &place,
                    "'keep = false' means nothing; use drop = \"reason\"",
                ));
            }
            Action::Keep
        } else if let Some(reason) = &r.drop {
            if reason.trim().is_empty() {
                return Err(self.invalid(&place, "drop needs a reason (it is shown in the report)"));
            }
            Action::Drop(reason.clone())
        } else {
            let t = self.template(&place, r.expand.as_deref().unwrap_or_default(), true, true)?;
            if !t.has_layer() {
                return Err(TableError::BadTemplate {
                    origin: self.origin.into(),
                    place: place.clone(),
                    template: t.text,
                    message: "an expand template needs the layer placeholder {i}".into(),
                });
            }
            Action::Expand(t)
        };
        if let Action::Rename(t) | Action::Expand(t) = &action {
            self.check_captures(&id, &pattern, t)?;
        }
        let transform = match r.transform {
            None => None,
            Some(t) => {
                if matches!(action, Action::Drop(_) | Action::Keep) {
                    return Err(self.invalid(
                        &place,
                        "a transform needs rename or expand (its output key)",
                    ));
                }
                Some(self.rule_transform(&place, &t)?)
            }
        };
        Ok(Rule {
            id,
            pattern,
            action,
            transform,
            when: r.when,
            note: r.note,
        })
    }

    fn check_captures(
        &self,
        rule: &str,
        pattern: &Pattern,
        t: &Template,
    ) -> Result<(), TableError> {
        let groups = pattern.regex.captures_len() - 1;
        let names: Vec<&str> = pattern.regex.capture_names().flatten().collect();
        for piece in &t.pieces {
            let bad = match piece {
                Piece::CaptureIndex(n) if *n > groups => Some(n.to_string()),
                Piece::CaptureName(n) if !names.contains(&n.as_str()) => Some(n.clone()),
                _ => None,
            };
            if let Some(capture) = bad {
                return Err(TableError::BadCapture {
                    origin: self.origin.into(),
                    rule: rule.into(),
                    template: t.text.clone(),
                    capture,
                    pattern: if names.is_empty() {
                        format!("pattern '{}' has {groups} capture group(s)", pattern.text)
                    } else {
                        format!(
                            "pattern '{}' has {groups} capture group(s), named: {}",
                            pattern.text,
                            names.join(", ")
                        )
                    },
                });
            }
        }
        Ok(())
    }

    /// Splits `{ name = "...", params... }` and checks the parameter set.
    fn transform_params<'t>(
        &self,
        place: &str,
        t: &'t toml::Table,
        extra: &[&str],
        allowed: &[(&'static str, &'static [&'static str])],
        other_kind: &[(&'static str, &'static [&'static str])],
        other_hint: &str,
    ) -> Result<(&'static str, HashMap<&'t str, &'t toml::Value>), TableError> {
        let name = match t.get("name") {
            Some(toml::Value::String(s)) => s.as_str(),
            _ => return Err(self.invalid(place, "a transform needs name = \"...\"")),
        };
        let Some(&(known, params)) = allowed.iter().find(|(n, _)| *n == name) else {
            if other_kind.iter().any(|(n, _)| *n == name) {
                return Err(TableError::TransformParam {
                    origin: self.origin.into(),
                    place: place.into(),
                    transform: name.into(),
                    message: other_hint.into(),
                });
            }
            return Err(TableError::UnknownTransform {
                origin: self.origin.into(),
                place: place.into(),
                name: name.into(),
                known: known_transforms(),
            });
        };
        let param_err = |message: String| TableError::TransformParam {
            origin: self.origin.into(),
            place: place.into(),
            transform: known.into(),
            message,
        };
        let mut out = HashMap::new();
        for (k, v) in t {
            if k == "name" || extra.contains(&k.as_str()) {
                continue;
            }
            if !params.contains(&k.as_str()) {
                return Err(param_err(format!(
                    "unknown parameter '{k}' (parameters: {})",
                    params.join(", ")
                )));
            }
            out.insert(k.as_str(), v);
        }
        for p in params {
            if !out.contains_key(p) {
                return Err(param_err(format!(
                    "missing parameter '{p}' (parameters: {})",
                    params.join(", ")
                )));
            }
        }
        Ok((known, out))
    }

    fn rule_transform(&self, place: &str, t: &toml::Table) -> Result<RuleTransform, TableError> {
        let (name, p) = self.transform_params(
            place,
            t,
            &[],
            &RULE_TRANSFORMS,
            &MAKERS,
            "this transform makes a tensor from nothing; use it as a target's make",
        )?;
        let f = |k: &str| {
            self.value_formula(&format!("{place}: transform '{name}' parameter {k}"), p[k])
        };
        Ok(match name {
            "resize_abs_pos_embed" => RuleTransform::ResizeAbsPosEmbed {
                num_extra: f("num_extra")?,
                old_grid: f("old_grid")?,
                new_grid: f("new_grid")?,
            },
            _ => RuleTransform::ResizeRelPosTable {
                src_window: f("src_window")?,
                dst_window: f("dst_window")?,
                num_heads: f("num_heads")?,
            },
        })
    }

    fn target(&self, t: RawTarget) -> Result<TargetSpec, TableError> {
        let place = format!("target '{}'", t.key);
        let key = self.template(&place, &t.key, false, true)?;
        let shape = t
            .shape
            .iter()
            .map(|v| self.value_formula(&format!("{place} shape"), v))
            .collect::<Result<Vec<_>, _>>()?;
        let make = match t.make {
            None => None,
            Some(m) => {
                let (name, p) = self.transform_params(
                    &place,
                    &m,
                    &["when", "note"],
                    &MAKERS,
                    &RULE_TRANSFORMS,
                    "this transform changes a source tensor; use it in a rule's transform",
                )?;
                let when = match m.get("when").map(|v| v.as_str()) {
                    None => When::Always,
                    Some(Some("always")) => When::Always,
                    Some(Some("load-ready")) => When::LoadReady,
                    Some(Some("rename-only")) => When::RenameOnly,
                    Some(_) => {
                        return Err(self.invalid(
                            &place,
                            "make.when is \"always\", \"load-ready\" or \"rename-only\"",
                        ))
                    }
                };
                let note = match m.get("note") {
                    None => None,
                    Some(toml::Value::String(s)) => Some(s.clone()),
                    Some(_) => return Err(self.invalid(&place, "make.note is a string")),
                };
                let kind = match name {
                    "fill" => MakeKind::Fill(self.fill_value(&place, p["value"])?),
                    _ => MakeKind::RelPosIndex {
                        window: self.value_formula(
                            &format!("{place}: make rel_pos_index window"),
                            p["window"],
                        )?,
                    },
                };
                Some(Make { kind, when, note })
            }
        };
        Ok(TargetSpec {
            key,
            shape,
            required: t.required,
            make,
        })
    }

    fn fill_value(&self, place: &str, v: &toml::Value) -> Result<FillValue, TableError> {
        let bad = || {
            self.invalid(
                place,
                "fill value is a number or { option = \"init_values\", default = NUMBER }",
            )
        };
        match v {
            toml::Value::Float(f) => Ok(FillValue::Const(*f)),
            toml::Value::Integer(n) => Ok(FillValue::Const(*n as f64)),
            toml::Value::Table(t) => {
                if t.get("option").and_then(|o| o.as_str()) != Some("init_values")
                    || t.keys().any(|k| k != "option" && k != "default")
                {
                    return Err(bad());
                }
                let default = match t.get("default") {
                    Some(toml::Value::Float(f)) => *f,
                    Some(toml::Value::Integer(n)) => *n as f64,
                    _ => return Err(bad()),
                };
                Ok(FillValue::InitValues { default })
            }
            _ => Err(bad()),
        }
    }

    /// Every variable an expression names exists, and no variable depends on itself.
    fn check_var_references(&self, table: &MappingTable) -> Result<(), TableError> {
        let undefined = |place: String, text: &str, used: Vec<String>| -> Result<(), TableError> {
            for v in used {
                if !table.vars.contains_key(&v) {
                    return Err(TableError::BadExpression {
                        origin: self.origin.into(),
                        place,
                        expr: text.into(),
                        message: format!("unknown variable '{v}' (define it under [vars])"),
                    });
                }
            }
            Ok(())
        };
        let used = |f: &Formula| {
            let mut out = Vec::new();
            f.expr.vars_used(&mut out);
            out
        };
        for (name, def) in &table.vars {
            for f in &def.alternatives {
                undefined(format!("variable '{name}'"), &f.text, used(f))?;
            }
        }
        for c in &table.checks {
            undefined("checks".into(), &c.text, c.vars_used())?;
        }
        for r in &table.rules {
            let place = format!("rule '{}'", r.id);
            match &r.transform {
                Some(RuleTransform::ResizeAbsPosEmbed {
                    num_extra,
                    old_grid,
                    new_grid,
                }) => {
                    for f in [num_extra, old_grid, new_grid] {
                        undefined(place.clone(), &f.text, used(f))?;
                    }
                }
                Some(RuleTransform::ResizeRelPosTable {
                    src_window,
                    dst_window,
                    num_heads,
                }) => {
                    for f in [src_window, dst_window, num_heads] {
                        undefined(place.clone(), &f.text, used(f))?;
                    }
                }
                None => {}
            }
            if matches!(r.action, Action::Expand(_)) && !table.vars.contains_key("depth") {
                return Err(self.invalid(
                    place,
                    "expand runs {i} over 0..depth, but no variable 'depth' is defined",
                ));
            }
        }
        for t in &table.targets {
            let place = format!("target '{}'", t.key.text);
            for f in &t.shape {
                undefined(place.clone(), &f.text, used(f))?;
            }
            if let Some(Make {
                kind: MakeKind::RelPosIndex { window },
                ..
            }) = &t.make
            {
                undefined(place.clone(), &window.text, used(window))?;
            }
            if t.key.has_layer() && !table.vars.contains_key("depth") {
                return Err(self.invalid(
                    place,
                    "{i} runs over 0..depth, but no variable 'depth' is defined",
                ));
            }
        }
        // Cycles: depth-first search over the variable graph.
        fn visit<'a>(
            table: &'a MappingTable,
            name: &'a str,
            state: &mut HashMap<&'a str, bool>,
            path: &mut Vec<&'a str>,
        ) -> Result<(), String> {
            match state.get(name) {
                Some(true) => return Ok(()),
                Some(false) => {
                    let start = path.iter().position(|p| *p == name).unwrap_or(0);
                    let mut cycle: Vec<&str> = path[start..].to_vec();
                    cycle.push(name);
                    return Err(cycle.join(" -> "));
                }
                None => {}
            }
            state.insert(name, false);
            path.push(name);
            let def = &table.vars[name];
            for f in &def.alternatives {
                let mut used = Vec::new();
                f.expr.vars_used(&mut used);
                for u in used {
                    let (k, _) = table.vars.get_key_value(u.as_str()).expect("checked above");
                    visit(table, k.as_str(), state, path)?;
                }
            }
            path.pop();
            state.insert(name, true);
            Ok(())
        }
        let mut state = HashMap::new();
        for name in table.vars.keys() {
            visit(table, name, &mut state, &mut Vec::new()).map_err(|cycle| {
                self.invalid("vars", format!("variables depend on themselves: {cycle}"))
            })?;
        }
        Ok(())
    }
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl fmt::Display for When {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            When::Always => "always",
            When::LoadReady => "load-ready",
            When::RenameOnly => "rename-only",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An environment with fixed shapes and options and no variables.
    struct Fixed {
        shapes: Vec<(&'static str, Vec<usize>)>,
        img_size: Option<i64>,
    }

    impl Env for Fixed {
        fn var(&mut self, name: &str) -> Result<i64, EvalError> {
            match name {
                "dim" => Ok(768),
                _ => Err(EvalError::Unavailable(format!("no {name}"))),
            }
        }
        fn shape(&self, key: &str) -> Option<Vec<usize>> {
            self.shapes
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, s)| s.clone())
        }
        fn keys(&self) -> Vec<String> {
            self.shapes.iter().map(|(k, _)| k.to_string()).collect()
        }
        fn option(&self, name: OptName) -> Option<i64> {
            match name {
                OptName::ImgSize => self.img_size,
                OptName::NumHeads => None,
            }
        }
    }

    fn env() -> Fixed {
        Fixed {
            shapes: vec![
                ("pos_embed", vec![1, 197, 768]),
                ("blocks.0.w", vec![4]),
                ("blocks.1.w", vec![4]),
                ("blocks.1.b", vec![4]),
                ("blocks.2.w", vec![4]),
            ],
            img_size: Some(512),
        }
    }

    fn eval(text: &str) -> Result<i64, EvalError> {
        parse_expr(text)
            .unwrap_or_else(|e| panic!("{text}: {e}"))
            .eval(&mut env())
    }

    fn value(text: &str) -> i64 {
        eval(text).unwrap_or_else(|e| panic!("{text}: {e:?}"))
    }

    fn failure(text: &str) -> String {
        match eval(text) {
            Err(EvalError::Failed(m)) => m,
            other => panic!("{text}: expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn arithmetic_and_precedence() {
        assert_eq!(value("1 + 2 * 3"), 7);
        assert_eq!(value("(1 + 2) * 3"), 9);
        assert_eq!(value("(2 * 32 - 1) * (2 * 32 - 1) + 3"), 3972);
        assert_eq!(value("10 - 4 - 3"), 3);
        assert_eq!(value("-3 + 5"), 2);
        assert_eq!(value("7 // 2"), 3);
        assert_eq!(value("7 % 4"), 3);
        assert_eq!(value("dim / 12"), 64);
        assert!(failure("7 / 2").contains("not a whole number"));
        assert!(failure("1 / 0").contains("division by zero"));
        assert!(failure("9223372036854775807 + 1").contains("overflow"));
    }

    #[test]
    fn functions() {
        assert_eq!(value("sqrt(shape(\"pos_embed\", 1) - 1)"), 14);
        assert_eq!(value("shape(\"pos_embed\", -1)"), 768);
        assert!(failure("shape(\"pos_embed\", 3)").contains("no axis 3"));
        assert!(
            matches!(eval("shape(\"nope\", 0)"), Err(EvalError::Unavailable(m)) if m.contains("'nope'"))
        );
        assert!(failure("sqrt(730 - 3)").contains("727 is not a perfect square"));
        assert_eq!(value("sqrt(0)"), 0);
        assert_eq!(value("count(\"blocks\\.(\\d+)\\..*\")"), 3);
        assert_eq!(value("count(\"blocks\\.\\d+\\.(\\w+)\")"), 2);
        assert_eq!(value("option(\"img_size\") / 16"), 32);
        assert!(matches!(
            eval("option(\"num_heads\")"),
            Err(EvalError::Unavailable(_))
        ));
        assert_eq!(value("lookup(dim, 768: 12, 1024: 16)"), 12);
        assert!(matches!(
            eval("lookup(dim, 1: 2)"),
            Err(EvalError::Unavailable(_))
        ));
    }

    #[test]
    fn count_needs_contiguous_indices() {
        let mut e = env();
        e.shapes
            .retain(|(k, _)| *k != "blocks.1.w" && *k != "blocks.1.b");
        let f = parse_expr("count(\"blocks\\.(\\d+)\\..*\")").unwrap();
        match f.eval(&mut e) {
            Err(EvalError::Failed(m)) => {
                assert!(m.contains("not 0..2") && m.contains("found 0,2"), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parse_errors() {
        for (text, needle) in [
            ("1 +", "expression ends"),
            ("(1", "expected ')'"),
            ("1 2", "unexpected text"),
            ("foo(1)", "unknown function 'foo'"),
            ("shape(pos_embed, 1)", "\"quoted\""),
            ("option(\"size\")", "unknown option"),
            ("count(\"blocks\")", "capture group"),
            ("count(\"(\")", "invalid regex"),
            ("lookup(dim)", "at least one entry"),
            ("1 $ 2", "unexpected character '$'"),
            ("\"abc", "closing"),
        ] {
            let e = parse_expr(text).expect_err(text);
            assert!(e.contains(needle), "{text}: {e}");
        }
        assert!(parse_check("dim % heads == 0").is_ok());
        assert!(parse_check("dim").unwrap_err().contains("compares"));
    }

    #[test]
    fn templates() {
        let t = Template::parse("layers.${1}.ln${2}.${name}", true, false).unwrap();
        let re = Regex::new(r"^(?:blocks\.(\d+)\.norm([12])\.(?P<name>weight|bias))$").unwrap();
        let caps = re.captures("blocks.7.norm2.bias").unwrap();
        assert_eq!(t.render(Some(&caps), None), "layers.7.ln2.bias");
        let t = Template::parse("layers.{i}.attn.table", true, true).unwrap();
        assert!(t.has_layer());
        assert_eq!(t.render(None, Some(3)), "layers.3.attn.table");
        for (text, captures, layer, needle) in [
            ("layers.$1.x", true, false, "${1}"),
            ("layers.${1", true, false, "closing"),
            ("layers.${a-b}", true, false, "not a capture reference"),
            ("layers.{i}.x", true, false, "only allowed"),
            ("layers.{j}.x", true, true, "{i}"),
            ("layers.${1}", false, true, "no meaning"),
            ("a}b", true, true, "unbalanced"),
            ("", true, true, "empty"),
        ] {
            let e = Template::parse(text, captures, layer).expect_err(text);
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn builtin_tables_compile() {
        assert_eq!(builtins().len(), BUILTIN_SOURCES.len());
        for (name, _) in BUILTIN_SOURCES {
            let t = MappingTable::builtin(name).unwrap();
            assert_eq!(t.name(), name);
            assert_eq!(t.origin(), format!("builtin:{name}"));
            assert!(builtin_table_text(name).unwrap().contains("[[rule]]"));
        }
    }

    #[test]
    fn strip_is_repeated_in_list_order() {
        let t = MappingTable::parse(
            "name = \"t\"\ndescription = \"d\"\nstrip_prefixes = [\"module.\", \"encoder.\"]\n",
            "t",
        )
        .unwrap();
        assert_eq!(t.strip("module.encoder.blocks.0"), "blocks.0");
        assert_eq!(t.strip("encoder.module.x"), "x");
        assert_eq!(t.strip("backbone.x"), "backbone.x");
        assert_eq!(t.containers(), DEFAULT_CONTAINERS);
    }

    #[test]
    fn regex_errors_are_one_line() {
        let unclosed = format!("a{}", "(");
        let e = Regex::new(&unclosed).unwrap_err();
        let line = one_line_regex_error(&e);
        assert!(!line.contains('\n') && line.contains("unclosed"), "{line}");
    }
}
