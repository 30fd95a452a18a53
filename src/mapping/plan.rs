//! The planner: a compiled [`MappingTable`] and a checkpoint's names, shapes and dtypes in,
//! a [`Plan`] out — every source key's fate and every output key's origin, before a byte of
//! tensor data is read. Transforms are only named here (with their parameters); the
//! converter executes them.
//!
//! Steps, in order (each failure is one [`PlanError`] naming the key and the rule):
//! 1. strip the table's key prefixes (two keys that strip to one name are an error);
//! 2. give each source key to the first active rule whose pattern matches all of it
//!    (rules with `when` are active only in their mode; `img_size` given = load-ready);
//!    a key no rule matches is an error unless the table drops unknown keys;
//! 3. run table checks (`dim % heads == 0`, …); checks whose variables have no value are skipped;
//! 4. place every produced key on the table's target set, check its shape, let target
//!    makers fill what no source produced (fills, regenerated indices), and require every
//!    target in load-ready mode (only `required` ones otherwise);
//! 5. with `keep_unused`, pass dropped keys through under their stripped source names.
//!
//! Output order: the table's `[[target]]` order, where each run of consecutive per-layer
//! targets (`{i}` in the key) is emitted layer by layer (`layers.0.*` in table order, then
//! `layers.1.*`, …). The shipped tables list targets in MMSeg's state-dict order:
//! `cls_token`, `pos_embed`, `patch_embed.projection.*`, then per layer `gamma_1`, `gamma_2`,
//! `ln1.*`, `attn.{q_bias,v_bias,relative_position_bias_table,relative_position_index,qkv.*,
//! proj.*}`, `ln2.*`, `ffn.*`. Keys passed through by `keep_unused` follow, in source order.
//! A table without targets emits its outputs in source order.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::Serialize;

use super::expr::{Env, EvalError, Formula, OptName};
use super::table::{Action, FillValue, Make, MakeKind, MappingTable, RuleTransform, TargetSpec, UnknownKeys};
use crate::DType;

/// One tensor of the checkpoint, as the planner sees it. `name` is relative to the unwrapped
/// container with prefixes NOT yet stripped (the planner strips them).
#[derive(Clone, Debug, PartialEq)]
pub struct SourceTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

/// Command-line choices that shape the plan.
#[derive(Clone, Debug, Default)]
pub struct PlanOptions {
    /// Target input size: makes the output load-ready for MMSeg's backbone at that size.
    pub img_size: Option<usize>,
    /// Number of attention heads, when the checkpoint cannot tell (no relative-position table
    /// and a width without a preset) or to override it.
    pub num_heads: Option<usize>,
    /// Pass keys the table drops through under their source names (beit2mmseg behaviour).
    pub keep_unused: bool,
    /// Value for layer-scale fills (`gamma_1`/`gamma_2` the source lacks); the table's
    /// default (1.0 in the shipped tables) otherwise.
    pub init_values: Option<f64>,
}

/// What the converter will write, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    /// The table's name.
    pub table: String,
    /// `Some` when the output is load-ready for this input size.
    pub img_size: Option<usize>,
    /// The table's variables that have a value (depth, dim, heads, src_grid, dst_grid, …).
    pub vars: BTreeMap<String, i64>,
    /// Output tensors, in output order (see the module docs).
    pub outputs: Vec<PlannedTensor>,
    /// Source keys not written, with the rule and its reason, in source order.
    pub dropped: Vec<DroppedKey>,
    /// Facts worth telling the user (prefixes stripped, tensors copied without resizing, a
    /// BEiT `pos_embed` that MMSeg cannot use, …).
    pub notes: Vec<String>,
    /// Every source key (original names), in checkpoint order; orders [`Plan::source_fates`].
    #[serde(skip)]
    pub sources: Vec<String>,
    /// What the file holds around the tensors (the table's `output_container` and
    /// `keep_meta`); a flat state dict when both are absent.
    #[serde(skip_serializing_if = "OutputLayout::is_flat")]
    pub layout: OutputLayout,
}

/// The shape of the written file around its tensors. `plan` fills the names from the table;
/// what is dropped from the kept values needs the checkpoint's values, so the job fills
/// `meta_dropped` and `not_carried` (the mapping itself sees only names and shapes).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct OutputLayout {
    /// The top-level key the tensors are written under (`state_dict`); `None`: the file is
    /// the state dict itself.
    pub container: Option<String>,
    /// The top-level source key written next to it as plain values (`meta`).
    pub meta: Option<String>,
    /// Values under `meta` that are not written (not plain values), by path.
    pub meta_dropped: Vec<DroppedValue>,
    /// Top-level keys of the source that the file does not carry (`message_hub`, `optimizer`).
    pub not_carried: Vec<String>,
}

impl OutputLayout {
    pub fn is_flat(&self) -> bool {
        self.container.is_none() && self.meta.is_none()
    }
}

/// A value left out of the written file: its path (`meta.dataset_meta.palette`,
/// `message_hub.log_scalars['train/loss']`) and what it was.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DroppedValue {
    pub path: String,
    pub what: String,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PlannedTensor {
    pub target: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub origin: Origin,
    /// The rule id (or a description of the maker / pass-through) that produced it.
    pub rule: String,
}

