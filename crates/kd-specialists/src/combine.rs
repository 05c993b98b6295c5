//! Inference with a generalist and its specialists: the paper's eq. 5.
//!
//! For each example, the specialists consulted are those whose subset holds one of the
//! generalist's `n` most probable classes (`n = 1` in the paper); the combined distribution is
//!
//! ```text
//! q* = argmin_q  KL(p^g || q) + sum_{m in A} KL(p^m || D_m(q))                   (eq. 5)
//!
//! D_m(q) = [q_{s_0}, ..., q_{s_{|S|-1}}, sum_{c not in S_m} q_c]   (outside mass merged into the dustbin)
//! ```
//!
//! with `q = softmax(z)`, minimized over the logits `z` by gradient descent from `z = ln p^g`.
//! The gradient is a sum of "prediction minus target" terms:
//!
//! ```text
//! dF/dz = (q - p^g) + sum_{m in A} (q - t^m),   t^m_c = p^m_j                  if c = s_j in S_m
//!                                                t^m_c = q_c p^m_dust / q_out    if c not in S_m
//! ```
//!
//! (`q_out` = `q`'s mass outside `S_m`: the specialist's dustbin mass is shared among the
//! outside classes in proportion to `q`). Each example takes steps
//! `z <- z - (s / (1 + |A|)) dF/dz` with its own step `s`: a step that would increase its
//! objective is rejected and `s` halved; an accepted step doubles `s`, up to
//! [`CombineConfig::step`]. The objective therefore never increases. Probabilities inside
//! logarithms are clamped at `1e-12`; `q_out` is computed as `1 - sum_{c in S_m} q_c`, in double.
//! All of it runs batched on the inputs' device under `no_grad`.

use tch::{Kind, Tensor};

use crate::error::{bad, int_vector, matrix, same_device, Result};
use crate::subset::ClassSubset;

/// Floor of every probability inside a logarithm.
const EPS: f64 = 1e-12;

/// `[N, M]` membership matrix on `like`'s device: entry `(c, m)` is 1 if subset `m` holds class `c`.
fn membership(subsets: &[ClassSubset], num_classes: i64, kind: Kind, like: &Tensor) -> Tensor {
    let m = subsets.len();
    let mut data = vec![0.0f32; num_classes as usize * m];
    for (j, subset) in subsets.iter().enumerate() {
        for &c in subset.classes() {
            data[c as usize * m + j] = 1.0;
        }
    }
    Tensor::from_slice(&data).view([num_classes, m as i64]).to_kind(kind).to_device(like.device())
}

/// Every subset must be one of `num_classes` classes.
fn check_subsets(subsets: &[ClassSubset], num_classes: i64, reference: &str) -> Result<()> {
    for (i, s) in subsets.iter().enumerate() {
        if s.num_classes() != num_classes {
            return Err(bad(
                format!("subsets[{i}]"),
                format!("is a subset of {} classes but `{reference}` has {num_classes}", s.num_classes()),
            ));
        }
    }
    Ok(())
}

/// Which specialists to consult: `[B, M]` bool on the generalist's device, `true` at `(b, m)`
/// iff `subsets[m]` holds one of the `top_n` most probable classes of `generalist_probs[b]`
/// (`[B, N]`; ties broken by libtorch's `topk`). The paper uses `top_n = 1`.
///
/// # Example
/// ```
/// use kd_specialists::{active_specialists, ClassSubset};
/// use tch::Tensor;
///
/// let subsets = [ClassSubset::new([0, 1], 3).unwrap(), ClassSubset::new([1, 2], 3).unwrap()];
/// let pg = Tensor::from_slice(&[0.6f32, 0.3, 0.1, 0.2, 0.7, 0.1, 0.1, 0.1, 0.8]).view([3, 3]);
/// let active = active_specialists(&pg, &subsets, 1).unwrap();
/// // top-1 classes 0, 1, 2: covered by the first, both, the second
/// assert_eq!(Vec::<bool>::try_from(active.view([-1])).unwrap(), [true, false, true, true, false, true]);
/// ```
pub fn active_specialists(generalist_probs: &Tensor, subsets: &[ClassSubset], top_n: i64) -> Result<Tensor> {
    let (b, n) = matrix("generalist_probs", generalist_probs)?;
    if !(1..=n).contains(&top_n) {
        return Err(bad("top_n", format!("must be in [1, {n}] (the number of classes), got {top_n}")));
    }
    check_subsets(subsets, n, "generalist_probs")?;
    Ok(tch::no_grad(|| {
        let (_, top) = generalist_probs.topk(top_n, 1, true, false);
        let device = generalist_probs.device();
        let in_top = Tensor::zeros([b, n], (Kind::Float, device)).scatter_value(1, &top, 1.0);
        in_top.mm(&membership(subsets, n, Kind::Float, generalist_probs)).gt(0.5)
    }))
}

