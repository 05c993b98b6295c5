//! What a model costs to run, the other half of what distillation trades: its multiply-adds per
//! example (a closed form from the layer sizes, [`kd_models::Mlp::forward_macs`]), and its
//! measured inference speed on the run's device, examples per second at a large batch and the
//! latency of one example alone. Every model a run records gets both in `summary.csv`
//! (`macs`, `inference_batch`, `inference_examples_per_second`, `latency_ms`), measured right
//! after its evaluation by [`measure`].

use anyhow::Result;
use std::time::{Duration, Instant};
use tch::{Device, Tensor};

/// The batch of the throughput measurement (or the whole test split, if smaller).
pub const THROUGHPUT_BATCH: i64 = 1024;

/// A model's measured inference speed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Speed {
    /// Examples per call of the throughput measurement.
    pub batch: i64,
    /// `batch / t`, `t` the median seconds of a call at `batch`.
    pub examples_per_second: f64,
    /// The median milliseconds of a call on one example.
    pub latency_ms: f64,
}

/// How often a call is timed: `warm_up` untimed calls, then at least `min` timed ones, and more,
/// up to `max`, while the timed ones have taken less than `budget` in all.
#[derive(Clone, Copy, Debug)]
pub struct Repeats {
    pub warm_up: usize,
    pub min: usize,
    pub max: usize,
    pub budget: Duration,
}

/// At a large batch: each call is long, a few suffice.
pub const THROUGHPUT_REPEATS: Repeats = Repeats { warm_up: 1, min: 3, max: 9, budget: Duration::from_millis(300) };
/// One example: each call is short and noisy, so many.
pub const LATENCY_REPEATS: Repeats = Repeats { warm_up: 3, min: 5, max: 200, budget: Duration::from_millis(100) };

/// The median seconds of `call` on `device`, each call timed up to the end of the work it queued
/// (a GPU's stream is synchronized before the clock is read).
pub fn median_seconds(call: &mut dyn FnMut() -> Result<()>, device: Device, repeats: Repeats) -> Result<f64> {
    for _ in 0..repeats.warm_up {
        call()?;
    }
    crate::device::synchronize(device);
    let mut times = Vec::with_capacity(repeats.min);
    let started = Instant::now();
    while times.len() < repeats.min.max(1) || (times.len() < repeats.max && started.elapsed() < repeats.budget) {
        let t = Instant::now();
        call()?;
        crate::device::synchronize(device);
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Times a model given as `logits(x)` on `inputs` (`[n, d]` on `device`, n >= 1; the first
/// `min(n, THROUGHPUT_BATCH)` rows make the large batch, the first row the single example),
/// without gradients: the median of a few calls after a warm-up for each batch size.
pub fn measure(logits: &dyn Fn(&Tensor) -> Result<Tensor>, inputs: &Tensor, device: Device) -> Result<Speed> {
    let n = inputs.size().first().copied().unwrap_or(0);
    anyhow::ensure!(n >= 1, "no examples to time the model on");
    let _guard = tch::no_grad_guard();
    let batch = n.min(THROUGHPUT_BATCH);
    let (large, one) = (inputs.narrow(0, 0, batch), inputs.narrow(0, 0, 1));
    let throughput = median_seconds(&mut || logits(&large).map(drop), device, THROUGHPUT_REPEATS)?;
    let latency = median_seconds(&mut || logits(&one).map(drop), device, LATENCY_REPEATS)?;
    Ok(Speed { batch, examples_per_second: batch as f64 / throughput.max(1e-12), latency_ms: 1e3 * latency })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn the_median_counts_the_warm_up_apart_and_respects_the_bounds() {
        // Nothing slow: the budget is not reached, so `max` timed calls after the warm-up.
        let calls = Cell::new(0);
        let repeats = Repeats { warm_up: 2, min: 3, max: 7, budget: Duration::from_secs(60) };
        let mut count = || {
            calls.set(calls.get() + 1);
            Ok(())
        };
        median_seconds(&mut count, Device::Cpu, repeats).unwrap();
        assert_eq!(calls.get(), 2 + 7);
        // A budget already spent: `min` timed calls all the same.
        calls.set(0);
        let repeats = Repeats { budget: Duration::ZERO, ..repeats };
        median_seconds(&mut count, Device::Cpu, repeats).unwrap();
        assert_eq!(calls.get(), 2 + 3);
        // The median of the timed calls: one slow call of five does not move it.
        calls.set(0);
        let repeats = Repeats { warm_up: 0, min: 5, max: 5, budget: Duration::ZERO };
        let slow_first = &mut || {
            calls.set(calls.get() + 1);
            std::thread::sleep(Duration::from_millis(if calls.get() == 1 { 200 } else { 1 }));
            Ok(())
        };
        let median = median_seconds(slow_first, Device::Cpu, repeats).unwrap();
        assert!((0.001..0.1).contains(&median), "{median}");
    }

    #[test]
    fn a_model_is_timed_on_its_large_batch_and_on_one_example() {
        let inputs = Tensor::ones([40, 3], (tch::Kind::Float, Device::Cpu));
        let sizes = std::cell::RefCell::new(Vec::new());
        let logits = |x: &Tensor| {
            sizes.borrow_mut().push(x.size()[0]);
            Ok(x.sum_dim_intlist(1, true, tch::Kind::Float))
        };
        let speed = measure(&logits, &inputs, Device::Cpu).unwrap();
        assert_eq!(speed.batch, 40, "the whole split when it is smaller than THROUGHPUT_BATCH");
        assert!(speed.examples_per_second > 0.0 && speed.latency_ms > 0.0, "{speed:?}");
        let sizes = sizes.borrow().clone();
        let large = sizes.iter().filter(|&&s| s == 40).count();
        assert!(large >= THROUGHPUT_REPEATS.warm_up + THROUGHPUT_REPEATS.min, "{sizes:?}");
        assert!(sizes.iter().all(|&s| s == 40 || s == 1) && sizes.len() - large >= LATENCY_REPEATS.min);
        let empty = Tensor::ones([0, 3], (tch::Kind::Float, Device::Cpu));
        assert!(measure(&logits, &empty, Device::Cpu).is_err());
    }
}
