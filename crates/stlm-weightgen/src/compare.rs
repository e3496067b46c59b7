//! The honest comparison: every candidate set of weights for the selected layers (the original,
//! diffusion samples, Gaussian noise of matched scale, the uniform soup of the training
//! checkpoints, training checkpoints) is scored on a validation split and a separate test split;
//! each family's best is chosen on validation only, at the same selection budget, and reported on
//! test, with its distance to the nearest training weights.

use crate::collect::{bar, set_units, tick};
use crate::collection::{Collection, Unit};
use crate::{Result, WeightgenError};
use serde::Serialize;
use stlm_eval::score::scorer;
use stlm_eval::tasks::{evaluate, Doc, Task, TaskOptions};
use stlm_eval::{perplexity, WindowOptions};
use stlm_model::{AnyModel, DecoderModel};
use stlm_tokenizers::Tokenizer;
use tch::{Kind, Tensor};

/// The families of candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// The base model's own weights.
    Original,
    /// Sampled by the diffusion model.
    Diffusion,
    /// The original plus Gaussian noise of the diffusion samples' scale.
    Noise,
    /// The mean of all training checkpoints (uniform soup).
    Soup,
    /// Training checkpoints (evenly spaced over the collection).
    Checkpoint,
    /// The training checkpoint nearest to the chosen diffusion sample.
    Nearest,
}

impl Family {
    /// The family's name in JSON and CSV (`original`, `diffusion`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Family::Original => "original",
            Family::Diffusion => "diffusion",
            Family::Noise => "noise",
            Family::Soup => "soup",
            Family::Checkpoint => "checkpoint",
            Family::Nearest => "nearest",
        }
    }
}

/// One candidate: a label, its family and the selected layers' weights (unit order).
pub struct Candidate {
    /// Name in tables (`diffusion-003`, `checkpoint k=40`).
    pub label: String,
    /// Its family.
    pub family: Family,
    /// The weights, one tensor per unit.
    pub weights: Vec<Tensor>,
}

/// The mean of every checkpoint: the uniform soup.
pub fn soup(collection: &Collection) -> Vec<Tensor> {
    collection
        .weights
        .iter()
        .zip(&collection.manifest.units)
        .map(|(w, u)| w.mean_dim(0, false, Kind::Float).view(u.shape.as_slice()))
        .collect()
}

/// Root mean square difference per unit between each sample and `original`, averaged over the
/// samples: the scale the noise baseline is matched to.
pub fn perturbation_scale(original: &[Tensor], samples: &[Vec<Tensor>]) -> Vec<f64> {
    original
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let n = samples.len().max(1) as f64;
            samples.iter().map(|s| (&s[i] - o).square().mean(Kind::Double).sqrt().double_value(&[])).sum::<f64>() / n
        })
        .collect()
}

/// `n` copies of `original` with Gaussian noise of standard deviation `scale[i]` on unit i.
pub fn matched_noise(original: &[Tensor], scale: &[f64], n: usize, seed: u64) -> Vec<Vec<Tensor>> {
    tch::manual_seed(seed as i64);
    (0..n).map(|_| original.iter().zip(scale).map(|(o, s)| o + o.randn_like() * *s).collect()).collect()
}

/// Flat vector of a set of unit weights.
pub fn flatten(weights: &[Tensor]) -> Tensor {
    Tensor::cat(
        &weights.iter().map(|t| t.reshape([-1]).to_kind(Kind::Float).to_device(tch::Device::Cpu)).collect::<Vec<_>>(),
        0,
    )
}

/// The training checkpoints as one matrix, built once, for distances: the nearest checkpoint to
/// a set of weights, and the checkpoints' own spacing.
pub struct Neighbours {
    /// `[K, D]`: every checkpoint's selected values.
    matrix: Tensor,
    /// Mean distance from each checkpoint to its nearest other one (0 for a collection of one).
    spacing: f64,
}

