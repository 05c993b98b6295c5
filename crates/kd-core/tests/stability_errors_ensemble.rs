//! Large-logit stability, argument errors (table-driven) and ensemble rules.

mod common;

use common::*;
use kd_core::{
    distillation_loss, ensemble_probs, hard_target_loss, log_softmax_t, logit_matching_loss, soft_target_loss,
    soft_target_loss_from_probs, softmax_t, EnsembleRule, Error, LossWeights, SoftTargets,
};
use tch::{Device, Kind, Tensor};

const RULES: [EnsembleRule; 3] = [EnsembleRule::ArithmeticMean, EnsembleRule::GeometricMean, EnsembleRule::MeanLogits];

fn all_finite(x: &Tensor) -> bool {
    to_vec(x).iter().all(|v| v.is_finite())
}

/// A logit of 1234 (exp overflows even f64) gives finite, correct probabilities and losses,
/// in f32 and f64. Tolerances: 1e-12 (f64) / 1e-5 (f32), relative for the losses.
#[test]
fn large_logits_are_stable() {
    for (kind, tol) in [(Kind::Double, 1e-12), (Kind::Float, 1e-5)] {
        let s = mat(&[1234.0, 0.0, -5.0, 0.0, 0.0, 0.0], 2).to_kind(kind);
        let v = mat(&[0.0, 1234.0, 0.0, 1234.0, 1234.0, 0.0], 2).to_kind(kind);
        let q = softmax_t(&s, 1.0).unwrap();
        assert!(all_finite(&q));
        assert!((q.double_value(&[0, 0]) - 1.0).abs() < tol);
        assert!(q.double_value(&[0, 1]).abs() < tol);
        let lq = log_softmax_t(&s, 1.0).unwrap();
        assert!(all_finite(&lq));
        assert!((lq.double_value(&[0, 1]) + 1234.0).abs() < 1234.0 * tol);
        // At T = 1000 the row is [1.234, 0, -0.005]: compare to the explicit formula.
        let q = softmax_t(&s, 1000.0).unwrap();
        let e = [1.234f64.exp(), 1.0, (-0.005f64).exp()];
        let sum: f64 = e.iter().sum();
        for (i, ei) in e.iter().enumerate() {
            assert!((q.double_value(&[0, i as i64]) - ei / sum).abs() < tol);
        }
        // Soft loss at T = 1: row 0 has p = [0, 1, 0], -log q_1 = 1234 + log(1 + e^-1234 + ...);
        // row 1 has p = [1/2, 1/2, 0], q uniform: ln 3. Mean over the batch.
        let l = soft_target_loss(&s, &v, 1.0).unwrap().double_value(&[]);
        let want = (1234.0 + 3f64.ln()) / 2.0;
        assert!(l.is_finite() && ((l - want) / want).abs() < tol, "{l}");
        // Hard loss: label 1 in row 0 (-log q = 1234), label 2 in row 1 (ln 3).
        let y = Tensor::from_slice(&[1i64, 2]);
        let h = hard_target_loss(&s, &y).unwrap().double_value(&[]);
        assert!(h.is_finite() && ((h - want) / want).abs() < tol, "{h}");
        // Gradients stay finite too.
        let g = autograd(|x| soft_target_loss(x, &v.to_kind(Kind::Double), 2.0).unwrap(), &s.to_kind(Kind::Double));
        assert!(all_finite(&g));
    }
}

type Matcher = fn(&Error) -> bool;

