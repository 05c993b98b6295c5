//! Training a stage's network: initialization or resume, the epochs (each ending with its
//! `metrics.csv` row and the resume checkpoint), early stopping, the divergence error, and the
//! final checkpoint.

use super::ctx::device_name;
use super::ctx::{Ctx, Targets};
use super::output::{self, MetricsRow};
use super::progress::Progress;
use super::resume;
use super::tables::Tables;
use crate::config::{ModelSpec, Training, MAX_PARAMETERS};
use crate::data::batch::BatchSource;
use crate::data::stream::StreamStart;
use crate::data::Split;
use crate::preemption;
use crate::train::optim::{self, Optimizer};
use crate::train::stopping::{Best, EarlyStopping};
use crate::train::{self, Evaluation, Supervision, Trainer};
use crate::train::{Geometry, LoopSettings};
use anyhow::{bail, Context, Result};
use kd_models::{Mlp, MlpConfig};
use std::path::Path;
use std::time::Instant;
use tch::{nn, nn::ModuleT, Device, Kind, Tensor};
use tracing::info;

/// How a trained network starts.
pub(super) enum Init<'a> {
    /// Freshly initialized from the stage's seed.
    New(&'a ModelSpec),
    /// These weights (a specialist made from its generalist).
    From(nn::VarStore, Mlp),
}

/// The examples of each epoch.
pub(super) enum Sampling<'a> {
    /// The whole split (or the stage's `train_fraction` of it).
    All,
    /// `n` example indices drawn afresh for each epoch.
    Draw { n: i64, draw: &'a dyn Fn(i64) -> Result<Tensor> },
}

/// What a stage trains and how: its name, the network's start, the loop settings, the examples
/// (and which of them each epoch), what the loss is, and what the network is scored on.
pub(super) struct StageFit<'a> {
    pub(super) stage: &'a str,
    pub(super) init: Init<'a>,
    pub(super) training: &'a Training,
    pub(super) split: &'a Split,
    pub(super) sampling: Sampling<'a>,
    pub(super) supervision: &'a Supervision<'a>,
    pub(super) targets: &'a Targets<'a>,
}

/// How a trained network fit its training examples.
pub(super) struct Fit {
    /// Accuracy on the examples it trained on, in evaluation mode.
    pub(super) accuracy: f64,
    /// Seconds of the epochs run before this process resumed the stage (0 when it did not).
    pub(super) earlier_seconds: f64,
}

/// The examples a stage with `training.train_fraction < 1` trains on: a sorted random subset
/// of `n`, drawn from the experiment's seed and the fraction alone, so that every stage
/// with the same fraction (hard targets, soft targets) sees the same examples.
pub(super) fn fraction_examples(ctx: &Ctx, n: i64, fraction: f64) -> Tensor {
    let k = ((fraction * n as f64).ceil() as i64).clamp(1, n);
    let _generator = kd_core::seed_global_generator(
        (ctx.exp.seed as i64).wrapping_mul(1_000_003) ^ (fraction.to_bits() as i64 & 0x7fff_ffff),
    );
    let (sorted, _) = Tensor::randperm(n, (Kind::Int64, ctx.device)).narrow(0, 0, k).sort(0, false);
    sorted
}

