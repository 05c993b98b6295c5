//! The limits on sizes an experiment may ask for, checked while it is resolved.

/// The lowest temperature. Losses and logits are f32 in both precisions (bf16 rounds only the
/// matrix products' inputs), and `exp(-87.3)` is the smallest normal f32 (subnormals are
/// flushed to zero), so at temperature T the soft target of a class whose teacher logit is
/// more than `87.3 T` below the top one is exactly 0: at 0.01 that is a gap of 0.87, below it
/// the targets are one-hot for any plausible logits and the soft term's gradient,
/// `T (q - p)`, vanishes with T (at T = 1e-6 the loss reads exactly 0).
pub const MIN_TEMPERATURE: f64 = 0.01;
/// The highest temperature. At T, a logit gap of `g` moves `z / T` by `g / T`; f32 resolves
/// steps of 1.2e-7 near 1, so at 1e6 a gap of 1 still shifts the soft targets by about 8 f32
/// steps from uniform; above it they are uniform for any plausible logits, while `T^2` keeps
/// growing (at 1e30 the loss overflows f32).
pub const MAX_TEMPERATURE: f64 = 1e6;

/// The most classes a run supports (labels and `data.classes`): the output layer, the per-class
/// tables and the label counts are this wide.
pub const MAX_CLASSES: i64 = 1_000_000;
/// The most parameters one network may have (2^30, 4 GiB of f32 weights and up to 16 GiB with
/// gradients and Adam's state): checked before a network is allocated, so that a layer width of
/// 1e8 is an error rather than an allocation failure.
pub const MAX_PARAMETERS: i64 = 1 << 30;
/// The most frames of context on either side of a speech frame.
pub const MAX_CONTEXT: u32 = 1000;

/// The most CPU threads an experiment may ask for on any machine; [`check_threads`] also bounds
/// them by the machine's cores when a run starts.
pub const MAX_THREADS: i64 = 1024;
/// How many threads per logical core a run may ask for: more only adds switching.
pub const THREADS_PER_CORE: i64 = 4;
/// The most batches a streamed store may read ahead (each holds a batch's windows in memory).
pub const MAX_PREFETCH: u64 = 256;

/// Fails unless `threads` (0: libtorch's default) fits this machine: at most
/// [`THREADS_PER_CORE`] per logical core. Checked when a run starts, not when a file is
/// validated, since the file may be meant for another machine.
pub fn check_threads(threads: i64) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as i64;
    if threads > THREADS_PER_CORE * cores {
        anyhow::bail!(
            "threads = {threads}: this machine has {cores} logical core{}; expected at most {} (or 0 for \
             libtorch's default, one per core)",
            if cores == 1 { "" } else { "s" },
            THREADS_PER_CORE * cores
        );
    }
    Ok(())
}

/// The most stages an experiment may have, its sweeps expanded: a small file must not expand
/// into millions of stages (each one a run of its own) and exhaust memory before anything runs.
pub const MAX_STAGES: usize = 10_000;
