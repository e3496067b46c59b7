//! Doge's Dynamic Mask Attention against transformers' `DogeAttention` (eager attention): one
//! random layer with `A` randomised and `keep_window_size` smaller than the sequence, so that the
//! top-k masking runs. Same parameter names, same outputs (max abs difference <= 1e-4, float32).

use serde_json::json;
use stlm_attention::{AttentionMask, Rope};
use stlm_core::read_safetensors;
use stlm_model::layers::{RotaryAngles, SelfAttention};
use stlm_model::ModelConfig;
use stlm_tests::{max_abs_diff, reference_python, run_python};
use tch::{nn, Device, Kind, Tensor};

#[test]
fn dynamic_mask_attention_matches_transformers() {
    let Some(python) = reference_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("doge.safetensors");
    let (batch, seq, keep) = (2, 13, 5);
    let job = json!([{"action": "doge_attention", "seed": 3, "batch": batch, "seq": seq, "out": out,
        "config": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "keep_window_size": keep,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                   "max_position_embeddings": 64, "vocab_size": 10}}]);
    let job_path = dir.path().join("job.json");
    std::fs::write(&job_path, job.to_string()).unwrap();
    run_python(&python, "hf_reference.py", &[job_path.to_str().unwrap()]);
    let reference = read_safetensors(&out).unwrap();

    let cfg = ModelConfig::from_toml_str(
        &format!("model_type = \"stlm\"\nhidden_size = 64\nnum_attention_heads = 4\nnum_key_value_heads = 2\nnum_hidden_layers = 1\nmax_position_embeddings = 64\nattention = [{{ kind = \"doge-dma\", keep_window_size = {keep} }}]\n"),
        std::path::Path::new("doge.toml"),
    )
    .unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let layer = SelfAttention::new(vs.root() / "self_attn", &cfg, 0, 0.02);
    let _g = tch::no_grad_guard();
    let mut names: Vec<String> = Vec::new();
    for (name, mut var) in vs.variables() {
        let key = name.strip_prefix("self_attn.").unwrap();
        let value = reference.get(key).unwrap_or_else(|| panic!("transformers has no parameter `{key}`"));
        var.copy_(value);
        names.push(key.to_string());
    }
    let expected = reference.len() - 2; // all but hidden_states and output
    assert_eq!(names.len(), expected, "same parameters as DogeAttention: {names:?}");

    let positions = Tensor::arange(seq, (Kind::Int64, Device::Cpu)).unsqueeze(0).expand([batch, seq], false);
    let (cos, sin) = Rope::new(16, 10000.0, Device::Cpu).cos_sin(&positions, Kind::Float);
    let rotary = RotaryAngles { cos, sin };
    let got = layer.forward(&reference["hidden_states"], Some(&rotary), &positions, &AttentionMask::Causal, None, None);
    let diff = max_abs_diff(&got, &reference["output"]);
    assert!(diff <= 1e-4, "max abs difference {diff} against transformers' DogeAttention");
    assert!(reference["output"].abs().max().double_value(&[]) > 0.1, "a non-trivial reference");
}

/// Doge's Cross Domain MoE in transformers' routing (which mixes tokens: `hf_compat`) against
/// `DogeCDMoE.forward` on a random block: 64 retrieval experts (8 product keys), top 4, beside the
/// shared SwiGLU MLP; and stlm's causal mode agrees with it on single tokens.
#[test]
fn cross_domain_moe_matches_transformers() {
    use stlm_moe::{CdMoe, CdmoeRouting};
    let Some(python) = reference_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cdmoe.safetensors");
    let job = json!([{"action": "doge_cdmoe", "seed": 5, "batch": 2, "seq": 7, "out": out,
        "config": {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "is_moe": true,
                   "num_experts": 64, "num_experts_per_tok": 4, "vocab_size": 10}}]);
    let job_path = dir.path().join("job.json");
    std::fs::write(&job_path, job.to_string()).unwrap();
    run_python(&python, "hf_reference.py", &[job_path.to_str().unwrap()]);
    let reference = read_safetensors(&out).unwrap();

    let vs = nn::VarStore::new(Device::Cpu);
    let layer = CdMoe::new(vs.root(), 32, 48, 64, 4, false, CdmoeRouting::HfCompat, 0.02, 0.02);
    let _g = tch::no_grad_guard();
    let mut copied = 0;
    for (name, mut var) in vs.variables() {
        let value = reference.get(&name).unwrap_or_else(|| panic!("transformers has no parameter `{name}`"));
        var.copy_(value);
        copied += 1;
    }
    assert_eq!(copied, reference.len() - 2, "same parameters as DogeCDMoE");
    let x = &reference["hidden_states"];
    let diff = max_abs_diff(&layer.forward(x), &reference["output"]);
    assert!(diff <= 1e-4, "max abs difference {diff} against transformers' DogeCDMoE");
    // One token at a time (generation), the causal mode routes exactly as transformers does.
    let causal = CdMoe { routing: CdmoeRouting::Causal, ..layer.clone_shallow() };
    let one = x.narrow(0, 0, 1).narrow(1, 0, 1);
    assert!(max_abs_diff(&causal.forward(&one), &layer.forward(&one)) < 1e-6);
}
