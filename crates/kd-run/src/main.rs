//! `kd-run`: runs knowledge-distillation experiments described by TOML files.
//!
//! `main` only calls `try_main`; an error is reported as one line on stderr with exit code 2
//! for a bad experiment file or command line, 1 for a failure while running.

mod bench;
mod config;
mod data;
mod device;
mod dist;
#[cfg(test)]
mod fuzz;
mod info;
mod inputs;
mod logging;
mod preemption;
mod report;
mod rng;
mod run;
mod store;
#[cfg(test)]
mod testutil;
mod train;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "kd-run",
    version,
    about = "Runs knowledge-distillation experiments described by TOML files",
    after_help = "Examples:
  kd-run run experiments/mnist.toml                     # the quick start's job, into runs/mnist
  kd-run run experiments/smoke.toml --set seed=2 --out /tmp/runs
  kd-run run experiments/mnist.toml --dry-run           # what would run, resume or be skipped
  kd-run validate experiments/mnist.toml                # check a file; print its resolved form
  kd-run report runs/mnist --out report.md              # tables and plots of finished runs
  kd-run completions bash > ~/.local/share/bash-completion/completions/kd-run

Logging: -q shows warnings and errors only, -v adds debug lines, -vv trace lines; RUST_LOG
(e.g. RUST_LOG=debug, or RUST_LOG=kd_run=debug) overrides both. Exit status: 0 success, 1 an
error while running, 2 a mistake in the experiment file or the command line, 75 stopped by a
preemption signal after a checkpoint (run the same command again to resume)."
)]
struct Cli {
    /// Warnings and errors only.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// More detail: -v debug lines, -vv trace lines.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an experiment; an interrupted run with the same configuration resumes where it stopped.
    Run {
        /// The experiment file.
        experiment: PathBuf,
        /// Folder under which the run directory `<experiment name>/` is written.
        #[arg(long, default_value = "runs")]
        out: PathBuf,
        /// Override a setting: `seed=3`, `defaults.epochs=2`, `stages.<stage>.temperature=8`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Discard an earlier run in the same directory instead of resuming it.
        #[arg(long)]
        fresh: bool,
        /// Run only this stage (repeatable); the stages it reads must have run already. Lets a
        /// scheduler spread one experiment's independent stages over machines. `<stage>.<m>`
        /// trains specialist m of a specialists stage alone.
        #[arg(long = "only", value_name = "STAGE")]
        only: Vec<String>,
        /// Run this stage again (repeatable), discarding its earlier results and checkpoint; the
        /// stages that read its model run again too, the others keep theirs. For a finished run
        /// whose stage should be retrained by newer code.
        #[arg(long = "redo", value_name = "STAGE")]
        redo: Vec<String>,
        /// Print what the run would do (each stage: run, resume from which epoch or step, skip or
        /// run again, and why; what it reads and writes) and write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Check an experiment file without running it; prints the resolved configuration.
    Validate {
        /// The experiment file.
        experiment: PathBuf,
        /// Override a setting, as for `run`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Report the libtorch version, what this build holds (Gloo, NCCL, CUDA graphs), the CPU and its
    /// vector extensions, the thread count and the GPUs.
    Info {
        /// One JSON object instead of lines of text.
        #[arg(long)]
        json: bool,
    },
    /// Time training steps against the PyTorch eager reference, alternating, and print ratios.
    Bench(bench::BenchArgs),
    /// Write a Markdown report with plots from run directories.
    Report(report::ReportArgs),
    /// Write an experiment's frames as frame stores on disk, or check a store.
    Store(store::StoreArgs),
    /// Print a completion script for a shell (`kd-run completions bash > ...`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// An error together with its exit code.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure { code: 1, error: e.into() }
    }
}

fn config_error(error: anyhow::Error) -> Failure {
    Failure { code: 2, error }
}

fn main() -> ExitCode {
    // Before libtorch starts its worker threads, which inherit the setting. KD_KEEP_SUBNORMALS=1
    // keeps the CPU's default, to measure what flushing is worth (docs/benchmarks.md).
    if std::env::var_os("KD_KEEP_SUBNORMALS").is_none() {
        flush_denormals();
    }
    let cli = Cli::parse();
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => logging::Level::Quiet,
        (false, 0) => logging::Level::Normal,
        (false, 1) => logging::Level::Debug,
        (false, _) => logging::Level::Trace,
    };
    logging::init(level);
    install_panic_hook();
    match std::panic::catch_unwind(|| try_main(cli)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(f)) if f.error.downcast_ref::<preemption::Preempted>().is_some() => {
            // Not an error: the run stopped where it can resume.
            eprintln!("{}stopped: {:#}", logging::rank_prefix(), f.error);
            ExitCode::from(preemption::EXIT_STATUS)
        }
        Ok(Err(f)) => {
            // Long lines are clipped: an error never echoes kilobytes of bad input.
            let prefix = logging::rank_prefix();
            eprintln!("{prefix}error: {}", crate::inputs::clip_lines(&format!("{:#}", f.error), 1000));
            ExitCode::from(f.code)
        }
        // The hook has reported it.
        Err(_) => ExitCode::from(1),
    }
}

