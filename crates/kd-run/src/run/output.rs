//! Files a run writes: atomic writes, checkpoints, and the CSV tables.

use crate::run::provenance::Checked;
use anyhow::{anyhow, bail, Context, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Writes `bytes` to a temporary file beside `path`, syncs it, then renames it over `path`, so
/// a reader (or a run killed half-way) sees either the old file or the new one, never a mix.
/// Only the writing rank of a data-parallel run writes (the others return at once).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if !crate::dist::world().is_writer() {
        return Ok(());
    }
    let tmp = tmp_path(path);
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    let result = write()
        .with_context(|| format!("cannot write {}", tmp.display()))
        .map(|()| fault_point())
        .and_then(|()| rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Fault injection for the tests of kill-and-resume (not a user setting, so not documented
/// for users): with `KD_FAULT_AFTER_WRITES=N` in the environment, the process aborts at its Nth
/// atomic write ([`write_atomic`], [`save_tensors`]), once the temporary file is written and
/// before it is renamed over the real one: as if killed between its (N-1)th and Nth commit,
/// with a stale temporary file left behind. `crates/kd-run/tests/smoke.rs` kills a run at every
/// commit point in turn this way and checks that each resumes to the uninterrupted run's tables.
fn fault_point() {
    use std::sync::atomic::{AtomicU64, Ordering};
    static AFTER: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let after = *AFTER.get_or_init(|| std::env::var("KD_FAULT_AFTER_WRITES").ok().and_then(|v| v.parse().ok()));
    if let Some(n) = after {
        if WRITES.fetch_add(1, Ordering::SeqCst) + 1 == n {
            std::process::abort();
        }
    }
}

fn rename(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::rename(tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.tmp", std::process::id()));
    path.with_file_name(name)
}

/// Whether `name` is that of a temporary file [`write_atomic`] or [`save_tensors`] writes
/// (`<file>.<pid>.tmp`): left behind only by a process killed while writing.
pub fn is_tmp(name: &str) -> bool {
    name.strip_suffix(".tmp")
        .and_then(|rest| rest.rsplit_once('.'))
        .is_some_and(|(file, pid)| !file.is_empty() && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// Saves named tensors as safetensors, atomically (only on the writing rank of a data-parallel
/// run, like [`write_atomic`]).
pub fn save_tensors(path: &Path, named: &[(String, Tensor)]) -> Result<()> {
    if !crate::dist::world().is_writer() {
        return Ok(());
    }
    let tmp = tmp_path(path);
    // safetensors wants contiguous CPU tensors.
    let cpu: Vec<(String, Tensor)> =
        named.iter().map(|(k, t)| (k.clone(), t.detach().to_device(tch::Device::Cpu).contiguous())).collect();
    let result = Tensor::write_safetensors(&cpu, &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))
        .and_then(|()| {
            let synced = std::fs::File::open(&tmp).and_then(|f| f.sync_all());
            synced.with_context(|| format!("cannot sync {}", tmp.display()))
        })
        .map(|()| fault_point())
        .and_then(|()| rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Loads a safetensors file on the CPU, after checking it against its provenance record if it
/// has one (`provenance::verify`).
pub fn load_tensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    load_checked(path, None).map(|(named, _)| named)
}

/// Loads a checkpoint file an experiment names (not one of the run's own), checked against the
/// SHA-256 the stage pins (`pin`) and its provenance record (`provenance::verify`); one that has
/// neither is loaded with a warning that gives its SHA-256 to pin.
pub fn load_checkpoint(path: &Path, pin: Option<&str>) -> Result<Vec<(String, Tensor)>> {
    let (named, checked) = load_checked(path, pin)?;
    // Once per file and process: a run loads a teacher's file for several stages.
    static WARNED: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());
    let first = |path: &Path| {
        let mut warned = WARNED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let new = !warned.iter().any(|p| p == path);
        if new {
            warned.push(path.to_path_buf());
        }
        new
    };
    match checked {
        Checked::Unchecked { sha256 } if first(path) => {
            tracing::warn!(
                "{} has no provenance file and its stage pins no SHA-256, so its bytes are not checked; to pin them, \
                 add `sha256 = \"{sha256}\"` to the stage",
                path.display()
            );
        }
        _ => {}
    }
    Ok(named)
}

fn load_checked(path: &Path, pin: Option<&str>) -> Result<(Vec<(String, Tensor)>, Checked)> {
    crate::inputs::check_file(path, "checkpoint")?;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read checkpoint {}", path.display()))?;
    let checked = crate::run::provenance::verify(path, &bytes, pin)?;
    match &checked {
        Checked::Record(made, record) => tracing::info!(
            "{}: SHA-256 checked against {}; stage `{}` of `{}` at commit {}, {} test errors of {}",
            path.display(),
            record.display(),
            made.stage,
            made.command,
            made.commit,
            made.test_errors,
            made.test_examples
        ),
        Checked::Pinned => tracing::info!("{}: SHA-256 checked against the stage's `sha256`", path.display()),
        Checked::Unchecked { .. } => {}
    }
    let named = parse_tensors(&bytes)
        .with_context(|| format!("checkpoint {} is not a readable safetensors file", path.display()))?;
    Ok((named, checked))
}

/// The named tensors of the bytes of a safetensors file, on the CPU. The header's shapes and
/// offsets are checked against the bytes present before any tensor is allocated.
pub fn parse_tensors(bytes: &[u8]) -> Result<Vec<(String, Tensor)>> {
    use crate::inputs::{clip, MAX_ECHO};
    if bytes.is_empty() {
        bail!("the file is empty");
    }
    let file =
        safetensors::SafeTensors::deserialize(bytes).map_err(|e| anyhow!(describe_safetensors_error(e, bytes)))?;
    let mut out = Vec::new();
    for (name, view) in file.tensors() {
        let shown = clip(&name, MAX_ECHO);
        let kind = tch::Kind::try_from(view.dtype())
            .map_err(|_| anyhow!("tensor `{shown}` has the unsupported dtype {:?}", view.dtype()))?;
        let shape: Vec<i64> = view
            .shape()
            .iter()
            .map(|&d| i64::try_from(d))
            .collect::<Result<_, _>>()
            .map_err(|_| anyhow!("tensor `{shown}`: a dimension of its shape does not fit in i64"))?;
        let tensor =
            Tensor::f_from_data_size(view.data(), &shape, kind).with_context(|| format!("tensor `{shown}`"))?;
        out.push((name, tensor));
    }
    Ok(out)
}

/// What a safetensors parse error means, in words.
fn describe_safetensors_error(e: safetensors::SafeTensorError, bytes: &[u8]) -> String {
    use safetensors::SafeTensorError as E;
    let header_len = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
    match e {
        E::HeaderTooSmall => {
            format!("{} bytes: too short for the 8-byte header length that starts a safetensors file", bytes.len())
        }
        E::HeaderTooLarge | E::InvalidHeaderLength => format!(
            "the first 8 bytes give a header of {} bytes, but the file has {} (not a safetensors file, or truncated)",
            header_len.unwrap_or_default(),
            bytes.len()
        ),
        E::InvalidHeader => "the header is not UTF-8 text".to_string(),
        E::InvalidHeaderStart => "the header does not start with '{' (not a safetensors file?)".to_string(),
        E::InvalidHeaderDeserialization => "the header is not the JSON of a safetensors file".to_string(),
        E::InvalidOffset(name) => {
            format!(
                "the data offsets of tensor `{}` do not follow the previous tensor's",
                crate::inputs::clip(&name, 200)
            )
        }
        E::TensorInvalidInfo => "a tensor's data offsets do not match its shape and dtype".to_string(),
        E::MetadataIncompleteBuffer => {
            "the tensors' data does not end where the file does (truncated, or bytes appended)".to_string()
        }
        E::ValidationOverflow => "a tensor's shape is too large: its size overflows".to_string(),
        e => format!("{e:?}"),
    }
}

/// Fails unless every floating-point tensor of `named`, read from `path`, is finite: a NaN or
/// infinite weight makes every output it touches NaN, so such a checkpoint is refused when it is
/// loaded rather than reported on. The error names the file and the first bad tensor.
pub fn check_finite(path: &Path, named: &[(String, Tensor)]) -> Result<()> {
    for (name, t) in named.iter().filter(|(_, t)| t.is_floating_point()) {
        let bad = i64::try_from(t.isfinite().logical_not().sum(tch::Kind::Int64))?;
        if bad > 0 {
            anyhow::bail!(
                "{}: `{name}` holds {bad} NaN or infinite value{} (of {}): the checkpoint is unusable; was it saved \
                 by a run that diverged?",
                path.display(),
                if bad == 1 { "" } else { "s" },
                t.numel()
            );
        }
    }
    Ok(())
}

/// One row of `metrics.csv`: a stage's epoch.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MetricsRow {
    /// Stage name.
    pub stage: String,
    /// 1-based epoch.
    pub epoch: i64,
    /// Learning rate of the epoch.
    pub lr: f64,
    /// Mean training objective over the epoch (as optimized: dropout on, distillation terms).
    pub train_loss: f64,
    /// Distill stages with soft targets: the mean over the epoch of the soft term's KL form,
    /// `T^2 KL(p || q)` (the soft cross-entropy less the teacher's entropy, unweighted), which
    /// falls as the student converges where `train_loss` barely moves (empty for other stages
    /// and in files written before it was recorded).
    #[serde(default)]
    pub soft_kl: Option<f64>,
    /// Accuracy of the training-mode predictions during the epoch.
    pub train_accuracy: f64,
    /// Hard-label cross-entropy on the validation split, if there is one.
    pub val_loss: Option<f64>,
    /// Accuracy on the validation split.
    pub val_accuracy: Option<f64>,
    /// Test errors, on the epochs where the test set was evaluated (the last).
    pub test_errors: Option<i64>,
    /// Wall seconds of the epoch, evaluation included.
    pub seconds: f64,
    /// Training examples per second over the epoch's steps (evaluation excluded).
    #[serde(default)]
    pub examples_per_second: Option<f64>,
    /// Floating-point operations per second of the steps, in TFLOP/s: 6 multiply-add-halves per
    /// weight and example for the student (forward and backward), 2 for a live teacher.
    #[serde(default)]
    pub tflops: Option<f64>,
    /// Where the epoch ran, as in `summary.csv` (empty in files written before it was recorded;
    /// a resumed stage can run its epochs on more than one device).
    #[serde(default)]
    pub device: String,
}

/// The variant of a bias_shift stage's model with its `fixed_shift`.
pub const FIXED: &str = "fixed";

/// A row's name in reports and logs: the stage's, or `<stage>-<variant>`.
pub fn row_label(stage: &str, variant: &str) -> String {
    if variant.is_empty() {
        stage.to_string()
    } else {
        format!("{stage}-{variant}")
    }
}

/// Reads the variants of rows written before the `variant` column existed, which named a
/// bias_shift stage's fixed-shift row `<stage>-fixed`: such a row, when `<stage>` is one of
/// `stages` and `<stage>-fixed` is not, becomes `<stage>` with variant [`FIXED`]. Each item is
/// a row's (stage, variant).
pub fn read_variants_from_names<'a>(rows: impl Iterator<Item = (&'a mut String, &'a mut String)>, stages: &[String]) {
    for (stage, variant) in rows {
        if !variant.is_empty() || stages.contains(stage) {
            continue;
        }
        if let Some(base) = stage.strip_suffix("-fixed").filter(|b| stages.iter().any(|s| s == b)) {
            *stage = base.to_string();
            *variant = FIXED.to_string();
        }
    }
}

/// One row of `summary.csv`: a trained or evaluated model.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SummaryRow {
    /// Stage name.
    pub stage: String,
    /// Which of the stage's models the row is: empty for the stage's own, [`FIXED`] for a
    /// bias_shift stage's model with its fixed shift (files written before this column named
    /// that row `<stage>-fixed`; see [`read_variants_from_names`]).
    #[serde(default)]
    pub variant: String,
    /// Stage kind (train, distill, evaluate).
    pub kind: String,
    /// Architecture, e.g. `mlp 784-800-800-10`.
    pub model: String,
    /// Trainable parameters.
    pub parameters: i64,
    /// Errors on the validation split, if there is one.
    pub val_errors: Option<i64>,
    /// Errors on the test set.
    pub test_errors: i64,
    /// Test accuracy.
    pub test_accuracy: f64,
    /// The bias shift applied (bias_shift stages).
    pub shift: Option<f64>,
    /// Wall seconds of the stage.
    pub seconds: f64,
    /// Where the stage ran: `cpu (<threads> threads)` or `cuda:<index>` (empty in runs made
    /// before this column existed).
    #[serde(default)]
    pub device: String,
    /// Accuracy on the examples the stage trained on, in evaluation mode (train and distill
    /// stages).
    #[serde(default)]
    pub train_accuracy: Option<f64>,
    /// Distill stages: the share of test examples on which the student's top-1 class is its
    /// teacher's.
    #[serde(default)]
    pub teacher_agreement: Option<f64>,
    /// Distill stages: the teacher's test errors.
    #[serde(default)]
    pub teacher_errors: Option<i64>,
    /// Distill stages: test examples that both the student and its teacher misclassify.
    #[serde(default)]
    pub shared_errors: Option<i64>,
    /// Distill stages: the share of the transfer set's examples (without jitter) on which the
    /// student's top-1 class is its teacher's: how well it learned what it was shown, beside
    /// `teacher_agreement`, how well that carries over to unseen images.
    #[serde(default)]
    pub transfer_agreement: Option<f64>,
    /// Multiply-adds of one forward pass per example, `sum_l n_{l-1} n_l` over the layers
    /// ([`kd_models::Mlp::forward_macs`]); an ensemble's is the sum of its members', a specialists
    /// stage's the generalist's plus every specialist's (each runs only on the examples that
    /// consult it, so this bounds it). Empty in runs made before it was recorded.
    #[serde(default)]
    pub macs: Option<i64>,
    /// Examples per call of the inference throughput measurement (`run::cost::measure`).
    #[serde(default)]
    pub inference_batch: Option<i64>,
    /// Inference throughput on `device`, without gradients, at `inference_batch` (the median of
    /// a few calls after a warm-up).
    #[serde(default)]
    pub inference_examples_per_second: Option<f64>,
    /// Milliseconds of inference on one example alone (batch 1; a median), on `device`.
    #[serde(default)]
    pub latency_ms: Option<f64>,
}

/// One row of `class_errors.csv`: a model's errors on one class of one split.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClassErrorsRow {
    /// Stage name.
    pub stage: String,
    /// Which of the stage's models, as in [`SummaryRow::variant`].
    #[serde(default)]
    pub variant: String,
    /// `validation` or `test`.
    pub split: String,
    /// True class.
    pub class: i64,
    /// Examples of that class in the split.
    pub examples: i64,
    /// Of which misclassified.
    pub errors: i64,
}

