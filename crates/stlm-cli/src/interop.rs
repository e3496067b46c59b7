//! `stlm import` and `stlm export`: other tools' model files <-> stlm model directories.

use crate::common::{output_path, print_json};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use std::path::PathBuf;
use stlm_model::gguf::{self, GgufType};
use stlm_model::llama2c::{self, Format};

#[derive(Subcommand)]
pub enum ImportJob {
    /// A llama2.c checkpoint (`model.bin`, versions 0, 1 and 2) and its `tokenizer.bin` -> a
    /// Hugging Face Llama directory (docs/llama2c.md).
    Llama2c(ImportLlama2cArgs),
    /// A GGUF file (llama.cpp; `llama` architecture; F32, F16, Q8_0, Q4_0 tensors) -> a model
    /// directory, quantized where the file is, with its tokenizer (docs/gguf.md).
    Gguf(ImportGgufArgs),
}

#[derive(Subcommand)]
pub enum ExportJob {
    /// A Llama model directory -> a llama2.c checkpoint that run.c (version 0) or runq.c
    /// (version 2) runs, and optionally its `tokenizer.bin`.
    Llama2c(ExportLlama2cArgs),
    /// A Llama model directory (float or quantized) and its tokenizer -> a GGUF file for
    /// llama.cpp (docs/gguf.md).
    Gguf(ExportGgufArgs),
}

#[derive(Args)]
pub struct ImportGgufArgs {
    /// GGUF file.
    #[arg(long)]
    file: PathBuf,
    /// Model directory to write.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct ExportGgufArgs {
    /// Model directory.
    #[arg(long)]
    model: PathBuf,
    /// GGUF file to write.
    #[arg(long)]
    out: PathBuf,
    /// Type of the float matrices (a quantized model's blocks are copied as they are).
    #[arg(long = "type", value_name = "TYPE", value_enum, default_value = "f32")]
    ty: GgufType,
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
        ImportJob::Gguf(a) => Ok(println!("{} -> {}", a.file.display(), gguf::import(&a.file, &a.out)?)),
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
            if a.json {
                return print_json(&r.to_json(&out, a.tokenizer_out.as_deref()));
            }
            println!("{} -> {} ({r})", a.model.display(), out.display());
            if let Some(t) = &a.tokenizer_out {
                println!("tokenizer -> {}", t.display());
            }
            Ok(())
        }
        ExportJob::Gguf(a) => Ok(println!("{} -> {} ({})", a.model.display(), a.out.display(), gguf::export(&a.model, &output_path(&a.out)?, a.ty)?)),
    }
}
