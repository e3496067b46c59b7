//! gloo's C++ headers for stlm-dist's c10d shim. The torch wheel ships c10d's headers but not
//! gloo's, which `ProcessGroupGloo.hpp` includes; Debian packages them as `libgloo-dev`. The shim
//! only names gloo types through `std::shared_ptr<gloo::transport::Device>` values made by
//! libtorch's own exported functions, so the headers need to declare those names, not match the
//! gloo commit torch was built from (docs/stlm-dist.md). `STLM_GLOO_INCLUDE` overrides.
use std::path::{Path, PathBuf};
use std::process::Command;

/// The folder holding `gloo/config.h`, fetched into `$STLM_HOME/gloo-headers` on first use.
pub fn ensure(home: &Path) -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("STLM_GLOO_INCLUDE") {
        return Ok(PathBuf::from(dir));
    }
    let root = home.join("gloo-headers");
    let include = root.join("usr").join("include");
    if include.join("gloo").join("config.h").is_file() {
        return Ok(include);
    }
    eprintln!("xtask: fetching gloo's headers (Debian package libgloo-dev) into {}", root.display());
    let work = home.join("gloo-download");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    if !download(&work)? {
        // A fresh machine may have no package lists yet.
        let _ = Command::new("apt-get").args(["update", "-qq"]).status();
        if !download(&work)? {
            return Err("`apt-get download libgloo-dev` failed: install Debian's libgloo-dev, or set \
                        STLM_GLOO_INCLUDE to a folder holding gloo/*.h"
                .into());
        }
    }
    let deb = std::fs::read_dir(&work)
        .map_err(|e| format!("{}: {e}", work.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| format!("apt-get download left no .deb in {}", work.display()))?;
    let staged = work.join("x");
    let ok = Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&staged).status().map(|s| s.success()).unwrap_or(false);
    if !ok || !staged.join("usr/include/gloo/config.h").is_file() {
        return Err(format!("dpkg-deb -x {} did not give usr/include/gloo/config.h", deb.display()));
    }
    let _ = std::fs::remove_dir_all(&root);
    std::fs::rename(&staged, &root).map_err(|e| format!("{} -> {}: {e}", staged.display(), root.display()))?;
    let name = deb.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let _ = std::fs::write(root.join("package.txt"), name + "\n");
    let _ = std::fs::remove_dir_all(&work);
    Ok(include)
}

fn download(dir: &Path) -> Result<bool, String> {
    let out = Command::new("apt-get")
        .args(["download", "-qq", "libgloo-dev"])
        .current_dir(dir)
        .output()
        .map_err(|e| format!("could not run apt-get (needed once to fetch gloo's headers): {e}; or set STLM_GLOO_INCLUDE"))?;
    Ok(out.status.success())
}