/// One row of `bias_shifts.csv`: the validation errors of one candidate shift.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ShiftRow {
    /// Stage name.
    pub stage: String,
    /// Candidate shift.
    pub shift: f64,
    /// Validation errors with it.
    pub val_errors: i64,
}

/// A stage whose results are committed (`done.csv`, written after the stage's rows).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DoneRow {
    /// Stage name.
    pub stage: String,
}

/// The top-k targets file a run streamed (`targets.csv`, one row, written when the run
/// starts): how much of the teacher's probability mass at T its top k keep over its frames
/// (`data::targets::KeptMass`; empty for a version 2 file, which did not record it).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TargetsRow {
    /// The file, as the run read it.
    pub file: String,
    /// Targets per frame.
    pub k: u64,
    /// The temperature they were made at.
    pub temperature: f64,
    /// Frames of the training store they cover.
    pub frames: u64,
    /// The mean kept mass over the frames.
    pub kept_mean: Option<f64>,
    /// Its median (to 1e-4).
    pub kept_p50: Option<f64>,
    /// Its 5th percentile (to 1e-4).
    pub kept_p5: Option<f64>,
    /// Its 1st percentile (to 1e-4).
    pub kept_p1: Option<f64>,
    /// Its minimum.
    pub kept_min: Option<f64>,
}

