//! Soft targets kept as a teacher's `k` most probable classes: the distillation loss without a
//! dense `[batch, classes]` target.
//!
//! A teacher over many classes (the acoustic model's 14,000 tied states) is cached as its top `k`
//! probabilities per example and their class ids. Expanding them into a zero matrix before the
//! usual cross-entropy costs several `[batch, classes]` tensors per step; here the loss reads the
//! `k` entries directly:
//!
//! ```text
//! lse[b]  = logsumexp_i z[b,i] / T                               (in f32, also for bf16 logits)
//! C_soft  = T^2 * (1/B) * sum_b sum_k p[b,k] (lse[b] - z[b, c[b,k]] / T)
//!         = T^2 * (1/B) * sum_b sum_k -p[b,k] log q[b, c[b,k]]     (q = softmax(z / T))
//! dC_soft/dz[b,i] = T * (s[b] q[b,i] - sum_k p[b,k] [c[b,k] == i]) / B,   s[b] = sum_k p[b,k]
//! ```
//!
//! which is exactly [`soft_target_loss_from_probs`](crate::soft_target_loss_from_probs) of the
//! dense target `P[b, c[b,k]] = p[b,k]` (zero elsewhere), value and gradient. With renormalized
//! top-k probabilities `s[b] = 1` and this is `T^2 * mean_b (lse[b] - sum_k p[b,k] z[b,c[b,k]] / T)`.
//!
//! The gradient is computed in the forward pass from one log-softmax (which becomes the gradient
//! in place) and attached to the loss through `z . G`, so autograd keeps no other `[B, classes]`
//! tensor: the loss and its backward hold one `[B, classes]` buffer beyond the logits' own
//! gradient (two while a hard term at `T != 1` is folded in). Only first-order gradients are
//! available (no double backward).

use tch::{Kind, Tensor};

use crate::check;
use crate::error::{Error, Result};
use crate::loss::{DistillLoss, LossWeights};

/// Which quantity the soft term reports: the cross-entropy with the teacher's top-k
/// distribution or the KL divergence from it. They differ by the teacher's entropy over its `k`
/// probabilities, `T^2 * mean_b H(p[b])` (a constant w.r.t. the student), so their gradients are
/// the same.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TopKForm {
    /// `T^2 * mean_b sum_k -p[b,k] log q[b, c[b,k]]` (the convention of the dense losses).
    #[default]
    CrossEntropy,
    /// `T^2 * mean_b sum_k p[b,k] (log p[b,k] - log q[b, c[b,k]])`: zero when the student's
    /// distribution at `T` equals the teacher's top-k distribution (`0 log 0 = 0`).
    Kl,
}

/// A teacher's top-k soft targets for a batch: probabilities at `T` and the class each one is
/// for, both `[B, k]` with `1 <= k <= classes`.
#[derive(Clone, Copy, Debug)]
pub struct TopKTargets<'a> {
    /// `[B, k]` floating point, the teacher's probabilities at `T` (rows usually renormalized to
    /// sum to 1 over the `k`); detached and used in f32 (f64 for f64 logits).
    pub probs: &'a Tensor,
    /// `[B, k]` int64 class ids in `0..classes`, distinct within a row (repeated ids add up).
    pub classes: &'a Tensor,
}

