//! metrics.jsonl and position_loss.jsonl: the lines a run writes, the throughput window between
//! log lines, and the truncation of lines past the checkpoint a run resumes from.

use crate::Result;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use stlm_core::CoreError;
use stlm_moe::{load_entropy, MoeStats};

/// One metrics.jsonl line (written by a run, read back by [`read_metrics`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    /// Steps completed.
    pub step: u64,
    /// Mean training loss of the step (nats per token).
    pub loss: f64,
    /// Validation loss, on the steps where it was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// Validation bits per byte of text (total nats / ln 2 / bytes the targets stand for), where
    /// measured and the data source knows the bytes: comparable across tokenizers and byte models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_bpb: Option<f64>,
    /// Learning rate used by the step.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Training throughput since the previous log line.
    pub tokens_per_s: f64,
    /// Model FLOPs per second since the previous log line (`6 N + 12 L H T` per token, see
    /// `stlm_core::flops`), when the model counts its FLOPs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_flops_per_s: Option<f64>,
    /// Seconds since this process started training.
    pub elapsed: f64,
    /// Per MoE layer: balancing loss, expert load, its entropy and dropped tokens (MoE models).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moe: Vec<MoeLog>,
}

/// What one MoE layer did in the logged step (its last micro-batch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoeLog {
    /// Layer index.
    pub layer: usize,
    /// The weighted balancing (and z) loss added to the training loss.
    pub aux_loss: f64,
    /// Tokens (assignments) per expert.
    pub load: Vec<i64>,
    /// Entropy of the load in nats (`ln(experts)` when balanced).
    pub load_entropy: f64,
    /// Fraction of wanted assignments dropped for capacity.
    pub dropped: f64,
}

impl MoeLog {
    /// Host values of one layer's stats (a device sync: only at log steps).
    pub fn from_stats(layer: usize, s: &MoeStats) -> Self {
        MoeLog {
            layer,
            aux_loss: s.aux_loss.double_value(&[]),
            load: Vec::try_from(&s.load).unwrap_or_default(),
            load_entropy: load_entropy(&s.load),
            dropped: s.dropped.double_value(&[]),
        }
    }
}

/// One position_loss.jsonl line: mean validation loss at each window position and its standard
/// error over the windows of `eval_batches` validation batches.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PositionLog {
    /// Step after which it was measured.
    pub step: u64,
    /// Windows averaged over.
    pub windows: i64,
    /// Mean loss (nats) at each position.
    pub loss: Vec<f64>,
    /// Standard error of each mean (sample standard deviation / sqrt(windows)).
    pub stderr: Vec<f64>,
}

/// The metrics files of a run directory and the throughput window since the last line.
pub struct Metrics {
    write: bool,
    metrics: PathBuf,
    positions: PathBuf,
    started: Instant,
    window_start: Instant,
    window_tokens: u64,
    window_flops: Option<f64>,
}

/// One step's values for its metrics line.
pub struct StepValues {
    /// Steps completed.
    pub step: u64,
    /// Mean training loss of the step.
    pub loss: f64,
    /// Validation loss and bits per byte, where measured.
    pub val: (Option<f64>, Option<f64>),
    /// Learning rate used by the step.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// MoE layers' lines.
    pub moe: Vec<MoeLog>,
}

impl Metrics {
    /// The metrics files of `run_dir`: a run resumed at `resumed` keeps the lines up to that
    /// step, a new run (`None`) starts them afresh. Without `write` (a data-parallel rank other
    /// than 0), lines are made but the files are left alone.
    pub fn open(run_dir: &Path, resumed: Option<u64>, write: bool) -> Result<Self> {
        let (metrics, positions) = (run_dir.join("metrics.jsonl"), run_dir.join("position_loss.jsonl"));
        for path in [&metrics, &positions].into_iter().filter(|_| write) {
            match resumed {
                Some(step) => truncate_lines(path, step)?,
                None if path.exists() => std::fs::remove_file(path).map_err(|e| CoreError::io(path, e))?,
                None => {}
            }
        }
        let now = Instant::now();
        Ok(Metrics { write, metrics, positions, started: now, window_start: now, window_tokens: 0, window_flops: Some(0.0) })
    }

