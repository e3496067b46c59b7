//! llama2.c checkpoints (`model.bin`) <-> Llama model directories.
//!
//! Three formats, as llama2.c's `export.py` writes them (little-endian, row-major, PyTorch's
//! `[out, in]` for every matrix):
//! - version 0 (legacy, what run.c reads): 7 int32 (`dim, hidden_dim, n_layers, n_heads,
//!   n_kv_heads, vocab_size, seq_len`; a negative vocab size means an untied classifier), then
//!   float32 weights: embedding, every layer's attention norm, wq, wk, wv, wo, ffn norm, w1, w2,
//!   w3 (each kind for all layers in turn), final norm, the RoPE cos and sin tables
//!   `[seq_len, head_size / 2]`, and the classifier when untied.
//! - version 1: a 256-byte header (u32 magic `0x616b3432` "ak42", int32 version, the 7 int32, a
//!   u8 shared-classifier flag, zeros), then float32: attention norms, ffn norms, final norm,
//!   embedding, wq, wk, wv, wo, w1, w2, w3, classifier when untied.
//! - version 2 (what runq.c reads): the version 1 header plus an int32 group size after the
//!   flag; float32 norms as in version 1, then each matrix (embedding, wq.., w3, classifier when
//!   untied) as int8 values followed by one float32 scale per group of `group_size` values
//!   (symmetric Q8_0: scale = max |w| / 127, q = round(w / scale)). Dequantised on import.
//!
//! llama2.c rotates interleaved pairs `(2i, 2i+1)` of each head; transformers (and stlm) rotate
//! halves `(i, i + head_size / 2)`. Import permutes the rows of wq and wk per head into the
//! rotate-half order (transformers' `convert_llama_weights_to_hf` permutation), export back.
//! The formats fix RMSNorm's epsilon at 1e-5, RoPE's theta at 10000, SiLU, and no biases.

use crate::config::{Activation, MlpKind, ModelConfig, NormKind, PositionKind};
use crate::io::save_dir;
use crate::{ModelError, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use stlm_core::{atomic_write_bytes, CoreError};
use stlm_tokenizers::Llama2cVocab;
use tch::{Kind, Tensor};

/// The magic number of versions 1 and 2 ("ak42").
pub const MAGIC: u32 = 0x616b_3432;
/// Header bytes of versions 1 and 2.
const HEADER_BYTES: usize = 256;
/// RMSNorm epsilon and RoPE theta that run.c hard-codes.
pub const NORM_EPS: f64 = 1e-5;
/// RoPE base that run.c hard-codes.
pub const ROPE_THETA: f64 = 10000.0;

/// A llama2.c checkpoint format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Legacy header, float32 (run.c).
    V0,
    /// "ak42" header, float32.
    V1,
    /// "ak42" header, int8 groups of `group_size` with float32 scales (runq.c).
    V2 {
        /// Values per scale.
        group_size: usize,
    },
}

impl Format {
    /// The version number export.py calls it by.
    pub fn version(self) -> u32 {
        match self {
            Format::V0 => 0,
            Format::V1 => 1,
            Format::V2 { .. } => 2,
        }
    }

    /// The format of export.py's `version` (2 quantizes in groups of `group_size`).
    pub fn from_version(version: u32, group_size: usize) -> Result<Format> {
        match version {
            0 => Ok(Format::V0),
            1 => Ok(Format::V1),
            2 if group_size > 0 => Ok(Format::V2 { group_size }),
            2 => Err(ModelError::Input("group size 0: must be positive".into())),
            v => Err(ModelError::Input(format!("version {v}: expected 0, 1 or 2"))),
        }
    }
}

/// The shape fields of a llama2.c header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The file's format.
    pub format: Format,
    /// Model width.
    pub dim: usize,
    /// Feed-forward width.
    pub hidden_dim: usize,
    /// Layers.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Longest sequence (positions of the RoPE tables).
    pub seq_len: usize,
    /// The classifier is the embedding.
    pub shared_classifier: bool,
}

