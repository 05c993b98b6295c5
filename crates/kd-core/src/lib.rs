//! Loss functions for knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the
//! Knowledge in a Neural Network"), on top of libtorch via `tch`.
//!
//! Tensors in, tensors out: no I/O, no configuration types, no printing. All logits and
//! probabilities are `[batch, classes]`; the softmax is over the last dimension.
//!
//! ```text
//! temperature softmax   q_i = exp(z_i / T) / sum_j exp(z_j / T)
//! soft loss             C_soft = T^2 * mean_b sum_i -p_i log q_i,  p = softmax(v / T) (teacher, detached)
//! its gradient          dC_soft/dz_i = T (q_i - p_i) / B          (paper eq. 2, times T^2)
//! its KL form           C_soft - T^2 * mean_b H(p) = T^2 * mean_b KL(p || q)  (same gradient; 0 at q = p)
//! hard loss             C_hard = mean_b -log softmax(z)_y          (T = 1, never scaled)
//! combined              total = w_hard * C_hard + w_soft * C_soft
//! logit matching        C_lm = mean_b (1/(2N)) sum_i (z_i - v_i)^2  (the T -> inf limit of C_soft, eq. 4)
//! ensemble              p = mean_m softmax(z_m / T)                 (or geometric mean / mean logits)
//! ensemble as logits    v = T (logsumexp_m log_softmax(z_m / T) - ln M),  softmax(v / T) = p
//! top-k soft loss       C_soft with p kept as k (class, probability) pairs: T^2 mean_b sum_k p_k (lse(z/T) - z_c_k / T)
//! top-k kept mass       mass_b = sum_k softmax(v_b / T)_c_k          (what the renormalized top k keep of p)
//! ```
//!
//! Conventions (see the paper summary's "Loss conventions"): the soft term is reduced as a
//! mean over the batch of per-example sums over classes ("batchmean") and multiplied by `T^2`;
//! the hard term is at `T = 1`; teachers are always detached; the student should be evaluated
//! at `T = 1` after training.
//!
//! [`Objective`] holds one validated choice of loss (hard labels, soft targets at `T` with their
//! weights, or logit matching) and computes it for a batch from dense teacher logits, cached
//! soft targets or top-k targets ([`TeacherTargets`], which remember the `T` they were made at),
//! or the labels alone.
//!
//! Every function validates its arguments from tensor metadata only (never synchronizing a
//! GPU) and returns [`Error`] instead of panicking. Teacher tensors are cast to the student's
//! dtype; all tensors must be on the student's device.
#![deny(missing_docs)]

mod check;
mod ensemble;
mod error;
mod generator;
mod loss;
mod objective;
mod softmax;
mod topk;

pub use check::{matrix_shape, MatrixProblem};
pub use ensemble::{ensemble_logits, ensemble_probs, EnsembleRule};
pub use error::{Error, Result};
pub use generator::{lock_global_generator, seed_global_generator, GeneratorGuard};
pub use loss::{
    distillation_loss, hard_target_loss, logit_matching_loss, soft_target_loss, soft_target_loss_from_probs,
    DistillLoss, LossWeights, SoftTargets,
};
pub use objective::{Objective, TeacherTargets};
pub use softmax::{log_softmax_t, softmax_t};
pub use topk::{top_k_distillation_loss, top_k_mass, top_k_soft_target_loss, TopKForm, TopKTargets};
