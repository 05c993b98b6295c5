//! The experiment file as written: the `Raw*` structs the TOML parser fills (with spans, so that
//! errors name the line), the keys each stage kind accepts, `--set` overrides, and TOML errors
//! quoted with the line they point at.

use super::experiment::{
    Affinity, DataKind, FileSet, Objective, OptimizerKind, PaperFigures, Precision, ScheduleKind, StageKind, SweepPoint,
};
use super::values::{ClassId, Count, NonNegative, Positive, Rate, Share, Temperature, Widths};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::PathBuf;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawExperiment {
    pub(crate) name: Spanned<String>,
    #[serde(default)]
    pub(crate) description: Option<String>,
    #[serde(default)]
    pub(crate) seed: u64,
    #[serde(default)]
    pub(crate) device: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) threads: Option<Count>,
    #[serde(default)]
    pub(crate) precision: Precision,
    #[serde(default)]
    pub(crate) peak_tflops: Option<Positive>,
    pub(crate) data: RawData,
    #[serde(default)]
    pub(crate) defaults: RawTraining,
    #[serde(default)]
    pub(crate) stages: Vec<RawStage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawData {
    #[serde(default)]
    pub(crate) kind: Option<Spanned<DataKind>>,
    #[serde(default)]
    pub(crate) dir: Option<PathBuf>,
    #[serde(default)]
    pub(crate) speech: Option<crate::data::speech::CorpusConfig>,
    #[serde(default)]
    pub(crate) files: Option<RawFiles>,
    #[serde(default)]
    pub(crate) classes: Option<Count>,
    #[serde(default)]
    pub(crate) context: Option<[u32; 2]>,
    #[serde(default)]
    pub(crate) validation: usize,
    #[serde(default)]
    pub(crate) train_limit: Option<Count>,
    #[serde(default)]
    pub(crate) test_limit: Option<Count>,
}

/// A user's own frames and labels, per split.
#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFiles {
    pub(crate) train: FileSet,
    pub(crate) validation: FileSet,
    pub(crate) test: FileSet,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTraining {
    pub(crate) epochs: Option<Count>,
    pub(crate) batch_size: Option<Count>,
    pub(crate) optimizer: Option<RawOptimizer>,
    pub(crate) schedule: Option<RawSchedule>,
    pub(crate) jitter: Option<u32>,
    pub(crate) train_fraction: Option<Share>,
    pub(crate) early_stopping: Option<RawEarlyStopping>,
}

