//! Linformer (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity"): keys and
//! values are projected along the sequence, from `n` positions to `k` rows, by learned `E` and
//! `F` (`[k, max_len]`), so attention costs O(n·k) instead of O(n²).
//!
//! Every projected row mixes all positions, so a query sees the future through it: Linformer is
//! not causal as published, and stlm offers it for bidirectional attention only (the byte
//! encoder of byte-pooled models); a causal decoder refuses it in its config, saying why.

use serde::{Deserialize, Serialize};
use tch::nn::{self, Init};
use tch::Tensor;

/// Which projections are shared (the paper's §4 options).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LinformerSharing {
    /// Each head has its own `E` and `F`.
    None,
    /// One `E` and one `F` per layer, shared by its heads.
    #[default]
    Headwise,
    /// One matrix per layer for both keys and values (`E = F`), shared by its heads.
    KeyValue,
    /// One matrix for keys and values of every head of every layer (the caller shares it).
    Layerwise,
}

/// The learned sequence projections of one layer (or of all layers, when layerwise).
#[derive(Debug)]
pub struct LinformerProjection {
    /// `[heads or 1, k, max_len]` (`e`).
    pub e: Tensor,
    /// `[heads or 1, k, max_len]` (`f`); `None` when keys and values share `e`.
    pub f: Option<Tensor>,
}

impl LinformerProjection {
    /// Projections to `k` rows for sequences of up to `max_len` positions, normal with standard
    /// deviation `1/sqrt(k)` (so a projected row keeps the scale of a row).
    pub fn new(path: nn::Path, heads: i64, k: i64, max_len: i64, sharing: LinformerSharing) -> Self {
        let init = Init::Randn { mean: 0.0, stdev: 1.0 / (k as f64).sqrt() };
        let n = if sharing == LinformerSharing::None { heads } else { 1 };
        let e = path.var("e", &[n, k, max_len], init);
        let f = matches!(sharing, LinformerSharing::None | LinformerSharing::Headwise).then(|| path.var("f", &[n, k, max_len], init));
        LinformerProjection { e, f }
    }
}

/// Bidirectional Linformer attention: `q` `[b, heads, n, d]`, `k`, `v` `[b, kv_heads, n, d]`
/// projected along the sequence by `e` and `f` (`[heads or 1, k, max_len]`, `max_len >= n`; the
/// first `n` columns are used), padding keys (`key_valid` `[b, n]`, false) zeroed first so they
/// contribute nothing. Returns the shape of `q`.
pub fn linformer_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    e: &Tensor,
    f: &Tensor,
    key_valid: Option<&Tensor>,
    scale: Option<f64>,
) -> Tensor {
    let (h, kvh, n, d) = (q.size()[1], k.size()[1], q.size()[2], q.size()[3]);
    assert!(e.size()[2] >= n, "linformer: sequence of {n} positions but projections for {}", e.size()[2]);
    let repeat = |t: &Tensor| if kvh == h { t.shallow_clone() } else { t.repeat_interleave_self_int(h / kvh, 1, None) };
    let (mut k, mut v) = (repeat(k), repeat(v));
    // Not `*=`: that would write into the caller's (possibly gradient-tracked) tensors.
    #[allow(clippy::assign_op_pattern)]
    if let Some(valid) = key_valid {
        let keep = valid.to_kind(k.kind()).view([valid.size()[0], 1, n, 1]);
        k = k * &keep;
        v = v * keep;
    }
    let project = |p: &Tensor, x: &Tensor| p.narrow(2, 0, n).unsqueeze(0).to_kind(x.kind()).matmul(x); // [b, h, k, d]
    let (kp, vp) = (project(e, &k), project(f, &v));
    let scale = scale.unwrap_or(1.0 / (d as f64).sqrt());
    let weights = (q.matmul(&kp.transpose(-2, -1)) * scale).softmax(-1, q.kind()); // [b, h, n, k]
    weights.matmul(&vp)
}