/// A class subset found by a `clusters` stage (`subsets.csv`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SubsetRow {
    /// The clusters stage.
    pub stage: String,
    /// Index of the subset (and of its specialist).
    pub subset: i64,
    /// Number of classes in it.
    pub size: i64,
    /// Sum of the positive off-diagonal affinities among its classes (the generalist's
    /// confusion inside the subset; subsets are kept and numbered by it, largest first).
    pub mass: f64,
    /// Share of its classes' positive off-diagonal affinity that stays inside the subset.
    pub within: f64,
    /// Its classes, separated by spaces.
    pub classes: String,
}

/// One trained specialist (`specialists/<stage>.<m>/specialist.csv`, gathered into
/// `specialists.csv` when the stage combines them).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SpecialistRow {
    /// The specialists stage.
    pub stage: String,
    /// Index of its subset.
    pub subset: i64,
    /// Classes of the subset (the head has one more: the dustbin).
    pub classes: i64,
    /// Training examples whose label is in the subset.
    pub train_inside: i64,
    /// Examples drawn per epoch (half inside).
    pub examples_per_epoch: i64,
    /// `ln(oversampling factor)` added to the dustbin logit after training.
    pub dustbin_shift: f64,
    /// Accuracy over the subset's classes plus dustbin on a balanced validation sample,
    /// before the dustbin shift.
    pub val_accuracy: Option<f64>,
    /// Accuracy on the validation examples of the subset's classes after the shift.
    pub val_inside_accuracy: Option<f64>,
    /// Epochs trained.
    pub epochs: i64,
    /// Wall time.
    pub seconds: f64,
}

