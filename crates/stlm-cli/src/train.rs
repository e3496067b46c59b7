//! `stlm train`: config + data (files, or the built-in stories) -> tokenizer, cached token shards,
//! a training run with checkpoints, a model directory, and a few samples.

use crate::common::DeviceArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use stlm_data::{sample_documents, tokenize_corpus, DataConfig, ShardOptions, Source, TokenBatches};
use stlm_model::bytes::generate_bytes;
use stlm_model::{AnyModel, BytePooledModel, DecoderModel, GenerationConfig, ModelConfig};
use stlm_tokenizers::{BpeOptions, Tokenizer};
use stlm_train::config::TrainTable;
use stlm_train::trainer::{train as run_training, BatchSource};

/// The record `stlm prune` leaves in a pruned model directory.
pub const PRUNING_FILE: &str = "pruning.json";

/// Bytes of text a tokenizer is trained on at most (the start of the corpus).
const TOKENIZER_SAMPLE_BYTES: usize = 50 << 20;

#[derive(Args)]
pub struct TrainArgs {
    /// TOML config with [model], [train] and [data] tables (see configs/ and docs/stlm-train.md).
    #[arg(long)]
    config: PathBuf,
    /// Training text: .txt (documents split at blank lines or <|endoftext|>), .jsonl or .parquet;
    /// repeatable. Without it, the built-in story corpus.
    #[arg(long = "data")]
    data: Vec<PathBuf>,
    /// Run directory (default: runs/<config name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Length of the run in steps (overrides [train] max_steps; keep it when resuming).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Continue the run in --out from its newest usable checkpoint.
    #[arg(long)]
    resume: bool,
    /// Stop after this many seconds of training (checkpoint and model directory written, as at
    /// the last step): runs compared at the same wall-clock budget. Pair it with a schedule that
    /// does not depend on the run's length (`schedule = { kind = "constant" }`).
    #[arg(long)]
    time_limit: Option<f64>,
    /// Override one config field, `TABLE.FIELD=VALUE` with VALUE in TOML syntax (strings may go
    /// unquoted), e.g. `--set train.batch_size=16`; repeatable. The run directory's config.toml
    /// records the result.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Start from this model directory instead of a random initialisation: its config replaces
    /// the [model] table, its tokenizer.json is the run's, and when it holds `pruning.json` (a
    /// `stlm prune` output) its pruned weights stay zero. Pass it again with --resume.
    #[arg(long, value_name = "DIR")]
    init: Option<PathBuf>,
    /// Stories to sample from the trained model at the end.
    #[arg(long, default_value_t = 3)]
    samples: usize,
    #[command(flatten)]
    device: DeviceArgs,
}

/// Batches for the trainer from stlm-data's token windows, and the bytes each id stands for.
pub(crate) struct Batches(pub TokenBatches, pub Option<tch::Tensor>);

impl BatchSource for Batches {
    fn train_batch(&self, step: u64, micro: u64) -> stlm_train::Result<(tch::Tensor, tch::Tensor)> {
        Ok(self.0.train_batch(step, micro))
    }
    fn val_batch(&self, index: u64) -> stlm_train::Result<(tch::Tensor, tch::Tensor)> {
        Ok(self.0.val_batch(index))
    }
    fn target_bytes(&self, targets: &tch::Tensor) -> Option<f64> {
        let table = self.1.as_ref()?;
        Some(table.index_select(0, &targets.reshape([-1]).to_device(table.device())).sum(tch::Kind::Double).double_value(&[]))
    }
}

/// The model, train and data tables of a run config, checked together.
pub struct RunConfig {
    /// The config file's text, copied into the run directory.
    pub text: String,
    /// `[model]`.
    pub model: ModelConfig,
    /// `[train]`.
    pub train: TrainTable,
    /// `[data]`.
    pub data: DataConfig,
}

impl RunConfig {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, &[])
    }

    /// Reads `path`, applies `--set` overrides (`TABLE.FIELD=VALUE`) and checks the result.
    pub fn load_with(path: &Path, overrides: &[String]) -> Result<Self> {
        let mut text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        if !overrides.is_empty() {
            text = apply_overrides(&text, path, overrides)?;
        }
        stlm_core::toml_known_tables(&text, path, &["model", "train", "data"])?;
        let model = ModelConfig::from_toml_str(&text, path)?;
        let train = TrainTable::from_toml_str(&text, path)?;
        let data = DataConfig::from_toml_str(&text, path)?;
        if train.seq_len > model.max_position_embeddings {
            bail!(
                "{}: train.seq_len {} exceeds model.max_position_embeddings {}",
                path.display(),
                train.seq_len,
                model.max_position_embeddings
            );
        }
        Ok(RunConfig { text, model, train, data })
    }
}

