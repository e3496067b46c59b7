//! Dynamic depth: self-speculative greedy decoding equals full-depth greedy decoding token for
//! token; an early exit that never fires is full-depth decoding and one that always fires at
//! layer m is the m-layer model's decoding; the fused CPU step exits like the libtorch one;
//! LayerSkip's training step is the plain step without dropout and exits, and adds exactly its
//! depth-weighted exit losses.

use stlm_model::{
    generate, generate_early_exit, generate_self_speculative, Batch, DecoderModel, Depth, EarlyExit, ExitMeasure, FastDecoder, GenerationConfig,
    LanguageModel, LayerSkip, LayerSkipModel, ModelConfig, Mode,
};
use tch::{Device, Kind, Tensor};

const LLAMA: &str = "vocab_size = 53\nhidden_size = 32\nintermediate_size = 48\nnum_hidden_layers = 4\nnum_attention_heads = 4\nnum_key_value_heads = 2\nmax_position_embeddings = 128\ninitializer_range = 0.25\n";

/// Models for the fused step (llama, GPT-2, shared layers) and for libtorch's (exact GELU, q/k
/// norms), so that both decoding paths are covered.
const MODELS: &[(&str, &str)] = &[
    ("llama", LLAMA),
    ("gpt2", "preset = \"gpt2\"\nvocab_size = 53\nhidden_size = 32\nintermediate_size = 48\nnum_hidden_layers = 4\nnum_attention_heads = 2\nmax_position_embeddings = 128\ninitializer_range = 0.25\n"),
    ("cycled blocks", "model_type = \"stlm\"\nvocab_size = 53\nhidden_size = 32\nintermediate_size = 48\nnum_hidden_layers = 2\nnum_attention_heads = 4\nmax_position_embeddings = 128\ninitializer_range = 0.25\nlayer_sharing = { scheme = \"cycle\", repeats = 2 }\n"),
    ("exact gelu, q/k norms (libtorch path)", "model_type = \"stlm\"\nvocab_size = 53\nhidden_size = 32\nintermediate_size = 48\nnum_hidden_layers = 4\nnum_attention_heads = 4\nmax_position_embeddings = 128\ninitializer_range = 0.25\nhidden_act = \"gelu\"\nmlp = \"plain\"\nqk_norm = true\n"),
];

/// Seeding and building under one lock: tests run on parallel threads sharing libtorch's generator.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn model(text: &str, seed: i64) -> DecoderModel {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed);
    let cfg = ModelConfig::from_toml_str(text, std::path::Path::new("dynamic.toml")).expect("valid config");
    let mut m = DecoderModel::new(cfg, Device::Cpu).expect("model");
    m.optimize_for_decoding();
    m
}

fn greedy(n: i64) -> GenerationConfig {
    GenerationConfig { max_new_tokens: n, ..Default::default() }
}

fn full_greedy(m: &DecoderModel, prompt: &[i64], n: i64) -> Vec<i64> {
    generate(m, &[prompt.to_vec()], &greedy(n), |_, _| {}).expect("generate").remove(0)
}

#[test]
fn self_speculative_greedy_equals_full_depth_greedy() {
    let prompt = [3, 17, 5, 40, 22];
    for (name, text) in MODELS {
        for seed in [1, 2] {
            let m = model(text, seed);
            let reference = full_greedy(&m, &prompt, 40);
            for (draft_layers, draft_tokens) in [(1, 1), (1, 4), (2, 3), (3, 6)] {
                let mut streamed = Vec::new();
                let (out, report) = generate_self_speculative(&m, &prompt, &greedy(40), draft_layers, draft_tokens, |t| streamed.push(t)).expect("speculative");
                assert_eq!(out, reference, "{name} seed {seed}, draft {draft_layers} layers x {draft_tokens}: token for token");
                assert_eq!(streamed, out, "{name}: every token streamed once, in order");
                assert_eq!(report.tokens, 40);
                assert!(report.accepted <= report.drafted && report.verifications > 0, "{name}: {report:?}");
            }
        }
    }
    // Stops at EOS like full decoding.
    let m = model(LLAMA, 1);
    let reference = full_greedy(&m, &prompt, 40);
    let eos = reference[7];
    let cfg = GenerationConfig { eos_token_ids: vec![eos], ..greedy(40) };
    let first = reference.iter().position(|&t| t == eos).unwrap();
    let (out, _) = generate_self_speculative(&m, &prompt, &cfg, 2, 4, |_| {}).unwrap();
    assert_eq!(out, reference[..=first].to_vec());
}

