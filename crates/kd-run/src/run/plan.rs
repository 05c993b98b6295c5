//! The plan of a run: which stages are skipped, which run, which run again from scratch, and which
//! recorded results are dropped. A pure function of the experiment's stages, what the run
//! directory holds and the command line, so every resume rule is tested here without a run.

/// What the plan needs to know of a stage of the experiment.
#[derive(Clone, Debug)]
pub struct StageFacts {
    pub name: String,
    /// The stages whose models (or subsets) it reads.
    pub reads: Vec<String>,
    /// Whether it trains a model that a later stage may read (train and distill stages).
    pub trains: bool,
    /// Whether it is a specialists stage, whose specialist m `--only <stage>.<m>` selects.
    pub specialists: bool,
}

/// What the run directory holds, as read at start.
#[derive(Clone, Debug, Default)]
pub struct Recorded {
    /// Stages listed in `done.csv`: their results are committed.
    pub done: Vec<String>,
    /// Stages with result rows (summary or subsets), committed or not.
    pub results: Vec<String>,
    /// Every stage name any table holds a row of (a variant's rows, such as a bias_shift stage's
    /// fixed shift, are rows of their stage).
    pub rows: Vec<String>,
}

/// What the command line asks for.
#[derive(Clone, Copy, Debug, Default)]
pub struct Request<'a> {
    /// `--only`: run only these stages (`<stage>.<m>`: specialist m of a specialists stage).
    pub only: &'a [String],
    /// `--redo`: run these stages again from scratch, with the stages that read them.
    pub redo: &'a [String],
}

/// Why a stage's earlier results and checkpoints are discarded before the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Discard {
    /// Its results were not all written: the run was stopped while the stage committed them.
    Partial,
    /// The experiment file no longer has the stage.
    Stale,
    /// Its settings (or those of a stage it reads) differ from the earlier run's.
    Changed,
    /// `--redo` named it, or a stage it reads.
    Redo,
}

/// What happens to a stage in this run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Its results are committed, the checkpoint a later stage reads exists, and no stage it
    /// reads runs again.
    SkipDone,
    /// `--only` does not select it.
    NotSelected,
    /// It runs (resuming from its per-epoch checkpoint if it has one). `specialists` lists the
    /// specialists `--only <stage>.<m>` selects; empty: the whole stage.
    Run { specialists: Vec<usize> },
}

/// The plan of a run, in the experiment's stage order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Stages (or former stages) whose recorded results and checkpoints are discarded first.
    pub discard: Vec<(String, Discard)>,
    /// One action per stage of the experiment.
    pub actions: Vec<(String, Action)>,
}

impl Plan {
    /// Whether the tables change before any stage runs.
    pub fn discards(&self) -> bool {
        !self.discard.is_empty()
    }
}

/// The named stages and every stage that reads a model from one of them, directly or through
/// other stages, in stage order.
pub fn with_readers(stages: &[StageFacts], names: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for stage in stages {
        if names.contains(&stage.name) || stage.reads.iter().any(|s| out.contains(s)) {
            out.push(stage.name.clone());
        }
    }
    out
}

