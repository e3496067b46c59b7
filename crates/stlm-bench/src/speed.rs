//! Decoding speed at batch 1 (greedy, prompt excluded) and training throughput of a config with
//! model FLOPs utilisation against a float32 matmul timed in the same process.

use crate::{BenchError, Result};
use serde::Serialize;
use std::time::Instant;
use stlm_model::{Batch, DecoderModel, GenerationConfig};
use stlm_train::optim::AdamW;
use stlm_train::run::RunConfig;
use stlm_train::trainer::{train_step, BatchSource};
use tch::{Device, Kind, Tensor};

/// Decoding speed.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateBench {
    /// New tokens per second (the prompt's prefill and the first token excluded).
    pub tokens_per_s: f64,
    /// New tokens per timed run.
    pub new_tokens: i64,
    /// Prompt length.
    pub prompt_tokens: i64,
    /// Seconds of the fastest run (n tokens minus 1 token).
    pub seconds: f64,
    /// The model's parameters.
    pub parameters: i64,
    /// The device.
    pub device: String,
    /// libtorch's threads.
    pub threads: i32,
}

/// Seconds to generate `n` tokens greedily from `prompt`, ignoring EOS.
fn time_generate(model: &DecoderModel, prompt: &[i64], n: i64) -> Result<f64> {
    let cfg = GenerationConfig { max_new_tokens: n, temperature: 0.0, ..Default::default() };
    let t = Instant::now();
    stlm_model::generate(model, &[prompt.to_vec()], &cfg, |_, _| {})?;
    Ok(t.elapsed().as_secs_f64())
}

/// Times greedy generation of `new_tokens` after a prompt of `prompt_tokens` (ids `1..=n`,
/// wrapped to the vocabulary), `repeats` times after a warm-up; the model is prepared for
/// decoding first. The time of one token is subtracted, so prefill and the first token cancel.
pub fn bench_generate(model: &mut DecoderModel, new_tokens: i64, prompt_tokens: i64, repeats: usize) -> Result<GenerateBench> {
    if new_tokens < 2 || prompt_tokens < 1 || repeats < 1 {
        return Err(BenchError::Input(format!(
            "need new_tokens >= 2, prompt_tokens >= 1 and repeats >= 1 (got {new_tokens}, {prompt_tokens}, {repeats})"
        )));
    }
    model.optimize_for_decoding();
    let vocab = model.config.vocab_size;
    let prompt: Vec<i64> = (1..=prompt_tokens).map(|i| i % vocab).collect();
    time_generate(model, &prompt, new_tokens.min(16))?; // warm-up
    let mut best = f64::INFINITY;
    for _ in 0..repeats {
        let one = time_generate(model, &prompt, 1)?;
        let all = time_generate(model, &prompt, new_tokens)?;
        best = best.min((all - one).max(1e-9));
    }
    Ok(GenerateBench {
        tokens_per_s: (new_tokens - 1) as f64 / best,
        new_tokens,
        prompt_tokens,
        seconds: best,
        parameters: model.num_parameters(),
        device: format!("{:?}", model.device()),
        threads: tch::get_num_threads(),
    })
}

/// Training speed.
#[derive(Debug, Clone, Serialize)]
pub struct TrainBench {
    /// Training tokens per second.
    pub tokens_per_s: f64,
    /// Milliseconds per optimizer step.
    pub step_ms: f64,
    /// Model FLOPs utilisation: model FLOPs per second over the matmul's.
    pub mfu: f64,
    /// The model's parameters.
    pub params: i64,
    /// Forward+backward FLOPs per token (the layer walk's matrices, MoE experts per routed token).
    pub model_flops_per_token: f64,
    /// A float32 matmul's speed on the device, GFLOP/s.
    pub matmul_gflops: f64,
    /// Batch size.
    pub batch_size: i64,
    /// Window length.
    pub seq_len: i64,
    /// Micro-batches per step.
    pub grad_accum: u64,
    /// Timed steps.
    pub steps: u64,
    /// The device.
    pub device: String,
    /// libtorch's threads.
    pub threads: i32,
}

/// Uniformly random token batches, the same for a given step.
struct RandomTokens {
    vocab: i64,
    batch: i64,
    seq: i64,
    device: Device,
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

/// Trains the model of `run` on random tokens (its `[model]` and `[train]` tables; no data or
/// checkpoints): `warmup` untimed steps, then `steps` timed ones.
pub fn bench_train(run: &RunConfig, steps: u64, warmup: u64, dev: Device) -> Result<TrainBench> {
    if steps < 1 {
        return Err(BenchError::Input("steps must be at least 1".into()));
    }
    stlm_core::memory::keep_freed_memory(); // as `stlm train` does
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
    Ok(TrainBench {
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
    })
}
