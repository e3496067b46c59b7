//! Text generation with a preallocated KV cache: greedy, temperature, top-k, top-p, repetition
//! penalty, seeded sampling, stop at EOS or a token budget, and batches with left padding.

use crate::decode::FastDecoder;
use crate::{DecoderModel, ModelError, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use stlm_attention::AttentionMask;
use stlm_core::OptionError;
use tch::{Kind, Tensor};

/// How to pick each next token.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    /// Tokens to generate at most (per sequence).
    pub max_new_tokens: i64,
    /// Softmax temperature; 0 means greedy.
    pub temperature: f64,
    /// Keep only the k most likely tokens (0: off).
    pub top_k: i64,
    /// Keep the smallest set of tokens whose probability reaches p (1.0: off).
    pub top_p: f64,
    /// Divide positive (multiply negative) logits of tokens already present (1.0: off), as in
    /// transformers.
    pub repetition_penalty: f64,
    /// Seed of the sampler.
    pub seed: u64,
    /// Generation of a sequence stops after any of these ids.
    pub eos_token_ids: Vec<i64>,
    /// Id written after a sequence has stopped, and used for left padding.
    pub pad_token_id: i64,
    /// Only ids below this are generated: the tokenizer's size, for a model whose head is wider
    /// than its tokenizer (a vocabulary padded for speed, an imported model). None: every id.
    pub vocab_limit: Option<i64>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 64,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
            eos_token_ids: Vec::new(),
            pad_token_id: 0,
            vocab_limit: None,
        }
    }
}

impl GenerationConfig {
    #[allow(clippy::neg_cmp_op_on_partial_ord)] // the negations reject NaN
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |name, value: &dyn std::fmt::Display, why: &str| Err(OptionError::new(name, value, why).into());
        if self.max_new_tokens < 0 {
            return bad("max_new_tokens", &self.max_new_tokens, "must be >= 0");
        }
        // Written so that NaN fails each check.
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature", &self.temperature, "must be >= 0");
        }
        if self.top_k < 0 {
            return bad("top_k", &self.top_k, "must be >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", &self.top_p, "must be in (0, 1]");
        }
        if !(self.repetition_penalty > 0.0) {
            return bad("repetition_penalty", &self.repetition_penalty, "must be > 0");
        }
        if let Some(n) = self.vocab_limit.filter(|&n| n < 1) {
            return bad("vocab_limit", &n, "must be >= 1");
        }
        Ok(())
    }
}

/// Applies the repetition penalty to `logits` `[b, vocab]` for the ids in `seen` `[b, n]`.
pub(crate) fn penalize(logits: &Tensor, seen: &Tensor, penalty: f64) -> Tensor {
    let picked = logits.gather(1, seen, false);
    let scaled = (&picked * penalty).where_self(&picked.lt(0.0), &(&picked / penalty));
    logits.scatter(1, seen, &scaled)
}

/// Picks next tokens from logits with its own seeded random stream, so that a seed gives the
/// same text whatever else the process does with libtorch's global generator.
pub struct Sampler {
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Sampler { rng: ChaCha8Rng::seed_from_u64(seed) }
    }

    /// Next tokens `[b]` (on the host) from last-position logits `[b, vocab]`, below
    /// `cfg.vocab_limit` when it is set.
    pub fn sample(&mut self, logits: &Tensor, cfg: &GenerationConfig) -> Result<Vec<i64>> {
        let vocab = logits.size()[1];
        let logits = match cfg.vocab_limit {
            Some(n) if n < vocab => logits.narrow(1, 0, n),
            _ => logits.shallow_clone(),
        };
        let logits = &logits;
        if cfg.temperature == 0.0 {
            return Ok(Vec::try_from(logits.argmax(-1, false))?);
        }
        let probs = filtered_probs(logits, cfg).to_device(tch::Device::Cpu);
        let vocab = probs.size()[1] as usize;
        let flat: Vec<f32> = Vec::try_from(probs.reshape([-1]))?;
        Ok(flat
            .chunks(vocab)
            .map(|row| {
                let total: f64 = row.iter().map(|&p| p as f64).sum();
                let mut u = self.rng.random::<f64>() * total;
                let last_nonzero = row.iter().rposition(|&p| p > 0.0).unwrap_or(0);
                for (i, &p) in row.iter().enumerate() {
                    u -= p as f64;
                    if u < 0.0 && p > 0.0 {
                        return i as i64;
                    }
                }
                last_nonzero as i64
            })
            .collect())
    }
}

