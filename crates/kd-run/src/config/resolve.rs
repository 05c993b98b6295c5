//! Resolution: `[defaults]` merged into each stage, defaults of every unset key applied, and the
//! checks across fields and stages, each error naming the stage's line.

use super::experiment::*;
use super::limits::{MAX_CLASSES, MAX_CONTEXT, MAX_PARAMETERS, MAX_STAGES};
use super::names::{derived_name_clash, name_problem};
use super::raw::*;
use super::sweep::expand_sweep;
use super::values::ClassId;
use crate::device::Choice;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use toml::Spanned;

/// The resolved experiment: each part handed to its own builder (the run's name and device, the
/// data source, the stages, the resource settings), in the order their errors are reported.
pub(crate) fn resolve(raw: RawExperiment, text: &str) -> Result<Experiment> {
    check_run_name(&raw, text)?;
    let device = resolve_device(raw.device.as_ref(), text)?;
    if raw.stages.is_empty() {
        bail!("{}: the experiment has no [[stages]]", line_of(text, raw.name.span().start));
    }
    let data = resolve_data(&raw.data, line_of(text, raw.name.span().start))?;
    let stages = resolve_stages(raw.stages, &raw.defaults, raw.seed, &data, text)?;
    if let Some(t) = raw.threads.filter(|t| t.0 > super::limits::MAX_THREADS) {
        bail!(
            "threads = {}: expected at most {} (0: libtorch's default, one per core)",
            t.0,
            super::limits::MAX_THREADS
        );
    }
    let checkpoint = resolve_checkpoint(raw.checkpoint.as_ref())?;
    Ok(Experiment {
        name: raw.name.into_inner(),
        description: raw.description.unwrap_or_default(),
        seed: raw.seed,
        device,
        threads: raw.threads.map_or(0, |c| c.0),
        precision: raw.precision,
        peak_tflops: raw.peak_tflops.map(|p| p.0),
        optimizer_in_backward: raw.optimizer_in_backward,
        cuda_graphs: raw.cuda_graphs,
        checkpoint,
        data,
        stages,
    })
}

fn check_run_name(raw: &RawExperiment, text: &str) -> Result<()> {
    if let Some(problem) = name_problem(raw.name.get_ref()) {
        bail!(
            "{}: name: {:?} is not a usable run name, which becomes the folder OUT/<name>/: {problem}",
            line_of(text, raw.name.span().start),
            raw.name.get_ref()
        );
    }
    Ok(())
}

fn resolve_device(device: Option<&Spanned<String>>, text: &str) -> Result<Choice> {
    let Some(d) = device else { return Ok(Choice::Auto) };
    d.get_ref().parse::<Choice>().map_err(|e| anyhow::anyhow!("{}: device: {e}", line_of(text, d.span().start)))
}

/// `[data]`: the source of each kind and the settings of the MNIST image split; errors name
/// `data_line`.
fn resolve_data(data: &RawData, data_line: usize) -> Result<DataSpec> {
    let kind = data.kind.as_ref().map_or(DataKind::Mnist, |k| *k.get_ref());
    if let Some(c) = data.classes.filter(|c| c.0 > MAX_CLASSES) {
        bail!("{data_line}: data: classes = {}: kd-run supports at most {MAX_CLASSES} classes", c.0);
    }
    if let Some(c) = data.context.filter(|c| c.iter().any(|&n| n > MAX_CONTEXT)) {
        bail!("{data_line}: data: context = {c:?}: at most {MAX_CONTEXT} frames on either side");
    }
    if kind != DataKind::Store && data.store.is_some() {
        bail!("{data_line}: data: `store` needs kind = \"store\"");
    }
    if kind != DataKind::Files && (data.files.is_some() || data.classes.is_some()) {
        bail!("{data_line}: data: `files` and `classes` need kind = \"files\"");
    }
    let source = match kind {
        DataKind::Files => files_source(data, data_line)?,
        DataKind::Store => store_source(data, data_line)?,
        DataKind::Mnist => mnist_source(data, data_line)?,
        DataKind::Speech => speech_source(data, data_line)?,
    };
    Ok(DataSpec {
        source,
        validation: data.validation,
        train_limit: data.train_limit.map(|c| c.0),
        test_limit: data.test_limit.map(|c| c.0),
    })
}

