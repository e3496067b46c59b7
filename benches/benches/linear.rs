//! Linear layers at decoding shapes (a few rows): libtorch's `linear` (MKL) against stlm's
//! small-batch kernel (`stlm_core::kernels::small_batch_linear`, the `gemm` crate), one thread.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use stlm_core::kernels::small_batch_linear;
use tch::{Device, Kind, Tensor};

fn linear(c: &mut Criterion) {
    tch::manual_seed(0);
    tch::set_num_threads(1);
    let _g = tch::no_grad_guard();
    let mut group = c.benchmark_group("linear_decode");
    // (rows, in, out): attention and MLP projections of a hidden-256 model, and a 4096-token head.
    for (rows, in_dim, out_dim) in [
        (1i64, 256i64, 768i64),
        (1, 256, 1376),
        (1, 688, 256),
        (1, 256, 4096),
        (2, 256, 1376),
        (4, 256, 1376),
        (8, 256, 1376),
    ] {
        let w = Tensor::randn([out_dim, in_dim], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([rows, in_dim], (Kind::Float, Device::Cpu));
        let id = format!("{rows}x{in_dim}->{out_dim}");
        group.bench_with_input(BenchmarkId::new("libtorch", &id), &id, |b, _| b.iter(|| x.linear::<Tensor>(&w, None)));
        group.bench_with_input(BenchmarkId::new("small_batch", &id), &id, |b, _| {
            b.iter(|| small_batch_linear(&x, &w, None).expect("kernel applies"))
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
