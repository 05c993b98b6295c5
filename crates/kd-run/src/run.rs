//! `kd-run run`: executes an experiment's stages, writes the run directory, resumes killed runs.
//!
//! Layout of `OUT/<name>/`: `config.toml` (the resolved experiment), `command.txt` (the
//! command line), `metrics.csv` (a row per stage and epoch), `summary.csv` (a row per model),
//! `class_errors.csv` (per model, split and class), `bias_shifts.csv` (validation errors of
//! each candidate shift), `done.csv` (the stages whose results are committed: written after
//! their rows, see [`Tables::commit`]), `targets.csv` (with `data.store.targets`: the top-k
//! targets file streamed and how much of the teacher's probability mass it keeps),
//! `checkpoints/<stage>.safetensors`, and `run.log`. While a stage
//! trains, `checkpoints/<stage>.resume.safetensors` holds the weights and optimizer state after
//! its last finished epoch; each epoch reseeds libtorch from the stage seed and the epoch, so a
//! resumed run continues exactly as the uninterrupted one would have. Teachers' logits over a
//! transfer set are cached in `OUT/.cache/`, keyed by the checkpoint's bytes and the set.

use crate::config::{
    DataSource, DistillJob, EnsembleJob, EvaluateJob, Experiment, Job, ModelSource, Precision, Stage, TrainJob,
};
use crate::data::{self, Dataset};
use crate::device;
use crate::train::{Supervision, Teacher};
use anyhow::{bail, Context, Result};
use kd_core::Objective;
use kd_models::Mlp;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{nn, Device, Tensor};
use tracing::info;

mod bias_shift;
mod cache;
pub mod cost;
mod dir;
mod distill;
mod evaluate;
pub mod events;
mod fit;
mod inputs;
mod lock;
mod objective;
pub mod output;
mod plan;
mod progress;
pub mod provenance;
mod resume;
mod specialists;
mod tables;

use dir::{stage_facts, RunDir};
pub use dir::{Options, CONFIG_HASH};
use fit::{Init, Sampling, StageFit, Targets};
pub use inputs::check_inputs;
use plan::{Action, Discard, Plan, Request};
use tables::Tables;
pub use tables::TARGETS;

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
    /// The run's TensorBoard event file (rank 0), made at the first scalar.
    events: std::cell::RefCell<Option<events::EventWriter>>,
}

/// Runs `exp` under `out/<name>`, resuming what an earlier run of it left unfinished (see
/// [`plan::plan`] for what is skipped, resumed and run again); `command` is recorded in
/// `command.txt`.
pub fn run(exp: &Experiment, out: &Path, options: Options, command: &str) -> Result<PathBuf> {
    // In a data-parallel run rank 0 opens the run directory and applies its plan's discards;
    // the others then read it as it left it and must come to the same plan.
    let world = crate::dist::world();
    let mut dir = if world.is_writer() {
        RunDir::open(exp, out, options, command)?
    } else {
        world.barrier()?;
        RunDir::follow(exp, out)?
    };
    if world.is_distributed() {
        info!(
            "data-parallel over {} ranks (this is rank {}); rank 0 writes {}",
            world.size(),
            world.rank(),
            dir.path.display()
        );
    }
    let (device, data) = device_and_data(exp)?;
    let peak_tflops = exp.peak_tflops.or_else(|| known_peak(device, exp.precision));
    let events = std::cell::RefCell::new(None);
    let run = Run { exp, dir: dir.path.clone(), cache: dir.cache.clone(), device, data, peak_tflops, events };
    record_targets(&run.dir, &run.data)?;
    let request = Request { only: options.only, redo: options.redo };
    let plan =
        plan::plan(&stage_facts(exp), &dir.tables.recorded(), &dir.changed, request, &|s| run.checkpoint(s).exists());
    run.discard(&mut dir.tables, &plan, &dir.recombined)?;
    if world.is_distributed() {
        if world.is_writer() {
            world.barrier()?;
        }
        // A data path that names other bytes on some rank (another working directory, another
        // node's copy) would train every rank on a different set and average the mix.
        let source = data_source(&exp.data.source);
        for (what, hash) in run.data.fingerprints()? {
            let what = format!(
                "{what} as read from {source} (every rank must read the same bytes: a relative path in another \
                 working directory, or another node's copy, gives a rank other data)"
            );
            world.agree(&what, hash)?;
        }
        let actions = format!("{:?}", plan.actions);
        world.agree("the plan (which stages run, resume or are skipped)", crate::dist::text_hash(&actions))?;
    }
    for (stage, (_, action)) in exp.stages.iter().zip(&plan.actions) {
        match action {
            Action::SkipDone => info!("stage `{}`: already done, skipped", stage.name),
            Action::NotSelected => {}
            Action::Run { specialists } => run.stage(&mut dir.tables, stage, specialists)?,
        }
    }
    Ok(dir.path.clone())
}