impl Neighbours {
    /// The checkpoints of `collection`.
    pub fn new(collection: &Collection) -> Self {
        let matrix = collection.matrix();
        let spacing = spacing(&matrix);
        Neighbours { matrix, spacing }
    }

    /// The training checkpoint nearest to `weights` (L2 over every selected value): its index and
    /// the distance.
    pub fn nearest(&self, weights: &[Tensor]) -> (usize, f64) {
        let x = flatten(weights);
        let d = (&self.matrix - x.unsqueeze(0)).square().sum_dim_intlist(1, false, Kind::Double).sqrt();
        let i = d.argmin(0, false).int64_value(&[]) as usize;
        (i, d.double_value(&[i as i64]))
    }

    /// Mean distance from each training checkpoint to its nearest other one: the scale against
    /// which "close to the training weights" is judged.
    pub fn spacing(&self) -> f64 {
        self.spacing
    }
}

/// Mean nearest-neighbour distance between the rows of `matrix` `[K, D]`.
fn spacing(matrix: &Tensor) -> f64 {
    let m = matrix.to_kind(Kind::Double);
    let k = m.size()[0];
    if k < 2 {
        return 0.0;
    }
    // |a - b|^2 = |a|^2 + |b|^2 - 2 a.b, in float64, without a [K, K, D] difference tensor.
    let m = &m - m.mean_dim(0, true, Kind::Double);
    let sq = m.square().sum_dim_intlist(1, false, Kind::Double);
    let d2 = sq.unsqueeze(1) + sq.unsqueeze(0) - m.matmul(&m.tr()) * 2.0;
    let diagonal = Tensor::eye(k, (Kind::Double, tch::Device::Cpu)).gt(0.5);
    let d = d2.clamp_min(0.0).sqrt().masked_fill(&diagonal, f64::INFINITY);
    d.min_dim(1, false).0.mean(Kind::Double).double_value(&[])
}

/// The text and benchmark items candidates are scored on: disjoint validation and test parts.
pub struct EvalSplits {
    /// Validation ids (starting with the model's BOS) and the text's bytes.
    pub val: (Vec<i64>, u64),
    /// Test ids and bytes.
    pub test: (Vec<i64>, u64),
    /// A benchmark: its task and its items for validation and for test.
    pub task: Option<(Task, Vec<Doc>, Vec<Doc>)>,
    /// Window of the loss computation.
    pub window: WindowOptions,
}

impl EvalSplits {
    /// Splits `text` into documents (at blank lines or `<|endoftext|>`), the first half for
    /// validation and the rest for test; a benchmark's items alternate (even: validation, odd:
    /// test). Errors when a split would be empty.
    pub fn new(model: &DecoderModel, tok: &Tokenizer, text: &str, task: Option<(Task, Vec<Doc>)>) -> Result<Self> {
        let docs: Vec<&str> = text
            .split("<|endoftext|>")
            .flat_map(|d| d.split("\n\n"))
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .collect();
        if docs.len() < 2 {
            return Err(WeightgenError::Input(format!(
                "the evaluation text has {} document(s); it needs two or more to split into validation and test",
                docs.len()
            )));
        }
        let half = docs.len() / 2;
        let ids = |part: &[&str]| -> Result<(Vec<i64>, u64)> {
            let joined = part.join("\n\n");
            Ok((stlm_eval::scored_ids(model, tok, &joined)?, joined.len() as u64))
        };
        let max_length = model.config.max_position_embeddings.min(1024);
        let task = match task {
            Some((t, items)) if items.len() >= 2 => {
                let (mut v, mut te) = (Vec::new(), Vec::new());
                for (i, d) in items.into_iter().enumerate() {
                    if i % 2 == 0 {
                        v.push(d)
                    } else {
                        te.push(d)
                    }
                }
                Some((t, v, te))
            }
            Some((t, items)) => {
                return Err(WeightgenError::Input(format!(
                    "{}: {} item(s); at least two are needed",
                    t.name(),
                    items.len()
                )))
            }
            None => None,
        };
        Ok(EvalSplits {
            val: ids(&docs[..half])?,
            test: ids(&docs[half..])?,
            task,
            window: WindowOptions { max_length, stride: max_length },
        })
    }
}

