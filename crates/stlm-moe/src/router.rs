//! Routers: from router logits `[tokens, experts]` to the experts each token goes to and the
//! weights their outputs get, as one flat list of assignments.
//!
//! Tokens come in *position-major* order (all sequences' position 0, then position 1, ...), so
//! that where a router drops tokens for capacity (Switch), earlier positions go first and a token's
//! fate never depends on later positions: the router stays causal.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// How router logits become gate scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Gate {
    /// Softmax over the experts (Mixtral, Switch, Qwen-MoE).
    #[default]
    Softmax,
    /// An independent sigmoid per expert (DeepSeek-V3).
    Sigmoid,
}

fn yes() -> bool {
    true
}

fn default_capacity() -> f64 {
    1.25
}

fn default_gamma() -> f64 {
    1e-3
}

/// A router, as written in a model config (`kind = "top-k"`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum RouterKind {
    /// Each token goes to its `k` highest-scoring experts; with `norm_topk_prob` their weights are
    /// renormalised to sum to one (Mixtral always does; Qwen-MoE makes it a setting).
    TopK {
        /// Experts per token.
        k: i64,
        /// Renormalise the chosen weights.
        #[serde(default = "yes")]
        norm_topk_prob: bool,
        /// Gate function.
        #[serde(default)]
        gate: Gate,
    },
    /// Switch Transformer: top-1 with at most `ceil(capacity_factor · tokens / experts)` tokens per
    /// expert; tokens over capacity are dropped (their output is zero and the residual carries
    /// them), earlier positions first.
    Switch {
        /// Capacity as a multiple of an even share.
        #[serde(default = "default_capacity")]
        capacity_factor: f64,
    },
    /// DeepSeek-V3's auxiliary-loss-free balancing: top-k on the gate scores plus a per-expert
    /// bias that only changes the choice (weights are the unbiased scores, renormalised); the
    /// trainer moves the bias by `gamma` towards balance after each step
    /// ([`update_balance_bias`]). Shared experts are the layer's business.
    AuxFree {
        /// Experts per token.
        k: i64,
        /// Gate function (DeepSeek-V3: sigmoid).
        #[serde(default)]
        gate: Gate,
        /// Bias update rate.
        #[serde(default = "default_gamma")]
        gamma: f64,
    },
    /// Expert choice (Zhou et al. 2022): each expert takes its `capacity_factor · tokens /
    /// experts` highest-scoring tokens. Which tokens an expert takes depends on all of them,
    /// later ones included, so it is not causal.
    ExpertChoice {
        /// Tokens per expert as a multiple of an even share.
        #[serde(default = "yes_one")]
        capacity_factor: f64,
    },
}

fn yes_one() -> f64 {
    1.0
}

/// The routing of a batch of tokens: assignment `a` sends token `tokens[a]` to expert
/// `experts[a]` with weight `weights[a]`.
#[derive(Debug)]
pub struct Routing {
    /// `[assignments]`, int64.
    pub tokens: Tensor,
    /// `[assignments]`, int64.
    pub experts: Tensor,
    /// `[assignments]`, float (the logits' dtype).
    pub weights: Tensor,
    /// Gate scores `[tokens, experts]` before the choice (for the balancing loss).
    pub probs: Tensor,
    /// Fraction of the wanted assignments dropped for capacity (a scalar tensor; 0 when none).
    pub dropped: Tensor,
}

impl RouterKind {
    /// Experts a token runs on average: `k` for top-k routers, 1 for Switch (before tokens over
    /// capacity are dropped), the capacity factor for expert choice.
    pub fn experts_per_token(&self) -> f64 {
        match self {
            RouterKind::TopK { k, .. } | RouterKind::AuxFree { k, .. } => *k as f64,
            RouterKind::Switch { .. } => 1.0,
            RouterKind::ExpertChoice { capacity_factor } => *capacity_factor,
        }
    }

