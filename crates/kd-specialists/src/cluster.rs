//! Class subsets for the specialists, found from a trained generalist without true labels.
//!
//! The paper (section 5) clusters "the columns of the covariance matrix of the predictions of
//! the generalist model, so that a set of classes S^m that are often predicted together will be
//! used as targets for one of our specialist models", with an online version of K-means;
//! section 7 mentions the confusion matrix instead. Both affinities are `[N, N]` and
//! symmetric, so row `i` describes class `i` as a point in `R^N`:
//!
//! ```text
//! covariance   C = (P - 1 m^T)^T (P - 1 m^T) / (n - 1)        P: [n, N] predicted distributions, m = column means
//! confusion    K[i, j] = #{label i, predicted j},  S = K + K^T with diag(S) = 0,
//!              W = (I + D^-1 S) / 2                            D = diag(row sums of S)   (rows sum to 1)
//! k-means      minimize sum_i ||a_i - c_{k(i)}||^2 over N points a_i (rows of C or W), K centers
//! ```
//!
//! The k-means is Sculley's mini-batch k-means (WWW 2010): each iteration draws `batch_size`
//! points with replacement, assigns each to its nearest center, and moves every center to the
//! running mean of all points ever assigned to it (per-center learning rate `1 / v_c`, where
//! `v_c` counts those points). Centers start from greedy k-means++ (Arthur & Vassilvitskii 2007,
//! with `2 + ln K` candidates per center as in scikit-learn). All distances are batched
//! matrix products on the points' device, so 14,000 classes of dimension 14,000 fit one GPU;
//! every random choice follows from [`KMeansConfig::seed`].

use std::collections::BTreeSet;

use tch::{Device, Kind, Tensor};

use crate::error::{bad, compute_kind, int_vector, matrix, same_device, Result};
use crate::rng::{uniform_vector, SplitMix64};
use crate::subset::ClassSubset;

/// Running mean and centered second moment of predicted distributions, fed batch by batch.
///
/// Merges each batch with Chan, Golub & LeVeque's pairwise update, so a held-out set too large
/// for memory (e.g. millions of frames x 14,000 classes) can be streamed:
///
/// ```text
/// n = n_a + n_b,  d = m_b - m_a,  m = m_a + d n_b / n,  M = M_a + M_b + d d^T n_a n_b / n,
/// covariance = M / (n - 1)
/// ```
///
/// Accumulates in double if the first batch is double, else in float, on the first batch's device.
///
/// # Example
/// ```
/// use kd_specialists::CovarianceAccumulator;
/// use tch::Tensor;
///
/// let mut acc = CovarianceAccumulator::new();
/// acc.add(&Tensor::from_slice(&[1.0f64, 0.0]).view([1, 2])).unwrap();
/// acc.add(&Tensor::from_slice(&[0.0f64, 1.0]).view([1, 2])).unwrap();
/// let cov = Vec::<f64>::try_from(acc.finish().unwrap().view([-1])).unwrap();
/// assert_eq!(cov, [0.5, -0.5, -0.5, 0.5]);
/// ```
#[derive(Debug, Default)]
pub struct CovarianceAccumulator {
    count: i64,
    /// `(mean [N], M [N, N])` once a batch has been added.
    state: Option<(Tensor, Tensor)>,
}

impl CovarianceAccumulator {
    /// An empty accumulator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of examples added so far.
    pub fn count(&self) -> i64 {
        self.count
    }

    /// Adds a batch of predicted distributions `probs: [batch, N]` (the generalist's softmax
    /// outputs). Every batch must have the first batch's `N` and device.
    pub fn add(&mut self, probs: &Tensor) -> Result<()> {
        let (nb, classes) = matrix("probs", probs)?;
        tch::no_grad(|| {
            let kind = match &self.state {
                Some((mean, _)) => {
                    if mean.size()[0] != classes {
                        return Err(bad(
                            "probs",
                            format!("has {classes} classes but earlier batches had {}", mean.size()[0]),
                        ));
                    }
                    same_device("probs", probs, mean.device(), "the first batch")?;
                    mean.kind()
                }
                None => compute_kind(probs.kind()),
            };
            let p = probs.to_kind(kind);
            let mean_b = p.mean_dim(0, false, kind);
            let centered = &p - mean_b.unsqueeze(0);
            let m2_b = centered.tr().mm(&centered);
            self.state = Some(match self.state.take() {
                None => (mean_b, m2_b),
                Some((mean_a, m2_a)) => {
                    let (na, nb, n) = (self.count as f64, nb as f64, (self.count + nb) as f64);
                    let d = &mean_b - &mean_a;
                    let mean = &mean_a + &d * (nb / n);
                    let outer = d.unsqueeze(1).mm(&d.unsqueeze(0));
                    (mean, m2_a + m2_b + outer * (na * nb / n))
                }
            });
            self.count += nb;
            Ok(())
        })
    }

