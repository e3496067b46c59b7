//! `stlm tokenizer train|encode|decode|bytes|chunk`.

use crate::common::{output_path, parse_ids, print_json};
use anyhow::{Context, Result};
use clap::Subcommand;
use std::path::PathBuf;
use stlm_tokenizers::{BpeOptions, Tokenizer, TokenizerError};

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
    /// Write the byte tokenizer (ids 0-255 are bytes, <|endoftext|> 256, <|pad|> 257), e.g. to
    /// train a byte model for entropy chunking with `[data] tokenizer = FILE`.
    Bytes {
        /// Output tokenizer.json.
        #[arg(long)]
        out: PathBuf,
    },
    /// Show how a chunker groups the bytes of a text.
    Chunk {
        /// The chunker as in a model config, e.g. '{ kind = "whitespace", max_len = 12 }'.
        #[arg(long)]
        chunker: String,
        /// Text to chunk.
        #[arg(long)]
        text: String,
        /// Print {"lengths": [...], "chunks": [...]} as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(job: TokenizerJob) -> Result<()> {
    match job {
        TokenizerJob::Train { files, vocab_size, min_frequency, special_tokens, out } => {
            let out = output_path(&out)?;
            let special_tokens =
                special_tokens.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
            let opts = BpeOptions { vocab_size, min_frequency, special_tokens, show_progress: true };
            let tok = Tokenizer::train_bpe(&files, &opts).map_err(option_error)?;
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
        TokenizerJob::Bytes { out } => {
            let out = output_path(&out)?;
            Tokenizer::bytes().save(&out)?;
            eprintln!("wrote {} (258 ids)", out.display());
        }
        TokenizerJob::Chunk { chunker, text, json } => chunk(&chunker, &text, json)?,
    }
    Ok(())
}

/// `stlm tokenizer chunk`: chunk lengths and the chunks' text.
fn chunk(spec: &str, text: &str, json: bool) -> Result<()> {
    let (lengths, chunks) = stlm_model::bytes::chunk_text(spec, text).context("--chunker")?;
    let bytes = text.len();
    if json {
        print_json(&serde_json::json!({"lengths": lengths, "chunks": chunks}))?;
    } else {
        println!("{}", chunks.iter().map(|c| format!("[{c}]")).collect::<Vec<_>>().join(""));
        eprintln!("{bytes} bytes in {} chunks ({:.2} bytes a chunk)", lengths.len(), bytes as f64 / lengths.len().max(1) as f64);
    }
    Ok(())
}

/// A tokenizer's option error as an [`stlm_core::OptionError`], so that the error line names the flag.
fn option_error(e: TokenizerError) -> anyhow::Error {
    match e {
        TokenizerError::Option { name, value, why } => stlm_core::OptionError::new(name, value, why).into(),
        e => e.into(),
    }
}
