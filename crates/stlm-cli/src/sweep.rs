//! `stlm sweep`: one base config and a grid of variants (`--set KEY=V1,V2`, `--data A --data B`),
//! each trained by `stlm train` in its own process with the same time budget, then compared in a
//! table (validation bits per byte, parameters, tokens/s) and a plot. A variant that finished
//! keeps its result; one that was interrupted is trained again from the start, so every row had
//! the same budget. Rerun the same command to continue a killed sweep.

use crate::common::{print_json, DeviceArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use stlm_eval::plot::{figure, Panel, Series};

#[derive(Args)]
pub struct SweepArgs {
    /// Base TOML config, as for `stlm train`.
    #[arg(long)]
    config: PathBuf,
    /// Vary a field: `TABLE.FIELD=V1,V2,...`, each value in TOML syntax as for `stlm train --set`
    /// (commas inside [], {} or quotes belong to the value; `-` keeps the base config's value);
    /// repeatable, and every combination is trained. A single value sets the field for all.
    #[arg(long = "set", value_name = "KEY=V1,V2")]
    set: Vec<String>,
    /// A named variant: `NAME:KEY=V;KEY=V;...` (overrides as for `stlm train --set`, separated
    /// by `;`; `data=FILE[+FILE]` gives its training text). Repeat for a list of variants that are
    /// not a grid (an architecture comparison); `NAME:` alone is the base config. Combined with
    /// `--set` and `--data` like another axis.
    #[arg(long = "variant", value_name = "NAME:KEY=V;...")]
    variant: Vec<String>,
    /// Training text of the variants: one file (several joined by `+`) per value; repeat to
    /// compare datasets (one variant per value). Default: the built-in stories.
    #[arg(long = "data", value_name = "FILE[+FILE]")]
    data: Vec<String>,
    /// Training time of every variant, in minutes (`stlm train --time-limit`).
    #[arg(long)]
    budget_minutes: f64,
    /// Steps at most per variant (default: the config's `max_steps`).
    #[arg(long)]
    max_steps: Option<u64>,
    /// A UTF-8 text every variant is also scored on (`stlm eval ppl`): one yardstick for runs
    /// whose validation splits differ (a dataset comparison).
    #[arg(long, value_name = "FILE")]
    eval_data: Option<PathBuf>,
    /// With --eval-data: also score every variant with early exit at this softmax threshold
    /// (`stlm eval ppl --early-exit`), and at full depth through the same one-position-at-a-time
    /// step without exit checks, for the average depth and both decoding speeds.
    #[arg(long, value_name = "THRESHOLD", requires = "eval_data")]
    early_exit: Option<f64>,
    /// Sweep directory (default: runs/sweep-<config name>): one run per variant, sweep.json,
    /// sweep.csv, sweep.md and sweep.svg.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print one JSON object (the variants' rows) instead of the table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

/// One point of the grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Variant {
    /// Short description, e.g. `hidden_act=relu2, data=wiki.txt` (`base` for the base config).
    label: String,
    /// Run directory name inside the sweep directory.
    dir: String,
    /// `--set` overrides of this variant, `KEY=VALUE`.
    sets: Vec<String>,
    /// Training files (empty: the built-in stories).
    data: Vec<String>,
}

/// What a sweep directory was made for: rerunning with other settings is refused.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Manifest {
    config: String,
    config_text: String,
    budget_minutes: f64,
    max_steps: Option<u64>,
    eval_data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    early_exit: Option<f64>,
    variants: Vec<Variant>,
}

/// The measured row of one trained variant.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Row {
    variant: String,
    dir: String,
    parameters: i64,
    steps: u64,
    train_seconds: f64,
    tokens_per_s: f64,
    loss: f64,
    val_loss: Option<f64>,
    val_bpb: Option<f64>,
    eval_bpb: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exit: Option<ExitRow>,
}

/// A variant scored on the eval text with early exit (`--early-exit`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ExitRow {
    /// Bits per byte when positions exit early.
    bpb: f64,
    /// Layers per position, on average.
    average_depth: f64,
    /// The model's depth.
    depth: u64,
    /// Positions per second, decoding with exits.
    tokens_per_s: f64,
    /// Positions per second, decoding at full depth with the same step.
    full_tokens_per_s: f64,
}

const RESULT_FILE: &str = "sweep-result.json";

