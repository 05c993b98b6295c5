//! Adversarial inputs, end to end: corrupted data files (IDX images, NumPy arrays, Kaldi
//! archives and scp files), broken checkpoints for evaluate and distill stages, absurd settings,
//! odd names and TOML bombs. Every case must end with a non-zero exit and a short error (one
//! `error:` line, at most a few lines of context, no panic or backtrace), or with a correct
//! result; and no case may write anything outside its `--out` folder (each runs with its working
//! directory in a folder of its own, which is compared before and after).
//!
//! The cases are a table: add one to `cases()`. With `--nocapture` the test prints one line per
//! case and the counts.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How a case must end.
#[derive(Clone, Copy)]
enum Expect {
    /// A non-zero exit and a short error containing this text (may be empty).
    Reject(&'static str),
    /// Exit 0 and a `summary.csv` in the run directory.
    Succeed,
    /// Exit 0 and `out/report.md` (or `out/report`) containing this text (`kd-run report` cases).
    Report(&'static str),
}

/// What a case gets to work with: its folder (the working directory), the valid inputs already
/// in `in/`, and the experiment file `exp.toml`, which the case may rewrite.
struct Ctx {
    dir: PathBuf,
}

impl Ctx {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn write(&self, name: &str, bytes: &[u8]) {
        let p = self.path(name);
        let _ = std::fs::remove_file(&p);
        std::fs::write(p, bytes).expect("write case file");
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).expect("read case file")
    }

    /// Changes `in/<name>` in place.
    fn edit(&self, name: &str, f: impl FnOnce(&mut Vec<u8>)) {
        let mut b = self.read(name);
        f(&mut b);
        self.write(name, &b);
    }

    /// Writes `exp.toml`.
    fn experiment(&self, text: &str) {
        self.write("exp.toml", text.as_bytes());
    }
}

type Setup = fn(&Ctx) -> Vec<String>;

fn prepend(b: &mut Vec<u8>, head: &[u8]) {
    b.splice(0..0, head.iter().copied());
}

struct Case {
    name: &'static str,
    expect: Expect,
    /// Prepares the inputs and returns the arguments after `kd-run` (see [`run_args`]).
    setup: Setup,
}

fn case(name: &'static str, expect: Expect, setup: Setup) -> Case {
    Case { name, expect, setup }
}

/// Runs [`IMAGES`] into `runs/<name>` with `sets` (`--set` assignments), for report cases.
fn make_run(c: &Ctx, name: &str, sets: &[&str]) -> String {
    c.experiment(IMAGES);
    let mut args: Vec<String> = ["run", "exp.toml", "--out", "runs", "--set"].map(String::from).to_vec();
    args.push(format!("name={name}"));
    for set in sets {
        args.extend(["--set".to_string(), set.to_string()]);
    }
    let status = Command::new(env!("CARGO_BIN_EXE_kd-run"))
        .args(&args)
        .current_dir(&c.dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("kd-run starts");
    assert!(status.success(), "making run {name} failed");
    format!("runs/{name}")
}

/// `report --out <out> RUNS...`.
fn report_args(out: &str, runs: &[&str]) -> Vec<String> {
    ["report", "--out", out].iter().chain(runs).map(|s| s.to_string()).collect()
}

/// Rewrites column `column` of a CSV file's data rows with `values`, one per row.
fn set_column(c: &Ctx, file: &str, column: &str, values: &[&str]) {
    let text = String::from_utf8(c.read(file)).unwrap();
    let mut lines: Vec<Vec<String>> = text.lines().map(|l| l.split(',').map(String::from).collect()).collect();
    let at = lines[0].iter().position(|h| h == column).unwrap_or_else(|| panic!("{file} has no {column}"));
    for (line, value) in lines[1..].iter_mut().zip(values) {
        line[at] = value.to_string();
    }
    let joined: Vec<String> = lines.iter().map(|l| l.join(",")).collect();
    c.write(file, format!("{}\n", joined.join("\n")).as_bytes());
}

/// `run exp.toml --out out`, the arguments most cases use.
fn run_args() -> Vec<String> {
    ["run", "exp.toml", "--out", "out"].map(String::from).to_vec()
}

// ---------------------------------------------------------------------------------------------
// Valid inputs.

/// An IDX file of unsigned bytes.
fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        b.extend_from_slice(&d.to_be_bytes());
    }
    b.extend_from_slice(data);
    b
}