impl Header {
    /// The header as JSON: the version and every shape field.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "version": self.format.version(), "dim": self.dim, "hidden_dim": self.hidden_dim, "n_layers": self.n_layers,
            "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads, "vocab_size": self.vocab_size, "seq_len": self.seq_len,
            "shared_classifier": self.shared_classifier,
        })
    }
}

impl std::fmt::Display for Header {
    /// The shape in one line: `dim 288, hidden_dim 768, 6 layers, ...`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let classifier = if self.shared_classifier { "tied classifier" } else { "own classifier" };
        write!(
            f,
            "dim {}, hidden_dim {}, {} layers, {} heads ({} kv), vocab {}, seq_len {}, {classifier}",
            self.dim, self.hidden_dim, self.n_layers, self.n_heads, self.n_kv_heads, self.vocab_size, self.seq_len
        )
    }
}

/// How one tensor is stored.
#[derive(Clone, Copy, PartialEq)]
enum Storage {
    F32,
    Q8,
    RopeCos,
    RopeSin,
}

/// One tensor of a file, in file order: its Hugging Face name, shape and storage.
struct Entry {
    name: String,
    shape: Vec<usize>,
    storage: Storage,
}

impl Entry {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

impl Header {
    /// Parses the header of `bytes` (a whole file) and checks the sizes it implies against the
    /// file's length; returns the header and the offset of the first weight.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<(Header, usize)> {
        let bad = |m: String| ModelError::Weights { path: path.to_path_buf(), message: format!("llama2.c checkpoint: {m}") };
        let int = |at: usize| bytes.get(at..at + 4).map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")));
        let magic = bytes.get(0..4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
        let (format, fields_at, shared_flag, data) = if magic == Some(MAGIC) {
            let version = int(4).ok_or_else(|| bad("the file ends inside its header".into()))?;
            let flag = *bytes.get(36).ok_or_else(|| bad("the file ends inside its header".into()))?;
            let format = match version {
                1 => Format::V1,
                2 => {
                    let gs = int(37).ok_or_else(|| bad("the file ends inside its header".into()))?;
                    if gs <= 0 {
                        return Err(bad(format!("group size {gs} in the version 2 header must be positive")));
                    }
                    Format::V2 { group_size: gs as usize }
                }
                v => return Err(bad(format!("version {v} is unknown (llama2.c writes 1 and 2 after the magic ak42)"))),
            };
            if flag > 1 {
                return Err(bad(format!("shared-classifier flag {flag} must be 0 or 1")));
            }
            (format, 8, Some(flag == 1), HEADER_BYTES)
        } else {
            (Format::V0, 0, None, 28)
        };
        let mut f = [0i32; 7];
        for (i, v) in f.iter_mut().enumerate() {
            *v = int(fields_at + 4 * i).ok_or_else(|| bad(format!("{} bytes: too short for a header", bytes.len())))?;
        }
        let names = ["dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"];
        let shared = shared_flag.unwrap_or(f[5] > 0);
        f[5] = f[5].checked_abs().unwrap_or(0);
        if let Some(i) = f.iter().position(|&v| v <= 0) {
            return Err(bad(format!("header field {} is {}; it must be positive", names[i], f[i])));
        }
        let [dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len] = f.map(|v| v as usize);
        let h = Header { format, dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len, shared_classifier: shared };
        if dim % n_heads != 0 || (dim / n_heads) % 2 != 0 {
            return Err(bad(format!("dim {dim} is not n_heads {n_heads} heads of an even size")));
        }
        if n_kv_heads > n_heads || n_heads % n_kv_heads != 0 {
            return Err(bad(format!("n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")));
        }
        if let Format::V2 { group_size } = format {
            if dim % group_size != 0 {
                return Err(bad(format!("group size {group_size} does not divide dim {dim}")));
            }
        }
        let need = data as u128 + h.entries().iter().map(|e| h.stored_bytes(e) as u128).sum::<u128>();
        let have = bytes.len() as u128;
        if need != have {
            let what = if have < need { "truncated?" } else { "a different format, or a wrong header?" };
            return Err(bad(format!(
                "the header (version {}, dim {dim}, hidden_dim {hidden_dim}, n_layers {n_layers}, n_heads {n_heads}, n_kv_heads {n_kv_heads}, vocab_size {vocab_size}, seq_len {seq_len}, {}) needs {need} bytes, the file has {have} ({what})",
                format.version(),
                if shared { "tied classifier" } else { "own classifier" },
            )));
        }
        Ok((h, data))
    }