pub fn sweep(a: SweepArgs) -> Result<()> {
    if !(a.budget_minutes > 0.0 && a.budget_minutes.is_finite()) {
        bail!("--budget-minutes {}: must be a positive number of minutes", a.budget_minutes);
    }
    let config_text = std::fs::read_to_string(&a.config).with_context(|| format!("--config {}: cannot read", a.config.display()))?;
    let variants = grid(&a.variant, &a.set, &a.data)?;
    let stem = a.config.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "sweep".into());
    let out = a.out.clone().unwrap_or_else(|| Path::new("runs").join(format!("sweep-{stem}")));
    let manifest = Manifest {
        config: a.config.display().to_string(),
        config_text,
        budget_minutes: a.budget_minutes,
        max_steps: a.max_steps,
        eval_data: a.eval_data.as_ref().map(|p| p.display().to_string()),
        early_exit: a.early_exit,
        variants,
    };
    claim(&out, &manifest)?;
    let stop = crate::train::ctrl_c()?;
    let exe = std::env::current_exe().context("cannot find the stlm executable")?;
    let n = manifest.variants.len();
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for (i, v) in manifest.variants.iter().enumerate() {
        let run = out.join(&v.dir);
        if let Some(mut row) = read_result(&run)? {
            eprintln!("[{}/{n}] {}: trained earlier", i + 1, v.label);
            // Scores an earlier run lacks (measured after it trained) are filled in.
            let missing = a.eval_data.is_some() && row.eval_bpb.is_none();
            if missing {
                score(&exe, &a, &run.join("model"), &mut row)?;
                stlm_core::atomic_write_bytes(&run.join(RESULT_FILE), serde_json::to_string_pretty(&row)?.as_bytes())?;
            }
            rows.push(row);
            continue;
        }
        if run.exists() {
            // Interrupted: train it again from the start, so that it gets the whole budget.
            std::fs::remove_dir_all(&run).with_context(|| format!("cannot remove the unfinished run {}", run.display()))?;
        }
        eprintln!("[{}/{n}] {}: training for {} min in {}", i + 1, v.label, a.budget_minutes, run.display());
        let log = out.join(format!("{}.log", v.dir));
        let status = run_logged(train_command(&exe, &a, v, &run), &log)?;
        if status.code() == Some(130) || stop.load(std::sync::atomic::Ordering::SeqCst) {
            bail!("sweep stopped during {}; run the same command to continue (that variant starts again)", v.label);
        }
        if !status.success() {
            eprintln!("[{}/{n}] {}: failed ({status}); its output is in {}", i + 1, v.label, log.display());
            failed.push(v.label.clone());
            continue;
        }
        let mut row = measure(v, &run)?;
        score(&exe, &a, &run.join("model"), &mut row)?;
        stlm_core::atomic_write_bytes(&run.join(RESULT_FILE), serde_json::to_string_pretty(&row)?.as_bytes())?;
        rows.push(row);
    }
    write_reports(&out, &rows, &a)?;
    if a.json {
        print_json(&serde_json::json!({ "sweep": out.display().to_string(), "budget_minutes": a.budget_minutes, "variants": rows, "failed": failed }))?;
    } else {
        print!("{}", table(&rows, a.eval_data.as_deref()));
    }
    if !failed.is_empty() {
        bail!("{} of {n} variants failed: {}", failed.len(), failed.join("; "));
    }
    Ok(())
}

/// A `--variant`'s name, overrides and training files (if it names them).
type Named = (String, Vec<String>, Option<Vec<String>>);

/// A `--variant NAME:KEY=V;...`: its name, overrides and training files (if it names them).
fn named_variant(spec: &str) -> Result<Named> {
    let Some((name, rest)) = spec.split_once(':') else {
        bail!("--variant {spec}: expected NAME:KEY=V;KEY=V (e.g. share-x2:model.layer_sharing.repeats=2)");
    };
    let name = name.trim();
    if name.is_empty() {
        bail!("--variant {spec}: the name before `:` is empty");
    }
    let (mut sets, mut data) = (Vec::new(), None);
    for item in split_top_level(rest, ';').into_iter().filter(|i| !i.is_empty()) {
        match item.split_once('=') {
            Some((key, files)) if key.trim() == "data" => data = Some(files.split('+').map(|f| f.trim().to_string()).collect()),
            Some((key, value)) if key.contains('.') && !value.trim().is_empty() => sets.push(format!("{}={}", key.trim(), value.trim())),
            _ => bail!("--variant {spec}: `{item}` is not TABLE.FIELD=VALUE or data=FILE"),
        }
    }
    Ok((name.to_string(), sets, data))
}

