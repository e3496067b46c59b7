//! A GGUF file written by `stlm export gguf`, read back by the `gguf` package (llama.cpp's own
//! Python reader): every metadata key is the one llama.cpp's `llama` loader reads, with the
//! model's value, and every tensor holds the model's weight under llama.cpp's name, dimensions
//! innermost first, q and k rows in llama.cpp's rotary layout (restated here from
//! `convert_hf_to_gguf.py`'s `permute`), in the type asked for (Q8_0: ggml's round-to-nearest
//! blocks). Two vocabularies: stlm's byte-level BPE (`gpt2`) and a sentencepiece-style one
//! (`llama`, llama2.c's layout).

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use stlm_core::quant::{QuantFormat, QuantMatrix};
use stlm_model::gguf::{self, GgufType};
use stlm_model::{DecoderModel, ModelConfig};
use stlm_tests::{reference_python, run_python};
use stlm_tokenizers::{BpeOptions, GgufVocab, Llama2cVocab, Tokenizer};
use tch::{Device, Kind, Tensor};

fn config(vocab: i64, kv_heads: i64, bos: Option<i64>) -> ModelConfig {
    ModelConfig {
        vocab_size: vocab,
        hidden_size: 64,
        intermediate_size: 96,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: kv_heads,
        max_position_embeddings: 48,
        norm_eps: 1e-6,
        rope_theta: 10000.0,
        tie_word_embeddings: false,
        bos_token_id: bos,
        eos_token_id: bos.map(|_| vec![2]).unwrap_or_default(),
        ..ModelConfig::llama()
    }
}

/// llama.cpp's rotary row layout of a `[heads * head_size, in]` projection (its `permute`).
fn permute(w: &Tensor, heads: i64) -> Tensor {
    let (rows, cols) = w.size2().unwrap();
    w.reshape([heads, 2, rows / heads / 2, cols]).transpose(1, 2).reshape([rows, cols])
}

fn gguf_name(hf: &str) -> String {
    let table = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
        ("input_layernorm", "attn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("post_attention_layernorm", "ffn_norm"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
        ("model.layers.", "blk."),
    ];
    table.iter().fold(hf.to_string(), |n, (a, b)| n.replace(a, b))
}

