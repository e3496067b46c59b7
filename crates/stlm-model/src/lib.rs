//! stlm-model: decoder-only language models assembled from one config.
//!
//! - [`config`]: `ModelConfig` and its presets (Llama, GPT-2) as TOML.
//! - [`layers`]: the building blocks (linear, norm, attention, MLP, decoder block); [`weight`]:
//!   how a linear layer stores its weight; [`layer_walk`] and [`shrink`]: their walk and the copy
//!   of kept units into a smaller block.
//! - [`model`]: `DecoderModel`, its forward pass and KV cache.
//! - [`hf`] and [`io`]: Hugging Face `config.json` and weight names; model directories.
//! - [`generate`]: sampling and batched generation; [`decode`]: the fused batch-1 CPU step it uses;
//!   [`samples`]: texts sampled from either kind of model.
//! - [`llama2c`]: llama2.c checkpoints (versions 0, 1, 2) in and out.
//! - [`linears`]: the linear layers with what each computes, for rewriting weights in place.
//! - [`quantized`]: model directories with block-quantized linear layers.
//! - [`sharing`], [`shapes`], [`dynamic`]: shared layers, per-layer shapes, dynamic depth.

pub mod byte_config;
pub mod bytes;
pub mod calibration;
pub mod config;
pub mod decode;
pub mod depth;
pub mod dynamic;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod hf;
pub mod inspect;
pub mod io;
pub mod layer_walk;
pub mod layers;
pub mod llama2c;
pub mod linears;
pub mod lm;
pub mod lora;
pub mod model;
pub mod quantized;
pub mod shapes;
pub mod sharing;
pub mod samples;
pub mod shrink;
pub mod weight;

pub use bytes::{BytePooledModel, BytesConfig, ByteDecoder, ChunkGrid, Pooling};
pub use decode::FastDecoder;
pub use dynamic::{check_self_speculative, early_exit_logits, generate_early_exit, generate_self_speculative, Depth, DepthReport, EarlyExit, ExitMeasure, LayerSkip, LayerSkipModel};
pub use lm::{load_any_model, AnyModel, Batch, Extras, LanguageModel, StepOutput, StepStats};
pub use stlm_core::Mode;
pub use config::{Activation, MlpKind, ModelConfig, ModelType, NormKind, PositionKind};
pub use error::{ModelError, Result};
pub use generate::{generate, GenerationConfig};
pub use io::{load_config, load_model, tokenizer_path, PRUNING_FILE};
pub use model::{Applied, BlockPass, DecoderModel, ResidualStream};
pub use shapes::{ContextPattern, Diamond, LayerShape, LayerShapes, ResidualRoot, RootMix};
pub use sharing::{LayerSharing, ShareScheme};
pub use weight::Weight;
