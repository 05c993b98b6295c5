//! The training step and epoch loop shared by `kd-run run` and `kd-run bench`.

use crate::config::{DistillSpec, Objective, Training};
use crate::data::{self, Split};
use crate::train::optim::Optimizer;
use anyhow::{Context, Result};
use kd_core::{LossWeights, SoftTargets, TopKForm, TopKTargets};
use kd_models::Mlp;
use tch::{nn::ModuleT, Kind, Tensor};

pub mod optim;
pub mod progress;
pub mod stopping;

/// What the student is trained to match.
pub enum Supervision<'a> {
    /// The labels (cross-entropy at T = 1).
    Hard,
    /// A teacher, through `spec` (soft targets at T or logits, plus the weighted hard term).
    Distill { spec: &'a DistillSpec, teacher: TeacherSignal<'a> },
}

/// Where a teacher's outputs come from.
pub enum TeacherSignal<'a> {
    /// Precomputed once over the whole transfer set, indexed like it: probabilities at T for
    /// the soft objective, logits for logit matching.
    Cached(Tensor),
    /// Run on each (jittered) batch in evaluation mode.
    Live(&'a Teacher),
    /// The teacher's `k` most probable classes per example of the transfer set, with their
    /// probabilities at T renormalized over them; the loss reads them as they are
    /// ([`kd_core::top_k_distillation_loss`]), never as full rows.
    TopK {
        /// `[n, k]` probabilities.
        probs: Tensor,
        /// `[n, k]` class ids.
        classes: Tensor,
    },
}

/// A batch's rows of a teacher signal.
pub enum BatchTargets {
    /// Full rows: probabilities at T, or logits (live teacher, logit matching).
    Dense(Tensor),
    /// The `[b, k]` probabilities and class ids of [`TeacherSignal::TopK`].
    TopK {
        /// `[b, k]` probabilities.
        probs: Tensor,
        /// `[b, k]` class ids.
        classes: Tensor,
    },
}

/// A teacher: one network, or an ensemble whose distribution at temperature T is the mean of
/// its members' `softmax(z_m / T)`.
pub struct Teacher {
    /// The networks (one for a single teacher).
    pub members: Vec<Mlp>,
    /// The temperature at which members are averaged.
    pub temperature: f64,
}

impl Teacher {
    /// Logits whose softmax at the teacher's temperature T is its distribution at T, in
    /// evaluation mode: a single network's own logits; for an ensemble
    /// `T * log(mean_m softmax(z_m / T))`.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let members: Vec<Tensor> = self.members.iter().map(|m| m.forward_t(x, false)).collect();
        combine_logits(&members, self.temperature)
    }
}

/// What [`Teacher::logits`] computes from the members' logits: the logits themselves for one
/// member, else `T * (logsumexp_m log_softmax(z_m / T) - ln M)`, which softmaxes at T to the
/// mean of the members' distributions at T.
pub fn combine_logits(members: &[Tensor], temperature: f64) -> Result<Tensor> {
    match members {
        [] => anyhow::bail!("a teacher needs at least one network"),
        [one] => Ok(one.shallow_clone()),
        _ => {
            let log_probs: Vec<Tensor> =
                members.iter().map(|z| kd_core::log_softmax_t(z, temperature)).collect::<Result<_, _>>()?;
            let stacked = Tensor::stack(&log_probs, 0);
            Ok((stacked.logsumexp([0], false) - (members.len() as f64).ln()) * temperature)
        }
    }
}

/// Logits of `net` in evaluation mode, without gradients, over `split` in chunks of `batch`.
pub fn logits(net: &Mlp, split: &Split, batch: i64) -> Tensor {
    let _guard = tch::no_grad_guard();
    let n = split.len();
    let chunks: Vec<Tensor> =
        (0..n).step_by(batch as usize).map(|s| net.forward_t(&split.range(s, batch.min(n - s)), false)).collect();
    Tensor::cat(&chunks, 0)
}

