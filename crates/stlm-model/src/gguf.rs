//! GGUF files (llama.cpp's format, version 3) <-> Llama model directories.
//!
//! The container is read and written by the `gguf-rs-lib` crate (v3, little-endian, validated
//! metadata, metadata keys in sorted order so a file's bytes are reproducible); the rest is
//! llama.cpp's conventions, as its `convert_hf_to_gguf.py` writes the `llama` architecture:
//! - keys `general.architecture = "llama"`, `general.file_type` (0 all F32, 1 mostly F16,
//!   2 mostly Q4_0, 7 mostly Q8_0), `llama.context_length`, `embedding_length`, `block_count`,
//!   `feed_forward_length`, `attention.head_count`, `head_count_kv`,
//!   `attention.layer_norm_rms_epsilon`, `rope.freq_base`, `rope.dimension_count`, `vocab_size`
//!   (`attention.key_length` / `value_length` when heads are not `hidden_size / heads` wide),
//!   and the tokenizer's `tokenizer.ggml.*` ([`stlm_tokenizers::GgufVocab`]);
//! - tensors `token_embd`, `blk.N.attn_norm`, `attn_q`, `attn_k`, `attn_v`, `attn_output`,
//!   `ffn_norm`, `ffn_gate`, `ffn_up`, `ffn_down`, `output_norm`, `output` (absent when tied),
//!   each `.weight`; dimensions innermost first (a `[rows, cols]` matrix is `[cols, rows]`);
//! - the rows of `attn_q` and `attn_k` in llama.cpp's rotary layout: pairs `(2i, 2i+1)` of each
//!   head, where transformers and stlm rotate halves `(i, i + head_size / 2)` (the permutation of
//!   [`crate::llama2c`], undone on import);
//! - norms in F32 always; matrices in the chosen type. A quantized model directory's blocks are
//!   ggml's, so its quantized weights are copied as they are.

use crate::config::ModelConfig;
use crate::llama2c::{llama_mismatch, to_interleaved, to_rotate_half};
use crate::quantized::EMBEDDING;
use crate::{DecoderModel, ModelError, Result};
use gguf_rs_lib::GGUFError;
use gguf_rs_lib::format::metadata::{Metadata, MetadataArray, MetadataValue};
use gguf_rs_lib::format::types::{GGUFTensorType as TensorType, GGUFValueType};
use gguf_rs_lib::reader::file_reader::{GGUFFileReader, GGUFReaderConfig};
use gguf_rs_lib::tensor::{TensorData, TensorInfo, TensorShape};
use gguf_rs_lib::writer::file_writer::GGUFFileWriter;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use stlm_core::quant::{QuantFormat, QuantMatrix, QK};
use stlm_core::{atomic_write_bytes, CoreError};
use stlm_tokenizers::{GgufVocab, Tokenizer, VocabKind};
use tch::{Kind, Tensor};

/// The architecture stlm reads and writes (`general.architecture`).
pub const ARCH: &str = "llama";
/// llama.cpp's quantization version of Q8_0 and Q4_0 blocks (`general.quantization_version`).
const QUANTIZATION_VERSION: u32 = 2;

/// The tensor type of exported matrices (`stlm export gguf --type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum GgufType {
    /// float32.
    #[cfg_attr(feature = "clap", value(name = "f32"))]
    F32,
    /// float16.
    #[cfg_attr(feature = "clap", value(name = "f16"))]
    F16,
    /// 8-bit blocks of 32 with an f16 scale.
    #[cfg_attr(feature = "clap", value(name = "q8_0"))]
    Q8_0,
    /// 4-bit blocks of 32 with an f16 scale.
    #[cfg_attr(feature = "clap", value(name = "q4_0"))]
    Q4_0,
}

impl GgufType {
    /// The block format of the quantized types.
    fn quant(self) -> Option<QuantFormat> {
        match self {
            GgufType::Q8_0 => Some(QuantFormat::Q8_0),
            GgufType::Q4_0 => Some(QuantFormat::Q4_0),
            _ => None,
        }
    }
}

/// The GGUF tensor type of a block format.
fn tensor_type(format: QuantFormat) -> TensorType {
    match format {
        QuantFormat::Q8_0 => TensorType::Q8_0,
        QuantFormat::Q4_0 => TensorType::Q4_0,
    }
}

