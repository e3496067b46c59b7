//! A fused decoding step: one new token of one sequence, float32 on the CPU, computed in Rust
//! over the model's weights and the KV cache's memory instead of one libtorch call per operation.
//!
//! At batch 1 a model of a few million parameters spends as much time in libtorch's
//! per-operation dispatch (about 25 calls a layer, a few microseconds each) as in arithmetic.
//! [`FastDecoder::step`] computes what [`DecoderModel::forward_ext`] computes for one position,
//! with stlm-core's slice kernels, reading and writing the same [`KvCache`]; so a prompt can be
//! prefilled by libtorch and continued here. [`crate::generate`] uses it whenever
//! [`FastDecoder::new`] accepts the model. Tests compare its logits with the libtorch path.

use crate::depth::Depth;
use crate::config::{Activation, NormKind, PositionKind};
use crate::layers::{DecoderLayer, FeedForward, Linear, Mlp, Norm, SelfAttention};
use crate::weight::Weight;
use crate::DecoderModel;
use stlm_attention::KvCache;
use stlm_core::kernels::{f32_slice, layer_norm_row, rms_norm_row, Rows};
use stlm_core::qmatvec::{matvec_add_split_many, with_quantized, QuantRows};
use stlm_core::spin::SpinPool;
use tch::{Device, Kind, Tensor};

/// A weight matrix as the step reads it: float32 rows, or quantized blocks (whose product
/// quantizes the input per block and multiplies in integers, see [`stlm_core::qmatvec`]).
#[derive(Debug, Clone, Copy)]
enum Matrix<'m> {
    Float(Rows<'m>),
    Quantized(QuantRows<'m>),
}

impl<'m> Matrix<'m> {
    fn of(w: &'m Weight) -> Fused<Self> {
        Ok(match w {
            Weight::Dense(w) => Matrix::Float(Rows::from_tensor(w).ok_or_else(not_row_major)?),
            Weight::Quantized(q) => Matrix::Quantized(q.matrix.rows()),
        })
    }

    fn rows(&self) -> usize {
        match self {
            Matrix::Float(m) => m.rows(),
            Matrix::Quantized(m) => m.rows(),
        }
    }

    fn cols(&self) -> usize {
        match self {
            Matrix::Float(m) => m.cols(),
            Matrix::Quantized(m) => m.cols(),
        }
    }

    /// `y += W x`, split over `pool`.
    fn matvec_add_split(&self, x: &[f32], y: &mut [f32], pool: &SpinPool) {
        match self {
            Matrix::Float(m) => m.matvec_add_split(x, y, pool),
            Matrix::Quantized(m) => with_quantized(x, |q| m.matvec_add_split(q, y, pool)),
        }
    }
}

/// A linear layer as slices: `y = W x + b`.
struct Affine<'m> {
    weight: Matrix<'m>,
    bias: Option<&'m [f32]>,
}

impl<'m> Affine<'m> {
    fn new(l: &'m Linear) -> Fused<Self> {
        // Every field named: a new one fails to compile here until the step handles it.
        let Linear { weight, bias, tap } = l;
        if tap.is_some() {
            return refuse("a projection records its inputs for calibration (a pruning tap is set)");
        }
        let bias = match bias {
            Some(b) => Some(f32_slice(b).ok_or_else(not_row_major)?),
            None => None,
        };
        Ok(Affine { weight: Matrix::of(weight)?, bias })
    }

    /// Writes `W x + b` to `y`.
    fn apply(&self, x: &[f32], y: &mut [f32], pool: &SpinPool) {
        match self.bias {
            Some(b) => y.copy_from_slice(b),
            None => y.fill(0.0),
        }
        self.weight.matvec_add_split(x, y, pool);
    }
}

/// Several linear layers reading the same input, writing consecutive parts of one output (q, k,
/// v; gate, up), or one already fused layer; when every part is quantized, their blocks (decided
/// once here), multiplied in one round of the pool with the input quantized once.
struct Stacked<'m> {
    parts: Vec<Affine<'m>>,
    quantized: Option<Vec<QuantRows<'m>>>,
}

