//! `kd-run store`: writes an experiment's frames as frame stores, checks a store, and times
//! its producer against the training step (see docs/frame-store.md).

use crate::config::{self, DataSource};
use crate::data::speech::{self, CorpusModel, Utterance};
use crate::data::store::{self as frames, FeatureKind, FrameStore, StoreWriter, MANIFEST};
use anyhow::{bail, ensure, Context, Result};
use clap::Subcommand;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::Instant;
use tch::Device;

/// Options of `kd-run store`.
#[derive(clap::Args)]
pub struct StoreArgs {
    #[command(subcommand)]
    command: StoreCommand,
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Write the frames of an experiment's data (`kind = "speech"` or `"files"`) as three frame
    /// stores, OUT/train, OUT/validation and OUT/test.
    Write {
        /// The experiment file whose [data] to write.
        experiment: PathBuf,
        /// Override a setting, as for `run` (e.g. `data.speech.speakers=2000`).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// The folder of the three stores (created; must not hold stores yet, unless --replace;
        /// not a symbolic link). Locked (OUT/store.lock) while written: one writer at a time.
        #[arg(long)]
        out: PathBuf,
        /// Replace the stores OUT already holds (their manifests first, then their shards).
        #[arg(long)]
        replace: bool,
        /// How features are stored.
        #[arg(long, value_enum, default_value_t = FeatureKind::F16)]
        kind: FeatureKind,
        /// Frames per shard (a new shard starts after this many).
        #[arg(long, default_value_t = 1 << 22)]
        shard_frames: u64,
        /// Threads generating synthetic speakers (0: all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Compute a teacher's (or an ensemble's) top-k soft targets for every frame of a store in
    /// one pass and write them beside it, as DIR/NAME.
    Targets {
        /// The store's folder (normally OUT/train of `store write`).
        dir: PathBuf,
        /// A teacher checkpoint (repeat for an ensemble: the mean of the members' softmax at T).
        #[arg(long = "teacher", required = true)]
        teachers: Vec<PathBuf>,
        /// Targets kept per frame.
        #[arg(long, default_value_t = 10)]
        k: usize,
        /// The temperature T of the soft targets.
        #[arg(long, default_value_t = 2.0)]
        temperature: f64,
        /// The file name inside DIR.
        #[arg(long, default_value = "teacher.kdt")]
        name: String,
        /// Frames of left and right context of the teacher's windows.
        #[arg(long, num_args = 2, default_values_t = config::DEFAULT_CONTEXT.map(|n| n as usize))]
        context: Vec<usize>,
        /// Windows per teacher pass.
        #[arg(long, default_value_t = 4096)]
        batch: usize,
        /// Where the teacher runs: `auto` (the first GPU if libtorch sees one, else the CPU),
        /// `cpu`, `cuda` or `cuda:N`.
        #[arg(long, default_value = "auto")]
        device: crate::device::Choice,
    },
    /// Check a store: its manifest, every shard's header and sections and every utterance's
    /// checksum; given the folder of `store write`'s three splits, each of them and that they
    /// were written together.
    Check {
        /// The store's folder (one split, with store.toml), or the folder of the three.
        dir: PathBuf,
    },
}

/// Runs `kd-run store`.
pub fn store(args: &StoreArgs) -> Result<()> {
    match &args.command {
        StoreCommand::Write { experiment, overrides, out, replace, kind, shard_frames, threads } => {
            let exp = config::load(experiment, overrides)?;
            let threads =
                if *threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { *threads };
            write(&exp.data.source, (out, *replace), *kind, *shard_frames, threads)
        }
        StoreCommand::Check { dir } => check(dir),
        StoreCommand::Targets { dir, teachers, k, temperature, name, context, batch, device } => {
            let device = device.select("--device")?;
            ensure!(
                !name.contains(['/', '\\']) && name.len() > 4 && name.ends_with(".kdt"),
                "--name {name}: expected a file name ending in .kdt"
            );
            crate::data::targets::check_temperature(*temperature, "--temperature")?;
            let max = crate::config::MAX_CONTEXT as usize;
            ensure!(
                context.iter().all(|&c| c <= max),
                "--context {} {}: expected at most {max} frames each side",
                context[0],
                context[1]
            );
            targets(dir, teachers, (*k, *temperature), name, (context[0], context[1]), *batch, device)
        }
    }
}

fn targets(
    dir: &Path,
    teachers: &[PathBuf],
    (k, temperature): (usize, f64),
    name: &str,
    context: (usize, usize),
    batch: usize,
    device: Device,
) -> Result<()> {
    let started = Instant::now();
    let store = FrameStore::open(dir)?;
    let width = (context.0 + 1 + context.1) * store.manifest.feature_dim;
    let members = teachers
        .iter()
        .map(|p| {
            let named = crate::run::output::load_tensors(p)?;
            crate::run::output::check_finite(p, &named)?;
            let (_, net) =
                kd_models::Mlp::from_tensors(&named, device).with_context(|| format!("loading {}", p.display()))?;
            let c = net.config();
            ensure!(
                c.input_dim() == width as i64 && c.num_classes() as u64 >= store.manifest.classes,
                "{} is a {} network; the store's {}-frame windows have {width} inputs and {} classes",
                p.display(),
                c.describe(),
                context.0 + 1 + context.1,
                store.manifest.classes
            );
            ensure!(
                c.num_classes() as u64 == store.manifest.classes,
                "{} has {} outputs, the store {} classes",
                p.display(),
                c.num_classes(),
                store.manifest.classes
            );
            Ok(net.frozen())
        })
        .collect::<Result<Vec<_>>>()?;
    ensure!(k >= 1 && (k as u64) < store.manifest.classes, "--k {k}: between 1 and the classes minus one");
    let objective = kd_core::Objective::soft_targets(temperature, kd_core::LossWeights::default())?;
    let teacher = |x: &tch::Tensor| -> Result<tch::Tensor> {
        use tch::nn::ModuleT;
        let z: Vec<tch::Tensor> = members.iter().map(|m| m.forward_t(x, false)).collect();
        Ok(objective.ensemble_logits(&z)?)
    };
    let path = dir.join(name);
    frames::refuse_link(dir)?;
    let (bytes, kept) =
        crate::data::targets::write_top_k(&store, &path, &teacher, &objective, k, context, batch, device)?;
    let frames = store.manifest.frames;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}: top-{k} targets at T = {temperature} of {} teacher network{} for {frames} frames: {:.3} GB \
         ({} bytes a frame: {k} x f16 probabilities, {k} x u{} class ids; the store's frames take {:.0}); \
         {secs:.1} s, {:.0} frames/s",
        path.display(),
        members.len(),
        if members.len() == 1 { "" } else { "s" },
        bytes as f64 / 1e9,
        (bytes - crate::data::store::HEADER_BYTES) / frames.max(1),
        8 * crate::data::targets::id_bytes(store.manifest.classes),
        store.bytes() as f64 / frames.max(1) as f64,
        frames as f64 / secs
    );
    println!(
        "share of the teacher's probability mass at T = {temperature} the top {k} keep, over the {frames} frames: {} \
         (percentiles to 1e-4; the targets are renormalized over the {k}, so 1 - share is what they leave out)",
        kept.describe()
    );
    Ok(())
}

