//! Experiment files: parsing, validation with file/line errors, `--set` overrides, resolution of
//! defaults into a fully explicit [`Experiment`] (what `config.toml` of a run records).
//!
//! Validation happens while deserializing: range-checked newtypes ([`Positive`], [`Rate`], ...)
//! reject a bad value with the TOML parser's own line and column, and `deny_unknown_fields`
//! rejects misspelled keys the same way. Checks across fields (a stage's kind versus its keys,
//! references to earlier stages) point at the stage's `name` line.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer, Serialize};
use std::path::{Path, PathBuf};
use toml::Spanned;

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

/// The lowest temperature. Losses and logits are f32 in both precisions (bf16 rounds only the
/// matrix products' inputs), and `exp(-87.3)` is the smallest normal f32 (subnormals are
/// flushed to zero), so at temperature T the soft target of a class whose teacher logit is
/// more than `87.3 T` below the top one is exactly 0: at 0.01 that is a gap of 0.87, below it
/// the targets are one-hot for any plausible logits and the soft term's gradient,
/// `T (q - p)`, vanishes with T (at T = 1e-6 the loss reads exactly 0).
pub const MIN_TEMPERATURE: f64 = 0.01;
/// The highest temperature. At T, a logit gap of `g` moves `z / T` by `g / T`; f32 resolves
/// steps of 1.2e-7 near 1, so at 1e6 a gap of 1 still shifts the soft targets by about 8 f32
/// steps from uniform; above it they are uniform for any plausible logits, while `T^2` keeps
/// growing (at 1e30 the loss overflows f32).
pub const MAX_TEMPERATURE: f64 = 1e6;

/// The most classes a run supports (labels and `data.classes`): the output layer, the per-class
/// tables and the label counts are this wide.
pub const MAX_CLASSES: i64 = 1_000_000;
/// The most parameters one network may have (2^30, 4 GiB of f32 weights and up to 16 GiB with
/// gradients and Adam's state): checked before a network is allocated, so that a layer width of
/// 1e8 is an error rather than an allocation failure.
pub const MAX_PARAMETERS: i64 = 1 << 30;
/// The most frames of context on either side of a speech frame.
pub const MAX_CONTEXT: u32 = 1000;

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

// ---------------------------------------------------------------------------------------------
// The file as written.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExperiment {
    name: Spanned<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    device: Option<Spanned<String>>,
    #[serde(default)]
    threads: Option<Count>,
    #[serde(default)]
    precision: Precision,
    #[serde(default)]
    peak_tflops: Option<Positive>,
    data: RawData,
    #[serde(default)]
    defaults: RawTraining,
    #[serde(default)]
    stages: Vec<RawStage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawData {
    #[serde(default)]
    kind: Option<Spanned<DataKind>>,
    #[serde(default)]
    dir: Option<PathBuf>,
    #[serde(default)]
    speech: Option<crate::data::speech::CorpusConfig>,
    #[serde(default)]
    files: Option<RawFiles>,
    #[serde(default)]
    classes: Option<Count>,
    #[serde(default)]
    context: Option<[u32; 2]>,
    #[serde(default)]
    validation: usize,
    #[serde(default)]
    train_limit: Option<Count>,
    #[serde(default)]
    test_limit: Option<Count>,
}

/// A user's own frames and labels, per split.
#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawFiles {
    train: FileSet,
    validation: FileSet,
    test: FileSet,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RawTraining {
    epochs: Option<Count>,
    batch_size: Option<Count>,
    optimizer: Option<RawOptimizer>,
    schedule: Option<RawSchedule>,
    jitter: Option<u32>,
    train_fraction: Option<Share>,
    early_stopping: Option<RawEarlyStopping>,
}

/// Stop when the validation errors have not improved for `patience` epochs; keep the best.
#[derive(Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct RawEarlyStopping {
    patience: Count,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawOptimizer {
    kind: OptimizerKind,
    lr: Positive,
    momentum: Option<Rate>,
    momentum_start: Option<Rate>,
    momentum_ramp_epochs: Option<u32>,
    nesterov: Option<bool>,
    weight_decay: Option<NonNegative>,
    beta1: Option<Rate>,
    beta2: Option<Rate>,
    eps: Option<Positive>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    kind: ScheduleKind,
    gamma: Option<Positive>,
    every: Option<Count>,
    min_lr: Option<NonNegative>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawModel {
    hidden: Widths,
    #[serde(default)]
    input_dropout: Option<Rate>,
    #[serde(default)]
    hidden_dropout: Option<Rate>,
    #[serde(default)]
    max_norm: Option<Positive>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawStage {
    name: Spanned<String>,
    kind: StageKind,
    model: Option<RawModel>,
    seed: Option<u64>,
    // The training keys, as in [defaults] (not `#[serde(flatten)]`: it would lose line numbers).
    epochs: Option<Count>,
    batch_size: Option<Count>,
    optimizer: Option<RawOptimizer>,
    schedule: Option<RawSchedule>,
    jitter: Option<u32>,
    train_fraction: Option<Share>,
    early_stopping: Option<RawEarlyStopping>,
    teacher: Option<Spanned<String>>,
    teacher_checkpoint: Option<PathBuf>,
    teacher_top_k: Option<Count>,
    teacher_translations: Option<u32>,
    temperature: Option<Temperature>,
    hard_weight: Option<NonNegative>,
    soft_weight: Option<NonNegative>,
    objective: Option<Objective>,
    transfer_exclude: Option<Vec<ClassId>>,
    transfer_only: Option<Vec<ClassId>>,
    from: Option<Spanned<String>>,
    checkpoint: Option<PathBuf>,
    classes: Option<Vec<ClassId>>,
    shifts: Option<RawShifts>,
    fixed_shift: Option<f64>,
    members: Option<Vec<Spanned<String>>>,
    affinity: Option<Affinity>,
    clusters: Option<Count>,
    walk_steps: Option<u32>,
    repeats: Option<Count>,
    min_size: Option<Count>,
    max_size: Option<Count>,
    count: Option<Count>,
    kmeans: Option<RawKMeans>,
    subsets: Option<Spanned<String>>,
    examples: Option<Count>,
    top_n: Option<Count>,
    combine_iterations: Option<Count>,
    sweep: Option<RawSweep>,
    paper: Option<PaperFigures>,
}

/// Mini-batch k-means settings of a `clusters` stage.
#[derive(Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct RawKMeans {
    iterations: Option<Count>,
    batch_size: Option<Count>,
}

/// Candidate bias shifts: `min, min + step, ..., max`.
#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawShifts {
    min: f64,
    max: f64,
    step: Positive,
}

/// Values a stage is repeated over; each combination becomes a stage named
/// `<name>-T<temperature>-h<widths>-s<seed>` (only the swept parts appear).
#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawSweep {
    temperature: Option<Vec<Temperature>>,
    hidden: Option<Vec<Widths>>,
    seed: Option<Vec<u64>>,
}

/// The paper's figures for a stage's model, shown beside ours in reports.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct PaperFigures {
    /// Test errors (of 10,000).
    pub test_errors: Option<f64>,
    /// Test error rate in percent.
    pub test_error_percent: Option<f64>,
    /// Test errors on the stage's classes of interest (the omitted class, say).
    pub class_errors: Option<f64>,
    /// The bias shift the paper used.
    pub shift: Option<f64>,
    /// Accuracy in percent on the examples whose class some specialist covers (Table 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditional_accuracy_percent: Option<f64>,
    /// Relative change in top-1 correct, in percent, by the number of specialists covering the
    /// correct class: 0, 1, 2, ... (Table 4; its last entry stands for that many or more).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relative_change_percent: Option<Vec<f64>>,
}

// ---------------------------------------------------------------------------------------------
// The resolved experiment: every setting explicit. Serialized as the run's `config.toml`.

/// The kind training computes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// 32-bit floats throughout.
    #[default]
    F32,
    /// bfloat16 matrix products with f32 master weights, losses and optimizer state.
    Bf16,
}

impl Precision {
    fn is_f32(&self) -> bool {
        *self == Precision::F32
    }

    /// The tensor kind of the matrix products.
    pub fn kind(self) -> tch::Kind {
        match self {
            Precision::F32 => tch::Kind::Float,
            Precision::Bf16 => tch::Kind::BFloat16,
        }
    }
}

/// Which dataset a run reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DataKind {
    /// The four MNIST IDX files in `dir`.
    #[default]
    Mnist,
    /// The synthetic tied-state speech corpus of `[data.speech]`.
    Speech,
    /// Frames and labels from the user's files (`[data.files]`): Kaldi archives or NumPy.
    Files,
}

/// What a stage does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageKind {
    /// Train a model on hard labels.
    Train,
    /// Train a student on a teacher's soft targets (plus an optional hard term).
    Distill,
    /// Evaluate an existing model (an earlier stage's or a checkpoint file) on the test set.
    Evaluate,
    /// Add a constant to the output biases of some classes, chosen on the validation split.
    BiasShift,
    /// Combine earlier stages' models by averaging their probabilities.
    Ensemble,
    /// Class subsets from a generalist's predictions on the validation split (section 5).
    Clusters,
    /// One specialist per class subset, started from the generalist, combined with it by eq. 5.
    Specialists,
}

/// The class-similarity matrix whose columns a `clusters` stage groups by k-means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Affinity {
    /// The covariance of the generalist's predicted distributions (the paper's choice).
    #[default]
    Covariance,
    /// The same covariance scaled to correlations, so that rarely predicted classes are not
    /// lumped together by their small variances.
    Correlation,
    /// The symmetrized, row-normalized confusion matrix of the generalist (needs labels).
    Confusion,
}

/// The optimizer family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// SGD with (optionally Nesterov) momentum.
    Sgd,
    /// Adam.
    Adam,
}

/// The learning-rate schedule family, evaluated once per epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// `lr`
    Constant,
    /// `lr * gamma^epoch`
    Exponential,
    /// `lr * gamma^floor(epoch / every)`
    Step,
    /// `min_lr + (lr - min_lr) (1 + cos(pi epoch / epochs)) / 2`
    Cosine,
}

/// What the student of a distill stage matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Cross-entropy with the teacher's softmax at temperature T, times T^2, plus the hard term.
    #[default]
    Soft,
    /// Squared error between logits (Caruana et al.), plus the hard term.
    Logits,
}

/// A fully resolved experiment.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Experiment {
    /// Name; the run writes under `OUT/<name>/`.
    pub name: String,
    /// What the experiment reproduces (shown in reports).
    pub description: String,
    /// Base seed; each stage derives its own from it and its name unless it sets `seed`.
    pub seed: u64,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Intra-op threads of libtorch on CPU; 0 leaves libtorch's default.
    pub threads: i64,
    /// The kind forward and backward passes compute in; weights stay f32.
    #[serde(skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
    /// The device's peak TFLOP/s at `precision`, to log the share of it training reaches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_tflops: Option<f64>,
    /// The dataset.
    pub data: DataSpec,
    /// The stages, run in order.
    pub stages: Vec<Stage>,
}

/// Where the data comes from and how it is split.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DataSpec {
    /// Folder with the four IDX files (MNIST).
    pub dir: Option<PathBuf>,
    /// The synthetic speech corpus, when the data is speech.
    pub speech: Option<SpeechSpec>,
    /// The last `validation` training examples are held out as the validation split.
    pub validation: usize,
    /// Use only the first N training examples (before the validation split is carved), if set.
    pub train_limit: Option<i64>,
    /// Use only the first N test examples, if set.
    pub test_limit: Option<i64>,
    /// A user's own frames (Kaldi archives or .npy), when the data is files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<FilesSpec>,
}

