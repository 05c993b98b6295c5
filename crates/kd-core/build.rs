// build.rs: link libtorch so that this package's binaries, tests and examples start without
// LD_LIBRARY_PATH and keep CUDA. torch-sys must be a direct dependency: that is what makes
// DEP_TCH_LIBTORCH_LIB (the libtorch lib directory torch-sys linked against) visible here.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
            // Find libtorch at run time where it was at build time.
            println!("cargo:rustc-link-arg=-Wl,-rpath={lib}");
        }
        // kd-native's `cuda` feature links the CUDA runtime of the PyTorch wheel, found beside
        // libtorch rather than in it.
        if let Ok(dir) = std::env::var("DEP_KD_NATIVE_CUDART_DIR") {
            println!("cargo:rustc-link-arg=-Wl,-rpath={dir}");
        }
        // Keep libtorch.so, which nothing references by symbol: it loads libtorch_cuda.so,
        // without which CUDA looks absent.
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch");
    }
}
