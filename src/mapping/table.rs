//! Mapping tables: the compiled table model, the built-in tables, and family detection from
//! key fingerprints. The TOML format is documented for users in `mappings/README.md`; its
//! compiler is `compile.rs`, its templates `template.rs`, its expressions `expr.rs`.
//!
//! A table is data: containers to unwrap, key prefixes to strip, a detection fingerprint,
//! variables read from the checkpoint's names and shapes (or from command-line options),
//! ordered rules (first match wins per source key) and the target key set with shapes.
//! Applying a table to a checkpoint is `plan::plan`'s job.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;

use regex::Regex;

use serde::Deserialize;

use super::expr::{Expr, Formula};
use super::template::Template;

/// The only table format version this build reads (`format = 1` in the file; optional).
pub const FORMAT_VERSION: i64 = 1;

/// Container keys tried when a table names none: the converter takes the first that exists
/// in the checkpoint and holds tensors; `""` is the top level.
pub const DEFAULT_CONTAINERS: [&str; 4] = ["state_dict", "model", "module", ""];

/// The tables compiled into the binary: (name, TOML text).
const BUILTIN_SOURCES: [(&str, &str); 9] = [
    ("mae", include_str!("../../mappings/mae.toml")),
    ("beit", include_str!("../../mappings/beit.toml")),
    ("hf-vitmae", include_str!("../../mappings/hf_vitmae.toml")),
    ("hf-beit", include_str!("../../mappings/hf_beit.toml")),
    ("mmpretrain-mae", include_str!("../../mappings/mmpretrain_mae.toml")),
    ("mmpretrain-beit", include_str!("../../mappings/mmpretrain_beit.toml")),
    ("mmseg-mae", include_str!("../../mappings/mmseg_mae.toml")),
    ("mmseg-beit", include_str!("../../mappings/mmseg_beit.toml")),
    ("mmseg-segmentor", include_str!("../../mappings/mmseg_segmentor.toml")),
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
    InvalidRegex { origin: String, place: String, pattern: String, message: String },
    #[error("{origin}: {place}: unknown transform '{name}' ({known})")]
    UnknownTransform { origin: String, place: String, name: String, known: String },
    #[error("{origin}: {place}: transform '{transform}': {message}")]
    TransformParam { origin: String, place: String, transform: String, message: String },
    #[error("{origin}: rule '{rule}': template '{template}' refers to capture ${{{capture}}}, but {pattern}")]
    BadCapture { origin: String, rule: String, template: String, capture: String, pattern: String },
    #[error("{origin}: {place}: template '{template}': {message}")]
    BadTemplate { origin: String, place: String, template: String, message: String },
    #[error("{origin}: {place}: expression '{expr}': {message}")]
    BadExpression { origin: String, place: String, expr: String, message: String },
    #[error("{origin}: {place}: {message}")]
    Invalid { origin: String, place: String, message: String },
    #[error("unknown mapping table '{name}' (built in: {known}); pass the path of a table file instead")]
    UnknownTable { name: String, known: String },
    #[error("no mapping table recognises this checkpoint; nearest first: {reasons}; choose a table with --mapping (a built-in name or a TOML file, see mappings/README.md)")]
    NoTableMatches { reasons: String },
    #[error("several mapping tables recognise this checkpoint ({names}): {reasons}; choose one with --mapping")]
    SeveralTablesMatch { names: String, reasons: String },
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
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) origin: String,
    pub(crate) unknown_keys: UnknownKeys,
    pub(crate) containers: Vec<String>,
    pub(crate) strip_prefixes: Vec<String>,
    pub(crate) require: Vec<Pattern>,
    pub(crate) forbid: Vec<Pattern>,
    pub(crate) vars: BTreeMap<String, VarDef>,
    pub(crate) checks: Vec<Check>,
    pub(crate) rules: Vec<Rule>,
    pub(crate) targets: Vec<TargetSpec>,
    /// `output_container`: the outputs are written as the dict under this top-level key
    /// (`{'state_dict': OrderedDict(…)}`) instead of as the file's top level.
    pub(crate) output_container: Option<String>,
    /// `keep_meta`: this top-level key of the source is written next to the container,
    /// reduced to plain values (needs `output_container`).
    pub(crate) keep_meta: Option<String>,
}

