//! A collection of training weights: the selected parameters ("units") of K checkpoints, the
//! data weight generation learns from. On disk, a folder with `collection.json` (the base model,
//! the `--layers` spec, each unit's name, shape, block and type, each checkpoint's source) and
//! `weights.safetensors` (one float32 tensor `[K, numel]` per unit, under the unit's name).

use crate::select::{block_index, layer_type};
use crate::WeightgenError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use stlm_core::{atomic_write_bytes, read_json, read_safetensors, write_safetensors};
use tch::{Kind, Tensor};

/// Manifest file of a collection folder.
pub const MANIFEST: &str = "collection.json";
/// Weights file of a collection folder.
pub const WEIGHTS: &str = "weights.safetensors";

/// One selected parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unit {
    /// The model's variable name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<i64>,
    /// The block it belongs to (`None`: outside the blocks, e.g. the final norm).
    pub layer: Option<usize>,
    /// Its type: the name with the block index as `*`.
    pub kind: String,
}

impl Unit {
    /// The unit for parameter `name` of `shape`.
    pub fn new(name: &str, shape: Vec<i64>) -> Self {
        Unit { name: name.to_string(), shape, layer: block_index(name), kind: layer_type(name) }
    }

    /// Number of values.
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }
}

/// Where one checkpoint of a collection came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointInfo {
    /// A run directory, model directory or `continue` (p-diff's continued training).
    pub source: String,
    /// The training step of the checkpoint, where known.
    pub step: Option<u64>,
}

/// The manifest: everything but the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The model directory whose other weights every generated model keeps.
    pub base_model: PathBuf,
    /// The `--layers` spec.
    pub layers: String,
    /// The selected parameters, in model order.
    pub units: Vec<Unit>,
    /// One entry per checkpoint, in the order of the weights' first dimension.
    pub checkpoints: Vec<CheckpointInfo>,
}

/// A loaded collection.
#[derive(Debug)]
pub struct Collection {
    /// What the weights are.
    pub manifest: Manifest,
    /// Per unit, `[K, numel]` float32 on the CPU.
    pub weights: Vec<Tensor>,
}

impl Collection {
    /// An empty collection of `units` from `base_model`.
    pub fn new(base_model: PathBuf, layers: String, units: Vec<Unit>) -> Self {
        let weights = units.iter().map(|u| Tensor::zeros([0, u.numel()], (Kind::Float, tch::Device::Cpu))).collect();
        Collection { manifest: Manifest { base_model, layers, units, checkpoints: Vec::new() }, weights }
    }

    /// Number of checkpoints K.
    pub fn len(&self) -> usize {
        self.manifest.checkpoints.len()
    }

    /// True when no checkpoint was added.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends one checkpoint: `tensors` in unit order, of the units' shapes.
    pub fn push(&mut self, info: CheckpointInfo, tensors: &[Tensor]) -> Result<(), WeightgenError> {
        self.extend(vec![(info, tensors.iter().map(Tensor::shallow_clone).collect())])
    }

    /// Appends checkpoints (each: its source and its tensors in unit order), checked first, then
    /// copied in with one concatenation per unit (appending one at a time would copy the whole
    /// collection for every checkpoint).
    pub fn extend(&mut self, items: Vec<(CheckpointInfo, Vec<Tensor>)>) -> Result<(), WeightgenError> {
        let units = &self.manifest.units;
        for (info, tensors) in &items {
            if tensors.len() != units.len() {
                return Err(WeightgenError::Input(format!(
                    "{}: a checkpoint of {} tensors for {} units",
                    info.source,
                    tensors.len(),
                    units.len()
                )));
            }
            for (u, t) in units.iter().zip(tensors) {
                if t.size() != u.shape {
                    return Err(WeightgenError::Input(format!(
                        "{}: `{}` has shape {:?}, the collection's is {:?}",
                        info.source,
                        u.name,
                        t.size(),
                        u.shape
                    )));
                }
            }
        }
        if items.is_empty() {
            return Ok(());
        }
        for (i, w) in self.weights.iter_mut().enumerate() {
            let rows: Vec<Tensor> = items
                .iter()
                .map(|(_, ts)| ts[i].detach().to_device(tch::Device::Cpu).to_kind(Kind::Float).reshape([-1]))
                .collect();
            *w = Tensor::cat(&[w.shallow_clone(), Tensor::stack(&rows, 0)], 0);
        }
        self.manifest.checkpoints.extend(items.into_iter().map(|(info, _)| info));
        Ok(())
    }