/// Number of subsets holding each label: `[B]` int64 on the labels' device, for `labels: [B]`
/// int64 class ids (the "specialists covering" row of the paper's Table 4). All subsets must
/// share one number of classes `N`, and labels lie in `[0, N)` (libtorch checks this on the CPU).
///
/// # Example
/// ```
/// use kd_specialists::{covering_specialists, ClassSubset};
/// use tch::Tensor;
///
/// let subsets = [ClassSubset::new([0, 1], 3).unwrap(), ClassSubset::new([1], 3).unwrap()];
/// let n = covering_specialists(&Tensor::from_slice(&[0i64, 1, 2]), &subsets).unwrap();
/// assert_eq!(Vec::<i64>::try_from(n).unwrap(), [1, 2, 0]);
/// ```
pub fn covering_specialists(labels: &Tensor, subsets: &[ClassSubset]) -> Result<Tensor> {
    let b = int_vector("labels", labels)?;
    let Some(first) = subsets.first() else {
        return Ok(Tensor::zeros([b], (Kind::Int64, labels.device())));
    };
    check_subsets(subsets, first.num_classes(), "subsets[0]")?;
    let table = membership(subsets, first.num_classes(), Kind::Int64, labels).sum_dim_intlist(1, false, Kind::Int64);
    Ok(table.f_take(labels)?)
}

/// Parameters of [`combine`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CombineConfig {
    /// Maximum number of gradient steps.
    pub iterations: i64,
    /// Initial and largest step `s` (scaled per example by `1 / (1 + |A|)`).
    pub step: f64,
    /// Stop once every example's scaled gradient `dF/dz / (1 + |A|)` is at most this in
    /// absolute value (0: always run `iterations` steps).
    pub tolerance: f64,
}

impl Default for CombineConfig {
    /// 100 steps of at most 1.0, stopping at a scaled gradient of 1e-6.
    fn default() -> Self {
        CombineConfig { iterations: 100, step: 1.0, tolerance: 1e-6 }
    }
}

impl CombineConfig {
    /// Checks the fields, naming the offending one.
    pub fn validate(&self) -> Result<()> {
        if self.iterations < 0 {
            return Err(bad("cfg.iterations", format!("must be >= 0, got {}", self.iterations)));
        }
        if !(self.step.is_finite() && self.step > 0.0) {
            return Err(bad("cfg.step", format!("must be finite and > 0, got {}", self.step)));
        }
        if self.tolerance.is_nan() || self.tolerance < 0.0 {
            return Err(bad("cfg.tolerance", format!("must be >= 0, got {}", self.tolerance)));
        }
        Ok(())
    }
}

/// The result of [`combine`].
#[derive(Debug)]
pub struct Combined {
    /// The combined distributions `q*`, `[B, N]`, of the generalist's dtype and device. Rows
    /// with no active specialist are `p^g` exactly.
    pub probs: Tensor,
    /// Batch-mean objective of eq. 5 (0 for examples with no active specialist), at the start
    /// and after each step: `iterations + 1` values, never increasing.
    pub objective: Vec<f64>,
    /// Number of steps taken (fewer than the configured maximum if the tolerance was reached).
    pub iterations: i64,
}

