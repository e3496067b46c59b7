//! The weight generator: normalisation of each selected layer, the [`ParamVae`] over its chunks,
//! and a DDPM over the VAE's latents with the [`Denoiser`]; trained in two stages (VAE, then
//! diffusion) with exact resume, saved as a folder of safetensors, and sampled into new weights.
//!
//! Folder (`stlm weightgen train --out DIR`): `weightgen.json` (settings, the collection's
//! manifest, progress, latent statistics), `normalization.safetensors`, `vae.safetensors`,
//! `diffusion.safetensors` and `optimizer.safetensors` (the current stage's AdamW moments). The
//! whole folder is written under a temporary name and swapped in, so an interrupted save leaves
//! the previous one.
//!
//! Every training step reseeds the RNG from (seed, stage, step), so a resumed run draws the same
//! batches, noise and diffusion steps as an uninterrupted one and ends with the same weights.

use crate::collect::{bar, tick};
use crate::collection::Collection;
use crate::denoiser::{Denoiser, Layout};
use crate::schedule::NoiseSchedule;
use crate::vae::ParamVae;
use crate::{Result, WeightgenError};
use std::path::Path;
use stlm_core::{atomic_write_bytes, read_json, read_safetensors, write_safetensors, CoreError, OptionError};
use stlm_train::optim::{AdamW, AdamWConfig};
use tch::nn;
use tch::{Device, Kind, Tensor};

pub use crate::gen_config::{GenConfig, GenFile, Normalize, Progress, Sampler, ScheduleKind};

/// The two training stages (their number seeds the RNG).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Vae = 1,
    Diffusion = 2,
}

impl Stage {
    /// Steps of this stage done so far.
    fn step(self, p: &Progress) -> u64 {
        match self {
            Stage::Vae => p.vae_step,
            Stage::Diffusion => p.diffusion_step,
        }
    }
}

/// A generator: its settings, layout, normalisation, VAE and denoiser.
pub struct WeightGen {
    /// What the folder's `weightgen.json` says.
    pub file: GenFile,
    layout: Layout,
    schedule: NoiseSchedule,
    /// Per unit: the mean subtracted (`[1]` or `[numel]`) and the scale divided by.
    norm_mean: Vec<Tensor>,
    norm_std: Vec<f64>,
    vae_vs: nn::VarStore,
    vae: ParamVae,
    den_vs: nn::VarStore,
    den: Denoiser,
}

const FILE: &str = "weightgen.json";

impl WeightGen {
    /// A new generator for `collection` (at `collection_dir`), its normalisation computed from
    /// the collection, networks initialised from `config.seed`.
    pub fn new(collection: &Collection, collection_dir: &Path, config: GenConfig, device: Device) -> Result<Self> {
        config.validate()?;
        let (norm_mean, norm_std) = normalisation(collection, config.normalize);
        let progress = Progress {
            vae_step: 0,
            diffusion_step: 0,
            latent_mean: None,
            latent_std: None,
            vae_reconstruction: None,
            diffusion_loss: None,
        };
        let file = GenFile {
            config,
            collection: collection_dir.to_path_buf(),
            manifest: collection.manifest.clone(),
            progress,
        };
        Self::build(file, norm_mean, norm_std, device)
    }

    fn build(file: GenFile, norm_mean: Vec<Tensor>, norm_std: Vec<f64>, device: Device) -> Result<Self> {
        let c = &file.config;
        let layout = Layout::new(&file.manifest.units, c.chunk);
        let schedule = c.beta_schedule()?;
        tch::manual_seed(c.seed as i64);
        let vae_vs = nn::VarStore::new(device);
        let vae = ParamVae::new(&vae_vs.root(), c.vae(layout.total()));
        let den_vs = nn::VarStore::new(device);
        let den = Denoiser::new(&den_vs.root(), &layout, c.latent, c.denoiser);
        Ok(WeightGen { file, layout, schedule, norm_mean, norm_std, vae_vs, vae, den_vs, den })
    }