    /// The `[N, N]` sample covariance `M / (n - 1)`; needs at least two examples.
    pub fn finish(&self) -> Result<Tensor> {
        match &self.state {
            Some((_, m2)) if self.count >= 2 => Ok(m2 / (self.count - 1) as f64),
            _ => Err(bad("probs", format!("a covariance needs at least 2 examples, got {}", self.count))),
        }
    }
}

/// Covariance of the columns of `probs: [n, N]`, the generalist's predicted distributions on
/// a held-out set: `C = (P - 1 m^T)^T (P - 1 m^T) / (n - 1)`, `[N, N]`, float (double if `probs`
/// is double), on `probs`' device. Classes that are predicted together have positive
/// covariance. Needs `n >= 2`; for data that do not fit in memory use
/// [`CovarianceAccumulator`].
///
/// # Example
/// ```
/// use kd_specialists::prediction_covariance;
/// use tch::Tensor;
///
/// // Classes 0 and 1 rise and fall together; class 2 moves against them.
/// let p = Tensor::from_slice(&[0.5f64, 0.5, 0.0, 0.0, 0.0, 1.0]).view([2, 3]);
/// let c = Vec::<f64>::try_from(prediction_covariance(&p).unwrap().view([-1])).unwrap();
/// // centered rows (0.25, 0.25, -0.5) and (-0.25, -0.25, 0.5); n - 1 = 1
/// assert_eq!(c, [0.125, 0.125, -0.25, 0.125, 0.125, -0.25, -0.25, -0.25, 0.5]);
/// ```
pub fn prediction_covariance(probs: &Tensor) -> Result<Tensor> {
    let mut acc = CovarianceAccumulator::new();
    acc.add(probs)?;
    acc.finish()
}

/// Correlation matrix from a covariance matrix `cov: [N, N]`:
/// `R[i, j] = C[i, j] / sqrt(C[i, i] C[j, j])`, same dtype and device (a class whose variance
/// is 0 gets a zero row and column).
///
/// Rows of a covariance matrix scale with how often their class is predicted, so rarely
/// predicted classes all sit near the origin and k-means tends to lump them into one cluster;
/// clustering the rows of `R` instead weighs every class alike. The paper clusters the
/// covariance itself; this is the variant to try when its subsets come out badly unbalanced.
///
/// # Example
/// ```
/// use kd_specialists::covariance_to_correlation;
/// use tch::Tensor;
///
/// let c = Tensor::from_slice(&[4.0f64, 1.0, 1.0, 1.0]).view([2, 2]);
/// let r = Vec::<f64>::try_from(covariance_to_correlation(&c).unwrap().view([-1])).unwrap();
/// assert_eq!(r, [1.0, 0.5, 0.5, 1.0]); // 1 / sqrt(4 * 1)
/// ```
pub fn covariance_to_correlation(cov: &Tensor) -> Result<Tensor> {
    let (rows, cols) = matrix("cov", cov)?;
    if rows != cols {
        return Err(bad("cov", format!("must be square [N, N], got shape {:?}", cov.size())));
    }
    Ok(tch::no_grad(|| {
        let sd = cov.diagonal(0, 0, 1).clamp_min(0.0).sqrt();
        let scale = sd.unsqueeze(1) * sd.unsqueeze(0);
        (cov / scale.clamp_min(f64::MIN_POSITIVE)).where_scalarother(&scale.gt(0.0), 0.0)
    }))
}

/// Confusion profiles of the classes: one unit-length row per class, for k-means.
///
/// ```text
/// L = max(A, 0) with diag(L) = 0          (positive links between different classes)
/// P = (I + rownorm(L)) / 2                 (lazy random walk on the links; a row of L
///                                            without links stays 0 before the I is added)
/// R = P^steps, each row scaled to unit length
/// ```
///
/// K-means of the raw columns of a covariance (or correlation) matrix over thousands of
/// classes tends to put most classes into one cluster: their columns are small and close to
/// each other, or nearly orthogonal unit-like vectors all about as far from each other, and a
/// mean of many of them is nearer to all of them than any other center. Profiles compare
/// classes by *whom* they are confused with: two classes linked to the same classes get close
/// rows, and `steps > 1` lets the walk reach classes two or more links away, so that clusters
/// grow from pairs into groups. Only the links' relative sizes within a row matter (the
/// diagonal is ignored), so the profiles do not depend on the affinity's scale. A class with no
/// link keeps `e_i`, orthogonal to every other profile. `affinity` is `[N, N]` (symmetric in use); the result is `[N, N]` of its kind
/// (float unless double) on its device. `steps >= 1`.
///
/// # Example
/// ```
/// use kd_specialists::class_profiles;
/// use tch::Tensor;
///
/// // Classes 0 and 1 are confused with each other, class 2 with nothing.
/// let a = Tensor::from_slice(&[1.0f64, 0.5, -0.1, 0.5, 1.0, -0.1, -0.1, -0.1, 1.0]).view([3, 3]);
/// let r = class_profiles(&a, 1).unwrap();
/// let rows = Vec::<f64>::try_from(r.view([-1])).unwrap();
/// let s = 0.5f64.sqrt();
/// let want = [s, s, 0.0, s, s, 0.0, 0.0, 0.0, 1.0];
/// assert!(rows.iter().zip(want).all(|(x, w)| (x - w).abs() < 1e-12));
/// ```
pub fn class_profiles(affinity: &Tensor, steps: i64) -> Result<Tensor> {
    let (rows, cols) = matrix("affinity", affinity)?;
    if rows != cols {
        return Err(bad("affinity", format!("must be square [N, N], got shape {:?}", affinity.size())));
    }
    if steps < 1 {
        return Err(bad("steps", format!("must be >= 1, got {steps}")));
    }
    let kind = compute_kind(affinity.kind());
    Ok(tch::no_grad(|| {
        let eye = Tensor::eye(rows, (kind, affinity.device()));
        let links = affinity.to_kind(kind).clamp_min(0.0) * (eye.ones_like() - &eye);
        let degree = links.sum_dim_intlist(1, true, kind);
        // (1e-30 stays above zero in float: a row without links divides 0 by it, not by 0.)
        let walk = (links / degree.clamp_min(1e-30) + &eye) * 0.5;
        let mut r = walk.shallow_clone();
        for _ in 1..steps {
            r = r.mm(&walk);
        }
        let norm = r.square().sum_dim_intlist(1, true, kind).sqrt();
        r / norm
    }))
}

