//! Model directories (Hugging Face layout plus `stlm.toml`): load and save.

use crate::config::{ModelConfig, PRESETS};
use stlm_moe::product_keys;
use crate::hf::{config_from_json, config_to_json, export_weights, import_weights};
use crate::{DecoderModel, ModelError, Result};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use crate::quantized::{QuantizationFile, QUANTIZATION_FILE};
use stlm_core::{atomic_write_bytes, read_safetensors, write_safetensors, CoreError, DType};
use tch::{Device, Tensor};

/// Weight file name inside a model directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// The record `stlm prune` leaves in a pruned model directory (which weights were pruned).
pub const PRUNING_FILE: &str = "pruning.json";

/// Model configs from TOML, the form people write: parsed, checked for consistency
/// ([`ModelConfig::validate`]) and for the format its `model_type` saves as
/// ([`crate::hf::check_export`]), so a run that could not save its model stops before it trains.
impl ModelConfig {
    /// Parses a TOML model config: `preset = "llama"|"gpt2"` (default llama) supplies every field
    /// the file does not set. A `[model]` table is used when present, so one file can hold the
    /// model and, later, the training settings.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Self> {
        let err = |m: String| ModelError::config(path, m);
        let value: toml::Value = text.parse().map_err(|e: toml::de::Error| err(e.message().to_string()))?;
        let mut table = match value {
            toml::Value::Table(mut t) => match t.remove("model") {
                Some(toml::Value::Table(m)) => m,
                Some(_) => return Err(err("field `model` must be a table".into())),
                None => t,
            },
            _ => return Err(err("expected a TOML table".into())),
        };
        let preset = match table.remove("preset") {
            None => "llama".to_string(),
            Some(toml::Value::String(s)) => s,
            Some(v) => return Err(err(format!("field `preset`: expected a string, got {v}"))),
        };
        let base = Self::preset(&preset)
            .ok_or_else(|| err(format!("field `preset`: unknown preset `{preset}` (known: {})", PRESETS.join(", "))))?;
        let toml::Value::Table(mut merged) = toml::Value::try_from(&base).map_err(|e| err(e.to_string()))? else {
            unreachable!("a struct serializes to a table")
        };
        // Without an explicit kv head count, follow the (possibly overridden) query head count.
        if !table.contains_key("num_key_value_heads") {
            if let Some(h) = table.get("num_attention_heads") {
                merged.insert("num_key_value_heads".into(), h.clone());
            }
        }
        merged.extend(table);
        let cfg: Self = serde_path_to_error::deserialize(toml::Value::Table(merged))
            .map_err(|e| err(format!("field `{}`: {}", e.path(), e.inner().message().trim())))?;
        cfg.validate(path)?;
        crate::hf::check_export(&cfg, path)?;
        if let Some(c) = &cfg.cdmoe {
            let (keys, square) = product_keys(c.num_experts);
            if !square {
                return Err(err(format!(
                    "field `cdmoe.num_experts`: {} is not a square, so product keys reach only {keys}^2 = {} experts",
                    c.num_experts,
                    keys * keys
                )));
            }
        }
        Ok(cfg)
    }

    /// Reads a TOML model config file.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| stlm_core::CoreError::io(path, e))?;
        Self::from_toml_str(&text, path)
    }

}

/// Reads the model config of a directory: `stlm.toml` when present, else `config.json`.
pub fn load_config(dir: &Path) -> Result<ModelConfig> {
    if !dir.is_dir() {
        return Err(CoreError::Invalid(format!("{}: model directory does not exist", dir.display())).into());
    }
    let toml_path = dir.join("stlm.toml");
    if toml_path.is_file() {
        return ModelConfig::from_toml_file(&toml_path);
    }
    let json_path = dir.join("config.json");
    if !json_path.is_file() {
        return Err(ModelError::config(dir, "neither stlm.toml nor config.json is in this directory"));
    }
    let value: serde_json::Value = stlm_core::read_json(&json_path)?;
    config_from_json(value, &json_path)
}