/// Each case: a call with one bad argument, the expected variant, and text the message must
/// contain (the argument's name and/or the offending value).
#[test]
fn bad_arguments_return_errors() {
    let (s, v, y) = (student(), teacher(), labels());
    let p = v.softmax(-1, None);
    let f64_cpu = (Kind::Double, Device::Cpu);
    let w = LossWeights::default();
    let w_hard = LossWeights::new(0.3, 0.7).unwrap();
    let r = |x: kd_core::Result<Tensor>| x.map(|_| ());
    let cases: Vec<(&str, kd_core::Result<()>, Matcher, &[&str])> = vec![
        ("T = 0", r(softmax_t(&s, 0.0)), |e| matches!(e, Error::InvalidTemperature { t } if *t == 0.0), &["`t`", "0"]),
        (
            "T < 0",
            r(log_softmax_t(&s, -1.5)),
            |e| matches!(e, Error::InvalidTemperature { t } if *t == -1.5),
            &["-1.5"],
        ),
        (
            "T = NaN",
            r(soft_target_loss(&s, &v, f64::NAN)),
            |e| matches!(e, Error::InvalidTemperature { t } if t.is_nan()),
            &["NaN"],
        ),
        (
            "T = inf",
            r(soft_target_loss_from_probs(&s, &p, f64::INFINITY)),
            |e| matches!(e, Error::InvalidTemperature { .. }),
            &["inf"],
        ),
        (
            "T < 0 combined",
            distillation_loss(&s, SoftTargets::Logits(&v), None, -3.0, w).map(|_| ()),
            |e| matches!(e, Error::InvalidTemperature { .. }),
            &["-3"],
        ),
        (
            "T = 0 ensemble",
            r(ensemble_probs(&[s.shallow_clone()], 0.0, EnsembleRule::ArithmeticMean)),
            |e| matches!(e, Error::InvalidTemperature { .. }),
            &["`t`"],
        ),
        (
            "rank 1 logits",
            r(softmax_t(&s.view([15]), 1.0)),
            |e| matches!(e, Error::BadRank { arg: "logits", shape } if shape == &[15]),
            &["`logits`", "[15]"],
        ),
        (
            "rank 3 student",
            r(soft_target_loss(&s.view([1, 3, 5]), &v, 2.0)),
            |e| matches!(e, Error::BadRank { arg: "student_logits", .. }),
            &["[1, 3, 5]"],
        ),
        (
            "rank 3 teacher",
            r(logit_matching_loss(&s, &v.view([3, 5, 1]))),
            |e| matches!(e, Error::BadRank { arg: "teacher_logits", .. }),
            &["`teacher_logits`", "[3, 5, 1]"],
        ),
        (
            "empty batch",
            r(softmax_t(&Tensor::zeros([0, 5], f64_cpu), 1.0)),
            |e| matches!(e, Error::EmptyDim { .. }),
            &["[0, 5]"],
        ),
        (
            "int logits",
            r(softmax_t(&Tensor::zeros([2, 5], (Kind::Int64, Device::Cpu)), 1.0)),
            |e| matches!(e, Error::NotFloat { kind: Kind::Int64, .. }),
            &["Int64"],
        ),
        (
            "shape mismatch soft",
            r(soft_target_loss(&s, &v.narrow(1, 0, 4), 2.0)),
            |e| matches!(e, Error::ShapeMismatch { arg: "teacher_logits", student, shape } if student == &[3, 5] && shape == &[3, 4]),
            &["[3, 5]", "[3, 4]"],
        ),
        (
            "shape mismatch probs",
            r(soft_target_loss_from_probs(&s, &p.narrow(0, 0, 2), 2.0)),
            |e| matches!(e, Error::ShapeMismatch { arg: "teacher_probs", .. }),
            &["`teacher_probs`", "[2, 5]"],
        ),
        (
            "shape mismatch logit matching",
            r(logit_matching_loss(&s.narrow(0, 0, 2), &v)),
            |e| matches!(e, Error::ShapeMismatch { arg: "teacher_logits", .. }),
            &["[2, 5]", "[3, 5]"],
        ),
        (
            "shape mismatch combined",
            distillation_loss(&s, SoftTargets::Probs(&p.narrow(1, 0, 2)), None, 2.0, w).map(|_| ()),
            |e| matches!(e, Error::ShapeMismatch { arg: "teacher_probs", .. }),
            &["[3, 2]"],
        ),
        (
            "float labels",
            r(hard_target_loss(&s, &y.to_kind(Kind::Double))),
            |e| matches!(e, Error::LabelsKind { kind: Kind::Double }),
            &["`labels`", "Double"],
        ),
        (
            "int32 labels",
            r(hard_target_loss(&s, &y.to_kind(Kind::Int))),
            |e| matches!(e, Error::LabelsKind { kind: Kind::Int }),
            &["int64"],
        ),
        (
            "2-D labels",
            r(hard_target_loss(&s, &y.view([3, 1]))),
            |e| matches!(e, Error::LabelsShape { shape, batch: 3 } if shape == &[3, 1]),
            &["[3, 1]", "3"],
        ),
        (
            "labels too long",
            r(hard_target_loss(&s, &Tensor::from_slice(&[0i64, 1, 2, 3]))),
            |e| matches!(e, Error::LabelsShape { batch: 3, .. }),
            &["[4]"],
        ),
        (
            "labels wrong length combined",
            distillation_loss(&s, SoftTargets::Logits(&v), Some(&y.narrow(0, 0, 2)), 2.0, w_hard).map(|_| ()),
            |e| matches!(e, Error::LabelsShape { .. }),
            &["[2]"],
        ),
        (
            "label out of range",
            r(hard_target_loss(&s, &Tensor::from_slice(&[0i64, 5, 1]))),
            |e| matches!(e, Error::Torch(_)),
            &["libtorch"],
        ),
        (
            "missing labels",
            distillation_loss(&s, SoftTargets::Logits(&v), None, 2.0, w_hard).map(|_| ()),
            |e| matches!(e, Error::MissingLabels { hard } if *hard == 0.3),
            &["`labels`", "0.3"],
        ),
        (
            "negative hard weight",
            LossWeights::new(-0.1, 1.0).map(|_| ()),
            |e| matches!(e, Error::InvalidWeight { name: "hard", value } if *value == -0.1),
            &["`hard`", "-0.1"],
        ),
        (
            "NaN soft weight",
            LossWeights::new(1.0, f64::NAN).map(|_| ()),
            |e| matches!(e, Error::InvalidWeight { name: "soft", .. }),
            &["`soft`", "NaN"],
        ),
        (
            "infinite soft weight",
            LossWeights::new(0.0, f64::INFINITY).map(|_| ()),
            |e| matches!(e, Error::InvalidWeight { name: "soft", .. }),
            &["inf"],
        ),
        ("both weights zero", LossWeights::new(0.0, 0.0).map(|_| ()), |e| matches!(e, Error::ZeroWeights), &["both 0"]),
        (
            "hand-built bad weights",
            distillation_loss(&s, SoftTargets::Logits(&v), Some(&y), 2.0, LossWeights { hard: 1.0, soft: -2.0 })
                .map(|_| ()),
            |e| matches!(e, Error::InvalidWeight { name: "soft", .. }),
            &["-2"],
        ),
        (
            "hand-built zero weights",
            distillation_loss(&s, SoftTargets::Logits(&v), Some(&y), 2.0, LossWeights { hard: 0.0, soft: 0.0 })
                .map(|_| ()),
            |e| matches!(e, Error::ZeroWeights),
            &["both 0"],
        ),
        (
            "empty ensemble",
            r(ensemble_probs(&[], 2.0, EnsembleRule::ArithmeticMean)),
            |e| matches!(e, Error::EmptyEnsemble),
            &["`member_logits`"],
        ),
        (
            "member rank 1",
            r(ensemble_probs(&[s.view([15])], 2.0, EnsembleRule::MeanLogits)),
            |e| matches!(e, Error::BadRank { arg: "member_logits[0]", .. }),
            &["member_logits[0]", "[15]"],
        ),
        (
            "member shapes differ",
            r(ensemble_probs(
                &[s.shallow_clone(), v.shallow_clone(), v.narrow(1, 0, 4)],
                2.0,
                EnsembleRule::GeometricMean,
            )),
            |e| matches!(e, Error::MemberShape { index: 2, shape, expected } if shape == &[3, 4] && expected == &[3, 5]),
            &["member_logits[2]", "[3, 4]", "[3, 5]"],
        ),
        (
            "member dtypes differ",
            r(ensemble_probs(&[s.shallow_clone(), v.to_kind(Kind::Float)], 2.0, EnsembleRule::ArithmeticMean)),
            |e| matches!(e, Error::MemberKind { index: 1, kind: Kind::Float, expected: Kind::Double }),
            &["member_logits[1]", "Float"],
        ),
    ];
    for (name, result, matcher, needles) in cases {
        let err = match result {
            Ok(()) => panic!("{name}: expected an error, got Ok"),
            Err(e) => e,
        };
        assert!(matcher(&err), "{name}: wrong variant {err:?}");
        let msg = err.to_string();
        for needle in needles {
            assert!(msg.contains(needle), "{name}: message {msg:?} lacks {needle:?}");
        }
    }
}

