use super::names::{name_problem, MAX_NAME_LEN};
use super::raw::line_of;
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

/// The folder [`parse`] writes its files into: relative paths in them resolve against it.
fn folder() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("kd-config-test-{}", std::process::id()))
}

/// Writes `text` into [`folder`], loads it, and removes the file and the folder again: one call
/// at a time (the tests run in parallel threads), so that no call removes the folder another
/// is writing into and no test run leaves a folder behind.
fn parse_with(text: &str, overrides: &[&str]) -> Result<Experiment> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = folder();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("experiment.toml");
    std::fs::write(&path, text)?;
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let out = load(&path, &overrides);
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir(&dir);
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
    assert_eq!(e.device, crate::device::Choice::Auto);
    let Job::Train(TrainJob { model, training }) = &e.stages[0].job else { panic!("train stage") };
    assert_eq!(model.hidden, [8, 8]);
    assert_eq!((training.epochs, training.jitter, model.max_norm), (2, 2, Some(3.5)));
    let Job::Distill(DistillJob { training, distill, .. }) = &e.stages[1].job else { panic!("distill stage") };
    assert_eq!(training.epochs, 5, "stage value overrides [defaults]");
    assert_eq!(training.jitter, 0, "transfer set without translations by default");
    assert_eq!(distill.teacher, ModelSource::Stage("teacher".into()));
    assert_eq!((distill.temperature, distill.hard_weight, distill.soft_weight), (20.0, 0.0, 1.0));
    let seed = |s: &Stage| match &s.job {
        Job::Train(TrainJob { training, .. }) | Job::Distill(DistillJob { training, .. }) => training.seed,
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
    let Job::Distill(DistillJob { model, distill, .. }) = &e.stages[2].job else { panic!() };
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
    assert_eq!(
        e.stages[3].job,
        Job::Ensemble(EnsembleJob { members: members.clone() }),
        "a sweep's base name lists its stages"
    );
    let Job::Distill(DistillJob { distill, .. }) = &e.stages[4].job else { panic!() };
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
            format!("\n[[stages]]\nname = \"t{i}\"\nkind = \"evaluate\"\ncheckpoint = \"runs/r{i}/t.safetensors\"\n")
        })
        .collect::<String>();
    let text =
        format!("{GOOD}{evaluated}\n[[stages]]\nname = \"both\"\nkind = \"ensemble\"\nmembers = [\"t1\", \"t2\"]\n");
    let e = parse(&text).unwrap();
    let members = vec![ModelSource::Stage("t1".into()), ModelSource::Stage("t2".into())];
    assert_eq!(e.stages.last().unwrap().job, Job::Ensemble(EnsembleJob { members }));
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
    let Job::Clusters(ClustersJob { affinity, clusters, repeats, min_size, max_size, count, .. }) = &e.stages[2].job
    else {
        panic!("clusters stage")
    };
    assert_eq!(
        (*affinity, *clusters, *repeats, *min_size, *max_size, *count),
        (Affinity::Covariance, 4, 1, 2, None, None)
    );
    let Job::Specialists(SpecialistsJob { training, top_n, combine_iterations, examples, .. }) = &e.stages[3].job
    else {
        panic!("specialists stage")
    };
    assert_eq!((training.epochs, *top_n, *combine_iterations, *examples), (2, 1, 100, None), "[defaults] apply");
    assert_eq!(e.stages[3].job.reads(), ["teacher", "groups"]);
    assert!(e.to_toml().unwrap().contains("affinity = \"covariance\""));
    assert!(!e.to_toml().unwrap().contains("extra_clusters"), "unset, so earlier runs' files stay the same");
    let more =
        parse(&text.replace("clusters = 4\n", "clusters = 4\nextra_clusters = [3, 6]\nmax_overlap = 0.5\n")).unwrap();
    let Job::Clusters(ClustersJob { extra_clusters, max_overlap, .. }) = &more.stages[2].job else {
        panic!("clusters stage")
    };
    assert_eq!((extra_clusters.as_slice(), *max_overlap), (&[3i64, 6][..], Some(0.5)));
    let all = parse(&text.replace("clusters = 4\n", "clusters = 4\nextra_clusters = []\nmax_overlap = 1\n")).unwrap();
    assert_eq!(all.to_toml().unwrap(), e.to_toml().unwrap(), "no extra clusters and a bound of 1 are the defaults");

    for (bad, msg) in [
        (text.replace("clusters = 4\n", ""), "needs `clusters = K`"),
        (
            text.replace("clusters = 4\n", "clusters = 4\nmin_size = 5\nmax_size = 3\n"),
            "max_size = 3 is below min_size = 5",
        ),
        (text.replace("subsets = \"groups\"", "subsets = \"teacher\""), "must name an earlier clusters stage"),
        (text.replace("subsets = \"groups\"\n", ""), "needs `subsets ="),
        (text.replace("subsets = \"groups\"", "subsets = \"groups\"\ntemperature = 2"), "`temperature` does not apply"),
        (text.replace("clusters = 4\n", "clusters = 4\nepochs = 3\n"), "`epochs` does not apply to a clusters stage"),
        (text.replace("clusters = 4\n", "clusters = 4\naffinity = \"cosine\"\n"), "unknown variant `cosine`"),
        (text.replace("clusters = 4\n", "clusters = 4\nmax_overlap = 1.5\n"), "a number in (0, 1]"),
        (text.replace("clusters = 4\n", "clusters = 4\nextra_clusters = [0]\n"), "extra_clusters"),
        (format!("{text}[[stages]]\nname = \"e\"\nkind = \"evaluate\"\nfrom = \"experts\"\n"), "makes no single model"),
        (text.replace("validation = 100", "validation = 0"), "predictions on the validation split"),
    ] {
        let err = format!("{:#}", parse(&bad).unwrap_err());
        assert!(err.contains(msg), "{msg}: {err}");
    }
}

