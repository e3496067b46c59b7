//! The building blocks every decoder preset is assembled from: linear, norm, attention, MLP, block.
//!
//! Each layer is a named struct whose fields are its sub-layers, so pruning, distillation and
//! inspection can walk them. Variable names follow Hugging Face Llama naming.

use crate::config::{Activation, MlpKind, ModelConfig, NormKind};
use stlm_attention::{apply_rotary, dense_attention, AttentionMask, KvCache};
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

/// `y = x W^T + b`, weight `[out, in]`.
#[derive(Debug)]
pub struct Linear {
    /// `[out_features, in_features]`.
    pub weight: Tensor,
    /// `[out_features]`, when the layer has a bias.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// A linear layer with normal(0, `std`) weights and zero bias.
    pub fn new(path: nn::Path, in_dim: i64, out_dim: i64, bias: bool, std: f64) -> Self {
        let weight = path.var("weight", &[out_dim, in_dim], Init::Randn { mean: 0.0, stdev: std });
        let bias = bias.then(|| path.var("bias", &[out_dim], Init::Const(0.0)));
        Linear { weight, bias }
    }

    /// `[.., in] -> [.., out]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// RMSNorm or LayerNorm over the last dimension.
#[derive(Debug)]
pub struct Norm {
    /// Which normalisation.
    pub kind: NormKind,
    /// Scale, `[hidden]`.
    pub weight: Tensor,
    /// Shift, `[hidden]` (LayerNorm only).
    pub bias: Option<Tensor>,
    /// Added to the variance.
    pub eps: f64,
}

impl Norm {
    /// A norm of width `dim` initialised to the identity scale.
    pub fn new(path: nn::Path, kind: NormKind, dim: i64, eps: f64) -> Self {
        let weight = path.var("weight", &[dim], Init::Const(1.0));
        let bias = (kind == NormKind::LayerNorm).then(|| path.var("bias", &[dim], Init::Const(0.0)));
        Norm { kind, weight, bias, eps }
    }

    /// `[.., hidden] -> [.., hidden]`; RMSNorm computes in float32 as transformers does.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self.kind {
            NormKind::RmsNorm => {
                let kind = x.kind();
                if kind == Kind::Float {
                    let var = x.square().mean_dim(-1, true, Kind::Float);
                    return x * (var + self.eps).rsqrt() * &self.weight;
                }
                let xf = x.to_kind(Kind::Float);
                let var = xf.square().mean_dim(-1, true, Kind::Float);
                (xf * (var + self.eps).rsqrt()).to_kind(kind) * &self.weight
            }
            NormKind::LayerNorm => {
                let dim = *self.weight.size().last().expect("norm weight is 1-d");
                x.layer_norm([dim], Some(&self.weight), self.bias.as_ref(), self.eps, true)
            }
        }
    }
}

impl Activation {
    /// Applies the activation elementwise.
    pub fn forward(self, x: &Tensor) -> Tensor {
        match self {
            Activation::Silu => x.silu(),
            Activation::Gelu => x.gelu("none"),
            Activation::GeluTanh => x.gelu("tanh"),
            Activation::Relu => x.relu(),
        }
    }
}

/// The feed-forward block: gated (SwiGLU) or plain (GPT-2).
#[derive(Debug)]
pub struct Mlp {
    /// Gate projection (gated MLPs only).
    pub gate_proj: Option<Linear>,
    /// Up projection, `[intermediate, hidden]`.
    pub up_proj: Linear,
    /// Down projection, `[hidden, intermediate]`.
    pub down_proj: Linear,
    /// Activation.
    pub act: Activation,
}

impl Mlp {
    /// Builds the block from the config; `resid_std` initialises `down_proj`.
    pub fn new(path: nn::Path, cfg: &ModelConfig, resid_std: f64) -> Self {
        let (h, i, b, std) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, cfg.initializer_range);
        Mlp {
            gate_proj: (cfg.mlp == MlpKind::Gated).then(|| Linear::new(&path / "gate_proj", h, i, b, std)),
            up_proj: Linear::new(&path / "up_proj", h, i, b, std),
            down_proj: Linear::new(&path / "down_proj", i, h, b, resid_std),
            act: cfg.hidden_act,
        }
    }

    /// `[b, s, hidden] -> [b, s, hidden]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let hidden = match &self.gate_proj {
            Some(gate) => self.act.forward(&gate.forward(x)) * self.up_proj.forward(x),
            None => self.act.forward(&self.up_proj.forward(x)),
        };
        self.down_proj.forward(&hidden)
    }
}

