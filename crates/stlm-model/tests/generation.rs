//! Generation invariants: the cached path agrees with full forwards, batching with left padding
//! agrees with one-by-one generation, and sampling options behave.

use stlm_core::OptionError;
use stlm_model::generate::{filtered_probs, Sampler};
use stlm_model::{generate, DecoderModel, GenerationConfig, ModelConfig, ModelError};
use tch::{Device, Kind, Tensor};

fn tiny(preset: &str) -> DecoderModel {
    let text = format!(
        "preset = \"{preset}\"\nvocab_size = 61\nhidden_size = 32\nintermediate_size = 48\nnum_hidden_layers = 2\nnum_attention_heads = 4\nnum_key_value_heads = {}\nmax_position_embeddings = 64\n",
        if preset == "llama" { 2 } else { 4 }
    );
    tch::manual_seed(7);
    let cfg = ModelConfig::from_toml_str(&text, std::path::Path::new("tiny.toml")).unwrap();
    let model = DecoderModel::new(cfg, Device::Cpu).unwrap();
    // Larger weights than the 0.02 init so that greedy choices are not near-ties.
    let _g = tch::no_grad_guard();
    for (_, mut v) in model.var_store().variables() {
        if v.dim() == 2 {
            let noise = v.randn_like() * 0.3;
            v.copy_(&noise);
        }
    }
    model
}

fn greedy_by_full_forward(model: &DecoderModel, prompt: &[i64], n: usize) -> Vec<i64> {
    let _g = tch::no_grad_guard();
    let mut ids = prompt.to_vec();
    for _ in 0..n {
        let logits = model.forward(&Tensor::from_slice(&ids).unsqueeze(0));
        ids.push(logits.select(1, -1).argmax(-1, false).int64_value(&[0]));
    }
    ids[prompt.len()..].to_vec()
}

#[test]
fn cached_greedy_equals_argmax_of_full_forwards() {
    for preset in ["llama", "gpt2"] {
        let model = tiny(preset);
        let prompt = [3, 14, 15, 9, 26];
        let cfg = GenerationConfig { max_new_tokens: 12, ..Default::default() };
        let mut streamed = Vec::new();
        let got = generate(&model, &[prompt.to_vec()], &cfg, |_, id| streamed.push(id)).unwrap();
        let want = greedy_by_full_forward(&model, &prompt, 12);
        assert_eq!(got[0], want, "{preset}");
        assert_eq!(streamed, want, "{preset}: streamed tokens");
        // The fused, column-major decoding layout gives the same tokens.
        let mut fast = model;
        fast.optimize_for_decoding();
        let fused = generate(&fast, &[prompt.to_vec()], &cfg, |_, _| {}).unwrap();
        assert_eq!(fused[0], want, "{preset}: optimized for decoding");
    }
}

#[test]
fn left_padded_batch_equals_one_by_one() {
    for preset in ["llama", "gpt2"] {
        let model = tiny(preset);
        let prompts = vec![vec![1, 2, 3, 4, 5, 6, 7], vec![9, 8], vec![30, 31, 32, 33]];
        let cfg = GenerationConfig { max_new_tokens: 8, ..Default::default() };
        let batch = generate(&model, &prompts, &cfg, |_, _| {}).unwrap();
        for (p, b) in prompts.iter().zip(&batch) {
            let single = generate(&model, std::slice::from_ref(p), &cfg, |_, _| {}).unwrap();
            assert_eq!(&single[0], b, "{preset}: prompt {p:?}");
        }
    }
}

#[test]
fn stops_at_eos_and_sampling_is_seeded() {
    let model = tiny("llama");
    let prompt = vec![vec![5, 6, 7]];
    let greedy =
        generate(&model, &prompt, &GenerationConfig { max_new_tokens: 10, ..Default::default() }, |_, _| {}).unwrap();
    let eos = greedy[0][3];
    let first = greedy[0].iter().position(|&t| t == eos).unwrap();
    let cfg = GenerationConfig { max_new_tokens: 10, eos_token_ids: vec![eos], ..Default::default() };
    let stopped = generate(&model, &prompt, &cfg, |_, _| {}).unwrap();
    assert_eq!(stopped[0], greedy[0][..=first].to_vec());

    let sampled = |seed| {
        let cfg = GenerationConfig {
            max_new_tokens: 16,
            temperature: 1.5,
            top_k: 20,
            top_p: 0.9,
            repetition_penalty: 1.3,
            seed,
            ..Default::default()
        };
        generate(&model, &prompt, &cfg, |_, _| {}).unwrap()
    };
    assert_eq!(sampled(1), sampled(1));
    assert_ne!(sampled(1), sampled(2));
}

