//! Structured pruning: whole attention heads, FFN neurons, MoE experts or decoder blocks go, and
//! the model is rebuilt smaller (narrower tensors, an updated config) so that it saves as an
//! ordinary model directory.
//!
//! The same number of units leaves every block, so the config stays uniform and Llama exports
//! stay loadable by transformers. Units are scored by
//! - magnitude: the L2 norm of all weights of the unit;
//! - activation: the L2 norm of the unit's contribution to the residual stream over the
//!   calibration text (a head: `||X_h W_o,h^T||`, a neuron: `||x_j|| ||W_down[:, j]||`, from the
//!   Gram matrix of the `o_proj`/`down_proj` inputs); for experts their share of the routed
//!   tokens; for blocks ShortGPT's block influence, `1 - mean cos(x_in, x_out)`;
//! - taylor: `|sum w * dL/dw|` over the unit's weights, the first-order change of the
//!   calibration loss when the unit is removed.
//!
//! Heads are removed with their key/value head: in grouped-query attention a unit is a key/value
//! head and its group of query heads, in multi-query attention a query head (the shared key/value
//! head stays).

use crate::report::Perplexity;
use crate::{PruneError, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use stlm_attention::AttentionKind;
use stlm_core::OptionError;
use stlm_moe::RouterKind;
use stlm_model::config::{ModelType, PositionKind};
use stlm_model::layers::{DecoderLayer, FeedForward, InputGram};
use stlm_model::shrink::KeepUnits;
use stlm_model::{DecoderModel, Mode, ModelConfig};
use tch::{Kind, Tensor};

/// What is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// Attention heads (with their key/value heads).
    Heads,
    /// Channels of dense feed-forward blocks.
    Neurons,
    /// Experts of MoE blocks.
    Experts,
    /// Whole decoder blocks.
    Layers,
}

impl std::str::FromStr for Unit {
    type Err = PruneError;
    fn from_str(s: &str) -> Result<Self> {
        [Unit::Heads, Unit::Neurons, Unit::Experts, Unit::Layers]
            .into_iter()
            .find(|u| unit_name(*u) == s)
            .ok_or_else(|| OptionError::new("structured", s, "expected heads, neurons, experts or layers").into())
    }
}

/// How units are scored (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Importance {
    /// Weight norm.
    Magnitude,
    /// Contribution to the residual stream on calibration text (block influence for layers).
    Activation,
    /// First-order Taylor estimate of the loss change.
    Taylor,
}

impl std::str::FromStr for Importance {
    type Err = PruneError;
    fn from_str(s: &str) -> Result<Self> {
        [Importance::Magnitude, Importance::Activation, Importance::Taylor]
            .into_iter()
            .find(|i| importance_name(*i) == s)
            .ok_or_else(|| OptionError::new("importance", s, "expected magnitude, activation or taylor").into())
    }
}

/// Structured pruning settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StructuredOptions {
    /// What is removed.
    pub unit: Unit,
    /// Fraction of the units of each block (of the blocks, for layers) removed, rounded to the nearest whole unit.
    pub amount: f64,
    /// How units are scored.
    pub importance: Importance,
}

/// The units one block lost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Removed {
    /// Block index in the original model (`None` for layer pruning, where `units` are blocks).
    pub layer: Option<usize>,
    /// Indices of the removed units, ascending.
    pub units: Vec<i64>,
    /// Scores of every unit of the block, by index.
    pub scores: Vec<f64>,
}

/// The report of a structured prune (`stlm prune --structured ... --json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StructuredReport {
    /// `heads`, `neurons`, `experts` or `layers`.
    pub unit: String,
    /// `magnitude`, `activation` or `taylor`.
    pub importance: String,
    /// Units per block before.
    pub units_before: i64,
    /// Units per block after.
    pub units_after: i64,
    /// What went, per block.
    pub removed: Vec<Removed>,
    /// Parameters before.
    pub params_before: i64,
    /// Parameters after.
    pub params_after: i64,
    /// The config fields that changed, `field: old -> new`.
    pub config_changes: Vec<String>,
    /// Validation perplexity before, when a validation text was given.
    pub before: Option<Perplexity>,
    /// Validation perplexity after.
    pub after: Option<Perplexity>,
    /// Seconds spent (scoring and rebuilding).
    pub seconds: f64,
}

