//! Causal sliding-window attention (Mistral's `sliding_window`, Longformer's local window) with
//! optional global tokens (Longformer, made causal), computed by blocks in O(n·(w + g)).
//!
//! Query `i` sees keys `j` with `i - window < j <= i` (the `window` latest positions, itself
//! included, as transformers' `sliding_window` mask) and the first `global_tokens` positions
//! `j <= i`. The sequence is cut into blocks of 64 queries (or `window`, if shorter); each block
//! attends to its own keys and those of the blocks before it that hold the rest of its windows,
//! plus the global keys, through batched matmuls with a small band mask: no n×n scores are ever
//! formed. Tested against [`crate::naive_attention`] with [`sliding_window_mask`] in float64.

use tch::{Device, Kind, Tensor};

/// The dense boolean mask `[seq, seq]` of the pattern (true: allowed), for references and tests.
pub fn sliding_window_mask(seq: i64, window: i64, global_tokens: i64, device: Device) -> Tensor {
    let i = Tensor::arange(seq, (Kind::Int64, device)).unsqueeze(1);
    let j = Tensor::arange(seq, (Kind::Int64, device)).unsqueeze(0);
    let causal = j.le_tensor(&i);
    let local = (&i - &j).lt(window);
    let global = j.lt(global_tokens);
    causal.logical_and(&local.logical_or(&global))
}

/// Sliding-window causal attention. `q` is `[batch, heads, seq, head_dim]`, `k` and `v` are
/// `[batch, kv_heads, seq, head_dim]` (heads a multiple of kv_heads); `window >= 1`;
/// `global_tokens >= 0`; `scale` defaults to `1/sqrt(head_dim)`. Returns the shape of `q`.
pub fn sliding_window_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    window: i64,
    global_tokens: i64,
    scale: Option<f64>,
) -> Tensor {
    blocked(q, k, v, window, global_tokens, scale, BLOCK)
}

/// [`sliding_window_attention`] with blocks of `max_block` queries at most.
fn blocked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    window: i64,
    global_tokens: i64,
    scale: Option<f64>,
    max_block: i64,
) -> Tensor {
    assert!(window >= 1 && global_tokens >= 0, "window >= 1 and global_tokens >= 0");
    let (b, h, s, d) = (q.size()[0], q.size()[1], q.size()[2], q.size()[3]);
    let kvh = k.size()[1];
    // Blocks of `block` queries see `back` previous blocks: every key of their windows, and
    // `block - 1` keys at most that the band mask hides (small blocks waste less).
    let block = window.clamp(1, max_block.max(1)).min(s);
    let back = (window - 1 + block - 1) / block;
    let blocks = (s + block - 1) / block;
    let padded = blocks * block;
    let g = global_tokens.min(s);
    // [b, heads, s, d] -> [b, heads, blocks, block, d] (a view after padding).
    let to_blocks =
        |t: &Tensor, heads: i64| t.constant_pad_nd([0, 0, 0, padded - s]).view([b, heads, blocks, block, d]);
    let qb = to_blocks(q, h);
    let with_previous = |t: &Tensor| {
        let cur = to_blocks(t, kvh);
        let mut parts: Vec<Tensor> = (1..=back)
            .rev()
            .map(|shift| {
                let kept = (blocks - shift).max(0);
                cur.narrow(2, 0, kept).constant_pad_nd([0, 0, 0, 0, blocks - kept, 0])
            })
            .collect();
        parts.push(cur);
        if g > 0 {
            parts.insert(0, t.narrow(2, 0, g).unsqueeze(2).expand([b, kvh, blocks, g, d], false));
        }
        Tensor::cat(&parts, 3) // [b, kvh, blocks, g + (back + 1) block, d]
    };
    let (kb, vb) = (with_previous(k), with_previous(v));
    let allowed = block_mask(blocks, block, back, window, g, q.device()); // [blocks, block, keys]
    let out = masked_softmax_attention(&qb, &kb, &vb, &allowed, scale.unwrap_or(1.0 / (d as f64).sqrt()));
    out.reshape([b, h, padded, d]).narrow(2, 0, s)
}

/// Queries per block (when the window is longer). At 4096 positions and a 256 window, blocks of
/// 64 took 72-91 ms forward+backward against 111 ms for blocks of the window's length (2 CPU cores,
/// `stlm bench attention`): smaller blocks compute fewer masked-out scores.
const BLOCK: i64 = 64;

