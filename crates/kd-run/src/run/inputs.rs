//! What an experiment reads, checked before anything is written.

use crate::config::{Experiment, Job, ModelSource};
use anyhow::{Context, Result};

/// Checks that every file the experiment reads exists and can be opened for reading: its data
/// (`data::check_inputs`) and the checkpoint files its stages name. `validate` and `run` call it
/// before anything is created, so that a missing file is reported before a run directory
/// exists; the files' contents are checked when they are read.
pub fn check_inputs(exp: &Experiment) -> Result<()> {
    crate::data::check_inputs(&exp.data)?;
    for stage in &exp.stages {
        let sources: Vec<&ModelSource> = match &stage.job {
            Job::Train(_) | Job::Ensemble(_) => vec![],
            Job::Distill(j) => vec![&j.distill.teacher],
            Job::Evaluate(j) => vec![&j.source],
            Job::BiasShift(j) => vec![&j.source],
            Job::Clusters(j) => vec![&j.source],
            Job::Specialists(j) => vec![&j.source],
        };
        for source in sources {
            if let ModelSource::Checkpoint(path) | ModelSource::PinnedCheckpoint { path, .. } = source {
                let key = if matches!(stage.job, Job::Distill(_)) { "teacher_checkpoint" } else { "checkpoint" };
                crate::inputs::check_file(path, "checkpoint")
                    .and_then(|()| {
                        std::fs::File::open(path)
                            .map(drop)
                            .with_context(|| format!("cannot read checkpoint {}", path.display()))
                    })
                    .with_context(|| format!("stage `{}`: {key}", stage.name))?;
            }
        }
    }
    Ok(())
}
