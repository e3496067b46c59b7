//! One config field picks the attention of each layer, and one enum defines every kind:
//! [`Attention`] names each variant with its settings and, through its [`Learned`] parameter,
//! what the kind learns. A config holds [`AttentionKind`] (`Attention<Settings>`: settings only);
//! a model's layer holds the same enum with its tensors (stlm-model's `Attention<LayerTensors>`),
//! built from the config by [`AttentionKind::build`]. So a kind and its learned tensors cannot
//! disagree: the kernel ([`Attention::forward`]) reads them from the variant it matches. The
//! settings' checks, the keys a query may see, the cache pattern and the benchmark's constructor
//! live here too; adding a kind is a variant here (each `match` below then asks for its arm), its
//! kernel, and, if it learns tensors of a new sort, their construction in stlm-model.
//!
//! Over a whole sequence from position 0 (training, prefill) each kind runs its own kernel
//! ([`sliding_window_attention`] in O(n·w), the block-sparse patterns, ...). Against a KV cache or
//! under padding, the kind's pattern becomes an explicit mask over the cached keys
//! ([`Attention::mask`]) and the kernel runs with it; the tests check that both give the same
//! outputs.

use crate::{
    dense_attention, dynamic_mask_attention, fixed_sparse_attention, linformer_attention, LinformerSharing, power_attention, sliding_window_attention, ssmax_attention,
    strided_sparse_attention, temperature_attention, AttentionMask,
};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// What the kinds that learn tensors hold, by sort: nothing in a config ([`Settings`]), the
/// tensors themselves in a model's layer.
pub trait Learned {
    /// A scale per query head `[heads]` (ssmax's `ssmax_scale`, temperature's `inv_temperature`).
    type HeadScale;
    /// What gives a per-key bias from the values (doge-dma's `A` and `dt_proj`).
    type KeyBias;
    /// Key and value projections along the sequence (linformer's `E` and `F`).
    type Projections;
}

/// The kinds of a config: settings, no tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settings;

impl Learned for Settings {
    type HeadScale = ();
    type KeyBias = ();
    type Projections = ();
}

/// How a kernel reads a layer's learned tensors.
pub trait KernelTensors: Learned {
    /// The `[heads]` scale.
    fn head_scale(s: &Self::HeadScale) -> &Tensor;
    /// The per-key bias `[b, kv_heads, keys]` for values `v` `[b, kv_heads, keys, d]`.
    fn key_bias(b: &Self::KeyBias, v: &Tensor) -> Tensor;
    /// The keys' and values' projections `[heads or 1, k, max_len]`.
    fn projections(p: &Self::Projections) -> (&Tensor, &Tensor);
}

