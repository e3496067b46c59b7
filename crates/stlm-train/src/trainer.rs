//! The training loop: gradient accumulation, clipping, AdamW, the schedule, validation,
//! metrics.jsonl, a progress bar, periodic checkpoints and exact resume. Batches come from a
//! [`BatchSource`] as [`Batch`]es; the model answers each with a [`stlm_model::StepOutput`].

use crate::checkpoint::{self, TrainerState};
use crate::config::TrainConfig;
pub use crate::metrics::{MoeLog, PositionLog, StepLog};
use crate::metrics::{Metrics, StepValues};
use crate::optim::AdamW;
use crate::{Result, TrainError};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use stlm_core::CoreError;
use stlm_dist::{ProcessGroup, ReduceOp};
use stlm_model::{Batch, LanguageModel, Mode};
use tch::{Kind, Tensor};

/// Batches as a pure function of the step: a resumed run draws exactly the batches of an
/// uninterrupted one.
pub trait BatchSource {
    /// Micro-batch `micro` of step `step`: inputs and targets `[batch, seq]` (int64) and any
    /// extras the objective reads.
    fn train_batch(&self, step: u64, micro: u64) -> Result<Batch>;
    /// Validation batch `index`, the same every time it is asked for.
    fn val_batch(&self, index: u64) -> Result<Batch>;
    /// Bytes of text that `targets` stand for (for bits per byte), when the source knows.
    fn target_bytes(&self, _targets: &Tensor) -> Option<f64> {
        None
    }
}

/// What a run is told besides its `[train]` table.
#[derive(Debug, Clone, Default)]
pub struct RunControl {
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Set from elsewhere (a Ctrl-C handler, a time limit) to stop after the current step with a
    /// checkpoint.
    pub stop: Arc<AtomicBool>,
    /// Parameters whose zero entries stay zero (a pruned model's weights, see `AdamW::keep_zeros`).
    pub keep_zeros: Vec<String>,
    /// Stop (with a checkpoint) after the step during which this many seconds of training
    /// passed: runs compared at the same wall-clock budget.
    pub time_limit: Option<f64>,
    /// The data-parallel group this process trains in (`None`: alone). Every rank's batch
    /// source must give its own slice of the global batch.
    pub group: Option<Arc<ProcessGroup>>,
}

impl RunControl {
    /// This process's rank and the world size ((0, 1) when alone).
    pub fn rank_world(&self) -> (usize, usize) {
        self.group.as_ref().map_or((0, 1), |g| (g.rank(), g.world_size()))
    }

    /// Whether this process writes the run's files (rank 0, or alone).
    pub fn is_leader(&self) -> bool {
        self.rank_world().0 == 0
    }
}

/// How a call to [`train`] ended.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// The log lines of this process.
    pub logs: Vec<StepLog>,
    /// Steps completed (the run's total, resumed steps included).
    pub step: u64,
    /// False when `stop` or the time limit ended the run early (a checkpoint of `step` was written).
    pub completed: bool,
    /// True when the time limit ended the run.
    pub timed_out: bool,
}

impl TrainReport {
    /// The end of a run writing to `out`, the same for every job that trains: a run stopped before
    /// its last step (not by the time limit) is an error naming the checkpoint to resume from;
    /// otherwise the leader reports the last step, `save` writes the model directory, and its
    /// path is returned (`None` on the other ranks of a data-parallel run, which write nothing).
    pub fn finish<E: From<TrainError>>(&self, out: &Path, leader: bool, save: impl FnOnce() -> std::result::Result<PathBuf, E>) -> std::result::Result<Option<PathBuf>, E> {
        if !(self.completed || self.timed_out) {
            return Err(TrainError::Stopped { step: self.step, dir: out.to_path_buf() }.into());
        }
        if !leader {
            return Ok(None);
        }
        if self.timed_out {
            eprintln!("time limit reached after step {}", self.step);
        }
        if let Some(last) = self.logs.last() {
            let val = last.val_loss.map(|v| format!(", validation loss {v:.4}")).unwrap_or_default();
            eprintln!("step {}: loss {:.4}{val}", last.step, last.loss);
        }
        let dir = save()?;
        eprintln!("saved {}", dir.display());
        Ok(Some(dir))
    }
}

