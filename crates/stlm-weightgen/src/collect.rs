//! Collecting training weights into a [`Collection`]: the selected parameters of a model, of
//! every checkpoint of existing runs (fine-tunes on other data, other seeds), and p-diff's
//! protocol: keep training only the selected parameters of a trained model for K more steps,
//! the rest frozen, and keep every step's weights.

use crate::collection::{CheckpointInfo, Collection, Unit};
use crate::select::{block_index, LayerSelector};
use crate::WeightgenError;
use stlm_core::OptionError;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::{Path, PathBuf};
use stlm_model::LanguageModel;
use stlm_train::optim::{AdamW, AdamWConfig};
use stlm_train::trainer::{train_step, BatchSource};
use tch::Tensor;

/// The model's parameters that `selector` picks, as units in model order (blocks in order, then
/// what is outside them; by name within).
pub fn model_units(model: &dyn LanguageModel, selector: &LayerSelector) -> Result<Vec<Unit>, WeightgenError> {
    let mut params = model.parameters();
    params.sort_by_key(|p| (block_index(&p.name).unwrap_or(usize::MAX), p.name.clone()));
    let layers = model.model_config().num_hidden_layers.max(0) as usize;
    let selected = selector.select(params.iter().map(|p| (p.name.as_str(), p.role)), layers)?;
    let sizes: std::collections::HashMap<&str, Vec<i64>> = params.iter().map(|p| (p.name.as_str(), p.tensor.size())).collect();
    Ok(selected.iter().map(|n| Unit::new(n, sizes.get(n.as_str()).cloned().unwrap_or_default())).collect())
}

/// Copies of the model's current values of `units`.
pub fn snapshot(model: &dyn LanguageModel, units: &[Unit]) -> Result<Vec<Tensor>, WeightgenError> {
    let vars = model.var_store().variables();
    units
        .iter()
        .map(|u| {
            vars.get(&u.name)
                .map(|t| t.detach().to_device(tch::Device::Cpu).to_kind(tch::Kind::Float).copy())
                .ok_or_else(|| WeightgenError::Input(format!("the model has no parameter `{}`", u.name)))
        })
        .collect()
}

/// Writes `tensors` (in unit order) into the model's parameters of `units`.
pub fn set_units(model: &dyn LanguageModel, units: &[Unit], tensors: &[Tensor]) -> Result<(), WeightgenError> {
    let vars = model.var_store().variables();
    let _guard = tch::no_grad_guard();
    for (u, t) in units.iter().zip(tensors) {
        let mut dst = vars
            .get(&u.name)
            .ok_or_else(|| WeightgenError::Input(format!("the model has no parameter `{}`", u.name)))?
            .shallow_clone();
        if t.numel() as i64 != u.numel() || dst.size() != u.shape {
            return Err(WeightgenError::Input(format!(
                "`{}`: {} values for shape {:?}",
                u.name,
                t.numel(),
                dst.size()
            )));
        }
        dst.copy_(&t.reshape(u.shape.as_slice()).to_kind(dst.kind()).to_device(dst.device()));
    }
    Ok(())
}

/// The weight files a `--runs` entry stands for, with their steps: every checkpoint of a run
/// directory (`checkpoints/step-*/model.safetensors`, oldest first; its final `model/` only when
/// it kept no checkpoint, since the last checkpoint holds the same weights), or a
/// model directory's `model.safetensors`.
pub fn weight_files(path: &Path) -> Result<Vec<(Option<u64>, PathBuf)>, WeightgenError> {
    let file = stlm_model::io::WEIGHTS_FILE;
    if path.join(file).is_file() {
        return Ok(vec![(None, path.join(file))]);
    }
    let ckpts = path.join("checkpoints");
    let mut out = Vec::new();
    if ckpts.is_dir() {
        let entries = std::fs::read_dir(&ckpts).map_err(|e| stlm_core::CoreError::io(&ckpts, e))?;
        for e in entries.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok()) {
                if e.path().join(file).is_file() {
                    out.push((Some(step), e.path().join(file)));
                }
            }
        }
        out.sort();
    }
    if path.join("model").join(file).is_file() && out.is_empty() {
        out.push((None, path.join("model").join(file)));
    }
    if out.is_empty() {
        return Err(WeightgenError::Input(format!(
            "{}: neither a model directory ({file}) nor a run directory with checkpoints/step-*/{file}",
            path.display()
        )));
    }
    Ok(out)
}

