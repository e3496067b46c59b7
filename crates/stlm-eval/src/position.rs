//! Per-position loss: the mean loss at each position of the context over a corpus, with its
//! standard error, and the in-context learning score of Olsson et al. (2022), the mean loss at
//! a late position minus the mean loss at an early one (negative when later tokens, which see
//! more context, are predicted better).
//!
//! The corpus is cut into disjoint windows of `window + 1` ids; position `p` (0-based) is the
//! loss of id `p + 1` given ids `0..=p` of its window. Byte models score bytes (chunk ends
//! included in the byte that starts a chunk).

use crate::plot::Series;
use crate::{EvalError, Result};
use indicatif::ProgressBar;
use std::path::{Path, PathBuf};
use serde::Serialize;
use stlm_core::OptionError;
use stlm_model::AnyModel;
use tch::{Kind, Tensor};

/// Mean loss per context position.
#[derive(Debug, Clone, Serialize)]
pub struct PositionLoss {
    /// Windows averaged over.
    pub windows: usize,
    /// Mean loss (nats) at each position `0..window`.
    pub mean: Vec<f64>,
    /// Standard error of each mean (sample standard deviation over windows / sqrt(windows)).
    pub stderr: Vec<f64>,
    /// The losses of each window, `[window][position]`.
    #[serde(skip)]
    pub rows: Vec<Vec<f64>>,
}

/// Mean loss over a range of positions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PositionBin {
    /// First position (0-based).
    pub start: usize,
    /// One past the last position.
    pub end: usize,
    /// Mean over windows of each window's mean loss over the bin's positions.
    pub mean: f64,
    /// Its standard error over windows.
    pub stderr: f64,
}

impl PositionLoss {
    /// Mean and standard error from per-window losses `rows[window][position]`.
    pub fn from_rows(rows: &[Vec<f64>]) -> Result<Self> {
        let n = rows.len();
        let Some(width) = rows.first().map(Vec::len) else {
            return Err(EvalError::Input("no windows to average".into()));
        };
        let mut mean = vec![0.0; width];
        for r in rows {
            for (m, x) in mean.iter_mut().zip(r) {
                *m += x / n as f64;
            }
        }
        let stderr = (0..width)
            .map(|p| {
                if n < 2 {
                    return f64::NAN;
                }
                let ss: f64 = rows.iter().map(|r| (r[p] - mean[p]).powi(2)).sum();
                (ss / (n - 1) as f64).sqrt() / (n as f64).sqrt()
            })
            .collect();
        Ok(PositionLoss { windows: n, mean, stderr, rows: rows.to_vec() })
    }

    /// The positions in about `bins` bins of geometrically growing width (every early position
    /// its own bin, later ones pooled), each with the mean over windows of the window's mean
    /// over the bin, and its standard error over windows: a readable curve whose band accounts
    /// for the correlation of neighbouring positions.
    pub fn binned(&self, bins: usize) -> Vec<PositionBin> {
        let width = self.mean.len();
        let ratio = (width.max(2) as f64).powf(1.0 / bins.max(1) as f64);
        let mut edges = vec![0usize];
        let mut upper = 1.0f64;
        while *edges.last().expect("edges start with 0") < width {
            upper *= ratio;
            let last = *edges.last().expect("edges start with 0");
            edges.push((upper.round() as usize).clamp(last + 1, width));
        }
        edges
            .windows(2)
            .map(|e| {
                let (start, end) = (e[0], e[1]);
                let per_window: Vec<Vec<f64>> = self.rows.iter().map(|r| vec![r[start..end].iter().sum::<f64>() / (end - start) as f64]).collect();
                let (mean, stderr) = match PositionLoss::from_rows(&per_window) {
                    Ok(p) => (p.mean[0], p.stderr[0]),
                    Err(_) => (f64::NAN, f64::NAN),
                };
                PositionBin { start, end, mean, stderr }
            })
            .collect()
    }

    /// The in-context learning score: mean loss at position `late` minus at `early`, each
    /// clamped to the window (`late` to its last position, `early` below `late`). Returns the
    /// score and the positions used.
    pub fn icl_score(&self, early: usize, late: usize) -> (f64, usize, usize) {
        let last = self.mean.len().saturating_sub(1);
        let late = late.min(last);
        let early = early.min(late.saturating_sub(1));
        (self.mean[late] - self.mean[early], early, late)
    }
}