    /// The config name.
    pub fn name(&self) -> &'static str {
        match self {
            RouterKind::TopK { .. } => "top-k",
            RouterKind::Switch { .. } => "switch",
            RouterKind::AuxFree { .. } => "aux-free",
            RouterKind::ExpertChoice { .. } => "expert-choice",
        }
    }

    /// Checks the settings against `experts`; the error names the field.
    pub fn validate(&self, experts: i64) -> Result<(), String> {
        match *self {
            RouterKind::TopK { k, .. } | RouterKind::AuxFree { k, .. } if !(1..=experts).contains(&k) => {
                Err(format!("`k` ({k}) must be between 1 and the number of experts ({experts})"))
            }
            RouterKind::Switch { capacity_factor: c } | RouterKind::ExpertChoice { capacity_factor: c }
                if !(c > 0.0 && c.is_finite()) =>
            {
                Err(format!("`capacity_factor` must be > 0, got {c}"))
            }
            RouterKind::AuxFree { gamma, .. } if !(gamma >= 0.0 && gamma.is_finite()) => {
                Err(format!("`gamma` must be >= 0, got {gamma}"))
            }
            _ => Ok(()),
        }
    }

    /// Why this router cannot be used in a causal model, if it cannot.
    pub fn not_causal_because(&self) -> Option<&'static str> {
        matches!(self, RouterKind::ExpertChoice { .. }).then_some(
            "expert-choice routing lets each expert pick its highest-scoring tokens among all of them, \
             so whether a token is processed depends on later tokens; use it where the model is not causal",
        )
    }

    /// Routes `logits` `[tokens, experts]` (position-major). `bias` `[experts]` is the balancing
    /// bias of `aux-free` (zeros when `None`).
    pub fn route(&self, logits: &Tensor, bias: Option<&Tensor>) -> Routing {
        let (t, e) = (logits.size()[0], logits.size()[1]);
        let device = logits.device();
        let scores = |gate: Gate| match gate {
            Gate::Softmax => logits.softmax(-1, Kind::Float),
            Gate::Sigmoid => logits.to_kind(Kind::Float).sigmoid(),
        };
        let flat = |k: i64| Tensor::arange(t, (Kind::Int64, device)).unsqueeze(1).expand([t, k], false).reshape([-1]);
        let none_dropped = || Tensor::zeros([], (Kind::Float, device));
        let kind = logits.kind();
        match *self {
            RouterKind::TopK { k, norm_topk_prob, gate } => {
                let probs = scores(gate);
                let (mut w, idx) = probs.topk(k, -1, true, true);
                if norm_topk_prob {
                    w = &w / w.sum_dim_intlist(-1, true, Kind::Float);
                }
                Routing { tokens: flat(k), experts: idx.reshape([-1]), weights: w.reshape([-1]).to_kind(kind), probs, dropped: none_dropped() }
            }
            RouterKind::AuxFree { k, gate, .. } => {
                let probs = scores(gate);
                let biased = match bias {
                    Some(b) => &probs + b.to_kind(Kind::Float).unsqueeze(0),
                    None => probs.shallow_clone(),
                };
                let (_, idx) = biased.topk(k, -1, true, true);
                let w = probs.gather(1, &idx, false);
                let w = &w / w.sum_dim_intlist(-1, true, Kind::Float);
                Routing { tokens: flat(k), experts: idx.reshape([-1]), weights: w.reshape([-1]).to_kind(kind), probs, dropped: none_dropped() }
            }
            RouterKind::Switch { capacity_factor } => {
                let probs = scores(Gate::Softmax);
                let (w, idx) = probs.max_dim(-1, false); // [t]
                let capacity = (capacity_factor * t as f64 / e as f64).ceil() as i64;
                // Rank of each token among those sent to its expert, in token order.
                let onehot = idx.one_hot(e); // [t, e]
                let rank = (onehot.cumsum(0, Kind::Int64) - 1).gather(1, &idx.unsqueeze(1), false).squeeze_dim(1);
                let kept = rank.lt(capacity);
                let dropped = kept.logical_not().to_kind(Kind::Float).mean(Kind::Float);
                let tokens = Tensor::arange(t, (Kind::Int64, device)).masked_select(&kept);
                Routing {
                    experts: idx.masked_select(&kept),
                    weights: w.masked_select(&kept).to_kind(kind),
                    tokens,
                    probs,
                    dropped,
                }
            }
            RouterKind::ExpertChoice { capacity_factor } => {
                let probs = scores(Gate::Softmax);
                let capacity = ((capacity_factor * t as f64 / e as f64).ceil() as i64).clamp(1, t);
                let (w, tok) = probs.transpose(0, 1).topk(capacity, -1, true, true); // [e, c]
                let experts = Tensor::arange(e, (Kind::Int64, device)).unsqueeze(1).expand([e, capacity], false);
                // Tokens no expert took.
                let taken = Tensor::zeros([t], (Kind::Float, device)).index_fill(0, &tok.reshape([-1]), 1.0);
                let dropped = 1.0 - taken.mean(Kind::Float);
                Routing {
                    tokens: tok.reshape([-1]),
                    experts: experts.reshape([-1]),
                    weights: w.reshape([-1]).to_kind(kind),
                    probs,
                    dropped,
                }
            }
        }
    }
}

