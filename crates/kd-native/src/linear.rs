//! Linear layers whose forward product runs on oneDNN where that is faster than libtorch's
//! default CPU kernel:
//! ```text
//! y = x W^T + b             (relu: y = max(0, x W^T + b), the ReLU fused into the product)
//! ```
//! for `x` of shape `[rows, in]`, `W` of `[out, in]`, `b` of `[out]`.
//!
//! On the CPU, `torch.nn.functional.linear` in f32 calls MKL's sgemm (`addmm`). libtorch also
//! carries oneDNN's linear kernel (`mkldnn::_linear_pointwise`, what PyTorch's compiler emits
//! for CPU linear layers), which runs the same product 10 to 80% faster on batches of 64 rows
//! or more (the acoustic and MNIST layers of `kd-run bench`, on CPUs with AVX2 or AVX-512) and
//! fuses the ReLU. [`linear`] takes it for such layers and keeps libtorch's `linear` (and ReLU)
//! for everything else: CUDA, other element types, small batches or layers (where oneDNN's
//! fixed cost per call dominates), and a libtorch without oneDNN ([`onednn_available`]).
//!
//! The backward pass is PyTorch's own for a linear layer and a ReLU, call for call (the ReLU's
//! `threshold_backward` on the output, `mm` for the input and weight gradients, a sum over the
//! rows for the bias), so gradients differ from `linear`'s only by the forward product's
//! rounding: oneDNN sums in another order than MKL, which changes the last bits of `y`. A layer
//! taken to oneDNN is not differentiable twice.
//!
//! ```
//! use tch::{Device, Kind, Tensor};
//!
//! let x = Tensor::randn([128, 300], (Kind::Float, Device::Cpu)).set_requires_grad(true);
//! let w = Tensor::randn([200, 300], (Kind::Float, Device::Cpu)).set_requires_grad(true);
//! let b = Tensor::randn([200], (Kind::Float, Device::Cpu)).set_requires_grad(true);
//! let y = kd_native::linear::linear(&x, &w, Some(&b), true);
//! let reference = x.linear(&w, Some(&b)).relu();
//! assert!(y.allclose(&reference, 1e-4, 1e-4, false));
//! y.sum(Kind::Float).backward();
//! assert_eq!(w.grad().size(), [200, 300]);
//! ```
use crate::{ffi, native, Result};
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

/// Rows (and output features) from which a layer's forward product goes to oneDNN: below
/// them its fixed cost per call (10 to 20 us) outweighs what it saves (measured with
/// PyTorch 2.11 on 2 threads of an AMD EPYC, its AVX-512 and AVX2 kernels).
pub const MIN_ROWS: i64 = 64;
/// See [`MIN_ROWS`].
pub const MIN_OUTPUTS: i64 = 64;

/// Which kernel computes a layer's forward product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// oneDNN's linear kernel, with the ReLU fused.
    OneDnn,
    /// libtorch's `linear` (MKL's sgemm on the CPU, cuBLAS on CUDA), then ReLU.
    Default,
}

/// Whether this libtorch has oneDNN's linear kernel, and oneDNN is enabled.
pub fn onednn_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(ffi::onednn_linear_available)
}

/// The kernel [`linear`] takes for these arguments: oneDNN for f32 CPU tensors with `x` of at
/// least [`MIN_ROWS`] rows, at least [`MIN_OUTPUTS`] output features and a contiguous weight,
/// where oneDNN is available; libtorch's default otherwise.
pub fn kernel_for(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Kernel {
    let f32_cpu = |t: &Tensor| t.kind() == Kind::Float && t.device() == Device::Cpu;
    let fits = x.dim() == 2
        && weight.dim() == 2
        && f32_cpu(x)
        && f32_cpu(weight)
        && bias.is_none_or(|b| f32_cpu(b) && b.dim() == 1)
        && weight.is_contiguous()
        && x.size()[0] >= MIN_ROWS
        && weight.size()[0] >= MIN_OUTPUTS
        && x.size()[1] == weight.size()[1];
    if fits && onednn_available() {
        Kernel::OneDnn
    } else {
        Kernel::Default
    }
}

/// `x W^T + b`, followed by a ReLU with `relu`, on the kernel [`kernel_for`] picks, with the
/// gradients of PyTorch's `linear` (and `relu`). Fails where libtorch does (shapes that do
/// not match).
pub fn f_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, relu: bool) -> Result<Tensor> {
    match kernel_for(x, weight, bias) {
        Kernel::OneDnn => ffi::onednn_linear(x, weight, bias, relu).map_err(native("linear layer on oneDNN")),
        Kernel::Default => {
            let y =
                x.f_linear(weight, bias).map_err(|e| crate::Error::Native { op: "linear", message: e.to_string() })?;
            Ok(if relu { y.relu() } else { y })
        }
    }
}

