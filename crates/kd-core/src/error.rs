//! The crate's error type.

use tch::{Device, Kind, TchError};

/// Result alias used by every fallible function of the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong when calling into `kd-core`.
///
/// Every variant names the offending argument and carries the offending value, shape,
/// dtype or device. Argument checks only read tensor metadata (`size()`, `kind()`,
/// `device()`), so they never synchronize a GPU.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The temperature `t` is not finite or not strictly positive.
    #[error("invalid temperature `t` = {t}: it must be finite and > 0")]
    InvalidTemperature {
        /// The rejected temperature.
        t: f64,
    },
    /// A loss weight is negative or not finite.
    #[error("invalid loss weight `{name}` = {value}: it must be finite and >= 0")]
    InvalidWeight {
        /// `"hard"` or `"soft"`.
        name: &'static str,
        /// The rejected value.
        value: f64,
    },
    /// Both loss weights are zero, so the objective would be identically zero.
    #[error("loss weights `hard` and `soft` are both 0: at least one must be > 0")]
    ZeroWeights,
    /// A logits / probabilities tensor is not of rank 2 (`[batch, classes]`).
    #[error("`{arg}` must have rank 2 ([batch, classes]), got shape {shape:?}")]
    BadRank {
        /// Name of the argument.
        arg: &'static str,
        /// Its shape.
        shape: Vec<i64>,
    },
    /// A `[batch, classes]` tensor has `batch == 0` or `classes == 0`.
    #[error("`{arg}` has an empty dimension: shape {shape:?} (batch and classes must be >= 1)")]
    EmptyDim {
        /// Name of the argument.
        arg: &'static str,
        /// Its shape.
        shape: Vec<i64>,
    },
    /// A logits / probabilities tensor is not floating point (half, bfloat16, float or double).
    #[error("`{arg}` must be a floating-point tensor, got dtype {kind:?}")]
    NotFloat {
        /// Name of the argument.
        arg: &'static str,
        /// Its dtype.
        kind: Kind,
    },
    /// The teacher tensor does not have the student's shape.
    #[error("`student_logits` has shape {student:?} but `{arg}` has shape {shape:?}: they must be equal")]
    ShapeMismatch {
        /// Name of the teacher-side argument.
        arg: &'static str,
        /// Shape of the student logits.
        student: Vec<i64>,
        /// Shape of the mismatching argument.
        shape: Vec<i64>,
    },
    /// A tensor is not on the student logits' device.
    #[error("`{arg}` is on device {device:?} but `student_logits` is on {expected:?}")]
    DeviceMismatch {
        /// Name of the argument.
        arg: &'static str,
        /// Its device.
        device: Device,
        /// The student logits' device.
        expected: Device,
    },
    /// The labels tensor is not int64.
    #[error("`labels` must be an int64 tensor of class indices, got dtype {kind:?}")]
    LabelsKind {
        /// The labels' dtype.
        kind: Kind,
    },
    /// The labels tensor is not 1-D with one entry per example.
    #[error("`labels` must be 1-D of length batch = {batch}, got shape {shape:?}")]
    LabelsShape {
        /// The labels' shape.
        shape: Vec<i64>,
        /// The batch size of the student logits.
        batch: i64,
    },
    /// `labels` is `None` while the hard-target weight is positive.
    #[error("`labels` is None but `weights.hard` = {hard} > 0: labels are required for the hard term")]
    MissingLabels {
        /// The hard-target weight.
        hard: f64,
    },
    /// `member_logits` is an empty slice.
    #[error("`member_logits` is empty: an ensemble needs at least one member")]
    EmptyEnsemble,
    /// An ensemble member's shape differs from member 0's.
    #[error("`member_logits[{index}]` has shape {shape:?} but `member_logits[0]` has shape {expected:?}")]
    MemberShape {
        /// Index of the offending member.
        index: usize,
        /// Its shape.
        shape: Vec<i64>,
        /// Shape of member 0.
        expected: Vec<i64>,
    },
    /// An ensemble member's dtype differs from member 0's.
    #[error("`member_logits[{index}]` has dtype {kind:?} but `member_logits[0]` has dtype {expected:?}")]
    MemberKind {
        /// Index of the offending member.
        index: usize,
        /// Its dtype.
        kind: Kind,
        /// Dtype of member 0.
        expected: Kind,
    },
    /// An ensemble member's device differs from member 0's.
    #[error("`member_logits[{index}]` is on device {device:?} but `member_logits[0]` is on {expected:?}")]
    MemberDevice {
        /// Index of the offending member.
        index: usize,
        /// Its device.
        device: Device,
        /// Device of member 0.
        expected: Device,
    },
    /// The top-k class ids are not int64.
    #[error("`teacher_classes` must be an int64 tensor of class ids, got dtype {kind:?}")]
    ClassesKind {
        /// The class ids' dtype.
        kind: Kind,
    },
    /// A top-k target tensor does not have the shape `[batch, k]` with `1 <= k <= classes`.
    #[error("`{arg}` has shape {shape:?}; expected {expected}")]
    TopKShape {
        /// `"teacher_probs"` or `"teacher_classes"`.
        arg: &'static str,
        /// Its shape.
        shape: Vec<i64>,
        /// What was expected, in words.
        expected: String,
    },
    /// Targets copied into targets of other shapes ([`crate::TeacherTargets::copy_from`]).
    #[error("the targets copied have shape {shape:?} but the targets they are copied into have {expected:?}")]
    TargetsShape {
        /// The shape of the source tensor that differs.
        shape: Vec<i64>,
        /// The shape of the tensor it was to be copied into.
        expected: Vec<i64>,
    },
    /// Soft targets made at one temperature were given to an objective at another.
    #[error("the teacher's targets were made at T = {targets} but the objective's temperature is T = {objective}")]
    TemperatureMismatch {
        /// The temperature the targets were made at.
        targets: f64,
        /// The objective's temperature.
        objective: f64,
    },
    /// An objective was given targets it cannot use (a teacher's targets for the hard-label
    /// objective, none for a distillation objective, probabilities for logit matching).
    #[error("the {objective} objective needs {needs}, got {got}")]
    WrongTargets {
        /// The objective, in words.
        objective: &'static str,
        /// What it needs, in words.
        needs: &'static str,
        /// What it was given, in words.
        got: &'static str,
    },
    /// `k` of top-k targets is not in `1..=classes`.
    #[error("top-k targets need 1 <= k <= classes, got k = {k} of {classes} classes")]
    InvalidTopK {
        /// The requested `k`.
        k: i64,
        /// The number of classes.
        classes: i64,
    },
    /// An error reported by libtorch (e.g. a class label out of range, detected on CPU).
    #[error("libtorch error: {0}")]
    Torch(#[from] TchError),
}
