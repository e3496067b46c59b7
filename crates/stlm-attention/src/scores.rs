//! Attention with re-scaled or re-normalised scores, for the "power-scaled attention scores"
//! idea: how sharply attention concentrates should not fade as the context grows.
//!
//! - [`ssmax_attention`]: Scalable-Softmax (Nakanishi 2025, "Scalable-Softmax Is Superior for
//!   Attention"): the scores of a query that sees `n` keys are multiplied by `s · ln n` before
//!   the softmax, `s` learnable per head, so the largest score keeps its weight as `n` grows.
//!   Causally `n = i + 1`; the factor is applied to the query row, so it runs through SDPA.
//! - [`temperature_attention`]: a learnable inverse temperature per head (scores times `1/τ_h`).
//! - [`power_attention`]: weights proportional to `max(score, 0)^p`, normalised to sum to one
//!   (no exponential: larger `p` is sharper, `p = 1` is ReLU attention normalised).

use crate::{dense_attention, AttentionMask};
use tch::{Kind, Tensor};

/// Scalable-Softmax attention under `mask`: `q` `[batch, heads, q_len, head_dim]`, `k`/`v`
/// `[batch, kv_heads, kv_len, head_dim]`, `s` `[heads]` (learnable). A query's `n` is the number
/// of keys it sees (`i + 1` causally). Returns the shape of `q`.
pub fn ssmax_attention(q: &Tensor, k: &Tensor, v: &Tensor, s: &Tensor, mask: &AttentionMask, scale: Option<f64>) -> Tensor {
    let (h, q_len, kv_len) = (q.size()[1], q.size()[2], k.size()[2]);
    let device = q.device();
    let visible = match mask {
        AttentionMask::Causal => Tensor::arange_start(1, q_len + 1, (Kind::Float, device)).view([1, 1, q_len, 1]),
        AttentionMask::Full => Tensor::full([1, 1, q_len, 1], kv_len as f64, (Kind::Float, device)),
        AttentionMask::Explicit(m) => m.sum_dim_intlist(-1, true, Kind::Float).clamp_min(1.0),
    };
    let factor = s.view([1, h, 1, 1]) * visible.log().to_kind(q.kind());
    dense_attention(&(q * factor), k, v, mask, scale)
}

/// Attention with scores multiplied by `inv_temperature` `[heads]` (learnable) under `mask`.
pub fn temperature_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    inv_temperature: &Tensor,
    mask: &AttentionMask,
    scale: Option<f64>,
) -> Tensor {
    let h = q.size()[1];
    dense_attention(&(q * inv_temperature.view([1, h, 1, 1])), k, v, mask, scale)
}

/// Power-normalised attention under `mask`: weights `max(q·k·scale, 0)^p / Σ max(..)^p` over
/// the visible keys (a row with no positive score gives zeros). `p > 0`. Computed in float64 and
/// returned in the inputs' dtype: the normalisation is ill-conditioned where a row's positive
/// scores are all near zero, and in float32 its own rounding reached 2.7e-5 at p = 3.6.
pub fn power_attention(q: &Tensor, k: &Tensor, v: &Tensor, p: f64, mask: &AttentionMask, scale: Option<f64>) -> Tensor {
    assert!(p > 0.0, "p > 0");
    let kind = q.kind();
    let wide = |t: &Tensor| t.to_kind(Kind::Double);
    let out = power_attention_in(&wide(q), &wide(k), &wide(v), p, mask, scale);
    out.to_kind(kind)
}