/// Probabilities `[b, vocab]` after temperature, top-k and top-p.
pub fn filtered_probs(logits: &Tensor, cfg: &GenerationConfig) -> Tensor {
    let mut logits = logits.to_kind(Kind::Float) / cfg.temperature.max(1e-6);
    let vocab = logits.size()[1];
    if cfg.top_k > 0 && cfg.top_k < vocab {
        let (top, _) = logits.topk(cfg.top_k, -1, true, true);
        let kth = top.narrow(1, cfg.top_k - 1, 1);
        logits = logits.masked_fill(&logits.lt_tensor(&kth), f64::NEG_INFINITY);
    }
    if cfg.top_p < 1.0 {
        let (sorted, order) = logits.sort(-1, true);
        let probs = sorted.softmax(-1, Kind::Float);
        // Drop a token when the tokens before it already reach top_p (the first always stays).
        let before = probs.cumsum(-1, Kind::Float) - &probs;
        let drop_sorted = before.ge(cfg.top_p);
        let drop = drop_sorted.scatter(1, &order, &drop_sorted);
        logits = logits.masked_fill(&drop, f64::NEG_INFINITY);
    }
    logits.softmax(-1, Kind::Float)
}

/// Generates continuations of `prompts` (token ids, any lengths, batched with left padding).
///
/// `on_token(row, id)` is called for each new token as soon as it is chosen, so callers can
/// stream. Returns the new tokens of each prompt, without padding, up to and including EOS.
pub fn generate(
    model: &DecoderModel,
    prompts: &[Vec<i64>],
    cfg: &GenerationConfig,
    mut on_token: impl FnMut(usize, i64),
) -> Result<Vec<Vec<i64>>> {
    cfg.validate()?;
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(ModelError::Input("empty prompt: generation needs at least one token to start from".into()));
    }
    for p in prompts {
        model.check_ids(p)?;
    }
    model.check_ids(&[cfg.pad_token_id]).map_err(|e| ModelError::Input(format!("pad token: {e}")))?;
    let _guard = tch::no_grad_guard();
    let device = model.device();
    let b = prompts.len() as i64;
    let prompt_len = prompts.iter().map(Vec::len).max().unwrap_or(0) as i64;
    let capacity = prompt_len + cfg.max_new_tokens;
    let limit = model.config.max_position_embeddings;
    if model.embed_positions.is_some() && capacity > limit {
        let why = format!("plus the prompt's {prompt_len} tokens exceeds the model's {limit} learned positions");
        return Err(OptionError::new("max_new_tokens", cfg.max_new_tokens, why).into());
    }
    let mut sampler = Sampler::new(cfg.seed);

    // Left padding: [b, prompt_len] ids and a validity mask over the whole cache.
    let padded: Vec<i64> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(cfg.pad_token_id, prompt_len as usize - p.len()).chain(p.iter().copied()))
        .collect();
    let ids = Tensor::from_slice(&padded).view([b, prompt_len]).to_device(device);
    let needs_padding = prompts.iter().any(|p| p.len() as i64 != prompt_len);
    let valid_prompt: Vec<bool> =
        prompts.iter().flat_map(|p| (0..prompt_len).map(move |i| i >= prompt_len - p.len() as i64)).collect();
    let key_valid = needs_padding.then(|| {
        let v = Tensor::from_slice(&valid_prompt).view([b, prompt_len]).to_device(device);
        Tensor::cat(&[v, Tensor::ones([b, cfg.max_new_tokens], (Kind::Bool, device))], 1)
    });
    let lengths = Tensor::from_slice(&prompts.iter().map(|p| p.len() as i64).collect::<Vec<_>>()).to_device(device);
    // Position of each prompt token counts real tokens only: [b, prompt_len].
    let positions = (Tensor::arange(prompt_len, (Kind::Int64, device)).unsqueeze(0)
        - (prompt_len - lengths.unsqueeze(1)))
    .clamp_min(0);
    let mut next_pos = lengths.unsqueeze(1); // [b, 1]

    let shortest = prompts.iter().map(Vec::len).min().unwrap_or(0) as i64;
    let mut cache = model.new_cache_padded(b, capacity, prompt_len - shortest);
    let mask =
        AttentionMask::causal(prompt_len, 0, key_valid.as_ref().map(|k| k.narrow(1, 0, prompt_len)).as_ref(), device);
    // Only the last position's logits are needed: the head runs on one position per row.
    let last = model.hidden_states(&ids, &positions, &mask, Some(&mut cache)).narrow(1, prompt_len - 1, 1);
    let mut logits = model.head(&last).select(1, 0); // [b, vocab]

    // One sequence of float32 on the CPU: the fused Rust step instead of libtorch (decode.rs).
    let mut fast = if b == 1 { FastDecoder::new(model) } else { None };
    let mut seen = ids.shallow_clone(); // [b, n] ids the repetition penalty looks at
    let mut out: Vec<Vec<i64>> = vec![Vec::new(); prompts.len()];
    let mut done = vec![false; prompts.len()];
    for step in 0..cfg.max_new_tokens {
        if cfg.repetition_penalty != 1.0 {
            logits = penalize(&logits, &seen, cfg.repetition_penalty);
        }
        let mut next = sampler.sample(&logits, cfg)?;
        for (row, id) in next.iter_mut().enumerate() {
            if done[row] {
                *id = cfg.pad_token_id;
                continue;
            }
            out[row].push(*id);
            on_token(row, *id);
            done[row] = cfg.eos_token_ids.contains(id);
        }
        if done.iter().all(|&d| d) || step + 1 == cfg.max_new_tokens {
            break;
        }
        if let Some(fast) = fast.as_mut() {
            if cfg.repetition_penalty != 1.0 {
                seen = Tensor::cat(&[&seen, &Tensor::from_slice(&next).view([b, 1])], 1);
            }
            let position = cache.len(); // one sequence, no padding: positions are cache slots
            logits = fast.step(next[0], position, &mut cache).select(1, -1);
            continue;
        }
        let next = Tensor::from_slice(&next).view([b, 1]).to_device(device);
        if cfg.repetition_penalty != 1.0 {
            seen = Tensor::cat(&[&seen, &next], 1);
        }
        let past = cache.len();
        let mask =
            AttentionMask::causal(1, past, key_valid.as_ref().map(|k| k.narrow(1, 0, past + 1)).as_ref(), device);
        logits = model.forward_ext(&next, &next_pos, &mask, Some(&mut cache)).select(1, -1);
        next_pos = &next_pos + 1;
    }
    Ok(out)
}

