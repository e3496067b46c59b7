//! Builds `csrc/shim.cpp`, a C interface over c10d's TCPStore and ProcessGroupGloo, against the
//! headers of the libtorch tch links (torch-sys's `DEP_TCH_LIBTORCH_LIB`) and gloo's headers.
//!
//! The torch wheel does not ship gloo's headers, which `ProcessGroupGloo.hpp` includes. They come
//! from `$STLM_GLOO_INCLUDE`, set by `cargo xtask` (which unpacks Debian's `libgloo-dev` into
//! `$STLM_HOME/gloo-headers`); without it, that default location is tried. See docs/stlm-dist.md.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    println!("cargo:rerun-if-env-changed=STLM_GLOO_INCLUDE");
    println!("cargo:rerun-if-env-changed=STLM_HOME");
    let lib = PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys sets DEP_TCH_LIBTORCH_LIB"));
    let include = lib.parent().map(|p| p.join("include")).expect("libtorch's lib folder has a parent");
    let gloo = gloo_include();
    if !gloo.join("gloo").join("config.h").is_file() {
        panic!(
            "stlm-dist: gloo's headers are not at {} (looked for gloo/config.h). Run `cargo xtask env` once \
             (it fetches them) or set STLM_GLOO_INCLUDE to a folder holding gloo/*.h",
            gloo.display()
        );
    }
    cc::Build::new()
        .cpp(true)
        .file("csrc/shim.cpp")
        .include(&include)
        .include(include.join("torch").join("csrc").join("api").join("include"))
        .include(&gloo)
        .flag("-std=c++17")
        .flag("-w")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        .compile("stlm_dist_shim");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "linux" || os == "macos" {
        println!("cargo:rustc-link-arg=-Wl,-rpath={}", lib.display());
    }
}

fn gloo_include() -> PathBuf {
    if let Some(dir) = std::env::var_os("STLM_GLOO_INCLUDE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("STLM_HOME").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache").join("stlm")
    });
    home.join("gloo-headers").join("usr").join("include")
}
