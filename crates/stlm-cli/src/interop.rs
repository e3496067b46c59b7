//! `stlm import` and `stlm export`: other tools' model files <-> stlm model directories.

use crate::common::{output_path, print_json};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use std::path::PathBuf;
use stlm_model::llama2c::{self, Format};

#[derive(Subcommand)]
pub enum ImportJob {
    /// A llama2.c checkpoint (`model.bin`, versions 0, 1 and 2) and its `tokenizer.bin` -> a
    /// Hugging Face Llama directory (docs/llama2c.md).
    Llama2c(ImportLlama2cArgs),
}

#[derive(Subcommand)]
pub enum ExportJob {
    /// A Llama model directory -> a llama2.c checkpoint that run.c (version 0) or runq.c
    /// (version 2) runs, and optionally its `tokenizer.bin`.
    Llama2c(ExportLlama2cArgs),
}

#[derive(Args)]
pub struct ImportLlama2cArgs {
    /// llama2.c checkpoint (`model.bin`): legacy version 0, or version 1 / 2 of export.py.
    #[arg(long)]
    checkpoint: PathBuf,
    /// llama2.c `tokenizer.bin`, converted to `tokenizer.json` (without it the directory has
    /// no tokenizer; pass `--tokenizer` to the jobs that need one).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Model directory to write.
    #[arg(long)]
    out: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ExportLlama2cArgs {
    /// Llama model directory.
    #[arg(long)]
    model: PathBuf,
    /// Checkpoint file to write.
    #[arg(long)]
    out: PathBuf,
    /// 0: legacy (run.c), 1: float32 with a header, 2: int8 groups (runq.c).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=2))]
    version: u32,
    /// Version 2: values per int8 scale (halved until it divides the model width).
    #[arg(long, default_value_t = 64)]
    group_size: usize,
    /// Also write the model's tokenizer.json as a llama2.c `tokenizer.bin` here.
    #[arg(long, value_name = "FILE")]
    tokenizer_out: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn import(job: ImportJob) -> Result<()> {
    match job {
        ImportJob::Llama2c(a) => {
            let r = llama2c::import(&a.checkpoint, a.tokenizer.as_deref(), &a.out)?;
            let summary = r.header.to_json();
            if a.json {
                return print_json(&json!({"out": r.out, "tokenizer": r.tokenizer, "checkpoint": summary}));
            }
            println!(
                "{}: llama2.c version {} checkpoint, {} -> {}{}",
                a.checkpoint.display(),
                r.header.format.version(),
                r.header,
                r.out.display(),
                if r.tokenizer { " (with tokenizer.json)" } else { " (no tokenizer: pass --tokenizer tokenizer.bin)" }
            );
            Ok(())
        }
    }
}

pub fn export(job: ExportJob) -> Result<()> {
    match job {
        ExportJob::Llama2c(a) => {
            let format = Format::from_version(a.version, a.group_size).context("--version/--group-size")?;
            let out = output_path(&a.out)?;
            if let Some(t) = &a.tokenizer_out {
                output_path(t)?;
            }
            let r = llama2c::export(&a.model, &out, format, a.tokenizer_out.as_deref())?;
            for w in &r.warnings {
                eprintln!("warning: {w}");
            }
            let group_size = match r.header.format {
                Format::V2 { group_size } => Some(group_size),
                _ => None,
            };
            if a.json {
                return print_json(&json!({
                    "out": out, "bytes": r.bytes, "version": r.header.format.version(), "group_size": group_size,
                    "max_quant_error": r.max_quant_error, "tokenizer_out": a.tokenizer_out, "warnings": r.warnings,
                    "swapped_ids": r.swapped_ids,
                    "checkpoint": r.header.to_json(),
                }));
            }
            let quant = match (group_size, r.max_quant_error) {
                (Some(g), Some(e)) => format!(", int8 groups of {g}, largest weight error {e:.3e}"),
                _ => String::new(),
            };
            println!(
                "{} -> {} (llama2.c version {}, {}, {} bytes{quant})",
                a.model.display(),
                out.display(),
                r.header.format.version(),
                r.header,
                r.bytes
            );
            if let Some(t) = &a.tokenizer_out {
                println!("tokenizer -> {}", t.display());
            }
            if let Some((one, s)) = r.swapped_ids {
                println!("ids {one} and {s} swapped in the checkpoint and tokenizer.bin: run.c starts and ends texts at id 1, this model at {s}");
            }
            Ok(())
        }
    }
}
