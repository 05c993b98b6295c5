//! Compiles `src/shim.cpp` (one translation unit) against the headers of the libtorch that tch
//! links, and links the test and example binaries to libtorch like the other crates' build.rs.
//!
//! Gloo (c10d's ProcessGroupGloo, data parallelism on CPUs) is built wherever its headers are
//! found, which the PyTorch wheel lacks: `KD_GLOO_INCLUDE`, else `deps/gloo/include` (written by
//! `make setup`), else `/usr/include`. Without them the shim builds without process groups and
//! the build says so once (a warning); `kd_native::dist::available` tells at run time. The
//! feature `gloo` makes the headers required (an error when they are missing).
//!
//! Features add headers and defines:
//! - `cuda`: CUDA graphs and device properties; the CUDA runtime headers come from
//!   `KD_CUDA_INCLUDE` (directories separated by `:`), else the `nvidia` wheels beside torch.
//! - `nccl`: c10d's ProcessGroupNCCL; `nccl.h` from `KD_NCCL_INCLUDE`, else the `nvidia-nccl`
//!   wheel beside torch, plus CCCL's headers (`KD_CCCL_INCLUDE`, else `deps/cccl/include`).
//!
//! A feature whose headers are missing stops the build with a message saying how to get them;
//! without features the shim needs only libtorch's own headers.
use std::env;
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=src/shim.cpp");
    println!("cargo:rerun-if-changed=build.rs");
    for var in ["KD_GLOO_INCLUDE", "KD_CUDA_INCLUDE", "KD_NCCL_INCLUDE", "KD_CCCL_INCLUDE"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let feature = |name: &str| env::var_os(format!("CARGO_FEATURE_{}", name.to_uppercase())).is_some();
    let (gloo, nccl, cuda) = (feature("gloo"), feature("nccl"), feature("cuda"));
    if feature("doc_only") {
        // Documentation only (docs.rs has no libtorch): nothing to compile or link.
        return;
    }

    let lib = PathBuf::from(env::var("DEP_TCH_LIBTORCH_LIB").unwrap_or_else(|_| {
        fail("torch-sys did not report libtorch's lib directory (DEP_TCH_LIBTORCH_LIB); is LIBTORCH set?")
    }));
    let torch = lib.parent().map(Path::to_path_buf).unwrap_or_default();
    let include = torch.join("include");
    if !include.join("ATen/ops/_fused_adam.h").is_file() {
        fail(&format!("libtorch's headers are missing from {} (the PyTorch 2.11 wheel has them)", include.display()));
    }
    // The wheels torch installs (nvidia-*, triton) sit beside it in site-packages.
    let site = std::fs::canonicalize(&torch).ok().and_then(|t| t.parent().map(Path::to_path_buf)).unwrap_or_default();
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("../..");

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .file("src/shim.cpp")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .warnings(false)
        .flag_if_supported("-Wno-unused-parameter");

    const GET_GLOO: &str = "Run `make setup` (downloads Debian's libgloo-dev and unpacks it into deps/gloo \
        without root), or set KD_GLOO_INCLUDE to a directory holding gloo/algorithm.h";
    let gloo_dir =
        find_dir("KD_GLOO_INCLUDE", &[root.join("deps/gloo/include"), "/usr/include".into()], "gloo/algorithm.h");
    match gloo_dir {
        Some(dir) => {
            println!("cargo:rerun-if-changed={}", dir.join("gloo/algorithm.h").display());
            println!("cargo:rustc-cfg=kd_native_gloo");
            build.include(dir).define("USE_C10D_GLOO", None).define("KD_NATIVE_GLOO", None);
        }
        None if gloo => {
            fail(&format!("feature `gloo` needs the Gloo headers, which the PyTorch wheel lacks. {GET_GLOO}"))
        }
        None => println!(
            "cargo:warning=kd-native: no Gloo headers found, so this build has no data-parallel process groups \
             (one-process runs are unaffected). {GET_GLOO}; `make setup` also makes the next build pick them up"
        ),
    }
    println!("cargo::rustc-check-cfg=cfg(kd_native_gloo)");
    if cuda {
        let defaults = [site.join("nvidia/cu13/include"), site.join("nvidia/cuda_runtime/include")];
        let dirs = find_dirs("KD_CUDA_INCLUDE", &defaults, "cuda_runtime_api.h").unwrap_or_else(|| {
            fail(
                "feature `cuda` needs the CUDA runtime headers (cuda_runtime_api.h). The CUDA build of the \
                 PyTorch wheel installs them (site-packages/nvidia/cu13/include); or set KD_CUDA_INCLUDE",
            )
        });
        for d in dirs {
            build.include(d);
        }
        let triton = site.join("triton/backends/nvidia/include");
        if triton.is_dir() {
            build.include(triton);
        }
        build.define("USE_CUDA", None).define("KD_NATIVE_CUDA", None);
        // Inline functions of the c10 CUDA headers call the CUDA runtime directly; link the
        // libcudart that libtorch_cuda loads (the wheels ship only its versioned name).
        let cudart = [site.join("nvidia/cu13/lib"), site.join("nvidia/cuda_runtime/lib")].into_iter().find_map(|d| {
            let name = std::fs::read_dir(&d)
                .ok()?
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .find(|n| n.starts_with("libcudart.so.") && n.split('.').count() == 3)?;
            Some((d, name))
        });
        match cudart {
            Some((dir, name)) => {
                println!("cargo:rustc-link-search=native={}", dir.display());
                println!("cargo:rustc-link-lib=dylib:+verbatim={name}");
                println!("cargo:rustc-link-arg=-Wl,-rpath={}", dir.display());
                // Link arguments reach only this package's binaries: dependents add the rpath
                // themselves from DEP_KD_NATIVE_CUDART_DIR.
                println!("cargo:cudart_dir={}", dir.display());
            }
            None => fail(
                "feature `cuda` needs libcudart.so.N, which the CUDA build of the PyTorch wheel installs \
                 (site-packages/nvidia/cu13/lib)",
            ),
        }
    }
    if nccl {
        let dir = find_dir("KD_NCCL_INCLUDE", &[site.join("nvidia/nccl/include")], "nccl.h").unwrap_or_else(|| {
            fail(
                "feature `nccl` needs nccl.h: the CUDA build of the PyTorch wheel installs the nvidia-nccl wheel \
                 (site-packages/nvidia/nccl/include); or set KD_NCCL_INCLUDE",
            )
        });
        let cccl = find_dir("KD_CCCL_INCLUDE", &[root.join("deps/cccl/include")], "nv/target").unwrap_or_else(|| {
            fail(
                "feature `nccl` needs the CCCL headers (nv/target). Run `KD_SETUP_NCCL=1 make setup` (downloads \
                 the nvidia-cuda-cccl wheel into deps/cccl), or set KD_CCCL_INCLUDE",
            )
        });
        build.include(dir).include(cccl).define("USE_C10D_NCCL", None).define("KD_NATIVE_NCCL", None);
    }
    build.compile("kd_native_shim");

    // The shim's symbols live in these libraries; link them after the static shim.
    let mut libs = vec!["torch_cpu", "c10"];
    if cuda {
        libs.extend(["torch_cuda", "c10_cuda"]);
    }
    println!("cargo:rustc-link-search=native={}", lib.display());
    for l in libs {
        println!("cargo:rustc-link-lib=dylib={l}");
    }
    // As the other crates' build.rs (docs/using-the-crates.md's): an rpath to libtorch, and libtorch.so kept
    // although nothing names it (it loads libtorch_cuda.so).
    if env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-arg=-Wl,-rpath={}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch");
    }
}

/// The first of `$var` or `defaults` that holds `probe`.
fn find_dir(var: &str, defaults: &[PathBuf], probe: &str) -> Option<PathBuf> {
    find_dirs(var, defaults, probe).and_then(|d| d.into_iter().next())
}

/// `$var`'s directories when set (all of them, if the first holds `probe`), else the first default
/// holding `probe`.
fn find_dirs(var: &str, defaults: &[PathBuf], probe: &str) -> Option<Vec<PathBuf>> {
    if let Some(value) = env::var_os(var) {
        let dirs: Vec<PathBuf> = env::split_paths(&value).collect();
        return dirs.iter().any(|d| d.join(probe).exists()).then_some(dirs);
    }
    defaults.iter().find(|d| d.join(probe).exists()).map(|d| vec![d.clone()])
}

fn fail(message: &str) -> ! {
    eprintln!("error: kd-native: {message}");
    println!("cargo:warning=kd-native: {message}");
    std::process::exit(1);
}
