//! A specialist's classes, its local label space and its training sample.
//!
//! A specialist for the subset `S` (sorted class ids `s_0 < s_1 < ... < s_{|S|-1}` of `N`)
//! predicts `|S| + 1` classes: local class `j < |S|` is `s_j`, and local class `|S|` is the
//! dustbin, which stands for every class outside `S`:
//!
//! ```text
//! local(y) = j    if y = s_j
//!          = |S|  if y not in S        (dustbin)
//! ```
//!
//! Its training data is half examples of `S` and half examples of the rest (paper, section 5).
//! Sampling changes the class prior: if the subset's share of the data is `f`, subset classes
//! are weighted by `w_in = 0.5 / f` and the others by `w_out = 0.5 / (1 - f)`, so the trained
//! specialist's logits are `log p(y|x) + log w(y)` up to a constant. "After training, its
//! dustbin logit is raised by the log of the factor by which the subset was oversampled":
//! raising the dustbin logit by `ln(w_in / w_out)` removes the shift exactly, which is why
//! [`balanced_indices`] returns the factor `w_in / w_out = (1 - f) / f` relative to the rest.

use tch::{Device, Kind, Tensor};

use crate::error::{bad, int_vector, Result};
use crate::rng::SplitMix64;

/// A specialist's classes: sorted, distinct class ids out of `num_classes`, plus the dustbin.
///
/// # Example
/// ```
/// use kd_specialists::ClassSubset;
/// use tch::Tensor;
///
/// let s = ClassSubset::new([7, 2, 5], 10).unwrap();
/// assert_eq!(s.classes(), [2, 5, 7]);
/// assert_eq!((s.len(), s.dustbin(), s.output_width()), (3, 3, 4));
/// let local = s.to_local(&Tensor::from_slice(&[5i64, 0, 7, 2])).unwrap();
/// assert_eq!(Vec::<i64>::try_from(local).unwrap(), [1, 3, 2, 0]);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClassSubset {
    classes: Vec<i64>,
    num_classes: i64,
}

impl ClassSubset {
    /// The subset of `num_classes` classes made of `classes`, in any order; fails naming the
    /// argument if `classes` is empty, has a duplicate, or has a class outside `[0, num_classes)`.
    /// A subset may hold every class (its dustbin then stands for nothing).
    pub fn new(classes: impl Into<Vec<i64>>, num_classes: i64) -> Result<Self> {
        let mut classes = classes.into();
        if num_classes < 1 {
            return Err(bad("num_classes", format!("must be >= 1, got {num_classes}")));
        }
        if classes.is_empty() {
            return Err(bad("classes", "is empty: a specialist needs at least one class"));
        }
        classes.sort_unstable();
        if let Some(w) = classes.windows(2).find(|w| w[0] == w[1]) {
            return Err(bad("classes", format!("lists class {} twice", w[0])));
        }
        if let Some(c) = classes.iter().find(|&&c| !(0..num_classes).contains(&c)) {
            return Err(bad("classes", format!("holds class {c}, outside [0, num_classes = {num_classes})")));
        }
        Ok(ClassSubset { classes, num_classes })
    }

    /// The classes, sorted ascending.
    pub fn classes(&self) -> &[i64] {
        &self.classes
    }

    /// Number of classes `N` of the full label space.
    pub fn num_classes(&self) -> i64 {
        self.num_classes
    }

