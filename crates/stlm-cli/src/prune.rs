//! `stlm prune`: a model directory -> a pruned model directory with `pruning.json` (the report:
//! sparsity per matrix and overall or the units removed, parameters, validation perplexity
//! before and after, time).

use crate::common::{load_tokenizer, print_json, DeviceArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use stlm_eval::{perplexity, WindowOptions};
use stlm_model::{DecoderModel, PRUNING_FILE};
use stlm_prune::{Importance, Method, Pattern, Perplexity, PruneOptions, PruneReport, Scope, SparseGptOptions, StructuredOptions, Unit};
use stlm_tokenizers::Tokenizer;
use stlm_train::trainer::RunControl;
use tch::Tensor;

#[derive(Args)]
pub struct PruneArgs {
    /// Model directory to prune (token models).
    #[arg(long)]
    model: PathBuf,
    /// Directory for the pruned model (with `pruning.json`).
    #[arg(long)]
    out: PathBuf,
    /// How weights are scored: magnitude, wanda or sparsegpt (unstructured and N:M pruning).
    #[arg(long, default_value = "magnitude", conflicts_with = "structured")]
    method: String,
    /// Fraction of each matrix's weights to prune (0.5: half).
    #[arg(long, conflicts_with_all = ["nm", "structured"], required_unless_present_any = ["nm", "structured"])]
    sparsity: Option<f64>,
    /// Semi-structured N:M sparsity: N of every M consecutive inputs pruned, e.g. 2:4.
    #[arg(long, conflicts_with = "structured")]
    nm: Option<String>,
    /// Structured pruning: remove whole heads, neurons, experts or layers (the model shrinks).
    #[arg(long, value_name = "UNIT", requires = "amount")]
    structured: Option<String>,
    /// Structured: the fraction of units removed from every block (of the blocks, for layers).
    #[arg(long)]
    amount: Option<f64>,
    /// Structured: magnitude, activation or taylor (default: magnitude; activation, that is
    /// block influence, for layers).
    #[arg(long)]
    importance: Option<String>,
    /// Where scores compete: row (Wanda's default), layer (magnitude's), or global (magnitude only).
    #[arg(long)]
    scope: Option<String>,
    /// Leave matrices whose name contains this dense (repeatable; default lm_head; `--skip none`
    /// prunes every linear layer). Embeddings are never pruned.
    #[arg(long, default_values_t = vec!["lm_head".to_string()])]
    skip: Vec<String>,
    /// Calibration text for wanda and sparsegpt (.txt).
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Calibration windows, spread evenly over the calibration text.
    #[arg(long, default_value_t = 64)]
    calib_samples: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 256)]
    calib_len: usize,
    /// SparseGPT: columns per block.
    #[arg(long, default_value_t = 128)]
    block_size: i64,
    /// SparseGPT: Hessian damping as a fraction of its mean diagonal.
    #[arg(long, default_value_t = 0.01)]
    damp: f64,
    /// Validation text: perplexity before and after pruning goes into the report.
    #[arg(long)]
    val: Option<PathBuf>,
    /// Validation window (tokens); windows are disjoint.
    #[arg(long, default_value_t = 256)]
    val_len: i64,
    /// tokenizer.json (default: the model directory's).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Iterative pruning: `cubic` raises the sparsity over `--stages` stages as
    /// `s * (1 - (1 - t/stages)^3)` (Zhu & Gupta 2017), fine-tuning `--stage-steps` steps after each
    /// (zeros kept); `one-shot` (default) prunes once.
    #[arg(long, default_value = "one-shot")]
    schedule: String,
    /// Iterative pruning: number of prune-and-fine-tune stages.
    #[arg(long, default_value_t = 4)]
    stages: u32,
    /// Iterative pruning: fine-tuning steps after each stage.
    #[arg(long, default_value_t = 50)]
    stage_steps: u64,
    /// Iterative pruning: the run config whose [train] and [data] tables fine-tune each stage.
    #[arg(long, value_name = "FILE")]
    train_config: Option<PathBuf>,
    /// Iterative pruning: training text (repeatable), as `stlm train --data`.
    #[arg(long = "data")]
    data: Vec<PathBuf>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(a: PruneArgs) -> Result<()> {
    if same_dir(&a.model, &a.out) {
        bail!("--out {}: must differ from --model (the original is kept)", a.out.display());
    }
    if let Some(unit) = &a.structured {
        return run_structured(&a, unit.parse()?);
    }
    if a.amount.is_some() || a.importance.is_some() {
        bail!("--amount and --importance are for structured pruning: add --structured heads|neurons|experts|layers");
    }
    let method: Method = a.method.parse()?;
    let pattern = match (&a.nm, a.sparsity) {
        (Some(nm), _) => Pattern::parse_nm(nm)?,
        (None, Some(s)) => Pattern::fraction(s)?,
        (None, None) => bail!("give --sparsity F or --nm N:M"),
    };
    let scope = match &a.scope {
        Some(s) => s.parse::<Scope>()?,
        None => method.default_scope(),
    };
    let skip = if a.skip.iter().any(|s| s == "none") { Vec::new() } else { a.skip.clone() };
    let opts = PruneOptions { method, pattern, scope, skip, sparsegpt: SparseGptOptions { block_size: a.block_size, damp: a.damp } };
    match a.schedule.as_str() {
        "one-shot" => {}
        "cubic" => return run_schedule(&a, &opts),
        other => bail!("--schedule {other}: expected one-shot or cubic"),
    }
    let job = Job::load(&a, &a.model, method.calibrated())?;
    let before = job.val_perplexity(&job.model)?;
    let mut model = job.model;
    let mut report: PruneReport = stlm_prune::prune(&mut model, &job.calib, &opts, job.progress)?;
    report.before = before;
    report.after = job.val.as_ref().map(|v| v.perplexity(&model, job.progress)).transpose()?;
    finish(&a, &model, &report, &report.table())
}

