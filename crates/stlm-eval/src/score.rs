//! Log-likelihoods of continuations given contexts, and greedy generation, for token and byte
//! models, with lm-evaluation-harness's request semantics (`HFLM.loglikelihood`):
//!
//! - whitespace at the end of a context moves to the start of its continuation;
//! - token models encode `context + continuation` whole and take the continuation's tokens as
//!   what follows the context's own encoding (so a merge across the boundary goes to the
//!   continuation); an empty context becomes the prefix token (BOS, else `<|endoftext|>`);
//! - the input is `(context ++ continuation)[-(window + 1):][:-1]`: contexts are truncated from
//!   the left, one forward per batch of right-padded rows;
//! - `greedy` is true when every continuation token is the argmax at its position.
//!
//! Byte models score the same text: the continuation's bytes given the context's, chunk ends
//! included ([`BytePooledModel::byte_scores`]), so the two kinds give comparable likelihoods.

use crate::{EvalError, Result};
use indicatif::ProgressBar;
use stlm_core::OptionError;
use stlm_model::{AnyModel, BytePooledModel, DecoderModel, GenerationConfig};
use stlm_tokenizers::Tokenizer;
use tch::{Kind, Tensor};

/// One log-likelihood request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Request {
    /// Text the continuation follows (may be empty).
    pub context: String,
    /// Text whose log-likelihood is computed.
    pub continuation: String,
}

impl Request {
    /// A request of `context` and `continuation`.
    pub fn new(context: impl Into<String>, continuation: impl Into<String>) -> Self {
        Request { context: context.into(), continuation: continuation.into() }
    }
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    /// Sum of the continuation's log-probabilities (nats, <= 0).
    pub logprob: f64,
    /// Every continuation token (byte) is the model's argmax.
    pub greedy: bool,
}

/// Something that scores continuations and generates text: a token or byte model.
pub trait Scorer {
    /// Scores every request (any order inside; results in request order), advancing `bar` by
    /// one per request.
    fn loglikelihood(&self, requests: &[Request], bar: &ProgressBar) -> Result<Vec<Scored>>;
    /// Greedy continuation of each context, cut before the first of `until`, at most
    /// `max_new_tokens` tokens (byte models: 4 bytes per token).
    fn generate_until(&self, contexts: &[String], until: &[String], max_new_tokens: usize, bar: &ProgressBar) -> Result<Vec<String>>;
}

/// A scorer for `model` (`tokenizer` must be the model's; byte models need the byte tokenizer),
/// with windows of `max_length` tokens (byte models: chunks; default: the model's context) and
/// batches of about `batch_tokens` tokens per forward.
pub fn scorer<'a>(model: &'a AnyModel, tokenizer: &'a Tokenizer, max_length: Option<usize>, batch_tokens: usize) -> Result<Box<dyn Scorer + 'a>> {
    let context = model.as_lm().model_config().max_position_embeddings as usize;
    let max_length = max_length.unwrap_or(context);
    if max_length < 2 || max_length > context {
        let why = format!("must be in 2..={context} (the model's max_position_embeddings)");
        return Err(OptionError::new("max_length", max_length, why).into());
    }
    Ok(match model {
        AnyModel::Tokens(m) => Box::new(TokenScorer::new(m, tokenizer, max_length, batch_tokens)?),
        AnyModel::Bytes(m) => {
            if !tokenizer.is_bytes() {
                return Err(EvalError::Input("a byte model reads the byte tokenizer, not this tokenizer.json".into()));
            }
            Box::new(ByteScorer { model: m, max_chunks: max_length, batch_bytes: batch_tokens * 4 })
        }
    })
}

/// Moves whitespace at the end of `context` to the start of `continuation`, as
/// lm-evaluation-harness does before encoding.
pub fn split_pair(context: &str, continuation: &str) -> (String, String) {
    let trimmed = context.trim_end();
    let moved = &context[trimmed.len()..];
    (trimmed.to_string(), format!("{moved}{continuation}"))
}