#[test]
fn top_k_one_is_greedy_and_top_p_keeps_the_head() {
    tch::manual_seed(0);
    let logits = Tensor::randn([4, 50], (Kind::Float, Device::Cpu));
    let argmax = logits.argmax(-1, false);
    let argmax: Vec<i64> = Vec::try_from(argmax).unwrap();
    let mut sampler = Sampler::new(3);
    let k1 = GenerationConfig { temperature: 1.0, top_k: 1, ..Default::default() };
    assert_eq!(sampler.sample(&logits, &k1).unwrap(), argmax);
    let p_small = GenerationConfig { temperature: 1.0, top_p: 1e-6, ..Default::default() };
    assert_eq!(sampler.sample(&logits, &p_small).unwrap(), argmax);
    // top-p keeps exactly the smallest head of the distribution reaching p.
    let probs = filtered_probs(
        &Tensor::from_slice(&[0.5f32, 0.3, 0.2].map(f32::ln)).view([1, 3]),
        &GenerationConfig { temperature: 1.0, top_p: 0.75, ..Default::default() },
    );
    let probs: Vec<f32> = Vec::try_from(probs.view([-1])).unwrap();
    assert!((probs[0] - 0.625).abs() < 1e-5 && (probs[1] - 0.375).abs() < 1e-5 && probs[2] == 0.0, "{probs:?}");
}

#[test]
fn bad_generation_input_is_an_error() {
    let model = tiny("gpt2");
    let cfg = GenerationConfig::default();
    let e = generate(&model, &[vec![]], &cfg, |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("empty prompt"), "{e}");
    let e = generate(&model, &[vec![1, 61]], &cfg, |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("61") && e.contains("vocabulary"), "{e}");
    let long = GenerationConfig { max_new_tokens: 100, ..Default::default() };
    let e = generate(&model, &[vec![1]], &long, |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("learned positions"), "{e}");
    assert!(matches!(
        generate(&model, &[vec![1]], &long, |_, _| {}),
        Err(ModelError::Option(OptionError { name: "max_new_tokens", .. }))
    ));
    let bad = GenerationConfig { top_p: 0.0, ..Default::default() };
    let e = generate(&model, &[vec![1]], &bad, |_, _| {}).unwrap_err();
    assert!(matches!(&e, ModelError::Option(OptionError { name: "top_p", .. })), "{e}");
    assert_eq!(e.to_string(), "`top_p` 0: must be in (0, 1]");
}

/// `vocab_limit` (a head wider than its tokenizer): no id at or above the limit is chosen,
/// greedy or sampled, batched or one sequence (the fused decoder), and a limit below 1 is refused.
#[test]
fn vocab_limit_keeps_choices_below_the_tokenizers_size() {
    let model = tiny("llama");
    for (prompts, temperature) in [(vec![vec![3, 4]], 0.0), (vec![vec![3, 4]], 3.0), (vec![vec![3], vec![5, 6, 7]], 3.0)] {
        let cfg = GenerationConfig { max_new_tokens: 40, temperature, vocab_limit: Some(7), seed: 1, ..Default::default() };
        let outs = generate(&model, &prompts, &cfg, |_, _| {}).unwrap();
        assert!(outs.iter().flatten().all(|&id| id < 7), "{outs:?}");
        let free = GenerationConfig { vocab_limit: None, ..cfg.clone() };
        let outs = generate(&model, &prompts, &free, |_, _| {}).unwrap();
        assert!(outs.iter().flatten().any(|&id| id >= 7), "without the limit the model picks wider ids: {outs:?}");
    }
    let bad = GenerationConfig { vocab_limit: Some(0), ..Default::default() };
    let e = generate(&model, &[vec![1]], &bad, |_, _| {}).unwrap_err();
    assert!(matches!(&e, ModelError::Option(OptionError { name: "vocab_limit", .. })), "{e}");
}