/// `text` with each `TABLE.FIELD=VALUE` override set (VALUE parsed as TOML, else taken as a
/// string), re-serialised, with a comment listing the overrides.
fn apply_overrides(text: &str, path: &Path, overrides: &[String]) -> Result<String> {
    let mut doc: toml::Table = text.parse().with_context(|| format!("{}: not valid TOML", path.display()))?;
    for item in overrides {
        let Some((key, raw)) = item.split_once('=') else {
            bail!("--set {item}: expected TABLE.FIELD=VALUE, e.g. train.batch_size=16");
        };
        let parts: Vec<&str> = key.trim().split('.').collect();
        if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
            bail!("--set {item}: the key `{key}` must name a table and a field, e.g. train.batch_size");
        }
        let value = match format!("v = {raw}").parse::<toml::Table>() {
            Ok(mut t) => t.remove("v").expect("parsed key"),
            Err(_) => toml::Value::String(raw.to_string()),
        };
        let mut table = &mut doc;
        for part in &parts[..parts.len() - 1] {
            let entry = table.entry(part.to_string()).or_insert_with(|| toml::Value::Table(Default::default()));
            table = entry.as_table_mut().with_context(|| format!("--set {item}: `{part}` is not a table in {}", path.display()))?;
        }
        table.insert(parts[parts.len() - 1].to_string(), value);
    }
    let body = toml::to_string(&doc).context("cannot write the overridden config as TOML")?;
    Ok(format!("# {} with --set {}\n{body}", path.display(), overrides.join(" --set ")))
}

/// The config's tokenizer, the run's own when resuming, or BPE trained on the data now; the
/// byte tokenizer for byte models.
fn run_tokenizer(run: &RunConfig, sources: &[Source], out: &Path, resume: bool, progress: bool, init: Option<&Path>) -> Result<Tokenizer> {
    let saved = out.join("tokenizer.json");
    if let Some(dir) = init.filter(|_| run.model.bytes.is_none()) {
        if let Some(t) = &run.data.tokenizer {
            bail!("field `data.tokenizer` ({}) and --init {}: the model directory's tokenizer is used; remove the field", t.display(), dir.display());
        }
        let tok = crate::common::load_tokenizer(None, dir)?;
        tok.save(&saved)?;
        return Ok(tok);
    }
    if run.model.bytes.is_some() {
        if let Some(t) = &run.data.tokenizer {
            bail!("field `data.tokenizer` ({}): byte models read the byte tokenizer; remove it", t.display());
        }
        let tok = Tokenizer::bytes();
        tok.save(&saved)?;
        return Ok(tok);
    }
    let tok = match (&run.data.tokenizer, resume && saved.is_file()) {
        (Some(path), _) => Tokenizer::from_file(path)?,
        (None, true) => Tokenizer::from_file(&saved)?,
        (None, false) => {
            eprintln!("training a BPE tokenizer of {} tokens on the data", run.model.vocab_size);
            let sample = sample_documents(sources, &run.data.read_options(), TOKENIZER_SAMPLE_BYTES)?;
            let opts =
                BpeOptions { vocab_size: run.model.vocab_size as usize, show_progress: progress, ..Default::default() };
            Tokenizer::train_bpe_on_texts(&sample, &opts)?
        }
    };
    if tok.vocab_size() as i64 > run.model.vocab_size {
        bail!(
            "field `model.vocab_size` ({}) is smaller than the tokenizer's {} tokens",
            run.model.vocab_size,
            tok.vocab_size()
        );
    }
    tok.save(&saved)?;
    Ok(tok)
}

