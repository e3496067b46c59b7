//! Qwen2-MoE (`Qwen2MoeForCausalLM`) and Qwen3-MoE (`Qwen3MoeForCausalLM`): Llama's layout with
//! fine-grained experts saved one tensor per expert (`mlp.experts.{j}.gate_proj|up_proj|down_proj`).
//! Proved against transformers by `tests/tests/hf_parity.rs`.

use super::llama::Llama;
use super::{checks, stack_experts, unstack_experts, unsupported, ExpertLayout, Family};
use crate::config::{Activation, MlpKind, ModelConfig, ModelType, NormKind, PositionKind};
use crate::Result;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use stlm_moe::{Gate, MoeConfig, RouterKind, SharedExpertConfig};
use tch::Tensor;

/// A Qwen MoE family: Qwen2-MoE or Qwen3-MoE.
pub(super) struct QwenMoe {
    model_type: ModelType,
}

/// `Qwen2MoeForCausalLM`.
pub(super) const QWEN2_MOE: QwenMoe = QwenMoe { model_type: ModelType::Qwen2Moe };
/// `Qwen3MoeForCausalLM`.
pub(super) const QWEN3_MOE: QwenMoe = QwenMoe { model_type: ModelType::Qwen3Moe };

const LAYOUT: ExpertLayout = ExpertLayout { module: "mlp", gate: "gate_proj", up: "up_proj", down: "down_proj" };

impl Family for QwenMoe {
    fn model_type(&self) -> ModelType {
        self.model_type
    }