/// Trains a new network for a stage (or resumes it); returns it after the last epoch (with
/// early stopping, the best epoch's weights) and how it fit the examples it trained on. The
/// steps: start or resume, then for each epoch run it, score it and commit it, then finish.
pub(super) fn train(
    ctx: &Ctx,
    tables: &mut Tables,
    tables_dir: &Path,
    fit: StageFit,
) -> Result<(nn::VarStore, Mlp, Fit)> {
    let StageFit { stage, init, training, split, sampling, supervision, targets } = fit;
    // The stage's initial weights, dropout masks and example order come from libtorch's global
    // generator: held for the whole stage, so that nothing else in the process draws between.
    let _generator = kd_core::seed_global_generator(training.seed as i64);
    let _training = preemption::Training::enter();
    let Started { vs, net, opt, from, generators } = start_or_resume(ctx, stage, init, training)?;
    tables.forget(stage, from.epochs_done);
    // Seconds of the epochs an earlier process ran (on this device or another).
    let earlier_seconds: f64 = tables.metrics.iter().filter(|r| r.stage == stage).map(|r| r.seconds).sum();
    check_jitter(stage, ctx.data.geometry, training.jitter)?;
    let examples =
        (training.train_fraction < 1.0).then(|| fraction_examples(ctx, split.len(), training.train_fraction));
    let n = examples_per_epoch(ctx, stage, training, split, &sampling, examples.as_ref())?;
    let steps_per_epoch = steps_per_epoch(n, training.batch_size);
    info!(
        "stage `{stage}`: {} ({} parameters), {} epoch{} of {} steps",
        net.config().describe(),
        net.num_params(),
        training.epochs,
        if training.epochs == 1 { "" } else { "s" },
        steps_per_epoch
    );
    let mut trainer = Trainer::new(&net, vs.trainable_variables(), opt);
    if trainer.update_in_backward(ctx.exp.optimizer_in_backward) {
        info!("stage `{stage}`: the optimizer updates each layer inside the backward pass");
    }
    if let Some(why) = trainer.use_cuda_graphs(ctx.exp.cuda_graphs) {
        tracing::warn!("stage `{stage}`: cuda_graphs = true, but {why}; the steps run eagerly");
    }
    let mut epochs = Epochs {
        ctx,
        stage,
        training,
        split,
        sampling,
        supervision,
        targets,
        net: &net,
        vs: &vs,
        trainer,
        examples,
        n,
        steps_per_epoch,
        flops_per_example: 6.0 * net.forward_macs() as f64 + 2.0 * supervision.live_teacher_macs() as f64,
        progress: Progress::new(stage, training.epochs as u64, steps_per_epoch as u64, from.epochs_done as u64),
        stopping: training.patience.map(|p| EarlyStopping::new(p, from.best)),
        guard: train::LossGuard::default(),
        settings: LoopSettings {
            batch_size: training.batch_size,
            jitter: training.jitter,
            geometry: ctx.data.geometry,
            report_every: REPORT_EVERY,
        },
        from,
        generators,
        resume_path: ctx.resume_checkpoint(stage),
        best_path: best_checkpoint(ctx, stage),
    };
    for epoch in from.epochs_done..training.epochs {
        let started = Instant::now();
        let ran = epochs.run_epoch(epoch).inspect_err(|_| epochs.progress.finish())?;
        let scores = epochs.score_epoch(epoch)?;
        let last = scores.last;
        epochs.commit_epoch(epoch, started, ran, scores, tables, tables_dir)?;
        if last {
            break;
        }
    }
    let (best, examples) = epochs.finish();
    keep_final(ctx, stage, &vs, &net, best, [&ctx.resume_checkpoint(stage), &best_checkpoint(ctx, stage)])?;
    let frozen = net.frozen();
    let fit = train::evaluate_with(&|x| Ok(frozen.forward_t(x, false)), split, examples.as_ref(), targets.classes)?;
    Ok((vs, net, Fit { accuracy: fit.accuracy(), earlier_seconds }))
}

/// Start or resume: the network, its optimizer, and where an earlier process left the stage
/// (its newest readable resume checkpoint); in a data-parallel run every rank then holds
/// rank 0's weights and optimizer state and agrees on the epoch and step.
fn start_or_resume(ctx: &Ctx, stage: &str, init: Init, training: &Training) -> Result<Started> {
    let (vs, net) = network(ctx, stage, init)?;
    let mut opt = Optimizer::new(&training.optimizer, vs.trainable_variables());
    let (from, generators) = resume(ctx, stage, &ctx.resume_checkpoint(stage), &vs, &mut opt)?;
    crate::dist::world().agree(
        &format!("stage `{stage}`: the epochs and steps done (every rank must see the same --out)"),
        from.epochs_done * (1 << 32) + from.position.map_or(0, |p| p.step as i64),
    )?;
    broadcast_state(&vs, &mut opt)?;
    Ok(Started { vs, net, opt, from, generators })
}

