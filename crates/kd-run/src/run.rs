//! `kd-run run`: executes an experiment's stages, writes the run directory, resumes killed runs.
//!
//! Layout of `OUT/<name>/`: `config.toml` (the resolved experiment), `command.txt` (the
//! command line), `metrics.csv` (a row per stage and epoch), `summary.csv` (a row per model),
//! `class_errors.csv` (per model, split and class), `bias_shifts.csv` (validation errors of
//! each candidate shift), `done.csv` (the stages whose results are committed: written after
//! their rows, see [`Tables::commit`]), `checkpoints/<stage>.safetensors`, and `run.log`. While a stage
//! trains, `checkpoints/<stage>.resume.safetensors` holds the weights and optimizer state after
//! its last finished epoch; each epoch reseeds libtorch from the stage seed and the epoch, so a
//! resumed run continues exactly as the uninterrupted one would have. Teachers' logits over a
//! transfer set are cached in `OUT/.cache/`, keyed by the checkpoint's bytes and the set.

use crate::config::{
    BiasShiftJob, DataSource, DistillJob, DistillSpec, EnsembleJob, EvaluateJob, Experiment, Job, ModelSource,
    ModelSpec, Precision, Stage, TrainJob, Training, MAX_PARAMETERS,
};
use crate::data::{self, Dataset, Split};
use crate::device;
use crate::run::output::{ClassErrorsRow, MetricsRow, ShiftRow, SummaryRow};
use crate::train::optim::{self, Optimizer};
use crate::train::progress::Progress;
use crate::train::stopping::{Best, EarlyStopping};
use crate::train::{self, Evaluation, Geometry, Outputs, Supervision, Teacher, TeacherSignal, Trainer, EVAL_BATCH};
use anyhow::{bail, Context, Result};
use kd_models::{Mlp, MlpConfig};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{nn, nn::ModuleT, Device, Kind, Tensor};
use tracing::info;

mod dir;
mod lock;
pub mod output;
mod plan;
pub mod provenance;
mod resume;
mod specialists;
mod tables;

pub use dir::Options;
use dir::{stage_facts, RunDir};
use plan::{Action, Discard, Plan, Request};
use tables::Tables;

/// Picks the device named by an experiment's `device` setting.
pub fn select_device(name: &str) -> Result<Device> {
    let cuda = tch::Cuda::is_available();
    Ok(match name {
        "auto" => Device::cuda_if_available(),
        "cpu" => Device::Cpu,
        _ => {
            let index = name.strip_prefix("cuda:").map_or(Ok(0), str::parse::<usize>)?;
            if !cuda || index >= tch::Cuda::device_count() as usize {
                bail!(
                    "device = \"{name}\" but libtorch sees {} CUDA device(s); use device = \"auto\" or \"cpu\"",
                    if cuda { tch::Cuda::device_count() } else { 0 }
                );
            }
            Device::Cuda(index)
        }
    })
}

/// What a run reads: where it writes, its device, its data.
struct Run<'a> {
    exp: &'a Experiment,
    dir: PathBuf,
    cache: PathBuf,
    device: Device,
    data: Dataset,
    /// The TFLOP/s each epoch's log line gives the share of: `peak_tflops`, else the GPU's
    /// known peak at the run's precision.
    peak_tflops: Option<f64>,
}

/// How a trained network starts.
enum Init<'a> {
    /// Freshly initialized from the stage's seed.
    New(&'a ModelSpec),
    /// These weights (a specialist made from its generalist).
    From(nn::VarStore, Mlp),
}

/// The examples of each epoch.
enum Sampling<'a> {
    /// The whole split (or the stage's `train_fraction` of it).
    All,
    /// `n` example indices drawn afresh for each epoch.
    Draw { n: i64, draw: &'a dyn Fn(i64) -> Result<Tensor> },
}

/// What a network is scored on while it trains: the validation examples (early stopping,
/// metrics), the test split after the last epoch, both labelled in `classes` classes.
struct Targets<'a> {
    validation: Option<(&'a Split, Option<Tensor>)>,
    test: Option<&'a Split>,
    classes: i64,
}

/// Runs `exp` under `out/<name>`, resuming what an earlier run of it left unfinished (see
/// [`plan::plan`] for what is skipped, resumed and run again); `command` is recorded in
/// `command.txt`.
pub fn run(exp: &Experiment, out: &Path, options: Options, command: &str) -> Result<PathBuf> {
    let mut dir = RunDir::open(exp, out, options, command)?;
    let (device, data) = device_and_data(exp)?;
    let peak_tflops = exp.peak_tflops.or_else(|| known_peak(device, exp.precision));
    let run = Run { exp, dir: dir.path.clone(), cache: dir.cache.clone(), device, data, peak_tflops };
    let request = Request { only: options.only, redo: options.redo };
    let plan =
        plan::plan(&stage_facts(exp), &dir.tables.recorded(), &dir.changed, request, &|s| run.checkpoint(s).exists());
    run.discard(&mut dir.tables, &plan)?;
    for (stage, (_, action)) in exp.stages.iter().zip(&plan.actions) {
        match action {
            Action::SkipDone => info!("stage `{}`: already done, skipped", stage.name),
            Action::NotSelected => {}
            Action::Run { specialists } => run.stage(&mut dir.tables, stage, specialists)?,
        }
    }
    Ok(dir.path.clone())
}