fn power_attention_in(q: &Tensor, k: &Tensor, v: &Tensor, p: f64, mask: &AttentionMask, scale: Option<f64>) -> Tensor {
    let (h, kvh, q_len, d) = (q.size()[1], k.size()[1], q.size()[2], q.size()[3]);
    let kv_len = k.size()[2];
    let (k, v) = if h == kvh {
        (k.shallow_clone(), v.shallow_clone())
    } else {
        (k.repeat_interleave_self_int(h / kvh, 1, None), v.repeat_interleave_self_int(h / kvh, 1, None))
    };
    let scale = scale.unwrap_or(1.0 / (d as f64).sqrt());
    let weights = (q * scale).matmul(&k.transpose(-2, -1)).relu().pow_tensor_scalar(p);
    let weights = match mask {
        AttentionMask::Causal => weights * Tensor::ones([q_len, kv_len], (q.kind(), q.device())).tril(0),
        AttentionMask::Full => weights,
        AttentionMask::Explicit(m) => weights * m.to_kind(q.kind()),
    };
    let total = weights.sum_dim_intlist(-1, true, q.kind()) + 1e-12;
    (weights / total).matmul(&v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::naive_attention;
    use crate::testing::{causal_diff, rand};
    use proptest::prelude::*;
    use tch::Device;

    fn f(t: &Tensor) -> Tensor {
        t.to_kind(Kind::Float)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_kind(Kind::Double) - b).abs().max().double_value(&[])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// SSMax and per-head temperature agree with float64 softmax attention on scaled queries,
        /// and power attention with its float64 definition.
        #[test]
        fn match_float64_references(seed in 0i64..1000, seq in 1i64..24, group in 1i64..3, p in 0.5f64..4.0) {
            tch::manual_seed(seed);
            let (b, kvh, d) = (2, 2, 8);
            let h = kvh * group;
            let (q, k, v) = (rand(&[b, h, seq, d]), rand(&[b, kvh, seq, d]), rand(&[b, kvh, seq, d]));
            let s = rand(&[h]).abs() + 0.5;
            let log_n = Tensor::arange_start(1, seq + 1, (Kind::Double, Device::Cpu)).log();
            let scaled = &q * s.view([1, h, 1, 1]) * log_n.view([1, 1, seq, 1]);
            let want = naive_attention(&scaled, &k, &v, &AttentionMask::Causal, None);
            prop_assert!(max_diff(&ssmax_attention(&f(&q), &f(&k), &f(&v), &f(&s), &AttentionMask::Causal, None), &want) <= 1e-5);

            let want = naive_attention(&(&q * s.view([1, h, 1, 1])), &k, &v, &AttentionMask::Causal, None);
            let got = temperature_attention(&f(&q), &f(&k), &f(&v), &f(&s), &AttentionMask::Causal, None);
            prop_assert!(max_diff(&got, &want) <= 1e-5);

            // Power attention by its definition in float64, on the float32-rounded inputs the
            // kernel sees: the normalisation of max(s, 0)^p is ill-conditioned in rows whose
            // positive scores are all near zero, so rounding the inputs alone can move the exact
            // result by more than 1e-5; this measures the kernel's own error.
            let r = |t: &Tensor| t.to_kind(Kind::Float).to_kind(Kind::Double);
            let (q, k, v) = (r(&q), r(&k), r(&v));
            let kr = k.repeat_interleave_self_int(group, 1, None);
            let vr = v.repeat_interleave_self_int(group, 1, None);
            let z = q.matmul(&kr.transpose(-2, -1)) / (d as f64).sqrt();
            let w = z.relu().pow_tensor_scalar(p) * Tensor::ones([seq, seq], (Kind::Double, Device::Cpu)).tril(0);
            let want = (&w / (w.sum_dim_intlist(-1, true, Kind::Double) + 1e-12)).matmul(&vr);
            let got = power_attention(&f(&q), &f(&k), &f(&v), p, &AttentionMask::Causal, None);
            prop_assert!(max_diff(&got, &want) <= 1e-5, "power {}", max_diff(&got, &want));
        }

        /// Perturbing positions after t never changes outputs at positions <= t.
        #[test]
        fn are_causal(seed in 0i64..1000, seq in 2i64..24, t in 0i64..23) {
            let t = t % (seq - 1);
            tch::manual_seed(seed);
            let s = f(&rand(&[4])).abs();
            let diff = causal_diff(|q, k, v| ssmax_attention(q, k, v, &s, &AttentionMask::Causal, None), seq, t);
            prop_assert!(diff == 0.0, "ssmax: output at <= {t} changed by {diff}");
            let diff = causal_diff(|q, k, v| power_attention(q, k, v, 2.0, &AttentionMask::Causal, None), seq, t);
            prop_assert!(diff == 0.0, "power: output at <= {t} changed by {diff}");
        }
    }

    #[test]
    fn the_scales_are_learnable() {
        let g = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, Device::Cpu));
        let (q, k, v) = (g(&[1, 2, 10, 8]), g(&[1, 2, 10, 8]), g(&[1, 2, 10, 8]));
        let s = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        (ssmax_attention(&q, &k, &v, &s, &AttentionMask::Causal, None) * &v).sum(Kind::Float).backward();
        assert!(s.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }
}
