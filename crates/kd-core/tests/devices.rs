//! One test body run on CPU and, when `tch::Cuda::is_available()`, on CUDA (skipped otherwise).
//! Each device runs f64 (tolerance 1e-10) and f32 (tolerance 2e-5) against explicit CPU f64
//! references, and checks outputs stay on the input device.

mod common;

use common::*;
use kd_core::{
    distillation_loss, ensemble_probs, hard_target_loss, logit_matching_loss, soft_target_loss, softmax_t,
    EnsembleRule, Error, LossWeights, SoftTargets,
};
use tch::{Device, Kind, Tensor};

fn body(device: Device) {
    let (s, v, y) = (student(), teacher(), labels());
    let b = 3.0;
    let t = 4.0;
    // CPU f64 references, written out explicitly.
    let q = (&s / t).softmax(-1, None);
    let p = (&v / t).softmax(-1, None);
    let soft_ref = -(&p * (&s / t).log_softmax(-1, None)).sum_dim_intlist(-1, false, None).mean(None) * (t * t);
    let hard_ref = -s.log_softmax(-1, None).gather(1, &y.view([3, 1]), false).mean(None);
    let lm_ref = (&s - &v).square().mean(None) * 0.5;
    let grad_ref = (&q - &p) * (0.7 * t / b) + (s.softmax(-1, None) - y.one_hot(5)) * (0.3 / b);
    let ens_ref = (q.shallow_clone() + &p) / 2.0;

    for (kind, tol) in [(Kind::Double, 1e-10), (Kind::Float, 2e-5)] {
        let on = |x: &Tensor| x.to_kind(kind).to_device(device);
        let (sd, vd, yd) = (on(&s), on(&v), y.to_device(device));
        let check = |name: &str, got: &Tensor, want: &Tensor| {
            assert_eq!(got.device(), device, "{name}: device");
            assert_eq!(got.kind(), kind, "{name}: dtype");
            let err = max_abs_diff(got, want);
            let scale = 1.0 + to_vec(want).iter().fold(0.0f64, |m, x| m.max(x.abs()));
            assert!(err < tol * scale, "{name} on {device:?}/{kind:?}: {err:e}");
        };
        check("softmax_t", &softmax_t(&sd, t).unwrap(), &q);
        check("soft", &soft_target_loss(&sd, &vd, t).unwrap(), &soft_ref);
        check("hard", &hard_target_loss(&sd, &yd).unwrap(), &hard_ref);
        check("logit matching", &logit_matching_loss(&sd, &vd).unwrap(), &lm_ref);
        let ens = ensemble_probs(&[sd.shallow_clone(), vd.shallow_clone()], t, EnsembleRule::ArithmeticMean).unwrap();
        check("ensemble", &ens, &ens_ref);

        let x = sd.detach().copy().set_requires_grad(true);
        let w = LossWeights::new(0.3, 0.7).unwrap();
        let l = distillation_loss(&x, SoftTargets::Logits(&vd), Some(&yd), t, w).unwrap();
        check("combined soft", &l.soft, &soft_ref);
        check("combined hard", &l.hard, &hard_ref);
        l.total.backward();
        check("combined grad", &x.grad(), &grad_ref);

        // Skipped term: a zero 0-dim tensor on the student's device and dtype.
        let l = distillation_loss(&sd, SoftTargets::Probs(&on(&p)), None, t, LossWeights::default()).unwrap();
        check("skipped hard", &l.hard, &Tensor::from(0.0f64));
        check("pure soft total", &l.total, &soft_ref);
    }

    if device != Device::Cpu {
        // Teacher left on the CPU: a DeviceMismatch naming it, not a libtorch error.
        let sd = s.to_device(device);
        let e = soft_target_loss(&sd, &v, t).unwrap_err();
        assert!(matches!(e, Error::DeviceMismatch { arg: "teacher_logits", device: Device::Cpu, .. }), "{e:?}");
        let e = hard_target_loss(&sd, &y).unwrap_err();
        assert!(matches!(e, Error::DeviceMismatch { arg: "labels", .. }), "{e:?}");
        let e = kd_core::ensemble_probs(&[sd, v.shallow_clone()], t, EnsembleRule::MeanLogits).unwrap_err();
        assert!(matches!(e, Error::MemberDevice { index: 1, .. }), "{e:?}");
    }
}

#[test]
fn same_results_on_every_device() {
    body(Device::Cpu);
    if tch::Cuda::is_available() {
        body(Device::Cuda(0));
    }
}