/// Builds the tensors a kind learns (a model's layer: variables under its path).
pub trait Build<L: Learned> {
    /// A `[heads]` scale named `name`, initialised to `init`.
    fn head_scale(&mut self, name: &'static str, init: f64) -> L::HeadScale;
    /// Dynamic Mask Attention's per-key bias layers.
    fn key_bias(&mut self) -> L::KeyBias;
    /// Linformer's projections to `k` rows.
    fn projections(&mut self, k: i64, sharing: LinformerSharing) -> L::Projections;
}

/// The attention of one layer: its kind, the kind's settings and what it learns (`L`). In a
/// config, `kind = "sliding-window"`, ... ([`AttentionKind`]).
///
/// A kind cannot be run without the tensors it learns: a layer's SSMax holds its scale, and a
/// config's kind (no tensors) has no kernel.
///
/// ```compile_fail,E0599
/// use stlm_attention::{AttentionKind, AttentionMask};
/// let t = tch::Tensor::zeros([1, 1, 2, 4], (tch::Kind::Float, tch::Device::Cpu));
/// let ssmax = AttentionKind::Ssmax { scale: () };
/// ssmax.forward(&t, &t, &t, &AttentionMask::Causal); // no tensors: `Settings` has no kernel
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(
    tag = "kind",
    rename_all = "kebab-case",
    deny_unknown_fields,
    bound(serialize = "", deserialize = "L::HeadScale: Default, L::KeyBias: Default, L::Projections: Default")
)]
pub enum Attention<L: Learned = Settings> {
    /// Dense causal attention through `scaled_dot_product_attention`.
    #[default]
    Dense,
    /// Each query sees the `window` most recent keys (itself included) and the first
    /// `global_tokens` keys (Mistral; Longformer's local window with global tokens). Decoding
    /// keeps a rolling cache of `global_tokens + window` keys.
    SlidingWindow {
        /// Keys a query sees in its local window, itself included.
        window: i64,
        /// Leading positions every query sees.
        #[serde(default)]
        global_tokens: i64,
    },
    /// Sparse Transformers' fixed pattern: the query's own block of `block` keys plus the last
    /// `summary` keys of every earlier block.
    FixedSparse {
        /// Block length `l`.
        block: i64,
        /// Summary keys per block `c`.
        summary: i64,
    },
    /// Sparse Transformers' strided pattern: the previous `stride` keys and every `stride`-th key.
    StridedSparse {
        /// Stride `l`.
        stride: i64,
    },
    /// Scalable-Softmax: scores times `s_h · ln n` (`n` keys seen, `s` learnable per head).
    Ssmax {
        /// `ssmax_scale` `[heads]`.
        #[serde(skip)]
        scale: L::HeadScale,
    },
    /// Scores times a learnable inverse temperature per head.
    Temperature {
        /// `inv_temperature` `[heads]`.
        #[serde(skip)]
        inv_temperature: L::HeadScale,
    },
    /// Weights proportional to `max(score, 0)^p`, normalised.
    Power {
        /// The exponent, > 0.
        p: f64,
    },
    /// Linformer: keys and values projected along the sequence to `k` rows. Bidirectional only
    /// (not causal; a decoder config refuses it).
    Linformer {
        /// Projected length.
        k: i64,
        /// Which projections are shared.
        #[serde(default)]
        sharing: LinformerSharing,
        /// `E` and `F`.
        #[serde(skip)]
        projections: L::Projections,
    },
    /// Doge's Dynamic Mask Attention: a learned per-key bias from the values, and each query sees
    /// only the `keep_window_size` keys with the largest bias (transformers' `DogeAttention`).
    DogeDma {
        /// Keys each query keeps (all of them while there are no more).
        keep_window_size: i64,
        /// `A` and `dt_proj`.
        #[serde(skip)]
        bias: L::KeyBias,
    },
}

/// The attention of a config: the kind and its settings.
pub type AttentionKind = Attention<Settings>;

/// The config names of the kinds, in the order of [`Attention`] (a test checks each against
/// [`Attention::name`] and [`AttentionKind::from_settings`]).
pub const ATTENTION_KINDS: &[&str] =
    &["dense", "sliding-window", "fixed-sparse", "strided-sparse", "ssmax", "temperature", "power", "linformer", "doge-dma"];

/// One value for each setting any kind takes, to build a kind from its name alone (benchmarks,
/// sweeps): each kind takes the settings it has and ignores the rest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KindSettings {
    /// `window` (sliding-window), `keep_window_size` (doge-dma).
    pub window: i64,
    /// `global_tokens` (sliding-window).
    pub global_tokens: i64,
    /// `block` (fixed-sparse), `stride` (strided-sparse).
    pub block: i64,
    /// `summary` (fixed-sparse).
    pub summary: i64,
    /// `p` (power).
    pub p: f64,
    /// `k` (linformer, headwise sharing).
    pub k: i64,
}