    /// Number of classes in the subset, `|S|` (at least 1).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> i64 {
        self.classes.len() as i64
    }

    /// Local index of the dustbin class, `|S|`.
    pub fn dustbin(&self) -> i64 {
        self.len()
    }

    /// Width of the specialist's output layer, `|S| + 1`.
    pub fn output_width(&self) -> i64 {
        self.len() + 1
    }

    /// Whether `class` is in the subset.
    pub fn contains_class(&self, class: i64) -> bool {
        self.classes.binary_search(&class).is_ok()
    }

    /// The local index of `class`: `Some(j)` if `class = s_j`, `None` if it is outside the subset.
    pub fn local_index(&self, class: i64) -> Option<i64> {
        self.classes.binary_search(&class).ok().map(|j| j as i64)
    }

    /// The classes outside the subset, sorted ascending (the ones the dustbin stands for).
    pub fn complement(&self) -> Vec<i64> {
        (0..self.num_classes).filter(|&c| !self.contains_class(c)).collect()
    }

    /// `[N]` int64 lookup table `local(y)` on `device`.
    fn lookup_table(&self, device: Device) -> Tensor {
        let mut table = vec![self.dustbin(); self.num_classes as usize];
        for (j, &c) in self.classes.iter().enumerate() {
            table[c as usize] = j as i64;
        }
        Tensor::from_slice(&table).to_device(device)
    }

    /// Maps int64 labels of the full label space (any shape) to local labels: `s_j -> j`,
    /// any other class -> [`dustbin`](Self::dustbin). Runs on the labels' device through an
    /// `[N]` lookup table. Labels must lie in `[0, N)`; libtorch checks this on the CPU.
    pub fn to_local(&self, labels: &Tensor) -> Result<Tensor> {
        let kind = labels.f_kind()?;
        if kind != Kind::Int64 {
            return Err(bad("labels", format!("must be an int64 tensor of class ids, got dtype {kind:?}")));
        }
        Ok(self.lookup_table(labels.device()).f_take(labels)?)
    }

    /// A distribution over all `N` classes seen in the specialist's label space, eq. 5's
    /// `D_m(q)`: `[B, |S| + 1]`, `q` on the subset's classes in order, then the sum of `q`
    /// over every other class as the dustbin, for `probs: [B, N]` float. The dustbin column
    /// is `1 - sum_S q` (clamped at 0), exact for rows that sum to one.
    ///
    /// ```
    /// use kd_specialists::ClassSubset;
    /// use tch::Tensor;
    ///
    /// let s = ClassSubset::new([2, 0], 4).unwrap();
    /// let q = Tensor::from_slice(&[0.1f32, 0.2, 0.3, 0.4]).view([1, 4]);
    /// let d = s.merge_outside(&q).unwrap();
    /// let d = Vec::<f32>::try_from(d.view([-1])).unwrap();
    /// assert!((d[0] - 0.1).abs() < 1e-6 && (d[1] - 0.3).abs() < 1e-6 && (d[2] - 0.6).abs() < 1e-6);
    /// ```
    pub fn merge_outside(&self, probs: &Tensor) -> Result<Tensor> {
        let size = probs.size();
        if size.len() != 2 || size[1] != self.num_classes {
            return Err(bad(
                "probs",
                format!("must be [B, {}] (the full label space), got {size:?}", self.num_classes),
            ));
        }
        let inside = probs.f_index_select(1, &Tensor::from_slice(&self.classes).to_device(probs.device()))?;
        let outside = (inside.sum_dim_intlist(1, true, inside.kind()).neg() + 1.0).clamp_min(0.0);
        Ok(Tensor::cat(&[inside, outside], 1))
    }

    /// Boolean mask of the labels' shape: whether each label is in the subset.
    ///
    /// ```
    /// use kd_specialists::ClassSubset;
    /// use tch::Tensor;
    ///
    /// let s = ClassSubset::new([1, 3], 4).unwrap();
    /// let mask = s.contains(&Tensor::from_slice(&[0i64, 1, 2, 3])).unwrap();
    /// assert_eq!(Vec::<bool>::try_from(mask).unwrap(), [false, true, false, true]);
    /// ```
    pub fn contains(&self, labels: &Tensor) -> Result<Tensor> {
        Ok(self.to_local(labels)?.lt(self.dustbin()))
    }
}

