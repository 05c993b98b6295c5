//! `kd-run report`: a Markdown report with plots, built only from run directories' files.
//!
//! For every run: its description, the command that produced it, and a table of its models
//! with the paper's figures (from the experiment file's `paper` entries) beside ours. Runs whose
//! names differ only by a `_s<seed>` suffix are one experiment repeated over seeds: their table
//! gives each seed's count, the mean and the standard deviation. Stages made by a sweep over
//! temperatures (their `sweep` point in `config.toml`) also get a table of test errors by
//! temperature and student size, and a plot. Every trained stage's validation accuracy (or training loss) per epoch goes
//! into a training-curves plot.

use crate::config::{
    BiasShiftJob, DistillJob, EnsembleJob, EvaluateJob, Experiment, Job, ModelSource, PaperFigures, Precision,
    ScheduleKind, SpecialistsJob, Stage, SweepPoint, TrainJob, Training,
};
use crate::run::output::{self, ClassErrorsRow, CoverageRow, MetricsRow, SpecialistRow, SubsetRow, SummaryRow};
use crate::run::CONFIG_HASH;
use anyhow::{bail, Context, Result};
use plot::{Chart, Series};
use std::collections::BTreeMap;
use std::fmt::Write as _;

pub mod plot;
mod targets;
use std::path::{Path, PathBuf};

/// Options of `kd-run report`.
#[derive(clap::Args)]
pub struct ReportArgs {
    /// The Markdown file to write; plots go to a folder beside it named after it.
    #[arg(long)]
    out: PathBuf,
    /// Title of the report.
    #[arg(long, default_value = "Results")]
    title: String,
    /// Run directories (`runs/<name>`), in the order of the report.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
}

/// What a run directory holds.
struct RunFiles {
    /// The run directory as given, and canonical.
    given: PathBuf,
    dir: PathBuf,
    /// `config.toml` as a TOML table, to compare runs' configurations.
    config: toml::Table,
    name: String,
    description: String,
    command: String,
    stages: Vec<Stage>,
    /// The run's `precision`.
    precision: Precision,
    /// The device named in `run.log`, for summary rows written before they named theirs.
    logged_device: Option<String>,
    summary: Vec<SummaryRow>,
    class_errors: Vec<ClassErrorsRow>,
    metrics: Vec<MetricsRow>,
    subsets: Vec<SubsetRow>,
    specialists: Vec<SpecialistRow>,
    coverage: Vec<CoverageRow>,
    /// The top-k targets file the run streamed and what it keeps (`targets.csv`).
    targets: targets::Recorded,
    /// What the run directory lacks that the report would show, one sentence each; the report
    /// says it instead of leaving gaps.
    missing: Vec<String>,
}

impl RunFiles {
    fn read(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.toml");
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("{} is not a run directory (no config.toml)", dir.display()))?;
        // Either form of the record (an experiment file, or the resolved structs runs wrote
        // before), compared between runs resolved.
        let config: Experiment = crate::config::read_record(&text, &config_path)
            .with_context(|| format!("malformed {}", config_path.display()))?;
        let table: toml::Table =
            config.to_toml()?.parse().with_context(|| format!("malformed {}", config_path.display()))?;
        let canonical = std::fs::canonicalize(dir)
            .with_context(|| format!("cannot resolve the run directory {}", dir.display()))?;
        let config_checked = check_config_hash(dir, &text)?;
        let mut stages = config.stages;
        // Runs recorded before stages carried their sweep point: read it from the names.
        if !stages.iter().any(|s| s.sweep.is_some()) {
            for stage in &mut stages {
                stage.sweep = legacy_sweep_point(stage);
            }
        }
        let mut summary: Vec<SummaryRow> = output::read_csv(&dir.join("summary.csv"))?;
        let mut class_errors: Vec<ClassErrorsRow> = output::read_csv(&dir.join("class_errors.csv"))?;
        let metrics: Vec<MetricsRow> = output::read_csv(&dir.join("metrics.csv"))?;
        let names: Vec<String> = stages.iter().map(|s| s.name.clone()).collect();
        output::read_variants_from_names(summary.iter_mut().map(|r| (&mut r.stage, &mut r.variant)), &names);
        output::read_variants_from_names(class_errors.iter_mut().map(|r| (&mut r.stage, &mut r.variant)), &names);
        let mut missing = Vec::new();
        if !config_checked {
            missing.push(format!(
                "`{CONFIG_HASH}` is missing (a run made before kd-run recorded it): `config.toml` is not checked \
                 against the configuration the run used"
            ));
        }
        // Rows of a stage that `done.csv` does not name are those of a stage a killed run was
        // committing; they are not results yet.
        let done_path = dir.join("done.csv");
        if done_path.exists() {
            let done: Vec<output::DoneRow> = output::read_csv(&done_path)?;
            let finished = |stage: &str| done.iter().any(|d| d.stage == stage);
            let mut unfinished: Vec<String> =
                summary.iter().filter(|r| !finished(&r.stage)).map(|r| format!("`{}`", r.label())).collect();
            unfinished.dedup();
            if !unfinished.is_empty() {
                missing.push(format!(
                    "{} not finished (not in `done.csv`): not shown",
                    if unfinished.len() == 1 {
                        format!("stage {} is", unfinished[0])
                    } else {
                        format!("stages {} are", unfinished.join(", "))
                    }
                ));
            }
            summary.retain(|r| finished(&r.stage));
            class_errors.retain(|r| finished(&r.stage));
        }
        if summary.is_empty() {
            bail!("{} has no finished model yet (summary.csv is empty or missing)", dir.display());
        }
        let first = &summary[0];
        if !class_errors.iter().any(|r| (&r.stage, &r.variant) == (&first.stage, &first.variant) && r.split == "test") {
            missing.push(format!(
                "`class_errors.csv` {}: the size of the test set and errors per class are not shown",
                if dir.join("class_errors.csv").exists() {
                    "has no test rows for the first model"
                } else {
                    "is missing"
                }
            ));
        }
        if !summary.iter().any(|r| r.inference_batch.is_some()) {
            missing.push(
                "`summary.csv` has no inference measurements (a run made before kd-run recorded what each model costs \
                 to run): no cost table"
                    .to_string(),
            );
        }
        if metrics.is_empty() {
            missing.push(format!(
                "`metrics.csv` {}: no training curves",
                if dir.join("metrics.csv").exists() { "has no rows" } else { "is missing" }
            ));
        }
        for note in &missing {
            eprintln!("warning: {}: {note}", dir.display());
        }
        Ok(RunFiles {
            given: dir.to_path_buf(),
            dir: canonical,
            config: table,
            name: config.name,
            description: config.description,
            command: reproducing_command(std::fs::read_to_string(dir.join("command.txt")).unwrap_or_default().trim()),
            stages,
            precision: config.precision,
            logged_device: std::fs::read_to_string(dir.join("run.log")).ok().and_then(|log| logged_device(&log)),
            summary,
            class_errors,
            metrics,
            subsets: output::read_csv(&dir.join("subsets.csv"))?,
            specialists: output::read_csv(&dir.join("specialists.csv"))?,
            coverage: output::read_csv(&dir.join("specialist_coverage.csv"))?,
            targets: targets::read(dir, &config.data.source)?,
            missing,
        })
    }

    /// A device as recorded in a row; rows written before devices were recorded get the one in
    /// `run.log`.
    fn device_of(&self, recorded: &str) -> String {
        if recorded.is_empty() {
            self.logged_device.clone().unwrap_or_else(|| "an unrecorded device".into())
        } else {
            // Rows written before the singular was used say "(1 threads)".
            recorded.replace("(1 threads)", "(1 thread)")
        }
    }

    /// Where a stage ran: its device, or, for a stage resumed on another device, each device
    /// with its epochs (from `metrics.csv`).
    fn stage_device(&self, row: &SummaryRow) -> String {
        let mut spans: Vec<(String, i64, i64)> = Vec::new();
        for m in self.metrics.iter().filter(|m| m.stage == row.stage) {
            let device = self.device_of(&m.device);
            match spans.last_mut() {
                Some((d, _, last)) if *d == device => *last = m.epoch,
                _ => spans.push((device, m.epoch, m.epoch)),
            }
        }
        if spans.len() < 2 {
            return self.device_of(&row.device);
        }
        let span = |(d, first, last): &(String, i64, i64)| match first == last {
            true => format!("{d} for epoch {first}"),
            false => format!("{d} for epochs {first}-{last}"),
        };
        spans.iter().map(span).collect::<Vec<_>>().join(" and ")
    }

    /// Where the run's stages ran and how long it took, as one sentence.
    fn where_and_how_long(&self) -> String {
        let mut by_device: Vec<(String, Vec<String>)> = Vec::new();
        for row in &self.summary {
            let device = self.stage_device(row);
            match by_device.iter_mut().find(|(d, _)| *d == device) {
                Some((_, stages)) => stages.push(row.label()),
                None => by_device.push((device, vec![row.label()])),
            }
        }
        let seconds: f64 = self.summary.iter().map(|r| r.seconds).sum();
        let places = if by_device.len() == 1 {
            format!("on {}", by_device[0].0)
        } else {
            let names = |s: &[String]| if s.len() > 4 { format!("{} stages", s.len()) } else { s.join(", ") };
            by_device.iter().map(|(d, s)| format!("{} on {d}", names(s))).collect::<Vec<_>>().join("; ")
        };
        // Runs recorded before their rows named bf16 say it from their configuration.
        let named = self.summary.iter().any(|r| r.device.contains("bf16") || r.device.contains("tf32"));
        let precision = match self.precision {
            Precision::F32 => String::new(),
            Precision::Tf32 if named => String::new(),
            Precision::Tf32 => ", precision tf32 (TF32 matrix products on a GPU)".to_string(),
            _ if named => String::new(),
            Precision::Bf16 => ", with matrix products in bf16".to_string(),
        };
        format!("`{}`: {:.1} min of stage time, {places}{precision}.", self.name, seconds / 60.0)
    }

    /// Size of the test set, from the per-class counts of the first model (None when they were
    /// not recorded).
    fn test_examples(&self) -> Option<i64> {
        let first = &self.summary[0];
        let rows = self
            .class_errors
            .iter()
            .filter(|r| (&r.stage, &r.variant) == (&first.stage, &first.variant) && r.split == "test");
        rows.map(|r| r.examples).reduce(|a, b| a + b)
    }

    fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// The temperature sweep point the stage of `row` is, if any: (base, T, hidden widths, seed).
    fn temperature_point(&self, row: &SummaryRow) -> Option<(String, f64, Vec<i64>, Option<u64>)> {
        let stage = self.stage(&row.stage)?;
        let point = stage.sweep.as_ref()?;
        let hidden = point.hidden.clone().or_else(|| model_hidden(stage))?;
        Some((point.base.clone(), point.temperature?, hidden, point.seed))
    }

    /// Test errors of the model of `row` on `classes`, if they were recorded.
    fn class_errors(&self, row: &SummaryRow, classes: &[i64]) -> Option<i64> {
        self.class_errors
            .iter()
            .filter(|r| (&r.stage, &r.variant) == (&row.stage, &row.variant))
            .filter(|r| r.split == "test" && classes.contains(&r.class))
            .map(|r| r.errors)
            .reduce(|a, b| a + b)
    }
}

/// The device in `run.log`'s line `experiment `<name>`: device <Cpu|Cuda(i)> (...`.
fn logged_device(log: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains("`: device "))?;
    let device = line.split("`: device ").nth(1)?.split(' ').next()?;
    Some(match device.strip_prefix("Cuda(").and_then(|d| d.strip_suffix(')')) {
        Some(i) => format!("cuda:{i}"),
        None => "cpu".to_string(),
    })
}

