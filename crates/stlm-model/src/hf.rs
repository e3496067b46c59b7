//! Hugging Face `config.json` and weight names <-> stlm, for Llama, Mistral, Mixtral, Qwen2-MoE,
//! Qwen3-MoE, Doge and GPT-2.
//!
//! Llama weights already use stlm's names. GPT-2 stores `Conv1D` weights as `[in, out]` and fuses
//! q, k and v into `c_attn`; they are transposed and split here on import, and joined back on
//! export. Every config field transformers writes is either understood or refused by name.

use crate::config::{Activation, MlpKind, ModelConfig, ModelType, NormKind, PositionKind};
use crate::{ModelError, Result};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use stlm_attention::{AttentionKind, RopeScaling};
use stlm_moe::{CdmoeConfig, CdmoeRouting, Gate, MoeConfig, RouterKind, SharedExpertConfig};
use tch::Tensor;

/// Model types stlm loads from `config.json`.
pub const KNOWN_MODEL_TYPES: &[&str] = &["llama", "mistral", "mixtral", "qwen2_moe", "qwen3_moe", "doge", "gpt2", "stlm"];

fn parse<T: serde::de::DeserializeOwned>(value: Value, path: &Path) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        ModelError::config(path, format!("field `{field}`: {}", e.inner()))
    })
}

/// Token ids written as a number, a list, or null.
fn ids(value: &Option<Value>, field: &str, path: &Path) -> Result<Vec<i64>> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Number(n)) => n.as_i64().map(|i| vec![i]).ok_or_else(|| bad_id(field, path)),
        Some(Value::Array(a)) => a.iter().map(|v| v.as_i64().ok_or_else(|| bad_id(field, path))).collect(),
        Some(_) => Err(bad_id(field, path)),
    }
}

fn bad_id(field: &str, path: &Path) -> ModelError {
    ModelError::config(path, format!("field `{field}`: expected a token id, a list of ids or null"))
}

fn unsupported(path: &Path, message: String) -> ModelError {
    ModelError::Unsupported { path: path.to_path_buf(), message }
}