/// Where an output tensor comes from. `source` is always the original source name (relative
/// to the unwrapped container, prefixes not stripped), i.e. the name to read.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Origin {
    /// The source tensor, bit-exact, under a new name.
    Rename { source: String },
    /// One source tensor copied bit-exact to every layer's key (a shared BEiT table).
    Expand { source: String },
    /// MMSeg's bicubic resize of an absolute position embedding `[1, extra + old², C]` to
    /// `[1, extra + new², C]`; the first `num_extra` tokens are kept.
    ResizeAbsPosEmbed { source: String, num_extra: usize, old_grid: usize, new_grid: usize },
    /// MMSeg's geometric-sequence cubic resize of a relative-position bias table
    /// `[(2·src−1)²+3, heads]` to `[(2·dst−1)²+3, heads]`.
    ResizeRelPosTable { source: String, src_window: usize, dst_window: usize, num_heads: usize },
    /// A freshly generated relative-position index `[window²+1, window²+1]` (i64).
    RelPosIndex { window: usize },
    /// A constant tensor.
    Fill { value: f64 },
    /// The source tensor, bit-exact, under its (prefix-stripped) source name.
    Keep { source: String },
    /// Several source tensors concatenated along axis `dim`, in `sources` order (HF
    /// `query`/`key`/`value` → `qkv`). Bytes are copied unchanged: along axis 0 the output is
    /// the byte concatenation of the sources.
    Concat { sources: Vec<String>, dim: usize },
}

impl Origin {
    /// The single source tensor this output reads, if it reads exactly one (a concatenation
    /// reads several: see [`Origin::sources`]).
    pub fn source(&self) -> Option<&str> {
        match self {
            Origin::Rename { source }
            | Origin::Expand { source }
            | Origin::ResizeAbsPosEmbed { source, .. }
            | Origin::ResizeRelPosTable { source, .. }
            | Origin::Keep { source } => Some(source),
            Origin::RelPosIndex { .. } | Origin::Fill { .. } | Origin::Concat { .. } => None,
        }
    }

    /// Every source tensor this output reads (none for fills and generated indices).
    pub fn sources(&self) -> Vec<&str> {
        match self {
            Origin::Concat { sources, .. } => sources.iter().map(String::as_str).collect(),
            other => other.source().into_iter().collect(),
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Rename { source } => write!(f, "rename of {source}"),
            Origin::Expand { source } => write!(f, "copy of shared {source}"),
            Origin::ResizeAbsPosEmbed { source, old_grid, new_grid, .. } => {
                write!(f, "{source} resized from grid {old_grid} to {new_grid}")
            }
            Origin::ResizeRelPosTable { source, src_window, dst_window, .. } => {
                write!(f, "{source} resized from window {src_window} to {dst_window}")
            }
            Origin::RelPosIndex { window } => write!(f, "index generated for window {window}"),
            Origin::Fill { value } => write!(f, "filled with {value}"),
            Origin::Keep { source } => write!(f, "{source} kept"),
            Origin::Concat { sources, dim } => {
                write!(f, "concatenation of {} along dim {dim}", sources.join(", "))
            }
        }
    }
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DroppedKey {
    /// Original source name.
    pub source: String,
    pub rule: String,
    pub reason: String,
}

/// One source key's fate, for `--dry-run` listings.
#[derive(Debug)]
pub struct SourceFate<'p> {
    pub source: &'p str,
    pub fate: Fate<'p>,
}

#[derive(Debug)]
pub enum Fate<'p> {
    /// The outputs it feeds (several for an expanded shared table).
    Produces(Vec<&'p PlannedTensor>),
    Dropped(&'p DroppedKey),
}

impl Plan {
    pub fn load_ready(&self) -> bool {
        self.img_size.is_some()
    }

    /// Every source key with the outputs it feeds or the reason it is dropped, in checkpoint
    /// order.
    pub fn source_fates(&self) -> Vec<SourceFate<'_>> {
        let mut feeds: HashMap<&str, Vec<&PlannedTensor>> = HashMap::new();
        let mut order: Vec<&str> = Vec::new();
        for o in &self.outputs {
            for s in o.origin.sources() {
                let entry = feeds.entry(s).or_default();
                if entry.is_empty() {
                    order.push(s);
                }
                entry.push(o);
            }
        }
        let dropped: HashMap<&str, &DroppedKey> = self.dropped.iter().map(|d| (d.source.as_str(), d)).collect();
        order.extend(self.dropped.iter().map(|d| d.source.as_str()));
        if !self.sources.is_empty() {
            order = self.sources.iter().map(String::as_str).collect();
        }
        order
            .into_iter()
            .map(|source| SourceFate {
                source,
                fate: match dropped.get(source) {
                    Some(d) => Fate::Dropped(d),
                    None => Fate::Produces(feeds.get(source).cloned().unwrap_or_default()),
                },
            })
            .collect()
    }

    /// Outputs made from nothing (fills, generated indices).
    pub fn generated(&self) -> impl Iterator<Item = &PlannedTensor> {
        self.outputs.iter().filter(|o| o.origin.sources().is_empty())
    }
}

