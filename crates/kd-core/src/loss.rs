//! Distillation losses (paper section 2 and "Loss conventions").

use tch::{Reduction, Tensor};

use crate::check;
use crate::error::{Error, Result};
use crate::softmax::{scale, softmax_t_unchecked};

/// `ignore_index` passed to libtorch's cross-entropy for class labels: no int64 label equals it
/// in practice, so every example counts and the mean is over the full batch (a label of -100,
/// PyTorch's default ignore value, is *not* silently ignored: it is out of range).
const NO_IGNORE: i64 = i64::MIN;

/// `T^2 * mean_b(-sum_i p[b,i] log softmax(z[b]/T)_i)` for probabilities `p` already on the
/// student's dtype, detached. No checks.
fn soft_ce(student_logits: &Tensor, probs: &Tensor, t: f64) -> Result<Tensor> {
    // With probability targets, Reduction::Mean divides by the batch size only ("batchmean").
    let ce = scale(student_logits, t)?.f_cross_entropy_loss::<Tensor>(probs, None, Reduction::Mean, NO_IGNORE, 0.0)?;
    if t == 1.0 {
        Ok(ce)
    } else {
        Ok(ce.f_mul_scalar(t * t)?)
    }
}

/// `T^2 * mean_b H(p[b])`, the teacher's entropy term that separates the cross-entropy form of
/// the soft loss from its KL form, for detached probabilities `p`. `0 log 0 = 0`, so rows with
/// zeros (top-k targets) count only their nonzero classes. No checks.
fn scaled_entropy(probs: &Tensor, t: f64) -> Result<Tensor> {
    let batch = probs.size()[0] as f64;
    Ok(probs.f_special_entr()?.f_sum(probs.f_kind()?)?.f_mul_scalar(t * t / batch)?)
}

/// Teacher logits -> detached probabilities `softmax(v/T)` in the student's dtype. No checks.
fn teacher_probs_from_logits(student: &Tensor, teacher_logits: &Tensor, t: f64) -> Result<Tensor> {
    let v = teacher_logits.f_detach()?.f_to_kind(student.f_kind()?)?;
    softmax_t_unchecked(&v, t)
}

/// Teacher probabilities -> detached, in the student's dtype. No checks.
fn detached_probs(student: &Tensor, probs: &Tensor) -> Result<Tensor> {
    Ok(probs.f_detach()?.f_to_kind(student.f_kind()?)?)
}

/// Soft-target loss from teacher logits: the temperature cross-entropy scaled by `T^2`.
///
/// ```text
/// p[b] = softmax(v[b] / T)                       (teacher, detached)
/// q[b] = softmax(z[b] / T)                       (student)
/// C    = T^2 * (1/B) * sum_b sum_i -p[b,i] log q[b,i]
/// dC/dz[b,i] = T * (q[b,i] - p[b,i]) / B         (paper eq. 2 times T^2, over the batch mean)
/// ```
///
/// * `student_logits` `z`, `teacher_logits` `v`: `[B, classes]`, same shape, same device,
///   floating point. The teacher is detached (no gradient reaches it) and cast to the
///   student's dtype.
/// * `t`: temperature, finite and `> 0`.
/// * Reduction: sum over classes, mean over the batch (PyTorch `kl_div(..., "batchmean")`
///   convention, not a mean over classes). Returns a 0-dim tensor.
/// * The `T^2` factor keeps the soft gradient's magnitude independent of `T`, so the weight of
///   the hard term keeps its meaning when `T` changes. It is a cross-entropy, not a KL: it
///   exceeds the KL divergence by the teacher entropy `T^2 * mean_b H(p[b])`, a constant
///   w.r.t. the student.
///
/// # Errors
/// [`Error::InvalidTemperature`], [`Error::BadRank`], [`Error::EmptyDim`], [`Error::NotFloat`],
/// [`Error::ShapeMismatch`], [`Error::DeviceMismatch`].
///
/// # Example
/// ```
/// use tch::{Device, Kind, Tensor};
/// // teacher [0, 2 ln 3] at T = 2 gives p = [1/4, 3/4]; a zero student gives q = [1/2, 1/2].
/// let z = Tensor::zeros([1, 2], (Kind::Double, Device::Cpu)).set_requires_grad(true);
/// let v = Tensor::from_slice(&[0.0f64, 2.0 * 3f64.ln()]).view([1, 2]);
/// let loss = kd_core::soft_target_loss(&z, &v, 2.0)?;
/// // T^2 * H(p, q) = 4 * ln 2
/// assert!((loss.double_value(&[]) - 4.0 * 2f64.ln()).abs() < 1e-12);
/// loss.backward();
/// // T * (q - p) / B = 2 * ([1/2, 1/2] - [1/4, 3/4]) = [1/2, -1/2]
/// let g = z.grad();
/// assert!((g.double_value(&[0, 0]) - 0.5).abs() < 1e-12);
/// assert!((g.double_value(&[0, 1]) + 0.5).abs() < 1e-12);
/// # Ok::<(), kd_core::Error>(())
/// ```
pub fn soft_target_loss(student_logits: &Tensor, teacher_logits: &Tensor, t: f64) -> Result<Tensor> {
    check::temperature(t)?;
    check::pair(student_logits, "teacher_logits", teacher_logits)?;
    let p = teacher_probs_from_logits(student_logits, teacher_logits, t)?;
    soft_ce(student_logits, &p, t)
}

