//! The layer walk of the blocks (see [`stlm_core::module`]): each lists its sub-layers and
//! parameters with their roles; a sub-layer tied to block 0 goes through `Walk::tied`.

use crate::layers::{DecoderLayer, FeedForward, Linear, Mlp, Norm, SelfAttention};
use crate::weight::Weight;
use stlm_core::{Layer, Role, Walk};

impl Layer for Linear {
    fn visit(&self, walk: &mut Walk<'_>) {
        match &self.weight {
            Weight::Dense(w) => walk.param("weight", w, Role::Matrix),
            Weight::Quantized(q) => walk.param("weight", &q.dense, Role::QuantizedMatrix),
        }
        walk.param_opt("bias", self.bias.as_ref(), Role::Bias);
    }
}

impl Layer for Norm {
    fn visit(&self, walk: &mut Walk<'_>) {
        walk.param("weight", &self.weight, Role::Norm);
        walk.param_opt("bias", self.bias.as_ref(), Role::Norm);
    }
}

impl Layer for Mlp {
    fn visit(&self, walk: &mut Walk<'_>) {
        // `gate_up` is a fused view of these for decoding, not a tensor of its own.
        walk.layer_opt("gate_proj", self.gate_proj.as_ref());
        walk.layer("up_proj", &self.up_proj);
        walk.layer("down_proj", &self.down_proj);
    }
}

impl Layer for SelfAttention {
    fn visit(&self, walk: &mut Walk<'_>) {
        walk.layer("q_proj", &self.q_proj);
        walk.layer("k_proj", &self.k_proj);
        walk.layer("v_proj", &self.v_proj);
        match self.o_proj_tied {
            true => walk.tied("o_proj", &self.o_proj),
            false => walk.layer("o_proj", &self.o_proj),
        }
        // What the kind learns, named as transformers names it.
        if let Some((name, scale)) = self.attention.head_scale() {
            walk.param(name, scale, Role::KindParameter);
        }
        if let Some(dm) = self.attention.key_bias() {
            walk.param("A", &dm.a, Role::KindParameter);
            walk.layer("dt_proj", &dm.dt_proj);
        }
        if let Some(p) = self.attention.projections() {
            walk.layer("linformer", p);
        }
        if let Some(n) = &self.qk_norm {
            walk.layer("q_norm", &n.q_norm);
            walk.layer("k_norm", &n.k_norm);
        }
    }
}

impl Layer for FeedForward {
    fn visit(&self, walk: &mut Walk<'_>) {
        match self {
            FeedForward::Dense(m) => m.visit(walk),
            FeedForward::Moe(m) => m.visit(walk),
            FeedForward::CdMoe(m) => m.visit(walk),
        }
    }
}

impl Layer for DecoderLayer {
    fn visit(&self, walk: &mut Walk<'_>) {
        walk.layer_opt("in_proj", self.in_proj.as_ref());
        walk.layer("input_layernorm", &self.input_layernorm);
        walk.layer("self_attn", &self.self_attn);
        walk.layer("post_attention_layernorm", &self.post_attention_layernorm);
        match self.mlp_tied {
            true => walk.tied("mlp", &self.mlp),
            false => walk.layer("mlp", &self.mlp),
        }
        walk.param_opt("input_residual", self.input_residual.as_ref(), Role::Scale);
        walk.param_opt("post_attention_residual", self.post_attention_residual.as_ref(), Role::Scale);
    }
}