/// Per-layer tensors: (Hugging Face name after `model.layers.N.`, GGUF name after `blk.N.`).
const LAYER_NAMES: [(&str, &str); 9] = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
];
/// Model-wide tensors: (Hugging Face name, GGUF name).
const GLOBAL_NAMES: [(&str, &str); 3] =
    [(EMBEDDING, "token_embd.weight"), ("model.norm.weight", "output_norm.weight"), ("lm_head.weight", "output.weight")];

/// The GGUF name of a Llama tensor, with its layer (`None` for model-wide ones) for ordering.
fn gguf_name(hf: &str) -> Option<(Option<usize>, String)> {
    if let Some((_, g)) = GLOBAL_NAMES.iter().find(|(h, _)| *h == hf) {
        return Some((None, g.to_string()));
    }
    let (layer, rest) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    LAYER_NAMES.iter().find(|(h, _)| *h == rest).map(|(_, g)| (Some(layer), format!("blk.{layer}.{g}")))
}

/// The Hugging Face name of a GGUF tensor of the `llama` architecture.
fn hf_name(gguf: &str) -> Option<String> {
    if let Some((h, _)) = GLOBAL_NAMES.iter().find(|(_, g)| *g == gguf) {
        return Some(h.to_string());
    }
    let (layer, rest) = gguf.strip_prefix("blk.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    LAYER_NAMES.iter().find(|(_, g)| *g == rest).map(|(h, _)| format!("model.layers.{layer}.{h}"))
}

/// Heads whose rows llama.cpp keeps in its rotary layout: q's for `attn_q`, k's for `attn_k`.
fn rotary_heads(c: &ModelConfig, hf: &str) -> Option<usize> {
    match hf.rsplit('.').nth(1) {
        Some("q_proj") => Some(c.num_attention_heads as usize),
        Some("k_proj") => Some(c.num_key_value_heads as usize),
        _ => None,
    }
}

/// The row order that `permute` (one of the two rotary permutations) gives a `[rows, _]` matrix.
fn row_order(rows: usize, heads: usize, permute: fn(&Tensor, usize) -> Tensor) -> Vec<i64> {
    let ids = Tensor::arange(rows as i64, (Kind::Int64, tch::Device::Cpu)).view([rows as i64, 1]);
    Vec::try_from(&permute(&ids, heads).view([-1])).expect("int64 row ids")
}

/// `bytes` as rows of `row_bytes`, reordered: row `i` of the result is row `order[i]`.
fn reorder_rows(bytes: &[u8], row_bytes: usize, order: &[i64]) -> Vec<u8> {
    order.iter().flat_map(|&r| &bytes[r as usize * row_bytes..(r as usize + 1) * row_bytes]).copied().collect()
}

/// What [`export`] wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// Bytes written.
    pub bytes: usize,
    /// Tensors written, by GGUF type name (`F32`, `Q8_0`, ...).
    pub types: BTreeMap<String, usize>,
    /// Quantized weights copied from the model directory's blocks.
    pub copied: usize,
    /// Matrices kept in F32 because their rows do not divide into blocks of 32.
    pub kept_float: Vec<String>,
    /// `general.file_type`.
    pub file_type: u32,
    /// The tokenizer kind written (`gpt2`, `llama`).
    pub vocab: &'static str,
    /// Ids added to the tokenizer (unused padding) to reach the model's vocabulary.
    pub padded: usize,
}

/// `F32 × 9, Q8_0 × 14`.
fn type_counts(types: &BTreeMap<String, usize>) -> String {
    types.iter().map(|(t, n)| format!("{t} x {n}")).collect::<Vec<_>>().join(", ")
}

impl std::fmt::Display for ExportReport {
    /// What was written, in one line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GGUF v3, {}, {} bytes, {} tokenizer", type_counts(&self.types), self.bytes, self.vocab)?;
        if self.copied > 0 {
            write!(f, ", {} quantized weights copied", self.copied)?;
        }
        if !self.kept_float.is_empty() {
            write!(f, ", kept in F32 (rows not in blocks of {QK}): {}", self.kept_float.join(" "))?;
        }
        if self.padded > 0 {
            write!(f, ", {} unused tokens added to reach the model's vocabulary", self.padded)?;
        }
        Ok(())
    }
}

