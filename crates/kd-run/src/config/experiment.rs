//! The resolved experiment: every setting explicit, as a run records it in `config.toml`.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

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

/// The kind training computes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// 32-bit floats throughout.
    #[default]
    F32,
    /// bfloat16 matrix products with f32 master weights, losses and optimizer state.
    Bf16,
    /// f32 tensors whose matrix products and convolutions on a CUDA GPU run on TF32 tensor
    /// cores (10-bit mantissa inputs, f32 accumulation; PyTorch's
    /// `torch.backends.cuda.matmul.allow_tf32 = True`). On a CPU the same as `f32`.
    Tf32,
}

impl Precision {
    fn is_f32(&self) -> bool {
        *self == Precision::F32
    }

    /// The tensor kind of the matrix products.
    pub fn kind(self) -> tch::Kind {
        match self {
            Precision::F32 | Precision::Tf32 => tch::Kind::Float,
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
    /// Frame stores written by `kd-run store write` (`[data.store]`), streamed.
    Store,
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
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Experiment {
    /// Name; the run writes under `OUT/<name>/`.
    pub name: String,
    /// What the experiment reproduces (shown in reports).
    #[serde(default)]
    pub description: String,
    /// Base seed; each stage derives its own from it and its name unless it sets `seed`.
    #[serde(default)]
    pub seed: u64,
    /// `auto`, `cpu`, `cuda` or `cuda:N`, parsed once.
    pub device: crate::device::Choice,
    /// Intra-op threads of libtorch on CPU; 0 leaves libtorch's default.
    #[serde(default)]
    pub threads: i64,
    /// The kind forward and backward passes compute in; weights stay f32.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
    /// The device's peak TFLOP/s at `precision`, to log the share of it training reaches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_tflops: Option<f64>,
    /// Update each layer inside the backward pass as soon as its gradients exist, so that one
    /// layer's gradients are in memory at a time instead of the whole network's; the updates
    /// are the same.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optimizer_in_backward: bool,
    /// Capture the training step in a CUDA graph and replay it: one launch per step instead of
    /// one per kernel (CUDA only; elsewhere, or where capture is not possible, the steps run as
    /// they are, with a warning naming why).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cuda_graphs: bool,
    /// Checkpoints inside an epoch (`[checkpoint]`); none by default.
    #[serde(default, skip_serializing_if = "CheckpointSpec::is_default")]
    pub checkpoint: CheckpointSpec,
    /// The dataset.
    pub data: DataSpec,
    /// The stages, run in order.
    pub stages: Vec<Stage>,
}

/// When a training stage also saves its resume checkpoint inside an epoch (besides after each
/// epoch): every `every_steps` steps, and every `every_minutes` minutes (checked every 50
/// steps); 0 turns either off. The last `keep` checkpoints are kept
/// (`<stage>.resume.safetensors`, then `.resume.1`, ...); a damaged newest one falls back to
/// the one before. Resuming from any gives the weights of the uninterrupted run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    /// Steps between checkpoints (0: none by count).
    #[serde(default)]
    pub every_steps: u64,
    /// Minutes between checkpoints (0: none by time).
    #[serde(default)]
    pub every_minutes: f64,
    /// Checkpoints kept.
    #[serde(default = "CheckpointSpec::default_keep")]
    pub keep: usize,
}

impl CheckpointSpec {
    fn default_keep() -> usize {
        2
    }

    /// No checkpoint inside epochs, two kept.
    pub fn is_default(&self) -> bool {
        *self == CheckpointSpec::default()
    }
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        CheckpointSpec { every_steps: 0, every_minutes: 0.0, keep: CheckpointSpec::default_keep() }
    }
}

/// Where the data comes from and how it is split.
///
/// Recorded in `config.toml` as it always was (`dir`, `speech` or `files` beside the split
/// settings), through [`DataRecord`]; reading a record that names no source, or two, fails.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(into = "DataRecord", try_from = "DataRecord")]
pub struct DataSpec {
    /// Where the examples come from.
    pub source: DataSource,
    /// The last `validation` training examples are held out as the validation split.
    pub validation: usize,
    /// Use only the first N training examples (before the validation split is carved), if set.
    pub train_limit: Option<i64>,
    /// Use only the first N test examples, if set.
    pub test_limit: Option<i64>,
}

/// The dataset a run reads.
#[derive(Clone, Debug, PartialEq)]
pub enum DataSource {
    /// The four MNIST IDX files in a folder.
    Mnist {
        /// The folder.
        dir: PathBuf,
    },
    /// The synthetic speech corpus.
    Speech(SpeechSpec),
    /// A user's own frames (Kaldi archives or .npy).
    Files(FilesSpec),
    /// Frame stores on disk, the training split streamed.
    Store(StoreSpec),
}

/// [`DataSpec`] as `config.toml` records it.
#[derive(Serialize, Deserialize)]
pub struct DataRecord {
    #[serde(default)]
    dir: Option<PathBuf>,
    #[serde(default)]
    speech: Option<SpeechSpec>,
    #[serde(default)]
    validation: usize,
    #[serde(default)]
    train_limit: Option<i64>,
    #[serde(default)]
    test_limit: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    files: Option<FilesSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    store: Option<StoreSpec>,
}

impl From<DataSpec> for DataRecord {
    fn from(d: DataSpec) -> Self {
        let (mut dir, mut speech, mut files, mut store) = (None, None, None, None);
        match d.source {
            DataSource::Mnist { dir: path } => dir = Some(path),
            DataSource::Speech(s) => speech = Some(s),
            DataSource::Files(f) => files = Some(f),
            DataSource::Store(s) => store = Some(s),
        }
        DataRecord {
            dir,
            speech,
            validation: d.validation,
            train_limit: d.train_limit,
            test_limit: d.test_limit,
            files,
            store,
        }
    }
}

impl TryFrom<DataRecord> for DataSpec {
    type Error = String;

