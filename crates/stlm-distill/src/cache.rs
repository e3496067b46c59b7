//! A teacher cache (`stlm distill cache`): the teacher's top-k next-token distributions over
//! fixed windows of a corpus, so that many students train without running the teacher.
//!
//! A cache directory holds `teacher.json` (the header, written last: a directory without it is
//! incomplete) and `logits-NNNNN.safetensors` files, each with `input_ids` `[n, seq + 1]` (int32),
//! `topk_ids` `[n, seq, k]` (int32), `topk_logits` `[n, seq, k]` (float16, `z / T`) and
//! `rest_logsumexp` `[n, seq]` (float32, of `z / T` over the other tokens). A window's targets at
//! position t depend only on its first t + 1 tokens, so a student may train on any prefix length.

use crate::loss::TeacherTargets;
use crate::{DistillError, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use stlm_model::Batch;
use stlm_core::{atomic_write_bytes, read_json, read_safetensors, write_safetensors, CoreError};
use tch::{Device, Kind, Tensor};

/// Name of the header file.
pub const CACHE_HEADER: &str = "teacher.json";

/// The header of a cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheHeader {
    /// The teacher model directory, as given.
    pub teacher: PathBuf,
    /// Positions per window (each window holds `seq_len + 1` ids).
    pub seq_len: i64,
    /// Tokens kept per position.
    pub top_k: i64,
    /// Temperature the distributions were taken at.
    pub temperature: f64,
    /// The teacher's vocabulary width.
    pub vocab_size: i64,
    /// Windows in the cache.
    pub windows: u64,
    /// The data files, in order, whose training split the windows cover.
    pub sources: Vec<PathBuf>,
    /// Fraction of each file held out for validation, as tokenized.
    pub val_fraction: f64,
    /// Seed of the split.
    pub seed: u64,
    /// The weight files and how many windows each holds.
    pub files: Vec<(String, u64)>,
}

/// Writes a cache window batch by window batch, one file per `per_file` windows.
pub struct CacheWriter {
    dir: PathBuf,
    per_file: u64,
    pending: Vec<[Tensor; 4]>,
    pending_windows: u64,
    files: Vec<(String, u64)>,
}

impl CacheWriter {
    /// Starts a cache in `dir`, removing the header of an earlier one first, so that the
    /// directory reads as incomplete until [`CacheWriter::finish`].
    pub fn new(dir: &Path, per_file: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| CoreError::io(dir, e))?;
        let header = dir.join(CACHE_HEADER);
        if header.exists() {
            std::fs::remove_file(&header).map_err(|e| CoreError::io(&header, e))?;
        }
        Ok(CacheWriter { dir: dir.to_path_buf(), per_file: per_file.max(1), pending: Vec::new(), pending_windows: 0, files: Vec::new() })
    }

    /// Adds windows `inputs` `[n, seq + 1]` with the teacher's top-k `targets` of their first
    /// `seq` positions.
    pub fn push(&mut self, inputs: &Tensor, targets: &TeacherTargets) -> Result<()> {
        let TeacherTargets::TopK { ids, logits, rest } = targets else {
            return Err(DistillError::Input("a cache stores top-k targets".into()));
        };
        let cpu = |t: &Tensor, kind: Kind| t.to_device(Device::Cpu).to_kind(kind);
        self.pending.push([cpu(inputs, Kind::Int), cpu(ids, Kind::Int), cpu(logits, Kind::Half), cpu(rest, Kind::Float)]);
        self.pending_windows += inputs.size()[0] as u64;
        if self.pending_windows >= self.per_file {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let name = format!("logits-{:05}.safetensors", self.files.len());
        let names = ["input_ids", "topk_ids", "topk_logits", "rest_logsumexp"];
        let tensors: Vec<(String, Tensor)> = (0..4)
            .map(|i| (names[i].to_string(), Tensor::cat(&self.pending.iter().map(|p| p[i].shallow_clone()).collect::<Vec<_>>(), 0)))
            .collect();
        write_safetensors(&self.dir.join(&name), &tensors)?;
        self.files.push((name, self.pending_windows));
        self.pending.clear();
        self.pending_windows = 0;
        Ok(())
    }

    /// Writes the last file and the header (its `files` and `windows` filled in).
    pub fn finish(mut self, mut header: CacheHeader) -> Result<CacheHeader> {
        self.flush()?;
        header.windows = self.files.iter().map(|f| f.1).sum();
        header.files = self.files;
        let text = serde_json::to_string_pretty(&header).expect("header serializes");
        atomic_write_bytes(&self.dir.join(CACHE_HEADER), text.as_bytes())?;
        Ok(header)
    }
}

/// A cache read into memory.
pub struct TeacherCache {
    /// The header.
    pub header: CacheHeader,
    inputs: Tensor,
    ids: Tensor,
    logits: Tensor,
    rest: Tensor,
}

impl TeacherCache {
    /// The header of the cache in `dir` (an error for a directory without one).
    pub fn header(dir: &Path) -> Result<CacheHeader> {
        let header_path = dir.join(CACHE_HEADER);
        if !header_path.is_file() {
            return Err(DistillError::Input(format!(
                "{}: no {CACHE_HEADER}; not a teacher cache, or `stlm distill cache` did not finish",
                dir.display()
            )));
        }
        Ok(read_json(&header_path)?)
    }

