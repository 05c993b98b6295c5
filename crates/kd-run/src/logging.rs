//! Log output: one line per event on stderr (drawn around the progress bar when there is one)
//! and the same lines, without colors, in the run's `run.log`.

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Mutex;
use tracing_subscriber::{fmt, layer::SubscriberExt, util::SubscriberInitExt, EnvFilter};

static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);
static LOG_FILE: Mutex<Option<File>> = Mutex::new(None);
/// `[rank R] ` before each stderr line of a rank of a data-parallel run, empty otherwise.
static RANK_PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
/// `-q`: no progress bar either.
static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether `-q` asked for warnings and errors only (no progress bar).
pub fn quiet() -> bool {
    QUIET.load(std::sync::atomic::Ordering::Relaxed)
}

/// How much is logged (`-q`, nothing, `-v`, `-vv`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Warnings and errors.
    Quiet,
    /// Progress: what runs, each epoch, the results (`info`).
    Normal,
    /// And `debug` lines.
    Debug,
    /// And `trace` lines.
    Trace,
}

/// Installs the subscriber at `level`; `RUST_LOG` overrides it. A rank other than 0 of a
/// data-parallel run (by its launch variables) logs warnings and errors only, and every rank's
/// lines start with `[rank R]`.
pub fn init(level: Level) {
    let rank = kd_native::launch::from_env().ok().flatten().filter(|l| l.world_size > 1).map(|l| l.rank);
    let _ = RANK_PREFIX.set(rank.map_or_else(String::new, |r| format!("[rank {r}] ")));
    QUIET.store(level == Level::Quiet, std::sync::atomic::Ordering::Relaxed);
    let level = match level {
        _ if rank.unwrap_or(0) != 0 => "warn",
        Level::Quiet => "warn",
        Level::Normal => "info",
        Level::Debug => "debug",
        Level::Trace => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let ansi = std::io::stderr().is_terminal();
    let stderr = fmt::layer().with_target(false).with_ansi(ansi).with_writer(|| StderrWriter);
    let file = fmt::layer().with_target(false).with_ansi(false).with_writer(|| FileWriter);
    let _ = tracing_subscriber::registry().with(filter).with(stderr).with(file).try_init();
}

/// Sends the log lines to `path` too, from now on (appending, so a resumed run keeps its history).
pub fn log_to_file(path: &Path) -> Result<()> {
    let f = File::options()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    *LOG_FILE.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    Ok(())
}

/// Registers the progress bar that log lines must be drawn around (None when it is finished).
pub fn set_bar(bar: Option<ProgressBar>) {
    *BAR.lock().unwrap_or_else(|e| e.into_inner()) = bar;
}

/// What starts each line this process writes on stderr (`[rank R] ` for a rank of a
/// data-parallel run).
pub fn rank_prefix() -> &'static str {
    RANK_PREFIX.get().map_or("", String::as_str)
}

struct StderrWriter;

impl Write for StderrWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bar = BAR.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let line = [rank_prefix().as_bytes(), buf].concat();
        match bar {
            Some(bar) => bar.suspend(|| std::io::stderr().write_all(&line))?,
            None => std::io::stderr().write_all(&line)?,
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

struct FileWriter;

impl Write for FileWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(f) = LOG_FILE.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            f.write_all(buf)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
