//! Doge (`DogeForCausalLM`): Llama's fields plus Dynamic Mask Attention in every layer, residual
//! scales, and a dense MLP or the cross-domain MoE. Proved against transformers by
//! `tests/tests/hf_parity.rs`.

use super::llama::Llama;
use super::{unsupported, Family};
use crate::config::{MlpKind, ModelConfig, ModelType, NormKind, PositionKind};
use crate::Result;
use serde_json::{json, Value};
use std::path::Path;
use stlm_attention::AttentionKind;
use stlm_moe::{CdmoeConfig, CdmoeRouting};

/// `DogeForCausalLM`.
pub(super) struct Doge;

impl Family for Doge {
    fn model_type(&self) -> ModelType {
        ModelType::Doge
    }

    fn name(&self) -> &'static str {
        "doge"
    }

    /// Doge: Llama's fields plus Dynamic Mask Attention (`keep_window_size`) in every layer, residual
    /// scales, and the cross-domain MoE when `is_moe` (in transformers' token-mixing routing, so that
    /// published checkpoints give their outputs). A non-square `num_experts` loads with a warning.
    fn config_from_json(&self, mut value: Value, path: &Path) -> Result<ModelConfig> {
        let map = value.as_object_mut().ok_or_else(|| unsupported(path, "expected a JSON object".into()))?;
        let mut take = |name: &str| map.remove(name).unwrap_or(Value::Null);
        let keep = take("keep_window_size").as_i64().unwrap_or(2048);
        let is_moe = take("is_moe").as_bool().unwrap_or(false);
        let num_experts = take("num_experts").as_i64().unwrap_or(16384);
        let top_k = take("num_experts_per_tok").as_i64().unwrap_or(64);
        let norm_topk_prob = take("norm_topk_prob").as_bool().unwrap_or(false);
        if let Some(w) = Some(take("sliding_window")).filter(|w| !w.is_null()) {
            return Err(unsupported(path, format!("field `sliding_window`: {w} (Doge with a sliding window is not supported)")));
        }
        for ignored in ["hidden_dropout", "output_router_logits", "router_aux_loss_coef"] {
            take(ignored);
        }
        let mut cfg = Llama.config_from_json(value, path)?;
        cfg.model_type = ModelType::Doge;
        cfg.residual_scales = true;
        cfg.attention = vec![AttentionKind::DogeDma { keep_window_size: keep, bias: () }];
        if is_moe {
            let (keys, square) = stlm_moe::product_keys(num_experts);
            if !square {
                eprintln!(
                    "warning: {}: num_experts {num_experts} is not a square; product keys reach only {keys}^2 = {} experts",
                    path.display(),
                    keys * keys
                );
            }
            cfg.cdmoe = Some(CdmoeConfig { num_experts, top_k, norm_topk_prob, routing: CdmoeRouting::HfCompat });
        }
        Ok(cfg)
    }

    fn config_to_json(&self, c: &ModelConfig) -> Value {
        let plain =
            ModelConfig { model_type: ModelType::Llama, attention: Vec::new(), residual_scales: false, cdmoe: None, ..c.clone() };
        let mut v = Llama.config_to_json(&plain);
        let o = v.as_object_mut().expect("json! object");
        let keep = match c.layer_attention(0) {
            AttentionKind::DogeDma { keep_window_size, .. } => keep_window_size,
            _ => unreachable!("validated: doge-dma attention"),
        };
        o.insert("architectures".into(), json!(["DogeForCausalLM"]));
        o.insert("model_type".into(), json!("doge"));
        o.insert("keep_window_size".into(), json!(keep));
        o.insert("is_moe".into(), json!(c.cdmoe.is_some()));
        if let Some(m) = &c.cdmoe {
            o.insert("num_experts".into(), json!(m.num_experts));
            o.insert("num_experts_per_tok".into(), json!(m.top_k));
            o.insert("norm_topk_prob".into(), json!(m.norm_topk_prob));
        }
        o.insert("sliding_window".into(), Value::Null);
        v
    }

    /// Doge checks its own layout only (q/k norms, o_proj biases and partial rotation are not
    /// refused here).
    fn export_mismatch(&self, c: &ModelConfig) -> Option<String> {
        let keep = match c.layer_attention(0) {
            AttentionKind::DogeDma { keep_window_size, .. } => Some(keep_window_size),
            _ => None,
        };
        let uniform = (0..c.num_hidden_layers as usize)
            .all(|i| Some(c.layer_attention(i)) == keep.map(|k| AttentionKind::DogeDma { keep_window_size: k, bias: () }));
        let ok = keep.is_some()
            && uniform
            && c.residual_scales
            && c.norm == NormKind::RmsNorm
            && c.position == PositionKind::Rope
            && c.mlp == MlpKind::Gated
            && c.moe.is_none();
        (!ok).then(|| "doge needs doge-dma attention (one keep_window_size) on every layer, residual_scales = true, rms_norm, rope and a gated MLP or cdmoe".into())
    }
}
