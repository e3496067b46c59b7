//! Mixture-of-experts models: cached decoding equals the full forward for every causal router
//! (and for DeepSeek-style fine-grained plus shared experts in every second layer, with q/k
//! norms), outputs are causal (Switch's training-time capacity included), and the balancing
//! losses reach the router through the stats a forward returns.

use proptest::prelude::*;
use stlm_attention::AttentionMask;
use stlm_model::{DecoderModel, Mode, ModelConfig};
use tch::{Device, Kind, Tensor};

/// The `moe` settings after `num_experts = 4` (and, after `|`, top-level fields).
const ROUTERS: &[&str] = &[
    "router = { kind = \"top-k\", k = 2 }",
    "router = { kind = \"top-k\", k = 1, norm_topk_prob = false, gate = \"sigmoid\" }",
    "router = { kind = \"switch\", capacity_factor = 1.0 }",
    "router = { kind = \"aux-free\", k = 2, gate = \"sigmoid\" }",
    "router = { kind = \"aux-free\", k = 2, gate = \"sigmoid\" }, expert_intermediate_size = 8, shared_expert = { intermediate_size = 16, gate = true }, sparse_step = 2|qk_norm = true",
];

fn model(router: &str) -> DecoderModel {
    let (moe, top) = router.split_once('|').unwrap_or((router, ""));
    let text = format!(
        "model_type = \"stlm\"\nvocab_size = 53\nhidden_size = 32\nintermediate_size = 24\nnum_hidden_layers = 2\nnum_attention_heads = 4\nnum_key_value_heads = 2\nmax_position_embeddings = 64\ninitializer_range = 0.3\n{top}\nmoe = {{ num_experts = 4, {moe}, z_loss_coef = 0.001 }}\n"
    );
    tch::manual_seed(5);
    let cfg = ModelConfig::from_toml_str(&text, std::path::Path::new("moe.toml")).expect("valid config");
    DecoderModel::new(cfg, Device::Cpu).expect("model")
}

fn ids(seed: i64, b: i64, s: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randint(53, [b, s], (Kind::Int64, Device::Cpu))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    #[test]
    fn cached_decoding_equals_the_full_forward(seed in 0i64..1000, prefill in 1i64..10) {
        let _g = tch::no_grad_guard();
        let x = ids(seed, 2, 15);
        for router in ROUTERS {
            let m = model(router);
            let full = m.forward(&x);
            let mut cache = m.new_cache(2, 15);
            let mut parts = Vec::new();
            let mut start = 0;
            while start < 15 {
                let n = if start == 0 { prefill } else { 1 };
                let mask = AttentionMask::causal(n, start, None, Device::Cpu);
                let pos = Tensor::arange_start(start, start + n, (Kind::Int64, Device::Cpu)).unsqueeze(0).expand([2, n], false);
                parts.push(m.forward_ext(&x.narrow(1, start, n), &pos, &mask, Some(&mut cache)));
                start += n;
            }
            let diff = (full - Tensor::cat(&parts, 1)).abs().max().double_value(&[]);
            prop_assert!(diff < 1e-4, "{router}: {diff}");
        }
    }

    /// In training mode (Switch drops over capacity), later tokens never change earlier
    /// logits beyond float rounding: the experts' products group a different set of rows when
    /// later tokens change, and a matrix product's rounding depends on its row count (a causality
    /// leak would change logits by far more than 1e-5).
    #[test]
    fn training_forward_is_causal(seed in 0i64..1000, t in 0i64..13) {
        let x = ids(seed, 2, 14);
        let y = Tensor::cat(&[x.narrow(1, 0, t + 1), ids(seed + 7, 2, 13 - t)], 1);
        for router in ROUTERS {
            let m = model(router);
            let train = |ids: &Tensor| m.forward_mode(ids, Mode::Train).0.narrow(1, 0, t + 1);
            let diff = (train(&x) - train(&y)).abs().max().double_value(&[]);
            prop_assert!(diff < 1e-5, "{router}: logits at <= {t} changed by {diff}");
        }
    }
}

