//! Data-parallel `stlm train` with 2 gloo ranks on 127.0.0.1: the same losses and weights as one
//! process with the whole global batch (dense and MoE), an interrupted 2-rank run resumes to the
//! losses of an uninterrupted one, and a killed rank makes the other exit with one error line.

mod common;

use common::{p, stlm, write_stories};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CONFIG: &str = "[model]\npreset = \"llama\"\nvocab_size = 320\nhidden_size = 32\nintermediate_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\nmax_position_embeddings = 64\nMOE\n\n[train]\nmax_steps = 20\nbatch_size = 4\nseq_len = 32\nlog_every = 1\neval_every = 10\neval_batches = 3\nsave_every = 5\nkeep_last = 0\nwarmup_steps = 2\nlr = 3e-3\n\n[data]\nval_fraction = 0.1\n";

const MOE: &str = "model_type = \"stlm\"\nmoe = { num_experts = 4, router = { kind = \"aux-free\", k = 2, gate = \"sigmoid\", gamma = 0.01 }, aux_loss_coef = 0.0 }";

/// (step, loss, validation loss) of every metrics line.
fn metrics(run: &Path) -> Vec<(u64, f64, Option<f64>)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap(), v["val_loss"].as_f64())
        })
        .collect()
}

fn assert_close_metrics(a: &Path, b: &Path, tol: f64) {
    let (ma, mb) = (metrics(a), metrics(b));
    assert_eq!(ma.len(), mb.len(), "{ma:?} vs {mb:?}");
    for (x, y) in ma.iter().zip(&mb) {
        assert_eq!(x.0, y.0);
        assert!((x.1 - y.1).abs() <= tol, "step {}: loss {} vs {}", x.0, x.1, y.1);
        match (x.2, y.2) {
            (Some(u), Some(v)) => assert!((u - v).abs() <= tol, "step {}: val {u} vs {v}", x.0),
            (None, None) => {}
            other => panic!("step {}: validation {other:?}", x.0),
        }
    }
}

/// The largest absolute difference between the weights of two model directories.
fn max_weight_diff(a: &Path, b: &Path) -> f64 {
    let load = |d: &Path| tch::Tensor::read_safetensors(d.join("model").join("model.safetensors")).unwrap();
    let (wa, wb) = (load(a), load(b));
    assert_eq!(wa.len(), wb.len());
    let wb: std::collections::HashMap<_, _> = wb.into_iter().collect();
    wa.iter().map(|(name, t)| (t - &wb[name]).abs().max().double_value(&[])).fold(0.0, f64::max)
}

fn write_config(dir: &Path, name: &str, moe: bool) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, CONFIG.replace("MOE", if moe { MOE } else { "" })).unwrap();
    path
}

fn train_args<'a>(config: &'a Path, data: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec!["train", "--config", p(config), "--data", p(data), "--out", p(out), "--samples", "0"]
}

fn check_ok(out: &std::process::Output) {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn two_ranks_match_one_process_with_the_global_batch() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_stories(dir.path());
    for moe in [false, true] {
        let config = write_config(dir.path(), if moe { "moe.toml" } else { "dense.toml" }, moe);
        let one = dir.path().join(format!("one-{moe}"));
        check_ok(&stlm(&train_args(&config, &data, &one)));
        let two = dir.path().join(format!("two-{moe}"));
        let mut args = train_args(&config, &data, &two);
        args.extend(["--nproc", "2", "--set", "train.batch_size=2"]);
        let out = stlm(&args);
        check_ok(&out);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("data parallel: 2 ranks, a global batch of 4 windows"), "{err}");
        assert_eq!(metrics(&two).len(), 20, "rank 0 alone writes metrics.jsonl");
        assert_close_metrics(&one, &two, 1e-5);
        let diff = max_weight_diff(&one, &two);
        let worst = metrics(&one).iter().zip(metrics(&two)).map(|(a, b)| (a.1 - b.1).abs()).fold(0.0, f64::max);
        eprintln!("moe {moe}: largest loss difference {worst:e}, largest weight difference {diff:e}");
        assert!(diff <= 1e-5, "moe {moe}: weights differ by {diff}");
    }
}

