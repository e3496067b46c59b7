//! The jobs of `stlm weightgen`: a collection gathered from continued training and other runs,
//! sampled weights written as model directories, and the comparison of every family of
//! candidates (see [`crate::compare`]) with each family's choice.

use crate::collect::{self, set_units, snapshot};
use crate::collection::{Collection, Unit};
use crate::compare::{self, best_on_validation, Base, Candidate, EvalSplits, Family, Neighbours, Row, SelectBy};
use crate::{Result, Sampler, WeightGen, WeightgenError};
use serde::Serialize;
use std::path::{Path, PathBuf};
use stlm_eval::tasks::{Doc, Task};
use stlm_model::{tokenizer_path, AnyModel};
use stlm_tokenizers::Tokenizer;
use tch::Tensor;

/// Where a collection's checkpoints come from; as `stlm weightgen collect` takes it.
#[derive(Debug, Clone, clap::Args)]
pub struct CollectOptions {
    /// The trained model directory every generated model starts from (its other weights are kept).
    #[arg(long)]
    pub model: PathBuf,
    /// Which parameters: comma-separated patterns (`norm`, `last`, name segments such as
    /// `layers.3.mlp`, `*` for one segment).
    #[arg(long)]
    pub layers: String,
    /// Run directories (every checkpoint) or model directories (fine-tunes, other seeds) of the
    /// same architecture to add; repeatable.
    #[arg(long, num_args = 1..)]
    pub runs: Vec<PathBuf>,
    /// p-diff's protocol: train only the selected layers of --model for this many steps (0: none).
    #[arg(long, default_value_t = 0)]
    pub steps: u64,
    /// With --steps: keep the weights every this many steps.
    #[arg(long, default_value_t = 1)]
    pub every: u64,
    /// With --steps: constant learning rate (p-diff trains on at a small one).
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// With --steps: the run config whose [train] and [data] tables give batch size, window,
    /// clipping and how to read the data (e.g. the base run's config.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// With --steps: override a config field, TABLE.FIELD=VALUE; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// With --steps: training text files (default: the built-in stories); repeatable.
    #[arg(long = "data")]
    pub data: Vec<PathBuf>,
    /// With --steps: seed of the data order (another than the base run's, so the batches differ).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Gathers the selected units of `o.model` from `o.runs` and from `o.steps` steps of continued
/// training of only those units (its run directory is `out/run`); saves the collection in `out`.
pub fn collect_job(o: &CollectOptions, out: &Path, device: tch::Device, control: stlm_train::trainer::RunControl) -> Result<Collection> {
    if o.steps == 0 && o.runs.is_empty() {
        return Err(WeightgenError::Input("nothing to collect: give steps of continued training and/or runs".into()));
    }
    let selector = crate::LayerSelector::parse(&o.layers)?;
    let base = stlm_model::load_any_model(&o.model, device, stlm_core::DType::Float32)?;
    let units = collect::model_units(base.as_lm(), &selector)?;
    let values: i64 = units.iter().map(|u| u.numel()).sum();
    eprintln!("selected {} parameters ({values} values) of {}", units.len(), o.model.display());
    let mut coll = Collection::new(o.model.clone(), o.layers.clone(), units);
    if !o.runs.is_empty() {
        collect::from_runs(base.as_lm(), &o.runs, &mut coll, control.progress)?;
        eprintln!("{} checkpoints from the runs", coll.len());
    }
    drop(base);
    if o.steps > 0 {
        let Some(config) = &o.config else {
            return Err(WeightgenError::Input("continued training needs the run config whose [train] table gives batch size and window (e.g. the base run's config.toml)".into()));
        };
        let mut run = stlm_train::run::RunConfig::load(config, &o.set)?;
        run.train.seed = o.seed;
        let progress = control.progress;
        let inputs = stlm_train::run::RunInputs { data: o.data.clone(), out: out.join("run"), resume: false, init: Some(o.model.clone()), device, control };
        let prepared = stlm_train::run::prepare(run, inputs)?;
        let t = &prepared.config.train;
        let adamw = stlm_train::optim::AdamWConfig { weight_decay: 0.0, ..t.adamw() };
        let opts = collect::ContinueOptions { steps: o.steps, every: o.every, lr: o.lr, grad_clip: t.grad_clip, grad_accum: t.grad_accum, first_batch: 0, adamw };
        let before = coll.len();
        let losses = collect::continue_training(prepared.model.as_lm(), &prepared.batches, &opts, &mut coll, progress)?;
        let (first, last) = (losses.first().copied().unwrap_or(f64::NAN), losses.last().copied().unwrap_or(f64::NAN));
        eprintln!("continued training: {} steps, loss {first:.4} -> {last:.4}; {} checkpoints kept", losses.len(), coll.len() - before);
    }
    coll.save(out)?;
    Ok(coll)
}

/// One sampled model directory.
#[derive(Debug, Clone, Serialize)]
pub struct Sampled {
    /// The model directory (`OUT/sample-NNN`).
    pub dir: PathBuf,
    /// The training checkpoint nearest to the sample (when the collection could be read).
    pub nearest_checkpoint: Option<usize>,
    /// Its L2 distance to the sample.
    pub distance_to_nearest: Option<f64>,
}

/// Which sampler (its settings are [`SampleOptions`]' other fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SamplerKind {
    /// Deterministic DDIM over `ddim_steps` evenly spaced steps.
    Ddim,
    /// Ancestral DDPM over all T steps.
    Ddpm,
}

