//! The `stlm` binary end to end: a tokenizer, a model directory, generation, logits, evaluation,
//! inspection and a benchmark run; and every kind of bad input gives a one-line error, a non-zero
//! exit, no panic, and nothing half-written on disk.

mod common;

use common::{fails, ok, p, stlm};
use std::path::{Path, PathBuf};

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

/// A trained tokenizer and a tiny model directory.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let corpus = root.join("corpus.txt");
    let story = "Once upon a time, a little cat named Tom lived in a big house. Tom liked to play with a red ball.\n\nOne day, Lily saw a bird in the sky. \"Look!\" she said. The bird sang a happy song.<|endoftext|>";
    std::fs::write(&corpus, story.repeat(50)).unwrap();
    let tok = root.join("tokenizer.json");
    ok(&["tokenizer", "train", "--files", p(&corpus), "--vocab-size", "300", "--out", p(&tok)]);
    let config = root.join("tiny.toml");
    std::fs::write(&config, "preset = \"llama\"\nvocab_size = 300\nhidden_size = 32\nintermediate_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\nnum_key_value_heads = 2\nmax_position_embeddings = 128\n").unwrap();
    ok(&["init", "--config", p(&config), "--out", p(&root.join("model")), "--tokenizer", p(&tok)]);
    Fixture { _dir: dir, root }
}

