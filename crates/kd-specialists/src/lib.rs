//! Specialist models (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural
//! Network", section 5): a generalist trained on all classes, plus specialists that each
//! separate the classes of one confusable subset `S_m` from a dustbin class standing for all
//! the others, combined at inference by minimizing eq. 5.
//!
//! ```text
//! 1. subsets     k-means of the rows of C = Cov(p^g) over a held-out set        (cluster)
//!                (or of the confusion affinity W), or better of their confusion
//!                profiles (class_profiles); repeats give overlapping subsets
//! 2. data        half examples of S_m, half of the rest; factor = (1 - f) / f   (subset)
//!                for a subset holding a share f of the data
//! 3. model       the generalist's hidden layers, a head of width |S_m| + 1      (model)
//!                after training: b_dustbin += ln(factor)
//! 4. inference   A = {m : S_m holds one of the generalist's top-n classes}      (combine)
//!                q* = argmin_q KL(p^g || q) + sum_{m in A} KL(p^m || D_m(q))    (eq. 5)
//!                D_m(q) = [q restricted to S_m, sum_{c not in S_m} q_c],  q = softmax(z)
//! ```
//!
//! Tensors and class ids in; assignments, models and distributions out: no file I/O, no
//! printing, no configuration formats. Every random choice follows from an explicit seed.
//! Generalist and specialist outputs are inputs here: compute them once, under `no_grad`, in
//! evaluation mode. Every function checks its arguments first and returns an [`Error`] naming
//! the bad one.
//!
//! # Example
//! ```
//! use kd_specialists::{
//!     active_specialists, class_subsets, combine, prediction_covariance, ClassSubset, CombineConfig,
//!     KMeansConfig,
//! };
//! use tch::{Kind, Tensor};
//!
//! // A generalist's predictions over 4 classes: {0, 1} and {2, 3} are predicted together.
//! let held_out = Tensor::from_slice(&[
//!     0.6f64, 0.4, 0.0, 0.0,
//!     0.3, 0.7, 0.0, 0.0,
//!     0.0, 0.0, 0.5, 0.5,
//!     0.0, 0.0, 0.8, 0.2,
//! ]).view([4, 4]);
//! let cfg = KMeansConfig { clusters: 2, batch_size: 4, iterations: 20, seed: 0 };
//! let subsets = class_subsets(&prediction_covariance(&held_out).unwrap(), &cfg, 1).unwrap();
//! assert_eq!(subsets, [ClassSubset::new([0, 1], 4).unwrap(), ClassSubset::new([2, 3], 4).unwrap()]);
//!
//! // One test example: the generalist leans to class 1, the {0, 1} specialist is sure of 0.
//! let pg = Tensor::from_slice(&[0.4f64, 0.45, 0.1, 0.05]).view([1, 4]);
//! let active = active_specialists(&pg, &subsets, 1).unwrap();
//! assert_eq!(Vec::<bool>::try_from(active.view([-1])).unwrap(), [true, false]);
//! let p0 = Tensor::from_slice(&[0.8f64, 0.1, 0.1]).view([1, 3]); // classes 0, 1, dustbin
//! let p1 = Tensor::from_slice(&[0.5f64, 0.5, 0.0]).view([1, 3]); // inactive: ignored
//! let specialists = [(&subsets[0], &p0), (&subsets[1], &p1)];
//! let q = combine(&pg, &specialists, &active, &CombineConfig::default()).unwrap().probs;
//! assert_eq!(i64::try_from(q.argmax(1, false)).unwrap(), 0);
//! assert!((f64::try_from(q.sum(Kind::Double)).unwrap() - 1.0).abs() < 1e-12);
//! ```
#![deny(missing_docs)]

pub mod cluster;
pub mod combine;
mod error;
pub mod model;
mod rng;
pub mod subset;

pub use cluster::{
    class_profiles, class_subsets, confusion_affinity, covariance_to_correlation, minibatch_kmeans,
    prediction_covariance, CovarianceAccumulator, KMeansConfig,
};
pub use combine::{active_specialists, combine, covering_specialists, CombineConfig, Combined};
pub use error::{Error, Result};
pub use model::{raise_dustbin, specialist_from_generalist};
pub use subset::{balanced_indices, dustbin_logit_shift, ClassSubset};
