//! The decoder-only language model, assembled from one [`ModelConfig`].
//!
//! Llama (RMSNorm, RoPE, SwiGLU, GQA/MQA, tied or untied head) and GPT-2 (LayerNorm with bias,
//! learned positions, GELU MLP, tied head) are presets of the same blocks. Reference
//! implementations: transformers' `LlamaForCausalLM` and `GPT2LMHeadModel`; the parity tests in
//! `tests/tests/hf_parity.rs` compare logits with them both ways.

use crate::config::{ModelConfig, PositionKind};
use crate::weight::Quantized;
use crate::layers::{Adapter, DecoderLayer, FeedForward, Linear, Mlp, Norm, RotaryAngles};
use crate::lora::LayerLora;
use crate::{ModelError, Result};
use stlm_attention::{sinusoidal_positions, AttentionMask, KvCache, Rope};
use stlm_core::kernels::small_batch_linear;
use stlm_core::{Layer, Mode, Role, Walk, WalkKind};
use stlm_moe::MoeStats;
use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};

/// A full causal pass taken one block at a time (see [`DecoderModel::block_pass`]).
pub struct BlockPass {
    /// The input of block 0 `[b, s, hidden]`.
    pub input: Tensor,
    /// Whether the blocks run as in training or in evaluation.
    pub mode: Mode,
    positions: Tensor,
    rotary: Option<RotaryAngles>,
}

/// The residual stream of one full pass (see [`DecoderModel::residual_stream_pass`]).
pub struct ResidualStream {
    /// The pass, for [`DecoderModel::attention_log_probs`].
    pub pass: BlockPass,
    /// The input of every block and the output of the last, `[b, s, hidden]` each.
    pub states: Vec<Tensor>,
    /// The stats of each MoE block (`(layer index, stats)`).
    pub moe: Vec<(usize, MoeStats)>,
}

/// The learned start of the residual stream (`model.residual_root`, see [`crate::ResidualRoot`]).
#[derive(Debug)]
pub struct Root {
    /// The root vector `[width]` (`model.residual_root.weight`).
    pub weight: Tensor,
    /// Per-channel mixing logits `[width]` (`model.residual_root.gate`), for the `gate` mix.
    pub gate: Option<Tensor>,
    /// Projection of the embedding to the root's width `[width, hidden]`
    /// (`model.residual_root.embed_proj`), when the widths differ.
    pub embed_proj: Option<Linear>,
}

impl Root {
    /// The first block's input from the embedded tokens `e` `[b, s, hidden]`.
    pub fn forward(&self, e: &Tensor) -> Tensor {
        let e = self.embed_proj.as_ref().map_or_else(|| e.shallow_clone(), |p| p.forward(e));
        match &self.gate {
            Some(g) => {
                let g = g.sigmoid();
                (1.0 - &g) * &self.weight + g * e
            }
            None => e + &self.weight,
        }
    }
}

/// The block applied as one layer (see [`DecoderModel::applied`]): a stored block and, with
/// per-layer LoRA, the low-rank updates its projections add in this application. It reads as
/// the block ([`std::ops::Deref`]); its passes apply the updates.
pub struct Applied<'m> {
    /// The stored block.
    pub block: &'m DecoderLayer,
    /// This application's LoRA updates (`layer_sharing.lora_rank`), if any.
    pub adapter: Option<Adapter<'m>>,
}

impl std::ops::Deref for Applied<'_> {
    type Target = DecoderLayer;
    fn deref(&self) -> &DecoderLayer {
        self.block
    }
}