/// Every combination of the named `--variant`s, the `--set` axes (first axis slowest) and the
/// `--data` values.
fn grid(named: &[String], sets: &[String], data: &[String]) -> Result<Vec<Variant>> {
    let mut axes: Vec<(String, Vec<Option<String>>)> = Vec::new();
    for item in sets {
        let Some((key, values)) = item.split_once('=') else {
            bail!("--set {item}: expected TABLE.FIELD=V1,V2,... (e.g. model.hidden_act=silu,relu2)");
        };
        let key = key.trim();
        if axes.iter().any(|(k, _)| k == key) {
            bail!("--set {item}: `{key}` is varied twice; give its values in one --set");
        }
        let values: Vec<Option<String>> =
            split_values(values).into_iter().map(|v| (v != "-").then_some(v)).collect();
        if values.iter().any(|v| v.as_deref() == Some("")) {
            bail!("--set {item}: an empty value (use `-` to keep the base config's value)");
        }
        axes.push((key.to_string(), values));
    }
    let mut bases: Vec<Named> = Vec::new();
    for spec in named {
        let (name, sets, files) = named_variant(spec)?;
        if bases.iter().any(|(n, _, _)| *n == name) {
            bail!("--variant {spec}: the name `{name}` is used twice");
        }
        if files.is_some() && data.len() > 1 {
            bail!("--variant {spec}: names its data while --data gives several; use one of the two");
        }
        bases.push((name, sets, files));
    }
    // Without named variants, one unnamed one: the base config.
    let unnamed = bases.is_empty();
    if unnamed {
        bases.push((String::new(), Vec::new(), None));
    }
    let datas: Vec<Vec<String>> = match data.len() {
        0 => vec![Vec::new()],
        _ => data.iter().map(|d| d.split('+').map(str::to_string).collect()).collect(),
    };
    let mut combos: Vec<Vec<(String, Option<String>)>> = vec![Vec::new()];
    for (key, values) in &axes {
        combos = combos
            .iter()
            .flat_map(|c| values.iter().map(move |v| [c.clone(), vec![(key.clone(), v.clone())]].concat()))
            .collect();
    }
    let mut variants = Vec::new();
    for (name, named_sets, named_files) in &bases {
        for combo in &combos {
            for files in &datas {
                let varied: Vec<String> = (!unnamed)
                    .then(|| name.clone())
                    .into_iter()
                    .chain(
                        combo
                            .iter()
                            .filter(|(key, _)| axes.iter().any(|(k, vs)| k == key && vs.len() > 1))
                            .map(|(key, v)| format!("{}={}", key.rsplit('.').next().unwrap_or(key), v.as_deref().unwrap_or("base"))),
                    )
                    .chain((datas.len() > 1).then(|| format!("data={}", short_names(files))))
                    .collect();
                let label = if varied.is_empty() { "base".to_string() } else { varied.join(", ") };
                let dir = format!("{:02}-{}", variants.len(), slug(&label));
                let sets = named_sets.iter().cloned().chain(combo.iter().filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))).collect();
                let data = named_files.clone().unwrap_or_else(|| files.clone());
                variants.push(Variant { label, dir, sets, data });
            }
        }
    }
    Ok(variants)
}

/// The values of `V1,V2,...`, split at commas outside brackets, braces and quotes, trimmed.
fn split_values(text: &str) -> Vec<String> {
    split_top_level(text, ',')
}

/// `text` split at `sep` outside brackets, braces and quotes, trimmed.
fn split_top_level(text: &str, sep: char) -> Vec<String> {
    let (mut out, mut current, mut depth, mut quote) = (Vec::new(), String::new(), 0i32, None::<char>);
    for c in text.chars() {
        match (quote, c) {
            (Some(q), _) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '[' | '{') => depth += 1,
            (None, ']' | '}') => depth -= 1,
            (None, c) if c == sep && depth == 0 => {
                out.push(current.trim().to_string());
                current.clear();
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    out.push(current.trim().to_string());
    out
}

/// File names of `files` joined by `+`.
fn short_names(files: &[String]) -> String {
    files.iter().map(|f| Path::new(f).file_name().map_or(f.clone(), |n| n.to_string_lossy().into_owned())).collect::<Vec<_>>().join("+")
}

/// `label` as a directory name: letters, digits, `.`, `-`, `_`, `=`; at most 60 characters.
fn slug(label: &str) -> String {
    let s: String = label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '=') { c } else { '_' })
        .collect();
    let s = s.split('_').filter(|p| !p.is_empty()).collect::<Vec<_>>().join("_");
    s.chars().take(60).collect()
}