/// Frames and labels read from files, in context windows.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FilesSpec {
    /// Frames of left context.
    pub left: i64,
    /// Frames of right context.
    pub right: i64,
    /// Number of classes (default: the largest label in any split, plus one).
    pub classes: Option<i64>,
    /// Training frames.
    pub train: FileSet,
    /// Validation (development) frames.
    pub validation: FileSet,
    /// Test frames.
    pub test: FileSet,
}

/// The files of one split.
///
/// Kaldi: `features` is an archive (`.ark`) or a script (`.scp`) of matrices, `labels` an
/// archive of int32 vectors (pdf ids per frame, the output of `ali-to-pdf`), paired by
/// utterance id. NumPy: `features` a 2-D float array (frames x features), `labels` a 1-D int
/// array, and optionally `lengths` a 1-D int array of frames per utterance (default: one
/// utterance), so that context windows stop at utterance edges.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSet {
    /// Features file.
    pub features: PathBuf,
    /// Labels file.
    pub labels: PathBuf,
    /// NumPy only: frames per utterance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lengths: Option<PathBuf>,
}

/// The synthetic speech corpus and the context window of each frame.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SpeechSpec {
    /// Frames of left context (the paper: 20).
    pub left: i64,
    /// Frames of right context (the paper: 5).
    pub right: i64,
    /// The generator's settings.
    pub corpus: crate::data::speech::CorpusConfig,
}

/// One named stage.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Stage {
    /// Unique name; checkpoints and CSV rows carry it.
    pub name: String,
    /// The paper's figures for this stage's model, if it reports any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paper: Option<PaperFigures>,
    /// What it does.
    #[serde(flatten)]
    pub job: Job,
}

/// A stage's job and its settings.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Job {
    /// Train on hard labels.
    Train {
        /// Architecture.
        model: ModelSpec,
        /// Loop settings.
        training: Training,
    },
    /// Distill from a teacher.
    Distill {
        /// Student architecture.
        model: ModelSpec,
        /// Loop settings.
        training: Training,
        /// Loss settings and the teacher.
        distill: DistillSpec,
    },
    /// Evaluate a model on the test set.
    Evaluate {
        /// The model.
        source: ModelSource,
    },
    /// Shift the output biases of `classes` by the candidate with the fewest validation errors
    /// (ties go to the smallest shift in magnitude), and by `fixed` if given.
    BiasShift {
        /// The model.
        source: ModelSource,
        /// Classes whose biases move together.
        classes: Vec<i64>,
        /// Candidates `min, min + step, ..., max`.
        min: f64,
        /// Last candidate.
        max: f64,
        /// Candidate spacing.
        step: f64,
        /// A fixed shift reported as well (the paper's value, say).
        fixed: Option<f64>,
    },
    /// Evaluate the mean of several models' probabilities; a distill stage can name it as its
    /// teacher.
    Ensemble {
        /// The members (earlier stages of this run).
        members: Vec<ModelSource>,
    },
    /// Class subsets from a generalist's predictions over the validation split: k-means of
    /// the columns of `affinity`, repeated with `repeats` seeds for overlapping subsets, subsets
    /// outside `[min_size, max_size]` dropped, then the `count` most confusable kept.
    Clusters {
        /// The generalist.
        source: ModelSource,
        /// The similarity matrix clustered.
        affinity: Affinity,
        /// k of k-means.
        clusters: i64,
        /// k-means clusters the rows of `kd_specialists::class_profiles(affinity, walk_steps)`;
        /// 0 clusters the affinity's columns themselves (the paper's literal recipe).
        walk_steps: i64,
        /// k-means runs (seeds `seed`, `seed + 1`, ...); more than one gives overlapping subsets.
        repeats: i64,
        /// Smallest subset kept.
        min_size: i64,
        /// Largest subset kept.
        max_size: Option<i64>,
        /// Keep at most this many subsets: those whose classes hold the largest share of the
        /// generalist's confusion among themselves.
        count: Option<i64>,
        /// k-means updates.
        kmeans_iterations: i64,
        /// Points per k-means update.
        kmeans_batch: i64,
        /// Seed of k-means.
        seed: u64,
    },
    /// One specialist per subset of a `clusters` stage, each a copy of the generalist with a
    /// head over the subset plus a dustbin class, trained on samples half from the subset and
    /// half from the rest; then the combination of eq. 5 evaluated against the generalist.
    Specialists {
        /// The generalist.
        source: ModelSource,
        /// The `clusters` stage whose subsets get specialists.
        subsets: String,
        /// Loop settings of every specialist (its seed is this seed plus its index).
        training: Training,
        /// Examples drawn per epoch (half inside the subset); default twice the subset's
        /// training examples.
        examples: Option<i64>,
        /// Specialists are consulted for the generalist's `top_n` most probable classes.
        top_n: i64,
        /// Gradient steps of the eq. 5 solver.
        combine_iterations: i64,
    },
}

/// Hidden widths and regularization; input and output sizes come from the data.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelSpec {
    /// Hidden layer widths.
    pub hidden: Vec<i64>,
    /// Dropout on inputs.
    pub input_dropout: f64,
    /// Dropout on hidden units.
    pub hidden_dropout: f64,
    /// Max-norm bound, if any.
    pub max_norm: Option<f64>,
}

/// A training loop's settings.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Training {
    /// Passes over the training (or transfer) set.
    pub epochs: i64,
    /// Examples per step; the last batch of an epoch may be smaller.
    pub batch_size: i64,
    /// Random translations of up to this many pixels in each direction (0 = none).
    pub jitter: u32,
    /// The share of the training split (or transfer set) the stage trains on: a random subset,
    /// the same for every stage of the run with the same share.
    #[serde(skip_serializing_if = "is_one")]
    pub train_fraction: f64,
    /// Stop after this many epochs without fewer validation errors, and keep the best epoch's
    /// weights.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patience: Option<i64>,
    /// Seed of initialization, shuffling, dropout and jitter.
    pub seed: u64,
    /// Optimizer.
    pub optimizer: OptimizerSpec,
    /// Learning-rate schedule.
    pub schedule: ScheduleSpec,
}

/// Optimizer settings (fields that do not apply to the kind keep their defaults).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OptimizerSpec {
    /// SGD or Adam.
    pub kind: OptimizerKind,
    /// Base learning rate.
    pub lr: f64,
    /// SGD: final momentum.
    pub momentum: f64,
    /// SGD: momentum at epoch 0, rising linearly to `momentum` over `momentum_ramp_epochs`.
    pub momentum_start: f64,
    /// SGD: length of the momentum ramp in epochs (0 = no ramp).
    pub momentum_ramp_epochs: u32,
    /// SGD: Nesterov momentum.
    pub nesterov: bool,
    /// L2 penalty added to the gradient.
    pub weight_decay: f64,
    /// Adam: first-moment decay.
    pub beta1: f64,
    /// Adam: second-moment decay.
    pub beta2: f64,
    /// Adam: denominator epsilon.
    pub eps: f64,
}

/// Learning-rate schedule settings.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScheduleSpec {
    /// Family.
    pub kind: ScheduleKind,
    /// Decay factor (exponential, step).
    pub gamma: f64,
    /// Step length in epochs (step).
    pub every: i64,
    /// Final learning rate (cosine).
    pub min_lr: f64,
}

/// Distillation loss settings.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DistillSpec {
    /// The teacher.
    pub teacher: ModelSource,
    /// Soft targets or logit matching.
    pub objective: Objective,
    /// Temperature of the soft targets (unused by logit matching).
    pub temperature: f64,
    /// Weight of the hard-label cross-entropy at T = 1.
    pub hard_weight: f64,
    /// Weight of the soft term (which already carries T^2).
    pub soft_weight: f64,
    /// Classes left out of the transfer set.
    pub transfer_exclude: Vec<i64>,
    /// If non-empty, the only classes kept in the transfer set.
    pub transfer_only: Vec<i64>,
    /// Keep only the teacher's `k` most probable classes per example (renormalized at T):
    /// soft targets in `k` instead of all the classes' numbers, in memory and in the cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i64>,
    /// Soft targets averaged over translations of up to this many pixels: each transfer
    /// image's target is the mean of the teacher's softmax(z / T) over all its
    /// `(2 n + 1)^2` zero-filled translations, while the student sees the image untranslated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub translations: Option<i64>,
}

/// Where a model comes from.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelSource {
    /// The final checkpoint of an earlier stage of this run.
    Stage(String),
    /// An ensemble stage of this run, with its members: at temperature T its distribution is
    /// the mean of the members' softmax(z / T).
    Ensemble {
        /// The ensemble stage.
        stage: String,
        /// Its members.
        members: Vec<ModelSource>,
    },
    /// A checkpoint file (made by an earlier run).
    Checkpoint(PathBuf),
}

impl Job {
    /// The stages of this run whose models the job reads.
    pub fn reads(&self) -> Vec<&str> {
        match self {
            Job::Train { .. } => vec![],
            Job::Distill { distill, .. } => distill.teacher.stages(),
            Job::Evaluate { source } | Job::BiasShift { source, .. } => source.stages(),
            Job::Ensemble { members } => members.iter().flat_map(ModelSource::stages).collect(),
            Job::Clusters { source, .. } => source.stages(),
            Job::Specialists { source, subsets, .. } => {
                source.stages().into_iter().chain(std::iter::once(subsets.as_str())).collect()
            }
        }
    }
}

impl ModelSource {
    /// The source of an ensemble stage `stage` with these members.
    pub fn ensemble(stage: &str, members: &[ModelSource]) -> Self {
        ModelSource::Ensemble { stage: stage.to_string(), members: members.to_vec() }
    }