impl StructuredReport {
    /// A plain-text summary.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for r in &self.removed {
            let block = r.layer.map(|l| format!("block {l}")).unwrap_or_else(|| "blocks".into());
            out += &format!("{block:<10} removed {} {:?}\n", self.unit, r.units);
        }
        out += &format!(
            "{} by {}: {} -> {} per block; {} -> {} parameters ({:.1}% fewer); {}; {:.1} s\n",
            self.unit,
            self.importance,
            self.units_before,
            self.units_after,
            self.params_before,
            self.params_after,
            100.0 * (1.0 - self.params_after as f64 / self.params_before.max(1) as f64),
            self.config_changes.join(", "),
            self.seconds
        );
        if let (Some(b), Some(a)) = (self.before, self.after) {
            out += &format!("validation perplexity {:.3} -> {:.3} ({:.4} -> {:.4} bits/byte)\n", b.ppl, a.ppl, b.bits_per_byte, a.bits_per_byte);
        }
        out
    }
}

/// How a block's heads group into units: query heads per unit and whether the key/value heads go too.
#[derive(Debug, Clone, Copy)]
struct HeadUnits {
    /// Units per block.
    units: i64,
    /// Query heads per unit.
    queries: i64,
    /// Each unit owns one key/value head (false: multi-query, the key/value head is shared).
    owns_kv: bool,
}

impl HeadUnits {
    fn of(cfg: &ModelConfig) -> Self {
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        if nkv == 1 && nh > 1 {
            HeadUnits { units: nh, queries: 1, owns_kv: false }
        } else {
            HeadUnits { units: nkv, queries: nh / nkv, owns_kv: true }
        }
    }
}

/// Units per block (or blocks) of `cfg` for `unit`, checking the model can lose them.
fn units_of(cfg: &ModelConfig, unit: Unit) -> Result<i64> {
    let bad = |m: String| Err(OptionError::new("structured", unit_name(unit), m).into());
    let n = cfg.num_hidden_layers as usize;
    match unit {
        Unit::Heads if cfg.position == PositionKind::Alibi => bad("ALiBi's slopes depend on the number of heads".into()),
        Unit::Heads => Ok(HeadUnits::of(cfg).units),
        Unit::Neurons if cfg.cdmoe.is_some() || (0..n).any(|i| cfg.layer_moe(i).is_some()) => {
            bad("neurons of dense feed-forward blocks only; this model has MoE blocks (prune experts)".into())
        }
        Unit::Neurons => Ok(cfg.intermediate_size),
        Unit::Experts => match &cfg.moe {
            Some(m) if (0..n).any(|i| cfg.layer_moe(i).is_some()) => Ok(m.num_experts),
            _ => bad("the model has no MoE blocks (`[model.moe]`)".into()),
        },
        Unit::Layers => {
            let moe_layers: Vec<bool> = (0..n).map(|i| cfg.layer_moe(i).is_some()).collect();
            if moe_layers.iter().any(|&m| m != moe_layers[0]) {
                return bad("MoE in some blocks only: removing blocks would shift the pattern".into());
            }
            Ok(cfg.num_hidden_layers)
        }
    }
}

fn unit_name(u: Unit) -> &'static str {
    match u {
        Unit::Heads => "heads",
        Unit::Neurons => "neurons",
        Unit::Experts => "experts",
        Unit::Layers => "layers",
    }
}

fn importance_name(i: Importance) -> &'static str {
    match i {
        Importance::Magnitude => "magnitude",
        Importance::Activation => "activation",
        Importance::Taylor => "taylor",
    }
}