impl AttentionKind {
    /// The kind named `name` (a config name, see [`ATTENTION_KINDS`]) with the settings it takes
    /// from `s`, or `None` for an unknown name.
    pub fn from_settings(name: &str, s: &KindSettings) -> Option<AttentionKind> {
        Some(match name {
            "dense" => Attention::Dense,
            "sliding-window" => Attention::SlidingWindow { window: s.window, global_tokens: s.global_tokens },
            "fixed-sparse" => Attention::FixedSparse { block: s.block, summary: s.summary },
            "strided-sparse" => Attention::StridedSparse { stride: s.block },
            "ssmax" => Attention::Ssmax { scale: () },
            "temperature" => Attention::Temperature { inv_temperature: () },
            "power" => Attention::Power { p: s.p },
            "linformer" => Attention::Linformer { k: s.k, sharing: LinformerSharing::Headwise, projections: () },
            "doge-dma" => Attention::DogeDma { keep_window_size: s.window, bias: () },
            _ => return None,
        })
    }

    /// This kind with the tensors it learns, made by `b` (`max_positions`: the model's context,
    /// for the initial SSMax scale).
    pub fn build<L: Learned>(&self, max_positions: i64, b: &mut dyn Build<L>) -> Attention<L> {
        match self {
            Attention::Dense => Attention::Dense,
            Attention::SlidingWindow { window, global_tokens } => Attention::SlidingWindow { window: *window, global_tokens: *global_tokens },
            Attention::FixedSparse { block, summary } => Attention::FixedSparse { block: *block, summary: *summary },
            Attention::StridedSparse { stride } => Attention::StridedSparse { stride: *stride },
            Attention::Ssmax { .. } => Attention::Ssmax { scale: b.head_scale("ssmax_scale", 1.0 / (max_positions.max(2) as f64).ln()) },
            Attention::Temperature { .. } => Attention::Temperature { inv_temperature: b.head_scale("inv_temperature", 1.0) },
            Attention::Power { p } => Attention::Power { p: *p },
            Attention::Linformer { k, sharing, .. } => Attention::Linformer { k: *k, sharing: *sharing, projections: b.projections(*k, *sharing) },
            Attention::DogeDma { keep_window_size, .. } => Attention::DogeDma { keep_window_size: *keep_window_size, bias: b.key_bias() },
        }
    }
}

impl<L: Learned> Attention<L> {
    /// The kind and its settings, without what it learns.
    pub fn settings(&self) -> AttentionKind {
        match self {
            Attention::Dense => Attention::Dense,
            Attention::SlidingWindow { window, global_tokens } => Attention::SlidingWindow { window: *window, global_tokens: *global_tokens },
            Attention::FixedSparse { block, summary } => Attention::FixedSparse { block: *block, summary: *summary },
            Attention::StridedSparse { stride } => Attention::StridedSparse { stride: *stride },
            Attention::Ssmax { .. } => Attention::Ssmax { scale: () },
            Attention::Temperature { .. } => Attention::Temperature { inv_temperature: () },
            Attention::Power { p } => Attention::Power { p: *p },
            Attention::Linformer { k, sharing, .. } => Attention::Linformer { k: *k, sharing: *sharing, projections: () },
            Attention::DogeDma { keep_window_size, .. } => Attention::DogeDma { keep_window_size: *keep_window_size, bias: () },
        }
    }

