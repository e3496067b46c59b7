//! Dynamic depth: early exit with the shared head (CALM, Schuster et al. 2022), LayerSkip
//! training (Elhoushi et al. 2024: layer dropout rising with depth and an early-exit loss) and
//! self-speculative decoding (draft with the first layers, verify with all of them; the output
//! is full-depth greedy decoding's).
//!
//! Every exit goes through the model's own final norm and head, so any model can exit early; a
//! LayerSkip-trained one is made for it. A token that exits at layer `l` still writes keys and
//! values for the layers it skips, computed from its state at `l` (CALM's state copying), so
//! later tokens attend over every position in every layer.

use crate::generate::{penalize, GenerationConfig, Sampler};
use crate::lm::{Batch, LanguageModel, StepOutput};
pub use crate::depth::{Depth, DepthReport, EarlyExit, ExitMeasure, LayerSkip};
use crate::{DecoderModel, ModelConfig, ModelError, Result};
use stlm_attention::{AttentionMask, KvCache};
use stlm_core::{Mode, OptionError};
use tch::{nn, Kind, Tensor};

/// Refuses what exits cannot serve: a stream whose width changes between layers (the head reads
/// `hidden_size`).
fn check_uniform(config: &ModelConfig, what: &str) -> Result<()> {
    if !config.uniform_width() {
        return Err(ModelError::Input(format!("{what} needs one stream width in every layer (this model's `layer_shapes` or `residual_root` changes it)")));
    }
    Ok(())
}

impl DecoderModel {
    /// Logits `[1, 1, vocab]` of `token` at `position` after the layers `depth` chooses, with
    /// the number applied; appends its keys and values to `cache` (batch 1) and advances it.
    pub fn step_depth(&self, token: i64, position: i64, cache: &mut KvCache, depth: Depth) -> (Tensor, usize) {
        let device = self.device();
        let ids = Tensor::from_slice(&[token]).view([1, 1]).to_device(device);
        let positions = Tensor::from_slice(&[position]).view([1, 1]).to_device(device);
        let (mut x, rotary) = self.embed(&ids, &positions);
        let mask = AttentionMask::causal(1, cache.len(), None, device);
        let total = self.depth();
        let applied = match depth {
            Depth::Draft(n) => n.clamp(1, total),
            Depth::Full | Depth::Exit(_) => total,
        };
        for i in 0..applied {
            x = self.applied(i).forward_mode(&x, rotary.as_ref(), &positions, &mask, Some((cache, i)), Mode::Eval).0;
            let Depth::Exit(rule) = depth else { continue };
            if i + 1 < total && i + 1 >= rule.min_layers {
                let logits = self.head(&self.final_norm(&x));
                let row: Vec<f32> = Vec::try_from(logits.reshape([-1]).to_kind(Kind::Float)).unwrap_or_default();
                if rule.confident(&row) {
                    for skipped in i + 1..total {
                        self.applied(skipped).write_kv(&x, rotary.as_ref(), cache, skipped);
                    }
                    cache.advance(1);
                    return (logits, i + 1);
                }
            }
        }
        cache.advance(1);
        (self.head(&self.final_norm(&x)), applied)
    }

    /// A batch-1 cache for `prompt` plus `new_tokens` positions, filled with `prompt[..fill]` at
    /// full depth, and the logits `[1, vocab]` after it (`None` when `fill` is 0).
    fn prefill(&self, prompt: &[i64], fill: usize, new_tokens: i64) -> Result<(KvCache, Option<Tensor>)> {
        if prompt.is_empty() {
            return Err(ModelError::Input("empty prompt: generation needs at least one token to start from".into()));
        }
        self.check_ids(prompt)?;
        let (n, device) = (fill as i64, self.device());
        let capacity = prompt.len() as i64 + new_tokens;
        let limit = self.config.max_position_embeddings;
        if self.embed_positions.is_some() && capacity > limit {
            let why = format!("plus the prompt's {} tokens exceeds the model's {limit} learned positions", prompt.len());
            return Err(OptionError::new("max_new_tokens", new_tokens, why).into());
        }
        let mut cache = self.new_cache(1, capacity);
        if n == 0 {
            return Ok((cache, None));
        }
        let ids = Tensor::from_slice(&prompt[..fill]).view([1, n]).to_device(device);
        let positions = Tensor::arange(n, (Kind::Int64, device)).view([1, n]);
        let last = self.hidden_states(&ids, &positions, &AttentionMask::Causal, Some(&mut cache)).narrow(1, n - 1, 1);
        Ok((cache, Some(self.head(&last).select(1, 0))))
    }
}

