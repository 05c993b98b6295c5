//! End to end: bad numbers and bad sizes end in a clear error and a non-zero exit, never in a
//! panic or a result row. Each test writes tiny data files (8 x 8 "images", a few frames of
//! speech features) into its own folder and runs `kd-run` on them; each takes about a second.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A folder of its own for each test, removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("kd-bad-input-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the scratch folder");
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn write(&self, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// Runs kd-run in the folder; the output with stderr as text.
    fn kd_run(&self, args: &[&str]) -> (Output, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_kd-run"))
            .args(args)
            .current_dir(&self.0)
            .env_remove("RUST_BACKTRACE")
            .output()
            .expect("kd-run starts");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!stderr.contains("panicked") && !stderr.contains("internal error"), "a panic:\n{stderr}");
        (out, stderr)
    }

    /// Runs `kd-run run experiment.toml --out out` and expects it to fail with `code`; returns
    /// the last line of stderr (the error).
    fn run_fails(&self, code: i32, extra: &[&str]) -> String {
        let mut args = vec!["run", "experiment.toml", "--out", "out"];
        args.extend(extra);
        let (out, stderr) = self.kd_run(&args);
        assert_eq!(out.status.code(), Some(code), "expected exit code {code}:\n{stderr}");
        stderr
            .lines()
            .rfind(|l| l.starts_with("error:"))
            .unwrap_or_else(|| panic!("no error line:\n{stderr}"))
            .to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An IDX file of unsigned bytes.
fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        bytes.extend_from_slice(&d.to_be_bytes());
    }
    bytes.extend_from_slice(data);
    bytes
}

/// Pseudo-random bytes (a fixed LCG: the tests need data, not quality).
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect()
}

/// MNIST-named IDX files in `dir`: `n` training images of `train` = (rows, cols) pixels and 40
/// test images of `test` pixels, labels 0..9.
fn write_images(s: &Scratch, dir: &str, n: usize, train: (u32, u32), test: (u32, u32)) {
    for (prefix, n, (r, c), seed) in [("train", n, train, 1), ("t10k", 40, test, 2)] {
        let pixels = noise(n * (r * c) as usize, seed);
        s.write(&format!("{dir}/{prefix}-images-idx3-ubyte"), idx(&[n as u32, r, c], &pixels));
        let labels: Vec<u8> = noise(n, seed + 10).iter().map(|b| b % 10).collect();
        s.write(&format!("{dir}/{prefix}-labels-idx1-ubyte"), idx(&[n as u32], &labels));
    }
}

/// An experiment on the images in `data/` with `stages` appended.
fn image_experiment(stages: &str) -> String {
    format!(
        "name = \"bad\"\nseed = 1\ndevice = \"cpu\"\nthreads = 1\n[data]\ndir = \"data\"\nvalidation = 40\n\
         [defaults]\nepochs = 1\nbatch_size = 20\noptimizer = {{ kind = \"sgd\", lr = 0.1, momentum = 0.9 }}\n{stages}"
    )
}

fn csv_stages(path: &Path) -> Vec<String> {
    if !path.exists() {
        return Vec::new();
    }
    let mut r = csv::Reader::from_path(path).unwrap();
    r.deserialize::<std::collections::HashMap<String, String>>().map(|row| row.unwrap()["stage"].clone()).collect()
}

