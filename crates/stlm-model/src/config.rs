//! One `ModelConfig` describes a whole decoder; Llama and GPT-2 are presets of it.

use crate::byte_config::{BytesConfig, BYTE_CLASSES};
use crate::shapes::{entry, LayerShape, LayerShapes, ResidualRoot};
use crate::sharing::{block_of, LayerSharing};
use crate::{ModelError, Result};
use serde::{Deserialize, Serialize};
use stlm_attention::{AttentionKind, RopeScaling};
use stlm_moe::{CdmoeConfig, MoeConfig};

fn one() -> f64 {
    1.0
}

fn is_one(v: &f64) -> bool {
    *v == 1.0
}
use std::borrow::Cow;
use std::path::Path;

/// The normalisation layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    /// RMSNorm (Llama), weight only.
    RmsNorm,
    /// LayerNorm (GPT-2), weight and bias.
    LayerNorm,
}

/// How positions enter the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PositionKind {
    /// Rotary embedding on queries and keys (`rope_theta`).
    Rope,
    /// A learned absolute position embedding added to the token embedding.
    Learned,
    /// Fixed sinusoidal embeddings added to the token embedding (Vaswani et al. 2017).
    Sinusoidal,
    /// Linear biases on the attention scores, `-m_h (i - j)` (ALiBi, Press et al. 2022).
    Alibi,
    /// No position information (causal attention alone).
    None,
}

/// The feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MlpKind {
    /// `down(act(gate(x)) * up(x))` (SwiGLU with `silu`).
    Gated,
    /// `down(act(up(x)))` (GPT-2).
    Plain,
}

/// The activation of the feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// x * sigmoid(x) (Swish with β = 1; `swish` is accepted too).
    #[serde(alias = "swish")]
    Silu,
    /// Exact (erf) GELU.
    Gelu,
    /// GELU with the tanh approximation (GPT-2's `gelu_new`).
    GeluTanh,
    /// max(x, 0).
    Relu,
    /// max(x, 0)² (Primer's squared ReLU; transformers' `relu2`).
    Relu2,
}

/// The transformers family a model is saved as (`config.json`'s `model_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelType {
    /// `LlamaForCausalLM`.
    Llama,
    /// `GPT2LMHeadModel`.
    Gpt2,
    /// `DogeForCausalLM`: Dynamic Mask Attention in every layer, residual scales, and a dense MLP
    /// or the cross-domain MoE.
    Doge,
    /// `MixtralForCausalLM`: Mistral's layout with a top-k (softmax, renormalised) mixture of
    /// experts in every layer.
    Mixtral,
    /// `MistralForCausalLM`: Llama's layout with an optional sliding window on every layer.
    Mistral,
    /// `Qwen2MoeForCausalLM`: biases on q, k and v (not o), and in its MoE layers a top-k softmax
    /// router over fine-grained experts plus a shared expert with a sigmoid gate.
    Qwen2Moe,
    /// `Qwen3MoeForCausalLM`: per-head RMSNorm of queries and keys, and a top-k softmax router
    /// over fine-grained experts (no shared expert).
    Qwen3Moe,
    /// Any other combination: `config.json` holds the stlm config with `model_type: "stlm"`.
    Stlm,
}

