//! stlm-distill: teacher-student distillation of stlm models.
//!
//! - [`loss`]: logit losses (forward/reverse KL, Jensen-Shannon, total variation, skew KLs) at a
//!   temperature, over the whole vocabulary or the teacher's top k plus a rest bucket.
//! - [`init`]: a student's first weights from its teacher (every k-th block, leading dimensions).
//! - [`distiller`]: the objective as a model the stlm-train loop trains (teacher live or cached,
//!   hidden-state MSE with learned projections, attention-map KL).
//! - [`cache`]: the teacher's top-k distributions over a corpus, stored for many students.
//! - [`align`]: distillation across tokenizers through next-byte distributions at positions where
//!   both tokenizations end at the same byte.
//! - [`run`]: a distillation run assembled from its options and trained with the stlm-train
//!   loop, and the writing of a teacher cache.

pub mod align;
pub mod cache;
pub mod distiller;
pub mod init;
pub mod loss;
pub mod run;

pub use align::ByteAlignment;
pub use cache::{CacheHeader, CacheWriter, TeacherCache};
pub use distiller::{Distiller, FeatureLoss, Teacher};
pub use init::{copy_from_teacher, LayerChoice};
pub use loss::{Divergence, LogitLoss, TeacherTargets};

/// Errors of distillation.
#[derive(Debug, thiserror::Error)]
pub enum DistillError {
    /// Bad input (or options that do not fit the models); names what is at fault.
    #[error("{0}")]
    Input(String),
    /// An option value that is not allowed.
    #[error("{0}")]
    Option(#[from] stlm_core::OptionError),
    /// File IO or format errors.
    #[error(transparent)]
    Core(#[from] stlm_core::CoreError),
    /// An error raised by the model.
    #[error(transparent)]
    Model(#[from] stlm_model::ModelError),
    /// Tokenizer errors.
    #[error(transparent)]
    Tokenizer(#[from] stlm_tokenizers::TokenizerError),
    /// Run assembly errors (config, data, run directory).
    #[error(transparent)]
    Train(#[from] stlm_train::TrainError),
    /// A distributed collective failed or the ranks disagree.
    #[error(transparent)]
    Dist(#[from] stlm_dist::DistError),
}

/// Result alias for stlm-distill.
pub type Result<T, E = DistillError> = std::result::Result<T, E>;

#[cfg(test)]
pub(crate) mod tests {
    /// Tests that seed and draw from libtorch's global generator hold this.
    pub static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
}