/// Removes `opts.amount` of the `opts.unit`s of `model` (scored on `calib`, int64 token batches
/// `[b, s]` on the model's device, for activation and Taylor importance) and returns the smaller
/// model; `model` itself is unchanged.
pub fn prune_structured(model: &mut DecoderModel, calib: &[Tensor], opts: &StructuredOptions, progress: bool) -> Result<(DecoderModel, StructuredReport)> {
    let started = Instant::now();
    crate::refuse_shared_layers(&model.config)?;
    if model.config.layer_shapes.is_some() || model.config.residual_root.is_some() {
        return Err(PruneError::Input("structured pruning of per-layer shapes (`layer_shapes`, `residual_root`) is not supported".into()));
    }
    let total = units_of(&model.config, opts.unit)?;
    if !(0.0..1.0).contains(&opts.amount) {
        return Err(OptionError::new("amount", opts.amount, "must be at least 0 and below 1").into());
    }
    let remove = (opts.amount * total as f64).round() as i64;
    if remove >= total {
        return Err(OptionError::new(
            "amount",
            opts.amount,
            format!("would remove all {total} {}", unit_name(opts.unit)),
        )
        .into());
    }
    if opts.importance != Importance::Magnitude && calib.is_empty() {
        let why = format!("{} importance needs calibration text", importance_name(opts.importance));
        return Err(OptionError::no_value("calib", why).into());
    }
    if let (Unit::Layers, Importance::Magnitude) = (opts.unit, opts.importance) {
        return Err(OptionError::new(
            "importance",
            "magnitude",
            "blocks (structured layers) are scored by activation (block influence) or taylor",
        )
        .into());
    }
    if let (Unit::Experts, Some(moe)) = (opts.unit, &model.config.moe) {
        let k = match moe.router {
            RouterKind::TopK { k, .. } | RouterKind::AuxFree { k, .. } => k,
            RouterKind::Switch { .. } | RouterKind::ExpertChoice { .. } => 1,
        };
        if k > total - remove {
            let why = format!("{} experts would be left, fewer than the {k} each token is routed to", total - remove);
            return Err(OptionError::new("amount", opts.amount, why).into());
        }
    }
    let bar = if progress { ProgressBar::new_spinner() } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("{spinner} {msg} [{elapsed_precise}]").expect("valid template"));
    bar.set_message(format!("scoring {} by {}", unit_name(opts.unit), importance_name(opts.importance)));
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let scores = score(model, calib, opts)?; // per block [units], or one [layers]
    bar.set_message("rebuilding the model");
    let removed: Vec<Removed> = scores
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut units: Vec<i64> = Vec::try_from(s.argsort(0, false).narrow(0, 0, remove)).expect("int64 indices");
            units.sort_unstable();
            let scores = Vec::try_from(s.to_kind(Kind::Double)).expect("float64 scores");
            Removed { layer: (opts.unit != Unit::Layers).then_some(i), units, scores }
        })
        .collect();
    let (smaller, changes) = shrink(model, opts.unit, &removed)?;
    bar.finish_and_clear();
    let report = StructuredReport {
        unit: unit_name(opts.unit).into(),
        importance: importance_name(opts.importance).into(),
        units_before: total,
        units_after: total - remove,
        removed,
        params_before: model.num_parameters(),
        params_after: smaller.num_parameters(),
        config_changes: changes,
        before: None,
        after: None,
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((smaller, report))
}

/// Unit scores: one float64 tensor `[units]` per block, or a single `[layers]` for layers.
fn score(model: &mut DecoderModel, calib: &[Tensor], opts: &StructuredOptions) -> Result<Vec<Tensor>> {
    match (opts.unit, opts.importance) {
        (Unit::Layers, Importance::Activation) => Ok(vec![block_influence(model, calib)]),
        (Unit::Layers, _) => {
            taylor_backward(model, calib);
            let per_block = model.layers.iter().map(|l| {
                let sums = stlm_core::module::parameters(l).into_iter().map(|p| taylor_product(&p.tensor).sum(Kind::Double));
                sums.fold(Tensor::from(0.0f64), |a, b| a + b).abs()
            });
            let scores = vec![Tensor::stack(&per_block.collect::<Vec<_>>(), 0)];
            zero_grads(model);
            Ok(scores)
        }
        (unit, Importance::Magnitude) => {
            let square = |w: &Tensor| w.detach().to_kind(Kind::Double).square();
            model.layers.iter().map(|l| Ok(group_sums(&model.config, l, unit, &square)?.sqrt())).collect()
        }
        (unit, Importance::Taylor) => {
            taylor_backward(model, calib);
            let scores = model.layers.iter().map(|l| Ok(group_sums(&model.config, l, unit, &taylor_product)?.abs())).collect();
            zero_grads(model);
            scores
        }
        (Unit::Experts, Importance::Activation) => expert_load(model, calib),
        (unit, Importance::Activation) => contribution_norms(model, calib, unit),
    }
}

