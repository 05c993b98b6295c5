//! Streaming batches of context windows from a [`FrameStore`]: per-rank shards of utterances,
//! a shuffle that never holds the corpus, a background producer, and exact resume.
//!
//! An epoch of rank `r` of `world`:
//!
//! 1. **Shard.** The store's utterances are shuffled from `(seed, epoch)` and dealt, in that
//!    order, each to the rank with the fewest frames so far ([`rank_shard`]): every rank computes
//!    the same deal from the utterance lengths alone and keeps its own list, so the ranks' frame
//!    counts differ by at most one utterance and a rank's memory does not grow with `world`.
//!    All ranks train on `min_r frames_r x epoch_fraction` frames, so they take the same number
//!    of steps.
//! 2. **Shuffle.** The rank's utterances, in their dealt (random) order, feed a shuffle buffer of
//!    `buffer` frames: whole utterances are read (each one read once per epoch, contiguously from
//!    its shard) and their frames become entries; each example is an entry drawn uniformly
//!    from the buffer, which is refilled before each draw. A frame's window is built from its
//!    utterance while that utterance is resident, so windows never need a second read. A buffer
//!    as large as the shard is an exact uniform permutation; a smaller one mixes about
//!    `buffer / mean utterance length` utterances at a time (docs/frame-store.md measures the
//!    cost). Utterances whose frames are partly drawn stay resident until their last frame is
//!    drawn, so refills stop while the resident frames exceed twice the buffer.
//! 3. **Produce.** A background thread builds each batch's `(left + 1 + right) x D` windows,
//!    normalized with the store's statistics, into a host tensor (pinned when training on a GPU)
//!    and queues `prefetch` of them; the training loop copies the next batch to the device while
//!    the current one trains.
//! 4. **Resume.** The shuffle's draws depend on the utterance lengths and the seed alone, so a
//!    stream started at batch `b` replays the draws of the first `b` batches without reading a
//!    frame, reads the utterances then resident, and continues exactly as the uninterrupted
//!    stream would.

use super::batch::{Batch, BatchSource};
use super::store::FrameStore;
use super::targets::TopKFile;
use crate::rng::Rng;
use anyhow::{anyhow, ensure, Result};
use kd_models::BatchRows;
use std::collections::VecDeque;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use tch::{Device, Kind, Tensor};

const TAG_SHARD: u64 = 0x5348_4152_4400_0001;
const TAG_DRAW: u64 = 0x4452_4157_0000_0001;
const TAG_CHUNKS: u64 = 0x4348_554e_4b00_0001;

/// A piece of an utterance: frames `start .. start + len`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Chunk {
    utt: u32,
    start: u32,
    len: u32,
}

/// The rank's utterances cut into chunks of at most `size` frames (each utterance into equal
/// parts), in a random order.
fn chunk_order(utts: &[u32], lengths: &[u32], size: usize, rng: &mut Rng) -> Vec<Chunk> {
    let size = size.max(1) as u32;
    let mut out = Vec::new();
    for &utt in utts {
        let len = lengths[utt as usize];
        let parts = len.div_ceil(size).max(1);
        let mut start = 0;
        for p in 0..parts {
            let end = (u64::from(len) * u64::from(p + 1) / u64::from(parts)) as u32;
            if end > start {
                out.push(Chunk { utt, start, len: end - start });
            }
            start = end;
        }
    }
    rng.shuffle(&mut out);
    out
}

/// How batches are streamed from a store.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StreamSettings {
    /// Examples per batch.
    pub batch_size: usize,
    /// Frames of left context.
    pub left: usize,
    /// Frames of right context.
    pub right: usize,
    /// Frames in the shuffle buffer.
    pub buffer: usize,
    /// Utterances are cut into chunks of about this many frames, shuffled over the epoch.
    pub chunk_frames: usize,
    /// Batches the producer keeps ready.
    pub prefetch: usize,
    /// Share of each epoch trained on (the first part of its stream).
    pub epoch_fraction: f64,
    /// Seed of the shards and the shuffle (with the epoch).
    pub seed: u64,
}

