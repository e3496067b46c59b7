//! `stlm sweep`: one base config and a grid of variants (`--set KEY=V1,V2`, `--data A --data B`),
//! each trained by `stlm train` in its own process with the same time budget, then compared in a
//! table and a plot (the experiment is `stlm_sweep`). Rerun the same command to continue a
//! killed sweep.

use crate::common::{print_json, DeviceArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use stlm_sweep::{grid::GridOptions, report::table, SweepSpec};

#[derive(Args)]
pub struct SweepArgs {
    /// Base TOML config, as for `stlm train`.
    #[arg(long)]
    config: PathBuf,
    #[command(flatten)]
    grid: GridOptions,
    /// Training time of every variant, in minutes (`stlm train --time-limit`).
    #[arg(long)]
    budget_minutes: f64,
    /// Steps at most per variant (default: the config's `max_steps`).
    #[arg(long)]
    max_steps: Option<u64>,
    /// A UTF-8 text every variant is also scored on (`stlm eval ppl`): one yardstick for runs
    /// whose validation splits differ (a dataset comparison).
    #[arg(long, value_name = "FILE")]
    eval_data: Option<PathBuf>,
    /// With --eval-data: also score every variant with early exit at this softmax threshold
    /// (`stlm eval ppl --early-exit`), and at full depth through the same one-position-at-a-time
    /// step without exit checks, for the average depth and both decoding speeds.
    #[arg(long, value_name = "THRESHOLD", requires = "eval_data")]
    early_exit: Option<f64>,
    /// Sweep directory (default: runs/sweep-<config name>): one run per variant, sweep.json,
    /// sweep.csv, sweep.md and sweep.svg.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print one JSON object (the variants' rows) instead of the table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn sweep(a: SweepArgs) -> Result<()> {
    if !(a.budget_minutes > 0.0 && a.budget_minutes.is_finite()) {
        bail!("--budget-minutes {}: must be a positive number of minutes", a.budget_minutes);
    }
    let variants = a.grid.variants().context("--variant/--set/--data")?;
    let stem = a.config.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "sweep".into());
    let spec = SweepSpec {
        out: a.out.clone().unwrap_or_else(|| Path::new("runs").join(format!("sweep-{stem}"))),
        config: a.config,
        variants,
        budget_minutes: a.budget_minutes,
        max_steps: a.max_steps,
        eval_data: a.eval_data,
        early_exit: a.early_exit,
        device: a.device.device,
        exe: std::env::current_exe().context("cannot find the stlm executable")?,
    };
    let stop = crate::train::ctrl_c()?;
    let outcome = stlm_sweep::run(&spec, &stop).with_context(|| format!("sweep in --out {}", spec.out.display()))?;
    if a.json {
        print_json(&outcome)?;
    } else {
        print!("{}", table(&outcome.variants, spec.eval_data.as_deref()));
    }
    if !outcome.failed.is_empty() {
        bail!("{} of {} variants failed: {}", outcome.failed.len(), spec.variants.len(), outcome.failed.join("; "));
    }
    Ok(())
}