    /// The stages of this run whose models it reads.
    pub fn stages(&self) -> Vec<&str> {
        match self {
            ModelSource::Stage(s) => vec![s.as_str()],
            ModelSource::Checkpoint(_) => vec![],
            ModelSource::Ensemble { stage, members } => {
                std::iter::once(stage.as_str()).chain(members.iter().flat_map(ModelSource::stages)).collect()
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// Reads, overrides, validates and resolves an experiment file.
///
/// Relative paths in the file (`data.dir`, checkpoints) are taken relative to the current
/// directory, like the path of the file itself.
pub fn load(path: &Path, overrides: &[String]) -> Result<Experiment> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let origin = path.display().to_string();
    // The file as written first, so that its errors carry its own line numbers.
    let raw: RawExperiment = toml::from_str(&text).map_err(|e| toml_error(&origin, &text, &e))?;
    let (raw, text, origin) = if overrides.is_empty() {
        (raw, text, origin)
    } else {
        let mut doc: toml::Table = toml::from_str(&text).map_err(|e| toml_error(&origin, &text, &e))?;
        for o in overrides {
            apply_override(&mut doc, o).with_context(|| format!("--set {o}"))?;
        }
        let text = toml::to_string(&doc)?;
        let origin = format!("{origin} after --set {}", overrides.join(" "));
        let raw = toml::from_str(&text).map_err(|e| toml_error(&origin, &text, &e))?;
        (raw, text, origin)
    };
    resolve(raw, &text).map_err(|e| anyhow::anyhow!("{origin}:{e}"))
}

/// A TOML error as the parser shows it (`origin: TOML parse error at line L, column C`, the
/// line with a caret under the column, the message), but with the quoted line and the message
/// clipped: a 200 KB line is shown as the 120 characters around the column.
fn toml_error(origin: &str, text: &str, e: &toml::de::Error) -> anyhow::Error {
    use crate::data::inputs::{clip_lines, MAX_ECHO};
    let message = clip_lines(e.message().trim_end(), MAX_ECHO);
    let Some(span) = e.span() else { return anyhow::anyhow!("{origin}: TOML parse error: {message}") };
    let mut at = span.start.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    let line: Vec<char> = text[line_start..line_end].trim_end_matches('\r').chars().collect();
    let column = text[line_start..at].chars().count();
    // At most 60 characters either side of the column, the cuts marked with "...".
    let (from, to) = (column.saturating_sub(60), (column + 60).min(line.len()));
    let mut shown: String = line.get(from..to.max(from)).unwrap_or(&[]).iter().collect();
    let mut caret = column - from;
    if from > 0 {
        shown.insert_str(0, "...");
        caret += 3;
    }
    if to < line.len() {
        shown.push_str("...");
    }
    let number = line_of(text, at);
    let pad = " ".repeat(number.to_string().len());
    anyhow::anyhow!(
        "{origin}: TOML parse error at line {number}, column {}\n{pad} |\n{number} | {shown}\n{pad} | {}^\n{message}",
        column + 1,
        " ".repeat(caret)
    )
}

/// Applies `key=value`, where key is a dotted path (`seed`, `data.train_limit`,
/// `defaults.epochs`, `stages.<stage name>.temperature`) and value a TOML value (a bare word is
/// taken as a string).
fn apply_override(doc: &mut toml::Table, assignment: &str) -> Result<()> {
    let Some((key, value)) = assignment.split_once('=') else {
        bail!("expected KEY=VALUE");
    };
    let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
        Ok(mut t) => {
            let v = t.remove("v").expect("parsed table has key v");
            // `1\nx = 2` parses as a table of two keys: the rest would be dropped silently.
            if let Some(extra) = t.keys().next() {
                bail!("the value must be one TOML value, but more TOML follows it (`{extra}`)");
            }
            v
        }
        Err(_) if value.contains(['\n', '\r']) => {
            bail!("the value must be one TOML value (a bare word is taken as a string), not several lines")
        }
        Err(_) => toml::Value::String(value.to_string()),
    };
    let parts: Vec<&str> = key.trim().split('.').collect();
    let (last, path) = parts.split_last().expect("split yields at least one part");
    let mut table = doc;
    let mut i = 0;
    while i < path.len() {
        let part = path[i];
        if part == "stages" {
            let name = path.get(i + 1).with_context(|| "expected stages.<stage name>.<key>")?;
            let stages = table.get_mut("stages").and_then(|s| s.as_array_mut()).context("the file has no stages")?;
            let stage = stages
                .iter_mut()
                .find(|s| s.get("name").and_then(|n| n.as_str()) == Some(name))
                .with_context(|| format!("no stage named `{name}`"))?;
            table = stage.as_table_mut().context("a stage is not a table")?;
            i += 2;
        } else {
            let entry = table.entry(part).or_insert_with(|| toml::Value::Table(Default::default()));
            table = entry.as_table_mut().with_context(|| format!("`{part}` is not a table"))?;
            i += 1;
        }
    }
    table.insert(last.to_string(), value);
    Ok(())
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

/// Fails with `LINE: stage `NAME`: MESSAGE` (the caller prefixes the file name).
macro_rules! stage_bail {
    ($text:expr, $stage:expr, $($arg:tt)*) => {
        bail!("{}: stage `{}`: {}", line_of($text, $stage.name.span().start), $stage.name.get_ref(), format!($($arg)*))
    };
}

/// The longest experiment or stage name, in characters: with what a run appends to a stage's
/// name in its files (`.<m>.resume.safetensors.<pid>.tmp`), a file name stays far below the 255
/// bytes that file systems allow.
pub const MAX_NAME_LEN: usize = 100;

/// What makes `name` unusable as an experiment or stage name, if anything. A name becomes one
/// component of a path (`OUT/<name>/`, `checkpoints/<stage>.safetensors`), so it may hold only
/// ASCII letters, digits, `_`, `-` and `.`, must start with a letter, digit or `_` (no `.`, `..`
/// or hidden file, nothing a command line takes for an option), and has at most
/// [`MAX_NAME_LEN`] characters. No separator (`/`, `\`), NUL, control character or space can
/// get in.
pub fn name_problem(name: &str) -> Option<String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "_-.".contains(c);
    if name.is_empty() {
        Some("it is empty".into())
    } else if let Some(c) = name.chars().find(|&c| !allowed(c)) {
        Some(format!("{c:?} is not allowed (only ASCII letters, digits, `_`, `-` and `.`)"))
    } else if !name.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
        Some("it must start with a letter, a digit or `_`".into())
    } else if name.chars().count() > MAX_NAME_LEN {
        Some(format!("it has {} characters, more than {MAX_NAME_LEN}", name.chars().count()))
    } else {
        None
    }
}

/// Whether a stage named `name` (a specialists stage if `specialists`) would share a name that a
/// run derives from a stage's name with one of the `earlier` stages. A run derives: the row
/// `<stage>-fixed` (a bias_shift stage's fixed shift; the tables count any `<stage>-fixed` row
/// as `<stage>`'s), the checkpoints `<stage>.resume` and `<stage>.best` (while a stage trains),
/// and for a specialists stage, specialist m's checkpoint, folder and `--only` name `<stage>.<m>`.
fn derived_name_clash(name: &str, specialists: bool, earlier: &[Stage]) -> Option<String> {
    for kind in ["resume", "best"] {
        if name.ends_with(&format!(".{kind}")) {
            return Some(format!(
                "names ending in `.{kind}` are reserved for a stage's {kind} checkpoint `<stage>.{kind}.safetensors`"
            ));
        }
    }
    let fixed_of = |a: &str, b: &str| a.strip_suffix("-fixed") == Some(b);
    let specialist_of =
        |a: &str, b: &Stage| matches!(b.job, Job::Specialists { .. }) && name_is_specialist_of(a, &b.name);
    earlier.iter().find_map(|t| {
        let t_name = t.name.as_str();
        if fixed_of(name, t_name) || fixed_of(t_name, name) {
            let (base, fixed) = if fixed_of(name, t_name) { (t_name, name) } else { (name, t_name) };
            Some(format!(
                "`{fixed}` is the name of the row that stage `{base}` records with its fixed shift (a bias_shift \
                 stage's `fixed_shift`; rows named `<stage>-fixed` belong to `<stage>`), so no stage can have it \
                 beside `{base}`"
            ))
        } else if specialist_of(name, t) {
            Some(format!("`{name}` names a specialist of the specialists stage `{t_name}` (`<stage>.<m>`)"))
        } else if specialists && name_is_specialist_of(t_name, name) {
            Some(format!(
                "stage `{t_name}` has the name of one of this specialists stage's specialists (`<stage>.<m>`)"
            ))
        } else {
            None
        }
    })
}

/// Whether `a` is `<stage>.<m>`, a specialist's name, for the specialists stage `stage`.
fn name_is_specialist_of(a: &str, stage: &str) -> bool {
    a.strip_prefix(stage)
        .and_then(|r| r.strip_prefix('.'))
        .is_some_and(|m| !m.is_empty() && (m.bytes().all(|c| c.is_ascii_digit()) || m.parse::<usize>().is_ok()))
}

fn resolve(raw: RawExperiment, text: &str) -> Result<Experiment> {
    if let Some(problem) = name_problem(raw.name.get_ref()) {
        bail!(
            "{}: name: {:?} is not a usable run name, which becomes the folder OUT/<name>/: {problem}",
            line_of(text, raw.name.span().start),
            raw.name.get_ref()
        );
    }
    let device = match raw.device {
        None => "auto".to_string(),
        Some(d) => {
            let v = d.get_ref();
            let ok = v == "auto"
                || v == "cpu"
                || v == "cuda"
                || v.strip_prefix("cuda:").is_some_and(|n| n.parse::<usize>().is_ok());
            if !ok {
                bail!(
                    "{}: device: expected \"auto\", \"cpu\", \"cuda\" or \"cuda:N\", got {v:?}",
                    line_of(text, d.span().start)
                );
            }
            v.clone()
        }
    };
    if raw.stages.is_empty() {
        bail!("{}: the experiment has no [[stages]]", line_of(text, raw.name.span().start));
    }
    let data_line = line_of(text, raw.name.span().start);
    let kind = raw.data.kind.as_ref().map_or(DataKind::Mnist, |k| *k.get_ref());
    if let Some(c) = raw.data.classes.filter(|c| c.0 > MAX_CLASSES) {
        bail!("{data_line}: data: classes = {}: kd-run supports at most {MAX_CLASSES} classes", c.0);
    }
    if let Some(c) = raw.data.context.filter(|c| c.iter().any(|&n| n > MAX_CONTEXT)) {
        bail!("{data_line}: data: context = {c:?}: at most {MAX_CONTEXT} frames on either side");
    }
    if kind != DataKind::Files && (raw.data.files.is_some() || raw.data.classes.is_some()) {
        bail!("{data_line}: data: `files` and `classes` need kind = \"files\"");
    }
    // Settings of the MNIST image split, which the frame data (split by speaker or by file) has not.
    let image_split = raw.data.dir.is_some()
        || raw.data.validation > 0
        || raw.data.train_limit.is_some()
        || raw.data.test_limit.is_some();
    let mut files = None;
    let speech = match kind {
        DataKind::Files => {
            let Some(f) = raw.data.files.clone() else {
                bail!(
                    "{data_line}: data: kind = \"files\" needs [data.files] with `train`, `validation` and `test`, each {{ features = ..., labels = ... }}"
                );
            };
            if image_split || raw.data.speech.is_some() {
                bail!(
                    "{data_line}: data: with kind = \"files\" the splits are the files; `dir`, `speech`, `validation`, `train_limit` and `test_limit` do not apply"
                );
            }
            let [left, right] = raw.data.context.unwrap_or([20, 5]);
            files = Some(FilesSpec {
                left: i64::from(left),
                right: i64::from(right),
                classes: raw.data.classes.map(|c| c.0),
                train: f.train,
                validation: f.validation,
                test: f.test,
            });
            None
        }
        DataKind::Mnist => {
            if raw.data.speech.is_some() || raw.data.context.is_some() {
                bail!("{data_line}: data: `speech` and `context` need kind = \"speech\"");
            }
            if raw.data.dir.is_none() {
                bail!("{data_line}: data: `dir`, the folder with the MNIST IDX files, is missing");
            }
            None
        }
        DataKind::Speech => {
            let corpus = raw.data.speech.clone().unwrap_or_default();
            corpus.validate().map_err(|e| anyhow::anyhow!("{data_line}: data.speech: {e:#}"))?;
            if image_split {
                bail!(
                    "{data_line}: data: a speech corpus splits by speaker (training, development = validation, test); `dir`, `validation`, `train_limit` and `test_limit` do not apply"
                );
            }
            let [left, right] = raw.data.context.unwrap_or([20, 5]);
            Some(SpeechSpec { left: i64::from(left), right: i64::from(right), corpus })
        }
    };
    let data = DataSpec {
        dir: raw.data.dir,
        speech,
        validation: raw.data.validation,
        train_limit: raw.data.train_limit.map(|c| c.0),
        test_limit: raw.data.test_limit.map(|c| c.0),
        files,
    };
    // Speech frames (synthetic or from files): windows, a validation split of their own.
    let framed = data.speech.is_some() || data.files.is_some();
    let distill_keys: Vec<&str> = TRAIN_KEYS.iter().chain(&DISTILL_ONLY_KEYS).copied().collect();
    let mut stages: Vec<Stage> = Vec::new();
    let mut expanded = Vec::new();
    for s in raw.stages {
        let room = MAX_STAGES.saturating_sub(expanded.len());
        expanded.extend(expand_sweep(s, text, room)?);
    }
    let mut names = std::collections::HashSet::with_capacity(expanded.len());
    for s in expanded {
        let name = s.name.get_ref().clone();
        if let Some(problem) = name_problem(&name) {
            stage_bail!(text, s, "not a usable stage name: {problem}");
        }
        if !names.insert(name.clone()) {
            stage_bail!(text, s, "two stages have this name");
        }
        if let Some(problem) = derived_name_clash(&name, s.kind == StageKind::Specialists, &stages) {
            stage_bail!(text, s, "{problem}; rename one of them");
        }
        let allowed: &[&str] = match s.kind {
            StageKind::Train => &TRAIN_KEYS,
            StageKind::Distill => &distill_keys,
            StageKind::Evaluate => &["from", "checkpoint", "paper"],
            StageKind::BiasShift => &["from", "checkpoint", "classes", "shifts", "fixed_shift", "paper"],
            StageKind::Ensemble => &["members", "paper"],
            StageKind::Clusters => &CLUSTER_KEYS,
            StageKind::Specialists => &SPECIALIST_KEYS,
        };
        if let Some(k) = s.present_keys().into_iter().find(|k| !allowed.contains(k)) {
            stage_bail!(
                text,
                s,
                "`{k}` does not apply to a {} stage (its keys: {})",
                s.kind.as_str(),
                allowed.join(", ")
            );
        }
        let seed = s.seed.unwrap_or_else(|| derive_seed(raw.seed, &name));
        let job = match s.kind {
            StageKind::Train => {
                Job::Train { model: resolve_model(text, &s)?, training: stage_training(text, &raw.defaults, &s, seed)? }
            }
            StageKind::Distill => Job::Distill {
                model: resolve_model(text, &s)?,
                training: stage_training(text, &raw.defaults, &s, seed)?,
                distill: resolve_distill(text, &s, &stages)?,
            },
            StageKind::Evaluate => {
                Job::Evaluate { source: resolve_source(text, &s, s.from.as_ref(), s.checkpoint.as_ref(), &stages)? }
            }
            StageKind::BiasShift => resolve_bias_shift(text, &s, &stages, data.validation + usize::from(framed))?,
            StageKind::Ensemble => Job::Ensemble { members: resolve_members(text, &s, &stages)? },
            StageKind::Clusters => resolve_clusters(text, &s, &stages, seed, data.validation + usize::from(framed))?,
            StageKind::Specialists => Job::Specialists {
                source: resolve_source(text, &s, s.from.as_ref(), s.checkpoint.as_ref(), &stages)?,
                subsets: resolve_subsets(text, &s, &stages)?,
                training: stage_training(text, &raw.defaults, &s, seed)?,
                examples: s.examples.map(|c| c.0),
                top_n: s.top_n.map_or(1, |c| c.0),
                combine_iterations: s.combine_iterations.map_or(100, |c| c.0),
            },
        };
        let early = matches!(&job, Job::Train { training, .. } | Job::Distill { training, .. } | Job::Specialists { training, .. }
            if training.patience.is_some());
        if matches!(&job, Job::Distill { training, distill, .. } if distill.top_k.is_some() && training.jitter > 0) {
            stage_bail!(
                text,
                s,
                "`teacher_top_k` keeps a cached teacher's outputs; with `jitter` the teacher runs live"
            );
        }
        if matches!(&job, Job::Distill { training, distill, .. } if distill.translations.is_some() && training.jitter > 0)
        {
            stage_bail!(
                text,
                s,
                "`teacher_translations` averages a cached teacher's outputs; with `jitter` the teacher runs live"
            );
        }
        if early && data.validation == 0 && !framed {
            stage_bail!(text, s, "early stopping watches the validation split: set `data.validation` > 0");
        }
        if framed {
            let jitter =
                matches!(&job, Job::Train { training, .. } | Job::Distill { training, .. } if training.jitter > 0);
            let filtered = matches!(&job, Job::Distill { distill, .. }
                if !distill.transfer_exclude.is_empty() || !distill.transfer_only.is_empty());
            if jitter {
                stage_bail!(text, s, "`jitter` translates images; speech frames are not images");
            }
            if matches!(&job, Job::Distill { distill, .. } if distill.translations.is_some()) {
                stage_bail!(text, s, "`teacher_translations` translates images; speech frames are not images");
            }
            if filtered {
                stage_bail!(text, s, "transfer-set class filters are not supported for speech frames yet");
            }
        }
        stages.push(Stage { name, paper: s.paper.clone(), job });
    }
    Ok(Experiment {
        name: raw.name.into_inner(),
        description: raw.description.unwrap_or_default(),
        seed: raw.seed,
        device,
        threads: raw.threads.map_or(0, |c| c.0),
        precision: raw.precision,
        peak_tflops: raw.peak_tflops.map(|p| p.0),
        data,
        stages,
    })
}

/// The most stages an experiment may have, its sweeps expanded: a small file must not expand
/// into millions of stages (each one a run of its own) and exhaust memory before anything runs.
pub const MAX_STAGES: usize = 10_000;

const TRAIN_KEYS: [&str; 11] = [
    "model",
    "seed",
    "epochs",
    "batch_size",
    "optimizer",
    "schedule",
    "jitter",
    "train_fraction",
    "early_stopping",
    "sweep",
    "paper",
];
const DISTILL_ONLY_KEYS: [&str; 10] = [
    "teacher",
    "teacher_checkpoint",
    "teacher_top_k",
    "teacher_translations",
    "temperature",
    "hard_weight",
    "soft_weight",
    "objective",
    "transfer_exclude",
    "transfer_only",
];

const CLUSTER_KEYS: [&str; 12] = [
    "from",
    "checkpoint",
    "affinity",
    "clusters",
    "walk_steps",
    "repeats",
    "min_size",
    "max_size",
    "count",
    "kmeans",
    "seed",
    "paper",
];
const SPECIALIST_KEYS: [&str; 13] = [
    "from",
    "checkpoint",
    "subsets",
    "seed",
    "epochs",
    "batch_size",
    "optimizer",
    "schedule",
    "early_stopping",
    "examples",
    "top_n",
    "combine_iterations",
    "paper",
];

impl StageKind {
    fn as_str(self) -> &'static str {
        match self {
            StageKind::Train => "train",
            StageKind::Distill => "distill",
            StageKind::Evaluate => "evaluate",
            StageKind::BiasShift => "bias_shift",
            StageKind::Ensemble => "ensemble",
            StageKind::Clusters => "clusters",
            StageKind::Specialists => "specialists",
        }
    }
}