/// Indices of a specialist's training sample, and the factor by which it oversamples the subset.
///
/// Draws `n` indices into `labels: [num_examples]` (int64 class ids): `n / 2` (rounded down)
/// uniformly with replacement among the examples whose label is in `subset`, the other
/// `n - n / 2` among the rest, shuffled together; `[n]` int64 on the labels' device. Every
/// random choice follows from `seed`. The factor is
///
/// ```text
/// factor = (n_in / n_out) / (count_in / count_out)     (= (1 - f) / f for even n, f = count_in / num_examples)
/// ```
///
/// the factor by which the subset's odds against the rest were raised; pass it to
/// [`dustbin_logit_shift`] after training. (Measuring the subset's oversampling against the
/// natural frequency alone, `0.5 / f`, would leave the dustbin about `ln 2` too low for small
/// subsets: the rest is undersampled by `0.5 / (1 - f)` at the same time.)
///
/// Needs `n >= 2` and at least one example inside and one outside the subset. Reads the mask of
/// the labels back once.
///
/// # Example
/// ```
/// use kd_specialists::{balanced_indices, ClassSubset};
/// use tch::Tensor;
///
/// // 2 examples of class 0 among 10: f = 0.2, factor = 0.8 / 0.2 = 4.
/// let labels = Tensor::from_slice(&[0i64, 1, 2, 1, 0, 2, 1, 2, 1, 2]);
/// let subset = ClassSubset::new([0], 3).unwrap();
/// let (idx, factor) = balanced_indices(&labels, &subset, 8, 42).unwrap();
/// assert_eq!(factor, 4.0);
/// let picked = labels.index_select(0, &idx);
/// assert_eq!(i64::try_from(picked.eq(0).sum(tch::Kind::Int64)).unwrap(), 4);
/// ```
pub fn balanced_indices(labels: &Tensor, subset: &ClassSubset, n: i64, seed: u64) -> Result<(Tensor, f64)> {
    let len = int_vector("labels", labels)?;
    if n < 2 {
        return Err(bad("n", format!("must be >= 2 (half inside the subset, half outside), got {n}")));
    }
    let mask = subset.contains(labels)?;
    let inside = mask.nonzero().squeeze_dim(1);
    let outside = mask.logical_not().nonzero().squeeze_dim(1);
    let (count_in, count_out) = (inside.size()[0], outside.size()[0]);
    if count_in == 0 {
        return Err(bad("labels", format!("none of the {len} labels is in the subset {:?}", subset.classes())));
    }
    if count_out == 0 {
        return Err(bad("labels", format!("all {len} labels are in the subset: no examples for the dustbin")));
    }
    let (n_in, n_out) = (n / 2, n - n / 2);
    let mut rng = SplitMix64::new(seed);
    let mut picks: Vec<i64> = (0..n_in).map(|_| rng.below(count_in)).collect();
    picks.extend((0..n_out).map(|_| count_in + rng.below(count_out)));
    rng.shuffle(&mut picks);
    let pool = Tensor::cat(&[inside, outside], 0);
    let indices = pool.f_index_select(0, &Tensor::from_slice(&picks).to_device(labels.device()))?;
    let factor = (n_in as f64 / n_out as f64) / (count_in as f64 / count_out as f64);
    Ok((indices, factor))
}

