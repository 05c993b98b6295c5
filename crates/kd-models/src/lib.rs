//! Network architectures of the paper, built on `tch`.
//!
//! Every model here is a multilayer perceptron of ReLU units:
//!
//! ```text
//! h_0 = dropout_in(x)
//! h_l = dropout_hidden(relu(W_l h_{l-1} + b_l))      l = 1 .. L-1
//! z   = W_L h_{L-1} + b_L                            (logits)
//! ```
//!
//! with dropout active only in training, and an optional max-norm constraint on each unit's
//! incoming weight vector, `||W_l[j, :]||_2 <= c`, applied after every optimizer step
//! ([`Mlp::apply_max_norm`]). The presets are the paper's MNIST teacher (784-1200-1200-10)
//! and student (784-800-800-10) and the 8 x 2560 acoustic DNN with a 14,000-way softmax.
//!
//! This crate knows nothing of experiments, files or training loops: a checkpoint is a list of
//! named tensors ([`Mlp::to_tensors`] / [`Mlp::from_tensors`]) that the caller writes with
//! `Tensor::write_safetensors` and reads with `Tensor::read_safetensors`.
//!
//! # Example
//! ```
//! use kd_models::{Mlp, MlpConfig};
//! use tch::{nn, nn::ModuleT, Device, Kind, Tensor};
//!
//! let vs = nn::VarStore::new(Device::Cpu);
//! let net = Mlp::new(&vs.root(), MlpConfig::mnist_student()).unwrap();
//! assert_eq!(net.num_params(), 784 * 800 + 800 + 800 * 800 + 800 + 800 * 10 + 10);
//! let logits = net.forward_t(&Tensor::zeros([3, 784], (Kind::Float, Device::Cpu)), false);
//! assert_eq!(logits.size(), [3, 10]);
//!
//! // A checkpoint carries the layer sizes, so it can be loaded without the config that made it.
//! let saved = net.to_tensors(&vs);
//! let (_vs2, net2) = Mlp::from_tensors(&saved, Device::Cpu).unwrap();
//! assert_eq!(net2.config(), net.config());
//! ```
#![deny(missing_docs)]

mod mlp;

pub use mlp::{BatchRows, LayerwiseForward, Mlp, MlpConfig, CONFIG_PREFIX};

/// Errors of model construction and checkpoint loading.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is out of range; the message names the field and the value.
    #[error("invalid model config: {0}")]
    Config(String),
    /// A checkpoint does not match the model it is loaded into.
    #[error("checkpoint does not fit the model: {0}")]
    Checkpoint(String),
    /// An error raised by libtorch.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