/// Cuts `text` before the first occurrence of any of `until`.
pub fn cut_at_stop(text: &str, until: &[String]) -> String {
    let end = until.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min().unwrap_or(text.len());
    text[..end].to_string()
}

/// Groups row indices, longest first, into batches of at most `budget` padded tokens.
fn batches(lengths: &[usize], budget: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    let mut out: Vec<Vec<usize>> = Vec::new();
    for i in order {
        match out.last_mut() {
            // Rows come longest first, so the batch's padded width is its first row's length.
            Some(b) if (b.len() + 1) * lengths[b[0]] <= budget.max(lengths[b[0]]) => b.push(i),
            _ => out.push(vec![i]),
        }
    }
    out
}

/// Scoring with a token-level [`DecoderModel`].
pub struct TokenScorer<'a> {
    model: &'a DecoderModel,
    tokenizer: &'a Tokenizer,
    max_length: usize,
    batch_tokens: usize,
    prefix: i64,
}

impl<'a> TokenScorer<'a> {
    /// A scorer with windows of `max_length` tokens and forwards of about `batch_tokens` tokens.
    pub fn new(model: &'a DecoderModel, tokenizer: &'a Tokenizer, max_length: usize, batch_tokens: usize) -> Result<Self> {
        let prefix = model
            .config
            .bos_token_id
            .or(tokenizer.eos_id().map(i64::from))
            .ok_or_else(|| EvalError::Input("the model has no bos_token_id and the tokenizer no <|endoftext|>: empty contexts cannot be scored".into()))?;
        Ok(TokenScorer { model, tokenizer, max_length, batch_tokens, prefix })
    }

    fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let ids = self.tokenizer.encode(text, false).map_err(|e| EvalError::Input(e.to_string()))?;
        Ok(ids.into_iter().map(i64::from).collect())
    }

    /// Context and continuation token ids of a request, as lm-evaluation-harness builds them.
    pub fn encode_pair(&self, request: &Request) -> Result<(Vec<i64>, Vec<i64>)> {
        if request.context.is_empty() {
            return Ok((vec![self.prefix], self.encode(&request.continuation)?));
        }
        let (context, continuation) = split_pair(&request.context, &request.continuation);
        let whole = self.encode(&format!("{context}{continuation}"))?;
        let context_ids = self.encode(&context)?;
        let n = context_ids.len().min(whole.len());
        Ok((context_ids, whole[n..].to_vec()))
    }
}