    /// Loads a generator folder.
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        if !dir.join(FILE).is_file() {
            return Err(WeightgenError::Input(format!(
                "{}: no {FILE}: not a generator folder (made by `stlm weightgen train`)",
                dir.display()
            )));
        }
        let file: GenFile = read_json(&dir.join(FILE))?;
        file.config.validate().map_err(|e| WeightgenError::Input(format!("{}: {e}", dir.join(FILE).display())))?;
        let norm = read_safetensors(&dir.join("normalization.safetensors"))?;
        let units = file.manifest.units.len();
        let mut norm_mean = Vec::with_capacity(units);
        let std_t = norm.get("std").ok_or_else(|| {
            WeightgenError::Input(format!("{}: normalization.safetensors lacks `std`", dir.display()))
        })?;
        let norm_std: Vec<f64> = Vec::<f64>::try_from(std_t.to_kind(Kind::Double))?;
        for i in 0..units {
            let m = norm.get(&format!("mean.{i}")).ok_or_else(|| {
                WeightgenError::Input(format!("{}: normalization.safetensors lacks `mean.{i}`", dir.display()))
            })?;
            norm_mean.push(m.shallow_clone());
        }
        if norm_std.len() != units {
            return Err(WeightgenError::Input(format!(
                "{}: {} scales for {units} units",
                dir.display(),
                norm_std.len()
            )));
        }
        let g = Self::build(file, norm_mean, norm_std, device)?;
        load_vars(&g.vae_vs, &dir.join("vae.safetensors"))?;
        load_vars(&g.den_vs, &dir.join("diffusion.safetensors"))?;
        Ok(g)
    }

    /// Writes the folder `dir` (with the current stage's optimizer moments), swapping it in whole.
    fn save(&self, dir: &Path, opt: Option<&AdamW>) -> Result<()> {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "weightgen".into());
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| CoreError::io(parent, e))?;
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| CoreError::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| CoreError::io(&tmp, e))?;
        let mut norm: Vec<(String, Tensor)> =
            self.norm_mean.iter().enumerate().map(|(i, m)| (format!("mean.{i}"), m.shallow_clone())).collect();
        norm.push(("std".into(), Tensor::from_slice(&self.norm_std)));
        write_safetensors(&tmp.join("normalization.safetensors"), &norm)?;
        write_safetensors(&tmp.join("vae.safetensors"), &named(&self.vae_vs))?;
        write_safetensors(&tmp.join("diffusion.safetensors"), &named(&self.den_vs))?;
        if let Some(opt) = opt {
            write_safetensors(&tmp.join("optimizer.safetensors"), &opt.state_tensors())?;
        }
        let json = serde_json::to_vec_pretty(&self.file).expect("generator file serializes");
        atomic_write_bytes(&tmp.join(FILE), &json)?;
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        if dir.exists() {
            std::fs::rename(dir, &old).map_err(|e| CoreError::io(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| CoreError::io(dir, e))?;
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| CoreError::io(&old, e))?;
        }
        Ok(())
    }

    /// The chunk layout of a checkpoint.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Every checkpoint of `collection` normalised and chunked: `[K, N, chunk]`.
    pub fn chunks(&self, collection: &Collection) -> Tensor {
        let per_unit: Vec<Tensor> = collection
            .weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let k = w.size()[0];
                let x = (w - &self.norm_mean[i]) / self.norm_std[i];
                let c = self.layout.chunks[i];
                let pad = c * self.layout.chunk - w.size()[1];
                Tensor::cat(&[x, Tensor::zeros([k, pad], (Kind::Float, Device::Cpu))], 1).view([
                    k,
                    c,
                    self.layout.chunk,
                ])
            })
            .collect();
        Tensor::cat(&per_unit, 1)
    }

    /// Chunks `[n, N, chunk]` (normalised) back to weights: per sample, per unit (unit shapes).
    pub fn unchunk(&self, chunks: &Tensor) -> Vec<Vec<Tensor>> {
        let chunks = chunks.to_device(Device::Cpu);
        let n = chunks.size()[0];
        let mut start = 0;
        let mut per_unit = Vec::new();
        for (i, u) in self.file.manifest.units.iter().enumerate() {
            let c = self.layout.chunks[i];
            let flat = chunks.narrow(1, start, c).reshape([n, -1]).narrow(1, 0, u.numel());
            per_unit.push(flat * self.norm_std[i] + &self.norm_mean[i]);
            start += c;
        }
        (0..n)
            .map(|s| {
                per_unit
                    .iter()
                    .zip(&self.file.manifest.units)
                    .map(|(w, u)| w.get(s).view(u.shape.as_slice()).copy())
                    .collect()
            })
            .collect()
    }

    /// Trains (or continues to train) both stages on `collection`, saving into `dir` every
    /// `save_every` steps and at the end of each stage. `stop` is polled after each step: when
    /// it returns true the folder is saved and training returns `Ok(false)`.
    pub fn train(
        &mut self,
        collection: &Collection,
        dir: &Path,
        progress: bool,
        stop: &dyn Fn() -> bool,
    ) -> Result<bool> {
        if collection.manifest.units != self.file.manifest.units {
            return Err(WeightgenError::Input(format!(
                "{}: the collection's layers differ from the generator's",
                self.file.collection.display()
            )));
        }
        let device = self.vae_vs.device();
        let c = self.file.config.clone();
        let data = self.chunks(collection); // [K, N, chunk]
        let (k, n) = (data.size()[0], data.size()[1]);
        let flat = data.view([k * n, c.chunk]).to_device(device);
        // Stage 1: the VAE.
        let vae_step = |g: &Self| {
            let idx = Tensor::randint(k * n, [c.vae_batch.min(k * n)], (Kind::Int64, device));
            let (loss, l) = g.vae.loss(&flat.index_select(0, &idx), Some(&idx.remainder(n)));
            (loss, l.reconstruction, format!("reconstruction {:.5} KL {:.3}", l.reconstruction, l.kl))
        };
        if !self.run_stage(Stage::Vae, dir, progress, stop, vae_step)? {
            return Ok(false);
        }
        if self.file.progress.vae_reconstruction.is_none() {
            self.file.progress.vae_reconstruction = Some(self.reconstruction_error(&flat));
        }
        // Stage 2: the denoiser on standardised latents.
        let latents = self.latents(&flat, k, n);
        let (mean, std) = (latents.mean(Kind::Float).double_value(&[]), latents.std(true).double_value(&[]).max(1e-8));
        self.file.progress.latent_mean = Some(mean);
        self.file.progress.latent_std = Some(std);
        let x0_all = (latents - mean) / std;
        let abar: Vec<f64> = (0..self.schedule.steps()).map(|t| self.schedule.alpha_bar(t as isize)).collect();
        let abar = Tensor::from_slice(&abar).to_kind(Kind::Float).to_device(device);
        let diffusion_step = |g: &Self| {
            let b = c.diffusion_batch;
            let idx = Tensor::randint(k, [b], (Kind::Int64, device));
            let t = Tensor::randint(g.schedule.steps() as i64, [b], (Kind::Int64, device));
            let x0 = x0_all.index_select(0, &idx);
            let eps = x0.randn_like();
            let a = abar.index_select(0, &t).view([b, 1, 1]);
            let xt = &x0 * a.sqrt() + &eps * (a.ones_like() - &a).sqrt();
            let loss = (g.den.forward(&xt, &t) - &eps).square().mean(Kind::Float);
            let value = loss.double_value(&[]);
            (loss, value, format!("loss {value:.4}"))
        };
        let already_done = self.file.progress.diffusion_step >= c.diffusion_steps;
        if !self.run_stage(Stage::Diffusion, dir, progress, stop, diffusion_step)? {
            return Ok(false);
        }
        if already_done {
            // Nothing trained: still record the latent statistics in the folder.
            self.save(dir, None)?;
        }
        Ok(true)
    }

    /// Runs `stage` from its saved step to its configured length: per step, the RNG reseeded
    /// from (seed, stage, step), `step_loss` (the loss, its value and a progress message), backward, AdamW
    /// at the stage's cosine learning rate; the folder saved every `save_every` steps, at the end
    /// (without optimizer moments: the next stage starts fresh) and when `stop` says so (then
    /// `Ok(false)`).
    fn run_stage(
        &mut self,
        stage: Stage,
        dir: &Path,
        progress: bool,
        stop: &dyn Fn() -> bool,
        step_loss: impl Fn(&Self) -> (Tensor, f64, String),
    ) -> Result<bool> {
        let c = self.file.config.clone();
        let (total, lr, name) = match stage {
            Stage::Vae => (c.vae_steps, c.vae_lr, "VAE steps"),
            Stage::Diffusion => (c.diffusion_steps, c.diffusion_lr, "diffusion steps"),
        };
        if stage.step(&self.file.progress) >= total {
            return Ok(true);
        }
        let vs = match stage {
            Stage::Vae => &self.vae_vs,
            Stage::Diffusion => &self.den_vs,
        };
        // The generator's own networks train without weight decay (see `adam`): roles by shape.
        let role = |t: &Tensor| if t.dim() >= 2 { stlm_core::Role::Matrix } else { stlm_core::Role::Bias };
        let params = named(vs).into_iter().map(|(name, tensor)| stlm_core::Parameter { role: role(&tensor), name, tensor });
        let mut opt = AdamW::new(params, adam());
        self.resume_optimizer(&mut opt, dir, stage.step(&self.file.progress))?;
        let bar = bar(total, progress, name);
        bar.set_position(stage.step(&self.file.progress));
        while stage.step(&self.file.progress) < total {
            let step = stage.step(&self.file.progress);
            reseed(c.seed, stage as u64, step);
            let (loss, value, message) = step_loss(self);
            loss.backward();
            opt.step(cosine_lr(lr, step, total));
            opt.zero_grad();
            let done = step + 1 == total;
            match stage {
                Stage::Vae => self.file.progress.vae_step += 1,
                Stage::Diffusion => {
                    self.file.progress.diffusion_step += 1;
                    self.file.progress.diffusion_loss = Some(value);
                }
            }
            tick(&bar, message);
            let stopping = !done && stop();
            if done || stopping || (c.save_every > 0 && (step + 1).is_multiple_of(c.save_every)) {
                self.save(dir, (!done).then_some(&opt))?;
            }
            if stopping {
                bar.abandon();
                return Ok(false);
            }
        }
        bar.finish_and_clear();
        Ok(true)
    }

    fn resume_optimizer(&self, opt: &mut AdamW, dir: &Path, step: u64) -> Result<()> {
        let path = dir.join("optimizer.safetensors");
        if step > 0 && path.is_file() {
            opt.load_state(&read_safetensors(&path)?, step)?;
        }
        Ok(())
    }

    /// The position in the checkpoint of each of `rows` consecutive chunks `[rows]` (int64).
    fn positions(&self, rows: i64) -> Tensor {
        Tensor::arange(rows, (Kind::Int64, self.vae_vs.device())).remainder(self.layout.total())
    }

    /// Mean squared error (normalised units) of encoding and decoding `flat` chunks, no noise.
    fn reconstruction_error(&self, flat: &Tensor) -> f64 {
        let _guard = tch::no_grad_guard();
        let pos = self.positions(flat.size()[0]);
        (self.vae.decode(&self.vae.encode(flat, Some(&pos)), Some(&pos)) - flat)
            .square()
            .mean(Kind::Float)
            .double_value(&[])
    }

    /// The VAE's latent means of every chunk: `[K, N, latent]`.
    fn latents(&self, flat: &Tensor, k: i64, n: i64) -> Tensor {
        let _guard = tch::no_grad_guard();
        self.vae.encode(flat, Some(&self.positions(k * n))).view([k, n, self.file.config.latent])
    }

    /// Encodes and decodes checkpoint chunks `[K, N, chunk]` (no noise): the VAE's reconstruction.
    pub fn reconstruct(&self, chunks: &Tensor) -> Tensor {
        let _guard = tch::no_grad_guard();
        let s = chunks.size();
        let flat = chunks.to_device(self.vae_vs.device()).view([-1, s[2]]);
        let pos = self.positions(flat.size()[0]);
        self.vae.decode(&self.vae.encode(&flat, Some(&pos)), Some(&pos)).view(s.as_slice())
    }

    /// `n` new sets of weights (per sample, per unit) drawn with `sampler` from `seed`.
    pub fn sample(&self, n: i64, sampler: Sampler, seed: u64) -> Result<Vec<Vec<Tensor>>> {
        let p = &self.file.progress;
        let (Some(mean), Some(std)) = (p.latent_mean, p.latent_std) else {
            return Err(WeightgenError::Input(
                "the generator's diffusion stage has not started: train it first".into(),
            ));
        };
        if p.diffusion_step < self.file.config.diffusion_steps {
            eprintln!(
                "warning: sampling a generator trained {} of {} diffusion steps",
                p.diffusion_step, self.file.config.diffusion_steps
            );
        }
        let _guard = tch::no_grad_guard();
        let device = self.den_vs.device();
        tch::manual_seed(seed as i64);
        let shape = [n, self.layout.total(), self.file.config.latent];
        let mut x = Tensor::randn(shape, (Kind::Float, device));
        let steps = self.schedule.steps();
        let ts: Vec<usize> = match sampler {
            Sampler::Ddpm => (0..steps).rev().collect(),
            Sampler::Ddim(k) => {
                let k = k.clamp(1, steps);
                let mut v: Vec<usize> = (0..k)
                    .map(|i| ((i as f64 + 0.5) * steps as f64 / k as f64) as usize)
                    .map(|t| t.min(steps - 1))
                    .collect();
                v.dedup();
                v.reverse();
                v
            }
        };
        for (i, &t) in ts.iter().enumerate() {
            let tt = Tensor::full([n], t as i64, (Kind::Int64, device));
            let eps = self.den.forward(&x, &tt);
            x = match sampler {
                Sampler::Ddpm => self.schedule.ddpm_step(&x, t, &eps, &x.randn_like())?,
                Sampler::Ddim(_) => self.schedule.ddim_step(&x, t, ts.get(i + 1).copied(), &eps)?,
            };
        }
        let latents = (x * std + mean).view([-1, self.file.config.latent]);
        let chunks = self.vae.decode(&latents, Some(&self.positions(n * self.layout.total()))).view([
            n,
            self.layout.total(),
            self.file.config.chunk,
        ]);
        Ok(self.unchunk(&chunks))
    }
}