/// Why a table cannot be applied to a checkpoint. Every message is one line naming the key
/// and the rule (or target) involved.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("invalid option: {0}")]
    BadOption(String),
    #[error("two tensors of the checkpoint are both named '{0}' once their dict keys are joined with dots (a key that holds dots, such as 'a.b', next to nested dicts a → b): rename one of them in torch before converting")]
    DuplicateName(String),
    #[error("source keys '{first}' and '{second}' are both '{stripped}' after stripping the table's prefixes")]
    StripCollision { first: String, second: String, stripped: String },
    #[error("source key '{key}' matches no rule of table '{table}' (add a rule for it, or set unknown_keys = \"drop\" in the table)")]
    UncoveredKey { table: String, key: String },
    #[error("target '{target}' is produced twice: from '{first_key}' by rule '{first_rule}' and from '{second_key}' by rule '{second_rule}'")]
    TargetCollision { target: String, first_key: String, first_rule: String, second_key: String, second_rule: String },
    #[error("rule '{rule}' maps '{key}' to '{target}', which is not in the target set of table '{table}'")]
    NotATarget { table: String, rule: String, key: String, target: String },
    #[error("target '{target}' (target '{spec}' of table '{table}') {why}, but no source key produces it{more}")]
    MissingTarget { table: String, target: String, spec: String, why: String, more: String },
    #[error("'{key}' (rule '{rule}') has shape {found}, but target '{target}' must be {expected}")]
    ShapeMismatch { key: String, rule: String, target: String, found: String, expected: String },
    #[error("'{key}' (rule '{rule}', transform {transform}): {message}")]
    TransformInput { key: String, rule: String, transform: String, message: String },
    #[error("{context}: {message}")]
    Evaluate { context: String, message: String },
    #[error("table '{table}': check '{check}' fails ({values})")]
    CheckFailed { table: String, check: String, values: String },
    #[error("rule '{rule}' matches '{key}', but '{key}' is not one of the parts it renders for '{target}' ({parts}): make the parts name the matched keys")]
    ConcatNotAPart { rule: String, key: String, target: String, parts: String },
    #[error("rule '{rule}' concatenates {parts} into '{target}', but part '{part}' {why}")]
    ConcatPart { rule: String, target: String, parts: String, part: String, why: String },
    #[error("rule '{rule}' cannot concatenate {parts} into '{target}' along dim {dim}: {why}")]
    ConcatShapes { rule: String, target: String, parts: String, dim: usize, why: String },
    #[error("keep_unused: '{key}' would pass through as '{target}', which the table already produces")]
    KeepUnusedCollision { key: String, target: String },
}

/// A produced tensor before it is placed on the target set.
struct Produced {
    target: String,
    origin: Origin,
    rule: String,
    shape: Vec<usize>,
    dtype: DType,
    /// The stripped source key (for messages).
    key: String,
}

/// How a rule's transform turned out for one source tensor.
enum Applied {
    Copy,
    AbsPos { num_extra: usize, old_grid: usize, new_grid: usize },
    RelTable { src_window: usize, dst_window: usize, num_heads: usize },
}

/// Applies `table` to the checkpoint described by `sources`. See the module docs: each
/// numbered step there is one function below.
pub fn plan(table: &MappingTable, sources: &[SourceTensor], opts: &PlanOptions) -> Result<Plan, PlanError> {
    check_options(opts)?;
    let load_ready = opts.img_size.is_some();
    let mut notes = Notes::default();
    let (stripped, seen) = strip_prefixes(table, sources, &mut notes)?;
    let mut ev = Evaluator {
        table,
        shapes: stripped.iter().zip(sources).map(|(k, s)| (k.to_string(), s.shape.clone())).collect(),
        keys: stripped.iter().map(|k| k.to_string()).collect(),
        opts,
        memo: HashMap::new(),
    };
    let (produced, dropped) = apply_rules(table, sources, &stripped, load_ready, &mut ev, &mut notes)?;
    check_unique_targets(&produced)?;
    run_checks(table, &mut ev)?;
    let mut outputs = place_targets(table, sources, &produced, opts, &mut ev, &mut notes)?;
    let dropped = keep_unused(table, sources, &seen, dropped, opts, &mut outputs, &mut notes)?;
    Ok(Plan {
        table: table.name().to_string(),
        img_size: opts.img_size,
        vars: reported_vars(table, &mut ev)?,
        outputs,
        dropped,
        notes: notes.0,
        sources: sources.iter().map(|s| s.name.clone()).collect(),
        layout: OutputLayout {
            container: table.output_container().map(str::to_string),
            meta: table.keep_meta().map(str::to_string),
            ..OutputLayout::default()
        },
    })
}

fn check_options(opts: &PlanOptions) -> Result<(), PlanError> {
    if opts.img_size == Some(0) {
        return Err(PlanError::BadOption("img_size must be positive".into()));
    }
    if opts.num_heads == Some(0) {
        return Err(PlanError::BadOption("num_heads must be positive".into()));
    }
    if opts.init_values.is_some_and(|v| !v.is_finite()) {
        return Err(PlanError::BadOption("init_values must be a finite number".into()));
    }
    Ok(())
}

/// Step 1: every source key without the table's prefixes (and each stripped key's source
/// index). Two keys that strip to one name are an error.
fn strip_prefixes<'s>(
    table: &MappingTable,
    sources: &'s [SourceTensor],
    notes: &mut Notes,
) -> Result<(Vec<&'s str>, HashMap<&'s str, usize>), PlanError> {
    let mut stripped: Vec<&str> = Vec::with_capacity(sources.len());
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut n_stripped = 0;
    for (i, s) in sources.iter().enumerate() {
        let key = table.strip(&s.name);
        if key.len() != s.name.len() {
            n_stripped += 1;
        }
        if let Some(&j) = seen.get(key) {
            if sources[j].name == s.name {
                return Err(PlanError::DuplicateName(s.name.clone()));
            }
            return Err(PlanError::StripCollision {
                first: sources[j].name.clone(),
                second: s.name.clone(),
                stripped: key.to_string(),
            });
        }
        seen.insert(key, i);
        stripped.push(key);
    }
    if n_stripped > 0 {
        notes.push(format!(
            "stripped key prefixes ({}) from {n_stripped} of {} source keys",
            table.strip_prefixes().join(", "),
            sources.len()
        ));
    }

    Ok((stripped, seen))
}