/// One specialist's share of the problem: only its subset's columns are ever gathered, so a
/// step costs `O(B N)` for the softmax plus `O(B |S_m|)` per specialist.
struct Part {
    /// `[|S|]` int64 class ids.
    classes: Tensor,
    /// `[B, |S|]` its probabilities of the subset's classes, and their logs clamped at `EPS`.
    probs: Tensor,
    log_probs: Tensor,
    /// `[B, 1]` its dustbin probability, and its log clamped at `EPS`.
    dustbin: Tensor,
    log_dustbin: Tensor,
    /// `[B, 1]` 1.0 where it is active.
    weight: Tensor,
}

/// Eq. 5 for a batch, with the inputs validated and cast to double: `q_out = 1 - sum_S q` is
/// then exact to about 1e-16, below the clamp of the logarithms.
struct Problem {
    pg: Tensor,
    log_pg: Tensor,
    parts: Vec<Part>,
    /// `[B, 1]` bool: at least one specialist is active.
    any: Tensor,
    /// `[B, 1]` number of terms `1 + |A|`.
    terms: Tensor,
}

impl Problem {
    /// Assumes validated arguments.
    fn new(generalist_probs: &Tensor, specialists: &[(&ClassSubset, &Tensor)], active: &Tensor) -> Problem {
        let kind = Kind::Double;
        let device = generalist_probs.device();
        let pg = generalist_probs.to_kind(kind);
        let log_pg = pg.clamp_min(EPS).log();
        let weights = active.to_kind(kind);
        let parts = specialists
            .iter()
            .enumerate()
            .map(|(m, (subset, probs))| {
                let s = subset.len();
                let probs = probs.to_kind(kind);
                let (inside, dustbin) = (probs.narrow(1, 0, s), probs.narrow(1, s, 1));
                Part {
                    classes: Tensor::from_slice(subset.classes()).to_device(device),
                    log_probs: inside.clamp_min(EPS).log(),
                    probs: inside,
                    log_dustbin: dustbin.clamp_min(EPS).log(),
                    dustbin,
                    weight: weights.narrow(1, m as i64, 1),
                }
            })
            .collect();
        let any = active.any_dim(1, true);
        let terms = weights.sum_dim_intlist(1, true, kind) + 1.0;
        Problem { pg, log_pg, parts, any, terms }
    }

    /// `(log q_S, q_S, q_out)` for one specialist: `q` on its subset and outside it.
    fn merged(part: &Part, log_q: &Tensor) -> (Tensor, Tensor, Tensor) {
        let log_q_s = log_q.index_select(1, &part.classes);
        let q_s = log_q_s.exp();
        let q_out: Tensor = 1.0 - q_s.sum_dim_intlist(1, true, Kind::Double);
        let q_out = q_out.clamp_min(0.0);
        (log_q_s, q_s, q_out)
    }

    /// `[B]` objective of eq. 5 at logits `z` (0 where no specialist is active).
    fn objective(&self, z: &Tensor) -> Tensor {
        let kind = Kind::Double;
        let log_q = z.log_softmax(1, kind);
        let mut f = (&self.pg * (&self.log_pg - &log_q)).sum_dim_intlist(1, true, kind);
        for part in &self.parts {
            let (log_q_s, _, q_out) = Self::merged(part, &log_q);
            let inside = (&part.probs * (&part.log_probs - log_q_s)).sum_dim_intlist(1, true, kind);
            let dustbin = &part.dustbin * (&part.log_dustbin - q_out.clamp_min(EPS).log());
            f += (inside + dustbin) * &part.weight;
        }
        f.where_scalarother(&self.any, 0.0).squeeze_dim(1)
    }

