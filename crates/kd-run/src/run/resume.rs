//! The progress part of a stage's resume checkpoint (`<stage>.resume.safetensors`): the epochs
//! finished and early stopping's best epoch, and for a checkpoint inside an epoch where in it
//! the stage stood (the epoch's accounting, [`EpochPosition`]) and the states of libtorch's
//! generators; stored as tensors beside the weights and the optimizer state so that one atomic
//! write saves all of it.

use crate::train::stopping::Best;
use crate::train::EpochPosition;
use anyhow::{bail, Context, Result};
use std::path::Path;
use tch::Tensor;

/// Names of the progress entries in a resume checkpoint; none is a weight's or optimizer's.
const PREFIX: &str = "__progress__.";
const EPOCH: &str = "__progress__.epoch";
const BEST: &str = "__progress__.best";
const STEP: &str = "__progress__.step";
const SUMS: &str = "__progress__.sums";
const RNG_CPU: &str = "__progress__.rng_cpu";
const RNG_CUDA: &str = "__progress__.rng_cuda";

/// Where a stage stopped: the epochs it finished, its best validation epoch, and, for a
/// checkpoint inside epoch `epochs_done`, the position in it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    pub epochs_done: i64,
    pub best: Option<Best>,
    pub position: Option<EpochPosition>,
}

/// The states of libtorch's default generators: the CPU's, and the training GPU's.
pub struct Generators {
    pub cpu: Tensor,
    pub cuda: Option<Tensor>,
}

impl Generators {
    /// The states now (the GPU's of `device` when it is one).
    pub fn now(device: tch::Device) -> Result<Generators> {
        use kd_native::rng::{generator_state, GeneratorDevice};
        let cpu = generator_state(GeneratorDevice::Cpu)?;
        let cuda = match device {
            tch::Device::Cuda(i) => Some(generator_state(GeneratorDevice::Cuda(i))?),
            _ => None,
        };
        Ok(Generators { cpu, cuda })
    }

    /// Sets the generators to these states (the GPU's of `device` when it is one).
    pub fn restore(&self, device: tch::Device, path: &Path) -> Result<()> {
        use kd_native::rng::{set_generator_state, GeneratorDevice};
        set_generator_state(GeneratorDevice::Cpu, &self.cpu)
            .with_context(|| format!("{}: the CPU generator's state", path.display()))?;
        match (device, &self.cuda) {
            (tch::Device::Cuda(i), Some(state)) => set_generator_state(GeneratorDevice::Cuda(i), state)
                .with_context(|| format!("{}: the GPU generator's state", path.display()))?,
            (tch::Device::Cuda(_), None) => {
                bail!("{}: saved on the CPU, inside an epoch: resume it on the CPU", path.display())
            }
            _ => {}
        }
        Ok(())
    }

    fn to_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(RNG_CPU.to_string(), self.cpu.shallow_clone())];
        if let Some(c) = &self.cuda {
            out.push((RNG_CUDA.to_string(), c.shallow_clone()));
        }
        out
    }
}

impl Point {
    /// The entries to save with the weights and the optimizer state (and, inside an epoch, the
    /// generators' states).
    pub fn to_tensors(self, generators: Option<&Generators>) -> Vec<(String, Tensor)> {
        let mut out = vec![(EPOCH.to_string(), Tensor::from_slice(&[self.epochs_done]))];
        if let Some(b) = self.best {
            out.push((BEST.to_string(), Tensor::from_slice(&[b.errors, b.epoch])));
        }
        if let Some(p) = self.position {
            // Absent sums are flagged in the integers (the values stay finite: a checkpoint with
            // a NaN is refused as a diverged one).
            let ints = [
                p.step as i64,
                p.seen,
                p.first_batch,
                p.correct,
                p.kl_sum.is_some().into(),
                p.reference.is_some().into(),
            ];
            out.push((STEP.to_string(), Tensor::from_slice(&ints)));
            let f = [p.loss_sum, p.kl_sum.unwrap_or(0.0), p.reference.unwrap_or(0.0)];
            out.push((SUMS.to_string(), Tensor::from_slice(&f)));
        }
        if let Some(g) = generators {
            out.extend(g.to_tensors());
        }
        out
    }

