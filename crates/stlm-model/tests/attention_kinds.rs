//! Every attention kind inside a model: cached decoding (prefill, single steps, chunks, with
//! rolling caches for sliding windows) gives the logits of the full forward, outputs are causal,
//! batched generation with left padding matches one-by-one generation, and the per-head
//! parameters are trained variables with Hugging Face-style names.

use proptest::prelude::*;
use stlm_attention::{AttentionKind, AttentionMask};
use stlm_model::{generate, DecoderModel, GenerationConfig, ModelConfig};
use tch::{Device, Kind, Tensor};

const KINDS: &[&str] = &[
    "{ kind = \"dense\" }",
    "{ kind = \"sliding-window\", window = 4 }",
    "{ kind = \"sliding-window\", window = 3, global_tokens = 2 }",
    "{ kind = \"fixed-sparse\", block = 4, summary = 1 }",
    "{ kind = \"strided-sparse\", stride = 3 }",
    "{ kind = \"ssmax\" }",
    "{ kind = \"temperature\" }",
    "{ kind = \"power\", p = 2.0 }",
    "{ kind = \"doge-dma\", keep_window_size = 5 }",
];

/// A 2-layer model whose first layer uses `kind` and second is dense (a per-layer pattern).
fn model(kind: &str) -> DecoderModel {
    model_with(kind, "")
}

/// Held while seeding and drawing from libtorch's global generator: tests run on parallel
/// threads, and another test's draws between `manual_seed` and ours would change our tensors
/// (and with them Dynamic Mask Attention's ties, see [`distinct_ids`]) from run to run.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// [`model`] with more config lines (`extra`).
fn model_with(kind: &str, extra: &str) -> DecoderModel {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let text = format!(
        "model_type = \"stlm\"\nvocab_size = 53\nhidden_size = 32\nintermediate_size = 48\nnum_hidden_layers = 2\nnum_attention_heads = 4\nnum_key_value_heads = 2\nmax_position_embeddings = 64\ninitializer_range = 0.3\n{extra}attention = [{kind}, {{ kind = \"dense\" }}]\n"
    );
    tch::manual_seed(11);
    let cfg = ModelConfig::from_toml_str(&text, std::path::Path::new("kinds.toml")).expect("valid config");
    let m = DecoderModel::new(cfg, Device::Cpu).expect("model");
    // Dynamic Mask Attention starts with A = 0, where every key's bias is 1 and the top-k is a
    // tie (transformers alike); random A makes the kept keys well defined.
    let _g = tch::no_grad_guard();
    for (name, mut v) in m.var_store().variables() {
        if name.ends_with(".A") {
            v.copy_(&(v.randn_like() * 0.5));
        }
    }
    m
}

fn ids(seed: i64, b: i64, s: i64) -> Tensor {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed);
    Tensor::randint(53, [b, s], (Kind::Int64, Device::Cpu))
}

/// Rows of distinct ids: Dynamic Mask Attention's bias depends on the token alone, so a repeated
/// token ties with itself in the top-k, where two computations of the same value may then pick
/// different keys (in transformers too).
fn distinct_ids(seed: i64, b: i64, s: i64) -> Tensor {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed);
    Tensor::stack(&(0..b).map(|_| Tensor::randperm(53, (Kind::Int64, Device::Cpu)).narrow(0, 0, s)).collect::<Vec<_>>(), 0)
}

/// Logits of `ids` `[b, s]` fed to the cache in chunks of the given sizes.
fn cached_logits(m: &DecoderModel, ids: &Tensor, chunks: &[i64]) -> Tensor {
    let (b, s) = (ids.size()[0], ids.size()[1]);
    let mut cache = m.new_cache(b, s);
    let mut out = Vec::new();
    let mut start = 0;
    for &n in chunks.iter().chain(std::iter::repeat(&1)) {
        if start == s {
            break;
        }
        let n = n.min(s - start);
        let mask = AttentionMask::causal(n, start, None, Device::Cpu);
        let pos = Tensor::arange_start(start, start + n, (Kind::Int64, Device::Cpu)).unsqueeze(0).expand([b, n], false);
        out.push(m.forward_ext(&ids.narrow(1, start, n), &pos, &mask, Some(&mut cache)));
        start += n;
    }
    Tensor::cat(&out, 1)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Cached decoding equals the full forward for every kind, whatever the chunking.
    #[test]
    fn cached_decoding_equals_the_full_forward(seed in 0i64..1000, prefill in 1i64..12, chunk in 1i64..6) {
        let _g = tch::no_grad_guard();
        let x = distinct_ids(seed, 2, 19);
        for kind in KINDS {
            let m = model(kind);
            let full = m.forward(&x);
            let cached = cached_logits(&m, &x, &[prefill, chunk, 1, chunk]);
            let diff = max_diff(&full, &cached);
            prop_assert!(diff < 1e-4, "{kind}: prefill {prefill}, chunk {chunk}: max abs diff {diff}");
        }
    }

    /// Changing tokens after position t never changes the logits at positions <= t.
    #[test]
    fn every_kind_is_causal(seed in 0i64..1000, t in 0i64..18) {
        let _g = tch::no_grad_guard();
        let x = ids(seed, 1, 19);
        let y = Tensor::cat(&[x.narrow(1, 0, t + 1), ids(seed + 1, 1, 18 - t)], 1);
        for kind in KINDS {
            let m = model(kind);
            let diff = max_diff(&m.forward(&x).narrow(1, 0, t + 1), &m.forward(&y).narrow(1, 0, t + 1));
            prop_assert!(diff == 0.0, "{kind}: logits at <= {t} changed by {diff}");
        }
    }
}

