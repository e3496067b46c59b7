//! Run assembly: one [`RunConfig`] (`[model]`, `[train]`, `[data]`) parsed once with its
//! overrides, and [`prepare`]: the tokenizer, the token shards, the batches, the run directory
//! and the model of a run, as `stlm train`, `stlm distill`, `stlm prune --schedule` and
//! `stlm bench train` use them. Nothing here prints results or exits the process; errors name
//! the file and field, never a command-line flag.

use crate::config::TrainConfig;
use crate::trainer::{train, BatchSource, RunControl, TrainReport};
use crate::{Result, TrainError};
use std::path::{Path, PathBuf};
use stlm_core::CoreError;
use stlm_data::{sample_documents, tokenize_corpus, DataConfig, ShardOptions, Source, TokenBatches, TokenizedCorpus};
use stlm_model::{AnyModel, Batch, BytePooledModel, DecoderModel, LayerSkipModel, ModelConfig, PRUNING_FILE};
use stlm_tokenizers::{BpeOptions, Tokenizer};
use tch::{Device, Tensor};

/// Bytes of text a tokenizer is trained on at most (the start of the corpus).
const TOKENIZER_SAMPLE_BYTES: usize = 50 << 20;

/// The model, train and data tables of a run config, checked together.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The config text (overrides applied), copied into the run directory; empty when the run
    /// config was not read from a file.
    pub text: String,
    /// `[model]`.
    pub model: ModelConfig,
    /// `[train]`.
    pub train: TrainConfig,
    /// `[data]`.
    pub data: DataConfig,
}

impl RunConfig {
    /// Reads `path`, applies `overrides` (`TABLE.FIELD=VALUE`, VALUE in TOML syntax or a bare
    /// string) and checks the result; errors name the file and the field.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let mut text = std::fs::read_to_string(path).map_err(|e| CoreError::io(path, e))?;
        if !overrides.is_empty() {
            text = apply_overrides(&text, path, overrides)?;
        }
        stlm_core::toml_known_tables(&text, path, &["model", "train", "data"])?;
        let model = ModelConfig::from_toml_str(&text, path)?;
        let train = TrainConfig::from_toml_str(&text, path)?;
        let data = DataConfig::from_toml_str(&text, path)?;
        let run = RunConfig { text, model, train, data };
        run.check_lengths(&path.display().to_string())?;
        Ok(run)
    }

    /// A run of `model` with default `[train]` and `[data]` tables (no config file).
    pub fn for_model(model: ModelConfig) -> Self {
        RunConfig { text: String::new(), model, train: TrainConfig::default(), data: DataConfig::default() }
    }

    /// Sets the run's length (`train.max_steps`), checked.
    pub fn set_max_steps(&mut self, steps: u64) -> Result<()> {
        if steps == 0 {
            return Err(TrainError::Config("the run length (train.max_steps) must be at least 1 step".into()));
        }
        self.train.max_steps = steps;
        Ok(())
    }

    /// Sets `model.vocab_size` to `n`, in the config and in its text (which records `why` in a
    /// comment), so the run directory's config.toml says what the model is.
    pub fn set_vocab_size(&mut self, n: i64, why: &str) -> Result<()> {
        self.model.vocab_size = n;
        if self.text.is_empty() {
            return Ok(());
        }
        let bad = |m: String| TrainError::Config(m);
        let mut doc: toml::Table = self.text.parse().map_err(|e| bad(format!("the run config is not valid TOML: {e}")))?;
        let model = doc.entry("model").or_insert_with(|| toml::Value::Table(Default::default()));
        let model = model.as_table_mut().ok_or_else(|| bad("the run config's `model` is not a table".into()))?;
        model.insert("vocab_size".into(), toml::Value::Integer(n));
        let body = toml::to_string(&doc).map_err(|e| bad(format!("cannot write the run config as TOML: {e}")))?;
        let header: String = self.text.lines().take_while(|l| l.starts_with('#')).map(|l| format!("{l}\n")).collect();
        self.text = format!("{header}# model.vocab_size = {n}: {why}\n{body}");
        Ok(())
    }

    /// Windows must fit the model: `train.seq_len <= model.max_position_embeddings` (`origin`
    /// names where the model config came from).
    fn check_lengths(&self, origin: &str) -> Result<()> {
        if self.train.seq_len > self.model.max_position_embeddings {
            return Err(TrainError::Config(format!(
                "{origin}: train.seq_len {} exceeds model.max_position_embeddings {}",
                self.train.seq_len, self.model.max_position_embeddings
            )));
        }
        Ok(())
    }

    /// The training text: `files`, or the built-in stories of `[data]` when there are none.
    pub fn sources(&self, files: &[PathBuf]) -> Vec<Source> {
        sources(files, &self.data)
    }

    /// A new randomly initialised model of `[model]` (token or byte-pooled), seeded with
    /// `train.seed`.
    pub fn new_model(&self, device: Device) -> Result<AnyModel> {
        stlm_core::seed_all(self.train.seed);
        Ok(match self.model.bytes {
            Some(_) => AnyModel::Bytes(Box::new(BytePooledModel::new(self.model.clone(), device)?)),
            None => AnyModel::Tokens(Box::new(DecoderModel::new(self.model.clone(), device)?)),
        })
    }
}

