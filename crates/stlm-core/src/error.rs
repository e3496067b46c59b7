//! The error type of file and tensor IO, with the path it concerns.

use std::path::PathBuf;

/// Result alias for stlm-core.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;

/// Errors from reading and writing stlm files and from device choice.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A file exists but its content is malformed.
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    /// A command-line or config value that is not allowed.
    #[error("{0}")]
    Invalid(String),
    /// An error raised by libtorch.
    #[error("libtorch: {0}")]
    Tch(#[from] tch::TchError),
}

impl CoreError {
    /// An IO error for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CoreError::Io { path: path.into(), source }
    }
    /// A format error for `path`.
    pub fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        CoreError::Format { path: path.into(), message: message.into() }
    }
}