impl stlm_core::Layer for LinformerProjection {
    fn visit(&self, walk: &mut stlm_core::Walk<'_>) {
        walk.param("e", &self.e, stlm_core::Role::KindParameter);
        walk.param_opt("f", self.f.as_ref(), stlm_core::Role::KindParameter);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::rand;
    use tch::{Device, Kind};

    /// The definition in float64, head by head: softmax(q (E k)^T / sqrt(d)) (F v).
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, e: &Tensor, f: &Tensor) -> Tensor {
        let (h, kvh, n, d) = (q.size()[1], k.size()[1], q.size()[2], q.size()[3]);
        let heads: Vec<Tensor> = (0..h)
            .map(|i| {
                let g = i / (h / kvh);
                let pick = |p: &Tensor| p.select(0, if p.size()[0] == 1 { 0 } else { i }).narrow(1, 0, n);
                let kp = pick(e).matmul(&k.select(1, g));
                let vp = pick(f).matmul(&v.select(1, g));
                (q.select(1, i).matmul(&kp.transpose(-2, -1)) / (d as f64).sqrt()).softmax(-1, Kind::Double).matmul(&vp)
            })
            .collect();
        Tensor::stack(&heads, 1)
    }

    #[test]
    fn matches_float64_for_every_sharing() {
        tch::manual_seed(2);
        let (b, h, kvh, n, d, kp, max) = (2, 4, 2, 11, 8, 5, 16);
        let (q, k, v) = (rand(&[b, h, n, d]), rand(&[b, kvh, n, d]), rand(&[b, kvh, n, d]));
        for sharing in [LinformerSharing::None, LinformerSharing::Headwise, LinformerSharing::KeyValue] {
            let vs = nn::VarStore::new(Device::Cpu);
            let p = LinformerProjection::new(vs.root(), h, kp, max, sharing);
            let f = p.f.as_ref().unwrap_or(&p.e);
            let want = reference(&q, &k, &v, &p.e.to_kind(Kind::Double), &f.to_kind(Kind::Double));
            let x = |t: &Tensor| t.to_kind(Kind::Float);
            let got = linformer_attention(&x(&q), &x(&k), &x(&v), &p.e, f, None, None);
            let diff = (got.to_kind(Kind::Double) - want).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{sharing:?}: {diff}");
            assert_eq!(p.e.size()[0], if sharing == LinformerSharing::None { h } else { 1 });
            assert_eq!(p.f.is_none(), sharing == LinformerSharing::KeyValue);
        }
    }

    /// Padding keys do not matter, and the projections learn.
    #[test]
    fn padding_is_ignored_and_projections_get_gradients() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let p = LinformerProjection::new(vs.root(), 2, 4, 10, LinformerSharing::Headwise);
        let g = |s: &[i64]| Tensor::randn(s, (Kind::Float, Device::Cpu));
        let (q, k, v) = (g(&[1, 2, 7, 8]), g(&[1, 2, 7, 8]), g(&[1, 2, 7, 8]));
        let valid = Tensor::from_slice(&[true, true, true, true, true, false, false]).view([1, 7]);
        let f = p.f.as_ref().unwrap();
        let out = linformer_attention(&q, &k, &v, &p.e, f, Some(&valid), None);
        let noise = g(&[1, 2, 2, 8]);
        let k2 = Tensor::cat(&[k.narrow(2, 0, 5), noise.shallow_clone()], 2);
        let v2 = Tensor::cat(&[v.narrow(2, 0, 5), noise], 2);
        let out2 = linformer_attention(&q, &k2, &v2, &p.e, f, Some(&valid), None);
        assert!(out.allclose(&out2, 1e-6, 1e-6, false), "padding keys changed the output");
        out.sum(Kind::Float).backward();
        assert!(p.e.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
        assert!(f.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    /// Why a causal decoder refuses it: changing the last token changes the first output.
    #[test]
    fn is_not_causal() {
        tch::manual_seed(4);
        let vs = nn::VarStore::new(Device::Cpu);
        let p = LinformerProjection::new(vs.root(), 2, 3, 6, LinformerSharing::KeyValue);
        let g = |s: &[i64]| Tensor::randn(s, (Kind::Float, Device::Cpu));
        let (q, k, v) = (g(&[1, 2, 6, 4]), g(&[1, 2, 6, 4]), g(&[1, 2, 6, 4]));
        let out = linformer_attention(&q, &k, &v, &p.e, &p.e, None, None);
        let v2 = Tensor::cat(&[v.narrow(2, 0, 5), g(&[1, 2, 1, 4])], 2);
        let out2 = linformer_attention(&q, &k, &v2, &p.e, &p.e, None, None);
        assert!(!out.narrow(2, 0, 1).allclose(&out2.narrow(2, 0, 1), 1e-6, 1e-6, false));
    }
}
