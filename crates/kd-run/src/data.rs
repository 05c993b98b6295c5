//! Datasets held on the training device, their splits, minibatch order and jitter.

use crate::config::{DataSource, DataSpec, FileSet, FilesSpec, SpeechSpec, StoreSpec, MAX_CLASSES};
use anyhow::{bail, ensure, Context, Result};
use kd_models::BatchRows;
use std::path::Path;
use tch::{Device, Kind, Tensor};

pub mod batch;
pub mod idx;
pub mod kaldi;
pub mod npy;
pub mod speech;
pub mod store;
pub mod stream;
pub mod targets;

/// Examples and labels of one split, on the device.
pub struct Split {
    /// `[n, features]`: flattened images in [0, 1], or speech frames.
    pub images: Tensor,
    /// `[n]` int64 class ids.
    pub labels: Tensor,
    /// For speech: each example is a window of frames around it, built per batch.
    pub windows: Option<Windows>,
}

/// Context windows over the frames of a speech split, normalized with training statistics.
pub struct Windows {
    /// The frames with their utterance boundaries.
    pub frames: speech::FrameSet,
    /// Frames of left context.
    pub left: i64,
    /// Frames of right context.
    pub right: i64,
    /// `[1, (left + 1 + right) * D]` mean and standard deviation of the training frames, tiled.
    pub mean: Tensor,
    /// See `mean`.
    pub std: Tensor,
}

impl Split {
    /// A split of plain examples.
    pub fn new(images: Tensor, labels: Tensor) -> Self {
        Split { images, labels, windows: None }
    }

    /// Number of examples.
    pub fn len(&self) -> i64 {
        self.labels.size()[0]
    }

    /// The same split, sharing its tensors.
    pub fn view(&self) -> Split {
        let windows = self.windows.as_ref().map(|w| Windows {
            frames: speech::FrameSet {
                features: w.frames.features.shallow_clone(),
                labels: w.frames.labels.shallow_clone(),
                utt_start: w.frames.utt_start.shallow_clone(),
                utt_end: w.frames.utt_end.shallow_clone(),
            },
            left: w.left,
            right: w.right,
            mean: w.mean.shallow_clone(),
            std: w.std.shallow_clone(),
        });
        Split { images: self.images.shallow_clone(), labels: self.labels.shallow_clone(), windows }
    }

    /// Width of one input.
    pub fn input_dim(&self) -> i64 {
        let d = self.images.size()[1];
        self.windows.as_ref().map_or(d, |w| d * (w.left + 1 + w.right))
    }

    /// The inputs of examples `idx` (int64 on the device).
    pub fn inputs(&self, idx: &Tensor) -> Tensor {
        match &self.windows {
            None => self.images.index_select(0, idx),
            Some(w) => (speech::context_windows(&w.frames, idx, w.left, w.right) - &w.mean) / &w.std,
        }
    }

    /// The inputs of examples `start .. start + len`.
    pub fn range(&self, start: i64, len: i64) -> Tensor {
        match &self.windows {
            None => self.images.narrow(0, start, len),
            Some(_) => self.inputs(&Tensor::arange_start(start, start + len, (Kind::Int64, self.labels.device()))),
        }
    }

    /// The examples `idx` as a split of their own (plain examples only: a window needs its
    /// neighbours).
    pub fn subset(&self, idx: &Tensor) -> Result<Split> {
        if self.windows.is_some() {
            bail!("selecting classes of a transfer set is not supported for speech frames yet");
        }
        Ok(Split::new(self.images.index_select(0, idx), self.labels.index_select(0, idx)))
    }

    fn narrow(&self, start: i64, len: i64) -> Split {
        Split::new(self.images.narrow(0, start, len), self.labels.narrow(0, start, len))
    }
}

/// Training, validation and test splits of a classification dataset.
pub struct Dataset {
    /// Training examples (the training file minus the validation split; training speakers).
    pub train: Split,
    /// The last `validation` examples of the training file (development speakers), if any.
    pub validation: Option<Split>,
    /// The test examples.
    pub test: Split,
    /// Image height and width, for jitter (None for speech).
    pub geometry: Option<(i64, i64)>,
    /// Number of classes.
    pub num_classes: i64,
    /// With `data.kind = "store"`: the training frames, streamed (`train` then holds a sample
    /// of them, for `train_accuracy`).
    pub stream: Option<StoreData>,
}

