//! `stlm distill`: a student trained against a teacher with the stlm-train loop (checkpoints,
//! resume, metrics, progress), and `stlm distill cache`: the teacher's top-k distributions over a
//! corpus, stored so that many students train without running the teacher.

use crate::common::{print_json, DeviceArgs};
use crate::train::{ctrl_c, print_samples};
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;
use stlm_data::DataConfig;
use stlm_distill::run::{CacheOptions, DistillOptions};
use stlm_model::{AnyModel, LanguageModel};
use stlm_tokenizers::Tokenizer;
use stlm_train::trainer::RunControl;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct DistillArgs {
    #[command(subcommand)]
    job: Option<DistillJob>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum DistillJob {
    /// Store a teacher's top-k next-token distributions over a corpus (for `stlm distill --cache`).
    Cache(CacheArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Teacher model directory (token models). Optional with --cache.
    #[arg(long, required_unless_present = "cache")]
    teacher: Option<PathBuf>,
    /// The student: a run config (TOML with [model], [train], [data]) or a model directory to
    /// continue from (then [train]/[data] come from --config, or the defaults).
    #[arg(long, required = true)]
    student: Option<PathBuf>,
    /// Run config for [train] and [data] when --student is a model directory.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Training text (as `stlm train --data`); repeatable. Not with --cache (the cache's data is used).
    #[arg(long = "data", conflicts_with = "cache")]
    data: Vec<PathBuf>,
    /// A teacher cache (`stlm distill cache`): train on its windows with its stored targets.
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Logit divergence: fkl, rkl, js, tvd, sfkl or srkl.
    #[arg(long, default_value = "fkl")]
    loss: String,
    /// Temperature of both distributions (default 1; a cache's own with --cache).
    #[arg(long)]
    temperature: Option<f64>,
    /// Weight of the logit loss; the next-token cross-entropy gets 1 - alpha.
    #[arg(long, default_value_t = 0.5)]
    alpha: f64,
    /// Skew lambda of sfkl and srkl.
    #[arg(long, default_value_t = 0.1)]
    skew: f64,
    /// Compare only the teacher's top k tokens plus a rest bucket (default: the whole vocabulary;
    /// a cache's own k with --cache).
    #[arg(long)]
    top_k: Option<i64>,
    /// Weight of the hidden-state MSE (0: off); needs the live teacher.
    #[arg(long, default_value_t = 0.0)]
    hidden_weight: f64,
    /// Weight of the attention-map KL between the blocks producing the paired states (0: off);
    /// dense attention, teacher heads a multiple of the student's; needs the live teacher.
    #[arg(long, default_value_t = 0.0)]
    attention_weight: f64,
    /// Feature pairs STUDENT:TEACHER of residual-stream states (0 = embeddings, i = after block
    /// i), e.g. `1:2,2:4`; default: student state i against teacher state round(i Lt / Ls).
    #[arg(long)]
    layer_map: Option<String>,
    /// `bytes`: a teacher with another (byte-level BPE) tokenizer; logit losses compare next-byte
    /// distributions where both tokenizations end at the same byte. `none` (default): the
    /// tokenizers must share a vocabulary.
    #[arg(long, default_value = "none", value_parser = ["none", "bytes"])]
    align: String,
    /// Student initialisation from a config: random, every:K (teacher blocks 0, K, 2K, ...) or
    /// layers:0,2,4; tensors are cut to the student's leading dimensions when it is narrower.
    #[arg(long, default_value = "random")]
    init: String,
    /// Run directory.
    #[arg(long, required = true)]
    out: Option<PathBuf>,
    /// Length of the run in steps (overrides [train] max_steps).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Continue the run in --out from its newest usable checkpoint (same options).
    #[arg(long)]
    resume: bool,
    /// Override a field of the student's run config, `TABLE.FIELD=VALUE` (as `stlm train --set`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Samples printed from the student at the end (not with --json).
    #[arg(long, default_value_t = 0)]
    samples: usize,
    /// Print one JSON object with the result.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    dist: crate::dist::DistArgs,
}

#[derive(Args)]
struct CacheArgs {
    /// Teacher model directory.
    #[arg(long)]
    teacher: PathBuf,
    /// Text files (as `stlm train --data`); the windows cover their training split.
    #[arg(long = "data", required = true)]
    data: Vec<PathBuf>,
    /// Cache directory.
    #[arg(long)]
    out: PathBuf,
    /// Positions per window (students may train on shorter ones).
    #[arg(long, default_value_t = 256)]
    seq_len: i64,
    /// Tokens kept per position.
    #[arg(long, default_value_t = 64)]
    top_k: i64,
    /// Temperature of the stored distributions.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Windows per teacher forward.
    #[arg(long, default_value_t = 16)]
    batch_size: i64,
    /// Stop after this many windows.
    #[arg(long)]
    max_windows: Option<u64>,
    /// Fraction of each file held out for validation (as [data] val_fraction).
    #[arg(long, default_value_t = DataConfig::default().val_fraction)]
    val_fraction: f64,
    /// Seed of the split (as [train] seed).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object with the result.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(a: DistillArgs) -> Result<()> {
    match a.job {
        Some(DistillJob::Cache(c)) => cache(c),
        None => distill(a.run),
    }
}

fn distill(a: RunArgs) -> Result<()> {
    if let (Some(n), false) = (a.dist.nproc, std::env::var_os("RANK").is_some()) {
        return crate::dist::spawn_local(n);
    }
    stlm_core::memory::keep_freed_memory();
    let out = a.out.clone().expect("clap requires --out");
    let device = stlm_core::parse_device(&a.device.device)?;
    if a.device.dtype != "float32" {
        bail!("--dtype {}: training runs in float32 for now", a.device.dtype);
    }
    let options = DistillOptions {
        teacher: a.teacher,
        cache: a.cache,
        student: a.student.expect("clap requires --student"),
        config: a.config,
        overrides: a.set,
        max_steps: a.max_steps,
        data: a.data,
        loss: a.loss,
        temperature: a.temperature,
        alpha: a.alpha,
        skew: a.skew,
        top_k: a.top_k,
        hidden_weight: a.hidden_weight,
        attention_weight: a.attention_weight,
        layer_map: a.layer_map,
        align: a.align,
        init: a.init,
    };
    let progress = std::io::stderr().is_terminal();
    let (group, device) = crate::dist::join(&a.dist, device)?;
    let run = stlm_distill::run::prepare(&options, &out, a.resume, device, progress, group.as_deref())?;
    let control = RunControl { progress: progress && !a.json, stop: ctrl_c()?, group, ..Default::default() };
    let report = run.train(&control, a.resume)?;
    let Some(model_dir) = report.finish(&out, control.is_leader(), || run.save_student())? else {
        return Ok(()); // rank 0 writes the student and prints
    };
    let last = report.logs.last();
    let parameters = run.distiller.num_parameters();
    if a.json {
        return print_json(&serde_json::json!({
            "model": model_dir,
            "steps": report.step,
            "loss": run.divergence.name(),
            "temperature": run.temperature,
            "alpha": options.alpha,
            "top_k": run.top_k,
            "hidden_weight": options.hidden_weight,
            "attention_weight": options.attention_weight,
            "train_loss": last.map(|l| l.loss),
            "val_loss": last.and_then(|l| l.val_loss),
            "val_bpb": last.and_then(|l| l.val_bpb),
            "parameters": parameters,
        }));
    }
    let seed = run.train.seed;
    let student = AnyModel::Tokens(Box::new(run.distiller.student));
    print_samples(&student, &Tokenizer::from_file(&out.join("tokenizer.json"))?, a.samples, seed)
}

fn cache(a: CacheArgs) -> Result<()> {
    let device = stlm_core::parse_device(&a.device.device)?;
    let dtype = stlm_core::DType::parse(&a.device.dtype)?.for_device(device)?;
    let options = CacheOptions {
        teacher: a.teacher,
        data: a.data,
        seq_len: a.seq_len,
        top_k: a.top_k,
        temperature: a.temperature,
        batch_size: a.batch_size,
        max_windows: a.max_windows,
        val_fraction: a.val_fraction,
        seed: a.seed,
    };
    let started = std::time::Instant::now();
    let header = stlm_distill::run::write_cache(&options, &a.out, device, dtype, std::io::stderr().is_terminal() && !a.json)?;
    let secs = started.elapsed().as_secs_f64();
    let (k, tokens) = (header.top_k, header.windows * header.seq_len as u64);
    eprintln!("cached {} windows ({tokens} positions, top {k}) in {secs:.1} s into {}", header.windows, a.out.display());
    if a.json {
        print_json(&serde_json::json!({ "out": a.out, "windows": header.windows, "positions": tokens, "top_k": k, "temperature": header.temperature, "seconds": secs }))?;
    }
    Ok(())
}