/// The examples one epoch trains on (over all ranks): the split, its `train_fraction`, the
/// examples drawn each epoch, or the streamed training store; an error when some rank would
/// get none.
fn examples_per_epoch(
    ctx: &Ctx,
    stage: &str,
    training: &Training,
    split: &Split,
    sampling: &Sampling,
    examples: Option<&Tensor>,
) -> Result<i64> {
    let world = crate::dist::world();
    // The training split of a frame store is streamed, not held: `split` is only a sample.
    // (`split` is the training split itself or a view of it: the same storage.)
    let streamed = ctx.data.stream.as_ref();
    let whole = split.len() == ctx.data.train.len() && split.labels.data_ptr() == ctx.data.train.labels.data_ptr();
    if streamed.is_some() && (!whole || examples.is_some() || !matches!(sampling, Sampling::All)) {
        bail!(
            "stage `{stage}`: with data.kind = \"store\", stages train on the whole streamed training split \
             (train_fraction, transfer-set class filters and specialists are not supported there yet)"
        );
    }
    check_shares(stage, training.batch_size, world.size())?;
    let n = match (sampling, streamed) {
        // Each rank streams its shard in its share of each batch.
        (_, Some(s)) => {
            let local = world.share(training.batch_size).1;
            let n = s.plan(local, training.seed, 0, world.size())?.0 as i64 * world.size() as i64;
            if n == 0 {
                bail!(
                    "stage `{stage}`: the training store {} holds {} utterance(s) ({} frames) for {} rank(s): \
                     each rank streams whole utterances, so some rank would get no frame and nothing would \
                     train; write a larger store, or start fewer ranks",
                    s.store.dir.display(),
                    s.store.manifest.utterances,
                    s.store.manifest.frames,
                    world.size()
                );
            }
            n
        }
        (Sampling::Draw { n, .. }, None) => *n,
        (Sampling::All, None) => examples.map_or(split.len(), |e| e.size()[0]),
    };
    if examples.is_some() {
        info!(
            "stage `{stage}`: trains on {n} of {} examples (train_fraction {})",
            split.len(),
            training.train_fraction
        );
    }
    Ok(n)
}

fn best_checkpoint(ctx: &Ctx, stage: &str) -> std::path::PathBuf {
    ctx.dir.join("checkpoints").join(format!("{stage}.best.safetensors"))
}

/// The network a stage starts from, in the run's compute precision.
fn network(ctx: &Ctx, stage: &str, init: Init) -> Result<(nn::VarStore, Mlp)> {
    let (vs, net) = match init {
        Init::New(spec) => {
            let mut sizes = vec![ctx.data.train.input_dim()];
            sizes.extend(&spec.hidden);
            sizes.push(ctx.data.num_classes);
            check_network_size(stage, &sizes, ctx.device)?;
            let config = MlpConfig {
                sizes,
                input_dropout: spec.input_dropout,
                hidden_dropout: spec.hidden_dropout,
                max_norm: spec.max_norm,
            };
            let vs = nn::VarStore::new(ctx.device);
            let net = Mlp::new(&vs.root(), config)?;
            (vs, net)
        }
        Init::From(vs, net) => (vs, net),
    };
    Ok((vs, net.with_compute_kind(ctx.exp.precision.kind())))
}

/// Loads the weights and optimizer state of an unfinished stage's resume checkpoint, if there
/// is one, and says where the stage stopped.
/// The newest readable one of the kept checkpoints (`<stage>.resume`, then `.resume-1`, ...)
/// is used; a damaged newer one is named in a warning and passed over.
fn resume(ctx: &Ctx, stage: &str, path: &Path, vs: &nn::VarStore, opt: &mut Optimizer) -> Result<Resumed> {
    let fresh = resume::Point { epochs_done: 0, best: None, position: None };
    let candidates: Vec<std::path::PathBuf> = std::iter::once(path.to_path_buf())
        .chain((1..ctx.exp.checkpoint.keep.max(1)).map(|k| rotated(path, k)))
        .filter(|p| p.exists())
        .collect();
    let mut last_error = None;
    for candidate in &candidates {
        let read = || -> Result<(Resumed, Vec<(String, Tensor)>)> {
            let named = output::load_tensors(candidate)?;
            output::check_finite(candidate, &named)?;
            let generators = resume::Point::generators(candidate, &named).ok();
            let (progress, rest) = resume::Point::split(candidate, named)?;
            if progress.position.is_some() && generators.is_none() {
                bail!("{}: a checkpoint inside an epoch without the generators' states", candidate.display());
            }
            Ok(((progress, generators), rest))
        };
        match read() {
            Ok(((progress, generators), rest)) => {
                let (state, weights): (Vec<_>, Vec<_>) = rest.into_iter().partition(|(k, _)| optim::is_state_key(k));
                copy_weights(vs, &weights, ctx.device).context("reading the resume checkpoint")?;
                opt.load_state(&state)?;
                match progress.position {
                    Some(p) => info!(
                        "stage `{stage}`: resuming at step {} of epoch {} from {}",
                        p.step,
                        progress.epochs_done + 1,
                        candidate.display()
                    ),
                    None => info!(
                        "stage `{stage}`: resuming after epoch {} from {}",
                        progress.epochs_done,
                        candidate.display()
                    ),
                }
                return Ok((progress, generators));
            }
            Err(e) => {
                tracing::warn!("stage `{stage}`: {e:#}; trying the checkpoint before it");
                last_error = Some(e);
            }
        }
    }
    match last_error {
        Some(e) => Err(e.context(format!("stage `{stage}`: no kept resume checkpoint is readable"))),
        None => Ok((fresh, None)),
    }
}

