//! The training objective as one validated value, and a teacher's targets that remember the
//! temperature they were made at.
//!
//! ```text
//! hard labels     total = C_hard = mean_b -log softmax(z[b])[y[b]]
//! soft targets    total = w_hard C_hard + w_soft T^2 mean_b sum_i -p[b,i] log softmax(z[b]/T)_i
//!                 p = softmax(v / T) (dense), or the teacher's top-k probabilities at T
//! logit matching  total = w_hard C_hard + w_soft mean_b (1/(2N)) sum_i (z[b,i] - v[b,i])^2
//! ```
//!
//! An [`Objective`] is checked once when it is made (temperature finite and `> 0`, weights
//! finite, `>= 0`, not both zero); its temperature is the only one a training loop needs.
//! [`TeacherTargets`] made from teacher logits by [`Objective::teacher_targets`] or
//! [`Objective::top_k_targets`] carry that temperature, and [`Objective::loss`] refuses targets
//! made at another one, so cached soft targets cannot silently disagree with the loss.

use tch::{Device, Kind, Tensor};

use crate::check;
use crate::ensemble::ensemble_logits;
use crate::error::{Error, Result};
use crate::loss::{distillation_loss, hard_target_loss, logit_matching_loss, DistillLoss, LossWeights, SoftTargets};
use crate::softmax::softmax_t_unchecked;
use crate::topk::{top_k_distillation_loss, TopKForm, TopKTargets};

/// What a student is trained to minimize: the labels alone, a teacher's soft targets at a
/// temperature `T` (with the weights of the hard and soft terms), or the teacher's logits.
///
/// ```text
/// hard labels     total = C_hard
/// soft targets    total = w_hard C_hard + w_soft C_soft(T)     (C_soft carries T^2)
/// logit matching  total = w_hard C_hard + w_soft C_lm          (C_lm = 0.5 mse(z, v))
/// ```
///
/// Made only through its constructors, which validate it; `Copy`, so a loop can hold it by
/// value.
///
/// # Example
/// ```
/// use kd_core::{LossWeights, Objective};
/// let soft = Objective::soft_targets(20.0, LossWeights { hard: 0.1, soft: 0.9 })?;
/// assert_eq!(soft.temperature(), Some(20.0));
/// assert_eq!(Objective::hard_labels().temperature(), None);
/// assert!(Objective::soft_targets(0.0, LossWeights::default()).is_err());
/// # Ok::<(), kd_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Objective {
    form: Form,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Form {
    HardLabels,
    SoftTargets { temperature: f64, weights: LossWeights },
    LogitMatching { weights: LossWeights },
}

impl Form {
    fn name(&self) -> &'static str {
        match self {
            Form::HardLabels => "hard-label",
            Form::SoftTargets { .. } => "soft-target",
            Form::LogitMatching { .. } => "logit-matching",
        }
    }
}

impl Objective {
    /// Cross-entropy with the labels at `T = 1`, no teacher.
    ///
    /// ```text
    /// total = (1/B) sum_b -log softmax(z[b])[y[b]]
    /// ```
    ///
    /// # Example
    /// ```
    /// let o = kd_core::Objective::hard_labels();
    /// assert!(!o.uses_teacher());
    /// assert_eq!((o.weights().hard, o.weights().soft), (1.0, 0.0));
    /// ```
    pub fn hard_labels() -> Self {
        Objective { form: Form::HardLabels }
    }

    /// Distillation from soft targets at `temperature` (paper section 2).
    ///
    /// ```text
    /// total = w_hard (1/B) sum_b -log softmax(z[b])[y[b]]
    ///       + w_soft T^2 (1/B) sum_b sum_i -p[b,i] log softmax(z[b]/T)_i
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidTemperature`], [`Error::InvalidWeight`], [`Error::ZeroWeights`].
    ///
    /// # Example
    /// ```
    /// use kd_core::{LossWeights, Objective};
    /// let o = Objective::soft_targets(2.0, LossWeights { hard: 0.5, soft: 0.5 })?;
    /// assert_eq!(o.temperature(), Some(2.0));
    /// assert!(Objective::soft_targets(f64::NAN, LossWeights::default()).is_err());
    /// assert!(Objective::soft_targets(2.0, LossWeights { hard: 0.0, soft: 0.0 }).is_err());
    /// # Ok::<(), kd_core::Error>(())
    /// ```
    pub fn soft_targets(temperature: f64, weights: LossWeights) -> Result<Self> {
        check::temperature(temperature)?;
        weights.validate()?;
        Ok(Objective { form: Form::SoftTargets { temperature, weights } })
    }

    /// Logit matching (Caruana et al.), the high-temperature limit of soft targets (eq. 4), plus
    /// the weighted hard term. No temperature.
    ///
    /// ```text
    /// total = w_hard (1/B) sum_b -log softmax(z[b])[y[b]] + w_soft (1/B) sum_b (1/(2N)) sum_i (z[b,i] - v[b,i])^2
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidWeight`], [`Error::ZeroWeights`].
    ///
    /// # Example
    /// ```
    /// use kd_core::{LossWeights, Objective};
    /// let o = Objective::logit_matching(LossWeights::default())?;
    /// assert_eq!(o.temperature(), None);
    /// assert!(o.uses_teacher());
    /// # Ok::<(), kd_core::Error>(())
    /// ```
    pub fn logit_matching(weights: LossWeights) -> Result<Self> {
        weights.validate()?;
        Ok(Objective { form: Form::LogitMatching { weights } })
    }

    /// The temperature of the soft targets; `None` for the hard-label and logit-matching
    /// objectives.
    ///
    /// ```text
    /// soft targets: T;  otherwise: none
    /// ```
    ///
    /// # Example
    /// ```
    /// let o = kd_core::Objective::soft_targets(8.0, kd_core::LossWeights::default())?;
    /// assert_eq!(o.temperature(), Some(8.0));
    /// # Ok::<(), kd_core::Error>(())
    /// ```
    pub fn temperature(&self) -> Option<f64> {
        match self.form {
            Form::SoftTargets { temperature, .. } => Some(temperature),
            Form::HardLabels | Form::LogitMatching { .. } => None,
        }
    }

