//! A mixture-of-experts feed-forward layer: router gate, routing, stacked SwiGLU experts, an
//! optional shared expert every token passes through; each forward returns its balancing losses
//! and load ([`MoeStats`]) for the trainer to add and log.

use crate::{balance_bias_step, expert_load, load_balancing_loss_with, moe_forward, z_loss, Experts, RouterKind, SwiGlu};
use serde::{Deserialize, Serialize};
use stlm_core::{BufferUpdate, Layer, Mode, Role, Walk};
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

fn default_aux() -> f64 {
    0.01
}

fn one() -> i64 {
    1
}

fn is_one(v: &i64) -> bool {
    *v == 1
}

/// A dense SwiGLU expert beside the routed ones that sees every token (DeepSeek's shared
/// experts, Qwen-MoE's `shared_expert`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedExpertConfig {
    /// Width of the shared expert (DeepSeek: `n_shared_experts · moe_intermediate_size`).
    pub intermediate_size: i64,
    /// Scale its output by `sigmoid(w · x)`, a learned per-token gate (Qwen-MoE's
    /// `shared_expert_gate`); DeepSeek adds it ungated.
    #[serde(default)]
    pub gate: bool,
}

/// The MoE part of a model config (`[model.moe]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeConfig {
    /// Experts per layer (each as wide as the model's `intermediate_size`).
    pub num_experts: i64,
    /// How tokens are routed.
    pub router: RouterKind,
    /// Weight of the load-balancing loss in the training loss (Switch: 0.01).
    #[serde(default = "default_aux")]
    pub aux_loss_coef: f64,
    /// Weight of the router z-loss (ST-MoE: 0.001; 0 turns it off).
    #[serde(default)]
    pub z_loss_coef: f64,
    /// Width of each routed expert; the model's `intermediate_size` when absent (transformers'
    /// `moe_intermediate_size`: fine-grained experts are narrower than a dense MLP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_intermediate_size: Option<i64>,
    /// A shared expert beside the routed ones; none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_expert: Option<SharedExpertConfig>,
    /// Layer `i` has experts when `(i + 1) % sparse_step == 0` (transformers'
    /// `decoder_sparse_step`; 1: every layer, 2: every second layer); the others a dense MLP.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub sparse_step: i64,
    /// Layers that keep a dense MLP whatever `sparse_step` says (transformers' `mlp_only_layers`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dense_layers: Vec<i64>,
}

impl MoeConfig {
    /// `num_experts` experts routed by `router`, every other setting at its default.
    pub fn new(num_experts: i64, router: RouterKind) -> Self {
        MoeConfig {
            num_experts,
            router,
            aux_loss_coef: default_aux(),
            z_loss_coef: 0.0,
            expert_intermediate_size: None,
            shared_expert: None,
            sparse_step: 1,
            dense_layers: Vec::new(),
        }
    }

    /// True when layer `layer` has experts (see [`MoeConfig::sparse_step`]).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        (layer as i64 + 1) % self.sparse_step == 0 && !self.dense_layers.contains(&(layer as i64))
    }

    /// Checks the settings; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.num_experts < 1 {
            return Err(format!("`num_experts` must be >= 1, got {}", self.num_experts));
        }
        if self.sparse_step < 1 {
            return Err(format!("`sparse_step` must be >= 1, got {}", self.sparse_step));
        }
        for (name, width) in [
            ("expert_intermediate_size", self.expert_intermediate_size),
            ("shared_expert.intermediate_size", self.shared_expert.as_ref().map(|s| s.intermediate_size)),
        ] {
            if let Some(w) = width.filter(|&w| w < 1) {
                return Err(format!("`{name}` must be >= 1, got {w}"));
            }
        }
        self.router.validate(self.num_experts).map_err(|e| format!("`router` ({}): {e}", self.router.name()))?;
        for (name, v) in [("aux_loss_coef", self.aux_loss_coef), ("z_loss_coef", self.z_loss_coef)] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(format!("`{name}` must be >= 0, got {v}"));
            }
        }
        Ok(())
    }
}