/// Class affinity from a confusion matrix (the paper's section 7 variant), `[N, N]` float on
/// the labels' device.
///
/// ```text
/// K[i, j] = #{b : labels[b] = i, predicted[b] = j}
/// S = K + K^T, then diag(S) = 0                 (correct predictions say nothing about confusion)
/// W[i, :] = (e_i + S[i, :] / sum_j S[i, j]) / 2  (W[i, :] = e_i if class i is never confused)
/// ```
///
/// Every row sums to 1 (`W` is the lazy random walk on the confusion graph). The self-weight
/// `1/2` keeps a pair of classes confused only with each other together: without it their rows
/// would be `e_j` and `e_i`, as far apart as two unrelated classes.
///
/// `predicted` and `labels` are 1-D int64 of equal length with values in `[0, num_classes)`
/// (checked: this reads them back once).
///
/// # Example
/// ```
/// use kd_specialists::confusion_affinity;
/// use tch::Tensor;
///
/// // Class 0 was predicted as 1 twice, class 2 was always right.
/// let labels = Tensor::from_slice(&[0i64, 0, 2]);
/// let predicted = Tensor::from_slice(&[1i64, 1, 2]);
/// let w = Vec::<f32>::try_from(confusion_affinity(&predicted, &labels, 3).unwrap().view([-1])).unwrap();
/// assert_eq!(w, [0.5, 0.5, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0, 1.0]);
/// ```
pub fn confusion_affinity(predicted: &Tensor, labels: &Tensor, num_classes: i64) -> Result<Tensor> {
    if num_classes < 1 {
        return Err(bad("num_classes", format!("must be >= 1, got {num_classes}")));
    }
    let n = int_vector("labels", labels)?;
    let np = int_vector("predicted", predicted)?;
    if np != n {
        return Err(bad("predicted", format!("has length {np} but `labels` has length {n}")));
    }
    let device = labels.device();
    same_device("predicted", predicted, device, "labels")?;
    check_range("labels", labels, num_classes)?;
    check_range("predicted", predicted, num_classes)?;
    Ok(tch::no_grad(|| {
        let mut k = Tensor::zeros([num_classes, num_classes], (Kind::Float, device));
        let ones = Tensor::ones([n], (Kind::Float, device));
        let _ = k.index_put_(&[Some(labels), Some(predicted)], &ones, true);
        let mut s = &k + k.tr();
        let _ = s.fill_diagonal_(0.0, false);
        let rows = s.sum_dim_intlist(1, true, Kind::Float);
        let eye = Tensor::eye(num_classes, (Kind::Float, device));
        let walk = (&s / rows.clamp_min(f64::MIN_POSITIVE)).where_self(&rows.gt(0.0), &eye);
        (eye + walk) * 0.5
    }))
}

/// Fails naming `arg` if an entry of the int64 vector `x` is outside `[0, num_classes)`.
fn check_range(arg: &str, x: &Tensor, num_classes: i64) -> Result<()> {
    if x.numel() == 0 {
        return Ok(());
    }
    let (lo, hi) = (x.min().int64_value(&[]), x.max().int64_value(&[]));
    if lo < 0 || hi >= num_classes {
        let value = if lo < 0 { lo } else { hi };
        return Err(bad(arg, format!("holds class {value}, outside [0, num_classes = {num_classes})")));
    }
    Ok(())
}

/// Parameters of [`minibatch_kmeans`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KMeansConfig {
    /// Number of clusters `K` (the paper's JFT system has 61 specialists).
    pub clusters: i64,
    /// Points drawn (with replacement) per iteration.
    pub batch_size: i64,
    /// Number of mini-batch updates.
    pub iterations: i64,
    /// Seed of every random choice (initialization and batches).
    pub seed: u64,
}