#[test]
fn jobs_run_end_to_end() {
    let f = fixture();
    let model = f.root.join("model");
    let tok = f.root.join("tokenizer.json");

    let ids = ok(&["tokenizer", "encode", "--tokenizer", p(&tok), "--text", "Tom liked the bird. ✓"]);
    let text = ok(&["tokenizer", "decode", "--tokenizer", p(&tok), "--ids", ids.trim()]);
    assert_eq!(text.trim_end_matches('\n'), "Tom liked the bird. ✓");

    let out = ok(&["generate", "--model", p(&model), "--prompt", "Once upon", "--max-new-tokens", "8", "--seed", "3"]);
    assert!(out.starts_with("Once upon"), "{out}");
    let batch = ok(&[
        "generate",
        "--model",
        p(&model),
        "--prompt",
        "Tom",
        "--prompt",
        "One day, Lily",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
    ]);
    assert!(batch.contains("--- [1]\nOne day, Lily"), "{batch}");

    let logits = f.root.join("logits.safetensors");
    ok(&["logits", "--model", p(&model), "--ids", "1,2,3,4", "--out", p(&logits)]);
    let t = &stlm_core::read_safetensors(&logits).unwrap()["logits"];
    assert_eq!(t.size(), vec![4, 300]);
    assert_eq!(t.kind(), tch::Kind::Float);

    let data = f.root.join("corpus.txt");
    let json: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        "ppl",
        "--model",
        p(&model),
        "--data",
        p(&data),
        "--max-length",
        "64",
        "--json",
    ]))
    .unwrap();
    for key in ["tokens", "bytes", "loss", "ppl", "bits_per_byte"] {
        assert!(json[key].is_number(), "missing {key}: {json}");
    }
    assert_eq!(json["bytes"], std::fs::metadata(&data).unwrap().len());
    // An untrained model is close to uniform over the vocabulary.
    let loss = json["loss"].as_f64().unwrap();
    assert!((loss - (300f64).ln()).abs() < 0.5, "loss {loss}");

    let inspect: serde_json::Value = serde_json::from_str(&ok(&["inspect", "--model", p(&model), "--json"])).unwrap();
    let params = inspect["parameters"].as_i64().unwrap();
    let sum: i64 = inspect["modules"].as_array().unwrap().iter().map(|m| m["total"].as_i64().unwrap()).sum();
    assert_eq!(params, sum);
    assert_eq!(inspect["embedding_parameters"].as_i64().unwrap(), 2 * 300 * 32);
    assert!(ok(&["inspect", "--model", p(&model)]).contains("model.layers.1"));

    let bench: serde_json::Value = serde_json::from_str(&ok(&[
        "bench",
        "generate",
        "--model",
        p(&model),
        "--new-tokens",
        "8",
        "--repeats",
        "1",
        "--json",
    ]))
    .unwrap();
    assert!(bench["tokens_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn bad_input_gives_one_line_errors_and_writes_nothing() {
    let f = fixture();
    let model = f.root.join("model");
    let tok = f.root.join("tokenizer.json");

    let e = fails(&["inspect", "--model", p(&f.root.join("missing"))]);
    assert!(e.contains("missing") && e.contains("does not exist"), "{e}");

    // A broken copy of the model directory for each kind of damage.
    let broken = |name: &str, edit: &dyn Fn(&Path)| -> PathBuf {
        let d = f.root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for file in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::fs::copy(model.join(file), d.join(file)).unwrap();
        }
        edit(&d);
        d
    };
    let config_text = std::fs::read_to_string(model.join("config.json")).unwrap();
    let d = broken("wrong-type", &|d| {
        std::fs::write(d.join("config.json"), config_text.replace("\"hidden_size\": 32", "\"hidden_size\": [32]"))
            .unwrap()
    });
    let e = fails(&["inspect", "--model", p(&d)]);
    assert!(e.contains("config.json") && e.contains("hidden_size"), "{e}");

    let d = broken("unknown-arch", &|d| {
        std::fs::write(d.join("config.json"), config_text.replace("\"llama\"", "\"mamba\"")).unwrap()
    });
    let e = fails(&["inspect", "--model", p(&d)]);
    assert!(e.contains("config.json") && e.contains("mamba"), "{e}");

    let d = broken("truncated", &|d| {
        let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
        std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() - 100]).unwrap();
    });
    let e = fails(&["generate", "--model", p(&d), "--prompt", "Tom"]);
    assert!(e.contains("model.safetensors"), "{e}");

    let d = broken("shapes", &|d| {
        std::fs::write(
            d.join("config.json"),
            config_text.replace("\"intermediate_size\": 64", "\"intermediate_size\": 65"),
        )
        .unwrap()
    });
    let e = fails(&["inspect", "--model", p(&d)]);
    assert!(e.contains("model.safetensors") && e.contains("shape"), "{e}");

    let d = broken("bad-tokenizer", &|d| std::fs::write(d.join("tokenizer.json"), "{\"model\": 3").unwrap());
    let e = fails(&["generate", "--model", p(&d), "--prompt", "Tom"]);
    assert!(e.contains("tokenizer.json"), "{e}");

    let out = f.root.join("out.safetensors");
    let e = fails(&["logits", "--model", p(&model), "--ids", "1,2,300", "--out", p(&out)]);
    assert!(e.contains("300") && e.contains("vocabulary"), "{e}");
    let e = fails(&["logits", "--model", p(&model), "--ids", "1,x", "--out", p(&out)]);
    assert!(e.contains("`x`"), "{e}");
    assert!(!out.exists(), "a failed job wrote its output");

    let e = fails(&["generate", "--model", p(&model), "--prompt", ""]);
    assert!(e.contains("empty"), "{e}");
    let e = fails(&["generate", "--model", p(&model), "--prompt", "Tom", "--top-p", "2"]);
    assert!(e.contains("--top-p"), "{e}");
    let e = fails(&["tokenizer", "decode", "--tokenizer", p(&tok), "--ids", "5,99999"]);
    assert!(e.contains("99999"), "{e}");
    let e = fails(&["eval", "ppl", "--model", p(&model), "--data", p(&f.root.join("nope.txt"))]);
    assert!(e.contains("nope.txt"), "{e}");
    let e = fails(&["generate", "--model", p(&model), "--prompt", "Tom", "--device", "cuda:7"]);
    assert!(e.contains("cuda:7"), "{e}");

    // Nothing but the files we wrote is in the model directory (no temporaries).
    let mut names: Vec<String> =
        std::fs::read_dir(&model).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["config.json", "generation_config.json", "model.safetensors", "stlm.toml", "tokenizer.json"]);
}