/// Soft-target loss from a teacher's top-k probabilities, never building a dense target.
///
/// ```text
/// C_soft = T^2 * (1/B) * sum_b sum_k p[b,k] (logsumexp_i(z[b,i] / T) - z[b, c[b,k]] / T)
/// dC/dz[b,i] = T * (s[b] softmax(z[b]/T)_i - sum_k p[b,k] [c[b,k] == i]) / B,   s[b] = sum_k p[b,k]
/// TopKForm::Kl subtracts T^2 * (1/B) * sum_b H(p[b]),   H(p) = -sum_k p_k log p_k
/// ```
///
/// * `student_logits` `z`: `[B, classes]`, floating point. bf16 / f16 logits are read into
///   f32 for the log-softmax (no reduced-precision logsumexp); f64 logits stay f64. The gradient
///   comes back in `z`'s dtype.
/// * `targets`: `[B, k]` probabilities and int64 class ids on `z`'s device, detached. Class ids
///   out of range are reported by libtorch as [`Error::Torch`] on CPU; on CUDA they trigger a
///   device-side assert (checking them here would synchronize the GPU).
/// * `t`: temperature, finite and `> 0`.
/// * Reduction: sum over the `k` classes, mean over the batch, times `T^2` ("batchmean", as
///   [`soft_target_loss`](crate::soft_target_loss)). Returns a 0-dim tensor of the compute dtype
///   (f32, or f64 for f64 logits). Equal, value and gradient, to
///   [`soft_target_loss_from_probs`](crate::soft_target_loss_from_probs) on the dense target
///   `P[b, c[b,k]] = p[b,k]`.
///
/// # Errors
/// [`Error::InvalidTemperature`], [`Error::BadRank`], [`Error::EmptyDim`], [`Error::NotFloat`]
/// (for `student_logits` or `teacher_probs`), [`Error::ClassesKind`], [`Error::TopKShape`],
/// [`Error::DeviceMismatch`], [`Error::Torch`].
///
/// # Example
/// ```
/// use tch::{Device, Kind, Tensor};
/// use kd_core::{top_k_soft_target_loss, TopKForm, TopKTargets};
/// // Four classes, a zero student: q = 1/4 everywhere at any T. The teacher keeps classes 2
/// // and 0 with probabilities 3/4 and 1/4.
/// let z = Tensor::zeros([1, 4], (Kind::Double, Device::Cpu)).set_requires_grad(true);
/// let p = Tensor::from_slice(&[0.75f64, 0.25]).view([1, 2]);
/// let c = Tensor::from_slice(&[2i64, 0]).view([1, 2]);
/// let targets = TopKTargets { probs: &p, classes: &c };
/// let loss = top_k_soft_target_loss(&z, targets, 2.0, TopKForm::CrossEntropy)?;
/// // T^2 * sum_k -p_k log(1/4) = 4 ln 4
/// assert!((loss.double_value(&[]) - 4.0 * 4f64.ln()).abs() < 1e-12);
/// loss.backward();
/// // T * (q - P) = 2 * ([1/4, 1/4, 1/4, 1/4] - [1/4, 0, 3/4, 0]) = [0, 1/2, -1, 1/2]
/// let g = Vec::<f64>::try_from(z.grad().view([-1])).unwrap();
/// assert_eq!(g, [0.0, 0.5, -1.0, 0.5]);
/// // The KL form is smaller by T^2 H(p) and has the same gradient.
/// let kl = top_k_soft_target_loss(&z, targets, 2.0, TopKForm::Kl)?;
/// let h = -(0.75f64 * 0.75f64.ln() + 0.25 * 0.25f64.ln());
/// assert!((kl.double_value(&[]) - 4.0 * (4f64.ln() - h)).abs() < 1e-12);
/// # Ok::<(), kd_core::Error>(())
/// ```
pub fn top_k_soft_target_loss(
    student_logits: &Tensor,
    targets: TopKTargets<'_>,
    t: f64,
    form: TopKForm,
) -> Result<Tensor> {
    Ok(top_k_distillation_loss(student_logits, targets, None, t, LossWeights::default(), form)?.total)
}

