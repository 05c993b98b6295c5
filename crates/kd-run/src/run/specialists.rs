//! Specialists stages (the paper's section 5): specialists trained on the class subsets a
//! `clusters` stage found (`run/clusters.rs`), and combined with the generalist by eq. 5.
//!
//! Each specialist `<stage>.<m>` keeps its own files, so that several processes (one per
//! specialist, `kd-run run FILE --only <stage>.<m>`) can train them at once in one run
//! directory: its checkpoint `checkpoints/<stage>.<m>.safetensors` (resume and best-epoch files
//! beside it while it trains), and `specialists/<stage>.<m>/{metrics.csv, specialist.csv}`.
//! `specialist.csv` is written last and marks the specialist as done. When every specialist is
//! done, the stage combines them and records `summary.csv`, `specialists.csv` (the gathered
//! rows) and `specialist_coverage.csv` (Table 4).

use super::ctx::Ctx;
use super::ctx::Targets;
use super::fit::{self, Init, Sampling, StageFit};
use super::record;
use super::tables::{self, Tables};
use crate::config::{Job, SpecialistsJob, Training};
use crate::data::Split;
use crate::run::output::{self, CoverageRow, SpecialistRow, SubsetRow};
use crate::train::{self, Supervision, EVAL_BATCH};
use anyhow::{bail, Context, Result};
use kd_models::Mlp;
use kd_specialists::{
    active_specialists, balanced_indices, combine, covering_specialists, dustbin_logit_shift, raise_dustbin,
    specialist_from_generalist, ClassSubset, CombineConfig,
};
use record::Model;
use std::path::PathBuf;
use std::time::Instant;
use tch::{nn, nn::ModuleT, Kind, Tensor};
use tracing::info;

/// The file that marks a trained specialist.
const SPECIALIST_ROW: &str = "specialist.csv";

/// The files kd-run writes in a specialist's folder `specialists/<stage>.<m>/`.
pub(super) const SPECIALIST_FILES: [&str; 5] =
    [tables::METRICS, tables::SUMMARY, tables::CLASS_ERRORS, tables::SHIFTS, SPECIALIST_ROW];

/// Whether `name` is that of a specialist's folder, `<stage>.<m>`.
pub(super) fn is_specialist_folder(name: &str) -> bool {
    name.rsplit_once('.').is_some_and(|(stage, m)| !stage.is_empty() && is_index(m))
}

/// Whether `m` is a specialist's index as kd-run writes it (decimal digits).
pub(super) fn is_index(m: &str) -> bool {
    !m.is_empty() && m.bytes().all(|b| b.is_ascii_digit())
}