/// Per unit the mean (scalar `[1]` or per element) and the scale of `collection` under `mode`.
fn normalisation(collection: &Collection, mode: Normalize) -> (Vec<Tensor>, Vec<f64>) {
    collection
        .weights
        .iter()
        .map(|w| {
            let (mean, dev) = match mode {
                Normalize::Layer => {
                    let m = w.mean(Kind::Float).reshape([1]);
                    (m.shallow_clone(), w - m)
                }
                Normalize::Element => {
                    let m = w.mean_dim(0, false, Kind::Float);
                    (m.shallow_clone(), w - m)
                }
            };
            let std = dev.square().mean(Kind::Double).sqrt().double_value(&[]);
            (mean, if std > 0.0 && std.is_finite() { std } else { 1.0 })
        })
        .unzip()
}

fn adam() -> AdamWConfig {
    AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, hypersphere: false }
}

/// The RNG of step `step` of stage `stage`: the same on a resumed run.
fn reseed(seed: u64, stage: u64, step: u64) {
    let s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (stage << 40) ^ step;
    tch::manual_seed((s & 0x7FFF_FFFF_FFFF_FFFF) as i64);
}

/// Cosine from `lr` to a tenth of it over `total` steps.
fn cosine_lr(lr: f64, step: u64, total: u64) -> f64 {
    let p = step as f64 / total.max(1) as f64;
    0.1 * lr + 0.9 * lr * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
}

