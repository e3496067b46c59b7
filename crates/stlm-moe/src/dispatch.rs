//! Expert computation grouped by expert: one stable sort of the assignments by expert, one gather
//! of their token rows, the experts' products over their contiguous slices, one scatter-add back
//! (MegaBlocks' layout without its block-sparse kernels). No pass over all tokens per expert.
//!
//! The products are two grouped matrix products (libtorch's `_grouped_mm`: every expert's slice
//! in one call, the slice boundaries a device tensor, so nothing is read back to the host) where
//! that kernel applies: on the CPU, float32/bfloat16/float16, and a hidden width whose rows are
//! multiples of 16 bytes (the kernel's requirement, in the backward too; expert widths that are
//! not are padded with zeros). Elsewhere (float64, CUDA, which this project cannot test) one
//! product pair per expert with tokens, after reading the per-expert counts back once.

use crate::Routing;
use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};

/// `E` gated (SwiGLU) experts with their weights stacked, in transformers' Mixtral layout.
#[derive(Debug)]
pub struct Experts {
    /// `[E, 2 · intermediate, hidden]`: gate rows, then up rows (`experts.gate_up_proj`).
    pub gate_up_proj: Tensor,
    /// `[E, hidden, intermediate]` (`experts.down_proj`).
    pub down_proj: Tensor,
    /// Use the grouped products where they apply (the default); false forces one product pair
    /// per expert (for comparisons).
    pub grouped: bool,
}