/// Accumulates in every weight the gradient of the summed next-token loss over `calib`.
fn taylor_backward(model: &DecoderModel, calib: &[Tensor]) {
    for batch in calib {
        let s = batch.size()[1];
        let (x, y) = (batch.narrow(1, 0, s - 1), batch.narrow(1, 1, s - 1));
        // The training loss, as a training pass computes it (Switch capacity on).
        let logits = model.forward_mode(&x, Mode::Train).0;
        let loss = logits.reshape([-1, logits.size()[2]]).cross_entropy_for_logits(&y.reshape([-1]));
        loss.backward();
    }
}

/// `w * dL/dw` (float64) of a weight after [`taylor_backward`] (zero without a gradient).
fn taylor_product(w: &Tensor) -> Tensor {
    let _guard = tch::no_grad_guard();
    let g = w.grad();
    if g.defined() { (w * &g).to_kind(Kind::Double) } else { w.zeros_like().to_kind(Kind::Double) }
}

/// Clears the gradients [`taylor_backward`] left.
fn zero_grads(model: &DecoderModel) {
    for mut p in model.parameters().into_iter().map(|p| p.tensor) {
        p.zero_grad();
    }
}

/// Per-unit sums over `layer` of `value` (an elementwise float64 value of a weight): the entries
/// of a head's q/k/v rows and o columns, a neuron's gate/up rows and down column, an expert's
/// slices and router row.
fn group_sums(cfg: &ModelConfig, layer: &DecoderLayer, unit: Unit, value: &dyn Fn(&Tensor) -> Tensor) -> Result<Tensor> {
    let rows = |t: &Tensor, n: i64| value(t).reshape([n, -1]).sum_dim_intlist(1, false, Kind::Double); // [n]
    match unit {
        Unit::Heads => {
            let a = &layer.self_attn;
            let (nh, nkv, d) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim());
            let hidden = cfg.hidden_size;
            let mut q = rows(&a.q_proj.weight.value(), nh);
            q += value(&a.o_proj.weight.value()).view([hidden, nh, d]).sum_dim_intlist([0i64, 2].as_slice(), false, Kind::Double);
            if let Some(b) = &a.q_proj.bias {
                q += rows(b, nh);
            }
            let mut kv = rows(&a.k_proj.weight.value(), nkv) + rows(&a.v_proj.weight.value(), nkv);
            for b in [&a.k_proj.bias, &a.v_proj.bias].into_iter().flatten() {
                kv += rows(b, nkv);
            }
            let hu = HeadUnits::of(cfg);
            Ok(match hu.owns_kv {
                true => q.view([hu.units, hu.queries]).sum_dim_intlist(1, false, Kind::Double) + kv,
                false => q,
            })
        }
        Unit::Neurons => {
            let Some(m) = layer.mlp.dense() else { return Err(PruneError::Input("neurons are pruned in dense MLPs only".into())) };
            let i = cfg.intermediate_size;
            let mut s = rows(&m.up_proj.weight.value(), i) + value(&m.down_proj.weight.value()).sum_dim_intlist(0, false, Kind::Double);
            let gate = m.gate_proj.as_ref();
            for t in [gate.map(|g| g.weight.value()).as_ref(), gate.and_then(|g| g.bias.as_ref()), m.up_proj.bias.as_ref()].into_iter().flatten() {
                s += rows(t, i);
            }
            Ok(s)
        }
        Unit::Experts => {
            let FeedForward::Moe(m) = &layer.mlp else { return Err(PruneError::Input("experts are pruned in MoE layers only".into())) };
            let e = m.config.num_experts;
            Ok(rows(&m.gate, e) + rows(&m.experts.gate_up_proj, e) + rows(&m.experts.down_proj, e))
        }
        Unit::Layers => Err(PruneError::Input("blocks are scored whole".into())),
    }
}

/// Runs `calib` through `model` (no gradients), discarding the outputs.
fn run_calibration(model: &DecoderModel, calib: &[Tensor]) {
    let _guard = tch::no_grad_guard();
    for batch in calib {
        let _ = model.forward(batch);
    }
}

