//! Mixture-of-experts models: cached decoding equals the full forward for every causal router,
//! outputs are causal (Switch's training-time capacity included), and the balancing losses reach
//! the router through `take_moe_stats`.

use proptest::prelude::*;
use stlm_attention::AttentionMask;
use stlm_model::{DecoderModel, ModelConfig};
use tch::{Device, Kind, Tensor};

const ROUTERS: &[&str] = &[
    "{ kind = \"top-k\", k = 2 }",
    "{ kind = \"top-k\", k = 1, norm_topk_prob = false, gate = \"sigmoid\" }",
    "{ kind = \"switch\", capacity_factor = 1.0 }",
    "{ kind = \"aux-free\", k = 2, gate = \"sigmoid\" }",
];

fn model(router: &str) -> DecoderModel {
    let text = format!(
        "model_type = \"stlm\"\nvocab_size = 53\nhidden_size = 32\nintermediate_size = 24\nnum_hidden_layers = 2\nnum_attention_heads = 4\nnum_key_value_heads = 2\nmax_position_embeddings = 64\ninitializer_range = 0.3\nmoe = {{ num_experts = 4, router = {router}, z_loss_coef = 0.001 }}\n"
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

    /// With gradients on (training: Switch drops over capacity), later tokens never change earlier
    /// logits beyond float rounding: the experts' products group a different set of rows when
    /// later tokens change, and a matrix product's rounding depends on its row count (a causality
    /// leak would change logits by far more than 1e-5).
    #[test]
    fn training_forward_is_causal(seed in 0i64..1000, t in 0i64..13) {
        let x = ids(seed, 2, 14);
        let y = Tensor::cat(&[x.narrow(1, 0, t + 1), ids(seed + 7, 2, 13 - t)], 1);
        for router in ROUTERS {
            let m = model(router);
            let diff = (m.forward(&x).narrow(1, 0, t + 1) - m.forward(&y).narrow(1, 0, t + 1)).abs().max().double_value(&[]);
            prop_assert!(diff < 1e-5, "{router}: logits at <= {t} changed by {diff}");
        }
    }
}

#[test]
fn balancing_losses_reach_the_router() {
    let m = model(ROUTERS[0]);
    let _ = m.forward(&ids(1, 2, 9));
    let stats = m.take_moe_stats();
    assert_eq!(stats.len(), 2, "one per layer");
    let aux = stats.iter().map(|(_, s)| s.aux_loss.shallow_clone()).reduce(|a, b| a + b).unwrap();
    aux.backward();
    let gate = &m.var_store().variables()["model.layers.0.mlp.gate.weight"];
    assert!(gate.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    assert!(m.take_moe_stats().is_empty(), "taken");
    let e = ModelConfig::from_toml_str(
        "model_type = \"stlm\"\nmoe = { num_experts = 4, router = { kind = \"expert-choice\" } }\n",
        std::path::Path::new("ec.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("moe.router") && e.contains("not causal"), "{e}");
}