/// Makes `out` this sweep's directory: a new one gets `sweep.json`; an existing one must hold
/// the same sweep (config, budget and variants).
fn claim(out: &Path, manifest: &Manifest) -> Result<()> {
    let path = out.join("sweep.json");
    if path.is_file() {
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        let old: Manifest = serde_json::from_str(&text).with_context(|| format!("{}: not a sweep manifest", path.display()))?;
        if old != *manifest {
            bail!("--out {}: holds a different sweep (config, budget, steps, eval data or variants differ); choose another --out or remove it", out.display());
        }
        return Ok(());
    }
    if out.exists() && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("--out {}: exists and is not a sweep directory (no sweep.json)", out.display());
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    stlm_core::atomic_write_bytes(&path, serde_json::to_string_pretty(manifest)?.as_bytes())?;
    Ok(())
}

fn read_result(run: &Path) -> Result<Option<Row>> {
    let path = run.join(RESULT_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(Some(serde_json::from_str(&text).with_context(|| format!("{}: not a sweep result", path.display()))?))
}

/// The `stlm train` command of variant `v`, writing to `run`.
fn train_command(exe: &Path, a: &SweepArgs, v: &Variant, run: &Path) -> Command {
    let mut cmd = Command::new(exe);
    cmd.arg("--threads").arg(tch::get_num_threads().to_string());
    cmd.arg("train").arg("--config").arg(&a.config).arg("--out").arg(run);
    cmd.arg("--time-limit").arg((a.budget_minutes * 60.0).to_string()).args(["--samples", "0"]);
    cmd.args(["--device", &a.device.device]);
    if let Some(steps) = a.max_steps {
        cmd.arg("--max-steps").arg(steps.to_string());
    }
    for s in &v.sets {
        cmd.arg("--set").arg(s);
    }
    for d in &v.data {
        cmd.arg("--data").arg(d);
    }
    cmd
}

/// Runs `cmd` with its stderr shown and copied to `log`, its stdout sent to stderr (stdout is
/// the sweep's table or JSON).
fn run_logged(mut cmd: Command, log: &Path) -> Result<std::process::ExitStatus> {
    let mut file = std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::io::stderr())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start stlm train")?;
    let mut pipe = child.stderr.take().context("no stderr pipe")?;
    let mut buf = [0u8; 8192];
    loop {
        let n = pipe.read(&mut buf).context("reading the run's output")?;
        if n == 0 {
            break;
        }
        std::io::stderr().write_all(&buf[..n])?;
        file.write_all(&buf[..n]).with_context(|| format!("cannot write {}", log.display()))?;
    }
    Ok(child.wait()?)
}

/// The row of a finished run: parameters from its model directory, the rest from metrics.jsonl.
fn measure(v: &Variant, run: &Path) -> Result<Row> {
    let weights = run.join("model").join("model.safetensors");
    let tensors = tch::Tensor::read_safetensors(&weights).with_context(|| format!("{}: cannot read", weights.display()))?;
    let parameters = tensors.iter().map(|(_, t)| t.numel() as i64).sum();
    let path = run.join("metrics.jsonl");
    let lines = stlm_train::metrics::read_metrics(&path)?;
    let Some(last) = lines.last() else { bail!("{}: no steps were logged", path.display()) };
    let rest = if lines.len() > 1 { &lines[1..] } else { &lines[..] };
    let speeds: Vec<f64> = rest.iter().map(|l| l.tokens_per_s).collect();
    let final_val = lines.iter().rev().find(|l| l.val_loss.is_some());
    Ok(Row {
        variant: v.label.clone(),
        dir: v.dir.clone(),
        parameters,
        steps: last.step,
        train_seconds: last.elapsed,
        tokens_per_s: speeds.iter().sum::<f64>() / speeds.len().max(1) as f64,
        loss: last.loss,
        val_loss: final_val.and_then(|l| l.val_loss),
        val_bpb: final_val.and_then(|l| l.val_bpb),
        eval_bpb: None,
        exit: None,
    })
}