#[test]
fn train_fraction_and_early_stopping_resolve_and_serialize_only_when_set() {
    let text = GOOD.replace("epochs = 5\n", "epochs = 5\ntrain_fraction = 0.03\nearly_stopping = { patience = 4 }\n");
    let e = parse(&text).unwrap();
    let Job::Train(TrainJob { training, .. }) = &e.stages[0].job else { panic!() };
    assert_eq!((training.train_fraction, training.patience), (1.0, None));
    let Job::Distill(DistillJob { training, .. }) = &e.stages[1].job else { panic!() };
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
        Job::Distill(DistillJob { distill, .. }) => distill.clone(),
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
    let e = parse(&GOOD.replace("seed = 3\n", "seed = 3\nprecision = \"tf32\"\n")).unwrap();
    assert_eq!((e.precision, e.precision.kind()), (Precision::Tf32, tch::Kind::Float));
    assert!(e.to_toml().unwrap().contains("precision = \"tf32\""));
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
    let DataSource::Files(f) = &e.data.source else { panic!("files data") };
    assert_eq!((f.left, f.right, f.classes), (3, 1, Some(50)));
    assert_eq!(f.validation.lengths, Some(folder().join("bn.npy")), "relative to the file's folder");
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
    let Job::Distill(DistillJob { distill, .. }) = &e.stages[1].job else { panic!() };
    assert_eq!((distill.transfer_exclude.as_slice(), distill.transfer_only.len()), ([3].as_slice(), 0));
    assert_eq!(e.stages[1].paper.as_ref().and_then(|p| p.class_errors), Some(133.0));
    let Job::BiasShift(BiasShiftJob { source, classes, min, max, step, fixed }) = &e.stages[2].job else { panic!() };
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
    let DataSource::Speech(s) = &e.data.source else { panic!("speech data") };
    assert_eq!((s.left, s.right, s.corpus.states, s.corpus.noise), (3, 1, 120, 0.3));
    assert_eq!(s.corpus.phones, super::CorpusConfig::default().phones, "other keys keep defaults");
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
    let Job::Train(TrainJob { training, .. }) = &e.stages[0].job else { panic!() };
    assert_eq!([training.lr(0), training.lr(1), training.lr(3)], [0.1, 0.05, 0.0125]);
    assert_eq!([training.momentum(0), training.momentum(2), training.momentum(9)], [0.5, 0.7, 0.9]);
}

