//! Errors of model building, loading and saving.

use std::path::PathBuf;

/// Result alias for stlm-model.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// What can go wrong building, loading, saving or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// File IO or format error from stlm-core.
    #[error(transparent)]
    Core(#[from] stlm_core::CoreError),
    /// A config value that is out of range or inconsistent; names the file and field.
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    /// A config that is valid but has no stlm implementation (yet).
    #[error("{path}: {message}")]
    Unsupported { path: PathBuf, message: String },
    /// Weights that do not match the config.
    #[error("{path}: {message}")]
    Weights { path: PathBuf, message: String },
    /// Bad input to a forward pass or generation (token ids, prompts).
    #[error("{0}")]
    Input(String),
    /// A generation option value that is not allowed.
    #[error("{0}")]
    Option(#[from] stlm_core::OptionError),
    /// An error raised by libtorch.
    #[error("libtorch: {0}")]
    Tch(#[from] tch::TchError),
}

impl ModelError {
    /// A config error naming `path`.
    pub fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        ModelError::Config { path: path.into(), message: message.into() }
    }
}
