//! The run directory `OUT/<name>/`: opened once per process, before anything is written: links
//! refused, the lock taken, `--fresh` applied, the earlier run's configuration compared, files a
//! killed process left half-written removed, and the tables read.

use super::lock;
use super::output;
use super::plan::{self, StageFacts};
use super::specialists;
use super::tables::{Tables, CLASS_ERRORS, COVERAGE, DONE, METRICS, SHIFTS, SPECIALISTS, SUBSETS, SUMMARY, TARGETS};
use crate::config::{Experiment, Job};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use tracing::info;

/// An open run directory: its place, the teacher cache beside it, its tables, and the lock this
/// process holds on it until the value is dropped.
pub struct RunDir {
    /// `OUT/<name>`.
    pub path: PathBuf,
    /// `OUT/.cache`: teachers' outputs over transfer sets, shared by the runs under `OUT`.
    pub cache: PathBuf,
    /// The tables as on disk, in the experiment's stage order.
    pub tables: Tables,
    /// Stages whose settings differ from the earlier run's, with the stages that read them.
    pub changed: Vec<String>,
    /// Of those, the specialists stages whose trained specialists stay: only how they are
    /// combined (`top_n`, `combine_iterations`) changed, so only the combination runs again.
    pub recombined: Vec<String>,
    /// The lock (none on the ranks of a data-parallel run that do not write).
    _lock: Option<lock::RunLock>,
}

/// How `kd-run run` was asked to treat an earlier run in the same directory.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options<'a> {
    /// `--fresh`: remove the earlier run's files first.
    pub fresh: bool,
    /// `--redo`: stages to run again from scratch.
    pub redo: &'a [String],
    /// `--only`: the stages this process runs.
    pub only: &'a [String],
}

impl RunDir {
    /// Opens (or creates) `out/<exp.name>` for `exp`, and records the resolved configuration and
    /// `command` in it. A second process into a directory in use fails here, before anything is
    /// written or removed; `--only` processes share it unless they also discard or rerun stages.
    pub fn open(exp: &Experiment, out: &Path, options: Options, command: &str) -> Result<RunDir> {
        let Options { fresh, redo, only } = options;
        let path = out.join(&exp.name);
        let config = exp.to_experiment_file();
        let config_path = path.join("config.toml");
        refuse_links(out, &path, !fresh)?;
        std::fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let exclusive = only.is_empty() || fresh || !redo.is_empty();
        let lock = lock::acquire(&path, only, exclusive, command)?;
        if fresh {
            // It removes links in the places of kd-run's files, never following them.
            remove_run_files(&path)?;
            refuse_links(out, &path, true)?;
        }
        let (mut changed, mut recombined) = (Vec::new(), Vec::new());
        if config_path.exists() {
            let old = std::fs::read_to_string(&config_path)?;
            if old != config {
                (changed, recombined) = changed_stages(exp, &old, &config_path).with_context(|| {
                    format!(
                        "{} holds a run of a different configuration; pass --fresh to replace it, or choose another --out",
                        path.display()
                    )
                })?;
            }
            info!("resuming the run in {}", path.display());
        }
        std::fs::create_dir_all(path.join("checkpoints"))
            .with_context(|| format!("cannot create {}", path.display()))?;
        let cache = out.join(".cache");
        std::fs::create_dir_all(&cache).with_context(|| format!("cannot create {}", cache.display()))?;
        crate::logging::log_to_file(&path.join("run.log"))?;
        remove_stale_temporaries(&path, (!exclusive).then_some(only))?;
        // A run directory without `done.csv` but with results is one written before stages were
        // committed with it: the stages with results count as done. A new run writes `done.csv`
        // before any result, so a stage killed while committing is never taken for one of those.
        let legacy = !path.join(DONE).exists() && {
            let old = Tables::read(&path)?;
            !old.summary.is_empty() || !old.subsets.is_empty()
        };
        output::write_atomic(&config_path, config.as_bytes())?;
        let hash = format!("{}  config.toml\n", super::provenance::sha256_hex(config.as_bytes()));
        output::write_atomic(&path.join(CONFIG_HASH), hash.as_bytes())?;
        output::write_atomic(&path.join("command.txt"), format!("{command}\n").as_bytes())?;

        let mut tables = Tables::read(&path)?.in_order(exp.stages.iter().map(|s| s.name.clone()).collect());
        tables.shared = true;
        if legacy {
            let done: Vec<String> =
                exp.stages.iter().map(|s| s.name.clone()).filter(|s| tables.has_results(s)).collect();
            for stage in done {
                tables.done.push(output::DoneRow { stage: stage.clone() });
                tables.touch(&stage);
            }
        }
        if !path.join(DONE).exists() {
            output::write_csv(&path.join(DONE), &tables.done)?;
        }
        Ok(RunDir { path, cache, tables, changed, recombined, _lock: Some(lock) })
    }

