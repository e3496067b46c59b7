//! Distillation runs: the student, the teacher (live or cached), the logit and feature losses,
//! the batches and the run directory of `stlm distill`, assembled from [`DistillOptions`] and
//! trained with the stlm-train loop; and [`write_cache`], the teacher's top-k distributions over
//! a corpus (`stlm distill cache`). Errors name the option or file, never a command-line flag.

use crate::{CacheHeader, CacheWriter, DistillError, Distiller, Divergence, FeatureLoss, LayerChoice, LogitLoss, Result, Teacher, TeacherCache};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use stlm_core::OptionError;
use stlm_data::{window_picks, DataConfig, Source};
use stlm_model::{Batch, DecoderModel, LanguageModel};
use stlm_tokenizers::Tokenizer;
use stlm_train::config::TrainConfig;
use stlm_train::run::{check_ranks_agree, corpus_batches, create_run_dir, fill_special_tokens, sources, tokenize, RunConfig, TokenBatchSource};
use stlm_dist::ProcessGroup;
use stlm_train::trainer::{train, BatchSource, RunControl, TrainReport};
use stlm_train::TrainError;
use tch::{Device, Tensor};

/// The record of a distillation run's options in its run directory.
pub const RECORD_FILE: &str = "distill.json";

/// The options of a distillation run; as `stlm distill` takes them (each field is the flag of
/// its name), so the help text is written once.
#[derive(Debug, Clone, clap::Args)]
pub struct DistillOptions {
    /// Teacher model directory (token models). Optional with --cache.
    #[arg(long, required_unless_present = "cache")]
    pub teacher: Option<PathBuf>,
    /// A teacher cache (`stlm distill cache`): train on its windows with its stored targets.
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// The student: a run config (TOML with [model], [train], [data]) or a model directory to
    /// continue from (then [train]/[data] come from --config, or the defaults).
    #[arg(long)]
    pub student: PathBuf,
    /// Run config for [train] and [data] when --student is a model directory.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a field of the student's run config, `TABLE.FIELD=VALUE` (as `stlm train --set`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Length of the run in steps (overrides [train] max_steps).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Training text (as `stlm train --data`); repeatable. Not with --cache (the cache's data is used).
    #[arg(long = "data", conflicts_with = "cache")]
    pub data: Vec<PathBuf>,
    /// Logit divergence: fkl, rkl, js, tvd, sfkl or srkl (a bad name is one error line that
    /// lists them).
    #[arg(long, default_value = "fkl", value_parser = |s: &str| s.parse::<Divergence>())]
    pub loss: Divergence,
    /// Temperature of both distributions (default 1; a cache's own with --cache).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Weight of the logit loss; the next-token cross-entropy gets 1 - alpha.
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f64,
    /// Skew lambda of sfkl and srkl.
    #[arg(long, default_value_t = 0.1)]
    pub skew: f64,
    /// Compare only the teacher's top k tokens plus a rest bucket (default: the whole vocabulary;
    /// a cache's own k with --cache).
    #[arg(long)]
    pub top_k: Option<i64>,
    /// Weight of the hidden-state MSE (0: off); needs the live teacher.
    #[arg(long, default_value_t = 0.0)]
    pub hidden_weight: f64,
    /// Weight of the attention-map KL between the blocks producing the paired states (0: off);
    /// dense attention, teacher heads a multiple of the student's; needs the live teacher.
    #[arg(long, default_value_t = 0.0)]
    pub attention_weight: f64,
    /// Feature pairs STUDENT:TEACHER of residual-stream states (0 = embeddings, i = after block
    /// i), e.g. `1:2,2:4`; default: student state i against teacher state round(i Lt / Ls).
    #[arg(long)]
    pub layer_map: Option<String>,
    /// How the teacher's and the student's vocabularies are paired.
    #[arg(long, value_enum, default_value_t = Align::None)]
    pub align: Align,
    /// Student initialisation from a config: random, every:K (teacher blocks 0, K, 2K, ...) or
    /// layers:0,2,4; tensors are cut to the student's leading dimensions when it is narrower.
    #[arg(long, default_value = "random")]
    pub init: String,
}

/// How the teacher's and the student's vocabularies are paired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Align {
    /// The tokenizers must share a vocabulary.
    None,
    /// A teacher with another (byte-level BPE) tokenizer: logit losses compare next-byte
    /// distributions where both tokenizations end at the same byte.
    Bytes,
}

