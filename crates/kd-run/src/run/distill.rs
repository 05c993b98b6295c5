//! Distill stages: the transfer set, the teacher's targets over it (computed once and cached, or
//! its top k), the student's training, and its fidelity to the teacher.

use super::cache::{content_key, read_cache, write_cache};
use super::ctx::networks;
use super::ctx::Ctx;
use super::fit::{self, Init, Sampling, StageFit};
use super::record::{self, Fidelity};
use super::tables::Tables;
use crate::config::{DistillJob, DistillSpec, ModelSource};
use crate::data::Split;
use crate::train::{self, Outputs, Supervision, Teacher, TeacherSignal, EVAL_BATCH};
use anyhow::{bail, Context, Result};
use kd_core::{Objective, TeacherTargets};
use kd_models::Mlp;
use std::time::Instant;
use tch::{nn::ModuleT, Device, Kind, Tensor};
use tracing::info;

/// A distill stage: the student trained on its teacher's outputs over the transfer set, then
/// scored, with how closely it follows the teacher.
pub(super) fn run(ctx: &Ctx, tables: &mut Tables, name: &str, job: &DistillJob, started: Instant) -> Result<()> {
    let DistillJob { model, training, distill } = job;
    let objective = super::objective::resolve(distill)?;
    if let Some(file) = ctx.data.stream.as_ref().and_then(|s| s.targets.as_ref()) {
        file.check_stage(name, distill.top_k, objective.temperature())?;
    }
    let teacher = ctx.load_teacher(&distill.teacher, objective)?;
    let transfer = transfer_set(ctx, name, distill)?;
    // Without jitter the transfer set is fixed: the teacher's outputs are computed
    // (or read from the cache) once, and serve the agreement below too.
    let mut transfer_logits = None;
    // Top-k targets streamed from beside a frame store come with each batch: nothing to compute.
    let streamed = ctx.data.stream.as_ref().is_some_and(|s| s.targets.is_some());
    let cached = if streamed {
        None
    } else if let Some(k) = distill.top_k {
        check_top_k(ctx, name, k)?;
        Some(teacher_top_k(ctx, &distill.teacher, &teacher, &transfer, distill, k)?)
    } else if training.jitter == 0 {
        let logits = teacher_logits(ctx, &distill.teacher, &teacher, &transfer, distill)?;
        let targets = objective.teacher_targets(&logits)?;
        transfer_logits = Some(logits);
        Some(targets)
    } else {
        None
    };
    let signal = match &cached {
        Some(targets) => TeacherSignal::Cached(targets),
        None if streamed => TeacherSignal::None,
        None => TeacherSignal::Live(&teacher),
    };
    let supervision = Supervision { objective, teacher: signal };
    let (_vs, net, fit) = fit::train(
        ctx,
        tables,
        &ctx.dir,
        StageFit {
            stage: name,
            init: Init::New(model),
            training,
            split: &transfer,
            sampling: Sampling::All,
            supervision: &supervision,
            targets: &ctx.targets(),
        },
    )?;
    let net = net.frozen();
    let (student, teacher) = (|x: &Tensor| Ok(net.forward_t(x, false)), |x: &Tensor| teacher.logits(x));
    let on_transfer = match &transfer_logits {
        Some(logits) => Outputs::Cached(logits),
        None => Outputs::Model(&teacher),
    };
    let fidelity = Fidelity {
        test: train::agreement(&student, Outputs::Model(&teacher), &ctx.data.test)?,
        transfer: train::agreement(&student, on_transfer, &transfer)?,
    };
    info!(
        "stage `{name}`: agrees with its teacher on {:.2}% of the test set and {:.2}% of its transfer set; {} of its test errors are the teacher's too (the teacher makes {})",
        100.0 * fidelity.test.rate(),
        100.0 * fidelity.transfer.rate(),
        fidelity.test.shared_errors,
        fidelity.test.teacher_errors
    );
    record::trained(ctx, tables, name, "distill", &net, fit, started)?;
    record::fidelity(tables, name, fidelity);
    Ok(())
}

