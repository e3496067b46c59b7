//! `stlm bench generate | train | moe | attention`: the measurements of stlm-bench, each against a
//! reference timed in the same process, printed as a line or one JSON object.

use crate::common::{print_json, DeviceArgs};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use stlm_attention::{AttentionKind, KindSettings, ATTENTION_KINDS};
use stlm_bench::attention::{bench_attention, AttentionSpec};
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
        /// Attention kind, by its config name: dense, sliding-window, fixed-sparse, strided-sparse,
        /// ssmax, temperature, power, linformer or doge-dma.
        #[arg(long)]
        kind: String,
        /// Sequence length.
        #[arg(long, default_value_t = 1024)]
        seq: i64,
        /// Local window (sliding-window), keep_window_size (doge-dma).
        #[arg(long, default_value_t = 256)]
        window: i64,
        /// Global tokens (sliding-window).
        #[arg(long, default_value_t = 0)]
        global_tokens: i64,
        /// Block length l (fixed-sparse), the stride (strided-sparse).
        #[arg(long, default_value_t = 128)]
        block: i64,
        /// Summary positions c at the end of each block (fixed-sparse).
        #[arg(long, default_value_t = 8)]
        summary: i64,
        /// Exponent (power).
        #[arg(long, default_value_t = 2.0)]
        p: f64,
        /// Projected length k (linformer, headwise sharing; compared with bidirectional SDPA).
        #[arg(long, default_value_t = 256)]
        linformer_k: i64,
        /// Batch size.
        #[arg(long, default_value_t = 1)]
        batch: i64,
        /// Query heads (keys and values have as many).
        #[arg(long, default_value_t = 4)]
        heads: i64,
        /// Head dimension.
        #[arg(long, default_value_t = 64)]
        head_dim: i64,
        /// Timed runs of each; the fastest is reported.
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Time the attention kernels alone (the kind's and dense SDPA, on the same random
        /// queries, keys and values), without the projections both layers share.
        #[arg(long)]
        kernel: bool,
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
    /// Router: top-k, switch, aux-free, or cdmoe (Doge's cross-domain MoE: a shared MLP of width
    /// --expert-width plus --experts single-neuron experts, --top-k per token; compared with the
    /// shared MLP alone).
    #[arg(long, default_value = "top-k")]
    pub router: String,
    /// Experts.
    #[arg(long, default_value_t = 8)]
    pub experts: i64,
    /// Experts per token (top-k, aux-free).
    #[arg(long, default_value_t = 2)]
    pub top_k: i64,
    /// Model width.
    #[arg(long, default_value_t = 256)]
    pub hidden: i64,
    /// Width of one expert.
    #[arg(long, default_value_t = 344)]
    pub expert_width: i64,
    /// Tokens per call (batch · sequence).
    #[arg(long, default_value_t = 4096)]
    pub tokens: i64,
    /// Timed runs of each; the fastest is reported.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// One product pair per expert instead of the grouped products (to compare the two).
    #[arg(long)]
    pub per_expert: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
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
            let spec = MoeSpec {
                router: a.router.clone(),
                experts: a.experts,
                top_k: a.top_k,
                hidden: a.hidden,
                expert_width: a.expert_width,
                tokens: a.tokens,
                repeats: a.repeats,
                per_expert: a.per_expert,
            };
            let r = bench_moe(&spec).context("--router/--experts/--top-k/--hidden/--expert-width/--tokens/--repeats")?;
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
        BenchJob::Attention { kind, seq, window, global_tokens, block, summary, p, linformer_k, batch, heads, head_dim, repeats, kernel, json, device } => {
            if window < 1 || global_tokens < 0 {
                bail!("--window must be at least 1 and --global-tokens at least 0");
            }
            if block < 1 || !(1..=block).contains(&summary) {
                bail!("--block must be at least 1 and --summary between 1 and --block (got {block} and {summary})");
            }
            let settings = KindSettings { window, global_tokens, block, summary, p, k: linformer_k };
            let Some(attention) = AttentionKind::from_settings(&kind, &settings) else {
                bail!("--kind {kind}: unknown attention (known: {})", ATTENTION_KINDS.join(", "));
            };
            let spec = AttentionSpec { kind: attention, seq, batch, heads, head_dim, repeats, kernel, device: stlm_core::parse_device(&device)? };
            let r = bench_attention(&spec).with_context(|| format!("--kind {kind}"))?;
            if json {
                return print_json(&r);
            }
            let (what, ms, dense_ms) = (r.what, r.ms, r.dense_ms);
            println!("{kind} {what}: {ms:.2} ms forward+backward; dense-attention {what} {dense_ms:.2} ms ({:.2}x), seq {seq}", r.speedup);
        }
    }
    Ok(())
}
