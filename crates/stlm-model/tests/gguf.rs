//! GGUF: a random Llama model exported in each type and imported back gives the original logits
//! (F32), the f16-rounded weights (F16), or exactly the weights of round-to-nearest blocks
//! (Q8_0, Q4_0), imported as a quantized model; a quantized model directory's blocks go out and
//! come back byte for byte; the tokenizer comes back encoding the same ids; bad files are one
//! line naming the file, and write nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use stlm_core::quant::{QuantFormat, QuantMatrix};
use stlm_model::gguf::{self, GgufType};
use stlm_model::{DecoderModel, ModelConfig};
use stlm_tokenizers::{BpeOptions, Tokenizer};
use tch::{Device, Kind, Tensor};

/// libtorch's generator is global: tests that draw random weights take turns.
static RNG: Mutex<()> = Mutex::new(());

fn config(tied: bool, kv_heads: i64) -> ModelConfig {
    ModelConfig {
        vocab_size: 300,
        hidden_size: 64,
        intermediate_size: 96,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: kv_heads,
        max_position_embeddings: 32,
        norm_eps: 1e-5,
        rope_theta: 500.0,
        tie_word_embeddings: tied,
        initializer_range: 0.2,
        ..ModelConfig::llama()
    }
}

fn tokenizer(dir: &Path) -> PathBuf {
    let texts: Vec<String> = (0..30).map(|i| format!("Once upon a time, a little girl named Lily saw {i} big red balls.\n")).collect();
    let opts = BpeOptions { vocab_size: 290, show_progress: false, ..BpeOptions::default() };
    let path = dir.join("tokenizer.json");
    Tokenizer::train_bpe_on_texts(&texts, &opts).unwrap().save(&path).unwrap();
    path
}

/// A random model directory (norm weights other than 1, so their placement matters).
fn model_dir(dir: &Path, name: &str, tied: bool, kv_heads: i64, seed: i64) -> (PathBuf, DecoderModel) {
    let _g = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed);
    let m = DecoderModel::new(config(tied, kv_heads), Device::Cpu).expect("model");
    tch::no_grad(|| {
        for (name, mut t) in m.var_store().variables() {
            if name.ends_with("norm.weight") {
                t.copy_(&(Tensor::rand_like(&t) + 0.5));
            }
        }
    });
    let out = dir.join(name);
    m.save(&out, Some(&tokenizer(dir))).unwrap();
    (out, m)
}

fn logits(m: &DecoderModel) -> Tensor {
    let ids = Tensor::from_slice(&[0i64, 5, 17, 42, 3, 288, 60, 2, 9, 131, 77, 12]).view([1, -1]);
    tch::no_grad(|| m.forward(&ids))
}

fn load(dir: &Path) -> DecoderModel {
    stlm_model::load_model(dir, Device::Cpu, stlm_core::DType::Float32).expect("load")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// `t` as round-to-nearest blocks of `format` give it back.
fn rtn(t: &Tensor, format: QuantFormat) -> Tensor {
    let (rows, cols) = t.size2().unwrap();
    let values: Vec<f32> = Vec::try_from(&t.contiguous().view([-1])).unwrap();
    Tensor::from_slice(&QuantMatrix::quantize(format, &values, cols as usize).unwrap().dequantize()).view([rows, cols])
}

fn round_trip(model: &Path, ty: GgufType, dir: &Path) -> (gguf::ExportReport, gguf::ImportReport, DecoderModel) {
    let file = dir.join(format!("{ty:?}.gguf"));
    let exported = gguf::export(model, &file, ty).expect("export");
    let out = dir.join(format!("{ty:?}-back"));
    let imported = gguf::import(&file, &out).expect("import");
    (exported, imported, load(&out))
}

#[test]
fn float_types_round_trip_with_their_logits_and_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    for (tied, kv) in [(true, 4), (false, 2)] {
        let (model, m) = model_dir(dir.path(), &format!("m-{tied}"), tied, kv, 7);
        let (e, i, back) = round_trip(&model, GgufType::F32, dir.path());
        assert_eq!((e.file_type, e.vocab, e.copied), (0, "gpt2", 0));
        assert_eq!(e.types.get("F32"), Some(&(2 + 9 * 2 + usize::from(!tied))));
        assert_eq!((i.quantized, i.vocab), (0, Some("gpt2")));
        assert_eq!(back.config.tie_word_embeddings, tied);
        assert_eq!((back.config.num_key_value_heads, back.config.rope_theta), (kv, 500.0));
        let d = max_diff(&logits(&back), &logits(&m));
        assert!(d == 0.0, "tied={tied}: F32 logits differ by {d}");
        let ours = Tokenizer::from_file(&model.join("tokenizer.json")).unwrap();
        let theirs = Tokenizer::from_file(&i.out.join("tokenizer.json")).unwrap();
        let text = "Once upon a time, Lily saw 7 red balls and ünïcode.";
        assert_eq!(theirs.encode(text, false).unwrap(), ours.encode(text, false).unwrap());
        assert_eq!(theirs.vocab_size(), 300, "padded up to the model's vocabulary");

        let (e, _, back) = round_trip(&model, GgufType::F16, dir.path());
        assert_eq!(e.file_type, 1);
        let want = m.var_store().variables();
        for (name, t) in back.var_store().variables() {
            let w = &want[&name];
            let w = if t.dim() == 2 { w.to_kind(Kind::Half).to_kind(Kind::Float) } else { w.shallow_clone() };
            assert_eq!(max_diff(&t, &w), 0.0, "{name}: F16 holds the f16-rounded weight");
        }
    }
}

