//! The building blocks every decoder preset is assembled from: linear, norm, attention, MLP, block.
//!
//! Each layer is a named struct whose fields are its sub-layers, so pruning, distillation and
//! inspection can walk them. Variable names follow Hugging Face Llama naming.

use crate::config::{Activation, MlpKind, ModelConfig, NormKind, PositionKind};
use stlm_attention::{
    alibi_mask, alibi_slope_tensor, apply_rotary, dense_attention, Attention, AttentionMask, Build, KernelTensors, KvCache, Learned, LinformerProjection, LinformerSharing,
};
use crate::weight::{dense_linear, Weight};
use stlm_core::kernels::small_batch_rms_norm;
use stlm_core::Mode;
use stlm_moe::{CdMoe, MoeLayer, MoeStats};
use std::sync::{Arc, Mutex};
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

/// The inputs a tapped [`Linear`] has seen: `X^T X` (float64, `[in, in]`) and the number of rows
/// of `X`, accumulated over forwards. Calibration statistics for pruning: the diagonal holds each
/// input channel's squared norm (Wanda), the whole matrix is SparseGPT's Hessian up to a factor.
#[derive(Debug, Default)]
pub struct InputGram {
    /// `sum X^T X` over every input seen, or `None` before the first.
    pub gram: Option<Tensor>,
    /// Input rows (tokens) seen.
    pub rows: i64,
}

/// A shared [`InputGram`] a [`Linear`] adds its inputs to while it is set.
pub type InputTap = Arc<Mutex<InputGram>>;

/// `y = x W^T + b`, weight `[out, in]`.
#[derive(Debug)]
pub struct Linear {
    /// `[out_features, in_features]`, as one of the representations of [`Weight`].
    pub weight: Weight,
    /// `[out_features]`, when the layer has a bias.
    pub bias: Option<Tensor>,
    /// While set, every input is added to this Gram matrix (calibration for pruning).
    pub tap: Option<InputTap>,
}

impl Linear {
    /// A linear layer with normal(0, `std`) weights and zero bias.
    pub fn new(path: nn::Path, in_dim: i64, out_dim: i64, bias: bool, std: f64) -> Self {
        let weight = path.var("weight", &[out_dim, in_dim], Init::Randn { mean: 0.0, stdev: std });
        let bias = bias.then(|| path.var("bias", &[out_dim], Init::Const(0.0)));
        Linear { weight: Weight::Dense(weight), bias, tap: None }
    }