impl Dataset {
    /// What every rank of a data-parallel run must have read alike, each with a 64-bit hash:
    /// the examples of each split as loaded (values and labels, and for speech the frames and
    /// their utterance bounds); for a frame store also the training store's manifest (its
    /// shards' checksums) and the header of its top-k targets file.
    pub fn fingerprints(&self) -> Result<Vec<(&'static str, i64)>> {
        let split = |s: &Split| {
            let mut named = vec![("images", &s.images), ("labels", &s.labels)];
            if let Some(w) = &s.windows {
                let f = &w.frames;
                named.extend([
                    ("features", &f.features),
                    ("states", &f.labels),
                    ("utt_start", &f.utt_start),
                    ("utt_end", &f.utt_end),
                    ("mean", &w.mean),
                    ("std", &w.std),
                ]);
            }
            crate::dist::tensors_hash(named)
        };
        let mut out = vec![("the training examples", split(&self.train)), ("the test examples", split(&self.test))];
        if let Some(v) = &self.validation {
            out.push(("the validation examples", split(v)));
        }
        if let Some(s) = &self.stream {
            let manifest = toml::to_string(&s.store.manifest).context("the training store's manifest")?;
            out.push(("the training store's manifest", crate::dist::text_hash(&manifest)));
            if let Some(name) = &s.spec.targets {
                let path = s.spec.dir.join("train").join(name);
                let mut header = vec![0u8; store::HEADER_BYTES as usize];
                let mut f = std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
                let read = std::io::Read::read(&mut f, &mut header)?;
                header.truncate(read);
                let len = f.metadata()?.len();
                let text = format!("{len} {header:?}");
                out.push(("the top-k targets file's header", crate::dist::text_hash(&text)));
            }
        }
        Ok(out)
    }
}

/// A training store opened for streaming, with how to stream it.
pub struct StoreData {
    /// The store.
    pub store: std::sync::Arc<store::FrameStore>,
    /// Its utterance lengths, in store order.
    pub lengths: std::sync::Arc<Vec<u32>>,
    /// The settings of `[data.store]`.
    pub spec: StoreSpec,
    /// A teacher's top-k targets for the training store, streamed with the batches.
    pub targets: Option<std::sync::Arc<targets::TopKFile>>,
}

impl StoreData {
    /// The stream settings for batches of `batch_size` and shuffles seeded with `seed`.
    pub fn settings(&self, batch_size: i64, seed: u64) -> stream::StreamSettings {
        stream::StreamSettings {
            batch_size: batch_size as usize,
            left: self.spec.left as usize,
            right: self.spec.right as usize,
            buffer: self.spec.shuffle_buffer,
            chunk_frames: self.spec.chunk_frames,
            prefetch: self.spec.prefetch,
            epoch_fraction: self.spec.epoch_fraction,
            seed,
        }
    }

    /// Examples and steps of one epoch's stream on one rank of `world` (the same on every rank).
    pub fn plan(&self, batch_size: i64, seed: u64, epoch: u64, world: usize) -> Result<(u64, usize)> {
        let shard = stream::rank_shard(&self.lengths, seed, epoch, 0, world)?;
        Ok(stream::epoch_plan(shard.common_frames, &self.settings(batch_size, seed)))
    }

    /// The stream of `start.rank` of `start.world` in `start.epoch`, from batch `start.batch` on,
    /// for training on `device`: what data-parallel training calls with its rank.
    pub fn stream(
        &self,
        batch_size: i64,
        seed: u64,
        start: stream::StreamStart,
        device: Device,
    ) -> Result<stream::Stream> {
        let files = stream::StreamFiles { store: self.store.clone(), targets: self.targets.clone() };
        stream::Stream::start(files, self.lengths.clone(), self.settings(batch_size, seed), start, device)
    }
}

const NUM_CLASSES: u8 = 10;

/// Loads the dataset named by `spec` onto `device` and carves the validation split.
/// Checks, before a run creates anything, that every file `spec` reads exists and can be opened
/// for reading (the MNIST files, the user's frames and labels, the stores' manifests and
/// targets), each error naming the setting and the file. Their contents are checked as they
/// are read.
pub fn check_inputs(spec: &DataSpec) -> Result<()> {
    let readable = |path: &Path, what: &str| -> Result<()> {
        crate::inputs::check_file(path, what)?;
        std::fs::File::open(path).with_context(|| format!("cannot read {what} {}", path.display()))?;
        Ok(())
    };
    match &spec.source {
        DataSource::Speech(_) => Ok(()),
        DataSource::Mnist { dir } => {
            for name in [
                "train-images-idx3-ubyte",
                "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte",
            ] {
                let path = dir.join(name);
                idx::ensure_present(&path).context("data.dir")?;
                readable(&path, "IDX file").context("data.dir")?;
            }
            Ok(())
        }
        DataSource::Files(files) => {
            for (split, set) in [("train", &files.train), ("validation", &files.validation), ("test", &files.test)] {
                let named = [
                    ("features", Some(&set.features)),
                    ("labels", Some(&set.labels)),
                    ("lengths", set.lengths.as_ref()),
                ];
                for (key, path) in named {
                    if let Some(path) = path {
                        readable(path, "file").with_context(|| format!("data.files.{split}.{key}"))?;
                    }
                }
            }
            Ok(())
        }
        DataSource::Store(st) => {
            for split in ["train", "validation", "test"] {
                let manifest = st.dir.join(split).join(store::MANIFEST);
                readable(&manifest, "frame store manifest")
                    .with_context(|| format!("data.store.dir: no frame store in {}", st.dir.join(split).display()))?;
            }
            if let Some(name) = &st.targets {
                readable(&st.dir.join("train").join(name), "top-k targets file").context("data.store.targets")?;
            }
            Ok(())
        }
    }
}