    /// Checkpoint `k`'s tensors, in unit order and shapes.
    pub fn checkpoint(&self, k: usize) -> Vec<Tensor> {
        self.weights.iter().zip(&self.manifest.units).map(|(w, u)| w.get(k as i64).view(u.shape.as_slice())).collect()
    }

    /// All checkpoints as rows of one matrix `[K, D]` (units concatenated).
    pub fn matrix(&self) -> Tensor {
        Tensor::cat(&self.weights, 1)
    }

    /// Writes the folder `dir` (each file atomically).
    pub fn save(&self, dir: &Path) -> Result<(), WeightgenError> {
        std::fs::create_dir_all(dir).map_err(|e| stlm_core::CoreError::io(dir, e))?;
        let named: Vec<(String, Tensor)> =
            self.manifest.units.iter().zip(&self.weights).map(|(u, w)| (u.name.clone(), w.shallow_clone())).collect();
        write_safetensors(&dir.join(WEIGHTS), &named)?;
        let json = serde_json::to_vec_pretty(&self.manifest).expect("manifest serializes");
        atomic_write_bytes(&dir.join(MANIFEST), &json)?;
        Ok(())
    }

    /// Reads the folder `dir`, checking that weights and manifest agree.
    pub fn load(dir: &Path) -> Result<Self, WeightgenError> {
        let manifest: Manifest = read_json(&dir.join(MANIFEST))?;
        let path = dir.join(WEIGHTS);
        let mut tensors = read_safetensors(&path)?;
        let k = manifest.checkpoints.len() as i64;
        let mut weights = Vec::with_capacity(manifest.units.len());
        for u in &manifest.units {
            let t = tensors.remove(&u.name).ok_or_else(|| {
                WeightgenError::Input(format!("{}: no tensor `{}` (listed in {MANIFEST})", path.display(), u.name))
            })?;
            if t.size() != [k, u.numel()] {
                return Err(WeightgenError::Input(format!(
                    "{}: `{}` has shape {:?}, the manifest says [{k}, {}]",
                    path.display(),
                    u.name,
                    t.size(),
                    u.numel()
                )));
            }
            weights.push(t.to_kind(Kind::Float));
        }
        if k == 0 {
            return Err(WeightgenError::Input(format!("{}: the collection holds no checkpoint", dir.display())));
        }
        Ok(Collection { manifest, weights })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_round_trip_and_checks() {
        let _rng = crate::rng_lock();
        let units =
            vec![Unit::new("model.layers.0.mlp.up_proj.weight", vec![3, 2]), Unit::new("model.norm.weight", vec![2])];
        assert_eq!(units[0].layer, Some(0));
        assert_eq!(units[1].kind, "model.norm.weight");
        let mut c = Collection::new("base".into(), "norm,layers.0.mlp".into(), units);
        let o = (Kind::Float, tch::Device::Cpu);
        for step in 0..3 {
            let info = CheckpointInfo { source: "continue".into(), step: Some(step) };
            c.push(info, &[Tensor::randn([3, 2], o), Tensor::randn([2], o)]).unwrap();
        }
        let bad = c.push(
            CheckpointInfo { source: "x".into(), step: None },
            &[Tensor::randn([2, 3], o), Tensor::randn([2], o)],
        );
        assert!(bad.unwrap_err().to_string().contains("up_proj"));
        let dir = tempfile::tempdir().unwrap();
        c.save(dir.path()).unwrap();
        let back = Collection::load(dir.path()).unwrap();
        assert_eq!(back.manifest, c.manifest);
        assert!(back.checkpoint(2)[0].equal(&c.checkpoint(2)[0]));
        assert_eq!(back.matrix().size(), [3, 8]);
        // A manifest that disagrees with the weights is refused with the file's name.
        let mut m = c.manifest.clone();
        m.checkpoints.pop();
        std::fs::write(dir.path().join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
        let err = Collection::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains(WEIGHTS) && err.contains("[2, 6]"), "{err}");
    }
}
