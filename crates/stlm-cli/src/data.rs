//! `stlm data stories`: write the built-in story corpus to a text file (to read it, or to train
//! another tool on exactly the data stlm trains on by default).

use anyhow::Result;
use clap::Subcommand;
use std::io::Write;
use std::path::PathBuf;
use stlm_data::{stories, ENDOFTEXT};

#[derive(Subcommand)]
pub enum DataJob {
    /// Write stories of the built-in corpus, separated by <|endoftext|> lines.
    Stories {
        /// Number of stories.
        #[arg(long, default_value_t = 10_000)]
        count: u64,
        /// Seed of the corpus (the [data] builtin_seed of a run).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output .txt file (default: stdout).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

pub fn run(job: DataJob) -> Result<()> {
    match job {
        DataJob::Stories { count, seed, out } => {
            let text: String = (0..count).map(|i| format!("{}\n{ENDOFTEXT}\n", stories::story(seed, i))).collect();
            match out {
                Some(path) => stlm_core::atomic_write_bytes(&path, text.as_bytes())?,
                None => std::io::stdout().lock().write_all(text.as_bytes())?,
            }
            Ok(())
        }
    }
}
