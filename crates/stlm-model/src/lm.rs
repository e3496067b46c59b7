//! What training and the command line need from a model of either kind: token-level
//! ([`DecoderModel`]) or byte-pooled ([`BytePooledModel`]), and loading whichever a directory
//! holds.

use crate::io::{copy_weights, save_dir, WEIGHTS_FILE};
use crate::{load_config, BytePooledModel, DecoderModel, ModelConfig, ModelError, Result};
use std::path::Path;
use stlm_core::{read_safetensors, DType};
use stlm_moe::MoeStats;
use tch::{nn, Device, Tensor};

/// A model the trainer can train, checkpoint and restore.
pub trait LanguageModel {
    /// The variable store holding every weight.
    fn var_store(&self) -> &nn::VarStore;
    /// The model config.
    fn model_config(&self) -> &ModelConfig;
    /// Every tensor the optimizer updates, by name: the variable store's, plus whatever else a
    /// wrapper trains alongside (distillation's projections).
    fn trainable_variables(&self) -> Vec<(String, Tensor)> {
        self.var_store().variables().into_iter().collect()
    }
    /// Training loss of windows `inputs` `[b, s]` with next-id `targets` `[b, s]`: the loss that
    /// is logged (mean nats per token, or per byte for byte models) and extra terms that only
    /// train (e.g. a reconstruction loss). MoE balancing losses come from `take_moe_stats`.
    fn train_loss(&self, inputs: &Tensor, targets: &Tensor) -> Result<(Tensor, Option<Tensor>)>;
    /// Nats of each target `[b, s]` of windows `inputs` with next-id `targets` (byte models: of
    /// each target byte, a chunk's end counted with the byte after it), for per-position loss.
    fn position_nats(&self, inputs: &Tensor, targets: &Tensor) -> Result<Tensor>;
    /// MoE stats of the last forward, per MoE layer, taken.
    fn take_moe_stats(&self) -> Vec<(usize, MoeStats)>;
    /// After an optimizer step: moves aux-free router biases by `stats`.
    fn update_moe_balance(&self, stats: &[(usize, MoeStats)]);
    /// Saves a model directory (`tokenizer.json` copied from `tokenizer` when given).
    fn save(&self, dir: &Path, tokenizer: Option<&Path>) -> Result<()>;
    /// Replaces every weight with those in a `model.safetensors` this model's config wrote.
    fn load_weights(&self, path: &Path) -> Result<()>;
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
    fn train_loss(&self, inputs: &Tensor, targets: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let logits = self.forward(inputs); // [b, s, vocab]
        let vocab = logits.size()[2];
        Ok((logits.reshape([-1, vocab]).cross_entropy_for_logits(&targets.reshape([-1])), None))
    }
    fn position_nats(&self, inputs: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let logp = self.forward(inputs).log_softmax(-1, tch::Kind::Float);
        Ok(-logp.gather(2, &targets.unsqueeze(-1), false).squeeze_dim(-1))
    }
    fn take_moe_stats(&self) -> Vec<(usize, MoeStats)> {
        DecoderModel::take_moe_stats(self)
    }
    fn update_moe_balance(&self, stats: &[(usize, MoeStats)]) {
        DecoderModel::update_moe_balance(self, stats)
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
    fn train_loss(&self, inputs: &Tensor, targets: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        self.loss(inputs, targets)
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
    fn take_moe_stats(&self) -> Vec<(usize, MoeStats)> {
        BytePooledModel::take_moe_stats(self)
    }
    fn update_moe_balance(&self, stats: &[(usize, MoeStats)]) {
        BytePooledModel::update_moe_balance(self, stats)
    }
    fn save(&self, dir: &Path, tokenizer: Option<&Path>) -> Result<()> {
        let vars: Vec<(String, Tensor)> = self.var_store().variables().into_iter().collect();
        save_dir(dir, &self.config, &vars, "float32", tokenizer)
    }
    fn load_weights(&self, path: &Path) -> Result<()> {
        copy_weights(self.var_store(), false, read_safetensors(path)?, path)
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
