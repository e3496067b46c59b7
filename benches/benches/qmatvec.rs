//! Quantized matrix-vector products at batch-1 decoding shapes (stories15M's: hidden 288, ffn
//! 768, a 32000-token head), one thread: the float32 kernel (`Rows::matvec_add`, the fused
//! decoder's) as the reference, against Q8_0 and Q4_0 blocks with every integer kernel this CPU
//! has (`stlm_core::qmatvec`), the activation's quantization included; and each split over two
//! workers of a `SpinPool` (the fused decoder's `--threads 2`) with the best kernel.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use stlm_core::kernels::Rows;
use stlm_core::qmatvec::{QKernel, QuantizedVector};
use stlm_core::quant::{QuantFormat, QuantMatrix};
use stlm_core::spin::SpinPool;

fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

fn qmatvec(c: &mut Criterion) {
    let mut group = c.benchmark_group("qmatvec_decode");
    let pool = SpinPool::new(2);
    for (cols, rows) in [(288usize, 864usize), (288, 1536), (768, 288), (288, 32000)] {
        let w = values(rows * cols, 1);
        let x = values(cols, 2);
        let id = format!("{cols}->{rows}");
        group.throughput(Throughput::Elements((rows * cols) as u64));
        let dense = Rows::new(&w, rows, cols, cols).expect("sizes match");
        let mut y = vec![0f32; rows];
        group.bench_with_input(BenchmarkId::new("f32", &id), &id, |b, _| b.iter(|| dense.matvec_add(&x, &mut y)));
        group.bench_with_input(BenchmarkId::new("f32_split_2_workers", &id), &id, |b, _| b.iter(|| dense.matvec_add_split(&x, &mut y, &pool)));
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            let m = QuantMatrix::quantize(format, &w, cols).expect("whole blocks");
            let mut q = QuantizedVector::new();
            let name = format!("{}_split_2_workers", format.name());
            group.bench_with_input(BenchmarkId::new(name, &id), &id, |b, _| {
                b.iter(|| {
                    q.quantize(&x);
                    m.rows().matvec_add_split(&q, &mut y, &pool)
                })
            });
            for &kernel in QKernel::available() {
                let name = format!("{}_{}", format.name(), kernel.name());
                group.bench_with_input(BenchmarkId::new(name, &id), &id, |b, _| {
                    b.iter(|| {
                        q.quantize(&x);
                        m.rows().matvec_add_with(kernel, &q, &mut y)
                    })
                });
            }
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(1));
    targets = qmatvec
}
criterion_main!(benches);