/// Logits whose softmax at `temperature` is the mean, over every translation of each image of
/// `split` by up to `max_shift` pixels in each direction (`(2 max_shift + 1)^2` of them,
/// zero-filled), of `net`'s softened distribution on the translated image:
/// `z = T log((1 / S) sum_s softmax(net(shift_s(x)) / T))`. In evaluation mode, without
/// gradients, over `split` in chunks of `batch`.
pub fn translation_averaged_logits(
    net: &Mlp,
    split: &Split,
    batch: i64,
    (rows, cols): (i64, i64),
    max_shift: i64,
    temperature: f64,
) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let n = split.len();
    let shifts: Vec<(i64, i64)> =
        (-max_shift..=max_shift).flat_map(|dy| (-max_shift..=max_shift).map(move |dx| (dy, dx))).collect();
    let chunks = (0..n)
        .step_by(batch as usize)
        .map(|start| {
            let x = split.range(start, batch.min(n - start));
            let views: Vec<Tensor> =
                shifts.iter().map(|&(dy, dx)| net.forward_t(&data::translate(&x, rows, cols, dy, dx), false)).collect();
            combine_logits(&views, temperature)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&chunks, 0))
}

/// The `k` largest of each row of a teacher's `logits` as probabilities at `temperature`,
/// renormalized over those `k`, with their class ids: `(probs, classes)`, each `[n, k]`.
pub fn top_k_targets(logits: &Tensor, k: i64, temperature: f64) -> Result<(Tensor, Tensor)> {
    let (values, classes) = logits.topk(k, 1, true, true);
    Ok((kd_core::softmax_t(&values, temperature)?, classes))
}

/// What a cached teacher provides to the loss: probabilities at T for the soft objective,
/// the logits themselves for logit matching.
pub fn teacher_signal(logits: &Tensor, spec: &DistillSpec) -> Result<Tensor> {
    Ok(match spec.objective {
        Objective::Soft => kd_core::softmax_t(logits, spec.temperature)?,
        Objective::Logits => logits.shallow_clone(),
    })
}

impl Supervision<'_> {
    /// Multiply-adds per example of the teacher networks run on every batch (0 unless live).
    pub fn live_teacher_macs(&self) -> i64 {
        match self {
            Supervision::Distill { teacher: TeacherSignal::Live(t), .. } => {
                t.members.iter().map(Mlp::forward_macs).sum()
            }
            _ => 0,
        }
    }

    /// The batch's rows (`idx`, inputs `x`) of the teacher signal (`None` for hard labels).
    pub fn batch_targets(&self, idx: &Tensor, x: &Tensor) -> Result<Option<BatchTargets>> {
        Ok(match self {
            Supervision::Hard => None,
            Supervision::Distill { teacher: TeacherSignal::Cached(all), .. } => {
                Some(BatchTargets::Dense(all.index_select(0, idx)))
            }
            Supervision::Distill { teacher: TeacherSignal::Live(t), .. } => Some(BatchTargets::Dense(t.logits(x)?)),
            Supervision::Distill { teacher: TeacherSignal::TopK { probs, classes }, .. } => {
                Some(BatchTargets::TopK { probs: probs.index_select(0, idx), classes: classes.index_select(0, idx) })
            }
        })
    }

    /// The objective for one batch: `logits` of the student, `labels`, and the batch's teacher
    /// signal (`teacher_out`, rows aligned with the batch). With it, for soft targets, the soft
    /// term's KL form (`T^2 KL(p || q)`, unweighted; `DistillLoss::soft_kl`), which shows the
    /// student converging where the objective is dominated by the teacher's entropy.
    pub fn loss(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        teacher_out: Option<&BatchTargets>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        match self {
            Supervision::Hard => Ok((kd_core::hard_target_loss(logits, labels)?, None)),
            Supervision::Distill { spec, teacher } => {
                let out = teacher_out.context("distillation needs the teacher's outputs for the batch")?;
                let weights = LossWeights::new(spec.hard_weight, spec.soft_weight)?;
                let t = match out {
                    BatchTargets::Dense(t) => t,
                    BatchTargets::TopK { probs, classes } => {
                        let targets = TopKTargets { probs, classes };
                        let loss = kd_core::top_k_distillation_loss(
                            logits,
                            targets,
                            Some(labels),
                            spec.temperature,
                            weights,
                            TopKForm::CrossEntropy,
                        )?;
                        return Ok((loss.total, (weights.soft > 0.0).then(|| loss.soft_kl.detach())));
                    }
                };
                match spec.objective {
                    Objective::Soft => {
                        let targets = match teacher {
                            TeacherSignal::Cached(_) | TeacherSignal::TopK { .. } => SoftTargets::Probs(t),
                            TeacherSignal::Live(_) => SoftTargets::Logits(t),
                        };
                        let l = kd_core::distillation_loss(logits, targets, Some(labels), spec.temperature, weights)?;
                        Ok((l.total, (weights.soft > 0.0).then(|| l.soft_kl.detach())))
                    }
                    Objective::Logits => {
                        let mut total = kd_core::logit_matching_loss(logits, t)? * weights.soft;
                        if weights.hard > 0.0 {
                            total += kd_core::hard_target_loss(logits, labels)? * weights.hard;
                        }
                        Ok((total, None))
                    }
                }
            }
        }
    }
}