/// An NPY array of little-endian `<f4` or `<i8` values.
fn npy(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let shape = match shape {
        [n] => format!("({n},)"),
        _ => format!("({})", shape.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// 30 frames of 3 features, labels 0..3, as .npy files `<name>.npy` and `<name>_labels.npy`.
fn frames(s: &Scratch, name: &str, bad: Option<(usize, f32)>) {
    let mut v: Vec<f32> = noise(90, 7).iter().map(|&b| f32::from(b) / 64.0).collect();
    if let Some((i, x)) = bad {
        v[i] = x;
    }
    s.write(&format!("{name}.npy"), npy("<f4", &[30, 3], &f32_bytes(&v)));
    let labels: Vec<i64> = (0..30).map(|i| i % 3).collect();
    s.write(&format!("{name}_labels.npy"), npy("<i8", &[30], &i64_bytes(&labels)));
}

/// An experiment on frames: train, validation and test read `train`, `dev`, `test` (.npy) unless
/// `files` says otherwise.
fn frames_experiment(files: &str) -> String {
    format!(
        "name = \"bad\"\nseed = 1\ndevice = \"cpu\"\nthreads = 1\n[data]\nkind = \"files\"\ncontext = [1, 1]\n{files}\n\
         [defaults]\nepochs = 1\nbatch_size = 10\noptimizer = {{ kind = \"sgd\", lr = 0.1 }}\n\
         [[stages]]\nname = \"net\"\nkind = \"train\"\nmodel = {{ hidden = [8] }}\n"
    )
}

const NPY_FILES: &str = "files.train = { features = \"train.npy\", labels = \"train_labels.npy\" }\n\
    files.validation = { features = \"dev.npy\", labels = \"dev_labels.npy\" }\n\
    files.test = { features = \"test.npy\", labels = \"test_labels.npy\" }";

#[test]
fn a_diverging_stage_stops_with_its_last_checkpoint_and_no_results() {
    let s = Scratch::new("diverge");
    write_images(&s, "data", 240, (8, 8), (8, 8));
    // Epoch 1 at lr 0.1, epoch 2 at 0.1 x 1e7 = 1e6: the loss explodes in epoch 2.
    let stages = "[[stages]]\nname = \"fine\"\nkind = \"train\"\nmodel = { hidden = [16] }\n\
                  [[stages]]\nname = \"wild\"\nkind = \"train\"\nmodel = { hidden = [16] }\nepochs = 3\n\
                  schedule = { kind = \"exponential\", gamma = 1e7 }\n";
    s.write("experiment.toml", image_experiment(stages));
    let error = s.run_fails(1, &[]);
    for part in ["stage `wild` diverged in epoch 2", "step", "learning rate too high (lr = 1000000", "is kept"] {
        assert!(error.contains(part), "{part:?} in {error}");
    }
    let dir = s.path("out/bad");
    // No result of the diverged stage; the stage before it keeps its rows.
    assert_eq!(csv_stages(&dir.join("summary.csv")), ["fine"]);
    assert!(!csv_stages(&dir.join("class_errors.csv")).contains(&"wild".to_string()));
    let epochs: Vec<String> = csv_stages(&dir.join("metrics.csv"));
    assert_eq!(epochs, ["fine", "wild"], "the metrics of wild's first epoch only");
    assert!(!dir.join("checkpoints/wild.safetensors").exists());
    // The checkpoint of the last good epoch is kept, finite, and says which epoch it ends.
    let resume = dir.join("checkpoints/wild.resume.safetensors");
    let named = tch::Tensor::read_safetensors(&resume).expect("the resume checkpoint is kept");
    for (name, t) in &named {
        if t.is_floating_point() {
            assert!(bool::try_from(t.isfinite().all()).unwrap(), "{name} is finite");
        }
    }
    let epoch = named.iter().find(|(k, _)| k == "__progress__.epoch").expect("epoch entry");
    assert_eq!(i64::try_from(&epoch.1).unwrap(), 1);

    // A NaN written into that checkpoint is refused when the run resumes from it.
    let mut poisoned = named;
    let (name, weight) = poisoned.iter_mut().find(|(k, _)| k == "hidden1.weight").expect("a first layer");
    let _ = weight.get(0).get(3).fill_(f64::NAN);
    let name = name.clone();
    tch::Tensor::write_safetensors(&poisoned, &resume).unwrap();
    let error = s.run_fails(1, &[]);
    assert!(error.contains("wild.resume.safetensors") && error.contains(&format!("`{name}` holds 1 NaN")), "{error}");
}

#[test]
fn a_teacher_or_evaluated_checkpoint_with_a_nan_is_refused_naming_the_file() {
    let s = Scratch::new("nan-checkpoint");
    write_images(&s, "data", 100, (8, 8), (8, 8));
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let config = kd_models::MlpConfig { sizes: vec![64, 6, 10], ..Default::default() };
    let net = kd_models::Mlp::new(&vs.root(), config).unwrap();
    let mut named = net.to_tensors(&vs);
    let (_, bias) = named.iter_mut().find(|(k, _)| k == "output.bias").unwrap();
    tch::no_grad(|| {
        let _ = bias.get(7).fill_(f64::INFINITY);
    });
    tch::Tensor::write_safetensors(&named, s.path("teacher.safetensors")).unwrap();
    for stage in [
        "[[stages]]\nname = \"student\"\nkind = \"distill\"\nteacher_checkpoint = \"teacher.safetensors\"\n\
         model = { hidden = [4] }\ntemperature = 2\n",
        "[[stages]]\nname = \"look\"\nkind = \"evaluate\"\ncheckpoint = \"teacher.safetensors\"\n",
    ] {
        s.write("experiment.toml", image_experiment(stage));
        let error = s.run_fails(1, &["--fresh"]);
        assert!(error.contains("teacher.safetensors: `output.bias` holds 1 NaN or infinite value"), "{error}");
        assert!(csv_stages(&s.path("out/bad/summary.csv")).is_empty());
    }
}

#[test]
fn a_nan_in_npy_or_kaldi_features_is_refused_naming_the_file() {
    let s = Scratch::new("nan-features");
    frames(&s, "train", None);
    frames(&s, "dev", None);
    frames(&s, "test", Some((3 * 17 + 2, f32::NAN)));
    s.write("experiment.toml", frames_experiment(NPY_FILES));
    let error = s.run_fails(1, &[]);
    assert!(error.contains("test.npy: frame 17, feature 2 is NaN: features must be finite"), "{error}");

    // The same frames as a Kaldi archive (binary float matrices, and int32 alignments).
    let mut ark = Vec::new();
    let mut ali = Vec::new();
    for (u, rows) in [("utt1", 0..12), ("utt2", 12..30)] {
        let mut v: Vec<f32> = noise(90, 7).iter().map(|&b| f32::from(b) / 64.0).collect();
        v[20 * 3 + 1] = f32::INFINITY;
        let n = rows.len() as i32;
        ark.extend_from_slice(format!("{u} \0BFM \x04").as_bytes());
        ark.extend_from_slice(&n.to_le_bytes());
        ark.push(4);
        ark.extend_from_slice(&3i32.to_le_bytes());
        ark.extend_from_slice(&f32_bytes(&v[rows.start * 3..rows.end * 3]));
        ali.extend_from_slice(format!("{u} \0B\x04").as_bytes());
        ali.extend_from_slice(&n.to_le_bytes());
        for i in rows {
            ali.push(4);
            ali.extend_from_slice(&((i % 3) as i32).to_le_bytes());
        }
    }
    s.write("feats.ark", ark);
    s.write("ali.ark", ali);
    let files = NPY_FILES.replace(
        "files.train = { features = \"train.npy\", labels = \"train_labels.npy\" }",
        "files.train = { features = \"feats.ark\", labels = \"ali.ark\" }",
    );
    s.write("experiment.toml", frames_experiment(&files));
    let error = s.run_fails(1, &["--fresh"]);
    // Frame 20 of the whole is frame 8 of the second utterance.
    assert!(error.contains("feats.ark: utterance 'utt2', frame 8, feature 1 is inf"), "{error}");

    // A synthetic corpus whose noise overflows f32.
    let speech = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/speech_tiny.toml");
    let sets = ["data.speech.noise=3e38", "data.speech.speakers=3", "data.speech.utterances_per_speaker=1"];
    let mut args = vec!["run", speech.to_str().unwrap(), "--out", "out"];
    for set in &sets {
        args.extend(["--set", set]);
    }
    let (out, stderr) = s.kd_run(&args);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("data.speech: ") && stderr.contains("generated feature values are NaN or infinite"),
        "{stderr}"
    );
}

#[test]
fn temperatures_outside_what_f32_resolves_are_validation_errors() {
    let s = Scratch::new("temperature");
    let stage = "[[stages]]\nname = \"t\"\nkind = \"train\"\nmodel = { hidden = [4] }\n\
                 [[stages]]\nname = \"student\"\nkind = \"distill\"\nteacher = \"t\"\nmodel = { hidden = [4] }\ntemperature = 2\n";
    s.write("experiment.toml", image_experiment(stage));
    for t in ["1e30", "1e-45", "1e-6"] {
        let (out, stderr) =
            s.kd_run(&["validate", "experiment.toml", "--set", &format!("stages.student.temperature={t}")]);
        assert_eq!(out.status.code(), Some(2), "T = {t}: {stderr}");
        assert!(stderr.contains("expected a temperature in [0.01, 1e6]"), "T = {t}: {stderr}");
    }
}

#[test]
fn test_images_of_another_size_are_an_error_naming_both_files() {
    let s = Scratch::new("geometry");
    s.write(
        "experiment.toml",
        image_experiment("[[stages]]\nname = \"net\"\nkind = \"train\"\nmodel = { hidden = [4] }\n"),
    );
    // 6 x 6 would fail in a matrix product; 4 x 16 has the 64 pixels of 8 x 8 and would pass as them.
    for (test, shown) in [((6, 6), "6 x 6"), ((4, 16), "4 x 16")] {
        write_images(&s, "data", 100, (8, 8), test);
        let error = s.run_fails(1, &["--fresh"]);
        assert!(error.contains("train-images-idx3-ubyte holds images of 8 x 8 pixels"), "{error}");
        assert!(error.contains(&format!("t10k-images-idx3-ubyte holds {shown}")), "{error}");
    }
}

#[test]
fn absurd_sizes_are_errors_before_anything_is_allocated() {
    let s = Scratch::new("sizes");
    write_images(&s, "data", 100, (8, 8), (8, 8));
    let net =
        |model: &str, extra: &str| format!("[[stages]]\nname = \"net\"\nkind = \"train\"\nmodel = {model}\n{extra}");
    // Known once the data is: 64 inputs, 10 classes.
    s.write("experiment.toml", image_experiment(&net("{ hidden = [100000000] }", "")));
    let error = s.run_fails(1, &[]);
    assert!(error.contains("a 64-100000000-10 network has 7500000010 parameters, more than the 1073741824"), "{error}");
    s.write("experiment.toml", image_experiment(&net("{ hidden = [4] }", "jitter = 4000000000\n")));
    let error = s.run_fails(1, &["--fresh"]);
    assert!(error.contains("jitter = 4000000000 would move 8 x 8 images out of the frame"), "{error}");
    // Known from the file alone: validation errors.
    s.write("experiment.toml", image_experiment(&net("{ hidden = [100000, 100000] }", "")));
    let error = s.run_fails(2, &[]);
    assert!(error.contains("makes a network of more than 1073741824 parameters"), "{error}");

    frames(&s, "train", None);
    frames(&s, "dev", None);
    frames(&s, "test", None);
    s.write("experiment.toml", frames_experiment(&format!("{NPY_FILES}\nclasses = 1000000000")));
    let error = s.run_fails(2, &[]);
    assert!(error.contains("classes = 1000000000: kd-run supports at most 1000000 classes"), "{error}");
    s.write("experiment.toml", frames_experiment(NPY_FILES).replace("context = [1, 1]", "context = [4000000000, 1]"));
    let error = s.run_fails(2, &[]);
    assert!(error.contains("at most 1000 frames on either side"), "{error}");

    // A pdf-id of 2e9 would make a 2e9-wide output layer.
    let labels: Vec<i64> = (0..30).map(|i| if i == 5 { 2_000_000_000 } else { i % 3 }).collect();
    s.write("dev_labels.npy", npy("<i8", &[30], &i64_bytes(&labels)));
    s.write("experiment.toml", frames_experiment(NPY_FILES));
    let error = s.run_fails(1, &["--fresh"]);
    assert!(error.contains("dev_labels.npy: label 2000000000 is not a class id (0 to 999999"), "{error}");
    frames(&s, "dev", None);

    // Utterance lengths whose sum wraps around to the 30 frames.
    s.write("lengths.npy", npy("<i8", &[3], &i64_bytes(&[i64::MAX, i64::MAX, 32])));
    let files =
        NPY_FILES.replace("labels = \"train_labels.npy\"", "labels = \"train_labels.npy\", lengths = \"lengths.npy\"");
    s.write("experiment.toml", frames_experiment(&files));
    let error = s.run_fails(1, &["--fresh"]);
    assert!(error.contains("lengths.npy: utterance lengths must be > 0 and add up to the 30 frames"), "{error}");
    assert!(error.contains("they add up to more than 2^63"), "{error}");
}

/// File names may be any bytes: an experiment file and an output folder whose names are not
/// UTF-8 run, the command recorded in `command.txt` reads back through bash as the same bytes,
/// and a report of the run works.
#[test]
fn names_that_are_not_utf8_work() {
    use std::os::unix::ffi::OsStrExt;
    let s = Scratch::new("not-utf8");
    write_images(&s, "data", 120, (8, 8), (8, 8));
    let stages = "[[stages]]\nname = \"net\"\nkind = \"train\"\nmodel = { hidden = [8] }\n";
    let file = s.write("exp.toml", image_experiment(stages));
    let odd_file = file.with_file_name(std::ffi::OsStr::from_bytes(b"exp-\xe9.toml"));
    std::fs::rename(&file, &odd_file).unwrap();
    let out = std::ffi::OsStr::from_bytes(b"out-\xfe");
    let status = |args: &[&std::ffi::OsStr]| {
        let o = Command::new(env!("CARGO_BIN_EXE_kd-run"))
            .args(args)
            .current_dir(&s.0)
            .env_remove("RUST_BACKTRACE")
            .output()
            .expect("kd-run starts");
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success() && !stderr.contains("panicked"), "{stderr}");
    };
    let run = std::ffi::OsStr::new("run");
    status(&[run, odd_file.file_name().unwrap(), std::ffi::OsStr::new("--out"), out]);
    let dir = s.0.join(out).join("bad");
    assert_eq!(csv_stages(&dir.join("summary.csv")), ["net"]);
    let command = std::fs::read_to_string(dir.join("command.txt")).unwrap();
    assert!(command.contains("$'exp-\\xe9.toml' --out $'out-\\xfe'"), "{command}");
    let echoed = Command::new("bash").arg("-c").arg(format!("printf '%s|' {}", &command["kd-run ".len()..])).output();
    assert_eq!(echoed.unwrap().stdout, b"run|exp-\xe9.toml|--out|out-\xfe|");
    let report = s.0.join(out).join("report.md");
    status(&[std::ffi::OsStr::new("report"), dir.as_os_str(), std::ffi::OsStr::new("--out"), report.as_os_str()]);
    assert!(std::fs::read_to_string(&report).unwrap().contains("$'"));
}

/// The command line follows its users' habits: completions for three shells, examples in
/// `--help`, `-q` keeps the log to warnings, and the final table gives each model's test
/// errors out of the test set with its accuracy, its columns aligned.
#[test]
fn completions_help_quiet_and_the_final_table() {
    let s = Scratch::new("cli");
    for shell in ["bash", "zsh", "fish"] {
        let (out, stderr) = s.kd_run(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {stderr}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains("kd-run") && script.contains("dry-run"), "{shell}: {script}");
    }
    let (out, _) = s.kd_run(&["--help"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Examples:\n  kd-run run experiments/mnist.toml"));
    write_images(&s, "data", 120, (8, 8), (8, 8));
    let stages =
        "[[stages]]\nname = \"a_rather_long_stage_name_for_the_table\"\nkind = \"train\"\nmodel = { hidden = [8] }\n\
                  [[stages]]\nname = \"b\"\nkind = \"train\"\nmodel = { hidden = [8] }\n";
    s.write("experiment.toml", image_experiment(stages));
    let (out, stderr) = s.kd_run(&["-q", "run", "experiment.toml", "--out", "out"]);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("INFO"), "-q logged progress:\n{stderr}");
    let table = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = table.lines().take(3).collect();
    assert!(lines[0].starts_with("stage") && lines[0].contains("accuracy"), "{table}");
    // 40 test images; every row as wide as the header (the numbers right-aligned under it).
    assert!(lines[1..].iter().all(|l| l.contains(" / 40") && l.contains('%')), "{table}");
    assert!(lines.iter().all(|l| l.len() == lines[0].len()), "{table}");
}

#[test]
fn data_changed_under_a_run_with_done_stages_is_an_error_until_fresh() {
    let s = Scratch::new("data-changed");
    for name in ["train", "dev", "test"] {
        frames(&s, name, None);
    }
    s.write("experiment.toml", frames_experiment(NPY_FILES));
    let (out, stderr) = s.kd_run(&["run", "experiment.toml", "--out", "out"]);
    assert!(out.status.success(), "{stderr}");
    let recorded = std::fs::read_to_string(s.path("out/bad/data.fingerprints")).unwrap();
    let whats: Vec<&str> = recorded.lines().map(|l| l.split_once("  ").unwrap().1).collect();
    assert_eq!(whats, ["the training examples", "the test examples", "the validation examples"], "{recorded}");
    let summary = std::fs::read(s.path("out/bad/summary.csv")).unwrap();

    // The same data: the stage is done and stays.
    let (out, stderr) = s.kd_run(&["run", "experiment.toml", "--out", "out"]);
    assert!(out.status.success() && stderr.contains("already done"), "{stderr}");

    // Other training frames at the same path, the configuration unchanged (the other splits are
    // normalized with the training frames' statistics, so they read as changed too).
    frames(&s, "train", Some((5, 0.5)));
    let error = s.run_fails(1, &[]);
    for part in [
        "the data differ from those the run recorded",
        "the training examples (fingerprint",
        "stages done (net)",
        "--fresh",
    ] {
        assert!(error.contains(part), "{part:?} in {error}");
    }
    assert_eq!(std::fs::read(s.path("out/bad/summary.csv")).unwrap(), summary, "nothing rewritten");
    assert_eq!(std::fs::read_to_string(s.path("out/bad/data.fingerprints")).unwrap(), recorded);

    // --fresh trains on the new data and records it.
    let (out, stderr) = s.kd_run(&["run", "experiment.toml", "--out", "out", "--fresh"]);
    assert!(out.status.success(), "{stderr}");
    let now = std::fs::read_to_string(s.path("out/bad/data.fingerprints")).unwrap();
    // The features are normalized with the training frames' statistics: every split changed.
    assert_ne!(now.lines().next(), recorded.lines().next());
}