/// Soft-target loss from precomputed teacher probabilities (e.g. cached soft targets at `T`,
/// or the output of [`ensemble_probs`](crate::ensemble_probs)).
///
/// ```text
/// q[b] = softmax(z[b] / T)
/// C    = T^2 * (1/B) * sum_b sum_i -p[b,i] log q[b,i]
/// dC/dz[b,i] = T * (q[b,i] - p[b,i]) / B        (when each row of p sums to 1)
/// ```
///
/// * `student_logits` `z`, `teacher_probs` `p`: `[B, classes]`, same shape, same device,
///   floating point. `p` must already be the teacher's softmax **at the same `T`**; its rows
///   must sum to 1 (not checked: that would need a GPU synchronization). `p` is detached and
///   cast to the student's dtype.
/// * Reduction: sum over classes, mean over the batch; times `T^2`. Returns a 0-dim tensor.
///
/// # Errors
/// As [`soft_target_loss`] (with `arg = "teacher_probs"`).
///
/// # Example
/// ```
/// use tch::{Device, Kind, Tensor};
/// let z = Tensor::zeros([1, 2], (Kind::Double, Device::Cpu));
/// let p = Tensor::from_slice(&[0.25f64, 0.75]).view([1, 2]);
/// let loss = kd_core::soft_target_loss_from_probs(&z, &p, 2.0)?;
/// assert!((loss.double_value(&[]) - 4.0 * 2f64.ln()).abs() < 1e-12);
/// # Ok::<(), kd_core::Error>(())
/// ```
pub fn soft_target_loss_from_probs(student_logits: &Tensor, teacher_probs: &Tensor, t: f64) -> Result<Tensor> {
    check::temperature(t)?;
    check::pair(student_logits, "teacher_probs", teacher_probs)?;
    let p = detached_probs(student_logits, teacher_probs)?;
    soft_ce(student_logits, &p, t)
}

