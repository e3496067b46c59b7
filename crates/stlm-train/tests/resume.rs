//! Exact resume: a run stopped after a checkpoint and resumed with `resume = true` logs the same
//! per-step losses (bit for bit, float32 CPU) as the same run uninterrupted; a corrupt newest
//! checkpoint is skipped for the previous one; checkpoints are pruned to the newest K; a run
//! stopped at any step (as by Ctrl-C) writes a checkpoint there and resumes exactly (proptest).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use stlm_model::{Batch, DecoderModel, ModelConfig};
use stlm_train::config::TrainConfig;
use stlm_train::optim::AdamWConfig;
use stlm_train::schedule::Schedule;
use stlm_train::trainer::{train, BatchSource, RunControl, StepLog};
use stlm_train::Result;
use tch::{Device, Kind, Tensor};

/// Batches drawn from a fixed random token stream by a generator seeded with (step, micro).
struct Synthetic {
    tokens: Tensor,
}

impl Synthetic {
    fn new() -> Self {
        let g = (0..4000).map(|i: i64| (i * 7 + i / 13) % 50).collect::<Vec<_>>();
        Synthetic { tokens: Tensor::from_slice(&g) }
    }
    fn window(&self, key: u64) -> Batch {
        let (b, s) = (4i64, 16i64);
        let starts: Vec<i64> = (0..b).map(|i| ((key * 7919 + i as u64 * 104729) % (4000 - 17)) as i64).collect();
        let rows: Vec<Tensor> = starts.iter().map(|&st| self.tokens.narrow(0, st, s + 1)).collect();
        let all = Tensor::stack(&rows, 0);
        Batch::new(all.narrow(1, 0, s), all.narrow(1, 1, s))
    }
}

/// Raises `stop` while step `at` is being drawn, as a Ctrl-C during that step would.
struct StopAt<'a> {
    inner: &'a Synthetic,
    at: u64,
    stop: Arc<AtomicBool>,
}

impl BatchSource for StopAt<'_> {
    fn train_batch(&self, step: u64, micro: u64) -> Result<Batch> {
        if step == self.at {
            self.stop.store(true, Ordering::SeqCst);
        }
        self.inner.train_batch(step, micro)
    }
    fn val_batch(&self, index: u64) -> Result<Batch> {
        self.inner.val_batch(index)
    }
}

impl BatchSource for Synthetic {
    fn train_batch(&self, step: u64, micro: u64) -> Result<Batch> {
        Ok(self.window(step * 2 + micro))
    }
    fn val_batch(&self, index: u64) -> Result<Batch> {
        Ok(self.window(1_000_000 + index))
    }
}

fn model() -> DecoderModel {
    let text = "vocab_size = 50\nhidden_size = 32\nintermediate_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\nnum_key_value_heads = 2\nmax_position_embeddings = 32\n";
    let cfg = ModelConfig::from_toml_str(text, std::path::Path::new("t.toml")).unwrap();
    let m = DecoderModel::new(cfg, Device::Cpu).unwrap();
    // A fixed initialisation, independent of the global generator other tests use.
    let _g = tch::no_grad_guard();
    let mut vars: Vec<_> = m.var_store().variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (i, (_, mut v)) in vars.into_iter().enumerate() {
        let n = v.numel() as i64;
        let vals = Tensor::arange(n, (Kind::Float, Device::Cpu)).view(v.size().as_slice());
        let init = ((vals * 0.37 + i as f64).sin()) * 0.05 + if v.dim() == 1 { 1.0 } else { 0.0 };
        v.copy_(&init);
    }
    m
}

fn settings(max_steps: u64) -> TrainConfig {
    let adamw = AdamWConfig::default();
    TrainConfig {
        lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 2,
        max_steps,
        schedule: Schedule::Cosine,
        beta1: adamw.beta1,
        beta2: adamw.beta2,
        eps: adamw.eps,
        weight_decay: adamw.weight_decay,
        grad_accum: 2,
        grad_clip: 1.0,
        log_every: 1,
        eval_every: 4,
        eval_batches: 2,
        position_loss_every: 0,
        save_every: 3,
        keep_last: 2,
        seed: 0,
        ..TrainConfig::default()
    }
}

