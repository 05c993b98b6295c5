//! The training step and epoch loop shared by `kd-run run` and `kd-run bench`.

use crate::data::batch::{Batch, BatchSource};
use crate::data::{self, Split};
use crate::train::optim::Optimizer;
use anyhow::Result;
use kd_core::{Objective, TeacherTargets};
use kd_models::{BatchRows, Mlp};
use tch::{nn::ModuleT, Kind, Tensor};

pub mod eval;
mod graph;
pub mod optim;
pub mod stopping;

pub use eval::{agreement, evaluate, evaluate_with, in_chunks, logits, Agreement, Evaluation, Outputs, EVAL_BATCH};

/// What the student is trained to match: an objective and, unless it is the labels alone, where
/// its teacher's targets come from.
pub struct Supervision<'a> {
    /// The loss (its temperature, if any, is the one the teacher's targets were made at).
    pub objective: Objective,
    /// The teacher's targets.
    pub teacher: TeacherSignal<'a>,
}

/// Where a teacher's outputs come from.
pub enum TeacherSignal<'a> {
    /// No teacher: the labels alone.
    None,
    /// Computed once over the whole transfer set, indexed like it, at the objective's
    /// temperature: probabilities at T for soft targets, logits for logit matching, or the
    /// teacher's `k` most probable classes per example with their probabilities at T
    /// renormalized over them (read as they are by [`kd_core::top_k_distillation_loss`], never
    /// as full rows).
    Cached(&'a TeacherTargets),
    /// Run on each (jittered) batch in evaluation mode.
    Live(&'a Teacher),
}

/// A teacher: one network, or an ensemble whose distribution at the objective's temperature T
/// is the mean of its members' `softmax(z_m / T)`.
pub struct Teacher {
    /// The networks (one for a single teacher).
    pub members: Vec<Mlp>,
    /// The objective the teacher serves; its members are averaged at
    /// [`Objective::ensemble_temperature`] (T = 1 to evaluate an ensemble on its own).
    pub objective: Objective,
}

impl Teacher {
    /// Logits whose softmax at the objective's temperature T is the teacher's distribution at
    /// T, in evaluation mode: a single network's own logits; for an ensemble
    /// `T * log(mean_m softmax(z_m / T))` ([`kd_core::ensemble_logits`]).
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let members: Vec<Tensor> = self.members.iter().map(|m| m.forward_t(x, false)).collect();
        Ok(self.objective.ensemble_logits(&members)?)
    }
}

/// Logits whose softmax at the objective's ensemble temperature T is the mean, over every
/// translation of each image of `split` by up to `max_shift` pixels in each direction
/// (`(2 max_shift + 1)^2` of them, zero-filled), of `net`'s softened distribution on the
/// translated image: `z = T log((1 / S) sum_s softmax(net(shift_s(x)) / T))`. In evaluation
/// mode, without gradients, over `split` in chunks of `batch`.
pub fn translation_averaged_logits(
    net: &Mlp,
    split: &Split,
    batch: i64,
    (rows, cols): (i64, i64),
    max_shift: i64,
    objective: &Objective,
) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let shifts: Vec<(i64, i64)> =
        (-max_shift..=max_shift).flat_map(|dy| (-max_shift..=max_shift).map(move |dx| (dy, dx))).collect();
    // Each rank its share of the examples, gathered in rank order.
    let world = crate::dist::world();
    let (first, n) = world.share(split.len());
    let chunks = in_chunks(n, batch, |start, len| {
        let x = split.range(first + start, len);
        let views: Vec<Tensor> =
            shifts.iter().map(|&(dy, dx)| net.forward_t(&data::translate(&x, rows, cols, dy, dx), false)).collect();
        Ok(objective.ensemble_logits(&views)?)
    })?;
    let mine = match chunks.as_slice() {
        [] => net.forward_t(&split.range(0, 0), false),
        _ => Tensor::cat(&chunks, 0),
    };
    world.gather_rows(&mine, split.len())
}

