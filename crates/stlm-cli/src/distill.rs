//! `stlm distill`: a student trained against a teacher with the stlm-train loop (checkpoints,
//! resume, metrics, progress), and `stlm distill cache`: the teacher's top-k distributions over a
//! corpus, stored so that many students train without running the teacher.

use crate::common::{load_tokenizer, print_json, DeviceArgs};
use crate::train::{ctrl_c, print_samples};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use stlm_data::{window_picks, DataConfig, Source, TokenizedCorpus};
use stlm_distill::{copy_from_teacher, CacheHeader, CacheWriter, Distiller, Divergence, FeatureLoss, LayerChoice, LogitLoss, Teacher, TeacherCache};
use stlm_model::{AnyModel, Batch, DecoderModel, LanguageModel};
use stlm_tokenizers::Tokenizer;
use stlm_train::config::TrainConfig;
use stlm_train::run::{create_run_dir, fill_special_tokens, sources, tokenize, RunConfig, TokenBatchSource};
use stlm_train::trainer::{train as run_training, BatchSource, RunControl};
use stlm_train::TrainError;
use tch::{Device, Tensor};

/// The record of a distillation run's options in its run directory.
const RECORD_FILE: &str = "distill.json";

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct DistillArgs {
    #[command(subcommand)]
    job: Option<DistillJob>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum DistillJob {
    /// Store a teacher's top-k next-token distributions over a corpus (for `stlm distill --cache`).
    Cache(CacheArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Teacher model directory (token models). Optional with --cache.
    #[arg(long, required_unless_present = "cache")]
    teacher: Option<PathBuf>,
    /// The student: a run config (TOML with [model], [train], [data]) or a model directory to
    /// continue from (then [train]/[data] come from --config, or the defaults).
    #[arg(long, required = true)]
    student: Option<PathBuf>,
    /// Run config for [train] and [data] when --student is a model directory.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Training text (as `stlm train --data`); repeatable. Not with --cache (the cache's data is used).
    #[arg(long = "data", conflicts_with = "cache")]
    data: Vec<PathBuf>,
    /// A teacher cache (`stlm distill cache`): train on its windows with its stored targets.
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Logit divergence: fkl, rkl, js, tvd, sfkl or srkl.
    #[arg(long, default_value = "fkl")]
    loss: String,
    /// Temperature of both distributions (default 1; a cache's own with --cache).
    #[arg(long)]
    temperature: Option<f64>,
    /// Weight of the logit loss; the next-token cross-entropy gets 1 - alpha.
    #[arg(long, default_value_t = 0.5)]
    alpha: f64,
    /// Skew lambda of sfkl and srkl.
    #[arg(long, default_value_t = 0.1)]
    skew: f64,
    /// Compare only the teacher's top k tokens plus a rest bucket (default: the whole vocabulary;
    /// a cache's own k with --cache).
    #[arg(long)]
    top_k: Option<i64>,
    /// Weight of the hidden-state MSE (0: off); needs the live teacher.
    #[arg(long, default_value_t = 0.0)]
    hidden_weight: f64,
    /// Weight of the attention-map KL between the blocks producing the paired states (0: off);
    /// dense attention, teacher heads a multiple of the student's; needs the live teacher.
    #[arg(long, default_value_t = 0.0)]
    attention_weight: f64,
    /// Feature pairs STUDENT:TEACHER of residual-stream states (0 = embeddings, i = after block
    /// i), e.g. `1:2,2:4`; default: student state i against teacher state round(i Lt / Ls).
    #[arg(long)]
    layer_map: Option<String>,
    /// `bytes`: a teacher with another (byte-level BPE) tokenizer; logit losses compare next-byte
    /// distributions where both tokenizations end at the same byte. `none` (default): the
    /// tokenizers must share a vocabulary.
    #[arg(long, default_value = "none", value_parser = ["none", "bytes"])]
    align: String,
    /// Student initialisation from a config: random, every:K (teacher blocks 0, K, 2K, ...) or
    /// layers:0,2,4; tensors are cut to the student's leading dimensions when it is narrower.
    #[arg(long, default_value = "random")]
    init: String,
    /// Run directory.
    #[arg(long, required = true)]
    out: Option<PathBuf>,
    /// Length of the run in steps (overrides [train] max_steps).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Continue the run in --out from its newest usable checkpoint (same options).
    #[arg(long)]
    resume: bool,
    /// Override a field of the student's run config, `TABLE.FIELD=VALUE` (as `stlm train --set`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Samples printed from the student at the end (not with --json).
    #[arg(long, default_value_t = 0)]
    samples: usize,
    /// Print one JSON object with the result.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
struct CacheArgs {
    /// Teacher model directory.
    #[arg(long)]
    teacher: PathBuf,
    /// Text files (as `stlm train --data`); the windows cover their training split.
    #[arg(long = "data", required = true)]
    data: Vec<PathBuf>,
    /// Cache directory.
    #[arg(long)]
    out: PathBuf,
    /// Positions per window (students may train on shorter ones).
    #[arg(long, default_value_t = 256)]
    seq_len: i64,
    /// Tokens kept per position.
    #[arg(long, default_value_t = 64)]
    top_k: i64,
    /// Temperature of the stored distributions.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Windows per teacher forward.
    #[arg(long, default_value_t = 16)]
    batch_size: i64,
    /// Stop after this many windows.
    #[arg(long)]
    max_windows: Option<u64>,
    /// Fraction of each file held out for validation (as [data] val_fraction).
    #[arg(long, default_value_t = DataConfig::default().val_fraction)]
    val_fraction: f64,
    /// Seed of the split (as [train] seed).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object with the result.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(a: DistillArgs) -> Result<()> {
    match a.job {
        Some(DistillJob::Cache(c)) => cache(c),
        None => distill(a.run),
    }
}

/// The options of a run, recorded so that `--resume` continues the same run.
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

fn load_student(a: &RunArgs, device: Device) -> Result<Student> {
    let path = a.student.as_deref().expect("clap requires --student");
    if path.is_dir() {
        let model = DeviceArgs { device: a.device.device.clone(), dtype: "float32".into() }.load(path)?;
        let tokenizer = load_tokenizer(None, path)?;
        let mut run = match &a.config {
            Some(c) => RunConfig::load(c, &a.set)?,
            None if !a.set.is_empty() => bail!("--set needs --config when --student is a model directory"),
            None => RunConfig::for_model(model.config.clone()),
        };
        if let Some(steps) = a.max_steps {
            run.set_max_steps(steps)?;
        }
        return Ok(Student { model, train: run.train, data: run.data, tokenizer, text: run.text, pretrained: true });
    }
    if a.config.is_some() {
        bail!("--config is for a student model directory; {} is a run config already", path.display());
    }
    let mut run = RunConfig::load(path, &a.set)?;
    if let Some(steps) = a.max_steps {
        run.set_max_steps(steps)?;
    }
    let tokenizer = match &run.data.tokenizer {
        Some(t) => Tokenizer::from_file(t)?,
        None => Tokenizer::from_file(&teacher_tok_path(a)?)?,
    };
    fill_special_tokens(&mut run.model, &tokenizer);
    if run.model.bytes.is_some() {
        bail!("{}: a byte-pooled student; distillation takes token models", path.display());
    }
    stlm_core::seed_all(run.train.seed);
    let model = DecoderModel::new(run.model.clone(), device)?;
    Ok(Student { model, train: run.train, data: run.data, tokenizer, text: run.text, pretrained: false })
}

/// The teacher's tokenizer.json: the teacher directory's, or with a cache its teacher's.
fn teacher_tok_path(a: &RunArgs) -> Result<PathBuf> {
    let dir = match (&a.teacher, &a.cache) {
        (Some(t), _) => t.clone(),
        (None, Some(c)) => TeacherCache::header(c)?.teacher,
        (None, None) => bail!("--teacher or --cache is needed"),
    };
    stlm_model::tokenizer_path(&dir).with_context(|| format!("{}: the teacher has no tokenizer.json", dir.display()))
}

/// Refuses a student whose vocabulary is not the teacher's, naming the first difference.
fn check_vocabulary(teacher: &Tokenizer, student: &Tokenizer) -> Result<()> {
    if let Some((id, t, s)) = teacher.first_vocab_difference(student) {
        let show = |x: Option<String>| x.map(|t| format!("`{t}`")).unwrap_or_else(|| "nothing".into());
        bail!(
            "the teacher's tokenizer ({} tokens) and the student's ({} tokens) differ: id {id} is {} in the teacher and {} in the student; \
             logit distillation needs a shared vocabulary (train the student with the teacher's tokenizer.json) or --align bytes",
            teacher.vocab_size(),
            student.vocab_size(),
            show(t),
            show(s)
        );
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
}

impl BatchSource for CachedBatches {
    fn train_batch(&self, step: u64, micro: u64) -> stlm_train::Result<Batch> {
        let picks: Vec<i64> = window_picks(self.seed, step, micro, self.batch, self.cache.len()).into_iter().map(|p| p as i64).collect();
        self.cache.train_batch(&picks, self.seq, self.device).map_err(|e| TrainError::Config(e.to_string()))
    }
    fn val_batch(&self, index: u64) -> stlm_train::Result<Batch> {
        self.val.val_batch(index)
    }
    fn target_bytes(&self, targets: &Tensor) -> Option<f64> {
        self.val.target_bytes(targets)
    }
}

/// The corpus tokenized with `tok` (cached under `cache_dir`).
fn corpus(sources: &[Source], tok: &Tokenizer, data: &DataConfig, val_fraction: f64, seed: u64, cache_dir: PathBuf) -> Result<TokenizedCorpus> {
    Ok(tokenize(sources, tok, data, val_fraction, seed, cache_dir, std::io::stderr().is_terminal())?)
}

fn distill(a: RunArgs) -> Result<()> {
    stlm_core::memory::keep_freed_memory();
    let out = a.out.clone().expect("clap requires --out");
    let device = stlm_core::parse_device(&a.device.device)?;
    if a.device.dtype != "float32" {
        bail!("--dtype {}: training runs in float32 for now", a.device.dtype);
    }
    let divergence: Divergence = a.loss.parse()?;
    let init: LayerChoice = a.init.parse()?;
    let cache = a.cache.as_deref().map(TeacherCache::open).transpose()?;
    let teacher_tok = Tokenizer::from_file(&teacher_tok_path(&a)?)?;
    let teacher = a.teacher.as_deref().map(|d| DeviceArgs { device: a.device.device.clone(), dtype: "float32".into() }.load(d)).transpose()?;
    let student = load_student(&a, device)?;
    let align = match (a.align.as_str(), &teacher) {
        ("none", _) => {
            check_vocabulary(&teacher_tok, &student.tokenizer)?;
            None
        }
        (_, None) => bail!("--align bytes needs the live teacher (--teacher, not --cache)"),
        (_, Some(t)) => {
            let (sv, tv) = (student.model.config.vocab_size, t.config.vocab_size);
            Some(stlm_distill::ByteAlignment::new(&student.tokenizer, sv, teacher_tok, tv, t.config.max_position_embeddings, device)?)
        }
    };

    // The logit loss; a cache fixes the temperature and k.
    let (temperature, top_k) = match &cache {
        Some(c) => {
            let h = &c.header;
            if a.temperature.is_some_and(|t| t != h.temperature) || a.top_k.is_some_and(|k| k != h.top_k) {
                bail!("--temperature/--top-k: the cache holds top-{} distributions at temperature {}; drop the options or make a new cache", h.top_k, h.temperature);
            }
            if h.vocab_size != student.model.config.vocab_size {
                bail!("the cache's teacher has vocab_size {} and the student {}", h.vocab_size, student.model.config.vocab_size);
            }
            (h.temperature, Some(h.top_k))
        }
        None => (a.temperature.unwrap_or(1.0), a.top_k),
    };
    let logit = LogitLoss { divergence, temperature, skew: a.skew, top_k };
    logit.validate()?;

    // Student initialisation from the teacher's weights.
    let init_layers = match (&init, &teacher) {
        (LayerChoice::Random, _) => Vec::new(),
        (_, _) if student.pretrained => bail!("--init {}: the student model directory has weights already", a.init),
        (_, None) => bail!("--init {} copies the teacher's weights: give --teacher", a.init),
        (choice, Some(t)) => {
            let layers = choice.teacher_layers(t.layers.len(), student.model.layers.len())?;
            let tv: HashMap<String, Tensor> = t.var_store().variables();
            let sv: Vec<(String, Tensor)> = student.model.var_store().variables().into_iter().collect();
            let cut = copy_from_teacher(&sv, &tv, &layers)?;
            eprintln!("student starts from teacher blocks {layers:?} ({cut} tensors cut to the student's width)");
            layers
        }
    };
    let features = match (a.hidden_weight, a.attention_weight) {
        (0.0, 0.0) if a.layer_map.is_some() => bail!("--layer-map needs --hidden-weight or --attention-weight"),
        (0.0, 0.0) => None,
        (h, w) => {
            let Some(t) = &teacher else {
                bail!("--hidden-weight/--attention-weight need the live teacher (--teacher without --cache)")
            };
            let map = match &a.layer_map {
                Some(spec) => FeatureLoss::parse_map(spec)?,
                None => FeatureLoss::uniform_map(student.model.layers.len(), t.layers.len()),
            };
            Some(FeatureLoss::new(h, w, map, &student.model, t)?)
        }
    };
    let record = Record {
        teacher: a.teacher.clone(),
        cache: a.cache.clone(),
        loss: a.loss.clone(),
        temperature,
        alpha: a.alpha,
        skew: a.skew,
        top_k,
        hidden_weight: a.hidden_weight,
        attention_weight: a.attention_weight,
        layer_map: features.as_ref().map(|f| f.map.clone()).unwrap_or_default(),
        init: a.init.clone(),
        init_layers,
        align: a.align.clone(),
    };
    create_run_dir(&out)?;
    let record_path = out.join(RECORD_FILE);
    if a.resume {
        let saved: Record = stlm_core::read_json(&record_path)?;
        if saved != record {
            bail!("--resume: the options differ from those of the run in {} ({}); pass the same ones", out.display(), record_path.display());
        }
    }

    // Data: the student's tokenizer over --data, or the cache's corpus.
    let progress = std::io::stderr().is_terminal();
    let tok_path = out.join("tokenizer.json");
    student.tokenizer.save(&tok_path)?;
    let (train, seq) = (&student.train, student.train.seq_len);
    let (batches, teacher): (Box<dyn BatchSource>, Teacher) = match (cache, teacher) {
        (Some(cache), _) => {
            let h = &cache.header;
            let sources: Vec<Source> = h.sources.iter().cloned().map(Source::File).collect();
            // Read as `stlm distill cache` read it, so that its tokens are reused.
            let tokens = a.cache.clone().expect("cache given").join("tokens");
            let corpus = corpus(&sources, &student.tokenizer, &DataConfig::default(), h.val_fraction, h.seed, tokens)?;
            let val = TokenBatchSource::new(corpus, &student.tokenizer, train, device)?;
            eprintln!("teacher cache: {} windows of {} positions, top {} at temperature {}", cache.len(), h.seq_len, h.top_k, h.temperature);
            let batches = CachedBatches { cache, val, seed: train.seed, batch: train.batch_size as usize, seq, device };
            (Box::new(batches), Teacher::Cached)
        }
        (None, Some(t)) => {
            let sources = sources(&a.data, &student.data);
            let cache_dir = student.data.cache_dir.clone().unwrap_or_else(|| out.join("tokens"));
            let corpus = corpus(&sources, &student.tokenizer, &student.data, student.data.val_fraction, train.seed, cache_dir)?;
            (Box::new(TokenBatchSource::new(corpus, &student.tokenizer, train, device)?), Teacher::Live(Box::new(t)))
        }
        (None, None) => unreachable!("clap requires --teacher or --cache"),
    };
    let (student_train, student_text) = (student.train.clone(), student.text.clone());
    let distiller = Distiller::new(student.model, teacher, logit, a.alpha, features, align)?;
    eprintln!(
        "distilling into {} parameters with {} (T = {temperature}, alpha = {}{}); run directory {}",
        distiller.num_parameters(),
        divergence.name(),
        a.alpha,
        top_k.map(|k| format!(", top {k}")).unwrap_or_default(),
        out.display()
    );
    stlm_core::atomic_write_bytes(&record_path, serde_json::to_string_pretty(&record)?.as_bytes())?;
    if !student_text.is_empty() {
        stlm_core::atomic_write_bytes(&out.join("config.toml"), student_text.as_bytes())?;
    }
    let control = RunControl { progress: progress && !a.json, stop: ctrl_c()?, ..Default::default() };
    let report = run_training(&distiller, batches.as_ref(), &student_train, &control, &out, a.resume)?;
    if !report.completed {
        return Err(TrainError::Stopped { step: report.step, dir: out.clone() }.into());
    }
    let model_dir = out.join("model");
    distiller.student.save(&model_dir, Some(&tok_path))?;
    eprintln!("saved {}", model_dir.display());
    let last = report.logs.last();
    if a.json {
        return print_json(&serde_json::json!({
            "model": model_dir,
            "steps": report.step,
            "loss": divergence.name(),
            "temperature": temperature,
            "alpha": a.alpha,
            "top_k": top_k,
            "hidden_weight": a.hidden_weight,
            "attention_weight": a.attention_weight,
            "train_loss": last.map(|l| l.loss),
            "val_loss": last.and_then(|l| l.val_loss),
            "val_bpb": last.and_then(|l| l.val_bpb),
            "parameters": distiller.num_parameters(),
        }));
    }
    if let Some(l) = last {
        eprintln!("step {}: loss {:.4}{}", l.step, l.loss, l.val_loss.map(|v| format!(", validation loss {v:.4}")).unwrap_or_default());
    }
    let student = AnyModel::Tokens(Box::new(distiller.student));
    print_samples(&student, &Tokenizer::from_file(&tok_path)?, a.samples, student_train.seed)
}

fn cache(a: CacheArgs) -> Result<()> {
    let teacher = a.device.load(&a.teacher)?;
    let tok = load_tokenizer(None, &a.teacher)?;
    let (seq, k) = (a.seq_len, a.top_k);
    if seq < 1 || seq > teacher.config.max_position_embeddings {
        bail!("--seq-len {seq}: must be in 1..={} (the teacher's max_position_embeddings)", teacher.config.max_position_embeddings);
    }
    if k < 1 || k >= teacher.config.vocab_size {
        bail!("--top-k {k}: must be in 1..{} (the vocabulary)", teacher.config.vocab_size);
    }
    if a.batch_size < 1 {
        bail!("--batch-size {}: must be at least 1", a.batch_size);
    }
    let loss = LogitLoss { divergence: Divergence::ForwardKl, temperature: a.temperature, skew: 0.1, top_k: Some(k) };
    loss.validate()?;
    let sources: Vec<Source> = a.data.iter().cloned().map(Source::File).collect();
    let corpus = corpus(&sources, &tok, &DataConfig::default(), a.val_fraction, a.seed, a.out.join("tokens"))?;
    // Disjoint windows of seq + 1 ids (each sharing its last id with the next window's first),
    // so every training token is a target once.
    let mut windows: Vec<(usize, usize)> = Vec::new();
    for (i, shard) in corpus.shards.iter().enumerate() {
        let len = shard.train.len();
        windows.extend((0..).map(|w| w * seq as usize).take_while(|&s| s + (seq as usize) < len).map(|s| (i, s)));
    }
    windows.truncate(a.max_windows.unwrap_or(u64::MAX).min(windows.len() as u64) as usize);
    if windows.is_empty() {
        bail!("the training split has no window of {} tokens; give more data or a shorter --seq-len", seq + 1);
    }
    let started = std::time::Instant::now();
    let bar = if std::io::stderr().is_terminal() && !a.json { ProgressBar::new(windows.len() as u64) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} windows [{elapsed_precise}<{eta_precise}]").expect("valid template"));
    let mut writer = CacheWriter::new(&a.out, 4096)?;
    let mut ids = Vec::new();
    let _guard = tch::no_grad_guard();
    for chunk in windows.chunks(a.batch_size as usize) {
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
    let header = writer.finish(CacheHeader {
        teacher: a.teacher.clone(),
        seq_len: seq,
        top_k: k,
        temperature: a.temperature,
        vocab_size: teacher.config.vocab_size,
        windows: 0,
        sources: a.data.clone(),
        val_fraction: a.val_fraction,
        seed: a.seed,
        files: Vec::new(),
    })?;
    let secs = started.elapsed().as_secs_f64();
    let tokens = header.windows * seq as u64;
    eprintln!("cached {} windows ({tokens} positions, top {k}) in {secs:.1} s into {}", header.windows, a.out.display());
    if a.json {
        print_json(&serde_json::json!({ "out": a.out, "windows": header.windows, "positions": tokens, "top_k": k, "temperature": a.temperature, "seconds": secs }))?;
    }
    Ok(())
}