impl RawStage {
    fn training(&self) -> RawTraining {
        RawTraining {
            epochs: self.epochs,
            batch_size: self.batch_size,
            optimizer: self.optimizer.clone(),
            schedule: self.schedule.clone(),
            jitter: self.jitter,
            train_fraction: self.train_fraction,
            early_stopping: self.early_stopping,
        }
    }

    /// The optional keys this stage sets.
    fn present_keys(&self) -> Vec<&'static str> {
        [
            ("model", self.model.is_some()),
            ("seed", self.seed.is_some()),
            ("epochs", self.epochs.is_some()),
            ("batch_size", self.batch_size.is_some()),
            ("optimizer", self.optimizer.is_some()),
            ("schedule", self.schedule.is_some()),
            ("jitter", self.jitter.is_some()),
            ("train_fraction", self.train_fraction.is_some()),
            ("early_stopping", self.early_stopping.is_some()),
            ("teacher", self.teacher.is_some()),
            ("teacher_checkpoint", self.teacher_checkpoint.is_some()),
            ("teacher_top_k", self.teacher_top_k.is_some()),
            ("teacher_translations", self.teacher_translations.is_some()),
            ("temperature", self.temperature.is_some()),
            ("hard_weight", self.hard_weight.is_some()),
            ("soft_weight", self.soft_weight.is_some()),
            ("objective", self.objective.is_some()),
            ("transfer_exclude", self.transfer_exclude.is_some()),
            ("transfer_only", self.transfer_only.is_some()),
            ("from", self.from.is_some()),
            ("checkpoint", self.checkpoint.is_some()),
            ("classes", self.classes.is_some()),
            ("shifts", self.shifts.is_some()),
            ("fixed_shift", self.fixed_shift.is_some()),
            ("members", self.members.is_some()),
            ("affinity", self.affinity.is_some()),
            ("clusters", self.clusters.is_some()),
            ("walk_steps", self.walk_steps.is_some()),
            ("repeats", self.repeats.is_some()),
            ("min_size", self.min_size.is_some()),
            ("max_size", self.max_size.is_some()),
            ("count", self.count.is_some()),
            ("kmeans", self.kmeans.is_some()),
            ("subsets", self.subsets.is_some()),
            ("examples", self.examples.is_some()),
            ("top_n", self.top_n.is_some()),
            ("combine_iterations", self.combine_iterations.is_some()),
            ("sweep", self.sweep.is_some()),
            ("paper", self.paper.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, present)| present.then_some(k))
        .collect()
    }
}

/// One stage per combination of the swept values (the stage itself when it sweeps nothing); an
/// error when they would be more than `room` stages, before any is made.
fn expand_sweep(mut stage: RawStage, text: &str, room: usize) -> Result<Vec<RawStage>> {
    if room == 0 {
        stage_bail!(
            text,
            stage,
            "the experiment has more than {MAX_STAGES} stages (sweeps expanded), the most kd-run runs"
        );
    }
    // Taken out of the stage, so that each copy below does not copy the swept lists too (which
    // made expansion quadratic in the number of stages).
    let Some(sweep) = stage.sweep.take() else { return Ok(vec![stage]) };
    let lengths = [
        sweep.temperature.as_ref().map_or(1, Vec::len),
        sweep.hidden.as_ref().map_or(1, Vec::len),
        sweep.seed.as_ref().map_or(1, Vec::len),
    ];
    let total = lengths.iter().try_fold(1usize, |acc, &n| acc.checked_mul(n));
    if total.is_none_or(|t| t > room) {
        let total = total.map_or("too many".to_string(), |t| t.to_string());
        stage_bail!(
            text,
            stage,
            "the sweep expands into {} x {} x {} = {total} stages; an experiment has at most {MAX_STAGES} (sweeps expanded){}",
            lengths[0],
            lengths[1],
            lengths[2],
            if room < MAX_STAGES { format!(", and the stages before this one leave room for {room}") } else { String::new() }
        );
    }
    let temperatures: Vec<Option<Temperature>> =
        sweep.temperature.map_or(vec![None], |v| v.into_iter().map(Some).collect());
    let hiddens: Vec<Option<Widths>> = sweep.hidden.map_or(vec![None], |v| v.into_iter().map(Some).collect());
    let seeds: Vec<Option<u64>> = sweep.seed.map_or(vec![None], |v| v.into_iter().map(Some).collect());
    if temperatures.is_empty() || hiddens.is_empty() || seeds.is_empty() {
        stage_bail!(text, stage, "a sweep list is empty");
    }
    let mut out = Vec::with_capacity(total.unwrap_or(0));
    for t in &temperatures {
        for h in &hiddens {
            for seed in &seeds {
                let mut s = stage.clone();
                let mut name = s.name.get_ref().clone();
                if let Some(t) = t {
                    s.temperature = Some(*t);
                    name.push_str(&format!("-T{}", t.0));
                }
                if let Some(h) = h {
                    let Some(model) = s.model.as_mut() else {
                        stage_bail!(text, stage, "sweeping `hidden` needs a `model` table to vary");
                    };
                    model.hidden = h.clone();
                    name.push_str(&format!("-h{}", h.0.iter().map(i64::to_string).collect::<Vec<_>>().join("x")));
                }
                if let Some(seed) = seed {
                    s.seed = Some(*seed);
                    name.push_str(&format!("-s{seed}"));
                }
                s.name = Spanned::new(s.name.span(), name);
                out.push(s);
            }
        }
    }
    Ok(out)
}

