//! llama2.c from the command line: `stlm export llama2c` -> llama2.c's own run.c (built here
//! from the source `cargo xtask` fetches, see xtask/src/llama2c.rs) generates stlm's greedy
//! token ids and, through `stlm import llama2c`'s converted tokenizer, the same text as
//! `stlm generate`; an imported checkpoint generates, evaluates, fine-tunes and exports again;
//! bad input is one error line.

mod common;

use common::{fails, json, ok, p, stlm};
use std::path::{Path, PathBuf};
use std::process::Command;
use stlm_model::{DecoderModel, GenerationConfig, ModelConfig};
use stlm_tokenizers::llama2c::NO_MERGE_SCORE;
use stlm_tokenizers::Llama2cVocab;
use tch::Device;

/// A random llama2.c-shaped model (multi-head: the run.c at hand predates grouped queries).
fn model_config(vocab: i64) -> ModelConfig {
    ModelConfig {
        vocab_size: vocab,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 4,
        max_position_embeddings: 64,
        norm_eps: 1e-5,
        initializer_range: 0.3,
        ..ModelConfig::llama()
    }
}

/// A sentencepiece-style vocabulary: unk, BOS, EOS, optionally the 256 byte pieces, characters,
/// and pieces made by merges in score order.
fn story_vocab(bytes: bool) -> Llama2cVocab {
    let mut pieces: Vec<Vec<u8>> = vec![b"<unk>".to_vec(), b"\n<s>\n".to_vec(), b"\n</s>\n".to_vec()];
    let mut scores = vec![0.0; 3];
    if bytes {
        pieces.extend((0..=255u8).map(|b| format!("<0x{b:02X}>").into_bytes()));
        scores.resize(pieces.len(), 0.0);
    }
    for c in " abcdefghijklmnopqrstuvwxyzOT.,!'".chars() {
        pieces.push(c.to_string().into_bytes());
        scores.push(NO_MERGE_SCORE);
    }
    let merges = [
        " t", "he", " the", " a", "on", " s", "ed", " w", "as", " was", "in", " O", " On", " Onc", " Once", " u", " up", " upon",
        "im", " tim", " time", " an", " and", "li", " l", " li", " lit", " litt", " littl", " little", " f", " fo", " fox",
    ];
    for (rank, m) in merges.iter().enumerate() {
        pieces.push(m.as_bytes().to_vec());
        scores.push(-(rank as f32));
    }
    Llama2cVocab::new(pieces, scores).unwrap()
}

/// llama2.c's run.c, compiled into `dir`; `None` (the test skips) where the xtask did not
/// provide the source, which `cargo xtask test` always does.
fn run_c(dir: &Path) -> Option<PathBuf> {
    let Some(src) = std::env::var_os("STLM_LLAMA2C_RUN_C") else {
        assert!(
            std::env::var_os("STLM_REQUIRE_PYTHON").is_none(),
            "STLM_LLAMA2C_RUN_C is not set: `cargo xtask test` fetches llama2.c's run.c and sets it"
        );
        eprintln!("skipping: STLM_LLAMA2C_RUN_C is not set (run through `cargo xtask test`)");
        return None;
    };
    let exe = dir.join("run");
    let out = Command::new("cc").args(["-O2", "-o"]).arg(&exe).arg(&src).arg("-lm").output().expect("a C compiler (cc) runs");
    assert!(out.status.success(), "cc run.c: {}", String::from_utf8_lossy(&out.stderr));
    Some(exe)
}

