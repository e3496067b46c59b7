//! Distillation across tokenizers by byte-level alignment.
//!
//! A student window's text is re-tokenized with the teacher's tokenizer. Where a student token
//! and a teacher token end at the same byte, both models have read the same text and predict what
//! follows it; there both next-token distributions are reduced to a distribution over the *next
//! byte* (each token's probability goes to its first byte; special tokens share one extra bucket),
//! and the logit loss compares those 257-way distributions. Other positions are masked out.
//! This is exact for the first byte of the continuation and ignores how the rest of it would be
//! split into tokens.

use crate::{DistillError, Result};
use stlm_core::OptionError;
use stlm_tokenizers::Tokenizer;
use tch::{Device, Kind, Tensor};

/// Next-byte buckets: 256 byte values and one for special tokens.
pub const BYTE_BUCKETS: i64 = 257;

/// What a vocabulary's ids stand for in bytes.
struct Vocabulary {
    /// Each id's bytes (a special token's written form).
    bytes: Vec<Vec<u8>>,
    /// Each id's bucket `[vocab]`: its first byte, or 256 (special or empty).
    bucket: Tensor,
}

impl Vocabulary {
    /// The byte strings of ids `0..vocab` of `tok`, which must be a byte-level tokenizer.
    fn new(tok: &Tokenizer, vocab: i64, who: &str, device: Device) -> Result<Self> {
        let mut bytes = Vec::with_capacity(vocab as usize);
        let mut bucket = Vec::with_capacity(vocab as usize);
        for id in 0..vocab as u32 {
            match (tok.token_bytes(id), tok.id_to_token(id)) {
                (Some(b), _) => {
                    bucket.push(b.first().map_or(256, |&x| x as i64));
                    bytes.push(b);
                }
                // Special tokens stand for their written form; ids past the tokenizer (a padded
                // embedding) for nothing.
                (None, special) => {
                    bucket.push(256);
                    bytes.push(special.map(String::into_bytes).unwrap_or_default());
                }
            }
        }
        // A byte-level BPE has a token for each byte (GPT-2's stand-in characters).
        if (0..=255u8).any(|b| tok.token_to_id(&stlm_tokenizers::byte_char(b).to_string()).is_none_or(|id| id as i64 >= vocab)) {
            let why = format!(
                "the {who}'s tokenizer is not a byte-level BPE (GPT-2's byte alphabet, as `stlm tokenizer train` makes)"
            );
            return Err(OptionError::new("align", "bytes", why).into());
        }
        Ok(Vocabulary { bytes, bucket: Tensor::from_slice(&bucket).to_device(device) })
    }
}

/// The byte alignment of a student's and a teacher's tokenizations.
pub struct ByteAlignment {
    student: Vocabulary,
    teacher: Vocabulary,
    teacher_tok: Tokenizer,
    /// Teacher windows are cut to this many tokens.
    teacher_max_len: i64,
}

/// Teacher inputs for a student batch, and where they line up.
pub struct AlignedBatch {
    /// Teacher ids `[b, t]` (rows padded with 0 at the end).
    pub teacher_inputs: Tensor,
    /// For each student position `[b, s]`, the teacher position that ends at the same byte.
    pub index: Tensor,
    /// True where there is one `[b, s]`.
    pub mask: Tensor,
}

impl ByteAlignment {
    /// The alignment of a student (ids `0..student_vocab` of `student`) and a teacher (ids
    /// `0..teacher_vocab` of `teacher`, windows of at most `teacher_max_len` tokens).
    pub fn new(student: &Tokenizer, student_vocab: i64, teacher: Tokenizer, teacher_vocab: i64, teacher_max_len: i64, device: Device) -> Result<Self> {
        Ok(ByteAlignment {
            student: Vocabulary::new(student, student_vocab, "student", device)?,
            teacher: Vocabulary::new(&teacher, teacher_vocab, "teacher", device)?,
            teacher_tok: teacher,
            teacher_max_len,
        })
    }

