//! The objective of a stage, resolved once from its experiment-file settings.

use crate::config::{self, DistillSpec};
use anyhow::{Context, Result};
use kd_core::{LossWeights, Objective};

/// A distill stage's objective: soft targets at its temperature with its hard and soft
/// weights, or logit matching with those weights. The only place a stage's temperature is read
/// for training; everything downstream (the teacher's ensemble, cached targets and their cache
/// keys, the loss) asks the objective.
pub fn resolve(spec: &DistillSpec) -> Result<Objective> {
    let weights = LossWeights { hard: spec.hard_weight, soft: spec.soft_weight };
    let objective = match spec.objective {
        config::Objective::Soft => Objective::soft_targets(spec.temperature, weights),
        config::Objective::Logits => Objective::logit_matching(weights),
    };
    objective.context("the distillation objective")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelSource;

    fn spec(objective: config::Objective, temperature: f64, hard_weight: f64) -> DistillSpec {
        DistillSpec {
            teacher: ModelSource::Stage("t".into()),
            objective,
            temperature,
            hard_weight,
            soft_weight: 1.0 - hard_weight,
            transfer_exclude: vec![],
            transfer_only: vec![],
            top_k: None,
            translations: None,
        }
    }

    #[test]
    fn the_objective_carries_the_stages_temperature_and_weights() {
        let soft = resolve(&spec(config::Objective::Soft, 8.0, 0.25)).unwrap();
        assert_eq!(soft.temperature(), Some(8.0));
        assert_eq!(soft.weights(), LossWeights { hard: 0.25, soft: 0.75 });
        // Logit matching has no temperature (the file's placeholder 1 is not read).
        let logits = resolve(&spec(config::Objective::Logits, 1.0, 0.0)).unwrap();
        assert_eq!((logits.temperature(), logits.ensemble_temperature()), (None, 1.0));
        assert!(resolve(&spec(config::Objective::Soft, 0.0, 0.0)).is_err());
    }
}