impl Align {
    /// The command-line name, as recorded in `distill.json`.
    fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self).map(|v| v.get_name().to_string()).unwrap_or_default()
    }
}

/// The options of a run, recorded so that a resumed run is the same run.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Record {
    teacher: Option<PathBuf>,
    cache: Option<PathBuf>,
    loss: String,
    temperature: f64,
    alpha: f64,
    skew: f64,
    top_k: Option<i64>,
    hidden_weight: f64,
    attention_weight: f64,
    layer_map: Vec<(usize, usize)>,
    init: String,
    init_layers: Vec<usize>,
    align: String,
}

/// A distillation run ready to train.
pub struct DistillRun {
    /// The objective: the student, the teacher and the losses.
    pub distiller: Distiller,
    /// Training batches (with the cache's targets) and validation batches.
    pub batches: Box<dyn BatchSource>,
    /// The student's `[train]` table.
    pub train: TrainConfig,
    /// The run directory.
    pub out: PathBuf,
    /// The logit divergence.
    pub divergence: Divergence,
    /// The temperature in use.
    pub temperature: f64,
    /// The top k in use.
    pub top_k: Option<i64>,
}

/// The student's model, run tables and tokenizer.
struct Student {
    model: DecoderModel,
    train: TrainConfig,
    data: DataConfig,
    tokenizer: Tokenizer,
    /// The config text written to the run directory.
    text: String,
    /// True when the weights came from a model directory.
    pretrained: bool,
}

/// The option `name` is not allowed (whatever its value) because of `why`.
fn bad_option(name: &'static str, why: impl Into<String>) -> DistillError {
    OptionError::no_value(name, why).into()
}

/// The option `name` may not have the value `value` because of `why`.
fn bad_value(name: &'static str, value: impl std::fmt::Display, why: impl Into<String>) -> DistillError {
    OptionError::new(name, value, why).into()
}

/// Loads a token model directory in float32.
fn load_token_model(dir: &Path, device: Device) -> Result<DecoderModel> {
    if stlm_model::load_config(dir)?.bytes.is_some() {
        return Err(DistillError::Input(format!("{}: a byte-pooled model; distillation takes token models", dir.display())));
    }
    Ok(stlm_model::load_model(dir, device, stlm_core::DType::Float32)?)
}

fn load_student(o: &DistillOptions, device: Device) -> Result<Student> {
    let path = o.student.as_path();
    let steps = |run: &mut RunConfig| o.max_steps.map(|s| run.set_max_steps(s)).transpose();
    if path.is_dir() {
        let model = load_token_model(path, device)?;
        let tok_path = stlm_model::tokenizer_path(path)
            .ok_or_else(|| DistillError::Input(format!("{}: no tokenizer.json in the student model directory", path.display())))?;
        let tokenizer = Tokenizer::from_file(&tok_path)?;
        let mut run = match &o.config {
            Some(c) => RunConfig::load(c, &o.overrides)?,
            None if !o.overrides.is_empty() => return Err(bad_option("set", "overrides need a run config when the student is a model directory")),
            None => RunConfig::for_model(model.config.clone()),
        };
        steps(&mut run)?;
        return Ok(Student { model, train: run.train, data: run.data, tokenizer, text: run.text, pretrained: true });
    }
    if o.config.is_some() {
        return Err(bad_option("config", format!("is for a student model directory; {} is a run config already", path.display())));
    }
    let mut run = RunConfig::load(path, &o.overrides)?;
    steps(&mut run)?;
    let tokenizer = match &run.data.tokenizer {
        Some(t) => Tokenizer::from_file(t)?,
        None => {
            // The teacher's tokenizer: the student's logits are the teacher's vocabulary (which
            // a run may have fitted to a tokenizer smaller than its config asked for).
            let (dir, teacher_vocab) = teacher_dir(o)?;
            if teacher_vocab != run.model.vocab_size {
                let why = format!("the teacher's ({}), whose tokenizer the student reads", dir.display());
                eprintln!("student model.vocab_size is {teacher_vocab}: {why}");
                run.set_vocab_size(teacher_vocab, &why)?;
            }
            Tokenizer::from_file(&teacher_tokenizer_path(o)?)?
        }
    };
    fill_special_tokens(&mut run.model, &tokenizer);
    if run.model.bytes.is_some() {
        return Err(DistillError::Input(format!("{}: a byte-pooled student; distillation takes token models", path.display())));
    }
    stlm_core::seed_all(run.train.seed);
    let model = DecoderModel::new(run.model.clone(), device)?;
    Ok(Student { model, train: run.train, data: run.data, tokenizer, text: run.text, pretrained: false })
}

