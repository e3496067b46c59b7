//! Balancing losses of MoE layers and the expert load that training logs.

use crate::Routing;
use tch::{Kind, Tensor};

/// Tokens per expert `[experts]` (int64 counts) of a routing.
pub fn expert_load(routing: &Routing, experts: i64) -> Tensor {
    routing.experts.bincount::<Tensor>(None, experts).to_kind(Kind::Int64)
}

/// The Switch Transformer load-balancing loss `E · Σ_i f_i · P_i`: `f_i` the fraction of tokens
/// sent to expert `i` (with `k` experts per token the fractions sum to `k`, as in transformers'
/// Mixtral), `P_i` the mean gate score of expert `i`. Balanced top-k routing gives `k`.
pub fn load_balancing_loss(routing: &Routing) -> Tensor {
    load_balancing_loss_with(routing, &expert_load(routing, routing.probs.size()[1]))
}

/// [`load_balancing_loss`] with the routing's [`expert_load`] already counted.
pub fn load_balancing_loss_with(routing: &Routing, load: &Tensor) -> Tensor {
    let (tokens, experts) = (routing.probs.size()[0], routing.probs.size()[1]);
    let f = load.to_kind(Kind::Float) / tokens.max(1) as f64;
    let p = routing.probs.mean_dim(0, false, Kind::Float);
    (f * p).sum(Kind::Float) * experts as f64
}

/// The router z-loss (ST-MoE): `mean(logsumexp(logits)^2)` over tokens, keeping logits small.
pub fn z_loss(logits: &Tensor) -> Tensor {
    logits.to_kind(Kind::Float).logsumexp(-1, false).square().mean(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Gate, RouterKind};
    use tch::Device;

    #[test]
    fn losses_match_their_definitions() {
        tch::manual_seed(6);
        let logits = Tensor::randn([10, 4], (Kind::Float, Device::Cpu));
        let r = RouterKind::TopK { k: 2, norm_topk_prob: true, gate: Gate::Softmax }.route(&logits, None);
        let counts: Vec<i64> = Vec::try_from(expert_load(&r, 4)).unwrap();
        assert_eq!(counts.iter().sum::<i64>(), 20);
        let probs = logits.to_kind(Kind::Double).softmax(-1, Kind::Double);
        let mean: Vec<f64> = Vec::try_from(probs.mean_dim(0, false, Kind::Double)).unwrap();
        let want: f64 = 4.0 * counts.iter().zip(&mean).map(|(&c, p)| c as f64 / 10.0 * p).sum::<f64>();
        assert!((load_balancing_loss(&r).double_value(&[]) - want).abs() < 1e-5);
        let lse: Vec<f64> = Vec::try_from(logits.to_kind(Kind::Double).logsumexp(-1, false)).unwrap();
        let want = lse.iter().map(|v| v * v).sum::<f64>() / 10.0;
        assert!((z_loss(&logits).double_value(&[]) - want).abs() < 1e-5);
        // Uniform router scores and a perfectly balanced choice give exactly k.
        let uniform = Tensor::zeros([8, 4], (Kind::Float, Device::Cpu));
        let balanced = Routing {
            tokens: Tensor::arange(8, (Kind::Int64, Device::Cpu)).repeat_interleave_self_int(2, 0, None),
            experts: Tensor::from_slice(&[0i64, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3]),
            weights: Tensor::full([16], 0.5, (Kind::Float, Device::Cpu)),
            probs: uniform.softmax(-1, Kind::Float),
            dropped: Tensor::zeros([], (Kind::Float, Device::Cpu)),
        };
        assert!((load_balancing_loss(&balanced).double_value(&[]) - 2.0).abs() < 1e-6);
    }
}