    /// The header of a model with config `c` in `format` (the model must be llama2.c's shape:
    /// [`export_mismatch`] finds nothing).
    pub fn of_config(c: &ModelConfig, format: Format) -> Header {
        Header {
            format,
            dim: c.hidden_size as usize,
            hidden_dim: c.intermediate_size as usize,
            n_layers: c.num_hidden_layers as usize,
            n_heads: c.num_attention_heads as usize,
            n_kv_heads: c.num_key_value_heads as usize,
            vocab_size: c.vocab_size as usize,
            seq_len: c.max_position_embeddings as usize,
            shared_classifier: c.tie_word_embeddings,
        }
    }

    /// The header's bytes.
    fn to_bytes(&self) -> Vec<u8> {
        // Version 0 marks an untied classifier with a negative vocabulary size.
        let vocab = match self.format {
            Format::V0 if !self.shared_classifier => -(self.vocab_size as i32),
            _ => self.vocab_size as i32,
        };
        let fields = [self.dim as i32, self.hidden_dim as i32, self.n_layers as i32, self.n_heads as i32, self.n_kv_heads as i32, vocab, self.seq_len as i32];
        let mut out = Vec::with_capacity(HEADER_BYTES);
        if !matches!(self.format, Format::V0) {
            out.extend(MAGIC.to_le_bytes());
            out.extend((self.format.version() as i32).to_le_bytes());
        }
        fields.iter().for_each(|v| out.extend(v.to_le_bytes()));
        if !matches!(self.format, Format::V0) {
            out.push(self.shared_classifier as u8);
            if let Format::V2 { group_size } = self.format {
                out.extend((group_size as i32).to_le_bytes());
            }
            out.resize(HEADER_BYTES, 0);
        }
        out
    }

    fn head_size(&self) -> usize {
        self.dim / self.n_heads
    }

    /// The model config: Llama with llama2.c's fixed choices; BOS is 1, and generation stops at
    /// BOS (run.c's end of a story) or EOS (2).
    pub fn config(&self) -> ModelConfig {
        ModelConfig {
            vocab_size: self.vocab_size as i64,
            hidden_size: self.dim as i64,
            intermediate_size: self.hidden_dim as i64,
            num_hidden_layers: self.n_layers as i64,
            num_attention_heads: self.n_heads as i64,
            num_key_value_heads: self.n_kv_heads as i64,
            max_position_embeddings: self.seq_len as i64,
            norm_eps: NORM_EPS,
            rope_theta: ROPE_THETA,
            tie_word_embeddings: self.shared_classifier,
            bos_token_id: Some(1),
            eos_token_id: vec![1, 2],
            ..ModelConfig::llama()
        }
    }

