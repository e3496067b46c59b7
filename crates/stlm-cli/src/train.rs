//! `stlm train`: config + data (files, or the built-in stories) -> tokenizer, cached token shards,
//! a training run with checkpoints, a model directory, and a few samples. The run is assembled
//! by stlm-train's `run::prepare`; this file parses the flags and prints.

use crate::common::DeviceArgs;
use crate::dist::DistArgs;
use anyhow::{bail, Result};
use clap::Args;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use stlm_model::AnyModel;
use stlm_tokenizers::Tokenizer;
use stlm_train::run::{prepare, RunConfig, RunInputs};
use stlm_train::trainer::RunControl;

#[derive(Args)]
pub struct TrainArgs {
    /// TOML config with [model], [train] and [data] tables (see configs/ and docs/stlm-train.md).
    #[arg(long)]
    config: PathBuf,
    /// Training text: .txt (documents split at blank lines or <|endoftext|>), .jsonl or .parquet;
    /// repeatable. Without it, the built-in story corpus.
    #[arg(long = "data")]
    data: Vec<PathBuf>,
    /// Run directory (default: runs/<config name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Length of the run in steps (overrides [train] max_steps; keep it when resuming).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Continue the run in --out from its newest usable checkpoint.
    #[arg(long)]
    resume: bool,
    /// Stop after this many seconds of training (checkpoint and model directory written, as at
    /// the last step): runs compared at the same wall-clock budget. Pair it with a schedule that
    /// does not depend on the run's length (`schedule = { kind = "constant" }`).
    #[arg(long)]
    time_limit: Option<f64>,
    /// Override one config field, `TABLE.FIELD=VALUE` with VALUE in TOML syntax (strings may go
    /// unquoted), e.g. `--set train.batch_size=16`; repeatable. The run directory's config.toml
    /// records the result.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Start from this model directory instead of a random initialisation: its config replaces
    /// the [model] table, its tokenizer.json is the run's, and when it holds `pruning.json` (a
    /// `stlm prune` output) its pruned weights stay zero. Pass it again with --resume.
    #[arg(long, value_name = "DIR")]
    init: Option<PathBuf>,
    /// Stories to sample from the trained model at the end.
    #[arg(long, default_value_t = 3)]
    samples: usize,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    dist: DistArgs,
}

pub fn train(a: TrainArgs) -> Result<()> {
    if let (Some(n), false) = (a.dist.nproc, std::env::var_os("RANK").is_some()) {
        return crate::dist::spawn_local(n);
    }
    stlm_core::memory::keep_freed_memory();
    let mut run = RunConfig::load(&a.config, &a.set)?;
    if let Some(steps) = a.max_steps {
        run.set_max_steps(steps)?;
    }
    let stem = a.config.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
    let out = a.out.clone().unwrap_or_else(|| Path::new("runs").join(stem));
    let device = stlm_core::parse_device(&a.device.device)?;
    if a.device.dtype != "float32" {
        bail!("--dtype {}: training runs in float32 for now", a.device.dtype);
    }
    if let Some(limit) = a.time_limit.filter(|l| !(*l > 0.0 && l.is_finite())) {
        bail!("--time-limit {limit}: must be a positive number of seconds");
    }
    let (group, device) = crate::dist::join(&a.dist, device)?;
    let progress = std::io::stderr().is_terminal();
    let control = RunControl { progress, stop: ctrl_c()?, time_limit: a.time_limit, group, ..Default::default() };
    let leader = control.is_leader();
    let inputs = RunInputs { data: a.data.clone(), out, resume: a.resume, init: a.init.clone(), device, control };
    let prepared = prepare(run, inputs)?;
    let report = prepared.train(a.resume)?;
    if report.finish(&prepared.out, leader, || prepared.save_model())?.is_none() {
        return Ok(()); // rank 0 writes the model directory and prints the samples
    }
    print_samples(&prepared.model, &prepared.tokenizer, a.samples, prepared.config.train.seed)
}

/// The flag a Ctrl-C sets (see [`stlm_train::trainer::stop_on_ctrl_c`]).
pub(crate) fn ctrl_c() -> Result<Arc<AtomicBool>> {
    Ok(stlm_train::trainer::stop_on_ctrl_c()?)
}

/// Prints `count` texts sampled from the model (see [`stlm_model::samples::sample_texts`]).
pub(crate) fn print_samples(model: &AnyModel, tok: &Tokenizer, count: usize, seed: u64) -> Result<()> {
    for (i, text) in stlm_model::samples::sample_texts(model, tok, count, seed)?.iter().enumerate() {
        println!("--- sample {}\n{text}", i + 1);
    }
    Ok(())
}
