//! `stlm sweep` end to end: a grid of `--set` values and `--data` files trains every variant with
//! the same budget, writes the table, CSV and plot, scores every variant on a common text, and a
//! rerun keeps finished variants and trains an interrupted one again; another sweep in the same
//! directory is refused.

mod common;

use common::{fails, json, p};
use std::path::{Path, PathBuf};

const CONFIG: &str = "[model]\nmodel_type = \"stlm\"\nvocab_size = 320\nhidden_size = 32\nintermediate_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\nmax_position_embeddings = 64\n\n[train]\nmax_steps = 4\nbatch_size = 2\nseq_len = 32\nlog_every = 2\neval_every = 0\neval_batches = 2\nsave_every = 0\nkeep_last = 0\nwarmup_steps = 1\n\n[data]\nval_fraction = 0.1\n";

/// A temporary directory with the base config, the stories and another text.
fn setup() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("base.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let stories = common::write_stories(dir.path());
    let other = dir.path().join("other.txt");
    std::fs::write(&other, "The rain fell on the old town. People ran home.\n\n".repeat(60)).unwrap();
    (dir, config, stories, other)
}

#[test]
fn a_grid_trains_every_variant_and_a_rerun_continues() {
    let (dir, config, stories, other) = setup();
    let out = dir.path().join("sweep");
    let data = format!("{}", stories.display());
    let args = [
        "sweep", "--config", p(&config), "--set", "model.layer_sharing=-,{ repeats = 2, mlp = true }", "--set", "train.lr=2e-3",
        "--data", &data, "--data", p(&other), "--budget-minutes", "2", "--eval-data", p(&other), "--out", p(&out), "--json",
    ];
    let report = json(&args);
    let rows = report["variants"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "{report}");
    let labels: Vec<&str> = rows.iter().map(|r| r["variant"].as_str().unwrap()).collect();
    assert_eq!(labels[0], "layer_sharing=base, data=stories.txt");
    assert_eq!(labels[3], "layer_sharing={ repeats = 2, mlp = true }, data=other.txt");
    for r in rows {
        assert_eq!(r["steps"], 4, "{r}");
        for field in ["val_bpb", "eval_bpb", "tokens_per_s", "loss"] {
            assert!(r[field].as_f64().is_some_and(|v| v.is_finite() && v > 0.0), "{field}: {r}");
        }
        let run = out.join(r["dir"].as_str().unwrap());
        let cfg = std::fs::read_to_string(run.join("config.toml")).unwrap();
        assert!(cfg.contains("lr = 0.002"), "the single value applies to every variant: {cfg}");
    }
    let params: Vec<i64> = rows.iter().map(|r| r["parameters"].as_i64().unwrap()).collect();
    assert!(params[2] < params[0], "a tied FFN stores fewer weights: {params:?}");
    for f in ["sweep.md", "sweep.csv", "sweep.svg", "sweep.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let md = std::fs::read_to_string(out.join("sweep.md")).unwrap();
    assert_eq!(md.lines().filter(|l| l.starts_with("| layer_sharing")).count(), 4, "{md}");
    assert!(md.contains("bits/byte on other.txt") && md.contains("**"), "{md}");

    // An interrupted variant (no result yet) trains again; finished ones are kept.
    let again = out.join(rows[1]["dir"].as_str().unwrap());
    std::fs::remove_file(again.join("sweep-result.json")).unwrap();
    std::fs::remove_dir_all(again.join("model")).unwrap();
    let kept = std::fs::read_to_string(out.join(rows[0]["dir"].as_str().unwrap()).join("metrics.jsonl")).unwrap();
    let out2 = common::stlm(&args);
    assert!(out2.status.success(), "{}", String::from_utf8_lossy(&out2.stderr));
    let err = String::from_utf8_lossy(&out2.stderr);
    assert_eq!(err.matches("trained earlier").count(), 3, "{err}");
    assert!(again.join("model").join("model.safetensors").is_file());
    let report2: serde_json::Value = serde_json::from_slice(&out2.stdout).unwrap();
    assert_eq!(report2["variants"].as_array().unwrap().len(), 4);
    assert_eq!(std::fs::read_to_string(out.join(rows[0]["dir"].as_str().unwrap()).join("metrics.jsonl")).unwrap(), kept);

    // Another grid in the same directory is refused.
    let mut other_args = args.to_vec();
    other_args[4] = "model.layer_sharing=-";
    let e = fails(&other_args);
    assert!(e.contains("--out") && e.contains("different sweep"), "{e}");
    let e = fails(&["sweep", "--config", p(&config), "--budget-minutes", "0", "--out", p(&dir.path().join("x"))]);
    assert!(e.contains("--budget-minutes"), "{e}");
    assert!(!Path::new(&dir.path().join("x")).exists(), "nothing written for bad input");
}

/// Named variants (`--variant NAME:KEY=V;...`) are a list, not a grid, may name their own data,
/// and `--early-exit` adds each model's early-exit bits per byte, average depth and decoding
/// speeds (full depth through the same step: the exit that never fires has the full bits/byte).
#[test]
fn named_variants_train_as_a_list_and_report_early_exit() {
    let (dir, config, stories, other) = setup();
    let out = dir.path().join("sweep");
    let other_data = format!("other:data={}", other.display());
    let args = [
        "sweep", "--config", p(&config), "--data", p(&stories), "--budget-minutes", "2", "--eval-data", p(&stories), "--early-exit", "0.0",
        "--variant", "base:", "--variant", "layerskip:train.layer_skip.max_dropout=0.2;train.layer_skip.exit_loss=0.5",
        "--variant", &other_data, "--out", p(&out), "--json",
    ];
    let report = json(&args);
    let rows = report["variants"].as_array().unwrap();
    let labels: Vec<&str> = rows.iter().map(|r| r["variant"].as_str().unwrap()).collect();
    assert_eq!(labels, ["base", "layerskip", "other"], "{report}");
    let cfg = std::fs::read_to_string(out.join(rows[1]["dir"].as_str().unwrap()).join("config.toml")).unwrap();
    assert!(cfg.contains("exit_loss = 0.5"), "{cfg}");
    for r in rows {
        let e = &r["exit"];
        assert_eq!(e["average_depth"].as_f64(), Some(1.0), "a threshold of 0 exits after the first layer: {r}");
        assert_eq!(e["depth"].as_u64(), Some(2), "{r}");
        assert!(e["bpb"].as_f64().unwrap() > 0.0 && e["tokens_per_s"].as_f64().unwrap() > 0.0 && e["full_tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert_ne!(rows[2]["val_bpb"], rows[0]["val_bpb"], "the variant trained on its own data");
    let md = std::fs::read_to_string(out.join("sweep.md")).unwrap();
    assert!(md.contains("early-exit bits/byte") && md.contains("1.00 of 2"), "{md}");
}