/// The training text: `files`, or the built-in stories of `data` when there are none.
pub fn sources(files: &[PathBuf], data: &DataConfig) -> Vec<Source> {
    match files.is_empty() {
        true => vec![Source::Builtin { stories: data.builtin_stories, seed: data.builtin_seed }],
        false => files.iter().cloned().map(Source::File).collect(),
    }
}

/// `text` with each `TABLE.FIELD=VALUE` override set (VALUE parsed as TOML, else taken as a
/// string), re-serialised, with a comment listing the overrides.
pub fn apply_overrides(text: &str, path: &Path, overrides: &[String]) -> Result<String> {
    let bad = |m: String| TrainError::Config(m);
    let mut doc: toml::Table = text.parse().map_err(|e| bad(format!("{}: not valid TOML: {e}", path.display())))?;
    for item in overrides {
        let Some((key, raw)) = item.split_once('=') else {
            return Err(bad(format!("override `{item}`: expected TABLE.FIELD=VALUE, e.g. train.batch_size=16")));
        };
        let parts: Vec<&str> = key.trim().split('.').collect();
        if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
            return Err(bad(format!("override `{item}`: the key `{key}` must name a table and a field, e.g. train.batch_size")));
        }
        let value = match format!("v = {raw}").parse::<toml::Table>() {
            Ok(mut t) => t.remove("v").expect("parsed key"),
            Err(_) => toml::Value::String(raw.to_string()),
        };
        let mut table = &mut doc;
        for part in &parts[..parts.len() - 1] {
            let entry = table.entry(part.to_string()).or_insert_with(|| toml::Value::Table(Default::default()));
            table = entry
                .as_table_mut()
                .ok_or_else(|| bad(format!("override `{item}`: `{part}` is not a table in {}", path.display())))?;
        }
        table.insert(parts[parts.len() - 1].to_string(), value);
    }
    let body = toml::to_string(&doc).map_err(|e| bad(format!("cannot write the overridden config as TOML: {e}")))?;
    Ok(format!("# {} with overrides {}\n{body}", path.display(), overrides.join(" ")))
}

/// Where a run reads from and writes to, and how it is controlled.
#[derive(Debug, Clone)]
pub struct RunInputs {
    /// Training text files; empty: the built-in stories.
    pub data: Vec<PathBuf>,
    /// The run directory.
    pub out: PathBuf,
    /// Continue the run in `out` from its newest usable checkpoint.
    pub resume: bool,
    /// A model directory to start from instead of a random initialisation.
    pub init: Option<PathBuf>,
    /// Device of the model and batches.
    pub device: Device,
    /// Progress bars, the stop flag, a time limit.
    pub control: RunControl,
}

/// A model directory a run starts from.
pub struct InitModel {
    /// The directory.
    pub dir: PathBuf,
    /// Its model, in float32.
    pub model: AnyModel,
    /// Weights whose zeros stay zero (from the directory's `pruning.json`).
    pub keep_zeros: Vec<String>,
}