/// Loads a model directory onto `device` in `dtype`: config, then every weight, checking that
/// no weight is missing, unexpected, or of the wrong shape.
pub fn load_model(dir: &Path, device: Device, dtype: DType) -> Result<DecoderModel> {
    let config = load_config(dir)?;
    let mut model = DecoderModel::new(config, device)?;
    let path = dir.join(WEIGHTS_FILE);
    if !path.is_file() {
        return Err(ModelError::Weights { path, message: "weight file is missing".into() });
    }
    let mut tensors = read_safetensors(&path)?;
    // A quantized directory: the blocks come out, their float values go in, for the float load.
    let blocks = match QuantizationFile::read(dir)? {
        Some(file) => crate::quantized::take_blocks(&file, &mut tensors, &path)?,
        None => HashMap::new(),
    };
    let tensors = import_weights(&model.config, tensors, &path)?;
    copy_weights(&model, model.config.tie_word_embeddings, tensors, &path)?;
    model.set_kind(dtype.kind());
    if !blocks.is_empty() {
        model.set_quantized(blocks).map_err(|e| ModelError::Weights { path: dir.join(QUANTIZATION_FILE), message: e.to_string() })?;
    }
    Ok(model)
}

/// What `layer` stores, by saved name (its stored walk: every tensor once, tied ones where they
/// are stored): what a model directory's `model.safetensors` holds.
pub(crate) fn stored_tensors(layer: &dyn stlm_core::Layer) -> HashMap<String, Tensor> {
    stlm_core::module::parameters(layer).into_iter().map(|p| (p.name, p.tensor)).collect()
}

/// Copies `tensors` into what `layer` stores (its stored walk) by name, checking that none is
/// missing, unexpected or of the wrong shape (`tied`: a stored `lm_head.weight` is the embedding).
pub(crate) fn copy_weights(layer: &dyn stlm_core::Layer, tied: bool, mut tensors: HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let err = |message: String| ModelError::Weights { path: path.to_path_buf(), message };
    if tied {
        // Some checkpoints store the tied head as well; it is the embedding.
        tensors.remove("lm_head.weight");
    }
    let mut vars: Vec<(String, Tensor)> = stored_tensors(layer).into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let missing: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).filter(|n| !tensors.contains_key(*n)).collect();
    if !missing.is_empty() {
        return Err(err(format!("{} weights the config needs are missing, e.g. `{}`", missing.len(), missing[0])));
    }
    let _guard = tch::no_grad_guard();
    for (name, mut var) in vars {
        let t = tensors.remove(&name).expect("checked above");
        if t.size() != var.size() {
            return Err(err(format!("tensor `{name}` has shape {:?}, the config expects {:?}", t.size(), var.size())));
        }
        if !t.is_floating_point() {
            return Err(err(format!("tensor `{name}` has kind {:?}, expected a float", t.kind())));
        }
        var.copy_(&t);
    }
    if let Some(extra) = tensors.keys().min() {
        return Err(err(format!("{} tensors are not used by the config, e.g. `{extra}`", tensors.len())));
    }
    Ok(())
}

impl DecoderModel {
    /// Replaces every weight with the ones in `path` (a `model.safetensors` this model's config
    /// wrote), checking names and shapes; the tensors stay the same objects, so an optimizer
    /// holding them keeps working.
    pub fn load_weights(&self, path: &Path) -> Result<()> {
        let tensors = import_weights(&self.config, read_safetensors(path)?, path)?;
        copy_weights(self, self.config.tie_word_embeddings, tensors, path)
    }

    /// Saves a model directory that transformers loads when `model_type` is llama or gpt2:
    /// `model.safetensors`, `config.json`, `generation_config.json`, `stlm.toml`, and
    /// `tokenizer.json` copied from `tokenizer` when given. Each file is written atomically.
    pub fn save(&self, dir: &Path, tokenizer: Option<&Path>) -> Result<()> {
        let dtype = match self.kind() {
            tch::Kind::BFloat16 => "bfloat16",
            tch::Kind::Half => "float16",
            _ => "float32",
        };
        let weights = export_weights(&self.config, &stored_tensors(self));
        let quantized = self.quantized_weights();
        if quantized.is_empty() {
            save_dir(dir, &self.config, &weights, dtype, tokenizer)?;
            // A float model saved over a quantized one: no stale marker.
            let marker = dir.join(QUANTIZATION_FILE);
            if marker.is_file() {
                std::fs::remove_file(&marker).map_err(|e| CoreError::io(&marker, e))?;
            }
            return Ok(());
        }
        let weights = crate::quantized::with_blocks(weights, &quantized, &format!("{:?}", self.config.model_type).to_lowercase())?;
        save_dir(dir, &self.config, &weights, dtype, tokenizer)?;
        let tensors = quantized.into_iter().map(|(name, m)| (name, m.format())).collect();
        QuantizationFile { tensors, method: String::new(), report: None }.write(dir)
    }
}