/// The teacher's model directory (with a cache, the one the cache was made from) and its
/// vocab_size (with a cache, the cache's).
fn teacher_dir(o: &DistillOptions) -> Result<(PathBuf, i64)> {
    match (&o.teacher, &o.cache) {
        (Some(t), _) => Ok((t.clone(), stlm_model::load_config(t)?.vocab_size)),
        (None, Some(c)) => {
            let header = TeacherCache::header(c)?;
            Ok((header.teacher, header.vocab_size))
        }
        (None, None) => Err(bad_option("teacher", "a teacher directory or a teacher cache is needed")),
    }
}

/// The teacher's tokenizer.json: the teacher directory's, or with a cache its teacher's.
fn teacher_tokenizer_path(o: &DistillOptions) -> Result<PathBuf> {
    let (dir, _) = teacher_dir(o)?;
    stlm_model::tokenizer_path(&dir).ok_or_else(|| DistillError::Input(format!("{}: the teacher has no tokenizer.json", dir.display())))
}

/// Refuses a student whose vocabulary is not the teacher's, naming the first difference.
fn check_vocabulary(teacher: &Tokenizer, student: &Tokenizer) -> Result<()> {
    if let Some((id, t, s)) = teacher.first_vocab_difference(student) {
        let show = |x: Option<String>| x.map(|t| format!("`{t}`")).unwrap_or_else(|| "nothing".into());
        return Err(DistillError::Input(format!(
            "the teacher's tokenizer ({} tokens) and the student's ({} tokens) differ: id {id} is {} in the teacher and {} in the student; \
             logit distillation needs a shared vocabulary (train the student with the teacher's tokenizer.json) or byte alignment",
            teacher.vocab_size(),
            student.vocab_size(),
            show(t),
            show(s)
        )));
    }
    Ok(())
}

/// Training batches drawn from a teacher cache (its targets in each batch's extras);
/// validation batches from the cache's corpus.
struct CachedBatches {
    cache: TeacherCache,
    val: TokenBatchSource,
    seed: u64,
    batch: usize,
    seq: i64,
    device: Device,
    /// This rank and the world size: a rank's batch is its slice of the global batch.
    shard: (usize, usize),
}

impl BatchSource for CachedBatches {
    fn train_batch(&self, step: u64, micro: u64) -> stlm_train::Result<Batch> {
        let (rank, world) = self.shard;
        let picks = window_picks(self.seed, step, micro, self.batch * world, self.cache.len());
        let picks: Vec<i64> = picks.into_iter().skip(rank * self.batch).take(self.batch).map(|p| p as i64).collect();
        self.cache.train_batch(&picks, self.seq, self.device).map_err(|e| TrainError::Config(e.to_string()))
    }
    fn val_batch(&self, index: u64) -> stlm_train::Result<Batch> {
        self.val.val_batch(index)
    }
    fn target_bytes(&self, targets: &Tensor) -> Option<f64> {
        self.val.target_bytes(targets)
    }
}