/// Hard-target loss: ordinary cross-entropy with the true labels, at `T = 1`.
///
/// ```text
/// C = (1/B) * sum_b -log softmax(z[b])[y[b]]
/// dC/dz[b,i] = (softmax(z[b])_i - [i == y[b]]) / B
/// ```
///
/// * `student_logits` `z`: `[B, classes]`, floating point.
/// * `labels` `y`: 1-D int64 of length `B`, class indices in `0..classes`, on the student's
///   device. Every example counts (no ignore index). Out-of-range labels are reported by
///   libtorch as [`Error::Torch`] on CPU; on CUDA they trigger a device-side assert, since
///   checking them here would synchronize the GPU.
/// * Reduction: mean over the batch. The temperature never applies here, and there is no
///   `T^2` factor. Returns a 0-dim tensor.
///
/// # Errors
/// [`Error::BadRank`], [`Error::EmptyDim`], [`Error::NotFloat`], [`Error::LabelsKind`],
/// [`Error::LabelsShape`], [`Error::DeviceMismatch`], [`Error::Torch`].
///
/// # Example
/// ```
/// use tch::Tensor;
/// let z = Tensor::from_slice(&[0.0f64, 3f64.ln()]).view([1, 2]); // softmax = [1/4, 3/4]
/// let y = Tensor::from_slice(&[1i64]);
/// let loss = kd_core::hard_target_loss(&z, &y)?;
/// assert!((loss.double_value(&[]) + 0.75f64.ln()).abs() < 1e-12);
/// # Ok::<(), kd_core::Error>(())
/// ```
pub fn hard_target_loss(student_logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let shape = check::matrix("student_logits", student_logits)?;
    check::labels(student_logits, shape[0], labels)?;
    hard_ce(student_logits, labels)
}

fn hard_ce(student_logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    Ok(student_logits.f_cross_entropy_loss::<Tensor>(labels, None, Reduction::Mean, NO_IGNORE, 0.0)?)
}

/// Logit matching (Caruana et al. 2006): half the mean squared error between logits.
///
/// ```text
/// C = (1/B) * sum_b (1/(2N)) * sum_i (z[b,i] - v[b,i])^2  =  0.5 * mse(z, v)
/// dC/dz[b,i] = (z[b,i] - v[b,i]) / (N * B)
/// ```
///
/// * `student_logits` `z`, `teacher_logits` `v`: `[B, N]`, same shape, same device, floating
///   point; the teacher is detached and cast to the student's dtype.
/// * Reduction: mean over both batch and classes, times 1/2. No temperature, no `T^2`.
/// * This is exactly the `T -> infinity` limit of the `T^2`-scaled [`soft_target_loss`]
///   gradient for zero-mean logits (paper eq. 4: `T^2 * (z_i - v_i) / (N T^2)`, then the batch
///   mean). Returns a 0-dim tensor.
///
/// # Errors
/// [`Error::BadRank`], [`Error::EmptyDim`], [`Error::NotFloat`], [`Error::ShapeMismatch`],
/// [`Error::DeviceMismatch`].
///
/// # Example
/// ```
/// use tch::Tensor;
/// let z = Tensor::from_slice(&[1.0f64, 2.0, 3.0, 4.0]).view([1, 4]);
/// let v = Tensor::zeros([1, 4], (tch::Kind::Double, tch::Device::Cpu));
/// let loss = kd_core::logit_matching_loss(&z, &v)?;
/// // (1 + 4 + 9 + 16) / (2 * 4) = 3.75
/// assert!((loss.double_value(&[]) - 3.75).abs() < 1e-12);
/// # Ok::<(), kd_core::Error>(())
/// ```
pub fn logit_matching_loss(student_logits: &Tensor, teacher_logits: &Tensor) -> Result<Tensor> {
    check::pair(student_logits, "teacher_logits", teacher_logits)?;
    let v = teacher_logits.f_detach()?.f_to_kind(student_logits.f_kind()?)?;
    Ok(student_logits.f_mse_loss(&v, Reduction::Mean)?.f_mul_scalar(0.5)?)
}

/// Weights of the combined objective
/// `total = hard * hard_target_loss + soft * soft_target_loss` (the soft term already
/// carries `T^2`).
///
/// Both weights are finite and `>= 0`, not both zero. The paper found that a "considerably
/// lower" weight on the hard term works best; [`LossWeights::default`] is pure soft targets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossWeights {
    /// Weight of the hard-label cross-entropy at `T = 1`.
    pub hard: f64,
    /// Weight of the `T^2`-scaled soft-target cross-entropy.
    pub soft: f64,
}