fn f32s(path: &Path) -> Vec<f32> {
    std::fs::read(path).unwrap().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Exports `m` (saved with `tokenizer`) as `ty` and checks what the gguf package reads.
fn check(python: &Path, m: &DecoderModel, tokenizer: &Path, ty: GgufType, dir: &Path) {
    let model = dir.join(format!("model-{ty:?}"));
    m.save(&model, Some(tokenizer)).unwrap();
    let file = dir.join(format!("{ty:?}.gguf"));
    gguf::export(&model, &file, ty).unwrap();
    let out = dir.join(format!("read-{ty:?}"));
    std::fs::create_dir_all(&out).unwrap();
    run_python(python, "gguf_read.py", &[file.to_str().unwrap(), out.to_str().unwrap()]);

    // Metadata: exactly these keys, with these values and types.
    let c = &m.config;
    let n = c.vocab_size as usize;
    let vocab = GgufVocab::from_tokenizer(&Tokenizer::from_file(tokenizer).unwrap()).unwrap().padded(n).unwrap();
    // llama.cpp's converter pads with unused `[PADid]` tokens: type 5, score 0.
    let own = Tokenizer::from_file(tokenizer).unwrap().vocab_size();
    for id in own..n {
        assert_eq!((vocab.tokens[id].as_str(), vocab.token_types[id], vocab.scores[id]), (format!("[PAD{id}]").as_str(), 5, 0.0));
    }
    let quantized = matches!(ty, GgufType::Q8_0 | GgufType::Q4_0);
    let file_type = match ty {
        GgufType::F32 => 0,
        GgufType::F16 => 1,
        GgufType::Q4_0 => 2,
        GgufType::Q8_0 => 7,
    };
    let (bos, eos) = match c.bos_token_id {
        Some(b) => (b, c.eos_token_id[0]),
        None => (i64::from(vocab.eos.unwrap()), i64::from(vocab.eos.unwrap())),
    };
    let mut want: BTreeMap<&str, (Value, &str)> = BTreeMap::from([
        ("general.architecture", (json!("llama"), "STRING")),
        ("general.name", (json!(format!("model-{ty:?}")), "STRING")),
        ("general.file_type", (json!(file_type), "UINT32")),
        ("llama.context_length", (json!(48), "UINT32")),
        ("llama.embedding_length", (json!(64), "UINT32")),
        ("llama.block_count", (json!(2), "UINT32")),
        ("llama.feed_forward_length", (json!(96), "UINT32")),
        ("llama.attention.head_count", (json!(4), "UINT32")),
        ("llama.attention.head_count_kv", (json!(c.num_key_value_heads), "UINT32")),
        ("llama.attention.layer_norm_rms_epsilon", (json!(1e-6f32 as f64), "FLOAT32")),
        ("llama.rope.freq_base", (json!(10000.0), "FLOAT32")),
        ("llama.rope.dimension_count", (json!(16), "UINT32")),
        ("llama.vocab_size", (json!(n), "UINT32")),
        ("tokenizer.ggml.model", (json!(vocab.kind.name()), "STRING")),
        ("tokenizer.ggml.tokens", (json!(vocab.tokens), "ARRAY")),
        ("tokenizer.ggml.scores", (json!(vocab.scores), "ARRAY")),
        ("tokenizer.ggml.token_type", (json!(vocab.token_types), "ARRAY")),
        ("tokenizer.ggml.bos_token_id", (json!(bos), "UINT32")),
        ("tokenizer.ggml.eos_token_id", (json!(eos), "UINT32")),
        ("tokenizer.ggml.add_bos_token", (json!(true), "BOOL")),
        ("tokenizer.ggml.add_eos_token", (json!(false), "BOOL")),
    ]);
    if quantized {
        want.insert("general.quantization_version", (json!(2), "UINT32"));
    }
    if vocab.kind.name() == "gpt2" {
        want.insert("tokenizer.ggml.pre", (json!("gpt-2"), "STRING"));
        want.insert("tokenizer.ggml.merges", (json!(vocab.merges), "ARRAY"));
        want.insert("tokenizer.ggml.padding_token_id", (json!(vocab.pad.unwrap()), "UINT32"));
    } else {
        want.insert("tokenizer.ggml.unknown_token_id", (json!(0), "UINT32"));
    }
    let fields: Value = serde_json::from_str(&std::fs::read_to_string(out.join("fields.json")).unwrap()).unwrap();
    let fields = fields.as_object().unwrap();
    assert_eq!(fields.keys().map(String::as_str).collect::<Vec<_>>(), want.keys().copied().collect::<Vec<_>>(), "{ty:?}: keys");
    for (key, (value, kind)) in &want {
        assert_eq!(&fields[*key]["value"], value, "{ty:?}: `{key}`");
        assert_eq!(fields[*key]["types"][0], *kind, "{ty:?}: `{key}` type");
    }

    // Tensors: every weight once, under its GGUF name, with its values.
    let tensors: Value = serde_json::from_str(&std::fs::read_to_string(out.join("tensors.json")).unwrap()).unwrap();
    let tensors: BTreeMap<String, &Value> = tensors.as_array().unwrap().iter().map(|t| (t["name"].as_str().unwrap().to_string(), t)).collect();
    let vars = m.var_store().variables();
    assert_eq!(tensors.len(), vars.len(), "{ty:?}: one tensor per weight");
    for (hf, w) in vars {
        let name = gguf_name(&hf);
        let t = tensors.get(&name).unwrap_or_else(|| panic!("{ty:?}: no tensor `{name}` for `{hf}`"));
        let shape: Vec<i64> = w.size().iter().rev().copied().collect();
        assert_eq!(t["shape"], json!(shape), "{ty:?} {name}: shape");
        let w = match hf.rsplit('.').nth(1) {
            Some("q_proj") => permute(&w, c.num_attention_heads),
            Some("k_proj") => permute(&w, c.num_key_value_heads),
            _ => w.shallow_clone(),
        };
        let values: Vec<f32> = Vec::try_from(&w.contiguous().view([-1])).unwrap();
        let (kind, values) = match (ty, w.dim()) {
            (_, 1) | (GgufType::F32, _) => ("F32", values),
            (GgufType::F16, _) => ("F16", values.iter().map(|&v| half_round(v)).collect()),
            (GgufType::Q8_0, _) => ("Q8_0", QuantMatrix::quantize(QuantFormat::Q8_0, &values, shape[0] as usize).unwrap().dequantize()),
            (GgufType::Q4_0, _) => ("Q4_0", QuantMatrix::quantize(QuantFormat::Q4_0, &values, shape[0] as usize).unwrap().dequantize()),
        };
        assert_eq!(t["type"], kind, "{ty:?} {name}: type");
        assert!(f32s(&out.join(format!("{name}.f32"))) == values, "{ty:?} {name}: values");
    }
}

fn half_round(v: f32) -> f32 {
    Tensor::from_slice(&[v]).to_kind(Kind::Half).to_kind(Kind::Float).double_value(&[0]) as f32
}

#[test]
fn the_gguf_package_reads_what_stlm_writes() {
    let Some(python) = reference_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    tch::manual_seed(5);
    // stlm's byte-level BPE (ids 0, 1: end of text, padding), fewer ids than the model has.
    let texts: Vec<String> = (0..30).map(|i| format!("Once upon a time, Lily had {i} red balls.\n")).collect();
    let opts = BpeOptions { vocab_size: 280, show_progress: false, ..BpeOptions::default() };
    let bpe = dir.path().join("bpe.json");
    Tokenizer::train_bpe_on_texts(&texts, &opts).unwrap().save(&bpe).unwrap();
    let m = DecoderModel::new(config(300, 2, None), Device::Cpu).unwrap();
    for ty in [GgufType::F32, GgufType::F16, GgufType::Q8_0] {
        check(&python, &m, &bpe, ty, dir.path());
    }
    // A sentencepiece-style vocabulary (llama2.c's: <unk>, <s>, </s>, bytes, pieces by score).
    let mut pieces: Vec<Vec<u8>> = vec![b"<unk>".to_vec(), b"\n<s>\n".to_vec(), b"\n</s>\n".to_vec()];
    pieces.extend((0..=255u8).map(|b| format!("<0x{b:02X}>").into_bytes()));
    let mut scores = vec![0.0; pieces.len()];
    for (i, p) in [" ", "a", "t", "h", "e", " t", "he", " the"].iter().enumerate() {
        pieces.push(p.as_bytes().to_vec());
        scores.push(if i < 5 { -1e10 } else { -(i as f32) });
    }
    let spm = dir.path().join("spm.json");
    std::fs::write(&spm, Llama2cVocab::new(pieces, scores).unwrap().to_tokenizer_json().unwrap()).unwrap();
    let m = DecoderModel::new(config(267, 4, Some(1)), Device::Cpu).unwrap();
    check(&python, &m, &spm, GgufType::F32, dir.path());
}