    /// The temperature a teacher ensemble is averaged at for this objective: its `T` for soft
    /// targets, 1 otherwise (the mean of the members' ordinary distributions).
    ///
    /// ```text
    /// soft targets: T;  otherwise: 1
    /// ```
    ///
    /// # Example
    /// ```
    /// assert_eq!(kd_core::Objective::hard_labels().ensemble_temperature(), 1.0);
    /// ```
    pub fn ensemble_temperature(&self) -> f64 {
        self.temperature().unwrap_or(1.0)
    }

    /// The weights of the hard and soft terms (`{ hard: 1, soft: 0 }` for hard labels).
    ///
    /// ```text
    /// total = hard * C_hard + soft * C_soft
    /// ```
    ///
    /// # Example
    /// ```
    /// use kd_core::{LossWeights, Objective};
    /// let w = LossWeights { hard: 0.25, soft: 0.75 };
    /// assert_eq!(Objective::logit_matching(w)?.weights(), w);
    /// # Ok::<(), kd_core::Error>(())
    /// ```
    pub fn weights(&self) -> LossWeights {
        match self.form {
            Form::HardLabels => LossWeights { hard: 1.0, soft: 0.0 },
            Form::SoftTargets { weights, .. } | Form::LogitMatching { weights } => weights,
        }
    }

    /// Whether the objective needs a teacher's targets (all but hard labels).
    ///
    /// ```text
    /// soft targets, logit matching: yes;  hard labels: no
    /// ```
    ///
    /// # Example
    /// ```
    /// assert!(!kd_core::Objective::hard_labels().uses_teacher());
    /// ```
    pub fn uses_teacher(&self) -> bool {
        !matches!(self.form, Form::HardLabels)
    }

    /// Whether [`DistillLoss::soft_kl`] of [`Objective::loss`] is a KL divergence worth
    /// reporting: soft targets with a positive soft weight.
    ///
    /// ```text
    /// soft_kl = T^2 mean_b KL(p[b] || softmax(z[b] / T))   when w_soft > 0
    /// ```
    ///
    /// # Example
    /// ```
    /// use kd_core::{LossWeights, Objective};
    /// assert!(Objective::soft_targets(2.0, LossWeights::default())?.reports_soft_kl());
    /// assert!(!Objective::soft_targets(2.0, LossWeights { hard: 1.0, soft: 0.0 })?.reports_soft_kl());
    /// assert!(!Objective::logit_matching(LossWeights::default())?.reports_soft_kl());
    /// # Ok::<(), kd_core::Error>(())
    /// ```
    pub fn reports_soft_kl(&self) -> bool {
        matches!(self.form, Form::SoftTargets { weights, .. } if weights.soft > 0.0)
    }

    /// An ensemble's members as one teacher's logits at [`Objective::ensemble_temperature`]:
    /// [`ensemble_logits`](crate::ensemble_logits) at that temperature.
    ///
    /// ```text
    /// v[b] = T (logsumexp_m log_softmax(z_m[b] / T) - ln M),   softmax(v / T) = (1/M) sum_m softmax(z_m / T)
    /// ```
    ///
    /// # Errors
    /// As [`ensemble_logits`](crate::ensemble_logits).
    ///
    /// # Example
    /// ```
    /// use tch::Tensor;
    /// use kd_core::{LossWeights, Objective};
    /// let o = Objective::soft_targets(2.0, LossWeights::default())?;
    /// let a = Tensor::from_slice(&[0.0f64, 0.0]).view([1, 2]);
    /// let b = Tensor::from_slice(&[0.0f64, 2.0 * 3f64.ln()]).view([1, 2]);
    /// let v = o.ensemble_logits(&[a, b])?;
    /// // softmax(v / 2) is the mean of [1/2, 1/2] and [1/4, 3/4].
    /// assert!((kd_core::softmax_t(&v, 2.0)?.double_value(&[0, 1]) - 0.625).abs() < 1e-12);
    /// # Ok::<(), kd_core::Error>(())
    /// ```
    pub fn ensemble_logits(&self, member_logits: &[Tensor]) -> Result<Tensor> {
        ensemble_logits(member_logits, self.ensemble_temperature())
    }

    /// What a teacher's logits over a set of examples provide to this objective, to cache and
    /// read back by rows: probabilities at `T` for soft targets (made once, tagged with `T`),
    /// the logits themselves for logit matching.
    ///
    /// ```text
    /// soft targets:   p[b] = softmax(v[b] / T)
    /// logit matching: v[b]
    /// ```
    ///
    /// # Errors
    /// [`Error::WrongTargets`] for the hard-label objective; [`Error::BadRank`],
    /// [`Error::EmptyDim`], [`Error::NotFloat`] for `teacher_logits`.
    ///
    /// # Example
    /// ```
    /// use tch::Tensor;
    /// use kd_core::{LossWeights, Objective};
    /// let o = Objective::soft_targets(2.0, LossWeights::default())?;
    /// let v = Tensor::from_slice(&[0.0f64, 2.0 * 3f64.ln()]).view([1, 2]);
    /// let targets = o.teacher_targets(&v)?;
    /// assert_eq!(targets.temperature(), Some(2.0));
    /// assert!((targets.dense().unwrap().double_value(&[0, 1]) - 0.75).abs() < 1e-12);
    /// # Ok::<(), kd_core::Error>(())
    /// ```
    pub fn teacher_targets(&self, teacher_logits: &Tensor) -> Result<TeacherTargets> {
        check::matrix("teacher_logits", teacher_logits)?;
        match self.form {
            Form::SoftTargets { temperature, .. } => Ok(TeacherTargets {
                inner: Inner::Probs { probs: softmax_t_unchecked(teacher_logits, temperature)?, temperature },
            }),
            Form::LogitMatching { .. } => Ok(TeacherTargets { inner: Inner::Logits(teacher_logits.shallow_clone()) }),
            Form::HardLabels => Err(self.wrong("no teacher", "a teacher's logits")),
        }
    }

