//! `stlm weightgen` end to end on a tiny trained model: collect (p-diff's continued training of
//! the chosen layers with the rest frozen, and a run's checkpoints), train the generator (with a
//! stop and an exact resume), sample model directories that load and generate, and compare them
//! with the baselines; bad input is one line.

mod common;

use common::{fails, json, ok, p};
use stlm_core::read_safetensors;

const CONFIG: &str = "[model]\npreset = \"llama\"\nvocab_size = 320\nhidden_size = 32\nintermediate_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\nmax_position_embeddings = 64\n\n[train]\nmax_steps = 6\nbatch_size = 4\nseq_len = 32\nlog_every = 2\neval_every = 6\neval_batches = 1\nsave_every = 2\nkeep_last = 0\nwarmup_steps = 1\n\n[data]\nval_fraction = 0.1\n";

const GEN: [&str; 16] = [
    "--chunk",
    "64",
    "--latent",
    "8",
    "--vae-hidden",
    "64",
    "--vae-steps",
    "60",
    "--vae-batch",
    "64",
    "--hidden",
    "32",
    "--timesteps",
    "50",
    "--diffusion-batch",
    "4",
];

#[test]
fn collects_trains_samples_and_compares() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data = common::write_stories(root);
    let config = root.join("tiny.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let run = root.join("run");
    ok(&["train", "--config", p(&config), "--data", p(&data), "--out", p(&run), "--samples", "0"]);
    let model = run.join("model");

    // p-diff's protocol: 8 steps of the selected layers only, every 2 steps kept; plus the run's
    // three checkpoints (steps 2, 4, 6).
    let coll = root.join("coll");
    let layers = "norm,layers.1.mlp.down_proj";
    ok(&[
        "weightgen",
        "collect",
        "--model",
        p(&model),
        "--layers",
        layers,
        "--out",
        p(&coll),
        "--steps",
        "8",
        "--every",
        "2",
        "--lr",
        "1e-3",
        "--config",
        p(&config),
        "--data",
        p(&data),
        "--runs",
        p(&run),
    ]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(coll.join("collection.json")).unwrap()).unwrap();
    let units: Vec<&str> = manifest["units"].as_array().unwrap().iter().map(|u| u["name"].as_str().unwrap()).collect();
    assert_eq!(
        units,
        [
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.post_attention_layernorm.weight",
            "model.layers.1.input_layernorm.weight",
            "model.layers.1.mlp.down_proj.weight",
            "model.layers.1.post_attention_layernorm.weight",
            "model.norm.weight"
        ]
    );
    assert_eq!(manifest["checkpoints"].as_array().unwrap().len(), 3 + 4);
    let w = read_safetensors(&coll.join("weights.safetensors")).unwrap();
    let down = &w["model.layers.1.mlp.down_proj.weight"];
    assert_eq!(down.size(), [7, 32 * 64]);
    // Continued training moved the selected layers (freezing the rest is tested in the library).
    let moved = (down.get(6) - down.get(3)).abs().max().double_value(&[]);
    assert!(moved > 1e-5, "continued training did not change the selected layer");

    // Train the generator (the library tests that a stopped run resumes exactly); then --resume
    // with more diffusion steps continues it, and a second fresh run into the folder is refused.
    let gen = root.join("gen");
    let mut args =
        vec!["weightgen", "train", "--collection", p(&coll), "--out", p(&gen), "--diffusion-steps", "20", "--json"];
    args.extend(GEN);
    let r = json(&args);
    assert_eq!(r["diffusion_steps"], 20);
    assert!(r["vae_reconstruction"].as_f64().unwrap().is_finite());
    let err = fails(&args);
    assert!(err.contains("already there") && err.contains("--resume"), "{err}");
    let mut more = vec![
        "weightgen",
        "train",
        "--collection",
        p(&coll),
        "--out",
        p(&gen),
        "--diffusion-steps",
        "30",
        "--json",
        "--resume",
    ];
    more.extend(GEN);
    assert_eq!(json(&more)["diffusion_steps"], 30);

    // Sample complete model directories; they load and generate.
    let samples = root.join("samples");
    let r = json(&[
        "weightgen",
        "sample",
        "--generator",
        p(&gen),
        "--n",
        "3",
        "--out",
        p(&samples),
        "--ddim-steps",
        "10",
        "--json",
    ]);
    assert_eq!(r["samples"].as_array().unwrap().len(), 3);
    let s0 = samples.join("sample-000");
    assert!(s0.join("tokenizer.json").is_file() && s0.join("config.json").is_file());
    ok(&["generate", "--model", p(&s0), "--prompt", "Once upon", "--max-new-tokens", "4"]);
    // Only the selected layers differ from the base model.
    let (a, b) = (
        read_safetensors(&model.join("model.safetensors")).unwrap(),
        read_safetensors(&s0.join("model.safetensors")).unwrap(),
    );
    for (name, t) in &a {
        let same = t.equal(&b[name]);
        let selected = units.contains(&name.as_str());
        assert!(same != selected, "{name}: selected {selected}, unchanged {same}");
    }

    // The comparison: one row chosen per family, selection on validation, test reported.
    let csv = root.join("rows.csv");
    let r = json(&[
        "weightgen",
        "compare",
        "--collection",
        p(&coll),
        "--samples",
        p(&samples),
        "--data",
        p(&data),
        "--csv",
        p(&csv),
        "--json",
    ]);
    let chosen: Vec<&str> = r["chosen"].as_array().unwrap().iter().map(|c| c["family"].as_str().unwrap()).collect();
    assert_eq!(chosen, ["original", "diffusion", "noise", "soup", "checkpoint", "nearest"], "{r}");
    let rows = r["rows"].as_array().unwrap();
    assert_eq!(rows.iter().filter(|r| r["family"] == "noise").count(), 3);
    for row in rows {
        assert!(row["scores"]["test_loss"].as_f64().unwrap() > 0.0, "{row}");
    }
    // A training checkpoint is at distance 0 from the training weights.
    let ckpt = rows.iter().find(|r| r["family"] == "checkpoint").unwrap();
    assert!(ckpt["distance_to_nearest"].as_f64().unwrap() < 1e-3, "{ckpt}");
    let original = rows.iter().find(|r| r["family"] == "original").unwrap();
    assert!(original["distance_to_original"].as_f64().unwrap() == 0.0);
    assert!(std::fs::read_to_string(&csv).unwrap().lines().count() == rows.len() + 1);
    let table = ok(&["weightgen", "compare", "--collection", p(&coll), "--samples", p(&samples), "--data", p(&data)]);
    assert!(table.contains("| uniform soup |") && table.contains("distance to nearest training weights"), "{table}");

    // Selection by benchmark accuracy on the validation items (a four-pair BLiMP file).
    let blimp = root.join("blimp.jsonl");
    let pairs = [("the dog runs.", "the dog run."), ("a fox is red.", "a fox are red."), ("tom sees it.", "tom see it."), ("they go home.", "they goes home.")];
    let lines: Vec<String> = pairs.iter().map(|(g, b)| serde_json::json!({"sentence_good": g, "sentence_bad": b}).to_string()).collect();
    std::fs::write(&blimp, lines.join("\n")).unwrap();
    let r = json(&[
        "weightgen", "compare", "--collection", p(&coll), "--samples", p(&samples), "--data", p(&data), "--task", "blimp",
        "--task-data", p(&blimp), "--select-by", "benchmark", "--json",
    ]);
    assert_eq!(r["select_by"], "benchmark");
    let rows = r["rows"].as_array().unwrap();
    let best_acc = rows.iter().filter(|x| x["family"] == "diffusion").map(|x| x["scores"]["val_acc"].as_f64().unwrap()).fold(f64::MIN, f64::max);
    let chosen = r["chosen"].as_array().unwrap().iter().find(|c| c["family"] == "diffusion").unwrap();
    assert_eq!(chosen["scores"]["val_acc"].as_f64().unwrap(), best_acc, "{r}");
    let err = fails(&["weightgen", "compare", "--collection", p(&coll), "--samples", p(&samples), "--data", p(&data), "--select-by", "benchmark"]);
    assert!(err.contains("--select-by benchmark needs --task"), "{err}");

    // Bad input: one line naming the value.
    let err = fails(&[
        "weightgen",
        "collect",
        "--model",
        p(&model),
        "--layers",
        "norm,layers.7.mlp",
        "--out",
        p(&root.join("x")),
        "--runs",
        p(&run),
    ]);
    assert!(err.contains("layers.7.mlp"), "{err}");
    let err = fails(&["weightgen", "collect", "--model", p(&model), "--layers", "norm", "--out", p(&root.join("x"))]);
    assert!(err.contains("nothing to collect"), "{err}");
    let err = fails(&["weightgen", "sample", "--generator", p(&coll), "--n", "1", "--out", p(&root.join("y"))]);
    assert!(err.contains("not a generator folder"), "{err}");
}
