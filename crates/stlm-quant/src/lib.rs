//! stlm-quant: a model's linear layers quantized to ggml's block formats (Q8_0, Q4_0; the
//! formats and their integer kernels are in [`stlm_core::quant`] and [`stlm_core::qmatvec`]).
//!
//! - [`quantize`]: every linear layer the model lists
//!   ([`stlm_model::DecoderModel::linears_mut`]) and the token embedding, by round to nearest or
//!   by [`gptq`] (calibrated block by block through [`stlm_model::calibration`]), with a report of
//!   what was quantized and what was kept in float32 and why.
//! - [`pipeline`]: model directory to model directory, with perplexity before and after, as
//!   `stlm quantize` runs it.
//!
//! Kept in float32: norms and biases, learned position tables, routed MoE experts (stacked
//! tensors, not linear layers), skipped projections, the embedding on request, and any matrix
//! whose rows do not divide into blocks of 32 (never padded).

pub mod gptq;
pub mod pipeline;
pub mod report;

pub use gptq::{gptq, GptqOptions};
pub use report::{Kept, LayerReport, Perplexity, QuantReport};

use std::time::Instant;
use stlm_core::quant::{QuantFormat, QuantMatrix, QK};
use stlm_model::calibration::blockwise_grams;
use stlm_model::linears::{LinearSite, Projection};
use stlm_model::weight::{Quantized, Weight};
use stlm_model::DecoderModel;
use tch::{Kind, Tensor};

/// Errors of stlm-quant.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// Bad input, named.
    #[error("{0}")]
    Input(String),
    /// An error raised by the model.
    #[error(transparent)]
    Model(#[from] stlm_model::ModelError),
    /// A file that could not be read or written, or a format error.
    #[error(transparent)]
    Core(#[from] stlm_core::CoreError),
    /// Scoring the validation text failed.
    #[error(transparent)]
    Eval(#[from] stlm_eval::EvalError),
    /// An error raised by libtorch.
    #[error("libtorch: {0}")]
    Tch(#[from] tch::TchError),
}

/// Result alias for stlm-quant.
pub type Result<T, E = QuantError> = std::result::Result<T, E>;

/// How the blocks are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Round to nearest: each block's scale from its largest magnitude, as ggml quantizes.
    Rtn,
    /// GPTQ: columns rounded in turn, each one's error compensated by the columns after it,
    /// from the calibration inputs (`--calib`); embeddings round to nearest.
    Gptq,
}

impl Method {
    /// Its name, as reports print it.
    pub fn name(self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::Gptq => "gptq",
        }
    }
}

/// What to quantize and how.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantOptions {
    /// How the blocks are chosen.
    pub method: Method,
    /// The block format.
    pub format: QuantFormat,
    /// Projections kept in float32 (in every block, or the head).
    pub skip: Vec<Projection>,
    /// Keeps the token embedding (and a head tied to it) in float32.
    pub keep_embeddings: bool,
    /// GPTQ's settings (used by [`Method::Gptq`]).
    pub gptq: GptqOptions,
}

