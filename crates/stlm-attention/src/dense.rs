//! Dense attention through `scaled_dot_product_attention`, and the naive reference it is tested
//! against.

use crate::AttentionMask;
use tch::{Kind, Tensor};

/// Dense attention. `q` is `[batch, heads, q_len, head_dim]`, `k` and `v` are
/// `[batch, kv_heads, kv_len, head_dim]` with `heads` a multiple of `kv_heads` (multi-head,
/// grouped-query or multi-query). `scale` defaults to `1/sqrt(head_dim)`. Returns the shape of `q`.
pub fn dense_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask, scale: Option<f64>) -> Tensor {
    let gqa = q.size()[1] != k.size()[1];
    match mask {
        AttentionMask::Causal => Tensor::scaled_dot_product_attention(q, k, v, None::<Tensor>, 0.0, true, scale, gqa),
        AttentionMask::Full => Tensor::scaled_dot_product_attention(q, k, v, None::<Tensor>, 0.0, false, scale, gqa),
        AttentionMask::Explicit(m) => Tensor::scaled_dot_product_attention(q, k, v, Some(m), 0.0, false, scale, gqa),
    }
}

/// Softmax attention written out op by op, in the dtype of the inputs: the reference for tests.
pub fn naive_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask, scale: Option<f64>) -> Tensor {
    // q: [b, h, q, d]; k, v: [b, kvh, t, d]
    let (h, kvh, d) = (q.size()[1], k.size()[1], q.size()[3]);
    let (q_len, kv_len) = (q.size()[2], k.size()[2]);
    let k = k.repeat_interleave_self_int(h / kvh, 1, None);
    let v = v.repeat_interleave_self_int(h / kvh, 1, None);
    let scale = scale.unwrap_or(1.0 / (d as f64).sqrt());
    let scores = q.matmul(&k.transpose(-2, -1)) * scale; // [b, h, q, t]
    let allowed = match mask {
        AttentionMask::Full => None,
        AttentionMask::Causal => Some(Tensor::ones([q_len, kv_len], (Kind::Bool, q.device())).tril(0)),
        AttentionMask::Explicit(m) => Some(m.shallow_clone()),
    };
    let scores = match allowed {
        Some(a) => scores.masked_fill(&a.logical_not(), f64::NEG_INFINITY),
        None => scores,
    };
    scores.softmax(-1, scores.kind()).matmul(&v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tch::Device;

    fn rand(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Double, Device::Cpu))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// SDPA in float32 agrees with the float64 naive computation for every head layout.
        #[test]
        fn sdpa_matches_float64_reference(seed in 0i64..1000, heads_per_kv in 1i64..4, kvh in 1i64..3, seq in 1i64..12) {
            tch::manual_seed(seed);
            let (b, d) = (2, 8);
            let q = rand(&[b, kvh * heads_per_kv, seq, d]);
            let k = rand(&[b, kvh, seq, d]);
            let v = rand(&[b, kvh, seq, d]);
            for mask in [AttentionMask::Causal, AttentionMask::Full] {
                let want = naive_attention(&q, &k, &v, &mask, None);
                let got = dense_attention(&q.to_kind(Kind::Float), &k.to_kind(Kind::Float), &v.to_kind(Kind::Float), &mask, None);
                let diff = (got.to_kind(Kind::Double) - want).abs().max().double_value(&[]);
                prop_assert!(diff < 1e-5, "max abs diff {diff}");
            }
        }

        /// Perturbing keys and values at positions > t never changes the output at positions <= t.
        #[test]
        fn dense_causal_is_causal(seed in 0i64..1000, seq in 2i64..16, t in 0i64..15) {
            let t = t % (seq - 1);
            tch::manual_seed(seed);
            let q = rand(&[1, 4, seq, 8]).to_kind(Kind::Float);
            let k = rand(&[1, 2, seq, 8]).to_kind(Kind::Float);
            let v = rand(&[1, 2, seq, 8]).to_kind(Kind::Float);
            let out = dense_attention(&q, &k, &v, &AttentionMask::Causal, None);
            let noise = rand(&[1, 2, seq - t - 1, 8]).to_kind(Kind::Float);
            let k2 = Tensor::cat(&[k.narrow(2, 0, t + 1), k.narrow(2, t + 1, seq - t - 1) + &noise], 2);
            let v2 = Tensor::cat(&[v.narrow(2, 0, t + 1), v.narrow(2, t + 1, seq - t - 1) - &noise], 2);
            let q2 = Tensor::cat(&[q.narrow(2, 0, t + 1), rand(&[1, 4, seq - t - 1, 8]).to_kind(Kind::Float)], 2);
            let out2 = dense_attention(&q2, &k2, &v2, &AttentionMask::Causal, None);
            let diff = (out.narrow(2, 0, t + 1) - out2.narrow(2, 0, t + 1)).abs().max().double_value(&[]);
            prop_assert!(diff == 0.0, "output at <= {t} changed by {diff}");
        }
    }

    #[test]
    fn explicit_offset_mask_matches_reference() {
        tch::manual_seed(0);
        let q = rand(&[2, 4, 3, 8]);
        let k = rand(&[2, 2, 5, 8]);
        let v = rand(&[2, 2, 5, 8]);
        let valid = Tensor::from_slice(&[true, true, true, true, true, false, true, true, true, true]).view([2, 5]);
        let mask = AttentionMask::causal(3, 2, Some(&valid), Device::Cpu);
        let want = naive_attention(&q, &k, &v, &mask, None);
        let got = dense_attention(&q, &k, &v, &mask, None);
        assert!((got - want).abs().max().double_value(&[]) < 1e-10);
    }
}