impl Applied<'_> {
    /// [`DecoderLayer::forward_with`] with this application's updates.
    pub fn forward_mode(
        &self,
        x: &Tensor,
        rotary: Option<&RotaryAngles>,
        positions: &Tensor,
        mask: &AttentionMask,
        cache: Option<(&KvCache, usize)>,
        mode: Mode,
    ) -> (Tensor, Option<MoeStats>) {
        self.block.forward_with(x, rotary, positions, mask, cache, mode, self.adapter.as_ref())
    }

    /// [`DecoderLayer::write_kv`] with this application's updates.
    pub fn write_kv(&self, x: &Tensor, rotary: Option<&RotaryAngles>, cache: &KvCache, layer: usize) {
        self.block.write_kv_with(x, rotary, cache, layer, self.adapter.as_ref())
    }

    /// [`SelfAttention::attention_log_probs`](crate::layers::SelfAttention::attention_log_probs)
    /// of the block's normed input for its input `x`, with this application's updates.
    pub fn attention_log_probs(&self, x: &Tensor, rotary: Option<&RotaryAngles>) -> Option<Tensor> {
        let normed = self.block.input_layernorm.forward(&self.block.project_in(x));
        self.block.self_attn.attention_log_probs_with(&normed, rotary, self.adapter.as_ref())
    }
}

/// A decoder-only language model and the variable store that owns its weights.
#[derive(Debug)]
pub struct DecoderModel {
    /// The config it was built from.
    pub config: ModelConfig,
    /// Token embedding, `[vocab, hidden]` (`model.embed_tokens.weight`).
    pub embed_tokens: Tensor,
    /// Learned position embedding, `[max_positions, hidden]` (`model.embed_positions.weight`).
    pub embed_positions: Option<Tensor>,
    /// The stored decoder blocks (`model.layers.{i}`); [`DecoderModel::schedule`] says which one
    /// each applied layer runs.
    pub layers: Vec<DecoderLayer>,
    /// Final norm (`model.norm`).
    pub norm: Norm,
    /// Output head (`lm_head`); `None` when tied to `embed_tokens`.
    pub lm_head: Option<Linear>,
    /// The token embedding's quantized blocks, when it is quantized (its dequantized values are
    /// `embed_tokens`'s); a tied head multiplies with them when decoding one row.
    pub embed_quantized: Option<Quantized>,
    /// The learned start of the residual stream (`residual_root`), if any.
    pub residual_root: Option<Root>,
    /// Projection of the last block's stream back to `hidden_size` `[hidden, last]`
    /// (`model.out_proj`), when `layer_shapes` ends at another width.
    pub out_proj: Option<Linear>,
    /// The LoRA deltas of every applied layer (`layer_sharing.lora_rank`); empty without.
    pub lora: Vec<LayerLora>,
    pub(crate) rope: Option<Rope>,
    pub(crate) vs: nn::VarStore,
}

