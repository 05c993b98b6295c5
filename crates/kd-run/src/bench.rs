//! `kd-run bench`: examples per second of the training loop against PyTorch eager.
//!
//! The workloads, on synthetic data resident on the device:
//! - `teacher`: the paper's 784-1200-1200-10 teacher, 20%/50% dropout, max-norm 3.5, hard
//!   labels, SGD with momentum 0.9, batch 128;
//! - `distill`: the 784-800-800-10 student on precomputed soft targets at T = 20 (soft weight
//!   1, hard weight 0), SGD with momentum 0.9, batch 128;
//! - `distill_adam`: the same student as `experiments/mnist/headline.toml` trains it, Adam
//!   (lr 5e-4) on batches of 32; the reference uses `torch.optim.Adam(fused=True)`, PyTorch's
//!   fastest Adam on the CPU;
//! - `acoustic` and `acoustic_topk`, each in f32 and with bf16 matrix products (`_bf16`, where
//!   the hardware has bf16): a wide many-class ReLU network on 26 x 40 speech windows (`--acoustic
//!   small`: 4 x 1024 hidden units, 4,000 classes, batch 256; `full`: the paper's 8 x 2560 with
//!   14,000 classes, batch 1024), SGD with momentum 0.9, trained on the labels (`acoustic`) or
//!   distilled from a teacher's cached top-50 soft targets at T = 2 with weight 0.5 on each term
//!   (`acoustic_topk`, as `experiments/speech/gpu.toml`). The reference uses fused SGD,
//!   `torch.autocast` for bf16 and a gather over the top-k classes (no dense target).
//!
//! - `inference` and `inference_1`: the teacher's forward pass alone, without gradients, on
//!   the device (`--device`, the GPU when there is one): batches of 1,024 (examples/s at a large
//!   batch) and single examples (the latency of one), the measurement `kd-run run` records for
//!   every model (`run::cost`). The reference runs `eval()` under `torch.inference_mode()`.
//!
//! The reference runs with `torch.set_flush_denormal(True)`, as `kd-run` flushes subnormals.
//!
//! Both sides run the same per-step work: gather a shuffled batch, forward, loss, backward,
//! update, max-norm, and accumulate the epoch's loss and accuracy on the device. The PyTorch
//! side (`scripts/bench_reference.py`) is started once and asked for a measurement over its
//! stdin, alternating with ours round by round, so both see the same machine load; a
//! workload's ratio is the median of its rounds' ratios ([`Paired`]). Each side also reports
//! the minor page faults its process took during each measurement (medians printed).

use crate::config::{OptimizerKind, OptimizerSpec};
use crate::data::store::FrameStore;
use crate::data::stream::{HostBatch, Producer, StreamFiles, StreamSettings, StreamStart};
use crate::data::Split;
use crate::train::optim::Optimizer;
use crate::train::{self, LoopSettings, Supervision, TeacherSignal, Trainer, TrainerState};
use anyhow::{bail, Context, Result};
use kd_core::{LossWeights, Objective, TeacherTargets};
use kd_models::{Mlp, MlpConfig};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

/// Options of `kd-run bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Timed steps of batch 128 per measurement (a workload on smaller batches takes
    /// proportionally more steps, so every measurement covers the same examples).
    #[arg(long, default_value_t = 160)]
    steps: i64,
    /// Rounds per workload, each one measurement per side back to back (after one warm-up
    /// round); the medians of the rates and of the rounds' ratios are reported.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Python interpreter with torch for the reference.
    #[arg(long, default_value = ".venv/bin/python")]
    python: PathBuf,
    /// The PyTorch reference script.
    #[arg(long, default_value = "scripts/bench_reference.py")]
    reference: PathBuf,
    /// CPU threads for both sides (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    threads: i32,
    /// Size of the acoustic workloads: `small` (4 x 1024, 4,000 classes, batch 256), `full` (8 x
    /// 2560, 14,000 classes, batch 1024, for a GPU), `tiny` (a dry run), or `none`.
    #[arg(long, value_enum, default_value_t = AcousticSize::Small)]
    acoustic: AcousticSize,
    /// Batch size of the acoustic workloads, instead of the size's own (256 small, 1024 full).
    #[arg(long, value_name = "N")]
    acoustic_batch: Option<i64>,
    /// Timed steps per measurement of the acoustic workloads.
    #[arg(long, default_value_t = 10)]
    acoustic_steps: i64,
    /// Run only these workloads (repeatable; default: all).
    #[arg(long = "only", value_name = "WORKLOAD")]
    only: Vec<String>,
    /// Where both sides run: `auto` (the first GPU if libtorch sees one, else the CPU), `cpu`,
    /// `cuda` or `cuda:N`. The MNIST training workloads run on the CPU only.
    #[arg(long, default_value = "auto")]
    device: crate::device::Choice,
    /// kd-run's steps update each layer inside the backward pass (`optimizer_in_backward`).
    #[arg(long)]
    optimizer_in_backward: bool,
    /// kd-run's steps are captured in a CUDA graph and replayed (`cuda_graphs`; CUDA only).
    #[arg(long)]
    cuda_graphs: bool,
    /// Instead of timing, measure the peak memory of one top-k distillation step of the 8 x 2560 /
    /// 14,000-class network with the loss from top-k targets, with them expanded into dense
    /// rows, and with the optimizer stepping inside the backward pass (CPU; this batch size).
    #[arg(long, value_name = "BATCH")]
    memory: Option<i64>,
    /// Instead of the workloads, time a frame store's producer alone (windows/s on one thread)
    /// and the training step of a 4 x 512 network on its batches (frames/s).
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
    /// With `--store`: batches of this many windows.
    #[arg(long, default_value_t = 256)]
    store_batch: usize,
    /// With `--store`: batches timed.
    #[arg(long, default_value_t = 400)]
    store_batches: usize,
    /// With `--store`: frames per shuffled chunk.
    #[arg(long, default_value_t = 8)]
    store_chunk_frames: usize,
}