/// Assembles the distillation run of `o` in the run directory `out` on `device` (checking, when
/// `resume`, that the options are those of the run there): the student, the teacher, the losses,
/// the student's initialisation from the teacher, the batches, and the files of the run
/// directory (`distill.json`, `config.toml`, `tokenizer.json`). Progress lines go to stderr.
/// In a data-parallel `group`, rank 0 writes the files and token shards first and every rank
/// draws its slice of each global batch.
pub fn prepare(o: &DistillOptions, out: &Path, resume: bool, device: Device, progress: bool, group: Option<&ProcessGroup>) -> Result<DistillRun> {
    let (rank, world) = group.map_or((0, 1), |g| (g.rank(), g.world_size()));
    let leader = rank == 0;
    let progress = progress && leader;
    if let Some(g) = group {
        g.check_same("the distillation options", format!("{o:?}{resume}").as_bytes())?;
        if !leader {
            g.barrier()?;
        }
    }
    let divergence = o.loss;
    let init: LayerChoice = o.init.parse()?;
    if o.cache.is_some() && !o.data.is_empty() {
        return Err(bad_option("data", "a cache run trains on the cache's corpus; give no training text"));
    }
    let cache = o.cache.as_deref().map(TeacherCache::open).transpose()?;
    let teacher_tok = Tokenizer::from_file(&teacher_tokenizer_path(o)?)?;
    let teacher = o.teacher.as_deref().map(|d| load_token_model(d, device)).transpose()?;
    let student = load_student(o, device)?;
    let align = match (o.align, &teacher) {
        (Align::None, _) => {
            check_vocabulary(&teacher_tok, &student.tokenizer)?;
            None
        }
        (Align::Bytes, None) => return Err(bad_value("align", "bytes", "needs the live teacher (a teacher directory, not a cache)")),
        (Align::Bytes, Some(t)) => {
            let (sv, tv) = (student.model.config.vocab_size, t.config.vocab_size);
            Some(crate::ByteAlignment::new(&student.tokenizer, sv, teacher_tok, tv, t.config.max_position_embeddings, device)?)
        }
    };

    // The logit loss; a cache fixes the temperature and k.
    let (temperature, top_k) = match &cache {
        Some(c) => {
            let h = &c.header;
            if o.temperature.is_some_and(|t| t != h.temperature) || o.top_k.is_some_and(|k| k != h.top_k) {
                return Err(bad_option(
                    "temperature",
                    format!("the cache holds top-{} distributions at temperature {}; keep its temperature and top_k or make a new cache", h.top_k, h.temperature),
                ));
            }
            if h.vocab_size != student.model.config.vocab_size {
                return Err(DistillError::Input(format!(
                    "the cache's teacher has vocab_size {} and the student {}",
                    h.vocab_size, student.model.config.vocab_size
                )));
            }
            (h.temperature, Some(h.top_k))
        }
        None => (o.temperature.unwrap_or(1.0), o.top_k),
    };
    let logit = LogitLoss { divergence, temperature, skew: o.skew, top_k };
    logit.validate()?;

    // Student initialisation from the teacher's weights.
    let init_layers = match (&init, &teacher) {
        (LayerChoice::Random, _) => Vec::new(),
        (_, _) if student.pretrained => return Err(bad_value("init", &o.init, "the student model directory has weights already")),
        (_, None) => return Err(bad_value("init", &o.init, "copies the teacher's weights: give a teacher directory")),
        (choice, Some(t)) => {
            let layers = choice.teacher_layers(t.layers.len(), student.model.layers.len())?;
            let cut = crate::copy_from_teacher(&student.model, t, &layers)?;
            eprintln!("student starts from teacher blocks {layers:?} ({cut} tensors cut to the student's width)");
            layers
        }
    };
    let features = match (o.hidden_weight, o.attention_weight) {
        (0.0, 0.0) if o.layer_map.is_some() => return Err(bad_option("layer_map", "needs a hidden_weight or an attention_weight")),
        (0.0, 0.0) => None,
        (h, w) => {
            let Some(t) = &teacher else {
                let name = if h != 0.0 { "hidden_weight" } else { "attention_weight" };
                return Err(bad_option(name, "hidden-state and attention losses need the live teacher (a teacher directory, not a cache)"));
            };
            let map = match &o.layer_map {
                Some(spec) => FeatureLoss::parse_map(spec)?,
                None => FeatureLoss::uniform_map(student.model.depth(), t.depth()),
            };
            Some(FeatureLoss::new(h, w, map, &student.model, t)?)
        }
    };
    let record = Record {
        teacher: o.teacher.clone(),
        cache: o.cache.clone(),
        loss: o.loss.name(),
        temperature,
        alpha: o.alpha,
        skew: o.skew,
        top_k,
        hidden_weight: o.hidden_weight,
        attention_weight: o.attention_weight,
        layer_map: features.as_ref().map(|f| f.map.clone()).unwrap_or_default(),
        init: o.init.clone(),
        init_layers,
        align: o.align.name(),
    };
    create_run_dir(out)?;
    let record_path = out.join(RECORD_FILE);
    if resume {
        let saved: Record = stlm_core::read_json(&record_path)?;
        if saved != record {
            return Err(DistillError::Input(format!(
                "cannot resume: the options differ from those of the run in {} ({}); pass the same ones",
                out.display(),
                record_path.display()
            )));
        }
    }

    // Data: the student's tokenizer over the training text, or the cache's corpus.
    let tok_path = out.join("tokenizer.json");
    if leader {
        student.tokenizer.save(&tok_path)?;
    }
    let (train, seq) = (&student.train, student.train.seq_len);
    if train.layer_skip.is_some() {
        return Err(bad_option("train.layer_skip", "LayerSkip trains with `stlm train`; distillation has its own loss"));
    }
    let (batches, teacher, summary): (Box<dyn BatchSource>, Teacher, _) = match (cache, teacher, &o.cache) {
        (Some(cache), _, Some(cache_dir)) => {
            let h = &cache.header;
            let sources: Vec<Source> = h.sources.iter().cloned().map(Source::File).collect();
            // Read as `write_cache` read it, so that its tokens are reused.
            let corpus = tokenize(&sources, &student.tokenizer, &DataConfig::default(), h.val_fraction, h.seed, cache_dir.join("tokens"), progress)?;
            let (val, summary) = corpus_batches(corpus, &student.tokenizer, train, device, (rank, world))?;
            eprintln!("teacher cache: {} windows of {} positions, top {} at temperature {}", cache.len(), h.seq_len, h.top_k, h.temperature);
            let batch = train.batch_size as usize;
            let batches = CachedBatches { cache, val, seed: train.seed, batch, seq, device, shard: (rank, world) };
            (Box::new(batches), Teacher::Cached, summary)
        }
        (_, Some(t), _) => {
            let sources = sources(&o.data, &student.data);
            let cache_dir = student.data.cache_dir.clone().unwrap_or_else(|| out.join("tokens"));
            let corpus = tokenize(&sources, &student.tokenizer, &student.data, student.data.val_fraction, train.seed, cache_dir, progress)?;
            let (batches, summary) = corpus_batches(corpus, &student.tokenizer, train, device, (rank, world))?;
            (Box::new(batches), Teacher::Live(Box::new(t)), summary)
        }
        _ => return Err(bad_option("teacher", "a teacher directory or a teacher cache is needed")),
    };
    let distiller = Distiller::new(student.model, teacher, logit, o.alpha, features, align)?;
    eprintln!(
        "distilling into {} parameters with {} (T = {temperature}, alpha = {}{}); run directory {}",
        distiller.num_parameters(),
        divergence.name(),
        o.alpha,
        top_k.map(|k| format!(", top {k}")).unwrap_or_default(),
        out.display()
    );
    let json = serde_json::to_string_pretty(&record).map_err(|e| DistillError::Input(format!("cannot write {}: {e}", record_path.display())))?;
    if leader {
        stlm_core::atomic_write_bytes(&record_path, json.as_bytes())?;
        if !student.text.is_empty() {
            stlm_core::atomic_write_bytes(&out.join("config.toml"), student.text.as_bytes())?;
        }
        if let Some(g) = group {
            g.barrier()?;
        }
    }
    if let Some(g) = group {
        // As `stlm train` does: every rank read the same corpus with the same settings.
        check_ranks_agree(g, &student.text, &summary)?;
    }
    Ok(DistillRun { distiller, batches, train: student.train, out: out.to_path_buf(), divergence, temperature, top_k })
}

