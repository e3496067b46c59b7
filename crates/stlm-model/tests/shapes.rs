//! Per-layer shapes (`layer_shapes`: widths, heads, feed-forward widths, the diamond and context
//! patterns) and the learned residual root: every layer equals a uniform model of its own shape
//! fed the projected stream, cached decoding equals the full forward, the weights train, and
//! what transformers cannot hold is refused there and saved as stlm.

use stlm_attention::{AttentionKind, AttentionMask};
use stlm_model::{DecoderModel, ModelConfig};
use tch::{Device, Kind, Tensor};

const BASE: &str = "model_type = \"stlm\"\nvocab_size = 41\nhidden_size = 32\nintermediate_size = 48\nnum_hidden_layers = 4\nnum_attention_heads = 4\nnum_key_value_heads = 2\nmax_position_embeddings = 32\ninitializer_range = 0.2\n";

const SHAPES: &[(&str, &str)] = &[
    ("diamond", "[layer_shapes]\ndiamond = { max_hidden_size = 64 }\n"),
    (
        "explicit lists",
        "[layer_shapes]\nhidden_size = [32, 48, 16, 24]\nintermediate_size = [40, 96, 24, 8]\nnum_attention_heads = [4, 6, 2, 4]\nnum_key_value_heads = [1, 3, 2, 4]\n",
    ),
    ("context pattern", "[layer_shapes]\ncontext = { min_window = 3, max_window = 12 }\n"),
    ("diamond and context", "[layer_shapes]\ndiamond = { max_hidden_size = 48 }\ncontext = { min_window = 2, max_window = 40 }\n"),
    ("residual root", "[residual_root]\n"),
    ("gated root of its own width", "[residual_root]\nwidth = 24\nmix = \"gate\"\n"),
    ("root and a pattern of widths", "[residual_root]\nwidth = 40\n[layer_shapes]\nhidden_size = [48, 16]\n"),
];

/// Seeding and building under one lock: tests run on parallel threads sharing libtorch's generator.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn config(extra: &str) -> ModelConfig {
    ModelConfig::from_toml_str(&format!("{BASE}{extra}"), std::path::Path::new("shapes.toml")).expect("valid config")
}

fn model(extra: &str) -> DecoderModel {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(5);
    let m = DecoderModel::new(config(extra), Device::Cpu).expect("model");
    // Non-zero gates, so that both sides of the gated mix matter.
    if let Some(g) = m.residual_root.as_ref().and_then(|r| r.gate.as_ref()) {
        tch::no_grad(|| g.shallow_clone().copy_(&Tensor::randn([g.size()[0]], (Kind::Float, Device::Cpu))));
    }
    m
}