/// The lock file `store write` holds in its `--out` folder.
const LOCK: &str = "store.lock";

/// Takes `dir/store.lock` exclusively (an advisory `flock`, released when the process ends,
/// however it ends) and writes this process's id and command line into it; fails, naming the
/// holder, while another process holds it. The lock file is never a link.
fn lock_folder(dir: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(LOCK);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .with_context(|| format!("cannot open the lock file {} (a symbolic link is refused)", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            bail!(
                "{} is being written by another kd-run process ({}); wait until it ends, or write elsewhere",
                dir.display(),
                crate::inputs::clip(holder.trim(), 200)
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
    let command: Vec<String> = std::env::args().collect();
    file.set_len(0)?;
    std::io::Write::write_all(&mut file, format!("pid {} {}\n", std::process::id(), command.join(" ")).as_bytes())?;
    Ok(file)
}

/// Removes the store in `dir` for `--replace`: its manifest first (from then on the store is
/// unfinished), then its shards and temporaries. Names are removed, never followed; a run still
/// reading the old shards keeps reading the files it opened.
fn remove_store(dir: &Path) -> Result<()> {
    std::fs::remove_file(dir.join(MANIFEST))
        .with_context(|| format!("cannot remove {}", dir.join(MANIFEST).display()))?;
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if (name.starts_with("shard-") && name.ends_with(".kdf")) || name.ends_with(".tmp") {
            std::fs::remove_file(entry.path()).with_context(|| format!("cannot remove {}", entry.path().display()))?;
        }
    }
    Ok(())
}

fn write(
    source: &DataSource,
    (out, replace): (&Path, bool),
    kind: FeatureKind,
    shard_frames: u64,
    threads: usize,
) -> Result<()> {
    frames::refuse_link(out)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    frames::refuse_link(out)?;
    let _lock = lock_folder(out)?;
    for split in SPLITS {
        let dir = out.join(split);
        frames::refuse_link(&dir)?;
        if dir.join(MANIFEST).exists() {
            ensure!(
                replace,
                "{} already holds a frame store; remove it, write elsewhere, or pass --replace",
                dir.display()
            );
            remove_store(&dir)?;
        }
    }
    let set_id = frames::new_set_id();
    match source {
        DataSource::Speech(spec) => {
            let model = CorpusModel::new(&spec.corpus)?;
            let (train, dev, test) = speech::split_speakers(&spec.corpus);
            let what = format!("synthetic speech {:?}", spec.corpus);
            for (split, speakers) in SPLITS.iter().zip([train, dev, test]) {
                let dir = out.join(split);
                let started = Instant::now();
                let mut w = StoreWriter::create(&dir, &set_id, kind, spec.corpus.feature_dim, shard_frames)?;
                w.declare_classes(spec.corpus.states as u64);
                generate(&model, &speakers, threads, |speaker, utts| {
                    for u in utts {
                        let labels: Vec<u32> = u.states.iter().map(|&k| k as u32).collect();
                        w.push(speaker as u32, &u.features, &labels)?;
                    }
                    Ok(())
                })?;
                let m = w.finish(&format!("{what}, {} speakers", speakers.len()))?;
                report(&dir, &m, started, &format!("{threads} generator threads"));
            }
        }
        DataSource::Files(files) => {
            for (split, set) in SPLITS.iter().zip([&files.train, &files.validation, &files.test]) {
                let dir = out.join(split);
                let started = Instant::now();
                // One utterance at a time: the store is created with the first one's width.
                let mut writer: Option<StoreWriter> = None;
                let mut labels = Vec::new();
                crate::data::for_each_utterance(set, |dim, u| {
                    let w = match &mut writer {
                        Some(w) => w,
                        None => writer.insert(StoreWriter::create(&dir, &set_id, kind, dim, shard_frames)?),
                    };
                    labels.clear();
                    labels.extend(u.states.iter().map(|&k| k as u32));
                    w.push(0, &u.features, &labels)
                })
                .with_context(|| format!("data.files.{split}"))?;
                let Some(mut w) = writer else {
                    bail!("data.files.{split}: no frames in {}", set.features.display());
                };
                if let Some(classes) = files.classes {
                    w.declare_classes(classes as u64);
                }
                let m = w.finish(&format!("{} with labels {}", set.features.display(), set.labels.display()))?;
                report(&dir, &m, started, "one thread, one utterance at a time");
            }
        }
        DataSource::Mnist { .. } => bail!("a frame store holds speech frames; MNIST images are read as they are"),
        DataSource::Store(_) => bail!("the experiment already reads a frame store"),
    }
    Ok(())
}

const SPLITS: [&str; 3] = ["train", "validation", "test"];

fn report(dir: &Path, m: &crate::data::store::Manifest, started: Instant, how: &str) {
    let secs = started.elapsed().as_secs_f64();
    let bytes: u64 = m.shards.iter().map(|s| s.bytes).sum();
    println!(
        "{}: {} frames ({:.1} hours at 10 ms), {} utterances, {} classes, {} shards, {:.2} GB ({:?}); \
         {:.1} s, {:.0} frames/s, {:.0} MB/s ({how})",
        dir.display(),
        m.frames,
        m.frames as f64 / 360_000.0,
        m.utterances,
        m.classes,
        m.shards.len(),
        bytes as f64 / 1e9,
        m.feature_kind,
        secs,
        m.frames as f64 / secs,
        bytes as f64 / 1e6 / secs
    );
}

/// Generates `speakers` on `threads` threads and hands each speaker's utterances to `sink` in
/// the order of `speakers` (so the store does not depend on the thread count). Worker `i`
/// generates speakers `i, i + threads, ...`, each at most two speakers ahead of the writer.
fn generate(
    model: &CorpusModel,
    speakers: &[usize],
    threads: usize,
    mut sink: impl FnMut(usize, Vec<Utterance>) -> Result<()>,
) -> Result<()> {
    let threads = threads.clamp(1, speakers.len().max(1));
    std::thread::scope(|scope| {
        let receivers: Vec<_> = (0..threads)
            .map(|i| {
                let (tx, rx) = sync_channel::<Vec<Utterance>>(2);
                scope.spawn(move || {
                    for &s in speakers.iter().skip(i).step_by(threads) {
                        if tx.send(model.generate_speaker(s)).is_err() {
                            break;
                        }
                    }
                });
                rx
            })
            .collect();
        for (n, &s) in speakers.iter().enumerate() {
            let utts = receivers[n % threads].recv().context("a generator thread stopped")?;
            sink(s, utts)?;
        }
        Ok(())
    })
}

fn check(dir: &Path) -> Result<()> {
    if !dir.join(MANIFEST).exists() && SPLITS.iter().all(|s| dir.join(s).join(MANIFEST).exists()) {
        for split in SPLITS {
            check(&dir.join(split))?;
        }
        let open = |s: &str| FrameStore::open(&dir.join(s));
        let train = open("train")?;
        for split in &SPLITS[1..] {
            frames::check_same_set(&train, &open(split)?)?;
        }
        println!("{}: ok: its three splits were written together (store set {})", dir.display(), train.manifest.set);
        return Ok(());
    }
    let started = Instant::now();
    let store = FrameStore::open(dir)?;
    let (mut f, mut l) = (Vec::new(), Vec::new());
    let mut speakers = std::collections::HashSet::new();
    for u in 0..store.index.len() {
        store.read(u, &mut f, &mut l)?;
        speakers.insert(store.speaker(u));
    }
    let m = &store.manifest;
    println!(
        "{}: ok: {} frames, {} utterances, {} speakers, {} classes, {} x {:?}, {} shards, {:.2} GB; every checksum read in {:.1} s",
        dir.display(),
        m.frames,
        m.utterances,
        speakers.len(),
        m.classes,
        m.feature_dim,
        m.feature_kind,
        m.shards.len(),
        store.bytes() as f64 / 1e9,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FileSet, FilesSpec};
    use crate::testutil::TempDir;

    fn kaldi(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kaldi").join(name)
    }

    fn set(features: PathBuf, labels: PathBuf) -> FileSet {
        FileSet { features, labels, lengths: None }
    }

    /// Writes the three splits as f32 stores of `shard_frames`-frame shards and checks each
    /// reads back frame for frame as `read_file_set` reads the files.
    fn round_trip(out: &Path, [train, validation, test]: [FileSet; 3], shard_frames: u64) {
        let sets = [train.clone(), validation.clone(), test.clone()];
        let spec = FilesSpec { left: 0, right: 0, classes: None, train, validation, test };
        write(&DataSource::Files(spec), (out, false), FeatureKind::F32, shard_frames, 1).unwrap();
        for (split, set) in SPLITS.iter().zip(&sets) {
            let store = FrameStore::open(&out.join(split)).unwrap();
            let want = crate::data::read_file_set(set).unwrap();
            assert_eq!(store.index.len(), want.len(), "{split}: utterances");
            let (mut f, mut l) = (Vec::new(), Vec::new());
            for (u, (dim, w)) in want.iter().enumerate() {
                assert_eq!(store.manifest.feature_dim, *dim);
                store.read(u, &mut f, &mut l).unwrap();
                assert_eq!(f, w.features, "{split}: utterance {u}");
                assert!(l.iter().zip(&w.states).all(|(&a, &b)| a as i32 == b) && l.len() == w.states.len());
            }
            let frames: usize = want.iter().map(|(_, u)| u.states.len()).sum();
            assert_eq!(store.manifest.frames, frames as u64, "{split}");
        }
    }

    #[test]
    fn kaldi_and_npy_files_are_written_as_stores_equal_to_what_the_readers_read() {
        let out = TempDir::new("store-write-kaldi");
        round_trip(
            &out.0,
            [
                set(kaldi("feats.scp"), kaldi("ali.ark")),
                set(kaldi("feats_cm.ark"), kaldi("ali_text.ark")),
                set(kaldi("feats_reordered.scp"), kaldi("ali.ark")),
            ],
            5,
        );
        let store = FrameStore::open(&out.0.join("train")).unwrap();
        assert_eq!((store.manifest.utterances, store.manifest.frames), (3, 21));
        assert!(store.manifest.shards.len() >= 2, "{:?}", store.manifest.shards);

        let dir = TempDir::new("store-write-npy-in");
        let corpus = crate::testutil::npy_corpus(&dir, 20_000);
        let out = TempDir::new("store-write-npy");
        round_trip(&out.0, [corpus.clone(), corpus.clone(), corpus], 4096);
        let store = FrameStore::open(&out.0.join("test")).unwrap();
        assert_eq!(store.manifest.frames, 20_000);
        assert!(store.manifest.shards.len() >= 4);
    }

    #[test]
    fn one_writer_at_a_time_and_a_store_is_replaced_only_when_asked() {
        let out = TempDir::new("store-write-lock");
        let held = lock_folder(&out.0).unwrap();
        let e = format!("{:#}", lock_folder(&out.0).unwrap_err());
        assert!(e.contains("being written by another kd-run process (pid "), "{e}");
        let npy = crate::testutil::npy_corpus(&out, 2000);
        let spec = || {
            let (t, v, s) = (npy.clone(), npy.clone(), npy.clone());
            DataSource::Files(FilesSpec { left: 0, right: 0, classes: None, train: t, validation: v, test: s })
        };
        let stores = out.0.join("s");
        std::fs::create_dir_all(&stores).unwrap();
        let lock = lock_folder(&stores).unwrap();
        let e = format!("{:#}", write(&spec(), (&stores, false), FeatureKind::F32, 100, 1).unwrap_err());
        assert!(e.contains("being written by another"), "{e}");
        assert!(!stores.join("train").exists(), "nothing written");
        drop((held, lock));
        write(&spec(), (&stores, false), FeatureKind::F32, 100, 1).unwrap();
        let first = FrameStore::open(&stores.join("train")).unwrap().manifest;
        let e = format!("{:#}", write(&spec(), (&stores, false), FeatureKind::F32, 1 << 20, 1).unwrap_err());
        assert!(e.contains("already holds a frame store") && e.contains("--replace"), "{e}");
        write(&spec(), (&stores, true), FeatureKind::F32, 1 << 20, 1).unwrap();
        let second = FrameStore::open(&stores.join("train")).unwrap().manifest;
        assert!(second.set != first.set && second.shards.len() < first.shards.len(), "replaced");
        let shards = std::fs::read_dir(stores.join("train"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".kdf"));
        assert_eq!(shards.count(), second.shards.len(), "no shard of the old store left");
        check(&stores).unwrap();
    }

    #[test]
    fn features_without_alignments_leave_the_store_unfinished() {
        let dir = TempDir::new("store-write-mismatch");
        let ali = crate::data::kaldi::read_int_vector_ark(&kaldi("ali.ark")).unwrap();
        let text: String = ali[..2]
            .iter()
            .map(|(id, v)| format!("{id} {}\n", v.iter().map(i32::to_string).collect::<Vec<_>>().join(" ")))
            .collect();
        let two = dir.write("two.ark", text.as_bytes());
        let good = set(kaldi("feats.scp"), kaldi("ali.ark"));
        let spec = FilesSpec {
            left: 0,
            right: 0,
            classes: None,
            train: set(kaldi("feats_f32.ark"), two),
            validation: good.clone(),
            test: good,
        };
        let out = dir.0.join("out");
        let e = format!("{:#}", write(&DataSource::Files(spec), (&out, false), FeatureKind::F16, 100, 1).unwrap_err());
        assert!(e.contains("data.files.train") && e.contains("pairing"), "{e}");
        assert!(e.contains("1 of 3 feature utterances have no alignment ('spk2-utt1')"), "{e}");
        assert!(!out.join("train").join(MANIFEST).exists(), "no manifest: unfinished");
    }
}
