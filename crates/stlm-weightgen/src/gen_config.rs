//! A weight generator's settings and its `weightgen.json` (see [`crate::gen`]): normalisation,
//! the two stages' step counts and rates, progress, and how to sample. A leaf: it imports the
//! collection's manifest and the networks' configs, nothing that trains.

use crate::collection::Manifest;
use crate::denoiser::DenoiserConfig;
use crate::schedule::{BetaSchedule, NoiseSchedule};
use crate::vae::VaeConfig;
use crate::{Result, WeightgenError};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// How each layer's values are normalised before the VAE sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Normalize {
    /// By the layer's mean and standard deviation over all checkpoints (p-diff's way): the VAE
    /// models whole weights.
    Layer,
    /// Each value minus its mean over the checkpoints, divided by the layer's standard deviation
    /// of those differences: the VAE models how checkpoints differ from their average.
    Element,
}

/// Which noise schedule the diffusion stage uses (`schedule` in `weightgen.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Nichol & Dhariwal's cosine schedule.
    Cosine,
    /// Ho et al.'s linear betas, 1e-4 to 0.02.
    Linear,
}

/// Every setting of a generator; as `stlm weightgen train` takes them (defaults as
/// [`GenConfig::default`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct GenConfig {
    /// How layers are normalised: `layer` (by each layer's mean and deviation over the
    /// checkpoints, p-diff's) or `element` (each value minus its mean over the checkpoints).
    #[arg(long, value_enum, default_value = "layer")]
    pub normalize: Normalize,
    /// Values per chunk.
    #[arg(long, default_value_t = 256)]
    pub chunk: i64,
    /// VAE MLP width.
    #[arg(long, default_value_t = 512)]
    pub vae_hidden: i64,
    /// Latent values per chunk.
    #[arg(long, default_value_t = 64)]
    pub latent: i64,
    /// Standard deviation of p-diff's noise on the VAE's normalised inputs while training (p-diff: 0.001).
    #[arg(long, default_value_t = 0.001)]
    pub input_noise: f64,
    /// Standard deviation of p-diff's noise on the VAE's latents while training (p-diff: 0.1).
    #[arg(long, default_value_t = 0.1)]
    pub latent_noise: f64,
    /// Weight of the VAE's KL term.
    #[arg(skip = VaeConfig::default().kl_weight)]
    pub kl_weight: f64,
    /// The VAE's encoder and decoder see a learned embedding of each chunk's position (which
    /// layer, which part of it); `--vae-no-positions` gives p-diff's plain autoencoder, where
    /// every chunk is encoded alone.
    #[arg(long = "vae-no-positions", action = clap::ArgAction::SetFalse)]
    pub vae_positions: bool,
    /// VAE training steps.
    #[arg(long, default_value_t = 2000)]
    pub vae_steps: u64,
    /// Chunks per VAE step.
    #[arg(long, default_value_t = 512)]
    pub vae_batch: i64,
    /// VAE peak learning rate (cosine to a tenth).
    #[arg(long, default_value_t = 1e-3)]
    pub vae_lr: f64,
    /// Denoiser sizes.
    #[command(flatten)]
    pub denoiser: DenoiserConfig,
    /// Diffusion steps T.
    #[arg(long, default_value_t = 1000)]
    pub timesteps: usize,
    /// Noise schedule.
    #[arg(long, value_enum, default_value_t = ScheduleKind::Cosine)]
    pub schedule: ScheduleKind,
    /// Denoiser training steps.
    #[arg(long, default_value_t = 2000)]
    pub diffusion_steps: u64,
    /// Checkpoints per denoiser step.
    #[arg(long, default_value_t = 16)]
    pub diffusion_batch: i64,
    /// Denoiser peak learning rate (cosine to a tenth).
    #[arg(long, default_value_t = 1e-3)]
    pub diffusion_lr: f64,
    /// Seed of every draw.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Save the folder every this many steps (0: at the end of each stage only).
    #[arg(long, default_value_t = 500)]
    pub save_every: u64,
}

