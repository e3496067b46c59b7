//! Shared checks for the kernels' tests: agreement with the float64 dense reference under a mask,
//! and causality.

use crate::{naive_attention, AttentionMask};
use tch::{Device, Kind, Tensor};

/// Standard normal float64 values of `shape`.
pub fn rand(shape: &[i64]) -> Tensor {
    Tensor::randn(shape, (Kind::Double, Device::Cpu))
}

/// Max abs difference between `kernel` run in float32 and [`naive_attention`] in float64 under
/// the dense boolean `mask` `[seq, seq]`, on random inputs (2 sequences, 2 kv heads, `group`
/// query heads per kv head, head dim 8).
pub fn reference_diff(kernel: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor, mask: &Tensor, group: i64) -> f64 {
    let seq = mask.size()[0];
    let (b, kvh, d) = (2, 2, 8);
    let (q, k, v) = (rand(&[b, kvh * group, seq, d]), rand(&[b, kvh, seq, d]), rand(&[b, kvh, seq, d]));
    let want = naive_attention(&q, &k, &v, &AttentionMask::Explicit(mask.view([1, 1, seq, seq])), None);
    let f = |t: &Tensor| t.to_kind(Kind::Float);
    let got = kernel(&f(&q), &f(&k), &f(&v));
    (got.to_kind(Kind::Double) - want).abs().max().double_value(&[])
}

/// How much `kernel`'s outputs at positions `<= t` change when every input after `t` is
/// replaced (4 query heads over 2 kv heads, head dim 8): zero for a causal kernel.
pub fn causal_diff(kernel: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor, seq: i64, t: i64) -> f64 {
    let f = |shape: &[i64]| rand(shape).to_kind(Kind::Float);
    let (q, k, v) = (f(&[1, 4, seq, 8]), f(&[1, 2, seq, 8]), f(&[1, 2, seq, 8]));
    let out = kernel(&q, &k, &v);
    let n = seq - t - 1;
    let change = |x: &Tensor, heads: i64| Tensor::cat(&[x.narrow(2, 0, t + 1), f(&[1, heads, n, 8])], 2);
    let out2 = kernel(&change(&q, 4), &change(&k, 2), &change(&v, 2));
    (out.narrow(2, 0, t + 1) - out2.narrow(2, 0, t + 1)).abs().max().double_value(&[])
}