impl InitModel {
    /// Loads `dir` in float32 on `device`, with the pruned matrices its `pruning.json` lists.
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let mut model = stlm_model::load_any_model(dir, device, stlm_core::DType::Float32)?;
        if let AnyModel::Tokens(m) = &mut model {
            if m.is_quantized() {
                eprintln!("{}: a quantized model; training starts from its dequantized float weights", dir.display());
                m.dequantize();
            }
        }
        let record = dir.join(PRUNING_FILE);
        // Unstructured and N:M reports list the pruned matrices; structured ones have nothing to keep.
        let keep_zeros = match record.is_file() {
            true => match stlm_core::read_json::<serde_json::Value>(&record)?.get("pruned") {
                Some(pruned) => {
                    let names: Option<Vec<String>> = pruned
                        .as_array()
                        .map(|list| list.iter().map(|t| t.get("name").and_then(|n| n.as_str()).map(String::from)).collect())
                        .unwrap_or(None);
                    names.ok_or_else(|| {
                        TrainError::Config(format!("{}: field `pruned` is not a list of pruned matrices", record.display()))
                    })?
                }
                None => Vec::new(),
            },
            false => Vec::new(),
        };
        Ok(InitModel { dir: dir.to_path_buf(), model, keep_zeros })
    }
}

/// Batches for the trainer from stlm-data's token windows, and the bytes each id stands for.
pub struct TokenBatchSource {
    /// The windows.
    pub batches: TokenBatches,
    /// Bytes of text per token id `[vocab]` (float64), when the tokenizer knows them.
    pub id_bytes: Option<Tensor>,
}

impl TokenBatchSource {
    /// Windows of `corpus` for `train` (batch size, window, seed) on `device`; bits per byte
    /// from `tokenizer`'s id lengths.
    pub fn new(corpus: TokenizedCorpus, tokenizer: &Tokenizer, train: &TrainConfig, device: Device) -> Result<Self> {
        let id_bytes = tokenizer.id_byte_lengths().map(|l| Tensor::from_slice(&l.iter().map(|&n| n as f64).collect::<Vec<_>>()));
        let batches = TokenBatches::new(corpus, train.batch_size, train.seq_len, train.seed, device)?;
        Ok(TokenBatchSource { batches, id_bytes })
    }

    /// The batches of data-parallel rank `rank` of `world`: its slice of every global batch
    /// (see `TokenBatches::sharded`).
    pub fn sharded(self, rank: usize, world: usize) -> Result<Self> {
        Ok(TokenBatchSource { batches: self.batches.sharded(rank, world)?, id_bytes: self.id_bytes })
    }
}

impl BatchSource for TokenBatchSource {
    fn train_batch(&self, step: u64, micro: u64) -> Result<Batch> {
        let (x, y) = self.batches.train_batch(step, micro);
        Ok(Batch::new(x, y))
    }
    fn val_batch(&self, index: u64) -> Result<Batch> {
        let (x, y) = self.batches.val_batch(index);
        Ok(Batch::new(x, y))
    }
    fn target_bytes(&self, targets: &Tensor) -> Option<f64> {
        let table = self.id_bytes.as_ref()?;
        Some(table.index_select(0, &targets.reshape([-1]).to_device(table.device())).sum(tch::Kind::Double).double_value(&[]))
    }
}

/// The corpus of `sources` tokenized with `tok` as `data` says to read it, split with
/// `val_fraction` and `seed`, its shards cached under `cache_dir`.
pub fn tokenize(sources: &[Source], tok: &Tokenizer, data: &DataConfig, val_fraction: f64, seed: u64, cache_dir: PathBuf, progress: bool) -> Result<TokenizedCorpus> {
    let opts = ShardOptions { read: data.read_options(), val_fraction, seed, cache_dir, progress };
    Ok(tokenize_corpus(sources, tok, &opts)?)
}

/// Fills the model's special ids the config leaves open from the tokenizer: end of text is
/// EOS and BOS, the tokenizer's pad token is PAD.
pub fn fill_special_tokens(model: &mut ModelConfig, tok: &Tokenizer) {
    let eot = tok.eos_id().map(i64::from);
    if model.eos_token_id.is_empty() {
        model.eos_token_id.extend(eot);
    }
    model.bos_token_id = model.bos_token_id.or(eot);
    model.pad_token_id = model.pad_token_id.or(tok.pad_id().map(i64::from));
}

/// Creates the run directory `out`.
pub fn create_run_dir(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)
        .map_err(|e| TrainError::Config(format!("{}: cannot create the run directory: {e}", out.display())))
}