pub fn load(spec: &DataSpec, device: Device) -> Result<Dataset> {
    match &spec.source {
        DataSource::Speech(speech) => load_speech(speech, device),
        DataSource::Files(files) => load_files(files, device),
        DataSource::Mnist { dir } => load_images(spec, dir, device),
        DataSource::Store(store) => load_store(store, device),
    }
}

/// Opens the three stores of `spec.dir`: the training store for streaming (and a sample of it
/// in memory), the validation and test stores read into memory (up to `eval_frames` each),
/// all normalized with the training store's statistics.
fn load_store(spec: &StoreSpec, device: Device) -> Result<Dataset> {
    let open = |split: &str| store::FrameStore::open(&spec.dir.join(split)).context("data.store.dir");
    let train = open("train")?;
    let sets = [open("validation")?, open("test")?];
    let d = train.manifest.feature_dim;
    for s in &sets {
        store::check_same_set(&train, s).context("data.store.dir")?;
        ensure!(
            s.manifest.feature_dim == d,
            "{}: frames of {} features, but the training store's have {d}",
            s.dir.display(),
            s.manifest.feature_dim
        );
    }
    let classes = sets.iter().map(|s| s.manifest.classes).max().unwrap_or(0).max(train.manifest.classes);
    ensure!(classes as i64 <= MAX_CLASSES, "{}: {classes} classes, more than kd-run supports", spec.dir.display());
    let frames = |s: &store::FrameStore, limit: Option<u64>| -> Result<speech::FrameSet> {
        let (mut utts, mut total) = (Vec::new(), 0u64);
        let (mut f, mut l) = (Vec::new(), Vec::new());
        for u in 0..s.index.len() {
            if limit.is_some_and(|n| total >= n) {
                break;
            }
            s.read(u, &mut f, &mut l)?;
            total += l.len() as u64;
            let states = l.iter().map(|&k| k as i32).collect();
            utts.push(speech::Utterance { speaker: 0, features: f.clone(), states });
        }
        speech::FrameSet::from_utterances(&utts, d, device)
    };
    let sample = frames(&train, Some(spec.eval_frames.unwrap_or(200_000)))?;
    let [validation, test] = [frames(&sets[0], spec.eval_frames)?, frames(&sets[1], spec.eval_frames)?];
    let to = |v: &[f64]| Tensor::from_slice(&v.iter().map(|&x| x as f32).collect::<Vec<f32>>()).to_device(device);
    let stats = (to(&train.manifest.mean), to(&train.manifest.std));
    let mut data = windowed_with([sample, validation, test], (spec.left, spec.right), classes as i64, stats);
    let lengths = std::sync::Arc::new(train.utterance_lengths());
    let targets = match &spec.targets {
        Some(name) => Some(std::sync::Arc::new(
            targets::TopKFile::open(&spec.dir.join("train").join(name), &train, (spec.left as u32, spec.right as u32))
                .context("data.store.targets")?,
        )),
        None => None,
    };
    data.stream = Some(StoreData { store: std::sync::Arc::new(train), lengths, spec: spec.clone(), targets });
    Ok(data)
}

fn load_images(spec: &DataSpec, dir: &std::path::Path, device: Device) -> Result<Dataset> {
    let train = idx::load_image_set(dir, "train", NUM_CLASSES)?;
    let test = idx::load_image_set(dir, "t10k", NUM_CLASSES)?;
    // Equal pixel counts are not enough: 14 x 56 images are no 28 x 28 ones (jitter, translations).
    ensure!(
        (test.rows, test.cols) == (train.rows, train.cols),
        "{} holds images of {} x {} pixels, but {} holds {} x {}: training and test images must have the same size",
        dir.join("train-images-idx3-ubyte").display(),
        train.rows,
        train.cols,
        dir.join("t10k-images-idx3-ubyte").display(),
        test.rows,
        test.cols
    );
    let (rows, cols) = (train.rows as i64, train.cols as i64);
    let to_split = |set: idx::ImageSet, limit: Option<i64>| {
        let n = set.labels.size()[0];
        let n = limit.map_or(n, |l| l.min(n));
        Split::new(set.images.narrow(0, 0, n).to(device), set.labels.narrow(0, 0, n).to(device))
    };
    let all = to_split(train, spec.train_limit);
    let test = to_split(test, spec.test_limit);
    let n = all.len();
    let v = spec.validation as i64;
    if v >= n {
        bail!("data.validation = {v} leaves no training examples (the training set has {n})");
    }
    let (train, validation) = if v == 0 { (all, None) } else { (all.narrow(0, n - v), Some(all.narrow(n - v, v))) };
    let num_classes = i64::from(NUM_CLASSES);
    Ok(Dataset { train, validation, test, geometry: Some((rows, cols)), num_classes, stream: None })
}

