//! `stlm bench moe`: forward+backward time of one MoE layer against a dense SwiGLU MLP with the
//! same active parameters (width `k · expert width`), on the same tokens.

use crate::common::print_json;
use anyhow::{anyhow, bail, Result};
use clap::Args;
use serde::Serialize;
use std::time::Instant;
use stlm_core::Mode;
use stlm_moe::{product_keys, CdMoe, CdmoeRouting, Gate, MoeConfig, MoeLayer, RouterKind};
use tch::{nn, Device, Kind, Tensor};

/// Options of `stlm bench moe`.
#[derive(Args, Debug)]
pub struct MoeBenchArgs {
    /// Router: top-k, switch, aux-free, or cdmoe (Doge's cross-domain MoE: a shared MLP of width
    /// --expert-width plus --experts single-neuron experts, --top-k per token; compared with the
    /// shared MLP alone).
    #[arg(long, default_value = "top-k")]
    router: String,
    /// Experts.
    #[arg(long, default_value_t = 8)]
    experts: i64,
    /// Experts per token (top-k, aux-free).
    #[arg(long, default_value_t = 2)]
    top_k: i64,
    /// Model width.
    #[arg(long, default_value_t = 256)]
    hidden: i64,
    /// Width of one expert.
    #[arg(long, default_value_t = 344)]
    expert_width: i64,
    /// Tokens per call (batch · sequence).
    #[arg(long, default_value_t = 4096)]
    tokens: i64,
    /// Timed runs of each; the fastest is reported.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// One product pair per expert instead of the grouped products (to compare the two).
    #[arg(long)]
    per_expert: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct MoeBench {
    router: String,
    experts: i64,
    top_k: i64,
    hidden: i64,
    expert_width: i64,
    tokens: i64,
    ms: f64,
    dense_ms: f64,
    ratio: f64,
    dropped: f64,
    threads: i32,
    /// `grouped` or `per-expert` products (cdmoe: `retrieval`).
    dispatch: &'static str,
}

impl MoeBench {
    fn new(a: &MoeBenchArgs, top_k: i64, ms: f64, dense_ms: f64, dropped: f64, dispatch: &'static str) -> Self {
        MoeBench {
            router: a.router.clone(),
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
        }
    }
}

/// Runs the benchmark on the CPU.
pub fn bench_moe(a: &MoeBenchArgs) -> Result<()> {
    let (e, k, h, w, t) = (a.experts, a.top_k, a.hidden, a.expert_width, a.tokens);
    if e < 1 || h < 1 || w < 1 || t < 1 || a.repeats < 1 {
        bail!("--experts, --hidden, --expert-width, --tokens and --repeats must be at least 1");
    }
    if a.router == "cdmoe" {
        return bench_cdmoe(a);
    }
    let router = match a.router.as_str() {
        "top-k" => RouterKind::TopK { k, norm_topk_prob: true, gate: Gate::Softmax },
        "switch" => RouterKind::Switch { capacity_factor: 1.25 },
        "aux-free" => RouterKind::AuxFree { k, gate: Gate::Sigmoid, gamma: 1e-3 },
        other => bail!("--router {other}: unknown (known: top-k, switch, aux-free, cdmoe)"),
    };
    let active = if matches!(router, RouterKind::Switch { .. }) { 1 } else { k };
    let config = MoeConfig::new(e, router);
    config.validate().map_err(|m| anyhow!("--router {}: {m}", a.router))?;
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
    let dense_ms = time_ms(a.repeats, &|| dense().square().mean(Kind::Float));
    let ms = time_ms(a.repeats, &|| {
        let (out, stats) = layer.forward(&x, Mode::Train);
        out.square().mean(Kind::Float) + stats.aux_loss
    });
    let dropped = layer.forward(&x, Mode::Train).1.dropped.double_value(&[]);
    let dispatch = match layer.experts.grouped_alignment(&x) {
        Some(_) => "grouped",
        None => "per-expert",
    };
    let report = MoeBench::new(a, active, ms, dense_ms, dropped, dispatch);
    if a.json {
        print_json(&report)
    } else {
        println!(
            "{} MoE ({e} experts, {active} per token, {dispatch} products): {ms:.2} ms forward+backward; dense SwiGLU of width {dense_w}: {dense_ms:.2} ms ({:.2}x)",
            a.router, report.ratio
        );
        Ok(())
    }
}

/// Times `f` (a forward returning a scalar loss) and its backward `repeats` times after a
/// warm-up; the fastest, in ms.
fn time_ms(repeats: usize, f: &dyn Fn() -> Tensor) -> f64 {
    let mut best = f64::INFINITY;
    for i in 0..=repeats {
        let start = Instant::now();
        f().backward();
        if i > 0 {
            best = best.min(start.elapsed().as_secs_f64());
        }
    }
    best * 1e3
}

/// Doge's CDMoE (causal routing) against its shared MLP alone.
fn bench_cdmoe(a: &MoeBenchArgs) -> Result<()> {
    let (e, k, h, w, t) = (a.experts, a.top_k, a.hidden, a.expert_width, a.tokens);
    let (keys, square) = product_keys(e);
    if !square {
        bail!("--experts {e}: product keys reach only {keys}^2 = {} experts; use a square count", keys * keys);
    }
    if !(1..=keys * keys).contains(&k) {
        bail!("--top-k {k}: must be between 1 and the number of experts ({e})");
    }
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let layer = CdMoe::new(vs.root(), h, w, e, k, false, CdmoeRouting::Causal, 0.02, 0.02);
    let x = Tensor::randn([1, t, h], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let shared = || layer.shared.forward(&x);
    let dense_ms = time_ms(a.repeats, &|| shared().square().mean(Kind::Float));
    let ms = time_ms(a.repeats, &|| layer.forward(&x).square().mean(Kind::Float));
    let report = MoeBench::new(a, k, ms, dense_ms, 0.0, "retrieval");
    if a.json {
        print_json(&report)
    } else {
        println!("cdmoe ({e} experts, {k} per token): {ms:.2} ms; its shared MLP alone {dense_ms:.2} ms ({:.2}x)", report.ratio);
        Ok(())
    }
}
