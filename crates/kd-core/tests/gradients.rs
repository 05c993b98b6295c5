//! Gradient tests: closed form (eq. 2), finite differences, the high-temperature limit
//! (eq. 4) and the role of the T^2 factor.

mod common;

use common::*;
use kd_core::{
    distillation_loss, hard_target_loss, logit_matching_loss, soft_target_loss, soft_target_loss_from_probs,
    LossWeights, SoftTargets,
};
use tch::Tensor;

/// Autograd gradient of the soft loss = T (q - p) / B, i.e. eq. 2 times T^2, batch-averaged.
/// Tolerance: 1e-12 absolute (f64).
#[test]
fn soft_gradient_matches_eq2_times_t_squared() {
    let (s, v) = (student(), teacher());
    let b = s.size()[0] as f64;
    for t in [0.5, 1.0, 2.0, 5.0, 20.0] {
        let g = autograd(|x| soft_target_loss(x, &v, t).unwrap(), &s);
        // Independent reference: explicit exp / sum, no log-softmax.
        let softmax = |z: &Tensor| {
            let e = (z / t).exp();
            &e / e.sum_dim_intlist(-1, true, None)
        };
        let want = (softmax(&s) - softmax(&v)) * (t / b);
        let err = max_abs_diff(&g, &want);
        assert!(err < 1e-12, "T={t}: max |autograd - T(q-p)/B| = {err:e}");
        // And the from-probs variant gives the same gradient.
        let g2 = autograd(|x| soft_target_loss_from_probs(x, &softmax(&v), t).unwrap(), &s);
        assert!(max_abs_diff(&g2, &want) < 1e-12, "T={t} (from probs)");
    }
}

/// Central differences with h = 1e-5 in f64; tolerance 1e-7 * (1 + |C|) per component
/// (truncation ~h^2, round-off ~1e-16 |C| / h).
fn check_fd(name: &str, f: impl Fn(&Tensor) -> Tensor, x: &Tensor) {
    let value = f(x).double_value(&[]).abs();
    let ga = autograd(&f, x);
    let gf = finite_diff(&f, x, 1e-5);
    let err = max_abs_diff(&ga, &gf);
    let tol = 1e-7 * (1.0 + value);
    assert!(err < tol, "{name}: max |autograd - finite diff| = {err:e} > {tol:e}");
    assert!(norm(&ga) > 1e-3, "{name}: gradient is trivially zero");
}

#[test]
fn finite_difference_gradients() {
    let (s, v, y) = (student(), teacher(), labels());
    for t in [0.5, 1.0, 4.0, 20.0] {
        check_fd(&format!("soft T={t}"), |x| soft_target_loss(x, &v, t).unwrap(), &s);
        let p = (&v / t).softmax(-1, None);
        check_fd(&format!("soft_from_probs T={t}"), |x| soft_target_loss_from_probs(x, &p, t).unwrap(), &s);
        for (wh, ws) in [(0.3, 0.7), (1.0, 0.0), (0.0, 1.0)] {
            let w = LossWeights::new(wh, ws).unwrap();
            check_fd(
                &format!("combined T={t} w=({wh},{ws})"),
                |x| distillation_loss(x, SoftTargets::Logits(&v), Some(&y), t, w).unwrap().total,
                &s,
            );
            check_fd(
                &format!("combined probs T={t} w=({wh},{ws})"),
                |x| distillation_loss(x, SoftTargets::Probs(&p), Some(&y), t, w).unwrap().total,
                &s,
            );
        }
    }
    check_fd("hard", |x| hard_target_loss(x, &y).unwrap(), &s);
    check_fd("logit matching", |x| logit_matching_loss(x, &v).unwrap(), &s);
}

/// Closed forms of the hard, logit-matching and combined gradients (tolerance 1e-12).
#[test]
fn closed_form_gradients() {
    let (s, v, y) = (student(), teacher(), labels());
    let (b, n) = (s.size()[0] as f64, s.size()[1] as f64);
    let onehot = y.one_hot(5).to_kind(tch::Kind::Double);
    let g_hard = autograd(|x| hard_target_loss(x, &y).unwrap(), &s);
    let want_hard = (s.softmax(-1, None) - &onehot) / b;
    assert!(max_abs_diff(&g_hard, &want_hard) < 1e-12);

    let g_lm = autograd(|x| logit_matching_loss(x, &v).unwrap(), &s);
    let want_lm = (&s - &v) / (n * b);
    assert!(max_abs_diff(&g_lm, &want_lm) < 1e-12);

    let t = 3.0;
    let w = LossWeights::new(0.2, 0.8).unwrap();
    let g = autograd(|x| distillation_loss(x, SoftTargets::Logits(&v), Some(&y), t, w).unwrap().total, &s);
    let q = (&s / t).softmax(-1, None);
    let p = (&v / t).softmax(-1, None);
    let want = want_hard * 0.2 + (q - p) * (0.8 * t / b);
    assert!(max_abs_diff(&g, &want) < 1e-12);
}

/// Paper eq. 4: for zero-mean logits and T >> |z|, the gradient of the T^2-scaled soft loss
/// tends to (z - v) / (N B), the gradient of `logit_matching_loss`. The relative error
/// ||g_soft - g_lm|| / ||g_lm|| is O(max|z| / T); for these logits (|z| <= 3) it is about
/// 0.9 / T, and it must be < 0.03 at T = 50 and shrink at least 3x from T = 10 to 50 and
/// again from 50 to 200.
#[test]
fn high_temperature_limit_is_logit_matching() {
    let (s, v) = (zero_mean(&student()), zero_mean(&teacher()));
    let g_lm = autograd(|x| logit_matching_loss(x, &v).unwrap(), &s);
    let rel = |t: f64| {
        let g = autograd(|x| soft_target_loss(x, &v, t).unwrap(), &s);
        norm(&(g - &g_lm)) / norm(&g_lm)
    };
    let (e10, e50, e200) = (rel(10.0), rel(50.0), rel(200.0));
    assert!(e50 < 0.03, "relative error at T=50: {e50}");
    assert!(e50 < e10 / 3.0, "T=10: {e10}, T=50: {e50}");
    assert!(e200 < e50 / 3.0, "T=50: {e50}, T=200: {e200}");
    assert!(e200 < 0.01, "relative error at T=200: {e200}");
}

/// The T^2 factor keeps the soft gradient's magnitude roughly independent of T (ratio of norms
/// at T=10 and T=40 within [0.8, 1.25]); without it the ratio would be about (40/10)^2 = 16
/// (checked within 16 * [0.8, 1.25]).
#[test]
fn t_squared_keeps_gradient_scale() {
    let (s, v) = (zero_mean(&student()), zero_mean(&teacher()));
    let gnorm = |t: f64| norm(&autograd(|x| soft_target_loss(x, &v, t).unwrap(), &s));
    let (g10, g40) = (gnorm(10.0), gnorm(40.0));
    let ratio = g10 / g40;
    assert!((0.8..=1.25).contains(&ratio), "scaled ratio {ratio}");
    // Reference without the T^2 factor, written out independently of kd_core.
    let unscaled = |t: f64| {
        let g = autograd(
            |x| {
                let p = (&v / t).softmax(-1, None);
                -(p * (x / t).log_softmax(-1, None)).sum_dim_intlist(-1, false, None).mean(None)
            },
            &s,
        );
        norm(&g)
    };
    let unscaled_ratio = unscaled(10.0) / unscaled(40.0);
    assert!((12.8..=20.0).contains(&unscaled_ratio), "unscaled ratio {unscaled_ratio}");
}
