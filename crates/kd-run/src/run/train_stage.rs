//! Train stages: a network trained on the labels alone (a teacher, or a baseline student).

use super::ctx::Ctx;
use super::fit::{self, Init, Sampling, StageFit};
use super::record;
use super::tables::Tables;
use crate::config::TrainJob;
use crate::train::Supervision;
use anyhow::Result;
use std::time::Instant;

/// Runs a `train` stage: a new network of the stage's model trained on the training split's
/// labels, then scored and recorded.
pub(super) fn run(ctx: &Ctx, tables: &mut Tables, name: &str, job: &TrainJob, started: Instant) -> Result<()> {
    let TrainJob { model, training } = job;
    let fit = StageFit {
        stage: name,
        init: Init::New(model),
        training,
        split: &ctx.data.train,
        sampling: Sampling::All,
        supervision: &Supervision::labels(),
        targets: &ctx.targets(),
    };
    let (_vs, net, fit) = fit::train(ctx, tables, &ctx.dir, fit)?;
    record::trained(ctx, tables, name, "train", &net, fit, started)
}