/// Writes the Llama model directory `model` (float or quantized) as a GGUF file at `out`
/// (atomically), its float matrices in `ty` and its quantized ones as they are, with its
/// tokenizer; a model that is not Llama-shaped, or has no tokenizer.json, is refused.
pub fn export(model: &Path, out: &Path, ty: GgufType) -> Result<ExportReport> {
    let m = crate::load_model(model, tch::Device::Cpu, stlm_core::DType::Float32)?;
    let c = &m.config;
    if let Some(why) = llama_mismatch(c) {
        return Err(ModelError::Unsupported { path: model.to_path_buf(), message: format!("not a Llama model llama.cpp runs: {why}") });
    }
    let tok_path = crate::tokenizer_path(model)
        .ok_or_else(|| ModelError::config(model, "no tokenizer.json: llama.cpp needs the vocabulary in the GGUF file"))?;
    let tok = Tokenizer::from_file(&tok_path).map_err(|e| CoreError::Invalid(e.to_string()))?;
    let vocab = GgufVocab::from_tokenizer(&tok).map_err(|e| ModelError::config(&tok_path, e.to_string()))?;
    let padded = (c.vocab_size as usize).saturating_sub(vocab.tokens.len());
    let vocab = vocab.padded(c.vocab_size as usize).map_err(|e| ModelError::config(&tok_path, e.to_string()))?;

    let quantized = m.quantized_weights();
    let mut vars: Vec<(Option<usize>, String, String, Tensor)> = Vec::new();
    for (hf, t) in m.var_store().variables() {
        let (layer, g) = gguf_name(&hf).ok_or_else(|| ModelError::Weights {
            path: model.to_path_buf(),
            message: format!("`{hf}` has no GGUF name in the llama architecture"),
        })?;
        vars.push((layer, g, hf, t));
    }
    // token_embd, the layers in order, then output_norm and output (llama.cpp's order).
    vars.sort_by_key(|(layer, g, ..)| (layer.map_or(if g.starts_with("token_embd") { 0 } else { 2 }, |_| 1), layer.unwrap_or(0), g.clone()));

    let mut report = ExportReport { bytes: 0, types: BTreeMap::new(), copied: 0, kept_float: Vec::new(), file_type: 0, vocab: vocab.kind.name(), padded };
    let mut tensors: Vec<(TensorInfo, TensorData)> = Vec::new();
    for (_, g, hf, t) in vars {
        let t = t.detach().to_kind(Kind::Float).contiguous();
        let size: Vec<usize> = t.size().iter().map(|&s| s as usize).collect();
        let order = match (rotary_heads(c, &hf), size.as_slice()) {
            (Some(heads), [rows, _]) => Some(row_order(*rows, heads, to_interleaved)),
            _ => None,
        };
        let (kind, bytes) = match (quantized.get(&hf), size.as_slice()) {
            (Some(q), &[rows, _]) => {
                report.copied += 1;
                let bytes = q.to_bytes();
                let bytes = match &order {
                    Some(o) => reorder_rows(&bytes, bytes.len() / rows, o),
                    None => bytes,
                };
                (tensor_type(q.format()), bytes)
            }
            (_, &[_, cols]) => {
                let t = match &order {
                    Some(o) => t.index_select(0, &Tensor::from_slice(o)),
                    None => t,
                };
                let values = Vec::<f32>::try_from(&t.view([-1]))?;
                match (ty, ty.quant()) {
                    (_, Some(f)) if cols % QK == 0 => {
                        let q = QuantMatrix::quantize(f, &values, cols).map_err(ModelError::Core)?;
                        (tensor_type(f), q.to_bytes())
                    }
                    (GgufType::F16, _) => (TensorType::F16, values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect()),
                    (t, _) => {
                        if t.quant().is_some() {
                            report.kept_float.push(g.clone());
                        }
                        (TensorType::F32, values.iter().flat_map(|v| v.to_le_bytes()).collect())
                    }
                }
            }
            _ => (TensorType::F32, Vec::<f32>::try_from(&t.view([-1]))?.iter().flat_map(|v| v.to_le_bytes()).collect()),
        };
        *report.types.entry(format!("{kind:?}")).or_insert(0) += 1;
        let dims: Vec<u64> = size.iter().rev().map(|&s| s as u64).collect();
        let shape = TensorShape::new(dims).map_err(|e| gguf_err(out, e))?;
        // The writer lays the tensors out (aligned offsets).
        tensors.push((TensorInfo::new(g, shape, kind, 0), TensorData::new_owned(bytes)));
    }
    report.file_type = file_type(&report.types);
    let metadata = metadata(model, c, &vocab, report.file_type);
    let mut writer = GGUFFileWriter::new(std::io::Cursor::new(Vec::new()));
    writer.write_complete_file(&metadata, &tensors).map_err(|e| gguf_err(out, e))?;
    let bytes = writer.finalize().map_err(|e| gguf_err(out, e))?.into_inner();
    atomic_write_bytes(out, &bytes)?;
    report.bytes = bytes.len();
    Ok(report)
}