/// No progress bar, no stop, nothing kept at zero.
fn quiet() -> RunControl {
    RunControl::default()
}

fn losses(logs: &[StepLog]) -> Vec<(u64, u64)> {
    logs.iter().map(|l| (l.step, l.loss.to_bits())).collect()
}

#[test]
fn resumed_run_logs_the_same_losses() {
    let data = Synthetic::new();
    let full_dir = tempfile::tempdir().unwrap();
    let full = train(&model(), &data, &settings(10), &quiet(), full_dir.path(), false).unwrap().logs;
    assert_eq!(full.len(), 10);
    assert!(full[9].loss < full[0].loss, "training lowers the loss: {} -> {}", full[0].loss, full[9].loss);

    // A run that "crashed" after step 8: its newest checkpoints (9, 10) never came to be, and
    // `latest` still names one of them. Resuming with the same settings continues from step 6.
    let dir = tempfile::tempdir().unwrap();
    let keep_all = TrainConfig { keep_last: 0, position_loss_every: 5, ..settings(10) };
    train(&model(), &data, &keep_all, &quiet(), dir.path(), false).unwrap();
    let ckpts = dir.path().join("checkpoints");
    for gone in ["step-0000009", "step-0000010"] {
        std::fs::remove_dir_all(ckpts.join(gone)).unwrap();
    }
    std::fs::write(ckpts.join("latest"), "step-0000010").unwrap();
    let resumed = train(&model(), &data, &keep_all, &quiet(), dir.path(), true).unwrap().logs;
    assert_eq!(resumed.first().map(|l| l.step), Some(7), "resumed from step 6");
    assert_eq!(losses(&resumed), losses(&full[6..]));

    // metrics.jsonl holds exactly one line per step, 1..=10.
    let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> =
        text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=10).collect::<Vec<_>>());
    let line: serde_json::Value = serde_json::from_str(text.lines().nth(3).unwrap()).unwrap();
    for key in ["step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed", "val_loss"] {
        assert!(line.get(key).is_some(), "metrics line lacks {key}: {line}");
    }
    // Model FLOP/s are the counted FLOPs per token times the tokens per second.
    let per_token = model().flops_per_token(16);
    let (flops, tokens) = (line["model_flops_per_s"].as_f64().unwrap(), line["tokens_per_s"].as_f64().unwrap());
    assert!(per_token > 0.0 && (flops / tokens - per_token).abs() < 1e-6 * per_token, "{flops} / {tokens} vs {per_token}");

    // position_loss.jsonl: steps 5 and 10 once each (the resumed run rewrote what followed
    // step 6); the mean over positions is the validation loss of the same step.
    let text = std::fs::read_to_string(dir.path().join("position_loss.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.iter().map(|l| l["step"].as_u64().unwrap()).collect::<Vec<_>>(), [5, 10]);
    let last = &lines[1];
    let loss: Vec<f64> = last["loss"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    let stderr: Vec<f64> = last["stderr"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!((loss.len(), stderr.len(), last["windows"].as_i64()), (16, 16, Some(8)));
    assert!(stderr.iter().all(|s| s.is_finite() && *s >= 0.0));
    let mean = loss.iter().sum::<f64>() / 16.0;
    let val = resumed.last().unwrap().val_loss.unwrap();
    assert!((mean - val).abs() < 1e-5, "mean position loss {mean} vs validation loss {val}");
}

#[test]
fn corrupt_newest_checkpoint_is_skipped_and_old_ones_pruned() {
    let data = Synthetic::new();
    let full_dir = tempfile::tempdir().unwrap();
    let full = train(&model(), &data, &settings(9), &quiet(), full_dir.path(), false).unwrap().logs;

    let dir = tempfile::tempdir().unwrap();
    train(&model(), &data, &settings(9), &quiet(), dir.path(), false).unwrap();
    let ckpts = dir.path().join("checkpoints");
    let mut names: Vec<String> =
        std::fs::read_dir(&ckpts).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["latest", "step-0000006", "step-0000009"], "keep_last = 2");

    // Truncate the newest checkpoint's optimizer state: resume falls back to step 6.
    let opt = ckpts.join("step-0000009").join("optimizer.safetensors");
    let bytes = std::fs::read(&opt).unwrap();
    std::fs::write(&opt, &bytes[..bytes.len() / 3]).unwrap();
    let resumed = train(&model(), &data, &settings(9), &quiet(), dir.path(), true).unwrap().logs;
    assert_eq!(losses(&resumed), losses(&full[6..]));
}

/// A time limit stops the run after the step during which it passed, with a validation loss
/// and a checkpoint there, and says so; resuming continues bit for bit. A limit no deadline can hold is no limit.
#[test]
fn time_limit_stops_with_a_checkpoint_and_resumes_exactly() {
    let data = Synthetic::new();
    let full = train(&model(), &data, &settings(4), &quiet(), tempfile::tempdir().unwrap().path(), false).unwrap().logs;
    let dir = tempfile::tempdir().unwrap();
    let limited = RunControl { time_limit: Some(0.0), ..quiet() };
    let first = train(&model(), &data, &settings(4), &limited, dir.path(), false).unwrap();
    assert!(first.timed_out && !first.completed, "{first:?}");
    assert_eq!(first.step, 1);
    assert!(first.logs.last().is_some_and(|l| l.step == 1 && l.val_loss.is_some()), "a timed stop logs a validation loss: {:?}", first.logs);
    assert!(dir.path().join("checkpoints").join("step-0000001").is_dir());
    let rest = train(&model(), &data, &settings(4), &quiet(), dir.path(), true).unwrap();
    assert!(rest.completed && !rest.timed_out);
    assert_eq!(losses(&rest.logs), losses(&full[1..]));
    let endless = RunControl { time_limit: Some(f64::INFINITY), ..quiet() };
    let all = train(&model(), &data, &settings(2), &endless, tempfile::tempdir().unwrap().path(), false).unwrap();
    assert!(all.completed && !all.timed_out);
}

/// On the hypersphere every matrix row is at unit norm after training, the loss falls, and a
/// run stopped midway resumes bit for bit.
#[test]
fn hypersphere_runs_keep_unit_rows_and_resume_exactly() {
    let data = Synthetic::new();
    let sphere = TrainConfig { optimizer: stlm_train::config::Optimizer::Hypersphere, lr: 2e-2, ..settings(6) };
    let m = model();
    let full = train(&m, &data, &sphere, &quiet(), tempfile::tempdir().unwrap().path(), false).unwrap().logs;
    assert!(full[5].loss < full[0].loss, "training lowers the loss: {} -> {}", full[0].loss, full[5].loss);
    for (name, t) in m.var_store().variables() {
        if t.dim() == 2 {
            let norms = t.to_kind(tch::Kind::Double).square().sum_dim_intlist(-1, false, tch::Kind::Double).sqrt();
            let off = (norms - 1.0).abs().max().double_value(&[]);
            assert!(off < 1e-5, "{name}: rows off the unit sphere by {off}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let stopped = RunControl { time_limit: Some(0.0), ..quiet() };
    train(&model(), &data, &sphere, &stopped, dir.path(), false).unwrap();
    let rest = train(&model(), &data, &sphere, &quiet(), dir.path(), true).unwrap().logs;
    assert_eq!(losses(&rest), losses(&full[1..]));
}

#[test]
fn resume_without_checkpoints_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = train(&model(), &Synthetic::new(), &settings(3), &quiet(), dir.path(), true).unwrap_err().to_string();
    assert!(e.contains("no complete checkpoint"), "{e}");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 5, ..Default::default() })]

    /// Stopped during any step, a run checkpoints that step, and `resume` continues bit for bit.
    #[test]
    fn stopped_anywhere_resumes_exactly(at in 0u64..7) {
        let data = Synthetic::new();
        let full_dir = tempfile::tempdir().unwrap();
        let full = train(&model(), &data, &settings(8), &quiet(), full_dir.path(), false).unwrap().logs;

        let dir = tempfile::tempdir().unwrap();
        let stopping = quiet();
        let source = StopAt { inner: &data, at, stop: Arc::clone(&stopping.stop) };
        let first = train(&model(), &source, &settings(8), &stopping, dir.path(), false).unwrap();
        proptest::prop_assert!(!first.completed);
        proptest::prop_assert_eq!(first.step, at + 1);
        proptest::prop_assert_eq!(losses(&first.logs), losses(&full[..=at as usize]));
        let rest = train(&model(), &data, &settings(8), &quiet(), dir.path(), true).unwrap();
        proptest::prop_assert!(rest.completed);
        proptest::prop_assert_eq!(losses(&rest.logs), losses(&full[at as usize + 1..]));
    }
}

/// A pruned model fine-tunes with its zeros kept (and resumes exactly); without `keep_zeros`
/// the same run fills them in.
#[test]
fn keep_zeros_holds_pruned_weights_at_zero_through_training_and_resume() {
    let data = Synthetic::new();
    let name = "model.layers.0.self_attn.q_proj.weight";
    let pruned = || {
        let m = model();
        let vars = m.var_store().variables();
        let _g = tch::no_grad_guard();
        let mut w = vars[name].shallow_clone();
        let keep = Tensor::arange(w.numel() as i64, (Kind::Int64, Device::Cpu)).remainder(2).eq(0).view(w.size().as_slice());
        let _ = w.masked_fill_(&keep.logical_not(), 0.0);
        (m, keep)
    };
    let masked = TrainConfig { keep_last: 0, ..settings(6) };
    let keeping = RunControl { keep_zeros: vec![name.into()], ..quiet() };
    let (m, keep) = pruned();
    let before = m.var_store().variables()[name].copy();
    let dir = tempfile::tempdir().unwrap();
    let full = train(&m, &data, &masked, &keeping, dir.path(), false).unwrap().logs;
    let after = m.var_store().variables()[name].copy();
    assert_eq!(after.masked_select(&keep.logical_not()).abs().max().double_value(&[]), 0.0, "pruned entries stay zero");
    assert!(!after.masked_select(&keep).equal(&before.masked_select(&keep)), "kept entries train");

    std::fs::remove_dir_all(dir.path().join("checkpoints").join("step-0000006")).unwrap();
    std::fs::write(dir.path().join("checkpoints").join("latest"), "step-0000003").unwrap();
    let (m2, _) = pruned();
    let resumed = train(&m2, &data, &masked, &keeping, dir.path(), true).unwrap().logs;
    assert_eq!(losses(&resumed), losses(&full[3..]));
    assert!(m2.var_store().variables()[name].equal(&after));

    let (m3, keep) = pruned();
    train(&m3, &data, &TrainConfig { keep_last: 0, ..settings(6) }, &quiet(), tempfile::tempdir().unwrap().path(), false).unwrap();
    let free = m3.var_store().variables()[name].copy();
    assert!(free.masked_select(&keep.logical_not()).abs().max().double_value(&[]) > 0.0, "without keep_zeros they train");
    let bad = RunControl { keep_zeros: vec!["model.nope.weight".into()], ..quiet() };
    let e = train(&model(), &data, &settings(2), &bad, tempfile::tempdir().unwrap().path(), false).unwrap_err().to_string();
    assert!(e.contains("model.nope.weight"), "{e}");
}
