//! Scoring a model and recording it: `summary.csv` and `class_errors.csv` rows for evaluate and
//! ensemble stages and for every trained model, each with what the model costs to run
//! (`run/cost.rs`).

use super::cost;
use super::ctx::device_name;
use super::ctx::Ctx;
use super::fit::Fit;
use super::output::{ClassErrorsRow, SummaryRow};
use super::tables::Tables;
use crate::train::{self, Evaluation};
use anyhow::{bail, Result};
use kd_models::Mlp;
use std::time::Instant;
use tch::{nn::ModuleT, Tensor};
use tracing::info;

/// How closely a distilled student follows its teacher: on the test set, and on the transfer set
/// it learned from.
pub(super) struct Fidelity {
    pub(super) test: train::Agreement,
    pub(super) transfer: train::Agreement,
}

/// [`model`] for a model a stage trained, with its accuracy on its training examples and the
/// seconds of its epochs before a resume.
pub(super) fn trained(
    ctx: &Ctx,
    tables: &mut Tables,
    stage: &str,
    kind: &str,
    net: &Mlp,
    fit: Fit,
    started: Instant,
) -> Result<()> {
    model(ctx, tables, stage, kind, net, started, None)?;
    if let Some(row) = tables.summary.iter_mut().rfind(|r| r.stage == stage) {
        row.train_accuracy = Some(fit.accuracy);
        row.seconds += fit.earlier_seconds;
    }
    Ok(())
}

/// Adds to a student's summary row how closely it follows its teacher on the test set and the
/// transfer set.
pub(super) fn fidelity(tables: &mut Tables, stage: &str, Fidelity { test, transfer }: Fidelity) {
    if let Some(row) = tables.summary.iter_mut().rfind(|r| r.stage == stage) {
        row.teacher_agreement = Some(test.rate());
        row.teacher_errors = Some(test.teacher_errors);
        row.shared_errors = Some(test.shared_errors);
        row.transfer_agreement = Some(transfer.rate());
    }
}

/// Evaluates `net` on the validation and test splits and records its summary and per-class rows.
pub(super) fn model(
    ctx: &Ctx,
    tables: &mut Tables,
    stage: &str,
    kind: &str,
    net: &Mlp,
    started: Instant,
    shift: Option<f64>,
) -> Result<()> {
    let model = Model {
        model: format!("mlp {}", net.config().describe()),
        parameters: net.num_params(),
        macs: net.forward_macs(),
    };
    let frozen = net.frozen();
    model_with(ctx, tables, stage, kind, model, &|x| Ok(frozen.forward_t(x, false)), started, shift)?;
    Ok(())
}

/// [`model`] for a model given as its description, sizes and `logits(x)`; returns
/// its evaluations on the validation split (if any) and the test split (with each example's
/// prediction). After the evaluation, the writing rank times `logits` on the test split's
/// first examples ([`cost::measure`]) for the row's inference columns.
#[allow(clippy::too_many_arguments)]
pub(super) fn model_with(
    ctx: &Ctx,
    tables: &mut Tables,
    stage: &str,
    kind: &str,
    Model { model, parameters, macs }: Model,
    logits: &dyn Fn(&Tensor) -> Result<Tensor>,
    started: Instant,
    shift: Option<f64>,
) -> Result<(Option<Evaluation>, Evaluation)> {
    let classes = ctx.data.num_classes;
    let val = match &ctx.data.validation {
        Some(v) => Some(train::evaluate_with(logits, v, None, classes)?),
        None => None,
    };
    let test = train::evaluate_with(logits, &ctx.data.test, None, classes)?;
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
    // Only the writing rank's row is written; the others need not spend the time.
    let speed = match crate::dist::world().is_writer() && test.examples > 0 {
        true => {
            let inputs = ctx.data.test.range(0, test.examples.min(cost::THROUGHPUT_BATCH));
            let speed = cost::measure(logits, &inputs, ctx.device)?;
            info!(
                "stage `{stage}`: {macs} multiply-adds per example; {:.0} examples/s at batch {}, {:.3} ms for one \
                 example",
                speed.examples_per_second, speed.batch, speed.latency_ms
            );
            Some(speed)
        }
        false => None,
    };
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
        device: device_name(ctx.device, tch::get_num_threads(), ctx.exp.precision),
        train_accuracy: None,
        teacher_agreement: None,
        teacher_errors: None,
        shared_errors: None,
        transfer_agreement: None,
        macs: Some(macs),
        inference_batch: speed.map(|s| s.batch),
        inference_examples_per_second: speed.map(|s| s.examples_per_second),
        latency_ms: speed.map(|s| s.latency_ms),
    });
    Ok((val, test))
}

/// A model as `summary.csv` describes it: its architecture in words, trainable parameters, and
/// multiply-adds of a forward pass per example.
pub(super) struct Model {
    pub model: String,
    pub parameters: i64,
    pub macs: i64,
}
