//! Experiment files: parsing, validation with file/line errors, `--set` overrides, resolution of
//! defaults into a fully explicit [`Experiment`] (what `config.toml` of a run records).
//!
//! Validation happens while deserializing: range-checked newtypes ([`Positive`], [`Rate`], ...)
//! reject a bad value with the TOML parser's own line and column, and `deny_unknown_fields`
//! rejects misspelled keys the same way. Checks across fields (a stage's kind versus its keys,
//! references to earlier stages) point at the stage's `name` line.

/// Fails with `LINE: stage `NAME`: MESSAGE` (the caller prefixes the file name).
macro_rules! stage_bail {
    ($text:expr, $stage:expr, $($arg:tt)*) => {
        anyhow::bail!("{}: stage `{}`: {}", $crate::config::raw::line_of($text, $stage.name.span().start), $stage.name.get_ref(), format!($($arg)*))
    };
}

#[cfg(test)]
mod doc_tests;
mod experiment;
mod limits;
mod names;
mod paths;
mod raw;
mod record;
mod resolve;
pub(crate) mod speech;
mod sweep;
#[cfg(test)]
mod tests;
mod values;

pub use experiment::*;
pub use limits::*;
pub use record::read_record;
pub use speech::CorpusConfig;

use anyhow::{Context, Result};
use raw::{apply_override, toml_error, RawExperiment};
use resolve::resolve;
use std::path::Path;

/// Reads, overrides, validates and resolves an experiment file.
///
/// Relative paths in the file (`data.dir`, `data.store.dir`, `data.files`, checkpoints) are
/// taken relative to the folder the file is in; those of `--set` values relative to the working
/// directory, like the path of the file itself. The experiment returned holds them absolute.
pub fn load(path: &Path, overrides: &[String]) -> Result<Experiment> {
    // A pipe or a device would block or never end: only regular files (or links to them).
    crate::inputs::check_file(path, "experiment file")?;
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut origin = path.display().to_string();
    let cwd = std::env::current_dir().context("cannot read the working directory")?;
    // A `config.toml` in the form runs wrote before it was an experiment file: read as the
    // experiment file it stands for, and checked as one.
    let text = match toml::from_str::<RawExperiment>(&text) {
        Err(_) if record::read_resolved_form(&text, &cwd).is_some() => {
            origin = format!("{origin} (a run's record in its earlier form, read as an experiment file)");
            record::read_resolved_form(&text, &cwd).map(|e| e.to_experiment_file()).unwrap_or_default()
        }
        _ => text,
    };
    let base = paths::absolute(&cwd, path.parent().unwrap_or(Path::new("")));
    // The file as written first, so that its errors carry its own line numbers.
    let raw: RawExperiment = toml::from_str(&text).map_err(|e| toml_error(&origin, &text, &e))?;
    let (raw, text, origin) = if overrides.is_empty() {
        (raw, text, origin)
    } else {
        let mut doc: toml::Table = toml::from_str(&text).map_err(|e| toml_error(&origin, &text, &e))?;
        for o in overrides {
            apply_override(&mut doc, o, &cwd).with_context(|| format!("--set `{o}`"))?;
        }
        let text = toml::to_string(&doc)?;
        let quoted: Vec<String> = overrides.iter().map(|o| format!("`{o}`")).collect();
        let origin = format!("{origin} with --set {}", quoted.join(" "));
        let raw = toml::from_str(&text).map_err(|e| toml_error(&origin, &text, &e))?;
        (raw, text, origin)
    };
    let mut raw = raw;
    raw.resolve_paths(&base);
    resolve(raw, &text).map_err(|e| {
        if overrides.is_empty() {
            anyhow::anyhow!("{origin}:{e}")
        } else {
            // Line numbers of the file rewritten with the overrides would point nowhere the user
            // can look: the message names the key instead.
            let e = e.to_string();
            let message = e.split_once(": ").filter(|(n, _)| n.parse::<usize>().is_ok()).map_or(e.as_str(), |(_, m)| m);
            anyhow::anyhow!("{origin}: {message}")
        }
    })
}