/// A network with its optimizer.
pub struct Trainer<'a> {
    /// The network being trained.
    pub net: &'a Mlp,
    params: Vec<Tensor>,
    /// Its optimizer.
    pub opt: Optimizer,
}

impl<'a> Trainer<'a> {
    /// Wraps `net`, whose trainable parameters are `params`, with `opt`.
    pub fn new(net: &'a Mlp, params: Vec<Tensor>, opt: Optimizer) -> Self {
        Trainer { net, params, opt }
    }

    /// How many of the parameters and optimizer-state values are NaN or infinite, as a device
    /// scalar (int64). A non-finite gradient makes its update non-finite, so this catches the
    /// gradients of the steps no later loss has seen.
    pub fn non_finite(&self) -> Tensor {
        let _guard = tch::no_grad_guard();
        let state: Vec<Tensor> = self.opt.state().into_iter().map(|(_, t)| t).collect();
        let counts: Vec<Tensor> = self
            .params
            .iter()
            .chain(&state)
            .filter(|t| t.is_floating_point())
            .map(|t| t.isfinite().logical_not().sum(Kind::Int64))
            .collect();
        match counts.as_slice() {
            [] => Tensor::zeros([], (Kind::Int64, tch::Device::Cpu)),
            _ => Tensor::stack(&counts, 0).sum(Kind::Int64),
        }
    }

    /// One optimization step: forward in training mode, `loss`, gradients, update, max-norm.
    /// Returns the logits and the loss, detached; nothing here waits for the device.
    pub fn step(&mut self, x: &Tensor, loss: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<(Tensor, Tensor)> {
        let logits = self.net.forward_t(x, true);
        let loss = loss(&logits)?;
        let grads = Tensor::run_backward(&[&loss], &self.params, false, false);
        self.opt.step(grads);
        self.net.apply_max_norm();
        Ok((logits.detach(), loss.detach()))
    }
}

/// Sums over an epoch, kept on the device until the epoch ends.
pub struct EpochTotals {
    /// Mean objective.
    pub loss: f64,
    /// Training-mode accuracy.
    pub accuracy: f64,
    /// Mean KL form of the soft term, for soft-target distillation (see [`Supervision::loss`]).
    pub soft_kl: Option<f64>,
}

/// Image geometry for jitter: (rows, cols), None for inputs that are not images.
pub type Geometry = Option<(i64, i64)>;

/// The training loss may grow to this many times its value at the first step a process trains
/// (or 1, if that is smaller) before the loop calls it divergence: an objective that starts near
/// `ln K` (or `T^2 ln K`) and reads 10,000 times that is no longer learning.
pub const DIVERGENCE_FACTOR: f64 = 1e4;

/// Watches a stage's training loss across its epochs: the loss of the first step, read at the
/// first check, is the scale [`DIVERGENCE_FACTOR`] applies to.
#[derive(Default)]
pub struct LossGuard {
    reference: Option<f64>,
}

/// Why [`train_epoch`] stopped: the training diverged.
#[derive(Debug, Clone, PartialEq)]
pub struct Diverged {
    /// What went wrong.
    pub kind: Divergence,
    /// The step (1-based) after which it was found: the loop checks every `report_every` steps
    /// and after the last one.
    pub found_after: usize,
    /// Steps in the epoch.
    pub steps: usize,
}

/// How a training run diverged.
#[derive(Debug, Clone, PartialEq)]
pub enum Divergence {
    /// The loss of a step (1-based) was NaN or infinite.
    NonFinite {
        /// The step.
        step: usize,
        /// Its loss.
        loss: f64,
    },
    /// The mean loss over steps `from..=to` was above [`DIVERGENCE_FACTOR`] times the reference.
    Grew {
        /// First step of the window.
        from: usize,
        /// Last step of the window.
        to: usize,
        /// Its mean loss.
        mean: f64,
        /// The loss of the first step.
        reference: f64,
    },
    /// After the epoch's last step this many weights or optimizer-state values were NaN or
    /// infinite, the loss finite.
    State {
        /// Non-finite values.
        count: i64,
    },
}

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let steps = self.steps;
        match &self.kind {
            Divergence::NonFinite { step, loss } => write!(f, "the training loss is {loss} at step {step} of {steps}"),
            Divergence::Grew { from, to, mean, reference } => write!(
                f,
                "the mean training loss of steps {from}-{to} (of {steps}) is {mean:.3e}, more than {DIVERGENCE_FACTOR:.0e} \
                 times its {reference:.4} at the first step"
            ),
            Divergence::State { count } => {
                write!(f, "after step {steps} of {steps}, {count} weights or optimizer values are NaN or infinite")
            }
        }
    }
}

