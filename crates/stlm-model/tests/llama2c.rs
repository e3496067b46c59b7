//! llama2.c checkpoints: a random model exported to each version and imported back gives the
//! same logits (version 2 within its int8 error); a version 1 file read by an independent
//! float64 implementation of llama2.c's model.py (interleaved RoPE, its tensor order) gives
//! stlm's logits; bad files are one-line errors naming the file.

use std::collections::HashMap;
use std::path::Path;
use stlm_model::llama2c::{self, Format};
use stlm_model::{DecoderModel, ModelConfig};
use tch::{Device, Kind, Tensor};

fn config(tied: bool, kv_heads: i64) -> ModelConfig {
    ModelConfig {
        vocab_size: 96,
        hidden_size: 64,
        intermediate_size: 96,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: kv_heads,
        max_position_embeddings: 32,
        norm_eps: 1e-5,
        tie_word_embeddings: tied,
        initializer_range: 0.2,
        ..ModelConfig::llama()
    }
}

fn random_model(tied: bool, kv_heads: i64, seed: i64) -> DecoderModel {
    tch::manual_seed(seed);
    let m = DecoderModel::new(config(tied, kv_heads), Device::Cpu).expect("model");
    // Norm weights other than 1, so that their order in the file matters.
    let _g = tch::no_grad_guard();
    for (name, mut t) in m.var_store().variables() {
        if name.ends_with("norm.weight") {
            t.copy_(&(Tensor::rand_like(&t) + 0.5));
        }
    }
    m
}

fn ids() -> Tensor {
    Tensor::from_slice(&[1i64, 5, 17, 42, 3, 88, 60, 2, 9, 31, 77, 12]).view([1, -1])
}

fn logits(m: &DecoderModel) -> Tensor {
    tch::no_grad(|| m.forward(&ids()))
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn vars(m: &DecoderModel) -> HashMap<String, Tensor> {
    m.var_store().variables()
}

fn round_trip(m: &DecoderModel, format: Format, dir: &Path) -> (DecoderModel, llama2c::ExportReport) {
    let file = dir.join(format!("v{}.bin", format.version()));
    let report = llama2c::write_checkpoint(&m.config, &vars(m), format, &file).expect("export");
    let out = dir.join(format!("v{}", format.version()));
    let imported = llama2c::import(&file, None, &out).expect("import");
    assert_eq!(imported.header.format, report.header.format);
    (stlm_model::load_model(&out, Device::Cpu, stlm_core::DType::Float32).expect("load"), report)
}

#[test]
fn every_version_round_trips_tied_untied_and_grouped_query() {
    let dir = tempfile::tempdir().unwrap();
    for (tied, kv) in [(true, 4), (false, 2)] {
        let m = random_model(tied, kv, 3);
        let want = logits(&m);
        for format in [Format::V0, Format::V1] {
            let (back, _) = round_trip(&m, format, dir.path());
            assert_eq!(back.config.tie_word_embeddings, tied);
            assert_eq!(back.config.num_key_value_heads, kv);
            let d = max_diff(&logits(&back), &want);
            assert!(d <= 1e-5, "version {} tied={tied}: logits differ by {d}", format.version());
        }
        // Version 2: every weight within half a quantisation step of its group, logits close.
        let (back, report) = round_trip(&m, Format::V2 { group_size: 64 }, dir.path());
        let err = report.max_quant_error.expect("version 2 reports its error");
        let original = vars(&m);
        for (name, t) in vars(&back) {
            let w = &original[&name];
            let d = max_diff(&t, w);
            if name.ends_with("norm.weight") {
                assert_eq!(d, 0.0, "{name}: norms stay float32");
            } else {
                let step = w.abs().max().double_value(&[]) / 127.0;
                assert!(d <= step / 2.0 + 1e-7 && d <= err + 1e-7, "{name}: error {d} over half a step {step}");
            }
        }
        let d = max_diff(&logits(&back), &want);
        let scale = want.abs().max().double_value(&[]);
        // The weights are checked one by one above; this random model (init 0.2) amplifies their
        // noise to a few per cent of the logits.
        assert!(d > 0.0 && d <= 0.1 * scale, "version 2: logits differ by {d} (scale {scale})");
    }
}

/// llama2.c's model.py in float64 on a version 1 file, read independently of stlm's reader.
fn reference_logits(file: &Path, ids: &[i64]) -> Tensor {
    let bytes = std::fs::read(file).unwrap();
    let int = |i: usize| i32::from_le_bytes(bytes[8 + 4 * i..12 + 4 * i].try_into().unwrap()) as i64;
    let (d, hd, layers, heads, kv, vocab) = (int(0), int(1), int(2), int(3), int(4), int(5));
    let shared = bytes[36] == 1;
    let floats: Vec<f32> = bytes[256..].chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    let mut at = 0usize;
    let mut take = |shape: &[i64]| {
        let n = shape.iter().product::<i64>() as usize;
        let t = Tensor::from_slice(&floats[at..at + n]).to_kind(Kind::Double).view(shape);
        at += n;
        t
    };
    let hs = d / heads;
    let att_norm: Vec<Tensor> = (0..layers).map(|_| take(&[d])).collect();
    let ffn_norm: Vec<Tensor> = (0..layers).map(|_| take(&[d])).collect();
    let norm = take(&[d]);
    let emb = take(&[vocab, d]);
    let mut per_layer = |shape: [i64; 2]| -> Vec<Tensor> { (0..layers).map(|_| take(&shape)).collect() };
    let (wq, wk, wv, wo) = (per_layer([d, d]), per_layer([kv * hs, d]), per_layer([kv * hs, d]), per_layer([d, d]));
    let (w1, w2, w3) = (per_layer([hd, d]), per_layer([d, hd]), per_layer([hd, d]));
    let cls = if shared { emb.shallow_clone() } else { take(&[vocab, d]) };
    let rms = |x: &Tensor, w: &Tensor| x * (x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Double) + 1e-5).rsqrt() * w;
    let t = ids.len() as i64;
    // Interleaved rotation: pairs (2i, 2i + 1) by angle pos * 10000^(-2i / hs).
    let freqs = Tensor::arange(hs / 2, (Kind::Double, Device::Cpu)).g_mul_scalar(-2.0 / hs as f64 * 10000f64.ln()).exp();
    let angle = Tensor::arange(t, (Kind::Double, Device::Cpu)).view([t, 1, 1]) * freqs.view([1, 1, hs / 2]);
    let rotate = |x: &Tensor, n: i64| {
        let x = x.view([t, n, hs / 2, 2]);
        let (a, b) = (x.select(-1, 0), x.select(-1, 1));
        let (c, s) = (angle.cos(), angle.sin());
        Tensor::stack(&[&a * &c - &b * &s, &a * &s + &b * &c], -1).view([t, n, hs])
    };
    let mut x = emb.index_select(0, &Tensor::from_slice(ids));
    let mask = Tensor::ones([t, t], (Kind::Bool, Device::Cpu)).triu(1);
    for l in 0..layers as usize {
        let h = rms(&x, &att_norm[l]);
        let q = rotate(&h.matmul(&wq[l].tr()), heads).transpose(0, 1);
        let k = rotate(&h.matmul(&wk[l].tr()), kv).transpose(0, 1).repeat_interleave_self_int(heads / kv, 0, None);
        let v = h.matmul(&wv[l].tr()).view([t, kv, hs]).transpose(0, 1).repeat_interleave_self_int(heads / kv, 0, None);
        let scores = q.matmul(&k.transpose(1, 2)) / (hs as f64).sqrt();
        let att = scores.masked_fill(&mask, f64::NEG_INFINITY).softmax(-1, Kind::Double);
        x = &x + att.matmul(&v).transpose(0, 1).reshape([t, d]).matmul(&wo[l].tr());
        let h = rms(&x, &ffn_norm[l]);
        x = &x + (h.matmul(&w1[l].tr()).silu() * h.matmul(&w3[l].tr())).matmul(&w2[l].tr());
    }
    rms(&x, &norm).matmul(&cls.tr())
}