/// Fills in `row`'s scores on `--eval-data` (bits per byte, and with `--early-exit` the exit row)
/// for the model in `model`.
fn score(exe: &Path, a: &SweepArgs, model: &Path, row: &mut Row) -> Result<()> {
    let Some(text) = &a.eval_data else { return Ok(()) };
    row.eval_bpb = Some(eval_ppl(exe, a, model, text, None)?["bits_per_byte"].as_f64().context("stlm eval ppl printed no bits_per_byte")?);
    if let Some(threshold) = a.early_exit {
        // A model that cannot exit early (its width changes with depth) has no exit columns.
        row.exit = match exit_row(exe, a, model, text, threshold) {
            Ok(exit) => Some(exit),
            Err(e) => {
                eprintln!("{}: no early-exit scores: {e:#}", row.variant);
                None
            }
        };
    }
    Ok(())
}

/// The model in `model` scored on `text` with early exit at `threshold`, and at full depth
/// through the same one-position-at-a-time step (an exit allowed only after the last layer,
/// so no exit is ever checked) for the speed to compare with.
fn exit_row(exe: &Path, a: &SweepArgs, model: &Path, text: &Path, threshold: f64) -> Result<ExitRow> {
    let exit = eval_ppl(exe, a, model, text, Some((threshold, 1)))?;
    let num = |v: &serde_json::Value, k: &str| v[k].as_f64().with_context(|| format!("stlm eval ppl --early-exit printed no {k}"));
    let depth = num(&exit, "depth")? as u64;
    let full = eval_ppl(exe, a, model, text, Some((threshold, depth)))?;
    Ok(ExitRow {
        bpb: num(&exit, "bits_per_byte")?,
        average_depth: num(&exit, "average_depth")?,
        depth,
        tokens_per_s: num(&exit, "tokens_per_s")?,
        full_tokens_per_s: num(&full, "tokens_per_s")?,
    })
}

/// `stlm eval ppl --json` of the model in `model` on `text` (with `--early-exit THRESHOLD
/// --exit-min-layers N` when given, over disjoint windows of the model's context: decoding one
/// position at a time costs a step per position, and each position is decoded once).
fn eval_ppl(exe: &Path, a: &SweepArgs, model: &Path, text: &Path, early_exit: Option<(f64, u64)>) -> Result<serde_json::Value> {
    let mut cmd = Command::new(exe);
    cmd.arg("--threads").arg(tch::get_num_threads().to_string());
    cmd.args(["eval", "ppl", "--json", "--device", &a.device.device]).arg("--model").arg(model).arg("--data").arg(text);
    if let Some((t, min_layers)) = early_exit {
        cmd.arg("--early-exit").arg(t.to_string()).arg("--exit-min-layers").arg(min_layers.to_string());
        let path = model.join("config.json");
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?)
            .with_context(|| format!("{}: not JSON", path.display()))?;
        let window = config["max_position_embeddings"].as_i64().with_context(|| format!("{}: no max_position_embeddings", path.display()))?.min(1024);
        cmd.arg("--max-length").arg(window.to_string()).arg("--stride").arg(window.to_string());
    }
    let out = cmd.stderr(Stdio::inherit()).output().context("cannot start stlm eval ppl")?;
    if !out.status.success() {
        bail!("--eval-data {}: stlm eval ppl failed for {} ({})", text.display(), model.display(), out.status);
    }
    serde_json::from_slice(&out.stdout).context("stlm eval ppl printed no JSON")
}