impl std::error::Error for Diverged {}

/// One pass over `train` (only its `examples`, when given) in a random order. `on_step(done, running_loss)` is called after each
/// step; `running_loss` is `Some` every `report_every` steps only (reading it syncs the device).
///
/// Fails with [`Diverged`] when a step's loss is not finite or the loss grew past `guard`'s
/// bound (checked with the losses read every `report_every` steps and at the end, so up to
/// `report_every` steps late), or when a weight or optimizer value is not finite after the last
/// step. The per-step losses stay on the device in between: no step waits for it.
#[allow(clippy::too_many_arguments)]
pub fn train_epoch(
    trainer: &mut Trainer,
    (train, examples): (&Split, Option<&Tensor>),
    supervision: &Supervision,
    training: &Training,
    geometry: Geometry,
    report_every: usize,
    guard: &mut LossGuard,
    mut on_step: impl FnMut(usize, Option<f64>),
) -> Result<EpochTotals> {
    let device = train.labels.device();
    let n = examples.map_or(train.len(), |e| e.size()[0]);
    let steps = if n == 0 { 0 } else { (n - 1) / training.batch_size + 1 };
    // Each step's loss times its batch size, kept on the device and read at the checks.
    let step_losses = Tensor::zeros([steps], (Kind::Float, device));
    let mut correct = Tensor::zeros([], (Kind::Int64, device));
    let mut kl_sum: Option<Tensor> = None;
    let mut seen = 0i64;
    let first_batch = training.batch_size.min(n);
    let mut check = Check { steps: steps as usize, first_batch, checked: 0, examples: 0, total: 0.0 };
    for (i, positions) in data::batches(n, training.batch_size, device).enumerate() {
        let idx = examples.map_or_else(|| positions.shallow_clone(), |e| e.index_select(0, &positions));
        let x = train.inputs(&idx);
        let x = match geometry {
            Some((rows, cols)) if training.jitter > 0 => data::jitter(&x, rows, cols, i64::from(training.jitter)),
            _ => x,
        };
        let y = train.labels.index_select(0, &idx);
        let teacher_out = supervision.batch_targets(&idx, &x)?;
        let mut kl = None;
        let (logits, loss) = trainer.step(&x, |z| {
            let (loss, soft_kl) = supervision.loss(z, &y, teacher_out.as_ref())?;
            kl = soft_kl;
            Ok(loss)
        })?;
        let b = idx.size()[0];
        seen += b;
        step_losses.get(i as i64).copy_(&(loss * b as f64));
        if let Some(kl) = kl {
            let kl = kl.to_kind(Kind::Float) * b as f64;
            kl_sum = Some(kl_sum.map_or_else(|| kl.shallow_clone(), |sum| sum + &kl));
        }
        correct += logits.argmax(1, false).eq_tensor(&y).sum(Kind::Int64);
        let report = if report_every > 0 && (i + 1) % report_every == 0 {
            check.window(&step_losses, i + 1, seen, guard)?;
            Some(check.total / seen as f64)
        } else {
            None
        };
        on_step(i + 1, report);
    }
    if check.checked < check.steps {
        check.window(&step_losses, check.steps, seen, guard)?;
    }
    let bad = i64::try_from(trainer.non_finite())?;
    if bad > 0 {
        let steps = check.steps;
        return Err(Diverged { kind: Divergence::State { count: bad }, found_after: steps, steps }.into());
    }
    Ok(EpochTotals {
        loss: check.total / seen.max(1) as f64,
        accuracy: i64::try_from(&correct)? as f64 / seen.max(1) as f64,
        soft_kl: kl_sum.map(|sum| f64::try_from(&sum)).transpose()?.map(|sum| sum / seen.max(1) as f64),
    })
}

