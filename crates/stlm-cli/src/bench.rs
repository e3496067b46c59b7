//! `stlm bench generate`: decoding speed at batch 1, greedy, prompt excluded.
//! `stlm bench train`: training throughput of a config, and model FLOPs utilisation against a
//! float32 matmul timed in the same process.

use crate::common::{print_json, DeviceArgs};
use anyhow::{bail, Result};
use clap::Subcommand;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;
use stlm_attention::{AttentionKind, AttentionMask, LinformerSharing, ATTENTION_KINDS};
use stlm_model::config::{ModelType, PositionKind};
use stlm_model::layers::SelfAttention;
use stlm_model::ModelConfig;
use stlm_model::{Batch, DecoderModel, GenerationConfig};
use stlm_train::optim::AdamW;
use stlm_train::run::RunConfig;
use stlm_train::trainer::{train_step, BatchSource};
use tch::{nn, Kind, Tensor};

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
    Moe(crate::bench_moe::MoeBenchArgs),
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

#[derive(Serialize)]
struct AttentionBench {
    kind: String,
    /// `layer` (projections included) or `kernel` (attention alone).
    what: &'static str,
    seq: i64,
    ms: f64,
    dense_ms: f64,
    speedup: f64,
    window: i64,
    global_tokens: i64,
    block: i64,
    summary: i64,
    batch: i64,
    heads: i64,
    head_dim: i64,
    device: String,
    threads: i32,
}

fn bench_attention(a: &BenchJob) -> Result<()> {
    let BenchJob::Attention {
        kind,
        seq,
        window,
        global_tokens,
        block,
        summary,
        p,
        linformer_k,
        batch,
        heads,
        head_dim,
        repeats,
        kernel,
        json,
        device,
    } = a
    else {
        unreachable!("called with the attention job")
    };
    let (seq, window, global, batch, heads, head_dim) = (*seq, *window, *global_tokens, *batch, *heads, *head_dim);
    let (block, summary) = (*block, *summary);
    let attention = match kind.as_str() {
        "dense" => AttentionKind::Dense,
        "sliding-window" => AttentionKind::SlidingWindow { window, global_tokens: global },
        "fixed-sparse" => AttentionKind::FixedSparse { block, summary },
        "strided-sparse" => AttentionKind::StridedSparse { stride: block },
        "ssmax" => AttentionKind::Ssmax,
        "temperature" => AttentionKind::Temperature,
        "power" => AttentionKind::Power { p: *p },
        "doge-dma" => AttentionKind::DogeDma { keep_window_size: window },
        "linformer" => AttentionKind::Linformer { k: *linformer_k, sharing: LinformerSharing::Headwise },
        _ => bail!("--kind {kind}: unknown attention (known: {})", ATTENTION_KINDS.join(", ")),
    };
    if seq < 1 || window < 1 || global < 0 || batch < 1 || heads < 1 || head_dim < 1 || *repeats < 1 {
        bail!("--seq, --window, --batch, --heads, --head-dim and --repeats must be at least 1 (--global-tokens at least 0)");
    }
    if block < 1 || !(1..=block).contains(&summary) {
        bail!("--block must be at least 1 and --summary between 1 and --block (got {block} and {summary})");
    }
    attention.validate().map_err(|e| anyhow::anyhow!("--kind {kind}: {e}"))?;
    let dev = stlm_core::parse_device(device)?;
    stlm_core::memory::keep_freed_memory(); // as `stlm train` does; both layers benefit
    tch::manual_seed(0);
    // One attention layer of the kind and one of dense attention, of the same shape, each owning
    // its projections and whatever its kind learns.
    let vs = nn::VarStore::new(dev);
    let hidden = heads * head_dim;
    let layer = |name: &str, kind: AttentionKind| {
        let cfg = ModelConfig {
            model_type: ModelType::Stlm,
            hidden_size: hidden,
            intermediate_size: 4 * hidden,
            num_hidden_layers: 1,
            num_attention_heads: heads,
            num_key_value_heads: heads,
            max_position_embeddings: seq,
            position: PositionKind::None,
            attention: vec![kind],
            ..ModelConfig::llama()
        };
        SelfAttention::new(vs.root() / name / "self_attn", &cfg, 0, cfg.initializer_range)
    };
    let (kind_layer, dense_layer) = (layer("kind", attention.clone()), layer("dense", AttentionKind::Dense));
    let x = Tensor::randn([batch, seq, hidden], (Kind::Float, dev)).set_requires_grad(true);
    let positions = Tensor::arange(seq, (Kind::Int64, dev)).unsqueeze(0).expand([batch, seq], false);
    // Linformer is bidirectional: its reference is bidirectional dense attention.
    let mask = match attention.not_causal_because() {
        Some(_) => AttentionMask::Full,
        None => AttentionMask::Causal,
    };
    // Kernels alone: the same queries, keys and values `[b, heads, seq, d]` for both.
    let qkv: Vec<Tensor> = (0..3).map(|_| Tensor::randn([batch, heads, seq, head_dim], (Kind::Float, dev)).set_requires_grad(true)).collect();
    let run = |l: &SelfAttention| -> f64 {
        let mut best = f64::INFINITY;
        for i in 0..=*repeats {
            let t = Instant::now();
            let out = match kernel {
                true => l.attend(&qkv[0], &qkv[1], &qkv[2], &mask),
                false => l.forward(&x, None, &positions, &mask, None, None),
            };
            out.sum(Kind::Float).backward();
            let waited = if *kernel { &qkv[0] } else { &x };
            let _ = waited.grad().double_value(&[0, 0, 0, 0][..waited.dim()]); // waits for the device
            if i > 0 {
                best = best.min(t.elapsed().as_secs_f64()); // the first run warms up
            }
        }
        best * 1e3
    };
    let dense_ms = run(&dense_layer);
    let ms = run(&kind_layer);
    let report = AttentionBench {
        kind: kind.clone(),
        what: if *kernel { "kernel" } else { "layer" },
        seq,
        ms,
        dense_ms,
        speedup: dense_ms / ms,
        window,
        global_tokens: global,
        block,
        summary,
        batch,
        heads,
        head_dim,
        device: format!("{dev:?}"),
        threads: tch::get_num_threads(),
    };
    if *json {
        print_json(&report)
    } else {
        let what = report.what;
        println!(
            "{kind} {what}: {ms:.2} ms forward+backward; dense-attention {what} {dense_ms:.2} ms ({:.2}x), seq {seq}",
            report.speedup
        );
        Ok(())
    }
}

