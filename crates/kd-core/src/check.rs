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

/// A `[batch, classes]` floating-point tensor with both dimensions >= 1. Returns its shape.
pub(crate) fn matrix(arg: &'static str, x: &Tensor) -> Result<Vec<i64>> {
    let shape = x.size();
    if shape.len() != 2 {
        return Err(Error::BadRank { arg, shape });
    }
    if shape[0] == 0 || shape[1] == 0 {
        return Err(Error::EmptyDim { arg, shape });
    }
    let kind = x.f_kind()?;
    if !is_float(kind) {
        return Err(Error::NotFloat { arg, kind });
    }
    Ok(shape)
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
