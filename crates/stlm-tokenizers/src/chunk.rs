//! Chunkers: lossless groupings of a byte sequence into chunks (patches) for byte-pooled models.
//!
//! Input is byte-tokenizer ids (0-255 bytes, 256 `<|endoftext|>`, 257 `<|pad|>`); output the
//! chunk lengths, which always sum to the input length, each between 1 and the chunker's
//! `max_len`: concatenating the chunks gives the input back.
//!
//! Whether a chunk starts at byte `t` may depend on byte `t` itself (whitespace: a word starts
//! at its leading space; BPE: tokens end where merges say) or only on the bytes before it
//! (fixed size; entropy, computed by a causal byte model): [`ChunkerKind::from_prefix`]. A model
//! that predicts the end of each chunk (stlm's byte-pooled models do) gives an honest likelihood
//! with either kind.

use crate::{Result, Tokenizer, TokenizerError, BYTE_IDS};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// How bytes are grouped into chunks (`chunker = { kind = "...", ... }` in a config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ChunkerKind {
    /// Chunks of `size` bytes (the last may be shorter), as MegaByte.
    Fixed {
        /// Bytes per chunk.
        size: usize,
    },
    /// Words with their leading whitespace: a chunk starts at a space, tab or newline that
    /// follows a non-space byte (so runs of whitespace stay with the next word), at each special
    /// token (a chunk of its own), and after `max_len` bytes.
    Whitespace {
        /// Longest chunk.
        max_len: usize,
    },
    /// The tokens of a byte-level BPE tokenizer (`tokenizer.json`), longer ones split after
    /// `max_len` bytes (the STLM reference: GPT-2 tokens, at most 12 bytes). Invalid UTF-8
    /// bytes and special tokens are chunks of their own.
    Bpe {
        /// A byte-level BPE `tokenizer.json`.
        tokenizer: PathBuf,
        /// Longest chunk.
        max_len: usize,
    },
    /// A new chunk where a small causal byte model is unsure of the next byte (BLT): its
    /// entropy (nats) exceeds `threshold`, or with `relative` exceeds the previous byte's
    /// entropy by more than `threshold`; also after `<|endoftext|>` and after `max_len` bytes.
    Entropy {
        /// A byte model directory trained with stlm (`model_type` any, the byte tokenizer).
        model: PathBuf,
        /// Entropy threshold in nats.
        threshold: f64,
        /// Compare with the previous byte's entropy instead of the global threshold.
        #[serde(default)]
        relative: bool,
        /// Longest chunk.
        max_len: usize,
    },
}

impl ChunkerKind {
    /// The config name.
    pub fn name(&self) -> &'static str {
        match self {
            ChunkerKind::Fixed { .. } => "fixed",
            ChunkerKind::Whitespace { .. } => "whitespace",
            ChunkerKind::Bpe { .. } => "bpe",
            ChunkerKind::Entropy { .. } => "entropy",
        }
    }

    /// Longest chunk, in bytes.
    pub fn max_len(&self) -> usize {
        match *self {
            ChunkerKind::Fixed { size } => size,
            ChunkerKind::Whitespace { max_len } | ChunkerKind::Bpe { max_len, .. } | ChunkerKind::Entropy { max_len, .. } => {
                max_len
            }
        }
    }

    /// True when whether a chunk starts at byte `t` depends only on the bytes before `t`.
    pub fn from_prefix(&self) -> bool {
        matches!(self, ChunkerKind::Fixed { .. } | ChunkerKind::Entropy { .. })
    }

    /// Checks the settings; the error names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.max_len() < 1 {
            let field = if matches!(self, ChunkerKind::Fixed { .. }) { "size" } else { "max_len" };
            return Err(format!("`{field}` must be at least 1"));
        }
        if let ChunkerKind::Entropy { threshold, .. } = self {
            if !threshold.is_finite() {
                return Err(format!("`threshold` must be a finite number, got {threshold}"));
            }
        }
        Ok(())
    }
}

/// A chunker ready to run (the BPE tokenizer loaded).
pub struct Chunker {
    /// The settings.
    pub kind: ChunkerKind,
    bpe: Option<Tokenizer>,
}

impl Chunker {
    /// Loads what `kind` needs; the error names the field or file at fault.
    pub fn new(kind: &ChunkerKind) -> Result<Self> {
        kind.validate().map_err(|e| TokenizerError::Invalid(format!("chunker {}: {e}", kind.name())))?;
        let bpe = match kind {
            ChunkerKind::Bpe { tokenizer, .. } => {
                let tok = Tokenizer::from_file(tokenizer)?;
                tok.token_byte_lengths("a test")
                    .map_err(|e| TokenizerError::File { path: tokenizer.clone(), message: e.to_string() })?;
                Some(tok)
            }
            _ => None,
        };
        Ok(Chunker { kind: kind.clone(), bpe })
    }

