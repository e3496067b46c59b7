//! One optimizer step (forward, backward, clipping, AdamW) of `configs/default.toml` at its
//! batch and sequence length, on random tokens: what `stlm train` repeats.

use criterion::{criterion_group, criterion_main, Criterion};
use std::path::Path;
use stlm_model::{Batch, DecoderModel};
use stlm_train::optim::AdamW;
use stlm_train::run::RunConfig;
use stlm_train::trainer::{train_step, BatchSource};
use tch::{Device, Kind, Tensor};

/// One fixed random batch.
struct Fixed(Tensor);

impl BatchSource for Fixed {
    fn train_batch(&self, _step: u64, _micro: u64) -> stlm_train::Result<Batch> {
        let s = self.0.size()[1] - 1;
        Ok(Batch::new(self.0.narrow(1, 0, s), self.0.narrow(1, 1, s)))
    }
    fn val_batch(&self, _index: u64) -> stlm_train::Result<Batch> {
        self.train_batch(0, 0)
    }
}

fn step(c: &mut Criterion) {
    stlm_core::memory::keep_freed_memory(); // as `stlm train` does
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/default.toml");
    let run = RunConfig::load(&path, &[]).expect("configs/default.toml");
    let train = &run.train;
    tch::manual_seed(0);
    let model = DecoderModel::new(run.model.clone(), Device::Cpu).expect("model");
    let data =
        Fixed(Tensor::randint(run.model.vocab_size, [train.batch_size, train.seq_len + 1], (Kind::Int64, Device::Cpu)));
    let mut opt = AdamW::new(model.parameters(), train.adamw());
    let mut group = c.benchmark_group("train_step");
    group.bench_function("default_config", |b| {
        b.iter(|| train_step(&model, &mut opt, &data, 0, 1e-4, 1, train.grad_clip, None).expect("step"))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(std::time::Duration::from_secs(2)).measurement_time(std::time::Duration::from_secs(8));
    targets = step
}
criterion_main!(benches);
