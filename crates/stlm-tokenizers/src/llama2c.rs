//! llama2.c's `tokenizer.bin` <-> Hugging Face `tokenizer.json`.
//!
//! `tokenizer.bin`: a little-endian u32 `max_token_length`, then per token an f32 score, an i32
//! byte length and the piece's bytes. llama2.c writes sentencepiece vocabularies with `▁`
//! replaced by a space, raw bytes as `<0xNN>` pieces at ids 3..=258, and ids 0, 1, 2 as unk,
//! BOS (`"\n<s>\n"`) and EOS (`"\n</s>\n"`).
//!
//! run.c encodes a prompt as: BOS, a dummy-prefix `" "` token when the text is not empty, each
//! UTF-8 character's piece (or, for a character that is not a piece, its bytes as ids byte + 3),
//! then, while any adjacent pair concatenates to a piece, it merges the pair whose piece has the
//! highest score (the leftmost among equal scores; a score of -1e10 or less never merges). It
//! decodes a piece as its bytes, a `<0xNN>` piece as that byte, and drops the leading space of the
//! piece after BOS. [`Llama2cVocab::encode`] and [`Llama2cVocab::decode`] are those algorithms;
//! [`Llama2cVocab::to_tokenizer_json`] writes the BPE `tokenizer.json` (transformers' Llama
//! layout: `▁` for spaces, byte fallback, merges ordered by the merged piece's score) that gives
//! the same ids. The two differ only where two different splits of one piece overlap in a text
//! (`ab a ba` with `aba` a piece): run.c merges the leftmost, BPE the split ranked first.

use crate::{char_byte, file_err, Result, Tokenizer, TokenizerError};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

/// Scores at or below this never merge in run.c (its search starts from it).
pub const NO_MERGE_SCORE: f32 = -1e10;

/// The special pieces at ids 0, 1, 2 (run.c's BOS is 1, EOS 2) as `tokenizer.json` names them.
const SPECIALS: [&str; 3] = ["<unk>", "<s>", "</s>"];

/// A llama2.c vocabulary: pieces (raw bytes) with scores.
#[derive(Debug, Clone, PartialEq)]
pub struct Llama2cVocab {
    max_token_length: u32,
    pieces: Vec<Vec<u8>>,
    scores: Vec<f32>,
    index: HashMap<Vec<u8>, u32>,
}

impl Llama2cVocab {
    /// A vocabulary of `pieces` with `scores` (`max_token_length`: the longest piece).
    pub fn new(pieces: Vec<Vec<u8>>, scores: Vec<f32>) -> Result<Self> {
        if pieces.len() != scores.len() {
            return Err(TokenizerError::Invalid(format!("{} pieces but {} scores", pieces.len(), scores.len())));
        }
        if pieces.len() < 3 {
            return Err(TokenizerError::Invalid(format!(
                "a llama2.c vocabulary needs ids 0, 1, 2 (unk, BOS, EOS); this one has {} pieces",
                pieces.len()
            )));
        }
        let mut index = HashMap::new();
        for (id, p) in pieces.iter().enumerate().rev() {
            index.insert(p.clone(), id as u32);
        }
        let max_token_length = pieces.iter().map(Vec::len).max().unwrap_or(0) as u32;
        Ok(Llama2cVocab { max_token_length, pieces, scores, index })
    }