impl Default for GenConfig {
    fn default() -> Self {
        let v = VaeConfig::default();
        GenConfig {
            normalize: Normalize::Layer,
            chunk: v.chunk,
            vae_hidden: v.hidden,
            latent: v.latent,
            input_noise: v.input_noise,
            latent_noise: v.latent_noise,
            kl_weight: v.kl_weight,
            vae_positions: true,
            vae_steps: 2000,
            vae_batch: 512,
            vae_lr: 1e-3,
            denoiser: DenoiserConfig { hidden: 128, depth: 2 },
            timesteps: 1000,
            schedule: ScheduleKind::Cosine,
            diffusion_steps: 2000,
            diffusion_batch: 16,
            diffusion_lr: 1e-3,
            seed: 0,
            save_every: 500,
        }
    }
}

impl GenConfig {
    /// Checks ranges; errors name the setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(WeightgenError::Input(m));
        for (name, v) in [
            ("chunk", self.chunk),
            ("vae_hidden", self.vae_hidden),
            ("latent", self.latent),
            ("vae_batch", self.vae_batch),
            ("diffusion_batch", self.diffusion_batch),
            ("denoiser.hidden", self.denoiser.hidden),
        ] {
            if v < 1 {
                return bad(format!("{name} {v}: must be at least 1"));
            }
        }
        if self.denoiser.depth < 0 {
            return bad(format!("denoiser.depth {}: must not be negative", self.denoiser.depth));
        }
        for (name, v) in [("vae_lr", self.vae_lr), ("diffusion_lr", self.diffusion_lr)] {
            if !(v > 0.0 && v.is_finite()) {
                return bad(format!("{name} {v}: must be a positive number"));
            }
        }
        self.beta_schedule()?;
        Ok(())
    }

    pub(crate) fn vae(&self, positions: i64) -> VaeConfig {
        VaeConfig {
            chunk: self.chunk,
            hidden: self.vae_hidden,
            latent: self.latent,
            input_noise: self.input_noise,
            latent_noise: self.latent_noise,
            kl_weight: self.kl_weight,
            positions: if self.vae_positions { positions } else { 0 },
        }
    }

    pub(crate) fn beta_schedule(&self) -> Result<NoiseSchedule> {
        let kind = match self.schedule {
            ScheduleKind::Cosine => BetaSchedule::Cosine,
            ScheduleKind::Linear => BetaSchedule::Linear { start: 1e-4, end: 0.02 },
        };
        Ok(NoiseSchedule::new(kind, self.timesteps)?)
    }
}

/// How far training has gone, and what the diffusion stage learned about the latents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Progress {
    /// VAE steps done.
    pub vae_step: u64,
    /// Denoiser steps done.
    pub diffusion_step: u64,
    /// Mean of the training latents (set when the diffusion stage starts).
    pub latent_mean: Option<f64>,
    /// Standard deviation of the training latents.
    pub latent_std: Option<f64>,
    /// The VAE's reconstruction error (normalised units, mean square) on the training chunks,
    /// without noise, when the VAE stage ended.
    pub vae_reconstruction: Option<f64>,
    /// The last denoiser step's loss.
    pub diffusion_loss: Option<f64>,
}

/// The `weightgen.json` of a generator folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenFile {
    /// Settings.
    pub config: GenConfig,
    /// The collection it learned from (its path and manifest).
    pub collection: PathBuf,
    /// The collection's manifest (units, base model, checkpoints).
    pub manifest: Manifest,
    /// Training progress.
    pub progress: Progress,
}

/// How to sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampler {
    /// Ancestral DDPM over all T steps.
    Ddpm,
    /// Deterministic DDIM over this many evenly spaced steps.
    Ddim(usize),
}

impl Sampler {
    /// `ddpm` or `ddim`.
    pub fn name(self) -> &'static str {
        match self {
            Sampler::Ddpm => "ddpm",
            Sampler::Ddim(_) => "ddim",
        }
    }
}

