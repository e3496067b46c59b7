//! Expert computation grouped by expert: one stable sort of the assignments by expert, one gather
//! of their token rows, one product pair per expert over its contiguous slice, one scatter-add
//! back (MegaBlocks' layout without its block-sparse kernels). No pass over all tokens per expert.

use crate::Routing;
use tch::nn::{self, Init};
use tch::Tensor;

/// `E` gated (SwiGLU) experts with their weights stacked, in transformers' Mixtral layout.
#[derive(Debug)]
pub struct Experts {
    /// `[E, 2 · intermediate, hidden]`: gate rows, then up rows (`experts.gate_up_proj`).
    pub gate_up_proj: Tensor,
    /// `[E, hidden, intermediate]` (`experts.down_proj`).
    pub down_proj: Tensor,
}

impl Experts {
    /// `experts` SwiGLU experts of width `intermediate`, normal(0, `std`) weights and
    /// normal(0, `resid_std`) output projections.
    pub fn new(path: nn::Path, experts: i64, hidden: i64, intermediate: i64, std: f64, resid_std: f64) -> Self {
        Experts {
            gate_up_proj: path.var("gate_up_proj", &[experts, 2 * intermediate, hidden], Init::Randn { mean: 0.0, stdev: std }),
            down_proj: path.var("down_proj", &[experts, hidden, intermediate], Init::Randn { mean: 0.0, stdev: resid_std }),
        }
    }

    /// Number of experts.
    pub fn len(&self) -> i64 {
        self.gate_up_proj.size()[0]
    }

    /// True when there are no experts.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Expert `e` on rows `x` `[n, hidden]`: `down(silu(gate x) * up x)`.
    fn apply(&self, e: i64, x: &Tensor) -> Tensor {
        let width = self.down_proj.size()[2];
        let both = x.matmul(&self.gate_up_proj.get(e).tr()); // [n, 2 · intermediate]
        let h = both.narrow(-1, 0, width).silu() * both.narrow(-1, width, width);
        h.matmul(&self.down_proj.get(e).tr())
    }
}

/// The MoE output `[tokens, hidden]` for `x` `[tokens, hidden]` under `routing`: each assignment's
/// expert output times its weight, summed per token (tokens with no assignment get zeros).
pub fn moe_forward(x: &Tensor, routing: &Routing, experts: &Experts) -> Tensor {
    let e = experts.len();
    let order = routing.experts.argsort_stable(true, 0, false);
    let sorted_tokens = routing.tokens.index_select(0, &order);
    let sorted_weights = routing.weights.index_select(0, &order);
    let counts: Vec<i64> = Vec::try_from(routing.experts.bincount::<Tensor>(None, e)).expect("int64 counts");
    let rows = x.index_select(0, &sorted_tokens); // [assignments, hidden]
    let mut outputs = Vec::with_capacity(e as usize);
    let mut offset = 0;
    for (expert, &n) in counts.iter().enumerate() {
        if n > 0 {
            outputs.push(experts.apply(expert as i64, &rows.narrow(0, offset, n)));
        }
        offset += n;
    }
    let out = x.zeros_like();
    if outputs.is_empty() {
        return out;
    }
    let y = Tensor::cat(&outputs, 0) * sorted_weights.unsqueeze(1).to_kind(x.kind());
    out.index_add(0, &sorted_tokens, &y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Gate, RouterKind};
    use tch::{Device, Kind};

    /// Token by token in float64: Σ over the token's assignments of weight · expert(x).
    fn reference(x: &Tensor, r: &Routing, ex: &Experts) -> Tensor {
        let d = |t: &Tensor| t.to_kind(Kind::Double);
        let (gu, down) = (d(&ex.gate_up_proj), d(&ex.down_proj));
        let width = down.size()[2];
        let out = Tensor::zeros([x.size()[0], x.size()[1]], (Kind::Double, Device::Cpu));
        let toks: Vec<i64> = Vec::try_from(&r.tokens).unwrap();
        let exps: Vec<i64> = Vec::try_from(&r.experts).unwrap();
        let ws: Vec<f64> = Vec::try_from(r.weights.to_kind(Kind::Double)).unwrap();
        for ((t, e), w) in toks.iter().zip(&exps).zip(&ws) {
            let row = d(&x.get(*t));
            let both = gu.get(*e).matmul(&row);
            let h = both.narrow(0, 0, width).silu() * both.narrow(0, width, width);
            let y = down.get(*e).matmul(&h) * *w;
            let _ = out.get(*t).g_add_(&y);
        }
        out
    }

    #[test]
    fn matches_a_token_by_token_float64_loop() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let ex = Experts::new(vs.root(), 5, 12, 8, 0.3, 0.3);
        let x = Tensor::randn([17, 12], (Kind::Float, Device::Cpu));
        let logits = Tensor::randn([17, 5], (Kind::Float, Device::Cpu));
        for router in [
            RouterKind::TopK { k: 2, norm_topk_prob: true, gate: Gate::Softmax },
            RouterKind::Switch { capacity_factor: 0.6 },
            RouterKind::ExpertChoice { capacity_factor: 1.0 },
        ] {
            let r = router.route(&logits, None);
            let got = moe_forward(&x, &r, &ex);
            let diff = (got.to_kind(Kind::Double) - reference(&x, &r, &ex)).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{}: {diff}", router.name());
        }
    }

    #[test]
    fn gradients_reach_experts_and_router() {
        tch::manual_seed(4);
        let vs = nn::VarStore::new(Device::Cpu);
        let ex = Experts::new(vs.root(), 4, 8, 6, 0.3, 0.3);
        let x = Tensor::randn([9, 8], (Kind::Float, Device::Cpu));
        let logits = Tensor::randn([9, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let r = RouterKind::TopK { k: 2, norm_topk_prob: true, gate: Gate::Softmax }.route(&logits, None);
        moe_forward(&x, &r, &ex).square().sum(Kind::Float).backward();
        assert!(ex.gate_up_proj.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
        assert!(logits.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }
}
