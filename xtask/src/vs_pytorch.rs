//! `cargo xtask bench --vs-pytorch`: `stlm bench train` and the PyTorch eager peer
//! (`benches/peers/train_llama.py`) on the same config, alternated round by round on the same
//! machine, and the ratio of their median tokens/s.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Options after `--vs-pytorch`.
pub struct Options {
    config: String,
    steps: String,
    rounds: usize,
}

impl Options {
    /// Parses `--config FILE`, `--steps N` and `--rounds R`.
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let mut o = Options { config: "configs/bench-llama-4m.toml".into(), steps: "20".into(), rounds: 3 };
        let mut it = args.iter().filter(|a| *a != "--vs-pytorch");
        while let Some(flag) = it.next() {
            let mut value = || it.next().cloned().ok_or(format!("{flag} needs a value"));
            match flag.as_str() {
                "--config" => o.config = value()?,
                "--steps" => o.steps = value()?,
                "--rounds" => o.rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?,
                other => {
                    return Err(format!("bench --vs-pytorch: unknown option `{other}` (--config, --steps, --rounds)"))
                }
            }
        }
        Ok(o)
    }
}

/// The number after `"key":` in a one-line JSON object.
fn json_number(text: &str, key: &str) -> Option<f64> {
    let at = text.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = text[at..].trim_start();
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim().parse().ok()
}

fn run_json(cmd: &mut Command, what: &str) -> Result<f64, String> {
    let out = cmd.output().map_err(|e| format!("could not run {what}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{what} failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    println!("  {what}: {line}");
    json_number(line, "tokens_per_s").ok_or(format!("{what}: no tokens_per_s in `{line}`"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs both, `rounds` times each, alternating, and prints the medians and their ratio.
pub fn run(o: &Options, stlm: &Path, python: &Path, vars: &[(String, std::ffi::OsString)]) -> Result<(), String> {
    let peer = PathBuf::from("benches/peers/train_llama.py");
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for round in 1..=o.rounds.max(1) {
        println!("round {round}/{}", o.rounds.max(1));
        let mut s = Command::new(stlm);
        s.args(["bench", "train", "--config", &o.config, "--steps", &o.steps, "--json"]).envs(vars.iter().cloned());
        ours.push(run_json(&mut s, "stlm")?);
        let mut p = Command::new(python);
        p.arg(&peer).args(["--config", &o.config, "--steps", &o.steps]).envs(vars.iter().cloned());
        theirs.push(run_json(&mut p, "pytorch")?);
    }
    let (a, b) = (median(ours), median(theirs));
    println!(
        "median tokens/s: stlm {a:.0}, PyTorch eager {b:.0}; stlm / PyTorch = {:.2}x ({}, {} steps, {} rounds)",
        a / b,
        o.config,
        o.steps,
        o.rounds
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_numbers_from_json_lines() {
        let line = r#"{"tokens_per_s":1234.5,"step_ms":3.2, "x": {"tokens_per_s": 1}}"#;
        assert_eq!(super::json_number(line, "tokens_per_s"), Some(1234.5));
        assert_eq!(super::json_number(line, "step_ms"), Some(3.2));
        assert_eq!(super::json_number(line, "mfu"), None);
    }
}
