//! Fuzzing of the readers of input files: valid files (built here, or the Kaldi fixtures and the
//! experiment files of the repository) are corrupted at random, and every reader must answer
//! each corrupted input with a result or an error: never a panic, and never an allocation much
//! larger than the input (a header claiming a huge size is checked against the bytes present).
//!
//! The corruptions, one to four per input: bit flips; bytes replaced by 0, 0x7f, 0xff and other
//! edge values; 4- and 8-byte fields replaced by 0, -1, i32::MAX, i32::MIN, 2^32, u64::MAX and
//! the like, most often in the first 64 bytes where the headers are; numbers in text replaced by
//! huge, negative or non-finite ones; truncation; extension; chunks duplicated, deleted or
//! overwritten with tokens of the format. Checkpoints are also rewritten field by field (the
//! stored layer sizes, dropout rates, entry names, shapes and dtypes) before corruption.
//!
//! Readers: IDX image sets (`idx`), Kaldi matrix archives with FM, DM, CM, CM2, CM3 and text
//! entries (`kaldi-ark`), alignment archives (`kaldi-ali`), scp files (`kaldi-scp`), NumPy
//! arrays as features and as labels (`npy`), safetensors checkpoints read and loaded as an MLP
//! (`checkpoint`), experiment files parsed and validated (`toml`), frame store manifests and
//! shards opened and read whole (`store-toml`, `store-shard`), and top-k target files opened
//! against their store and read whole (`store-topk`).
//!
//! The test command runs a few thousand inputs per reader. The long run, a million inputs per
//! reader (about four minutes on a busy two-core machine), prints what each reader did:
//!
//! ```text
//! KD_FUZZ_ITERS=1000000 cargo test --release -p kd-run fuzz_readers_long -- --ignored --nocapture
//! ```
//!
//! `KD_FUZZ_SEED` changes the random sequence. An input that panics is written to the temporary
//! directory (`kd-fuzz-<reader>-<n>.bin`) and named in the failure.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use safetensors::tensor::{Dtype, TensorView};

use crate::data::{idx, kaldi, npy};
use crate::{config, rng, run::output};

// ---------------------------------------------------------------------------------------------
// Allocation watch: the largest single allocation a reader makes, a hard ceiling, and the most
// bytes held at once (for the streaming readers' memory bound).

/// Allocations above this while a reader runs are refused (the test then aborts with "memory
/// allocation of N bytes failed"), so a reader that trusts a huge size cannot exhaust memory.
const CEILING: usize = 256 << 20;

thread_local! {
    static WATCHING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
    static QUIET: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<String> = const { RefCell::new(String::new()) };
}

/// The system allocator, noting the largest request made on a thread while it is watched.
struct Watch;

fn allowed(size: usize) -> bool {
    WATCHING
        .try_with(|w| {
            if !w.get() {
                return true;
            }
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
            size <= CEILING
        })
        .unwrap_or(true)
}

/// On a watched thread, adds `added` bytes to the live total and removes `removed`, noting the
/// peak.
fn account(added: usize, removed: usize) {
    let _ = WATCHING.try_with(|w| {
        if w.get() {
            let _ = LIVE.try_with(|l| {
                let live = l.get().saturating_sub(removed) + added;
                l.set(live);
                let _ = PEAK.try_with(|p| p.set(p.get().max(live)));
            });
        }
    });
}

/// Runs `f` and returns what it returned and the most bytes it held allocated at once on this
/// thread (what it allocated minus what it freed).
pub(crate) fn peak_live_bytes<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    WATCHING.with(|w| w.set(true));
    let out = f();
    WATCHING.with(|w| w.set(false));
    (out, PEAK.with(Cell::get))
}