/// Where a stream starts: an epoch, a rank of a data-parallel group, and a batch within the epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamStart {
    /// The epoch (0-based); each epoch draws new shards and a new order.
    pub epoch: u64,
    /// This process's rank.
    pub rank: usize,
    /// Ranks in all.
    pub world: usize,
    /// The first batch to produce (0: the epoch's start).
    pub batch: usize,
}

/// What a stream reads: a frame store and, when given, a teacher's top-k targets for it,
/// delivered with each batch.
#[derive(Clone)]
pub struct StreamFiles {
    pub store: Arc<FrameStore>,
    pub targets: Option<Arc<TopKFile>>,
}

impl StreamFiles {
    /// The store alone, without targets.
    pub fn store(store: Arc<FrameStore>) -> Self {
        StreamFiles { store, targets: None }
    }
}

/// A rank's utterances for one epoch.
#[derive(Clone, Debug, PartialEq)]
pub struct RankShard {
    /// Utterances (store order indices), in the order the rank reads them.
    pub utterances: Vec<u32>,
    /// Their frames.
    pub frames: u64,
    /// The fewest frames any rank got: what every rank trains on, so all take the same steps.
    pub common_frames: u64,
}

/// Rank `rank` of `world`'s utterances in `epoch`: all utterances shuffled from `(seed, epoch)`,
/// each dealt to the rank with the fewest frames so far (ties to the lowest rank). The ranks'
/// frame counts differ by at most the longest utterance.
pub fn rank_shard(lengths: &[u32], seed: u64, epoch: u64, rank: usize, world: usize) -> Result<RankShard> {
    ensure!(world > 0 && rank < world, "rank {rank} of {world} ranks");
    let mut order: Vec<u32> = (0..lengths.len() as u32).collect();
    Rng::derive(seed, TAG_SHARD, epoch).shuffle(&mut order);
    let mut loads: std::collections::BinaryHeap<std::cmp::Reverse<(u64, usize)>> =
        (0..world).map(|r| std::cmp::Reverse((0u64, r))).collect();
    let mut mine = Vec::with_capacity(lengths.len() / world + 1);
    let mut totals = vec![0u64; world];
    for u in order {
        let std::cmp::Reverse((load, r)) = loads.pop().expect("world > 0");
        let load = load + u64::from(lengths[u as usize]);
        totals[r] = load;
        if r == rank {
            mine.push(u);
        }
        loads.push(std::cmp::Reverse((load, r)));
    }
    let common = totals.iter().copied().min().unwrap_or(0);
    Ok(RankShard { utterances: mine, frames: totals[rank], common_frames: common })
}

/// The examples and steps of one epoch's stream: `ceil(common_frames x epoch_fraction)`
/// examples (at least one), in batches of `batch_size` (the last may be smaller).
pub fn epoch_plan(common_frames: u64, settings: &StreamSettings) -> (u64, usize) {
    let n = ((common_frames as f64 * settings.epoch_fraction).ceil() as u64).clamp(1.min(common_frames), common_frames);
    let b = settings.batch_size.max(1) as u64;
    (n, n.div_ceil(b) as usize)
}

/// One resident chunk's place in the shuffle.
#[derive(Clone, Copy, Debug)]
struct SlotMeta {
    chunk: u32,
    len: u32,
    /// Frames not yet drawn; 0: the slot is free.
    remaining: u32,
}

/// The shuffle's bookkeeping, from utterance lengths alone (no frames).
struct Shuffler {
    order: Vec<Chunk>,
    next: usize,
    entries: Vec<(u32, u32)>,
    slots: Vec<SlotMeta>,
    free: Vec<u32>,
    resident: usize,
    buffer: usize,
    rng: Rng,
}

impl Shuffler {
    fn new(order: Vec<Chunk>, buffer: usize, rng: Rng) -> Self {
        Shuffler { order, next: 0, entries: Vec::new(), slots: Vec::new(), free: Vec::new(), resident: 0, buffer, rng }
    }

