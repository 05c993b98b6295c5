//! The fused optimizer kernels against the same updates written out in tch ops, over several
//! steps with random gradients, on the CPU and, when present, on CUDA.
use kd_native::optim::{adam_steps, fused_adam, fused_sgd, AdamOptions, Lr, SgdOptions};
use tch::{Device, Kind, Tensor};

fn devices() -> Vec<Device> {
    let mut out = vec![Device::Cpu];
    if tch::Cuda::is_available() {
        out.push(Device::Cuda(0));
    }
    out
}

/// Parameters of a small MLP's shapes, and a gradient for each of `steps` steps.
fn problem(device: Device, kind: Kind, steps: usize) -> (Vec<Tensor>, Vec<Vec<Tensor>>) {
    tch::manual_seed(7);
    let shapes: [&[i64]; 4] = [&[30, 20], &[30], &[5, 30], &[5]];
    let params = shapes.iter().map(|s| Tensor::randn(*s, (kind, device))).collect::<Vec<_>>();
    let grads = (0..steps).map(|_| params.iter().map(|p| p.randn_like() * 0.5).collect()).collect();
    (params, grads)
}

fn copies(ts: &[Tensor]) -> Vec<Tensor> {
    ts.iter().map(Tensor::copy).collect()
}

fn max_diff(a: &[Tensor], b: &[Tensor]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs().max().double_value(&[])).fold(0.0, f64::max)
}

/// SGD as kd-run's optimizer and torch.optim.SGD compute it: L2 weight decay into the gradient,
/// `b <- mu b + (1 - d) g` from a zero buffer, nesterov `g + mu b`.
fn sgd_reference(params: &mut [Tensor], grads: &[Vec<Tensor>], o: &SgdOptions, lr: f64) {
    let mut bufs: Vec<Tensor> = params.iter().map(Tensor::zeros_like).collect();
    for step in grads {
        for ((p, g), b) in params.iter_mut().zip(step).zip(bufs.iter_mut()) {
            let g = g + &*p * o.weight_decay;
            let d = if o.momentum == 0.0 {
                g
            } else {
                *b = &*b * o.momentum + &g * (1.0 - o.dampening);
                if o.nesterov {
                    g + &*b * o.momentum
                } else {
                    b.shallow_clone()
                }
            };
            *p = &*p - d * lr;
        }
    }
}

/// Adam with bias correction and L2 weight decay (kd-run's and torch.optim.Adam's), or AdamW.
fn adam_reference(params: &mut [Tensor], grads: &[Vec<Tensor>], o: &AdamOptions, lr: f64) {
    let mut m: Vec<Tensor> = params.iter().map(Tensor::zeros_like).collect();
    let mut v: Vec<Tensor> = params.iter().map(Tensor::zeros_like).collect();
    for (t, step) in grads.iter().enumerate() {
        let t = t as i32 + 1;
        let (bc1, bc2) = (1.0 - o.beta1.powi(t), 1.0 - o.beta2.powi(t));
        for (i, (p, g)) in params.iter_mut().zip(step).enumerate() {
            let g = if o.decoupled_weight_decay {
                *p = &*p * (1.0 - lr * o.weight_decay);
                g.shallow_clone()
            } else {
                g + &*p * o.weight_decay
            };
            m[i] = &m[i] * o.beta1 + &g * (1.0 - o.beta1);
            v[i] = &v[i] * o.beta2 + g.square() * (1.0 - o.beta2);
            let denom = v[i].sqrt() / bc2.sqrt() + o.eps;
            *p = &*p - (&m[i] / denom) * (lr / bc1);
        }
    }
}

#[test]
fn fused_sgd_equals_the_reference() {
    let _generator = kd_core::lock_global_generator();
    let table = [
        SgdOptions { momentum: 0.0, ..Default::default() },
        SgdOptions { momentum: 0.9, ..Default::default() },
        SgdOptions { momentum: 0.9, weight_decay: 0.01, nesterov: true, ..Default::default() },
        SgdOptions { momentum: 0.5, dampening: 0.3, weight_decay: 0.001, ..Default::default() },
    ];
    for device in devices() {
        for (kind, tol) in [(Kind::Float, 1e-5), (Kind::Double, 1e-12)] {
            for o in &table {
                let (start, grads) = problem(device, kind, 5);
                let lr = 0.05;
                let mut want = copies(&start);
                sgd_reference(&mut want, &grads, o, lr);
                let mut got = copies(&start);
                let mut bufs: Vec<Tensor> =
                    if o.momentum > 0.0 { got.iter().map(Tensor::zeros_like).collect() } else { vec![] };
                // The learning rate as a number, and as a device tensor from step 3 on.
                let lr_t = Tensor::from(lr).to_kind(kind).to(device);
                for (i, g) in grads.iter().enumerate() {
                    let lr = if i < 2 { Lr::Value(lr) } else { Lr::Tensor(&lr_t) };
                    fused_sgd(&mut got, g, &mut bufs, o, lr).unwrap();
                }
                let moved = max_diff(&got, &start);
                let diff = max_diff(&got, &want);
                assert!(moved > 0.05, "{o:?} {kind:?} {device:?}: parameters barely moved ({moved})");
                assert!(diff < tol, "{o:?} {kind:?} {device:?}: fused SGD differs by {diff}");
            }
        }
    }
}