/// The losses of an epoch read so far.
struct Check {
    steps: usize,
    /// Examples of the first step.
    first_batch: i64,
    /// Steps read.
    checked: usize,
    /// Examples of those steps.
    examples: i64,
    /// Sum of their losses times batch sizes.
    total: f64,
}

impl Check {
    /// Reads the losses of the steps after the last check up to `upto` (1-based, inclusive),
    /// whose examples bring the count to `seen`, and fails if they diverged.
    fn window(&mut self, step_losses: &Tensor, upto: usize, seen: i64, guard: &mut LossGuard) -> Result<()> {
        let from = self.checked;
        let window = step_losses.narrow(0, from as i64, (upto - from) as i64);
        let sum = f64::try_from(window.sum(Kind::Double))?;
        let examples = seen - self.examples;
        let diverged = |kind| Diverged { kind, found_after: upto, steps: self.steps };
        if !sum.is_finite() {
            let bad = window.isfinite().logical_not().nonzero();
            let first = i64::try_from(bad.get(0).get(0))?;
            let loss = f64::try_from(window.get(first))?;
            return Err(diverged(Divergence::NonFinite { step: from + first as usize + 1, loss }).into());
        }
        let reference = match guard.reference {
            Some(r) => r,
            None => {
                let r = f64::try_from(step_losses.get(0))? / self.first_batch.max(1) as f64;
                guard.reference = Some(r);
                r
            }
        };
        let mean = sum / examples.max(1) as f64;
        if mean > DIVERGENCE_FACTOR * reference.max(1.0) {
            return Err(diverged(Divergence::Grew { from: from + 1, to: upto, mean, reference }).into());
        }
        self.checked = upto;
        self.examples = seen;
        self.total += sum;
        Ok(())
    }
}

/// How a model does on a split.
pub struct Evaluation {
    /// Mean hard-label cross-entropy.
    pub loss: f64,
    /// Misclassified examples.
    pub errors: i64,
    /// Examples.
    pub examples: i64,
    /// Misclassified examples per true class.
    pub class_errors: Vec<i64>,
    /// Examples per true class.
    pub class_examples: Vec<i64>,
}

impl Evaluation {
    /// `1 - errors / examples`.
    pub fn accuracy(&self) -> f64 {
        1.0 - self.errors as f64 / self.examples.max(1) as f64
    }
}

/// Evaluates `net` on `split` in evaluation mode (one device sync at the end), its weights
/// converted to the compute precision once for the whole pass.
pub fn evaluate(net: &Mlp, split: &Split, num_classes: i64) -> Result<Evaluation> {
    let frozen = net.frozen();
    evaluate_with(&|x| Ok(frozen.forward_t(x, false)), split, None, num_classes)
}

/// Evaluates a model given as `logits(x)` (log-probabilities up to a constant per row) on
/// `split` (only its `examples`, when given), without gradients (one device sync at the end).
pub fn evaluate_with(
    logits: &dyn Fn(&Tensor) -> Result<Tensor>,
    split: &Split,
    examples: Option<&Tensor>,
    num_classes: i64,
) -> Result<Evaluation> {
    let _guard = tch::no_grad_guard();
    let n = examples.map_or(split.len(), |e| e.size()[0]);
    let labels = examples.map_or_else(|| split.labels.shallow_clone(), |e| split.labels.index_select(0, e));
    let device = split.labels.device();
    let mut loss_sum = Tensor::zeros([], (Kind::Double, device));
    let mut class_errors = Tensor::zeros([num_classes], (Kind::Int64, device));
    for s in (0..n).step_by(EVAL_BATCH as usize) {
        let len = EVAL_BATCH.min(n - s);
        let x = match examples {
            Some(e) => split.inputs(&e.narrow(0, s, len)),
            None => split.range(s, len),
        };
        let logits = logits(&x)?;
        let y = labels.narrow(0, s, len);
        loss_sum += kd_core::hard_target_loss(&logits, &y)?.to_kind(Kind::Double) * len as f64;
        let wrong = logits.argmax(1, false).ne_tensor(&y);
        class_errors += y.masked_select(&wrong).bincount::<Tensor>(None, num_classes);
    }
    let class_examples = Vec::<i64>::try_from(labels.bincount::<Tensor>(None, num_classes))?;
    let class_errors = Vec::<i64>::try_from(class_errors)?;
    Ok(Evaluation {
        loss: f64::try_from(&loss_sum)? / n.max(1) as f64,
        errors: class_errors.iter().sum(),
        examples: n,
        class_errors,
        class_examples,
    })
}