/// The classes a stage's row should report errors on: those left out of its transfer set, or
/// whose biases it shifts (also for the fixed variant of a shift stage).
fn focus_classes(stage: Option<&Stage>) -> Vec<i64> {
    match stage.map(|s| &s.job) {
        Some(Job::Distill(DistillJob { distill, .. })) => distill.transfer_exclude.clone(),
        Some(Job::BiasShift(BiasShiftJob { classes, .. })) => classes.clone(),
        _ => vec![],
    }
}

/// The training loop's settings of a stage that trains.
fn training(stage: &Stage) -> Option<&Training> {
    match &stage.job {
        Job::Train(TrainJob { training, .. })
        | Job::Distill(DistillJob { training, .. })
        | Job::Specialists(SpecialistsJob { training, .. }) => Some(training),
        _ => None,
    }
}

/// The hidden widths of a stage's network, for stages that train one.
fn model_hidden(stage: &Stage) -> Option<Vec<i64>> {
    match &stage.job {
        Job::Train(TrainJob { model, .. }) | Job::Distill(DistillJob { model, .. }) => Some(model.hidden.clone()),
        _ => None,
    }
}

/// One-line description of how a stage's model was made.
fn setup(stage: Option<&Stage>, row: &SummaryRow) -> String {
    let kind = stage.map_or(row.kind.as_str(), |s| s.job.kind_name());
    let job = stage.map(|s| &s.job);
    let mut parts = Vec::new();
    // Parts that regularize; the optimizer's parts follow them.
    let mut regularized = false;
    if let Some(Job::Train(TrainJob { model: m, .. }) | Job::Distill(DistillJob { model: m, .. })) = job {
        let (pi, ph) = (m.input_dropout, m.hidden_dropout);
        if pi > 0.0 || ph > 0.0 {
            parts.push(format!("dropout {pi}/{ph}"));
        }
        if let Some(c) = m.max_norm {
            parts.push(format!("max-norm {c}"));
        }
    }
    if let Some(t) = stage.and_then(training) {
        if t.jitter > 0 {
            parts.push(format!("jitter {} px", t.jitter));
        }
        regularized = !parts.is_empty();
        parts.push(format!("{} epoch{}", t.epochs, if t.epochs == 1 { "" } else { "s" }));
        parts.push(format!("batch {}", t.batch_size));
        let o = &t.optimizer;
        let sgd = o.kind == crate::config::OptimizerKind::Sgd;
        let mut text = format!("{} lr {}", if sgd { "sgd" } else { "adam" }, o.lr);
        if sgd {
            text.push_str(&format!(" momentum {}", o.momentum));
        }
        match t.schedule.kind {
            ScheduleKind::Exponential => text.push_str(&format!(" x {} per epoch", t.schedule.gamma)),
            ScheduleKind::Constant => text.push_str(" (constant)"),
            ScheduleKind::Step => text.push_str(" (step)"),
            ScheduleKind::Cosine => text.push_str(" (cosine)"),
        }
        parts.push(text);
    }
    if let Some(Job::Distill(DistillJob { distill: d, .. })) = job {
        if d.objective == crate::config::Objective::Logits {
            parts.push("logit matching".into());
        } else {
            parts.push(format!("T = {}", d.temperature));
        }
        parts.push(format!("weights soft {} / hard {}", d.soft_weight, d.hard_weight));
        parts.push(format!("teacher: {}", source(&d.teacher)));
        if let Some(n) = d.translations {
            parts.push(format!("soft targets averaged over the teacher's translations of up to {n} px"));
        }
        if !d.transfer_exclude.is_empty() {
            parts.push(format!("transfer set without classes {:?}", d.transfer_exclude));
        }
        if !d.transfer_only.is_empty() {
            parts.push(format!("transfer set of classes {:?} only", d.transfer_only));
        }
    }
    if let Some(Job::Ensemble(EnsembleJob { members })) = job {
        let members = member_names(members);
        parts.push(format!("mean of the probabilities of {}: {}", members.len(), members.join(", ")));
    }
    if kind == "evaluate" {
        let from = match job {
            Some(Job::Evaluate(EvaluateJob { source: from })) => source(from),
            _ => String::new(),
        };
        parts.push(format!("evaluation of {from}"));
    }
    if kind == "bias_shift" {
        let classes = match job {
            Some(Job::BiasShift(BiasShiftJob { classes, .. })) => format!("{classes:?}"),
            _ => String::new(),
        };
        let how = if row.variant == output::FIXED { "fixed" } else { "chosen on the validation split" };
        let shift = (row.shift.unwrap_or(0.0) * 1e6).round() / 1e6;
        parts.push(format!("bias of classes {classes} shifted by {shift:+} ({how})"));
    }
    if matches!(job, Some(Job::Train(_))) && !regularized {
        parts.insert(0, "hard targets, no regularization".into());
    }
    parts.join(", ")
}

/// The member stages of an ensemble.
fn member_names(members: &[ModelSource]) -> Vec<String> {
    members
        .iter()
        .filter_map(|m| match m {
            ModelSource::Stage(s) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

/// The paper's Table 1 for each ensemble of a run: test accuracy of a single model (the mean
/// over the members, each one baseline model with its own seed), of the ensemble, and of every
/// student distilled from it, with the share of the ensemble's gain over the single model that
/// the student keeps.
fn ensemble_section(md: &mut String, run: &RunFiles) -> Result<()> {
    let accuracy =
        |stage: &str| run.summary.iter().find(|r| r.stage == stage && r.variant.is_empty()).map(|r| r.test_accuracy);
    for row in run.summary.iter().filter(|r| r.kind == "ensemble") {
        let Some(Job::Ensemble(EnsembleJob { members })) = run.stage(&row.stage).map(|s| &s.job) else { continue };
        let members = member_names(members);
        let Some(accs) = members.iter().map(|m| accuracy(m)).collect::<Option<Vec<f64>>>() else { continue };
        if accs.is_empty() {
            continue;
        }
        let (base, _) = mean_sd(&accs);
        let (lo, hi) = accs.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &a| (lo.min(a), hi.max(a)));
        let gain = row.test_accuracy - base;
        let kept = |acc: f64| {
            if gain > 0.0 {
                format!("{:.0}%", 100.0 * (acc - base) / gain)
            } else {
                "– (no gain)".into()
            }
        };
        writeln!(md, "Ensemble `{}` and what distillation keeps of its gain (the paper's Table 1):\n", row.stage)?;
        writeln!(md, "| model | test accuracy | share of the ensemble's gain over a single model |")?;
        writeln!(md, "|---|---|---|")?;
        writeln!(
            md,
            "| single model (mean of the {} members; {:.2}% to {:.2}%) | {:.2}% | 0% |",
            members.len(),
            100.0 * lo,
            100.0 * hi,
            100.0 * base
        )?;
        writeln!(md, "| `{}` ({} members) | {:.2}% | 100% |", row.stage, members.len(), 100.0 * row.test_accuracy)?;
        let students = run.summary.iter().filter(|r| {
            matches!(run.stage(&r.stage).map(|s| &s.job),
                Some(Job::Distill(DistillJob { distill, .. }))
                    if matches!(&distill.teacher, ModelSource::Ensemble { stage, .. } if *stage == row.stage))
        });
        for student in students {
            writeln!(
                md,
                "| `{}` (distilled) | {:.2}% | {} |",
                student.stage,
                100.0 * student.test_accuracy,
                kept(student.test_accuracy)
            )?;
        }
        writeln!(md)?;
    }
    Ok(())
}

/// The paper's Table 5 for a run whose stages train on a fraction of the data: training and
/// test accuracy of each such stage, beside the model trained on all the data that taught the
/// soft-target ones.
fn fraction_section(md: &mut String, run: &RunFiles) -> Result<()> {
    let fraction = |stage: &str| run.stage(stage).and_then(training).map_or(1.0, |t| t.train_fraction);
    let partial: Vec<&SummaryRow> = run.summary.iter().filter(|r| fraction(&r.stage) < 1.0).collect();
    if partial.is_empty() {
        return Ok(());
    }
    let teacher_of = |stage: &str| -> Option<String> {
        match &run.stage(stage)?.job {
            Job::Distill(DistillJob { distill, .. }) => match &distill.teacher {
                ModelSource::Stage(s) => Some(s.clone()),
                _ => None,
            },
            _ => None,
        }
    };
    let mut rows: Vec<&SummaryRow> = Vec::new();
    for r in &partial {
        if let Some(t) = teacher_of(&r.stage).and_then(|t| run.summary.iter().find(|s| s.stage == t)) {
            if !rows.iter().any(|x| x.stage == t.stage) {
                rows.push(t);
            }
        }
    }
    rows.extend(partial.iter().copied());
    writeln!(md, "Training on a fraction of the training data (the paper's Table 5):\n")?;
    writeln!(md, "| model | training data | targets | accuracy on its training examples | test accuracy |")?;
    writeln!(md, "|---|---|---|---|---|")?;
    for r in rows {
        let stage = run.stage(&r.stage);
        let mut targets = match stage.map(|s| &s.job) {
            Some(Job::Distill(DistillJob { distill: d, .. })) => format!(
                "soft targets of `{}` at T = {} (weights soft {} / hard {})",
                teacher_of(&r.stage).unwrap_or_else(|| "a checkpoint".into()),
                d.temperature,
                d.soft_weight,
                d.hard_weight
            ),
            _ => "hard targets".into(),
        };
        if let Some(p) = stage.and_then(training).and_then(|t| t.patience) {
            targets.push_str(&format!(", early stopping (patience {p})"));
        }
        writeln!(
            md,
            "| `{}` | {}% | {targets} | {} | {:.2}% |",
            r.stage,
            100.0 * fraction(&r.stage),
            r.train_accuracy.map_or("–".into(), |a| format!("{:.2}%", 100.0 * a)),
            100.0 * r.test_accuracy
        )?;
    }
    writeln!(md)?;
    fraction_gap(md, run, &partial, &teacher_of)
}

/// The stages of a fraction experiment that differ only in their seed.
struct FractionConfig<'a> {
    /// The stage name, or the sweep's base and temperature.
    label: String,
    rows: Vec<&'a SummaryRow>,
    /// Soft targets (a distill stage) or hard ones.
    soft: bool,
    /// The stage whose soft targets it learned, if a stage of the run.
    teacher: Option<String>,
    fraction: f64,
}

impl FractionConfig<'_> {
    /// Mean validation errors over the seeds, if every seed recorded them.
    fn val_errors(&self) -> Option<f64> {
        let v: Option<Vec<f64>> = self.rows.iter().map(|r| r.val_errors.map(|e| e as f64)).collect();
        v.map(|v| v.iter().sum::<f64>() / v.len() as f64)
    }

    fn test_accuracy(&self) -> f64 {
        self.rows.iter().map(|r| r.test_accuracy).sum::<f64>() / self.rows.len() as f64
    }
}