    /// A layer over existing tensors: a float weight `[out, in]` and an optional bias `[out]`.
    pub fn from_dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight: Weight::Dense(weight), bias, tap: None }
    }

    /// The same layer (its weight and bias tensors, not copies), for weights tied across blocks.
    pub fn share(&self) -> Linear {
        Linear { weight: self.weight.share(), bias: self.bias.as_ref().map(Tensor::shallow_clone), tap: None }
    }

    /// Adds `x` `[.., in]` to each distinct tap of `parts` (layers reading the same input).
    fn record(parts: &[&Linear], x: &Tensor) {
        let mut taps: Vec<&InputTap> = Vec::new();
        for tap in parts.iter().filter_map(|p| p.tap.as_ref()) {
            if !taps.iter().any(|t| Arc::ptr_eq(t, tap)) {
                taps.push(tap);
            }
        }
        if taps.is_empty() {
            return;
        }
        let _guard = tch::no_grad_guard();
        let cols = x.size().last().copied().unwrap_or(0);
        let rows = x.detach().reshape([-1, cols]).to_kind(Kind::Double); // [n, in]
        let gram = rows.tr().matmul(&rows);
        for tap in taps {
            // A poisoned lock only means another thread panicked mid-update; the sum is still usable.
            let mut g = tap.lock().unwrap_or_else(|e| e.into_inner());
            g.gram = Some(match g.gram.take() {
                Some(sum) => sum + &gram,
                None => gram.shallow_clone(),
            });
            g.rows += rows.size()[0];
        }
    }

    /// `[.., in] -> [.., out]`; a few rows of float32 on the CPU without gradients (decoding) go
    /// through stlm-core's small-batch kernel, everything else through libtorch.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_with(x, None)
    }

    /// [`Linear::forward`] of one application with its low-rank update `delta` merged into the
    /// weight (per-layer LoRA on a shared block).
    pub fn forward_with(&self, x: &Tensor, delta: Option<LowRank<'_>>) -> Tensor {
        Linear::record(&[self], x);
        match delta {
            Some(d) => dense_linear(x, &self.weight_with(Some(d)), self.bias.as_ref()),
            None => self.weight.forward(x, self.bias.as_ref()),
        }
    }

    /// The weight one application multiplies with: this layer's, plus `B A` of `delta`.
    fn weight_with(&self, delta: Option<LowRank<'_>>) -> Tensor {
        match delta {
            Some(d) => self.weight.value() + d.b.matmul(d.a),
            None => self.weight.value(),
        }
    }

    /// `parts` (which read the same input `x`) applied in one product of their concatenated
    /// weights, `[.., in] -> [.., sum of out]`: one larger GEMM forward and backward instead of
    /// several small ones (the training path; decoding fuses once, see [`Linear::fuse`]).
    pub fn forward_concat(parts: &[&Linear], x: &Tensor) -> Tensor {
        Linear::forward_concat_with(parts, &vec![None; parts.len()], x)
    }

    /// [`Linear::forward_concat`] with each part's low-rank update `deltas[i]` merged in.
    pub fn forward_concat_with(parts: &[&Linear], deltas: &[Option<LowRank<'_>>], x: &Tensor) -> Tensor {
        if parts.iter().any(|p| p.weight.variable().is_none()) {
            // Quantized parts multiply with their own blocks (one row: the integer kernel).
            let outs: Vec<Tensor> = parts.iter().zip(deltas).map(|(p, d)| p.forward_with(x, *d)).collect();
            return Tensor::cat(&outs, -1);
        }
        Linear::record(parts, x);
        let weights: Vec<Tensor> = parts.iter().zip(deltas).map(|(p, d)| p.weight_with(*d)).collect();
        let weight = Tensor::cat(&weights, 0);
        let biases: Option<Vec<&Tensor>> = parts.iter().map(|p| p.bias.as_ref()).collect();
        let bias = biases.map(|b| Tensor::cat(&b, 0));
        dense_linear(x, &weight, bias.as_ref())
    }

    /// One linear computing `parts` (which read the same input) in a single product; the
    /// weights and biases of `parts` become views of its rows, so they stay the variables that
    /// are trained and saved, and the fused layer always sees their values. `None` when a part's
    /// weight is not a float tensor (quantized blocks stay per layer).
    pub fn fuse(parts: &mut [&mut Linear]) -> Option<Linear> {
        if parts.iter().any(|p| p.weight.variable().is_none()) {
            return None;
        }
        let weight = Tensor::cat(&parts.iter().map(|p| p.weight.value()).collect::<Vec<_>>(), 0);
        let biases: Option<Vec<&Tensor>> = parts.iter().map(|p| p.bias.as_ref()).collect();
        let bias = biases.map(|b| Tensor::cat(&b, 0));
        let mut offset = 0;
        for p in parts.iter_mut() {
            let n = p.weight.shape().0;
            match &mut p.weight {
                Weight::Dense(w) => w.set_data(&weight.narrow(0, offset, n)),
                Weight::Quantized(_) => unreachable!("checked above: every part is float"),
            }
            if let (Some(pb), Some(b)) = (p.bias.as_mut(), bias.as_ref()) {
                pb.set_data(&b.narrow(0, offset, n));
            }
            offset += n;
        }
        Some(Linear::from_dense(weight, bias))
    }
}

/// A low-rank update `B A` of one projection's weight in one application of a shared block
/// (per-layer LoRA, see [`crate::lora`]).
#[derive(Debug, Clone, Copy)]
pub struct LowRank<'a> {
    /// `[rank, in]`.
    pub a: &'a Tensor,
    /// `[out, rank]`.
    pub b: &'a Tensor,
}

