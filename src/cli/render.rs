//! Text output: plans, inspect and diff reports, check outcomes, the batch table.

use ckptmap::inspect;
use ckptmap::mapping::plan::{Fate, Plan};
use ckptmap::write::execute as convert;
use ckptmap::DType;

pub(crate) fn print_outcome(o: &ckptmap::verify::VerifyOutcome) {
    println!("checked against {} ({}, img_size {}, blocks {:?})", o.against, o.arch, o.img_size, o.out_indices);
    if o.filled_defaults > 0 {
        println!("({} keys absent from the file were given MMSeg's constructor values: zero MAE tables, gamma 1, generated indices)", o.filled_defaults);
    }
    for r in &o.outputs {
        let f = |v: Option<f64>| v.map(|x| format!("{x:.3e}")).unwrap_or_else(|| "-".into());
        println!(
            "  out {:>2} {:?}: max abs {} max rel {} cosine {} {}",
            r.index,
            r.shape,
            f(r.max_abs),
            f(r.max_rel),
            r.cosine.map(|c| format!("{c:.9}")).unwrap_or_else(|| "-".into()),
            if r.passed { "ok" } else { "FAIL" }
        );
        if let Some(n) = &r.note {
            println!("         {n}");
        }
    }
    if o.passed {
        println!(
            "PASS: every output within tolerance (max rel {:e}, cosine >= {})",
            o.tolerance.max_rel, o.tolerance.min_cosine
        );
    } else {
        println!("FAIL: the converted weights do not compute what the reference computed");
    }
}

/// A `convert --verify` record: what it did not cover, then the outcome.
pub(crate) fn print_verify_record(r: &ckptmap::job::VerifyRecord) {
    if let Some(n) = &r.not_checked {
        println!("note: {n}");
    }
    match r.outcome() {
        Some(o) => print_outcome(&o),
        None => println!("{}", if r.passed { "PASS" } else { "FAIL" }),
    }
}

pub(crate) fn print_plan(plan: &Plan, mapping: &str, root: &str, dtype: Option<DType>) {
    let root = if root.is_empty() { "top level" } else { root };
    println!("mapping {mapping}; tensors under {root}");
    if let Some(n) = plan.img_size {
        println!("load-ready for MMSeg at img_size {n}");
    }
    let vars: Vec<String> = plan.vars.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("variables: {}", vars.join(" "));
    println!();
    println!("source keys:");
    for fate in plan.source_fates() {
        match fate.fate {
            Fate::Produces(outs) if outs.len() == 1 => {
                println!("  {} -> {}  [{}]", fate.source, outs[0].target, outs[0].rule)
            }
            Fate::Produces(outs) => {
                let targets: Vec<&str> = outs.iter().map(|o| o.target.as_str()).collect();
                println!("  {} -> {} targets: {}", fate.source, outs.len(), targets.join(", "));
            }
            Fate::Dropped(d) => println!("  {} dropped [{}]: {}", fate.source, d.rule, d.reason),
        }
    }
    println!();
    println!("targets:");
    for t in &plan.outputs {
        let to = convert::output_dtype(t, dtype);
        println!("  {} {} {:?} <- {}", t.target, to, t.shape, t.origin);
    }
    for note in &plan.notes {
        println!("note: {note}");
    }
    println!();
    println!(
        "{} targets ({} generated), {} source keys dropped; dry run: nothing written",
        plan.outputs.len(),
        plan.generated().count(),
        plan.dropped.len()
    );
}

pub(crate) fn human_bytes(n: usize) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1} MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} kB", n / 1e3)
    } else {
        format!("{n} B")
    }
}

pub(crate) fn print_inspect(r: &inspect::InspectReport) {
    if let Some(url) = &r.url {
        println!("url:        {url}");
    }
    println!("file:       {}", r.file);
    println!("container:  {}", r.container);
    match r.crc32 {
        "recorded" => println!("crc32:      recorded in the zip (checked when tensor bytes are read)"),
        "absent" => println!("crc32:      absent (saved with CRC computation off): nothing can be checked"),
        _ => {}
    }
    match &r.state_dict {
        Some(p) if p.is_empty() => println!("state dict: top level"),
        Some(p) => println!("state dict: {p}"),
        None => println!("state dict: none found (no tensors)"),
    }
    for root in &r.roots {
        let name = if root.path.is_empty() { "(top level)" } else { &root.path };
        println!("  {name}: {} tensors, {} params, {}", root.tensors, root.params, human_bytes(root.bytes));
    }
    for (k, v) in &r.other {
        println!("  {k}: {v}");
    }
    if !r.metadata.is_empty() {
        println!("metadata:   (safetensors __metadata__)");
        for (k, v) in &r.metadata {
            println!("  {k}: {v}");
        }
    }
    println!();
    let width = r.tensors.iter().map(|t| t.name.len()).max().unwrap_or(4).max(4);
    let dw = r.tensors.iter().map(|t| t.dtype.len()).max().unwrap_or(5).max(5);
    println!("{:<width$}  {:<dw$}  {:<20}  {:>12}  {:>10}", "name", "dtype", "shape", "numel", "bytes");
    for t in &r.tensors {
        println!(
            "{:<width$}  {:<dw$}  {:<20}  {:>12}  {:>10}",
            t.name,
            t.dtype,
            format!("{:?}", t.shape),
            t.numel,
            human_bytes(t.bytes)
        );
    }
    println!();
    println!("total: {} tensors, {} params, {}", r.tensors.len(), r.total_params, human_bytes(r.total_bytes));
}