// SAFETY: every call is forwarded to `System` unchanged, or refused with a null pointer, which
// the `GlobalAlloc` contract allows.
unsafe impl GlobalAlloc for Watch {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if allowed(layout.size()) {
            account(layout.size(), 0);
            System.alloc(layout)
        } else {
            std::ptr::null_mut()
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if allowed(layout.size()) {
            account(layout.size(), 0);
            System.alloc_zeroed(layout)
        } else {
            std::ptr::null_mut()
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if allowed(new_size) {
            account(new_size, layout.size());
            System.realloc(ptr, layout, new_size)
        } else {
            std::ptr::null_mut()
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        account(0, layout.size());
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Watch = Watch;

/// Installs (once) a panic hook that keeps quiet on a thread running a reader and records the
/// message instead; other threads get the usual report.
fn install_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET.with(Cell::get) {
                LAST_PANIC.with(|p| *p.borrow_mut() = info.to_string());
            } else {
                previous(info);
            }
        }));
    });
}

// ---------------------------------------------------------------------------------------------
// Random corruption.

/// The crate's seeded generator ([`rng::Rng`]), with the choices the corruptions make.
struct Rng(rng::Rng);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        self.0.below(n)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

const BYTES: [u8; 12] = [0, 1, 2, 4, 0x20, 0x0a, 0x7f, 0x80, 0xfe, 0xff, b'[', b']'];
const INTS: [i64; 16] = [
    0,
    1,
    -1,
    2,
    7,
    255,
    256,
    65_535,
    65_536,
    1 << 24,
    1 << 30,
    i32::MAX as i64,
    i32::MIN as i64,
    (i32::MAX - 1) as i64,
    u32::MAX as i64,
    -7,
];
const WIDE: [u64; 9] = [0, 1, u64::MAX, i64::MAX as u64, 1 << 32, 1 << 40, 1 << 62, 100_000_001, 8];
const NUMBERS: [&str; 17] = [
    "0",
    "-1",
    "-0",
    "1",
    "2147483647",
    "2147483648",
    "4294967296",
    "9223372036854775807",
    "18446744073709551616",
    "99999999999999999999999999",
    "1e308",
    "1e999",
    "1e-45",
    "nan",
    "inf",
    "-inf",
    "3.5",
];

/// A position: half the time within the first 64 bytes, where the headers are.
fn position(rng: &mut Rng, len: usize) -> usize {
    if len == 0 {
        0
    } else if rng.chance(50) {
        rng.below(len.min(64))
    } else {
        rng.below(len)
    }
}

/// `seed` with one to four random corruptions; never longer than 4 x the seed + 256 bytes.
fn mutate(rng: &mut Rng, seed: &[u8], dict: &[&[u8]]) -> Vec<u8> {
    let mut b = seed.to_vec();
    let limit = 4 * seed.len() + 256;
    let count = 1 + rng.below(4);
    for _ in 0..count {
        let len = b.len();
        let at = position(rng, len);
        match rng.below(13) {
            0 if len > 0 => b[at] ^= 1 << rng.below(8),
            1 if len > 0 => b[at] = *rng.pick(&BYTES),
            2 => {
                let v = *rng.pick(&INTS) as i32;
                let bytes = if rng.chance(50) { v.to_le_bytes() } else { v.to_be_bytes() };
                overwrite(&mut b, at, &bytes);
            }
            3 => overwrite(&mut b, at, &rng.pick(&WIDE).to_le_bytes()),
            4 => b.truncate(rng.below(len + 1)),
            5 => {
                let n = 1 + rng.below(64);
                if rng.chance(50) {
                    b.extend((0..n).map(|_| rng.next() as u8));
                } else {
                    let start = rng.below(len + 1);
                    b.extend_from_within(start..(start + n).min(len));
                }
            }
            6 if len > 0 => {
                let start = rng.below(len);
                let chunk = b[start..(start + 1 + rng.below(32)).min(len)].to_vec();
                let to = rng.below(len + 1);
                b.splice(to..to, chunk);
            }
            7 if len > 0 => {
                let end = (at + 1 + rng.below(32)).min(len);
                b.drain(at..end);
            }
            8 if !dict.is_empty() => {
                let token = rng.pick(dict).to_vec();
                b.splice(at..at, token);
            }
            9 if !dict.is_empty() => {
                let token = *rng.pick(dict);
                overwrite(&mut b, at, token);
            }
            10 | 11 => rewrite_number(rng, &mut b),
            12 if len > 0 => {
                let n = 1 + rng.below(16);
                let end = (at + n).min(len);
                for x in &mut b[at..end] {
                    *x = rng.next() as u8;
                }
            }
            _ => {}
        }
        b.truncate(limit);
    }
    b
}

