//! Mistral (`MistralForCausalLM`): Llama's layout without biases plus `sliding_window` on every
//! layer. Proved against transformers by `tests/tests/hf_parity.rs`.

use super::llama::{self, Llama};
use super::{checks, unsupported, Family};
use crate::config::{ModelConfig, ModelType};
use crate::Result;
use serde_json::{json, Value};
use std::path::Path;
use stlm_attention::AttentionKind;

/// `MistralForCausalLM`.
pub(super) struct Mistral;

impl Family for Mistral {
    fn model_type(&self) -> ModelType {
        ModelType::Mistral
    }

    fn name(&self) -> &'static str {
        "mistral"
    }

    /// Mistral is Llama's layout (without biases) plus `sliding_window` on every layer.
    fn config_from_json(&self, mut value: Value, path: &Path) -> Result<ModelConfig> {
        let window = match value.as_object_mut().and_then(|m| m.remove("sliding_window")) {
            None | Some(Value::Null) => None,
            Some(w) => Some(w.as_i64().filter(|&w| w > 0).ok_or_else(|| {
                unsupported(path, format!("field `sliding_window`: expected a positive integer or null, got {w}"))
            })?),
        };
        let mut cfg = Llama.config_from_json(value, path)?;
        cfg.model_type = ModelType::Mistral;
        cfg.attention = window.map(|window| AttentionKind::SlidingWindow { window, global_tokens: 0 }).into_iter().collect();
        Ok(cfg)
    }

    fn config_to_json(&self, c: &ModelConfig) -> Value {
        let mut v = Llama.config_to_json(&ModelConfig { model_type: ModelType::Llama, attention: Vec::new(), ..c.clone() });
        let o = v.as_object_mut().expect("json! object");
        for gone in ["attention_bias", "mlp_bias"] {
            o.remove(gone);
        }
        let window = c.mistral_window().expect("validated on load and build");
        o.insert("architectures".into(), json!(["MistralForCausalLM"]));
        o.insert("model_type".into(), json!("mistral"));
        o.insert("sliding_window".into(), window.map_or(Value::Null, |w| json!(w)));
        v
    }

    fn export_mismatch(&self, c: &ModelConfig) -> Option<String> {
        checks::no_doge_parts(c)
            .or_else(|| checks::no_moe(c))
            .or_else(|| checks::whole_heads(c))
            .or_else(|| checks::no_qk_norm(c))
            .or_else(|| checks::o_bias_follows(c))
            .or_else(|| llama::layout_mismatch(c, false))
    }
}