    fn name(&self) -> &'static str {
        match self.model_type {
            ModelType::Qwen2Moe => "qwen2_moe",
            _ => "qwen3_moe",
        }
    }

    /// Qwen2-MoE and Qwen3-MoE: Llama's layout with fine-grained experts (`moe_intermediate_size`)
    /// in the layers `decoder_sparse_step` and `mlp_only_layers` choose, a top-k softmax router
    /// (`norm_topk_prob`), and dense MLPs of `intermediate_size` elsewhere. Qwen2-MoE adds a shared
    /// expert with a sigmoid gate and biases q, k and v (`qkv_bias`) but not o; Qwen3-MoE normalises
    /// each query and key head. Sliding windows (`use_sliding_window`) are refused.
    fn config_from_json(&self, mut value: Value, path: &Path) -> Result<ModelConfig> {
        let model_type = self.model_type;
        let map = value.as_object_mut().ok_or_else(|| unsupported(path, "expected a JSON object".into()))?;
        let mut take = |name: &str| map.remove(name).filter(|v| !v.is_null());
        let int = |v: Option<Value>, name: &str, default: Option<i64>| match v {
            Some(v) => v.as_i64().ok_or_else(|| unsupported(path, format!("field `{name}`: expected an integer, got {v}"))),
            None => default.ok_or_else(|| unsupported(path, format!("missing field `{name}`"))),
        };
        if let Some(v) = take("use_sliding_window").filter(|v| v != &json!(false)) {
            return Err(unsupported(path, format!("field `use_sliding_window`: {v} (qwen MoE sliding windows are not supported)")));
        }
        if let Some(kinds) = take("layer_types") {
            let full = kinds.as_array().is_some_and(|a| a.iter().all(|k| k == "full_attention"));
            if !full {
                return Err(unsupported(path, format!("field `layer_types`: {kinds} (only full_attention is supported)")));
            }
        }
        let experts = match take("num_experts") {
            Some(v) => Some(v),
            None => take("num_local_experts"),
        };
        let num_experts = int(experts, "num_experts", None)?;
        let k = int(take("num_experts_per_tok"), "num_experts_per_tok", None)?;
        let width = int(take("moe_intermediate_size"), "moe_intermediate_size", None)?;
        let sparse_step = int(take("decoder_sparse_step"), "decoder_sparse_step", Some(1))?;
        let shared = take("shared_expert_intermediate_size");
        let norm_topk_prob = take("norm_topk_prob").and_then(|v| v.as_bool()).unwrap_or(false);
        let aux = take("router_aux_loss_coef").and_then(|v| v.as_f64()).unwrap_or(0.001);
        let dense_layers = match take("mlp_only_layers") {
            None => Vec::new(),
            Some(v) => serde_json::from_value::<Vec<i64>>(v.clone())
                .map_err(|_| unsupported(path, format!("field `mlp_only_layers`: expected a list of layer indices, got {v}")))?,
        };
        let qkv_bias = take("qkv_bias").and_then(|v| v.as_bool());
        for ignored in ["sliding_window", "max_window_layers", "output_router_logits"] {
            take(ignored);
        }
        let mut cfg = Llama.config_from_json(value, path)?;
        cfg.model_type = model_type;
        let shared_expert = match model_type {
            ModelType::Qwen2Moe => {
                let width = int(shared, "shared_expert_intermediate_size", None)?;
                cfg.attention_bias = qkv_bias.unwrap_or(true);
                cfg.attention_out_bias = cfg.attention_bias.then_some(false);
                Some(SharedExpertConfig { intermediate_size: width, gate: true })
            }
            _ => {
                cfg.qk_norm = true;
                None
            }
        };
        let router = RouterKind::TopK { k, norm_topk_prob, gate: Gate::Softmax };
        cfg.moe = Some(MoeConfig {
            aux_loss_coef: aux,
            expert_intermediate_size: Some(width),
            shared_expert,
            sparse_step,
            dense_layers,
            ..MoeConfig::new(num_experts, router)
        });
        Ok(cfg)
    }

    fn config_to_json(&self, c: &ModelConfig) -> Value {
        let plain = ModelConfig { model_type: ModelType::Llama, moe: None, qk_norm: false, attention_out_bias: None, ..c.clone() };
        let mut v = Llama.config_to_json(&plain);
        let o = v.as_object_mut().expect("json! object");
        let moe = c.moe.as_ref().expect("validated: qwen MoE models have a [moe] table");
        let RouterKind::TopK { k, norm_topk_prob, .. } = moe.router else { unreachable!("validated: a top-k router") };
        for gone in ["attention_bias", "mlp_bias"] {
            o.remove(gone);
        }
        let (name, arch) = match c.model_type {
            ModelType::Qwen2Moe => ("qwen2_moe", "Qwen2MoeForCausalLM"),
            _ => ("qwen3_moe", "Qwen3MoeForCausalLM"),
        };
        o.insert("architectures".into(), json!([arch]));
        o.insert("model_type".into(), json!(name));
        match &moe.shared_expert {
            Some(shared) => {
                o.insert("qkv_bias".into(), json!(c.attention_bias));
                o.insert("shared_expert_intermediate_size".into(), json!(shared.intermediate_size));
            }
            None => {
                o.insert("attention_bias".into(), json!(c.attention_bias));
            }
        }
        o.insert("use_sliding_window".into(), json!(false));
        o.insert("num_experts".into(), json!(moe.num_experts));
        o.insert("num_experts_per_tok".into(), json!(k));
        o.insert("norm_topk_prob".into(), json!(norm_topk_prob));
        o.insert("moe_intermediate_size".into(), json!(moe.expert_intermediate_size.unwrap_or(c.intermediate_size)));
        o.insert("decoder_sparse_step".into(), json!(moe.sparse_step));
        o.insert("mlp_only_layers".into(), json!(moe.dense_layers));
        o.insert("router_aux_loss_coef".into(), json!(moe.aux_loss_coef));
        v
    }

    fn export_mismatch(&self, c: &ModelConfig) -> Option<String> {
        let qwen2 = self.model_type == ModelType::Qwen2Moe;
        checks::no_doge_parts(c)
            .or_else(|| moe_mismatch(c, qwen2))
            .or_else(|| checks::whole_heads(c))
            .or_else(|| if qwen2 { checks::no_qk_norm(c) } else { None })
            .or_else(|| if qwen2 { None } else { checks::o_bias_follows(c) })
            .or_else(|| {
                let ok = c.norm == NormKind::RmsNorm
                    && c.position == PositionKind::Rope
                    && c.mlp == MlpKind::Gated
                    && c.hidden_act == Activation::Silu
                    && !c.mlp_bias
                    && c.all_dense();
                let attention = if qwen2 { !c.qk_norm && !c.o_proj_bias() } else { c.qk_norm };
                match (ok, attention) {
                    (false, _) => Some("qwen MoE models need rms_norm, rope, a gated silu MLP without biases and dense attention".into()),
                    (true, false) if qwen2 => {
                        Some("qwen2_moe biases q, k and v together (attention_bias) and never o (attention_out_bias = false), without qk_norm".into())
                    }
                    (true, false) => Some("qwen3_moe has per-head q/k norms (qk_norm = true)".into()),
                    (true, true) => None,
                }
            })
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

/// Why `c`'s `moe` table is not this Qwen MoE's (`qwen2`: Qwen2-MoE, else Qwen3-MoE), if it is not.
fn moe_mismatch(c: &ModelConfig, qwen2: bool) -> Option<String> {
    let moe = c.moe.as_ref();
    let top_k_softmax = matches!(moe.map(|m| &m.router), Some(RouterKind::TopK { gate: Gate::Softmax, .. }));
    let shared = moe.and_then(|m| m.shared_expert.as_ref());
    if !top_k_softmax {
        Some("qwen MoE models need a `[moe]` table with a top-k softmax router".into())
    } else if qwen2 && !shared.is_some_and(|s| s.gate) {
        Some("qwen2_moe has a shared expert with a sigmoid gate (moe.shared_expert = { intermediate_size = N, gate = true })".into())
    } else if !qwen2 && shared.is_some() {
        Some("qwen3_moe has no shared expert".into())
    } else {
        None
    }
}
