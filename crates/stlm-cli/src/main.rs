//! `stlm`: one subcommand per job, thin over the stlm crates. Errors print as one line on stderr
//! with a non-zero exit; `--json` jobs print exactly one JSON object on stdout.

mod bench;
mod common;
mod data;
mod dist;
mod distill;
mod eval;
mod interop;
mod model;
mod plot;
mod prune;
mod quantize;
mod sweep;
mod tokenizer;
mod train;
mod weightgen;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Build, train, compress and evaluate super tiny language models.
#[derive(Parser)]
#[command(name = "stlm", version, about)]
struct Cli {
    /// libtorch intra-op threads (default: libtorch's choice).
    #[arg(long, global = true)]
    threads: Option<i32>,
    #[command(subcommand)]
    job: Job,
}

#[derive(Subcommand)]
enum Job {
    /// Train a model from a TOML config on text files (or the built-in stories).
    Train(train::TrainArgs),
    /// Corpora: write the built-in stories.
    #[command(subcommand)]
    Data(data::DataJob),
    /// Convert another tool's model files into a model directory (llama2.c).
    #[command(subcommand)]
    Import(interop::ImportJob),
    /// Write a model directory in another tool's format (llama2.c).
    #[command(subcommand)]
    Export(interop::ExportJob),
    /// Create a randomly initialised model directory from a TOML config.
    Init(model::InitArgs),
    /// Parameter count and per-layer table of a model directory.
    Inspect(model::InspectArgs),
    /// Generate text from a prompt (streamed to stdout).
    Generate(model::GenerateArgs),
    /// Write the float32 logits [seq, vocab] of token ids to a safetensors file (key `logits`).
    Logits(model::LogitsArgs),
    /// Train, apply and invert tokenizers.
    #[command(subcommand)]
    Tokenizer(tokenizer::TokenizerJob),
    /// Evaluate a model.
    #[command(subcommand)]
    Eval(eval::EvalJob),
    /// Measure speed.
    #[command(subcommand)]
    Bench(bench::BenchJob),
    /// Prune a model: magnitude, Wanda or SparseGPT, unstructured or N:M; writes a pruned model directory.
    Prune(Box<prune::PruneArgs>),
    /// Quantize a model's linear layers to Q8_0 or Q4_0 blocks; writes a quantized model directory.
    Quantize(Box<quantize::QuantizeArgs>),
    /// Distil a teacher into a student (logit and hidden-state losses), or cache a teacher's targets.
    Distill(Box<distill::DistillArgs>),
    /// Draw lines from a CSV table, or a training run's curves, into an SVG or PNG plot.
    Plot(plot::PlotArgs),
    /// Train variants of a config (a grid of `--set` values and `--data` files) with the same
    /// time budget and compare them in a table and a plot.
    Sweep(Box<sweep::SweepArgs>),
    /// Weight generation by diffusion: collect training weights of chosen layers, train a VAE and
    /// a latent diffusion model on them, sample new models, and compare them with honest baselines.
    #[command(subcommand)]
    Weightgen(weightgen::WeightgenJob),
}

/// The error chain of `e` joined by ": ", an option error in its command-line form (the
/// flag, not the options field); an element printing just what its source prints is dropped.
fn error_line(e: &anyhow::Error) -> String {
    let parts: Vec<String> = e
        .chain()
        .map(|c| match c.downcast_ref::<stlm_core::OptionError>() {
            Some(o) => o.as_flag(),
            None => c.to_string(),
        })
        .collect();
    let displays: Vec<String> = e.chain().map(ToString::to_string).collect();
    let kept: Vec<&str> =
        (0..parts.len()).filter(|&i| displays.get(i + 1) != Some(&displays[i])).map(|i| parts[i].as_str()).collect();
    kept.join(": ")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        tch::set_num_threads(n);
    }
    let result = match cli.job {
        Job::Train(a) => train::train(a),
        Job::Data(j) => data::run(j),
        Job::Import(j) => interop::import(j),
        Job::Export(j) => interop::export(j),
        Job::Init(a) => model::init(a),
        Job::Inspect(a) => model::inspect(a),
        Job::Generate(a) => model::generate(a),
        Job::Logits(a) => model::logits(a),
        Job::Tokenizer(j) => tokenizer::run(j),
        Job::Eval(j) => eval::run(j),
        Job::Bench(j) => bench::run(j),
        Job::Plot(a) => plot::plot(a),
        Job::Prune(a) => prune::run(*a),
        Job::Quantize(a) => quantize::run(*a),
        Job::Distill(a) => distill::run(*a),
        Job::Sweep(a) => sweep::sweep(*a),
        Job::Weightgen(j) => weightgen::run(j),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A run stopped by Ctrl-C has its checkpoint: say how to continue, exit as SIGINT does.
        // A `--nproc` launcher exits as its failed rank did (which printed its own error).
        Err(e) if e.downcast_ref::<stlm_dist::WorkerExit>().is_some() => {
            let code = e.downcast_ref::<stlm_dist::WorkerExit>().map_or(1, |w| w.code);
            if code != 130 {
                eprintln!("error: {e}");
            }
            ExitCode::from(code.clamp(1, 255) as u8)
        }
        Err(e) if matches!(e.downcast_ref(), Some(stlm_train::TrainError::Stopped { .. })) => {
            eprintln!("{e}. Continue with the same command plus --resume.");
            ExitCode::from(130)
        }
        Err(e) => {
            let msg = error_line(&e).replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}
