//! Temperature softmax (paper section 2): `q_i = exp(z_i/T) / sum_j exp(z_j/T)`.

use tch::Tensor;

use crate::check;
use crate::error::Result;

/// `z / T`, skipping the division when `T == 1`.
pub(crate) fn scale(logits: &Tensor, t: f64) -> Result<Tensor> {
    if t == 1.0 {
        Ok(logits.shallow_clone())
    } else {
        Ok(logits.f_div_scalar(t)?)
    }
}

/// Unchecked `log_softmax(z / T)` over the last dimension.
pub(crate) fn log_softmax_t_unchecked(logits: &Tensor, t: f64) -> Result<Tensor> {
    Ok(scale(logits, t)?.f_log_softmax(-1, None)?)
}

/// Unchecked `exp(log_softmax(z / T))` over the last dimension.
pub(crate) fn softmax_t_unchecked(logits: &Tensor, t: f64) -> Result<Tensor> {
    Ok(log_softmax_t_unchecked(logits, t)?.f_exp()?)
}

/// Temperature softmax over the classes.
///
/// ```text
/// q[b, i] = exp(z[b, i] / T) / sum_j exp(z[b, j] / T)
/// ```
///
/// * `logits`: `[batch, classes]`, floating point (any float dtype, any device); output has the
///   same shape, dtype and device. No reduction; no `T^2` factor (that belongs to the loss).
/// * `t`: temperature, finite and `> 0`. `T = 1` is the ordinary softmax; larger `T` is softer.
///
/// Computed as `exp(log_softmax(z / T))`; libtorch's log-softmax subtracts the row maximum, so
/// logits in the thousands are fine. Gradients flow to `logits`.
///
/// # Errors
/// [`Error::InvalidTemperature`](crate::Error::InvalidTemperature),
/// [`Error::BadRank`](crate::Error::BadRank), [`Error::EmptyDim`](crate::Error::EmptyDim),
/// [`Error::NotFloat`](crate::Error::NotFloat).
///
/// # Example
/// ```
/// use tch::Tensor;
/// // logits [0, 2 ln 3] at T = 2 behave like [0, ln 3] at T = 1: probabilities [1/4, 3/4].
/// let z = Tensor::from_slice(&[0.0f64, 2.0 * 3f64.ln()]).view([1, 2]);
/// let q = kd_core::softmax_t(&z, 2.0)?;
/// assert!((q.double_value(&[0, 0]) - 0.25).abs() < 1e-12);
/// assert!((q.double_value(&[0, 1]) - 0.75).abs() < 1e-12);
/// # Ok::<(), kd_core::Error>(())
/// ```
pub fn softmax_t(logits: &Tensor, t: f64) -> Result<Tensor> {
    check::temperature(t)?;
    check::matrix("logits", logits)?;
    softmax_t_unchecked(logits, t)
}

/// Log of the temperature softmax over the classes.
///
/// ```text
/// log q[b, i] = z[b, i] / T - log sum_j exp(z[b, j] / T)
/// ```
///
/// * `logits`: `[batch, classes]`, floating point; output has the same shape, dtype and device.
///   No reduction; no `T^2` factor.
/// * `t`: temperature, finite and `> 0`.
///
/// Uses libtorch's `log_softmax` (max-subtracted, stable for large logits).
///
/// # Errors
/// As [`softmax_t`].
///
/// # Example
/// ```
/// use tch::Tensor;
/// let z = Tensor::from_slice(&[0.0f64, 2.0 * 3f64.ln()]).view([1, 2]);
/// let lq = kd_core::log_softmax_t(&z, 2.0)?;
/// assert!((lq.double_value(&[0, 0]) - 0.25f64.ln()).abs() < 1e-12);
/// assert!((lq.double_value(&[0, 1]) - 0.75f64.ln()).abs() < 1e-12);
/// # Ok::<(), kd_core::Error>(())
/// ```
pub fn log_softmax_t(logits: &Tensor, t: f64) -> Result<Tensor> {
    check::temperature(t)?;
    check::matrix("logits", logits)?;
    log_softmax_t_unchecked(logits, t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    fn close(a: &Tensor, b: &Tensor, tol: f64) -> bool {
        a.allclose(b, tol, tol, false)
    }

    #[test]
    fn matches_explicit_formula() {
        let z = Tensor::from_slice(&[1.0f64, -2.0, 0.5, 3.0, 3.0, -1.0]).view([2, 3]);
        for t in [0.5, 1.0, 3.0] {
            let e = (&z / t).exp();
            let want = &e / e.sum_dim_intlist(-1, true, None);
            let got = softmax_t(&z, t).unwrap();
            assert!(close(&got, &want, 1e-14), "T={t}");
            let lgot = log_softmax_t(&z, t).unwrap();
            assert!(close(&lgot, &want.log(), 1e-14), "T={t}");
        }
    }

    #[test]
    fn higher_temperature_is_softer() {
        let z = Tensor::from_slice(&[4.0f64, 0.0, -4.0]).view([1, 3]);
        let p1 = softmax_t(&z, 1.0).unwrap().double_value(&[0, 0]);
        let p5 = softmax_t(&z, 5.0).unwrap().double_value(&[0, 0]);
        let p100 = softmax_t(&z, 100.0).unwrap().double_value(&[0, 0]);
        assert!(p1 > p5 && p5 > p100 && p100 > 1.0 / 3.0);
    }

    #[test]
    fn rejects_bad_arguments() {
        let z = Tensor::zeros([2, 3], (tch::Kind::Float, tch::Device::Cpu));
        assert!(matches!(
            softmax_t(&z, 0.0),
            Err(Error::InvalidTemperature { t }) if t == 0.0
        ));
        assert!(matches!(
            log_softmax_t(&z.view([6]), 1.0),
            Err(Error::BadRank { arg: "logits", ref shape }) if shape == &[6]
        ));
    }
}
