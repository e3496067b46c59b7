//! stlm-tokenizers: byte-level BPE (train, load, save as Hugging Face `tokenizer.json`) on the
//! `tokenizers` crate, the byte tokenizer ([`bytes`]), and chunkers that group bytes into
//! patches for byte-pooled models ([`chunk`]). No tch dependency.
//!
//! Any `tokenizer.json` that transformers can read loads here (BPE, WordPiece, Unigram, byte
//! fallback); [`Tokenizer::train_bpe`] trains GPT-2-style byte-level BPE, which encodes every
//! string losslessly: `decode(encode(s)) == s`.

pub mod bytes;
pub mod chunk;
pub mod gguf;
pub mod llama2c;

pub use bytes::{byte_char, char_byte, BYTE_EOT, BYTE_IDS, BYTE_PAD};
pub use chunk::{Chunker, ChunkerKind};
pub use gguf::{GgufVocab, VocabKind};
pub use llama2c::Llama2cVocab;

use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

/// Result alias for stlm-tokenizers.
pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// Errors naming the file or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A tokenizer file could not be read, parsed or written.
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    /// Bad training input.
    #[error("{0}")]
    Invalid(String),
    /// A [`BpeOptions`] value that is not allowed: the field (`vocab_size`), its value and why.
    /// The fields are those of `stlm_core::OptionError`, which this tch-free crate cannot name.
    #[error("`{name}` {value}: {why}")]
    Option {
        /// The options field.
        name: &'static str,
        /// The rejected value.
        value: String,
        /// Why it is not allowed.
        why: String,
    },
    /// Encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// The end-of-text token stlm's trained tokenizers carry.
pub const ENDOFTEXT: &str = "<|endoftext|>";
/// The padding token stlm's trained tokenizers carry.
pub const PAD: &str = "<|pad|>";

/// Options for training byte-level BPE.
#[derive(Debug, Clone)]
pub struct BpeOptions {
    /// Final vocabulary size, special tokens and the 256 byte symbols included.
    pub vocab_size: usize,
    /// Pairs seen fewer times than this are not merged.
    pub min_frequency: u64,
    /// Special tokens, given the first ids in this order.
    pub special_tokens: Vec<String>,
    /// Show a progress bar on stderr.
    pub show_progress: bool,
}

impl Default for BpeOptions {
    fn default() -> Self {
        BpeOptions {
            vocab_size: 4096,
            min_frequency: 2,
            special_tokens: vec![ENDOFTEXT.to_string(), PAD.to_string()],
            show_progress: true,
        }
    }
}