/// What one optimizer step reports.
#[derive(Debug)]
pub struct StepSummary {
    /// Mean training loss over the step's micro-batches (nats per token).
    pub loss: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Input tokens processed (by every rank).
    pub tokens: u64,
    /// Model FLOPs of the step, when the model counts them.
    pub flops: Option<f64>,
    /// MoE layers' stats of the last micro-batch (device tensors; empty without MoE).
    pub moe: Vec<(usize, stlm_moe::MoeStats)>,
}

/// The flag a Ctrl-C sets (first press: the run finishes its step and writes a checkpoint;
/// second: the process exits with 130 at once), installed once per process so that several runs
/// (a prune schedule's fine-tuning stages) share it. Pass it as [`RunControl::stop`].
pub fn stop_on_ctrl_c() -> Result<Arc<AtomicBool>> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    if let Some(flag) = FLAG.get() {
        return Ok(Arc::clone(flag));
    }
    let flag = Arc::new(AtomicBool::new(false));
    let stop = Arc::clone(&flag);
    ctrlc::set_handler(move || {
        if stop.swap(true, std::sync::atomic::Ordering::SeqCst) {
            eprintln!("\nsecond Ctrl-C: stopping now, without a checkpoint of this step");
            std::process::exit(130);
        }
        eprintln!("\nCtrl-C: finishing this step and writing a checkpoint (press again to quit at once)");
    })
    .map_err(|e| TrainError::Config(format!("cannot install the Ctrl-C handler: {e}")))?;
    Ok(Arc::clone(FLAG.get_or_init(|| flag)))
}

/// One optimizer step at `step` with learning rate `lr`: `grad_accum` micro-batches forward and
/// backward, clipping to `grad_clip` (0: off), the NaN/Inf check, AdamW, and cleared gradients.
/// A non-finite loss is an error and leaves the parameters untouched. In a `group`, gradients,
/// the loss and the statistics of buffer updates are averaged (summed) over ranks first, so every
/// rank takes the same step.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    model: &dyn LanguageModel,
    opt: &mut AdamW,
    data: &dyn BatchSource,
    step: u64,
    lr: f64,
    grad_accum: u64,
    grad_clip: f64,
    group: Option<&ProcessGroup>,
) -> Result<StepSummary> {
    let mut step_loss = Tensor::zeros([], (Kind::Float, model.device()));
    let mut tokens = 0;
    let mut flops = Some(0.0);
    let mut stats = stlm_model::StepStats::default();
    for micro in 0..grad_accum {
        let batch = data.train_batch(step, micro)?;
        tokens += batch.inputs.numel() as u64;
        let per_token = model.flops_per_token(batch.inputs.size().last().copied().unwrap_or(0));
        flops = flops.zip(per_token).map(|(f, p)| f + p * batch.inputs.numel() as f64);
        let out = model.step(&batch, Mode::Train)?;
        let loss = out.loss / grad_accum as f64;
        // The aux terms (MoE balancing, the model's extra terms) join the gradient; the logged
        // loss stays the model's own.
        let aux = out.aux_losses.into_iter().map(|(_, t)| t).reduce(|a, b| a + b);
        match aux {
            Some(aux) => (&loss + aux / grad_accum as f64).backward(),
            None => loss.backward(),
        }
        step_loss += loss.detach();
        stats = out.stats; // the last micro-batch's stats are logged and applied
    }
    if let Some(g) = group {
        average_gradients(g, opt)?;
        g.all_reduce(&step_loss, ReduceOp::Sum)?;
        step_loss /= g.world_size() as f64;
        for update in &stats.updates {
            g.all_reduce(&update.stat, ReduceOp::Sum)?;
        }
        tokens *= g.world_size() as u64;
        flops = flops.map(|f| f * g.world_size() as f64);
    }
    let grad_norm = opt.clip_grad_norm(grad_clip);
    // One host sync a step: the NaN/Inf check must see every step's loss.
    let loss = step_loss.double_value(&[]);
    if !loss.is_finite() {
        opt.zero_grad();
        return Err(TrainError::NonFinite { step: step + 1, loss });
    }
    opt.step(lr);
    opt.zero_grad();
    for update in &stats.updates {
        update.apply();
    }
    Ok(StepSummary { loss, grad_norm, tokens, flops, moe: stats.moe })
}