/// Adds the selected weights of every checkpoint of `paths` (see [`weight_files`]) to
/// `collection`, loading each into `model` (which must have their architecture); the model is
/// left holding the last one.
pub fn from_runs(
    model: &dyn LanguageModel,
    paths: &[PathBuf],
    collection: &mut Collection,
    progress: bool,
) -> Result<(), WeightgenError> {
    let mut files = Vec::new();
    for p in paths {
        files.extend(weight_files(p)?.into_iter().map(|(step, f)| (p.display().to_string(), step, f)));
    }
    let bar = bar(files.len() as u64, progress, "checkpoints read");
    let units = collection.manifest.units.clone();
    let mut read = Vec::with_capacity(files.len());
    for (source, step, file) in files {
        model.load_weights(&file).map_err(|e| WeightgenError::Input(format!("{}: {e}", file.display())))?;
        read.push((CheckpointInfo { source, step }, snapshot(model, &units)?));
        tick(&bar, String::new());
    }
    bar.finish_and_clear();
    collection.extend(read)
}

/// p-diff's continued training.
#[derive(Debug, Clone, Copy)]
pub struct ContinueOptions {
    /// Steps to train; a checkpoint is kept after every `every` steps.
    pub steps: u64,
    /// Keep a checkpoint every this many steps.
    pub every: u64,
    /// Constant learning rate.
    pub lr: f64,
    /// Gradient clipping (0: off).
    pub grad_clip: f64,
    /// Micro-batches per step.
    pub grad_accum: u64,
    /// First step index the batch source is asked for (so that continued training sees other
    /// batches than the run that made the model).
    pub first_batch: u64,
    /// AdamW settings.
    pub adamw: AdamWConfig,
}

/// Trains only `collection`'s units of `model` for `opts.steps` steps on `data` (every other
/// parameter frozen), adding the selected weights to `collection` every `opts.every` steps.
/// Returns the mean training loss of each step.
pub fn continue_training(
    model: &dyn LanguageModel,
    data: &dyn BatchSource,
    opts: &ContinueOptions,
    collection: &mut Collection,
    progress: bool,
) -> Result<Vec<f64>, WeightgenError> {
    for (name, value) in [("steps", opts.steps), ("every", opts.every)] {
        if value == 0 {
            return Err(OptionError::new(name, value, "must be at least 1").into());
        }
    }
    let units = collection.manifest.units.clone();
    let vars = model.var_store().variables();
    let mut chosen = model.parameters();
    chosen.retain(|p| units.iter().any(|u| u.name == p.name));
    // Freeze the rest (no gradients computed for them), and unfreeze at the end.
    let frozen: Vec<Tensor> = vars
        .iter()
        .filter(|(n, t)| t.requires_grad() && !units.iter().any(|u| &u.name == *n))
        .map(|(_, t)| t.shallow_clone())
        .collect();
    for t in &frozen {
        let _ = t.set_requires_grad(false);
    }
    let mut opt = AdamW::new(chosen, opts.adamw);
    let bar = bar(opts.steps, progress, "steps (selected layers only)");
    let mut losses = Vec::with_capacity(opts.steps as usize);
    let mut kept = Vec::new();
    let result = (|| -> Result<(), WeightgenError> {
        for step in 0..opts.steps {
            let out = train_step(
                model,
                &mut opt,
                data,
                opts.first_batch + step,
                opts.lr,
                opts.grad_accum,
                opts.grad_clip,
                None,
            )?;
            losses.push(out.loss);
            tick(&bar, format!("loss {:.4}", out.loss));
            if (step + 1).is_multiple_of(opts.every) {
                let info = CheckpointInfo { source: "continue".into(), step: Some(step + 1) };
                kept.push((info, snapshot(model, &units)?));
            }
        }
        Ok(())
    })();
    for t in &frozen {
        let _ = t.set_requires_grad(true);
    }
    bar.finish_and_clear();
    result?;
    collection.extend(kept)?;
    Ok(losses)
}