/// Whether `[data]` holds settings of the MNIST image split, which frame data (split by speaker
/// or by file) has not.
fn has_image_split(data: &RawData) -> bool {
    data.dir.is_some() || data.validation > 0 || data.train_limit.is_some() || data.test_limit.is_some()
}

/// The frames of context `[left, right]` around each frame of speech data (default `[20, 5]`).
fn context(data: &RawData) -> (i64, i64) {
    let [left, right] = data.context.unwrap_or(DEFAULT_CONTEXT);
    (i64::from(left), i64::from(right))
}

fn files_source(data: &RawData, data_line: usize) -> Result<DataSource> {
    let Some(f) = data.files.clone() else {
        bail!(
            "{data_line}: data: kind = \"files\" needs [data.files] with `train`, `validation` and `test`, each {{ features = ..., labels = ... }}"
        );
    };
    if has_image_split(data) || data.speech.is_some() {
        bail!(
            "{data_line}: data: with kind = \"files\" the splits are the files; `dir`, `speech`, `validation`, `train_limit` and `test_limit` do not apply"
        );
    }
    let (left, right) = context(data);
    Ok(DataSource::Files(FilesSpec {
        left,
        right,
        classes: data.classes.map(|c| c.0),
        train: f.train,
        validation: f.validation,
        test: f.test,
    }))
}

fn store_source(data: &RawData, data_line: usize) -> Result<DataSource> {
    let Some(st) = data.store.clone() else {
        bail!(
            "{data_line}: data: kind = \"store\" needs [data.store] with `dir`, the folder `kd-run store write` wrote"
        );
    };
    if has_image_split(data) || data.speech.is_some() {
        bail!(
            "{data_line}: data: with kind = \"store\" the splits are the stores; `dir`, `speech`, `validation`, `train_limit` and `test_limit` do not apply"
        );
    }
    let fraction = st.epoch_fraction.unwrap_or(1.0);
    if !(fraction > 0.0 && fraction <= 1.0) {
        bail!("{data_line}: data.store: epoch_fraction = {fraction} must be in (0, 1]");
    }
    let (left, right) = context(data);
    if let Some(p) = st.prefetch.filter(|p| p.0 as u64 > super::limits::MAX_PREFETCH) {
        bail!(
            "{data_line}: data.store: prefetch = {}: expected at most {} batches read ahead",
            p.0,
            super::limits::MAX_PREFETCH
        );
    }
    Ok(DataSource::Store(StoreSpec {
        dir: st.dir,
        left,
        right,
        shuffle_buffer: st.shuffle_buffer.map_or(1 << 18, |c| c.0 as usize),
        chunk_frames: st.chunk_frames.map_or(8, |c| c.0 as usize),
        prefetch: st.prefetch.map_or(4, |c| c.0 as usize),
        epoch_fraction: fraction,
        eval_frames: st.eval_frames.map(|c| c.0 as u64),
        targets: st.targets,
    }))
}

fn mnist_source(data: &RawData, data_line: usize) -> Result<DataSource> {
    if data.speech.is_some() || data.context.is_some() {
        bail!("{data_line}: data: `speech` and `context` need kind = \"speech\"");
    }
    let Some(dir) = data.dir.clone() else {
        bail!("{data_line}: data: `dir`, the folder with the MNIST IDX files, is missing");
    };
    Ok(DataSource::Mnist { dir })
}

fn speech_source(data: &RawData, data_line: usize) -> Result<DataSource> {
    let corpus = data.speech.clone().unwrap_or_default();
    corpus.validate().map_err(|e| anyhow::anyhow!("{data_line}: data.speech: {e:#}"))?;
    if has_image_split(data) {
        bail!(
            "{data_line}: data: a speech corpus splits by speaker (training, development = validation, test); `dir`, `validation`, `train_limit` and `test_limit` do not apply"
        );
    }
    let (left, right) = context(data);
    Ok(DataSource::Speech(SpeechSpec { left, right, corpus }))
}