/// How many models to sample and how; as `stlm weightgen sample` takes it.
#[derive(Debug, Clone, clap::Args)]
pub struct SampleOptions {
    /// Number of models to sample.
    #[arg(long)]
    pub n: usize,
    /// `ddim` (deterministic, --ddim-steps) or `ddpm` (ancestral, all T steps).
    #[arg(long, value_enum, default_value = "ddim")]
    pub sampler: SamplerKind,
    /// DDIM steps.
    #[arg(long, default_value_t = 100)]
    pub ddim_steps: usize,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Samples `o.n` models from the generator in `generator`: each written into its base model
/// (from its collection) and saved as `out/sample-NNN` with `weightgen_sample.json` (generator,
/// seed, sampler, nearest training checkpoint and distance, when the collection can be read).
pub fn sample_job(generator: &Path, o: &SampleOptions, out: &Path, device: tch::Device) -> Result<Vec<Sampled>> {
    if o.n == 0 {
        return Err(WeightgenError::Input("n = 0: sample at least one model".into()));
    }
    let g = WeightGen::load(generator, device)?;
    let base_dir = &g.file.manifest.base_model;
    let base = stlm_model::load_any_model(base_dir, device, stlm_core::DType::Float32)
        .map_err(|e| WeightgenError::Input(format!("the generator's base model {} (from its collection): {e}", base_dir.display())))?;
    // Distances to the training weights need the collection; without it the samples are still written.
    let neighbours = match Collection::load(&g.file.collection) {
        Ok(c) => Some(Neighbours::new(&c)),
        Err(e) => {
            eprintln!("warning: no distances to the training weights: the generator's collection: {e}");
            None
        }
    };
    let sampler = match o.sampler {
        SamplerKind::Ddpm => Sampler::Ddpm,
        SamplerKind::Ddim => Sampler::Ddim(o.ddim_steps),
    };
    let samples = g.sample(o.n as i64, sampler, o.seed)?;
    let tokenizer = tokenizer_path(base_dir);
    let units = &g.file.manifest.units;
    let mut written = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        let dir = out.join(format!("sample-{i:03}"));
        set_units(base.as_lm(), units, s)?;
        base.as_lm().save(&dir, tokenizer.as_deref())?;
        let nearest = neighbours.as_ref().map(|n| n.nearest(s));
        let info = serde_json::json!({
            "generator": generator,
            "index": i, "seed": o.seed, "sampler": sampler.name(),
            "nearest_checkpoint": nearest.map(|n| n.0), "distance_to_nearest": nearest.map(|n| n.1),
        });
        let path = dir.join("weightgen_sample.json");
        let json = serde_json::to_string_pretty(&info).map_err(|e| WeightgenError::Input(format!("{}: {e}", path.display())))?;
        stlm_core::atomic_write_bytes(&path, json.as_bytes())?;
        written.push(Sampled { dir, nearest_checkpoint: nearest.map(|n| n.0), distance_to_nearest: nearest.map(|n| n.1) });
    }
    Ok(written)
}

