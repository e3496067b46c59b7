//! llama2.c's `run.c`, for the interop test that runs stlm-exported checkpoints in it
//! (tests/tests/llama2c_run_c.rs). GitHub is out of reach here; PyPI's `llamac2py` 0.1.4 ships
//! llama2.c's run.c (MIT) of late July 2023: the legacy (version 0) format with the RoPE tables
//! in the file, `run <checkpoint> [temperature] [steps] [prompt]`, `tokenizer.bin` from the
//! working directory, OpenMP in its products. Fetched once into `$STLM_HOME/llama2c`, checked
//! by SHA-256; `STLM_LLAMA2C_RUN_C` overrides. Nothing of it is committed.
use std::path::{Path, PathBuf};
use std::process::Command;

/// The sdist that carries run.c, and run.c's SHA-256.
const PACKAGE: &str = "llamac2py==0.1.4";
const RUN_C_SHA256: &str = "816a9a3176feb45ac46c384065690988442bc49524aa20189d1f6dc22d9f1276";

/// The path of run.c, fetched with `python -m pip download` on first use.
pub fn ensure(home: &Path, python: &Path) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("STLM_LLAMA2C_RUN_C") {
        return Ok(PathBuf::from(p));
    }
    let dir = home.join("llama2c");
    let run_c = dir.join("run.c");
    if sha256(python, &run_c).as_deref() == Some(RUN_C_SHA256) {
        return Ok(run_c);
    }
    eprintln!("xtask: fetching llama2.c's run.c (PyPI {PACKAGE}) into {}", dir.display());
    let work = home.join("llama2c-download");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let out = Command::new(python)
        .args(["-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d"])
        .arg(&work)
        .output()
        .map_err(|e| format!("could not run pip with {}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(format!("pip download {PACKAGE} failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let script = "import sys, tarfile, glob\n\
                  t = tarfile.open(glob.glob(sys.argv[1] + '/*.tar.gz')[0])\n\
                  m = [m for m in t.getmembers() if m.name.endswith('/run.c')][0]\n\
                  open(sys.argv[2], 'wb').write(t.extractfile(m).read())\n";
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let tmp = dir.join("run.c.tmp");
    let ok = Command::new(python).args(["-c", script]).arg(&work).arg(&tmp).status().map(|s| s.success()).unwrap_or(false);
    let _ = std::fs::remove_dir_all(&work);
    if !ok {
        return Err(format!("{PACKAGE}: could not extract run.c from the sdist"));
    }
    match sha256(python, &tmp) {
        Some(h) if h == RUN_C_SHA256 => {}
        h => return Err(format!("{PACKAGE}: run.c has SHA-256 {h:?}, expected {RUN_C_SHA256}")),
    }
    std::fs::rename(&tmp, &run_c).map_err(|e| format!("{}: {e}", run_c.display()))?;
    Ok(run_c)
}

fn sha256(python: &Path, file: &Path) -> Option<String> {
    if !file.is_file() {
        return None;
    }
    let out = Command::new(python)
        .args(["-c", "import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())"])
        .arg(file)
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}