#[test]
fn a_version_1_file_computes_llama2c_logits() {
    let dir = tempfile::tempdir().unwrap();
    for (tied, kv) in [(false, 4), (true, 2)] {
        let m = random_model(tied, kv, 11);
        let file = dir.path().join("v1.bin");
        llama2c::write_checkpoint(&m.config, &vars(&m), Format::V1, &file).unwrap();
        let ids: Vec<i64> = Vec::try_from(&ids().view([-1])).unwrap();
        let want = reference_logits(&file, &ids);
        let got = logits(&m).squeeze_dim(0).to_kind(Kind::Double);
        let d = max_diff(&got, &want);
        assert!(d <= 1e-4, "tied={tied} kv={kv}: stlm and llama2.c's model differ by {d}");
    }
}

#[test]
fn bad_files_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let m = random_model(false, 4, 1);
    let file = dir.path().join("m.bin");
    let out = dir.path().join("out");
    for format in [Format::V0, Format::V1, Format::V2 { group_size: 32 }] {
        llama2c::write_checkpoint(&m.config, &vars(&m), format, &file).unwrap();
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() - 4]).unwrap();
        let e = llama2c::import(&file, None, &out).expect_err("truncated").to_string();
        assert!(e.contains("m.bin") && e.contains("truncated") && !e.contains('\n'), "{e}");
        assert!(!out.exists(), "nothing is written for a bad file");
    }
    // A header that disagrees with itself.
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[4..8].copy_from_slice(&7i32.to_le_bytes());
    std::fs::write(&file, &bytes).unwrap();
    let e = llama2c::import(&file, None, &out).err().unwrap().to_string();
    assert!(e.contains("version 7 is unknown"), "{e}");
    std::fs::write(&file, [0u8; 10]).unwrap();
    let e = llama2c::import(&file, None, &out).err().unwrap().to_string();
    assert!(e.contains("too short"), "{e}");
    // Legacy header with n_heads not dividing dim.
    let mut v0 = Vec::new();
    for v in [64i32, 96, 1, 5, 5, 96, 8] {
        v0.extend(v.to_le_bytes());
    }
    std::fs::write(&file, &v0).unwrap();
    let e = llama2c::import(&file, None, &out).err().unwrap().to_string();
    assert!(e.contains("n_heads 5"), "{e}");
}

#[test]
fn models_llama2c_cannot_hold_are_refused_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(true, 4);
    c.rope_theta = 500000.0;
    let m = DecoderModel::new(c, Device::Cpu).unwrap();
    let e = llama2c::write_checkpoint(&m.config, &vars(&m), Format::V0, &dir.path().join("x.bin")).unwrap_err().to_string();
    assert!(e.contains("rope_theta = 500000"), "{e}");
    let g = DecoderModel::new(ModelConfig { vocab_size: 96, hidden_size: 64, num_attention_heads: 4, ..ModelConfig::gpt2() }, Device::Cpu).unwrap();
    let e = llama2c::write_checkpoint(&g.config, &vars(&g), Format::V0, &dir.path().join("x.bin")).unwrap_err().to_string();
    assert!(e.contains("norm = LayerNorm"), "{e}");
    assert!(!dir.path().join("x.bin").exists());
    let mut c = config(true, 4);
    c.norm_eps = 1e-6;
    assert!(llama2c::export_warnings(&c)[0].contains("norm_eps"));
}
