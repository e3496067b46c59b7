//! Linear layers at batch-1 decoding shapes (one row): libtorch's `linear` (MKL) against stlm's
//! small-batch kernel (`stlm_core::kernels::small_batch_linear`, stlm-core's AVX2 matrix-vector
//! product), both on one thread, and the same product split over two workers of a `SpinPool`
//! (what the fused decoding step does with `--threads 2`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use stlm_core::kernels::{small_batch_linear, Rows};
use stlm_core::spin::SpinPool;
use tch::{Device, Kind, Tensor};

fn linear(c: &mut Criterion) {
    tch::manual_seed(0);
    tch::set_num_threads(1);
    let _g = tch::no_grad_guard();
    let pool = SpinPool::new(2);
    let mut group = c.benchmark_group("linear_decode");
    // (in, out): fused q/k/v, fused gate/up, down and o projections of a hidden-256 model, and a
    // 4096-token head.
    for (in_dim, out_dim) in [(256i64, 768i64), (256, 1376), (688, 256), (256, 256), (256, 4096)] {
        let w = Tensor::randn([out_dim, in_dim], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([1, in_dim], (Kind::Float, Device::Cpu));
        let id = format!("1x{in_dim}->{out_dim}");
        group.bench_with_input(BenchmarkId::new("libtorch", &id), &id, |b, _| b.iter(|| x.linear::<Tensor>(&w, None)));
        group.bench_with_input(BenchmarkId::new("small_batch", &id), &id, |b, _| {
            b.iter(|| small_batch_linear(&x, &w, None).expect("kernel applies"))
        });
        let rows = Rows::from_tensor(&w).expect("row-major");
        let xs: Vec<f32> = Vec::try_from(&x.view([-1])).expect("float32");
        let mut y = vec![0f32; out_dim as usize];
        group.bench_with_input(BenchmarkId::new("split_2_workers", &id), &id, |b, _| {
            b.iter(|| rows.matvec_add_split(&xs, &mut y, &pool))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(std::time::Duration::from_secs(1)).measurement_time(std::time::Duration::from_secs(2));
    targets = linear
}
criterion_main!(benches);