/// Per-position losses of `model` over `ids` (token ids, or byte-tokenizer ids for a byte
/// model): up to `max_windows` disjoint windows of `window + 1` ids, `batch` windows per forward.
pub fn position_loss(model: &AnyModel, ids: &[u32], window: usize, max_windows: usize, batch: usize, bar: &ProgressBar) -> Result<PositionLoss> {
    let context = model.as_lm().model_config().max_position_embeddings as usize;
    if window < 2 || (matches!(model, AnyModel::Tokens(_)) && window > context) {
        let why = format!("must be in 2..={context} (the model's max_position_embeddings)");
        return Err(OptionError::new("window", window, why).into());
    }
    let available = ids.len().saturating_sub(1) / window;
    let count = available.min(max_windows.max(1));
    if count == 0 {
        return Err(EvalError::Input(format!("the text has {} ids, fewer than one window of {}", ids.len(), window + 1)));
    }
    let rows: Vec<Vec<u32>> = (0..count).map(|w| ids[w * window..w * window + window + 1].to_vec()).collect();
    bar.set_length(count as u64);
    let _guard = tch::no_grad_guard();
    let mut losses = Vec::with_capacity(count);
    for group in rows.chunks(batch.max(1)) {
        let flat: Vec<i64> = group.iter().flatten().map(|&t| i64::from(t)).collect();
        if let AnyModel::Tokens(m) = model {
            m.check_ids(&flat)?;
        }
        let all = Tensor::from_slice(&flat).view([group.len() as i64, window as i64 + 1]).to_device(model.as_lm().device());
        let (inputs, targets) = (all.narrow(1, 0, window as i64), all.narrow(1, 1, window as i64));
        let nll = model.as_lm().position_nats(&inputs, &targets)?.to_kind(Kind::Double).to_device(tch::Device::Cpu);
        for r in 0..group.len() {
            losses.push(Vec::<f64>::try_from(nll.get(r as i64)).expect("float64 losses"));
        }
        bar.inc(group.len() as u64);
    }
    PositionLoss::from_rows(&losses)
}


/// The checkpoints of a training run in step order (`RUN/checkpoints/step-*`), then its final
/// model directory (`RUN/model`) when present.
pub fn run_models(run: &Path) -> Result<Vec<PathBuf>> {
    let ckpts = run.join("checkpoints");
    let mut dirs: Vec<PathBuf> = match std::fs::read_dir(&ckpts) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-")) && p.join("model.safetensors").is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    dirs.sort();
    let last = run.join("model");
    if last.join("model.safetensors").is_file() {
        dirs.push(last);
    }
    if dirs.is_empty() {
        return Err(EvalError::Input(format!("{}: no checkpoints/step-* or model directory with weights", run.display())));
    }
    Ok(dirs)
}

/// A short label for a model directory: `step N` for checkpoints, `RUN (final)` for a run's
/// model, else the path.
pub fn label(dir: &Path) -> String {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    match name.strip_prefix("step-") {
        Some(step) => format!("step {}", step.trim_start_matches('0')),
        None if name == "model" => dir.parent().and_then(|p| p.file_name()).map_or(name.clone(), |r| format!("{} (final)", r.to_string_lossy())),
        None => dir.display().to_string(),
    }
}

impl PositionLoss {
    /// The plotted line named `name`: every position (`bins == 0`) or about `bins` bins of
    /// growing width, each with its 95% band; position i (0-based) has i + 1 tokens of context
    /// and a bin is drawn at its middle.
    pub fn series(&self, name: String, bins: usize) -> Series {
        let (points, band) = if bins == 0 {
            let points = self.mean.iter().enumerate().map(|(i, &m)| ((i + 1) as f64, m)).collect();
            (points, self.mean.iter().zip(&self.stderr).map(|(&m, &s)| (m - 1.96 * s, m + 1.96 * s)).collect())
        } else {
            let binned = self.binned(bins);
            let points = binned.iter().map(|b| ((b.start + 1 + b.end) as f64 / 2.0, b.mean)).collect();
            (points, binned.iter().map(|b| (b.mean - 1.96 * b.stderr, b.mean + 1.96 * b.stderr)).collect())
        };
        Series { name, points, band }
    }

}

/// The table `model,position,loss,stderr` (1-based positions) of several models' curves, as CSV.
pub fn position_csv(curves: &[Curve]) -> Result<String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let err = |e: csv::Error| EvalError::Input(format!("CSV: {e}"));
    w.write_record(["model", "position", "loss", "stderr"]).map_err(err)?;
    for c in curves {
        let (name, p) = (&c.label, &c.loss);
        for (i, (m, s)) in p.mean.iter().zip(&p.stderr).enumerate() {
            w.write_record([name.clone(), (i + 1).to_string(), format!("{m:.6}"), format!("{s:.6}")]).map_err(err)?;
        }
    }
    let bytes = w.into_inner().map_err(|e| EvalError::Input(format!("CSV: {e}")))?;
    String::from_utf8(bytes).map_err(|e| EvalError::Input(format!("CSV: {e}")))
}

/// The windows, score positions and plot bins of a per-position study (`stlm eval position-loss`).
#[derive(Debug, Clone, clap::Args)]
pub struct PositionOptions {
    /// Positions per window (default: the model's max_position_embeddings, at most 1024;
    /// byte models: bytes, default 1024).
    #[arg(long)]
    pub window: Option<usize>,
    /// Windows at most.
    #[arg(long, default_value_t = 200)]
    pub windows: usize,
    /// Early position of the in-context learning score (0-based).
    #[arg(long, default_value_t = 50)]
    pub early: usize,
    /// Late position of the in-context learning score (clamped to the window).
    #[arg(long, default_value_t = 500)]
    pub late: usize,
    /// Windows per forward.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Plot positions pooled into about this many bins of growing width (each bin's band from
    /// the spread of its window means); 0 plots every position.
    #[arg(long, default_value_t = 40)]
    pub bins: usize,
}

