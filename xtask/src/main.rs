//! `cargo xtask <job>`: makes sure libtorch 2.13.0 is available (through pip's torch wheel in a
//! cached virtual environment), then runs cargo with the environment tch needs.
//!
//! Order of preference: `$LIBTORCH`; else `$STLM_PYTHON` (a Python with torch==2.13.0); else a
//! virtual environment in `$STLM_HOME/venv-torch-2.13.0` (default `~/.cache/stlm`), created and
//! filled with the pinned packages below on first use and reused afterwards.
//! No tch dependency here, so this builds in seconds on a fresh machine.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

mod gloo;
mod llama2c;
mod vs_pytorch;

/// The torch version tch 0.26 is built against.
const TORCH_VERSION: &str = "2.13.0";

/// Every Python package the build and the interop tests use, pinned in one place so that parity
/// results are reproducible.
const PY_REQUIREMENTS: &[&str] =
    &["torch==2.13.0", "setuptools==84.2.1", "numpy==2.4.6", "safetensors==0.8.0", "transformers==5.24.0", "gguf==0.19.0"];

const USAGE: &str = "usage: cargo xtask <job> [args]

jobs:
  test [cargo test args]     set up libtorch, then run the whole test suite (parity tests included)
  bench [cargo bench args]   run the criterion benchmarks (package stlm-benches)
  bench --vs-pytorch [--config FILE] [--steps N] [--rounds R]
                             `stlm bench train` against the PyTorch eager peer, alternated; prints the ratio
  build                      build the stlm binary (release)
  run -- <stlm args>         build and run stlm (release), e.g. `cargo xtask run -- inspect --model DIR`
  train [stlm train args]    `stlm train` (release) with configs/default.toml unless --config is given
  env                        print the exports that let plain `cargo` build and test stlm

environment:
  LIBTORCH      use this libtorch instead of the pip wheel (parity tests then need STLM_PYTHON)
  STLM_PYTHON   use this Python (must have torch==2.13.0 and setuptools)
  STLM_HOME     cache folder for the virtual environment and gloo's headers (default ~/.cache/stlm)
  STLM_GLOO_INCLUDE  gloo's headers for stlm-dist (default: Debian's libgloo-dev, fetched into STLM_HOME)
  STLM_LLAMA2C_RUN_C llama2.c's run.c for the interop test (default: from PyPI's llamac2py, fetched into STLM_HOME)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<ExitCode, String> {
    let Some(job) = args.first() else {
        eprintln!("{USAGE}");
        return Ok(ExitCode::FAILURE);
    };
    let rest = &args[1..];
    let rest_after_dashes = || rest.strip_prefix(&["--".to_string()]).unwrap_or(rest).to_vec();
    match job.as_str() {
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        "env" => {
            let env = TorchEnv::ensure()?;
            for (k, v) in env.vars() {
                println!("export {k}={}", shell_quote(&v.to_string_lossy()));
            }
            Ok(ExitCode::SUCCESS)
        }
        "test" => {
            let env = TorchEnv::ensure()?;
            let mut args = vec!["test".into(), "--workspace".into()];
            args.extend(rest.iter().cloned());
            // With the Python environment provided, parity tests must not skip.
            let extra = if env.python.is_some() {
                vec![("STLM_REQUIRE_PYTHON".to_string(), OsString::from("1"))]
            } else {
                vec![]
            };
            cargo(&env, &args, &extra)
        }
        "bench" if rest.iter().any(|a| a == "--vs-pytorch") => {
            let opts = vs_pytorch::Options::parse(rest)?;
            let env = TorchEnv::ensure()?;
            let python = env.python.clone().ok_or("bench --vs-pytorch needs Python with torch: set STLM_PYTHON")?;
            let build = ["build", "--quiet", "--release", "--package", "stlm-cli"].map(String::from);
            if cargo(&env, &build, &[])? != ExitCode::SUCCESS {
                return Err("building stlm failed".into());
            }
            let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| "target".into());
            vs_pytorch::run(&opts, &target.join("release").join("stlm"), &python, &env.vars())?;
            Ok(ExitCode::SUCCESS)
        }
        "bench" => {
            let env = TorchEnv::ensure()?;
            let mut args = vec!["bench".into(), "--package".into(), "stlm-benches".into()];
            args.extend(rest.iter().cloned());
            cargo(&env, &args, &[])
        }
        "build" => {
            let env = TorchEnv::ensure()?;
            let mut args = vec!["build".into(), "--release".into(), "--package".into(), "stlm-cli".into()];
            args.extend(rest.iter().cloned());
            cargo(&env, &args, &[])
        }
        "run" => {
            let env = TorchEnv::ensure()?;
            let mut args: Vec<String> = ["run", "--quiet", "--release", "--package", "stlm-cli", "--bin", "stlm", "--"]
                .map(String::from)
                .to_vec();
            args.extend(rest_after_dashes());
            cargo(&env, &args, &[])
        }
        "train" => {
            let env = TorchEnv::ensure()?;
            let mut args: Vec<String> =
                ["run", "--quiet", "--release", "--package", "stlm-cli", "--bin", "stlm", "--", "train"]
                    .map(String::from)
                    .to_vec();
            let given = rest_after_dashes();
            if !given.iter().any(|a| a == "--config" || a.starts_with("--config=")) {
                args.extend(["--config".to_string(), "configs/default.toml".to_string()]);
            }
            args.extend(given);
            cargo(&env, &args, &[])
        }
        other => Err(format!("unknown job `{other}`\n\n{USAGE}")),
    }
}

