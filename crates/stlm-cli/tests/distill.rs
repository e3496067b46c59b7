//! `stlm distill` end to end on a tiny teacher: every logit loss trains a student that `stlm
//! generate` loads; resume continues with the same options only; students start from teacher
//! blocks; the hidden-state term checkpoints its projections; a teacher cache trains a student
//! without the teacher; `stlm generate --corpus` writes a corpus; bad input is one line.

mod common;

use common::{fails, json, ok, p};
use std::path::{Path, PathBuf};

const TEACHER: &str = "[model]\npreset = \"llama\"\nvocab_size = 320\nhidden_size = 32\nintermediate_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\nmax_position_embeddings = 64\n\n[train]\nmax_steps = 6\nbatch_size = 4\nseq_len = 32\nlog_every = 2\neval_every = 6\neval_batches = 1\nsave_every = 6\nkeep_last = 1\nwarmup_steps = 1\n\n[data]\nval_fraction = 0.1\n";

const STUDENT: &str = "[model]\npreset = \"llama\"\nvocab_size = 320\nhidden_size = 16\nintermediate_size = 32\nnum_hidden_layers = 1\nnum_attention_heads = 2\nmax_position_embeddings = 64\n\n[train]\nmax_steps = 4\nbatch_size = 4\nseq_len = 32\nlog_every = 1\neval_every = 2\neval_batches = 1\nsave_every = 2\nkeep_last = 0\nwarmup_steps = 1\n\n[data]\nval_fraction = 0.1\n";

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    data: PathBuf,
    student: PathBuf,
    teacher: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let data = common::write_stories(&root);
    let (teacher_cfg, student) = (root.join("teacher.toml"), root.join("student.toml"));
    std::fs::write(&teacher_cfg, TEACHER).unwrap();
    std::fs::write(&student, STUDENT).unwrap();
    ok(&["train", "--config", p(&teacher_cfg), "--data", p(&data), "--out", p(&root.join("teacher")), "--samples", "0"]);
    Fixture { teacher: root.join("teacher").join("model"), _dir: dir, root, data, student }
}

/// The metrics.jsonl lines of a run as (step, loss) pairs.
fn losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

#[test]
fn every_loss_trains_a_student_and_runs_resume_exactly() {
    let f = fixture();
    fn run_args<'a>(f: &'a Fixture, out: &'a Path) -> Vec<&'a str> {
        vec!["distill", "--teacher", p(&f.teacher), "--student", p(&f.student), "--data", p(&f.data), "--out", p(out), "--json"]
    }
    for loss in ["fkl", "rkl", "js", "tvd", "sfkl", "srkl"] {
        let out = f.root.join(loss);
        let mut args = run_args(&f, &out);
        args.extend(["--loss", loss, "--temperature", "2", "--alpha", "0.7"]);
        if loss == "js" {
            args.extend(["--top-k", "16"]);
        }
        let r = json(&args);
        assert_eq!((r["loss"].as_str(), r["steps"].as_u64()), (Some(loss), Some(4)), "{r}");
        assert!(r["val_loss"].as_f64().unwrap().is_finite() && r["val_bpb"].as_f64().unwrap() > 0.0, "{r}");
        let text = ok(&["generate", "--model", p(&out.join("model")), "--prompt", "Once", "--max-new-tokens", "5"]);
        assert!(text.starts_with("Once"), "{text}");
    }
    // The last checkpoint lost: resuming from step 2 gives the losses of the uninterrupted run.
    let whole = losses(&f.root.join("sfkl"));
    let out = f.root.join("resumed");
    let mut args = run_args(&f, &out);
    args.extend(["--loss", "sfkl", "--temperature", "2", "--alpha", "0.7"]);
    json(&args);
    std::fs::remove_dir_all(out.join("checkpoints").join("step-0000004")).unwrap();
    std::fs::remove_file(out.join("checkpoints").join("latest")).unwrap();
    let mut again = args.clone();
    again.push("--resume");
    json(&again);
    assert_eq!(losses(&out), whole);
    let mut other = run_args(&f, &out);
    other.extend(["--loss", "rkl", "--temperature", "2", "--alpha", "0.7", "--resume"]);
    assert!(fails(&other).contains("options differ"));
}

#[test]
fn students_from_teacher_blocks_hidden_losses_caches_and_corpora() {
    let f = fixture();
    // Teacher block 1 into the one-block student, cut to its width; hidden MSE through a projection.
    let out = f.root.join("init");
    let r = json(&[
        "distill", "--teacher", p(&f.teacher), "--student", p(&f.student), "--data", p(&f.data), "--out", p(&out), "--json",
        "--init", "layers:1", "--hidden-weight", "0.5", "--attention-weight", "0.5", "--layer-map", "0:0,1:2",
    ]);
    assert!(r["val_loss"].as_f64().unwrap().is_finite(), "{r}");
    let ckpt = out.join("checkpoints").join("step-0000004");
    assert!(ckpt.join("distill.safetensors").is_file() && !out.join("model").join("distill.safetensors").exists());
    let record: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("distill.json")).unwrap()).unwrap();
    assert_eq!(record["init_layers"], serde_json::json!([1]));

    // A cache of the teacher's top 8, then a student trained from it alone.
    let cache = f.root.join("cache");
    let c = json(&["distill", "cache", "--teacher", p(&f.teacher), "--data", p(&f.data), "--out", p(&cache), "--seq-len", "32", "--top-k", "8", "--val-fraction", "0.1", "--json"]);
    assert!(c["windows"].as_u64().unwrap() > 10, "{c}");
    let out = f.root.join("cached");
    let r = json(&["distill", "--cache", p(&cache), "--student", p(&f.student), "--out", p(&out), "--loss", "rkl", "--json"]);
    assert_eq!((r["top_k"].as_i64(), r["steps"].as_u64()), (Some(8), Some(4)), "{r}");
    let e = fails(&["distill", "--cache", p(&cache), "--student", p(&f.student), "--out", p(&out), "--temperature", "2"]);
    assert!(e.contains("temperature 1"), "{e}");
    let e = fails(&["distill", "--cache", p(&cache), "--student", p(&f.student), "--out", p(&out), "--hidden-weight", "1"]);
    assert!(e.contains("--hidden-weight"), "{e}");

    // Sequence-level distillation: a generated corpus that `stlm distill`/`train` read.
    let corpus = f.root.join("generated.txt");
    ok(&["generate", "--model", p(&f.teacher), "--corpus", p(&corpus), "--documents", "5", "--batch-size", "2", "--max-new-tokens", "12", "--seed", "3"]);
    let text = std::fs::read_to_string(&corpus).unwrap();
    assert_eq!(text.matches("<|endoftext|>").count(), 5, "{text}");
}