/// The low-rank updates of one application of a block with a dense MLP: one per projection.
#[derive(Debug, Clone, Copy)]
pub struct Adapter<'a> {
    /// q, k, v and o.
    pub attention: [LowRank<'a>; 4],
    /// The gate (gated MLPs only), up and down projections.
    pub mlp: (Option<LowRank<'a>>, LowRank<'a>, LowRank<'a>),
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
                if let Some(y) = small_batch_rms_norm(x, &self.weight, self.eps) {
                    return y;
                }
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
            Activation::Relu2 => x.relu().square(),
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
    /// `gate_proj` and `up_proj` in one product, for decoding (see [`Linear::fuse`]).
    pub gate_up: Option<Linear>,
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
            gate_up: None,
        }
    }

    /// The same block (its tensors, not copies), for an FFN tied across blocks.
    pub fn share(&self) -> Mlp {
        Mlp {
            gate_proj: self.gate_proj.as_ref().map(Linear::share),
            up_proj: self.up_proj.share(),
            down_proj: self.down_proj.share(),
            act: self.act,
            gate_up: self.gate_up.as_ref().map(Linear::share),
        }
    }

    /// Fuses the gate and up projections (gated MLPs) for fast decoding.
    pub fn prepare_for_decoding(&mut self) {
        if let Some(gate) = self.gate_proj.as_mut() {
            self.gate_up = Linear::fuse(&mut [gate, &mut self.up_proj]);
        }
    }

    /// `[b, s, hidden] -> [b, s, hidden]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_with(x, None)
    }

    /// [`Mlp::forward`] of one application with its low-rank updates (gate, up, down).
    pub fn forward_with(&self, x: &Tensor, adapter: Option<&Adapter<'_>>) -> Tensor {
        let Some(&Adapter { mlp: (gate_delta, up_delta, down_delta), .. }) = adapter else { return self.forward_plain(x) };
        let width = self.up_proj.weight.shape().0;
        let hidden = match &self.gate_proj {
            Some(gate) => {
                let both = Linear::forward_concat_with(&[gate, &self.up_proj], &[gate_delta, Some(up_delta)], x);
                self.act.forward(&both.narrow(-1, 0, width)) * both.narrow(-1, width, width)
            }
            None => self.act.forward(&self.up_proj.forward_with(x, Some(up_delta))),
        };
        self.down_proj.forward_with(&hidden, Some(down_delta))
    }

    fn forward_plain(&self, x: &Tensor) -> Tensor {
        let hidden = match (&self.gate_up, &self.gate_proj) {
            (Some(fused), _) => {
                let width = self.up_proj.weight.shape().0;
                let both = fused.forward(x);
                self.act.forward(&both.narrow(-1, 0, width)) * both.narrow(-1, width, width)
            }
            (None, Some(gate)) => {
                let width = self.up_proj.weight.shape().0;
                let both = Linear::forward_concat(&[gate, &self.up_proj], x);
                self.act.forward(&both.narrow(-1, 0, width)) * both.narrow(-1, width, width)
            }
            (None, None) => self.act.forward(&self.up_proj.forward(x)),
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
    /// q, k and v projections in one product, for decoding (see [`Linear::fuse`]).
    pub qkv: Option<Linear>,
    /// Which attention this layer computes, with what its kind learns (one value, so the kernel
    /// always gets its kind's tensors).
    pub attention: LayerAttention,
    /// Per-head q/k norms (`qk_norm`, and always with `doge-dma`), if any.
    pub qk_norm: Option<QkNorm>,
    /// ALiBi slopes `[heads]` (fixed, not trained) when positions are ALiBi biases.
    pub alibi_slopes: Option<Tensor>,
    /// True when `o_proj` is block 0's (`layer_sharing.o_proj`), which lists it.
    pub o_proj_tied: bool,
}

/// What a model layer's attention kinds learn: variables under the layer's path (see
/// [`stlm_attention::Attention`]; the config's kind is built into this by [`SelfAttention::new`]).
#[derive(Debug)]
pub struct LayerTensors;

impl Learned for LayerTensors {
    type HeadScale = Tensor;
    type KeyBias = DynamicMask;
    type Projections = LinformerProjection;
}

impl KernelTensors for LayerTensors {
    fn head_scale(s: &Tensor) -> &Tensor {
        s
    }
    fn key_bias(b: &DynamicMask, v: &Tensor) -> Tensor {
        b.dt(v)
    }
    fn projections(p: &LinformerProjection) -> (&Tensor, &Tensor) {
        (&p.e, p.f.as_ref().unwrap_or(&p.e))
    }
}

/// A layer's attention: its kind with the tensors it learns.
pub type LayerAttention = Attention<LayerTensors>;

/// Makes a kind's tensors as variables of the layer at `path` with `cfg`'s shapes.
struct LayerVariables<'a> {
    path: &'a nn::Path<'a>,
    cfg: &'a ModelConfig,
}