/// Writes `bytes` at `at`, growing `b` if needed.
fn overwrite(b: &mut Vec<u8>, at: usize, bytes: &[u8]) {
    let end = at + bytes.len();
    if b.len() < end {
        b.resize(end, 0);
    }
    b[at..end].copy_from_slice(bytes);
}

/// Replaces a run of ASCII digits (from a random point on) by a number from [`NUMBERS`].
fn rewrite_number(rng: &mut Rng, b: &mut Vec<u8>) {
    if b.is_empty() {
        return;
    }
    let from = rng.below(b.len());
    let Some(start) = (from..b.len()).chain(0..from).find(|&i| b[i].is_ascii_digit()) else { return };
    let end = (start..b.len()).find(|&i| !b[i].is_ascii_digit()).unwrap_or(b.len());
    let number = rng.pick(&NUMBERS).as_bytes().to_vec();
    b.splice(start..end, number);
}

// ---------------------------------------------------------------------------------------------
// The harness.

/// What one reader did with the inputs it was given.
#[derive(Default)]
struct Counts {
    inputs: usize,
    ok: usize,
    rejected: usize,
    panics: usize,
    /// The first few panics: message and the file the input was saved to.
    examples: Vec<String>,
    /// Largest single allocation during a call, and the input length it came with.
    largest: (usize, usize),
    seconds: f64,
}

/// A reader's entry point, on the bytes of one input.
type Call = Box<dyn Fn(&[u8]) -> Result<()>>;

/// One reader: its name, its valid seeds and the tokens its format is made of, and a call.
struct Target {
    name: &'static str,
    seeds: Vec<Vec<u8>>,
    dict: Vec<&'static [u8]>,
    /// Also rewrites a seed structurally before the byte corruption (checkpoints).
    prepare: Option<fn(&mut Rng) -> Vec<u8>>,
    call: Call,
}

/// Runs `target` on its seeds unchanged (each must be accepted) and on `iters` corrupted inputs.
fn run(target: &Target, iters: usize, seed: u64) -> Counts {
    install_hook();
    for (i, s) in target.seeds.iter().enumerate() {
        if let Err(e) = (target.call)(s) {
            panic!("{}: seed {i} is rejected: {e:#}", target.name);
        }
    }
    let mut rng = Rng(rng::Rng::derive(seed, crate::dist::text_hash(target.name) as u64, 0));
    let mut counts = Counts::default();
    let start = Instant::now();
    for i in 0..iters {
        let input = match target.prepare {
            Some(prepare) if rng.chance(30) => {
                let b = prepare(&mut rng);
                if rng.chance(50) {
                    b
                } else {
                    mutate(&mut rng, &b, &target.dict)
                }
            }
            _ => {
                let seed = rng.pick(&target.seeds);
                mutate(&mut rng, seed, &target.dict)
            }
        };
        counts.inputs += 1;
        QUIET.with(|q| q.set(true));
        LARGEST.with(|l| l.set(0));
        WATCHING.with(|w| w.set(true));
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| (target.call)(&input)));
        WATCHING.with(|w| w.set(false));
        QUIET.with(|q| q.set(false));
        let largest = LARGEST.with(Cell::get);
        if largest > counts.largest.0 {
            counts.largest = (largest, input.len());
        }
        match result {
            Ok(Ok(())) => counts.ok += 1,
            Ok(Err(_)) => counts.rejected += 1,
            Err(_) => {
                counts.panics += 1;
                if counts.examples.len() < 3 {
                    let file = std::env::temp_dir().join(format!("kd-fuzz-{}-{i}.bin", target.name));
                    let _ = std::fs::write(&file, &input);
                    let message = LAST_PANIC.with(|p| p.borrow().clone());
                    counts.examples.push(format!("{message} (input saved as {})", file.display()));
                }
            }
        }
    }
    counts.seconds = start.elapsed().as_secs_f64();
    counts
}