/// Size of the acoustic workloads.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcousticSize {
    /// 4 x 1024 hidden units, 4,000 classes, batch 256 (seconds on a CPU).
    Small,
    /// The paper's 8 x 2560 hidden units, 14,000 classes, batch 1024.
    Full,
    /// 2 x 64 hidden units, 200 classes, batch 64: checks that everything runs.
    Tiny,
    /// No acoustic workloads.
    None,
}

impl AcousticSize {
    /// Layer sizes and batch size.
    fn shape(self) -> Option<(Vec<i64>, i64)> {
        let (hidden, width, classes, batch) = match self {
            AcousticSize::Small => (4, 1024, 4000, 256),
            AcousticSize::Full => (8, 2560, 14_000, 1024),
            AcousticSize::Tiny => (2, 64, 200, 64),
            AcousticSize::None => return None,
        };
        let mut sizes = vec![ACOUSTIC_INPUT];
        sizes.extend(std::iter::repeat_n(width, hidden));
        sizes.push(classes);
        Some((sizes, batch))
    }
}

/// 26 frames x 40 filterbank channels.
const ACOUSTIC_INPUT: i64 = 26 * 40;
/// Top-k soft targets of the acoustic distillation: k, T, and the weight of each term.
const ACOUSTIC_TOP_K: i64 = 50;
const ACOUSTIC_TEMPERATURE: f64 = 2.0;

const TEMPERATURE: f64 = 20.0;
/// The workloads and their batch sizes.
const WORKLOADS: [(&str, i64); 3] = [("teacher", 128), ("distill", 128), ("distill_adam", 32)];
/// The inference workloads, their batch sizes, and their examples per measurement in steps of 128
/// (`--steps` of them: the large batch covers the training workloads' examples; single examples
/// one in 32 of them, 640 passes by default).
const INFERENCE: [(&str, i64, i64); 2] = [("inference", 1024, 128), ("inference_1", 1, 4)];
/// Every workload's name, for `--only`.
const KNOWN: [&str; 9] = [
    "teacher",
    "distill",
    "distill_adam",
    "inference",
    "inference_1",
    "acoustic",
    "acoustic_bf16",
    "acoustic_topk",
    "acoustic_topk_bf16",
];

/// A constant learning rate: SGD with momentum 0.9 (lr 0.01), or Adam (lr 5e-4).
fn optimizer(adam: bool) -> OptimizerSpec {
    optimizer_at(adam, 0.01)
}

pub(crate) fn optimizer_at(adam: bool, sgd_lr: f64) -> OptimizerSpec {
    OptimizerSpec {
        kind: if adam { OptimizerKind::Adam } else { OptimizerKind::Sgd },
        lr: if adam { 5e-4 } else { sgd_lr },
        momentum: 0.9,
        momentum_start: 0.9,
        momentum_ramp_epochs: 0,
        nesterov: false,
        weight_decay: 0.0,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
    }
}

/// One pass in batches of `batch_size`, no jitter, the loss read at the end only.
fn settings(batch_size: i64, geometry: Option<(i64, i64)>) -> LoopSettings {
    LoopSettings { batch_size, jitter: 0, geometry, report_every: 0 }
}

struct Workload {
    vs: nn::VarStore,
    net: Mlp,
    settings: LoopSettings,
    objective: Objective,
    /// The teacher's cached targets over the examples, for distillation.
    targets: Option<TeacherTargets>,
    data: Split,
    trainer_state: Option<TrainerState>,
}

