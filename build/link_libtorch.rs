// tch's link recipe, shared by every package that links libtorch (`build = ...` in its Cargo.toml):
// rpath to libtorch so binaries and tests run without LD_LIBRARY_PATH.
fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").expect("CARGO_CFG_TARGET_OS is set by cargo");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        if os == "linux" || os == "macos" {
            println!("cargo:rustc-link-arg=-Wl,-rpath={dir}");
        }
    }
    if os == "linux" {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch");
    }
}
