//! Token shards (DESIGN §4): each source is tokenized once into a flat little-endian `u16` (vocab
//! <= 65536) or `u32` array per split, beside a small JSON header, and read back with mmap.
//!
//! A cache folder holds, per source, `NAME-KEY.train.tokens`, `NAME-KEY.val.tokens`, the
//! document starts of each split (`.docs`, little-endian `u64`) and `NAME-KEY.json`. KEY hashes
//! the tokenizer, the source's content, the reading options, the validation share and the seed,
//! so a change to any of them tokenizes again, and nothing else does. Files are written under
//! temporary names and renamed, the header last: a shard whose header exists is complete.

use crate::read::{ReadOptions, Source};
use crate::{DataError, Result};
use indicatif::{ProgressBar, ProgressStyle};
use memmap2::Mmap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::io::{BufWriter, Read, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use stlm_core::{atomic_write_bytes, temporary_path};
use stlm_tokenizers::Tokenizer;
use xxhash_rust::xxh3::Xxh3;

/// Version of the shard format, part of every cache key.
const FORMAT: &str = "stlm-tokens-1";

/// Documents tokenized together in parallel.
const CHUNK_DOCS: usize = 2048;

/// How a corpus is turned into shards.
#[derive(Debug, Clone)]
pub struct ShardOptions {
    /// How documents are read from files.
    pub read: ReadOptions,
    /// Share of documents held out for validation, decided per document by a seeded generator.
    pub val_fraction: f64,
    /// Seed of the train/validation split.
    pub seed: u64,
    /// Folder of the cached shards.
    pub cache_dir: PathBuf,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

/// Width of one token on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    /// Vocabularies of at most 65536 ids.
    U16,
    /// Larger vocabularies.
    U32,
}

impl TokenDtype {
    fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 {
            TokenDtype::U16
        } else {
            TokenDtype::U32
        }
    }

    fn width(self) -> usize {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }
}

/// Size of one split of a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitInfo {
    /// Tokens in the split (end-of-text ids included).
    pub tokens: u64,
    /// Documents in the split.
    pub documents: u64,
}

/// The JSON header of a shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardHeader {
    /// Format version.
    pub format: String,
    /// Where the documents came from.
    pub source: String,
    /// Cache key (hex).
    pub key: String,
    /// Width of a token.
    pub dtype: TokenDtype,
    /// The end-of-text id written after each document.
    pub eot_id: u32,
    /// UTF-8 bytes of text read.
    pub bytes: u64,
    /// Training split.
    pub train: SplitInfo,
    /// Validation split.
    pub val: SplitInfo,
}

/// A memory-mapped array of token ids.
pub struct TokenArray {
    map: Option<Mmap>,
    dtype: TokenDtype,
    len: usize,
}

impl TokenArray {
    /// Maps `path`, which must hold exactly `len` tokens of `dtype`.
    pub fn open(path: &Path, dtype: TokenDtype, len: u64) -> Result<Self> {
        let io = |e| DataError::Io { path: path.to_path_buf(), source: e };
        let file = std::fs::File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        if size != len * dtype.width() as u64 {
            return Err(DataError::Invalid(format!(
                "{}: {size} bytes, expected {len} tokens of {} bytes (a damaged cache file; delete it)",
                path.display(),
                dtype.width()
            )));
        }
        // An empty file cannot be mapped; an empty array needs no map.
        // SAFETY: the cache files are written once under a temporary name and renamed; nothing
        // in stlm writes to them afterwards.
        let map = if len == 0 { None } else { Some(unsafe { Mmap::map(&file) }.map_err(io)?) };
        Ok(TokenArray { map, dtype, len: len as usize })
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends tokens `start..start + count` to `out` as i64.
    pub fn extend_window(&self, start: usize, count: usize, out: &mut Vec<i64>) {
        let bytes = self.map.as_deref().unwrap_or(&[]);
        let w = self.dtype.width();
        let slice = &bytes[start * w..(start + count) * w];
        match self.dtype {
            TokenDtype::U16 => out.extend(slice.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as i64)),
            TokenDtype::U32 => {
                out.extend(slice.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64))
            }
        }
    }

    /// All tokens (for tests and small corpora).
    pub fn to_vec(&self) -> Vec<i64> {
        let mut out = Vec::with_capacity(self.len);
        self.extend_window(0, self.len, &mut out);
        out
    }
}

/// One source's tokens, split into training and validation.
pub struct Shard {
    /// The header.
    pub header: ShardHeader,
    /// Training tokens.
    pub train: TokenArray,
    /// Validation tokens.
    pub val: TokenArray,
}

/// The shards of a corpus.
pub struct TokenizedCorpus {
    /// One shard per source, in the order given.
    pub shards: Vec<Shard>,
}