// ---------------------------------------------------------------------------------------------
// Seeds and calls of each reader.

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/kaldi");

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(FIXTURES).join(name)).expect("fixture")
}

fn idx_file(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        b.extend_from_slice(&d.to_be_bytes());
    }
    b.extend_from_slice(data);
    b
}

/// A valid image set of `n` images of `rows x cols` pixels: the two IDX files.
fn idx_set(n: u32, rows: u32, cols: u32) -> (Vec<u8>, Vec<u8>) {
    let pixels: Vec<u8> = (0..n * rows * cols).map(|i| (i * 37 % 256) as u8).collect();
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    (idx_file(&[n, rows, cols], &pixels), idx_file(&[n], &labels))
}

/// The first dimension in an IDX header, if it is at most 64, else 1.
fn header_count(b: &[u8]) -> u32 {
    let n = b.get(4..8).map_or(1, |d| u32::from_be_bytes([d[0], d[1], d[2], d[3]]));
    if n <= 64 {
        n
    } else {
        1
    }
}

fn idx_targets() -> Vec<Target> {
    let sets = [idx_set(3, 4, 5), idx_set(1, 1, 1), idx_set(6, 28, 28)];
    let images: Vec<Vec<u8>> = sets.iter().map(|s| s.0.clone()).collect();
    let labels: Vec<Vec<u8>> = sets.iter().map(|s| s.1.clone()).collect();
    let dict: Vec<&'static [u8]> = vec![b"\x00\x00\x08\x03", b"\x00\x00\x08\x01", b"\x1f\x8b"];
    vec![
        Target {
            name: "idx-images",
            seeds: images,
            dict: dict.clone(),
            prepare: None,
            // Valid labels, as many as the header says there are images (up to 64).
            call: Box::new(|b| idx::parse_image_set(b, &idx_set(header_count(b), 1, 1).1, 10).map(drop)),
        },
        Target {
            name: "idx-labels",
            seeds: labels,
            dict,
            prepare: None,
            call: Box::new(|b| idx::parse_image_set(&idx_set(header_count(b), 2, 2).0, b, 10).map(drop)),
        },
    ]
}

const ARK_TOKENS: [&[u8]; 14] =
    [b"FM ", b"DM ", b"CM ", b"CM2 ", b"CM3 ", b"FV ", b"\0B", b"\x04", b"[", b"]", b" ", b"\n", b"utt ", b"[ ]\n"];