    /// Every tensor of the file in file order.
    fn entries(&self) -> Vec<Entry> {
        let (d, hd, kv) = (self.dim, self.hidden_dim, self.n_kv_heads * self.head_size());
        let layer = |kind: &str, l: usize| -> (String, Vec<usize>) {
            let p = format!("model.layers.{l}.");
            match kind {
                "att_norm" => (p + "input_layernorm.weight", vec![d]),
                "ffn_norm" => (p + "post_attention_layernorm.weight", vec![d]),
                "wq" => (p + "self_attn.q_proj.weight", vec![d, d]),
                "wk" => (p + "self_attn.k_proj.weight", vec![kv, d]),
                "wv" => (p + "self_attn.v_proj.weight", vec![kv, d]),
                "wo" => (p + "self_attn.o_proj.weight", vec![d, d]),
                "w1" => (p + "mlp.gate_proj.weight", vec![hd, d]),
                "w2" => (p + "mlp.down_proj.weight", vec![d, hd]),
                _ => (p + "mlp.up_proj.weight", vec![hd, d]),
            }
        };
        let matrix = if matches!(self.format, Format::V2 { .. }) { Storage::Q8 } else { Storage::F32 };
        let mut out = Vec::new();
        let mut push = |name: String, shape: Vec<usize>, storage| out.push(Entry { name, shape, storage });
        let kinds = |push: &mut dyn FnMut(String, Vec<usize>, Storage), kinds: &[&str], storage: Storage| {
            for kind in kinds {
                for l in 0..self.n_layers {
                    let (name, shape) = layer(kind, l);
                    let storage = if kind.ends_with("norm") { Storage::F32 } else { storage };
                    push(name, shape, storage);
                }
            }
        };
        let embed = ("model.embed_tokens.weight".to_string(), vec![self.vocab_size, d]);
        let norm = ("model.norm.weight".to_string(), vec![d]);
        let matrices = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"];
        match self.format {
            Format::V0 => {
                push(embed.0, embed.1, Storage::F32);
                kinds(&mut push, &["att_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3"], Storage::F32);
                push(norm.0, norm.1, Storage::F32);
                let table = vec![self.seq_len, self.head_size() / 2];
                push("rope.cos".into(), table.clone(), Storage::RopeCos);
                push("rope.sin".into(), table, Storage::RopeSin);
            }
            Format::V1 | Format::V2 { .. } => {
                kinds(&mut push, &["att_norm", "ffn_norm"], Storage::F32);
                push(norm.0, norm.1, Storage::F32);
                push(embed.0, embed.1, matrix);
                kinds(&mut push, &matrices, matrix);
            }
        }
        if !self.shared_classifier {
            push("lm_head.weight".into(), vec![self.vocab_size, d], matrix);
        }
        out
    }

    /// Bytes an entry takes in the file.
    fn stored_bytes(&self, e: &Entry) -> usize {
        match (e.storage, self.format) {
            (Storage::Q8, Format::V2 { group_size }) => e.numel() + e.numel() / group_size * 4,
            _ => e.numel() * 4,
        }
    }
}

/// A checkpoint read into memory.
pub struct Checkpoint {
    /// Its header.
    pub header: Header,
    /// Its weights under Hugging Face Llama names, q and k in rotate-half order.
    pub weights: Vec<(String, Tensor)>,
}

/// Reads a llama2.c checkpoint of any version.
pub fn read_checkpoint(path: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).map_err(|e| CoreError::io(path, e))?;
    let (header, mut at) = Header::parse(&bytes, path)?;
    let mut weights = Vec::new();
    for e in header.entries() {
        let size = header.stored_bytes(&e);
        let raw = &bytes[at..at + size];
        at += size;
        let shape: Vec<i64> = e.shape.iter().map(|&s| s as i64).collect();
        let t = match e.storage {
            Storage::RopeCos | Storage::RopeSin => continue,
            Storage::F32 => Tensor::from_slice(&f32s(raw)),
            Storage::Q8 => {
                let Format::V2 { group_size } = header.format else { unreachable!("Q8 entries are version 2's") };
                let (q, s) = raw.split_at(e.numel());
                let q: Vec<i8> = q.iter().map(|&b| b as i8).collect();
                let scales = Tensor::from_slice(&f32s(s)).view([-1, 1]);
                (Tensor::from_slice(&q).to_kind(Kind::Float).view([-1, group_size as i64]) * scales).view([-1])
            }
        };
        let t = t.view(shape.as_slice());
        let t = match e.name.rsplit('.').nth(1) {
            Some("q_proj") => to_rotate_half(&t, header.n_heads),
            Some("k_proj") => to_rotate_half(&t, header.n_kv_heads),
            _ => t,
        };
        weights.push((e.name, t));
    }
    Ok(Checkpoint { header, weights })
}

