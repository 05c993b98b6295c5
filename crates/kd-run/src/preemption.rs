//! Preemption: a cluster job warned that it will be stopped (Slurm's `--signal=USR1@T`, or
//! SIGTERM for a process alone) saves a checkpoint at the next step boundary and exits with
//! [`EXIT_STATUS`] and one line saying how to resume.
//!
//! The signal handler only records the signal. Training steps look at it every 50 steps
//! ([`agree`], where the ranks of a data-parallel run already meet), so every rank stops at the
//! same step. A second signal while the checkpoint is written changes nothing (each file is
//! written whole and renamed into place). SIGTERM outside a training stage (evaluation, a
//! teacher pass) ends the process at once, as before: everything committed stays committed.
//! In a data-parallel run SIGTERM keeps its meaning under torchrun (a peer failed: stop) and
//! SIGUSR1 alone asks for a checkpoint.

use anyhow::Result;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// The exit status of a run stopped by a preemption signal after its checkpoint (`EX_TEMPFAIL`:
/// try again later). A batch script requeues itself on it.
pub const EXIT_STATUS: u8 = 75;

/// The signal received, 0 if none.
static REQUESTED: AtomicI32 = AtomicI32::new(0);
/// Whether a training stage is running (SIGTERM then waits for the next step boundary).
static TRAINING: AtomicBool = AtomicBool::new(false);

const STOPPED_OUTSIDE: &[u8] =
    b"error: stopped by SIGTERM outside a training stage; what was committed is kept: run the same command again to resume\n";

extern "C" fn on_signal(signal: libc::c_int) {
    if signal == libc::SIGTERM && !TRAINING.load(Ordering::SeqCst) {
        // SAFETY: write(2) and _exit(2) are async-signal-safe; the message is static.
        unsafe {
            libc::write(2, STOPPED_OUTSIDE.as_ptr().cast(), STOPPED_OUTSIDE.len());
            libc::_exit(143);
        }
    }
    let _ = REQUESTED.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
}

/// Installs the handlers: SIGUSR1 always, SIGTERM when `alone` (a data-parallel rank keeps the
/// launcher's meaning of SIGTERM).
pub fn install(alone: bool) {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only touches atomics and async-signal-safe calls.
    unsafe {
        libc::signal(libc::SIGUSR1, handler);
        if alone {
            libc::signal(libc::SIGTERM, handler);
        }
    }
}

/// Marks a training stage as running until the guard drops.
pub struct Training(());

impl Training {
    /// Enters a training stage.
    pub fn enter() -> Training {
        TRAINING.store(true, Ordering::SeqCst);
        Training(())
    }
}

impl Drop for Training {
    fn drop(&mut self) {
        TRAINING.store(false, Ordering::SeqCst);
    }
}

/// Whether any rank wants a timed checkpoint (`timed` on this one), and whether any rank
/// received a preemption signal: the same answer on every rank (one small all-reduce when
/// there are several).
pub fn agree(timed: bool) -> Result<(bool, bool)> {
    let stop = REQUESTED.load(Ordering::SeqCst) != 0;
    let world = crate::dist::world();
    if !world.is_distributed() {
        return Ok((timed, stop));
    }
    let mut votes = [tch::Tensor::from_slice(&[i64::from(timed), i64::from(stop)])];
    world.sum(&mut votes)?;
    let votes = Vec::<i64>::try_from(&votes[0])?;
    Ok((votes[0] > 0, votes[1] > 0))
}

/// The signal received, by name (on some rank, when it was another's).
pub fn signal_name() -> &'static str {
    match REQUESTED.load(Ordering::SeqCst) {
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGTERM => "SIGTERM",
        _ => "a preemption signal (on another rank)",
    }
}

/// A run stopped by a preemption signal after its checkpoint: the message says how to resume.
#[derive(Debug)]
pub struct Preempted(pub String);

impl std::fmt::Display for Preempted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Preempted {}