/// Runs a `specialists` stage: trains the specialists not yet trained (only those of
/// `only`, if given, and then stops), then combines all of them with the generalist and
/// records the combination (Tables 3 and 4).
pub(super) fn run(
    ctx: &Ctx,
    tables: &mut Tables,
    stage: &str,
    job: &SpecialistsJob,
    only: Option<&[usize]>,
    started: Instant,
) -> Result<()> {
    let SpecialistsJob { source, subsets: from, training, examples, top_n, combine_iterations } = job;
    let subsets = subsets_of(ctx, tables, from)?;
    let (gvs, generalist) = ctx.load_model(source)?;
    let all: Vec<usize> = (0..subsets.len()).collect();
    for &m in only.unwrap_or(&all) {
        if m >= subsets.len() {
            bail!(
                "--only {stage}.{m}: stage `{from}` found {} subsets, numbered 0 to {}",
                subsets.len(),
                subsets.len() - 1
            );
        }
        if specialist_dir(ctx, stage, m).join(SPECIALIST_ROW).exists()
            && ctx.checkpoint(&format!("{stage}.{m}")).exists()
        {
            info!("specialist `{stage}.{m}`: already trained, skipped");
            continue;
        }
        train_specialist(ctx, stage, m, &subsets[m], (&gvs, &generalist), training, *examples)?;
    }
    if only.is_some() {
        return Ok(());
    }
    tables.specialists.retain(|r| r.stage != stage);
    for m in 0..subsets.len() {
        let rows: Vec<SpecialistRow> = output::read_csv(&specialist_dir(ctx, stage, m).join(SPECIALIST_ROW))?;
        tables.specialists.extend(rows);
    }
    let nets = (0..subsets.len())
        .map(|m| Ok(load_specialist(ctx, stage, m, &subsets[m])?.1.frozen()))
        .collect::<Result<Vec<_>>>()?;
    let generalist = generalist.frozen();
    let combination = Combination {
        generalist: &generalist,
        nets: &nets,
        subsets: &subsets,
        top_n: *top_n,
        cfg: CombineConfig { iterations: *combine_iterations, ..CombineConfig::default() },
    };
    let parameters = generalist.num_params() + nets.iter().map(Mlp::num_params).sum::<i64>();
    // As if every specialist were consulted: a bound on the cost of any one example.
    let macs = generalist.forward_macs() + nets.iter().map(Mlp::forward_macs).sum::<i64>();
    let model = format!("generalist + {} specialists (mlp {})", nets.len(), generalist.config().describe());
    let logits = |x: &Tensor| combination.logits(x);
    let described = Model { model, parameters, macs };
    let (val, test) = record::model_with(ctx, tables, stage, "specialists", described, &logits, started, None)?;

    // Table 4: examples by the number of specialists covering their class, from the
    // combination's predictions above (eq. 5 is solved once per example); on the
    // validation split too, where the specialists' settings may be chosen.
    tables.coverage.retain(|r| r.stage != stage);
    let splits = [("validation", ctx.data.validation.as_ref().zip(val)), ("test", Some((&ctx.data.test, test)))];
    for (name, split) in splits {
        let Some((split, eval)) = split else { continue };
        let rows = coverage((stage, name), &combination, split, &eval.predictions, EVAL_BATCH)?;
        let (g, q): (i64, i64) =
            (rows.iter().map(|r| r.generalist_correct).sum(), rows.iter().map(|r| r.combined_correct).sum());
        tables.coverage.extend(rows);
        info!("stage `{stage}`: top-1 correct on the {name} split: generalist {g}, with specialists {q} ({:+})", q - g);
    }
    Ok(())
}

/// The subsets recorded by the clusters stage `from`, in their order.
fn subsets_of(ctx: &Ctx, tables: &Tables, from: &str) -> Result<Vec<ClassSubset>> {
    let mut rows: Vec<&SubsetRow> = tables.subsets.iter().filter(|r| r.stage == from).collect();
    rows.sort_by_key(|r| r.subset);
    if rows.is_empty() {
        bail!("stage `{from}` has not run yet: run it first (or add `--only {from}`)");
    }
    rows.iter()
        .map(|r| {
            let classes = r.classes.split_whitespace().map(str::parse).collect::<Result<Vec<i64>, _>>();
            let classes = classes.with_context(|| format!("subsets.csv: subset {} of `{from}`", r.subset))?;
            Ok(ClassSubset::new(classes, ctx.data.num_classes)?)
        })
        .collect()
}

fn specialist_dir(ctx: &Ctx, stage: &str, m: usize) -> PathBuf {
    ctx.dir.join("specialists").join(format!("{stage}.{m}"))
}

