//! `kd-run run`: executes an experiment's stages, writes the run directory, resumes killed runs.
//!
//! Layout of `OUT/<name>/`: `config.toml` (the resolved experiment), `command.txt` (the
//! command line), `metrics.csv` (a row per stage and epoch), `summary.csv` (a row per model),
//! `class_errors.csv` (per model, split and class), `bias_shifts.csv` (validation errors of
//! each candidate shift), `done.csv` (the stages whose results are committed: written after
//! their rows, see [`Tables::commit`]), `targets.csv` (with `data.store.targets`: the top-k
//! targets file streamed and how much of the teacher's probability mass it keeps),
//! `data.fingerprints` (what the data read hashed to, checked when the run is resumed),
//! `checkpoints/<stage>.safetensors`, and `run.log`. While a stage
//! trains, `checkpoints/<stage>.resume.safetensors` holds the weights and optimizer state after
//! its last finished epoch; each epoch reseeds libtorch from the stage seed and the epoch, so a
//! resumed run continues exactly as the uninterrupted one would have. Teachers' logits over a
//! transfer set are cached in `OUT/.cache/`, keyed by the checkpoint's bytes and the set.

use crate::config::{DataSource, Experiment, Job, Precision, Stage};
use crate::data::{self, Dataset};
use crate::device;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::Device;
use tracing::info;

mod bias_shift;
mod cache;
mod clusters;
pub mod cost;
mod ctx;
mod dir;
mod distill;
mod ensemble;
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
mod record;
mod resume;
mod specialists;
mod tables;
mod train_stage;

use ctx::Ctx;
use dir::{stage_facts, RunDir};
pub use dir::{Options, CONFIG_HASH};
pub use inputs::check_inputs;
use plan::{Action, Discard, Plan, Request};
use tables::Tables;
pub use tables::TARGETS;

/// Runs `exp` under `out/<name>`, resuming what an earlier run of it left unfinished (see
/// [`plan::plan`] for what is skipped, resumed and run again); `command` is recorded in
/// `command.txt`.
pub fn run(exp: &Experiment, out: &Path, options: Options, command: &str) -> Result<PathBuf> {
    // In a data-parallel run rank 0 opens the run directory and applies its plan's discards;
    // the others then read it as it left it and must come to the same plan. Every rank loads
    // its data (and hashes it) before that wait, at the same time as rank 0, so that the others
    // wait at the barrier for rank 0's work on the run directory alone, not for its data.
    let world = crate::dist::world();
    let opened = if world.is_writer() { Some(RunDir::open(exp, out, options, command)?) } else { None };
    let (device, data) = device_and_data(exp)?;
    let fingerprints = data.fingerprints()?;
    let mut dir = match opened {
        Some(dir) => {
            dir.check_data(&fingerprints)?;
            dir
        }
        None => {
            world.barrier()?;
            RunDir::follow(exp, out)?
        }
    };
    if world.is_distributed() {
        info!(
            "data-parallel over {} ranks (this is rank {}); rank 0 writes {}",
            world.size(),
            world.rank(),
            dir.path.display()
        );
    }
    let peak_tflops = exp.peak_tflops.or_else(|| known_peak(device, exp.precision));
    let events = std::cell::RefCell::new(None);
    let run = Ctx { exp, dir: dir.path.clone(), cache: dir.cache.clone(), device, data, peak_tflops, events };
    record_targets(&run.dir, &run.data)?;
    let request = Request { only: options.only, redo: options.redo };
    let plan =
        plan::plan(&stage_facts(exp), &dir.tables.recorded(), &dir.changed, request, &|s| run.checkpoint(s).exists());
    discard(&run, &mut dir.tables, &plan, &dir.recombined)?;
    if world.is_distributed() {
        if world.is_writer() {
            world.barrier()?;
        }
        // A data path that names other bytes on some rank (another working directory, another
        // node's copy) would train every rank on a different set and average the mix.
        let source = data_source(&exp.data.source);
        for (what, hash) in fingerprints {
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
            Action::Run { specialists } => self::stage(&run, &mut dir.tables, stage, specialists)?,
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

/// The data an experiment reads, in words.
fn data_source(source: &DataSource) -> String {
    match source {
        DataSource::Speech(s) => format!("synthetic speech (seed {}, {} speakers)", s.corpus.seed, s.corpus.speakers),
        DataSource::Files(f) => format!("files (training features {})", f.train.features.display()),
        DataSource::Store(s) => format!("frame stores in {}", s.dir.display()),
        DataSource::Mnist { dir } => dir.display().to_string(),
    }
}

/// Discards what the plan says (results, epochs, checkpoints) and writes the tables if that
/// changed them. The trained specialists of the `recombined` stages stay.
fn discard(ctx: &Ctx, tables: &mut Tables, plan: &Plan, recombined: &[String]) -> Result<()> {
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
                for path in [ctx.checkpoint(stage), ctx.resume_checkpoint(stage)] {
                    if path.exists() && crate::dist::world().is_writer() {
                        std::fs::remove_file(&path)?;
                    }
                }
                if *why == Discard::Changed && recombined.contains(stage) {
                    info!("stage `{stage}`: only how its specialists are combined changed; they are kept");
                } else {
                    specialists::remove(ctx, stage)?;
                }
            }
        }
    }
    if plan.discards() {
        tables.write(&ctx.dir)?;
    }
    Ok(())
}

/// Runs one stage and commits its results (`specialists`: only these specialists of a
/// specialists stage, which then commit on their own).
fn stage(ctx: &Ctx, tables: &mut Tables, stage: &Stage, specialists: &[usize]) -> Result<()> {
    tables.forget_results(&stage.name);
    let started = Instant::now();
    let name = stage.name.as_str();
    match &stage.job {
        Job::Train(job) => train_stage::run(ctx, tables, name, job, started)?,
        Job::Distill(job) => distill::run(ctx, tables, name, job, started)?,
        Job::Evaluate(job) => evaluate::run(ctx, tables, name, job, started)?,
        Job::BiasShift(job) => bias_shift::run(ctx, tables, name, job, started)?,
        Job::Ensemble(job) => ensemble::run(ctx, tables, name, &job.members, started)?,
        Job::Clusters(job) => clusters::run(ctx, tables, name, job)?,
        Job::Specialists(job) => {
            let only_these = (!specialists.is_empty()).then_some(specialists);
            specialists::run(ctx, tables, name, job, only_these, started)?;
            if only_these.is_some() {
                // Specialists trained alone: each has its own files; the stage commits when
                // it combines them.
                return Ok(());
            }
        }
    }
    tables.commit(name, &ctx.dir)?;
    // The other ranks read what this stage wrote (its checkpoint) once rank 0 has written it.
    crate::dist::world().barrier()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::ctx::device_name;
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