#[test]
fn self_speculative_refusals_name_the_option() {
    let m = model(LLAMA, 1);
    let err = |r: stlm_model::Result<(Vec<i64>, stlm_model::DepthReport)>| r.unwrap_err().to_string();
    assert!(err(generate_self_speculative(&m, &[1], &greedy(4), 4, 2, |_| {})).contains("self_speculative"));
    assert!(err(generate_self_speculative(&m, &[1], &greedy(4), 2, 0, |_| {})).contains("draft_tokens"));
    let sampled = GenerationConfig { temperature: 0.8, ..greedy(4) };
    assert!(err(generate_self_speculative(&m, &[1], &sampled, 2, 2, |_| {})).contains("greedy"));
    let windowed = model(&format!("model_type = \"stlm\"\n{LLAMA}attention = [{{ kind = \"sliding-window\", window = 8 }}]\n"), 1);
    assert!(err(generate_self_speculative(&windowed, &[1], &greedy(4), 2, 2, |_| {})).contains("sliding-window layer"));
    let diamond = model(&format!("model_type = \"stlm\"\n{LLAMA}layer_shapes = {{ diamond = {{ max_hidden_size = 64 }} }}\n"), 1);
    assert!(err(generate_self_speculative(&diamond, &[1], &greedy(4), 2, 2, |_| {})).contains("stream width"));
}

/// The first `layers` applied layers of `m` as a model of their own (same norm and head).
fn truncated(m: &DecoderModel, layers: i64) -> DecoderModel {
    let cfg = ModelConfig { num_hidden_layers: layers, layer_sharing: None, ..m.config.clone() };
    let t = DecoderModel::new(cfg, Device::Cpu).unwrap();
    let src = m.var_store().variables();
    let _g = tch::no_grad_guard();
    for (name, mut v) in t.var_store().variables() {
        let from = match name.strip_prefix("model.layers.") {
            Some(rest) => {
                let (i, tail) = rest.split_once('.').unwrap();
                format!("model.layers.{}.{tail}", m.config.applied_block(i.parse().unwrap()))
            }
            None => name.clone(),
        };
        v.copy_(&src[&from]);
    }
    t
}

#[test]
fn early_exits_that_never_or_always_fire_are_full_or_truncated_decoding() {
    let prompt = [8, 1, 30, 12];
    for (name, text) in MODELS {
        let m = model(text, 3);
        let depth = m.depth() as u64;
        let never = EarlyExit { measure: ExitMeasure::Softmax, threshold: 1.5, min_layers: 1 };
        let (out, report) = generate_early_exit(&m, &prompt, &greedy(30), &never, |_| {}).unwrap();
        assert_eq!(out, full_greedy(&m, &prompt, 30), "{name}: no exit is full depth");
        assert_eq!(report.layers, 30 * depth, "{name}");
        for at in 1..depth as usize {
            let always = EarlyExit { measure: ExitMeasure::Entropy, threshold: 1e9, min_layers: at };
            let (out, report) = generate_early_exit(&m, &prompt, &greedy(30), &always, |_| {}).unwrap();
            let short = truncated(&m, at as i64);
            assert_eq!(out, full_greedy(&short, &prompt, 30), "{name}: exiting at layer {at} is the {at}-layer model");
            assert_eq!(report.layers, 30 * at as u64, "{name}: every token exits at layer {at}");
        }
    }
}

