//! The "fixed" and "strided" patterns of Sparse Transformers (Child et al. 2019, "Generating Long
//! Sequences with Sparse Transformers", §4.2), causal, computed block-sparse.
//!
//! Strided: query `i` sees `j <= i` with `i - j <= l` (the local part) or `(i - j) mod l == 0`
//! (the strided part), both in one softmax. Per block of `l` queries the local keys are its own
//! block and the previous one (band mask); the strided keys of offset `r` are the offset-`r`
//! positions of the earlier blocks, scored by one batched product per offset: O(n·l + n²/l).
//!
//! Fixed:
//! Positions are cut into blocks of `block` (the paper's `l`); query `i` sees the keys `j <= i`
//! of its own block (`floor(j/l) == floor(i/l)`) and the last `summary` (the paper's `c`)
//! positions of every earlier block (`j mod l >= l - c`), both in one softmax. Only those keys are
//! gathered: each query block attends to its own keys and the n/l · c summary keys, so the cost is
//! O(n · (l + n c / l)) instead of O(n²). Tested against [`crate::naive_attention`] with
//! [`fixed_sparse_mask`] in float64.

use crate::sliding::masked_softmax_attention;
use tch::{Device, Kind, Tensor};

/// The dense boolean mask `[seq, seq]` of the fixed pattern (true: allowed), for references.
pub fn fixed_sparse_mask(seq: i64, block: i64, summary: i64, device: Device) -> Tensor {
    let i = Tensor::arange(seq, (Kind::Int64, device)).unsqueeze(1);
    let j = Tensor::arange(seq, (Kind::Int64, device)).unsqueeze(0);
    let same_block = j.floor_divide_scalar(block).eq_tensor(&i.floor_divide_scalar(block));
    let summary_col = j.remainder(block).ge(block - summary);
    j.le_tensor(&i).logical_and(&same_block.logical_or(&summary_col))
}

/// Fixed-pattern sparse causal attention. `q` is `[batch, heads, seq, head_dim]`, `k` and `v`
/// `[batch, kv_heads, seq, head_dim]`; `block >= 1`, `1 <= summary <= block`; `scale` defaults to
/// `1/sqrt(head_dim)`. Returns the shape of `q`.
pub fn fixed_sparse_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    block: i64,
    summary: i64,
    scale: Option<f64>,
) -> Tensor {
    assert!(block >= 1 && (1..=block).contains(&summary), "block >= 1 and 1 <= summary <= block");
    let (b, h, s, d) = (q.size()[0], q.size()[1], q.size()[2], q.size()[3]);
    let kvh = k.size()[1];
    let blocks = (s + block - 1) / block;
    let padded = blocks * block;
    let to_blocks =
        |t: &Tensor, heads: i64| t.constant_pad_nd([0, 0, 0, padded - s]).view([b, heads, blocks, block, d]);
    let qb = to_blocks(q, h);
    // Keys of each query block: every block's summary positions, then its own block.
    let keys = |t: &Tensor| {
        let own = to_blocks(t, kvh);
        let summaries = own.narrow(3, block - summary, summary).reshape([b, kvh, 1, blocks * summary, d]);
        Tensor::cat(&[summaries.expand([b, kvh, blocks, blocks * summary, d], false), own], 3)
    };
    let (kb, vb) = (keys(k), keys(v));
    let allowed = block_mask(blocks, block, summary, q.device());
    let out = masked_softmax_attention(&qb, &kb, &vb, &allowed, scale.unwrap_or(1.0 / (d as f64).sqrt()));
    out.reshape([b, h, padded, d]).narrow(2, 0, s)
}

/// The dense boolean mask `[seq, seq]` of the strided pattern (true: allowed), for references.
pub fn strided_sparse_mask(seq: i64, stride: i64, device: Device) -> Tensor {
    let i = Tensor::arange(seq, (Kind::Int64, device)).unsqueeze(1);
    let j = Tensor::arange(seq, (Kind::Int64, device)).unsqueeze(0);
    let gap = &i - &j;
    gap.ge(0).logical_and(&gap.le(stride).logical_or(&gap.remainder(stride).eq(0)))
}