/// A tokenizer: any Hugging Face `tokenizer.json`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    fn from_inner(inner: tokenizers::Tokenizer) -> Self {
        Tokenizer { inner }
    }

    /// Loads a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| file_err(path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| file_err(path, format!("not a valid tokenizer.json ({e})")))?;
        Ok(Tokenizer { inner })
    }

    /// Trains byte-level BPE (GPT-2's pre-tokenizer, no prefix space) on text files.
    pub fn train_bpe(files: &[PathBuf], options: &BpeOptions) -> Result<Self> {
        if files.is_empty() {
            return Err(TokenizerError::Invalid("no training files given".into()));
        }
        for f in files {
            std::fs::metadata(f).map_err(|e| file_err(f, e))?;
        }
        let (mut trainer, mut inner) = Self::bpe_parts(options)?;
        let names = files.iter().map(|f| f.to_string_lossy().into_owned()).collect();
        inner.train_from_files(&mut trainer, names).map_err(|e| TokenizerError::Tokenizer(e.to_string()))?;
        Ok(Tokenizer { inner })
    }

    /// An untrained byte-level BPE tokenizer and its trainer.
    fn bpe_parts(options: &BpeOptions) -> Result<(TrainerWrapper, tokenizers::Tokenizer)> {
        let min_vocab = 256 + options.special_tokens.len();
        if options.vocab_size < min_vocab {
            return Err(TokenizerError::Option {
                name: "vocab_size",
                value: options.vocab_size.to_string(),
                why: format!(
                    "too small: byte-level BPE needs at least {min_vocab} (256 bytes + {} special tokens)",
                    options.special_tokens.len()
                ),
            });
        }
        let specials: Vec<AddedToken> =
            options.special_tokens.iter().map(|s| AddedToken::from(s.clone(), true)).collect();
        let trainer = BpeTrainerBuilder::new()
            .show_progress(options.show_progress)
            .vocab_size(options.vocab_size)
            .min_frequency(options.min_frequency)
            .special_tokens(specials)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let trainer = TrainerWrapper::BpeTrainer(trainer);
        let byte_level = ByteLevel::new(false, true, true);
        let mut inner = tokenizers::Tokenizer::new(BPE::default());
        inner.with_pre_tokenizer(Some(byte_level)).with_decoder(Some(byte_level)).with_post_processor(Some(byte_level));
        Ok((trainer, inner))
    }

    /// Trains byte-level BPE on in-memory texts (e.g. documents sampled from a corpus).
    pub fn train_bpe_on_texts(texts: &[String], options: &BpeOptions) -> Result<Self> {
        if texts.is_empty() {
            return Err(TokenizerError::Invalid("no text to train the tokenizer on".into()));
        }
        let (mut trainer, mut inner) = Self::bpe_parts(options)?;
        inner.train(&mut trainer, texts.iter()).map_err(|e| TokenizerError::Tokenizer(e.to_string()))?;
        Ok(Tokenizer { inner })
    }

    /// The `tokenizer.json` text (also what identifies the tokenizer in token-cache keys).
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(|e| TokenizerError::Tokenizer(e.to_string()))
    }

    /// Writes `tokenizer.json` atomically (temporary name, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self.to_json().map_err(|e| file_err(path, e))?;
        write_atomic(path, json.as_bytes())
    }

    /// Token ids of `text`, without added special tokens (BOS/EOS templates) unless asked.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| TokenizerError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; special tokens are kept unless `skip_special_tokens`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let size = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= size) {
            return Err(TokenizerError::Invalid(format!("token id {bad} is outside the vocabulary (0..{size})")));
        }
        self.inner.decode(ids, skip_special_tokens).map_err(|e| TokenizerError::Tokenizer(e.to_string()))
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Bytes of text each id stands for when decoded (a byte-level token's bytes, a special
    /// token's written form), `None` where unknown (vocabularies other than byte-level BPE).
    pub fn id_byte_lengths(&self) -> Option<Vec<usize>> {
        (0..self.vocab_size() as u32)
            .map(|id| {
                self.token_bytes(id).map(|b| b.len()).or_else(|| {
                    let token = self.inner.id_to_token(id)?;
                    self.inner.get_added_vocabulary().is_special_token(&token).then_some(token.len())
                })
            })
            .collect()
    }

    /// Token string of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The first id whose token differs between this vocabulary and `other`'s (`None`: they
    /// have the same tokens at the same ids), with both tokens.
    pub fn first_vocab_difference(&self, other: &Tokenizer) -> Option<(u32, Option<String>, Option<String>)> {
        let n = self.vocab_size().max(other.vocab_size()) as u32;
        (0..n).map(|id| (id, self.id_to_token(id), other.id_to_token(id))).find(|(_, a, b)| a != b)
    }

    /// Id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The end-of-text id: `<|endoftext|>`, `</s>` or `<eos>`, whichever the vocabulary has.
    pub fn eos_id(&self) -> Option<u32> {
        [ENDOFTEXT, "</s>", "<eos>", "<|end_of_text|>"].iter().find_map(|t| self.token_to_id(t))
    }

    /// The padding id, if the vocabulary has one.
    pub fn pad_id(&self) -> Option<u32> {
        [PAD, "<pad>", "<|padding|>"].iter().find_map(|t| self.token_to_id(t))
    }
}

