//! c10d process groups: the collectives PyTorch's DDP runs on, for data-parallel training over
//! processes on one or several machines.
//!
//! A [`ProcessGroup`] meets its peers through c10d's `TCPStore` (rank 0 listens on
//! `master_addr:master_port`, the others connect), then talks through Gloo (CPU tensors,
//! feature `gloo`) or NCCL (CUDA tensors, feature `nccl`). Every collective is bounded by the
//! group's timeout (default [`DEFAULT_TIMEOUT`], 600 s as PyTorch's): a peer that died shows up
//! as an [`Error::Native`] when its connection closes, a peer that hangs when the timeout
//! expires, never as an endless wait. Every rank must call the same collectives in the same
//! order with tensors of the same shapes and element types.
//!
//! ```no_run
//! use kd_native::dist::{Backend, GroupOptions, ProcessGroup, Reduce};
//! use kd_native::launch;
//! use tch::Tensor;
//!
//! # fn main() -> kd_native::Result<()> {
//! let Some(l) = launch::from_env()? else { return Ok(()) }; // alone: nothing to reduce
//! let timeout = launch::dist_timeout(|k| std::env::var(k).ok())?;
//! let group = ProcessGroup::new(&GroupOptions::from_launch(Backend::Gloo, &l, timeout))?;
//! let mut grads = vec![Tensor::ones([1000], (tch::Kind::Float, tch::Device::Cpu))];
//! group.all_reduce(&mut grads, Reduce::Mean)?; // the mean over ranks, in place
//! # Ok(()) }
//! ```
use crate::ffi::{self, GlooDeviceArg};
use crate::{Error, Result};
use std::time::Duration;
use tch::{Kind, Tensor};

pub use crate::launch::DEFAULT_TIMEOUT;

/// Which c10d backend carries the collectives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `ProcessGroupGloo`: CPU tensors, over TCP.
    Gloo,
    /// `ProcessGroupNCCL`: CUDA tensors, over NVLink, PCIe or InfiniBand.
    Nccl,
}

/// How Gloo picks the network device it listens on.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum GlooDevice {
    /// The address this machine's host name resolves to, or loopback (`createDefaultDevice`;
    /// what PyTorch uses unless `GLOO_SOCKET_IFNAME` is set).
    #[default]
    Default,
    /// A network interface by name, e.g. `"eth0"` (PyTorch's `GLOO_SOCKET_IFNAME`).
    Interface(String),
    /// A host name or address, e.g. `"127.0.0.1"`.
    Hostname(String),
}

/// How to build a [`ProcessGroup`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupOptions {
    /// The backend.
    pub backend: Backend,
    /// The host of rank 0's rendezvous store.
    pub master_addr: String,
    /// Its port.
    pub master_port: u16,
    /// This process's rank.
    pub rank: usize,
    /// The number of processes.
    pub world_size: usize,
    /// The bound on the rendezvous and on each collective.
    pub timeout: Duration,
    /// Gloo's network device.
    pub gloo_device: GlooDevice,
    /// The launcher already serves the store at the master address (torchrun's agent does, and
    /// says so with `TORCHELASTIC_USE_AGENT_STORE=True`), so rank 0 connects to it like the
    /// others instead of starting its own. Such a store outlives the ranks: each incarnation of
    /// the group meets in a part of it of its own, named by rank 0 with a fresh value and handed
    /// to each rank in answer to a fresh value of that rank's, so no rank reads a key an earlier
    /// incarnation left (torchrun's restart count cannot name the incarnation: an agent whose
    /// ranks were healthy restarts them after a change of membership without counting it).
    pub launcher_store: bool,
}

impl GroupOptions {
    /// Options with the default timeout and Gloo device.
    pub fn new(backend: Backend, master_addr: &str, master_port: u16, rank: usize, world_size: usize) -> Self {
        GroupOptions {
            backend,
            master_addr: master_addr.to_string(),
            master_port,
            rank,
            world_size,
            timeout: DEFAULT_TIMEOUT,
            gloo_device: GlooDevice::Default,
            launcher_store: false,
        }
    }

    /// Options for the process `launch` describes, with the given timeout (see
    /// [`crate::launch::dist_timeout`]).
    pub fn from_launch(backend: Backend, launch: &crate::launch::Launch, timeout: Duration) -> Self {
        GroupOptions {
            timeout,
            launcher_store: launch.launcher_store,
            ..GroupOptions::new(backend, &launch.master_addr, launch.master_port, launch.rank, launch.world_size)
        }
    }
}