/// Generates a continuation of `prompt` where each token leaves the stack at the first layer
/// (from `rule.min_layers` on) whose exit is confident, sampled as `cfg` says; `on_token` is
/// called for each new token. The prompt runs at full depth except its last token, which is the
/// first decoding step. One sequence; the fused CPU step when the model allows it.
pub fn generate_early_exit(
    model: &DecoderModel,
    prompt: &[i64],
    cfg: &GenerationConfig,
    rule: &EarlyExit,
    mut on_token: impl FnMut(i64),
) -> Result<(Vec<i64>, DepthReport)> {
    cfg.validate()?;
    check_uniform(&model.config, "early exit")?;
    rule.validate(model.depth())?;
    let _guard = tch::no_grad_guard();
    let (mut cache, _) = model.prefill(prompt, prompt.len() - 1, cfg.max_new_tokens)?;
    let mut fast = crate::FastDecoder::new(model);
    let mut sampler = Sampler::new(cfg.seed);
    let mut seen = prompt.to_vec();
    let mut report = DepthReport { depth: model.depth(), ..Default::default() };
    let mut out = Vec::new();
    let mut last = prompt[prompt.len() - 1];
    for _ in 0..cfg.max_new_tokens {
        let position = cache.len();
        let (logits, used) = match fast.as_mut() {
            Some(f) => f.step_depth(last, position, &mut cache, Depth::Exit(rule)),
            None => model.step_depth(last, position, &mut cache, Depth::Exit(rule)),
        };
        let mut logits = logits.reshape([1, -1]);
        if cfg.repetition_penalty != 1.0 {
            let ids = Tensor::from_slice(&seen).view([1, -1]).to_device(logits.device());
            logits = penalize(&logits, &ids, cfg.repetition_penalty);
        }
        let id = sampler.sample(&logits, cfg)?[0];
        out.push(id);
        seen.push(id);
        on_token(id);
        report.tokens += 1;
        report.layers += used as u64;
        if cfg.eos_token_ids.contains(&id) {
            break;
        }
        last = id;
    }
    Ok((out, report))
}

/// Logits `[n, vocab]` of every position of `ids` (one window from position 0, teacher forced)
/// when each position exits as `rule` says, and the layers applied, summed over positions: the
/// quality side of early exit, for perplexity.
pub fn early_exit_logits(model: &DecoderModel, ids: &[i64], rule: &EarlyExit) -> Result<(Tensor, u64)> {
    check_uniform(&model.config, "early exit")?;
    rule.validate(model.depth())?;
    model.check_ids(ids)?;
    let _guard = tch::no_grad_guard();
    let mut cache = model.new_cache(1, ids.len() as i64);
    let mut fast = crate::FastDecoder::new(model);
    let (mut rows, mut layers) = (Vec::with_capacity(ids.len()), 0);
    for (position, &id) in ids.iter().enumerate() {
        let (logits, used) = match fast.as_mut() {
            Some(f) => f.step_depth(id, position as i64, &mut cache, Depth::Exit(rule)),
            None => model.step_depth(id, position as i64, &mut cache, Depth::Exit(rule)),
        };
        rows.push(logits.reshape([1, -1]).to_device(model.device()));
        layers += used as u64;
    }
    Ok((Tensor::cat(&rows, 0), layers))
}