/// Records in `targets.csv` the top-k targets file the run streams and how much of the
/// teacher's probability mass at T it keeps (the file's header), for the report; removes a
/// `targets.csv` an earlier configuration of the run left when it streams none.
fn record_targets(dir: &Path, data: &Dataset) -> Result<()> {
    let path = dir.join(tables::TARGETS);
    let Some(file) = data.stream.as_ref().and_then(|s| s.targets.as_ref()) else {
        if crate::dist::world().is_writer() && path.exists() {
            std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
        return Ok(());
    };
    let kept = file.kept_mass();
    match &kept {
        Some(m) => info!(
            "top-{} targets {}: share of the teacher's probability mass at T = {} they keep over {} frames: {}",
            file.k(),
            file.path().display(),
            file.temperature(),
            file.frames(),
            m.describe()
        ),
        None => info!(
            "top-{} targets {}: a version 2 file, which does not record how much of the teacher's probability \
             mass it keeps (compute it again with `kd-run store targets` to record it)",
            file.k(),
            file.path().display()
        ),
    }
    let row = output::TargetsRow {
        file: file.path().display().to_string(),
        k: file.k() as u64,
        temperature: file.temperature(),
        frames: file.frames(),
        kept_mean: kept.map(|m| m.mean),
        kept_p50: kept.map(|m| m.p50),
        kept_p5: kept.map(|m| m.p5),
        kept_p1: kept.map(|m| m.p1),
        kept_min: kept.map(|m| m.min),
    };
    output::write_csv_if_changed(&path, &[row])
}

/// What `kd-run run` would do with `exp` under `out`, in lines, without writing anything: for
/// each stage whether it would run, resume (after which epoch, or at which step), be skipped or
/// run again and why, and what it reads and writes.
pub fn dry_run(exp: &Experiment, out: &Path, options: Options) -> Result<Vec<String>> {
    let dir = out.join(&exp.name);
    let (tables, changed) = dir::RunDir::preview(exp, out, options.fresh)?;
    let checkpoint = |stage: &str| dir.join("checkpoints").join(format!("{stage}.safetensors"));
    let request = Request { only: options.only, redo: options.redo };
    let plan = plan::plan(&stage_facts(exp), &tables.recorded(), &changed, request, &|s| checkpoint(s).exists());
    let mut lines = vec![format!(
        "{} {} ({} stage{})",
        if dir.join("config.toml").exists() && !options.fresh { "resume the run in" } else { "a new run in" },
        dir.display(),
        exp.stages.len(),
        if exp.stages.len() == 1 { "" } else { "s" }
    )];
    if options.fresh && dir.exists() {
        lines.push("  --fresh: the earlier run's files are removed first".into());
    }
    for (stage, why) in &plan.discard {
        let why = match why {
            Discard::Partial => "its results were not all written (the run was stopped while committing them)",
            Discard::Stale => "it is no longer in the experiment",
            Discard::Changed => "its settings, or those of a stage it reads, changed",
            Discard::Redo => "--redo names it or a stage it reads",
        };
        lines.push(format!("  discard `{stage}`'s results and checkpoints: {why}"));
    }
    for (stage, (_, action)) in exp.stages.iter().zip(&plan.actions) {
        let name = &stage.name;
        let what = match action {
            Action::SkipDone => "skip: done (its results are committed)".to_string(),
            Action::NotSelected => "not run: --only does not select it".to_string(),
            Action::Run { specialists } => {
                let again = plan.discard.iter().any(|(s, _)| s == name);
                let resume = dir.join("checkpoints").join(format!("{name}.resume.safetensors"));
                let mut what = match (again, resume.exists()) {
                    (false, true) => {
                        match output::load_tensors(&resume).and_then(|t| resume::Point::split(&resume, t)) {
                            Ok((p, _)) => match p.position {
                                Some(at) => format!("resume at step {} of epoch {}", at.step, p.epochs_done + 1),
                                None => format!("resume after epoch {}", p.epochs_done),
                            },
                            Err(e) => format!("run from the start (its resume checkpoint is unreadable: {e:#})"),
                        }
                    }
                    (true, _) => "run again from the start".to_string(),
                    (false, false) => "run".to_string(),
                };
                if !specialists.is_empty() {
                    let list: Vec<String> = specialists.iter().map(usize::to_string).collect();
                    what.push_str(&format!(" (specialists {})", list.join(", ")));
                }
                what
            }
        };
        lines.push(format!("  stage `{name}` ({}): {what}", stage.job.kind_name()));
        if matches!(action, Action::Run { .. }) {
            let reads = stage.job.reads();
            if !reads.is_empty() {
                let reads: Vec<String> = reads.iter().map(|r| format!("`{r}`")).collect();
                lines.push(format!("    reads the models of {}", reads.join(", ")));
            }
            if matches!(stage.job, Job::Train(_) | Job::Distill(_)) {
                lines.push(format!("    writes {}", checkpoint(name).display()));
            }
        }
    }
    lines.push(format!("  tables in {} (summary.csv, metrics.csv, ...); nothing was written", dir.display()));
    Ok(lines)
}

/// Sets the CPU threads, picks the device and loads the experiment's data onto it.
fn device_and_data(exp: &Experiment) -> Result<(Device, Dataset)> {
    crate::config::check_threads(exp.threads)?;
    if exp.threads > 0 {
        tch::set_num_threads(exp.threads as i32);
    }
    let device = crate::dist::world().device(exp.device.select("device")?);
    set_tf32(device, exp.precision);
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
        data_source(&exp.data.source),
        data.train.len(),
        data.validation.as_ref().map_or(0, |v| v.len()),
        data.test.len(),
        data.num_classes
    );
    Ok((device, data))
}