/// Combined distillation objective with top-k soft targets: the weighted sum of the hard-label
/// cross-entropy at `T = 1` and [`top_k_soft_target_loss`] at `T`, from one log-softmax when
/// `T = 1`.
///
/// ```text
/// hard  = (1/B) sum_b (logsumexp_i z[b,i] - z[b, y[b]])
/// soft  = T^2 * (1/B) sum_b sum_k p[b,k] (logsumexp_i(z[b,i] / T) - z[b, c[b,k]] / T)   (- T^2 mean_b H(p[b]) for Kl)
/// total = w_hard * hard + w_soft * soft
/// dtotal/dz[b,i] = (w_hard * (softmax(z[b])_i - [i == y[b]])
///                  + w_soft * T * (s[b] softmax(z[b]/T)_i - sum_k p[b,k] [c[b,k] == i])) / B
/// ```
///
/// * `student_logits`, `targets`, `t`, `form`: as [`top_k_soft_target_loss`].
/// * `labels`: 1-D int64 of length `B` on `z`'s device; may be `None` only when
///   `weights.hard == 0`. Given labels are validated even when unused.
/// * `weights`: re-validated. A term whose weight is 0 is not computed and reported as zero.
/// * Returns [`DistillLoss`] of 0-dim tensors in the compute dtype (f32, f64 for f64 logits).
///   `total` carries the gradient; `hard` and `soft` (in `form`) are detached values, for
///   logging, and `soft_kl` is the soft term in its KL form whatever `form` is.
/// * Memory: one `[B, classes]` buffer (the softmax, turned into the gradient in place) while
///   `T = 1` or one of the weights is 0; two while the loss is computed when both terms are
///   used at `T != 1`.
///
/// # Errors
/// As [`top_k_soft_target_loss`], plus [`Error::LabelsKind`], [`Error::LabelsShape`],
/// [`Error::MissingLabels`], [`Error::InvalidWeight`], [`Error::ZeroWeights`].
///
/// # Example
/// ```
/// use tch::{Device, Kind, Tensor};
/// use kd_core::{top_k_distillation_loss, LossWeights, TopKForm, TopKTargets};
/// let z = Tensor::zeros([1, 4], (Kind::Double, Device::Cpu));
/// let p = Tensor::from_slice(&[1.0f64]).view([1, 1]);
/// let c = Tensor::from_slice(&[3i64]).view([1, 1]);
/// let y = Tensor::from_slice(&[3i64]);
/// let w = LossWeights::new(0.5, 0.5)?;
/// let targets = TopKTargets { probs: &p, classes: &c };
/// let l = top_k_distillation_loss(&z, targets, Some(&y), 1.0, w, TopKForm::CrossEntropy)?;
/// let ln4 = 4f64.ln();
/// assert!((l.hard.double_value(&[]) - ln4).abs() < 1e-12); // -log(1/4)
/// assert!((l.soft.double_value(&[]) - ln4).abs() < 1e-12); // T = 1: the same cross-entropy
/// assert!((l.total.double_value(&[]) - ln4).abs() < 1e-12);
/// # Ok::<(), kd_core::Error>(())
/// ```
pub fn top_k_distillation_loss(
    student_logits: &Tensor,
    targets: TopKTargets<'_>,
    labels: Option<&Tensor>,
    t: f64,
    weights: LossWeights,
    form: TopKForm,
) -> Result<DistillLoss> {
    weights.validate()?;
    check::temperature(t)?;
    let shape = check::matrix("student_logits", student_logits)?;
    check_targets(student_logits, &shape, targets)?;
    weights.require_labels(labels)?;
    if let Some(y) = labels {
        check::labels(student_logits, shape[0], y)?;
    }
    let labels = labels.filter(|_| weights.hard > 0.0);

    let kind = if student_logits.f_kind()? == Kind::Double { Kind::Double } else { Kind::Float };
    let device = student_logits.device();
    let batch = shape[0] as f64;
    let z = student_logits.f_detach()?;
    let zero = || -> Result<Tensor> { Ok(Tensor::f_zeros([], (kind, device))?) };

    // log softmax(z / T) in the compute dtype, and the values of both terms before the
    // log-softmax is turned into the gradient in place.
    let soft_part = if weights.soft > 0.0 {
        let p = targets.probs.f_detach()?.f_to_kind(kind)?;
        let lq = log_softmax_scaled(&z, t, kind)?;
        let picked = lq.f_gather(1, targets.classes, false)?;
        let cross_entropy = p.f_mul(&picked)?.f_sum(kind)?.f_mul_scalar(-t * t / batch)?;
        let neg_entropy = p.f_xlogy(&p)?.f_sum(kind)?;
        let kl = cross_entropy.f_add(&neg_entropy.f_mul_scalar(t * t / batch)?)?;
        let soft = if form == TopKForm::Kl { kl.shallow_clone() } else { cross_entropy };
        let mass = p.f_sum_dim_intlist(1, true, kind)?;
        Some((lq, p, mass, (soft, kl)))
    } else {
        None
    };
    let shared = t == 1.0 && soft_part.is_some();
    let hard_part = match labels {
        Some(y) => {
            let y = y.f_unsqueeze(1)?;
            let own = if shared { None } else { Some(z.f_log_softmax(1, kind)?) };
            let lq1 = match (&own, &soft_part) {
                (Some(lq1), _) => lq1,
                (None, Some((lq, ..))) => lq,
                (None, None) => unreachable_none()?,
            };
            let hard = lq1.f_gather(1, &y, false)?.f_sum(kind)?.f_mul_scalar(-1.0 / batch)?;
            Some((own, y, hard))
        }
        None => None,
    };

    // The gradient G = dtotal/dz, built in the log-softmax buffers.
    let mut grad: Option<Tensor> = None;
    if let Some((lq, p, mass, _)) = &soft_part {
        let mut g = lq.shallow_clone();
        let _ = g.f_exp_()?;
        let mut scale = mass.f_mul_scalar(weights.soft * t / batch)?;
        if shared {
            scale = scale.f_add_scalar(weights.hard / batch)?;
        }
        let _ = g.f_mul_(&scale)?;
        let _ = g.f_scatter_add_(1, targets.classes, &p.f_mul_scalar(-weights.soft * t / batch)?)?;
        grad = Some(g);
    }
    if let Some((own, y, _)) = &hard_part {
        if let Some(lq1) = own {
            let mut q1 = lq1.shallow_clone();
            let _ = q1.f_exp_()?.f_mul_scalar_(weights.hard / batch)?;
            grad = Some(match grad {
                Some(mut g) => {
                    let _ = g.f_add_(&q1)?;
                    g
                }
                None => q1,
            });
        }
        let g = grad.as_mut().map_or_else(unreachable_none, Ok)?;
        let delta = Tensor::f_full([shape[0], 1], -weights.hard / batch, (kind, device))?;
        let _ = g.f_scatter_add_(1, y, &delta)?;
    }
    let grad = grad.map_or_else(unreachable_none, Ok)?;

    let (soft, soft_kl) = soft_part.map(|(.., terms)| terms).unzip();
    let hard = hard_part.map(|(.., hard)| hard);
    let value = weights.combine(hard.as_ref(), soft.as_ref())?;
    // total = value + z . G - (z . G), detached: the value above, with gradient G w.r.t. z.
    // autograd keeps only G (in z's dtype) for the backward pass.
    let grad = grad.f_to_kind(student_logits.f_kind()?)?;
    let link = student_logits.f_flatten(0, -1)?.f_dot(&grad.f_flatten(0, -1)?)?;
    let link = link.f_sub(&link.f_detach()?)?.f_to_kind(kind)?;
    let total = value.f_add(&link)?;
    DistillLoss::from_terms(total, hard, soft, soft_kl, zero)
}