/// Quantizes the linear layers of `model` in place by `opts` (GPTQ calibrates on `calib`, int64
/// token batches on the model's device, block by block); returns the report (perplexities and
/// file sizes left empty).
pub fn quantize(model: &mut DecoderModel, opts: &QuantOptions, calib: &[Tensor]) -> Result<QuantReport> {
    let started = Instant::now();
    if model.config.shares_layers() {
        return Err(QuantError::Input("quantizing a model with shared layers (`layer_sharing`) is not supported: a tied weight serves several layers".into()));
    }
    if model.is_quantized() {
        return Err(QuantError::Input("the model is already quantized; quantize its float original".into()));
    }
    if opts.method == Method::Gptq && calib.is_empty() {
        return Err(QuantError::Input("GPTQ needs calibration text (`--calib FILE`)".into()));
    }
    let _guard = tch::no_grad_guard();
    let (mut layers, mut kept) = (Vec::new(), Vec::new());
    for site in model.linears_mut() {
        let name = format!("{}.weight", site.name());
        let (rows, cols) = site.linear.weight.shape();
        if opts.skip.contains(&site.projection) {
            kept.push(Kept { name, parameters: rows * cols, reason: format!("{} is skipped", site.projection.name()) });
        } else if cols as usize % QK != 0 {
            kept.push(Kept { name, parameters: rows * cols, reason: format!("rows of {cols} values do not divide into blocks of {QK}") });
        }
    }
    let picked = |t: &LinearSite<'_>| !opts.skip.contains(&t.projection) && t.linear.weight.shape().1 as usize % QK == 0;
    match opts.method {
        Method::Rtn => {
            for site in model.linears_mut().into_iter().filter(|t| picked(t)) {
                let value = site.linear.weight.value();
                let (quantized, report) = install(&value, format!("{}.weight", site.name()), opts.format, |v| Ok(QuantMatrix::quantize(opts.format, v, value.size()[1] as usize)?))?;
                site.linear.weight = Weight::Quantized(quantized);
                layers.push(report);
            }
        }
        Method::Gptq => blockwise_grams(model, calib, &picked, |m, _, grams| {
            for (i, gram) in grams {
                let site = m.linears_mut().swap_remove(i);
                let value = site.linear.weight.value();
                let name = format!("{}.weight", site.name());
                let (quantized, report) = install(&value, name.clone(), opts.format, |_| gptq(&name, &value, &gram, opts.format, opts.gptq))?;
                site.linear.weight = Weight::Quantized(quantized);
                layers.push(report);
            }
            Ok::<(), QuantError>(())
        })?,
    }
    let name = stlm_model::quantized::EMBEDDING.to_string();
    let embedding = model.embed_tokens.shallow_clone();
    let (rows, cols) = (embedding.size()[0], embedding.size()[1]);
    if opts.keep_embeddings {
        kept.push(Kept { name, parameters: rows * cols, reason: "embeddings are kept by request".into() });
    } else if cols as usize % QK != 0 {
        kept.push(Kept { name, parameters: rows * cols, reason: format!("rows of {cols} values do not divide into blocks of {QK}") });
    } else {
        // A lookup table has no inputs to calibrate on: round to nearest.
        let (quantized, report) = install(&embedding, name, opts.format, |v| Ok(QuantMatrix::quantize(opts.format, v, cols as usize)?))?;
        model.embed_quantized = Some(quantized);
        layers.push(report);
    }
    if layers.is_empty() {
        return Err(QuantError::Input("no linear layer can be quantized (every one is skipped or has rows that are not whole blocks)".into()));
    }
    kept.extend(outside_linears(model));
    Ok(QuantReport::new(opts, layers, kept, model.num_parameters(), started.elapsed().as_secs_f64()))
}

/// The blocks `choose` makes of `value` `[rows, cols]` (a layer's float variable, which then
/// holds the dequantized values), with its report.
fn install(value: &Tensor, name: String, format: QuantFormat, choose: impl FnOnce(&[f32]) -> Result<QuantMatrix>) -> Result<(Quantized, LayerReport)> {
    let (rows, cols) = (value.size()[0], value.size()[1]);
    let bad = |e: String| QuantError::Input(format!("`{name}`: {e}"));
    let values: Vec<f32> = Vec::try_from(value.to_device(tch::Device::Cpu).to_kind(Kind::Float).contiguous().view([-1])).map_err(|e: tch::TchError| bad(e.to_string()))?;
    let matrix = choose(&values)?;
    let relative_error = relative_error(&values, &matrix.dequantize());
    let quantized = Quantized::new(matrix, value.shallow_clone())?;
    Ok((quantized, LayerReport { name, rows, cols, format, relative_error }))
}

/// `||a - b|| / ||a||` in float64.
fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        diff += (x as f64 - y as f64).powi(2);
        norm += (x as f64).powi(2);
    }
    if norm == 0.0 {
        0.0
    } else {
        (diff / norm).sqrt()
    }
}

