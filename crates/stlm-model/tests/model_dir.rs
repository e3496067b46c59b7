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

/// MoE directories in transformers' layouts round-trip through config.json alone, and a config
/// whose expert or key count does not match the weights is an error naming the tensor.
#[test]
fn moe_directories_round_trip_and_mismatches_are_named() {
    let moe = |router: &str, rest: &str| format!("moe = {{ num_experts = 4, router = {{ kind = \"top-k\", k = 2{router} }}{rest} }}\n");
    let cases = [
        ("mixtral", format!("model_type = \"mixtral\"\n{}", moe("", "")), "num_local_experts"),
        (
            "qwen2_moe",
            format!("model_type = \"qwen2_moe\"\nattention_bias = true\nattention_out_bias = false\n{}", moe(", norm_topk_prob = false", ", expert_intermediate_size = 12, shared_expert = { intermediate_size = 20, gate = true }, dense_layers = [0]")),
            "num_experts",
        ),
        ("qwen3_moe", format!("model_type = \"qwen3_moe\"\nqk_norm = true\n{}", moe("", ", expert_intermediate_size = 12, sparse_step = 2")), "num_experts"),
    ];
    for (name, extra, field) in cases {
        let dir = tempfile::tempdir().unwrap();
        let m = tiny("llama", &extra);
        m.save(dir.path(), None).unwrap();
        std::fs::remove_file(dir.path().join("stlm.toml")).unwrap();
        let back = load_model(dir.path(), Device::Cpu, DType::Float32).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(back.config, m.config, "{name}");
        assert!(logits(&m).equal(&logits(&back)), "{name}");

        let config = dir.path().join("config.json");
        let good = std::fs::read_to_string(&config).unwrap();
        for (count, want) in [(3, "unexpected tensor"), (5, "missing tensor")] {
            std::fs::write(&config, good.replace(&format!("\"{field}\": 4"), &format!("\"{field}\": {count}"))).unwrap();
            let e = load_model(dir.path(), Device::Cpu, DType::Float32).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("experts") && e.contains("model.safetensors"), "{name}, {count} experts: {e}");
        }
        std::fs::write(&config, good.replace("\"num_experts_per_tok\": 2", "\"num_experts_per_tok\": 9")).unwrap();
        let e = load_model(dir.path(), Device::Cpu, DType::Float32).unwrap_err().to_string();
        assert!(e.contains("`k` (9)"), "{name}: top-k above the expert count: {e}");
        if name != "mixtral" {
            std::fs::write(&config, good.replace("\"use_sliding_window\": false", "\"use_sliding_window\": true")).unwrap();
            let e = load_model(dir.path(), Device::Cpu, DType::Float32).unwrap_err().to_string();
            assert!(e.contains("use_sliding_window"), "{name}: {e}");
        }
    }

    // Doge's product keys: 49 experts (7 keys) against weights saved with 64 (8 keys).
    let dir = tempfile::tempdir().unwrap();
    let doge = "model_type = \"doge\"\nresidual_scales = true\nattention = [{ kind = \"doge-dma\", keep_window_size = 4 }]\ncdmoe = { num_experts = 64, top_k = 4, routing = \"hf_compat\" }\n";
    tiny("llama", doge).save(dir.path(), None).unwrap();
    std::fs::remove_file(dir.path().join("stlm.toml")).unwrap();
    let config = dir.path().join("config.json");
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, good.replace("\"num_experts\": 64", "\"num_experts\": 49")).unwrap();
    let e = load_model(dir.path(), Device::Cpu, DType::Float32).unwrap_err().to_string();
    assert!(e.contains("router_gate") || e.contains("embed"), "{e}");
    assert!(e.contains("shape"), "{e}");
}

#[test]
fn export_rules_are_checked_where_a_model_is_saved() {
    // A config parsed from TOML is refused for its model_type at once; one built in code (the
    // config holds no export rules) is refused when saved, before anything is written.
    let text = "model_type = \"llama\"\nvocab_size = 40\nhidden_size = 16\nintermediate_size = 24\nnum_hidden_layers = 1\nnum_attention_heads = 2\nlayer_sharing = { repeats = 2 }\n";
    let e = ModelConfig::from_toml_str(text, Path::new("s.toml")).unwrap_err().to_string();
    assert!(e.contains("model_type") && e.contains("layer_sharing"), "{e}");
    let stlm = ModelConfig::from_toml_str(&text.replace("llama", "stlm"), Path::new("s.toml")).unwrap();
    let cfg = ModelConfig { model_type: stlm_model::ModelType::Llama, ..stlm };
    let m = DecoderModel::new(cfg, Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    let e = m.save(&out, None).unwrap_err().to_string();
    assert!(e.contains("m") && e.contains("model_type") && e.contains("layer_sharing"), "{e}");
    assert!(!out.join("model.safetensors").exists(), "nothing is written");
}
