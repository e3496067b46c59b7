//! What dynamic depth is configured and reported with (see [`crate::dynamic`]): the early-exit
//! rule, how many layers a decoding step applies, what a generation with dynamic depth did, and
//! LayerSkip training's settings. A leaf: it imports nothing else of the crate but errors.

use crate::Result;
use serde::{Deserialize, Serialize};
use stlm_core::OptionError;

/// What an early exit measures on the exit's next-token distribution.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum ExitMeasure {
    /// The largest probability (CALM's softmax response); exit when it reaches the threshold.
    #[default]
    Softmax,
    /// The largest probability minus the second; exit when it reaches the threshold.
    Margin,
    /// The entropy in nats; exit when it is at most the threshold.
    Entropy,
}

impl std::str::FromStr for ExitMeasure {
    type Err = crate::ModelError;
    /// `softmax`, `margin` or `entropy`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "softmax" => Ok(ExitMeasure::Softmax),
            "margin" => Ok(ExitMeasure::Margin),
            "entropy" => Ok(ExitMeasure::Entropy),
            _ => Err(crate::ModelError::Input(format!("exit measure `{s}`: expected softmax, margin or entropy"))),
        }
    }
}

/// When a token leaves the stack early.
#[derive(Debug, Clone, PartialEq)]
pub struct EarlyExit {
    /// What is measured.
    pub measure: ExitMeasure,
    /// The threshold the measure is compared with.
    pub threshold: f64,
    /// Layers every token runs before it may exit (at least 1).
    pub min_layers: usize,
}

impl EarlyExit {
    /// Checks the fields against `depth` applied layers; the error names the option.
    pub fn validate(&self, depth: usize) -> Result<()> {
        if !self.threshold.is_finite() || (self.measure != ExitMeasure::Entropy && self.threshold < 0.0) {
            return Err(OptionError::new("early_exit", self.threshold, "must be a finite number (probabilities: >= 0)").into());
        }
        if self.min_layers < 1 || self.min_layers > depth {
            let why = format!("must be between 1 and the model's {depth} layers");
            return Err(OptionError::new("exit_min_layers", self.min_layers, why).into());
        }
        Ok(())
    }

    /// True when the next-token `logits` are confident enough to exit.
    pub fn confident(&self, logits: &[f32]) -> bool {
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l)) as f64;
        let weights: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        match self.measure {
            ExitMeasure::Softmax => 1.0 / total >= self.threshold,
            ExitMeasure::Margin => {
                let second = weights.iter().fold((0.0f64, 0.0f64), |(a, b), &w| if w > a { (w, a) } else { (a, b.max(w)) }).1;
                (1.0 - second) / total >= self.threshold
            }
            ExitMeasure::Entropy => {
                let entropy: f64 = weights.iter().filter(|&&w| w > 0.0).map(|&w| -(w / total) * (w / total).ln()).sum();
                entropy <= self.threshold
            }
        }
    }
}

/// How many layers one decoding step applies.
#[derive(Debug, Clone, Copy)]
pub enum Depth<'a> {
    /// Every layer.
    Full,
    /// Up to the first layer whose exit is confident (the skipped layers' keys and values are
    /// still written).
    Exit(&'a EarlyExit),
    /// The first `n` layers only, writing nothing for the others (a self-speculative draft,
    /// whose cache positions are rewound before verification).
    Draft(usize),
}

/// What a generation with dynamic depth did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DepthReport {
    /// Tokens generated.
    pub tokens: u64,
    /// Layers applied per generated token, summed (early exit; full depth for drafts' output).
    pub layers: u64,
    /// The model's applied depth.
    pub depth: usize,
    /// Draft tokens proposed (self-speculative decoding).
    pub drafted: u64,
    /// Draft tokens the full model accepted.
    pub accepted: u64,
    /// Verification passes of the full model.
    pub verifications: u64,
}

impl DepthReport {
    /// Average number of layers a generated token went through.
    pub fn average_depth(&self) -> f64 {
        self.layers as f64 / self.tokens.max(1) as f64
    }

    /// Fraction of draft tokens accepted.
    pub fn acceptance(&self) -> f64 {
        self.accepted as f64 / self.drafted.max(1) as f64
    }

    /// One line on a generation that took `seconds`: speed and average depth (early exit), or
    /// with `draft = Some((layers, tokens))` the drafts accepted (self-speculative decoding).
    pub fn summary(&self, seconds: f64, draft: Option<(usize, usize)>) -> String {
        let speed = format!("{} tokens in {seconds:.2} s ({:.1} tokens/s)", self.tokens, self.tokens as f64 / seconds.max(1e-9));
        match draft {
            Some((layers, tokens)) => format!(
                "self-speculative ({layers} of {} layers, {tokens} drafted per pass): {speed}, {} of {} drafts accepted ({:.1}%), {} verification passes",
                self.depth,
                self.accepted,
                self.drafted,
                100.0 * self.acceptance(),
                self.verifications
            ),
            None => format!("early exit: {speed}, average depth {:.2} of {} layers", self.average_depth(), self.depth),
        }
    }
}

/// LayerSkip training (the `[train] layer_skip` table): layer `l` of `L` is skipped for a
/// sequence with probability `max_dropout · l / (L - 1)` (never the first), and every earlier
/// exit's loss through the shared head is added, weighted by its depth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSkip {
    /// Skip probability of the last layer.
    #[serde(default)]
    pub max_dropout: f64,
    /// Weight of the early-exit loss (the depth-weighted mean of the exits' cross-entropies).
    #[serde(default)]
    pub exit_loss: f64,
}

impl LayerSkip {
    /// Checks the fields; the error names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(0.0..1.0).contains(&self.max_dropout) {
            return Err(format!("`max_dropout` must be at least 0 and below 1, got {}", self.max_dropout));
        }
        if !(self.exit_loss >= 0.0 && self.exit_loss.is_finite()) {
            return Err(format!("`exit_loss` must be a non-negative number, got {}", self.exit_loss));
        }
        Ok(())
    }
}

