//! Dense causal attention: libtorch's `scaled_dot_product_attention` against the op-by-op naive
//! kernel, forward and forward+backward, at the head layouts stlm's models use; the sparse
//! patterns against dense SDPA at 1024 and 4096 positions; every other attention kind at 1024.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use stlm_attention::{
    dense_attention, fixed_sparse_attention, naive_attention, sliding_window_attention, strided_sparse_attention,
    AttentionKind, AttentionMask, GivenTensors, LinformerSharing,
};
use tch::{Device, Kind, Tensor};

fn inputs(seq: i64, heads: i64, kv_heads: i64, grad: bool) -> (Tensor, Tensor, Tensor) {
    let mk = |h| Tensor::randn([1, h, seq, 64], (Kind::Float, Device::Cpu)).set_requires_grad(grad);
    (mk(heads), mk(kv_heads), mk(kv_heads))
}

fn attention(c: &mut Criterion) {
    tch::manual_seed(0);
    let mut group = c.benchmark_group("causal_attention_forward");
    for seq in [128i64, 512] {
        for (name, kv) in [("mha", 8), ("gqa4", 2)] {
            let (q, k, v) = inputs(seq, 8, kv, false);
            group.bench_with_input(BenchmarkId::new(format!("sdpa-{name}"), seq), &seq, |b, _| {
                b.iter(|| tch::no_grad(|| dense_attention(&q, &k, &v, &AttentionMask::Causal, None)))
            });
            group.bench_with_input(BenchmarkId::new(format!("naive-{name}"), seq), &seq, |b, _| {
                b.iter(|| tch::no_grad(|| naive_attention(&q, &k, &v, &AttentionMask::Causal, None)))
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group("causal_attention_forward_backward");
    for seq in [128i64, 512] {
        let (q, k, v) = inputs(seq, 8, 2, true);
        group.bench_with_input(BenchmarkId::new("sdpa-gqa4", seq), &seq, |b, _| {
            b.iter(|| dense_attention(&q, &k, &v, &AttentionMask::Causal, None).sum(Kind::Float).backward())
        });
        group.bench_with_input(BenchmarkId::new("naive-gqa4", seq), &seq, |b, _| {
            b.iter(|| naive_attention(&q, &k, &v, &AttentionMask::Causal, None).sum(Kind::Float).backward())
        });
    }
    group.finish();

    // Sliding window (w = 256) and fixed sparse (l = 128, c = 8) against dense causal SDPA, forward+backward, batch 1, 4 heads,
    // head dim 64: the shapes of docs/results/attention.md.
    let mut group = c.benchmark_group("sparse_forward_backward");
    group.sample_size(10);
    for seq in [1024i64, 4096] {
        let mk = || Tensor::randn([1, 4, seq, 64], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let (q, k, v) = (mk(), mk(), mk());
        group.bench_with_input(BenchmarkId::new("sdpa-dense", seq), &seq, |b, _| {
            b.iter(|| dense_attention(&q, &k, &v, &AttentionMask::Causal, None).sum(Kind::Float).backward())
        });
        group.bench_with_input(BenchmarkId::new("sliding-256", seq), &seq, |b, _| {
            b.iter(|| sliding_window_attention(&q, &k, &v, 256, 0, None).sum(Kind::Float).backward())
        });
        group.bench_with_input(BenchmarkId::new("fixed-sparse-128-8", seq), &seq, |b, _| {
            b.iter(|| fixed_sparse_attention(&q, &k, &v, 128, 8, None).sum(Kind::Float).backward())
        });
        group.bench_with_input(BenchmarkId::new("strided-sparse-128", seq), &seq, |b, _| {
            b.iter(|| strided_sparse_attention(&q, &k, &v, 128, None).sum(Kind::Float).backward())
        });
    }
    group.finish();

    // The other kinds through the one interface (`AttentionKind::forward`) at 1024 positions:
    // the score variants, Doge's Dynamic Mask Attention, and Linformer (bidirectional, so its
    // reference is bidirectional SDPA).
    let mut group = c.benchmark_group("kinds_forward_backward_1024");
    group.sample_size(10);
    let seq = 1024i64;
    let mk = || Tensor::randn([1, 4, seq, 64], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let (q, k, v) = (mk(), mk(), mk());
    let heads = Tensor::full([4], 0.15, (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let dt = Tensor::randn([1, 4, seq], (Kind::Float, Device::Cpu)).exp().set_requires_grad(true);
    let proj = || (Tensor::randn([1, 256, seq], (Kind::Float, Device::Cpu)) / 16.0).set_requires_grad(true);
    let (e, f) = (proj(), proj());
    let given = || GivenTensors { heads: &heads, bias: &dt, projections: (&e, &f) };
    let cases = [
        (AttentionKind::Ssmax { scale: () }, AttentionMask::Causal),
        (AttentionKind::Temperature { inv_temperature: () }, AttentionMask::Causal),
        (AttentionKind::Power { p: 2.0 }, AttentionMask::Causal),
        (AttentionKind::DogeDma { keep_window_size: 256, bias: () }, AttentionMask::Causal),
        (AttentionKind::Linformer { k: 256, sharing: LinformerSharing::Headwise, projections: () }, AttentionMask::Full),
    ]
    .map(|(kind, mask)| (kind.build(seq, &mut given()), mask));
    group.bench_function("sdpa-bidirectional", |b| {
        b.iter(|| dense_attention(&q, &k, &v, &AttentionMask::Full, None).sum(Kind::Float).backward())
    });
    for (kind, mask) in &cases {
        group.bench_function(kind.name(), |b| {
            b.iter(|| kind.forward(&q, &k, &v, mask).expect("the kind's mask").sum(Kind::Float).backward())
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_secs(1)).measurement_time(std::time::Duration::from_secs(3));
    targets = attention
}
criterion_main!(benches);
