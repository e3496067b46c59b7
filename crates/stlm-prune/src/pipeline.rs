//! A prune from model directory to model directory, as `stlm prune` runs it: load the model,
//! its calibration windows and validation text; prune once, structurally, or on a cubic schedule
//! with fine-tuning between stages; save the pruned model with its report (`pruning.json`).

use crate::{prune, prune_structured, Pattern, Perplexity, PruneError, PruneOptions, PruneReport, Result, StructuredOptions, StructuredReport};
use serde::Serialize;
use std::path::{Path, PathBuf};
use stlm_eval::heldout::HeldOutText;
use stlm_model::calibration::CalibrationText;
use stlm_model::{load_model, tokenizer_path, DecoderModel, PRUNING_FILE};
use stlm_tokenizers::Tokenizer;
use stlm_train::trainer::RunControl;
use tch::{Device, Tensor};

/// What a prune scores on; as `stlm prune` takes it.
#[derive(Debug, Clone, clap::Args)]
pub struct Inputs {
    /// tokenizer.json (default: the model directory's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The calibration text of wanda, sparsegpt, and activation or taylor importance.
    #[command(flatten)]
    pub calibration: CalibrationText,
    /// Validation text: perplexity before and after pruning goes into the report.
    #[arg(long)]
    pub val: Option<PathBuf>,
    /// Validation window (tokens); windows are disjoint.
    #[arg(long, default_value_t = 256)]
    pub val_len: i64,
}

/// Where a prune reads and writes, and what it scores on.
#[derive(Debug, Clone)]
pub struct PruneJob {
    /// The model directory pruned (token models).
    pub model: PathBuf,
    /// The directory of the pruned model.
    pub out: PathBuf,
    /// Calibration and validation texts, and the tokenizer.
    pub inputs: Inputs,
    /// Where the model runs.
    pub device: Device,
    /// Shows progress bars.
    pub progress: bool,
}

/// What a prune does.
pub enum Plan {
    /// Unstructured or N:M pruning in one step.
    OneShot(PruneOptions),
    /// Whole heads, neurons, experts or blocks removed (the model shrinks).
    Structured(StructuredOptions),
    /// Zhu & Gupta's cubic schedule: `stages` prunes to `s (1 - (1 - t/stages)^3)`, each followed
    /// by `stage_steps` steps of fine-tuning with the run config `train_config` on `data` (zeros
    /// kept); stage files go to `OUT/stages/stage-N/{pruned,run}`.
    Cubic {
        /// The prune of every stage (its sparsity is the final one).
        opts: PruneOptions,
        /// Run config whose `[train]` and `[data]` tables fine-tune each stage.
        train_config: PathBuf,
        /// Training text.
        data: Vec<PathBuf>,
        /// Prune-and-fine-tune stages.
        stages: u32,
        /// Fine-tuning steps per stage.
        stage_steps: u64,
        /// The fine-tuning runs' control (stop flag, progress).
        control: RunControl,
    },
}

/// One stage of an iterative schedule.
#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    /// 1-based.
    pub stage: u32,
    /// Sparsity of the pruned matrices after this stage's prune.
    pub sparsity: f64,
    /// Validation perplexity after the prune, before fine-tuning.
    pub pruned: Option<Perplexity>,
    /// Validation perplexity after fine-tuning.
    pub tuned: Option<Perplexity>,
}

/// The report of an iterative prune: the last stage's report (its `after` is the fine-tuned
/// model's), the schedule and every stage.
#[derive(Debug, Clone, Serialize)]
pub struct ScheduleReport {
    /// The last stage's prune.
    #[serde(flatten)]
    pub last: PruneReport,
    /// `cubic`.
    pub schedule: &'static str,
    /// Every stage.
    pub stages: Vec<Stage>,
}

/// The report a prune wrote to `pruning.json`.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Outcome {
    /// One-shot unstructured or N:M.
    OneShot(PruneReport),
    /// Structured.
    Structured(StructuredReport),
    /// Iterative.
    Schedule(ScheduleReport),
}

impl Outcome {
    /// The report as a table for the terminal.
    pub fn table(&self) -> String {
        match self {
            Outcome::OneShot(r) => r.table(),
            Outcome::Structured(r) => r.table(),
            Outcome::Schedule(r) => r.last.table(),
        }
    }
}

/// Runs `plan` on `job`'s model and saves the result in `job.out` with its report.
pub fn run(job: &PruneJob, plan: Plan) -> Result<Outcome> {
    let (model, outcome) = match plan {
        Plan::OneShot(opts) => {
            let loaded = Loaded::load(job, &job.model, opts.method.calibrated())?;
            let before = loaded.val_perplexity(&loaded.model, job.progress)?;
            let mut model = loaded.model;
            let mut report = prune(&mut model, &loaded.calib, &opts, job.progress)?;
            report.before = before;
            report.after = loaded.val.as_ref().map(|v| v.perplexity(&model, job.progress)).transpose()?;
            (model, Outcome::OneShot(report))
        }
        Plan::Structured(opts) => {
            let loaded = Loaded::load(job, &job.model, opts.importance != crate::Importance::Magnitude)?;
            let before = loaded.val_perplexity(&loaded.model, job.progress)?;
            let mut model = loaded.model;
            let (smaller, mut report) = prune_structured(&mut model, &loaded.calib, &opts, job.progress)?;
            report.before = before;
            report.after = loaded.val.as_ref().map(|v| v.perplexity(&smaller, job.progress)).transpose()?;
            (smaller, Outcome::Structured(report))
        }
        Plan::Cubic { opts, train_config, data, stages, stage_steps, control } => {
            let (model, report) = run_schedule(job, &opts, (&train_config, &data), (stages, stage_steps), control)?;
            (model, Outcome::Schedule(report))
        }
    };
    let tokenizer_file = job.inputs.tokenizer.clone().or_else(|| tokenizer_path(&job.model));
    model.save(&job.out, tokenizer_file.as_deref())?;
    write_report(&job.out, &outcome)?;
    Ok(outcome)
}

