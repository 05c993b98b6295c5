//! The record of a run's configuration, `config.toml`: the resolved experiment written back as
//! an experiment file (every default explicit, every path absolute), so that `kd-run run
//! runs/<name>/config.toml` reruns the run and `kd-run validate` accepts it; and the reading of
//! records, including those runs wrote before, in the form of the resolved structs.

use super::experiment::*;
use super::paths::absolute;
use super::raw::RawExperiment;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// A TOML value written inline (`1`, `"a"`, `[1, 2]`).
fn value<T: Serialize + ?Sized>(v: &T) -> String {
    toml::Value::try_from(v).map(|v| v.to_string()).unwrap_or_else(|e| unreachable!("a plain value: {e}"))
}

fn path(p: &Path) -> String {
    value(&p.to_string_lossy())
}

/// An inline table of the pairs given, in order (`{ a = 1, b = "x" }`).
fn inline(pairs: &[(&str, String)]) -> String {
    let parts: Vec<String> = pairs.iter().map(|(k, v)| format!("{k} = {v}")).collect();
    format!("{{ {} }}", parts.join(", "))
}

/// `key = value` lines of a section.
#[derive(Default)]
struct Lines(Vec<String>);

impl Lines {
    fn set(&mut self, key: &str, v: String) {
        self.0.push(format!("{key} = {v}"));
    }

    fn maybe(&mut self, key: &str, v: Option<String>) {
        if let Some(v) = v {
            self.set(key, v);
        }
    }

    /// The fields of a serializable struct, each as a `key = value` line.
    fn fields<T: Serialize>(&mut self, v: &T) {
        if let Ok(toml::Value::Table(t)) = toml::Value::try_from(v) {
            for (k, v) in t {
                self.set(&k, v.to_string());
            }
        }
    }
}

impl Experiment {
    /// The experiment as an experiment file: what a run writes to `config.toml` and `kd-run
    /// validate` prints. Read back by [`super::load`] it resolves to `self` again (a stage a
    /// sweep made is written as a sweep of its one point, which gives it its name and point).
    pub fn to_experiment_file(&self) -> String {
        let mut top = Lines::default();
        top.set("name", value(&self.name));
        if !self.description.is_empty() {
            top.set("description", value(&self.description));
        }
        top.set("seed", value(&self.seed));
        top.set("device", value(&self.device.to_string()));
        if self.threads > 0 {
            top.set("threads", value(&self.threads));
        }
        if self.precision != Precision::F32 {
            top.set("precision", value(&self.precision));
        }
        top.maybe("peak_tflops", self.peak_tflops.map(|p| value(&p)));
        if self.optimizer_in_backward {
            top.set("optimizer_in_backward", "true".into());
        }
        if self.cuda_graphs {
            top.set("cuda_graphs", "true".into());
        }
        let mut sections = vec![top.0.join("\n")];
        if !self.checkpoint.is_default() {
            let mut checkpoint = Lines::default();
            checkpoint.fields(&self.checkpoint);
            sections.push(format!("[checkpoint]\n{}", checkpoint.0.join("\n")));
        }
        sections.extend(data_sections(&self.data));
        for stage in &self.stages {
            sections.push(format!("[[stages]]\n{}", stage_lines(stage).0.join("\n")));
        }
        sections.join("\n\n") + "\n"
    }
}

fn data_sections(d: &DataSpec) -> Vec<String> {
    let mut data = Lines::default();
    let mut more = Vec::new();
    let context = |left: i64, right: i64| value(&[left, right]);
    match &d.source {
        DataSource::Mnist { dir } => {
            data.set("kind", value(&DataKind::Mnist));
            data.set("dir", path(dir));
            data.set("validation", value(&d.validation));
        }
        DataSource::Speech(s) => {
            data.set("kind", value(&DataKind::Speech));
            data.set("context", context(s.left, s.right));
            let mut corpus = Lines::default();
            corpus.fields(&s.corpus);
            more.push(format!("[data.speech]\n{}", corpus.0.join("\n")));
        }
        DataSource::Files(f) => {
            data.set("kind", value(&DataKind::Files));
            data.set("context", context(f.left, f.right));
            data.maybe("classes", f.classes.map(|c| value(&c)));
            let mut files = Lines::default();
            for (split, set) in [("train", &f.train), ("validation", &f.validation), ("test", &f.test)] {
                let mut pairs = vec![("features", path(&set.features)), ("labels", path(&set.labels))];
                if let Some(lengths) = &set.lengths {
                    pairs.push(("lengths", path(lengths)));
                }
                files.set(split, inline(&pairs));
            }
            more.push(format!("[data.files]\n{}", files.0.join("\n")));
        }
        DataSource::Store(s) => {
            data.set("kind", value(&DataKind::Store));
            data.set("context", context(s.left, s.right));
            let mut store = Lines::default();
            store.set("dir", path(&s.dir));
            store.set("shuffle_buffer", value(&s.shuffle_buffer));
            store.set("chunk_frames", value(&s.chunk_frames));
            store.set("prefetch", value(&s.prefetch));
            store.set("epoch_fraction", value(&s.epoch_fraction));
            store.maybe("eval_frames", s.eval_frames.map(|n| value(&n)));
            store.maybe("targets", s.targets.as_ref().map(value));
            more.push(format!("[data.store]\n{}", store.0.join("\n")));
        }
    }
    data.maybe("train_limit", d.train_limit.map(|n| value(&n)));
    data.maybe("test_limit", d.test_limit.map(|n| value(&n)));
    let mut sections = vec![format!("[data]\n{}", data.0.join("\n"))];
    sections.extend(more);
    sections
}

