//! End to end: `kd-run run experiments/smoke.toml` writes every output with consistent contents,
//! resumes, and rejects a malformed experiment with the file and line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn kd_run(args: &[&str]) -> Output {
    let out =
        Command::new(env!("CARGO_BIN_EXE_kd-run")).args(args).current_dir(root()).output().expect("kd-run starts");
    if !out.status.success() && std::env::var_os("KD_TEST_VERBOSE").is_some() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    }
    out
}

fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kd-run-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn csv_rows(path: &Path) -> Vec<std::collections::HashMap<String, String>> {
    let mut r = csv::Reader::from_path(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    r.deserialize().map(|row| row.expect("well-formed row")).collect()
}

#[test]
fn smoke_experiment_writes_consistent_outputs_and_resumes() {
    let out = fresh_dir("smoke");
    let result = kd_run(&["run", "experiments/smoke.toml", "--out", out.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(result.status.success(), "kd-run failed:\n{}", String::from_utf8_lossy(&result.stderr));
    let dir = out.join("smoke");

    // summary.csv: one row per model, in stage order, with counts that fit the data.
    let summary = csv_rows(&dir.join("summary.csv"));
    let stages: Vec<(&str, &str)> = summary.iter().map(|r| (r["stage"].as_str(), r["variant"].as_str())).collect();
    assert_eq!(
        stages,
        [
            ("teacher", ""),
            ("student", ""),
            ("distilled", ""),
            ("eval_teacher", ""),
            ("distilled_no3", ""),
            ("no3_shift", ""),
            ("no3_shift", "fixed"),
            ("teacher_twice", "")
        ]
    );
    let params: Vec<i64> = summary.iter().map(|r| r["parameters"].parse().unwrap()).collect();
    assert_eq!(
        params,
        [118_282, 26_506, 26_506, 118_282, 26_506, 26_506, 26_506, 2 * 118_282],
        "784-128-128-10 and 784-32-32-10"
    );
    for r in &summary {
        let errors: i64 = r["test_errors"].parse().unwrap();
        let accuracy: f64 = r["test_accuracy"].parse().unwrap();
        assert!((0..2000).contains(&errors), "{r:?}");
        assert!((accuracy - (1.0 - errors as f64 / 2000.0)).abs() < 1e-9, "accuracy agrees with errors: {r:?}");
        assert!(accuracy > 0.25, "every model learned something (10% is chance): {r:?}");
        assert!(stdout.contains(&r["stage"]), "the summary is printed");
        if !r["variant"].is_empty() {
            assert!(stdout.contains(&format!("{}-{} ", r["stage"], r["variant"])), "its variant is named");
        }
    }
    // What each model costs to run: multiply-adds per example in closed form (sum of fan-in x
    // fan-out; an ensemble's, its members' summed), and measured inference speed.
    let (teacher_macs, student_macs) = (784 * 128 + 128 * 128 + 128 * 10, 784 * 32 + 32 * 32 + 32 * 10);
    let macs: Vec<i64> = summary.iter().map(|r| r["macs"].parse().unwrap()).collect();
    assert_eq!(
        macs,
        [
            teacher_macs,
            student_macs,
            student_macs,
            teacher_macs,
            student_macs,
            student_macs,
            student_macs,
            2 * teacher_macs
        ]
    );
    for r in &summary {
        assert_eq!(r["inference_batch"], "1024", "the large batch, of the 2,000 test images: {r:?}");
        let per_second: f64 = r["inference_examples_per_second"].parse().unwrap();
        let latency: f64 = r["latency_ms"].parse().unwrap();
        assert!(per_second.is_finite() && per_second > 0.0 && latency.is_finite() && latency > 0.0, "{r:?}");
    }
    let header = stdout.lines().find(|l| l.starts_with("stage ")).expect("the final table's header");
    assert!(header.contains("mult-adds") && header.contains("examples/s") && header.contains("latency ms"), "{stdout}");
    assert!(stdout.contains("examples/s: inference at batch 1024"), "{stdout}");
    assert_eq!(
        summary[0]["test_errors"], summary[3]["test_errors"],
        "evaluating the teacher's checkpoint reproduces its errors"
    );
    assert_eq!(summary[0]["val_errors"], summary[3]["val_errors"]);
    assert_eq!(
        (summary[7]["test_errors"].as_str(), summary[7]["val_errors"].as_str()),
        (summary[0]["test_errors"].as_str(), summary[0]["val_errors"].as_str()),
        "an ensemble of the teacher and the evaluate stage of its checkpoint is the teacher"
    );

    // Distilled students record how closely they follow the teacher on the test set; the
    // teacher's errors counted there are the ones its own stage recorded, and examples both get
    // right always agree, examples only one gets wrong never do.
    for r in summary.iter().filter(|r| r["kind"] == "distill") {
        let n = |k: &str| r[k].parse::<i64>().unwrap_or_else(|_| panic!("{k} in {r:?}"));
        let (student, teacher, shared) = (n("test_errors"), n("teacher_errors"), n("shared_errors"));
        assert_eq!(r["teacher_errors"], summary[0]["test_errors"], "{r:?}");
        let agree = (r["teacher_agreement"].parse::<f64>().unwrap() * 2000.0).round() as i64;
        assert!(shared <= student.min(teacher), "{r:?}");
        let both_right = 2000 - student - teacher + shared;
        assert!((both_right..=both_right + shared).contains(&agree), "{r:?}");
    }
    assert!(summary.iter().filter(|r| r["kind"] != "distill").all(|r| r["teacher_agreement"].is_empty()));

    // ... and on the transfer set they learned from: a share of its examples (the training split
    // of 2,500 images, without its 3s for distilled_no3), not of the 2,000 test images.
    let labels = std::fs::read(root().join("data/mnist/train-labels-idx1-ubyte")).unwrap();
    let threes = labels[8..8 + 2500].iter().filter(|&&l| l == 3).count();
    for (stage, examples) in [("distilled", 2500), ("distilled_no3", 2500 - threes)] {
        let r = summary.iter().find(|r| r["stage"] == stage).unwrap();
        let agree = r["transfer_agreement"].parse::<f64>().unwrap() * examples as f64;
        assert!((agree - agree.round()).abs() < 1e-6 && agree > 0.5 * examples as f64, "{examples} examples: {r:?}");
    }
    assert!(summary.iter().filter(|r| r["kind"] != "distill").all(|r| r["transfer_agreement"].is_empty()));

    // metrics.csv: one row per stage and epoch; test errors on the last epoch only.
    let metrics = csv_rows(&dir.join("metrics.csv"));
    let epochs: Vec<(String, String)> = metrics.iter().map(|r| (r["stage"].clone(), r["epoch"].clone())).collect();
    let expected: Vec<(String, String)> = [
        ("teacher", 1),
        ("teacher", 2),
        ("teacher", 3),
        ("student", 1),
        ("student", 2),
        ("distilled", 1),
        ("distilled", 2),
        ("distilled_no3", 1),
        ("distilled_no3", 2),
    ]
    .iter()
    .map(|(s, e)| (s.to_string(), e.to_string()))
    .collect();
    assert_eq!(epochs, expected);
    for r in &metrics {
        let last = (r["stage"] == "teacher" && r["epoch"] == "3") || r["epoch"] == "2" && r["stage"] != "teacher";
        assert_eq!(!r["test_errors"].is_empty(), last, "{r:?}");
        let val: f64 = r["val_accuracy"].parse().unwrap();
        assert!((0.0..=1.0).contains(&val));
    }
    // The soft term's KL form: recorded for distill stages only, and falling over the distilled
    // stage's epochs. Its objective is the soft cross-entropy alone (hard_weight = 0), which
    // exceeds the KL form by T^2 times the teacher's mean entropy over the transfer set: the
    // same in every epoch, and at T = 20 most of the objective.
    let column = |stage: &str, key: &str| -> Vec<f64> {
        metrics.iter().filter(|r| r["stage"] == stage).map(|r| r[key].parse().unwrap()).collect()
    };
    let (kl, loss) = (column("distilled", "soft_kl"), column("distilled", "train_loss"));
    assert!(kl[0] > 0.0 && kl.windows(2).all(|w| w[1] < w[0]), "soft_kl decreases over the epochs: {kl:?}");
    let entropy: Vec<f64> = loss.iter().zip(&kl).map(|(l, k)| l - k).collect();
    assert!(entropy.iter().all(|h| h > &kl[0]) && (entropy[0] - entropy[1]).abs() < 1e-3 * entropy[0], "{entropy:?}");
    assert!(column("distilled_no3", "soft_kl").iter().all(|k| *k > 0.0));
    assert!(metrics.iter().filter(|r| !r["stage"].starts_with("distilled")).all(|r| r["soft_kl"].is_empty()));
    let last_teacher = metrics.iter().find(|r| r["stage"] == "teacher" && r["epoch"] == "3").unwrap();
    assert_eq!(last_teacher["test_errors"], summary[0]["test_errors"]);
    let lrs: Vec<f64> = metrics.iter().filter(|r| r["stage"] == "teacher").map(|r| r["lr"].parse().unwrap()).collect();
    assert!((lrs[1] - 0.08).abs() < 1e-12 && (lrs[2] - 0.064).abs() < 1e-12, "exponential schedule: {lrs:?}");

    // The transfer set without 3s: the log states its size, which the labels file confirms
    // (training split = the first 2,500 images: train_limit 3,000 minus 500 for validation).
    let log = std::fs::read_to_string(dir.join("run.log")).unwrap();
    assert!(log.contains(&format!("transfer set of {} examples (of 2500)", 2500 - threes)), "{threes} threes");

    // class_errors.csv: per model, split and class; the class rows add up to the summary.
    let class_rows = csv_rows(&dir.join("class_errors.csv"));
    for r in &summary {
        let ours =
            |c: &&std::collections::HashMap<String, String>| c["stage"] == r["stage"] && c["variant"] == r["variant"];
        let rows: Vec<_> = class_rows.iter().filter(ours).filter(|c| c["split"] == "test").collect();
        assert_eq!(rows.len(), 10);
        let total: i64 = rows.iter().map(|c| c["errors"].parse::<i64>().unwrap()).sum();
        let examples: i64 = rows.iter().map(|c| c["examples"].parse::<i64>().unwrap()).sum();
        assert_eq!((total.to_string(), examples), (r["test_errors"].clone(), 2000), "{}", r["stage"]);
    }

    // The bias shift is the candidate with the fewest validation errors; the fixed one is 3.5.
    let shifts = csv_rows(&dir.join("bias_shifts.csv"));
    assert_eq!(shifts.len(), 9, "0, 0.5, ..., 4");
    let best = shifts.iter().map(|r| r["val_errors"].parse::<i64>().unwrap()).min().unwrap();
    let chosen = &summary[5];
    assert_eq!(chosen["val_errors"].parse::<i64>().unwrap(), best);
    let chosen_shift: f64 = chosen["shift"].parse().unwrap();
    let at_chosen = shifts.iter().find(|r| r["shift"].parse::<f64>().unwrap() == chosen_shift).unwrap();
    assert_eq!(at_chosen["val_errors"].parse::<i64>().unwrap(), best);
    assert_eq!(summary[6]["shift"], "3.5");
    if chosen_shift == 0.0 {
        assert_eq!(chosen["test_errors"], summary[4]["test_errors"], "a zero shift changes nothing");
    }

    // config.toml is the resolved experiment; checkpoints load without it.
    let config = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    assert!(config.contains("temperature = 20.0") && config.contains("jitter = 2"), "{config}");
    for (stage, sizes) in [("teacher", vec![784i64, 128, 128, 10]), ("distilled", vec![784, 32, 32, 10])] {
        let named =
            tch::Tensor::read_safetensors(dir.join("checkpoints").join(format!("{stage}.safetensors"))).unwrap();
        let (_vs, net) = kd_models::Mlp::from_tensors(&named, tch::Device::Cpu).unwrap();
        assert_eq!(net.config().sizes, sizes);
    }
    assert!(log.contains("stage `distilled`"));
    let command = std::fs::read_to_string(dir.join("command.txt")).unwrap();
    assert!(command.starts_with("kd-run run experiments/smoke.toml --out"), "{command}");
    let leftovers: Vec<_> = std::fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("resume") || n.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The report is built from these files: every model's row carries its test errors.
    let md_path = out.join("report.md");
    let report = kd_run(&["report", "--out", md_path.to_str().unwrap(), dir.to_str().unwrap()]);
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    let md = std::fs::read_to_string(&md_path).unwrap();
    for r in &summary {
        // A variant's row is labelled `<stage>-<variant>`.
        let label =
            if r["variant"].is_empty() { r["stage"].clone() } else { format!("{}-{}", r["stage"], r["variant"]) };
        let row = md.lines().find(|l| l.starts_with(&format!("| {label} |"))).expect("a row per model");
        assert!(row.contains(&format!("| {}", r["test_errors"])), "{row}");
    }
    let no3_on_threes: i64 = class_rows
        .iter()
        .filter(|c| c["stage"] == "distilled_no3" && c["split"] == "test" && c["class"] == "3")
        .map(|c| c["errors"].parse::<i64>().unwrap())
        .sum();
    assert!(md.contains(&format!("{} ({no3_on_threes} on 3s)", summary[4]["test_errors"])), "{md}");
    assert!(md.contains("kd-run run experiments/smoke.toml"), "the command is shown");
    // The cost table: a row per model with its multiply-adds, its speed and its accuracy.
    let cost = md.find("What each model costs to run").expect("a cost table");
    let costliest = format!("| teacher_twice | ensemble of 2 x mlp 784-128-128-10 | 236564 | {} |", 2 * teacher_macs);
    assert!(md[cost..].contains(&costliest), "{md}");
    assert!(md[cost..].contains(&format!("| distilled | mlp 784-32-32-10 | 26506 | {student_macs} |")), "{md}");
    assert!(out.join("report/smoke-curves.svg").exists());

    // Running again resumes: every stage is done, nothing changes; the skipped stages keep their
    // rows, costs included. With --json the final table is one JSON object on stdout.
    let before = std::fs::read(dir.join("summary.csv")).unwrap();
    let again = kd_run(&["run", "experiments/smoke.toml", "--out", out.to_str().unwrap(), "--json"]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already done"));
    assert_eq!(std::fs::read(dir.join("summary.csv")).unwrap(), before);
    let json: serde_json::Value = serde_json::from_slice(&again.stdout).expect("stdout is one JSON object");
    assert_eq!(json["dir"].as_str(), dir.to_str());
    let models = json["models"].as_array().unwrap();
    assert_eq!(models.len(), summary.len());
    for (m, r) in models.iter().zip(&summary) {
        assert_eq!(m["stage"].as_str(), Some(r["stage"].as_str()));
        assert_eq!(m["test_errors"].as_i64().map(|e| e.to_string()).as_deref(), Some(r["test_errors"].as_str()));
        assert_eq!(m["macs"].as_i64().map(|e| e.to_string()).as_deref(), Some(r["macs"].as_str()));
        // (serde_json's default float parsing may be one unit in the last place off.)
        let (json_ms, csv_ms) = (m["latency_ms"].as_f64().unwrap(), r["latency_ms"].parse::<f64>().unwrap());
        assert!((json_ms - csv_ms).abs() <= 1e-12 * csv_ms, "{json_ms} {csv_ms}");
        assert_eq!(m["test_examples"], 2000);
    }

    // A model no stage reads needs no checkpoint to count as done; one that is read does.
    std::fs::remove_file(dir.join("checkpoints/student.safetensors")).unwrap();
    std::fs::remove_file(dir.join("checkpoints/distilled_no3.safetensors")).unwrap();
    let again = kd_run(&["run", "experiments/smoke.toml", "--out", out.to_str().unwrap()]);
    let log = String::from_utf8_lossy(&again.stderr);
    assert!(log.contains("stage `student`: already done"), "{log}");
    assert!(!log.contains("stage `distilled_no3`: already done"), "no3_shift reads it: {log}");
    assert!(!log.contains("stage `no3_shift`: already done"), "what it reads ran again: {log}");
    assert_eq!(csv_rows(&dir.join("summary.csv")).len(), summary.len(), "no duplicate rows");
    assert!(dir.join("checkpoints/distilled_no3.safetensors").exists());

    // A stage whose settings changed runs again, with the stages that read its model; the
    // others keep their results.
    let changed = kd_run(&[
        "run",
        "experiments/smoke.toml",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "stages.distilled_no3.temperature=4",
    ]);
    assert!(changed.status.success(), "{}", String::from_utf8_lossy(&changed.stderr));
    let log = String::from_utf8_lossy(&changed.stderr);
    for (stage, reruns) in [("teacher", false), ("distilled", false), ("distilled_no3", true), ("no3_shift", true)] {
        assert_eq!(log.contains(&format!("stage `{stage}`: its settings differ")), reruns, "{stage}: {log}");
    }
    let after = csv_rows(&dir.join("summary.csv"));
    for (old, new) in summary.iter().zip(&after) {
        assert_eq!(old["stage"], new["stage"], "stages keep their order");
        if !old["stage"].starts_with("distilled_no3") && !old["stage"].starts_with("no3_shift") {
            assert_eq!(old, new, "an unchanged stage keeps its row");
        }
    }
    assert_eq!(after.len(), summary.len());
    let no3_epochs = csv_rows(&dir.join("metrics.csv")).iter().filter(|r| r["stage"] == "distilled_no3").count();
    assert_eq!(no3_epochs, 2, "the rerun stage's old epochs are gone");

    // --redo retrains a finished stage and the stages that read it, to the same results; the
    // others stay done.
    let redo = |stage: &str| {
        let args = ["run", "experiments/smoke.toml", "--out", out.to_str().unwrap()];
        kd_run(&[&args[..], &["--set", "stages.distilled_no3.temperature=4", "--redo", stage]].concat())
    };
    let redone = redo("distilled_no3");
    let log = String::from_utf8_lossy(&redone.stderr);
    assert!(redone.status.success(), "{log}");
    for (stage, reruns) in [("teacher", false), ("distilled", false), ("distilled_no3", true), ("no3_shift", true)] {
        assert_eq!(log.contains(&format!("stage `{stage}`: --redo")), reruns, "{stage}: {log}");
        assert_eq!(log.contains(&format!("stage `{stage}`: already done")), !reruns, "{stage}: {log}");
    }
    let errors = |rows: &[std::collections::HashMap<String, String>]| {
        rows.iter().map(|r| (r["stage"].clone(), r["test_errors"].clone(), r["val_errors"].clone())).collect::<Vec<_>>()
    };
    assert_eq!(errors(&csv_rows(&dir.join("summary.csv"))), errors(&after));
    let unknown = redo("distiled_no3");
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr)
        .contains("--redo distiled_no3: experiments/smoke.toml has no such stage"));

    // A stage removed from the file takes its results with it.
    // A copy outside experiments/: its data folder absolute.
    let text = std::fs::read_to_string(root().join("experiments/smoke.toml"))
        .unwrap()
        .replace("\"../data/mnist\"", &format!("{:?}", root().join("data/mnist").to_str().unwrap()));
    let cut = text.find("[[stages]]\nname = \"distilled_no3\"").expect("the smoke file has distilled_no3");
    let shorter = out.join("shorter.toml");
    std::fs::write(&shorter, &text[..cut]).unwrap();
    let fewer = kd_run(&["run", shorter.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(fewer.status.success(), "{}", String::from_utf8_lossy(&fewer.stderr));
    let kept: Vec<String> = csv_rows(&dir.join("summary.csv")).iter().map(|r| r["stage"].clone()).collect();
    assert_eq!(kept, ["teacher", "student", "distilled", "eval_teacher"]);
    assert!(csv_rows(&dir.join("metrics.csv")).iter().all(|r| r["stage"] != "distilled_no3"));

    // A different configuration in the same directory is refused, not mixed in.
    let other = kd_run(&["run", "experiments/smoke.toml", "--out", out.to_str().unwrap(), "--set", "seed=2"]);
    assert_eq!(other.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&other.stderr).contains("different configuration"));
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn a_run_killed_mid_stage_resumes_to_the_same_result() {
    // Uninterrupted reference.
    let args = |out: &Path| -> Vec<String> {
        ["run", "experiments/smoke.toml", "--out", out.to_str().unwrap(), "--set", "stages.teacher.epochs=8"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let reference = fresh_dir("resume-ref");
    let a: Vec<String> = args(&reference);
    assert!(kd_run(&a.iter().map(String::as_str).collect::<Vec<_>>()).status.success());

    // The same run, killed as soon as the teacher's first resume checkpoint exists, then rerun.
    let interrupted = fresh_dir("resume-cut");
    let b = args(&interrupted);
    let mut child = Command::new(env!("CARGO_BIN_EXE_kd-run"))
        .args(&b)
        .current_dir(root())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let resume = interrupted.join("smoke/checkpoints/teacher.resume.safetensors");
    let started = std::time::Instant::now();
    while !resume.exists() && started.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!interrupted.join("smoke/checkpoints/teacher.safetensors").exists(), "killed before the teacher finished");
    // Say the killed process took 1000 s for the teacher's first epoch (as a long run on another
    // machine would): the resumed stage's time must count it. And say it wrote metrics.csv
    // before the soft_kl column existed: the resumed run reads it and adds the column.
    let metrics_path = interrupted.join("smoke/metrics.csv");
    let text = std::fs::read_to_string(&metrics_path).unwrap();
    let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
    let seconds_column = header.iter().position(|c| *c == "seconds").unwrap();
    let kl_column = header.iter().position(|c| *c == "soft_kl").unwrap();
    let slowed: Vec<String> = text
        .lines()
        .map(|line| {
            let mut fields: Vec<&str> = line.split(',').collect();
            if line.starts_with("teacher,1,") {
                fields[seconds_column] = "1000";
            }
            fields.remove(kl_column);
            fields.join(",")
        })
        .collect();
    assert!(slowed.iter().any(|l| l.starts_with("teacher,1,")), "the first epoch's row was written");
    std::fs::write(&metrics_path, slowed.join("\n") + "\n").unwrap();
    let rerun = kd_run(&b.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(rerun.status.success());
    assert!(String::from_utf8_lossy(&rerun.stderr).contains("stage `teacher`: resuming after epoch"));
    let results = |p: PathBuf| -> Vec<Vec<String>> {
        csv_rows(&p)
            .into_iter()
            .map(|r| vec![r["stage"].clone(), r["test_errors"].clone(), r["val_errors"].clone()])
            .collect()
    };
    assert_eq!(results(reference.join("smoke/summary.csv")), results(interrupted.join("smoke/summary.csv")));
    // Every epoch has its row and names its device; the stage's time counts the killed process's epoch.
    let metrics = csv_rows(&metrics_path);
    let teacher_epochs: Vec<_> = metrics.iter().filter(|r| r["stage"] == "teacher").collect();
    assert_eq!(teacher_epochs.len(), 8);
    assert!(teacher_epochs.iter().all(|r| r["device"].starts_with("cpu")), "each epoch names its device");
    assert!(metrics.iter().all(|r| r.contains_key("soft_kl")), "the resumed run writes the soft_kl column");
    let summary = csv_rows(&interrupted.join("smoke/summary.csv"));
    let stage_seconds: f64 = summary.iter().find(|r| r["stage"] == "teacher").unwrap()["seconds"].parse().unwrap();
    assert!(stage_seconds >= 1000.0, "stage time {stage_seconds} s leaves out the epoch before the resume");
    let ckpt = |d: &Path| std::fs::read(d.join("smoke/checkpoints/teacher.safetensors")).unwrap();
    assert_eq!(ckpt(&reference), ckpt(&interrupted), "resumed teacher has the same weights, bit for bit");
    let _ = std::fs::remove_dir_all(&reference);
    let _ = std::fs::remove_dir_all(&interrupted);
}

#[test]
fn malformed_experiment_is_rejected_with_file_and_line() {
    let dir = fresh_dir("bad");
    std::fs::create_dir_all(&dir).unwrap();
    let text = std::fs::read_to_string(root().join("experiments/smoke.toml")).unwrap();
    let cases = [
        ("temperature = 20", "temperature = -3", "expected a temperature in [0.01, 1e6]"),
        ("hidden_dropout = 0.5", "hidden_dropout = 1.5", "expected a number in [0, 1)"),
        ("epochs = 3", "epochz = 3", "unknown field `epochz`"),
        ("hard_weight = 0.0", "hard_weight = -0.5", "expected a number >= 0"),
        ("hidden = [32, 32] }\ntemperature", "hidden = [] }\ntemperature", "non-empty list"),
    ];
    for (i, (from, to, message)) in cases.iter().enumerate() {
        assert!(text.contains(from), "{from}");
        let bad = text.replacen(from, to, 1);
        let line = bad[..bad.find(to).unwrap()].matches('\n').count() + 1;
        let path = dir.join(format!("bad{i}.toml"));
        std::fs::write(&path, &bad).unwrap();
        for cmd in ["validate", "run"] {
            let out = kd_run(
                &[cmd, path.to_str().unwrap(), "--out", dir.to_str().unwrap()][..if cmd == "run" { 4 } else { 2 }],
            );
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{cmd} {to}: {stderr}");
            assert!(
                stderr.contains(&format!("bad{i}.toml")) && stderr.contains(&format!("line {line},")),
                "{to}: {stderr}"
            );
            assert!(stderr.contains(message) && !stderr.contains("panicked"), "{stderr}");
        }
    }
    assert!(!dir.join("smoke").exists(), "nothing ran");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn speech_experiment_trains_on_context_windows_of_the_synthetic_corpus() {
    let out = fresh_dir("speech");
    let result = kd_run(&["run", "experiments/speech_tiny.toml", "--out", out.to_str().unwrap()]);
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    let dir = out.join("speech_tiny");
    let summary = csv_rows(&dir.join("summary.csv"));
    let stages: Vec<&str> = summary.iter().map(|r| r["stage"].as_str()).collect();
    assert_eq!(
        stages,
        ["baseline", "member-s2", "member-s3", "ensemble", "distilled", "distilled_top5", "small_hard", "small_soft"]
    );
    let top5: Vec<_> = std::fs::read_dir(out.join(".cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("teacher-top5-"))
        .collect();
    assert_eq!(top5.len(), 1, "the top-5 soft targets are cached once: {top5:?}");
    // The log says how much of the ensemble's probability mass at T the five classes keep, as
    // cached per transfer example.
    let log = std::fs::read_to_string(dir.join("run.log")).unwrap();
    let said = "teacher top-5 soft targets: share of the teacher's probability mass at T = 2 they keep over ";
    let line = log.lines().find(|l| l.contains(said)).unwrap_or_else(|| panic!("no kept-mass line in\n{log}"));
    let stats: Vec<f64> = line
        .split_once(": mean ")
        .unwrap()
        .1
        .split(", ")
        .map(|part| part.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    let [mean, p50, p5, p1, min] = stats[..] else { panic!("{line}") };
    assert!(0.0 < min && min <= p1 && p1 <= p5 && p5 <= p50 && p50 <= 1.0 && mean <= 1.0, "{line}");
    let cached = tch::Tensor::read_safetensors(out.join(".cache").join(&top5[0])).unwrap();
    let kept = &cached.iter().find(|(name, _)| name == "kept").expect("the kept masses are cached").1;
    let kept = Vec::<f32>::try_from(kept).unwrap();
    assert!(line.contains(&format!("over {} transfer examples", kept.len())), "{line}");
    let exact = kept.iter().map(|&m| f64::from(m)).sum::<f64>() / kept.len() as f64;
    assert!((exact - mean).abs() <= 6e-5, "logged mean {mean}, cached {exact}");
    let smallest = kept.iter().copied().fold(f32::INFINITY, f32::min);
    assert!((f64::from(smallest) - min).abs() <= 6e-5, "logged min {min}, cached {smallest}");
    // Early stopping keeps the epoch with the fewest validation errors and stops `patience`
    // epochs after it (or at the last epoch).
    let dev_frames: f64 = {
        let r = &summary[0];
        let acc: f64 =
            csv_rows(&dir.join("metrics.csv")).iter().find(|m| m["stage"] == "baseline" && m["epoch"] == "3").unwrap()
                ["val_accuracy"]
                .parse()
                .unwrap();
        r["val_errors"].parse::<f64>().unwrap() / (1.0 - acc)
    };
    let small: Vec<i64> = csv_rows(&dir.join("metrics.csv"))
        .iter()
        .filter(|m| m["stage"] == "small_hard")
        .map(|m| ((1.0 - m["val_accuracy"].parse::<f64>().unwrap()) * dev_frames).round() as i64)
        .collect();
    let (best_at, best) = small.iter().enumerate().min_by_key(|&(i, e)| (*e, i)).unwrap();
    assert_eq!(summary[6]["val_errors"].parse::<i64>().unwrap(), *best, "the best epoch is kept: {small:?}");
    assert!(small.len() == 20 || small.len() == best_at + 1 + 2, "stops 2 epochs after the best: {small:?}");
    assert!(summary.iter().all(|r| r["train_accuracy"].is_empty() == (r["kind"] == "ensemble")));
    let ensemble = &summary[3];
    assert_eq!((ensemble["kind"].as_str(), ensemble["parameters"].as_str()), ("ensemble", "472500"));
    assert_eq!(ensemble["model"], "ensemble of 3 x mlp 1040-128-128-60");
    for r in summary.iter().filter(|r| r["kind"] != "ensemble") {
        // 26 frames x 40 channels in, 60 tied states out: (1040 + 1) 128 + (128 + 1) 128 + (128 + 1) 60.
        assert_eq!(r["parameters"], "157500");
        assert_eq!(r["model"], "mlp 1040-128-128-60");
        let accuracy: f64 = r["test_accuracy"].parse().unwrap();
        assert!(accuracy > 5.0 / 60.0, "far above chance (1/60): {r:?}");
        assert!(!r["val_errors"].is_empty(), "development speakers form the validation split");
    }
    // Every test frame is counted once: per-class examples add up to the same total for both.
    let class_rows = csv_rows(&dir.join("class_errors.csv"));
    let total = |stage: &str| -> i64 {
        class_rows
            .iter()
            .filter(|c| c["stage"] == stage && c["split"] == "test")
            .map(|c| c["examples"].parse::<i64>().unwrap())
            .sum()
    };
    assert_eq!(class_rows.iter().filter(|c| c["stage"] == "baseline" && c["split"] == "test").count(), 60);
    assert!(total("baseline") > 0 && total("baseline") == total("distilled"));
    // The report's Table 1: the distilled model's share of the ensemble's gain over the mean
    // single member, from the accuracies in summary.csv.
    let md_path = out.join("speech.md");
    let report = kd_run(&["report", "--out", md_path.to_str().unwrap(), dir.to_str().unwrap()]);
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    let md = std::fs::read_to_string(&md_path).unwrap();
    let acc = |stage: &str| -> f64 {
        summary.iter().find(|r| r["stage"] == stage).unwrap()["test_accuracy"].parse().unwrap()
    };
    let single = (acc("baseline") + acc("member-s2") + acc("member-s3")) / 3.0;
    let kept = 100.0 * (acc("distilled") - single) / (acc("ensemble") - single);
    let row = format!("| `distilled` (distilled) | {:.2}% | {kept:.0}% |", 100.0 * acc("distilled"));
    assert!(md.contains(&row), "{row}\n{md}");
    let soft = &summary[7];
    let train_acc: f64 = soft["train_accuracy"].parse().unwrap();
    let row = format!(
        "| `small_soft` | 10% | soft targets of `baseline` at T = 2 (weights soft 0.5 / hard 0.5) | {:.2}% | {:.2}% |",
        100.0 * train_acc,
        100.0 * acc("small_soft")
    );
    assert!(md.contains(&row), "{row}\n{md}");
    // The same corpus settings give the same data: a second run in another folder agrees exactly.
    let again = fresh_dir("speech-again");
    assert!(kd_run(&["run", "experiments/speech_tiny.toml", "--out", again.to_str().unwrap()]).status.success());
    let errors = |d: &Path| {
        csv_rows(&d.join("speech_tiny/summary.csv")).iter().map(|r| r["test_errors"].clone()).collect::<Vec<_>>()
    };
    assert_eq!(errors(&out), errors(&again));
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&again);
}

#[test]
fn only_runs_the_named_stages_once_what_they_read_has_run() {
    let out = fresh_dir("only");
    let run = |stages: &[&str]| {
        let mut args = vec!["run", "experiments/smoke.toml", "--out", out.to_str().unwrap()];
        for s in stages {
            args.extend(["--only", s]);
        }
        kd_run(&args)
    };
    let unknown = run(&["teacherr"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("--only teacherr: experiments/smoke.toml has no such stage")
    );

    let early = run(&["distilled"]);
    assert_eq!(early.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&early.stderr).contains("stage `teacher` has not run yet"));

    assert!(run(&["teacher"]).status.success());
    assert!(run(&["distilled", "eval_teacher"]).status.success());
    let stages: Vec<String> = csv_rows(&out.join("smoke/summary.csv")).iter().map(|r| r["stage"].clone()).collect();
    assert_eq!(stages, ["teacher", "distilled", "eval_teacher"]);
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn kaldi_archives_train_from_an_experiment_file() {
    let out = fresh_dir("kaldi");
    std::fs::create_dir_all(&out).unwrap();
    let fixtures = root().join("crates/kd-run/tests/fixtures/kaldi");
    let set = |feats: &str| {
        format!(
            "{{ features = \"{}\", labels = \"{}\" }}",
            fixtures.join(feats).display(),
            fixtures.join("ali.ark").display()
        )
    };
    let text = format!(
        "name = \"kaldi\"\nseed = 1\n[data]\nkind = \"files\"\ncontext = [2, 1]\n\
         files.train = {}\nfiles.validation = {}\nfiles.test = {}\n\
         [defaults]\nepochs = 2\nbatch_size = 8\noptimizer = {{ kind = \"sgd\", lr = 0.1 }}\n\
         [[stages]]\nname = \"net\"\nkind = \"train\"\nmodel = {{ hidden = [16] }}\n",
        set("feats.scp"),
        set("feats_cm.ark"),
        set("feats_f32.ark")
    );
    let file = out.join("kaldi.toml");
    std::fs::write(&file, text).unwrap();
    let run = kd_run(&["run", file.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(log.contains("21 training, 21 validation, 21 test examples, 46 classes"), "{log}");
    let summary = csv_rows(&out.join("kaldi/summary.csv"));
    // (4 frames x 40 + 1) x 16 + (16 + 1) x 46 weights.
    assert_eq!(summary[0]["parameters"], "3358");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn specialists_train_by_index_then_combine_and_count_their_coverage() {
    let out = fresh_dir("specialists");
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "experiments/specialists_tiny.toml", "--out", out.to_str().unwrap()];
        args.extend(extra);
        kd_run(&args)
    };
    // As a scheduler's job array would: the generalist and the clusters, then each specialist
    // alone (out of order), then the combination.
    for step in [&["--only", "generalist"][..], &["--only", "clusters"], &["--only", "specialists.2"]] {
        let r = run(step);
        assert!(r.status.success(), "{step:?}: {}", String::from_utf8_lossy(&r.stderr));
    }
    let dir = out.join("specialists_tiny");
    let subsets = csv_rows(&dir.join("subsets.csv"));
    assert_eq!(subsets.len(), 4, "count = 4 subsets kept: {subsets:?}");
    let mut seen = std::collections::HashSet::new();
    let mut last_mass = f64::INFINITY;
    for (m, s) in subsets.iter().enumerate() {
        let classes: Vec<i64> = s["classes"].split(' ').map(|c| c.parse().unwrap()).collect();
        assert_eq!(s["subset"], m.to_string());
        assert_eq!(s["size"], classes.len().to_string());
        assert!(classes.len() >= 3 && classes.windows(2).all(|w| w[0] < w[1]), "{s:?}");
        assert!(classes.iter().all(|c| (0..120).contains(c) && seen.insert(*c)), "one k-means run: disjoint");
        let mass: f64 = s["mass"].parse().unwrap();
        assert!(mass <= last_mass, "most confused first");
        last_mass = mass;
    }
    let trained = |m: usize| dir.join(format!("specialists/specialists.{m}/specialist.csv"));
    assert!(trained(2).exists() && !trained(0).exists());
    assert!(dir.join("checkpoints/specialists.2.safetensors").exists());
    let summary_stages = || csv_rows(&dir.join("summary.csv")).iter().map(|r| r["stage"].clone()).collect::<Vec<_>>();
    assert_eq!(summary_stages(), ["generalist"], "no combination before every specialist is trained");
    let out_of_range = run(&["--only", "specialists.4"]);
    let stderr = String::from_utf8_lossy(&out_of_range.stderr);
    assert!(!out_of_range.status.success() && stderr.contains("found 4 subsets, numbered 0 to 3"), "{stderr}");
    let before = std::fs::read(trained(2)).unwrap();
    let r = run(&[]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(std::fs::read(trained(2)).unwrap(), before, "a trained specialist is not trained again");
    assert_eq!(summary_stages(), ["generalist", "specialists"]);

    // specialists.csv gathers one row per specialist. Half of each epoch comes from the subset,
    // so the dustbin shift is ln((N - inside) / inside) for N training frames: every row must
    // imply the same N.
    let rows = csv_rows(&dir.join("specialists.csv"));
    assert_eq!(rows.len(), 4);
    let mut frames = Vec::new();
    for (m, r) in rows.iter().enumerate() {
        assert_eq!(
            (r["subset"].as_str(), r["classes"].as_str()),
            (m.to_string().as_str(), subsets[m]["size"].as_str())
        );
        let (inside, n): (i64, i64) = (r["train_inside"].parse().unwrap(), r["examples_per_epoch"].parse().unwrap());
        assert_eq!(n, 2 * inside, "default: twice the subset's training frames per epoch");
        let shift: f64 = r["dustbin_shift"].parse().unwrap();
        frames.push(inside as f64 * (1.0 + shift.exp()));
    }
    assert!(frames.iter().all(|f| (f - frames[0]).abs() < 1e-6 * frames[0]), "{frames:?}");

    // Table 4's counts agree with summary.csv: every test frame is in one coverage row, and the
    // top-1 correct of the generalist and of the combination add up to their test accuracy.
    let summary = csv_rows(&dir.join("summary.csv"));
    let errors =
        |stage: &str| -> i64 { summary.iter().find(|r| r["stage"] == stage).unwrap()["test_errors"].parse().unwrap() };
    let rows = csv_rows(&dir.join("specialist_coverage.csv"));
    let coverage: Vec<_> = rows.iter().filter(|r| r["split"] == "test").collect();
    let sum = |key: &str| -> i64 { coverage.iter().map(|r| r[key].parse::<i64>().unwrap()).sum() };
    let validation: i64 =
        rows.iter().filter(|r| r["split"] == "validation").map(|r| r["examples"].parse::<i64>().unwrap()).sum();
    let val_frames: i64 = csv_rows(&dir.join("class_errors.csv"))
        .iter()
        .filter(|c| c["stage"] == "generalist" && c["split"] == "validation")
        .map(|c| c["examples"].parse::<i64>().unwrap())
        .sum();
    assert_eq!(validation, val_frames, "Table 4 on the validation split too");
    let frames: i64 = csv_rows(&dir.join("class_errors.csv"))
        .iter()
        .filter(|c| c["stage"] == "generalist" && c["split"] == "test")
        .map(|c| c["examples"].parse::<i64>().unwrap())
        .sum();
    assert_eq!(sum("examples"), frames);
    assert_eq!(sum("generalist_correct"), frames - errors("generalist"));
    assert_eq!(sum("combined_correct"), frames - errors("specialists"));
    let covered: i64 =
        coverage.iter().filter(|r| r["covering"] != "0").map(|r| r["examples"].parse::<i64>().unwrap()).sum();
    assert!(covered > 0 && covered < frames, "4 subsets cover some of the 120 states: {coverage:?}");
    assert!(sum("consulted") > 0);

    // The report's Table 3: conditional accuracy over the covered examples, test accuracy as in
    // summary.csv.
    let md_path = out.join("specialists.md");
    let report = kd_run(&["report", "--out", md_path.to_str().unwrap(), dir.to_str().unwrap()]);
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    let md = std::fs::read_to_string(&md_path).unwrap();
    let covered_correct: i64 =
        coverage.iter().filter(|r| r["covering"] != "0").map(|r| r["combined_correct"].parse::<i64>().unwrap()).sum();
    let accuracy: f64 = summary.iter().find(|r| r["stage"] == "specialists").unwrap()["test_accuracy"].parse().unwrap();
    let row = format!(
        "| `specialists` (+ 4 specialists) | {:.2}% | {:.2}% |",
        100.0 * covered_correct as f64 / covered as f64,
        100.0 * accuracy
    );
    assert!(md.contains(&row), "{row}\n{md}");
    assert!(out.join("specialists/specialists-coverage.svg").exists());

    // The same experiment in one go, specialists in order, gives the same results.
    let again = fresh_dir("specialists-again");
    let r = kd_run(&["run", "experiments/specialists_tiny.toml", "--out", again.to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let results = |d: &Path| {
        csv_rows(&d.join("specialists_tiny/summary.csv")).iter().map(|r| r["test_errors"].clone()).collect::<Vec<_>>()
    };
    assert_eq!(results(&out), results(&again));

    // Changed specialist settings retrain every specialist (and only the specialists): their
    // old checkpoints and folders go, the generalist and the subsets stay.
    let generalist = std::fs::read(again.join("specialists_tiny/checkpoints/generalist.safetensors")).unwrap();
    let subsets_before = std::fs::read(again.join("specialists_tiny/subsets.csv")).unwrap();
    let r = kd_run(&[
        "run",
        "experiments/specialists_tiny.toml",
        "--out",
        again.to_str().unwrap(),
        "--set",
        "stages.specialists.epochs=1",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let dir = again.join("specialists_tiny");
    assert_eq!(std::fs::read(dir.join("checkpoints/generalist.safetensors")).unwrap(), generalist);
    assert_eq!(std::fs::read(dir.join("subsets.csv")).unwrap(), subsets_before);
    let rows = csv_rows(&dir.join("specialists.csv"));
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|r| r["epochs"] == "1"), "retrained for one epoch: {rows:?}");
    // A change in how they are combined keeps the trained specialists: only eq. 5 runs again.
    let specialist = std::fs::read(dir.join("checkpoints/specialists.0.safetensors")).unwrap();
    let r = kd_run(&[
        "run",
        "experiments/specialists_tiny.toml",
        "--out",
        again.to_str().unwrap(),
        "--set",
        "stages.specialists.epochs=1",
        "--set",
        "stages.specialists.combine_iterations=3",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stderr).contains("specialists are combined changed; they are kept"));
    assert_eq!(std::fs::read(dir.join("checkpoints/specialists.0.safetensors")).unwrap(), specialist);
    assert_eq!(csv_rows(&dir.join("specialists.csv")), rows, "the specialists' rows are theirs, not retrained");
    let combined = csv_rows(&dir.join("summary.csv"));
    assert!(combined.iter().any(|r| r["stage"] == "specialists"), "the combination is recorded again: {combined:?}");
    // --fresh forgets the subsets and the specialists too.
    let r = kd_run(&[
        "run",
        "experiments/specialists_tiny.toml",
        "--out",
        again.to_str().unwrap(),
        "--fresh",
        "--only",
        "generalist",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    for gone in [
        "subsets.csv",
        "specialists.csv",
        "specialist_coverage.csv",
        "specialists",
        "checkpoints/specialists.0.safetensors",
    ] {
        assert!(!dir.join(gone).exists(), "{gone} survived --fresh");
    }
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&again);
}

#[test]
fn a_run_stays_inside_out_and_fresh_removes_only_its_own_files() {
    let base = fresh_dir("names");
    let out = base.join("out");
    // Another folder beside --out that looks like a run directory.
    let victim = base.join("victim");
    std::fs::create_dir_all(victim.join("checkpoints")).unwrap();
    std::fs::write(victim.join("config.toml"), "mine").unwrap();
    std::fs::write(victim.join("checkpoints/teacher.safetensors"), "mine").unwrap();
    let victim_path = victim.to_str().unwrap().to_string();
    for set in [
        "name=../victim".to_string(),
        format!("name={victim_path}"),
        "name=..".into(),
        "name=a/b".into(),
        "name=".into(),
        "name=.hidden".into(),
        "stages.teacher.name=../../teacher".into(),
    ] {
        let r = kd_run(&["run", "experiments/smoke.toml", "--out", out.to_str().unwrap(), "--fresh", "--set", &set]);
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "--set {set}: {stderr}");
        assert!(stderr.contains("not a usable"), "--set {set}: {stderr}");
        assert!(stderr.contains(": name:") || stderr.contains("stage name"), "the key is named: {stderr}");
    }
    assert!(!out.exists(), "nothing was written");
    assert_eq!(std::fs::read_to_string(victim.join("config.toml")).unwrap(), "mine");
    assert!(victim.join("checkpoints/teacher.safetensors").exists());

    // --fresh in a run directory that holds a user's files and a link to the victim's
    // checkpoints: kd-run's files go, the rest stays, the link is not followed.
    let dir = out.join("smoke");
    std::fs::create_dir_all(dir.join("specialists/notes")).unwrap();
    std::fs::create_dir_all(dir.join("specialists/s.0")).unwrap();
    std::fs::write(dir.join("specialists/notes/plan.txt"), "mine").unwrap();
    std::fs::write(dir.join("specialists/s.0/specialist.csv"), "stage\n").unwrap();
    std::fs::write(dir.join("specialists/s.0/mine.txt"), "mine").unwrap();
    std::fs::write(dir.join("notes.txt"), "mine").unwrap();
    std::fs::write(dir.join("summary.csv"), "stage\n").unwrap();
    std::os::unix::fs::symlink(victim.join("checkpoints"), dir.join("checkpoints")).unwrap();
    // Data files that exist but are empty: the run stops when it reads them, after --fresh.
    let missing = base.join("no-data");
    std::fs::create_dir_all(&missing).unwrap();
    for f in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    {
        std::fs::write(missing.join(f), b"").unwrap();
    }
    let r = kd_run(&[
        "run",
        "experiments/smoke.toml",
        "--out",
        out.to_str().unwrap(),
        "--fresh",
        "--set",
        &format!("data.dir={:?}", missing.to_str().unwrap()),
    ]);
    assert_eq!(r.status.code(), Some(1), "the data is missing: {}", String::from_utf8_lossy(&r.stderr));
    assert!(victim.join("checkpoints/teacher.safetensors").exists(), "--fresh followed a link out of the run");
    for kept in ["notes.txt", "specialists/notes/plan.txt", "specialists/s.0/mine.txt"] {
        assert!(dir.join(kept).exists(), "--fresh removed {kept}");
    }
    for gone in ["summary.csv", "specialists/s.0/specialist.csv"] {
        assert!(!dir.join(gone).exists(), "--fresh kept {gone}");
    }
    assert!(!std::fs::symlink_metadata(dir.join("checkpoints")).unwrap().file_type().is_symlink());
    std::fs::remove_dir_all(&base).unwrap();
}

/// A small experiment with a stage of each kind that writes results (train, distill with the
/// teacher-logit cache, evaluate, bias_shift with a fixed shift, ensemble), which runs in about
/// a second.
const TINY: &str = r#"
name = "tiny"
seed = 1
device = "cpu"
threads = 1
[data]
dir = "data/mnist"
train_limit = 700
validation = 100
test_limit = 300
[defaults]
epochs = 2
batch_size = 100
optimizer = { kind = "sgd", lr = 0.1, momentum = 0.9 }
[[stages]]
name = "teacher"
kind = "train"
model = { hidden = [16] }
[[stages]]
name = "student"
kind = "distill"
teacher = "teacher"
temperature = 4
model = { hidden = [8] }
epochs = 1
[[stages]]
name = "again"
kind = "evaluate"
from = "teacher"
[[stages]]
name = "shift"
kind = "bias_shift"
from = "student"
classes = [3]
shifts = { min = 0.0, max = 1.0, step = 0.5 }
fixed_shift = 1.0
[[stages]]
name = "both"
kind = "ensemble"
members = ["teacher", "student"]
"#;

/// [`TINY`] with its data folder absolute, for a file written outside the repository.
fn tiny() -> String {
    with_data(TINY)
}

/// `text` with `dir = "data/mnist"` made the repository's data folder, absolute.
fn with_data(text: &str) -> String {
    text.replace("\"data/mnist\"", &format!("{:?}", root().join("data/mnist").to_str().unwrap()))
}

/// A table's rows without the columns that measure time or name the machine.
fn deterministic_rows(path: &Path) -> Vec<Vec<(String, String)>> {
    let timing = ["seconds", "examples_per_second", "tflops", "device", "inference_examples_per_second", "latency_ms"];
    csv_rows(path)
        .into_iter()
        .map(|r| {
            let mut kept: Vec<(String, String)> =
                r.into_iter().filter(|(k, _)| !timing.contains(&k.as_str())).collect();
            kept.sort();
            kept
        })
        .collect()
}

#[test]
fn a_run_killed_at_every_commit_point_resumes_to_the_same_tables() {
    let base = fresh_dir("faults");
    std::fs::create_dir_all(&base).unwrap();
    let file = base.join("tiny.toml");
    std::fs::write(&file, tiny()).unwrap();
    // `ulimit -c 0`: the abort leaves no core file.
    let run = |out: &Path, fault: Option<usize>| {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("ulimit -c 0; exec \"$0\" \"$@\"")
            .arg(env!("CARGO_BIN_EXE_kd-run"))
            .args(["run", file.to_str().unwrap(), "--out", out.to_str().unwrap()])
            .current_dir(root());
        match fault {
            Some(n) => cmd.env("KD_FAULT_AFTER_WRITES", n.to_string()),
            None => cmd.env_remove("KD_FAULT_AFTER_WRITES"),
        };
        cmd.output().expect("kd-run starts")
    };
    let reference = base.join("reference");
    let r = run(&reference, None);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let tables = ["summary.csv", "class_errors.csv", "metrics.csv", "bias_shifts.csv", "done.csv"];
    let expected: Vec<_> = tables.iter().map(|t| deterministic_rows(&reference.join("tiny").join(t))).collect();
    assert_eq!(expected[0].len(), 6, "teacher, student, again, shift, shift-fixed, both");

    // Kill at write n, resume, compare; two at a time, until a run makes fewer than n writes.
    let check = |n: usize| -> bool {
        let out = base.join(format!("cut{n}"));
        let killed = run(&out, Some(n));
        if killed.status.success() {
            return false;
        }
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(killed.status.signal(), Some(6), "write {n}: aborted: {}", String::from_utf8_lossy(&killed.stderr));
        let resumed = run(&out, None);
        assert!(resumed.status.success(), "after write {n}: {}", String::from_utf8_lossy(&resumed.stderr));
        for (t, want) in tables.iter().zip(&expected) {
            assert_eq!(&deterministic_rows(&out.join("tiny").join(t)), want, "{t}, killed at write {n}");
        }
        let mut leftovers = Vec::new();
        for folder in [out.join("tiny"), out.join("tiny/checkpoints")] {
            for entry in std::fs::read_dir(folder).unwrap() {
                let name = entry.unwrap().file_name().to_string_lossy().into_owned();
                if name.ends_with(".tmp") || name.contains(".resume.") || name.contains(".best.") {
                    leftovers.push(name);
                }
            }
        }
        assert!(leftovers.is_empty(), "killed at write {n}: {leftovers:?}");
        std::fs::remove_dir_all(&out).unwrap();
        true
    };
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (next, end) = (AtomicUsize::new(1), AtomicUsize::new(usize::MAX));
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= end.load(Ordering::SeqCst) || !check(n) {
                    end.fetch_min(n, Ordering::SeqCst);
                    break;
                }
            });
        }
    });
    let points = end.into_inner() - 1;
    eprintln!("killed at each of {points} commit points; every resumed run wrote the same tables");
    assert!(points >= 20, "only {points} writes");
    std::fs::remove_dir_all(&base).unwrap();
}

/// Every file under `dir` but its lock files, with its contents.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if !path.ends_with("locks") {
                    folders.push(path);
                }
            } else {
                files.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    files.sort();
    files
}

#[test]
fn a_run_directory_in_use_is_refused_naming_its_holder_and_only_processes_share_it() {
    let base = fresh_dir("lock");
    std::fs::create_dir_all(&base).unwrap();
    let file = base.join("tiny.toml");
    std::fs::write(&file, tiny()).unwrap();
    let out = base.join("out");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> =
            ["run", file.to_str().unwrap(), "--out", out.to_str().unwrap()].iter().map(|s| s.to_string()).collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let run = |extra: &[&str]| kd_run(&args(extra).iter().map(String::as_str).collect::<Vec<_>>());
    let r = run(&["--only", "teacher"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let dir = out.join("tiny");

    // Another process holds the run directory, as a whole run does.
    let lock_path = dir.join("locks/run.lock");
    let holder = std::fs::File::options().read(true).write(true).open(&lock_path).unwrap();
    holder.try_lock().unwrap();
    let who = "pid 4242 on elsewhere since 2026-12-01 10:00:00 UTC: kd-run run tiny.toml";
    std::fs::write(&lock_path, format!("{who}\n")).unwrap();
    let before = snapshot(&dir);
    for extra in [&[][..], &["--only", "student"], &["--fresh"]] {
        let r = run(extra);
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{extra:?}: {stderr}");
        assert!(stderr.contains("is in use by") && stderr.contains(who), "{extra:?}: {stderr}");
    }
    assert!(snapshot(&dir) == before, "a refused run wrote or removed files");
    drop(holder);

    // Two `--only` processes at once share it, and neither loses the other's rows.
    let spawn = |stage: &str| {
        Command::new(env!("CARGO_BIN_EXE_kd-run"))
            .args(args(&["--only", stage]))
            .current_dir(root())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let children = [spawn("student"), spawn("again")];
    for child in children {
        let done = child.wait_with_output().unwrap();
        assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    }
    let stages = |t: &str| csv_rows(&dir.join(t)).iter().map(|r| r["stage"].clone()).collect::<Vec<_>>();
    assert_eq!(stages("summary.csv"), ["teacher", "student", "again"]);
    assert_eq!(stages("done.csv"), ["teacher", "student", "again"]);
    assert_eq!(stages("class_errors.csv").len(), 3 * 2 * 10, "3 models x 2 splits x 10 classes");
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn a_damaged_teacher_logit_cache_entry_is_computed_again() {
    let base = fresh_dir("cache");
    std::fs::create_dir_all(&base).unwrap();
    let file = base.join("tiny.toml");
    std::fs::write(&file, tiny()).unwrap();
    let out = base.join("out");
    let run = |extra: &[&str]| {
        let mut args = vec!["run", file.to_str().unwrap(), "--out", out.to_str().unwrap()];
        args.extend(extra);
        kd_run(&args)
    };
    let r = run(&["--only", "teacher", "--only", "student"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let student = || csv_rows(&out.join("tiny/summary.csv")).into_iter().find(|r| r["stage"] == "student").unwrap();
    let first = student();
    let entries: Vec<PathBuf> = std::fs::read_dir(out.join(".cache")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let bytes = std::fs::read(&entries[0]).unwrap();
    // A changed value, then a truncated file.
    let mut flipped = bytes.clone();
    let last = flipped.len() - 9;
    flipped[last] ^= 0x40;
    for damaged in [flipped, bytes[..bytes.len() / 2].to_vec()] {
        std::fs::write(&entries[0], &damaged).unwrap();
        let r = run(&["--only", "student", "--redo", "student"]);
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert!(r.status.success(), "{stderr}");
        assert!(stderr.contains("is damaged") && stderr.contains("computing it again"), "{stderr}");
        let again = student();
        assert_eq!((&again["test_errors"], &again["val_errors"]), (&first["test_errors"], &first["val_errors"]));
        assert_eq!(std::fs::read(&entries[0]).unwrap(), bytes, "the entry is written again as it was");
    }
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn a_frame_store_is_written_streamed_with_top_k_targets_and_refused_when_truncated() {
    let dir = fresh_dir("store");
    let stores = dir.join("stores");
    let s = stores.to_str().unwrap();
    let w = kd_run(&["store", "write", "experiments/speech_tiny.toml", "--out", s, "--kind", "f16"]);
    assert!(w.status.success(), "{}", String::from_utf8_lossy(&w.stderr));
    let stdout = String::from_utf8_lossy(&w.stdout);
    assert!(stdout.contains("train: 8176 frames") && stdout.contains("frames/s"), "{stdout}");
    // An experiment on the store: a baseline, its top-k targets beside the store, a student.
    let exp = dir.join("store.toml");
    let write_exp = |targets: &str, stages: &str| {
        let text = format!(
            "name = \"st\"\nseed = 1\n[data]\nkind = \"store\"\ncontext = [4, 2]\n\
             store = {{ dir = \"{s}\", shuffle_buffer = 1000, chunk_frames = 16 {targets} }}\n\
             [defaults]\nepochs = 2\nbatch_size = 64\noptimizer = {{ kind = \"sgd\", lr = 0.05, momentum = 0.9 }}\n{stages}"
        );
        std::fs::write(&exp, text).unwrap();
    };
    write_exp("", "[[stages]]\nname = \"base\"\nkind = \"train\"\nmodel = { hidden = [32] }\n");
    let out = dir.join("runs");
    let r = kd_run(&["run", exp.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let metrics = csv_rows(&out.join("st/metrics.csv"));
    assert_eq!(metrics.len(), 2);
    // The teacher's checkpoint outside the run directory, which `--fresh` below empties.
    let ckpt = dir.join("base.safetensors");
    std::fs::copy(out.join("st/checkpoints/base.safetensors"), &ckpt).unwrap();
    let t = kd_run(&[
        "store",
        "targets",
        &format!("{s}/train"),
        "--teacher",
        ckpt.to_str().unwrap(),
        "--k",
        "3",
        "--temperature",
        "2",
        "--context",
        "4",
        "2",
        "--name",
        "base.kdt",
    ]);
    assert!(t.status.success(), "{}", String::from_utf8_lossy(&t.stderr));
    let said = String::from_utf8_lossy(&t.stdout);
    assert!(said.contains("top-3 targets at T = 2") && said.contains("9 bytes a frame"), "{said}");
    let kept = "share of the teacher's probability mass at T = 2 the top 3 keep, over the 8176 frames: mean ";
    assert!(said.contains(kept), "{said}");
    let student = |t: f64| {
        format!(
            "[[stages]]\nname = \"student\"\nkind = \"distill\"\nteacher_checkpoint = \"{}\"\nteacher_top_k = 3\n\
             model = {{ hidden = [32] }}\ntemperature = {t}\nhard_weight = 0.5\nsoft_weight = 0.5\n",
            ckpt.display()
        )
    };
    write_exp(", targets = \"base.kdt\"", &student(2.0));
    let r = kd_run(&["run", exp.to_str().unwrap(), "--out", out.to_str().unwrap(), "--fresh"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let rows = csv_rows(&out.join("st/metrics.csv"));
    assert!(rows.iter().all(|r| r["stage"] == "student" && !r["soft_kl"].is_empty()), "soft targets were used");
    // The run records the file and what it keeps, as `store targets` said; the report shows it.
    let recorded = csv_rows(&out.join("st/targets.csv"));
    assert_eq!(recorded.len(), 1);
    assert_eq!((recorded[0]["k"].as_str(), recorded[0]["frames"].as_str()), ("3", "8176"));
    let cells: Vec<f64> =
        ["kept_mean", "kept_p50", "kept_p5", "kept_p1", "kept_min"].map(|c| recorded[0][c].parse().unwrap()).into();
    let described = format!(
        "mean {:.4}, p50 {:.4}, p5 {:.4}, p1 {:.4}, min {:.4}",
        cells[0], cells[1], cells[2], cells[3], cells[4]
    );
    assert!(said.contains(&described), "{described} in {said}");
    assert!(cells.iter().all(|&v| v > 0.0 && v <= 1.0) && cells[4] <= cells[3] && cells[3] <= cells[2], "{cells:?}");
    let md_path = dir.join("report.md");
    let report = kd_run(&["report", "--out", md_path.to_str().unwrap(), out.join("st").to_str().unwrap()]);
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    let md = std::fs::read_to_string(&md_path).unwrap();
    let row = format!("| `st` | `base.kdt` | 3 | 2 | 8176 | {:.4} | {:.4} |", cells[0], cells[1]);
    assert!(md.contains("### Top-k targets: the teacher's probability mass they keep") && md.contains(&row), "{md}");
    // Targets made at T = 2 do not serve a stage at T = 3.
    write_exp(", targets = \"base.kdt\"", &student(3.0));
    let r = kd_run(&["run", exp.to_str().unwrap(), "--out", out.to_str().unwrap(), "--fresh"]);
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && e.contains("made at T = 2") && e.contains("T = 3"), "{e}");
    // A truncated shard is named as such, with no panic.
    let shard = stores.join("train/shard-00000.kdf");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let c = kd_run(&["store", "check", &format!("{s}/train")]);
    let e = String::from_utf8_lossy(&c.stderr);
    assert_eq!(c.status.code(), Some(1), "{e}");
    assert!(e.contains("shard-00000.kdf is") && e.contains("the file is truncated") && !e.contains("panic"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `cuda_graphs = true` where no graph can be captured (a CPU) trains eagerly to the same
/// results, saying why; `kd-run bench --cuda-graphs` there is an error naming the flag.
#[test]
fn cuda_graphs_off_the_gpu_train_eagerly_and_say_why() {
    let out = fresh_dir("graphs");
    let (plain, graphs) = (out.join("plain"), out.join("graphs"));
    let plain_run = kd_run(&["run", "experiments/smoke.toml", "--out", plain.to_str().unwrap()]);
    assert!(plain_run.status.success(), "{}", String::from_utf8_lossy(&plain_run.stderr));
    let run =
        kd_run(&["run", "experiments/smoke.toml", "--out", graphs.to_str().unwrap(), "--set", "cuda_graphs=true"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("stage `teacher`: cuda_graphs = true, but CUDA graphs need a CUDA device"), "{stderr}");
    let errors = |dir: &Path| -> Vec<String> {
        csv_rows(&dir.join("smoke/summary.csv")).iter().map(|r| r["test_errors"].clone()).collect()
    };
    assert_eq!(errors(&plain), errors(&graphs));
    let bench = kd_run(&[
        "bench",
        "--cuda-graphs",
        "--device",
        "cpu",
        "--acoustic",
        "tiny",
        "--only",
        "acoustic",
        "--rounds",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&bench.stderr);
    assert!(!bench.status.success() && stderr.contains("--cuda-graphs: CUDA graphs need a CUDA device"), "{stderr}");
    std::fs::remove_dir_all(&out).unwrap();
}

/// The run's TensorBoard event file, read back by TensorBoard's own reader (its
/// `EventAccumulator`, which checks every record's CRC): the per-epoch scalars are those of
/// `metrics.csv`, the training loss comes every 50 steps, and `--fresh` removes the file.
#[test]
fn tensorboard_reads_the_scalars_the_run_logged() {
    let python = root().join(".venv/bin/python");
    if !python.exists() {
        eprintln!("no .venv/bin/python (run `make setup`): TensorBoard's reader is not checked");
        return;
    }
    let dir = fresh_dir("tensorboard");
    std::fs::create_dir_all(&dir).unwrap();
    let exp = dir.join("tb.toml");
    std::fs::write(
        &exp,
        with_data("name = \"tb\"\nseed = 3\ndevice = \"cpu\"\nthreads = 1\n[data]\ndir = \"data/mnist\"\ntrain_limit = 1300\n\
         validation = 100\ntest_limit = 200\n[[stages]]\nname = \"net\"\nkind = \"train\"\nmodel = { hidden = [16] }\n\
         epochs = 2\nbatch_size = 10\noptimizer = { kind = \"sgd\", lr = 0.05, momentum = 0.9 }\n\
         schedule = { kind = \"exponential\", gamma = 0.5 }\n",
        ),
    )
    .unwrap();
    let out = dir.join("out");
    let r = kd_run(&["run", exp.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let events = out.join("tb/tensorboard");
    let files: Vec<PathBuf> = std::fs::read_dir(&events).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let read = Command::new(&python)
        .arg("-c")
        .arg(
            "import sys\n\
             from tensorboard.backend.event_processing import event_accumulator as ea\n\
             acc = ea.EventAccumulator(sys.argv[1], size_guidance={ea.SCALARS: 0})\n\
             acc.Reload()\n\
             for tag in sorted(acc.Tags()['scalars']):\n\
             \x20   for e in acc.Scalars(tag):\n\
             \x20       print(tag, e.step, repr(e.value))\n",
        )
        .arg(&files[0])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&read.stderr);
    assert!(
        read.status.success(),
        "TensorBoard's reader failed (is tensorboard installed? `make setup` installs it):\n{stderr}"
    );
    let text = String::from_utf8(read.stdout).unwrap();
    let scalars: Vec<(String, i64, f64)> = text
        .lines()
        .map(|l| {
            let w: Vec<&str> = l.split(' ').collect();
            (w[0].to_string(), w[1].parse().unwrap(), w[2].parse().unwrap())
        })
        .collect();
    let get = |tag: &str| -> Vec<(i64, f64)> {
        scalars.iter().filter(|(t, _, _)| t == tag).map(|(_, s, v)| (*s, *v)).collect()
    };
    // 1200 training examples in batches of 10: 120 steps an epoch, a loss every 50.
    let losses = get("net/train_loss");
    assert_eq!(losses.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [50, 100, 170, 220], "{text}");
    assert!(losses.iter().all(|(_, v)| v.is_finite() && *v > 0.0 && *v < 5.0), "{losses:?}");
    let metrics = csv_rows(&out.join("tb/metrics.csv"));
    assert_eq!(metrics.len(), 2);
    for (tag, column) in [
        ("net/lr", "lr"),
        ("net/epoch_train_loss", "train_loss"),
        ("net/train_accuracy", "train_accuracy"),
        ("net/val_loss", "val_loss"),
        ("net/val_accuracy", "val_accuracy"),
        ("net/examples_per_second", "examples_per_second"),
    ] {
        let logged = get(tag);
        assert_eq!(logged.len(), 2, "{tag}: {text}");
        for ((step, value), row) in logged.iter().zip(&metrics) {
            let epoch: i64 = row["epoch"].parse().unwrap();
            let want: f64 = row[column].parse().unwrap();
            assert_eq!(*step, epoch * 120, "{tag}");
            // Event values are f32.
            assert!((value - want).abs() <= 1e-6 * want.abs().max(1.0), "{tag} epoch {epoch}: {value} vs {want}");
        }
    }
    assert_eq!(get("net/lr").iter().map(|(_, v)| *v).collect::<Vec<_>>(), [0.05f32 as f64, 0.025f32 as f64]);
    // Run again with --fresh: the old file goes, the new run writes one of its own.
    let r = kd_run(&["run", exp.to_str().unwrap(), "--out", out.to_str().unwrap(), "--fresh"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let again: Vec<PathBuf> = std::fs::read_dir(&events).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(again.len() == 1 && again[0] != files[0], "{again:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts `kd-run args`, sends it `signal` once its first checkpoint inside an epoch exists
/// (`first`), and returns its output.
fn signalled_at_first_checkpoint(args: &[&str], first: &Path, signal: i32) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_kd-run"))
        .args(args)
        .current_dir(root())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kd-run starts");
    let started = std::time::Instant::now();
    while !first.exists() {
        assert!(started.elapsed() < std::time::Duration::from_secs(120), "no checkpoint inside an epoch");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // SAFETY: signals a child process of this test that has not been waited for.
    unsafe { libc::kill(child.id() as i32, signal) };
    child.wait_with_output().unwrap()
}

/// Runs `exp` into `whole` without a stop, then into `cut`, sending `signal` once the first
/// checkpoint inside an epoch of the run (named `name`) exists; returns the second run's
/// arguments and output.
fn stopped_after_a_reference_run(
    exp: &Path,
    whole: &Path,
    cut: &Path,
    name: &str,
    signal: i32,
) -> (Vec<String>, Output) {
    let run = |out: &Path| ["run".to_string(), exp.display().to_string(), "--out".into(), out.display().to_string()];
    let args = run(whole);
    let r = kd_run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let args = run(cut);
    let first = cut.join(name).join("checkpoints/net.resume.safetensors");
    let stopped = signalled_at_first_checkpoint(&args.iter().map(String::as_str).collect::<Vec<_>>(), &first, signal);
    (args.to_vec(), stopped)
}

fn max_weight_difference(a: &Path, b: &Path) -> f64 {
    let (wa, wb) = (tch::Tensor::read_safetensors(a).unwrap(), tch::Tensor::read_safetensors(b).unwrap());
    assert_eq!(wa.len(), wb.len());
    wa.iter()
        .map(|(name, t)| {
            let u = &wb.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name} missing")).1;
            (t.to_kind(tch::Kind::Double) - u.to_kind(tch::Kind::Double)).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

/// An experiment with dropout, jitter, max-norm and momentum, 100 steps an epoch, and a
/// checkpoint every 10 steps (3 kept).
const STEPPED: &str = r#"
name = "ck"
seed = 5
device = "cpu"
threads = 1
[checkpoint]
every_steps = 10
keep = 3
[data]
dir = "data/mnist"
train_limit = 2100
validation = 100
test_limit = 300
[[stages]]
name = "net"
kind = "train"
model = { hidden = [800], input_dropout = 0.2, hidden_dropout = 0.5, max_norm = 2.0 }
jitter = 1
epochs = 3
batch_size = 20
optimizer = { kind = "sgd", lr = 0.1, momentum = 0.9 }
"#;

/// SIGUSR1 (Slurm's warning) stops a stage at the next step boundary after a checkpoint, with
/// status 75 and one line saying how to resume; the run resumed from it (here from the
/// checkpoint before it, the newest one being damaged) ends with the weights and metrics of the
/// uninterrupted run.
#[test]
fn a_run_preempted_inside_an_epoch_resumes_to_the_uninterrupted_weights() {
    let dir = fresh_dir("preempt");
    std::fs::create_dir_all(&dir).unwrap();
    let exp = dir.join("ck.toml");
    std::fs::write(&exp, with_data(STEPPED)).unwrap();
    let (whole, cut) = (dir.join("whole"), dir.join("cut"));
    let (args, stopped) = stopped_after_a_reference_run(&exp, &whole, &cut, "ck", libc::SIGUSR1);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert_eq!(stopped.status.code(), Some(75), "{stderr}");
    let line = stderr.lines().last().unwrap_or_default();
    assert!(
        line.starts_with("stopped: stage `net`: stopped by SIGUSR1 at step ")
            && line.ends_with("run the same command again to resume"),
        "{stderr}"
    );
    // The newest checkpoint damaged: the one before it is used.
    let first = cut.join("ck/checkpoints/net.resume.safetensors");
    let bytes = std::fs::read(&first).unwrap();
    std::fs::write(&first, &bytes[..bytes.len() / 3]).unwrap();
    let resumed = kd_run(&args);
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(stderr.contains("trying the checkpoint before it") && stderr.contains("resuming at step "), "{stderr}");
    let ckpt = |out: &Path| out.join("ck/checkpoints/net.safetensors");
    let diff = max_weight_difference(&ckpt(&whole), &ckpt(&cut));
    // The same kernels in the same order on one thread; a tolerance all the same, for
    // libraries whose kernels depend on memory alignment.
    assert!(diff <= 1e-6, "max |uninterrupted - resumed| = {diff}");
    let columns = |out: &Path| -> Vec<Vec<String>> {
        csv_rows(&out.join("ck/metrics.csv"))
            .iter()
            .map(|r| {
                ["epoch", "train_loss", "train_accuracy", "val_loss", "test_errors"].map(|c| r[c].clone()).to_vec()
            })
            .collect()
    };
    assert_eq!(columns(&whole), columns(&cut));
    let left: Vec<_> = std::fs::read_dir(cut.join("ck/checkpoints")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["net.safetensors"], "the resume checkpoints are removed at the end");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A stage streaming from a frame store, stopped by SIGTERM (a process alone) inside an epoch:
/// status 75, and resumed it ends with the weights of the uninterrupted run (the stream starts
/// again at the checkpoint's batch, the shuffle buffer rebuilt).
#[test]
fn a_streamed_stage_stopped_by_sigterm_resumes_to_the_uninterrupted_weights() {
    let dir = fresh_dir("preempt-store");
    let stores = dir.join("stores");
    let w = kd_run(&["store", "write", "experiments/speech_tiny.toml", "--out", stores.to_str().unwrap()]);
    assert!(w.status.success(), "{}", String::from_utf8_lossy(&w.stderr));
    let exp = dir.join("st.toml");
    std::fs::write(
        &exp,
        format!(
            "name = \"st\"\nseed = 1\nthreads = 1\ndevice = \"cpu\"\n[checkpoint]\nevery_steps = 5\n[data]\nkind = \"store\"\n\
             context = [4, 2]\nstore = {{ dir = \"{}\", shuffle_buffer = 500, chunk_frames = 16 }}\n[[stages]]\n\
             name = \"net\"\nkind = \"train\"\nmodel = {{ hidden = [256], hidden_dropout = 0.3 }}\nepochs = 2\n\
             batch_size = 16\noptimizer = {{ kind = \"sgd\", lr = 0.01, momentum = 0.9 }}\n",
            stores.display()
        ),
    )
    .unwrap();
    let (whole, cut) = (dir.join("whole"), dir.join("cut"));
    let (args, stopped) = stopped_after_a_reference_run(&exp, &whole, &cut, "st", libc::SIGTERM);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert_eq!(stopped.status.code(), Some(75), "{stderr}");
    assert!(stderr.contains("stopped by SIGTERM at step "), "{stderr}");
    let resumed = kd_run(&args);
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success() && stderr.contains("resuming at step "), "{stderr}");
    let ckpt = |out: &Path| out.join("st/checkpoints/net.safetensors");
    let diff = max_weight_difference(&ckpt(&whole), &ckpt(&cut));
    assert!(diff <= 1e-6, "max |uninterrupted - resumed| = {diff}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `run --dry-run` says what a run would do and writes nothing: every stage runs in a new
/// directory; after one stage ran, it is skipped; with its settings changed, it and the stages
/// that read it run again from the start, and the discards are named.
#[test]
fn a_dry_run_prints_the_plan_and_writes_nothing() {
    let dir = fresh_dir("dry-run");
    let out = dir.join("out");
    let o = out.to_str().unwrap();
    let plan = |extra: &[&str]| {
        let mut args = vec!["run", "experiments/smoke.toml", "--out", o, "--dry-run"];
        args.extend(extra);
        let r = kd_run(&args);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        String::from_utf8(r.stdout).unwrap()
    };
    let first = plan(&[]);
    assert!(first.starts_with("a new run in ") && first.contains("stage `teacher` (train): run\n"), "{first}");
    assert!(first.contains("stage `distilled` (distill): run\n    reads the models of `teacher`"), "{first}");
    assert!(!out.exists(), "a dry run wrote {}", out.display());
    let r = kd_run(&["run", "experiments/smoke.toml", "--out", o, "--only", "teacher"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let listing = |d: &Path| -> Vec<(PathBuf, u64)> {
        let mut v: Vec<(PathBuf, u64)> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| (e.path(), e.metadata().unwrap().len()))
            .collect();
        v.sort();
        v
    };
    let before = listing(&out.join("smoke"));
    let second = plan(&[]);
    assert!(
        second.starts_with("resume the run in ") && second.contains("stage `teacher` (train): skip: done"),
        "{second}"
    );
    let changed = plan(&["--set", "stages.teacher.epochs=2"]);
    assert!(changed.contains("discard `teacher`'s results and checkpoints: its settings"), "{changed}");
    assert!(changed.contains("stage `teacher` (train): run again from the start"), "{changed}");
    assert!(changed.contains("stage `distilled` (distill): run"), "{changed}");
    assert_eq!(listing(&out.join("smoke")), before, "a dry run changed the run directory");
    let _ = std::fs::remove_dir_all(&dir);
}
