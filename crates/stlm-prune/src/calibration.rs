//! Calibration inputs: evenly spaced windows of a tokenized text, batched, for the methods that
//! score weights by the activations they see (Wanda, SparseGPT, activation importance).

use crate::{PruneError, Result};
use stlm_core::OptionError;
use stlm_model::DecoderModel;
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
        return Err(PruneError::Input(format!("{} tokens, fewer than one calibration window of {len}", ids.len())));
    }
    let starts: Vec<usize> = match samples {
        1 => vec![0],
        n => (0..n).map(|i| i * (ids.len() - len) / (n - 1)).collect(),
    };
    let windows: Vec<Tensor> = starts.iter().map(|&s| Tensor::from_slice(&ids[s..s + len])).collect();
    Ok(windows.chunks(8).map(|c| Tensor::stack(c, 0).to_device(model.device())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use stlm_model::ModelConfig;
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
}