#[test]
fn the_fused_step_exits_like_the_libtorch_step() {
    let _g = tch::no_grad_guard();
    let m = model(LLAMA, 4);
    let rule = EarlyExit { measure: ExitMeasure::Margin, threshold: 0.05, min_layers: 1 };
    let mut fast = FastDecoder::new(&m).expect("a llama model takes the fused step");
    let (mut a, mut b) = (m.new_cache(1, 40), m.new_cache(1, 40));
    let (mut depths, mut token) = (Vec::new(), 5);
    for position in 0..40 {
        let (la, da) = fast.step_depth(token, position, &mut a, Depth::Exit(&rule));
        let (lb, db) = m.step_depth(token, position, &mut b, Depth::Exit(&rule));
        assert_eq!(da, db, "position {position}: the same exit");
        let diff = (&la - &lb).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "position {position}: logits differ by {diff}");
        depths.push(da);
        token = lb.reshape([-1]).argmax(0, false).int64_value(&[]);
    }
    assert!(depths.iter().any(|&d| d < 4) && depths.contains(&4), "the threshold exits some tokens early, not all: {depths:?}");
}

fn batch(seed: i64) -> Batch {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed);
    let ids = Tensor::randint(53, [3, 13], (Kind::Int64, Device::Cpu));
    Batch::new(ids.narrow(1, 0, 12), ids.narrow(1, 1, 12))
}

#[test]
fn layer_skip_steps_add_depth_weighted_exit_losses_and_fixed_dropout() {
    let m = model(LLAMA, 6);
    let b = batch(7);
    let plain = LanguageModel::step(&m, &b, Mode::Train).unwrap();
    let off = LayerSkipModel::new(&m, LayerSkip { max_dropout: 0.0, exit_loss: 0.0 }).unwrap();
    let same = off.step(&b, Mode::Train).unwrap();
    assert_eq!(same.loss.double_value(&[]), plain.loss.double_value(&[]), "nothing on is the plain step");
    assert!(same.aux_losses.is_empty());

    // The exit loss: cross-entropy of each earlier layer's exit, weighted by its depth.
    let skip = LayerSkipModel::new(&m, LayerSkip { max_dropout: 0.0, exit_loss: 0.5 }).unwrap();
    let out = skip.step(&b, Mode::Train).unwrap();
    let states = m.residual_stream(&b.inputs);
    let ce = |x: &Tensor| m.head(&m.final_norm(x)).reshape([36, -1]).cross_entropy_for_logits(&b.targets.reshape([-1])).double_value(&[]);
    let expected = 0.5 * (1.0 * ce(&states[1]) + 2.0 * ce(&states[2]) + 3.0 * ce(&states[3])) / 6.0;
    let (name, exit) = &out.aux_losses[0];
    assert_eq!(name, "early_exit");
    assert!((exit.double_value(&[]) - expected).abs() < 1e-5, "{} vs {expected}", exit.double_value(&[]));
    assert!((out.loss.double_value(&[]) - plain.loss.double_value(&[])).abs() < 1e-6, "the logged loss is the last layer's");
    let eval = skip.step(&b, Mode::Eval).unwrap();
    assert!(eval.aux_losses.is_empty(), "evaluation is the model's own pass");

    // Dropout: the draw is a function of the batch, and some rows skip layers.
    let drop = LayerSkipModel::new(&m, LayerSkip { max_dropout: 0.9, exit_loss: 0.0 }).unwrap();
    let (x, y) = (drop.step(&b, Mode::Train).unwrap(), drop.step(&b, Mode::Train).unwrap());
    assert_eq!(x.loss.double_value(&[]), y.loss.double_value(&[]), "the same batch, the same skipped layers");
    let losses: Vec<f64> = (0..6).map(|s| drop.step(&batch(s), Mode::Train).unwrap().loss.double_value(&[])).collect();
    let plains: Vec<f64> = (0..6).map(|s| LanguageModel::step(&m, &batch(s), Mode::Train).unwrap().loss.double_value(&[])).collect();
    assert!(losses.iter().zip(&plains).any(|(a, b)| a != b), "some layers were skipped: {losses:?} vs {plains:?}");
    x.loss.backward();
    assert!(m.var_store().variables().values().any(|v| v.grad().defined()), "it trains");

    let diamond = model(&format!("model_type = \"stlm\"\n{LLAMA}layer_shapes = {{ diamond = {{ max_hidden_size = 64 }} }}\n"), 1);
    let e = LayerSkipModel::new(&diamond, LayerSkip { max_dropout: 0.1, exit_loss: 0.1 }).err().unwrap().to_string();
    assert!(e.contains("stream width"), "{e}");
}
