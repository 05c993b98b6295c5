//! The crate's error type and the argument checks shared by its modules.

use tch::{Device, Kind, TchError, Tensor};

/// Result alias used by every fallible function of the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in `kd-specialists`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An argument is malformed; `arg` names it (e.g. `specialists[2].1`) and `reason` says
    /// what is wrong, with the offending shape, dtype or value.
    #[error("invalid argument `{arg}`: {reason}")]
    Argument {
        /// Name of the argument, as written in the function's signature.
        arg: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Building a model failed.
    #[error(transparent)]
    Model(#[from] kd_models::Error),
    /// An error reported by libtorch (e.g. a label out of range, detected on the CPU).
    #[error("libtorch error: {0}")]
    Torch(#[from] TchError),
}

/// An [`Error::Argument`].
pub(crate) fn bad(arg: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Argument { arg: arg.into(), reason: reason.into() }
}

/// The dtype computations run in: double stays double, everything else becomes float.
pub(crate) fn compute_kind(kind: Kind) -> Kind {
    if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// A `[rows, cols]` floating-point tensor with both dimensions >= 1, kd-core's check
/// ([`kd_core::matrix_shape`]). Returns `(rows, cols)`.
pub(crate) fn matrix(arg: &str, x: &Tensor) -> Result<(i64, i64)> {
    kd_core::matrix_shape(x).map_err(|problem| bad(arg, problem.to_string()))
}

/// A 1-D int64 tensor. Returns its length.
pub(crate) fn int_vector(arg: &str, x: &Tensor) -> Result<i64> {
    let shape = x.size();
    let &[len] = shape.as_slice() else {
        return Err(bad(arg, format!("must be 1-D, got shape {shape:?}")));
    };
    let kind = x.f_kind()?;
    if kind != Kind::Int64 {
        return Err(bad(arg, format!("must be an int64 tensor of class ids, got dtype {kind:?}")));
    }
    Ok(len)
}

/// `x` lives on `expected`, the device of the argument named `reference`.
pub(crate) fn same_device(arg: &str, x: &Tensor, expected: Device, reference: &str) -> Result<()> {
    let device = x.device();
    if device != expected {
        return Err(bad(arg, format!("is on device {device:?} but `{reference}` is on {expected:?}")));
    }
    Ok(())
}