impl Scorer for TokenScorer<'_> {
    fn loglikelihood(&self, requests: &[Request], bar: &ProgressBar) -> Result<Vec<Scored>> {
        let _guard = tch::no_grad_guard();
        // (input ids, continuation ids) per request.
        let mut rows = Vec::with_capacity(requests.len());
        for r in requests {
            let (context, continuation) = self.encode_pair(r)?;
            if continuation.is_empty() {
                return Err(EvalError::Input(format!("the continuation {:?} encodes to no tokens", r.continuation)));
            }
            if continuation.len() > self.max_length {
                return Err(EvalError::Input(format!(
                    "the continuation {:?} has {} tokens, more than the window of {}",
                    r.continuation,
                    continuation.len(),
                    self.max_length
                )));
            }
            let all: Vec<i64> = context.into_iter().chain(continuation.iter().copied()).collect();
            let keep = all.len().min(self.max_length + 1);
            let input = all[all.len() - keep..all.len() - 1].to_vec();
            self.model.check_ids(&input)?;
            self.model.check_ids(&continuation)?;
            rows.push((input, continuation));
        }
        let lengths: Vec<usize> = rows.iter().map(|(i, _)| i.len()).collect();
        let mut out = vec![Scored { logprob: 0.0, greedy: false }; rows.len()];
        let device = self.model.device();
        for batch in batches(&lengths, self.batch_tokens) {
            let width = lengths[batch[0]];
            let mut flat = Vec::with_capacity(batch.len() * width);
            for &i in &batch {
                flat.extend_from_slice(&rows[i].0);
                flat.extend(std::iter::repeat_n(self.prefix, width - rows[i].0.len()));
            }
            let input = Tensor::from_slice(&flat).view([batch.len() as i64, width as i64]).to_device(device);
            let logits = self.model.forward(&input);
            for (b, &i) in batch.iter().enumerate() {
                let (input, continuation) = &rows[i];
                let n = continuation.len() as i64;
                let logp = logits.get(b as i64).narrow(0, input.len() as i64 - n, n).log_softmax(-1, Kind::Float);
                let targets = Tensor::from_slice(continuation).to_device(device);
                let logprob = logp.gather(1, &targets.unsqueeze(1), false).sum(Kind::Double).double_value(&[]);
                let greedy = logp.argmax(-1, false).eq_tensor(&targets).all().int64_value(&[]) == 1;
                out[i] = Scored { logprob, greedy };
                bar.inc(1);
            }
        }
        Ok(out)
    }

    fn generate_until(&self, contexts: &[String], until: &[String], max_new_tokens: usize, bar: &ProgressBar) -> Result<Vec<String>> {
        // A token whose text holds a one-character stop string ends a sequence at once; the
        // text is cut at the stop string afterwards either way.
        let stops: Vec<i64> = (0..self.tokenizer.vocab_size() as u32)
            .filter(|&id| {
                let text = self.tokenizer.decode(&[id], false).unwrap_or_default();
                until.iter().any(|s| !s.is_empty() && text.contains(s.as_str()))
            })
            .map(i64::from)
            .chain(self.model.config.eos_token_id.iter().copied())
            .filter(|&id| id < self.model.config.vocab_size)
            .collect();
        let cfg = GenerationConfig {
            max_new_tokens: max_new_tokens as i64,
            temperature: 0.0,
            eos_token_ids: stops,
            pad_token_id: self.prefix,
            vocab_limit: Some(self.tokenizer.vocab_size() as i64),
            ..Default::default()
        };
        let budget = self.max_length.saturating_sub(max_new_tokens).max(1);
        let mut out = Vec::with_capacity(contexts.len());
        for group in contexts.chunks(16) {
            let mut prompts = Vec::with_capacity(group.len());
            for c in group {
                let ids = if c.is_empty() { vec![self.prefix] } else { self.encode(c)? };
                prompts.push(ids[ids.len().saturating_sub(budget)..].to_vec());
            }
            let generated = stlm_model::generate(self.model, &prompts, &cfg, |_, _| {})?;
            for (prompt, ids) in prompts.iter().zip(generated) {
                // Special tokens (the stop id, the padding after it) are skipped in decoding.
                let new: Vec<u32> = ids[prompt.len().min(ids.len())..].iter().map(|&t| t as u32).collect();
                let text = self.tokenizer.decode(&new, true).map_err(|e| EvalError::Input(e.to_string()))?;
                out.push(cut_at_stop(&text, until));
                bar.inc(1);
            }
        }
        Ok(out)
    }
}

/// Scoring with a [`BytePooledModel`]: bytes of the text, windows of `max_chunks` chunks.
pub struct ByteScorer<'a> {
    model: &'a BytePooledModel,
    max_chunks: usize,
    batch_bytes: usize,
}

/// `<|endoftext|>` of the byte tokenizer: the context of an empty context.
const BYTE_EOT: u32 = 256;