    fn try_from(r: DataRecord) -> std::result::Result<Self, String> {
        let source = match (r.dir, r.speech, r.files, r.store) {
            (Some(dir), None, None, None) => DataSource::Mnist { dir },
            (None, Some(s), None, None) => DataSource::Speech(s),
            (None, None, Some(f), None) => DataSource::Files(f),
            (None, None, None, Some(s)) => DataSource::Store(s),
            _ => return Err("expected exactly one of `dir`, `speech`, `files` and `store`".into()),
        };
        Ok(DataSpec { source, validation: r.validation, train_limit: r.train_limit, test_limit: r.test_limit })
    }
}

/// Frames and labels read from files, in context windows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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

/// Frame stores (`DIR/train`, `DIR/validation`, `DIR/test`, written by `kd-run store write`),
/// the training split streamed through a shuffle buffer (docs/frame-store.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSpec {
    /// The folder of the three stores.
    pub dir: PathBuf,
    /// Frames of left context.
    pub left: i64,
    /// Frames of right context.
    pub right: i64,
    /// Frames in the shuffle buffer.
    pub shuffle_buffer: usize,
    /// Utterances enter the shuffle as chunks of about this many frames, in a random order.
    #[serde(default = "default_chunk_frames")]
    pub chunk_frames: usize,
    /// Batches the producer thread keeps ready.
    pub prefetch: usize,
    /// Share of each epoch's stream a stage trains on (1: all of it).
    pub epoch_fraction: f64,
    /// Read at most this many frames (whole utterances) of the validation and test stores into
    /// memory, and of the training store for `train_accuracy` (default: 200,000 of the training
    /// store, all of the others).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_frames: Option<u64>,
    /// A teacher's top-k targets beside the training store (`DIR/train/<targets>`, written by
    /// `kd-run store targets`), streamed with the batches to distill stages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<String>,
}

fn default_chunk_frames() -> usize {
    8
}

/// The frames of context `[left, right]` around each frame of speech data when `data.context` is
/// not set: 20 before and 5 after, 26 frames in all, as the paper's acoustic model sees them.
pub const DEFAULT_CONTEXT: [u32; 2] = [20, 5];

/// The synthetic speech corpus and the context window of each frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpeechSpec {
    /// Frames of left context (the paper: 20).
    pub left: i64,
    /// Frames of right context (the paper: 5).
    pub right: i64,
    /// The generator's settings.
    pub corpus: super::speech::CorpusConfig,
}