/// Step 2: each source key's fate from the first active rule that matches all of it.
fn apply_rules(
    table: &MappingTable,
    sources: &[SourceTensor],
    stripped: &[&str],
    load_ready: bool,
    ev: &mut Evaluator,
    notes: &mut Notes,
) -> Result<(Vec<Produced>, Vec<DroppedKey>), PlanError> {
    let mut produced: Vec<Produced> = Vec::new();
    let mut dropped: Vec<DroppedKey> = Vec::new();
    let mut groups: Vec<ConcatGroup> = Vec::new();
    for (index, (src, &key)) in sources.iter().zip(stripped).enumerate() {
        let hit = table
            .rules
            .iter()
            .filter(|r| r.when.active(load_ready))
            .find_map(|r| r.pattern.regex.captures(key).map(|c| (r, c)));
        let Some((rule, caps)) = hit else {
            match table.unknown_keys() {
                UnknownKeys::Error => {
                    return Err(PlanError::UncoveredKey { table: table.name().into(), key: key.into() })
                }
                UnknownKeys::Drop => dropped.push(DroppedKey {
                    source: src.name.clone(),
                    rule: "(no rule)".into(),
                    reason: "no rule matches it and the table drops unknown keys".into(),
                }),
            }
            continue;
        };
        if let Some(note) = &rule.note {
            let text = ev.interpolate(note);
            notes.push(text);
        }
        let copy = |target: String, origin: Origin| Produced {
            target,
            origin,
            rule: rule.id.clone(),
            shape: src.shape.clone(),
            dtype: src.dtype,
            key: key.to_string(),
        };
        match &rule.action {
            Action::Drop(reason) => {
                dropped.push(DroppedKey { source: src.name.clone(), rule: rule.id.clone(), reason: reason.clone() })
            }
            Action::Keep => produced.push(copy(key.to_string(), Origin::Keep { source: src.name.clone() })),
            Action::Concat(spec) => {
                let target = spec.into.render(Some(&caps), None);
                let parts: Vec<String> = spec.parts.iter().map(|p| p.render(Some(&caps), None)).collect();
                if !parts.iter().any(|p| p == key) {
                    return Err(PlanError::ConcatNotAPart {
                        rule: rule.id.clone(),
                        key: key.into(),
                        target,
                        parts: quoted(&parts),
                    });
                }
                let group = match groups.iter().position(|g| g.rule == rule.id && g.target == target) {
                    Some(g) => g,
                    None => {
                        groups.push(ConcatGroup {
                            rule: rule.id.clone(),
                            target: target.clone(),
                            parts: parts.clone(),
                            dim: spec.dim,
                            members: HashMap::new(),
                            at: produced.len(),
                        });
                        groups.len() - 1
                    }
                };
                let g = &mut groups[group];
                if g.parts != parts {
                    return Err(PlanError::ConcatPart {
                        rule: rule.id.clone(),
                        target,
                        parts: quoted(&g.parts),
                        part: key.into(),
                        why: format!(
                            "renders other parts ({}) for the same target; the parts must follow from the captures the group shares",
                            quoted(&parts)
                        ),
                    });
                }
                g.members.insert(key.to_string(), index);
            }
            Action::Rename(template) | Action::Expand(template) => {
                let expand = matches!(rule.action, Action::Expand(_));
                let (applied, shape) = match &rule.transform {
                    None => (Applied::Copy, src.shape.clone()),
                    Some(t) => apply_transform(ev, notes, &rule.id, key, &src.shape, t)?,
                };
                let origin = |source: String| match applied {
                    Applied::Copy if expand => Origin::Expand { source },
                    Applied::Copy => Origin::Rename { source },
                    Applied::AbsPos { num_extra, old_grid, new_grid } => {
                        Origin::ResizeAbsPosEmbed { source, num_extra, old_grid, new_grid }
                    }
                    Applied::RelTable { src_window, dst_window, num_heads } => {
                        Origin::ResizeRelPosTable { source, src_window, dst_window, num_heads }
                    }
                };
                let layers: Vec<Option<usize>> = if expand {
                    let depth = ev.need_count("depth", &format!("rule '{}' (expand of '{key}')", rule.id))?;
                    (0..depth).map(Some).collect()
                } else {
                    vec![None]
                };
                for layer in layers {
                    produced.push(Produced {
                        shape: shape.clone(),
                        ..copy(template.render(Some(&caps), layer), origin(src.name.clone()))
                    });
                }
            }
        }
    }

    // Each group becomes one output, at the place of its first member (source order for a
    // table without targets). Inserted back to front so that earlier places stay valid.
    let mut made = Vec::with_capacity(groups.len());
    for g in &groups {
        made.push((g.at, concat_group(table, sources, stripped, load_ready, g, &groups)?));
    }
    for (at, p) in made.into_iter().rev() {
        produced.insert(at, p);
    }

    Ok((produced, dropped))
}

/// The source keys one `concat` rule gathered for one target.
struct ConcatGroup {
    rule: String,
    target: String,
    /// Stripped part names, in concatenation order.
    parts: Vec<String>,
    dim: usize,
    /// Stripped key → source index, for the parts found so far.
    members: HashMap<String, usize>,
    /// Where the output goes among the produced tensors.
    at: usize,
}

fn quoted(keys: &[String]) -> String {
    keys.iter().map(|k| format!("'{k}'")).collect::<Vec<_>>().join(", ")
}

