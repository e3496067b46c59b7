//! `stlm eval ppl`.

use crate::common::{load_tokenizer, print_json, DeviceArgs};
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use std::io::IsTerminal;
use std::path::PathBuf;
use stlm_eval::{byte_perplexity, perplexity, PplReport, WindowOptions};
use stlm_model::AnyModel;

#[derive(Subcommand)]
pub enum EvalJob {
    /// Loss (nats/token), perplexity and bits per byte of a text file.
    Ppl {
        /// Model directory.
        #[arg(long)]
        model: PathBuf,
        /// UTF-8 text file.
        #[arg(long)]
        data: PathBuf,
        /// Tokens per window (byte models: chunks; default: the model's max_position_embeddings,
        /// at most 1024).
        #[arg(long)]
        max_length: Option<i64>,
        /// Tokens (byte models: chunks) each window advances by (default: half the window).
        #[arg(long)]
        stride: Option<i64>,
        /// tokenizer.json (default: the model directory's).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Print one JSON object: tokens, bytes, loss, ppl, bits_per_byte.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        device: DeviceArgs,
    },
}

pub fn run(job: EvalJob) -> Result<()> {
    let EvalJob::Ppl { model: dir, data, max_length, stride, tokenizer, json, device } = job;
    let text =
        std::fs::read_to_string(&data).with_context(|| format!("{}: cannot read as UTF-8 text", data.display()))?;
    if text.is_empty() {
        bail!("{}: the file is empty", data.display());
    }
    let tok = load_tokenizer(tokenizer.as_deref(), &dir)?;
    let model = match device.load_any(&dir)? {
        AnyModel::Tokens(m) => *m,
        AnyModel::Bytes(m) => {
            if !tok.is_bytes() {
                bail!("{}: a byte model reads the byte tokenizer, not this tokenizer.json", dir.display());
            }
            let ids = tok.encode(&text, false)?;
            let max_length = max_length.unwrap_or(m.config.max_position_embeddings);
            let window = WindowOptions { max_length, stride: stride.unwrap_or((max_length / 2).max(1)) };
            let report = byte_perplexity(&m, &ids, text.len() as u64, window, std::io::stderr().is_terminal())?;
            return print_report(&data, &report, json, "byte");
        }
    };
    // Start from an end-of-text/BOS token so the first token of the text is scored too.
    let start = model.config.bos_token_id.or(tok.eos_id().map(i64::from)).filter(|&id| id < model.config.vocab_size);
    let ids: Vec<i64> = start.into_iter().chain(tok.encode(&text, false)?.into_iter().map(i64::from)).collect();
    let max_length = max_length.unwrap_or(model.config.max_position_embeddings.min(1024));
    if max_length > model.config.max_position_embeddings {
        bail!(
            "--max-length {max_length} exceeds the model's max_position_embeddings ({})",
            model.config.max_position_embeddings
        );
    }
    let window = WindowOptions { max_length, stride: stride.unwrap_or((max_length / 2).max(1)) };
    let report = perplexity(&model, &ids, text.len() as u64, window, std::io::stderr().is_terminal())?;
    print_report(&data, &report, json, "token")
}

fn print_report(data: &std::path::Path, report: &PplReport, json: bool, unit: &str) -> Result<()> {
    if json {
        print_json(report)
    } else {
        println!(
            "{}: {} {unit}s, {} bytes, loss {:.4} nats/{unit}, perplexity {:.3}, {:.4} bits/byte",
            data.display(),
            report.tokens,
            report.bytes,
            report.loss,
            report.ppl,
            report.bits_per_byte
        );
        Ok(())
    }
}
