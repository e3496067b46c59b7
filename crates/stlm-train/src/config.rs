//! The `[train]` table of a run config (`[model]` is stlm-model's, `[data]` stlm-data's): the
//! one description of the optimisation that the trainer reads. Every field has a default;
//! unknown fields and wrong types are errors naming the field. The optimizer's and the
//! schedule's settings are views of it ([`TrainConfig::adamw`], [`TrainConfig::schedule`]),
//! not copies.

use crate::optim::AdamWConfig;
use crate::schedule::{LrSchedule, Schedule};
use crate::{Result, TrainError};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The optimizer of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    /// AdamW with decoupled weight decay.
    #[default]
    Adamw,
    /// AdamW on the hypersphere: unit-norm matrix rows, tangent updates, renormalised.
    #[serde(alias = "tangent")]
    Hypersphere,
}

impl Optimizer {
    /// True for the default, which config.toml leaves out.
    fn is_adamw(&self) -> bool {
        *self == Optimizer::Adamw
    }
}

/// `[train]`: the optimisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Length of the run in optimizer steps (the schedule's horizon).
    pub max_steps: u64,
    /// Sequences per micro-batch.
    pub batch_size: i64,
    /// Tokens per sequence.
    pub seq_len: i64,
    /// Micro-batches per optimizer step.
    pub grad_accum: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate.
    pub min_lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// `{ kind = "cosine" }`, `{ kind = "wsd", decay_fraction = 0.2 }` or `{ kind = "constant" }`.
    pub schedule: Schedule,
    /// `adamw`, or `hypersphere` (alias `tangent`): AdamW with every matrix row kept at unit
    /// norm and updated along the sphere (see [`crate::optim`]).
    #[serde(skip_serializing_if = "Optimizer::is_adamw")]
    pub optimizer: Optimizer,
    /// Decoupled weight decay on matrices (not embeddings, norms or biases).
    pub weight_decay: f64,
    /// AdamW beta1.
    pub beta1: f64,
    /// AdamW beta2.
    pub beta2: f64,
    /// AdamW epsilon.
    pub eps: f64,
    /// Global gradient-norm bound (0: off).
    pub grad_clip: f64,
    /// Log every this many steps.
    pub log_every: u64,
    /// Validation loss every this many steps (0: at the end only).
    pub eval_every: u64,
    /// Validation batches per evaluation.
    pub eval_batches: u64,
    /// Per-position validation loss (position_loss.jsonl) every this many steps (0: off).
    pub position_loss_every: u64,
    /// Checkpoint every this many steps (0: at the end only).
    pub save_every: u64,
    /// Checkpoints kept (0: all).
    pub keep_last: usize,
    /// Seed of initialisation, data split and batch order.
    pub seed: u64,
    /// LayerSkip training: layer dropout rising with depth and early-exit losses through the
    /// shared head (`{ max_dropout = 0.2, exit_loss = 0.2 }`, see [`stlm_model::LayerSkip`]);
    /// none by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer_skip: Option<stlm_model::LayerSkip>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            max_steps: 1000,
            batch_size: 16,
            seq_len: 256,
            grad_accum: 1,
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 50,
            schedule: Schedule::Cosine,
            optimizer: Optimizer::Adamw,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            log_every: 10,
            eval_every: 100,
            eval_batches: 8,
            position_loss_every: 0,
            save_every: 200,
            keep_last: 3,
            seed: 0,
            layer_skip: None,
        }
    }
}

impl TrainConfig {
    /// The `[train]` table of the TOML `text` read from `path`, checked; errors name the field.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Self> {
        let table: TrainConfig = stlm_core::toml_table(text, path, "train")?;
        table.validate().map_err(|m| TrainError::Config(format!("{}: {m}", path.display())))?;
        Ok(table)
    }

    /// Checks the ranges the trainer relies on; the message names the fields.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let t = self; // short name for the many fields below
        if t.max_steps == 0 || t.batch_size < 1 || t.seq_len < 1 || t.grad_accum == 0 || t.log_every == 0 {
            return Err("fields `train.max_steps`, `train.batch_size`, `train.seq_len`, `train.grad_accum` and `train.log_every` must be at least 1".into());
        }
        if t.lr.is_nan() || t.lr <= 0.0 || t.min_lr < 0.0 || t.min_lr > t.lr {
            return Err(format!(
                "fields `train.lr` ({}) and `train.min_lr` ({}) need 0 <= min_lr <= lr, lr > 0",
                t.lr, t.min_lr
            ));
        }
        if let Some(Err(e)) = t.layer_skip.as_ref().map(stlm_model::LayerSkip::validate) {
            return Err(format!("field `train.layer_skip`: {e}"));
        }
        Ok(())
    }

    /// The learning rate over the run (`max_steps` is its horizon).
    pub fn schedule(&self) -> LrSchedule {
        LrSchedule {
            lr: self.lr,
            min_lr: self.min_lr,
            warmup_steps: self.warmup_steps,
            max_steps: self.max_steps,
            schedule: self.schedule,
        }
    }

    /// The optimizer's settings.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            hypersphere: self.optimizer == Optimizer::Hypersphere,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_overrides_and_named_errors() {
        let p = Path::new("run.toml");
        let r = TrainConfig::from_toml_str(
            "[model]\nhidden_size = 64\n[train]\nlr = 1e-3\nschedule = { kind = \"wsd\", decay_fraction = 0.3 }\n",
            p,
        )
        .unwrap();
        assert_eq!(r.lr, 1e-3);
        assert_eq!(r.schedule, Schedule::Wsd { decay_fraction: 0.3 });
        assert_eq!(r.batch_size, 16);
        let e = TrainConfig::from_toml_str("[train]\nbatch = 3\n", p).unwrap_err().to_string();
        assert!(e.contains("run.toml") && e.contains("batch"), "{e}");
        let e = TrainConfig::from_toml_str("[train]\nseq_len = \"long\"\n", p).unwrap_err().to_string();
        assert!(e.contains("train.seq_len"), "{e}");
        let e = TrainConfig::from_toml_str("[train]\nmin_lr = 1.0\n", p).unwrap_err().to_string();
        assert!(e.contains("min_lr"), "{e}");
    }
}
