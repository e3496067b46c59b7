//! One config field picks the attention of each layer: [`AttentionKind`] names every variant,
//! checks its settings, says which keys a query may see, and runs its kernel.
//!
//! Over a whole sequence from position 0 (training, prefill) each kind runs its own kernel
//! ([`sliding_window_attention`] in O(n·w), the block-sparse patterns, ...). Against a KV cache or
//! under padding, the kind's pattern becomes an explicit mask over the cached keys
//! ([`AttentionKind::mask`]) and the kernel runs with it; the tests check that both give the same
//! outputs.

use crate::{
    dense_attention, dynamic_mask_attention, fixed_sparse_attention, linformer_attention, LinformerSharing, power_attention, sliding_window_attention, ssmax_attention,
    strided_sparse_attention, temperature_attention, AttentionMask,
};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// The attention of one layer, as written in a model config (`kind = "sliding-window"`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum AttentionKind {
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
    Ssmax,
    /// Scores times a learnable inverse temperature per head.
    Temperature,
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
    },
    /// Doge's Dynamic Mask Attention: a learned per-key bias from the values, and each query sees
    /// only the `keep_window_size` keys with the largest bias (transformers' `DogeAttention`).
    DogeDma {
        /// Keys each query keeps (all of them while there are no more).
        keep_window_size: i64,
    },
}

