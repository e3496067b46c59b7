//! Quantized model directories: which linear layers hold block-quantized weights
//! (`quantization.json`), and their blocks in `model.safetensors` as `uint8` tensors
//! `[rows, bytes per row]` (ggml's block bytes, so a GGUF export copies them) under the weight's
//! own name. Everything else in the directory is as a float model's.
//!
//! Loading builds the float model, then gives each listed layer a [`Weight::Quantized`] found
//! through [`DecoderModel::linears_mut`]; saving writes the blocks in place of the float values.

use crate::error::{ModelError, Result};
use crate::weight::{Quantized, Weight};
use crate::DecoderModel;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use stlm_core::quant::{QuantFormat, QuantMatrix, QK};
use tch::{Kind, Tensor};

/// The token embedding's saved name.
pub const EMBEDDING: &str = "model.embed_tokens.weight";

/// The file that marks a model directory as quantized.
pub const QUANTIZATION_FILE: &str = "quantization.json";

/// What `quantization.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizationFile {
    /// The format of each quantized weight, by saved name (`model.layers.0.mlp.up_proj.weight`).
    pub tensors: BTreeMap<String, QuantFormat>,
    /// How the blocks were chosen (`rtn`, `gptq`), for people reading the directory.
    #[serde(default)]
    pub method: String,
    /// The quantization report (sizes, perplexities, time), for people reading the directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<serde_json::Value>,
}

impl QuantizationFile {
    /// Reads `dir`'s `quantization.json`, or `None` when the directory is a float model's.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(QUANTIZATION_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| stlm_core::CoreError::io(&path, e))?;
        let file = serde_json::from_str(&text).map_err(|e| ModelError::Weights { path: path.clone(), message: e.to_string() })?;
        Ok(Some(file))
    }

    /// Writes it into `dir` (atomically).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("the quantization file serializes");
        Ok(stlm_core::atomic_write_bytes(&dir.join(QUANTIZATION_FILE), text.as_bytes())?)
    }
}

/// Takes the blocks of every weight `file` lists out of `tensors` (a `model.safetensors` read
/// from `path`), putting their dequantized float values in their place so that the float model
/// loads them; returns the blocks by name.
pub(crate) fn take_blocks(file: &QuantizationFile, tensors: &mut HashMap<String, Tensor>, path: &Path) -> Result<HashMap<String, QuantMatrix>> {
    let err = |message: String| ModelError::Weights { path: path.to_path_buf(), message };
    let mut out = HashMap::new();
    for (name, &format) in &file.tensors {
        let t = tensors.remove(name).ok_or_else(|| err(format!("`{name}` is listed in {QUANTIZATION_FILE} but not stored")))?;
        let size = t.size();
        if t.kind() != Kind::Uint8 || size.len() != 2 || size[1] as usize % format.block_bytes() != 0 {
            return Err(err(format!(
                "`{name}`: {} blocks are stored as uint8 [rows, a multiple of {} bytes], not {:?} {size:?}",
                format.name(),
                format.block_bytes(),
                t.kind()
            )));
        }
        let (rows, cols) = (size[0] as usize, size[1] as usize / format.block_bytes() * QK);
        let bytes: Vec<u8> = Vec::try_from(t.contiguous().view([-1])).map_err(|e| err(format!("`{name}`: {e}")))?;
        let matrix = QuantMatrix::from_bytes(format, rows, cols, &bytes).map_err(|e| err(format!("`{name}`: {e}")))?;
        tensors.insert(name.clone(), Tensor::from_slice(&matrix.dequantize()).view([rows as i64, cols as i64]));
        out.insert(name.clone(), matrix);
    }
    Ok(out)
}

impl DecoderModel {
    /// Gives each linear layer named in `blocks` (by its weight's saved name) those blocks as its
    /// weight; a name that is not a linear layer of this model is an error.
    pub fn set_quantized(&mut self, mut blocks: HashMap<String, QuantMatrix>) -> Result<()> {
        if let Some(m) = blocks.remove(EMBEDDING) {
            let q = Quantized::new(m, self.embed_tokens.shallow_clone()).map_err(|e| ModelError::Input(format!("`{EMBEDDING}`: {e}")))?;
            self.embed_quantized = Some(q);
        }
        for site in self.linears_mut() {
            let name = format!("{}.weight", site.name());
            if let Some(m) = blocks.remove(&name) {
                let quantized = Quantized::new(m, site.linear.weight.value()).map_err(|e| ModelError::Input(format!("`{name}`: {e}")))?;
                site.linear.weight = Weight::Quantized(quantized);
            }
        }
        match blocks.keys().min() {
            Some(name) => Err(ModelError::Input(format!("`{name}` is not a linear layer of this model, so it cannot be quantized"))),
            None => Ok(()),
        }
    }

    /// The quantized weights (linear layers and the token embedding), by saved name.
    pub fn quantized_weights(&self) -> BTreeMap<String, &QuantMatrix> {
        let embedding = self.embed_quantized.as_ref().map(|q| (EMBEDDING.to_string(), q.matrix.as_ref()));
        self.linears()
            .into_iter()
            .filter_map(|(name, linear)| match &linear.weight {
                Weight::Quantized(q) => Some((format!("{name}.weight"), q.matrix.as_ref())),
                Weight::Dense(_) => None,
            })
            .chain(embedding)
            .collect()
    }

    /// Turns every quantized weight back into its float variable, which holds the dequantized
    /// values: a float model to train or prune further.
    pub fn dequantize(&mut self) {
        self.embed_quantized = None;
        for site in self.linears_mut() {
            if let Weight::Quantized(q) = &site.linear.weight {
                let dense = q.dense.shallow_clone();
                site.linear.weight = Weight::Dense(dense);
            }
        }
    }

    /// Whether any weight is quantized.
    pub fn is_quantized(&self) -> bool {
        !self.quantized_weights().is_empty()
    }
}

/// `weights` (as a model directory stores them) with each quantized weight's float values
/// replaced by its blocks, `uint8 [rows, bytes per row]`; an error when the export renamed one
/// (Hugging Face families whose files fuse or transpose projections, e.g. GPT-2's `c_attn`).
pub(crate) fn with_blocks(weights: Vec<(String, Tensor)>, quantized: &BTreeMap<String, &QuantMatrix>, model_type: &str) -> Result<Vec<(String, Tensor)>> {
    let mut left: Vec<&String> = quantized.keys().collect();
    let out = weights
        .into_iter()
        .map(|(name, t)| match quantized.get(&name) {
            Some(m) => {
                left.retain(|n| **n != name);
                let (rows, _) = m.shape();
                let bytes = Tensor::from_slice(&m.to_bytes());
                let per_row = (m.byte_len() / rows.max(1)) as i64;
                (name, bytes.view([rows as i64, per_row]))
            }
            None => (name, t),
        })
        .collect();
    match left.first() {
        Some(name) => Err(ModelError::Input(format!(
            "model_type {model_type} stores `{name}` under another layout, so its quantized blocks cannot be saved; quantize a llama-style model"
        ))),
        None => Ok(out),
    }
}