/// The keys that name a model: `from` / `teacher` (an earlier stage) or `checkpoint` /
/// `teacher_checkpoint` (a file, with its `sha256` pin).
fn source(lines: &mut Lines, s: &ModelSource, stage_key: &str, file_key: &str) {
    match s {
        ModelSource::Stage(name) | ModelSource::Ensemble { stage: name, .. } => lines.set(stage_key, value(name)),
        ModelSource::Checkpoint(p) => lines.set(file_key, path(p)),
        ModelSource::PinnedCheckpoint { path: p, sha256 } => {
            lines.set(file_key, path(p));
            lines.set("sha256", value(sha256));
        }
    }
}

fn model(lines: &mut Lines, m: &ModelSpec) {
    let mut pairs = vec![
        ("hidden", value(&m.hidden)),
        ("input_dropout", value(&m.input_dropout)),
        ("hidden_dropout", value(&m.hidden_dropout)),
    ];
    if let Some(n) = m.max_norm {
        pairs.push(("max_norm", value(&n)));
    }
    lines.set("model", inline(&pairs));
}

/// The loop's keys, the stage's `seed` among them.
fn training(lines: &mut Lines, t: &Training, images: bool) {
    lines.set("seed", value(&t.seed));
    lines.set("epochs", value(&t.epochs));
    lines.set("batch_size", value(&t.batch_size));
    let o = &t.optimizer;
    let mut optimizer = vec![("kind", value(&o.kind)), ("lr", value(&o.lr))];
    match o.kind {
        OptimizerKind::Sgd => optimizer.extend([
            ("momentum", value(&o.momentum)),
            ("momentum_start", value(&o.momentum_start)),
            ("momentum_ramp_epochs", value(&o.momentum_ramp_epochs)),
            ("nesterov", value(&o.nesterov)),
        ]),
        OptimizerKind::Adam => {
            optimizer.extend([("beta1", value(&o.beta1)), ("beta2", value(&o.beta2)), ("eps", value(&o.eps))])
        }
    }
    optimizer.push(("weight_decay", value(&o.weight_decay)));
    lines.set("optimizer", inline(&optimizer));
    let s = &t.schedule;
    lines.set(
        "schedule",
        inline(&[
            ("kind", value(&s.kind)),
            ("gamma", value(&s.gamma)),
            ("every", value(&s.every)),
            ("min_lr", value(&s.min_lr)),
        ]),
    );
    if images {
        lines.set("jitter", value(&t.jitter));
        if t.train_fraction != 1.0 {
            lines.set("train_fraction", value(&t.train_fraction));
        }
    }
    lines.maybe("early_stopping", t.patience.map(|p| inline(&[("patience", value(&p))])));
}

