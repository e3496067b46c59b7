//! `stlm prune`: a model directory -> a pruned model directory with `pruning.json` (the report:
//! sparsity per matrix and overall or the units removed, parameters, validation perplexity
//! before and after, time).

use crate::common::{load_tokenizer, print_json, DeviceArgs};
use crate::train::PRUNING_FILE;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use stlm_eval::{perplexity, WindowOptions};
use stlm_model::DecoderModel;
use stlm_prune::{Importance, Method, Pattern, Perplexity, PruneOptions, PruneReport, Scope, SparseGptOptions, StructuredOptions, Unit};
use stlm_tokenizers::Tokenizer;
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
    let job = Job::load(&a, method.calibrated())?;
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
    let job = Job::load(a, importance != Importance::Magnitude)?;
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
    /// Loads `--model`, `--calib` (when `calibrated`; an error when given but not needed) and `--val`.
    fn load(a: &PruneArgs, calibrated: bool) -> Result<Self> {
        let tok = load_tokenizer(a.tokenizer.as_deref(), &a.model)?;
        let model = a.device.load(&a.model)?;
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
    if samples == 0 || len < 2 {
        bail!("--calib-samples must be at least 1 and --calib-len at least 2");
    }
    let len = len.min(model.config.max_position_embeddings as usize);
    let ids: Vec<i64> = tok.encode(&read_text(path)?, false)?.into_iter().map(i64::from).collect();
    model.check_ids(&ids).with_context(|| format!("{}: tokens outside the model's vocabulary", path.display()))?;
    if ids.len() < len {
        bail!("{}: {} tokens, fewer than one calibration window of {len}", path.display(), ids.len());
    }
    let starts: Vec<usize> = match samples {
        1 => vec![0],
        n => (0..n).map(|i| i * (ids.len() - len) / (n - 1)).collect(),
    };
    let windows: Vec<Tensor> = starts.iter().map(|&s| Tensor::from_slice(&ids[s..s + len])).collect();
    Ok(windows.chunks(8).map(|c| Tensor::stack(c, 0).to_device(model.device())).collect())
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
        // Start from an end-of-text/BOS token so the first token is scored too (as `stlm eval ppl`).
        let start = model.config.bos_token_id.or(tok.eos_id().map(i64::from)).filter(|&id| id < model.config.vocab_size);
        let ids = start.into_iter().chain(tok.encode(&text, false)?.into_iter().map(i64::from)).collect();
        let max_length = len.min(model.config.max_position_embeddings);
        Ok(ValText { ids, bytes: text.len() as u64, window: WindowOptions { max_length, stride: max_length } })
    }

    fn perplexity(&self, model: &DecoderModel, progress: bool) -> Result<Perplexity> {
        let r = perplexity(model, &self.ids, self.bytes, self.window, progress)?;
        Ok(Perplexity { loss: r.loss, ppl: r.ppl, bits_per_byte: r.bits_per_byte })
    }
}
