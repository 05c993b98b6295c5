//! Data-parallel training over processes: this process's place among the ranks `torchrun` or
//! Slurm's `srun` started, and the collectives the training loop, the evaluations and the run
//! directory use. A process started alone is a world of one, for which every collective is a
//! no-op, so the code that calls them runs unchanged on one rank or many.
//!
//! What is reduced (see docs/distributed.md):
//! - every rank draws the same permutation of the examples from the seed and takes its
//!   contiguous share of each global batch of `batch_size` ([`World::share`]); its loss is
//!   weighted by its share of the global batch, so that the gradients summed over ranks
//!   ([`World::sum_gradients`]) are those of the mean over the global batch;
//! - evaluations and teacher passes split the examples into contiguous shares; counts are
//!   summed and outputs gathered in rank order ([`World::gather_rows`]);
//! - rank 0 alone writes the run directory ([`World::is_writer`]); the others read what it wrote
//!   after a barrier, so `--out` must be on a file system every rank sees.
//!
//! Errors of a collective name this rank, the operation and, for two ranks, the other one; a
//! rank that died closes its connections (the others fail at once), a rank that hangs makes the
//! others fail when `KD_DIST_TIMEOUT_S` (default 600 s) expires.

use anyhow::{bail, Context, Result};
use kd_native::dist::{Backend, GroupOptions, ProcessGroup, Reduce};
use kd_native::launch::{self, Launch};
use std::cell::OnceCell;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// Gradients are summed in flat buckets of at most this many bytes (`KD_DIST_BUCKET_MB`
/// overrides it): one collective per bucket, extra memory of one bucket.
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

/// The ranks of a data-parallel run and this process's place among them.
pub struct World {
    group: Option<ProcessGroup>,
    rank: usize,
    size: usize,
    local_rank: usize,
    /// Collectives of CUDA tensors go through host copies (Gloo carries CPU tensors only).
    through_host: bool,
    bucket_bytes: usize,
    timeout: Duration,
}

thread_local! {
    /// The process group is not `Send`: it lives on the thread that runs the experiment (kd-run
    /// runs its stages on the main thread; libtorch's own threads never call it).
    static WORLD: OnceCell<&'static World> = const { OnceCell::new() };
}

/// The world this process belongs to: the one [`init`] set on this thread, else a world of one.
pub fn world() -> &'static World {
    WORLD.with(|w| *w.get_or_init(|| Box::leak(Box::new(World::single()))))
}

/// Sets the world of this process (once, on the thread that runs the experiment, before its
/// first call of [`world`]).
pub fn init(world: World) -> Result<()> {
    let world: &'static World = Box::leak(Box::new(world));
    if WORLD.with(|w| w.set(world)).is_err() {
        bail!("the ranks of this process were set twice");
    }
    Ok(())
}

impl World {
    /// A process alone: rank 0 of 1; every collective is a no-op.
    pub fn single() -> World {
        World {
            group: None,
            rank: 0,
            size: 1,
            local_rank: 0,
            through_host: false,
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            timeout: kd_native::dist::DEFAULT_TIMEOUT,
        }
    }