    /// Counts a step's tokens and model FLOPs (when the model counts them) into the window.
    pub fn count(&mut self, tokens: u64, flops: Option<f64>) {
        self.window_tokens += tokens;
        self.window_flops = self.window_flops.zip(flops).map(|(a, b)| a + b);
    }

    /// Appends the metrics line of `v` with the window's throughput, and starts a new window.
    pub fn log(&mut self, v: StepValues) -> Result<StepLog> {
        let secs = self.window_start.elapsed().as_secs_f64().max(1e-9);
        let log = StepLog {
            step: v.step,
            loss: v.loss,
            val_loss: v.val.0,
            val_bpb: v.val.1,
            lr: v.lr,
            grad_norm: v.grad_norm,
            tokens_per_s: self.window_tokens as f64 / secs,
            model_flops_per_s: self.window_flops.map(|f| f / secs),
            elapsed: self.started.elapsed().as_secs_f64(),
            moe: v.moe,
        };
        if self.write {
            append_line(&self.metrics, &log)?;
        }
        (self.window_start, self.window_tokens, self.window_flops) = (Instant::now(), 0, Some(0.0));
        Ok(log)
    }

    /// Appends a position_loss.jsonl line.
    pub fn log_positions(&self, log: &PositionLog) -> Result<()> {
        if !self.write {
            return Ok(());
        }
        append_line(&self.positions, log)
    }
}

impl StepLog {
    /// The progress line: loss, validation loss and bits per byte, learning rate, throughput.
    pub fn summary(&self) -> String {
        format!(
            "loss {:.4}{} lr {:.2e} {:.0} tok/s",
            self.loss,
            self.val_loss.map(|v| format!(" val {v:.4}")).unwrap_or_default()
                + &self.val_bpb.map(|b| format!(" ({b:.3} bpb)")).unwrap_or_default(),
            self.lr,
            self.tokens_per_s
        )
    }
}

/// Appends `value` as one JSON line to `path`.
fn append_line(path: &Path, value: &impl Serialize) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| CoreError::io(path, e))?;
    let line = serde_json::to_string(value).expect("log serializes");
    writeln!(f, "{line}").map_err(|e| CoreError::io(path, e))?;
    Ok(())
}

/// Keeps the lines of steps up to `step` (a resumed run rewrites the rest).
/// The lines of a run's `metrics.jsonl`; an unreadable file or a line that is not a metrics line
/// is an error naming the file and the line.
pub fn read_metrics(path: &Path) -> Result<Vec<StepLog>> {
    let text = std::fs::read_to_string(path).map_err(|e| CoreError::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| CoreError::format(path, format!("line {}: not a metrics line: {e}", i + 1)).into())
        })
        .collect()
}

fn truncate_lines(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    Ok(stlm_core::atomic_write_bytes(path, kept.as_bytes())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_lines_read_back_as_written_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let line = |step: u64, val: Option<f64>| StepLog {
            step,
            loss: 3.5,
            val_loss: val,
            val_bpb: val.map(|v| v / 2.0),
            lr: 1e-3,
            grad_norm: 0.5,
            tokens_per_s: 1000.0,
            model_flops_per_s: None,
            elapsed: step as f64,
            moe: vec![MoeLog { layer: 1, aux_loss: 0.01, load: vec![3, 5], load_entropy: 0.6, dropped: 0.0 }],
        };
        let lines = vec![line(5, None), line(10, Some(3.0))];
        let text: String = lines.iter().map(|l| serde_json::to_string(l).unwrap() + "\n").collect();
        std::fs::write(&path, &text).unwrap();
        assert_eq!(read_metrics(&path).unwrap(), lines);
        std::fs::write(&path, format!("{text}{{\"step\": 11}}\n")).unwrap();
        let e = read_metrics(&path).unwrap_err().to_string();
        assert!(e.contains("metrics.jsonl") && e.contains("line 3"), "{e}");
    }
}