/// The configuration with the fewest mean validation errors among `configs` passing `keep`.
fn chosen_on_validation<'c, 'a>(
    configs: &'c [FractionConfig<'a>],
    keep: impl Fn(&FractionConfig) -> bool,
) -> Option<&'c FractionConfig<'a>> {
    configs
        .iter()
        .filter(|c| keep(c))
        .filter_map(|c| c.val_errors().map(|v| (v, c)))
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// Table 5's summary: each configuration (seeds averaged), the share of the test-accuracy gap
/// between hard targets on the fraction and the full-data teacher that soft targets recover,
/// `(soft - hard) / (full - hard)`, and the hard and soft configurations chosen on the
/// validation split (fewest mean validation errors), never on the test set.
fn fraction_gap(
    md: &mut String,
    run: &RunFiles,
    partial: &[&SummaryRow],
    teacher_of: &dyn Fn(&str) -> Option<String>,
) -> Result<()> {
    let mut configs: Vec<FractionConfig> = Vec::new();
    for r in partial {
        let Some(stage) = run.stage(&r.stage) else { continue };
        let label = match &stage.sweep {
            Some(p) => match p.temperature {
                Some(t) => format!("{} T={t}", p.base),
                None => p.base.clone(),
            },
            None => r.stage.clone(),
        };
        match configs.iter_mut().find(|c| c.label == label) {
            Some(c) => c.rows.push(r),
            None => configs.push(FractionConfig {
                label,
                rows: vec![r],
                soft: matches!(stage.job, Job::Distill(_)),
                teacher: teacher_of(&r.stage),
                fraction: training(stage).map_or(1.0, |t| t.train_fraction),
            }),
        }
    }
    let full = |c: &FractionConfig| -> Option<f64> {
        let t = c.teacher.as_ref()?;
        run.summary.iter().find(|s| &s.stage == t && s.variant.is_empty()).map(|s| s.test_accuracy)
    };
    let hard_of = |c: &FractionConfig| chosen_on_validation(&configs, |h| !h.soft && h.fraction == c.fraction);
    let share = |c: &FractionConfig| -> Option<f64> {
        let (hard, full) = (hard_of(c)?.test_accuracy(), full(c)?);
        (full > hard).then(|| (c.test_accuracy() - hard) / (full - hard))
    };
    if !configs.iter().any(|c| share(c).is_some()) {
        return Ok(());
    }
    writeln!(md, "By configuration (mean over seeds), with the share of the test-accuracy gap between the hard-target configuration chosen on the validation split and the full-data teacher that each recovers, (soft - hard) / (full - hard):\n")?;
    writeln!(md, "| configuration | training data | seeds | validation errors (mean) | test accuracy (mean; range) | share of the gap |")?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    for c in &configs {
        let accs: Vec<f64> = c.rows.iter().map(|r| r.test_accuracy).collect();
        let (lo, hi) = accs.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &a| (l.min(a), h.max(a)));
        let range =
            if c.rows.len() > 1 { format!("; {:.2}% to {:.2}%", 100.0 * lo, 100.0 * hi) } else { String::new() };
        let targets = match (&c.teacher, c.soft) {
            (_, false) => "hard targets".to_string(),
            (Some(t), true) => format!("soft targets of `{t}`"),
            (None, true) => "soft targets".to_string(),
        };
        writeln!(
            md,
            "| `{}` ({targets}) | {}% | {} | {} | {:.2}%{range} | {} |",
            c.label,
            100.0 * c.fraction,
            c.rows.len(),
            c.val_errors().map_or("–".into(), |v| format!("{v:.0}")),
            100.0 * c.test_accuracy(),
            share(c).map_or("–".into(), |s| format!("{:.0}%", 100.0 * s)),
        )?;
    }
    writeln!(md)?;
    let chosen = chosen_on_validation(&configs, |c| c.soft && full(c).is_some());
    if let Some((soft, hard, full, share)) = chosen.and_then(|c| Some((c, hard_of(c)?, full(c)?, share(c)?))) {
        writeln!(
            md,
            "Chosen on the validation split: `{}` among the hard-target configurations and `{}` among the soft-target ones. \
             Soft targets recover {:.0}% of the gap between hard targets on {}% of the data ({:.2}%) and `{}` on all of it ({:.2}%), \
             at {:.2}% (the paper: 87%, from 44.5% to 57.0% against 58.9%).\n",
            hard.label,
            soft.label,
            100.0 * share,
            100.0 * soft.fraction,
            100.0 * hard.test_accuracy(),
            soft.teacher.as_deref().unwrap_or_default(),
            100.0 * full,
            100.0 * soft.test_accuracy(),
        )?;
    }
    Ok(())
}

/// How closely each distilled student of the runs follows its teacher on the test set: top-1
/// agreement, the errors both make, the student's own, and the teacher's it avoids; and on the
/// transfer set it learned from (a column shown when some row recorded it).
fn fidelity_section(md: &mut String, group: &[&RunFiles]) -> Result<()> {
    let rows: Vec<(&RunFiles, &SummaryRow)> = group
        .iter()
        .flat_map(|run| run.summary.iter().map(move |r| (*run, r)))
        .filter(|(run, r)| r.teacher_agreement.is_some() && run.temperature_point(r).is_none())
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    let recorded = rows.iter().filter(|(_, r)| r.transfer_agreement.is_some()).count();
    let transfer = recorded > 0;
    writeln!(
        md,
        "How closely each distilled student follows its teacher on the test set (top-1 agreement; \
         errors both make; the student's own errors; the teacher's errors the student avoids){}:\n",
        if transfer { ", and on the transfer set it learned from (top-1 agreement, without translations)" } else { "" }
    )?;
    let (extra_head, extra_rule) = if transfer { (" agreement on the transfer set |", "---|") } else { ("", "") };
    writeln!(md, "| run | stage | teacher errors | student errors | agreement | shared | own | avoided |{extra_head}")?;
    writeln!(md, "|---|---|---|---|---|---|---|---|{extra_rule}")?;
    for &(run, r) in &rows {
        let (teacher, shared) = (r.teacher_errors.unwrap_or(0), r.shared_errors.unwrap_or(0));
        let extra = match (transfer, r.transfer_agreement) {
            (false, _) => String::new(),
            (true, Some(a)) => format!(" {:.3}% |", 100.0 * a),
            // Recorded before the column existed.
            (true, None) => " – |".to_string(),
        };
        writeln!(
            md,
            "| {} | {} | {teacher} | {} | {:.2}% | {shared} | {} | {} |{extra}",
            run.name,
            r.stage,
            r.test_errors,
            100.0 * r.teacher_agreement.unwrap_or(0.0),
            r.test_errors - shared,
            teacher - shared,
        )?;
    }
    writeln!(md)?;
    if transfer && recorded < rows.len() {
        writeln!(md, "(–: recorded before the agreement on the transfer set was measured.)\n")?;
    }
    Ok(())
}

/// What each model of a run costs to run beside what it gets right, the trade distillation is
/// for: parameters, multiply-adds per example, inference examples/s at a large batch and the
/// latency of one example (measured on the run's device after the model's evaluation), test
/// accuracy, and each model's multiply-adds and throughput relative to the costliest model's.
/// Not shown for a run whose rows hold no measurement (made before kd-run recorded them).
fn cost_section(md: &mut String, run: &RunFiles) -> Result<()> {
    let measured: Vec<&SummaryRow> = run.summary.iter().filter(|r| r.inference_batch.is_some()).collect();
    let Some(first) = measured.first() else { return Ok(()) };
    let costliest = measured
        .iter()
        .filter(|r| r.macs.is_some())
        .max_by_key(|r| r.macs)
        .filter(|r| r.inference_examples_per_second.is_some_and(|v| v > 0.0));
    let same_batch = measured.iter().all(|r| r.inference_batch == first.inference_batch);
    let same_device = measured.iter().all(|r| r.device == first.device);
    let batch = first.inference_batch.unwrap_or_default();
    writeln!(
        md,
        "What each model costs to run{}: multiply-adds of a forward pass per example (from the layer sizes; an \
         ensemble's are its members' summed, a specialists stage's the generalist's and every specialist's), \
         inference examples per second at {} and the milliseconds of one example alone, without gradients, \
         on the test set's first examples, each the median of a few calls after a warm-up, measured after the \
         model's evaluation{}:\n",
        if same_device { format!(" on {}", run.device_of(&first.device)) } else { String::new() },
        if same_batch { format!("batch {batch}") } else { "a large batch (its size in the column)".into() },
        costliest
            .map_or(String::new(), |c| format!("; the last column compares each with the costliest, `{}`", c.label())),
    )?;
    let mut head =
        vec!["stage", "model", "parameters", "multiply-adds", "examples/s", "ms, one example", "test accuracy"];
    if !same_batch {
        head.insert(4, "batch");
    }
    if !same_device {
        head.push("device");
    }
    if costliest.is_some() {
        head.push("multiply-adds, examples/s vs the costliest");
    }
    writeln!(md, "| {} |", head.join(" | "))?;
    writeln!(md, "|{}", "---|".repeat(head.len()))?;
    let dash = || "–".to_string();
    for r in &run.summary {
        let mut cells = vec![
            r.label(),
            r.model.clone(),
            r.parameters.to_string(),
            r.macs.map_or_else(dash, |m| m.to_string()),
            r.inference_examples_per_second.map_or_else(dash, |v| format!("{v:.0}")),
            r.latency_ms.map_or_else(dash, |v| format!("{v:.3}")),
            format!("{:.2}%", 100.0 * r.test_accuracy),
        ];
        if !same_batch {
            cells.insert(4, r.inference_batch.map_or_else(dash, |b| b.to_string()));
        }
        if !same_device {
            cells.push(run.device_of(&r.device));
        }
        if let Some(c) = costliest {
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
                _ => dash(),
            };
            cells.push(format!(
                "{}, {}",
                ratio(r.macs.map(|m| m as f64), c.macs.map(|m| m as f64)),
                ratio(r.inference_examples_per_second, c.inference_examples_per_second)
            ));
        }
        writeln!(md, "| {} |", cells.join(" | "))?;
    }
    writeln!(md)?;
    if measured.len() < run.summary.len() {
        writeln!(md, "(–: a stage kept from a run made before kd-run measured the cost of inference.)\n")?;
    }
    Ok(())
}