impl Supervision<'_> {
    /// The labels alone.
    pub fn labels() -> Self {
        Supervision { objective: Objective::hard_labels(), teacher: TeacherSignal::None }
    }

    /// Multiply-adds per example of the teacher networks run on every batch (0 unless live).
    pub fn live_teacher_macs(&self) -> i64 {
        match &self.teacher {
            TeacherSignal::Live(t) => t.members.iter().map(Mlp::forward_macs).sum(),
            _ => 0,
        }
    }

    /// The batch's rows (`idx`, inputs `x`) of the teacher's targets (`None` without a teacher).
    pub fn batch_targets(&self, idx: &Tensor, x: &Tensor) -> Result<Option<TeacherTargets>> {
        Ok(match &self.teacher {
            TeacherSignal::None => None,
            TeacherSignal::Cached(all) => Some(all.rows(idx)?),
            TeacherSignal::Live(t) => Some(TeacherTargets::logits(t.logits(x)?)?),
        })
    }

    /// The teacher's targets for a streamed batch (inputs `x`, no rows of an in-memory split):
    /// a live teacher's; targets cached over an in-memory transfer set cannot follow a stream.
    pub fn streamed_targets(&self, x: &Tensor) -> Result<Option<TeacherTargets>> {
        Ok(match &self.teacher {
            TeacherSignal::None => None,
            TeacherSignal::Cached(_) => anyhow::bail!(
                "teacher targets cached over an in-memory transfer set cannot follow batches streamed from a frame \
                 store; write the teacher's top-k targets beside the store (`kd-run store targets`)"
            ),
            TeacherSignal::Live(t) => Some(TeacherTargets::logits(t.logits(x)?)?),
        })
    }

    /// The objective for one batch: `logits` of the student, `labels`, and the batch's teacher
    /// targets (rows aligned with the batch). With it, for soft targets, the soft term's KL form
    /// (`T^2 KL(p || q)`, unweighted; `DistillLoss::soft_kl`), which shows the student
    /// converging where the objective is dominated by the teacher's entropy.
    pub fn loss(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        targets: Option<&TeacherTargets>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let l = self.objective.loss(logits, targets, Some(labels))?;
        Ok((l.total, self.objective.reports_soft_kl().then(|| l.soft_kl.detach())))
    }
}

/// The settings of the epoch loop that are not the objective: examples per step, random
/// translations of images, and how often the loop reads the loss.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoopSettings {
    /// Examples per step; the last batch of an epoch may be smaller.
    pub batch_size: i64,
    /// Random translations of up to this many pixels in each direction (0 = none).
    pub jitter: u32,
    /// Image geometry for the translations.
    pub geometry: Geometry,
    /// Steps between reads of the loss (progress, divergence check); 0 reads it at the end only.
    pub report_every: usize,
}

/// What a [`Trainer`] holds besides its network and parameters: the optimizer, whether it steps
/// inside the backward pass, and the captured CUDA graph, if any ([`Trainer::into_state`]).
pub struct TrainerState {
    /// The optimizer.
    pub opt: Optimizer,
    layers: Option<Vec<Vec<usize>>>,
    graphs: Option<graph::Graphs>,
}

/// A network with its optimizer.
pub struct Trainer<'a> {
    /// The network being trained.
    pub net: &'a Mlp,
    params: Vec<Tensor>,
    /// Its optimizer.
    pub opt: Optimizer,
    /// With the optimizer step in the backward pass: the positions in `params` of each layer's
    /// `[weight, bias]` ([`Mlp::layer_parameters`]).
    layers: Option<Vec<Vec<usize>>>,
    /// With CUDA graphs: the captured step ([`graph`]).
    graphs: Option<graph::Graphs>,
}

impl<'a> Trainer<'a> {
    /// Wraps `net`, whose trainable parameters are `params`, with `opt`.
    pub fn new(net: &'a Mlp, params: Vec<Tensor>, opt: Optimizer) -> Self {
        Trainer { net, params, opt, layers: None, graphs: None }
    }

    /// Ends the trainer, keeping its optimizer, how it steps and its captured CUDA graph for
    /// another trainer of the same network and parameters ([`Trainer::from_state`]).
    pub fn into_state(self) -> TrainerState {
        TrainerState { opt: self.opt, layers: self.layers, graphs: self.graphs }
    }