#[test]
fn overrides_change_values_and_are_validated() {
    let e = parse_with(GOOD, &["seed=7", "stages.student.temperature=4", "defaults.epochs=1"]).unwrap();
    assert_eq!(e.seed, 7);
    let Job::Distill(DistillJob { distill, .. }) = &e.stages[1].job else { panic!() };
    assert_eq!(distill.temperature, 4.0);
    let Job::Train(TrainJob { training, .. }) = &e.stages[0].job else { panic!() };
    assert_eq!(training.epochs, 1);
    let err = parse_with(GOOD, &["stages.student.temperature=-1"]).unwrap_err().to_string();
    assert!(
        err.contains("with --set `stages.student.temperature=-1`: ")
            && err.contains("expected a temperature in [0.01, 1e6]")
            && err.contains("got -1"),
        "the override quoted as typed: {err}"
    );
    let err = parse_with(GOOD, &["device=gpu"]).unwrap_err().to_string();
    assert!(
        err.ends_with(
            ".toml with --set `device=gpu`: device: expected \"auto\", \"cpu\", \"cuda\" or \"cuda:N\", got \"gpu\""
        ),
        "no line of the rewritten file: {err}"
    );
    let err = parse_with(GOOD, &["stages.nobody.epochs=1"]).unwrap_err();
    assert!(format!("{err:#}").contains("no stage named `nobody`"), "{err:#}");
    // A stage name with dots is found whole.
    let dotted = GOOD.replace("name = \"student\"", "name = \"student.v1.2\"");
    let e =
        parse_with(&dotted, &["stages.student.v1.2.temperature=6", "stages.student.v1.2.model.hidden=[7]"]).unwrap();
    let Job::Distill(DistillJob { distill, .. }) = &e.stages[1].job else { panic!() };
    assert_eq!(distill.temperature, 6.0);
    let err = parse_with(&dotted, &["stages.student.epochs=1"]).unwrap_err();
    assert!(format!("{err:#}").contains("no stage named `student`"), "{err:#}");
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
    for bad in ["", ".", "..", "../x", "../../x", "/tmp/x", "a/b", "a\\b", ".hidden", "-x", "a b", "a\0b", "a\nb", "é"]
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
fn every_shipped_experiment_file_loads_and_its_record_resolves_to_it() {
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
        let e = load(file, &[]).unwrap_or_else(|e| panic!("{e:#}")); // names the file
                                                                     // What a run records is an experiment file that resolves to the same experiment, from
                                                                     // any folder, and reads back as the record.
        let record = e.to_experiment_file();
        let back = parse(&record).unwrap_or_else(|err| panic!("{}: its record: {err:#}\n{record}", file.display()));
        assert_eq!(back, e, "{}: its record resolves to another experiment:\n{record}", file.display());
        assert_eq!(read_record(&record, Path::new("/elsewhere/config.toml")).unwrap(), e);
    }
}

#[test]
fn a_sweep_records_each_stage_s_point_beside_its_name() {
    let text = GOOD.replace("epochs = 5\n", "epochs = 5\nsweep = { temperature = [2, 4.5], seed = [7] }\n");
    let e = parse(&text).unwrap();
    let points: Vec<(&str, &SweepPoint)> =
        e.stages.iter().filter_map(|s| Some((s.name.as_str(), s.sweep.as_ref()?))).collect();
    assert_eq!(points.len(), 2, "the teacher is no sweep point");
    assert_eq!(points[0].0, "student-T2-s7");
    assert_eq!(
        points[1].1,
        &SweepPoint { base: "student".into(), temperature: Some(4.5), hidden: None, seed: Some(7) }
    );
    let Job::Distill(DistillJob { distill, training, .. }) = &e.stages[2].job else { panic!("distill stage") };
    assert_eq!((distill.temperature, training.seed), (4.5, 7), "the point is the stage's settings");
    let hidden = GOOD.replace("epochs = 5\n", "epochs = 5\nsweep = { hidden = [[3], [5, 5]] }\n");
    let e = parse(&hidden).unwrap();
    assert_eq!(e.stages[2].name, "student-h5x5");
    assert_eq!(e.stages[2].sweep.as_ref().unwrap().hidden, Some(vec![5, 5]));
    assert_eq!(e.stages[2].sweep.as_ref().unwrap().temperature, None);
}

/// The resolved experiment of every experiment file in the repository reads back as itself from
/// the `config.toml` a run writes.
#[test]
fn every_experiment_round_trips_through_config_toml() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments");
    let mut files = vec![];
    for dir in [root.clone(), root.join("mnist"), root.join("speech"), root.join("specialists")] {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|x| x == "toml") {
                files.push(path);
            }
        }
    }
    assert!(files.len() > 20, "{files:?}");
    let files_data = "name = \"f\"\n[data]\nkind = \"files\"\ncontext = [3, 2]\nclasses = 7\n\
        [data.files]\ntrain = { features = \"a.npy\", labels = \"b.npy\", lengths = \"c.npy\" }\n\
        validation = { features = \"a.ark\", labels = \"b.ark\" }\ntest = { features = \"a.scp\", labels = \"b.ark\" }\n\
        [[stages]]\nname = \"t\"\nkind = \"train\"\nmodel = { hidden = [4] }\nepochs = 1\nbatch_size = 2\n\
        optimizer = { kind = \"adam\", lr = 0.1 }\n";
    let sweep = GOOD.replace("epochs = 5\n", "epochs = 5\nsweep = { temperature = [2, 4.5], hidden = [[3]] }\n");
    let mut experiments: Vec<Experiment> = files.iter().map(|f| load(f, &[]).unwrap()).collect();
    experiments.push(parse(files_data).unwrap());
    experiments.push(parse(&sweep).unwrap());
    for e in experiments {
        let text = e.to_toml().unwrap();
        let back: Experiment = toml::from_str(&text).unwrap_or_else(|err| panic!("{}: {err}\n{text}", e.name));
        assert_eq!(back, e, "{}", e.name);
        assert_eq!(back.to_toml().unwrap(), text, "{}", e.name);
    }
}