/// Trains specialist `m` of `stage` on `subset`, from the generalist's weights.
fn train_specialist(
    ctx: &Ctx,
    stage: &str,
    m: usize,
    subset: &ClassSubset,
    (gvs, generalist): (&nn::VarStore, &Mlp),
    training: &Training,
    examples: Option<i64>,
) -> Result<()> {
    let started = Instant::now();
    let name = format!("{stage}.{m}");
    let dir = specialist_dir(ctx, stage, m);
    if crate::dist::world().is_writer() {
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let (svs, net) = specialist_from_generalist(gvs, generalist, subset, ctx.device)?;
    let train = &ctx.data.train;
    let inside = subset.contains(&train.labels)?.sum(Kind::Int64).int64_value(&[]);
    if inside == 0 {
        bail!("specialist `{name}`: no training example has a class of its subset {:?}", subset.classes());
    }
    let n = examples.unwrap_or(2 * inside).max(2);
    let training = Training { seed: training.seed.wrapping_add(m as u64), ..training.clone() };
    let seed = training.seed;
    let (_, factor) = balanced_indices(&train.labels, subset, n, seed)?;
    let draw = |epoch: i64| -> Result<Tensor> {
        Ok(balanced_indices(&train.labels, subset, n, seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64))?.0)
    };
    let local_train = relabeled(train, subset)?;
    // Validation: a balanced sample, the same every epoch (what early stopping watches).
    let val = ctx.data.validation.as_ref();
    let local_val = val.map(|v| relabeled(v, subset)).transpose()?;
    let val_sample = match val {
        Some(v) => {
            let inside = subset.contains(&v.labels)?.sum(Kind::Int64).int64_value(&[]);
            (inside > 0 && inside < v.len())
                .then(|| balanced_indices(&v.labels, subset, 2 * inside, seed))
                .transpose()?
        }
        None => None,
    };
    let targets = Targets {
        validation: local_val.as_ref().zip(val_sample.as_ref()).map(|(v, (idx, _))| (v, Some(idx.shallow_clone()))),
        test: None,
        classes: subset.output_width(),
    };
    let mut tables = Tables::read(&dir)?;
    let (vs, net, _) = fit::train(
        ctx,
        &mut tables,
        &dir,
        StageFit {
            stage: &name,
            init: Init::From(svs, net),
            training: &training,
            split: &local_train,
            sampling: Sampling::Draw { n, draw: &draw },
            supervision: &Supervision::labels(),
            targets: &targets,
        },
    )?;
    let shift = dustbin_logit_shift(factor);
    raise_dustbin(&vs, subset, shift)?;
    output::save_tensors(&ctx.checkpoint(&name), &net.to_tensors(&vs))?;
    let val_inside_accuracy = match (&local_val, val) {
        (Some(lv), Some(v)) => {
            let idx = subset.contains(&v.labels)?.nonzero().squeeze_dim(1);
            let frozen = net.frozen();
            let forward = |x: &Tensor| Ok(frozen.forward_t(x, false));
            (idx.size()[0] > 0)
                .then(|| train::evaluate_with(&forward, lv, Some(&idx), subset.output_width()))
                .transpose()?
                .map(|e| e.accuracy())
        }
        _ => None,
    };
    let row = SpecialistRow {
        stage: stage.to_string(),
        subset: m as i64,
        classes: subset.len(),
        train_inside: inside,
        examples_per_epoch: n,
        dustbin_shift: shift,
        val_accuracy: tables.metrics.last().and_then(|r| r.val_accuracy),
        val_inside_accuracy,
        epochs: tables.metrics.len() as i64,
        seconds: started.elapsed().as_secs_f64(),
    };
    info!(
        "specialist `{name}`: {} classes + dustbin, {inside} training examples inside, dustbin shift {shift:+.3}, \
         validation accuracy on its classes {}",
        subset.len(),
        val_inside_accuracy.map_or("-".into(), |a| format!("{:.2}%", 100.0 * a))
    );
    output::write_csv(&dir.join(SPECIALIST_ROW), &[row])
}

/// Loads the trained specialist `m` of `stage`, checking its shape against its subset.
fn load_specialist(ctx: &Ctx, stage: &str, m: usize, subset: &ClassSubset) -> Result<(nn::VarStore, Mlp)> {
    let path = ctx.checkpoint(&format!("{stage}.{m}"));
    if !specialist_dir(ctx, stage, m).join(SPECIALIST_ROW).exists() || !path.exists() {
        bail!("specialist `{stage}.{m}` has not been trained (run `--only {stage}.{m}`)");
    }
    let (vs, net) = Mlp::from_tensors(&output::load_tensors(&path)?, ctx.device)
        .with_context(|| format!("loading {}", path.display()))?;
    let c = net.config();
    if c.input_dim() != ctx.data.train.input_dim() || c.num_classes() != subset.output_width() {
        bail!(
            "{} is a {} network; specialist {m} needs {} inputs and {} outputs",
            path.display(),
            c.describe(),
            ctx.data.train.input_dim(),
            subset.output_width()
        );
    }
    Ok((vs, net.with_compute_kind(ctx.exp.precision.kind())))
}

