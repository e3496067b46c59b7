//! stlm-data: text corpora to token shards to training batches.
//!
//! - [`read`]: documents streamed out of `.txt` (split at blank lines or `<|endoftext|>`, or a
//!   separator of your choice), `.jsonl` (a string field, `text` by default) and `.parquet` (a
//!   string column) files, or the built-in story corpus; errors name the file and line.
//! - [`config`]: the `[data]` table of a run config.
//! - [`stories`]: the built-in corpus, a seeded generator of simple English stories.
//! - [`shards`]: documents tokenized in parallel (rayon) into cached `u16`/`u32` token files per
//!   train/validation split, keyed by tokenizer and content hash, read back with mmap.
//! - [`batches`]: `[batch, seq + 1]` windows as a pure function of (seed, step, micro).

pub mod batches;
pub mod config;
mod parquet;
pub mod read;
pub mod shards;
pub mod stories;

pub use batches::{window_picks, TokenBatches};
pub use parquet::parquet_records;
pub use config::DataConfig;
pub use read::{read_documents, sample_documents, OnBadLine, OnInvalidUtf8, ReadOptions, Source, ENDOFTEXT};
pub use shards::{tokenize_corpus, ShardOptions, TokenizedCorpus};

use std::path::PathBuf;

/// Errors naming the file, line or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A line that is not what the format needs.
    #[error("{path}:{line}: {message}")]
    Line { path: PathBuf, line: usize, message: String },
    /// A file that is not what its format needs.
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    /// Bad options or a corpus that cannot serve them.
    #[error("{0}")]
    Invalid(String),
    /// Atomic writes.
    #[error(transparent)]
    Core(#[from] stlm_core::CoreError),
    /// Tokenizer errors.
    #[error(transparent)]
    Tokenizer(#[from] stlm_tokenizers::TokenizerError),
}

/// Result alias for stlm-data.
pub type Result<T, E = DataError> = std::result::Result<T, E>;