/// [`f_linear`], panicking where it fails, as tch's own operations do.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, relu: bool) -> Tensor {
    f_linear(x, weight, bias, relu).unwrap_or_else(|e| panic!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn randn(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }

    /// The layer's value and its three gradients on the kernel `kernel_for` picks, against
    /// libtorch's `linear` and `relu` under autograd.
    fn matches_pytorch(rows: i64, inputs: i64, outputs: i64, relu: bool, bias: bool) -> Kernel {
        let leaf = |t: Tensor| t.set_requires_grad(true);
        let (x, w, b) = (leaf(randn(&[rows, inputs])), leaf(randn(&[outputs, inputs])), leaf(randn(&[outputs])));
        let b = bias.then_some(&b);
        let g = randn(&[rows, outputs]);
        let kernel = kernel_for(&x, &w, b);
        let ours = linear(&x, &w, b, relu);
        let theirs = x.linear(&w, b);
        let theirs = if relu { theirs.relu() } else { theirs };
        // oneDNN sums the products in another order: f32 rounding of sums over `inputs` terms.
        assert!(ours.allclose(&theirs, 1e-4, 1e-4, false), "value, {kernel:?}");
        let mut params = vec![&x, &w];
        params.extend(b);
        let grads = |y: &Tensor| Tensor::run_backward(&[(y * &g).sum(Kind::Float)], &params, false, false);
        for (i, (a, e)) in grads(&ours).iter().zip(grads(&theirs)).enumerate() {
            // A value near zero may fall on the other side of the ReLU: compare where both agree.
            assert!(a.allclose(&e, 1e-3, 1e-3, false), "gradient {i}, {kernel:?}: max diff {}", (a - &e).abs().max());
        }
        kernel
    }

    #[test]
    fn layers_on_either_kernel_give_pytorch_values_and_gradients() {
        let _generator = kd_core::lock_global_generator();
        tch::manual_seed(3);
        let big = if onednn_available() { Kernel::OneDnn } else { Kernel::Default };
        assert_eq!(matches_pytorch(128, 96, 80, true, true), big);
        assert_eq!(matches_pytorch(64, 33, 64, false, true), big);
        assert_eq!(matches_pytorch(100, 40, 70, true, false), big);
        assert_eq!(matches_pytorch(8, 96, 80, true, true), Kernel::Default);
        assert_eq!(matches_pytorch(128, 96, 10, false, true), Kernel::Default);
    }

    #[test]
    fn other_element_types_and_shapes_take_the_default_kernel() {
        let w = Tensor::zeros([80, 16], (Kind::Float, Device::Cpu));
        let x = Tensor::zeros([128, 16], (Kind::Double, Device::Cpu));
        assert_eq!(kernel_for(&x, &w.to_kind(Kind::Double), None), Kernel::Default);
        assert_eq!(kernel_for(&Tensor::zeros([2, 64, 16], (Kind::Float, Device::Cpu)), &w, None), Kernel::Default);
        assert_eq!(kernel_for(&x.to_kind(Kind::Float), &w.tr().contiguous().tr(), None), Kernel::Default);
        let y = linear(&x, &w.to_kind(Kind::Double), None, true);
        assert_eq!(y.size(), [128, 80]);
    }

    #[test]
    fn shapes_that_do_not_match_are_an_error() {
        let x = Tensor::zeros([128, 16], (Kind::Float, Device::Cpu));
        let w = Tensor::zeros([80, 17], (Kind::Float, Device::Cpu));
        assert!(f_linear(&x, &w, None, false).is_err());
        let b = Tensor::zeros([79], (Kind::Float, Device::Cpu));
        assert!(f_linear(&x, &w.narrow(1, 0, 16).contiguous(), Some(&b), false).is_err());
    }
}