/// A run ready to train: its resolved config, tokenizer, batches, model and controls.
pub struct PreparedRun {
    /// The run config; `[model]` as the model was built (an init directory's, special ids filled).
    pub config: RunConfig,
    /// The run directory.
    pub out: PathBuf,
    /// The run's tokenizer (also at `out/tokenizer.json`).
    pub tokenizer: Tokenizer,
    /// The corpus's batches.
    pub batches: TokenBatchSource,
    /// The model.
    pub model: AnyModel,
    /// The directory the model started from, if any.
    pub init: Option<PathBuf>,
    /// Progress, stop flag, time limit and the pruned weights that stay zero.
    pub control: RunControl,
    /// Corpus statistics, for a report line.
    pub corpus: CorpusSummary,
}

/// Sizes of a tokenized corpus.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CorpusSummary {
    /// Documents read.
    pub documents: u64,
    /// Bytes of text.
    pub bytes: u64,
    /// Tokens in the training split.
    pub train_tokens: u64,
    /// Tokens in the validation split.
    pub val_tokens: u64,
    /// Unigram entropy of the training tokens (nats per token, from up to 10M tokens).
    pub unigram_entropy: f64,
}

impl CorpusSummary {
    /// The counts of `corpus` (and its unigram entropy over up to 10M training tokens).
    pub fn of(corpus: &TokenizedCorpus) -> Self {
        CorpusSummary {
            documents: corpus.documents(),
            bytes: corpus.bytes(),
            train_tokens: corpus.train_tokens(),
            val_tokens: corpus.val_tokens(),
            unigram_entropy: corpus.unigram_entropy(10_000_000),
        }
    }
}

/// A run's tokenized corpus as this rank's batches (`(rank, world)`: its share of each global
/// batch), with the corpus summary, printed: the data half of a run's preparation, shared by
/// `stlm train` and `stlm distill`.
pub fn corpus_batches(corpus: TokenizedCorpus, tok: &Tokenizer, train: &TrainConfig, device: Device, (rank, world): (usize, usize)) -> Result<(TokenBatchSource, CorpusSummary)> {
    let s = CorpusSummary::of(&corpus);
    eprintln!(
        "corpus: {} documents, {} bytes, {} training and {} validation tokens; unigram entropy {:.3} nats/token",
        s.documents, s.bytes, s.train_tokens, s.val_tokens, s.unigram_entropy
    );
    Ok((TokenBatchSource::new(corpus, tok, train, device)?.sharded(rank, world)?, s))
}

/// In data parallel, refuses ranks whose run config (`config_text`, after fitting) or corpus
/// differ: they would train different models. Every rank calls it at the same point, after the
/// leader has written the shards the others read.
pub fn check_ranks_agree(group: &stlm_dist::ProcessGroup, config_text: &str, s: &CorpusSummary) -> Result<()> {
    let corpus = format!("{} {} {} {}", s.documents, s.bytes, s.train_tokens, s.val_tokens);
    Ok(group.check_same("the fitted config and the corpus", format!("{config_text}\n{corpus}").as_bytes())?)
}

