//! Shared and repeated layers (`layer_sharing`): the weights are stored once, the model equals
//! the unrolled model that holds a copy per applied layer (logits, gradients, FLOPs), cached
//! decoding equals the full forward with one cache slot per applied layer, the recursion depth
//! changes at run time, per-repeat LoRA deltas equal the unrolled model with merged weights, and
//! what transformers cannot hold is refused there and saved as stlm.

use stlm_attention::AttentionMask;
use stlm_model::{DecoderModel, ModelConfig};
use tch::{Device, Kind, Tensor};

const BASE: &str = "model_type = \"stlm\"\nvocab_size = 41\nhidden_size = 32\nintermediate_size = 40\nnum_hidden_layers = 2\nnum_attention_heads = 4\nnum_key_value_heads = 2\nmax_position_embeddings = 32\ninitializer_range = 0.2\n";

const SHARINGS: &[(&str, &str)] = &[
    ("immediate x2", "layer_sharing = { repeats = 2 }\n"),
    ("cycle x3", "layer_sharing = { scheme = \"cycle\", repeats = 3 }\n"),
    ("tied FFN", "layer_sharing = { mlp = true }\n"),
    ("tied o_proj, immediate x2", "layer_sharing = { repeats = 2, o_proj = true }\n"),
    ("everything, cycle x2", "layer_sharing = { scheme = \"cycle\", repeats = 2, mlp = true, o_proj = true }\n"),
];

/// Seeding and building under one lock: tests run on parallel threads sharing libtorch's generator.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn config(extra: &str) -> ModelConfig {
    ModelConfig::from_toml_str(&format!("{BASE}{extra}"), std::path::Path::new("sharing.toml")).expect("valid config")
}

fn model(extra: &str) -> DecoderModel {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(5);
    DecoderModel::new(config(extra), Device::Cpu).expect("model")
}

fn ids(b: i64, s: i64) -> Tensor {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(9);
    Tensor::randint(41, [b, s], (Kind::Int64, Device::Cpu))
}

/// The weight a shared model uses for the unrolled model's `name` (`model.layers.{i}.…` of
/// applied layer `i`).
fn source_name(shared: &DecoderModel, name: &str) -> String {
    let Some(rest) = name.strip_prefix("model.layers.") else { return name.to_string() };
    let (i, tail) = rest.split_once('.').expect("a layer tensor");
    let s = shared.config.layer_sharing.as_ref().expect("sharing");
    let block = shared.schedule()[i.parse::<usize>().expect("layer index")];
    let tied = (s.mlp && tail.starts_with("mlp.")) || (s.o_proj && tail.starts_with("self_attn.o_proj."));
    format!("model.layers.{}.{tail}", if tied { 0 } else { block })
}