/// Saves the stage's final checkpoint (the best validation epoch's weights when early
/// stopping kept one) and removes the files it trained with.
fn keep_final(
    ctx: &Ctx,
    stage: &str,
    vs: &nn::VarStore,
    net: &Mlp,
    best: Option<Best>,
    temporary: [&Path; 2],
) -> Result<()> {
    let [resume_path, best_path] = temporary;
    let world = crate::dist::world();
    if let Some(Best { errors, epoch }) = best {
        info!("stage `{stage}`: keeps epoch {epoch} ({errors} validation errors)");
        // Rank 0 wrote the best epoch's weights and reads them; the others receive them.
        if world.is_writer() {
            copy_weights(vs, &output::load_tensors(best_path)?, ctx.device).context("reading the best epoch")?;
        }
        world.broadcast(&mut crate::dist::variables(vs))?;
    }
    output::save_tensors(&ctx.checkpoint(stage), &net.to_tensors(vs))?;
    let rotated = (1..ctx.exp.checkpoint.keep.max(1)).map(|k| rotated(resume_path, k));
    for path in [resume_path.to_path_buf(), best_path.to_path_buf()].into_iter().chain(rotated) {
        if path.exists() && world.is_writer() {
            std::fs::remove_file(path)?;
        }
    }
    // The other ranks may read the checkpoint once it is written.
    world.barrier()
}

/// Jitter translates images; it must leave some of each image in the frame.
fn check_jitter(stage: &str, geometry: Geometry, jitter: u32) -> Result<()> {
    if geometry.is_none() && jitter > 0 {
        bail!("stage `{stage}`: jitter translates images; this data is not images");
    }
    if let Some((rows, cols)) = geometry.filter(|&(r, c)| i64::from(jitter) >= r.min(c)) {
        bail!("stage `{stage}`: jitter = {jitter} would move {rows} x {cols} images out of the frame");
    }
    Ok(())
}

/// A stage's network as it starts: fresh, or where an earlier process left it.
struct Started {
    vs: nn::VarStore,
    net: Mlp,
    opt: Optimizer,
    /// Where the stage resumes (nothing done for a fresh one).
    from: resume::Point,
    /// The generators' states of a checkpoint inside an epoch.
    generators: Option<resume::Generators>,
}

/// Steps of an epoch of `n` examples in batches of `batch`, the last one possibly smaller.
fn steps_per_epoch(n: i64, batch: i64) -> i64 {
    if n == 0 {
        0
    } else {
        (n - 1) / batch + 1
    }
}

/// Every rank takes a share of each batch: a rank with none would train nothing.
fn check_shares(stage: &str, batch_size: i64, ranks: usize) -> Result<()> {
    if (batch_size as usize) < ranks {
        bail!(
            "stage `{stage}`: batch_size = {batch_size} is smaller than the {ranks} ranks of this data-parallel run: \
             each rank takes a share of every batch, and some would get no example"
        );
    }
    Ok(())
}

/// What an epoch's training pass gave: its learning rate, its totals and its pace.
struct EpochRun {
    lr: f64,
    totals: train::EpochTotals,
    examples_per_second: f64,
}

/// An epoch's scores: on the validation split, on the test split after the last epoch, and
/// whether it is the last (the stage's last epoch, or early stopping says so).
struct EpochScores {
    validation: Option<Evaluation>,
    test_errors: Option<i64>,
    last: bool,
}

/// Whether the epoch after `epoch` (0-based) of `epochs` is the last: the stage's last, or early
/// stopping found no improvement for `stop_after` epochs.
fn is_last(epoch: i64, epochs: i64, stop_after: Option<i64>) -> bool {
    epoch + 1 == epochs || stop_after.is_some()
}

/// A stage's epochs as they run: what each step of the loop reads and updates.
struct Epochs<'a> {
    ctx: &'a Ctx<'a>,
    stage: &'a str,
    training: &'a Training,
    split: &'a Split,
    sampling: Sampling<'a>,
    supervision: &'a Supervision<'a>,
    targets: &'a Targets<'a>,
    net: &'a Mlp,
    vs: &'a nn::VarStore,
    trainer: Trainer<'a>,
    /// The examples of the epoch when not the whole split (a fraction, or drawn per epoch).
    examples: Option<Tensor>,
    /// Examples per epoch over all ranks, and the steps they make.
    n: i64,
    steps_per_epoch: i64,
    flops_per_example: f64,
    progress: Progress,
    stopping: Option<EarlyStopping>,
    guard: train::LossGuard,
    settings: LoopSettings,
    from: resume::Point,
    generators: Option<resume::Generators>,
    resume_path: std::path::PathBuf,
    best_path: std::path::PathBuf,
}