/// The share of a teacher's probability mass at `T` that top-k targets keep: for each row, the
/// teacher's softmax at `T` summed over the `k` classes kept.
///
/// ```text
/// mass[b] = sum_k softmax(v[b] / T)[c[b,k]] = exp(logsumexp_k v[b, c[b,k]] / T - logsumexp_i v[b,i] / T)
/// ```
///
/// Top-k targets are renormalized over their `k` classes, so this is what the truncation drops
/// from sight: `1 - mass[b]` of the teacher's distribution lies on the other classes.
///
/// * `teacher_logits` `v`: `[B, classes]`, floating point (f32 computation; f64 stays f64).
/// * `classes`: `[B, k]` int64 with `1 <= k <= classes`, on `v`'s device, distinct within a row
///   (e.g. the classes of [`Objective::top_k_targets`](crate::Objective::top_k_targets)).
/// * Returns `[B]` in the compute dtype, each in `(0, 1]` up to rounding.
///
/// # Errors
/// [`Error::InvalidTemperature`], [`Error::BadRank`], [`Error::EmptyDim`], [`Error::NotFloat`],
/// [`Error::ClassesKind`], [`Error::TopKShape`], [`Error::DeviceMismatch`], [`Error::Torch`].
///
/// # Example
/// ```
/// use tch::Tensor;
/// use kd_core::top_k_mass;
/// // Logits [ln 1, ln 2, ln 7] at T = 1: probabilities 0.1, 0.2, 0.7; the top 2 keep 0.9.
/// let v = Tensor::from_slice(&[0.0f64, 2f64.ln(), 7f64.ln()]).view([1, 3]);
/// let c = Tensor::from_slice(&[2i64, 1]).view([1, 2]);
/// let mass = top_k_mass(&v, &c, 1.0)?;
/// assert!((mass.double_value(&[0]) - 0.9).abs() < 1e-12);
/// # Ok::<(), kd_core::Error>(())
/// ```
pub fn top_k_mass(teacher_logits: &Tensor, classes: &Tensor, t: f64) -> Result<Tensor> {
    check::temperature(t)?;
    let shape = check::matrix("teacher_logits", teacher_logits)?;
    let kind = classes.f_kind()?;
    if kind != Kind::Int64 {
        return Err(Error::ClassesKind { kind });
    }
    let c = classes.size();
    if c.len() != 2 || c[0] != shape[0] || c[1] < 1 || c[1] > shape[1] {
        return Err(Error::TopKShape {
            arg: "teacher_classes",
            shape: c,
            expected: format!("[{}, k] with 1 <= k <= {}", shape[0], shape[1]),
        });
    }
    check::same_device(teacher_logits, "teacher_classes", classes)?;
    let kind = if teacher_logits.f_kind()? == Kind::Double { Kind::Double } else { Kind::Float };
    let lq = log_softmax_scaled(&teacher_logits.f_detach()?, t, kind)?;
    Ok(lq.f_gather(1, classes, false)?.f_logsumexp(&[1i64][..], false)?.f_exp()?)
}