/// Checks what [`generate_self_speculative`] needs: greedy settings, `1 <= draft_layers <
/// depth`, at least one draft token, one stream width and no rolling (sliding-window) cache.
pub fn check_self_speculative(model: &DecoderModel, cfg: &GenerationConfig, draft_layers: usize, draft_tokens: usize) -> Result<()> {
    cfg.validate()?;
    check_uniform(&model.config, "self-speculative decoding")?;
    let depth = model.depth();
    if cfg.temperature != 0.0 || cfg.repetition_penalty != 1.0 {
        return Err(OptionError::new("temperature", cfg.temperature, "self-speculative decoding is greedy (temperature 0, no repetition penalty)").into());
    }
    if draft_layers < 1 || draft_layers >= depth {
        let why = format!("the draft layers must be between 1 and {} (the model has {depth} layers)", depth.saturating_sub(1));
        return Err(OptionError::new("self_speculative", draft_layers, why).into());
    }
    if draft_tokens < 1 {
        return Err(OptionError::new("draft_tokens", draft_tokens, "must be at least 1").into());
    }
    if let Some(i) = (0..depth).find(|&i| model.applied(i).self_attn.attention.rolling_window().is_some()) {
        return Err(ModelError::Input(format!("self-speculative decoding: layer {i} is a sliding-window layer, whose rolling cache cannot forget rejected drafts")));
    }
    Ok(())
}

/// Greedy generation by self-speculative decoding: the first `draft_layers` layers (and the
/// shared head) propose up to `draft_tokens` tokens, all layers verify them in one pass, and the
/// longest agreeing prefix plus the full model's next token are kept, so the output is full-depth
/// greedy decoding's. One sequence; `on_token` is called for each new token.
pub fn generate_self_speculative(
    model: &DecoderModel,
    prompt: &[i64],
    cfg: &GenerationConfig,
    draft_layers: usize,
    draft_tokens: usize,
    mut on_token: impl FnMut(i64),
) -> Result<(Vec<i64>, DepthReport)> {
    check_self_speculative(model, cfg, draft_layers, draft_tokens)?;
    let depth = model.depth();
    let _guard = tch::no_grad_guard();
    let device = model.device();
    let (mut cache, logits) = model.prefill(prompt, prompt.len(), cfg.max_new_tokens + draft_tokens as i64)?;
    let logits = logits.expect("a prompt of at least one token");
    let mut fast = crate::FastDecoder::new(model);
    let mut sampler = Sampler::new(cfg.seed);
    let mut report = DepthReport { depth, ..Default::default() };
    let mut out = Vec::new();
    let mut next = sampler.sample(&logits, cfg)?[0];
    let budget = cfg.max_new_tokens.max(0) as usize;
    // Emits `id`; true when generation is over.
    let mut emit = |id: i64, out: &mut Vec<i64>, report: &mut DepthReport| {
        out.push(id);
        on_token(id);
        report.tokens += 1;
        report.layers += depth as u64;
        cfg.eos_token_ids.contains(&id) || out.len() >= budget
    };
    if budget == 0 || emit(next, &mut out, &mut report) {
        return Ok((out, report));
    }
    loop {
        let base = cache.len();
        let k = draft_tokens.min(budget - out.len());
        let mut drafts = Vec::with_capacity(k);
        let mut t = next;
        for j in 0..k {
            let (l, _) = match fast.as_mut() {
                Some(f) => f.step_depth(t, base + j as i64, &mut cache, Depth::Draft(draft_layers)),
                None => model.step_depth(t, base + j as i64, &mut cache, Depth::Draft(draft_layers)),
            };
            t = sampler.sample(&l.reshape([1, -1]), cfg)?[0];
            drafts.push(t);
        }
        cache.rewind(base).map_err(ModelError::Input)?;
        // Verify `next` and the drafts at full depth in one pass.
        let tokens: Vec<i64> = std::iter::once(next).chain(drafts.iter().copied()).collect();
        let n = tokens.len() as i64;
        let ids = Tensor::from_slice(&tokens).view([1, n]).to_device(device);
        let positions = (Tensor::arange(n, (Kind::Int64, device)) + base).view([1, n]);
        let mask = AttentionMask::causal(n, base, None, device);
        let verified = model.forward_ext(&ids, &positions, &mask, Some(&mut cache)).select(0, 0); // [n, vocab]
        let full = sampler.sample(&verified, cfg)?;
        report.verifications += 1;
        report.drafted += k as u64;
        let agreed = drafts.iter().zip(&full).take_while(|(d, f)| d == f).count();
        report.accepted += agreed as u64;
        for &id in &drafts[..agreed] {
            if emit(id, &mut out, &mut report) {
                return Ok((out, report));
            }
        }
        next = full[agreed];
        cache.rewind(base + agreed as i64 + 1).map_err(ModelError::Input)?;
        if emit(next, &mut out, &mut report) {
            return Ok((out, report));
        }
    }
}