fn kaldi_targets(tmp: &Path) -> Vec<Target> {
    let mut arks: Vec<Vec<u8>> =
        ["feats_f32.ark", "feats_f64.ark", "feats_cm.ark", "feats_cm2.ark", "feats_cm3.ark", "feats_text.ark"]
            .iter()
            .map(|n| fixture(n))
            .collect();
    // Small ones, so that corruptions hit headers more often: empty, 1 x 1, mixed text and binary.
    arks.push(b"e \0BFM \x04\0\0\0\0\x04\0\0\0\0u [ 1 2.5\n -3e2 4 ]\n".to_vec());
    arks.push(b"a \0BFM \x04\x01\0\0\0\x04\x01\0\0\0\0\0\x80?".to_vec());
    let alis = vec![fixture("ali.ark"), fixture("ali_text.ark"), b"u1 [ 3 -1 7 ]\nu2 \nu3 5\n".to_vec()];
    // The scp files name the fixtures by absolute path.
    let scp = |name: &str| {
        String::from_utf8(fixture(name)).expect("text").replace(" feats", &format!(" {FIXTURES}/feats")).into_bytes()
    };
    let mut scps = vec![scp("feats.scp"), scp("feats_reordered.scp")];
    scps.push(format!("c {FIXTURES}/feats_f32.ark:1155[1:2]\nd {FIXTURES}/feats_f32.ark:1660[,3:5]\n").into_bytes());
    let scp_file = tmp.join("fuzz.scp");
    vec![
        Target {
            name: "kaldi-ark",
            seeds: arks,
            dict: ARK_TOKENS.to_vec(),
            prepare: None,
            call: Box::new(|b| kaldi::parse_matrix_ark(b).map(drop)),
        },
        Target {
            name: "kaldi-ali",
            seeds: alis,
            dict: ARK_TOKENS.to_vec(),
            prepare: None,
            call: Box::new(|b| kaldi::parse_int_vector_ark(b).map(drop)),
        },
        Target {
            name: "kaldi-scp",
            seeds: scps,
            dict: vec![b":", b"[", b"]", b",", b" ", b"\n", b"|", b"/", b"0:0"],
            prepare: None,
            call: Box::new(move |b| {
                std::fs::write(&scp_file, b)?;
                kaldi::read_matrix_scp(&scp_file).map(drop)
            }),
        },
    ]
}

fn npy_target() -> Target {
    let seeds = ["npy_f32.npy", "npy_f64.npy", "npy_f32_v2.npy", "npy_i32.npy", "npy_i64.npy"].map(fixture).to_vec();
    Target {
        name: "npy",
        seeds,
        dict: vec![b"'<f4'", b"'<i8'", b"'>f4'", b"(", b")", b",", b"{", b"}", b"'", b"True", b"L", b"\x93NUMPY"],
        prepare: None,
        call: Box::new(|b| {
            let path = Path::new("fuzz.npy");
            let matrix = npy::parse_npy_matrix(b, path).map(drop);
            let labels = npy::parse_npy_labels(b, path).map(drop);
            // Each seed is one or the other; the input counts as accepted if either reader takes it.
            matrix.or(labels)
        }),
    }
}

/// A checkpoint's entries as safetensors sees them: name, dtype, shape, little-endian bytes.
type Entries = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

/// The entries of an MLP checkpoint with the given sizes, as `Mlp::to_tensors` writes them.
fn mlp_entries(sizes: &[i64], dropout: [f64; 2], max_norm: f64) -> Entries {
    let f32s = |n: usize, k: usize| (0..n).flat_map(|i| ((i * 7 + k) as f32 / 100.0).to_le_bytes()).collect();
    let mut out: Entries = Vec::new();
    let n = sizes.len();
    for l in 1..n {
        let name = if l == n - 1 { "output".to_string() } else { format!("hidden{l}") };
        let (fan_in, fan_out) = (sizes[l - 1] as usize, sizes[l] as usize);
        out.push((format!("{name}.weight"), Dtype::F32, vec![fan_out, fan_in], f32s(fan_in * fan_out, l)));
        out.push((format!("{name}.bias"), Dtype::F32, vec![fan_out], f32s(fan_out, l + 1)));
    }
    let i64s = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let f64s = |v: &[f64]| v.iter().flat_map(|x| x.to_le_bytes()).collect();
    out.push(("__config__.sizes".into(), Dtype::I64, vec![n], i64s(sizes)));
    out.push(("__config__.dropout".into(), Dtype::F64, vec![2], f64s(&dropout)));
    out.push(("__config__.max_norm".into(), Dtype::F64, vec![1], f64s(&[max_norm])));
    out
}

fn serialize(entries: &Entries) -> Vec<u8> {
    let views: Vec<(String, TensorView)> = entries
        .iter()
        .map(|(name, dtype, shape, data)| {
            (name.clone(), TensorView::new(*dtype, shape.clone(), data).expect("consistent entry"))
        })
        .collect();
    safetensors::serialize(views, &None).expect("serialize")
}