/// Generates the synthetic speech corpus: training, development (validation) and test
/// speakers, frames normalized with the training frames' statistics.
fn load_speech(spec: &SpeechSpec, device: Device) -> Result<Dataset> {
    let model = speech::CorpusModel::new(&spec.corpus)?;
    let (train, dev, test) = speech::split_speakers(&spec.corpus);
    let frames = |speakers: &[usize]| -> Result<speech::FrameSet> {
        let utts: Vec<speech::Utterance> = speakers.iter().flat_map(|&s| model.generate_speaker(s)).collect();
        speech::FrameSet::from_utterances(&utts, spec.corpus.feature_dim, device)
    };
    let sets = [frames(&train)?, frames(&dev)?, frames(&test)?];
    let bad: i64 = sets
        .iter()
        .map(|s| i64::try_from(s.features.isfinite().logical_not().sum(Kind::Int64)))
        .sum::<Result<i64, _>>()?;
    ensure!(
        bad == 0,
        "data.speech: {bad} generated feature values are NaN or infinite: the corpus settings (`noise`, `group_spread`, \
         `within_group_spread`, `speaker_variability`) are too large for f32 features"
    );
    Ok(windowed(sets, (spec.left, spec.right), spec.corpus.states as i64))
}

/// Frame sets (training, validation, test) as splits of context windows, normalized with the
/// mean and deviation of the training frames.
fn windowed(sets: [speech::FrameSet; 3], context: (i64, i64), num_classes: i64) -> Dataset {
    let stats = speech::normalization(&sets[0]);
    windowed_with(sets, context, num_classes, stats)
}

/// [`windowed`] with the normalization statistics given (`[D]` mean and deviation).
fn windowed_with(
    [train, validation, test]: [speech::FrameSet; 3],
    (left, right): (i64, i64),
    num_classes: i64,
    (mean, std): (Tensor, Tensor),
) -> Dataset {
    let width = left + 1 + right;
    let (mean, std) = (mean.repeat([width]).view([1, -1]), std.clamp_min(1e-6).repeat([width]).view([1, -1]));
    let split = |set: speech::FrameSet| Split {
        images: set.features.shallow_clone(),
        labels: set.labels.shallow_clone(),
        windows: Some(Windows { frames: set, left, right, mean: mean.copy(), std: std.copy() }),
    };
    let (train, validation, test) = (split(train), Some(split(validation)), split(test));
    Dataset { train, validation, test, geometry: None, num_classes, stream: None }
}

/// Reads the user's frames and labels (Kaldi archives or NumPy arrays, see [`FileSet`]).
fn load_files(spec: &FilesSpec, device: Device) -> Result<Dataset> {
    let mut sets = Vec::new();
    let mut dim = None;
    let mut largest = -1i64;
    for (name, set) in [("train", &spec.train), ("validation", &spec.validation), ("test", &spec.test)] {
        let utts = read_file_set(set).with_context(|| format!("data.files.{name}"))?;
        ensure!(!utts.is_empty(), "data.files.{name}: no frames in {}", set.features.display());
        let d = utts[0].0;
        if let Some(&(other, first)) = dim.as_ref() {
            ensure!(d == other, "data.files.{name}: frames of {d} features, but {first} has {other}");
        }
        dim.get_or_insert((d, name));
        largest =
            largest.max(utts.iter().flat_map(|(_, u)| u.states.iter()).map(|&k| i64::from(k)).max().unwrap_or(-1));
        let utts: Vec<speech::Utterance> = utts.into_iter().map(|(_, u)| u).collect();
        sets.push(speech::FrameSet::from_utterances(&utts, d, device).with_context(|| format!("data.files.{name}"))?);
    }
    let num_classes = match spec.classes {
        Some(c) => {
            ensure!(largest < c, "data: a label is {largest}, but `classes` = {c}");
            c
        }
        None => largest + 1,
    };
    let sets: [speech::FrameSet; 3] = sets.try_into().map_err(|_| anyhow::anyhow!("three splits"))?;
    Ok(windowed(sets, (spec.left, spec.right), num_classes))
}