/// Test (and validation) examples of a `specialists` stage by the number of specialists
/// covering their true class (the paper's Table 4), with the top-1 correct of the generalist
/// and of the combination, and what the covering specialists get right on their own.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CoverageRow {
    /// The specialists stage.
    pub stage: String,
    /// `test` (or `validation`).
    pub split: String,
    /// Specialists whose subset holds the true class.
    pub covering: i64,
    /// Examples.
    pub examples: i64,
    /// Top-1 correct of the generalist alone.
    pub generalist_correct: i64,
    /// Top-1 correct of the generalist combined with the specialists.
    pub combined_correct: i64,
    /// Examples on which at least one specialist was consulted.
    pub consulted: i64,
    /// Examples on which a consulted specialist holds the true class (the others can only
    /// move probability into or out of their dustbins).
    #[serde(default)]
    pub consulted_covering: Option<i64>,
    /// (example, covering specialist) pairs: `covering` per example, summed.
    #[serde(default)]
    pub pairs: Option<i64>,
    /// Pairs whose specialist's top-1 is the true class (all examples, consulted or not).
    #[serde(default)]
    pub specialist_right: Option<i64>,
    /// Pairs on which the generalist seen in that specialist's labels (`D_m(p^g)`, the
    /// subset's classes and a dustbin) has the true class top-1: what the specialist must beat.
    #[serde(default)]
    pub generalist_right: Option<i64>,
    /// Pairs on which both are right.
    #[serde(default)]
    pub both_right: Option<i64>,
    /// Examples with 2+ covering specialists on which they all pick the same class (a dustbin
    /// counts as its own answer).
    #[serde(default)]
    pub covering_agree: Option<i64>,
    /// Of those, the examples on which that shared answer is wrong.
    #[serde(default)]
    pub covering_agree_wrong: Option<i64>,
}