fn resolve_model(text: &str, s: &RawStage) -> Result<ModelSpec> {
    let Some(model) = &s.model else {
        stage_bail!(text, s, "a {} stage needs `model = {{ hidden = [...] }}`", s.kind.as_str());
    };
    // The parameters between hidden layers alone, and at least one input and two classes
    // (the run checks again with the data's sizes before allocating).
    let h = &model.hidden.0;
    let ends = h[0].checked_add(h[h.len() - 1]).and_then(|w| w.checked_add(1)).and_then(|w| w.checked_mul(2));
    let least = h.windows(2).fold(ends, |acc, w| w[0].checked_add(1)?.checked_mul(w[1])?.checked_add(acc?));
    if least.is_none_or(|p| p > MAX_PARAMETERS) {
        stage_bail!(
            text,
            s,
            "hidden = {h:?} makes a network of more than {MAX_PARAMETERS} parameters, the most kd-run allocates"
        );
    }
    Ok(ModelSpec {
        hidden: model.hidden.0.clone(),
        input_dropout: model.input_dropout.map_or(0.0, |r| r.0),
        hidden_dropout: model.hidden_dropout.map_or(0.0, |r| r.0),
        max_norm: model.max_norm.map(|p| p.0),
    })
}

fn stage_training(text: &str, defaults: &RawTraining, s: &RawStage, seed: u64) -> Result<Training> {
    resolve_training(defaults, &s.training(), seed)
        .map_err(|e| anyhow::anyhow!("{}: stage `{}`: {e}", line_of(text, s.name.span().start), s.name.get_ref()))
}

fn resolve_distill(text: &str, s: &RawStage, earlier: &[Stage]) -> Result<DistillSpec> {
    if s.teacher.is_some() && s.teacher_checkpoint.is_some() {
        stage_bail!(text, s, "give either `teacher` or `teacher_checkpoint`, not both");
    }
    let teacher = resolve_source(text, s, s.teacher.as_ref(), s.teacher_checkpoint.as_ref(), earlier)?;
    let hard_weight = s.hard_weight.map_or(0.0, |w| w.0);
    let soft_weight = s.soft_weight.map_or(1.0, |w| w.0);
    if hard_weight == 0.0 && soft_weight == 0.0 {
        stage_bail!(text, s, "hard_weight and soft_weight are both 0: nothing to train on");
    }
    let objective = s.objective.unwrap_or_default();
    let temperature = match (objective, s.temperature) {
        (Objective::Soft, Some(t)) => t.0,
        (Objective::Soft, None) => stage_bail!(text, s, "a distill stage needs `temperature`"),
        (Objective::Logits, Some(_)) => stage_bail!(text, s, "`temperature` does not apply to objective = \"logits\""),
        (Objective::Logits, None) => 1.0,
    };
    if objective == Objective::Logits && matches!(teacher, ModelSource::Ensemble { .. }) {
        stage_bail!(text, s, "logit matching needs one teacher network, not an ensemble");
    }
    let top_k = s.teacher_top_k.map(|k| k.0);
    if top_k.is_some() && objective == Objective::Logits {
        stage_bail!(text, s, "`teacher_top_k` keeps soft targets; logit matching needs every logit");
    }
    let translations = s.teacher_translations.filter(|&n| n > 0).map(i64::from);
    if translations.is_some() && objective == Objective::Logits {
        stage_bail!(text, s, "`teacher_translations` averages soft targets; logit matching matches raw logits");
    }
    if translations.is_some() && top_k.is_some() {
        stage_bail!(text, s, "give either `teacher_translations` or `teacher_top_k`, not both");
    }
    let classes = |v: &Option<Vec<ClassId>>| v.iter().flatten().map(|c| c.0).collect::<Vec<_>>();
    let (transfer_exclude, transfer_only) = (classes(&s.transfer_exclude), classes(&s.transfer_only));
    if !transfer_exclude.is_empty() && !transfer_only.is_empty() {
        stage_bail!(text, s, "give either `transfer_exclude` or `transfer_only`, not both");
    }
    if s.transfer_only.as_ref().is_some_and(Vec::is_empty) {
        stage_bail!(text, s, "`transfer_only = []` leaves an empty transfer set");
    }
    Ok(DistillSpec {
        teacher,
        objective,
        temperature,
        hard_weight,
        soft_weight,
        transfer_exclude,
        transfer_only,
        top_k,
        translations,
    })
}

/// The members of an ensemble stage: each entry names an earlier stage that trains a model or
/// evaluates one (a checkpoint of another run, say), or the base name of a sweep (`member` for
/// `member-s1`, `member-s2`, ...).
fn resolve_members(text: &str, s: &RawStage, earlier: &[Stage]) -> Result<Vec<ModelSource>> {
    let entries = s.members.as_deref().unwrap_or_default();
    let mut members: Vec<ModelSource> = Vec::new();
    for entry in entries {
        let at =
            |msg: String| anyhow::anyhow!("{}: stage `{}`: {msg}", line_of(text, entry.span().start), s.name.get_ref());
        let want = entry.get_ref();
        let prefix = format!("{want}-");
        let exact: Vec<&Stage> = earlier.iter().filter(|t| &t.name == want).collect();
        let matched =
            if exact.is_empty() { earlier.iter().filter(|t| t.name.starts_with(&prefix)).collect() } else { exact };
        if matched.is_empty() {
            return Err(at(format!("member `{want}` is no earlier stage (nor the base name of a sweep)")));
        }
        for t in matched {
            if !matches!(t.job, Job::Train { .. } | Job::Distill { .. } | Job::Evaluate { .. }) {
                return Err(at(format!("member `{}` neither trains nor evaluates a model", t.name)));
            }
            let source = ModelSource::Stage(t.name.clone());
            if members.contains(&source) {
                return Err(at(format!("member `{}` is listed twice", t.name)));
            }
            members.push(source);
        }
    }
    if members.len() < 2 {
        stage_bail!(text, s, "an ensemble needs `members = [...]` naming at least two models");
    }
    Ok(members)
}

fn resolve_clusters(text: &str, s: &RawStage, earlier: &[Stage], seed: u64, validation: usize) -> Result<Job> {
    let source = resolve_source(text, s, s.from.as_ref(), s.checkpoint.as_ref(), earlier)?;
    let Some(clusters) = s.clusters else {
        stage_bail!(text, s, "a clusters stage needs `clusters = K`, the number of k-means clusters");
    };
    if validation == 0 {
        stage_bail!(text, s, "subsets come from predictions on the validation split: set `data.validation` > 0");
    }
    let min_size = s.min_size.map_or(2, |c| c.0);
    if let Some(max) = s.max_size.filter(|m| m.0 < min_size) {
        stage_bail!(text, s, "max_size = {} is below min_size = {min_size}", max.0);
    }
    let kmeans = s.kmeans.unwrap_or(RawKMeans { iterations: None, batch_size: None });
    Ok(Job::Clusters {
        source,
        affinity: s.affinity.unwrap_or_default(),
        clusters: clusters.0,
        walk_steps: i64::from(s.walk_steps.unwrap_or(4)),
        repeats: s.repeats.map_or(1, |c| c.0),
        min_size,
        max_size: s.max_size.map(|c| c.0),
        count: s.count.map(|c| c.0),
        kmeans_iterations: kmeans.iterations.map_or(200, |c| c.0),
        kmeans_batch: kmeans.batch_size.map_or(256, |c| c.0),
        seed,
    })
}

/// The `clusters` stage a `specialists` stage takes its subsets from.
fn resolve_subsets(text: &str, s: &RawStage, earlier: &[Stage]) -> Result<String> {
    let Some(name) = &s.subsets else {
        stage_bail!(text, s, "a specialists stage needs `subsets = \"<clusters stage>\"`");
    };
    match earlier.iter().find(|t| &t.name == name.get_ref()) {
        Some(Stage { job: Job::Clusters { .. }, .. }) => Ok(name.get_ref().clone()),
        _ => bail!(
            "{}: stage `{}`: `subsets` must name an earlier clusters stage, got `{}`",
            line_of(text, name.span().start),
            s.name.get_ref(),
            name.get_ref()
        ),
    }
}

fn resolve_bias_shift(text: &str, s: &RawStage, earlier: &[Stage], validation: usize) -> Result<Job> {
    let source = resolve_source(text, s, s.from.as_ref(), s.checkpoint.as_ref(), earlier)?;
    let classes: Vec<i64> = s.classes.iter().flatten().map(|c| c.0).collect();
    if classes.is_empty() {
        stage_bail!(text, s, "a bias_shift stage needs `classes = [...]`, the classes whose biases move");
    }
    let Some(shifts) = &s.shifts else {
        stage_bail!(
            text,
            s,
            "a bias_shift stage needs `shifts = {{ min = ..., max = ..., step = ... }}`, the candidates"
        );
    };
    if !(shifts.min.is_finite() && shifts.max.is_finite() && shifts.min <= shifts.max) {
        stage_bail!(text, s, "shifts: expected finite min <= max, got min = {}, max = {}", shifts.min, shifts.max);
    }
    if validation == 0 {
        stage_bail!(text, s, "the shift is chosen on the validation split: set `data.validation` > 0");
    }
    if s.fixed_shift.is_some_and(|f| !f.is_finite()) {
        stage_bail!(text, s, "fixed_shift must be finite");
    }
    Ok(Job::BiasShift { source, classes, min: shifts.min, max: shifts.max, step: shifts.step.0, fixed: s.fixed_shift })
}

fn resolve_source(
    text: &str,
    s: &RawStage,
    stage: Option<&Spanned<String>>,
    file: Option<&PathBuf>,
    earlier: &[Stage],
) -> Result<ModelSource> {
    let (stage_key, file_key) =
        if s.kind == StageKind::Distill { ("teacher", "teacher_checkpoint") } else { ("from", "checkpoint") };
    match (stage, file) {
        (Some(_), Some(_)) => stage_bail!(text, s, "give either `{stage_key}` or `{file_key}`, not both"),
        (None, None) => stage_bail!(
            text,
            s,
            "the model is missing: `{stage_key} = \"<earlier stage>\"` or `{file_key} = \"<file>.safetensors\"`"
        ),
        (None, Some(path)) => Ok(ModelSource::Checkpoint(path.clone())),
        (Some(name), None) => match earlier.iter().find(|t| &t.name == name.get_ref()).map(|t| &t.job) {
            Some(Job::Train { .. } | Job::Distill { .. }) => Ok(ModelSource::Stage(name.get_ref().clone())),
            Some(Job::Ensemble { members }) if s.kind == StageKind::Distill => {
                Ok(ModelSource::Ensemble { stage: name.get_ref().clone(), members: members.clone() })
            }
            Some(Job::Ensemble { .. }) => bail!(
                "{}: stage `{}`: `{}` is an ensemble, which has no single output layer; name one of its members",
                line_of(text, name.span().start),
                s.name.get_ref(),
                name.get_ref()
            ),
            Some(Job::Evaluate { .. } | Job::BiasShift { .. } | Job::Clusters { .. } | Job::Specialists { .. }) => {
                bail!(
                    "{}: stage `{}`: `{}` makes no single model to read",
                    line_of(text, name.span().start),
                    s.name.get_ref(),
                    name.get_ref()
                )
            }
            None => bail!(
                "{}: stage `{}`: no earlier stage is named `{}` (stages defined before this one: {})",
                line_of(text, name.span().start),
                s.name.get_ref(),
                name.get_ref(),
                earlier.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ")
            ),
        },
    }
}

