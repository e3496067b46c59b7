//! Per-repeat LoRA deltas for shared layers (`layer_sharing.lora_rank`), as in Relaxed
//! Recursive Transformers (Bae et al. 2024): every applied layer adds its own low-rank update
//! `B A` to each projection of the block it runs (q, k, v, o, gate, up, down), so repeats of one
//! block can differ a little at a small cost in parameters.
//!
//! Names follow PEFT's: `model.lora.{i}.self_attn.q_proj.lora_A.weight` `[rank, in]` and
//! `...lora_B.weight` `[out, rank]` for applied layer `i`. `B` starts at zero, so a new model
//! equals the same model without deltas.

use crate::layers::{DecoderLayer, FeedForward, KindParams, Linear, Mlp, Norm, QkNorm, SelfAttention};
use stlm_attention::LinformerProjection;
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
        let (out, inp) = (base.weight.size()[0], base.weight.size()[1]);
        let a = (&path / "lora_A").var("weight", &[rank, inp], Init::Randn { mean: 0.0, stdev: 1.0 / (inp as f64).sqrt() });
        let b = (&path / "lora_B").var("weight", &[out, rank], Init::Const(0.0));
        LoraDelta { a, b }
    }

    /// `base` with this update added to its weight (the bias shared).
    fn merged(&self, base: &Linear) -> Linear {
        Linear { weight: &base.weight + self.b.matmul(&self.a), bias: base.bias.as_ref().map(Tensor::shallow_clone), tap: None }
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

    /// `block` with these deltas merged into its projections; every other tensor is the
    /// block's own (the same handles, so gradients reach the shared weights).
    pub fn apply(&self, block: &DecoderLayer) -> DecoderLayer {
        let a = &block.self_attn;
        let [q, k, v, o] = &self.attention;
        let mlp = match block.mlp.dense() {
            Some(m) => FeedForward::Dense(Mlp {
                gate_proj: m.gate_proj.as_ref().zip(self.mlp.0.as_ref()).map(|(g, d)| d.merged(g)),
                up_proj: self.mlp.1.merged(&m.up_proj),
                down_proj: self.mlp.2.merged(&m.down_proj),
                act: m.act,
                gate_up: None,
            }),
            None => unreachable!("deltas are built for dense MLPs only"),
        };
        DecoderLayer {
            in_proj: block.in_proj.as_ref().map(Linear::share),
            input_layernorm: share_norm(&block.input_layernorm),
            self_attn: SelfAttention {
                q_proj: q.merged(&a.q_proj),
                k_proj: k.merged(&a.k_proj),
                v_proj: v.merged(&a.v_proj),
                o_proj: o.merged(&a.o_proj),
                num_heads: a.num_heads,
                num_kv_heads: a.num_kv_heads,
                head_dim: a.head_dim,
                qkv: None,
                attention: a.attention.clone(),
                params: share_params(&a.params),
                qk_norm: a.qk_norm.as_ref().map(|n| QkNorm { q_norm: share_norm(&n.q_norm), k_norm: share_norm(&n.k_norm) }),
                alibi_slopes: a.alibi_slopes.as_ref().map(Tensor::shallow_clone),
            },
            post_attention_layernorm: share_norm(&block.post_attention_layernorm),
            mlp,
            input_residual: block.input_residual.as_ref().map(Tensor::shallow_clone),
            post_attention_residual: block.post_attention_residual.as_ref().map(Tensor::shallow_clone),
        }
    }
}

fn share_norm(n: &Norm) -> Norm {
    Norm { kind: n.kind, weight: n.weight.shallow_clone(), bias: n.bias.as_ref().map(Tensor::shallow_clone), eps: n.eps }
}

fn share_params(p: &KindParams) -> KindParams {
    match p {
        KindParams::None => KindParams::None,
        KindParams::HeadScale(t) => KindParams::HeadScale(t.shallow_clone()),
        KindParams::DynamicMask(dm) => KindParams::DynamicMask(crate::layers::DynamicMask { a: dm.a.shallow_clone(), dt_proj: dm.dt_proj.share() }),
        KindParams::Linformer(l) => KindParams::Linformer(LinformerProjection { e: l.e.shallow_clone(), f: l.f.as_ref().map(Tensor::shallow_clone) }),
    }
}
