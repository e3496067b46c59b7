//! What a prune did: sparsity of every matrix and overall, parameters, time, and (filled in by
//! the caller, who has the text) validation perplexity before and after.

use crate::mask::{Pattern, Scope};
use crate::options::{Method, PruneOptions};
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// One pruned matrix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetReport {
    /// Weight name (`model.layers.0.mlp.up_proj.weight`).
    pub name: String,
    /// Entries.
    pub params: i64,
    /// Entries that are zero.
    pub zeros: i64,
    /// `zeros / params`.
    pub sparsity: f64,
}

impl TargetReport {
    /// The sparsity of `weight`, named `{name}.weight`.
    pub fn of(name: &str, weight: &Tensor) -> Self {
        let params = weight.numel() as i64;
        let zeros = params - weight.count_nonzero(None::<i64>).int64_value(&[]);
        TargetReport { name: format!("{name}.weight"), params, zeros, sparsity: zeros as f64 / params.max(1) as f64 }
    }
}

pub use stlm_eval::heldout::Perplexity;

/// The report of one prune (`stlm prune --json` prints it; the pruned model directory keeps it
/// as `pruning.json`, whose `pruned` list tells `stlm train --init` which weights stay zero).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PruneReport {
    /// `magnitude`, `wanda` or `sparsegpt`.
    pub method: String,
    /// `50%` or `2:4`.
    pub pattern: String,
    /// `row`, `layer` or `global`.
    pub scope: String,
    /// Every matrix pruned, in forward order.
    pub pruned: Vec<TargetReport>,
    /// Zeros over the pruned matrices / their entries.
    pub target_sparsity: f64,
    /// Parameters of the model (the same before and after: unstructured pruning zeroes, it does not remove).
    pub params: i64,
    /// Non-zero parameters before pruning.
    pub nonzero_before: i64,
    /// Non-zero parameters after pruning.
    pub nonzero_after: i64,
    /// `1 - nonzero_after / params`.
    pub model_sparsity: f64,
    /// Validation perplexity before pruning, when a validation text was given.
    pub before: Option<Perplexity>,
    /// Validation perplexity after pruning.
    pub after: Option<Perplexity>,
    /// Seconds spent pruning (calibration included, validation not).
    pub seconds: f64,
}

impl PruneReport {
    /// A report of `pruned` matrices; perplexities left empty.
    pub fn new(opts: &PruneOptions, pruned: Vec<TargetReport>, params: i64, nonzero_before: i64, nonzero_after: i64, seconds: f64) -> Self {
        let (zeros, total) = pruned.iter().fold((0, 0), |(z, n), t| (z + t.zeros, n + t.params));
        let scope = match (opts.pattern, opts.method, opts.scope) {
            (Pattern::NOfM { .. }, _, _) => "n:m groups",
            (_, Method::SparseGpt, _) => "column blocks",
            (_, _, Scope::Row) => "row",
            (_, _, Scope::Layer) => "layer",
            (_, _, Scope::Global) => "global",
        };
        PruneReport {
            method: opts.method.name().into(),
            pattern: opts.pattern.to_string(),
            scope: scope.into(),
            target_sparsity: zeros as f64 / total.max(1) as f64,
            pruned,
            params,
            nonzero_before,
            nonzero_after,
            model_sparsity: 1.0 - nonzero_after as f64 / params.max(1) as f64,
            before: None,
            after: None,
            seconds,
        }
    }

    /// A plain-text table: one line per matrix, then the totals.
    pub fn table(&self) -> String {
        let mut out = format!("{:<44} {:>10} {:>9}\n", "matrix", "entries", "sparsity");
        for t in &self.pruned {
            out += &format!("{:<44} {:>10} {:>8.2}%\n", t.name, t.params, t.sparsity * 100.0);
        }
        out += &format!(
            "{} {} ({}): pruned matrices {:.2}% sparse; model {} parameters, {} -> {} non-zero ({:.2}% sparse); {:.1} s\n",
            self.method,
            self.pattern,
            self.scope,
            self.target_sparsity * 100.0,
            self.params,
            self.nonzero_before,
            self.nonzero_after,
            self.model_sparsity * 100.0,
            self.seconds
        );
        if let (Some(b), Some(a)) = (self.before, self.after) {
            out += &format!("validation perplexity {:.3} -> {:.3} ({:.4} -> {:.4} bits/byte)\n", b.ppl, a.ppl, b.bits_per_byte, a.bits_per_byte);
        }
        out
    }
}
