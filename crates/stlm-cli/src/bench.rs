//! `stlm bench generate`: decoding speed at batch 1, greedy, prompt excluded.

use crate::common::{print_json, DeviceArgs};
use anyhow::{bail, Result};
use clap::Subcommand;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;
use stlm_model::{DecoderModel, GenerationConfig};

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
    let BenchJob::Generate { model: dir, new_tokens, prompt_tokens, repeats, json, device } = job;
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