/// The names and descriptions of the tables built into the binary.
pub fn builtin_tables() -> Vec<(&'static str, &'static str)> {
    builtins().iter().map(|t| (t.name.as_str(), t.description.as_str())).collect()
}

/// The TOML text of a built-in table (for `--show`-style listings).
pub fn builtin_table_text(name: &str) -> Option<&'static str> {
    BUILTIN_SOURCES.iter().find(|(n, _)| *n == name).map(|(_, text)| *text)
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
///
/// When no table or several match, the error is one paragraph that shows, for each table,
/// which fingerprints matched and which did not (tables nearest to matching first), so that a
/// user can see at a glance which family the checkpoint almost is.
pub fn detect_among<'t, S: AsRef<str>>(
    tables: impl IntoIterator<Item = &'t MappingTable>,
    names: &[S],
) -> Result<&'t MappingTable, TableError> {
    let mut matched = Vec::new();
    let mut missed = Vec::new();
    for table in tables {
        let f = table.fingerprint(names);
        if f.matches() {
            matched.push((table, f));
        } else {
            missed.push((table, f));
        }
    }
    match matched.len() {
        1 => Ok(matched.remove(0).0),
        0 => {
            // Nearest miss first: most required patterns matched, fewest forbidden hits.
            missed.sort_by_key(|(_, f)| std::cmp::Reverse(f.score()));
            Err(TableError::NoTableMatches {
                reasons: if missed.is_empty() {
                    "no tables".into()
                } else {
                    missed.iter().map(|(t, f)| format!("{}: {}", t.name, f.describe())).collect::<Vec<_>>().join("; ")
                },
            })
        }
        _ => Err(TableError::SeveralTablesMatch {
            names: matched.iter().map(|(t, _)| t.name.as_str()).collect::<Vec<_>>().join(", "),
            reasons: matched
                .iter()
                .map(|(t, f)| format!("{}: {}", t.name, f.describe()))
                .collect::<Vec<_>>()
                .join("; "),
        }),
    }
}

/// How a table's `[detect]` fingerprint fares on a checkpoint's keys.
#[derive(Debug, Clone)]
pub struct Fingerprint {
    /// Whether the table has any `require` pattern (a table without one is never detected).
    pub detectable: bool,
    /// Each `require` pattern with a (stripped) key it matches, if any.
    pub required: Vec<(String, Option<String>)>,
    /// Each `forbid` pattern that some (stripped) key matches, with that key.
    pub forbidden: Vec<(String, String)>,
}

impl Fingerprint {
    pub fn matches(&self) -> bool {
        self.detectable && self.required.iter().all(|(_, k)| k.is_some()) && self.forbidden.is_empty()
    }

    fn score(&self) -> i64 {
        let hits = self.required.iter().filter(|(_, k)| k.is_some()).count() as i64;
        let misses = self.required.len() as i64 - hits;
        2 * hits - 2 * misses - 3 * self.forbidden.len() as i64 - if self.detectable { 0 } else { 100 }
    }