fn activation(name: &str, field: &str, path: &Path) -> Result<Activation> {
    match name {
        "silu" | "swish" => Ok(Activation::Silu),
        "gelu" => Ok(Activation::Gelu),
        "gelu_new" | "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
        "relu" => Ok(Activation::Relu),
        _ => Err(unsupported(
            path,
            format!(
                "field `{field}`: activation `{name}` is not supported (silu, gelu, gelu_new, gelu_pytorch_tanh, relu)"
            ),
        )),
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Gpt2Hf {
    model_type: String,
    vocab_size: i64,
    n_embd: i64,
    n_head: i64,
    n_layer: i64,
    n_positions: i64,
    n_ctx: Option<i64>,
    n_inner: Option<i64>,
    activation_function: Option<String>,
    layer_norm_epsilon: Option<f64>,
    initializer_range: Option<f64>,
    scale_attn_weights: Option<bool>,
    scale_attn_by_inverse_layer_idx: Option<bool>,
    reorder_and_upcast_attn: Option<bool>,
    add_cross_attention: Option<bool>,
    attn_pdrop: Option<f64>,
    embd_pdrop: Option<f64>,
    resid_pdrop: Option<f64>,
    summary_activation: Option<Value>,
    summary_first_dropout: Option<f64>,
    summary_proj_to_labels: Option<bool>,
    summary_type: Option<String>,
    summary_use_proj: Option<bool>,
    task_specific_params: Option<Value>,
    tie_word_embeddings: Option<bool>,
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

/// Reads a `config.json` of a known `model_type` into a [`ModelConfig`].
pub fn config_from_json(value: Value, path: &Path) -> Result<ModelConfig> {
    let model_type = match value.get("model_type") {
        Some(Value::String(s)) => s.clone(),
        Some(v) => return Err(ModelError::config(path, format!("field `model_type`: expected a string, got {v}"))),
        None => return Err(ModelError::config(path, "missing field `model_type`")),
    };
    let cfg = match model_type.as_str() {
        "llama" => llama_config(parse(value, path)?, path)?,
        "mistral" => mistral_config(value, path)?,
        "mixtral" => mixtral_config(value, path)?,
        "qwen2_moe" => qwen_moe_config(value, path, ModelType::Qwen2Moe)?,
        "qwen3_moe" => qwen_moe_config(value, path, ModelType::Qwen3Moe)?,
        "doge" => doge_config(value, path)?,
        "gpt2" => gpt2_config(parse(value, path)?, path)?,
        "stlm" => parse(value, path)?,
        other => {
            return Err(unsupported(
                path,
                format!("field `model_type`: `{other}` is not supported (known: {})", KNOWN_MODEL_TYPES.join(", ")),
            ))
        }
    };
    let cfg = drop_ids_outside_vocab(cfg);
    cfg.validate(path)?;
    Ok(cfg)
}

/// transformers accepts special-token ids outside the vocabulary (GPT2Config's default 50256
/// on a small vocabulary) and only warns; such ids can never be produced, so they are dropped.
fn drop_ids_outside_vocab(mut c: ModelConfig) -> ModelConfig {
    let v = c.vocab_size;
    let inside = |id: &i64| (0..v).contains(id);
    c.bos_token_id = c.bos_token_id.filter(inside);
    c.pad_token_id = c.pad_token_id.filter(inside);
    c.eos_token_id.retain(inside);
    c
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

/// Doge: Llama's fields plus Dynamic Mask Attention (`keep_window_size`) in every layer, residual
/// scales, and the cross-domain MoE when `is_moe` (in transformers' token-mixing routing, so that
/// published checkpoints give their outputs). A non-square `num_experts` loads with a warning.
fn doge_config(mut value: Value, path: &Path) -> Result<ModelConfig> {
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
    let mut cfg = llama_config(parse(value, path)?, path)?;
    cfg.model_type = ModelType::Doge;
    cfg.residual_scales = true;
    cfg.attention = vec![AttentionKind::DogeDma { keep_window_size: keep }];
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

/// Mixtral is Mistral's layout with a top-k mixture of experts in every layer. The router's
/// training-time jitter (`router_jitter_noise`) does not change inference and is not kept.
fn mixtral_config(mut value: Value, path: &Path) -> Result<ModelConfig> {
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
    let mut cfg = mistral_config(value, path)?;
    cfg.model_type = ModelType::Mixtral;
    let router = RouterKind::TopK { k, norm_topk_prob: true, gate: Gate::Softmax };
    cfg.moe = Some(MoeConfig { aux_loss_coef: aux, ..MoeConfig::new(num_experts, router) });
    Ok(cfg)
}

/// Qwen2-MoE and Qwen3-MoE: Llama's layout with fine-grained experts (`moe_intermediate_size`)
/// in the layers `decoder_sparse_step` and `mlp_only_layers` choose, a top-k softmax router
/// (`norm_topk_prob`), and dense MLPs of `intermediate_size` elsewhere. Qwen2-MoE adds a shared
/// expert with a sigmoid gate and biases q, k and v (`qkv_bias`) but not o; Qwen3-MoE normalises
/// each query and key head. Sliding windows (`use_sliding_window`) are refused.
fn qwen_moe_config(mut value: Value, path: &Path, model_type: ModelType) -> Result<ModelConfig> {
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
    let mut cfg = llama_config(parse(value, path)?, path)?;
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

/// Mistral is Llama's layout (without biases) plus `sliding_window` on every layer.
fn mistral_config(mut value: Value, path: &Path) -> Result<ModelConfig> {
    let window = match value.as_object_mut().and_then(|m| m.remove("sliding_window")) {
        None | Some(Value::Null) => None,
        Some(w) => Some(w.as_i64().filter(|&w| w > 0).ok_or_else(|| {
            unsupported(path, format!("field `sliding_window`: expected a positive integer or null, got {w}"))
        })?),
    };
    let mut cfg = llama_config(parse(value, path)?, path)?;
    cfg.model_type = ModelType::Mistral;
    cfg.attention = window.map(|window| AttentionKind::SlidingWindow { window, global_tokens: 0 }).into_iter().collect();
    Ok(cfg)
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

fn gpt2_config(c: Gpt2Hf, path: &Path) -> Result<ModelConfig> {
    if c.scale_attn_weights == Some(false) {
        return Err(unsupported(path, "field `scale_attn_weights`: only true is supported".into()));
    }
    if c.scale_attn_by_inverse_layer_idx == Some(true) {
        return Err(unsupported(path, "field `scale_attn_by_inverse_layer_idx`: only false is supported".into()));
    }
    if c.add_cross_attention == Some(true) {
        return Err(unsupported(path, "field `add_cross_attention`: cross-attention is not supported".into()));
    }
    Ok(ModelConfig {
        model_type: ModelType::Gpt2,
        vocab_size: c.vocab_size,
        hidden_size: c.n_embd,
        intermediate_size: c.n_inner.unwrap_or(4 * c.n_embd),
        num_hidden_layers: c.n_layer,
        num_attention_heads: c.n_head,
        num_key_value_heads: c.n_head,
        head_dim: None,
        max_position_embeddings: c.n_positions,
        norm: NormKind::LayerNorm,
        norm_eps: c.layer_norm_epsilon.unwrap_or(1e-5),
        position: PositionKind::Learned,
        rope_theta: 10000.0,
        rope_scaling: None,
        partial_rotary_factor: 1.0,
        residual_scales: false,
        cdmoe: None,
        moe: None,
        bytes: None,
        mlp: MlpKind::Plain,
        hidden_act: activation(c.activation_function.as_deref().unwrap_or("gelu_new"), "activation_function", path)?,
        attention_bias: true,
        attention_out_bias: None,
        qk_norm: false,
        mlp_bias: true,
        tie_word_embeddings: c.tie_word_embeddings.unwrap_or(true),
        initializer_range: c.initializer_range.unwrap_or(0.02),
        bos_token_id: ids(&c.bos_token_id, "bos_token_id", path)?.first().copied(),
        eos_token_id: ids(&c.eos_token_id, "eos_token_id", path)?,
        pad_token_id: ids(&c.pad_token_id, "pad_token_id", path)?.first().copied(),
        attention: Vec::new(),
    })
}

fn ids_json(ids: &[i64]) -> Value {
    match ids {
        [] => Value::Null,
        [one] => json!(one),
        many => json!(many),
    }
}

/// transformers' `rope_parameters`: `rope_theta` and the scaling's `rope_type` and fields.
fn rope_parameters_json(c: &ModelConfig) -> Value {
    let mut v = match &c.rope_scaling {
        Some(s) => serde_json::to_value(s).expect("a RopeScaling always serializes"),
        None => json!({"rope_type": "default"}),
    };
    v["rope_theta"] = json!(c.rope_theta);
    v
}

/// The `config.json` transformers reads for this config (`model_type` llama, gpt2 or stlm).
pub fn config_to_json(c: &ModelConfig, dtype: &str) -> Value {
    let act = |gpt2: bool| match c.hidden_act {
        Activation::Silu => "silu",
        Activation::Gelu => "gelu",
        Activation::GeluTanh if gpt2 => "gelu_new",
        Activation::GeluTanh => "gelu_pytorch_tanh",
        Activation::Relu => "relu",
    };
    let mut v = match c.model_type {
        ModelType::Doge => {
            let plain = ModelConfig {
                model_type: ModelType::Llama,
                attention: Vec::new(),
                residual_scales: false,
                cdmoe: None,
                ..c.clone()
            };
            let mut v = config_to_json(&plain, dtype);
            let o = v.as_object_mut().expect("json! object");
            let keep = match c.layer_attention(0) {
                AttentionKind::DogeDma { keep_window_size } => keep_window_size,
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
            return v;
        }
        ModelType::Mixtral => {
            let mut v = config_to_json(&ModelConfig { model_type: ModelType::Mistral, moe: None, ..c.clone() }, dtype);
            let o = v.as_object_mut().expect("json! object");
            let moe = c.moe.as_ref().expect("validated: mixtral has a [moe] table");
            let RouterKind::TopK { k, .. } = moe.router else { unreachable!("validated: a top-k router") };
            o.insert("architectures".into(), json!(["MixtralForCausalLM"]));
            o.insert("model_type".into(), json!("mixtral"));
            o.insert("num_local_experts".into(), json!(moe.num_experts));
            o.insert("num_experts_per_tok".into(), json!(k));
            o.insert("router_aux_loss_coef".into(), json!(moe.aux_loss_coef));
            o.insert("router_jitter_noise".into(), json!(0.0));
            return v;
        }
        ModelType::Qwen2Moe | ModelType::Qwen3Moe => {
            let plain = ModelConfig { model_type: ModelType::Llama, moe: None, qk_norm: false, attention_out_bias: None, ..c.clone() };
            let mut v = config_to_json(&plain, dtype);
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
            return v;
        }
        ModelType::Mistral => {
            let mut v = config_to_json(&ModelConfig { model_type: ModelType::Llama, attention: Vec::new(), ..c.clone() }, dtype);
            let o = v.as_object_mut().expect("json! object");
            for gone in ["attention_bias", "mlp_bias"] {
                o.remove(gone);
            }
            let window = c.mistral_window().expect("validated on load and build");
            o.insert("architectures".into(), json!(["MistralForCausalLM"]));
            o.insert("model_type".into(), json!("mistral"));
            o.insert("sliding_window".into(), window.map_or(Value::Null, |w| json!(w)));
            return v;
        }
        ModelType::Llama => json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim(),
            "hidden_act": act(false),
            "max_position_embeddings": c.max_position_embeddings,
            "rms_norm_eps": c.norm_eps,
            "rope_parameters": rope_parameters_json(c),
            "attention_bias": c.attention_bias,
            "mlp_bias": c.mlp_bias,
            "tie_word_embeddings": c.tie_word_embeddings,
            "initializer_range": c.initializer_range,
        }),
        ModelType::Gpt2 => json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": c.vocab_size,
            "n_embd": c.hidden_size,
            "n_head": c.num_attention_heads,
            "n_layer": c.num_hidden_layers,
            "n_positions": c.max_position_embeddings,
            "n_inner": c.intermediate_size,
            "activation_function": act(true),
            "layer_norm_epsilon": c.norm_eps,
            "tie_word_embeddings": c.tie_word_embeddings,
            "initializer_range": c.initializer_range,
        }),
        ModelType::Stlm => serde_json::to_value(c).expect("a ModelConfig always serializes"),
    };
    if c.model_type != ModelType::Stlm {
        let o = v.as_object_mut().expect("json! object");
        o.insert("bos_token_id".into(), c.bos_token_id.map_or(Value::Null, |i| json!(i)));
        o.insert("eos_token_id".into(), ids_json(&c.eos_token_id));
        o.insert("pad_token_id".into(), c.pad_token_id.map_or(Value::Null, |i| json!(i)));
        o.insert("dtype".into(), json!(dtype));
    }
    v
}

/// Buffers some checkpoints carry that are not weights.
fn is_ignored_buffer(name: &str) -> bool {
    name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") || name.ends_with("rotary_emb.inv_freq")
}

/// Renames (and for GPT-2 transposes and splits) checkpoint tensors to stlm names.
pub fn import_weights(
    cfg: &ModelConfig,
    tensors: HashMap<String, Tensor>,
    path: &Path,
) -> Result<HashMap<String, Tensor>> {
    let tensors = tensors.into_iter().filter(|(n, _)| !is_ignored_buffer(n));
    if cfg.moe.is_some() {
        return stack_experts(cfg, tensors.collect(), path);
    }
    if cfg.model_type != ModelType::Gpt2 {
        return Ok(tensors.collect());
    }
    let h = cfg.hidden_size;
    let mut out = HashMap::new();
    for (name, t) in tensors {
        let name = name.strip_prefix("transformer.").unwrap_or(&name).to_string();
        let mut put = |n: String, t: Tensor| {
            out.insert(n, t);
        };
        let parts: Vec<&str> = name.split('.').collect();
        match parts.as_slice() {
            ["wte", "weight"] => put("model.embed_tokens.weight".into(), t),
            ["wpe", "weight"] => put("model.embed_positions.weight".into(), t),
            ["ln_f", p] => put(format!("model.norm.{p}"), t),
            ["lm_head", "weight"] => put("lm_head.weight".into(), t),
            ["h", i, "ln_1", p] => put(format!("model.layers.{i}.input_layernorm.{p}"), t),
            ["h", i, "ln_2", p] => put(format!("model.layers.{i}.post_attention_layernorm.{p}"), t),
            ["h", i, "attn", "c_attn", p] => {
                let t = if *p == "weight" { t.tr() } else { t };
                if t.size()[0] != 3 * h {
                    return Err(ModelError::Weights {
                        path: path.to_path_buf(),
                        message: format!(
                            "tensor `{name}` has shape {:?}, config expects {} fused q/k/v rows",
                            t.size(),
                            3 * h
                        ),
                    });
                }
                for (j, proj) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                    put(format!("model.layers.{i}.self_attn.{proj}.{p}"), t.narrow(0, j as i64 * h, h).contiguous());
                }
            }
            ["h", i, "attn", "c_proj", p] => put(format!("model.layers.{i}.self_attn.o_proj.{p}"), conv1d(t, p)),
            ["h", i, "mlp", "c_fc", p] => put(format!("model.layers.{i}.mlp.up_proj.{p}"), conv1d(t, p)),
            ["h", i, "mlp", "c_proj", p] => put(format!("model.layers.{i}.mlp.down_proj.{p}"), conv1d(t, p)),
            _ => put(name.clone(), t),
        }
    }
    Ok(out)
}

/// How a transformers checkpoint names each expert's weights (transformers keeps them stacked in
/// memory, as stlm does, but saves one tensor per expert and projection).
struct ExpertLayout {
    /// The layer's MoE module (`block_sparse_moe` or `mlp`).
    module: &'static str,
    /// Names of the gate, up and down projections of one expert.
    gate: &'static str,
    up: &'static str,
    down: &'static str,
}

/// The per-expert layout of `model_type`, if its checkpoints use one.
fn expert_layout(model_type: ModelType) -> Option<ExpertLayout> {
    match model_type {
        ModelType::Mixtral => Some(ExpertLayout { module: "block_sparse_moe", gate: "w1", up: "w3", down: "w2" }),
        ModelType::Qwen2Moe | ModelType::Qwen3Moe => {
            Some(ExpertLayout { module: "mlp", gate: "gate_proj", up: "up_proj", down: "down_proj" })
        }
        _ => None,
    }
}

/// Per-expert checkpoint tensors (Mixtral: `block_sparse_moe.gate.weight`,
/// `block_sparse_moe.experts.{j}.w1|w2|w3.weight`; Qwen-MoE: `mlp.experts.{j}.gate_proj|up_proj|
/// down_proj.weight`) to stlm's stacked experts (`mlp.gate.weight`, `mlp.experts.gate_up_proj`
/// `[E, 2I, H]`, `mlp.experts.down_proj` `[E, H, I]`, the layout transformers uses in memory);
/// stacked names pass through. A layer with a different number of experts than the config is an
/// error naming the tensor.
fn stack_experts(cfg: &ModelConfig, mut tensors: HashMap<String, Tensor>, path: &Path) -> Result<HashMap<String, Tensor>> {
    let (Some(layout), Some(moe)) = (expert_layout(cfg.model_type), &cfg.moe) else {
        return Ok(tensors);
    };
    let e = moe.num_experts;
    for i in 0..cfg.num_hidden_layers {
        let old = format!("model.layers.{i}.{}", layout.module);
        let new = format!("model.layers.{i}.mlp");
        if let Some(g) = tensors.remove(&format!("{old}.gate.weight")) {
            tensors.insert(format!("{new}.gate.weight"), g);
        }
        if !tensors.contains_key(&format!("{old}.experts.0.{}.weight", layout.gate)) {
            continue;
        }
        let mut take = |j: i64, w: &str| {
            let name = format!("{old}.experts.{j}.{w}.weight");
            tensors.remove(&name).ok_or_else(|| ModelError::Weights {
                path: path.to_path_buf(),
                message: format!("missing tensor `{name}` (the config has {e} experts)"),
            })
        };
        let (mut gate_up, mut down) = (Vec::new(), Vec::new());
        for j in 0..e {
            gate_up.push(Tensor::cat(&[take(j, layout.gate)?, take(j, layout.up)?], 0));
            down.push(take(j, layout.down)?);
        }
        if let Some(extra) = tensors.keys().find(|k| k.starts_with(&format!("{old}.experts."))) {
            return Err(ModelError::Weights {
                path: path.to_path_buf(),
                message: format!("unexpected tensor `{extra}`: the config has {e} experts"),
            });
        }
        tensors.insert(format!("{new}.experts.gate_up_proj"), Tensor::stack(&gate_up, 0));
        tensors.insert(format!("{new}.experts.down_proj"), Tensor::stack(&down, 0));
    }
    Ok(tensors)
}

/// stlm's stacked experts to the per-expert names of `layout`.
fn unstack_experts(vars: &HashMap<String, Tensor>, layout: &ExpertLayout) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for (name, t) in vars {
        let Some((layer, rest)) = name.split_once(".mlp.") else {
            out.push((name.clone(), t.shallow_clone()));
            continue;
        };
        let old = format!("{layer}.{}", layout.module);
        match rest {
            "gate.weight" => out.push((format!("{old}.gate.weight"), t.shallow_clone())),
            "experts.gate_up_proj" => {
                let width = t.size()[1] / 2;
                for j in 0..t.size()[0] {
                    let both = t.get(j);
                    out.push((format!("{old}.experts.{j}.{}.weight", layout.gate), both.narrow(0, 0, width).contiguous()));
                    out.push((format!("{old}.experts.{j}.{}.weight", layout.up), both.narrow(0, width, width).contiguous()));
                }
            }
            "experts.down_proj" => {
                for j in 0..t.size()[0] {
                    out.push((format!("{old}.experts.{j}.{}.weight", layout.down), t.get(j).contiguous()));
                }
            }
            _ => out.push((name.clone(), t.shallow_clone())),
        }
    }
    out
}

/// GPT-2's Conv1D stores `[in, out]`; stlm's linear stores `[out, in]` (and back).
fn conv1d(t: Tensor, param: &str) -> Tensor {
    if param == "weight" {
        t.tr().contiguous()
    } else {
        t
    }
}

/// Names (and for GPT-2 layouts) under which transformers expects each stlm weight.
pub fn export_weights(cfg: &ModelConfig, vars: &HashMap<String, Tensor>) -> Vec<(String, Tensor)> {
    let mut out: Vec<(String, Tensor)> = if let Some(layout) = expert_layout(cfg.model_type) {
        unstack_experts(vars, &layout)
    } else if cfg.model_type != ModelType::Gpt2 {
        vars.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    } else {
        let get = |n: String| vars[&n].shallow_clone();
        let mut out = vec![
            ("transformer.wte.weight".to_string(), get("model.embed_tokens.weight".into())),
            ("transformer.wpe.weight".to_string(), get("model.embed_positions.weight".into())),
            ("transformer.ln_f.weight".to_string(), get("model.norm.weight".into())),
            ("transformer.ln_f.bias".to_string(), get("model.norm.bias".into())),
        ];
        if let Some(head) = vars.get("lm_head.weight") {
            out.push(("lm_head.weight".into(), head.shallow_clone()));
        }
        for i in 0..cfg.num_hidden_layers {
            let l = format!("model.layers.{i}");
            let h = format!("transformer.h.{i}");
            for p in ["weight", "bias"] {
                out.push((format!("{h}.ln_1.{p}"), get(format!("{l}.input_layernorm.{p}"))));
                out.push((format!("{h}.ln_2.{p}"), get(format!("{l}.post_attention_layernorm.{p}"))));
                let qkv = Tensor::cat(
                    &["q_proj", "k_proj", "v_proj"].map(|proj| get(format!("{l}.self_attn.{proj}.{p}"))),
                    0,
                );
                out.push((format!("{h}.attn.c_attn.{p}"), conv1d(qkv, p)));
                out.push((format!("{h}.attn.c_proj.{p}"), conv1d(get(format!("{l}.self_attn.o_proj.{p}")), p)));
                out.push((format!("{h}.mlp.c_fc.{p}"), conv1d(get(format!("{l}.mlp.up_proj.{p}")), p)));
                out.push((format!("{h}.mlp.c_proj.{p}"), conv1d(get(format!("{l}.mlp.down_proj.{p}")), p)));
            }
        }
        out
    };
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}