/// One named stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    /// Unique name; checkpoints and CSV rows carry it.
    pub name: String,
    /// The paper's figures for this stage's model, if it reports any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paper: Option<PaperFigures>,
    /// The values a sweep gave this stage, if a sweep made it (runs recorded before this field
    /// existed lack it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep: Option<SweepPoint>,
    /// What it does.
    #[serde(flatten)]
    pub job: Job,
}

/// The point of a sweep a stage is: the stage the file names and the values swept (only those
/// the sweep varies), which the stage's name also carries (`<base>-T<t>-h<widths>-s<seed>`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepPoint {
    /// The name of the stage in the experiment file.
    pub base: String,
    /// The swept temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// The swept hidden widths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden: Option<Vec<i64>>,
    /// The swept seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// A stage's job and its settings: one struct per stage kind, the unit the code passes around.
/// In `config.toml` the kind is the `kind` key beside the struct's fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Job {
    /// Train on hard labels.
    Train(TrainJob),
    /// Distill from a teacher.
    Distill(DistillJob),
    /// Evaluate a model on the test set.
    Evaluate(EvaluateJob),
    /// Shift some classes' output biases.
    BiasShift(BiasShiftJob),
    /// Evaluate the mean of several models' probabilities.
    Ensemble(EnsembleJob),
    /// Class subsets from a generalist's predictions.
    Clusters(ClustersJob),
    /// Specialists for a `clusters` stage's subsets, combined with the generalist.
    Specialists(SpecialistsJob),
}

/// Train on hard labels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainJob {
    /// Architecture.
    pub model: ModelSpec,
    /// Loop settings.
    pub training: Training,
}

/// Distill from a teacher.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DistillJob {
    /// Student architecture.
    pub model: ModelSpec,
    /// Loop settings.
    pub training: Training,
    /// Loss settings and the teacher.
    pub distill: DistillSpec,
}

/// Evaluate a model on the test set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvaluateJob {
    /// The model.
    pub source: ModelSource,
}

/// Shift the output biases of `classes` by the candidate with the fewest validation errors
/// (ties go to the smallest shift in magnitude), and by `fixed` if given.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BiasShiftJob {
    /// The model.
    pub source: ModelSource,
    /// Classes whose biases move together.
    pub classes: Vec<i64>,
    /// Candidates `min, min + step, ..., max`.
    pub min: f64,
    /// Last candidate.
    pub max: f64,
    /// Candidate spacing.
    pub step: f64,
    /// A fixed shift reported as well (the paper's value, say).
    pub fixed: Option<f64>,
}

/// Evaluate the mean of several models' probabilities; a distill stage can name it as its
/// teacher.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EnsembleJob {
    /// The members (earlier stages of this run).
    pub members: Vec<ModelSource>,
}

/// Class subsets from a generalist's predictions over the validation split: k-means of
/// the columns of `affinity`, repeated with `repeats` seeds (and other numbers of clusters)
/// for overlapping subsets, subsets outside `[min_size, max_size]` dropped, then the most
/// confusable kept (`count` of them, none overlapping a kept one by more than `max_overlap`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClustersJob {
    /// The generalist.
    pub source: ModelSource,
    /// The similarity matrix clustered.
    pub affinity: Affinity,
    /// k of k-means.
    pub clusters: i64,
    /// k-means clusters the rows of `kd_specialists::class_profiles(affinity, walk_steps)`;
    /// 0 clusters the affinity's columns themselves (the paper's literal recipe).
    pub walk_steps: i64,
    /// k-means runs (seeds `seed`, `seed + 1`, ...); more than one gives overlapping subsets.
    pub repeats: i64,
    /// More k-means runs (`repeats` each) with these numbers of clusters: subsets of other
    /// sizes, which overlap those of `clusters` without repeating them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_clusters: Vec<i64>,
    /// Drop a subset whose overlap `|A ∩ B| / |A ∪ B|` with a subset kept before it (in the
    /// order of `count`) exceeds this; `None` keeps near-duplicates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_overlap: Option<f64>,
    /// Smallest subset kept.
    pub min_size: i64,
    /// Largest subset kept.
    pub max_size: Option<i64>,
    /// Keep at most this many subsets: those whose classes hold the largest share of the
    /// generalist's confusion among themselves.
    pub count: Option<i64>,
    /// k-means updates.
    pub kmeans_iterations: i64,
    /// Points per k-means update.
    pub kmeans_batch: i64,
    /// Seed of k-means.
    pub seed: u64,
}