    /// A trainer of `net` and `params` that goes on from `state` (taken from a trainer of the
    /// same network and parameters), its captured graph included.
    pub fn from_state(net: &'a Mlp, params: Vec<Tensor>, state: TrainerState) -> Self {
        Trainer { net, params, opt: state.opt, layers: state.layers, graphs: state.graphs }
    }

    /// Makes the epoch loop capture the training step in a CUDA graph and replay it (see
    /// [`graph`]: full batches only, captured again when the learning rate or momentum
    /// changes). Returns why it cannot, if it cannot (the steps then run eagerly).
    pub fn use_cuda_graphs(&mut self, on: bool) -> Option<String> {
        self.graphs = None;
        if !on {
            return None;
        }
        let device = self.params.first().map_or(tch::Device::Cpu, Tensor::device);
        if let Some(why) = graph::unavailable(device) {
            return Some(why);
        }
        if let tch::Device::Cuda(index) = device {
            self.graphs = Some(graph::Graphs::new(index));
        }
        None
    }

    /// Makes each step update the network layer by layer during the backward pass, from the
    /// output layer down, each layer as soon as its gradients exist
    /// ([`kd_models::LayerwiseForward`]), instead of after the whole backward pass: one
    /// layer's gradients live at a time instead of the whole network's. The updates are the
    /// same: every gradient is the one backward pass's, and the optimizer's arithmetic is
    /// per parameter. Returns whether it is on: it needs the trainer's parameters to be exactly
    /// the network's layers' (otherwise the steps stay whole, with a warning).
    pub fn update_in_backward(&mut self, on: bool) -> bool {
        self.layers = None;
        if !on {
            return false;
        }
        let mut taken = vec![false; self.params.len()];
        let mut layers = vec![];
        for layer in self.net.layer_parameters() {
            let mut positions = vec![];
            for p in &layer {
                match self.params.iter().position(|q| q.is_set_to(p)) {
                    Some(i) if !taken[i] => {
                        taken[i] = true;
                        positions.push(i);
                    }
                    _ => break,
                }
            }
            layers.push(positions);
        }
        let complete =
            taken.iter().all(|&t| t) && layers.iter().zip(self.net.layer_parameters()).all(|(p, l)| p.len() == l.len());
        if complete {
            self.layers = Some(layers);
        } else {
            tracing::warn!(
                "the optimizer cannot step inside the backward pass: the trained parameters are not exactly the \
                 network's layers; stepping after the backward pass"
            );
        }
        complete
    }

    /// How many of the parameters and optimizer-state values are NaN or infinite. A non-finite
    /// gradient makes its update non-finite, so this catches the gradients of the steps no later
    /// loss has seen.
    ///
    /// One read of each tensor: its sum is finite when all its values are (a NaN or an infinity
    /// makes the sum NaN or infinite), so only a tensor whose sum is not finite (a non-finite
    /// value, or finite values whose sum overflows) is counted value by value. Counting every
    /// tensor (`isfinite`, `logical_not`, `sum`) took 30 ms for the 4 x 1024 acoustic network
    /// and its momentum, against 2 ms for the sums: a measurement of `kd-run bench` is one
    /// epoch of 10 steps of about 90 ms.
    pub fn non_finite(&self) -> Result<i64> {
        let _guard = tch::no_grad_guard();
        let state: Vec<Tensor> = self.opt.state().into_iter().map(|(_, t)| t).collect();
        let tensors: Vec<&Tensor> = self.params.iter().chain(&state).filter(|t| t.is_floating_point()).collect();
        if tensors.is_empty() {
            return Ok(0);
        }
        let sum_kind = |t: &Tensor| if t.kind() == Kind::Double { Kind::Double } else { Kind::Float };
        let sums: Vec<Tensor> = tensors.iter().map(|t| t.sum(sum_kind(t)).to_kind(Kind::Double)).collect();
        let sums = Vec::<f64>::try_from(Tensor::stack(&sums, 0).to_device(tch::Device::Cpu))?;
        let mut count = 0;
        for (t, sum) in tensors.iter().zip(sums) {
            if !sum.is_finite() {
                count += i64::try_from(t.isfinite().logical_not().sum(Kind::Int64))?;
            }
        }
        Ok(count)
    }