/// Writes a model directory: `model.safetensors` (`weights`), `config.json`,
/// `generation_config.json`, `stlm.toml`, and `tokenizer.json` copied from `tokenizer` when
/// given; each file atomically.
pub(crate) fn save_dir(dir: &Path, config: &ModelConfig, weights: &[(String, Tensor)], dtype: &str, tokenizer: Option<&Path>) -> Result<()> {
    crate::hf::check_export(config, dir)?; // before anything is written
    std::fs::create_dir_all(dir).map_err(|e| CoreError::io(dir, e))?;
    write_safetensors(&dir.join(WEIGHTS_FILE), weights)?;
    let write_json = |name: &str, v: serde_json::Value| -> Result<()> {
        let text = serde_json::to_string_pretty(&v).expect("json values serialize");
        Ok(atomic_write_bytes(&dir.join(name), text.as_bytes())?)
    };
    write_json("config.json", config_to_json(config, dtype))?;
    let c = config;
    let mut gen = json!({});
    if let Some(b) = c.bos_token_id {
        gen["bos_token_id"] = json!(b);
    }
    if !c.eos_token_id.is_empty() {
        gen["eos_token_id"] = json!(c.eos_token_id);
    }
    if let Some(p) = c.pad_token_id {
        gen["pad_token_id"] = json!(p);
    }
    write_json("generation_config.json", gen)?;
    atomic_write_bytes(&dir.join("stlm.toml"), config.to_toml().as_bytes())?;
    if let Some(src) = tokenizer {
        let bytes = std::fs::read(src).map_err(|e| CoreError::io(src, e))?;
        atomic_write_bytes(&dir.join("tokenizer.json"), &bytes)?;
    }
    Ok(())
}

/// The `tokenizer.json` of a model directory, or for a checkpoint the run's, if there is one.
pub fn tokenizer_path(dir: &Path) -> Option<PathBuf> {
    let own = Some(dir.join("tokenizer.json")).filter(|p| p.is_file());
    // A checkpoint of a training run (`RUN/checkpoints/step-N`) uses the run's tokenizer.
    let run = || {
        let parent = dir.parent().filter(|p| p.file_name().is_some_and(|n| n == "checkpoints"))?;
        parent.parent().map(|run| run.join("tokenizer.json")).filter(|p| p.is_file())
    };
    own.or_else(run)
}

/// A randomly initialised model (seed `seed`) of the TOML config `config` saved as the model
/// directory `out`, with `tokenizer` copied in; a tokenizer with more ids than the config's
/// `vocab_size` is refused.
pub fn init_dir(config: &Path, tokenizer: Option<&Path>, seed: u64, out: &Path) -> Result<DecoderModel> {
    let cfg = ModelConfig::from_toml_file(config)?;
    if let Some(t) = tokenizer {
        let tok = stlm_tokenizers::Tokenizer::from_file(t).map_err(|e| ModelError::Input(format!("{}: {e}", t.display())))?;
        if (tok.vocab_size() as i64) > cfg.vocab_size {
            let n = tok.vocab_size();
            return Err(ModelError::Input(format!("{}: vocab_size {} is smaller than the tokenizer's {n} ids ({})", config.display(), cfg.vocab_size, t.display())));
        }
    }
    stlm_core::seed_all(seed);
    let model = DecoderModel::new(cfg, tch::Device::Cpu)?;
    model.save(out, tokenizer)?;
    Ok(model)
}