    /// `[B, N]` descent direction `dF/dz / (1 + |A|)` (0 where no specialist is active).
    ///
    /// Each active specialist adds `q - t^m`: `q_c (1 - share)` outside its subset
    /// (`share = p^m_dust / q_out`) and `q_c - p^m_c` inside. The outside parts of all
    /// specialists add up to `q` times one number per example; the inside parts then correct
    /// the subset's columns.
    fn direction(&self, z: &Tensor) -> Tensor {
        let kind = Kind::Double;
        let log_q = z.log_softmax(1, kind);
        let q = log_q.exp();
        let mut outside = Tensor::zeros_like(&self.terms);
        let mut corrections = Vec::with_capacity(self.parts.len());
        for part in &self.parts {
            let (_, q_s, q_out) = Self::merged(part, &log_q);
            let share = &part.dustbin / q_out.clamp_min(EPS);
            outside += (1.0 - &share) * &part.weight;
            // inside: (q_s - p_s) - q_s (1 - share) = q_s share - p_s
            corrections.push((&part.classes, (q_s * share - &part.probs) * &part.weight));
        }
        let mut g = &q - &self.pg + &q * outside;
        for (classes, c) in corrections {
            let _ = g.index_add_(1, classes, &c);
        }
        (g / &self.terms).where_scalarother(&self.any, 0.0)
    }
}

