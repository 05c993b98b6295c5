//! Data-parallel runs: ranks as processes of the kd-run binary, with torchrun's variables,
//! talking over Gloo on loopback. Two ranks train as one process does at the same global batch,
//! write one run directory, and a rank killed mid-training ends the other with an error naming
//! it. A kd-run built without Gloo refuses to run as one of several ranks.

use kd_native::launch::free_loopback_port;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tch::Tensor;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kd-dist-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// kd-run as rank `rank` of `world` (torchrun's variables) with a timeout of `timeout_s`.
fn rank(args: &[&str], rank: usize, world: usize, port: u16, timeout_s: u32) -> Child {
    rank_in(&root(), &[], args, (rank, world), port, timeout_s)
}

/// [`rank`] in the working directory `cwd`, with the variables `env` besides.
fn rank_in(
    cwd: &Path,
    env: &[(&str, &str)],
    args: &[&str],
    (rank, world): (usize, usize),
    port: u16,
    timeout_s: u32,
) -> Child {
    Command::new(env!("CARGO_BIN_EXE_kd-run"))
        .args(args)
        .current_dir(cwd)
        .envs(env.iter().copied())
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("GLOO_SOCKET_IFNAME", "lo")
        .env("KD_DIST_TIMEOUT_S", timeout_s.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kd-run starts")
}

/// Runs `args` as 2 ranks; their outputs, in rank order.
fn two_ranks(args: &[&str]) -> Vec<Output> {
    let port = free_loopback_port();
    let children: Vec<Child> = (0..2).map(|r| rank(args, r, 2, port, 20)).collect();
    children.into_iter().map(|c| c.wait_with_output().unwrap()).collect()
}

fn alone(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kd-run")).args(args).current_dir(root()).output().expect("kd-run starts")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Whether this kd-run was built without Gloo; if so, checks that it says so as a rank of 2.
fn built_without_gloo(outputs: &[Output]) -> bool {
    let missing = outputs.iter().all(|o| !o.status.success() && text(o).contains("built without data parallelism"));
    if missing {
        eprintln!("kd-run was built without Gloo: each rank refused to start, as it should");
    }
    missing
}

fn csv_rows(path: &Path) -> Vec<std::collections::HashMap<String, String>> {
    let mut r = csv::Reader::from_path(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    r.deserialize().map(|row| row.expect("well-formed row")).collect()
}

/// [`SMALL`] with its data folder absolute, for a file written outside the repository.
fn small() -> String {
    SMALL.replace("\"data/mnist\"", &format!("{:?}", root().join("data/mnist").to_str().unwrap()))
}

/// A network with dropout and jitter trained for 7 steps of 75 examples (shares of 37 and 38;
/// the last batch 50) with momentum and max-norm: the ranks draw the masks and shifts of the
/// whole batch from one stream, so they draw what one process does.
const SMALL: &str = r#"
name = "small"
seed = 5
device = "cpu"
threads = 1
[data]
dir = "data/mnist"
train_limit = 600
validation = 100
test_limit = 300
[[stages]]
name = "net"
kind = "train"
model = { hidden = [24], max_norm = 2.0, input_dropout = 0.2, hidden_dropout = 0.5 }
jitter = 1
epochs = 1
batch_size = 75
optimizer = { kind = "sgd", lr = 0.2, momentum = 0.9 }
"#;

#[test]
fn two_ranks_train_as_one_process_at_the_same_global_batch() {
    let dir = fresh_dir("equal");
    let file = dir.join("small.toml");
    std::fs::write(&file, small()).unwrap();
    let (one, two) = (dir.join("one"), dir.join("two"));
    let args = |out: &Path| ["run".to_string(), file.display().to_string(), "--out".into(), out.display().to_string()];
    let a = args(&one);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let single = alone(&a);
    assert!(single.status.success(), "{}", text(&single));
    let b = args(&two);
    let b: Vec<&str> = b.iter().map(String::as_str).collect();
    let ranks = two_ranks(&b);
    if built_without_gloo(&ranks) {
        return;
    }
    for (r, o) in ranks.iter().enumerate() {
        assert!(o.status.success(), "rank {r}:\n{}", text(o));
    }
    let load = |out: &Path| Tensor::read_safetensors(out.join("small/checkpoints/net.safetensors")).unwrap();
    let (w1, w2) = (load(&one), load(&two));
    assert_eq!(w1.len(), w2.len());
    for (name, t1) in &w1 {
        let t2 = &w2.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name} missing")).1;
        let diff = (t1 - t2).abs().max().double_value(&[]);
        assert!(diff <= 1e-5, "{name}: max |1 process - 2 ranks| = {diff}");
    }
    // The same losses and accuracies, reduced over the ranks.
    let (m1, m2) = (csv_rows(&one.join("small/metrics.csv")), csv_rows(&two.join("small/metrics.csv")));
    assert_eq!(m1.len(), m2.len());
    for key in ["train_loss", "train_accuracy", "val_accuracy", "test_errors"] {
        let (x, y): (f64, f64) = (m1[0][key].parse().unwrap(), m2[0][key].parse().unwrap());
        assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "{key}: {x} alone, {y} on 2 ranks");
    }
    // Rank 0 alone printed the summary.
    assert!(String::from_utf8_lossy(&ranks[0].stdout).contains("results in"));
    assert!(String::from_utf8_lossy(&ranks[1].stdout).is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// With the optimizer stepping inside the backward pass (`optimizer_in_backward`), a process
/// alone trains to the weights it trains to without, value for value; two ranks, which sum each
/// layer's gradients as the backward pass reaches it, to the same within float tolerance.
#[test]
fn the_optimizer_in_the_backward_pass_trains_to_the_same_weights() {
    let dir = fresh_dir("in_backward");
    let file = dir.join("small.toml");
    std::fs::write(&file, small()).unwrap();
    let args = |out: &Path, in_backward: bool| {
        let mut a = vec!["run".to_string(), file.display().to_string(), "--out".into(), out.display().to_string()];
        if in_backward {
            a.extend(["--set".to_string(), "optimizer_in_backward=true".to_string()]);
        }
        a
    };
    let (plain, layerwise, two) = (dir.join("plain"), dir.join("layerwise"), dir.join("two"));
    for (out, in_backward) in [(&plain, false), (&layerwise, true)] {
        let a = args(out, in_backward);
        let o = alone(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(o.status.success(), "{}", text(&o));
    }
    let load = |out: &Path| Tensor::read_safetensors(out.join("small/checkpoints/net.safetensors")).unwrap();
    let weights = |out: &Path| {
        let mut w = load(out);
        w.sort_by(|a, b| a.0.cmp(&b.0));
        w
    };
    let (a, b) = (weights(&plain), weights(&layerwise));
    assert_eq!(a.len(), b.len());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(x.equal(y), "{name}: max |whole step - step in backward| = {:?}", (x - y).abs().max());
    }
    let a2 = args(&two, true);
    let ranks = two_ranks(&a2.iter().map(String::as_str).collect::<Vec<_>>());
    if built_without_gloo(&ranks) {
        return;
    }
    for (r, o) in ranks.iter().enumerate() {
        assert!(o.status.success(), "rank {r}:\n{}", text(o));
    }
    for ((name, x), (_, y)) in a.iter().zip(&weights(&two)) {
        let diff = (x - y).abs().max().double_value(&[]);
        assert!(diff <= 1e-5, "{name}: max |1 process - 2 ranks, step in backward| = {diff}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_smoke_experiment_on_two_ranks_writes_one_run_directory_with_the_same_test_errors() {
    let dir = fresh_dir("smoke");
    let (one, two) = (dir.join("one"), dir.join("two"));
    let args = |out: &Path| {
        ["run", "experiments/smoke.toml", "--set", "threads=1", "--out"]
            .map(String::from)
            .into_iter()
            .chain([out.display().to_string()])
            .collect::<Vec<_>>()
    };
    let a = args(&one);
    let whole = two_ranks(&a.iter().map(String::as_str).collect::<Vec<_>>());
    if built_without_gloo(&whole) {
        return;
    }
    for (r, o) in whole.iter().enumerate() {
        assert!(o.status.success(), "rank {r}:\n{}", text(o));
    }
    let b = args(&two);
    let ranks = two_ranks(&b.iter().map(String::as_str).collect::<Vec<_>>());
    if built_without_gloo(&ranks) {
        return;
    }
    for (r, o) in ranks.iter().enumerate() {
        assert!(o.status.success(), "rank {r}:\n{}", text(o));
    }
    let names = |d: &Path| {
        let mut v: Vec<String> =
            std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    };
    assert_eq!(names(&two), [".cache", "smoke"], "one run directory");
    assert_eq!(names(&two.join("smoke")), names(&one.join("smoke")), "the same files");
    let (s1, s2) = (csv_rows(&one.join("smoke/summary.csv")), csv_rows(&two.join("smoke/summary.csv")));
    assert_eq!(s1.len(), s2.len());
    for (x, y) in s1.iter().zip(&s2) {
        assert_eq!((&x["stage"], &x["variant"]), (&y["stage"], &y["variant"]));
        let (e1, e2): (i64, i64) = (x["test_errors"].parse().unwrap(), y["test_errors"].parse().unwrap());
        let n = 2000; // experiments/smoke.toml's test_limit
        assert!((e1 - e2).abs() * 50 <= n, "{}: {e1} test errors alone, {e2} on 2 ranks", x["stage"]);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_killed_rank_ends_the_other_with_an_error_naming_it() {
    let dir = fresh_dir("kill");
    let file = dir.join("long.toml");
    // Enough epochs that rank 1 dies mid-training.
    std::fs::write(&file, small().replace("epochs = 1", "epochs = 400")).unwrap();
    let out = dir.join("out");
    let args = ["run", file.to_str().unwrap(), "--out", out.to_str().unwrap()];
    let port = free_loopback_port();
    let mut children: Vec<Child> = (0..2).map(|r| rank(&args, r, 2, port, 5)).collect();
    // Wait for an epoch to finish (rank 0 writes its row), then kill rank 1.
    let metrics = out.join("small/metrics.csv");
    let start = Instant::now();
    while !metrics.exists() {
        if let Some(status) = children[0].try_wait().unwrap() {
            let o = children.remove(0).wait_with_output().unwrap();
            let said = text(&o);
            if built_without_gloo(&[o]) {
                return;
            }
            let rank1 = children.pop().map(|mut c| {
                let _ = c.kill();
                c.wait_with_output().unwrap()
            });
            panic!(
                "rank 0 ended before training ({status}):\n{said}\nrank 1:\n{}",
                rank1.as_ref().map(text).unwrap_or_default()
            );
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no epoch finished");
        std::thread::sleep(Duration::from_millis(50));
    }
    children[1].kill().unwrap();
    let _ = children[1].wait();
    let survivor = children.remove(0);
    let deadline = Instant::now() + Duration::from_secs(120);
    let pid = survivor.id();
    let waiter = std::thread::spawn(move || survivor.wait_with_output().unwrap());
    while !waiter.is_finished() {
        if Instant::now() > deadline {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("rank 0 still runs 2 minutes after rank 1 was killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = waiter.join().unwrap();
    let err = text(&o);
    assert!(!o.status.success());
    // The kill lands inside an epoch (the error then names the stage and epoch first) or while the
    // ranks score an epoch: either way one error line naming both ranks.
    let line =
        err.lines().find(|l| l.starts_with("[rank 0] error: ")).unwrap_or_else(|| panic!("no error line: {err}"));
    assert!(line.contains("rank 0 of 2: ") && line.contains("rank 1 (the other rank)"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ranks_started_with_different_experiments_stop_at_the_start() {
    let dir = fresh_dir("differ");
    let file = dir.join("small.toml");
    std::fs::write(&file, small()).unwrap();
    let out = dir.join("out");
    let port = free_loopback_port();
    let children: Vec<Child> = (0..2)
        .map(|r| {
            let seed = format!("seed={}", 5 + r);
            rank(&["run", file.to_str().unwrap(), "--set", &seed, "--out", out.to_str().unwrap()], r, 2, port, 20)
        })
        .collect();
    let outputs: Vec<Output> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    if built_without_gloo(&outputs) {
        return;
    }
    for o in &outputs {
        assert!(!o.status.success());
        assert!(text(o).contains("differs across ranks: rank 0 has"), "{}", text(o));
    }
    assert!(!out.exists(), "nothing written");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Starts 2 ranks, rank `r` in `cwd[r]` with `env[r]`, and returns their outputs.
fn two_ranks_in(cwd: [&Path; 2], env: [&[(&str, &str)]; 2], args: &[&str]) -> Vec<Output> {
    let port = free_loopback_port();
    let children: Vec<Child> = (0..2).map(|r| rank_in(cwd[r], env[r], args, (r, 2), port, 20)).collect();
    children.into_iter().map(|c| c.wait_with_output().unwrap()).collect()
}

/// Both ranks failed, by an exit status (no signal), each with an error line containing `what`,
/// and no result was recorded.
fn both_stopped_naming(outputs: &[Output], what: &str, out: &Path) {
    use std::os::unix::process::ExitStatusExt;
    for (r, o) in outputs.iter().enumerate() {
        let err = text(o);
        assert!(o.status.code().is_some_and(|c| c != 0), "rank {r} ({:?}):\n{err}", o.status.signal());
        let line = err.lines().find(|l| l.starts_with(&format!("[rank {r}] error: "))).unwrap_or_default();
        assert!(line.contains(what), "rank {r}:\n{err}");
        assert!(!err.contains("terminate called") && !err.contains("frame #"), "rank {r}:\n{err}");
    }
    let summaries: Vec<PathBuf> = walk(out).into_iter().filter(|p| p.ends_with("summary.csv")).collect();
    for s in summaries {
        assert!(csv_rows(&s).is_empty(), "a result was recorded in {}", s.display());
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries.flatten().flat_map(|e| if e.path().is_dir() { walk(&e.path()) } else { vec![e.path()] }).collect()
}

/// An IDX pair of the first `n` training images and labels of MNIST, with `flip` pixels of
/// image 10 changed, in `dir/d/mnist` beside links to the test files.
fn mnist_copy(dir: &Path, n: usize, flip: usize) {
    let (from, to) = (root().join("data/mnist"), dir.join("d/mnist"));
    std::fs::create_dir_all(&to).unwrap();
    let images = std::fs::read(from.join("train-images-idx3-ubyte")).unwrap();
    let labels = std::fs::read(from.join("train-labels-idx1-ubyte")).unwrap();
    let mut im = images[..16 + n * 784].to_vec();
    im[4..8].copy_from_slice(&(n as u32).to_be_bytes());
    for b in &mut im[16 + 10 * 784..16 + 10 * 784 + flip] {
        *b = 255 - *b;
    }
    let mut lb = labels[..8 + n].to_vec();
    lb[4..8].copy_from_slice(&(n as u32).to_be_bytes());
    std::fs::write(to.join("train-images-idx3-ubyte"), im).unwrap();
    std::fs::write(to.join("train-labels-idx1-ubyte"), lb).unwrap();
    for f in ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"] {
        std::os::unix::fs::symlink(from.join(f), to.join(f)).unwrap();
    }
}

/// The same data path names different bytes on the two ranks (as on two machines: here through
/// a link to `/proc/self/cwd`, and the ranks' working directories differ): the ranks stop
/// before training, naming the data, instead of training on the mix.
#[test]
fn ranks_that_read_different_data_stop_naming_it() {
    let dir = fresh_dir("data");
    let file = dir.join("small.toml");
    std::fs::write(&file, SMALL.replace("data/mnist", "d/mnist")).unwrap();
    std::os::unix::fs::symlink("/proc/self/cwd/d", dir.join("d")).unwrap();
    let (a, b) = (dir.join("a"), dir.join("b"));
    mnist_copy(&a, 700, 0);
    mnist_copy(&b, 700, 3);
    let out = dir.join("out");
    let args = ["run", file.to_str().unwrap(), "--out", out.to_str().unwrap()];
    let ranks = two_ranks_in([&a, &b], [&[], &[]], &args);
    if built_without_gloo(&ranks) {
        return;
    }
    both_stopped_naming(&ranks, &format!("the training examples as read from {}", dir.join("d/mnist").display()), &out);
    // The same bytes in both folders train.
    let ranks = two_ranks_in([&a, &a], [&[], &[]], &args);
    for (r, o) in ranks.iter().enumerate() {
        assert!(o.status.success(), "rank {r}:\n{}", text(o));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A setting that shapes the collectives (the gradient bucket size) differs between ranks: an
/// error at the start, not an abort inside Gloo.
#[test]
fn a_bucket_size_that_differs_between_ranks_stops_at_the_start() {
    let dir = fresh_dir("bucket");
    let file = dir.join("small.toml");
    std::fs::write(&file, small().replace("[24]", "[400]")).unwrap();
    let out = dir.join("out");
    let args = ["run", file.to_str().unwrap(), "--out", out.to_str().unwrap()];
    let ranks = two_ranks_in([&root(), &root()], [&[], &[("KD_DIST_BUCKET_MB", "1")]], &args);
    if built_without_gloo(&ranks) {
        return;
    }
    both_stopped_naming(&ranks, "KD_DIST_BUCKET_MB", &out);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A frame store with fewer training utterances than ranks: some rank would stream nothing, so
/// the stage is an error naming the store, and no untrained model is recorded.
#[test]
fn a_store_with_fewer_utterances_than_ranks_is_an_error() {
    let dir = fresh_dir("store");
    let stores = dir.join("stores");
    let w = alone(&[
        "store",
        "write",
        "experiments/speech_tiny.toml",
        "--out",
        stores.to_str().unwrap(),
        "--set",
        "data.speech.speakers=3",
        "--set",
        "data.speech.utterances_per_speaker=1",
    ]);
    assert!(w.status.success(), "{}", text(&w));
    let file = dir.join("st.toml");
    let text_ = format!(
        "name = \"st\"\nseed = 1\nthreads = 1\n[data]\nkind = \"store\"\ncontext = [4, 2]\n\
         store = {{ dir = \"{}\" }}\n[[stages]]\nname = \"base\"\nkind = \"train\"\nmodel = {{ hidden = [16] }}\n\
         epochs = 1\nbatch_size = 32\noptimizer = {{ kind = \"sgd\", lr = 0.05 }}\n",
        stores.display()
    );
    std::fs::write(&file, text_).unwrap();
    let out = dir.join("out");
    let ranks = two_ranks(&["run", file.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    if built_without_gloo(&ranks) {
        return;
    }
    both_stopped_naming(&ranks, "holds 1 utterance(s)", &out);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An experiment of 3 epochs of 100 steps (batches of 5) with a checkpoint every 5 steps, in
/// `dir`; and the run directory of 2 ranks that trained it without a stop (`None` when this
/// kd-run has no Gloo).
fn stepped_with_reference(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    let file = dir.join("stepped.toml");
    let experiment = small()
        .replace("threads = 1", "threads = 1\n[checkpoint]\nevery_steps = 5")
        .replace("epochs = 1", "epochs = 3")
        .replace("batch_size = 75", "batch_size = 5")
        .replace("[24]", "[400]");
    std::fs::write(&file, experiment).unwrap();
    let whole = dir.join("whole");
    let ranks = two_ranks(&["run", file.to_str().unwrap(), "--out", whole.to_str().unwrap()]);
    if built_without_gloo(&ranks) {
        return None;
    }
    for (r, o) in ranks.iter().enumerate() {
        assert!(o.status.success(), "rank {r}:\n{}", text(o));
    }
    Some((file, whole))
}

/// Every weight of the final checkpoints of the runs under `a` and `b` within `tolerance`.
fn same_weights(a: &Path, b: &Path, tolerance: f64) {
    let load = |out: &Path| Tensor::read_safetensors(out.join("small/checkpoints/net.safetensors")).unwrap();
    let (w1, w2) = (load(a), load(b));
    assert_eq!(w1.len(), w2.len());
    for (name, t1) in &w1 {
        let t2 = &w2.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name} missing")).1;
        let diff = (t1 - t2).abs().max().double_value(&[]);
        assert!(diff <= tolerance, "{name}: max |{} - {}| = {diff}", a.display(), b.display());
    }
}

/// Waits until `path` exists (the first checkpoint inside an epoch), at most 2 minutes.
fn wait_for(path: &Path) {
    let started = Instant::now();
    while !path.exists() {
        assert!(started.elapsed() < Duration::from_secs(120), "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// SIGUSR1 to one rank: both stop at the same step boundary after one checkpoint, with status
/// 75; the 2 ranks started again resume there and end with the weights of 2 ranks trained
/// without a stop.
#[test]
fn a_preemption_signal_to_one_rank_stops_both_at_one_checkpoint_and_they_resume() {
    let dir = fresh_dir("preempt");
    let Some((file, whole)) = stepped_with_reference(&dir) else { return };
    let cut = dir.join("cut");
    let args = ["run", file.to_str().unwrap(), "--out", cut.to_str().unwrap()];
    let port = free_loopback_port();
    let children: Vec<Child> = (0..2).map(|r| rank(&args, r, 2, port, 20)).collect();
    wait_for(&cut.join("small/checkpoints/net.resume.safetensors"));
    // SAFETY: signals a child of this test that has not been waited for.
    unsafe { libc::kill(children[1].id() as i32, libc::SIGUSR1) };
    let outputs: Vec<Output> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    let mut steps = Vec::new();
    for (r, o) in outputs.iter().enumerate() {
        let err = text(o);
        assert_eq!(o.status.code(), Some(75), "rank {r}:\n{err}");
        let line = err.lines().find(|l| l.contains("stopped: stage `net`: stopped by ")).unwrap_or_default();
        assert!(line.contains("run the same command again to resume"), "rank {r}:\n{err}");
        steps.push(line.split(" at ").nth(1).unwrap_or_default().to_string());
    }
    assert_eq!(steps[0], steps[1], "the same step on both ranks");
    let ranks = two_ranks(&args);
    for (r, o) in ranks.iter().enumerate() {
        assert!(o.status.success(), "rank {r}:\n{}", text(o));
    }
    assert!(text(&ranks[0]).contains("resuming at step"), "{}", text(&ranks[0]));
    same_weights(&whole, &cut, 1e-6);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The process whose command line contains `needle` and whose environment holds all of `vars`.
fn find_process(needle: &str, vars: &[&str]) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let environ = std::fs::read(e.path().join("environ")).ok()?;
        let has = |hay: &[u8], s: &str| hay.split(|&b| b == 0).any(|w| w == s.as_bytes());
        let mentions = String::from_utf8_lossy(&cmdline).contains(needle);
        (mentions && vars.iter().all(|v| has(&environ, v))).then_some(pid)
    })
}

/// Under `torchrun --max-restarts 1`, rank 1 killed with SIGKILL inside an epoch: torchrun
/// restarts both ranks, they resume from the last checkpoint inside the epoch, and the run ends
/// with the weights of an uninterrupted 2-rank run. Needs torchrun (`make setup` installs it in
/// .venv).
#[test]
fn torchrun_restarts_a_killed_rank_and_the_group_resumes_from_its_step_checkpoint() {
    let torchrun = root().join(".venv/bin/torchrun");
    if !torchrun.exists() {
        eprintln!("no .venv/bin/torchrun (run `make setup`): the elastic restart is not checked");
        return;
    }
    let dir = fresh_dir("elastic");
    let Some((file, whole)) = stepped_with_reference(&dir) else { return };
    let cut = dir.join("cut");
    let port = free_loopback_port().to_string();
    let child = Command::new(&torchrun)
        .args(["--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", "1", "--monitor-interval", "0.2"])
        .args(["--rdzv-backend", "c10d", "--rdzv-endpoint", &format!("127.0.0.1:{port}")])
        .args(["--no-python", env!("CARGO_BIN_EXE_kd-run")])
        .args(["run", file.to_str().unwrap(), "--out", cut.to_str().unwrap()])
        .current_dir(root())
        .env("GLOO_SOCKET_IFNAME", "lo")
        .env("KD_DIST_TIMEOUT_S", "20")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("torchrun starts");
    wait_for(&cut.join("small/checkpoints/net.resume.safetensors"));
    let needle = file.display().to_string();
    let victim =
        find_process(&needle, &["RANK=1", "TORCHELASTIC_RESTART_COUNT=0"]).expect("rank 1 of the first attempt");
    // SAFETY: kills a process this test's torchrun started.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "torchrun:\n{err}");
    assert!(err.contains("resuming at step "), "the restarted group resumed inside an epoch:\n{err}");
    same_weights(&whole, &cut, 1e-6);
    let (s1, s2) = (csv_rows(&whole.join("small/summary.csv")), csv_rows(&cut.join("small/summary.csv")));
    assert_eq!(s1[0]["test_errors"], s2[0]["test_errors"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A global batch smaller than the number of ranks would leave a rank without examples: an
/// error naming both, on every rank, before anything trains.
#[test]
fn a_batch_smaller_than_the_ranks_is_an_error() {
    let dir = fresh_dir("tiny-batch");
    let file = dir.join("small.toml");
    std::fs::write(&file, small().replace("batch_size = 75", "batch_size = 1")).unwrap();
    let out = dir.join("out");
    let ranks = two_ranks(&["run", file.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    if built_without_gloo(&ranks) {
        return;
    }
    both_stopped_naming(&ranks, "batch_size = 1 is smaller than the 2 ranks", &out);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Two machines on one: each a Linux network namespace with its own address, joined by a
/// virtual ethernet pair, one rank on each started by torchrun `--nnodes 2` with c10d
/// rendezvous (`--local-addr` gives each agent its address). Needs root and `ip` (iproute2);
/// skipped with a message elsewhere, or where namespaces cannot be made (a container without
/// CAP_SYS_ADMIN).
mod two_hosts {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// The two hosts: namespaces, their ends of the veth pair and their addresses, unique to
    /// this test process and test. Dropping it kills every process started on them (marked by
    /// `KD_TWO_HOSTS` in their environment, which torchrun's workers inherit) and deletes the
    /// namespaces, which deletes the link: also when the test fails.
    pub struct Hosts {
        pub names: [String; 2],
        pub links: [String; 2],
        pub addrs: [String; 2],
        marker: String,
    }

    fn ip(args: &[&str]) -> Result<(), String> {
        let o = Command::new("ip").args(args).output().map_err(|e| format!("`ip` cannot be run: {e}"))?;
        if o.status.success() {
            Ok(())
        } else {
            Err(format!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim()))
        }
    }

    impl Hosts {
        /// Makes the two hosts, or says why they cannot be made here.
        pub fn new() -> Result<Hosts, String> {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                return Err("not root: network namespaces need root".into());
            }
            if Command::new("ip").arg("-V").output().is_err() {
                return Err("no `ip` command (iproute2)".into());
            }
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let (pid, n) = (std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
            let tag = format!("kd{pid}x{n}");
            // Interface names have at most 15 bytes: "kd" + pid (<= 7 digits) + "x" + n + "a".
            let net = format!("10.{}.{}", 100 + pid % 100, (pid / 100 * 7 + n) % 250);
            let hosts = Hosts {
                names: [format!("{tag}a"), format!("{tag}b")],
                links: [format!("{tag}a"), format!("{tag}b")],
                addrs: [format!("{net}.1"), format!("{net}.2")],
                marker: tag,
            };
            // From here on, Drop removes whatever was made.
            for name in &hosts.names {
                ip(&["netns", "add", name])?;
            }
            let [a, b] = &hosts.names;
            let [la, lb] = &hosts.links;
            ip(&["link", "add", la, "netns", a, "type", "veth", "peer", "name", lb, "netns", b])?;
            for h in 0..2 {
                let (ns, link) = (hosts.names[h].as_str(), hosts.links[h].as_str());
                ip(&["-n", ns, "addr", "add", &format!("{}/24", hosts.addrs[h]), "dev", link])?;
                ip(&["-n", ns, "link", "set", link, "up"])?;
                ip(&["-n", ns, "link", "set", "lo", "up"])?;
            }
            Ok(hosts)
        }

        /// torchrun on host `h` for one rank of 2 nodes, meeting at host 0's address, with at
        /// most `restarts` restarts: kd-run with `args`, collectives timing out after
        /// `timeout_s`.
        pub fn torchrun(&self, h: usize, restarts: u32, timeout_s: u32, args: &[&str]) -> Child {
            let torchrun = root().join(".venv/bin/torchrun");
            let restarts = restarts.to_string();
            Command::new("ip")
                .args(["netns", "exec", &self.names[h]])
                .arg(torchrun)
                .args(["--nnodes", "2", "--nproc-per-node", "1", "--max-restarts", &restarts])
                .args(["--monitor-interval", "0.2", "--rdzv-backend", "c10d", "--rdzv-id", &self.marker])
                .args(["--rdzv-endpoint", &format!("{}:29500", self.addrs[0]), "--local-addr", &self.addrs[h]])
                .args(["--rdzv-conf", if h == 0 { "is_host=1" } else { "is_host=0" }])
                .args(["--no-python", env!("CARGO_BIN_EXE_kd-run")])
                .args(args)
                .current_dir(root())
                .env("GLOO_SOCKET_IFNAME", &self.links[h])
                .env("KD_DIST_TIMEOUT_S", timeout_s.to_string())
                .env("KD_TWO_HOSTS", &self.marker)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("ip netns exec starts")
        }

        /// Takes host `h`'s end of the link down: its packets go nowhere, as when a cable is
        /// pulled (no connection is closed).
        pub fn link_down(&self, h: usize) {
            ip(&["-n", &self.names[h], "link", "set", &self.links[h], "down"]).unwrap();
        }

        /// The processes started on these hosts.
        fn processes(&self) -> Vec<i32> {
            let marker = format!("KD_TWO_HOSTS={}", self.marker);
            let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
            entries
                .flatten()
                .filter_map(|e| {
                    let pid: i32 = e.file_name().to_str()?.parse().ok()?;
                    let environ = std::fs::read(e.path().join("environ")).ok()?;
                    environ.split(|&b| b == 0).any(|v| v == marker.as_bytes()).then_some(pid)
                })
                .collect()
        }
    }

    impl Drop for Hosts {
        fn drop(&mut self) {
            for pid in self.processes() {
                // SAFETY: kills a process this test started (marked with its own tag).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            for name in &self.names {
                let _ = ip(&["netns", "delete", name]);
            }
        }
    }

    /// The two hosts, or `None` after saying why the test is skipped (no root, no `ip`, no
    /// namespaces, no torchrun, no Gloo).
    fn hosts_or_skip(test: &str) -> Option<Hosts> {
        let skip = |why: &str| eprintln!("skipped {test}: {why}");
        if !kd_native::dist::available(kd_native::dist::Backend::Gloo) {
            skip("this kd-run was built without Gloo");
            return None;
        }
        if !root().join(".venv/bin/torchrun").exists() {
            skip("no .venv/bin/torchrun (run `make setup`)");
            return None;
        }
        match Hosts::new() {
            Ok(h) => Some(h),
            Err(why) => {
                skip(&format!("two hosts cannot be made as network namespaces here ({why})"));
                None
            }
        }
    }

    /// Waits for `child` at most `limit`; `None` if it still runs then.
    fn wait_at_most(child: Child, limit: Duration) -> Option<Output> {
        let pid = child.id();
        let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
        let deadline = Instant::now() + limit;
        while !waiter.is_finished() {
            if Instant::now() > deadline {
                // SAFETY: a process this test started; the waiter thread then returns.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                let _ = waiter.join();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(waiter.join().unwrap())
    }

    fn both(outputs: &[Option<Output>]) -> Vec<&Output> {
        outputs.iter().enumerate().map(|(h, o)| o.as_ref().unwrap_or_else(|| panic!("host {h} never ended"))).collect()
    }

    #[test]
    fn two_hosts_train_as_one_process() {
        let Some(hosts) = hosts_or_skip("two_hosts_train_as_one_process") else { return };
        let dir = fresh_dir("hosts-equal");
        let file = dir.join("small.toml");
        std::fs::write(&file, small()).unwrap();
        let (one, two) = (dir.join("one"), dir.join("two"));
        let single = alone(&["run", file.to_str().unwrap(), "--out", one.to_str().unwrap()]);
        assert!(single.status.success(), "{}", text(&single));
        let args = ["run", file.to_str().unwrap(), "--out", two.to_str().unwrap()];
        let agents: Vec<Child> = (0..2).map(|h| hosts.torchrun(h, 0, 20, &args)).collect();
        let outputs: Vec<Option<Output>> =
            agents.into_iter().map(|a| wait_at_most(a, Duration::from_secs(120))).collect();
        for (h, o) in both(&outputs).iter().enumerate() {
            assert!(o.status.success(), "host {h}:\n{}", text(o));
        }
        // Each host ran one rank, rank 0 on host 0 (the agents' addresses order their ranks).
        let err0 = text(both(&outputs)[0]);
        assert!(err0.contains("data-parallel over 2 ranks (this is rank 0)"), "{err0}");
        same_weights(&one, &two, 1e-5);
        let (m1, m2) = (csv_rows(&one.join("small/metrics.csv")), csv_rows(&two.join("small/metrics.csv")));
        for key in ["train_loss", "val_accuracy", "test_errors"] {
            let (x, y): (f64, f64) = (m1[0][key].parse().unwrap(), m2[0][key].parse().unwrap());
            assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "{key}: {x} alone, {y} on 2 hosts");
        }
        drop(hosts);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Whether process `pid` runs (exists and is not a zombie its parent has yet to reap).
    fn runs(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
    }

    /// Host 1's link goes down mid-training (no connection closes: its packets are lost): rank
    /// 0 on host 0 ends with an error naming rank 1 once the collectives' timeout passes, and
    /// torchrun there exits; rank 1, cut off, ends likewise naming rank 0 (its torchrun, which
    /// has lost the rendezvous store on host 0, keeps waiting for it and is stopped by the test).
    #[test]
    fn a_host_whose_link_goes_down_ends_the_other_with_an_error_naming_its_rank() {
        let test = "a_host_whose_link_goes_down_ends_the_other_with_an_error_naming_its_rank";
        let Some(hosts) = hosts_or_skip(test) else { return };
        let dir = fresh_dir("hosts-link");
        let file = dir.join("long.toml");
        std::fs::write(&file, small().replace("epochs = 1", "epochs = 400")).unwrap();
        let out = dir.join("out");
        let args = ["run", file.to_str().unwrap(), "--out", out.to_str().unwrap()];
        let timeout_s = 5;
        let mut agents: Vec<Child> = (0..2).map(|h| hosts.torchrun(h, 0, timeout_s, &args)).collect();
        let metrics = out.join("small/metrics.csv");
        let started = Instant::now();
        while !metrics.exists() {
            if let Some(status) = agents[0].try_wait().unwrap() {
                let o = agents.remove(0).wait_with_output().unwrap();
                panic!("host 0 ended before training ({status}):\n{}", text(&o));
            }
            assert!(started.elapsed() < Duration::from_secs(120), "no epoch finished");
            std::thread::sleep(Duration::from_millis(50));
        }
        let marker = format!("KD_TWO_HOSTS={}", hosts.marker);
        let rank1 = find_process(&file.display().to_string(), &["RANK=1", &marker]).expect("rank 1 on host 1");
        hosts.link_down(1);
        let down = Instant::now();
        // The timeout, plus the step in flight and torchrun's stop of the group.
        let limit = Duration::from_secs(u64::from(timeout_s) + 20);
        let o = wait_at_most(agents.remove(0), limit).expect("host 0 ends within the timeout");
        let took = down.elapsed();
        while runs(rank1) {
            assert!(down.elapsed() < limit, "rank 1 still runs {:?} after its link went down", down.elapsed());
            std::thread::sleep(Duration::from_millis(50));
        }
        let took1 = down.elapsed();
        let stuck = agents.remove(0);
        // SAFETY: host 1's torchrun, started by this test.
        unsafe { libc::kill(stuck.id() as i32, libc::SIGKILL) };
        let o1 = stuck.wait_with_output().unwrap();
        for (r, (o, other)) in [(&o, 1), (&o1, 0)].into_iter().enumerate() {
            let err = text(o);
            let line = err
                .lines()
                .find(|l| l.starts_with(&format!("[rank {r}] error: ")))
                .unwrap_or_else(|| panic!("rank {r}: no error line: {err}"));
            assert!(line.contains(&format!("rank {r} of 2: ")), "{err}");
            assert!(line.contains(&format!("rank {other} (the other rank)")), "{err}");
            assert!(line.contains(&format!("time out after {timeout_s} s")), "{err}");
            eprintln!("rank {r} ended {:?} after host 1's link went down: {line}", [took, took1][r]);
        }
        assert!(!o.status.success(), "torchrun on host 0:\n{}", text(&o));
        drop(hosts);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Under torchrun `--max-restarts 1` on both hosts, rank 1 killed with SIGKILL inside an
    /// epoch: both agents restart their ranks, which meet again across the link, resume from
    /// the last checkpoint inside the epoch and end with the weights of an uninterrupted run.
    #[test]
    fn torchrun_on_two_hosts_restarts_a_killed_rank_and_the_group_resumes() {
        let Some(hosts) = hosts_or_skip("torchrun_on_two_hosts_restarts_a_killed_rank_and_the_group_resumes") else {
            return;
        };
        let dir = fresh_dir("hosts-elastic");
        let Some((file, whole)) = stepped_with_reference(&dir) else { return };
        let cut = dir.join("cut");
        let args = ["run", file.to_str().unwrap(), "--out", cut.to_str().unwrap()];
        let agents: Vec<Child> = (0..2).map(|h| hosts.torchrun(h, 1, 20, &args)).collect();
        wait_for(&cut.join("small/checkpoints/net.resume.safetensors"));
        let needle = file.display().to_string();
        let victim =
            find_process(&needle, &["RANK=1", "TORCHELASTIC_RESTART_COUNT=0"]).expect("rank 1 of the first attempt");
        // SAFETY: kills a process this test's torchrun started.
        unsafe { libc::kill(victim, libc::SIGKILL) };
        let outputs: Vec<Option<Output>> =
            agents.into_iter().map(|a| wait_at_most(a, Duration::from_secs(120))).collect();
        for (h, o) in both(&outputs).iter().enumerate() {
            assert!(o.status.success(), "host {h}:\n{}", text(o));
        }
        let err0 = text(both(&outputs)[0]);
        assert!(err0.contains("resuming at step "), "the restarted group resumed inside an epoch:\n{err0}");
        same_weights(&whole, &cut, 1e-6);
        let (s1, s2) = (csv_rows(&whole.join("small/summary.csv")), csv_rows(&cut.join("small/summary.csv")));
        assert_eq!(s1[0]["test_errors"], s2[0]["test_errors"]);
        drop(hosts);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
