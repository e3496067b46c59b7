//! A quantization from model directory to model directory, as `stlm quantize` runs it: load the
//! float model, score it on the validation text, quantize, score again, save the quantized model
//! with its report in `quantization.json`.

use crate::{quantize, GptqOptions, Method, QuantError, QuantOptions, QuantReport, Result};
use stlm_core::quant::QuantFormat;
use stlm_model::linears::Projection;
use std::path::{Path, PathBuf};
use stlm_eval::heldout::HeldOutText;
use stlm_model::calibration::CalibrationText;
use stlm_model::io::WEIGHTS_FILE;
use stlm_model::quantized::{QuantizationFile, QUANTIZATION_FILE};
use stlm_model::{load_config, load_model, tokenizer_path};
use stlm_tokenizers::Tokenizer;
use tch::Device;

/// What a quantization does and scores on; as `stlm quantize` takes it.
#[derive(Debug, Clone, clap::Args)]
pub struct QuantSpec {
    /// How the blocks are chosen.
    #[arg(long, value_enum, default_value_t = Method::Rtn)]
    pub method: Method,
    /// Block format: q8_0 (8.5 bits per weight) or q4_0 (4.5).
    #[arg(long, value_parser = |s: &str| s.parse::<QuantFormat>())]
    pub format: QuantFormat,
    /// Keep this projection in float32 in every block (repeatable).
    #[arg(long, value_enum)]
    pub skip: Vec<Projection>,
    /// Keep the token embedding (and a head tied to it) in float32.
    #[arg(long)]
    pub keep_embeddings: bool,
    /// GPTQ's calibration text.
    #[command(flatten)]
    pub calibration: CalibrationText,
    /// GPTQ: columns in order of decreasing Hessian diagonal (block scales then come from the
    /// original weights).
    #[arg(long)]
    pub act_order: bool,
    /// GPTQ: damping added to the Hessian's diagonal, as a fraction of its mean.
    #[arg(long, default_value_t = 0.01)]
    pub damp: f64,
    /// tokenizer.json (default: the model directory's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Validation text: perplexity before and after goes into the report.
    #[arg(long)]
    pub val: Option<PathBuf>,
    /// Validation window (tokens); windows are disjoint.
    #[arg(long, default_value_t = 256)]
    pub val_len: i64,
}

impl QuantSpec {
    /// The quantization options of this spec.
    pub fn options(&self) -> QuantOptions {
        let gptq = GptqOptions { damp: self.damp, act_order: self.act_order, ..GptqOptions::default() };
        QuantOptions { method: self.method, format: self.format, skip: self.skip.clone(), keep_embeddings: self.keep_embeddings, gptq }
    }
}

/// Where a quantization reads and writes.
#[derive(Debug, Clone)]
pub struct QuantJob {
    /// The float model directory (token models).
    pub model: PathBuf,
    /// The directory of the quantized model.
    pub out: PathBuf,
    /// What to do.
    pub spec: QuantSpec,
    /// Where the model runs.
    pub device: Device,
    /// Shows progress bars.
    pub progress: bool,
}

/// Runs `job`; returns the report that the quantized directory also keeps.
pub fn run(job: &QuantJob) -> Result<QuantReport> {
    let opts = job.spec.options();
    if let (Ok(a), Ok(b)) = (job.model.canonicalize(), job.out.canonicalize()) {
        if a == b {
            return Err(QuantError::Input(format!("{}: the output directory must differ from the model's (the original is kept)", job.out.display())));
        }
    }
    if job.model.join(QUANTIZATION_FILE).is_file() {
        return Err(QuantError::Input(format!("{}: the model is already quantized ({QUANTIZATION_FILE}); quantize its float original", job.model.display())));
    }
    if load_config(&job.model)?.bytes.is_some() {
        return Err(QuantError::Input(format!("{}: a byte-pooled model; quantization takes token models", job.model.display())));
    }
    match (opts.method, &job.spec.calibration.calib) {
        (Method::Rtn, Some(path)) => return Err(QuantError::Input(format!("{}: round to nearest needs no calibration; drop --calib", path.display()))),
        (Method::Gptq, None) => return Err(QuantError::Input("GPTQ needs calibration text: --calib FILE".into())),
        _ => {}
    }
    let tok_path = job.spec.tokenizer.clone().or_else(|| tokenizer_path(&job.model));
    let mut model = load_model(&job.model, job.device, stlm_core::DType::Float32)?;
    let tok = match (&tok_path, job.spec.val.is_some() || job.spec.calibration.calib.is_some()) {
        (Some(p), true) => Some(Tokenizer::from_file(p).map_err(|e| QuantError::Input(format!("{}: {e}", p.display())))?),
        (None, true) => return Err(QuantError::Input(format!("{}: no tokenizer.json to read the calibration or validation text with", job.model.display()))),
        (_, false) => None,
    };
    let val = match (&job.spec.val, &tok) {
        (Some(path), Some(tok)) => Some(HeldOutText::load(path, &model, tok, job.spec.val_len)?),
        _ => None,
    };
    let calib = match &tok {
        Some(tok) => job.spec.calibration.batches(&model, tok)?,
        None => Vec::new(),
    };
    let before = val.as_ref().map(|v| v.perplexity(&model, job.progress)).transpose()?;
    let mut report = quantize(&mut model, &opts, &calib)?;
    report.before = before;
    report.after = val.as_ref().map(|v| v.perplexity(&model, job.progress)).transpose()?;
    report.bytes_before = file_size(&job.model.join(WEIGHTS_FILE));
    model.save(&job.out, tok_path.as_deref())?;
    report.bytes_after = file_size(&job.out.join(WEIGHTS_FILE));
    let file = QuantizationFile {
        tensors: model.quantized_weights().into_iter().map(|(name, m)| (name, m.format())).collect(),
        method: report.method.clone(),
        report: Some(serde_json::to_value(&report).expect("the report serializes")),
    };
    file.write(&job.out)?;
    Ok(report)
}

fn file_size(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.len())
}