impl Default for KMeansConfig {
    /// 61 clusters (the paper), batches of 1024, 200 iterations, seed 0.
    fn default() -> Self {
        KMeansConfig { clusters: 61, batch_size: 1024, iterations: 200, seed: 0 }
    }
}

impl KMeansConfig {
    /// Checks the fields against the number of points, naming the offending field.
    pub fn validate(&self, num_points: i64) -> Result<()> {
        if !(1..=num_points).contains(&self.clusters) {
            return Err(bad(
                "cfg.clusters",
                format!("must be in [1, {num_points}] (the number of points), got {}", self.clusters),
            ));
        }
        if self.batch_size < 1 {
            return Err(bad("cfg.batch_size", format!("must be >= 1, got {}", self.batch_size)));
        }
        if self.iterations < 0 {
            return Err(bad("cfg.iterations", format!("must be >= 0, got {}", self.iterations)));
        }
        Ok(())
    }
}

/// Mini-batch k-means (Sculley 2010) of the rows of `points: [num_points, dim]`; returns the
/// `[num_points]` int64 index of each point's nearest final center, on the points' device.
///
/// ```text
/// init      greedy k-means++ (first center uniform, then the best of 2 + ln K candidates drawn
///           with probability proportional to the squared distance to the nearest center)
/// repeat    B = batch_size points drawn uniformly with replacement
///           k(x) = argmin_c ||x - c||^2 for x in B, against the centers before the update
///           v_c += |B_c|,  c += (sum_{x in B_c} x - |B_c| c) / v_c
/// result    argmin_c ||a_i - c||^2 for every point
/// ```
///
/// The update equals Sculley's per-point step `c <- (1 - 1/v_c) c + x / v_c` applied to the
/// points of the batch in turn. Squared distances use `||x||^2 - 2 x.c + ||c||^2` (one matrix
/// product per batch). Deterministic for a given seed on the CPU; on a GPU the matrix products
/// may differ in the last bits between runs, which can only move points lying on a boundary.
/// A cluster can end up empty (e.g. with fewer distinct points than clusters); its index then
/// does not occur in the result.
///
/// # Example
/// ```
/// use kd_specialists::{minibatch_kmeans, KMeansConfig};
/// use tch::Tensor;
///
/// let points = Tensor::from_slice(&[0.0f32, 0.0, 0.1, 0.0, 5.0, 5.0, 5.0, 5.1]).view([4, 2]);
/// let cfg = KMeansConfig { clusters: 2, batch_size: 4, iterations: 10, seed: 1 };
/// let k = Vec::<i64>::try_from(minibatch_kmeans(&points, &cfg).unwrap()).unwrap();
/// assert_eq!(k[0], k[1]);
/// assert_eq!(k[2], k[3]);
/// assert_ne!(k[0], k[2]);
/// ```
pub fn minibatch_kmeans(points: &Tensor, cfg: &KMeansConfig) -> Result<Tensor> {
    let (n, _dim) = matrix("points", points)?;
    cfg.validate(n)?;
    let device = points.device();
    let kind = compute_kind(points.kind());
    let k = cfg.clusters;
    tch::no_grad(|| {
        let x = points.to_kind(kind);
        let x2 = x.square().sum_dim_intlist(1, false, kind);
        let mut rng = SplitMix64::new(cfg.seed);
        let mut centers = kmeans_plus_plus(&x, &x2, k, &mut rng)?;
        let mut counts = Tensor::zeros([k], (kind, device));
        for _ in 0..cfg.iterations {
            let picks: Vec<i64> = (0..cfg.batch_size).map(|_| rng.below(n)).collect();
            let picks = Tensor::from_slice(&picks).to_device(device);
            let (xb, xb2) = (x.f_index_select(0, &picks)?, x2.f_index_select(0, &picks)?);
            let nearest = squared_distances(&xb, &xb2, &centers).argmin(1, false);
            let onehot = nearest.one_hot(k).to_kind(kind); // [batch, K]
            let added = onehot.sum_dim_intlist(0, false, kind); // |B_c|
            let sums = onehot.tr().mm(&xb); // [K, dim]
            counts += &added;
            let step = (sums - added.unsqueeze(1) * &centers) / counts.clamp_min(1.0).unsqueeze(1);
            centers += step;
        }
        Ok(squared_distances(&x, &x2, &centers).argmin(1, false))
    })
}

/// `[rows of x, rows of c]` squared Euclidean distances, clamped at 0; `x2` = row norms of `x`.
fn squared_distances(x: &Tensor, x2: &Tensor, c: &Tensor) -> Tensor {
    let c2 = c.square().sum_dim_intlist(1, false, c.kind());
    (x2.unsqueeze(1) - x.mm(&c.tr()) * 2.0 + c2.unsqueeze(0)).clamp_min(0.0)
}

