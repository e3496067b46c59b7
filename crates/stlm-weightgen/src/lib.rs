//! stlm-weightgen: generating layer weights with a diffusion model (issue 21), after p-diff
//! (Wang et al. 2024) and the layer-conditional latent diffusion behind
//! DeepAutoAI/Explore_Llama-3.1-8B-Inst, with the baselines that keep it honest.
//!
//! The pipeline, top-down (the `stlm weightgen` commands):
//! 1. [`collect`]: the selected layers' weights of many checkpoints into a [`Collection`]
//!    (p-diff's continued training of the chosen layers with the rest frozen; other runs'
//!    checkpoints: fine-tunes, seeds).
//! 2. [`gen`]: a VAE over normalised, chunked layer parameters ([`vae`]) and a DDPM over its
//!    latents ([`schedule`], [`denoiser`]: conditioned on layer index, layer type and position),
//!    trained with exact resume; sampling new weights.
//! 3. [`compare`]: candidates (the original, diffusion samples, matched Gaussian noise, the
//!    uniform soup, training checkpoints) selected on a validation split and reported on a
//!    separate test split, each with its distance to the nearest training weights.
//! 4. [`experiment`]: the jobs over a trained generator: samples written as model directories,
//!    and the comparison of every family with each family's choice.

pub mod collect;
pub mod collection;
pub mod compare;
pub mod denoiser;
pub mod experiment;
pub mod gen;
pub mod gen_config;
pub mod schedule;
pub mod select;
pub mod vae;

pub use collection::{CheckpointInfo, Collection, Manifest, Unit};
pub use denoiser::{Denoiser, DenoiserConfig, Layout};
pub use gen::{GenConfig, Normalize, Sampler, ScheduleKind, WeightGen};
pub use schedule::{BetaSchedule, NoiseSchedule, ScheduleError};
pub use select::LayerSelector;
pub use vae::{chunk, unchunk, Chunked, ParamVae, VaeConfig, VaeLosses};

/// Errors of weight generation; each names the file, option or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum WeightgenError {
    /// Bad input: a spec, a file's content, a shape.
    #[error("{0}")]
    Input(String),
    /// File IO and format errors.
    #[error(transparent)]
    Core(#[from] stlm_core::CoreError),
    /// A job option that is not allowed (its source, so the command line names its flag).
    #[error("{0}")]
    Option(#[from] stlm_core::OptionError),
    /// Model loading and saving.
    #[error(transparent)]
    Model(#[from] stlm_model::ModelError),
    /// Training steps (continued training).
    #[error(transparent)]
    Train(#[from] stlm_train::TrainError),
    /// Evaluation.
    #[error(transparent)]
    Eval(#[from] stlm_eval::EvalError),
    /// A diffusion schedule setting.
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    /// An error raised by libtorch.
    #[error("libtorch: {0}")]
    Tch(#[from] tch::TchError),
}

/// Result alias for stlm-weightgen.
pub type Result<T, E = WeightgenError> = std::result::Result<T, E>;

/// Tests that draw from libtorch's global RNG hold this, so that tests running in parallel
/// threads cannot interleave their draws (exact-resume and same-seed checks depend on it).
#[cfg(test)]
pub(crate) fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
