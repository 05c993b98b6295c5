//! Bias-shift stages (section 3's omitted-class experiment): the output biases of some classes
//! shifted by the amount with the fewest validation errors, and optionally by a fixed amount.

use super::ctx::Ctx;
use super::output::{self, ShiftRow};
use super::record;
use super::tables::Tables;
use crate::config::BiasShiftJob;
use crate::train;
use anyhow::{Context, Result};
use std::time::Instant;
use tch::{Kind, Tensor};
use tracing::info;

/// Adds each candidate shift to the output biases of `classes`, keeps the one with the
/// fewest validation errors (ties: the smallest in magnitude), and records the model with
/// it, and with `fixed` as the stage's variant `fixed`.
pub(super) fn run(ctx: &Ctx, tables: &mut Tables, stage: &str, job: &BiasShiftJob, started: Instant) -> Result<()> {
    let BiasShiftJob { source, classes, min, max, step, fixed } = job;
    let (min, max, step, fixed) = (*min, *max, *step, *fixed);
    ctx.check_classes(stage, classes)?;
    tables.forget(stage, 0);
    let (vs, net) = ctx.load_model(source)?;
    let mut bias = vs.variables().remove("output.bias").context("the model has no output.bias")?;
    let original = bias.detach().copy();
    let mut mask = Tensor::zeros([ctx.data.num_classes], (Kind::Float, ctx.device));
    let _ = mask.index_fill_(0, &Tensor::from_slice(classes).to(ctx.device), 1.0);
    let validation = ctx.data.validation.as_ref().context("bias shifts are chosen on the validation split")?;
    let mut set = |shift: f64| tch::no_grad(|| bias.copy_(&(&original + &mask * shift)));
    let steps = ((max - min) / step + 1e-9).floor() as i64;
    let mut best: Option<(i64, f64)> = None;
    for i in 0..=steps {
        // Rounded so that 0.1 steps read 2.4, not 2.4000000000000004.
        let shift = ((min + i as f64 * step) * 1e9).round() / 1e9;
        set(shift);
        let errors = train::evaluate(&net, validation, ctx.data.num_classes)?.errors;
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
    record::model(ctx, tables, stage, "bias_shift", &net, started, Some(chosen))?;
    if let Some(f) = fixed {
        set(f);
        let (summary, class_errors) = (tables.summary.len(), tables.class_errors.len());
        let label = output::row_label(stage, output::FIXED);
        record::model(ctx, tables, &label, "bias_shift", &net, started, Some(f))?;
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