/// Sets the CPU threads, picks the device and loads the experiment's data onto it.
fn device_and_data(exp: &Experiment) -> Result<(Device, Dataset)> {
    if exp.threads > 0 {
        tch::set_num_threads(exp.threads as i32);
    }
    let device = select_device(&exp.device)?;
    info!(
        "experiment `{}`: device {device:?} (CUDA available: {}, {} device(s)), {} CPU threads",
        exp.name,
        tch::Cuda::is_available(),
        tch::Cuda::device_count(),
        tch::get_num_threads()
    );
    let data = data::load(&exp.data, device)?;
    info!(
        "data {}: {} training, {} validation, {} test examples, {} classes",
        match &exp.data.source {
            DataSource::Speech(s) =>
                format!("synthetic speech (seed {}, {} speakers)", s.corpus.seed, s.corpus.speakers),
            DataSource::Files(f) => format!("files (training features {})", f.train.features.display()),
            DataSource::Mnist { dir } => dir.display().to_string(),
        },
        data.train.len(),
        data.validation.as_ref().map_or(0, |v| v.len()),
        data.test.len(),
        data.num_classes
    );
    Ok((device, data))
}

impl Run<'_> {
    /// Discards what the plan says (results, epochs, checkpoints) and writes the tables if that
    /// changed them.
    fn discard(&self, tables: &mut Tables, plan: &Plan) -> Result<()> {
        for (stage, why) in &plan.discard {
            match why {
                Discard::Partial => {
                    info!("stage `{stage}`: its results were not all written (the run was stopped), so it runs again");
                    tables.forget_results(stage);
                }
                Discard::Stale => {
                    info!("stage `{stage}` is no longer in the experiment: its results are dropped");
                    tables.forget(stage, 0);
                }
                Discard::Changed | Discard::Redo => {
                    // A stage added to the file has nothing to discard (no results, no epochs):
                    // it is announced when it runs.
                    let started = tables.has_results(stage) || tables.metrics.iter().any(|r| r.stage == *stage);
                    if *why == Discard::Redo {
                        info!("stage `{stage}`: --redo, so it runs again");
                    } else if started {
                        info!("stage `{stage}`: its settings differ from the earlier run's, so it runs again");
                    }
                    tables.forget(stage, 0);
                    for path in [self.checkpoint(stage), self.resume_checkpoint(stage)] {
                        if path.exists() {
                            std::fs::remove_file(&path)?;
                        }
                    }
                    self.remove_specialists(stage)?;
                }
            }
        }
        if plan.discards() {
            tables.write(&self.dir)?;
        }
        Ok(())
    }

    /// Runs one stage and commits its results (`specialists`: only these specialists of a
    /// specialists stage, which then commit on their own).
    fn stage(&self, tables: &mut Tables, stage: &Stage, specialists: &[usize]) -> Result<()> {
        tables.forget_results(&stage.name);
        let started = Instant::now();
        let name = stage.name.as_str();
        match &stage.job {
            Job::Train(TrainJob { model, training }) => {
                let (_vs, net, fit) = self.train(
                    (tables, &self.dir),
                    name,
                    Init::New(model),
                    training,
                    (&self.data.train, Sampling::All),
                    &Supervision::Hard,
                    &self.targets(),
                )?;
                self.record_trained(tables, name, "train", &net, (fit, None), started)?;
            }
            Job::Distill(DistillJob { model, training, distill }) => {
                let teacher = self.load_teacher(&distill.teacher, distill.temperature)?;
                let transfer = self.transfer_set(name, distill)?;
                // Without jitter the transfer set is fixed: the teacher's outputs are computed
                // (or read from the cache) once, and serve the agreement below too.
                let mut transfer_logits = None;
                let signal = if let Some(k) = distill.top_k {
                    self.check_top_k(name, k)?;
                    let (probs, classes) = self.teacher_top_k(&distill.teacher, &teacher, &transfer, distill, k)?;
                    TeacherSignal::TopK { probs, classes }
                } else if training.jitter == 0 {
                    let logits = self.teacher_logits(&distill.teacher, &teacher, &transfer, distill)?;
                    let signal = TeacherSignal::Cached(train::teacher_signal(&logits, distill)?);
                    transfer_logits = Some(logits);
                    signal
                } else {
                    TeacherSignal::Live(&teacher)
                };
                let supervision = Supervision::Distill { spec: distill, teacher: signal };
                let (_vs, net, fit) = self.train(
                    (tables, &self.dir),
                    name,
                    Init::New(model),
                    training,
                    (&transfer, Sampling::All),
                    &supervision,
                    &self.targets(),
                )?;
                let net = net.frozen();
                let (student, teacher) = (|x: &Tensor| Ok(net.forward_t(x, false)), |x: &Tensor| teacher.logits(x));
                let on_transfer = match &transfer_logits {
                    Some(logits) => Outputs::Cached(logits),
                    None => Outputs::Model(&teacher),
                };
                let fidelity = Fidelity {
                    test: train::agreement(&student, Outputs::Model(&teacher), &self.data.test)?,
                    transfer: train::agreement(&student, on_transfer, &transfer)?,
                };
                info!(
                "stage `{name}`: agrees with its teacher on {:.2}% of the test set and {:.2}% of its transfer set; {} of its test errors are the teacher's too (the teacher makes {})",
                100.0 * fidelity.test.rate(),
                100.0 * fidelity.transfer.rate(),
                fidelity.test.shared_errors,
                fidelity.test.teacher_errors
            );
                self.record_trained(tables, name, "distill", &net, (fit, Some(fidelity)), started)?;
            }
            Job::Evaluate(EvaluateJob { source }) => {
                let (_vs, net) = self.load_model(source)?;
                self.record(tables, name, "evaluate", &net.frozen(), started, None)?;
            }
            Job::BiasShift(BiasShiftJob { source, classes, min, max, step, fixed }) => {
                self.bias_shift(tables, name, source, classes, (*min, *max, *step), *fixed, started)?;
            }
            Job::Ensemble(EnsembleJob { members }) => {
                let ensemble = self.load_teacher(&ModelSource::ensemble(name, members), 1.0)?;
                let first = ensemble.members[0].config().describe();
                let same = ensemble.members.iter().all(|m| m.config().describe() == first);
                let model = format!(
                    "ensemble of {} x mlp {}",
                    ensemble.members.len(),
                    if same { first } else { "(mixed)".into() }
                );
                let parameters = ensemble.members.iter().map(Mlp::num_params).sum();
                let logits = |x: &Tensor| ensemble.logits(x);
                self.record_with(tables, name, "ensemble", (model, parameters), &logits, started, None)?;
            }
            Job::Clusters(job) => self.clusters(tables, name, job)?,
            Job::Specialists(job) => {
                let only_these = (!specialists.is_empty()).then_some(specialists);
                self.specialists(tables, name, job, only_these, started)?;
                if only_these.is_some() {
                    // Specialists trained alone: each has its own files; the stage commits when
                    // it combines them.
                    return Ok(());
                }
            }
        }
        tables.commit(name, &self.dir)
    }
}

