//! Running the `stlm` binary from the CLI tests.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs the binary as a user would: without the library path cargo adds for tests, so that the
/// rpath to libtorch is what makes it start.
pub fn stlm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stlm"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("DYLD_LIBRARY_PATH")
        .output()
        .expect("stlm runs")
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(args: &[&str]) -> String {
    let out = stlm(args);
    assert!(out.status.success(), "stlm {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("stdout is UTF-8")
}

/// Runs a `--json` command that must succeed; returns its one JSON object.
pub fn json(args: &[&str]) -> serde_json::Value {
    let out = ok(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("stlm {args:?}: stdout is not one JSON object ({e}): {out}"))
}

/// Runs a command that must fail; returns its one-line error after checking the failure shape.
pub fn fails(args: &[&str]) -> String {
    let out = stlm(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "stlm {args:?} should fail");
    assert!(!err.contains("panicked"), "stlm {args:?} panicked: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "stlm {args:?}: expected one error line, got: {err}");
    lines[0].to_string()
}

/// A path as a command-line argument.
pub fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// Writes `stories.txt` (120 short stories, blank lines between) into `dir`; returns its path.
pub fn write_stories(dir: &Path) -> PathBuf {
    let data = dir.join("stories.txt");
    let story = "Once upon a time, a little fox lived in the woods. The fox liked to play with a ball.\n\nOne day, Tom went to the park. He saw a big dog and said hello.\n\n";
    std::fs::write(&data, story.repeat(60)).expect("temporary directory is writable");
    data
}