/// Reports a panic (a bug: bad input is an error, never a panic) as one line on stderr, with
/// the first line of its message and where it happened; with `RUST_BACKTRACE` set, Rust's own
/// report with the backtrace instead.
///
/// Output into a closed pipe (`kd-run info | head -1`) is not a bug: `print!` panics on it, and
/// the process ends quietly with status 141, as a process killed by SIGPIPE does in a shell.
fn install_panic_hook() {
    let rust_hook = std::panic::take_hook();
    let backtrace = std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0");
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        if backtrace {
            return rust_hook(info);
        }
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        let first = message.lines().next().unwrap_or("").trim();
        eprintln!("error: internal error{at}: {first} (RUST_BACKTRACE=1 shows where it came from)");
    }));
}

/// Joins the other ranks when torchrun or srun started this process as one of several
/// (`dist::World::join`: the launch variables, the rendezvous, the same experiment everywhere);
/// alone, a world of one. `command` is the command line without the program (the same on every
/// rank, `--out` included).
fn join_ranks(exp: &config::Experiment, command: &str) -> Result<()> {
    let cuda = run::select_device(&exp.device)?.is_cuda();
    let hash = dist::text_hash(&format!("{}\n{command}", exp.to_toml()?));
    dist::init(dist::World::join(&|k| std::env::var(k).ok(), cuda, hash)?)
}

fn try_main(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Run { experiment, out, overrides, fresh, only, redo, dry_run } => {
            let exp = config::load(&experiment, &overrides).map_err(config_error)?;
            // Before anything is created under --out.
            run::check_inputs(&exp).map_err(|e| config_error(e.context(experiment.display().to_string())))?;
            // A stage's name, or `<stage>.<m>` for specialist m of a specialists stage.
            let known = |o: &str| {
                exp.stages.iter().any(|s| {
                    s.name == o
                        || matches!(s.job, config::Job::Specialists(_))
                            && o.strip_prefix(&format!("{}.", s.name)).is_some_and(|m| m.parse::<usize>().is_ok())
                })
            };
            let unknown = only
                .iter()
                .find(|o| !known(o))
                .map(|o| ("only", o))
                .or_else(|| redo.iter().find(|r| !exp.stages.iter().any(|s| s.name == **r)).map(|r| ("redo", r)));
            if let Some((flag, unknown)) = unknown {
                let names: Vec<&str> = exp.stages.iter().map(|s| s.name.as_str()).collect();
                return Err(config_error(anyhow::anyhow!(
                    "--{flag} {unknown}: {} has no such stage (its stages: {})",
                    experiment.display(),
                    names.join(", ")
                )));
            }
            if dry_run {
                for line in run::dry_run(&exp, &out, run::Options { fresh, redo: &redo, only: &only })? {
                    println!("{line}");
                }
                return Ok(());
            }
            let command = run::output::command_line("kd-run", std::env::args_os().skip(1));
            join_ranks(&exp, &command)?;
            preemption::install(!dist::world().is_distributed());
            let dir = run::run(&exp, &out, run::Options { fresh, redo: &redo, only: &only }, &command)?;
            if dist::world().is_writer() {
                let summary: Vec<run::output::SummaryRow> = run::output::read_csv(&dir.join("summary.csv"))?;
                let class_errors: Vec<run::output::ClassErrorsRow> =
                    run::output::read_csv(&dir.join("class_errors.csv"))?;
                print_summary(&summary, &class_errors);
                println!("results in {}", dir.display());
            }
        }
        Command::Validate { experiment, overrides } => {
            let exp = config::load(&experiment, &overrides).map_err(config_error)?;
            run::check_inputs(&exp).map_err(|e| config_error(e.context(experiment.display().to_string())))?;
            print!("{}", exp.to_experiment_file());
            let n = exp.stages.len();
            eprintln!("{}: ok ({n} stage{})", experiment.display(), if n == 1 { "" } else { "s" });
        }
        Command::Info { json } => {
            let info = info::Info::gather();
            if json {
                println!("{}", info.to_json()?);
            } else {
                print!("{}", info.to_text());
            }
        }
        Command::Bench(args) => bench::bench(&args)?,
        Command::Report(args) => report::report(&args)?,
        Command::Store(args) => store::store(&args)?,
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "kd-run", &mut std::io::stdout());
        }
    }
    Ok(())
}