/// Assembles a run of `config` from `inputs`: the run directory, the model of an init directory
/// (whose config replaces `[model]`), the tokenizer (the config's, the run's own when resuming,
/// an init directory's, the byte tokenizer, or BPE trained on the data), the tokenized corpus
/// and its batches, the model (seeded with `train.seed`) and the config file in the run
/// directory. Progress lines go to stderr.
pub fn prepare(mut config: RunConfig, inputs: RunInputs) -> Result<PreparedRun> {
    let RunInputs { data, out, resume, init, device, mut control } = inputs;
    create_run_dir(&out)?;
    let leader = control.is_leader();
    if let Some(g) = &control.group {
        // Refused at start: ranks with different configs or data would train different models.
        let files: Vec<String> = data.iter().map(|p| p.display().to_string()).collect();
        let what = format!("{}\n{}\n{resume}\n{:?}", config.text, files.join("\n"), init);
        g.check_same("the run config, data files, resume and init settings", what.as_bytes())?;
        if !leader {
            // Rank 0 trains the tokenizer and writes the token shards; the others read them.
            g.barrier()?;
        }
    }
    let init_model = init.as_deref().map(|dir| InitModel::load(dir, device)).transpose()?;
    if let Some(m) = &init_model {
        eprintln!("starting from {} (its config replaces [model])", m.dir.display());
        config.model = m.model.as_lm().model_config().clone();
        config.check_lengths(&m.dir.display().to_string())?;
    }
    let sources = config.sources(&data);
    if data.is_empty() {
        let (stories, seed) = (config.data.builtin_stories, config.data.builtin_seed);
        eprintln!("no training files: training on the built-in corpus of {stories} stories (seed {seed})");
    }
    let tokenizer = run_tokenizer(&config, &sources, &out, resume || !leader, control.progress && leader, init.as_deref(), leader)?;
    if config.data.tokenizer.is_none() && config.model.bytes.is_none() && init.is_none() {
        fit_vocab_size(&mut config, &tokenizer)?;
    } else if (tokenizer.vocab_size() as i64) < config.model.vocab_size && config.model.bytes.is_none() {
        let (n, v) = (tokenizer.vocab_size(), config.model.vocab_size);
        eprintln!("model.vocab_size {v} is larger than the tokenizer's {n} tokens: ids from {n} up are never sampled");
    }
    fill_special_tokens(&mut config.model, &tokenizer);
    let cache_dir = config.data.cache_dir.clone().unwrap_or_else(|| out.join("tokens"));
    let split = (config.data.val_fraction, config.train.seed);
    let corpus = tokenize(&sources, &tokenizer, &config.data, split.0, split.1, cache_dir, control.progress && leader)?;
    let (rank, world) = control.rank_world();
    let (batches, summary) = corpus_batches(corpus, &tokenizer, &config.train, device, (rank, world))?;
    let model = match init_model {
        Some(m) => {
            control.keep_zeros = m.keep_zeros;
            stlm_core::seed_all(config.train.seed);
            m.model
        }
        None => config.new_model(device)?,
    };
    if !control.keep_zeros.is_empty() {
        eprintln!("pruned model: the zeros of {} weight matrices stay zero", control.keep_zeros.len());
    }
    if let AnyModel::Bytes(m) = &model {
        let (byte_path, global) = m.parameter_split();
        eprintln!("byte-pooled model: {byte_path} parameters in the byte path, {global} in the global decoder");
    }
    eprintln!("model: {} parameters; run directory {}", model.as_lm().num_parameters(), out.display());
    if leader {
        stlm_core::atomic_write_bytes(&out.join("config.toml"), config.text.as_bytes())?;
    }
    if let (Some(g), true) = (&control.group, leader) {
        g.barrier()?;
    }
    if let Some(g) = &control.group {
        check_ranks_agree(g, &config.text, &summary)?;
        if leader {
            eprintln!("data parallel: {world} ranks, a global batch of {} windows", world as i64 * config.train.batch_size);
        }
    }
    Ok(PreparedRun { config, out, tokenizer, batches, model, init, control, corpus: summary })
}

/// The config's tokenizer, the run's own when resuming, or BPE trained on the data now; the
/// byte tokenizer for byte models; an init directory's for a run that starts from one. Saved
/// as `out/tokenizer.json`.
fn run_tokenizer(run: &RunConfig, sources: &[Source], out: &Path, resume: bool, progress: bool, init: Option<&Path>, write: bool) -> Result<Tokenizer> {
    let saved = out.join("tokenizer.json");
    let save = |tok: &Tokenizer| if write { tok.save(&saved) } else { Ok(()) };
    let bad = |m: String| Err(TrainError::Config(m));
    if let Some(dir) = init.filter(|_| run.model.bytes.is_none()) {
        if let Some(t) = &run.data.tokenizer {
            return bad(format!(
                "field `data.tokenizer` ({}): the run starts from the model directory {} and uses its tokenizer; remove the field",
                t.display(),
                dir.display()
            ));
        }
        let path = stlm_model::tokenizer_path(dir)
            .ok_or_else(|| TrainError::Config(format!("{}: no tokenizer.json in the model directory", dir.display())))?;
        let tok = Tokenizer::from_file(&path)?;
        save(&tok)?;
        return Ok(tok);
    }
    if run.model.bytes.is_some() {
        if let Some(t) = &run.data.tokenizer {
            return bad(format!("field `data.tokenizer` ({}): byte models read the byte tokenizer; remove it", t.display()));
        }
        let tok = Tokenizer::bytes();
        save(&tok)?;
        return Ok(tok);
    }
    let tok = match (&run.data.tokenizer, resume && saved.is_file()) {
        (Some(path), _) => Tokenizer::from_file(path)?,
        (None, true) => Tokenizer::from_file(&saved)?,
        (None, false) => {
            eprintln!("training a BPE tokenizer of {} tokens on the data", run.model.vocab_size);
            let sample = sample_documents(sources, &run.data.read_options(), TOKENIZER_SAMPLE_BYTES)?;
            let opts = BpeOptions { vocab_size: run.model.vocab_size as usize, show_progress: progress, ..Default::default() };
            Tokenizer::train_bpe_on_texts(&sample, &opts)?
        }
    };
    if tok.vocab_size() as i64 > run.model.vocab_size {
        return bad(format!(
            "field `model.vocab_size` ({}) is smaller than the tokenizer's {} tokens",
            run.model.vocab_size,
            tok.vocab_size()
        ));
    }
    save(&tok)?;
    Ok(tok)
}