/// One specialist per subset of a `clusters` stage, each a copy of the generalist with a
/// head over the subset plus a dustbin class, trained on samples half from the subset and
/// half from the rest; then the combination of eq. 5 evaluated against the generalist.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpecialistsJob {
    /// The generalist.
    pub source: ModelSource,
    /// The `clusters` stage whose subsets get specialists.
    pub subsets: String,
    /// Loop settings of every specialist (its seed is this seed plus its index).
    pub training: Training,
    /// Examples drawn per epoch (half inside the subset); default twice the subset's
    /// training examples.
    pub examples: Option<i64>,
    /// Specialists are consulted for the generalist's `top_n` most probable classes.
    pub top_n: i64,
    /// Gradient steps of the eq. 5 solver.
    pub combine_iterations: i64,
}

/// Hidden widths and regularization; input and output sizes come from the data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Training {
    /// Passes over the training (or transfer) set.
    pub epochs: i64,
    /// Examples per step; the last batch of an epoch may be smaller.
    pub batch_size: i64,
    /// Random translations of up to this many pixels in each direction (0 = none).
    pub jitter: u32,
    /// The share of the training split (or transfer set) the stage trains on: a random subset,
    /// the same for every stage of the run with the same share.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub train_fraction: f64,
    /// Stop after this many epochs without fewer validation errors, and keep the best epoch's
    /// weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patience: Option<i64>,
    /// Seed of initialization, shuffling, dropout and jitter.
    pub seed: u64,
    /// Optimizer.
    pub optimizer: OptimizerSpec,
    /// Learning-rate schedule.
    pub schedule: ScheduleSpec,
}

/// Optimizer settings (fields that do not apply to the kind keep their defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i64>,
    /// Soft targets averaged over translations of up to this many pixels: each transfer
    /// image's target is the mean of the teacher's softmax(z / T) over all its
    /// `(2 n + 1)^2` zero-filled translations, while the student sees the image untranslated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub translations: Option<i64>,
}

/// Where a model comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
    /// A checkpoint file whose SHA-256 the experiment pins (the stage's `sha256` key): read only
    /// if its bytes have that hash.
    PinnedCheckpoint {
        /// The file.
        path: PathBuf,
        /// Lower-case hex SHA-256 of its bytes.
        sha256: String,
    },
}

impl Job {
    /// The name this kind of stage has in experiment files (and summary rows).
    pub fn kind_name(&self) -> &'static str {
        match self {
            Job::Train(_) => "train",
            Job::Distill(_) => "distill",
            Job::Evaluate(_) => "evaluate",
            Job::BiasShift(_) => "bias_shift",
            Job::Ensemble(_) => "ensemble",
            Job::Clusters(_) => "clusters",
            Job::Specialists(_) => "specialists",
        }
    }

    /// The stages of this run whose models the job reads.
    pub fn reads(&self) -> Vec<&str> {
        match self {
            Job::Train(_) => vec![],
            Job::Distill(DistillJob { distill, .. }) => distill.teacher.stages(),
            Job::Evaluate(EvaluateJob { source }) | Job::BiasShift(BiasShiftJob { source, .. }) => source.stages(),
            Job::Ensemble(EnsembleJob { members }) => members.iter().flat_map(ModelSource::stages).collect(),
            Job::Clusters(ClustersJob { source, .. }) => source.stages(),
            Job::Specialists(SpecialistsJob { source, subsets, .. }) => {
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
            ModelSource::Checkpoint(_) | ModelSource::PinnedCheckpoint { .. } => vec![],
            ModelSource::Ensemble { stage, members } => {
                std::iter::once(stage.as_str()).chain(members.iter().flat_map(ModelSource::stages)).collect()
            }
        }
    }
}

pub(crate) fn is_one(v: &f64) -> bool {
    *v == 1.0
}

fn one() -> f64 {
    1.0
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