/// Treats subnormal floats as zero on this thread and the threads it creates from now on (the
/// x86 MXCSR flags FTZ and DAZ; what `torch.set_flush_denormal(True)` does in PyTorch).
///
/// Training makes them: a momentum buffer whose gradient is exactly zero (a border pixel of
/// MNIST, a dead ReLU unit) decays geometrically through the subnormal range, where x86
/// arithmetic is tens of times slower; `experiments/bench/subnormals.toml` with and without
/// `KD_KEEP_SUBNORMALS=1` measures the cost (docs/benchmarks.md). Flushing them changes values
/// below 1.2e-38 only.
fn flush_denormals() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: stmxcsr/ldmxcsr read and write this thread's SSE control register only; setting
    // bits 15 (flush to zero) and 6 (denormals are zero) is defined on every x86_64 CPU.
    unsafe {
        let mut csr: u32 = 0;
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack));
        csr |= (1 << 15) | (1 << 6);
        std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, readonly));
    }
}

/// The final table: one row per model, columns as wide as their widest cell, the test errors
/// with the size of the test set (from `class_errors.csv`) and the accuracy.
fn print_summary(rows: &[run::output::SummaryRow], class_errors: &[run::output::ClassErrorsRow]) {
    print!("{}", summary_table(rows, class_errors));
}

fn summary_table(rows: &[run::output::SummaryRow], class_errors: &[run::output::ClassErrorsRow]) -> String {
    let examples = |r: &run::output::SummaryRow| -> i64 {
        class_errors
            .iter()
            .filter(|c| c.stage == r.stage && c.variant == r.variant && c.split == "test")
            .map(|c| c.examples)
            .sum()
    };
    let header = ["stage", "model", "parameters", "test errors", "accuracy", "seconds"].map(String::from);
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            let n = examples(r);
            let errors = if n > 0 { format!("{} / {n}", r.test_errors) } else { r.test_errors.to_string() };
            [
                r.label(),
                r.model.clone(),
                r.parameters.to_string(),
                errors,
                format!("{:.2}%", 100.0 * r.test_accuracy),
                format!("{:.1}", r.seconds),
            ]
        })
        .collect();
    let width = |i: usize| cells.iter().map(|c| c[i].chars().count()).chain([header[i].len()]).max().unwrap_or(0);
    let widths: Vec<usize> = (0..6).map(width).collect();
    let line = |c: &[String; 6]| {
        let mut out = format!("{:<w0$}  {:<w1$}", c[0], c[1], w0 = widths[0], w1 = widths[1]);
        for i in 2..6 {
            out.push_str(&format!("  {:>w$}", c[i], w = widths[i]));
        }
        out + "\n"
    };
    std::iter::once(&header).chain(&cells).map(line).collect()
}