/// Greedy k-means++ seeding; `[k, dim]` centers, all on the points' device, no host round trip.
fn kmeans_plus_plus(x: &Tensor, x2: &Tensor, k: i64, rng: &mut SplitMix64) -> Result<Tensor> {
    let n = x.size()[0];
    let (device, kind) = (x.device(), x.kind());
    let first = Tensor::from_slice(&[rng.below(n)]).to_device(device);
    let mut centers = vec![x.f_index_select(0, &first)?];
    let mut closest = squared_distances(x, x2, &centers[0]).squeeze_dim(1); // [n]
    let trials = 2 + (k as f64).ln().floor() as i64;
    for _ in 1..k {
        let cumulative = closest.cumsum(0, kind);
        let total = cumulative.narrow(0, n - 1, 1);
        let targets = uniform_vector(rng, trials, kind).to_device(device) * total;
        // First index whose cumulative mass exceeds the target: a point already chosen (zero
        // mass) is never drawn while some mass is left.
        let drawn = targets.searchsorted(&cumulative, false, true, "right", None::<Tensor>).clamp_max(n - 1);
        let candidates = x.f_index_select(0, &drawn)?; // [trials, dim]
        let distances = squared_distances(x, x2, &candidates).minimum(&closest.unsqueeze(1)); // [n, trials]
        let best = distances.sum_dim_intlist(0, false, kind).argmin(0, true); // [1]
        centers.push(candidates.f_index_select(0, &best)?);
        closest = distances.f_index_select(1, &best)?.squeeze_dim(1);
    }
    Ok(Tensor::cat(&centers, 0))
}

