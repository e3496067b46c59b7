//! The byte tokenizer (ids 0-255 are the byte values, then `<|endoftext|>` and `<|pad|>`) as a
//! Hugging Face `tokenizer.json`, and the byte-level alphabet that maps GPT-2-style BPE tokens
//! back to their bytes.

use crate::{Result, Tokenizer, TokenizerError, ENDOFTEXT, PAD};
use serde_json::json;

/// Number of byte ids (0..=255); the byte tokenizer's specials follow.
pub const BYTE_IDS: u32 = 256;
/// The byte tokenizer's end-of-text id.
pub const BYTE_EOT: u32 = 256;
/// The byte tokenizer's padding id.
pub const BYTE_PAD: u32 = 257;

/// GPT-2's printable stand-in for each byte (`bytes_to_unicode`): printable Latin-1 characters
/// stand for themselves, the other 68 bytes for code points from 256 up, in byte order.
pub fn byte_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    if printable(b) {
        return b as char;
    }
    let n = (0..b).filter(|&c| !printable(c)).count() as u32;
    char::from_u32(256 + n).expect("code points 256..324 are chars")
}

/// The byte a byte-level character stands for (the inverse of [`byte_char`]).
pub fn char_byte(c: char) -> Option<u8> {
    let code = c as u32;
    if code < 256 {
        let b = code as u8;
        return (byte_char(b) == c).then_some(b);
    }
    (0..=255u8).find(|&b| byte_char(b) == c)
}

impl Tokenizer {
    /// The byte tokenizer: every byte is its own id (so any byte string encodes losslessly,
    /// invalid UTF-8 included), `<|endoftext|>` is 256 and `<|pad|>` 257. Decoding replaces
    /// invalid UTF-8 sequences with U+FFFD.
    pub fn bytes() -> Self {
        let vocab: serde_json::Map<String, serde_json::Value> =
            (0..=255u8).map(|b| (byte_char(b).to_string(), json!(b))).collect();
        let special = |id: u32, content: &str| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        };
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false});
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [special(BYTE_EOT, ENDOFTEXT), special(BYTE_PAD, PAD)],
            "normalizer": null,
            "pre_tokenizer": byte_level,
            "post_processor": null,
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": []},
        });
        let inner: tokenizers::Tokenizer = spec.to_string().parse().expect("the byte tokenizer's JSON is valid");
        Tokenizer::from_inner(inner)
    }

    /// True for the byte tokenizer of [`Tokenizer::bytes`] (ids 0-255 are the byte values).
    pub fn is_bytes(&self) -> bool {
        (0..=255u8).all(|b| self.inner.id_to_token(b as u32).is_some_and(|t| t == byte_char(b).to_string()))
            && self.vocab_size() == (BYTE_IDS + 2) as usize
    }

    /// The bytes a token stands for in a byte-level BPE vocabulary (GPT-2's alphabet), or
    /// `None` for special tokens and vocabularies of other kinds.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let token = self.inner.id_to_token(id)?;
        if self.inner.get_added_vocabulary().is_special_token(&token) {
            return None;
        }
        token.chars().map(char_byte).collect()
    }

    /// Byte lengths of the tokens `text` encodes to (their sum is `text.len()`), for
    /// byte-level BPE tokenizers; an error for other kinds.
    pub fn token_byte_lengths(&self, text: &str) -> Result<Vec<usize>> {
        let ids = self.encode(text, false)?;
        let lengths = ids
            .iter()
            .map(|&id| match self.token_bytes(id) {
                Some(b) => Some(b.len()),
                None => self.inner.id_to_token(id).filter(|t| text.contains(t.as_str())).map(|t| t.len()),
            })
            .collect::<Option<Vec<usize>>>();
        match lengths {
            Some(l) if l.iter().sum::<usize>() == text.len() => Ok(l),
            _ => Err(TokenizerError::Invalid(
                "BPE chunk boundaries need a byte-level BPE tokenizer (GPT-2's alphabet, as `stlm tokenizer train` makes)".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn byte_alphabet_is_gpt2s() {
        assert_eq!(byte_char(b'A'), 'A');
        assert_eq!(byte_char(b' '), 'Ġ', "GPT-2's space");
        assert_eq!(byte_char(b'\n'), 'Ċ');
        for b in 0..=255u8 {
            assert_eq!(char_byte(byte_char(b)), Some(b));
        }
        let alphabet = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet();
        assert!((0..=255u8).all(|b| alphabet.contains(&byte_char(b))));
    }

    #[test]
    fn byte_tokenizer_ids_are_bytes() {
        let tok = Tokenizer::bytes();
        assert!(tok.is_bytes());
        assert_eq!(tok.vocab_size(), 258);
        assert_eq!(tok.eos_id(), Some(BYTE_EOT));
        assert_eq!(tok.pad_id(), Some(BYTE_PAD));
        let text = "héllo <|endoftext|>\n";
        let mut want: Vec<u32> = "héllo ".bytes().map(u32::from).collect();
        want.extend([BYTE_EOT, 10]);
        assert_eq!(tok.encode(text, false).unwrap(), want);
        assert_eq!(tok.decode(&want, false).unwrap(), text);
        assert_eq!(tok.decode(&[0xE2, 0x82], true).unwrap(), "\u{FFFD}", "invalid UTF-8 is replaced, not an error");
        let back = Tokenizer::from_inner(tok.to_json().unwrap().parse().unwrap());
        assert!(back.is_bytes(), "survives tokenizer.json");
        let lengths = tok.id_byte_lengths().unwrap();
        assert!(lengths[..256].iter().all(|&n| n == 1));
        assert_eq!(&lengths[256..], &[ENDOFTEXT.len(), PAD.len()]);
        let opts = crate::BpeOptions { vocab_size: 300, show_progress: false, ..Default::default() };
        assert!(!Tokenizer::train_bpe_on_texts(&["abc abc".into()], &opts).unwrap().is_bytes());
    }

    proptest! {
        #[test]
        fn any_text_round_trips(text in ".{0,64}") {
            let tok = Tokenizer::bytes();
            let ids = tok.encode(&text, false).unwrap();
            prop_assert_eq!(ids.iter().map(|&i| i as u8).collect::<Vec<_>>(), text.as_bytes().to_vec());
            prop_assert_eq!(tok.decode(&ids, false).unwrap(), text);
        }
    }
}
