//! libtorch's fused optimizer kernels: one call updates a whole list of parameters in one pass
//! over each (on CUDA, a few kernel launches for all of them), the kernels behind PyTorch's
//! `torch.optim.SGD(fused=True)` and `torch.optim.Adam(fused=True)`.
//!
//! SGD with momentum `mu`, dampening `d`, weight decay `wd` (PyTorch's convention):
//! ```text
//! g <- g + wd * p
//! b <- g                              on the first step (is_first_step), else
//! b <- mu * b + (1 - d) * g
//! p <- p - lr * (g + mu * b)          nesterov
//! p <- p - lr * b                     otherwise
//! ```
//! A zero-initialized buffer with `d = 0` and `is_first_step = false` gives the same first step
//! as `b <- g`, which is how an optimizer that checkpoints zero buffers can call it every step.
//!
//! Adam (L2 weight decay added to the gradient; with `decoupled_weight_decay`, AdamW's
//! `p <- p * (1 - lr * wd)` instead), `t` the step count after incrementing it:
//! ```text
//! t <- t + 1
//! m <- b1 * m + (1 - b1) * g
//! v <- b2 * v + (1 - b2) * g^2
//! p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! ```
//! The step counts are one 0-dim f32 tensor per parameter on the parameters' device
//! ([`adam_steps`]); [`fused_adam`] increments them before the kernel reads them (as
//! `torch.optim.Adam` does), so they are part of the optimizer's state.
//!
//! All lists must have the same length, and for each parameter its gradient and states the
//! same shape, element type and device. Mixed devices or element types are an error from
//! libtorch (the PyTorch optimizers group by them first).
use crate::ffi::{self, AdamArgs, SgdArgs};
use crate::{native, Error, Result};
use tch::{Kind, Tensor};

/// The learning rate: a number, or a 0-dim tensor on the parameters' device (which a CUDA graph
/// captures by address, so a schedule can change it between replays with `fill_`).
#[derive(Clone, Copy, Debug)]
pub enum Lr<'a> {
    /// A fixed value for this call.
    Value(f64),
    /// A 0-dim floating-point tensor read by the kernel.
    Tensor(&'a Tensor),
}

impl<'a> Lr<'a> {
    fn split(self) -> Result<(f64, Option<&'a Tensor>)> {
        match self {
            Lr::Value(v) if v.is_finite() && v >= 0.0 => Ok((v, None)),
            Lr::Value(v) => Err(Error::Invalid(format!("learning rate {v}: expected a finite value >= 0"))),
            Lr::Tensor(t) if t.dim() == 0 && t.is_floating_point() => Ok((0.0, Some(t))),
            Lr::Tensor(t) => Err(Error::Invalid(format!(
                "learning-rate tensor of shape {:?} and kind {:?}: expected a 0-dim floating-point tensor",
                t.size(),
                t.kind()
            ))),
        }
    }
}

/// SGD's settings (PyTorch's names and defaults, without the learning rate).
#[derive(Clone, Debug, PartialEq)]
pub struct SgdOptions {
    /// `mu`; 0 disables the momentum buffers.
    pub momentum: f64,
    /// `d`, the share of the gradient left out of the buffer.
    pub dampening: f64,
    /// L2 weight decay added to the gradient.
    pub weight_decay: f64,
    /// Nesterov momentum (needs `momentum > 0` and `dampening = 0`).
    pub nesterov: bool,
    /// Whether this is the first step: the buffers are set to the gradient instead of updated.
    pub is_first_step: bool,
}

impl Default for SgdOptions {
    fn default() -> Self {
        SgdOptions { momentum: 0.0, dampening: 0.0, weight_decay: 0.0, nesterov: false, is_first_step: false }
    }
}

/// Adam's settings (PyTorch's names and defaults, without the learning rate).
#[derive(Clone, Debug, PartialEq)]
pub struct AdamOptions {
    /// The first moment's decay.
    pub beta1: f64,
    /// The second moment's decay.
    pub beta2: f64,
    /// Added to `sqrt(v_hat)`.
    pub eps: f64,
    /// Weight decay: L2 (added to the gradient), or decoupled (AdamW).
    pub weight_decay: f64,
    /// AdamW's decoupled weight decay instead of L2.
    pub decoupled_weight_decay: bool,
}

impl Default for AdamOptions {
    fn default() -> Self {
        AdamOptions { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, decoupled_weight_decay: false }
    }
}

fn check_lists(what: &str, params: &[Tensor], lists: &[(&str, &[Tensor])]) -> Result<()> {
    for (name, list) in lists {
        if list.len() != params.len() {
            return Err(Error::Invalid(format!(
                "{what}: {} {name} for {} parameters; expected one per parameter",
                list.len(),
                params.len()
            )));
        }
        for (i, (p, t)) in params.iter().zip(list.iter()).enumerate() {
            if p.size() != t.size() && !(*name == "steps" && t.dim() == 0) {
                return Err(Error::Invalid(format!(
                    "{what}: {name}[{i}] has shape {:?}, parameter {i} has {:?}",
                    t.size(),
                    p.size()
                )));
            }
            if p.device() != t.device() {
                return Err(Error::Invalid(format!(
                    "{what}: {name}[{i}] is on {:?}, parameter {i} on {:?}",
                    t.device(),
                    p.device()
                )));
            }
        }
    }
    Ok(())
}

