//! A held-out text scored before and after a model is compressed (pruning, quantization):
//! tokenized once, scored in disjoint windows, reported as [`Perplexity`].

use crate::{perplexity, scored_ids, EvalError, Result, WindowOptions};
use serde::{Deserialize, Serialize};
use std::path::Path;
use stlm_model::DecoderModel;
use stlm_tokenizers::Tokenizer;

/// Validation loss and perplexity of a model on a text.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Perplexity {
    /// Mean nats per token.
    pub loss: f64,
    /// `exp(loss)`.
    pub ppl: f64,
    /// Bits per byte of text.
    pub bits_per_byte: f64,
}

/// Reads a text file, naming it on failure; an empty file is an error.
pub fn read_text(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::Input(format!("{}: cannot read as UTF-8 text: {e}", path.display())))?;
    if text.trim().is_empty() {
        return Err(EvalError::Input(format!("{}: the file is empty", path.display())));
    }
    Ok(text)
}

/// A held-out text, tokenized once, scored in disjoint windows.
#[derive(Debug, Clone)]
pub struct HeldOutText {
    ids: Vec<i64>,
    bytes: u64,
    window: WindowOptions,
}

impl HeldOutText {
    /// The text of `path` as `model` scores it (see [`scored_ids`]), in windows of `len` tokens
    /// (at most the model's context).
    pub fn load(path: &Path, model: &DecoderModel, tok: &Tokenizer, len: i64) -> Result<Self> {
        let text = read_text(path)?;
        let ids = scored_ids(model, tok, &text).map_err(|e| EvalError::Input(format!("{}: {e}", path.display())))?;
        let max_length = len.min(model.config.max_position_embeddings).max(1);
        Ok(HeldOutText { ids, bytes: text.len() as u64, window: WindowOptions { max_length, stride: max_length } })
    }

    /// `model`'s perplexity on the text.
    pub fn perplexity(&self, model: &DecoderModel, progress: bool) -> Result<Perplexity> {
        let r = perplexity(model, &self.ids, self.bytes, self.window, progress)?;
        Ok(Perplexity { loss: r.loss, ppl: r.ppl, bits_per_byte: r.bits_per_byte })
    }
}
