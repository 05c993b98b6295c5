//! Combining an ensemble of teachers into one soft-target distribution.

use tch::Tensor;

use crate::check;
use crate::error::{Error, Result};
use crate::softmax::{log_softmax_t_unchecked, softmax_t_unchecked};

/// How ensemble members' predictions are combined (all at the same temperature `T`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EnsembleRule {
    /// `p = (1/M) sum_m softmax(z_m / T)`: the arithmetic mean of the members' distributions,
    /// the paper's ensemble (section 2). The default.
    #[default]
    ArithmeticMean,
    /// `p = softmax((1/M) sum_m log_softmax(z_m / T))`: the normalized geometric mean of the
    /// members' distributions. Mathematically equal to [`EnsembleRule::MeanLogits`], because
    /// `log_softmax` differs from `z/T` by a per-row constant; kept as a separate rule for
    /// configurations that name it.
    GeometricMean,
    /// `p = softmax(((1/M) sum_m z_m) / T)`: softmax of the averaged logits.
    MeanLogits,
}

/// Combined ensemble probabilities at temperature `T`.
///
/// ```text
/// ArithmeticMean: p[b] = (1/M) sum_m softmax(z_m[b] / T)
/// GeometricMean:  p[b] = softmax((1/M) sum_m log_softmax(z_m[b] / T))
/// MeanLogits:     p[b] = softmax(((1/M) sum_m z_m[b]) / T)
/// ```
///
/// * `member_logits`: `M >= 1` tensors `[B, classes]` of identical shape, dtype and device.
/// * `t`: temperature, finite and `> 0`.
/// * Returns `[B, classes]` probabilities (rows sum to 1) on the members' dtype and device.
///   No reduction over the batch, no `T^2` (that belongs to the loss). The result is **not**
///   detached; pass it to [`soft_target_loss_from_probs`](crate::soft_target_loss_from_probs)
///   or [`SoftTargets::Probs`](crate::SoftTargets::Probs), which detach it, at the same `T`.
/// * With one member every rule returns `softmax(z_0 / T)`.
///
/// # Errors
/// [`Error::EmptyEnsemble`], [`Error::InvalidTemperature`], [`Error::BadRank`],
/// [`Error::EmptyDim`], [`Error::NotFloat`] (checked on member 0, named `member_logits[0]`),
/// [`Error::MemberShape`], [`Error::MemberKind`], [`Error::MemberDevice`].
///
/// # Example
/// ```
/// use tch::Tensor;
/// use kd_core::{ensemble_probs, EnsembleRule};
/// let a = Tensor::from_slice(&[0.0f64, 0.0]).view([1, 2]);       // [1/2, 1/2]
/// let b = Tensor::from_slice(&[0.0f64, 3f64.ln()]).view([1, 2]); // [1/4, 3/4]
/// let p = ensemble_probs(&[a.shallow_clone(), b.shallow_clone()], 1.0, EnsembleRule::ArithmeticMean)?;
/// assert!((p.double_value(&[0, 0]) - 0.375).abs() < 1e-12);
/// assert!((p.double_value(&[0, 1]) - 0.625).abs() < 1e-12);
/// // Geometric mean: sqrt(1/2 * 1/4) : sqrt(1/2 * 3/4) = 1 : sqrt(3), normalized.
/// let g = ensemble_probs(&[a, b], 1.0, EnsembleRule::GeometricMean)?;
/// assert!((g.double_value(&[0, 0]) - 1.0 / (1.0 + 3f64.sqrt())).abs() < 1e-12);
/// # Ok::<(), kd_core::Error>(())
/// ```
pub fn ensemble_probs(member_logits: &[Tensor], t: f64, rule: EnsembleRule) -> Result<Tensor> {
    let first = check_members(member_logits, t)?;
    if member_logits.len() == 1 {
        return softmax_t_unchecked(first, t);
    }
    let z = Tensor::f_stack(member_logits, 0)?; // [M, B, C]
    match rule {
        EnsembleRule::ArithmeticMean => Ok(softmax_t_unchecked(&z, t)?.f_mean_dim(0, false, None)?),
        EnsembleRule::GeometricMean => {
            let mean_log = log_softmax_t_unchecked(&z, t)?.f_mean_dim(0, false, None)?;
            softmax_t_unchecked(&mean_log, 1.0)
        }
        EnsembleRule::MeanLogits => softmax_t_unchecked(&z.f_mean_dim(0, false, None)?, t),
    }
}