/// `general.file_type` of a file holding `types`: the most compressed type of its matrices.
fn file_type(types: &BTreeMap<String, usize>) -> u32 {
    let has = |t: TensorType| types.contains_key(&format!("{t:?}"));
    if has(TensorType::Q4_0) {
        2
    } else if has(TensorType::Q8_0) {
        7
    } else if has(TensorType::F16) {
        1
    } else {
        0
    }
}

/// A GGUF library error about `path`.
fn gguf_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Weights { path: path.to_path_buf(), message: format!("GGUF: {e}") }
}

/// An array of one metadata type.
fn array(ty: GGUFValueType, values: Vec<MetadataValue>) -> MetadataValue {
    MetadataValue::Array(Box::new(MetadataArray::new(ty, values).expect("values of one type")))
}

/// llama.cpp's metadata of a Llama model with config `c` and vocabulary `vocab`.
fn metadata(model: &Path, c: &ModelConfig, vocab: &GgufVocab, file_type: u32) -> Metadata {
    let mut m = Metadata::new();
    let mut put = |key: &str, v: MetadataValue| m.insert(key.to_string(), v);
    let u32v = |v: i64| MetadataValue::U32(v as u32);
    let name = model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "stlm".into());
    put("general.architecture", MetadataValue::String(ARCH.into()));
    put("general.name", MetadataValue::String(name));
    put("general.file_type", MetadataValue::U32(file_type));
    if file_type == 2 || file_type == 7 {
        put("general.quantization_version", MetadataValue::U32(QUANTIZATION_VERSION));
    }
    put("llama.context_length", u32v(c.max_position_embeddings));
    put("llama.embedding_length", u32v(c.hidden_size));
    put("llama.block_count", u32v(c.num_hidden_layers));
    put("llama.feed_forward_length", u32v(c.intermediate_size));
    put("llama.attention.head_count", u32v(c.num_attention_heads));
    put("llama.attention.head_count_kv", u32v(c.num_key_value_heads));
    put("llama.attention.layer_norm_rms_epsilon", MetadataValue::F32(c.norm_eps as f32));
    put("llama.rope.freq_base", MetadataValue::F32(c.rope_theta as f32));
    put("llama.rope.dimension_count", u32v(c.head_dim()));
    put("llama.vocab_size", u32v(c.vocab_size));
    if c.head_dim() * c.num_attention_heads != c.hidden_size {
        put("llama.attention.key_length", u32v(c.head_dim()));
        put("llama.attention.value_length", u32v(c.head_dim()));
    }
    put("tokenizer.ggml.model", MetadataValue::String(vocab.kind.name().into()));
    if vocab.kind == VocabKind::Gpt2 {
        put("tokenizer.ggml.pre", MetadataValue::String("gpt-2".into()));
        put("tokenizer.ggml.merges", array(GGUFValueType::String, vocab.merges.iter().map(|s| MetadataValue::String(s.clone())).collect()));
    }
    put("tokenizer.ggml.tokens", array(GGUFValueType::String, vocab.tokens.iter().map(|s| MetadataValue::String(s.clone())).collect()));
    put("tokenizer.ggml.scores", array(GGUFValueType::F32, vocab.scores.iter().map(|&s| MetadataValue::F32(s)).collect()));
    put("tokenizer.ggml.token_type", array(GGUFValueType::I32, vocab.token_types.iter().map(|&t| MetadataValue::I32(t)).collect()));
    // Documents start with the model's BOS token, else (stlm's tokenizers) its end-of-text token.
    let eos = c.eos_token_id.first().copied().or(vocab.eos.map(i64::from));
    let bos = c.bos_token_id.or(eos);
    for (key, id) in [("bos", bos), ("eos", eos), ("unknown", vocab.unk.map(i64::from)), ("padding", c.pad_token_id.or(vocab.pad.map(i64::from)))] {
        if let Some(id) = id {
            put(&format!("tokenizer.ggml.{key}_token_id"), u32v(id));
        }
    }
    put("tokenizer.ggml.add_bos_token", MetadataValue::Bool(bos.is_some()));
    put("tokenizer.ggml.add_eos_token", MetadataValue::Bool(false));
    m
}

