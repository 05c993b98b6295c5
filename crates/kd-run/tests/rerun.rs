//! Experiments independent of the working directory: paths resolve against the experiment
//! file's folder, a missing input is reported before anything is created, and a run's
//! `config.toml` is itself an experiment file that reruns the run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `kd-run ARGS` in the working directory `cwd`.
fn kd_run_in(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kd-run")).args(args).current_dir(cwd).output().expect("kd-run starts")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A folder of this test's own, empty.
fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kd-rerun-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A tiny experiment of a stage of each kind that needs no other run, its data named relative
/// to the file (`MNIST` is replaced by the path).
const TINY: &str = r#"
name = "tiny"
seed = 4
device = "cpu"
threads = 1
[data]
dir = "MNIST"
train_limit = 600
validation = 100
test_limit = 300
[defaults]
epochs = 1
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
model = { hidden = [8] }
sweep = { temperature = [4] }
[[stages]]
name = "shift"
kind = "bias_shift"
from = "student-T4"
classes = [3]
shifts = { min = 0.0, max = 1.0, step = 0.5 }
"#;

/// `summary.csv` without the columns that measure time or name the machine.
fn results(path: &Path) -> Vec<Vec<(String, String)>> {
    let timing = ["seconds", "device", "inference_examples_per_second", "latency_ms"];
    let mut r = csv::Reader::from_path(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    r.deserialize::<std::collections::HashMap<String, String>>()
        .map(|row| {
            let mut kept: Vec<(String, String)> =
                row.unwrap().into_iter().filter(|(k, _)| !timing.contains(&k.as_str())).collect();
            kept.sort();
            kept
        })
        .collect()
}

/// The experiment in `dir/exp/tiny.toml`, its data a link `dir/exp/data` to the repository's,
/// named `data` (relative to the file).
fn tiny_experiment(dir: &Path) -> PathBuf {
    let exp = dir.join("exp");
    std::fs::create_dir_all(&exp).unwrap();
    std::os::unix::fs::symlink(std::fs::canonicalize(root().join("data/mnist")).unwrap(), exp.join("data")).unwrap();
    let file = exp.join("tiny.toml");
    std::fs::write(&file, TINY.replace("MNIST", "data")).unwrap();
    file
}

#[test]
fn an_experiment_run_from_another_directory_finds_its_data() {
    let dir = fresh_dir("cwd");
    let file = tiny_experiment(&dir);
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    // Relative to the working directory `elsewhere`, the file is `../exp/tiny.toml`, and its
    // `data` would be `elsewhere/data`, which does not exist.
    let v = kd_run_in(&elsewhere, &["validate", "../exp/tiny.toml"]);
    assert!(v.status.success(), "{}", stderr(&v));
    let printed = String::from_utf8_lossy(&v.stdout);
    assert!(printed.contains(&format!("dir = {:?}", dir.join("exp/data").to_str().unwrap())), "{printed}");
    let r = kd_run_in(&elsewhere, &["run", "../exp/tiny.toml", "--out", "out"]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert_eq!(results(&elsewhere.join("out/tiny/summary.csv")).len(), 3);
    assert!(file.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_missing_input_is_reported_before_anything_is_created() {
    let dir = fresh_dir("missing");
    let file = dir.join("tiny.toml");
    let checkpoint = "[[stages]]\nname = \"old\"\nkind = \"evaluate\"\ncheckpoint = \"runs/a/t.safetensors\"\n";
    let mnist = std::fs::canonicalize(root().join("data/mnist")).unwrap();
    let cases = [
        (TINY.replace("MNIST", "no/mnist"), "data.dir", dir.join("no/mnist/train-images-idx3-ubyte")),
        (
            format!("{}{checkpoint}", TINY.replace("MNIST", mnist.to_str().unwrap())),
            "stage `old`: checkpoint",
            dir.join("runs/a/t.safetensors"),
        ),
    ];
    for (text, key, path) in cases {
        std::fs::write(&file, text).unwrap();
        let v = kd_run_in(&dir, &["validate", "tiny.toml"]);
        let err = stderr(&v);
        assert_eq!(v.status.code(), Some(2), "{err}");
        assert!(err.contains(key) && err.contains(path.to_str().unwrap()), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        let out = dir.join("out");
        let r = kd_run_in(&dir, &["run", "tiny.toml", "--out", out.to_str().unwrap()]);
        assert_eq!(r.status.code(), Some(2), "{}", stderr(&r));
        assert!(stderr(&r).contains(key) && stderr(&r).contains(path.to_str().unwrap()), "{}", stderr(&r));
        assert!(!out.exists(), "the run created {} before it found its input missing", out.display());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The results that do not depend on timing: `summary.csv`'s and `metrics.csv`'s columns less
/// seconds, throughput and device.
fn deterministic(run: &Path) -> Vec<Vec<Vec<(String, String)>>> {
    let timing = ["seconds", "device", "examples_per_second", "tflops", "inference_examples_per_second", "latency_ms"];
    ["summary.csv", "metrics.csv", "class_errors.csv"]
        .iter()
        .map(|t| {
            let mut r = csv::Reader::from_path(run.join(t)).unwrap();
            r.deserialize::<std::collections::HashMap<String, String>>()
                .map(|row| {
                    let mut kept: Vec<(String, String)> =
                        row.unwrap().into_iter().filter(|(k, _)| !timing.contains(&k.as_str())).collect();
                    kept.sort();
                    kept
                })
                .collect()
        })
        .collect()
}

#[test]
fn a_run_s_config_toml_validates_and_reruns_to_the_same_results() {
    let dir = fresh_dir("record");
    tiny_experiment(&dir);
    let first = kd_run_in(&dir.join("exp"), &["run", "tiny.toml", "--out", "../one"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let record = dir.join("one/tiny/config.toml");
    let text = std::fs::read_to_string(&record).unwrap();
    // `validate` accepts it and prints it as it is: the record is a resolved experiment file.
    let v = kd_run_in(&dir, &["validate", "one/tiny/config.toml"]);
    assert!(v.status.success(), "{}", stderr(&v));
    assert_eq!(String::from_utf8_lossy(&v.stdout), text);
    // Rerun from the record, from another working directory, into another --out.
    let again = kd_run_in(&dir.join("one"), &["run", "tiny/config.toml", "--out", "../two"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(std::fs::read_to_string(dir.join("two/tiny/config.toml")).unwrap(), text);
    let (one, two) = (deterministic(&dir.join("one/tiny")), deterministic(&dir.join("two/tiny")));
    assert_eq!(one[0].len(), 3, "teacher, student-T4, shift");
    assert_eq!(one, two, "the rerun's summary, metrics and class errors");
    // The first run resumes from its record as finished, and the report reads it.
    let resumed = kd_run_in(&dir, &["run", "one/tiny/config.toml", "--out", "one"]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert_eq!(deterministic(&dir.join("one/tiny")), one);
    let report = kd_run_in(&dir, &["report", "--out", "r/report.md", "two/tiny"]);
    assert!(report.status.success(), "{}", stderr(&report));
    std::fs::remove_dir_all(&dir).unwrap();
}
