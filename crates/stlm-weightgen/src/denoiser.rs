//! The latent diffusion model's noise predictor. A checkpoint is a set of chunk latents
//! `[N, latent]` (every chunk of every selected layer); the network predicts the noise of all of
//! them jointly, conditioned on the diffusion step and, per chunk, on its layer index, its layer
//! type and its position in the layer (learned embeddings). Chunks see each other through
//! pooling: each block mixes a chunk's features with the mean over its layer's chunks and the
//! mean over the whole checkpoint (cost linear in N), so a sample is one coherent set of
//! weights, not independent chunks.

// tch's `+=` and `*=` on tensors are in-place, which autograd refuses on saved activations.
#![allow(clippy::assign_op_pattern)]

use crate::collection::Unit;
use crate::vae::torch_linear;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// Where each chunk of a checkpoint sits: its unit (layer), block, type and position.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// Values per chunk.
    pub chunk: i64,
    /// Chunks of each unit.
    pub chunks: Vec<i64>,
    /// Per chunk: the unit it belongs to.
    pub unit_of: Vec<i64>,
    /// Per chunk: the block index (units outside the blocks get `blocks`).
    pub layer_of: Vec<i64>,
    /// Per chunk: the unit's type index.
    pub type_of: Vec<i64>,
    /// Per chunk: its index within its unit.
    pub pos_of: Vec<i64>,
    /// Block indices used (one more than the largest block, plus one for "outside").
    pub layers: i64,
    /// Distinct types.
    pub types: i64,
    /// The largest number of chunks of one unit.
    pub max_chunks: i64,
}

impl Layout {
    /// The layout of `units` cut into chunks of `chunk` values.
    pub fn new(units: &[Unit], chunk: i64) -> Self {
        let mut kinds: Vec<&str> = units.iter().map(|u| u.kind.as_str()).collect();
        kinds.sort();
        kinds.dedup();
        let blocks = units.iter().filter_map(|u| u.layer).max().map_or(0, |l| l as i64 + 1);
        let mut l = Layout {
            chunk,
            chunks: vec![],
            unit_of: vec![],
            layer_of: vec![],
            type_of: vec![],
            pos_of: vec![],
            layers: blocks + 1,
            types: kinds.len() as i64,
            max_chunks: 1,
        };
        for (i, u) in units.iter().enumerate() {
            let c = (u.numel() + chunk - 1) / chunk;
            l.chunks.push(c);
            l.max_chunks = l.max_chunks.max(c);
            let ty = kinds.iter().position(|k| *k == u.kind).expect("kind listed") as i64;
            for p in 0..c {
                l.unit_of.push(i as i64);
                l.layer_of.push(u.layer.map_or(blocks, |b| b as i64));
                l.type_of.push(ty);
                l.pos_of.push(p);
            }
        }
        l
    }

    /// Total chunks N of one checkpoint.
    pub fn total(&self) -> i64 {
        self.unit_of.len() as i64
    }
}

/// Sizes of a [`Denoiser`].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct DenoiserConfig {
    /// Denoiser feature width.
    #[arg(long = "hidden", default_value_t = 128)]
    pub hidden: i64,
    /// Denoiser mixing blocks.
    #[arg(long = "depth", default_value_t = 2)]
    pub depth: i64,
}

struct Block {
    norm: nn::LayerNorm,
    fc1: nn::Linear,
    time: nn::Linear,
    fc2: nn::Linear,
}

/// The noise predictor over a checkpoint's chunk latents.
pub struct Denoiser {
    hidden: i64,
    in_proj: nn::Linear,
    layer_emb: nn::Embedding,
    type_emb: nn::Embedding,
    pos_emb: nn::Embedding,
    time1: nn::Linear,
    time2: nn::Linear,
    blocks: Vec<Block>,
    out_norm: nn::LayerNorm,
    out: nn::Linear,
    /// `[N]` int64 indices of the layout.
    layer_ids: Tensor,
    type_ids: Tensor,
    pos_ids: Tensor,
    unit_ids: Tensor,
    /// `[U, N]`: row u averages the chunks of unit u.
    unit_mean: Tensor,
}

impl Denoiser {
    /// A denoiser for `layout` with latents of `latent` values, its variables under `path`.
    pub fn new(path: &nn::Path, layout: &Layout, latent: i64, cfg: DenoiserConfig) -> Self {
        let h = cfg.hidden;
        let lin = |name: &str, i, o| torch_linear(&(path / name), i, o);
        let emb = |name: &str, n| nn::embedding(path / name, n, h, Default::default());
        let blocks = (0..cfg.depth)
            .map(|i| {
                let p = path / "blocks" / i;
                Block {
                    norm: nn::layer_norm(&p / "norm", vec![h], Default::default()),
                    fc1: torch_linear(&(&p / "fc1"), 3 * h, 2 * h),
                    time: torch_linear(&(&p / "time"), h, 2 * h),
                    fc2: torch_linear(&(&p / "fc2"), 2 * h, h),
                }
            })
            .collect();
        let dev = path.device();
        let ids = |v: &[i64]| Tensor::from_slice(v).to_device(dev);
        let units = layout.chunks.len() as i64;
        let counts = Tensor::from_slice(&layout.chunks).to_kind(Kind::Float);
        let mut unit_mean = Tensor::zeros([units, layout.total()], (Kind::Float, tch::Device::Cpu));
        let _ = unit_mean.index_put_(
            &[
                Some(ids(&layout.unit_of).to_device(tch::Device::Cpu)),
                Some(Tensor::arange(layout.total(), (Kind::Int64, tch::Device::Cpu))),
            ],
            &counts.reciprocal().index_select(0, &Tensor::from_slice(&layout.unit_of)),
            false,
        );
        Denoiser {
            hidden: h,
            in_proj: lin("in_proj", latent, h),
            layer_emb: emb("layer_emb", layout.layers),
            type_emb: emb("type_emb", layout.types),
            pos_emb: emb("pos_emb", layout.max_chunks),
            time1: lin("time_in", h, h),
            time2: lin("time_out", h, h),
            blocks,
            out_norm: nn::layer_norm(path / "out_norm", vec![h], Default::default()),
            out: lin("out", h, latent),
            layer_ids: ids(&layout.layer_of),
            type_ids: ids(&layout.type_of),
            pos_ids: ids(&layout.pos_of),
            unit_ids: ids(&layout.unit_of),
            unit_mean: unit_mean.to_device(dev),
        }
    }