    /// What [`RunDir::open`] would find in `out/<exp.name>`, read without creating, locking or
    /// writing anything: the tables and the stages whose settings differ from the earlier
    /// run's (for `--dry-run`). `--fresh` reads as an empty directory.
    pub fn preview(exp: &Experiment, out: &Path, fresh: bool) -> Result<(Tables, Vec<String>)> {
        let path = out.join(&exp.name);
        let config_path = path.join("config.toml");
        if fresh || !config_path.exists() {
            return Ok((Tables::default(), Vec::new()));
        }
        let old = std::fs::read_to_string(&config_path)?;
        let changed = if old == exp.to_experiment_file() {
            Vec::new()
        } else {
            changed_stages(exp, &old, &config_path)
                .with_context(|| {
                    format!(
                        "{} holds a run of a different configuration; pass --fresh to replace it, or choose another --out",
                        path.display()
                    )
                })?
                .0
        };
        let tables = Tables::read(&path)?.in_order(exp.stages.iter().map(|s| s.name.clone()).collect());
        Ok((tables, changed))
    }

    /// The run directory as a rank of a data-parallel run that does not write sees it, once
    /// rank 0 has opened it ([`RunDir::open`]) and applied its plan's discards: the tables as
    /// on disk, nothing created, locked or removed.
    pub fn follow(exp: &Experiment, out: &Path) -> Result<RunDir> {
        let path = out.join(&exp.name);
        if !path.join("config.toml").exists() {
            bail!(
                "{} has no config.toml after rank 0 opened it: every rank must see the same --out (a file system \
                 shared by the machines)",
                path.display()
            );
        }
        let tables = Tables::read(&path)?.in_order(exp.stages.iter().map(|s| s.name.clone()).collect());
        Ok(RunDir { path, cache: out.join(".cache"), tables, changed: Vec::new(), recombined: Vec::new(), _lock: None })
    }
}

