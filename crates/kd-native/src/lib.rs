//! Safe Rust wrappers over the libtorch pieces that `tch` 0.24 does not expose, compiled from one
//! small C++ file (`src/shim.cpp`) against the headers of the libtorch that tch links.
//!
//! - [`launch`]: the launch environment of torchrun or Slurm (rank, world size, local rank,
//!   master address and port), parsed from environment variables. Pure Rust.
//! - [`dist`]: c10d process groups, the engine of PyTorch's own DDP: rendezvous through c10d's
//!   `TCPStore`, `ProcessGroupGloo` on CPU tensors (feature `gloo`) and `ProcessGroupNCCL` on
//!   CUDA tensors (feature `nccl`); all-reduce (sum or mean, of one tensor or a list through
//!   flat buckets), broadcast, all-gather and barrier, each bounded by a timeout so that a dead
//!   or hung peer becomes an [`Error`], never an endless wait.
//! - [`optim`]: libtorch's fused optimizer kernels `_fused_sgd_` and `_fused_adam_` (one kernel
//!   over a whole list of parameters, on CPU and CUDA).
//! - [`linear`]: linear layers (and a fused ReLU) whose forward product runs on libtorch's
//!   oneDNN kernel where that is faster than its default CPU kernel, with PyTorch's backward.
//! - [`rng`]: the state of libtorch's default random generators, read and restored.
//! - [`cuda`]: the TF32 switches for cuBLAS and cuDNN; with feature `cuda`, CUDA-graph capture
//!   and replay and device properties.
//!
//! Without features the crate needs only libtorch's own headers, and every process-group
//! constructor returns [`Error::NotBuilt`] saying which feature to enable.
//!
//! ```
//! use kd_native::optim::{fused_sgd, Lr, SgdOptions};
//! use tch::{Device, Kind, Tensor};
//!
//! let mut params = vec![Tensor::ones([3], (Kind::Float, Device::Cpu))];
//! let grads = vec![Tensor::from_slice(&[1.0f32, 2.0, 3.0])];
//! let mut buffers = vec![params[0].zeros_like()];
//! let sgd = SgdOptions { momentum: 0.9, ..SgdOptions::default() };
//! fused_sgd(&mut params, &grads, &mut buffers, &sgd, Lr::Value(0.1)).unwrap();
//! // p <- p - lr * (0.9 * 0 + g)
//! assert_eq!(Vec::<f32>::try_from(&params[0]).unwrap(), [0.9, 0.8, 0.7]);
//! ```
#![deny(missing_docs)]

pub mod build;
pub mod cuda;
pub mod dist;
mod ffi;
pub mod launch;
pub mod linear;
pub mod optim;
pub mod rng;

/// What can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// libtorch (or c10d, Gloo, NCCL) raised an exception; `message` is its text.
    #[error("{op} failed: {message}")]
    Native {
        /// The operation, e.g. `"all-reduce"`.
        op: &'static str,
        /// The C++ exception's message.
        message: String,
    },
    /// An argument is invalid; the message names it and says what was expected.
    #[error("{0}")]
    Invalid(String),
    /// The operation needs a part this build does not have.
    #[error("kd-native was built without {what}: {hint}")]
    NotBuilt {
        /// The missing part, e.g. `"Gloo (feature `gloo`)"`.
        what: &'static str,
        /// How to get it.
        hint: &'static str,
    },
    /// The launch environment (torchrun's or Slurm's variables) is incomplete or inconsistent.
    #[error("launch environment: {0}")]
    Launch(String),
    /// Ranks that should hold the same value do not (see [`dist::ProcessGroup::agree`]).
    #[error("{0}")]
    Disagreement(String),
}

/// This crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// Wraps a shim error message as [`Error::Native`] for `op`.
pub(crate) fn native(op: &'static str) -> impl FnOnce(String) -> Error {
    move |message| Error::Native { op, message }
}