fn ids(b: i64, s: i64) -> Tensor {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(9);
    Tensor::randint(41, [b, s], (Kind::Int64, Device::Cpu))
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn layers_take_the_shapes_the_config_gives() {
    let m = model(SHAPES[0].1);
    let widths: Vec<i64> = m.layers.iter().map(|l| l.input_layernorm.weight.size()[0]).collect();
    assert_eq!(widths, vec![32, 64, 64, 32], "diamond: base at the ends, maximum in the middle");
    let projected: Vec<bool> = m.layers.iter().map(|l| l.in_proj.is_some()).collect();
    assert_eq!(projected, vec![false, true, false, true], "a projection where the width changes");
    assert!(m.out_proj.is_none(), "the diamond ends at the embedding's width");
    let v = m.var_store().variables();
    assert_eq!(v["model.layers.1.in_proj.weight"].size(), vec![64, 32]);
    assert_eq!(v["model.layers.1.mlp.up_proj.weight"].size(), vec![96, 64], "feed-forward width scales with the stream");
    assert_eq!(v["model.layers.1.self_attn.q_proj.weight"].size(), vec![64, 64], "8 heads of 8");
    assert_eq!(v["model.layers.1.self_attn.k_proj.weight"].size(), vec![32, 64], "the model's 2:1 query to key/value ratio");

    let m = model(SHAPES[1].1);
    let v = m.var_store().variables();
    assert_eq!(v["model.layers.1.self_attn.q_proj.weight"].size(), vec![48, 48]);
    assert_eq!(v["model.layers.1.self_attn.k_proj.weight"].size(), vec![24, 48]);
    assert_eq!(v["model.layers.3.mlp.down_proj.weight"].size(), vec![24, 8]);
    assert_eq!(v["model.out_proj.weight"].size(), vec![32, 24], "back to the head's width");
    let cache = m.new_cache(1, 8);
    assert_eq!(cache.num_layers(), 4);

    let c = config(SHAPES[2].1);
    let windows: Vec<AttentionKind> = (0..4).map(|i| c.layer_attention(i)).collect();
    let sw = |window| AttentionKind::SlidingWindow { window, global_tokens: 0 };
    assert_eq!(windows, vec![sw(3), sw(12), sw(12), sw(3)], "short windows early and late, long in the middle");
    let c = config(SHAPES[3].1);
    assert_eq!(c.layer_attention(1), AttentionKind::Dense, "a window past the context is dense");

    let m = model(SHAPES[6].1);
    let v = m.var_store().variables();
    assert_eq!(v["model.residual_root.weight"].size(), vec![40]);
    assert_eq!(v["model.residual_root.embed_proj.weight"].size(), vec![40, 32]);
    assert_eq!(v["model.layers.0.in_proj.weight"].size(), vec![48, 40]);
    assert_eq!(v["model.layers.2.in_proj.weight"].size(), vec![48, 16], "the pattern repeats");
    assert_eq!(v["model.out_proj.weight"].size(), vec![32, 16]);
}

/// A one-layer uniform model holding layer `i` of `m` (its own shape and attention).
fn single_layer(m: &DecoderModel, i: usize) -> DecoderModel {
    let layer_cfg = m.config.layer_config(i).into_owned();
    let cfg = ModelConfig { num_hidden_layers: 1, residual_root: None, ..layer_cfg };
    let one = DecoderModel::new(cfg, Device::Cpu).expect("a uniform model of the layer's shape");
    let src = m.var_store().variables();
    let _g = tch::no_grad_guard();
    for (name, mut v) in one.var_store().variables() {
        if let Some(tail) = name.strip_prefix("model.layers.0.") {
            v.copy_(&src[&format!("model.layers.{i}.{tail}")]);
        }
    }
    one
}

#[test]
fn every_layer_equals_a_uniform_model_of_its_shape_on_the_projected_stream() {
    let _g = tch::no_grad_guard();
    let x = ids(2, 12);
    for (name, extra) in SHAPES {
        let m = model(extra);
        let e = Tensor::embedding(&m.embed_tokens, &x, -1, false, false);
        let mut h = match &m.residual_root {
            None => e,
            Some(root) => {
                let e = root.embed_proj.as_ref().map_or(e.shallow_clone(), |p| e.matmul(&p.weight.value().tr()));
                match &root.gate {
                    Some(g) => (1.0 - g.sigmoid()) * &root.weight + g.sigmoid() * e,
                    None => e + &root.weight,
                }
            }
        };
        for i in 0..4 {
            if let Some(p) = &m.layers[i].in_proj {
                h = h.matmul(&p.weight.value().tr());
            }
            let one = single_layer(&m, i);
            h = one.run_block(0, &one.block_pass(&x), &h);
        }
        if let Some(p) = &m.out_proj {
            h = h.matmul(&p.weight.value().tr());
        }
        let reference = m.head(&m.norm.forward(&h));
        let diff = max_diff(&m.forward(&x), &reference);
        assert!(diff < 1e-5, "{name}: logits differ from the layer-by-layer reference by {diff}");
    }
}

#[test]
fn cached_decoding_equals_the_full_forward() {
    let _g = tch::no_grad_guard();
    let x = ids(1, 20);
    for (name, extra) in SHAPES {
        let m = model(extra);
        let full = m.forward(&x);
        let mut cache = m.new_cache(1, 20);
        let prompt = x.narrow(1, 0, 7);
        let positions = Tensor::arange(7, (Kind::Int64, Device::Cpu)).view([1, 7]);
        let mut pieces = vec![m.forward_ext(&prompt, &positions, &AttentionMask::Causal, Some(&mut cache))];
        for t in 7..20 {
            let mask = AttentionMask::causal(1, t, None, Device::Cpu);
            pieces.push(m.forward_ext(&x.narrow(1, t, 1), &Tensor::from_slice(&[t]).view([1, 1]), &mask, Some(&mut cache)));
        }
        let diff = max_diff(&Tensor::cat(&pieces, 1), &full);
        assert!(diff < 1e-5, "{name}: cached decoding differs from the full forward by {diff}");
    }
}

#[test]
fn projections_and_roots_train() {
    let x = ids(2, 12);
    for (name, extra) in SHAPES {
        let m = model(extra);
        let loss = m.forward(&x).log_softmax(-1, Kind::Float).select(-1, 3).mean(Kind::Float);
        loss.backward();
        for (n, v) in m.var_store().variables() {
            let reached = v.grad().defined() && v.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0;
            assert!(reached, "{name}: no gradient reaches {n}");
        }
    }
    // FLOPs: the weights' products, and attention over each layer's own width (no tied head here).
    let m = model(SHAPES[0].1);
    let vars = m.var_store().variables();
    let matmul: i64 = vars.iter().filter(|(n, t)| t.dim() == 2 && !n.contains("embed")).map(|(_, t)| t.numel() as i64).sum();
    let matmul = matmul as f64;
    let expected = stlm_core::flops::training_flops_per_token(matmul, 1, 32 + 64 + 64 + 32, 16);
    assert!((m.flops_per_token(16) - expected).abs() < 1.0, "{} vs {expected}", m.flops_per_token(16));
}

#[test]
fn save_load_and_refusals() {
    let dir = std::env::temp_dir().join(format!("stlm-shapes-{}", std::process::id()));
    let m = model(SHAPES[6].1);
    m.save(&dir, None).expect("save");
    let back = stlm_model::load_model(&dir, Device::Cpu, stlm_core::DType::Float32).expect("load");
    let x = ids(1, 9);
    assert!(max_diff(&m.forward(&x), &back.forward(&x)) == 0.0, "the same model after a round trip");
    std::fs::remove_dir_all(&dir).ok();

    let refused = |text: String, words: &[&str]| {
        let e = ModelConfig::from_toml_str(&text, std::path::Path::new("s.toml")).unwrap_err().to_string();
        assert!(words.iter().all(|w| e.contains(w)), "{e}");
    };
    refused(format!("{}[layer_shapes]\ndiamond = {{ max_hidden_size = 64 }}\n", BASE.replace("stlm", "llama")), &["model_type", "layer_shapes"]);
    refused(format!("{}[residual_root]\n", BASE.replace("stlm", "llama")), &["model_type", "residual_root"]);
    refused(format!("{BASE}[layer_shapes]\nhidden_size = [32, 20]\n"), &["layer_shapes.hidden_size", "layer 1", "heads"]);
    refused(format!("{BASE}[layer_shapes]\nnum_key_value_heads = [3]\n"), &["num_key_value_heads", "divide"]);
    refused(format!("{BASE}[layer_shapes]\nhidden_size = [32, 48, 64]\n"), &["hidden_size", "3 entries"]);
    refused(format!("{BASE}attention = [{{ kind = \"dense\" }}]\n[layer_shapes]\ncontext = {{ min_window = 4, max_window = 8 }}\n"), &["context", "attention"]);
    refused(format!("{BASE}layer_sharing = {{ repeats = 2 }}\n[residual_root]\n"), &["layer_sharing"]);
    refused(format!("{BASE}[residual_root]\nwidth = 0\n"), &["residual_root.width"]);
}