impl RunDir {
    /// Compares the data as loaded now (`fingerprints`, [`crate::data::Dataset::fingerprints`])
    /// with those an earlier invocation of the run recorded in [`DATA_FINGERPRINTS`], then records
    /// them. Data that changed under the same configuration (a store rewritten in place, other
    /// files at the same paths) would leave the stages already done, trained on the old data,
    /// standing beside stages trained on the new: that fails, naming what changed, unless nothing
    /// of the run is kept yet (no stage done, no checkpoint).
    pub fn check_data(&self, fingerprints: &[(&str, i64)]) -> Result<()> {
        let path = self.path.join(DATA_FINGERPRINTS);
        let now: String = fingerprints.iter().map(|(what, hash)| format!("{:016x}  {what}\n", *hash as u64)).collect();
        let recorded = match std::fs::read_to_string(&path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        if recorded.as_deref() == Some(now.as_str()) {
            return Ok(());
        }
        if let Some(old) = &recorded {
            if let Some(kept) = self.kept() {
                let parse = |text: &str| -> Vec<(String, String)> {
                    text.lines()
                        .filter_map(|l| l.split_once("  "))
                        .map(|(hash, what)| (what.to_string(), hash.to_string()))
                        .collect()
                };
                let (old, new) = (parse(old), parse(&now));
                let mut differences: Vec<String> = new
                    .iter()
                    .filter(|entry| !old.contains(entry))
                    .map(|(what, hash)| match old.iter().find(|(w, _)| w == what) {
                        Some((_, before)) => format!("{what} (fingerprint {before} recorded, {hash} now)"),
                        None => format!("{what} (not recorded before)"),
                    })
                    .collect();
                differences.extend(
                    old.iter()
                        .filter(|(what, _)| !new.iter().any(|(w, _)| w == what))
                        .map(|(what, _)| format!("{what} (recorded, not read now)")),
                );
                bail!(
                    "{}: the data differ from those the run recorded ({}): {}. Its {kept} came from the old data, and \
                     stages run now would train on the new; pass --fresh to run every stage again on these data, or \
                     choose another --out",
                    self.path.display(),
                    DATA_FINGERPRINTS,
                    differences.join("; ")
                );
            }
        }
        output::write_atomic(&path, now.as_bytes())
    }

    /// What the run keeps from earlier invocations, if anything: done stages, checkpoints.
    fn kept(&self) -> Option<String> {
        let done: Vec<&str> = self.tables.done.iter().map(|d| d.stage.as_str()).collect();
        if !done.is_empty() {
            return Some(format!("stages done ({})", done.join(", ")));
        }
        let checkpoint = std::fs::read_dir(self.path.join("checkpoints"))
            .into_iter()
            .flatten()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().ends_with(".safetensors"));
        checkpoint.map(|e| format!("checkpoint {}", e.path().display()))
    }
}

/// The fingerprints of the data the run read, one line each (`<16 hex digits>  <what>`, the
/// first 8 bytes of a SHA-256): [`RunDir::check_data`] compares them at the next invocation.
pub const DATA_FINGERPRINTS: &str = "data.fingerprints";

/// What the plan needs to know of each stage of `exp`.
pub fn stage_facts(exp: &Experiment) -> Vec<StageFacts> {
    exp.stages
        .iter()
        .map(|s| StageFacts {
            name: s.name.clone(),
            reads: s.job.reads().into_iter().map(String::from).collect(),
            trains: matches!(s.job, Job::Train(_) | Job::Distill(_)),
            specialists: matches!(s.job, Job::Specialists(_)),
        })
        .collect()
}

/// The SHA-256 of the run's `config.toml`, written beside it (`<hex>  config.toml`, as
/// `sha256sum` writes it): `kd-run report` refuses a `config.toml` edited after the run.
pub const CONFIG_HASH: &str = "config.sha256";

/// The files a run writes at the top of its run directory (`run.log` aside, which `--fresh`
/// keeps and appends to).
pub const RUN_FILES: [&str; 13] = [
    "config.toml",
    CONFIG_HASH,
    DATA_FINGERPRINTS,
    "command.txt",
    METRICS,
    SUMMARY,
    CLASS_ERRORS,
    SHIFTS,
    SUBSETS,
    SPECIALISTS,
    COVERAGE,
    TARGETS,
    DONE,
];

