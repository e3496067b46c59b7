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

pub mod checkpoint;
pub mod config;
pub mod optim;
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
}

/// Result alias for stlm-train.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;