impl<'m> Stacked<'m> {
    fn new(fused: Option<&'m Linear>, parts: &[&'m Linear]) -> Fused<Self> {
        let parts = match fused {
            Some(f) => vec![Affine::new(f)?],
            None => parts.iter().map(|&p| Affine::new(p)).collect::<Fused<_>>()?,
        };
        let quantized = parts
            .iter()
            .map(|p| match p.weight {
                Matrix::Quantized(m) => Some(m),
                Matrix::Float(_) => None,
            })
            .collect();
        Ok(Stacked { parts, quantized })
    }

    fn apply(&self, x: &[f32], y: &mut [f32], pool: &SpinPool) {
        let Some(matrices) = &self.quantized else {
            let mut offset = 0;
            for part in &self.parts {
                let n = part.weight.rows();
                part.apply(x, &mut y[offset..offset + n], pool);
                offset += n;
            }
            return;
        };
        let mut rest = y;
        let mut outputs = Vec::with_capacity(matrices.len());
        for (part, &m) in self.parts.iter().zip(matrices) {
            let (mine, after) = rest.split_at_mut(m.rows());
            match part.bias {
                Some(b) => mine.copy_from_slice(b),
                None => mine.fill(0.0),
            }
            outputs.push((m, mine));
            rest = after;
        }
        with_quantized(x, |q| matvec_add_split_many(&mut outputs, q, pool));
    }
}

/// A norm as slices.
struct NormRow<'m> {
    kind: NormKind,
    weight: &'m [f32],
    bias: Option<&'m [f32]>,
    eps: f32,
}

impl<'m> NormRow<'m> {
    fn new(n: &'m Norm) -> Fused<Self> {
        let Norm { kind, weight, bias, eps } = n;
        let bias = match bias {
            Some(b) => Some(f32_slice(b).ok_or_else(not_row_major)?),
            None => None,
        };
        Ok(NormRow { kind: *kind, weight: f32_slice(weight).ok_or_else(not_row_major)?, bias, eps: *eps as f32 })
    }

    fn apply(&self, x: &[f32], out: &mut [f32]) {
        match self.kind {
            NormKind::RmsNorm => rms_norm_row(x, self.weight, self.eps, out),
            NormKind::LayerNorm => layer_norm_row(x, self.weight, self.bias, self.eps, out),
        }
    }
}

/// One decoder block as slices.
struct Block<'m> {
    input_norm: NormRow<'m>,
    qkv: Stacked<'m>,
    o_proj: Affine<'m>,
    post_norm: NormRow<'m>,
    /// Gate and up (gated MLP, in that order) or up alone.
    up: Stacked<'m>,
    down: Affine<'m>,
    act: Activation,
    gated: bool,
}

/// Why a model has no fused step (see [`FastDecoder::try_new`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no fused decoding step: {0}")]
pub struct NoFusedStep(pub String);

/// A fused piece of a model, or why it has none.
type Fused<T> = std::result::Result<T, NoFusedStep>;

fn refuse<T>(why: impl Into<String>) -> Fused<T> {
    Err(NoFusedStep(why.into()))
}

fn not_row_major() -> NoFusedStep {
    NoFusedStep("weights are not float32 row-major tensors on the CPU".into())
}

