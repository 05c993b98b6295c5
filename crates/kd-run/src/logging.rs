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

/// Installs the subscriber; `RUST_LOG` overrides the default `info` level.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
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

struct StderrWriter;

impl Write for StderrWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bar = BAR.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match bar {
            Some(bar) => bar.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
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
