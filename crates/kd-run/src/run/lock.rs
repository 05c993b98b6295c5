//! Locks on a run directory, so that two processes never write the same files.
//!
//! `kd-run run` takes `locks/run.lock` exclusively. The `--only` processes of a job array share
//! a run directory by design: each takes `locks/run.lock` shared (so a whole run and they
//! exclude each other) and `locks/<stage>.lock` exclusively for each stage or specialist it
//! runs, and `locks/tables.lock` for the moment it reads, merges and writes the shared tables.
//! The locks are advisory file locks (`flock`), which the system releases when the process ends,
//! however it ends. Each holder writes its pid, host, start time and command line into the lock
//! file it holds exclusively, so that a process turned away can name it.

use anyhow::{bail, Context, Result};
use std::fs::{File, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The locks a run holds until it ends.
pub(super) struct RunLock {
    _files: Vec<File>,
}

/// Folder of the lock files in a run directory.
pub(super) const LOCKS: &str = "locks";

/// Takes the run directory `dir` for this process: exclusively, or when `only` names stages and
/// `exclusive` is false, shared, with an exclusive lock on each of those stages. Fails, naming
/// the holder, when another process holds what this one needs.
pub(super) fn acquire(dir: &Path, only: &[String], exclusive: bool, command: &str) -> Result<RunLock> {
    let folder = dir.join(LOCKS);
    std::fs::create_dir_all(&folder).with_context(|| format!("cannot create {}", folder.display()))?;
    let run_path = folder.join("run.lock");
    let mut run = open(&run_path)?;
    let holder = holder(command);
    if exclusive || only.is_empty() {
        match run.try_lock() {
            Ok(()) => write_holder(&mut run, &run_path, &holder)?,
            Err(TryLockError::WouldBlock) => {
                // Held shared: by `--only` processes, named in their stage locks (`run.lock` names
                // whichever whole run held it last). Held exclusively: by the one it names.
                let shared = File::open(&run_path).is_ok_and(|f| f.try_lock_shared().is_ok());
                let mut holders = if shared { stage_holders(&folder) } else { vec![read_holder(&run_path)] };
                holders.retain(|h| !h.is_empty());
                bail!(
                    "{} is in use by another kd-run process ({}); wait until it ends, or choose another --out",
                    dir.display(),
                    if holders.is_empty() { "holder unknown".into() } else { holders.join("; ") }
                );
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", run_path.display()))
            }
        }
        return Ok(RunLock { _files: vec![run] });
    }
    match run.try_lock_shared() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => bail!(
            "{} is in use by a kd-run process that runs the whole experiment ({}); wait until it ends",
            dir.display(),
            read_holder(&run_path)
        ),
        Err(TryLockError::Error(e)) => return Err(e).with_context(|| format!("cannot lock {}", run_path.display())),
    }
    let mut files = vec![run];
    for stage in only {
        let path = stage_lock(dir, stage);
        let mut file = open(&path)?;
        match file.try_lock() {
            Ok(()) => write_holder(&mut file, &path, &holder)?,
            Err(TryLockError::WouldBlock) => bail!(
                "--only {stage}: another kd-run process runs it in {} ({}); wait until it ends",
                dir.display(),
                read_holder(&path)
            ),
            Err(TryLockError::Error(e)) => return Err(e).with_context(|| format!("cannot lock {}", path.display())),
        }
        files.push(file);
    }
    Ok(RunLock { _files: files })
}

/// The lock file of a stage (or specialist `<stage>.<m>`) that an `--only` process runs.
pub(super) fn stage_lock(dir: &Path, stage: &str) -> PathBuf {
    dir.join(LOCKS).join(format!("{stage}.lock"))
}

/// Holds `locks/tables.lock` of `dir` (waiting for it) while `f` runs: the read, merge and write
/// of the shared tables.
pub(super) fn with_tables_lock<T>(dir: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let folder = dir.join(LOCKS);
    std::fs::create_dir_all(&folder).with_context(|| format!("cannot create {}", folder.display()))?;
    let path = folder.join("tables.lock");
    let file = open(&path)?;
    file.lock().with_context(|| format!("cannot lock {}", path.display()))?;
    let result = f();
    let _ = file.unlock();
    result
}

