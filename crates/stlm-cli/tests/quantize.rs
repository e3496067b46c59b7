//! `stlm quantize` end to end on a tiny trained model: Q8_0 and Q4_0 directories (round to
//! nearest and GPTQ) that `generate`, `eval ppl`, `inspect`, `train --init` and `export gguf`
//! load, with reports; a GGUF export imports back to the same model; bad input is one line.

mod common;

use common::{fails, json, ok, p};

const CONFIG: &str = "[model]\npreset = \"llama\"\nvocab_size = 320\nhidden_size = 32\nintermediate_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\nmax_position_embeddings = 64\ntie_word_embeddings = false\n\n[train]\nmax_steps = 6\nbatch_size = 4\nseq_len = 32\nlog_every = 2\neval_every = 6\neval_batches = 1\nsave_every = 6\nkeep_last = 1\nwarmup_steps = 1\n\n[data]\nval_fraction = 0.1\n";

#[test]
fn quantizes_reports_and_loads_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data = common::write_stories(root);
    let config = root.join("tiny.toml");
    std::fs::write(&config, CONFIG).unwrap();
    ok(&["train", "--config", p(&config), "--data", p(&data), "--out", p(&root.join("run")), "--samples", "0"]);
    let model = root.join("run").join("model");
    for (format, bits) in [("q8_0", 8.5), ("q4_0", 4.5)] {
        let out = root.join(format);
        let r = json(&["quantize", "--model", p(&model), "--out", p(&out), "--format", format, "--val", p(&data), "--val-len", "32", "--json"]);
        // Two blocks of seven projections, the untied head and the embedding.
        assert_eq!(r["layers"].as_array().unwrap().len(), 16, "{r}");
        assert!(r["kept"].as_array().unwrap().is_empty(), "{r}");
        let bpp = r["bits_per_parameter"].as_f64().unwrap();
        assert!(bpp > bits && bpp < 32.0, "{bpp}");
        assert!(r["bytes_after"].as_u64().unwrap() < r["bytes_before"].as_u64().unwrap());
        let (before, after) = (r["before"]["ppl"].as_f64().unwrap(), r["after"]["ppl"].as_f64().unwrap());
        assert!(after > 0.9 * before && after < 1.25 * before, "{format}: perplexity {before} -> {after}");
        let marker: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("quantization.json")).unwrap()).unwrap();
        assert_eq!(marker["tensors"]["model.layers.0.self_attn.q_proj.weight"], format);
        assert_eq!(marker["method"], "rtn");

        let text = ok(&["generate", "--model", p(&out), "--prompt", "Once upon", "--max-new-tokens", "8", "--temperature", "0"]);
        assert!(text.starts_with("Once upon"), "{text}");
        let ppl = json(&["eval", "ppl", "--model", p(&out), "--data", p(&data), "--json"]);
        assert!(ppl["ppl"].as_f64().unwrap().is_finite());
        assert!(ok(&["inspect", "--model", p(&out)]).contains(&format!("in {format} blocks (16 matrices)")));

        // Quantizing again is refused; training starts from the dequantized weights.
        assert!(fails(&["quantize", "--model", p(&out), "--out", p(&root.join("again")), "--format", format]).contains("already quantized"));
        let tuned = root.join(format!("tuned-{format}"));
        let out_text = common::stlm(&["train", "--config", p(&config), "--init", p(&out), "--data", p(&data), "--out", p(&tuned), "--max-steps", "2", "--samples", "0"]);
        assert!(out_text.status.success(), "{}", String::from_utf8_lossy(&out_text.stderr));
        assert!(String::from_utf8_lossy(&out_text.stderr).contains("dequantized float weights"));
        assert!(!tuned.join("model").join("quantization.json").exists(), "a fine-tuned model is float");
    }
    // GPTQ, calibrated on the training text.
    let gq = root.join("gptq");
    let calib = ["--calib", p(&data), "--calib-samples", "8", "--calib-len", "32"];
    let r = json(&[&["quantize", "--model", p(&model), "--out", p(&gq), "--format", "q4_0", "--method", "gptq", "--val", p(&data), "--val-len", "32", "--json"][..], &calib].concat());
    assert_eq!((r["method"].as_str(), r["layers"].as_array().unwrap().len()), (Some("gptq"), 16), "{r}");
    assert!(r["after"]["ppl"].as_f64().unwrap().is_finite());
    assert!(fails(&["quantize", "--model", p(&model), "--out", p(&root.join("x")), "--format", "q8_0", "--method", "gptq"]).contains("--calib"));
    assert!(fails(&[&["quantize", "--model", p(&model), "--out", p(&root.join("x")), "--format", "q8_0"][..], &calib].concat()).contains("needs no calibration"));
    // GGUF: the quantized model's blocks go out and come back as they were.
    let file = root.join("m.gguf");
    assert!(ok(&["export", "gguf", "--model", p(&gq), "--out", p(&file)]).contains("16 quantized weights copied"));
    let back = root.join("back");
    assert!(ok(&["import", "gguf", "--file", p(&file), "--out", p(&back)]).contains("16 weights kept quantized"));
    let ppl = |m: &std::path::Path| json(&["eval", "ppl", "--model", p(m), "--data", p(&data), "--json"])["ppl"].as_f64().unwrap();
    assert_eq!(ppl(&back), ppl(&gq));
    assert!(fails(&["import", "gguf", "--file", p(&data), "--out", p(&root.join("y"))]).contains("not a readable GGUF file"));
    assert!(fails(&["quantize", "--model", p(&model), "--out", p(&root.join("x")), "--format", "q5_1"]).contains("q5_1"));
    assert!(fails(&["quantize", "--model", p(&model), "--out", p(&model), "--format", "q8_0"]).contains("must differ"));
    assert!(fails(&["quantize", "--model", p(&model), "--out", p(&root.join("x")), "--format", "q8_0", "--val", p(&root.join("missing.txt"))]).contains("missing.txt"));
}