/// Why a model with config `c` is not Llama-shaped (what llama2.c and llama.cpp's `llama`
/// architecture run), naming the field; `None` if it is. The RoPE base and head size are the
/// formats' own business ([`export_mismatch`] for llama2.c).
pub fn llama_mismatch(c: &ModelConfig) -> Option<String> {
    use crate::config::ModelType;
    let checks: [(bool, String); 15] = [
        (c.norm != NormKind::RmsNorm, format!("norm = {:?}: Llama uses RMSNorm", c.norm)),
        (c.position != PositionKind::Rope, format!("position = {:?}: Llama uses RoPE", c.position)),
        (c.mlp != MlpKind::Gated, format!("mlp = {:?}: Llama uses a gated (SwiGLU) MLP", c.mlp)),
        (c.hidden_act != Activation::Silu, format!("hidden_act = {:?}: Llama uses SiLU", c.hidden_act)),
        (c.attention_bias || c.mlp_bias || c.attention_out_bias == Some(true), "attention_bias / mlp_bias: Llama has no biases".into()),
        (c.qk_norm, "qk_norm = true: Llama has no q/k norm".into()),
        (c.residual_scales, "residual_scales = true: Llama has none".into()),
        (c.moe.is_some() || c.cdmoe.is_some(), "moe / cdmoe: Llama has dense MLPs".into()),
        (c.bytes.is_some(), "bytes: Llama models are token models".into()),
        (c.layer_sharing.is_some(), "layer_sharing: Llama stores every layer".into()),
        (c.layer_shapes.is_some() || c.residual_root.is_some(), "layer_shapes / residual_root: Llama layers all have one shape".into()),
        (!c.attention.is_empty(), "attention: Llama layers use plain causal attention".into()),
        (c.rope_scaling.is_some() || c.partial_rotary_factor != 1.0, "rope_scaling / partial_rotary_factor: exported models rotate whole heads unscaled".into()),
        (c.head_dim() % 2 != 0, format!("head size {}: RoPE needs it even", c.head_dim())),
        // Last, so that another family's model is told the first field that differs.
        (!matches!(c.model_type, ModelType::Llama | ModelType::Mistral), format!("model_type = {:?}: not a Llama", c.model_type)),
    ];
    checks.into_iter().find(|(bad, _)| *bad).map(|(_, why)| why)
}

/// Why a model with config `c` cannot be written in llama2.c's formats, naming the field; `None`
/// if it can (RMSNorm epsilon aside, which [`export_warnings`] reports).
pub fn export_mismatch(c: &ModelConfig) -> Option<String> {
    llama_mismatch(c).or_else(|| {
        let checks: [(bool, String); 2] = [
            (c.head_dim.is_some_and(|d| d * c.num_attention_heads != c.hidden_size), format!("head_dim = {:?}: llama2.c heads are hidden_size / num_attention_heads", c.head_dim)),
            (c.rope_theta != ROPE_THETA, format!("rope_theta = {}: run.c fixes it at 10000", c.rope_theta)),
        ];
        checks.into_iter().find(|(bad, _)| *bad).map(|(_, why)| why)
    })
}

/// What run.c computes differently from stlm for config `c` (its fixed RMSNorm epsilon).
pub fn export_warnings(c: &ModelConfig) -> Vec<String> {
    let mut out = Vec::new();
    if c.norm_eps != NORM_EPS {
        out.push(format!("norm_eps = {:e}: run.c uses 1e-5, so its logits differ slightly", c.norm_eps));
    }
    out
}

/// What [`write_checkpoint`] wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// The header written.
    pub header: Header,
    /// Bytes written.
    pub bytes: usize,
    /// Version 2: the largest difference between a weight and its int8 value times its scale.
    pub max_quant_error: Option<f64>,
    /// Token ids exchanged so that the model's document-start token is run.c's id 1.
    pub swapped_ids: Option<(i64, i64)>,
    /// What run.c will compute differently ([`export_warnings`]).
    pub warnings: Vec<String>,
}