impl Build<LayerTensors> for LayerVariables<'_> {
    fn head_scale(&mut self, name: &'static str, init: f64) -> Tensor {
        self.path.var(name, &[self.cfg.num_attention_heads], Init::Const(init))
    }
    fn key_bias(&mut self) -> DynamicMask {
        let (nkv, d, cfg) = (self.cfg.num_key_value_heads, self.cfg.head_dim(), self.cfg);
        DynamicMask {
            a: self.path.var("A", &[nkv], Init::Const(0.0)),
            dt_proj: Linear::new(self.path / "dt_proj", nkv * d, nkv, cfg.attention_bias, cfg.initializer_range),
        }
    }
    fn projections(&mut self, k: i64, sharing: LinformerSharing) -> LinformerProjection {
        LinformerProjection::new(self.path / "linformer", self.cfg.num_attention_heads, k, self.cfg.max_position_embeddings, sharing)
    }
}

/// What Doge's Dynamic Mask Attention adds to a layer (names as transformers' `DogeAttention`):
/// the per-key bias `dt = exp(A · softplus(dt_proj(v)))` from the values (and, in
/// [`SelfAttention::qk_norm`], per-head RMSNorm of queries and keys).
#[derive(Debug)]
pub struct DynamicMask {
    /// `[kv_heads]`, initialised to zero (`self_attn.A`).
    pub a: Tensor,
    /// `[kv_heads, kv_heads * head_dim]` (`self_attn.dt_proj`).
    pub dt_proj: Linear,
}

/// RMSNorm over each query head and each key head, before the rotary embedding.
#[derive(Debug)]
pub struct QkNorm {
    /// `[head_dim]` (`self_attn.q_norm`).
    pub q_norm: Norm,
    /// `[head_dim]` (`self_attn.k_norm`).
    pub k_norm: Norm,
}

impl DynamicMask {
    /// `dt` `[b, kv_heads, keys]` for values `v` `[b, kv_heads, keys, d]`.
    pub fn dt(&self, v: &Tensor) -> Tensor {
        let (b, keys) = (v.size()[0], v.size()[2]);
        let flat = v.transpose(1, 2).reshape([b, keys, -1]); // [b, keys, kv_heads * d]
        (&self.a * self.dt_proj.forward(&flat).softplus()).exp().transpose(1, 2)
    }
}

impl SelfAttention {
    /// Builds the projections of layer `layer`; `resid_std` initialises `o_proj`.
    pub fn new(path: nn::Path, cfg: &ModelConfig, layer: usize, resid_std: f64) -> Self {
        Self::with_o_proj(path, cfg, layer, resid_std, None)
    }