fn open(path: &Path) -> Result<File> {
    File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))
}

/// `pid P on HOST since TIME: COMMAND`.
fn holder(command: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "an unknown host".into());
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    format!("pid {} on {host} since {}: {command}", std::process::id(), utc(since))
}

fn write_holder(file: &mut File, path: &Path, holder: &str) -> Result<()> {
    let mut write = || -> std::io::Result<()> {
        file.set_len(0)?;
        file.rewind()?;
        file.write_all(format!("{holder}\n").as_bytes())?;
        file.sync_all()
    };
    write().with_context(|| format!("cannot write {}", path.display()))
}

fn read_holder(path: &Path) -> String {
    let mut text = String::new();
    let _ = File::open(path).and_then(|mut f| f.read_to_string(&mut text));
    text.trim().to_string()
}

/// The holders of the stage locks in `folder` that some process holds now.
fn stage_holders(folder: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(folder) else { return vec![] };
    let mut held = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".lock") || name == "run.lock" || name == "tables.lock" {
            continue;
        }
        let Ok(file) = File::open(entry.path()) else { continue };
        match file.try_lock_shared() {
            Ok(()) => {
                let _ = file.unlock();
            }
            Err(_) => held.push(read_holder(&entry.path())),
        }
    }
    held.sort();
    held
}

/// `YYYY-MM-DD HH:MM:SS UTC` for seconds since 1970 (the proleptic Gregorian calendar).
fn utc(seconds: u64) -> String {
    let (days, rest) = ((seconds / 86_400) as i64, seconds % 86_400);
    // Days to a civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", rest / 3600, rest / 60 % 60, rest % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_calendar_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_798_761_599), "2026-12-31 23:59:59 UTC");
    }

    /// `f()` once it succeeds, within a second. A lock lives as long as any descriptor of its open
    /// file: a child that another test of this process forks holds a copy of every descriptor
    /// until it execs (they are close-on-exec), so a released lock may take a moment to be free.
    fn eventually<T>(mut f: impl FnMut() -> Result<T>) -> T {
        for _ in 0..100 {
            if let Ok(v) = f() {
                return v;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        f().unwrap()
    }

    #[test]
    fn a_held_run_is_refused_naming_its_holder_and_only_processes_share_it() {
        let temp = crate::testutil::TempDir::new("lock");
        let dir = temp.0.clone();
        let only = |s: &str| vec![s.to_string()];
        let whole = acquire(&dir, &[], true, "kd-run run a.toml").unwrap();
        let err = acquire(&dir, &[], true, "second").err().unwrap().to_string();
        assert!(err.contains(&format!("pid {}", std::process::id())) && err.contains("kd-run run a.toml"), "{err}");
        let err = acquire(&dir, &only("x"), false, "third").err().unwrap().to_string();
        assert!(err.contains("runs the whole experiment") && err.contains("kd-run run a.toml"), "{err}");
        drop(whole);
        let x = eventually(|| acquire(&dir, &only("x"), false, "kd-run run a.toml --only x"));
        let _y = acquire(&dir, &only("y"), false, "kd-run run a.toml --only y").unwrap();
        let err = acquire(&dir, &only("x"), false, "again").err().unwrap().to_string();
        assert!(err.contains("--only x: another kd-run process runs it") && err.contains("--only x)"), "{err}");
        let err = acquire(&dir, &[], true, "whole").err().unwrap().to_string();
        assert!(err.contains("--only x") && err.contains("--only y"), "both holders named: {err}");
        drop(x);
        let err = eventually(|| match acquire(&dir, &[], true, "whole") {
            Err(e) if !e.to_string().contains("--only x") => Ok(e.to_string()),
            Err(e) => Err(e),
            Ok(_) => panic!("the whole run was let in while `--only y` runs"),
        });
        assert!(!err.contains("--only x") && err.contains("--only y"), "{err}");
    }
}
