//! One MoE layer against a dense SwiGLU MLP with the same active parameters (width
//! `k · expert width`) on the same tokens, forward+backward on the CPU; Doge's CDMoE against its
//! shared MLP alone.

use crate::{fastest_ms, BenchError, Result};
use serde::Serialize;
use stlm_core::Mode;
use stlm_moe::{product_keys, CdMoe, CdmoeRouting, Gate, MoeConfig, MoeLayer, RouterKind};
use tch::{nn, Device, Kind, Tensor};

/// The routers `stlm bench moe` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Router {
    /// Softmax top-k (Mixtral's), probabilities renormalised over the k.
    TopK,
    /// Switch Transformer's top-1 with capacity factor 1.25.
    Switch,
    /// Auxiliary-loss-free balancing (DeepSeek-V3's sigmoid gate and bias).
    AuxFree,
    /// Doge's cross-domain MoE: a shared MLP of width --expert-width plus --experts single-neuron
    /// experts, --top-k per token; compared with the shared MLP alone.
    Cdmoe,
}

impl Router {
    /// The command-line name.
    pub fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self).map(|v| v.get_name().to_string()).unwrap_or_default()
    }
}

/// What to time; as `stlm bench moe` takes it.
#[derive(Debug, Clone, clap::Args)]
pub struct MoeSpec {
    /// The router.
    #[arg(long, value_enum, default_value_t = Router::TopK)]
    pub router: Router,
    /// Experts.
    #[arg(long, default_value_t = 8)]
    pub experts: i64,
    /// Experts per token (top-k, aux-free, cdmoe).
    #[arg(long, default_value_t = 2)]
    pub top_k: i64,
    /// Model width.
    #[arg(long, default_value_t = 256)]
    pub hidden: i64,
    /// Width of one expert (cdmoe: of the shared MLP).
    #[arg(long, default_value_t = 344)]
    pub expert_width: i64,
    /// Tokens per call (batch · sequence).
    #[arg(long, default_value_t = 4096)]
    pub tokens: i64,
    /// Timed runs of each (after one warm-up); the fastest is reported.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// One product pair per expert instead of the grouped products (to compare the two).
    #[arg(long)]
    pub per_expert: bool,
}

/// The times of the MoE layer and of its dense reference.
#[derive(Debug, Clone, Serialize)]
pub struct MoeBench {
    /// The router.
    pub router: String,
    /// Experts.
    pub experts: i64,
    /// Experts a token uses.
    pub top_k: i64,
    /// Model width.
    pub hidden: i64,
    /// Width of one expert.
    pub expert_width: i64,
    /// Tokens per call.
    pub tokens: i64,
    /// The MoE layer, ms.
    pub ms: f64,
    /// The dense reference, ms.
    pub dense_ms: f64,
    /// `ms / dense_ms`.
    pub ratio: f64,
    /// Fraction of token slots dropped by capacity (Switch).
    pub dropped: f64,
    /// libtorch's threads.
    pub threads: i32,
    /// `grouped` or `per-expert` products (cdmoe: `retrieval`).
    pub dispatch: &'static str,
    /// Width of the dense reference.
    pub dense_width: i64,
}

impl MoeBench {
    fn new(a: &MoeSpec, top_k: i64, (ms, dense_ms): (f64, f64), dropped: f64, dispatch: &'static str, dense_width: i64) -> Self {
        MoeBench {
            router: a.router.name(),
            experts: a.experts,
            top_k,
            hidden: a.hidden,
            expert_width: a.expert_width,
            tokens: a.tokens,
            ms,
            dense_ms,
            ratio: ms / dense_ms,
            dropped,
            threads: tch::get_num_threads(),
            dispatch,
            dense_width,
        }
    }
}

/// Times the MoE layer of `a` and its dense reference.
pub fn bench_moe(a: &MoeSpec) -> Result<MoeBench> {
    let (e, k, h, w, t) = (a.experts, a.top_k, a.hidden, a.expert_width, a.tokens);
    if e < 1 || h < 1 || w < 1 || t < 1 || a.repeats < 1 {
        return Err(BenchError::Input("experts, hidden, expert_width, tokens and repeats must be at least 1".into()));
    }
    let router = match a.router {
        Router::Cdmoe => return bench_cdmoe(a),
        Router::TopK => RouterKind::TopK { k, norm_topk_prob: true, gate: Gate::Softmax },
        Router::Switch => RouterKind::Switch { capacity_factor: 1.25 },
        Router::AuxFree => RouterKind::AuxFree { k, gate: Gate::Sigmoid, gamma: 1e-3 },
    };
    let active = if matches!(router, RouterKind::Switch { .. }) { 1 } else { k };
    let config = MoeConfig::new(e, router);
    config.validate().map_err(|m| BenchError::Input(format!("router {}: {m}", a.router.name())))?;
    stlm_core::memory::keep_freed_memory();
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let mut layer = MoeLayer::new(vs.root() / "moe", h, w, &config, 0.02, 0.02);
    layer.experts.grouped = !a.per_expert;
    // The dense reference: one SwiGLU MLP as wide as the experts a token uses.
    let dense_w = active * w;
    let root = vs.root() / "dense";
    let init = nn::Init::Randn { mean: 0.0, stdev: 0.02 };
    let gate_up = root.var("gate_up", &[2 * dense_w, h], init);
    let down = root.var("down", &[h, dense_w], init);
    let x = Tensor::randn([1, t, h], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let dense = || {
        let both = x.matmul(&gate_up.tr());
        (both.narrow(-1, 0, dense_w).silu() * both.narrow(-1, dense_w, dense_w)).matmul(&down.tr())
    };
    // The MoE's loss includes its balancing loss, as in training; `dropped` is read once after.
    let dense_ms = fastest_ms(a.repeats, &|| dense().square().mean(Kind::Float), None);
    let ms = fastest_ms(
        a.repeats,
        &|| {
            let (out, stats) = layer.forward(&x, Mode::Train);
            out.square().mean(Kind::Float) + stats.aux_loss
        },
        None,
    );
    let dropped = layer.forward(&x, Mode::Train).1.dropped.double_value(&[]);
    let dispatch = match layer.experts.grouped_alignment(&x) {
        Some(_) => "grouped",
        None => "per-expert",
    };
    Ok(MoeBench::new(a, active, (ms, dense_ms), dropped, dispatch, dense_w))
}

/// Doge's CDMoE (causal routing) against its shared MLP alone.
fn bench_cdmoe(a: &MoeSpec) -> Result<MoeBench> {
    let (e, k, h, w, t) = (a.experts, a.top_k, a.hidden, a.expert_width, a.tokens);
    let (keys, square) = product_keys(e);
    if !square {
        return Err(BenchError::Input(format!("experts {e}: product keys reach only {keys}^2 = {} experts; use a square count", keys * keys)));
    }
    if !(1..=keys * keys).contains(&k) {
        return Err(BenchError::Input(format!("top_k {k}: must be between 1 and the number of experts ({e})")));
    }
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let layer = CdMoe::new(vs.root(), h, w, e, k, false, CdmoeRouting::Causal, 0.02, 0.02);
    let x = Tensor::randn([1, t, h], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let dense_ms = fastest_ms(a.repeats, &|| layer.shared.forward(&x).square().mean(Kind::Float), None);
    let ms = fastest_ms(a.repeats, &|| layer.forward(&x).square().mean(Kind::Float), None);
    Ok(MoeBench::new(a, k, (ms, dense_ms), 0.0, "retrieval", w))
}
