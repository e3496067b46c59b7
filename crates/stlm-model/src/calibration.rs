//! Calibration: evenly spaced windows of a tokenized text, and the inputs each linear layer sees
//! on them, block by block, for the methods that fit weights to their activations (Wanda and
//! SparseGPT in stlm-prune, GPTQ in stlm-quant).
//!
//! [`blockwise_grams`] runs the calibration batches through the model as those papers do: the
//! inputs of block `i`'s linear layers are recorded (a Gram matrix `X^T X` each, see
//! [`InputGram`]) while the batches run through blocks `0..i` already changed, then block `i` is
//! changed, and its outputs are the next block's inputs; the head's layers last.

use crate::layers::InputGram;
use crate::linears::LinearSite;
use crate::{DecoderModel, ModelError, Result};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use stlm_core::{CoreError, OptionError};
use stlm_tokenizers::Tokenizer;
use tch::Tensor;

/// `samples` windows of `len` ids (cut to the model's context) from `ids`, the first at the start
/// and the last at the end, evenly spaced between, in batches of 8 `[≤8, len]` on the model's
/// device. Ids outside the vocabulary, or a text shorter than one window, are errors.
pub fn calibration_windows(model: &DecoderModel, ids: &[i64], samples: usize, len: usize) -> Result<Vec<Tensor>> {
    if samples == 0 {
        return Err(OptionError::new("calib_samples", samples, "must be at least 1").into());
    }
    if len < 2 {
        return Err(OptionError::new("calib_len", len, "must be at least 2").into());
    }
    let len = len.min(model.config.max_position_embeddings as usize);
    model.check_ids(ids)?;
    if ids.len() < len {
        return Err(ModelError::Input(format!("{} tokens, fewer than one calibration window of {len}", ids.len())));
    }
    let starts: Vec<usize> = match samples {
        1 => vec![0],
        n => (0..n).map(|i| i * (ids.len() - len) / (n - 1)).collect(),
    };
    let windows: Vec<Tensor> = starts.iter().map(|&s| Tensor::from_slice(&ids[s..s + len])).collect();
    Ok(windows.chunks(8).map(|c| Tensor::stack(c, 0).to_device(model.device())).collect())
}

/// [`calibration_windows`] of the text file `path` tokenized by `tok`; errors name the file.
pub fn calibration_batches(model: &DecoderModel, tok: &Tokenizer, path: &Path, samples: usize, len: usize) -> Result<Vec<Tensor>> {
    let text = std::fs::read_to_string(path).map_err(|e| CoreError::io(path, e))?;
    let ids = tok.encode(&text, false).map_err(|e| ModelError::Input(format!("{}: {e}", path.display())))?;
    let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
    match calibration_windows(model, &ids, samples, len) {
        Err(ModelError::Input(m)) => Err(ModelError::Input(format!("{}: {m}", path.display()))),
        other => other,
    }
}

/// A calibration text and how it is cut into windows (`--calib`, `--calib-samples`,
/// `--calib-len` of `stlm prune` and `stlm quantize`).
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct CalibrationText {
    /// Calibration text (.txt) for the methods that fit weights to their inputs (wanda,
    /// sparsegpt, activation or taylor importance; gptq).
    #[cfg_attr(feature = "clap", arg(long))]
    pub calib: Option<PathBuf>,
    /// Calibration windows, spread evenly over the calibration text.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 64))]
    pub calib_samples: usize,
    /// Tokens per calibration window.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 256))]
    pub calib_len: usize,
}

impl CalibrationText {
    /// The [`calibration_batches`] of the text, or none when there is no text.
    pub fn batches(&self, model: &DecoderModel, tok: &Tokenizer) -> Result<Vec<Tensor>> {
        match &self.calib {
            Some(path) => calibration_batches(model, tok, path, self.calib_samples, self.calib_len),
            None => Ok(Vec::new()),
        }
    }
}