impl TokenizedCorpus {
    /// Documents read.
    pub fn documents(&self) -> u64 {
        self.shards.iter().map(|s| s.header.train.documents + s.header.val.documents).sum()
    }
    /// UTF-8 bytes of text read.
    pub fn bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.header.bytes).sum()
    }
    /// Training tokens.
    pub fn train_tokens(&self) -> u64 {
        self.shards.iter().map(|s| s.header.train.tokens).sum()
    }
    /// Validation tokens.
    pub fn val_tokens(&self) -> u64 {
        self.shards.iter().map(|s| s.header.val.tokens).sum()
    }

    /// Entropy in nats of the training tokens' frequencies (over at most `max_tokens` of them,
    /// taken from the start of each shard in proportion): the loss of a model that learned only
    /// how often each token occurs, the bar any trained model must clear by far.
    pub fn unigram_entropy(&self, max_tokens: u64) -> f64 {
        let total = self.train_tokens().max(1);
        let mut counts = std::collections::HashMap::<i64, u64>::new();
        let mut buf = Vec::new();
        for shard in &self.shards {
            let take = ((shard.train.len() as u128 * max_tokens as u128) / total as u128) as usize;
            buf.clear();
            shard.train.extend_window(0, take.min(shard.train.len()), &mut buf);
            for &id in &buf {
                *counts.entry(id).or_default() += 1;
            }
        }
        let n = counts.values().sum::<u64>().max(1) as f64;
        counts.values().map(|&c| c as f64 / n).map(|p| -p * p.ln()).sum()
    }
}

/// Tokenizes every source into the cache (or reuses what is there) and maps the shards.
pub fn tokenize_corpus(sources: &[Source], tok: &Tokenizer, opts: &ShardOptions) -> Result<TokenizedCorpus> {
    if sources.is_empty() {
        return Err(DataError::Invalid("no data given".into()));
    }
    if !(0.0..1.0).contains(&opts.val_fraction) {
        return Err(DataError::Invalid(format!("val_fraction {} must be in [0, 1)", opts.val_fraction)));
    }
    let eot = tok
        .eos_id()
        .ok_or_else(|| DataError::Invalid("the tokenizer has no end-of-text token (<|endoftext|> or </s>)".into()))?;
    std::fs::create_dir_all(&opts.cache_dir).map_err(|e| DataError::Io { path: opts.cache_dir.clone(), source: e })?;
    let tok_json = tok.to_json()?;
    let mut shards = Vec::with_capacity(sources.len());
    for source in sources {
        let key = cache_key(source, &tok_json, opts)?;
        let base = opts.cache_dir.join(format!("{}-{key}", file_stem(source)));
        let header_path = sibling(&base, "json");
        let header = match read_header(&header_path, &key) {
            Some(h) => {
                eprintln!("tokens of {}: cached in {}", source.name(), header_path.display());
                h
            }
            None => write_shard(source, tok, eot, opts, &base, &key)?,
        };
        let split = |name: &str, info: SplitInfo| {
            TokenArray::open(&sibling(&base, &format!("{name}.tokens")), header.dtype, info.tokens)
        };
        let shard = Shard { train: split("train", header.train)?, val: split("val", header.val)?, header };
        shards.push(shard);
    }
    let corpus = TokenizedCorpus { shards };
    if corpus.documents() == 0 {
        return Err(DataError::Invalid("the corpus is empty: no documents in the given data".into()));
    }
    Ok(corpus)
}

fn file_stem(source: &Source) -> String {
    match source {
        Source::File(p) => p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "data".into()),
        Source::Builtin { .. } => "builtin-stories".into(),
    }
}

/// `base` with `.suffix` appended to its file name (`base` has no extension of its own).
fn sibling(base: &Path, suffix: &str) -> PathBuf {
    let name = base.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    base.with_file_name(format!("{name}.{suffix}"))
}

/// The cache key: a hash of everything the tokens depend on.
fn cache_key(source: &Source, tok_json: &str, opts: &ShardOptions) -> Result<String> {
    let mut h = Xxh3::new();
    let mut field = |bytes: &[u8]| {
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(FORMAT.as_bytes());
    field(tok_json.as_bytes());
    let r = &opts.read;
    field(format!("{:?}|{:?}|{:?}|{:?}", r.text_field, r.separator, r.on_bad_line, r.on_invalid_utf8).as_bytes());
    field(&opts.val_fraction.to_le_bytes());
    field(&opts.seed.to_le_bytes());
    match source {
        Source::Builtin { stories, seed } => field(format!("builtin|{stories}|{seed}").as_bytes()),
        Source::File(path) => {
            // The content, not the name: a moved file keeps its cache, an edited one does not.
            let io = |e| DataError::Io { path: path.clone(), source: e };
            let mut file = std::fs::File::open(path).map_err(io)?;
            let mut content = Xxh3::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = file.read(&mut buf).map_err(io)?;
                if n == 0 {
                    break;
                }
                content.update(&buf[..n]);
            }
            field(&content.digest128().to_le_bytes());
            field(path.extension().and_then(|e| e.to_str()).unwrap_or("").as_bytes());
        }
    }
    Ok(format!("{:032x}", h.digest128()))
}

fn read_header(path: &Path, key: &str) -> Option<ShardHeader> {
    let text = std::fs::read_to_string(path).ok()?;
    let header: ShardHeader = serde_json::from_str(&text).ok()?;
    (header.format == FORMAT && header.key == key).then_some(header)
}

