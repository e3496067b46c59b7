//! An MoE layer (8 experts, top-2, hidden 256, experts 344 wide) forward+backward against a dense
//! SwiGLU MLP with the same active parameters (width 688), 4096 tokens, and the dispatch alone;
//! fine-grained experts (64 of width 86, top-4) with grouped products and with one product pair
//! per expert.

use criterion::{criterion_group, criterion_main, Criterion};
use stlm_core::Mode;
use stlm_moe::{moe_forward, Gate, MoeConfig, MoeLayer, RouterKind};
use tch::{nn, Device, Kind, Tensor};

fn moe(c: &mut Criterion) {
    tch::manual_seed(0);
    let (h, w, tokens) = (256i64, 344i64, 4096i64);
    let vs = nn::VarStore::new(Device::Cpu);
    let router = RouterKind::TopK { k: 2, norm_topk_prob: true, gate: Gate::Softmax };
    let config = MoeConfig::new(8, router.clone());
    let layer = MoeLayer::new(vs.root() / "moe", h, w, &config, 0.02, 0.02);
    let init = nn::Init::Randn { mean: 0.0, stdev: 0.02 };
    let gate_up = vs.root().var("gate_up", &[4 * w, h], init);
    let down = vs.root().var("down", &[h, 2 * w], init);
    let x = Tensor::randn([1, tokens, h], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let mut group = c.benchmark_group("moe_forward_backward");
    group.sample_size(10);
    group.bench_function("dense-swiglu-688", |b| {
        b.iter(|| {
            let both = x.matmul(&gate_up.tr());
            let y = (both.narrow(-1, 0, 2 * w).silu() * both.narrow(-1, 2 * w, 2 * w)).matmul(&down.tr());
            y.square().mean(Kind::Float).backward()
        })
    });
    group.bench_function("moe-8x344-top2", |b| {
        b.iter(|| {
            let (y, stats) = layer.forward(&x, Mode::Train);
            (y.square().mean(Kind::Float) + stats.aux_loss).backward()
        })
    });
    group.finish();

    let mut group = c.benchmark_group("moe_fine_grained_64x86_top4");
    group.sample_size(10);
    let fine = MoeConfig::new(64, RouterKind::TopK { k: 4, norm_topk_prob: true, gate: Gate::Softmax });
    let mut fine_layer = MoeLayer::new(vs.root() / "fine", h, 86, &fine, 0.02, 0.02);
    for grouped in [true, false] {
        fine_layer.experts.grouped = grouped;
        let name = if grouped { "grouped" } else { "per-expert" };
        group.bench_function(name, |b| {
            b.iter(|| {
                let (y, _) = fine_layer.forward(&x, Mode::Train);
                y.square().mean(Kind::Float).backward()
            })
        });
    }
    group.finish();

    // Routing and dispatch without gradients: where the time goes besides the expert products.
    let _g = tch::no_grad_guard();
    let flat = x.view([tokens, h]);
    let logits = flat.matmul(&layer.gate.tr());
    let mut group = c.benchmark_group("moe_inference_4096_tokens");
    group.sample_size(10);
    group.bench_function("route-top2", |b| b.iter(|| router.route(&logits, None)));
    let routing = router.route(&logits, None);
    group.bench_function("dispatch-and-experts", |b| b.iter(|| moe_forward(&flat, &routing, &layer.experts)));
    group.finish();
}

criterion_group!(benches, moe);
criterion_main!(benches);
