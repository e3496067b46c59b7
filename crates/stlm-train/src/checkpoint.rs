//! Checkpoint folders (DESIGN §4): `checkpoints/step-NNNNNNN/` with the model directory files,
//! `optimizer.safetensors` and `trainer_state.json`, written under a temporary name and renamed,
//! a `latest` pointer, and keep-last-K. Loading skips incomplete or corrupt folders with a warning.

use crate::optim::AdamW;
use crate::{Result, TrainError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use stlm_core::{atomic_write_bytes, read_json, read_safetensors, write_safetensors, CoreError};
use stlm_model::LanguageModel;

/// What the loop needs besides weights and moments to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Seed of the data order.
    pub seed: u64,
    /// Tokens trained on so far.
    pub tokens_seen: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |e| CoreError::io(path, e).into()
}

/// Folder name of the checkpoint after `step` steps.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:07}")
}

/// Writes the checkpoint of `state.step` into `run_dir/checkpoints/`, points `latest` at it and
/// removes all but the newest `keep_last` checkpoints (0 keeps all). Returns its folder.
pub fn save(
    run_dir: &Path,
    model: &dyn LanguageModel,
    opt: &AdamW,
    state: &TrainerState,
    keep_last: usize,
) -> Result<PathBuf> {
    let dir = run_dir.join("checkpoints");
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let name = step_dir_name(state.step);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    let written = (|| -> Result<()> {
        model.save(&tmp, None)?;
        write_safetensors(&tmp.join("optimizer.safetensors"), &opt.state_tensors())?;
        let json = serde_json::to_vec_pretty(state).expect("state serializes");
        atomic_write_bytes(&tmp.join("trainer_state.json"), &json)?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let final_dir = dir.join(&name);
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
    atomic_write_bytes(&dir.join("latest"), name.as_bytes())?;
    if keep_last > 0 {
        for old in list(&dir)?.into_iter().skip(keep_last) {
            std::fs::remove_dir_all(&old).map_err(io(&old))?;
        }
    }
    Ok(final_dir)
}

/// Complete-looking checkpoint folders, newest first.
fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut steps: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    steps.sort_by_key(|(step, _)| std::cmp::Reverse(*step));
    Ok(steps.into_iter().map(|(_, p)| p).collect())
}

/// Restores the newest usable checkpoint of `run_dir` into `model` and `opt`: the one `latest`
/// names, else the newest folder; a folder that is incomplete or corrupt is skipped with a
/// warning on stderr. Errors when none is usable.
pub fn restore_latest(run_dir: &Path, model: &dyn LanguageModel, opt: &mut AdamW) -> Result<(PathBuf, TrainerState)> {
    let dir = run_dir.join("checkpoints");
    if !dir.is_dir() {
        return Err(TrainError::NothingToResume(run_dir.to_path_buf()));
    }
    let mut candidates = Vec::new();
    if let Ok(name) = std::fs::read_to_string(dir.join("latest")) {
        candidates.push(dir.join(name.trim()));
    }
    candidates.extend(list(&dir)?);
    candidates.dedup();
    for ckpt in candidates {
        match restore(&ckpt, model, opt) {
            Ok(state) => return Ok((ckpt, state)),
            Err(e) => eprintln!("warning: skipping checkpoint {}: {e}", ckpt.display()),
        }
    }
    Err(TrainError::NothingToResume(run_dir.to_path_buf()))
}

/// Restores one checkpoint folder; the model is left untouched when the folder is unusable.
pub fn restore(ckpt: &Path, model: &dyn LanguageModel, opt: &mut AdamW) -> Result<TrainerState> {
    let state: TrainerState = read_json(&ckpt.join("trainer_state.json"))?;
    let moments = read_safetensors(&ckpt.join("optimizer.safetensors"))?;
    // Check the weights fully before copying anything.
    let weights = ckpt.join(stlm_model::io::WEIGHTS_FILE);
    read_safetensors(&weights)?;
    model.load_weights(&weights)?;
    opt.load_state(&moments, state.step)?;
    Ok(state)
}
