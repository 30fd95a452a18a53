//! The TOML compiler: reads a table's text into its `Raw*` schema (serde) and checks and
//! compiles everything that can be checked without a checkpoint — regexes, `${n}` capture
//! references, transform names and parameters, expressions, variable references and cycles —
//! into a [`MappingTable`].

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Deserialize;

use super::expr::*;
use super::table::*;
use super::template::{Piece, Template};

/// Compiles a table from TOML text; `origin` names it in every error.
pub(crate) fn compile(text: &str, origin: &str) -> Result<MappingTable, TableError> {
    let raw: RawTable = toml::from_str(text)
        .map_err(|e| TableError::Toml { origin: origin.to_string(), message: toml_message(text, &e) })?;
    Compiler { origin }.table(raw)
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
    output_container: Option<String>,
    keep_meta: Option<String>,
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
    concat: Option<RawConcat>,
    transform: Option<toml::Table>,
    #[serde(default)]
    when: When,
    note: Option<String>,
}

/// `concat = { into = "…", parts = ["…", …], dim = 0 }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConcat {
    into: String,
    parts: Vec<String>,
    #[serde(default)]
    dim: i64,
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
    ("resize_abs_pos_embed", &["num_extra", "old_grid", "new_grid"]),
    ("resize_rel_pos_table", &["src_window", "dst_window", "num_heads"]),
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
        TableError::Invalid { origin: self.origin.into(), place: place.into(), message: message.into() }
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
        parse_expr(text).map(|expr| Formula { text: text.to_string(), expr }).map_err(|message| {
            TableError::BadExpression { origin: self.origin.into(), place: place.into(), expr: text.into(), message }
        })
    }

    /// An integer or an expression string.
    fn value_formula(&self, place: &str, v: &toml::Value) -> Result<Formula, TableError> {
        match v {
            toml::Value::Integer(n) => Ok(Formula { text: n.to_string(), expr: Expr::Int(*n) }),
            toml::Value::String(s) => self.formula(place, s),
            other => {
                Err(self
                    .invalid(place, format!("expected an integer or an expression string, found {}", other.type_str())))
            }
        }
    }

    fn template(&self, place: &str, text: &str, captures: bool, layer: bool) -> Result<Template, TableError> {
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
                return Err(TableError::Format { origin: self.origin.into(), found });
            }
        }
        if raw.name.trim().is_empty() {
            return Err(self.invalid("name", "the table needs a non-empty name"));
        }
        for p in &raw.strip_prefixes {
            if p.is_empty() {
                return Err(self.invalid("strip_prefixes", "an empty prefix strips nothing; remove it"));
            }
        }
        let require =
            raw.detect.require.iter().map(|t| self.pattern("detect.require", t)).collect::<Result<Vec<_>, _>>()?;
        let forbid =
            raw.detect.forbid.iter().map(|t| self.pattern("detect.forbid", t)).collect::<Result<Vec<_>, _>>()?;

        let mut vars = BTreeMap::new();
        for (name, value) in &raw.vars {
            if !is_identifier(name) {
                return Err(self.invalid(format!("variable '{name}'"), "names are letters, digits and '_'"));
            }
            vars.insert(name.clone(), self.var(name, value)?);
        }

        let checks = raw
            .checks
            .iter()
            .map(|text| {
                parse_check(text).map(|(left, op, right)| Check { text: text.clone(), left, op, right }).map_err(
                    |message| TableError::BadExpression {
                        origin: self.origin.into(),
                        place: "checks".into(),
                        expr: text.clone(),
                        message,
                    },
                )
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

        let (output_container, keep_meta) = self.output_layout(raw.output_container, raw.keep_meta)?;
        let table = MappingTable {
            output_container,
            keep_meta,
            name: raw.name,
            description: raw.description,
            origin: self.origin.to_string(),
            unknown_keys: raw.unknown_keys,
            containers: raw.containers.unwrap_or_else(|| DEFAULT_CONTAINERS.iter().map(|s| s.to_string()).collect()),
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

    /// `output_container` and `keep_meta`: plain top-level key names (non-empty, no dots, as
    /// they are written under exactly that name); `keep_meta` needs a container to sit next
    /// to, and a different name.
    fn output_layout(
        &self,
        container: Option<String>,
        meta: Option<String>,
    ) -> Result<(Option<String>, Option<String>), TableError> {
        for (field, value) in [("output_container", &container), ("keep_meta", &meta)] {
            if let Some(v) = value {
                if v.trim().is_empty() {
                    return Err(self.invalid(field, "an empty key; leave the field out to write a flat state dict"));
                }
                if v.contains('.') || v.trim() != v {
                    return Err(self.invalid(
                        field,
                        format!("'{v}' must be one top-level key of the file (no dots, no surrounding spaces)"),
                    ));
                }
            }
        }
        match (&container, &meta) {
            (None, Some(m)) => Err(self.invalid("keep_meta", format!("keep_meta = \"{m}\" needs output_container (the key of the state dict it is written next to, e.g. \"state_dict\")"))),
            (Some(c), Some(m)) if c == m => Err(self.invalid("keep_meta", format!("'{m}' is also the output_container; the two are different keys of the written file"))),
            _ => Ok((container, meta)),
        }
    }

    fn var(&self, name: &str, value: &toml::Value) -> Result<VarDef, TableError> {
        let place = format!("variable '{name}'");
        let alternatives = |v: &toml::Value| -> Result<Vec<Formula>, TableError> {
            match v {
                toml::Value::Array(items) if !items.is_empty() => {
                    items.iter().map(|i| self.value_formula(&place, i)).collect()
                }
                toml::Value::Array(_) => Err(self.invalid(&place, "an empty list of alternatives")),
                other => Ok(vec![self.value_formula(&place, other)?]),
            }
        };
        match value {
            toml::Value::Table(t) => {
                for k in t.keys() {
                    if k != "from" && k != "missing" {
                        return Err(self.invalid(&place, format!("unknown field '{k}' (fields: from, missing)")));
                    }
                }
                let from = t.get("from").ok_or_else(|| self.invalid(&place, "needs 'from'"))?;
                let missing = match t.get("missing") {
                    None => None,
                    Some(toml::Value::String(s)) => Some(s.clone()),
                    Some(_) => return Err(self.invalid(&place, "'missing' is a message string")),
                };
                Ok(VarDef { alternatives: alternatives(from)?, missing })
            }
            other => Ok(VarDef { alternatives: alternatives(other)?, missing: None }),
        }
    }

    fn rule(&self, position: usize, r: RawRule) -> Result<Rule, TableError> {
        let id = r.id.clone().unwrap_or_else(|| format!("#{position}"));
        let place = format!("rule '{id}'");
        let pattern = self.pattern(&place, &r.pattern)?;
        let actions = [r.rename.is_some(), r.keep.is_some(), r.drop.is_some(), r.expand.is_some(), r.concat.is_some()];
        if actions.iter().filter(|&&a| a).count() != 1 {
            return Err(self.invalid(&place, "needs exactly one of rename, keep, drop, expand, concat"));
        }
        let action = if let Some(t) = &r.rename {
            Action::Rename(self.template(&place, t, true, false)?)
        } else if let Some(keep) = r.keep {
            if !keep {
                return Err(self.invalid(&place, "'keep = false' means nothing; use drop = \"reason\""));
            }
            Action::Keep
        } else if let Some(reason) = &r.drop {
            if reason.trim().is_empty() {
                return Err(self.invalid(&place, "drop needs a reason (it is shown in the report)"));
            }
            Action::Drop(reason.clone())
        } else if let Some(c) = &r.concat {
            Action::Concat(self.concat(&id, &place, &pattern, c)?)
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
                if matches!(action, Action::Drop(_) | Action::Keep | Action::Concat(_)) {
                    return Err(self.invalid(
                        &place,
                        "a transform needs rename or expand (its output key); concat and keep copy bytes unchanged",
                    ));
                }
                Some(self.rule_transform(&place, &t)?)
            }
        };
        Ok(Rule { id, pattern, action, transform, when: r.when, note: r.note })
    }

    /// A `concat` action: `into` and every part are capture templates (no `{i}`); at least two
    /// distinct parts; `dim` a non-negative axis.
    fn concat(&self, id: &str, place: &str, pattern: &Pattern, c: &RawConcat) -> Result<ConcatSpec, TableError> {
        let into = self.template(&format!("{place}: concat.into"), &c.into, true, false)?;
        self.check_captures(id, pattern, &into)?;
        if c.parts.len() < 2 {
            return Err(self.invalid(
                place,
                format!("concat needs at least two parts, found {} (a single part is a rename)", c.parts.len()),
            ));
        }
        let mut parts = Vec::new();
        for (n, text) in c.parts.iter().enumerate() {
            if c.parts[..n].contains(text) {
                return Err(
                    self.invalid(place, format!("concat part '{text}' is listed twice (each part is consumed once)"))
                );
            }
            let t = self.template(&format!("{place}: concat part {}", n + 1), text, true, false)?;
            self.check_captures(id, pattern, &t)?;
            parts.push(t);
        }
        let dim = usize::try_from(c.dim)
            .map_err(|_| self.invalid(place, format!("concat dim {} is negative; give the axis from 0", c.dim)))?;
        Ok(ConcatSpec { into, parts, dim })
    }

    fn check_captures(&self, rule: &str, pattern: &Pattern, t: &Template) -> Result<(), TableError> {
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
                        format!("pattern '{}' has {groups} capture group(s), named: {}", pattern.text, names.join(", "))
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
                return Err(param_err(format!("unknown parameter '{k}' (parameters: {})", params.join(", "))));
            }
            out.insert(k.as_str(), v);
        }
        for p in params {
            if !out.contains_key(p) {
                return Err(param_err(format!("missing parameter '{p}' (parameters: {})", params.join(", "))));
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
        let f = |k: &str| self.value_formula(&format!("{place}: transform '{name}' parameter {k}"), p[k]);
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
        let shape =
            t.shape.iter().map(|v| self.value_formula(&format!("{place} shape"), v)).collect::<Result<Vec<_>, _>>()?;
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
                        return Err(self.invalid(&place, "make.when is \"always\", \"load-ready\" or \"rename-only\""))
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
                        window: self.value_formula(&format!("{place}: make rel_pos_index window"), p["window"])?,
                    },
                };
                Some(Make { kind, when, note })
            }
        };
        Ok(TargetSpec { key, shape, required: t.required, make })
    }

    fn fill_value(&self, place: &str, v: &toml::Value) -> Result<FillValue, TableError> {
        let bad = || self.invalid(place, "fill value is a number or { option = \"init_values\", default = NUMBER }");
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
                Some(RuleTransform::ResizeAbsPosEmbed { num_extra, old_grid, new_grid }) => {
                    for f in [num_extra, old_grid, new_grid] {
                        undefined(place.clone(), &f.text, used(f))?;
                    }
                }
                Some(RuleTransform::ResizeRelPosTable { src_window, dst_window, num_heads }) => {
                    for f in [src_window, dst_window, num_heads] {
                        undefined(place.clone(), &f.text, used(f))?;
                    }
                }
                None => {}
            }
            if matches!(r.action, Action::Expand(_)) && !table.vars.contains_key("depth") {
                return Err(self.invalid(place, "expand runs {i} over 0..depth, but no variable 'depth' is defined"));
            }
        }
        for t in &table.targets {
            let place = format!("target '{}'", t.key.text);
            for f in &t.shape {
                undefined(place.clone(), &f.text, used(f))?;
            }
            if let Some(Make { kind: MakeKind::RelPosIndex { window }, .. }) = &t.make {
                undefined(place.clone(), &window.text, used(window))?;
            }
            if t.key.has_layer() && !table.vars.contains_key("depth") {
                return Err(self.invalid(place, "{i} runs over 0..depth, but no variable 'depth' is defined"));
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
            visit(table, name, &mut state, &mut Vec::new())
                .map_err(|cycle| self.invalid("vars", format!("variables depend on themselves: {cycle}")))?;
        }
        Ok(())
    }
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use regex::Regex;

    use super::*;

    #[test]
    fn regex_errors_are_one_line() {
        let unclosed = format!("a{}", "(");
        let e = Regex::new(&unclosed).unwrap_err();
        let line = one_line_regex_error(&e);
        assert!(!line.contains('\n') && line.contains("unclosed"), "{line}");
    }
}
