//! Options and helpers shared by several jobs.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use stlm_core::{parse_device, DType};
use stlm_model::{load_model, tokenizer_path, DecoderModel};
use stlm_tokenizers::Tokenizer;

/// Where and in what precision a model runs.
#[derive(Args, Clone)]
pub struct DeviceArgs {
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// float32, or bfloat16/float16 on CUDA.
    #[arg(long, default_value = "float32")]
    pub dtype: String,
}

impl DeviceArgs {
    /// Loads the model directory `dir` on the chosen device and dtype.
    pub fn load(&self, dir: &Path) -> Result<DecoderModel> {
        let device = parse_device(&self.device)?;
        let dtype = DType::parse(&self.dtype)?.for_device(device)?;
        if stlm_model::load_config(dir)?.bytes.is_some() {
            anyhow::bail!("{}: a byte-pooled model; this command takes token models", dir.display());
        }
        Ok(load_model(dir, device, dtype)?)
    }

    /// Loads a model directory of either kind (token or byte-pooled).
    pub fn load_any(&self, dir: &Path) -> Result<stlm_model::AnyModel> {
        let device = parse_device(&self.device)?;
        let dtype = DType::parse(&self.dtype)?.for_device(device)?;
        Ok(stlm_model::load_any_model(dir, device, dtype)?)
    }
}

/// The tokenizer given by `--tokenizer`, else the model directory's `tokenizer.json`.
pub fn load_tokenizer(explicit: Option<&Path>, model_dir: &Path) -> Result<Tokenizer> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => tokenizer_path(model_dir).with_context(|| {
            format!("{}: no tokenizer.json in the model directory; pass --tokenizer FILE", model_dir.display())
        })?,
    };
    Ok(Tokenizer::from_file(&path)?)
}

/// Parses `1,2,3` into token ids.
pub fn parse_ids(s: &str) -> Result<Vec<i64>> {
    let ids: Vec<i64> = s
        .split(',')
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .map(|t| t.parse::<i64>().with_context(|| format!("--ids: `{t}` is not a token id")))
        .collect::<Result<_>>()?;
    if ids.is_empty() {
        bail!("--ids: no token ids given");
    }
    Ok(ids)
}

/// Prints one JSON object on stdout.
pub fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// A path that must not be an existing directory's sibling temp: the parent must exist.
pub fn output_path(p: &Path) -> Result<PathBuf> {
    if let Some(parent) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !parent.is_dir() {
            bail!("{}: the directory {} does not exist", p.display(), parent.display());
        }
    }
    Ok(p.to_path_buf())
}