pub fn train(a: TrainArgs) -> Result<()> {
    stlm_core::memory::keep_freed_memory();
    let mut run = RunConfig::load_with(&a.config, &a.set)?;
    let stem = a.config.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
    let out = a.out.clone().unwrap_or_else(|| Path::new("runs").join(stem));
    std::fs::create_dir_all(&out).with_context(|| format!("{}: cannot create the run directory", out.display()))?;
    let device = stlm_core::parse_device(&a.device.device)?;
    if a.device.dtype != "float32" {
        bail!("--dtype {}: training runs in float32 for now", a.device.dtype);
    }
    let init = a.init.as_deref().map(|dir| load_init(dir, device)).transpose()?;
    if let Some(init) = &init {
        eprintln!("starting from {} (its config replaces [model])", init.dir.display());
        run.model = init.model.as_lm().model_config().clone();
        if run.train.seq_len > run.model.max_position_embeddings {
            bail!("train.seq_len {} exceeds max_position_embeddings {} of {}", run.train.seq_len, run.model.max_position_embeddings, init.dir.display());
        }
    }
    let progress = std::io::stderr().is_terminal();
    let sources: Vec<Source> = if a.data.is_empty() {
        let (stories, seed) = (run.data.builtin_stories, run.data.builtin_seed);
        eprintln!("no --data: training on the built-in corpus of {stories} stories (seed {seed})");
        vec![Source::Builtin { stories, seed }]
    } else {
        a.data.iter().cloned().map(Source::File).collect()
    };

    let tok = run_tokenizer(&run, &sources, &out, a.resume, progress, a.init.as_deref())?;
    let mut model_cfg = run.model.clone();
    let eot = tok.eos_id().map(i64::from);
    if model_cfg.eos_token_id.is_empty() {
        model_cfg.eos_token_id.extend(eot);
    }
    model_cfg.bos_token_id = model_cfg.bos_token_id.or(eot);
    model_cfg.pad_token_id = model_cfg.pad_token_id.or(tok.pad_id().map(i64::from));

    let shard_opts = ShardOptions {
        read: run.data.read_options(),
        val_fraction: run.data.val_fraction,
        seed: run.train.seed,
        cache_dir: run.data.cache_dir.clone().unwrap_or_else(|| out.join("tokens")),
        progress,
    };
    let corpus = tokenize_corpus(&sources, &tok, &shard_opts)?;
    eprintln!(
        "corpus: {} documents, {} bytes, {} training and {} validation tokens; unigram entropy {:.3} nats/token",
        corpus.documents(),
        corpus.bytes(),
        corpus.train_tokens(),
        corpus.val_tokens(),
        corpus.unigram_entropy(10_000_000)
    );
    let id_bytes = tok.id_byte_lengths().map(|l| tch::Tensor::from_slice(&l.iter().map(|&n| n as f64).collect::<Vec<_>>()));
    let batches = Batches(TokenBatches::new(corpus, run.train.batch_size, run.train.seq_len, run.train.seed, device)?, id_bytes);
    stlm_core::seed_all(run.train.seed);
    let (model, keep_zeros) = match init {
        Some(init) => (init.model, init.keep_zeros),
        None => match model_cfg.bytes {
            Some(_) => (AnyModel::Bytes(Box::new(BytePooledModel::new(model_cfg, device)?)), Vec::new()),
            None => (AnyModel::Tokens(Box::new(DecoderModel::new(model_cfg, device)?)), Vec::new()),
        },
    };
    if !keep_zeros.is_empty() {
        eprintln!("pruned model: the zeros of {} weight matrices stay zero", keep_zeros.len());
    }
    if let AnyModel::Bytes(m) = &model {
        let (byte_path, global) = m.parameter_split();
        eprintln!("byte-pooled model: {byte_path} parameters in the byte path, {global} in the global decoder");
    }
    eprintln!("model: {} parameters; run directory {}", model.as_lm().num_parameters(), out.display());
    stlm_core::atomic_write_bytes(&out.join("config.toml"), run.text.as_bytes())?;

    let mut settings = run.train.settings(a.max_steps, progress);
    settings.keep_zeros = keep_zeros;
    settings.stop = ctrl_c()?;
    let timed_out = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(limit) = a.time_limit {
        if !(limit > 0.0 && limit.is_finite()) {
            bail!("--time-limit {limit}: must be a positive number of seconds");
        }
        let (stop, timed_out) = (Arc::clone(&settings.stop), Arc::clone(&timed_out));
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs_f64(limit));
            timed_out.store(true, Ordering::SeqCst);
            stop.store(true, Ordering::SeqCst);
        });
    }
    let report = run_training(model.as_lm(), &batches, &settings, &out, a.resume)?;
    if !report.completed && timed_out.load(Ordering::SeqCst) {
        eprintln!("time limit reached after step {}", report.step);
    } else if !report.completed {
        eprintln!("stopped at step {}; checkpoint written. Continue with the same command plus --resume.", report.step);
        std::process::exit(130);
    }
    if let Some(last) = report.logs.last() {
        eprintln!(
            "step {}: loss {:.4}{}",
            last.step,
            last.loss,
            last.val_loss.map(|v| format!(", validation loss {v:.4}")).unwrap_or_default()
        );
    }
    let model_dir = out.join("model");
    model.as_lm().save(&model_dir, Some(&out.join("tokenizer.json")))?;
    if let Some(dir) = &a.init {
        // The fine-tuned model keeps its pruning record, so a further run keeps the zeros too.
        let record = dir.join(PRUNING_FILE);
        if record.is_file() {
            let bytes = std::fs::read(&record).with_context(|| format!("{}: cannot read", record.display()))?;
            stlm_core::atomic_write_bytes(&model_dir.join(PRUNING_FILE), &bytes)?;
        }
    }
    eprintln!("saved {}", model_dir.display());
    print_samples(&model, &tok, a.samples, run.train.seed)
}