    /// Chunk lengths of `ids` (fixed, whitespace and BPE chunkers; entropy chunking needs the
    /// entropies: [`Chunker::chunk_with_entropies`]).
    pub fn chunk(&self, ids: &[u32]) -> Result<Vec<usize>> {
        match &self.kind {
            ChunkerKind::Fixed { size } => Ok(fixed(ids.len(), *size)),
            ChunkerKind::Whitespace { max_len } => Ok(whitespace(ids, *max_len)),
            ChunkerKind::Bpe { max_len, .. } => bpe(ids, self.bpe.as_ref().expect("loaded in new"), *max_len),
            ChunkerKind::Entropy { .. } => Err(TokenizerError::Invalid(
                "the entropy chunker needs next-byte entropies from its byte model".into(),
            )),
        }
    }

    /// Chunk lengths of `ids` given each byte's next-byte entropy `entropies[t]` (nats; the
    /// entropy of the model's prediction of byte `t` from the bytes before it).
    pub fn chunk_with_entropies(&self, ids: &[u32], entropies: &[f32]) -> Result<Vec<usize>> {
        match self.kind {
            ChunkerKind::Entropy { threshold, relative, max_len, .. } if entropies.len() == ids.len() => {
                Ok(by_entropy(ids, entropies, threshold as f32, relative, max_len))
            }
            ChunkerKind::Entropy { .. } => Err(TokenizerError::Invalid(format!(
                "{} entropies for {} bytes",
                entropies.len(),
                ids.len()
            ))),
            _ => self.chunk(ids),
        }
    }
}

/// Lengths from chunk starts: `starts(t)` says whether a chunk starts at `t > 0` given the
/// current chunk's length so far; every chunk is cut at `max_len`.
fn split(n: usize, max_len: usize, mut starts: impl FnMut(usize) -> bool) -> Vec<usize> {
    let mut lengths = Vec::new();
    let mut current = 0;
    for t in 0..n {
        if current > 0 && (current == max_len || starts(t)) {
            lengths.push(current);
            current = 0;
        }
        current += 1;
    }
    if current > 0 {
        lengths.push(current);
    }
    lengths
}

fn fixed(n: usize, size: usize) -> Vec<usize> {
    split(n, size, |_| false)
}

fn is_space(id: u32) -> bool {
    matches!(id, 0x20 | 0x09 | 0x0A | 0x0D)
}

fn whitespace(ids: &[u32], max_len: usize) -> Vec<usize> {
    let special = |id: u32| id >= BYTE_IDS;
    split(ids.len(), max_len, |t| {
        special(ids[t]) || special(ids[t - 1]) || (is_space(ids[t]) && !is_space(ids[t - 1]))
    })
}

fn by_entropy(ids: &[u32], entropies: &[f32], threshold: f32, relative: bool, max_len: usize) -> Vec<usize> {
    split(ids.len(), max_len, |t| {
        let high = if relative { entropies[t] - entropies[t - 1] > threshold } else { entropies[t] > threshold };
        ids[t - 1] >= BYTE_IDS || high
    })
}

