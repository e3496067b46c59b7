//! `stlm weightgen collect | train | sample | compare`: weight generation by diffusion (see
//! docs/stlm-weightgen.md), thin over stlm-weightgen.

use crate::common::{load_tokenizer, print_json, DeviceArgs};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use stlm_core::parse_device;
use stlm_eval::tasks::{load_docs, Task};
use stlm_train::trainer::RunControl;
use stlm_weightgen::compare::{Family, SelectBy};
use stlm_weightgen::experiment::{self, collect_job, compare_families, sample_job, CollectOptions, CompareOptions, SampleOptions};
use stlm_weightgen::{Collection, GenConfig};

#[derive(Subcommand)]
pub enum WeightgenJob {
    /// Collect the selected layers' weights of many checkpoints: p-diff's continued training of
    /// those layers (the rest frozen) from --model, and/or the checkpoints of other runs.
    Collect(Box<CollectArgs>),
    /// Train the VAE and the latent diffusion model on a collection (resumable).
    Train(Box<TrainGenArgs>),
    /// Sample new weights for the selected layers: complete model directories.
    Sample(SampleArgs),
    /// Score the original, the samples and the baselines: selection on validation, report on test.
    Compare(Box<CompareArgs>),
}

#[derive(Args)]
pub struct CollectArgs {
    #[command(flatten)]
    options: CollectOptions,
    /// Output folder (collection.json, weights.safetensors).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
pub struct TrainGenArgs {
    /// A collection folder (`stlm weightgen collect`).
    #[arg(long)]
    collection: PathBuf,
    /// The generator folder to write.
    #[arg(long)]
    out: PathBuf,
    /// Continue the generator in --out (same settings; step counts may grow).
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    config: GenConfig,
    /// Print one JSON object with the final losses.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
pub struct SampleArgs {
    /// A generator folder (`stlm weightgen train`).
    #[arg(long)]
    generator: PathBuf,
    #[command(flatten)]
    options: SampleOptions,
    /// Output folder: one model directory per sample (sample-000, ...).
    #[arg(long)]
    out: PathBuf,
    /// Print one JSON object (each sample's directory and distance to the training weights).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
pub struct CompareArgs {
    /// The collection the generator learned from (training checkpoints, soup, distances).
    #[arg(long)]
    collection: PathBuf,
    /// The sampled model directories (`stlm weightgen sample --out`).
    #[arg(long)]
    samples: PathBuf,
    /// Evaluation text: its first half of documents is the validation split, the rest the test split.
    #[arg(long)]
    data: PathBuf,
    /// A benchmark task (`stlm eval mc`'s names); its items alternate between validation and test.
    #[arg(long, requires = "task_data")]
    task: Option<String>,
    /// The benchmark's data file.
    #[arg(long)]
    task_data: Option<PathBuf>,
    /// Benchmark items at most (BLiMP: per paradigm).
    #[arg(long)]
    limit: Option<usize>,
    #[command(flatten)]
    options: CompareOptions,
    /// Write every row as CSV here too.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Print one JSON object (every row, each family's choice) instead of the table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(job: WeightgenJob) -> Result<()> {
    match job {
        WeightgenJob::Collect(a) => collect(*a),
        WeightgenJob::Train(a) => train(*a),
        WeightgenJob::Sample(a) => sample(a),
        WeightgenJob::Compare(a) => compare(*a),
    }
}

fn progress() -> bool {
    std::io::stderr().is_terminal()
}

fn collect(a: CollectArgs) -> Result<()> {
    let control = RunControl { progress: progress(), stop: crate::train::ctrl_c()?, ..Default::default() };
    let coll = collect_job(&a.options, &a.out, parse_device(&a.device.device)?, control).with_context(|| format!("--model {}", a.options.model.display()))?;
    eprintln!("wrote {} ({} checkpoints)", a.out.display(), coll.len());
    Ok(())
}

fn train(a: TrainGenArgs) -> Result<()> {
    let device = parse_device(&a.device.device)?;
    let collection =
        Collection::load(&a.collection).with_context(|| format!("--collection {}", a.collection.display()))?;
    let mut g = stlm_weightgen::gen::open_for_training(&a.out, &collection, &a.collection, a.config, a.resume, device)?;
    let l = g.layout();
    eprintln!(
        "{} checkpoints x {} chunks of {} values -> latents of {}",
        collection.len(),
        l.total(),
        l.chunk,
        g.file.config.latent
    );
    let stop = crate::train::ctrl_c()?;
    let finished = g.train(&collection, &a.out, progress(), &|| stop.load(Ordering::SeqCst))?;
    if !finished {
        bail!("stopped; {} holds the progress. Continue with the same command plus --resume", a.out.display());
    }
    let p = &g.file.progress;
    if a.json {
        return print_json(&serde_json::json!({
            "vae_steps": p.vae_step,
            "vae_reconstruction": p.vae_reconstruction,
            "diffusion_steps": p.diffusion_step,
            "diffusion_loss": p.diffusion_loss,
            "out": a.out,
        }));
    }
    eprintln!(
        "VAE reconstruction error {:.5} (normalised units), last denoiser loss {:.4}; wrote {}",
        p.vae_reconstruction.unwrap_or(f64::NAN),
        p.diffusion_loss.unwrap_or(f64::NAN),
        a.out.display()
    );
    Ok(())
}

fn sample(a: SampleArgs) -> Result<()> {
    let written = sample_job(&a.generator, &a.options, &a.out, parse_device(&a.device.device)?).with_context(|| format!("--generator {}", a.generator.display()))?;
    if a.json {
        return print_json(&serde_json::json!({ "samples": written }));
    }
    for s in &written {
        let d = s.nearest_checkpoint.zip(s.distance_to_nearest).map(|(k, d)| format!(", {d:.4} from training checkpoint {k}")).unwrap_or_default();
        eprintln!("wrote {}{d}", s.dir.display());
    }
    Ok(())
}

fn compare(a: CompareArgs) -> Result<()> {
    let collection = Collection::load(&a.collection).with_context(|| format!("--collection {}", a.collection.display()))?;
    let base_dir = collection.manifest.base_model.clone();
    let model = a.device.load_any(&base_dir).with_context(|| format!("the collection's base model {}", base_dir.display()))?;
    let tok = load_tokenizer(None, &base_dir)?;
    let text = std::fs::read_to_string(&a.data).with_context(|| format!("--data {}: cannot read as UTF-8 text", a.data.display()))?;
    let task = match (&a.task, &a.task_data) {
        (Some(name), Some(path)) => {
            let task = Task::parse(name)?;
            Some((task, load_docs(task, path, a.limit.unwrap_or(usize::MAX)).with_context(|| format!("--task-data {}", path.display()))?))
        }
        _ => None,
    };
    let task_name = task.as_ref().map(|t| t.0.name());
    if a.options.select_by == SelectBy::Benchmark && a.task.is_none() {
        bail!("--select-by benchmark needs --task and --task-data");
    }
    let opts = CompareOptions { progress: progress(), ..a.options };
    let c = compare_families(&model, &tok, &collection, &a.samples, &text, task, &opts)
        .with_context(|| format!("--samples {}, --data {}", a.samples.display(), a.data.display()))?;
    if let Some(path) = &a.csv {
        stlm_core::atomic_write_bytes(path, experiment::csv(&c.rows)?.as_bytes())?;
    }
    if a.json {
        return print_json(&c);
    }
    println!("{}", experiment::table(&c.chosen, task_name));
    eprintln!(
        "{} training checkpoints, mean spacing {:.4}; each family's best chosen on validation from {} candidates (diffusion: {}); noise scale per layer {:?}",
        c.checkpoints,
        c.checkpoint_spacing,
        c.budget,
        c.rows.iter().filter(|r| r.family == Family::Diffusion).count(),
        c.noise_scale.iter().map(|s| format!("{s:.2e}")).collect::<Vec<_>>()
    );
    Ok(())
}