/// What one forward of a layer hands back for training and logging.
#[derive(Debug)]
pub struct MoeStats {
    /// `aux_loss_coef · balance + z_loss_coef · z`, with gradients.
    pub aux_loss: Tensor,
    /// Tokens per expert `[experts]`.
    pub load: Tensor,
    /// Fraction of wanted assignments dropped for capacity.
    pub dropped: Tensor,
}

/// The layer (names as transformers' Mixtral: `mlp.gate.weight`, `mlp.experts.gate_up_proj`,
/// `mlp.experts.down_proj`; the aux-free bias is `mlp.gate.e_score_correction_bias`, as DeepSeek-V3).
#[derive(Debug)]
pub struct MoeLayer {
    /// Router weight `[experts, hidden]`.
    pub gate: Tensor,
    /// The experts.
    pub experts: Experts,
    /// Balancing bias `[experts]` of the aux-free router (not trained by gradients).
    pub bias: Option<Tensor>,
    /// The shared expert (`mlp.shared_expert.*`), if any.
    pub shared_expert: Option<SwiGlu>,
    /// Its gate `[1, hidden]` (`mlp.shared_expert_gate.weight`), if gated.
    pub shared_expert_gate: Option<Tensor>,
    /// The settings.
    pub config: MoeConfig,
}

impl Layer for MoeLayer {
    fn visit(&self, walk: &mut Walk<'_>) {
        walk.param("gate.weight", &self.gate, Role::Matrix);
        walk.param_opt("gate.e_score_correction_bias", self.bias.as_ref(), Role::Buffer);
        let role = Role::RoutedExperts { experts: self.config.num_experts, per_token: self.config.router.experts_per_token() };
        walk.param("experts.gate_up_proj", &self.experts.gate_up_proj, role);
        walk.param("experts.down_proj", &self.experts.down_proj, role);
        walk.layer_opt("shared_expert", self.shared_expert.as_ref());
        walk.param_opt("shared_expert_gate.weight", self.shared_expert_gate.as_ref(), Role::Matrix);
    }
}

impl MoeLayer {
    /// A layer for `hidden`-wide tokens; experts are `config.expert_intermediate_size` wide, or
    /// `intermediate` (the model's MLP width) when that is unset.
    pub fn new(path: nn::Path, hidden: i64, intermediate: i64, config: &MoeConfig, std: f64, resid_std: f64) -> Self {
        let e = config.num_experts;
        let gate_path = &path / "gate";
        let gate = gate_path.var("weight", &[e, hidden], Init::Randn { mean: 0.0, stdev: std });
        let bias = matches!(config.router, RouterKind::AuxFree { .. })
            .then(|| gate_path.zeros_no_train("e_score_correction_bias", &[e]));
        let width = config.expert_intermediate_size.unwrap_or(intermediate);
        let shared = config.shared_expert.as_ref();
        MoeLayer {
            gate,
            experts: Experts::new(&path / "experts", e, hidden, width, std, resid_std),
            bias,
            shared_expert: shared.map(|s| SwiGlu::new(&(&path / "shared_expert"), hidden, s.intermediate_size, std, resid_std)),
            shared_expert_gate: shared
                .filter(|s| s.gate)
                .map(|_| (&path / "shared_expert_gate").var("weight", &[1, hidden], Init::Randn { mean: 0.0, stdev: std })),
            config: config.clone(),
        }
    }