fn bpe(ids: &[u32], tok: &Tokenizer, max_len: usize) -> Result<Vec<usize>> {
    let mut lengths = Vec::new();
    let cap = |n: usize, out: &mut Vec<usize>| {
        out.extend(std::iter::repeat_n(max_len, n / max_len));
        if !n.is_multiple_of(max_len) {
            out.push(n % max_len);
        }
    };
    for run in ids.split_inclusive(|&id| id >= BYTE_IDS) {
        let (bytes, special) = match run.split_last() {
            Some((&last, rest)) if last >= BYTE_IDS => (rest, true),
            _ => (run, false),
        };
        let bytes: Vec<u8> = bytes.iter().map(|&b| b as u8).collect();
        for piece in bytes.utf8_chunks() {
            if !piece.valid().is_empty() {
                for n in tok.token_byte_lengths(piece.valid())? {
                    cap(n, &mut lengths);
                }
            }
            lengths.extend(std::iter::repeat_n(1, piece.invalid().len()));
        }
        if special {
            lengths.push(1);
        }
    }
    Ok(lengths)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ids(s: &str) -> Vec<u32> {
        s.bytes().map(u32::from).collect()
    }

    fn pieces(text: &str, lengths: &[usize]) -> Vec<String> {
        let mut out = Vec::new();
        let mut at = 0;
        for &n in lengths {
            out.push(text[at..at + n].to_string());
            at += n;
        }
        out
    }

    #[test]
    fn whitespace_keeps_leading_spaces_and_splits_specials() {
        let text = "Once upon  a time,\nthe fox";
        let l = whitespace(&ids(text), 16);
        assert_eq!(pieces(text, &l), ["Once", " upon", "  a", " time,", "\nthe", " fox"]);
        let mut with_eot = ids("a b");
        with_eot.insert(1, 256);
        assert_eq!(whitespace(&with_eot, 16), vec![1, 1, 2]);
        assert_eq!(whitespace(&ids("abcdefg"), 3), vec![3, 3, 1], "capped");
    }

    #[test]
    fn fixed_and_entropy_boundaries() {
        assert_eq!(fixed(10, 4), vec![4, 4, 2]);
        let e = [0.0, 3.0, 0.5, 0.5, 2.5, 2.6, 0.1];
        let x = ids("abcdefg");
        assert_eq!(by_entropy(&x, &e, 2.0, false, 8), vec![1, 3, 1, 2], "starts where entropy > 2");
        assert_eq!(by_entropy(&x, &e, 1.0, true, 8), vec![1, 3, 3], "starts where it rises by > 1");
        let mut doc = ids("abc");
        doc.insert(1, 256);
        assert_eq!(by_entropy(&doc, &[0.0; 4], 9.0, false, 8), vec![2, 2], "a chunk starts after <|endoftext|>");
    }

    #[test]
    fn bpe_boundaries_follow_the_tokens() {
        let path = std::env::temp_dir().join(format!("stlm-chunk-{}.json", std::process::id()));
        let opts = crate::BpeOptions { vocab_size: 280, show_progress: false, ..Default::default() };
        let tok = Tokenizer::train_bpe_on_texts(&["the cat the cat the cat the hat".repeat(50)], &opts).unwrap();
        tok.save(&path).unwrap();
        let c = Chunker::new(&ChunkerKind::Bpe { tokenizer: path.clone(), max_len: 3 }).unwrap();
        let text = "the cat";
        let want: Vec<usize> = tok.encode(text, false).unwrap().iter().map(|&i| tok.token_bytes(i).unwrap().len()).collect();
        let got = c.chunk(&ids(text)).unwrap();
        assert!(want.iter().any(|&n| n > 1), "merges happened: {want:?}");
        assert_eq!(got.iter().sum::<usize>(), 7);
        assert!(got.iter().all(|&n| n <= 3), "{got:?}");
        let mut bad = ids("the");
        bad.push(0xFF);
        bad.push(256);
        let got = c.chunk(&bad).unwrap();
        assert_eq!(&got[got.len() - 2..], &[1, 1], "invalid byte and special alone: {got:?}");
        std::fs::remove_file(&path).unwrap();
        let e = Chunker::new(&ChunkerKind::Bpe { tokenizer: "/nope.json".into(), max_len: 3 }).err().unwrap().to_string();
        assert!(e.contains("/nope.json"), "{e}");
        let e = Chunker::new(&ChunkerKind::Fixed { size: 0 }).err().unwrap().to_string();
        assert!(e.contains("size"), "{e}");
    }

    fn bpe_chunker() -> &'static Chunker {
        static C: std::sync::OnceLock<Chunker> = std::sync::OnceLock::new();
        C.get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("stlm-chunk-bpe-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let opts = crate::BpeOptions { vocab_size: 300, show_progress: false, ..Default::default() };
            let tok = Tokenizer::train_bpe_on_texts(&["Once upon a time, héllo wörld! ".repeat(40)], &opts).unwrap();
            let path = dir.join("tokenizer.json");
            tok.save(&path).unwrap();
            Chunker::new(&ChunkerKind::Bpe { tokenizer: path, max_len: 4 }).unwrap()
        })
    }

    proptest! {
        /// BPE chunks partition arbitrary bytes (invalid UTF-8 and specials included).
        #[test]
        fn bpe_chunks_are_lossless(raw in proptest::collection::vec(0u32..258, 0..120)) {
            let lengths = bpe_chunker().chunk(&raw).unwrap();
            prop_assert_eq!(lengths.iter().sum::<usize>(), raw.len());
            prop_assert!(lengths.iter().all(|&n| (1..=4).contains(&n)), "{:?}", lengths);
        }

        /// Every chunker is lossless on arbitrary bytes and specials: lengths partition the input
        /// and respect the cap.
        #[test]
        fn chunkers_are_lossless(raw in proptest::collection::vec(0u32..258, 0..200), max_len in 1usize..20, th in 0f32..3.0) {
            let e: Vec<f32> = raw.iter().map(|&b| (b % 7) as f32 * 0.5).collect();
            for lengths in [fixed(raw.len(), max_len), whitespace(&raw, max_len), by_entropy(&raw, &e, th, false, max_len), by_entropy(&raw, &e, th, true, max_len)] {
                prop_assert_eq!(lengths.iter().sum::<usize>(), raw.len());
                prop_assert!(lengths.iter().all(|&n| (1..=max_len).contains(&n)), "{:?}", lengths);
            }
        }

        /// Prefix chunkers: the boundaries among the first `t` bytes never depend on later bytes.
        #[test]
        fn prefix_chunkers_do_not_look_ahead(raw in proptest::collection::vec(0u32..257, 1..120), cut in 0usize..120, max_len in 1usize..10) {
            let cut = cut.min(raw.len());
            let e: Vec<f32> = raw.iter().map(|&b| (b % 5) as f32).collect();
            let starts = |l: &[usize]| l.iter().scan(0, |at, &n| { let s = *at; *at += n; Some(s) }).filter(|&s| s < cut).collect::<Vec<_>>();
            for (full, prefix) in [
                (fixed(raw.len(), max_len), fixed(cut, max_len)),
                (by_entropy(&raw, &e, 2.0, false, max_len), by_entropy(&raw[..cut], &e[..cut], 2.0, false, max_len)),
            ] {
                prop_assert_eq!(starts(&full), starts(&prefix));
            }
        }
    }
}
