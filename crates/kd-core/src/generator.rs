//! Exclusive use of libtorch's process-global random generator.
//!
//! libtorch draws initial weights, dropout masks, `randn` and `randperm` from one default
//! generator per device, shared by every thread of the process, and `tch::manual_seed` reseeds
//! it for all of them. Code that seeds and then relies on the sequence it draws (a test that
//! compares two passes with the same dropout masks, a training run that must reproduce) is only
//! deterministic if no other thread draws in between: Rust's test harness runs the tests of a
//! crate as threads of one process, so without coordination a test's outcome depends on its
//! neighbours' scheduling.
//!
//! [`lock_global_generator`] returns a guard that gives its thread exclusive use of the global
//! generator until it is dropped; [`seed_global_generator`] also reseeds it. The lock is
//! process-wide and re-entrant (a thread holding it may take it again, so a locked test can call
//! code that locks), and it only coordinates code that takes it: every thread that draws from the
//! global generator while another relies on its sequence must hold it.
//!
//! ```
//! use tch::{Device, Kind, Tensor};
//! let a = {
//!     let _generator = kd_core::seed_global_generator(7);
//!     Tensor::randn([3], (Kind::Float, Device::Cpu))
//! };
//! let _generator = kd_core::seed_global_generator(7);
//! assert!(Tensor::randn([3], (Kind::Float, Device::Cpu)).equal(&a));
//! ```

use std::marker::PhantomData;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::{self, ThreadId};

/// Who holds the lock and how many times.
struct Owner {
    thread: Option<ThreadId>,
    depth: usize,
}

static OWNER: Mutex<Owner> = Mutex::new(Owner { thread: None, depth: 0 });
static RELEASED: Condvar = Condvar::new();

fn owner() -> MutexGuard<'static, Owner> {
    // The state is two plain fields, consistent at every unlock: a panic elsewhere cannot leave it
    // half-written, so a poisoned mutex is safe to use.
    OWNER.lock().unwrap_or_else(|e| e.into_inner())
}

/// Exclusive use of libtorch's global generator by the thread that holds it (see the module
/// docs); released on drop. Not `Send`: it belongs to the thread that took it.
#[must_use = "the generator is released as soon as the guard is dropped"]
pub struct GeneratorGuard {
    _not_send: PhantomData<*const ()>,
}

/// Waits until no other thread holds libtorch's global generator, then holds it until the guard
/// is dropped. Re-entrant: a thread that already holds it gets a nested guard at once.
pub fn lock_global_generator() -> GeneratorGuard {
    let me = thread::current().id();
    let mut state = owner();
    while state.thread.is_some_and(|t| t != me) {
        state = RELEASED.wait(state).unwrap_or_else(|e| e.into_inner());
    }
    state.thread = Some(me);
    state.depth += 1;
    GeneratorGuard { _not_send: PhantomData }
}

/// [`lock_global_generator`], then `tch::manual_seed(seed)`: the draws made while the guard
/// lives are the same on every run (on the same CPU kernels), whatever other threads do.
pub fn seed_global_generator(seed: i64) -> GeneratorGuard {
    let guard = lock_global_generator();
    tch::manual_seed(seed);
    guard
}

impl Drop for GeneratorGuard {
    fn drop(&mut self) {
        let mut state = owner();
        state.depth -= 1;
        if state.depth == 0 {
            state.thread = None;
            RELEASED.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tch::{Device, Kind, Tensor};

    #[test]
    fn the_lock_is_reentrant_and_exclusive_across_threads() {
        let inside = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let inside = Arc::clone(&inside);
                thread::spawn(move || {
                    for _ in 0..50 {
                        let _outer = seed_global_generator(i);
                        let _inner = lock_global_generator();
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders at once");
                        let a = Tensor::randn([4], (Kind::Float, Device::Cpu));
                        tch::manual_seed(i);
                        let b = Tensor::randn([4], (Kind::Float, Device::Cpu));
                        assert!(a.equal(&b), "another thread drew between the seed and the draw");
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn a_panic_while_holding_the_lock_releases_it() {
        let result = thread::spawn(|| {
            let _guard = lock_global_generator();
            panic!("inside");
        })
        .join();
        assert!(result.is_err());
        let _guard = lock_global_generator();
        assert_eq!(owner().depth, 1);
    }
}
