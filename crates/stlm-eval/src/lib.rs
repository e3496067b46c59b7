//! stlm-eval: evaluation of stlm models.
//!
//! [`perplexity`]: mean next-token loss (nats per token), perplexity and bits per byte over a token
//! stream, with the sliding window of transformers' perplexity guide for texts longer than the
//! model's context: each window of `max_length` tokens advances by `stride` (capped so that
//! windows overlap by at least one token) and only the tokens not scored by an earlier window
//! count, each seen with at least `max_length - stride` tokens of context. Every token after the
//! first is scored exactly once. Bits per byte (`total nats / ln 2 / bytes of text`) compares models whose tokenizers
//! differ.
//!
//! [`position`]: mean loss at each context position with standard errors, and the in-context
//! learning score. [`score`]: batched log-likelihoods of continuations (token and byte models,
//! lm-evaluation-harness request semantics). [`tasks`]: HellaSwag, ARC, PIQA, OpenBookQA,
//! WinoGrande, LAMBADA, BLiMP, MMLU and TriviaQA from local files, scored as the harness does.
//! [`suite`]: named task suites and their markdown table. [`plot`]: SVG line plots. [`text`]: a
//! text file's score under a model of either kind (`stlm eval ppl`).

pub mod heldout;
pub mod plot;
pub mod position;
pub mod score;
pub mod suite;
pub mod tasks;
pub mod text;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use stlm_core::OptionError;
use stlm_model::{BytePooledModel, DecoderModel};
use tch::{Kind, Tensor};

