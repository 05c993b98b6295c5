//! Evaluate stages: a checkpoint (or another stage's model) scored on the test set.

use super::ctx::Ctx;
use super::record;
use super::tables::Tables;
use crate::config::EvaluateJob;
use anyhow::Result;
use std::time::Instant;

/// Runs an `evaluate` stage: loads the model its source names and records its scores.
pub(super) fn run(ctx: &Ctx, tables: &mut Tables, name: &str, job: &EvaluateJob, started: Instant) -> Result<()> {
    let (_vs, net) = ctx.load_model(&job.source)?;
    record::model(ctx, tables, name, "evaluate", &net.frozen(), started, None)
}
