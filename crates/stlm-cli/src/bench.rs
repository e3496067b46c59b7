//! `stlm bench generate | train | moe | attention`: the measurements of stlm-bench, each against a
//! reference timed in the same process, printed as a line or one JSON object.

use crate::common::{print_json, DeviceArgs};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use stlm_bench::attention::{bench_attention, AttentionOptions};
use stlm_bench::moe::{bench_moe, MoeSpec};
use stlm_bench::speed::{bench_generate, bench_train};
use stlm_train::run::RunConfig;

#[derive(Subcommand)]
pub enum BenchJob {
    /// Tokens per second of greedy generation at batch 1 (after a warm-up, prompt excluded).
    Generate {
        /// Model directory.
        #[arg(long)]
        model: PathBuf,
        /// New tokens per timed run.
        #[arg(long, default_value_t = 128)]
        new_tokens: i64,
        /// Prompt length in tokens (ids 1..=n, wrapped to the vocabulary).
        #[arg(long, default_value_t = 16)]
        prompt_tokens: i64,
        /// Timed runs; the fastest is reported.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Training speed of a config: tokens/s, step time and model FLOPs utilisation (random tokens;
    /// the [model] and [train] tables of the config, no data or checkpoints).
    Train {
        /// TOML run config (see configs/).
        #[arg(long)]
        config: PathBuf,
        /// Timed optimizer steps.
        #[arg(long, default_value_t = 20)]
        steps: u64,
        /// Untimed steps first.
        #[arg(long, default_value_t = 3)]
        warmup: u64,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Forward+backward time of an MoE layer and of a dense MLP with the same active parameters.
    Moe(MoeBenchArgs),
    /// Forward+backward time of an attention layer of a kind (projections, its learned tensors,
    /// its kernel) and of a dense-attention layer of the same shape, on the same inputs.
    Attention {
        #[command(flatten)]
        options: AttentionOptions,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
    },
}

/// Options of `stlm bench moe`.
#[derive(Args, Debug)]
pub struct MoeBenchArgs {
    #[command(flatten)]
    spec: MoeSpec,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(job: BenchJob) -> Result<()> {
    match job {
        BenchJob::Generate { model, new_tokens, prompt_tokens, repeats, json, device } => {
            let mut lm = device.load(&model)?;
            let r = bench_generate(&mut lm, new_tokens, prompt_tokens, repeats).context("--new-tokens/--prompt-tokens/--repeats")?;
            if json {
                return print_json(&r);
            }
            println!("{:.1} tokens/s ({new_tokens} new tokens after a {prompt_tokens}-token prompt, {}, {} threads)", r.tokens_per_s, r.device, r.threads);
        }
        BenchJob::Train { config, steps, warmup, json, device } => {
            let run = RunConfig::load(&config, &[])?;
            let r = bench_train(&run, steps, warmup, stlm_core::parse_device(&device.device)?).context("--steps")?;
            if json {
                return print_json(&r);
            }
            println!(
                "{:.0} tokens/s, {:.1} ms/step, MFU {:.1}% of a {:.1} GFLOP/s float32 matmul ({} parameters, {}, {} threads)",
                r.tokens_per_s,
                r.step_ms,
                r.mfu * 100.0,
                r.matmul_gflops,
                r.params,
                r.device,
                r.threads
            );
        }
        BenchJob::Moe(a) => {
            let r = bench_moe(&a.spec).context("--router/--experts/--top-k/--hidden/--expert-width/--tokens/--repeats")?;
            if a.json {
                return print_json(&r);
            }
            match r.dispatch {
                "retrieval" => println!("cdmoe ({} experts, {} per token): {:.2} ms; its shared MLP alone {:.2} ms ({:.2}x)", r.experts, r.top_k, r.ms, r.dense_ms, r.ratio),
                d => println!(
                    "{} MoE ({} experts, {} per token, {d} products): {:.2} ms forward+backward; dense SwiGLU of width {}: {:.2} ms ({:.2}x)",
                    r.router, r.experts, r.top_k, r.ms, r.dense_width, r.dense_ms, r.ratio
                ),
            }
        }
        BenchJob::Attention { options: o, json, device } => {
            if o.block < 1 || !(1..=o.block).contains(&o.summary) {
                bail!("--block must be at least 1 and --summary between 1 and --block (got {} and {})", o.block, o.summary);
            }
            let spec = o.spec(stlm_core::parse_device(&device)?).with_context(|| format!("--kind {}", o.kind))?;
            let r = bench_attention(&spec).with_context(|| format!("--kind {}", o.kind))?;
            if json {
                return print_json(&r);
            }
            let (what, ms, dense_ms) = (r.what, r.ms, r.dense_ms);
            println!("{} {what}: {ms:.2} ms forward+backward; dense-attention {what} {dense_ms:.2} ms ({:.2}x), seq {}", o.kind, r.speedup, r.seq);
        }
    }
    Ok(())
}
