//! The `[data]` table of a run config: where tokens come from and how text is read.

use crate::read::{OnBadLine, OnInvalidUtf8, ReadOptions};
use crate::{DataError, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `[data]`: every field has a default; unknown fields are errors naming them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// A tokenizer.json; when absent, BPE of the model's vocab_size is trained on the data.
    pub tokenizer: Option<PathBuf>,
    /// Share of documents held out for validation.
    pub val_fraction: f64,
    /// Field of `.jsonl` objects (column of `.parquet` files) holding the text.
    pub text_field: String,
    /// `.txt` documents end at this string; unset: at a blank line or `<|endoftext|>`.
    pub separator: Option<String>,
    /// A `.jsonl` line that is not JSON or lacks the field: `"stop"` or `"skip"`.
    pub bad_lines: OnBadLine,
    /// A line that is not UTF-8: `"stop"`, `"replace"` or `"skip"`.
    pub invalid_utf8: OnInvalidUtf8,
    /// Stories of the built-in corpus, used when no data files are given.
    pub builtin_stories: u64,
    /// Seed of the built-in corpus.
    pub builtin_seed: u64,
    /// Folder of cached token shards; unset: `tokens/` in the run directory.
    pub cache_dir: Option<PathBuf>,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            tokenizer: None,
            val_fraction: 0.02,
            text_field: "text".into(),
            separator: None,
            bad_lines: OnBadLine::Stop,
            invalid_utf8: OnInvalidUtf8::Stop,
            builtin_stories: 10_000,
            builtin_seed: 0,
            cache_dir: None,
        }
    }
}

impl DataConfig {
    /// The `[data]` table of the TOML `text` read from `path`, checked.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Self> {
        let cfg: DataConfig = stlm_core::toml_table(text, path, "data")?;
        let err = |m: String| DataError::Format { path: path.to_path_buf(), message: m };
        if !(cfg.val_fraction > 0.0 && cfg.val_fraction < 1.0) {
            return Err(err(format!("field `data.val_fraction` ({}) must be in (0, 1)", cfg.val_fraction)));
        }
        if cfg.separator.as_deref() == Some("") {
            return Err(err("field `data.separator` must not be empty".into()));
        }
        if cfg.builtin_stories == 0 {
            return Err(err("field `data.builtin_stories` must be at least 1".into()));
        }
        Ok(cfg)
    }

    /// How files are read under this config.
    pub fn read_options(&self) -> ReadOptions {
        ReadOptions {
            text_field: self.text_field.clone(),
            separator: self.separator.clone(),
            on_bad_line: self.bad_lines,
            on_invalid_utf8: self.invalid_utf8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_named_errors() {
        let p = Path::new("run.toml");
        let c = DataConfig::from_toml_str("[data]\nbad_lines = \"skip\"\ninvalid_utf8 = \"replace\"\n", p).unwrap();
        assert_eq!((c.bad_lines, c.invalid_utf8), (OnBadLine::Skip, OnInvalidUtf8::Replace));
        assert_eq!(DataConfig::from_toml_str("[model]\nvocab_size = 3\n", p).unwrap(), DataConfig::default());
        for (text, needle) in [
            ("[data]\nval_fraction = 0.0\n", "val_fraction"),
            ("[data]\nbad_lines = \"ignore\"\n", "data.bad_lines"),
            ("[data]\nvocab = 3\n", "vocab"),
            ("[data]\nbuiltin_stories = \"many\"\n", "data.builtin_stories"),
        ] {
            let e = DataConfig::from_toml_str(text, p).unwrap_err().to_string();
            assert!(e.contains("run.toml") && e.contains(needle), "{text}: {e}");
        }
    }
}