impl GenerationConfig {
    /// These settings for a token model with `config` and its tokenizer `tok`: stop at the
    /// config's and the tokenizer's end-of-text ids (unless `ignore_eos`), pad with the config's
    /// or the tokenizer's pad id, and choose only ids the tokenizer has (a head may be wider).
    pub fn for_tokenizer(self, config: &crate::ModelConfig, tok: &stlm_tokenizers::Tokenizer, ignore_eos: bool) -> Self {
        let in_vocab = |id: &i64| (0..config.vocab_size).contains(id);
        let mut eos = config.eos_token_id.clone();
        eos.extend(tok.eos_id().map(i64::from).filter(in_vocab));
        let pad = config.pad_token_id.or(tok.pad_id().map(i64::from).filter(in_vocab)).unwrap_or(0);
        let eos_token_ids = if ignore_eos { Vec::new() } else { eos };
        GenerationConfig { eos_token_ids, pad_token_id: pad, vocab_limit: Some(tok.vocab_size() as i64), ..self }
    }
}

/// `documents` texts sampled from `model` in batches of `batch_size` (batch `i` with seed
/// `cfg.seed + i`), starting from `prompts` in turn, each decoded with `tok` and followed by
/// `<|endoftext|>` (readable as training text): a corpus for sequence-level distillation.
/// `on_batch(n)` is told each batch's size. Returns the text and the tokens generated.
pub fn sample_corpus(
    model: &DecoderModel,
    tok: &stlm_tokenizers::Tokenizer,
    prompts: &[Vec<i64>],
    (documents, batch_size): (usize, usize),
    cfg: &GenerationConfig,
    on_batch: &mut dyn FnMut(usize),
) -> Result<(String, usize)> {
    if batch_size == 0 || documents == 0 || prompts.is_empty() {
        return Err(ModelError::Input(format!("documents ({documents}), batch size ({batch_size}) and prompts ({}) must be at least 1", prompts.len())));
    }
    let (mut text, mut tokens) = (String::new(), 0usize);
    for (batch, first) in (0..documents).step_by(batch_size).enumerate() {
        let n = batch_size.min(documents - first);
        let batch_prompts: Vec<Vec<i64>> = (first..first + n).map(|i| prompts[i % prompts.len()].clone()).collect();
        let batch_cfg = GenerationConfig { seed: cfg.seed.wrapping_add(batch as u64), ..cfg.clone() };
        let outs = generate(model, &batch_prompts, &batch_cfg, |_, _| {})?;
        for (p, o) in batch_prompts.iter().zip(outs) {
            tokens += o.len();
            let ids: Vec<u32> = p.iter().copied().chain(o).map(|i| i as u32).collect();
            text.push_str(tok.decode(&ids, true).map_err(|e| ModelError::Input(e.to_string()))?.trim());
            text.push_str("\n<|endoftext|>\n");
        }
        on_batch(n);
    }
    Ok((text, tokens))
}