impl LossWeights {
    /// Validated weights: `hard >= 0`, `soft >= 0`, both finite, `hard + soft > 0`.
    ///
    /// ```text
    /// total = hard * C_hard + soft * T^2 * C_soft
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidWeight`] naming `"hard"` or `"soft"`; [`Error::ZeroWeights`].
    ///
    /// # Example
    /// ```
    /// let w = kd_core::LossWeights::new(0.1, 0.9)?;
    /// assert_eq!((w.hard, w.soft), (0.1, 0.9));
    /// assert!(kd_core::LossWeights::new(-0.1, 1.0).is_err());
    /// assert!(kd_core::LossWeights::new(0.0, 0.0).is_err());
    /// # Ok::<(), kd_core::Error>(())
    /// ```
    pub fn new(hard: f64, soft: f64) -> Result<Self> {
        let w = LossWeights { hard, soft };
        w.validate()?;
        Ok(w)
    }

    /// Checks a value built with the public fields (what [`LossWeights::new`] enforces).
    ///
    /// ```text
    /// hard, soft finite, hard >= 0, soft >= 0, hard + soft > 0
    /// ```
    ///
    /// # Errors
    /// As [`LossWeights::new`].
    ///
    /// # Example
    /// ```
    /// let w = kd_core::LossWeights { hard: 0.0, soft: 0.0 };
    /// assert!(matches!(w.validate(), Err(kd_core::Error::ZeroWeights)));
    /// assert_eq!(kd_core::LossWeights::default().validate().ok(), Some(()));
    /// ```
    pub fn validate(&self) -> Result<()> {
        check::weight("hard", self.hard)?;
        check::weight("soft", self.soft)?;
        if self.hard == 0.0 && self.soft == 0.0 {
            return Err(Error::ZeroWeights);
        }
        Ok(())
    }

    /// The combined objective from the terms that were computed (0-dim tensors; a term is
    /// `None` when its weight is 0 or it does not apply). The one place the weights are applied,
    /// for every loss of the crate.
    ///
    /// ```text
    /// total = hard * C_hard + soft * C_soft      (a missing term contributes nothing)
    /// ```
    ///
    /// # Errors
    /// [`Error::ZeroWeights`] when neither term is present; a libtorch error otherwise.
    ///
    /// # Example
    /// ```
    /// use tch::Tensor;
    /// let w = kd_core::LossWeights { hard: 0.25, soft: 0.75 };
    /// let (h, s) = (Tensor::from(2.0f64), Tensor::from(4.0f64));
    /// assert_eq!(w.combine(Some(&h), Some(&s))?.double_value(&[]), 3.5);
    /// assert_eq!(w.combine(None, Some(&s))?.double_value(&[]), 3.0);
    /// assert!(w.combine(None, None).is_err());
    /// # Ok::<(), kd_core::Error>(())
    /// ```
    pub fn combine(&self, hard: Option<&Tensor>, soft: Option<&Tensor>) -> Result<Tensor> {
        // x * 1.0 is x exactly: skip the kernel.
        let weighted = |x: &Tensor, w: f64| -> Result<Tensor> {
            Ok(if w == 1.0 { x.shallow_clone() } else { x.f_mul_scalar(w)? })
        };
        Ok(match (hard, soft) {
            (Some(h), Some(s)) => weighted(h, self.hard)?.f_add(&weighted(s, self.soft)?)?,
            (Some(h), None) => weighted(h, self.hard)?,
            (None, Some(s)) => weighted(s, self.soft)?,
            (None, None) => return Err(Error::ZeroWeights),
        })
    }

    /// Fails when the hard term has weight but no labels were given.
    ///
    /// # Errors
    /// [`Error::MissingLabels`] when `labels` is `None` and `hard > 0`.
    ///
    /// # Example
    /// ```
    /// let w = kd_core::LossWeights { hard: 0.5, soft: 0.5 };
    /// assert!(w.require_labels(None).is_err());
    /// assert!(kd_core::LossWeights::default().require_labels(None).is_ok());
    /// ```
    pub fn require_labels(&self, labels: Option<&Tensor>) -> Result<()> {
        if labels.is_none() && self.hard > 0.0 {
            return Err(Error::MissingLabels { hard: self.hard });
        }
        Ok(())
    }
}