/// Checks one concat group (every part present, taken by this group only, dtypes equal,
/// shapes equal except along `dim`) and plans its output.
fn concat_group(
    table: &MappingTable,
    sources: &[SourceTensor],
    stripped: &[&str],
    load_ready: bool,
    g: &ConcatGroup,
    groups: &[ConcatGroup],
) -> Result<Produced, PlanError> {
    let part_error = |part: &str, why: String| PlanError::ConcatPart {
        rule: g.rule.clone(),
        target: g.target.clone(),
        parts: quoted(&g.parts),
        part: part.into(),
        why,
    };
    let mut members = Vec::with_capacity(g.parts.len());
    for part in &g.parts {
        if let Some(&i) = g.members.get(part) {
            members.push(&sources[i]);
            continue;
        }
        let why = if !stripped.contains(&part.as_str()) {
            "is not in the checkpoint".to_string()
        } else if let Some(other) = groups.iter().find(|o| o.members.contains_key(part.as_str())) {
            format!("is already a part of '{}' (each source key is consumed once)", other.target)
        } else {
            match table.rules.iter().filter(|r| r.when.active(load_ready)).find(|r| r.pattern.regex.is_match(part)) {
                Some(r) => format!("is taken by rule '{}', which comes first", r.id),
                None => "matches no rule".to_string(),
            }
        };
        return Err(part_error(part, why));
    }
    let shapes_err = |why: String| PlanError::ConcatShapes {
        rule: g.rule.clone(),
        target: g.target.clone(),
        parts: quoted(&g.parts),
        dim: g.dim,
        why,
    };
    let first = members[0];
    let rank = first.shape.len();
    if g.dim >= rank {
        return Err(shapes_err(format!("'{}' has shape {:?}, which has no axis {}", g.parts[0], first.shape, g.dim)));
    }
    let mut shape = first.shape.clone();
    for (m, part) in members.iter().zip(&g.parts).skip(1) {
        if m.dtype != first.dtype {
            return Err(shapes_err(format!("'{part}' is {} but '{}' is {}", m.dtype, g.parts[0], first.dtype)));
        }
        let same_elsewhere = m.shape.len() == rank && (0..rank).all(|a| a == g.dim || m.shape[a] == first.shape[a]);
        if !same_elsewhere {
            return Err(shapes_err(format!(
                "'{part}' has shape {:?} and '{}' has {:?}; they must agree on every axis but {}",
                m.shape, g.parts[0], first.shape, g.dim
            )));
        }
        shape[g.dim] += m.shape[g.dim];
    }
    Ok(Produced {
        target: g.target.clone(),
        origin: Origin::Concat { sources: members.iter().map(|m| m.name.clone()).collect(), dim: g.dim },
        rule: g.rule.clone(),
        shape,
        dtype: first.dtype,
        key: g.parts.join(" + "),
    })
}

/// No target may be produced twice.
fn check_unique_targets(produced: &[Produced]) -> Result<(), PlanError> {
    let mut by_target: HashMap<&str, usize> = HashMap::new();
    for (i, p) in produced.iter().enumerate() {
        if let Some(&j) = by_target.get(p.target.as_str()) {
            let first = &produced[j];
            return Err(PlanError::TargetCollision {
                target: p.target.clone(),
                first_key: first.key.clone(),
                first_rule: first.rule.clone(),
                second_key: p.key.clone(),
                second_rule: p.rule.clone(),
            });
        }
        by_target.insert(p.target.as_str(), i);
    }

    Ok(())
}

/// Step 3: the table's checks; a check whose variables have no value is skipped.
fn run_checks(table: &MappingTable, ev: &mut Evaluator) -> Result<(), PlanError> {
    for check in &table.checks {
        let left = ev.eval_optional(&check.left, &format!("table check '{}'", check.text))?;
        let right = ev.eval_optional(&check.right, &format!("table check '{}'", check.text))?;
        if let (Some(a), Some(b)) = (left, right) {
            if !check.op.holds(a, b) {
                let values: Vec<String> =
                    check.vars_used().iter().filter_map(|v| ev.var(v).ok().map(|x| format!("{v} = {x}"))).collect();
                return Err(PlanError::CheckFailed {
                    table: table.name().into(),
                    check: check.text.clone(),
                    values: if values.is_empty() { format!("{a} vs {b}") } else { values.join(", ") },
                });
            }
        }
    }

    Ok(())
}