fn resolve_training(defaults: &RawTraining, stage: &RawTraining, seed: u64) -> Result<Training> {
    let epochs = stage.epochs.or(defaults.epochs).context("`epochs` is not set (in the stage or in [defaults])")?;
    let batch_size = stage.batch_size.or(defaults.batch_size).context("`batch_size` is not set")?;
    let o = stage.optimizer.as_ref().or(defaults.optimizer.as_ref()).context("`optimizer` is not set")?;
    let sgd_only = [
        ("momentum", o.momentum.is_some()),
        ("momentum_start", o.momentum_start.is_some()),
        ("momentum_ramp_epochs", o.momentum_ramp_epochs.is_some()),
        ("nesterov", o.nesterov.is_some()),
    ];
    let adam_only = [("beta1", o.beta1.is_some()), ("beta2", o.beta2.is_some()), ("eps", o.eps.is_some())];
    let wrong = match o.kind {
        OptimizerKind::Sgd => adam_only.iter().find(|(_, p)| *p),
        OptimizerKind::Adam => sgd_only.iter().find(|(_, p)| *p),
    };
    if let Some((k, _)) = wrong {
        bail!("optimizer key `{k}` does not apply to kind = {:?}", o.kind);
    }
    let momentum = o.momentum.map_or(0.0, |r| r.0);
    let optimizer = OptimizerSpec {
        kind: o.kind,
        lr: o.lr.0,
        momentum,
        momentum_start: o.momentum_start.map_or(momentum, |r| r.0),
        momentum_ramp_epochs: o.momentum_ramp_epochs.unwrap_or(0),
        nesterov: o.nesterov.unwrap_or(false),
        weight_decay: o.weight_decay.map_or(0.0, |w| w.0),
        beta1: o.beta1.map_or(0.9, |r| r.0),
        beta2: o.beta2.map_or(0.999, |r| r.0),
        eps: o.eps.map_or(1e-8, |p| p.0),
    };
    if optimizer.nesterov && optimizer.momentum == 0.0 {
        bail!("nesterov = true needs momentum > 0");
    }
    let schedule = match stage.schedule.as_ref().or(defaults.schedule.as_ref()) {
        None => ScheduleSpec { kind: ScheduleKind::Constant, gamma: 1.0, every: 1, min_lr: 0.0 },
        Some(s) => {
            let needs = match s.kind {
                ScheduleKind::Constant => vec![],
                ScheduleKind::Exponential => vec![("gamma", s.gamma.is_some())],
                ScheduleKind::Step => vec![("gamma", s.gamma.is_some()), ("every", s.every.is_some())],
                ScheduleKind::Cosine => vec![],
            };
            if let Some((k, _)) = needs.iter().find(|(_, p)| !*p) {
                bail!("schedule kind = {:?} needs `{k}`", s.kind);
            }
            ScheduleSpec {
                kind: s.kind,
                gamma: s.gamma.map_or(1.0, |g| g.0),
                every: s.every.map_or(1, |c| c.0),
                min_lr: s.min_lr.map_or(0.0, |m| m.0),
            }
        }
    };
    let jitter = stage.jitter.or(defaults.jitter).unwrap_or(0);
    let train_fraction = stage.train_fraction.or(defaults.train_fraction).map_or(1.0, |s| s.0);
    let patience = stage.early_stopping.or(defaults.early_stopping).map(|e| e.patience.0);
    Ok(Training {
        epochs: epochs.0,
        batch_size: batch_size.0,
        jitter,
        seed,
        optimizer,
        schedule,
        train_fraction,
        patience,
    })
}

fn is_one(v: &f64) -> bool {
    *v == 1.0
}

/// A stage's seed from the experiment's seed and the stage's name (FNV-1a), so that reordering
/// or adding stages does not change the others.
fn derive_seed(base: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325 ^ base;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h % (1 << 31)
}

