//! Mixtral (`MixtralForCausalLM`): Mistral's layout with a top-k (softmax, renormalised) mixture
//! of experts in every layer, saved one tensor per expert (`block_sparse_moe.experts.{j}.w1|w2|w3`).
//! Proved against transformers by `tests/tests/hf_parity.rs`.

use super::llama;
use super::mistral::Mistral;
use super::{checks, stack_experts, unstack_experts, unsupported, ExpertLayout, Family};
use crate::config::{ModelConfig, ModelType};
use crate::Result;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use stlm_moe::{Gate, MoeConfig, RouterKind};
use tch::Tensor;

/// `MixtralForCausalLM`.
pub(super) struct Mixtral;

const LAYOUT: ExpertLayout = ExpertLayout { module: "block_sparse_moe", gate: "w1", up: "w3", down: "w2" };

impl Family for Mixtral {
    fn model_type(&self) -> ModelType {
        ModelType::Mixtral
    }

    fn name(&self) -> &'static str {
        "mixtral"
    }

    /// Mixtral is Mistral's layout with a top-k mixture of experts in every layer. The router's
    /// training-time jitter (`router_jitter_noise`) does not change inference and is not kept.
    fn config_from_json(&self, mut value: Value, path: &Path) -> Result<ModelConfig> {
        let map = value.as_object_mut().ok_or_else(|| unsupported(path, "expected a JSON object".into()))?;
        let mut int = |name: &str| match map.remove(name) {
            Some(v) => v.as_i64().ok_or_else(|| unsupported(path, format!("field `{name}`: expected an integer, got {v}"))),
            None => Err(unsupported(path, format!("missing field `{name}`"))),
        };
        let (num_experts, k) = (int("num_local_experts")?, int("num_experts_per_tok")?);
        let aux = map.remove("router_aux_loss_coef").and_then(|v| v.as_f64()).unwrap_or(0.001);
        for ignored in ["router_jitter_noise", "output_router_logits"] {
            map.remove(ignored);
        }
        let mut cfg = Mistral.config_from_json(value, path)?;
        cfg.model_type = ModelType::Mixtral;
        let router = RouterKind::TopK { k, norm_topk_prob: true, gate: Gate::Softmax };
        cfg.moe = Some(MoeConfig { aux_loss_coef: aux, ..MoeConfig::new(num_experts, router) });
        Ok(cfg)
    }

    fn config_to_json(&self, c: &ModelConfig) -> Value {
        let mut v = Mistral.config_to_json(&ModelConfig { model_type: ModelType::Mistral, moe: None, ..c.clone() });
        let o = v.as_object_mut().expect("json! object");
        let moe = c.moe.as_ref().expect("validated: mixtral has a [moe] table");
        let RouterKind::TopK { k, .. } = moe.router else { unreachable!("validated: a top-k router") };
        o.insert("architectures".into(), json!(["MixtralForCausalLM"]));
        o.insert("model_type".into(), json!("mixtral"));
        o.insert("num_local_experts".into(), json!(moe.num_experts));
        o.insert("num_experts_per_tok".into(), json!(k));
        o.insert("router_aux_loss_coef".into(), json!(moe.aux_loss_coef));
        o.insert("router_jitter_noise".into(), json!(0.0));
        v
    }

    fn export_mismatch(&self, c: &ModelConfig) -> Option<String> {
        checks::no_doge_parts(c)
            .or_else(|| moe_mismatch(c))
            .or_else(|| checks::whole_heads(c))
            .or_else(|| checks::no_qk_norm(c))
            .or_else(|| checks::o_bias_follows(c))
            .or_else(|| llama::layout_mismatch(c, false))
    }

    fn import_weights(
        &self,
        cfg: &ModelConfig,
        tensors: HashMap<String, Tensor>,
        path: &Path,
    ) -> Result<HashMap<String, Tensor>> {
        stack_experts(cfg, tensors, path, &LAYOUT)
    }

    fn export_weights(&self, _cfg: &ModelConfig, vars: &HashMap<String, Tensor>) -> Vec<(String, Tensor)> {
        unstack_experts(vars, &LAYOUT)
    }
}

/// Why `c`'s `moe` table is not Mixtral's, if it is not.
fn moe_mismatch(c: &ModelConfig) -> Option<String> {
    let moe = c.moe.as_ref();
    let top_k_softmax = matches!(moe.map(|m| &m.router), Some(RouterKind::TopK { norm_topk_prob: true, gate: Gate::Softmax, .. }));
    let every_layer = moe.is_some_and(|m| m.sparse_step == 1 && m.dense_layers.is_empty());
    let fine_grained = moe.is_some_and(|m| m.expert_intermediate_size.is_some_and(|w| w != c.intermediate_size));
    let shared = moe.and_then(|m| m.shared_expert.as_ref());
    if !top_k_softmax {
        Some("mixtral needs a `[moe]` table with a top-k softmax router (norm_topk_prob = true)".into())
    } else if !every_layer || fine_grained || shared.is_some() {
        Some("mixtral has experts as wide as intermediate_size in every layer and no shared expert".into())
    } else {
        None
    }
}