/// Step 4: every produced key placed on the table's target set in target order, shapes
/// checked, makers filling what no source produced, missing targets refused.
fn place_targets(
    table: &MappingTable,
    sources: &[SourceTensor],
    produced: &[Produced],
    opts: &PlanOptions,
    ev: &mut Evaluator,
    notes: &mut Notes,
) -> Result<Vec<PlannedTensor>, PlanError> {
    let load_ready = opts.img_size.is_some();
    let fill_dtype = float_dtype(sources, notes);
    let mut outputs: Vec<PlannedTensor> = Vec::new();
    let place = |p: &Produced| PlannedTensor {
        target: p.target.clone(),
        shape: p.shape.clone(),
        dtype: p.dtype,
        origin: p.origin.clone(),
        rule: p.rule.clone(),
    };
    if table.targets.is_empty() {
        outputs.extend(produced.iter().map(place));
    } else {
        let specs = &table.targets;
        let depth = if specs.iter().any(|t| t.key.has_layer()) {
            ev.need_count("depth", "the per-layer targets ({i})")?
        } else {
            0
        };
        let mut concrete: Vec<(String, &TargetSpec)> = Vec::new();
        let mut s = 0;
        while s < specs.len() {
            if specs[s].key.has_layer() {
                let end = s + specs[s..].iter().take_while(|t| t.key.has_layer()).count();
                for i in 0..depth {
                    for spec in &specs[s..end] {
                        concrete.push((spec.key.render(None, Some(i)), spec));
                    }
                }
                s = end;
            } else {
                concrete.push((specs[s].key.render(None, None), &specs[s]));
                s += 1;
            }
        }
        let position: HashMap<&str, usize> = concrete.iter().enumerate().map(|(i, (k, _))| (k.as_str(), i)).collect();
        let mut slot: Vec<Option<&Produced>> = vec![None; concrete.len()];
        for p in produced {
            match position.get(p.target.as_str()) {
                Some(&i) => slot[i] = Some(p),
                None => {
                    return Err(PlanError::NotATarget {
                        table: table.name().into(),
                        rule: p.rule.clone(),
                        key: p.key.clone(),
                        target: p.target.clone(),
                    })
                }
            }
        }
        // First what is missing (so that a missing source reads as such, not as a variable
        // without a value), then shapes and makers.
        let missing: Vec<(&str, &TargetSpec)> = concrete
            .iter()
            .zip(&slot)
            .filter(|((_, spec), hit)| {
                hit.is_none() && active_make(spec, load_ready).is_none() && (load_ready || spec.required)
            })
            .map(|((target, spec), _)| (target.as_str(), *spec))
            .collect();
        if let Some(&(target, spec)) = missing.first() {
            return Err(PlanError::MissingTarget {
                table: table.name().into(),
                target: target.into(),
                spec: spec.key.text.clone(),
                why: if spec.required {
                    "is required".into()
                } else {
                    format!("is needed for load-ready output (img_size {})", opts.img_size.unwrap_or(0))
                },
                more: match missing.len() {
                    1 => String::new(),
                    n => format!(" ({} more targets are missing too)", n - 1),
                },
            });
        }
        for ((target, spec), hit) in concrete.iter().zip(&slot) {
            let context = || format!("target '{target}'");
            if let Some(p) = hit {
                let expected = ev.shape_of(spec, &context())?;
                if p.shape != expected {
                    return Err(PlanError::ShapeMismatch {
                        key: p.key.clone(),
                        rule: p.rule.clone(),
                        target: target.clone(),
                        found: format!("{:?}", p.shape),
                        expected: format!("{expected:?} = [{}]", shape_text(spec)),
                    });
                }
                outputs.push(place(p));
            } else if let Some(make) = active_make(spec, load_ready) {
                let shape = ev.shape_of(spec, &context())?;
                let (origin, dtype, name) = match &make.kind {
                    MakeKind::Fill(value) => {
                        let value = match *value {
                            FillValue::Const(v) => v,
                            FillValue::InitValues { default } => opts.init_values.unwrap_or(default),
                        };
                        (Origin::Fill { value }, fill_dtype, "fill")
                    }
                    MakeKind::RelPosIndex { window } => {
                        let w = ev.positive(window, &format!("{}: make rel_pos_index window", context()))?;
                        let n = w * w + 1;
                        if shape != [n, n] {
                            return Err(PlanError::Evaluate {
                                context: context(),
                                message: format!(
                                    "rel_pos_index for window {w} is [{n}, {n}], but the target shape is {shape:?}"
                                ),
                            });
                        }
                        (Origin::RelPosIndex { window: w }, DType::I64, "rel_pos_index")
                    }
                };
                if let Some(note) = &make.note {
                    let text = ev.interpolate(note);
                    notes.push(text);
                }
                outputs.push(PlannedTensor {
                    target: target.clone(),
                    shape,
                    dtype,
                    origin,
                    rule: format!("make {name} (target '{}')", spec.key.text),
                });
            }
        }
    }

    Ok(outputs)
}

/// Step 5: with `keep_unused`, dropped keys pass through under their stripped names.
/// Returns what stays dropped.
fn keep_unused(
    table: &MappingTable,
    sources: &[SourceTensor],
    seen: &HashMap<&str, usize>,
    mut dropped: Vec<DroppedKey>,
    opts: &PlanOptions,
    outputs: &mut Vec<PlannedTensor>,
    notes: &mut Notes,
) -> Result<Vec<DroppedKey>, PlanError> {
    let load_ready = opts.img_size.is_some();
    if opts.keep_unused {
        for d in std::mem::take(&mut dropped) {
            let key = table.strip(&d.source).to_string();
            if outputs.iter().any(|o| o.target == key) {
                return Err(PlanError::KeepUnusedCollision { key: d.source, target: key });
            }
            let src = &sources[seen[key.as_str()]];
            outputs.push(PlannedTensor {
                target: key,
                shape: src.shape.clone(),
                dtype: src.dtype,
                origin: Origin::Keep { source: d.source.clone() },
                rule: format!("keep_unused (rule '{}' drops it: {})", d.rule, d.reason),
            });
        }
        if load_ready && outputs.iter().any(|o| o.rule.starts_with("keep_unused")) {
            notes.push(
                "keep_unused: the passed-through keys are not backbone keys; a strict load_state_dict would report them as unexpected"
                    .into(),
            );
        }
    }

    Ok(dropped)
}

/// The variables that have a value, for the report.
fn reported_vars(table: &MappingTable, ev: &mut Evaluator) -> Result<BTreeMap<String, i64>, PlanError> {
    let mut vars = BTreeMap::new();
    for name in table.vars.keys() {
        match ev.var(name) {
            Ok(v) => {
                vars.insert(name.clone(), v);
            }
            Err(EvalError::Unavailable(_)) => {}
            Err(EvalError::Failed(message)) => {
                return Err(PlanError::Evaluate { context: format!("variable '{name}'"), message })
            }
        }
    }

    Ok(vars)
}

