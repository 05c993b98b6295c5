//! Training progress: a bar with epoch, loss and ETA on a terminal; one log line per epoch always.

use super::output::MetricsRow;
use indicatif::{ProgressBar, ProgressStyle};
use std::cell::Cell;
use std::io::IsTerminal;
use tracing::info;

/// Progress of one stage.
pub struct Progress {
    bar: Option<ProgressBar>,
    /// (epoch, running loss) shown in the message, to redraw it only when it changes.
    shown: Cell<(u64, Option<f64>)>,
    stage: String,
    epochs: u64,
    steps_per_epoch: u64,
    /// Seconds and count of the epochs this process has finished, for the log line's ETA.
    timed: Cell<(f64, u64)>,
}

impl Progress {
    /// Starts the display for `epochs` epochs, `first_epoch` of which are already done.
    pub fn new(stage: &str, epochs: u64, steps_per_epoch: u64, first_epoch: u64) -> Self {
        let shown = std::io::stderr().is_terminal() && crate::dist::world().is_writer() && !crate::logging::quiet();
        let bar = shown.then(|| {
            let bar = ProgressBar::new(epochs * steps_per_epoch);
            let style = ProgressStyle::with_template("{prefix} {msg} [{bar:30}] {percent:>3}% {elapsed}<{eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(stage.to_string());
            bar.set_position(first_epoch * steps_per_epoch);
            bar.set_message(format!("epoch {}/{epochs}", first_epoch + 1));
            crate::logging::set_bar(Some(bar.clone()));
            bar
        });
        Progress {
            bar,
            shown: Cell::new((first_epoch, None)),
            stage: stage.to_string(),
            epochs,
            steps_per_epoch,
            timed: Cell::new((0.0, 0)),
        }
    }

    /// After `step` steps of 0-based `epoch`; `loss` is the running mean when it was read.
    pub fn step(&self, epoch: u64, step: u64, loss: Option<f64>) {
        if let Some(bar) = &self.bar {
            bar.set_position(epoch * self.steps_per_epoch + step);
            let (shown_epoch, shown_loss) = self.shown.get();
            if loss.is_some() || epoch != shown_epoch {
                let loss = loss.or(shown_loss);
                self.shown.set((epoch, loss));
                let loss = loss.map_or(String::new(), |l| format!(" loss {l:.4}"));
                bar.set_message(format!("epoch {}/{}{loss}", epoch + 1, self.epochs));
            }
        }
    }

    /// Logs the finished epoch's line, with the time the stage's remaining epochs should take
    /// at the mean pace of the epochs this process has run.
    pub fn epoch_done(&self, row: &MetricsRow, peak_tflops: Option<f64>) {
        let (seconds, count) = self.timed.get();
        let (seconds, count) = (seconds + row.seconds, count + 1);
        self.timed.set((seconds, count));
        let left = self.epochs.saturating_sub(row.epoch as u64);
        let eta =
            if left > 0 { format!(", {} left", duration(left as f64 * seconds / count as f64)) } else { String::new() };
        // The next epoch's message starts from this epoch's mean loss.
        self.shown.set((row.epoch as u64 - 1, Some(row.train_loss)));
        let kl = row.soft_kl.map_or(String::new(), |k| format!(" soft_kl {k:.4}"));
        let val = row.val_accuracy.map_or(String::new(), |a| format!(" val_acc {:.4}", a));
        let test = row.test_errors.map_or(String::new(), |e| format!(" test_errors {e}"));
        let speed = match (row.examples_per_second, row.tflops) {
            (Some(n), Some(t)) => {
                let share = peak_tflops.map_or(String::new(), |p| format!(", {:.1}% of peak", 100.0 * t / p));
                format!(", {n:.0} ex/s, {t:.3} TFLOP/s{share}")
            }
            _ => String::new(),
        };
        info!(
            "{} epoch {}/{} lr {:.4} loss {:.4}{kl} train_acc {:.4}{val}{test} ({:.1}s{speed}{eta})",
            self.stage, row.epoch, self.epochs, row.lr, row.train_loss, row.train_accuracy, row.seconds
        );
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
            crate::logging::set_bar(None);
        }
    }
}

/// A duration for a log line: `42s`, `5m07s`, `2h04m`.
fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::duration;

    #[test]
    fn durations_read_as_hours_minutes_and_seconds() {
        assert_eq!(duration(0.4), "0s");
        assert_eq!(duration(42.0), "42s");
        assert_eq!(duration(59.6), "1m00s");
        assert_eq!(duration(307.0), "5m07s");
        assert_eq!(duration(3599.0), "59m59s");
        assert_eq!(duration(7440.0), "2h04m");
        assert_eq!(duration(-3.0), "0s");
    }
}
