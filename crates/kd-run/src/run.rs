//! `kd-run run`: executes an experiment's stages, writes the run directory, resumes killed runs.
//!
//! Layout of `OUT/<name>/`: `config.toml` (the resolved experiment), `metrics.csv` (a row per
//! stage and epoch), `summary.csv` (a row per model), `checkpoints/<stage>.safetensors`, and
//! `run.log`. While a stage trains, `checkpoints/<stage>.resume.safetensors` holds the weights and
//! optimizer state after its last finished epoch; each epoch reseeds libtorch from the stage seed
//! and the epoch, so a resumed run continues exactly as the uninterrupted one would have.

use crate::config::{Experiment, Job, ModelSource, ModelSpec, Training};
use crate::data::{self, Dataset};
use crate::optim::{self, Optimizer};
use crate::output::{self, MetricsRow, SummaryRow};
use crate::progress::Progress;
use crate::train::{self, Geometry, Supervision, TeacherSignal, Trainer, EVAL_BATCH};
use anyhow::{bail, Context, Result};
use kd_models::{Mlp, MlpConfig};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{nn, Device};
use tracing::info;

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

/// State of one run directory.
struct Run {
    dir: PathBuf,
    device: Device,
    data: Dataset,
    metrics: Vec<MetricsRow>,
    summary: Vec<SummaryRow>,
}

/// Runs `exp` under `out/<name>`, resuming what an earlier identical run left unfinished.
/// `fresh` discards an earlier run's files instead.
pub fn run(exp: &Experiment, out: &Path, fresh: bool) -> Result<PathBuf> {
    let dir = out.join(&exp.name);
    let config = exp.to_toml()?;
    let config_path = dir.join("config.toml");
    if fresh && dir.exists() {
        for name in ["config.toml", "metrics.csv", "summary.csv", "checkpoints"] {
            let p = dir.join(name);
            if p.is_dir() {
                std::fs::remove_dir_all(&p)?;
            } else if p.exists() {
                std::fs::remove_file(&p)?;
            }
        }
    }
    if config_path.exists() {
        let old = std::fs::read_to_string(&config_path)?;
        if old != config {
            bail!(
                "{} holds a run of a different configuration; pass --fresh to replace it, or choose another --out",
                dir.display()
            );
        }
        info!("resuming the run in {}", dir.display());
    }
    std::fs::create_dir_all(dir.join("checkpoints")).with_context(|| format!("cannot create {}", dir.display()))?;
    crate::logging::log_to_file(&dir.join("run.log"))?;
    output::write_atomic(&config_path, config.as_bytes())?;

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
        "data {}: {} training, {} validation, {} test examples",
        exp.data.dir.display(),
        data.train.len(),
        data.validation.as_ref().map_or(0, |v| v.len()),
        data.test.len()
    );
    let mut run = Run {
        metrics: output::read_csv(&dir.join("metrics.csv"))?,
        summary: output::read_csv(&dir.join("summary.csv"))?,
        dir: dir.clone(),
        device,
        data,
    };
    for stage in &exp.stages {
        let done = run.summary.iter().any(|r| r.stage == stage.name)
            && (matches!(stage.job, Job::Evaluate { .. }) || run.checkpoint(&stage.name).exists());
        if done {
            info!("stage `{}`: already done, skipped", stage.name);
            continue;
        }
        run.summary.retain(|r| r.stage != stage.name);
        let started = Instant::now();
        let (net, kind) = match &stage.job {
            Job::Train { model, training } => (run.train(&stage.name, model, training, None)?, "train"),
            Job::Distill { model, training, distill } => {
                let (_teacher_vs, teacher) = run.load_model(&distill.teacher)?;
                let transfer = &run.data.train;
                // Without jitter the transfer set is fixed: the teacher runs once over it.
                let signal = if training.jitter == 0 {
                    TeacherSignal::Cached(train::teacher_outputs(&teacher, distill, &transfer.images, EVAL_BATCH)?)
                } else {
                    TeacherSignal::Live(&teacher)
                };
                let supervision = Supervision::Distill { spec: distill, teacher: signal };
                (run.train(&stage.name, model, training, Some(&supervision))?, "distill")
            }
            Job::Evaluate { source } => (run.load_model(source)?, "evaluate"),
        };
        run.finish_stage(&stage.name, kind, &net.1, started.elapsed().as_secs_f64())?;
    }
    Ok(dir)
}

impl Run {
    fn checkpoint(&self, stage: &str) -> PathBuf {
        self.dir.join("checkpoints").join(format!("{stage}.safetensors"))
    }

    fn resume_checkpoint(&self, stage: &str) -> PathBuf {
        self.dir.join("checkpoints").join(format!("{stage}.resume.safetensors"))
    }

    fn load_model(&self, source: &ModelSource) -> Result<(nn::VarStore, Mlp)> {
        let path = match source {
            ModelSource::Stage(name) => self.checkpoint(name),
            ModelSource::Checkpoint(path) => path.clone(),
        };
        let named = output::load_tensors(&path)?;
        let (vs, net) =
            Mlp::from_tensors(&named, self.device).with_context(|| format!("loading {}", path.display()))?;
        let want = self.data.train.images.size()[1];
        if net.config().input_dim() != want || net.config().num_classes() != self.data.num_classes {
            bail!(
                "{} is a {} network; the data has {want} inputs and {} classes",
                path.display(),
                net.config().describe(),
                self.data.num_classes
            );
        }
        Ok((vs, net))
    }