    /// A teacher's `k` most probable classes per example as soft targets at `T`, renormalized
    /// over those `k`, tagged with `T`: the input of the top-k loss, which never builds a dense
    /// target.
    ///
    /// ```text
    /// c[b] = the k largest v[b, i],   p[b, j] = exp(v[b, c_j] / T) / sum_l exp(v[b, c_l] / T)
    /// ```
    ///
    /// Classes come in decreasing order of the teacher's logits.
    ///
    /// # Errors
    /// [`Error::WrongTargets`] unless the objective is soft targets; [`Error::InvalidTopK`] unless
    /// `1 <= k <= classes`; [`Error::BadRank`], [`Error::EmptyDim`], [`Error::NotFloat`].
    ///
    /// # Example
    /// ```
    /// use tch::Tensor;
    /// use kd_core::{LossWeights, Objective};
    /// let o = Objective::soft_targets(1.0, LossWeights::default())?;
    /// // Logits [ln 1, ln 2, ln 3]: the top 2 are classes 2 and 1, with 3/5 and 2/5.
    /// let v = Tensor::from_slice(&[0.0f64, 2f64.ln(), 3f64.ln()]).view([1, 3]);
    /// let targets = o.top_k_targets(&v, 2)?;
    /// let top = targets.as_top_k().unwrap();
    /// assert_eq!(Vec::<i64>::try_from(top.classes.view([-1])).unwrap(), [2, 1]);
    /// assert!((top.probs.double_value(&[0, 0]) - 0.6).abs() < 1e-12);
    /// # Ok::<(), kd_core::Error>(())
    /// ```
    pub fn top_k_targets(&self, teacher_logits: &Tensor, k: i64) -> Result<TeacherTargets> {
        let Form::SoftTargets { temperature, .. } = self.form else {
            return Err(self.wrong("dense targets", "top-k targets"));
        };
        let shape = check::matrix("teacher_logits", teacher_logits)?;
        if k < 1 || k > shape[1] {
            return Err(Error::InvalidTopK { k, classes: shape[1] });
        }
        let (values, classes) = teacher_logits.f_topk(k, 1, true, true)?;
        let probs = softmax_t_unchecked(&values, temperature)?;
        Ok(TeacherTargets { inner: Inner::TopK { probs, classes, temperature } })
    }

    /// The objective for one batch: student logits `z`, the batch's teacher targets (rows in
    /// the batch's order; `None` for hard labels) and its labels (needed when the hard weight is
    /// positive). Returns the weighted `total` and its terms.
    ///
    /// ```text
    /// hard labels:    total = hard = (1/B) sum_b -log softmax(z[b])[y[b]]
    /// soft targets:   as distillation_loss (dense logits or probabilities at T) or
    ///                 top_k_distillation_loss (top-k targets, cross-entropy form)
    /// logit matching: soft = (1/B) sum_b (1/(2N)) sum_i (z[b,i] - v[b,i])^2,  total = w_soft soft + w_hard hard
    /// ```
    ///
    /// `soft_kl` is the soft term's KL form for soft targets, the soft term itself for logit
    /// matching (both 0 when the student matches), zero for hard labels.
    ///
    /// # Errors
    /// [`Error::WrongTargets`] when the targets do not fit the objective (none for distillation,
    /// some for hard labels, probabilities or top-k for logit matching);
    /// [`Error::TemperatureMismatch`] for targets made at another `T`; [`Error::MissingLabels`];
    /// and the errors of the underlying losses.
    ///
    /// # Example
    /// ```
    /// use tch::{Device, Kind, Tensor};
    /// use kd_core::{LossWeights, Objective, TeacherTargets};
    /// let z = Tensor::zeros([1, 2], (Kind::Double, Device::Cpu));
    /// let v = Tensor::from_slice(&[0.0f64, 2.0 * 3f64.ln()]).view([1, 2]);
    /// let o = Objective::soft_targets(2.0, LossWeights::default())?;
    /// // From live logits or from the cached probabilities: T^2 H([1/4, 3/4], [1/2, 1/2]) = 4 ln 2.
    /// let live = o.loss(&z, Some(&TeacherTargets::logits(v.shallow_clone())?), None)?;
    /// let cached = o.loss(&z, Some(&o.teacher_targets(&v)?), None)?;
    /// for l in [live, cached] {
    ///     assert!((l.total.double_value(&[]) - 4.0 * 2f64.ln()).abs() < 1e-12);
    /// }
    /// // Targets made at another temperature are refused.
    /// let other = Objective::soft_targets(3.0, LossWeights::default())?.teacher_targets(&v)?;
    /// assert!(o.loss(&z, Some(&other), None).is_err());
    /// // Hard labels: the cross-entropy, ln 2 here.
    /// let y = Tensor::from_slice(&[1i64]);
    /// let hard = Objective::hard_labels().loss(&z, None, Some(&y))?;
    /// assert!((hard.total.double_value(&[]) - 2f64.ln()).abs() < 1e-12);
    /// # Ok::<(), kd_core::Error>(())
    /// ```
    pub fn loss(
        &self,
        student_logits: &Tensor,
        teacher: Option<&TeacherTargets>,
        labels: Option<&Tensor>,
    ) -> Result<DistillLoss> {
        let zero =
            || -> Result<Tensor> { Ok(Tensor::f_zeros([], (student_logits.f_kind()?, student_logits.device()))?) };
        match (self.form, teacher.map(|t| &t.inner)) {
            (Form::HardLabels, None) => {
                let y = labels.ok_or(Error::MissingLabels { hard: 1.0 })?;
                let hard = hard_target_loss(student_logits, y)?;
                DistillLoss::from_terms(hard.shallow_clone(), Some(hard), None, None, zero)
            }
            (Form::HardLabels, Some(t)) => Err(self.wrong("no teacher", t.name())),
            (_, None) => Err(self.wrong("a teacher's targets", "none")),
            (Form::SoftTargets { temperature, weights }, Some(targets)) => {
                if let Some(made_at) = targets.temperature().filter(|&made_at| made_at != temperature) {
                    return Err(Error::TemperatureMismatch { targets: made_at, objective: temperature });
                }
                match targets {
                    Inner::Logits(v) => {
                        distillation_loss(student_logits, SoftTargets::Logits(v), labels, temperature, weights)
                    }
                    Inner::Probs { probs, .. } => {
                        distillation_loss(student_logits, SoftTargets::Probs(probs), labels, temperature, weights)
                    }
                    Inner::TopK { probs, classes, .. } => top_k_distillation_loss(
                        student_logits,
                        TopKTargets { probs, classes },
                        labels,
                        temperature,
                        weights,
                        TopKForm::CrossEntropy,
                    ),
                }
            }
            (Form::LogitMatching { weights }, Some(Inner::Logits(v))) => {
                let soft = logit_matching_loss(student_logits, v)?;
                weights.require_labels(labels)?;
                let hard = match labels {
                    Some(y) if weights.hard > 0.0 => Some(hard_target_loss(student_logits, y)?),
                    _ => None,
                };
                let total = weights.combine(hard.as_ref(), Some(&soft))?;
                DistillLoss::from_terms(total, hard, Some(soft.shallow_clone()), Some(soft), zero)
            }
            (Form::LogitMatching { .. }, Some(t)) => Err(self.wrong("the teacher's logits", t.name())),
        }
    }