/// Rotary angles for the current positions, computed once per forward and shared by all layers.
pub struct RotaryAngles {
    /// `[b, 1, s, head_dim]`.
    pub cos: Tensor,
    /// `[b, 1, s, head_dim]`.
    pub sin: Tensor,
}

/// Multi-head, grouped-query or multi-query self-attention.
#[derive(Debug)]
pub struct SelfAttention {
    /// `[heads * head_dim, hidden]`.
    pub q_proj: Linear,
    /// `[kv_heads * head_dim, hidden]`.
    pub k_proj: Linear,
    /// `[kv_heads * head_dim, hidden]`.
    pub v_proj: Linear,
    /// `[hidden, heads * head_dim]`.
    pub o_proj: Linear,
    /// Query heads.
    pub num_heads: i64,
    /// Key/value heads.
    pub num_kv_heads: i64,
    /// Width of one head.
    pub head_dim: i64,
}

impl SelfAttention {
    /// Builds the projections; `resid_std` initialises `o_proj`.
    pub fn new(path: nn::Path, cfg: &ModelConfig, resid_std: f64) -> Self {
        let (h, d, b, std) = (cfg.hidden_size, cfg.head_dim(), cfg.attention_bias, cfg.initializer_range);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        SelfAttention {
            q_proj: Linear::new(&path / "q_proj", h, nh * d, b, std),
            k_proj: Linear::new(&path / "k_proj", h, nkv * d, b, std),
            v_proj: Linear::new(&path / "v_proj", h, nkv * d, b, std),
            o_proj: Linear::new(&path / "o_proj", nh * d, h, b, resid_std),
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: d,
        }
    }

    /// `[b, s, hidden] -> [b, s, hidden]`. With a cache, keys and values of this layer are
    /// appended to it and attention sees every cached position.
    pub fn forward(
        &self,
        x: &Tensor,
        rotary: Option<&RotaryAngles>,
        mask: &AttentionMask,
        cache: Option<(&KvCache, usize)>,
    ) -> Tensor {
        let (b, s) = (x.size()[0], x.size()[1]);
        let heads = |t: Tensor, n: i64| t.view([b, s, n, self.head_dim]).transpose(1, 2);
        let mut q = heads(self.q_proj.forward(x), self.num_heads); // [b, h, s, d]
        let mut k = heads(self.k_proj.forward(x), self.num_kv_heads); // [b, kvh, s, d]
        let v = heads(self.v_proj.forward(x), self.num_kv_heads);
        if let Some(r) = rotary {
            q = apply_rotary(&q, &r.cos, &r.sin);
            k = apply_rotary(&k, &r.cos, &r.sin);
        }
        let (k, v) = match cache {
            Some((cache, layer)) => cache.update(layer, &k, &v),
            None => (k, v),
        };
        let out = dense_attention(&q, &k, &v, mask, None); // [b, h, s, d]
        self.o_proj.forward(&out.transpose(1, 2).reshape([b, s, self.num_heads * self.head_dim]))
    }
}

/// One pre-norm decoder block: `x + attn(norm(x))`, then `x + mlp(norm(x))`.
#[derive(Debug)]
pub struct DecoderLayer {
    /// Norm before attention.
    pub input_layernorm: Norm,
    /// Self-attention.
    pub self_attn: SelfAttention,
    /// Norm before the MLP.
    pub post_attention_layernorm: Norm,
    /// Feed-forward block.
    pub mlp: Mlp,
}

impl DecoderLayer {
    /// Builds block `path` (`model.layers.{i}`).
    pub fn new(path: nn::Path, cfg: &ModelConfig) -> Self {
        let resid_std = cfg.initializer_range / (2.0 * cfg.num_hidden_layers as f64).sqrt();
        DecoderLayer {
            input_layernorm: Norm::new(&path / "input_layernorm", cfg.norm, cfg.hidden_size, cfg.norm_eps),
            self_attn: SelfAttention::new(&path / "self_attn", cfg, resid_std),
            post_attention_layernorm: Norm::new(&path / "post_attention_layernorm", cfg.norm, cfg.hidden_size, cfg.norm_eps),
            mlp: Mlp::new(&path / "mlp", cfg, resid_std),
        }
    }

    /// `[b, s, hidden] -> [b, s, hidden]`.
    pub fn forward(
        &self,
        x: &Tensor,
        rotary: Option<&RotaryAngles>,
        mask: &AttentionMask,
        cache: Option<(&KvCache, usize)>,
    ) -> Tensor {
        let x = x + self.self_attn.forward(&self.input_layernorm.forward(x), rotary, mask, cache);
        &x + self.mlp.forward(&self.post_attention_layernorm.forward(&x))
    }
}