/// The config names of the kinds, in the order of [`AttentionKind`].
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
            "dense" => AttentionKind::Dense,
            "sliding-window" => AttentionKind::SlidingWindow { window: s.window, global_tokens: s.global_tokens },
            "fixed-sparse" => AttentionKind::FixedSparse { block: s.block, summary: s.summary },
            "strided-sparse" => AttentionKind::StridedSparse { stride: s.block },
            "ssmax" => AttentionKind::Ssmax,
            "temperature" => AttentionKind::Temperature,
            "power" => AttentionKind::Power { p: s.p },
            "linformer" => AttentionKind::Linformer { k: s.k, sharing: LinformerSharing::Headwise },
            "doge-dma" => AttentionKind::DogeDma { keep_window_size: s.window },
            _ => return None,
        })
    }

    /// The config name (`kind = "..."`).
    pub fn name(&self) -> &'static str {
        match self {
            AttentionKind::Dense => "dense",
            AttentionKind::SlidingWindow { .. } => "sliding-window",
            AttentionKind::FixedSparse { .. } => "fixed-sparse",
            AttentionKind::StridedSparse { .. } => "strided-sparse",
            AttentionKind::Ssmax => "ssmax",
            AttentionKind::Temperature => "temperature",
            AttentionKind::Power { .. } => "power",
            AttentionKind::Linformer { .. } => "linformer",
            AttentionKind::DogeDma { .. } => "doge-dma",
        }
    }

    /// Checks the settings; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        let positive = |name: &str, v: i64| if v >= 1 { Ok(()) } else { Err(format!("`{name}` must be >= 1, got {v}")) };
        match *self {
            AttentionKind::SlidingWindow { window, global_tokens } => {
                positive("window", window)?;
                if global_tokens < 0 {
                    return Err(format!("`global_tokens` must be >= 0, got {global_tokens}"));
                }
                Ok(())
            }
            AttentionKind::FixedSparse { block, summary } => {
                positive("block", block)?;
                if !(1..=block).contains(&summary) {
                    return Err(format!("`summary` must be between 1 and `block` ({block}), got {summary}"));
                }
                Ok(())
            }
            AttentionKind::StridedSparse { stride } => positive("stride", stride),
            AttentionKind::DogeDma { keep_window_size } => positive("keep_window_size", keep_window_size),
            AttentionKind::Linformer { k, .. } => positive("k", k),
            AttentionKind::Power { p } if !(p > 0.0 && p.is_finite()) => Err(format!("`p` must be > 0, got {p}")),
            _ => Ok(()),
        }
    }

    /// The learnable per-head parameter of this kind and its initial value, if it has one:
    /// `ssmax_scale` (`1 / ln(max_positions)`, so that the factor is 1 at the longest context)
    /// or `inv_temperature` (1).
    pub fn head_parameter(&self, max_positions: i64) -> Option<(&'static str, f64)> {
        match self {
            AttentionKind::Ssmax => Some(("ssmax_scale", 1.0 / (max_positions.max(2) as f64).ln())),
            AttentionKind::Temperature => Some(("inv_temperature", 1.0)),
            _ => None,
        }
    }

    /// `(window, global_tokens)` when decoding needs only a rolling cache of the keys.
    pub fn rolling_window(&self) -> Option<(i64, i64)> {
        match *self {
            AttentionKind::SlidingWindow { window, global_tokens } => Some((window, global_tokens)),
            _ => None,
        }
    }

    /// Whether query position `q_pos` may see key position `k_pos` (integer tensors that
    /// broadcast, e.g. `[q, 1]` and `[1, k]`): causal, and inside the kind's pattern.
    pub fn pattern(&self, q_pos: &Tensor, k_pos: &Tensor) -> Tensor {
        let causal = k_pos.le_tensor(q_pos);
        match *self {
            AttentionKind::SlidingWindow { window, global_tokens } => {
                causal.logical_and(&(q_pos - k_pos).lt(window).logical_or(&k_pos.lt(global_tokens)))
            }
            AttentionKind::FixedSparse { block, summary } => {
                let same_block = k_pos.floor_divide_scalar(block).eq_tensor(&q_pos.floor_divide_scalar(block));
                causal.logical_and(&same_block.logical_or(&k_pos.remainder(block).ge(block - summary)))
            }
            AttentionKind::StridedSparse { stride } => {
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
        matches!(self, AttentionKind::Linformer { .. }).then_some(
            "Linformer projects keys and values along the sequence, so every projected key mixes all \
             positions, future ones included, and a decoder would see the tokens it must predict; use it \
             where attention is bidirectional (the byte encoder of byte-pooled models)",
        )
    }

    /// Whether the kind takes the model's mask over all cached keys as it is (dense attention and
    /// Dynamic Mask Attention) rather than its own pattern through [`AttentionKind::mask`].
    pub fn uses_plain_mask(&self) -> bool {
        matches!(self, AttentionKind::Dense | AttentionKind::DogeDma { .. })
    }

    /// Attention of `q` `[b, heads, q_len, d]` over `k`, `v` `[b, kv_heads, keys, d]` under
    /// `mask`: `Causal` (queries and keys are the same positions from 0) runs the kind's own
    /// kernel; for pattern kinds an explicit mask must come from [`AttentionKind::mask`]. `input`
    /// is what the kind learns (a layer builds and holds it with the kind): the `[heads]` scale of
    /// `ssmax` and `temperature`, the per-key bias `dt` `[b, kv_heads, keys]` of `doge-dma`, or the
    /// `E` and `F` projections (`[heads or 1, k, max_len]`) of `linformer`, which is bidirectional:
    /// it takes `AttentionMask::Full` only (padding goes through [`linformer_attention`]'s
    /// `key_valid`). An input that is not the kind's, or a mask Linformer cannot take, is an error.
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, input: KernelInput<'_>, mask: &AttentionMask) -> Result<Tensor, String> {
        let causal = matches!(mask, AttentionMask::Causal);
        let wrong = || format!("attention kind `{}` does not take {}", self.name(), input.name());
        Ok(match (self, input) {
            (AttentionKind::SlidingWindow { window, global_tokens }, KernelInput::None) if causal => {
                sliding_window_attention(q, k, v, *window, *global_tokens, None)
            }
            (AttentionKind::FixedSparse { block, summary }, KernelInput::None) if causal => {
                fixed_sparse_attention(q, k, v, *block, *summary, None)
            }
            (AttentionKind::StridedSparse { stride }, KernelInput::None) if causal => strided_sparse_attention(q, k, v, *stride, None),
            (AttentionKind::Ssmax, KernelInput::HeadScale(s)) => ssmax_attention(q, k, v, s, mask, None),
            (AttentionKind::Temperature, KernelInput::HeadScale(t)) => temperature_attention(q, k, v, t, mask, None),
            (AttentionKind::Power { p }, KernelInput::None) => power_attention(q, k, v, *p, mask, None),
            (AttentionKind::Linformer { .. }, KernelInput::Projections { e, f }) => {
                if !matches!(mask, AttentionMask::Full) {
                    return Err("linformer is bidirectional: it takes AttentionMask::Full".into());
                }
                linformer_attention(q, k, v, e, f, None, None)
            }
            (AttentionKind::DogeDma { keep_window_size }, KernelInput::KeyBias(dt)) => {
                dynamic_mask_attention(q, k, v, dt, *keep_window_size, mask, None)
            }
            (
                AttentionKind::Dense | AttentionKind::SlidingWindow { .. } | AttentionKind::FixedSparse { .. } | AttentionKind::StridedSparse { .. },
                KernelInput::None,
            ) => dense_attention(q, k, v, mask, None),
            _ => return Err(wrong()),
        })
    }
}