fn stage_lines(stage: &Stage) -> Lines {
    let mut l = Lines::default();
    match &stage.sweep {
        // Expanding a sweep of this one point gives the stage its name and point back.
        Some(point) => {
            l.set("name", value(&point.base));
            let mut sweep = Vec::new();
            if let Some(t) = point.temperature {
                sweep.push(("temperature", value(&[t])));
            }
            if let Some(h) = &point.hidden {
                sweep.push(("hidden", value(&[h])));
            }
            if let Some(s) = point.seed {
                sweep.push(("seed", value(&[s])));
            }
            l.set("kind", value(&stage_kind(&stage.job)));
            l.set("sweep", inline(&sweep));
        }
        None => {
            l.set("name", value(&stage.name));
            l.set("kind", value(&stage_kind(&stage.job)));
        }
    }
    match &stage.job {
        Job::Train(j) => {
            model(&mut l, &j.model);
            training(&mut l, &j.training, true);
        }
        Job::Distill(j) => {
            let d = &j.distill;
            source(&mut l, &d.teacher, "teacher", "teacher_checkpoint");
            model(&mut l, &j.model);
            training(&mut l, &j.training, true);
            l.set("objective", value(&d.objective));
            if d.objective == Objective::Soft {
                l.set("temperature", value(&d.temperature));
            }
            l.set("hard_weight", value(&d.hard_weight));
            l.set("soft_weight", value(&d.soft_weight));
            if !d.transfer_exclude.is_empty() {
                l.set("transfer_exclude", value(&d.transfer_exclude));
            }
            if !d.transfer_only.is_empty() {
                l.set("transfer_only", value(&d.transfer_only));
            }
            l.maybe("teacher_top_k", d.top_k.map(|k| value(&k)));
            l.maybe("teacher_translations", d.translations.map(|n| value(&n)));
        }
        Job::Evaluate(j) => source(&mut l, &j.source, "from", "checkpoint"),
        Job::BiasShift(j) => {
            source(&mut l, &j.source, "from", "checkpoint");
            l.set("classes", value(&j.classes));
            l.set("shifts", inline(&[("min", value(&j.min)), ("max", value(&j.max)), ("step", value(&j.step))]));
            l.maybe("fixed_shift", j.fixed.map(|f| value(&f)));
        }
        Job::Ensemble(j) => {
            let names: Vec<&str> = j.members.iter().filter_map(|m| m.stages().first().copied()).collect();
            l.set("members", value(&names));
        }
        Job::Clusters(j) => {
            source(&mut l, &j.source, "from", "checkpoint");
            l.set("affinity", value(&j.affinity));
            l.set("clusters", value(&j.clusters));
            l.set("walk_steps", value(&j.walk_steps));
            l.set("repeats", value(&j.repeats));
            if !j.extra_clusters.is_empty() {
                l.set("extra_clusters", value(&j.extra_clusters));
            }
            l.maybe("max_overlap", j.max_overlap.map(|v| value(&v)));
            l.set("min_size", value(&j.min_size));
            l.maybe("max_size", j.max_size.map(|v| value(&v)));
            l.maybe("count", j.count.map(|v| value(&v)));
            l.set(
                "kmeans",
                inline(&[("iterations", value(&j.kmeans_iterations)), ("batch_size", value(&j.kmeans_batch))]),
            );
            l.set("seed", value(&j.seed));
        }
        Job::Specialists(j) => {
            source(&mut l, &j.source, "from", "checkpoint");
            l.set("subsets", value(&j.subsets));
            training(&mut l, &j.training, false);
            l.maybe("examples", j.examples.map(|v| value(&v)));
            l.set("top_n", value(&j.top_n));
            l.set("combine_iterations", value(&j.combine_iterations));
        }
    }
    if let Some(paper) = &stage.paper {
        if let Ok(toml::Value::Table(t)) = toml::Value::try_from(paper) {
            let pairs: Vec<(&str, String)> = t.iter().map(|(k, v)| (k.as_str(), v.to_string())).collect();
            l.set("paper", inline(&pairs));
        }
    }
    l
}

fn stage_kind(job: &Job) -> StageKind {
    match job {
        Job::Train(_) => StageKind::Train,
        Job::Distill(_) => StageKind::Distill,
        Job::Evaluate(_) => StageKind::Evaluate,
        Job::BiasShift(_) => StageKind::BiasShift,
        Job::Ensemble(_) => StageKind::Ensemble,
        Job::Clusters(_) => StageKind::Clusters,
        Job::Specialists(_) => StageKind::Specialists,
    }
}

/// A record in the form runs wrote before `config.toml` was an experiment file (the resolved
/// structs themselves), its relative paths taken relative to `cwd` as they were then.
pub(crate) fn read_resolved_form(text: &str, cwd: &Path) -> Option<Experiment> {
    let mut exp: Experiment = toml::from_str(text).ok()?;
    let fix = |p: &mut PathBuf| *p = absolute(cwd, p);
    match &mut exp.data.source {
        DataSource::Mnist { dir } => fix(dir),
        DataSource::Store(s) => fix(&mut s.dir),
        DataSource::Files(f) => {
            for set in [&mut f.train, &mut f.validation, &mut f.test] {
                fix(&mut set.features);
                fix(&mut set.labels);
                if let Some(l) = &mut set.lengths {
                    fix(l);
                }
            }
        }
        DataSource::Speech(_) => {}
    }
    for stage in &mut exp.stages {
        let sources: Vec<&mut ModelSource> = match &mut stage.job {
            Job::Distill(j) => vec![&mut j.distill.teacher],
            Job::Evaluate(j) => vec![&mut j.source],
            Job::BiasShift(j) => vec![&mut j.source],
            Job::Clusters(j) => vec![&mut j.source],
            Job::Specialists(j) => vec![&mut j.source],
            Job::Train(_) | Job::Ensemble(_) => vec![],
        };
        for s in sources {
            if let ModelSource::Checkpoint(p) | ModelSource::PinnedCheckpoint { path: p, .. } = s {
                fix(p);
            }
        }
    }
    Some(exp)
}

/// A run's `config.toml` (its text; `path` names it in errors) as the experiment it records:
/// an experiment file, resolved (relative paths against its folder), or a record in the form
/// runs wrote before (relative paths against the working directory). Nothing is checked
/// against the files it names.
pub fn read_record(text: &str, path: &Path) -> Result<Experiment> {
    let cwd = std::env::current_dir().context("cannot read the working directory")?;
    let origin = path.display().to_string();
    match toml::from_str::<RawExperiment>(text) {
        Ok(mut raw) => {
            raw.resolve_paths(&absolute(&cwd, path.parent().unwrap_or(Path::new(""))));
            super::resolve::resolve(raw, text).map_err(|e| anyhow::anyhow!("{origin}:{e}"))
        }
        Err(e) => read_resolved_form(text, &cwd).ok_or_else(|| super::raw::toml_error(&origin, text, &e)),
    }
}