/// The reduction of [`ProcessGroup::all_reduce`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduce {
    /// The sum over ranks.
    Sum,
    /// The sum divided by the world size (floating-point tensors only).
    Mean,
}

/// A c10d process group with its rendezvous store. Dropping it closes the connections.
pub struct ProcessGroup {
    inner: ffi::Group,
    rank: usize,
    world_size: usize,
    timeout: Duration,
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProcessGroup(rank {} of {})", self.rank, self.world_size)
    }
}

/// Whether this build has the backend.
pub fn available(backend: Backend) -> bool {
    let bit = match backend {
        Backend::Gloo => 1,
        Backend::Nccl => 2,
    };
    ffi::features() & bit != 0
}

/// Makes the failures of the collective library read as one line of this process's own: a C++
/// exception that escapes one of its threads (Gloo throws in its transport threads when ranks
/// exchange data of different sizes, which would abort the process) ends the process with
/// status 1 and one line, `prefix` followed by what failed; and libtorch's own warnings and
/// errors, logged with C++ stack traces, stay off stderr unless `TORCH_CPP_LOG_LEVEL` is set.
/// Call it once, before the first [`ProcessGroup::new`]; every other failure is an [`Error`].
pub fn quiet_failures(prefix: &str) {
    ffi::quiet_failures(prefix)
}

fn not_built(backend: Backend) -> Error {
    match backend {
        Backend::Gloo => Error::NotBuilt {
            what: "Gloo (no Gloo headers were found when kd-native was built)",
            hint: "run `make setup` (it fetches the Gloo headers) and rebuild",
        },
        Backend::Nccl => Error::NotBuilt {
            what: "NCCL (feature `nccl`)",
            hint: "build with `--features kd-native/nccl` where the CUDA build of the PyTorch wheel is installed",
        },
    }
}

