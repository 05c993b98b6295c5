//! `kd-run bench`: examples per second of the training loop against PyTorch eager.
//!
//! Three workloads, on synthetic data resident on the device:
//! - `teacher`: the paper's 784-1200-1200-10 teacher, 20%/50% dropout, max-norm 3.5, hard
//!   labels, SGD with momentum 0.9, batch 128;
//! - `distill`: the 784-800-800-10 student on precomputed soft targets at T = 20 (soft weight
//!   1, hard weight 0), SGD with momentum 0.9, batch 128;
//! - `distill_adam`: the same student as `experiments/mnist/headline.toml` trains it, Adam
//!   (lr 5e-4) on batches of 32; the reference uses `torch.optim.Adam(fused=True)`, PyTorch's
//!   fastest Adam on the CPU.
//!
//! Both sides run the same per-step work: gather a shuffled batch, forward, loss, backward,
//! update, max-norm, and accumulate the epoch's loss and accuracy on the device. The PyTorch
//! side (`scripts/bench_reference.py`) is started once and asked for a measurement over its
//! stdin, alternating with ours round by round, so both see the same machine load.

use crate::config::{
    DistillSpec, ModelSource, Objective, OptimizerKind, OptimizerSpec, ScheduleKind, ScheduleSpec, Training,
};
use crate::data::Split;
use crate::optim::Optimizer;
use crate::train::{self, Geometry, Supervision, TeacherSignal, Trainer};
use anyhow::{bail, Context, Result};
use kd_models::{Mlp, MlpConfig};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

/// Options of `kd-run bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Timed steps of batch 128 per measurement (a workload on smaller batches takes
    /// proportionally more steps, so every measurement covers the same examples).
    #[arg(long, default_value_t = 160)]
    steps: i64,
    /// Measurements per side and workload (after one warm-up round); the median is reported.
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
}

const TEMPERATURE: f64 = 20.0;
/// The workloads and their batch sizes.
const WORKLOADS: [(&str, i64); 3] = [("teacher", 128), ("distill", 128), ("distill_adam", 32)];

/// One epoch at a constant learning rate: SGD with momentum 0.9 (lr 0.01), or Adam (lr 5e-4).
fn training(batch_size: i64, adam: bool) -> Training {
    Training {
        epochs: 1,
        batch_size,
        jitter: 0,
        seed: 0,
        optimizer: OptimizerSpec {
            kind: if adam { OptimizerKind::Adam } else { OptimizerKind::Sgd },
            lr: if adam { 5e-4 } else { 0.01 },
            momentum: 0.9,
            momentum_start: 0.9,
            momentum_ramp_epochs: 0,
            nesterov: false,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
        schedule: ScheduleSpec { kind: ScheduleKind::Constant, gamma: 1.0, every: 1, min_lr: 0.0 },
        train_fraction: 1.0,
        patience: None,
    }
}

struct Workload {
    vs: nn::VarStore,
    net: Mlp,
    training: Training,
    distill: Option<DistillSpec>,
    soft_targets: Tensor,
    data: Split,
    trainer_state: Option<Optimizer>,
}

impl Workload {
    fn new(name: &str, batch: i64, examples: i64) -> Result<Self> {
        tch::manual_seed(0);
        let (config, distill) = match name {
            "teacher" => (MlpConfig::mnist_teacher(), None),
            _ => (
                MlpConfig::mnist_student(),
                Some(DistillSpec {
                    teacher: ModelSource::Stage("synthetic".into()),
                    objective: Objective::Soft,
                    temperature: TEMPERATURE,
                    hard_weight: 0.0,
                    soft_weight: 1.0,
                    transfer_exclude: vec![],
                    transfer_only: vec![],
                    top_k: None,
                    translations: None,
                }),
            ),
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Mlp::new(&vs.root(), config)?;
        let training = training(batch, name == "distill_adam");
        let opt = Optimizer::new(&training.optimizer, vs.trainable_variables());
        let data = Split::new(
            Tensor::rand([examples, 784], (Kind::Float, Device::Cpu)),
            Tensor::randint(10, [examples], (Kind::Int64, Device::Cpu)),
        );
        let soft_targets =
            (Tensor::randn([examples, 10], (Kind::Float, Device::Cpu)) * 3.0 / TEMPERATURE).softmax(1, Kind::Float);
        Ok(Workload { vs, net, training, distill, soft_targets, data, trainer_state: Some(opt) })
    }

    /// Runs one pass over the examples and returns examples per second.
    fn measure(&mut self) -> Result<f64> {
        let opt = self.trainer_state.take().context("optimizer")?;
        let mut trainer = Trainer::new(&self.net, self.vs.trainable_variables(), opt);
        let supervision = match &self.distill {
            None => Supervision::Hard,
            Some(spec) => {
                Supervision::Distill { spec, teacher: TeacherSignal::Cached(self.soft_targets.shallow_clone()) }
            }
        };
        let started = Instant::now();
        let geometry: Geometry = Some((28, 28));
        let mut guard = train::LossGuard::default();
        let (data, training) = ((&self.data, None), &self.training);
        train::train_epoch(&mut trainer, data, &supervision, training, geometry, 0, &mut guard, |_, _| {})?;
        let seconds = started.elapsed().as_secs_f64();
        self.trainer_state = Some(trainer.opt);
        Ok(self.data.len() as f64 / seconds)
    }
}

struct Reference {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Reference {
    fn start(args: &BenchArgs, threads: i32) -> Result<Self> {
        let mut child = Command::new(&args.python)
            .arg(&args.reference)
            .args(["--examples", &(args.steps * 128).to_string(), "--threads", &threads.to_string()])
            .arg("--temperature")
            .arg(TEMPERATURE.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {} {}", args.python.display(), args.reference.display()))?;
        let stdin = child.stdin.take().context("reference stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("reference stdout")?);
        Ok(Reference { child, stdin, stdout })
    }

    fn measure(&mut self, workload: &str, batch: i64) -> Result<f64> {
        writeln!(self.stdin, "{workload} {batch}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let value = line.trim().strip_prefix(&format!("{workload} ")).and_then(|v| v.parse().ok());
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

/// Runs the comparison and prints one `ratio <workload> <value>` line per workload.
pub fn bench(args: &BenchArgs) -> Result<()> {
    if args.steps < 1 || args.rounds < 1 {
        bail!("--steps and --rounds must be at least 1");
    }
    if args.threads > 0 {
        tch::set_num_threads(args.threads);
    }
    let threads = tch::get_num_threads();
    let mut reference = Reference::start(args, threads)?;
    println!("# {} examples per measurement, {} rounds, {threads} CPU threads, CPU", args.steps * 128, args.rounds);
    let mut results = Vec::new();
    for (name, batch) in WORKLOADS {
        let mut ours = Workload::new(name, batch, args.steps * 128)?;
        let (mut rust, mut torch) = (Vec::new(), Vec::new());
        for round in 0..=args.rounds {
            // Alternate which side goes first; round 0 warms both up and is not counted.
            let (a, b) = if round % 2 == 0 {
                let a = ours.measure()?;
                (a, reference.measure(name, batch)?)
            } else {
                let b = reference.measure(name, batch)?;
                (ours.measure()?, b)
            };
            if round > 0 {
                rust.push(a);
                torch.push(b);
            }
        }
        let (r, t) = (median(rust), median(torch));
        println!("# {name} (batch {batch}): kd-run {r:.0} examples/s, PyTorch eager {t:.0} examples/s (medians)");
        results.push((name, r / t));
    }
    for (name, ratio) in results {
        println!("ratio {name} {ratio:.3}");
    }
    Ok(())
}