/// A `.npy` file (format 1.0) with the given dtype, shape and little-endian data.
fn npy(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let shape = match shape {
        [n] => format!("({n},)"),
        s => format!("({})", s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend_from_slice(&(header.len() as u16).to_le_bytes());
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/kaldi");

/// 4 x 4 images of ten classes, 120 for training and 40 for testing; frames of 3 features for
/// the NumPy and Kaldi cases; a checkpoint of a 16-8-10 network.
fn write_inputs(ctx: &Ctx) {
    std::fs::create_dir_all(ctx.path("in/mnist")).expect("mkdir");
    for (prefix, n) in [("train", 120u32), ("t10k", 40)] {
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        // Each class lights its own pixel, so the data can be learned.
        let pixels: Vec<u8> =
            (0..n).flat_map(|i| (0..16u32).map(move |p| if p == i % 10 { 255 } else { (p * 7 % 40) as u8 })).collect();
        ctx.write(&format!("in/mnist/{prefix}-images-idx3-ubyte"), &idx(&[n, 4, 4], &pixels));
        ctx.write(&format!("in/mnist/{prefix}-labels-idx1-ubyte"), &idx(&[n], &labels));
    }
    let frames = 60usize;
    let feats: Vec<u8> = (0..frames * 3).flat_map(|i| ((i % 7) as f32 * 0.5).to_le_bytes()).collect();
    let labels: Vec<u8> = (0..frames).flat_map(|i| ((i % 4) as i64).to_le_bytes()).collect();
    ctx.write("in/f.npy", &npy("<f4", &[frames, 3], &feats));
    ctx.write("in/l.npy", &npy("<i8", &[frames], &labels));
    ctx.write("in/n.npy", &npy("<i8", &[3], &[20i64, 20, 20].map(i64::to_le_bytes).concat()));
    for name in ["feats_f32.ark", "feats_cm.ark", "ali.ark"] {
        ctx.write(&format!("in/{name}"), &std::fs::read(Path::new(FIXTURES).join(name)).expect("fixture"));
    }
    let scp = std::fs::read_to_string(Path::new(FIXTURES).join("feats.scp")).expect("fixture");
    ctx.write("in/feats.scp", scp.replace(" feats", " in/feats").as_bytes());
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let net = kd_models::Mlp::new(&vs.root(), kd_models::MlpConfig::plain([16, 8, 10])).expect("mlp");
    tch::Tensor::write_safetensors(&net.to_tensors(&vs), ctx.path("in/ck.safetensors")).expect("checkpoint");
}

/// The images, one epoch, a tiny model.
const IMAGES: &str = r#"name = "adv"
seed = 1
device = "cpu"
threads = 1

[data]
dir = "in/mnist"
validation = 20

[defaults]
epochs = 1
batch_size = 20
optimizer = { kind = "sgd", lr = 0.1, momentum = 0.9 }

[[stages]]
name = "net"
kind = "train"
model = { hidden = [8] }
"#;

/// [`IMAGES`] plus stages that read the checkpoint `in/ck.safetensors`.
fn with_checkpoint_stages() -> String {
    format!(
        "{IMAGES}\n[[stages]]\nname = \"eval\"\nkind = \"evaluate\"\ncheckpoint = \"in/ck.safetensors\"\n\n\
         [[stages]]\nname = \"student\"\nkind = \"distill\"\nteacher_checkpoint = \"in/ck.safetensors\"\n\
         model = {{ hidden = [4] }}\ntemperature = 4\n"
    )
}

/// [`IMAGES`] plus a stage evaluating `checkpoint`, with `extra` lines (a `sha256`, say).
fn evaluating(checkpoint: &str, extra: &str) -> String {
    format!("{IMAGES}\n[[stages]]\nname = \"eval\"\nkind = \"evaluate\"\ncheckpoint = \"{checkpoint}\"\n{extra}\n")
}

/// Lower-case hex SHA-256 of a case file.
fn sha256_of(c: &Ctx, name: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(c.read(name)).iter().map(|b| format!("{b:02x}")).collect()
}

/// `in/ck.provenance.toml`, the provenance record of `in/ck.safetensors` as it is now.
fn write_record(c: &Ctx) {
    let record = format!(
        "sha256 = \"{}\"\ncommand = \"kd-run run exp.toml --only net\"\ncommit = \"0123abc\"\nstage = \"net\"\n\
         test_errors = 3\ntest_examples = 40\n",
        sha256_of(c, "in/ck.safetensors")
    );
    c.write("in/ck.provenance.toml", record.as_bytes());
}

/// Replaces `name` with another network of the checkpoint's shape (other weights: another
/// draw of the initialization).
fn replace_checkpoint(c: &Ctx, name: &str) {
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let net = kd_models::Mlp::new(&vs.root(), kd_models::MlpConfig::plain([16, 8, 10])).expect("mlp");
    let _ = std::fs::remove_file(c.path(name));
    tch::Tensor::write_safetensors(&net.to_tensors(&vs), c.path(name)).expect("checkpoint");
}

/// Frames from files: `features` and `labels` (and `extra`, e.g. a `lengths` entry) for every split.
fn files_experiment(features: &str, labels: &str, extra: &str) -> String {
    let set = format!("{{ features = \"{features}\", labels = \"{labels}\"{extra} }}");
    format!(
        "name = \"adv\"\nseed = 1\ndevice = \"cpu\"\nthreads = 1\n\n[data]\nkind = \"files\"\ncontext = [1, 1]\n\
         files.train = {set}\nfiles.validation = {set}\nfiles.test = {set}\n\n[defaults]\nepochs = 1\n\
         batch_size = 16\noptimizer = {{ kind = \"sgd\", lr = 0.1 }}\n\n[[stages]]\nname = \"net\"\n\
         kind = \"train\"\nmodel = {{ hidden = [8] }}\n"
    )
}

// ---------------------------------------------------------------------------------------------
// The cases.

use Expect::{Reject, Report, Succeed};

fn cases() -> Vec<Case> {
    vec![
        // Correct results: the inputs the corrupted cases start from are good.
        case("valid images", Succeed, |c| {
            c.experiment(&with_checkpoint_stages());
            run_args()
        }),
        case("valid npy frames", Succeed, |c| {
            c.experiment(&files_experiment("in/f.npy", "in/l.npy", ", lengths = \"in/n.npy\""));
            run_args()
        }),
        case("valid frame store", Succeed, |c| {
            store_case(c, "", "");
            run_args()
        }),
        case("valid frame store with streamed top-k targets", Succeed, |c| {
            store_case(c, ", targets = \"t.kdt\"", &streamed_student(3));
            store_targets(c, 2, 3);
            run_args()
        }),
        case("store: a NaN mean in the manifest", Reject("mean[3] = NaN"), |c| {
            store_case(c, "", "");
            edit_manifest(c, "train", |t| t["mean"].as_array_mut().unwrap()[3] = toml::Value::Float(f64::NAN));
            run_args()
        }),
        case("store: an infinite mean in the manifest", Reject("mean[0] = inf"), |c| {
            store_case(c, "", "");
            edit_manifest(c, "validation", |t| {
                t["mean"].as_array_mut().unwrap()[0] = toml::Value::Float(f64::INFINITY)
            });
            run_args()
        }),
        case("store: a zero deviation in the manifest", Reject("std[1] = 0"), |c| {
            store_case(c, "", "");
            edit_manifest(c, "train", |t| t["std"].as_array_mut().unwrap()[1] = toml::Value::Float(0.0));
            run_args()
        }),
        case("store: a negative deviation in the manifest", Reject("std[2] = -1"), |c| {
            store_case(c, "", "");
            edit_manifest(c, "test", |t| t["std"].as_array_mut().unwrap()[2] = toml::Value::Float(-1.0));
            run_args()
        }),
        case("store: a shard listed twice", Reject("listed twice"), |c| {
            store_case(c, "", "");
            edit_manifest(c, "train", |t| {
                let shards = t["shards"].as_array_mut().unwrap();
                shards[1] = shards[0].clone();
            });
            run_args()
        }),
        case("store: no shards", Reject("lists no shards"), |c| {
            store_case(c, "", "");
            edit_manifest(c, "train", |t| drop(t.insert("shards".into(), toml::Value::Array(vec![]))));
            run_args()
        }),
        case("store: a manifest edited after it was written", Reject("changed after it was written"), |c| {
            store_case(c, "", "");
            edit_manifest(c, "train", |t| drop(t.insert("classes".into(), toml::Value::Integer(29))));
            run_args()
        }),
        case("store: a split of another store", Reject("different `kd-run store write`s"), |c| {
            store_case(c, "", "");
            speech_stores_at(&c.dir, "s2", "2000", &["data.speech.seed=2"]);
            std::fs::remove_dir_all(c.path("s/validation")).unwrap();
            std::fs::rename(c.path("s2/validation"), c.path("s/validation")).unwrap();
            run_args()
        }),
        case("store check: a flipped byte in the speaker section", Reject("speakers section does not match"), |c| {
            store_case(c, "", "");
            c.edit("s/train/shard-00000.kdf", |b| {
                let speakers_at = u64::from_le_bytes(b[64..72].try_into().unwrap()) as usize;
                b[speakers_at] ^= 1;
            });
            ["store", "check", "s"].map(String::from).to_vec()
        }),
        case("store check: splits of different writes", Reject("different `kd-run store write`s"), |c| {
            store_case(c, "", "");
            speech_stores_at(&c.dir, "s2", "2000", &[]);
            std::fs::remove_dir_all(c.path("s/test")).unwrap();
            std::fs::rename(c.path("s2/test"), c.path("s/test")).unwrap();
            ["store", "check", "s"].map(String::from).to_vec()
        }),
        case("store write: into a folder that holds a store", Reject("pass --replace"), |c| {
            speech_stores_at(&c.dir, "out/s", "2000", &[]);
            ["store", "write", "speech.toml", "--out", "out/s"].map(String::from).to_vec()
        }),
        case("store write: a split folder that is a link out of --out", Reject("symbolic link"), |c| {
            c.write("speech.toml", SPEECH.as_bytes());
            plant_link(c, "out/s/train");
            ["store", "write", "speech.toml", "--out", "out/s"].map(String::from).to_vec()
        }),
        case("store write: --out is a link out of the working folder", Reject("symbolic link"), |c| {
            c.write("speech.toml", SPEECH.as_bytes());
            plant_link(c, "out/s");
            ["store", "write", "speech.toml", "--out", "out/s"].map(String::from).to_vec()
        }),
        case("store targets: a temperature run refuses", Reject("expected a temperature in [0.01"), |c| {
            store_case(c, "", "");
            let args = ["store", "targets", "s/train", "--teacher", "in/ck.safetensors", "--temperature", "1e-9"];
            args.map(String::from).to_vec()
        }),
        case("store targets: the teacher's context is not the run's", Reject("teacher of context [1, 1]"), |c| {
            store_case(c, ", targets = \"t.kdt\"", &streamed_student(3));
            store_targets(c, 1, 3);
            run_args()
        }),
        case("store targets: teacher_top_k is not the file's k", Reject("teacher_top_k = 5"), |c| {
            store_case(c, ", targets = \"t.kdt\"", &streamed_student(5));
            store_targets(c, 2, 3);
            run_args()
        }),
        case("store targets: a file of another store", Reject("was computed for another frame store"), |c| {
            store_case(c, ", targets = \"t.kdt\"", &streamed_student(3));
            store_targets(c, 2, 3);
            let t = c.read("s/train/t.kdt");
            std::fs::remove_dir_all(c.path("s")).unwrap();
            speech_stores_at(&c.dir, "s", "2000", &[]);
            c.write("s/train/t.kdt", &t);
            run_args()
        }),
        case("valid kaldi frames", Succeed, |c| {
            c.experiment(&files_experiment("in/feats.scp", "in/ali.ark", ""));
            run_args()
        }),
        // IDX.
        case("idx: a directory instead of the images", Reject("is a directory"), |c| {
            std::fs::remove_file(c.path("in/mnist/train-images-idx3-ubyte")).unwrap();
            std::fs::create_dir(c.path("in/mnist/train-images-idx3-ubyte")).unwrap();
            c.experiment(IMAGES);
            run_args()
        }),
        case("idx: a dangling symbolic link", Reject("which does not exist"), |c| {
            std::fs::remove_file(c.path("in/mnist/t10k-labels-idx1-ubyte")).unwrap();
            std::os::unix::fs::symlink("nowhere", c.path("in/mnist/t10k-labels-idx1-ubyte")).unwrap();
            c.experiment(IMAGES);
            run_args()
        }),
        case("idx: an empty file", Reject("is empty"), |c| {
            c.write("in/mnist/train-labels-idx1-ubyte", b"");
            c.experiment(IMAGES);
            run_args()
        }),
        case("idx: missing folder", Reject("make setup"), |c| {
            c.experiment(&IMAGES.replace("in/mnist", "in/elsewhere"));
            run_args()
        }),
        case("idx: truncated images", Reject("truncated data"), |c| {
            c.edit("in/mnist/train-images-idx3-ubyte", |b| b.truncate(b.len() - 5));
            c.experiment(IMAGES);
            run_args()
        }),
        case("idx: gzip-compressed", Reject("gzip"), |c| {
            c.edit("in/mnist/t10k-images-idx3-ubyte", |b| b[..2].copy_from_slice(&[0x1f, 0x8b]));
            c.experiment(IMAGES);
            run_args()
        }),
        case("idx: dimensions of 2^32 - 1", Reject("idx3-ubyte"), |c| {
            c.edit("in/mnist/train-images-idx3-ubyte", |b| b[4..16].copy_from_slice(&[0xff; 12]));
            c.experiment(IMAGES);
            run_args()
        }),
        case("idx: a label out of range", Reject("out of range"), |c| {
            c.edit("in/mnist/t10k-labels-idx1-ubyte", |b| b[8] = 200);
            c.experiment(IMAGES);
            run_args()
        }),
        case("idx: more labels than images", Reject("count mismatch"), |c| {
            c.write("in/mnist/t10k-labels-idx1-ubyte", &idx(&[41], &[1; 41]));
            c.experiment(IMAGES);
            run_args()
        }),
        case("idx: test images of 2 x 8, training 4 x 4", Reject("test"), |c| {
            let pixels = c.read("in/mnist/t10k-images-idx3-ubyte")[16..].to_vec();
            c.write("in/mnist/t10k-images-idx3-ubyte", &idx(&[40, 2, 8], &pixels));
            c.experiment(IMAGES);
            run_args()
        }),
        case("idx: test images of 3 x 3, training 4 x 4", Reject("test"), |c| {
            c.write("in/mnist/t10k-images-idx3-ubyte", &idx(&[40, 3, 3], &[9; 360]));
            c.experiment(IMAGES);
            run_args()
        }),
        // NumPy.
        case("npy: truncated features", Reject("truncated data"), |c| {
            c.edit("in/f.npy", |b| b.truncate(b.len() - 1));
            c.experiment(&files_experiment("in/f.npy", "in/l.npy", ""));
            run_args()
        }),
        case("npy: a shape of 2^62 rows", Reject("f.npy"), |c| {
            c.write("in/f.npy", &npy("<f4", &[1 << 62, 3], &[0; 12]));
            c.experiment(&files_experiment("in/f.npy", "in/l.npy", ""));
            run_args()
        }),
        case("npy: an empty file", Reject("is empty"), |c| {
            c.write("in/l.npy", b"");
            c.experiment(&files_experiment("in/f.npy", "in/l.npy", ""));
            run_args()
        }),
        case("npy: a negative label", Reject("not a class id"), |c| {
            let labels: Vec<u8> = (0..60i64).flat_map(|i| (if i == 7 { -3 } else { i % 4 }).to_le_bytes()).collect();
            c.write("in/l.npy", &npy("<i8", &[60], &labels));
            c.experiment(&files_experiment("in/f.npy", "in/l.npy", ""));
            run_args()
        }),
        case("npy: big-endian features", Reject("big-endian"), |c| {
            c.write("in/f.npy", &npy(">f4", &[60, 3], &[0; 720]));
            c.experiment(&files_experiment("in/f.npy", "in/l.npy", ""));
            run_args()
        }),
        case("npy: lengths that do not add up", Reject("add up to"), |c| {
            c.write("in/n.npy", &npy("<i8", &[2], &[20i64, 20].map(i64::to_le_bytes).concat()));
            c.experiment(&files_experiment("in/f.npy", "in/l.npy", ", lengths = \"in/n.npy\""));
            run_args()
        }),
        case("npy: lengths whose sum overflows", Reject("lengths"), |c| {
            let lengths = [i64::MAX, i64::MAX, 62].map(i64::to_le_bytes).concat();
            c.write("in/n.npy", &npy("<i8", &[3], &lengths));
            c.experiment(&files_experiment("in/f.npy", "in/l.npy", ", lengths = \"in/n.npy\""));
            run_args()
        }),
        case("npy: a NaN feature", Reject("f.npy"), |c| {
            c.edit("in/f.npy", |b| {
                let at = b.len() - 8;
                b[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
            });
            c.experiment(&files_experiment("in/f.npy", "in/l.npy", ""));
            run_args()
        }),
        case("npy: a label of 2e8", Reject("l.npy"), |c| {
            let labels: Vec<u8> =
                (0..60i64).flat_map(|i| (if i == 7 { 200_000_000 } else { i % 4 }).to_le_bytes()).collect();
            c.write("in/l.npy", &npy("<i8", &[60], &labels));
            c.experiment(&files_experiment("in/f.npy", "in/l.npy", "").replace("hidden = [8]", "hidden = [4096]"));
            run_args()
        }),
        // Kaldi.
        case("kaldi: an empty first utterance", Reject("has no frames"), |c| {
            c.edit("in/feats_f32.ark", |b| prepend(b, b"empty \0BFM \x04\0\0\0\0\x04\0\0\0\0"));
            c.edit("in/ali.ark", |b| prepend(b, b"empty \0B\x04\0\0\0\0"));
            c.experiment(&files_experiment("in/feats_f32.ark", "in/ali.ark", ""));
            run_args()
        }),
        case("kaldi: truncated archive", Reject("truncated"), |c| {
            c.edit("in/feats_f32.ark", |b| b.truncate(b.len() - 100));
            c.experiment(&files_experiment("in/feats_f32.ark", "in/ali.ark", ""));
            run_args()
        }),
        case("kaldi: a compressed matrix of 2^31 - 1 rows", Reject("truncated data"), |c| {
            c.edit("in/feats_cm.ark", |b| {
                let at = "spk1-utt1 \0BCM ".len() + 8;
                b[at..at + 4].copy_from_slice(&i32::MAX.to_le_bytes());
            });
            c.experiment(&files_experiment("in/feats_cm.ark", "in/ali.ark", ""));
            run_args()
        }),
        case("kaldi: an scp naming a missing archive", Reject("not found"), |c| {
            c.write("in/feats.scp", b"spk1-utt1 in/gone.ark:10\n");
            c.experiment(&files_experiment("in/feats.scp", "in/ali.ark", ""));
            run_args()
        }),
        case("kaldi: an scp offset past the end", Reject("past the end"), |c| {
            c.write("in/feats.scp", b"spk1-utt1 in/feats_f32.ark:99999999\n");
            c.experiment(&files_experiment("in/feats.scp", "in/ali.ark", ""));
            run_args()
        }),
        case("kaldi: an scp naming a directory", Reject("is a directory"), |c| {
            c.write("in/feats.scp", b"spk1-utt1 in:10\n");
            c.experiment(&files_experiment("in/feats.scp", "in/ali.ark", ""));
            run_args()
        }),
        case("kaldi: alignments shorter than the features", Reject("frames but the alignment"), |c| {
            c.write("in/ali.ark", b"spk1-utt1 1 2\nspk1-utt2 1 2 3\nspk2-utt1 1 2 3 4 5 6 7 8 9 10 11\n");
            c.experiment(&files_experiment("in/feats_f32.ark", "in/ali.ark", ""));
            run_args()
        }),
        case("kaldi: a pdf id of 2e8", Reject("ali.ark"), |c| {
            c.write(
                "in/ali.ark",
                b"spk1-utt1 1 2 3 4 5 6 200000000\nspk1-utt2 1 2 3\nspk2-utt1 1 2 3 4 5 6 7 8 9 10 11\n",
            );
            c.experiment(
                &files_experiment("in/feats_f32.ark", "in/ali.ark", "").replace("hidden = [8]", "hidden = [4096]"),
            );
            run_args()
        }),
        // Checkpoints read by evaluate and distill stages.
        case("checkpoint: truncated", Reject("ck.safetensors"), |c| {
            c.edit("in/ck.safetensors", |b| b.truncate(b.len() - 7));
            c.experiment(&with_checkpoint_stages());
            run_args()
        }),
        case("checkpoint: random bytes", Reject("ck.safetensors"), |c| {
            let noise: Vec<u8> = (0..4000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
            c.write("in/ck.safetensors", &noise);
            c.experiment(&with_checkpoint_stages());
            run_args()
        }),
        case("checkpoint: an empty file", Reject("is empty"), |c| {
            c.write("in/ck.safetensors", b"");
            c.experiment(&with_checkpoint_stages());
            run_args()
        }),
        case("checkpoint: a directory", Reject("is a directory"), |c| {
            std::fs::remove_file(c.path("in/ck.safetensors")).unwrap();
            std::fs::create_dir(c.path("in/ck.safetensors")).unwrap();
            c.experiment(&with_checkpoint_stages());
            run_args()
        }),
        case("checkpoint: a header length of 2^64 - 1", Reject("header"), |c| {
            c.edit("in/ck.safetensors", |b| b[..8].copy_from_slice(&[0xff; 8]));
            c.experiment(&with_checkpoint_stages());
            run_args()
        }),
        case("checkpoint: stored layer sizes of 2^40", Reject("ck.safetensors"), |c| {
            let mut named = tch::Tensor::read_safetensors(c.path("in/ck.safetensors")).unwrap();
            for (k, t) in named.iter_mut() {
                if k == "__config__.sizes" {
                    *t = tch::Tensor::from_slice(&[16i64, 1 << 40, 10]);
                }
            }
            tch::Tensor::write_safetensors(&named, c.path("in/ck.safetensors")).unwrap();
            c.experiment(&with_checkpoint_stages());
            run_args()
        }),
        case("checkpoint: a network for other data", Reject("network"), |c| {
            let vs = tch::nn::VarStore::new(tch::Device::Cpu);
            let net = kd_models::Mlp::new(&vs.root(), kd_models::MlpConfig::plain([784, 8, 10])).unwrap();
            tch::Tensor::write_safetensors(&net.to_tensors(&vs), c.path("in/ck.safetensors")).unwrap();
            c.experiment(&with_checkpoint_stages());
            run_args()
        }),
        // A resume checkpoint that is not the stage's: of another network, or with a damaged
        // progress record. The stage must not start from it.
        case("resume checkpoint: a network of another shape", Reject("resume checkpoint"), |c| {
            plant_resume(c, &[16, 4, 10], &[1, 2]);
            c.experiment(&IMAGES.replace("epochs = 1", "epochs = 3"));
            run_args()
        }),
        case("resume checkpoint: a best-epoch record of 1 value", Reject("should hold 2 numbers"), |c| {
            plant_resume(c, &[16, 8, 10], &[7]);
            c.experiment(&IMAGES.replace("epochs = 1", "epochs = 3"));
            run_args()
        }),
        case("checkpoint: a NaN weight", Reject("ck.safetensors"), |c| {
            let mut named = tch::Tensor::read_safetensors(c.path("in/ck.safetensors")).unwrap();
            for (k, t) in named.iter_mut() {
                if k == "output.bias" {
                    *t = tch::Tensor::from_slice(&[f32::NAN; 10]);
                }
            }
            tch::Tensor::write_safetensors(&named, c.path("in/ck.safetensors")).unwrap();
            c.experiment(&with_checkpoint_stages());
            run_args()
        }),
        // Checkpoints with provenance records that cannot be read, renamed checkpoints, and
        // SHA-256 values pinned in the experiment.
        case("provenance: the record is a directory", Reject("is a directory"), |c| {
            std::fs::create_dir(c.path("in/ck.provenance.toml")).unwrap();
            c.experiment(&with_checkpoint_stages());
            run_args()
        }),
        case("provenance: the record is a dangling link", Reject("symbolic link to nothing"), |c| {
            std::os::unix::fs::symlink(c.path("in/gone.toml"), c.path("in/ck.provenance.toml")).unwrap();
            c.experiment(&with_checkpoint_stages());
            run_args()
        }),
        case("provenance: the record does not match", Reject("does not match"), |c| {
            write_record(c);
            replace_checkpoint(c, "in/ck.safetensors");
            c.experiment(&with_checkpoint_stages());
            run_args()
        }),
        case("provenance: a renamed checkpoint, replaced", Reject("ck.provenance.toml"), |c| {
            write_record(c);
            std::fs::remove_file(c.path("in/ck.safetensors")).unwrap();
            replace_checkpoint(c, "in/renamed.safetensors");
            c.experiment(&evaluating("in/renamed.safetensors", ""));
            run_args()
        }),
        case("provenance: a renamed checkpoint, intact", Succeed, |c| {
            write_record(c);
            std::fs::rename(c.path("in/ck.safetensors"), c.path("in/renamed.safetensors")).unwrap();
            c.experiment(&evaluating("in/renamed.safetensors", ""));
            run_args()
        }),
        case("sha256: a pinned hash that does not match", Reject("is not the file the experiment pins"), |c| {
            let pin = sha256_of(c, "in/ck.safetensors");
            replace_checkpoint(c, "in/ck.safetensors");
            c.experiment(&evaluating("in/ck.safetensors", &format!("sha256 = \"{pin}\"")));
            run_args()
        }),
        case("sha256: a pinned hash that matches", Succeed, |c| {
            let pin = sha256_of(c, "in/ck.safetensors").to_ascii_uppercase();
            c.experiment(&evaluating("in/ck.safetensors", &format!("sha256 = \"{pin}\"")));
            run_args()
        }),
        case("sha256: 63 hexadecimal digits", Reject("64 hexadecimal digits"), |c| {
            c.experiment(&evaluating("in/ck.safetensors", &format!("sha256 = \"{}\"", "a".repeat(63))));
            run_args()
        }),
        case("sha256: on a stage that reads an earlier stage", Reject("pins the file of `checkpoint`"), |c| {
            let text = format!(
                "{IMAGES}\n[[stages]]\nname = \"eval\"\nkind = \"evaluate\"\nfrom = \"net\"\nsha256 = \"{}\"\n",
                "0".repeat(64)
            );
            c.experiment(&text);
            run_args()
        }),
        // Reports: runs that are not seeds of one configuration, a configuration edited after
        // its run, an --out in a run directory, a rerun into the same --out, extreme values.
        case("report: two configurations of one name are not averaged", Report("not averaged"), |c| {
            let one = make_run(c, "adv_s1", &[]);
            let two = make_run(c, "adv_s2", &["seed=2", "defaults.epochs=2"]);
            report_args("out/report.md", &[&one, &two])
        }),
        case("report: the same run given twice", Reject("same run directory"), |c| {
            let one = make_run(c, "adv_s1", &[]);
            report_args("out/report.md", &[&one, &format!("./{one}")])
        }),
        case("report: a copied run given as a second seed", Reject("same configuration and seed"), |c| {
            let one = make_run(c, "adv_s1", &[]);
            std::fs::create_dir_all(c.path("copy")).unwrap();
            std::fs::rename(c.path(&one), c.path("copy/adv_s1")).unwrap();
            let two = make_run(c, "adv_s1", &[]);
            report_args("out/report.md", &[&two, "copy/adv_s1"])
        }),
        case("report: a config.toml edited after the run", Reject("not the configuration the run used"), |c| {
            let one = make_run(c, "adv_s1", &[]);
            c.edit(&format!("{one}/config.toml"), |b| {
                *b = String::from_utf8_lossy(b).replace("lr = 0.1", "lr = 0.5").into()
            });
            report_args("out/report.md", &[&one])
        }),
        case("report: --out the run's own summary.csv", Reject("inside the run directory"), |c| {
            let one = make_run(c, "adv_s1", &[]);
            report_args(&format!("{one}/summary.csv"), &[&one])
        }),
        case("report: again into the same --out, named without an extension", Report("adv_s1"), |c| {
            let one = make_run(c, "adv_s1", &[]);
            let args = report_args("out/report", &[&one]);
            let _ = Command::new(env!("CARGO_BIN_EXE_kd-run")).args(&args).current_dir(&c.dir).output();
            args
        }),
        case("report: metrics and summaries of 1e306, -1e306, inf, NaN, negative", Report("not drawn"), |c| {
            let one = make_run(c, "adv_s1", &["defaults.epochs=4"]);
            let metrics = format!("{one}/metrics.csv");
            set_column(c, &metrics, "val_accuracy", &["1e306", "-1e306", "NaN", "0.5"]);
            set_column(c, &metrics, "train_loss", &["inf", "-inf", "-5", "1e308"]);
            let summary = format!("{one}/summary.csv");
            set_column(c, &summary, "test_accuracy", &["1e308"]);
            set_column(c, &summary, "seconds", &["NaN"]);
            set_column(c, &summary, "val_errors", &["-9223372036854775808"]);
            report_args("out/report.md", &[&one])
        }),
        // Experiment files: TOML bombs and absurd settings.
        case("toml: 100,000 nested arrays", Reject("TOML parse error"), |c| {
            c.experiment(&format!("{IMAGES}x = {}{}\n", "[".repeat(100_000), "]".repeat(100_000)));
            run_args()
        }),
        case("toml: 100,000 nested inline tables", Reject("TOML parse error"), |c| {
            c.experiment(&format!("{IMAGES}x = {}{}\n", "{ a = ".repeat(100_000), "}".repeat(100_000)));
            run_args()
        }),
        case("toml: a dotted key 50,000 deep", Reject(""), |c| {
            c.experiment(&format!("{IMAGES}{} = 1\n", vec!["a"; 50_000].join(".")));
            run_args()
        }),
        case("toml: a 1 MB unterminated string", Reject("TOML parse error"), |c| {
            c.experiment(&format!("{IMAGES}x = \"{}\n", "A".repeat(1 << 20)));
            run_args()
        }),
        case("toml: a 1 MB stage kind", Reject("kind"), |c| {
            c.experiment(&IMAGES.replace("kind = \"train\"", &format!("kind = \"{}\"", "B".repeat(1 << 20))));
            run_args()
        }),
        case("toml: not UTF-8", Reject("exp.toml"), |c| {
            c.write("exp.toml", &[IMAGES.as_bytes(), b"\xff\xfe\n"].concat());
            run_args()
        }),
        case("toml: an empty file", Reject("exp.toml"), |c| {
            c.write("exp.toml", b"");
            run_args()
        }),
        case("toml: the experiment is a directory", Reject("exp.toml"), |c| {
            std::fs::create_dir(c.path("exp.toml")).unwrap();
            run_args()
        }),
        case("toml: epochs = 0", Reject("epochs"), |c| {
            c.experiment(&IMAGES.replace("epochs = 1", "epochs = 0"));
            run_args()
        }),
        case("toml: epochs = 2^63", Reject("epochs"), |c| {
            c.experiment(&IMAGES.replace("epochs = 1", "epochs = 9223372036854775808"));
            run_args()
        }),
        case("toml: a negative learning rate", Reject("lr"), |c| {
            c.experiment(&IMAGES.replace("lr = 0.1", "lr = -0.1"));
            run_args()
        }),
        case("toml: a NaN temperature", Reject("temperature"), |c| {
            c.experiment(&with_checkpoint_stages().replace("temperature = 4", "temperature = nan"));
            run_args()
        }),
        case("toml: validation leaves no training examples", Reject("validation"), |c| {
            c.experiment(&IMAGES.replace("validation = 20", "validation = 120"));
            run_args()
        }),
        case("toml: an unknown stage kind", Reject("kind"), |c| {
            c.experiment(&IMAGES.replace("kind = \"train\"", "kind = \"trian\""));
            run_args()
        }),
        case("toml: --set of a key that is no table", Reject("--set"), |c| {
            c.experiment(IMAGES);
            let mut args = run_args();
            args.extend(["--set".into(), "seed.x=1".into()]);
            args
        }),
        case("toml: a hidden layer of 1e12 units", Reject("hidden"), |c| {
            c.experiment(&IMAGES.replace("hidden = [8]", "hidden = [1000000000000]"));
            run_args()
        }),
        case("toml: a learning rate of 1e6", Reject("net"), |c| {
            c.experiment(&IMAGES.replace("lr = 0.1", "lr = 1e6"));
            run_args()
        }),
        case("toml: T = 1e30", Reject("temperature"), |c| {
            c.experiment(&with_checkpoint_stages().replace("temperature = 4", "temperature = 1e30"));
            run_args()
        }),
        case("toml: a sweep of 27 million stages", Reject("stages"), |c| {
            let list = (1..=300).map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
            let widths = (1..=300).map(|i| format!("[{i}]")).collect::<Vec<_>>().join(", ");
            let temps = (1..=300).map(|i| format!("{i}.5")).collect::<Vec<_>>().join(", ");
            c.experiment(&with_checkpoint_stages().replace(
                "temperature = 4\n",
                &format!("sweep = {{ seed = [{list}], hidden = [{widths}], temperature = [{temps}] }}\n"),
            ));
            vec!["validate".into(), "exp.toml".into()]
        }),
        case("toml: --set with a newline and more TOML", Reject("--set"), |c| {
            c.experiment(IMAGES);
            let mut args = run_args();
            args.extend(["--set".into(), "seed=2\n[data]\nvalidation = 0".into()]);
            args
        }),
        case("toml: a train stage named like a derived row", Reject("fixed"), |c| {
            c.experiment(&format!(
                "{IMAGES}\n[[stages]]\nname = \"shift\"\nkind = \"bias_shift\"\nfrom = \"net\"\nclasses = [3]\n\
                 shifts = {{ min = 0.0, max = 1.0, step = 0.5 }}\nfixed_shift = 0.5\n\n\
                 [[stages]]\nname = \"shift-fixed\"\nkind = \"train\"\nmodel = {{ hidden = [4] }}\n"
            ));
            run_args()
        }),
        // Odd names.
        case("name: ../escape", Reject("name"), |c| {
            c.experiment(&IMAGES.replace("name = \"adv\"", "name = \"../escape\""));
            run_args()
        }),
        case("name: an absolute path", Reject("name"), |c| {
            let abs = c.path("abs");
            c.experiment(&IMAGES.replace("name = \"adv\"", &format!("name = \"{}\"", abs.display())));
            run_args()
        }),
        case("name: --set name=../x", Reject("name"), |c| {
            c.experiment(IMAGES);
            let mut args = run_args();
            args.extend(["--set".into(), "name=../x".into()]);
            args
        }),
        case("name: empty", Reject("name"), |c| {
            c.experiment(&IMAGES.replace("name = \"adv\"", "name = \"\""));
            run_args()
        }),
        case("name: a newline and a NUL", Reject("name"), |c| {
            c.experiment(&IMAGES.replace("name = \"adv\"", "name = \"a\\nb\\u0000c\""));
            run_args()
        }),
        // Links planted in the run directory: kd-run follows none of them out of --out.
        case("link: the run's checkpoints/ points out of --out", Reject("symbolic link"), |c| {
            c.experiment(IMAGES);
            plant_link(c, "out/adv/checkpoints");
            run_args()
        }),
        case("link: the run directory itself points out of --out", Reject("symbolic link"), |c| {
            c.experiment(IMAGES);
            plant_link(c, "out/adv");
            run_args()
        }),
        case("link: the teacher-logit cache points out of --out", Reject("symbolic link"), |c| {
            c.experiment(IMAGES);
            plant_link(c, "out/.cache");
            run_args()
        }),
        case("link: run.log points out of --out", Reject("symbolic link"), |c| {
            c.experiment(IMAGES);
            std::fs::create_dir_all(c.path("out/adv")).unwrap();
            c.write("victim.log", b"mine");
            std::os::unix::fs::symlink(c.path("victim.log"), c.path("out/adv/run.log")).unwrap();
            run_args()
        }),
        case("stage name: ../x", Reject("name"), |c| {
            c.experiment(&IMAGES.replace("name = \"net\"", "name = \"../x\""));
            run_args()
        }),
    ]
}

// ---------------------------------------------------------------------------------------------
// The runner.

/// Every file and folder under `dir` (relative paths), except under `out/`.
/// `out/adv/checkpoints/net.resume.safetensors`: a `sizes` network after epoch 1, with `best`
/// as its best-epoch record, and no optimizer state.
fn plant_resume(c: &Ctx, sizes: &[i64], best: &[i64]) {
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let net = kd_models::Mlp::new(&vs.root(), kd_models::MlpConfig::plain(sizes.to_vec())).unwrap();
    let mut named = net.to_tensors(&vs);
    named.push(("__progress__.epoch".into(), tch::Tensor::from(1i64)));
    named.push(("__progress__.best".into(), tch::Tensor::from_slice(best)));
    std::fs::create_dir_all(c.path("out/adv/checkpoints")).unwrap();
    tch::Tensor::write_safetensors(&named, c.path("out/adv/checkpoints/net.resume.safetensors")).unwrap();
}

/// A link at `at` (inside the case's `out/`) to a folder `victim/` outside it.
fn plant_link(c: &Ctx, at: &str) {
    std::fs::create_dir_all(c.path("victim")).unwrap();
    let link = c.path(at);
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(c.path("victim"), link).unwrap();
}

fn listing(dir: &Path) -> BTreeSet<PathBuf> {
    let mut found = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(dir).unwrap().to_path_buf();
            if rel == Path::new("out") {
                continue;
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            }
            found.insert(rel);
        }
    }
    found
}

/// The names in `dir`, not recursing.
fn names(dir: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| PathBuf::from(e.file_name())).collect()
}

/// How a case ended.
enum Outcome {
    /// As expected.
    Pass,
    /// Anything else, in words.
    Fail(String),
}

const LIMIT: Duration = Duration::from_secs(10);

fn run_case(case: &Case, root: &Path, i: usize) -> (Outcome, f64) {
    let dir = root.join(format!("case{i:02}"));
    std::fs::create_dir_all(&dir).expect("case dir");
    let ctx = Ctx { dir: dir.clone() };
    write_inputs(&ctx);
    let args = (case.setup)(&ctx);
    let before = listing(&dir);
    let beside = names(root);
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kd-run"))
        .args(&args)
        .current_dir(&dir)
        .env("RUST_LOG", "warn")
        .env_remove("RUST_BACKTRACE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kd-run starts");
    // Read stderr on a thread so that a chatty child cannot block on a full pipe.
    let mut pipe = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = std::io::Read::read_to_end(&mut pipe, &mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let seconds = start.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&reader.join().unwrap_or_default()).into_owned();
    let mut stray: Vec<String> = listing(&dir).difference(&before).map(|p| p.display().to_string()).collect();
    // Beside the case folders (which other cases create meanwhile).
    let beside = names(root).into_iter().filter(|p| !beside.contains(p) && !p.to_string_lossy().starts_with("case"));
    stray.extend(beside.map(|p| format!("../{}", p.display())));
    let outcome = judge(case, status, &stderr, &dir, &stray);
    (outcome, seconds)
}

fn judge(case: &Case, status: Option<std::process::ExitStatus>, stderr: &str, dir: &Path, stray: &[String]) -> Outcome {
    let Some(status) = status else {
        return Outcome::Fail(format!("still running after {} s (killed)", LIMIT.as_secs()));
    };
    if !stray.is_empty() {
        return Outcome::Fail(format!("wrote outside --out: {}", stray.join(", ")));
    }
    for bad in ["panicked", "RUST_BACKTRACE", "stack backtrace"] {
        if stderr.contains(bad) {
            let line = stderr.lines().find(|l| l.contains(bad)).unwrap_or_default();
            return Outcome::Fail(format!("panic: {}", &line[..line.len().min(200)]));
        }
    }
    if status.code().is_none() {
        return Outcome::Fail(format!("killed by a signal: {status}"));
    }
    match case.expect {
        Succeed => {
            let summary = std::fs::read_dir(dir.join("out"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| e.path().join("summary.csv").is_file());
            if status.success() && summary {
                Outcome::Pass
            } else {
                Outcome::Fail(format!("expected success: {status}, summary.csv {summary}: {}", tail(stderr)))
            }
        }
        Report(want) => {
            let md = ["out/report.md", "out/report"]
                .iter()
                .find_map(|f| std::fs::read_to_string(dir.join(f)).ok())
                .unwrap_or_default();
            if status.success() && md.contains(want) {
                Outcome::Pass
            } else {
                Outcome::Fail(format!("expected a report with {want:?}: {status}: {}", tail(stderr)))
            }
        }
        Reject(want) => {
            if status.success() {
                return Outcome::Fail("exit 0: accepted silently".into());
            }
            let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error: ")).collect();
            let Some(at) = stderr.find("error: ") else {
                return Outcome::Fail(format!("no `error:` line: {}", tail(stderr)));
            };
            let error = &stderr[at..];
            if errors.len() != 1 || error.lines().count() > 8 || error.len() > 2000 {
                return Outcome::Fail(format!(
                    "not a short error: {} `error:` lines, {} lines, {} bytes: {}",
                    errors.len(),
                    error.lines().count(),
                    error.len(),
                    tail(error)
                ));
            }
            if !error.contains(want) {
                return Outcome::Fail(format!("error does not mention {want:?}: {}", tail(error)));
            }
            Outcome::Pass
        }
    }
}

/// The first 300 characters of `s`.
fn tail(s: &str) -> String {
    s.chars().take(300).collect::<String>().replace('\n', " | ")
}

#[test]
fn adversarial_inputs_end_in_clean_errors_or_correct_results() {
    let root = std::env::temp_dir().join(format!("kd-run-adversarial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let only = std::env::var("KD_ADVERSARIAL_ONLY").unwrap_or_default();
    let cases: Vec<Case> = cases().into_iter().filter(|c| c.name.contains(only.as_str())).collect();
    // Two cases at a time: most of a case is kd-run starting up.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(case) = cases.get(i) else { break };
                let result = run_case(case, &root, i);
                results.lock().unwrap().push((i, result));
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|r| r.0);
    let (mut clean, mut panics, mut silent, mut succeeded, mut failures) = (0, 0, 0, 0, Vec::new());
    for (i, (outcome, seconds)) in results {
        let case = &cases[i];
        match &outcome {
            Outcome::Pass => {
                match case.expect {
                    Reject(_) => clean += 1,
                    Succeed | Report(_) => succeeded += 1,
                }
                println!("ok    {seconds:5.1}s {}", case.name);
            }
            Outcome::Fail(why) => {
                if why.starts_with("panic") || why.starts_with("killed") {
                    panics += 1;
                } else if why.starts_with("exit 0") {
                    silent += 1;
                }
                println!("FAIL  {seconds:5.1}s {}: {why}", case.name);
                failures.push(format!("{}: {why}", case.name));
            }
        }
    }
    println!(
        "{} cases: {clean} rejected cleanly, {succeeded} correct results, {panics} panics, \
         {silent} silent successes, {} other failures",
        cases.len(),
        cases.len() - clean - succeeded - panics - silent
    );
    std::fs::remove_dir_all(&root).unwrap();
    assert!(failures.is_empty(), "{} cases failed:\n{}", failures.len(), failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Frame stores changed under a run.

/// A synthetic speech corpus written as stores in `dir/s` (small f32 shards).
const SPEECH: &str = r#"name = "adv"
seed = 1
device = "cpu"
threads = 1

[data]
kind = "speech"
context = [2, 2]
speech = { seed = 1, phones = 8, states = 30, speakers = 30, utterances_per_speaker = 10, mean_phones_per_utterance = 8, feature_dim = 8 }

[defaults]
epochs = 1
batch_size = 32
optimizer = { kind = "sgd", lr = 0.05, momentum = 0.9 }

[[stages]]
name = "net"
kind = "train"
model = { hidden = [16] }
"#;

/// Runs `kd-run args` in `dir` to the end; its status and stderr.
fn kd_run(dir: &Path, args: &[&str]) -> (std::process::ExitStatus, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kd-run"))
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("kd-run starts");
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// [`SPEECH`] in `dir/speech.toml`, written as the stores `dir/s/{train,validation,test}`.
fn speech_stores(dir: &Path, shard_frames: &str) {
    speech_stores_at(dir, "s", shard_frames, &[]);
}

/// [`SPEECH`] (with `--set` overrides `sets`) written as the stores `dir/out/{train,...}`.
fn speech_stores_at(dir: &Path, out: &str, shard_frames: &str, sets: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("speech.toml"), SPEECH).unwrap();
    let mut args = vec!["store", "write", "speech.toml", "--kind", "f32", "--shard-frames", shard_frames, "--out", out];
    sets.iter().for_each(|s| args.extend(["--set", s]));
    let (status, err) = kd_run(dir, &args);
    assert!(status.success(), "store write: {err}");
}

/// The stores `s/` of a case and `exp.toml` streaming them for an epoch (with `store_extra` in
/// `data.store` and `stages` after the train stage).
fn store_case(c: &Ctx, store_extra: &str, stages: &str) {
    speech_stores(&c.dir, "2000");
    let exp = store_experiment(1).replace("prefetch = 1", &format!("prefetch = 1{store_extra}"));
    c.experiment(&format!("{exp}{stages}"));
}

/// Edits the manifest `s/<split>/store.toml` as TOML.
fn edit_manifest(c: &Ctx, split: &str, f: impl FnOnce(&mut toml::Table)) {
    let name = format!("s/{split}/store.toml");
    let mut t: toml::Table = toml::from_str(&String::from_utf8(c.read(&name)).unwrap()).unwrap();
    f(&mut t);
    c.write(&name, toml::to_string(&t).unwrap().as_bytes());
}

/// A teacher checkpoint `in/teacher.safetensors` for [`SPEECH`]'s frames with `context` frames
/// each side, and its top-`k` targets at T = 2 as `s/train/t.kdt`.
fn store_targets(c: &Ctx, context: usize, k: usize) {
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let width = (2 * context + 1) as i64 * 8;
    let net = kd_models::Mlp::new(&vs.root(), kd_models::MlpConfig::plain([width, 8, 30])).expect("mlp");
    tch::Tensor::write_safetensors(&net.to_tensors(&vs), c.path("in/teacher.safetensors")).expect("checkpoint");
    let (context, k) = (context.to_string(), k.to_string());
    let args = ["store", "targets", "s/train", "--teacher", "in/teacher.safetensors", "--k", &k, "--temperature", "2"];
    let (status, err) = kd_run(&c.dir, &[&args[..], &["--context", &context, &context, "--name", "t.kdt"]].concat());
    assert!(status.success(), "store targets: {err}");
}

/// A distill stage streaming `s/train/t.kdt` with `teacher_top_k = k`.
fn streamed_student(k: usize) -> String {
    format!(
        "\n[[stages]]\nname = \"student\"\nkind = \"distill\"\nteacher_checkpoint = \"in/teacher.safetensors\"\n\
         teacher_top_k = {k}\nmodel = {{ hidden = [8] }}\ntemperature = 2\n"
    )
}

/// An experiment that streams `dir/s` for `epochs` epochs through a small shuffle buffer.
fn store_experiment(epochs: usize) -> String {
    SPEECH
        .replace(
            "kind = \"speech\"",
            "kind = \"store\"\nstore = { dir = \"s\", shuffle_buffer = 512, chunk_frames = 8, prefetch = 1 }",
        )
        .replace("speech = {", "# speech = {")
        .replace("epochs = 1", &format!("epochs = {epochs}"))
}

#[test]
fn a_store_changed_under_a_run_ends_in_a_clean_error_naming_the_shard_or_a_correct_finish() {
    let root = std::env::temp_dir().join(format!("kd-run-store-changed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    type Change = fn(&Path, &[u8]);
    let changes: [(&str, Change); 3] = [
        ("truncated", |p, good| {
            std::fs::OpenOptions::new().write(true).open(p).unwrap().set_len(good.len() as u64 / 3).unwrap()
        }),
        // What `cp` of the same file over it does: truncate, then write the same bytes.
        ("copied over with identical bytes", |p, good| std::fs::write(p, good).unwrap()),
        ("rewritten in place with other bytes", |p, good| {
            let mut other = good.to_vec();
            other[4096..].iter_mut().for_each(|b| *b = b.wrapping_add(1));
            std::fs::write(p, other).unwrap()
        }),
    ];
    for (i, (what, change)) in changes.iter().enumerate() {
        let dir = root.join(format!("case{i}"));
        speech_stores(&dir, "4000");
        std::fs::write(dir.join("exp.toml"), store_experiment(40)).unwrap();
        let shard = dir.join("s/train/shard-00001.kdf");
        let good = std::fs::read(&shard).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_kd-run"))
            .args(["run", "exp.toml", "--out", "out"])
            .current_dir(&dir)
            .env("RUST_LOG", "info")
            .env_remove("RUST_BACKTRACE")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kd-run starts");
        // Change the shard once the stage trains (its first epoch is logged).
        let log = dir.join("out/adv/run.log");
        let start = Instant::now();
        while !std::fs::read_to_string(&log).is_ok_and(|l| l.contains("epoch 1/")) {
            assert!(child.try_wait().unwrap().is_none(), "{what}: the run ended before training");
            assert!(start.elapsed() < Duration::from_secs(60), "{what}: no epoch logged");
            std::thread::sleep(Duration::from_millis(10));
        }
        change(&shard, &good);
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.code().is_some(), "{what}: killed by a signal ({}): {}", out.status, tail(&stderr));
        assert!(!stderr.contains("panicked"), "{what}: {}", tail(&stderr));
        if !out.status.success() {
            let error = stderr.lines().find(|l| l.starts_with("error: ")).unwrap_or_default();
            assert!(error.contains("shard-00001.kdf"), "{what}: the error does not name the shard: {}", tail(&stderr));
        } else {
            assert!(*what != "rewritten in place with other bytes", "{what}: other bytes read silently");
        }
        println!("{what}: {}", if out.status.success() { "finished" } else { "clean error" });
    }
    std::fs::remove_dir_all(&root).unwrap();
}