/// kd-run writes only inside `--out` and follows no link out of it: the run directory, the
/// folders and the files it writes into or appends to must not be symbolic links (a link at a
/// place kd-run has not written yet would send its writes wherever the link points).
/// `all: false` leaves out the places whose links `--fresh` removes.
fn refuse_links(out: &Path, dir: &Path, all: bool) -> Result<()> {
    let mut places: Vec<PathBuf> =
        vec![dir.to_path_buf(), out.join(".cache"), dir.join(lock::LOCKS), dir.join("run.log")];
    places.extend(std::fs::read_dir(dir.join(lock::LOCKS)).into_iter().flatten().flatten().map(|e| e.path()));
    if all {
        places.extend(
            ["checkpoints", "specialists", super::events::FOLDER]
                .iter()
                .chain(RUN_FILES.iter())
                .map(|name| dir.join(name)),
        );
        for folder in [dir.join("specialists"), dir.join("checkpoints"), dir.join(super::events::FOLDER)] {
            places.extend(std::fs::read_dir(&folder).into_iter().flatten().flatten().map(|e| e.path()));
        }
    }
    for place in places {
        if std::fs::symlink_metadata(&place).is_ok_and(|m| m.file_type().is_symlink()) {
            bail!(
                "{} is a symbolic link: kd-run writes only inside --out and follows no link out of it; \
                 replace it with a real folder or file, or choose another --out",
                place.display()
            );
        }
    }
    Ok(())
}

/// Removes the temporary files (`<file>.<pid>.tmp`) that a process killed while writing left in
/// the run directory, its `checkpoints/` and its specialists' folders; for an `--only` process
/// (`only` given), which shares the directory, only those of the stages it runs (their
/// checkpoints and specialist folders).
fn remove_stale_temporaries(dir: &Path, only: Option<&[String]>) -> Result<()> {
    let mut folders = vec![(dir.to_path_buf(), only.is_none()), (dir.join("checkpoints"), only.is_none())];
    if let Ok(entries) = std::fs::read_dir(dir.join("specialists")) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type().is_ok_and(|t| t.is_dir()) && specialists::is_specialist_folder(&name) {
                folders.push((entry.path(), only.is_none_or(|o| o.contains(&name))));
            }
        }
    }
    // An `--only` process's own checkpoints: `<stage>[.resume|.best].safetensors.<pid>.tmp`.
    let own_checkpoint = |name: &str| {
        only.unwrap_or_default().iter().any(|stage| {
            ["", ".resume", ".best"].iter().any(|kind| name.starts_with(&format!("{stage}{kind}.safetensors.")))
        })
    };
    for (folder, all) in folders {
        let Ok(entries) = std::fs::read_dir(&folder) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = all || (folder.ends_with("checkpoints") && own_checkpoint(&name));
            if ours && output::is_tmp(&name) && entry.file_type().is_ok_and(|t| !t.is_dir()) {
                info!("removing {}, left by a run that was stopped while writing it", entry.path().display());
                std::fs::remove_file(entry.path())
                    .with_context(|| format!("cannot remove {}", entry.path().display()))?;
            }
        }
    }
    Ok(())
}

/// What `--fresh` removes: the files of [`RUN_FILES`], the checkpoints (`*.safetensors`) in
/// `checkpoints/`, the TensorBoard event files in `tensorboard/`, the files kd-run writes in each `specialists/<stage>.<m>/`, and temporary
/// files beside any of them; then those folders if that left them empty. Anything else (a file
/// of the user's, a folder kd-run did not make) stays, and a symbolic link is never followed:
/// one in the place of a file or folder of the run is removed as a link, its target untouched.
/// A run directory that is itself a symbolic link is refused.
fn remove_run_files(dir: &Path) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(dir) else { return Ok(()) };
    if meta.file_type().is_symlink() {
        bail!("--fresh: {} is a symbolic link; kd-run deletes nothing outside its own run directory", dir.display());
    }
    let remove_file = |path: &Path| -> Result<()> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("--fresh: cannot remove {}", path.display()))
            }
            _ => Ok(()),
        }
    };
    // Removes the files of `folder` that `ours` accepts (a link in the place of the folder:
    // the link), then the folder if it is empty.
    let clear = |folder: &Path, ours: &dyn Fn(&str, &std::fs::FileType) -> Result<()>| -> Result<()> {
        let Ok(meta) = std::fs::symlink_metadata(folder) else { return Ok(()) };
        if !meta.is_dir() {
            return remove_file(folder);
        }
        for entry in std::fs::read_dir(folder)? {
            let entry = entry?;
            ours(&entry.file_name().to_string_lossy(), &entry.file_type()?)?;
        }
        let _ = std::fs::remove_dir(folder);
        Ok(())
    };
    for name in RUN_FILES {
        let path = dir.join(name);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| !m.is_dir()) {
            remove_file(&path)?;
        }
    }
    let checkpoints = dir.join("checkpoints");
    clear(&checkpoints, &|name, kind| {
        if !kind.is_dir() && (name.ends_with(".safetensors") || output::is_tmp(name)) {
            remove_file(&checkpoints.join(name))?;
        }
        Ok(())
    })?;
    let events = dir.join(super::events::FOLDER);
    clear(&events, &|name, kind| {
        if !kind.is_dir() && name.starts_with(super::events::FILE_PREFIX) {
            remove_file(&events.join(name))?;
        }
        Ok(())
    })?;
    let specialists = dir.join("specialists");
    clear(&specialists, &|name, kind| {
        let folder = specialists.join(name);
        if kind.is_symlink() {
            return remove_file(&folder);
        }
        if kind.is_dir() && specialists::is_specialist_folder(name) {
            clear(&folder, &|file, kind| {
                if !kind.is_dir() && (specialists::SPECIALIST_FILES.contains(&file) || output::is_tmp(file)) {
                    remove_file(&folder.join(file))?;
                }
                Ok(())
            })?;
        }
        Ok(())
    })
}

