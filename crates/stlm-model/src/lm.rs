//! What training and the command line need from a model of either kind: token-level
//! ([`DecoderModel`]) or byte-pooled ([`BytePooledModel`]), and loading whichever a directory
//! holds; the typed step ([`Batch`] in, [`StepOutput`] out) between them and the trainer.

use crate::io::{copy_weights, save_dir, WEIGHTS_FILE};
use crate::{load_config, BytePooledModel, DecoderModel, ModelConfig, ModelError, Result};
use std::path::Path;
use std::collections::BTreeMap;
use stlm_core::{read_safetensors, BufferUpdate, DType, Mode, Parameter};
use stlm_moe::MoeStats;
use tch::{nn, Device, Tensor};

/// One micro-batch of training or validation: windows, their next-id targets, and whatever
/// else the model's objective reads (a teacher's targets, masks), by name.
pub struct Batch {
    /// Token (or byte) ids `[b, s]`, int64.
    pub inputs: Tensor,
    /// Next ids `[b, s]`, int64.
    pub targets: Tensor,
    /// Extra inputs of the objective.
    pub extras: Extras,
}

impl Batch {
    /// A batch of `inputs` and `targets` without extras.
    pub fn new(inputs: Tensor, targets: Tensor) -> Self {
        Batch { inputs, targets, extras: Extras::default() }
    }
}

/// Named tensors a batch source adds for the objective (`teacher.ids`, ...), each with the batch
/// as its first dimension, so that a batch can be moved or split as a whole.
#[derive(Debug, Default)]
pub struct Extras(BTreeMap<String, Tensor>);

impl Extras {
    /// Adds (or replaces) `name`.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) {
        self.0.insert(name.into(), tensor);
    }
    /// The tensor called `name`, if the batch has it.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.0.get(name)
    }
    /// True when the batch carries nothing extra.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What a model's pass over a [`Batch`] hands back to the trainer.
pub struct StepOutput {
    /// The logged loss (mean nats per target token, or per byte for byte models); it trains.
    pub loss: Tensor,
    /// Weighted terms that train but are not the logged loss (MoE balancing, reconstruction,
    /// distillation), by name, in the order they are summed.
    pub aux_losses: Vec<(String, Tensor)>,
    /// What the pass measured, for logs and for after the optimizer step.
    pub stats: StepStats,
}

/// Measurements of one pass and the updates it asks for.
#[derive(Default)]
pub struct StepStats {
    /// Per MoE layer (`(layer index, stats)`).
    pub moe: Vec<(usize, MoeStats)>,
    /// Tensors not trained by gradients to move after the optimizer step (aux-free router
    /// biases), from a training pass.
    pub updates: Vec<BufferUpdate>,
}

impl StepOutput {
    /// The output of a pass with `loss`, the MoE blocks' `moe` stats (their balancing losses
    /// first among the aux losses, then `extra` under `extra_name`) and `updates`.
    pub fn with_moe(loss: Tensor, moe: Vec<(usize, MoeStats)>, extra: Option<(&str, Tensor)>, updates: Vec<BufferUpdate>) -> Self {
        let mut aux_losses: Vec<(String, Tensor)> =
            moe.iter().map(|(i, s)| (format!("model.layers.{i}.mlp"), s.aux_loss.shallow_clone())).collect();
        aux_losses.extend(extra.map(|(name, t)| (name.to_string(), t)));
        StepOutput { loss, aux_losses, stats: StepStats { moe, updates } }
    }
}

/// A model the trainer can train, checkpoint and restore.
pub trait LanguageModel {
    /// The variable store holding every weight.
    fn var_store(&self) -> &nn::VarStore;
    /// The model config.
    fn model_config(&self) -> &ModelConfig;
    /// Every tensor the optimizer updates, with its saved name and role: the model's stored
    /// walk ([`stlm_core::module::parameters`]), plus whatever else a wrapper trains alongside
    /// (distillation's projections).
    fn parameters(&self) -> Vec<Parameter>;
    /// The pass over `batch` in `mode`: the logged loss, the terms that only train, and stats.
    fn step(&self, batch: &Batch, mode: Mode) -> Result<StepOutput>;
    /// Nats of each target `[b, s]` of windows `inputs` with next-id `targets` (byte models: of
    /// each target byte, a chunk's end counted with the byte after it), for per-position loss.
    fn position_nats(&self, inputs: &Tensor, targets: &Tensor) -> Result<Tensor>;
    /// Saves a model directory (`tokenizer.json` copied from `tokenizer` when given).
    fn save(&self, dir: &Path, tokenizer: Option<&Path>) -> Result<()>;
    /// Replaces every weight with those in a `model.safetensors` this model's config wrote.
    fn load_weights(&self, path: &Path) -> Result<()>;
    /// Model FLOPs of one trained token in windows of `seq` positions (see
    /// [`stlm_core::flops`]), when the model can count them.
    fn flops_per_token(&self, _seq: i64) -> Option<f64> {
        None
    }
    /// Total number of parameters.
    fn num_parameters(&self) -> i64 {
        stlm_core::numel(&self.var_store().trainable_variables())
    }
    /// Device of the weights.
    fn device(&self) -> Device {
        self.var_store().device()
    }
}

