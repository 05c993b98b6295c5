//! The seeded generators of kd-run's own draws (the synthetic speech corpus, the fuzzer),
//! independent of libtorch's generator, so that their sequences are the same everywhere.
#![cfg_attr(not(test), allow(dead_code))]

/// xoshiro256** seeded through SplitMix64; independent of libtorch's generator.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

/// One step of SplitMix64: advances `x` and returns the next output.
pub fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// The generator seeded with `seed` (its state from four SplitMix64 outputs).
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        Rng { s: [splitmix64(&mut x), splitmix64(&mut x), splitmix64(&mut x), splitmix64(&mut x)] }
    }

    /// An independent stream for (`seed`, `tag`, `index`).
    pub fn derive(seed: u64, tag: u64, index: u64) -> Self {
        let mut x = seed;
        let a = splitmix64(&mut x);
        let mut y = a ^ tag.wrapping_mul(0xD1B5_4A32_D192_ED03);
        let b = splitmix64(&mut y);
        let mut z = b ^ index.wrapping_mul(0xABC9_8388_FB8F_AC03);
        Rng::new(splitmix64(&mut z))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in the open interval (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// An index drawn in proportion to non-negative `weights` (not all zero).
    pub fn weighted(&mut self, weights: &[f64]) -> usize {
        let total: f64 = weights.iter().sum();
        let mut x = self.uniform() * total;
        for (i, &w) in weights.iter().enumerate() {
            if x < w {
                return i;
            }
            x -= w;
        }
        weights.iter().rposition(|&w| w > 0.0).unwrap_or(0)
    }

    /// Failures before the first success of a Bernoulli(`p`) sequence.
    pub fn geometric(&mut self, p: f64) -> usize {
        if p >= 1.0 {
            return 0;
        }
        (self.uniform().ln() / (1.0 - p).ln()).floor() as usize
    }

    /// Shuffles `v` in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_gives_the_reference_sequence() {
        // The first outputs for seed 0 of the reference implementation (Vigna, splitmix64.c).
        let mut x = 0u64;
        let got: Vec<u64> = (0..3).map(|_| splitmix64(&mut x)).collect();
        assert_eq!(got, [0xe220_a839_7b1d_cdaf, 0x6e78_9e6a_a1b9_65f4, 0x06c4_5d18_8009_454f]);
    }

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let draw = |mut r: Rng| (0..4).map(|_| r.next_u64()).collect::<Vec<_>>();
        assert_eq!(draw(Rng::new(7)), draw(Rng::new(7)));
        assert_ne!(draw(Rng::derive(7, 1, 0)), draw(Rng::derive(7, 1, 1)));
        assert_ne!(draw(Rng::derive(7, 1, 0)), draw(Rng::derive(7, 2, 0)));
        let mut r = Rng::new(3);
        for _ in 0..1000 {
            let u = r.uniform();
            assert!(u > 0.0 && u < 1.0);
            assert!(r.below(5) < 5);
        }
    }
}
