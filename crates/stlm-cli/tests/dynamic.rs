//! Dynamic depth from the command line: `stlm train` with `[train] layer_skip` (and its exact
//! resume), `stlm generate --self-speculative` printing greedy decoding's text, `--early-exit`
//! reporting the average depth, `stlm eval ppl --early-exit`, and the refusals.

mod common;

use common::{fails, json, ok, p, stlm};
use std::path::Path;

const CONFIG: &str = "[model]\npreset = \"llama\"\nvocab_size = 320\nhidden_size = 32\nintermediate_size = 64\nnum_hidden_layers = 3\nnum_attention_heads = 4\nmax_position_embeddings = 64\n\n[train]\nmax_steps = 8\nbatch_size = 4\nseq_len = 32\nlog_every = 1\neval_every = 4\neval_batches = 2\nsave_every = 3\nkeep_last = 0\nwarmup_steps = 2\nLAYER_SKIP\n[data]\nval_fraction = 0.1\n";

fn losses(run: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].to_string()).collect()
}

#[test]
fn layer_skip_trains_resumes_and_its_model_decodes_with_dynamic_depth() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::write_stories(dir.path());
    let train = |name: &str, skip: &str, extra: &[&str]| {
        let config = dir.path().join(format!("{name}.toml"));
        std::fs::write(&config, CONFIG.replace("LAYER_SKIP", skip)).unwrap();
        let run = dir.path().join(name);
        let mut args = vec!["train", "--config", p(&config), "--data", p(&data), "--out", p(&run), "--samples", "0"];
        args.extend(extra);
        let out = stlm(&args);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        run
    };
    let plain = train("plain", "", &[]);
    let run = train("skip", "layer_skip = { max_dropout = 0.5, exit_loss = 0.5 }\n", &[]);
    let full = losses(&run);
    assert_eq!(full.len(), 8);
    assert_ne!(full, losses(&plain), "layer dropout and exit losses change training");
    let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(saved.contains("layer_skip") && saved.contains("max_dropout = 0.5"), "{saved}");
    // Lose the last checkpoints and resume: the skipped layers are drawn again the same way.
    for gone in ["step-0000006", "step-0000008"] {
        std::fs::remove_dir_all(run.join("checkpoints").join(gone)).unwrap();
    }
    train("skip", "layer_skip = { max_dropout = 0.5, exit_loss = 0.5 }\n", &["--resume"]);
    assert_eq!(losses(&run), full, "a resumed LayerSkip run logs the same losses");

    let model = run.join("model");
    let generate = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", p(&model), "--prompt", "Once upon a time", "--max-new-tokens", "24", "--ignore-eos"];
        args.extend(extra);
        let out = stlm(&args);
        assert!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
        (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (greedy, _) = generate(&["--temperature", "0"]);
    for layers in ["1", "2"] {
        let (text, err) = generate(&["--self-speculative", layers, "--draft-tokens", "3"]);
        assert_eq!(text, greedy, "--self-speculative {layers}: greedy decoding's text");
        assert!(err.contains("drafts accepted") && err.contains("tokens/s"), "{err}");
    }
    let (_, err) = generate(&["--temperature", "0", "--early-exit", "0", "--exit-min-layers", "2"]);
    assert!(err.contains("average depth 2.00 of 3 layers") && err.contains("tokens/s"), "{err}");
    let (never, err) = generate(&["--temperature", "0", "--early-exit", "1.5"]);
    assert_eq!(never, greedy, "an exit that never fires is full-depth decoding");
    assert!(err.contains("average depth 3.00 of 3"), "{err}");

    let base = json(&["eval", "ppl", "--model", p(&model), "--data", p(&data), "--max-length", "32", "--json"]);
    let exit = json(&["eval", "ppl", "--model", p(&model), "--data", p(&data), "--max-length", "32", "--json", "--early-exit", "1.5"]);
    let (a, b) = (base["loss"].as_f64().unwrap(), exit["loss"].as_f64().unwrap());
    assert!((a - b).abs() < 1e-4, "full-depth scoring one position at a time: {a} vs {b}");
    assert_eq!(exit["average_depth"].as_f64(), Some(3.0));
    assert!(base.get("average_depth").is_none());
    let shallow = ok(&["eval", "ppl", "--model", p(&model), "--data", p(&data), "--max-length", "32", "--early-exit", "0", "--exit-min-layers", "1"]);
    assert!(shallow.contains("average depth 1.00 of 3 layers"), "{shallow}");

    // Refusals name the option.
    let two = ["generate", "--model", p(&model), "--prompt", "a", "--prompt", "b", "--early-exit", "0.5"];
    assert!(fails(&two).contains("one --prompt"));
    let deep = ["generate", "--model", p(&model), "--prompt", "a", "--early-exit", "0.5", "--exit-min-layers", "4"];
    assert!(fails(&deep).contains("--exit-min-layers 4"));
    let all = ["generate", "--model", p(&model), "--prompt", "a", "--self-speculative", "3"];
    assert!(fails(&all).contains("--self-speculative 3"));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, CONFIG.replace("LAYER_SKIP", "layer_skip = { max_dropout = 1.0 }\n")).unwrap();
    let e = fails(&["train", "--config", p(&bad), "--data", p(&data), "--out", p(&dir.path().join("bad"))]);
    assert!(e.contains("train.layer_skip") && e.contains("max_dropout"), "{e}");
}
