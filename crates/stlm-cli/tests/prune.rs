//! `stlm prune` end to end on a tiny trained model: unstructured, N:M and structured prunes write
//! model directories that `stlm generate` loads, with reports; `stlm train --init` fine-tunes a
//! pruned model with its zeros kept; `--schedule cubic` prunes in stages; bad input is one line.

mod common;

use common::{fails, json, ok, p};
use std::path::{Path, PathBuf};
use stlm_core::read_safetensors;

const CONFIG: &str = "[model]\npreset = \"llama\"\nvocab_size = 320\nhidden_size = 32\nintermediate_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\nmax_position_embeddings = 64\n\n[train]\nmax_steps = 6\nbatch_size = 4\nseq_len = 32\nlog_every = 2\neval_every = 6\neval_batches = 1\nsave_every = 6\nkeep_last = 1\nwarmup_steps = 1\n\n[data]\nval_fraction = 0.1\n";

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    data: PathBuf,
    config: PathBuf,
    model: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let data = common::write_stories(&root);
    let config = root.join("tiny.toml");
    std::fs::write(&config, CONFIG).unwrap();
    ok(&["train", "--config", p(&config), "--data", p(&data), "--out", p(&root.join("run")), "--samples", "0"]);
    Fixture { model: root.join("run").join("model"), _dir: dir, root, data, config }
}

fn weight(dir: &Path, name: &str) -> tch::Tensor {
    read_safetensors(&dir.join("model.safetensors")).unwrap().remove(name).unwrap()
}

#[test]
fn prunes_fine_tunes_and_reports() {
    let f = fixture();
    let q = "model.layers.0.self_attn.q_proj.weight";
    for (method, pattern) in [("magnitude", ["--sparsity", "0.5"]), ("wanda", ["--nm", "2:4"]), ("sparsegpt", ["--sparsity", "0.5"])] {
        let out = f.root.join(method);
        let mut args = vec!["prune", "--model", p(&f.model), "--out", p(&out), "--method", method, "--val", p(&f.data), "--json"];
        args.extend(pattern);
        if method != "magnitude" {
            args.extend(["--calib", p(&f.data), "--calib-samples", "4", "--calib-len", "32"]);
        }
        let r = json(&args);
        assert_eq!(r["method"], method);
        assert_eq!(r["pruned"].as_array().unwrap().len(), 2 * 7, "{r}");
        assert!(r["pruned"].as_array().unwrap().iter().all(|t| t["sparsity"] == 0.5), "{r}");
        assert!(r["before"]["ppl"].as_f64().unwrap() > 1.0 && r["after"]["ppl"].as_f64().unwrap() > 1.0, "{r}");
        assert!(r["nonzero_after"].as_i64() < r["nonzero_before"].as_i64());
        assert!(out.join("pruning.json").is_file() && out.join("tokenizer.json").is_file());
        ok(&["generate", "--model", p(&out), "--prompt", "Once upon", "--max-new-tokens", "3"]);
    }
    // Plain text report.
    let text = ok(&["prune", "--model", p(&f.model), "--out", p(&f.root.join("global")), "--sparsity", "0.3", "--scope", "global", "--skip", "none"]);
    assert!(text.contains("magnitude 30% (global)") && !text.contains("validation"), "{text}");

    // Fine-tuning keeps the zeros; the kept weights train.
    let pruned = f.root.join("wanda");
    let ft = f.root.join("ft");
    ok(&["train", "--config", p(&f.config), "--init", p(&pruned), "--data", p(&f.data), "--out", p(&ft), "--max-steps", "3", "--samples", "0"]);
    let (before, after) = (weight(&pruned, q), weight(&ft.join("model"), q));
    assert_eq!(after.masked_select(&before.eq(0.0)).abs().max().double_value(&[]), 0.0, "zeros kept");
    assert!(!after.equal(&before), "kept weights train");
    assert!(ft.join("model").join("pruning.json").is_file(), "the record travels with the model");

    // Structured: fewer heads, a smaller model that loads and generates.
    let heads = f.root.join("heads");
    let r = json(&["prune", "--model", p(&f.model), "--out", p(&heads), "--structured", "heads", "--amount", "0.5", "--val", p(&f.data), "--json"]);
    assert_eq!((r["units_before"].as_i64(), r["units_after"].as_i64()), (Some(4), Some(2)), "{r}");
    assert!(r["params_after"].as_i64() < r["params_before"].as_i64());
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(heads.join("config.json")).unwrap()).unwrap();
    assert_eq!((cfg["num_attention_heads"].as_i64(), cfg["head_dim"].as_i64()), (Some(2), Some(8)), "{cfg}");
    ok(&["generate", "--model", p(&heads), "--prompt", "Once upon", "--max-new-tokens", "3"]);
    let r = json(&["prune", "--model", p(&f.model), "--out", p(&f.root.join("short")), "--structured", "layers", "--amount", "0.5", "--calib", p(&f.data), "--json"]);
    assert_eq!(r["removed"][0]["units"].as_array().unwrap().len(), 1, "{r}");
    // A structured model fine-tunes (nothing to keep at zero).
    ok(&["train", "--config", p(&f.config), "--init", p(&heads), "--data", p(&f.data), "--out", p(&f.root.join("ft-heads")), "--max-steps", "2", "--samples", "0"]);

    // Iterative: two stages of magnitude pruning with fine-tuning, 50% at the end.
    let staged = f.root.join("staged");
    let r = json(&[
        "prune", "--model", p(&f.model), "--out", p(&staged), "--sparsity", "0.5", "--schedule", "cubic", "--stages", "2", "--stage-steps", "2",
        "--train-config", p(&f.config), "--data", p(&f.data), "--val", p(&f.data), "--json",
    ]);
    let stages = r["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 2, "{r}");
    // Cubic: 1 - (1 - 1/2)^3 = 7/8 of the way after the first stage.
    assert!((stages[0]["sparsity"].as_f64().unwrap() - 0.4375).abs() < 0.01, "{r}");
    assert!((stages[1]["sparsity"].as_f64().unwrap() - 0.5).abs() < 1e-9, "{r}");
    assert!(stages.iter().all(|s| s["tuned"]["ppl"].as_f64().is_some()), "{r}");
    let final_q = weight(&staged, q);
    let stage1_q = weight(&staged.join("stages").join("stage-1").join("pruned"), q);
    assert_eq!(final_q.masked_select(&stage1_q.eq(0.0)).abs().max().double_value(&[]), 0.0, "stage 1's zeros stay zero");
    ok(&["generate", "--model", p(&staged), "--prompt", "Once", "--max-new-tokens", "2"]);
}

