//! GPU switches and facts: TF32 for f32 matrix products and convolutions, CUDA-graph capture and
//! replay, and device properties (kd-run keeps the table of GPUs' peak FLOP/s by name).
//!
//! The TF32 switches work in every build (they are flags of libtorch's global context, read by
//! the CUDA kernels); graphs and device properties need feature `cuda` and return
//! [`Error::NotBuilt`] otherwise.
//!
//! ```
//! use kd_native::cuda::{set_tf32, tf32};
//!
//! set_tf32(true, true);
//! assert_eq!(tf32(), (true, true));
//! set_tf32(false, true); // PyTorch's defaults: cuBLAS off, cuDNN on
//! ```
use crate::ffi;
use crate::{native, Error, Result};

/// Allows (or forbids) TF32 in cuBLAS f32 matrix products and in cuDNN convolutions, for the
/// whole process (`at::globalContext().setAllowTF32CuBLAS` / `setAllowTF32CuDNN`).
pub fn set_tf32(cublas: bool, cudnn: bool) {
    ffi::set_tf32(cublas, cudnn)
}

/// The TF32 switches as `(cublas, cudnn)`.
pub fn tf32() -> (bool, bool) {
    ffi::tf32()
}

/// What CUDA reports about a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceProperties {
    /// E.g. `"NVIDIA H200"`.
    pub name: String,
    /// Global memory in bytes.
    pub total_memory: u64,
    /// Compute capability, e.g. `(9, 0)`.
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors.
    pub multiprocessors: i32,
}

const NO_CUDA: Error = Error::NotBuilt {
    what: "CUDA (feature `cuda`)",
    hint: "build with `--features kd-native/cuda` on a machine with the CUDA build of the PyTorch wheel",
};

/// Whether this build has the CUDA parts (feature `cuda`): graphs and device properties.
pub fn built() -> bool {
    cfg!(feature = "cuda")
}

/// The properties of CUDA device `index` (`at::cuda::getDeviceProperties`).
pub fn device_properties(index: usize) -> Result<DeviceProperties> {
    if !cfg!(feature = "cuda") {
        return Err(NO_CUDA);
    }
    let raw = ffi::device_properties(index as i32).map_err(native("reading the CUDA device properties"))?;
    Ok(DeviceProperties {
        name: raw.name,
        total_memory: raw.total_memory as u64,
        compute_capability: (raw.major, raw.minor),
        multiprocessors: raw.multiprocessors,
    })
}

/// A captured CUDA graph (`at::cuda::CUDAGraph`): the kernels queued while capturing, replayed
/// with one launch on the same memory. Inputs are changed between replays by copying into the
/// tensors the capture read (`copy_`, `fill_`), never by making new ones; outputs are read from
/// the tensors the capture wrote.
pub struct CudaGraph {
    graph: ffi::Graph,
}

impl CudaGraph {
    /// Captures the work that `body` queues on CUDA device `device` (on a side stream, as
    /// capture on the default stream is not allowed). Run `body` a few times before capturing, so
    /// that libtorch's allocator and lazy initializations are settled; `body` must not copy to the
    /// host or synchronize. An error from `body` ends the capture and is returned.
    pub fn capture<T>(device: usize, body: impl FnOnce() -> Result<T>) -> Result<(CudaGraph, T)> {
        if !cfg!(feature = "cuda") {
            return Err(NO_CUDA);
        }
        let mut graph = ffi::Graph::capture_begin(device as i32).map_err(native("beginning a CUDA graph capture"))?;
        let out = body();
        let end = graph.capture_end().map_err(native("ending a CUDA graph capture"));
        let out = out?;
        end?;
        Ok((CudaGraph { graph }, out))
    }

    /// Launches the captured work again.
    pub fn replay(&mut self) -> Result<()> {
        self.graph.replay().map_err(native("replaying a CUDA graph"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tf32_switches_round_trip() {
        let before = tf32();
        for (a, b) in [(true, false), (false, true), (true, true)] {
            set_tf32(a, b);
            assert_eq!(tf32(), (a, b));
        }
        set_tf32(before.0, before.1);
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_parts_say_how_to_get_them() {
        let err = device_properties(0).unwrap_err().to_string();
        assert!(err.contains("feature `cuda`"), "{err}");
        let err = CudaGraph::capture(0, || Ok(())).err().unwrap().to_string();
        assert!(err.contains("feature `cuda`"), "{err}");
    }
}