fn checkpoint_seeds() -> Vec<Entries> {
    vec![
        mlp_entries(&[6, 5, 3], [0.0, 0.0], 0.0),
        mlp_entries(&[4, 3], [0.2, 0.5], 3.5),
        mlp_entries(&[20, 8, 8, 10], [0.0, 0.5], 0.0),
    ]
}

/// A seed checkpoint with one or two of its fields rewritten: a stored size, a dropout rate or
/// the max-norm bound set to an edge value, an entry dropped or renamed, a shape changed to
/// another of the same size, a dtype changed (the bytes kept or resized to fit).
fn rewrite_checkpoint(rng: &mut Rng) -> Vec<u8> {
    let mut entries = rng.pick(&checkpoint_seeds()).clone();
    for _ in 0..1 + rng.below(2) {
        if entries.is_empty() {
            break;
        }
        let i = rng.below(entries.len());
        let (name, dtype, shape, data) = &mut entries[i];
        match rng.below(6) {
            0 if name.as_str() == "__config__.sizes" && data.len() >= 8 => {
                let k = rng.below(data.len() / 8);
                let v: i64 = *rng.pick(&[0, -1, 1, 1 << 31, 1 << 40, i64::MAX, 1_000_000_000, 784]);
                data[8 * k..8 * k + 8].copy_from_slice(&v.to_le_bytes());
            }
            1 if *dtype == Dtype::F64 && data.len() >= 8 => {
                let k = rng.below(data.len() / 8);
                let v = *rng.pick(&[f64::NAN, f64::INFINITY, -1.0, 1.0, 0.999, 1e300]);
                data[8 * k..8 * k + 8].copy_from_slice(&v.to_le_bytes());
            }
            2 => {
                entries.remove(i);
            }
            3 => *name = rng.pick(&["hidden9.weight", "output.weight", "__config__.sizes", "x", ""]).to_string(),
            4 => {
                let numel: usize = shape.iter().product();
                *shape = rng.pick(&[vec![numel], vec![1, numel], vec![numel, 1], vec![]]).clone();
                if shape.is_empty() && numel != 1 {
                    *shape = vec![numel];
                }
            }
            _ => {
                let numel: usize = shape.iter().product();
                let to =
                    *rng.pick(&[Dtype::F32, Dtype::F64, Dtype::I32, Dtype::I64, Dtype::BOOL, Dtype::F16, Dtype::U8]);
                data.resize(numel * to.size(), 1);
                *dtype = to;
            }
        }
    }
    // Renaming can leave two entries of one name, which a file cannot hold.
    let mut seen = std::collections::HashSet::new();
    entries.retain(|e| seen.insert(e.0.clone()));
    serialize(&entries)
}

fn checkpoint_target() -> Target {
    Target {
        name: "checkpoint",
        seeds: checkpoint_seeds().iter().map(serialize).collect(),
        dict: vec![
            b"\"F32\"",
            b"\"I64\"",
            b"\"BF16\"",
            b"\"F64\"",
            b"\"shape\":[",
            b"\"data_offsets\":[",
            b"[",
            b"]",
            b"{",
            b"}",
            b",",
            b"-1",
            b"\"__config__.sizes\"",
        ],
        prepare: Some(rewrite_checkpoint),
        call: Box::new(|b| {
            let named = output::parse_tensors(b)?;
            kd_models::Mlp::from_tensors(&named, tch::Device::Cpu)?;
            Ok(())
        }),
    }
}

fn toml_target(tmp: &Path) -> Target {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments");
    let mut files: Vec<PathBuf> = Vec::new();
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("experiments/").flatten() {
            let p = entry.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|e| e == "toml") {
                files.push(p);
            }
        }
    }
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).expect("experiment")).collect();
    let path = tmp.join("fuzz.toml");
    Target {
        name: "toml",
        seeds,
        dict: vec![
            b"[[stages]]\nname = \"s\"\nkind = \"train\"\n",
            b"[data]\n",
            b"name = \"x\"\n",
            b"kind = \"distill\"\n",
            b"teacher = \"s\"\n",
            b"from = \"x.safetensors\"\n",
            b"sweep = { seed = [1, 2] }\n",
            b"[[[",
            b"{",
            b"}",
            b"[",
            b"]",
            b"=",
            b"\"",
            b"'''",
            b"\n",
            b".",
            b"#",
            b"nan",
        ],
        prepare: None,
        call: Box::new(move |b| {
            std::fs::write(&path, b)?;
            config::load(&path, &[]).map(drop)
        }),
    }
}