    /// Re-tokenizes each row of student `inputs` `[b, s]` for the teacher and pairs the positions
    /// that end at the same byte.
    pub fn align(&self, inputs: &Tensor) -> Result<AlignedBatch> {
        let (b, s) = (inputs.size()[0], inputs.size()[1]);
        let rows: Vec<i64> = Vec::try_from(inputs.to_device(Device::Cpu).reshape([-1]))
            .map_err(|e| DistillError::Input(format!("student inputs: {e}")))?;
        let mut teacher_rows = Vec::with_capacity(b as usize);
        let (mut index, mut mask) = (vec![0i64; (b * s) as usize], vec![false; (b * s) as usize]);
        for (r, row) in rows.chunks(s as usize).enumerate() {
            // The row's bytes and where each student token ends.
            let mut text = Vec::new();
            let mut student_ends = Vec::with_capacity(row.len());
            for &id in row {
                text.extend_from_slice(self.student.bytes.get(id as usize).map_or(&[][..], |v| v.as_slice()));
                student_ends.push(text.len());
            }
            // The teacher reads the valid UTF-8 part: past a cut character at the start, up to
            // one at the end.
            let start = text.iter().take_while(|&&c| c & 0xC0 == 0x80).count();
            let valid = match std::str::from_utf8(&text[start..]) {
                Ok(t) => t,
                Err(e) => std::str::from_utf8(&text[start..start + e.valid_up_to()]).expect("valid up to here"),
            };
            let ids = self.teacher_tok.encode(valid, false).map_err(|e| DistillError::Input(format!("teacher tokenizer: {e}")))?;
            let ids: Vec<i64> = ids.into_iter().take(self.teacher_max_len as usize).map(i64::from).collect();
            // Teacher position u has read the bytes up to `end`: pair it with the student position
            // that has read exactly as many.
            let mut end = start;
            let mut j = 0;
            for (u, &id) in ids.iter().enumerate() {
                end += self.teacher.bytes.get(id as usize).map_or(0, Vec::len);
                while j < student_ends.len() && student_ends[j] < end {
                    j += 1;
                }
                if j < student_ends.len() && student_ends[j] == end {
                    index[r * s as usize + j] = u as i64;
                    mask[r * s as usize + j] = true;
                }
            }
            teacher_rows.push(ids);
        }
        let width = teacher_rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let flat: Vec<i64> = teacher_rows.iter().flat_map(|r| r.iter().copied().chain(std::iter::repeat(0)).take(width)).collect();
        let device = inputs.device();
        Ok(AlignedBatch {
            teacher_inputs: Tensor::from_slice(&flat).view([b, width as i64]).to_device(device),
            index: Tensor::from_slice(&index).view([b, s]).to_device(device),
            mask: Tensor::from_slice(&mask).view([b, s]).to_device(device),
        })
    }

    /// The student's token -> next-byte bucket map `[student vocab]`.
    pub fn student_bucket(&self) -> Tensor {
        self.student.bucket.shallow_clone()
    }

    /// The student's next-byte log-probabilities `[.., 257]` from its log-probabilities `[.., vocab]`.
    pub fn student_bytes(&self, log_probs: &Tensor) -> Tensor {
        next_byte_log_probs(log_probs, &self.student.bucket)
    }

    /// The teacher's next-byte log-probabilities `[b, s, 257]` at the student's positions, from its
    /// log-probabilities `[b, t, vocab]` over `batch.teacher_inputs`.
    pub fn teacher_bytes(&self, log_probs: &Tensor, batch: &AlignedBatch) -> Tensor {
        let bytes = next_byte_log_probs(log_probs, &self.teacher.bucket); // [b, t, 257]
        let index = batch.index.unsqueeze(-1).expand([-1, -1, BYTE_BUCKETS], false);
        bytes.gather(1, &index, false)
    }
}

/// Log-probabilities `[.., 257]` of the next byte from next-token log-probabilities `[.., vocab]`
/// and each token's bucket `[vocab]`.
pub fn next_byte_log_probs(log_probs: &Tensor, bucket: &Tensor) -> Tensor {
    let mut shape = log_probs.size();
    let last = shape.len() - 1;
    shape[last] = BYTE_BUCKETS;
    let probs = log_probs.exp();
    Tensor::zeros(&shape, (Kind::Float, log_probs.device())).index_add(last as i64, bucket, &probs.to_kind(Kind::Float)).clamp_min(1e-30).log()
}

#[cfg(test)]
mod tests {
    use super::*;
    use stlm_tokenizers::BpeOptions;

    fn bpe() -> Tokenizer {
        let text = "once upon a time, a little fox found a shiny stone. the fox said: look! ".repeat(50);
        Tokenizer::train_bpe_on_texts(&[text], &BpeOptions { vocab_size: 300, show_progress: false, ..Default::default() }).unwrap()
    }