/// The stages, sweeps expanded, each named, its keys checked against its kind, its job built by
/// that kind's builder and checked against the data.
fn resolve_stages(
    raw: Vec<RawStage>,
    defaults: &RawTraining,
    base_seed: u64,
    data: &DataSpec,
    text: &str,
) -> Result<Vec<Stage>> {
    // Speech frames (synthetic or from files): windows, a validation split of their own.
    let framed = !matches!(data.source, DataSource::Mnist { .. });
    let validation_splits = data.validation + usize::from(framed);
    let mut stages: Vec<Stage> = Vec::new();
    let mut expanded = Vec::new();
    for s in raw {
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
        let allowed = s.kind.accepted_keys();
        if let Some(k) = s.present_keys().into_iter().find(|k| !allowed.contains(k)) {
            stage_bail!(
                text,
                s,
                "`{k}` does not apply to a {} stage (its keys: {})",
                s.kind.as_str(),
                allowed.join(", ")
            );
        }
        let seed = s.seed.unwrap_or_else(|| derive_seed(base_seed, &name));
        let job = resolve_job(text, &s, defaults, &stages, seed, validation_splits)?;
        check_job(text, &s, &job, data.validation, framed)?;
        stages.push(Stage { name, paper: s.paper.clone(), sweep: s.point.clone(), job });
    }
    Ok(stages)
}

/// A stage's job, by its kind's builder; `earlier` are the stages above it, `validation_splits`
/// how many validation examples (or a frame split) there are to choose on.
fn resolve_job(
    text: &str,
    s: &RawStage,
    defaults: &RawTraining,
    earlier: &[Stage],
    seed: u64,
    validation_splits: usize,
) -> Result<Job> {
    Ok(match s.kind {
        StageKind::Train => {
            Job::Train(TrainJob { model: resolve_model(text, s)?, training: stage_training(text, defaults, s, seed)? })
        }
        StageKind::Distill => Job::Distill(DistillJob {
            model: resolve_model(text, s)?,
            training: stage_training(text, defaults, s, seed)?,
            distill: resolve_distill(text, s, earlier)?,
        }),
        StageKind::Evaluate => Job::Evaluate(EvaluateJob {
            source: resolve_source(text, s, s.from.as_ref(), s.checkpoint.as_ref(), earlier)?,
        }),
        StageKind::BiasShift => resolve_bias_shift(text, s, earlier, validation_splits)?,
        StageKind::Ensemble => Job::Ensemble(EnsembleJob { members: resolve_members(text, s, earlier)? }),
        StageKind::Clusters => resolve_clusters(text, s, earlier, seed, validation_splits)?,
        StageKind::Specialists => Job::Specialists(SpecialistsJob {
            source: resolve_source(text, s, s.from.as_ref(), s.checkpoint.as_ref(), earlier)?,
            subsets: resolve_subsets(text, s, earlier)?,
            training: stage_training(text, defaults, s, seed)?,
            examples: s.examples.map(|c| c.0),
            top_n: s.top_n.map_or(1, |c| c.0),
            combine_iterations: s.combine_iterations.map_or(100, |c| c.0),
        }),
    })
}

/// The checks of a job against its other settings and the data: cached teacher targets and
/// jitter, early stopping without a validation split, image-only settings on speech frames.
fn check_job(text: &str, s: &RawStage, job: &Job, validation: usize, framed: bool) -> Result<()> {
    let training = match job {
        Job::Train(TrainJob { training, .. })
        | Job::Distill(DistillJob { training, .. })
        | Job::Specialists(SpecialistsJob { training, .. }) => Some(training),
        _ => None,
    };
    let distill = match job {
        Job::Distill(DistillJob { distill, .. }) => Some(distill),
        _ => None,
    };
    let early = training.is_some_and(|t| t.patience.is_some());
    let jitter = training.is_some_and(|t| t.jitter > 0) && !matches!(job, Job::Specialists(_));
    if let Some(d) = distill {
        if d.top_k.is_some() && jitter {
            stage_bail!(
                text,
                s,
                "`teacher_top_k` keeps a cached teacher's outputs; with `jitter` the teacher runs live"
            );
        }
        if d.translations.is_some() && jitter {
            stage_bail!(
                text,
                s,
                "`teacher_translations` averages a cached teacher's outputs; with `jitter` the teacher runs live"
            );
        }
    }
    if early && validation == 0 && !framed {
        stage_bail!(text, s, "early stopping watches the validation split: set `data.validation` > 0");
    }
    if framed {
        if jitter {
            stage_bail!(text, s, "`jitter` translates images; speech frames are not images");
        }
        if distill.is_some_and(|d| d.translations.is_some()) {
            stage_bail!(text, s, "`teacher_translations` translates images; speech frames are not images");
        }
        if distill.is_some_and(|d| !d.transfer_exclude.is_empty() || !d.transfer_only.is_empty()) {
            stage_bail!(text, s, "transfer-set class filters are not supported for speech frames yet");
        }
    }
    Ok(())
}

