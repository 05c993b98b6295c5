//! Argument validation. Every check reads tensor metadata only (no GPU synchronization).

use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// `t` must be finite and strictly positive.
pub(crate) fn temperature(t: f64) -> Result<()> {
    if t.is_finite() && t > 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidTemperature { t })
    }
}

/// A loss weight must be finite and non-negative.
pub(crate) fn weight(name: &'static str, value: f64) -> Result<()> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidWeight { name, value })
    }
}

pub(crate) fn is_float(kind: Kind) -> bool {
    matches!(kind, Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double)
}

/// What makes a tensor unfit as a `[rows, cols]` floating-point matrix (of logits,
/// probabilities, or points), as [`matrix_shape`] finds it. Its message names no argument: the
/// caller adds the name.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum MatrixProblem {
    /// Not of rank 2: the tensor's shape.
    #[error("must have rank 2, got shape {0:?}")]
    Rank(Vec<i64>),
    /// A dimension is 0: the tensor's shape.
    #[error("has an empty dimension: shape {0:?}")]
    Empty(Vec<i64>),
    /// Not half, bfloat16, float or double: the tensor's dtype.
    #[error("must be a floating-point tensor, got dtype {0:?}")]
    NotFloat(Kind),
    /// A dtype tch does not know (its number in libtorch's `ScalarType`).
    #[error("must be a floating-point tensor, got a dtype tch does not know ({0})")]
    UnknownKind(i32),
}

/// The `(rows, cols)` of a `[rows, cols]` floating-point (half, bfloat16, float or double)
/// tensor with both dimensions `>= 1`, read from metadata only (no GPU synchronization); the
/// check every function of this crate applies to logits and probabilities, for crates that
/// check their own arguments the same way.
///
/// ```text
/// rank(x) = 2,  rows >= 1,  cols >= 1,  dtype(x) in {f16, bf16, f32, f64}
/// ```
///
/// # Errors
/// The first [`MatrixProblem`] found, in the order rank, empty dimension, dtype.
///
/// # Example
/// ```
/// use tch::{Device, Kind, Tensor};
/// use kd_core::{matrix_shape, MatrixProblem};
/// assert_eq!(matrix_shape(&Tensor::zeros([2, 3], (Kind::Float, Device::Cpu))), Ok((2, 3)));
/// let flat = Tensor::zeros([6], (Kind::Float, Device::Cpu));
/// assert_eq!(matrix_shape(&flat), Err(MatrixProblem::Rank(vec![6])));
/// let ids = Tensor::zeros([2, 3], (Kind::Int64, Device::Cpu));
/// assert_eq!(matrix_shape(&ids).unwrap_err().to_string(), "must be a floating-point tensor, got dtype Int64");
/// ```
pub fn matrix_shape(x: &Tensor) -> std::result::Result<(i64, i64), MatrixProblem> {
    let shape = x.size();
    let &[rows, cols] = shape.as_slice() else {
        return Err(MatrixProblem::Rank(shape));
    };
    if rows == 0 || cols == 0 {
        return Err(MatrixProblem::Empty(shape));
    }
    let kind = match x.f_kind() {
        Ok(kind) => kind,
        Err(tch::TchError::UnknownKind(k)) => return Err(MatrixProblem::UnknownKind(k)),
        Err(_) => return Err(MatrixProblem::UnknownKind(-1)),
    };
    if !is_float(kind) {
        return Err(MatrixProblem::NotFloat(kind));
    }
    Ok((rows, cols))
}

