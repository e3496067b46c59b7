//! What a quantization did: every quantized layer with its error, every matrix kept in float32
//! with the reason, bits per weight, sizes on disk and perplexities (`stlm quantize` prints it
//! and the model directory keeps it in `quantization.json`).

use crate::QuantOptions;
use serde::{Deserialize, Serialize};
use stlm_core::quant::QuantFormat;
pub use stlm_eval::heldout::Perplexity;

/// One quantized weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerReport {
    /// Saved name (`model.layers.0.self_attn.q_proj.weight`).
    pub name: String,
    /// Output features.
    pub rows: i64,
    /// Input features.
    pub cols: i64,
    /// Block format.
    pub format: QuantFormat,
    /// `||W - Q|| / ||W||` (Frobenius norms, float64).
    pub relative_error: f64,
}

/// A matrix kept in float32, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Kept {
    /// Saved name.
    pub name: String,
    /// Its values.
    pub parameters: i64,
    /// Why it is not quantized.
    pub reason: String,
}

/// The report of one quantization.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantReport {
    /// `rtn`.
    pub method: String,
    /// The block format of the quantized layers.
    pub format: QuantFormat,
    /// Every quantized weight.
    pub layers: Vec<LayerReport>,
    /// Matrices kept in float32.
    pub kept: Vec<Kept>,
    /// Values of the quantized weights.
    pub quantized_parameters: i64,
    /// Every parameter of the model.
    pub total_parameters: i64,
    /// Bits per parameter over the whole model: blocks at the format's rate, the rest at 32.
    pub bits_per_parameter: f64,
    /// Size of the original `model.safetensors` (bytes), when read from a directory.
    pub bytes_before: Option<u64>,
    /// Size of the quantized `model.safetensors` (bytes), when saved.
    pub bytes_after: Option<u64>,
    /// Validation perplexity of the original model.
    pub before: Option<Perplexity>,
    /// Validation perplexity of the quantized model.
    pub after: Option<Perplexity>,
    /// Seconds the quantization itself took.
    pub seconds: f64,
}

impl QuantReport {
    /// A report of `layers` quantized by `opts` and `kept` in float, in a model of `total`
    /// parameters.
    pub fn new(opts: &QuantOptions, layers: Vec<LayerReport>, kept: Vec<Kept>, total: i64, seconds: f64) -> Self {
        let quantized: i64 = layers.iter().map(|l| l.rows * l.cols).sum();
        let bits = quantized as f64 * opts.format.bits_per_weight() + (total - quantized) as f64 * 32.0;
        QuantReport {
            method: opts.method.name().into(),
            format: opts.format,
            layers,
            kept,
            quantized_parameters: quantized,
            total_parameters: total,
            bits_per_parameter: bits / total.max(1) as f64,
            bytes_before: None,
            bytes_after: None,
            before: None,
            after: None,
            seconds,
        }
    }

    /// The report as a table for people.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{} {}: {} of {} parameters quantized, {:.2} bits per parameter, {:.1} s\n",
            self.method,
            self.format.name(),
            self.quantized_parameters,
            self.total_parameters,
            self.bits_per_parameter,
            self.seconds
        );
        let mb = |b: u64| b as f64 / 1e6;
        if let (Some(a), Some(b)) = (self.bytes_before, self.bytes_after) {
            out += &format!("model.safetensors: {:.2} MB -> {:.2} MB ({:.2}x smaller)\n", mb(a), mb(b), a as f64 / b.max(1) as f64);
        }
        match (self.before, self.after) {
            (Some(b), Some(a)) => {
                out += &format!("validation perplexity: {:.3} -> {:.3} ({:+.2}%)\n", b.ppl, a.ppl, (a.ppl / b.ppl - 1.0) * 100.0)
            }
            (None, Some(a)) => out += &format!("validation perplexity: {:.3}\n", a.ppl),
            _ => {}
        }
        let worst = self.layers.iter().max_by(|a, b| a.relative_error.total_cmp(&b.relative_error));
        if let Some(w) = worst {
            let mean = self.layers.iter().map(|l| l.relative_error).sum::<f64>() / self.layers.len() as f64;
            out += &format!("relative weight error: mean {:.4}, worst {:.4} ({})\n", mean, w.relative_error, w.name);
        }
        for k in &self.kept {
            out += &format!("kept in float32: {} ({} parameters): {}\n", k.name, k.parameters, k.reason);
        }
        out
    }
}