/// A model without sharing holding a copy of the shared model's weights for every applied layer.
fn unrolled(shared: &DecoderModel) -> DecoderModel {
    let cfg = ModelConfig { num_hidden_layers: shared.depth() as i64, layer_sharing: None, ..shared.config.clone() };
    let m = DecoderModel::new(cfg, Device::Cpu).expect("unrolled");
    let src = shared.var_store().variables();
    let _g = tch::no_grad_guard();
    for (name, mut v) in m.var_store().variables() {
        v.copy_(&src[&source_name(shared, &name)]);
    }
    m
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn weights_are_stored_once() {
    let plain = model("").num_parameters();
    for (name, extra) in SHARINGS {
        let m = model(extra);
        let vars = m.var_store().variables();
        assert!(vars.keys().all(|k| !k.starts_with("model.layers.2.")), "{name}: only two blocks are stored");
        let s = m.config.layer_sharing.as_ref().unwrap();
        assert_eq!(vars.contains_key("model.layers.1.mlp.up_proj.weight"), !s.mlp, "{name}");
        assert_eq!(vars.contains_key("model.layers.1.self_attn.o_proj.weight"), !s.o_proj, "{name}");
        let mlp: i64 = ["gate_proj", "up_proj", "down_proj"].iter().map(|p| vars[&format!("model.layers.0.mlp.{p}.weight")].numel() as i64).sum();
        let o = vars["model.layers.0.self_attn.o_proj.weight"].numel() as i64;
        let saved = if s.mlp { mlp } else { 0 } + if s.o_proj { o } else { 0 };
        assert_eq!(m.num_parameters(), plain - saved, "{name}: parameters counted once");
        assert_eq!(m.depth() as i64, 2 * s.repeats, "{name}");
    }
}

#[test]
fn shared_models_equal_their_unrolled_copies_in_logits_gradients_and_flops() {
    let x = ids(2, 12);
    for (name, extra) in SHARINGS {
        let shared = model(extra);
        let full = unrolled(&shared);
        let (a, b) = (shared.forward(&x), full.forward(&x));
        let diff = max_diff(&a, &b);
        assert!(diff < 1e-5, "{name}: logits differ by {diff}");
        assert!((shared.flops_per_token(12) - full.flops_per_token(12)).abs() < 1.0, "{name}: FLOPs of the applied layers");
        // The gradient of a stored weight is the sum of its copies' gradients.
        let loss = |m: &DecoderModel| m.forward(&x).log_softmax(-1, Kind::Float).select(-1, 3).mean(Kind::Float);
        loss(&shared).backward();
        loss(&full).backward();
        let sv = shared.var_store().variables();
        let mut sums: std::collections::HashMap<String, Tensor> = Default::default();
        for (n, v) in full.var_store().variables() {
            let g = v.grad();
            let src = source_name(&shared, &n);
            let sum = match sums.remove(&src) {
                Some(t) => t + g,
                None => g,
            };
            sums.insert(src, sum);
        }
        assert_eq!(sums.len(), sv.len(), "{name}: every stored weight is used");
        for (n, v) in &sv {
            let diff = max_diff(&v.grad(), &sums[n]);
            assert!(diff < 1e-5, "{name}: gradient of {n} differs from the sum over its applications by {diff}");
        }
    }
}

#[test]
fn cached_decoding_equals_the_full_forward_with_a_slot_per_applied_layer() {
    let _g = tch::no_grad_guard();
    let x = ids(1, 10);
    for (name, extra) in SHARINGS {
        let m = model(extra);
        let full = m.forward(&x);
        let mut cache = m.new_cache(1, 10);
        assert_eq!(cache.num_layers(), m.depth(), "{name}: one cache slot per applied layer");
        let prompt = x.narrow(1, 0, 6);
        let positions = Tensor::arange(6, (Kind::Int64, Device::Cpu)).view([1, 6]);
        let mut pieces = vec![m.forward_ext(&prompt, &positions, &AttentionMask::Causal, Some(&mut cache))];
        for t in 6..10 {
            let mask = AttentionMask::causal(1, t, None, Device::Cpu);
            let step = m.forward_ext(&x.narrow(1, t, 1), &Tensor::from_slice(&[t]).view([1, 1]), &mask, Some(&mut cache));
            pieces.push(step);
        }
        let diff = max_diff(&Tensor::cat(&pieces, 1), &full);
        assert!(diff < 1e-5, "{name}: cached decoding differs from the full forward by {diff}");
    }
}

#[test]
fn the_recursion_depth_changes_at_run_time() {
    let x = ids(1, 8);
    let mut m = model("layer_sharing = { scheme = \"cycle\", repeats = 1 }\n");
    let once = m.forward(&x);
    m.set_repeats(3).expect("a sharing model repeats");
    assert_eq!(m.schedule(), &[0, 1, 0, 1, 0, 1]);
    assert_eq!(m.new_cache(1, 8).num_layers(), 6);
    let thrice = m.forward(&x);
    assert!(max_diff(&once, &thrice) > 1e-3, "three passes through the stack change the logits");
    let diff = max_diff(&thrice, &unrolled(&m).forward(&x));
    assert!(diff < 1e-5, "depth 6 equals the unrolled 6-layer model: {diff}");
    assert!(m.set_repeats(0).unwrap_err().to_string().contains("at least 1"));
    let e = model("").set_repeats(2).unwrap_err().to_string();
    assert!(e.contains("layer_sharing"), "{e}");
}

#[test]
fn transformers_families_refuse_shared_layers_and_stlm_saves_them() {
    let e = ModelConfig::from_toml_str(&format!("{}layer_sharing = {{ repeats = 2 }}\n", BASE.replace("stlm", "llama")), std::path::Path::new("s.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("model_type") && e.contains("shared layers") && e.contains("stlm"), "{e}");
    let e = ModelConfig::from_toml_str(&format!("{BASE}layer_sharing = {{ repeats = 0 }}\n"), std::path::Path::new("s.toml")).unwrap_err().to_string();
    assert!(e.contains("layer_sharing") && e.contains("repeats"), "{e}");
    let e = ModelConfig::from_toml_str(
        &format!("{BASE}layer_sharing = {{ mlp = true }}\nmoe = {{ num_experts = 4, router = {{ kind = \"top-k\", k = 2 }} }}\n"),
        std::path::Path::new("s.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("layer_sharing.mlp") && e.contains("moe"), "{e}");

    let m = model("layer_sharing = { scheme = \"cycle\", repeats = 2, mlp = true }\n");
    let dir = tempfile::tempdir().expect("temp dir");
    m.save(dir.path(), None).expect("save");
    let back = stlm_model::load_model(dir.path(), Device::Cpu, stlm_core::DType::Float32).expect("load");
    assert_eq!(back.config, m.config);
    let x = ids(1, 8);
    assert!(max_diff(&back.forward(&x), &m.forward(&x)) == 0.0, "the saved model computes the same logits");
}

#[test]
fn squared_relu_is_relu_squared() {
    let x = Tensor::from_slice(&[-2.0f32, -0.5, 0.0, 0.5, 3.0]);
    let y = stlm_model::Activation::Relu2.forward(&x);
    assert_eq!(Vec::<f32>::try_from(&y).unwrap(), vec![0.0, 0.0, 0.0, 0.25, 9.0]);
    let c = config("hidden_act = \"swish\"\n");
    assert_eq!(c.hidden_act, stlm_model::Activation::Silu, "swish is SiLU");
}

/// Per-repeat LoRA deltas: every applied layer adds its own `B A` to the projections of its
/// block; B starts at zero (the model equals the one without deltas), and with deltas the model
/// equals the unrolled model whose layer `i` holds `W + B_i A_i`, in logits, cached decoding and
/// gradients (which reach the deltas and the shared weights).
#[test]
fn per_repeat_lora_deltas_equal_the_unrolled_model_with_merged_weights() {
    let x = ids(2, 10);
    let lora = model("layer_sharing = { scheme = \"cycle\", repeats = 2, lora_rank = 3 }\n");
    let plain = model("layer_sharing = { scheme = \"cycle\", repeats = 2 }\n");
    let targets = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];
    let vars = lora.var_store().variables();
    let extra: i64 = (0..4)
        .flat_map(|i| targets.iter().map(move |t| (i, t)))
        .map(|(i, t)| {
            let (a, b) = (&vars[&format!("model.lora.{i}.{t}.lora_A.weight")], &vars[&format!("model.lora.{i}.{t}.lora_B.weight")]);
            assert_eq!((a.size()[0], b.size()[1]), (3, 3), "{t}: rank 3");
            (a.numel() + b.numel()) as i64
        })
        .sum();
    assert_eq!(lora.num_parameters(), plain.num_parameters() + extra, "the shared weights once, a delta per applied layer");
    {
        let _g = tch::no_grad_guard();
        for (n, mut v) in plain.var_store().variables() {
            v.copy_(&vars[&n]);
        }
        let diff = max_diff(&lora.forward(&x), &plain.forward(&x));
        assert!(diff == 0.0, "B = 0 at the start: the model without deltas ({diff})");
        // Random deltas, then the unrolled model with every applied layer's merged weights.
        for (n, mut v) in lora.var_store().variables() {
            if n.contains(".lora_B.") {
                v.copy_(&(Tensor::randn(v.size(), (Kind::Float, Device::Cpu)) * 0.3));
            }
        }
    }
    let full = unrolled(&plain);
    {
        let _g = tch::no_grad_guard();
        let fv = full.var_store().variables();
        for i in 0..4 {
            for t in targets {
                let (a, b) = (&vars[&format!("model.lora.{i}.{t}.lora_A.weight")], &vars[&format!("model.lora.{i}.{t}.lora_B.weight")]);
                let mut w = fv[&format!("model.layers.{i}.{t}.weight")].shallow_clone();
                let merged = &w + b.matmul(a);
                w.copy_(&merged);
            }
        }
    }
    let (a, b) = (lora.forward(&x), full.forward(&x));
    assert!(max_diff(&a, &b) < 1e-5, "logits differ from the merged unrolled model by {}", max_diff(&a, &b));
    {
        let _g = tch::no_grad_guard();
        let row = x.narrow(0, 0, 1);
        let mut cache = lora.new_cache(1, 10);
        let positions = Tensor::arange(6, (Kind::Int64, Device::Cpu)).view([1, 6]);
        let mut pieces = vec![lora.forward_ext(&row.narrow(1, 0, 6), &positions, &AttentionMask::Causal, Some(&mut cache))];
        for t in 6..10 {
            let mask = AttentionMask::causal(1, t, None, Device::Cpu);
            pieces.push(lora.forward_ext(&row.narrow(1, t, 1), &Tensor::from_slice(&[t]).view([1, 1]), &mask, Some(&mut cache)));
        }
        let diff = max_diff(&Tensor::cat(&pieces, 1), &lora.forward(&row));
        assert!(diff < 1e-5, "cached decoding differs from the full forward by {diff}");
    }
    lora.forward(&x).log_softmax(-1, Kind::Float).select(-1, 3).mean(Kind::Float).backward();
    for (n, v) in lora.var_store().variables() {
        assert!(v.grad().defined() && v.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0, "no gradient reaches {n}");
    }

    let mut fixed = model("layer_sharing = { scheme = \"cycle\", repeats = 2, lora_rank = 3 }\n");
    let e = fixed.set_repeats(3).unwrap_err().to_string();
    assert!(e.contains("lora_rank") && e.contains("fixed"), "{e}");
    let e = ModelConfig::from_toml_str(
        &format!("{BASE}layer_sharing = {{ repeats = 2, lora_rank = 2 }}\nmoe = {{ num_experts = 4, router = {{ kind = \"top-k\", k = 2 }} }}\n"),
        std::path::Path::new("s.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("lora_rank") && e.contains("moe"), "{e}");
    let dir = tempfile::tempdir().expect("temp dir");
    lora.save(dir.path(), None).expect("save");
    let back = stlm_model::load_model(dir.path(), Device::Cpu, stlm_core::DType::Float32).expect("load");
    assert!(max_diff(&back.forward(&x), &lora.forward(&x)) == 0.0, "the deltas are saved and loaded");
}