    /// Joins the ranks the launch variables describe (torchrun's or Slurm's; a world of one
    /// without them), with CUDA tensors when `cuda`: NCCL when this build has it, else Gloo
    /// through host copies. Checks that every rank runs the same experiment
    /// (`config_hash`, a hash of the resolved configuration and the command's options).
    pub fn join(env: &dyn Fn(&str) -> Option<String>, cuda: bool, config_hash: i64) -> Result<World> {
        let Some(l) = launch::parse(env)? else { return Ok(World::single()) };
        if l.world_size == 1 {
            return Ok(World { local_rank: l.local_rank, ..World::single() });
        }
        let backend = if cuda && kd_native::dist::available(Backend::Nccl) { Backend::Nccl } else { Backend::Gloo };
        if !kd_native::dist::available(backend) {
            bail!(
                "started as rank {} of {} by {}, but this kd-run was built without data parallelism (no Gloo \
                 headers were found at build time): run `make setup` (it fetches them) and rebuild with \
                 `cargo build --release -p kd-run` (add `--features kd-native/nccl` for NCCL on GPUs), or start \
                 one process",
                l.rank,
                l.world_size,
                launcher_name(&l)
            );
        }
        let timeout = launch::dist_timeout(env)?;
        let mut options = GroupOptions::from_launch(backend, &l, timeout);
        if let Some(interface) = env("GLOO_SOCKET_IFNAME") {
            options.gloo_device = kd_native::dist::GlooDevice::Interface(interface);
        }
        kd_native::dist::quiet_failures(&format!("[rank {0}] error: rank {0} of {1}: ", l.rank, l.world_size));
        let group = ProcessGroup::new(&options)
            .with_context(|| format!("rank {} of {}: meeting the other ranks", l.rank, l.world_size))?;
        let bucket_bytes = match env("KD_DIST_BUCKET_MB") {
            None => DEFAULT_BUCKET_BYTES,
            Some(v) => match v.trim().parse::<usize>() {
                Ok(mb) if mb > 0 && mb <= 1 << 14 => mb << 20,
                _ => bail!("KD_DIST_BUCKET_MB = {v:?}: expected a whole number of megabytes from 1 to 16384"),
            },
        };
        say_when_stopped(l.rank, l.world_size, launcher_name(&l));
        let world = World {
            group: Some(group),
            rank: l.rank,
            size: l.world_size,
            local_rank: l.local_rank,
            through_host: cuda && backend == Backend::Gloo,
            bucket_bytes,
            timeout,
        };
        let build = kd_native::build::info();
        let version = format!(
            "kd-run {} on libtorch {} (NCCL: {}, CUDA graphs: {})",
            env!("CARGO_PKG_VERSION"),
            build.libtorch_version,
            build.nccl,
            build.cuda_graphs
        );
        world.agree(&format!("the build (this rank runs {version})"), text_hash(&version))?;
        world.agree(
            "KD_DIST_BUCKET_MB (the size of the buckets gradients are summed in must be the same on every rank)",
            world.bucket_bytes as i64,
        )?;
        world.agree(
            "the hash of the resolved experiment and command options (every rank must run the same experiment file \
             with the same options)",
            config_hash,
        )?;
        Ok(world)
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Whether there is more than one rank.
    pub fn is_distributed(&self) -> bool {
        self.size > 1
    }

    /// Whether this rank writes the run directory (rank 0).
    pub fn is_writer(&self) -> bool {
        self.rank == 0
    }

    /// The CUDA device of this rank: `cuda:LOCAL_RANK` when started by a launcher, else `device`.
    pub fn device(&self, device: Device) -> Device {
        match device {
            Device::Cuda(_) if self.is_distributed() => Device::Cuda(self.local_rank),
            d => d,
        }
    }

    /// This rank's contiguous share `start..start + len` of `n` rows:
    /// `[rank n / W, (rank + 1) n / W)`; the shares of the ranks cover `0..n` once, in rank
    /// order, and differ in size by at most one.
    pub fn share(&self, n: i64) -> (i64, i64) {
        share_of(self.rank, self.size, n)
    }

    /// Sums `grads` (each rank's gradient of its share of the loss, weighted by its share of
    /// the global batch) over the ranks in place, in flat buckets:
    /// `g <- sum_r (b_r / b) g_r`, the gradient of the global batch's mean loss.
    pub fn sum_gradients(&self, grads: &mut [Tensor]) -> Result<()> {
        if !self.is_distributed() {
            return Ok(());
        }
        let bucket = self.bucket_bytes;
        self.collective(grads, |g, t| g.all_reduce_bucketed(t, Reduce::Sum, bucket), "summing the gradients")
    }

    /// Sums `tensors` (one element type) over the ranks in place: counts, loss sums.
    pub fn sum(&self, tensors: &mut [Tensor]) -> Result<()> {
        if !self.is_distributed() {
            return Ok(());
        }
        self.collective(tensors, |g, t| g.all_reduce(t, Reduce::Sum), "summing counts")
    }

    /// Overwrites `tensors` with rank 0's (any mix of element types): parameters and
    /// optimizer state at the start of a stage and after a resume.
    pub fn broadcast(&self, tensors: &mut [Tensor]) -> Result<()> {
        if !self.is_distributed() {
            return Ok(());
        }
        let _guard = tch::no_grad_guard();
        let mut kinds: Vec<Kind> = tensors.iter().map(Tensor::kind).collect();
        kinds.dedup();
        kinds.sort_by_key(|k| format!("{k:?}"));
        kinds.dedup();
        for kind in kinds {
            let mut same: Vec<Tensor> =
                tensors.iter().filter(|t| t.kind() == kind).map(Tensor::shallow_clone).collect();
            self.collective(&mut same, |g, t| g.broadcast(t, 0), "receiving rank 0's parameters")?;
        }
        Ok(())
    }

    /// The rows of every rank's `local` (its share of `n` rows, [`World::share`]), in rank
    /// order: `[n, ...]` on `local`'s device.
    pub fn gather_rows(&self, local: &Tensor, n: i64) -> Result<Tensor> {
        let Some(group) = self.group.as_ref().filter(|_| self.is_distributed()) else {
            return Ok(local.shallow_clone());
        };
        let _guard = tch::no_grad_guard();
        let w = self.size as i64;
        let longest = (n + w - 1) / w;
        let mut shape = local.size();
        let rows = shape[0];
        shape[0] = longest - rows;
        let device = local.device();
        let staged = if self.through_host { local.to_device(Device::Cpu) } else { local.shallow_clone() };
        let padded =
            Tensor::cat(&[staged.shallow_clone(), Tensor::zeros(shape.as_slice(), (local.kind(), staged.device()))], 0);
        let parts = group.all_gather(&padded).map_err(|e| self.failed("gathering outputs", e))?;
        let parts: Vec<Tensor> =
            parts.iter().enumerate().map(|(r, p)| p.narrow(0, 0, share_of(r, self.size, n).1)).collect();
        Ok(Tensor::cat(&parts, 0).to_device(device))
    }

    /// Returns when every rank has reached it.
    pub fn barrier(&self) -> Result<()> {
        match self.group.as_ref().filter(|_| self.is_distributed()) {
            Some(g) => g.barrier().map_err(|e| self.failed("waiting for the other ranks", e)),
            None => Ok(()),
        }
    }

    /// Fails, naming the ranks that differ, unless every rank passes the same `value`.
    pub fn agree(&self, what: &str, value: i64) -> Result<()> {
        match self.group.as_ref().filter(|_| self.is_distributed()) {
            Some(g) => g.agree(what, value).map_err(|e| match e {
                kd_native::Error::Disagreement(m) => anyhow::anyhow!("rank {} of {}: {m}", self.rank, self.size),
                e => self.failed("comparing values across ranks", e),
            }),
            None => Ok(()),
        }
    }

    /// Whether `yes` holds on every rank (one small collective): decisions that must be the
    /// same everywhere, such as reading a cache entry or computing it.
    pub fn all(&self, yes: bool) -> Result<bool> {
        if !self.is_distributed() {
            return Ok(yes);
        }
        let mut t = [Tensor::from_slice(&[i64::from(!yes)])];
        self.sum(&mut t)?;
        Ok(t[0].int64_value(&[0]) == 0)
    }

    /// Checks that every rank holds the same parameters: the bits of the f64 sum of their
    /// values and of their squares, compared across ranks (a cheap checksum, each epoch).
    pub fn check_parameters(&self, params: &[Tensor], when: &str) -> Result<()> {
        if !self.is_distributed() {
            return Ok(());
        }
        let _guard = tch::no_grad_guard();
        let (mut sum, mut squares) = (0f64, 0f64);
        for p in params {
            let p = p.to_kind(Kind::Double);
            sum += p.sum(Kind::Double).double_value(&[]);
            squares += (&p * &p).sum(Kind::Double).double_value(&[]);
        }
        let value = (sum.to_bits() ^ squares.to_bits().rotate_left(17)) as i64;
        self.agree(&format!("the parameter checksum {when}"), value)
    }

    /// Runs a collective on `tensors`, through host copies when Gloo carries CUDA tensors.
    fn collective(
        &self,
        tensors: &mut [Tensor],
        op: impl Fn(&ProcessGroup, &mut [Tensor]) -> kd_native::Result<()>,
        what: &str,
    ) -> Result<()> {
        let Some(group) = &self.group else { return Ok(()) };
        let _guard = tch::no_grad_guard();
        if self.through_host && tensors.iter().any(|t| t.device() != Device::Cpu) {
            let mut host: Vec<Tensor> = tensors.iter().map(|t| t.to_device(Device::Cpu)).collect();
            op(group, &mut host).map_err(|e| self.failed(what, e))?;
            for (t, h) in tensors.iter_mut().zip(&host) {
                t.copy_(h);
            }
            return Ok(());
        }
        op(group, tensors).map_err(|e| self.failed(what, e))
    }

    /// The error of a failed collective: this rank, what it was doing, c10d's message, and
    /// which rank was probably lost.
    fn failed(&self, what: &str, e: kd_native::Error) -> anyhow::Error {
        let others: Vec<String> = (0..self.size).filter(|&r| r != self.rank).map(|r| r.to_string()).collect();
        let lost = match others.as_slice() {
            [one] => format!("rank {one} (the other rank) exited or stopped answering"),
            _ => format!("one of ranks {} exited or stopped answering", others.join(", ")),
        };
        anyhow::anyhow!(
            "rank {} of {}: {what}: {lost} (collectives time out after {} s, KD_DIST_TIMEOUT_S): {e}",
            self.rank,
            self.size,
            self.timeout.as_secs()
        )
    }
}

/// The variables of `vs` in the order of their names (the same on every rank, unlike the
/// order of `VarStore::variables`' map).
pub fn variables(vs: &tch::nn::VarStore) -> Vec<Tensor> {
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named.into_iter().map(|(_, t)| t).collect()
}

/// A 64-bit hash of `text` (SHA-256's first bytes), for [`World::agree`].
pub fn text_hash(text: &str) -> i64 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(text.as_bytes());
    i64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// A 64-bit hash (SHA-256's first bytes) of named tensors: each name, element type, shape and
/// the bytes of its values, in order. For [`World::agree`] on what every rank must have read
/// alike (the data as loaded, a checkpoint's weights).
pub fn tensors_hash<'a>(named: impl IntoIterator<Item = (&'a str, &'a Tensor)>) -> i64 {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for (name, t) in named {
        h.update(format!("{name} {:?} {:?};", t.kind(), t.size()).as_bytes());
        let bytes = t.to_device(Device::Cpu).contiguous().view_dtype(Kind::Uint8).reshape([-1]);
        // In pieces of 16 MiB, so that hashing a large split copies little at a time.
        let n = bytes.size()[0];
        let mut buf = Vec::new();
        for start in (0..n).step_by(1 << 24) {
            let piece = bytes.narrow(0, start, (1i64 << 24).min(n - start));
            let len = piece.size()[0] as usize;
            buf.resize(len, 0u8);
            piece.copy_data_u8(&mut buf, len);
            h.update(&buf);
        }
    }
    i64::from_le_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
}

