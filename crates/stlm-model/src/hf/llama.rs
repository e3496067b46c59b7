//! Llama (`LlamaForCausalLM`): stlm's own weight names, RMSNorm, RoPE and a gated MLP; the base
//! of Mistral, Mixtral, the Qwen MoEs and Doge. Proved against transformers by
//! `tests/tests/hf_parity.rs`.

use super::{activation, activation_json, checks, ids, parse, rope_parameters_json, unsupported, Family};
use crate::config::{MlpKind, ModelConfig, ModelType, NormKind, PositionKind};
use crate::Result;
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::Path;
use stlm_attention::RopeScaling;

/// `LlamaForCausalLM`.
pub(super) struct Llama;

impl Family for Llama {
    fn model_type(&self) -> ModelType {
        ModelType::Llama
    }

    fn name(&self) -> &'static str {
        "llama"
    }

    fn config_from_json(&self, value: Value, path: &Path) -> Result<ModelConfig> {
        llama_config(parse(value, path)?, path)
    }

    fn config_to_json(&self, c: &ModelConfig) -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim(),
            "hidden_act": activation_json(c, false),
            "max_position_embeddings": c.max_position_embeddings,
            "rms_norm_eps": c.norm_eps,
            "rope_parameters": rope_parameters_json(c),
            "attention_bias": c.attention_bias,
            "mlp_bias": c.mlp_bias,
            "tie_word_embeddings": c.tie_word_embeddings,
            "initializer_range": c.initializer_range,
        })
    }

    fn export_mismatch(&self, c: &ModelConfig) -> Option<String> {
        checks::no_doge_parts(c)
            .or_else(|| checks::no_moe(c))
            .or_else(|| checks::whole_heads(c))
            .or_else(|| checks::no_qk_norm(c))
            .or_else(|| checks::o_bias_follows(c))
            .or_else(|| layout_mismatch(c, true))
    }
}

/// Llama's (and Mistral's and Mixtral's) layout; `biases`: whether attention and MLP biases are
/// allowed (Llama only).
pub(super) fn layout_mismatch(c: &ModelConfig, biases: bool) -> Option<String> {
    let ok = c.norm == NormKind::RmsNorm && c.position == PositionKind::Rope && c.mlp == MlpKind::Gated;
    if !ok {
        Some("llama and mistral need norm = rms_norm, position = rope, mlp = gated".into())
    } else if !biases && (c.attention_bias || c.mlp_bias) {
        Some("mistral has no biases".into())
    } else {
        None
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct LlamaHf {
    model_type: String,
    vocab_size: i64,
    hidden_size: i64,
    intermediate_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    hidden_act: Option<String>,
    max_position_embeddings: Option<i64>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    attention_bias: Option<bool>,
    attention_dropout: Option<f64>,
    mlp_bias: Option<bool>,
    pretraining_tp: Option<i64>,
    tie_word_embeddings: Option<bool>,
    initializer_range: Option<f64>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    pad_token_id: Option<Value>,
    use_cache: Option<bool>,
    architectures: Option<Vec<String>>,
    transformers_version: Option<String>,
    dtype: Option<String>,
    torch_dtype: Option<String>,
    #[serde(rename = "_name_or_path")]
    name_or_path: Option<String>,
}

/// `rope_theta` and the scaling of a Llama `config.json`: `rope_parameters` (transformers 5), or
/// `rope_theta` with the older `rope_scaling` (whose `type` is `rope_type`).
fn rope_from_hf(c: &LlamaHf, path: &Path) -> Result<(f64, Option<RopeScaling>)> {
    let (field, mut params) = match (&c.rope_parameters, &c.rope_scaling) {
        (Some(p), _) if !p.is_null() => ("rope_parameters", p.clone()),
        (_, Some(s)) if !s.is_null() => ("rope_scaling", s.clone()),
        _ => return Ok((c.rope_theta.unwrap_or(10000.0), None)),
    };
    let Some(map) = params.as_object_mut() else {
        return Err(unsupported(path, format!("field `{field}`: expected an object, got {params}")));
    };
    if let Some(t) = map.remove("type") {
        map.entry("rope_type").or_insert(t);
    }
    let theta = match map.remove("rope_theta") {
        Some(t) => t.as_f64().ok_or_else(|| unsupported(path, format!("field `{field}.rope_theta`: expected a number, got {t}")))?,
        None => c.rope_theta.unwrap_or(10000.0),
    };
    if let Some(f) = map.remove("partial_rotary_factor").filter(|f| f.as_f64() != Some(1.0)) {
        return Err(unsupported(path, format!("field `{field}.partial_rotary_factor`: {f} (Llama rotates whole heads)")));
    }
    if map.get("rope_type").and_then(Value::as_str) == Some("default") {
        map.remove("rope_type");
        return match map.keys().next() {
            Some(k) => Err(unsupported(path, format!("field `{field}.{k}`: unknown for the default rope type"))),
            None => Ok((theta, None)),
        };
    }
    let scaling: RopeScaling = serde_json::from_value(params.clone())
        .map_err(|e| unsupported(path, format!("field `{field}`: {e} (supported rope types: default, linear, dynamic, yarn, llama3)")))?;
    scaling.validate().map_err(|e| unsupported(path, format!("field `{field}`: {e}")))?;
    Ok((theta, Some(scaling)))
}

fn llama_config(c: LlamaHf, path: &Path) -> Result<ModelConfig> {
    let (rope_theta, rope_scaling) = rope_from_hf(&c, path)?;
    if c.pretraining_tp.is_some_and(|tp| tp != 1) {
        return Err(unsupported(path, "field `pretraining_tp`: only 1 is supported".into()));
    }
    Ok(ModelConfig {
        model_type: ModelType::Llama,
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        num_hidden_layers: c.num_hidden_layers,
        num_attention_heads: c.num_attention_heads,
        num_key_value_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
        head_dim: c.head_dim.filter(|&d| d * c.num_attention_heads != c.hidden_size),
        max_position_embeddings: c.max_position_embeddings.unwrap_or(2048),
        norm: NormKind::RmsNorm,
        norm_eps: c.rms_norm_eps.unwrap_or(1e-6),
        position: PositionKind::Rope,
        rope_theta,
        rope_scaling,
        partial_rotary_factor: 1.0,
        residual_scales: false,
        cdmoe: None,
        moe: None,
        bytes: None,
        layer_sharing: None,
        layer_shapes: None,
        residual_root: None,
        mlp: MlpKind::Gated,
        hidden_act: activation(c.hidden_act.as_deref().unwrap_or("silu"), "hidden_act", path)?,
        attention_bias: c.attention_bias.unwrap_or(false),
        attention_out_bias: None,
        qk_norm: false,
        mlp_bias: c.mlp_bias.unwrap_or(false),
        tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
        initializer_range: c.initializer_range.unwrap_or(0.02),
        bos_token_id: ids(&c.bos_token_id, "bos_token_id", path)?.first().copied(),
        eos_token_id: ids(&c.eos_token_id, "eos_token_id", path)?,
        pad_token_id: ids(&c.pad_token_id, "pad_token_id", path)?.first().copied(),
        attention: Vec::new(),
    })
}