    /// The generators' states of a checkpoint inside an epoch, from its entries.
    pub fn generators(path: &Path, named: &[(String, Tensor)]) -> Result<Generators> {
        let get = |k: &str| named.iter().find(|(n, _)| n == k).map(|(_, t)| t.shallow_clone());
        let cpu = get(RNG_CPU)
            .with_context(|| format!("{}: a checkpoint inside an epoch without `{RNG_CPU}`", path.display()))?;
        Ok(Generators { cpu, cuda: get(RNG_CUDA) })
    }

    /// Splits a resume checkpoint `path`'s entries into its progress and the rest (weights and
    /// optimizer state).
    pub fn split(path: &Path, named: Vec<(String, Tensor)>) -> Result<(Point, Vec<(String, Tensor)>)> {
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
        let position = match named.iter().find(|(k, _)| k == STEP) {
            None => None,
            Some((_, ints)) => {
                let ints = Vec::<i64>::try_from(ints).with_context(|| format!("{}: `{STEP}`", path.display()))?;
                let sums = named.iter().find(|(k, _)| k == SUMS).map(|(_, t)| Vec::<f64>::try_from(t)).transpose();
                let sums = sums.with_context(|| format!("{}: `{SUMS}`", path.display()))?.unwrap_or_default();
                match (ints.as_slice(), sums.as_slice()) {
                    (&[step, seen, first_batch, correct, has_kl, has_reference], &[loss_sum, kl, reference])
                        if step > 0 && seen > 0 =>
                    {
                        Some(EpochPosition {
                            step: step as usize,
                            seen,
                            first_batch,
                            loss_sum,
                            correct,
                            kl_sum: (has_kl != 0).then_some(kl),
                            reference: (has_reference != 0).then_some(reference),
                        })
                    }
                    _ => bail!(
                        "{}: `{STEP}` and `{SUMS}` should hold 6 and 3 numbers with a step > 0, not {ints:?} and \
                         {sums:?}",
                        path.display()
                    ),
                }
            }
        };
        let rest = named.into_iter().filter(|(k, _)| !k.starts_with(PREFIX)).collect();
        Ok((Point { epochs_done, best, position }, rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_round_trips_and_leaves_the_other_entries() {
        let path = Path::new("x.resume.safetensors");
        let position = EpochPosition {
            step: 3,
            seen: 300,
            first_batch: 100,
            loss_sum: 12.5,
            correct: 211,
            kl_sum: None,
            reference: Some(2.25),
        };
        for (best, position) in [(None, None), (Some(Best { errors: 12, epoch: 3 }), Some(position))] {
            let progress = Point { epochs_done: 7, best, position };
            let mut named = vec![("output.weight".to_string(), Tensor::zeros([2, 2], tch::kind::FLOAT_CPU))];
            named.extend(progress.to_tensors(None));
            let (back, rest) = Point::split(path, named).unwrap();
            assert_eq!(back, progress);
            assert_eq!(rest.len(), 1);
            assert_eq!(rest[0].0, "output.weight");
        }
    }

    #[test]
    fn a_checkpoint_without_epoch_or_with_a_bad_best_is_an_error_naming_it() {
        let path = Path::new("x.resume.safetensors");
        let e = Point::split(path, vec![]).unwrap_err().to_string();
        assert!(e.contains("x.resume.safetensors") && e.contains("epoch"), "{e}");
        let named = vec![
            (EPOCH.to_string(), Tensor::from_slice(&[1i64])),
            (BEST.to_string(), Tensor::from_slice(&[1i64, 2, 3])),
        ];
        let e = Point::split(path, named).unwrap_err().to_string();
        assert!(e.contains("2 numbers") && e.contains("not 3"), "{e}");
    }
}