/// A `config.toml` written before stages recorded their sweep point (and before other optional
/// fields existed) still reads: the run in `docs/results/mnist/runs/` and a minimal one.
#[test]
fn an_older_config_toml_reads_with_defaults() {
    let record = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../docs/results/mnist/runs/mnist_temperature/config.toml");
    let text = std::fs::read_to_string(record).unwrap();
    assert!(!text.contains("sweep"));
    let e: Experiment = toml::from_str(&text).unwrap();
    assert_eq!(e.stages.len(), 54);
    assert!(e.stages.iter().all(|s| s.sweep.is_none()));
    assert!(matches!(&e.data.source, DataSource::Mnist { dir } if dir.as_os_str() == "data/mnist"));
    let old = "name = \"o\"\ndevice = \"cpu\"\n[data]\ndir = \"d\"\n[[stages]]\nname = \"t\"\nkind = \"train\"\n\
        [stages.model]\nhidden = [4]\ninput_dropout = 0.0\nhidden_dropout = 0.0\n\
        [stages.training]\nepochs = 1\nbatch_size = 2\njitter = 0\nseed = 5\n\
        [stages.training.optimizer]\nkind = \"sgd\"\nlr = 0.1\nmomentum = 0.0\nmomentum_start = 0.0\n\
        momentum_ramp_epochs = 0\nnesterov = false\nweight_decay = 0.0\nbeta1 = 0.9\nbeta2 = 0.999\neps = 1e-8\n\
        [stages.training.schedule]\nkind = \"constant\"\ngamma = 1.0\nevery = 1\nmin_lr = 0.0\n";
    let e: Experiment = toml::from_str(old).unwrap();
    assert_eq!((e.seed, e.threads, e.precision, e.description.as_str()), (0, 0, Precision::F32, ""));
    let Job::Train(TrainJob { training, model }) = &e.stages[0].job else { panic!("train stage") };
    assert_eq!((training.train_fraction, training.patience, model.max_norm), (1.0, None, None));
    // Data that names no source, or two, is no experiment.
    let two = old.replace("dir = \"d\"\n", "dir = \"d\"\n[data.speech]\nleft = 1\nright = 1\n[data.speech.corpus]\n");
    let err = toml::from_str::<Experiment>(&two).unwrap_err().to_string();
    assert!(err.contains("exactly one of `dir`, `speech`, `files` and `store`"), "{err}");
}

/// Each kind's keys as the error messages list them.
const KIND_KEYS: [(&str, &str); 7] = [
    (
        "train",
        "model, seed, epochs, batch_size, optimizer, schedule, jitter, train_fraction, early_stopping, sweep, paper",
    ),
    (
        "distill",
        "model, seed, epochs, batch_size, optimizer, schedule, jitter, train_fraction, early_stopping, sweep, paper, \
         teacher, teacher_checkpoint, teacher_top_k, teacher_translations, temperature, hard_weight, soft_weight, \
         objective, transfer_exclude, transfer_only, sha256",
    ),
    ("evaluate", "from, checkpoint, paper, sha256"),
    ("bias_shift", "from, checkpoint, classes, shifts, fixed_shift, paper, sha256"),
    ("ensemble", "members, paper"),
    (
        "clusters",
        "from, checkpoint, affinity, clusters, walk_steps, repeats, min_size, max_size, count, kmeans, seed, paper, \
         extra_clusters, max_overlap, sha256",
    ),
    (
        "specialists",
        "from, checkpoint, subsets, seed, epochs, batch_size, optimizer, schedule, early_stopping, examples, top_n, \
         combine_iterations, paper, sha256",
    ),
];