impl Epochs<'_> {
    /// Runs epoch `epoch` (0-based) from its start, or from the step a checkpoint inside it
    /// holds: reseeded from the stage seed and the epoch (so a resumed run repeats the
    /// uninterrupted one), at the schedule's learning rate and momentum, in-memory or streamed.
    fn run_epoch(&mut self, epoch: i64) -> Result<EpochRun> {
        let (ctx, stage, training) = (self.ctx, self.stage, self.training);
        tch::manual_seed((training.seed as i64) * 100_003 + epoch);
        let lr = training.lr(epoch);
        self.trainer.opt.set_lr(lr);
        self.trainer.opt.set_momentum(training.momentum(epoch));
        if let Sampling::Draw { draw, .. } = &self.sampling {
            self.examples = Some(draw(epoch)?);
        }
        let steps_started = Instant::now();
        // A checkpoint inside this epoch to resume from: its step, and the generators as they
        // were there (set once the epoch's order is drawn).
        let position = if epoch == self.from.epochs_done { self.from.position } else { None };
        let resumed_at = position.map_or(0, |p| p.step);
        let (generators, resume_path) = (&self.generators, &self.resume_path);
        let restore = || -> Result<()> {
            match (generators, position.is_some()) {
                (Some(g), true) => g.restore(ctx.device, resume_path),
                _ => Ok(()),
            }
        };
        let mut hook = StageHook {
            ctx,
            stage,
            epoch,
            steps_per_epoch: self.steps_per_epoch,
            progress: &self.progress,
            event_error: None,
            save: SaveTo { net: self.net, vs: self.vs, path: &self.resume_path, keep: ctx.exp.checkpoint.keep },
            best: self.stopping.as_ref().and_then(EarlyStopping::best),
            every_steps: ctx.exp.checkpoint.every_steps,
            every_minutes: ctx.exp.checkpoint.every_minutes,
            last_save: Instant::now(),
        };
        let world = crate::dist::world();
        let (trainer, supervision, settings, guard) =
            (&mut self.trainer, self.supervision, &self.settings, &mut self.guard);
        let mut train = |source: &mut dyn BatchSource| {
            restore()?;
            train::train_epoch_resumable(trainer, source, supervision, settings, guard, position.as_ref(), &mut hook)
        };
        let totals = match ctx.data.stream.as_ref() {
            None => train(
                &mut train::InMemory::new(
                    train::Examples { split: self.split, only: self.examples.as_ref() },
                    settings,
                )
                .skip(resumed_at),
            ),
            Some(s) => s
                .stream(
                    world.share(training.batch_size).1,
                    training.seed,
                    StreamStart { epoch: epoch as u64, rank: world.rank(), world: world.size(), batch: resumed_at },
                    ctx.device,
                )
                .and_then(|mut stream| train(&mut stream)),
        }
        .map_err(|e| match e.downcast_ref::<train::Stopped>() {
            Some(stopped) => preempted(stage, epoch, stopped.step),
            None => diverged(e, stage, epoch, lr, supervision, &self.resume_path),
        })?;
        if let Some(e) = hook.event_error {
            return Err(e);
        }
        world.check_parameters(&self.trainer.parameters(), &format!("of stage `{stage}` after epoch {}", epoch + 1))?;
        Ok(EpochRun { lr, totals, examples_per_second: self.n as f64 / steps_started.elapsed().as_secs_f64() })
    }

    /// Scores the epoch's network on the validation split (saving it as the best so far when
    /// early stopping sees it improve) and, after the last epoch, on the test split.
    fn score_epoch(&mut self, epoch: i64) -> Result<EpochScores> {
        let (stage, targets) = (self.stage, self.targets);
        let frozen = self.net.frozen();
        let forward = |x: &Tensor| Ok(frozen.forward_t(x, false));
        let validation = match &targets.validation {
            Some((v, idx)) => Some(train::evaluate_with(&forward, v, idx.as_ref(), targets.classes)?),
            None => None,
        };
        let mut stop_after = None;
        if let (Some(stopping), Some(v)) = (self.stopping.as_mut(), &validation) {
            let verdict = stopping.observe(epoch + 1, v.errors);
            if verdict.improved {
                output::save_tensors(&self.best_path, &self.net.to_tensors(self.vs))?;
            }
            if let Some(since) = verdict.stop_after.filter(|_| epoch + 1 < self.training.epochs) {
                info!("stage `{stage}`: no fewer validation errors for {since} epochs; stopping early");
                stop_after = Some(since);
            }
        }
        let last = is_last(epoch, self.training.epochs, stop_after);
        let test_errors = match targets.test {
            Some(test) if last => Some(train::evaluate_with(&forward, test, None, targets.classes)?.errors),
            _ => None,
        };
        Ok(EpochScores { validation, test_errors, last })
    }

    /// Commits the epoch: its `metrics.csv` row, log line and TensorBoard scalars, the tables
    /// written, then (unless it is the last) the resume checkpoint that says the epoch is done,
    /// and a stop when a preemption signal came during its last steps.
    fn commit_epoch(
        &mut self,
        epoch: i64,
        started: Instant,
        ran: EpochRun,
        scores: EpochScores,
        tables: &mut Tables,
        tables_dir: &Path,
    ) -> Result<()> {
        let (ctx, stage) = (self.ctx, self.stage);
        let EpochRun { lr, totals, examples_per_second } = ran;
        let val = scores.validation.as_ref();
        let row = MetricsRow {
            stage: stage.to_string(),
            epoch: epoch + 1,
            lr,
            train_loss: totals.loss,
            soft_kl: totals.soft_kl,
            train_accuracy: totals.accuracy,
            val_loss: val.map(|v| v.loss),
            val_accuracy: val.map(Evaluation::accuracy),
            test_errors: scores.test_errors,
            seconds: started.elapsed().as_secs_f64(),
            examples_per_second: Some(examples_per_second),
            tflops: Some(examples_per_second * self.flops_per_example / 1e12),
            device: device_name(ctx.device, tch::get_num_threads(), ctx.exp.precision),
        };
        self.progress.epoch_done(&row, ctx.peak_tflops);
        let epoch_scalars: Vec<(String, f64)> = [
            ("lr", Some(row.lr)),
            ("epoch_train_loss", Some(row.train_loss)),
            ("train_accuracy", Some(row.train_accuracy)),
            ("val_loss", row.val_loss),
            ("val_accuracy", row.val_accuracy),
            ("soft_kl", row.soft_kl),
            ("examples_per_second", row.examples_per_second),
        ]
        .into_iter()
        .filter_map(|(name, v)| v.map(|v| (format!("{stage}/{name}"), v)))
        .collect();
        ctx.scalars((epoch + 1) * self.steps_per_epoch, &epoch_scalars, true)?;
        tables.metrics.push(row);
        // The epoch's row first, then the checkpoint that says the epoch is done: killed in
        // between, the resumed run drops the row and redoes the epoch; the other way round it
        // would lose the row.
        tables.write(tables_dir)?;
        if scores.last {
            return Ok(());
        }
        let done = resume::Point {
            epochs_done: epoch + 1,
            best: self.stopping.as_ref().and_then(EarlyStopping::best),
            position: None,
        };
        SaveTo { net: self.net, vs: self.vs, path: &self.resume_path, keep: ctx.exp.checkpoint.keep }.save(
            &self.trainer.opt,
            done,
            None,
        )?;
        // A preemption signal during the epoch's last steps: the epoch's checkpoint is it.
        if preemption::agree(false)?.1 {
            self.progress.finish();
            return Err(preempted(stage, epoch + 1, 0));
        }
        Ok(())
    }

    /// Ends the epochs: the progress bar removed, the trainer's hold on the network released;
    /// returns the best epoch early stopping kept, if any, and the examples of the last epoch.
    fn finish(self) -> (Option<Best>, Option<Tensor>) {
        self.progress.finish();
        (self.stopping.and_then(|s| s.best()), self.examples)
    }
}