/// A candidate's scores.
#[derive(Debug, Clone, Serialize)]
pub struct Scores {
    /// Validation loss (nats per token).
    pub val_loss: f64,
    /// Test loss.
    pub test_loss: f64,
    /// Test bits per byte.
    pub test_bits_per_byte: f64,
    /// Benchmark accuracy on the validation items.
    pub val_acc: Option<f64>,
    /// Benchmark accuracy on the test items.
    pub test_acc: Option<f64>,
}

/// The base model every candidate is scored in: its tokenizer, the selected units and their
/// original values.
pub struct Base<'a> {
    /// The loaded base model (its selected units are overwritten while scoring).
    pub model: &'a AnyModel,
    /// Its tokenizer.
    pub tok: &'a Tokenizer,
    /// The selected parameters.
    pub units: &'a [Unit],
    /// Their original values, in unit order.
    pub original: &'a [Tensor],
}

/// Scores `weights` (written into the base model's selected units) on `splits`.
pub fn score(base: &Base, weights: &[Tensor], splits: &EvalSplits) -> Result<Scores> {
    let (model, tok, units) = (base.model, base.tok, base.units);
    let AnyModel::Tokens(m) = model else {
        return Err(WeightgenError::Input(
            "weight generation compares token models (a byte-pooled base model is not supported)".into(),
        ));
    };
    set_units(model.as_lm(), units, weights)?;
    let val = perplexity(m, &splits.val.0, splits.val.1, splits.window, false)?;
    let test = perplexity(m, &splits.test.0, splits.test.1, splits.window, false)?;
    let (mut val_acc, mut test_acc) = (None, None);
    if let Some((task, v, t)) = &splits.task {
        let s = scorer(model, tok, None, 8192)?;
        let hidden = indicatif::ProgressBar::hidden();
        val_acc = Some(evaluate(*task, v, s.as_ref(), &TaskOptions::default(), &hidden)?.0.acc);
        test_acc = Some(evaluate(*task, t, s.as_ref(), &TaskOptions::default(), &hidden)?.0.acc);
    }
    Ok(Scores { val_loss: val.loss, test_loss: test.loss, test_bits_per_byte: test.bits_per_byte, val_acc, test_acc })
}

/// One row of the report: a candidate's scores and where it lies.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Candidate label.
    pub label: String,
    /// Its family.
    pub family: Family,
    /// Scores.
    pub scores: Scores,
    /// L2 distance (over the selected values) to the nearest training checkpoint.
    pub distance_to_nearest: f64,
    /// That distance divided by the mean spacing of the training checkpoints.
    pub relative_distance: f64,
    /// L2 distance to the original weights.
    pub distance_to_original: f64,
    /// Index of the nearest training checkpoint.
    pub nearest_checkpoint: usize,
}

/// Scores every candidate in `base` (progress on stderr) and returns the rows in the given order;
/// the base model holds its original values again afterwards.
pub fn score_all(
    base: &Base,
    neighbours: &Neighbours,
    candidates: &[Candidate],
    splits: &EvalSplits,
    progress: bool,
) -> Result<Vec<Row>> {
    let spacing = neighbours.spacing();
    let orig = flatten(base.original);
    let bar = bar(candidates.len() as u64, progress, "candidates scored");
    let mut rows = Vec::with_capacity(candidates.len());
    for c in candidates {
        let scores = score(base, &c.weights, splits)?;
        let (k, d) = neighbours.nearest(&c.weights);
        let to_orig = (flatten(&c.weights) - &orig).square().sum(Kind::Double).sqrt().double_value(&[]);
        rows.push(Row {
            label: c.label.clone(),
            family: c.family,
            scores,
            distance_to_nearest: d,
            relative_distance: if spacing > 0.0 { d / spacing } else { f64::NAN },
            distance_to_original: to_orig,
            nearest_checkpoint: k,
        });
        tick(&bar, c.label.clone());
    }
    bar.finish_and_clear();
    set_units(base.model.as_lm(), base.units, base.original)?;
    Ok(rows)
}

