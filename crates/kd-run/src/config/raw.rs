//! The experiment file as written: the `Raw*` structs the TOML parser fills (with spans, so that
//! errors name the line), the keys each stage kind accepts, `--set` overrides, and TOML errors
//! quoted with the line they point at.

use super::experiment::{
    Affinity, DataKind, FileSet, Objective, OptimizerKind, PaperFigures, Precision, ScheduleKind, StageKind, SweepPoint,
};
use super::values::{ClassId, Count, NonNegative, Positive, Rate, Sha256, Share, Temperature, Widths};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};
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
    #[serde(default)]
    pub(crate) optimizer_in_backward: bool,
    #[serde(default)]
    pub(crate) cuda_graphs: bool,
    #[serde(default)]
    pub(crate) checkpoint: Option<RawCheckpoint>,
    pub(crate) data: RawData,
    #[serde(default)]
    pub(crate) defaults: RawTraining,
    #[serde(default)]
    pub(crate) stages: Vec<RawStage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCheckpoint {
    #[serde(default)]
    pub(crate) every_steps: Option<u64>,
    #[serde(default)]
    pub(crate) every_minutes: Option<f64>,
    #[serde(default)]
    pub(crate) keep: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawData {
    #[serde(default)]
    pub(crate) kind: Option<Spanned<DataKind>>,
    #[serde(default)]
    pub(crate) dir: Option<PathBuf>,
    #[serde(default)]
    pub(crate) speech: Option<super::speech::CorpusConfig>,
    #[serde(default)]
    pub(crate) files: Option<RawFiles>,
    #[serde(default)]
    pub(crate) store: Option<RawStore>,
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

/// Frame stores to stream (`[data.store]`).
#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStore {
    pub(crate) dir: PathBuf,
    #[serde(default)]
    pub(crate) shuffle_buffer: Option<Count>,
    #[serde(default)]
    pub(crate) chunk_frames: Option<Count>,
    #[serde(default)]
    pub(crate) prefetch: Option<Count>,
    #[serde(default)]
    pub(crate) epoch_fraction: Option<f64>,
    #[serde(default)]
    pub(crate) eval_frames: Option<Count>,
    #[serde(default)]
    pub(crate) targets: Option<String>,
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

/// Declares each optional stage key once: its type, the stage kinds that accept it and its place
/// in a kind's list of keys (error messages list a kind's keys in that order; the struct's
/// fields, which the parser lists for an unknown key, keep the order they are declared in).
/// From that one list come the `RawStage` struct, `STAGE_KEYS` and `RawStage::present_keys`.
macro_rules! stage_keys {
    ($($(#[$meta:meta])* $key:ident: $ty:ty => [$($kind:ident),+] @ $place:literal,)+) => {
        #[derive(Deserialize, Clone)]
        #[serde(deny_unknown_fields)]
        pub(crate) struct RawStage {
            pub(crate) name: Spanned<String>,
            pub(crate) kind: StageKind,
            $($(#[$meta])* pub(crate) $key: Option<$ty>,)+
            /// Set by sweep expansion on each stage it makes: the values it gave the stage.
            #[serde(skip)]
            pub(crate) point: Option<SweepPoint>,
        }

        /// Every optional stage key, the kinds that accept it and its place in their lists.
        pub(crate) const STAGE_KEYS: &[StageKey] =
            &[$(StageKey { key: stringify!($key), kinds: &[$(StageKind::$kind),+], place: $place },)+];

        impl RawStage {
            /// The optional keys this stage sets, in declaration order.
            pub(crate) fn present_keys(&self) -> Vec<&'static str> {
                let mut keys = Vec::new();
                $(if self.$key.is_some() {
                    keys.push(stringify!($key));
                })+
                keys
            }
        }
    };
}

/// An optional stage key: its name, the stage kinds that accept it, and its place in their lists.
pub(crate) struct StageKey {
    pub(crate) key: &'static str,
    pub(crate) kinds: &'static [StageKind],
    pub(crate) place: u32,
}

stage_keys! {
    // The training keys, as in [defaults] (not `#[serde(flatten)]`: it would lose line numbers).
    model: RawModel => [Train, Distill] @ 16,
    seed: u64 => [Train, Distill, Clusters, Specialists] @ 17,
    epochs: Count => [Train, Distill, Specialists] @ 18,
    batch_size: Count => [Train, Distill, Specialists] @ 19,
    optimizer: RawOptimizer => [Train, Distill, Specialists] @ 20,
    schedule: RawSchedule => [Train, Distill, Specialists] @ 21,
    jitter: u32 => [Train, Distill] @ 22,
    train_fraction: Share => [Train, Distill] @ 23,
    early_stopping: RawEarlyStopping => [Train, Distill, Specialists] @ 24,
    teacher: Spanned<String> => [Distill] @ 30,
    teacher_checkpoint: PathBuf => [Distill] @ 31,
    teacher_top_k: Count => [Distill] @ 32,
    teacher_translations: u32 => [Distill] @ 33,
    temperature: Temperature => [Distill] @ 34,
    hard_weight: NonNegative => [Distill] @ 35,
    soft_weight: NonNegative => [Distill] @ 36,
    objective: Objective => [Distill] @ 37,
    transfer_exclude: Vec<ClassId> => [Distill] @ 38,
    transfer_only: Vec<ClassId> => [Distill] @ 39,
    from: Spanned<String> => [Evaluate, BiasShift, Clusters, Specialists] @ 1,
    checkpoint: PathBuf => [Evaluate, BiasShift, Clusters, Specialists] @ 2,
    classes: Vec<ClassId> => [BiasShift] @ 12,
    shifts: RawShifts => [BiasShift] @ 13,
    fixed_shift: f64 => [BiasShift] @ 14,
    members: Vec<Spanned<String>> => [Ensemble] @ 15,
    affinity: Affinity => [Clusters] @ 4,
    clusters: Count => [Clusters] @ 5,
    walk_steps: u32 => [Clusters] @ 6,
    repeats: Count => [Clusters] @ 7,
    min_size: Count => [Clusters] @ 8,
    max_size: Count => [Clusters] @ 9,
    count: Count => [Clusters] @ 10,
    kmeans: RawKMeans => [Clusters] @ 11,
    extra_clusters: Vec<Count> => [Clusters] @ 40,
    max_overlap: Share => [Clusters] @ 41,
    subsets: Spanned<String> => [Specialists] @ 3,
    examples: Count => [Specialists] @ 25,
    top_n: Count => [Specialists] @ 26,
    combine_iterations: Count => [Specialists] @ 27,
    sweep: RawSweep => [Train, Distill] @ 28,
    paper: PaperFigures => [Train, Distill, Evaluate, BiasShift, Ensemble, Clusters, Specialists] @ 29,
    sha256: Sha256 => [Distill, Evaluate, BiasShift, Clusters, Specialists] @ 42,
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
    use crate::inputs::{clip_lines, MAX_ECHO};
    let message =
        explain_unknown_name(e.message().trim_end()).unwrap_or_else(|| clip_lines(e.message().trim_end(), MAX_ECHO));
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

/// serde's "unknown field `x`, expected one of `a`, `b`, ..." (or "unknown variant", or
/// "expected `a` or `b`") rewritten with the closest valid name suggested and every valid name
/// listed: the list is the program's own, so it is never cut; the unknown name, the user's, is.
fn explain_unknown_name(message: &str) -> Option<String> {
    use crate::inputs::clip;
    let (what, rest) = ["field", "variant"].into_iter().find_map(|w| {
        let rest = message.strip_prefix(&format!("unknown {w} `"))?;
        Some((w, rest))
    })?;
    let (name, rest) = rest.split_once("`, expected ")?;
    // The valid names are the quoted words: between the first and second backtick, the third and
    // fourth, and so on.
    let valid: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    if valid.is_empty() {
        return None;
    }
    let listed = valid.iter().map(|v| format!("`{v}`")).collect::<Vec<_>>().join(", ");
    let shown = clip(name, 60);
    Some(match closest(name, &valid) {
        Some(best) => format!("unknown {what} `{shown}`: did you mean `{best}`? (expected one of {listed})"),
        None => format!("unknown {what} `{shown}`, expected one of {listed}"),
    })
}

/// The name in `valid` nearest to `name` by edit distance (ignoring case), if it is near enough
/// to be a slip: at most a third of the longer name's characters differ, or one contains the other.
pub(crate) fn closest<'a>(name: &str, valid: &[&'a str]) -> Option<&'a str> {
    let name = name.to_lowercase();
    let (best, distance) =
        valid.iter().map(|v| (*v, edit_distance(&name, &v.to_lowercase()))).min_by_key(|&(_, d)| d)?;
    if distance * 3 <= name.chars().count().max(best.chars().count()) {
        return Some(best);
    }
    let related = |v: &&&str| {
        let v = v.to_lowercase();
        name.chars().count() >= 3 && (v.contains(name.as_str()) || name.contains(v.as_str()))
    };
    valid.iter().filter(related).min_by_key(|v| v.len()).copied()
}

/// Levenshtein distance counting an exchange of two neighbouring characters as one edit (the
/// optimal string alignment distance).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    rows[0] = (0..=b.len()).collect();
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (rows[i - 1][j] + 1).min(rows[i][j - 1] + 1).min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = d;
        }
    }
    rows[a.len()][b.len()]
}