/// Named tensors in the order of their names.
fn sorted_by_name(named: &[(String, Tensor)]) -> Vec<(&str, &Tensor)> {
    let mut v: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    v.sort_by_key(|(n, _)| *n);
    v
}

/// The data an experiment reads, in words.
fn data_source(source: &DataSource) -> String {
    match source {
        DataSource::Speech(s) => format!("synthetic speech (seed {}, {} speakers)", s.corpus.seed, s.corpus.speakers),
        DataSource::Files(f) => format!("files (training features {})", f.train.features.display()),
        DataSource::Store(s) => format!("frame stores in {}", s.dir.display()),
        DataSource::Mnist { dir } => dir.display().to_string(),
    }
}

impl Run<'_> {
    /// Adds scalars (tag, value) at `step` to the run's TensorBoard event file (rank 0 only;
    /// the file is made at the first call), and writes them out when `flush`. A file that cannot
    /// be written stops the run, as any other output would.
    fn scalars(&self, step: i64, values: &[(String, f64)], flush: bool) -> Result<()> {
        if !crate::dist::world().is_writer() {
            return Ok(());
        }
        let mut events = self.events.borrow_mut();
        let writer = match events.as_mut() {
            Some(w) => w,
            None => {
                let writer = events::EventWriter::create(&self.dir.join(events::FOLDER))?;
                info!(
                    "TensorBoard events in {} (tensorboard --logdir {})",
                    writer.path().display(),
                    self.dir.display()
                );
                events.insert(writer)
            }
        };
        for (tag, value) in values {
            writer.scalar(tag, step, *value)?;
        }
        if flush {
            writer.flush()?;
        }
        Ok(())
    }

    /// Discards what the plan says (results, epochs, checkpoints) and writes the tables if that
    /// changed them. The trained specialists of the `recombined` stages stay.
    fn discard(&self, tables: &mut Tables, plan: &Plan, recombined: &[String]) -> Result<()> {
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
                        if path.exists() && crate::dist::world().is_writer() {
                            std::fs::remove_file(&path)?;
                        }
                    }
                    if *why == Discard::Changed && recombined.contains(stage) {
                        info!("stage `{stage}`: only how its specialists are combined changed; they are kept");
                    } else {
                        self.remove_specialists(stage)?;
                    }
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
                    tables,
                    &self.dir,
                    StageFit {
                        stage: name,
                        init: Init::New(model),
                        training,
                        split: &self.data.train,
                        sampling: Sampling::All,
                        supervision: &Supervision::labels(),
                        targets: &self.targets(),
                    },
                )?;
                self.record_trained(tables, name, "train", &net, (fit, None), started)?;
            }
            Job::Distill(DistillJob { model, training, distill }) => {
                self.distill(tables, name, (model, training, distill), started)?
            }
            Job::Evaluate(EvaluateJob { source }) => {
                let (_vs, net) = self.load_model(source)?;
                self.record(tables, name, "evaluate", &net.frozen(), started, None)?;
            }
            Job::BiasShift(job) => self.bias_shift(tables, name, job, started)?,
            Job::Ensemble(EnsembleJob { members }) => self.ensemble(tables, name, members, started)?,
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
        tables.commit(name, &self.dir)?;
        // The other ranks read what this stage wrote (its checkpoint) once rank 0 has written it.
        crate::dist::world().barrier()
    }
}