/// Activation importance of heads or neurons: the norm of each unit's contribution to the
/// residual stream, from the Gram matrix of the `o_proj` or `down_proj` inputs.
fn contribution_norms(model: &mut DecoderModel, calib: &[Tensor], unit: Unit) -> Result<Vec<Tensor>> {
    let taps: Vec<Arc<Mutex<InputGram>>> = model.layers.iter().map(|_| Arc::new(Mutex::new(InputGram::default()))).collect();
    for (layer, tap) in model.layers.iter_mut().zip(&taps) {
        let linear = match (&mut layer.mlp, unit) {
            (_, Unit::Heads) => &mut layer.self_attn.o_proj,
            (FeedForward::Dense(mlp), _) => &mut mlp.down_proj,
            _ => return Err(PruneError::Input("neurons of dense feed-forward blocks only".into())),
        };
        linear.tap = Some(Arc::clone(tap));
    }
    run_calibration(model, calib);
    for layer in model.layers.iter_mut() {
        layer.self_attn.o_proj.tap = None;
        if let FeedForward::Dense(mlp) = &mut layer.mlp {
            mlp.down_proj.tap = None;
        }
    }
    let cfg = &model.config;
    let mut out = Vec::new();
    for (layer, tap) in model.layers.iter().zip(taps) {
        let gram = tap.lock().unwrap_or_else(|e| e.into_inner()).gram.take();
        let gram = gram.ok_or_else(|| PruneError::Input("the calibration batches reached no block".into()))?;
        let energy = match (&layer.mlp, unit) {
            (_, Unit::Heads) => {
                let (nh, d, h) = (cfg.num_attention_heads, cfg.head_dim(), cfg.hidden_size);
                // Per query head: tr(W_h G_hh W_h^T) with W_h = o_proj[:, head h] and G_hh its block.
                let blocks = gram.view([nh, d, nh, d]).diagonal(0, 0, 2).permute([2, 0, 1]); // [nh, d, d]
                let w = layer.self_attn.o_proj.weight.value().detach().to_kind(Kind::Double).view([h, nh, d]).permute([1, 0, 2]); // [nh, h, d]
                let per_head = (w.matmul(&blocks) * &w).sum_dim_intlist([1i64, 2].as_slice(), false, Kind::Double);
                let hu = HeadUnits::of(cfg);
                per_head.view([hu.units, hu.queries]).sum_dim_intlist(1, false, Kind::Double)
            }
            (FeedForward::Dense(mlp), _) => {
                let w = mlp.down_proj.weight.value().detach().to_kind(Kind::Double);
                gram.diagonal(0, 0, 1) * w.square().sum_dim_intlist(0, false, Kind::Double)
            }
            _ => unreachable!("checked when the taps were set"),
        };
        out.push(energy.sqrt());
    }
    Ok(out)
}

/// Each expert's share of the routed tokens over `calib`, per MoE block.
fn expert_load(model: &DecoderModel, calib: &[Tensor]) -> Result<Vec<Tensor>> {
    let _guard = tch::no_grad_guard();
    let mut load: Vec<Option<Tensor>> = model.layers.iter().map(|_| None).collect();
    for batch in calib {
        for (i, stats) in model.forward_mode(batch, Mode::Eval).1 {
            let l = stats.load.to_kind(Kind::Double);
            load[i] = Some(match load[i].take() {
                Some(sum) => sum + l,
                None => l,
            });
        }
    }
    load.into_iter().enumerate().map(|(i, l)| l.ok_or_else(|| PruneError::Input(format!("block {i} routed no calibration token")))).collect()
}

/// ShortGPT's block influence `1 - mean_t cos(x_in,t, x_out,t)` of every block over `calib`.
fn block_influence(model: &DecoderModel, calib: &[Tensor]) -> Tensor {
    let _guard = tch::no_grad_guard();
    let n = model.layers.len() as i64;
    let (mut sum, mut tokens) = (Tensor::zeros([n], (Kind::Double, model.device())), 0);
    for batch in calib {
        let states = model.residual_stream(batch);
        let cos: Vec<Tensor> = states
            .windows(2)
            .map(|w| Tensor::cosine_similarity(&w[0].to_kind(Kind::Double), &w[1].to_kind(Kind::Double), -1, 1e-8).sum(Kind::Double))
            .collect();
        sum += Tensor::stack(&cos, 0);
        tokens += batch.numel() as i64;
    }
    (sum / tokens as f64).neg() + 1.0
}