    fn wrong(&self, needs: &'static str, got: &'static str) -> Error {
        Error::WrongTargets { objective: self.form.name(), needs, got }
    }
}

/// A teacher's targets for a set of examples, one row (or `k` entries) per example: its logits,
/// its probabilities at a temperature `T`, or its top-k probabilities at `T` with their class
/// ids. Probabilities remember the `T` they were made at, and [`Objective::loss`] checks it.
///
/// ```text
/// logits:   v[b]                          [n, classes]
/// probs:    p[b] = softmax(v[b] / T)      [n, classes], at T
/// top-k:    (p[b, j], c[b, j])            [n, k] each, at T
/// ```
///
/// # Example
/// ```
/// use tch::Tensor;
/// use kd_core::TeacherTargets;
/// let p = Tensor::from_slice(&[0.25f32, 0.75, 0.5, 0.5]).view([2, 2]);
/// let targets = TeacherTargets::probs(p, 4.0)?;
/// let second = targets.rows(&Tensor::from_slice(&[1i64]))?;
/// assert_eq!((second.examples(), second.temperature()), (1, Some(4.0)));
/// # Ok::<(), kd_core::Error>(())
/// ```
#[derive(Debug)]
pub struct TeacherTargets {
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    Logits(Tensor),
    Probs { probs: Tensor, temperature: f64 },
    TopK { probs: Tensor, classes: Tensor, temperature: f64 },
}

impl Inner {
    fn name(&self) -> &'static str {
        match self {
            Inner::Logits(_) => "a teacher's logits",
            Inner::Probs { .. } => "probabilities",
            Inner::TopK { .. } => "top-k targets",
        }
    }

    /// The tensors, in the order [`Inner::map`] rebuilds them.
    fn tensors(&self) -> Vec<&Tensor> {
        match self {
            Inner::Logits(v) => vec![v],
            Inner::Probs { probs, .. } => vec![probs],
            Inner::TopK { probs, classes, .. } => vec![probs, classes],
        }
    }

    /// The same form and temperature with each tensor replaced by `f` of it.
    fn map(&self, mut f: impl FnMut(&Tensor) -> Result<Tensor>) -> Result<TeacherTargets> {
        let inner = match self {
            Inner::Logits(v) => Inner::Logits(f(v)?),
            Inner::Probs { probs, temperature } => Inner::Probs { probs: f(probs)?, temperature: *temperature },
            Inner::TopK { probs, classes, temperature } => {
                Inner::TopK { probs: f(probs)?, classes: f(classes)?, temperature: *temperature }
            }
        };
        Ok(TeacherTargets { inner })
    }

    fn temperature(&self) -> Option<f64> {
        match self {
            Inner::Logits(_) => None,
            Inner::Probs { temperature, .. } | Inner::TopK { temperature, .. } => Some(*temperature),
        }
    }
}

impl TeacherTargets {
    /// A teacher's logits `v` `[n, classes]` (a live teacher's batch, or logit matching's
    /// targets). A soft-target objective turns them into `softmax(v / T)` at its own `T`.
    ///
    /// ```text
    /// v[b, i]
    /// ```
    ///
    /// # Errors
    /// [`Error::BadRank`], [`Error::EmptyDim`], [`Error::NotFloat`].
    ///
    /// # Example
    /// ```
    /// let v = tch::Tensor::zeros([3, 10], (tch::Kind::Float, tch::Device::Cpu));
    /// let t = kd_core::TeacherTargets::logits(v)?;
    /// assert_eq!((t.examples(), t.temperature()), (3, None));
    /// # Ok::<(), kd_core::Error>(())
    /// ```
    pub fn logits(teacher_logits: Tensor) -> Result<Self> {
        check::matrix("teacher_logits", &teacher_logits)?;
        Ok(TeacherTargets { inner: Inner::Logits(teacher_logits) })
    }

    /// Probabilities `p` `[n, classes]` made at `temperature` (rows summing to 1, not checked:
    /// that would synchronize a GPU), e.g. from [`ensemble_probs`](crate::ensemble_probs) or a
    /// cache.
    ///
    /// ```text
    /// p[b, i] = the teacher's softmax at T
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidTemperature`], [`Error::BadRank`], [`Error::EmptyDim`], [`Error::NotFloat`].
    ///
    /// # Example
    /// ```
    /// let p = tch::Tensor::full([2, 4], 0.25, (tch::Kind::Float, tch::Device::Cpu));
    /// assert_eq!(kd_core::TeacherTargets::probs(p, 3.0)?.temperature(), Some(3.0));
    /// # Ok::<(), kd_core::Error>(())
    /// ```
    pub fn probs(probs: Tensor, temperature: f64) -> Result<Self> {
        check::temperature(temperature)?;
        check::matrix("teacher_probs", &probs)?;
        Ok(TeacherTargets { inner: Inner::Probs { probs, temperature } })
    }

    /// Top-k targets made at `temperature`: probabilities `[n, k]` and int64 class ids of the
    /// same shape (e.g. read back from a cache of [`Objective::top_k_targets`]).
    ///
    /// ```text
    /// (p[b, j], c[b, j]),  j < k
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidTemperature`], [`Error::BadRank`], [`Error::EmptyDim`], [`Error::NotFloat`]
    /// (for `probs`), [`Error::ClassesKind`], [`Error::TopKShape`] (for `classes` of another shape).
    ///
    /// # Example
    /// ```
    /// use tch::Tensor;
    /// let p = Tensor::from_slice(&[0.75f32, 0.25]).view([1, 2]);
    /// let c = Tensor::from_slice(&[3i64, 0]).view([1, 2]);
    /// let t = kd_core::TeacherTargets::top_k(p, c, 2.0)?;
    /// assert!(t.as_top_k().is_some() && t.dense().is_none());
    /// # Ok::<(), kd_core::Error>(())
    /// ```
    pub fn top_k(probs: Tensor, classes: Tensor, temperature: f64) -> Result<Self> {
        check::temperature(temperature)?;
        let shape = check::matrix("teacher_probs", &probs)?;
        let kind = classes.f_kind()?;
        if kind != Kind::Int64 {
            return Err(Error::ClassesKind { kind });
        }
        if classes.size() != shape {
            let expected = format!("{shape:?}, the shape of `teacher_probs`");
            return Err(Error::TopKShape { arg: "teacher_classes", shape: classes.size(), expected });
        }
        Ok(TeacherTargets { inner: Inner::TopK { probs, classes, temperature } })
    }

