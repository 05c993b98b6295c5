//! GPU switches and facts: TF32 for f32 matrix products and convolutions, CUDA-graph capture and
//! replay, device properties, and the dense peak FLOP/s of common GPUs.
//!
//! The TF32 switches work in every build (they are flags of libtorch's global context, read by
//! the CUDA kernels); graphs and device properties need feature `cuda` and return
//! [`Error::NotBuilt`] otherwise.
//!
//! ```
//! use kd_native::cuda::{peak_tflops, set_tf32, tf32};
//!
//! set_tf32(true, true);
//! assert_eq!(tf32(), (true, true));
//! set_tf32(false, true); // PyTorch's defaults: cuBLAS off, cuDNN on
//! let h200 = peak_tflops("NVIDIA H200").unwrap();
//! assert_eq!((h200.bf16, h200.tf32), (989.0, 494.0));
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

/// Dense (not sparse) peak throughput of a GPU in TFLOP/s, from its vendor's data sheet.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PeakTflops {
    /// bf16 (and fp16) tensor cores with f32 accumulation.
    pub bf16: f64,
    /// TF32 tensor cores.
    pub tf32: f64,
    /// f32 without tensor cores.
    pub fp32: f64,
}

/// (name fragment, peaks); the first fragment contained in the device's name wins, so the more
/// specific names come first.
const PEAKS: [(&str, PeakTflops); 8] = [
    ("H100 PCIe", PeakTflops { bf16: 756.0, tf32: 378.0, fp32: 51.0 }),
    ("H100 NVL", PeakTflops { bf16: 835.0, tf32: 418.0, fp32: 60.0 }),
    ("H100", PeakTflops { bf16: 989.0, tf32: 494.0, fp32: 67.0 }),
    ("H200", PeakTflops { bf16: 989.0, tf32: 494.0, fp32: 67.0 }),
    ("GH200", PeakTflops { bf16: 989.0, tf32: 494.0, fp32: 67.0 }),
    ("B200", PeakTflops { bf16: 2250.0, tf32: 1100.0, fp32: 80.0 }),
    ("A100", PeakTflops { bf16: 312.0, tf32: 156.0, fp32: 19.5 }),
    ("L40S", PeakTflops { bf16: 362.0, tf32: 183.0, fp32: 91.6 }),
];

/// The dense peak of a GPU named like CUDA names it (`"NVIDIA H200"`, `"NVIDIA H100 80GB HBM3"`,
/// `"NVIDIA A100-SXM4-80GB"`), or `None` for a GPU not in the table.
pub fn peak_tflops(device_name: &str) -> Option<PeakTflops> {
    PEAKS.iter().find(|(fragment, _)| device_name.contains(fragment)).map(|(_, p)| *p)
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
    fn peaks_by_device_name() {
        let table = [
            ("NVIDIA H200", Some(989.0)),
            ("NVIDIA H100 80GB HBM3", Some(989.0)),
            ("NVIDIA H100 PCIe", Some(756.0)),
            ("NVIDIA A100-SXM4-80GB", Some(312.0)),
            ("NVIDIA GeForce GTX 1080", None),
        ];
        for (name, bf16) in table {
            assert_eq!(peak_tflops(name).map(|p| p.bf16), bf16, "{name}");
        }
    }

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
