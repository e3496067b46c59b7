//! Doge's Cross Domain MoE (transformers' `DogeCDMoE`): a shared dense SwiGLU MLP plus
//! product-key retrieval over `num_experts` single-neuron experts. Each token scores `2·K` keys
//! (`K = floor(sqrt(E))`), takes the top `K` of each half, combines them into `K²` candidate
//! experts `i·K + j` with scores `s_i + s_j`, keeps the top `k`, and adds
//! `Σ softmax(score) · act(down_embed[e] · x) · up_embed[e]` to the shared MLP's output.
//!
//! transformers splits the router logits with `view(2, tokens, K)` over the `[tokens, 2K]`
//! logits, so in a forward over several tokens the "x" and "y" halves come from *different*
//! tokens (the first half of the token list and the second): routing mixes tokens and is not
//! causal. [`CdmoeRouting::HfCompat`] reproduces that, for published checkpoints;
//! [`CdmoeRouting::Causal`] (the default for training) splits each token's own logits. The two
//! agree for one token at a time (cached generation).

use serde::{Deserialize, Serialize};
use crate::SwiGlu;
use stlm_core::{Layer, Role, Walk};
use tch::nn::{self, Init};
use tch::Tensor;

/// How the router logits are split into the two key halves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CdmoeRouting {
    /// Each token routes on its own `2K` logits (causal).
    #[default]
    Causal,
    /// transformers' `view(2, tokens, K)`: halves taken across tokens (not causal).
    HfCompat,
}

/// The CDMoE part of a model config (`cdmoe = { ... }`; transformers' Doge `is_moe` block).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdmoeConfig {
    /// Retrieval experts (a square number: only `floor(sqrt(E))²` are reachable).
    pub num_experts: i64,
    /// Experts per token.
    pub top_k: i64,
    /// Renormalise the softmaxed weights (transformers' `norm_topk_prob`).
    #[serde(default)]
    pub norm_topk_prob: bool,
    /// Router split: `causal` (default) or `hf_compat`.
    #[serde(default)]
    pub routing: CdmoeRouting,
}

impl CdmoeConfig {
    /// Checks the settings (the expert count's squareness separately: [`product_keys`]).
    pub fn validate(&self) -> Result<(), String> {
        let (keys, _) = product_keys(self.num_experts);
        if keys < 1 {
            return Err(format!("`num_experts` must be >= 1, got {}", self.num_experts));
        }
        if !(1..=keys * keys).contains(&self.top_k) {
            return Err(format!("`top_k` ({}) must be between 1 and the {} reachable experts", self.top_k, keys * keys));
        }
        Ok(())
    }
}

/// The number of product keys `K = floor(sqrt(experts))`, and whether every expert is reachable
/// (only `K²` are: the rest of a non-square count can never be chosen).
pub fn product_keys(experts: i64) -> (i64, bool) {
    let k = (experts as f64).sqrt().floor() as i64;
    // Guard against float rounding at perfect squares.
    let k = if (k + 1) * (k + 1) <= experts { k + 1 } else if k * k > experts { k - 1 } else { k };
    (k, k * k == experts)
}

/// The layer, with transformers' names: `gate_proj`, `up_proj`, `down_proj` (shared MLP),
/// `router_gate` (`[2K, hidden]`), `down_embed`, `up_embed` (`[experts, hidden]`).
#[derive(Debug)]
pub struct CdMoe {
    /// The shared MLP (its weights directly under the layer's path).
    pub shared: SwiGlu,
    /// `[2K, hidden]`.
    pub router_gate: Tensor,
    /// `[experts, hidden]`.
    pub down_embed: Tensor,
    /// `[experts, hidden]`.
    pub up_embed: Tensor,
    /// Experts per token.
    pub top_k: i64,
    /// Renormalise the (already softmaxed) weights, as transformers' flag does.
    pub norm_topk_prob: bool,
    /// Router split.
    pub routing: CdmoeRouting,
}