    /// The config name (`kind = "..."`).
    pub fn name(&self) -> &'static str {
        match self {
            Attention::Dense => "dense",
            Attention::SlidingWindow { .. } => "sliding-window",
            Attention::FixedSparse { .. } => "fixed-sparse",
            Attention::StridedSparse { .. } => "strided-sparse",
            Attention::Ssmax { .. } => "ssmax",
            Attention::Temperature { .. } => "temperature",
            Attention::Power { .. } => "power",
            Attention::Linformer { .. } => "linformer",
            Attention::DogeDma { .. } => "doge-dma",
        }
    }

    /// Whether this is dense attention.
    pub fn is_dense(&self) -> bool {
        matches!(self, Attention::Dense)
    }

    /// Checks the settings; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        let positive = |name: &str, v: i64| if v >= 1 { Ok(()) } else { Err(format!("`{name}` must be >= 1, got {v}")) };
        match self {
            Attention::SlidingWindow { window, global_tokens } => {
                positive("window", *window)?;
                if *global_tokens < 0 {
                    return Err(format!("`global_tokens` must be >= 0, got {global_tokens}"));
                }
                Ok(())
            }
            Attention::FixedSparse { block, summary } => {
                positive("block", *block)?;
                if !(1..=*block).contains(summary) {
                    return Err(format!("`summary` must be between 1 and `block` ({block}), got {summary}"));
                }
                Ok(())
            }
            Attention::StridedSparse { stride } => positive("stride", *stride),
            Attention::DogeDma { keep_window_size, .. } => positive("keep_window_size", *keep_window_size),
            Attention::Linformer { k, .. } => positive("k", *k),
            Attention::Power { p } if !(*p > 0.0 && p.is_finite()) => Err(format!("`p` must be > 0, got {p}")),
            _ => Ok(()),
        }
    }

    /// The per-head scale of this kind and its name, if it learns one.
    pub fn head_scale(&self) -> Option<(&'static str, &L::HeadScale)> {
        match self {
            Attention::Ssmax { scale } => Some(("ssmax_scale", scale)),
            Attention::Temperature { inv_temperature } => Some(("inv_temperature", inv_temperature)),
            _ => None,
        }
    }

    /// The per-key bias layers of this kind, if it learns them.
    pub fn key_bias(&self) -> Option<&L::KeyBias> {
        match self {
            Attention::DogeDma { bias, .. } => Some(bias),
            _ => None,
        }
    }

    /// [`Attention::key_bias`], mutable.
    pub fn key_bias_mut(&mut self) -> Option<&mut L::KeyBias> {
        match self {
            Attention::DogeDma { bias, .. } => Some(bias),
            _ => None,
        }
    }

    /// The sequence projections of this kind, if it learns them.
    pub fn projections(&self) -> Option<&L::Projections> {
        match self {
            Attention::Linformer { projections, .. } => Some(projections),
            _ => None,
        }
    }

    /// `(window, global_tokens)` when decoding needs only a rolling cache of the keys.
    pub fn rolling_window(&self) -> Option<(i64, i64)> {
        match self {
            Attention::SlidingWindow { window, global_tokens } => Some((*window, *global_tokens)),
            _ => None,
        }
    }

    /// Whether query position `q_pos` may see key position `k_pos` (integer tensors that
    /// broadcast, e.g. `[q, 1]` and `[1, k]`): causal, and inside the kind's pattern.
    pub fn pattern(&self, q_pos: &Tensor, k_pos: &Tensor) -> Tensor {
        let causal = k_pos.le_tensor(q_pos);
        match *self {
            Attention::SlidingWindow { window, global_tokens } => {
                causal.logical_and(&(q_pos - k_pos).lt(window).logical_or(&k_pos.lt(global_tokens)))
            }
            Attention::FixedSparse { block, summary } => {
                let same_block = k_pos.floor_divide_scalar(block).eq_tensor(&q_pos.floor_divide_scalar(block));
                causal.logical_and(&same_block.logical_or(&k_pos.remainder(block).ge(block - summary)))
            }
            Attention::StridedSparse { stride } => {
                let gap = q_pos - k_pos;
                causal.logical_and(&gap.le(stride).logical_or(&gap.remainder(stride).eq(0)))
            }
            _ => causal,
        }
    }

    /// The explicit mask `[b or 1, 1, q_len, keys]` for `q_len` queries in cache slots
    /// `past..past + q_len` against keys in slots `key_positions` (`[keys]`, int64; `None`: slots
    /// `0..past + q_len`), combined with `base`, a mask over slots `0..past + q_len` such as
    /// [`AttentionMask::causal`] gives (padding). `offsets` (`[b]`) is each row's left padding:
    /// the pattern is applied to positions `slot - offset`, so a padded row sees what it would see
    /// alone.
    pub fn mask(
        &self,
        past: i64,
        q_len: i64,
        key_positions: Option<&Tensor>,
        offsets: Option<&Tensor>,
        base: &AttentionMask,
        device: Device,
    ) -> AttentionMask {
        let all = Tensor::arange(past + q_len, (Kind::Int64, device));
        let k_slot = key_positions.map_or(all, Tensor::shallow_clone);
        let q_slot = Tensor::arange_start(past, past + q_len, (Kind::Int64, device));
        let offsets = offsets.map_or_else(|| Tensor::zeros([1], (Kind::Int64, device)), Tensor::shallow_clone);
        let off = offsets.view([-1, 1, 1]);
        let allowed = self.pattern(&(q_slot.view([1, -1, 1]) - &off), &(k_slot.view([1, 1, -1]) - &off)).unsqueeze(1);
        AttentionMask::Explicit(match base {
            AttentionMask::Causal | AttentionMask::Full => allowed,
            AttentionMask::Explicit(m) => allowed.logical_and(&m.index_select(3, &k_slot)),
        })
    }

    /// Why the kind cannot be used where attention must be causal, if it cannot.
    pub fn not_causal_because(&self) -> Option<&'static str> {
        matches!(self, Attention::Linformer { .. }).then_some(
            "Linformer projects keys and values along the sequence, so every projected key mixes all \
             positions, future ones included, and a decoder would see the tokens it must predict; use it \
             where attention is bidirectional (the byte encoder of byte-pooled models)",
        )
    }

    /// Whether the kind takes the model's mask over all cached keys as it is (dense attention and
    /// Dynamic Mask Attention) rather than its own pattern through [`Attention::mask`].
    pub fn uses_plain_mask(&self) -> bool {
        matches!(self, Attention::Dense | Attention::DogeDma { .. })
    }
}