/// How closely a student follows its teacher on a split: top-1 agreement and the errors they
/// share (the student's fidelity, as opposed to its accuracy).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Agreement {
    /// Examples on which the two top-1 classes are the same.
    pub agree: i64,
    /// Examples both misclassify (not necessarily as the same class).
    pub shared_errors: i64,
    /// The teacher's errors.
    pub teacher_errors: i64,
    /// Examples.
    pub examples: i64,
}

impl Agreement {
    /// `agree / examples`.
    pub fn rate(&self) -> f64 {
        self.agree as f64 / self.examples.max(1) as f64
    }
}

/// A model's logits on the examples of a split.
pub enum Outputs<'a> {
    /// Computed batch by batch from the inputs.
    Model(&'a dyn Fn(&Tensor) -> Result<Tensor>),
    /// Computed already, one row per example of the split in its order (a teacher's cached
    /// outputs on its transfer set).
    Cached(&'a Tensor),
}

impl Outputs<'_> {
    /// The logits of the `len` examples from `start`, whose inputs are `x`.
    fn rows(&self, x: &Tensor, start: i64, len: i64) -> Result<Tensor> {
        match self {
            Outputs::Model(logits) => logits(x),
            Outputs::Cached(all) => Ok(all.narrow(0, start, len)),
        }
    }
}

/// Compares the top-1 answers of `student` and `teacher` on every example of `split`, without
/// gradients (one device sync at the end).
pub fn agreement(student: &dyn Fn(&Tensor) -> Result<Tensor>, teacher: Outputs, split: &Split) -> Result<Agreement> {
    let _guard = tch::no_grad_guard();
    let n = split.len();
    if let Outputs::Cached(all) = teacher {
        if all.size().first() != Some(&n) {
            anyhow::bail!("the teacher's cached outputs have shape {:?}, for a split of {n} examples", all.size());
        }
    }
    // [agree, shared errors, teacher errors]
    let mut counts = Tensor::zeros([3], (Kind::Int64, split.labels.device()));
    for s in (0..n).step_by(EVAL_BATCH as usize) {
        let len = EVAL_BATCH.min(n - s);
        let x = split.range(s, len);
        let y = split.labels.narrow(0, s, len);
        let (a, b) = (student(&x)?.argmax(1, false), teacher.rows(&x, s, len)?.argmax(1, false));
        let (a_wrong, b_wrong) = (a.ne_tensor(&y), b.ne_tensor(&y));
        counts += Tensor::stack(&[a.eq_tensor(&b), a_wrong.logical_and(&b_wrong), b_wrong], 0).sum_dim_intlist(
            1,
            false,
            Kind::Int64,
        );
    }
    let c = Vec::<i64>::try_from(counts)?;
    Ok(Agreement { agree: c[0], shared_errors: c[1], teacher_errors: c[2], examples: n })
}

/// Batch size used for evaluation and teacher passes (no gradients, so larger than training).
pub const EVAL_BATCH: i64 = 1000;

#[cfg(test)]
mod tests {
    use super::*;
    use kd_core::{ensemble_probs, EnsembleRule};

    #[test]
    fn combined_logits_soften_to_the_mean_of_the_members_distributions() {
        tch::manual_seed(7);
        let members: Vec<Tensor> =
            (0..3).map(|_| Tensor::randn([5, 4], (Kind::Double, tch::Device::Cpu)) * 6.0).collect();
        for t in [1.0, 2.5, 20.0] {
            let combined = combine_logits(&members, t).unwrap();
            let ours = kd_core::softmax_t(&combined, t).unwrap();
            let reference = ensemble_probs(&members, t, EnsembleRule::ArithmeticMean).unwrap();
            let gap = f64::try_from((ours - reference).abs().max()).unwrap();
            assert!(gap < 1e-12, "T = {t}: {gap}");
        }
        let one = combine_logits(&members[..1], 3.0).unwrap();
        assert!(one.equal(&members[0]), "a single teacher's logits pass through");
        assert!(combine_logits(&[], 1.0).is_err());
    }

