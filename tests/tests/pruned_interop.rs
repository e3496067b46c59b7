//! Structurally pruned models are still Hugging Face models: a Llama with fewer heads (GQA) or
//! FFN neurons, a Mixtral with fewer experts and a GPT-2 with fewer neurons, shrunk by
//! stlm-prune and saved, load with `AutoModelForCausalLM.from_pretrained` with the same logits.

use serde_json::json;
use stlm_core::read_safetensors;
use stlm_model::{DecoderModel, ModelConfig};
use stlm_prune::{prune_structured, Importance, StructuredOptions, Unit};
use stlm_tests::{max_abs_diff, reference_python, run_python};
use tch::{Device, Kind, Tensor};

const IDS: [i64; 10] = [1, 17, 42, 99, 3, 3, 58, 100, 0, 77];

#[test]
fn structurally_pruned_models_load_in_transformers_with_the_same_logits() {
    let Some(python) = reference_python() else { return };
    let root = tempfile::tempdir().unwrap();
    let cases = [
        ("llama-gqa-heads", "preset = \"llama\"\nnum_key_value_heads = 2\n", Unit::Heads, 0.5),
        ("llama-neurons", "preset = \"llama\"\n", Unit::Neurons, 0.25),
        ("llama-layers", "preset = \"llama\"\nnum_hidden_layers = 3\n", Unit::Layers, 0.34),
        ("gpt2-neurons", "preset = \"gpt2\"\n", Unit::Neurons, 0.25),
        (
            "mixtral-experts",
            "preset = \"llama\"\nmodel_type = \"mixtral\"\nmoe = { num_experts = 4, router = { kind = \"top-k\", k = 2 } }\n",
            Unit::Experts,
            0.25,
        ),
    ];
    let calib = vec![Tensor::randint(101, [2, 16], (Kind::Int64, Device::Cpu))];
    let (mut tasks, mut ours) = (Vec::new(), Vec::new());
    for (name, preset, unit, amount) in cases {
        let text = format!("{preset}vocab_size = 101\nhidden_size = 64\nintermediate_size = 96\nnum_attention_heads = 4\nmax_position_embeddings = 64\n");
        let text = if text.contains("num_hidden_layers") { text } else { format!("{text}num_hidden_layers = 2\n") };
        let cfg = ModelConfig::from_toml_str(&text, std::path::Path::new(name)).unwrap();
        let mut model = DecoderModel::new(cfg, Device::Cpu).unwrap();
        let importance = if unit == Unit::Layers { Importance::Activation } else { Importance::Taylor };
        let (small, report) = prune_structured(&mut model, &calib, &StructuredOptions { unit, amount, importance }, false).unwrap();
        assert!(report.params_after < report.params_before, "{name}");
        let dir = root.path().join(name);
        small.save(&dir, None).unwrap();
        let out = root.path().join(format!("{name}.safetensors"));
        tasks.push(json!({"action": "logits", "dir": dir, "ids": IDS, "out": out}));
        let _g = tch::no_grad_guard();
        ours.push((name, small.forward(&Tensor::from_slice(&IDS).unsqueeze(0)).squeeze_dim(0), out, report.config_changes));
    }
    let job = root.path().join("job.json");
    std::fs::write(&job, serde_json::to_string(&tasks).unwrap()).unwrap();
    run_python(&python, "hf_reference.py", &[job.to_str().unwrap()]);
    for (name, logits, out, changes) in ours {
        let theirs = &read_safetensors(&out).unwrap()["logits"];
        let diff = max_abs_diff(&logits, theirs);
        eprintln!("{name} ({}): max abs logit difference {diff:.2e}", changes.join(", "));
        assert!(diff <= 1e-4, "{name}: max abs logit difference {diff}");
    }
}