/// The flag a Ctrl-C sets (first press: finish the step and checkpoint; second: quit at once),
/// installed once per process so that several runs (`stlm prune --schedule`) share it.
pub(crate) fn ctrl_c() -> Result<Arc<std::sync::atomic::AtomicBool>> {
    static FLAG: std::sync::OnceLock<Arc<std::sync::atomic::AtomicBool>> = std::sync::OnceLock::new();
    if let Some(flag) = FLAG.get() {
        return Ok(Arc::clone(flag));
    }
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = Arc::clone(&flag);
    ctrlc::set_handler(move || {
        if stop.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond Ctrl-C: stopping now, without a checkpoint of this step");
            std::process::exit(130);
        }
        eprintln!("\nCtrl-C: finishing this step and writing a checkpoint (press again to quit at once)");
    })
    .context("cannot install the Ctrl-C handler")?;
    Ok(Arc::clone(FLAG.get_or_init(|| flag)))
}

/// Trains `out` for `max_steps` from the model directory `init` with the `[train]`/`[data]`
/// tables of `config` on `data` (no samples at the end); returns the run's model directory.
pub fn fine_tune(config: &Path, init: &Path, data: &[PathBuf], out: &Path, max_steps: u64, device: &DeviceArgs) -> Result<PathBuf> {
    train(TrainArgs {
        config: config.to_path_buf(),
        data: data.to_vec(),
        out: Some(out.to_path_buf()),
        max_steps: Some(max_steps),
        resume: false,
        time_limit: None,
        set: Vec::new(),
        init: Some(init.to_path_buf()),
        samples: 0,
        device: device.clone(),
    })?;
    Ok(out.join("model"))
}

/// A model directory a run starts from (`--init`).
struct Init {
    dir: PathBuf,
    model: AnyModel,
    /// Weights whose zeros stay zero (from the directory's `pruning.json`).
    keep_zeros: Vec<String>,
}

/// Loads `--init DIR` in float32 on `device`, with the weights its `pruning.json` lists.
fn load_init(dir: &Path, device: tch::Device) -> Result<Init> {
    let model = stlm_model::load_any_model(dir, device, stlm_core::DType::Float32)?;
    let record = dir.join(PRUNING_FILE);
    // Unstructured and N:M reports list the pruned matrices; structured ones have nothing to keep.
    let keep_zeros = match record.is_file() {
        true => match stlm_core::read_json::<serde_json::Value>(&record)?.get("pruned") {
            Some(pruned) => serde_json::from_value::<Vec<stlm_prune::TargetReport>>(pruned.clone())
                .with_context(|| format!("{}: field `pruned` is not a list of pruned matrices", record.display()))?
                .into_iter()
                .map(|t| t.name)
                .collect(),
            None => Vec::new(),
        },
        false => Vec::new(),
    };
    Ok(Init { dir: dir.to_path_buf(), model, keep_zeros })
}

/// Prints `count` texts sampled from the model, each started from the end-of-text token.
pub(crate) fn print_samples(model: &AnyModel, tok: &Tokenizer, count: usize, seed: u64) -> Result<()> {
    let Some(start) = tok.eos_id().map(i64::from) else { return Ok(()) };
    if count == 0 {
        return Ok(());
    }
    let config = model.as_lm().model_config();
    let cfg = GenerationConfig {
        max_new_tokens: 160,
        temperature: 0.8,
        top_p: 0.95,
        seed,
        eos_token_ids: config.eos_token_id.clone(),
        pad_token_id: config.pad_token_id.unwrap_or(0),
        ..Default::default()
    };
    let model = match model {
        AnyModel::Tokens(m) => m.as_ref(),
        AnyModel::Bytes(m) => {
            for i in 0..count {
                let out = generate_bytes(m, &[start as u32], &GenerationConfig { seed: seed + i as u64, max_new_tokens: 400, ..cfg.clone() }, |_| {})?;
                println!("--- sample {}\n{}", i + 1, tok.decode(&out, true)?.trim());
            }
            return Ok(());
        }
    };
    let prompts = vec![vec![start]; count];
    let outs = stlm_model::generate(model, &prompts, &cfg, |_, _| {})?;
    for (i, ids) in outs.iter().enumerate() {
        let ids: Vec<u32> = ids.iter().map(|&t| t as u32).collect();
        println!("--- sample {}\n{}", i + 1, tok.decode(&ids, true)?.trim());
    }
    Ok(())
}