/// What run.c prints for `steps` positions from BOS (forcing `prompt`'s tokens first), between
/// its `<s>` line and its speed line.
fn run_c_text(exe: &Path, dir: &Path, checkpoint: &Path, steps: usize, prompt: Option<&str>) -> String {
    let mut cmd = Command::new(exe);
    cmd.arg(checkpoint).args(["0.0", &steps.to_string()]).current_dir(dir);
    if let Some(prompt) = prompt {
        cmd.arg(prompt);
    }
    let out = cmd.output().expect("run.c runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "run.c failed: {stdout}");
    let body = stdout.strip_prefix("<s>\n").unwrap_or_else(|| panic!("run.c output: {stdout}"));
    body.rsplit_once("\nachieved tok/s").unwrap_or_else(|| panic!("run.c output: {stdout}")).0.to_string()
}

fn save(model: &DecoderModel, dir: &Path, tokenizer: Option<&Path>) {
    model.save(dir, tokenizer).expect("model directory");
}

#[test]
fn run_c_generates_stlms_greedy_token_ids() {
    let dir = tempfile::tempdir().unwrap();
    let Some(exe) = run_c(dir.path()) else { return };
    // Pieces of three digits: run.c's printed text splits back into token ids.
    let n = 300;
    let vocab = Llama2cVocab::new((0..n).map(|i| format!("{i:03}").into_bytes()).collect(), vec![0.0; n]).unwrap();
    vocab.write(&dir.path().join("tokenizer.bin")).unwrap();
    for tied in [true, false] {
        tch::manual_seed(7);
        let m = DecoderModel::new(ModelConfig { tie_word_embeddings: tied, ..model_config(n as i64) }, Device::Cpu).unwrap();
        let model_dir = dir.path().join(format!("model-{tied}"));
        save(&m, &model_dir, None);
        let bin = dir.path().join("model.bin");
        ok(&["export", "llama2c", "--model", p(&model_dir), "--out", p(&bin)]);
        let steps = 48;
        let text = run_c_text(&exe, dir.path(), &bin, steps, None);
        let theirs: Vec<i64> = text.as_bytes().chunks(3).map(|c| std::str::from_utf8(c).unwrap().parse().unwrap()).collect();
        let mut model = stlm_model::load_model(&model_dir, Device::Cpu, stlm_core::DType::Float32).unwrap();
        model.optimize_for_decoding();
        let cfg = GenerationConfig { max_new_tokens: steps as i64, temperature: 0.0, ..Default::default() };
        let ours = stlm_model::generate(&model, &[vec![1]], &cfg, |_, _| {}).unwrap().remove(0);
        assert_eq!(theirs, ours, "tied={tied}: run.c and stlm pick different greedy tokens");
        assert!(ours.iter().collect::<std::collections::HashSet<_>>().len() > 3, "a degenerate sample proves little: {ours:?}");
    }
}

#[test]
fn run_c_prints_stlm_generates_text_through_the_converted_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let Some(exe) = run_c(dir.path()) else { return };
    // No byte pieces: this run.c prints `<0xNN>` pieces as they are written.
    let vocab = story_vocab(false);
    let tokenizer_bin = dir.path().join("tokenizer.bin");
    vocab.write(&tokenizer_bin).unwrap();
    tch::manual_seed(3);
    let m = DecoderModel::new(model_config(vocab.len() as i64), Device::Cpu).unwrap();
    {
        // The specials never win greedy decoding (run.c prints them, `stlm generate` skips them).
        let _g = tch::no_grad_guard();
        let _ = m.var_store().variables()["lm_head.weight"].narrow(0, 0, 3).fill_(0.0);
    }
    let model_dir = dir.path().join("model");
    save(&m, &model_dir, None);
    let bin = dir.path().join("model.bin");
    ok(&["export", "llama2c", "--model", p(&model_dir), "--out", p(&bin)]);
    // Import the checkpoint and tokenizer as a user would, and generate from the import.
    let imported = dir.path().join("imported");
    ok(&["import", "llama2c", "--checkpoint", p(&bin), "--tokenizer", p(&tokenizer_bin), "--out", p(&imported)]);
    let prompt = "Once upon a time";
    let prompt_ids = vocab.encode(prompt, true);
    assert_eq!(prompt_ids.len(), 5, "BOS, ` Once`, ` upon`, ` a`, ` time`");
    let new = 24;
    let ours = ok(&["generate", "--model", p(&imported), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", &new.to_string(), "--ignore-eos"]);
    // This run.c adds no dummy prefix to the prompt: give it the space that the current run.c
    // (and the converted tokenizer) put in front.
    let theirs = run_c_text(&exe, dir.path(), &bin, prompt_ids.len() - 1 + new, Some(&format!(" {prompt}")));
    assert_eq!(ours.trim_end_matches('\n'), theirs);
    assert!(theirs.starts_with(prompt) && theirs.len() > prompt.len() + 10, "{theirs}");
}

#[test]
fn an_imported_checkpoint_generates_evaluates_fine_tunes_and_exports_again() {
    let dir = tempfile::tempdir().unwrap();
    let vocab = story_vocab(true);
    let tokenizer_bin = dir.path().join("tokenizer.bin");
    vocab.write(&tokenizer_bin).unwrap();
    tch::manual_seed(5);
    let m = DecoderModel::new(model_config(vocab.len() as i64), Device::Cpu).unwrap();
    let model_dir = dir.path().join("model");
    save(&m, &model_dir, None);
    let data = common::write_stories(dir.path());
    for version in ["0", "1", "2"] {
        let bin = dir.path().join(format!("v{version}.bin"));
        let r = json(&["export", "llama2c", "--model", p(&model_dir), "--out", p(&bin), "--version", version, "--json"]);
        assert_eq!(r["version"], version.parse::<u64>().unwrap());
        assert_eq!(r["bytes"], std::fs::metadata(&bin).unwrap().len());
        assert_eq!(r["group_size"].as_u64(), (version == "2").then_some(64));
        let out = dir.path().join(format!("imported-{version}"));
        let r = json(&["import", "llama2c", "--checkpoint", p(&bin), "--tokenizer", p(&tokenizer_bin), "--out", p(&out), "--json"]);
        assert_eq!(r["checkpoint"]["version"], version.parse::<u64>().unwrap());
        assert_eq!(r["checkpoint"]["dim"], 64);
        assert!(out.join("tokenizer.json").is_file() && out.join("config.json").is_file());
    }
    let imported = dir.path().join("imported-0");
    let text = ok(&["generate", "--model", p(&imported), "--prompt", "Once upon a time", "--max-new-tokens", "8", "--temperature", "0"]);
    assert!(text.starts_with("Once upon a time"), "{text}");
    let ppl = json(&["eval", "ppl", "--model", p(&imported), "--data", p(&data), "--json"]);
    let before = ppl["ppl"].as_f64().expect("ppl");
    // Fine-tune the import (its config and tokenizer become the run's) and evaluate again.
    let config = dir.path().join("ft.toml");
    std::fs::write(&config, "[model]\npreset = \"llama\"\n\n[train]\nmax_steps = 20\nbatch_size = 8\nseq_len = 48\nlog_every = 5\neval_every = 100\nlr = 3e-3\nwarmup_steps = 2\n\n[data]\nval_fraction = 0.1\n").unwrap();
    let run = dir.path().join("ft");
    ok(&["train", "--config", p(&config), "--init", p(&imported), "--data", p(&data), "--out", p(&run), "--samples", "0"]);
    let tuned = run.join("model");
    let after = json(&["eval", "ppl", "--model", p(&tuned), "--data", p(&data), "--json"])["ppl"].as_f64().unwrap();
    assert!(after < before * 0.8, "fine-tuning lowers the perplexity: {before} -> {after}");
    // The fine-tuned model goes back to llama2.c with its tokenizer.
    let bin = dir.path().join("tuned.bin");
    let tok_out = dir.path().join("tuned-tokenizer.bin");
    ok(&["export", "llama2c", "--model", p(&tuned), "--out", p(&bin), "--tokenizer-out", p(&tok_out)]);
    let back = Llama2cVocab::read(&tok_out).unwrap();
    for text in ["Once upon a time, the little fox was on the mat.", "Tom and the dog!"] {
        assert_eq!(back.encode(text, true), vocab.encode(text, true), "{text}");
    }
}

#[test]
fn bad_input_is_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let m = DecoderModel::new(model_config(40), Device::Cpu).unwrap();
    let model_dir = dir.path().join("model");
    save(&m, &model_dir, None);
    let bin = dir.path().join("m.bin");
    ok(&["export", "llama2c", "--model", p(&model_dir), "--out", p(&bin), "--version", "1"]);
    let bytes = std::fs::read(&bin).unwrap();
    std::fs::write(&bin, &bytes[..bytes.len() - 100]).unwrap();
    let out = dir.path().join("out");
    let e = fails(&["import", "llama2c", "--checkpoint", p(&bin), "--out", p(&out)]);
    assert!(e.contains("m.bin") && e.contains("truncated"), "{e}");
    assert!(!out.exists());
    // A tokenizer of another size than the checkpoint's vocabulary.
    std::fs::write(&bin, &bytes).unwrap();
    let tok = dir.path().join("tokenizer.bin");
    story_vocab(false).write(&tok).unwrap();
    let e = fails(&["import", "llama2c", "--checkpoint", p(&bin), "--tokenizer", p(&tok), "--out", p(&out)]);
    assert!(e.contains("tokenizer.bin") && e.contains("vocabulary of 40"), "{e}");
    // A model llama2.c cannot hold.
    let g = DecoderModel::new(ModelConfig { vocab_size: 40, hidden_size: 32, num_attention_heads: 4, ..ModelConfig::gpt2() }, Device::Cpu).unwrap();
    let gpt2 = dir.path().join("gpt2");
    save(&g, &gpt2, None);
    let e = fails(&["export", "llama2c", "--model", p(&gpt2), "--out", p(&dir.path().join("g.bin"))]);
    assert!(e.contains("norm = LayerNorm"), "{e}");
    let e = fails(&["export", "llama2c", "--model", p(&model_dir), "--out", p(&dir.path().join("g.bin")), "--tokenizer-out", p(&tok)]);
    assert!(e.contains("no tokenizer.json"), "{e}");
    assert!(stlm(&["export", "llama2c", "--model", p(&model_dir), "--out", p(&bin), "--version", "3"]).status.code() == Some(2));
}

#[test]
fn an_stlm_tokenizer_exports_with_its_document_start_at_run_cs_bos() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::write_stories(dir.path());
    let tok = dir.path().join("tokenizer.json");
    ok(&["tokenizer", "train", "--files", p(&data), "--vocab-size", "300", "--out", p(&tok)]);
    tch::manual_seed(2);
    let m = DecoderModel::new(ModelConfig { tie_word_embeddings: false, ..model_config(300) }, Device::Cpu).unwrap();
    let model_dir = dir.path().join("model");
    save(&m, &model_dir, Some(&tok));
    let (bin, tok_bin) = (dir.path().join("m.bin"), dir.path().join("tokenizer.bin"));
    let r = json(&["export", "llama2c", "--model", p(&model_dir), "--out", p(&bin), "--tokenizer-out", p(&tok_bin), "--json"]);
    assert_eq!(r["swapped_ids"], serde_json::json!([1, 0]), "<|endoftext|> (0) goes to run.c's BOS (1)");
    let vocab = Llama2cVocab::read(&tok_bin).unwrap();
    assert_eq!((vocab.piece(1), vocab.piece(0)), (Some(&b"<|endoftext|>"[..]), Some(&b"<|pad|>"[..])));
    // Byte-level pieces become the bytes they stand for: a space-prefixed word is " Once"-like.
    assert!((0..vocab.len() as u32).any(|i| vocab.piece(i).is_some_and(|p| p.starts_with(b" ") && p.len() > 2)));
    let back = dir.path().join("back");
    ok(&["import", "llama2c", "--checkpoint", p(&bin), "--out", p(&back)]);
    let b = stlm_model::load_model(&back, Device::Cpu, stlm_core::DType::Float32).unwrap();
    let (ours, theirs) = (m.var_store().variables(), b.var_store().variables());
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let (o, t) = (&ours[name], &theirs[name]);
        assert_eq!(o.get(0), t.get(1), "{name}");
        assert_eq!(o.get(1), t.get(0), "{name}");
        assert_eq!(o.narrow(0, 2, 298), t.narrow(0, 2, 298), "{name}");
    }
}
