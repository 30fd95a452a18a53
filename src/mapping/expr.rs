//! The expression language of tables (`[vars]`, `checks`, shapes, transform parameters):
//! integer arithmetic over variables, source shapes, key counts and command-line options.
//! A tokenizer, a recursive-descent parser and an evaluator over an [`Env`].

use std::collections::HashSet;

use super::table::{compile_pattern, CmpOp, Pattern};

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
            Expr::Neg(e) | Expr::Sqrt(e) | Expr::Shape(_, e) | Expr::Lookup(e, _) => e.vars_used(out),
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
                let overflow = || EvalError::Failed(format!("arithmetic overflow in {a} {} {b}", op.symbol()));
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
                let idx = if axis < 0 { shape.len() as i64 + axis } else { axis };
                match usize::try_from(idx).ok().and_then(|i| shape.get(i)) {
                    Some(&d) => Ok(d as i64),
                    None => fail(format!("'{key}' has shape {shape:?}, which has no axis {axis}")),
                }
            }
            Expr::Count(pattern) => count_distinct(&env.keys(), pattern).map_err(EvalError::Failed),
            Expr::Opt(name) => {
                env.option(*name).ok_or_else(|| EvalError::Unavailable(format!("option {} not given", name.name())))
            }
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
    const SYMS: [&str; 16] = ["//", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "<", ">", "(", ")", ",", ":"];
    let mut toks = Vec::new();
    let mut rest = text;
    'outer: while let Some(c) = rest.chars().next() {
        if c.is_whitespace() {
            rest = &rest[c.len_utf8()..];
        } else if c.is_ascii_digit() {
            let end = rest.find(|ch: char| !ch.is_ascii_digit()).unwrap_or(rest.len());
            let n = rest[..end].parse().map_err(|_| format!("number '{}' is too large", &rest[..end]))?;
            toks.push(Tok::Int(n));
            rest = &rest[end..];
        } else if c.is_ascii_alphabetic() || c == '_' {
            let end = rest.find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_')).unwrap_or(rest.len());
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
                Err(format!("{func}() takes a \"quoted\" first argument{}", self.found()))
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
                        let pattern =
                            compile_pattern(&text).map_err(|m| format!("count(): invalid regex '{text}': {m}"))?;
                        if pattern.regex.captures_len() < 2 {
                            return Err(format!(
                                "count(): pattern '{text}' needs a capture group, e.g. 'blocks\\.(\\d+)\\..*'"
                            ));
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
                Err(format!("expected a number, a variable, a function or '('{}", self.found()))
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
                Err(format!("lookup entries are 'number: number'{}", self.found()))
            }
        }
    }
    fn finish(&self) -> Result<(), String> {
        if self.pos < self.toks.len() {
            Err(format!("unexpected text after the expression{}", self.found()))
        } else {
            Ok(())
        }
    }
}

pub(crate) fn parse_expr(text: &str) -> Result<Expr, String> {
    let mut p = Parser { toks: tokenize(text)?, pos: 0, depth: 0 };
    let e = p.sum()?;
    p.finish()?;
    Ok(e)
}

pub(crate) fn parse_check(text: &str) -> Result<(Expr, CmpOp, Expr), String> {
    let mut p = Parser { toks: tokenize(text)?, pos: 0, depth: 0 };
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
            return Err(format!("a check compares two expressions (==, !=, <, <=, >, >=){}", p.found()));
        }
    };
    let right = p.sum()?;
    p.finish()?;
    Ok((left, op, right))
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
            self.shapes.iter().find(|(k, _)| *k == key).map(|(_, s)| s.clone())
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
        parse_expr(text).unwrap_or_else(|e| panic!("{text}: {e}")).eval(&mut env())
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
        assert!(matches!(eval("shape(\"nope\", 0)"), Err(EvalError::Unavailable(m)) if m.contains("'nope'")));
        assert!(failure("sqrt(730 - 3)").contains("727 is not a perfect square"));
        assert_eq!(value("sqrt(0)"), 0);
        assert_eq!(value("count(\"blocks\\.(\\d+)\\..*\")"), 3);
        assert_eq!(value("count(\"blocks\\.\\d+\\.(\\w+)\")"), 2);
        assert_eq!(value("option(\"img_size\") / 16"), 32);
        assert!(matches!(eval("option(\"num_heads\")"), Err(EvalError::Unavailable(_))));
        assert_eq!(value("lookup(dim, 768: 12, 1024: 16)"), 12);
        assert!(matches!(eval("lookup(dim, 1: 2)"), Err(EvalError::Unavailable(_))));
    }

    #[test]
    fn count_needs_contiguous_indices() {
        let mut e = env();
        e.shapes.retain(|(k, _)| *k != "blocks.1.w" && *k != "blocks.1.b");
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
}