/// The stages whose settings in `exp` differ from those of an earlier run's record `old` (the
/// text of its `config.toml` at `path`, in either form: [`crate::config::read_record`]), compared
/// resolved (the reference numbers under `paper` and the sweep point aside), together with every stage that
/// reads a model from one of them; and, of those, the specialists stages that differ only in how
/// their specialists are combined (which keep their trained specialists). Fails when what every
/// stage depends on (the data, the seed) changed, or when `old` cannot be read.
fn changed_stages(exp: &Experiment, old: &str, path: &Path) -> Result<(Vec<String>, Vec<String>)> {
    let old = crate::config::read_record(old, path).context("the earlier run's config.toml cannot be read")?;
    let old: toml::Table = old.to_toml()?.parse().context("the earlier run's configuration is not valid TOML")?;
    let new: toml::Table = exp.to_toml()?.parse().context("the resolved configuration is not valid TOML")?;
    for key in ["seed", "data"] {
        if old.get(key) != new.get(key) {
            bail!("its `{key}` differs, and every stage depends on it");
        }
    }
    // What describes a stage rather than sets it: the paper's numbers, the sweep point (which runs
    // recorded before it existed lack); and, for its trained models, how specialists are combined.
    const DESCRIPTIVE: [&str; 2] = ["paper", "sweep"];
    const COMBINATION: [&str; 2] = ["top_n", "combine_iterations"];
    let stage_settings = |table: &toml::Table, name: &str, ignored: &[&str]| -> Option<toml::Value> {
        let stages = table.get("stages")?.as_array()?;
        let mut stage = stages.iter().find(|s| s.get("name").and_then(|n| n.as_str()) == Some(name))?.clone();
        for key in ignored {
            stage.as_table_mut()?.remove(*key);
        }
        Some(stage)
    };
    let differ = |ignored: &[&str]| -> Vec<String> {
        let stages = exp.stages.iter().filter(|s| {
            stage_settings(&old, &s.name, ignored).is_none_or(|o| Some(o) != stage_settings(&new, &s.name, ignored))
        });
        plan::with_readers(&stage_facts(exp), &stages.map(|s| s.name.clone()).collect::<Vec<_>>())
    };
    let changed = differ(&DESCRIPTIVE);
    let retrained = differ(&[DESCRIPTIVE, COMBINATION].concat());
    let recombined = exp
        .stages
        .iter()
        .filter(|s| matches!(s.job, Job::Specialists(_)) && changed.contains(&s.name) && !retrained.contains(&s.name))
        .map(|s| s.name.clone())
        .collect();
    Ok((changed, recombined))
}
