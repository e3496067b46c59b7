//! Model directories: save/load round trips and clear errors for broken directories.

use std::path::Path;
use stlm_core::DType;
use stlm_model::{load_model, DecoderModel, ModelConfig};
use tch::{Device, Tensor};

fn tiny(preset: &str, extra: &str) -> DecoderModel {
    let text = format!("preset = \"{preset}\"\nvocab_size = 50\nhidden_size = 32\nintermediate_size = 40\nnum_hidden_layers = 2\nnum_attention_heads = 4\nmax_position_embeddings = 32\n{extra}");
    DecoderModel::new(ModelConfig::from_toml_str(&text, Path::new("t.toml")).unwrap(), Device::Cpu).unwrap()
}

fn logits(m: &DecoderModel) -> Tensor {
    let _g = tch::no_grad_guard();
    m.forward(&Tensor::from_slice(&[1i64, 5, 7, 9, 2]).unsqueeze(0))
}

#[test]
fn save_then_load_gives_identical_logits() {
    for (preset, extra) in
        [("llama", "num_key_value_heads = 1\n"), ("llama", "tie_word_embeddings = true\n"), ("gpt2", "")]
    {
        let dir = tempfile::tempdir().unwrap();
        let m = tiny(preset, extra);
        m.save(dir.path(), None).unwrap();
        // config.json alone (as transformers would write it) must load the same model.
        std::fs::remove_file(dir.path().join("stlm.toml")).unwrap();
        let back = load_model(dir.path(), Device::Cpu, DType::Float32).unwrap();
        assert_eq!(back.config, m.config, "{preset} {extra}");
        assert!(logits(&m).equal(&logits(&back)), "{preset} {extra}");
    }
}

#[test]
fn broken_directories_give_errors_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let e = load_model(&dir.path().join("nope"), Device::Cpu, DType::Float32).unwrap_err().to_string();
    assert!(e.contains("nope") && e.contains("does not exist"), "{e}");

    let m = tiny("llama", "");
    m.save(dir.path(), None).unwrap();
    std::fs::remove_file(dir.path().join("stlm.toml")).unwrap();
    let config = dir.path().join("config.json");
    let good = std::fs::read_to_string(&config).unwrap();

    std::fs::write(&config, good.replace("\"hidden_size\": 32", "\"hidden_size\": \"32\"")).unwrap();
    let e = load_model(dir.path(), Device::Cpu, DType::Float32).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("hidden_size"), "{e}");

    std::fs::write(&config, good.replace("\"model_type\": \"llama\"", "\"model_type\": \"bert\"")).unwrap();
    let e = load_model(dir.path(), Device::Cpu, DType::Float32).unwrap_err().to_string();
    assert!(e.contains("bert"), "{e}");

    std::fs::write(&config, good.replace("\"mlp_bias\"", "\"sliding_window\": 4, \"mlp_bias\"")).unwrap();
    let e = load_model(dir.path(), Device::Cpu, DType::Float32).unwrap_err().to_string();
    assert!(e.contains("sliding_window"), "{e}");

    std::fs::write(&config, good.replace("\"intermediate_size\": 40", "\"intermediate_size\": 41")).unwrap();
    let e = load_model(dir.path(), Device::Cpu, DType::Float32).unwrap_err().to_string();
    assert!(e.contains("model.safetensors") && e.contains("shape"), "{e}");

    std::fs::write(&config, &good).unwrap();
    let weights = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_model(dir.path(), Device::Cpu, DType::Float32).unwrap_err().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn decoding_layout_keeps_logits_and_saved_weights() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = tiny("llama", "");
    let before = logits(&m);
    m.optimize_for_decoding();
    let after = logits(&m);
    assert!((before - after).abs().max().double_value(&[]) < 1e-5);
    m.save(dir.path(), None).unwrap();
    let back = load_model(dir.path(), Device::Cpu, DType::Float32).unwrap();
    for (name, t) in m.var_store().variables() {
        assert!(t.equal(&back.var_store().variables()[&name]), "{name}");
    }
}