#[test]
fn bench_attention_and_train_report_json() {
    for per_expert in [false, true] {
        let mut args = vec!["bench", "moe", "--router", "switch", "--experts", "4", "--hidden", "16", "--expert-width", "8", "--tokens", "64", "--repeats", "1", "--json"];
        args.extend(per_expert.then_some("--per-expert"));
        let v: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
        assert_eq!((v["router"].as_str(), v["top_k"].as_i64()), (Some("switch"), Some(1)), "{v}");
        assert!(v["ms"].as_f64().unwrap() > 0.0 && v["dense_ms"].as_f64().unwrap() > 0.0, "{v}");
        assert_eq!(v["dispatch"], if per_expert { "per-expert" } else { "grouped" }, "{v}");
    }
    let err = fails(&["bench", "moe", "--top-k", "9"]);
    assert!(err.contains("`k`"), "{err}");
    for (kind, extra) in [("linformer", "--linformer-k=16"), ("doge-dma", "--window=8"), ("ssmax", "--p=2")] {
        let out = ok(&["bench", "attention", "--kind", kind, "--seq", "48", extra, "--repeats", "1", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["kind"], kind);
        assert!(v["ms"].as_f64().unwrap() > 0.0, "{v}");
    }
    let out = ok(&[
        "bench",
        "attention",
        "--kind",
        "sliding-window",
        "--seq",
        "96",
        "--window",
        "16",
        "--repeats",
        "1",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["kind"], "sliding-window");
    assert_eq!(v["seq"], 96);
    assert!(v["ms"].as_f64().unwrap() > 0.0 && v["dense_ms"].as_f64().unwrap() > 0.0, "{v}");
    let out = ok(&[
        "bench",
        "attention",
        "--kind",
        "fixed-sparse",
        "--seq",
        "96",
        "--block",
        "16",
        "--summary",
        "4",
        "--repeats",
        "1",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["kind"].as_str(), v["block"].as_i64()), (Some("fixed-sparse"), Some(16)), "{v}");
    let out = ok(&[
        "bench",
        "attention",
        "--kind",
        "strided-sparse",
        "--seq",
        "80",
        "--block",
        "8",
        "--repeats",
        "1",
        "--json",
    ]);
    assert!(out.contains("\"kind\":\"strided-sparse\""), "{out}");
    let err = fails(&["bench", "attention", "--kind", "fixed-sparse", "--block", "4", "--summary", "5"]);
    assert!(err.contains("--summary"), "{err}");
    let err = fails(&["bench", "attention", "--kind", "flash-magic", "--seq", "8"]);
    assert!(err.contains("flash-magic") && err.contains("sliding-window"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tiny.toml");
    std::fs::write(
        &config,
        "[model]\nvocab_size = 64\nhidden_size = 32\nintermediate_size = 64\nnum_hidden_layers = 1\nnum_attention_heads = 2\nmax_position_embeddings = 32\n[train]\nbatch_size = 2\nseq_len = 16\n",
    )
    .unwrap();
    let out = ok(&["bench", "train", "--config", p(&config), "--steps", "2", "--warmup", "1", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for key in ["tokens_per_s", "step_ms", "mfu", "params"] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key}: {v}");
    }
}

/// `tokenizer bytes`, `tokenizer chunk` and `plot`: outputs, and errors naming the bad value.
#[test]
fn byte_tokenizer_chunks_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("bytes.json");
    ok(&["tokenizer", "bytes", "--out", p(&tok)]);
    let ids = ok(&["tokenizer", "encode", "--tokenizer", p(&tok), "--text", "hé"]);
    assert_eq!(ids.trim(), "104,195,169");
    let out = ok(&["tokenizer", "chunk", "--chunker", "{ kind = \"whitespace\", max_len = 4 }", "--text", "Once upon a time", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["chunks"], serde_json::json!(["Once", " upo", "n", " a", " tim", "e"]), "{v}");
    let e = fails(&["tokenizer", "chunk", "--chunker", "{ kind = \"fixed\", size = 0 }", "--text", "x"]);
    assert!(e.contains("size"), "{e}");
    let e = fails(&["tokenizer", "chunk", "--chunker", "{ kind = \"words\" }", "--text", "x"]);
    assert!(e.contains("--chunker") && e.contains("words"), "{e}");

    let csv = dir.path().join("curve.csv");
    std::fs::write(&csv, "model,seconds,bpb\nbytes,60,3.1\nbpe,60,2.9\nbytes,120,2.5\nbpe,120,2.6\n").unwrap();
    let svg = dir.path().join("curve.svg");
    ok(&["plot", "--csv", p(&csv), "--x", "seconds", "--y", "bpb", "--group", "model", "--out", p(&svg)]);
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
    let e = fails(&["plot", "--csv", p(&csv), "--x", "minutes", "--y", "bpb", "--out", p(&svg)]);
    assert!(e.contains("minutes") && e.contains("curve.csv"), "{e}");
}

/// `eval mc` and `eval suite` on hand-made MosaicML and HellaSwag files: the JSON keys, per-item
/// samples, limits, few-shot, skipped tasks, and errors naming the file and item.
#[test]
fn benchmarks_and_suites() {
    let f = fixture();
    let model = f.root.join("model");
    let data = f.root.join("eval");
    std::fs::create_dir(&data).unwrap();
    let arc = "{\"query\": \"Question: What did Tom like?\", \"choices\": [\"a red ball\", \"a bird\", \"the sky\", \"a song\"], \"gold\": 0}\n\
{\"query\": \"Question: Who saw a bird?\", \"choices\": [\"Tom\", \"Lily\"], \"gold\": 1}\n\
{\"query\": \"Question: Where did Tom live?\", \"choices\": [\"in a big house\", \"in the sky\", \"in a ball\"], \"gold\": 0}\n";
    std::fs::write(data.join("arc_easy.jsonl"), arc).unwrap();
    std::fs::write(
        data.join("winogrande.jsonl"),
        "{\"context_options\": [\"Tom gave Lily the ball so Tom\", \"Tom gave Lily the ball so Lily\"], \"continuation\": \"had it.\", \"gold\": 1}\n",
    )
    .unwrap();
    std::fs::write(data.join("hellaswag_val_full.txt"), "Playing: A cat plays with a ball. it\n0\nruns after it.\nsings.\nflies away.\nis a house.\n").unwrap();
    let samples = f.root.join("samples.jsonl");
    let out = ok(&["eval", "mc", "--model", p(&model), "--task", "arc_easy", "--data", p(&data.join("arc_easy.jsonl")), "--json", "--log-samples", p(&samples)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for key in ["task", "n", "acc", "acc_norm", "acc_stderr", "acc_norm_stderr"] {
        assert!(v.get(key).is_some(), "no {key}: {v}");
    }
    assert_eq!((v["task"].as_str(), v["n"].as_u64()), (Some("arc_easy"), Some(3)));
    let items: Vec<serde_json::Value> = std::fs::read_to_string(&samples).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(items.len(), 3);
    assert_eq!(items[0]["requests"][0], serde_json::json!(["Question: What did Tom like?\nAnswer:", " a red ball"]));
    assert_eq!(items[1]["logprobs"].as_array().unwrap().len(), 2);
    let acc = items.iter().map(|i| i["acc"].as_f64().unwrap()).sum::<f64>() / 3.0;
    assert!((acc - v["acc"].as_f64().unwrap()).abs() < 1e-12);
    let out = ok(&["eval", "mc", "--model", p(&model), "--task", "arc_easy", "--data", p(&data.join("arc_easy.jsonl")), "--json", "--limit", "2", "--shots", "1"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["n"].as_u64(), v["shots"].as_u64()), (Some(2), Some(1)));

    let out = stlm(&["eval", "suite", "--model", p(&model), "--data-dir", p(&data), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let run: Vec<&str> = v["tasks"].as_array().unwrap().iter().map(|t| t["task"].as_str().unwrap()).collect();
    assert_eq!(run, ["arc_easy", "hellaswag", "winogrande"]);
    let skipped: Vec<&str> = v["skipped"].as_array().unwrap().iter().map(|s| s[0].as_str().unwrap()).collect();
    assert_eq!(skipped, ["mmlu", "triviaqa", "arc_challenge", "piqa", "openbookqa"]);
    let table = String::from_utf8_lossy(&out.stderr);
    assert!(table.contains("| model |") && table.contains("HellaSwag (acc_norm)"), "{table}");
    let md = ok(&["eval", "suite", "--model", p(&model), "--data-dir", p(&data), "--limit", "1"]);
    assert_eq!(md.lines().count(), 3, "{md}");
    // A task that cannot be scored (a continuation longer than the window) is listed as
    // skipped with its error; the others still run.
    let long = format!("{{\"query\": \"Question: x\\n\", \"choices\": [\"{}\", \"b\"], \"gold\": 0}}\n", "a red ball ".repeat(60));
    std::fs::write(data.join("piqa.jsonl"), long).unwrap();
    let out = stlm(&["eval", "suite", "--model", p(&model), "--data-dir", p(&data), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tasks"].as_array().unwrap().len(), 3);
    let piqa = v["skipped"].as_array().unwrap().iter().find(|s| s[0] == "piqa").unwrap();
    assert!(piqa[1].as_str().unwrap().contains("more than the window"), "{piqa}");

    let e = fails(&["eval", "mc", "--model", p(&model), "--task", "arc", "--data", p(&data.join("arc_easy.jsonl"))]);
    assert!(e.contains("unknown task `arc`") && e.contains("arc_easy"), "{e}");
    let bad = f.root.join("bad.jsonl");
    std::fs::write(&bad, format!("{}{{\"query\": \"Question: x\", \"choices\": [\"a\"], \"gold\": 3}}\n", arc.lines().next().unwrap().to_owned() + "\n")).unwrap();
    let e = fails(&["eval", "mc", "--model", p(&model), "--task", "piqa", "--data", p(&bad)]);
    assert!(e.contains("bad.jsonl") && e.contains("item 2") && e.contains("gold 3"), "{e}");
    let e = fails(&["eval", "mc", "--model", p(&model), "--task", "piqa", "--data", p(&data.join("hellaswag_val_full.txt"))]);
    assert!(e.contains("six-line"), "{e}");
    let e = fails(&["eval", "suite", "--model", p(&model), "--data-dir", p(&f.root.join("nowhere"))]);
    assert!(e.contains("nowhere"), "{e}");
}