fn write_report(dir: &Path, report: &impl Serialize) -> Result<()> {
    let path = dir.join(PRUNING_FILE);
    let text = serde_json::to_string_pretty(report).map_err(|e| PruneError::Input(format!("{}: {e}", path.display())))?;
    Ok(stlm_core::atomic_write_bytes(&path, text.as_bytes())?)
}

/// The cubic schedule (see [`Plan::Cubic`]); the fine-tuned last stage and its report.
fn run_schedule(job: &PruneJob, opts: &PruneOptions, (train_config, data): (&Path, &[PathBuf]), (stages, steps): (u32, u64), control: RunControl) -> Result<(DecoderModel, ScheduleReport)> {
    let Pattern::Fraction { sparsity } = opts.pattern else {
        return Err(PruneError::Input("the cubic schedule raises a sparsity fraction; N:M is reached in one step".into()));
    };
    if data.is_empty() || stages == 0 {
        return Err(PruneError::Input("the cubic schedule needs training text and at least one stage".into()));
    }
    stlm_core::memory::keep_freed_memory(); // as `stlm train` does
    let mut current = job.model.clone();
    let (mut records, mut before, mut last) = (Vec::new(), None, None);
    for t in 1..=stages {
        let s_t = sparsity * (1.0 - (1.0 - t as f64 / stages as f64).powi(3));
        eprintln!("stage {t}/{stages}: pruning {} to {:.1}%", current.display(), s_t * 100.0);
        let loaded = Loaded::load(job, &current, opts.method.calibrated())?;
        if t == 1 {
            before = loaded.val_perplexity(&loaded.model, job.progress)?;
        }
        let mut model = loaded.model;
        let stage_opts = PruneOptions { pattern: Pattern::Fraction { sparsity: s_t }, ..opts.clone() };
        let mut report = prune(&mut model, &loaded.calib, &stage_opts, job.progress)?;
        let pruned_ppl = loaded.val.as_ref().map(|v| v.perplexity(&model, job.progress)).transpose()?;
        report.before = before;
        let dir = job.out.join("stages").join(format!("stage-{t}"));
        let tokenizer_file = job.inputs.tokenizer.clone().or_else(|| tokenizer_path(&current));
        model.save(&dir.join("pruned"), tokenizer_file.as_deref())?;
        write_report(&dir.join("pruned"), &report)?;
        drop(model);
        current = stlm_train::run::fine_tune(train_config, &dir.join("pruned"), data, &dir.join("run"), steps, job.device, control.clone())
            .map_err(|source| PruneError::FineTune { stage: t, source })?;
        let tuned = Loaded::load(job, &current, false)?;
        let tuned_ppl = tuned.val_perplexity(&tuned.model, job.progress)?;
        if let (Some(p), Some(f)) = (pruned_ppl, tuned_ppl) {
            eprintln!("stage {t}: {:.1}% sparse, validation perplexity {:.3} after pruning, {:.3} after fine-tuning", report.target_sparsity * 100.0, p.ppl, f.ppl);
        }
        records.push(Stage { stage: t, sparsity: report.target_sparsity, pruned: pruned_ppl, tuned: tuned_ppl });
        report.after = tuned_ppl;
        last = Some((report, tuned.model));
    }
    let Some((last, model)) = last else { return Err(PruneError::Input("no stage ran".into())) };
    Ok((model, ScheduleReport { last, schedule: "cubic", stages: records }))
}

/// The model, its calibration batches and validation text, loaded for a prune.
struct Loaded {
    model: DecoderModel,
    calib: Vec<Tensor>,
    val: Option<HeldOutText>,
}

impl Loaded {
    /// Loads `dir`, the calibration text (when `calibrated`; an error when given but not
    /// needed) and the validation text.
    fn load(job: &PruneJob, dir: &Path, calibrated: bool) -> Result<Self> {
        let tok_path = job.inputs.tokenizer.clone().or_else(|| tokenizer_path(dir));
        let tok_path = tok_path.ok_or_else(|| PruneError::Input(format!("{}: no tokenizer.json in the model directory; give the tokenizer", dir.display())))?;
        let tok = Tokenizer::from_file(&tok_path).map_err(|e| PruneError::Input(format!("{}: {e}", tok_path.display())))?;
        if stlm_model::load_config(dir)?.bytes.is_some() {
            return Err(PruneError::Input(format!("{}: a byte-pooled model; pruning takes token models", dir.display())));
        }
        let model = load_model(dir, job.device, stlm_core::DType::Float32)?;
        let calib = match (&job.inputs.calibration.calib, calibrated) {
            (Some(_), true) => job.inputs.calibration.batches(&model, &tok)?,
            (Some(path), false) => return Err(PruneError::Input(format!("{}: magnitude scoring needs no calibration; drop it", path.display()))),
            (None, _) => Vec::new(),
        };
        let val = job.inputs.val.as_deref().map(|p| HeldOutText::load(p, &model, &tok, job.inputs.val_len)).transpose()?;
        Ok(Loaded { model, calib, val })
    }

    fn val_perplexity(&self, model: &DecoderModel, progress: bool) -> Result<Option<Perplexity>> {
        Ok(self.val.as_ref().map(|v| v.perplexity(model, progress)).transpose()?)
    }
}

