//! Training a stage's network: initialization or resume, the epochs (each ending with its
//! `metrics.csv` row and the resume checkpoint), early stopping, the divergence error, and the
//! final checkpoint.

use super::device_name;
use super::output::{self, MetricsRow};
use super::progress::Progress;
use super::resume;
use super::tables::Tables;
use super::Run;
use crate::config::{ModelSpec, Training, MAX_PARAMETERS};
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

/// What a network is scored on while it trains: the validation examples (early stopping,
/// metrics), the test split after the last epoch, both labelled in `classes` classes.
pub(super) struct Targets<'a> {
    pub(super) validation: Option<(&'a Split, Option<Tensor>)>,
    pub(super) test: Option<&'a Split>,
    pub(super) classes: i64,
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

impl Run<'_> {
    /// The examples a stage with `training.train_fraction < 1` trains on: a sorted random subset
    /// of `n`, drawn from the experiment's seed and the fraction alone, so that every stage
    /// with the same fraction (hard targets, soft targets) sees the same examples.
    pub(super) fn fraction_examples(&self, n: i64, fraction: f64) -> Tensor {
        let k = ((fraction * n as f64).ceil() as i64).clamp(1, n);
        let _generator = kd_core::seed_global_generator(
            (self.exp.seed as i64).wrapping_mul(1_000_003) ^ (fraction.to_bits() as i64 & 0x7fff_ffff),
        );
        let (sorted, _) = Tensor::randperm(n, (Kind::Int64, self.device)).narrow(0, 0, k).sort(0, false);
        sorted
    }

    /// Trains a new network for a stage (or resumes it); returns it after the last epoch (with
    /// early stopping, the best epoch's weights) and how it fit the examples it trained on.
    pub(super) fn train(
        &self,
        (tables, tables_dir): (&mut Tables, &Path),
        fit: StageFit,
    ) -> Result<(nn::VarStore, Mlp, Fit)> {
        let StageFit { stage, init, training, split, sampling, supervision, targets } = fit;
        // The stage's initial weights, dropout masks and example order come from libtorch's global
        // generator: held for the whole stage, so that nothing else in the process draws between.
        let _generator = kd_core::seed_global_generator(training.seed as i64);
        let _training = preemption::Training::enter();
        let (vs, net) = self.network(stage, init)?;
        let mut opt = Optimizer::new(&training.optimizer, vs.trainable_variables());
        let best_path = self.dir.join("checkpoints").join(format!("{stage}.best.safetensors"));
        let resume_path = self.resume_checkpoint(stage);
        let (progress, generators) = self.resume(stage, &resume_path, &vs, &mut opt)?;
        let world = crate::dist::world();
        // Every rank starts from rank 0's weights and optimizer state, at the same epoch and step.
        world.agree(
            &format!("stage `{stage}`: the epochs and steps done (every rank must see the same --out)"),
            progress.epochs_done * (1 << 32) + progress.position.map_or(0, |p| p.step as i64),
        )?;
        broadcast_state(&vs, &mut opt)?;
        let first_epoch = progress.epochs_done;
        let progress_start = progress;
        let mut stopping = training.patience.map(|p| EarlyStopping::new(p, progress.best));
        tables.forget(stage, first_epoch);
        // Seconds of the epochs an earlier process ran (on this device or another).
        let earlier_seconds: f64 = tables.metrics.iter().filter(|r| r.stage == stage).map(|r| r.seconds).sum();
        let geometry: Geometry = self.data.geometry;
        check_jitter(stage, geometry, training.jitter)?;

        let mut examples =
            (training.train_fraction < 1.0).then(|| self.fraction_examples(split.len(), training.train_fraction));
        // The training split of a frame store is streamed, not held: `split` is only a sample.
        // (`split` is the training split itself or a view of it: the same storage.)
        let streamed = self.data.stream.as_ref();
        let whole =
            split.len() == self.data.train.len() && split.labels.data_ptr() == self.data.train.labels.data_ptr();
        if streamed.is_some() && (!whole || examples.is_some() || !matches!(sampling, Sampling::All)) {
            bail!(
                "stage `{stage}`: with data.kind = \"store\", stages train on the whole streamed training split \
                 (train_fraction, transfer-set class filters and specialists are not supported there yet)"
            );
        }
        // Every rank takes a share of each batch: a rank with none would train nothing.
        if (training.batch_size as usize) < world.size() {
            bail!(
                "stage `{stage}`: batch_size = {} is smaller than the {} ranks of this data-parallel run: each rank \
                 takes a share of every batch, and some would get no example",
                training.batch_size,
                world.size()
            );
        }
        let n = match (&sampling, streamed) {
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
            (Sampling::All, None) => examples.as_ref().map_or(split.len(), |e| e.size()[0]),
        };
        if examples.is_some() {
            info!(
                "stage `{stage}`: trains on {n} of {} examples (train_fraction {})",
                split.len(),
                training.train_fraction
            );
        }
        let steps_per_epoch = if n == 0 { 0 } else { (n - 1) / training.batch_size + 1 };
        let progress = Progress::new(stage, training.epochs as u64, steps_per_epoch as u64, first_epoch as u64);
        info!(
            "stage `{stage}`: {} ({} parameters), {} epoch{} of {} steps",
            net.config().describe(),
            net.num_params(),
            training.epochs,
            if training.epochs == 1 { "" } else { "s" },
            steps_per_epoch
        );
        let flops_per_example = 6.0 * net.forward_macs() as f64 + 2.0 * supervision.live_teacher_macs() as f64;
        let mut trainer = Trainer::new(&net, vs.trainable_variables(), opt);
        if trainer.update_in_backward(self.exp.optimizer_in_backward) {
            info!("stage `{stage}`: the optimizer updates each layer inside the backward pass");
        }
        if let Some(why) = trainer.use_cuda_graphs(self.exp.cuda_graphs) {
            tracing::warn!("stage `{stage}`: cuda_graphs = true, but {why}; the steps run eagerly");
        }
        let mut guard = train::LossGuard::default();
        let settings = LoopSettings {
            batch_size: training.batch_size,
            jitter: training.jitter,
            geometry,
            report_every: REPORT_EVERY,
        };
        for epoch in first_epoch..training.epochs {
            let started = Instant::now();
            // Reseeding each epoch makes a resumed run identical to an uninterrupted one.
            tch::manual_seed((training.seed as i64) * 100_003 + epoch);
            let lr = training.lr(epoch);
            trainer.opt.set_lr(lr);
            trainer.opt.set_momentum(training.momentum(epoch));
            if let Sampling::Draw { draw, .. } = &sampling {
                examples = Some(draw(epoch)?);
            }
            let steps_started = Instant::now();
            // A checkpoint inside this epoch to resume from: its step, and the generators as
            // they were there (set once the epoch's order is drawn).
            let position = if epoch == first_epoch { progress_start.position } else { None };
            let resumed_at = position.map_or(0, |p| p.step);
            let restore = |resumed: bool| -> Result<()> {
                match (&generators, resumed) {
                    (Some(g), true) => g.restore(self.device, &resume_path),
                    _ => Ok(()),
                }
            };
            let mut hook = StageHook {
                run: self,
                stage,
                epoch,
                steps_per_epoch,
                progress: &progress,
                event_error: None,
                save: SaveTo { net: &net, vs: &vs, path: &resume_path, keep: self.exp.checkpoint.keep },
                best: stopping.as_ref().and_then(EarlyStopping::best),
                every_steps: self.exp.checkpoint.every_steps,
                every_minutes: self.exp.checkpoint.every_minutes,
                last_save: Instant::now(),
            };
            let totals = match streamed {
                None => {
                    let mut source = train::InMemory::new((split, examples.as_ref()), &settings).skip(resumed_at);
                    restore(position.is_some()).and_then(|()| {
                        train::train_epoch_resumable(
                            &mut trainer,
                            &mut source,
                            supervision,
                            &settings,
                            &mut guard,
                            position.as_ref(),
                            &mut hook,
                        )
                    })
                }
                Some(s) => s
                    .stream(
                        world.share(training.batch_size).1,
                        training.seed,
                        (epoch as u64, resumed_at),
                        (world.rank(), world.size()),
                        self.device,
                    )
                    .and_then(|mut stream| {
                        restore(position.is_some())?;
                        train::train_epoch_resumable(
                            &mut trainer,
                            &mut stream,
                            supervision,
                            &settings,
                            &mut guard,
                            position.as_ref(),
                            &mut hook,
                        )
                    }),
            }
            .map_err(|e| {
                progress.finish();
                match e.downcast_ref::<train::Stopped>() {
                    Some(stopped) => preempted(stage, epoch, stopped.step),
                    None => diverged(e, stage, epoch, (lr, supervision), &resume_path),
                }
            })?;
            if let Some(e) = hook.event_error {
                return Err(e);
            }
            world.check_parameters(&trainer.parameters(), &format!("of stage `{stage}` after epoch {}", epoch + 1))?;
            let per_second = n as f64 / steps_started.elapsed().as_secs_f64();
            let frozen = net.frozen();
            let forward = |x: &Tensor| Ok(frozen.forward_t(x, false));
            let val = match &targets.validation {
                Some((v, idx)) => Some(train::evaluate_with(&forward, v, idx.as_ref(), targets.classes)?),
                None => None,
            };
            let mut last = epoch + 1 == training.epochs;
            if let (Some(stopping), Some(v)) = (stopping.as_mut(), &val) {
                let verdict = stopping.observe(epoch + 1, v.errors);
                if verdict.improved {
                    output::save_tensors(&best_path, &net.to_tensors(&vs))?;
                }
                if let Some(since) = verdict.stop_after.filter(|_| !last) {
                    info!("stage `{stage}`: no fewer validation errors for {since} epochs; stopping early");
                    last = true;
                }
            }
            let test_errors = match targets.test {
                Some(test) if last => Some(train::evaluate_with(&forward, test, None, targets.classes)?.errors),
                _ => None,
            };
            let row = MetricsRow {
                stage: stage.to_string(),
                epoch: epoch + 1,
                lr,
                train_loss: totals.loss,
                soft_kl: totals.soft_kl,
                train_accuracy: totals.accuracy,
                val_loss: val.as_ref().map(|v| v.loss),
                val_accuracy: val.as_ref().map(Evaluation::accuracy),
                test_errors,
                seconds: started.elapsed().as_secs_f64(),
                examples_per_second: Some(per_second),
                tflops: Some(per_second * flops_per_example / 1e12),
                device: device_name(self.device, tch::get_num_threads(), self.exp.precision),
            };
            progress.epoch_done(&row, self.peak_tflops);
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
            self.scalars((epoch + 1) * steps_per_epoch, &epoch_scalars, true)?;
            tables.metrics.push(row);
            // The epoch's row first, then the checkpoint that says the epoch is done: killed in
            // between, the resumed run drops the row and redoes the epoch; the other way round it
            // would lose the row.
            tables.write(tables_dir)?;
            if last {
                break;
            }
            let done = resume::Point { epochs_done: epoch + 1, best: stopping.and_then(|s| s.best()), position: None };
            SaveTo { net: &net, vs: &vs, path: &resume_path, keep: self.exp.checkpoint.keep }.save(
                &trainer.opt,
                done,
                None,
            )?;
            // A preemption signal during the epoch's last steps: the epoch's checkpoint is it.
            if preemption::agree(false)?.1 {
                progress.finish();
                return Err(preempted(stage, epoch + 1, 0));
            }
        }
        progress.finish();
        drop(trainer);
        self.keep_final(stage, &vs, &net, stopping.and_then(|s| s.best()), [&resume_path, &best_path])?;
        let frozen = net.frozen();
        let fit = train::evaluate_with(&|x| Ok(frozen.forward_t(x, false)), split, examples.as_ref(), targets.classes)?;
        Ok((vs, net, Fit { accuracy: fit.accuracy(), earlier_seconds }))
    }

    /// The network a stage starts from, in the run's compute precision.
    fn network(&self, stage: &str, init: Init) -> Result<(nn::VarStore, Mlp)> {
        let (vs, net) = match init {
            Init::New(spec) => {
                let mut sizes = vec![self.data.train.input_dim()];
                sizes.extend(&spec.hidden);
                sizes.push(self.data.num_classes);
                check_network_size(stage, &sizes, self.device)?;
                let config = MlpConfig {
                    sizes,
                    input_dropout: spec.input_dropout,
                    hidden_dropout: spec.hidden_dropout,
                    max_norm: spec.max_norm,
                };
                let vs = nn::VarStore::new(self.device);
                let net = Mlp::new(&vs.root(), config)?;
                (vs, net)
            }
            Init::From(vs, net) => (vs, net),
        };
        Ok((vs, net.with_compute_kind(self.exp.precision.kind())))
    }

    /// Loads the weights and optimizer state of an unfinished stage's resume checkpoint, if there
    /// is one, and says where the stage stopped.
    /// The newest readable one of the kept checkpoints (`<stage>.resume`, then `.resume-1`, ...)
    /// is used; a damaged newer one is named in a warning and passed over.
    fn resume(&self, stage: &str, path: &Path, vs: &nn::VarStore, opt: &mut Optimizer) -> Result<Resumed> {
        let fresh = resume::Point { epochs_done: 0, best: None, position: None };
        let candidates: Vec<std::path::PathBuf> = std::iter::once(path.to_path_buf())
            .chain((1..self.exp.checkpoint.keep.max(1)).map(|k| rotated(path, k)))
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
                    let (state, weights): (Vec<_>, Vec<_>) =
                        rest.into_iter().partition(|(k, _)| optim::is_state_key(k));
                    copy_weights(vs, &weights, self.device).context("reading the resume checkpoint")?;
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
        &self,
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
                copy_weights(vs, &output::load_tensors(best_path)?, self.device).context("reading the best epoch")?;
            }
            world.broadcast(&mut crate::dist::variables(vs))?;
        }
        output::save_tensors(&self.checkpoint(stage), &net.to_tensors(vs))?;
        let rotated = (1..self.exp.checkpoint.keep.max(1)).map(|k| rotated(resume_path, k));
        for path in [resume_path.to_path_buf(), best_path.to_path_buf()].into_iter().chain(rotated) {
            if path.exists() && world.is_writer() {
                std::fs::remove_file(path)?;
            }
        }
        // The other ranks may read the checkpoint once it is written.
        world.barrier()
    }
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
    run: &'a Run<'a>,
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
            self.event_error = self.run.scalars(global, &[(format!("{stage}/train_loss"), loss)], false).err();
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
        let generators = resume::Generators::now(self.run.device)?;
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
    (lr, supervision): (f64, &Supervision),
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