/// Overwrites the weights and optimizer state with rank 0's in a data-parallel run.
fn broadcast_state(vs: &nn::VarStore, opt: &mut Optimizer) -> Result<()> {
    let world = crate::dist::world();
    if !world.is_distributed() {
        return Ok(());
    }
    world.broadcast(&mut crate::dist::variables(vs))?;
    let state = opt.state();
    let mut values: Vec<Tensor> = state.iter().map(|(_, t)| t.shallow_clone()).collect();
    world.broadcast(&mut values)?;
    opt.load_state(&state)
}

/// Where a resumed stage stands, with the generators' states of a checkpoint inside an epoch.
type Resumed = (resume::Point, Option<resume::Generators>);

/// `<stage>.resume-<k>.safetensors`, the k-th newest kept resume checkpoint after `path`.
fn rotated(path: &Path, k: usize) -> std::path::PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let base = name.strip_suffix(".safetensors").unwrap_or(name);
    path.with_file_name(format!("{base}-{k}.safetensors"))
}

/// Where a stage's resume checkpoints go, and how many are kept.
struct SaveTo<'a> {
    net: &'a Mlp,
    vs: &'a nn::VarStore,
    path: &'a Path,
    keep: usize,
}

impl SaveTo<'_> {
    /// Saves a resume checkpoint (rank 0): the weights, the optimizer state, where the stage is
    /// and, inside an epoch, the generators' states; the one it replaces becomes `-1`, and so on,
    /// the last `keep` kept. Each file is written whole and renamed into place.
    fn save(&self, opt: &Optimizer, progress: resume::Point, generators: Option<&resume::Generators>) -> Result<()> {
        if crate::dist::world().is_writer() {
            for k in (1..self.keep).rev() {
                let from = if k == 1 { self.path.to_path_buf() } else { rotated(self.path, k - 1) };
                if from.exists() {
                    std::fs::rename(&from, rotated(self.path, k))
                        .with_context(|| format!("cannot rename {}", from.display()))?;
                }
            }
        }
        let mut state = self.net.to_tensors(self.vs);
        state.extend(opt.state());
        state.extend(progress.to_tensors(generators));
        output::save_tensors(self.path, &state)
    }
}