/// Switches libtorch's TF32 matrix products and convolutions on for `precision = "tf32"` on a
/// CUDA device, and off otherwise (the process may run several experiments).
fn set_tf32(device: Device, precision: Precision) {
    let on = precision == Precision::Tf32 && device.is_cuda();
    kd_native::cuda::set_tf32(on, on);
    match (precision, on) {
        (Precision::Tf32, true) => info!("precision tf32: f32 matrix products on TF32 tensor cores"),
        (Precision::Tf32, false) => info!("precision tf32: no TF32 on {device:?}; matrix products in f32"),
        _ => {}
    }
}

/// The dense peak TFLOP/s of CUDA device `device` at `precision`, when the driver names a GPU
/// of [`device::peak_tflops`]'s table (logged either way).
fn known_peak(device: Device, precision: Precision) -> Option<f64> {
    let Device::Cuda(i) = device else { return None };
    let name = device::cuda_device_name(i)?;
    let peak = device::peak_tflops(&name);
    let at = peak.map(|p| match precision {
        Precision::Bf16 => p.bf16,
        Precision::Tf32 => p.tf32,
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
        Device::Cuda(i) if precision == Precision::Tf32 => format!("cuda:{i} (tf32)"),
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
        Ok(self.source_file(source)?.0)
    }

    /// [`Run::source_path`], and whether the file is one the experiment names (`Some`, with the
    /// SHA-256 its stage pins, if any) rather than a checkpoint of this run (`None`).
    fn source_file(&self, source: &ModelSource) -> Result<(PathBuf, Option<Option<String>>)> {
        match source {
            ModelSource::Stage(name) => match self.exp.stages.iter().find(|s| &s.name == name).map(|s| &s.job) {
                Some(Job::Evaluate(EvaluateJob { source })) => self.source_file(source),
                _ => Ok((self.checkpoint(name), None)),
            },
            ModelSource::Checkpoint(path) => Ok((path.clone(), Some(None))),
            ModelSource::PinnedCheckpoint { path, sha256 } => Ok((path.clone(), Some(Some(sha256.clone())))),
            ModelSource::Ensemble { stage, .. } => bail!("`{stage}` is an ensemble, not one checkpoint"),
        }
    }

    /// A teacher for `objective`: one network, or an ensemble's members, averaged at the
    /// objective's temperature; each frozen in the compute precision once ([`Mlp::frozen`]), so
    /// its forward passes cast no weights.
    fn load_teacher(&self, source: &ModelSource, objective: Objective) -> Result<Teacher> {
        let members =
            networks(source).iter().map(|s| Ok(self.load_model(s)?.1.frozen())).collect::<Result<Vec<_>>>()?;
        Ok(Teacher { members, objective })
    }

    fn load_model(&self, source: &ModelSource) -> Result<(nn::VarStore, Mlp)> {
        let (path, named_file) = self.source_file(source)?;
        if let ModelSource::Stage(stage) = source {
            if !path.exists() && path == self.checkpoint(stage) {
                bail!("stage `{stage}` has not run yet: run it first (or add `--only {stage}`)");
            }
        }
        let named = match named_file {
            Some(pin) => output::load_checkpoint(&path, pin.as_deref())?,
            None => output::load_tensors(&path)?,
        };
        output::check_finite(&path, &named)?;
        let world = crate::dist::world();
        if world.is_distributed() {
            world.agree(
                &format!("checkpoint {} as read (every rank must read the same file)", path.display()),
                // By name: a safetensors file's entries come back in no fixed order.
                crate::dist::tensors_hash(sorted_by_name(&named)),
            )?;
        }
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
}

/// The single models a source stands for: an ensemble's members, or the source itself.
fn networks(source: &ModelSource) -> &[ModelSource] {
    match source {
        ModelSource::Ensemble { members, .. } => members.as_slice(),
        single => std::slice::from_ref(single),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::output::ShiftRow;

    #[test]
    fn two_processes_writing_the_tables_keep_each_others_rows() {
        let temp = crate::testutil::TempDir::new("tables-merge");
        let dir = temp.0.clone();
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
    }

    #[test]
    fn device_names_carry_threads_and_bf16() {
        assert_eq!(device_name(Device::Cpu, 1, Precision::F32), "cpu (1 thread)");
        assert_eq!(device_name(Device::Cpu, 2, Precision::F32), "cpu (2 threads)");
        assert_eq!(device_name(Device::Cpu, 2, Precision::Bf16), "cpu (2 threads, bf16)");
        assert_eq!(device_name(Device::Cuda(0), 16, Precision::F32), "cuda:0");
        assert_eq!(device_name(Device::Cuda(1), 16, Precision::Bf16), "cuda:1 (bf16)");
        assert_eq!(device_name(Device::Cuda(0), 16, Precision::Tf32), "cuda:0 (tf32)");
        assert_eq!(device_name(Device::Cpu, 1, Precision::Tf32), "cpu (1 thread)");
    }
}
