//! A seeded generator, so that every random choice of the crate follows from an explicit seed
//! and not from libtorch's process-global generator (which parallel tests share). The generator
//! is rand_xoshiro's SplitMix64 (the one kd-run's seeded draws also come from); this module adds
//! the few distributions the crate draws from.

use rand_core::{RngCore, SeedableRng};
use tch::{Kind, Tensor};

/// SplitMix64 (Steele, Lea & Flood 2014): `x += 0x9e3779b97f4a7c15`, then an avalanche mix.
#[derive(Clone, Debug)]
pub(crate) struct SplitMix64(rand_xoshiro::SplitMix64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64(rand_xoshiro::SplitMix64::seed_from_u64(seed))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `[0, 1)`, 53 random bits.
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` for `n >= 1` (Lemire's multiply-shift; bias below 2^-40 for n < 2^24).
    pub(crate) fn below(&mut self, n: i64) -> i64 {
        debug_assert!(n >= 1);
        ((self.next_u64() as u128 * n as u128) >> 64) as i64
    }

    /// In-place Fisher-Yates shuffle.
    pub(crate) fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = self.below(i as i64 + 1) as usize;
            xs.swap(i, j);
        }
    }
}

/// A CPU float tensor of the given shape with entries uniform in `[0, 1)` drawn from `seed`.
#[cfg(test)]
pub(crate) fn uniform(shape: &[i64], seed: u64) -> Tensor {
    let mut rng = SplitMix64::new(seed);
    let n: i64 = shape.iter().product();
    let values: Vec<f64> = (0..n).map(|_| rng.next_f64()).collect();
    Tensor::from_slice(&values).to_kind(Kind::Float).view(shape)
}

/// `count` uniform numbers in `[0, 1)` as a 1-D tensor of `kind` (CPU).
pub(crate) fn uniform_vector(rng: &mut SplitMix64, count: i64, kind: Kind) -> Tensor {
    let values: Vec<f64> = (0..count).map(|_| rng.next_f64()).collect();
    Tensor::from_slice(&values).to_kind(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_values_and_ranges() {
        // First outputs of SplitMix64 seeded with 0 (reference implementation by Vigna).
        let mut rng = SplitMix64::new(0);
        assert_eq!(rng.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(rng.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        let mut rng = SplitMix64::new(7);
        for _ in 0..1000 {
            let u = rng.next_f64();
            assert!((0.0..1.0).contains(&u));
            assert!((0..3).contains(&rng.below(3)));
        }
        let mut xs: Vec<i64> = (0..10).collect();
        rng.shuffle(&mut xs);
        let mut sorted = xs.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
    }
}