impl LanguageModel for DecoderModel {
    fn var_store(&self) -> &nn::VarStore {
        DecoderModel::var_store(self)
    }
    fn model_config(&self) -> &ModelConfig {
        &self.config
    }
    fn parameters(&self) -> Vec<Parameter> {
        stlm_core::module::parameters(self)
    }
    fn step(&self, batch: &Batch, mode: Mode) -> Result<StepOutput> {
        let (logits, moe) = self.forward_mode(&batch.inputs, mode); // [b, s, vocab]
        let vocab = logits.size()[2];
        let loss = logits.reshape([-1, vocab]).cross_entropy_for_logits(&batch.targets.reshape([-1]));
        let updates = if mode.is_train() { self.balance_updates(&moe) } else { Vec::new() };
        Ok(StepOutput::with_moe(loss, moe, None, updates))
    }
    fn flops_per_token(&self, seq: i64) -> Option<f64> {
        Some(DecoderModel::flops_per_token(self, seq))
    }
    fn position_nats(&self, inputs: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let logp = self.forward(inputs).log_softmax(-1, tch::Kind::Float);
        Ok(-logp.gather(2, &targets.unsqueeze(-1), false).squeeze_dim(-1))
    }
    fn save(&self, dir: &Path, tokenizer: Option<&Path>) -> Result<()> {
        DecoderModel::save(self, dir, tokenizer)
    }
    fn load_weights(&self, path: &Path) -> Result<()> {
        DecoderModel::load_weights(self, path)
    }
}

impl LanguageModel for BytePooledModel {
    fn var_store(&self) -> &nn::VarStore {
        BytePooledModel::var_store(self)
    }
    fn model_config(&self) -> &ModelConfig {
        &self.config
    }
    fn parameters(&self) -> Vec<Parameter> {
        stlm_core::module::parameters(self)
    }
    fn step(&self, batch: &Batch, mode: Mode) -> Result<StepOutput> {
        let (loss, reconstruction, moe) = self.loss(&batch.inputs, &batch.targets, mode)?;
        let updates = if mode.is_train() { self.balance_updates(&moe) } else { Vec::new() };
        Ok(StepOutput::with_moe(loss, moe, reconstruction.map(|r| ("reconstruction", r)), updates))
    }
    fn position_nats(&self, inputs: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let (b, s) = (inputs.size()[0], inputs.size()[1]);
        // Each row is the window plus its last target; the scores after its first byte are the targets'.
        let rows: Vec<Vec<u32>> = (0..b)
            .map(|r| {
                let mut row: Vec<i64> = Vec::try_from(inputs.get(r).to_device(Device::Cpu)).unwrap_or_default();
                row.push(targets.int64_value(&[r, s - 1]));
                row.into_iter().map(|t| t as u32).collect()
            })
            .collect();
        let nats: Vec<f32> = self.byte_scores(&rows, usize::MAX)?.iter().flat_map(|(_, sc)| sc[1..].iter().map(|x| x.0 as f32).collect::<Vec<_>>()).collect();
        Ok(Tensor::from_slice(&nats).view([b, s]).to_device(inputs.device()))
    }
    fn save(&self, dir: &Path, tokenizer: Option<&Path>) -> Result<()> {
        let vars: Vec<(String, Tensor)> = crate::io::stored_tensors(self).into_iter().collect();
        save_dir(dir, &self.config, &vars, "float32", tokenizer)
    }
    fn load_weights(&self, path: &Path) -> Result<()> {
        copy_weights(self, false, read_safetensors(path)?, path)
    }
}

/// A model directory's model, token-level or byte-pooled.
pub enum AnyModel {
    /// A token model.
    Tokens(Box<DecoderModel>),
    /// A byte-pooled model.
    Bytes(Box<BytePooledModel>),
}

impl AnyModel {
    /// The model as the trainer's interface.
    pub fn as_lm(&self) -> &dyn LanguageModel {
        match self {
            AnyModel::Tokens(m) => m.as_ref(),
            AnyModel::Bytes(m) => m.as_ref(),
        }
    }
}

/// Loads whichever kind of model `dir` holds (a byte model when its config has `bytes`).
pub fn load_any_model(dir: &Path, device: Device, dtype: DType) -> Result<AnyModel> {
    let config = load_config(dir)?;
    if config.bytes.is_none() {
        return Ok(AnyModel::Tokens(Box::new(crate::load_model(dir, device, dtype)?)));
    }
    if dtype != DType::Float32 {
        return Err(ModelError::Input("byte models run in float32".into()));
    }
    let model = BytePooledModel::new(config, device)?;
    let path = dir.join(WEIGHTS_FILE);
    if !path.is_file() {
        return Err(ModelError::Weights { path, message: "weight file is missing".into() });
    }
    model.load_weights(&path)?;
    Ok(AnyModel::Bytes(Box::new(model)))
}