    /// The temperature the probabilities were made at (`None` for logits).
    ///
    /// ```text
    /// probs, top-k: T;  logits: none
    /// ```
    ///
    /// # Example
    /// ```
    /// let p = tch::Tensor::full([1, 2], 0.5, (tch::Kind::Float, tch::Device::Cpu));
    /// assert_eq!(kd_core::TeacherTargets::probs(p, 5.0)?.temperature(), Some(5.0));
    /// # Ok::<(), kd_core::Error>(())
    /// ```
    pub fn temperature(&self) -> Option<f64> {
        self.inner.temperature()
    }

    /// The number of examples (rows).
    ///
    /// ```text
    /// n of [n, classes] or [n, k]
    /// ```
    ///
    /// # Example
    /// ```
    /// let v = tch::Tensor::zeros([7, 2], (tch::Kind::Float, tch::Device::Cpu));
    /// assert_eq!(kd_core::TeacherTargets::logits(v)?.examples(), 7);
    /// # Ok::<(), kd_core::Error>(())
    /// ```
    pub fn examples(&self) -> i64 {
        match &self.inner {
            Inner::Logits(t) | Inner::Probs { probs: t, .. } | Inner::TopK { probs: t, .. } => t.size()[0],
        }
    }

    /// The rows `idx` (1-D int64, on the targets' device) in that order, at the same
    /// temperature: a batch of a cached transfer set.
    ///
    /// ```text
    /// out[j] = self[idx[j]]
    /// ```
    ///
    /// # Errors
    /// [`Error::Torch`] for an index out of range (on the CPU) or of the wrong kind.
    ///
    /// # Example
    /// ```
    /// use tch::Tensor;
    /// let v = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2]);
    /// let t = kd_core::TeacherTargets::logits(v)?.rows(&Tensor::from_slice(&[1i64, 1, 0]))?;
    /// assert_eq!(t.examples(), 3);
    /// assert_eq!(t.dense().unwrap().double_value(&[0, 0]), 3.0);
    /// # Ok::<(), kd_core::Error>(())
    /// ```
    pub fn rows(&self, idx: &Tensor) -> Result<Self> {
        self.inner.map(|t| Ok(t.f_index_select(0, idx)?))
    }

    /// The targets of consecutive parts of a set, one after the other (e.g. made chunk by
    /// chunk). All parts must be of one form and temperature.
    ///
    /// ```text
    /// out = [parts[0]; parts[1]; ...]   (rows)
    /// ```
    ///
    /// # Errors
    /// [`Error::WrongTargets`] for no parts or parts of different forms;
    /// [`Error::TemperatureMismatch`]; [`Error::Torch`] for parts that do not stack.
    ///
    /// # Example
    /// ```
    /// use tch::Tensor;
    /// use kd_core::TeacherTargets;
    /// let part = |n| TeacherTargets::probs(Tensor::full([n, 3], 1.0 / 3.0, (tch::Kind::Float, tch::Device::Cpu)), 2.0);
    /// let all = TeacherTargets::cat(&[part(2)?, part(5)?])?;
    /// assert_eq!((all.examples(), all.temperature()), (7, Some(2.0)));
    /// # Ok::<(), kd_core::Error>(())
    /// ```
    pub fn cat(parts: &[TeacherTargets]) -> Result<Self> {
        let first = parts.first().ok_or(Error::WrongTargets {
            objective: "concatenation",
            needs: "at least one part",
            got: "none",
        })?;
        for part in &parts[1..] {
            if std::mem::discriminant(&part.inner) != std::mem::discriminant(&first.inner) {
                return Err(Error::WrongTargets {
                    objective: "concatenation",
                    needs: first.inner.name(),
                    got: part.inner.name(),
                });
            }
            if let (Some(a), Some(b)) = (first.temperature(), part.temperature()) {
                if a != b {
                    return Err(Error::TemperatureMismatch { targets: b, objective: a });
                }
            }
        }
        let columns: Vec<Vec<&Tensor>> = parts.iter().map(|p| p.inner.tensors()).collect();
        let mut column = 0;
        first.inner.map(|_| {
            let cat = Tensor::f_cat(&columns.iter().map(|c| c[column]).collect::<Vec<_>>(), 0)?;
            column += 1;
            Ok(cat)
        })
    }

    /// The dense rows: logits, or probabilities at [`TeacherTargets::temperature`]; `None` for
    /// top-k targets.
    ///
    /// ```text
    /// v or p, [n, classes]
    /// ```
    ///
    /// # Example
    /// ```
    /// let v = tch::Tensor::ones([1, 2], (tch::Kind::Float, tch::Device::Cpu));
    /// assert!(kd_core::TeacherTargets::logits(v)?.dense().is_some());
    /// # Ok::<(), kd_core::Error>(())
    /// ```
    pub fn dense(&self) -> Option<&Tensor> {
        match &self.inner {
            Inner::Logits(v) | Inner::Probs { probs: v, .. } => Some(v),
            Inner::TopK { .. } => None,
        }
    }

