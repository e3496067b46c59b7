//! `stlm distill`: a student trained against a teacher with the stlm-train loop (checkpoints,
//! resume, metrics, progress), and `stlm distill cache`: the teacher's top-k distributions over a
//! corpus, stored so that many students train without running the teacher.

use crate::common::{print_json, DeviceArgs};
use crate::train::{ctrl_c, print_samples};
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;
use stlm_distill::run::{CacheOptions, DistillOptions};
use stlm_model::AnyModel;
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
    #[command(flatten)]
    options: Option<DistillOptions>,
    /// Run directory.
    #[arg(long, required = true)]
    out: Option<PathBuf>,
    /// Continue the run in --out from its newest usable checkpoint (same options).
    #[arg(long)]
    resume: bool,
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
    #[command(flatten)]
    options: CacheOptions,
    /// Cache directory.
    #[arg(long)]
    out: PathBuf,
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
    let Some(options) = a.options else { bail!("give --student (a run config or model directory) and --teacher or --cache") };
    let progress = std::io::stderr().is_terminal();
    let (group, device) = crate::dist::join(&a.dist, device)?;
    let run = stlm_distill::run::prepare(&options, &out, a.resume, device, progress, group.as_deref())?;
    let control = RunControl { progress: progress && !a.json, stop: ctrl_c()?, group, ..Default::default() };
    let report = run.train(&control, a.resume)?;
    let Some(model_dir) = report.finish(&out, control.is_leader(), || run.save_student())? else {
        return Ok(()); // rank 0 writes the student and prints
    };
    if a.json {
        return print_json(&run.summary(&options, &report, &model_dir));
    }
    let seed = run.train.seed;
    let student = AnyModel::Tokens(Box::new(run.distiller.student));
    print_samples(&student, &Tokenizer::from_file(&out.join("tokenizer.json"))?, a.samples, seed)
}

fn cache(a: CacheArgs) -> Result<()> {
    let device = stlm_core::parse_device(&a.device.device)?;
    let dtype = stlm_core::DType::parse(&a.device.dtype)?.for_device(device)?;
    let options = a.options;
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