/// Writes rows as CSV with a header, atomically.
pub fn write_csv<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    write_atomic(path, &csv_bytes(rows)?)
}

/// [`write_csv`], unless the file already holds exactly these rows.
pub fn write_csv_if_changed<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let bytes = csv_bytes(rows)?;
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    write_atomic(path, &bytes)
}

fn csv_bytes<T: Serialize>(rows: &[T]) -> Result<Vec<u8>> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in rows {
        w.serialize(r)?;
    }
    w.into_inner().context("csv buffer")
}

/// Reads the rows of a CSV written by [`write_csv`]; a missing file is an empty table.
impl SummaryRow {
    /// The row's name in reports: see [`row_label`].
    pub fn label(&self) -> String {
        row_label(&self.stage, &self.variant)
    }
}

pub fn read_csv<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    if !path.exists() {
        return Ok(vec![]);
    }
    let mut r = csv::Reader::from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
    r.deserialize().collect::<Result<Vec<T>, _>>().with_context(|| format!("malformed {}", path.display()))
}

/// The command line `kd-run` was started with, `program` first, each argument written so that a
/// POSIX shell reads it back as one word: as it is when it holds only characters a shell leaves
/// alone, else in single quotes (an inner `'` as `'\''`).
pub fn command_line(program: &str, args: impl Iterator<Item = std::ffi::OsString>) -> String {
    std::iter::once(program.to_string()).chain(args.map(|a| shell_word(&a))).collect::<Vec<_>>().join(" ")
}

