//! `stlm eval ppl | mc | suite | position-loss`.

use crate::common::{load_tokenizer, print_json, DeviceArgs};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use stlm_eval::position::{curve, plot_curves, position_csv, run_models, PositionOptions};
use stlm_eval::suite::{run_suite, score_task, Suite, TaskRun};
use stlm_eval::tasks::{Task, TaskReport};
use stlm_eval::text::{score_text, ScoringOptions, TextScoring};
use stlm_eval::PplReport;
use stlm_model::AnyModel;
use stlm_tokenizers::Tokenizer;

#[derive(Subcommand)]
pub enum EvalJob {
    /// Loss (nats/token), perplexity and bits per byte of a text file.
    Ppl {
        /// Model directory.
        #[arg(long)]
        model: PathBuf,
        /// UTF-8 text file.
        #[arg(long)]
        data: PathBuf,
        /// tokenizer.json (default: the model directory's).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        #[command(flatten)]
        scoring: ScoringOptions,
        /// Print one JSON object: tokens, bytes, loss, ppl, bits_per_byte (and average_depth,
        /// depth, tokens_per_s with --early-exit).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// One benchmark task with lm-evaluation-harness semantics (acc, acc_norm, standard errors).
    Mc {
        /// Model directory.
        #[arg(long)]
        model: PathBuf,
        /// hellaswag, arc_easy, arc_challenge, piqa, openbookqa, winogrande, lambada_openai, blimp,
        /// mmlu or triviaqa.
        #[arg(long)]
        task: String,
        /// The task's items: MosaicML jsonl, Hugging Face jsonl/parquet, HellaSwag's six-line
        /// .txt(.bz2), BLiMP's .zip.
        #[arg(long)]
        data: PathBuf,
        #[command(flatten)]
        opts: BenchOptions,
        /// Write every item's requests, log-likelihoods, greedy flags, gold and scores as JSON
        /// lines (like lm-evaluation-harness's --log_samples).
        #[arg(long)]
        log_samples: Option<PathBuf>,
        /// Print one JSON object: task, n, acc, acc_norm, acc_stderr, acc_norm_stderr, ...
        #[arg(long)]
        json: bool,
    },
    /// A suite of tasks (small-lm: MMLU, TriviaQA, ARC, PIQA, HellaSwag, OBQA, WinoGrande) on the
    /// files of a data directory: a markdown table on stdout (JSON with --json).
    Suite {
        /// Model directory.
        #[arg(long)]
        model: PathBuf,
        /// small-lm or all.
        #[arg(long, default_value = "small-lm")]
        suite: String,
        /// Directory with the tasks' files (arc_easy.jsonl, piqa.jsonl, ...); tasks without a file
        /// are skipped and listed.
        #[arg(long)]
        data_dir: PathBuf,
        #[command(flatten)]
        opts: BenchOptions,
        /// Print one JSON object (the table goes to stderr).
        #[arg(long)]
        json: bool,
    },
    /// Mean loss at each context position (with 95% bands) of one or more models or checkpoints,
    /// plotted in one figure, and the in-context learning score (loss late minus loss early).
    PositionLoss {
        /// Model directories (checkpoints included); repeatable.
        #[arg(long, num_args = 1..)]
        model: Vec<PathBuf>,
        /// A training run: every checkpoint in RUN/checkpoints, in step order, and RUN/model.
        #[arg(long)]
        run: Option<PathBuf>,
        /// UTF-8 text file.
        #[arg(long)]
        data: PathBuf,
        /// Plot (.svg or .png).
        #[arg(long)]
        out: PathBuf,
        /// Also write the table model,position,loss,stderr.
        #[arg(long)]
        csv: Option<PathBuf>,
        #[command(flatten)]
        study: PositionOptions,
        /// tokenizer.json (default: the model directory's, or for a checkpoint the run's).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Print one JSON object per model (one line each).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        device: DeviceArgs,
    },
}


/// Options shared by `stlm eval mc` and `stlm eval suite`.
#[derive(Args)]
pub struct BenchOptions {
    #[command(flatten)]
    run: TaskRun,
    /// tokenizer.json (default: the model directory's).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(job: EvalJob) -> Result<()> {
    match job {
        EvalJob::Ppl { model, data, tokenizer, scoring, json, device } => {
            let opts = scoring.scoring(std::io::stderr().is_terminal())?;
            ppl(&model, &data, opts, tokenizer, json, &device)
        }
        EvalJob::Mc { model, task, data, opts, log_samples, json } => {
            let task = Task::parse(&task)?;
            let (lm, tok) = load(&model, opts.tokenizer.as_deref(), &opts.device)?;
            let progress = bar();
            let (report, items) = score_task(&lm, &tok, task, &data, &opts.run, &progress)?;
            progress.finish_and_clear();
            if let Some(path) = log_samples {
                stlm_eval::tasks::write_log_samples(&path, &items)?;
            }
            if json {
                print_json(&report)
            } else {
                print_task(&report);
                Ok(())
            }
        }
        EvalJob::Suite { model, suite, data_dir, opts, json } => {
            let suite = Suite::parse(&suite)?;
            let (lm, tok) = load(&model, opts.tokenizer.as_deref(), &opts.device)?;
            let name = model.display().to_string();
            let report = run_suite(&lm, &tok, (suite, &name), &data_dir, &opts.run, &bar, &mut print_task).with_context(|| format!("--data-dir {}", data_dir.display()))?;
            for (task, reason) in &report.skipped {
                eprintln!("{task}: skipped, {reason}");
            }
            let table = report.markdown(suite);
            if json {
                eprint!("{table}");
                print_json(&report)
            } else {
                print!("{table}");
                Ok(())
            }
        }
        EvalJob::PositionLoss { model, run, data, out, csv, study, tokenizer, json, device } => {
            let mut dirs = model;
            if let Some(run) = run {
                dirs.extend(run_models(&run).with_context(|| format!("--run {}", run.display()))?);
            }
            if dirs.is_empty() {
                bail!("give --model DIR (repeatable) or --run DIR");
            }
            position_losses(&dirs, (&data, &out, csv.as_deref()), &study, tokenizer.as_deref(), json, &device)
        }
    }
}

/// A model and its tokenizer.
fn load(dir: &Path, tokenizer: Option<&Path>, device: &DeviceArgs) -> Result<(AnyModel, Tokenizer)> {
    let tok = load_tokenizer(tokenizer, dir)?;
    let model = device.load_any(dir)?;
    Ok((model, tok))
}

/// A progress bar on a terminal (hidden otherwise); its prefix names the job.
fn bar() -> ProgressBar {
    let bar = if std::io::stderr().is_terminal() { ProgressBar::new(0) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} {eta}").expect("valid template"));
    bar
}

fn print_task(r: &TaskReport) {
    eprintln!("{}", r.summary());
}

/// `stlm eval position-loss`: each model's curve printed, then the figure and the table.
fn position_losses(dirs: &[PathBuf], (data, out, csv): (&Path, &Path, Option<&Path>), study: &PositionOptions, tokenizer: Option<&Path>, json: bool, device: &DeviceArgs) -> Result<()> {
    if !matches!(out.extension().and_then(|e| e.to_str()), Some("svg" | "png")) {
        bail!("--out {}: plots are written as .svg or .png", out.display());
    }
    let text = std::fs::read_to_string(data).with_context(|| format!("{}: cannot read as UTF-8 text", data.display()))?;
    let mut curves = Vec::new();
    for dir in dirs {
        let (model, tok) = load(dir, tokenizer, device)?;
        let progress = bar();
        let c = curve(&model, &tok, dir, &text, study, &progress)?;
        progress.finish_and_clear();
        match json {
            true => print_json(&c)?,
            false => println!("{}: {} windows of {}; loss at position {} {:.4}, at {} {:.4}; in-context learning score {:+.4}", c.label, c.windows, c.window, c.early, c.loss_early, c.late, c.loss_late, c.icl_score),
        }
        curves.push(c);
    }
    let name = data.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    plot_curves(&curves, &name, study.bins, out)?;
    eprintln!("wrote {}", out.display());
    if let Some(csv) = csv {
        stlm_core::atomic_write_bytes(csv, position_csv(&curves)?.as_bytes())?;
        eprintln!("wrote {}", csv.display());
    }
    Ok(())
}

/// `stlm eval ppl`: the text of `data` scored by the model in `dir`.
fn ppl(dir: &Path, data: &Path, opts: TextScoring, tokenizer: Option<PathBuf>, json: bool, device: &DeviceArgs) -> Result<()> {
    let text = std::fs::read_to_string(data).with_context(|| format!("{}: cannot read as UTF-8 text", data.display()))?;
    let tok = load_tokenizer(tokenizer.as_deref(), dir)?;
    let mut model = device.load_any(dir)?;
    let unit = if matches!(model, AnyModel::Bytes(_)) { "byte" } else { "token" };
    let report = score_text(&mut model, &tok, &text, &opts).with_context(|| format!("{} scored by {}", data.display(), dir.display()))?;
    print_report(data, &report, json, unit)
}

fn print_report(data: &std::path::Path, report: &PplReport, json: bool, unit: &str) -> Result<()> {
    match json {
        true => print_json(report),
        false => Ok(println!("{}", report.summary(&data.display().to_string(), unit))),
    }
}