impl Experts {
    /// `experts` SwiGLU experts of width `intermediate`, normal(0, `std`) weights and
    /// normal(0, `resid_std`) output projections.
    pub fn new(path: nn::Path, experts: i64, hidden: i64, intermediate: i64, std: f64, resid_std: f64) -> Self {
        Experts {
            gate_up_proj: path.var("gate_up_proj", &[experts, 2 * intermediate, hidden], Init::Randn { mean: 0.0, stdev: std }),
            down_proj: path.var("down_proj", &[experts, hidden, intermediate], Init::Randn { mean: 0.0, stdev: resid_std }),
            grouped: true,
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

    /// `silu(gate) * up` of `[n, 2 · width]` products.
    fn gated(both: &Tensor, width: i64) -> Tensor {
        both.narrow(-1, 0, width).silu() * both.narrow(-1, width, width)
    }

    /// Elements per 16 bytes when [`Experts::apply_grouped`] can run on `rows` (see the module
    /// docs); `None` when it cannot.
    pub fn grouped_alignment(&self, rows: &Tensor) -> Option<i64> {
        let per_16_bytes = match rows.kind() {
            Kind::Float => 4,
            Kind::BFloat16 | Kind::Half => 8,
            _ => return None,
        };
        let hidden = self.down_proj.size()[1];
        let ok = self.grouped
            && rows.device() == Device::Cpu && self.gate_up_proj.kind() == rows.kind() && hidden % per_16_bytes == 0;
        ok.then_some(per_16_bytes)
    }

    /// Every expert on its slice of `rows` (sorted by expert) in two grouped products; `ends`
    /// `[E]` int32 holds the cumulative slice ends. An expert width that is not a multiple of
    /// `align` elements is padded with zero rows and columns (silu(0) · 0 = 0, so the padding
    /// adds nothing), copying the weights once per call.
    fn apply_grouped(&self, rows: &Tensor, ends: &Tensor, align: i64) -> Result<Tensor, tch::TchError> {
        let width = self.down_proj.size()[2];
        let padded = (width + align - 1) / align * align;
        let (gate_up, down) = match padded - width {
            0 => (self.gate_up_proj.shallow_clone(), self.down_proj.shallow_clone()),
            p => {
                let half = |i: i64| self.gate_up_proj.narrow(1, i * width, width).constant_pad_nd([0, 0, 0, p]);
                (Tensor::cat(&[half(0), half(1)], 1), self.down_proj.constant_pad_nd([0, p]))
            }
        };
        let none: Option<&Tensor> = None;
        let both = rows.f_internal_grouped_mm(&gate_up.transpose(1, 2), Some(ends), none, None::<Kind>)?;
        Self::gated(&both, padded).f_internal_grouped_mm(&down.transpose(1, 2), Some(ends), none, None::<Kind>)
    }

    /// Every expert on its slice of `rows` (sorted by expert), `counts[e]` rows each: one product
    /// pair per expert with rows.
    fn apply_each(&self, rows: &Tensor, counts: &[i64]) -> Tensor {
        let mut outputs = Vec::with_capacity(counts.len());
        let mut offset = 0;
        for (e, &n) in counts.iter().enumerate() {
            if n > 0 {
                let slice = rows.narrow(0, offset, n);
                let both = slice.matmul(&self.gate_up_proj.get(e as i64).tr()); // [n, 2 · intermediate]
                let width = self.down_proj.size()[2];
                outputs.push(Self::gated(&both, width).matmul(&self.down_proj.get(e as i64).tr()));
            }
            offset += n;
        }
        match outputs.is_empty() {
            true => rows.new_zeros([0, rows.size()[1]], (rows.kind(), rows.device())),
            false => Tensor::cat(&outputs, 0),
        }
    }
}

/// The MoE output `[tokens, hidden]` for `x` `[tokens, hidden]` under `routing`: each assignment's
/// expert output times its weight, summed per token (tokens with no assignment get zeros).
pub fn moe_forward(x: &Tensor, routing: &Routing, experts: &Experts) -> Tensor {
    let order = routing.experts.argsort_stable(true, 0, false);
    let sorted_tokens = routing.tokens.index_select(0, &order);
    let sorted_weights = routing.weights.index_select(0, &order);
    let counts = routing.experts.bincount::<Tensor>(None, experts.len());
    let rows = x.index_select(0, &sorted_tokens); // [assignments, hidden]
    let grouped = experts
        .grouped_alignment(&rows)
        .and_then(|align| experts.apply_grouped(&rows, &counts.cumsum(0, Kind::Int), align).ok());
    let y = grouped.unwrap_or_else(|| experts.apply_each(&rows, &Vec::<i64>::try_from(&counts).expect("int64 counts")));
    let y = y * sorted_weights.unsqueeze(1).to_kind(x.kind());
    x.zeros_like().index_add(0, &sorted_tokens, &y)
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

    /// The grouped products and the per-expert loop agree, forward and backward, with experts
    /// that get no tokens, for an aligned expert width and for one that is padded.
    #[test]
    fn grouped_products_equal_the_per_expert_loop() {
        tch::manual_seed(5);
        let vs = nn::VarStore::new(Device::Cpu);
        let rows = Tensor::randn([20, 16], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let counts = [5i64, 0, 7, 0, 8, 0];
        let ends = Tensor::from_slice(&counts).cumsum(0, Kind::Int);
        let g = Tensor::randn([20, 16], (Kind::Float, Device::Cpu));
        for width in [8, 6, 5] {
            let ex = Experts::new(vs.root() / format!("w{width}"), 6, 16, width, 0.3, 0.3);
            let align = ex.grouped_alignment(&rows).expect("float32 on the CPU with hidden 16");
            let mut runs = Vec::new();
            for grouped in [true, false] {
                for t in [rows.grad(), ex.gate_up_proj.grad(), ex.down_proj.grad()] {
                    if t.defined() {
                        let _ = t.shallow_clone().zero_();
                    }
                }
                let y = if grouped { ex.apply_grouped(&rows, &ends, align).unwrap() } else { ex.apply_each(&rows, &counts) };
                (&y * &g).sum(Kind::Float).backward();
                runs.push([y.detach(), rows.grad().copy(), ex.gate_up_proj.grad().copy(), ex.down_proj.grad().copy()]);
            }
            for (name, (a, b)) in ["output", "rows", "gate_up", "down"].iter().zip(runs[0].iter().zip(&runs[1])) {
                assert_eq!(a.size(), b.size(), "width {width}: {name}");
                let diff = (a - b).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "width {width}: {name}: {diff}");
            }
            assert_eq!(runs[0][2].get(1).abs().sum(Kind::Float).double_value(&[]), 0.0, "no tokens, no gradient");
        }
        assert!(Experts::new(vs.root() / "h", 2, 10, 8, 0.3, 0.3).grouped_alignment(&rows).is_none(), "hidden 10 floats");
        let ex = Experts::new(vs.root() / "d", 2, 16, 8, 0.3, 0.3);
        assert!(ex.grouped_alignment(&rows.to_kind(Kind::Double)).is_none(), "float64 takes the loop");
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