/// How libtorch is provided to the build.
struct TorchEnv {
    libtorch: Option<PathBuf>,
    python: Option<PathBuf>,
    gloo: PathBuf,
    /// llama2.c's run.c for the interop test (`None`: no Python to fetch it with, or the fetch failed).
    run_c: Option<PathBuf>,
}

impl TorchEnv {
    fn ensure() -> Result<Self, String> {
        let (libtorch, python) = Self::torch()?;
        let gloo = gloo::ensure(&stlm_home()?)?;
        let python3 = PathBuf::from("python3");
        let run_c = match llama2c::ensure(&stlm_home()?, python.as_deref().unwrap_or(&python3)) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("xtask: warning: {e} (the run.c interop test will skip)");
                None
            }
        };
        Ok(TorchEnv { libtorch, python, gloo, run_c })
    }

    fn torch() -> Result<(Option<PathBuf>, Option<PathBuf>), String> {
        if let Some(lib) = std::env::var_os("LIBTORCH") {
            eprintln!("xtask: using LIBTORCH={}", lib.to_string_lossy());
            let python = std::env::var_os("STLM_PYTHON").map(PathBuf::from);
            return Ok((Some(lib.into()), python));
        }
        if let Some(py) = std::env::var_os("STLM_PYTHON") {
            let py = PathBuf::from(py);
            let version = torch_version(&py)
                .ok_or_else(|| format!("STLM_PYTHON={}: cannot import torch with it", py.display()))?;
            if version.split('+').next() != Some(TORCH_VERSION) {
                return Err(format!(
                    "STLM_PYTHON={}: has torch {version}, tch 0.26 needs torch=={TORCH_VERSION}",
                    py.display()
                ));
            }
            eprintln!("xtask: using STLM_PYTHON={} (torch {version})", py.display());
            return Ok((None, Some(py)));
        }
        let venv = stlm_home()?.join(format!("venv-torch-{TORCH_VERSION}"));
        let python = venv.join("bin").join("python");
        let stamp = venv.join("stlm-requirements.txt");
        let wanted = PY_REQUIREMENTS.join("\n") + "\n";
        if python.is_file() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
            eprintln!("xtask: reusing Python environment {}", venv.display());
            return Ok((None, Some(python)));
        }
        create_venv(&venv, &python)?;
        let reqs = venv.join("requirements.txt");
        std::fs::write(&reqs, &wanted).map_err(|e| format!("{}: {e}", reqs.display()))?;
        eprintln!(
            "xtask: installing {} into {} (the torch wheel is large: several GB, a few minutes)",
            PY_REQUIREMENTS.join(" "),
            venv.display()
        );
        let status = Command::new(&python)
            .args(["-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-r"])
            .arg(&reqs)
            // pip reports on stdout; `cargo xtask env` keeps stdout for the exports.
            .stdout(std::io::stderr())
            .status()
            .map_err(|e| format!("could not run pip with {}: {e}", python.display()))?;
        if !status.success() {
            return Err(format!(
                "pip install failed ({status}); check the network access to PyPI and the free disk space, then run the job again (the environment is {})",
                venv.display()
            ));
        }
        std::fs::write(&stamp, &wanted).map_err(|e| format!("{}: {e}", stamp.display()))?;
        eprintln!("xtask: Python environment ready");
        Ok((None, Some(python)))
    }

    /// Environment variables for the child cargo (and for `cargo xtask env`).
    fn vars(&self) -> Vec<(String, OsString)> {
        let mut vars = Vec::new();
        if let Some(lib) = &self.libtorch {
            vars.push(("LIBTORCH".into(), lib.clone().into_os_string()));
        } else if let Some(py) = &self.python {
            let bin = py.parent().map(Path::to_path_buf).unwrap_or_default();
            let root = bin.parent().map(Path::to_path_buf).unwrap_or_default();
            let mut path = vec![bin];
            path.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
            vars.push(("LIBTORCH_USE_PYTORCH".into(), "1".into()));
            // torch-sys runs `python` when VIRTUAL_ENV is set, so both must point at the venv.
            vars.push(("VIRTUAL_ENV".into(), root.into_os_string()));
            vars.push(("PATH".into(), std::env::join_paths(path).unwrap_or_default()));
        }
        if let Some(py) = &self.python {
            vars.push(("STLM_PYTHON".into(), py.clone().into_os_string()));
        }
        vars.push(("STLM_GLOO_INCLUDE".into(), self.gloo.clone().into_os_string()));
        if let Some(p) = &self.run_c {
            vars.push(("STLM_LLAMA2C_RUN_C".into(), p.clone().into_os_string()));
        }
        vars
    }
}