/// A teacher's top-`k` soft targets at `objective`'s T over `n` examples of `classes` classes,
/// from random logits (chunk by chunk, so that no `[n, classes]` matrix is held).
fn random_top_k(n: i64, classes: i64, k: i64, objective: &Objective, device: Device) -> Result<TeacherTargets> {
    let chunks = train::in_chunks(n, 1024, |_, rows| {
        let logits = Tensor::randn([rows, classes], (Kind::Float, device)) * 4.0;
        Ok(objective.top_k_targets(&logits, k)?)
    })?;
    Ok(TeacherTargets::cat(&chunks)?)
}

/// The objective of the acoustic top-k workload: soft targets at T = 2, weight 0.5 on each term.
fn acoustic_objective() -> Result<Objective> {
    Ok(Objective::soft_targets(ACOUSTIC_TEMPERATURE, LossWeights { hard: 0.5, soft: 0.5 })?)
}

impl Workload {
    /// An acoustic workload (`acoustic`, `acoustic_topk`, with or without `_bf16`) of `sizes`.
    fn acoustic(name: &str, sizes: &[i64], batch: i64, examples: i64, device: Device) -> Result<Self> {
        tch::manual_seed(0);
        let classes = *sizes.last().context("sizes")?;
        let vs = nn::VarStore::new(device);
        let net = Mlp::new(&vs.root(), MlpConfig::plain(sizes.to_vec()))?;
        let net = if name.ends_with("_bf16") { net.with_compute_kind(Kind::BFloat16) } else { net };
        let opt = Optimizer::new(&optimizer_at(false, 0.05), vs.trainable_variables());
        let data = Split::new(
            Tensor::randn([examples, ACOUSTIC_INPUT], (Kind::Float, device)),
            Tensor::randint(classes, [examples], (Kind::Int64, device)),
        );
        let (objective, targets) = if name.starts_with("acoustic_topk") {
            let objective = acoustic_objective()?;
            (objective, Some(random_top_k(examples, classes, ACOUSTIC_TOP_K, &objective, device)?))
        } else {
            (Objective::hard_labels(), None)
        };
        let settings = settings(batch, None);
        let trainer_state = Some(Trainer::new(&net, vs.trainable_variables(), opt).into_state());
        Ok(Workload { vs, net, settings, objective, targets, data, trainer_state })
    }

    fn new(name: &str, batch: i64, examples: i64) -> Result<Self> {
        tch::manual_seed(0);
        let (config, objective) = match name {
            "teacher" => (MlpConfig::mnist_teacher(), Objective::hard_labels()),
            _ => (
                MlpConfig::mnist_student(),
                Objective::soft_targets(TEMPERATURE, LossWeights { hard: 0.0, soft: 1.0 })?,
            ),
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Mlp::new(&vs.root(), config)?;
        let opt = Optimizer::new(&optimizer(name == "distill_adam"), vs.trainable_variables());
        let data = Split::new(
            Tensor::rand([examples, 784], (Kind::Float, Device::Cpu)),
            Tensor::randint(10, [examples], (Kind::Int64, Device::Cpu)),
        );
        let soft_targets =
            (Tensor::randn([examples, 10], (Kind::Float, Device::Cpu)) * 3.0 / TEMPERATURE).softmax(1, Kind::Float);
        let targets = objective.uses_teacher().then(|| TeacherTargets::probs(soft_targets, TEMPERATURE)).transpose()?;
        let settings = settings(batch, Some((28, 28)));
        let trainer_state = Some(Trainer::new(&net, vs.trainable_variables(), opt).into_state());
        Ok(Workload { vs, net, settings, objective, targets, data, trainer_state })
    }

    /// Has kd-run's steps run with the optimizer inside the backward pass, or captured in a CUDA
    /// graph (kept from one measurement to the next); fails where that is not possible.
    fn configure(&mut self, in_backward: bool, cuda_graphs: bool) -> Result<()> {
        let state = self.trainer_state.take().context("optimizer")?;
        let mut trainer = Trainer::from_state(&self.net, self.vs.trainable_variables(), state);
        if trainer.update_in_backward(in_backward) != in_backward {
            bail!("--optimizer-in-backward: the optimizer cannot step inside the backward pass here");
        }
        if let Some(why) = trainer.use_cuda_graphs(cuda_graphs) {
            bail!("--cuda-graphs: {why}");
        }
        self.trainer_state = Some(trainer.into_state());
        Ok(())
    }

    /// Runs one pass over the examples and returns examples per second.
    fn measure(&mut self) -> Result<f64> {
        let state = self.trainer_state.take().context("optimizer")?;
        let mut trainer = Trainer::from_state(&self.net, self.vs.trainable_variables(), state);
        let teacher = match &self.targets {
            Some(targets) => TeacherSignal::Cached(targets),
            None => TeacherSignal::None,
        };
        let supervision = Supervision { objective: self.objective, teacher };
        let started = Instant::now();
        let mut guard = train::LossGuard::default();
        train::train_epoch(
            &mut trainer,
            train::Examples::all(&self.data),
            &supervision,
            &self.settings,
            &mut guard,
            |_, _| {},
        )?;
        let seconds = started.elapsed().as_secs_f64();
        self.trainer_state = Some(trainer.into_state());
        Ok(self.data.len() as f64 / seconds)
    }
}

/// The MNIST teacher's forward pass alone, without gradients: its weights frozen
/// ([`Mlp::frozen`], as a run's evaluation and cost measurement use it) and random images on the
/// device.
struct Inference {
    net: Mlp,
    inputs: Tensor,
    batch: i64,
    device: Device,
}

impl Inference {
    fn new(batch: i64, examples: i64, device: Device) -> Result<Self> {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(device);
        let net = Mlp::new(&vs.root(), MlpConfig::mnist_teacher())?.frozen();
        let inputs = Tensor::rand([examples, 784], (Kind::Float, device));
        Ok(Inference { net, inputs, batch, device })
    }

