//! Key templates of a table's rules and targets: `${n}` / `${name}` regex captures and `{i}`
//! the layer index, parsed once when the table is compiled and rendered per key.

#[derive(Debug, Clone)]
pub(crate) enum Piece {
    Lit(String),
    CaptureIndex(usize),
    CaptureName(String),
    Layer,
}

#[derive(Debug, Clone)]
pub(crate) struct Template {
    pub text: String,
    pub(crate) pieces: Vec<Piece>,
}

impl Template {
    pub(crate) fn parse(text: &str, captures: bool, layer: bool) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            if c == '$' {
                if !captures {
                    return Err("'$' has no meaning here (captures exist only in rule targets)".into());
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
                    pieces.push(Piece::CaptureIndex(
                        name.parse().map_err(|_| format!("capture number '{name}' is too large"))?,
                    ));
                } else if !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
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
                    return Err(
                        "the layer placeholder {i} is only allowed in `expand` templates and target keys".into()
                    );
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
        Ok(Template { text: text.to_string(), pieces })
    }

    pub(crate) fn has_layer(&self) -> bool {
        self.pieces.iter().any(|p| matches!(p, Piece::Layer))
    }

    /// Fills the template. A capture group that did not take part in the match is empty.
    pub(crate) fn render(&self, caps: Option<&regex::Captures<'_>>, layer: Option<usize>) -> String {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Lit(s) => out.push_str(s),
                Piece::CaptureIndex(n) => out.push_str(caps.and_then(|c| c.get(*n)).map_or("", |m| m.as_str())),
                Piece::CaptureName(n) => out.push_str(caps.and_then(|c| c.name(n)).map_or("", |m| m.as_str())),
                Piece::Layer => out.push_str(&layer.map_or_else(|| "{i}".to_string(), |i| i.to_string())),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use regex::Regex;

    use super::*;

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
}