#[test]
fn quantized_types_import_as_round_to_nearest_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let (model, m) = model_dir(dir.path(), "m", false, 2, 11);
    for (ty, format, file_type) in [(GgufType::Q8_0, QuantFormat::Q8_0, 7), (GgufType::Q4_0, QuantFormat::Q4_0, 2)] {
        let (e, i, back) = round_trip(&model, ty, dir.path());
        assert_eq!((e.file_type, e.kept_float.len()), (file_type, 0));
        // Every matrix (embedding and classifier included) comes back as quantized blocks.
        assert_eq!(i.quantized, 2 * 7 + 2, "{ty:?}");
        assert!(back.is_quantized());
        let want = m.var_store().variables();
        for (name, t) in back.var_store().variables() {
            let w = &want[&name];
            let w = if t.dim() == 2 { rtn(w, format) } else { w.shallow_clone() };
            assert_eq!(max_diff(&t, &w), 0.0, "{ty:?} {name}");
        }
        for (name, q) in back.quantized_weights() {
            assert_eq!(q.format(), format, "{name}");
        }
    }
}

#[test]
fn a_quantized_model_directorys_blocks_are_copied_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let (model, mut m) = model_dir(dir.path(), "float", true, 2, 13);
    let mut blocks = HashMap::new();
    for (name, t) in m.var_store().variables() {
        if t.dim() == 2 {
            let (_, cols) = t.size2().unwrap();
            let values: Vec<f32> = Vec::try_from(&t.contiguous().view([-1])).unwrap();
            let format = if name.contains("mlp") { QuantFormat::Q4_0 } else { QuantFormat::Q8_0 };
            blocks.insert(name, QuantMatrix::quantize(format, &values, cols as usize).unwrap());
        }
    }
    m.set_quantized(blocks).unwrap();
    let quantized = dir.path().join("q");
    m.save(&quantized, Some(&model.join("tokenizer.json"))).unwrap();
    let want = logits(&load(&quantized));
    // F16 asks for float matrices in f16; there are none: the blocks are copied as they are.
    let (e, i, back) = round_trip(&quantized, GgufType::F16, dir.path());
    assert_eq!((e.copied, e.file_type, e.types.get("F16")), (1 + 2 * 7, 2, None));
    assert_eq!(i.quantized, 1 + 2 * 7);
    let ours = load(&quantized);
    let ours = ours.quantized_weights();
    let theirs = back.quantized_weights();
    assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>());
    for (name, q) in &ours {
        assert!(q.to_bytes() == theirs[name].to_bytes(), "{name}: blocks changed on the way");
    }
    assert_eq!(max_diff(&logits(&back), &want), 0.0);
}

/// The bytes of `file` with the first `from` replaced by `to` (same length).
fn patched(file: &Path, from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut bytes = std::fs::read(file).unwrap();
    let at = bytes.windows(from.len()).position(|w| w == from).expect("pattern in file");
    bytes[at..at + to.len()].copy_from_slice(to);
    bytes
}

#[test]
fn bad_files_are_one_line_errors_that_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = model_dir(dir.path(), "m", true, 4, 17);
    let good = dir.path().join("good.gguf");
    gguf::export(&model, &good, GgufType::F32).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    // output_norm.weight: name, 1 dimension, 64, type F32 (0) -> Q8_1 (9).
    let mut norm = b"output_norm.weight".to_vec();
    norm.extend(1u32.to_le_bytes());
    norm.extend(64u64.to_le_bytes());
    let mut q8_1 = norm.clone();
    norm.extend(0u32.to_le_bytes());
    q8_1.extend(9u32.to_le_bytes());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("foreign", b"not a gguf file at all, just some text".to_vec(), "not a readable GGUF file"),
        ("truncated", bytes[..bytes.len() - 100].to_vec(), "truncated: tensor `output_norm.weight` ends at byte"),
        ("arch", patched(&good, b"\x05\0\0\0\0\0\0\0llama", b"\x05\0\0\0\0\0\0\0bloom"), "architecture `bloom` is not supported"),
        ("key", patched(&good, b"llama.block_count", b"llama.block_cnunt"), "missing key `llama.block_count`"),
        ("type", patched(&good, &norm, &q8_1), "tensor `output_norm.weight` has type Q8_1"),
    ];
    for (name, bytes, want) in cases {
        let file = dir.path().join(format!("{name}.gguf"));
        std::fs::write(&file, bytes).unwrap();
        let out = dir.path().join(format!("{name}-out"));
        let e = gguf::import(&file, &out).unwrap_err().to_string();
        assert!(e.contains(&format!("{name}.gguf")) && e.contains(want), "{name}: {e}");
        assert!(!e.contains('\n'), "{name}: one line: {e}");
        assert!(!out.exists(), "{name}: nothing written");
    }
}

#[test]
fn models_llama_cpp_cannot_run_are_refused_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let gpt2 = ModelConfig { vocab_size: 300, hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2, ..ModelConfig::gpt2() };
    let m = {
        let _g = RNG.lock().unwrap_or_else(|e| e.into_inner());
        DecoderModel::new(gpt2, Device::Cpu).unwrap()
    };
    m.save(&dir.path().join("gpt2"), Some(&tok)).unwrap();
    let out = dir.path().join("x.gguf");
    let e = gguf::export(&dir.path().join("gpt2"), &out, GgufType::F32).unwrap_err().to_string();
    assert!(e.contains("not a Llama model") && e.contains("norm = LayerNorm"), "{e}");
    assert!(!out.exists());
    let (model, _) = model_dir(dir.path(), "m", true, 4, 19);
    std::fs::remove_file(model.join("tokenizer.json")).unwrap();
    let e = gguf::export(&model, &out, GgufType::F32).unwrap_err().to_string();
    assert!(e.contains("no tokenizer.json"), "{e}");
}
