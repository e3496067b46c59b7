//! A BPE `tokenizer.json` <-> the vocabulary llama.cpp reads from GGUF (`tokenizer.ggml.*`).
//!
//! Two kinds, as llama.cpp's `convert_hf_to_gguf.py` writes them:
//! - `gpt2`: byte-level BPE (stlm's trained tokenizers): every token in its byte-level spelling
//!   (`Ġthe`), the merges as `"a b"` strings in rank order, pre-tokenizer `gpt-2` (GPT-2's split
//!   regex, which stlm's `ByteLevel` pre-tokenizer uses).
//! - `llama`: sentencepiece-style BPE with byte fallback (llama2.c's and Llama's vocabularies:
//!   `▁` for spaces, `<0xNN>` byte pieces, ids 0-2 `<unk>`, `<s>`, `</s>`): tokens with scores,
//!   which llama.cpp's merge order follows (a merged piece scores minus the rank of the first
//!   merge making it, as [`crate::Llama2cVocab::from_tokenizer`] scores them).
//!
//! Token types are llama.cpp's: 1 normal, 2 unknown, 3 control (special tokens), 6 byte.

use crate::llama2c::{byte_piece, merge_pairs, merge_scores};
use crate::{Llama2cVocab, Result, Tokenizer, TokenizerError};
use serde_json::{json, Value};

/// llama.cpp's token type of an ordinary token.
pub const TYPE_NORMAL: i32 = 1;
/// llama.cpp's token type of the unknown token.
pub const TYPE_UNKNOWN: i32 = 2;
/// llama.cpp's token type of a special (control) token.
pub const TYPE_CONTROL: i32 = 3;
/// llama.cpp's token type of padding that no text encodes to.
pub const TYPE_UNUSED: i32 = 5;
/// llama.cpp's token type of a `<0xNN>` byte piece.
pub const TYPE_BYTE: i32 = 6;

/// Which tokenizer llama.cpp runs (`tokenizer.ggml.model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VocabKind {
    /// Byte-level BPE (`gpt2`).
    Gpt2,
    /// Sentencepiece-style BPE with byte fallback (`llama`).
    Llama,
}

impl VocabKind {
    /// The `tokenizer.ggml.model` value.
    pub fn name(self) -> &'static str {
        match self {
            VocabKind::Gpt2 => "gpt2",
            VocabKind::Llama => "llama",
        }
    }

    /// The kind named `name`, if llama.cpp's and supported here.
    pub fn from_name(name: &str) -> Option<Self> {
        [VocabKind::Gpt2, VocabKind::Llama].into_iter().find(|k| k.name() == name)
    }
}

/// A vocabulary as GGUF stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufVocab {
    /// The tokenizer kind.
    pub kind: VocabKind,
    /// Every token's text, by id.
    pub tokens: Vec<String>,
    /// Every token's score (merge priority for `llama`; zeros for `gpt2`).
    pub scores: Vec<f32>,
    /// Every token's llama.cpp type (`TYPE_*`).
    pub token_types: Vec<i32>,
    /// `gpt2`'s merges, `"a b"`, in rank order (empty for `llama`).
    pub merges: Vec<String>,
    /// The unknown token's id, if any.
    pub unk: Option<u32>,
    /// The end-of-text token's id, if any.
    pub eos: Option<u32>,
    /// The padding token's id, if any.
    pub pad: Option<u32>,
}