/// Deletes what the specialists of `stage` left (their checkpoints and folders), when
/// `stage` is a specialists stage whose settings changed.
pub(super) fn remove(ctx: &Ctx, stage: &str) -> Result<()> {
    if !crate::dist::world().is_writer() {
        return Ok(());
    }
    if !ctx.exp.stages.iter().any(|s| s.name == stage && matches!(s.job, Job::Specialists(_))) {
        return Ok(());
    }
    let index_of = |name: &str| -> bool {
        let rest = name.strip_prefix(stage).and_then(|r| r.strip_prefix('.'));
        rest.is_some_and(is_index)
    };
    let checkpoints = ctx.dir.join("checkpoints");
    if let Ok(entries) = std::fs::read_dir(&checkpoints) {
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let stem = ["", ".resume", ".best"]
                .iter()
                .find_map(|kind| name.strip_suffix(&format!("{kind}.safetensors")).filter(|s| index_of(s)));
            if stem.is_some() && !entry.file_type()?.is_dir() {
                std::fs::remove_file(entry.path())?;
            }
        }
    }
    let folders = ctx.dir.join("specialists");
    if let Ok(entries) = std::fs::read_dir(&folders) {
        for entry in entries {
            let entry = entry?;
            if !index_of(&entry.file_name().to_string_lossy()) {
                continue;
            }
            // Only kd-run's files; a link in the place of the folder goes as a link.
            if !entry.file_type()?.is_dir() {
                std::fs::remove_file(entry.path())?;
                continue;
            }
            for file in std::fs::read_dir(entry.path())? {
                let file = file?;
                let name = file.file_name().to_string_lossy().into_owned();
                if !file.file_type()?.is_dir() && (SPECIALIST_FILES.contains(&name.as_str()) || output::is_tmp(&name)) {
                    std::fs::remove_file(file.path())?;
                }
            }
            let _ = std::fs::remove_dir(entry.path());
        }
    }
    Ok(())
}

/// The `items` (in order) whose subset overlaps none kept before it by more than `bound`.
pub(super) fn distinct<T>(items: Vec<T>, subset: impl Fn(&T) -> &ClassSubset, bound: f64) -> Vec<T> {
    let mut kept: Vec<T> = Vec::new();
    for item in items {
        if kept.iter().all(|k| overlap(subset(k), subset(&item)) <= bound) {
            kept.push(item);
        }
    }
    kept
}

/// `|A ∩ B| / |A ∪ B|` of two subsets' classes.
fn overlap(a: &ClassSubset, b: &ClassSubset) -> f64 {
    let shared = a.classes().iter().filter(|&&c| b.contains_class(c)).count() as f64;
    shared / ((a.len() + b.len()) as f64 - shared)
}

/// `split` with its labels mapped to a specialist's: the subset's classes in order, then the
/// dustbin for every other class.
fn relabeled(split: &Split, subset: &ClassSubset) -> Result<Split> {
    let mut view = split.view();
    view.labels = subset.to_local(&split.labels)?;
    Ok(view)
}

/// A generalist and its specialists, combined by eq. 5 for the examples for which the
/// generalist's `top_n` most probable classes fall in some specialist's subset.
struct Combination<'a> {
    generalist: &'a Mlp,
    nets: &'a [Mlp],
    subsets: &'a [ClassSubset],
    top_n: i64,
    cfg: CombineConfig,
}