/// The selected weights of every `sample-*` model directory under `dir`, in name order, read
/// through `model` (whose selected units are overwritten).
pub fn read_samples(model: &AnyModel, units: &[Unit], dir: &Path) -> Result<Vec<(String, Vec<Tensor>)>> {
    let entries = std::fs::read_dir(dir).map_err(|e| stlm_core::CoreError::io(dir, e))?;
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("sample-")) && p.join("model.safetensors").is_file())
        .collect();
    dirs.sort();
    if dirs.is_empty() {
        return Err(WeightgenError::Input(format!("{}: no sample-*/model.safetensors (made by `stlm weightgen sample`)", dir.display())));
    }
    let mut out = Vec::new();
    for d in dirs {
        model.as_lm().load_weights(&d.join("model.safetensors"))?;
        let name = d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        out.push((name, snapshot(model.as_lm(), units)?));
    }
    Ok(out)
}

/// How the comparison chooses; as `stlm weightgen compare` takes it.
#[derive(Debug, Clone, clap::Args)]
pub struct CompareOptions {
    /// Noise samples and training checkpoints compared (default: as many as the diffusion samples).
    #[arg(long)]
    pub budget: Option<usize>,
    /// What each family's best is chosen by on the validation split: `loss`, or `benchmark`
    /// (accuracy on the validation items of the task; ties go to the lower loss).
    #[arg(long, value_enum, default_value = "loss")]
    pub select_by: SelectBy,
    /// Seed of the noise baseline.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Shows a progress bar.
    #[arg(skip)]
    pub progress: bool,
}

/// The comparison's result: every row and each family's choice.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// Training checkpoints in the collection.
    pub checkpoints: usize,
    /// Their mean spacing (L2 between consecutive ones).
    pub checkpoint_spacing: f64,
    /// Candidates per compared family.
    pub budget: usize,
    /// What each family's best was chosen by.
    pub select_by: SelectBy,
    /// The noise baseline's scale per selected layer.
    pub noise_scale: Vec<f64>,
    /// Each family's best on validation, in family order.
    pub chosen: Vec<Row>,
    /// Every candidate scored.
    pub rows: Vec<Row>,
}

/// Scores the original weights, the diffusion samples in `samples_dir`, noise of matched scale,
/// the uniform soup, evenly spaced training checkpoints and the checkpoint nearest to the chosen
/// sample, all in `model` (the collection's base model, restored afterwards), on `text`'s
/// validation and test halves (and `task`'s items); each family's best is chosen on validation.
pub fn compare_families(
    model: &AnyModel,
    tok: &Tokenizer,
    collection: &Collection,
    samples_dir: &Path,
    text: &str,
    task: Option<(Task, Vec<Doc>)>,
    opts: &CompareOptions,
) -> Result<Comparison> {
    let AnyModel::Tokens(decoder) = model else {
        return Err(WeightgenError::Input("a byte-pooled base model; the comparison scores token models".into()));
    };
    if opts.select_by == SelectBy::Benchmark && task.is_none() {
        return Err(WeightgenError::Input("choosing by benchmark needs a benchmark task and its data".into()));
    }
    let units = collection.manifest.units.clone();
    let original = snapshot(model.as_lm(), &units)?;
    let samples = read_samples(model, &units, samples_dir)?;
    set_units(model.as_lm(), &units, &original)?;
    let splits = EvalSplits::new(decoder, tok, text, task)?;
    let budget = opts.budget.unwrap_or(samples.len()).max(1);
    let neighbours = Neighbours::new(collection);
    let base = Base { model, tok, units: &units, original: &original };

    let mut candidates = vec![Candidate { label: "original".into(), family: Family::Original, weights: copies(&original) }];
    let sample_weights: Vec<Vec<Tensor>> = samples.iter().map(|(_, w)| copies(w)).collect();
    let scale = compare::perturbation_scale(&original, &sample_weights);
    for (name, w) in samples {
        candidates.push(Candidate { label: format!("diffusion {name}"), family: Family::Diffusion, weights: w });
    }
    for (i, w) in compare::matched_noise(&original, &scale, budget, opts.seed).into_iter().enumerate() {
        candidates.push(Candidate { label: format!("noise {i:03}"), family: Family::Noise, weights: w });
    }
    candidates.push(Candidate { label: "uniform soup".into(), family: Family::Soup, weights: compare::soup(collection) });
    let k = collection.len();
    let mut picks: Vec<usize> = (0..budget.min(k)).map(|i| if budget >= k { i } else { i * (k - 1) / (budget - 1).max(1) }).collect();
    picks.dedup();
    for i in picks {
        let step = collection.manifest.checkpoints[i].step.map(|s| format!(" (step {s})")).unwrap_or_default();
        candidates.push(Candidate { label: format!("checkpoint {i}{step}"), family: Family::Checkpoint, weights: collection.checkpoint(i) });
    }
    let mut rows = compare::score_all(&base, &neighbours, &candidates, &splits, opts.progress)?;
    // The training checkpoint nearest to the chosen diffusion sample.
    if let Some((i, label)) = best_on_validation(&rows, Family::Diffusion, opts.select_by).map(|b| (b.nearest_checkpoint, b.label.clone())) {
        let c = Candidate { label: format!("nearest to {label}: checkpoint {i}"), family: Family::Nearest, weights: collection.checkpoint(i) };
        rows.extend(compare::score_all(&base, &neighbours, &[c], &splits, false)?);
    }
    let chosen = [Family::Original, Family::Diffusion, Family::Noise, Family::Soup, Family::Checkpoint, Family::Nearest]
        .into_iter()
        .filter_map(|f| best_on_validation(&rows, f, opts.select_by).cloned())
        .collect();
    Ok(Comparison { checkpoints: k, checkpoint_spacing: neighbours.spacing(), budget, select_by: opts.select_by, noise_scale: scale, chosen, rows })
}

