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
mod doc_links;
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
        /// The final results table as one JSON object on stdout (the run directory and a row per
        /// model with summary.csv's columns) instead of text.
        #[arg(long, conflicts_with = "dry_run")]
        json: bool,
    },
    /// Check an experiment file without running it; prints the resolved configuration.
    Validate {
        /// The experiment file.
        experiment: PathBuf,
        /// Override a setting, as for `run`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// One JSON object instead of the experiment file: the resolved configuration (the same
        /// record as the text) and each stage's kind and the stages it reads.
        #[arg(long)]
        json: bool,
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
    keep_freed_memory();
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
    let cuda = exp.device.select("device")?.is_cuda();
    let hash = dist::text_hash(&format!("{}\n{command}", exp.to_toml()?));
    dist::init(dist::World::join(&|k| std::env::var(k).ok(), cuda, hash)?)
}

fn try_main(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Run { experiment, out, overrides, fresh, only, redo, dry_run, json } => {
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
                if json {
                    println!("{}", summary_json(&dir, &summary, &class_errors)?);
                } else {
                    print!("{}", summary_table(&summary, &class_errors));
                    println!("results in {}", dir.display());
                }
            }
        }
        Command::Validate { experiment, overrides, json } => {
            let exp = config::load(&experiment, &overrides).map_err(config_error)?;
            run::check_inputs(&exp).map_err(|e| config_error(e.context(experiment.display().to_string())))?;
            if json {
                println!("{}", validate_json(&experiment, &exp)?);
            } else {
                print!("{}", exp.to_experiment_file());
            }
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

/// Largest block glibc's allocator takes from its heap instead of a fresh mapping: the most it
/// allows (32 MiB on 64-bit).
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory at the top of the heap that glibc keeps for reuse before returning it to the
/// system.
const TRIM_THRESHOLD: i32 = 256 << 20;

/// Has glibc's allocator keep the memory of freed tensors for the next step instead of handing
/// it back to the system, which the next step's tensors then fault in again page by page.
///
/// By default glibc maps blocks of 128 KiB and more (a threshold it raises to the largest block
/// freed) and gives the top of its heap back once more than twice that is free. A training step
/// frees and allocates its gradients and activations every step, tens of MiB: whether they
/// land in pages already touched depended on the heap's layout, and kd-run's step took 40,000
/// to 88,000 page faults per 10 steps of the 4 x 1024 acoustic workload in some runs and none in
/// others, 5 to 10% of its time (docs/benchmarks.md). With blocks up to [`MMAP_THRESHOLD`] taken
/// from the heap and up to [`TRIM_THRESHOLD`] of it kept free, the steps after the first one
/// touch no new page. Larger blocks are still mapped and returned. `GLIBC_TUNABLES` naming any
/// `glibc.malloc.` setting leaves the user's policy alone. PyTorch's performance guide makes the
/// same point with another allocator (jemalloc or tcmalloc through `LD_PRELOAD`).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.")) {
            return;
        }
        // SAFETY: mallopt only changes glibc's allocation policy for blocks allocated from now
        // on; it is called on the main thread before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    }
}

/// `kd-run validate --json`: the file, the experiment's name, each stage's name, kind and the
/// stages whose models it reads, and the resolved experiment (the record `validate` prints as
/// TOML, every default explicit and every path absolute), as one JSON object on one line.
fn validate_json(file: &std::path::Path, exp: &config::Experiment) -> Result<String> {
    let record: toml::Table = exp.to_experiment_file().parse()?;
    let stages: Vec<serde_json::Value> = exp
        .stages
        .iter()
        .map(|s| serde_json::json!({ "name": s.name, "kind": s.job.kind_name(), "reads": s.job.reads() }))
        .collect();
    let object = serde_json::json!({
        "file": file.display().to_string(),
        "name": exp.name,
        "stages": stages,
        "experiment": record,
    });
    Ok(serde_json::to_string(&object)?)
}

/// Test examples of the model of `row`, from `class_errors.csv` (0 when not recorded).
fn test_examples(row: &run::output::SummaryRow, class_errors: &[run::output::ClassErrorsRow]) -> i64 {
    class_errors
        .iter()
        .filter(|c| c.stage == row.stage && c.variant == row.variant && c.split == "test")
        .map(|c| c.examples)
        .sum()
}