    /// The next example: (slot, frame within the chunk). Chunks loaded into slots on the way
    /// are pushed to `loads` as (slot, index in the order).
    fn draw(&mut self, loads: &mut Vec<(u32, u32)>) -> Option<(u32, u32)> {
        while self.next < self.order.len()
            && (self.entries.is_empty() || (self.entries.len() < self.buffer && self.resident < 2 * self.buffer))
        {
            let chunk = self.next as u32;
            let len = self.order[self.next].len;
            self.next += 1;
            let slot = match self.free.pop() {
                Some(s) => s,
                None => {
                    self.slots.push(SlotMeta { chunk, len, remaining: 0 });
                    (self.slots.len() - 1) as u32
                }
            };
            self.slots[slot as usize] = SlotMeta { chunk, len, remaining: len };
            self.entries.extend((0..len).map(|f| (slot, f)));
            self.resident += len as usize;
            loads.push((slot, chunk));
        }
        if self.entries.is_empty() {
            return None;
        }
        let i = self.rng.below(self.entries.len());
        let (slot, frame) = self.entries.swap_remove(i);
        Some((slot, frame))
    }

    /// Marks one frame of `slot` used (after its window is built); frees the slot after its last.
    fn used(&mut self, slot: u32) {
        let s = &mut self.slots[slot as usize];
        s.remaining -= 1;
        if s.remaining == 0 {
            self.resident -= s.len as usize;
            self.free.push(slot);
        }
    }

    fn live(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.slots.iter().enumerate().filter(|(_, s)| s.remaining > 0).map(|(i, s)| (i as u32, s.chunk))
    }
}

/// A resident chunk: the normalized frames its windows need (the chunk and up to `left` and
/// `right` frames of context, within the utterance), their labels, the chunk's first frame
/// among them, and its top-k targets when streamed.
#[derive(Default)]
struct SlotData {
    features: Vec<f32>,
    labels: Vec<u32>,
    first: usize,
    probs: Vec<f32>,
    ids: Vec<i64>,
}

/// One batch on the host: windows `[b, width * D]` row-major, labels, and with top-k targets
/// their `[b, k]` probabilities and class ids.
#[derive(Default)]
pub struct HostBatch {
    /// Windows.
    pub x: Vec<f32>,
    /// Labels.
    pub y: Vec<i64>,
    /// Top-k probabilities (empty without targets).
    pub probs: Vec<f32>,
    /// Top-k class ids (empty without targets).
    pub ids: Vec<i64>,
}

/// A batch as host tensors (pinned for a GPU): windows, labels, top-k probabilities and ids.
pub type HostTensors = (Tensor, Tensor, Option<(Tensor, Tensor)>);

/// Builds an epoch's batches on the calling thread (the producer thread runs one).
pub struct Producer {
    store: Arc<FrameStore>,
    targets: Option<Arc<TopKFile>>,
    settings: StreamSettings,
    lengths: Arc<Vec<u32>>,
    shuffler: Shuffler,
    data: Vec<SlotData>,
    raw: Vec<f32>,
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    examples: u64,
    steps: usize,
    produced: usize,
    loads: Vec<(u32, u32)>,
    device: Device,
}