/// What a family's best candidate is chosen by, on the validation split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum SelectBy {
    /// The lowest validation loss.
    Loss,
    /// The highest benchmark accuracy on the validation items (ties: the lower validation loss).
    Benchmark,
}

/// The row of `family` that `by` ranks best on validation (ties: the first).
pub fn best_on_validation(rows: &[Row], family: Family, by: SelectBy) -> Option<&Row> {
    let key = |r: &Row| match by {
        SelectBy::Loss => (0.0, r.scores.val_loss),
        SelectBy::Benchmark => (-r.scores.val_acc.unwrap_or(f64::NEG_INFINITY), r.scores.val_loss),
    };
    rows.iter().filter(|r| r.family == family).min_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        ka.0.total_cmp(&kb.0).then(ka.1.total_cmp(&kb.1))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collection::CheckpointInfo;

    fn line(k: usize) -> Collection {
        let mut c = Collection::new("b".into(), "x".into(), vec![Unit::new("model.norm.weight", vec![2])]);
        for i in 0..k {
            c.push(CheckpointInfo { source: "t".into(), step: None }, &[Tensor::from_slice(&[i as f32, 0.0])]).unwrap();
        }
        c
    }

    fn row(label: &str, family: Family, val_loss: f64, val_acc: Option<f64>) -> Row {
        let scores = Scores { val_loss, test_loss: 0.0, test_bits_per_byte: 0.0, val_acc, test_acc: None };
        Row { label: label.into(), family, scores, distance_to_nearest: 0.0, relative_distance: 0.0, distance_to_original: 0.0, nearest_checkpoint: 0 }
    }

    #[test]
    fn selection_by_loss_or_benchmark() {
        let rows = [
            row("a", Family::Diffusion, 3.0, Some(0.5)),
            row("b", Family::Diffusion, 2.9, Some(0.4)),
            row("c", Family::Diffusion, 3.1, Some(0.5)),
            row("n", Family::Noise, 1.0, Some(0.9)),
        ];
        assert_eq!(best_on_validation(&rows, Family::Diffusion, SelectBy::Loss).unwrap().label, "b");
        // Equal accuracy: the lower loss wins.
        assert_eq!(best_on_validation(&rows, Family::Diffusion, SelectBy::Benchmark).unwrap().label, "a");
        assert!(best_on_validation(&rows, Family::Soup, SelectBy::Loss).is_none());
    }

    #[test]
    fn distances_soup_and_noise() {
        let _rng = crate::rng_lock();
        let c = line(4); // points (0,0), (1,0), (2,0), (3,0)
        let n = Neighbours::new(&c);
        assert!((n.spacing() - 1.0).abs() < 1e-9);
        let (i, d) = n.nearest(&[Tensor::from_slice(&[2.2f32, 0.0])]);
        assert_eq!(i, 2);
        assert!((d - 0.2).abs() < 1e-6);
        assert!(soup(&c)[0].allclose(&Tensor::from_slice(&[1.5f32, 0.0]), 1e-6, 1e-6, false));
        let original = vec![Tensor::zeros([1000], (Kind::Float, tch::Device::Cpu))];
        let samples = vec![vec![Tensor::ones([1000], (Kind::Float, tch::Device::Cpu)) * 0.5]];
        let scale = perturbation_scale(&original, &samples);
        assert!((scale[0] - 0.5).abs() < 1e-9);
        let noisy = matched_noise(&original, &scale, 2, 0);
        let rms = noisy[1][0].square().mean(Kind::Double).sqrt().double_value(&[]);
        assert!((rms - 0.5).abs() < 0.05, "{rms}");
    }
}