/// The whole decoder-only model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Family the model is exported as.
    pub model_type: ModelType,
    /// Number of token ids.
    pub vocab_size: i64,
    /// Width of the residual stream.
    pub hidden_size: i64,
    /// Width of the feed-forward block.
    pub intermediate_size: i64,
    /// Number of decoder blocks.
    pub num_hidden_layers: i64,
    /// Query heads.
    pub num_attention_heads: i64,
    /// Key/value heads (equal to query heads: multi-head; 1: multi-query; between: grouped).
    pub num_key_value_heads: i64,
    /// Width of one head; `hidden_size / num_attention_heads` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<i64>,
    /// Longest sequence (the size of a learned position table; a default context for RoPE).
    pub max_position_embeddings: i64,
    /// Normalisation layer.
    pub norm: NormKind,
    /// Epsilon of the normalisation layers.
    pub norm_eps: f64,
    /// Position encoding.
    pub position: PositionKind,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling for longer contexts (transformers' `rope_parameters`: `rope_type = "linear"`,
    /// `"dynamic"`, `"yarn"` or `"llama3"` and their fields); none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// Fraction of each head's dimensions that RoPE rotates (the rest carry no position).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub partial_rotary_factor: f64,
    /// Feed-forward block.
    pub mlp: MlpKind,
    /// Feed-forward activation.
    pub hidden_act: Activation,
    /// Biases on q, k, v and o projections.
    pub attention_bias: bool,
    /// Bias on o_proj alone; follows `attention_bias` when absent (Qwen2: q, k, v biased, o not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_out_bias: Option<bool>,
    /// RMSNorm over each query and key head before the rotary embedding (`self_attn.q_norm`,
    /// `self_attn.k_norm`; Qwen3, OLMo-style stability; Doge's attention always has them).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub qk_norm: bool,
    /// Biases on the feed-forward projections.
    pub mlp_bias: bool,
    /// The output head shares the token embedding.
    pub tie_word_embeddings: bool,
    /// Standard deviation of the normal initialisation.
    pub initializer_range: f64,
    /// Beginning-of-sequence token id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<i64>,
    /// End-of-sequence token ids (generation stops at any of them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub eos_token_id: Vec<i64>,
    /// Padding token id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<i64>,
    /// Learnable per-channel scales on each block's skip paths (Doge's `input_residual`,
    /// `post_attention_residual`): `x = r ⊙ x + f(norm(x))`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub residual_scales: bool,
    /// Doge's cross-domain MoE in place of every layer's MLP (a shared MLP of width
    /// `intermediate_size` plus retrieval experts); none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdmoe: Option<CdmoeConfig>,
    /// A mixture of experts in place of every layer's MLP (experts as wide as
    /// `intermediate_size`, SwiGLU); none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe: Option<MoeConfig>,
    /// A byte-pooled model: bytes grouped into chunks by a chunker, a byte encoder, this config's
    /// blocks as the global decoder over chunks, and a byte decoder; none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<BytesConfig>,
    /// Blocks applied more than once and weights tied across blocks (see [`LayerSharing`]);
    /// none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_sharing: Option<LayerSharing>,
    /// Stream width, feed-forward width, heads and windows that differ per layer (see
    /// [`LayerShapes`]); none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_shapes: Option<LayerShapes>,
    /// A learned vector the residual stream starts from (see [`ResidualRoot`]); none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residual_root: Option<ResidualRoot>,
    /// Attention of each layer: one entry for every layer, or a pattern repeated over the layers
    /// (its length must divide `num_hidden_layers`); empty means dense everywhere. Last, because
    /// TOML writes arrays of tables after plain values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attention: Vec<AttentionKind>,
}

/// Names of the presets accepted by `preset = "..."`.
pub const PRESETS: &[&str] = &["llama", "gpt2"];

impl ModelConfig {
    /// A Llama-style model: RMSNorm, RoPE, SwiGLU, no biases.
    pub fn llama() -> Self {
        ModelConfig {
            model_type: ModelType::Llama,
            vocab_size: 4096,
            hidden_size: 256,
            intermediate_size: 688,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 4,
            head_dim: None,
            max_position_embeddings: 2048,
            norm: NormKind::RmsNorm,
            norm_eps: 1e-6,
            position: PositionKind::Rope,
            rope_theta: 10000.0,
            rope_scaling: None,
            partial_rotary_factor: 1.0,
            mlp: MlpKind::Gated,
            hidden_act: Activation::Silu,
            attention_bias: false,
            attention_out_bias: None,
            qk_norm: false,
            mlp_bias: false,
            tie_word_embeddings: false,
            initializer_range: 0.02,
            bos_token_id: None,
            eos_token_id: Vec::new(),
            pad_token_id: None,
            residual_scales: false,
            cdmoe: None,
            moe: None,
            bytes: None,
            layer_sharing: None,
            layer_shapes: None,
            residual_root: None,
            attention: Vec::new(),
        }
    }