/// A token model trained with LayerSkip: the same weights, checkpoints and saved directory, a
/// training step with layer dropout and early-exit losses (evaluation passes are the model's).
pub struct LayerSkipModel<'m> {
    model: &'m DecoderModel,
    skip: LayerSkip,
}

impl<'m> LayerSkipModel<'m> {
    /// `model` trained with `skip`; refused for a stream whose width changes with depth.
    pub fn new(model: &'m DecoderModel, skip: LayerSkip) -> Result<Self> {
        skip.validate().map_err(|e| ModelError::Input(format!("layer_skip: {e}")))?;
        check_uniform(&model.config, "LayerSkip")?;
        Ok(LayerSkipModel { model, skip })
    }

    /// Keep (1) or skip (0) layer `layer` for each row of `inputs`, `[b, 1, 1]`: drawn from a
    /// hash of the row's ids, so a batch always gets the same draw (exact resume, and the same
    /// draw for a row whichever rank holds it).
    fn keep(&self, rows: &[Vec<i64>], layer: usize, device: tch::Device) -> Option<Tensor> {
        let depth = self.model.depth();
        let p = self.skip.max_dropout * layer as f64 / (depth.max(2) - 1) as f64;
        if p <= 0.0 {
            return None;
        }
        let keep: Vec<f32> = rows.iter().map(|row| if unit_hash(row, layer as u64) < p { 0.0 } else { 1.0 }).collect();
        Some(Tensor::from_slice(&keep).view([-1, 1, 1]).to_device(device))
    }
}