fn resolve_checkpoint(raw: Option<&RawCheckpoint>) -> Result<CheckpointSpec> {
    let Some(c) = raw else { return Ok(CheckpointSpec::default()) };
    let every_minutes = c.every_minutes.unwrap_or(0.0);
    if !(every_minutes.is_finite() && (0.0..=1e6).contains(&every_minutes)) {
        bail!("checkpoint.every_minutes = {every_minutes}: expected minutes from 0 (off) to 1000000");
    }
    let keep = c.keep.unwrap_or(2);
    if !(1..=100).contains(&keep) {
        bail!("checkpoint.keep = {keep}: expected from 1 to 100 checkpoints");
    }
    Ok(CheckpointSpec { every_steps: c.every_steps.unwrap_or(0), every_minutes, keep: keep as usize })
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
            if !matches!(t.job, Job::Train(_) | Job::Distill(_) | Job::Evaluate(_)) {
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
    Ok(Job::Clusters(ClustersJob {
        source,
        affinity: s.affinity.unwrap_or_default(),
        clusters: clusters.0,
        walk_steps: i64::from(s.walk_steps.unwrap_or(4)),
        repeats: s.repeats.map_or(1, |c| c.0),
        extra_clusters: s.extra_clusters.iter().flatten().map(|c| c.0).collect(),
        // A bound of 1 drops nothing: the same as none, and recorded as none.
        max_overlap: s.max_overlap.map(|v| v.0).filter(|&v| v < 1.0),
        min_size,
        max_size: s.max_size.map(|c| c.0),
        count: s.count.map(|c| c.0),
        kmeans_iterations: kmeans.iterations.map_or(200, |c| c.0),
        kmeans_batch: kmeans.batch_size.map_or(256, |c| c.0),
        seed,
    }))
}

/// The `clusters` stage a `specialists` stage takes its subsets from.
fn resolve_subsets(text: &str, s: &RawStage, earlier: &[Stage]) -> Result<String> {
    let Some(name) = &s.subsets else {
        stage_bail!(text, s, "a specialists stage needs `subsets = \"<clusters stage>\"`");
    };
    match earlier.iter().find(|t| &t.name == name.get_ref()) {
        Some(Stage { job: Job::Clusters(_), .. }) => Ok(name.get_ref().clone()),
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
    Ok(Job::BiasShift(BiasShiftJob {
        source,
        classes,
        min: shifts.min,
        max: shifts.max,
        step: shifts.step.0,
        fixed: s.fixed_shift,
    }))
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
        (None, Some(path)) => Ok(match &s.sha256 {
            Some(pin) => ModelSource::PinnedCheckpoint { path: path.clone(), sha256: pin.0.clone() },
            None => ModelSource::Checkpoint(path.clone()),
        }),
        (Some(_), None) if s.sha256.is_some() => stage_bail!(
            text,
            s,
            "`sha256` pins the file of `{file_key}`; this stage reads the earlier stage `{stage_key}` names, whose \
             checkpoint this run writes"
        ),
        (Some(name), None) => match earlier.iter().find(|t| &t.name == name.get_ref()).map(|t| &t.job) {
            Some(Job::Train(_) | Job::Distill(_)) => Ok(ModelSource::Stage(name.get_ref().clone())),
            Some(Job::Ensemble(EnsembleJob { members })) if s.kind == StageKind::Distill => {
                Ok(ModelSource::Ensemble { stage: name.get_ref().clone(), members: members.clone() })
            }
            Some(Job::Ensemble(_)) => bail!(
                "{}: stage `{}`: `{}` is an ensemble, which has no single output layer; name one of its members",
                line_of(text, name.span().start),
                s.name.get_ref(),
                name.get_ref()
            ),
            Some(Job::Evaluate(_) | Job::BiasShift(_) | Job::Clusters(_) | Job::Specialists(_)) => {
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

/// A stage's seed from the experiment's seed and the stage's name (FNV-1a), so that reordering
/// or adding stages does not change the others.
pub(crate) fn derive_seed(base: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325 ^ base;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h % (1 << 31)
}