/// Writes the weights `vars` (stlm / Hugging Face Llama names) of a model with config `c` as a
/// llama2.c checkpoint at `path` (atomically). Version 2's group size is halved until it
/// divides `dim`, as export.py does.
pub fn write_checkpoint(c: &ModelConfig, vars: &HashMap<String, Tensor>, format: Format, path: &Path) -> Result<ExportReport> {
    if let Some(why) = export_mismatch(c) {
        return Err(ModelError::Unsupported { path: path.to_path_buf(), message: format!("not a llama2.c model: {why}") });
    }
    let format = match format {
        Format::V2 { group_size } => {
            let mut gs = group_size.max(1);
            while !(c.hidden_size as usize).is_multiple_of(gs) {
                gs /= 2;
            }
            Format::V2 { group_size: gs }
        }
        f => f,
    };
    let header = Header::of_config(c, format);
    let mut out = header.to_bytes();
    let mut max_err: Option<f64> = None;
    for e in header.entries() {
        let values: Vec<f32> = match e.storage {
            Storage::RopeCos | Storage::RopeSin => rope_table(&header, e.storage == Storage::RopeSin),
            _ => {
                let t = vars.get(&e.name).ok_or_else(|| ModelError::Weights {
                    path: path.to_path_buf(),
                    message: format!("the model has no `{}`", e.name),
                })?;
                let shape: Vec<i64> = e.shape.iter().map(|&s| s as i64).collect();
                if t.size() != shape {
                    return Err(ModelError::Weights {
                        path: path.to_path_buf(),
                        message: format!("`{}` has shape {:?}, llama2.c expects {shape:?}", e.name, t.size()),
                    });
                }
                let t = t.to_device(tch::Device::Cpu).to_kind(Kind::Float);
                let t = match e.name.rsplit('.').nth(1) {
                    Some("q_proj") => to_interleaved(&t, header.n_heads),
                    Some("k_proj") => to_interleaved(&t, header.n_kv_heads),
                    _ => t,
                };
                Vec::<f32>::try_from(&t.contiguous().view([-1]))?
            }
        };
        match (e.storage, format) {
            (Storage::Q8, Format::V2 { group_size }) => {
                let (q, s, err) = quantize_q80(&values, group_size);
                out.extend(q.iter().map(|&v| v as u8));
                s.iter().for_each(|v| out.extend(v.to_le_bytes()));
                max_err = Some(max_err.unwrap_or(0.0).max(err));
            }
            _ => values.iter().for_each(|v| out.extend(v.to_le_bytes())),
        }
    }
    atomic_write_bytes(path, &out)?;
    Ok(ExportReport { header, bytes: out.len(), max_quant_error: max_err, swapped_ids: None, warnings: export_warnings(c) })
}

impl ExportReport {
    /// The report as JSON (`out`: the checkpoint written, `tokenizer_out`: its tokenizer.bin).
    pub fn to_json(&self, out: &Path, tokenizer_out: Option<&Path>) -> serde_json::Value {
        let group_size = match self.header.format {
            Format::V2 { group_size } => Some(group_size),
            _ => None,
        };
        serde_json::json!({
            "out": out, "bytes": self.bytes, "version": self.header.format.version(), "group_size": group_size,
            "max_quant_error": self.max_quant_error, "tokenizer_out": tokenizer_out, "warnings": self.warnings,
            "swapped_ids": self.swapped_ids, "checkpoint": self.header.to_json(),
        })
    }
}

impl std::fmt::Display for ExportReport {
    /// What was written, in one line (and the swapped ids, if any, in a second).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "llama2.c version {}, {}, {} bytes", self.header.format.version(), self.header, self.bytes)?;
        if let (Format::V2 { group_size }, Some(e)) = (self.header.format, self.max_quant_error) {
            write!(f, ", int8 groups of {group_size}, largest weight error {e:.3e}")?;
        }
        if let Some((one, s)) = self.swapped_ids {
            write!(f, "\nids {one} and {s} swapped in the checkpoint and tokenizer.bin: run.c starts and ends texts at id 1, this model at {s}")?;
        }
        Ok(())
    }
}

