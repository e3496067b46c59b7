//! Texts sampled from a model of either kind, as a training run shows them at its end.

use crate::bytes::generate_bytes;
use crate::generate::{generate, GenerationConfig};
use crate::{AnyModel, ModelError, Result};
use std::io::Write;

/// `count` texts sampled from `model` (either kind), each started from the tokenizer's
/// end-of-text token (none without one), with temperature 0.8 and top-p 0.95: the samples a
/// training run shows at its end.
pub fn sample_texts(model: &AnyModel, tok: &stlm_tokenizers::Tokenizer, count: usize, seed: u64) -> Result<Vec<String>> {
    let Some(start) = tok.eos_id().map(i64::from) else { return Ok(Vec::new()) };
    if count == 0 {
        return Ok(Vec::new());
    }
    let config = model.as_lm().model_config();
    let cfg = GenerationConfig {
        max_new_tokens: 160,
        temperature: 0.8,
        top_p: 0.95,
        seed,
        eos_token_ids: config.eos_token_id.clone(),
        pad_token_id: config.pad_token_id.unwrap_or(0),
        vocab_limit: Some(tok.vocab_size() as i64),
        ..Default::default()
    };
    let decode = |ids: &[u32]| tok.decode(ids, true).map(|t| t.trim().to_string()).map_err(|e| ModelError::Input(e.to_string()));
    match model {
        AnyModel::Bytes(m) => (0..count)
            .map(|i| {
                let cfg = GenerationConfig { seed: seed + i as u64, max_new_tokens: 400, ..cfg.clone() };
                decode(&generate_bytes(m, &[start as u32], &cfg, |_| {})?)
            })
            .collect(),
        AnyModel::Tokens(m) => {
            let outs = generate(m, &vec![vec![start]; count], &cfg, |_, _| {})?;
            outs.iter().map(|ids| decode(&ids.iter().map(|&t| t as u32).collect::<Vec<_>>())).collect()
        }
    }
}

/// Prints generated text as it grows, holding back while it ends in an incomplete UTF-8
/// sequence (decoded as U+FFFD).
pub struct TextStream {
    /// Bytes of the text already printed.
    pub printed: usize,
}

impl TextStream {
    /// Prints `text` (the prompt) and starts after it.
    pub fn start(out: &mut impl Write, text: &str) -> Self {
        let _ = write!(out, "{text}");
        let _ = out.flush();
        TextStream { printed: text.len() }
    }

    /// Prints what `text` (everything so far) adds, once it does not end mid-character.
    pub fn update(&mut self, out: &mut impl Write, text: &str) {
        if !text.ends_with('\u{FFFD}') {
            if let Some(new) = text.get(self.printed..) {
                let _ = write!(out, "{new}");
                let _ = out.flush();
                self.printed = text.len();
            }
        }
    }
}
