//! stlm-bench: what `stlm bench` measures, each against a reference timed in the same process on
//! the same inputs, with typed reports (the command line prints them).
//!
//! - [`attention`]: forward+backward of an attention layer (or kernel) of a kind vs dense SDPA.
//! - [`moe`]: an MoE layer vs a dense SwiGLU MLP with the same active parameters.
//! - [`speed`]: batch-1 greedy decoding, and training throughput with model FLOPs utilisation.

pub mod attention;
pub mod moe;
pub mod speed;

use std::time::Instant;
use tch::Tensor;

/// Errors of a benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A setting out of range; names it.
    #[error("{0}")]
    Input(String),
    /// Building or running the model failed.
    #[error(transparent)]
    Model(#[from] stlm_model::ModelError),
    /// A training step failed.
    #[error(transparent)]
    Train(#[from] stlm_train::TrainError),
    /// Device parsing and the like.
    #[error(transparent)]
    Core(#[from] stlm_core::CoreError),
}

/// Result alias for stlm-bench.
pub type Result<T, E = BenchError> = std::result::Result<T, E>;

/// Times `f` (a forward returning a scalar loss) and its backward `repeats` times after a
/// warm-up; the fastest, in ms. `wait` reads a value that the backward wrote, so that an
/// asynchronous device has finished.
fn fastest_ms(repeats: usize, f: &dyn Fn() -> Tensor, wait: Option<&Tensor>) -> f64 {
    let mut best = f64::INFINITY;
    let first = wait.map(|w| vec![0i64; w.dim()]); // the index read, made outside the timed loop
    for i in 0..=repeats {
        let start = Instant::now();
        f().backward();
        if let (Some(w), Some(at)) = (wait, first.as_deref()) {
            let _ = w.grad().double_value(at);
        }
        if i > 0 {
            best = best.min(start.elapsed().as_secs_f64()); // the first run warms up
        }
    }
    best * 1e3
}