impl Combination<'_> {
    /// The generalist's distributions `[b, N]` on inputs `x` and which specialists each example
    /// consults (`[b, M]` bool).
    fn consults(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let pg = self.generalist.forward_t(x, false).softmax(1, Kind::Float);
        let active = active_specialists(&pg, self.subsets, self.top_n)?;
        Ok((pg, active))
    }

    /// `log q` of the combination on inputs `x`: the generalist's distribution where no
    /// specialist is consulted, eq. 5's solution elsewhere.
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let (pg, active) = self.consults(x)?;
        let b = x.size()[0];
        // Each specialist runs on the examples that consult it; the other rows are ignored.
        let probs: Vec<Tensor> = self
            .nets
            .iter()
            .zip(self.subsets)
            .enumerate()
            .map(|(m, (net, subset))| {
                let rows = active.select(1, m as i64).nonzero().squeeze_dim(1);
                let width = subset.output_width();
                let out = net.forward_t(&x.index_select(0, &rows), false).softmax(1, Kind::Float);
                Tensor::full([b, width], 1.0 / width as f64, (Kind::Float, x.device())).index_copy(0, &rows, &out)
            })
            .collect();
        let pairs: Vec<(&ClassSubset, &Tensor)> = self.subsets.iter().zip(&probs).collect();
        let q = combine(&pg, &pairs, &active, &self.cfg)?.probs;
        Ok(q.clamp_min(1e-30).log())
    }
}