    /// The top-k probabilities and class ids, as the top-k loss reads them; `None` for dense
    /// targets.
    ///
    /// ```text
    /// (p, c), [n, k] each
    /// ```
    ///
    /// # Example
    /// ```
    /// use tch::Tensor;
    /// let p = Tensor::from_slice(&[1.0f32]).view([1, 1]);
    /// let c = Tensor::from_slice(&[4i64]).view([1, 1]);
    /// let t = kd_core::TeacherTargets::top_k(p, c, 1.0)?;
    /// assert_eq!(t.as_top_k().unwrap().classes.int64_value(&[0, 0]), 4);
    /// # Ok::<(), kd_core::Error>(())
    /// ```
    pub fn as_top_k(&self) -> Option<TopKTargets<'_>> {
        match &self.inner {
            Inner::TopK { probs, classes, .. } => Some(TopKTargets { probs, classes }),
            Inner::Logits(_) | Inner::Probs { .. } => None,
        }
    }

    /// A copy with its own memory (the tensors copied, not shared).
    ///
    /// ```text
    /// out = self, copied
    /// ```
    ///
    /// # Errors
    /// [`Error::Torch`] when the copy fails.
    ///
    /// # Example
    /// ```
    /// let v = tch::Tensor::ones([1, 2], (tch::Kind::Float, tch::Device::Cpu));
    /// let t = kd_core::TeacherTargets::logits(v.shallow_clone())?;
    /// let c = t.copy()?;
    /// assert_ne!(c.dense().unwrap().data_ptr(), v.data_ptr());
    /// # Ok::<(), kd_core::Error>(())
    /// ```
    pub fn copy(&self) -> Result<Self> {
        self.inner.map(|t| {
            let mut copy = t.f_empty_like()?;
            copy.f_copy_(t)?;
            Ok(copy)
        })
    }

    /// Copies the values of `src` into these targets' tensors, in place: the inputs of a
    /// training step captured once and replayed (a CUDA graph reads the same memory at every
    /// replay). `src` must have the same form, temperature and shapes.
    ///
    /// ```text
    /// self <- src, in place
    /// ```
    ///
    /// # Errors
    /// [`Error::WrongTargets`] for another form, [`Error::TemperatureMismatch`] for another
    /// temperature, [`Error::TargetsShape`] for other shapes, [`Error::Torch`] when the copy fails.
    ///
    /// # Example
    /// ```
    /// use tch::{Device, Kind, Tensor};
    /// let mut t = kd_core::TeacherTargets::probs(Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)), 2.0)?;
    /// let before = t.dense().unwrap().data_ptr();
    /// t.copy_from(&kd_core::TeacherTargets::probs(Tensor::full([2, 3], 1.0 / 3.0, (Kind::Float, Device::Cpu)), 2.0)?)?;
    /// assert_eq!(t.dense().unwrap().data_ptr(), before);
    /// assert!((t.dense().unwrap().double_value(&[1, 2]) - 1.0 / 3.0).abs() < 1e-7);
    /// assert!(t.copy_from(&kd_core::TeacherTargets::logits(Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)))?).is_err());
    /// # Ok::<(), kd_core::Error>(())
    /// ```
    pub fn copy_from(&mut self, src: &TeacherTargets) -> Result<()> {
        if std::mem::discriminant(&self.inner) != std::mem::discriminant(&src.inner) {
            return Err(Error::WrongTargets { objective: "copy", needs: self.inner.name(), got: src.inner.name() });
        }
        if let (Some(want), Some(got)) = (self.temperature(), src.temperature()) {
            if want != got {
                return Err(Error::TemperatureMismatch { targets: got, objective: want });
            }
        }
        let (dst, from) = (self.inner.tensors(), src.inner.tensors());
        if let Some((d, s)) = dst.iter().zip(&from).find(|(d, s)| d.size() != s.size()) {
            return Err(Error::TargetsShape { shape: s.size(), expected: d.size() });
        }
        for (d, s) in dst.into_iter().zip(from) {
            let _guard = tch::no_grad_guard();
            d.shallow_clone().f_copy_(s)?;
        }
        Ok(())
    }

    /// The same targets on `device`.
    ///
    /// ```text
    /// out = self, moved
    /// ```
    ///
    /// # Errors
    /// [`Error::Torch`] when the copy fails.
    ///
    /// # Example
    /// ```
    /// let v = tch::Tensor::ones([1, 2], (tch::Kind::Float, tch::Device::Cpu));
    /// let t = kd_core::TeacherTargets::logits(v)?.to_device(tch::Device::Cpu)?;
    /// assert_eq!(t.examples(), 1);
    /// # Ok::<(), kd_core::Error>(())
    /// ```
    pub fn to_device(&self, device: Device) -> Result<Self> {
        self.inner.map(|t| Ok(t.f_to_device(device)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{soft_target_loss_from_probs, softmax_t};

    const OPTS: (Kind, Device) = (Kind::Double, Device::Cpu);

    fn value(t: &Tensor) -> f64 {
        t.double_value(&[])
    }

    /// The loss and the gradient it sends to `z`.
    fn with_grad(z: &Tensor, f: impl Fn(&Tensor) -> DistillLoss) -> (DistillLoss, Tensor) {
        let z = z.detach().set_requires_grad(true);
        let l = f(&z);
        let g = Tensor::run_backward(&[&l.total], &[&z], false, false).pop().unwrap();
        (l, g)
    }

    fn max_gap(a: &Tensor, b: &Tensor) -> f64 {
        f64::try_from((a - b).abs().max()).unwrap()
    }

    #[test]
    fn constructors_validate_once() {
        let _generator = crate::lock_global_generator();
        let w = LossWeights { hard: 0.3, soft: 0.7 };
        for t in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(Objective::soft_targets(t, w), Err(Error::InvalidTemperature { .. })), "{t}");
        }
        let bad = LossWeights { hard: -1.0, soft: 1.0 };
        assert!(matches!(Objective::soft_targets(2.0, bad), Err(Error::InvalidWeight { name: "hard", .. })));
        assert!(matches!(Objective::logit_matching(bad), Err(Error::InvalidWeight { .. })));
        let zero = LossWeights { hard: 0.0, soft: 0.0 };
        assert!(matches!(Objective::logit_matching(zero), Err(Error::ZeroWeights)));
        let o = Objective::soft_targets(3.0, w).unwrap();
        assert_eq!((o.temperature(), o.weights(), o.ensemble_temperature()), (Some(3.0), w, 3.0));
        assert!(o.uses_teacher() && o.reports_soft_kl());
    }

    #[test]
    fn soft_targets_equal_the_dense_losses_from_logits_and_from_cached_probabilities() {
        let _generator = crate::seed_global_generator(1);
        let z = Tensor::randn([5, 7], OPTS) * 2.0;
        let v = Tensor::randn([5, 7], OPTS) * 3.0;
        let y = Tensor::from_slice(&[0i64, 6, 2, 2, 5]);
        for (t, hard) in [(1.0, 0.0), (2.5, 0.3), (20.0, 0.0)] {
            let w = LossWeights { hard, soft: 1.0 - hard };
            let o = Objective::soft_targets(t, w).unwrap();
            let reference = with_grad(&z, |z| distillation_loss(z, SoftTargets::Logits(&v), Some(&y), t, w).unwrap());
            let live = TeacherTargets::logits(v.shallow_clone()).unwrap();
            let cached = o.teacher_targets(&v).unwrap();
            assert_eq!(cached.temperature(), Some(t));
            for targets in [&live, &cached] {
                let (l, g) = with_grad(&z, |z| o.loss(z, Some(targets), Some(&y)).unwrap());
                assert!((value(&l.total) - value(&reference.0.total)).abs() < 1e-12, "T = {t}");
                assert!((value(&l.soft_kl) - value(&reference.0.soft_kl)).abs() < 1e-10, "T = {t}");
                assert!(max_gap(&g, &reference.1) < 1e-14, "T = {t}");
            }
        }
    }

    #[test]
    fn targets_made_at_another_temperature_are_refused() {
        let _generator = crate::lock_global_generator();
        let v = Tensor::randn([3, 4], OPTS);
        let z = Tensor::zeros([3, 4], OPTS);
        let at = |t: f64| Objective::soft_targets(t, LossWeights::default()).unwrap();
        for targets in [at(2.0).teacher_targets(&v).unwrap(), at(2.0).top_k_targets(&v, 2).unwrap()] {
            let err = at(4.0).loss(&z, Some(&targets), None).unwrap_err();
            assert!(matches!(err, Error::TemperatureMismatch { targets: 2.0, objective: 4.0 }), "{err}");
            assert!(at(2.0).loss(&z, Some(&targets), None).is_ok());
        }
        // Each objective takes only what it can use.
        let y = Tensor::from_slice(&[0i64, 1, 2]);
        let logits = TeacherTargets::logits(v.shallow_clone()).unwrap();
        let probs = at(2.0).teacher_targets(&v).unwrap();
        let hard = Objective::hard_labels();
        assert!(matches!(hard.loss(&z, Some(&logits), Some(&y)), Err(Error::WrongTargets { .. })));
        assert!(matches!(hard.loss(&z, None, None), Err(Error::MissingLabels { .. })));
        assert!(matches!(at(2.0).loss(&z, None, Some(&y)), Err(Error::WrongTargets { .. })));
        let lm = Objective::logit_matching(LossWeights::default()).unwrap();
        assert!(matches!(lm.loss(&z, Some(&probs), Some(&y)), Err(Error::WrongTargets { .. })));
        assert!(matches!(hard.teacher_targets(&v), Err(Error::WrongTargets { .. })));
        assert!(matches!(lm.top_k_targets(&v, 2), Err(Error::WrongTargets { .. })));
        for k in [0, 5] {
            assert!(matches!(at(2.0).top_k_targets(&v, k), Err(Error::InvalidTopK { classes: 4, .. })), "k = {k}");
        }
    }

    #[test]
    fn hard_labels_are_the_cross_entropy_and_logit_matching_its_closed_form() {
        let _generator = crate::lock_global_generator();
        let z = Tensor::from_slice(&[1.0f64, -0.5, 2.0, 0.0, 0.3, 0.3]).view([2, 3]);
        let v = Tensor::from_slice(&[0.2f64, 1.5, -1.0, 0.7, -2.0, 0.1]).view([2, 3]);
        let y = Tensor::from_slice(&[2i64, 0]);
        let lq = z.log_softmax(1, Kind::Double);
        let hard = -(lq.double_value(&[0, 2]) + lq.double_value(&[1, 0])) / 2.0;
        let l = Objective::hard_labels().loss(&z, None, Some(&y)).unwrap();
        assert!((value(&l.total) - hard).abs() < 1e-14);
        assert_eq!((value(&l.soft), value(&l.soft_kl)), (0.0, 0.0));
        // 0.5 * mean of squared differences, over both dimensions.
        let zs = Vec::<f64>::try_from(z.view([-1])).unwrap();
        let vs = Vec::<f64>::try_from(v.view([-1])).unwrap();
        let lm: f64 = zs.iter().zip(&vs).map(|(a, b)| (a - b) * (a - b)).sum::<f64>() / 12.0;
        let w = LossWeights { hard: 0.25, soft: 2.0 };
        let o = Objective::logit_matching(w).unwrap();
        let l = o.loss(&z, Some(&o.teacher_targets(&v).unwrap()), Some(&y)).unwrap();
        assert!((value(&l.soft) - lm).abs() < 1e-14);
        assert!((value(&l.total) - (2.0 * lm + 0.25 * hard)).abs() < 1e-14);
        assert!(!o.reports_soft_kl());
        // Without a hard term the labels are not needed.
        let pure = Objective::logit_matching(LossWeights::default()).unwrap();
        let l = pure.loss(&z, Some(&TeacherTargets::logits(v.shallow_clone()).unwrap()), None).unwrap();
        assert!((value(&l.total) - lm).abs() < 1e-14);
    }

    #[test]
    fn top_k_targets_are_the_softened_distribution_renormalized_over_the_k_largest() {
        let _generator = crate::lock_global_generator();
        let logits = Tensor::from_slice(&[2.0f64, -1.0, 0.5, 3.0, 0.0]).view([1, 5]);
        let t = 2.0;
        let o = Objective::soft_targets(t, LossWeights::default()).unwrap();
        let targets = o.top_k_targets(&logits, 3).unwrap();
        let top = targets.as_top_k().unwrap();
        assert_eq!(Vec::<i64>::try_from(top.classes.view([-1])).unwrap(), [3, 0, 2]);
        let e = |z: f64| (z / t).exp();
        let norm = e(3.0) + e(2.0) + e(0.5);
        let want = [e(3.0) / norm, e(2.0) / norm, e(0.5) / norm];
        let got = Vec::<f64>::try_from(top.probs.view([-1])).unwrap();
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
        }
        // k = all classes: the full softened distribution, sorted.
        let all = o.top_k_targets(&logits, 5).unwrap();
        let full = softmax_t(&logits, t).unwrap().sort(1, true).0;
        assert!(max_gap(all.as_top_k().unwrap().probs, &full) < 1e-12);
    }

    #[test]
    fn top_k_loss_matches_the_dense_expansion_of_its_targets() {
        let _generator = crate::lock_global_generator();
        // Value, KL form and gradient from top-k targets against the same targets expanded into
        // full rows, by batch rows picked from a cached set, for both weights.
        tch::manual_seed(5);
        let opts = (Kind::Float, Device::Cpu);
        let (n, classes, k) = (6i64, 40i64, 5i64);
        let teacher = Tensor::randn([n, classes], opts) * 3.0;
        let labels = Tensor::randint(classes, [n], (Kind::Int64, Device::Cpu));
        let z = Tensor::randn([n, classes], opts) * 2.0;
        let idx = Tensor::from_slice(&[4i64, 0, 2, 5]);
        let (y, zb) = (labels.index_select(0, &idx), z.index_select(0, &idx));
        for (t, hard) in [(1.0, 0.0), (1.0, 0.5), (2.0, 0.5), (4.0, 0.0)] {
            let o = Objective::soft_targets(t, LossWeights { hard, soft: 1.0 - hard }).unwrap();
            let sparse = o.top_k_targets(&teacher, k).unwrap();
            let top = sparse.as_top_k().unwrap();
            let full = Tensor::zeros([n, classes], opts).scatter(1, top.classes, top.probs);
            let dense = TeacherTargets::probs(full, t).unwrap();
            let ((a, ga), (b, gb)) = (
                with_grad(&zb, |z| o.loss(z, Some(&sparse.rows(&idx).unwrap()), Some(&y)).unwrap()),
                with_grad(&zb, |z| o.loss(z, Some(&dense.rows(&idx).unwrap()), Some(&y)).unwrap()),
            );
            let (a_total, b_total) = (value(&a.total), value(&b.total));
            assert!((a_total - b_total).abs() < 1e-5 * b_total.abs(), "T = {t}, hard {hard}: {a_total} vs {b_total}");
            let (a_kl, b_kl) = (value(&a.soft_kl), value(&b.soft_kl));
            assert!((a_kl - b_kl).abs() < 1e-4 * (1.0 + b_kl.abs()), "T = {t}: KL {a_kl} vs {b_kl}");
            assert!(max_gap(&ga, &gb) < 1e-6, "T = {t}, hard {hard}");
            if hard == 0.0 {
                let rows = dense.rows(&idx).unwrap();
                let reference = soft_target_loss_from_probs(&zb, rows.dense().unwrap(), t).unwrap();
                assert!((b_total - value(&reference)).abs() < 1e-5 * b_total.abs());
            }
        }
    }

    #[test]
    fn rows_cat_and_devices_keep_the_form_and_temperature() {
        let _generator = crate::lock_global_generator();
        let o = Objective::soft_targets(3.0, LossWeights::default()).unwrap();
        let v = Tensor::randn([6, 5], OPTS);
        let whole = o.top_k_targets(&v, 2).unwrap();
        let parts = [o.top_k_targets(&v.narrow(0, 0, 4), 2).unwrap(), o.top_k_targets(&v.narrow(0, 4, 2), 2).unwrap()];
        let joined = TeacherTargets::cat(&parts).unwrap();
        assert_eq!((joined.examples(), joined.temperature()), (6, Some(3.0)));
        let (a, b) = (whole.as_top_k().unwrap(), joined.as_top_k().unwrap());
        assert!(a.probs.equal(b.probs) && a.classes.equal(b.classes));
        let picked = joined.rows(&Tensor::from_slice(&[5i64, 0])).unwrap();
        assert!(picked.as_top_k().unwrap().classes.get(0).equal(&a.classes.get(5)));
        let moved = picked.to_device(Device::Cpu).unwrap();
        assert_eq!(moved.temperature(), Some(3.0));
        // Parts of different forms or temperatures do not join.
        let dense = o.teacher_targets(&v).unwrap();
        assert!(matches!(TeacherTargets::cat(&[whole, dense]), Err(Error::WrongTargets { .. })));
        let other = Objective::soft_targets(4.0, LossWeights::default()).unwrap();
        let mixed = [o.teacher_targets(&v).unwrap(), other.teacher_targets(&v).unwrap()];
        assert!(matches!(TeacherTargets::cat(&mixed), Err(Error::TemperatureMismatch { .. })));
        assert!(TeacherTargets::cat(&[]).is_err());
        // Top-k targets are checked when made from tensors.
        let p = Tensor::ones([2, 3], OPTS);
        let wrong_kind = TeacherTargets::top_k(p.shallow_clone(), Tensor::zeros([2, 3], OPTS), 1.0);
        assert!(matches!(wrong_kind, Err(Error::ClassesKind { .. })));
        let wrong_shape = TeacherTargets::top_k(p, Tensor::zeros([2, 2], (Kind::Int64, Device::Cpu)), 1.0);
        assert!(matches!(wrong_shape, Err(Error::TopKShape { arg: "teacher_classes", .. })));
    }

    #[test]
    fn copy_from_writes_in_place_and_refuses_other_forms_temperatures_and_shapes() {
        let _generator = crate::lock_global_generator();
        let o = Objective::soft_targets(3.0, LossWeights::default()).unwrap();
        let (v, w) = (Tensor::randn([6, 5], OPTS), Tensor::randn([6, 5], OPTS));
        let mut dst = o.top_k_targets(&v, 2).unwrap().copy().unwrap();
        let ptrs = |t: &TeacherTargets| {
            let k = t.as_top_k().unwrap();
            (k.probs.data_ptr(), k.classes.data_ptr())
        };
        let before = ptrs(&dst);
        let src = o.top_k_targets(&w, 2).unwrap();
        dst.copy_from(&src).unwrap();
        assert_eq!(ptrs(&dst), before, "the same memory");
        let (a, b) = (dst.as_top_k().unwrap(), src.as_top_k().unwrap());
        assert!(a.probs.equal(b.probs) && a.classes.equal(b.classes));
        // A copy owns its memory.
        assert_ne!(ptrs(&src.copy().unwrap()), ptrs(&src));
        assert!(matches!(dst.copy_from(&o.top_k_targets(&w, 3).unwrap()), Err(Error::TargetsShape { .. })));
        assert!(matches!(
            dst.copy_from(&o.top_k_targets(&w.narrow(0, 0, 5), 2).unwrap()),
            Err(Error::TargetsShape { .. })
        ));
        assert!(matches!(dst.copy_from(&o.teacher_targets(&w).unwrap()), Err(Error::WrongTargets { .. })));
        let other = Objective::soft_targets(4.0, LossWeights::default()).unwrap();
        assert!(matches!(dst.copy_from(&other.top_k_targets(&w, 2).unwrap()), Err(Error::TemperatureMismatch { .. })));
    }
}