    /// `[b, s, hidden] -> [b, s, hidden]` and the losses and load of this forward; tokens are
    /// routed position-major (see the router docs).
    pub fn forward(&self, x: &Tensor, mode: Mode) -> (Tensor, MoeStats) {
        let (b, s, h) = (x.size()[0], x.size()[1], x.size()[2]);
        let tokens = x.transpose(0, 1).reshape([s * b, h]); // position-major
        let logits = tokens.matmul(&self.gate.tr()); // [tokens, experts]
        // Capacity limits are a training device: in evaluation and generation Switch routes every
        // token, so cached decoding and full passes agree.
        let router = match self.config.router {
            RouterKind::Switch { .. } if !mode.is_train() => RouterKind::Switch { capacity_factor: f64::INFINITY },
            ref r => r.clone(),
        };
        let routing = router.route(&logits, self.bias.as_ref());
        let mut y = moe_forward(&tokens, &routing, &self.experts);
        if let Some(shared) = &self.shared_expert {
            let out = shared.forward(&tokens);
            y += match &self.shared_expert_gate {
                Some(g) => tokens.matmul(&g.tr()).sigmoid() * out,
                None => out,
            };
        }
        let load = expert_load(&routing, self.config.num_experts); // counted once, for loss and stats
        let balance = load_balancing_loss_with(&routing, &load) * self.config.aux_loss_coef;
        let aux = match self.config.z_loss_coef {
            z if z > 0.0 => balance + z_loss(&logits) * z,
            _ => balance,
        };
        let stats = MoeStats { aux_loss: aux, load, dropped: routing.dropped };
        (y.view([s, b, h]).transpose(0, 1).to_kind(x.kind()), stats)
    }

    /// The move of the aux-free bias towards balance by the load of `stats`, to apply after the
    /// optimizer step (None for other routers).
    pub fn balance_update(&self, stats: &MoeStats) -> Option<BufferUpdate> {
        match (&self.bias, &self.config.router) {
            (Some(bias), RouterKind::AuxFree { gamma, .. }) => {
                let (gamma, kind) = (*gamma, bias.kind());
                let rule = move |load: &Tensor| balance_bias_step(load, gamma, kind);
                Some(BufferUpdate::new(bias.shallow_clone(), stats.load.shallow_clone(), rule))
            }
            _ => None,
        }
    }
}

/// Entropy (nats) of a load histogram: `ln(experts)` when perfectly balanced.
pub fn load_entropy(load: &Tensor) -> f64 {
    let p = load.to_kind(Kind::Double);
    let p = &p / p.sum(Kind::Double).clamp_min(1.0);
    -(&p * p.clamp_min(1e-300).log()).sum(Kind::Double).double_value(&[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Gate;
    use tch::Device;

    #[test]
    fn forward_keeps_stats_and_aux_free_rebalances() {
        tch::manual_seed(8);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = MoeConfig {
            aux_loss_coef: 0.0,
            z_loss_coef: 0.01,
            ..MoeConfig::new(4, RouterKind::AuxFree { k: 1, gate: Gate::Sigmoid, gamma: 0.1 })
        };
        let layer = MoeLayer::new(vs.root(), 8, 6, &cfg, 0.5, 0.5);
        let x = Tensor::randn([2, 5, 8], (Kind::Float, Device::Cpu));
        let (y, stats) = layer.forward(&x, Mode::Train);
        assert_eq!(y.size(), vec![2, 5, 8]);
        assert_eq!(stats.load.sum(Kind::Int64).int64_value(&[]), 10);
        assert!(stats.aux_loss.double_value(&[]) > 0.0, "z-loss on");
        layer.balance_update(&stats).expect("an aux-free router moves its bias").apply();
        let bias = layer.bias.as_ref().unwrap();
        assert!(bias.abs().sum(Kind::Float).double_value(&[]) > 0.0, "bias moved");
        assert!(!bias.requires_grad());
        assert!((load_entropy(&Tensor::from_slice(&[3i64, 3, 3, 3])) - 4f64.ln()).abs() < 1e-12);
        let too_many = RouterKind::AuxFree { k: 3, gate: Gate::Sigmoid, gamma: 0.1 };
        let e = MoeConfig { num_experts: 2, router: too_many, ..cfg }.validate().unwrap_err();
        assert!(e.contains("router") && e.contains("`k`"), "{e}");
    }
}