impl Training {
    /// Learning rate of `epoch` (0-based): a pure function of the schedule.
    pub fn lr(&self, epoch: i64) -> f64 {
        let (lr, s) = (self.optimizer.lr, &self.schedule);
        match s.kind {
            ScheduleKind::Constant => lr,
            ScheduleKind::Exponential => lr * s.gamma.powi(epoch as i32),
            ScheduleKind::Step => lr * s.gamma.powi((epoch / s.every) as i32),
            ScheduleKind::Cosine => {
                let progress = epoch as f64 / self.epochs.max(1) as f64;
                s.min_lr + (lr - s.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }

    /// SGD momentum of `epoch`: rises linearly from `momentum_start` to `momentum` over
    /// `momentum_ramp_epochs`, then stays.
    pub fn momentum(&self, epoch: i64) -> f64 {
        let o = &self.optimizer;
        if o.momentum_ramp_epochs == 0 {
            return o.momentum;
        }
        let f = (epoch as f64 / f64::from(o.momentum_ramp_epochs)).min(1.0);
        o.momentum_start + (o.momentum - o.momentum_start) * f
    }
}

impl Experiment {
    /// The resolved configuration as TOML, as written to the run's `config.toml`.
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string(self)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
seed = 3
[data]
dir = "data/mnist"
validation = 100
[defaults]
epochs = 2
batch_size = 10
optimizer = { kind = "sgd", lr = 0.1, momentum = 0.9, momentum_start = 0.5, momentum_ramp_epochs = 4 }
schedule = { kind = "exponential", gamma = 0.5 }

[[stages]]
name = "teacher"
kind = "train"
model = { hidden = [8, 8], input_dropout = 0.2, hidden_dropout = 0.5, max_norm = 3.5 }
jitter = 2

[[stages]]
name = "student"
kind = "distill"
teacher = "teacher"
model = { hidden = [4] }
temperature = 20
epochs = 5
"#;

    fn parse(text: &str) -> Result<Experiment> {
        parse_with(text, &[])
    }

    fn parse_with(text: &str, overrides: &[&str]) -> Result<Experiment> {
        let dir = std::env::temp_dir().join(format!("kd-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("{call}.toml"));
        std::fs::write(&path, text)?;
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        let out = load(&path, &overrides);
        let _ = std::fs::remove_file(&path);
        out
    }

    #[test]
    fn a_syntax_error_on_a_long_line_quotes_a_clipped_excerpt() {
        let bombs = [
            format!("{GOOD}x = {}{}\n", "[".repeat(100_000), "]".repeat(100_000)),
            format!("{GOOD}x = \"{}\n", "A".repeat(200_000)),
        ];
        for text in bombs {
            let line = text.lines().count();
            let msg = format!("{:#}", parse(&text).expect_err("not TOML"));
            assert!(msg.len() < 1200, "{} bytes: {}", msg.len(), &msg[..1200.min(msg.len())]);
            assert!(msg.contains(&format!("TOML parse error at line {line}, column")), "{msg}");
            assert!(msg.contains("..."), "the cut is marked: {msg}");
        }
        // A short line is quoted whole, with the caret under the column.
        let msg = format!("{:#}", parse(&format!("{GOOD}x = ?\n")).expect_err("not TOML"));
        assert!(msg.contains("| x = ?\n") && msg.contains("|     ^\n"), "{msg}");
    }

    #[test]
    fn resolves_defaults_and_stage_settings() {
        let e = parse(GOOD).unwrap();
        assert_eq!(e.device, "auto");
        let Job::Train { model, training } = &e.stages[0].job else { panic!("train stage") };
        assert_eq!(model.hidden, [8, 8]);
        assert_eq!((training.epochs, training.jitter, model.max_norm), (2, 2, Some(3.5)));
        let Job::Distill { training, distill, .. } = &e.stages[1].job else { panic!("distill stage") };
        assert_eq!(training.epochs, 5, "stage value overrides [defaults]");
        assert_eq!(training.jitter, 0, "transfer set without translations by default");
        assert_eq!(distill.teacher, ModelSource::Stage("teacher".into()));
        assert_eq!((distill.temperature, distill.hard_weight, distill.soft_weight), (20.0, 0.0, 1.0));
        let seed = |s: &Stage| match &s.job {
            Job::Train { training, .. } | Job::Distill { training, .. } => training.seed,
            _ => unreachable!(),
        };
        assert_ne!(seed(&e.stages[0]), seed(&e.stages[1]), "stages derive distinct seeds");
        // The resolved config serializes (it becomes the run's config.toml).
        assert!(e.to_toml().unwrap().contains("temperature = 20.0"));
    }

    #[test]
    fn sweeps_expand_into_named_stages() {
        let text = GOOD.replace("temperature = 20\n", "sweep = { temperature = [2.5, 8], hidden = [[4], [3, 3]] }\n");
        let e = parse(&text).unwrap();
        let names: Vec<&str> = e.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["teacher", "student-T2.5-h4", "student-T2.5-h3x3", "student-T8-h4", "student-T8-h3x3"]);
        let Job::Distill { model, distill, .. } = &e.stages[2].job else { panic!() };
        assert_eq!((model.hidden.as_slice(), distill.temperature), ([3, 3].as_slice(), 2.5));
    }

    #[test]
    fn sweeps_beyond_the_stage_limit_fail_before_expanding() {
        // 300 x 300 x 100 = 9 million stages from a file of a few kilobytes.
        let list = |n: usize, f: &dyn Fn(usize) -> String| (1..=n).map(f).collect::<Vec<_>>().join(", ");
        let sweep = format!(
            "sweep = {{ temperature = [{}], hidden = [{}], seed = [{}] }}\n",
            list(300, &|i| format!("{}", 1.0 + i as f64 / 8.0)),
            list(300, &|i| format!("[{i}]")),
            list(100, &|i| i.to_string())
        );
        let text = GOOD.replace("temperature = 20\n", &sweep);
        let err = format!("{:#}", parse(&text).unwrap_err());
        assert!(err.contains("300 x 300 x 100 = 9000000 stages") && err.contains("at most 10000"), "{err}");
        assert!(err.contains("stage `student`"), "{err}");
        // The limit counts every stage: 9,999 swept ones fit beside the teacher, 10,000 do not.
        let seeds = |n: usize| {
            GOOD.replace(
                "temperature = 20\n",
                &format!("temperature = 2\nsweep = {{ seed = [{}] }}\n", list(n, &|i| i.to_string())),
            )
        };
        assert_eq!(parse(&seeds(MAX_STAGES - 1)).unwrap().stages.len(), MAX_STAGES);
        let err = format!("{:#}", parse(&seeds(MAX_STAGES)).unwrap_err());
        assert!(err.contains("leave room for 9999"), "{err}");
    }

    #[test]
    fn ensembles_resolve_their_members_and_serve_as_teachers() {
        let text = GOOD.replace(
            "jitter = 2\n",
            "jitter = 2\nsweep = { seed = [1, 2, 3] }\n\n[[stages]]\nname = \"ens\"\nkind = \"ensemble\"\nmembers = [\"teacher\"]\n",
        );
        let text = text.replace("teacher = \"teacher\"", "teacher = \"ens\"");
        let e = parse(&text).unwrap();
        let members: Vec<ModelSource> =
            ["teacher-s1", "teacher-s2", "teacher-s3"].iter().map(|s| ModelSource::Stage(s.to_string())).collect();
        assert_eq!(e.stages[3].job, Job::Ensemble { members: members.clone() }, "a sweep's base name lists its stages");
        let Job::Distill { distill, .. } = &e.stages[4].job else { panic!() };
        assert_eq!(distill.teacher, ModelSource::ensemble("ens", &members));
        assert_eq!(distill.teacher.stages(), ["ens", "teacher-s1", "teacher-s2", "teacher-s3"]);
        assert!(e.to_toml().is_ok());

        let members_line = |m: &str| text.replace("members = [\"teacher\"]", m);
        for (bad, msg) in [
            (members_line("members = [\"teacher-s1\"]"), "at least two models"),
            (members_line("members = [\"nobody\", \"teacher\"]"), "member `nobody` is no earlier stage"),
            (members_line("members = [\"teacher\", \"teacher-s2\"]"), "member `teacher-s2` is listed twice"),
            (members_line("members = [\"teacher\"]\nepochs = 3"), "`epochs` does not apply to a ensemble stage"),
            (text.replace("temperature = 20\n", "objective = \"logits\"\n"), "logit matching needs one teacher"),
        ] {
            let err = format!("{:#}", parse(&bad).unwrap_err());
            assert!(err.contains(msg), "{msg}: {err}");
        }
        let evaluate = format!("{text}\n[[stages]]\nname = \"e\"\nkind = \"evaluate\"\nfrom = \"ens\"\n");
        assert!(format!("{:#}", parse(&evaluate).unwrap_err()).contains("`ens` is an ensemble"));

        // Evaluate stages stand for the models they evaluate (checkpoints of other runs, say).
        let evaluated = (1..=2)
            .map(|i| {
                format!(
                    "\n[[stages]]\nname = \"t{i}\"\nkind = \"evaluate\"\ncheckpoint = \"runs/r{i}/t.safetensors\"\n"
                )
            })
            .collect::<String>();
        let text = format!(
            "{GOOD}{evaluated}\n[[stages]]\nname = \"both\"\nkind = \"ensemble\"\nmembers = [\"t1\", \"t2\"]\n"
        );
        let e = parse(&text).unwrap();
        let members = vec![ModelSource::Stage("t1".into()), ModelSource::Stage("t2".into())];
        assert_eq!(e.stages.last().unwrap().job, Job::Ensemble { members });
        let nested = text.replace(
            "kind = \"evaluate\"\ncheckpoint = \"runs/r2/t.safetensors\"",
            "kind = \"ensemble\"\nmembers = [\"t1\", \"teacher\"]",
        );
        let err = format!("{:#}", parse(&nested).unwrap_err());
        assert!(err.contains("member `t2` neither trains nor evaluates a model"), "{err}");
    }

    #[test]
    fn clusters_and_specialists_resolve_with_defaults_and_check_their_references() {
        let stages = "\n[[stages]]\nname = \"groups\"\nkind = \"clusters\"\nfrom = \"teacher\"\nclusters = 4\n\n\
                      [[stages]]\nname = \"experts\"\nkind = \"specialists\"\nfrom = \"teacher\"\nsubsets = \"groups\"\n";
        let text = format!("{GOOD}{stages}");
        let e = parse(&text).unwrap();
        let Job::Clusters { affinity, clusters, repeats, min_size, max_size, count, .. } = &e.stages[2].job else {
            panic!("clusters stage")
        };
        assert_eq!(
            (*affinity, *clusters, *repeats, *min_size, *max_size, *count),
            (Affinity::Covariance, 4, 1, 2, None, None)
        );
        let Job::Specialists { training, top_n, combine_iterations, examples, .. } = &e.stages[3].job else {
            panic!("specialists stage")
        };
        assert_eq!((training.epochs, *top_n, *combine_iterations, *examples), (2, 1, 100, None), "[defaults] apply");
        assert_eq!(e.stages[3].job.reads(), ["teacher", "groups"]);
        assert!(e.to_toml().unwrap().contains("affinity = \"covariance\""));

        for (bad, msg) in [
            (text.replace("clusters = 4\n", ""), "needs `clusters = K`"),
            (
                text.replace("clusters = 4\n", "clusters = 4\nmin_size = 5\nmax_size = 3\n"),
                "max_size = 3 is below min_size = 5",
            ),
            (text.replace("subsets = \"groups\"", "subsets = \"teacher\""), "must name an earlier clusters stage"),
            (text.replace("subsets = \"groups\"\n", ""), "needs `subsets ="),
            (
                text.replace("subsets = \"groups\"", "subsets = \"groups\"\ntemperature = 2"),
                "`temperature` does not apply",
            ),
            (
                text.replace("clusters = 4\n", "clusters = 4\nepochs = 3\n"),
                "`epochs` does not apply to a clusters stage",
            ),
            (text.replace("clusters = 4\n", "clusters = 4\naffinity = \"cosine\"\n"), "unknown variant `cosine`"),
            (
                format!("{text}[[stages]]\nname = \"e\"\nkind = \"evaluate\"\nfrom = \"experts\"\n"),
                "makes no single model",
            ),
            (text.replace("validation = 100", "validation = 0"), "predictions on the validation split"),
        ] {
            let err = format!("{:#}", parse(&bad).unwrap_err());
            assert!(err.contains(msg), "{msg}: {err}");
        }
    }

    #[test]
    fn train_fraction_and_early_stopping_resolve_and_serialize_only_when_set() {
        let text =
            GOOD.replace("epochs = 5\n", "epochs = 5\ntrain_fraction = 0.03\nearly_stopping = { patience = 4 }\n");
        let e = parse(&text).unwrap();
        let Job::Train { training, .. } = &e.stages[0].job else { panic!() };
        assert_eq!((training.train_fraction, training.patience), (1.0, None));
        let Job::Distill { training, .. } = &e.stages[1].job else { panic!() };
        assert_eq!((training.train_fraction, training.patience), (0.03, Some(4)));
        let toml = e.to_toml().unwrap();
        assert_eq!(toml.matches("train_fraction = 0.03").count(), 1, "{toml}");
        assert_eq!(toml.matches("patience = 4").count(), 1);
        assert_eq!(toml.matches("train_fraction").count(), 1, "defaults are not written (old runs stay comparable)");
        for (bad, msg) in [
            (GOOD.replace("epochs = 5\n", "train_fraction = 0\n"), "expected a number in (0, 1]"),
            (GOOD.replace("epochs = 5\n", "train_fraction = 1.5\n"), "expected a number in (0, 1]"),
            (GOOD.replace("epochs = 5\n", "early_stopping = { patience = 0 }\n"), "expected an integer > 0"),
            (
                GOOD.replace("validation = 100", "validation = 0")
                    .replace("epochs = 5\n", "early_stopping = { patience = 2 }\n"),
                "early stopping watches the validation split",
            ),
        ] {
            let err = format!("{:#}", parse(&bad).unwrap_err());
            assert!(err.contains(msg), "{msg}: {err}");
        }
    }

    #[test]
    fn teacher_translations_are_read_and_written_only_when_set() {
        let spec = |e: &Experiment| match &e.stages[1].job {
            Job::Distill { distill, .. } => distill.clone(),
            _ => panic!("stage 1 distills"),
        };
        let e = parse(GOOD).unwrap();
        assert_eq!(spec(&e).translations, None);
        assert!(!e.to_toml().unwrap().contains("translations"));
        let e = parse(&GOOD.replace("temperature = 20\n", "temperature = 20\nteacher_translations = 2\n")).unwrap();
        assert_eq!(spec(&e).translations, Some(2));
        assert!(e.to_toml().unwrap().contains("translations = 2"));
        let e = parse(&GOOD.replace("temperature = 20\n", "temperature = 20\nteacher_translations = 0\n")).unwrap();
        assert_eq!(spec(&e).translations, None, "0 pixels: no translations");
    }

    #[test]
    fn precision_and_peak_are_read_and_written_only_when_set() {
        let e = parse(GOOD).unwrap();
        assert_eq!((e.precision, e.peak_tflops), (Precision::F32, None));
        assert!(!e.to_toml().unwrap().contains("precision"));
        let e = parse(&GOOD.replace("seed = 3\n", "seed = 3\nprecision = \"bf16\"\npeak_tflops = 790\n")).unwrap();
        assert_eq!((e.precision, e.peak_tflops), (Precision::Bf16, Some(790.0)));
        assert_eq!(e.precision.kind(), tch::Kind::BFloat16);
        assert!(e.to_toml().unwrap().contains("precision = \"bf16\""));
        let err = format!("{:#}", parse(&GOOD.replace("seed = 3\n", "seed = 3\nprecision = \"fp8\"\n")).unwrap_err());
        assert!(err.contains("unknown variant `fp8`"), "{err}");
    }

    #[test]
    fn files_data_resolves_and_rejects_settings_of_other_kinds() {
        let files = "[data]\nkind = \"files\"\ncontext = [3, 1]\nclasses = 50\n\
                     files.train = { features = \"a.scp\", labels = \"a.ark\" }\n\
                     files.validation = { features = \"b.npy\", labels = \"bl.npy\", lengths = \"bn.npy\" }\n\
                     files.test = { features = \"c.ark\", labels = \"c.ali\" }\n";
        let text = GOOD.replace("[data]\ndir = \"data/mnist\"\nvalidation = 100\n", files).replace("jitter = 2\n", "");
        let e = parse(&text).unwrap();
        let f = e.data.files.as_ref().unwrap();
        assert_eq!((f.left, f.right, f.classes), (3, 1, Some(50)));
        assert_eq!(f.validation.lengths.as_deref(), Some(Path::new("bn.npy")));
        assert!(e.to_toml().unwrap().contains("[data.files.train]"));
        for (bad, msg) in [
            (text.replace("classes = 50\n", "classes = 50\nvalidation = 10\n"), "the splits are the files"),
            (GOOD.replace("validation = 100\n", "validation = 100\nclasses = 10\n"), "need kind = \"files\""),
            (text.replace("files.train = { features = \"a.scp\", labels = \"a.ark\" }\n", ""), "missing field `train`"),
        ] {
            let err = format!("{:#}", parse(&bad).unwrap_err());
            assert!(err.contains(msg), "{msg}: {err}");
        }
    }

    #[test]
    fn bias_shift_and_transfer_filters_resolve() {
        let text = format!(
            "{}transfer_exclude = [3]\npaper = {{ test_errors = 206, class_errors = 133 }}\n\n[[stages]]\nname = \"shift\"\nkind = \"bias_shift\"\nfrom = \"student\"\nclasses = [3]\nshifts = {{ min = 0, max = 5, step = 0.5 }}\nfixed_shift = 3.5\n",
            GOOD
        );
        let e = parse(&text).unwrap();
        let Job::Distill { distill, .. } = &e.stages[1].job else { panic!() };
        assert_eq!((distill.transfer_exclude.as_slice(), distill.transfer_only.len()), ([3].as_slice(), 0));
        assert_eq!(e.stages[1].paper.as_ref().and_then(|p| p.class_errors), Some(133.0));
        let Job::BiasShift { source, classes, min, max, step, fixed } = &e.stages[2].job else { panic!() };
        assert_eq!(source, &ModelSource::Stage("student".into()));
        assert_eq!((classes.as_slice(), *min, *max, *step, *fixed), ([3].as_slice(), 0.0, 5.0, 0.5, Some(3.5)));
        let err = parse(&text.replace("validation = 100", "validation = 0")).unwrap_err().to_string();
        assert!(err.contains("chosen on the validation split"), "{err}");
        let err = parse(&text.replace("from = \"student\"", "from = \"shift\"")).unwrap_err().to_string();
        assert!(err.contains("no earlier stage is named `shift`"), "{err}");
    }

    #[test]
    fn speech_data_resolves_and_rejects_image_keys() {
        let speech = GOOD
            .replace(
                "dir = \"data/mnist\"\nvalidation = 100",
                "kind = \"speech\"\ncontext = [3, 1]\nspeech = { states = 120, noise = 0.3 }",
            )
            .replace("jitter = 2\n", "");
        let e = parse(&speech).unwrap();
        let s = e.data.speech.as_ref().expect("speech data");
        assert_eq!((s.left, s.right, s.corpus.states, s.corpus.noise), (3, 1, 120, 0.3));
        assert_eq!(s.corpus.phones, crate::data::speech::CorpusConfig::default().phones, "other keys keep defaults");
        let err = parse(&speech.replace("kind = \"speech\"", "kind = \"speech\"\ndir = \"x\"")).unwrap_err();
        assert!(err.to_string().contains("splits by speaker"), "{err}");
        let err = parse(&speech.replace("noise = 0.3", "noize = 0.3")).unwrap_err();
        assert!(err.to_string().contains("unknown field `noize`"), "{err}");
        let err = parse(&speech.replace("states = 120", "states = 2")).unwrap_err();
        assert!(err.to_string().contains("data.speech") && err.to_string().contains("states"), "{err}");
        let err = parse(&format!("{speech}jitter = 1\n")).unwrap_err();
        assert!(err.to_string().contains("not images"), "{err}");
        let err = parse(&GOOD.replace("dir = \"data/mnist\"\n", "")).unwrap_err();
        assert!(err.to_string().contains("`dir`"), "{err}");
    }

    #[test]
    fn schedules_are_pure_functions_of_the_epoch() {
        let e = parse(GOOD).unwrap();
        let Job::Train { training, .. } = &e.stages[0].job else { panic!() };
        assert_eq!([training.lr(0), training.lr(1), training.lr(3)], [0.1, 0.05, 0.0125]);
        assert_eq!([training.momentum(0), training.momentum(2), training.momentum(9)], [0.5, 0.7, 0.9]);
    }

    #[test]
    fn overrides_change_values_and_are_validated() {
        let e = parse_with(GOOD, &["seed=7", "stages.student.temperature=4", "defaults.epochs=1"]).unwrap();
        assert_eq!(e.seed, 7);
        let Job::Distill { distill, .. } = &e.stages[1].job else { panic!() };
        assert_eq!(distill.temperature, 4.0);
        let Job::Train { training, .. } = &e.stages[0].job else { panic!() };
        assert_eq!(training.epochs, 1);
        let err = parse_with(GOOD, &["stages.student.temperature=-1"]).unwrap_err().to_string();
        assert!(
            err.contains("after --set")
                && err.contains("expected a temperature in [0.01, 1e6]")
                && err.contains("got -1"),
            "{err}"
        );
        let err = parse_with(GOOD, &["stages.nobody.epochs=1"]).unwrap_err();
        assert!(format!("{err:#}").contains("no stage named `nobody`"), "{err:#}");
        // A value is exactly one TOML value: more TOML after it is an error, not silently dropped.
        for (bad, msg) in [
            ("seed=7\nname = \"other\"", "more TOML follows it (`name`)"),
            ("stages.student.temperature=4\n[data]\ndir = \"x\"", "more TOML follows it (`data`)"),
            ("name=run\n[data", "not several lines"),
        ] {
            let err = format!("{:#}", parse_with(GOOD, &[bad]).unwrap_err());
            assert!(err.contains(msg) && err.contains("--set"), "{bad:?}: {err}");
        }
        let e = parse_with(GOOD, &["seed=7 # a comment\n"]).unwrap();
        assert_eq!(e.seed, 7, "a comment or a trailing line break is still one value");
    }

    #[test]
    fn names_are_single_safe_path_components() {
        for bad in
            ["", ".", "..", "../x", "../../x", "/tmp/x", "a/b", "a\\b", ".hidden", "-x", "a b", "a\0b", "a\nb", "é"]
        {
            assert!(name_problem(bad).is_some(), "{bad:?} accepted");
            let quoted = toml::Value::String(bad.to_string()).to_string();
            let err = parse_with(GOOD, &[&format!("name={quoted}")]).unwrap_err().to_string();
            assert!(err.contains("name:") && err.contains("not a usable run name"), "{bad:?}: {err}");
            let stage = GOOD.replacen("name = \"student\"", &format!("name = {quoted}"), 1);
            let err = parse(&stage).unwrap_err().to_string();
            assert!(err.contains("not a usable stage name"), "{bad:?}: {err}");
        }
        assert!(name_problem(&"a".repeat(MAX_NAME_LEN + 1)).unwrap().contains("more than"));
        for good in ["smoke", "student-T2.5-h4-s1", "_x", "0.1", &"a".repeat(MAX_NAME_LEN)] {
            assert_eq!(name_problem(good), None, "{good:?}");
            assert_eq!(parse_with(GOOD, &[&format!("name={good:?}")]).unwrap().name, good);
        }
    }

    #[test]
    fn names_a_run_derives_from_stage_names_are_reserved() {
        let shift = "\n[[stages]]\nname = \"shift\"\nkind = \"bias_shift\"\nfrom = \"student\"\nclasses = [3]\n\
                     shifts = { min = 0, max = 5, step = 0.5 }\nfixed_shift = 3.5\n";
        let stage = |name: &str| format!("\n[[stages]]\nname = \"{name}\"\nkind = \"evaluate\"\nfrom = \"teacher\"\n");
        let experts = "\n[[stages]]\nname = \"groups\"\nkind = \"clusters\"\nfrom = \"teacher\"\nclusters = 4\n\n\
                       [[stages]]\nname = \"experts\"\nkind = \"specialists\"\nfrom = \"teacher\"\nsubsets = \"groups\"\n";
        // (the stages after GOOD's, the stage the error names, what it must say)
        let cases = [
            (format!("{}{shift}", stage("shift-fixed")), "shift", "`shift-fixed` is the name of the row"),
            (format!("{shift}{}", stage("shift-fixed")), "shift-fixed", "`shift-fixed` is the name of the row"),
            (stage("teacher-fixed"), "teacher-fixed", "rows named `<stage>-fixed` belong to `<stage>`"),
            (stage("teacher.resume"), "teacher.resume", "reserved for a stage's resume checkpoint"),
            (stage("x.best"), "x.best", "reserved for a stage's best checkpoint"),
            (format!("{experts}{}", stage("experts.1")), "experts.1", "names a specialist of the specialists stage"),
            (format!("{experts}{}", stage("experts.01")), "experts.01", "names a specialist"),
            (format!("{}{experts}", stage("experts.0")), "experts", "has the name of one of this specialists stage's"),
        ];
        for (stages, named, message) in cases {
            let text = format!("{GOOD}{stages}");
            let err = parse(&text).unwrap_err().to_string();
            let line = line_of(&text, text.find(&format!("name = \"{named}\"")).unwrap());
            assert!(
                err.contains(message) && err.contains(&format!(":{line}: stage `{named}`")),
                "{stages}: expected line {line} and {message:?} in:\n{err}"
            );
        }
        for fine in [stage("shift-fixed2"), stage("teacher.resumed"), format!("{experts}{}", stage("experts.x1"))] {
            parse(&format!("{GOOD}{fine}")).unwrap_or_else(|e| panic!("{fine}: {e:#}"));
        }
    }

    /// (edit of GOOD: from, to; text on the line the error must name; text the error must contain)
    #[test]
    fn bad_files_are_rejected_with_line_and_key() {
        let cases: &[(&str, &str, &str, &str)] = &[
            ("temperature = 20", "temperature = 0", "temperature", "expected a temperature in [0.01, 1e6]"),
            ("temperature = 20", "temperature = -2.5", "temperature", "expected a temperature in [0.01, 1e6]"),
            // Temperatures at which f32 loses the soft targets (T^2 overflows, z / T underflows,
            // or the targets are one-hot and the loss reads exactly 0).
            ("temperature = 20", "temperature = 1e30", "temperature", "got 1000000000000000000000000000000"),
            ("temperature = 20", "temperature = 1e-45", "temperature", "f32 rounding erases the soft targets"),
            ("temperature = 20", "temperature = 1e-6", "temperature", "got 0.000001"),
            ("temperature = 20", "sweep = { temperature = [2, 1e7] }", "sweep", "expected a temperature in"),
            ("temperature = 20", "temperature = \"hot\"", "temperature", "invalid type: string"),
            ("temperature = 20", "temprature = 20", "temprature", "unknown field `temprature`"),
            ("input_dropout = 0.2", "input_dropout = 1.0", "input_dropout", "expected a number in [0, 1)"),
            ("hidden = [4]", "hidden = []", "hidden = []", "non-empty list"),
            ("hidden = [4]", "hidden = [4, 0]", "hidden = [4, 0]", "expected an integer > 0, got 0"),
            ("temperature = 20", "temperature = 20\nhard_weight = -1", "hard_weight", "expected a number >= 0"),
            ("teacher = \"teacher\"", "teacher = \"techer\"", "techer", "no earlier stage is named `techer`"),
            (
                "name = \"student\"",
                "name = \"teacher\"",
                "name = \"teacher\"\nkind = \"distill",
                "two stages have this name",
            ),
            (
                "jitter = 2",
                "jitter = 2\ntemperature = 3",
                "name = \"teacher\"",
                "`temperature` does not apply to a train stage",
            ),
            (
                "teacher = \"teacher\"",
                "teacher = \"teacher\"\ntransfer_only = []",
                "name = \"student\"",
                "empty transfer set",
            ),
            (
                "teacher = \"teacher\"",
                "teacher = \"teacher\"\ntransfer_only = [7]\ntransfer_exclude = [3]",
                "name = \"student\"",
                "not both",
            ),
            (
                "teacher = \"teacher\"",
                "teacher = \"teacher\"\ntransfer_exclude = [-3]",
                "transfer_exclude",
                "a class id >= 0",
            ),
            ("temperature = 20\n", "", "name = \"student\"", "needs `temperature`"),
            (
                "temperature = 20",
                "temperature = 20\nteacher_translations = 2\njitter = 1",
                "name = \"student\"",
                "`teacher_translations` averages a cached teacher's outputs",
            ),
            (
                "temperature = 20",
                "temperature = 20\nteacher_translations = 2\nteacher_top_k = 3",
                "name = \"student\"",
                "either `teacher_translations` or `teacher_top_k`",
            ),
            ("seed = 3", "seed = 3\ndevice = \"gpu\"", "device", "device: expected"),
            ("lr = 0.1", "lr = 0.1, beta1 = 0.9", "name = \"teacher\"", "optimizer key `beta1` does not apply"),
            ("kind = \"train\"", "kind = \"fit\"", "kind = \"fit\"", "unknown variant `fit`"),
        ];
        for (from, to, marker, message) in cases {
            assert!(GOOD.contains(from), "bad test case: {from}");
            let text = GOOD.replacen(from, to, 1);
            let line = line_of(&text, text.find(marker).expect("marker in the edited file"));
            let err = parse(&text).unwrap_err().to_string();
            let at_line = format!(".toml:{line}:");
            assert!(
                err.contains(message) && (err.contains(&format!("line {line},")) || err.contains(&at_line)),
                "{to:?}: expected line {line} and {message:?} in:\n{err}"
            );
            assert!(err.contains(".toml"), "error names the file: {err}");
        }
    }

    #[test]
    fn every_shipped_experiment_file_loads() {
        // A typo in a shipped file would otherwise surface only when someone runs it.
        fn toml_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
            for entry in std::fs::read_dir(dir).expect("experiments/ is readable") {
                let path = entry.expect("directory entry").path();
                if path.is_dir() {
                    toml_files(&path, out);
                } else if path.extension().is_some_and(|e| e == "toml") {
                    out.push(path);
                }
            }
        }
        let mut files = Vec::new();
        toml_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments"), &mut files);
        assert!(files.len() >= 10, "found only {} experiment files", files.len());
        for file in &files {
            if let Err(e) = load(file, &[]) {
                panic!("{e:#}"); // names the file
            }
        }
    }
}
