//! `stlm plot`: line plots (SVG) from a CSV table.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use stlm_eval::plot::{line_plot, series_from_csv};

#[derive(Args)]
pub struct PlotArgs {
    /// CSV table with a header row.
    #[arg(long)]
    csv: PathBuf,
    /// Column for the x axis.
    #[arg(long)]
    x: String,
    /// Column for the y axis.
    #[arg(long)]
    y: String,
    /// Column whose values name the lines (one line per value).
    #[arg(long)]
    group: Option<String>,
    /// Plot title (default: "Y against X").
    #[arg(long)]
    title: Option<String>,
    /// Output file (.svg).
    #[arg(long)]
    out: PathBuf,
}

pub fn plot(a: PlotArgs) -> Result<()> {
    if a.out.extension().and_then(|e| e.to_str()) != Some("svg") {
        bail!("--out {}: plots are written as .svg", a.out.display());
    }
    let text = std::fs::read_to_string(&a.csv).with_context(|| format!("{}: cannot read", a.csv.display()))?;
    let series = series_from_csv(&text, &a.x, &a.y, a.group.as_deref()).with_context(|| a.csv.display().to_string())?;
    let title = a.title.clone().unwrap_or_else(|| format!("{} against {}", a.y, a.x));
    line_plot(&a.out, &title, &a.x, &a.y, &series)?;
    eprintln!("wrote {} ({} lines)", a.out.display(), series.len());
    Ok(())
}
