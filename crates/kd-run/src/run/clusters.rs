//! Clusters stages: class subsets from a generalist's predictions on held-out examples
//! (section 5 of the paper), recorded for the specialists stages that read them.

use super::ctx::Ctx;
use super::specialists::distinct;
use super::tables::Tables;
use crate::config::{Affinity, ClustersJob};
use crate::run::output::SubsetRow;
use crate::train::{self, EVAL_BATCH};
use anyhow::{bail, Context, Result};
use kd_specialists::{
    class_profiles, class_subsets, confusion_affinity, covariance_to_correlation, ClassSubset, CovarianceAccumulator,
    KMeansConfig,
};
use tch::{nn::ModuleT, Kind, Tensor};
use tracing::info;

/// Runs a `clusters` stage: the generalist's predicted distributions over the validation
/// split, the affinity between classes, k-means of the classes' confusion profiles (or of
/// the affinity's columns, with `walk_steps = 0`), and the subsets kept, in `subsets.csv`
/// (most confused first). The profiles take `walk_steps - 1` products of `[N, N]`
/// matrices: 2 N^3 flops each, 1.6e10 for 2,000 classes, 5.5e12 for 14,000.
pub(super) fn run(ctx: &Ctx, tables: &mut Tables, stage: &str, job: &ClustersJob) -> Result<()> {
    let ClustersJob {
        source,
        affinity,
        clusters,
        walk_steps,
        repeats,
        extra_clusters,
        max_overlap,
        min_size,
        max_size,
        count,
        kmeans_iterations,
        kmeans_batch,
        seed,
    } = job;
    let classes = ctx.data.num_classes;
    let ks: Vec<i64> = std::iter::once(*clusters).chain(extra_clusters.iter().copied()).collect();
    if let Some(k) = ks.iter().find(|&&k| k > classes) {
        bail!("stage `{stage}`: {k} clusters asked for, but the data has {classes} classes");
    }
    let net = ctx.load_model(source)?.1.frozen();
    let val = ctx.data.validation.as_ref().context("subsets come from the validation split")?;
    let matrix = tch::no_grad(|| -> Result<Tensor> {
        let mut covariance = CovarianceAccumulator::new();
        let predicted = train::in_chunks(val.len(), EVAL_BATCH, |start, len| {
            let probs = net.forward_t(&val.range(start, len), false).softmax(1, Kind::Float);
            covariance.add(&probs)?;
            Ok(probs.argmax(1, false))
        })?;
        Ok(match affinity {
            Affinity::Covariance => covariance.finish()?,
            Affinity::Correlation => covariance_to_correlation(&covariance.finish()?)?,
            Affinity::Confusion => confusion_affinity(&Tensor::cat(&predicted, 0), &val.labels, classes)?,
        })
    })?;
    let points = if *walk_steps > 0 { class_profiles(&matrix, *walk_steps)? } else { matrix.shallow_clone() };
    let mut found = std::collections::BTreeSet::new();
    for &k in &ks {
        let cfg = KMeansConfig { clusters: k, batch_size: *kmeans_batch, iterations: *kmeans_iterations, seed: *seed };
        found.extend(class_subsets(&points, &cfg, *repeats as usize)?);
    }
    let total = found.len();
    // Confusion between different classes only: the positive off-diagonal entries.
    let off_diagonal: Tensor = 1.0 - Tensor::eye(classes, (Kind::Double, matrix.device()));
    let links: Tensor = matrix.to_kind(Kind::Double).clamp_min(0.0) * off_diagonal;
    let mut scored: Vec<(ClassSubset, f64, f64)> = found
        .into_iter()
        .filter(|s| s.len() >= *min_size && max_size.is_none_or(|m| s.len() <= m))
        .map(|s| {
            let idx = Tensor::from_slice(s.classes()).to(matrix.device());
            let rows = links.index_select(0, &idx);
            let inside = rows.index_select(1, &idx).sum(Kind::Double).double_value(&[]);
            let all = rows.sum(Kind::Double).double_value(&[]);
            (s, inside, if all > 0.0 { inside / all } else { 0.0 })
        })
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1));
    if let Some(bound) = max_overlap {
        scored = distinct(scored, |(s, _, _)| s, *bound);
    }
    scored.truncate(count.map_or(usize::MAX, |c| c as usize));
    if scored.is_empty() {
        bail!(
            "stage `{stage}`: none of the {total} subsets has between {min_size} and {} classes",
            max_size.map_or("any number of".to_string(), |m| m.to_string())
        );
    }
    info!(
        "stage `{stage}`: {} subsets kept of {total} found ({:?} affinity over {} validation examples), sizes {:?}",
        scored.len(),
        affinity,
        val.len(),
        scored.iter().map(|(s, _, _)| s.len()).collect::<Vec<_>>()
    );
    tables.subsets.retain(|r| r.stage != stage);
    for (m, (subset, mass, within)) in scored.into_iter().enumerate() {
        tables.subsets.push(SubsetRow {
            stage: stage.to_string(),
            subset: m as i64,
            size: subset.len(),
            mass,
            within,
            classes: subset.classes().iter().map(i64::to_string).collect::<Vec<_>>().join(" "),
        });
    }
    Ok(())
}