/// The line a rank writes when its launcher stops it with SIGTERM (torchrun does, to every rank,
/// once one has failed, often before the survivors' collectives have failed on their own).
static STOPPED: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();

extern "C" fn on_sigterm(_: libc::c_int) {
    if let Some(line) = STOPPED.get() {
        // SAFETY: write(2) and _exit(2) are async-signal-safe; `line` is a 'static buffer set
        // before the handler was installed.
        unsafe {
            libc::write(2, line.as_ptr().cast(), line.len());
            libc::_exit(143);
        }
    }
}

/// Makes a rank stopped by SIGTERM say so (and that the launcher's report names the rank that
/// failed first) instead of ending silently.
fn say_when_stopped(rank: usize, size: usize, launcher: &str) {
    let line = format!(
        "[rank {rank}] error: rank {rank} of {size}: stopped by SIGTERM; {launcher} stops every rank once one has \
         failed (its report names that rank)\n"
    );
    if STOPPED.set(line.into_bytes()).is_ok() {
        // SAFETY: installs a handler that only calls async-signal-safe functions.
        unsafe {
            libc::signal(libc::SIGTERM, on_sigterm as extern "C" fn(libc::c_int) as libc::sighandler_t);
        }
    }
}

/// Rank `rank`'s share of `n` rows among `size` ranks (see [`World::share`]).
fn share_of(rank: usize, size: usize, n: i64) -> (i64, i64) {
    let (r, w) = (rank as i64, size as i64);
    let start = r * n / w;
    (start, (r + 1) * n / w - start)
}