    /// [`SelfAttention::new`] with `o_proj` taken from another layer (tied weights) when given.
    pub fn with_o_proj(path: nn::Path, cfg: &ModelConfig, layer: usize, resid_std: f64, o_proj: Option<Linear>) -> Self {
        let (h, d, b, std) = (cfg.hidden_size, cfg.head_dim(), cfg.attention_bias, cfg.initializer_range);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let attention = cfg.layer_attention(layer).build(cfg.max_position_embeddings, &mut LayerVariables { path: &path, cfg });
        let dma = matches!(attention, Attention::DogeDma { .. });
        let qk_norm = (dma || cfg.qk_norm).then(|| QkNorm {
            q_norm: Norm::new(&path / "q_norm", NormKind::RmsNorm, d, cfg.norm_eps),
            k_norm: Norm::new(&path / "k_norm", NormKind::RmsNorm, d, cfg.norm_eps),
        });
        let alibi_slopes = (cfg.position == PositionKind::Alibi).then(|| alibi_slope_tensor(nh, path.device()));
        SelfAttention {
            attention,
            qk_norm,
            alibi_slopes,
            q_proj: Linear::new(&path / "q_proj", h, nh * d, b, std),
            k_proj: Linear::new(&path / "k_proj", h, nkv * d, b, std),
            v_proj: Linear::new(&path / "v_proj", h, nkv * d, b, std),
            o_proj_tied: o_proj.is_some(),
            o_proj: o_proj.unwrap_or_else(|| Linear::new(&path / "o_proj", nh * d, h, cfg.o_proj_bias(), resid_std)),
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: d,
            qkv: None,
        }
    }