/// One split's utterances as (feature dimension, utterance): [`for_each_utterance`] collected.
pub(crate) fn read_file_set(set: &FileSet) -> Result<Vec<(usize, speech::Utterance)>> {
    let mut out = Vec::new();
    for_each_utterance(set, |dim, u| {
        out.push((dim, u));
        Ok(())
    })?;
    Ok(out)
}

/// Reads one split's utterances one at a time, in file order, and hands each to `each` with
/// the feature dimension: Kaldi archives entry by entry (the alignments indexed by utterance id
/// and read back as their features arrive), NumPy arrays a few rows at a time, so a split
/// larger than memory streams through (an utterance at a time is held; a `.npy` file without
/// `lengths` is one utterance). Checked on the way: finite features, labels below
/// `MAX_CLASSES`, NumPy lengths > 0 adding up to the frames, no utterance without frames, one
/// feature width. A mismatch between feature and alignment utterance ids is known only at the
/// end: once a feature utterance has no alignment, `each` is called no more and the error
/// names them all when the features are read.
pub(crate) fn for_each_utterance(
    set: &FileSet,
    mut each: impl FnMut(usize, speech::Utterance) -> Result<()>,
) -> Result<()> {
    let is_npy = |p: &Path| p.extension().is_some_and(|e| e == "npy");
    let utterance = |features: Vec<f32>, labels: &[i64]| -> Result<speech::Utterance> {
        let states = labels
            .iter()
            .map(|&l| {
                i32::try_from(l).ok().filter(|&k| k >= 0 && i64::from(k) < MAX_CLASSES).with_context(|| {
                    format!(
                        "{}: label {l} is not a class id (0 to {}, the most classes kd-run supports)",
                        set.labels.display(),
                        MAX_CLASSES - 1
                    )
                })
            })
            .collect::<Result<Vec<i32>>>()?;
        Ok(speech::Utterance { speaker: 0, features, states })
    };
    match (is_npy(&set.features), is_npy(&set.labels)) {
        (true, true) => {
            let mut feats = npy::NpyRows::matrix(&set.features)?;
            let (rows, cols) = (feats.rows(), feats.width());
            let mut labels = npy::NpyRows::labels(&set.labels)?;
            ensure!(
                labels.rows() == rows,
                "{} has {} labels for the {rows} frames of {}",
                set.labels.display(),
                labels.rows(),
                set.features.display()
            );
            let lengths = match &set.lengths {
                Some(p) => npy::read_npy_labels(p)?,
                None => vec![rows as i64],
            };
            // Checked: lengths near i64::MAX must not wrap around to the right total.
            let total = lengths.iter().try_fold(0i64, |sum, &l| sum.checked_add(l));
            ensure!(
                lengths.iter().all(|&l| l > 0) && total == i64::try_from(rows).ok(),
                "{}: utterance lengths must be > 0 and add up to the {rows} frames of {} (they add up to {})",
                set.lengths.as_deref().unwrap_or(Path::new("lengths")).display(),
                set.features.display(),
                total.map_or_else(|| "more than 2^63".to_string(), |t| t.to_string())
            );
            let mut start = 0usize;
            let mut states = Vec::new();
            for l in lengths {
                let l = l as usize;
                let mut features = Vec::new();
                feats.matrix_rows(l, &mut features)?;
                check_finite(&features, cols, start, |at| format!("{}: {at}", set.features.display()))?;
                labels.labels_next(l, &mut states)?;
                each(cols, utterance(features, &states)?)?;
                start += l;
            }
            Ok(())
        }
        (false, false) => {
            ensure!(set.lengths.is_none(), "`lengths` is for .npy features; Kaldi archives hold utterances");
            let mut feats = if set.features.extension().is_some_and(|e| e == "scp") {
                kaldi::MatrixEntries::scp(&set.features)?
            } else {
                kaldi::MatrixEntries::ark(&set.features)?
            };
            let mut ali = kaldi::Alignments::open(&set.labels)?;
            let pairing = || format!("pairing {} with {}", set.features.display(), set.labels.display());
            let mut first: Option<(String, usize)> = None;
            let mut entry = 0usize;
            while let Some((id, m)) = feats.next_entry()? {
                entry += 1;
                let Some(pdf_ids) = ali.take(&id, m.rows).with_context(pairing)? else {
                    continue; // ali.finish() names the utterances without alignments
                };
                let at = format!("{}: utterance '{id}' (entry {entry})", set.features.display());
                ensure!(m.rows > 0, "{at} has no frames");
                match &first {
                    Some((first, cols)) => ensure!(
                        m.cols == *cols,
                        "{at} has frames of {} features, but utterance '{first}' has {cols}",
                        m.cols
                    ),
                    None => first = Some((id.clone(), m.cols)),
                }
                check_finite(&m.data, m.cols, 0, |at| format!("{}: utterance '{id}', {at}", set.features.display()))?;
                let labels: Vec<i64> = pdf_ids.into_iter().map(i64::from).collect();
                each(m.cols, utterance(m.data, &labels).with_context(|| format!("utterance '{id}'"))?)?;
            }
            ali.finish().with_context(pairing)
        }
        _ => bail!(
            "features {} and labels {} must both be .npy arrays or both Kaldi archives",
            set.features.display(),
            set.labels.display()
        ),
    }
}

