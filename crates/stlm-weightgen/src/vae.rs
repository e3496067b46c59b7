//! A VAE over flattened layer parameters (p-diff's autoencoder, with a KL term): each selected
//! layer's parameter vector is normalised by its own mean and standard deviation and cut into
//! chunks of `chunk` values (the last one zero-padded); every chunk is encoded to a latent of
//! `latent` values. Training adds Gaussian noise to the inputs and to the latents, as p-diff does,
//! so that the decoder is robust to the latents a diffusion model samples.

use tch::nn::{self, Module, OptimizerConfig};
use tch::{Kind, Tensor};

/// Sizes and training noise of a [`ParamVae`].
#[derive(Debug, Clone, Copy)]
pub struct VaeConfig {
    /// Values per chunk.
    pub chunk: i64,
    /// Hidden width of the encoder and decoder MLPs.
    pub hidden: i64,
    /// Latent values per chunk.
    pub latent: i64,
    /// Standard deviation of the noise added to (normalised) inputs while training.
    pub input_noise: f64,
    /// Standard deviation of the noise added to latents while training.
    pub latent_noise: f64,
    /// Weight of the KL term.
    pub kl_weight: f64,
}

impl Default for VaeConfig {
    fn default() -> Self {
        VaeConfig { chunk: 256, hidden: 512, latent: 64, input_noise: 0.001, latent_noise: 0.1, kl_weight: 1e-6 }
    }
}

/// A layer's parameters as normalised chunks, with what undoes the normalisation.
#[derive(Debug)]
pub struct Chunked {
    /// `[chunks, chunk]`.
    pub chunks: Tensor,
    /// The vector's mean.
    pub mean: f64,
    /// The vector's standard deviation (1 for a constant vector).
    pub std: f64,
    /// The vector's length.
    pub len: i64,
}

/// Normalises a flat parameter vector and cuts it into `[chunks, chunk]`.
pub fn chunk(v: &Tensor, chunk: i64) -> Chunked {
    let v = v.to_kind(Kind::Float).view([-1]);
    let len = v.size()[0];
    let mean = v.mean(Kind::Float).double_value(&[]);
    let std = if len > 1 { v.std(true).double_value(&[]) } else { 0.0 };
    let std = if std > 0.0 { std } else { 1.0 };
    let n = (len + chunk - 1) / chunk;
    let normed = (&v - mean) / std;
    let padded = Tensor::cat(&[normed, Tensor::zeros([n * chunk - len], (Kind::Float, v.device()))], 0);
    Chunked { chunks: padded.view([n, chunk]), mean, std, len }
}

/// The flat vector of normalised `chunks` (as [`chunk`] made them), denormalised.
pub fn unchunk(chunks: &Tensor, mean: f64, std: f64, len: i64) -> Tensor {
    chunks.reshape([-1]).narrow(0, 0, len) * std + mean
}

/// Encoder and decoder MLPs over chunks.
pub struct ParamVae {
    /// The config it was built with.
    pub config: VaeConfig,
    enc: nn::Sequential,
    mu: nn::Linear,
    logvar: nn::Linear,
    dec: nn::Sequential,
}

/// One training step's losses.
#[derive(Debug, Clone, Copy)]
pub struct VaeLosses {
    /// Mean squared reconstruction error (normalised values).
    pub reconstruction: f64,
    /// KL divergence to N(0, 1), per latent value.
    pub kl: f64,
}

impl ParamVae {
    /// A VAE with its variables under `path` (`encoder.*`, `mu`, `logvar`, `decoder.*`).
    pub fn new(path: &nn::Path, config: VaeConfig) -> Self {
        let (c, h, l) = (config.chunk, config.hidden, config.latent);
        let lin = |p: nn::Path, i, o| nn::linear(p, i, o, Default::default());
        let enc = nn::seq()
            .add(lin(path / "encoder" / "0", c, h))
            .add_fn(|x| x.gelu("none"))
            .add(lin(path / "encoder" / "1", h, h))
            .add_fn(|x| x.gelu("none"));
        let dec = nn::seq()
            .add(lin(path / "decoder" / "0", l, h))
            .add_fn(|x| x.gelu("none"))
            .add(lin(path / "decoder" / "1", h, h))
            .add_fn(|x| x.gelu("none"))
            .add(lin(path / "decoder" / "2", h, c));
        ParamVae { config, enc, mu: lin(path / "mu", h, l), logvar: lin(path / "logvar", h, l), dec }
    }