/// Softmax attention over blocks with an explicit boolean mask, by batched matmuls: `q`
/// `[b, heads, blocks, n, d]`, `k`/`v` `[b, kv_heads, blocks, m, d]`, `allowed` broadcastable to
/// the scores `[b, heads, blocks, n, m]`. (libtorch's SDPA with the same boolean mask on the same
/// 5-d blocks was 10-20% slower on the CPU: 87-103 ms against 79-86 ms forward+backward for
/// 64 blocks of 64 queries x 320 keys x 4 heads in a PyTorch microbenchmark.)
pub(crate) fn masked_softmax_attention(q: &Tensor, k: &Tensor, v: &Tensor, allowed: &Tensor, scale: f64) -> Tensor {
    let (h, kvh) = (q.size()[1], k.size()[1]);
    let (k, v) = if h == kvh {
        (k.shallow_clone(), v.shallow_clone())
    } else {
        (k.repeat_interleave_self_int(h / kvh, 1, None), v.repeat_interleave_self_int(h / kvh, 1, None))
    };
    // The product is not needed by its own backward, so the mask can overwrite it in place.
    let mut scores = (q * scale).matmul(&k.transpose(-2, -1));
    let _ = scores.masked_fill_(&allowed.logical_not(), f64::NEG_INFINITY);
    scores.softmax(-1, scores.kind()).matmul(&v)
}

/// Allowed keys of each block's queries: `[blocks, block, g + (back + 1) block]`, keys ordered as
/// the global ones, then the `back` previous blocks, then the block itself.
fn block_mask(blocks: i64, block: i64, back: i64, window: i64, g: i64, device: Device) -> Tensor {
    let opts = (Kind::Int64, device);
    let first = Tensor::arange(blocks, opts).view([blocks, 1, 1]) * block;
    let i = &first + Tensor::arange(block, opts).view([1, block, 1]);
    // Local keys: positions (blk - back) * block + m for m in 0..(back + 1) block.
    let j = &first - back * block + Tensor::arange((back + 1) * block, opts).view([1, 1, (back + 1) * block]);
    // A local key that is also global is taken from the global part, so it counts once.
    let local = j.ge(g).logical_and(&j.le_tensor(&i)).logical_and(&(&i - &j).lt(window));
    if g == 0 {
        return local;
    }
    let t = Tensor::arange(g, opts).view([1, 1, g]);
    Tensor::cat(&[t.le_tensor(&i), local], 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{causal_diff, reference_diff};
    use crate::{dense_attention, AttentionMask};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Float32 blocks agree with the float64 dense computation under the explicit mask.
        #[test]
        fn matches_float64_reference(seed in 0i64..1000, seq in 1i64..40, window in 1i64..20, global in 0i64..4, group in 1i64..3, block in 1i64..9) {
            tch::manual_seed(seed);
            let mask = sliding_window_mask(seq, window, global, Device::Cpu);
            let diff = reference_diff(|q, k, v| blocked(q, k, v, window, global, None, block), &mask, group);
            prop_assert!(diff <= 1e-5, "max abs diff {diff}");
        }

        /// Perturbing positions after t never changes the outputs at positions <= t.
        #[test]
        fn is_causal(seed in 0i64..1000, seq in 2i64..40, t in 0i64..39, window in 1i64..20, global in 0i64..3, block in 1i64..9) {
            tch::manual_seed(seed);
            let t = t % (seq - 1);
            let diff = causal_diff(|q, k, v| blocked(q, k, v, window, global, None, block), seq, t);
            prop_assert!(diff == 0.0, "output at <= {t} changed by {diff}");
        }
    }

    #[test]
    fn a_window_as_long_as_the_sequence_is_dense_causal() {
        tch::manual_seed(3);
        let f = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, Device::Cpu));
        let (q, k, v) = (f(&[1, 4, 37, 16]), f(&[1, 4, 37, 16]), f(&[1, 4, 37, 16]));
        let dense = dense_attention(&q, &k, &v, &AttentionMask::Causal, None);
        for block in [5, 64] {
            let sliding = blocked(&q, &k, &v, 37, 0, None, block);
            assert!((&dense - sliding).abs().max().double_value(&[]) < 1e-5);
        }
    }

    #[test]
    fn gradients_flow_to_inputs() {
        let f = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let (q, k, v) = (f(&[1, 2, 20, 8]), f(&[1, 2, 20, 8]), f(&[1, 2, 20, 8]));
        sliding_window_attention(&q, &k, &v, 4, 2, None).sum(Kind::Float).backward();
        for t in [&q, &k, &v] {
            assert!(t.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
        }
    }
}