/// The paper's correction of a specialist trained on an oversampled subset: "after training,
/// its dustbin logit is raised by the log of the factor by which the subset was oversampled",
/// `shift = ln(factor)` (negative if the subset was undersampled, NaN if `factor <= 0`). Apply
/// it with [`raise_dustbin`](crate::raise_dustbin).
///
/// ```
/// use kd_specialists::dustbin_logit_shift;
///
/// assert_eq!(dustbin_logit_shift(1.0), 0.0);
/// assert!((dustbin_logit_shift(49.0) - 49f64.ln()).abs() < 1e-15);
/// ```
pub fn dustbin_logit_shift(factor: f64) -> f64 {
    factor.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn construction_sorts_and_validates() {
        let s = ClassSubset::new(vec![4, 0, 2], 5).unwrap();
        assert_eq!(s.classes(), [0, 2, 4]);
        assert_eq!(s.complement(), [1, 3]);
        assert_eq!((s.local_index(4), s.local_index(3)), (Some(2), None));
        assert!(s.contains_class(2) && !s.contains_class(1));
        let full = ClassSubset::new([1, 0], 2).unwrap();
        assert!(full.complement().is_empty());
        let cases: [(Result<ClassSubset>, &str); 5] = [
            (ClassSubset::new(Vec::<i64>::new(), 3), "`classes`: is empty"),
            (ClassSubset::new([1, 2, 1], 3), "`classes`: lists class 1 twice"),
            (ClassSubset::new([3], 3), "`classes`: holds class 3"),
            (ClassSubset::new([-1], 3), "`classes`: holds class -1"),
            (ClassSubset::new([0], 0), "`num_classes`"),
        ];
        for (result, expected) in cases {
            let err = result.unwrap_err().to_string();
            assert!(err.contains(expected), "expected {expected:?} in {err:?}");
        }
    }

    #[test]
    fn to_local_keeps_the_shape_and_rejects_bad_labels() {
        let s = ClassSubset::new([1, 3], 5).unwrap();
        let labels = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 3]).view([2, 3]);
        let local = s.to_local(&labels).unwrap();
        assert_eq!(local.size(), [2, 3]);
        // 0 -> dustbin 2, 1 -> 0, 2 -> 2, 3 -> 1, 4 -> 2, 3 -> 1
        assert_eq!(Vec::<i64>::try_from(local.view([-1])).unwrap(), [2, 0, 2, 1, 2, 1]);
        assert!(s.to_local(&Tensor::from_slice(&[5i64])).is_err(), "label out of range");
        assert!(s.to_local(&Tensor::from_slice(&[1i32])).unwrap_err().to_string().contains("`labels`"));
    }

    #[test]
    fn balanced_indices_are_half_inside_deterministic_and_give_the_odds_factor() {
        // 10 of 100 labels in {0}: factor = (90 / 10) = 9 for an even n.
        let labels: Vec<i64> = (0..100).map(|i| if i % 10 == 3 { 0 } else { 1 + i % 4 }).collect();
        let labels = Tensor::from_slice(&labels);
        let subset = ClassSubset::new([0], 5).unwrap();
        let (idx, factor) = balanced_indices(&labels, &subset, 1000, 9).unwrap();
        assert_eq!(factor, 9.0);
        assert_eq!(idx.size(), [1000]);
        let picked = labels.index_select(0, &idx);
        assert_eq!(i64::try_from(picked.eq(0).sum(Kind::Int64)).unwrap(), 500);
        let (again, _) = balanced_indices(&labels, &subset, 1000, 9).unwrap();
        assert!(idx.equal(&again));
        let (other, _) = balanced_indices(&labels, &subset, 1000, 10).unwrap();
        assert!(!idx.equal(&other));
        // Shuffled: the first half is not all subset examples.
        let first_half = picked.narrow(0, 0, 500).eq(0).sum(Kind::Int64);
        assert!(i64::try_from(first_half).unwrap() < 500);
        // Odd n: 2 inside, 3 outside -> (2/3) * 9 = 6.
        let (idx, factor) = balanced_indices(&labels, &subset, 5, 0).unwrap();
        assert_eq!((idx.size()[0], factor), (5, 6.0));
        assert!((dustbin_logit_shift(9.0) - 9f64.ln()).abs() < 1e-15);
    }

    #[test]
    fn balanced_indices_rejects_impossible_samples() {
        let labels = Tensor::from_slice(&[1i64, 2, 1]);
        let cases: [(Result<(Tensor, f64)>, &str); 4] = [
            (balanced_indices(&labels, &ClassSubset::new([0], 3).unwrap(), 4, 0), "none of the 3 labels"),
            (balanced_indices(&labels, &ClassSubset::new([1, 2], 3).unwrap(), 4, 0), "no examples for the dustbin"),
            (balanced_indices(&labels, &ClassSubset::new([1], 3).unwrap(), 1, 0), "`n`"),
            (balanced_indices(&labels.view([1, 3]), &ClassSubset::new([1], 3).unwrap(), 4, 0), "`labels`: must be 1-D"),
        ];
        for (result, expected) in cases {
            let err = result.unwrap_err().to_string();
            assert!(err.contains(expected), "expected {expected:?} in {err:?}");
        }
    }
}