/// Copies the weights of a checkpoint made by `Mlp::to_tensors` into the same network's `vs`.
fn copy_weights(vs: &nn::VarStore, named: &[(String, Tensor)], device: Device) -> Result<()> {
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

/// How a trained network fit its training examples.
struct Fit {
    /// Accuracy on the examples it trained on, in evaluation mode.
    accuracy: f64,
    /// Seconds of the epochs run before this process resumed the stage (0 when it did not).
    earlier_seconds: f64,
}

/// How closely a distilled student follows its teacher: on the test set, and on the transfer set
/// it learned from.
struct Fidelity {
    test: train::Agreement,
    transfer: train::Agreement,
}

/// The dense peak TFLOP/s of CUDA device `device` at `precision`, when the driver names a GPU
/// of [`device::peak_tflops`]'s table (logged either way).
fn known_peak(device: Device, precision: Precision) -> Option<f64> {
    let Device::Cuda(i) = device else { return None };
    let name = device::cuda_device_name(i)?;
    let peak = device::peak_tflops(&name);
    let at = peak.map(|p| match precision {
        Precision::Bf16 => p.bf16,
        Precision::F32 => p.fp32,
    });
    match at {
        Some(t) => info!("{name}: dense peak {t} TFLOP/s at {precision:?}"),
        None => info!("{name}: peak throughput unknown (set `peak_tflops` to log the share reached)"),
    }
    at
}

/// How `summary.csv` and `metrics.csv` name where a model ran: the device, the CPU threads, and
/// bf16 when the matrix products were (a resumed run may change either).
fn device_name(device: Device, threads: i32, precision: Precision) -> String {
    let bf16 = if precision == Precision::Bf16 { ", bf16" } else { "" };
    match device {
        Device::Cuda(i) if bf16.is_empty() => format!("cuda:{i}"),
        Device::Cuda(i) => format!("cuda:{i} (bf16)"),
        _ if threads == 1 => format!("cpu (1 thread{bf16})"),
        _ => format!("cpu ({threads} threads{bf16})"),
    }
}

impl Run<'_> {
    /// The run's own splits and classes.
    fn targets(&self) -> Targets<'_> {
        Targets {
            validation: self.data.validation.as_ref().map(|v| (v, None)),
            test: Some(&self.data.test),
            classes: self.data.num_classes,
        }
    }

    fn checkpoint(&self, stage: &str) -> PathBuf {
        self.dir.join("checkpoints").join(format!("{stage}.safetensors"))
    }

    fn resume_checkpoint(&self, stage: &str) -> PathBuf {
        self.dir.join("checkpoints").join(format!("{stage}.resume.safetensors"))
    }

    /// The checkpoint file of a single model (an ensemble has one per member). An evaluate stage
    /// stands for the model it evaluates.
    fn source_path(&self, source: &ModelSource) -> Result<PathBuf> {
        match source {
            ModelSource::Stage(name) => match self.exp.stages.iter().find(|s| &s.name == name).map(|s| &s.job) {
                Some(Job::Evaluate(EvaluateJob { source })) => self.source_path(source),
                _ => Ok(self.checkpoint(name)),
            },
            ModelSource::Checkpoint(path) => Ok(path.clone()),
            ModelSource::Ensemble { stage, .. } => bail!("`{stage}` is an ensemble, not one checkpoint"),
        }
    }

    /// A teacher: one network, or an ensemble's members, averaged at `temperature`; each frozen
    /// in the compute precision once ([`Mlp::frozen`]), so its forward passes cast no weights.
    fn load_teacher(&self, source: &ModelSource, temperature: f64) -> Result<Teacher> {
        let sources = match source {
            ModelSource::Ensemble { members, .. } => members.as_slice(),
            single => std::slice::from_ref(single),
        };
        let members = sources.iter().map(|s| Ok(self.load_model(s)?.1.frozen())).collect::<Result<Vec<_>>>()?;
        Ok(Teacher { members, temperature })
    }

    fn load_model(&self, source: &ModelSource) -> Result<(nn::VarStore, Mlp)> {
        let path = self.source_path(source)?;
        if let ModelSource::Stage(stage) = source {
            if !path.exists() && path == self.checkpoint(stage) {
                bail!("stage `{stage}` has not run yet: run it first (or add `--only {stage}`)");
            }
        }
        let named = output::load_tensors(&path)?;
        output::check_finite(&path, &named)?;
        let (vs, net) =
            Mlp::from_tensors(&named, self.device).with_context(|| format!("loading {}", path.display()))?;
        let want = self.data.train.input_dim();
        if net.config().input_dim() != want || net.config().num_classes() != self.data.num_classes {
            bail!(
                "{} is a {} network; the data has {want} inputs and {} classes",
                path.display(),
                net.config().describe(),
                self.data.num_classes
            );
        }
        Ok((vs, net.with_compute_kind(self.exp.precision.kind())))
    }

    fn check_classes(&self, stage: &str, classes: &[i64]) -> Result<()> {
        match classes.iter().find(|&&c| c >= self.data.num_classes) {
            Some(c) => {
                bail!("stage `{stage}`: class {c} does not exist (the data has {} classes)", self.data.num_classes)
            }
            None => Ok(()),
        }
    }

    /// The training split without the classes a distill stage leaves out of its transfer set.
    fn transfer_set(&self, stage: &str, spec: &DistillSpec) -> Result<Split> {
        let train = &self.data.train;
        if spec.transfer_exclude.is_empty() && spec.transfer_only.is_empty() {
            return Ok(train.view());
        }
        self.check_classes(stage, &spec.transfer_exclude)?;
        self.check_classes(stage, &spec.transfer_only)?;
        let listed = |classes: &[i64]| {
            let classes = Tensor::from_slice(classes).to(self.device);
            train.labels.unsqueeze(1).eq_tensor(&classes.unsqueeze(0)).any_dim(1, false)
        };
        let keep = if spec.transfer_only.is_empty() {
            listed(&spec.transfer_exclude).logical_not()
        } else {
            listed(&spec.transfer_only)
        };
        let idx = keep.nonzero().squeeze_dim(1);
        let subset = train.subset(&idx)?;
        info!("stage `{stage}`: transfer set of {} examples (of {})", subset.len(), train.len());
        if subset.len() == 0 {
            bail!("stage `{stage}`: the transfer set is empty");
        }
        Ok(subset)
    }

    /// The teacher's logits over the transfer set (for an ensemble, the combination of
    /// [`Teacher::logits`]), each network's from the cache when an identical checkpoint already
    /// ran over the same set.
    fn teacher_logits(
        &self,
        source: &ModelSource,
        teacher: &Teacher,
        transfer: &Split,
        spec: &DistillSpec,
    ) -> Result<Tensor> {
        let sources = match source {
            ModelSource::Ensemble { members, .. } => members.as_slice(),
            single => std::slice::from_ref(single),
        };
        let members = sources
            .iter()
            .zip(&teacher.members)
            .map(|(s, net)| self.network_logits(s, net, transfer, spec))
            .collect::<Result<Vec<_>>>()?;
        train::combine_logits(&members, teacher.temperature)
    }

    fn check_top_k(&self, stage: &str, k: i64) -> Result<()> {
        if k >= self.data.num_classes {
            bail!("stage `{stage}`: teacher_top_k = {k} keeps every class (the data has {})", self.data.num_classes);
        }
        Ok(())
    }

    /// The teacher's top-`k` soft targets over the transfer set (see [`train::top_k_targets`]),
    /// computed chunk by chunk so that no full `[n, classes]` matrix is ever held, and cached on
    /// disk keyed by every member's checkpoint, the set, T and k.
    fn teacher_top_k(
        &self,
        source: &ModelSource,
        teacher: &Teacher,
        transfer: &Split,
        spec: &DistillSpec,
        k: i64,
    ) -> Result<(Tensor, Tensor)> {
        let sources = match source {
            ModelSource::Ensemble { members, .. } => members.as_slice(),
            single => std::slice::from_ref(single),
        };
        let mut parts: Vec<Vec<u8>> =
            sources.iter().map(|s| Ok(std::fs::read(self.source_path(s)?)?)).collect::<Result<_>>()?;
        let d = &self.exp.data;
        let identity = format!(
            "top-k|{d:?}|{:?}|{:?}|{}|T{}|k{k}",
            spec.transfer_exclude,
            spec.transfer_only,
            transfer.len(),
            spec.temperature
        );
        parts.push(identity.into_bytes());
        let key = fnv1a(&parts.iter().map(Vec::as_slice).collect::<Vec<_>>());
        let path = self.cache.join(format!("teacher-top{k}-{key:016x}.safetensors"));
        let shape = [transfer.len(), k];
        if let Some(mut cached) = read_cache(&path, &[("probs", &shape), ("classes", &shape)]) {
            info!("teacher top-{k} soft targets over the transfer set read from {}", path.display());
            let classes = cached.pop().expect("two tensors").to(self.device);
            return Ok((cached.pop().expect("two tensors").to(self.device), classes));
        }
        let (mut probs, mut classes) = (Vec::new(), Vec::new());
        let n = transfer.len();
        for start in (0..n).step_by(EVAL_BATCH as usize) {
            let logits = teacher.logits(&transfer.range(start, EVAL_BATCH.min(n - start)))?;
            let (p, c) = train::top_k_targets(&logits, k, spec.temperature)?;
            probs.push(p);
            classes.push(c);
        }
        let (probs, classes) = (Tensor::cat(&probs, 0), Tensor::cat(&classes, 0));
        write_cache(&path, &[("probs", &probs), ("classes", &classes)])?;
        info!("teacher top-{k} soft targets over the transfer set cached in {}", path.display());
        Ok((probs, classes))
    }

    /// One network's logits over the transfer set, cached on disk by checkpoint and set.
    fn network_logits(
        &self,
        source: &ModelSource,
        teacher: &Mlp,
        transfer: &Split,
        spec: &DistillSpec,
    ) -> Result<Tensor> {
        let checkpoint = std::fs::read(self.source_path(source)?)?;
        let d = &self.exp.data;
        // The data settings (folder, limits, split, corpus), the class filters and the size;
        // averaged over translations, also their range and T.
        let mut identity = format!("{d:?}|{:?}|{:?}|{}", spec.transfer_exclude, spec.transfer_only, transfer.len());
        if let Some(n) = spec.translations {
            identity.push_str(&format!("|translations {n}|T{}", spec.temperature));
        }
        let key = fnv1a(&[&checkpoint, identity.as_bytes()]);
        let path = self.cache.join(format!("teacher-logits-{key:016x}.safetensors"));
        let shape = [transfer.len(), self.data.num_classes];
        if let Some(cached) = read_cache(&path, &[("logits", &shape)]) {
            info!("teacher logits over the transfer set read from {}", path.display());
            return Ok(cached[0].to(self.device));
        }
        let logits = match (spec.translations, self.data.geometry) {
            (None, _) => train::logits(teacher, transfer, EVAL_BATCH),
            (Some(n), Some((rows, cols))) if n >= rows.min(cols) => {
                bail!("teacher_translations = {n} would move {rows} x {cols} images out of the frame")
            }
            (Some(n), Some(geometry)) => {
                info!("teacher soft targets averaged over {} translations of each image", (2 * n + 1).pow(2));
                train::translation_averaged_logits(teacher, transfer, EVAL_BATCH, geometry, n, spec.temperature)?
            }
            (Some(_), None) => bail!("`teacher_translations` needs images; this data has none"),
        };
        write_cache(&path, &[("logits", &logits)])?;
        info!("teacher logits over the transfer set cached in {}", path.display());
        Ok(logits)
    }

    /// The examples a stage with `training.train_fraction < 1` trains on: a sorted random subset
    /// of `n`, drawn from the experiment's seed and the fraction alone, so that every stage
    /// with the same fraction (hard targets, soft targets) sees the same examples.
    fn fraction_examples(&self, n: i64, fraction: f64) -> Tensor {
        let k = ((fraction * n as f64).ceil() as i64).clamp(1, n);
        tch::manual_seed((self.exp.seed as i64).wrapping_mul(1_000_003) ^ (fraction.to_bits() as i64 & 0x7fff_ffff));
        let (sorted, _) = Tensor::randperm(n, (Kind::Int64, self.device)).narrow(0, 0, k).sort(0, false);
        sorted
    }

    /// Trains a new network for a stage (or resumes it); returns it after the last epoch (with
    /// early stopping, the best epoch's weights) and how it fit the examples it trained on.
    #[allow(clippy::too_many_arguments)]
    fn train(
        &self,
        (tables, tables_dir): (&mut Tables, &Path),
        stage: &str,
        init: Init,
        training: &Training,
        (split, sampling): (&Split, Sampling),
        supervision: &Supervision,
        targets: &Targets,
    ) -> Result<(nn::VarStore, Mlp, Fit)> {
        tch::manual_seed(training.seed as i64);
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
        let net = net.with_compute_kind(self.exp.precision.kind());
        let mut opt = Optimizer::new(&training.optimizer, vs.trainable_variables());

        let best_path = self.dir.join("checkpoints").join(format!("{stage}.best.safetensors"));
        let resume_path = self.resume_checkpoint(stage);
        let mut progress = resume::Progress { epochs_done: 0, best: None };
        if resume_path.exists() {
            let named = output::load_tensors(&resume_path)?;
            output::check_finite(&resume_path, &named)?;
            let (saved, rest) = resume::Progress::split(&resume_path, named)?;
            let (state, weights): (Vec<_>, Vec<_>) = rest.into_iter().partition(|(k, _)| optim::is_state_key(k));
            copy_weights(&vs, &weights, self.device).context("reading the resume checkpoint")?;
            opt.load_state(&state)?;
            progress = saved;
            info!("stage `{stage}`: resuming after epoch {} from {}", progress.epochs_done, resume_path.display());
        }
        let first_epoch = progress.epochs_done;
        let mut stopping = training.patience.map(|p| EarlyStopping::new(p, progress.best));
        tables.forget(stage, first_epoch);
        // Seconds of the epochs an earlier process ran (on this device or another).
        let earlier_seconds: f64 = tables.metrics.iter().filter(|r| r.stage == stage).map(|r| r.seconds).sum();

        let geometry: Geometry = self.data.geometry;
        if geometry.is_none() && training.jitter > 0 {
            bail!("stage `{stage}`: jitter translates images; this data is not images");
        }
        if let Some((rows, cols)) = geometry.filter(|&(r, c)| i64::from(training.jitter) >= r.min(c)) {
            bail!("stage `{stage}`: jitter = {} would move {rows} x {cols} images out of the frame", training.jitter);
        }
        let mut examples =
            (training.train_fraction < 1.0).then(|| self.fraction_examples(split.len(), training.train_fraction));
        let n = match &sampling {
            Sampling::Draw { n, .. } => *n,
            Sampling::All => examples.as_ref().map_or(split.len(), |e| e.size()[0]),
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
        let mut guard = train::LossGuard::default();
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
            let totals = train::train_epoch(
                &mut trainer,
                (split, examples.as_ref()),
                supervision,
                training,
                geometry,
                REPORT_EVERY,
                &mut guard,
                |step, loss| progress.step(epoch as u64, step as u64, loss),
            )
            .map_err(|e| {
                progress.finish();
                diverged(e, stage, epoch, (lr, supervision), &resume_path)
            })?;
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
            tables.metrics.push(row);
            // The epoch's row first, then the checkpoint that says the epoch is done: killed in
            // between, the resumed run drops the row and redoes the epoch; the other way round it
            // would lose the row.
            tables.write(tables_dir)?;
            if !last {
                let mut state = net.to_tensors(&vs);
                state.extend(trainer.opt.state());
                let best = stopping.and_then(|s| s.best());
                state.extend(resume::Progress { epochs_done: epoch + 1, best }.to_tensors());
                output::save_tensors(&resume_path, &state)?;
            }
            if last {
                break;
            }
        }
        progress.finish();
        drop(trainer);
        if let Some(Best { errors, epoch: at }) = stopping.and_then(|s| s.best()) {
            info!("stage `{stage}`: keeps epoch {at} ({errors} validation errors)");
            copy_weights(&vs, &output::load_tensors(&best_path)?, self.device).context("reading the best epoch")?;
        }
        output::save_tensors(&self.checkpoint(stage), &net.to_tensors(&vs))?;
        for path in [&resume_path, &best_path] {
            if path.exists() {
                std::fs::remove_file(path)?;
            }
        }
        let frozen = net.frozen();
        let fit = train::evaluate_with(&|x| Ok(frozen.forward_t(x, false)), split, examples.as_ref(), targets.classes)?;
        Ok((vs, net, Fit { accuracy: fit.accuracy(), earlier_seconds }))
    }

    /// [`Self::record`] for a model a stage trained, with its accuracy on its training examples,
    /// the seconds of its epochs before a resume, and, for a student, how closely it follows its
    /// teacher on the test set.
    fn record_trained(
        &self,
        tables: &mut Tables,
        stage: &str,
        kind: &str,
        net: &Mlp,
        (fit, fidelity): (Fit, Option<Fidelity>),
        started: Instant,
    ) -> Result<()> {
        self.record(tables, stage, kind, net, started, None)?;
        if let Some(row) = tables.summary.iter_mut().rfind(|r| r.stage == stage) {
            row.train_accuracy = Some(fit.accuracy);
            row.seconds += fit.earlier_seconds;
            if let Some(Fidelity { test, transfer }) = fidelity {
                row.teacher_agreement = Some(test.rate());
                row.teacher_errors = Some(test.teacher_errors);
                row.shared_errors = Some(test.shared_errors);
                row.transfer_agreement = Some(transfer.rate());
            }
        }
        Ok(())
    }

    /// Evaluates `net` on the validation and test splits and records its summary and per-class rows.
    fn record(
        &self,
        tables: &mut Tables,
        stage: &str,
        kind: &str,
        net: &Mlp,
        started: Instant,
        shift: Option<f64>,
    ) -> Result<()> {
        let model = (format!("mlp {}", net.config().describe()), net.num_params());
        let frozen = net.frozen();
        self.record_with(tables, stage, kind, model, &|x| Ok(frozen.forward_t(x, false)), started, shift)
    }

    /// [`Self::record`] for a model given as its description, parameter count and `logits(x)`.
    #[allow(clippy::too_many_arguments)]
    fn record_with(
        &self,
        tables: &mut Tables,
        stage: &str,
        kind: &str,
        (model, parameters): (String, i64),
        logits: &dyn Fn(&Tensor) -> Result<Tensor>,
        started: Instant,
        shift: Option<f64>,
    ) -> Result<()> {
        let classes = self.data.num_classes;
        let val = match &self.data.validation {
            Some(v) => Some(train::evaluate_with(logits, v, None, classes)?),
            None => None,
        };
        let test = train::evaluate_with(logits, &self.data.test, None, classes)?;
        // Finite weights can still overflow to infinite logits (a huge bias shift, say): such
        // outputs are no result.
        for (split, e) in [("validation", val.as_ref()), ("test", Some(&test))] {
            if let Some(loss) = e.map(|e| e.loss).filter(|l| !l.is_finite()) {
                bail!(
                    "stage `{stage}`: the model's outputs on the {split} split are not finite (its loss is {loss}), \
                     so no results are recorded for it"
                );
            }
        }
        info!(
            "stage `{stage}`: {} test errors of {} ({:.2}% accuracy)",
            test.errors,
            test.examples,
            100.0 * test.accuracy()
        );
        for (split, e) in [("validation", val.as_ref()), ("test", Some(&test))] {
            let Some(e) = e else { continue };
            for c in 0..classes as usize {
                tables.class_errors.push(ClassErrorsRow {
                    stage: stage.to_string(),
                    variant: String::new(),
                    split: split.to_string(),
                    class: c as i64,
                    examples: e.class_examples[c],
                    errors: e.class_errors[c],
                });
            }
        }
        tables.summary.push(SummaryRow {
            stage: stage.to_string(),
            variant: String::new(),
            kind: kind.to_string(),
            model,
            parameters,
            val_errors: val.as_ref().map(|v| v.errors),
            test_errors: test.errors,
            test_accuracy: test.accuracy(),
            shift,
            seconds: started.elapsed().as_secs_f64(),
            device: device_name(self.device, tch::get_num_threads(), self.exp.precision),
            train_accuracy: None,
            teacher_agreement: None,
            teacher_errors: None,
            shared_errors: None,
            transfer_agreement: None,
        });
        Ok(())
    }

    /// Adds each candidate shift to the output biases of `classes`, keeps the one with the
    /// fewest validation errors (ties: the smallest in magnitude), and records the model with
    /// it, and with `fixed` as the stage's variant `fixed`.
    #[allow(clippy::too_many_arguments)]
    fn bias_shift(
        &self,
        tables: &mut Tables,
        stage: &str,
        source: &ModelSource,
        classes: &[i64],
        (min, max, step): (f64, f64, f64),
        fixed: Option<f64>,
        started: Instant,
    ) -> Result<()> {
        self.check_classes(stage, classes)?;
        tables.forget(stage, 0);
        let (vs, net) = self.load_model(source)?;
        let mut bias = vs.variables().remove("output.bias").context("the model has no output.bias")?;
        let original = bias.detach().copy();
        let mut mask = Tensor::zeros([self.data.num_classes], (Kind::Float, self.device));
        let _ = mask.index_fill_(0, &Tensor::from_slice(classes).to(self.device), 1.0);
        let validation = self.data.validation.as_ref().context("bias shifts are chosen on the validation split")?;
        let mut set = |shift: f64| tch::no_grad(|| bias.copy_(&(&original + &mask * shift)));
        let steps = ((max - min) / step + 1e-9).floor() as i64;
        let mut best: Option<(i64, f64)> = None;
        for i in 0..=steps {
            // Rounded so that 0.1 steps read 2.4, not 2.4000000000000004.
            let shift = ((min + i as f64 * step) * 1e9).round() / 1e9;
            set(shift);
            let errors = train::evaluate(&net, validation, self.data.num_classes)?.errors;
            tables.shifts.push(ShiftRow { stage: stage.to_string(), shift, val_errors: errors });
            let better = match best {
                None => true,
                Some((e, s)) => errors < e || (errors == e && shift.abs() < s.abs()),
            };
            if better {
                best = Some((errors, shift));
            }
        }
        let (_, chosen) = best.context("no candidate shift")?;
        info!("stage `{stage}`: shift {chosen:+} on classes {classes:?} (fewest validation errors)");
        set(chosen);
        self.record(tables, stage, "bias_shift", &net, started, Some(chosen))?;
        if let Some(f) = fixed {
            set(f);
            let (summary, class_errors) = (tables.summary.len(), tables.class_errors.len());
            let label = output::row_label(stage, output::FIXED);
            self.record(tables, &label, "bias_shift", &net, started, Some(f))?;
            // Recorded under the label (its log lines name it so), kept as the stage's variant.
            for r in &mut tables.summary[summary..] {
                (r.stage, r.variant) = (stage.to_string(), output::FIXED.to_string());
            }
            for r in &mut tables.class_errors[class_errors..] {
                (r.stage, r.variant) = (stage.to_string(), output::FIXED.to_string());
            }
        }
        Ok(())
    }
}