/// Replaces every gradient by its mean over the group's ranks (in buckets). Ranks must have
/// gradients for the same parameters; they are checked to, so a mismatch is an error, not a hang.
fn average_gradients(group: &ProcessGroup, opt: &AdamW) -> Result<()> {
    let grads = opt.grads();
    let defined: Vec<u8> = grads.iter().map(|(_, g)| g.defined() as u8).collect();
    group.check_same("which parameters received gradients", &defined)?;
    let grads: Vec<Tensor> = grads.into_iter().map(|(_, g)| g).filter(Tensor::defined).collect();
    Ok(group.average(&grads)?)
}

/// Mean validation loss over `batches` batches, and bits per byte when `data` knows the bytes
/// of the targets (each batch's mean loss is per target id).
pub fn validation_loss(model: &dyn LanguageModel, data: &dyn BatchSource, batches: u64) -> Result<(f64, Option<f64>)> {
    validation_loss_in(model, data, batches, None)
}

/// [`validation_loss`] of a data-parallel run: each rank scores its slice of every validation
/// batch and the sums are reduced over the group.
pub fn validation_loss_in(
    model: &dyn LanguageModel,
    data: &dyn BatchSource,
    batches: u64,
    group: Option<&ProcessGroup>,
) -> Result<(f64, Option<f64>)> {
    let _guard = tch::no_grad_guard();
    let (mut total, mut nats) = (0.0, 0.0);
    let mut bytes = Some(0.0);
    for i in 0..batches.max(1) {
        let batch = data.val_batch(i)?;
        let loss = model.step(&batch, Mode::Eval)?.loss.double_value(&[]);
        total += loss;
        nats += loss * batch.targets.numel() as f64;
        bytes = bytes.zip(data.target_bytes(&batch.targets)).map(|(a, b)| a + b);
    }
    if let Some(g) = group {
        let known = bytes.is_some() as u8 as f64;
        let sums = g.sum_f64(&[total, nats, bytes.unwrap_or(0.0), known])?;
        let world = g.world_size() as f64;
        total = sums[0] / world;
        nats = sums[1];
        bytes = (sums[3] == world).then_some(sums[2]);
    }
    let bpb = bytes.filter(|&b| b > 0.0).map(|b| nats / std::f64::consts::LN_2 / b);
    Ok((total / batches.max(1) as f64, bpb))
}

/// Per-position validation loss over `batches` validation batches.
pub fn validation_position_loss(model: &dyn LanguageModel, data: &dyn BatchSource, batches: u64, step: u64) -> Result<PositionLog> {
    let _guard = tch::no_grad_guard();
    let mut rows = Vec::new();
    for i in 0..batches.max(1) {
        let batch = data.val_batch(i)?;
        rows.push(model.position_nats(&batch.inputs, &batch.targets)?.to_kind(tch::Kind::Double).to_device(tch::Device::Cpu));
    }
    let all = Tensor::cat(&rows, 0); // [windows, seq]
    let n = all.size()[0];
    let mean = all.mean_dim(0, false, tch::Kind::Double);
    let stderr = if n > 1 { all.std_dim(0, true, false) / (n as f64).sqrt() } else { mean.full_like(f64::NAN) };
    let to_vec = |t: Tensor| Vec::<f64>::try_from(t).expect("float64 vector");
    Ok(PositionLog { step, windows: n, loss: to_vec(mean), stderr: to_vec(stderr) })
}