pub(crate) fn print_diff(r: &inspect::DiffReport) {
    for n in &r.only_in_a {
        println!("only in A: {n}");
    }
    for n in &r.only_in_b {
        println!("only in B: {n}");
    }
    for (n, a, b) in &r.mismatched {
        println!("differs:   {n}: {a} vs {b}");
    }
    for d in &r.value_diffs {
        println!("values:    {}: max abs diff {:e}, max rel {:.3e}", d.name, d.max_abs_diff, d.max_rel_diff);
    }
    for d in &r.dtype_diffs {
        println!(
            "dtype:     {}: {} vs {}; values as f64: max abs diff {:.3e}, max rel {:.3e}",
            d.name, d.dtype_a, d.dtype_b, d.max_abs_diff, d.max_rel_diff
        );
    }
    if r.same() {
        println!("same: {} tensors compared, identical names, shapes, dtypes and values", r.compared);
    } else {
        println!(
            "different: {} only in A, {} only in B, {} shape mismatches, {} in another dtype, {} of {} compared tensors differ in value",
            r.only_in_a.len(),
            r.only_in_b.len(),
            r.mismatched.len(),
            r.dtype_diffs.len(),
            r.value_diffs.len(),
            r.compared
        );
    }
}

pub(crate) fn print_batch(r: &ckptmap::batch::BatchReport, report_path: &std::path::Path) {
    use ckptmap::batch::Status;
    let size = |n: u64| {
        let n = n as f64;
        if n >= 1e9 {
            format!("{:.2} GB", n / 1e9)
        } else if n >= 1e6 {
            format!("{:.1} MB", n / 1e6)
        } else {
            format!("{:.1} kB", n / 1e3)
        }
    };
    let rows: Vec<[String; 6]> = r
        .items
        .iter()
        .map(|i| {
            let status = match i.status {
                Status::Converted => "converted",
                Status::Skipped => "skipped",
                Status::Failed => "FAILED",
                Status::Pending => "pending",
            };
            let verify = match &i.verify {
                None => "-".to_string(),
                Some(v) => format!(
                    "{} {}{}",
                    if v.passed { "pass" } else { "FAIL" },
                    v.max_rel.map(|x| format!("{x:.1e}")).unwrap_or_else(|| "-".into()),
                    if v.subject == "output" { "" } else { " (clean)" }
                ),
            };
            let error = i
                .error
                .as_ref()
                .map(|e| format!("{}: {}", format!("{:?}", e.stage).to_lowercase(), e.message))
                .unwrap_or_default();
            [
                format!("{}:{}", i.line, i.output),
                status.to_string(),
                i.seconds.map(|s| format!("{s:.2}")).unwrap_or_else(|| "-".into()),
                i.output_bytes.map(size).unwrap_or_else(|| "-".into()),
                verify,
                error,
            ]
        })
        .collect();
    let head = ["item", "status", "seconds", "size", "verify", "error"];
    let mut width = [0usize; 5];
    for row in rows.iter().map(|r| r.each_ref().map(String::as_str)).chain([head]) {
        for (w, cell) in width.iter_mut().zip(row.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |c: [&str; 6]| {
        let text = format!(
            "{:<w0$}  {:<w1$}  {:>w2$}  {:>w3$}  {:<w4$}  {}",
            c[0],
            c[1],
            c[2],
            c[3],
            c[4],
            c[5],
            w0 = width[0],
            w1 = width[1],
            w2 = width[2],
            w3 = width[3],
            w4 = width[4]
        );
        println!("{}", text.trim_end());
    };
    line(head);
    for row in &rows {
        line(row.each_ref().map(String::as_str));
    }
    let s = &r.summary;
    println!(
        "{} items: {} converted, {} skipped, {} failed; report: {}",
        s.total,
        s.converted,
        s.skipped,
        s.failed,
        report_path.display()
    );
}