    /// Reads a `tokenizer.bin`, checking every length against the header and the file size.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| file_err(path, e))?;
        let bad = |m: String| file_err(path, format!("not a llama2.c tokenizer.bin: {m}"));
        let word = |at: usize| -> Option<[u8; 4]> { bytes.get(at..at + 4).map(|b| b.try_into().expect("4 bytes")) };
        let max_len = word(0).map(u32::from_le_bytes).ok_or_else(|| bad("shorter than its 4-byte header".into()))?;
        let (mut pieces, mut scores) = (Vec::new(), Vec::new());
        let mut at = 4;
        while at < bytes.len() {
            let id = pieces.len();
            let (Some(s), Some(n)) = (word(at), word(at + 4)) else {
                return Err(bad(format!("token {id} at byte {at}: the file ends inside its score and length")));
            };
            let (score, len) = (f32::from_le_bytes(s), i32::from_le_bytes(n));
            if len < 0 || len as u32 > max_len {
                return Err(bad(format!("token {id} at byte {at}: length {len} is outside 0..={max_len} (max_token_length)")));
            }
            if score.is_nan() {
                return Err(bad(format!("token {id}: its score is NaN")));
            }
            let start = at + 8;
            let piece = bytes.get(start..start + len as usize).ok_or_else(|| {
                bad(format!("token {id} at byte {at}: {len} bytes announced, {} left (truncated?)", bytes.len() - start))
            })?;
            pieces.push(piece.to_vec());
            scores.push(score);
            at = start + len as usize;
        }
        let mut vocab = Self::new(pieces, scores).map_err(|e| file_err(path, e))?;
        vocab.max_token_length = max_len;
        Ok(vocab)
    }

    /// The `tokenizer.bin` bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.max_token_length.to_le_bytes().to_vec();
        for (p, s) in self.pieces.iter().zip(&self.scores) {
            out.extend(s.to_le_bytes());
            out.extend((p.len() as i32).to_le_bytes());
            out.extend(p);
        }
        out
    }

    /// Writes `tokenizer.bin` atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::write_atomic(path, &self.to_bytes())
    }

    /// This vocabulary with unused pieces `<unused{id}>` (never merged) appended up to `n` ids.
    pub fn padded(&self, n: usize) -> Result<Self> {
        let mut pieces = self.pieces.clone();
        let mut scores = self.scores.clone();
        for id in self.len()..n {
            pieces.push(format!("<unused{id}>").into_bytes());
            scores.push(NO_MERGE_SCORE);
        }
        let mut v = Self::new(pieces, scores)?;
        v.max_token_length = v.max_token_length.max(self.max_token_length);
        Ok(v)
    }

    /// This vocabulary with the pieces (and scores) of ids `a` and `b` exchanged.
    pub fn swapped(&self, a: u32, b: u32) -> Result<Self> {
        let (mut pieces, mut scores) = (self.pieces.clone(), self.scores.clone());
        if a as usize >= pieces.len() || b as usize >= pieces.len() {
            return Err(TokenizerError::Invalid(format!("ids {a} and {b}: the vocabulary has {}", pieces.len())));
        }
        pieces.swap(a as usize, b as usize);
        scores.swap(a as usize, b as usize);
        let mut v = Self::new(pieces, scores)?;
        v.max_token_length = self.max_token_length;
        Ok(v)
    }

    /// Number of pieces.
    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    /// Always false: a vocabulary has ids 0, 1 and 2.
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// The bytes of piece `id`.
    pub fn piece(&self, id: u32) -> Option<&[u8]> {
        self.pieces.get(id as usize).map(Vec::as_slice)
    }

    /// The score of piece `id`.
    pub fn score(&self, id: u32) -> Option<f32> {
        self.scores.get(id as usize).copied()
    }

    fn lookup(&self, piece: &[u8]) -> Option<u32> {
        self.index.get(piece).copied()
    }

    /// Token ids of `text` as run.c's `encode` gives them (BOS first when `bos`).
    pub fn encode(&self, text: &str, bos: bool) -> Vec<u32> {
        let mut ids: Vec<u32> = Vec::new();
        if bos {
            ids.push(1);
        }
        if !text.is_empty() {
            // run.c looks the dummy prefix up and uses whatever it finds (-1 if absent).
            ids.extend(self.lookup(b" "));
        }
        for ch in text.chars() {
            let mut buf = [0u8; 4];
            let s = ch.encode_utf8(&mut buf).as_bytes();
            match self.lookup(s) {
                Some(id) => ids.push(id),
                None => ids.extend(s.iter().map(|&b| b as u32 + 3)),
            }
        }
        loop {
            let mut best: Option<(f32, u32, usize)> = None;
            for i in 0..ids.len().saturating_sub(1) {
                let (Some(a), Some(b)) = (self.piece(ids[i]), self.piece(ids[i + 1])) else { continue };
                let Some(id) = self.lookup(&[a, b].concat()) else { continue };
                let score = self.scores[id as usize];
                if score > best.map_or(NO_MERGE_SCORE, |b| b.0) {
                    best = Some((score, id, i));
                }
            }
            let Some((_, id, i)) = best else { break };
            ids[i] = id;
            ids.remove(i + 1);
        }
        ids
    }

    /// The bytes run.c prints for `ids` (after a BOS when `after_bos`): each piece, `<0xNN>` as
    /// its byte, the leading space of a piece after BOS dropped.
    pub fn decode(&self, ids: &[u32], after_bos: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut prev = if after_bos { 1 } else { u32::MAX };
        for &id in ids {
            let Some(mut piece) = self.piece(id) else { continue };
            if prev == 1 && piece.first() == Some(&b' ') {
                piece = &piece[1..];
            }
            match byte_piece(piece) {
                Some(b) => out.push(b),
                None => out.extend(piece),
            }
            prev = id;
        }
        out
    }

    /// The Hugging Face `tokenizer.json` (transformers' Llama layout) that encodes and decodes
    /// as run.c does: ids 0-2 are `<unk>`, `<s>` (added in front), `</s>`; spaces are `▁`;
    /// `<0xNN>` pieces are byte fallback; merges are every split of a piece into two pieces,
    /// ordered by the piece's score (then id, then split point).
    pub fn to_tokenizer_json(&self) -> Result<String> {
        let mut names = Vec::with_capacity(self.len());
        let mut vocab = serde_json::Map::new();
        for (id, p) in self.pieces.iter().enumerate() {
            let name = match SPECIALS.get(id) {
                Some(s) => s.to_string(),
                None => std::str::from_utf8(p)
                    .map_err(|_| {
                        TokenizerError::Invalid(format!(
                            "token {id} (`{}`) is not UTF-8 text, as byte-level BPE pieces are not: convert only sentencepiece-style vocabularies",
                            String::from_utf8_lossy(p)
                        ))
                    })?
                    .replace(' ', "▁"),
            };
            if let Some(first) = vocab.insert(name.clone(), json!(id)) {
                return Err(TokenizerError::Invalid(format!("tokens {first} and {id} are both `{name}`")));
            }
            names.push(name);
        }
        let ids: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
        let mergeable = |id: usize| id >= SPECIALS.len() && byte_piece(&self.pieces[id]).is_none();
        let mut merges: Vec<(f32, usize, usize, &str, &str)> = Vec::new();
        for (id, name) in names.iter().enumerate().filter(|&(id, _)| mergeable(id) && self.scores[id] > NO_MERGE_SCORE) {
            for (k, _) in name.char_indices().skip(1) {
                let (a, b) = name.split_at(k);
                if ids.get(a).is_some_and(|&i| mergeable(i)) && ids.get(b).is_some_and(|&i| mergeable(i)) {
                    merges.push((self.scores[id], id, k, a, b));
                }
            }
        }
        merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
        let merges: Vec<Value> = merges.iter().map(|m| json!([m.3, m.4])).collect();
        let special = |id: usize| {
            json!({"id": id, "content": SPECIALS[id], "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        };
        let bos = json!({"SpecialToken": {"id": "<s>", "type_id": 0}});
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [special(0), special(1), special(2)],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
            "pre_tokenizer": null,
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                      "vocab": vocab, "merges": merges},
        });
        Ok(serde_json::to_string_pretty(&spec).expect("json values serialize"))
    }

    /// The [`Tokenizer`] of [`Llama2cVocab::to_tokenizer_json`].
    pub fn to_tokenizer(&self) -> Result<Tokenizer> {
        let inner: tokenizers::Tokenizer =
            self.to_tokenizer_json()?.parse().map_err(|e| TokenizerError::Tokenizer(format!("{e}")))?;
        Ok(Tokenizer::from_inner(inner))
    }

    /// The llama2.c vocabulary of a BPE `tokenizer.json`, for run.c: a sentencepiece-style one
    /// (`▁` for spaces, `<0xNN>` bytes) or GPT-2-style byte-level BPE (pieces become the bytes
    /// they stand for). A merged piece scores minus the rank of the first merge making it, every
    /// other piece [`NO_MERGE_SCORE`]; special tokens keep their text (`<s>` and `</s>` become
    /// llama2.c's `"\n<s>\n"` and `"\n</s>\n"`).
    pub fn from_tokenizer(tok: &Tokenizer) -> Result<Self> {
        let spec: Value = serde_json::from_str(&tok.to_json()?).map_err(|e| TokenizerError::Tokenizer(e.to_string()))?;
        let model = &spec["model"];
        if model["type"] != "BPE" {
            return Err(TokenizerError::Invalid(format!(
                "llama2.c vocabularies are BPE; this tokenizer.json's model is {}",
                model["type"]
            )));
        }
        let byte_level = spec["decoder"].to_string().contains("ByteLevel");
        let n = tok.vocab_size();
        let specials: HashMap<String, u32> = spec["added_tokens"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| Some((t["content"].as_str()?.to_string(), t["id"].as_u64()? as u32)))
            .collect();
        let mut pieces = Vec::with_capacity(n);
        for id in 0..n as u32 {
            let name = tok.id_to_token(id).ok_or_else(|| TokenizerError::Invalid(format!("id {id} has no token")))?;
            let piece = match name.as_str() {
                _ if specials.contains_key(&name) => match name.as_str() {
                    "<s>" | "</s>" => format!("\n{name}\n").into_bytes(),
                    _ => name.into_bytes(),
                },
                _ if byte_level => name.chars().map(char_byte).collect::<Option<Vec<u8>>>().ok_or_else(|| {
                    TokenizerError::Invalid(format!("token {id} `{name}` is not in the byte-level alphabet"))
                })?,
                _ => name.replace('▁', " ").into_bytes(),
            };
            pieces.push(piece);
        }
        Self::new(pieces, merge_scores(model, tok))
    }
}

