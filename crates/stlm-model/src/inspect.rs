//! Parameter counts of a model by module and by kind of sub-layer (`stlm inspect`), read from
//! the layer walk: each tensor counted once, where the model stores it.

use crate::layers::DecoderLayer;
use crate::DecoderModel;
use serde::Serialize;
use stlm_core::module::count_by_role;
use stlm_core::{Layer, Role};

/// The parameters of one module of a model, split by kind of sub-layer.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct ModuleCount {
    /// The module's saved name (`model.layers.3`, `model.embed_tokens`, `lm_head`, `model` for
    /// the remaining top-level tensors).
    pub name: String,
    /// Self-attention (projections, q/k norms, what the attention kind learns).
    pub attention: i64,
    /// The feed-forward block (dense or experts), unless it is another block's.
    pub mlp: i64,
    /// The block's norms.
    pub norms: i64,
    /// Everything else (tables, heads, width projections, residual scales).
    pub other: i64,
    /// The sum.
    pub total: i64,
}

/// Everything a layer stores.
fn stored(layer: &dyn Layer) -> i64 {
    count_by_role(layer, |_| true)
}

impl ModuleCount {
    fn other(name: &str, n: i64) -> Self {
        ModuleCount { name: name.into(), other: n, total: n, ..Default::default() }
    }

    fn block(name: String, l: &DecoderLayer) -> Self {
        let attention = stored(&l.self_attn);
        let mlp = if l.mlp_tied { 0 } else { stored(&l.mlp) };
        let norms = stored(&l.input_layernorm) + stored(&l.post_attention_layernorm);
        let total = stored(l);
        ModuleCount { name, attention, mlp, norms, other: total - attention - mlp - norms, total }
    }
}

/// The modules of `model` in order: embeddings, each stored block, the final norm, the head,
/// the other top-level tensors (residual root, LoRA deltas, width projection) as `model`.
pub fn module_counts(model: &DecoderModel) -> Vec<ModuleCount> {
    let mut rows = Vec::new();
    if let Some(p) = &model.embed_positions {
        rows.push(ModuleCount::other("model.embed_positions", p.numel() as i64));
    }
    rows.push(ModuleCount::other("model.embed_tokens", model.embed_tokens.numel() as i64));
    rows.extend(model.layers.iter().enumerate().map(|(j, l)| ModuleCount::block(format!("model.layers.{j}"), l)));
    let norm = stored(&model.norm);
    rows.push(ModuleCount { name: "model.norm".into(), norms: norm, total: norm, ..Default::default() });
    if let Some(head) = &model.lm_head {
        rows.push(ModuleCount::other("lm_head", stored(head)));
    }
    let rest = model.residual_root.as_ref().map_or(0, |r| stored(r))
        + model.lora.iter().map(|l| stored(l)).sum::<i64>()
        + model.out_proj.as_ref().map_or(0, |p| stored(p));
    if rest > 0 {
        rows.push(ModuleCount::other("model", rest));
    }
    rows
}

/// Parameters in lookup tables and the output head (what "non-embedding parameters" leave out).
pub fn embedding_parameters(model: &DecoderModel) -> i64 {
    count_by_role(model, |r| r == Role::Embedding) + model.lm_head.as_ref().map_or(0, |h| stored(h))
}