/// Plans a run. `changed` are the stages whose settings differ from the earlier run's (with
/// their readers, as [`with_readers`] gives them); `checkpoint` says whether a stage's final
/// checkpoint exists now.
///
/// The rules: a stage with uncommitted results is discarded and runs again; rows of stages the
/// file no longer has are dropped (with their variants' rows); a changed or
/// `--redo` stage is discarded with its readers. Then, in file order, a stage is skipped when its
/// results are committed, the checkpoint a later stage reads exists, and no stage it reads runs
/// in this process; otherwise it runs if `--only` selects it (or there is no `--only`). An
/// `--only` process discards only the stages it runs, and rows of stages gone from the file.
pub fn plan(
    stages: &[StageFacts],
    recorded: &Recorded,
    changed: &[String],
    request: Request,
    checkpoint: &dyn Fn(&str) -> bool,
) -> Plan {
    let mut plan = Plan::default();
    let in_file = |name: &str| stages.iter().any(|s| s.name == name);
    for stage in stages {
        if recorded.results.contains(&stage.name) && !recorded.done.contains(&stage.name) {
            plan.discard.push((stage.name.clone(), Discard::Partial));
        }
    }
    let mut stale: Vec<String> = recorded.rows.iter().filter(|r| !in_file(r)).cloned().collect();
    stale.sort();
    stale.dedup();
    plan.discard.extend(stale.into_iter().map(|s| (s, Discard::Stale)));
    let mut rerun: Vec<String> = changed.to_vec();
    for stage in changed {
        plan.discard.push((stage.clone(), Discard::Changed));
    }
    for stage in with_readers(stages, request.redo) {
        if !rerun.contains(&stage) {
            plan.discard.push((stage.clone(), Discard::Redo));
            rerun.push(stage);
        }
    }

    let discarded = |name: &str| plan.discard.iter().any(|(s, _)| s == name);
    let read: Vec<&str> = stages.iter().flat_map(|s| s.reads.iter().map(String::as_str)).collect();
    let mut ran: Vec<&str> = Vec::new();
    let mut actions = Vec::with_capacity(stages.len());
    for stage in stages {
        let name = stage.name.as_str();
        let needed = stage.trains && read.contains(&name);
        let done = recorded.done.iter().any(|d| d == name)
            && !discarded(name)
            && (!needed || checkpoint(name))
            && !stage.reads.iter().any(|s| ran.contains(&s.as_str()));
        let action = if done {
            Action::SkipDone
        } else {
            let specialists: Vec<usize> = request
                .only
                .iter()
                .filter_map(|o| o.strip_prefix(&format!("{name}."))?.parse().ok())
                .filter(|_| stage.specialists)
                .collect();
            if !request.only.is_empty() && !request.only.iter().any(|o| o == name) && specialists.is_empty() {
                Action::NotSelected
            } else {
                ran.push(name);
                Action::Run { specialists }
            }
        };
        actions.push((stage.name.clone(), action));
    }
    plan.actions = actions;
    // An `--only` process discards only what it runs (and stages gone from the file): another
    // process may be running the other stages into the same directory right now, and dropping
    // their rows here would lose the results it commits.
    if !request.only.is_empty() {
        let runs = |name: &str| plan.actions.iter().any(|(s, a)| s == name && matches!(a, Action::Run { .. }));
        plan.discard.retain(|(stage, why)| *why == Discard::Stale || runs(stage));
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(name: &str, reads: &[&str], trains: bool) -> StageFacts {
        StageFacts {
            name: name.into(),
            reads: reads.iter().map(|s| s.to_string()).collect(),
            trains,
            specialists: name.starts_with("spec"),
        }
    }

    /// teacher -> student (distilled from it) -> eval (evaluates the student); `other` alone.
    fn chain() -> Vec<StageFacts> {
        vec![
            stage("teacher", &[], true),
            stage("student", &["teacher"], true),
            stage("eval", &["student"], false),
            stage("other", &[], true),
        ]
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn done(stages: &[&str]) -> Recorded {
        Recorded { done: names(stages), results: names(stages), rows: names(stages) }
    }

    fn actions(plan: &Plan) -> Vec<(&str, &Action)> {
        plan.actions.iter().map(|(s, a)| (s.as_str(), a)).collect()
    }

    const RUN: Action = Action::Run { specialists: Vec::new() };

    #[test]
    fn a_new_run_runs_every_stage_and_discards_nothing() {
        let plan = plan(&chain(), &Recorded::default(), &[], Request::default(), &|_| false);
        assert!(plan.discard.is_empty());
        assert!(plan.actions.iter().all(|(_, a)| *a == RUN));
    }

    #[test]
    fn a_finished_run_skips_every_stage() {
        let plan = plan(&chain(), &done(&["teacher", "student", "eval", "other"]), &[], Request::default(), &|_| true);
        assert!(plan.discard.is_empty());
        assert!(plan.actions.iter().all(|(_, a)| *a == Action::SkipDone));
    }

    #[test]
    fn a_read_checkpoint_that_is_gone_reruns_its_stage_and_its_readers() {
        let recorded = done(&["teacher", "student", "eval", "other"]);
        let plan = plan(&chain(), &recorded, &[], Request::default(), &|s| s != "teacher");
        let a = actions(&plan);
        assert_eq!(a[0], ("teacher", &RUN));
        assert_eq!(a[1], ("student", &RUN), "it reads a stage that ran again");
        assert_eq!(a[2], ("eval", &RUN));
        assert_eq!(a[3], ("other", &Action::SkipDone), "nothing reads `other`: its checkpoint is not needed");
    }

    #[test]
    fn uncommitted_results_are_discarded_and_the_stage_runs_again() {
        let mut recorded = done(&["teacher"]);
        recorded.results.push("student".into());
        let plan = plan(&chain(), &recorded, &[], Request::default(), &|_| true);
        assert_eq!(plan.discard, vec![("student".to_string(), Discard::Partial)]);
        assert_eq!(actions(&plan)[0], ("teacher", &Action::SkipDone));
        assert_eq!(actions(&plan)[1], ("student", &RUN));
    }

    #[test]
    fn rows_of_stages_the_file_no_longer_has_are_dropped_with_their_variants() {
        use super::super::output::SummaryRow;
        use super::super::tables::Tables;
        // summary.csv as written before rows had a variant (the fixed shift's row named
        // `<stage>-fixed`), and since.
        let head = "kind,model,parameters,val_errors,test_errors,test_accuracy,shift,seconds";
        let row = "bias_shift,mlp 4-10,50,,5,0.9,1.5,1";
        let old = format!("stage,{head}\nteacher,{row}\nteacher-fixed,{row}\ngone,{row}\ngone-fixed,{row}\n");
        let new = format!("stage,variant,{head}\nteacher,,{row}\nteacher,fixed,{row}\ngone,,{row}\ngone,fixed,{row}\n");
        for (text, stale) in [(old, names(&["gone", "gone-fixed"])), (new, names(&["gone"]))] {
            let summary: Vec<SummaryRow> =
                csv::Reader::from_reader(text.as_bytes()).deserialize().collect::<Result<_, _>>().unwrap();
            let done = names(&["teacher", "gone"]).into_iter().map(|stage| super::super::output::DoneRow { stage });
            let tables = Tables { summary, done: done.collect(), ..Default::default() };
            let stages: Vec<String> = chain().into_iter().map(|s| s.name).collect();
            let recorded = tables.in_order(stages).recorded();
            assert!(
                recorded.rows.contains(&"teacher".to_string()) && !recorded.rows.iter().any(|r| r == "teacher-fixed")
            );
            let plan = plan(&chain(), &recorded, &[], Request::default(), &|_| true);
            let discarded: Vec<Discard> = stale.iter().map(|_| Discard::Stale).collect();
            assert_eq!(plan.discard, stale.into_iter().zip(discarded).collect::<Vec<_>>(), "{text}");
            assert_eq!(actions(&plan)[0], ("teacher", &Action::SkipDone));
        }
    }

    #[test]
    fn a_changed_stage_and_redo_rerun_with_their_readers_only() {
        let recorded = done(&["teacher", "student", "eval", "other"]);
        let changed = with_readers(&chain(), &names(&["student"]));
        assert_eq!(changed, names(&["student", "eval"]));
        let plan = plan(&chain(), &recorded, &changed, Request::default(), &|_| true);
        let a = actions(&plan);
        assert_eq!(a[0], ("teacher", &Action::SkipDone));
        assert_eq!(a[1], ("student", &RUN));
        assert_eq!(a[2], ("eval", &RUN));
        assert_eq!(a[3], ("other", &Action::SkipDone));

        let redo = names(&["teacher"]);
        let plan = super::plan(&chain(), &recorded, &[], Request { only: &[], redo: &redo }, &|_| true);
        assert_eq!(
            plan.discard,
            vec![
                ("teacher".to_string(), Discard::Redo),
                ("student".to_string(), Discard::Redo),
                ("eval".to_string(), Discard::Redo)
            ]
        );
        assert_eq!(actions(&plan)[3], ("other", &Action::SkipDone));
        assert!(plan.actions[..3].iter().all(|(_, a)| *a == RUN));
    }

    #[test]
    fn only_selects_stages_and_single_specialists() {
        let mut stages = chain();
        stages.push(stage("spec", &["teacher"], false));
        let only = names(&["other", "spec.2", "spec.0", "eval.1"]);
        let plan = plan(&stages, &done(&["teacher"]), &[], Request { only: &only, redo: &[] }, &|_| true);
        let a = actions(&plan);
        assert_eq!(a[0], ("teacher", &Action::SkipDone), "a done stage is reported done even if not selected");
        assert_eq!(a[1], ("student", &Action::NotSelected));
        assert_eq!(a[2], ("eval", &Action::NotSelected), "`eval.1` names no specialist of a non-specialists stage");
        assert_eq!(a[3], ("other", &RUN));
        assert_eq!(a[4], ("spec", &Action::Run { specialists: vec![2, 0] }));
    }

    #[test]
    fn an_only_process_leaves_the_records_of_stages_it_does_not_run_alone() {
        // `eval` is new to the recorded configuration (changed) and has partial results, as when
        // another `--only` process is running it; this one runs `student` only.
        let mut recorded = done(&["teacher"]);
        recorded.results.push("eval".into());
        recorded.rows.extend(["eval".to_string(), "gone".to_string()]);
        let changed = names(&["student", "eval"]);
        let only = names(&["student"]);
        let plan = plan(&chain(), &recorded, &changed, Request { only: &only, redo: &[] }, &|_| true);
        assert_eq!(
            plan.discard,
            vec![("gone".to_string(), Discard::Stale), ("student".to_string(), Discard::Changed)],
            "{plan:?}"
        );
        assert_eq!(actions(&plan)[2], ("eval", &Action::NotSelected));
    }

    #[test]
    fn a_stage_not_selected_does_not_make_its_readers_run_again() {
        let recorded = done(&["student", "eval"]);
        let only = names(&["eval"]);
        let plan = plan(&chain(), &recorded, &[], Request { only: &only, redo: &[] }, &|_| true);
        let a = actions(&plan);
        assert_eq!(a[0], ("teacher", &Action::NotSelected));
        assert_eq!(a[1], ("student", &Action::SkipDone));
        assert_eq!(a[2], ("eval", &Action::SkipDone));
    }
}