impl<'m> Block<'m> {
    /// The fused pieces of `layer`, for a model whose every block is `hidden` wide with `heads`
    /// (`kv_heads`) heads; each field of the layer either has a fused counterpart or refuses.
    fn new(layer: &'m DecoderLayer, hidden: i64, heads: i64, kv_heads: i64) -> Fused<Self> {
        let DecoderLayer { in_proj, input_layernorm, self_attn, post_attention_layernorm, mlp, input_residual, post_attention_residual, mlp_tied: _ } =
            layer;
        if in_proj.is_some() || input_layernorm.weight.size()[0] != hidden {
            return refuse("blocks of another width than the model's (`layer_shapes`)");
        }
        if input_residual.is_some() || post_attention_residual.is_some() {
            return refuse("learned residual scales (`residual_scales`)");
        }
        let SelfAttention { q_proj, k_proj, v_proj, o_proj, num_heads, num_kv_heads, head_dim: _, qkv, attention, qk_norm, alibi_slopes, o_proj_tied: _ } =
            self_attn;
        if !attention.is_dense() {
            return refuse(format!("attention kind `{}` (the step computes dense attention)", attention.name()));
        }
        if qk_norm.is_some() {
            return refuse("per-head q/k norms (`qk_norm`)");
        }
        if alibi_slopes.is_some() {
            return refuse("ALiBi position biases");
        }
        if (*num_heads, *num_kv_heads) != (heads, kv_heads) {
            return refuse("per-layer head counts (`layer_shapes`)");
        }
        let m = match mlp {
            FeedForward::Dense(m) => m,
            FeedForward::Moe(_) | FeedForward::CdMoe(_) => return refuse("a mixture of experts"),
        };
        let Mlp { gate_proj, up_proj, down_proj, act, gate_up } = m;
        if *act == Activation::Gelu {
            return refuse("exact GELU (the step has the tanh approximation, SiLU and ReLU kernels)");
        }
        let up = match gate_proj {
            Some(gate) => Stacked::new(gate_up.as_ref(), &[gate, up_proj])?,
            None => Stacked::new(None, &[up_proj])?,
        };
        Ok(Block {
            input_norm: NormRow::new(input_layernorm)?,
            qkv: Stacked::new(qkv.as_ref(), &[q_proj, k_proj, v_proj])?,
            o_proj: Affine::new(o_proj)?,
            post_norm: NormRow::new(post_attention_layernorm)?,
            up,
            down: Affine::new(down_proj)?,
            act: *act,
            gated: gate_proj.is_some(),
        })
    }
}

/// Work buffers, allocated once.
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    normed: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    scores: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
    out: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// The decoding step of one model over borrowed weights (see the module docs).
pub struct FastDecoder<'m> {
    embed: Rows<'m>,
    positions: Option<Rows<'m>>,
    inv_freq: Option<Vec<f32>>,
    /// cos and sin are multiplied by this (YaRN).
    rope_factor: f32,
    /// Leading dimensions of each head that rotate.
    rotary_dim: usize,
    blocks: Vec<Block<'m>>,
    /// The block of every applied layer.
    schedule: Vec<usize>,
    norm: NormRow<'m>,
    head: Matrix<'m>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scratch: Scratch,
    /// Splits the products over libtorch's intra-op thread count (`--threads`).
    pool: SpinPool,
}

impl<'m> FastDecoder<'m> {
    /// The fused step for `model`, or `None` when it has none (see [`FastDecoder::try_new`]).
    pub fn new(model: &'m DecoderModel) -> Option<Self> {
        Self::try_new(model).ok()
    }

