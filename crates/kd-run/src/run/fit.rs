//! Training a stage's network: initialization or resume, the epochs (each ending with its
//! `metrics.csv` row and the resume checkpoint), early stopping, the divergence error, and the
//! final checkpoint.

use super::device_name;
use super::output::{self, MetricsRow};
use super::resume;
use super::tables::Tables;
use super::Run;
use crate::config::{ModelSpec, Training, MAX_PARAMETERS};
use crate::data::Split;
use crate::train::optim::{self, Optimizer};
use crate::train::progress::Progress;
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
        let (vs, net) = self.network(stage, init)?;
        let mut opt = Optimizer::new(&training.optimizer, vs.trainable_variables());
        let best_path = self.dir.join("checkpoints").join(format!("{stage}.best.safetensors"));
        let resume_path = self.resume_checkpoint(stage);
        let progress = self.resume(stage, &resume_path, &vs, &mut opt)?;
        let world = crate::dist::world();
        // Every rank starts from rank 0's weights and optimizer state, at the same epoch.
        world.agree(
            &format!("stage `{stage}`: the epochs done (every rank must see the same --out)"),
            progress.epochs_done,
        )?;
        broadcast_state(&vs, &mut opt)?;
        let first_epoch = progress.epochs_done;
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
            let first_step = epoch * steps_per_epoch;
            let mut event_error = None;
            let mut on_step = |step: usize, loss: Option<f64>| {
                progress.step(epoch as u64, step as u64, loss);
                if let (Some(loss), None) = (loss, &event_error) {
                    event_error =
                        self.scalars(first_step + step as i64, &[(format!("{stage}/train_loss"), loss)], false).err();
                }
            };
            let totals = match streamed {
                None => train::train_epoch(
                    &mut trainer,
                    (split, examples.as_ref()),
                    supervision,
                    &settings,
                    &mut guard,
                    &mut on_step,
                ),
                Some(s) => s
                    .stream(
                        world.share(training.batch_size).1,
                        training.seed,
                        (epoch as u64, 0),
                        (world.rank(), world.size()),
                        self.device,
                    )
                    .and_then(|mut stream| {
                        train::train_epoch_from(
                            &mut trainer,
                            &mut stream,
                            supervision,
                            &settings,
                            &mut guard,
                            &mut on_step,
                        )
                    }),
            }
            .map_err(|e| {
                progress.finish();
                diverged(e, stage, epoch, (lr, supervision), &resume_path)
            })?;
            if let Some(e) = event_error {
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
            let done = resume::Progress { epochs_done: epoch + 1, best: stopping.and_then(|s| s.best()) };
            save_resume(&resume_path, &net, &vs, &trainer.opt, done)?;
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
    fn resume(&self, stage: &str, path: &Path, vs: &nn::VarStore, opt: &mut Optimizer) -> Result<resume::Progress> {
        if !path.exists() {
            return Ok(resume::Progress { epochs_done: 0, best: None });
        }
        let named = output::load_tensors(path)?;
        output::check_finite(path, &named)?;
        let (progress, rest) = resume::Progress::split(path, named)?;
        let (state, weights): (Vec<_>, Vec<_>) = rest.into_iter().partition(|(k, _)| optim::is_state_key(k));
        copy_weights(vs, &weights, self.device).context("reading the resume checkpoint")?;
        opt.load_state(&state)?;
        info!("stage `{stage}`: resuming after epoch {} from {}", progress.epochs_done, path.display());
        Ok(progress)
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
        for path in [resume_path, best_path] {
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

/// Saves a resume checkpoint: the weights, the optimizer state and where the stage is.
fn save_resume(path: &Path, net: &Mlp, vs: &nn::VarStore, opt: &Optimizer, progress: resume::Progress) -> Result<()> {
    let mut state = net.to_tensors(vs);
    state.extend(opt.state());
    state.extend(progress.to_tensors());
    output::save_tensors(path, &state)
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
