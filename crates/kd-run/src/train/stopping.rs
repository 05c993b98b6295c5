//! Early stopping on the validation split: keep the epoch with the fewest validation errors, stop
//! after `patience` epochs without fewer.

/// The epoch with the fewest validation errors so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Best {
    pub errors: i64,
    /// 1-based: the number of epochs finished when it was reached.
    pub epoch: i64,
}

/// What [`EarlyStopping::observe`] concluded from an epoch's validation errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// This epoch has fewer errors than every earlier one: keep its weights.
    pub improved: bool,
    /// Epochs since the best one, when that reached the patience: stop.
    pub stop_after: Option<i64>,
}

/// Early stopping with `patience`: after each epoch, [`observe`](Self::observe) its validation
/// errors. Its state is the best epoch, which a resumed stage restores with [`Self::new`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EarlyStopping {
    patience: i64,
    best: Option<Best>,
}

impl EarlyStopping {
    /// Early stopping after `patience` epochs without fewer errors, resuming from `best`.
    pub fn new(patience: i64, best: Option<Best>) -> Self {
        EarlyStopping { patience, best }
    }

    /// Records `errors` at the end of epoch `epoch` (1-based).
    pub fn observe(&mut self, epoch: i64, errors: i64) -> Verdict {
        let improved = self.best.is_none_or(|b| errors < b.errors);
        if improved {
            self.best = Some(Best { errors, epoch });
        }
        let since = epoch - self.best.map_or(0, |b| b.epoch);
        Verdict { improved, stop_after: (since >= self.patience).then_some(since) }
    }

    /// The best epoch so far.
    pub fn best(&self) -> Option<Best> {
        self.best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_after_patience_epochs_without_fewer_errors_and_keeps_the_first_best() {
        let mut s = EarlyStopping::new(2, None);
        let verdicts: Vec<Verdict> = [10, 8, 8, 9, 7].iter().zip(1..).map(|(&e, epoch)| s.observe(epoch, e)).collect();
        assert!(verdicts[0].improved && verdicts[1].improved);
        assert!(!verdicts[2].improved, "a tie is not an improvement: the earlier epoch is kept");
        assert_eq!(verdicts[2].stop_after, None);
        assert_eq!(verdicts[3].stop_after, Some(2));
        assert_eq!(s.best(), Some(Best { errors: 7, epoch: 5 }), "observing goes on if the caller does");
    }

    #[test]
    fn a_resumed_stopper_continues_from_its_best_epoch() {
        let mut resumed = EarlyStopping::new(3, Some(Best { errors: 5, epoch: 4 }));
        assert_eq!(resumed.observe(5, 6), Verdict { improved: false, stop_after: None });
        assert_eq!(resumed.observe(7, 6).stop_after, Some(3));
    }
}