    /// This layer's attention kernel alone (with what its kind learns) of queries `q`
    /// `[b, heads, s, d]` over keys and values `[b, kv_heads, keys, d]` under `mask`: a
    /// whole sequence from position 0 (`Causal`, or `Full` for a bidirectional kind).
    pub fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask) -> Tensor {
        // The one mask a kind refuses is a causal one for Linformer, which the config keeps out
        // of decoders (`ModelConfig::validate`): a layer never sees it.
        self.attention.forward(q, k, v, mask).unwrap_or_else(|e| panic!("layers run their kind under the masks it takes: {e}"))
    }

    /// Fuses the q, k, v projections for fast decoding.
    pub fn prepare_for_decoding(&mut self) {
        self.qkv = Linear::fuse(&mut [&mut self.q_proj, &mut self.k_proj, &mut self.v_proj]);
    }

    /// Queries `[b, heads, s, d]`, keys and values `[b, kv_heads, s, d]` of `x` `[b, s, hidden]`
    /// (q/k norms and rotary angles applied).
    fn project(&self, x: &Tensor, rotary: Option<&RotaryAngles>, adapter: Option<&Adapter<'_>>) -> (Tensor, Tensor, Tensor) {
        let (b, s) = (x.size()[0], x.size()[1]);
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let parts = [&self.q_proj, &self.k_proj, &self.v_proj];
        let projected = match (adapter, &self.qkv) {
            (Some(a), _) => Linear::forward_concat_with(&parts, &[Some(a.attention[0]), Some(a.attention[1]), Some(a.attention[2])], x),
            (None, Some(qkv)) => qkv.forward(x),
            (None, None) => Linear::forward_concat(&parts, x),
        };
        let all = projected.view([b, s, nh + 2 * nkv, d]).transpose(1, 2); // [b, h + 2 kvh, s, d]
        let qk = match &self.qk_norm {
            Some(n) => Tensor::cat(
                &[n.q_norm.forward(&all.narrow(1, 0, nh)), n.k_norm.forward(&all.narrow(1, nh, nkv))],
                1,
            ),
            None => all.narrow(1, 0, nh + nkv),
        };
        let qk = match rotary {
            Some(r) => apply_rotary(&qk, &r.cos, &r.sin), // q and k rotated in one pass
            None => qk,
        };
        (qk.narrow(1, 0, nh), qk.narrow(1, nh, nkv), all.narrow(1, nh + nkv, nkv))
    }

    /// Writes the keys and values of `x` (the block's normed input `[b, s, hidden]`) into
    /// `cache` as layer `layer` without attending: an early exit's copied state for the layers
    /// it skips. Call [`KvCache::advance`] after.
    pub fn write_kv(&self, x: &Tensor, rotary: Option<&RotaryAngles>, cache: &KvCache, layer: usize) {
        self.write_kv_with(x, rotary, cache, layer, None)
    }

    /// [`SelfAttention::write_kv`] of one application with its low-rank updates.
    pub fn write_kv_with(&self, x: &Tensor, rotary: Option<&RotaryAngles>, cache: &KvCache, layer: usize, adapter: Option<&Adapter<'_>>) {
        let (_, k, v) = self.project(x, rotary, adapter);
        let _ = cache.update(layer, &k, &v);
    }

    /// True when [`SelfAttention::attention_log_probs`] can give this layer's attention: dense
    /// softmax attention without ALiBi biases.
    pub fn has_attention_probs(&self) -> bool {
        self.attention.is_dense() && self.alibi_slopes.is_none()
    }

    /// Log attention probabilities `[b, heads, s, s]` (queries x keys; future keys -inf) of a
    /// causal pass from position 0 over `x` `[b, s, hidden]` (the block's normed input), for
    /// layers where [`SelfAttention::has_attention_probs`]; `None` for other kinds.
    pub fn attention_log_probs(&self, x: &Tensor, rotary: Option<&RotaryAngles>) -> Option<Tensor> {
        self.attention_log_probs_with(x, rotary, None)
    }

    /// [`SelfAttention::attention_log_probs`] of one application with its low-rank updates.
    pub fn attention_log_probs_with(&self, x: &Tensor, rotary: Option<&RotaryAngles>, adapter: Option<&Adapter<'_>>) -> Option<Tensor> {
        if !self.has_attention_probs() {
            return None;
        }
        let (q, k, _) = self.project(x, rotary, adapter);
        let (s, group) = (q.size()[2], self.num_heads / self.num_kv_heads);
        let k = if group > 1 { k.repeat_interleave_self_int(group, 1, None) } else { k };
        let scores = q.matmul(&k.transpose(-2, -1)) / (self.head_dim as f64).sqrt(); // [b, h, s, s]
        let future = Tensor::ones([s, s], (Kind::Bool, x.device())).triu(1);
        Some(scores.masked_fill(&future, f64::NEG_INFINITY).log_softmax(-1, Kind::Float))
    }

    /// `[b, s, hidden] -> [b, s, hidden]` for tokens at `positions` `[b, s]`, with this
    /// application's low-rank updates (per-layer LoRA) if any. With a cache, keys and values of
    /// this layer are appended to it and attention sees the cached positions.
    pub fn forward(
        &self,
        x: &Tensor,
        rotary: Option<&RotaryAngles>,
        positions: &Tensor,
        mask: &AttentionMask,
        cache: Option<(&KvCache, usize)>,
        adapter: Option<&Adapter<'_>>,
    ) -> Tensor {
        let (b, s) = (x.size()[0], x.size()[1]);
        let (q, k, v) = self.project(x, rotary, adapter);
        let past = cache.map_or(0, |(c, _)| c.len());
        let (k, v, key_positions) = match cache {
            Some((cache, layer)) => {
                let seen = cache.update(layer, &k, &v);
                (seen.keys, seen.values, seen.positions)
            }
            None => (k, v, None),
        };
        // Over a whole sequence from position 0 each kind runs its own kernel (a bidirectional
        // kind over the full sequence too); otherwise its pattern becomes an explicit mask over
        // the keys (dense attention takes `mask` as is).
        let whole = past == 0 && key_positions.is_none();
        let bidirectional = matches!(mask, AttentionMask::Full) && self.attention.not_causal_because().is_some();
        let own_kernel = whole && (matches!(mask, AttentionMask::Causal) || bidirectional);
        let out = if let Some(slopes) = &self.alibi_slopes {
            // Dense attention with ALiBi's biases (the config allows no other kind).
            let bias = alibi_mask(slopes, s, k.size()[2], mask, q.kind());
            dense_attention(&q, &k, &v, &AttentionMask::Explicit(bias), None)
        } else if own_kernel || self.attention.uses_plain_mask() {
            self.attend(&q, &k, &v, mask)
        } else {
            // Left padding: a row's positions lag its cache slots by its padding.
            let offsets = (positions.select(1, s - 1) - (past + s - 1)).neg();
            let mask = self.attention.mask(past, s, key_positions.as_ref(), Some(&offsets), mask, x.device());
            self.attend(&q, &k, &v, &mask)
        }; // [b, h, s, d]
        let out = out.transpose(1, 2).reshape([b, s, self.num_heads * self.head_dim]);
        self.o_proj.forward_with(&out, adapter.map(|a| a.attention[3]))
    }
}