/// `log_softmax(z / T)` over the classes in `kind` (f32 or f64), without a reduced-precision
/// intermediate and without touching `z`.
fn log_softmax_scaled(z: &Tensor, t: f64, kind: Kind) -> Result<Tensor> {
    if t == 1.0 {
        return Ok(z.f_log_softmax(1, kind)?);
    }
    let scaled = if z.f_kind()? == kind {
        z.f_div_scalar(t)?
    } else {
        let mut up = z.f_to_kind(kind)?;
        let _ = up.f_div_scalar_(t)?;
        up
    };
    Ok(scaled.f_log_softmax(1, None)?)
}

/// The error for a state that validation rules out (both weights zero), kept panic-free.
fn unreachable_none<T>() -> Result<T> {
    Err(Error::ZeroWeights)
}

/// `probs` `[B, k]` floating point and `classes` `[B, k]` int64 with `1 <= k <= classes`, both on
/// the student's device.
fn check_targets(student: &Tensor, shape: &[i64], targets: TopKTargets<'_>) -> Result<()> {
    let p = check::matrix("teacher_probs", targets.probs)?;
    let kind = targets.classes.f_kind()?;
    if kind != Kind::Int64 {
        return Err(Error::ClassesKind { kind });
    }
    let c = targets.classes.size();
    let expected = format!("[{}, k] with 1 <= k <= {}", shape[0], shape[1]);
    if p[0] != shape[0] || p[1] > shape[1] {
        return Err(Error::TopKShape { arg: "teacher_probs", shape: p, expected });
    }
    if c != p {
        return Err(Error::TopKShape {
            arg: "teacher_classes",
            shape: c,
            expected: format!("{p:?}, as teacher_probs"),
        });
    }
    check::same_device(student, "teacher_probs", targets.probs)?;
    check::same_device(student, "teacher_classes", targets.classes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{distillation_loss, soft_target_loss_from_probs, SoftTargets};
    use tch::Device;

    /// The dense `[B, classes]` target the top-k one stands for.
    fn dense(probs: &Tensor, classes: &Tensor, num_classes: i64) -> Tensor {
        Tensor::zeros([probs.size()[0], num_classes], (probs.kind(), probs.device())).scatter_add(1, classes, probs)
    }

    /// A random batch of logits and top-k targets of a random teacher, in f64.
    fn batch(b: i64, classes: i64, k: i64, seed: i64) -> (Tensor, Tensor, Tensor, Tensor) {
        tch::manual_seed(seed);
        let opts = (Kind::Double, Device::Cpu);
        let z = Tensor::randn([b, classes], opts) * 3.0;
        let teacher = Tensor::randn([b, classes], opts) * 4.0;
        let (values, ids) = teacher.topk(k, 1, true, true);
        let probs = (values / 2.0).softmax(1, Kind::Double);
        let labels = Tensor::randint(classes, [b], (Kind::Int64, Device::Cpu));
        (z, probs, ids, labels)
    }

    fn grad_of(z: &Tensor, loss: impl Fn(&Tensor) -> Tensor) -> (f64, Tensor) {
        let z = z.detach().set_requires_grad(true);
        let l = loss(&z);
        let g = Tensor::run_backward(&[&l], &[&z], false, false).pop().unwrap();
        (l.double_value(&[]), g)
    }

    fn max_gap(a: &Tensor, b: &Tensor) -> f64 {
        f64::try_from((a - b).abs().max()).unwrap()
    }

    #[test]
    fn equals_the_dense_loss_on_the_expanded_target_value_and_gradient() {
        let _generator = crate::lock_global_generator();
        for (t, k, w) in [(1.0, 5, (0.0, 1.0)), (2.5, 3, (0.0, 1.0)), (1.0, 4, (0.3, 0.7)), (4.0, 6, (0.5, 0.5))] {
            let (z, p, c, y) = batch(3, 11, k, 7);
            let weights = LossWeights::new(w.0, w.1).unwrap();
            let targets = TopKTargets { probs: &p, classes: &c };
            let full = dense(&p, &c, 11);
            let (ours, g_ours) = grad_of(&z, |z| {
                top_k_distillation_loss(z, targets, Some(&y), t, weights, TopKForm::CrossEntropy).unwrap().total
            });
            let (theirs, g_theirs) =
                grad_of(&z, |z| distillation_loss(z, SoftTargets::Probs(&full), Some(&y), t, weights).unwrap().total);
            assert!((ours - theirs).abs() < 1e-12, "T={t} k={k}: {ours} vs {theirs}");
            assert!(max_gap(&g_ours, &g_theirs) < 1e-14, "T={t} k={k}: gradient");
            assert_eq!(g_ours.kind(), Kind::Double);
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let _generator = crate::lock_global_generator();
        let (z, p, c, y) = batch(2, 7, 3, 11);
        // Unnormalized top-k mass too: the loss is the dense one for any weights p.
        let p_half = &p * 0.5;
        for (probs, t, w) in [(&p, 3.0, (0.4, 0.6)), (&p_half, 1.0, (0.2, 0.8)), (&p, 1.0, (1.0, 0.0))] {
            let weights = LossWeights::new(w.0, w.1).unwrap();
            let targets = TopKTargets { probs, classes: &c };
            let f = |z: &Tensor| top_k_distillation_loss(z, targets, Some(&y), t, weights, TopKForm::Kl).unwrap().total;
            let (_, g) = grad_of(&z, f);
            let eps = 1e-6;
            for i in 0..2 {
                for j in 0..7 {
                    let bump = |d: f64| {
                        let zz = z.copy();
                        let _ = zz.get(i).get(j).fill_(z.double_value(&[i, j]) + d);
                        f(&zz).double_value(&[])
                    };
                    let numeric = (bump(eps) - bump(-eps)) / (2.0 * eps);
                    let analytic = g.double_value(&[i, j]);
                    assert!((numeric - analytic).abs() < 1e-8, "T={t} [{i},{j}]: {numeric} vs {analytic}");
                }
            }
        }
    }

    #[test]
    fn kl_form_is_the_cross_entropy_less_the_teacher_entropy() {
        let _generator = crate::lock_global_generator();
        let (z, p, c, _) = batch(4, 9, 4, 3);
        let targets = TopKTargets { probs: &p, classes: &c };
        let t = 2.0;
        let ce = top_k_soft_target_loss(&z, targets, t, TopKForm::CrossEntropy).unwrap().double_value(&[]);
        let kl = top_k_soft_target_loss(&z, targets, t, TopKForm::Kl).unwrap().double_value(&[]);
        let entropy = -f64::try_from((&p * p.log()).sum(Kind::Double)).unwrap() / 4.0;
        assert!((ce - kl - t * t * entropy).abs() < 1e-12);
        // A student that reproduces the teacher's top-k distribution at T (minus infinity
        // elsewhere, approximated by -1e4) has zero KL.
        let matched = dense(&(p.log() * t + 1e4), &c, 9) - 1e4;
        let kl0 = top_k_soft_target_loss(&matched, targets, t, TopKForm::Kl).unwrap().double_value(&[]);
        assert!(kl0.abs() < 1e-9, "{kl0}");
    }

    #[test]
    fn bf16_logits_go_through_an_f32_log_softmax() {
        let _generator = crate::lock_global_generator();
        let (z, p, c, y) = batch(4, 50, 5, 5);
        let zb = z.to_kind(Kind::BFloat16);
        let weights = LossWeights::new(0.5, 0.5).unwrap();
        let p32 = p.to_kind(Kind::Float);
        let targets = TopKTargets { probs: &p32, classes: &c };
        let (ours, g) = grad_of(&zb, |z| {
            top_k_distillation_loss(z, targets, Some(&y), 1.0, weights, TopKForm::CrossEntropy).unwrap().total
        });
        assert_eq!(g.kind(), Kind::BFloat16);
        // Reference: the dense loss in f64 on the same (bf16-rounded) logits.
        let exact = zb.to_kind(Kind::Double);
        let full = dense(&p, &c, 50);
        let (want, g_want) =
            grad_of(&exact, |z| distillation_loss(z, SoftTargets::Probs(&full), Some(&y), 1.0, weights).unwrap().total);
        // f32 arithmetic on the exact bf16 values: loss to f32 precision, gradient to bf16's.
        assert!((ours - want).abs() < 1e-5 * want.abs(), "{ours} vs {want}");
        assert!(max_gap(&g.to_kind(Kind::Double), &g_want) < 2e-3, "gradient");
    }

    #[test]
    fn large_logits_stay_finite() {
        let _generator = crate::lock_global_generator();
        let z = Tensor::from_slice(&[1234.0f32, 0.0, -1234.0, 5.0]).view([1, 4]);
        let p = Tensor::from_slice(&[0.5f32, 0.5]).view([1, 2]);
        let c = Tensor::from_slice(&[2i64, 0]).view([1, 2]);
        let targets = TopKTargets { probs: &p, classes: &c };
        let (l, g) = grad_of(&z, |z| top_k_soft_target_loss(z, targets, 1.0, TopKForm::CrossEntropy).unwrap());
        // 0.5 * (0 - 0) + 0.5 * (1234 + 1234) = 1234
        assert!((l - 1234.0).abs() < 1e-3, "{l}");
        assert_eq!(Vec::<f32>::try_from(g.view([-1])).unwrap(), [0.5, 0.0, -0.5, 0.0]);
    }

    #[test]
    fn skipped_terms_are_zero_and_only_total_has_a_gradient() {
        let _generator = crate::lock_global_generator();
        let (z, p, c, y) = batch(2, 6, 2, 1);
        let z = z.set_requires_grad(true);
        let targets = TopKTargets { probs: &p, classes: &c };
        let hard_only = LossWeights::new(1.0, 0.0).unwrap();
        let l = top_k_distillation_loss(&z, targets, Some(&y), 3.0, hard_only, TopKForm::CrossEntropy).unwrap();
        assert_eq!(l.soft.double_value(&[]), 0.0);
        let want = crate::hard_target_loss(&z, &y).unwrap().double_value(&[]);
        assert!((l.total.double_value(&[]) - want).abs() < 1e-12);
        assert!(!l.hard.requires_grad() && l.total.requires_grad());
        let p_soft = p.set_requires_grad(true);
        let targets = TopKTargets { probs: &p_soft, classes: &c };
        top_k_soft_target_loss(&z, targets, 2.0, TopKForm::Kl).unwrap().backward();
        assert!(!p_soft.grad().defined(), "no gradient reaches the teacher");
        // The dense reference at T = 2 for the same gradient.
        let reference = soft_target_loss_from_probs(&z, &dense(&p, &c, 6), 2.0).unwrap();
        let g_ref = Tensor::run_backward(&[&reference], &[&z], false, false).pop().unwrap();
        assert!(max_gap(&z.grad(), &g_ref) < 1e-14);
    }

    #[test]
    fn bad_arguments_are_named() {
        let _generator = crate::lock_global_generator();
        let z = Tensor::zeros([2, 5], (Kind::Float, Device::Cpu));
        let p = Tensor::ones([2, 3], (Kind::Float, Device::Cpu)) / 3.0;
        let c = Tensor::from_slice(&[0i64, 1, 2, 2, 3, 4]).view([2, 3]);
        let ok = |probs: &Tensor, classes: &Tensor| {
            top_k_soft_target_loss(&z, TopKTargets { probs, classes }, 1.0, TopKForm::CrossEntropy)
        };
        assert!(ok(&p, &c).is_ok());
        assert!(matches!(ok(&p, &c.to_kind(Kind::Int)), Err(Error::ClassesKind { kind: Kind::Int })));
        assert!(matches!(ok(&p, &c.narrow(1, 0, 2)), Err(Error::TopKShape { arg: "teacher_classes", .. })));
        let wide = Tensor::ones([2, 6], (Kind::Float, Device::Cpu));
        let wide_c = Tensor::zeros([2, 6], (Kind::Int64, Device::Cpu));
        assert!(matches!(ok(&wide, &wide_c), Err(Error::TopKShape { arg: "teacher_probs", .. })));
        assert!(matches!(ok(&p.narrow(0, 0, 1), &c.narrow(0, 0, 1)), Err(Error::TopKShape { .. })));
        assert!(matches!(ok(&p.to_kind(Kind::Int64), &c), Err(Error::NotFloat { arg: "teacher_probs", .. })));
        let out_of_range = Tensor::from_slice(&[0i64, 1, 5, 2, 3, 4]).view([2, 3]);
        assert!(matches!(ok(&p, &out_of_range), Err(Error::Torch(_))));
        let targets = TopKTargets { probs: &p, classes: &c };
        let w = LossWeights::new(0.5, 0.5).unwrap();
        let missing = top_k_distillation_loss(&z, targets, None, 1.0, w, TopKForm::CrossEntropy);
        assert!(matches!(missing, Err(Error::MissingLabels { .. })));
        let bad_t = top_k_soft_target_loss(&z, targets, 0.0, TopKForm::CrossEntropy);
        assert!(matches!(bad_t, Err(Error::InvalidTemperature { .. })));
    }

    #[test]
    fn top_k_mass_is_the_dense_softmax_summed_over_the_kept_classes() {
        let _generator = crate::lock_global_generator();
        tch::manual_seed(7);
        let v = Tensor::randn([64, 50], (Kind::Double, Device::Cpu)) * 5.0;
        for (t, k) in [(1.0, 1), (2.0, 5), (20.0, 10), (0.5, 50)] {
            let (_, ids) = v.topk(k, 1, true, true);
            // The whole distribution at T, sorted: the k largest summed.
            let want = (&v / t).softmax(1, Kind::Double).sort(1, true).0.narrow(1, 0, k).sum_dim_intlist(
                1,
                false,
                Kind::Double,
            );
            let got = top_k_mass(&v, &ids, t).unwrap();
            assert_eq!(got.size(), [64]);
            assert!(max_gap(&got, &want) < 1e-12, "T = {t}, k = {k}");
            // f32 logits: computed in f32.
            let got32 = top_k_mass(&v.to_kind(Kind::Float), &ids, t).unwrap();
            assert_eq!(got32.kind(), Kind::Float);
            assert!(max_gap(&got32.to_kind(Kind::Double), &want) < 1e-5, "T = {t}, k = {k}, f32");
        }
        // Bad arguments are named.
        let ids = v.topk(3, 1, true, true).1;
        assert!(matches!(top_k_mass(&v, &ids, 0.0), Err(Error::InvalidTemperature { .. })));
        assert!(matches!(top_k_mass(&v, &ids.to_kind(Kind::Int), 1.0), Err(Error::ClassesKind { .. })));
        assert!(matches!(top_k_mass(&v, &ids.narrow(0, 0, 3), 1.0), Err(Error::TopKShape { .. })));
        assert!(matches!(top_k_mass(&v.to_kind(Kind::Int64), &ids, 1.0), Err(Error::NotFloat { .. })));
    }
}