/// Symmetric int8 quantisation in groups (export.py's `quantize_q80`): per group scale =
/// max |w| / 127 and q = round(w / scale), ties to even; returns q, the scales and the largest
/// error |q * scale - w|.
pub fn quantize_q80(w: &[f32], group_size: usize) -> (Vec<i8>, Vec<f32>, f64) {
    let mut q = Vec::with_capacity(w.len());
    let mut scales = Vec::with_capacity(w.len() / group_size);
    let mut err = 0f64;
    for g in w.chunks(group_size) {
        let scale = g.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
        for &v in g {
            let qv = if scale > 0.0 { (v / scale).round_ties_even().clamp(-127.0, 127.0) as i8 } else { 0 };
            err = err.max((qv as f32 * scale - v).abs() as f64);
            q.push(qv);
        }
        scales.push(scale);
    }
    (q, scales, err)
}

/// llama2.c's RoPE table for version 0 (`freqs_cos` / `freqs_sin`, `[seq_len, head_size / 2]`),
/// in float32 as model.py computes it.
fn rope_table(h: &Header, sin: bool) -> Vec<f32> {
    let hs = h.head_size();
    let freqs: Vec<f32> = (0..hs / 2).map(|i| 1.0 / (ROPE_THETA as f32).powf((2 * i) as f32 / hs as f32)).collect();
    (0..h.seq_len)
        .flat_map(|p| freqs.iter().map(move |f| if sin { (p as f32 * f).sin() } else { (p as f32 * f).cos() }))
        .collect()
}

/// Rows of a q or k projection `[heads * hs, in]` from interleaved pairs to rotate-half halves.
pub(crate) fn to_rotate_half(w: &Tensor, heads: usize) -> Tensor {
    let (out, inp) = w.size2().expect("a projection is a matrix");
    let h = heads as i64;
    w.view([h, out / h / 2, 2, inp]).transpose(1, 2).reshape([out, inp])
}

/// The inverse of [`to_rotate_half`].
pub(crate) fn to_interleaved(w: &Tensor, heads: usize) -> Tensor {
    let (out, inp) = w.size2().expect("a projection is a matrix");
    let h = heads as i64;
    w.view([h, 2, out / h / 2, inp]).transpose(1, 2).reshape([out, inp])
}

fn f32s(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect()
}

/// What [`import`] wrote.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// The checkpoint's header.
    pub header: Header,
    /// The model directory written.
    pub out: PathBuf,
    /// Whether a tokenizer.json was written.
    pub tokenizer: bool,
}

/// Converts a llama2.c checkpoint (and its `tokenizer.bin`, whose size must be the
/// checkpoint's vocabulary) into a Llama model directory at `out`.
pub fn import(checkpoint: &Path, tokenizer: Option<&Path>, out: &Path) -> Result<ImportReport> {
    let ck = read_checkpoint(checkpoint)?;
    let config = ck.header.config();
    config.validate(checkpoint)?;
    let tokenizer_json = match tokenizer {
        Some(path) => {
            let vocab = Llama2cVocab::read(path).map_err(|e| CoreError::Invalid(e.to_string()))?;
            if vocab.len() != ck.header.vocab_size {
                return Err(ModelError::config(
                    path,
                    format!("{} tokens, but {} has a vocabulary of {}", vocab.len(), checkpoint.display(), ck.header.vocab_size),
                ));
            }
            Some(vocab.to_tokenizer_json().map_err(|e| ModelError::config(path, e.to_string()))?)
        }
        None => None,
    };
    save_dir(out, &config, &ck.weights, "float32", None)?;
    if let Some(json) = &tokenizer_json {
        atomic_write_bytes(&out.join("tokenizer.json"), json.as_bytes())?;
    }
    Ok(ImportReport { header: ck.header, out: out.to_path_buf(), tokenizer: tokenizer_json.is_some() })
}

