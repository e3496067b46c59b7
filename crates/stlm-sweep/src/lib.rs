//! stlm-sweep: one base config and a grid of variants, each trained by `stlm train` in its own
//! process with the same time budget, then compared in a table (validation bits per byte,
//! parameters, tokens/s) and a plot.
//!
//! A variant that finished keeps its result (`sweep-result.json` in its run directory); one that
//! was interrupted is trained again from the start, so every row had the same budget. Running
//! the same sweep again continues a killed one; a directory that holds another sweep is refused.
//!
//! - [`grid`]: the variants (named variants, `TABLE.FIELD=V1,V2` axes, training texts).
//! - [`run`]: trains and scores every variant; [`report`]: the table, CSV and plot.

pub mod grid;
pub mod report;

use grid::Variant;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use stlm_core::{parse_device, CoreError, DType};
use stlm_eval::text::{score_text, TextScoring};
use stlm_eval::PplReport;
use stlm_model::{EarlyExit, ExitMeasure};
use stlm_tokenizers::Tokenizer;

/// Errors of a sweep.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// A bad sweep setting or variant; names it.
    #[error("{0}")]
    Input(String),
    /// A file of the sweep could not be read or written, or holds something else.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// A run's metrics could not be read.
    #[error(transparent)]
    Train(#[from] stlm_train::TrainError),
    /// Scoring a variant failed.
    #[error(transparent)]
    Eval(#[from] stlm_eval::EvalError),
    /// A trained model could not be loaded.
    #[error(transparent)]
    Model(#[from] stlm_model::ModelError),
    /// A model's tokenizer could not be loaded.
    #[error(transparent)]
    Tokenizer(#[from] stlm_tokenizers::TokenizerError),
    /// The sweep was stopped (Ctrl-C) while a variant trained.
    #[error("sweep stopped during {0}; run the same sweep again to continue (that variant starts again)")]
    Stopped(String),
}

/// Result alias for stlm-sweep.
pub type Result<T, E = SweepError> = std::result::Result<T, E>;

pub(crate) fn input(message: String) -> SweepError {
    SweepError::Input(message)
}

fn io(path: &Path, e: std::io::Error) -> SweepError {
    CoreError::io(path, e).into()
}

pub(crate) fn format_error(path: &Path, message: impl std::fmt::Display) -> SweepError {
    CoreError::Format { path: path.to_path_buf(), message: message.to_string() }.into()
}

/// What a sweep is: its base config, variants, budget and scoring.
#[derive(Debug, Clone)]
pub struct SweepSpec {
    /// Base TOML config, as `stlm train` reads it.
    pub config: PathBuf,
    /// The grid (see [`grid::grid`]).
    pub variants: Vec<Variant>,
    /// Training time of every variant, in minutes.
    pub budget_minutes: f64,
    /// Steps at most per variant (default: the config's `max_steps`).
    pub max_steps: Option<u64>,
    /// A text every variant is also scored on (bits per byte), one yardstick across datasets.
    pub eval_data: Option<PathBuf>,
    /// With `eval_data`: also scored with early exit at this softmax threshold, and at full depth
    /// through the same one-position step.
    pub early_exit: Option<f64>,
    /// The sweep directory: one run per variant, sweep.json, sweep.csv, sweep.md, sweep.svg.
    pub out: PathBuf,
    /// The device each run trains on (`auto`, `cpu`, `cuda:N`).
    pub device: String,
    /// The `stlm` executable that trains each variant.
    pub exe: PathBuf,
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
pub struct Row {
    /// The variant's label.
    pub variant: String,
    /// Its run directory inside the sweep directory.
    pub dir: String,
    /// Stored parameters of the trained model.
    pub parameters: i64,
    /// Steps trained.
    pub steps: u64,
    /// Training time, seconds.
    pub train_seconds: f64,
    /// Mean training tokens per second (the first logged step left out).
    pub tokens_per_s: f64,
    /// Last training loss.
    pub loss: f64,
    /// Last validation loss.
    pub val_loss: Option<f64>,
    /// Last validation bits per byte.
    pub val_bpb: Option<f64>,
    /// Bits per byte on the sweep's eval text.
    pub eval_bpb: Option<f64>,
    /// Scores with early exit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExitRow>,
}

/// A variant scored on the eval text with early exit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExitRow {
    /// Bits per byte when positions exit early.
    pub bpb: f64,
    /// Layers per position, on average.
    pub average_depth: f64,
    /// The model's depth.
    pub depth: u64,
    /// Positions per second, decoding with exits.
    pub tokens_per_s: f64,
    /// Positions per second, decoding at full depth with the same step.
    pub full_tokens_per_s: f64,
}

/// The rows of a sweep and the variants that failed to train.
#[derive(Debug, Clone, Serialize)]
pub struct SweepOutcome {
    /// The sweep directory.
    pub sweep: PathBuf,
    /// Training time of every variant, in minutes.
    pub budget_minutes: f64,
    /// One row per variant that trained.
    pub variants: Vec<Row>,
    /// Labels of the variants whose training failed (their logs are in the sweep directory).
    pub failed: Vec<String>,
}

const RESULT_FILE: &str = "sweep-result.json";

/// Trains every variant of `spec` not trained yet (each in its own `stlm train` process, its
/// output shown on stderr and kept in `VARIANT.log`), scores it, and writes the reports. A set
/// `stop` (Ctrl-C) ends the sweep after the variant in training stops.
pub fn run(spec: &SweepSpec, stop: &AtomicBool) -> Result<SweepOutcome> {
    if !(spec.budget_minutes > 0.0 && spec.budget_minutes.is_finite()) {
        return Err(input(format!("budget_minutes {}: must be a positive number of minutes", spec.budget_minutes)));
    }
    let config_text = std::fs::read_to_string(&spec.config).map_err(|e| io(&spec.config, e))?;
    let manifest = Manifest {
        config: spec.config.display().to_string(),
        config_text,
        budget_minutes: spec.budget_minutes,
        max_steps: spec.max_steps,
        eval_data: spec.eval_data.as_ref().map(|p| p.display().to_string()),
        early_exit: spec.early_exit,
        variants: spec.variants.clone(),
    };
    claim(&spec.out, &manifest)?;
    let n = spec.variants.len();
    let (mut rows, mut failed) = (Vec::new(), Vec::new());
    for (i, v) in spec.variants.iter().enumerate() {
        let run = spec.out.join(&v.dir);
        if let Some(mut row) = read_result(&run)? {
            eprintln!("[{}/{n}] {}: trained earlier", i + 1, v.label);
            // Scores an earlier run lacks (measured after it trained) are filled in.
            if spec.eval_data.is_some() && row.eval_bpb.is_none() {
                score(spec, &run.join("model"), &mut row)?;
                write_result(&run, &row)?;
            }
            rows.push(row);
            continue;
        }
        if run.exists() {
            // Interrupted: train it again from the start, so that it gets the whole budget.
            std::fs::remove_dir_all(&run).map_err(|e| io(&run, e))?;
        }
        eprintln!("[{}/{n}] {}: training for {} min in {}", i + 1, v.label, spec.budget_minutes, run.display());
        let log = spec.out.join(format!("{}.log", v.dir));
        let status = run_logged(train_command(spec, v, &run), &log)?;
        if status.code() == Some(130) || stop.load(Ordering::SeqCst) {
            return Err(SweepError::Stopped(v.label.clone()));
        }
        if !status.success() {
            eprintln!("[{}/{n}] {}: failed ({status}); its output is in {}", i + 1, v.label, log.display());
            failed.push(v.label.clone());
            continue;
        }
        let mut row = measure(v, &run)?;
        score(spec, &run.join("model"), &mut row)?;
        write_result(&run, &row)?;
        rows.push(row);
    }
    report::write_reports(spec, &rows)?;
    Ok(SweepOutcome { sweep: spec.out.clone(), budget_minutes: spec.budget_minutes, variants: rows, failed })
}

/// Makes `out` this sweep's directory: a new one gets `sweep.json`; an existing one must hold
/// the same sweep (config, budget and variants).
fn claim(out: &Path, manifest: &Manifest) -> Result<()> {
    let path = out.join("sweep.json");
    if path.is_file() {
        let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
        let old: Manifest = serde_json::from_str(&text).map_err(|e| format_error(&path, format!("not a sweep manifest: {e}")))?;
        if old != *manifest {
            return Err(input(format!(
                "{}: holds a different sweep (config, budget, steps, eval data or variants differ); choose another directory or remove it",
                out.display()
            )));
        }
        return Ok(());
    }
    if out.exists() && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(input(format!("{}: exists and is not a sweep directory (no sweep.json)", out.display())));
    }
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let json = serde_json::to_string_pretty(manifest).map_err(|e| format_error(&path, e))?;
    Ok(stlm_core::atomic_write_bytes(&path, json.as_bytes())?)
}

fn read_result(run: &Path) -> Result<Option<Row>> {
    let path = run.join(RESULT_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
    Ok(Some(serde_json::from_str(&text).map_err(|e| format_error(&path, format!("not a sweep result: {e}")))?))
}

fn write_result(run: &Path, row: &Row) -> Result<()> {
    let path = run.join(RESULT_FILE);
    let json = serde_json::to_string_pretty(row).map_err(|e| format_error(&path, e))?;
    Ok(stlm_core::atomic_write_bytes(&path, json.as_bytes())?)
}

/// The `stlm train` command of variant `v`, writing to `run`.
fn train_command(spec: &SweepSpec, v: &Variant, run: &Path) -> Command {
    let mut cmd = Command::new(&spec.exe);
    cmd.arg("--threads").arg(tch::get_num_threads().to_string());
    cmd.arg("train").arg("--config").arg(&spec.config).arg("--out").arg(run);
    cmd.arg("--time-limit").arg((spec.budget_minutes * 60.0).to_string()).args(["--samples", "0"]);
    cmd.args(["--device", &spec.device]);
    if let Some(steps) = spec.max_steps {
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
fn run_logged(mut cmd: Command, log: &Path) -> Result<ExitStatus> {
    let mut file = std::fs::File::create(log).map_err(|e| io(log, e))?;
    let mut child = cmd.stdin(Stdio::null()).stdout(std::io::stderr()).stderr(Stdio::piped()).spawn().map_err(|e| io(cmd.get_program().as_ref(), e))?;
    let Some(mut pipe) = child.stderr.take() else { return Err(input("stlm train: no stderr pipe".into())) };
    let mut buf = [0u8; 8192];
    loop {
        let n = pipe.read(&mut buf).map_err(|e| io(log, e))?;
        if n == 0 {
            break;
        }
        // The console copy is best effort; the log is what must be complete.
        let _ = std::io::stderr().write_all(&buf[..n]);
        file.write_all(&buf[..n]).map_err(|e| io(log, e))?;
    }
    child.wait().map_err(|e| io(log, e))
}

/// The row of a finished run: parameters from its model directory, the rest from metrics.jsonl.
fn measure(v: &Variant, run: &Path) -> Result<Row> {
    let weights = run.join("model").join("model.safetensors");
    let tensors = tch::Tensor::read_safetensors(&weights).map_err(|e| format_error(&weights, e))?;
    let parameters = tensors.iter().map(|(_, t)| t.numel() as i64).sum();
    let path = run.join("metrics.jsonl");
    let lines = stlm_train::metrics::read_metrics(&path)?;
    let Some(last) = lines.last() else { return Err(format_error(&path, "no steps were logged")) };
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

/// Fills in `row`'s scores on the eval text (bits per byte, and with early exit the exit row)
/// for the model in `model`.
fn score(spec: &SweepSpec, model: &Path, row: &mut Row) -> Result<()> {
    let Some(text_path) = &spec.eval_data else { return Ok(()) };
    let text = std::fs::read_to_string(text_path).map_err(|e| io(text_path, e))?;
    let mut scorer = Scorer::load(spec, model)?;
    row.eval_bpb = Some(scorer.score(&text, None)?.bits_per_byte);
    if let Some(threshold) = spec.early_exit {
        // A model that cannot exit early (its width changes with depth) has no exit columns.
        row.exit = match exit_row(&mut scorer, &text, threshold) {
            Ok(exit) => Some(exit),
            Err(e) => {
                eprintln!("{}: no early-exit scores: {e}", row.variant);
                None
            }
        };
    }
    Ok(())
}

/// The model in `model` scored on `text` with early exit at `threshold`, and at full depth
/// through the same one-position-at-a-time step (an exit allowed only after the last layer,
/// so no exit is ever checked) for the speed to compare with.
fn exit_row(scorer: &mut Scorer, text: &str, threshold: f64) -> Result<ExitRow> {
    let rule = |min_layers| EarlyExit { measure: ExitMeasure::Softmax, threshold, min_layers };
    let exit = scorer.score(text, Some(rule(1)))?;
    let (Some(average_depth), Some(depth), Some(tokens_per_s)) = (exit.average_depth, exit.depth, exit.tokens_per_s) else {
        return Err(input("early exit gave no depth or speed".into()));
    };
    let full = scorer.score(text, Some(rule(depth)))?;
    Ok(ExitRow { bpb: exit.bits_per_byte, average_depth, depth: depth as u64, tokens_per_s, full_tokens_per_s: full.tokens_per_s.ok_or_else(|| input("full-depth decoding gave no speed".into()))? })
}

/// A variant's model (on the sweep's device, float32) and tokenizer, loaded once for its scores.
struct Scorer {
    model: stlm_model::AnyModel,
    tok: Tokenizer,
}

impl Scorer {
    fn load(spec: &SweepSpec, model: &Path) -> Result<Self> {
        let device = parse_device(&spec.device)?;
        let lm = stlm_model::load_any_model(model, device, DType::Float32)?;
        let tok_path = stlm_model::tokenizer_path(model).ok_or_else(|| input(format!("{}: no tokenizer.json", model.display())))?;
        Ok(Scorer { model: lm, tok: Tokenizer::from_file(&tok_path)? })
    }

    /// The model scored on `text`; with an exit rule over disjoint windows of the model's
    /// context, at most 1024 (decoding one position at a time costs a step per position, and
    /// each position is decoded once).
    fn score(&mut self, text: &str, exit: Option<EarlyExit>) -> Result<PplReport> {
        let window = match (&exit, &self.model) {
            (Some(_), stlm_model::AnyModel::Tokens(m)) => Some(m.config.max_position_embeddings.min(1024)),
            _ => None,
        };
        let opts = TextScoring { max_length: window, stride: window, repeats: None, exit, progress: false };
        Ok(score_text(&mut self.model, &self.tok, text, &opts)?)
    }
}