/// The paper's Tables 3 and 4 for a run with a specialists stage: accuracy of the generalist
/// alone and combined with the specialists, on all test examples and on those whose class some
/// specialist covers, and the change in top-1 correct by the number of covering specialists.
fn specialists_section(md: &mut String, run: &RunFiles, plots: &Path, rel: &dyn Fn(&Path) -> String) -> Result<()> {
    for row in run.summary.iter().filter(|r| r.kind == "specialists") {
        let coverage: Vec<&CoverageRow> =
            run.coverage.iter().filter(|c| c.stage == row.stage && c.split == "test").collect();
        let Some(stage) = run.stage(&row.stage) else { continue };
        let Job::Specialists(SpecialistsJob { source: generalist, subsets: subsets_name, top_n, .. }) = &stage.job
        else {
            continue;
        };
        let generalist_name = match generalist {
            ModelSource::Stage(s) => Some(s.as_str()),
            _ => None,
        };
        let specialists: Vec<&SpecialistRow> = run.specialists.iter().filter(|s| s.stage == row.stage).collect();
        let sizes: Vec<i64> = run.subsets.iter().filter(|s| &s.stage == subsets_name).map(|s| s.size).collect();
        if coverage.is_empty() || specialists.is_empty() {
            continue;
        }
        let sum = |f: &dyn Fn(&CoverageRow) -> i64, covered: bool| -> i64 {
            coverage.iter().filter(|c| !covered || c.covering > 0).map(|c| f(c)).sum()
        };
        let pct = |a: i64, b: i64| if b > 0 { format!("{:.2}%", 100.0 * a as f64 / b as f64) } else { "–".into() };
        let (all, covered) = (sum(&|c| c.examples, false), sum(&|c| c.examples, true));
        let paper_of = |name: Option<&str>, key: fn(&PaperFigures) -> Option<f64>, complement: bool| -> String {
            let figure = name.and_then(|n| run.stage(n)).and_then(|s| s.paper.as_ref()).and_then(key);
            figure.map_or("–".into(), |v| format!("{:.1}%", if complement { 100.0 - v } else { v }))
        };
        let (min, max) = (sizes.iter().min().copied().unwrap_or(0), sizes.iter().max().copied().unwrap_or(0));
        writeln!(
            md,
            "Generalist and specialists (the paper's Table 3): {} specialists over subsets of {min} to {max} \
             classes (stage `{subsets_name}`), covering {covered} of the {all} test examples; the combination \
             consults the specialists of the generalist's {} (eq. 5).\n",
            specialists.len(),
            if *top_n == 1 { "top class".to_string() } else { format!("{top_n} most probable classes") }
        )?;
        writeln!(md, "| system | conditional test accuracy | test accuracy | paper: conditional | paper: test |")?;
        writeln!(md, "|---|---|---|---|---|")?;
        writeln!(
            md,
            "| `{}` (generalist) | {} | {} | {} | {} |",
            generalist_name.unwrap_or("generalist"),
            pct(sum(&|c| c.generalist_correct, true), covered),
            pct(sum(&|c| c.generalist_correct, false), all),
            paper_of(generalist_name, |p| p.conditional_accuracy_percent, false),
            paper_of(generalist_name, |p| p.test_error_percent, true),
        )?;
        writeln!(
            md,
            "| `{}` (+ {} specialists) | {} | {} | {} | {} |\n",
            row.stage,
            specialists.len(),
            pct(sum(&|c| c.combined_correct, true), covered),
            pct(sum(&|c| c.combined_correct, false), all),
            paper_of(Some(&row.stage), |p| p.conditional_accuracy_percent, false),
            paper_of(Some(&row.stage), |p| p.test_error_percent, true),
        )?;
        let paper_change: Vec<f64> =
            stage.paper.as_ref().and_then(|p| p.relative_change_percent.clone()).unwrap_or_default();
        let relative = |c: &CoverageRow| {
            (c.generalist_correct > 0)
                .then(|| 100.0 * (c.combined_correct - c.generalist_correct) as f64 / c.generalist_correct as f64)
        };
        writeln!(md, "Test examples by the number of specialists covering their class (the paper's Table 4):\n")?;
        writeln!(
            md,
            "| specialists covering | test examples | consulted | change in top-1 correct | relative change | paper: relative change |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|")?;
        for c in &coverage {
            let paper = paper_change
                .get(c.covering as usize)
                .or(paper_change.last().filter(|_| c.covering as usize >= paper_change.len()));
            writeln!(
                md,
                "| {} | {} | {} | {:+} | {} | {} |",
                c.covering,
                c.examples,
                c.consulted,
                c.combined_correct - c.generalist_correct,
                relative(c).map_or("–".into(), |r| format!("{r:+.1}%")),
                paper.map_or("–".into(), |p| format!("{p:+.1}%"))
            )?;
        }
        writeln!(md)?;
        let validation: Vec<&CoverageRow> =
            run.coverage.iter().filter(|c| c.stage == row.stage && c.split == "validation").collect();
        covering_diagnostics(md, &validation)?;
        let inside: Vec<f64> = specialists.iter().filter_map(|s| s.val_inside_accuracy).collect();
        let seconds: f64 = specialists.iter().map(|s| s.seconds).sum();
        writeln!(
            md,
            "The specialists trained for {:.1} min in all ({:.1} epochs each on average); on the validation examples \
             of their own classes they are right {:.1}% of the time on average (dustbin included as a wrong answer).\n",
            seconds / 60.0,
            specialists.iter().map(|s| s.epochs as f64).sum::<f64>() / specialists.len() as f64,
            100.0 * inside.iter().sum::<f64>() / inside.len().max(1) as f64
        )?;
        let ours: Vec<(f64, f64)> = coverage.iter().filter_map(|c| Some((c.covering as f64, relative(c)?))).collect();
        let mut series = vec![Series { name: format!("{} (ours)", row.stage), points: ours }];
        if !paper_change.is_empty() {
            let points = paper_change.iter().enumerate().map(|(i, p)| (i as f64, *p)).collect();
            series.push(Series { name: "paper (JFT, 61 specialists)".into(), points });
        }
        let path = plots.join(format!("{}-coverage.svg", row.stage));
        let chart = Chart {
            title: "Relative change in top-1 correct by covering specialists",
            x_label: "specialists covering the correct class",
            y_label: "relative change in top-1 correct (%)",
            log_x: false,
            log_y: false,
        };
        draw(md, &path, &chart, &series, "relative change by covering specialists", rel)?;
    }
    Ok(())
}

/// Table 4 on the validation split, with what the covering specialists get right on their
/// own: each (example, covering specialist) pair compared with the generalist seen in that
/// specialist's labels (its subset's classes and a dustbin), and whether 2+ covering
/// specialists agree. Nothing for runs recorded before these columns existed.
fn covering_diagnostics(md: &mut String, rows: &[&CoverageRow]) -> Result<()> {
    if rows.is_empty() || rows.iter().any(|c| c.pairs.is_none()) {
        return Ok(());
    }
    let pct = |a: Option<i64>, b: Option<i64>| match (a, b) {
        (Some(a), Some(b)) if b > 0 => format!("{:.1}%", 100.0 * a as f64 / b as f64),
        _ => "–".into(),
    };
    writeln!(
        md,
        "On the validation split, by the number of specialists covering the true class: the change in top-1 \
         correct, how often a consulted specialist covers the true class, and each covering specialist on its own \
         (right: its top-1 is the true class) against the generalist seen in that specialist's labels (its subset's \
         classes and a dustbin), on all (example, covering specialist) pairs; then whether 2+ covering \
         specialists give the same answer:\n"
    )?;
    writeln!(
        md,
        "| covering | examples | change in top-1 correct | consulted a covering specialist | specialist right | \
         generalist right (its labels) | only the specialist right | only the generalist right | covering agree | \
         agree and wrong |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|")?;
    for c in rows {
        let only = |a: Option<i64>| a.zip(c.both_right).map(|(a, b)| a - b);
        let change = c.combined_correct - c.generalist_correct;
        let relative = if c.generalist_correct > 0 {
            format!("{change:+} ({:+.1}%)", 100.0 * change as f64 / c.generalist_correct as f64)
        } else {
            format!("{change:+}")
        };
        let several = (c.covering >= 2).then_some(c.examples);
        writeln!(
            md,
            "| {} | {} | {relative} | {} | {} | {} | {} | {} | {} | {} |",
            c.covering,
            c.examples,
            pct(c.consulted_covering, Some(c.examples)),
            pct(c.specialist_right, c.pairs),
            pct(c.generalist_right, c.pairs),
            pct(only(c.specialist_right), c.pairs),
            pct(only(c.generalist_right), c.pairs),
            pct(c.covering_agree.filter(|_| c.covering >= 2), several),
            pct(c.covering_agree_wrong.filter(|_| c.covering >= 2), c.covering_agree.filter(|_| c.covering >= 2)),
        )?;
    }
    writeln!(md)?;
    Ok(())
}

/// `stage `x``, `ensemble `x`` or `checkpoint path` from a recorded model source.
fn source(v: &ModelSource) -> String {
    match v {
        ModelSource::Stage(s) => format!("stage `{s}`"),
        ModelSource::Ensemble { stage, .. } => format!("ensemble `{stage}`"),
        ModelSource::Checkpoint(c) => format!("checkpoint `{}`", c.display()),
        ModelSource::PinnedCheckpoint { path, .. } => format!("checkpoint `{}` (SHA-256 pinned)", path.display()),
    }
}

/// The paper's figures of a stage as text.
fn paper(stage: Option<&Stage>, classes: &[i64]) -> String {
    let Some(p) = stage.and_then(|s| s.paper.as_ref()) else { return "–".into() };
    let mut out = Vec::new();
    if let Some(e) = p.test_errors {
        out.push(format!("{e}"));
    }
    if let Some(e) = p.test_error_percent {
        out.push(format!("{e}%"));
    }
    if let Some(e) = p.class_errors {
        out.push(format!("({e} on {})", class_list(classes)));
    }
    if let Some(s) = p.shift {
        out.push(format!("at shift {s:+}"));
    }
    if out.is_empty() {
        "–".into()
    } else {
        out.join(" ")
    }
}

fn class_list(classes: &[i64]) -> String {
    classes.iter().map(|c| format!("{c}s")).collect::<Vec<_>>().join(" and ")
}

/// Ours, as text: test errors, their rate when the paper gives one, and errors on the focus classes.
fn ours(run: &RunFiles, row: &SummaryRow, stage: Option<&Stage>, classes: &[i64]) -> String {
    let mut s = format!("{}", row.test_errors);
    let percent = stage.and_then(|s| s.paper.as_ref()).is_some_and(|p| p.test_error_percent.is_some());
    if percent {
        s = format!("{s} ({:.1}%)", 100.0 * (1.0 - row.test_accuracy));
    }
    if !classes.is_empty() {
        match run.class_errors(row, classes) {
            Some(e) => s.push_str(&format!(" ({e} on {})", class_list(classes))),
            None => s.push_str(&format!(" (on {}: not recorded)", class_list(classes))),
        }
    }
    s
}

/// The sweep point of a stage recorded before stages carried theirs, read from its name
/// `<base>-T<t>[-h<widths>][-s<seed>]` and trusted only where the recorded settings agree (the
/// stage's temperature, hidden widths and seed are those in its name).
fn legacy_sweep_point(stage: &Stage) -> Option<SweepPoint> {
    let Job::Distill(DistillJob { model, training, distill }) = &stage.job else { return None };
    let mut rest = stage.name.as_str();
    let mut point = SweepPoint { base: String::new(), temperature: None, hidden: None, seed: None };
    if let Some((r, seed)) = rest.rsplit_once("-s") {
        if seed.parse::<u64>().is_ok_and(|s| s == training.seed) && seed.bytes().all(|b| b.is_ascii_digit()) {
            (rest, point.seed) = (r, Some(training.seed));
        }
    }
    if let Some((r, widths)) = rest.rsplit_once("-h") {
        let parsed: Option<Vec<i64>> = widths.split('x').map(|w| w.parse().ok()).collect();
        if parsed.as_ref() == Some(&model.hidden) {
            (rest, point.hidden) = (r, parsed);
        }
    }
    let (base, t) = rest.rsplit_once("-T")?;
    point.temperature = Some(t.parse::<f64>().ok().filter(|&t| t == distill.temperature)?);
    point.base = base.to_string();
    Some(point)
}

fn group_key(name: &str) -> String {
    match name.rsplit_once("_s") {
        Some((base, seed)) if !seed.is_empty() && seed.chars().all(|c| c.is_ascii_digit()) => base.to_string(),
        _ => name.to_string(),
    }
}

/// Checks `config.toml` (its text) against the SHA-256 the run recorded in `config.sha256`:
/// `Ok(false)` for a run made before it was recorded, an error naming both files when the
/// configuration was edited after the run, or the record is unreadable.
fn check_config_hash(dir: &Path, text: &str) -> Result<bool> {
    let record = dir.join(CONFIG_HASH);
    let recorded = match std::fs::read_to_string(&record) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && std::fs::symlink_metadata(&record).is_err() => {
            return Ok(false)
        }
        Err(e) => bail!("cannot read {}: {e}", record.display()),
        Ok(t) => t,
    };
    let recorded = recorded.split_whitespace().next().unwrap_or_default().to_ascii_lowercase();
    if recorded.len() != 64 || !recorded.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("{} is not a SHA-256 record (64 hexadecimal digits, then `config.toml`)", record.display());
    }
    let actual = crate::run::provenance::sha256_hex(text.as_bytes());
    if actual != recorded {
        bail!(
            "{} is not the configuration the run used: its SHA-256 is {actual}, the run recorded {recorded} in {} \
             (edited after the run?); restore it, or run the experiment again",
            dir.join("config.toml").display(),
            record.display()
        );
    }
    Ok(true)
}