/// What [`import`] wrote.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// The model directory written.
    pub out: PathBuf,
    /// The model's config.
    pub config: ModelConfig,
    /// Tensors read, by GGUF type name.
    pub types: BTreeMap<String, usize>,
    /// Weights kept quantized (the directory is a quantized model when this is not zero).
    pub quantized: usize,
    /// The tokenizer kind converted to tokenizer.json, if the file has one.
    pub vocab: Option<&'static str>,
}

impl std::fmt::Display for ImportReport {
    /// What was written, in one line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.config;
        write!(f, "{} ({} layers, hidden {}, vocab {}; {}", self.out.display(), c.num_hidden_layers, c.hidden_size, c.vocab_size, type_counts(&self.types))?;
        if self.quantized > 0 {
            write!(f, "; {} weights kept quantized", self.quantized)?;
        }
        match self.vocab {
            Some(v) => write!(f, "; tokenizer.json from the {v} vocabulary)"),
            None => write!(f, "; the file has no vocabulary: pass --tokenizer to the jobs that need one)"),
        }
    }
}

/// The typed metadata lookups of one file, whose errors name it and the key.
struct Keys<'a> {
    path: &'a Path,
    meta: &'a Metadata,
}

impl Keys<'_> {
    fn err(&self, message: String) -> ModelError {
        ModelError::Unsupported { path: self.path.to_path_buf(), message }
    }

    fn get(&self, key: &str) -> Result<&MetadataValue> {
        self.meta.get(key).ok_or_else(|| self.err(format!("missing key `{key}`")))
    }

    fn int(&self, key: &str) -> Result<i64> {
        let v = self.get(key)?;
        v.as_u64().map(|v| v as i64).or(v.as_i64()).ok_or_else(|| self.err(format!("`{key}` is {v:?}, not an integer")))
    }

    fn float(&self, key: &str) -> Result<f64> {
        let v = self.get(key)?;
        v.as_f64().ok_or_else(|| self.err(format!("`{key}` is {v:?}, not a number")))
    }

    fn text(&self, key: &str) -> Result<&str> {
        let v = self.get(key)?;
        v.as_str().ok_or_else(|| self.err(format!("`{key}` is {v:?}, not a string")))
    }

    fn opt_int(&self, key: &str) -> Result<Option<i64>> {
        self.meta.get(key).map(|_| self.int(key)).transpose()
    }

    /// The array at `key`, each element through `f` (`None`: an element of another type).
    fn list<T>(&self, key: &str, f: impl Fn(&MetadataValue) -> Option<T>) -> Result<Option<Vec<T>>> {
        let Some(v) = self.meta.get(key) else { return Ok(None) };
        let MetadataValue::Array(a) = v else { return Err(self.err(format!("`{key}` is not an array"))) };
        a.values.iter().map(|e| f(e).ok_or_else(|| self.err(format!("`{key}` holds {e:?}")))).collect::<Result<Vec<T>>>().map(Some)
    }
}