    /// The fused step for `model`, or the reason it has none: each part of the model (its
    /// fields are all named here, so a new one cannot be skipped silently) either has a fused
    /// counterpart or refuses with a reason; then decode with libtorch. The model's weights
    /// must not change while the decoder is alive.
    pub fn try_new(model: &'m DecoderModel) -> Fused<Self> {
        let DecoderModel { config: cfg, embed_tokens, embed_positions, layers, norm, lm_head, embed_quantized, residual_root, out_proj, lora, rope, vs: _ } = model;
        if model.device() != Device::Cpu || model.kind() != Kind::Float {
            return Err(not_row_major());
        }
        if residual_root.is_some() {
            return refuse("a residual root (`residual_root`)");
        }
        if out_proj.is_some() {
            return refuse("blocks of another width than the model's (`layer_shapes`)");
        }
        if !lora.is_empty() {
            return refuse("per-layer LoRA updates (`layer_sharing.lora_rank`)");
        }
        let (hidden, heads, kv_heads) = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads);
        let blocks = layers.iter().map(|l| Block::new(l, hidden, heads, kv_heads)).collect::<Fused<Vec<_>>>()?;
        let embed = Rows::from_tensor(embed_tokens).ok_or_else(not_row_major)?;
        let head = match lm_head {
            Some(h) if h.bias.is_none() => Affine::new(h)?.weight,
            Some(_) => return refuse("an output head with a bias"),
            None => match embed_quantized {
                Some(q) => Matrix::Quantized(q.matrix.rows()),
                None => Matrix::Float(embed),
            },
        };
        let positions = match embed_positions {
            Some(p) => Some(Rows::from_tensor(p).ok_or_else(not_row_major)?),
            None => None,
        };
        let (inv_freq, rope_factor) = match cfg.position {
            PositionKind::Rope => {
                let rope = rope.as_ref().ok_or_else(|| NoFusedStep("RoPE without its tables".into()))?;
                // Dynamic RoPE scaling changes the frequencies with the length: left to libtorch.
                let inv_freq = rope.inv_freq().ok_or_else(|| NoFusedStep("dynamic RoPE scaling (frequencies change with the length)".into()))?;
                (Some(inv_freq), rope.attention_factor() as f32)
            }
            PositionKind::Learned | PositionKind::None => (None, 1.0),
            PositionKind::Sinusoidal => return refuse("sinusoidal positions"),
            PositionKind::Alibi => return refuse("ALiBi position biases"),
        };
        Ok(FastDecoder {
            embed,
            positions,
            inv_freq,
            rope_factor,
            rotary_dim: cfg.rotary_dim() as usize,
            blocks,
            schedule: model.schedule(),
            norm: NormRow::new(norm)?,
            head,
            heads: heads as usize,
            kv_heads: kv_heads as usize,
            head_dim: cfg.head_dim() as usize,
            scratch: Scratch::default(),
            pool: SpinPool::new(tch::get_num_threads().max(1) as usize),
        })
    }

    /// Logits `[1, 1, vocab]` of `token` at `position`, attending to every position in `cache`
    /// (a batch-1 cache of this model); its keys and values are appended and the cache advanced
    /// by one, exactly as [`DecoderModel::forward_ext`] does with one new position.
    ///
    /// # Panics
    /// When `token` is outside the vocabulary, `position` outside a learned position table, or
    /// the cache is full, not batch 1, or not of this model's shape.
    pub fn step(&mut self, token: i64, position: i64, cache: &mut KvCache) -> Tensor {
        self.step_depth(token, position, cache, Depth::Full).0
    }

    /// [`FastDecoder::step`] through the layers `depth` chooses, with the number it applied (as
    /// [`DecoderModel::step_depth`]).
    pub fn step_depth(&mut self, token: i64, position: i64, cache: &mut KvCache, depth: Depth) -> (Tensor, usize) {
        let hidden = self.embed.cols();
        let len = cache.len() as usize; // positions already cached
        assert!((len as i64) < cache.capacity(), "KV cache full ({} positions)", cache.capacity());
        let (s, pool) = (&mut self.scratch, &self.pool);
        resize(&mut s.x, hidden);
        s.x.copy_from_slice(self.embed.row(token as usize));
        if let Some(p) = &self.positions {
            s.x.iter_mut().zip(p.row(position as usize)).for_each(|(x, p)| *x += p);
        }
        if let Some(inv_freq) = &self.inv_freq {
            // As `Rope::cos_sin`: the angle is the float32 product of position and frequency.
            let angles = inv_freq.iter().map(|&f| position as f32 * f);
            let f = self.rope_factor;
            (s.cos, s.sin) = angles.map(|a| (a.cos() * f, a.sin() * f)).unzip();
        }
        let shape = Shape {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            rotary_dim: self.inv_freq.is_some().then_some(self.rotary_dim),
        };
        let total = self.schedule.len();
        let applied = match depth {
            Depth::Draft(n) => n.clamp(1, total),
            Depth::Full | Depth::Exit(_) => total,
        };
        let mut exited = None;
        for layer in 0..applied {
            let block = &self.blocks[self.schedule[layer]];
            write_qkv(block, s, pool, &shape, cache, layer, len);
            attend(block, s, pool, &shape, cache, layer, len);
            feed_forward(block, s, pool);
            if let Depth::Exit(rule) = depth {
                if layer + 1 < total && layer + 1 >= rule.min_layers {
                    let logits = head_logits(&self.norm, &self.head, s, pool);
                    if rule.confident(&logits) {
                        // The skipped layers' keys and values come from the exited state (CALM).
                        for skipped in layer + 1..total {
                            write_qkv(&self.blocks[self.schedule[skipped]], s, pool, &shape, cache, skipped, len);
                        }
                        exited = Some((logits, layer + 1));
                        break;
                    }
                }
            }
        }
        cache.advance(1);
        let (logits, used) = exited.unwrap_or_else(|| (head_logits(&self.norm, &self.head, s, pool), applied));
        (Tensor::from_slice(&logits).view([1, 1, -1]), used)
    }
}

