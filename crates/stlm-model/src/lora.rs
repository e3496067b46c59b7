//! Per-repeat LoRA deltas for shared layers (`layer_sharing.lora_rank`), as in Relaxed
//! Recursive Transformers (Bae et al. 2024): every applied layer adds its own low-rank update
//! `B A` to each projection of the block it runs (q, k, v, o, gate, up, down), so repeats of one
//! block can differ a little at a small cost in parameters.
//!
//! Names follow PEFT's: `model.lora.{i}.self_attn.q_proj.lora_A.weight` `[rank, in]` and
//! `...lora_B.weight` `[out, rank]` for applied layer `i`. `B` starts at zero, so a new model
//! equals the same model without deltas.

use crate::layers::{Adapter, DecoderLayer, Linear, LowRank};
use stlm_core::{Layer, Role, Walk};
use tch::nn::{self, Init};
use tch::Tensor;

/// One projection's low-rank update `B A`.
#[derive(Debug)]
pub struct LoraDelta {
    /// `[rank, in]`, normal with std `1/sqrt(in)` (`lora_A.weight`).
    pub a: Tensor,
    /// `[out, rank]`, zero at the start (`lora_B.weight`).
    pub b: Tensor,
}

impl LoraDelta {
    fn new(path: nn::Path, base: &Linear, rank: i64) -> Self {
        let (out, inp) = base.weight.shape();
        let a = (&path / "lora_A").var("weight", &[rank, inp], Init::Randn { mean: 0.0, stdev: 1.0 / (inp as f64).sqrt() });
        let b = (&path / "lora_B").var("weight", &[out, rank], Init::Const(0.0));
        LoraDelta { a, b }
    }

    /// This update as the projection's forward takes it.
    fn low_rank(&self) -> LowRank<'_> {
        LowRank { a: &self.a, b: &self.b }
    }
}

/// The deltas of one applied layer.
#[derive(Debug)]
pub struct LayerLora {
    /// q, k, v, o.
    pub attention: [LoraDelta; 4],
    /// gate (gated MLPs), up, down.
    pub mlp: (Option<LoraDelta>, LoraDelta, LoraDelta),
}

impl LayerLora {
    /// Deltas of rank `rank` for the projections of `block` (a block with a dense MLP), at
    /// `path` (`model.lora.{i}`).
    pub fn new(path: nn::Path, block: &DecoderLayer, rank: i64) -> Option<Self> {
        let (a, m) = (&block.self_attn, block.mlp.dense()?);
        let (attn, mlp) = (&path / "self_attn", &path / "mlp");
        Some(LayerLora {
            attention: [
                LoraDelta::new(&attn / "q_proj", &a.q_proj, rank),
                LoraDelta::new(&attn / "k_proj", &a.k_proj, rank),
                LoraDelta::new(&attn / "v_proj", &a.v_proj, rank),
                LoraDelta::new(&attn / "o_proj", &a.o_proj, rank),
            ],
            mlp: (
                m.gate_proj.as_ref().map(|g| LoraDelta::new(&mlp / "gate_proj", g, rank)),
                LoraDelta::new(&mlp / "up_proj", &m.up_proj, rank),
                LoraDelta::new(&mlp / "down_proj", &m.down_proj, rank),
            ),
        })
    }

    /// The updates as a block's forward takes them: each projection multiplies with its weight
    /// plus its `B A` (the block itself is shared and unchanged, so gradients reach both).
    pub fn adapter(&self) -> Adapter<'_> {
        let [q, k, v, o] = &self.attention;
        Adapter {
            attention: [q.low_rank(), k.low_rank(), v.low_rank(), o.low_rank()],
            mlp: (self.mlp.0.as_ref().map(LoraDelta::low_rank), self.mlp.1.low_rank(), self.mlp.2.low_rank()),
        }
    }
}

impl Layer for LoraDelta {
    fn visit(&self, walk: &mut Walk<'_>) {
        walk.param("lora_A.weight", &self.a, Role::Matrix);
        walk.param("lora_B.weight", &self.b, Role::Matrix);
    }
}

impl Layer for LayerLora {
    fn visit(&self, walk: &mut Walk<'_>) {
        for (name, delta) in ["q_proj", "k_proj", "v_proj", "o_proj"].iter().zip(&self.attention) {
            walk.layer(&format!("self_attn.{name}"), delta);
        }
        walk.layer_opt("mlp.gate_proj", self.mlp.0.as_ref());
        walk.layer("mlp.up_proj", &self.mlp.1);
        walk.layer("mlp.down_proj", &self.mlp.2);
    }
}