/// What a training stage does after each step: the progress bar, the TensorBoard loss, and
/// checkpoints inside the epoch (by step count, by time, or on a preemption signal, which
/// stops the stage after the checkpoint).
struct StageHook<'a> {
    ctx: &'a Ctx<'a>,
    stage: &'a str,
    epoch: i64,
    steps_per_epoch: i64,
    progress: &'a Progress,
    event_error: Option<anyhow::Error>,
    save: SaveTo<'a>,
    best: Option<Best>,
    every_steps: u64,
    every_minutes: f64,
    last_save: Instant,
}

impl train::StepHook for StageHook<'_> {
    fn after_step(&mut self, done: usize, loss: Option<f64>) -> Result<train::AfterStep> {
        let (stage, epoch) = (self.stage, self.epoch);
        self.progress.step(epoch as u64, done as u64, loss);
        let global = epoch * self.steps_per_epoch + done as i64;
        if let (Some(loss), None) = (loss, &self.event_error) {
            self.event_error = self.ctx.scalars(global, &[(format!("{stage}/train_loss"), loss)], false).err();
        }
        // The epoch's own checkpoint follows its last step.
        if done as i64 >= self.steps_per_epoch {
            return Ok(train::AfterStep::Continue);
        }
        // By time or on a signal: decided every 50 steps (where the ranks meet anyway), the
        // same on every rank.
        if loss.is_some() {
            let timed = self.every_minutes > 0.0 && self.last_save.elapsed().as_secs_f64() >= self.every_minutes * 60.0;
            let (timed, stop) = preemption::agree(timed)?;
            if stop {
                return Ok(train::AfterStep::CheckpointAndStop);
            }
            if timed {
                return Ok(train::AfterStep::Checkpoint);
            }
        }
        let counted = self.every_steps > 0 && (global as u64).is_multiple_of(self.every_steps);
        Ok(if counted { train::AfterStep::Checkpoint } else { train::AfterStep::Continue })
    }

    fn save(&mut self, trainer: &Trainer, at: &train::EpochPosition) -> Result<()> {
        let progress = resume::Point { epochs_done: self.epoch, best: self.best, position: Some(*at) };
        let generators = resume::Generators::now(self.ctx.device)?;
        let started = Instant::now();
        self.save.save(&trainer.opt, progress, Some(&generators))?;
        self.last_save = Instant::now();
        info!(
            "stage `{}`: checkpoint at step {} of epoch {} ({:.2} s)",
            self.stage,
            at.step,
            self.epoch + 1,
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }
}

/// The error of a stage stopped by a preemption signal after its checkpoint (exit status
/// [`preemption::EXIT_STATUS`]).
fn preempted(stage: &str, epoch: i64, step: usize) -> anyhow::Error {
    let at = if step == 0 { format!("after epoch {epoch}") } else { format!("at step {step} of epoch {}", epoch + 1) };
    anyhow::Error::new(preemption::Preempted(format!(
        "stage `{stage}`: stopped by {} {at}, with its checkpoint saved: run the same command again to resume",
        preemption::signal_name()
    )))
}