/// One pre-norm decoder block: `x + attn(norm(x))`, then `x + mlp(norm(x))` (after projecting
/// a stream of another width to its own).
#[derive(Debug)]
pub struct DecoderLayer {
    /// Projection of the incoming stream to this block's width `[hidden, incoming]`
    /// (`in_proj`), when the widths differ (`layer_shapes`).
    pub in_proj: Option<Linear>,
    /// Norm before attention.
    pub input_layernorm: Norm,
    /// Self-attention.
    pub self_attn: SelfAttention,
    /// Norm before the MLP.
    pub post_attention_layernorm: Norm,
    /// Feed-forward block.
    pub mlp: FeedForward,
    /// Scale of the skip path around attention `[hidden]` (`input_residual`), if any.
    pub input_residual: Option<Tensor>,
    /// Scale of the skip path around the feed-forward block `[hidden]` (`post_attention_residual`).
    pub post_attention_residual: Option<Tensor>,
    /// True when `mlp` is block 0's (`layer_sharing.mlp`), which lists it.
    pub mlp_tied: bool,
}

/// The feed-forward block of a layer: dense, or a mixture of experts.
#[derive(Debug)]
pub enum FeedForward {
    /// One MLP.
    Dense(Mlp),
    /// A mixture of experts (`[model.moe]`).
    Moe(MoeLayer),
    /// Doge's cross-domain MoE (`cdmoe`).
    CdMoe(CdMoe),
}

impl FeedForward {
    /// `[b, s, hidden] -> [b, s, hidden]`, as in evaluation.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_with(x, Mode::Eval, None).0
    }

    /// `[b, s, hidden] -> [b, s, hidden]` in `mode` with this application's low-rank updates
    /// (dense MLPs), and a mixture of experts' stats.
    pub fn forward_with(&self, x: &Tensor, mode: Mode, adapter: Option<&Adapter<'_>>) -> (Tensor, Option<MoeStats>) {
        match self {
            FeedForward::Dense(m) => (m.forward_with(x, adapter), None),
            FeedForward::Moe(m) => {
                let (y, stats) = m.forward(x, mode);
                (y, Some(stats))
            }
            FeedForward::CdMoe(m) => (m.forward(x), None),
        }
    }

    /// The dense MLP, if this block is one.
    pub fn dense(&self) -> Option<&Mlp> {
        match self {
            FeedForward::Dense(m) => Some(m),
            FeedForward::Moe(_) | FeedForward::CdMoe(_) => None,
        }
    }
}

impl DecoderLayer {
    /// Builds block `layer` at `path` (`model.layers.{layer}`).
    pub fn new(path: nn::Path, cfg: &ModelConfig, layer: usize) -> Self {
        Self::tied_to(path, cfg, layer, None)
    }

    /// [`DecoderLayer::new`], taking from `first` (block 0) the weights `cfg.layer_sharing` ties
    /// across blocks (its FFN, its attention output projection) instead of creating them.
    pub fn tied_to(path: nn::Path, cfg: &ModelConfig, layer: usize, first: Option<&DecoderLayer>) -> Self {
        // Residual projections shrink with the applied depth (each repeat adds to the stream).
        let resid_std = cfg.initializer_range / (2.0 * cfg.depth() as f64).sqrt();
        let sharing = cfg.layer_sharing.as_ref();
        let tied_o = first.filter(|_| sharing.is_some_and(|s| s.o_proj)).map(|f| f.self_attn.o_proj.share());
        let tied_mlp = first.filter(|_| sharing.is_some_and(|s| s.mlp)).and_then(|f| f.mlp.dense()).map(Mlp::share);
        DecoderLayer {
            in_proj: None,
            mlp_tied: tied_mlp.is_some(),
            input_layernorm: Norm::new(&path / "input_layernorm", cfg.norm, cfg.hidden_size, cfg.norm_eps),
            self_attn: SelfAttention::with_o_proj(&path / "self_attn", cfg, layer, resid_std, tied_o),
            post_attention_layernorm: Norm::new(
                &path / "post_attention_layernorm",
                cfg.norm,
                cfg.hidden_size,
                cfg.norm_eps,
            ),
            input_residual: cfg.residual_scales.then(|| path.var("input_residual", &[cfg.hidden_size], Init::Const(1.0))),
            post_attention_residual: cfg
                .residual_scales
                .then(|| path.var("post_attention_residual", &[cfg.hidden_size], Init::Const(1.0))),
            mlp: match (tied_mlp, cfg.layer_moe(layer), &cfg.cdmoe) {
                (Some(tied), _, _) => FeedForward::Dense(tied),
                (None, None, Some(c)) => FeedForward::CdMoe(CdMoe::new(
                    &path / "mlp",
                    cfg.hidden_size,
                    cfg.intermediate_size,
                    c.num_experts,
                    c.top_k,
                    c.norm_topk_prob,
                    c.routing,
                    cfg.initializer_range,
                    resid_std,
                )),
                (None, None, None) => FeedForward::Dense(Mlp::new(&path / "mlp", cfg, resid_std)),
                (None, Some(moe), _) => FeedForward::Moe(MoeLayer::new(
                    &path / "mlp",
                    cfg.hidden_size,
                    cfg.intermediate_size,
                    moe,
                    cfg.initializer_range,
                    resid_std,
                )),
            },
        }
    }