impl<L: KernelTensors> Attention<L> {
    /// Attention of `q` `[b, heads, q_len, d]` over `k`, `v` `[b, kv_heads, keys, d]` under
    /// `mask`: `Causal` (queries and keys are the same positions from 0) runs the kind's own
    /// kernel; for pattern kinds an explicit mask must come from [`Attention::mask`]. What the
    /// kind learns comes from its variant: the `[heads]` scale of `ssmax` and `temperature`, the
    /// per-key bias of `doge-dma` (from `v`), or the `E` and `F` projections of `linformer`, which
    /// is bidirectional: it takes `AttentionMask::Full` only (padding goes through
    /// [`linformer_attention`]'s `key_valid`); another mask is an error.
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask) -> Result<Tensor, String> {
        let causal = matches!(mask, AttentionMask::Causal);
        Ok(match self {
            Attention::SlidingWindow { window, global_tokens } if causal => sliding_window_attention(q, k, v, *window, *global_tokens, None),
            Attention::FixedSparse { block, summary } if causal => fixed_sparse_attention(q, k, v, *block, *summary, None),
            Attention::StridedSparse { stride } if causal => strided_sparse_attention(q, k, v, *stride, None),
            Attention::Dense | Attention::SlidingWindow { .. } | Attention::FixedSparse { .. } | Attention::StridedSparse { .. } => {
                dense_attention(q, k, v, mask, None)
            }
            Attention::Ssmax { scale } => ssmax_attention(q, k, v, L::head_scale(scale), mask, None),
            Attention::Temperature { inv_temperature } => temperature_attention(q, k, v, L::head_scale(inv_temperature), mask, None),
            Attention::Power { p } => power_attention(q, k, v, *p, mask, None),
            Attention::Linformer { projections, .. } => {
                if !matches!(mask, AttentionMask::Full) {
                    return Err("linformer is bidirectional: it takes AttentionMask::Full".into());
                }
                let (e, f) = L::projections(projections);
                linformer_attention(q, k, v, e, f, None, None)
            }
            Attention::DogeDma { keep_window_size, bias } => dynamic_mask_attention(q, k, v, &L::key_bias(bias, v), *keep_window_size, mask, None),
        })
    }
}

