//! Ensemble stages: the members' mean distribution at T = 1, scored like a model.

use super::ctx::Ctx;
use super::record::{self, Model};
use super::tables::Tables;
use crate::config::ModelSource;
use anyhow::Result;
use kd_core::Objective;
use kd_models::Mlp;
use std::time::Instant;
use tch::Tensor;

/// An ensemble stage: its members' mean distribution at T = 1, scored like a model.
pub(super) fn run(ctx: &Ctx, tables: &mut Tables, name: &str, members: &[ModelSource], started: Instant) -> Result<()> {
    // Evaluated on its own: the mean of the members' distributions at T = 1.
    let ensemble = ctx.load_teacher(&ModelSource::ensemble(name, members), Objective::hard_labels())?;
    let first = ensemble.members[0].config().describe();
    let same = ensemble.members.iter().all(|m| m.config().describe() == first);
    let model = format!("ensemble of {} x mlp {}", ensemble.members.len(), if same { first } else { "(mixed)".into() });
    // Every member runs on every example: the ensemble costs the sum of its members.
    let parameters = ensemble.members.iter().map(Mlp::num_params).sum();
    let macs = ensemble.members.iter().map(Mlp::forward_macs).sum();
    let logits = |x: &Tensor| ensemble.logits(x);
    record::model_with(ctx, tables, name, "ensemble", Model { model, parameters, macs }, &logits, started, None)?;
    Ok(())
}
