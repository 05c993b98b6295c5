//! A specialist network started from the generalist's weights (paper, section 5).
//!
//! The specialist is a [`kd_models::Mlp`] with the generalist's layer sizes except the output
//! width, `|S| + 1`. Its hidden layers (`hidden1`, `hidden2`, ...) are copies of the
//! generalist's; its head (`output`) is new, initialized from the generalist's head so that
//! training starts from the generalist's opinion restricted to `S`:
//!
//! ```text
//! W'[j, :] = W[s_j, :],  b'[j] = b[s_j]                            j < |S|
//! W'[|S|, :] = mean_{c not in S} W[c, :]
//! b'[|S|]    = mean_{c not in S} b[c] + ln(N - |S|)              (dustbin)
//! ```
//!
//! The subset logits are then exactly the generalist's, and the dustbin logit is
//! `mean_{c not in S} z_c + ln(N - |S|)`, a lower bound on `ln sum_{c not in S} exp(z_c)`
//! (the logit of the merged outside mass) that is exact when the outside logits are equal.
//! A subset holding every class gets a zero dustbin row and bias.

use tch::{nn, Device, Kind, Tensor};

use kd_models::Mlp;

use crate::error::{bad, Result};
use crate::subset::ClassSubset;

/// Builds a specialist for `subset` from a generalist `(generalist_vs, generalist)`, on `device`.
///
/// Returns a fresh `VarStore` (every variable trainable) and its network: the generalist's
/// configuration with output width `|S| + 1`, hidden weights copied from the generalist, and
/// the head initialized as in the [module docs](self). Fails naming the argument if `subset`
/// is not a subset of the generalist's classes or if `generalist_vs` lacks a weight of
/// `generalist` or holds it with another shape.
///
/// # Example
/// ```
/// use kd_models::{Mlp, MlpConfig};
/// use kd_specialists::{specialist_from_generalist, ClassSubset};
/// use tch::{nn, Device};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let generalist = Mlp::new(&vs.root(), MlpConfig::plain([8, 16, 16, 10])).unwrap();
/// let subset = ClassSubset::new([2, 3, 7], 10).unwrap();
/// let (svs, specialist) = specialist_from_generalist(&vs, &generalist, &subset, Device::Cpu).unwrap();
/// assert_eq!(specialist.config().sizes, [8, 16, 16, 4]);
/// assert!(svs.variables()["hidden2.weight"].equal(&vs.variables()["hidden2.weight"]));
/// ```
pub fn specialist_from_generalist(
    generalist_vs: &nn::VarStore,
    generalist: &Mlp,
    subset: &ClassSubset,
    device: Device,
) -> Result<(nn::VarStore, Mlp)> {
    let classes = generalist.config().num_classes();
    if subset.num_classes() != classes {
        return Err(bad(
            "subset",
            format!("is a subset of {} classes but the generalist has {classes}", subset.num_classes()),
        ));
    }
    let mut config = generalist.config().clone();
    if let Some(last) = config.sizes.last_mut() {
        *last = subset.output_width();
    }
    let vs = nn::VarStore::new(device);
    let net = Mlp::new(&vs.root(), config)?;
    let source = generalist_vs.variables();
    let get = |name: &str| {
        source
            .get(name)
            .ok_or_else(|| bad("generalist_vs", format!("has no `{name}` entry: not the generalist's store")))
    };
    tch::no_grad(|| -> Result<()> {
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, mut var) in vars.into_iter().filter(|(name, _)| !name.starts_with("output.")) {
            let value = get(&name)?;
            if value.size() != var.size() {
                return Err(bad(
                    "generalist_vs",
                    format!("`{name}` has shape {:?} but the generalist's config needs {:?}", value.size(), var.size()),
                ));
            }
            var.f_copy_(value)?;
        }
        let (w, b) = (get("output.weight")?, get("output.bias")?); // [N, H], [N]
        if w.size().first() != Some(&classes) || b.size() != [classes] {
            return Err(bad(
                "generalist_vs",
                format!("`output` has shapes {:?} and {:?}, not {classes} classes", w.size(), b.size()),
            ));
        }
        let inside = Tensor::from_slice(subset.classes()).to_device(w.device());
        let others = subset.complement();
        let (dust_w, dust_b) = if others.is_empty() {
            (w.zeros_like().narrow(0, 0, 1), b.zeros_like().narrow(0, 0, 1))
        } else {
            let o = Tensor::from_slice(&others).to_device(w.device());
            let dust_w = w.f_index_select(0, &o)?.mean_dim(0, true, Kind::Float).to_kind(w.kind());
            let dust_b = b.f_index_select(0, &o)?.mean_dim(0, true, Kind::Float) + (others.len() as f64).ln();
            (dust_w, dust_b.to_kind(b.kind()))
        };
        let head_w = Tensor::cat(&[w.f_index_select(0, &inside)?, dust_w], 0);
        let head_b = Tensor::cat(&[b.f_index_select(0, &inside)?, dust_b], 0);
        let vars = vs.variables();
        vars["output.weight"].shallow_clone().f_copy_(&head_w)?;
        vars["output.bias"].shallow_clone().f_copy_(&head_b)?;
        Ok(())
    })?;
    Ok((vs, net))
}