#[test]
fn each_stage_key_is_declared_once_with_a_distinct_place() {
    let mut names: Vec<&str> = raw::STAGE_KEYS.iter().map(|k| k.key).collect();
    let mut places: Vec<u32> = raw::STAGE_KEYS.iter().map(|k| k.place).collect();
    names.sort_unstable();
    names.dedup();
    places.sort_unstable();
    places.dedup();
    assert_eq!(names.len(), raw::STAGE_KEYS.len());
    assert_eq!(places.len(), raw::STAGE_KEYS.len(), "two keys share a place");
    for (kind, keys) in KIND_KEYS {
        let kind: StageKind = toml::Value::String(kind.into()).try_into().expect("a stage kind");
        assert_eq!(kind.accepted_keys().join(", "), keys, "{kind:?}");
    }
}

#[test]
fn every_kind_accepts_its_keys_and_rejects_every_other() {
    // One well-typed value per key; a key declared without one here fails the test.
    let values = [
        ("model", "{ hidden = [4] }"),
        ("seed", "1"),
        ("epochs", "1"),
        ("batch_size", "8"),
        ("optimizer", "{ kind = \"sgd\", lr = 0.1 }"),
        ("schedule", "{ kind = \"exponential\", gamma = 0.5 }"),
        ("jitter", "1"),
        ("train_fraction", "0.5"),
        ("early_stopping", "{ patience = 2 }"),
        ("teacher", "\"teacher\""),
        ("teacher_checkpoint", "\"t.safetensors\""),
        ("teacher_top_k", "2"),
        ("teacher_translations", "1"),
        ("temperature", "2.0"),
        ("hard_weight", "0.5"),
        ("soft_weight", "0.5"),
        ("objective", "\"logits\""),
        ("transfer_exclude", "[1]"),
        ("transfer_only", "[1]"),
        ("from", "\"teacher\""),
        ("checkpoint", "\"t.safetensors\""),
        ("classes", "[1]"),
        ("shifts", "{ min = 0.0, max = 1.0, step = 0.5 }"),
        ("fixed_shift", "1.0"),
        ("members", "[\"teacher\"]"),
        ("affinity", "\"confusion\""),
        ("clusters", "2"),
        ("walk_steps", "1"),
        ("repeats", "1"),
        ("min_size", "1"),
        ("max_size", "2"),
        ("count", "1"),
        ("kmeans", "{ iterations = 1 }"),
        ("extra_clusters", "[1]"),
        ("max_overlap", "0.5"),
        ("subsets", "\"groups\""),
        ("examples", "10"),
        ("top_n", "1"),
        ("combine_iterations", "1"),
        ("paper", "{ test_errors = 1.0 }"),
        ("sha256", "\"0000000000000000000000000000000000000000000000000000000000000000\""),
    ];
    let base = GOOD.split("[[stages]]\nname = \"student\"").next().expect("GOOD has a student");
    for key in raw::STAGE_KEYS {
        // A sweep is expanded into stages before the keys are checked; the keys it sets are.
        if key.key == "sweep" {
            continue;
        }
        let value = values.iter().find(|(k, _)| *k == key.key).map(|(_, v)| v);
        let value = value.unwrap_or_else(|| panic!("no test value for the stage key `{}`", key.key));
        for (kind, keys) in KIND_KEYS {
            let text = format!("{base}[[stages]]\nname = \"probe\"\nkind = \"{kind}\"\n{} = {value}\n", key.key);
            let line = text.lines().position(|l| l == "name = \"probe\"").expect("probe stage") + 1;
            let rejected =
                format!("{line}: stage `probe`: `{}` does not apply to a {kind} stage (its keys: {keys})", key.key);
            let msg = parse(&text).err().map(|e| format!("{e:#}")).unwrap_or_default();
            let kind_value: StageKind = toml::Value::String(kind.into()).try_into().expect("a stage kind");
            if key.kinds.contains(&kind_value) {
                assert!(!msg.contains("does not apply to a"), "{kind} should accept `{}`: {msg}", key.key);
            } else {
                assert!(msg.contains(&rejected), "{kind} should reject `{}`:\n{msg}\nexpected: {rejected}", key.key);
            }
        }
    }
}

