//! A quantized model decodes through the fused step with integer kernels: its logits follow the
//! dequantized model's float logits (the difference is the activation's per-block int8
//! rounding: about 0.5% of each product, measured at 0.7-1.3% of the largest logit on this
//! model), equal the libtorch step's (which takes the same kernel for one row), and the model
//! survives a save and load bit for bit.

use stlm_attention::AttentionMask;
use stlm_core::quant::QuantFormat;
use stlm_model::{load_model, DecoderModel, FastDecoder, ModelConfig};
use stlm_quant::{quantize, Method, QuantOptions};
use tch::{Device, Tensor};

const LLAMA: &str = "vocab_size = 97\nhidden_size = 64\nintermediate_size = 128\nnum_hidden_layers = 2\nnum_attention_heads = 4\nnum_key_value_heads = 2\ninitializer_range = 0.05\n";

/// Held by each test: two models built from the same seed must be the same model, and building
/// or loading a model draws from libtorch's global generator, which parallel tests share.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn model(tied: bool) -> DecoderModel {
    tch::manual_seed(11);
    let cfg = ModelConfig::from_toml_str(&format!("{LLAMA}tie_word_embeddings = {tied}\n"), std::path::Path::new("t.toml")).unwrap();
    DecoderModel::new(cfg, Device::Cpu).unwrap()
}

fn quantized(format: QuantFormat, tied: bool) -> DecoderModel {
    let mut m = model(tied);
    quantize(&mut m, &QuantOptions { method: Method::Rtn, format, skip: vec![], keep_embeddings: false, gptq: Default::default() }, &[]).unwrap();
    m
}

/// Logits of each of `ids` after the ones before it, one position at a time: through the fused
/// step when `fused`, else through libtorch's forward with a cache.
fn step_logits(m: &DecoderModel, ids: &[i64], fused: bool) -> Vec<Tensor> {
    let _g = tch::no_grad_guard();
    let mut cache = m.new_cache(1, ids.len() as i64);
    let mut fast = fused.then(|| FastDecoder::try_new(m).expect("the fused step takes quantized weights"));
    ids.iter()
        .map(|&id| {
            let pos = cache.len();
            match fast.as_mut() {
                Some(f) => f.step(id, pos, &mut cache).view([-1]),
                None => {
                    let mask = AttentionMask::causal(1, pos, None, Device::Cpu);
                    let x = Tensor::from_slice(&[id]).view([1, 1]);
                    m.forward_ext(&x, &Tensor::from_slice(&[pos]).view([1, 1]), &mask, Some(&mut cache)).view([-1])
                }
            }
        })
        .collect()
}

fn worst_relative(a: &[Tensor], b: &[Tensor]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs().max().double_value(&[]) / y.abs().max().double_value(&[])).fold(0.0, f64::max)
}

#[test]
fn the_fused_quantized_step_follows_the_dequantized_model() {
    let _lock = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let ids = [3i64, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8];
    for (format, tied) in [(QuantFormat::Q8_0, false), (QuantFormat::Q4_0, false), (QuantFormat::Q8_0, true), (QuantFormat::Q4_0, true)] {
        let q = quantized(format, tied);
        let mut float = quantized(format, tied);
        float.dequantize();
        // The float reference runs through libtorch only (a dense weight never takes the integer path).
        let reference: Vec<Tensor> = {
            let _g = tch::no_grad_guard();
            let x = Tensor::from_slice(&ids).view([1, -1]);
            let all = float.forward(&x);
            (0..ids.len() as i64).map(|i| all.get(0).get(i)).collect()
        };
        let fused = step_logits(&q, &ids, true);
        let err = worst_relative(&fused, &reference);
        assert!(err < 0.025, "{format:?} tied {tied}: fused quantized logits differ from the dequantized model's by {err} of their scale");
        assert!(err > 0.0, "{format:?}: the activation is quantized, so the logits differ a little");
        let libtorch = step_logits(&q, &ids, false);
        let err = worst_relative(&fused, &libtorch);
        assert!(err < 1e-4, "{format:?} tied {tied}: the fused and libtorch steps differ by {err}");
    }
}

#[test]
fn a_saved_quantized_model_loads_with_the_same_blocks_and_logits() {
    let _lock = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    for (format, tied) in [(QuantFormat::Q8_0, false), (QuantFormat::Q4_0, false), (QuantFormat::Q4_0, true)] {
        let q = quantized(format, tied);
        let out = dir.path().join(format!("{}-{tied}", format.name()));
        q.save(&out, None).unwrap();
        let back = load_model(&out, Device::Cpu, stlm_core::DType::Float32).unwrap();
        let (a, b) = (q.quantized_weights(), back.quantized_weights());
        // The blocks' linear layers and the embedding (tied: also the head).
        assert_eq!(a.len(), if tied { 15 } else { 16 });
        assert_eq!(a, b, "{format:?}: the blocks come back unchanged");
        let ids = [1i64, 2, 3, 4];
        let _g = tch::no_grad_guard();
        let x = Tensor::from_slice(&ids).view([1, -1]);
        assert!(q.forward(&x).equal(&back.forward(&x)));
        // The float model's file is about four times larger.
        let float = dir.path().join(format!("float-{tied}"));
        model(tied).save(&float, None).unwrap();
        let size = |d: &std::path::Path| std::fs::metadata(d.join("model.safetensors")).unwrap().len() as f64;
        let ratio = size(&float) / size(&out);
        assert!(ratio > if format == QuantFormat::Q8_0 { 3.0 } else { 5.0 }, "{format:?}: {ratio}");
    }
}