/// Hand-computed arithmetic mean of two members, at T = 1 and (with doubled logits) T = 2.
/// Row 0: [1/4, 3/4] and [4/5, 1/5] -> [0.525, 0.475]; row 1: [1/2, 1/2] and [1/10, 9/10]
/// -> [0.3, 0.7]. Tolerance 1e-12.
#[test]
fn ensemble_arithmetic_mean_by_hand() {
    let a = mat(&[0.0, 3f64.ln(), 0.0, 0.0], 2);
    let b = mat(&[4f64.ln(), 0.0, 0.0, 9f64.ln()], 2);
    let want = mat(&[0.525, 0.475, 0.3, 0.7], 2);
    for t in [1.0, 2.0] {
        let members = [&a * t, &b * t];
        let p = ensemble_probs(&members, t, EnsembleRule::ArithmeticMean).unwrap();
        assert!(max_abs_diff(&p, &want) < 1e-12, "T={t}");
    }
    // Mean of probabilities differs from softmax of mean logits here (0.525 vs 1/(1 + sqrt(3/4)) ...).
    let ml = ensemble_probs(&[a, b], 1.0, EnsembleRule::MeanLogits).unwrap();
    let row0 = 1.0 / (1.0 + (3.0f64 / 4.0).sqrt());
    assert!((ml.double_value(&[0, 0]) - row0).abs() < 1e-12);
    assert!((row0 - 0.525).abs() > 0.01);
}