/// Fails if a value of the row-major `[_, cols]` features, frames `first ..` of their file, is
/// NaN or infinite: the error is `place("frame R, feature C")` and what is wrong. Training on
/// such a frame makes every weight it reaches NaN.
fn check_finite(data: &[f32], cols: usize, first: usize, place: impl FnOnce(String) -> String) -> Result<()> {
    match data.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => {
            let at = format!("frame {}, feature {}", first + i / cols.max(1), i % cols.max(1));
            bail!("{} is {}: features must be finite numbers", place(at), data[i])
        }
    }
}

/// A fresh random order of `n` examples cut into batches of `batch_size` (the last may be
/// smaller). The order comes from libtorch's generator, so seed it first.
pub fn batches(n: i64, batch_size: i64, device: Device) -> impl Iterator<Item = Tensor> {
    let order = Tensor::randperm(n, (Kind::Int64, device));
    (0..n).step_by(batch_size as usize).map(move |start| order.narrow(0, start, batch_size.min(n - start)))
}

/// Translates each image of `[b, rows * cols]` by its own random integer shift of up to
/// `max_shift` pixels in each direction, filling with zeros. Runs on the images' device with a
/// single gather, no per-example loop. The shifts are drawn for the whole batch `held` names
/// and `images` get those of its rows (a data-parallel rank's share draws what one process
/// would).
pub fn jitter(images: &Tensor, rows: i64, cols: i64, max_shift: i64, held: BatchRows) -> Tensor {
    if max_shift == 0 {
        return images.shallow_clone();
    }
    let (b, device) = (images.size()[0], images.device());
    let s = max_shift;
    let dy = Tensor::randint_low(-s, s + 1, [held.batch, 1], (Kind::Int64, device)).narrow(0, held.start, b);
    let dx = Tensor::randint_low(-s, s + 1, [held.batch, 1], (Kind::Int64, device)).narrow(0, held.start, b);
    shift(images, (rows, cols), s, &dy, &dx)
}

/// Translates every image of `[b, rows * cols]` by `dy` rows down and `dx` columns right,
/// filling with zeros.
pub fn translate(images: &Tensor, rows: i64, cols: i64, dy: i64, dx: i64) -> Tensor {
    if dy == 0 && dx == 0 {
        return images.shallow_clone();
    }
    let device = images.device();
    let (dy, dx, s) = (Tensor::from(dy).to(device), Tensor::from(dx).to(device), dy.abs().max(dx.abs()));
    shift(images, (rows, cols), s, &dy, &dx)
}

