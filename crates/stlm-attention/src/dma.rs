//! Doge's Dynamic Mask Attention (Shi et al. 2024, "Wonderful Matrices"; transformers'
//! `DogeAttention`), the attention kernel part: every key gets a content-dependent bias
//! `dt = exp(A · softplus(dt_proj(v)))` per kv head, added to the scores, and only the
//! `keep_window_size` keys with the largest bias stay visible to each query (the rest get the
//! dtype's minimum, as transformers does). The projections that make `dt` live in the model's
//! attention layer; this function takes `dt` and reproduces `prepare_dynamic_mask` plus eager
//! attention. It is O(n²) like dense attention (a top-k over every query's keys).

use crate::AttentionMask;
use tch::{Kind, Tensor};

/// The most negative finite value of `kind` (`torch.finfo(dtype).min`).
pub fn dtype_min(kind: Kind) -> f64 {
    match kind {
        Kind::Double => f64::MIN,
        Kind::Half => -65504.0,
        Kind::BFloat16 => -3.3895313892515355e38,
        _ => f32::MIN as f64,
    }
}

/// The additive mask `[b, heads, q_len, keys]` of Dynamic Mask Attention: `dt` (`[b, kv_heads,
/// keys]`) for each query's allowed keys, the dtype's minimum elsewhere, and, when there are more
/// than `keep_window_size` keys, the minimum also outside each row's `keep_window_size` largest.
pub fn dynamic_mask(dt: &Tensor, q_len: i64, heads: i64, keep_window_size: i64, mask: &AttentionMask) -> Tensor {
    let (b, kvh, keys) = (dt.size()[0], dt.size()[1], dt.size()[2]);
    let min = dtype_min(dt.kind());
    let bias = dt.unsqueeze(2).expand([b, kvh, q_len, keys], false);
    let allowed = match mask {
        AttentionMask::Causal => Some(Tensor::ones([q_len, keys], (Kind::Bool, dt.device())).tril(keys - q_len)),
        AttentionMask::Full => None,
        AttentionMask::Explicit(m) => Some(m.shallow_clone()),
    };
    let mut bias = match allowed {
        Some(a) => bias.masked_fill(&a.logical_not(), min),
        None => bias.contiguous(),
    };
    if keys > keep_window_size {
        let (_, top) = bias.topk(keep_window_size, -1, true, false);
        let active = bias.zeros_like().scatter_value(-1, &top, 1.0);
        bias = bias.masked_fill(&active.eq(0.0), min);
    }
    bias.repeat_interleave_self_int(heads / kvh, 1, None)
}

/// Dynamic Mask Attention: `q` `[b, heads, q_len, d]`, `k`, `v` `[b, kv_heads, keys, d]`, `dt`
/// `[b, kv_heads, keys]`, under `mask` (causal, full, or an explicit boolean mask over the keys).
pub fn dynamic_mask_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dt: &Tensor,
    keep_window_size: i64,
    mask: &AttentionMask,
    scale: Option<f64>,
) -> Tensor {
    let heads = q.size()[1];
    let bias = dynamic_mask(&dt.to_kind(q.kind()), q.size()[2], heads, keep_window_size, mask);
    let gqa = heads != k.size()[1];
    Tensor::scaled_dot_product_attention(q, k, v, Some(&bias), 0.0, false, scale, gqa)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{causal_diff, rand};
    use proptest::prelude::*;

    /// transformers' eager computation, written out in float64: scores plus the dynamic mask,
    /// softmax, values.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, dt: &Tensor, keep: i64) -> Tensor {
        let (h, kvh, s, d) = (q.size()[1], k.size()[1], q.size()[2], q.size()[3]);
        let min = f64::MIN;
        let causal = Tensor::ones([s, s], (Kind::Bool, q.device())).tril(0);
        let mut bias = dt.unsqueeze(2).expand([-1, -1, s, -1], false).masked_fill(&causal.logical_not(), min);
        if s > keep {
            // Keep, per row, the `keep` largest entries (ties among masked entries do not matter).
            let (_, top) = bias.topk(keep, -1, true, true);
            let keepers = bias.zeros_like().scatter_value(-1, &top, 1.0);
            bias = bias.masked_fill(&keepers.eq(0.0), min);
        }
        let bias = bias.repeat_interleave_self_int(h / kvh, 1, None);
        let kr = k.repeat_interleave_self_int(h / kvh, 1, None);
        let vr = v.repeat_interleave_self_int(h / kvh, 1, None);
        let scores = q.matmul(&kr.transpose(-2, -1)) / (d as f64).sqrt() + bias;
        scores.softmax(-1, Kind::Double).matmul(&vr)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn matches_float64_reference(seed in 0i64..1000, seq in 1i64..20, keep in 1i64..12, group in 1i64..3) {
            tch::manual_seed(seed);
            let (b, kvh, d) = (2, 2, 8);
            let (q, k, v) = (rand(&[b, kvh * group, seq, d]), rand(&[b, kvh, seq, d]), rand(&[b, kvh, seq, d]));
            let dt = (rand(&[b, kvh, seq]) * 2.0).exp();
            let want = reference(&q, &k, &v, &dt, keep);
            let f = |t: &Tensor| t.to_kind(Kind::Float);
            let got = dynamic_mask_attention(&f(&q), &f(&k), &f(&v), &f(&dt), keep, &AttentionMask::Causal, None);
            let diff = (got.to_kind(Kind::Double) - want).abs().max().double_value(&[]);
            prop_assert!(diff <= 1e-5, "max abs diff {diff}");
        }

        #[test]
        fn is_causal(seed in 0i64..1000, seq in 2i64..20, t in 0i64..19, keep in 1i64..8) {
            let t = t % (seq - 1);
            tch::manual_seed(seed);
            // dt is a function of the values, as in the model: perturbing later values perturbs
            // later dt only.
            let kernel = |q: &Tensor, k: &Tensor, v: &Tensor| {
                let dt = v.sum_dim_intlist(-1, false, Kind::Float).exp();
                dynamic_mask_attention(q, k, v, &dt, keep, &AttentionMask::Causal, None)
            };
            let diff = causal_diff(kernel, seq, t);
            prop_assert!(diff == 0.0, "output at <= {t} changed by {diff}");
        }
    }
}