#[derive(Serialize)]
struct GenerateBench {
    tokens_per_s: f64,
    new_tokens: i64,
    prompt_tokens: i64,
    seconds: f64,
    parameters: i64,
    device: String,
    threads: i32,
}

/// Seconds to generate `n` tokens greedily from `prompt`, ignoring EOS.
fn time_generate(model: &DecoderModel, prompt: &[i64], n: i64) -> Result<f64> {
    let cfg = GenerationConfig { max_new_tokens: n, temperature: 0.0, ..Default::default() };
    let t = Instant::now();
    let out = stlm_model::generate(model, &[prompt.to_vec()], &cfg, |_, _| {})?;
    let secs = t.elapsed().as_secs_f64();
    debug_assert_eq!(out[0].len() as i64, n);
    Ok(secs)
}

pub fn run(job: BenchJob) -> Result<()> {
    match job {
        BenchJob::Generate { model, new_tokens, prompt_tokens, repeats, json, device } => {
            bench_generate(model, new_tokens, prompt_tokens, repeats, json, device)
        }
        BenchJob::Train { config, steps, warmup, json, device } => bench_train(&config, steps, warmup, json, &device),
        job @ BenchJob::Attention { .. } => bench_attention(&job),
        BenchJob::Moe(args) => crate::bench_moe::bench_moe(&args),
    }
}