/// Left-padded batches generate what each prompt generates alone (a rolling cache, masks over
/// cached positions and padding together).
#[test]
fn batched_generation_matches_single_for_every_kind() {
    let prompts = vec![vec![5i64, 9, 2, 7, 1, 3], vec![4i64, 8], vec![6i64, 1, 2, 9]];
    let cfg = GenerationConfig { max_new_tokens: 9, ..GenerationConfig::default() };
    for kind in KINDS {
        let m = model(kind);
        let together = generate(&m, &prompts, &cfg, |_, _| {}).unwrap();
        for (p, want) in prompts.iter().zip(&together) {
            let alone = generate(&m, std::slice::from_ref(p), &cfg, |_, _| {}).unwrap();
            assert_eq!(&alone[0], want, "{kind}: prompt {p:?}");
        }
    }
}

#[test]
fn per_head_parameters_are_named_variables() {
    for (kind, name) in [("{ kind = \"ssmax\" }", "ssmax_scale"), ("{ kind = \"temperature\" }", "inv_temperature")] {
        let m = model(kind);
        let vars = m.var_store().variables();
        let full = format!("model.layers.0.self_attn.{name}");
        let v = vars.get(&full).unwrap_or_else(|| panic!("{full} missing"));
        assert_eq!(v.size(), vec![4]);
        assert!(v.requires_grad());
        assert!(!vars.contains_key(&format!("model.layers.1.self_attn.{name}")), "layer 1 is dense");
        let x = ids(1, 1, 9);
        m.forward(&x).sum(Kind::Float).backward();
        assert!(v.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0, "{name} gets gradients");
    }
    assert_eq!(model(KINDS[1]).layers[0].self_attn.attention.settings(), AttentionKind::SlidingWindow { window: 4, global_tokens: 0 });
}

/// The position encodings that are not rotary, with dense attention: cached decoding equals the
/// full forward, and batches equal single prompts.
#[test]
fn sinusoidal_and_alibi_positions_cache_and_batch() {
    let _g = tch::no_grad_guard();
    let x = distinct_ids(4, 2, 17);
    let prompts = vec![vec![5i64, 9, 2, 7, 1, 3], vec![4i64, 8]];
    let cfg = GenerationConfig { max_new_tokens: 7, ..GenerationConfig::default() };
    for position in ["sinusoidal", "alibi", "none", "learned"] {
        let m = model_with(KINDS[0], &format!("position = \"{position}\"\n"));
        let diff = max_diff(&m.forward(&x), &cached_logits(&m, &x, &[5, 3]));
        assert!(diff < 1e-4, "{position}: max abs diff {diff}");
        let together = generate(&m, &prompts, &cfg, |_, _| {}).unwrap();
        for (p, want) in prompts.iter().zip(&together) {
            assert_eq!(&generate(&m, std::slice::from_ref(p), &cfg, |_, _| {}).unwrap()[0], want, "{position}: {p:?}");
        }
    }
    // ALiBi biases dense attention only.
    let text = "model_type = \"stlm\"\nposition = \"alibi\"\nattention = [{ kind = \"sliding-window\", window = 4 }]\n";
    let e = ModelConfig::from_toml_str(text, std::path::Path::new("a.toml")).unwrap_err().to_string();
    assert!(e.contains("alibi"), "{e}");
}

/// The attention probabilities a block reports are the ones its output is computed with: they
/// rebuild the attention output (grouped-query heads included) and put no mass on future keys;
/// kinds other than dense report none.
#[test]
fn attention_probabilities_rebuild_the_block_output() {
    let m = model("{ kind = \"dense\" }");
    let x = ids(5, 2, 9);
    let stlm_model::ResidualStream { pass, states, .. } = m.residual_stream_pass(&x, stlm_model::Mode::Eval);
    for i in 0..2 {
        let logp = m.attention_log_probs(i, &pass, &states[i]).expect("dense layers report probabilities");
        assert_eq!(logp.size(), vec![2, 4, 9, 9]);
        let p = logp.exp();
        let sums = p.sum_dim_intlist(-1, false, Kind::Float);
        assert!(sums.allclose(&sums.ones_like(), 1e-5, 1e-5, false));
        assert_eq!(p.triu(1).abs().max().double_value(&[]), 0.0);
        let layer = &m.layers[i];
        let h = layer.input_layernorm.forward(&states[i]);
        let attn = &layer.self_attn;
        // Values [b, kv, s, d] repeated for the query heads of each group.
        let v = attn.v_proj.forward(&h).view([2, 9, 2, 8]).transpose(1, 2).repeat_interleave_self_int(2, 1, None);
        let out = p.matmul(&v).transpose(1, 2).reshape([2, 9, 32]);
        // The block's output from these probabilities: x + attention, then + MLP.
        let x1 = &states[i] + attn.o_proj.forward(&out);
        let rebuilt = &x1 + layer.mlp.forward(&layer.post_attention_layernorm.forward(&x1));
        assert!(rebuilt.allclose(&states[i + 1], 1e-4, 1e-5, false), "block {i}: {}", (&rebuilt - &states[i + 1]).abs().max());
    }
    let sparse = model("{ kind = \"sliding-window\", window = 4 }");
    let stlm_model::ResidualStream { pass, states, .. } = sparse.residual_stream_pass(&x, stlm_model::Mode::Eval);
    assert!(sparse.attention_log_probs(0, &pass, &states[0]).is_none());
    assert!(sparse.attention_log_probs(1, &pass, &states[1]).is_some());
}