impl Layer for CdMoe {
    fn visit(&self, walk: &mut Walk<'_>) {
        self.shared.visit(walk); // directly under the layer's path, as transformers names it
        walk.param("router_gate.weight", &self.router_gate, Role::Matrix);
        let rows = Role::RoutedRows { experts: self.down_embed.size()[0], per_token: self.top_k as f64 };
        walk.param("down_embed.weight", &self.down_embed, rows);
        walk.param("up_embed.weight", &self.up_embed, rows);
    }
}

impl CdMoe {
    /// A layer of `experts` retrieval experts (`top_k` per token) beside a shared MLP of width
    /// `intermediate`; normal(0, `std`) weights, normal(0, `resid_std`) for the output side.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        path: nn::Path,
        hidden: i64,
        intermediate: i64,
        experts: i64,
        top_k: i64,
        norm_topk_prob: bool,
        routing: CdmoeRouting,
        std: f64,
        resid_std: f64,
    ) -> Self {
        let (keys, _) = product_keys(experts);
        let n = |s: f64| Init::Randn { mean: 0.0, stdev: s };
        CdMoe {
            shared: SwiGlu::new(&path, hidden, intermediate, std, resid_std),
            router_gate: (&path / "router_gate").var("weight", &[2 * keys, hidden], n(std)),
            down_embed: (&path / "down_embed").var("weight", &[experts, hidden], n(std)),
            up_embed: (&path / "up_embed").var("weight", &[experts, hidden], n(resid_std)),
            top_k,
            norm_topk_prob,
            routing,
        }
    }

    /// `[b, s, hidden] -> [b, s, hidden]` (SiLU as the activation, Doge's `hidden_act`).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (b, s, h) = (x.size()[0], x.size()[1], x.size()[2]);
        let n = b * s;
        let keys = self.router_gate.size()[0] / 2;
        let logits = x.matmul(&self.router_gate.tr()); // [b, s, 2K]
        let halves = match self.routing {
            CdmoeRouting::HfCompat => logits.contiguous().view([2, n, keys]),
            CdmoeRouting::Causal => logits.reshape([n, 2, keys]).permute([1, 0, 2]),
        };
        // transformers takes all K keys of each half and ranks all K² sums; the k best sums
        // always pair keys from the top k of each half, so ranking those k² is the same result
        // (ties aside) for far less work when k is much smaller than K.
        let m = self.top_k.min(keys);
        let (sx, ix) = halves.get(0).topk(m, -1, true, true); // [n, m]
        let (sy, iy) = halves.get(1).topk(m, -1, true, true);
        let all_scores = (sx.unsqueeze(-1) + sy.unsqueeze(-2)).view([n, m * m]);
        let all_indices = (ix.unsqueeze(-1) * keys + iy.unsqueeze(-2)).view([n, m * m]);
        let (scores, pos) = all_scores.topk(self.top_k, -1, true, true);
        let indices = all_indices.gather(-1, &pos, false); // [n, k]
        let mut weights = scores.softmax(-1, scores.kind());
        if self.norm_topk_prob {
            weights = &weights / weights.sum_dim_intlist(-1, true, weights.kind());
        }
        let flat = x.reshape([n, h, 1]);
        let down = Tensor::embedding(&self.down_embed, &indices, -1, false, false); // [n, k, h]
        let up = Tensor::embedding(&self.up_embed, &indices, -1, false, false);
        let expert_weights = down.matmul(&flat).view([n, self.top_k]).silu() * weights;
        let experts = expert_weights.view([n, 1, self.top_k]).matmul(&up).view([b, s, h]);
        self.shared.forward(x) + experts
    }
}

