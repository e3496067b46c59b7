//! `stlm prune`: a model directory -> a pruned model directory with `pruning.json` (the report:
//! sparsity per matrix and overall or the units removed, parameters, validation perplexity
//! before and after, time).

use crate::common::{print_json, DeviceArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use stlm_prune::pipeline::{self, Inputs, Plan, PruneJob};
use stlm_prune::options::{Schedule, Skip};
use stlm_prune::{Importance, Method, Pattern, PruneOptions, Scope, SparseGptOptions, StructuredOptions, Unit};
use stlm_train::trainer::RunControl;

#[derive(Args)]
pub struct PruneArgs {
    /// Model directory to prune (token models).
    #[arg(long)]
    model: PathBuf,
    /// Directory for the pruned model (with `pruning.json`).
    #[arg(long)]
    out: PathBuf,
    /// How weights are scored: magnitude, wanda or sparsegpt (unstructured and N:M pruning).
    #[arg(long, value_enum, default_value = "magnitude", conflicts_with = "structured")]
    method: Method,
    /// Fraction of each matrix's weights to prune (0.5: half).
    #[arg(long, conflicts_with_all = ["nm", "structured"], required_unless_present_any = ["nm", "structured"])]
    sparsity: Option<f64>,
    /// Semi-structured N:M sparsity: N of every M consecutive inputs pruned, e.g. 2:4.
    #[arg(long, conflicts_with = "structured")]
    nm: Option<String>,
    /// Structured pruning: remove whole heads, neurons, experts or layers (the model shrinks).
    #[arg(long, value_enum, value_name = "UNIT", requires = "amount")]
    structured: Option<Unit>,
    /// Structured: the fraction of units removed from every block (of the blocks, for layers).
    #[arg(long)]
    amount: Option<f64>,
    /// Structured: magnitude, activation or taylor (default: magnitude; activation, that is
    /// block influence, for layers).
    #[arg(long, value_enum)]
    importance: Option<Importance>,
    /// Where scores compete: row (Wanda's default), layer (magnitude's), or global (magnitude only).
    #[arg(long, value_enum)]
    scope: Option<Scope>,
    /// Leave this projection dense in every block (repeatable; default lm_head; `--skip none`
    /// prunes every linear layer). Embeddings are never pruned.
    #[arg(long, default_values = ["lm_head"], value_parser = Skip::parser())]
    skip: Vec<Skip>,
    /// Leave decoder block N dense (repeatable).
    #[arg(long, value_name = "N")]
    skip_block: Vec<usize>,
    /// SparseGPT: columns per block.
    #[arg(long, default_value_t = 128)]
    block_size: i64,
    /// SparseGPT: Hessian damping as a fraction of its mean diagonal.
    #[arg(long, default_value_t = 0.01)]
    damp: f64,
    /// Prune once, or iteratively.
    #[arg(long, value_enum, default_value_t = Schedule::OneShot)]
    schedule: Schedule,
    /// Iterative pruning: number of prune-and-fine-tune stages.
    #[arg(long, default_value_t = 4)]
    stages: u32,
    /// Iterative pruning: fine-tuning steps after each stage.
    #[arg(long, default_value_t = 50)]
    stage_steps: u64,
    /// Iterative pruning: the run config whose [train] and [data] tables fine-tune each stage.
    #[arg(long, value_name = "FILE")]
    train_config: Option<PathBuf>,
    /// Iterative pruning: training text (repeatable), as `stlm train --data`.
    #[arg(long = "data")]
    data: Vec<PathBuf>,
    #[command(flatten)]
    inputs: Inputs,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(a: PruneArgs) -> Result<()> {
    if same_dir(&a.model, &a.out) {
        bail!("--out {}: must differ from --model (the original is kept)", a.out.display());
    }
    let job = PruneJob {
        model: a.model.clone(),
        out: a.out.clone(),
        inputs: a.inputs.clone(),
        device: stlm_core::parse_device(&a.device.device)?,
        progress: std::io::stderr().is_terminal(),
    };
    if a.device.dtype != "float32" {
        bail!("--dtype {}: pruning runs in float32", a.device.dtype);
    }
    let plan = plan(&a)?;
    let report = pipeline::run(&job, plan).with_context(|| format!("--model {}", a.model.display()))?;
    if a.json {
        return print_json(&report);
    }
    print!("{}", report.table());
    eprintln!("saved {}", a.out.display());
    Ok(())
}

/// What the options ask for.
fn plan(a: &PruneArgs) -> Result<Plan> {
    if let Some(unit) = a.structured {
        let Some(amount) = a.amount else { bail!("--structured: give --amount F (the fraction of units removed)") };
        let importance = match (a.importance, unit) {
            (Some(i), _) => i,
            (None, Unit::Layers) => Importance::Activation,
            (None, _) => Importance::Magnitude,
        };
        return Ok(Plan::Structured(StructuredOptions { unit, amount, importance }));
    }
    if a.amount.is_some() || a.importance.is_some() {
        bail!("--amount and --importance are for structured pruning: add --structured heads|neurons|experts|layers");
    }
    let method = a.method;
    let pattern = match (&a.nm, a.sparsity) {
        (Some(nm), _) => Pattern::parse_nm(nm)?,
        (None, Some(s)) => Pattern::fraction(s)?,
        (None, None) => bail!("give --sparsity F or --nm N:M"),
    };
    let scope = a.scope.unwrap_or(method.default_scope());
    let skip = a.skip.iter().filter_map(|s| s.0).collect();
    let opts = PruneOptions { method, pattern, scope, skip, skip_blocks: a.skip_block.clone(), sparsegpt: SparseGptOptions { block_size: a.block_size, damp: a.damp } };
    match a.schedule {
        Schedule::OneShot => Ok(Plan::OneShot(opts)),
        Schedule::Cubic => {
            if !matches!(opts.pattern, Pattern::Fraction { .. }) {
                bail!("--schedule cubic raises a --sparsity fraction; N:M is reached in one step");
            }
            let Some(train_config) = a.train_config.clone() else { bail!("--schedule cubic: give --train-config FILE (the [train] table that fine-tunes each stage)") };
            if a.data.is_empty() || a.stages == 0 {
                bail!("--schedule cubic: give --data FILE (training text) and --stages of at least 1");
            }
            let control = RunControl { progress: std::io::stderr().is_terminal(), stop: crate::train::ctrl_c()?, ..Default::default() };
            Ok(Plan::Cubic { opts, train_config, data: a.data.clone(), stages: a.stages, stage_steps: a.stage_steps, control })
        }
    }
}

/// Whether two paths name the same directory (an `--out` that does not exist yet is not `--model`).
fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}