/// Advances `bar` by one with `msg`; without a terminal (a hidden bar), prints a plain line at
/// every tenth of the way instead.
pub(crate) fn tick(bar: &ProgressBar, msg: String) {
    bar.inc(1);
    let (pos, len) = (bar.position(), bar.length().unwrap_or(0));
    if bar.is_hidden() && len > 0 && (pos == len || pos % (len / 10).max(1) == 0) {
        eprintln!("{pos}/{len} {} {msg}", bar.prefix());
    } else {
        bar.set_message(msg);
    }
}

/// A progress bar of `len` items on stderr (hidden without a terminal).
pub(crate) fn bar(len: u64, progress: bool, what: &str) -> ProgressBar {
    let target = if progress { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
    let bar = ProgressBar::with_draw_target(Some(len), target);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {prefix} {msg} [{elapsed_precise}<{eta_precise}]")
            .expect("valid template"),
    );
    bar.set_prefix(what.to_string());
    bar
}

#[cfg(test)]
mod tests {
    use super::*;
    use stlm_model::{Batch, DecoderModel, ModelConfig};
    use tch::{Device, Kind};

    struct Fixed;
    impl BatchSource for Fixed {
        fn train_batch(&self, step: u64, _micro: u64) -> stlm_train::Result<Batch> {
            tch::manual_seed(step as i64);
            let ids = Tensor::randint(40, [2, 9], (Kind::Int64, Device::Cpu));
            Ok(Batch::new(ids.narrow(1, 0, 8), ids.narrow(1, 1, 8)))
        }
        fn val_batch(&self, index: u64) -> stlm_train::Result<Batch> {
            self.train_batch(index, 0)
        }
    }

    /// p-diff's continued training moves only the selected parameters, keeps one checkpoint every
    /// `every` steps, and leaves every parameter trainable afterwards.
    #[test]
    fn continued_training_trains_only_the_selection() {
        let _rng = crate::rng_lock();
        tch::manual_seed(0);
        let cfg = ModelConfig {
            vocab_size: 40,
            hidden_size: 16,
            intermediate_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 2,
            max_position_embeddings: 16,
            ..ModelConfig::llama()
        };
        let model = DecoderModel::new(cfg, Device::Cpu).unwrap();
        let units = model_units(&model, &LayerSelector::parse("norm,layers.1.mlp.up_proj").unwrap()).unwrap();
        assert_eq!(units.len(), 2 * 2 + 1 + 1);
        let before: Vec<(String, Tensor)> =
            model.var_store().variables().into_iter().map(|(n, t)| (n, t.copy())).collect();
        let mut coll = Collection::new("m".into(), "norm".into(), units.clone());
        let opts = ContinueOptions {
            steps: 6,
            every: 2,
            lr: 1e-2,
            grad_clip: 1.0,
            grad_accum: 1,
            first_batch: 0,
            adamw: AdamWConfig::default(),
        };
        let losses = continue_training(&model, &Fixed, &opts, &mut coll, false).unwrap();
        assert_eq!((losses.len(), coll.len()), (6, 3));
        let after = model.var_store().variables();
        for (name, t) in &before {
            let changed = !t.equal(&after[name]);
            assert_eq!(changed, units.iter().any(|u| &u.name == name), "{name}");
            assert!(after[name].requires_grad(), "{name} left frozen");
        }
        // The last checkpoint is the model's current selection.
        assert!(coll.checkpoint(2)[5].equal(&after[&units[5].name]));
    }
}