    /// The trainable parameters, in the optimizer's order.
    pub fn parameters(&self) -> Vec<Tensor> {
        self.params.iter().map(Tensor::shallow_clone).collect()
    }

    /// One optimization step: forward in training mode, `loss`, gradients, update, max-norm.
    /// Returns the logits and the loss, detached; nothing here waits for the device.
    pub fn step(&mut self, x: &Tensor, loss: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<(Tensor, Tensor)> {
        let batch = x.size()[0];
        self.step_share(x, BatchRows { start: 0, batch }, loss)
    }

    /// [`Trainer::step`] on this rank's rows `x` of a global batch, rows `rows.start ..` of
    /// `rows.batch`: the gradient of `b_r / b` times the loss of `x` is summed over the ranks
    /// ([`crate::dist::World::sum_gradients`]) before the update, which makes it the gradient
    /// of the mean loss over the global batch. A rank without rows adds zeros. In a
    /// data-parallel run the dropout masks are drawn for the whole batch from the stream every
    /// rank shares ([`Mlp::forward_rows`]), so a step on N ranks draws what one process would.
    pub fn step_share(
        &mut self,
        x: &Tensor,
        rows: BatchRows,
        loss: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let world = crate::dist::world();
        let share = x.size()[0] as f64 / rows.batch.max(1) as f64;
        if let Some(layers) = &self.layers {
            return step_in_backward(self.net, &mut self.opt, layers, x, rows, share, loss);
        }
        // A process alone keeps libtorch's own dropout (fused on CUDA).
        let logits = self.net.forward_rows(x, true, world.is_distributed().then_some(rows));
        let (loss, mut grads) = if x.size()[0] == 0 {
            let zeros = self.params.iter().map(Tensor::zeros_like).collect();
            (Tensor::zeros([], (Kind::Float, x.device())), zeros)
        } else {
            let loss = loss(&logits)?;
            let grads = if world.is_distributed() {
                Tensor::run_backward(&[&loss * share], &self.params, false, false)
            } else {
                Tensor::run_backward(&[&loss], &self.params, false, false)
            };
            (loss, grads)
        };
        world.sum_gradients(&mut grads)?;
        self.opt.step(grads);
        self.net.apply_max_norm();
        Ok((logits.detach(), loss.detach()))
    }
}

/// [`Trainer::step_share`] with the optimizer applied to each layer as the backward pass reaches
/// it (`layers`: each layer's positions among the optimizer's parameters; `share`: this rank's
/// share of the global batch). In a data-parallel run each layer's gradients are summed over the
/// ranks before its update, in the same order on every rank (a rank without rows sums zeros).
fn step_in_backward(
    net: &Mlp,
    opt: &mut Optimizer,
    layers: &[Vec<usize>],
    x: &Tensor,
    rows: BatchRows,
    share: f64,
    loss: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Tensor)> {
    let world = crate::dist::world();
    opt.begin_step();
    let mut update = |l: usize, mut grads: Vec<Tensor>| -> Result<()> {
        world.sum_gradients(&mut grads)?;
        opt.update_part(&layers[l], grads);
        Ok(())
    };
    let out = if x.size()[0] == 0 {
        for (l, params) in net.layer_parameters().iter().enumerate().rev() {
            update(l, params.iter().map(Tensor::zeros_like).collect())?;
        }
        (net.forward_rows(x, true, Some(rows)), Tensor::zeros([], (Kind::Float, x.device())))
    } else {
        let forward = net.forward_layerwise(x, true, world.is_distributed().then_some(rows));
        let logits = forward.logits().shallow_clone();
        let loss = loss(&logits)?;
        let root = if world.is_distributed() { &loss * share } else { loss.shallow_clone() };
        forward.backward(&root, &mut update)?;
        (logits, loss)
    };
    net.apply_max_norm();
    Ok((out.0.detach(), out.1.detach()))
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

/// Today's source: a random order of the examples of a split held on the device (all of them,
/// or `examples`), cut into batches; inputs gathered per batch, images jittered.
pub struct InMemory<'a> {
    split: &'a Split,
    examples: Option<&'a Tensor>,
    batches: Box<dyn Iterator<Item = Tensor> + 'a>,
    steps: usize,
    jitter: u32,
    geometry: Geometry,
}

impl<'a> InMemory<'a> {
    /// Draws the order now (from libtorch's generator, so seed it first).
    pub fn new(Examples { split, only: examples }: Examples<'a>, settings: &LoopSettings) -> Self {
        let n = examples.map_or(split.len(), |e| e.size()[0]);
        let steps = if n == 0 { 0 } else { ((n - 1) / settings.batch_size + 1) as usize };
        let batches = Box::new(data::batches(n, settings.batch_size, split.labels.device()));
        InMemory { split, examples, batches, steps, jitter: settings.jitter, geometry: settings.geometry }
    }
}

impl InMemory<'_> {
    /// Passes over the first `steps` batches without drawing anything: the rest of an epoch
    /// resumed from a checkpoint inside it.
    pub fn skip(mut self, steps: usize) -> Self {
        for _ in 0..steps {
            self.batches.next();
        }
        self.steps = self.steps.saturating_sub(steps);
        self
    }
}