impl Default for LossWeights {
    /// `{ hard: 0.0, soft: 1.0 }`: pure soft targets, as for the paper's distilled MNIST
    /// student. With `hard == 0`, [`distillation_loss`] accepts `labels = None`.
    fn default() -> Self {
        LossWeights { hard: 0.0, soft: 1.0 }
    }
}

/// What the teacher provides for the soft term.
#[derive(Clone, Copy, Debug)]
pub enum SoftTargets<'a> {
    /// Teacher logits `v` `[B, classes]`; turned into `softmax(v / T)` (detached).
    Logits(&'a Tensor),
    /// Teacher probabilities `p` `[B, classes]`, already at the same `T`, rows summing to 1
    /// (detached).
    Probs(&'a Tensor),
}

/// The terms of the combined objective, each a 0-dim tensor on the student's device.
///
/// `total = weights.hard * hard + weights.soft * soft`. `soft` already includes `T^2`.
/// A term whose weight is 0 is not computed and is returned as a constant zero.
///
/// The soft term comes in two forms. `soft` is the cross-entropy the paper optimizes;
/// `soft_kl` is the KL divergence from the teacher's distribution, which differs from it by the
/// teacher's entropy, a constant w.r.t. the student:
///
/// ```text
/// soft    = T^2 * (1/B) sum_b H(p[b], q[b])      (cross-entropy)
/// soft_kl = T^2 * (1/B) sum_b KL(p[b] || q[b])   = soft - T^2 * (1/B) sum_b H(p[b])
/// H(p, q) = KL(p || q) + H(p),   H(p) = -sum_i p_i log p_i   (0 log 0 = 0)
/// ```
///
/// Both have the same gradient. `soft_kl` is 0 when the student matches the teacher, so it is
/// the value to print or log: at `T = 20` over 10 classes the teacher's entropy term (up to
/// `400 * ln 10 = 921`) dominates `soft` whatever the student, while `soft_kl` shows the student
/// converging. In `f32` the subtraction leaves `soft_kl` with an absolute
/// error of about `1e-7 * soft`.
#[derive(Debug)]
pub struct DistillLoss {
    /// The weighted objective to back-propagate.
    pub total: Tensor,
    /// Unweighted hard-label cross-entropy at `T = 1` (zero if `weights.hard == 0`).
    pub hard: Tensor,
    /// Unweighted `T^2`-scaled soft-target cross-entropy (zero if `weights.soft == 0`).
    pub soft: Tensor,
    /// The same soft term in its KL form, `soft - T^2 * mean_b H(p[b])`: `T^2`-scaled
    /// `KL(p || q)`, mean over the batch (PyTorch `kl_div(..., "batchmean") * T^2`); zero if
    /// `weights.soft == 0`. Same gradient as `soft`.
    pub soft_kl: Tensor,
}

/// Combined distillation objective (paper section 2): weighted sum of the hard-label loss at
/// `T = 1` and the `T^2`-scaled soft-target loss at `T`.
///
/// ```text
/// hard  = (1/B) sum_b -log softmax(z[b])[y[b]]
/// soft  = T^2 * (1/B) sum_b sum_i -p[b,i] log softmax(z[b]/T)_i
/// total = w_hard * hard + w_soft * soft
/// soft_kl = soft - T^2 * (1/B) sum_b H(p[b])     (reported beside soft, not weighted)
/// dtotal/dz[b,i] = (w_hard * (softmax(z[b])_i - [i == y[b]]) + w_soft * T * (q[b,i] - p[b,i])) / B
/// ```
///
/// * `student_logits` `z`: `[B, classes]`, floating point.
/// * `teacher`: [`SoftTargets::Logits`] (`p = softmax(v/T)`) or [`SoftTargets::Probs`] (`p`
///   given), `[B, classes]`, same device; detached and cast to the student's dtype.
/// * `labels`: 1-D int64 of length `B`; may be `None` only when `weights.hard == 0`.
///   Given labels are validated even when unused.
/// * `t`: temperature of the soft term, finite and `> 0` (validated even if `weights.soft == 0`).
/// * `weights`: re-validated (its fields are public).
/// * A term whose weight is 0 is skipped (no kernels run) and returned as a zero 0-dim tensor
///   of the student's dtype and device.
///
/// # Errors
/// Everything the component losses return, plus [`Error::MissingLabels`],
/// [`Error::InvalidWeight`], [`Error::ZeroWeights`].
///
/// # Example
/// ```
/// use tch::{Device, Kind, Tensor};
/// use kd_core::{distillation_loss, LossWeights, SoftTargets};
/// let z = Tensor::zeros([1, 2], (Kind::Double, Device::Cpu));
/// let v = Tensor::from_slice(&[0.0f64, 2.0 * 3f64.ln()]).view([1, 2]); // p = [1/4, 3/4] at T = 2
/// let y = Tensor::from_slice(&[1i64]);
/// let w = LossWeights::new(0.5, 0.5)?;
/// let l = distillation_loss(&z, SoftTargets::Logits(&v), Some(&y), 2.0, w)?;
/// let ln2 = 2f64.ln();
/// assert!((l.hard.double_value(&[]) - ln2).abs() < 1e-12);        // -ln(1/2)
/// assert!((l.soft.double_value(&[]) - 4.0 * ln2).abs() < 1e-12);  // T^2 * ln 2
/// assert!((l.total.double_value(&[]) - 2.5 * ln2).abs() < 1e-12); // 0.5 hard + 0.5 soft
/// // KL form: T^2 * (1/4 ln(1/4 / 1/2) + 3/4 ln(3/4 / 1/2)) = soft - T^2 * H([1/4, 3/4])
/// let kl = 4.0 * (0.25 * 0.5f64.ln() + 0.75 * 1.5f64.ln());
/// assert!((l.soft_kl.double_value(&[]) - kl).abs() < 1e-12);
/// // Pure soft targets need no labels; the hard term is then a zero tensor.
/// let l = distillation_loss(&z, SoftTargets::Logits(&v), None, 2.0, LossWeights::default())?;
/// assert_eq!(l.hard.double_value(&[]), 0.0);
/// assert!((l.total.double_value(&[]) - 4.0 * ln2).abs() < 1e-12);
/// # Ok::<(), kd_core::Error>(())
/// ```
pub fn distillation_loss(
    student_logits: &Tensor,
    teacher: SoftTargets<'_>,
    labels: Option<&Tensor>,
    t: f64,
    weights: LossWeights,
) -> Result<DistillLoss> {
    // Validate everything before launching any kernel.
    weights.validate()?;
    check::temperature(t)?;
    let shape = match teacher {
        SoftTargets::Logits(v) => check::pair(student_logits, "teacher_logits", v)?,
        SoftTargets::Probs(p) => check::pair(student_logits, "teacher_probs", p)?,
    };
    weights.require_labels(labels)?;
    if let Some(y) = labels {
        check::labels(student_logits, shape[0], y)?;
    }

    let zero = || -> Result<Tensor> { Ok(Tensor::f_zeros([], (student_logits.f_kind()?, student_logits.device()))?) };

    let hard = match labels {
        Some(y) if weights.hard > 0.0 => Some(hard_ce(student_logits, y)?),
        _ => None,
    };
    let soft = if weights.soft > 0.0 {
        let p = match teacher {
            SoftTargets::Logits(v) => teacher_probs_from_logits(student_logits, v, t)?,
            SoftTargets::Probs(p) => detached_probs(student_logits, p)?,
        };
        let ce = soft_ce(student_logits, &p, t)?;
        let kl = ce.f_sub(&scaled_entropy(&p, t)?)?;
        Some((ce, kl))
    } else {
        None
    };
    let (soft, soft_kl) = soft.unzip();

    let total = weights.combine(hard.as_ref(), soft.as_ref())?;
    DistillLoss::from_terms(total, hard, soft, soft_kl, zero)
}

impl DistillLoss {
    /// The loss of `total` and its terms, a term not computed (weight 0) reported as `zero()`.
    pub(crate) fn from_terms(
        total: Tensor,
        hard: Option<Tensor>,
        soft: Option<Tensor>,
        soft_kl: Option<Tensor>,
        zero: impl Fn() -> Result<Tensor>,
    ) -> Result<Self> {
        let or_zero = |t: Option<Tensor>| t.map_or_else(&zero, Ok);
        Ok(DistillLoss { total, hard: or_zero(hard)?, soft: or_zero(soft)?, soft_kl: or_zero(soft_kl)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn t2(v: &[f64], rows: i64) -> Tensor {
        Tensor::from_slice(v).view([rows, -1])
    }

    const S: [f64; 8] = [1.0, -0.5, 2.0, 0.0, 0.3, 0.3, -1.2, 2.2];
    const V: [f64; 8] = [0.2, 1.5, -1.0, 0.7, -2.0, 0.1, 0.9, 1.1];

    /// libtorch's cross_entropy with probability targets and Reduction::Mean divides by the
    /// batch size only ("batchmean"), not by batch * classes.
    #[test]
    fn soft_loss_is_batchmean_of_per_example_sums() {
        let (s, v) = (t2(&S, 2), t2(&V, 2));
        for t in [1.0, 2.5, 7.0] {
            let p = (&v / t).softmax(-1, None);
            let lq = (&s / t).log_softmax(-1, None);
            let explicit = -(p * lq).sum_dim_intlist(-1, false, None).mean(None) * (t * t);
            let got = soft_target_loss(&s, &v, t).unwrap();
            assert!(got.allclose(&explicit, 1e-13, 1e-13, false), "T={t}");
            assert_eq!(got.size(), Vec::<i64>::new());
        }
    }

    #[test]
    fn teacher_gets_no_gradient() {
        let s = t2(&S, 2).set_requires_grad(true);
        let v = t2(&V, 2).set_requires_grad(true);
        let p = (&v / 3.0).softmax(-1, None);
        soft_target_loss(&s, &v, 3.0).unwrap().backward();
        logit_matching_loss(&s, &v).unwrap().backward();
        soft_target_loss_from_probs(&s, &p, 3.0).unwrap().backward();
        assert!(s.grad().defined());
        assert!(!v.grad().defined(), "gradient leaked into the teacher");
    }

    #[test]
    fn hard_loss_counts_every_example() {
        let s = t2(&S, 2);
        let y = Tensor::from_slice(&[2i64, 3]);
        let lq = s.log_softmax(-1, None);
        let want = -(lq.double_value(&[0, 2]) + lq.double_value(&[1, 3])) / 2.0;
        let got = hard_target_loss(&s, &y).unwrap().double_value(&[]);
        assert!((got - want).abs() < 1e-14);
        // -100 is not an ignore index here: it is an out-of-range label.
        let bad = Tensor::from_slice(&[-100i64, 3]);
        assert!(matches!(hard_target_loss(&s, &bad), Err(Error::Torch(_))));
    }

    #[test]
    fn skipped_terms_are_zero_on_student_dtype() {
        let s = t2(&S, 2).to_kind(Kind::Float);
        let v = t2(&V, 2).to_kind(Kind::Float);
        let y = Tensor::from_slice(&[0i64, 1]);
        let l =
            distillation_loss(&s, SoftTargets::Logits(&v), Some(&y), 2.0, LossWeights::new(1.0, 0.0).unwrap()).unwrap();
        assert_eq!(l.soft.kind(), Kind::Float);
        assert_eq!(l.soft.device(), Device::Cpu);
        assert_eq!(l.soft.double_value(&[]), 0.0);
        assert_eq!(l.soft_kl.double_value(&[]), 0.0);
        assert_eq!(l.total.double_value(&[]), l.hard.double_value(&[]));
    }

    #[test]
    fn default_weights_are_pure_soft() {
        assert_eq!(LossWeights::default(), LossWeights { hard: 0.0, soft: 1.0 });
    }
}