/// `kd-run run --json`: the run directory and one object per model with `summary.csv`'s columns
/// (empty cells as `null`), its `label` in reports and its `test_examples`, on one line.
fn summary_json(
    dir: &std::path::Path,
    rows: &[run::output::SummaryRow],
    class_errors: &[run::output::ClassErrorsRow],
) -> Result<String> {
    let models = rows
        .iter()
        .map(|r| {
            let mut object = serde_json::to_value(r)?;
            if let Some(map) = object.as_object_mut() {
                map.insert("label".into(), r.label().into());
                map.insert("test_examples".into(), test_examples(r, class_errors).into());
            }
            Ok(object)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(serde_json::to_string(&serde_json::json!({ "dir": dir.display().to_string(), "models": models }))?)
}

/// The final table: one row per model, columns as wide as their widest cell, the test errors
/// with the size of the test set (from `class_errors.csv`) and the accuracy, and what the model
/// costs to run: multiply-adds per example, inference examples/s at a large batch and the
/// latency of one example, on the run's device.
fn summary_table(rows: &[run::output::SummaryRow], class_errors: &[run::output::ClassErrorsRow]) -> String {
    const COLUMNS: usize = 9;
    let header =
        ["stage", "model", "parameters", "mult-adds", "test errors", "accuracy", "examples/s", "latency ms", "seconds"]
            .map(String::from);
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "–".into());
    let cells: Vec<[String; COLUMNS]> = rows
        .iter()
        .map(|r| {
            let n = test_examples(r, class_errors);
            let errors = if n > 0 { format!("{} / {n}", r.test_errors) } else { r.test_errors.to_string() };
            [
                r.label(),
                r.model.clone(),
                r.parameters.to_string(),
                or_dash(r.macs.map(|m| m.to_string())),
                errors,
                format!("{:.2}%", 100.0 * r.test_accuracy),
                or_dash(r.inference_examples_per_second.map(|v| format!("{v:.0}"))),
                or_dash(r.latency_ms.map(|v| format!("{v:.3}"))),
                format!("{:.1}", r.seconds),
            ]
        })
        .collect();
    let width = |i: usize| cells.iter().map(|c| c[i].chars().count()).chain([header[i].len()]).max().unwrap_or(0);
    let widths: Vec<usize> = (0..COLUMNS).map(width).collect();
    let line = |c: &[String; COLUMNS]| {
        let mut out = format!("{:<w0$}  {:<w1$}", c[0], c[1], w0 = widths[0], w1 = widths[1]);
        for i in 2..COLUMNS {
            out.push_str(&format!("  {:>w$}", c[i], w = widths[i]));
        }
        out + "\n"
    };
    let mut table: String = std::iter::once(&header).chain(&cells).map(line).collect();
    let measured: Vec<&run::output::SummaryRow> = rows.iter().filter(|r| r.inference_batch.is_some()).collect();
    if let Some(first) = measured.first() {
        let same = |f: &dyn Fn(&run::output::SummaryRow) -> String| measured.iter().all(|r| f(r) == f(first));
        let batch = match same(&|r| format!("{:?}", r.inference_batch)) {
            true => format!("batch {}", first.inference_batch.unwrap_or_default()),
            false => "a large batch (summary.csv's inference_batch)".into(),
        };
        let device = match same(&|r| r.device.clone()) {
            true => first.device.clone(),
            false => "each model's device (summary.csv's device)".into(),
        };
        table.push_str(&format!(
            "mult-adds per example; examples/s: inference at {batch}; latency: one example alone; on {device}\n"
        ));
    }
    table
}
#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use run::output::{ClassErrorsRow, SummaryRow};

    #[test]
    fn every_device_flag_defaults_to_auto_as_the_experiment_setting_does() {
        let cli = Cli::command();
        for path in [&["bench"][..], &["store", "targets"]] {
            let mut command = &cli;
            for name in path {
                command = command.find_subcommand(name).unwrap_or_else(|| panic!("{path:?}"));
            }
            let device = command.get_arguments().find(|a| a.get_id() == "device").expect("a --device flag");
            assert_eq!(device.get_default_values(), ["auto"], "{path:?}");
        }
        // --json is the final table's form; a dry run has no final table.
        assert!(Cli::try_parse_from(["kd-run", "run", "x.toml", "--json"]).is_ok());
        assert!(Cli::try_parse_from(["kd-run", "run", "x.toml", "--json", "--dry-run"]).is_err());
        assert!(Cli::try_parse_from(["kd-run", "validate", "x.toml", "--json"]).is_ok());
    }

    fn row(stage: &str, variant: &str, macs: Option<i64>) -> SummaryRow {
        SummaryRow {
            stage: stage.into(),
            variant: variant.into(),
            kind: "train".into(),
            model: "mlp 784-32-10".into(),
            parameters: 25_450,
            val_errors: Some(7),
            test_errors: 12,
            test_accuracy: 0.94,
            shift: None,
            seconds: 2.5,
            device: "cpu (2 threads)".into(),
            train_accuracy: Some(0.97),
            teacher_agreement: None,
            teacher_errors: None,
            shared_errors: None,
            transfer_agreement: None,
            macs,
            inference_batch: macs.map(|_| 200),
            inference_examples_per_second: macs.map(|_| 123_456.7),
            latency_ms: macs.map(|_| 0.0456),
        }
    }

    fn class_rows(stage: &str, variant: &str) -> Vec<ClassErrorsRow> {
        (0..2)
            .map(|class| ClassErrorsRow {
                stage: stage.into(),
                variant: variant.into(),
                split: "test".into(),
                class,
                examples: 100,
                errors: 6,
            })
            .collect()
    }

    #[test]
    fn the_final_table_holds_each_models_cost_and_its_json_every_column() {
        let rows = [row("teacher", "", Some(25_408)), row("shift", "fixed", None)];
        let classes = [class_rows("teacher", ""), class_rows("shift", "fixed")].concat();
        let table = summary_table(&rows, &classes);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("stage  ") && lines[0].contains("mult-adds") && lines[0].contains("latency ms"));
        assert!(lines[1].contains("25408") && lines[1].contains("12 / 200") && lines[1].contains("123457"));
        assert!(lines[1].contains("0.046") && lines[1].contains("94.00%"), "{table}");
        // A row without measurements (kept from an older run) has dashes, aligned as the others.
        assert!(lines[2].starts_with("shift-fixed") && lines[2].contains("–"), "{table}");
        assert_eq!(lines[1].chars().count(), lines[2].chars().count(), "{table}");
        assert_eq!(
            lines[3],
            "mult-adds per example; examples/s: inference at batch 200; latency: one example alone; on cpu (2 threads)"
        );

        let json: serde_json::Value =
            serde_json::from_str(&summary_json(std::path::Path::new("runs/x"), &rows, &classes).unwrap()).unwrap();
        assert_eq!(json["dir"], "runs/x");
        let models = json["models"].as_array().unwrap();
        assert_eq!(models.len(), 2);
        let m = &models[0];
        assert_eq!(
            (m["label"].as_str(), m["stage"].as_str(), m["kind"].as_str()),
            (Some("teacher"), Some("teacher"), Some("train"))
        );
        assert_eq!(
            (m["macs"].as_i64(), m["inference_batch"].as_i64(), m["test_examples"].as_i64()),
            (Some(25_408), Some(200), Some(200))
        );
        // (serde_json's default float parsing may be one unit in the last place off.)
        let close = |v: &serde_json::Value, want: f64| (v.as_f64().unwrap() - want).abs() <= 1e-12 * want;
        assert!(close(&m["inference_examples_per_second"], 123_456.7) && close(&m["latency_ms"], 0.0456), "{m}");
        assert_eq!(m["test_errors"].as_i64(), Some(12));
        assert_eq!(models[1]["label"], "shift-fixed");
        assert!(models[1]["macs"].is_null() && models[1]["latency_ms"].is_null(), "{json}");
        // Every column of summary.csv is there.
        let mut csv = csv::Writer::from_writer(vec![]);
        csv.serialize(&rows[0]).unwrap();
        let text = String::from_utf8(csv.into_inner().unwrap()).unwrap();
        for column in text.lines().next().unwrap().split(',') {
            assert!(m.get(column).is_some(), "{column} missing from {m}");
        }
    }

    #[test]
    fn validate_json_is_the_resolved_record_with_each_stages_kind_and_reads() {
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/smoke.toml");
        let exp = config::load(&file, &[]).unwrap();
        let json: serde_json::Value = serde_json::from_str(&validate_json(&file, &exp).unwrap()).unwrap();
        assert_eq!(json["name"], "smoke");
        assert_eq!(json["file"], file.display().to_string());
        let stages = json["stages"].as_array().unwrap();
        assert_eq!(stages.len(), exp.stages.len());
        let distilled = stages.iter().find(|s| s["name"] == "distilled").unwrap();
        assert_eq!((distilled["kind"].as_str(), distilled["reads"][0].as_str()), (Some("distill"), Some("teacher")));
        // The record itself: every default explicit (the device), the stages in order.
        let record = &json["experiment"];
        assert_eq!((record["name"].as_str(), record["device"].as_str()), (Some("smoke"), Some("auto")));
        let names: Vec<&str> =
            record["stages"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
        assert_eq!(names, exp.stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>());
        // The same record as the text `validate` prints.
        let text: toml::Table = exp.to_experiment_file().parse().unwrap();
        assert_eq!(record, &serde_json::to_value(text).unwrap());
    }
}