    #[test]
    fn positions_pair_where_both_have_read_the_same_bytes() {
        let student = bpe();
        let text = "a little fox said";
        let ids: Vec<i64> = student.encode(text, false).unwrap().into_iter().map(i64::from).collect();
        assert!(ids.len() < text.len(), "the BPE merges something");
        let a = ByteAlignment::new(&student, 300, Tokenizer::bytes(), 258, 64, Device::Cpu).unwrap();
        let x = Tensor::from_slice(&ids).view([1, -1]);
        let batch = a.align(&x).unwrap();
        let t: Vec<i64> = Vec::try_from(batch.teacher_inputs.reshape([-1])).unwrap();
        assert_eq!(t, text.bytes().map(i64::from).collect::<Vec<_>>());
        // Every student token ends at a byte, so every position pairs with the teacher's
        // position of its last byte.
        let mut end = 0;
        let index: Vec<i64> = Vec::try_from(batch.index.reshape([-1])).unwrap();
        for (j, &id) in ids.iter().enumerate() {
            end += student.token_bytes(id as u32).unwrap().len();
            assert_eq!(index[j], end as i64 - 1);
        }
        assert!(bool::try_from(batch.mask.all()).unwrap());
        // The other way round, only the byte positions where a BPE token ends pair.
        let back = ByteAlignment::new(&Tokenizer::bytes(), 258, bpe(), 300, 64, Device::Cpu).unwrap();
        let bytes = Tensor::from_slice(&text.bytes().map(i64::from).collect::<Vec<_>>()).view([1, -1]);
        let batch = back.align(&bytes).unwrap();
        let paired = batch.mask.to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(paired, ids.len() as i64);
    }

    #[test]
    fn a_window_cut_inside_a_character_aligns_after_it() {
        let bytes = Tokenizer::bytes();
        let a = ByteAlignment::new(&bytes, 258, Tokenizer::bytes(), 258, 64, Device::Cpu).unwrap();
        // "é" is 0xC3 0xA9: a window starting at 0xA9 and ending at 0xC3.
        let row = [0xA9i64, b'a' as i64, b'b' as i64, 0xC3];
        let batch = a.align(&Tensor::from_slice(&row).view([1, 4])).unwrap();
        let mask: Vec<bool> = Vec::try_from(batch.mask.reshape([-1])).unwrap();
        assert_eq!(mask, vec![false, true, true, false]);
        let index: Vec<i64> = Vec::try_from(batch.index.reshape([-1])).unwrap();
        assert_eq!(&index[1..3], &[0, 1]);
    }

    #[test]
    fn next_byte_distribution_sums_token_probabilities_by_first_byte() {
        let tok = bpe();
        let a = ByteAlignment::new(&tok, 300, Tokenizer::bytes(), 258, 64, Device::Cpu).unwrap();
        tch::manual_seed(1);
        let logits = Tensor::randn([2, 300], (Kind::Double, Device::Cpu));
        let logp = logits.log_softmax(-1, Kind::Double);
        let got = a.student_bytes(&logp).exp();
        let p: Vec<Vec<f64>> = (0..2).map(|r| Vec::try_from(logp.get(r).exp()).unwrap()).collect();
        for (r, row) in p.iter().enumerate() {
            let mut want = vec![0.0; 257];
            for (id, q) in row.iter().enumerate() {
                let b = tok.token_bytes(id as u32).and_then(|b| b.first().copied()).map_or(256, usize::from);
                want[b] += q;
            }
            for (k, w) in want.iter().enumerate() {
                assert!((got.double_value(&[r as i64, k as i64]) - w).abs() < 1e-6, "row {r} byte {k}");
            }
        }
    }

    #[test]
    fn tokenizers_without_byte_tokens_are_refused() {
        // A real SentencePiece-style vocabulary (byte fallback, `▁` for spaces), when present.
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/tokenizers/mistral-7b-tokenizer.json");
        let Ok(mistral) = Tokenizer::from_file(&path) else {
            eprintln!("skipped: {} is not there", path.display());
            return;
        };
        let e = ByteAlignment::new(&bpe(), 300, mistral, 32000, 64, Device::Cpu).err().unwrap().to_string();
        assert!(e.contains("teacher's tokenizer is not a byte-level BPE"), "{e}");
    }
}