/// Learned tensors given directly, the per-key bias already computed (tests, benchmarks).
#[derive(Debug, Clone, Copy)]
pub struct Given<'a>(std::marker::PhantomData<&'a ()>);

impl<'a> Learned for Given<'a> {
    type HeadScale = &'a Tensor;
    type KeyBias = &'a Tensor;
    type Projections = (&'a Tensor, &'a Tensor);
}

impl KernelTensors for Given<'_> {
    fn head_scale<'s>(s: &'s Self::HeadScale) -> &'s Tensor {
        s
    }
    fn key_bias(b: &Self::KeyBias, _v: &Tensor) -> Tensor {
        b.shallow_clone()
    }
    fn projections<'s>(p: &'s Self::Projections) -> (&'s Tensor, &'s Tensor) {
        (p.0, p.1)
    }
}

/// Builds a kind with given tensors (tests, benchmarks): `heads` for a head scale, `bias` for
/// Dynamic Mask Attention, `projections` for Linformer.
pub struct GivenTensors<'a> {
    /// The `[heads]` scale.
    pub heads: &'a Tensor,
    /// The per-key bias `[b, kv_heads, keys]`.
    pub bias: &'a Tensor,
    /// `E` and `F`.
    pub projections: (&'a Tensor, &'a Tensor),
}