/// One model's curve in a study.
#[derive(Debug, Clone, Serialize)]
pub struct Curve {
    /// The model directory.
    pub model: String,
    /// Its label in the plot and table.
    #[serde(skip)]
    pub label: String,
    /// Windows averaged.
    pub windows: usize,
    /// Positions per window.
    pub window: usize,
    /// Loss late minus loss early.
    pub icl_score: f64,
    /// The early and late positions used (clamped).
    pub early: usize,
    /// See `early`.
    pub late: usize,
    /// Mean loss at `early`.
    pub loss_early: f64,
    /// Mean loss at `late`.
    pub loss_late: f64,
    /// Mean over every position.
    pub mean_loss: f64,
    /// The curve.
    #[serde(skip)]
    pub loss: PositionLoss,
}

/// The curve of `model` (from directory `dir`) on the ids of `text`; progress on `bar`.
pub fn curve(model: &AnyModel, tok: &stlm_tokenizers::Tokenizer, dir: &Path, text: &str, o: &PositionOptions, bar: &ProgressBar) -> Result<Curve> {
    let ids = tok.encode(text, false).map_err(|e| EvalError::Input(e.to_string()))?;
    let context = model.as_lm().model_config().max_position_embeddings as usize;
    let window = o.window.unwrap_or(if matches!(model, AnyModel::Bytes(_)) { 1024 } else { context.min(1024) });
    let label = label(dir);
    bar.set_prefix(format!("position loss {label}"));
    let loss = position_loss(model, &ids, window, o.windows, o.batch, bar).map_err(|e| EvalError::Input(format!("{}: {e}", dir.display())))?;
    let (icl_score, early, late) = loss.icl_score(o.early, o.late);
    let mean_loss = loss.mean.iter().sum::<f64>() / loss.mean.len() as f64;
    Ok(Curve { model: dir.display().to_string(), label, windows: loss.windows, window, icl_score, early, late, loss_early: loss.mean[early], loss_late: loss.mean[late], mean_loss, loss })
}

/// The figure of `curves` (one line with its 95% band each, in `bins` bins) on the text named
/// `data_name`, written to `out` (.svg or .png).
pub fn plot_curves(curves: &[Curve], data_name: &str, bins: usize, out: &Path) -> Result<()> {
    let panel = crate::plot::Panel {
        title: format!("loss by context position ({data_name})"),
        x_label: "position (tokens of context)".into(),
        y_label: "loss (nats), 95% band".into(),
        series: curves.iter().map(|c| c.loss.series(c.label.clone(), bins)).collect(),
        markers: false,
    };
    crate::plot::figure(out, &[panel], 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_stderr_and_icl_score() {
        let rows = vec![vec![3.0, 2.0, 1.0], vec![5.0, 2.0, 3.0]];
        let p = PositionLoss::from_rows(&rows).unwrap();
        assert_eq!(p.mean, vec![4.0, 2.0, 2.0]);
        // Sample standard deviation sqrt(2) at positions 0 and 2, over sqrt(2) windows.
        assert!((p.stderr[0] - 1.0).abs() < 1e-12 && p.stderr[1] == 0.0);
        assert_eq!(p.icl_score(0, 2), (-2.0, 0, 2));
        // Positions beyond the window are clamped to it.
        assert_eq!(p.icl_score(50, 500), (0.0, 1, 2));
        assert!(PositionLoss::from_rows(&[]).is_err());
    }

    #[test]
    fn bins_cover_every_position_once_and_average_windows() {
        let rows: Vec<Vec<f64>> = (0..3).map(|w| (0..100).map(|p| (p * (w + 1)) as f64).collect()).collect();
        let p = PositionLoss::from_rows(&rows).unwrap();
        let bins = p.binned(30);
        assert_eq!(bins.first().map(|b| (b.start, b.end)), Some((0, 1)));
        assert_eq!(bins.last().map(|b| b.end), Some(100));
        assert!(bins.windows(2).all(|b| b[0].end == b[1].start), "contiguous");
        assert!(bins.len() <= 31 && bins.last().map(|b| b.end - b.start) > Some(5), "{bins:?}");
        // Bin [s, e): window w's mean is (w + 1) (s + e - 1) / 2; over windows 2 (s + e - 1) / 2.
        for b in &bins {
            assert!((b.mean - (b.start + b.end - 1) as f64).abs() < 1e-9, "{b:?}");
        }
        // Window means (s+e-1)/2 x {1, 2, 3}: sample sd (s+e-1)/2, over sqrt(3).
        let b = &bins[bins.len() - 1];
        assert!((b.stderr - (b.start + b.end - 1) as f64 / 2.0 / 3f64.sqrt()).abs() < 1e-9, "{b:?}");
    }
}
