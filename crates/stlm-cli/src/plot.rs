//! `stlm plot`: line plots (SVG) from a CSV table, or a training run's curves.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use stlm_eval::plot::{line_plot, run_figure, series_from_csv};

#[derive(Args)]
pub struct PlotArgs {
    /// CSV table with a header row.
    #[arg(long, conflicts_with = "run", required_unless_present = "run")]
    csv: Option<PathBuf>,
    /// A training run directory: loss and validation loss, bits per byte, learning rate and
    /// tokens/s against step, from its metrics.jsonl (and validation loss by context position
    /// from position_loss.jsonl when the run logged it).
    #[arg(long)]
    run: Option<PathBuf>,
    /// Column for the x axis (with --csv).
    #[arg(long, required_unless_present = "run")]
    x: Option<String>,
    /// Column for the y axis (with --csv).
    #[arg(long, required_unless_present = "run")]
    y: Option<String>,
    /// Column whose values name the lines (one line per value).
    #[arg(long)]
    group: Option<String>,
    /// Plot title (default: "Y against X").
    #[arg(long)]
    title: Option<String>,
    /// Output file (.svg or .png).
    #[arg(long)]
    out: PathBuf,
}

pub fn plot(a: PlotArgs) -> Result<()> {
    if !matches!(a.out.extension().and_then(|e| e.to_str()), Some("svg" | "png")) {
        bail!("--out {}: plots are written as .svg or .png", a.out.display());
    }
    if let Some(run) = &a.run {
        let panels = run_figure(run, &a.out)?;
        eprintln!("wrote {} ({panels} panels)", a.out.display());
        return Ok(());
    }
    let (Some(csv), Some(x), Some(y)) = (&a.csv, &a.x, &a.y) else { bail!("give --run DIR, or --csv FILE --x COLUMN --y COLUMN") };
    let text = std::fs::read_to_string(csv).with_context(|| format!("{}: cannot read", csv.display()))?;
    let series = series_from_csv(&text, x, y, a.group.as_deref()).with_context(|| csv.display().to_string())?;
    let title = a.title.clone().unwrap_or_else(|| format!("{y} against {x}"));
    line_plot(&a.out, &title, x, y, &series)?;
    eprintln!("wrote {} ({} lines)", a.out.display(), series.len());
    Ok(())
}
