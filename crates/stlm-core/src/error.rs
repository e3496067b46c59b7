//! The error type of file and tensor IO, with the path it concerns, and the error of a job's
//! option value ([`OptionError`]), which names the options field, never a command-line flag.

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
    /// A config value that is not allowed.
    #[error("{0}")]
    Invalid(String),
    /// A value of a job's option that is not allowed.
    #[error("{0}")]
    Option(#[from] OptionError),
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

/// A value of a job's option (a field of an options struct such as `top_p`, `alpha`) that is not allowed.
///
/// Its Display names the field ("`top_p` 1.5: must be in (0, 1]"); a command line renders it
/// with [`OptionError::as_flag`] ("--top-p 1.5: must be in (0, 1]").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{name}`{}: {why}", value.as_ref().map(|v| format!(" {v}")).unwrap_or_default())]
pub struct OptionError {
    /// The options field, e.g. `top_p`: the command-line flag with `-` replaced by `_`.
    pub name: &'static str,
    /// The rejected value as the user wrote it, when there is one to show.
    pub value: Option<String>,
    /// Why the value is not allowed.
    pub why: String,
}

impl OptionError {
    /// The option `name` has the value `value`, not allowed because of `why`.
    pub fn new(name: &'static str, value: impl std::fmt::Display, why: impl Into<String>) -> Self {
        OptionError { name, value: Some(value.to_string()), why: why.into() }
    }

    /// The option `name` (whatever its value) is not allowed because of `why`.
    pub fn no_value(name: &'static str, why: impl Into<String>) -> Self {
        OptionError { name, value: None, why: why.into() }
    }

    /// The command-line form: "--top-p 1.5: must be in (0, 1]" (the name with `_` as `-`, after `--`).
    pub fn as_flag(&self) -> String {
        let flag = self.name.replace('_', "-");
        match &self.value {
            Some(v) => format!("--{flag} {v}: {}", self.why),
            None => format!("--{flag}: {}", self.why),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_error_names_the_field_and_renders_as_a_flag() {
        let e = OptionError::new("top_p", 1.5, "must be in (0, 1]");
        assert_eq!(e.to_string(), "`top_p` 1.5: must be in (0, 1]");
        assert_eq!(e.as_flag(), "--top-p 1.5: must be in (0, 1]");
        let e = OptionError::no_value("calib", "wanda scoring needs calibration text");
        assert_eq!(e.to_string(), "`calib`: wanda scoring needs calibration text");
        assert_eq!(e.as_flag(), "--calib: wanda scoring needs calibration text");
    }

    #[test]
    fn option_error_is_the_source_of_core_error() {
        use std::error::Error;
        let e = CoreError::from(OptionError::new("dtype", "f8", "expected float32"));
        assert_eq!(e.to_string(), "`dtype` f8: expected float32");
        let source = e.source().and_then(|s| s.downcast_ref::<OptionError>()).unwrap();
        assert_eq!(source.name, "dtype");
    }
}
