//! Shared helpers of stlm's cross-crate tests: finding the reference Python and running it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Python with torch and transformers that reference computations run in, or `None` (with a
/// message) when there is none. Under `cargo xtask test` (`STLM_REQUIRE_PYTHON=1`) a missing
/// Python is a failure, not a skip.
pub fn reference_python() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("STLM_PYTHON").map(PathBuf::from),
        std::env::var_os("VIRTUAL_ENV").map(|v| PathBuf::from(v).join("bin").join("python")),
    ];
    let found = candidates.into_iter().flatten().find(|py| {
        Command::new(py)
            .args(["-c", "import torch, transformers, safetensors"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    });
    if found.is_none() {
        let msg = "no Python with torch and transformers (set STLM_PYTHON, or run `cargo xtask test`)";
        if std::env::var("STLM_REQUIRE_PYTHON").as_deref() == Ok("1") {
            panic!("{msg}");
        }
        eprintln!("skipping: {msg}");
    }
    found
}

/// Runs `tests/python/<script>` with `args`, panicking with its stderr when it fails.
pub fn run_python(python: &Path, script: &str, args: &[&str]) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("python").join(script);
    let out = Command::new(python).arg(&path).args(args).output().expect("python runs");
    assert!(out.status.success(), "{script} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// Largest absolute difference between two tensors, in float64.
pub fn max_abs_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    (a.to_kind(tch::Kind::Double) - b.to_kind(tch::Kind::Double)).abs().max().double_value(&[])
}