/// Strided-pattern sparse causal attention (shapes as [`fixed_sparse_attention`]); `stride >= 1`.
pub fn strided_sparse_attention(q: &Tensor, k: &Tensor, v: &Tensor, stride: i64, scale: Option<f64>) -> Tensor {
    assert!(stride >= 1, "stride >= 1");
    let (b, h, s, d) = (q.size()[0], q.size()[1], q.size()[2], q.size()[3]);
    let kvh = k.size()[1];
    let l = stride;
    let blocks = (s + l - 1) / l;
    let padded = blocks * l;
    let scale = scale.unwrap_or(1.0 / (d as f64).sqrt());
    let heads = |t: &Tensor| {
        if kvh == h {
            t.shallow_clone()
        } else {
            t.repeat_interleave_self_int(h / kvh, 1, None)
        }
    };
    let to_blocks = |t: &Tensor| t.constant_pad_nd([0, 0, 0, padded - s]).view([b, h, blocks, l, d]);
    let (qb, kb, vb) = (to_blocks(&(q * scale)), to_blocks(&heads(k)), to_blocks(&heads(v)));
    // Local keys: the previous block and the own block, [b, h, blocks, 2l, d].
    let with_previous = |t: &Tensor| {
        Tensor::cat(&[t.narrow(2, 0, blocks - 1).constant_pad_nd([0, 0, 0, 0, 1, 0]), t.shallow_clone()], 3)
    };
    let (kl, vl) = (with_previous(&kb), with_previous(&vb));
    let local = qb.matmul(&kl.transpose(-2, -1)); // [b, h, blocks, l, 2l]
                                                  // Strided keys: same offset, earlier blocks. Offsets first: [b, h, l, blocks, d].
    let (qr, kr, vr) = (qb.transpose(2, 3), kb.transpose(2, 3), vb.transpose(2, 3));
    let strided = qr.matmul(&kr.transpose(-2, -1)).transpose(2, 3); // [b, h, blocks(q), l, blocks(k)]
    let opts = (Kind::Int64, q.device());
    let qi = Tensor::arange(blocks, opts).view([blocks, 1, 1]) * l + Tensor::arange(l, opts).view([1, l, 1]);
    let kj =
        (Tensor::arange(blocks, opts).view([blocks, 1, 1]) - 1) * l + Tensor::arange(2 * l, opts).view([1, 1, 2 * l]);
    let gap = &qi - &kj;
    // Local: 0 <= i - j < l (i - j = l is the first strided key, counted there).
    let local_ok = gap.ge(0).logical_and(&gap.lt(l)).logical_and(&kj.ge(0));
    let strided_ok = Tensor::arange(blocks, opts)
        .view([1, 1, blocks])
        .lt_tensor(&Tensor::arange(blocks, opts).view([blocks, 1, 1]))
        .expand([blocks, l, blocks], false);
    let allowed = Tensor::cat(&[local_ok, strided_ok], 2);
    let mut scores = Tensor::cat(&[local, strided], 4);
    let _ = scores.masked_fill_(&allowed.logical_not(), f64::NEG_INFINITY);
    let p = scores.softmax(-1, Kind::Float).to_kind(q.kind());
    let out_local = p.narrow(4, 0, 2 * l).matmul(&vl); // [b, h, blocks, l, d]
    let out_strided = p.narrow(4, 2 * l, blocks).transpose(2, 3).matmul(&vr).transpose(2, 3);
    (out_local + out_strided).reshape([b, h, padded, d]).narrow(2, 0, s)
}

/// `[blocks, block, blocks · summary + block]`: summary keys of earlier blocks (the own block's
/// are among its own keys, so each key counts once), then the own block's keys up to the query.
fn block_mask(blocks: i64, block: i64, summary: i64, device: Device) -> Tensor {
    let opts = (Kind::Int64, device);
    let query_block = Tensor::arange(blocks, opts).view([blocks, 1, 1]);
    let key_block = Tensor::arange(blocks * summary, opts).floor_divide_scalar(summary).view([1, 1, blocks * summary]);
    let earlier = key_block.lt_tensor(&query_block).expand([blocks, block, blocks * summary], false);
    let own =
        Tensor::arange(block, opts).view([1, 1, block]).le_tensor(&Tensor::arange(block, opts).view([1, block, 1]));
    Tensor::cat(&[earlier, own.expand([blocks, block, block], false)], 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{causal_diff, reference_diff};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Both patterns agree with the float64 dense computation under their masks.
        #[test]
        fn match_float64_reference(seed in 0i64..1000, seq in 1i64..40, block in 1i64..9, summary in 1i64..9, group in 1i64..3) {
            let summary = summary.min(block);
            tch::manual_seed(seed);
            let mask = fixed_sparse_mask(seq, block, summary, Device::Cpu);
            let diff = reference_diff(|q, k, v| fixed_sparse_attention(q, k, v, block, summary, None), &mask, group);
            prop_assert!(diff <= 1e-5, "fixed: max abs diff {diff}");
            let mask = strided_sparse_mask(seq, block, Device::Cpu);
            let diff = reference_diff(|q, k, v| strided_sparse_attention(q, k, v, block, None), &mask, group);
            prop_assert!(diff <= 1e-5, "strided: max abs diff {diff}");
        }

        /// Perturbing positions after t never changes the outputs at positions <= t.
        #[test]
        fn are_causal(seed in 0i64..1000, seq in 2i64..40, t in 0i64..39, block in 1i64..9, summary in 1i64..9) {
            let (t, summary) = (t % (seq - 1), summary.min(block));
            tch::manual_seed(seed);
            let diff = causal_diff(|q, k, v| fixed_sparse_attention(q, k, v, block, summary, None), seq, t);
            prop_assert!(diff == 0.0, "fixed: output at <= {t} changed by {diff}");
            let diff = causal_diff(|q, k, v| strided_sparse_attention(q, k, v, block, None), seq, t);
            prop_assert!(diff == 0.0, "strided: output at <= {t} changed by {diff}");
        }
    }

    #[test]
    fn summary_of_a_whole_block_is_dense_causal() {
        // With c = l every earlier position is a summary position: the pattern is dense causal.
        let mask = fixed_sparse_mask(20, 4, 4, Device::Cpu);
        let causal = Tensor::ones([20, 20], (Kind::Bool, Device::Cpu)).tril(0);
        assert!(mask.equal(&causal));
    }
}