#[test]
fn balancing_losses_reach_the_router() {
    let m = model(ROUTERS[0]);
    let (_, stats) = m.forward_mode(&ids(1, 2, 9), Mode::Train);
    assert_eq!(stats.len(), 2, "one per layer");
    let aux = stats.iter().map(|(_, s)| s.aux_loss.shallow_clone()).reduce(|a, b| a + b).unwrap();
    aux.backward();
    let gate = &m.var_store().variables()["model.layers.0.mlp.gate.weight"];
    assert!(gate.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    let e = ModelConfig::from_toml_str(
        "model_type = \"stlm\"\nmoe = { num_experts = 4, router = { kind = \"expert-choice\" } }\n",
        std::path::Path::new("ec.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("moe.router") && e.contains("not causal"), "{e}");
}

/// DeepSeek/Qwen-style layers: experts narrower than the dense MLP, a gated shared expert, dense
/// MLPs where `sparse_step` and `dense_layers` say; the MoE block equals its definition
/// `routed(x) + sigmoid(g·x) · swiglu_shared(x)` in float64.
#[test]
fn fine_grained_and_shared_experts() {
    let m = model(ROUTERS[4]);
    let vars = m.var_store().variables();
    assert!(vars.contains_key("model.layers.0.mlp.gate_proj.weight"), "layer 0 dense (sparse_step 2)");
    assert_eq!(vars["model.layers.1.mlp.experts.gate_up_proj"].size(), vec![4, 16, 32], "experts 8 wide");
    assert_eq!(vars["model.layers.1.mlp.shared_expert.down_proj.weight"].size(), vec![32, 16]);
    assert_eq!(vars["model.layers.1.mlp.shared_expert_gate.weight"].size(), vec![1, 32]);
    assert_eq!(vars["model.layers.1.self_attn.q_norm.weight"].size(), vec![8]);
    let (_, stats) = m.forward_mode(&ids(2, 1, 5), Mode::Eval);
    assert_eq!(stats.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![1], "stats of the MoE layer only");

    let stlm_model::layers::FeedForward::Moe(layer) = &m.layers[1].mlp else { panic!("layer 1 is MoE") };
    let _g = tch::no_grad_guard();
    let x = Tensor::randn([1, 6, 32], (Kind::Float, Device::Cpu));
    let got = layer.forward(&x, Mode::Eval).0.to_kind(Kind::Double);
    let d = |t: &Tensor| t.to_kind(Kind::Double);
    let tokens = x.view([6, 32]);
    let routing = layer.config.router.route(&tokens.matmul(&layer.gate.tr()), layer.bias.as_ref());
    let routed = d(&stlm_moe::moe_forward(&tokens, &routing, &layer.experts));
    let shared = layer.shared_expert.as_ref().unwrap();
    let xd = d(&tokens);
    let mlp = (xd.matmul(&d(&shared.gate_proj).tr()).silu() * xd.matmul(&d(&shared.up_proj).tr())).matmul(&d(&shared.down_proj).tr());
    let gate = xd.matmul(&d(layer.shared_expert_gate.as_ref().unwrap()).tr()).sigmoid();
    let want = (routed + gate * mlp).view([1, 6, 32]);
    let diff = (got - want).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "{diff}");
}

#[test]
fn moe_layer_settings_are_checked() {
    let p = std::path::Path::new("moe.toml");
    let base = "model_type = \"stlm\"\nnum_hidden_layers = 4\n";
    let cfg = ModelConfig::from_toml_str(&format!("{base}moe = {{ num_experts = 4, router = {{ kind = \"top-k\", k = 2 }}, sparse_step = 2, dense_layers = [3] }}\n"), p).unwrap();
    let moe_layers: Vec<usize> = (0..4).filter(|&i| cfg.layer_moe(i).is_some()).collect();
    assert_eq!(moe_layers, vec![1], "layers 1 and 3 by the step, 3 kept dense");
    for (bad, field) in [("sparse_step = 0", "sparse_step"), ("expert_intermediate_size = 0", "expert_intermediate_size"), ("shared_expert = { intermediate_size = -1 }", "shared_expert.intermediate_size")] {
        let e = ModelConfig::from_toml_str(&format!("{base}moe = {{ num_experts = 4, router = {{ kind = \"top-k\", k = 2 }}, {bad} }}\n"), p).unwrap_err().to_string();
        assert!(e.contains(field), "{bad}: {e}");
    }
    let qwen2 = "model_type = \"qwen2_moe\"\nattention_bias = true\nattention_out_bias = false\nmoe = { num_experts = 4, router = { kind = \"top-k\", k = 2 }, shared_expert = { intermediate_size = 8, gate = true } }\n";
    assert!(ModelConfig::from_toml_str(qwen2, p).is_ok());
    for (from, to, why) in [
        ("gate = true", "gate = false", "sigmoid gate"),
        ("attention_out_bias = false\n", "", "never o"),
        ("kind = \"top-k\"", "kind = \"aux-free\"", "top-k softmax"),
    ] {
        let e = ModelConfig::from_toml_str(&qwen2.replace(from, to), p).unwrap_err().to_string();
        assert!(e.contains("model_type") && e.contains(why), "{to}: {e}");
    }
    let e = ModelConfig::from_toml_str("model_type = \"qwen3_moe\"\nmoe = { num_experts = 4, router = { kind = \"top-k\", k = 2 } }\n", p).unwrap_err().to_string();
    assert!(e.contains("qk_norm"), "{e}");
    let e = ModelConfig::from_toml_str("qk_norm = true\n", p).unwrap_err().to_string();
    assert!(e.contains("llama") || e.contains("Llama"), "llama has no q/k norms: {e}");
    let e = ModelConfig::from_toml_str("model_type = \"mixtral\"\nmoe = { num_experts = 4, router = { kind = \"top-k\", k = 2 }, sparse_step = 2 }\n", p).unwrap_err().to_string();
    assert!(e.contains("every layer"), "{e}");
}