impl CdMoe {
    /// A copy sharing the same weight tensors (for trying the other routing mode).
    pub fn clone_shallow(&self) -> CdMoe {
        CdMoe {
            shared: self.shared.shallow_clone(),
            router_gate: self.router_gate.shallow_clone(),
            down_embed: self.down_embed.shallow_clone(),
            up_embed: self.up_embed.shallow_clone(),
            ..*self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tch::{Device, Kind};

    fn layer(routing: CdmoeRouting) -> (nn::VarStore, CdMoe) {
        let vs = nn::VarStore::new(Device::Cpu);
        let l = CdMoe::new(vs.root(), 16, 12, 64, 4, false, routing, 0.4, 0.4);
        (vs, l)
    }

    #[test]
    fn product_key_counts() {
        assert_eq!(product_keys(64), (8, true));
        assert_eq!(product_keys(1024), (32, true));
        assert_eq!(product_keys(1000), (31, false));
        assert_eq!(product_keys(16384), (128, true));
    }

    /// Float64 definition for one token with its own logits: product keys, top-k, softmax.
    #[test]
    fn causal_mode_matches_its_definition() {
        tch::manual_seed(2);
        let (_vs, l) = layer(CdmoeRouting::Causal);
        let x = Tensor::randn([1, 3, 16], (Kind::Float, Device::Cpu));
        let got = l.forward(&x).to_kind(Kind::Double);
        let d = |t: &Tensor| t.to_kind(Kind::Double);
        for t in 0..3 {
            let xt = d(&x.get(0).get(t));
            let r: Vec<f64> = Vec::try_from(d(&l.router_gate).matmul(&xt)).unwrap();
            let (rx, ry) = r.split_at(8);
            let mut cand: Vec<(f64, i64)> = (0..8).flat_map(|i| (0..8).map(move |j| (rx[i] + ry[j], (i * 8 + j) as i64))).collect();
            cand.sort_by(|a, b| b.0.total_cmp(&a.0));
            let top = &cand[..4];
            let m = top[0].0;
            let z: f64 = top.iter().map(|c| (c.0 - m).exp()).sum();
            let mut want = {
                let g = d(&l.shared.gate_proj).matmul(&xt).silu() * d(&l.shared.up_proj).matmul(&xt);
                d(&l.shared.down_proj).matmul(&g)
            };
            for &(score, e) in top {
                let w = (score - m).exp() / z;
                let a = d(&l.down_embed.get(e)).dot(&xt).silu() * w;
                want += d(&l.up_embed.get(e)) * a;
            }
            let diff = (got.get(0).get(t) - want).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "token {t}: {diff}");
        }
    }

    #[test]
    fn both_modes_agree_on_one_token() {
        tch::manual_seed(3);
        let (_vs, causal) = layer(CdmoeRouting::Causal);
        let hf = CdMoe { routing: CdmoeRouting::HfCompat, ..causal.clone_shallow() };
        let x = Tensor::randn([1, 1, 16], (Kind::Float, Device::Cpu));
        assert!(causal.forward(&x).allclose(&hf.forward(&x), 1e-6, 1e-6, false));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        /// The causal mode is causal; transformers' split is not (it mixes tokens).
        #[test]
        fn causal_mode_is_causal(seed in 0i64..1000, t in 0i64..8) {
            tch::manual_seed(seed);
            let (_vs, l) = layer(CdmoeRouting::Causal);
            let x = Tensor::randn([2, 9, 16], (Kind::Float, Device::Cpu));
            let y = Tensor::cat(&[x.narrow(1, 0, t + 1), Tensor::randn([2, 8 - t, 16], (Kind::Float, Device::Cpu))], 1);
            let diff = (l.forward(&x).narrow(1, 0, t + 1) - l.forward(&y).narrow(1, 0, t + 1)).abs().max().double_value(&[]);
            prop_assert!(diff == 0.0, "changed by {diff}");
        }
    }

    #[test]
    fn hf_split_mixes_tokens() {
        tch::manual_seed(4);
        let (_vs, causal) = layer(CdmoeRouting::Causal);
        let l = CdMoe { routing: CdmoeRouting::HfCompat, ..causal.clone_shallow() };
        let x = Tensor::randn([1, 6, 16], (Kind::Float, Device::Cpu));
        // view(2, 6, 8) of the [6, 16] logits: token 0 routes on its own first half and token
        // 3's first half, so changing tokens 3.. changes token 0's output.
        let y = Tensor::cat(&[x.narrow(1, 0, 3), Tensor::randn([1, 3, 16], (Kind::Float, Device::Cpu))], 1);
        let diff = (l.forward(&x).narrow(1, 0, 1) - l.forward(&y).narrow(1, 0, 1)).abs().max().double_value(&[]);
        assert!(diff > 0.0, "the first token's output depends on later tokens");
    }
}