    /// `[b, s, hidden] -> [b, s, hidden]` for tokens at `positions` `[b, s]`, as in evaluation.
    pub fn forward(
        &self,
        x: &Tensor,
        rotary: Option<&RotaryAngles>,
        positions: &Tensor,
        mask: &AttentionMask,
        cache: Option<(&KvCache, usize)>,
    ) -> Tensor {
        self.forward_with(x, rotary, positions, mask, cache, Mode::Eval, None).0
    }

    /// [`DecoderLayer::forward`] in `mode`, with this application's low-rank updates (per-layer
    /// LoRA) if any, and the stats of an MoE feed-forward block.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_with(
        &self,
        x: &Tensor,
        rotary: Option<&RotaryAngles>,
        positions: &Tensor,
        mask: &AttentionMask,
        cache: Option<(&KvCache, usize)>,
        mode: Mode,
        adapter: Option<&Adapter<'_>>,
    ) -> (Tensor, Option<MoeStats>) {
        let skip = |x: &Tensor, scale: &Option<Tensor>| match scale {
            Some(r) => x * r,
            None => x.shallow_clone(),
        };
        let x = &self.project_in(x);
        let attended = self.self_attn.forward(&self.input_layernorm.forward(x), rotary, positions, mask, cache, adapter);
        let x = skip(x, &self.input_residual) + attended;
        let (y, stats) = self.mlp.forward_with(&self.post_attention_layernorm.forward(&x), mode, adapter);
        (skip(&x, &self.post_attention_residual) + y, stats)
    }

    /// [`SelfAttention::write_kv`] of this block for its input `x` (the stream it would receive).
    pub fn write_kv(&self, x: &Tensor, rotary: Option<&RotaryAngles>, cache: &KvCache, layer: usize) {
        self.write_kv_with(x, rotary, cache, layer, None)
    }

    /// [`DecoderLayer::write_kv`] of one application with its low-rank updates.
    pub fn write_kv_with(&self, x: &Tensor, rotary: Option<&RotaryAngles>, cache: &KvCache, layer: usize, adapter: Option<&Adapter<'_>>) {
        self.self_attn.write_kv_with(&self.input_layernorm.forward(&self.project_in(x)), rotary, cache, layer, adapter);
    }

    /// The stream `x` at this block's width (through `in_proj` when it has one).
    pub fn project_in(&self, x: &Tensor) -> Tensor {
        match &self.in_proj {
            Some(p) => p.forward(x),
            None => x.shallow_clone(),
        }
    }

    /// The aux-free bias move of this block's MoE layer for `stats` of its forward, if any.
    pub fn balance_update(&self, stats: &MoeStats) -> Option<stlm_core::BufferUpdate> {
        match &self.mlp {
            FeedForward::Moe(m) => m.balance_update(stats),
            FeedForward::Dense(_) | FeedForward::CdMoe(_) => None,
        }
    }
}