/// Head layout of a model, for the step's pieces.
struct Shape {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Leading dimensions of each head that rotate, with RoPE.
    rotary_dim: Option<usize>,
}

/// q, k and v of the stream `s.x` for `block` into `s.qkv` (rotated), with k and v written to
/// `layer`'s cache at slot `len`.
fn write_qkv(block: &Block, s: &mut Scratch, pool: &SpinPool, shape: &Shape, cache: &mut KvCache, layer: usize, len: usize) {
    let (nh, nkv, d) = (shape.heads, shape.kv_heads, shape.head_dim);
    resize(&mut s.normed, s.x.len());
    block.input_norm.apply(&s.x, &mut s.normed);
    resize(&mut s.qkv, (nh + 2 * nkv) * d);
    block.qkv.apply(&s.normed, &mut s.qkv, pool);
    if let Some(rotary) = shape.rotary_dim {
        for head in s.qkv[..(nh + nkv) * d].chunks_exact_mut(d) {
            rotate_half(&mut head[..rotary], &s.cos, &s.sin);
        }
    }
    let (keys, values) = cache_slices(cache, layer, nkv, d);
    let capacity = keys.len() / (nkv * d);
    let kv = &s.qkv[nh * d..];
    for g in 0..nkv {
        let at = (g * capacity + len) * d;
        keys[at..at + d].copy_from_slice(&kv[g * d..(g + 1) * d]);
        values[at..at + d].copy_from_slice(&kv[(nkv + g) * d..(nkv + g + 1) * d]);
    }
}

/// Attention of the queries in `s.qkv` over `layer`'s cached positions `0..=len`, then the
/// output projection added to the stream `s.x`.
fn attend(block: &Block, s: &mut Scratch, pool: &SpinPool, shape: &Shape, cache: &mut KvCache, layer: usize, len: usize) {
    let (nh, nkv, d) = (shape.heads, shape.kv_heads, shape.head_dim);
    let (group, scale) = (nh / nkv, 1.0 / (d as f32).sqrt());
    let (keys, values) = cache_slices(cache, layer, nkv, d);
    let capacity = keys.len() / (nkv * d);
    let q = &s.qkv[..nh * d];
    resize(&mut s.attn, nh * d);
    s.attn.fill(0.0);
    resize(&mut s.scores, len + 1);
    for h in 0..nh {
        let g = h / group;
        let k = Rows::new(&keys[g * capacity * d..], len + 1, d, d).expect("inside the cache");
        s.scores.fill(0.0);
        k.matvec_add(&q[h * d..(h + 1) * d], &mut s.scores);
        softmax_scaled(&mut s.scores, scale);
        let out = &mut s.attn[h * d..(h + 1) * d];
        for (t, &p) in s.scores.iter().enumerate() {
            let v = &values[(g * capacity + t) * d..][..d];
            out.iter_mut().zip(v).for_each(|(o, &v)| *o += p * v);
        }
    }
    resize(&mut s.out, s.x.len());
    block.o_proj.apply(&s.attn, &mut s.out, pool);
    s.x.iter_mut().zip(&s.out).for_each(|(x, o)| *x += o);
}

/// The MLP `[hidden] -> [intermediate] -> [hidden]` of `block` added to the stream `s.x`.
fn feed_forward(block: &Block, s: &mut Scratch, pool: &SpinPool) {
    let (act, gated) = (block.act, block.gated);
    block.post_norm.apply(&s.x, &mut s.normed);
    let width = block.down.weight.cols();
    resize(&mut s.up, if gated { 2 * width } else { width });
    block.up.apply(&s.normed, &mut s.up, pool);
    resize(&mut s.act, width);
    if gated {
        let (gate, up) = s.up.split_at(width);
        s.act.iter_mut().zip(gate.iter().zip(up)).for_each(|(a, (&g, &u))| *a = activate(act, g) * u);
    } else {
        s.act.iter_mut().zip(&s.up).for_each(|(a, &u)| *a = activate(act, u));
    }
    block.down.apply(&s.act, &mut s.out, pool);
    s.x.iter_mut().zip(&s.out).for_each(|(x, o)| *x += o);
}

