//! The specialist pipeline end to end on synthetic data, with only the public API:
//! cluster a generalist's classes, build and correct one specialist, combine.
//!
//! Run with `cargo run -p kd-specialists --example specialists`.

use kd_models::{Mlp, MlpConfig};
use kd_specialists::{
    active_specialists, balanced_indices, class_profiles, class_subsets, combine, covariance_to_correlation,
    covering_specialists, dustbin_logit_shift, prediction_covariance, raise_dustbin, specialist_from_generalist,
    CombineConfig, KMeansConfig,
};
use tch::{nn, nn::ModuleT, Device, Kind, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tch::manual_seed(0);
    let device = Device::Cpu;
    let (inputs, classes, examples) = (20, 30, 512);

    // An untrained generalist stands in for a trained one; its outputs are computed once.
    let gvs = nn::VarStore::new(device);
    let generalist = Mlp::new(&gvs.root(), MlpConfig::plain([inputs, 64, 64, classes]))?;
    let x = Tensor::randn([examples, inputs], (Kind::Float, device));
    let labels = Tensor::randint(classes, [examples], (Kind::Int64, device));
    let pg = tch::no_grad(|| generalist.forward_t(&(&x * 3.0), false).softmax(1, Kind::Float));

    // 1. Subsets: k-means of confusion profiles built from the prediction covariance (as a
    //    correlation, so that rarely predicted classes are not lumped together; two steps of
    //    the walk over its positive links), two runs for overlapping subsets.
    let cov = prediction_covariance(&pg)?;
    let cfg = KMeansConfig { clusters: 4, batch_size: 16, iterations: 50, seed: 1 };
    let profiles = class_profiles(&covariance_to_correlation(&cov)?, 2)?;
    let subsets = class_subsets(&profiles, &cfg, 2)?;
    println!(
        "covariance {:?}; {} subsets of sizes {:?}",
        cov.size(),
        subsets.len(),
        subsets.iter().map(|s| s.len()).collect::<Vec<_>>()
    );

    // 2. A specialist's training sample and its oversampling factor.
    let subset = &subsets[0];
    let (idx, factor) = balanced_indices(&labels, subset, 256, 7)?;
    let local = subset.to_local(&labels.index_select(0, &idx))?;
    println!("sample {:?}, local labels in [0, {}], oversampling factor {factor:.2}", idx.size(), subset.dustbin());

    // 3. The specialist, started from the generalist; (training would go here) then corrected.
    let (svs, specialist) = specialist_from_generalist(&gvs, &generalist, subset, device)?;
    raise_dustbin(&svs, subset, dustbin_logit_shift(factor))?;
    println!("specialist {:?}, local labels {:?}", specialist.config().sizes, local.size());

    // 4. Inference: every subset gets a specialist (here all copies of the same kind).
    let mut nets = Vec::new();
    for s in &subsets {
        let (vs, net) = specialist_from_generalist(&gvs, &generalist, s, device)?;
        let probs = tch::no_grad(|| net.forward_t(&(&x * 3.0), false).softmax(1, Kind::Float));
        nets.push((vs, probs));
    }
    let active = active_specialists(&pg, &subsets, 1)?;
    let pairs: Vec<_> = subsets.iter().zip(nets.iter().map(|(_, p)| p)).collect();
    let out = combine(&pg, &pairs, &active, &CombineConfig::default())?;
    let covering = covering_specialists(&labels, &subsets)?;
    println!(
        "active {:?} ({} pairs), combined {:?} after {} steps, objective {:.4} -> {:.4}, labels covered by >= 1: {}",
        active.size(),
        i64::try_from(active.sum(Kind::Int64))?,
        out.probs.size(),
        out.iterations,
        out.objective.first().copied().unwrap_or(f64::NAN),
        out.objective.last().copied().unwrap_or(f64::NAN),
        i64::try_from(covering.gt(0).sum(Kind::Int64))?,
    );
    Ok(())
}
