//! stlm-train: the pieces of the training loop.
//!
//! - [`optim`]: AdamW on tch tensors whose moments are saved in checkpoints (tch's `nn::AdamW`
//!   cannot export them), with decoupled weight decay kept off norms, biases and embeddings.
//! - [`schedule`]: warmup + cosine and warmup-stable-decay learning rates.
//! - [`checkpoint`]: atomic checkpoint folders, a `latest` pointer, keep-last-K, and recovery
//!   from incomplete or corrupt folders.
//! - [`trainer`]: the loop (gradient accumulation, clipping, validation, metrics.jsonl, a
//!   progress bar), driven by a [`trainer::BatchSource`] whose batches depend only on the step,
//!   so that a resumed run sees exactly the batches of an uninterrupted one.
//! - [`metrics`]: metrics.jsonl and position_loss.jsonl lines and the throughput window.
//! - [`config`]: the `[train]` table, the one description of the optimisation.
//! - [`run`]: run assembly: the run config with overrides, and `prepare` (tokenizer, shards,
//!   batches, run directory, model) shared by every command that trains.

pub mod checkpoint;
pub mod config;
pub mod metrics;
pub mod optim;
pub mod run;
pub mod schedule;
pub mod trainer;

use std::path::PathBuf;

/// Errors of training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// File IO or format errors.
    #[error(transparent)]
    Core(#[from] stlm_core::CoreError),
    /// Model errors.
    #[error(transparent)]
    Model(#[from] stlm_model::ModelError),
    /// Corpus reading and tokenization errors.
    #[error(transparent)]
    Data(#[from] stlm_data::DataError),
    /// Tokenizer errors.
    #[error(transparent)]
    Tokenizer(#[from] stlm_tokenizers::TokenizerError),
    /// A run stopped (by its stop flag) before its last step; its checkpoint is written.
    #[error("stopped at step {step}; the checkpoint in {} is written", dir.display())]
    Stopped { step: u64, dir: PathBuf },
    /// A training setting out of range; names the field.
    #[error("{0}")]
    Config(String),
    /// The loss became NaN or infinite.
    #[error("step {step}: the loss is {loss} (not finite); stopped, the last good checkpoint is kept")]
    NonFinite { step: u64, loss: f64 },
    /// No usable checkpoint to resume from.
    #[error("{0}: no complete checkpoint to resume from")]
    NothingToResume(PathBuf),
    /// An error raised by libtorch.
    #[error("libtorch: {0}")]
    Tch(#[from] tch::TchError),
    /// A distributed collective failed (a rank died, the store is unreachable, a timeout) or
    /// the ranks disagree.
    #[error(transparent)]
    Dist(#[from] stlm_dist::DistError),
}

/// Result alias for stlm-train.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;