#[test]
fn bad_prune_input_is_one_line() {
    let f = fixture();
    let m = p(&f.model);
    let out = f.root.join("out");
    let o = p(&out);
    assert!(fails(&["prune", "--model", m, "--out", o, "--nm", "2:5"]).contains("group size 5"));
    assert!(fails(&["prune", "--model", m, "--out", o, "--method", "wanda", "--sparsity", "0.5"]).contains("--calib"));
    assert!(fails(&["prune", "--model", m, "--out", o, "--method", "magnitude", "--sparsity", "0.5", "--calib", p(&f.data)]).contains("needs no calibration"));
    assert!(fails(&["prune", "--model", m, "--out", m, "--sparsity", "0.5"]).contains("must differ"));
    assert!(fails(&["prune", "--model", m, "--out", o, "--sparsity", "1.5"]).contains("1.5"));
    assert!(fails(&["prune", "--model", m, "--out", o, "--method", "obs", "--sparsity", "0.5"]).contains("obs"));
    assert!(fails(&["prune", "--model", m, "--out", o, "--structured", "layers", "--amount", "0.5", "--importance", "magnitude"]).contains("block influence"));
    assert!(fails(&["prune", "--model", m, "--out", o, "--structured", "experts", "--amount", "0.5"]).contains("no MoE"));
    assert!(fails(&["prune", "--model", m, "--out", o, "--structured", "heads", "--amount", "1.0"]).contains("--amount"));
    assert!(fails(&["prune", "--model", m, "--out", o, "--sparsity", "0.5", "--schedule", "cubic"]).contains("--train-config"));
    assert!(fails(&["prune", "--model", m, "--out", o, "--nm", "2:4", "--schedule", "cubic"]).contains("N:M"));
    assert!(fails(&["prune", "--model", p(&f.root.join("nope")), "--out", o, "--sparsity", "0.5"]).contains("nope"));
    assert!(fails(&["prune", "--model", m, "--out", o, "--sparsity", "0.5", "--amount", "0.25"]).contains("--structured"));
    assert!(!out.exists(), "nothing written on bad input");
}
