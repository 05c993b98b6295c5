//! The CSV tables of a run directory in memory: read at start, changed by the stages, written
//! atomically, and committed stage by stage (`done.csv` last).

use super::lock;
use super::output::{
    self, ClassErrorsRow, CoverageRow, DoneRow, MetricsRow, ShiftRow, SpecialistRow, SubsetRow, SummaryRow,
};
use super::plan::Recorded;
use anyhow::Result;
use std::path::{Path, PathBuf};

/// The CSV tables of a run, each rewritten atomically when it changes: after each epoch (its
/// `metrics.csv` row), and when a stage commits its results ([`Tables::commit`]), each table
/// once, `done.csv` last.
#[derive(Default)]
pub struct Tables {
    pub metrics: Vec<MetricsRow>,
    pub summary: Vec<SummaryRow>,
    pub class_errors: Vec<ClassErrorsRow>,
    pub shifts: Vec<ShiftRow>,
    pub subsets: Vec<SubsetRow>,
    pub specialists: Vec<SpecialistRow>,
    pub coverage: Vec<CoverageRow>,
    /// The stages whose results are committed (`done.csv`): a stage's rows count only once it
    /// is listed here, so a run killed while a stage committed drops the stage's rows and runs it
    /// again.
    pub done: Vec<DoneRow>,
    /// The experiment's stage names in file order: `write` keeps the per-model rows in this
    /// order, so a stage that ran again does not move to the end.
    pub order: Vec<String>,
    /// The stages whose rows this process changed (forgot, added, committed): [`Tables::write`]
    /// writes theirs and keeps every other stage's rows as they are on disk, where another
    /// `--only` process may have written them since.
    pub touched: Vec<String>,
    /// Whether other processes may write these tables too (the run directory's, not a
    /// specialist's own): `write` then reads, merges and writes them under `locks/tables.lock`.
    pub shared: bool,
}

pub const METRICS: &str = "metrics.csv";
pub const SUMMARY: &str = "summary.csv";
pub const CLASS_ERRORS: &str = "class_errors.csv";
pub const SHIFTS: &str = "bias_shifts.csv";
pub const SUBSETS: &str = "subsets.csv";
pub const SPECIALISTS: &str = "specialists.csv";
pub const COVERAGE: &str = "specialist_coverage.csv";
pub const DONE: &str = "done.csv";
/// The top-k targets file a run streams and what it keeps (`output::TargetsRow`).
pub const TARGETS: &str = "targets.csv";

impl Tables {
    pub fn read(dir: &Path) -> Result<Self> {
        Ok(Tables {
            metrics: output::read_csv(&dir.join(METRICS))?,
            summary: output::read_csv(&dir.join(SUMMARY))?,
            class_errors: output::read_csv(&dir.join(CLASS_ERRORS))?,
            shifts: output::read_csv(&dir.join(SHIFTS))?,
            subsets: output::read_csv(&dir.join(SUBSETS))?,
            specialists: output::read_csv(&dir.join(SPECIALISTS))?,
            coverage: output::read_csv(&dir.join(COVERAGE))?,
            done: output::read_csv(&dir.join(DONE))?,
            order: Vec::new(),
            touched: Vec::new(),
            shared: false,
        })
    }

    /// Sets the experiment's stage order, and reads the rows of files written before rows had
    /// a `variant` column by it (`<stage>-fixed` is the fixed variant of `<stage>`).
    pub fn in_order(mut self, order: Vec<String>) -> Self {
        let summary = self.summary.iter_mut().map(|r| (&mut r.stage, &mut r.variant));
        output::read_variants_from_names(summary, &order);
        let class_errors = self.class_errors.iter_mut().map(|r| (&mut r.stage, &mut r.variant));
        output::read_variants_from_names(class_errors, &order);
        self.order = order;
        self
    }

    pub fn touch(&mut self, stage: &str) {
        if !self.touched.iter().any(|t| t == stage) {
            self.touched.push(stage.to_string());
        }
    }

    /// Replaces the rows of the stages this process did not touch by those on disk.
    fn merge_from_disk(&mut self, dir: &Path) -> Result<()> {
        let disk = Tables::read(dir)?.in_order(self.order.clone());
        let touched = &self.touched;
        let mine = |stage: &str| touched.iter().any(|t| t == stage);
        fn merge<T>(mine: &dyn Fn(&str) -> bool, memory: &mut Vec<T>, disk: Vec<T>, stage: fn(&T) -> &str) {
            let mut rows: Vec<T> = disk.into_iter().filter(|r| !mine(stage(r))).collect();
            rows.extend(memory.drain(..).filter(|r| mine(stage(r))));
            *memory = rows;
        }
        merge(&mine, &mut self.metrics, disk.metrics, |r| &r.stage);
        merge(&mine, &mut self.summary, disk.summary, |r| &r.stage);
        merge(&mine, &mut self.class_errors, disk.class_errors, |r| &r.stage);
        merge(&mine, &mut self.shifts, disk.shifts, |r| &r.stage);
        merge(&mine, &mut self.subsets, disk.subsets, |r| &r.stage);
        merge(&mine, &mut self.specialists, disk.specialists, |r| &r.stage);
        merge(&mine, &mut self.coverage, disk.coverage, |r| &r.stage);
        merge(&mine, &mut self.done, disk.done, |r| &r.stage);
        Ok(())
    }