/// The gather behind [`jitter`] and [`translate`]: shifts `dy`, `dx` (each `[b, 1]` or a
/// scalar) of at most `s` pixels.
fn shift(images: &Tensor, (rows, cols): (i64, i64), s: i64, dy: &Tensor, dx: &Tensor) -> Tensor {
    let (b, device) = (images.size()[0], images.device());
    let (pr, pc) = (rows + 2 * s, cols + 2 * s);
    let padded = images.view([b, rows, cols]).constant_pad_nd([s, s, s, s]).view([b, pr * pc]);
    // Output pixel (r, c) reads padded pixel (r + s - dy, c + s - dx).
    let r = Tensor::arange(rows, (Kind::Int64, device)).view([rows, 1]);
    let c = Tensor::arange(cols, (Kind::Int64, device)).view([1, cols]);
    let base = ((r + s) * pc + c + s).view([1, rows * cols]);
    let index = (base - dy * pc - dx).expand([b, rows * cols], false);
    padded.gather(1, &index, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kaldi").join(name)
    }

    fn files_spec(features: &str, labels: &str) -> DataSpec {
        let set = FileSet { features: fixture(features), labels: fixture(labels), lengths: None };
        DataSpec {
            source: DataSource::Files(FilesSpec {
                left: 2,
                right: 1,
                classes: None,
                train: set.clone(),
                validation: set.clone(),
                test: set,
            }),
            validation: 0,
            train_limit: None,
            test_limit: None,
        }
    }

    fn files_of(spec: &mut DataSpec) -> &mut FilesSpec {
        let DataSource::Files(f) = &mut spec.source else { unreachable!("files_spec makes files") };
        f
    }

    #[test]
    fn kaldi_files_become_windowed_splits_that_stop_at_utterance_edges() {
        let data = load(&files_spec("feats.scp", "ali.ark"), Device::Cpu).unwrap();
        let expected: std::collections::HashMap<String, Tensor> =
            Tensor::read_npz(fixture("expected.npz")).unwrap().into_iter().collect();
        let utts = ["spk1-utt1", "spk1-utt2", "spk2-utt1"];
        let frames = Tensor::cat(&utts.map(|u| expected[&format!("f32__{u}")].to_kind(Kind::Float)), 0);
        let labels = Tensor::cat(&utts.map(|u| expected[&format!("ali__{u}")].to_kind(Kind::Int64)), 0);
        assert!(data.train.images.equal(&frames), "the frames in scp order");
        assert!(data.train.labels.equal(&labels));
        assert_eq!(data.num_classes, 46, "the largest pdf id (45) plus one");
        assert_eq!(data.train.input_dim(), 4 * 40);
        // The window of the first frame of the second utterance repeats that frame on the left.
        let w = data.train.windows.as_ref().unwrap();
        let window = speech::context_windows(&w.frames, &Tensor::from_slice(&[7i64]), 2, 1).view([4, 40]);
        for (slot, frame) in [(0, 7), (1, 7), (2, 7), (3, 8)] {
            assert!(window.get(slot).equal(&frames.get(frame)), "slot {slot} holds frame {frame}");
        }
    }

    #[test]
    fn mismatched_or_mixed_files_are_clear_errors() {
        let err = |spec: DataSpec| format!("{:#}", load(&spec, Device::Cpu).err().expect("an error"));
        let e = err(files_spec("npy_f32.npy", "npy_i64.npy"));
        assert!(e.contains("data.files.train") && e.contains("has 9 labels for the 5 frames of"), "{e}");
        let e = err(files_spec("feats.scp", "npy_i64.npy"));
        assert!(e.contains("must both be .npy arrays or both Kaldi archives"), "{e}");
        let mut spec = files_spec("feats.scp", "ali.ark");
        files_of(&mut spec).classes = Some(40);
        assert!(err(spec).contains("a label is 45, but `classes` = 40"));
    }

    #[test]
    fn an_empty_utterance_or_one_of_another_width_is_named() {
        let dir = crate::testutil::TempDir::new("data-empty-utt");
        let ark = std::fs::read(fixture("feats_f32.ark")).unwrap();
        let ali = std::fs::read(fixture("ali.ark")).unwrap();
        // An empty first utterance (0 x 0 in Kaldi's binary form) with an empty alignment.
        let mut feats = b"empty \0BFM \x04\0\0\0\0\x04\0\0\0\0".to_vec();
        feats.extend_from_slice(&ark);
        let mut labels = b"empty \0B\x04\0\0\0\0".to_vec();
        labels.extend_from_slice(&ali);
        let feats = dir.write("feats.ark", &feats);
        let labels = dir.write("ali.ark", &labels);
        let err = |features: &Path, labels: &Path| {
            let mut spec = files_spec("feats.scp", "ali.ark");
            let f = files_of(&mut spec);
            f.train = FileSet { features: features.to_path_buf(), labels: labels.to_path_buf(), lengths: None };
            format!("{:#}", load(&spec, Device::Cpu).err().expect("an error"))
        };
        let e = err(&feats, &labels);
        assert!(e.contains("feats.ark: utterance 'empty' (entry 1) has no frames"), "{e}");
        // A 1 x 3 text matrix where the others have 40 features.
        let narrow = dir.write("narrow.ark", &[b"empty [ 1 2 3 ]\n".as_slice(), &ark].concat());
        let one = dir.write("one.ark", &[b"empty 0\n".as_slice(), &ali].concat());
        let e = err(&narrow, &one);
        let want = "utterance 'spk1-utt1' (entry 2) has frames of 40 features, but utterance 'empty' has 3";
        assert!(e.contains(want), "{e}");
    }

    #[test]
    fn a_split_streams_one_utterance_at_a_time() {
        // 200,000 frames x 40 f32: 32 MB of features, in utterances of at most 999 frames
        // (160 KB each).
        let dir = crate::testutil::TempDir::new("data-stream-bound");
        let frames = 200_000;
        let set = crate::testutil::npy_corpus(&dir, frames);
        let frame_value = crate::testutil::corpus_value;
        let (mut seen, mut utts, mut largest) = (0usize, 0usize, 0usize);
        let (result, peak) = crate::fuzz::peak_live_bytes(|| {
            for_each_utterance(&set, |dim, u| {
                assert_eq!(dim, 40);
                assert_eq!(u.features.len(), u.states.len() * 40);
                for (j, (frame, &k)) in u.features.chunks_exact(40).zip(&u.states).enumerate() {
                    let i = seen + j;
                    assert_eq!(k as usize, i * 7 % 61, "label of frame {i}");
                    assert!(frame.iter().enumerate().all(|(c, &v)| v == frame_value(i, c)), "frame {i}");
                }
                seen += u.states.len();
                utts += 1;
                largest = largest.max(u.features.len() * 4);
                Ok(())
            })
        });
        result.unwrap();
        assert_eq!(seen, frames);
        assert!(utts > 200, "{utts} utterances");
        // At most a few utterances' worth held at once (the one handed over, the rows being
        // read, their labels), and the lengths: far below the 32 MB of the split.
        assert!(peak < 3 * largest + (256 << 10), "{peak} bytes held at once; an utterance is at most {largest}");
        // The counter sees a whole split held: the collected split holds all 32 MB.
        let (all, peak_all) = crate::fuzz::peak_live_bytes(|| read_file_set(&set).unwrap());
        assert_eq!(all.iter().map(|(_, u)| u.states.len()).sum::<usize>(), frames);
        assert!(peak_all > frames * 40 * 4, "{peak_all}");
    }

    #[test]
    fn batches_cover_every_example_once() {
        let _generator = kd_core::seed_global_generator(0);
        let seen: Vec<i64> = batches(10, 4, Device::Cpu).flat_map(|b| Vec::<i64>::try_from(b).unwrap()).collect();
        let sizes: Vec<i64> = batches(10, 4, Device::Cpu).map(|b| b.size()[0]).collect();
        assert_eq!(sizes, [4, 4, 2]);
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn jitter_is_a_zero_filled_translation_within_bounds() {
        let _generator = kd_core::lock_global_generator();
        // One bright pixel in the middle of a 7x7 image, many copies: every copy must hold the
        // pixel exactly once, moved by at most 2 in each direction, and every shift must occur.
        let (rows, cols, n) = (7i64, 7i64, 400i64);
        let mut img = vec![0f32; 49];
        img[3 * 7 + 3] = 1.0;
        let images = Tensor::from_slice(&img).view([1, 49]).repeat([n, 1]);
        let out = jitter(&images, rows, cols, 2, BatchRows { start: 0, batch: images.size()[0] });
        assert_eq!(out.size(), [n, 49]);
        let sums = Vec::<f32>::try_from(out.sum_dim_intlist(1, false, Kind::Float)).unwrap();
        assert!(sums.iter().all(|&s| s == 1.0), "one pixel kept per image");
        let pos = Vec::<i64>::try_from(out.argmax(1, false)).unwrap();
        let mut shifts = std::collections::HashSet::new();
        for p in pos {
            let (dy, dx) = (p / cols - 3, p % cols - 3);
            assert!(dy.abs() <= 2 && dx.abs() <= 2, "shift ({dy}, {dx})");
            shifts.insert((dy, dx));
        }
        assert_eq!(shifts.len(), 25, "all 25 shifts occur in 400 draws");
        // A pixel at the border moved outward disappears (zero fill), never wraps around.
        let mut corner = vec![0f32; 49];
        corner[0] = 1.0;
        let out = jitter(
            &Tensor::from_slice(&corner).view([1, 49]).repeat([n, 1]),
            rows,
            cols,
            2,
            BatchRows { start: 0, batch: n },
        );
        let sums = Vec::<f32>::try_from(out.sum_dim_intlist(1, false, Kind::Float)).unwrap();
        assert!(sums.contains(&0.0) && sums.contains(&1.0));
        let last_rows = out.view([n, rows, cols]).narrow(1, 3, 4).sum(Kind::Float);
        assert_eq!(f32::try_from(last_rows).unwrap(), 0.0, "no wrap-around to the far side");
    }

    #[test]
    fn translate_moves_every_pixel_by_the_shift_and_fills_with_zeros() {
        // A 5x4 image of distinct values against a hand-written shift, for shifts of up to 2.
        let (rows, cols) = (5i64, 4i64);
        let img: Vec<f32> = (1..=rows * cols).map(|v| v as f32).collect();
        let images = Tensor::from_slice(&img).view([1, rows * cols]).repeat([3, 1]);
        for dy in -2..=2 {
            for dx in -2..=2 {
                let out = translate(&images, rows, cols, dy, dx);
                assert_eq!(out.size(), [3, rows * cols]);
                let got = Vec::<f32>::try_from(out.get(2)).unwrap();
                for r in 0..rows {
                    for c in 0..cols {
                        let (sr, sc) = (r - dy, c - dx);
                        let inside = (0..rows).contains(&sr) && (0..cols).contains(&sc);
                        let want = if inside { img[(sr * cols + sc) as usize] } else { 0.0 };
                        assert_eq!(got[(r * cols + c) as usize], want, "shift ({dy}, {dx}) pixel ({r}, {c})");
                    }
                }
            }
        }
    }
}