    #[test]
    fn agreement_counts_same_answers_and_shared_errors() {
        // Labels 0..5; the student answers [0, 1, 2, 0, 0], the teacher [0, 2, 2, 0, 4].
        let x = Tensor::from_slice(&[0i64, 1, 2, 3, 4]);
        let split = Split::new(x.to_kind(Kind::Float).view([5, 1]), x.shallow_clone());
        let answers = |a: [i64; 5]| {
            let a = Tensor::from_slice(&a);
            move |x: &Tensor| {
                let rows = x.view([-1]).to_kind(Kind::Int64);
                Ok(a.index_select(0, &rows).one_hot(5).to_kind(Kind::Float))
            }
        };
        let (student, teacher) = (answers([0, 1, 2, 0, 0]), answers([0, 2, 2, 0, 4]));
        let got = agreement(&student, Outputs::Model(&teacher), &split).unwrap();
        // Same answer on examples 0, 2, 3; both wrong on 3 only; the teacher wrong on 1 and 3
        // (the student on 3 and 4).
        assert_eq!(got, Agreement { agree: 3, shared_errors: 1, teacher_errors: 2, examples: 5 });
        assert!((got.rate() - 0.6).abs() < 1e-12);
        let same = agreement(&student, Outputs::Model(&student), &split).unwrap();
        // A model agrees with itself everywhere and shares all of its errors (on 3 and 4).
        assert_eq!((same.agree, same.shared_errors, same.teacher_errors), (5, 2, 2));
        // The teacher's outputs read from a cache give the same counts; a cache of another
        // length is refused.
        let cached = teacher(&split.images).unwrap();
        assert_eq!(agreement(&student, Outputs::Cached(&cached), &split).unwrap(), got);
        let err = agreement(&student, Outputs::Cached(&cached.narrow(0, 0, 4)), &split).unwrap_err();
        assert!(err.to_string().contains("for a split of 5 examples"), "{err}");
    }