/// `stlm prune --structured UNIT --amount F`: the smaller model and its report.
fn run_structured(a: &PruneArgs, unit: Unit) -> Result<()> {
    let Some(amount) = a.amount else { bail!("--structured: give --amount F (the fraction of units removed)") };
    let importance: Importance = match (&a.importance, unit) {
        (Some(i), _) => i.parse()?,
        (None, Unit::Layers) => Importance::Activation,
        (None, _) => Importance::Magnitude,
    };
    let job = Job::load(a, &a.model, importance != Importance::Magnitude)?;
    let before = job.val_perplexity(&job.model)?;
    let mut model = job.model;
    let opts = StructuredOptions { unit, amount, importance };
    let (smaller, mut report) = stlm_prune::prune_structured(&mut model, &job.calib, &opts, job.progress)?;
    report.before = before;
    report.after = job.val.as_ref().map(|v| v.perplexity(&smaller, job.progress)).transpose()?;
    finish(a, &smaller, &report, &report.table())
}

/// The model, its calibration batches and validation text, loaded for a prune.
struct Job {
    model: DecoderModel,
    calib: Vec<Tensor>,
    val: Option<ValText>,
    progress: bool,
}

impl Job {
    /// Loads `dir`, `--calib` (when `calibrated`; an error when given but not needed) and `--val`.
    fn load(a: &PruneArgs, dir: &Path, calibrated: bool) -> Result<Self> {
        let tok = load_tokenizer(a.tokenizer.as_deref(), dir)?;
        let model = a.device.load(dir)?;
        let calib = match (&a.calib, calibrated) {
            (Some(path), true) => calibration_batches(&model, &tok, path, a.calib_samples, a.calib_len)?,
            (Some(path), false) => bail!("--calib {}: magnitude scoring needs no calibration; drop it", path.display()),
            (None, _) => Vec::new(),
        };
        let val = a.val.as_deref().map(|p| ValText::load(p, &model, &tok, a.val_len)).transpose()?;
        Ok(Job { model, calib, val, progress: std::io::stderr().is_terminal() })
    }

    fn val_perplexity(&self, model: &DecoderModel) -> Result<Option<Perplexity>> {
        self.val.as_ref().map(|v| v.perplexity(model, self.progress)).transpose()
    }
}

/// One stage of an iterative schedule.
#[derive(serde::Serialize)]
struct Stage {
    /// 1-based.
    stage: u32,
    /// Sparsity of the pruned matrices after this stage's prune.
    sparsity: f64,
    /// Validation perplexity after the prune, before fine-tuning.
    pruned: Option<Perplexity>,
    /// Validation perplexity after fine-tuning.
    tuned: Option<Perplexity>,
}

/// The report of an iterative prune: the last stage's report (its `after` is the fine-tuned
/// model's), the schedule and every stage.
#[derive(serde::Serialize)]
struct ScheduleReport {
    #[serde(flatten)]
    last: PruneReport,
    schedule: &'static str,
    stages: Vec<Stage>,
}