/// The merges of a BPE `tokenizer.json` model (`"a b"` strings or `["a", "b"]` pairs, both
/// forms the `tokenizers` crate writes) as pairs, in rank order.
pub(crate) fn merge_pairs(model: &Value) -> Vec<(String, String)> {
    let pair = |m: &Value| match m {
        Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())),
        Value::Array(p) => match (p.first()?.as_str(), p.get(1)?.as_str()) {
            (Some(a), Some(b)) => Some((a.to_string(), b.to_string())),
            _ => None,
        },
        _ => None,
    };
    model["merges"].as_array().into_iter().flatten().filter_map(pair).collect()
}

/// Sentencepiece-style scores of `tok`'s ids: a merged piece scores minus the rank of the first
/// merge making it, every other piece [`NO_MERGE_SCORE`] (`model`: its `tokenizer.json` model).
pub(crate) fn merge_scores(model: &Value, tok: &Tokenizer) -> Vec<f32> {
    let mut scores = vec![NO_MERGE_SCORE; tok.vocab_size()];
    for (rank, (a, b)) in merge_pairs(model).into_iter().enumerate() {
        let id = tok.token_to_id(&format!("{a}{b}")).map(|id| id as usize).filter(|&id| id < scores.len());
        if let Some(id) = id.filter(|&id| scores[id] == NO_MERGE_SCORE) {
            scores[id] = -(rank as f32);
        }
    }
    scores
}