/// The training split without the classes a distill stage leaves out of its transfer set.
pub(super) fn transfer_set(ctx: &Ctx, stage: &str, spec: &DistillSpec) -> Result<Split> {
    let train = &ctx.data.train;
    if spec.transfer_exclude.is_empty() && spec.transfer_only.is_empty() {
        return Ok(train.view());
    }
    ctx.check_classes(stage, &spec.transfer_exclude)?;
    ctx.check_classes(stage, &spec.transfer_only)?;
    let listed = |classes: &[i64]| {
        let classes = Tensor::from_slice(classes).to(ctx.device);
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
pub(super) fn teacher_logits(
    ctx: &Ctx,
    source: &ModelSource,
    teacher: &Teacher,
    transfer: &Split,
    spec: &DistillSpec,
) -> Result<Tensor> {
    let members = networks(source)
        .iter()
        .zip(&teacher.members)
        .map(|(s, net)| network_logits(ctx, s, net, transfer, spec, &teacher.objective))
        .collect::<Result<Vec<_>>>()?;
    Ok(teacher.objective.ensemble_logits(&members)?)
}

pub(super) fn check_top_k(ctx: &Ctx, stage: &str, k: i64) -> Result<()> {
    if k >= ctx.data.num_classes {
        bail!("stage `{stage}`: teacher_top_k = {k} keeps every class (the data has {})", ctx.data.num_classes);
    }
    Ok(())
}

/// The teacher's top-`k` soft targets over the transfer set at its objective's T (see
/// [`Objective::top_k_targets`]), computed chunk by chunk so that no full `[n, classes]`
/// matrix is ever held, and cached on disk keyed by every member's checkpoint, the set, T
/// and k.
pub(super) fn teacher_top_k(
    ctx: &Ctx,
    source: &ModelSource,
    teacher: &Teacher,
    transfer: &Split,
    spec: &DistillSpec,
    k: i64,
) -> Result<TeacherTargets> {
    let t = teacher.objective.temperature().context("top-k targets are soft targets at a temperature")?;
    let mut parts: Vec<Vec<u8>> =
        networks(source).iter().map(|s| Ok(std::fs::read(ctx.source_path(s)?)?)).collect::<Result<_>>()?;
    let d = &ctx.exp.data;
    let identity =
        format!("top-k|{d:?}|{:?}|{:?}|{}|T{t}|k{k}", spec.transfer_exclude, spec.transfer_only, transfer.len());
    parts.push(identity.into_bytes());
    let key = content_key(&parts.iter().map(Vec::as_slice).collect::<Vec<_>>());
    let path = ctx.cache.join(format!("teacher-top{k}-{key}.safetensors"));
    let shape = [transfer.len(), k];
    let rows = [transfer.len()];
    let cached = read_cache(&path, &[("probs", &shape), ("classes", &shape), ("kept", &rows)])?;
    if let Some(mut cached) = cached {
        info!("teacher top-{k} soft targets over the transfer set read from {}", path.display());
        let kept = cached.pop().expect("three tensors");
        let classes = cached.pop().expect("three tensors").to(ctx.device);
        let probs = cached.pop().expect("three tensors").to(ctx.device);
        log_kept_mass(k, t, &kept)?;
        return Ok(TeacherTargets::top_k(probs, classes, t)?);
    }
    // Each rank its share of the transfer set, gathered in rank order; with each example's
    // share of the teacher's probability mass at T that its k classes keep.
    let world = crate::dist::world();
    let (first, n) = world.share(transfer.len());
    let top_k = |start: i64, len: i64| -> Result<(TeacherTargets, Tensor)> {
        let logits = teacher.logits(&transfer.range(start, len))?;
        let targets = teacher.objective.top_k_targets(&logits, k)?;
        let classes = targets.as_top_k().context("top-k targets")?.classes;
        let kept = kd_core::top_k_mass(&logits, classes, t)?.to_kind(Kind::Float);
        Ok((targets, kept))
    };
    let chunks = match n {
        0 => vec![top_k(0, 0)?],
        _ => train::in_chunks(n, EVAL_BATCH, |start, len| top_k(first + start, len))?,
    };
    let (chunks, kept): (Vec<TeacherTargets>, Vec<Tensor>) = chunks.into_iter().unzip();
    let mine = TeacherTargets::cat(&chunks)?;
    let mine = mine.as_top_k().context("top-k targets")?;
    let (probs, classes) =
        (world.gather_rows(mine.probs, transfer.len())?, world.gather_rows(mine.classes, transfer.len())?);
    let kept = world.gather_rows(&Tensor::cat(&kept, 0), transfer.len())?.to_device(Device::Cpu);
    let targets = TeacherTargets::top_k(probs, classes, t)?;
    let top = targets.as_top_k().context("top-k targets")?;
    write_cache(&path, &[("probs", top.probs), ("classes", top.classes), ("kept", &kept)])?;
    info!("teacher top-{k} soft targets over the transfer set cached in {}", path.display());
    log_kept_mass(k, t, &kept)?;
    Ok(targets)
}

/// Logs how much of the teacher's probability mass at T the top k keep over the transfer set
/// (`kept`: per example, before the renormalization), as `kd-run store targets` reports it for
/// a targets file.
fn log_kept_mass(k: i64, t: f64, kept: &Tensor) -> Result<()> {
    let mut histogram = crate::data::targets::MassHistogram::default();
    histogram.add(&Vec::<f32>::try_from(kept.to_kind(Kind::Float).view([-1]))?)?;
    if let Some(mass) = histogram.summary() {
        info!(
            "teacher top-{k} soft targets: share of the teacher's probability mass at T = {t} they keep over {} \
             transfer examples: {}",
            kept.size()[0],
            mass.describe()
        );
    }
    Ok(())
}

/// One network's logits over the transfer set, cached on disk by checkpoint and set (and,
/// averaged over translations, at the objective's temperature).
pub(super) fn network_logits(
    ctx: &Ctx,
    source: &ModelSource,
    teacher: &Mlp,
    transfer: &Split,
    spec: &DistillSpec,
    objective: &Objective,
) -> Result<Tensor> {
    let checkpoint = std::fs::read(ctx.source_path(source)?)?;
    let d = &ctx.exp.data;
    // The data settings (folder, limits, split, corpus), the class filters and the size;
    // averaged over translations, also their range and T.
    let mut identity = format!("{d:?}|{:?}|{:?}|{}", spec.transfer_exclude, spec.transfer_only, transfer.len());
    if let Some(n) = spec.translations {
        identity.push_str(&format!("|translations {n}|T{}", objective.ensemble_temperature()));
    }
    let key = content_key(&[&checkpoint, identity.as_bytes()]);
    let path = ctx.cache.join(format!("teacher-logits-{key}.safetensors"));
    let shape = [transfer.len(), ctx.data.num_classes];
    if let Some(cached) = read_cache(&path, &[("logits", &shape)])? {
        info!("teacher logits over the transfer set read from {}", path.display());
        return Ok(cached[0].to(ctx.device));
    }
    let logits = match (spec.translations, ctx.data.geometry) {
        (None, _) => train::logits(teacher, transfer, EVAL_BATCH)?,
        (Some(n), Some((rows, cols))) if n >= rows.min(cols) => {
            bail!("teacher_translations = {n} would move {rows} x {cols} images out of the frame")
        }
        (Some(n), Some(geometry)) => {
            info!("teacher soft targets averaged over {} translations of each image", (2 * n + 1).pow(2));
            train::translation_averaged_logits(teacher, transfer, EVAL_BATCH, geometry, n, objective)?
        }
        (Some(_), None) => bail!("`teacher_translations` needs images; this data has none"),
    };
    write_cache(&path, &[("logits", &logits)])?;
    info!("teacher logits over the transfer set cached in {}", path.display());
    Ok(logits)
}
