//! Hugging Face `config.json` and weight names <-> stlm, for Llama, Mistral, Mixtral, Qwen2-MoE,
//! Qwen3-MoE, Doge and GPT-2.
//!
//! Each transformers architecture is one file here implementing [`Family`], listed once in
//! [`FAMILIES`]; this module holds what they share and the four entry points. Llama weights
//! already use stlm's names. GPT-2 stores `Conv1D` weights as `[in, out]` and fuses q, k and v
//! into `c_attn`; they are transposed and split on import, and joined back on export. Every
//! config field transformers writes is either understood or refused by name.

mod doge;
mod gpt2;
mod llama;
mod mistral;
mod mixtral;
mod qwen_moe;
mod stlm;

use crate::config::{Activation, ModelConfig, ModelType};
use crate::{ModelError, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use tch::Tensor;

/// Model types stlm loads from `config.json` (the names of [`FAMILIES`], in order).
pub const KNOWN_MODEL_TYPES: &[&str] = &["llama", "mistral", "mixtral", "qwen2_moe", "qwen3_moe", "doge", "gpt2", "stlm"];

/// One transformers architecture: its `config.json`, what cannot be exported as it and why, and
/// its weight names.
pub(crate) trait Family: Sync {
    /// The [`ModelType`] this family loads and saves.
    fn model_type(&self) -> ModelType;
    /// transformers' `model_type` string.
    fn name(&self) -> &'static str;
    /// The `ModelConfig` of a `config.json` of this type (before the shared id clean-up and
    /// validation).
    fn config_from_json(&self, value: Value, path: &Path) -> Result<ModelConfig>;
    /// The `config.json` transformers reads (special-token ids and dtype are added by
    /// [`config_to_json`]).
    fn config_to_json(&self, c: &ModelConfig) -> Value;
    /// Why `c` cannot be saved as this type, if it cannot (checked after
    /// [`ModelConfig::mistral_window`]).
    fn export_mismatch(&self, _c: &ModelConfig) -> Option<String> {
        None
    }
    /// Checkpoint tensors (ignored buffers already removed) -> stlm names (default: unchanged).
    fn import_weights(
        &self,
        _cfg: &ModelConfig,
        tensors: HashMap<String, Tensor>,
        _path: &Path,
    ) -> Result<HashMap<String, Tensor>> {
        Ok(tensors)
    }
    /// stlm names -> checkpoint names, in any order (default: unchanged).
    fn export_weights(&self, _cfg: &ModelConfig, vars: &HashMap<String, Tensor>) -> Vec<(String, Tensor)> {
        vars.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }
}

/// Every family, in the order of [`KNOWN_MODEL_TYPES`].
static FAMILIES: [&dyn Family; 8] = [
    &llama::Llama,
    &mistral::Mistral,
    &mixtral::Mixtral,
    &qwen_moe::QWEN2_MOE,
    &qwen_moe::QWEN3_MOE,
    &doge::Doge,
    &gpt2::Gpt2,
    &stlm::Stlm,
];

/// The family of `model_type`.
pub(crate) fn family(model_type: ModelType) -> &'static dyn Family {
    *FAMILIES.iter().find(|f| f.model_type() == model_type).expect("every ModelType has a family in FAMILIES")
}

/// The family whose transformers `model_type` is `name`.
fn family_named(name: &str) -> Option<&'static dyn Family> {
    FAMILIES.iter().find(|f| f.name() == name).copied()
}

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
        "relu2" => Ok(Activation::Relu2),
        _ => Err(unsupported(
            path,
            format!(
                "field `{field}`: activation `{name}` is not supported (silu, swish, gelu, gelu_new, gelu_pytorch_tanh, relu, relu2)"
            ),
        )),
    }
}

/// The transformers name of `c`'s activation (GPT-2 calls the tanh GELU `gelu_new`).
fn activation_json(c: &ModelConfig, gpt2: bool) -> &'static str {
    match c.hidden_act {
        Activation::Silu => "silu",
        Activation::Gelu => "gelu",
        Activation::GeluTanh if gpt2 => "gelu_new",
        Activation::GeluTanh => "gelu_pytorch_tanh",
        Activation::Relu => "relu",
        Activation::Relu2 => "relu2",
    }
}