/// Trains `model` in `run_dir` (metrics.jsonl, checkpoints/) until `cfg.max_steps`. With
/// `resume`, continues from the newest usable checkpoint and drops metrics lines written after
/// it. When `control.stop` is set, finishes the current step, writes a checkpoint and returns.
pub fn train(
    model: &dyn LanguageModel,
    data: &dyn BatchSource,
    cfg: &TrainConfig,
    control: &RunControl,
    run_dir: &Path,
    resume: bool,
) -> Result<TrainReport> {
    cfg.validate().map_err(TrainError::Config)?;
    std::fs::create_dir_all(run_dir).map_err(|e| CoreError::io(run_dir, e))?;
    let group = control.group.as_deref();
    let leader = control.is_leader();
    let params = model.parameters();
    if let Some(p) = params.iter().find(|p| matches!(p.role, stlm_core::Role::QuantizedMatrix | stlm_core::Role::QuantizedEmbedding)) {
        return Err(TrainError::Config(format!(
            "`{}` is quantized: training needs float weights (start from the quantized model with `--init`, which dequantizes it)",
            p.name
        )));
    }
    let mut opt = AdamW::new(params, cfg.adamw());
    let mut state = TrainerState { step: 0, seed: cfg.seed, tokens_seen: 0 };
    if resume {
        let (ckpt, restored) = checkpoint::restore_latest(run_dir, model, &mut opt)?;
        if leader {
            eprintln!("resuming from {} (step {})", ckpt.display(), restored.step);
        }
        state = restored;
    }
    if let Some(g) = group {
        // Every rank restored the same checkpoint (or none); then they start from rank 0's weights.
        g.check_same("the step the run resumes from", &state.step.to_le_bytes())?;
        g.broadcast_all(&opt.params())?;
    }
    let mut metrics = Metrics::open(run_dir, resume.then_some(state.step), leader)?;
    // After a restore, so that the masks are those of the checkpoint's (masked) weights.
    opt.keep_zeros(&control.keep_zeros)?;
    let (schedule, max_steps) = (cfg.schedule(), cfg.max_steps);
    let bar = if control.progress && leader { ProgressBar::new(max_steps) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}]")
            .expect("valid template"),
    );
    bar.set_position(state.step);
    let started = Instant::now();
    // A limit too large for a deadline (or not a number) is no limit.
    let deadline = control
        .time_limit
        .and_then(|secs| std::time::Duration::try_from_secs_f64(secs.max(0.0)).ok())
        .and_then(|limit| started.checked_add(limit));
    let mut logs = Vec::new();
    while state.step < max_steps {
        let step = state.step;
        let lr = schedule.at(step);
        let out = match train_step(model, &mut opt, data, step, lr, cfg.grad_accum, cfg.grad_clip, group) {
            Ok(out) => out,
            Err(e) => {
                bar.abandon();
                return Err(e);
            }
        };
        metrics.count(out.tokens, out.flops);
        state.tokens_seen += out.tokens;
        state.step += 1;
        bar.inc(1);

        let last = state.step == max_steps;
        let mut timed_out = deadline.is_some_and(|d| Instant::now() >= d);
        let mut stop = control.stop.load(Ordering::SeqCst) || timed_out;
        if let Some(g) = group {
            // A stop on any rank (Ctrl-C, its time limit) stops every rank after the same step.
            stop = g.any(stop)?;
            timed_out = stop && g.any(timed_out)?;
        }
        // A run stopped by its time limit ends with a validation loss (runs compared at a budget).
        let evaluate = last || timed_out || (cfg.eval_every > 0 && state.step.is_multiple_of(cfg.eval_every));
        if last || state.step.is_multiple_of(cfg.log_every) || evaluate {
            let val = match evaluate {
                true => validation_loss_in(model, data, cfg.eval_batches, group).map(|(l, b)| (Some(l), b))?,
                false => (None, None),
            };
            let moe = out.moe.iter().map(|(i, s)| MoeLog::from_stats(*i, s)).collect();
            let log = metrics.log(StepValues { step: state.step, loss: out.loss, val, lr, grad_norm: out.grad_norm, moe })?;
            if leader && bar.is_hidden() {
                // Not a terminal: plain lines instead of a live bar.
                eprintln!("step {}/{max_steps} {}", state.step, log.summary());
            } else if leader {
                bar.set_message(log.summary());
            }
            logs.push(log);
        }
        if leader && cfg.position_loss_every > 0 && (last || state.step.is_multiple_of(cfg.position_loss_every)) {
            let log = validation_position_loss(model, data, cfg.eval_batches, state.step)?;
            metrics.log_positions(&log)?;
        }
        if leader && (last || stop || (cfg.save_every > 0 && state.step.is_multiple_of(cfg.save_every))) {
            checkpoint::save(run_dir, model, &opt, &state, cfg.keep_last)?;
        }
        if stop && !last {
            bar.abandon();
            return Ok(TrainReport { logs, step: state.step, completed: false, timed_out });
        }
    }
    bar.finish_and_clear();
    Ok(TrainReport { logs, step: state.step, completed: true, timed_out: false })
}