/// A `[batch, classes]` floating-point tensor with both dimensions >= 1 ([`matrix_shape`]).
/// Returns its shape.
pub(crate) fn matrix(arg: &'static str, x: &Tensor) -> Result<Vec<i64>> {
    match matrix_shape(x) {
        Ok((rows, cols)) => Ok(vec![rows, cols]),
        Err(MatrixProblem::Rank(shape)) => Err(Error::BadRank { arg, shape }),
        Err(MatrixProblem::Empty(shape)) => Err(Error::EmptyDim { arg, shape }),
        Err(MatrixProblem::NotFloat(kind)) => Err(Error::NotFloat { arg, kind }),
        Err(MatrixProblem::UnknownKind(k)) => Err(Error::Torch(tch::TchError::UnknownKind(k))),
    }
}

/// Student logits and a teacher-side tensor (`arg`) of the same shape on the same device.
/// Returns the shared shape.
pub(crate) fn pair(student: &Tensor, arg: &'static str, teacher: &Tensor) -> Result<Vec<i64>> {
    let s = matrix("student_logits", student)?;
    let t = matrix(arg, teacher)?;
    if s != t {
        return Err(Error::ShapeMismatch { arg, student: s, shape: t });
    }
    same_device(student, arg, teacher)?;
    Ok(s)
}

/// `x` lives on the student logits' device.
pub(crate) fn same_device(student: &Tensor, arg: &'static str, x: &Tensor) -> Result<()> {
    let (device, expected) = (x.device(), student.device());
    if device != expected {
        return Err(Error::DeviceMismatch { arg, device, expected });
    }
    Ok(())
}

/// Labels: 1-D int64 of length `batch`, on the student logits' device.
pub(crate) fn labels(student: &Tensor, batch: i64, labels: &Tensor) -> Result<()> {
    let kind = labels.f_kind()?;
    if kind != Kind::Int64 {
        return Err(Error::LabelsKind { kind });
    }
    let shape = labels.size();
    if shape.as_slice() != [batch] {
        return Err(Error::LabelsShape { shape, batch });
    }
    same_device(student, "labels", labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temperature_bounds() {
        assert!(temperature(1e-12).is_ok());
        assert!(temperature(1e12).is_ok());
        for t in [0.0, -0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(matches!(temperature(t), Err(Error::InvalidTemperature { .. })), "{t}");
        }
    }

    #[test]
    fn weight_bounds() {
        assert!(weight("hard", 0.0).is_ok());
        for w in [-1e-9, f64::NAN, f64::INFINITY] {
            assert!(matches!(weight("soft", w), Err(Error::InvalidWeight { name: "soft", .. })));
        }
    }

    #[test]
    fn matrix_shape_names_the_problem_without_an_argument() {
        let f = |shape: &[i64], kind| Tensor::zeros(shape, (kind, tch::Device::Cpu));
        assert_eq!(matrix_shape(&f(&[4, 1], Kind::BFloat16)), Ok((4, 1)));
        assert_eq!(matrix_shape(&f(&[2, 3, 1], Kind::Float)), Err(MatrixProblem::Rank(vec![2, 3, 1])));
        let empty = matrix_shape(&f(&[2, 0], Kind::Float)).unwrap_err();
        assert_eq!(empty.to_string(), "has an empty dimension: shape [2, 0]");
        assert_eq!(matrix_shape(&f(&[2, 2], Kind::Bool)), Err(MatrixProblem::NotFloat(Kind::Bool)));
    }

    #[test]
    fn matrix_rejects_rank_empty_and_int() {
        let ok = Tensor::zeros([2, 3], (Kind::Float, tch::Device::Cpu));
        assert_eq!(matrix("x", &ok).unwrap(), vec![2, 3]);
        let r1 = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu));
        assert!(matches!(matrix("x", &r1), Err(Error::BadRank { arg: "x", .. })));
        let e = Tensor::zeros([0, 3], (Kind::Float, tch::Device::Cpu));
        assert!(matches!(matrix("x", &e), Err(Error::EmptyDim { .. })));
        let i = Tensor::zeros([2, 3], (Kind::Int64, tch::Device::Cpu));
        assert!(matches!(matrix("x", &i), Err(Error::NotFloat { kind: Kind::Int64, .. })));
    }
}