/// Combines a generalist with its specialists by minimizing eq. 5 for every example.
///
/// * `generalist_probs`: `p^g`, `[B, N]` distributions.
/// * `specialists`: for each specialist `m`, its subset `S_m` (of `N` classes) and its
///   distributions `p^m`, `[B, |S_m| + 1]` (softmax over its subset classes in order, then the
///   dustbin), on the generalist's device.
/// * `active`: `[B, M]` bool, which specialists take part for which example (see
///   [`active_specialists`]).
///
/// Returns `q*` and the objective's trace; see the [module docs](self) for the method.
/// Examples with no active specialist get `q* = p^g` exactly and cost nothing: the others are
/// gathered and solved in double. A step costs `O(B N)` for the softmax plus `O(B |S_m|)` per
/// active specialist; it reads two numbers back (the mean objective and the largest gradient). Fails naming the argument on shape, dtype, device or subset mismatches.
///
/// # Example
/// ```
/// use kd_specialists::{combine, ClassSubset, CombineConfig};
/// use tch::Tensor;
///
/// // The generalist hesitates between classes 1 and 2; a specialist for {1, 2} is sure of 2.
/// let pg = Tensor::from_slice(&[0.2f64, 0.4, 0.4]).view([1, 3]);
/// let subset = ClassSubset::new([1, 2], 3).unwrap();
/// let pm = Tensor::from_slice(&[0.05f64, 0.75, 0.2]).view([1, 3]); // classes 1, 2, dustbin
/// let active = Tensor::from_slice(&[true]).view([1, 1]);
/// let out = combine(&pg, &[(&subset, &pm)], &active, &CombineConfig::default()).unwrap();
/// let q = Vec::<f64>::try_from(out.probs.view([-1])).unwrap();
/// assert!(q[2] > q[1] && q[2] > 0.4);
/// assert!((q.iter().sum::<f64>() - 1.0).abs() < 1e-12);
/// assert!(out.objective.windows(2).all(|w| w[1] <= w[0]));
/// ```
pub fn combine(
    generalist_probs: &Tensor,
    specialists: &[(&ClassSubset, &Tensor)],
    active: &Tensor,
    cfg: &CombineConfig,
) -> Result<Combined> {
    let (b, n) = matrix("generalist_probs", generalist_probs)?;
    cfg.validate()?;
    let device = generalist_probs.device();
    let m = specialists.len() as i64;
    if active.size() != [b, m] {
        return Err(bad("active", format!("has shape {:?} but needs [batch = {b}, specialists = {m}]", active.size())));
    }
    let kind = active.f_kind()?;
    if kind != Kind::Bool {
        return Err(bad("active", format!("must be a bool tensor, got dtype {kind:?}")));
    }
    same_device("active", active, device, "generalist_probs")?;
    for (i, (subset, probs)) in specialists.iter().enumerate() {
        if subset.num_classes() != n {
            return Err(bad(
                format!("specialists[{i}].0"),
                format!("is a subset of {} classes but `generalist_probs` has {n}", subset.num_classes()),
            ));
        }
        let arg = format!("specialists[{i}].1");
        matrix(&arg, probs)?;
        if probs.size() != [b, subset.output_width()] {
            return Err(bad(
                &arg,
                format!(
                    "has shape {:?} but needs [batch = {b}, |S| + 1 = {}] (subset classes, then the dustbin)",
                    probs.size(),
                    subset.output_width()
                ),
            ));
        }
        same_device(&arg, probs, device, "generalist_probs")?;
    }
    tch::no_grad(|| {
        // Only the examples that consult some specialist are solved; the others keep p^g.
        let rows = active.any_dim(1, false).nonzero().squeeze_dim(1);
        let r = rows.size()[0];
        if r == 0 {
            return Ok(Combined { probs: generalist_probs.copy(), objective: vec![0.0], iterations: 0 });
        }
        let pick = |t: &Tensor| if r == b { t.shallow_clone() } else { t.index_select(0, &rows) };
        let picked: Vec<Tensor> = specialists.iter().map(|(_, p)| pick(p)).collect();
        let parts: Vec<(&ClassSubset, &Tensor)> = specialists.iter().zip(&picked).map(|((s, _), p)| (*s, p)).collect();
        let problem = Problem::new(&pick(generalist_probs), &parts, &pick(active));
        let kind = Kind::Double;
        let mut z = problem.log_pg.copy();
        let (mut f, mut g) = (problem.objective(&z), problem.direction(&z));
        let mut step = Tensor::full([r, 1], cfg.step, (kind, device));
        let mut objective = Vec::new();
        let mut iterations = 0;
        // The trace is a mean over the whole batch, whose other examples contribute 0.
        let share = r as f64 / b as f64;
        loop {
            let stats = Tensor::stack(&[f.mean(kind) * share, g.abs().max()], 0);
            let (mean, largest) = (stats.f_double_value(&[0])?, stats.f_double_value(&[1])?);
            objective.push(mean);
            if iterations == cfg.iterations || largest <= cfg.tolerance {
                break;
            }
            let z_new = &z - &step * &g;
            let f_new = problem.objective(&z_new);
            let accept = f_new.le_tensor(&f).logical_and(&f_new.isfinite());
            let accept_rows = accept.unsqueeze(1);
            g = problem.direction(&z_new).where_self(&accept_rows, &g);
            z = z_new.where_self(&accept_rows, &z);
            f = f_new.where_self(&accept, &f);
            step = (&step * 2.0).clamp_max(cfg.step).where_self(&accept_rows, &(&step * 0.5));
            iterations += 1;
        }
        let q = z.softmax(1, kind).where_self(&problem.any, &problem.pg).to_kind(generalist_probs.kind());
        let probs = if r == b { q } else { generalist_probs.index_copy(0, &rows, &q) };
        Ok(Combined { probs, objective, iterations })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::uniform;
    use tch::Device;

    /// `[rows, cols]` random distributions (double), strictly positive.
    fn distributions(rows: i64, cols: i64, seed: u64) -> Tensor {
        let u = uniform(&[rows, cols], seed).to_kind(Kind::Double) + 0.05;
        &u / u.sum_dim_intlist(1, true, Kind::Double)
    }

    fn subsets(lists: &[&[i64]], n: i64) -> Vec<ClassSubset> {
        lists.iter().map(|c| ClassSubset::new(c.to_vec(), n).unwrap()).collect()
    }

    fn bools(rows: &[&[bool]]) -> Tensor {
        let flat: Vec<bool> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_slice(&flat).view([rows.len() as i64, rows.first().map_or(0, |r| r.len() as i64)])
    }

    /// Random specialist distributions for `subsets` over a batch of `b`.
    fn specialist_probs(subsets: &[ClassSubset], b: i64, seed: u64) -> Vec<Tensor> {
        subsets.iter().enumerate().map(|(m, s)| distributions(b, s.output_width(), seed + m as u64)).collect()
    }

    #[test]
    fn no_active_specialist_returns_the_generalist_exactly() {
        let pg = distributions(4, 5, 1).to_kind(Kind::Float);
        let subs = subsets(&[&[0, 1], &[1, 3]], 5);
        let pm = specialist_probs(&subs, 4, 10);
        let specialists: Vec<_> = subs.iter().zip(&pm).collect();
        let none = Tensor::zeros([4, 2], (Kind::Bool, Device::Cpu));
        let out = combine(&pg, &specialists, &none, &CombineConfig::default()).unwrap();
        assert!(out.probs.allclose(&pg, 1e-6, 1e-6, false));
        assert!(out.probs.equal(&pg));
        assert_eq!((out.objective.as_slice(), out.iterations), (&[0.0][..], 0));
        assert_eq!(out.probs.kind(), Kind::Float);
        // Mixed: rows 0 and 2 active, rows 1 and 3 untouched.
        let some = bools(&[&[true, false], &[false, false], &[true, true], &[false, false]]);
        let out = combine(&pg, &specialists, &some, &CombineConfig::default()).unwrap();
        for row in [1, 3] {
            assert!(out.probs.get(row).equal(&pg.get(row)), "row {row}");
        }
        assert!(!out.probs.get(0).allclose(&pg.get(0), 1e-4, 1e-4, false));
    }

    #[test]
    fn a_full_cover_specialist_gives_the_mean_distribution() {
        // argmin_q KL(p1 || q) + KL(p2 || q) = (p1 + p2) / 2.
        let pg = distributions(3, 6, 2).to_kind(Kind::Float);
        let p2 = distributions(3, 6, 3).to_kind(Kind::Float);
        let full = ClassSubset::new((0..6).collect::<Vec<_>>(), 6).unwrap();
        let pm = Tensor::cat(&[p2.shallow_clone(), Tensor::zeros([3, 1], (Kind::Float, Device::Cpu))], 1);
        let active = Tensor::ones([3, 1], (Kind::Bool, Device::Cpu));
        let cfg = CombineConfig { iterations: 500, step: 1.0, tolerance: 1e-7 };
        let out = combine(&pg, &[(&full, &pm)], &active, &cfg).unwrap();
        let mean = (&pg + &p2) * 0.5;
        let err = f64::try_from((&out.probs - &mean).abs().max()).unwrap();
        assert!(err < 1e-3, "max |q - mean| = {err}");
        assert!(out.objective.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn the_objective_never_increases_with_overlapping_specialists() {
        let (b, n) = (16, 10);
        let pg = distributions(b, n, 4);
        let subs = subsets(&[&[0, 1, 2, 3], &[2, 3, 4], &[3, 5, 7, 9], &[8]], n);
        let pm = specialist_probs(&subs, b, 20);
        let specialists: Vec<_> = subs.iter().zip(&pm).collect();
        let active = uniform(&[b, 4], 5).lt(0.6);
        // A large step forces rejections; a tiny one converges slowly: both must be monotone.
        for step in [16.0, 1.0, 0.01] {
            let cfg = CombineConfig { iterations: 60, step, tolerance: 0.0 };
            let out = combine(&pg, &specialists, &active, &cfg).unwrap();
            assert_eq!(out.objective.len(), 61);
            assert!(out.objective.windows(2).all(|w| w[1] <= w[0]), "step {step}: {:?}", out.objective);
            assert!(out.objective[60] < out.objective[0], "step {step}: no progress");
            let sums = out.probs.sum_dim_intlist(1, false, Kind::Double);
            assert!(sums.allclose(&Tensor::ones([b], (Kind::Double, Device::Cpu)), 1e-9, 1e-9, false));
        }
    }

    #[test]
    fn each_example_is_solved_as_if_alone() {
        // Rows without an active specialist are left out of the solve; the others must not
        // depend on which rows they share a batch with.
        let (b, n) = (5, 8);
        let pg = distributions(b, n, 8);
        let subs = subsets(&[&[0, 1, 2], &[2, 5, 7]], n);
        let pm = specialist_probs(&subs, b, 40);
        let specialists: Vec<_> = subs.iter().zip(&pm).collect();
        let active = bools(&[&[true, false], &[false, false], &[true, true], &[false, false], &[false, true]]);
        let cfg = CombineConfig { iterations: 40, step: 1.0, tolerance: 0.0 };
        let batch = combine(&pg, &specialists, &active, &cfg).unwrap();
        for row in [0, 2, 4] {
            let one: Vec<Tensor> = pm.iter().map(|p| p.narrow(0, row, 1)).collect();
            let alone: Vec<_> = subs.iter().zip(&one).collect();
            let out = combine(&pg.narrow(0, row, 1), &alone, &active.narrow(0, row, 1), &cfg).unwrap();
            assert!(out.probs.allclose(&batch.probs.narrow(0, row, 1), 1e-12, 1e-12, false), "row {row}");
        }
        // The trace averages over the whole batch: the two idle rows count as zeros.
        assert!(batch.objective[0] > 0.0);
    }

    #[test]
    fn the_analytic_gradient_matches_autograd() {
        let (b, n) = (6, 7);
        let pg = distributions(b, n, 6);
        let subs = subsets(&[&[0, 1, 2], &[2, 6], &[1, 2, 3, 4, 5]], n);
        let pm = specialist_probs(&subs, b, 30);
        let specialists: Vec<_> = subs.iter().zip(&pm).collect();
        let active = bools(&[
            &[true, false, false],
            &[false, true, true],
            &[true, true, true],
            &[false, false, false],
            &[false, false, true],
            &[true, false, true],
        ]);
        let problem = Problem::new(&pg, &specialists, &active);
        let z = (uniform(&[b, n], 7).to_kind(Kind::Double) * 3.0).set_requires_grad(true);
        problem.objective(&z).sum(Kind::Double).backward();
        let expected = z.grad();
        let got = tch::no_grad(|| problem.direction(&z) * &problem.terms);
        assert!(got.allclose(&expected, 1e-10, 1e-12, false), "{got} vs {expected}");
    }

    #[test]
    fn a_confident_specialist_raises_its_class() {
        let pg = Tensor::from_slice(&[0.4f32, 0.3, 0.1, 0.1, 0.1]).view([1, 5]);
        let subset = ClassSubset::new([1, 2], 5).unwrap();
        let pm = Tensor::from_slice(&[0.9f32, 0.05, 0.05]).view([1, 3]);
        let active = bools(&[&[true]]);
        let out = combine(&pg, &[(&subset, &pm)], &active, &CombineConfig::default()).unwrap();
        let q = Vec::<f32>::try_from(out.probs.view([-1])).unwrap();
        assert!(q[1] > 0.3, "q = {q:?}");
        assert!(q[2] < 0.1, "the specialist also lowers its other class: q = {q:?}");
        // Outside classes keep their relative sizes: the dustbin mass is shared like q.
        assert!((q[3] / q[4] - 1.0).abs() < 1e-4 && q[0] > q[3], "q = {q:?}");
    }

    #[test]
    fn zero_probabilities_stay_finite() {
        // A one-hot generalist and a specialist that puts all its mass elsewhere.
        let pg = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 0.0]).view([1, 4]);
        let subset = ClassSubset::new([1, 2], 4).unwrap();
        let pm = Tensor::from_slice(&[1.0f32, 0.0, 0.0]).view([1, 3]);
        let cfg = CombineConfig { iterations: 300, ..CombineConfig::default() };
        let out = combine(&pg, &[(&subset, &pm)], &bools(&[&[true]]), &cfg).unwrap();
        assert!(bool::try_from(out.probs.isfinite().all()).unwrap());
        let q = Vec::<f32>::try_from(out.probs.view([-1])).unwrap();
        assert!((q.iter().sum::<f32>() - 1.0).abs() < 1e-5 && q[1] > 0.1, "q = {q:?}");
        assert!(out.objective.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn active_specialists_by_coverage() {
        // Class 6 is covered by none, 0, 2, 4 by one, 1 by three.
        let subs = subsets(&[&[0, 1], &[1, 2], &[1, 3], &[4, 5]], 7);
        let cases: [(&[i64], &[bool]); 6] = [
            (&[6], &[false, false, false, false]),
            (&[0], &[true, false, false, false]),
            (&[2], &[false, true, false, false]),
            (&[4], &[false, false, false, true]),
            (&[1], &[true, true, true, false]),
            (&[6, 3], &[false, false, true, false]),
        ];
        for (top, expected) in cases {
            // The listed classes share 0.8; the others share 0.2.
            let mut p = vec![0.2 / (7 - top.len()) as f32; 7];
            for &c in top {
                p[c as usize] = 0.8 / top.len() as f32 + 0.01 * c as f32;
            }
            let pg = Tensor::from_slice(&p).view([1, 7]);
            let active = active_specialists(&pg, &subs, top.len() as i64).unwrap();
            assert_eq!(active.size(), [1, 4]);
            assert_eq!(Vec::<bool>::try_from(active.view([-1])).unwrap(), expected, "top {top:?}");
        }
        let labels = Tensor::from_slice(&[6i64, 0, 2, 4, 1, 3]);
        let counts = Vec::<i64>::try_from(covering_specialists(&labels, &subs).unwrap()).unwrap();
        assert_eq!(counts, [0, 1, 1, 1, 3, 1]);
        assert_eq!(covering_specialists(&labels, &[]).unwrap().size(), [6]);
        let none = active_specialists(&Tensor::ones([2, 7], (Kind::Float, Device::Cpu)), &[], 1).unwrap();
        assert_eq!(none.size(), [2, 0]);
    }

    #[test]
    fn bad_arguments_are_rejected_naming_them() {
        let pg = distributions(2, 4, 8);
        let s = ClassSubset::new([0, 1], 4).unwrap();
        let s5 = ClassSubset::new([0, 1], 5).unwrap();
        let pm = distributions(2, 3, 9);
        let wide = distributions(2, 4, 9);
        let short = distributions(3, 3, 9);
        let act = Tensor::ones([2, 1], (Kind::Bool, Device::Cpu));
        let act2 = Tensor::ones([2, 2], (Kind::Bool, Device::Cpu));
        let ok = CombineConfig::default();
        let cases: Vec<(Result<()>, &str)> = vec![
            (combine(&pg.view([-1]), &[(&s, &pm)], &act, &ok).map(drop), "`generalist_probs`: must have rank 2"),
            (
                combine(&pg.to_kind(Kind::Int64), &[(&s, &pm)], &act, &ok).map(drop),
                "`generalist_probs`: must be a floating",
            ),
            (combine(&pg, &[(&s5, &pm)], &act, &ok).map(drop), "`specialists[0].0`: is a subset of 5 classes"),
            (
                combine(&pg, &[(&s, &pm), (&s, &wide)], &act2, &ok).map(drop),
                "`specialists[1].1`: has shape [2, 4] but needs [batch = 2, |S| + 1 = 3]",
            ),
            (combine(&pg, &[(&s, &short)], &act, &ok).map(drop), "`specialists[0].1`: has shape [3, 3]"),
            (combine(&pg, &[(&s, &pm)], &act2, &ok).map(drop), "`active`: has shape [2, 2]"),
            (combine(&pg, &[(&s, &pm)], &act.to_kind(Kind::Float), &ok).map(drop), "`active`: must be a bool"),
            (combine(&pg, &[(&s, &pm)], &act, &CombineConfig { step: 0.0, ..ok }).map(drop), "`cfg.step`"),
            (combine(&pg, &[(&s, &pm)], &act, &CombineConfig { iterations: -1, ..ok }).map(drop), "`cfg.iterations`"),
            (
                combine(&pg, &[(&s, &pm)], &act, &CombineConfig { tolerance: f64::NAN, ..ok }).map(drop),
                "`cfg.tolerance`",
            ),
            (active_specialists(&pg, std::slice::from_ref(&s), 0).map(drop), "`top_n`"),
            (active_specialists(&pg, std::slice::from_ref(&s), 5).map(drop), "`top_n`"),
            (active_specialists(&pg, &[s.clone(), s5.clone()], 1).map(drop), "`subsets[1]`: is a subset of 5 classes"),
            (covering_specialists(&Tensor::from_slice(&[0i64]), &[s.clone(), s5]).map(drop), "`subsets[1]`"),
            (covering_specialists(&Tensor::from_slice(&[0.0f32]), &[s]).map(drop), "`labels`: must be an int64"),
        ];
        for (result, expected) in cases {
            let err = result.unwrap_err().to_string();
            assert!(err.contains(expected), "expected {expected:?} in {err:?}");
        }
    }
}
