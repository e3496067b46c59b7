//! One attention layer of a kind against a dense-attention layer of the same shape (each owning
//! its projections and whatever its kind learns), or the two kernels alone on the same queries,
//! keys and values; forward+backward, the fastest of several runs.

use crate::{fastest_ms, BenchError, Result};
use serde::Serialize;
use stlm_attention::{AttentionKind, AttentionMask, KindSettings, ATTENTION_KINDS};
use stlm_model::config::{ModelType, PositionKind};
use stlm_model::layers::SelfAttention;
use stlm_model::ModelConfig;
use tch::{nn, Device, Kind, Tensor};

/// What to time.
#[derive(Debug, Clone)]
pub struct AttentionSpec {
    /// The kind compared with dense attention.
    pub kind: AttentionKind,
    /// Sequence length.
    pub seq: i64,
    /// Batch size.
    pub batch: i64,
    /// Query heads (keys and values have as many).
    pub heads: i64,
    /// Head dimension.
    pub head_dim: i64,
    /// Timed runs of each (after one warm-up); the fastest is reported.
    pub repeats: usize,
    /// The kernels alone, without the projections both layers share.
    pub kernel: bool,
    /// Where it runs.
    pub device: Device,
}

/// The attention benchmark as `stlm bench attention` takes it: a kind by its config name and
/// one value for each setting any kind takes.
#[derive(Debug, Clone, clap::Args)]
pub struct AttentionOptions {
    /// Attention kind, by its config name: dense, sliding-window, fixed-sparse, strided-sparse,
    /// ssmax, temperature, power, linformer or doge-dma.
    #[arg(long)]
    pub kind: String,
    /// Sequence length.
    #[arg(long, default_value_t = 1024)]
    pub seq: i64,
    /// Local window (sliding-window), keep_window_size (doge-dma).
    #[arg(long, default_value_t = 256)]
    pub window: i64,
    /// Global tokens (sliding-window).
    #[arg(long, default_value_t = 0)]
    pub global_tokens: i64,
    /// Block length l (fixed-sparse), the stride (strided-sparse).
    #[arg(long, default_value_t = 128)]
    pub block: i64,
    /// Summary positions c at the end of each block (fixed-sparse).
    #[arg(long, default_value_t = 8)]
    pub summary: i64,
    /// Exponent (power).
    #[arg(long, default_value_t = 2.0)]
    pub p: f64,
    /// Projected length k (linformer, headwise sharing; compared with bidirectional SDPA).
    #[arg(long, default_value_t = 256)]
    pub linformer_k: i64,
    /// Batch size.
    #[arg(long, default_value_t = 1)]
    pub batch: i64,
    /// Query heads (keys and values have as many).
    #[arg(long, default_value_t = 4)]
    pub heads: i64,
    /// Head dimension.
    #[arg(long, default_value_t = 64)]
    pub head_dim: i64,
    /// Timed runs of each; the fastest is reported.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Time the attention kernels alone (the kind's and dense SDPA, on the same random
    /// queries, keys and values), without the projections both layers share.
    #[arg(long)]
    pub kernel: bool,
}

impl AttentionOptions {
    /// The benchmark on `device`; an unknown kind is an error listing the known ones.
    pub fn spec(&self, device: Device) -> Result<AttentionSpec> {
        let settings = KindSettings { window: self.window, global_tokens: self.global_tokens, block: self.block, summary: self.summary, p: self.p, k: self.linformer_k };
        let Some(kind) = AttentionKind::from_settings(&self.kind, &settings) else {
            return Err(BenchError::Input(format!("kind {}: unknown attention (known: {})", self.kind, ATTENTION_KINDS.join(", "))));
        };
        Ok(AttentionSpec { kind, seq: self.seq, batch: self.batch, heads: self.heads, head_dim: self.head_dim, repeats: self.repeats, kernel: self.kernel, device })
    }
}