/// Feeds `calib` (int64 token batches) through `model` block by block and, for each block (and
/// last the head's layers, block `None`) with linear layers that `select` picks, calls `apply`
/// with the model, the block, and each picked layer's position in [`DecoderModel::linears_mut`]
/// with its input Gram matrix (float64 `[in, in]`); `apply` may change those layers, and the
/// later blocks see their changed outputs.
pub fn blockwise_grams<E: From<ModelError>>(
    model: &mut DecoderModel,
    calib: &[Tensor],
    select: &dyn Fn(&LinearSite<'_>) -> bool,
    mut apply: impl FnMut(&mut DecoderModel, Option<usize>, Vec<(usize, Tensor)>) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let _guard = tch::no_grad_guard();
    let groups: Vec<Option<usize>> = model.linears_mut().iter().filter(|t| select(t)).map(|t| t.block).collect();
    let mut passes: Vec<_> = calib
        .iter()
        .map(|b| {
            let pass = model.block_pass(b);
            let x = pass.input.shallow_clone();
            (pass, x)
        })
        .collect();
    let head = groups.contains(&None);
    for i in 0..model.layers.len() {
        if groups.contains(&Some(i)) {
            let grams = grams(model, Some(i), select, |m| {
                for (pass, x) in &passes {
                    let _ = m.run_block(i, pass, x);
                }
            })?;
            apply(model, Some(i), grams)?;
        }
        if i + 1 < model.layers.len() || head {
            for (pass, x) in passes.iter_mut() {
                *x = model.run_block(i, pass, x);
            }
        }
    }
    if head {
        let grams = grams(model, None, select, |m| {
            for (_, x) in &passes {
                let _ = m.head(&m.norm.forward(x));
            }
        })?;
        apply(model, None, grams)?;
    }
    Ok(())
}

/// The input Gram matrices of block `group`'s picked layers (by position in
/// [`DecoderModel::linears_mut`]) while `run` feeds them.
fn grams(model: &mut DecoderModel, group: Option<usize>, select: &dyn Fn(&LinearSite<'_>) -> bool, run: impl Fn(&DecoderModel)) -> Result<Vec<(usize, Tensor)>> {
    let picked = |t: &LinearSite<'_>| t.block == group && select(t);
    let taps: Vec<(usize, Arc<Mutex<InputGram>>)> = model
        .linears_mut()
        .into_iter()
        .enumerate()
        .filter(|(_, t)| picked(t))
        .map(|(i, t)| {
            let tap = Arc::new(Mutex::new(InputGram::default()));
            t.linear.tap = Some(Arc::clone(&tap));
            (i, tap)
        })
        .collect();
    run(model);
    // Every tap comes off before anything can fail.
    let mut sites = model.linears_mut();
    let mut out = Vec::new();
    for (i, tap) in taps {
        sites[i].linear.tap = None;
        let gram = tap.lock().unwrap_or_else(|e| e.into_inner()).gram.take();
        out.push((i, sites[i].name(), gram));
    }
    out.into_iter()
        .map(|(i, name, gram)| gram.map(|g| (i, g)).ok_or_else(|| ModelError::Input(format!("{name}: saw no calibration input"))))
        .collect()
}

/// What the Optimal Brain Surgeon methods (SparseGPT, GPTQ) compute from a layer's input Gram
/// matrix `gram` `[in, in]`: the upper Cholesky factor `U` of `H^-1` (float64), with
/// `H = gram + damp * mean(diag(gram)) * I`, inputs that were always zero (a zero diagonal) given a
/// unit diagonal first; and those inputs' mask `[in]`. `None` when the damped `H` is not positive
/// definite (more damping or more calibration data helps).
pub fn inverse_hessian_factor(gram: &Tensor, damp: f64) -> Option<(Tensor, Tensor)> {
    let h = gram.to_kind(tch::Kind::Double).copy();
    let dead = h.diagonal(0, 0, 1).eq(0.0);
    let _ = h.diagonal(0, 0, 1).masked_fill_(&dead, 1.0);
    let damping = h.diagonal(0, 0, 1).mean(tch::Kind::Double) * damp;
    let mut diag = h.diagonal(0, 0, 1);
    diag += &damping;
    let (chol, info) = h.linalg_cholesky_ex(false, false);
    if info.int64_value(&[]) != 0 {
        return None;
    }
    Some((chol.cholesky_inverse(false).linalg_cholesky(true), dead))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModelConfig;
    use tch::Device;

    #[test]
    fn windows_are_evenly_spaced_batched_and_checked() {
        let cfg = ModelConfig { vocab_size: 100, hidden_size: 8, intermediate_size: 8, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 16, ..ModelConfig::llama() };
        let model = DecoderModel::new(cfg, Device::Cpu).unwrap();
        let ids: Vec<i64> = (0..60).collect();
        let batches = calibration_windows(&model, &ids, 10, 4).unwrap();
        assert_eq!(batches.iter().map(|b| b.size()).collect::<Vec<_>>(), [vec![8, 4], vec![2, 4]]);
        let firsts: Vec<i64> = (0..8).map(|r| batches[0].int64_value(&[r, 0])).collect();
        assert_eq!(firsts, [0, 6, 12, 18, 24, 31, 37, 43], "evenly spaced from the start");
        assert_eq!(batches[1].int64_value(&[1, 3]), 59, "the last window ends at the end");
        assert_eq!(calibration_windows(&model, &ids, 1, 100).unwrap()[0].size(), [1, 16], "cut to the context");
        let e = calibration_windows(&model, &ids[..3], 2, 4).unwrap_err().to_string();
        assert!(e.contains("3 tokens"), "{e}");
        assert!(calibration_windows(&model, &ids, 0, 4).unwrap_err().to_string().contains("calib_samples"));
        assert!(calibration_windows(&model, &[5, 100], 1, 2).is_err(), "an id outside the vocabulary");
    }

    #[test]
    fn each_block_sees_the_outputs_of_the_blocks_changed_before_it() {
        let cfg = ModelConfig { vocab_size: 50, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 16, tie_word_embeddings: false, ..ModelConfig::llama() };
        tch::manual_seed(1);
        let mut model = DecoderModel::new(cfg, Device::Cpu).unwrap();
        let calib = vec![Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6, 7, 8]).view([1, 8])];
        let select = |t: &LinearSite<'_>| t.projection.name() != "down_proj";
        // Block 1's q_proj input Gram: untouched, with block 0's o_proj zeroed on the way, and again.
        let mut runs: Vec<Vec<(Option<usize>, Vec<(String, Tensor)>)>> = Vec::new();
        for zero in [false, true, false] {
            let mut seen = Vec::new();
            blockwise_grams::<ModelError>(&mut model, &calib, &select, |m, group, grams| {
                let names = m.linears_mut().iter().map(|t| t.name()).collect::<Vec<_>>();
                seen.push((group, grams.into_iter().map(|(i, g)| (names[i].clone(), g)).collect()));
                if zero && group == Some(0) {
                    for t in m.linears_mut().into_iter().filter(|t| t.block == Some(0) && t.projection.name() == "o_proj") {
                        t.linear.weight.assign(&t.linear.weight.value().zeros_like(), "o_proj").unwrap();
                    }
                }
                Ok(())
            })
            .unwrap();
            runs.push(seen);
        }
        let seen = &runs[1];
        assert_eq!(seen.iter().map(|(g, _)| *g).collect::<Vec<_>>(), [Some(0), Some(1), None]);
        assert_eq!(seen[0].1.len(), 6, "q, k, v, o, gate, up");
        assert_eq!(seen[2].1.iter().map(|(n, g)| (n.as_str(), g.size())).collect::<Vec<_>>(), [("lm_head", vec![16, 16])]);
        let q1 = |run: usize| runs[run][1].1[0].1.shallow_clone();
        assert_eq!(runs[1][1].1[0].0, "model.layers.1.self_attn.q_proj");
        assert!(q1(1).allclose(&q1(2), 1e-9, 1e-12, false), "block 1 saw block 0 as changed");
        assert!(!q1(0).allclose(&q1(1), 1e-3, 1e-6, false), "the change made a difference");
    }
}
