//! The state of libtorch's default random generators, which `tch` cannot read: saved in a
//! checkpoint inside an epoch and restored on resume, the dropout masks and jitter shifts that
//! follow are those of the uninterrupted run.
//!
//! ```
//! use kd_native::rng::{generator_state, set_generator_state, GeneratorDevice};
//! use tch::{Device, Kind, Tensor};
//!
//! tch::manual_seed(7);
//! let state = generator_state(GeneratorDevice::Cpu).unwrap();
//! let a = Tensor::rand([4], (Kind::Float, Device::Cpu));
//! set_generator_state(GeneratorDevice::Cpu, &state).unwrap();
//! let b = Tensor::rand([4], (Kind::Float, Device::Cpu));
//! assert!(a.equal(&b));
//! ```
use crate::{native, Result};
use tch::Tensor;

/// Whose default generator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GeneratorDevice {
    /// The CPU's (`tch::manual_seed` seeds it, with every CUDA device's).
    Cpu,
    /// CUDA device `i`'s.
    Cuda(usize),
}

impl GeneratorDevice {
    fn code(self) -> i32 {
        match self {
            GeneratorDevice::Cpu => -1,
            GeneratorDevice::Cuda(i) => i as i32,
        }
    }
}

/// A copy of the state of `device`'s default generator (a uint8 tensor on the CPU), taken under
/// the generator's lock.
pub fn generator_state(device: GeneratorDevice) -> Result<Tensor> {
    crate::ffi::generator_state(device.code()).map_err(native("reading a generator's state"))
}

/// Sets `device`'s default generator to a state [`generator_state`] returned (of the same kind
/// of device); libtorch rejects a state of another kind or size.
pub fn set_generator_state(device: GeneratorDevice, state: &Tensor) -> Result<()> {
    crate::ffi::set_generator_state(device.code(), state).map_err(native("restoring a generator's state"))
}