impl DistillRun {
    /// Trains the student (resuming when `resume`) until `train.max_steps`, a stop or a time limit.
    pub fn train(&self, control: &RunControl, resume: bool) -> stlm_train::Result<TrainReport> {
        train(&self.distiller, self.batches.as_ref(), &self.train, control, &self.out, resume)
    }

    /// Saves the student as the model directory `out/model` with the run's tokenizer.
    pub fn save_student(&self) -> Result<PathBuf> {
        let dir = self.out.join("model");
        self.distiller.student.save(&dir, Some(&self.out.join("tokenizer.json")))?;
        Ok(dir)
    }

    /// The result of a finished run (`stlm distill --json`): the student directory `model`,
    /// the losses and weights in use, and the last logged losses of `report`.
    pub fn summary(&self, options: &DistillOptions, report: &TrainReport, model: &Path) -> serde_json::Value {
        let last = report.logs.last();
        serde_json::json!({
            "model": model,
            "steps": report.step,
            "loss": self.divergence.name(),
            "temperature": self.temperature,
            "alpha": options.alpha,
            "top_k": self.top_k,
            "hidden_weight": options.hidden_weight,
            "attention_weight": options.attention_weight,
            "train_loss": last.map(|l| l.loss),
            "val_loss": last.and_then(|l| l.val_loss),
            "val_bpb": last.and_then(|l| l.val_bpb),
            "parameters": self.distiller.num_parameters(),
        })
    }
}

