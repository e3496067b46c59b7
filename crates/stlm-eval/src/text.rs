//! A text scored by a model of either kind: what `stlm eval ppl` prints and `stlm sweep` records.

use crate::{byte_perplexity, early_exit_perplexity, perplexity, scored_ids, EvalError, PplReport, Result, WindowOptions};
use stlm_model::{AnyModel, EarlyExit, ExitMeasure};
use stlm_tokenizers::Tokenizer;

/// How `stlm eval ppl` scores a text (see [`ScoringOptions::scoring`]).
#[derive(Debug, Clone, clap::Args)]
pub struct ScoringOptions {
    /// Tokens per window (byte models: chunks; default: the model's max_position_embeddings,
    /// at most 1024).
    #[arg(long)]
    pub max_length: Option<i64>,
    /// Tokens (byte models: chunks) each window advances by (default: half the window).
    #[arg(long)]
    pub stride: Option<i64>,
    /// Apply each block this many times (models with `layer_sharing`: a recursion depth
    /// other than the trained one).
    #[arg(long)]
    pub repeats: Option<i64>,
    /// Score with early exit: each position leaves the stack at the first layer whose exit
    /// is this confident (`stlm generate --early-exit`), decoded one position at a time;
    /// adds the average depth and positions/s.
    #[arg(long, value_name = "THRESHOLD")]
    pub early_exit: Option<f64>,
    /// With --early-exit: what is measured on the exit's distribution.
    #[arg(long, value_enum, default_value_t = ExitMeasure::Softmax, requires = "early_exit")]
    pub exit_measure: ExitMeasure,
    /// With --early-exit: layers every position runs before it may exit.
    #[arg(long, default_value_t = 1, requires = "early_exit")]
    pub exit_min_layers: usize,
}

impl ScoringOptions {
    /// The scoring these options ask for.
    pub fn scoring(&self, progress: bool) -> Result<TextScoring> {
        let exit = self.early_exit.map(|threshold| EarlyExit { measure: self.exit_measure, threshold, min_layers: self.exit_min_layers });
        Ok(TextScoring { max_length: self.max_length, stride: self.stride, repeats: self.repeats, exit, progress })
    }
}

/// How [`score_text`] scores.
#[derive(Debug, Clone, Default)]
pub struct TextScoring {
    /// Tokens per window (default: the model's context, at most 1024 for token models).
    pub max_length: Option<i64>,
    /// Tokens a window advances by (default: half a window).
    pub stride: Option<i64>,
    /// Applications of a shared block's schedule other than the trained one (`layer_sharing`).
    pub repeats: Option<i64>,
    /// Early exit: each position leaves at the first layer whose measure passes the threshold.
    pub exit: Option<EarlyExit>,
    /// Shows a progress bar.
    pub progress: bool,
}

/// Loss, perplexity and bits per byte of `text` under `model` (tokens by `tok`; a byte model
/// reads bytes), over windows as [`perplexity`] describes.
pub fn score_text(model: &mut AnyModel, tok: &Tokenizer, text: &str, opts: &TextScoring) -> Result<PplReport> {
    if text.is_empty() {
        return Err(EvalError::Input("the text is empty".into()));
    }
    let model = match model {
        AnyModel::Tokens(m) => &mut **m,
        AnyModel::Bytes(_) if opts.repeats.is_some() => {
            return Err(EvalError::Input(format!("repeats {}: a byte-pooled model has no `layer_sharing`", opts.repeats.unwrap_or_default())))
        }
        AnyModel::Bytes(_) if opts.exit.is_some() => return Err(EvalError::Input("early exit: byte-pooled models run at full depth".into())),
        AnyModel::Bytes(m) => {
            if !tok.is_bytes() {
                return Err(EvalError::Input("a byte model reads the byte tokenizer, not a tokenizer.json".into()));
            }
            let ids = tok.encode(text, false).map_err(|e| EvalError::Input(e.to_string()))?;
            let max_length = opts.max_length.unwrap_or(m.config.max_position_embeddings);
            let window = WindowOptions { max_length, stride: opts.stride.unwrap_or((max_length / 2).max(1)) };
            return byte_perplexity(m, &ids, text.len() as u64, window, opts.progress);
        }
    };
    if let Some(k) = opts.repeats {
        model.set_repeats(k).map_err(|e| EvalError::Input(format!("repeats {k}: {e}")))?;
    }
    let ids = scored_ids(model, tok, text)?;
    let context = model.config.max_position_embeddings;
    let max_length = opts.max_length.unwrap_or(context.min(1024));
    if max_length > context {
        return Err(EvalError::Input(format!("max_length {max_length} exceeds the model's max_position_embeddings ({context})")));
    }
    let window = WindowOptions { max_length, stride: opts.stride.unwrap_or((max_length / 2).max(1)) };
    match &opts.exit {
        Some(rule) => {
            model.optimize_for_decoding();
            early_exit_perplexity(model, &ids, text.len() as u64, window, rule, opts.progress)
        }
        None => perplexity(model, &ids, text.len() as u64, window, opts.progress),
    }
}