/// `--schedule cubic`: prune to a rising sparsity and fine-tune, `--stages` times; stage files
/// go to `OUT/stages/stage-N/{pruned,run}`, the final model to `OUT`.
fn run_schedule(a: &PruneArgs, opts: &PruneOptions) -> Result<()> {
    let Pattern::Fraction { sparsity } = opts.pattern else { bail!("--schedule cubic raises a --sparsity fraction; N:M is reached in one step") };
    let Some(train_config) = &a.train_config else { bail!("--schedule cubic: give --train-config FILE (the [train] table that fine-tunes each stage)") };
    if a.data.is_empty() || a.stages == 0 {
        bail!("--schedule cubic: give --data FILE (training text) and --stages of at least 1");
    }
    if a.device.dtype != "float32" {
        bail!("--dtype {}: fine-tuning runs in float32 for now", a.device.dtype);
    }
    let device = stlm_core::parse_device(&a.device.device)?;
    stlm_core::memory::keep_freed_memory(); // as `stlm train` does
    let mut current = a.model.clone();
    let (mut stages, mut before, mut last) = (Vec::new(), None, None);
    for t in 1..=a.stages {
        let s_t = sparsity * (1.0 - (1.0 - t as f64 / a.stages as f64).powi(3));
        eprintln!("stage {t}/{}: pruning {} to {:.1}%", a.stages, current.display(), s_t * 100.0);
        let job = Job::load(a, &current, opts.method.calibrated())?;
        if t == 1 {
            before = job.val_perplexity(&job.model)?;
        }
        let mut model = job.model;
        let stage_opts = PruneOptions { pattern: Pattern::Fraction { sparsity: s_t }, ..opts.clone() };
        let mut report = stlm_prune::prune(&mut model, &job.calib, &stage_opts, job.progress)?;
        let pruned_ppl = job.val.as_ref().map(|v| v.perplexity(&model, job.progress)).transpose()?;
        report.before = before;
        let dir = a.out.join("stages").join(format!("stage-{t}"));
        let tokenizer_file = a.tokenizer.clone().or_else(|| stlm_model::tokenizer_path(&current));
        model.save(&dir.join("pruned"), tokenizer_file.as_deref())?;
        stlm_core::atomic_write_bytes(&dir.join("pruned").join(PRUNING_FILE), serde_json::to_string_pretty(&report)?.as_bytes())?;
        drop(model);
        let control = RunControl { progress: job.progress, stop: crate::train::ctrl_c()?, ..Default::default() };
        current = stlm_train::run::fine_tune(train_config, &dir.join("pruned"), &a.data, &dir.join("run"), a.stage_steps, device, control)?;
        let tuned = Job::load(a, &current, false)?;
        let tuned_ppl = tuned.val_perplexity(&tuned.model)?;
        if let (Some(p), Some(f)) = (pruned_ppl, tuned_ppl) {
            eprintln!("stage {t}: {:.1}% sparse, validation perplexity {:.3} after pruning, {:.3} after fine-tuning", report.target_sparsity * 100.0, p.ppl, f.ppl);
        }
        stages.push(Stage { stage: t, sparsity: report.target_sparsity, pruned: pruned_ppl, tuned: tuned_ppl });
        report.after = tuned_ppl;
        last = Some((report, tuned.model));
    }
    let (last, model) = last.expect("at least one stage");
    let table = last.table();
    finish(a, &model, &ScheduleReport { last, schedule: "cubic", stages }, &table)
}

/// Saves the pruned model and its report (`pruning.json`), and prints the report.
fn finish(a: &PruneArgs, model: &DecoderModel, report: &impl serde::Serialize, table: &str) -> Result<()> {
    let tokenizer_file = a.tokenizer.clone().or_else(|| stlm_model::tokenizer_path(&a.model));
    model.save(&a.out, tokenizer_file.as_deref())?;
    let text = serde_json::to_string_pretty(report)?;
    stlm_core::atomic_write_bytes(&a.out.join(PRUNING_FILE), text.as_bytes())?;
    if a.json {
        print_json(report)
    } else {
        print!("{table}");
        eprintln!("saved {}", a.out.display());
        Ok(())
    }
}

/// Whether two paths name the same directory (an `--out` that does not exist yet is not `--model`).
fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Reads a text file, naming it on failure.
fn read_text(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read as UTF-8 text", path.display()))?;
    if text.trim().is_empty() {
        bail!("{}: the file is empty", path.display());
    }
    Ok(text)
}

/// `samples` windows of `len` tokens spread evenly over the tokens of `path`, as batches of up
/// to 8 windows `[b, len]` on the model's device.
fn calibration_batches(model: &DecoderModel, tok: &Tokenizer, path: &Path, samples: usize, len: usize) -> Result<Vec<Tensor>> {
    let ids: Vec<i64> = tok.encode(&read_text(path)?, false)?.into_iter().map(i64::from).collect();
    match stlm_prune::calibration_windows(model, &ids, samples, len) {
        Err(stlm_prune::PruneError::Option(e)) => Err(e.into()),
        other => other.with_context(|| path.display().to_string()),
    }
}

/// A validation text, tokenized once, scored in disjoint windows.
struct ValText {
    ids: Vec<i64>,
    bytes: u64,
    window: WindowOptions,
}

impl ValText {
    fn load(path: &Path, model: &DecoderModel, tok: &Tokenizer, len: i64) -> Result<Self> {
        let text = read_text(path)?;
        let ids = stlm_eval::scored_ids(model, tok, &text)?;
        let max_length = len.min(model.config.max_position_embeddings);
        Ok(ValText { ids, bytes: text.len() as u64, window: WindowOptions { max_length, stride: max_length } })
    }

    fn perplexity(&self, model: &DecoderModel, progress: bool) -> Result<Perplexity> {
        let r = perplexity(model, &self.ids, self.bytes, self.window, progress)?;
        Ok(Perplexity { loss: r.loss, ppl: r.ppl, bits_per_byte: r.bits_per_byte })
    }
}