/// Logits of the stream `s.x` through the final norm and the head.
fn head_logits(norm: &NormRow, head: &Matrix, s: &mut Scratch, pool: &SpinPool) -> Vec<f32> {
    resize(&mut s.normed, s.x.len());
    norm.apply(&s.x, &mut s.normed);
    let mut logits = vec![0f32; head.rows()];
    head.matvec_add_split(&s.normed, &mut logits, pool);
    logits
}

fn resize(v: &mut Vec<f32>, n: usize) {
    v.resize(n, 0.0);
}

/// Rotates one head in place by the angles (transformers' `rotate_half` layout).
fn rotate_half(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    let (lo, hi) = x.split_at_mut(half);
    for i in 0..half {
        let (a, b) = (lo[i], hi[i]);
        lo[i] = a * cos[i] - b * sin[i];
        hi[i] = b * cos[i] + a * sin[i];
    }
}

/// `softmax(scores * scale)` in place.
fn softmax_scaled(scores: &mut [f32], scale: f32) {
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s * scale));
    let mut total = 0.0;
    for s in scores.iter_mut() {
        *s = (*s * scale - max).exp();
        total += *s;
    }
    scores.iter_mut().for_each(|s| *s /= total);
}

fn activate(act: Activation, x: f32) -> f32 {
    match act {
        Activation::Silu => x / (1.0 + (-x).exp()),
        Activation::GeluTanh => {
            const C: f32 = 0.797_884_6; // sqrt(2 / pi)
            0.5 * x * (1.0 + (C * (x + 0.044715 * x * x * x)).tanh())
        }
        Activation::Relu => x.max(0.0),
        Activation::Relu2 => x.max(0.0) * x.max(0.0),
        Activation::Gelu => unreachable!("FastDecoder::new declines exact GELU"),
    }
}

