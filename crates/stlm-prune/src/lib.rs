//! stlm-prune: pruning of stlm models.
//!
//! - [`mask`]: which weights go: a fraction or N:M pattern within a row, a matrix or all matrices.
//! - [`sparsegpt`]: SparseGPT's OBS reconstruction of one layer from its calibration Hessian.
//! - [`unstructured`]: magnitude, Wanda and SparseGPT over a model's linear layers, calibrated
//!   block by block.
//! - [`structured`]: whole heads, neurons, experts or blocks removed; the model rebuilt smaller.
//! - [`report`]: sparsity per matrix and overall, parameters, perplexity before/after, time.

pub mod mask;
pub mod options;
pub mod pipeline;
pub mod report;
pub mod sparsegpt;
pub mod structured;
pub mod unstructured;

pub use stlm_model::calibration::calibration_windows;
pub use mask::{Pattern, Scope};
pub use report::{Perplexity, PruneReport, TargetReport};
pub use sparsegpt::SparseGptOptions;
pub use structured::{prune_structured, Importance, StructuredOptions, StructuredReport, Unit};
pub use unstructured::{prune, Method, PruneOptions};

/// Errors of pruning.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    /// Bad input (or options that do not fit the model).
    #[error("{0}")]
    Input(String),
    /// An option value that is not allowed.
    #[error("{0}")]
    Option(#[from] stlm_core::OptionError),
    /// A numerical failure (a Hessian that is not positive definite).
    #[error("{0}")]
    Numerical(String),
    /// An error raised by the model.
    #[error(transparent)]
    Model(#[from] stlm_model::ModelError),
    /// A file that could not be written or read.
    #[error(transparent)]
    Core(#[from] stlm_core::CoreError),
    /// Scoring the validation text failed.
    #[error(transparent)]
    Eval(#[from] stlm_eval::EvalError),
    /// A fine-tuning stage of the cubic schedule failed.
    #[error("fine-tuning stage {stage}: {source}")]
    FineTune {
        /// The stage (from 1).
        stage: u32,
        /// What training reported.
        #[source]
        source: stlm_train::TrainError,
    },
}

/// Refuses a model whose blocks share weights: a tied weight serves several layers, whose
/// inputs and importance a per-layer prune does not combine.
fn refuse_shared_layers(config: &stlm_model::ModelConfig) -> Result<()> {
    if config.shares_layers() {
        return Err(PruneError::Input("pruning a model with shared layers (`layer_sharing`) is not supported".into()));
    }
    Ok(())
}

/// Result alias for stlm-prune.
pub type Result<T, E = PruneError> = std::result::Result<T, E>;

#[cfg(test)]
pub(crate) mod tests {
    /// Tests that seed and draw from libtorch's global generator hold this.
    pub static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
}