impl<'a> Build<Given<'a>> for GivenTensors<'a> {
    fn head_scale(&mut self, _name: &'static str, _init: f64) -> &'a Tensor {
        self.heads
    }
    fn key_bias(&mut self) -> &'a Tensor {
        self.bias
    }
    fn projections(&mut self, _k: i64, _sharing: LinformerSharing) -> (&'a Tensor, &'a Tensor) {
        self.projections
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::rand;
    use crate::{fixed_sparse_mask, sliding_window_mask, strided_sparse_mask};

    fn kinds() -> Vec<AttentionKind> {
        vec![
            AttentionKind::Dense,
            AttentionKind::SlidingWindow { window: 3, global_tokens: 0 },
            AttentionKind::SlidingWindow { window: 4, global_tokens: 2 },
            AttentionKind::FixedSparse { block: 4, summary: 1 },
            AttentionKind::StridedSparse { stride: 3 },
            AttentionKind::Ssmax { scale: () },
            AttentionKind::Temperature { inv_temperature: () },
            AttentionKind::Power { p: 2.0 },
            AttentionKind::DogeDma { keep_window_size: 4, bias: () },
        ]
    }

    /// The pattern agrees with each kernel's own mask builder.
    #[test]
    fn patterns_match_the_kernel_masks() {
        let seq = 13;
        let pos = Tensor::arange(seq, (Kind::Int64, Device::Cpu));
        let pattern = |k: AttentionKind| k.pattern(&pos.unsqueeze(1), &pos.unsqueeze(0));
        let cpu = Device::Cpu;
        assert!(pattern(AttentionKind::SlidingWindow { window: 4, global_tokens: 2 }).equal(&sliding_window_mask(seq, 4, 2, cpu)));
        assert!(pattern(AttentionKind::FixedSparse { block: 4, summary: 2 }).equal(&fixed_sparse_mask(seq, 4, 2, cpu)));
        assert!(pattern(AttentionKind::StridedSparse { stride: 3 }).equal(&strided_sparse_mask(seq, 3, cpu)));
        assert!(pattern(AttentionKind::Dense).equal(&Tensor::ones([seq, seq], (Kind::Bool, cpu)).tril(0)));
    }

    /// For every kind, the last queries against all keys under [`AttentionKind::mask`] (how a
    /// cache sees them) equal the same rows of the full causal forward.
    #[test]
    fn explicit_masks_reproduce_the_causal_kernels() {
        tch::manual_seed(3);
        let (seq, past) = (11, 7);
        let f = |t: Tensor| t.to_kind(Kind::Float);
        let (q, k, v) = (f(rand(&[2, 4, seq, 8])), f(rand(&[2, 2, seq, 8])), f(rand(&[2, 2, seq, 8])));
        let heads = Tensor::from_slice(&[0.5f32, 0.9, 1.3, 0.7]);
        let dt = (rand(&[2, 2, seq]) * 2.0).exp().to_kind(Kind::Float);
        for config in kinds() {
            let kind = config.build(seq, &mut GivenTensors { heads: &heads, bias: &dt, projections: (&heads, &heads) });
            let full = kind.forward(&q, &k, &v, &AttentionMask::Causal).unwrap();
            let base = AttentionMask::causal(seq - past, past, None, Device::Cpu);
            let mask = if kind.uses_plain_mask() { base } else { kind.mask(past, seq - past, None, None, &base, Device::Cpu) };
            let tail = kind.forward(&q.narrow(2, past, seq - past), &k, &v, &mask).unwrap();
            let diff = (full.narrow(2, past, seq - past) - tail).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{}: {diff}", kind.name());
        }
        // What a kind learns is part of its variant: a kind without its tensors, or with another
        // kind's, does not compile (see the `compile_fail` example on [`Attention`]), so there is
        // no mismatch left to report at run time. Linformer's one run-time condition is its mask.
        let lin = AttentionKind::Linformer { k: 4, sharing: LinformerSharing::Headwise, projections: () };
        let lin = lin.build(seq, &mut GivenTensors { heads: &heads, bias: &dt, projections: (&heads, &heads) });
        let e = lin.forward(&q, &k, &v, &AttentionMask::Causal).unwrap_err();
        assert!(e.contains("linformer") && e.contains("Full"), "{e}");
    }

    #[test]
    fn names_round_trip_and_bad_settings_are_named() {
        for kind in kinds() {
            assert!(ATTENTION_KINDS.contains(&kind.name()));
            let text = serde_json::to_string(&kind).unwrap();
            assert!(text.contains(kind.name()), "{text}");
            assert_eq!(serde_json::from_str::<AttentionKind>(&text).unwrap(), kind);
            kind.validate().unwrap();
        }
        let lin: AttentionKind = serde_json::from_str(r#"{"kind": "linformer", "k": 8, "sharing": "key-value"}"#).unwrap();
        assert_eq!(lin, AttentionKind::Linformer { k: 8, sharing: LinformerSharing::KeyValue, projections: () });
        assert!(lin.not_causal_because().is_some() && kinds().iter().all(|k| k.not_causal_because().is_none()));
        let e = AttentionKind::FixedSparse { block: 4, summary: 5 }.validate().unwrap_err();
        assert!(e.contains("summary"), "{e}");
        let e = AttentionKind::SlidingWindow { window: 0, global_tokens: 0 }.validate().unwrap_err();
        assert!(e.contains("window"), "{e}");
        assert!(serde_json::from_str::<AttentionKind>(r#"{"kind": "sliding-window", "windw": 3}"#).is_err());
    }

    #[test]
    fn every_name_builds_its_kind_from_settings() {
        let s = KindSettings { window: 16, global_tokens: 2, block: 8, summary: 2, p: 2.0, k: 4 };
        for name in ATTENTION_KINDS {
            let kind = AttentionKind::from_settings(name, &s).unwrap();
            assert_eq!(kind.name(), *name);
            kind.validate().unwrap();
        }
        assert_eq!(AttentionKind::from_settings("sliding-window", &s), Some(AttentionKind::SlidingWindow { window: 16, global_tokens: 2 }));
        assert!(AttentionKind::from_settings("flash", &s).is_none());
    }
}
