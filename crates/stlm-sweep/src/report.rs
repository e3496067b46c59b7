//! A sweep's reports: the markdown table, sweep.csv and the plot of bits per byte and loss
//! against training time.

use crate::{format_error, Result, Row, SweepSpec};
use std::path::Path;
use stlm_eval::plot::{figure, Panel, Series};

/// The markdown table of `rows` (the best validation bits per byte in bold).
pub fn table(rows: &[Row], eval: Option<&Path>) -> String {
    let best = rows.iter().filter_map(|r| r.val_bpb).fold(f64::INFINITY, f64::min);
    let eval_name = eval.map(|p| p.file_name().map_or(p.display().to_string(), |n| n.to_string_lossy().into_owned()));
    let exits = rows.iter().any(|r| r.exit.is_some());
    let mut s = String::from("| variant | parameters | steps | tokens/s | train loss | val loss | val bits/byte |");
    if let Some(n) = &eval_name {
        s.push_str(&format!(" bits/byte on {n} |"));
    }
    if exits {
        s.push_str(" early-exit bits/byte | average depth | decode tokens/s, exit / full |");
    }
    s.push_str("\n|---|---|---|---|---|---|---|");
    s.push_str(if eval_name.is_some() { "---|" } else { "" });
    s.push_str(if exits { "---|---|---|\n" } else { "\n" });
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    for r in rows {
        let bpb = match r.val_bpb {
            Some(b) if b == best => format!("**{b:.4}**"),
            other => opt(other),
        };
        s.push_str(&format!("| {} | {} | {} | {:.0} | {:.4} | {} | {bpb} |", r.variant, r.parameters, r.steps, r.tokens_per_s, r.loss, opt(r.val_loss)));
        if eval_name.is_some() {
            s.push_str(&format!(" {} |", opt(r.eval_bpb)));
        }
        if exits {
            match &r.exit {
                Some(e) => s.push_str(&format!(" {:.4} | {:.2} of {} | {:.0} / {:.0} |", e.bpb, e.average_depth, e.depth, e.tokens_per_s, e.full_tokens_per_s)),
                None => s.push_str(" - | - | - |"),
            }
        }
        s.push('\n');
    }
    s
}

/// sweep.md, sweep.csv and sweep.svg (validation bits per byte and training loss against
/// training time, one line per variant) in `out`.
pub fn write_reports(spec: &SweepSpec, rows: &[Row]) -> Result<()> {
    let out = &spec.out;
    let header = format!(
        "# Sweep of {}\n\nEvery variant trained for {} min (`stlm sweep`); bits per byte on each run's validation split.\n\n",
        spec.config.display(),
        spec.budget_minutes
    );
    stlm_core::atomic_write_bytes(&out.join("sweep.md"), format!("{header}{}", table(rows, spec.eval_data.as_deref())).as_bytes())?;
    let mut csv = csv::Writer::from_writer(Vec::new());
    csv.write_record([
        "variant", "dir", "parameters", "steps", "train_seconds", "tokens_per_s", "loss", "val_loss", "val_bpb", "eval_bpb", "exit_bpb",
        "exit_average_depth", "exit_tokens_per_s", "full_tokens_per_s",
    ]).map_err(|e| format_error(&out.join("sweep.csv"), e))?;
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| v.to_string());
    for r in rows {
        csv.write_record([
            r.variant.clone(),
            r.dir.clone(),
            r.parameters.to_string(),
            r.steps.to_string(),
            r.train_seconds.to_string(),
            r.tokens_per_s.to_string(),
            r.loss.to_string(),
            opt(r.val_loss),
            opt(r.val_bpb),
            opt(r.eval_bpb),
            opt(r.exit.as_ref().map(|e| e.bpb)),
            opt(r.exit.as_ref().map(|e| e.average_depth)),
            opt(r.exit.as_ref().map(|e| e.tokens_per_s)),
            opt(r.exit.as_ref().map(|e| e.full_tokens_per_s)),
        ]).map_err(|e| format_error(&out.join("sweep.csv"), e))?;
    }
    let csv = csv.into_inner().map_err(|e| format_error(&out.join("sweep.csv"), e))?;
    stlm_core::atomic_write_bytes(&out.join("sweep.csv"), &csv)?;
    let mut val = Vec::new();
    let mut train = Vec::new();
    for r in rows {
        let lines = stlm_train::metrics::read_metrics(&out.join(&r.dir).join("metrics.jsonl")).unwrap_or_default();
        let (mut v, mut t) = (Vec::new(), Vec::new());
        for line in &lines {
            t.push((line.elapsed, line.loss));
            if let Some(b) = line.val_bpb {
                v.push((line.elapsed, b));
            }
        }
        val.push(Series::new(r.variant.clone(), v));
        train.push(Series::new(r.variant.clone(), t));
    }
    let panels = [
        Panel { title: "validation bits per byte".into(), x_label: "training seconds".into(), y_label: "bits/byte".into(), series: val, markers: true },
        Panel { title: "training loss".into(), x_label: "training seconds".into(), y_label: "nats/token".into(), series: train, markers: false },
    ];
    if rows.is_empty() {
        return Ok(());
    }
    figure(&out.join("sweep.svg"), &panels, 2)?;
    eprintln!("wrote {} (sweep.md, sweep.csv, sweep.svg)", out.display());
    Ok(())
}