#[test]
fn a_checkpoint_file_s_sha256_is_pinned_in_lower_case_and_checked_for_form() {
    let hex = "ADE61437b8f9b89858130477257f16cf9a57fcdbf72384f76c96135ffd420c4f";
    let stage = |extra: &str| {
        format!("{GOOD}[[stages]]\nname = \"eval\"\nkind = \"evaluate\"\ncheckpoint = \"t.safetensors\"\n{extra}\n")
    };
    let e = parse(&stage(&format!("sha256 = \"{hex}\""))).unwrap();
    let pinned =
        ModelSource::PinnedCheckpoint { path: folder().join("t.safetensors"), sha256: hex.to_ascii_lowercase() };
    assert_eq!(e.stages[2].job, Job::Evaluate(EvaluateJob { source: pinned.clone() }));
    // Recorded in config.toml and read back; without a pin the form runs wrote before stays.
    let back: Experiment = toml::from_str(&e.to_toml().unwrap()).unwrap();
    assert_eq!(back.stages[2].job, Job::Evaluate(EvaluateJob { source: pinned }));
    let plain = parse(&stage("")).unwrap();
    assert_eq!(
        plain.stages[2].job,
        Job::Evaluate(EvaluateJob { source: ModelSource::Checkpoint(folder().join("t.safetensors")) })
    );
    // Not 64 hexadecimal digits: the parser's error, at the key's line.
    for bad in [&hex[1..], &format!("{}g", &hex[1..]), "", &format!("{hex}0")] {
        let text = stage(&format!("sha256 = \"{bad}\""));
        let line = text.lines().position(|l| l.starts_with("sha256")).unwrap() + 1;
        let msg = format!("{:#}", parse(&text).unwrap_err());
        assert!(msg.contains("64 hexadecimal digits") && msg.contains(&format!("line {line}")), "{bad}: {msg}");
    }
    // A pin beside a stage of this run (whose checkpoint the run writes) is an error, not ignored.
    let text = GOOD.replace("teacher = \"teacher\"\n", &format!("teacher = \"teacher\"\nsha256 = \"{hex}\"\n"));
    let msg = format!("{:#}", parse(&text).unwrap_err());
    assert!(msg.contains("stage `student`") && msg.contains("pins the file of `teacher_checkpoint`"), "{msg}");
}

#[test]
fn a_job_is_written_as_its_struct_s_fields_beside_kind_and_read_back() {
    let text = format!(
        "{GOOD}[[stages]]\nname = \"shift\"\nkind = \"bias_shift\"\nfrom = \"student\"\nclasses = [3]\n\
         shifts = {{ min = 0.0, max = 4.0, step = 0.5 }}\nfixed_shift = 3.5\n"
    );
    let e = parse(&text).unwrap();
    let written = e.to_toml().unwrap();
    let at = written.find("name = \"shift\"").expect("the stage is written");
    // The form runs wrote before jobs were structs of their own.
    let form = "name = \"shift\"\nkind = \"bias_shift\"\nclasses = [3]\nmin = 0.0\nmax = 4.0\nstep = 0.5\n\
                fixed = 3.5\n\n[stages.source]\nstage = \"student\"\n";
    assert!(written[at..].starts_with(form), "{}", &written[at..]);
    let back: Experiment = toml::from_str(&written).unwrap();
    let Job::BiasShift(job) = &back.stages[2].job else { panic!("a bias_shift stage") };
    assert_eq!(
        (job.classes.as_slice(), job.fixed, &job.source),
        (&[3][..], Some(3.5), &ModelSource::Stage("student".into()))
    );
}

#[test]
fn unknown_keys_name_the_closest_valid_key_and_list_every_key() {
    let err = format!("{:#}", parse(&GOOD.replace("temperature = 20", "tempreature = 20")).unwrap_err());
    assert!(err.contains("unknown field `tempreature`: did you mean `temperature`?"), "{err}");
    // The stage's keys are many: the list is the program's, shown whole, up to the last key.
    assert!(!err.contains("more characters") && err.contains("`temperature`") && err.contains("`paper`"), "{err}");
    let err = format!("{:#}", parse(&GOOD.replace("seed = 3", "sed = 3")).unwrap_err());
    assert!(err.contains("did you mean `seed`?"), "{err}");
    let err = format!("{:#}", parse(&GOOD.replace("seed = 3", "colour = 3")).unwrap_err());
    assert!(err.contains("unknown field `colour`, expected one of `name`") && !err.contains("did you mean"), "{err}");
    let err = format!("{:#}", parse_with(GOOD, &["stages.student.temprature=3"]).unwrap_err());
    assert!(
        err.contains("--set `stages.student.temprature=3`") && err.contains("did you mean `temperature`?"),
        "{err}"
    );
    // A user's long unknown name is cut; the valid names are not.
    let long = "x".repeat(500);
    let err = format!("{:#}", parse(&GOOD.replace("seed = 3", &format!("{long} = 3"))).unwrap_err());
    assert!(err.contains("(440 more characters)") && err.contains("`stages`"), "{err}");
}