impl Producer {
    /// The producer of `start`'s stream, positioned at `start.batch` (replaying the draws of the
    /// batches before it). `lengths` are the store's utterance lengths; `targets`, if given, a
    /// teacher's top-k targets for the store, delivered with each batch; batches are made for
    /// training on `device` (pinned host memory for a GPU).
    pub fn new(
        StreamFiles { store, targets }: StreamFiles,
        lengths: Arc<Vec<u32>>,
        settings: StreamSettings,
        start: StreamStart,
        device: Device,
    ) -> Result<Producer> {
        ensure!(settings.batch_size > 0 && settings.buffer > 0, "batch size and shuffle buffer must be positive");
        let shard = rank_shard(&lengths, settings.seed, start.epoch, start.rank, start.world)?;
        let (examples, steps) = epoch_plan(shard.common_frames, &settings);
        ensure!(
            start.batch <= steps,
            "the stream of epoch {} has {steps} batches; it cannot start at batch {}",
            start.epoch,
            start.batch
        );
        let stream_id = start.epoch * (start.world as u64) + start.rank as u64;
        let rng = Rng::derive(settings.seed, TAG_DRAW, stream_id);
        let order = chunk_order(
            &shard.utterances,
            &lengths,
            settings.chunk_frames,
            &mut Rng::derive(settings.seed, TAG_CHUNKS, stream_id),
        );
        let m = &store.manifest;
        let mean = m.mean.iter().map(|&v| v as f32).collect();
        let inv_std = m.std.iter().map(|&v| (1.0 / v.max(1e-6)) as f32).collect();
        let mut p = Producer {
            store,
            targets,
            settings,
            lengths,
            shuffler: Shuffler::new(order, settings.buffer, rng),
            data: Vec::new(),
            raw: Vec::new(),
            mean,
            inv_std,
            examples,
            steps,
            produced: 0,
            loads: Vec::new(),
            device,
        };
        // Replay the draws of the batches before the start, reading nothing.
        let skip = (start.batch as u64 * settings.batch_size as u64).min(examples);
        for _ in 0..skip {
            let (slot, _) = p.shuffler.draw(&mut p.loads).expect("the plan's examples are in the shard");
            p.shuffler.used(slot);
        }
        p.loads.clear();
        p.produced = start.batch;
        let live: Vec<(u32, u32)> = p.shuffler.live().collect();
        for (slot, chunk) in live {
            p.load(slot, chunk)?;
        }
        Ok(p)
    }

    /// Steps in the epoch's stream.
    pub fn steps(&self) -> usize {
        self.steps
    }

    fn load(&mut self, slot: u32, chunk: u32) -> Result<()> {
        let slot = slot as usize;
        if self.data.len() <= slot {
            self.data.resize_with(slot + 1, SlotData::default);
        }
        let Chunk { utt, start, len } = self.shuffler.order[chunk as usize];
        let (utt, start, len) = (utt as usize, start as usize, len as usize);
        let lo = start.saturating_sub(self.settings.left);
        let hi = (start + len + self.settings.right).min(self.lengths[utt] as usize);
        let data = &mut self.data[slot];
        data.first = start - lo;
        self.store.read_frames((utt, lo, hi), &mut self.raw, &mut data.labels)?;
        let d = self.mean.len();
        data.features.clear();
        data.features.reserve(self.raw.len());
        for frame in self.raw.chunks_exact(d) {
            data.features.extend(frame.iter().zip(&self.mean).zip(&self.inv_std).map(|((v, m), s)| (v - m) * s));
        }
        if let Some(t) = &self.targets {
            data.probs.clear();
            data.ids.clear();
            t.read_frames((utt, start, start + len), &mut data.probs, &mut data.ids)?;
        }
        Ok(())
    }

    /// The next batch into `out`; false after the last.
    pub fn next_host(&mut self, out: &mut HostBatch) -> Result<bool> {
        let HostBatch { x, y, probs, ids } = out;
        if self.produced >= self.steps {
            return Ok(false);
        }
        let bs = self.settings.batch_size as u64;
        let b = (self.examples - self.produced as u64 * bs).min(bs) as usize;
        let d = self.mean.len();
        let (left, right) = (self.settings.left as i64, self.settings.right as i64);
        let width = (left + 1 + right) as usize;
        x.clear();
        x.reserve(b * width * d);
        y.clear();
        probs.clear();
        ids.clear();
        let k = self.targets.as_ref().map_or(0, |t| t.k());
        for _ in 0..b {
            let (slot, frame) = self
                .shuffler
                .draw(&mut self.loads)
                .ok_or_else(|| anyhow!("the shuffle ran out of frames before the end of the epoch's plan"))?;
            for (s, u) in std::mem::take(&mut self.loads) {
                self.load(s, u)?;
            }
            let data = &self.data[slot as usize];
            // The slot holds exactly the frames the chunk's windows may read, so clamping to it
            // is clamping to the utterance.
            let len = data.labels.len() as i64;
            let t = (data.first + frame as usize) as i64;
            for o in -left..=right {
                let src = (t + o).clamp(0, len - 1) as usize;
                x.extend_from_slice(&data.features[src * d..(src + 1) * d]);
            }
            y.push(i64::from(data.labels[t as usize]));
            let f = frame as usize;
            if k > 0 {
                probs.extend_from_slice(&data.probs[f * k..(f + 1) * k]);
                ids.extend_from_slice(&data.ids[f * k..(f + 1) * k]);
            }
            self.shuffler.used(slot);
        }
        self.produced += 1;
        Ok(true)
    }