/// One member (and M identical members) returns the member's own softmax under every rule.
#[test]
fn single_member_is_its_own_softmax() {
    let s = student();
    for t in [0.7, 1.0, 6.0] {
        let own = softmax_t(&s, t).unwrap();
        for rule in RULES {
            let one = ensemble_probs(&[s.shallow_clone()], t, rule).unwrap();
            assert!(max_abs_diff(&one, &own) < 1e-14, "{rule:?} T={t}");
            let three = [s.copy(), s.copy(), s.copy()];
            let same = ensemble_probs(&three, t, rule).unwrap();
            assert!(max_abs_diff(&same, &own) < 1e-14, "{rule:?} T={t} (3 copies)");
        }
    }
}

/// Rows sum to 1 (|sum - 1| < 1e-12), entries in [0, 1], shape [batch, classes], for all rules.
#[test]
fn ensemble_rows_sum_to_one() {
    let members = [student(), teacher(), zero_mean(&teacher()) * 3.0 - 1.0];
    for t in [0.5, 1.0, 4.0, 20.0] {
        for rule in RULES {
            let p = ensemble_probs(&members, t, rule).unwrap();
            assert_eq!(p.size(), vec![3, 5]);
            let sums = p.sum_dim_intlist(-1, false, None);
            let ones = Tensor::ones([3], (Kind::Double, Device::Cpu));
            assert!(max_abs_diff(&sums, &ones) < 1e-12, "{rule:?} T={t}");
            assert!(to_vec(&p).iter().all(|x| (0.0..=1.0).contains(x)));
            // Usable as cached soft targets at the same T.
            let l = soft_target_loss_from_probs(&student(), &p, t).unwrap();
            assert!(l.double_value(&[]).is_finite());
        }
    }
}