/// Writes the Llama model directory `model` as a llama2.c checkpoint at `out`, and when
/// `tokenizer_out` is given its `tokenizer.json` as a `tokenizer.bin` (padded with unused pieces
/// up to the model's vocabulary, which run.c reads in full). run.c starts every text with id 1 and
/// ends it there; a model whose document-start token (its `bos_token_id`, else the tokenizer's
/// end-of-text token, e.g. stlm's `<|endoftext|>`) is another id has that id and 1 swapped, in the
/// tokenizer.bin and in the embedding and head rows (reported in `swapped_ids`).
pub fn export(model: &Path, out: &Path, format: Format, tokenizer_out: Option<&Path>) -> Result<ExportReport> {
    let m = crate::load_model(model, tch::Device::Cpu, stlm_core::DType::Float32)?;
    if let Some(why) = export_mismatch(&m.config) {
        return Err(ModelError::Unsupported { path: model.to_path_buf(), message: format!("not a llama2.c model: {why}") });
    }
    let mut vars = m.var_store().variables();
    let mut swapped = None;
    let vocab = match tokenizer_out {
        Some(_) => {
            let path = crate::tokenizer_path(model)
                .ok_or_else(|| ModelError::config(model, "no tokenizer.json to write a tokenizer.bin from"))?;
            let tok = stlm_tokenizers::Tokenizer::from_file(&path).map_err(|e| CoreError::Invalid(e.to_string()))?;
            let v = Llama2cVocab::from_tokenizer(&tok).map_err(|e| ModelError::config(&path, e.to_string()))?;
            let n = m.config.vocab_size as usize;
            if v.len() > n {
                return Err(ModelError::config(&path, format!("{} tokens, more than the model's vocab_size {n}", v.len())));
            }
            let mut v = v.padded(n).map_err(|e| ModelError::config(&path, e.to_string()))?;
            let start = m.config.bos_token_id.or(tok.eos_id().map(i64::from)).filter(|&s| s != 1 && (s as usize) < n);
            if let Some(s) = start {
                v = v.swapped(1, s as u32).map_err(|e| ModelError::config(&path, e.to_string()))?;
                let order: Vec<i64> = (0..n as i64).map(|i| if i == 1 { s } else if i == s { 1 } else { i }).collect();
                let order = Tensor::from_slice(&order);
                for name in ["model.embed_tokens.weight", "lm_head.weight"] {
                    if let Some(w) = vars.get(name) {
                        let w = w.index_select(0, &order);
                        vars.insert(name.to_string(), w);
                    }
                }
                swapped = Some((1, s));
            }
            Some(v)
        }
        None => None,
    };
    let mut report = write_checkpoint(&m.config, &vars, format, out)?;
    if let (Some(v), Some(path)) = (vocab, tokenizer_out) {
        v.write(path).map_err(|e| CoreError::Invalid(e.to_string()))?;
    }
    report.swapped_ids = swapped;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotary_permutations_are_inverse() {
        let w = Tensor::arange(8 * 3, (Kind::Float, tch::Device::Cpu)).view([8, 3]);
        let back = to_interleaved(&to_rotate_half(&w, 2), 2);
        assert_eq!(back, w);
        // Head 0 of size 4: llama2.c's rows (0, 1), (2, 3) are pairs; rotate-half puts 0, 2 first.
        let r = to_rotate_half(&w, 2);
        let first: Vec<f32> = Vec::try_from(&r.select(1, 0)).unwrap();
        assert_eq!(first, [0.0, 6.0, 3.0, 9.0, 12.0, 18.0, 15.0, 21.0]);
    }

    #[test]
    fn q80_matches_export_py() {
        let w = [63.5f32, -127.0, 62.5, 0.0, 254.0, 1.0, -3.0, 0.5];
        let (q, s, err) = quantize_q80(&w, 4);
        // torch.round rounds halves to even: 63.5 -> 64, 62.5 -> 62, 0.5 -> 0, -1.5 -> -2.
        assert_eq!(q, [64, -127, 62, 0, 127, 0, -2, 0]);
        assert_eq!(s, [1.0, 2.0]);
        assert_eq!(err, 1.0);
    }
}