/// A split being written: tokens and document starts, under temporary names.
struct SplitWriter {
    tokens: BufWriter<std::fs::File>,
    docs: BufWriter<std::fs::File>,
    paths: [(PathBuf, PathBuf); 2],
    info: SplitInfo,
}

impl SplitWriter {
    fn create(base: &Path, split: &str) -> Result<Self> {
        let mut paths = Vec::new();
        let mut files = Vec::new();
        for ext in ["tokens", "docs"] {
            let path = sibling(base, &format!("{split}.{ext}"));
            let tmp = temporary_path(&path);
            let file = std::fs::File::create(&tmp).map_err(|e| DataError::Io { path: tmp.clone(), source: e })?;
            files.push(BufWriter::with_capacity(1 << 20, file));
            paths.push((tmp, path));
        }
        let docs = files.pop().expect("two files");
        let tokens = files.pop().expect("two files");
        let paths = [paths[0].clone(), paths[1].clone()];
        Ok(SplitWriter { tokens, docs, paths, info: SplitInfo { tokens: 0, documents: 0 } })
    }

    fn push(&mut self, ids: &[u32], eot: u32, dtype: TokenDtype) -> Result<()> {
        let io = |e| DataError::Io { path: self.paths[0].0.clone(), source: e };
        self.docs.write_all(&self.info.tokens.to_le_bytes()).map_err(io)?;
        for &id in ids.iter().chain(std::iter::once(&eot)) {
            match dtype {
                TokenDtype::U16 => self.tokens.write_all(&(id as u16).to_le_bytes()),
                TokenDtype::U32 => self.tokens.write_all(&id.to_le_bytes()),
            }
            .map_err(io)?;
        }
        self.info.tokens += ids.len() as u64 + 1;
        self.info.documents += 1;
        Ok(())
    }

    /// Flushes, syncs and renames both files into place.
    fn finish(self) -> Result<SplitInfo> {
        for (mut w, (tmp, path)) in [self.tokens, self.docs].into_iter().zip(self.paths) {
            let io = |e| DataError::Io { path: tmp.clone(), source: e };
            w.flush().map_err(io)?;
            w.get_ref().sync_all().map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(|e| DataError::Io { path: path.clone(), source: e })?;
        }
        Ok(self.info)
    }

    fn abandon(self) {
        for (tmp, _) in &self.paths {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Tokenizes `source` in parallel chunks into the two splits, then writes the header.
fn write_shard(
    source: &Source,
    tok: &Tokenizer,
    eot: u32,
    opts: &ShardOptions,
    base: &Path,
    key: &str,
) -> Result<ShardHeader> {
    let vocab = tok.vocab_size();
    let dtype = TokenDtype::for_vocab(vocab);
    let bar = if opts.progress { ProgressBar::new(source.size_hint()) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("tokenizing {msg} {bar:30} {bytes}/{total_bytes} [{elapsed}<{eta}]")
            .expect("valid template"),
    );
    bar.set_message(file_stem(source));
    let mut train = SplitWriter::create(base, "train")?;
    let mut val = match SplitWriter::create(base, "val") {
        Ok(v) => v,
        Err(e) => {
            train.abandon();
            return Err(e);
        }
    };
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut bytes = 0u64;
    let mut chunk: Vec<String> = Vec::with_capacity(CHUNK_DOCS);
    let mut flush = |chunk: &mut Vec<String>, train: &mut SplitWriter, val: &mut SplitWriter| -> Result<()> {
        let encoded: Vec<Vec<u32>> = chunk.par_iter().map(|d| tok.encode(d, false)).collect::<Result<_, _>>()?;
        for (doc, ids) in chunk.iter().zip(&encoded) {
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(DataError::Invalid(format!("the tokenizer produced id {bad}, outside its vocabulary")));
            }
            let split = if rng.random::<f64>() < opts.val_fraction { &mut *val } else { &mut *train };
            split.push(ids, eot, dtype)?;
            bar.inc(doc.len() as u64 + 1);
        }
        chunk.clear();
        Ok(())
    };
    let mut failed = None;
    let read = source.for_each_document(&opts.read, |doc| {
        bytes += doc.len() as u64;
        chunk.push(doc);
        if chunk.len() >= CHUNK_DOCS {
            if let Err(e) = flush(&mut chunk, &mut train, &mut val) {
                failed = Some(e);
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    });
    let done = read.and_then(|_| failed.map_or(Ok(()), Err)).and_then(|_| flush(&mut chunk, &mut train, &mut val));
    if let Err(e) = done {
        train.abandon();
        val.abandon();
        bar.abandon();
        return Err(e);
    }
    bar.finish_and_clear();
    let header = ShardHeader {
        format: FORMAT.into(),
        source: source.name(),
        key: key.into(),
        dtype,
        eot_id: eot,
        bytes,
        train: train.finish()?,
        val: val.finish()?,
    };
    let json = serde_json::to_vec_pretty(&header).expect("header serializes");
    atomic_write_bytes(&sibling(base, "json"), &json)?;
    Ok(header)
}