/// The smaller model without the `removed` units, and the config changes.
fn shrink(model: &DecoderModel, unit: Unit, removed: &[Removed]) -> Result<(DecoderModel, Vec<String>)> {
    let old = &model.config;
    let mut cfg = old.clone();
    let mut changes = Vec::new();
    let kept_of = |r: &Removed, n: i64| -> Vec<i64> { (0..n).filter(|u| !r.units.contains(u)).collect() };
    let gone = removed.first().map_or(0, |r| r.units.len() as i64);
    match unit {
        Unit::Heads => {
            let hu = HeadUnits::of(old);
            cfg.num_attention_heads = old.num_attention_heads - gone * hu.queries;
            if hu.owns_kv {
                cfg.num_key_value_heads = old.num_key_value_heads - gone;
            }
            cfg.head_dim = Some(old.head_dim());
            changes.push(format!("num_attention_heads: {} -> {}", old.num_attention_heads, cfg.num_attention_heads));
            changes.push(format!("num_key_value_heads: {} -> {}", old.num_key_value_heads, cfg.num_key_value_heads));
            if cfg.model_type == ModelType::Gpt2 && cfg.head_dim() * cfg.num_attention_heads != cfg.hidden_size {
                // GPT-2's config has no head width of its own: heads are n_embd / n_head wide.
                cfg.model_type = ModelType::Stlm;
                changes.push("model_type: gpt2 -> stlm (GPT-2 cannot express fewer heads of the same width)".into());
            }
        }
        Unit::Neurons => {
            cfg.intermediate_size = old.intermediate_size - gone;
            changes.push(format!("intermediate_size: {} -> {}", old.intermediate_size, cfg.intermediate_size));
        }
        Unit::Experts => {
            if let Some(m) = cfg.moe.as_mut() {
                m.num_experts -= gone;
                changes.push(format!("moe.num_experts: {} -> {}", m.num_experts + gone, m.num_experts));
            }
        }
        Unit::Layers => {
            let kept = kept_of(&removed[0], old.num_hidden_layers);
            cfg.num_hidden_layers = kept.len() as i64;
            if !old.attention.is_empty() {
                cfg.attention = kept.iter().map(|&i| old.layer_attention(i as usize)).collect::<Vec<AttentionKind>>();
            }
            if let Some(m) = cfg.moe.as_mut() {
                // Every block is alike (checked), so the pattern can be every block.
                let all_moe = old.layer_moe(0).is_some();
                m.sparse_step = 1;
                m.dense_layers = if all_moe { vec![] } else { (0..cfg.num_hidden_layers).collect() };
            }
            changes.push(format!("num_hidden_layers: {} -> {}", old.num_hidden_layers, cfg.num_hidden_layers));
        }
    }
    let smaller = DecoderModel::new(cfg, model.device())?;
    // Each block's layers copy the units they keep into the smaller block.
    let hu = HeadUnits::of(old);
    let plan: Vec<(usize, KeepUnits)> = match unit {
        Unit::Layers => kept_of(&removed[0], old.num_hidden_layers).into_iter().map(|i| (i as usize, KeepUnits::default())).collect(),
        _ => (0..old.num_hidden_layers as usize)
            .map(|i| {
                let r = &removed[i];
                let keep = match unit {
                    Unit::Heads => {
                        let kept = kept_of(r, hu.units);
                        let queries = kept.iter().flat_map(|&u| u * hu.queries..(u + 1) * hu.queries).collect();
                        let kv = if hu.owns_kv { kept } else { (0..old.num_key_value_heads).collect() };
                        KeepUnits { query_heads: Some(queries), kv_heads: Some(kv), ..Default::default() }
                    }
                    Unit::Neurons => KeepUnits { neurons: Some(kept_of(r, old.intermediate_size)), ..Default::default() },
                    Unit::Experts => KeepUnits { experts: Some(kept_of(r, old.moe.as_ref().map_or(0, |m| m.num_experts))), ..Default::default() },
                    Unit::Layers => unreachable!("whole blocks are kept above"),
                };
                (i, keep)
            })
            .collect(),
    };
    model.keep_into(&smaller, &plan)?;
    let mut smaller = smaller;
    smaller.set_kind(model.kind());
    Ok((smaller, changes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn model(extra: &str, seed: i64) -> DecoderModel {
        let text = format!("vocab_size = 40\nhidden_size = 32\nintermediate_size = 24\nnum_hidden_layers = 3\nmax_position_embeddings = 64\n{extra}");
        let cfg = ModelConfig::from_toml_str(&text, std::path::Path::new("t.toml")).unwrap();
        tch::manual_seed(seed);
        DecoderModel::new(cfg, Device::Cpu).unwrap()
    }

    fn calib() -> Vec<Tensor> {
        vec![Tensor::randint(40, [2, 12], (Kind::Int64, Device::Cpu)), Tensor::randint(40, [3, 12], (Kind::Int64, Device::Cpu))]
    }

    fn logits(m: &DecoderModel, ids: &Tensor) -> Tensor {
        let _g = tch::no_grad_guard();
        m.forward(ids)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// Zeroes the output weights of the removed units (o_proj columns of their query heads,
    /// down_proj columns of their neurons): the masked model the shrunk one must equal.
    fn mask_removed(m: &DecoderModel, unit: Unit, removed: &[Removed]) {
        let _g = tch::no_grad_guard();
        let (d, hu) = (m.config.head_dim(), HeadUnits::of(&m.config));
        for r in removed {
            let layer = &m.layers[r.layer.unwrap()];
            for &u in &r.units {
                let (w, cols) = match unit {
                    Unit::Heads => (layer.self_attn.o_proj.weight.value(), (u * hu.queries * d, hu.queries * d)),
                    _ => (layer.mlp.dense().unwrap().down_proj.weight.value(), (u, 1)),
                };
                let _ = w.narrow(1, cols.0, cols.1).shallow_clone().fill_(0.0);
            }
        }
    }

    #[test]
    fn shrunk_model_gives_the_masked_models_logits() {
        let _lock = crate::tests::RNG.lock().unwrap_or_else(|e| e.into_inner());
        let ids = Tensor::randint(40, [2, 10], (Kind::Int64, Device::Cpu));
        let data = calib();
        for (extra, unit) in [
            ("num_attention_heads = 4\nnum_key_value_heads = 4\n", Unit::Heads),
            ("num_attention_heads = 4\nnum_key_value_heads = 2\nattention_bias = true\n", Unit::Heads),
            ("num_attention_heads = 4\nnum_key_value_heads = 1\n", Unit::Heads),
            ("num_attention_heads = 4\npreset = \"gpt2\"\n", Unit::Heads),
            ("num_attention_heads = 2\n", Unit::Neurons),
            ("num_attention_heads = 2\npreset = \"gpt2\"\n", Unit::Neurons),
            // Kinds that learn per-head tensors: SSMax scales, Dynamic Mask Attention's A/dt_proj.
            ("num_attention_heads = 4\nmodel_type = \"stlm\"\nattention = [{ kind = \"ssmax\" }]\n", Unit::Heads),
            (
                "num_attention_heads = 4\nnum_key_value_heads = 2\nmodel_type = \"stlm\"\nresidual_scales = true\nattention = [{ kind = \"doge-dma\", keep_window_size = 8 }]\n",
                Unit::Heads,
            ),
        ] {
            for importance in [Importance::Magnitude, Importance::Activation, Importance::Taylor] {
                let mut m = model(extra, 5);
                let opts = StructuredOptions { unit, amount: 0.5, importance };
                let (small, report) = prune_structured(&mut m, &data, &opts, false).unwrap();
                assert!(report.params_after < report.params_before, "{extra}");
                mask_removed(&m, unit, &report.removed);
                let diff = max_diff(&logits(&small, &ids), &logits(&m, &ids));
                assert!(diff < 1e-5, "{extra} {importance:?}: {diff}");
                assert_eq!(report.units_after, report.units_before - report.removed[0].units.len() as i64);
            }
        }
    }

    #[test]
    fn units_that_are_exactly_zero_go_first_and_change_nothing() {
        let _lock = crate::tests::RNG.lock().unwrap_or_else(|e| e.into_inner());
        let ids = Tensor::randint(40, [2, 10], (Kind::Int64, Device::Cpu));
        let data = calib();
        for unit in [Unit::Heads, Unit::Neurons] {
            for importance in [Importance::Magnitude, Importance::Activation, Importance::Taylor] {
                let mut m = model("num_attention_heads = 4\nnum_key_value_heads = 2\n", 6);
                let zeroed: Vec<i64> = vec![1];
                {
                    let _g = tch::no_grad_guard();
                    for layer in &m.layers {
                        let a = &layer.self_attn;
                        let zero = |w: &Tensor, dim: i64, start: i64, len: i64| {
                            let _ = w.narrow(dim, start, len).shallow_clone().fill_(0.0);
                        };
                        match unit {
                            Unit::Heads => {
                                // Unit 1 = key/value head 1 and query heads 2, 3 (head_dim 8).
                                zero(&a.q_proj.weight.value(), 0, 16, 16);
                                zero(&a.k_proj.weight.value(), 0, 8, 8);
                                zero(&a.v_proj.weight.value(), 0, 8, 8);
                                zero(&a.o_proj.weight.value(), 1, 16, 16);
                            }
                            _ => {
                                let mlp = layer.mlp.dense().unwrap();
                                zero(&mlp.gate_proj.as_ref().unwrap().weight.value(), 0, 1, 1);
                                zero(&mlp.up_proj.weight.value(), 0, 1, 1);
                                zero(&mlp.down_proj.weight.value(), 1, 1, 1);
                            }
                        }
                    }
                }
                let amount = if unit == Unit::Heads { 0.5 } else { 1.0 / 24.0 };
                let (small, report) = prune_structured(&mut m, &data, &StructuredOptions { unit, amount, importance }, false).unwrap();
                for r in &report.removed {
                    assert_eq!(r.units, zeroed, "{unit:?} {importance:?}: scores {:?}", r.scores);
                }
                let diff = max_diff(&logits(&small, &ids), &logits(&m, &ids));
                assert!(diff < 1e-5, "{unit:?} {importance:?}: {diff}");
            }
        }
    }

    #[test]
    fn a_block_that_adds_nothing_has_no_influence_and_goes() {
        let _lock = crate::tests::RNG.lock().unwrap_or_else(|e| e.into_inner());
        let ids = Tensor::randint(40, [2, 10], (Kind::Int64, Device::Cpu));
        let mut m = model("model_type = \"stlm\"\nnum_attention_heads = 2\nattention = [{ kind = \"dense\" }, { kind = \"sliding-window\", window = 4 }, { kind = \"dense\" }]\n", 7);
        {
            let _g = tch::no_grad_guard();
            let _ = m.layers[1].self_attn.o_proj.weight.value().shallow_clone().fill_(0.0);
            let _ = m.layers[1].mlp.dense().unwrap().down_proj.weight.value().shallow_clone().fill_(0.0);
        }
        let opts = StructuredOptions { unit: Unit::Layers, amount: 0.34, importance: Importance::Activation };
        let (small, report) = prune_structured(&mut m, &calib(), &opts, false).unwrap();
        assert_eq!(report.removed[0].units, vec![1], "scores {:?}", report.removed[0].scores);
        assert!(report.removed[0].scores[1].abs() < 1e-12);
        assert_eq!(small.config.num_hidden_layers, 2);
        // Blocks 0 and 2 keep their attention kinds (dense, then block 2's dense again).
        assert_eq!(small.config.attention, vec![AttentionKind::Dense, AttentionKind::Dense]);
        assert!(max_diff(&logits(&small, &ids), &logits(&m, &ids)) < 1e-5);
        let magnitude = StructuredOptions { importance: Importance::Magnitude, ..opts };
        assert!(prune_structured(&mut m, &calib(), &magnitude, false).unwrap_err().to_string().contains("block influence"));
    }

    #[test]
    fn experts_with_the_least_load_go() {
        let _lock = crate::tests::RNG.lock().unwrap_or_else(|e| e.into_inner());
        let mut m = model("model_type = \"stlm\"\nnum_attention_heads = 2\nmoe = { num_experts = 4, router = { kind = \"top-k\", k = 2 } }\n", 8);
        let data = calib();
        let opts = StructuredOptions { unit: Unit::Experts, amount: 0.25, importance: Importance::Activation };
        let (small, report) = prune_structured(&mut m, &data, &opts, false).unwrap();
        assert_eq!(small.config.moe.as_ref().unwrap().num_experts, 3);
        for r in &report.removed {
            let min = r.scores.iter().cloned().fold(f64::MAX, f64::min);
            assert_eq!(r.scores[r.units[0] as usize], min);
        }
        let _ = logits(&small, &data[0]);
        let too_many = StructuredOptions { amount: 0.75, ..opts };
        assert!(prune_structured(&mut m, &data, &too_many, false).unwrap_err().to_string().contains("routed to"));
        let mut dense = model("num_attention_heads = 2\n", 9);
        assert!(prune_structured(&mut dense, &data, &opts, false).unwrap_err().to_string().contains("no MoE"));
    }
}