fn copies(weights: &[Tensor]) -> Vec<Tensor> {
    weights.iter().map(Tensor::shallow_clone).collect()
}

/// The markdown table of each family's choice (`task`: the benchmark's name).
pub fn table(rows: &[Row], task: Option<&str>) -> String {
    let task = task.unwrap_or("benchmark");
    let mut s = format!(
        "| candidate (chosen on validation) | val loss | test loss | test bits/byte | {task} val acc | {task} test acc | distance to nearest training weights | relative to checkpoint spacing | distance to original |\n|---|---|---|---|---|---|---|---|---|\n"
    );
    let acc = |v: Option<f64>| v.map(|v| format!("{:.2}", 100.0 * v)).unwrap_or_else(|| "-".into());
    for r in rows {
        s.push_str(&format!(
            "| {} | {:.4} | {:.4} | {:.4} | {} | {} | {:.4} | {:.2} | {:.4} |\n",
            r.label,
            r.scores.val_loss,
            r.scores.test_loss,
            r.scores.test_bits_per_byte,
            acc(r.scores.val_acc),
            acc(r.scores.test_acc),
            r.distance_to_nearest,
            r.relative_distance,
            r.distance_to_original
        ));
    }
    s
}

/// Every row as CSV (a header line, then one record per row).
pub fn csv(rows: &[Row]) -> Result<String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let err = |e: csv::Error| WeightgenError::Input(format!("CSV: {e}"));
    w.write_record([
        "label", "family", "val_loss", "test_loss", "test_bits_per_byte", "val_acc", "test_acc", "distance_to_nearest", "relative_distance",
        "distance_to_original", "nearest_checkpoint",
    ])
    .map_err(err)?;
    let opt = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    for r in rows {
        w.write_record([
            r.label.clone(),
            r.family.name().to_string(),
            r.scores.val_loss.to_string(),
            r.scores.test_loss.to_string(),
            r.scores.test_bits_per_byte.to_string(),
            opt(r.scores.val_acc),
            opt(r.scores.test_acc),
            r.distance_to_nearest.to_string(),
            r.relative_distance.to_string(),
            r.distance_to_original.to_string(),
            r.nearest_checkpoint.to_string(),
        ])
        .map_err(err)?;
    }
    let bytes = w.into_inner().map_err(|e| WeightgenError::Input(format!("CSV: {e}")))?;
    String::from_utf8(bytes).map_err(|e| WeightgenError::Input(format!("CSV: {e}")))
}