    /// Predicted noise `[B, N, latent]` of noisy latents `x` `[B, N, latent]` at steps `t` `[B]`.
    pub fn forward(&self, x: &Tensor, t: &Tensor) -> Tensor {
        // [B, N, latent] -> [B, N, H]
        let te = self.time2.forward(&self.time1.forward(&timestep_embedding(t, self.hidden)).silu()); // [B, H]
        let cond = self.layer_emb.forward(&self.layer_ids)
            + self.type_emb.forward(&self.type_ids)
            + self.pos_emb.forward(&self.pos_ids); // [N, H]
        let mut h = self.in_proj.forward(x) + cond.unsqueeze(0) + te.unsqueeze(1);
        for b in &self.blocks {
            let a = b.norm.forward(&h);
            let per_unit = self.unit_mean.matmul(&a).index_select(1, &self.unit_ids); // [B, N, H]
            let global = a.mean_dim(1, true, Kind::Float).expand_as(&a);
            let z = b.fc1.forward(&Tensor::cat(&[&a, &per_unit, &global], -1)) + b.time.forward(&te).unsqueeze(1);
            h = h + b.fc2.forward(&z.gelu("none"));
        }
        self.out.forward(&self.out_norm.forward(&h))
    }
}

/// Sinusoidal embedding `[B, dim]` of steps `t` `[B]` (Ho et al., as in the transformer).
pub fn timestep_embedding(t: &Tensor, dim: i64) -> Tensor {
    let half = dim / 2;
    let freqs = (Tensor::arange(half, (Kind::Float, t.device())) * (-(10_000f64.ln()) / half as f64)).exp();
    let args = t.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0);
    let emb = Tensor::cat(&[args.sin(), args.cos()], 1);
    if dim % 2 == 1 {
        Tensor::cat(&[emb, Tensor::zeros([t.size()[0], 1], (Kind::Float, t.device()))], 1)
    } else {
        emb
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn units() -> Vec<Unit> {
        vec![
            Unit::new("model.layers.0.input_layernorm.weight", vec![8]),
            Unit::new("model.layers.1.input_layernorm.weight", vec![8]),
            Unit::new("model.layers.1.mlp.down_proj.weight", vec![4, 5]),
            Unit::new("model.norm.weight", vec![8]),
        ]
    }

    #[test]
    fn layout_indexes_every_chunk() {
        let l = Layout::new(&units(), 8);
        assert_eq!(l.chunks, [1, 1, 3, 1]);
        assert_eq!(l.unit_of, [0, 1, 2, 2, 2, 3]);
        assert_eq!(l.layer_of, [0, 1, 1, 1, 1, 2]);
        assert_eq!(l.pos_of, [0, 0, 0, 1, 2, 0]);
        assert_eq!((l.layers, l.types, l.max_chunks), (3, 3, 3));
        // The two input norms share a type; the final norm has its own.
        assert_eq!(l.type_of[0], l.type_of[1]);
        assert_ne!(l.type_of[0], l.type_of[5]);
    }

    /// A chunk's prediction depends on the other chunks of its layer (through pooling), and the
    /// per-unit mean is a mean.
    #[test]
    fn chunks_see_each_other() {
        let _rng = crate::rng_lock();
        tch::manual_seed(0);
        let l = Layout::new(&units(), 8);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let d = Denoiser::new(&vs.root(), &l, 4, DenoiserConfig { hidden: 16, depth: 2 });
        let sums = d.unit_mean.sum_dim_intlist(1, false, Kind::Float);
        assert!((sums - 1.0).abs().max().double_value(&[]) < 1e-6);
        let x = Tensor::randn([2, 6, 4], (Kind::Float, tch::Device::Cpu));
        let t = Tensor::from_slice(&[3i64, 7]);
        let y = d.forward(&x, &t);
        assert_eq!(y.size(), [2, 6, 4]);
        let x2 = x.copy();
        let _ = x2.get(0).get(4).fill_(5.0);
        let y2 = d.forward(&x2, &t);
        assert!((y2.get(0).get(2) - y.get(0).get(2)).abs().max().double_value(&[]) > 1e-6);
        // The other sample of the batch is untouched.
        assert!((y2.get(1) - y.get(1)).abs().max().double_value(&[]) < 1e-6);
    }
}
