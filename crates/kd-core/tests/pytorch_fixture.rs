//! Values and gradients against PyTorch (float64), from tests/fixtures/losses.npz, written by
//! tests/fixtures/make_fixtures.py. Tolerance: allclose(rtol = 1e-10, atol = 1e-12).

mod common;

use std::collections::HashMap;

use common::*;
use kd_core::{
    distillation_loss, ensemble_probs, hard_target_loss, log_softmax_t, logit_matching_loss, soft_target_loss,
    soft_target_loss_from_probs, softmax_t, EnsembleRule, LossWeights, SoftTargets,
};
use tch::{Kind, Tensor};

const RTOL: f64 = 1e-10;
const ATOL: f64 = 1e-12;

fn load() -> HashMap<String, Tensor> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/losses.npz");
    Tensor::read_npz(path).unwrap().into_iter().collect()
}

fn assert_close(name: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.size(), want.size(), "{name}: shape");
    assert_eq!(got.kind(), Kind::Double, "{name}: dtype");
    assert!(got.allclose(want, RTOL, ATOL, false), "{name}: max abs diff {:e}", max_abs_diff(got, want));
}

#[test]
fn matches_pytorch_reference() {
    let f = load();
    let get = |k: &str| f.get(k).unwrap_or_else(|| panic!("fixture has no `{k}`"));
    let (s, v, y, members) = (get("student"), get("teacher"), get("labels"), get("members"));
    assert_eq!(y.kind(), Kind::Int64);
    let temps = to_vec(get("temps"));
    assert_eq!(temps, vec![1.0, 4.0, 20.0]);
    let w = to_vec(get("weights"));
    let weights = LossWeights::new(w[0], w[1]).unwrap();
    let members: Vec<Tensor> = (0..members.size()[0]).map(|m| members.get(m)).collect();

    assert_close("hard_loss", &hard_target_loss(s, y).unwrap(), get("hard_loss"));
    assert_close("logit_matching", &logit_matching_loss(s, v).unwrap(), get("logit_matching"));

    for (k, &t) in temps.iter().enumerate() {
        let k = k as i64;
        let at = |name: &str| get(name).get(k);
        let tag = |name: &str| format!("{name} T={t}");
        assert_close(&tag("softmax"), &softmax_t(s, t).unwrap(), &at("softmax"));
        assert_close(&tag("log_softmax"), &log_softmax_t(s, t).unwrap(), &at("log_softmax"));
        assert_close(&tag("soft_loss"), &soft_target_loss(s, v, t).unwrap(), &at("soft_loss"));
        assert_close(
            &tag("soft_loss_from_probs"),
            &soft_target_loss_from_probs(s, &at("teacher_probs"), t).unwrap(),
            &at("soft_loss"),
        );
        let g = autograd(|x| soft_target_loss(x, v, t).unwrap(), s);
        assert_close(&tag("soft_grad"), &g, &at("soft_grad"));

        let combined = |x: &Tensor| distillation_loss(x, SoftTargets::Logits(v), Some(y), t, weights).unwrap().total;
        assert_close(&tag("combined_loss"), &combined(s), &at("combined_loss"));
        assert_close(&tag("combined_grad"), &autograd(combined, s), &at("combined_grad"));
        let probs = at("teacher_probs");
        let combined_p =
            |x: &Tensor| distillation_loss(x, SoftTargets::Probs(&probs), Some(y), t, weights).unwrap().total;
        assert_close(&tag("combined_grad (probs)"), &autograd(combined_p, s), &at("combined_grad"));

        // The soft term's KL form, against PyTorch's kl_div (which never forms the entropy):
        // from logits, from probabilities, from top-k targets with zero rows entries, and from
        // an ensemble's mean distribution. Its gradient is the cross-entropy form's.
        let pure_soft = LossWeights::default();
        let kl = |teacher: SoftTargets, x: &Tensor| distillation_loss(x, teacher, None, t, pure_soft).unwrap().soft_kl;
        assert_close(&tag("soft_kl"), &kl(SoftTargets::Logits(v), s), &at("soft_kl"));
        assert_close(&tag("soft_kl (probs)"), &kl(SoftTargets::Probs(&probs), s), &at("soft_kl"));
        assert_close(&tag("soft_kl grad"), &autograd(|x| kl(SoftTargets::Logits(v), x), s), &at("soft_grad"));
        assert_close(&tag("topk_soft_kl"), &kl(SoftTargets::Probs(&at("topk_probs")), s), &at("topk_soft_kl"));
        let ens = ensemble_probs(&members, t, EnsembleRule::ArithmeticMean).unwrap();
        assert_close(&tag("ens_soft_kl"), &kl(SoftTargets::Probs(&ens), s), &at("ens_soft_kl"));
        // The identity CE = KL + T^2 H(p), with H(p) computed here in closed form.
        let l = distillation_loss(s, SoftTargets::Logits(v), None, t, pure_soft).unwrap();
        let entropy = -(&probs * probs.log()).sum(Kind::Double) / probs.size()[0] as f64 * (t * t);
        assert_close(&tag("soft = soft_kl + T^2 H(p)"), &(&l.soft_kl + entropy), &l.soft);

        for (rule, key) in [
            (EnsembleRule::ArithmeticMean, "ens_arith"),
            (EnsembleRule::GeometricMean, "ens_geo"),
            (EnsembleRule::MeanLogits, "ens_mean_logits"),
        ] {
            assert_close(&tag(key), &ensemble_probs(&members, t, rule).unwrap(), &at(key));
        }
    }
}