/// Applies `key=value`, where key is a dotted path (`seed`, `data.train_limit`,
/// `defaults.epochs`, `stages.<stage name>.temperature`) and value a TOML value (a bare word is
/// taken as a string).
/// A path the value holds is made absolute against `cwd`.
pub(crate) fn apply_override(doc: &mut toml::Table, assignment: &str, cwd: &std::path::Path) -> Result<()> {
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
            let first = path.get(i + 1).with_context(|| "expected stages.<stage name>.<key>")?;
            let stages = table.get_mut("stages").and_then(|s| s.as_array_mut()).context("the file has no stages")?;
            // A stage name may hold dots (`b512-lr0.05`): the longest run of parts that names a
            // stage is the name.
            let named = |s: &toml::Value, name: &str| s.get("name").and_then(|n| n.as_str()) == Some(name);
            let (stage, parts) = (1..path.len() - i)
                .rev()
                .find_map(|k| {
                    let name = path[i + 1..i + 1 + k].join(".");
                    stages.iter().position(|s| named(s, &name)).map(|at| (at, k))
                })
                .with_context(|| format!("no stage named `{first}`"))?;
            table = stages[stage].as_table_mut().context("a stage is not a table")?;
            i += 1 + parts;
        } else {
            let entry = table.entry(part).or_insert_with(|| toml::Value::Table(Default::default()));
            table = entry.as_table_mut().with_context(|| format!("`{part}` is not a table"))?;
            i += 1;
        }
    }
    let mut value = value;
    super::paths::absolutize_value(last, &mut value, cwd);
    table.insert(last.to_string(), value);
    Ok(())
}

impl RawExperiment {
    /// Every path of the file made absolute against `base`, the file's folder.
    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| *p = super::paths::absolute(base, p);
        if let Some(dir) = &mut self.data.dir {
            fix(dir);
        }
        if let Some(store) = &mut self.data.store {
            fix(&mut store.dir);
        }
        if let Some(files) = &mut self.data.files {
            for set in [&mut files.train, &mut files.validation, &mut files.test] {
                fix(&mut set.features);
                fix(&mut set.labels);
                if let Some(lengths) = &mut set.lengths {
                    fix(lengths);
                }
            }
        }
        for stage in &mut self.stages {
            for p in [&mut stage.checkpoint, &mut stage.teacher_checkpoint].into_iter().flatten() {
                fix(p);
            }
        }
    }
}

pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

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

    /// The optional keys a stage of this kind accepts, by their place.
    pub(crate) fn accepted_keys(self) -> Vec<&'static str> {
        let mut keys: Vec<&StageKey> = STAGE_KEYS.iter().filter(|k| k.kinds.contains(&self)).collect();
        keys.sort_by_key(|k| k.place);
        keys.into_iter().map(|k| k.key).collect()
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
}
