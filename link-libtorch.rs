//! Build script shared by every crate that links libtorch into a binary or a test.
//!
//! tch does not give downstream binaries an rpath, and the linker's `--as-needed` drops
//! `libtorch_cuda.so` (nothing references it by symbol), so CUDA would look absent at run time.
//! `torch-sys` is a direct dependency of each crate using this script, which makes
//! `DEP_TCH_LIBTORCH_LIB` visible here.
fn main() {
    println!("cargo:rerun-if-changed=../../link-libtorch.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
            println!("cargo:rustc-link-arg=-Wl,-rpath={lib}");
        }
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch");
    }
}