/// The config of a `llama` GGUF file's metadata.
fn config_of(k: &Keys, vocab_size: i64, tied: bool) -> Result<ModelConfig> {
    let arch = k.text("general.architecture")?;
    if arch != ARCH {
        return Err(k.err(format!("architecture `{arch}` is not supported (stlm imports `{ARCH}`)")));
    }
    let hidden = k.int("llama.embedding_length")?;
    let heads = k.int("llama.attention.head_count")?;
    let head_dim = k.opt_int("llama.attention.key_length")?.unwrap_or(hidden / heads.max(1));
    if let Some(v) = k.opt_int("llama.attention.value_length")?.filter(|&v| v != head_dim) {
        return Err(k.err(format!("`llama.attention.value_length` {v} differs from the key length {head_dim}: stlm heads have one width")));
    }
    if let Some(r) = k.opt_int("llama.rope.dimension_count")?.filter(|&r| r != head_dim) {
        return Err(k.err(format!("`llama.rope.dimension_count` {r}: stlm imports rotary embeddings over whole heads ({head_dim})")));
    }
    if let Some(key) = ["llama.rope.scaling.type", "llama.expert_count"].into_iter().find(|key| k.meta.get(key).is_some()) {
        return Err(k.err(format!("`{key}` is not supported (stlm imports dense Llama models without RoPE scaling)")));
    }
    let eos = k.opt_int("tokenizer.ggml.eos_token_id")?;
    let config = ModelConfig {
        vocab_size,
        hidden_size: hidden,
        intermediate_size: k.int("llama.feed_forward_length")?,
        num_hidden_layers: k.int("llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: k.opt_int("llama.attention.head_count_kv")?.unwrap_or(heads),
        head_dim: (head_dim * heads != hidden).then_some(head_dim),
        max_position_embeddings: k.int("llama.context_length")?,
        norm_eps: k.float("llama.attention.layer_norm_rms_epsilon")?,
        rope_theta: k.meta.get("llama.rope.freq_base").map(|_| k.float("llama.rope.freq_base")).transpose()?.unwrap_or(10000.0),
        tie_word_embeddings: tied,
        bos_token_id: k.opt_int("tokenizer.ggml.bos_token_id")?,
        eos_token_id: eos.into_iter().collect(),
        pad_token_id: k.opt_int("tokenizer.ggml.padding_token_id")?,
        ..ModelConfig::llama()
    };
    config.validate(k.path)?;
    Ok(config)
}

/// The vocabulary of a file's `tokenizer.ggml.*` keys, if it has one.
fn vocab_of(k: &Keys) -> Result<Option<GgufVocab>> {
    let Some(tokens) = k.list("tokenizer.ggml.tokens", |v| v.as_str().map(str::to_string))? else { return Ok(None) };
    let model = k.text("tokenizer.ggml.model")?;
    let kind = VocabKind::from_name(model)
        .ok_or_else(|| k.err(format!("`tokenizer.ggml.model` `{model}` is not supported (gpt2 and llama are)")))?;
    let n = tokens.len();
    let id = |key: &str| -> Result<Option<u32>> { Ok(k.opt_int(key)?.map(|v| v as u32)) };
    let vocab = GgufVocab {
        kind,
        scores: k.list("tokenizer.ggml.scores", |v| v.as_f64().map(|s| s as f32))?.unwrap_or_else(|| vec![0.0; n]),
        token_types: k.list("tokenizer.ggml.token_type", |v| v.as_i64().map(|t| t as i32))?.unwrap_or_else(|| vec![1; n]),
        merges: k.list("tokenizer.ggml.merges", |v| v.as_str().map(str::to_string))?.unwrap_or_default(),
        tokens,
        unk: id("tokenizer.ggml.unknown_token_id")?,
        eos: id("tokenizer.ggml.eos_token_id")?,
        pad: id("tokenizer.ggml.padding_token_id")?,
    };
    vocab.validate().map_err(|e| k.err(e.to_string()))?;
    Ok(Some(vocab))
}

/// Converts the `llama` GGUF file `file` (F32, F16, Q8_0 and Q4_0 tensors) into a model
/// directory at `out`: float tensors as float32, Q8_0/Q4_0 matrices kept as quantized weights
/// (a quantized model directory), the tokenizer as tokenizer.json. Every check runs before
/// anything is written; an error names the file and what is wrong.
pub fn import(file: &Path, out: &Path) -> Result<ImportReport> {
    let f = std::fs::File::open(file).map_err(|e| CoreError::io(file, e))?;
    let file_len = f.metadata().map_err(|e| CoreError::io(file, e))?.len();
    let unreadable = |e: GGUFError| {
        let message = match e {
            GGUFError::UnexpectedEof => "truncated: the file ends inside its header, metadata or tensor list".to_string(),
            e => format!("not a readable GGUF file: {e}"),
        };
        ModelError::Weights { path: file.to_path_buf(), message }
    };
    // Tensor extents are checked here first, so that a truncated file names its tensor.
    let config = GGUFReaderConfig { validate_integrity: false, ..GGUFReaderConfig::default() };
    let mut reader = GGUFFileReader::with_config(std::io::BufReader::new(f), config).map_err(unreadable)?;
    let infos: Vec<TensorInfo> = reader.tensor_infos().to_vec();
    let data_start = reader.tensor_data_offset();
    for info in &infos {
        let end = data_start + info.data_offset + info.expected_data_size();
        if end > file_len {
            return Err(ModelError::Weights {
                path: file.to_path_buf(),
                message: format!("truncated: tensor `{}` ends at byte {end}, the file has {file_len}", info.name),
            });
        }
    }
    reader.validate_integrity().map_err(unreadable)?;
    let meta = reader.metadata().clone();
    let k = Keys { path: file, meta: &meta };
    let embedding = infos.iter().find(|i| i.name == "token_embd.weight").ok_or_else(|| k.err("no tensor `token_embd.weight`".into()))?;
    let vocab_size = embedding.shape.dims().get(1).copied().unwrap_or(0) as i64;
    let tied = !infos.iter().any(|i| i.name == "output.weight");
    let config = config_of(&k, vocab_size, tied)?;
    let vocab = vocab_of(&k)?;
    if let Some(v) = vocab.as_ref().filter(|v| v.tokens.len() as i64 != vocab_size) {
        return Err(k.err(format!("{} tokens, but `token_embd.weight` has {vocab_size} rows", v.tokens.len())));
    }
    let tokenizer_json = vocab.as_ref().map(|v| v.to_tokenizer_json().map_err(|e| k.err(e.to_string()))).transpose()?;

    let mut types = BTreeMap::new();
    let mut tensors = HashMap::new();
    let mut blocks = HashMap::new();
    for info in &infos {
        let name = &info.name;
        let hf = hf_name(name).ok_or_else(|| k.err(format!("tensor `{name}` is not part of a {ARCH} model")))?;
        let data = reader.load_tensor_data(name).map_err(|e| gguf_err(file, format!("tensor `{name}`: {e}")))?;
        let raw = data.ok_or_else(|| k.err(format!("tensor `{name}` has no data")))?;
        let raw = raw.as_slice();
        let dims: Vec<i64> = info.shape.dims().iter().rev().map(|&d| d as i64).collect();
        let numel: i64 = dims.iter().product();
        let order = match (rotary_heads(&config, &hf), dims.as_slice()) {
            (Some(heads), &[rows, _]) => Some(row_order(rows as usize, heads, to_rotate_half)),
            _ => None,
        };
        let format = match info.tensor_type {
            TensorType::Q8_0 => Some(QuantFormat::Q8_0),
            TensorType::Q4_0 => Some(QuantFormat::Q4_0),
            _ => None,
        };
        let t = match (info.tensor_type, format, dims.as_slice()) {
            (TensorType::F32, ..) => Tensor::from_slice(&raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect::<Vec<f32>>()),
            (TensorType::F16, ..) => Tensor::from_slice(&raw.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect::<Vec<f32>>()),
            (_, Some(f), &[rows, cols]) => {
                let raw = match &order {
                    Some(o) => reorder_rows(raw, raw.len() / rows as usize, o),
                    None => raw.to_vec(),
                };
                let m = QuantMatrix::from_bytes(f, rows as usize, cols as usize, &raw).map_err(|e| k.err(format!("tensor `{name}`: {e}")))?;
                let t = Tensor::from_slice(&m.dequantize());
                blocks.insert(hf.clone(), m);
                t
            }
            (ty, ..) => {
                return Err(k.err(format!("tensor `{name}` has type {ty:?} and shape {dims:?}: stlm imports F32, F16, and Q8_0/Q4_0 matrices")));
            }
        };
        if t.numel() as i64 != numel {
            return Err(k.err(format!("tensor `{name}` holds {} values, its shape {dims:?} needs {numel}", t.numel())));
        }
        let t = t.view(dims.as_slice());
        let t = match (&order, format) {
            (Some(o), None) => t.index_select(0, &Tensor::from_slice(o)),
            _ => t,
        };
        *types.entry(format!("{:?}", info.tensor_type)).or_insert(0) += 1;
        tensors.insert(hf, t);
    }
    let mut model = DecoderModel::new(config.clone(), tch::Device::Cpu)?;
    crate::io::copy_weights(&model, tied, tensors, file)?;
    let quantized = blocks.len();
    model.set_quantized(blocks).map_err(|e| k.err(e.to_string()))?;
    model.save(out, None)?;
    if let Some(json) = &tokenizer_json {
        atomic_write_bytes(&out.join("tokenizer.json"), json.as_bytes())?;
    }
    Ok(ImportReport { out: out.to_path_buf(), config, types, quantized, vocab: vocab.map(|v| v.kind.name()) })
}