/// What an attention kind's kernel reads besides queries, keys and values: the tensors a layer
/// learns for its kind, built and held with it (stlm-model's `KindParams`), or computed from
/// them per pass.
#[derive(Debug, Clone, Copy)]
pub enum KernelInput<'a> {
    /// Nothing (dense, windowed, block-sparse and power attention).
    None,
    /// A learned scale per query head `[heads]`: SSMax's `ssmax_scale`, the temperature kind's
    /// `inv_temperature`.
    HeadScale(&'a Tensor),
    /// Dynamic Mask Attention's per-key bias `dt` `[b, kv_heads, keys]`.
    KeyBias(&'a Tensor),
    /// Linformer's key and value projections `[heads or 1, k, max_len]`.
    Projections {
        /// Keys' projection.
        e: &'a Tensor,
        /// Values' projection (`e` again when they share it).
        f: &'a Tensor,
    },
}

impl KernelInput<'_> {
    /// A short name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            KernelInput::None => "no learned input",
            KernelInput::HeadScale(_) => "a per-head scale",
            KernelInput::KeyBias(_) => "a per-key bias",
            KernelInput::Projections { .. } => "sequence projections",
        }
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
            AttentionKind::Ssmax,
            AttentionKind::Temperature,
            AttentionKind::Power { p: 2.0 },
            AttentionKind::DogeDma { keep_window_size: 4 },
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
        for kind in kinds() {
            let param = match kind {
                AttentionKind::DogeDma { .. } => KernelInput::KeyBias(&dt),
                AttentionKind::Ssmax | AttentionKind::Temperature => KernelInput::HeadScale(&heads),
                _ => KernelInput::None,
            };
            let full = kind.forward(&q, &k, &v, param, &AttentionMask::Causal).unwrap();
            let base = AttentionMask::causal(seq - past, past, None, Device::Cpu);
            let mask = if kind.uses_plain_mask() { base } else { kind.mask(past, seq - past, None, None, &base, Device::Cpu) };
            let tail = kind.forward(&q.narrow(2, past, seq - past), &k, &v, param, &mask).unwrap();
            let diff = (full.narrow(2, past, seq - past) - tail).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{}: {diff}", kind.name());
        }
        // An input that is not the kind's is an error naming both, not a panic.
        let e = AttentionKind::Ssmax.forward(&q, &k, &v, KernelInput::None, &AttentionMask::Causal).unwrap_err();
        assert!(e.contains("ssmax") && e.contains("no learned input"), "{e}");
        let e = AttentionKind::Dense.forward(&q, &k, &v, KernelInput::HeadScale(&heads), &AttentionMask::Causal).unwrap_err();
        assert!(e.contains("dense") && e.contains("per-head scale"), "{e}");
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
        assert_eq!(lin, AttentionKind::Linformer { k: 8, sharing: LinformerSharing::KeyValue });
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