/// Adds `shift` to a specialist's dustbin logit: `output.bias[|S|] += shift`, in place, in the
/// specialist's store `vs`. Call it once after training with
/// [`dustbin_logit_shift`](crate::dustbin_logit_shift)`(factor)`.
///
/// # Example
/// ```
/// use kd_models::{Mlp, MlpConfig};
/// use kd_specialists::{raise_dustbin, ClassSubset};
/// use tch::{nn, Device};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let _net = Mlp::new(&vs.root(), MlpConfig::plain([4, 3])).unwrap(); // |S| = 2, dustbin 2
/// let subset = ClassSubset::new([0, 1], 5).unwrap();
/// let before = Vec::<f32>::try_from(&vs.variables()["output.bias"]).unwrap();
/// raise_dustbin(&vs, &subset, 1.5).unwrap();
/// let after = Vec::<f32>::try_from(&vs.variables()["output.bias"]).unwrap();
/// assert_eq!(after[0..2], before[0..2]);
/// assert!((after[2] - before[2] - 1.5).abs() < 1e-6);
/// ```
pub fn raise_dustbin(vs: &nn::VarStore, subset: &ClassSubset, shift: f64) -> Result<()> {
    if !shift.is_finite() {
        return Err(bad("shift", format!("must be finite, got {shift}")));
    }
    let vars = vs.variables();
    let bias = vars.get("output.bias").ok_or_else(|| bad("vs", "has no `output.bias`: not a kd-models Mlp store"))?;
    if bias.size() != [subset.output_width()] {
        return Err(bad(
            "vs",
            format!("`output.bias` has shape {:?} but the subset needs [{}]", bias.size(), subset.output_width()),
        ));
    }
    tch::no_grad(|| -> Result<()> {
        let _ = bias.f_get(subset.dustbin())?.f_add_scalar_(shift)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::uniform;
    use kd_models::MlpConfig;
    use tch::nn::ModuleT;

    fn generalist(sizes: &[i64]) -> (nn::VarStore, Mlp) {
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Mlp::new(&vs.root(), MlpConfig::plain(sizes.to_vec())).unwrap();
        (vs, net)
    }

    #[test]
    fn hidden_weights_are_copied_and_subset_logits_match_the_generalist() {
        let _generator = kd_core::lock_global_generator();
        let (gvs, g) = generalist(&[6, 9, 7, 8]);
        let subset = ClassSubset::new([1, 4, 6], 8).unwrap();
        let (svs, s) = specialist_from_generalist(&gvs, &g, &subset, Device::Cpu).unwrap();
        let (gvars, svars) = (gvs.variables(), svs.variables());
        for name in ["hidden1.weight", "hidden1.bias", "hidden2.weight", "hidden2.bias"] {
            assert!(svars[name].equal(&gvars[name]), "{name}");
        }
        assert_eq!(svars["output.weight"].size(), [4, 7]);
        assert_eq!(svs.trainable_variables().len(), 6);

        let x = uniform(&[5, 6], 1) * 4.0 - 2.0;
        let (gz, sz) = tch::no_grad(|| (g.forward_t(&x, false), s.forward_t(&x, false)));
        let cols = Tensor::from_slice(subset.classes());
        assert!(sz.narrow(1, 0, 3).allclose(&gz.index_select(1, &cols), 1e-6, 1e-6, false));
        // Dustbin = mean of the 5 other logits + ln 5.
        let others = Tensor::from_slice(&subset.complement());
        let expected = gz.index_select(1, &others).mean_dim(1, false, Kind::Float) + 5f64.ln();
        assert!(sz.select(1, 3).allclose(&expected, 1e-5, 1e-5, false));

        // The copy is independent of the generalist.
        tch::no_grad(|| {
            let _ = svars["hidden1.weight"].shallow_clone().fill_(0.0);
        });
        assert!(!gvars["hidden1.weight"].equal(&svars["hidden1.weight"]));
    }

    #[test]
    fn raise_dustbin_moves_only_the_dustbin_probability_up() {
        let _generator = kd_core::lock_global_generator();
        let (gvs, g) = generalist(&[3, 5, 4]);
        let subset = ClassSubset::new([0, 2], 4).unwrap();
        let (svs, s) = specialist_from_generalist(&gvs, &g, &subset, Device::Cpu).unwrap();
        let x = uniform(&[2, 3], 2);
        let before = tch::no_grad(|| s.forward_t(&x, false));
        raise_dustbin(&svs, &subset, 2.0f64.ln()).unwrap();
        let after = tch::no_grad(|| s.forward_t(&x, false));
        assert!(after.narrow(1, 0, 2).equal(&before.narrow(1, 0, 2)));
        let odds = (after.select(1, 2) - before.select(1, 2)).exp();
        assert!(odds.allclose(&Tensor::from_slice(&[2.0f32, 2.0]), 1e-5, 1e-5, false));
    }

    #[test]
    fn a_subset_of_every_class_gets_a_zero_dustbin() {
        let _generator = kd_core::lock_global_generator();
        let (gvs, g) = generalist(&[3, 4, 2]);
        let subset = ClassSubset::new([0, 1], 2).unwrap();
        let (svs, _) = specialist_from_generalist(&gvs, &g, &subset, Device::Cpu).unwrap();
        let vars = svs.variables();
        assert_eq!(f64::try_from(vars["output.bias"].get(2)).unwrap(), 0.0);
        assert_eq!(f64::try_from(vars["output.weight"].get(2).abs().sum(Kind::Float)).unwrap(), 0.0);
    }

    #[test]
    fn bad_arguments_are_rejected_naming_them() {
        let _generator = kd_core::lock_global_generator();
        let (gvs, g) = generalist(&[3, 4, 5]);
        let (other_vs, _) = generalist(&[3, 6, 5]);
        let empty_vs = nn::VarStore::new(Device::Cpu);
        let subset = ClassSubset::new([1], 5).unwrap();
        let cases: Vec<(Result<()>, &str)> = vec![
            (
                specialist_from_generalist(&gvs, &g, &ClassSubset::new([1], 6).unwrap(), Device::Cpu).map(drop),
                "`subset`: is a subset of 6 classes but the generalist has 5",
            ),
            (specialist_from_generalist(&other_vs, &g, &subset, Device::Cpu).map(drop), "`hidden1.bias` has shape [6]"),
            (specialist_from_generalist(&empty_vs, &g, &subset, Device::Cpu).map(drop), "`generalist_vs`: has no"),
            (raise_dustbin(&gvs, &subset, 1.0), "`vs`: `output.bias` has shape [5]"),
            (raise_dustbin(&empty_vs, &subset, 1.0), "`vs`: has no `output.bias`"),
            (raise_dustbin(&gvs, &subset, f64::NAN), "`shift`"),
        ];
        for (result, expected) in cases {
            let err = result.unwrap_err().to_string();
            assert!(err.contains(expected), "expected {expected:?} in {err:?}");
        }
    }
}