    /// Writes the tables; those of the specialist stages only once they have rows. The per-model
    /// rows go in the order of their stages in the file, a stage's variants after its own rows.
    pub fn write(&mut self, dir: &Path) -> Result<()> {
        if !crate::dist::world().is_writer() {
            return Ok(());
        }
        if self.shared {
            lock::with_tables_lock(dir, || {
                self.merge_from_disk(dir)?;
                self.write_files(dir)
            })
        } else {
            self.write_files(dir)
        }
    }

    fn write_files(&mut self, dir: &Path) -> Result<()> {
        let order = &self.order;
        let rank = |stage: &str| order.iter().position(|s| s == stage).unwrap_or(usize::MAX);
        self.summary.sort_by(|a, b| (rank(&a.stage), &a.variant).cmp(&(rank(&b.stage), &b.variant)));
        self.class_errors.sort_by(|a, b| (rank(&a.stage), &a.variant).cmp(&(rank(&b.stage), &b.variant)));
        self.done.sort_by_key(|r| rank(&r.stage));
        output::write_csv_if_changed(&dir.join(METRICS), &self.metrics)?;
        output::write_csv_if_changed(&dir.join(SUMMARY), &self.summary)?;
        output::write_csv_if_changed(&dir.join(CLASS_ERRORS), &self.class_errors)?;
        output::write_csv_if_changed(&dir.join(SHIFTS), &self.shifts)?;
        fn some<T: serde::Serialize>(path: PathBuf, rows: &[T]) -> Result<()> {
            if rows.is_empty() && !path.exists() {
                return Ok(());
            }
            output::write_csv_if_changed(&path, rows)
        }
        some(dir.join(SUBSETS), &self.subsets)?;
        some(dir.join(SPECIALISTS), &self.specialists)?;
        some(dir.join(COVERAGE), &self.coverage)?;
        // Last: the stages it lists are those whose rows above are complete.
        some(dir.join(DONE), &self.done)
    }

    /// Commits a stage's results: marks it done and writes every table, `done.csv` last.
    pub fn commit(&mut self, stage: &str, dir: &Path) -> Result<()> {
        self.touch(stage);
        if !self.is_done(stage) {
            self.done.push(DoneRow { stage: stage.to_string() });
        }
        self.write(dir)
    }

    /// Whether a stage's results are committed.
    pub fn is_done(&self, stage: &str) -> bool {
        self.done.iter().any(|r| r.stage == stage)
    }

    /// Whether a stage's results are recorded.
    pub fn has_results(&self, stage: &str) -> bool {
        self.summary.iter().any(|r| r.stage == stage) || self.subsets.iter().any(|r| r.stage == stage)
    }

    /// What the tables hold, as the run's plan needs it.
    pub fn recorded(&self) -> Recorded {
        let mut rows: Vec<String> = self
            .summary
            .iter()
            .map(|r| r.stage.clone())
            .chain(self.metrics.iter().map(|r| r.stage.clone()))
            .chain(self.subsets.iter().map(|r| r.stage.clone()))
            .chain(self.coverage.iter().map(|r| r.stage.clone()))
            .chain(self.done.iter().map(|r| r.stage.clone()))
            .collect();
        rows.sort();
        rows.dedup();
        Recorded {
            done: self.done.iter().map(|r| r.stage.clone()).collect(),
            results: rows.iter().filter(|s| self.has_results(s)).cloned().collect(),
            rows,
        }
    }

    /// Forgets a stage's results (its summary and per-class rows, of every variant, its subset
    /// and specialist rows), not its epochs.
    pub fn forget_results(&mut self, stage: &str) {
        self.touch(stage);
        self.summary.retain(|r| r.stage != stage);
        self.class_errors.retain(|r| r.stage != stage);
        self.subsets.retain(|r| r.stage != stage);
        self.specialists.retain(|r| r.stage != stage);
        self.coverage.retain(|r| r.stage != stage);
        self.done.retain(|r| r.stage != stage);
    }

    /// Forgets what an unfinished stage recorded beyond `epoch`.
    pub fn forget(&mut self, stage: &str, epoch: i64) {
        self.metrics.retain(|r| r.stage != stage || r.epoch <= epoch);
        self.forget_results(stage);
        self.shifts.retain(|r| r.stage != stage);
    }
}