fn millis(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

impl ProcessGroup {
    /// Meets the other ranks and connects to them; returns an error naming the master address
    /// when the rendezvous fails or does not complete within the timeout (a wrong address, a
    /// port in use on rank 0, a rank that never starts).
    pub fn new(opts: &GroupOptions) -> Result<ProcessGroup> {
        if opts.world_size == 0 || opts.rank >= opts.world_size {
            return Err(Error::Invalid(format!(
                "rank {} of world size {}: expected 0 <= rank < world size",
                opts.rank, opts.world_size
            )));
        }
        if opts.timeout.is_zero() {
            return Err(Error::Invalid("a process group's timeout must be positive".into()));
        }
        if !available(opts.backend) {
            return Err(not_built(opts.backend));
        }
        let device = match &opts.gloo_device {
            GlooDevice::Default => GlooDeviceArg::Default,
            GlooDevice::Interface(s) => GlooDeviceArg::Interface(s),
            GlooDevice::Hostname(s) => GlooDeviceArg::Hostname(s),
        };
        let kind = match opts.backend {
            Backend::Gloo => 0,
            Backend::Nccl => 1,
        };
        let inner = ffi::Group::new(
            kind,
            &opts.master_addr,
            opts.master_port,
            opts.rank as i32,
            opts.world_size as i32,
            opts.launcher_store,
            millis(opts.timeout),
            device,
        )
        .map_err(|message| Error::Native {
            op: "rendezvous",
            message: format!(
                "rank {} of {} at {}:{}: {message}",
                opts.rank, opts.world_size, opts.master_addr, opts.master_port
            ),
        })?;
        Ok(ProcessGroup { inner, rank: opts.rank, world_size: opts.world_size, timeout: opts.timeout })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of processes.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The bound on each collective.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Wraps a collective's error message with this rank and the timeout, since the messages of
    /// Gloo and NCCL name neither (`Operation timed out!`, `Connection closed by peer`).
    fn failed(&self, op: &'static str) -> impl FnOnce(String) -> Error + '_ {
        move |message| Error::Native {
            op,
            message: format!(
                "{message} (on rank {} of {}, timeout {} s; a peer exited or stopped answering)",
                self.rank,
                self.world_size,
                self.timeout.as_secs_f64()
            ),
        }
    }
}

/// Checks that a list is non-empty and of one element type and device, and returns them.
fn uniform(what: &str, tensors: &[Tensor]) -> Result<(Kind, tch::Device)> {
    let first = tensors.first().ok_or_else(|| Error::Invalid(format!("{what}: empty list of tensors")))?;
    let (kind, device) = (first.kind(), first.device());
    for (i, t) in tensors.iter().enumerate() {
        if t.kind() != kind || t.device() != device {
            return Err(Error::Invalid(format!(
                "{what}: tensor {i} is {:?} on {:?}, tensor 0 is {kind:?} on {device:?}; a flat buffer needs one kind and device",
                t.kind(),
                t.device()
            )));
        }
    }
    Ok((kind, device))
}

/// Runs `op` on one contiguous buffer holding all of `tensors`, and copies the result back
/// (a single contiguous tensor is used in place).
fn through_flat(tensors: &mut [Tensor], mut op: impl FnMut(&mut Tensor) -> Result<()>) -> Result<()> {
    let _guard = tch::no_grad_guard();
    if let [t] = tensors {
        if t.is_contiguous() {
            return op(t);
        }
    }
    let mut flat = Tensor::cat(&tensors.iter().map(|t| t.reshape([-1])).collect::<Vec<_>>(), 0);
    op(&mut flat)?;
    let mut offset = 0;
    for t in tensors.iter_mut() {
        let n = t.numel() as i64;
        t.copy_(&flat.narrow(0, offset, n).view_as(t));
        offset += n;
    }
    Ok(())
}

impl ProcessGroup {
    /// Reduces `tensors` in place across ranks, through one flat buffer (so one collective for
    /// the whole list). All must share one element type and device; [`Reduce::Mean`] needs a
    /// floating-point type.
    ///
    /// ```text
    /// x_i <- sum_r x_i^(r)              Sum
    /// x_i <- (1 / R) sum_r x_i^(r)      Mean, R = world size
    /// ```
    pub fn all_reduce(&self, tensors: &mut [Tensor], op: Reduce) -> Result<()> {
        let (kind, _) = uniform("all-reduce", tensors)?;
        if op == Reduce::Mean && !matches!(kind, Kind::Half | Kind::Float | Kind::Double | Kind::BFloat16) {
            return Err(Error::Invalid(format!("all-reduce: a mean of {kind:?} tensors; expected floating point")));
        }
        let world = self.world_size as f64;
        let ms = millis(self.timeout);
        through_flat(tensors, |flat| {
            self.inner.all_reduce_sum(flat, ms).map_err(self.failed("all-reduce"))?;
            if op == Reduce::Mean && self.world_size > 1 {
                let _ = flat.g_div_scalar_(world);
            }
            Ok(())
        })
    }

    /// [`ProcessGroup::all_reduce`] in flat buckets of at most `bucket_bytes` each (a tensor
    /// larger than that is a bucket of its own): consecutive tensors of one element type and
    /// device share a bucket. Bounds the extra memory to one bucket, as DDP's buckets do.
    pub fn all_reduce_bucketed(&self, tensors: &mut [Tensor], op: Reduce, bucket_bytes: usize) -> Result<()> {
        for range in buckets(tensors, bucket_bytes) {
            self.all_reduce(&mut tensors[range], op)?;
        }
        Ok(())
    }

    /// Overwrites `tensors` on every rank with rank `root`'s, through one flat buffer.
    pub fn broadcast(&self, tensors: &mut [Tensor], root: usize) -> Result<()> {
        uniform("broadcast", tensors)?;
        if root >= self.world_size {
            return Err(Error::Invalid(format!("broadcast: root {root} is not a rank of {}", self.world_size)));
        }
        let ms = millis(self.timeout);
        through_flat(tensors, |flat| self.inner.broadcast(flat, root as i32, ms).map_err(self.failed("broadcast")))
    }

    /// Every rank's `tensor`, in rank order (each rank must pass the same shape and type).
    pub fn all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>> {
        let _guard = tch::no_grad_guard();
        let input = tensor.contiguous();
        let mut outputs: Vec<Tensor> = (0..self.world_size).map(|_| input.empty_like()).collect();
        self.inner.all_gather(&input, &mut outputs, millis(self.timeout)).map_err(self.failed("all-gather"))?;
        Ok(outputs)
    }

    /// Returns when every rank has reached it.
    pub fn barrier(&self) -> Result<()> {
        self.inner.barrier(millis(self.timeout)).map_err(self.failed("barrier"))
    }

    /// Checks that every rank passes the same `value` (a hash of the resolved configuration at
    /// the start, a parameter checksum each epoch), naming the ranks that differ from rank 0.
    ///
    /// ```text
    /// ok  <=>  value^(r) = value^(0) for every rank r
    /// ```
    pub fn agree(&self, what: &str, value: i64) -> Result<()> {
        let values = self.all_gather(&Tensor::from_slice(&[value]))?;
        let values: Vec<i64> = values.iter().map(|t| t.int64_value(&[0])).collect();
        let differ: Vec<String> = (values.iter().enumerate())
            .filter(|(_, v)| **v != values[0])
            .map(|(r, v)| format!("rank {r} has {v}"))
            .collect();
        if differ.is_empty() {
            return Ok(());
        }
        Err(Error::Disagreement(format!(
            "{what} differs across ranks: rank 0 has {}, {}",
            values[0],
            differ.join(", ")
        )))
    }
}

/// Index ranges of consecutive tensors of one kind and device holding at most `bucket_bytes`
/// (a larger tensor alone).
pub fn buckets(tensors: &[Tensor], bucket_bytes: usize) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    let mut bytes = 0usize;
    for (i, t) in tensors.iter().enumerate() {
        let size = t.numel() * t.kind().elt_size_in_bytes();
        let joins = out.last().is_some_and(|r| {
            let last = &tensors[r.end - 1];
            last.kind() == t.kind() && last.device() == t.device() && bytes + size <= bucket_bytes
        });
        if joins {
            out.last_mut().unwrap().end = i + 1;
            bytes += size;
        } else {
            out.push(i..i + 1);
            bytes = size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn buckets_respect_size_kind_and_order() {
        let f = |n: i64| Tensor::zeros([n], (Kind::Float, Device::Cpu));
        let d = |n: i64| Tensor::zeros([n], (Kind::Double, Device::Cpu));
        // 4-byte floats: 10 + 10 fit in 100 bytes, 30 does not join them, the double starts anew.
        let ts = [f(10), f(10), f(30), f(5), d(1), d(1)];
        assert_eq!(buckets(&ts, 100), vec![0..2, 2..3, 3..4, 4..6]);
        assert_eq!(buckets(&ts, 1), vec![0..1, 1..2, 2..3, 3..4, 4..5, 5..6]);
        assert_eq!(buckets(&ts, usize::MAX), vec![0..4, 4..6]);
        assert!(buckets(&[], 10).is_empty());
    }

    #[test]
    fn flat_buffer_round_trips_non_contiguous_tensors() {
        let a = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]).tr(); // not contiguous
        let b = Tensor::from_slice(&[10.0f32, 20.0]);
        let mut ts = vec![a.shallow_clone(), b.shallow_clone()];
        through_flat(&mut ts, |flat| {
            assert_eq!(flat.size(), [8]);
            let _ = flat.g_mul_scalar_(2.0);
            Ok(())
        })
        .unwrap();
        let want = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]).tr() * 2.0;
        assert!(a.equal(&want) && b.equal(&Tensor::from_slice(&[20.0f32, 40.0])));
    }

    #[test]
    fn bad_arguments_are_named() {
        let mut o = GroupOptions::new(Backend::Gloo, "127.0.0.1", 1, 2, 2);
        assert!(ProcessGroup::new(&o).unwrap_err().to_string().contains("rank 2 of world size 2"));
        o.rank = 0;
        o.timeout = Duration::ZERO;
        assert!(ProcessGroup::new(&o).unwrap_err().to_string().contains("timeout must be positive"));
        let mixed = [Tensor::zeros([1], (Kind::Float, Device::Cpu)), Tensor::zeros([1], (Kind::Double, Device::Cpu))];
        assert!(uniform("x", &mixed).unwrap_err().to_string().contains("tensor 1 is Double"));
        assert!(uniform("x", &[]).unwrap_err().to_string().contains("empty list"));
    }

    #[cfg(not(feature = "nccl"))]
    #[test]
    fn a_missing_backend_says_how_to_get_it() {
        let o = GroupOptions::new(Backend::Nccl, "127.0.0.1", 1, 0, 1);
        let err = ProcessGroup::new(&o).unwrap_err().to_string();
        assert!(err.contains("feature `nccl`"), "{err}");
    }
}