    /// Runs the network over every example in batches and returns examples per second.
    fn measure(&self) -> Result<f64> {
        use tch::nn::ModuleT;
        let _guard = tch::no_grad_guard();
        let n = self.inputs.size()[0];
        let started = Instant::now();
        train::in_chunks(n, self.batch, |start, len| {
            let _logits = self.net.forward_t(&self.inputs.narrow(0, start, len), false);
            Ok(())
        })?;
        crate::device::synchronize(self.device);
        Ok(n as f64 / started.elapsed().as_secs_f64())
    }
}

/// What `kd-run`'s side of a comparison runs.
enum Ours {
    Training(Box<Workload>),
    Inference(Inference),
}

impl Ours {
    /// Examples per second, and the minor page faults this process took meanwhile.
    fn measure(&mut self) -> Result<Measured> {
        let before = minor_faults();
        let rate = match self {
            Ours::Training(w) => w.measure()?,
            Ours::Inference(i) => i.measure()?,
        };
        Ok(Measured { rate, faults: minor_faults() - before })
    }
}

/// One side's measurement: examples per second, and the minor page faults its process took
/// during it (pages touched for the first time since the system handed them over: what a
/// training step pays when freed memory went back to the system, `keep_freed_memory` in
/// `main.rs`).
#[derive(Clone, Copy, Debug)]
struct Measured {
    rate: f64,
    faults: i64,
}

/// This process's minor page faults so far (`getrusage`); 0 where it cannot tell.
fn minor_faults() -> i64 {
    #[cfg(unix)]
    {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes one rusage struct into the buffer, which is large enough.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } == 0 {
            // SAFETY: initialized by the successful call (and zeroed before it).
            return unsafe { usage.assume_init() }.ru_minflt;
        }
    }
    0
}

