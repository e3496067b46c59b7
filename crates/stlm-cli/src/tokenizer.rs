//! `stlm tokenizer train|encode|decode`.

use crate::common::{output_path, parse_ids, print_json};
use anyhow::Result;
use clap::Subcommand;
use std::path::PathBuf;
use stlm_tokenizers::{BpeOptions, Tokenizer};

#[derive(Subcommand)]
pub enum TokenizerJob {
    /// Train byte-level BPE on text files and write tokenizer.json.
    Train {
        /// Text files to train on.
        #[arg(long = "files", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// Vocabulary size, special tokens and the 256 byte symbols included.
        #[arg(long, default_value_t = 4096)]
        vocab_size: usize,
        /// Pairs seen fewer times are not merged.
        #[arg(long, default_value_t = 2)]
        min_frequency: u64,
        /// Comma-separated special tokens (first ids).
        #[arg(long, default_value = "<|endoftext|>,<|pad|>")]
        special_tokens: String,
        /// Output tokenizer.json.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the token ids of a text.
    Encode {
        /// tokenizer.json.
        #[arg(long)]
        tokenizer: PathBuf,
        /// Text to encode.
        #[arg(long)]
        text: String,
        /// Print {"ids": [...], "tokens": n} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the text of token ids.
    Decode {
        /// tokenizer.json.
        #[arg(long)]
        tokenizer: PathBuf,
        /// Comma-separated token ids.
        #[arg(long)]
        ids: String,
    },
}

pub fn run(job: TokenizerJob) -> Result<()> {
    match job {
        TokenizerJob::Train { files, vocab_size, min_frequency, special_tokens, out } => {
            let out = output_path(&out)?;
            let special_tokens =
                special_tokens.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
            let opts = BpeOptions { vocab_size, min_frequency, special_tokens, show_progress: true };
            let tok = Tokenizer::train_bpe(&files, &opts)?;
            tok.save(&out)?;
            eprintln!("wrote {} ({} tokens)", out.display(), tok.vocab_size());
        }
        TokenizerJob::Encode { tokenizer, text, json } => {
            let ids = Tokenizer::from_file(&tokenizer)?.encode(&text, false)?;
            if json {
                print_json(&serde_json::json!({"ids": ids, "tokens": ids.len()}))?;
            } else {
                println!("{}", ids.iter().map(u32::to_string).collect::<Vec<_>>().join(","));
            }
        }
        TokenizerJob::Decode { tokenizer, ids } => {
            let ids = parse_ids(&ids)?;
            let ids: Vec<u32> = ids
                .iter()
                .map(|&i| u32::try_from(i).map_err(|_| anyhow::anyhow!("--ids: {i} is not a token id")))
                .collect::<Result<_>>()?;
            println!("{}", Tokenizer::from_file(&tokenizer)?.decode(&ids, false)?);
        }
    }
    Ok(())
}