#[test]
fn bad_distill_input_is_one_line() {
    let f = fixture();
    let out = f.root.join("bad");
    let run = |extra: &[&str]| {
        let mut a = vec!["distill", "--teacher", p(&f.teacher), "--student", p(&f.student), "--data", p(&f.data), "--out", p(&out)];
        a.extend(extra);
        fails(&a)
    };
    assert!(run(&["--loss", "kl"]).contains("fkl, rkl"));
    assert!(run(&["--alpha", "1.5"]).contains("--alpha"));
    assert!(run(&["--temperature", "0"]).contains("--temperature"));
    assert!(run(&["--init", "every:1"]).contains("num_hidden_layers = 1"));
    assert!(run(&["--init", "sometimes"]).contains("--init sometimes"));
    assert!(run(&["--layer-map", "1:9", "--hidden-weight", "1"]).contains("--layer-map"));
    assert!(run(&["--resume"]).contains("distill.json"));
    // A student with another vocabulary is refused by name.
    let tok = f.root.join("other.json");
    ok(&["tokenizer", "train", "--files", p(&f.data), "--vocab-size", "300", "--out", p(&tok)]);
    let other = f.root.join("other.toml");
    std::fs::write(&other, format!("{STUDENT}tokenizer = \"{}\"\n", p(&tok))).unwrap();
    let e = fails(&["distill", "--teacher", p(&f.teacher), "--student", p(&other), "--data", p(&f.data), "--out", p(&out)]);
    assert!(e.contains("shared vocabulary") && e.contains("id "), "{e}");
    assert!(!out.join("model").exists());
    // With byte alignment the other vocabulary trains.
    let aligned = f.root.join("aligned");
    let r = json(&["distill", "--teacher", p(&f.teacher), "--student", p(&other), "--data", p(&f.data), "--out", p(&aligned), "--align", "bytes", "--loss", "js", "--json"]);
    assert!(r["val_loss"].as_f64().unwrap().is_finite(), "{r}");
    let e = fails(&["distill", "--teacher", p(&f.teacher), "--student", p(&other), "--data", p(&f.data), "--out", p(&aligned), "--align", "bytes", "--hidden-weight", "1"]);
    assert!(e.contains("--align bytes"), "{e}");
}

/// Issue 22: a teacher trained on a corpus too small for its vocab_size has its vocabulary
/// fitted to its tokenizer; a student config asking for the same size follows the teacher's
/// (it reads the teacher's tokenizer), live and from a cache, and samples only known ids.
#[test]
fn student_follows_a_teacher_fitted_to_a_small_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data = common::write_stories(root);
    let (teacher_cfg, student) = (root.join("teacher.toml"), root.join("student.toml"));
    std::fs::write(&teacher_cfg, TEACHER.replace("vocab_size = 320", "vocab_size = 4096")).unwrap();
    std::fs::write(&student, STUDENT.replace("vocab_size = 320", "vocab_size = 4096")).unwrap();
    ok(&["train", "--config", p(&teacher_cfg), "--data", p(&data), "--out", p(&root.join("teacher")), "--samples", "0"]);
    let vocab = |model: &Path| -> i64 {
        let c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
        c["vocab_size"].as_i64().unwrap()
    };
    let teacher = root.join("teacher").join("model");
    assert!(vocab(&teacher) < 4096, "the teacher's vocabulary is fitted to its tokenizer");
    let live = root.join("live");
    ok(&["distill", "--teacher", p(&teacher), "--student", p(&student), "--data", p(&data), "--out", p(&live), "--max-steps", "2"]);
    assert_eq!(vocab(&live.join("model")), vocab(&teacher));
    let recorded = std::fs::read_to_string(live.join("config.toml")).unwrap();
    assert!(recorded.contains(&format!("vocab_size = {}", vocab(&teacher))), "{recorded}");
    let cache = root.join("cache");
    ok(&["distill", "cache", "--teacher", p(&teacher), "--data", p(&data), "--out", p(&cache), "--seq-len", "32", "--top-k", "8"]);
    let cached = root.join("cached");
    ok(&["distill", "--cache", p(&cache), "--student", p(&student), "--out", p(&cached), "--max-steps", "2"]);
    assert_eq!(vocab(&cached.join("model")), vocab(&teacher));
    ok(&["generate", "--model", p(&cached.join("model")), "--prompt", "Once", "--temperature", "2", "--max-new-tokens", "40"]);
}