/// One fused SGD step (`at::_fused_sgd_`) over `params`, in place; `momentum_buffers` holds one
/// buffer per parameter, or none when `opts.momentum` is 0. Runs without autograd.
///
/// ```
/// use kd_native::optim::{fused_sgd, Lr, SgdOptions};
/// use tch::Tensor;
///
/// let mut p = vec![Tensor::from_slice(&[1.0f32])];
/// let g = vec![Tensor::from_slice(&[0.5f32])];
/// let mut b = vec![p[0].zeros_like()];
/// let opts = SgdOptions { momentum: 0.5, ..Default::default() };
/// fused_sgd(&mut p, &g, &mut b, &opts, Lr::Value(0.1)).unwrap(); // b = 0.5, p = 1 - 0.05
/// fused_sgd(&mut p, &g, &mut b, &opts, Lr::Value(0.1)).unwrap(); // b = 0.75, p = 0.95 - 0.075
/// assert!((f32::try_from(&p[0]).unwrap() - 0.875).abs() < 1e-6);
/// ```
pub fn fused_sgd(
    params: &mut [Tensor],
    grads: &[Tensor],
    momentum_buffers: &mut [Tensor],
    opts: &SgdOptions,
    lr: Lr,
) -> Result<()> {
    let what = "fused SGD";
    if opts.momentum == 0.0 && !momentum_buffers.is_empty() || opts.momentum != 0.0 && momentum_buffers.is_empty() {
        return Err(Error::Invalid(format!(
            "{what}: {} momentum buffers with momentum {}; expected one per parameter exactly when momentum > 0",
            momentum_buffers.len(),
            opts.momentum
        )));
    }
    if opts.nesterov && (opts.momentum <= 0.0 || opts.dampening != 0.0) {
        return Err(Error::Invalid(format!("{what}: nesterov needs momentum > 0 and dampening 0")));
    }
    check_lists(what, params, &[("gradients", grads)])?;
    if !momentum_buffers.is_empty() {
        check_lists(what, params, &[("momentum buffers", momentum_buffers)])?;
    }
    if params.is_empty() {
        return Ok(());
    }
    let (lr, lr_tensor) = lr.split()?;
    let _guard = tch::no_grad_guard();
    let args = SgdArgs {
        weight_decay: opts.weight_decay,
        momentum: opts.momentum,
        lr,
        lr_tensor,
        dampening: opts.dampening,
        nesterov: opts.nesterov,
        is_first_step: opts.is_first_step,
    };
    ffi::fused_sgd(params, grads, momentum_buffers, &args).map_err(native(what))
}

/// Zero step counts for [`fused_adam`]: one 0-dim f32 tensor per parameter, on its device.
pub fn adam_steps(params: &[Tensor]) -> Vec<Tensor> {
    params.iter().map(|p| Tensor::zeros([], (Kind::Float, p.device()))).collect()
}

/// One fused Adam step (`at::_fused_adam_`, or `_fused_adamw_` with decoupled weight decay) over
/// `params`, in place, updating the moments and incrementing the step counts. Runs without
/// autograd.
///
/// ```
/// use kd_native::optim::{adam_steps, fused_adam, AdamOptions, Lr};
/// use tch::Tensor;
///
/// let mut p = vec![Tensor::from_slice(&[1.0f32, -1.0])];
/// let g = vec![Tensor::from_slice(&[0.3f32, -2.0])];
/// let (mut m, mut v, mut t) = (vec![p[0].zeros_like()], vec![p[0].zeros_like()], adam_steps(&p));
/// fused_adam(&mut p, &g, &mut m, &mut v, &mut t, &AdamOptions::default(), Lr::Value(0.01)).unwrap();
/// // The first bias-corrected step moves each coordinate by lr * sign(g) (up to eps).
/// let got = Vec::<f32>::try_from(&p[0]).unwrap();
/// assert!((got[0] - 0.99).abs() < 1e-6 && (got[1] + 0.99).abs() < 1e-6);
/// assert_eq!(f32::try_from(&t[0]).unwrap(), 1.0);
/// ```
pub fn fused_adam(
    params: &mut [Tensor],
    grads: &[Tensor],
    exp_avgs: &mut [Tensor],
    exp_avg_sqs: &mut [Tensor],
    steps: &mut [Tensor],
    opts: &AdamOptions,
    lr: Lr,
) -> Result<()> {
    let what = "fused Adam";
    check_lists(
        what,
        params,
        &[("gradients", grads), ("first moments", exp_avgs), ("second moments", exp_avg_sqs), ("steps", steps)],
    )?;
    for (name, v) in [("beta1", opts.beta1), ("beta2", opts.beta2)] {
        if !(0.0..1.0).contains(&v) {
            return Err(Error::Invalid(format!("{what}: {name} = {v}; expected 0 <= {name} < 1")));
        }
    }
    if params.is_empty() {
        return Ok(());
    }
    let (lr, lr_tensor) = lr.split()?;
    let _guard = tch::no_grad_guard();
    for s in steps.iter_mut() {
        let _ = s.g_add_scalar_(1.0);
    }
    let args = AdamArgs {
        lr,
        lr_tensor,
        beta1: opts.beta1,
        beta2: opts.beta2,
        weight_decay: opts.weight_decay,
        eps: opts.eps,
        decoupled_weight_decay: opts.decoupled_weight_decay,
    };
    ffi::fused_adam(params, grads, exp_avgs, exp_avg_sqs, steps, &args).map_err(native(what))
}
