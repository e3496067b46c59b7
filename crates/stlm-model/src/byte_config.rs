//! The byte path's settings (`bytes = { ... }` in a model config, see [`crate::bytes`]). A leaf:
//! it imports nothing else of the crate.

use serde::{Deserialize, Serialize};
use stlm_tokenizers::ChunkerKind;

/// Output classes: the 256 bytes, `<|endoftext|>` (256), `<|pad|>` (257, never a target) and
/// end-of-chunk (258).
pub const BYTE_CLASSES: i64 = 259;
/// The end-of-chunk class.
pub const EOC: i64 = 258;
fn four() -> i64 {
    4
}

/// How a chunk's byte states become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The mean over the chunk's real bytes (padding excluded).
    #[default]
    Mean,
    /// Softmax attention of a learned query over the chunk's real bytes.
    Attention,
}

/// How the next chunk's bytes are predicted from the global state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ByteDecoder {
    /// A small causal byte decoder conditioned on the global state: byte `i` of a chunk sees
    /// the chunk's bytes before it (an exact factorisation of the chunk's likelihood).
    #[default]
    Autoregressive,
    /// All `max_len` slots of the chunk at once from the global state (the STLM reference).
    Parallel,
}

/// The byte path of a byte-pooled model (`bytes = { ... }` in the model config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BytesConfig {
    /// How bytes are grouped into chunks (its `max_len` is the chunk width `L`).
    pub chunker: ChunkerKind,
    /// Width of the byte encoder and decoder.
    pub local_hidden_size: i64,
    /// Heads of the byte encoder and decoder.
    pub local_heads: i64,
    /// MLP width of the byte encoder and decoder blocks.
    pub local_intermediate_size: i64,
    /// Bidirectional byte encoder blocks (the reference: 4).
    #[serde(default = "four")]
    pub encoder_layers: i64,
    /// Byte decoder blocks.
    #[serde(default = "four")]
    pub decoder_layers: i64,
    /// `mean` (default) or `attention`.
    #[serde(default)]
    pub pooling: Pooling,
    /// `autoregressive` (default) or `parallel`.
    #[serde(default)]
    pub decoder: ByteDecoder,
    /// Weight of an auxiliary loss reconstructing each chunk's bytes from its pooled vector
    /// (0: off).
    #[serde(default)]
    pub reconstruction_loss: f64,
}

impl BytesConfig {
    /// Chunk width `L`.
    pub fn max_len(&self) -> i64 {
        self.chunker.max_len() as i64
    }

    /// Checks the settings (how they fit the rest of the model is [`crate::ModelConfig::validate`]'s
    /// business); the error names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.chunker.validate().map_err(|e| format!("`chunker` ({}): {e}", self.chunker.name()))?;
        for (name, v) in [
            ("local_hidden_size", self.local_hidden_size),
            ("local_heads", self.local_heads),
            ("local_intermediate_size", self.local_intermediate_size),
        ] {
            if v < 1 {
                return Err(format!("`{name}` must be at least 1, got {v}"));
            }
        }
        if self.local_hidden_size % self.local_heads != 0 {
            return Err(format!("`local_hidden_size` ({}) must be a multiple of `local_heads` ({})", self.local_hidden_size, self.local_heads));
        }
        if self.encoder_layers < 0 || self.decoder_layers < 0 {
            return Err("`encoder_layers` and `decoder_layers` must be at least 0".into());
        }
        if !(self.reconstruction_loss >= 0.0 && self.reconstruction_loss.is_finite()) {
            return Err(format!("`reconstruction_loss` must be >= 0, got {}", self.reconstruction_loss));
        }
        Ok(())
    }
}

