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

/// What `stlm inspect` reports: parameter counts overall, in embeddings and head, and by module.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Every stored parameter.
    pub parameters: i64,
    /// In the embeddings and the head.
    pub embedding_parameters: i64,
    /// The rest.
    pub non_embedding_parameters: i64,
    /// In quantized blocks, by format (`q8_0`), with the number of matrices; empty for a float model.
    pub quantized: std::collections::BTreeMap<String, (i64, usize)>,
    /// The model's config.
    pub config: crate::ModelConfig,
    /// By module.
    pub modules: Vec<ModuleCount>,
}

/// The report of `model`.
pub fn report(model: &DecoderModel) -> Report {
    let (total, embedding) = (model.num_parameters(), embedding_parameters(model));
    let mut quantized = std::collections::BTreeMap::new();
    for m in model.quantized_weights().into_values() {
        let (rows, cols) = m.shape();
        let entry: &mut (i64, usize) = quantized.entry(m.format().name().to_string()).or_default();
        *entry = (entry.0 + (rows * cols) as i64, entry.1 + 1);
    }
    Report { parameters: total, embedding_parameters: embedding, non_embedding_parameters: total - embedding, quantized, config: model.config.clone(), modules: module_counts(model) }
}

impl Report {
    /// The report as text: the shape, the counts, and a table by module.
    pub fn table(&self) -> String {
        let c = &self.config;
        let mut s = format!(
            "{:?}, {} layers, hidden {}, heads {} (kv {}), head_dim {}, ffn {} ({:?}, {:?}), vocab {}, {:?} positions, {:?}, tied head: {}\n",
            c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim(), c.intermediate_size, c.mlp, c.hidden_act, c.vocab_size, c.position, c.norm, c.tie_word_embeddings
        );
        let (total, embedding) = (self.parameters, self.embedding_parameters);
        s += &format!("parameters: {} total, {} in embeddings and head, {} in the rest\n", group(total), group(embedding), group(total - embedding));
        for (format, (n, matrices)) in &self.quantized {
            s += &format!("quantized: {} parameters in {format} blocks ({matrices} matrices), the rest in float\n", group(*n));
        }
        s += &format!("{:<24} {:>12} {:>12} {:>10} {:>12} {:>12}\n", "module", "attention", "mlp", "norms", "other", "total");
        for r in &self.modules {
            s += &format!("{:<24} {:>12} {:>12} {:>10} {:>12} {:>12}\n", r.name, group(r.attention), group(r.mlp), group(r.norms), group(r.other), group(r.total));
        }
        s
    }
}

/// 1234567 -> "1,234,567".
pub fn group(n: i64) -> String {
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}
