//! `stlm quantize`: a model's linear layers to Q8_0 or Q4_0 blocks, thin over stlm-quant (see
//! docs/stlm-quant.md).

use crate::common::{print_json, DeviceArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::IsTerminal;
use std::path::PathBuf;
use stlm_quant::pipeline::{self, QuantJob, QuantSpec};

#[derive(Args)]
pub struct QuantizeArgs {
    /// The float model directory.
    #[arg(long)]
    model: PathBuf,
    /// The quantized model directory (written; the original is kept).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    spec: QuantSpec,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    if a.device.dtype != "float32" {
        bail!("--dtype {}: quantization reads float32 models", a.device.dtype);
    }
    let job = QuantJob { model: a.model.clone(), out: a.out.clone(), spec: a.spec, device: stlm_core::parse_device(&a.device.device)?, progress: std::io::stderr().is_terminal() };
    let report = pipeline::run(&job).with_context(|| format!("--model {}", a.model.display()))?;
    if a.json {
        return print_json(&report);
    }
    print!("{}", report.table());
    eprintln!("saved {}", a.out.display());
    Ok(())
}