    /// The latent means of `chunks` `[n, chunk]` -> `[n, latent]`.
    pub fn encode(&self, chunks: &Tensor) -> Tensor {
        self.mu.forward(&self.enc.forward(chunks))
    }

    /// Chunks of latents `[n, latent]` -> `[n, chunk]`.
    pub fn decode(&self, z: &Tensor) -> Tensor {
        self.dec.forward(z)
    }

    /// Reconstruction loss plus `kl_weight` times KL on `chunks`, with the training noise.
    pub fn loss(&self, chunks: &Tensor) -> (Tensor, VaeLosses) {
        let c = self.config;
        let x = chunks + chunks.randn_like() * c.input_noise;
        let h = self.enc.forward(&x);
        let (mu, logvar) = (self.mu.forward(&h), self.logvar.forward(&h).clamp(-10.0, 10.0));
        let z = &mu + (&logvar * 0.5).exp() * mu.randn_like() + mu.randn_like() * c.latent_noise;
        let rec = (self.decode(&z) - chunks).square().mean(Kind::Float);
        let kl = ((mu.square() + logvar.exp() - 1.0 - &logvar) * 0.5).mean(Kind::Float);
        let total = &rec + &kl * c.kl_weight;
        let losses = VaeLosses { reconstruction: rec.double_value(&[]), kl: kl.double_value(&[]) };
        (total, losses)
    }

    /// Trains on `chunks` `[n, chunk]` for `steps` full-batch Adam steps at `lr`; returns the last
    /// step's losses.
    pub fn fit(&self, vs: &nn::VarStore, chunks: &Tensor, steps: usize, lr: f64) -> Result<VaeLosses, tch::TchError> {
        let mut opt = nn::Adam::default().build(vs, lr)?;
        let mut last = VaeLosses { reconstruction: f64::NAN, kl: f64::NAN };
        for _ in 0..steps {
            let (loss, l) = self.loss(chunks);
            opt.backward_step(&loss);
            last = l;
        }
        Ok(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn chunking_round_trips() {
        let _rng = crate::rng_lock();
        let v = Tensor::randn([70], (Kind::Float, Device::Cpu)) * 3.0 + 2.0;
        let c = chunk(&v, 32);
        assert_eq!(c.chunks.size(), [3, 32]);
        let back = unchunk(&c.chunks, c.mean, c.std, c.len);
        assert!((back - &v).abs().max().double_value(&[]) < 1e-5);
        let mean = c.chunks.reshape([-1]).narrow(0, 0, 70).mean(Kind::Float).double_value(&[]);
        assert!(mean.abs() < 1e-5);
        let constant = chunk(&Tensor::ones([5], (Kind::Float, Device::Cpu)), 4);
        assert_eq!(constant.std, 1.0);
    }

    /// The tiny case the issue asks for: the VAE reconstructs its training vectors.
    #[test]
    fn the_vae_reconstructs_its_training_vectors() {
        let _rng = crate::rng_lock();
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = VaeConfig { chunk: 32, hidden: 128, latent: 16, ..Default::default() };
        let vae = ParamVae::new(&vs.root(), cfg);
        // Eight "checkpoints" of a 96-value layer: a shared direction plus small differences.
        let base = Tensor::randn([96], (Kind::Float, Device::Cpu));
        let rows: Vec<Tensor> = (0..8).map(|_| &base + Tensor::randn([96], (Kind::Float, Device::Cpu)) * 0.3).collect();
        let chunked: Vec<Chunked> = rows.iter().map(|r| chunk(r, 32)).collect();
        let all = Tensor::cat(&chunked.iter().map(|c| c.chunks.shallow_clone()).collect::<Vec<_>>(), 0);
        let last = vae.fit(&vs, &all, 1500, 2e-3).unwrap();
        assert!(last.reconstruction < 0.05, "{last:?}");
        let _g = tch::no_grad_guard();
        for (r, c) in rows.iter().zip(&chunked) {
            let back = unchunk(&vae.decode(&vae.encode(&c.chunks)), c.mean, c.std, c.len);
            let rel = (&back - r).square().mean(Kind::Float).double_value(&[]) / r.var(true).double_value(&[]);
            assert!(rel < 0.02, "relative reconstruction error {rel}");
        }
    }
}