#[test]
fn closest_names_slips_and_nothing_else() {
    use super::raw::closest;
    let valid = ["temperature", "teacher", "teacher_checkpoint", "epochs", "seed"];
    assert_eq!(closest("temprature", &valid), Some("temperature"));
    assert_eq!(closest("Temperature", &valid), Some("temperature"));
    assert_eq!(closest("ephocs", &valid), Some("epochs"), "a swap of neighbours is one edit");
    assert_eq!(closest("checkpoint", &valid), Some("teacher_checkpoint"), "contained");
    assert_eq!(closest("lr", &valid), None);
    assert_eq!(closest("batch_size", &valid), None);
}

#[test]
fn an_experiment_file_that_is_not_a_regular_file_is_refused_before_reading() {
    let dir = crate::testutil::TempDir::new("config-special");
    let err = format!("{:#}", load(&dir.0, &[]).unwrap_err());
    assert!(err.contains("is a directory"), "{err}");
    let fifo = dir.0.join("fifo.toml");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success());
    if made {
        // Reading a FIFO with no writer would block for ever: refused from its metadata.
        let err = format!("{:#}", load(&fifo, &[]).unwrap_err());
        assert!(err.contains("not a regular file"), "{err}");
    }
}

#[test]
fn resource_settings_are_bounded_before_use() {
    let err = format!("{:#}", parse(&GOOD.replace("seed = 3", "seed = 3\nthreads = 100000")).unwrap_err());
    assert!(err.contains("threads = 100000: expected at most 1024"), "{err}");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as i64;
    assert!(check_threads(0).is_ok() && check_threads(cores).is_ok() && check_threads(4 * cores).is_ok());
    let err = check_threads(4 * cores + 1).unwrap_err().to_string();
    assert!(err.contains(&format!("this machine has {cores} logical core")), "{err}");
    let store = GOOD.replace(
        "dir = \"data/mnist\"\nvalidation = 100",
        "kind = \"store\"\nstore = { dir = \"s\", prefetch = 1000000 }",
    );
    let err = format!("{:#}", parse(&store).unwrap_err());
    assert!(err.contains("prefetch = 1000000: expected at most 256"), "{err}");
}

#[test]
fn relative_paths_resolve_against_the_file_s_folder_and_set_values_against_the_working_directory() {
    let e = parse(&format!(
        "{GOOD}[[stages]]\nname = \"eval\"\nkind = \"evaluate\"\ncheckpoint = \"../c/t.safetensors\"\n"
    ))
    .unwrap();
    assert_eq!(e.data.source, DataSource::Mnist { dir: folder().join("data/mnist") });
    let expected = folder().parent().unwrap().join("c/t.safetensors");
    assert_eq!(e.stages[2].job, Job::Evaluate(EvaluateJob { source: ModelSource::Checkpoint(expected) }));
    let cwd = std::env::current_dir().unwrap();
    let e = parse_with(GOOD, &["data.dir=elsewhere/mnist"]).unwrap();
    assert_eq!(e.data.source, DataSource::Mnist { dir: cwd.join("elsewhere/mnist") });
    let e = parse_with(GOOD, &["data.dir=\"/abs/mnist\""]).unwrap();
    assert_eq!(e.data.source, DataSource::Mnist { dir: "/abs/mnist".into() });
}