/// Errors of evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Bad evaluation input.
    #[error("{0}")]
    Input(String),
    /// An option value that is not allowed.
    #[error("{0}")]
    Option(#[from] OptionError),
    /// An error raised by the model.
    #[error(transparent)]
    Model(#[from] stlm_model::ModelError),
    /// An error raised by libtorch.
    #[error("libtorch: {0}")]
    Tch(#[from] tch::TchError),
}

/// Result alias for stlm-eval.
pub type Result<T, E = EvalError> = std::result::Result<T, E>;

/// The window over long texts.
#[derive(Debug, Clone, Copy)]
pub struct WindowOptions {
    /// Tokens per forward pass (at most the model's context).
    pub max_length: i64,
    /// Tokens the window advances by; `stride == max_length` gives disjoint windows.
    pub stride: i64,
}

/// The result of [`perplexity`]; its JSON keys are the ones `stlm eval ppl --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct PplReport {
    /// Tokens scored.
    pub tokens: i64,
    /// Bytes of the evaluated text.
    pub bytes: u64,
    /// Mean loss in nats per token.
    pub loss: f64,
    /// exp(loss).
    pub ppl: f64,
    /// Total loss in bits divided by the bytes of text.
    pub bits_per_byte: f64,
    /// With early exit: layers applied per position, on average.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub average_depth: Option<f64>,
    /// With early exit: the model's full depth.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub depth: Option<usize>,
    /// With early exit: positions scored per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
}

impl PplReport {
    /// The report as text for people, of `source` scored in `unit`s (`token` or `byte`).
    pub fn summary(&self, source: &str, unit: &str) -> String {
        let mut out = format!(
            "{source}: {} {unit}s, {} bytes, loss {:.4} nats/{unit}, perplexity {:.3}, {:.4} bits/byte",
            self.tokens, self.bytes, self.loss, self.ppl, self.bits_per_byte
        );
        if let (Some(avg), Some(depth), Some(speed)) = (self.average_depth, self.depth, self.tokens_per_s) {
            out += &format!("\nearly exit: average depth {avg:.2} of {depth} layers, {speed:.1} positions/s");
        }
        out
    }
}

/// The ids of `text` for [`perplexity`], after the model's BOS (or the tokenizer's end-of-text)
/// token so that the text's first token is scored too.
pub fn scored_ids(model: &DecoderModel, tok: &stlm_tokenizers::Tokenizer, text: &str) -> Result<Vec<i64>> {
    let start = model.config.bos_token_id.or(tok.eos_id().map(i64::from)).filter(|&id| id < model.config.vocab_size);
    let ids = tok.encode(text, false).map_err(|e| EvalError::Input(e.to_string()))?;
    Ok(start.into_iter().chain(ids.into_iter().map(i64::from)).collect())
}

/// Scores every token of `ids` after the first (so put a BOS/EOS token first to score the whole
/// text); `bytes` is the UTF-8 length of the text the ids encode.
pub fn perplexity(
    model: &DecoderModel,
    ids: &[i64],
    bytes: u64,
    window: WindowOptions,
    progress: bool,
) -> Result<PplReport> {
    windowed_perplexity(model, ids, bytes, window, progress, |input| Ok(model.forward(input).squeeze_dim(0)))
}

/// [`perplexity`] when every position exits early as `rule` says (decoded one position at a
/// time with a cache, each window from a fresh one), with the average depth and positions/s.
pub fn early_exit_perplexity(
    model: &DecoderModel,
    ids: &[i64],
    bytes: u64,
    window: WindowOptions,
    rule: &stlm_model::EarlyExit,
    progress: bool,
) -> Result<PplReport> {
    let (mut layers, mut positions) = (0u64, 0u64);
    let started = std::time::Instant::now();
    let mut report = windowed_perplexity(model, ids, bytes, window, progress, |input| {
        let window: Vec<i64> = Vec::try_from(input.reshape([-1]).to_device(tch::Device::Cpu))?;
        let (logits, used) = stlm_model::early_exit_logits(model, &window, rule)?;
        layers += used;
        positions += window.len() as u64;
        Ok(logits)
    })?;
    report.average_depth = Some(layers as f64 / positions.max(1) as f64);
    report.depth = Some(model.depth());
    report.tokens_per_s = Some(positions as f64 / started.elapsed().as_secs_f64().max(1e-9));
    Ok(report)
}

/// [`perplexity`] with the logits `[L, vocab]` of each window `[1, L]` from `logits_of`.
fn windowed_perplexity(
    model: &DecoderModel,
    ids: &[i64],
    bytes: u64,
    window: WindowOptions,
    progress: bool,
    mut logits_of: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<PplReport> {
    let n = ids.len() as i64;
    if n < 2 {
        return Err(EvalError::Input(format!("the text has {n} tokens; perplexity needs at least 2")));
    }
    if window.max_length < 2 {
        return Err(OptionError::new("max_length", window.max_length, "must be at least 2").into());
    }
    if window.stride < 1 || window.stride > window.max_length {
        let why = format!("must be in 1..={} (at most the max_length)", window.max_length);
        return Err(OptionError::new("stride", window.stride, why).into());
    }
    model.check_ids(ids)?;
    let _guard = tch::no_grad_guard();
    let device = model.device();
    // Window starts: each next window starts `stride` later, but at most at the last token of
    // the previous window, so that consecutive windows overlap and every token is scored once.
    let mut starts = vec![0];
    loop {
        let begin = *starts.last().expect("starts is not empty");
        let end = (begin + window.max_length).min(n);
        if end == n {
            break;
        }
        starts.push((begin + window.stride).min(end - 1));
    }
    let bar = if progress { ProgressBar::new(starts.len() as u64) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} windows {eta}").expect("valid template"));
    bar.set_prefix("perplexity");
    let all = Tensor::from_slice(ids).to_device(device);
    let mut total = Tensor::zeros([], (Kind::Double, device));
    let mut scored_until = 1; // index of the first token not yet scored (token 0 is never scored)
    let mut count = 0;
    for begin in starts {
        let end = (begin + window.max_length).min(n);
        let input = all.narrow(0, begin, end - begin).unsqueeze(0); // [1, L]
        let logits = logits_of(&input)?; // [L, vocab]
        // Position p predicts token p + 1; score the targets in [scored_until, end).
        let first = scored_until - begin - 1;
        let len = end - scored_until;
        let logp = logits.narrow(0, first, len).log_softmax(-1, Kind::Float);
        let targets = all.narrow(0, scored_until, len);
        let nll = -logp.gather(1, &targets.unsqueeze(1), false).sum(Kind::Double);
        total += nll;
        count += len;
        scored_until = end;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let total = total.double_value(&[]);
    let loss = total / count as f64;
    Ok(PplReport {
        tokens: count,
        bytes,
        loss,
        ppl: loss.exp(),
        bits_per_byte: if bytes > 0 { total / std::f64::consts::LN_2 / bytes as f64 } else { f64::NAN },
        average_depth: None,
        depth: None,
        tokens_per_s: None,
    })
}

/// [`perplexity`] for a byte-pooled model over the byte-tokenizer ids of a text of
/// `text_bytes` bytes (all ids scored; `<|endoftext|>` is one id): the text is chunked once, windows of `window.max_length` chunks advance by
/// `window.stride` chunks, and each chunk is scored once, with the chunks of the window before it
/// as context; a chunk's end (EOC) counts to its nats, except the text's last. `tokens` in the
/// report are byte ids, `loss` nats per id.
pub fn byte_perplexity(model: &BytePooledModel, bytes: &[u32], text_bytes: u64, window: WindowOptions, progress: bool) -> Result<PplReport> {
    if bytes.is_empty() {
        return Err(EvalError::Input("the text is empty".into()));
    }
    if window.max_length < 1 {
        return Err(OptionError::new("max_length", window.max_length, "must be at least 1 (chunks)").into());
    }
    if window.stride < 1 || window.stride > window.max_length {
        let why = format!("must be in 1..={} (chunks, at most the max_length)", window.max_length);
        return Err(OptionError::new("stride", window.stride, why).into());
    }
    let _guard = tch::no_grad_guard();
    let chunks = model.chunk_rows(&[bytes.to_vec()])?.remove(0);
    let offsets: Vec<usize> = std::iter::once(0).chain(chunks.iter().scan(0, |at, &n| { *at += n; Some(*at) })).collect();
    let n = chunks.len() as i64;
    let bar = if progress { ProgressBar::new(n as u64) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} chunks {eta}").expect("valid template"));
    bar.set_prefix("perplexity");
    let (mut total, mut scored_until, mut begin) = (0.0, 0i64, 0i64);
    loop {
        let end = (begin + window.max_length).min(n);
        let (from, to) = (offsets[begin as usize], offsets[end as usize]);
        let nats = model.chunk_nats(&bytes[from..to], &chunks[begin as usize..end as usize], end < n);
        total += nats[(scored_until - begin) as usize..].iter().sum::<f64>();
        bar.inc((end - scored_until) as u64);
        scored_until = end;
        if end == n {
            break;
        }
        begin = (begin + window.stride).min(end);
    }
    bar.finish_and_clear();
    let count = bytes.len() as i64;
    let loss = total / count as f64;
    let bits_per_byte = total / std::f64::consts::LN_2 / text_bytes.max(1) as f64;
    Ok(PplReport { tokens: count, bytes: text_bytes, loss, ppl: loss.exp(), bits_per_byte, average_depth: None, depth: None, tokens_per_s: None })
}

#[cfg(test)]
mod tests {
    use super::*;
    use stlm_model::ModelConfig;

    fn model() -> DecoderModel {
        let text = "vocab_size = 40\nhidden_size = 32\nintermediate_size = 48\nnum_hidden_layers = 1\nnum_attention_heads = 2\nmax_position_embeddings = 64\n";
        let cfg = ModelConfig::from_toml_str(text, std::path::Path::new("t.toml")).unwrap();
        DecoderModel::new(cfg, tch::Device::Cpu).unwrap()
    }

    /// The loss of one full window, written out directly.
    fn direct_loss(m: &DecoderModel, ids: &[i64]) -> f64 {
        let _g = tch::no_grad_guard();
        let logits = m.forward(&Tensor::from_slice(ids).unsqueeze(0)).squeeze_dim(0);
        let n = ids.len() as i64;
        logits.narrow(0, 0, n - 1).cross_entropy_for_logits(&Tensor::from_slice(&ids[1..])).double_value(&[])
    }

    #[test]
    fn one_window_equals_plain_cross_entropy() {
        let m = model();
        let ids: Vec<i64> = (0..30).map(|i| (i * 7) % 40).collect();
        let r = perplexity(&m, &ids, 100, WindowOptions { max_length: 64, stride: 64 }, false).unwrap();
        assert_eq!(r.tokens, 29);
        assert!((r.loss - direct_loss(&m, &ids)).abs() < 1e-5);
        assert!((r.bits_per_byte - r.loss * 29.0 / std::f64::consts::LN_2 / 100.0).abs() < 1e-9);
    }

    #[test]
    fn sliding_windows_score_every_token_once() {
        let m = model();
        let ids: Vec<i64> = (0..50).map(|i| (i * 13 + 5) % 40).collect();
        for (max_length, stride) in [(16, 16), (16, 5), (20, 1), (49, 30)] {
            let r = perplexity(&m, &ids, 50, WindowOptions { max_length, stride }, false).unwrap();
            assert_eq!(r.tokens, 49, "max_length {max_length} stride {stride}");
        }
        // stride = max_length: windows [0,16), [15,31), [30,46), [45,50), each scoring its own
        // tokens after the first, so the total is the sum of the windows' plain losses.
        let r = perplexity(&m, &ids, 50, WindowOptions { max_length: 16, stride: 16 }, false).unwrap();
        let want: f64 = [(0, 16), (15, 31), (30, 46), (45, 50)]
            .iter()
            .map(|&(b, e)| direct_loss(&m, &ids[b..e]) * (e - b - 1) as f64)
            .sum();
        assert!((r.loss * 49.0 - want).abs() < 1e-3, "{} vs {want}", r.loss * 49.0);
    }

    #[test]
    fn bad_input_is_an_error() {
        let m = model();
        assert!(perplexity(&m, &[1], 1, WindowOptions { max_length: 8, stride: 8 }, false).is_err());
        let e = perplexity(&m, &[1, 2, 3], 1, WindowOptions { max_length: 8, stride: 9 }, false);
        assert!(matches!(e, Err(EvalError::Option(OptionError { name: "stride", .. }))), "{e:?}");
        let e = perplexity(&m, &[1, 2, 3], 1, WindowOptions { max_length: 1, stride: 1 }, false);
        assert!(matches!(e, Err(EvalError::Option(OptionError { name: "max_length", .. }))), "{e:?}");
        let e = perplexity(&m, &[1, 99], 1, WindowOptions { max_length: 8, stride: 8 }, false).unwrap_err().to_string();
        assert!(e.contains("99"), "{e}");
    }

    /// Byte models: one window scores every chunk once with its end (the last chunk's aside);
    /// overlapping windows give a total within a few percent (less context per chunk) and the
    /// same count; bits per byte is the total over the text's bytes.
    #[test]
    fn byte_perplexity_scores_each_chunk_once() {
        tch::manual_seed(1);
        let text = "model_type = \"stlm\"\nvocab_size = 258\nhidden_size = 32\nintermediate_size = 48\nnum_hidden_layers = 1\nnum_attention_heads = 2\nmax_position_embeddings = 64\nbytes = { chunker = { kind = \"fixed\", size = 3 }, local_hidden_size = 16, local_heads = 2, local_intermediate_size = 32, encoder_layers = 1, decoder_layers = 1 }\n";
        let cfg = ModelConfig::from_toml_str(text, std::path::Path::new("b.toml")).unwrap();
        let m = BytePooledModel::new(cfg, tch::Device::Cpu).unwrap();
        let bytes: Vec<u32> = "Once upon a time, a fox.".bytes().map(u32::from).collect();
        let _g = tch::no_grad_guard();
        let chunks = m.chunk_rows(std::slice::from_ref(&bytes)).unwrap().remove(0);
        let direct: f64 = m.chunk_nats(&bytes, &chunks, false).iter().sum();
        let one = byte_perplexity(&m, &bytes, 30, WindowOptions { max_length: 64, stride: 64 }, false).unwrap();
        assert!((one.loss * 24.0 - direct).abs() < 1e-6, "{} vs {direct}", one.loss * 24.0);
        assert!((one.bits_per_byte - direct / std::f64::consts::LN_2 / 30.0).abs() < 1e-9);
        let sliding = byte_perplexity(&m, &bytes, 30, WindowOptions { max_length: 4, stride: 2 }, false).unwrap();
        assert_eq!(sliding.tokens, 24);
        assert!((sliding.loss / one.loss - 1.0).abs() < 0.1, "{} vs {}", sliding.loss, one.loss);
        let e = byte_perplexity(&m, &bytes, 30, WindowOptions { max_length: 2, stride: 3 }, false);
        assert!(matches!(e, Err(EvalError::Option(OptionError { name: "stride", .. }))), "{e:?}");
    }
}