    /// Trains a new network for a stage (or resumes it); returns it after the last epoch.
    fn train(
        &mut self,
        stage: &str,
        spec: &ModelSpec,
        training: &Training,
        supervision: Option<&Supervision>,
    ) -> Result<(nn::VarStore, Mlp)> {
        let mut sizes = vec![self.data.rows * self.data.cols];
        sizes.extend(&spec.hidden);
        sizes.push(self.data.num_classes);
        let config = MlpConfig {
            sizes,
            input_dropout: spec.input_dropout,
            hidden_dropout: spec.hidden_dropout,
            max_norm: spec.max_norm,
        };
        tch::manual_seed(training.seed as i64);
        let vs = nn::VarStore::new(self.device);
        let net = Mlp::new(&vs.root(), config)?;
        let mut opt = Optimizer::new(&training.optimizer, vs.trainable_variables());

        let mut first_epoch = 0;
        let resume_path = self.resume_checkpoint(stage);
        if resume_path.exists() {
            let named = output::load_tensors(&resume_path)?;
            let epoch = named.iter().find(|(k, _)| k == EPOCH_KEY).context("resume checkpoint without epoch")?;
            first_epoch = i64::try_from(&epoch.1)?;
            let (model_part, rest): (Vec<_>, Vec<_>) =
                named.into_iter().partition(|(k, _)| !optim::is_state_key(k) && k != EPOCH_KEY);
            let (saved_vs, _) = Mlp::from_tensors(&model_part, self.device)?;
            tch::no_grad(|| -> Result<()> {
                for (name, mut var) in vs.variables() {
                    var.copy_(saved_vs.variables().get(&name).context("resume checkpoint lacks a weight")?);
                }
                Ok(())
            })?;
            opt.load_state(&rest)?;
            info!("stage `{stage}`: resuming after epoch {first_epoch} from {}", resume_path.display());
        }
        self.metrics.retain(|r| r.stage != stage || r.epoch <= first_epoch);

        let hard = Supervision::Hard;
        let supervision = supervision.unwrap_or(&hard);
        let geometry = Geometry { rows: self.data.rows, cols: self.data.cols };
        let steps_per_epoch = (self.data.train.len() + training.batch_size - 1) / training.batch_size;
        let progress = Progress::new(stage, training.epochs as u64, steps_per_epoch as u64, first_epoch as u64);
        info!(
            "stage `{stage}`: {} ({} parameters), {} epochs of {} steps",
            net.config().describe(),
            net.num_params(),
            training.epochs,
            steps_per_epoch
        );
        let mut trainer = Trainer::new(&net, vs.trainable_variables(), opt);
        for epoch in first_epoch..training.epochs {
            let started = Instant::now();
            // Reseeding each epoch makes a resumed run identical to an uninterrupted one.
            tch::manual_seed((training.seed as i64) * 100_003 + epoch);
            let lr = training.lr(epoch);
            trainer.opt.set_lr(lr);
            trainer.opt.set_momentum(training.momentum(epoch));
            let totals = train::train_epoch(
                &mut trainer,
                &self.data.train,
                supervision,
                training,
                geometry,
                50,
                |step, loss| progress.step(epoch as u64, step as u64, loss),
            )?;
            let val = match &self.data.validation {
                Some(v) => Some(train::evaluate(&net, v, EVAL_BATCH)?),
                None => None,
            };
            let last = epoch + 1 == training.epochs;
            let test_errors = if last { Some(train::evaluate(&net, &self.data.test, EVAL_BATCH)?.1) } else { None };
            let row = MetricsRow {
                stage: stage.to_string(),
                epoch: epoch + 1,
                lr,
                train_loss: totals.loss,
                train_accuracy: totals.accuracy,
                val_loss: val.map(|v| v.0),
                val_accuracy: val
                    .map(|v| 1.0 - v.1 as f64 / self.data.validation.as_ref().map_or(1, |s| s.len()) as f64),
                test_errors,
                seconds: started.elapsed().as_secs_f64(),
            };
            progress.epoch_done(&row);
            self.metrics.push(row);
            let mut state = net.to_tensors(&vs);
            state.extend(trainer.opt.state());
            state.push((EPOCH_KEY.to_string(), tch::Tensor::from_slice(&[epoch + 1])));
            if !last {
                output::save_tensors(&resume_path, &state)?;
            }
            output::write_csv(&self.dir.join("metrics.csv"), &self.metrics)?;
        }
        progress.finish();
        output::save_tensors(&self.checkpoint(stage), &net.to_tensors(&vs))?;
        if resume_path.exists() {
            std::fs::remove_file(&resume_path)?;
        }
        drop(trainer);
        Ok((vs, net))
    }

    fn finish_stage(&mut self, stage: &str, kind: &str, net: &Mlp, seconds: f64) -> Result<()> {
        let val_errors = match &self.data.validation {
            Some(v) => Some(train::evaluate(net, v, EVAL_BATCH)?.1),
            None => None,
        };
        let (_, test_errors) = train::evaluate(net, &self.data.test, EVAL_BATCH)?;
        let n = self.data.test.len();
        info!(
            "stage `{stage}`: {test_errors} test errors of {n} ({:.2}% accuracy)",
            100.0 * (1.0 - test_errors as f64 / n as f64)
        );
        self.summary.push(SummaryRow {
            stage: stage.to_string(),
            kind: kind.to_string(),
            model: format!("mlp {}", net.config().describe()),
            parameters: net.num_params(),
            val_errors,
            test_errors,
            test_accuracy: 1.0 - test_errors as f64 / n as f64,
            seconds,
        });
        output::write_csv(&self.dir.join("summary.csv"), &self.summary)
    }
}

const EPOCH_KEY: &str = "__progress__.epoch";
