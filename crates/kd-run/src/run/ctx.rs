//! What every stage reads: the run's experiment, folder, device and data, and the services the
//! stages share (their checkpoints' paths, loading a model or a teacher, the TensorBoard file).

use super::events;
use super::output;
use crate::config::{EvaluateJob, Experiment, Job, ModelSource, Precision};
use crate::data::{Dataset, Split};
use crate::train::Teacher;
use anyhow::{bail, Context, Result};
use kd_core::Objective;
use kd_models::Mlp;
use std::path::PathBuf;
use tch::{nn, Device, Tensor};
use tracing::info;

/// What a network is scored on while it trains: the validation examples (early stopping,
/// metrics), the test split after the last epoch, both labelled in `classes` classes.
pub(super) struct Targets<'a> {
    pub(super) validation: Option<(&'a Split, Option<Tensor>)>,
    pub(super) test: Option<&'a Split>,
    pub(super) classes: i64,
}

/// What a run reads: where it writes, its device, its data.
pub(super) struct Ctx<'a> {
    pub(super) exp: &'a Experiment,
    pub(super) dir: PathBuf,
    pub(super) cache: PathBuf,
    pub(super) device: Device,
    pub(super) data: Dataset,
    /// The TFLOP/s each epoch's log line gives the share of: `peak_tflops`, else the GPU's
    /// known peak at the run's precision.
    pub(super) peak_tflops: Option<f64>,
    /// The run's TensorBoard event file (rank 0), made at the first scalar.
    pub(super) events: std::cell::RefCell<Option<events::EventWriter>>,
}

impl Ctx<'_> {
    /// Adds scalars (tag, value) at `step` to the run's TensorBoard event file (rank 0 only;
    /// the file is made at the first call), and writes them out when `flush`. A file that cannot
    /// be written stops the run, as any other output would.
    pub(super) fn scalars(&self, step: i64, values: &[(String, f64)], flush: bool) -> Result<()> {
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

    /// The run's own splits and classes.
    pub(super) fn targets(&self) -> Targets<'_> {
        Targets {
            validation: self.data.validation.as_ref().map(|v| (v, None)),
            test: Some(&self.data.test),
            classes: self.data.num_classes,
        }
    }

    pub(super) fn checkpoint(&self, stage: &str) -> PathBuf {
        self.dir.join("checkpoints").join(format!("{stage}.safetensors"))
    }

    pub(super) fn resume_checkpoint(&self, stage: &str) -> PathBuf {
        self.dir.join("checkpoints").join(format!("{stage}.resume.safetensors"))
    }

    /// The checkpoint file of a single model (an ensemble has one per member). An evaluate stage
    /// stands for the model it evaluates.
    pub(super) fn source_path(&self, source: &ModelSource) -> Result<PathBuf> {
        Ok(self.source_file(source)?.0)
    }

    /// [`Run::source_path`], and whether the file is one the experiment names (`Some`, with the
    /// SHA-256 its stage pins, if any) rather than a checkpoint of this run (`None`).
    pub(super) fn source_file(&self, source: &ModelSource) -> Result<(PathBuf, Option<Option<String>>)> {
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
    pub(super) fn load_teacher(&self, source: &ModelSource, objective: Objective) -> Result<Teacher> {
        let members =
            networks(source).iter().map(|s| Ok(self.load_model(s)?.1.frozen())).collect::<Result<Vec<_>>>()?;
        Ok(Teacher { members, objective })
    }

    pub(super) fn load_model(&self, source: &ModelSource) -> Result<(nn::VarStore, Mlp)> {
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

    pub(super) fn check_classes(&self, stage: &str, classes: &[i64]) -> Result<()> {
        match classes.iter().find(|&&c| c >= self.data.num_classes) {
            Some(c) => {
                bail!("stage `{stage}`: class {c} does not exist (the data has {} classes)", self.data.num_classes)
            }
            None => Ok(()),
        }
    }
}

/// The single models a source stands for: an ensemble's members, or the source itself.
pub(super) fn networks(source: &ModelSource) -> &[ModelSource] {
    match source {
        ModelSource::Ensemble { members, .. } => members.as_slice(),
        single => std::slice::from_ref(single),
    }
}

/// Named tensors in the order of their names.
pub(super) fn sorted_by_name(named: &[(String, Tensor)]) -> Vec<(&str, &Tensor)> {
    let mut v: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    v.sort_by_key(|(n, _)| *n);
    v
}

/// How `summary.csv` and `metrics.csv` name where a model ran: the device, the CPU threads, and
/// bf16 when the matrix products were (a resumed run may change either).
pub(super) fn device_name(device: Device, threads: i32, precision: Precision) -> String {
    let bf16 = if precision == Precision::Bf16 { ", bf16" } else { "" };
    match device {
        Device::Cuda(i) if precision == Precision::Tf32 => format!("cuda:{i} (tf32)"),
        Device::Cuda(i) if bf16.is_empty() => format!("cuda:{i}"),
        Device::Cuda(i) => format!("cuda:{i} (bf16)"),
        _ if threads == 1 => format!("cpu (1 thread{bf16})"),
        _ => format!("cpu ({threads} threads{bf16})"),
    }
}