/// The record of stages of every kind and setting the shipped files may not use resolves to the
/// same experiment.
#[test]
fn a_record_of_every_kind_of_stage_resolves_to_the_same_experiment() {
    let stages = r#"
[[stages]]
name = "adam"
kind = "train"
model = { hidden = [4], max_norm = 2.0 }
optimizer = { kind = "adam", lr = 0.01, beta1 = 0.8, weight_decay = 0.001 }
schedule = { kind = "cosine", min_lr = 0.001 }
train_fraction = 0.5
early_stopping = { patience = 2 }
[[stages]]
name = "logits"
kind = "distill"
teacher_checkpoint = "t.safetensors"
sha256 = "ade61437b8f9b89858130477257f16cf9a57fcdbf72384f76c96135ffd420c4f"
objective = "logits"
hard_weight = 0.5
model = { hidden = [4] }
transfer_only = [1, 2]
[[stages]]
name = "topk"
kind = "distill"
teacher = "teacher"
temperature = 3
teacher_top_k = 3
transfer_exclude = [7]
model = { hidden = [4] }
sweep = { temperature = [2.5, 4], hidden = [[3], [5, 5]], seed = [9] }
paper = { test_errors = 74, relative_change_percent = [0.1, 2.0] }
[[stages]]
name = "pair"
kind = "ensemble"
members = ["teacher", "student"]
[[stages]]
name = "from_pair"
kind = "distill"
teacher = "pair"
temperature = 2
model = { hidden = [4] }
teacher_translations = 1
[[stages]]
name = "c"
kind = "clusters"
checkpoint = "g.safetensors"
clusters = 3
affinity = "confusion"
extra_clusters = [2]
max_overlap = 0.5
max_size = 5
count = 4
kmeans = { iterations = 7, batch_size = 9 }
[[stages]]
name = "s"
kind = "specialists"
from = "teacher"
subsets = "c"
examples = 100
top_n = 2
[[stages]]
name = "b"
kind = "bias_shift"
from = "student"
classes = [3]
shifts = { min = -1.0, max = 1.0, step = 0.25 }
"#;
    let text = format!(
        "{}{stages}",
        GOOD.replace(
            "seed = 3\n",
            "seed = 3\nthreads = 2\nprecision = \"bf16\"\ndescription = \"d\"\n\
             checkpoint = { every_steps = 500, every_minutes = 7.5, keep = 3 }\n"
        )
    );
    let e = parse(&text).unwrap();
    assert_eq!(e.checkpoint, CheckpointSpec { every_steps: 500, every_minutes: 7.5, keep: 3 });
    let record = e.to_experiment_file();
    assert_eq!(parse(&record).unwrap(), e, "{record}");
    assert!(record.contains("threads = 2") && !record.contains("training"), "{record}");
    assert!(record.contains("[checkpoint]\nevery_minutes = 7.5"), "{record}");
    let files = "[data]\nkind = \"files\"\ncontext = [3, 1]\nclasses = 50\n\
                 files.train = { features = \"a.scp\", labels = \"a.ark\" }\n\
                 files.validation = { features = \"b.npy\", labels = \"bl.npy\", lengths = \"bn.npy\" }\n\
                 files.test = { features = \"c.ark\", labels = \"c.ali\" }\n";
    let store =
        "[data]\nkind = \"store\"\nstore = { dir = \"st\", eval_frames = 10, targets = \"t.topk\", prefetch = 2 }\n";
    let speech = "[data]\nkind = \"speech\"\ncontext = [2, 2]\nspeech = { phones = 4, states = 12 }\n";
    for data in [files, store, speech] {
        let text = GOOD.replace("[data]\ndir = \"data/mnist\"\nvalidation = 100\n", data).replace("jitter = 2\n", "");
        let e = parse(&text).unwrap();
        let record = e.to_experiment_file();
        assert_eq!(parse(&record).unwrap(), e, "{record}");
    }
}

/// A record runs wrote before `config.toml` was an experiment file (the resolved structs) still
/// loads as an experiment: its relative paths against the working directory, as then.
#[test]
fn a_record_in_the_earlier_form_loads_as_the_experiment_it_records() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/results/mnist/runs/mnist_temperature/config.toml");
    let e = load(&path, &[]).unwrap();
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(e.data.source, DataSource::Mnist { dir: cwd.join("data/mnist") });
    assert_eq!(e.stages.len(), 54);
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(read_record(&text, &path).unwrap(), e);
}

#[test]
fn checkpoint_settings_out_of_range_are_errors_naming_the_key() {
    for (setting, want) in [
        ("checkpoint = { keep = 0 }", "checkpoint.keep = 0"),
        ("checkpoint = { keep = 101 }", "checkpoint.keep = 101"),
        ("checkpoint = { every_minutes = -1.0 }", "checkpoint.every_minutes = -1"),
        ("checkpoint = { every_minutes = nan }", "checkpoint.every_minutes = NaN"),
        ("checkpoint = { every_step = 5 }", "did you mean `every_steps`?"),
    ] {
        let text = GOOD.replace("seed = 3\n", &format!("seed = 3\n{setting}\n"));
        let e = format!("{:#}", parse(&text).unwrap_err());
        assert!(e.contains(want), "{setting}: {e}");
    }
    let e = parse(&GOOD.replace("seed = 3\n", "seed = 3\ncheckpoint = { every_steps = 5 }\n")).unwrap();
    assert_eq!(e.checkpoint, CheckpointSpec { every_steps: 5, every_minutes: 0.0, keep: 2 });
}