/// The markdown table of `rows` (the best validation bits per byte in bold).
fn table(rows: &[Row], eval: Option<&Path>) -> String {
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
fn write_reports(out: &Path, rows: &[Row], a: &SweepArgs) -> Result<()> {
    let header = format!(
        "# Sweep of {}\n\nEvery variant trained for {} min (`stlm sweep`); bits per byte on each run's validation split.\n\n",
        a.config.display(),
        a.budget_minutes
    );
    stlm_core::atomic_write_bytes(&out.join("sweep.md"), format!("{header}{}", table(rows, a.eval_data.as_deref())).as_bytes())?;
    let mut csv = csv::Writer::from_writer(Vec::new());
    csv.write_record([
        "variant", "dir", "parameters", "steps", "train_seconds", "tokens_per_s", "loss", "val_loss", "val_bpb", "eval_bpb", "exit_bpb",
        "exit_average_depth", "exit_tokens_per_s", "full_tokens_per_s",
    ])?;
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
        ])?;
    }
    let csv = csv.into_inner().map_err(|e| anyhow::anyhow!("sweep.csv: {e}"))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_split_at_top_level_commas() {
        assert_eq!(split_values("silu,relu2"), vec!["silu", "relu2"]);
        assert_eq!(split_values("-, { repeats = 2, mlp = true }"), vec!["-", "{ repeats = 2, mlp = true }"]);
        assert_eq!(split_values("[1, 2],[3]"), vec!["[1, 2]", "[3]"]);
        assert_eq!(split_values("\"a,b\",c"), vec!["\"a,b\"", "c"]);
    }

    #[test]
    fn the_grid_is_every_combination() {
        let sets = ["model.hidden_act=silu,relu2".to_string(), "model.layer_sharing=-,{ repeats = 2 }".to_string(), "train.lr=1e-3".to_string()];
        let g = grid(&[], &sets, &["a.txt".into(), "b.txt+c.txt".into()]).unwrap();
        assert_eq!(g.len(), 8);
        assert_eq!(g[0].label, "hidden_act=silu, layer_sharing=base, data=a.txt");
        assert_eq!(g[0].sets, vec!["model.hidden_act=silu", "train.lr=1e-3"]);
        assert_eq!(g[3].sets, vec!["model.hidden_act=silu", "model.layer_sharing={ repeats = 2 }", "train.lr=1e-3"]);
        assert_eq!(g[3].data, vec!["b.txt", "c.txt"]);
        assert_eq!(g[3].dir, "03-hidden_act=silu_layer_sharing=_repeats_=_2_data=b.txt_c.txt");
        let dirs: std::collections::HashSet<_> = g.iter().map(|v| v.dir.clone()).collect();
        assert_eq!(dirs.len(), 8, "distinct run directories");
        assert_eq!(grid(&[], &[], &[]).unwrap()[0].label, "base");
        assert!(grid(&[], &["model.x".into()], &[]).unwrap_err().to_string().contains("TABLE.FIELD=V1,V2"));
        assert!(grid(&[], &["a.b=1".into(), "a.b=2".into()], &[]).unwrap_err().to_string().contains("twice"));
        assert!(grid(&[], &["a.b=1,,2".into()], &[]).unwrap_err().to_string().contains("empty value"));
    }

    #[test]
    fn named_variants_are_a_list_with_their_own_data() {
        let named = [
            "base:".to_string(),
            "share:model.layer_sharing.repeats=2".to_string(),
            "ctx:model.layer_shapes.context = { min_window = 8, max_window = 64 };train.lr=1e-3".to_string(),
            "wiki:data=w.txt+x.txt".to_string(),
        ];
        let g = grid(&named, &[], &["s.txt".into()]).unwrap();
        assert_eq!(g.iter().map(|v| v.label.as_str()).collect::<Vec<_>>(), ["base", "share", "ctx", "wiki"]);
        assert!(g[0].sets.is_empty() && g[0].data == ["s.txt"]);
        assert_eq!(g[2].sets, ["model.layer_shapes.context={ min_window = 8, max_window = 64 }", "train.lr=1e-3"]);
        assert_eq!(g[3].data, ["w.txt", "x.txt"], "a variant's own data");
        let g = grid(&named[..2], &["model.hidden_act=silu,relu".into()], &[]).unwrap();
        assert_eq!(g[3].label, "share, hidden_act=relu");
        assert_eq!(g[3].sets, ["model.layer_sharing.repeats=2", "model.hidden_act=relu"]);
        assert!(grid(&["x".into()], &[], &[]).unwrap_err().to_string().contains("NAME:KEY=V"));
        assert!(grid(&["a:b".into()], &[], &[]).unwrap_err().to_string().contains("not TABLE.FIELD=VALUE"));
        assert!(grid(&["a:".into(), "a:".into()], &[], &[]).unwrap_err().to_string().contains("twice"));
        assert!(grid(&["w:data=a"].map(String::from), &[], &["b".into(), "c".into()]).unwrap_err().to_string().contains("several"));
    }
}