impl DecoderModel {
    /// Builds a randomly initialised model (normal(0, `initializer_range`), residual projections
    /// scaled by `1/sqrt(2 * layers)`) in float32 on `device`.
    pub fn new(config: ModelConfig, device: Device) -> Result<Self> {
        config.validate(std::path::Path::new("model config"))?;
        if config.bytes.is_some() {
            return Err(ModelError::Input("a config with a `bytes` table is a byte-pooled model (BytePooledModel)".into()));
        }
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let model = &root / "model";
        let std = config.initializer_range;
        let (v, h) = (config.vocab_size, config.hidden_size);
        let embed_tokens = (&model / "embed_tokens").var("weight", &[v, h], Init::Randn { mean: 0.0, stdev: std });
        let embed_positions = (config.position == PositionKind::Learned).then(|| {
            (&model / "embed_positions").var(
                "weight",
                &[config.max_position_embeddings, h],
                Init::Randn { mean: 0.0, stdev: std },
            )
        });
        let residual_root = config.residual_root.as_ref().map(|r| {
            let (w, path) = (config.root_width(), &model / "residual_root");
            Root {
                weight: path.var("weight", &[w], Init::Randn { mean: 0.0, stdev: std }),
                gate: (r.mix == crate::RootMix::Gate).then(|| path.var("gate", &[w], Init::Const(0.0))),
                embed_proj: (w != h).then(|| width_projection(&path / "embed_proj", h, w)),
            }
        });
        let mut layers: Vec<DecoderLayer> = Vec::new();
        for i in 0..config.num_hidden_layers {
            let path = &model / "layers" / i;
            let (incoming, cfg) = (config.stream_width_before(i as usize), config.layer_config(i as usize));
            let in_proj = (incoming != cfg.hidden_size).then(|| width_projection(&path / "in_proj", incoming, cfg.hidden_size));
            let layer = DecoderLayer { in_proj, ..DecoderLayer::tied_to(path, &cfg, i as usize, layers.first()) };
            layers.push(layer);
        }
        let rank = config.layer_sharing.as_ref().map_or(0, |s| s.lora_rank);
        let lora = match rank > 0 {
            true => (0..config.depth().max(0) as usize)
                .map(|i| LayerLora::new(&model / "lora" / i, &layers[config.applied_block(i)], rank))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| ModelError::Input("layer_sharing.lora_rank: LoRA deltas need dense feed-forward blocks".into()))?,
            false => Vec::new(),
        };
        let last = config.stream_width_before(config.num_hidden_layers as usize);
        let out_proj = (last != h).then(|| width_projection(&model / "out_proj", last, h));
        let norm = Norm::new(&model / "norm", config.norm, h, config.norm_eps);
        let lm_head = (!config.tie_word_embeddings).then(|| Linear::new(&root / "lm_head", h, v, false, std));
        let rope = (config.position == PositionKind::Rope).then(|| {
            let (dim, theta, max) = (config.rotary_dim(), config.rope_theta, config.max_position_embeddings);
            Rope::with_scaling(dim, theta, config.rope_scaling.as_ref(), max, device)
        });
        Ok(DecoderModel { config, embed_tokens, embed_positions, layers, norm, lm_head, embed_quantized: None, residual_root, out_proj, lora, rope, vs })
    }

    /// Number of applied layers (stored blocks times their repeats).
    pub fn depth(&self) -> usize {
        self.config.depth() as usize
    }

    /// The block applied as layer `i` (`i < depth()`), with layer `i`'s per-layer LoRA updates.
    pub fn applied(&self, i: usize) -> Applied<'_> {
        Applied { block: &self.layers[self.config.applied_block(i)], adapter: self.lora.get(i).map(LayerLora::adapter) }
    }

    /// The stored block of every applied layer (see [`ModelConfig::applied_layers`]).
    pub fn schedule(&self) -> Vec<usize> {
        self.config.applied_layers()
    }

    /// Applies every stored block `repeats` times from now on (a recursion depth chosen at run
    /// time, in the config's scheme); refused for a model without `layer_sharing`.
    pub fn set_repeats(&mut self, repeats: i64) -> Result<()> {
        let Some(sharing) = self.config.layer_sharing.as_mut() else {
            return Err(ModelError::Input("the model has no `layer_sharing` table, so its layers do not repeat".into()));
        };
        if repeats < 1 {
            return Err(ModelError::Input(format!("repeats must be at least 1, got {repeats}")));
        }
        if sharing.lora_rank > 0 && repeats != sharing.repeats {
            return Err(ModelError::Input(format!("the model has LoRA deltas for its {} applied layers (`layer_sharing.lora_rank`), so its depth is fixed", self.lora.len())));
        }
        sharing.repeats = repeats;
        Ok(())
    }

    /// The variable store holding every weight, by its Hugging Face name.
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// Mutable access to the variable store (to change dtype or device).
    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    /// Device of the weights.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Floating-point kind of the weights.
    pub fn kind(&self) -> Kind {
        self.embed_tokens.kind()
    }

    /// Casts every weight to `kind` (e.g. bfloat16 on CUDA).
    pub fn set_kind(&mut self, kind: Kind) {
        // Rope frequencies are not variables: they stay float32, as in transformers.
        self.vs.set_kind(kind);
    }

    /// Prepares the model for fast decoding: the q/k/v and gate/up projections of every layer
    /// are fused into one product each. Names, shapes and values are unchanged: the original
    /// weights become views of the fused ones, so training and saving still work. Call it last:
    /// a later dtype or device change would separate the views from the fused copy.
    pub fn optimize_for_decoding(&mut self) {
        let _guard = tch::no_grad_guard();
        // A tied FFN is fused once, in block 0, and shared again with the others.
        let tied_mlp = self.config.layer_sharing.as_ref().is_some_and(|s| s.mlp);
        for (i, layer) in self.layers.iter_mut().enumerate() {
            layer.self_attn.prepare_for_decoding();
            match (&mut layer.mlp, tied_mlp && i > 0) {
                (FeedForward::Dense(mlp), false) => mlp.prepare_for_decoding(),
                (FeedForward::Dense(_), true) | (FeedForward::Moe(_) | FeedForward::CdMoe(_), _) => {}
            }
        }
        if let Some(first) = self.layers.first().and_then(|l| l.mlp.dense()).filter(|_| tied_mlp).map(Mlp::share) {
            for layer in self.layers.iter_mut().skip(1) {
                layer.mlp = FeedForward::Dense(first.share());
            }
        }
    }

    /// Model FLOPs of one trained token in windows of `seq` (see [`stlm_core::flops`]): the
    /// weights of the applied walk (every application of a shared block, a routed token's share
    /// of the experts, the tied head as a product), then attention over each applied layer.
    pub fn flops_per_token(&self, seq: i64) -> f64 {
        let c = &self.config;
        let matmul = stlm_core::module::matmul_weights(self);
        // Attention's products scale with each applied layer's width.
        let widths: i64 = (0..self.depth()).map(|i| c.layer_shape(c.applied_block(i)).hidden_size).sum();
        stlm_core::flops::training_flops_per_token(matmul, 1, widths, seq)
    }

    /// Every tensor the model owns, once, with its saved name and role (see [`stlm_core::module`]).
    pub fn parameters(&self) -> Vec<stlm_core::Parameter> {
        stlm_core::module::parameters(self)
    }

    /// Copies this model into the smaller `into` (same vocabulary and width): embeddings, final
    /// norm and head whole, and block `j` of `into` from block `blocks[j].0` of this model with
    /// the units `blocks[j].1` keeps (structured pruning: heads, neurons, experts, whole blocks).
    pub fn keep_into(&self, into: &DecoderModel, blocks: &[(usize, crate::shrink::KeepUnits)]) -> Result<()> {
        if self.config.shares_layers() {
            return Err(ModelError::Input("structured pruning of shared layers (`layer_sharing`) is not supported".into()));
        }
        if self.config.layer_shapes.is_some() || self.config.residual_root.is_some() {
            return Err(ModelError::Input("structured pruning of per-layer shapes (`layer_shapes`, `residual_root`) is not supported".into()));
        }
        if blocks.len() != into.layers.len() || blocks.iter().any(|(i, _)| *i >= self.layers.len()) {
            return Err(ModelError::Input(format!("{} blocks to keep for a model of {} (from {})", blocks.len(), into.layers.len(), self.layers.len())));
        }
        let copy = crate::shrink::copy_checked;
        copy(&into.embed_tokens, &self.embed_tokens, "model.embed_tokens.weight")?;
        if let (Some(a), Some(b)) = (&self.embed_positions, &into.embed_positions) {
            copy(b, a, "model.embed_positions.weight")?;
        }
        self.norm.copy_into(&into.norm, "model.norm")?;
        if let (Some(a), Some(b)) = (&self.lm_head, &into.lm_head) {
            a.keep_into(b, None, None, "lm_head")?;
        }
        for (j, (i, keep)) in blocks.iter().enumerate() {
            self.layers[*i].keep_into(&into.layers[j], keep, &format!("model.layers.{j}"))?;
        }
        Ok(())
    }

    /// Total number of parameters (tied weights counted once).
    pub fn num_parameters(&self) -> i64 {
        stlm_core::numel(&self.vs.trainable_variables())
    }

    /// Checks that every id in `ids` is inside the vocabulary.
    pub fn check_ids(&self, ids: &[i64]) -> Result<()> {
        match ids.iter().find(|&&id| id < 0 || id >= self.config.vocab_size) {
            Some(id) => Err(ModelError::Input(format!(
                "token id {id} is outside the vocabulary (0..{})",
                self.config.vocab_size
            ))),
            None => Ok(()),
        }
    }

    /// Float32 logits `[len, vocab]` of one sequence of token ids (checked against the
    /// vocabulary), without gradients: what `stlm logits` writes.
    pub fn logits_of(&self, ids: &[i64]) -> Result<Tensor> {
        self.check_ids(ids)?;
        let _g = tch::no_grad_guard();
        let input = Tensor::from_slice(ids).unsqueeze(0).to_device(self.device());
        Ok(self.forward(&input).squeeze_dim(0).to_kind(Kind::Float))
    }

    /// Logits `[b, s, vocab]` of a full causal pass over `input_ids` `[b, s]` (positions 0..s).
    pub fn forward(&self, input_ids: &Tensor) -> Tensor {
        self.forward_mode(input_ids, Mode::Eval).0
    }

    /// [`DecoderModel::forward`] in `mode`, with the stats of every MoE block
    /// (`(layer index, stats)`, in layer order).
    pub fn forward_mode(&self, input_ids: &Tensor, mode: Mode) -> (Tensor, Vec<(usize, MoeStats)>) {
        let (b, s) = (input_ids.size()[0], input_ids.size()[1]);
        let positions = Tensor::arange(s, (Kind::Int64, self.device())).unsqueeze(0).expand([b, s], false);
        let mut moe = Vec::new();
        let x = self.hidden_states_mode(input_ids, &positions, &AttentionMask::Causal, None, mode, &mut moe);
        (self.head(&x), moe)
    }

    /// The aux-free bias moves of the MoE blocks for `stats` of a training pass, to apply after
    /// the optimizer step.
    pub fn balance_updates(&self, stats: &[(usize, MoeStats)]) -> Vec<stlm_core::BufferUpdate> {
        stats.iter().filter_map(|(i, s)| self.applied(*i).balance_update(s)).collect()
    }

    /// Logits `[b, s, vocab]` for `input_ids` `[b, s]` at `positions` `[b, s]` under `mask`;
    /// with a cache, keys and values are appended to it and it is advanced by `s`.
    pub fn forward_ext(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: &AttentionMask,
        cache: Option<&mut KvCache>,
    ) -> Tensor {
        self.head(&self.hidden_states(input_ids, positions, mask, cache))
    }

    /// Logits `[.., vocab]` of final hidden states `[.., hidden]` (the tied or untied head).
    pub fn head(&self, x: &Tensor) -> Tensor {
        match &self.lm_head {
            Some(head) => head.forward(x),
            None => match &self.embed_quantized {
                Some(q) => q.forward(x, None),
                None => small_batch_linear(x, &self.embed_tokens, None).unwrap_or_else(|| x.matmul(&self.embed_tokens.tr())),
            },
        }
    }

    /// Final hidden states `[b, s, hidden]` (after the final norm).
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: &AttentionMask,
        cache: Option<&mut KvCache>,
    ) -> Tensor {
        self.hidden_states_mode(input_ids, positions, mask, cache, Mode::Eval, &mut Vec::new())
    }

    /// [`DecoderModel::hidden_states`] in `mode`; MoE blocks' stats are pushed to `moe`.
    fn hidden_states_mode(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: &AttentionMask,
        mut cache: Option<&mut KvCache>,
        mode: Mode,
        moe: &mut Vec<(usize, MoeStats)>,
    ) -> Tensor {
        let (mut x, rotary) = self.embed(input_ids, positions);
        for i in 0..self.depth() {
            let layer = self.applied(i);
            let (y, stats) = layer.forward_mode(&x, rotary.as_ref(), positions, mask, cache.as_deref().map(|c| (c, i)), mode);
            x = y;
            moe.extend(stats.map(|s| (i, s)));
        }
        if let Some(c) = cache.as_mut() {
            c.advance(input_ids.size()[1]);
        }
        self.final_norm(&x)
    }

    /// The final norm of the last block's output `[.., last width]` (projected back to
    /// `hidden_size` first when the widths differ).
    pub fn final_norm(&self, x: &Tensor) -> Tensor {
        match &self.out_proj {
            Some(p) => self.norm.forward(&p.forward(x)),
            None => self.norm.forward(x),
        }
    }

    /// The input of the first block `[b, s, hidden]` (token and absolute position embeddings)
    /// and the rotary angles of `positions` `[b, s]`.
    pub(crate) fn embed(&self, input_ids: &Tensor, positions: &Tensor) -> (Tensor, Option<RotaryAngles>) {
        let mut x = Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false); // [b, s, hidden]
        if let Some(pos) = &self.embed_positions {
            x = &x + Tensor::embedding(pos, positions, -1, false, false);
        }
        if self.config.position == PositionKind::Sinusoidal {
            x = &x + sinusoidal_positions(positions, self.config.hidden_size, x.kind());
        }
        if let Some(root) = &self.residual_root {
            x = root.forward(&x);
        }
        let rotary = self.rope.as_ref().map(|rope| {
            let (cos, sin) = rope.cos_sin(positions, x.kind());
            RotaryAngles { cos, sin }
        });
        (x, rotary)
    }

    /// The residual stream of a full causal pass over `input_ids` `[b, s]`: the input of every
    /// block and the output of the last (before the final norm), `num_hidden_layers + 1`
    /// tensors `[b, s, hidden]` (block influence for layer pruning, hidden-state distillation).
    pub fn residual_stream(&self, input_ids: &Tensor) -> Vec<Tensor> {
        self.residual_stream_pass(input_ids, Mode::Eval).states
    }

    /// [`DecoderModel::residual_stream`] in `mode`, with the pass it ran (for
    /// [`DecoderModel::attention_log_probs`]) and the MoE blocks' stats.
    pub fn residual_stream_pass(&self, input_ids: &Tensor, mode: Mode) -> ResidualStream {
        let pass = self.block_pass_mode(input_ids, mode);
        let mut states = vec![pass.input.shallow_clone()];
        let mut moe = Vec::new();
        for i in 0..self.depth() {
            let (x, stats) = self.run_block_stats(i, &pass, states.last().expect("the input is there"));
            states.push(x);
            moe.extend(stats.map(|s| (i, s)));
        }
        ResidualStream { pass, states, moe }
    }

    /// The input of block 0 for a full causal pass over `input_ids` `[b, s]`, with the positions
    /// and rotary angles every block needs: for running blocks one at a time ([`DecoderModel::run_block`]).
    pub fn block_pass(&self, input_ids: &Tensor) -> BlockPass {
        self.block_pass_mode(input_ids, Mode::Eval)
    }

    /// [`DecoderModel::block_pass`] whose blocks run in `mode`.
    pub fn block_pass_mode(&self, input_ids: &Tensor, mode: Mode) -> BlockPass {
        let (b, s) = (input_ids.size()[0], input_ids.size()[1]);
        let positions = Tensor::arange(s, (Kind::Int64, self.device())).unsqueeze(0).expand([b, s], false);
        let (input, rotary) = self.embed(input_ids, &positions);
        BlockPass { input, mode, positions, rotary }
    }

    /// Block `i` applied to `x` `[b, s, hidden]` (its input in `pass`), causally from position 0.
    pub fn run_block(&self, i: usize, pass: &BlockPass, x: &Tensor) -> Tensor {
        self.run_block_stats(i, pass, x).0
    }

    /// [`DecoderModel::run_block`] with the block's MoE stats, if it has experts.
    pub fn run_block_stats(&self, i: usize, pass: &BlockPass, x: &Tensor) -> (Tensor, Option<MoeStats>) {
        self.applied(i).forward_mode(x, pass.rotary.as_ref(), &pass.positions, &AttentionMask::Causal, None, pass.mode)
    }

    /// Log attention probabilities `[b, heads, s, s]` of block `i` given its input `x` (a state of
    /// [`DecoderModel::residual_stream`]); `None` unless the block has dense softmax attention.
    pub fn attention_log_probs(&self, i: usize, pass: &BlockPass, x: &Tensor) -> Option<Tensor> {
        self.applied(i).attention_log_probs(x, pass.rotary.as_ref())
    }

    /// A KV cache for `batch` sequences of up to `capacity` positions, in the model's dtype
    /// (sliding-window layers keep only their window).
    pub fn new_cache(&self, batch: i64, capacity: i64) -> KvCache {
        self.new_cache_padded(batch, capacity, 0)
    }

    /// [`DecoderModel::new_cache`] for rows left-padded by up to `padding` slots: sliding-window
    /// layers with global tokens keep `padding` more leading slots, where a padded row's global
    /// tokens are.
    pub fn new_cache_padded(&self, batch: i64, capacity: i64, padding: i64) -> KvCache {
        let layers: Vec<_> = (0..self.depth())
            .map(|i| self.applied(i))
            .map(|l| {
                let window = l.self_attn.attention.rolling_window().map(|(w, g)| (w, if g > 0 { g + padding } else { 0 }));
                (window, l.self_attn.num_kv_heads)
            })
            .collect();
        KvCache::with_layers(&layers, batch, self.config.head_dim(), capacity, self.kind(), self.device())
    }
}