#[test]
fn fused_sgd_first_step_sets_the_buffer_to_the_gradient() {
    let _generator = kd_core::lock_global_generator();
    // With dampening, PyTorch's first step sets b <- g (no (1 - d) factor); a zero buffer gives
    // (1 - d) g instead. `is_first_step` selects the former.
    let mut p = vec![Tensor::from_slice(&[1.0f64])];
    let g = vec![Tensor::from_slice(&[2.0f64])];
    let mut b = vec![Tensor::from_slice(&[123.0f64])];
    let o = SgdOptions { momentum: 0.9, dampening: 0.5, is_first_step: true, ..Default::default() };
    fused_sgd(&mut p, &g, &mut b, &o, Lr::Value(0.1)).unwrap();
    assert_eq!(f64::try_from(&b[0]).unwrap(), 2.0);
    assert!((f64::try_from(&p[0]).unwrap() - 0.8).abs() < 1e-15);
}

#[test]
fn fused_adam_equals_the_reference() {
    let _generator = kd_core::lock_global_generator();
    let table = [
        AdamOptions::default(),
        AdamOptions { weight_decay: 0.1, ..Default::default() },
        AdamOptions { beta1: 0.8, beta2: 0.99, eps: 1e-6, weight_decay: 0.05, decoupled_weight_decay: true },
    ];
    for device in devices() {
        for (kind, tol) in [(Kind::Float, 1e-5), (Kind::Double, 1e-12)] {
            for o in &table {
                let (start, grads) = problem(device, kind, 6);
                let lr = 0.01;
                let mut want = copies(&start);
                adam_reference(&mut want, &grads, o, lr);
                let mut got = copies(&start);
                let mut m: Vec<Tensor> = got.iter().map(Tensor::zeros_like).collect();
                let mut v: Vec<Tensor> = got.iter().map(Tensor::zeros_like).collect();
                let mut steps = adam_steps(&got);
                let lr_t = Tensor::from(lr).to_kind(kind).to(device);
                for (i, g) in grads.iter().enumerate() {
                    let lr = if i < 3 { Lr::Value(lr) } else { Lr::Tensor(&lr_t) };
                    fused_adam(&mut got, g, &mut m, &mut v, &mut steps, o, lr).unwrap();
                }
                let moved = max_diff(&got, &start);
                let diff = max_diff(&got, &want);
                assert!(moved > 0.03, "{o:?} {kind:?} {device:?}: parameters barely moved ({moved})");
                assert!(diff < tol, "{o:?} {kind:?} {device:?}: fused Adam differs by {diff}");
                assert_eq!(f64::try_from(&steps[0].to(Device::Cpu)).unwrap(), grads.len() as f64);
            }
        }
    }
}

/// A resumed run restores the moments and step counts and continues exactly.
#[test]
fn fused_adam_resumes_from_saved_state() {
    let _generator = kd_core::lock_global_generator();
    let (start, grads) = problem(Device::Cpu, Kind::Float, 4);
    let o = AdamOptions::default();
    let run = |split: Option<usize>| {
        let mut p = copies(&start);
        let mut m: Vec<Tensor> = p.iter().map(Tensor::zeros_like).collect();
        let mut v: Vec<Tensor> = p.iter().map(Tensor::zeros_like).collect();
        let mut s = adam_steps(&p);
        for (i, g) in grads.iter().enumerate() {
            if Some(i) == split {
                // What a checkpoint round trip does: fresh tensors holding the same values.
                (p, m, v, s) = (copies(&p), copies(&m), copies(&v), copies(&s));
            }
            fused_adam(&mut p, g, &mut m, &mut v, &mut s, &o, Lr::Value(1e-3)).unwrap();
        }
        p
    };
    assert_eq!(max_diff(&run(None), &run(Some(2))), 0.0);
}

#[test]
fn fused_steps_reject_mismatched_lists() {
    let _generator = kd_core::lock_global_generator();
    let (mut p, grads) = problem(Device::Cpu, Kind::Float, 1);
    let mut bufs: Vec<Tensor> = p.iter().map(Tensor::zeros_like).collect();
    let o = SgdOptions { momentum: 0.9, ..Default::default() };
    let err = fused_sgd(&mut p, &grads[0][..3], &mut bufs, &o, Lr::Value(0.1)).unwrap_err().to_string();
    assert!(err.contains("3 gradients for 4 parameters"), "{err}");
    let err = fused_sgd(&mut p, &grads[0], &mut [], &o, Lr::Value(0.1)).unwrap_err().to_string();
    assert!(err.contains("0 momentum buffers with momentum 0.9"), "{err}");
    let mut swapped = copies(&grads[0]);
    swapped.swap(0, 2);
    let err = fused_sgd(&mut p, &swapped, &mut bufs, &o, Lr::Value(0.1)).unwrap_err().to_string();
    assert!(err.contains("gradients[0] has shape [5, 30], parameter 0 has [30, 20]"), "{err}");
    let err = fused_sgd(&mut p, &grads[0], &mut bufs, &o, Lr::Value(f64::NAN)).unwrap_err().to_string();
    assert!(err.contains("learning rate NaN"), "{err}");
    let (mut m, mut v, mut s) = (copies(&bufs), copies(&bufs), adam_steps(&p));
    let bad = AdamOptions { beta2: 1.0, ..Default::default() };
    let err = fused_adam(&mut p, &grads[0], &mut m, &mut v, &mut s, &bad, Lr::Value(0.1)).unwrap_err().to_string();
    assert!(err.contains("beta2 = 1"), "{err}");
    // An error raised inside libtorch comes back as a message, not an abort: mixed kinds.
    let mut mixed: Vec<Tensor> = m.iter().map(|t| t.to_kind(Kind::Double)).collect();
    let err = fused_adam(&mut p, &grads[0], &mut mixed, &mut v, &mut s, &AdamOptions::default(), Lr::Value(0.1))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("fused Adam failed: "), "{err}");
}