    /// The next batch as host tensors (pinned for a GPU), or `None` after the last.
    pub fn next_tensors(&mut self, host: &mut HostBatch) -> Result<Option<HostTensors>> {
        if !self.next_host(host)? {
            return Ok(None);
        }
        let b = host.y.len() as i64;
        let pin = |t: Tensor| match self.device {
            Device::Cpu => t,
            d => t.pin_memory(d),
        };
        let xt = pin(Tensor::from_slice(&host.x).view([b, -1]));
        let yt = pin(Tensor::from_slice(&host.y));
        let topk = (!host.ids.is_empty()).then(|| {
            (pin(Tensor::from_slice(&host.probs).view([b, -1])), pin(Tensor::from_slice(&host.ids).view([b, -1])))
        });
        Ok(Some((xt, yt, topk)))
    }

    /// The temperature of the streamed top-k targets, if any.
    pub fn temperature(&self) -> Option<f64> {
        self.targets.as_ref().map(|t| t.temperature())
    }
}

/// An epoch's stream as a [`BatchSource`]: a producer thread `prefetch` batches ahead, and the
/// next batch's copy to the device issued before the current one is handed out.
pub struct Stream {
    rx: Option<Receiver<Result<HostTensors>>>,
    temperature: Option<f64>,
    worker: Option<JoinHandle<()>>,
    on_device: VecDeque<Batch>,
    device: Device,
    steps: usize,
    /// This stream's rank and the world's size: a batch of `n` rows is rows `rank * n ..` of a
    /// global batch of `world * n` (the ranks' shards give every rank the same number of steps).
    rank: usize,
    world: usize,
}

impl Stream {
    /// Starts the producer thread for `start`'s stream.
    pub fn start(
        files: StreamFiles,
        lengths: Arc<Vec<u32>>,
        settings: StreamSettings,
        start: StreamStart,
        device: Device,
    ) -> Result<Stream> {
        let (rank, world, first) = (start.rank, start.world, start.batch);
        let mut producer = Producer::new(files, lengths, settings, start, device)?;
        // The batches it delivers: those from its start on.
        let (steps, temperature) = (producer.steps() - first, producer.temperature());
        let (tx, rx) = sync_channel(settings.prefetch.max(1));
        let worker = std::thread::Builder::new().name("kd-stream".into()).spawn(move || {
            let mut host = HostBatch::default();
            loop {
                let item = producer.next_tensors(&mut host).transpose();
                let Some(item) = item else { break };
                let failed = item.is_err();
                // A closed channel: the consumer stopped early (an error, or a slice); just stop.
                if tx.send(item).is_err() || failed {
                    break;
                }
            }
        })?;
        Ok(Stream {
            rx: Some(rx),
            temperature,
            worker: Some(worker),
            on_device: VecDeque::new(),
            device,
            steps,
            rank,
            world,
        })
    }

    fn fetch(&mut self) -> Result<bool> {
        let Some(rx) = &self.rx else { return Ok(false) };
        match rx.recv() {
            Ok(item) => {
                let (x, y, topk) = item?;
                let to = |t: Tensor, kind| match self.device {
                    Device::Cpu => t,
                    d => t.to_device_(d, kind, true, false),
                };
                let (x, y) = (to(x, Kind::Float), to(y, Kind::Int64));
                let targets = match (topk, self.temperature) {
                    (Some((p, c)), Some(t)) => {
                        Some(kd_core::TeacherTargets::top_k(to(p, Kind::Float), to(c, Kind::Int64), t)?)
                    }
                    _ => None,
                };
                let n = y.size()[0];
                let held = BatchRows { start: self.rank as i64 * n, batch: self.world as i64 * n };
                self.on_device.push_back(Batch { x, y, idx: None, targets, held });
                Ok(true)
            }
            Err(_) => {
                self.rx = None;
                Ok(false)
            }
        }
    }
}

impl BatchSource for Stream {
    fn steps(&self) -> usize {
        self.steps
    }