/// The key and value buffers of `layer` as mutable slices `[kv_heads, capacity, head_dim]`.
fn cache_slices(cache: &mut KvCache, layer: usize, kv_heads: usize, head_dim: usize) -> (&mut [f32], &mut [f32]) {
    let (k, v) = cache.buffers_mut(layer);
    let ok = |t: &Tensor| {
        let size = t.size();
        t.device() == Device::Cpu
            && t.kind() == Kind::Float
            && t.is_contiguous()
            && size[0] == 1
            && size[1] as usize == kv_heads
            && size[3] as usize == head_dim
    };
    assert!(ok(k) && ok(v), "FastDecoder needs a batch-1 float32 CPU cache of this model, got {:?}", k.size());
    let n = k.numel();
    // SAFETY: both are contiguous float32 CPU tensors of `n` floats, distinct allocations made
    // by `KvCache::new`; the `&mut KvCache` borrow keeps every other user out while the slices
    // live, and keeps the tensors alive.
    unsafe {
        (
            std::slice::from_raw_parts_mut(k.data_ptr() as *mut f32, n),
            std::slice::from_raw_parts_mut(v.data_ptr() as *mut f32, n),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModelConfig;
    use stlm_attention::AttentionMask;

    fn model(toml: &str, fuse: bool) -> DecoderModel {
        tch::manual_seed(7);
        let cfg = ModelConfig::from_toml_str(toml, std::path::Path::new("test.toml")).expect("valid config");
        let mut m = DecoderModel::new(cfg, Device::Cpu).expect("model");
        if fuse {
            m.optimize_for_decoding();
        }
        m
    }

    /// Prefills a prompt with libtorch, then decodes the same greedy tokens through libtorch and
    /// through the fused step (each with its own cache) and returns the largest logit difference.
    fn max_diff(m: &DecoderModel, steps: i64) -> f64 {
        let _g = tch::no_grad_guard();
        let prompt = Tensor::from_slice(&[3i64, 1, 4, 1, 5]).view([1, 5]);
        let mut caches = [m.new_cache(1, 5 + steps), m.new_cache(1, 5 + steps)];
        let mut logits = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        for c in caches.iter_mut() {
            let positions = Tensor::arange(5, (Kind::Int64, Device::Cpu)).view([1, 5]);
            logits = m.forward_ext(&prompt, &positions, &AttentionMask::Causal, Some(c)).select(1, -1);
        }
        let mut fast = FastDecoder::new(m).expect("the fused step applies");
        let [slow_cache, fast_cache] = &mut caches;
        let mut worst = 0f64;
        for _ in 0..steps {
            let id = logits.argmax(-1, false).int64_value(&[0]);
            let pos = slow_cache.len();
            let mask = AttentionMask::causal(1, pos, None, Device::Cpu);
            let ids = Tensor::from_slice(&[id]).view([1, 1]);
            let slow = m.forward_ext(&ids, &Tensor::from_slice(&[pos]).view([1, 1]), &mask, Some(slow_cache));
            let quick = fast.step(id, fast_cache.len(), fast_cache);
            assert_eq!(quick.size(), slow.size());
            assert!(slow.abs().max().double_value(&[]) > 0.5, "logits large enough to compare");
            worst = worst.max((&quick - &slow).abs().max().double_value(&[]));
            logits = slow.select(1, -1);
        }
        assert_eq!(slow_cache.len(), fast_cache.len());
        worst
    }

    const LLAMA_GQA: &str = "vocab_size = 97\nhidden_size = 64\nintermediate_size = 96\nnum_hidden_layers = 2\nnum_attention_heads = 4\nnum_key_value_heads = 2\nrope_theta = 500000.0\ninitializer_range = 0.3\n";
    const GPT2: &str = "preset = \"gpt2\"\nvocab_size = 61\nhidden_size = 48\nintermediate_size = 80\nnum_hidden_layers = 2\nnum_attention_heads = 3\ninitializer_range = 0.3\n";
    const MQA_PLAIN: &str = "model_type = \"stlm\"\nvocab_size = 50\nhidden_size = 40\nintermediate_size = 72\nnum_hidden_layers = 3\nnum_attention_heads = 4\nnum_key_value_heads = 1\nhead_dim = 12\nposition = \"none\"\nmlp = \"plain\"\nhidden_act = \"relu\"\nattention_bias = true\nmlp_bias = true\ntie_word_embeddings = true\ninitializer_range = 0.3\n";

    const PARTIAL_YARN: &str = "model_type = \"stlm\"\npartial_rotary_factor = 0.5\nrope_scaling = { rope_type = \"yarn\", factor = 4.0, original_max_position_embeddings = 8 }\n";

    #[test]
    fn matches_libtorch_decoding() {
        let partial = format!("{PARTIAL_YARN}{LLAMA_GQA}");
        let shared_immediate = format!("model_type = \"stlm\"\nlayer_sharing = {{ repeats = 2, mlp = true }}\n{LLAMA_GQA}");
        let shared_cycle = format!("{}layer_sharing = {{ scheme = \"cycle\", repeats = 3, o_proj = true }}\n", MQA_PLAIN.replace("\"relu\"", "\"relu2\""));
        for (name, toml) in [
            ("llama gqa", LLAMA_GQA),
            ("gpt2", GPT2),
            ("mqa plain relu, no positions", MQA_PLAIN),
            ("partial rotary, yarn", partial.as_str()),
            ("blocks repeated in place, tied FFN", shared_immediate.as_str()),
            ("stack cycled, tied o_proj, relu2", shared_cycle.as_str()),
        ] {
            for fuse in [false, true] {
                let diff = max_diff(&model(toml, fuse), 12);
                assert!(diff < 1e-4, "{name} (fused projections: {fuse}): max abs logit difference {diff}");
            }
        }
    }

    #[test]
    fn declines_what_it_cannot_compute() {
        let exact_gelu = model(&format!("{GPT2}hidden_act = \"gelu\"\n"), false);
        assert!(FastDecoder::new(&exact_gelu).is_none());
        let mut double = model(LLAMA_GQA, false);
        double.set_kind(Kind::Double);
        assert!(FastDecoder::new(&double).is_none());
    }
}