fn named(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn load_vars(vs: &nn::VarStore, path: &Path) -> Result<()> {
    let saved = read_safetensors(path)?;
    let _guard = tch::no_grad_guard();
    for (name, mut t) in vs.variables() {
        let src =
            saved.get(&name).ok_or_else(|| WeightgenError::Input(format!("{}: no tensor `{name}`", path.display())))?;
        if src.size() != t.size() {
            return Err(WeightgenError::Input(format!(
                "{}: `{name}` has shape {:?}, expected {:?}",
                path.display(),
                src.size(),
                t.size()
            )));
        }
        t.copy_(src);
    }
    Ok(())
}

/// A generator folder's trained networks and settings, continued or begun: loads `dir` when it
/// holds a generator and `resume` is set (the new step counts and save interval apply), else
/// starts a new one for `collection`.
pub fn open_for_training(
    dir: &Path,
    collection: &Collection,
    collection_dir: &Path,
    config: GenConfig,
    resume: bool,
    device: Device,
) -> Result<WeightGen> {
    if !resume {
        if dir.join(FILE).is_file() {
            let why = format!("not set, and {} has a generator already there: set it to continue that one, or choose another `out`", dir.display());
            return Err(OptionError::no_value("resume", why).into());
        }
        return WeightGen::new(collection, collection_dir, config, device);
    }
    let mut g = WeightGen::load(dir, device).map_err(|e| OptionError::no_value("resume", e.to_string()))?;
    let saved = &g.file.config;
    let same = GenConfig {
        vae_steps: saved.vae_steps,
        diffusion_steps: saved.diffusion_steps,
        save_every: saved.save_every,
        ..config.clone()
    };
    if &same != saved {
        let why = format!(
            "{} was trained with other settings ({}); only the step counts and `save_every` may change",
            dir.display(),
            serde_json::to_string(saved).unwrap_or_default()
        );
        return Err(OptionError::no_value("resume", why).into());
    }
    if g.file.progress.vae_step >= saved.vae_steps
        && config.vae_steps != saved.vae_steps
        && g.file.progress.diffusion_step > 0
    {
        let why = format!("the VAE stage of {} has ended; its latents are fixed", dir.display());
        return Err(OptionError::new("vae_steps", config.vae_steps, why).into());
    }
    g.file.config = config;
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collection::{CheckpointInfo, Unit};
    use crate::denoiser::DenoiserConfig;

    /// Twelve "checkpoints" of three small layers: a shared base plus a low-dimensional drift,
    /// like the steps of a continued training run.
    fn toy() -> Collection {
        tch::manual_seed(11);
        let o = (Kind::Float, Device::Cpu);
        let units = vec![
            Unit::new("model.layers.0.input_layernorm.weight", vec![16]),
            Unit::new("model.layers.0.mlp.down_proj.weight", vec![8, 12]),
            Unit::new("model.norm.weight", vec![16]),
        ];
        let bases = [Tensor::ones([16], o), Tensor::randn([8, 12], o) * 0.1, Tensor::ones([16], o) * 1.5];
        let dirs = [Tensor::randn([16], o), Tensor::randn([8, 12], o), Tensor::randn([16], o)];
        let mut c = Collection::new("base".into(), "norm,layers.0.mlp.down_proj".into(), units);
        for k in 0..12 {
            let a = k as f64 / 11.0;
            let ts: Vec<Tensor> = bases.iter().zip(&dirs).map(|(b, d)| b + d * (0.02 * a)).collect();
            c.push(CheckpointInfo { source: "toy".into(), step: Some(k) }, &ts).unwrap();
        }
        c
    }

    fn tiny_config(normalize: Normalize) -> GenConfig {
        GenConfig {
            normalize,
            chunk: 32,
            vae_hidden: 64,
            latent: 8,
            vae_steps: 300,
            vae_batch: 64,
            vae_lr: 3e-3,
            denoiser: DenoiserConfig { hidden: 32, depth: 1 },
            timesteps: 50,
            diffusion_steps: 200,
            diffusion_batch: 8,
            diffusion_lr: 3e-3,
            save_every: 0,
            ..Default::default()
        }
    }

    #[test]
    fn chunking_round_trips_through_the_normalisation() {
        let _rng = crate::rng_lock();
        let c = toy();
        for mode in [Normalize::Layer, Normalize::Element] {
            let g = WeightGen::new(&c, Path::new("toy"), tiny_config(mode), Device::Cpu).unwrap();
            let chunks = g.chunks(&c);
            assert_eq!(chunks.size(), [12, 1 + 3 + 1, 32]);
            let back = g.unchunk(&chunks);
            for k in [0usize, 7] {
                for (a, b) in back[k].iter().zip(c.checkpoint(k)) {
                    assert!((a - b).abs().max().double_value(&[]) < 1e-5);
                }
            }
        }
    }

    /// Trains both stages on the toy collection; the VAE reconstructs the training weights
    /// (in weight units, against the spread of the checkpoints), and samples have the layers'
    /// shapes and lie in the range of the training weights.
    #[test]
    fn trains_reconstructs_and_samples() {
        let _rng = crate::rng_lock();
        let c = toy();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("gen");
        let mut g = WeightGen::new(&c, Path::new("toy"), tiny_config(Normalize::Element), Device::Cpu).unwrap();
        assert!(g.train(&c, &out, false, &|| false).unwrap());
        let rec = g.file.progress.vae_reconstruction.unwrap();
        assert!(rec < 0.05, "VAE reconstruction error {rec} (normalised units)");
        let back = g.unchunk(&g.reconstruct(&g.chunks(&c)));
        let spread =
            (c.matrix() - c.matrix().mean_dim(0, true, Kind::Float)).square().mean(Kind::Float).double_value(&[]);
        let err: f64 = (0..12)
            .map(|k| {
                let b: Vec<Tensor> = back[k].iter().map(|t| t.reshape([-1])).collect();
                (Tensor::cat(&b, 0) - c.matrix().get(k as i64)).square().mean(Kind::Float).double_value(&[])
            })
            .sum::<f64>()
            / 12.0;
        assert!(err < 0.1 * spread, "reconstruction {err} vs spread {spread}");
        let loaded = WeightGen::load(&out, Device::Cpu).unwrap();
        let samples = loaded.sample(3, Sampler::Ddim(20), 5).unwrap();
        assert_eq!(samples.len(), 3);
        let (lo, hi) = (c.matrix().min().double_value(&[]), c.matrix().max().double_value(&[]));
        for s in &samples {
            assert_eq!(s[1].size(), [8, 12]);
            let flat = Tensor::cat(&s.iter().map(|t| t.reshape([-1])).collect::<Vec<_>>(), 0);
            let (a, b) = (flat.min().double_value(&[]), flat.max().double_value(&[]));
            assert!(a > lo - 0.5 && b < hi + 0.5, "sample range {a}..{b} vs training {lo}..{hi}");
        }
        // The same seed gives the same samples; DDPM runs too.
        assert!(loaded.sample(3, Sampler::Ddim(20), 5).unwrap()[2][1].equal(&samples[2][1]));
        assert_eq!(loaded.sample(2, Sampler::Ddpm, 1).unwrap().len(), 2);
    }

    /// Stopping part-way through either stage and resuming ends with exactly the weights of an
    /// uninterrupted run.
    #[test]
    fn resume_is_exact() {
        let _rng = crate::rng_lock();
        let c = toy();
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = tiny_config(Normalize::Layer);
        cfg.vae_steps = 40;
        cfg.diffusion_steps = 30;
        let straight = dir.path().join("straight");
        let mut g = WeightGen::new(&c, Path::new("toy"), cfg.clone(), Device::Cpu).unwrap();
        assert!(g.train(&c, &straight, false, &|| false).unwrap());
        for stop_at in [17u64, 40 + 12] {
            let out = dir.path().join(format!("stopped-{stop_at}"));
            let mut g = WeightGen::new(&c, Path::new("toy"), cfg.clone(), Device::Cpu).unwrap();
            let count = std::cell::Cell::new(0u64);
            let stop = || {
                count.set(count.get() + 1);
                count.get() >= stop_at
            };
            assert!(!g.train(&c, &out, false, &stop).unwrap());
            drop(g);
            let mut g = open_for_training(&out, &c, Path::new("toy"), cfg.clone(), true, Device::Cpu).unwrap();
            assert!(g.train(&c, &out, false, &|| false).unwrap());
            for f in ["vae.safetensors", "diffusion.safetensors"] {
                let (a, b) = (read_safetensors(&straight.join(f)).unwrap(), read_safetensors(&out.join(f)).unwrap());
                for (k, v) in &a {
                    assert!(v.equal(&b[k]), "{f} `{k}` differs after stopping at {stop_at}");
                }
            }
        }
        // Other settings on resume are refused, naming them.
        let mut other = cfg.clone();
        other.latent = 4;
        let err =
            open_for_training(&straight, &c, Path::new("toy"), other, true, Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("other settings"), "{err}");
        assert!(open_for_training(&straight, &c, Path::new("toy"), cfg, false, Device::Cpu).is_err());
    }
}