/// Writes `bytes` to a temporary name beside `path`, then renames it to `path`.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).map_err(|e| file_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        file_err(path, e)
    })
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::File { path: path.to_path_buf(), message: e.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn trained() -> &'static Tokenizer {
        static TOK: OnceLock<Tokenizer> = OnceLock::new();
        TOK.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("corpus.txt");
            let text = "Once upon a time, a little fox found a shiny stone.\n\nThe fox said: \"Look!\" <|endoftext|> Tom and Lily played in the park. ".repeat(200);
            std::fs::write(&path, text).unwrap();
            let opts = BpeOptions { vocab_size: 300, show_progress: false, ..Default::default() };
            Tokenizer::train_bpe(&[path], &opts).unwrap()
        })
    }

    #[test]
    fn trains_specials_first_and_saves_loadable_json() {
        let tok = trained();
        assert_eq!(tok.token_to_id(ENDOFTEXT), Some(0));
        assert_eq!(tok.pad_id(), Some(1));
        assert_eq!(tok.vocab_size(), 300);
        let ids = tok.encode("a little fox<|endoftext|>", false).unwrap();
        assert_eq!(*ids.last().unwrap(), 0);
        assert!(ids.len() < "a little fox".len());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        tok.save(&path).unwrap();
        let back = Tokenizer::from_file(&path).unwrap();
        assert_eq!(back.encode("the fox said", false).unwrap(), tok.encode("the fox said", false).unwrap());
        assert_eq!(back.first_vocab_difference(tok), None);
        let bytes = Tokenizer::bytes();
        let (id, a, b) = tok.first_vocab_difference(&bytes).unwrap();
        assert_eq!((a, b), (tok.id_to_token(id), bytes.id_to_token(id)));
    }

    #[test]
    fn errors_name_the_file_or_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, "{ not json").unwrap();
        let e = Tokenizer::from_file(&path).err().unwrap().to_string();
        assert!(e.contains("tokenizer.json") && e.contains("not a valid"), "{e}");
        let e = trained().decode(&[5, 100000], false).unwrap_err().to_string();
        assert!(e.contains("100000"), "{e}");
        let opts = BpeOptions { vocab_size: 10, ..Default::default() };
        let e = Tokenizer::train_bpe(&[path], &opts).err().unwrap();
        assert!(e.to_string().starts_with("`vocab_size` 10: too small"), "{e}");
        assert!(matches!(e, TokenizerError::Option { name: "vocab_size", .. }));
    }

    #[test]
    fn loads_a_real_mistral_tokenizer_when_present() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/tokenizers/mistral-7b-tokenizer.json");
        if !path.exists() {
            eprintln!("skipping: {} is not present", path.display());
            return;
        }
        let tok = Tokenizer::from_file(&path).unwrap();
        assert_eq!(tok.vocab_size(), 32000);
        assert_eq!(tok.eos_id(), Some(2));
        let ids = tok.encode("Hello world", false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap().trim_start(), "Hello world");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Byte-level BPE is lossless on arbitrary Unicode.
        #[test]
        fn decode_encode_round_trip(s in any::<String>()) {
            let tok = trained();
            let ids = tok.encode(&s, false).unwrap();
            prop_assert_eq!(tok.decode(&ids, false).unwrap(), s);
        }

        /// ... and on text made of the corpus' own pieces, where merges apply.
        #[test]
        fn round_trip_on_corpus_like_text(words in proptest::collection::vec(prop::sample::select(vec!["fox", " the", "\n\n", "<|endoftext|>", " Lily", "é", "  ", "!\""]), 0..20)) {
            let s: String = words.concat();
            let tok = trained();
            prop_assert_eq!(tok.decode(&tok.encode(&s, false).unwrap(), false).unwrap(), s);
        }
    }
}