/// A number in [0, 1) from the ids of `row` and `salt` (FNV-1a, then SplitMix64's finaliser).
fn unit_hash(row: &[i64], salt: u64) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &id in row {
        for byte in id.to_le_bytes() {
            h = (h ^ byte as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    let mut z = h ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

impl LanguageModel for LayerSkipModel<'_> {
    fn var_store(&self) -> &nn::VarStore {
        self.model.var_store()
    }
    fn model_config(&self) -> &ModelConfig {
        &self.model.config
    }
    fn parameters(&self) -> Vec<stlm_core::Parameter> {
        self.model.parameters()
    }
    fn step(&self, batch: &Batch, mode: Mode) -> Result<StepOutput> {
        if !mode.is_train() {
            return LanguageModel::step(self.model, batch, mode);
        }
        let m = self.model;
        let (b, s) = (batch.inputs.size()[0], batch.inputs.size()[1]);
        let flat: Vec<i64> = Vec::try_from(batch.inputs.to_device(tch::Device::Cpu).reshape([-1]))?;
        let rows: Vec<Vec<i64>> = flat.chunks(s.max(1) as usize).map(<[i64]>::to_vec).collect();
        let targets = batch.targets.reshape([-1]);
        let nats = |x: &Tensor| m.head(&m.final_norm(x)).reshape([b * s, -1]).cross_entropy_for_logits(&targets);
        let pass = m.block_pass_mode(&batch.inputs, mode);
        let (depth, mut x, mut moe) = (m.depth(), pass.input.shallow_clone(), Vec::new());
        let (mut exits, mut weights) = (Vec::new(), 0.0);
        for i in 0..depth {
            let (y, stats) = m.run_block_stats(i, &pass, &x);
            moe.extend(stats.map(|st| (i, st)));
            x = match self.keep(&rows, i, x.device()) {
                Some(keep) => &x + keep * (y - &x),
                None => y,
            };
            if i + 1 < depth && self.skip.exit_loss > 0.0 {
                exits.push(nats(&x) * (i + 1) as f64);
                weights += (i + 1) as f64;
            }
        }
        let loss = nats(&x);
        let exit = (!exits.is_empty()).then(|| Tensor::stack(&exits, 0).sum(Kind::Float) * (self.skip.exit_loss / weights));
        let updates = m.balance_updates(&moe);
        Ok(StepOutput::with_moe(loss, moe, exit.map(|e| ("early_exit", e)), updates))
    }
    fn position_nats(&self, inputs: &Tensor, targets: &Tensor) -> Result<Tensor> {
        self.model.position_nats(inputs, targets)
    }
    fn save(&self, dir: &std::path::Path, tokenizer: Option<&std::path::Path>) -> Result<()> {
        LanguageModel::save(self.model, dir, tokenizer)
    }
    fn load_weights(&self, path: &std::path::Path) -> Result<()> {
        LanguageModel::load_weights(self.model, path)
    }
    fn flops_per_token(&self, seq: i64) -> Option<f64> {
        LanguageModel::flops_per_token(self.model, seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_compare_with_their_thresholds() {
        let logits = [2.0f32, 1.0, 0.0];
        let (p1, p2) = (0.665241, 0.244728);
        let rule = |measure, threshold| EarlyExit { measure, threshold, min_layers: 1 };
        assert!(rule(ExitMeasure::Softmax, p1 - 1e-4).confident(&logits));
        assert!(!rule(ExitMeasure::Softmax, p1 + 1e-4).confident(&logits));
        assert!(rule(ExitMeasure::Margin, p1 - p2 - 1e-4).confident(&logits));
        assert!(!rule(ExitMeasure::Margin, p1 - p2 + 1e-4).confident(&logits));
        let entropy = -[p1, p2, 1.0 - p1 - p2].iter().map(|p: &f64| p * p.ln()).sum::<f64>();
        assert!(rule(ExitMeasure::Entropy, entropy + 1e-4).confident(&logits));
        assert!(!rule(ExitMeasure::Entropy, entropy - 1e-4).confident(&logits));
        assert!(rule(ExitMeasure::Softmax, 0.5).validate(4).is_ok());
        assert!(rule(ExitMeasure::Softmax, f64::NAN).validate(4).is_err());
        let e = EarlyExit { min_layers: 5, ..rule(ExitMeasure::Softmax, 0.5) }.validate(4).unwrap_err().to_string();
        assert!(e.contains("exit_min_layers"), "{e}");
    }

    #[test]
    fn the_row_hash_is_uniform_enough_and_fixed() {
        let draws: Vec<f64> = (0..4000).map(|i| unit_hash(&[i, 7, 3], 2)).collect();
        let below = draws.iter().filter(|&&u| u < 0.25).count();
        assert!((900..1100).contains(&below), "{below} of 4000 below 0.25");
        assert_eq!(unit_hash(&[1, 2, 3], 5), unit_hash(&[1, 2, 3], 5));
        assert_ne!(unit_hash(&[1, 2, 3], 5), unit_hash(&[1, 2, 3], 6));
        assert!(LayerSkip { max_dropout: 1.0, exit_loss: 0.0 }.validate().unwrap_err().contains("max_dropout"));
    }
}