fn spawn_rank(args: &[&str], rank: usize, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_stlm"))
        .args(args)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", "2")
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until rank 0 has written a metrics line (training is under way).
fn wait_for_training(run: &Path, ranks: &mut [Child]) {
    let started = Instant::now();
    while metrics(run).is_empty() {
        for r in ranks.iter_mut() {
            assert!(r.try_wait().unwrap().is_none(), "a rank ended before training started");
        }
        assert!(started.elapsed() < Duration::from_secs(120), "training never started");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for `child` at most `limit`; kills it and fails after that.
fn wait_within(mut child: Child, limit: Duration) -> std::process::Output {
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("a rank did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn interrupted_ranks_resume_to_the_losses_of_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_stories(dir.path());
    let config = dir.path().join("long.toml");
    let long = CONFIG.replace("MOE", "").replace("max_steps = 20", "max_steps = 600").replace("log_every = 1", "log_every = 25");
    std::fs::write(&config, long.replace("save_every = 5", "save_every = 0").replace("eval_every = 10", "eval_every = 200")).unwrap();
    let set = ["--set", "train.batch_size=2"];
    let full = dir.path().join("full");
    let mut args = train_args(&config, &data, &full);
    args.extend(["--nproc", "2"]);
    args.extend(set);
    check_ok(&stlm(&args));

    let run = dir.path().join("run");
    let mut args = train_args(&config, &data, &run);
    args.extend(set);
    let port = free_port();
    let mut ranks = vec![spawn_rank(&args, 0, port), spawn_rank(&args, 1, port)];
    wait_for_training(&run, &mut ranks);
    for r in &ranks {
        assert!(Command::new("kill").args(["-INT", &r.id().to_string()]).status().unwrap().success());
    }
    for (rank, child) in ranks.into_iter().enumerate() {
        let out = wait_within(child, Duration::from_secs(60));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(130), "rank {rank}: {err}");
    }
    let latest = std::fs::read_to_string(run.join("checkpoints").join("latest")).unwrap();
    assert!(latest != "step-0000600", "the run was interrupted before its end");

    let mut resume = train_args(&config, &data, &run);
    resume.extend(["--nproc", "2", "--resume"]);
    resume.extend(set);
    check_ok(&stlm(&resume));
    assert_close_metrics(&full, &run, 0.0);
}

#[test]
fn a_killed_rank_makes_the_other_exit_with_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_stories(dir.path());
    let config = dir.path().join("long.toml");
    let long = CONFIG.replace("MOE", "").replace("max_steps = 20", "max_steps = 100000").replace("log_every = 1", "log_every = 20");
    std::fs::write(&config, long.replace("eval_every = 10", "eval_every = 0").replace("save_every = 5", "save_every = 20")).unwrap();
    let run = dir.path().join("run");
    let args = train_args(&config, &data, &run);
    let port = free_port();
    let mut ranks = vec![spawn_rank(&args, 0, port), spawn_rank(&args, 1, port)];
    wait_for_training(&run, &mut ranks);
    let victim = ranks.pop().unwrap();
    assert!(Command::new("kill").args(["-KILL", &victim.id().to_string()]).status().unwrap().success());
    let _ = wait_within(victim, Duration::from_secs(10));
    let out = wait_within(ranks.pop().unwrap(), Duration::from_secs(60));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("distributed") && lines[0].contains("rank 0 of 2"), "{}", lines[0]);
    assert!(!err.contains("panicked"), "{err}");
    // The last complete checkpoint still restores: a single process resumes from it.
    let latest = std::fs::read_to_string(run.join("checkpoints").join("latest")).unwrap();
    let step: u64 = latest.trim().trim_start_matches("step-").parse().unwrap();
    let mut resume = train_args(&config, &data, &run);
    let steps = (step + 1).to_string();
    resume.extend(["--resume", "--max-steps", &steps]);
    check_ok(&stlm(&resume));
}

#[test]
fn mismatched_configs_across_ranks_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_stories(dir.path());
    let config = write_config(dir.path(), "c.toml", false);
    let run = dir.path().join("run");
    let port = free_port();
    let base = train_args(&config, &data, &run);
    let mut other = base.clone();
    other.extend(["--set", "train.lr=1e-3"]);
    let ranks = vec![spawn_rank(&base, 0, port), spawn_rank(&other, 1, port)];
    for child in ranks {
        let out = wait_within(child, Duration::from_secs(60));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("ranks disagree on the run config"), "{err}");
    }
}

#[test]
fn two_rank_distillation_matches_one_process_live_and_cached() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_stories(dir.path());
    let config = write_config(dir.path(), "teacher.toml", false);
    let teacher = dir.path().join("teacher");
    let mut args = train_args(&config, &data, &teacher);
    args.extend(["--max-steps", "6"]);
    check_ok(&stlm(&args));
    let (teacher_model, student) = (teacher.join("model"), dir.path().join("student.toml"));
    let student_cfg = CONFIG.replace("MOE", "").replace("hidden_size = 32", "hidden_size = 16").replace("max_steps = 20", "max_steps = 10");
    std::fs::write(&student, student_cfg).unwrap();
    let cache = dir.path().join("cache");
    let cache_args = ["distill", "cache", "--teacher", p(&teacher_model), "--data", p(&data), "--out", p(&cache), "--seq-len", "32", "--top-k", "8"];
    check_ok(&stlm(&cache_args));
    for source in ["live", "cached"] {
        let run = |name: &str, extra: &[&str]| {
            let out = dir.path().join(format!("{source}-{name}"));
            let mut a = vec!["distill", "--student", p(&student), "--out", p(&out), "--loss", "fkl", "--alpha", "0.5"];
            match source {
                "live" => a.extend(["--teacher", p(&teacher_model), "--data", p(&data), "--temperature", "2"]),
                _ => a.extend(["--cache", p(&cache)]),
            }
            a.extend(extra);
            check_ok(&stlm(&a));
            out
        };
        let one = run("one", &[]);
        let two = run("two", &["--nproc", "2", "--set", "train.batch_size=2"]);
        assert_close_metrics(&one, &two, 1e-5);
        let diff = max_weight_diff(&one, &two);
        assert!(diff <= 1e-5, "{source}: student weights differ by {diff}");
    }
}