/// A run's configuration without what tells seeds apart: the run's name and every `seed` key
/// (the experiment's, stages' and sweep points'). Runs of one group agree on the rest.
fn without_seeds(config: &toml::Table) -> toml::Value {
    fn strip(v: &mut toml::Value) {
        match v {
            toml::Value::Table(t) => {
                t.remove("seed");
                t.iter_mut().for_each(|(_, v)| strip(v));
            }
            toml::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut v = toml::Value::Table(config.clone());
    if let toml::Value::Table(t) = &mut v {
        t.remove("name");
    }
    strip(&mut v);
    v
}

/// The first key at which two configurations differ, with both values (`a`'s first), as
/// `stages.<name>.training.epochs`: stages and other named tables in arrays go by name.
fn first_difference(a: &toml::Value, b: &toml::Value, at: &str) -> Option<(String, String, String)> {
    use toml::Value::{Array, Table};
    let join = |key: &str| if at.is_empty() { key.to_string() } else { format!("{at}.{key}") };
    let shown = |v: Option<&toml::Value>| v.map_or("nothing".to_string(), |v| crate::inputs::clip(&v.to_string(), 80));
    match (a, b) {
        (Table(x), Table(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| match (x.get(k), y.get(k)) {
                (Some(v), Some(w)) => first_difference(v, w, &join(k)),
                (v, w) => Some((join(k), shown(v), shown(w))),
            })
        }
        (Array(x), Array(y)) if x.len() == y.len() => x.iter().zip(y).enumerate().find_map(|(i, (v, w))| {
            let name = |t: &toml::Value| t.get("name").and_then(|n| n.as_str()).map(str::to_string);
            let key = match (name(v), name(w)) {
                (Some(m), Some(n)) if m == n => m,
                _ => i.to_string(),
            };
            first_difference(v, w, &join(&key))
        }),
        _ if a == b => None,
        _ => Some((at.to_string(), shown(Some(a)), shown(Some(b)))),
    }
}

/// The runs in groups of seeds: runs named `<base>_s<seed>` whose configurations differ in the
/// seed alone (see [`without_seeds`]). A run of the same base whose configuration differs in
/// more gets a group of its own, with a note naming the first key that differs. Two runs of
/// the same directory, or of the same configuration and seed, are refused: they are not two
/// seeds.
fn group_runs(runs: &[RunFiles]) -> Result<Vec<Group<'_>>> {
    for (i, run) in runs.iter().enumerate() {
        if let Some(other) = runs[..i].iter().find(|o| o.dir == run.dir) {
            bail!(
                "{} and {} are the same run directory ({}): a run given twice would be averaged as two seeds",
                other.given.display(),
                run.given.display(),
                run.dir.display()
            );
        }
        if let Some(other) = runs[..i].iter().find(|o| o.config == run.config) {
            bail!(
                "{} and {} hold runs of the same configuration and seed (a copy?): they are not two seeds; give one",
                other.given.display(),
                run.given.display()
            );
        }
    }
    let mut groups: Vec<Group> = Vec::new();
    for run in runs {
        let key = group_key(&run.name);
        let config = without_seeds(&run.config);
        match groups.iter_mut().find(|g| g.key == key && without_seeds(&g.runs[0].config) == config) {
            Some(g) => g.runs.push(run),
            None => {
                let mut group = Group { title: key.clone(), key, runs: vec![run], note: None };
                if let Some(first) = groups.iter().find(|g| g.key == group.key) {
                    let (at, theirs, ours) =
                        first_difference(&without_seeds(&first.runs[0].config), &config, "").unwrap_or_default();
                    let note = format!(
                        "`{}` is not averaged with `{}` as a seed of `{}`: their configurations differ in `{at}` \
                         ({ours}, not {theirs}), not in the seed alone",
                        run.name, first.runs[0].name, group.key
                    );
                    eprintln!("warning: {note}");
                    group.title = format!("{} ({})", group.key, run.name);
                    group.note = Some(note);
                }
                groups.push(group);
            }
        }
    }
    Ok(groups)
}

/// Runs reported together: seeds of one configuration.
struct Group<'a> {
    /// The name of the runs less their `_s<seed>` suffix.
    key: String,
    /// The section's heading.
    title: String,
    runs: Vec<&'a RunFiles>,
    /// Why the group is not part of an earlier group of the same name.
    note: Option<String>,
}

fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 { xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

/// The folder of a report's plots: `<out>` less its extension, or `<out>.plots` for a file
/// name without one (which would be the report itself).
fn plots_folder(out: &Path) -> PathBuf {
    let stem = out.with_extension("");
    if stem == out || stem.file_name().is_none() {
        let mut name = out.as_os_str().to_owned();
        name.push(".plots");
        PathBuf::from(name)
    } else {
        stem
    }
}

/// `path` made absolute with its links resolved, as far as it exists (the rest appended).
fn resolved(path: &Path) -> Result<PathBuf> {
    let absolute = std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))?;
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(found) = std::fs::canonicalize(existing) {
            return Ok(rest.iter().rev().fold(found, |p: PathBuf, part| p.join(part)));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent;
            }
            _ => return Ok(absolute),
        }
    }
}