/// A small frame store in `tmp/fuzz-store` (two shards, f16) with a top-k targets file
/// `t.kdt` (k = 2, context [1, 1]); the three readers of a store, each on one of its files
/// corrupted, the others left valid.
fn store_targets(tmp: &Path) -> Vec<Target> {
    use crate::data::store::{FeatureKind, FrameStore, StoreWriter, MANIFEST};
    use crate::data::targets::{TargetsWriter, TopKFile};
    let dir = tmp.join("fuzz-store");
    let _ = std::fs::remove_dir_all(&dir);
    let mut w = StoreWriter::create(&dir, "0123456789abcdef", FeatureKind::F16, 3, 20).expect("store");
    for u in 0..6u32 {
        let n = 3 + u as usize * 2;
        let f: Vec<f32> = (0..3 * n).map(|i| (i as f32 * 0.3 + u as f32).sin()).collect();
        w.push(u % 2, &f, &(0..n as u32).map(|t| (t + u) % 5).collect::<Vec<_>>()).expect("push");
    }
    w.finish("fuzz").expect("finish");
    let store = FrameStore::open(&dir).expect("the seed store");
    let mut t = TargetsWriter::create(&dir.join("t.kdt"), &store, 2, 2.0, (1, 1)).expect("targets");
    for n in store.utterance_lengths() {
        let probs: Vec<f32> = (0..2 * n as usize).map(|i| if i % 2 == 0 { 0.75 } else { 0.25 }).collect();
        let ids: Vec<i64> = (0..2 * n as i64).map(|i| i % 5).collect();
        let kept: Vec<f32> = (0..n).map(|i| 0.5 + 0.1 * (i % 5) as f32).collect();
        t.push(&probs, &ids, &kept).expect("push targets");
    }
    t.finish().expect("finish targets");
    let read_all = |dir: &Path| -> Result<FrameStore> {
        let store = FrameStore::open(dir)?;
        let (mut f, mut l) = (Vec::new(), Vec::new());
        (0..store.index.len()).try_for_each(|u| store.read(u, &mut f, &mut l))?;
        Ok(store)
    };
    let file = |name: &str| std::fs::read(dir.join(name)).expect("store file");
    let (manifest, shard, topk) = (file(MANIFEST), file("shard-00000.kdf"), file("t.kdt"));
    // Each target corrupts its own copy of the store.
    let copy = |name: &str| {
        let to = tmp.join(name);
        std::fs::create_dir_all(&to).expect("fuzz store copy");
        for f in std::fs::read_dir(&dir).expect("fuzz store").flatten() {
            std::fs::copy(f.path(), to.join(f.file_name())).expect("copy");
        }
        to
    };
    let (a, b, c) = (copy("fuzz-store-toml"), copy("fuzz-store-shard"), copy("fuzz-store-topk"));
    vec![
        Target {
            name: "store-toml",
            seeds: vec![manifest],
            dict: vec![
                b"shard-00000.kdf",
                b"nan",
                b"inf",
                b"-1",
                b"0",
                b"=",
                b"[",
                b"]",
                b"\n",
                b"\"",
                b"[[shards]]\n",
            ],
            prepare: None,
            call: Box::new(move |bytes| {
                std::fs::write(a.join(MANIFEST), bytes)?;
                read_all(&a).map(drop)
            }),
        },
        Target {
            name: "store-shard",
            seeds: vec![shard],
            dict: vec![b"KDFRAME1", b"\x02\0\0\0", b"\x01\0\0\0"],
            prepare: None,
            call: Box::new(move |bytes| {
                std::fs::write(b.join("shard-00000.kdf"), bytes)?;
                read_all(&b).map(drop)
            }),
        },
        Target {
            name: "store-topk",
            seeds: vec![topk],
            dict: vec![b"KDTOPK01", b"\x02\0\0\0", b"\x01\0\0\0"],
            prepare: None,
            call: Box::new(move |bytes| {
                std::fs::write(c.join("t.kdt"), bytes)?;
                let store = FrameStore::open(&c)?;
                let file = TopKFile::open(&c.join("t.kdt"), &store, (1, 1))?;
                let (mut p, mut i) = (Vec::new(), Vec::new());
                for (u, n) in store.utterance_lengths().into_iter().enumerate() {
                    file.read_frames((u, 0, n as usize), &mut p, &mut i)?;
                }
                Ok(())
            }),
        },
    ]
}