/// `arg` as one shell word: as it is when nothing in it is special, else single-quoted; an
/// argument that is not UTF-8 (a file name may be any bytes) in bash's `$'...'` quoting, its
/// other bytes as `\xNN`.
fn shell_word(arg: &std::ffi::OsStr) -> String {
    let Some(arg) = arg.to_str() else {
        use std::os::unix::ffi::OsStrExt;
        let mut word = String::from("$'");
        for &b in arg.as_bytes() {
            match b {
                b'\\' => word.push_str("\\\\"),
                b'\'' => word.push_str("\\x27"),
                0x20..=0x7e => word.push(char::from(b)),
                _ => word.push_str(&format!("\\x{b:02x}")),
            }
        }
        word.push('\'');
        return word;
    };
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_written_before_variants_read_their_fixed_rows_as_variants() {
        let text = "stage,split,class,examples,errors\nshift,test,0,5,1\nshift-fixed,test,0,5,2\n\
                    gone-fixed,test,0,5,3\nodd-fixed,test,0,5,4\n";
        let mut rows: Vec<ClassErrorsRow> =
            csv::Reader::from_reader(text.as_bytes()).deserialize().collect::<Result<_, _>>().unwrap();
        // `odd-fixed` is a stage of its own (in an experiment written before such names were
        // reserved); `gone` is no stage.
        let stages: Vec<String> = ["shift", "odd", "odd-fixed"].map(String::from).to_vec();
        read_variants_from_names(rows.iter_mut().map(|r| (&mut r.stage, &mut r.variant)), &stages);
        let read: Vec<(&str, &str, i64)> = rows.iter().map(|r| (&*r.stage, &*r.variant, r.errors)).collect();
        assert_eq!(read, [("shift", "", 1), ("shift", FIXED, 2), ("gone-fixed", "", 3), ("odd-fixed", "", 4)]);
        assert_eq!(row_label("shift", FIXED), "shift-fixed");
        assert_eq!(row_label("shift", ""), "shift");
        // Written with the column, read back as written.
        let mut out = csv::Writer::from_writer(vec![]);
        rows.iter().for_each(|r| out.serialize(r).unwrap());
        let text = String::from_utf8(out.into_inner().unwrap()).unwrap();
        assert!(
            text.starts_with("stage,variant,split,class,examples,errors\nshift,,test,0,5,1\nshift,fixed,test,0,5,2\n"),
            "{text}"
        );
        let again: Vec<ClassErrorsRow> =
            csv::Reader::from_reader(text.as_bytes()).deserialize().collect::<Result<_, _>>().unwrap();
        assert_eq!(again, rows);
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let temp = crate::testutil::TempDir::new("atomic-write");
        let dir = temp.0.clone();
        let path = dir.join("a.csv");
        let rows = vec![SummaryRow {
            stage: "s".into(),
            variant: String::new(),
            kind: "train".into(),
            model: "mlp 2-2".into(),
            parameters: 6,
            val_errors: None,
            test_errors: 3,
            test_accuracy: 0.7,
            shift: Some(-7.5),
            seconds: 1.5,
            device: "cpu (2 threads)".into(),
            train_accuracy: Some(0.75),
            teacher_agreement: Some(0.5),
            teacher_errors: Some(3),
            shared_errors: Some(2),
            transfer_agreement: Some(0.75),
            macs: Some(4),
            inference_batch: Some(1024),
            inference_examples_per_second: Some(1.5e6),
            latency_ms: Some(0.0125),
        }];
        write_csv(&path, &rows).unwrap();
        write_csv(&path, &rows).unwrap();
        assert_eq!(read_csv::<SummaryRow>(&path).unwrap(), rows);
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["a.csv"]);
        // A summary written before the device column existed still reads.
        let old = dir.join("old.csv");
        std::fs::write(
            &old,
            "stage,kind,model,parameters,val_errors,test_errors,test_accuracy,shift,seconds\ns,train,m,6,,3,0.7,,1.5\n",
        )
        .unwrap();
        assert_eq!(read_csv::<SummaryRow>(&old).unwrap()[0].device, "");
    }

    #[test]
    fn metrics_written_before_the_soft_kl_column_still_read() {
        let temp = crate::testutil::TempDir::new("metrics");
        let dir = temp.0.clone();
        let old = dir.join("metrics.csv");
        std::fs::write(
            &old,
            "stage,epoch,lr,train_loss,train_accuracy,val_loss,val_accuracy,test_errors,seconds,examples_per_second,\
             tflops,device\nd,1,0.1,830.5,0.9,,,,1.5,100.0,0.001,cpu (2 threads)\n",
        )
        .unwrap();
        let rows = read_csv::<MetricsRow>(&old).unwrap();
        assert_eq!((rows[0].train_loss, rows[0].soft_kl, rows[0].device.as_str()), (830.5, None, "cpu (2 threads)"));
        let new = dir.join("new.csv");
        let rows = vec![MetricsRow { soft_kl: Some(2.25), ..rows[0].clone() }];
        write_csv(&new, &rows).unwrap();
        assert_eq!(read_csv::<MetricsRow>(&new).unwrap(), rows);
    }

    #[test]
    fn the_command_line_reads_back_through_a_shell_as_the_same_words() {
        let args = ["run", "a.toml", "--set", "name=a b", "--title", "the teacher's \"best\" $HOME `x` \\", ""];
        let line = command_line("printf '%s|'", args.iter().map(std::ffi::OsString::from));
        assert!(line.starts_with("printf '%s|' run a.toml --set 'name=a b' --title 'the teacher'\\''s"), "{line}");
        let out = std::process::Command::new("sh").arg("-c").arg(&line).output().unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("{}|", args.join("|")));
    }

    #[test]
    fn arguments_that_are_not_utf8_read_back_through_bash_as_the_same_bytes() {
        use std::os::unix::ffi::{OsStrExt, OsStringExt};
        let odd = std::ffi::OsString::from_vec(b"out/\xfe\xff it's a \\ $x\n".to_vec());
        let line = command_line("printf '%s|'", [std::ffi::OsString::from("--out"), odd.clone()].into_iter());
        assert!(line.is_ascii() && line.contains("$'out/\\xfe\\xff it\\x27s a \\\\ $x\\x0a'"), "{line}");
        let out = std::process::Command::new("bash").arg("-c").arg(&line).output().unwrap();
        let mut want = b"--out|".to_vec();
        want.extend_from_slice(odd.as_bytes());
        want.push(b'|');
        assert_eq!(out.stdout, want);
    }
}