/// Stop when the validation errors have not improved for `patience` epochs; keep the best.
#[derive(Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEarlyStopping {
    pub(crate) patience: Count,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOptimizer {
    pub(crate) kind: OptimizerKind,
    pub(crate) lr: Positive,
    pub(crate) momentum: Option<Rate>,
    pub(crate) momentum_start: Option<Rate>,
    pub(crate) momentum_ramp_epochs: Option<u32>,
    pub(crate) nesterov: Option<bool>,
    pub(crate) weight_decay: Option<NonNegative>,
    pub(crate) beta1: Option<Rate>,
    pub(crate) beta2: Option<Rate>,
    pub(crate) eps: Option<Positive>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSchedule {
    pub(crate) kind: ScheduleKind,
    pub(crate) gamma: Option<Positive>,
    pub(crate) every: Option<Count>,
    pub(crate) min_lr: Option<NonNegative>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawModel {
    pub(crate) hidden: Widths,
    #[serde(default)]
    pub(crate) input_dropout: Option<Rate>,
    #[serde(default)]
    pub(crate) hidden_dropout: Option<Rate>,
    #[serde(default)]
    pub(crate) max_norm: Option<Positive>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStage {
    pub(crate) name: Spanned<String>,
    pub(crate) kind: StageKind,
    pub(crate) model: Option<RawModel>,
    pub(crate) seed: Option<u64>,
    // The training keys, as in [defaults] (not `#[serde(flatten)]`: it would lose line numbers).
    pub(crate) epochs: Option<Count>,
    pub(crate) batch_size: Option<Count>,
    pub(crate) optimizer: Option<RawOptimizer>,
    pub(crate) schedule: Option<RawSchedule>,
    pub(crate) jitter: Option<u32>,
    pub(crate) train_fraction: Option<Share>,
    pub(crate) early_stopping: Option<RawEarlyStopping>,
    pub(crate) teacher: Option<Spanned<String>>,
    pub(crate) teacher_checkpoint: Option<PathBuf>,
    pub(crate) teacher_top_k: Option<Count>,
    pub(crate) teacher_translations: Option<u32>,
    pub(crate) temperature: Option<Temperature>,
    pub(crate) hard_weight: Option<NonNegative>,
    pub(crate) soft_weight: Option<NonNegative>,
    pub(crate) objective: Option<Objective>,
    pub(crate) transfer_exclude: Option<Vec<ClassId>>,
    pub(crate) transfer_only: Option<Vec<ClassId>>,
    pub(crate) from: Option<Spanned<String>>,
    pub(crate) checkpoint: Option<PathBuf>,
    pub(crate) classes: Option<Vec<ClassId>>,
    pub(crate) shifts: Option<RawShifts>,
    pub(crate) fixed_shift: Option<f64>,
    pub(crate) members: Option<Vec<Spanned<String>>>,
    pub(crate) affinity: Option<Affinity>,
    pub(crate) clusters: Option<Count>,
    pub(crate) walk_steps: Option<u32>,
    pub(crate) repeats: Option<Count>,
    pub(crate) min_size: Option<Count>,
    pub(crate) max_size: Option<Count>,
    pub(crate) count: Option<Count>,
    pub(crate) kmeans: Option<RawKMeans>,
    pub(crate) subsets: Option<Spanned<String>>,
    pub(crate) examples: Option<Count>,
    pub(crate) top_n: Option<Count>,
    pub(crate) combine_iterations: Option<Count>,
    pub(crate) sweep: Option<RawSweep>,
    pub(crate) paper: Option<PaperFigures>,
    /// Set by sweep expansion on each stage it makes: the values it gave the stage.
    #[serde(skip)]
    pub(crate) point: Option<SweepPoint>,
}

/// Mini-batch k-means settings of a `clusters` stage.
#[derive(Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKMeans {
    pub(crate) iterations: Option<Count>,
    pub(crate) batch_size: Option<Count>,
}

/// Candidate bias shifts: `min, min + step, ..., max`.
#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawShifts {
    pub(crate) min: f64,
    pub(crate) max: f64,
    pub(crate) step: Positive,
}

/// Values a stage is repeated over; each combination becomes a stage named
/// `<name>-T<temperature>-h<widths>-s<seed>` (only the swept parts appear).
#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSweep {
    pub(crate) temperature: Option<Vec<Temperature>>,
    pub(crate) hidden: Option<Vec<Widths>>,
    pub(crate) seed: Option<Vec<u64>>,
}

/// A TOML error as the parser shows it (`origin: TOML parse error at line L, column C`, the
/// line with a caret under the column, the message), but with the quoted line and the message
/// clipped: a 200 KB line is shown as the 120 characters around the column.
pub(crate) fn toml_error(origin: &str, text: &str, e: &toml::de::Error) -> anyhow::Error {
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
pub(crate) fn apply_override(doc: &mut toml::Table, assignment: &str) -> Result<()> {
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

pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

pub(crate) const TRAIN_KEYS: [&str; 11] = [
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
pub(crate) const DISTILL_ONLY_KEYS: [&str; 10] = [
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

pub(crate) const CLUSTER_KEYS: [&str; 12] = [
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
pub(crate) const SPECIALIST_KEYS: [&str; 13] = [
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
    pub(crate) fn as_str(self) -> &'static str {
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
    pub(crate) fn training(&self) -> RawTraining {
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
    pub(crate) fn present_keys(&self) -> Vec<&'static str> {
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