/// What [`write_cache`] stores; as `stlm distill cache` takes it.
#[derive(Debug, Clone, clap::Args)]
pub struct CacheOptions {
    /// Teacher model directory.
    #[arg(long)]
    pub teacher: PathBuf,
    /// Text files (as `stlm train --data`); the windows cover their training split.
    #[arg(long = "data", required = true)]
    pub data: Vec<PathBuf>,
    /// Positions per window (students may train on shorter ones).
    #[arg(long, default_value_t = 256)]
    pub seq_len: i64,
    /// Tokens kept per position.
    #[arg(long, default_value_t = 64)]
    pub top_k: i64,
    /// Temperature of the stored distributions.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Windows per teacher forward.
    #[arg(long, default_value_t = 16)]
    pub batch_size: i64,
    /// Stop after this many windows.
    #[arg(long)]
    pub max_windows: Option<u64>,
    /// Fraction of each file held out for validation (as [data] val_fraction).
    #[arg(long, default_value_t = stlm_data::DataConfig::default().val_fraction)]
    pub val_fraction: f64,
    /// Seed of the split (as [train] seed).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Stores the teacher's top-k distributions over disjoint windows of the corpus's training split
/// in the cache directory `out`, with a progress bar when `progress`; returns the header.
pub fn write_cache(o: &CacheOptions, out: &Path, device: Device, dtype: stlm_core::DType, progress: bool) -> Result<CacheHeader> {
    if stlm_model::load_config(&o.teacher)?.bytes.is_some() {
        return Err(DistillError::Input(format!("{}: a byte-pooled model; the cache takes token models", o.teacher.display())));
    }
    let teacher = stlm_model::load_model(&o.teacher, device, dtype)?;
    let tok_path = stlm_model::tokenizer_path(&o.teacher)
        .ok_or_else(|| DistillError::Input(format!("{}: no tokenizer.json in the teacher's model directory", o.teacher.display())))?;
    let tok = Tokenizer::from_file(&tok_path)?;
    let (seq, k) = (o.seq_len, o.top_k);
    let context = teacher.config.max_position_embeddings;
    if seq < 1 || seq > context {
        return Err(bad_value("seq_len", seq, format!("must be in 1..={context} (the teacher's max_position_embeddings)")));
    }
    if k < 1 || k >= teacher.config.vocab_size {
        return Err(bad_value("top_k", k, format!("must be in 1..{} (the vocabulary)", teacher.config.vocab_size)));
    }
    if o.batch_size < 1 {
        return Err(bad_value("batch_size", o.batch_size, "must be at least 1"));
    }
    let loss = LogitLoss { divergence: Divergence::ForwardKl, temperature: o.temperature, skew: 0.1, top_k: Some(k) };
    loss.validate()?;
    let sources: Vec<Source> = o.data.iter().cloned().map(Source::File).collect();
    let corpus = tokenize(&sources, &tok, &DataConfig::default(), o.val_fraction, o.seed, out.join("tokens"), progress)?;
    // Disjoint windows of seq + 1 ids (each sharing its last id with the next window's first),
    // so every training token is a target once.
    let mut windows: Vec<(usize, usize)> = Vec::new();
    for (i, shard) in corpus.shards.iter().enumerate() {
        let len = shard.train.len();
        windows.extend((0..).map(|w| w * seq as usize).take_while(|&s| s + (seq as usize) < len).map(|s| (i, s)));
    }
    windows.truncate(o.max_windows.unwrap_or(u64::MAX).min(windows.len() as u64) as usize);
    if windows.is_empty() {
        return Err(DistillError::Input(format!(
            "the training split has no window of {} tokens; give more data or a shorter seq_len",
            seq + 1
        )));
    }
    let bar = if progress { ProgressBar::new(windows.len() as u64) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} windows [{elapsed_precise}<{eta_precise}]").expect("valid template"));
    let mut writer = CacheWriter::new(out, 4096)?;
    let mut ids = Vec::new();
    let _guard = tch::no_grad_guard();
    for chunk in windows.chunks(o.batch_size as usize) {
        ids.clear();
        for &(shard, start) in chunk {
            corpus.shards[shard].train.extend_window(start, seq as usize + 1, &mut ids);
        }
        let inputs = Tensor::from_slice(&ids).view([chunk.len() as i64, seq + 1]).to_device(teacher.device());
        let logits = teacher.forward(&inputs.narrow(1, 0, seq));
        writer.push(&inputs, &loss.teacher_targets(&logits))?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    writer.finish(CacheHeader {
        teacher: o.teacher.clone(),
        seq_len: seq,
        top_k: k,
        temperature: o.temperature,
        vocab_size: teacher.config.vocab_size,
        windows: 0,
        sources: o.data.clone(),
        val_fraction: o.val_fraction,
        seed: o.seed,
        files: Vec::new(),
    })
}