    #[test]
    fn top_k_targets_are_the_softened_distribution_renormalized_over_the_k_largest() {
        let logits = Tensor::from_slice(&[2.0f64, -1.0, 0.5, 3.0, 0.0]).view([1, 5]);
        let t = 2.0;
        let (probs, classes) = top_k_targets(&logits, 3, t).unwrap();
        assert_eq!(Vec::<i64>::try_from(classes.view([-1])).unwrap(), [3, 0, 2]);
        let e = |z: f64| (z / t).exp();
        let norm = e(3.0) + e(2.0) + e(0.5);
        let want = [e(3.0) / norm, e(2.0) / norm, e(0.5) / norm];
        let got = Vec::<f64>::try_from(probs.view([-1])).unwrap();
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
        }
        // k = all classes: the full softened distribution, sorted.
        let (all, _) = top_k_targets(&logits, 5, t).unwrap();
        let full = kd_core::softmax_t(&logits, t).unwrap().sort(1, true).0;
        assert!(f64::try_from((all - full).abs().max()).unwrap() < 1e-12);
    }

    #[test]
    fn top_k_supervision_matches_the_dense_expansion_of_its_targets() {
        // The loss from top-k targets against the loss from the same targets expanded into full
        // rows (as the training loop did before): equal values and gradients, for both weights.
        tch::manual_seed(5);
        let opts = (Kind::Float, tch::Device::Cpu);
        let (n, classes, k) = (6i64, 40i64, 5i64);
        let teacher = Tensor::randn([n, classes], opts) * 3.0;
        let labels = Tensor::randint(classes, [n], (Kind::Int64, tch::Device::Cpu));
        let z = Tensor::randn([n, classes], opts) * 2.0;
        for (t, hard) in [(1.0, 0.0), (1.0, 0.5), (2.0, 0.5), (4.0, 0.0)] {
            let (probs, ids) = top_k_targets(&teacher, k, t).unwrap();
            let full = Tensor::zeros([n, classes], opts).scatter(1, &ids, &probs);
            let spec = DistillSpec {
                teacher: crate::config::ModelSource::Stage("t".into()),
                objective: Objective::Soft,
                temperature: t,
                hard_weight: hard,
                soft_weight: 1.0 - hard,
                transfer_exclude: vec![],
                transfer_only: vec![],
                top_k: Some(k),
                translations: None,
            };
            let idx = Tensor::from_slice(&[4i64, 0, 2, 5]);
            let x = Tensor::zeros([4, 1], opts);
            let sparse = Supervision::Distill { spec: &spec, teacher: TeacherSignal::TopK { probs, classes: ids } };
            let dense = Supervision::Distill { spec: &spec, teacher: TeacherSignal::Cached(full) };
            let (y, zb) = (labels.index_select(0, &idx), z.index_select(0, &idx));
            let run = |s: &Supervision| {
                let zb = zb.detach().set_requires_grad(true);
                let targets = s.batch_targets(&idx, &x).unwrap();
                let (loss, kl) = s.loss(&zb, &y, targets.as_ref()).unwrap();
                let g = Tensor::run_backward(&[&loss], &[&zb], false, false).pop().unwrap();
                (loss.double_value(&[]), kl.map(|k| k.double_value(&[])), g)
            };
            let ((a, kl_a, ga), (b, kl_b, gb)) = (run(&sparse), run(&dense));
            assert!((a - b).abs() < 1e-5 * b.abs(), "T = {t}, hard {hard}: {a} vs {b}");
            // The KL form from the top-k pairs equals the dense one on the expanded targets.
            match (kl_a, kl_b) {
                (Some(x), Some(y)) => assert!((x - y).abs() < 1e-4 * (1.0 + y.abs()), "T = {t}: KL {x} vs {y}"),
                (x, y) => assert_eq!(x.is_some(), y.is_some(), "T = {t}"),
            }
            let gap = f64::try_from((ga - gb).abs().max()).unwrap();
            assert!(gap < 1e-6, "T = {t}, hard {hard}: gradient {gap}");
        }
    }

    #[test]
    fn translation_averaged_logits_soften_to_the_mean_over_every_shift() {
        // A small net on 3x4 images; the reference shifts each image by hand (zero fill),
        // runs the net on it and averages the softened distributions in f64.
        let (rows, cols, t) = (3i64, 4i64, 2.5);
        tch::manual_seed(3);
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let config = kd_models::MlpConfig { sizes: vec![12, 7, 5], ..Default::default() };
        let net = Mlp::new(&vs.root(), config).unwrap();
        let images = Tensor::rand([3, rows * cols], (Kind::Float, tch::Device::Cpu));
        let split = Split::new(images.shallow_clone(), Tensor::zeros([3], (Kind::Int64, tch::Device::Cpu)));
        let got = translation_averaged_logits(&net, &split, 2, (rows, cols), 1, t).unwrap();
        assert_eq!(got.size(), [3, 5]);
        let got = Vec::<f64>::try_from(kd_core::softmax_t(&got.to_kind(Kind::Double), t).unwrap().view([-1])).unwrap();
        for e in 0..3i64 {
            let img = Vec::<f32>::try_from(images.get(e)).unwrap();
            let mut mean = [0f64; 5];
            for dy in -1..=1i64 {
                for dx in -1..=1i64 {
                    let shifted: Vec<f32> = (0..rows * cols)
                        .map(|p| {
                            let (sr, sc) = (p / cols - dy, p % cols - dx);
                            let inside = (0..rows).contains(&sr) && (0..cols).contains(&sc);
                            if inside {
                                img[(sr * cols + sc) as usize]
                            } else {
                                0.0
                            }
                        })
                        .collect();
                    let z = tch::no_grad(|| net.forward_t(&Tensor::from_slice(&shifted).view([1, -1]), false));
                    let z = Vec::<f64>::try_from(z.to_kind(Kind::Double).view([-1])).unwrap();
                    let norm: f64 = z.iter().map(|v| (v / t).exp()).sum();
                    for (m, v) in mean.iter_mut().zip(&z) {
                        *m += (v / t).exp() / norm / 9.0;
                    }
                }
            }
            for (c, want) in mean.iter().enumerate() {
                let g = got[e as usize * 5 + c];
                assert!((g - want).abs() < 1e-5, "example {e} class {c}: {g} vs {want}");
            }
        }
        // No translations: the plain logits.
        let plain = translation_averaged_logits(&net, &split, 2, (rows, cols), 0, t).unwrap();
        assert!(f64::try_from((plain - logits(&net, &split, 2)).abs().max()).unwrap() < 1e-6);
    }
}