/// Logits whose softmax at `T` is the ensemble's arithmetic mean at `T`, so that a cache or a
/// loss can treat an ensemble like one network.
///
/// ```text
/// M = 1:  v[b] = z_0[b]                                        (passes through)
/// M > 1:  v[b] = T * (logsumexp_m log_softmax(z_m[b] / T) - ln M)
///         softmax(v[b] / T) = (1/M) sum_m softmax(z_m[b] / T)  (= ensemble_probs, ArithmeticMean)
/// ```
///
/// * `member_logits`, `t`: as [`ensemble_probs`] (`M >= 1` tensors `[B, classes]` of one shape,
///   dtype and device; `T` finite and `> 0`).
/// * Returns `[B, classes]` on the members' dtype and device, not detached. The result is
///   meant for the temperature it was made at: at another temperature its softmax is not the
///   members' mean (for `M > 1`).
///
/// # Errors
/// As [`ensemble_probs`].
///
/// # Example
/// ```
/// use tch::Tensor;
/// use kd_core::{ensemble_logits, softmax_t};
/// let a = Tensor::from_slice(&[0.0f64, 0.0]).view([1, 2]);                 // at T = 2: [1/2, 1/2]
/// let b = Tensor::from_slice(&[0.0f64, 2.0 * 3f64.ln()]).view([1, 2]);     // at T = 2: [1/4, 3/4]
/// let v = ensemble_logits(&[a, b], 2.0)?;
/// let p = softmax_t(&v, 2.0)?;
/// assert!((p.double_value(&[0, 0]) - 0.375).abs() < 1e-12);
/// assert!((p.double_value(&[0, 1]) - 0.625).abs() < 1e-12);
/// # Ok::<(), kd_core::Error>(())
/// ```
pub fn ensemble_logits(member_logits: &[Tensor], t: f64) -> Result<Tensor> {
    let first = check_members(member_logits, t)?;
    if member_logits.len() == 1 {
        return Ok(first.shallow_clone());
    }
    let log_probs = member_logits.iter().map(|z| log_softmax_t_unchecked(z, t)).collect::<Result<Vec<_>>>()?;
    let stacked = Tensor::f_stack(&log_probs, 0)?;
    Ok(stacked.f_logsumexp([0], false)?.f_sub_scalar((member_logits.len() as f64).ln())?.f_mul_scalar(t)?)
}

/// The checks of [`ensemble_probs`]: at least one member, `t` valid, every member of member 0's
/// shape, dtype and device. Returns member 0.
fn check_members(member_logits: &[Tensor], t: f64) -> Result<&Tensor> {
    let first = member_logits.first().ok_or(Error::EmptyEnsemble)?;
    check::temperature(t)?;
    let shape = check::matrix("member_logits[0]", first)?;
    let (kind, device) = (first.f_kind()?, first.device());
    for (index, m) in member_logits.iter().enumerate().skip(1) {
        let s = m.size();
        if s != shape {
            return Err(Error::MemberShape { index, shape: s, expected: shape });
        }
        let k = m.f_kind()?;
        if k != kind {
            return Err(Error::MemberKind { index, kind: k, expected: kind });
        }
        if m.device() != device {
            return Err(Error::MemberDevice { index, device: m.device(), expected: device });
        }
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(v: &[f64]) -> Tensor {
        Tensor::from_slice(v).view([2, -1])
    }

    #[test]
    fn geometric_equals_mean_logits() {
        let _generator = crate::lock_global_generator();
        let ms = [
            m(&[1.0, 2.0, -1.0, 0.5, 0.0, 3.0]),
            m(&[-2.0, 0.1, 0.4, 2.5, -1.0, 1.0]),
            m(&[0.3, 0.3, 0.9, -0.7, 1.7, -2.2]),
        ];
        for t in [1.0, 3.0] {
            let g = ensemble_probs(&ms, t, EnsembleRule::GeometricMean).unwrap();
            let l = ensemble_probs(&ms, t, EnsembleRule::MeanLogits).unwrap();
            let a = ensemble_probs(&ms, t, EnsembleRule::ArithmeticMean).unwrap();
            assert!(g.allclose(&l, 1e-14, 1e-14, false));
            assert!(!a.allclose(&g, 1e-6, 1e-6, false));
        }
    }

    #[test]
    fn ensemble_logits_soften_to_the_mean_of_the_members_distributions() {
        let _generator = crate::seed_global_generator(7);
        let members: Vec<Tensor> =
            (0..3).map(|_| Tensor::randn([5, 4], (tch::Kind::Double, tch::Device::Cpu)) * 6.0).collect();
        for t in [1.0, 2.5, 20.0] {
            let combined = ensemble_logits(&members, t).unwrap();
            let ours = crate::softmax_t(&combined, t).unwrap();
            let reference = ensemble_probs(&members, t, EnsembleRule::ArithmeticMean).unwrap();
            let gap = f64::try_from((ours - reference).abs().max()).unwrap();
            assert!(gap < 1e-12, "T = {t}: {gap}");
        }
        let one = ensemble_logits(&members[..1], 3.0).unwrap();
        assert!(one.equal(&members[0]), "a single member's logits pass through");
        assert!(matches!(ensemble_logits(&[], 1.0), Err(Error::EmptyEnsemble)));
        assert!(matches!(ensemble_logits(&members, 0.0), Err(Error::InvalidTemperature { .. })));
        let other = Tensor::zeros([5, 3], (tch::Kind::Double, tch::Device::Cpu));
        let mixed = [members[0].shallow_clone(), other];
        assert!(matches!(ensemble_logits(&mixed, 1.0), Err(Error::MemberShape { index: 1, .. })));
    }

    #[test]
    fn default_rule_is_arithmetic() {
        assert_eq!(EnsembleRule::default(), EnsembleRule::ArithmeticMean);
    }
}