fn apply_transform(
    ev: &mut Evaluator<'_>,
    notes: &mut Notes,
    rule: &str,
    key: &str,
    shape: &[usize],
    t: &RuleTransform,
) -> Result<(Applied, Vec<usize>), PlanError> {
    let context = |param: &str| format!("rule '{rule}' on '{key}': {} parameter {param}", t.name());
    let bad_input = |message: String| PlanError::TransformInput {
        key: key.into(),
        rule: rule.into(),
        transform: t.name().into(),
        message,
    };
    match t {
        RuleTransform::ResizeAbsPosEmbed { num_extra, old_grid, new_grid } => {
            let extra = ev.non_negative(num_extra, &context("num_extra"))?;
            let old = ev.positive(old_grid, &context("old_grid"))?;
            let new = ev.positive(new_grid, &context("new_grid"))?;
            let tokens = extra + old * old;
            if shape.len() != 3 || shape[0] != 1 || shape[1] != tokens {
                return Err(bad_input(format!(
                    "has shape {shape:?}, expected [1, {tokens}, C] ({extra} extra tokens + a {old}x{old} grid)"
                )));
            }
            if old == new {
                notes.push(format!(
                    "rule '{rule}': source grid {old} already matches the target; copied without resizing"
                ));
                return Ok((Applied::Copy, shape.to_vec()));
            }
            Ok((
                Applied::AbsPos { num_extra: extra, old_grid: old, new_grid: new },
                vec![1, extra + new * new, shape[2]],
            ))
        }
        RuleTransform::ResizeRelPosTable { src_window, dst_window, num_heads } => {
            let src = ev.positive(src_window, &context("src_window"))?;
            let dst = ev.positive(dst_window, &context("dst_window"))?;
            let heads = ev.positive(num_heads, &context("num_heads"))?;
            let rows = (2 * src - 1) * (2 * src - 1) + 3;
            if shape != [rows, heads] {
                return Err(bad_input(format!(
                    "has shape {shape:?}, expected [{rows}, {heads}] ((2·{src}−1)²+3 rows for window {src}, {heads} heads)"
                )));
            }
            if src == dst {
                notes.push(format!(
                    "rule '{rule}': source window {src} already matches the target; copied without resizing"
                ));
                return Ok((Applied::Copy, shape.to_vec()));
            }
            Ok((
                Applied::RelTable { src_window: src, dst_window: dst, num_heads: heads },
                vec![(2 * dst - 1) * (2 * dst - 1) + 3, heads],
            ))
        }
    }
}

/// The dtype for fills: the most common floating-point dtype among the sources (f32 if none).
fn float_dtype(sources: &[SourceTensor], notes: &mut Notes) -> DType {
    let mut counts: Vec<(DType, usize)> = Vec::new();
    for s in sources.iter().filter(|s| s.dtype.is_float()) {
        match counts.iter_mut().find(|(d, _)| *d == s.dtype) {
            Some((_, n)) => *n += 1,
            None => counts.push((s.dtype, 1)),
        }
    }
    let best = counts.iter().fold(None::<(DType, usize)>, |best, &(d, n)| match best {
        Some((_, m)) if m >= n => best,
        _ => Some((d, n)),
    });
    if counts.len() > 1 {
        notes.push(format!(
            "the source mixes floating-point dtypes ({}); filled tensors use {}",
            counts.iter().map(|(d, n)| format!("{n} × {d}")).collect::<Vec<_>>().join(", "),
            best.map_or(DType::F32, |b| b.0)
        ));
    }
    best.map_or(DType::F32, |b| b.0)
}

#[derive(Default)]
struct Notes(Vec<String>);

impl Notes {
    fn push(&mut self, note: String) {
        if !self.0.contains(&note) {
            self.0.push(note);
        }
    }
}

/// Evaluates variables lazily (each once) against the checkpoint and the options.
struct Evaluator<'a> {
    table: &'a MappingTable,
    /// Stripped key → shape.
    shapes: HashMap<String, Vec<usize>>,
    keys: Vec<String>,
    opts: &'a PlanOptions,
    /// Value and the alternative that gave it (for messages).
    memo: HashMap<String, Result<(i64, usize), EvalError>>,
}

impl Env for Evaluator<'_> {
    fn var(&mut self, name: &str) -> Result<i64, EvalError> {
        if let Some(r) = self.memo.get(name) {
            return r.clone().map(|(v, _)| v);
        }
        let table = self.table;
        let Some(def) = table.vars.get(name) else {
            return Err(EvalError::Failed(format!("unknown variable '{name}'")));
        };
        // Guards against a `missing` message that names the variable itself.
        self.memo.insert(name.into(), Err(EvalError::Unavailable(format!("variable '{name}' has no value"))));
        let mut reasons = Vec::new();
        let mut result = None;
        for (i, alt) in def.alternatives.iter().enumerate() {
            match alt.expr.eval(self) {
                Ok(v) => {
                    result = Some(Ok((v, i)));
                    break;
                }
                Err(EvalError::Unavailable(r)) => reasons.push(r),
                Err(EvalError::Failed(m)) => {
                    let inputs = self.describe_inputs(alt);
                    result = Some(Err(EvalError::Failed(format!("variable '{name}' = {}{inputs}: {m}", alt.text))));
                    break;
                }
            }
        }
        let result = match result {
            Some(r) => r,
            None => Err(EvalError::Unavailable(match &def.missing {
                Some(message) => self.interpolate(message),
                None => format!("variable '{name}' has no value ({})", reasons.join("; ")),
            })),
        };
        self.memo.insert(name.into(), result.clone());
        result.map(|(v, _)| v)
    }

    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.shapes.get(key).cloned()
    }

    fn keys(&self) -> Vec<String> {
        self.keys.clone()
    }

    fn option(&self, name: OptName) -> Option<i64> {
        let v = match name {
            OptName::ImgSize => self.opts.img_size,
            OptName::NumHeads => self.opts.num_heads,
        };
        v.map(|v| v as i64)
    }
}

