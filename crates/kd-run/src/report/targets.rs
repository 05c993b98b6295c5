//! The report's section on top-k targets: for runs that streamed a teacher's top-k targets from
//! a frame store (`data.store.targets`), how much of the teacher's probability mass at T those
//! targets keep, from the run directory's `targets.csv` (the file's header as the run read it).

use crate::config::DataSource;
use crate::run::output::{self, TargetsRow};
use anyhow::Result;
use std::fmt::Write as _;
use std::path::Path;

/// What a run directory says of the top-k targets its run streamed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recorded {
    /// The targets file `config.toml` names (`data.store.targets`), if any.
    pub configured: Option<String>,
    /// The rows of `targets.csv` (none for a run made before kd-run recorded them).
    pub rows: Vec<TargetsRow>,
}

/// Reads `dir/targets.csv` for a run whose data source is `source`.
pub fn read(dir: &Path, source: &DataSource) -> Result<Recorded> {
    let configured = match source {
        DataSource::Store(s) => s.targets.clone(),
        _ => None,
    };
    let rows = output::read_csv(&dir.join(crate::run::TARGETS))?;
    Ok(Recorded { configured, rows })
}

/// The section, when some run of `runs` (name, record) streamed top-k targets; nothing else.
pub fn section(md: &mut String, runs: &[(&str, &Recorded)]) -> Result<()> {
    let streamed: Vec<&(&str, &Recorded)> =
        runs.iter().filter(|(_, r)| r.configured.is_some() || !r.rows.is_empty()).collect();
    if streamed.is_empty() {
        return Ok(());
    }
    writeln!(md, "### Top-k targets: the teacher's probability mass they keep\n")?;
    writeln!(
        md,
        "Top-k targets keep a teacher's k most probable classes per frame at T, renormalized over them. \
         The share of the teacher's probability mass at T those k hold (before the renormalization; 1 - share is \
         what the targets leave out) over the file's frames, from its header: the mean, the median, the 5th and \
         1st percentiles (to 1e-4) and the smallest.\n"
    )?;
    writeln!(md, "| run | targets | k | T | frames | mean | median | 5th pct | 1st pct | min |")?;
    writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    let mut notes = Vec::new();
    let cell = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.4}"));
    for (name, r) in &streamed {
        if r.rows.is_empty() {
            notes.push(format!(
                "`{name}` streamed `{}` but its run directory has no `targets.csv` (a run made before kd-run \
                 recorded it): run it again to record it",
                r.configured.as_deref().unwrap_or_default()
            ));
            continue;
        }
        for row in &r.rows {
            let file = Path::new(&row.file).file_name().map_or(row.file.clone(), |f| f.to_string_lossy().into_owned());
            writeln!(
                md,
                "| `{name}` | `{file}` | {} | {} | {} | {} | {} | {} | {} | {} |",
                row.k,
                row.temperature,
                row.frames,
                cell(row.kept_mean),
                cell(row.kept_p50),
                cell(row.kept_p5),
                cell(row.kept_p1),
                cell(row.kept_min)
            )?;
            if row.kept_mean.is_none() {
                notes.push(format!(
                    "`{}` (run `{name}`) is a version 2 targets file, which does not record the mass it keeps: \
                     compute it again with `kd-run store targets`",
                    row.file
                ));
            }
        }
    }
    writeln!(md)?;
    for note in notes {
        writeln!(md, "> {note}.\n")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(mean: Option<f64>) -> TargetsRow {
        TargetsRow {
            file: "/stores/s/train/teacher.kdt".into(),
            k: 10,
            temperature: 2.0,
            frames: 1234,
            kept_mean: mean,
            kept_p50: mean.map(|m| m + 0.01),
            kept_p5: mean.map(|m| m - 0.1),
            kept_p1: mean.map(|m| m - 0.2),
            kept_min: mean.map(|m| m - 0.3),
        }
    }

    #[test]
    fn the_section_shows_each_run_s_kept_mass_and_says_what_is_not_recorded() {
        let mut md = String::new();
        section(&mut md, &[("plain", &Recorded::default())]).unwrap();
        assert!(md.is_empty(), "no section without top-k targets: {md}");
        let recorded = Recorded { configured: Some("teacher.kdt".into()), rows: vec![row(Some(0.9))] };
        let old_file = Recorded { configured: Some("teacher.kdt".into()), rows: vec![row(None)] };
        let old_run = Recorded { configured: Some("old.kdt".into()), rows: vec![] };
        section(&mut md, &[("a", &recorded), ("b", &old_file), ("c", &old_run), ("d", &Recorded::default())]).unwrap();
        assert!(
            md.contains("| `a` | `teacher.kdt` | 10 | 2 | 1234 | 0.9000 | 0.9100 | 0.8000 | 0.7000 | 0.6000 |\n"),
            "{md}"
        );
        assert!(md.contains("| `b` | `teacher.kdt` | 10 | 2 | 1234 | – | – | – | – | – |\n"), "{md}");
        assert!(md.contains("(run `b`) is a version 2 targets file"), "{md}");
        assert!(md.contains("`c` streamed `old.kdt` but its run directory has no `targets.csv`"), "{md}");
        assert!(!md.contains("`d`"), "{md}");
    }
}
