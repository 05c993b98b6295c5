//! What this build of kd-native holds and the libtorch it runs on, for reports such as
//! `kd-run info`.
//!
//! ```
//! let b = kd_native::build::info();
//! assert!(b.libtorch_version.starts_with("2."));
//! println!("libtorch {} ({} kernels), Gloo: {}", b.libtorch_version, b.cpu_capability, b.gloo);
//! ```

use crate::dist::{available, Backend};

/// The parts compiled in and the libtorch found at run time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildInfo {
    /// libtorch's version, e.g. `"2.11.0"` (from the headers the shim was compiled against).
    pub libtorch_version: String,
    /// The CPU kernels ATen dispatches to on this machine: `"DEFAULT"`, `"AVX2"` or `"AVX512"`
    /// (`ATEN_CPU_CAPABILITY` can lower it).
    pub cpu_capability: String,
    /// c10d's Gloo process groups (data parallelism on CPUs): built where the Gloo headers were found.
    pub gloo: bool,
    /// c10d's NCCL process groups (feature `nccl`).
    pub nccl: bool,
    /// CUDA graphs and device properties (feature `cuda`).
    pub cuda_graphs: bool,
}

/// This build's [`BuildInfo`].
pub fn info() -> BuildInfo {
    BuildInfo {
        libtorch_version: crate::ffi::libtorch_text(0),
        cpu_capability: crate::ffi::libtorch_text(1),
        gloo: available(Backend::Gloo),
        nccl: available(Backend::Nccl),
        cuda_graphs: crate::cuda::built(),
    }
}