    /// Reads the cache in `dir`, checking that its files agree with the header.
    pub fn open(dir: &Path) -> Result<Self> {
        let header = Self::header(dir)?;
        let (s, k) = (header.seq_len, header.top_k);
        let mut parts: [Vec<Tensor>; 4] = Default::default();
        for (name, windows) in &header.files {
            let path = dir.join(name);
            let mut t = read_safetensors(&path)?;
            let n = *windows as i64;
            for (i, (key, shape)) in
                [("input_ids", vec![n, s + 1]), ("topk_ids", vec![n, s, k]), ("topk_logits", vec![n, s, k]), ("rest_logsumexp", vec![n, s])]
                    .into_iter()
                    .enumerate()
            {
                let tensor = t.remove(key).filter(|x| x.size() == shape).ok_or_else(|| {
                    CoreError::format(&path, format!("tensor `{key}` is missing or not of shape {shape:?} as {CACHE_HEADER} says"))
                })?;
                parts[i].push(tensor);
            }
        }
        if parts[0].is_empty() {
            return Err(DistillError::Input(format!("{}: the cache holds no windows", dir.display())));
        }
        let [inputs, ids, logits, rest] = parts.map(|p| Tensor::cat(&p, 0));
        Ok(TeacherCache { header, inputs, ids, logits, rest })
    }

    /// Windows in the cache.
    pub fn len(&self) -> u64 {
        self.inputs.size()[0] as u64
    }

    /// True when the cache holds no windows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Inputs and targets `[b, seq]` of windows `picks` (their first `seq` positions) and the
    /// teacher's top-k targets for them, on `device`.
    pub fn batch(&self, picks: &[i64], seq: i64, device: Device) -> Result<(Tensor, Tensor, TeacherTargets)> {
        if seq > self.header.seq_len || seq < 1 {
            return Err(DistillError::Input(format!("seq_len {seq}: the cache has windows of {} positions", self.header.seq_len)));
        }
        let index = Tensor::from_slice(picks);
        let rows = |t: &Tensor, len: i64| t.index_select(0, &index).narrow(1, 0, len).to_device(device);
        let ids = rows(&self.inputs, seq + 1).to_kind(Kind::Int64);
        let targets = TeacherTargets::TopK {
            ids: rows(&self.ids, seq).to_kind(Kind::Int64),
            logits: rows(&self.logits, seq).to_kind(Kind::Float),
            rest: rows(&self.rest, seq),
        };
        Ok((ids.narrow(1, 0, seq), ids.narrow(1, 1, seq), targets))
    }

    /// [`TeacherCache::batch`] as a training batch: the targets travel in its extras.
    pub fn train_batch(&self, picks: &[i64], seq: i64, device: Device) -> Result<Batch> {
        let (inputs, targets, teacher) = self.batch(picks, seq, device)?;
        let mut batch = Batch::new(inputs, targets);
        teacher.into_extras(&mut batch.extras)?;
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::{Divergence, LogitLoss};

    #[test]
    fn round_trip_gives_the_targets_of_a_live_teacher_up_to_float16() {
        let _g = crate::tests::RNG.lock();
        tch::manual_seed(9);
        let dir = tempfile::tempdir().unwrap();
        let loss = LogitLoss { divergence: Divergence::ForwardKl, temperature: 1.5, skew: 0.1, top_k: Some(4) };
        let mut w = CacheWriter::new(dir.path(), 2).unwrap();
        let inputs = Tensor::randint(20, [5, 7], (Kind::Int64, Device::Cpu));
        let logits = Tensor::randn([5, 6, 20], (Kind::Float, Device::Cpu)) * 2.0;
        for (a, b) in [(0, 2), (2, 3)] {
            w.push(&inputs.narrow(0, a, b), &loss.teacher_targets(&logits.narrow(0, a, b))).unwrap();
        }
        let header = CacheHeader {
            teacher: "t".into(),
            seq_len: 6,
            top_k: 4,
            temperature: 1.5,
            vocab_size: 20,
            windows: 0,
            sources: vec![],
            val_fraction: 0.1,
            seed: 0,
            files: vec![],
        };
        let header = w.finish(header).unwrap();
        assert_eq!((header.windows, header.files.len()), (5, 2));
        let cache = TeacherCache::open(dir.path()).unwrap();
        let (x, y, targets) = cache.batch(&[4, 1], 5, Device::Cpu).unwrap();
        let pick = Tensor::from_slice(&[4i64, 1]);
        assert!(x.equal(&inputs.index_select(0, &pick).narrow(1, 0, 5)));
        assert!(y.equal(&inputs.index_select(0, &pick).narrow(1, 1, 5)));
        let student = Tensor::randn([2, 5, 20], (Kind::Float, Device::Cpu));
        let live = loss.teacher_targets(&logits.index_select(0, &pick).narrow(1, 0, 5));
        let (a, b) = (loss.loss(&student, &targets, None).double_value(&[]), loss.loss(&student, &live, None).double_value(&[]));
        assert!((a - b).abs() < 1e-3 * b.abs().max(1.0), "{a} vs {b}");
        assert!(cache.batch(&[0], 7, Device::Cpu).unwrap_err().to_string().contains("seq_len 7"));
        // A half-written cache (no header) is refused by name.
        std::fs::remove_file(dir.path().join(CACHE_HEADER)).unwrap();
        assert!(TeacherCache::open(dir.path()).err().unwrap().to_string().contains("did not finish"));
    }
}
