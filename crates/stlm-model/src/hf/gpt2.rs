//! GPT-2 (`GPT2LMHeadModel`): LayerNorm, learned positions, a plain MLP and `Conv1D` weights
//! stored `[in, out]` with q, k and v fused into `c_attn`, transposed and split on import and
//! joined back on export. Proved against transformers by `tests/tests/hf_parity.rs`.

use super::{activation, activation_json, checks, ids, parse, unsupported, Family};
use crate::config::{MlpKind, ModelConfig, ModelType, NormKind, PositionKind};
use crate::{ModelError, Result};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use tch::Tensor;

/// `GPT2LMHeadModel`.
pub(super) struct Gpt2;

impl Family for Gpt2 {
    fn model_type(&self) -> ModelType {
        ModelType::Gpt2
    }

    fn name(&self) -> &'static str {
        "gpt2"
    }

    fn config_from_json(&self, value: Value, path: &Path) -> Result<ModelConfig> {
        gpt2_config(parse(value, path)?, path)
    }

    fn config_to_json(&self, c: &ModelConfig) -> Value {
        json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": c.vocab_size,
            "n_embd": c.hidden_size,
            "n_head": c.num_attention_heads,
            "n_layer": c.num_hidden_layers,
            "n_positions": c.max_position_embeddings,
            "n_inner": c.intermediate_size,
            "activation_function": activation_json(c, true),
            "layer_norm_epsilon": c.norm_eps,
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
            .or_else(|| {
                let ok = c.norm == NormKind::LayerNorm
                    && c.position == PositionKind::Learned
                    && c.mlp == MlpKind::Plain
                    && c.attention_bias
                    && c.mlp_bias
                    && c.num_key_value_heads == c.num_attention_heads
                    && c.head_dim() * c.num_attention_heads == c.hidden_size;
                (!ok).then(|| "gpt2 needs layer_norm, learned positions, a plain mlp, biases, multi-head attention and head_dim = hidden_size / heads".into())
            })
    }

    fn import_weights(
        &self,
        cfg: &ModelConfig,
        tensors: HashMap<String, Tensor>,
        path: &Path,
    ) -> Result<HashMap<String, Tensor>> {
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

    fn export_weights(&self, cfg: &ModelConfig, vars: &HashMap<String, Tensor>) -> Vec<(String, Tensor)> {
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
    }
}

/// GPT-2's Conv1D stores `[in, out]`; stlm's linear stores `[out, in]` (and back).
fn conv1d(t: Tensor, param: &str) -> Tensor {
    if param == "weight" {
        t.tr().contiguous()
    } else {
        t
    }
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
        layer_sharing: None,
        layer_shapes: None,
        residual_root: None,
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

