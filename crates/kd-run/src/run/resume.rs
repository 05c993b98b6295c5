//! The progress part of a stage's per-epoch checkpoint (`<stage>.resume.safetensors`): the
//! epochs finished and early stopping's best epoch, stored as tensors beside the weights and the
//! optimizer state so that one atomic write saves all of it.

use crate::train::stopping::Best;
use anyhow::{bail, Context, Result};
use std::path::Path;
use tch::Tensor;

/// Names of the progress entries in a resume checkpoint; none is a weight's or optimizer's.
const PREFIX: &str = "__progress__.";
const EPOCH: &str = "__progress__.epoch";
const BEST: &str = "__progress__.best";

/// Where a stage stopped: the epochs it finished and its best validation epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub epochs_done: i64,
    pub best: Option<Best>,
}

impl Progress {
    /// The entries to save with the weights and the optimizer state.
    pub fn to_tensors(self) -> Vec<(String, Tensor)> {
        let mut out = vec![(EPOCH.to_string(), Tensor::from_slice(&[self.epochs_done]))];
        if let Some(b) = self.best {
            out.push((BEST.to_string(), Tensor::from_slice(&[b.errors, b.epoch])));
        }
        out
    }

    /// Splits a resume checkpoint `path`'s entries into its progress and the rest (weights and
    /// optimizer state).
    pub fn split(path: &Path, named: Vec<(String, Tensor)>) -> Result<(Progress, Vec<(String, Tensor)>)> {
        let epoch = named
            .iter()
            .find(|(k, _)| k == EPOCH)
            .with_context(|| format!("{}: a resume checkpoint without `{EPOCH}`", path.display()))?;
        let epochs_done = i64::try_from(&epoch.1).with_context(|| format!("{}: `{EPOCH}`", path.display()))?;
        let best = match named.iter().find(|(k, _)| k == BEST) {
            None => None,
            Some((_, b)) => match Vec::<i64>::try_from(b)?.as_slice() {
                &[errors, epoch] => Some(Best { errors, epoch }),
                other => {
                    bail!("{}: `{BEST}` should hold 2 numbers (errors, epoch), not {}", path.display(), other.len())
                }
            },
        };
        let rest = named.into_iter().filter(|(k, _)| !k.starts_with(PREFIX)).collect();
        Ok((Progress { epochs_done, best }, rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_round_trips_and_leaves_the_other_entries() {
        let path = Path::new("x.resume.safetensors");
        for best in [None, Some(Best { errors: 12, epoch: 3 })] {
            let progress = Progress { epochs_done: 7, best };
            let mut named = vec![("output.weight".to_string(), Tensor::zeros([2, 2], tch::kind::FLOAT_CPU))];
            named.extend(progress.to_tensors());
            let (back, rest) = Progress::split(path, named).unwrap();
            assert_eq!(back, progress);
            assert_eq!(rest.len(), 1);
            assert_eq!(rest[0].0, "output.weight");
        }
    }

    #[test]
    fn a_checkpoint_without_epoch_or_with_a_bad_best_is_an_error_naming_it() {
        let path = Path::new("x.resume.safetensors");
        let e = Progress::split(path, vec![]).unwrap_err().to_string();
        assert!(e.contains("x.resume.safetensors") && e.contains("epoch"), "{e}");
        let named = vec![
            (EPOCH.to_string(), Tensor::from_slice(&[1i64])),
            (BEST.to_string(), Tensor::from_slice(&[1i64, 2, 3])),
        ];
        let e = Progress::split(path, named).unwrap_err().to_string();
        assert!(e.contains("2 numbers") && e.contains("not 3"), "{e}");
    }
}