/// Table 4 for `split` (named `name` in the rows): its examples by the number of specialists
/// whose subset holds their true class, with the generalist's top-1 correct, the
/// combination's (`combined`, its prediction for each example of the split, in order), how
/// many consulted a specialist, and what the covering specialists get right on their own
/// against the generalist seen in their labels. The generalist's and specialists' answers come
/// from a pass over the split in chunks of `chunk`, which only decides memory: each example's
/// row depends on that example alone.
fn coverage(
    (stage, name): (&str, &str),
    combination: &Combination,
    split: &Split,
    combined: &Tensor,
    chunk: i64,
) -> Result<Vec<CoverageRow>> {
    let _guard = tch::no_grad_guard();
    if combined.size() != [split.len()] {
        bail!("stage `{stage}`: {:?} predictions for {} examples", combined.size(), split.len());
    }
    let subsets = combination.subsets;
    let classes = subsets.first().map_or(0, ClassSubset::num_classes);
    // Per example: generalist right, any consulted, consulted covering, and counts over the
    // covering specialists (specialist right, generalist right, both), all agree, agree wrongly.
    let parts = train::in_chunks(split.len(), chunk, |start, len| {
        let x = split.range(start, len);
        let labels = split.labels.narrow(0, start, len);
        let (pg, active) = combination.consults(&x)?;
        let zeros = || Tensor::zeros([len], (Kind::Int64, x.device()));
        let (mut spec_right, mut gen_right, mut both_right) = (zeros(), zeros(), zeros());
        let mut covers = Vec::with_capacity(subsets.len());
        let mut picks = Vec::with_capacity(subsets.len());
        for (net, subset) in combination.nets.iter().zip(subsets) {
            let cover = subset.contains(&labels)?;
            let rows = cover.nonzero().squeeze_dim(1);
            let local = subset.to_local(&labels.index_select(0, &rows))?;
            let s = net.forward_t(&x.index_select(0, &rows), false).argmax(1, false);
            let g = subset.merge_outside(&pg.index_select(0, &rows))?.argmax(1, false);
            let (s_ok, g_ok) = (s.eq_tensor(&local), g.eq_tensor(&local));
            let both = s_ok.logical_and(&g_ok);
            for (acc, ok) in [(&mut spec_right, s_ok), (&mut gen_right, g_ok), (&mut both_right, both)] {
                *acc = acc.index_add(0, &rows, &ok.to_kind(Kind::Int64));
            }
            // The specialist's answer as a class id; its dustbin as `classes` (no class).
            let table = Tensor::from_slice(&[subset.classes(), &[classes]].concat()).to_device(x.device());
            picks.push(Tensor::full([len], -1, (Kind::Int64, x.device())).index_copy(0, &rows, &table.take(&s)));
            covers.push(cover);
        }
        let (top, any_active) = (pg.argmax(1, false), active.any_dim(1, false));
        let (agree, agree_wrong) = if subsets.is_empty() {
            (zeros().to_kind(Kind::Bool), zeros().to_kind(Kind::Bool))
        } else {
            let cover = Tensor::stack(&covers, 1);
            let picks = Tensor::stack(&picks, 1);
            let most = picks.masked_fill(&cover.logical_not(), -1).amax(1, false);
            let least = picks.masked_fill(&cover.logical_not(), classes + 1).amin(1, false);
            let several = cover.sum_dim_intlist(1, false, Kind::Int64).ge(2);
            let agree = most.eq_tensor(&least).logical_and(&several);
            let wrong = agree.logical_and(&most.ne_tensor(&labels));
            (agree, wrong)
        };
        let consulted_covering = if subsets.is_empty() {
            zeros().to_kind(Kind::Bool)
        } else {
            active.logical_and(&Tensor::stack(&covers, 1)).any_dim(1, false)
        };
        Ok(Tensor::stack(
            &[top.eq_tensor(&labels), any_active, consulted_covering, agree, agree_wrong]
                .map(|t| t.to_kind(Kind::Int64))
                .into_iter()
                .chain([spec_right, gen_right, both_right])
                .collect::<Vec<_>>(),
            1,
        ))
    })?;
    let per_example = Tensor::cat(&parts, 0);
    let covering = covering_specialists(&split.labels, subsets)?;
    let bins = subsets.len() as i64 + 1;
    let sum_by_bin = |values: &Tensor| -> Result<Vec<i64>> {
        let sums = covering.bincount(Some(&values.to_kind(Kind::Double)), bins);
        Ok(Vec::<f64>::try_from(sums)?.into_iter().map(|v| v.round() as i64).collect())
    };
    let column = |i: i64| sum_by_bin(&per_example.select(1, i));
    let (generalist_ok, consulted, consulted_covering) = (column(0)?, column(1)?, column(2)?);
    let (agree, agree_wrong) = (column(3)?, column(4)?);
    let (spec_right, gen_right, both_right) = (column(5)?, column(6)?, column(7)?);
    let combined_ok = sum_by_bin(&combined.eq_tensor(&split.labels))?;
    let examples = Vec::<i64>::try_from(covering.bincount::<Tensor>(None, bins))?;
    Ok((0..bins as usize)
        .filter(|&c| examples[c] > 0)
        .map(|c| CoverageRow {
            stage: stage.to_string(),
            split: name.into(),
            covering: c as i64,
            examples: examples[c],
            generalist_correct: generalist_ok[c],
            combined_correct: combined_ok[c],
            consulted: consulted[c],
            consulted_covering: Some(consulted_covering[c]),
            pairs: Some(c as i64 * examples[c]),
            specialist_right: Some(spec_right[c]),
            generalist_right: Some(gen_right[c]),
            both_right: Some(both_right[c]),
            covering_agree: Some(agree[c]),
            covering_agree_wrong: Some(agree_wrong[c]),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kd_models::MlpConfig;

    #[test]
    fn near_duplicate_subsets_give_way_to_those_kept_before_them() {
        let s = |c: &[i64]| ClassSubset::new(c.to_vec(), 10).unwrap();
        assert_eq!(overlap(&s(&[0, 1, 2, 3]), &s(&[2, 3, 4, 5])), 2.0 / 6.0);
        assert_eq!(overlap(&s(&[0, 1]), &s(&[0, 1])), 1.0);
        assert_eq!(overlap(&s(&[0, 1]), &s(&[2])), 0.0);
        let items = vec![s(&[0, 1, 2, 3]), s(&[0, 1, 2, 3, 4]), s(&[2, 3, 4, 5]), s(&[6, 7]), s(&[6, 7, 8])];
        // [0..4] overlaps [0..3] by 4/5; [6, 7, 8] overlaps [6, 7] by 2/3.
        let kept = distinct(items.clone(), |s| s, 0.5);
        assert_eq!(kept, [items[0].clone(), items[2].clone(), items[3].clone()]);
        let loose = [&items[0], &items[2], &items[3], &items[4]].map(Clone::clone);
        assert_eq!(distinct(items.clone(), |s| s, 0.7), loose);
        assert_eq!(distinct(items.clone(), |s| s, 1.0), items);
    }

    #[test]
    fn table_4_is_the_same_whatever_the_chunks() {
        let _generator = kd_core::lock_global_generator();
        // A random generalist over 6 classes and two specialists; the combination evaluated and
        // Table 4 counted with chunks of 1, 4 and 1000 examples give the same rows.
        tch::manual_seed(11);
        let (inputs, classes, n) = (5i64, 6i64, 37i64);
        let net = |sizes: Vec<i64>| {
            let vs = nn::VarStore::new(tch::Device::Cpu);
            let net = Mlp::new(&vs.root(), MlpConfig { sizes, ..Default::default() }).unwrap();
            (vs, net)
        };
        let (_g, generalist) = net(vec![inputs, 8, classes]);
        let subsets = vec![ClassSubset::new([0, 1, 2], classes).unwrap(), ClassSubset::new([2, 3], classes).unwrap()];
        let specialists: Vec<_> = subsets.iter().map(|s| net(vec![inputs, 8, s.output_width()])).collect();
        let nets: Vec<Mlp> = specialists.iter().map(|(_, m)| m.frozen()).collect();
        // No early end of eq. 5's descent, which would depend on the other examples of a chunk.
        let cfg = CombineConfig { iterations: 10, tolerance: 0.0, ..CombineConfig::default() };
        let combination = Combination { generalist: &generalist, nets: &nets, subsets: &subsets, top_n: 2, cfg };
        let x = Tensor::randn([n, inputs], (Kind::Float, tch::Device::Cpu)) * 3.0;
        let split = Split::new(x, Tensor::randint(classes, [n], (Kind::Int64, tch::Device::Cpu)));
        let logits = |x: &Tensor| combination.logits(x);
        let table = |chunk: i64| {
            let eval = train::eval::evaluate_in_chunks(&logits, &split, None, classes, chunk).unwrap();
            coverage(("s", "test"), &combination, &split, &eval.predictions, chunk).unwrap()
        };
        let reference = table(1000);
        assert_eq!(reference.iter().map(|r| r.examples).sum::<i64>(), n);
        assert!(reference.iter().any(|r| r.consulted > 0), "{reference:?}");
        for chunk in [1, 4] {
            assert_eq!(table(chunk), reference, "chunk {chunk}");
        }
        // The covering specialists' own answers, counted example by example.
        let labels = Vec::<i64>::try_from(&split.labels).unwrap();
        let mut right = vec![0i64; subsets.len() + 1];
        let mut generalist_right = vec![0i64; subsets.len() + 1];
        for (i, &y) in labels.iter().enumerate() {
            let x = split.images.narrow(0, i as i64, 1);
            let pg = Vec::<f32>::try_from(generalist.forward_t(&x, false).softmax(1, Kind::Float).view([-1])).unwrap();
            let covering: Vec<usize> = (0..subsets.len()).filter(|&m| subsets[m].contains_class(y)).collect();
            for &m in &covering {
                let local = subsets[m].local_index(y).unwrap();
                right[covering.len()] +=
                    i64::from(nets[m].forward_t(&x, false).argmax(1, false).int64_value(&[0]) == local);
                let mut seen: Vec<f32> = subsets[m].classes().iter().map(|&c| pg[c as usize]).collect();
                seen.push(1.0 - seen.iter().sum::<f32>());
                let top = (0..seen.len()).max_by(|&a, &b| seen[a].total_cmp(&seen[b])).unwrap();
                generalist_right[covering.len()] += i64::from(top as i64 == local);
            }
        }
        for r in &reference {
            assert_eq!(r.specialist_right, Some(right[r.covering as usize]), "{r:?}");
            assert_eq!(r.generalist_right, Some(generalist_right[r.covering as usize]), "{r:?}");
            assert_eq!(r.pairs, Some(r.covering * r.examples));
            assert!(r.both_right <= r.specialist_right.min(r.generalist_right), "{r:?}");
        }
        assert!(reference.iter().any(|r| r.specialist_right > Some(0)), "{reference:?}");
        // Predictions of another length are refused, not truncated.
        let short = Tensor::zeros([n - 1], (Kind::Int64, tch::Device::Cpu));
        assert!(coverage(("s", "test"), &combination, &split, &short, 4).is_err());
    }
}