impl Layer for Root {
    fn visit(&self, walk: &mut Walk<'_>) {
        walk.param("weight", &self.weight, Role::Scale);
        walk.param_opt("gate", self.gate.as_ref(), Role::Scale);
        walk.layer_opt("embed_proj", self.embed_proj.as_ref());
    }
}

impl Layer for DecoderModel {
    /// Stored walks list the blocks in order; applied walks follow the schedule, so a shared
    /// block is counted at each application (under its stored name).
    fn visit(&self, walk: &mut Walk<'_>) {
        self.visit_parts(walk, true);
    }
}

/// A model's tensors outside its blocks (see [`DecoderModel::outside_blocks`]).
struct OutsideBlocks<'m>(&'m DecoderModel);

impl Layer for OutsideBlocks<'_> {
    fn visit(&self, walk: &mut Walk<'_>) {
        self.0.visit_parts(walk, false);
    }
}

impl DecoderModel {
    /// The stored walk's tensors that are not in a block (`model.layers.{j}`): embeddings, root,
    /// LoRA deltas, projections, final norm, head; blocks are walked one by one (`layers[j]`).
    pub fn outside_blocks(&self) -> Vec<stlm_core::Parameter> {
        stlm_core::module::parameters(&OutsideBlocks(self))
    }

    fn visit_parts(&self, walk: &mut Walk<'_>, blocks: bool) {
        let quantized = self.embed_quantized.is_some();
        let embedding = if quantized { Role::QuantizedEmbedding } else { Role::Embedding };
        walk.param("model.embed_tokens.weight", &self.embed_tokens, embedding);
        walk.param_opt("model.embed_positions.weight", self.embed_positions.as_ref(), Role::Embedding);
        walk.layer_opt("model.residual_root", self.residual_root.as_ref());
        match (blocks, walk.kind()) {
            (false, _) => {}
            (true, WalkKind::Stored) => (0..self.layers.len()).for_each(|j| walk.layer(&format!("model.layers.{j}"), &self.layers[j])),
            (true, WalkKind::Applied) => self.schedule().into_iter().for_each(|j| walk.layer(&format!("model.layers.{j}"), &self.layers[j])),
        }
        for (i, lora) in self.lora.iter().enumerate() {
            walk.layer(&format!("model.lora.{i}"), lora);
        }
        walk.layer_opt("model.out_proj", self.out_proj.as_ref());
        walk.layer("model.norm", &self.norm);
        match &self.lm_head {
            Some(head) => walk.layer("lm_head", head),
            None => walk.tied_param("lm_head.weight", &self.embed_tokens, if quantized { Role::QuantizedMatrix } else { Role::Matrix }),
        }
    }
}

/// A learned projection between stream widths `[out, in]`, initialised to keep the stream's
/// scale (normal with std `1/sqrt(in)`), without bias.
fn width_projection(path: nn::Path, in_dim: i64, out_dim: i64) -> Linear {
    Linear::new(path, in_dim, out_dim, false, 1.0 / (in_dim as f64).sqrt())
}