fn targets(tmp: &Path) -> Vec<Target> {
    let mut all = idx_targets();
    all.extend(kaldi_targets(tmp));
    all.push(npy_target());
    all.push(checkpoint_target());
    all.push(toml_target(tmp));
    all.extend(store_targets(tmp));
    all
}

/// Runs every reader on `iters` inputs; prints a line per reader and fails on any panic or on
/// an allocation out of proportion to its input.
fn fuzz_all(iters: usize, name: &str) {
    let seed = std::env::var("KD_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(17);
    // The scp and TOML readers take files: write them to memory where there is a tmpfs (a write
    // to a disk can cost milliseconds).
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
    let tmp = crate::testutil::TempDir(dir.join(format!("kd-run-{}-{name}", std::process::id())));
    std::fs::create_dir_all(&tmp.0).expect("fuzz directory");
    let mut failures = Vec::new();
    println!(
        "{:<12} {:>9} {:>9} {:>9} {:>7} {:>13} {:>8}",
        "reader", "inputs", "ok", "rejected", "panics", "largest alloc", "seconds"
    );
    for target in targets(&tmp.0) {
        let c = run(&target, iters, seed);
        println!(
            "{:<12} {:>9} {:>9} {:>9} {:>7} {:>10} KB {:>8.1}",
            target.name,
            c.inputs,
            c.ok,
            c.rejected,
            c.panics,
            c.largest.0 / 1024,
            c.seconds
        );
        if c.panics > 0 {
            failures.push(format!("{}: {} panics, e.g. {}", target.name, c.panics, c.examples.join("; ")));
        }
        // Generous: buffers, decoded floats and parse trees are a few times the input; a size
        // taken from a corrupted header is not.
        let (largest, len) = c.largest;
        if largest > (1 << 20) + 256 * len {
            failures.push(format!("{}: an allocation of {largest} bytes for an input of {len}", target.name));
        }
        assert_eq!(c.inputs, c.ok + c.rejected + c.panics);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A short run inside the test command: a few thousand inputs per reader.
#[test]
fn fuzz_readers_briefly() {
    fuzz_all(2000, "fuzz-brief");
}

/// The long run; see the module documentation.
#[test]
#[ignore = "long: a million inputs per reader"]
fn fuzz_readers_long() {
    let iters = std::env::var("KD_FUZZ_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    fuzz_all(iters, "fuzz-long");
}

#[test]
fn mutations_stay_bounded_and_vary() {
    let mut rng = Rng(rng::Rng::new(1));
    let seed = b"0123456789 abcdef".to_vec();
    let outs: Vec<Vec<u8>> = (0..1000).map(|_| mutate(&mut rng, &seed, &[b"[["])).collect();
    assert!(outs.iter().all(|o| o.len() <= 4 * seed.len() + 256));
    let distinct: std::collections::HashSet<&Vec<u8>> = outs.iter().collect();
    assert!(distinct.len() > 800, "{} distinct inputs of 1000", distinct.len());
    assert!(outs.iter().any(|o| o.len() < seed.len()) && outs.iter().any(|o| o.len() > seed.len()));
}