impl BatchSource for InMemory<'_> {
    fn steps(&self) -> usize {
        self.steps
    }

    fn next_batch(&mut self) -> Result<Option<Batch>> {
        let Some(global) = self.batches.next() else { return Ok(None) };
        // Every rank draws the same order, and the jitter shifts of the whole batch from the
        // same stream, keeping its rows: N ranks train as one process would.
        let batch = global.size()[0];
        let (start, rows) = crate::dist::world().share(batch);
        let held = BatchRows { start, batch };
        let positions = global.narrow(0, start, rows);
        let idx = self.examples.map_or_else(|| positions.shallow_clone(), |e| e.index_select(0, &positions));
        let x = self.split.inputs(&idx);
        let x = match self.geometry {
            Some((rows, cols)) if self.jitter > 0 => data::jitter(&x, rows, cols, i64::from(self.jitter), held),
            _ => x,
        };
        let y = self.split.labels.index_select(0, &idx);
        Ok(Some(Batch { x, y, idx: Some(idx), targets: None, held }))
    }
}

/// The examples of a split an epoch trains on: all of them, or the rows `only` names.
#[derive(Clone, Copy)]
pub struct Examples<'a> {
    pub split: &'a Split,
    /// Row indices into `split` (`None`: every row).
    pub only: Option<&'a Tensor>,
}

impl<'a> Examples<'a> {
    /// Every example of `split`.
    pub fn all(split: &'a Split) -> Self {
        Examples { split, only: None }
    }
}

/// One pass over `examples` in a random order, in batches of
/// `settings.batch_size`: [`train_epoch_from`] with the [`InMemory`] source. In a data-parallel
/// run every rank draws the same order and trains on its share of each batch
/// ([`crate::dist::World::share`]).
pub fn train_epoch(
    trainer: &mut Trainer,
    examples: Examples,
    supervision: &Supervision,
    settings: &LoopSettings,
    guard: &mut LossGuard,
    on_step: impl FnMut(usize, Option<f64>),
) -> Result<EpochTotals> {
    let mut source = InMemory::new(examples, settings);
    train_epoch_from(trainer, &mut source, supervision, settings, guard, on_step)
}

/// One pass over the batches of `source`. `on_step(done, loss)` is called after each step;
/// `loss` is `Some` every `settings.report_every` steps only (reading it syncs the device): the
/// mean loss per example of the steps since the last report.
///
/// Fails with [`Diverged`] when a step's loss is not finite or the loss grew past `guard`'s
/// bound (checked with the losses read every `report_every` steps and at the end, so up to
/// `report_every` steps late), or when a weight or optimizer value is not finite after the last
/// step. The per-step losses stay on the device in between: no step waits for it.
pub fn train_epoch_from(
    trainer: &mut Trainer,
    source: &mut dyn BatchSource,
    supervision: &Supervision,
    settings: &LoopSettings,
    guard: &mut LossGuard,
    on_step: impl FnMut(usize, Option<f64>),
) -> Result<EpochTotals> {
    train_epoch_resumable(trainer, source, supervision, settings, guard, None, &mut OnStep(on_step))
}

