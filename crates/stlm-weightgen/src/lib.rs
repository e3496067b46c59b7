//! stlm-weightgen: generating layer weights with a diffusion model (issue 21).
//!
//! This first part: [`schedule`], DDPM's forward process, its reverse (ancestral) step and the
//! deterministic DDIM step, proved against float64 computations of the equations; and [`vae`], the
//! VAE over normalised, chunked layer parameters with p-diff's input and latent noise. The
//! collection of training checkpoints, the latent diffusion model, sampling model directories,
//! the CLI and the baselines come next (see the issue).

pub mod schedule;
pub mod vae;

pub use schedule::{BetaSchedule, NoiseSchedule, ScheduleError};
pub use vae::{chunk, unchunk, Chunked, ParamVae, VaeConfig, VaeLosses};
