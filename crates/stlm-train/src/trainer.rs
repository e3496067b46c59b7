//! The training loop: gradient accumulation, clipping, AdamW, the schedule, validation,
//! metrics.jsonl, a progress bar, periodic checkpoints and exact resume.

use crate::checkpoint::{self, TrainerState};
use crate::optim::{AdamW, AdamWConfig};
use crate::schedule::LrSchedule;
use crate::{Result, TrainError};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::io::Write;
use std::path::Path;
use std::time::Instant;
use stlm_core::CoreError;
use stlm_model::DecoderModel;
use tch::{Kind, Tensor};

/// Batches as a pure function of the step: a resumed run draws exactly the batches of an
/// uninterrupted one.
pub trait BatchSource {
    /// Inputs and targets `[batch, seq]` (int64) of micro-batch `micro` of step `step`.
    fn train_batch(&self, step: u64, micro: u64) -> Result<(Tensor, Tensor)>;
    /// Validation batch `index`, the same every time it is asked for.
    fn val_batch(&self, index: u64) -> Result<(Tensor, Tensor)>;
}

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct TrainSettings {
    /// Learning rate over the run (its `max_steps` is the length of the run).
    pub schedule: LrSchedule,
    /// Optimizer settings.
    pub adamw: AdamWConfig,
    /// Micro-batches per optimizer step.
    pub grad_accum: u64,
    /// Global gradient-norm bound (0: off).
    pub grad_clip: f64,
    /// Log (metrics.jsonl, progress) every this many steps.
    pub log_every: u64,
    /// Validation loss every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Validation batches per evaluation.
    pub eval_batches: u64,
    /// Checkpoint every this many steps (0: only at the end).
    pub save_every: u64,
    /// Checkpoints kept (0: all).
    pub keep_last: usize,
    /// Seed recorded in checkpoints.
    pub seed: u64,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

/// One metrics.jsonl line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepLog {
    /// Steps completed.
    pub step: u64,
    /// Mean training loss of the step (nats per token).
    pub loss: f64,
    /// Validation loss, on the steps where it was measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// Learning rate used by the step.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Training throughput since the previous log line.
    pub tokens_per_s: f64,
    /// Seconds since this process started training.
    pub elapsed: f64,
}

/// Mean next-token cross-entropy of a batch.
fn loss_of(model: &DecoderModel, inputs: &Tensor, targets: &Tensor) -> Tensor {
    let logits = model.forward(inputs); // [b, s, vocab]
    let vocab = logits.size()[2];
    logits.reshape([-1, vocab]).cross_entropy_for_logits(&targets.reshape([-1]))
}

/// Mean validation loss over `settings.eval_batches` batches.
pub fn validation_loss(model: &DecoderModel, data: &dyn BatchSource, batches: u64) -> Result<f64> {
    let _guard = tch::no_grad_guard();
    let mut total = 0.0;
    for i in 0..batches.max(1) {
        let (x, y) = data.val_batch(i)?;
        total += loss_of(model, &x, &y).double_value(&[]);
    }
    Ok(total / batches.max(1) as f64)
}

/// Trains `model` in `run_dir` (metrics.jsonl, checkpoints/) until `schedule.max_steps`. With
/// `resume`, continues from the newest usable checkpoint and drops metrics lines written after
/// it. Returns the log lines of this process.
pub fn train(
    model: &DecoderModel,
    data: &dyn BatchSource,
    settings: &TrainSettings,
    run_dir: &Path,
    resume: bool,
) -> Result<Vec<StepLog>> {
    if settings.grad_accum == 0 || settings.log_every == 0 {
        return Err(TrainError::Config("grad_accum and log_every must be at least 1".into()));
    }
    std::fs::create_dir_all(run_dir).map_err(|e| CoreError::io(run_dir, e))?;
    let params: Vec<(String, Tensor)> = model.var_store().variables().into_iter().collect();
    let mut opt = AdamW::new(params, settings.adamw);
    let metrics_path = run_dir.join("metrics.jsonl");
    let mut state = TrainerState { step: 0, seed: settings.seed, tokens_seen: 0 };
    if resume {
        let (ckpt, restored) = checkpoint::restore_latest(run_dir, model, &mut opt)?;
        eprintln!("resuming from {} (step {})", ckpt.display(), restored.step);
        state = restored;
        truncate_metrics(&metrics_path, state.step)?;
    } else if metrics_path.exists() {
        std::fs::remove_file(&metrics_path).map_err(|e| CoreError::io(&metrics_path, e))?;
    }
    let max_steps = settings.schedule.max_steps;
    let bar = if settings.progress { ProgressBar::new(max_steps) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}]")
            .expect("valid template"),
    );
    bar.set_position(state.step);
    let started = Instant::now();
    let (mut window_start, mut window_tokens) = (Instant::now(), 0u64);
    let mut logs = Vec::new();
    while state.step < max_steps {
        let step = state.step;
        let lr = settings.schedule.at(step);
        let mut step_loss = Tensor::zeros([], (Kind::Float, model.device()));
        for micro in 0..settings.grad_accum {
            let (x, y) = data.train_batch(step, micro)?;
            window_tokens += x.numel() as u64;
            state.tokens_seen += x.numel() as u64;
            let loss = loss_of(model, &x, &y) / settings.grad_accum as f64;
            loss.backward();
            step_loss += loss.detach();
        }
        let grad_norm = opt.clip_grad_norm(settings.grad_clip);
        // One host sync a step: the NaN/Inf check must see every step's loss.
        let loss_value = step_loss.double_value(&[]);
        if !loss_value.is_finite() {
            bar.abandon();
            return Err(TrainError::NonFinite { step: step + 1, loss: loss_value });
        }
        opt.step(lr);
        opt.zero_grad();
        state.step += 1;
        bar.inc(1);

        let last = state.step == max_steps;
        let evaluate = last || (settings.eval_every > 0 && state.step.is_multiple_of(settings.eval_every));
        if last || state.step.is_multiple_of(settings.log_every) || evaluate {
            let val_loss = if evaluate { Some(validation_loss(model, data, settings.eval_batches)?) } else { None };
            let secs = window_start.elapsed().as_secs_f64().max(1e-9);
            let log = StepLog {
                step: state.step,
                loss: loss_value,
                val_loss,
                lr,
                grad_norm,
                tokens_per_s: window_tokens as f64 / secs,
                elapsed: started.elapsed().as_secs_f64(),
            };
            append_metrics(&metrics_path, &log)?;
            bar.set_message(format!("loss {:.4} lr {:.2e} {:.0} tok/s", log.loss, lr, log.tokens_per_s));
            logs.push(log);
            (window_start, window_tokens) = (Instant::now(), 0);
        }
        if last || (settings.save_every > 0 && state.step.is_multiple_of(settings.save_every)) {
            checkpoint::save(run_dir, model, &opt, &state, settings.keep_last)?;
        }
    }
    bar.finish_and_clear();
    Ok(logs)
}

fn append_metrics(path: &Path, log: &StepLog) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| CoreError::io(path, e))?;
    let line = serde_json::to_string(log).expect("log serializes");
    writeln!(f, "{line}").map_err(|e| CoreError::io(path, e))?;
    Ok(())
}

/// Keeps the metrics lines of steps up to `step` (a resumed run rewrites the rest).
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    Ok(stlm_core::atomic_write_bytes(path, kept.as_bytes())?)
}
