//! Jobs on model directories: init, inspect, generate, logits.

use crate::common::{load_tokenizer, output_path, parse_ids, print_json, DeviceArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use stlm_model::samples::TextStream;
use stlm_model::{DecoderModel, EarlyExit, ExitMeasure, GenerationConfig};
use stlm_tokenizers::Tokenizer;
use tch::Device;

#[derive(Args)]
pub struct InitArgs {
    /// TOML model config (see configs/).
    #[arg(long)]
    config: PathBuf,
    /// Model directory to write.
    #[arg(long)]
    out: PathBuf,
    /// tokenizer.json to copy into the directory.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Seed of the random initialisation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn init(a: InitArgs) -> Result<()> {
    let model = stlm_model::io::init_dir(&a.config, a.tokenizer.as_deref(), a.seed, &a.out)?;
    eprintln!("wrote {} ({} parameters)", a.out.display(), model.num_parameters());
    Ok(())
}

#[derive(Args)]
pub struct InspectArgs {
    /// Model directory.
    #[arg(long)]
    model: PathBuf,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

pub fn inspect(a: InspectArgs) -> Result<()> {
    let model = stlm_model::load_model(&a.model, Device::Cpu, stlm_core::DType::Float32)?;
    let report = stlm_model::inspect::report(&model);
    if a.json {
        return print_json(&report);
    }
    print!("{}: {}", a.model.display(), report.table());
    Ok(())
}

#[derive(Args)]
pub struct GenerateArgs {
    /// Model directory.
    #[arg(long)]
    model: PathBuf,
    /// Prompt text; repeat for a batch (left-padded). With --corpus, optional: documents start
    /// from the prompts in turn, or from the end-of-text token.
    #[arg(long, required_unless_present = "corpus")]
    prompt: Vec<String>,
    /// Write a corpus of `--documents` generated texts to this file (`<|endoftext|>` after each,
    /// readable by `stlm train --data`): sequence-level distillation from a teacher.
    #[arg(long, value_name = "FILE")]
    corpus: Option<PathBuf>,
    /// With --corpus: number of documents.
    #[arg(long, default_value_t = 100, requires = "corpus")]
    documents: usize,
    /// With --corpus: documents generated together.
    #[arg(long, default_value_t = 16, requires = "corpus")]
    batch_size: usize,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: i64,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Sample only from the k most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    top_k: i64,
    /// Sample from the smallest set of tokens reaching this probability (1: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Penalise tokens already present (1: off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f64,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating after an end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Apply each block this many times (models with `layer_sharing`: a recursion depth other
    /// than the trained one).
    #[arg(long)]
    repeats: Option<i64>,
    /// Early exit (CALM): each token leaves the stack at the first layer whose exit through the
    /// shared final norm and head is this confident (see --exit-measure); one prompt; prints
    /// tokens/s and the average depth.
    #[arg(long, value_name = "THRESHOLD", conflicts_with_all = ["corpus", "self_speculative"])]
    early_exit: Option<f64>,
    /// With --early-exit: what is measured on the exit's distribution (softmax: top probability
    /// >= threshold; margin: the top two differ by >= threshold; entropy: at most threshold nats).
    #[arg(long, value_enum, default_value_t = ExitMeasure::Softmax, requires = "early_exit")]
    exit_measure: ExitMeasure,
    /// With --early-exit: layers every token runs before it may exit.
    #[arg(long, default_value_t = 1, requires = "early_exit")]
    exit_min_layers: usize,
    /// Self-speculative greedy decoding (LayerSkip): draft with the first LAYERS layers, verify
    /// with all; the text is greedy decoding's. One prompt; prints tokens/s and the acceptance.
    #[arg(long, value_name = "LAYERS", conflicts_with = "corpus")]
    self_speculative: Option<usize>,
    /// With --self-speculative: tokens drafted per verification.
    #[arg(long, default_value_t = 4, requires = "self_speculative")]
    draft_tokens: usize,
    /// tokenizer.json (default: the model directory's).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
}

impl GenerateArgs {
    /// The early-exit rule of `--early-exit`, if given.
    fn exit_rule(&self) -> Option<EarlyExit> {
        self.early_exit.map(|threshold| EarlyExit { measure: self.exit_measure, threshold, min_layers: self.exit_min_layers })
    }

    /// The sampling settings of these options, stopping at `eos` (unless `--ignore-eos`) and
    /// padding with `pad`.
    fn generation_config(&self, eos: Vec<i64>, pad: i64) -> GenerationConfig {
        GenerationConfig {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            eos_token_ids: if self.ignore_eos { Vec::new() } else { eos },
            pad_token_id: pad,
            vocab_limit: None,
        }
    }
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    if let Some(i) = a.prompt.iter().position(|p| p.is_empty()) {
        bail!("--prompt #{}: the prompt is empty; generation needs text to start from", i + 1);
    }
    let tok = load_tokenizer(a.tokenizer.as_deref(), &a.model)?;
    let mut model = match a.device.load_any(&a.model)? {
        stlm_model::AnyModel::Tokens(m) => *m,
        stlm_model::AnyModel::Bytes(_) if a.corpus.is_some() => bail!("--corpus: byte-pooled models are not supported; use a token model"),
        stlm_model::AnyModel::Bytes(_) if a.repeats.is_some() => bail!("--repeats {}: a byte-pooled model has no `layer_sharing`", a.repeats.unwrap_or_default()),
        stlm_model::AnyModel::Bytes(_) if a.early_exit.is_some() || a.self_speculative.is_some() => {
            bail!("--early-exit and --self-speculative: byte-pooled models decode at full depth")
        }
        stlm_model::AnyModel::Bytes(m) => return generate_bytes(&a, &m, &tok),
    };
    if let Some(k) = a.repeats {
        model.set_repeats(k).with_context(|| format!("--repeats {k}"))?;
    }
    model.optimize_for_decoding();
    if let Some(path) = &a.corpus {
        return generate_corpus(&a, &model, &tok, path);
    }
    let prompts: Vec<Vec<i64>> = a
        .prompt
        .iter()
        .map(|p| Ok(tok.encode(p, true)?.into_iter().map(i64::from).collect()))
        .collect::<Result<_>>()?;
    let cfg = token_generation_config(&a, &model, &tok);
    let decode = |ids: &[i64]| -> String {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        tok.decode(&ids, true).unwrap_or_default()
    };
    let mut stdout = std::io::stdout().lock();
    let dynamic = a.early_exit.is_some() || a.self_speculative.is_some();
    if dynamic && prompts.len() != 1 {
        bail!("--early-exit and --self-speculative decode one sequence: give one --prompt");
    }
    // Checked before the prompt is printed.
    if let Some(rule) = a.exit_rule() {
        rule.validate(model.depth())?;
    }
    if let Some(layers) = a.self_speculative {
        stlm_model::check_self_speculative(&model, &cfg, layers, a.draft_tokens)?;
    }
    if prompts.len() == 1 {
        // Stream: print the prompt, then each new piece of text once it is valid UTF-8.
        let mut all = prompts[0].clone();
        let mut stream = TextStream::start(&mut stdout, &decode(&all));
        let mut on_token = |id| {
            all.push(id);
            stream.update(&mut stdout, &decode(&all));
        };
        let started = std::time::Instant::now();
        let report = match (a.exit_rule(), a.self_speculative) {
            (Some(rule), _) => Some(stlm_model::generate_early_exit(&model, &prompts[0], &cfg, &rule, on_token)?.1),
            (None, Some(layers)) => Some(stlm_model::generate_self_speculative(&model, &prompts[0], &cfg, layers, a.draft_tokens, on_token)?.1),
            (None, None) => {
                stlm_model::generate(&model, &prompts, &cfg, |_, id| on_token(id))?;
                None
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        writeln!(stdout)?;
        if let Some(r) = report {
            eprintln!("{}", r.summary(seconds, a.self_speculative.map(|l| (l, a.draft_tokens))));
        }
    } else {
        let outs = stlm_model::generate(&model, &prompts, &cfg, |_, _| {})?;
        for (i, (p, o)) in prompts.iter().zip(outs).enumerate() {
            let full: Vec<i64> = p.iter().copied().chain(o).collect();
            writeln!(stdout, "--- [{i}]\n{}", decode(&full))?;
        }
    }
    Ok(())
}

/// The sampling settings of `a` for a token model and its tokenizer.
fn token_generation_config(a: &GenerateArgs, model: &DecoderModel, tok: &Tokenizer) -> GenerationConfig {
    let temperature = if a.self_speculative.is_some() { 0.0 } else { a.temperature };
    GenerationConfig { temperature, ..a.generation_config(Vec::new(), 0) }.for_tokenizer(&model.config, tok, a.ignore_eos)
}

/// `stlm generate --corpus`: `--documents` texts sampled in batches (seed + batch index), each
/// followed by `<|endoftext|>`, written to a temporary file renamed at the end.
fn generate_corpus(a: &GenerateArgs, model: &DecoderModel, tok: &Tokenizer, path: &Path) -> Result<()> {
    let path = output_path(path)?;
    if a.batch_size == 0 || a.documents == 0 {
        bail!("--documents and --batch-size must be at least 1");
    }
    let start = model.config.bos_token_id.or(tok.eos_id().map(i64::from)).context("the model has no BOS and the tokenizer no end-of-text token to start documents from; pass --prompt")?;
    let prompts: Vec<Vec<i64>> = match a.prompt.is_empty() {
        true => vec![vec![start]],
        false => a.prompt.iter().map(|p| Ok(tok.encode(p, true)?.into_iter().map(i64::from).collect())).collect::<Result<_>>()?,
    };
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        bail!("--prompt #{}: the prompt encodes to no tokens", i + 1);
    }
    let bar = if std::io::stderr().is_terminal() { ProgressBar::new(a.documents as u64) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} documents [{elapsed_precise}<{eta_precise}]").expect("valid template"));
    let cfg = token_generation_config(a, model, tok);
    let (text, tokens) = stlm_model::generate::sample_corpus(model, tok, &prompts, (a.documents, a.batch_size), &cfg, &mut |n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    stlm_core::atomic_write_bytes(&path, text.as_bytes())?;
    eprintln!("wrote {} documents ({tokens} generated tokens, {} bytes) to {}", a.documents, text.len(), path.display());
    Ok(())
}

/// `stlm generate` for a byte-pooled model: each prompt's bytes, then sampled bytes, printed
/// as they come once they form valid UTF-8 (invalid sequences are replaced, never an error).
fn generate_bytes(a: &GenerateArgs, model: &stlm_model::BytePooledModel, tok: &stlm_tokenizers::Tokenizer) -> Result<()> {
    let base = a.generation_config(vec![stlm_tokenizers::BYTE_EOT as i64], stlm_tokenizers::BYTE_PAD as i64);
    let mut stdout = std::io::stdout().lock();
    for (i, prompt) in a.prompt.iter().enumerate() {
        let cfg = GenerationConfig { seed: a.seed + i as u64, ..base.clone() };
        if a.prompt.len() > 1 {
            writeln!(stdout, "--- [{i}]")?;
        }
        let mut all = tok.encode(prompt, false)?;
        let decode = |ids: &[u32]| tok.decode(ids, true).unwrap_or_default();
        let mut stream = TextStream::start(&mut stdout, &decode(&all));
        let prompt_ids = all.clone();
        stlm_model::bytes::generate_bytes(model, &prompt_ids, &cfg, |b| {
            all.push(b);
            stream.update(&mut stdout, &decode(&all));
        })?;
        // Whatever is left (an incomplete UTF-8 sequence at the end) as replacement characters.
        writeln!(stdout, "{}", decode(&all).get(stream.printed..).unwrap_or_default())?;
    }
    Ok(())
}

#[derive(Args)]
pub struct LogitsArgs {
    /// Model directory.
    #[arg(long)]
    model: PathBuf,
    /// Comma-separated token ids.
    #[arg(long)]
    ids: String,
    /// Output safetensors file.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn logits(a: LogitsArgs) -> Result<()> {
    let ids = parse_ids(&a.ids)?;
    let out = output_path(&a.out)?;
    let model = a.device.load(&a.model)?;
    let logits = model.logits_of(&ids).context("--ids")?;
    stlm_core::write_safetensors(&out, &[("logits".to_string(), logits)])?;
    eprintln!("wrote logits [{}, {}] to {}", ids.len(), model.config.vocab_size, out.display());
    Ok(())
}