/// Checks, before allocating it, that a network of layer widths `sizes` has at most
/// [`MAX_PARAMETERS`] parameters and, on the CPU, that its weights, gradients and optimizer
/// state (16 bytes a parameter at most, with Adam) fit in the memory the machine has available.
fn check_network_size(stage: &str, sizes: &[i64], device: Device) -> Result<()> {
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
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// Steps between the training loop's reads of the loss (progress bar, divergence check).
const REPORT_EVERY: usize = 50;

/// The error of a stage whose training diverged in `epoch` (0-based) at learning rate `lr`:
/// where, the likely causes, and which checkpoint is kept. Other errors pass through.
fn diverged(
    error: anyhow::Error,
    stage: &str,
    epoch: i64,
    (lr, supervision): (f64, &Supervision),
    resume: &Path,
) -> anyhow::Error {
    let Some(d) = error.downcast_ref::<train::Diverged>() else { return error };
    let mut causes = vec![format!("a learning rate too high (lr = {lr} in this epoch)")];
    if let Supervision::Distill { spec, .. } = supervision {
        if spec.objective == crate::config::Objective::Soft {
            causes.push(format!("the temperature (T = {})", spec.temperature));
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

/// Name of the checksum tensor of a cache entry: per tensor of the entry, FNV-1a of its values.
const CHECKSUM_KEY: &str = "__checksum__";

/// FNV-1a of a tensor's values as little-endian bytes (i64, or else as f32), on the CPU.
fn tensor_checksum(t: &Tensor) -> Result<i64> {
    let flat = t.detach().to_device(Device::Cpu).contiguous().flatten(0, -1);
    let bytes: Vec<u8> = match t.kind() {
        Kind::Int64 => Vec::<i64>::try_from(&flat)?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        _ => Vec::<f32>::try_from(&flat.to_kind(Kind::Float))?.iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    Ok(fnv1a(&[&bytes]) as i64)
}

/// Writes a cache entry: the tensors and, under [`CHECKSUM_KEY`], a checksum of each.
fn write_cache(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<()> {
    let sums = tensors.iter().map(|(_, t)| tensor_checksum(t)).collect::<Result<Vec<i64>>>()?;
    let mut named: Vec<(String, Tensor)> = tensors.iter().map(|(n, t)| (n.to_string(), t.shallow_clone())).collect();
    named.push((CHECKSUM_KEY.to_string(), Tensor::from_slice(&sums)));
    output::save_tensors(path, &named)
}

/// Reads a cache entry written by [`write_cache`]: the tensors `expected` names, if the entry
/// exists and each has its shape and its checksum. A damaged entry (unreadable,
/// truncated, altered, or from before entries were checksummed) is reported in the log and
/// taken as absent, so that it is computed and written again.
fn read_cache(path: &Path, expected: &[(&str, &[i64])]) -> Option<Vec<Tensor>> {
    if !path.exists() {
        return None;
    }
    let check = || -> Result<Vec<Tensor>> {
        let named = output::load_tensors(path)?;
        let get = |name: &str| named.iter().find(|(n, _)| n == name).map(|(_, t)| t.shallow_clone());
        let sums = get(CHECKSUM_KEY).context("it has no checksum")?;
        let sums = Vec::<i64>::try_from(&sums).context("its checksum is not a list of integers")?;
        if sums.len() != expected.len() {
            bail!("it has {} checksums for {} tensors", sums.len(), expected.len());
        }
        expected
            .iter()
            .zip(sums)
            .map(|((name, shape), sum)| {
                let t = get(name).with_context(|| format!("it has no `{name}`"))?;
                if t.size() != *shape {
                    bail!("`{name}` has shape {:?}, expected {shape:?}", t.size());
                }
                if tensor_checksum(&t)? != sum {
                    bail!("`{name}` does not match its checksum");
                }
                Ok(t)
            })
            .collect()
    };
    match check() {
        Ok(tensors) => Some(tensors),
        Err(e) => {
            tracing::warn!("the cache entry {} is damaged ({e:#}): computing it again", path.display());
            None
        }
    }
}

/// FNV-1a over several byte strings (a cache key, not a cryptographic hash).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100000001b3);
        }
        h = h.wrapping_mul(0x100000001b3) ^ 0xff;
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_processes_writing_the_tables_keep_each_others_rows() {
        let dir = std::env::temp_dir().join(format!("kd-tables-merge-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let open = || {
            let mut t = Tables::read(&dir).unwrap();
            t.order = vec!["a".into(), "b".into()];
            t.shared = true;
            t
        };
        // Both read the directory before either wrote, as two `--only` processes started at once.
        let (mut one, mut two) = (open(), open());
        for (tables, stage) in [(&mut one, "a"), (&mut two, "b")] {
            tables.forget_results(stage);
            tables.shifts.push(ShiftRow { stage: stage.into(), shift: 1.0, val_errors: 3 });
        }
        one.commit("a", &dir).unwrap();
        two.commit("b", &dir).unwrap();
        let on_disk = Tables::read(&dir).unwrap();
        assert_eq!(on_disk.shifts.iter().map(|r| r.stage.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(on_disk.done.iter().map(|r| r.stage.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn device_names_carry_threads_and_bf16() {
        assert_eq!(device_name(Device::Cpu, 1, Precision::F32), "cpu (1 thread)");
        assert_eq!(device_name(Device::Cpu, 2, Precision::F32), "cpu (2 threads)");
        assert_eq!(device_name(Device::Cpu, 2, Precision::Bf16), "cpu (2 threads, bf16)");
        assert_eq!(device_name(Device::Cuda(0), 16, Precision::F32), "cuda:0");
        assert_eq!(device_name(Device::Cuda(1), 16, Precision::Bf16), "cuda:1 (bf16)");
    }
}