fn stlm_home() -> Result<PathBuf, String> {
    if let Some(h) = std::env::var_os("STLM_HOME") {
        return Ok(PathBuf::from(h));
    }
    let home = std::env::var_os("HOME").ok_or("neither STLM_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache").join("stlm"))
}

fn torch_version(python: &Path) -> Option<String> {
    let out = Command::new(python).args(["-c", "import torch; print(torch.__version__)"]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn create_venv(venv: &Path, python: &Path) -> Result<(), String> {
    if python.is_file() {
        eprintln!("xtask: updating Python environment {}", venv.display());
        return Ok(());
    }
    let version = Command::new("python3").arg("--version").output().map_err(|_| {
        "python3 is not installed (or not on PATH): install Python 3.10 or newer, or set LIBTORCH to a libtorch 2.13.0 directory".to_string()
    })?;
    eprintln!(
        "xtask: creating Python environment {} with {}",
        venv.display(),
        String::from_utf8_lossy(&version.stdout).trim()
    );
    if let Some(parent) = venv.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let out =
        Command::new("python3").args(["-m", "venv"]).arg(venv).output().map_err(|e| format!("python3 -m venv: {e}"))?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(venv);
        return Err(format!(
            "python3 -m venv {} failed: {} (on Debian/Ubuntu install python3-venv)",
            venv.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let pip = Command::new(python).args(["-m", "pip", "--version"]).output();
    if !pip.map(|o| o.status.success()).unwrap_or(false) {
        return Err(format!("pip is missing in {}: install python3-pip (or ensurepip) and run again", venv.display()));
    }
    Ok(())
}

fn cargo(env: &TorchEnv, args: &[String], extra: &[(String, OsString)]) -> Result<ExitCode, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .envs(env.vars())
        .envs(extra.iter().cloned())
        .status()
        .map_err(|e| format!("could not run cargo: {e}"))?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(status.code().unwrap_or(1).clamp(1, 255) as u8)
    })
}

fn shell_quote(s: &str) -> String {
    if s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-:=+,".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}