struct Reference {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Reference {
    fn start(args: &BenchArgs, threads: i32, device: Device) -> Result<Self> {
        let sizes = args
            .acoustic
            .shape()
            .map_or(String::new(), |(s, _)| s.iter().map(i64::to_string).collect::<Vec<_>>().join(","));
        let mut child = Command::new(&args.python)
            .arg(&args.reference)
            .args(["--threads", &threads.to_string(), "--device", &crate::device::torch_name(device)])
            .arg("--temperature")
            .arg(TEMPERATURE.to_string())
            .args(["--acoustic-sizes", &sizes, "--top-k", &ACOUSTIC_TOP_K.to_string()])
            .args(["--acoustic-temperature", &ACOUSTIC_TEMPERATURE.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {} {}", args.python.display(), args.reference.display()))?;
        let stdin = child.stdin.take().context("reference stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("reference stdout")?);
        Ok(Reference { child, stdin, stdout })
    }

    /// The reference's answer: `<workload> <examples per second> <minor page faults>`.
    fn measure(&mut self, workload: &str, batch: i64, examples: i64) -> Result<Measured> {
        writeln!(self.stdin, "{workload} {batch} {examples}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let value = line.trim().strip_prefix(&format!("{workload} ")).and_then(|v| {
            let (rate, faults) = v.split_once(' ')?;
            Some(Measured { rate: rate.parse().ok()?, faults: faults.parse().ok()? })
        });
        match value {
            Some(v) => Ok(v),
            None => bail!("unexpected answer from the reference script: {line:?}"),
        }
    }
}

impl Drop for Reference {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// The speed ratio of a workload from its rounds: each round's two measurements run back to
/// back, so their ratio cancels a change of the machine's speed from one round to the next
/// (another job starting, the clock drifting), which the ratio of the two sides' medians does
/// not. The median of the rounds' ratios is reported, with their range as its spread.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Paired {
    median: f64,
    lowest: f64,
    highest: f64,
}

impl Paired {
    /// From our rates and the reference's, round by round (the same number of each, at least one).
    fn of(ours: &[f64], theirs: &[f64]) -> Self {
        let ratios: Vec<f64> = ours.iter().zip(theirs).map(|(a, b)| a / b).collect();
        let lowest = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let highest = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Paired { median: median(ratios), lowest, highest }
    }
}

/// Whether bf16 matrix products run natively: on a GPU, or a CPU with AVX-512 BF16 or AMX.
fn has_bf16(device: Device) -> bool {
    device.is_cuda()
        || std::fs::read_to_string("/proc/cpuinfo")
            .is_ok_and(|info| info.split_whitespace().any(|flag| flag == "avx512_bf16" || flag == "amx_bf16"))
}

/// A workload to time: its name, batch size, examples per measurement, multiply-adds per
/// example of the forward pass (for TFLOP/s), and how to build it.
struct Plan {
    name: String,
    batch: i64,
    examples: i64,
    macs: Option<i64>,
}

fn plans(args: &BenchArgs, device: Device) -> Vec<Plan> {
    let mut plans = Vec::new();
    if !device.is_cuda() {
        for (name, batch) in WORKLOADS {
            plans.push(Plan { name: name.into(), batch, examples: args.steps * 128, macs: None });
        }
    }
    for (name, batch, steps_of_128) in INFERENCE {
        plans.push(Plan { name: name.into(), batch, examples: args.steps * steps_of_128, macs: None });
    }
    if let Some((sizes, batch)) = args.acoustic.shape() {
        let batch = args.acoustic_batch.unwrap_or(batch);
        let macs = sizes.windows(2).map(|w| w[0] * w[1]).sum();
        let kinds: &[&str] = if has_bf16(device) { &["", "_bf16"] } else { &[""] };
        for base in ["acoustic", "acoustic_topk"] {
            for kind in kinds {
                let examples = args.acoustic_steps * batch;
                plans.push(Plan { name: format!("{base}{kind}"), batch, examples, macs: Some(macs) });
            }
        }
    }
    plans.retain(|p| args.only.is_empty() || args.only.contains(&p.name));
    plans
}

/// Runs the comparison and prints one `ratio <workload> <value>` line per workload.
pub fn bench(args: &BenchArgs) -> Result<()> {
    if args.steps < 1 || args.rounds < 1 || args.acoustic_steps < 1 || args.acoustic_batch.is_some_and(|b| b < 1) {
        bail!("--steps, --acoustic-steps, --acoustic-batch and --rounds must be at least 1");
    }
    if args.threads > 0 {
        tch::set_num_threads(args.threads);
    }
    if let Some(bad) = args.only.iter().find(|o| !KNOWN.contains(&o.as_str())) {
        bail!("--only {bad}: no such workload (the workloads: {})", KNOWN.join(", "));
    }
    if args.memory.is_some_and(|b| b < 1) {
        bail!("--memory: the batch size must be at least 1");
    }
    if let Some(batch) = args.memory {
        return memory(batch);
    }
    let device = args.device.select("--device")?;
    if let Some(dir) = &args.store {
        let sizes = (args.store_batch.max(1), args.store_batches.max(1), args.store_chunk_frames.max(1));
        return store_rates(dir, sizes, device);
    }
    let plans = plans(args, device);
    if plans.is_empty() {
        bail!(
            "no workload to run: the MNIST training workloads run on the CPU only (--device cpu), `--acoustic none` \
             has no acoustic ones"
        );
    }
    let threads = tch::get_num_threads();
    let peak = match device {
        Device::Cuda(i) => crate::device::cuda_device_name(i).map(|name| {
            println!("# {name}");
            crate::device::peak_tflops(&name)
        }),
        _ => None,
    }
    .flatten();
    let mut reference = Reference::start(args, threads, device)?;
    let where_ = if device.is_cuda() { crate::device::torch_name(device) } else { "CPU".into() };
    println!("# {} rounds, {threads} CPU threads, {where_}", args.rounds);
    let mut results = Vec::new();
    let mut ceilings: Vec<(Kind, f64)> = Vec::new();
    for plan in &plans {
        let (name, batch, examples) = (plan.name.as_str(), plan.batch, plan.examples);
        let mut ours = match args.acoustic.shape() {
            _ if name.starts_with("inference") => Ours::Inference(Inference::new(batch, examples, device)?),
            Some((sizes, _)) if name.starts_with("acoustic") => {
                Ours::Training(Box::new(Workload::acoustic(name, &sizes, batch, examples, device)?))
            }
            _ => Ours::Training(Box::new(Workload::new(name, batch, examples)?)),
        };
        if let Ours::Training(w) = &mut ours {
            w.configure(args.optimizer_in_backward, args.cuda_graphs)?;
        }
        let (mut rust, mut torch) = (Vec::new(), Vec::new());
        for round in 0..=args.rounds {
            // Alternate which side goes first; round 0 warms both up and is not counted.
            let (a, b) = if round % 2 == 0 {
                let a = ours.measure()?;
                (a, reference.measure(name, batch, examples)?)
            } else {
                let b = reference.measure(name, batch, examples)?;
                (ours.measure()?, b)
            };
            if round > 0 {
                rust.push(a);
                torch.push(b);
            }
        }
        let faults = |m: &[Measured]| median(m.iter().map(|m| m.faults as f64).collect());
        let (rust_faults, torch_faults) = (faults(&rust), faults(&torch));
        let rates = |m: Vec<Measured>| -> Vec<f64> { m.into_iter().map(|m| m.rate).collect() };
        let (rust, torch) = (rates(rust), rates(torch));
        let paired = Paired::of(&rust, &torch);
        let (r, t) = (median(rust), median(torch));
        let speed = |rate: f64| match plan.macs {
            Some(macs) => {
                let tflops = rate * 6.0 * macs as f64 / 1e12;
                let bf16 = name.ends_with("_bf16");
                let share = peak.map_or(String::new(), |p| {
                    format!(", {:.1}% of peak", 100.0 * tflops / if bf16 { p.bf16 } else { p.fp32 })
                });
                format!("{rate:.0} examples/s ({tflops:.3} TFLOP/s{share})")
            }
            None => format!("{rate:.0} examples/s"),
        };
        println!(
            "# {name} (batch {batch}, {examples} examples): kd-run {}, PyTorch eager {} (medians)",
            speed(r),
            speed(t)
        );
        if let (Some(macs), Some((sizes, _))) = (plan.macs, args.acoustic.shape()) {
            let kind = if name.ends_with("_bf16") { Kind::BFloat16 } else { Kind::Float };
            let ceiling = match ceilings.iter().find(|(k, _)| *k == kind) {
                Some(&(_, c)) => c,
                None => {
                    let c = products_tflops(&sizes, batch, kind, device);
                    ceilings.push((kind, c));
                    c
                }
            };
            let share = |rate: f64| 100.0 * rate * 6.0 * macs as f64 / 1e12 / ceiling;
            println!(
                "# {name}: the step's matrix products alone run at {ceiling:.3} TFLOP/s here (libtorch's matmul); kd-run \
                 reaches {:.0}% of that, PyTorch {:.0}%",
                share(r),
                share(t)
            );
        }
        println!(
            "# {name}: minor page faults per measurement ({} steps): kd-run {rust_faults:.0}, PyTorch {torch_faults:.0} \
             (medians)",
            (examples + batch - 1) / batch
        );
        println!(
            "# {name}: kd-run / PyTorch per round {:.3} to {:.3}, median {:.3}",
            paired.lowest, paired.highest, paired.median
        );
        results.push((name, paired.median));
    }
    for (name, ratio) in results {
        println!("ratio {name} {ratio:.3}");
    }
    Ok(())
}

/// TFLOP/s of the matrix products of one training step of an MLP of `sizes` at `batch` in `kind`
/// on `device`, run alone: for every layer the forward product, the input gradient's and the
/// weight gradient's (`6 sum fan_in fan_out` FLOP per example, the count the workloads' TFLOP/s
/// use), repeated for half a second after one warm-up, with libtorch's `matmul` (MKL's sgemm in
/// f32 on the CPU): what PyTorch's eager step could reach if nothing else took time. kd-run's
/// forward products run on oneDNN where that is faster (`kd_native::linear`), so its share of
/// this can pass 100%.
fn products_tflops(sizes: &[i64], batch: i64, kind: Kind, device: Device) -> f64 {
    let _guard = tch::no_grad_guard();
    let layers: Vec<(Tensor, Tensor, Tensor)> = sizes
        .windows(2)
        .map(|w| {
            let x = Tensor::randn([batch, w[0]], (kind, device));
            let weight = Tensor::randn([w[1], w[0]], (kind, device));
            let g = Tensor::randn([batch, w[1]], (kind, device));
            (x, weight, g)
        })
        .collect();
    let step = || {
        for (x, w, g) in &layers {
            let _ = x.matmul(&w.tr());
            let _ = g.matmul(w);
            let _ = g.tr().matmul(x);
        }
        if let Device::Cuda(_) = device {
            tch::Cuda::synchronize(0);
        }
    };
    step();
    let started = Instant::now();
    let mut steps = 0u32;
    while started.elapsed().as_secs_f64() < 0.5 {
        step();
        steps += 1;
    }
    let macs: i64 = sizes.windows(2).map(|w| w[0] * w[1]).sum();
    f64::from(steps) * 6.0 * (batch * macs) as f64 / started.elapsed().as_secs_f64() / 1e12
}

/// This process's resident memory now and at its peak since the last reset, in bytes
/// (`VmRSS`, `VmHWM` of `/proc/self/status`).
fn resident() -> Result<(i64, i64)> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let field = |key: &str| -> Result<i64> {
        let line =
            status.lines().find(|l| l.starts_with(key)).with_context(|| format!("no {key} in /proc/self/status"))?;
        let kb: i64 = line[key.len()..].trim().trim_end_matches("kB").trim().parse()?;
        Ok(kb * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Resets the peak resident memory to the current one (Linux `clear_refs` 5).
fn reset_peak() -> Result<()> {
    std::fs::write("/proc/self/clear_refs", "5").context("resetting the peak memory (/proc/self/clear_refs)")
}

/// Peak memory of one distillation step from top-k targets of the 8 x 2560 / 14,000-class network
/// at `batch` on the CPU: with the targets expanded into dense rows first (as the training loop
/// did before), with the sparse loss, and with the sparse loss and the optimizer stepping each
/// layer inside the backward pass ([`Trainer::update_in_backward`]); and of the loss alone
/// (forward and backward to the logits). Prints MiB above the resident memory before the step.
fn memory(batch: i64) -> Result<()> {
    // Every allocation of 64 KiB or more gets its own mapping and is returned when freed, so the
    // resident memory follows what is allocated (glibc otherwise raises the threshold and keeps
    // freed blocks).
    extern "C" {
        fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
    }
    const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
    // SAFETY: mallopt only changes glibc's allocation policy; it is called before the
    // measurement's tensors exist.
    unsafe { mallopt(M_MMAP_THRESHOLD, 64 * 1024) };
    let config = MlpConfig::acoustic_dnn();
    let classes = config.num_classes();
    let objective = acoustic_objective()?;
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Mlp::new(&vs.root(), config.clone())?;
    let mut trainer = Trainer::new(
        &net,
        vs.trainable_variables(),
        Optimizer::new(&optimizer_at(false, 0.05), vs.trainable_variables()),
    );
    let x = Tensor::randn([batch, config.input_dim()], (Kind::Float, Device::Cpu));
    let y = Tensor::randint(classes, [batch], (Kind::Int64, Device::Cpu));
    let sparse = random_top_k(batch, classes, ACOUSTIC_TOP_K, &objective, Device::Cpu)?;
    let top = sparse.as_top_k().context("top-k targets")?;
    let (probs, ids) = (top.probs.shallow_clone(), top.classes.shallow_clone());
    let supervision = Supervision { objective, teacher: TeacherSignal::None };
    let expand = || {
        let dense = Tensor::zeros([batch, classes], (Kind::Float, Device::Cpu)).scatter(1, &ids, &probs);
        Ok(TeacherTargets::probs(dense, ACOUSTIC_TEMPERATURE)?)
    };
    let top_k = || Ok(TeacherTargets::top_k(probs.shallow_clone(), ids.shallow_clone(), ACOUSTIC_TEMPERATURE)?);
    println!(
        "# peak memory above the resident memory before it, {} at batch {batch}, top-{ACOUSTIC_TOP_K} targets at T = {ACOUSTIC_TEMPERATURE}, CPU",
        config.describe()
    );
    let mib = |bytes: i64| bytes as f64 / (1024.0 * 1024.0);
    for (label, targets, in_backward) in [
        ("dense", &expand as &dyn Fn() -> Result<TeacherTargets>, false),
        ("top-k", &top_k as &dyn Fn() -> Result<TeacherTargets>, false),
        ("top-k, optimizer in backward", &top_k as &dyn Fn() -> Result<TeacherTargets>, true),
    ] {
        anyhow::ensure!(
            trainer.update_in_backward(in_backward) == in_backward,
            "the optimizer cannot step in backward"
        );
        // One step to warm up (the gradients' and momentum's first allocation), then one measured.
        let mut step = || -> Result<()> {
            let t = targets()?;
            let _ = trainer.step(&x, |z| supervision.loss(z, &y, Some(&t)).map(|(loss, _)| loss))?;
            Ok(())
        };
        step()?;
        reset_peak()?;
        let (before, _) = resident()?;
        step()?;
        let (_, peak) = resident()?;
        // The loss alone: from logits to their gradient.
        let z = Tensor::randn([batch, classes], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        reset_peak()?;
        let (loss_before, _) = resident()?;
        {
            let t = targets()?;
            let (loss, _) = supervision.loss(&z, &y, Some(&t))?;
            let _grad = Tensor::run_backward(&[&loss], &[&z], false, false);
        }
        let (_, loss_peak) = resident()?;
        println!(
            "memory {label}: step {:.1} MiB, loss and its backward {:.1} MiB",
            mib(peak - before),
            mib(loss_peak - loss_before)
        );
    }
    Ok(())
}

/// The `kd-run bench --store` lines: windows per second of the producer alone on this thread,
/// and frames per second of the training step of a 4 x 512 network on its batches.
fn store_rates(dir: &Path, (batch, batches, chunk_frames): (usize, usize, usize), device: Device) -> Result<()> {
    let store = Arc::new(FrameStore::open(dir)?);
    let lengths = Arc::new(store.utterance_lengths());
    let settings = StreamSettings {
        batch_size: batch,
        left: 20,
        right: 5,
        buffer: 1 << 18,
        chunk_frames,
        prefetch: 4,
        epoch_fraction: 1.0,
        seed: 1,
    };
    let start = StreamStart { epoch: 0, rank: 0, world: 1, batch: 0 };
    let mut producer = Producer::new(StreamFiles::store(store.clone()), lengths.clone(), settings, start, device)?;
    let mut host = HostBatch::default();
    // Warm up: fill the shuffle buffer.
    producer.next_tensors(&mut host)?;
    let started = Instant::now();
    let mut windows = 0usize;
    let mut kept = Vec::new();
    for i in 0..batches {
        let Some((xt, yt, _)) = producer.next_tensors(&mut host)? else { break };
        windows += host.y.len();
        if i < 8 {
            kept.push((xt, yt));
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "store producer: {:.0} windows/s on 1 thread ({windows} windows of 26 x {}, batch {batch}, shuffle buffer {} frames, chunks of {chunk_frames})",
        windows as f64 / secs,
        store.manifest.feature_dim,
        settings.buffer
    );
    let (steps, per_second) = mlp_step_rate(&kept, store.manifest.classes as i64, device)?;
    println!(
        "training step 4 x 512 ({} classes, batch {batch}, {} threads): {per_second:.0} frames/s over {steps} steps",
        store.manifest.classes,
        tch::get_num_threads()
    );
    Ok(())
}

/// Steps per second of a 4 x 512 ReLU network (SGD with momentum 0.9) on `batches` (host
/// tensors, moved to `device` first), cycled for at least 40 steps after 3 of warm-up; returns
/// the steps timed and frames per second.
pub fn mlp_step_rate(batches: &[(Tensor, Tensor)], classes: i64, device: Device) -> Result<(usize, f64)> {
    let Some((x0, _)) = batches.first() else { bail!("no batches to time") };
    let batches: Vec<(Tensor, Tensor)> =
        batches.iter().map(|(x, y)| (x.to_device(device), y.to_device(device))).collect();
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let config = MlpConfig { sizes: vec![x0.size()[1], 512, 512, 512, 512, classes], ..Default::default() };
    let net = Mlp::new(&vs.root(), config)?;
    let opt = Optimizer::new(&optimizer(false), vs.trainable_variables());
    let mut trainer = Trainer::new(&net, vs.trainable_variables(), opt);
    let objective = Objective::hard_labels();
    let mut step = |i: usize| -> Result<Tensor> {
        let (x, y) = &batches[i % batches.len()];
        let (_, loss) = trainer.step(x, |z| Ok(objective.loss(z, None, Some(y))?.total))?;
        Ok(loss)
    };
    for i in 0..3 {
        let _ = step(i)?;
    }
    let steps = 40.max(batches.len());
    let started = Instant::now();
    let mut frames = 0i64;
    let mut last = None;
    for i in 0..steps {
        last = Some(step(i)?);
        frames += batches[i % batches.len()].1.size()[0];
    }
    if let Some(l) = last {
        f64::try_from(l)?;
    }
    Ok((steps, frames as f64 / started.elapsed().as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ratio_is_the_median_of_the_rounds_ratios() {
        // The machine slows down from round to round, and in round 2 for our measurement
        // alone: the rounds' ratios keep the drift out, the outlier round is the lowest.
        let paired = Paired::of(&[100.0, 60.0, 70.0], &[90.0, 75.0, 63.0]);
        assert!((paired.median - 100.0 / 90.0).abs() < 1e-12, "{paired:?}");
        assert!((paired.lowest - 0.8).abs() < 1e-12, "{paired:?}");
        assert!((paired.highest - 70.0 / 63.0).abs() < 1e-12, "{paired:?}");
        // The ratio of the medians would read 70 / 75.
        assert!((median(vec![100.0, 60.0, 70.0]) / median(vec![90.0, 75.0, 63.0]) - 70.0 / 75.0).abs() < 1e-12);
        let one = Paired::of(&[3.0], &[2.0]);
        assert_eq!(one, Paired { median: 1.5, lowest: 1.5, highest: 1.5 });
    }
}