fn bench_generate(
    dir: PathBuf,
    new_tokens: i64,
    prompt_tokens: i64,
    repeats: usize,
    json: bool,
    device: DeviceArgs,
) -> Result<()> {
    if new_tokens < 2 || prompt_tokens < 1 || repeats < 1 {
        bail!("need --new-tokens >= 2, --prompt-tokens >= 1 and --repeats >= 1");
    }
    let mut model = device.load(&dir)?;
    model.optimize_for_decoding();
    let vocab = model.config.vocab_size;
    let prompt: Vec<i64> = (1..=prompt_tokens).map(|i| i % vocab).collect();
    time_generate(&model, &prompt, new_tokens.min(16))?; // warm-up
                                                         // Time n tokens minus time of 1 token: the prompt's prefill and the first token cancel out.
    let mut best = f64::INFINITY;
    for _ in 0..repeats {
        let one = time_generate(&model, &prompt, 1)?;
        let all = time_generate(&model, &prompt, new_tokens)?;
        best = best.min((all - one).max(1e-9));
    }
    let report = GenerateBench {
        tokens_per_s: (new_tokens - 1) as f64 / best,
        new_tokens,
        prompt_tokens,
        seconds: best,
        parameters: model.num_parameters(),
        device: format!("{:?}", model.device()),
        threads: tch::get_num_threads(),
    };
    if json {
        print_json(&report)
    } else {
        println!(
            "{:.1} tokens/s ({} new tokens after a {}-token prompt, {:?}, {} threads)",
            report.tokens_per_s,
            new_tokens,
            prompt_tokens,
            model.device(),
            report.threads
        );
        Ok(())
    }
}

#[derive(Serialize)]
struct TrainBench {
    tokens_per_s: f64,
    step_ms: f64,
    mfu: f64,
    params: i64,
    model_flops_per_token: f64,
    matmul_gflops: f64,
    batch_size: i64,
    seq_len: i64,
    grad_accum: u64,
    steps: u64,
    device: String,
    threads: i32,
}

/// Uniformly random token batches, the same for a given step.
struct RandomTokens {
    vocab: i64,
    batch: i64,
    seq: i64,
    device: tch::Device,
}

impl BatchSource for RandomTokens {
    fn train_batch(&self, step: u64, micro: u64) -> stlm_train::Result<Batch> {
        tch::manual_seed((step * 1000 + micro) as i64);
        let all = Tensor::randint(self.vocab, [self.batch, self.seq + 1], (Kind::Int64, self.device));
        Ok(Batch::new(all.narrow(1, 0, self.seq), all.narrow(1, 1, self.seq)))
    }
    fn val_batch(&self, index: u64) -> stlm_train::Result<Batch> {
        self.train_batch(u64::MAX / 2 + index, 0)
    }
}

fn bench_train(config: &Path, steps: u64, warmup: u64, json: bool, device: &DeviceArgs) -> Result<()> {
    if steps < 1 {
        bail!("--steps must be at least 1");
    }
    let run = RunConfig::load(config, &[])?;
    stlm_core::memory::keep_freed_memory(); // as `stlm train` does
    let dev = stlm_core::parse_device(&device.device)?;
    stlm_core::seed_all(run.train.seed);
    let model = DecoderModel::new(run.model.clone(), dev)?;
    let (batch, seq, accum) = (run.train.batch_size, run.train.seq_len, run.train.grad_accum);
    let data = RandomTokens { vocab: run.model.vocab_size, batch, seq, device: dev };
    let mut opt = AdamW::new(model.parameters(), run.train.adamw());
    let (lr, clip) = (run.train.lr, run.train.grad_clip);
    for step in 0..warmup {
        train_step(&model, &mut opt, &data, step, lr, accum, clip, None)?;
    }
    let t = Instant::now();
    for step in warmup..warmup + steps {
        train_step(&model, &mut opt, &data, step, lr, accum, clip, None)?;
    }
    let secs = t.elapsed().as_secs_f64() / steps as f64;
    let tokens_per_step = (batch * seq) as f64 * accum as f64;
    let per_token = model.flops_per_token(seq);
    let gflops = stlm_core::flops::matmul_peak_gflops(dev);
    let report = TrainBench {
        tokens_per_s: tokens_per_step / secs,
        step_ms: secs * 1e3,
        mfu: per_token * tokens_per_step / secs / (gflops * 1e9),
        params: model.num_parameters(),
        model_flops_per_token: per_token,
        matmul_gflops: gflops,
        batch_size: batch,
        seq_len: seq,
        grad_accum: accum,
        steps,
        device: format!("{dev:?}"),
        threads: tch::get_num_threads(),
    };
    if json {
        print_json(&report)
    } else {
        println!(
            "{:.0} tokens/s, {:.1} ms/step, MFU {:.1}% of a {:.1} GFLOP/s float32 matmul ({} parameters, {:?}, {} threads)",
            report.tokens_per_s,
            report.step_ms,
            report.mfu * 100.0,
            gflops,
            report.params,
            dev,
            report.threads
        );
        Ok(())
    }
}