    /// One clause: "2 of 3 required fingerprints match ('a' as 'k', …); no key matches 'c';
    /// key 'x' matches forbidden 'f'".
    pub fn describe(&self) -> String {
        if !self.detectable {
            return "the table has no detect.require patterns (it is only used by name)".into();
        }
        let hit: Vec<String> =
            self.required.iter().filter_map(|(p, k)| k.as_ref().map(|k| format!("'{p}' as '{k}'"))).collect();
        let miss: Vec<String> =
            self.required.iter().filter(|(_, k)| k.is_none()).map(|(p, _)| format!("'{p}'")).collect();
        let mut parts = vec![if hit.is_empty() {
            format!("0 of {} required fingerprints match", self.required.len())
        } else {
            format!("{} of {} required fingerprints match ({})", hit.len(), self.required.len(), hit.join(", "))
        }];
        if !miss.is_empty() {
            parts.push(format!("no key matches {}", miss.join(", ")));
        }
        for (p, k) in &self.forbidden {
            parts.push(format!("key '{k}' matches forbidden '{p}'"));
        }
        if self.matches() {
            parts.push("nothing forbidden".into());
        }
        parts.join(", ")
    }
}

impl MappingTable {
    /// A built-in table by name.
    pub fn builtin(name: &str) -> Result<&'static MappingTable, TableError> {
        builtins().iter().find(|t| t.name == name).ok_or_else(|| TableError::UnknownTable {
            name: name.to_string(),
            known: builtins().iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", "),
        })
    }

    /// Compiles a table from TOML text. `origin` names it in every error (a path or
    /// `builtin:NAME`).
    pub fn parse(text: &str, origin: &str) -> Result<MappingTable, TableError> {
        super::compile::compile(text, origin)
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
    /// The top-level key the outputs are written under (`None`: the file is the state dict).
    pub fn output_container(&self) -> Option<&str> {
        self.output_container.as_deref()
    }
    /// The top-level source key carried over as plain values (`meta`), if any.
    pub fn keep_meta(&self) -> Option<&str> {
        self.keep_meta.as_deref()
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
        let f = self.fingerprint(names);
        if f.matches() {
            Ok(())
        } else {
            Err(f.describe())
        }
    }

    /// Which of this table's `[detect]` patterns the (unstripped) names match.
    pub fn fingerprint<S: AsRef<str>>(&self, names: &[S]) -> Fingerprint {
        let keys: Vec<&str> = names.iter().map(|n| self.strip(n.as_ref())).collect();
        Fingerprint {
            detectable: !self.require.is_empty(),
            required: self
                .require
                .iter()
                .map(|p| {
                    let hit = keys.iter().find(|k| p.regex.is_match(k)).map(|k| k.to_string());
                    (p.text.clone(), hit)
                })
                .collect(),
            forbidden: self
                .forbid
                .iter()
                .filter_map(|p| keys.iter().find(|k| p.regex.is_match(k)).map(|k| (p.text.clone(), k.to_string())))
                .collect(),
        }
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
    /// Several source keys into one target, concatenated along `dim` in `parts` order. Every
    /// key the rule matches renders `into` and `parts` from its own captures; keys that
    /// render the same `into` form one group, which must hold exactly the rendered parts.
    Concat(ConcatSpec),
}

#[derive(Debug)]
pub(crate) struct ConcatSpec {
    pub into: Template,
    pub parts: Vec<Template>,
    pub dim: usize,
}

#[derive(Debug)]
pub(crate) enum RuleTransform {
    ResizeAbsPosEmbed { num_extra: Formula, old_grid: Formula, new_grid: Formula },
    ResizeRelPosTable { src_window: Formula, dst_window: Formula, num_heads: Formula },
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

/// Anchors a pattern so that it must match the whole key.
pub(crate) fn compile_pattern(text: &str) -> Result<Pattern, String> {
    Regex::new(&format!("^(?:{text})$"))
        .map(|regex| Pattern { text: text.to_string(), regex })
        .map_err(|e| one_line_regex_error(&e))
}

pub(crate) fn one_line_regex_error(e: &regex::Error) -> String {
    let text = e.to_string();
    text.lines()
        .find_map(|l| l.trim().strip_prefix("error:").map(|s| s.trim().to_string()))
        .unwrap_or_else(|| text.lines().next().unwrap_or("").trim().to_string())
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
}