/// Class subsets from an affinity or covariance matrix `affinity: [N, N]`: k-means of its rows
/// (= its columns, the matrix being symmetric), one subset per non-empty cluster.
///
/// With `repeats > 1` it runs k-means with seeds `cfg.seed, cfg.seed + 1, ...` and returns
/// the union of all runs' clusters, so subsets may overlap (as the paper's do). Subsets are
/// deduplicated, each sorted, and returned in lexicographic order of their class lists. Reads
/// each run's `[N]` assignment back to the host once.
///
/// # Example
/// ```
/// use kd_specialists::{class_subsets, prediction_covariance, KMeansConfig};
/// use tch::Tensor;
///
/// // Classes {0, 1} are predicted together, and so are {2, 3}.
/// let p = Tensor::from_slice(&[
///     0.5f32, 0.5, 0.0, 0.0,
///     0.4, 0.6, 0.0, 0.0,
///     0.0, 0.0, 0.5, 0.5,
///     0.0, 0.0, 0.7, 0.3,
/// ]).view([4, 4]);
/// let cov = prediction_covariance(&p).unwrap();
/// let cfg = KMeansConfig { clusters: 2, batch_size: 4, iterations: 20, seed: 0 };
/// let subsets = class_subsets(&cov, &cfg, 1).unwrap();
/// let classes: Vec<&[i64]> = subsets.iter().map(|s| s.classes()).collect();
/// assert_eq!(classes, [&[0, 1][..], &[2, 3]]);
/// ```
pub fn class_subsets(affinity: &Tensor, cfg: &KMeansConfig, repeats: usize) -> Result<Vec<ClassSubset>> {
    let (rows, cols) = matrix("affinity", affinity)?;
    if rows != cols {
        return Err(bad("affinity", format!("must be square [N, N], got shape {:?}", affinity.size())));
    }
    if repeats == 0 {
        return Err(bad("repeats", "must be >= 1, got 0"));
    }
    let mut found = BTreeSet::new();
    for r in 0..repeats {
        let run = KMeansConfig { seed: cfg.seed.wrapping_add(r as u64), ..*cfg };
        let assignment = Vec::<i64>::try_from(minibatch_kmeans(affinity, &run)?.to_device(Device::Cpu))?;
        let mut clusters = vec![Vec::new(); cfg.clusters as usize];
        for (class, &cluster) in assignment.iter().enumerate() {
            clusters[cluster as usize].push(class as i64);
        }
        found.extend(clusters.into_iter().filter(|c| !c.is_empty()));
    }
    found.into_iter().map(|classes| ClassSubset::new(classes, rows)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::uniform;

    /// 12 classes in 3 planted groups of 4: each example's distribution puts its mass on one
    /// group (0.7 on a random member, the rest of the group sharing 0.25 unevenly) plus noise.
    fn grouped_predictions(examples: i64, seed: u64) -> (Tensor, Vec<Vec<i64>>) {
        let groups: Vec<Vec<i64>> = vec![vec![0, 4, 8, 9], vec![1, 2, 5, 11], vec![3, 6, 7, 10]];
        let mut rng = SplitMix64::new(seed);
        let mut rows = Vec::new();
        for _ in 0..examples {
            let group = &groups[rng.below(3) as usize];
            let top = group[rng.below(4) as usize];
            let mut p: Vec<f64> = (0..12).map(|_| 0.05 * rng.next_f64() / 12.0).collect();
            let shares: Vec<f64> = (0..3).map(|_| 0.2 + rng.next_f64()).collect();
            let total: f64 = shares.iter().sum();
            for (&c, share) in group.iter().filter(|&&c| c != top).zip(&shares) {
                p[c as usize] += 0.25 * share / total;
            }
            p[top as usize] += 0.7;
            let s: f64 = p.iter().sum();
            rows.extend(p.iter().map(|v| v / s));
        }
        (Tensor::from_slice(&rows).view([examples, 12]), groups)
    }

    fn class_lists(subsets: &[ClassSubset]) -> Vec<Vec<i64>> {
        subsets.iter().map(|s| s.classes().to_vec()).collect()
    }

    #[test]
    fn accumulated_covariance_equals_the_one_shot_covariance() {
        let _generator = kd_core::lock_global_generator();
        let p = uniform(&[50, 7], 3).to_kind(Kind::Double);
        let whole = prediction_covariance(&p).unwrap();
        let mut acc = CovarianceAccumulator::new();
        for (start, len) in [(0, 1), (1, 20), (21, 29)] {
            acc.add(&p.narrow(0, start, len)).unwrap();
        }
        assert_eq!(acc.count(), 50);
        assert!(acc.finish().unwrap().allclose(&whole, 1e-12, 1e-12, false));
        // Against the textbook formula.
        let c = &p - p.mean_dim(0, true, Kind::Double);
        assert!(whole.allclose(&(c.tr().mm(&c) / 49.0), 1e-12, 1e-12, false));
    }

    #[test]
    fn correlation_has_a_unit_diagonal_and_recovers_the_planted_groups() {
        let _generator = kd_core::lock_global_generator();
        let (p, groups) = grouped_predictions(300, 3);
        let r = covariance_to_correlation(&prediction_covariance(&p).unwrap()).unwrap();
        let cfg = KMeansConfig { clusters: 3, batch_size: 6, iterations: 100, seed: 0 };
        assert_eq!(class_lists(&class_subsets(&r, &cfg, 1).unwrap()), groups);
        // A class never predicted has variance 0: a zero row, not NaN.
        let p = Tensor::cat(&[p, Tensor::zeros([300, 1], (Kind::Double, Device::Cpu))], 1);
        let r = covariance_to_correlation(&prediction_covariance(&p).unwrap()).unwrap();
        let diagonal = Vec::<f64>::try_from(r.diagonal(0, 0, 1)).unwrap();
        assert!(diagonal[..12].iter().all(|d| (d - 1.0).abs() < 1e-12) && diagonal[12] == 0.0);
        assert!(f64::try_from(r.abs().max()).unwrap() <= 1.0 + 1e-12);
        assert_eq!(f64::try_from(r.get(12).abs().sum(Kind::Double)).unwrap(), 0.0);
    }

    #[test]
    fn covariance_clusters_recover_the_planted_groups() {
        let _generator = kd_core::lock_global_generator();
        let (p, groups) = grouped_predictions(600, 11);
        let cov = prediction_covariance(&p).unwrap();
        for seed in 0..5 {
            let cfg = KMeansConfig { clusters: 3, batch_size: 6, iterations: 100, seed };
            let subsets = class_subsets(&cov, &cfg, 1).unwrap();
            assert_eq!(class_lists(&subsets), groups, "seed {seed}");
            assert!(subsets.iter().all(|s| s.num_classes() == 12));
        }
    }

    #[test]
    fn profiles_are_unit_rows_that_follow_the_links_and_recover_the_planted_groups() {
        let _generator = kd_core::lock_global_generator();
        // A chain 0 - 1 - 2 and a class 3 linked to nothing (negative entries are no links).
        let a = Tensor::from_slice(&[
            1.0f64, 0.3, -0.2, -0.1, //
            0.3, 1.0, 0.3, -0.1, //
            -0.2, 0.3, 1.0, -0.1, //
            -0.1, -0.1, -0.1, 1.0,
        ])
        .view([4, 4]);
        let one = class_profiles(&a, 1).unwrap();
        let two = class_profiles(&a, 2).unwrap();
        for r in [&one, &two] {
            let norms = r.square().sum_dim_intlist(1, false, Kind::Double).sqrt();
            assert!(norms.allclose(&Tensor::ones([4], (Kind::Double, Device::Cpu)), 1e-12, 1e-12, false));
            assert_eq!(Vec::<f64>::try_from(r.get(3)).unwrap(), [0.0, 0.0, 0.0, 1.0], "no link: e_3");
        }
        assert_eq!(one.double_value(&[0, 2]), 0.0, "one step reaches the neighbours only");
        assert!(two.double_value(&[0, 2]) > 0.0, "two steps reach the neighbours' neighbours");
        // Classes 0 and 2 share the neighbour 1: the longer walk brings their profiles closer,
        // while the unlinked class stays orthogonal to both.
        let cos = |r: &Tensor, i: i64, j: i64| f64::try_from(r.get(i).dot(&r.get(j))).unwrap();
        assert!(cos(&two, 0, 2) > cos(&one, 0, 2) && cos(&one, 0, 2) > 0.0);
        assert_eq!((cos(&two, 0, 3), cos(&two, 2, 3)), (0.0, 0.0));

        let (p, groups) = grouped_predictions(600, 11);
        let profiles = class_profiles(&prediction_covariance(&p).unwrap(), 2).unwrap();
        let cfg = KMeansConfig { clusters: 3, batch_size: 12, iterations: 50, seed: 4 };
        let mut want = groups.clone();
        want.sort();
        assert_eq!(class_lists(&class_subsets(&profiles, &cfg, 1).unwrap()), want);
        // In float, a class without links still gets e_i (no 0 / 0).
        let isolated = class_profiles(&Tensor::eye(3, (Kind::Float, Device::Cpu)), 3).unwrap();
        assert!(isolated.equal(&Tensor::eye(3, (Kind::Float, Device::Cpu))));
        assert!(class_profiles(&a, 0).is_err());
        assert!(class_profiles(&a.narrow(0, 0, 3), 1).is_err());
    }

    #[test]
    fn confusion_clusters_recover_the_planted_groups() {
        let _generator = kd_core::lock_global_generator();
        let (p, groups) = grouped_predictions(600, 5);
        // Labels: the most probable class; predictions: a sample from p, so mistakes stay in
        // the group.
        let labels = p.argmax(1, false);
        let cumulative = p.cumsum(1, Kind::Double);
        let u = uniform(&[600, 1], 9).to_kind(Kind::Double);
        let predicted = cumulative.lt_tensor(&u).sum_dim_intlist(1, false, Kind::Int64).clamp_max(11);
        let w = confusion_affinity(&predicted, &labels, 12).unwrap();
        let row_sums = w.sum_dim_intlist(1, false, Kind::Float);
        assert!(row_sums.allclose(&Tensor::ones([12], (Kind::Float, Device::Cpu)), 1e-6, 1e-6, false));
        let diagonal = Vec::<f32>::try_from(w.diagonal(0, 0, 1)).unwrap();
        assert!(diagonal.iter().all(|&d| d >= 0.5), "self-weight at least 1/2: {diagonal:?}");
        let cfg = KMeansConfig { clusters: 3, batch_size: 6, iterations: 100, seed: 2 };
        assert_eq!(class_lists(&class_subsets(&w, &cfg, 1).unwrap()), groups);
    }

    #[test]
    fn a_pair_confused_only_with_each_other_is_one_cluster() {
        let _generator = kd_core::lock_global_generator();
        // 0 <-> 1 and 2 <-> 3 are confused; without the self-weight rows 0 and 1 would be e_1 and e_0.
        let labels = Tensor::from_slice(&[0i64, 1, 2, 3, 0, 2]);
        let predicted = Tensor::from_slice(&[1i64, 0, 3, 2, 0, 2]);
        let w = confusion_affinity(&predicted, &labels, 4).unwrap();
        let cfg = KMeansConfig { clusters: 2, batch_size: 4, iterations: 20, seed: 0 };
        assert_eq!(class_lists(&class_subsets(&w, &cfg, 1).unwrap()), [vec![0, 1], vec![2, 3]]);
    }

    #[test]
    fn kmeans_is_deterministic_for_a_seed_and_repeats_add_overlapping_subsets() {
        let _generator = kd_core::lock_global_generator();
        let points = uniform(&[40, 40], 1);
        let cfg = KMeansConfig { clusters: 4, batch_size: 8, iterations: 30, seed: 7 };
        let a = minibatch_kmeans(&points, &cfg).unwrap();
        let b = minibatch_kmeans(&points, &cfg).unwrap();
        assert!(a.equal(&b));
        assert_eq!(a.size(), [40]);
        assert_eq!(a.kind(), Kind::Int64);
        let labels = Vec::<i64>::try_from(&a).unwrap();
        assert!(labels.iter().all(|&l| (0..4).contains(&l)));

        let once = class_subsets(&points, &cfg, 1).unwrap();
        let thrice = class_subsets(&points, &cfg, 3).unwrap();
        assert_eq!(class_subsets(&points, &cfg, 3).unwrap(), thrice);
        let covered: usize = once.iter().map(|s| s.len() as usize).sum();
        assert_eq!(covered, 40, "one run is a partition");
        assert!(once.iter().all(|s| thrice.contains(s)), "the union contains the first run");
        let mut deduped = thrice.clone();
        deduped.dedup();
        assert_eq!(deduped.len(), thrice.len());
    }

    #[test]
    fn kmeans_seeding_spreads_over_separated_blobs() {
        let _generator = kd_core::lock_global_generator();
        // 5 tight blobs of 30 points in 30 dimensions: k-means++ must find every blob.
        let mut rows = Vec::new();
        let noise = uniform(&[150, 30], 4);
        for b in 0..5 {
            let mut center = vec![0.0f32; 30];
            center[b * 6] = 10.0;
            let c = Tensor::from_slice(&center).view([1, 30]);
            rows.push(&c + noise.narrow(0, 30 * b as i64, 30) * 0.1);
        }
        let points = Tensor::cat(&rows, 0);
        let cfg = KMeansConfig { clusters: 5, batch_size: 32, iterations: 50, seed: 3 };
        let k = Vec::<i64>::try_from(minibatch_kmeans(&points, &cfg).unwrap()).unwrap();
        for b in 0..5 {
            let blob = &k[30 * b..30 * (b + 1)];
            assert!(blob.iter().all(|&c| c == blob[0]), "blob {b}: {blob:?}");
        }
        let distinct: BTreeSet<i64> = k.iter().copied().collect();
        assert_eq!(distinct.len(), 5);
    }

    /// The acoustic model's scale, 14,000 classes of dimension 14,000 in 61 planted clusters, on
    /// CUDA (1,000 on the CPU when there is none). Run with `cargo test -p kd-specialists --
    /// --ignored`.
    #[test]
    #[ignore = "large: 14,000 x 14,000 on a GPU"]
    fn kmeans_at_acoustic_scale() {
        let _generator = kd_core::lock_global_generator();
        let device = Device::cuda_if_available();
        let n = if device.is_cuda() { 14_000 } else { 1_000 };
        let k = 61;
        let centers = uniform(&[k, n], 12).to_device(device);
        let group = Tensor::arange(n, (Kind::Int64, device)).remainder(k);
        let points = centers.index_select(0, &group) + Tensor::rand([n, n], (Kind::Float, device)) * 0.1;
        let cfg = KMeansConfig { clusters: k, batch_size: 1024, iterations: 200, seed: 0 };
        let start = std::time::Instant::now();
        let assignment = minibatch_kmeans(&points, &cfg).unwrap();
        let assignment = Vec::<i64>::try_from(assignment.to_device(Device::Cpu)).unwrap();
        eprintln!("mini-batch k-means of {n} x {n} into {k} on {device:?}: {:?}", start.elapsed());
        for g in 0..k as usize {
            let members: BTreeSet<i64> = assignment.iter().skip(g).step_by(k as usize).copied().collect();
            assert_eq!(members.len(), 1, "planted cluster {g} split: {members:?}");
        }
        assert_eq!(assignment.iter().copied().collect::<BTreeSet<_>>().len(), k as usize);
    }

    #[test]
    fn bad_arguments_are_rejected_naming_them() {
        let _generator = kd_core::lock_global_generator();
        let square = Tensor::zeros([4, 4], (Kind::Float, Device::Cpu));
        let ok = KMeansConfig { clusters: 2, batch_size: 2, iterations: 1, seed: 0 };
        let labels = Tensor::from_slice(&[0i64, 1]);
        let cases: Vec<(Result<()>, &str)> = vec![
            (
                minibatch_kmeans(&Tensor::zeros([4], (Kind::Float, Device::Cpu)), &ok).map(drop),
                "`points`: must have rank 2",
            ),
            (
                minibatch_kmeans(&Tensor::zeros([4, 2], (Kind::Int64, Device::Cpu)), &ok).map(drop),
                "`points`: must be a floating-point",
            ),
            (minibatch_kmeans(&square, &KMeansConfig { clusters: 5, ..ok }).map(drop), "`cfg.clusters`"),
            (minibatch_kmeans(&square, &KMeansConfig { clusters: 0, ..ok }).map(drop), "`cfg.clusters`"),
            (minibatch_kmeans(&square, &KMeansConfig { batch_size: 0, ..ok }).map(drop), "`cfg.batch_size`"),
            (minibatch_kmeans(&square, &KMeansConfig { iterations: -1, ..ok }).map(drop), "`cfg.iterations`"),
            (
                class_subsets(&Tensor::zeros([4, 3], (Kind::Float, Device::Cpu)), &ok, 1).map(drop),
                "`affinity`: must be square",
            ),
            (class_subsets(&square, &ok, 0).map(drop), "`repeats`"),
            (
                prediction_covariance(&Tensor::zeros([1, 3], (Kind::Float, Device::Cpu))).map(drop),
                "at least 2 examples",
            ),
            (
                prediction_covariance(&Tensor::zeros([0, 3], (Kind::Float, Device::Cpu))).map(drop),
                "`probs`: has an empty dimension",
            ),
            (confusion_affinity(&labels, &labels, 0).map(drop), "`num_classes`"),
            (
                covariance_to_correlation(&Tensor::zeros([2, 3], (Kind::Float, Device::Cpu))).map(drop),
                "`cov`: must be square",
            ),
            (confusion_affinity(&Tensor::from_slice(&[0i64]), &labels, 2).map(drop), "`predicted`: has length 1"),
            (confusion_affinity(&labels, &Tensor::from_slice(&[0i64, 2]), 2).map(drop), "`labels`: holds class 2"),
            (confusion_affinity(&Tensor::from_slice(&[-1i64, 0]), &labels, 2).map(drop), "`predicted`: holds class -1"),
            (confusion_affinity(&labels, &labels.to_kind(Kind::Int), 2).map(drop), "`labels`: must be an int64"),
        ];
        for (result, expected) in cases {
            let err = result.unwrap_err().to_string();
            assert!(err.contains(expected), "expected {expected:?} in {err:?}");
        }
        let mut acc = CovarianceAccumulator::new();
        acc.add(&Tensor::zeros([2, 3], (Kind::Float, Device::Cpu))).unwrap();
        let err = acc.add(&Tensor::zeros([2, 4], (Kind::Float, Device::Cpu))).unwrap_err().to_string();
        assert!(err.contains("has 4 classes but earlier batches had 3"), "{err}");
    }
}