/// What a checkpoint inside an epoch keeps of the epoch's accounting, so that the epoch resumed
/// from it reports what the uninterrupted epoch does: the steps done, the examples seen, the
/// losses read (summed over the ranks), the training-mode correct predictions and soft-KL sum
/// (summed over the ranks: rank 0 resumes with them, the others from zero), and the divergence
/// guard's reference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochPosition {
    /// Steps of the epoch done.
    pub step: usize,
    /// Examples of those steps (global batches).
    pub seen: i64,
    /// Examples of the epoch's first step.
    pub first_batch: i64,
    /// Sum of the losses times batch sizes of those steps.
    pub loss_sum: f64,
    /// Correct training-mode predictions.
    pub correct: i64,
    /// Sum of the soft term's KL form times batch sizes, for soft targets.
    pub kl_sum: Option<f64>,
    /// The divergence guard's reference loss, once set.
    pub reference: Option<f64>,
}

/// What a step hook asks for after a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterStep {
    /// Go on.
    Continue,
    /// Save a checkpoint ([`StepHook::save`]) and go on.
    Checkpoint,
    /// Save a checkpoint and stop the epoch with [`Stopped`].
    CheckpointAndStop,
}

/// Called by [`train_epoch_resumable`] after each step. In a data-parallel run every rank must
/// ask for the same thing at the same step.
pub trait StepHook {
    /// After `done` steps of the epoch (`loss`: as for [`train_epoch_from`]'s `on_step`).
    fn after_step(&mut self, done: usize, loss: Option<f64>) -> Result<AfterStep>;
    /// Saves a checkpoint inside the epoch: the trainer's weights and optimizer state, `at`, and
    /// whatever else resuming needs (the generators' states).
    fn save(&mut self, trainer: &Trainer, at: &EpochPosition) -> Result<()>;
}

/// A [`StepHook`] that only watches the steps.
struct OnStep<F>(F);

impl<F: FnMut(usize, Option<f64>)> StepHook for OnStep<F> {
    fn after_step(&mut self, done: usize, loss: Option<f64>) -> Result<AfterStep> {
        (self.0)(done, loss);
        Ok(AfterStep::Continue)
    }

    fn save(&mut self, _: &Trainer, _: &EpochPosition) -> Result<()> {
        Ok(())
    }
}

/// An epoch stopped at a step boundary after a checkpoint, as its [`StepHook`] asked (a
/// preemption signal): the error [`train_epoch_resumable`] returns then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// Steps of the epoch done and saved.
    pub step: usize,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stopped after step {} of the epoch, with a checkpoint", self.step)
    }
}

impl std::error::Error for Stopped {}