fn launcher_name(l: &Launch) -> &'static str {
    match l.launcher {
        launch::Launcher::Torchrun => "torchrun",
        launch::Launcher::Slurm => "srun",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_every_row_once_in_rank_order() {
        for w in 1..5usize {
            for n in 0..11i64 {
                let mut next = 0;
                for r in 0..w {
                    let (start, len) = share_of(r, w, n);
                    assert_eq!(start, next, "n {n} w {w} r {r}");
                    assert!(len == n / w as i64 || len == n / w as i64 + 1);
                    next = start + len;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn tensors_hash_sees_values_order_shapes_and_names() {
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]);
        let base = tensors_hash([("x", &t)]);
        assert_eq!(base, tensors_hash([("x", &t.copy())]));
        let swapped = Tensor::from_slice(&[2.0f32, 1.0, 3.0, 4.0]);
        let changed = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.000001]);
        for other in [
            tensors_hash([("x", &swapped)]),
            tensors_hash([("x", &changed)]),
            tensors_hash([("x", &t.view([2, 2]))]),
            tensors_hash([("y", &t)]),
            tensors_hash([("x", &t.to_kind(Kind::Double))]),
            tensors_hash([("x", &t), ("x", &t)]),
        ] {
            assert_ne!(base, other);
        }
        // A transposed view hashes as its values in row-major order.
        let m = Tensor::from_slice(&[1i64, 2, 3, 4]).view([2, 2]);
        assert_eq!(tensors_hash([("m", &m.tr())]), tensors_hash([("m", &m.tr().contiguous())]));
    }

    #[test]
    fn a_world_of_one_is_a_no_op() {
        let w = World::single();
        let mut g = [Tensor::from_slice(&[1.0f32, 2.0])];
        w.sum_gradients(&mut g).unwrap();
        assert_eq!(Vec::<f32>::try_from(&g[0]).unwrap(), [1.0, 2.0]);
        assert!(w.all(true).unwrap() && !w.all(false).unwrap());
        let t = Tensor::from_slice(&[3i64, 4]);
        assert_eq!(Vec::<i64>::try_from(w.gather_rows(&t, 2).unwrap()).unwrap(), [3, 4]);
        assert!(w.is_writer() && !w.is_distributed());
        assert_eq!(w.share(7), (0, 7));
    }

    #[test]
    fn launched_ranks_need_the_feature_or_join() {
        // No launcher: alone. A world of one from torchrun: alone, without a process group.
        assert_eq!(World::join(&|_| None, false, 0).unwrap().size(), 1);
        let one = |k: &str| {
            let v = match k {
                "RANK" | "LOCAL_RANK" => "0",
                "WORLD_SIZE" => "1",
                "MASTER_ADDR" => "127.0.0.1",
                "MASTER_PORT" => "1",
                _ => return None,
            };
            Some(v.to_string())
        };
        assert_eq!(World::join(&one, false, 0).unwrap().size(), 1);
        if !kd_native::dist::available(Backend::Gloo) {
            let two = |k: &str| if k == "WORLD_SIZE" { Some("2".into()) } else { one(k) };
            let e = World::join(&two, false, 0).err().unwrap().to_string();
            assert!(e.contains("make setup") && e.contains("rank 0 of 2"), "{e}");
        }
    }
}