impl GgufVocab {
    /// The GGUF vocabulary of a BPE `tokenizer.json`; other models (WordPiece, Unigram) are refused.
    pub fn from_tokenizer(tok: &Tokenizer) -> Result<Self> {
        let spec: Value = serde_json::from_str(&tok.to_json()?).map_err(|e| TokenizerError::Tokenizer(e.to_string()))?;
        let model = &spec["model"];
        if model["type"] != "BPE" {
            return Err(TokenizerError::Invalid(format!("GGUF export supports BPE tokenizers; this tokenizer.json's model is {}", model["type"])));
        }
        let kind = if spec["decoder"].to_string().contains("ByteLevel") { VocabKind::Gpt2 } else { VocabKind::Llama };
        let specials: Vec<u32> = spec["added_tokens"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["special"].as_bool().unwrap_or(true))
            .filter_map(|t| t["id"].as_u64().map(|id| id as u32))
            .collect();
        let n = tok.vocab_size();
        let tokens = (0..n as u32)
            .map(|id| tok.id_to_token(id).ok_or_else(|| TokenizerError::Invalid(format!("id {id} of {n} has no token"))))
            .collect::<Result<Vec<String>>>()?;
        let unk = model["unk_token"].as_str().and_then(|u| tok.token_to_id(u));
        let token_types = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| match id as u32 {
                i if Some(i) == unk => TYPE_UNKNOWN,
                i if specials.contains(&i) => TYPE_CONTROL,
                _ if kind == VocabKind::Llama && byte_piece(t.as_bytes()).is_some() => TYPE_BYTE,
                _ => TYPE_NORMAL,
            })
            .collect();
        let (scores, merges) = match kind {
            VocabKind::Gpt2 => (vec![0.0; n], merge_pairs(model).into_iter().map(|(a, b)| format!("{a} {b}")).collect()),
            VocabKind::Llama => (merge_scores(model, tok), Vec::new()),
        };
        Ok(GgufVocab { kind, tokens, scores, token_types, merges, unk, eos: tok.eos_id(), pad: tok.pad_id() })
    }

    /// The vocabulary padded to `n` ids with unused `[PADid]` tokens (score 0), as llama.cpp's
    /// converter pads a tokenizer smaller than the model's vocabulary; `n` below its size is an error.
    pub fn padded(mut self, n: usize) -> Result<Self> {
        if self.tokens.len() > n {
            return Err(TokenizerError::Invalid(format!("{} tokens, more than the model's vocab_size {n}", self.tokens.len())));
        }
        for id in self.tokens.len()..n {
            self.tokens.push(format!("[PAD{id}]"));
            self.scores.push(0.0);
            self.token_types.push(TYPE_UNUSED);
        }
        Ok(self)
    }

    /// Checks that every per-token list has one entry per token (`tokenizer.ggml.*` arrays of
    /// one file can disagree), naming the list that does not.
    pub fn validate(&self) -> Result<()> {
        let n = self.tokens.len();
        for (name, len) in [("scores", self.scores.len()), ("token_type", self.token_types.len())] {
            if len != n {
                return Err(TokenizerError::Invalid(format!("tokenizer.ggml.{name} has {len} entries for {n} tokens")));
            }
        }
        Ok(())
    }

    /// The `tokenizer.json` that tokenizes as this vocabulary does in llama.cpp.
    pub fn to_tokenizer_json(&self) -> Result<String> {
        self.validate()?;
        match self.kind {
            VocabKind::Llama => self.llama_json(),
            VocabKind::Gpt2 => self.gpt2_json(),
        }
    }

    /// `llama`: through llama2.c's vocabulary, whose `tokenizer.json` is transformers' Llama layout.
    fn llama_json(&self) -> Result<String> {
        let specials = ["<unk>", "<s>", "</s>"];
        if self.tokens.len() < 3 || self.tokens[..3] != specials {
            return Err(TokenizerError::Invalid(format!(
                "a llama (sentencepiece) vocabulary starts with {specials:?}; this one with {:?}",
                &self.tokens[..self.tokens.len().min(3)]
            )));
        }
        let pieces = self.tokens.iter().map(|t| t.replace('▁', " ").into_bytes()).collect();
        Llama2cVocab::new(pieces, self.scores.clone())?.to_tokenizer_json()
    }

    /// `gpt2`: byte-level BPE as stlm trains it (GPT-2's pre-tokenizer, no prefix space).
    fn gpt2_json(&self) -> Result<String> {
        let mut vocab = serde_json::Map::new();
        for (id, t) in self.tokens.iter().enumerate() {
            if let Some(first) = vocab.insert(t.clone(), json!(id)) {
                return Err(TokenizerError::Invalid(format!("tokens {first} and {id} are both `{t}`")));
            }
        }
        let merges = self
            .merges
            .iter()
            .map(|m| m.split_once(' ').map(|(a, b)| json!([a, b])).ok_or_else(|| TokenizerError::Invalid(format!("merge `{m}` is not two tokens"))))
            .collect::<Result<Vec<Value>>>()?;
        let added: Vec<Value> = (0..self.tokens.len())
            .filter(|&id| self.token_types[id] == TYPE_CONTROL)
            .map(|id| {
                json!({"id": id, "content": self.tokens[id], "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": true})
            })
            .collect();
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let spec = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
            "pre_tokenizer": byte_level, "post_processor": byte_level, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges},
        });
        Ok(serde_json::to_string_pretty(&spec).expect("json values serialize"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BpeOptions;

    fn texts() -> Vec<String> {
        let s = "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun. 12 + 30 = 42!";
        (0..20).map(|i| format!("{s} {i}\n")).collect()
    }

    #[test]
    fn byte_level_bpe_round_trips_with_the_same_ids() {
        let opts = BpeOptions { vocab_size: 300, show_progress: false, ..BpeOptions::default() };
        let tok = Tokenizer::train_bpe_on_texts(&texts(), &opts).unwrap();
        let v = GgufVocab::from_tokenizer(&tok).unwrap();
        assert_eq!(v.kind, VocabKind::Gpt2);
        assert_eq!((v.eos, v.pad), (Some(0), Some(1)));
        assert_eq!(&v.token_types[..3], [TYPE_CONTROL, TYPE_CONTROL, TYPE_NORMAL]);
        assert!(!v.merges.is_empty() && v.merges.iter().all(|m| m.split(' ').count() == 2));
        let back: tokenizers::Tokenizer = v.to_tokenizer_json().unwrap().parse().unwrap();
        let back = Tokenizer::from_inner(back);
        assert_eq!(GgufVocab::from_tokenizer(&back).unwrap(), v);
        for t in texts().iter().chain([&"héllo <|endoftext|> wörld\t  x".to_string()]) {
            assert_eq!(back.encode(t, false).unwrap(), tok.encode(t, false).unwrap(), "{t}");
        }
    }

    #[test]
    fn sentencepiece_vocabularies_keep_scores_and_byte_types() {
        let mut pieces: Vec<Vec<u8>> = vec![b"<unk>".to_vec(), b"\n<s>\n".to_vec(), b"\n</s>\n".to_vec()];
        pieces.extend((0..=255u8).map(|b| format!("<0x{b:02X}>").into_bytes()));
        let mut scores = vec![0.0; pieces.len()];
        for c in " abehilnot".chars() {
            pieces.push(c.to_string().into_bytes());
            scores.push(crate::llama2c::NO_MERGE_SCORE);
        }
        for (rank, p) in [" t", "he", " the", "in", " a"].iter().enumerate() {
            pieces.push(p.as_bytes().to_vec());
            scores.push(-(rank as f32));
        }
        let tok = Llama2cVocab::new(pieces, scores).unwrap().to_tokenizer().unwrap();
        let v = GgufVocab::from_tokenizer(&tok).unwrap();
        assert_eq!(v.kind, VocabKind::Llama);
        assert_eq!(&v.token_types[..4], [TYPE_UNKNOWN, TYPE_CONTROL, TYPE_CONTROL, TYPE_BYTE]);
        assert_eq!(v.tokens[3 + 256 + 10], "▁t");
        assert_eq!(v.scores[3 + 256 + 12], -2.0);
        assert!(v.merges.is_empty());
        let back: tokenizers::Tokenizer = v.to_tokenizer_json().unwrap().parse().unwrap();
        let back = Tokenizer::from_inner(back);
        for t in ["the tin hat", "a net in the tent", "ünï"] {
            assert_eq!(back.encode(t, true).unwrap(), tok.encode(t, true).unwrap(), "{t}");
        }
    }

    #[test]
    fn lists_of_other_lengths_are_named() {
        let opts = BpeOptions { vocab_size: 280, show_progress: false, ..BpeOptions::default() };
        let mut v = GgufVocab::from_tokenizer(&Tokenizer::train_bpe_on_texts(&texts(), &opts).unwrap()).unwrap();
        v.token_types.pop();
        let n = v.tokens.len();
        let e = v.to_tokenizer_json().unwrap_err().to_string();
        assert!(e.contains(&format!("tokenizer.ggml.token_type has {} entries for {n} tokens", n - 1)), "{e}");
    }
}