/// Copies the weights of a checkpoint made by `Mlp::to_tensors` into the same network's `vs`.
pub(super) fn copy_weights(vs: &nn::VarStore, named: &[(String, Tensor)], device: Device) -> Result<()> {
    let (saved_vs, _) = Mlp::from_tensors(named, device)?;
    let saved = saved_vs.variables();
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            let from = saved.get(&name).with_context(|| format!("the checkpoint lacks `{name}`"))?;
            if from.size() != var.size() {
                bail!("`{name}` has shape {:?} in the checkpoint, but the network's is {:?}", from.size(), var.size());
            }
            var.f_copy_(from)?;
        }
        Ok(())
    })
}

/// Checks, before allocating it, that a network of layer widths `sizes` has at most
/// [`MAX_PARAMETERS`] parameters and, on the CPU, that its weights, gradients and optimizer
/// state (16 bytes a parameter at most, with Adam) fit in the memory the machine has available.
pub(super) fn check_network_size(stage: &str, sizes: &[i64], device: Device) -> Result<()> {
    let params = sizes.windows(2).try_fold(0i64, |acc, w| w[0].checked_add(1)?.checked_mul(w[1])?.checked_add(acc));
    let describe = sizes.iter().map(i64::to_string).collect::<Vec<_>>().join("-");
    let Some(params) = params.filter(|&p| p <= MAX_PARAMETERS) else {
        bail!(
            "stage `{stage}`: a {describe} network has {} parameters, more than the {MAX_PARAMETERS} kd-run allocates",
            params.map_or_else(|| "over 2^63".to_string(), |p| p.to_string())
        );
    };
    let need = params as u64 * 16;
    if let (Device::Cpu, Some(available)) = (device, available_memory()) {
        if need > available {
            bail!(
                "stage `{stage}`: a {describe} network ({params} parameters) needs about {:.1} GB to train, \
                 but the machine has {:.1} GB available",
                need as f64 / 1e9,
                available as f64 / 1e9
            );
        }
    }
    Ok(())
}

/// `MemAvailable` of `/proc/meminfo` in bytes, where there is one.
pub(super) fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// Steps between the training loop's reads of the loss (progress bar, divergence check).
pub(super) const REPORT_EVERY: usize = 50;

/// The error of a stage whose training diverged in `epoch` (0-based) at learning rate `lr`:
/// where, the likely causes, and which checkpoint is kept. Other errors pass through.
pub(super) fn diverged(
    error: anyhow::Error,
    stage: &str,
    epoch: i64,
    lr: f64,
    supervision: &Supervision,
    resume: &Path,
) -> anyhow::Error {
    let Some(d) = error.downcast_ref::<train::Diverged>() else {
        return error.context(format!("stage `{stage}`, epoch {}", epoch + 1));
    };
    let mut causes = vec![format!("a learning rate too high (lr = {lr} in this epoch)")];
    if supervision.objective.uses_teacher() {
        if let Some(t) = supervision.objective.temperature() {
            causes.push(format!("the temperature (T = {t})"));
        }
        causes.push("a teacher whose outputs are not finite".into());
    }
    causes.push("input features too large to train on".into());
    let kept = if epoch > 0 && resume.exists() {
        format!("{} (after epoch {epoch}) is kept to resume from", resume.display())
    } else {
        "no epoch had finished, so there is no checkpoint to keep".into()
    };
    anyhow::anyhow!(
        "stage `{stage}` diverged in epoch {}: {d} (the loss is checked every {REPORT_EVERY} steps, so the weights \
         may have been unusable for up to that many steps and are not saved); likely causes: {}. \
         No results are recorded for the stage; {kept}",
        epoch + 1,
        causes.join(", or ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_has_a_step_per_batch_the_last_one_partial() {
        assert_eq!(steps_per_epoch(0, 128), 0);
        assert_eq!(steps_per_epoch(1, 128), 1);
        assert_eq!(steps_per_epoch(128, 128), 1);
        assert_eq!(steps_per_epoch(129, 128), 2);
        assert_eq!(steps_per_epoch(60_000, 100), 600);
    }

    #[test]
    fn every_rank_needs_a_share_of_each_batch() {
        assert!(check_shares("s", 4, 4).is_ok());
        assert!(check_shares("s", 4, 1).is_ok());
        let e = check_shares("s", 2, 3).unwrap_err().to_string();
        assert!(e.contains("stage `s`") && e.contains("batch_size = 2") && e.contains("3 ranks"), "{e}");
    }

    #[test]
    fn the_last_epoch_is_the_stages_last_or_where_early_stopping_ends_it() {
        assert!(!is_last(0, 3, None));
        assert!(!is_last(1, 3, None));
        assert!(is_last(2, 3, None));
        assert!(is_last(0, 3, Some(2)), "early stopping ends the stage after this epoch");
    }
}