impl Evaluator<'_> {
    /// ` (with a = 1 from EXPR, …)` for the variables a formula reads.
    fn describe_inputs(&mut self, f: &Formula) -> String {
        let mut used = Vec::new();
        f.expr.vars_used(&mut used);
        let parts: Vec<String> = used
            .iter()
            .filter_map(|v| {
                let (value, alt) = self.memo.get(v)?.clone().ok()?;
                let from = &self.table.vars[v].alternatives[alt].text;
                Some(if from == &value.to_string() {
                    format!("{v} = {value}")
                } else {
                    format!("{v} = {value} from {from}")
                })
            })
            .collect();
        if parts.is_empty() {
            String::new()
        } else {
            format!(" (with {})", parts.join(", "))
        }
    }

    /// Replaces `{var}` with the variable's value (`?` when it has none).
    fn interpolate(&mut self, text: &str) -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(start) = rest.find('{') {
            out.push_str(&rest[..start]);
            let after = &rest[start + 1..];
            match after.find('}') {
                Some(end) if self.table.vars.contains_key(&after[..end]) => {
                    let name = &after[..end];
                    match self.var(name) {
                        Ok(v) => out.push_str(&v.to_string()),
                        Err(_) => out.push('?'),
                    }
                    rest = &after[end + 1..];
                }
                _ => {
                    out.push('{');
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        out
    }

    fn eval(&mut self, f: &Formula, context: &str) -> Result<i64, PlanError> {
        f.expr.eval(self).map_err(|e| PlanError::Evaluate {
            context: context.into(),
            message: match e {
                EvalError::Unavailable(m) | EvalError::Failed(m) => m,
            },
        })
    }

    /// `None` when something the expression reads is absent; errors on contradictions.
    fn eval_optional(&mut self, e: &super::expr::Expr, context: &str) -> Result<Option<i64>, PlanError> {
        match e.eval(self) {
            Ok(v) => Ok(Some(v)),
            Err(EvalError::Unavailable(_)) => Ok(None),
            Err(EvalError::Failed(message)) => Err(PlanError::Evaluate { context: context.into(), message }),
        }
    }

    fn non_negative(&mut self, f: &Formula, context: &str) -> Result<usize, PlanError> {
        let v = self.eval(f, context)?;
        usize::try_from(v).map_err(|_| PlanError::Evaluate {
            context: context.into(),
            message: format!("{} = {v}, which is negative", f.text),
        })
    }

    fn positive(&mut self, f: &Formula, context: &str) -> Result<usize, PlanError> {
        match self.non_negative(f, context)? {
            0 => Err(PlanError::Evaluate { context: context.into(), message: format!("{} = 0", f.text) }),
            v => Ok(v),
        }
    }

    /// A variable used as a count (`depth`).
    fn need_count(&mut self, name: &str, context: &str) -> Result<usize, PlanError> {
        let v = self.var(name).map_err(|e| PlanError::Evaluate {
            context: format!("{context} need variable '{name}'"),
            message: match e {
                EvalError::Unavailable(m) | EvalError::Failed(m) => m,
            },
        })?;
        usize::try_from(v).map_err(|_| PlanError::Evaluate {
            context: context.into(),
            message: format!("variable '{name}' = {v}, which is negative"),
        })
    }

    fn shape_of(&mut self, spec: &TargetSpec, context: &str) -> Result<Vec<usize>, PlanError> {
        spec.shape.iter().map(|f| self.non_negative(f, &format!("{context} shape [{}]", shape_text(spec)))).collect()
    }
}

fn active_make(spec: &TargetSpec, load_ready: bool) -> Option<&Make> {
    spec.make.as_ref().filter(|m| m.when.active(load_ready))
}

fn shape_text(spec: &TargetSpec) -> String {
    spec.shape.iter().map(|f| f.text.as_str()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, shape: &[usize]) -> SourceTensor {
        SourceTensor { name: name.into(), shape: shape.to_vec(), dtype: DType::F32 }
    }

    /// A tiny MAE encoder: dim 32, depth 2, grid 7 (img 112), patch 16 (the key set of
    /// `synth`'s one definition of the MAE pretrain layout).
    fn tiny_mae() -> Vec<SourceTensor> {
        crate::synth::mae_pretrain_layout_at(32, 2, 16, 112).into_iter().map(|(name, shape)| t(&name, &shape)).collect()
    }

    #[test]
    fn tiny_mae_clean_and_load_ready() {
        let table = MappingTable::builtin("mae").unwrap();
        let p = plan(table, &tiny_mae(), &PlanOptions::default()).unwrap();
        assert_eq!(p.outputs.len(), 4 + 2 * 12);
        assert_eq!(p.outputs[4].target, "layers.0.ln1.weight");
        assert_eq!(p.dropped.len(), 2);
        let o = PlanOptions { img_size: Some(112), num_heads: Some(2), ..Default::default() };
        let p = plan(table, &tiny_mae(), &o).unwrap();
        assert_eq!(p.outputs.len(), 4 + 2 * 16);
        let names: Vec<&str> = p.outputs.iter().map(|o| o.target.as_str()).collect();
        assert_eq!(
            names[4..10],
            [
                "layers.0.gamma_1",
                "layers.0.gamma_2",
                "layers.0.ln1.weight",
                "layers.0.ln1.bias",
                "layers.0.attn.relative_position_bias_table",
                "layers.0.attn.relative_position_index"
            ]
        );
        assert_eq!(p.outputs[8].shape, [172, 2]);
        assert_eq!(p.outputs[9].shape, [50, 50]);
        assert_eq!(p.vars["grid"], 7);
    }

    #[test]
    fn fates_follow_source_order() {
        let table = MappingTable::builtin("mae").unwrap();
        let p = plan(table, &tiny_mae(), &PlanOptions::default()).unwrap();
        let fates = p.source_fates();
        assert_eq!(fates.len(), tiny_mae().len());
        assert_eq!(fates[0].source, "cls_token");
        assert!(matches!(&fates.last().unwrap().fate, Fate::Dropped(d) if d.rule == "final-norm"));
    }

    #[test]
    fn options_are_validated() {
        let table = MappingTable::builtin("mae").unwrap();
        for o in [
            PlanOptions { img_size: Some(0), ..Default::default() },
            PlanOptions { num_heads: Some(0), ..Default::default() },
            PlanOptions { init_values: Some(f64::NAN), ..Default::default() },
        ] {
            assert!(matches!(plan(table, &tiny_mae(), &o), Err(PlanError::BadOption(_))));
        }
    }
}