    /// A GPT-2-style model: LayerNorm with bias, learned positions, GELU MLP, tied embeddings.
    pub fn gpt2() -> Self {
        ModelConfig {
            model_type: ModelType::Gpt2,
            intermediate_size: 1024,
            max_position_embeddings: 1024,
            norm: NormKind::LayerNorm,
            norm_eps: 1e-5,
            position: PositionKind::Learned,
            mlp: MlpKind::Plain,
            hidden_act: Activation::GeluTanh,
            attention_bias: true,
            mlp_bias: true,
            tie_word_embeddings: true,
            ..Self::llama()
        }
    }

    /// The preset called `name` (see [`PRESETS`]).
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::llama()),
            "gpt2" => Some(Self::gpt2()),
            _ => None,
        }
    }

    /// The config as TOML, every field explicit.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a ModelConfig always serializes")
    }

    /// The attention of layer `i` (see [`ModelConfig::attention`]; a sliding window from the
    /// context pattern of `layer_shapes` when it has one).
    pub fn layer_attention(&self, i: usize) -> AttentionKind {
        if let Some(c) = self.layer_shapes.as_ref().and_then(|s| s.context.as_ref()) {
            let window = c.window(i, self.num_hidden_layers.max(1) as usize);
            return match window >= self.max_position_embeddings {
                true => AttentionKind::Dense,
                false => AttentionKind::SlidingWindow { window, global_tokens: 0 },
            };
        }
        match self.attention.len() {
            0 => AttentionKind::Dense,
            n => self.attention[i % n].clone(),
        }
    }

    /// The shape of layer `i` (the model's own without `layer_shapes`; see [`LayerShapes`]).
    pub fn layer_shape(&self, i: usize) -> LayerShape {
        let (h, nh, nkv) = (self.hidden_size, self.num_attention_heads, self.num_key_value_heads);
        let Some(s) = &self.layer_shapes else {
            return LayerShape { hidden_size: h, intermediate_size: self.intermediate_size, num_attention_heads: nh, num_key_value_heads: nkv };
        };
        let (d, group) = (self.head_dim(), (nh / nkv.max(1)).max(1));
        let layers = self.num_hidden_layers.max(1) as usize;
        let width = match &s.diamond {
            Some(diamond) => diamond.width(h, d * group, i, layers),
            None => entry(&s.hidden_size, i).unwrap_or(h),
        };
        let heads = entry(&s.num_attention_heads, i).unwrap_or(width / d.max(1));
        LayerShape {
            hidden_size: width,
            intermediate_size: entry(&s.intermediate_size, i).unwrap_or((self.intermediate_size * width + h / 2) / h.max(1)),
            num_attention_heads: heads,
            num_key_value_heads: entry(&s.num_key_value_heads, i).unwrap_or(heads / group),
        }
    }

    /// The config layer `i` is built from: this one with the layer's shape and attention (the
    /// head width stays the model's).
    pub fn layer_config(&self, i: usize) -> Cow<'_, ModelConfig> {
        if self.layer_shapes.is_none() {
            return Cow::Borrowed(self);
        }
        let shape = self.layer_shape(i);
        Cow::Owned(ModelConfig {
            hidden_size: shape.hidden_size,
            intermediate_size: shape.intermediate_size,
            num_attention_heads: shape.num_attention_heads,
            num_key_value_heads: shape.num_key_value_heads,
            head_dim: Some(self.head_dim()),
            attention: vec![self.layer_attention(i)],
            layer_shapes: None,
            ..self.clone()
        })
    }

    /// Width of the residual stream the model starts: the root's when it has its own, else
    /// `hidden_size`.
    pub fn root_width(&self) -> i64 {
        self.residual_root.as_ref().and_then(|r| r.width).unwrap_or(self.hidden_size)
    }

    /// Width of the stream layer `i` receives (the root's for layer 0, else layer `i - 1`'s).
    pub fn stream_width_before(&self, i: usize) -> i64 {
        match i {
            0 => self.root_width(),
            _ => self.layer_shape(i - 1).hidden_size,
        }
    }

    /// True when the residual stream keeps `hidden_size` everywhere (no projections needed).
    pub fn uniform_width(&self) -> bool {
        let layers = self.num_hidden_layers.max(0) as usize;
        self.root_width() == self.hidden_size && (0..layers).all(|i| self.layer_shape(i).hidden_size == self.hidden_size)
    }

    /// The `sliding_window` of a transformers export: `None` for dense attention everywhere, the
    /// window when every layer has the same sliding window without global tokens (Mistral only);
    /// an error saying why for anything else transformers cannot express.
    pub fn mistral_window(&self) -> std::result::Result<Option<i64>, String> {
        if matches!(self.model_type, ModelType::Stlm | ModelType::Doge) || self.all_dense() {
            return Ok(None);
        }
        let first = self.layer_attention(0);
        let uniform = (0..self.num_hidden_layers as usize).all(|i| self.layer_attention(i) == first);
        match first {
            AttentionKind::SlidingWindow { window, global_tokens: 0 }
                if uniform && matches!(self.model_type, ModelType::Mistral | ModelType::Mixtral) =>
            {
                Ok(Some(window))
            }
            _ if matches!(self.model_type, ModelType::Mistral | ModelType::Mixtral) => {
                Err("mistral takes dense attention or the same sliding window (no global tokens) on every layer".into())
            }
            _ => Err("only dense attention exists there (a sliding window on every layer exports as mistral)".into()),
        }
    }

    /// True when every layer uses dense attention.
    pub fn all_dense(&self) -> bool {
        (0..self.num_hidden_layers.max(0) as usize).all(|i| self.layer_attention(i) == AttentionKind::Dense)
    }

    /// Dimensions of each head that RoPE rotates (`head_dim · partial_rotary_factor`).
    pub fn rotary_dim(&self) -> i64 {
        (self.head_dim() as f64 * self.partial_rotary_factor) as i64
    }

    /// True when o_proj has a bias (see [`ModelConfig::attention_out_bias`]).
    pub fn o_proj_bias(&self) -> bool {
        self.attention_out_bias.unwrap_or(self.attention_bias)
    }

    /// The experts of layer `i`, if it is a mixture-of-experts layer (see [`MoeConfig::sparse_step`]).
    pub fn layer_moe(&self, i: usize) -> Option<&MoeConfig> {
        self.moe.as_ref().filter(|m| m.is_moe_layer(i))
    }

    /// The stored block of every applied layer (`0..num_hidden_layers` without sharing; see
    /// [`LayerSharing`]).
    pub fn applied_layers(&self) -> Vec<usize> {
        (0..self.depth().max(0) as usize).map(|i| self.applied_block(i)).collect()
    }

    /// The stored block that applied layer `i` runs.
    pub fn applied_block(&self, i: usize) -> usize {
        match &self.layer_sharing {
            Some(s) => block_of(s.scheme, self.num_hidden_layers.max(0) as usize, s.repeats.max(1) as usize, i),
            None => i,
        }
    }

    /// Number of applied layers (`num_hidden_layers · layer_sharing.repeats`).
    pub fn depth(&self) -> i64 {
        self.num_hidden_layers * self.layer_sharing.as_ref().map_or(1, |s| s.repeats)
    }

    /// True when some weights serve more than one applied layer.
    pub fn shares_layers(&self) -> bool {
        self.layer_sharing.as_ref().is_some_and(LayerSharing::shares)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> i64 {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Checks ranges and consistency; errors name `path` and the field.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |m: String| Err(ModelError::config(path, m));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("max_position_embeddings", self.max_position_embeddings),
            ("head_dim", self.head_dim()),
        ] {
            if v <= 0 {
                return err(format!("field `{name}` must be positive, got {v}"));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return err(format!(
                "field `num_key_value_heads` ({}) must divide `num_attention_heads` ({})",
                self.num_key_value_heads, self.num_attention_heads
            ));
        }
        if self.head_dim.is_none() && self.hidden_size % self.num_attention_heads != 0 {
            return err(format!(
                "field `hidden_size` ({}) must be a multiple of `num_attention_heads` ({}) unless `head_dim` is set",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.position == PositionKind::Sinusoidal && self.hidden_size % 2 != 0 {
            return err(format!("field `hidden_size` ({}) must be even for sinusoidal positions", self.hidden_size));
        }
        if self.position == PositionKind::Alibi && !self.all_dense() {
            return err("field `position`: alibi biases dense attention only (set every `attention` to dense)".into());
        }
        if self.position == PositionKind::Rope {
            let r = self.rotary_dim();
            if !(self.partial_rotary_factor > 0.0 && self.partial_rotary_factor <= 1.0) || r < 2 || r % 2 != 0 {
                return err(format!(
                    "fields `head_dim` ({}) and `partial_rotary_factor` ({}): the rotated width must be even and at least 2, got {r}",
                    self.head_dim(),
                    self.partial_rotary_factor
                ));
            }
            if let Some(Err(e)) = self.rope_scaling.as_ref().map(RopeScaling::validate) {
                return err(format!("field `rope_scaling`: {e}"));
            }
        }
        let n = self.attention.len() as i64;
        if n > 0 && self.num_hidden_layers % n != 0 {
            return err(format!(
                "field `attention`: {n} entries cannot repeat over {} layers (give one, one per layer, or a divisor)",
                self.num_hidden_layers
            ));
        }
        for (i, kind) in self.attention.iter().enumerate() {
            if let Err(e) = kind.validate() {
                return err(format!("field `attention[{i}]` ({}): {e}", kind.name()));
            }
            if let Some(why) = kind.not_causal_because() {
                return err(format!("field `attention[{i}]` ({}): not causal: {why}", kind.name()));
            }
        }
        if let Some(c) = &self.cdmoe {
            if let Err(e) = c.validate() {
                return err(format!("field `cdmoe`: {e}"));
            }
            if self.moe.is_some() {
                return err("fields `moe` and `cdmoe`: a layer has one feed-forward block; choose one".into());
            }
            if c.routing == stlm_moe::CdmoeRouting::HfCompat && self.model_type != ModelType::Doge {
                return err("field `cdmoe.routing`: hf_compat mixes tokens (not causal); it exists to run published Doge checkpoints".into());
            }
        }
        if let Some(b) = &self.bytes {
            if let Err(e) = b.validate() {
                return err(format!("field `bytes`: {e}"));
            }
            if self.model_type != ModelType::Stlm {
                return err("field `bytes`: byte-pooled models have no transformers counterpart: set model_type = \"stlm\"".into());
            }
            if self.vocab_size != BYTE_CLASSES - 1 {
                return err(format!("field `bytes`: byte models read the byte tokenizer's 258 ids: set vocab_size = 258 (got {})", self.vocab_size));
            }
            if !matches!(self.position, PositionKind::Rope | PositionKind::None) || self.cdmoe.is_some() {
                return err("field `bytes`: the global decoder of a byte model takes position = rope or none, and no cdmoe".into());
            }
        }
        if let Some(share) = &self.layer_sharing {
            if let Err(e) = share.validate() {
                return err(format!("field `layer_sharing`: {e}"));
            }
            if self.bytes.is_some() {
                return err("field `layer_sharing`: byte-pooled models do not share layers yet".into());
            }
            if share.mlp && (self.moe.is_some() || self.cdmoe.is_some()) {
                return err("field `layer_sharing.mlp`: only a dense feed-forward block is tied across blocks (not `moe` or `cdmoe`)".into());
            }
            if share.lora_rank > 0 && (self.moe.is_some() || self.cdmoe.is_some()) {
                return err("field `layer_sharing.lora_rank`: LoRA deltas are for dense feed-forward blocks (not `moe` or `cdmoe`)".into());
            }
        }
        if let Err(e) = self.validate_shapes() {
            return err(e);
        }
        if let Some(moe) = &self.moe {
            if let Err(e) = moe.validate() {
                return err(format!("field `moe`: {e}"));
            }
            if let Some(why) = moe.router.not_causal_because() {
                return err(format!("field `moe.router`: not causal: {why}"));
            }
            if self.mlp != MlpKind::Gated || self.hidden_act != Activation::Silu {
                return err("field `moe`: experts are SwiGLU (needs mlp = gated, hidden_act = silu)".into());
            }
        }
        let positive = |v: f64| v > 0.0; // false for NaN too
        if !positive(self.norm_eps) || !positive(self.rope_theta) || !positive(self.initializer_range) {
            return err("fields `norm_eps`, `rope_theta` and `initializer_range` must be positive".into());
        }
        for (name, id) in [("bos_token_id", self.bos_token_id), ("pad_token_id", self.pad_token_id)]
            .into_iter()
            .chain(self.eos_token_id.iter().map(|&e| ("eos_token_id", Some(e))))
        {
            if let Some(id) = id {
                if id < 0 || id >= self.vocab_size {
                    return err(format!("field `{name}` ({id}) is outside the vocabulary (0..{})", self.vocab_size));
                }
            }
        }
        Ok(())
    }

    /// Checks `layer_shapes` and `residual_root` against the rest of the model; the error names
    /// the field.
    fn validate_shapes(&self) -> std::result::Result<(), String> {
        if let Some(s) = &self.layer_shapes {
            s.validate(self.num_hidden_layers).map_err(|e| format!("field `layer_shapes`: {e}"))?;
            if s.context.is_some() && !self.attention.is_empty() {
                return Err("fields `layer_shapes.context` and `attention`: the context pattern sets every layer's attention; give one".into());
            }
            let d = self.head_dim();
            for i in 0..self.num_hidden_layers.max(0) as usize {
                let l = self.layer_shape(i);
                let at = |field: &str| format!("field `layer_shapes.{field}` (layer {i})");
                if l.num_attention_heads < 1 || (s.num_attention_heads.is_empty() && l.hidden_size % d != 0) {
                    return Err(format!("{}: a width of {} is not a whole number of {d}-wide heads; give `num_attention_heads`", at("hidden_size"), l.hidden_size));
                }
                if l.num_key_value_heads < 1 || l.num_attention_heads % l.num_key_value_heads != 0 {
                    return Err(format!(
                        "{}: {} key/value heads must divide the layer's {} query heads",
                        at("num_key_value_heads"),
                        l.num_key_value_heads,
                        l.num_attention_heads
                    ));
                }
                if l.intermediate_size < 1 {
                    return Err(format!("{}: must be positive, got {}", at("intermediate_size"), l.intermediate_size));
                }
            }
        }
        if let Some(w) = self.residual_root.as_ref().and_then(|r| r.width) {
            if w < 1 {
                return Err(format!("field `residual_root.width` must be positive, got {w}"));
            }
        }
        let shaped = self.layer_shapes.is_some() || self.residual_root.is_some();
        if shaped && self.bytes.is_some() {
            return Err("fields `layer_shapes` and `residual_root`: byte-pooled models do not take them yet".into());
        }
        if shaped && self.shares_layers() {
            return Err("fields `layer_shapes`/`residual_root` and `layer_sharing`: shared blocks keep one shape; choose one".into());
        }
        Ok(())
    }

}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("test.toml")
    }

    #[test]
    fn presets_fill_unset_fields() {
        let c =
            ModelConfig::from_toml_str("preset = \"gpt2\"\nhidden_size = 64\nnum_attention_heads = 2\n", p()).unwrap();
        assert_eq!(c.norm, NormKind::LayerNorm);
        assert_eq!(c.hidden_size, 64);
        assert_eq!(c.num_key_value_heads, 2);
        let c = ModelConfig::from_toml_str("[model]\nnum_key_value_heads = 1\n", p()).unwrap();
        assert_eq!(c.model_type, ModelType::Llama);
        assert_eq!(c.num_key_value_heads, 1);
        let back = ModelConfig::from_toml_str(&c.to_toml(), p()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn attention_per_layer() {
        let text = "model_type = \"stlm\"\nnum_hidden_layers = 4\nattention = [{ kind = \"sliding-window\", window = 8 }, { kind = \"dense\" }]\n";
        let c = ModelConfig::from_toml_str(text, p()).unwrap();
        assert_eq!(c.layer_attention(2), AttentionKind::SlidingWindow { window: 8, global_tokens: 0 });
        assert_eq!(c.layer_attention(3), AttentionKind::Dense);
        assert_eq!(ModelConfig::from_toml_str(&c.to_toml(), p()).unwrap(), c);
        let e = ModelConfig::from_toml_str(&text.replace("4\n", "3\n"), p()).unwrap_err().to_string();
        assert!(e.contains("`attention`"), "{e}");
        let e = ModelConfig::from_toml_str(&text.replace("window = 8", "window = 0"), p()).unwrap_err().to_string();
        assert!(e.contains("attention[0]") && e.contains("window"), "{e}");
        let e = ModelConfig::from_toml_str(&text.replace("stlm", "llama"), p()).unwrap_err().to_string();
        assert!(e.contains("model_type") && e.contains("dense"), "{e}");
        let e = ModelConfig::from_toml_str(&text.replace("stlm", "mistral"), p()).unwrap_err().to_string();
        assert!(e.contains("same sliding window"), "a dense layer in between: {e}");
        let mistral = "model_type = \"mistral\"\nattention = [{ kind = \"sliding-window\", window = 8 }]\n";
        assert_eq!(ModelConfig::from_toml_str(mistral, p()).unwrap().mistral_window(), Ok(Some(8)));
        let e = ModelConfig::from_toml_str(&text.replace("{ kind = \"dense\" }", "{ kind = \"linformer\", k = 16 }"), p()).unwrap_err().to_string();
        assert!(e.contains("attention[1]") && e.contains("not causal") && e.contains("future"), "{e}");
        let e = ModelConfig::from_toml_str(&text.replace("sliding-window", "sliding"), p()).unwrap_err().to_string();
        assert!(e.contains("attention") && e.contains("sliding"), "{e}");
    }

    #[test]
    fn doge_and_cdmoe_settings_are_checked() {
        let doge = "model_type = \"doge\"\nresidual_scales = true\nattention = [{ kind = \"doge-dma\", keep_window_size = 8 }]\n";
        let c = ModelConfig::from_toml_str(doge, p()).unwrap();
        assert!(c.residual_scales && c.cdmoe.is_none());
        let e = ModelConfig::from_toml_str(&doge.replace("residual_scales = true\n", ""), p()).unwrap_err().to_string();
        assert!(e.contains("doge needs"), "{e}");
        let e = ModelConfig::from_toml_str(&format!("{doge}cdmoe = {{ num_experts = 1000, top_k = 4 }}\n"), p()).unwrap_err().to_string();
        assert!(e.contains("cdmoe.num_experts") && e.contains("31^2"), "a new model with a non-square count: {e}");
        assert!(ModelConfig::from_toml_str(&format!("{doge}cdmoe = {{ num_experts = 1024, top_k = 4 }}\n"), p()).is_ok());
        let e = ModelConfig::from_toml_str("model_type = \"stlm\"\ncdmoe = { num_experts = 64, top_k = 2, routing = \"hf_compat\" }\n", p())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not causal"), "{e}");
        let e = ModelConfig::from_toml_str("residual_scales = true\n", p()).unwrap_err().to_string();
        assert!(e.contains("only in doge"), "llama cannot carry residual scales: {e}");
    }

    #[test]
    fn bad_fields_are_named() {
        let e = ModelConfig::from_toml_str("hidden_sise = 3\n", p()).unwrap_err().to_string();
        assert!(e.contains("hidden_sise") && e.contains("test.toml"), "{e}");
        let e = ModelConfig::from_toml_str("hidden_size = \"big\"\n", p()).unwrap_err().to_string();
        assert!(e.contains("hidden_size"), "{e}");
        let e = ModelConfig::from_toml_str("num_key_value_heads = 3\n", p()).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let e = ModelConfig::from_toml_str("preset = \"gpt5\"\n", p()).unwrap_err().to_string();
        assert!(e.contains("gpt5"), "{e}");
        let e = ModelConfig::from_toml_str("preset = \"gpt2\"\nnorm = \"rms_norm\"\n", p()).unwrap_err().to_string();
        assert!(e.contains("model_type"), "{e}");
    }
}
