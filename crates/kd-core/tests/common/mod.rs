//! Helpers shared by the integration tests: fixed inputs, autograd and finite differences.
#![allow(dead_code)]

use tch::{Device, Kind, Tensor};

/// Fixed student logits, 3 x 5.
pub const S: [f64; 15] = [1.5, -0.5, 2.0, 0.3, -1.2, 0.1, 0.7, -2.1, 1.9, -0.4, -1.0, 2.5, 0.0, -0.8, 1.1];
/// Fixed teacher logits, 3 x 5.
pub const V: [f64; 15] = [2.2, -1.0, 0.5, 0.9, -0.3, -0.6, 1.4, -1.5, 2.8, 0.2, 0.4, 1.8, -0.7, -1.9, 0.6];
/// Labels for S.
pub const Y: [i64; 3] = [2, 3, 1];

/// `[rows, len/rows]` f64 tensor from a slice.
pub fn mat(v: &[f64], rows: i64) -> Tensor {
    Tensor::from_slice(v).view([rows, -1])
}

pub fn student() -> Tensor {
    mat(&S, 3)
}
pub fn teacher() -> Tensor {
    mat(&V, 3)
}
pub fn labels() -> Tensor {
    Tensor::from_slice(&Y)
}

/// Subtracts each row's mean (zero-mean logits, paper eq. 4).
pub fn zero_mean(x: &Tensor) -> Tensor {
    x - x.mean_dim(-1, true, None)
}

pub fn to_vec(x: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(x.to_kind(Kind::Double).to_device(Device::Cpu).flatten(0, -1)).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    to_vec(a).iter().zip(to_vec(b)).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

pub fn norm(x: &Tensor) -> f64 {
    to_vec(x).iter().map(|v| v * v).sum::<f64>().sqrt()
}

/// Gradient of the scalar `f(x)` w.r.t. `x` by autograd.
pub fn autograd(f: impl Fn(&Tensor) -> Tensor, x: &Tensor) -> Tensor {
    let x = x.detach().copy().set_requires_grad(true);
    let y = f(&x);
    assert_eq!(y.size(), Vec::<i64>::new(), "loss must be 0-dim");
    Tensor::run_backward(&[y], &[&x], false, false).remove(0)
}

/// Central finite-difference gradient of the scalar `f(x)` (f64) with step `h`.
pub fn finite_diff(f: impl Fn(&Tensor) -> Tensor, x: &Tensor, h: f64) -> Tensor {
    let base = to_vec(x);
    let shape = x.size();
    let eval = |v: &[f64]| f(&Tensor::from_slice(v).view(shape.as_slice())).double_value(&[]);
    let mut g = vec![0.0; base.len()];
    for (i, gi) in g.iter_mut().enumerate() {
        let mut plus = base.clone();
        let mut minus = base.clone();
        plus[i] += h;
        minus[i] -= h;
        *gi = (eval(&plus) - eval(&minus)) / (2.0 * h);
    }
    Tensor::from_slice(&g).view(shape.as_slice())
}