impl Scorer for ByteScorer<'_> {
    fn loglikelihood(&self, requests: &[Request], bar: &ProgressBar) -> Result<Vec<Scored>> {
        let _guard = tch::no_grad_guard();
        let mut rows = Vec::with_capacity(requests.len());
        let mut starts = Vec::with_capacity(requests.len());
        for r in requests {
            let (context, continuation) =
                if r.context.is_empty() { (String::new(), r.continuation.clone()) } else { split_pair(&r.context, &r.continuation) };
            if continuation.is_empty() {
                return Err(EvalError::Input("an empty continuation cannot be scored".into()));
            }
            let mut row: Vec<u32> = if context.is_empty() { vec![BYTE_EOT] } else { context.bytes().map(u32::from).collect() };
            starts.push(row.len());
            row.extend(continuation.bytes().map(u32::from));
            rows.push(row);
        }
        let lengths: Vec<usize> = rows.iter().map(Vec::len).collect();
        let mut out = vec![Scored { logprob: 0.0, greedy: false }; rows.len()];
        for batch in batches(&lengths, self.batch_bytes) {
            let group: Vec<Vec<u32>> = batch.iter().map(|&i| rows[i].clone()).collect();
            for (&i, (dropped, scores)) in batch.iter().zip(self.model.byte_scores(&group, self.max_chunks)?) {
                let Some(start) = starts[i].checked_sub(dropped).filter(|&s| s > 0) else {
                    return Err(EvalError::Input(format!(
                        "the continuation {:?} does not fit in a window of {} chunks",
                        requests[i].continuation, self.max_chunks
                    )));
                };
                let tail = &scores[start..];
                out[i] = Scored { logprob: -tail.iter().map(|s| s.0).sum::<f64>(), greedy: tail.iter().all(|s| s.1) };
                bar.inc(1);
            }
        }
        Ok(out)
    }

    fn generate_until(&self, contexts: &[String], until: &[String], max_new_tokens: usize, bar: &ProgressBar) -> Result<Vec<String>> {
        // One-byte stop strings end generation at once; longer ones cut afterwards.
        let stops: Vec<i64> = until.iter().filter(|s| s.len() == 1).map(|s| i64::from(s.as_bytes()[0])).chain([i64::from(BYTE_EOT)]).collect();
        let cfg = GenerationConfig { max_new_tokens: 4 * max_new_tokens as i64, temperature: 0.0, eos_token_ids: stops, ..Default::default() };
        let mut out = Vec::with_capacity(contexts.len());
        for c in contexts {
            let prompt: Vec<u32> = if c.is_empty() { vec![BYTE_EOT] } else { c.bytes().map(u32::from).collect() };
            let ids = stlm_model::bytes::generate_bytes(self.model, &prompt, &cfg, |_| {})?;
            let new: Vec<u8> = ids[prompt.len().min(ids.len())..].iter().filter(|&&b| b < 256).map(|&b| b as u8).collect();
            out.push(cut_at_stop(&String::from_utf8_lossy(&new), until));
            bar.inc(1);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_whitespace_moves_to_the_continuation() {
        assert_eq!(split_pair("Answer: ", "Paris"), ("Answer:".to_string(), " Paris".to_string()));
        assert_eq!(split_pair("a\n\n", "b"), ("a".to_string(), "\n\nb".to_string()));
        assert_eq!(split_pair("a", " b"), ("a".to_string(), " b".to_string()));
    }

    #[test]
    fn stop_strings_cut_at_the_first() {
        let until = vec!["\n".to_string(), ".".to_string(), ",".to_string()];
        assert_eq!(cut_at_stop(" Paris, France.", &until), " Paris");
        assert_eq!(cut_at_stop(" Paris", &until), " Paris");
        assert_eq!(cut_at_stop("a.b\nc", &until), "a");
    }

    #[test]
    fn batches_respect_the_budget_and_cover_every_row() {
        let lengths = [5, 50, 7, 50, 1, 30];
        let b = batches(&lengths, 100);
        let mut seen: Vec<usize> = b.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..6).collect::<Vec<_>>());
        for batch in &b {
            let width = batch.iter().map(|&i| lengths[i]).max().unwrap();
            assert_eq!(width, lengths[batch[0]]);
            assert!(batch.len() * width <= 100 || batch.len() == 1);
        }
        // A row longer than the budget still gets a batch of its own.
        assert_eq!(batches(&[500], 100), vec![vec![0]]);
    }
}