/// DeepSeek-V3's bias update: each expert's bias moves by `gamma` up when it got fewer than the
/// mean number of tokens and down when it got more (`load` `[experts]`, counts). In place.
pub fn update_balance_bias(bias: &mut Tensor, load: &Tensor, gamma: f64) {
    let _g = tch::no_grad_guard();
    let _ = bias.g_add_(&balance_bias_step(load, gamma, bias.kind()));
}

/// The step [`update_balance_bias`] adds: `gamma · sign(mean load − load)`, in `kind`.
pub fn balance_bias_step(load: &Tensor, gamma: f64, kind: Kind) -> Tensor {
    let _g = tch::no_grad_guard();
    let load = load.to_kind(Kind::Float);
    ((load.mean(Kind::Float) - &load).sign() * gamma).to_kind(kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tch::Device;

    fn logits(t: i64, e: i64) -> Tensor {
        Tensor::randn([t, e], (Kind::Float, Device::Cpu)) * 2.0
    }

    fn host(t: &Tensor) -> Vec<f64> {
        Vec::try_from(t.to_kind(Kind::Double).reshape([-1])).unwrap()
    }

    #[test]
    fn top_k_picks_the_largest_and_renormalises() {
        tch::manual_seed(0);
        let l = logits(5, 6);
        let r = RouterKind::TopK { k: 2, norm_topk_prob: true, gate: Gate::Softmax }.route(&l, None);
        let probs = host(&l.to_kind(Kind::Double).softmax(-1, Kind::Double));
        let (experts, weights): (Vec<i64>, Vec<f64>) = (Vec::try_from(&r.experts).unwrap(), host(&r.weights));
        for tok in 0..5usize {
            let row = &probs[tok * 6..tok * 6 + 6];
            let mut order: Vec<usize> = (0..6).collect();
            order.sort_by(|a, b| row[*b].total_cmp(&row[*a]));
            assert_eq!(&experts[2 * tok..2 * tok + 2], &[order[0] as i64, order[1] as i64]);
            let total = row[order[0]] + row[order[1]];
            assert!((weights[2 * tok] - row[order[0]] / total).abs() < 1e-6);
        }
        let raw = RouterKind::TopK { k: 2, norm_topk_prob: false, gate: Gate::Sigmoid }.route(&l, None);
        let sig = host(&l.sigmoid());
        let first: i64 = raw.experts.int64_value(&[0]);
        assert!((host(&raw.weights)[0] - sig[first as usize]).abs() < 1e-6, "sigmoid scores, not renormalised");
    }

    #[test]
    fn switch_drops_over_capacity_earlier_positions_first() {
        // Four tokens, all preferring expert 0 of 2; capacity ceil(1.0 * 4 / 2) = 2.
        let l = Tensor::from_slice(&[3.0f32, 0.0, 2.0, 0.0, 4.0, 0.0, 1.0, 0.0]).view([4, 2]);
        let r = RouterKind::Switch { capacity_factor: 1.0 }.route(&l, None);
        assert_eq!(Vec::<i64>::try_from(&r.tokens).unwrap(), vec![0, 1]);
        assert_eq!(Vec::<i64>::try_from(&r.experts).unwrap(), vec![0, 0]);
        assert!((r.dropped.double_value(&[]) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn aux_free_bias_changes_the_choice_not_the_weights() {
        let l = Tensor::from_slice(&[2.0f32, 1.0, 0.0, -1.0]).view([1, 4]);
        let router = RouterKind::AuxFree { k: 1, gate: Gate::Sigmoid, gamma: 0.01 };
        assert_eq!(router.route(&l, None).experts.int64_value(&[0]), 0);
        let bias = Tensor::from_slice(&[0.0f32, 0.0, 0.0, 5.0]);
        let r = router.route(&l, Some(&bias));
        assert_eq!(r.experts.int64_value(&[0]), 3, "the bias moves the choice");
        assert!((r.weights.double_value(&[0]) - 1.0).abs() < 1e-6, "k = 1: renormalised unbiased score");
        // The update raises under-loaded experts and lowers over-loaded ones.
        let mut b = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        update_balance_bias(&mut b, &Tensor::from_slice(&[10i64, 0, 2, 5]), 0.5);
        assert_eq!(host(&b), vec![-0.5, 0.5, 0.5, -0.5]);
    }

    #[test]
    fn expert_choice_is_refused_where_causal_and_fills_capacity() {
        let router = RouterKind::ExpertChoice { capacity_factor: 1.0 };
        assert!(router.not_causal_because().unwrap().contains("later tokens"));
        tch::manual_seed(1);
        let r = router.route(&logits(8, 4), None);
        assert_eq!(r.tokens.size(), vec![8], "4 experts take 2 tokens each");
        assert!(RouterKind::TopK { k: 5, norm_topk_prob: true, gate: Gate::Softmax }.validate(4).unwrap_err().contains("`k`"));
        let parsed: RouterKind = serde_json::from_str(r#"{"kind": "top-k", "k": 2}"#).unwrap();
        assert_eq!(parsed, RouterKind::TopK { k: 2, norm_topk_prob: true, gate: Gate::Softmax });
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// With position-major tokens, changing tokens after position t never changes the
        /// routing of tokens at positions <= t (Switch's capacity included).
        #[test]
        fn causal_routers_are_causal(seed in 0i64..1000, seq in 2i64..12, t in 0i64..11, batch in 1i64..3) {
            let t = t % (seq - 1);
            tch::manual_seed(seed);
            let e = 3;
            let l = logits(seq * batch, e); // position-major: row p * batch + b
            let keep = (t + 1) * batch;
            let l2 = Tensor::cat(&[l.narrow(0, 0, keep), logits(seq * batch - keep, e)], 0);
            for router in [
                RouterKind::TopK { k: 2, norm_topk_prob: true, gate: Gate::Softmax },
                RouterKind::Switch { capacity_factor: 1.0 },
                RouterKind::AuxFree { k: 2, gate: Gate::Sigmoid, gamma: 0.0 },
            ] {
                let (a, b) = (router.route(&l, None), router.route(&l2, None));
                let early = |r: &Routing| {
                    let m = r.tokens.lt(keep);
                    (Vec::<i64>::try_from(r.tokens.masked_select(&m)).unwrap(),
                     Vec::<i64>::try_from(r.experts.masked_select(&m)).unwrap(),
                     Vec::<f32>::try_from(r.weights.masked_select(&m)).unwrap())
                };
                prop_assert_eq!(early(&a), early(&b), "{}", router.name());
            }
        }
    }
}