/// The stored matrices that are neither linear layers nor the token embedding (learned
/// positions, routed experts), which stay float32, from the model's walk.
fn outside_linears(model: &DecoderModel) -> Vec<Kept> {
    use stlm_core::Role;
    stlm_core::module::parameters(model)
        .into_iter()
        .filter_map(|p| {
            let reason = match p.role {
                // The token embedding is reported above, quantized or kept.
                Role::Embedding if p.tensor.data_ptr() == model.embed_tokens.data_ptr() => return None,
                Role::Embedding => "a lookup table",
                Role::RoutedExperts { .. } | Role::RoutedRows { .. } => "routed experts: stacked tensors, not linear layers",
                _ => return None,
            };
            Some(Kept { name: p.name, parameters: p.tensor.numel() as i64, reason: reason.into() })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use stlm_model::ModelConfig;
    use tch::{Device, Tensor};

    /// libtorch's generator is global: tests that draw weights take turns.
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

    pub(crate) fn model(extra: &str) -> DecoderModel {
        model_with(96, extra)
    }

    fn model_with(intermediate: i64, extra: &str) -> DecoderModel {
        let text = format!(
            "vocab_size = 40\nhidden_size = 64\nintermediate_size = {intermediate}\nnum_hidden_layers = 2\nnum_attention_heads = 4\n\
             num_key_value_heads = 2\nmax_position_embeddings = 64\n{extra}"
        );
        let cfg = ModelConfig::from_toml_str(&text, std::path::Path::new("t.toml")).unwrap();
        tch::manual_seed(0);
        DecoderModel::new(cfg, Device::Cpu).unwrap()
    }

    fn opts(format: QuantFormat) -> QuantOptions {
        QuantOptions { method: Method::Rtn, format, skip: vec![], keep_embeddings: false, gptq: GptqOptions::default() }
    }

    #[test]
    fn every_linear_layer_is_quantized_and_the_rest_is_reported_kept() {
        let _lock = RNG.lock().unwrap_or_else(|e| e.into_inner());
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            let mut m = model("tie_word_embeddings = false\n");
            let before: Vec<Tensor> = m.linears_mut().iter().map(|s| s.linear.weight.value().copy()).collect();
            let report = quantize(&mut m, &opts(format), &[]).unwrap();
            // 2 blocks x 7 projections, the head and the embedding.
            assert_eq!(report.layers.len(), 16);
            assert!(m.linears_mut().iter().all(|s| s.linear.weight.quantization() == Some(format)));
            assert!(report.kept.is_empty(), "{:?}", report.kept);
            assert!(m.embed_quantized.is_some());
            // The values are the blocks' (what libtorch paths and the saved model see).
            for (site, w) in m.linears_mut().iter().zip(&before) {
                let values: Vec<f32> = Vec::try_from(w.view([-1])).unwrap();
                let (_, cols) = site.linear.weight.shape();
                let deq = QuantMatrix::quantize(format, &values, cols as usize).unwrap().dequantize();
                assert!(site.linear.weight.value().view([-1]).equal(&Tensor::from_slice(&deq)));
            }
            let worst = report.layers.iter().map(|l| l.relative_error).fold(0.0, f64::max);
            let bound = if format == QuantFormat::Q8_0 { 0.01 } else { 0.15 };
            assert!(worst > 0.0 && worst < bound, "{format:?}: {worst}");
            assert!(quantize(&mut m, &opts(format), &[]).unwrap_err().to_string().contains("already quantized"));
        }
    }

    #[test]
    fn gptq_quantizes_every_layer_closer_to_the_float_outputs_than_rtn() {
        let _lock = RNG.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(5);
        let calib = vec![Tensor::randint(40, [4, 32], (Kind::Int64, Device::Cpu))];
        let mut float = model("tie_word_embeddings = false\n");
        let want = tch::no_grad(|| float.forward(&calib[0]));
        let error = |method: Method| {
            let mut m = model("tie_word_embeddings = false\n");
            let report = quantize(&mut m, &QuantOptions { method, ..opts(QuantFormat::Q4_0) }, &calib).unwrap();
            assert_eq!((report.layers.len(), report.method.as_str()), (16, method.name()));
            assert!(m.linears_mut().iter().all(|s| s.linear.weight.quantization() == Some(QuantFormat::Q4_0)));
            (tch::no_grad(|| m.forward(&calib[0])) - &want).square().mean(Kind::Double).double_value(&[])
        };
        let (rtn, gptq) = (error(Method::Rtn), error(Method::Gptq));
        assert!(gptq < 0.8 * rtn, "logit error: GPTQ {gptq:.3e}, RTN {rtn:.3e}");
        let e = quantize(&mut float, &QuantOptions { method: Method::Gptq, ..opts(QuantFormat::Q8_0) }, &[]).unwrap_err();
        assert!(e.to_string().contains("calibration"), "{e}");
    }

    #[test]
    fn skipped_and_ragged_layers_stay_float_with_their_reason() {
        let _lock = RNG.lock().unwrap_or_else(|e| e.into_inner());
        // An intermediate width of 72 is not whole blocks: down_proj (72 columns) stays float.
        let mut m = model_with(72, "tie_word_embeddings = true\n");
        let o = QuantOptions { skip: vec![Projection::VProj], keep_embeddings: true, ..opts(QuantFormat::Q8_0) };
        let report = quantize(&mut m, &o, &[]).unwrap();
        let kept = |name: &str| report.kept.iter().find(|k| k.name == name).map(|k| k.reason.clone()).unwrap_or_default();
        assert!(kept("model.layers.0.self_attn.v_proj.weight").contains("v_proj is skipped"));
        assert!(kept("model.layers.1.mlp.down_proj.weight").contains("72 values"));
        assert!(kept("model.embed_tokens.weight").contains("kept by request"));
        assert_eq!(report.layers.len(), 2 * 5);
        let mut shared = model("model_type = \"stlm\"\nlayer_sharing = { mlp = true, o_proj = true }\n");
        assert!(quantize(&mut shared, &o, &[]).unwrap_err().to_string().contains("shared layers"));
    }
}