/// Multiple the vocabulary of a model is rounded up to when it is fitted to its tokenizer.
pub const VOCAB_MULTIPLE: i64 = 64;

/// A BPE tokenizer learned on a small corpus can have fewer tokens than `model.vocab_size`
/// asked for: the model's vocabulary becomes the tokenizer's size rounded up to
/// [`VOCAB_MULTIPLE`] (never above what was asked), so it has no outputs the tokenizer cannot
/// decode beyond that padding (which generation never samples).
fn fit_vocab_size(config: &mut RunConfig, tok: &Tokenizer) -> Result<()> {
    let (asked, learned) = (config.model.vocab_size, tok.vocab_size() as i64);
    let fitted = ((learned + VOCAB_MULTIPLE - 1) / VOCAB_MULTIPLE * VOCAB_MULTIPLE).min(asked);
    if fitted < asked {
        let why = format!("the tokenizer has {learned} tokens ({asked} asked), rounded up to a multiple of {VOCAB_MULTIPLE}");
        eprintln!("model.vocab_size is {fitted}: {why}");
        config.set_vocab_size(fitted, &why)?;
    }
    Ok(())
}

impl PreparedRun {
    /// `out/tokenizer.json`.
    pub fn tokenizer_path(&self) -> PathBuf {
        self.out.join("tokenizer.json")
    }

    /// Trains the model (resuming when `resume`) until `train.max_steps`, a stop or a time limit.
    pub fn train(&self, resume: bool) -> Result<TrainReport> {
        let (t, control, out) = (&self.config.train, &self.control, &self.out);
        match (&t.layer_skip, &self.model) {
            (None, model) => train(model.as_lm(), &self.batches, t, control, out, resume),
            (Some(skip), AnyModel::Tokens(m)) => train(&LayerSkipModel::new(m, skip.clone())?, &self.batches, t, control, out, resume),
            (Some(_), AnyModel::Bytes(_)) => Err(TrainError::Config("field `train.layer_skip`: byte-pooled models do not take LayerSkip".into())),
        }
    }

    /// Saves the model directory `out/model` with the run's tokenizer; a model that started from
    /// a pruned directory keeps its `pruning.json`, so a further run keeps the zeros too.
    pub fn save_model(&self) -> Result<PathBuf> {
        let dir = self.out.join("model");
        self.model.as_lm().save(&dir, Some(&self.tokenizer_path()))?;
        if let Some(init) = &self.init {
            let record = init.join(PRUNING_FILE);
            if record.is_file() {
                let bytes = std::fs::read(&record).map_err(|e| CoreError::io(&record, e))?;
                stlm_core::atomic_write_bytes(&dir.join(PRUNING_FILE), &bytes)?;
            }
        }
        Ok(dir)
    }
}

/// Fine-tunes the model directory `init` for `max_steps` steps with the `[train]` and `[data]`
/// tables of `config` on `data`, in the run directory `out`; returns the new model directory.
pub fn fine_tune(config: &Path, init: &Path, data: &[PathBuf], out: &Path, max_steps: u64, device: Device, control: RunControl) -> Result<PathBuf> {
    let mut run = RunConfig::load(config, &[])?;
    run.set_max_steps(max_steps)?;
    let inputs = RunInputs { data: data.to_vec(), out: out.to_path_buf(), resume: false, init: Some(init.to_path_buf()), device, control };
    let prepared = prepare(run, inputs)?;
    let report = prepared.train(false)?;
    if !report.completed {
        return Err(TrainError::Stopped { step: report.step, dir: out.to_path_buf() });
    }
    prepared.save_model()
}