    fn next_batch(&mut self) -> Result<Option<Batch>> {
        // Keep the next batch's copy in flight while this one trains.
        while self.on_device.len() < 2 && self.fetch()? {}
        Ok(self.on_device.pop_front())
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.rx = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::store::{FeatureKind, StoreWriter};
    use crate::testutil::TempDir;

    /// A store of `utts` utterances of 5 to 40 frames, 3 features each, frame values that name
    /// the frame: (global frame index, utterance, offset).
    fn store(dir: &std::path::Path, utts: usize) -> Arc<FrameStore> {
        let mut w = StoreWriter::create(dir, crate::data::store::tests::SET, FeatureKind::F32, 3, 300).unwrap();
        let mut global = 0u32;
        for u in 0..utts {
            let n = 5 + (u * 7) % 36;
            let mut f = Vec::new();
            for t in 0..n {
                f.extend([global as f32, u as f32, t as f32]);
                global += 1;
            }
            let labels: Vec<u32> = (0..n as u32).map(|t| (u as u32 + t) % 5).collect();
            w.push(u as u32, &f, &labels).unwrap();
        }
        w.finish("test").unwrap();
        Arc::new(FrameStore::open(dir).unwrap())
    }

    fn settings(buffer: usize) -> StreamSettings {
        StreamSettings {
            batch_size: 16,
            left: 2,
            right: 1,
            buffer,
            chunk_frames: 8,
            prefetch: 2,
            epoch_fraction: 1.0,
            seed: 5,
        }
    }

    /// The (unnormalized) centre-frame indices and labels of every batch of a stream.
    fn drain(store: &Arc<FrameStore>, s: StreamSettings, start: StreamStart) -> Vec<(Vec<i64>, Vec<i64>)> {
        let lengths = Arc::new(store.utterance_lengths());
        let mut p = Producer::new(StreamFiles::store(store.clone()), lengths, s, start, Device::Cpu).unwrap();
        let (m, sd) = (store.manifest.mean[0] as f32, store.manifest.std[0] as f32);
        let mut h = HostBatch::default();
        let mut out = Vec::new();
        let width = 3 * (s.left + 1 + s.right);
        while p.next_host(&mut h).unwrap() {
            let centre: Vec<i64> = h.x.chunks_exact(width).map(|w| (w[3 * s.left] * sd + m).round() as i64).collect();
            out.push((centre, h.y.clone()));
        }
        out
    }

    #[test]
    fn a_stream_covers_its_shard_once_with_windows_inside_each_utterance() {
        let dir = TempDir::new("stream-cover");
        let store = store(&dir.0, 30);
        let s = settings(40);
        let lengths = Arc::new(store.utterance_lengths());
        let mut p = Producer::new(
            StreamFiles::store(store.clone()),
            lengths,
            s,
            StreamStart { epoch: 0, rank: 0, world: 1, batch: 0 },
            Device::Cpu,
        )
        .unwrap();
        let sd: Vec<f32> = store.manifest.std.iter().map(|&v| v as f32).collect();
        let m: Vec<f32> = store.manifest.mean.iter().map(|&v| v as f32).collect();
        let mut h = HostBatch::default();
        let mut seen = Vec::new();
        while p.next_host(&mut h).unwrap() {
            for (w, &label) in h.x.chunks_exact(12).zip(&h.y) {
                let frames: Vec<[f32; 3]> = w
                    .chunks_exact(3)
                    .map(|f| [f[0] * sd[0] + m[0], f[1] * sd[1] + m[1], f[2] * sd[2] + m[2]])
                    .collect();
                let (utt, t) = (frames[2][1].round() as i64, frames[2][2].round() as i64);
                let n = 5 + (utt * 7) % 36;
                for (slot, f) in frames.iter().enumerate() {
                    // Slot j holds offset t + j - 2, clamped to the utterance.
                    assert_eq!(f[1].round() as i64, utt, "same utterance");
                    assert_eq!(f[2].round() as i64, (t + slot as i64 - 2).clamp(0, n - 1));
                }
                assert_eq!(label, (utt + t) % 5);
                seen.push(frames[2][0].round() as i64);
            }
        }
        seen.sort();
        assert_eq!(seen, (0..store.manifest.frames as i64).collect::<Vec<_>>(), "every frame once");
    }

    #[test]
    fn a_stream_started_mid_epoch_continues_exactly() {
        let dir = TempDir::new("stream-resume");
        let store = store(&dir.0, 40);
        for (buffer, world, rank) in [(50, 1, 0), (5000, 1, 0), (30, 3, 2)] {
            let s = settings(buffer);
            let full = drain(&store, s, StreamStart { epoch: 3, rank, world, batch: 0 });
            for start in [1, 7, full.len() - 1, full.len()] {
                let rest = drain(&store, s, StreamStart { epoch: 3, rank, world, batch: start });
                assert_eq!(rest, full[start..], "buffer {buffer}, rank {rank}/{world}, from batch {start}");
            }
            let other = drain(&store, s, StreamStart { epoch: 4, rank, world, batch: 0 });
            assert_ne!(other, full, "a new order each epoch");
        }
    }

    #[test]
    fn rank_shards_partition_the_utterances_balanced_by_frames_and_redrawn_each_epoch() {
        let lengths: Vec<u32> = (0..997u32).map(|u| 5 + (u * 7919) % 400).collect();
        let longest = u64::from(*lengths.iter().max().unwrap());
        for world in [1usize, 2, 3, 8] {
            let shards: Vec<RankShard> = (0..world).map(|r| rank_shard(&lengths, 9, 2, r, world).unwrap()).collect();
            let mut all: Vec<u32> = shards.iter().flat_map(|s| s.utterances.clone()).collect();
            all.sort();
            assert_eq!(all, (0..997).collect::<Vec<_>>(), "a partition ({world} ranks)");
            let frames: Vec<u64> = shards.iter().map(|s| s.frames).collect();
            for s in &shards {
                assert_eq!(s.frames, s.utterances.iter().map(|&u| u64::from(lengths[u as usize])).sum::<u64>());
                assert_eq!(s.common_frames, *frames.iter().min().unwrap());
            }
            let spread = frames.iter().max().unwrap() - frames.iter().min().unwrap();
            assert!(spread <= longest, "{world} ranks: frames {frames:?} differ by more than one utterance");
            if world > 1 {
                let next = rank_shard(&lengths, 9, 3, 0, world).unwrap();
                assert_ne!(next.utterances, shards[0].utterances, "redrawn per epoch");
            }
        }
        assert!(rank_shard(&lengths, 9, 0, 3, 3).is_err());
    }

    #[test]
    fn the_shuffle_buffer_bounds_resident_frames_and_a_full_buffer_mixes_everything() {
        let lengths: Vec<u32> = (0..200u32).map(|u| 5 + (u * 13) % 60).collect();
        let total: usize = lengths.iter().map(|&l| l as usize).sum();
        let order = chunk_order(&(0..200).collect::<Vec<_>>(), &lengths, 16, &mut Rng::new(2));
        // Chunks of at most 16 frames tile each utterance exactly.
        for u in 0..200u32 {
            let mut parts: Vec<(u32, u32)> = order.iter().filter(|c| c.utt == u).map(|c| (c.start, c.len)).collect();
            parts.sort();
            let mut at = 0;
            for (start, len) in parts {
                assert!(start == at && len <= 16 && len > 0);
                at += len;
            }
            assert_eq!(at, lengths[u as usize]);
        }
        let mut sh = Shuffler::new(order, 100, Rng::new(1));
        let mut loads = Vec::new();
        let mut most = 0;
        let mut first_utts = std::collections::HashSet::new();
        for i in 0..total {
            let (slot, _) = sh.draw(&mut loads).unwrap();
            if i < 50 {
                first_utts.insert(sh.order[sh.slots[slot as usize].chunk as usize].utt);
            }
            most = most.max(sh.resident);
            sh.used(slot);
        }
        assert!(sh.draw(&mut loads).is_none());
        assert!(most <= 2 * 100 + 16, "resident frames {most}");
        // The first 50 draws come from many utterances, not a few.
        assert!(first_utts.len() >= 10, "{first_utts:?}");
    }
}