/// Reads a `config.json` of a known `model_type` into a [`ModelConfig`].
pub fn config_from_json(value: Value, path: &Path) -> Result<ModelConfig> {
    let model_type = match value.get("model_type") {
        Some(Value::String(s)) => s.clone(),
        Some(v) => return Err(ModelError::config(path, format!("field `model_type`: expected a string, got {v}"))),
        None => return Err(ModelError::config(path, "missing field `model_type`")),
    };
    let Some(family) = family_named(&model_type) else {
        return Err(unsupported(
            path,
            format!("field `model_type`: `{model_type}` is not supported (known: {})", KNOWN_MODEL_TYPES.join(", ")),
        ));
    };
    let cfg = family.config_from_json(value, path)?;
    let cfg = drop_ids_outside_vocab(cfg);
    cfg.validate(path)?;
    check_export(&cfg, path)?;
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

/// The `config.json` transformers reads for this config (of its `model_type`).
pub fn config_to_json(c: &ModelConfig, dtype: &str) -> Value {
    let mut v = family(c.model_type).config_to_json(c);
    if c.model_type != ModelType::Stlm {
        let o = v.as_object_mut().expect("json! object");
        o.insert("bos_token_id".into(), c.bos_token_id.map_or(Value::Null, |i| json!(i)));
        o.insert("eos_token_id".into(), ids_json(&c.eos_token_id));
        o.insert("pad_token_id".into(), c.pad_token_id.map_or(Value::Null, |i| json!(i)));
        o.insert("dtype".into(), json!(dtype));
    }
    v
}

/// Checks every family but doge makes, in the order the families chain them.
mod checks {
    use crate::config::ModelConfig;

    /// Doge's parts on another family.
    pub(super) fn no_doge_parts(c: &ModelConfig) -> Option<String> {
        (c.cdmoe.is_some() || c.residual_scales).then(|| "cdmoe and residual_scales exist only in doge".into())
    }

    /// A mixture of experts on a family without one.
    pub(super) fn no_moe(c: &ModelConfig) -> Option<String> {
        c.moe.is_some().then(|| {
            "it has no mixture of experts (a top-k MoE exports as mixtral, qwen2_moe or qwen3_moe)".into()
        })
    }

    /// Partial rotary embeddings.
    pub(super) fn whole_heads(c: &ModelConfig) -> Option<String> {
        (c.partial_rotary_factor != 1.0).then(|| "it rotates whole heads (partial_rotary_factor = 1)".into())
    }

    /// q/k norms on a family without them.
    pub(super) fn no_qk_norm(c: &ModelConfig) -> Option<String> {
        c.qk_norm.then(|| "it has no q/k norms (qk_norm = true exports as qwen3_moe)".into())
    }

    /// An o_proj bias that differs from the q, k and v biases.
    pub(super) fn o_bias_follows(c: &ModelConfig) -> Option<String> {
        c.attention_out_bias
            .is_some_and(|o| o != c.attention_bias)
            .then(|| "its o_proj bias follows attention_bias (remove attention_out_bias)".into())
    }
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
    let tensors = tensors.into_iter().filter(|(n, _)| !is_ignored_buffer(n)).collect();
    family(cfg.model_type).import_weights(cfg, tensors, path)
}

/// Names (and for GPT-2 layouts) under which transformers expects each stlm weight.
pub fn export_weights(cfg: &ModelConfig, vars: &HashMap<String, Tensor>) -> Vec<(String, Tensor)> {
    let mut out = family(cfg.model_type).export_weights(cfg, vars);
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
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

/// Per-expert checkpoint tensors (Mixtral: `block_sparse_moe.gate.weight`,
/// `block_sparse_moe.experts.{j}.w1|w2|w3.weight`; Qwen-MoE: `mlp.experts.{j}.gate_proj|up_proj|
/// down_proj.weight`) to stlm's stacked experts (`mlp.gate.weight`, `mlp.experts.gate_up_proj`
/// `[E, 2I, H]`, `mlp.experts.down_proj` `[E, H, I]`, the layout transformers uses in memory);
/// stacked names pass through. A layer with a different number of experts than the config is an
/// error naming the tensor.
fn stack_experts(
    cfg: &ModelConfig,
    mut tensors: HashMap<String, Tensor>,
    path: &Path,
    layout: &ExpertLayout,
) -> Result<HashMap<String, Tensor>> {
    let Some(moe) = &cfg.moe else {
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

/// Why this config cannot be saved as its `model_type` in transformers, if it cannot: the
/// attention [`ModelConfig::mistral_window`] refuses, then the family's own checks (in
/// `hf/<family>.rs`).
pub fn export_mismatch(c: &ModelConfig) -> Option<String> {
    if let Err(e) = c.mistral_window() {
        return Some(e);
    }
    if c.shares_layers() && c.model_type != ModelType::Stlm {
        return Some("shared layers (`layer_sharing`) have no counterpart there: it holds one copy of the weights per layer".into());
    }
    if c.layer_shapes.is_some() && c.model_type != ModelType::Stlm {
        return Some("per-layer shapes (`layer_shapes`) have no counterpart there: every layer has the same width and heads".into());
    }
    if c.residual_root.is_some() && c.model_type != ModelType::Stlm {
        return Some("a learned residual root (`residual_root`) has no counterpart there: the stream starts from the embedding".into());
    }
    family(c.model_type).export_mismatch(c)
}

/// Refuses a config that cannot be saved as its `model_type` (see [`export_mismatch`]); the
/// error names `path` (the config file, or the directory being written) and the field.
pub fn check_export(c: &ModelConfig, path: &Path) -> Result<()> {
    match export_mismatch(c) {
        Some(reason) => Err(ModelError::config(
            path,
            format!("field `model_type`: cannot be {:?}: {reason}; use model_type = \"stlm\"", c.model_type),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_matches_known_model_types() {
        let names: Vec<&str> = FAMILIES.iter().map(|f| f.name()).collect();
        assert_eq!(names, KNOWN_MODEL_TYPES);
        for f in FAMILIES {
            assert_eq!(serde_json::to_value(f.model_type()).unwrap(), json!(f.name()));
            assert_eq!(family(f.model_type()).name(), f.name());
        }
    }
}