/// The byte of a `<0xNN>` piece.
pub(crate) fn byte_piece(piece: &[u8]) -> Option<u8> {
    let hex = piece.strip_prefix(b"<0x")?.strip_suffix(b">")?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A sentencepiece-style vocabulary: specials, the 256 byte pieces, characters, and pieces
    /// made by `merges` (pairs of earlier pieces), scored by merge order.
    fn vocab(chars: &str, merges: &[(&str, &str)]) -> Llama2cVocab {
        let mut pieces: Vec<Vec<u8>> = vec![b"<unk>".to_vec(), b"\n<s>\n".to_vec(), b"\n</s>\n".to_vec()];
        pieces.extend((0..=255u8).map(|b| format!("<0x{b:02X}>").into_bytes()));
        let mut scores = vec![0.0; pieces.len()];
        for c in chars.chars() {
            pieces.push(c.to_string().into_bytes());
            scores.push(NO_MERGE_SCORE);
        }
        for (rank, (a, b)) in merges.iter().enumerate() {
            pieces.push(format!("{a}{b}").into_bytes());
            scores.push(-(rank as f32));
        }
        Llama2cVocab::new(pieces, scores).unwrap()
    }

    fn stories() -> Llama2cVocab {
        let merges = [
            (" ", "t"), ("h", "e"), (" t", "he"), (" ", "a"), ("o", "n"), (" ", "s"), ("e", "d"), (" ", "w"),
            ("a", "s"), (" w", "as"), ("i", "n"), (" ", "O"), (" O", "n"), (" On", "c"), (" Onc", "e"), (" ", "u"),
            (" u", "p"), (" up", "on"), ("i", "m"), (" t", "im"), (" tim", "e"), (" a", "n"), (" an", "d"),
            ("l", "i"), (" ", "l"), (" l", "i"), (" li", "t"), (" lit", "t"), (" litt", "l"), (" littl", "e"),
        ];
        vocab(" abcdefghijklmnopqrstuvwxyzOT.,!'", &merges)
    }

    #[test]
    fn run_c_encoding_and_decoding() {
        let v = stories();
        let ids = v.encode("Once upon a time", true);
        let text: Vec<String> = ids.iter().map(|&i| String::from_utf8_lossy(v.piece(i).unwrap()).into_owned()).collect();
        assert_eq!(text, ["\n<s>\n", " Once", " upon", " a", " time"]);
        assert_eq!(v.decode(&ids[1..], true), b"Once upon a time");
        // A character outside the vocabulary falls back to its UTF-8 bytes (byte + 3).
        let ids = v.encode("é", false);
        assert_eq!(ids[1..], [0xC3 + 3, 0xA9 + 3]);
        assert_eq!(v.decode(&ids[1..], false), "é".as_bytes());
    }

    #[test]
    fn bin_round_trip_and_truncation() {
        let v = stories();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.bin");
        v.write(&path).unwrap();
        assert_eq!(Llama2cVocab::read(&path).unwrap(), v);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 2]).unwrap();
        let e = Llama2cVocab::read(&path).unwrap_err().to_string();
        assert!(e.contains("tokenizer.bin") && e.contains("truncated"), "{e}");
        std::fs::write(&path, &bytes[..2]).unwrap();
        assert!(Llama2cVocab::read(&path).unwrap_err().to_string().contains("header"));
    }

    #[test]
    fn duplicate_pieces_are_refused_by_name() {
        let mut v = stories();
        v.pieces[300] = b" a".to_vec();
        let e = Llama2cVocab::new(v.pieces.clone(), v.scores.clone()).unwrap().to_tokenizer_json().unwrap_err();
        assert!(e.to_string().contains("both `▁a`"), "{e}");
    }

    #[test]
    fn pieces_that_are_not_text_are_refused_by_id() {
        let mut pieces = stories().pieces.clone();
        pieces[290] = vec![b'a', 0xE2];
        let v = Llama2cVocab::new(pieces, stories().scores.clone()).unwrap();
        let e = v.to_tokenizer_json().unwrap_err().to_string();
        assert!(e.contains("token 290") && e.contains("not UTF-8"), "{e}");
    }

    #[test]
    fn from_tokenizer_inverts_to_tokenizer() {
        let v = stories();
        let back = Llama2cVocab::from_tokenizer(&v.to_tokenizer().unwrap()).unwrap();
        assert_eq!(back.pieces, v.pieces);
        for text in ["Once upon a time, the little cat was on the mat.", "it was late", ""] {
            assert_eq!(back.encode(text, true), v.encode(text, true), "{text:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The converted tokenizer.json gives run.c's ids, and decodes them to the text.
        #[test]
        fn tokenizer_json_encodes_and_decodes_as_run_c(text in "[ a-zOT.,!'é\u{4e16}\n]{0,40}") {
            let v = stories();
            let tok = v.to_tokenizer().unwrap();
            let ids = tok.encode(&text, true).unwrap();
            prop_assert_eq!(&ids, &v.encode(&text, true));
            let decoded = tok.decode(&ids, true).unwrap();
            prop_assert_eq!(decoded.as_bytes(), &v.decode(&ids[1..], true)[..]);
        }
    }
}

/// On a real sentencepiece-converted vocabulary (Mistral's 32000 tokens, when
/// `../shared/data` has it): tokenizer.json -> tokenizer.bin -> tokenizer.json encodes story text
/// as run.c's algorithm does on that tokenizer.bin, and as the original tokenizer.json.
#[cfg(test)]
mod real {
    use super::*;

    #[test]
    fn a_real_vocabulary_converts_both_ways() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
        let (tok_path, text_path) = (root.join("tokenizers/mistral-7b-tokenizer.json"), root.join("tinystories/valid_1000.txt"));
        if !tok_path.is_file() || !text_path.is_file() {
            eprintln!("skipping: {} or {} is missing", tok_path.display(), text_path.display());
            return;
        }
        let original = Tokenizer::from_file(&tok_path).unwrap();
        let vocab = Llama2cVocab::from_tokenizer(&original).unwrap();
        assert_eq!(vocab.len(), 32000);
        assert_eq!(vocab.piece(1), Some(&b"\n<s>\n"[..]));
        assert_eq!(vocab.piece(3 + 0x41), Some(&b"<0x41>"[..]));
        let converted = vocab.to_tokenizer().unwrap();
        let text = std::fs::read_to_string(&text_path).unwrap();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).take(300).collect();
        let (mut same_as_original, mut n) = (0, 0);
        for line in &lines {
            let ids = converted.encode(line, true).unwrap();
            assert_eq!(ids, vocab.encode(line, true), "{line:?}");
            assert_eq!(converted.decode(&ids, true).unwrap(), *line);
            same_as_original += (original.encode(line, true).unwrap() == ids) as usize;
            n += 1;
        }
        assert_eq!(same_as_original, n, "the converted tokenizer encodes as the original");
    }
}
