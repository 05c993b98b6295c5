//! Range-checked values: each rejects a bad number while the TOML parser reads it, so the error
//! carries the parser's own line and column.

use super::limits::{MAX_TEMPERATURE, MIN_TEMPERATURE};
use serde::{Deserialize, Deserializer};

macro_rules! checked_number {
    ($(#[$doc:meta])* $name:ident, $ty:ty, $ok:expr, $expected:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
        pub struct $name(pub $ty);
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let v = <$ty>::deserialize(d)?;
                let ok: fn($ty) -> bool = $ok;
                if ok(v) {
                    Ok($name(v))
                } else {
                    Err(serde::de::Error::custom(format!(concat!("expected ", $expected, ", got {}"), v)))
                }
            }
        }
    };
}

checked_number!(
    /// A finite number > 0 (temperatures, learning rates, max-norm bounds).
    Positive, f64, |v| v.is_finite() && v > 0.0, "a number > 0");
checked_number!(
    /// A distillation temperature in [`MIN_TEMPERATURE`, `MAX_TEMPERATURE`]: the range where
    /// the soft targets and the loss survive f32 arithmetic (see the constants).
    Temperature, f64, |v| (MIN_TEMPERATURE..=MAX_TEMPERATURE).contains(&v),
    "a temperature in [0.01, 1e6] (outside it f32 rounding erases the soft targets: see docs/experiment-files.md)");
checked_number!(
    /// A finite number >= 0 (loss weights, weight decay).
    NonNegative, f64, |v| v.is_finite() && v >= 0.0, "a number >= 0");
checked_number!(
    /// A probability in [0, 1) (dropout rates, momentum).
    Rate, f64, |v| (0.0..1.0).contains(&v), "a number in [0, 1)");
checked_number!(
    /// A share in (0, 1] (the fraction of the training split a stage trains on).
    Share, f64, |v| v > 0.0 && v <= 1.0, "a number in (0, 1]");
checked_number!(
    /// A positive integer (epochs, batch sizes, layer widths).
    Count, i64, |v| v > 0, "an integer > 0");

checked_number!(
    /// A class id (>= 0; checked against the data's classes when the run starts).
    ClassId, i64, |v| v >= 0, "a class id >= 0");

/// A SHA-256 pinned in an experiment file: 64 hexadecimal digits, kept in lower case.
#[derive(Clone, Debug, PartialEq)]
pub struct Sha256(pub String);
impl<'de> Deserialize<'de> for Sha256 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = String::deserialize(d)?;
        if v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
            let shown = crate::inputs::clip(&v, 80);
            return Err(serde::de::Error::custom(format!(
                "expected a SHA-256: 64 hexadecimal digits (as `sha256sum FILE` prints), got {shown:?} ({} characters)",
                v.chars().count()
            )));
        }
        Ok(Sha256(v.to_ascii_lowercase()))
    }
}

/// A non-empty list of layer widths.
#[derive(Clone, Debug, PartialEq)]
pub struct Widths(pub Vec<i64>);
impl<'de> Deserialize<'de> for Widths {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = Vec::<Count>::deserialize(d)?;
        if v.is_empty() {
            return Err(serde::de::Error::custom("expected a non-empty list of hidden layer widths, got []"));
        }
        Ok(Widths(v.into_iter().map(|c| c.0).collect()))
    }
}