/// The times of the kind and of dense attention.
#[derive(Debug, Clone, Serialize)]
pub struct AttentionBench {
    /// The kind with its settings (in JSON: `kind` and the kind's own fields).
    #[serde(flatten)]
    pub attention: AttentionKind,
    /// `layer` (projections included) or `kernel` (attention alone).
    pub what: &'static str,
    /// Sequence length.
    pub seq: i64,
    /// The kind's forward+backward, ms.
    pub ms: f64,
    /// Dense attention's, ms.
    pub dense_ms: f64,
    /// `dense_ms / ms`.
    pub speedup: f64,
    /// Batch size.
    pub batch: i64,
    /// Heads.
    pub heads: i64,
    /// Head dimension.
    pub head_dim: i64,
    /// The device.
    pub device: String,
    /// libtorch's threads.
    pub threads: i32,
}

/// Times the kind of `spec` and dense attention (dense SDPA; bidirectional for a kind that is
/// not causal, such as Linformer).
pub fn bench_attention(spec: &AttentionSpec) -> Result<AttentionBench> {
    let AttentionSpec { seq, batch, heads, head_dim, repeats, kernel, device: dev, .. } = *spec;
    if seq < 1 || batch < 1 || heads < 1 || head_dim < 1 || repeats < 1 {
        return Err(BenchError::Input(format!(
            "seq, batch, heads, head_dim and repeats must be at least 1 (got {seq}, {batch}, {heads}, {head_dim}, {repeats})"
        )));
    }
    spec.kind.validate().map_err(|e| BenchError::Input(format!("attention kind {}: {e}", spec.kind.name())))?;
    stlm_core::memory::keep_freed_memory(); // as `stlm train` does; both layers benefit
    tch::manual_seed(0);
    let vs = nn::VarStore::new(dev);
    let hidden = heads * head_dim;
    let layer = |name: &str, kind: AttentionKind| {
        let cfg = ModelConfig {
            model_type: ModelType::Stlm,
            hidden_size: hidden,
            intermediate_size: 4 * hidden,
            num_hidden_layers: 1,
            num_attention_heads: heads,
            num_key_value_heads: heads,
            max_position_embeddings: seq,
            position: PositionKind::None,
            attention: vec![kind],
            ..ModelConfig::llama()
        };
        SelfAttention::new(vs.root() / name / "self_attn", &cfg, 0, cfg.initializer_range)
    };
    let (kind_layer, dense_layer) = (layer("kind", spec.kind.clone()), layer("dense", AttentionKind::Dense));
    let x = Tensor::randn([batch, seq, hidden], (Kind::Float, dev)).set_requires_grad(true);
    let positions = Tensor::arange(seq, (Kind::Int64, dev)).unsqueeze(0).expand([batch, seq], false);
    let mask = match spec.kind.not_causal_because() {
        Some(_) => AttentionMask::Full,
        None => AttentionMask::Causal,
    };
    // Kernels alone: the same queries, keys and values `[b, heads, seq, d]` for both.
    let qkv: Vec<Tensor> = (0..3).map(|_| Tensor::randn([batch, heads, seq, head_dim], (Kind::Float, dev)).set_requires_grad(true)).collect();
    let run = |l: &SelfAttention| {
        let forward = || {
            let out = match kernel {
                true => l.attend(&qkv[0], &qkv[1], &qkv[2], &mask),
                false => l.forward(&x, None, &positions, &mask, None, None),
            };
            out.sum(Kind::Float)
        };
        fastest_ms(repeats, &forward, Some(if kernel { &qkv[0] } else { &x }))
    };
    let dense_ms = run(&dense_layer);
    let ms = run(&kind_layer);
    Ok(AttentionBench {
        attention: spec.kind.clone(),
        what: if kernel { "kernel" } else { "layer" },
        seq,
        ms,
        dense_ms,
        speedup: dense_ms / ms,
        batch,
        heads,
        head_dim,
        device: format!("{dev:?}"),
        threads: tch::get_num_threads(),
    })
}