/// [`train_epoch_from`], from `start` (a checkpoint inside the epoch: `source` then delivers
/// the batches after its step), with `hook` after each step.
pub fn train_epoch_resumable(
    trainer: &mut Trainer,
    source: &mut dyn BatchSource,
    supervision: &Supervision,
    settings: &LoopSettings,
    guard: &mut LossGuard,
    start: Option<&EpochPosition>,
    hook: &mut dyn StepHook,
) -> Result<EpochTotals> {
    let report_every = settings.report_every;
    let device = trainer.params.first().map_or(tch::Device::Cpu, Tensor::device);
    let world = crate::dist::world();
    let first = start.map_or(0, |p| p.step);
    let steps = first + source.steps();
    // An epoch without a step would record an untrained network as trained.
    anyhow::ensure!(
        steps > 0,
        "no training batch reaches this process: the training (transfer) set, or this rank's share of \
         it in a data-parallel run, is empty; nothing would train, so nothing is recorded"
    );
    // Each step's loss times its batch size, kept on the device and read at the checks.
    let step_losses = Tensor::zeros([steps as i64], (Kind::Float, device));
    let mut correct = Tensor::zeros([], (Kind::Int64, device));
    let mut kl_sum = supervision.objective.reports_soft_kl().then(|| Tensor::zeros([], (Kind::Float, device)));
    let mut seen = 0i64;
    let mut check = Check { steps, first_batch: 0, checked: 0, examples: 0, total: 0.0 };
    if let Some(p) = start {
        seen = p.seen;
        check = Check { steps, first_batch: p.first_batch, checked: p.step, examples: p.seen, total: p.loss_sum };
        if let Some(r) = p.reference {
            guard.reference = Some(r);
        }
        // The sums over the ranks: rank 0 carries them on, the others start from zero.
        if world.is_writer() {
            correct = Tensor::from(p.correct).to_device(device);
            if let (Some(sum), Some(kl)) = (kl_sum.as_mut(), p.kl_sum) {
                *sum = Tensor::from(kl as f32).to_device(device);
            }
        }
    }
    let mut i = first;
    while let Some(mut batch) = source.next_batch()? {
        anyhow::ensure!(i < steps, "the batch source delivered more than the {steps} steps it announced");
        let teacher_out = match (batch.targets.take(), &batch.idx) {
            (Some(t), _) if supervision.objective.uses_teacher() => Some(t),
            (_, Some(idx)) => supervision.batch_targets(idx, &batch.x)?,
            (_, None) => supervision.streamed_targets(&batch.x)?,
        };
        let (x, y, held) = (&batch.x, &batch.y, batch.held);
        let mut kl = None;
        let (logits, loss) =
            match trainer.graphed_step(&batch, teacher_out.as_ref(), supervision, settings.batch_size)? {
                Some((logits, loss, soft_kl)) => {
                    kl = soft_kl;
                    (logits, loss)
                }
                None => trainer.step_share(x, held, |z| {
                    let (loss, soft_kl) = supervision.loss(z, y, teacher_out.as_ref())?;
                    kl = soft_kl;
                    Ok(loss)
                })?,
            };
        // This rank's rows; losses, counts and the checks are over the whole batch, summed
        // across the ranks.
        let rows = y.size()[0];
        if i == 0 {
            check.first_batch = held.batch;
        }
        seen += held.batch;
        step_losses.get(i as i64).copy_(&(loss * rows as f64));
        if let Some(kl) = kl {
            let kl = kl.to_kind(Kind::Float) * rows as f64;
            kl_sum = Some(kl_sum.map_or_else(|| kl.shallow_clone(), |sum| sum + &kl));
        }
        correct += logits.argmax(1, false).eq_tensor(y).sum(Kind::Int64);
        let report = if report_every > 0 && (i + 1).is_multiple_of(report_every) {
            Some(check.window(&step_losses, i + 1, seen, guard)?)
        } else {
            None
        };
        i += 1;
        let asked = hook.after_step(i, report)?;
        if asked != AfterStep::Continue {
            // Every loss so far read and summed over the ranks, the counts summed: the position
            // is the same on every rank.
            if check.checked < i {
                check.window(&step_losses, i, seen, guard)?;
            }
            let mut sums = vec![correct.shallow_clone().copy()];
            if let Some(kl) = &kl_sum {
                sums.push(kl.to_kind(Kind::Double).copy());
            }
            world.sum(&mut sums[..1])?;
            if sums.len() > 1 {
                world.sum(&mut sums[1..])?;
            }
            let at = EpochPosition {
                step: i,
                seen,
                first_batch: check.first_batch,
                loss_sum: check.total,
                correct: i64::try_from(&sums[0])?,
                kl_sum: sums.get(1).map(f64::try_from).transpose()?,
                reference: guard.reference,
            };
            hook.save(trainer, &at)?;
            if asked == AfterStep::CheckpointAndStop {
                return Err(Stopped { step: i }.into());
            }
        }
    }
    anyhow::ensure!(i == steps, "the batch source delivered {i} of the {steps} steps it announced");
    if check.checked < check.steps {
        check.window(&step_losses, check.steps, seen, guard)?;
    }
    world.sum(std::slice::from_mut(&mut correct))?;
    if let Some(sum) = kl_sum.as_mut() {
        world.sum(std::slice::from_mut(sum))?;
    }
    let bad = trainer.non_finite()?;
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
    /// whose examples bring the count to `seen`, and fails if they diverged; returns their mean
    /// loss per example.
    fn window(&mut self, step_losses: &Tensor, upto: usize, seen: i64, guard: &mut LossGuard) -> Result<f64> {
        let from = self.checked;
        let mut window = step_losses.narrow(0, from as i64, (upto - from) as i64);
        // Each rank's losses times its rows, summed: the losses times the global batches.
        crate::dist::world().sum(std::slice::from_mut(&mut window))?;
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
        Ok(mean)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_without_a_batch_is_an_error_not_an_untrained_model() {
        let _generator = kd_core::lock_global_generator();
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let net = Mlp::new(&vs.root(), kd_models::MlpConfig::plain([4, 3])).unwrap();
        let spec = crate::bench::optimizer_at(false, 0.1);
        let mut trainer =
            Trainer::new(&net, vs.trainable_variables(), crate::train::Optimizer::new(&spec, vs.trainable_variables()));
        let empty = Split::new(
            Tensor::zeros([0, 4], (Kind::Float, tch::Device::Cpu)),
            Tensor::zeros([0], (Kind::Int64, tch::Device::Cpu)),
        );
        let supervision = Supervision { objective: Objective::hard_labels(), teacher: TeacherSignal::None };
        let settings = LoopSettings { batch_size: 8, jitter: 0, geometry: None, report_every: 0 };
        let err = train_epoch(
            &mut trainer,
            Examples::all(&empty),
            &supervision,
            &settings,
            &mut LossGuard::default(),
            |_, _| {},
        )
        .err()
        .expect("an empty epoch fails");
        assert!(err.to_string().contains("no training batch reaches this process"), "{err}");
    }

    #[test]
    fn non_finite_counts_every_nan_and_infinity_and_no_overflowing_sum() {
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let net = Mlp::new(&vs.root(), kd_models::MlpConfig::plain([4, 6, 3])).unwrap();
        let spec = crate::bench::optimizer_at(false, 0.1);
        let trainer =
            Trainer::new(&net, vs.trainable_variables(), crate::train::Optimizer::new(&spec, vs.trainable_variables()));
        let _guard = tch::no_grad_guard();
        assert_eq!(trainer.non_finite().unwrap(), 0);
        let params = trainer.parameters();
        let shaped = |size: &[i64]| params.iter().find(|p| p.size() == size).unwrap().shallow_clone();
        let (hidden, output) = (shaped(&[6, 4]), shaped(&[3, 6]));
        // Finite values whose sum overflows f32 are not counted.
        let _ = hidden.get(0).fill_(3e38);
        let _ = hidden.get(1).fill_(3e38);
        assert_eq!(trainer.non_finite().unwrap(), 0);
        // A NaN beside an infinity (their sum is NaN), infinities of both signs (their sum is
        // NaN), and one in the optimizer's state.
        let _ = hidden.get(2).get(0).fill_(f64::NAN);
        let _ = hidden.get(2).get(1).fill_(f64::INFINITY);
        let _ = output.get(0).get(0).fill_(f64::INFINITY);
        let _ = output.get(1).get(0).fill_(f64::NEG_INFINITY);
        let (_, momentum) = trainer.opt.state().into_iter().find(|(_, t)| t.size() == [3]).unwrap();
        let _ = momentum.get(1).fill_(f64::NAN);
        assert_eq!(trainer.non_finite().unwrap(), 5);
    }

    #[test]
    fn translation_averaged_logits_soften_to_the_mean_over_every_shift() {
        let _generator = kd_core::lock_global_generator();
        // A small net on 3x4 images; the reference shifts each image by hand (zero fill),
        // runs the net on it and averages the softened distributions in f64.
        let (rows, cols, t) = (3i64, 4i64, 2.5);
        tch::manual_seed(3);
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let config = kd_models::MlpConfig { sizes: vec![12, 7, 5], ..Default::default() };
        let net = Mlp::new(&vs.root(), config).unwrap();
        let images = Tensor::rand([3, rows * cols], (Kind::Float, tch::Device::Cpu));
        let split = Split::new(images.shallow_clone(), Tensor::zeros([3], (Kind::Int64, tch::Device::Cpu)));
        let objective = Objective::soft_targets(t, kd_core::LossWeights::default()).unwrap();
        let got = translation_averaged_logits(&net, &split, 2, (rows, cols), 1, &objective).unwrap();
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
        let plain = translation_averaged_logits(&net, &split, 2, (rows, cols), 0, &objective).unwrap();
        assert!(f64::try_from((plain - logits(&net, &split, 2).unwrap()).abs().max()).unwrap() < 1e-6);
    }
}