/// Refuses a report whose file or plot folder would be in a run directory (a report never
/// writes into one: `--out runs/x/summary.csv` would replace the run's table) or would hold one,
/// and a plot folder holding anything but the charts a report draws.
fn check_destination(out: &Path, plots: &Path, runs: &[RunFiles]) -> Result<()> {
    if out.is_dir() {
        bail!("--out {} is a directory; name the Markdown file to write", out.display());
    }
    let (out_at, plots_at) = (resolved(out)?, resolved(plots)?);
    for run in runs {
        for (what, at, given) in [("--out", &out_at, out), ("the plot folder", &plots_at, plots)] {
            if at.starts_with(&run.dir) {
                bail!(
                    "{what} {} is inside the run directory {}: a report never writes into a run directory; \
                     choose another --out",
                    given.display(),
                    run.dir.display()
                );
            }
        }
        if run.dir.starts_with(&plots_at) {
            bail!(
                "the plot folder {} of --out {} holds the run directory {}; choose another --out",
                plots.display(),
                out.display(),
                run.dir.display()
            );
        }
    }
    let Ok(meta) = std::fs::symlink_metadata(plots) else { return Ok(()) };
    if !meta.is_dir() {
        bail!("the plot folder {} of --out {} is not a folder; choose another --out", plots.display(), out.display());
    }
    for entry in std::fs::read_dir(plots).with_context(|| format!("cannot read {}", plots.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !entry.file_type()?.is_file() || !(name.ends_with(".svg") || output::is_tmp(&name)) {
            bail!(
                "the plot folder {} of --out {} holds {name}, which is no chart of a report; choose another --out",
                plots.display(),
                out.display()
            );
        }
    }
    Ok(())
}

/// Removes the charts of the plot folder the report no longer links to (an earlier report's),
/// and temporary files a killed report left.
fn remove_stale_plots(plots: &Path, md: &str, rel: &dyn Fn(&Path) -> String) -> Result<()> {
    for entry in std::fs::read_dir(plots).with_context(|| format!("cannot read {}", plots.display()))? {
        let path = entry?.path();
        if !md.contains(&format!("]({})", rel(&path))) {
            std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}

/// Writes the report: the Markdown file `--out` (atomically) and its charts in the plot folder
/// beside it ([`plots_folder`]), whose earlier charts it replaces, so that it can be run again
/// into the same `--out`. Never writes into a run directory.
pub fn report(args: &ReportArgs) -> Result<()> {
    let runs: Vec<RunFiles> = args.runs.iter().map(|d| RunFiles::read(d)).collect::<Result<_>>()?;
    let groups = group_runs(&runs)?;
    let plots_dir = plots_folder(&args.out);
    check_destination(&args.out, &plots_dir, &runs)?;
    std::fs::create_dir_all(&plots_dir).with_context(|| format!("cannot create {}", plots_dir.display()))?;
    let rel = |p: &Path| -> String {
        let base = args.out.parent().unwrap_or(Path::new(""));
        p.strip_prefix(base).unwrap_or(p).display().to_string()
    };
    let mut md = String::new();
    // As typed, global options (`-q`) included: the subcommand is not always the first argument.
    let command = output::command_line("kd-run", std::env::args_os().skip(1));
    writeln!(md, "# {}\n", args.title)?;
    writeln!(
        md,
        "Generated by `{}` from the runs' CSV files; every number below comes from those files. \
         Nothing was selected on the test set: bias shifts are chosen on validation splits.\n",
        command
    )?;

    for Group { title, runs: group, note, .. } in &groups {
        let first = group[0];
        writeln!(md, "## {title}\n")?;
        if let Some(note) = note {
            writeln!(md, "> {note}.\n")?;
        }
        if !first.description.is_empty() {
            writeln!(md, "{}\n", first.description)?;
        }
        writeln!(md, "Produced by:\n\n```sh")?;
        for run in group {
            writeln!(md, "{}", run.command)?;
        }
        writeln!(md, "```\n")?;
        for run in group {
            writeln!(md, "{}  ", run.where_and_how_long())?;
        }
        writeln!(md)?;
        for run in group {
            for note in &run.missing {
                writeln!(md, "> Missing from `{}`: {note}.\n", run.name)?;
            }
        }
        if group.len() > 1 {
            seeds_table(&mut md, group)?;
        } else {
            runs_table(&mut md, first)?;
        }
        fidelity_section(&mut md, group)?;
        targets::section(&mut md, &group.iter().map(|r| (r.name.as_str(), &r.targets)).collect::<Vec<_>>())?;
        for run in group.iter().take(1) {
            cost_section(&mut md, run)?;
            sweep_section(&mut md, run, &plots_dir, &rel)?;
            ensemble_section(&mut md, run)?;
            fraction_section(&mut md, run)?;
            specialists_section(&mut md, run, &plots_dir, &rel)?;
        }
        curves_plot(&mut md, first, &plots_dir, &rel)?;
    }
    output::write_atomic(&args.out, md.as_bytes())?;
    remove_stale_plots(&plots_dir, &md, &rel)?;
    eprintln!("wrote {} and its plots in {}", args.out.display(), plots_dir.display());
    Ok(())
}

fn runs_table(md: &mut String, run: &RunFiles) -> Result<()> {
    if run.summary.iter().all(|r| run.temperature_point(r).is_some()) {
        return Ok(());
    }
    writeln!(
        md,
        "| stage | model | setup | test errors (ours{}) | paper | validation errors |",
        run.test_examples().map_or(String::new(), |n| format!(", of {n}"))
    )?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    for row in run.summary.iter().filter(|r| run.temperature_point(r).is_none()) {
        let stage = run.stage(&row.stage);
        let classes = focus_classes(stage);
        let paper_text = if row.variant == output::FIXED || row.kind != "bias_shift" {
            paper(stage, &classes)
        } else {
            "–".into()
        };
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            row.label(),
            row.model,
            setup(stage, row),
            ours(run, row, stage, &classes),
            paper_text,
            row.val_errors.map_or("–".into(), |v| v.to_string())
        )?;
    }
    writeln!(md)?;
    Ok(())
}

/// One row per stage of a group of seeds: each seed's test errors, their mean and standard
/// deviation (none for a stage that only one seed ran) and, where the runs have a validation
/// split, each seed's validation errors.
fn seeds_table(md: &mut String, group: &[&RunFiles]) -> Result<()> {
    let validation = group.iter().any(|r| r.summary.iter().any(|s| s.val_errors.is_some()));
    let (val_head, val_rule) = if validation { (" validation errors per seed |", "---|") } else { ("", "") };
    writeln!(
        md,
        "| stage | model | setup | test errors per seed{} | mean ± sd | paper |{val_head}",
        group[0].test_examples().map_or(String::new(), |n| format!(" (of {n})"))
    )?;
    writeln!(md, "|---|---|---|---|---|---|{val_rule}")?;
    for row in &group[0].summary {
        let stage = group[0].stage(&row.stage);
        let rows: Vec<&SummaryRow> = group
            .iter()
            .filter_map(|r| r.summary.iter().find(|s| (&s.stage, &s.variant) == (&row.stage, &row.variant)))
            .collect();
        let counts: Vec<f64> = rows.iter().map(|s| s.test_errors as f64).collect();
        let (mean, sd) = mean_sd(&counts);
        let spread = match counts.len() {
            1 => format!("{mean:.1} (n = 1)"),
            n => format!("{mean:.1} ± {sd:.1} (n = {n})"),
        };
        let list = |cell: &dyn Fn(&SummaryRow) -> String| rows.iter().map(|s| cell(s)).collect::<Vec<_>>().join(", ");
        let val_cell = if validation {
            format!(" {} |", list(&|s| s.val_errors.map_or("–".into(), |v| v.to_string())))
        } else {
            String::new()
        };
        writeln!(
            md,
            "| {} | {} | {} | {} | {spread} | {} |{val_cell}",
            row.label(),
            row.model,
            setup(stage, row),
            list(&|s| s.test_errors.to_string()),
            paper(stage, &focus_classes(stage))
        )?;
    }
    writeln!(md)?;
    Ok(())
}

/// A sweep's student size: the hidden widths as numbers (the sort key), then as written.
type Widths = (Vec<i64>, String);

/// A table of test errors by temperature and student size for each sweep over temperatures (and
/// a plot). A stage swept over seeds too has one count per seed in its cell, and its mean in
/// the plot.
fn sweep_section(md: &mut String, run: &RunFiles, plots: &Path, rel: &dyn Fn(&Path) -> String) -> Result<()> {
    // base -> widths -> T -> errors per seed; widths in numeric order (30x30 before 300x300)
    type Points = Vec<(f64, Vec<i64>)>;
    let mut sweeps: BTreeMap<String, BTreeMap<Widths, Points>> = BTreeMap::new();
    for row in &run.summary {
        if let Some((base, t, hidden, _)) = run.temperature_point(row) {
            let text = hidden.iter().map(i64::to_string).collect::<Vec<_>>().join("x");
            let points = sweeps.entry(base).or_default().entry((hidden, text)).or_default();
            match points.iter_mut().find(|(pt, _)| *pt == t) {
                Some((_, errors)) => errors.push(row.test_errors),
                None => points.push((t, vec![row.test_errors])),
            }
        }
    }
    for (base, by_size) in &sweeps {
        let mut temps: Vec<f64> = by_size.values().flatten().map(|(t, _)| *t).collect();
        temps.sort_by(f64::total_cmp);
        temps.dedup();
        let seeds = by_size.values().flatten().any(|(_, e)| e.len() > 1);
        writeln!(
            md,
            "Test errors of `{base}` by temperature (rows) and hidden layers (columns){}:\n",
            if seeds { ", one count per seed" } else { "" }
        )?;
        writeln!(md, "| T | {} |", by_size.keys().map(|(_, w)| w.as_str()).collect::<Vec<_>>().join(" | "))?;
        writeln!(md, "|---|{}", "---|".repeat(by_size.len()))?;
        let mean = |e: &[i64]| e.iter().sum::<i64>() as f64 / e.len() as f64;
        for t in &temps {
            let cells: Vec<String> = by_size
                .values()
                .map(|pts| {
                    pts.iter()
                        .find(|(pt, _)| pt == t)
                        .map_or("–".into(), |(_, e)| e.iter().map(i64::to_string).collect::<Vec<_>>().join(", "))
                })
                .collect();
            writeln!(md, "| {t} | {} |", cells.join(" | "))?;
        }
        let series: Vec<Series> = by_size
            .iter()
            .map(|((_, w), pts)| {
                let mut points: Vec<(f64, f64)> = pts.iter().map(|(t, e)| (*t, mean(e))).collect();
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                Series { name: format!("hidden {w}"), points }
            })
            .collect();
        let path = plots.join(format!("{base}-temperature.svg"));
        let chart = Chart {
            title: &format!("{base}: test errors vs temperature"),
            x_label: "temperature T",
            y_label: "test errors",
            log_x: true,
            log_y: true,
        };
        writeln!(md)?;
        draw(md, &path, &chart, &series, &format!("{base}: test errors vs temperature"), rel)?;
    }
    Ok(())
}

fn curves_plot(md: &mut String, run: &RunFiles, plots: &Path, rel: &dyn Fn(&Path) -> String) -> Result<()> {
    let mut by_stage: Vec<(String, Vec<&MetricsRow>)> = Vec::new();
    for m in &run.metrics {
        match by_stage.iter_mut().find(|(s, _)| *s == m.stage) {
            Some((_, v)) => v.push(m),
            None => by_stage.push((m.stage.clone(), vec![m])),
        }
    }
    if by_stage.is_empty() || by_stage.len() > 8 {
        return Ok(());
    }
    let validation = by_stage.iter().all(|(_, rows)| rows.iter().all(|r| r.val_accuracy.is_some()));
    let series: Vec<Series> = by_stage
        .iter()
        .map(|(stage, rows)| Series {
            name: stage.clone(),
            points: rows
                .iter()
                .map(|r| {
                    (
                        r.epoch as f64,
                        if validation {
                            100.0 * (1.0 - r.val_accuracy.unwrap_or(0.0))
                        } else {
                            100.0 * (1.0 - r.train_accuracy)
                        },
                    )
                })
                .collect(),
        })
        .collect();
    let what = if validation { "validation error (%)" } else { "training error during the epoch (%)" };
    let path = plots.join(format!("{}-curves.svg", run.name));
    let chart = Chart {
        title: &format!("{}: {what} per epoch", run.name),
        x_label: "epoch",
        y_label: what,
        log_x: false,
        log_y: false,
    };
    draw(md, &path, &chart, &series, &format!("{}: training curves", run.name), rel)
}

/// Draws `series` into `path` and links the chart from the report. Points a chart cannot show
/// (values read off disk may be anything: not finite, beyond ±1e300, not positive on a log
/// axis) are left out with a note saying how many; with none left, the note replaces the chart.
fn draw(
    md: &mut String,
    path: &Path,
    chart: &Chart,
    series: &[Series],
    alt: &str,
    rel: &dyn Fn(&Path) -> String,
) -> Result<()> {
    let (drawn, skipped) = plot::drawable_series(chart, series);
    let why = format!(
        "not finite, beyond ±{:e}{}",
        plot::MAX_MAGNITUDE,
        if chart.log_x || chart.log_y { ", or not positive on a log axis" } else { "" }
    );
    if drawn.is_empty() {
        writeln!(md, "> No chart of {alt}: none of its {skipped} values can be drawn ({why}).\n")?;
        return Ok(());
    }
    plot::line_chart(path, chart, &drawn)?;
    writeln!(md, "![{alt}]({})\n", rel(path))?;
    if skipped > 0 {
        writeln!(md, "> {skipped} of the chart's values are not drawn ({why}).\n")?;
    }
    Ok(())
}

/// The command that reproduces a whole run, from the one that last ran it (`command.txt`):
/// without the options that only say where the files go or which stages that invocation ran
/// (`--out`, `--fresh`, `--only`, `--redo`), none of which changes a result. The other words are
/// kept as written, quotes included.
fn reproducing_command(command: &str) -> String {
    // Words, with a single-quoted one (as `output::command_line` writes an argument a shell would
    // split or expand) kept whole.
    let mut words = vec![String::new()];
    let mut quoted = false;
    let mut chars = command.chars();
    while let Some(c) = chars.next() {
        let word = words.last_mut().expect("starts with one word");
        if c == '\\' && !quoted {
            // An escaped character (as in `'\''`, a quote inside a quoted word) is kept as it is.
            word.push(c);
            word.extend(chars.next());
            continue;
        }
        if c == ' ' && !quoted {
            words.push(String::new());
            continue;
        }
        quoted ^= c == '\'';
        word.push(c);
    }
    let mut kept = Vec::new();
    let mut words = words.into_iter().filter(|w| !w.is_empty());
    while let Some(w) = words.next() {
        match w.as_str() {
            "--fresh" => {}
            "--out" | "--only" | "--redo" => {
                words.next();
            }
            _ if ["--out=", "--only=", "--redo="].iter().any(|p| w.starts_with(p)) => {}
            _ => kept.push(w),
        }
    }
    kept.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reproducing_command_drops_where_the_files_went_and_which_stages_ran() {
        let as_run = "kd-run run a.toml --out /root/out/g --set peak=790 --fresh --only s --redo=t --set 'name=a b'";
        assert_eq!(reproducing_command(as_run), "kd-run run a.toml --set peak=790 --set 'name=a b'");
        assert_eq!(reproducing_command("kd-run run a.toml"), "kd-run run a.toml");
        let quote = "kd-run report --title 'the teacher'\\''s run' --out x.md runs/a";
        assert_eq!(reproducing_command(quote), "kd-run report --title 'the teacher'\\''s run' runs/a");
        assert_eq!(reproducing_command(""), "");
    }

    /// A distilled stage's summary row with `test_errors`; fidelity columns empty.
    fn summary_row(stage: &str, test_errors: i64) -> SummaryRow {
        SummaryRow {
            stage: stage.into(),
            variant: String::new(),
            kind: "distill".into(),
            model: "mlp 2-2".into(),
            parameters: 6,
            val_errors: None,
            test_errors,
            test_accuracy: 1.0 - test_errors as f64 / 100.0,
            shift: None,
            seconds: 1.0,
            device: String::new(),
            train_accuracy: None,
            teacher_agreement: None,
            teacher_errors: None,
            shared_errors: None,
            transfer_agreement: None,
            macs: None,
            inference_batch: None,
            inference_examples_per_second: None,
            latency_ms: None,
        }
    }

    /// The resolved experiment of an experiment file's text: MNIST data, a train stage `teacher`,
    /// then `stages` (TOML of `[[stages]]` tables).
    fn experiment(stages: &str) -> Experiment {
        let text = format!(
            "name = \"r\"\n[data]\ndir = \"/d\"\nvalidation = 10\n[defaults]\nepochs = 1\nbatch_size = 2\n\
             optimizer = {{ kind = \"sgd\", lr = 0.1 }}\n\
             [[stages]]\nname = \"teacher\"\nkind = \"train\"\nmodel = {{ hidden = [4] }}\n{stages}"
        );
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = crate::testutil::TempDir::new(&format!("report-experiment-{call}"));
        let path = dir.write("e.toml", text.as_bytes());
        crate::config::load(&path, &[]).unwrap()
    }

    /// A run named `r` with these summary rows and nothing else.
    fn run(summary: Vec<SummaryRow>) -> RunFiles {
        RunFiles {
            given: PathBuf::from("runs/r"),
            dir: PathBuf::from("/runs/r"),
            config: toml::Table::new(),
            name: "r".into(),
            description: String::new(),
            command: String::new(),
            stages: vec![],
            precision: Precision::F32,
            logged_device: None,
            summary,
            class_errors: vec![],
            metrics: vec![],
            subsets: vec![],
            specialists: vec![],
            coverage: vec![],
            targets: Default::default(),
            missing: vec![],
        }
    }

    /// A run `name` in `/runs/<dir>` of `experiment("")` with its seed and the first stage's
    /// epochs set.
    fn configured(dir: &str, name: &str, seed: u64, epochs: i64) -> RunFiles {
        let mut exp = experiment("");
        (exp.name, exp.seed) = (name.into(), seed);
        for stage in &mut exp.stages {
            if let Job::Train(TrainJob { training, .. }) = &mut stage.job {
                (training.seed, training.epochs) = (seed * 7, epochs);
            }
        }
        let mut r = run(vec![summary_row("teacher", 10)]);
        (r.name, r.dir, r.config) =
            (name.into(), PathBuf::from("/runs").join(dir), exp.to_toml().unwrap().parse().unwrap());
        r
    }

    #[test]
    fn seeds_are_averaged_only_when_their_configurations_differ_in_the_seed_alone() {
        let runs = [
            configured("x_s1", "x_s1", 1, 1),
            configured("x_s2", "x_s2", 2, 1),
            configured("x_s3", "x_s3", 3, 7),
            configured("x_s4", "x_s4", 4, 7),
            configured("y", "y", 1, 1),
        ];
        let groups = group_runs(&runs).unwrap();
        let names = |g: &Group| g.runs.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
        assert_eq!(
            groups.iter().map(names).collect::<Vec<_>>(),
            [vec!["x_s1", "x_s2"], vec!["x_s3", "x_s4"], vec!["y"]]
        );
        assert_eq!(groups[1].title, "x (x_s3)");
        let note = groups[1].note.as_deref().unwrap();
        assert!(note.contains("`stages.teacher.training.epochs` (7, not 1)"), "{note}");
        assert!(groups[0].note.is_none() && groups[2].note.is_none());
    }

    #[test]
    fn a_run_given_twice_or_copied_is_not_two_seeds() {
        let twice = [configured("x_s1", "x_s1", 1, 1), configured("x_s1", "x_s1", 1, 1)];
        let err = format!("{:#}", group_runs(&twice).err().unwrap());
        assert!(err.contains("same run directory") && err.contains("/runs/x_s1"), "{err}");
        let copied = [configured("x_s1", "x_s1", 1, 1), configured("copy", "x_s1", 1, 1)];
        let err = format!("{:#}", group_runs(&copied).err().unwrap());
        assert!(err.contains("same configuration and seed"), "{err}");
    }

    #[test]
    fn a_config_toml_edited_after_the_run_is_refused() {
        let temp = crate::testutil::TempDir::new("report-config-hash");
        let dir = &temp.0;
        let text = "name = \"r\"\n";
        // A run made before the hash was recorded: not checked, and said so.
        assert!(!check_config_hash(dir, text).unwrap());
        let hash = crate::run::provenance::sha256_hex(text.as_bytes());
        temp.write(CONFIG_HASH, format!("{hash}  config.toml\n").as_bytes());
        assert!(check_config_hash(dir, text).unwrap());
        let err = format!("{:#}", check_config_hash(dir, "name = \"edited\"\n").unwrap_err());
        assert!(err.contains("config.toml is not the configuration the run used") && err.contains(&hash), "{err}");
        temp.write(CONFIG_HASH, b"not a hash\n");
        assert!(format!("{:#}", check_config_hash(dir, text).unwrap_err()).contains("not a SHA-256 record"));
        std::fs::remove_file(dir.join(CONFIG_HASH)).unwrap();
        std::fs::create_dir(dir.join(CONFIG_HASH)).unwrap();
        assert!(format!("{:#}", check_config_hash(dir, text).unwrap_err()).contains("cannot read"));
    }

    #[test]
    fn a_report_never_writes_into_a_run_directory_and_keeps_its_plot_folder_its_own() {
        let temp = crate::testutil::TempDir::new("report-destination");
        let root = std::fs::canonicalize(&temp.0).unwrap();
        std::fs::create_dir_all(root.join("runs/r")).unwrap();
        let mut r = run(vec![]);
        r.dir = root.join("runs/r");
        let runs = [r];
        let check = |out: &str| check_destination(&root.join(out), &plots_folder(&root.join(out)), &runs);
        for (out, want) in [
            ("runs/r/summary.csv", "inside the run directory"),
            ("runs/r", "is a directory"),
            ("runs/r/new/report.md", "inside the run directory"),
            ("runs.md", "holds the run directory"),
        ] {
            let err = format!("{:#}", check(out).unwrap_err());
            assert!(err.contains(want), "{out}: {err}");
        }
        // A Markdown file without an extension gets `<name>.plots`, not a folder of its own name.
        assert_eq!(plots_folder(Path::new("a/report")), Path::new("a/report.plots"));
        assert_eq!(plots_folder(Path::new("a/report.md")), Path::new("a/report"));
        check("out/report").unwrap();
        // A plot folder of charts is the report's own; one with anything else is not.
        std::fs::create_dir_all(root.join("out/report")).unwrap();
        std::fs::write(root.join("out/report/a.svg"), "<svg/>").unwrap();
        check("out/report.md").unwrap();
        std::fs::write(root.join("out/report/notes.txt"), "mine").unwrap();
        assert!(format!("{:#}", check("out/report.md").unwrap_err()).contains("notes.txt"));
    }

    #[test]
    fn the_cost_table_sets_each_model_against_the_costliest_and_marks_what_was_not_measured() {
        let measured = |stage: &str, errors: i64, macs: i64, per_second: f64, ms: f64| SummaryRow {
            kind: "train".into(),
            device: "cpu (2 threads)".into(),
            macs: Some(macs),
            inference_batch: Some(1024),
            inference_examples_per_second: Some(per_second),
            latency_ms: Some(ms),
            ..summary_row(stage, errors)
        };
        let ensemble = SummaryRow { kind: "ensemble".into(), ..measured("ensemble", 9, 400, 2000.0, 0.5) };
        let student = measured("student", 10, 100, 10000.0, 0.125);
        let mut md = String::new();
        cost_section(&mut md, &run(vec![ensemble.clone(), student.clone()])).unwrap();
        assert!(md.starts_with("What each model costs to run on cpu (2 threads): "), "{md}");
        assert!(md.contains("at batch 1024") && md.contains("costliest, `ensemble`"), "{md}");
        assert!(md.contains("| ensemble | mlp 2-2 | 6 | 400 | 2000 | 0.500 | 91.00% | 1.00x, 1.00x |"), "{md}");
        assert!(md.contains("| student | mlp 2-2 | 6 | 100 | 10000 | 0.125 | 90.00% | 0.25x, 5.00x |"), "{md}");
        assert!(!md.contains("| batch |") && !md.contains("| device |") && !md.contains("(–:"), "{md}");
        // A row kept from an older run has dashes; another batch and device get their columns.
        let old = summary_row("old", 20);
        let gpu = SummaryRow { device: "cuda:0".into(), inference_batch: Some(512), ..student };
        let mut md = String::new();
        cost_section(&mut md, &run(vec![ensemble, gpu, old])).unwrap();
        assert!(md.contains("| stage | model | parameters | multiply-adds | batch | examples/s |"), "{md}");
        assert!(md.contains("| student | mlp 2-2 | 6 | 100 | 512 | 10000 | 0.125 | 90.00% | cuda:0 | 0.25x, 5.00x |"));
        assert!(md.contains("| old | mlp 2-2 | 6 | – | – | – | – | 80.00% | an unrecorded device | –, – |"), "{md}");
        assert!(md.contains("(–: a stage kept from a run made before"), "{md}");
        // A run without any measurement: no table (the report says so among what the run lacks).
        let mut md = String::new();
        cost_section(&mut md, &run(vec![summary_row("a", 1)])).unwrap();
        assert!(md.is_empty(), "{md}");
    }

    #[test]
    fn a_report_says_which_files_a_run_lacks_instead_of_leaving_gaps() {
        let temp = crate::testutil::TempDir::new("report-gaps");
        let dir = temp.0.clone();
        let run_dir = dir.join("r");
        std::fs::create_dir_all(&run_dir).unwrap();
        let config = experiment(
            "[[stages]]\nname = \"a\"\nkind = \"train\"\nmodel = { hidden = [4] }\n\
             [[stages]]\nname = \"b\"\nkind = \"bias_shift\"\nfrom = \"a\"\nclasses = [3]\n\
             shifts = { min = 0.0, max = 1.0, step = 0.5 }\n",
        );
        std::fs::write(run_dir.join("config.toml"), config.to_toml().unwrap()).unwrap();
        output::write_csv(&run_dir.join("summary.csv"), &[summary_row("a", 12), summary_row("b", 11)]).unwrap();
        // A row of `b` that a killed run was committing: `done.csv` names only `a`.
        output::write_csv(&run_dir.join("done.csv"), &[output::DoneRow { stage: "a".into() }]).unwrap();
        std::fs::write(run_dir.join("metrics.csv"), "").unwrap();
        let out = dir.join("report.md");
        let args = ReportArgs { out: out.clone(), title: "t".into(), runs: vec![run_dir.clone()] };
        report(&args).unwrap();
        let md = std::fs::read_to_string(&out).unwrap();
        assert!(!md.contains("of 0"), "{md}");
        assert!(md.contains("test errors (ours) |"), "{md}");
        assert!(md.contains("`class_errors.csv` is missing"), "{md}");
        assert!(md.contains("`metrics.csv` has no rows: no training curves"), "{md}");
        assert!(md.contains("stage `b` is not finished"), "{md}");
        assert!(md.contains("`summary.csv` has no inference measurements"), "{md}");
        assert!(md.contains("| a |") && !md.contains("| b |"), "{md}");
    }

    #[test]
    fn the_setup_names_the_distillation_settings_and_translation_averaging_only_when_set() {
        let stage = |extra: &str| -> Stage {
            let e = experiment(&format!(
                "[[stages]]\nname = \"student\"\nkind = \"distill\"\nteacher = \"teacher\"\nmodel = {{ hidden = [2] }}\n\
                 temperature = 20.0\nsoft_weight = 0.9\nhard_weight = 0.1\n{extra}\n"
            ));
            e.stages[1].clone()
        };
        let row = summary_row("student", 80);
        let plain = setup(Some(&stage("")), &row);
        assert!(plain.contains("T = 20, weights soft 0.9 / hard 0.1, teacher: stage `teacher`"), "{plain}");
        assert!(!plain.contains("translations"), "{plain}");
        let averaged = setup(Some(&stage("teacher_translations = 2")), &row);
        assert!(averaged.contains("averaged over the teacher's translations of up to 2 px"), "{averaged}");
    }

    /// The temperature tables of a run of the teacher and the stages of `sweep` (TOML of
    /// `[[stages]]` tables), each with `errors(name)` test errors.
    fn sweep_tables(sweep: &str, errors: &dyn Fn(&str) -> i64) -> String {
        let exp = experiment(sweep);
        let rows = exp.stages.iter().map(|s| summary_row(&s.name, errors(&s.name))).collect();
        let run = RunFiles { stages: exp.stages, ..run(rows) };
        let dir = crate::testutil::TempDir::new(&format!("report-sweep-{}", run.stages[1].name));
        let mut md = String::new();
        sweep_section(&mut md, &run, &dir.0, &|p: &Path| p.display().to_string()).unwrap();
        md
    }

    const STUDENT: &str = "[[stages]]\nname = \"s\"\nkind = \"distill\"\nteacher = \"teacher\"\n\
                           model = { hidden = [7] }\ntemperature = 1\n";

    #[test]
    fn the_temperature_table_orders_student_sizes_by_width_not_as_text() {
        let sweep =
            format!("{STUDENT}sweep = {{ temperature = [1, 2.5], hidden = [[800, 800], [30, 30], [300, 300]] }}\n");
        let width = |name: &str| ["800x800", "30x30", "300x300"].iter().position(|w| name.ends_with(w));
        let md = sweep_tables(&sweep, &|name| {
            let i = width(name).map_or(0, |i| 10 * (i as i64 + 1));
            i + i64::from(name.contains("T2.5"))
        });
        assert!(md.contains("| T | 30x30 | 300x300 | 800x800 |\n"), "{md}");
        assert!(md.contains("| 1 | 20 | 30 | 10 |\n| 2.5 | 21 | 31 | 11 |\n"), "{md}");
    }

    #[test]
    fn a_sweep_over_seeds_keeps_the_widths_and_gives_each_seed_its_count() {
        let sweep = format!("{STUDENT}sweep = {{ temperature = [2, 4], hidden = [[8], [4]], seed = [1, 2] }}\n");
        let md = sweep_tables(&sweep, &|name| {
            let t = if name.contains("-T4") { 100 } else { 0 };
            let h = if name.contains("-h8") { 10 } else { 0 };
            t + h + i64::from(name.ends_with("-s2"))
        });
        assert!(md.contains("by temperature (rows) and hidden layers (columns), one count per seed:"), "{md}");
        assert!(md.contains("| T | 4 | 8 |\n"), "the widths are not taken for `4-s1`, `4-s2`: {md}");
        assert!(md.contains("| 2 | 0, 1 | 10, 11 |\n| 4 | 100, 101 | 110, 111 |\n"), "{md}");
    }

    #[test]
    fn a_sweep_over_temperatures_alone_gets_a_table_with_the_stage_s_widths() {
        let md = sweep_tables(&format!("{STUDENT}sweep = {{ temperature = [1, 3] }}\n"), &|name| {
            if name.ends_with("-T3") {
                13
            } else {
                11
            }
        });
        assert!(md.contains("Test errors of `s` by temperature (rows) and hidden layers (columns):\n"), "{md}");
        assert!(md.contains("| T | 7 |\n|---|---|\n| 1 | 11 |\n| 3 | 13 |\n"), "{md}");
    }

    #[test]
    fn the_fidelity_table_counts_own_and_avoided_errors_and_shows_the_transfer_column_once_recorded() {
        let row = |stage: &str, transfer: Option<f64>| SummaryRow {
            teacher_agreement: Some(0.95),
            teacher_errors: Some(7),
            shared_errors: Some(5),
            transfer_agreement: transfer,
            ..summary_row(stage, 9)
        };
        let table = |r: &RunFiles| {
            let mut md = String::new();
            fidelity_section(&mut md, &[r]).unwrap();
            md
        };
        // Own errors: 9 - 5 shared; avoided: the teacher's 7 - 5.
        let old = table(&run(vec![row("a", None)]));
        assert!(old.contains("| r | a | 7 | 9 | 95.00% | 5 | 4 | 2 |\n"), "{old}");
        assert!(!old.contains("transfer"), "no column when no row recorded it: {old}");
        let mixed = table(&run(vec![row("a", None), row("b", Some(0.99875))]));
        assert!(mixed.contains("| r | a | 7 | 9 | 95.00% | 5 | 4 | 2 | – |\n"), "{mixed}");
        assert!(mixed.contains("| r | b | 7 | 9 | 95.00% | 5 | 4 | 2 | 99.875% |\n"), "{mixed}");
        assert!(mixed.contains("(–: recorded before"), "{mixed}");
        let new = table(&run(vec![row("b", Some(0.5))]));
        assert!(new.contains("| 50.000% |") && !new.contains("(–:"), "{new}");
    }

    #[test]
    fn table_5_chooses_on_validation_and_measures_the_gap_the_soft_targets_recover() {
        let exp = experiment(
            "[[stages]]\nname = \"hard\"\nkind = \"train\"\nmodel = { hidden = [4] }\ntrain_fraction = 0.03\n\
             sweep = { seed = [1, 2] }\n\
             [[stages]]\nname = \"soft\"\nkind = \"distill\"\nteacher = \"teacher\"\nmodel = { hidden = [4] }\n\
             train_fraction = 0.03\ntemperature = 1\nsweep = { temperature = [2, 5], seed = [1, 2] }\n",
        );
        // (test errors of 100, validation errors): T = 5 is better on validation, T = 2 on test.
        let errors = |name: &str| match name {
            "teacher" => (20, 20),
            n if n.starts_with("hard") => (if n.ends_with("s1") { 60 } else { 40 }, 50),
            n if n.contains("-T2") => (25, 35),
            _ => (30, 31),
        };
        let rows = exp
            .stages
            .iter()
            .map(|s| {
                let (test, val) = errors(&s.name);
                SummaryRow { val_errors: Some(val), ..summary_row(&s.name, test) }
            })
            .collect();
        let run = RunFiles { stages: exp.stages, ..run(rows) };
        let mut md = String::new();
        fraction_section(&mut md, &run).unwrap();
        assert!(md.contains("| `hard` (hard targets) | 3% | 2 | 50 | 50.00%; 40.00% to 60.00% | – |\n"), "{md}");
        // The gap is 80% - 50%: T = 2 recovers 25 of its 30 points, T = 5 20 of them.
        assert!(
            md.contains("| `soft T=2` (soft targets of `teacher`) | 3% | 2 | 35 | 75.00%; 75.00% to 75.00% | 83% |\n"),
            "{md}"
        );
        assert!(
            md.contains("| `soft T=5` (soft targets of `teacher`) | 3% | 2 | 31 | 70.00%; 70.00% to 70.00% | 67% |\n"),
            "{md}"
        );
        assert!(
            md.contains("`hard` among the hard-target configurations and `soft T=5` among the soft-target ones"),
            "{md}"
        );
        assert!(
            md.contains("Soft targets recover 67% of the gap between hard targets on 3% of the data (50.00%)"),
            "{md}"
        );
        // Without a teacher among the run's stages there is no gap to measure.
        let mut md = String::new();
        let alone = RunFiles { summary: run.summary.iter().filter(|r| r.stage != "teacher").cloned().collect(), ..run };
        fraction_section(&mut md, &alone).unwrap();
        assert!(!md.contains("share of the gap"), "{md}");
    }

    #[test]
    fn the_seeds_table_gives_each_seed_its_counts_and_no_spread_for_a_single_seed() {
        let with_val =
            |stage: &str, test: i64, val: Option<i64>| SummaryRow { val_errors: val, ..summary_row(stage, test) };
        let table = |group: &[&RunFiles]| {
            let mut md = String::new();
            seeds_table(&mut md, group).unwrap();
            md
        };
        let s1 = run(vec![with_val("teacher", 70, Some(60)), with_val("student", 80, Some(75))]);
        let s2 = run(vec![with_val("teacher", 74, Some(66))]);
        let md = table(&[&s1, &s2]);
        assert!(md.contains("| mean ± sd | paper | validation errors per seed |\n"), "{md}");
        assert!(md.contains("| 70, 74 | 72.0 ± 2.8 (n = 2) | – | 60, 66 |\n"), "{md}");
        assert!(md.contains("| 80 | 80.0 (n = 1) | – | 75 |\n"), "{md}");
        // Without a validation split, no validation column.
        let (t1, t2) = (run(vec![summary_row("teacher", 70)]), run(vec![summary_row("teacher", 74)]));
        let md = table(&[&t1, &t2]);
        assert!(md.contains("| mean ± sd | paper |\n") && md.contains("| 70, 74 | 72.0 ± 2.8 (n = 2) | – |\n"), "{md}");
    }

    #[test]
    fn older_runs_get_sweep_points_from_names_that_agree_with_the_settings_and_seed_groups() {
        let exp = experiment(&format!("{STUDENT}sweep = {{ temperature = [2.5], hidden = [[30, 30]], seed = [4] }}\n"));
        let mut stage = exp.stages[1].clone();
        let recorded = stage.sweep.take().unwrap();
        assert_eq!(stage.name, "s-T2.5-h30x30-s4");
        assert_eq!(legacy_sweep_point(&stage), Some(recorded));
        stage.name = "s-T2.5-h30x30".into();
        let point = legacy_sweep_point(&stage).unwrap();
        assert_eq!((point.base.as_str(), point.hidden, point.seed), ("s", Some(vec![30, 30]), None));
        stage.name = "s-T3-h30x30".into();
        assert_eq!(legacy_sweep_point(&stage), None, "T = 2.5 in its settings");
        stage.name = "student_hard".into();
        assert_eq!(legacy_sweep_point(&stage), None);
        assert_eq!(group_key("mnist_headline_s3"), "mnist_headline");
        assert_eq!(group_key("mnist_s"), "mnist_s");
        assert_eq!(group_key("mnist"), "mnist");
        let (m, sd) = mean_sd(&[70.0, 74.0, 78.0]);
        assert!((m - 74.0).abs() < 1e-12 && (sd - 4.0).abs() < 1e-12);
    }

    #[test]
    fn the_device_comes_from_the_rows_or_else_from_the_log() {
        let log = "2026-11-27T21:24:32Z  INFO experiment `mnist_headline_s1`: device Cuda(0) (CUDA available: true, 1 device(s)), 16 CPU threads";
        assert_eq!(logged_device(log).as_deref(), Some("cuda:0"));
        assert_eq!(logged_device("x INFO experiment `a`: device Cpu (CUDA available: false").as_deref(), Some("cpu"));
        assert_eq!(logged_device("nothing here"), None);
        let row = |stage: &str, device: &str, seconds: f64| SummaryRow {
            stage: stage.into(),
            variant: String::new(),
            kind: "train".into(),
            model: "mlp 2-2".into(),
            parameters: 6,
            val_errors: None,
            test_errors: 1,
            test_accuracy: 0.9,
            shift: None,
            seconds,
            device: device.into(),
            train_accuracy: None,
            teacher_agreement: None,
            teacher_errors: None,
            shared_errors: None,
            transfer_agreement: None,
            macs: None,
            inference_batch: None,
            inference_examples_per_second: None,
            latency_ms: None,
        };
        let run = RunFiles {
            logged_device: Some("cuda:0".into()),
            ..run(vec![row("teacher", "", 90.0), row("a", "cpu (2 threads)", 20.0), row("b", "cpu (2 threads)", 10.0)])
        };
        assert_eq!(run.where_and_how_long(), "`r`: 2.0 min of stage time, teacher on cuda:0; a, b on cpu (2 threads).");

        // The teacher's first epochs ran where run.log says (written without a device), the last
        // ones after a resume on a CPU; stage `a` names its device in every epoch.
        let epoch = |stage: &str, epoch: i64, device: &str| MetricsRow {
            stage: stage.into(),
            epoch,
            lr: 0.1,
            train_loss: 0.5,
            soft_kl: None,
            train_accuracy: 0.9,
            val_loss: None,
            val_accuracy: None,
            test_errors: None,
            seconds: 1.0,
            examples_per_second: None,
            tflops: None,
            device: device.into(),
        };
        let run = RunFiles {
            metrics: vec![
                epoch("teacher", 1, ""),
                epoch("teacher", 2, ""),
                epoch("teacher", 3, "cpu (1 threads)"),
                epoch("a", 1, "cpu (2 threads)"),
            ],
            ..run
        };
        assert_eq!(
            run.where_and_how_long(),
            "`r`: 2.0 min of stage time, teacher on cuda:0 for epochs 1-2 and cpu (1 thread) for epoch 3; \
             a, b on cpu (2 threads)."
        );
        // A run in bf16 says so; f32, the default, goes without saying. Rows that name bf16
        // say it per stage (a resumed run may have changed precision), once.
        let run = RunFiles { precision: Precision::Bf16, ..run };
        assert!(run.where_and_how_long().ends_with("a, b on cpu (2 threads), with matrix products in bf16."));
        let mut summary = run.summary.clone();
        summary[1].device = "cpu (2 threads, bf16)".into();
        let run = RunFiles { summary, metrics: vec![], ..run };
        assert_eq!(
            run.where_and_how_long(),
            "`r`: 2.0 min of stage time, teacher on cuda:0; a on cpu (2 threads, bf16); b on cpu (2 threads)."
        );
    }
}
