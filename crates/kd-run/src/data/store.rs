//! The frame store: a corpus of speech frames on disk, larger than memory, written once and
//! read with positioned reads (`pread`) into reusable buffers.
//!
//! A store is a folder with a manifest, `store.toml` (what it holds: feature kind and width,
//! frames, utterances, classes, the per-channel mean and deviation of its frames, and each
//! shard's name, counts and header checksum), and shards `shard-NNNNN.kdf`. A shard is
//!
//! ```text
//! header (4096 bytes)  magic "KDFRAME1", version, feature kind, width, frames, utterances,
//!                      the byte offset of each section, the file length, the CRC-32 of the
//!                      offsets, speakers and checksums sections, CRC-32 of the header
//! features  [frames, width]  f32, f16 or bf16, little-endian
//! labels    [frames]         u32 pdf ids
//! offsets   [utterances + 1] u64 first frame of each utterance (the last: frames)
//! speakers  [utterances]     u32
//! checksums [utterances]     u32 CRC-32 of each utterance's feature and label bytes
//! ```
//!
//! Every byte is under a checksum: the header's CRC covers its fields, the header holds the CRCs
//! of the offsets, speakers and checksums sections, and each utterance's CRC its features and
//! labels. The manifest is validated whole ([`Manifest::validate`]: finite statistics, positive
//! deviations, shard names well-formed and unique, counts that add up, its `id` a hash of the
//! rest) and lists each shard's header CRC; the splits written together share a `set`.
//!
//! Opening a shard checks the magic (a foreign file), the header's CRC, the length against the
//! header (a truncated file), the sections' sizes, checksums and the offsets; each utterance's checksum is
//! checked every time it is read, so a damaged byte is an error naming the shard and the
//! utterance, never a silently wrong frame. Normalization statistics are summed in f64 over the
//! stored (rounded) values while the store is written, in one pass.
//!
//! Shards are read through their open file descriptors, never mapped: a shard truncated while a
//! run reads it is a short read (an error naming the shard), one rewritten in place fails the
//! utterance's checksum, and one replaced by a rename keeps being read from the file opened
//! (a consistent copy). A mapped file would kill the process with SIGBUS instead.

use anyhow::{bail, ensure, Context, Result};
use half::{bf16, f16};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The first bytes of every shard.
pub const MAGIC: &[u8; 8] = b"KDFRAME1";
/// The shard format's version (and the manifest's `format`). Version 1 had no checksums over
/// the offsets and speakers and no store identity; it is refused.
pub const VERSION: u32 = 2;
/// Bytes reserved for a shard's header.
pub const HEADER_BYTES: u64 = 4096;
/// Bytes of the header that carry fields (the CRC-32 of these follows them).
const HEADER_FIELDS: usize = 100;

/// A header's fields followed by their CRC-32 and zeros up to [`HEADER_BYTES`]: the first block
/// of a store shard and of a top-k targets file.
pub(super) fn sealed(mut fields: Vec<u8>) -> Vec<u8> {
    let crc = crc32fast::hash(&fields);
    fields.extend_from_slice(&crc.to_le_bytes());
    fields.resize(HEADER_BYTES as usize, 0);
    fields
}

/// The manifest's file name.
pub const MANIFEST: &str = "store.toml";

/// How features are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum FeatureKind {
    /// 4 bytes a value, exact.
    F32,
    /// IEEE half precision: 2 bytes, 11 significant bits (relative error below 5e-4).
    F16,
    /// bfloat16: 2 bytes, 8 significant bits, f32's range.
    Bf16,
}

impl FeatureKind {
    /// Bytes per value.
    pub fn bytes(self) -> usize {
        match self {
            FeatureKind::F32 => 4,
            FeatureKind::F16 | FeatureKind::Bf16 => 2,
        }
    }

    fn code(self) -> u32 {
        self as u32
    }

    fn from_code(c: u32) -> Option<Self> {
        [FeatureKind::F32, FeatureKind::F16, FeatureKind::Bf16].into_iter().find(|k| k.code() == c)
    }

    /// Appends `values` in this kind, little-endian.
    fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        match self {
            FeatureKind::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            FeatureKind::F16 => values.iter().for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
            FeatureKind::Bf16 => values.iter().for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        }
    }

    /// Decodes little-endian `bytes` of this kind into `out` (as many values as `out` holds).
    pub fn decode(self, bytes: &[u8], out: &mut [f32]) {
        match self {
            FeatureKind::F32 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            FeatureKind::F16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            FeatureKind::Bf16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
        }
    }
}

/// What a store holds: `store.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The shard format's version.
    pub format: u32,
    /// The store's identity: 16 hex digits of the SHA-256 of the rest of the manifest (which
    /// lists each shard's header CRC). Top-k target files record it.
    pub id: String,
    /// 16 hex digits shared by the splits one `kd-run store write` wrote (train, validation,
    /// test): a run refuses splits of different writes.
    pub set: String,
    /// How the features are stored.
    pub feature_kind: FeatureKind,
    /// Values per frame.
    pub feature_dim: usize,
    /// Frames in all shards.
    pub frames: u64,
    /// Utterances in all shards.
    pub utterances: u64,
    /// The largest label plus one.
    pub classes: u64,
    /// Where the frames came from.
    pub source: String,
    /// Per-channel mean of the stored frames.
    pub mean: Vec<f64>,
    /// Per-channel standard deviation (population, at least 1e-6) of the stored frames.
    pub std: Vec<f64>,
    /// The shards in order.
    pub shards: Vec<ShardEntry>,
}

impl Manifest {
    /// Parses `text`, the manifest `path`, and validates it ([`Manifest::validate`]).
    pub fn parse(text: &str, path: &Path) -> Result<Manifest> {
        // The format first, so that an older store is named as such, not as unknown fields.
        #[derive(Deserialize)]
        struct Format {
            format: Option<u32>,
        }
        if let Ok(Format { format: Some(f) }) = toml::from_str::<Format>(text) {
            ensure!(
                f == VERSION,
                "{}: store format {f}; this kd-run reads format {VERSION} (format 1 had no checksums over \
                 shard offsets and speakers and no store identity): write the store again with `kd-run store write`",
                path.display()
            );
        }
        let manifest: Manifest =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{}: not a frame store manifest: {e}", path.display()))?;
        manifest.validate(path)?;
        Ok(manifest)
    }

    /// Checks everything a manifest says, naming `path` and the field: the format; the width
    /// and one finite mean and one finite deviation > 0 a channel; classes in 1..=`MAX_CLASSES`;
    /// at least one shard; shard names `shard-NNNNN.kdf`, each listed once; each shard's
    /// frames, utterances (at least one, at most one a frame) and size in bytes consistent; the
    /// totals the shards' sums; `id` the hash of the rest and `set` 16 hex digits. The one
    /// check every command that opens a store runs (through [`FrameStore::open`]).
    pub fn validate(&self, path: &Path) -> Result<()> {
        let shown = path.display();
        ensure!(self.format == VERSION, "{shown}: store format {}; this kd-run reads format {VERSION}", self.format);
        let d = self.feature_dim;
        ensure!(
            d > 0 && self.mean.len() == d && self.std.len() == d,
            "{shown}: feature_dim = {d}, with {} means and {} deviations: expected feature_dim > 0 of each",
            self.mean.len(),
            self.std.len()
        );
        if let Some((c, m)) = self.mean.iter().enumerate().find(|(_, m)| !m.is_finite()) {
            bail!("{shown}: mean[{c}] = {m}: expected a finite number");
        }
        if let Some((c, s)) = self.std.iter().enumerate().find(|(_, s)| !(s.is_finite() && **s > 0.0)) {
            bail!("{shown}: std[{c}] = {s}: expected a finite deviation > 0");
        }
        let max = crate::config::MAX_CLASSES as u64;
        ensure!((1..=max).contains(&self.classes), "{shown}: classes = {}: expected 1 to {max}", self.classes);
        ensure!(!self.shards.is_empty(), "{shown}: lists no shards: expected at least one");
        let mut seen = std::collections::HashSet::new();
        let (mut frames, mut utterances) = (0u64, 0u64);
        let row = (d * self.feature_kind.bytes()) as u64 + 4;
        for (i, e) in self.shards.iter().enumerate() {
            let well_formed = e.file.len() > 10
                && e.file.starts_with("shard-")
                && e.file.ends_with(".kdf")
                && e.file[6..e.file.len() - 4].bytes().all(|b| b.is_ascii_digit());
            ensure!(well_formed, "{shown}: shards[{i}].file = '{}': expected a name shard-NNNNN.kdf", e.file);
            ensure!(seen.insert(&e.file), "{shown}: shard {} is listed twice", e.file);
            ensure!(
                e.frames > 0 && (1..=e.frames).contains(&e.utterances),
                "{shown}: {}: {} frames in {} utterances: expected at least one utterance of at least one frame",
                e.file,
                e.frames,
                e.utterances
            );
            let bytes = e
                .frames
                .checked_mul(row)
                .and_then(|b| b.checked_add(HEADER_BYTES + 8 + 16 * e.utterances))
                .with_context(|| format!("{shown}: {}: {} frames overflow", e.file, e.frames))?;
            ensure!(
                e.bytes == bytes,
                "{shown}: {}: bytes = {}, but {} frames of {d} x {:?} in {} utterances take {bytes}",
                e.file,
                e.bytes,
                e.frames,
                self.feature_kind,
                e.utterances
            );
            frames = frames.checked_add(e.frames).context("frame count overflows")?;
            utterances += e.utterances;
        }
        ensure!(
            frames == self.frames && utterances == self.utterances,
            "{shown}: frames = {}, utterances = {}, but the shards it lists hold {frames} and {utterances}",
            self.frames,
            self.utterances
        );
        ensure!(is_hex16(&self.set), "{shown}: set = '{}': expected 16 hex digits", self.set);
        let id = self.content_id()?;
        ensure!(
            self.id == id,
            "{shown}: id = '{}', but the manifest's contents hash to '{id}': it was changed after it was written",
            self.id
        );
        Ok(())
    }

    /// The identity of the manifest's contents: 16 hex digits of the SHA-256 of the manifest
    /// written with an empty `id`.
    pub fn content_id(&self) -> Result<String> {
        use sha2::Digest;
        let text = toml::to_string(&Manifest { id: String::new(), ..self.clone() })?;
        let digest = sha2::Sha256::digest(text.as_bytes());
        Ok(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The identity as a number (what top-k target files record).
    pub fn id_number(&self) -> u64 {
        u64::from_str_radix(&self.id, 16).unwrap_or(0)
    }
}

/// Whether `s` is 16 lowercase hex digits.
fn is_hex16(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A new identity for the splits one `kd-run store write` writes: 16 hex digits from the time,
/// the process and a counter.
pub fn new_set_id() -> String {
    use sha2::Digest;
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let seed = format!("{} {} {n}", now.as_nanos(), std::process::id());
    sha2::Sha256::digest(seed.as_bytes())[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Fails if `a` and `b` (splits of one store folder) were not written by the same
/// `kd-run store write`, naming both.
pub fn check_same_set(a: &FrameStore, b: &FrameStore) -> Result<()> {
    ensure!(
        a.manifest.set == b.manifest.set,
        "{} and {} are splits of different `kd-run store write`s (store sets {} and {}): the splits of a \
         store must be written together",
        a.dir.display(),
        b.dir.display(),
        a.manifest.set,
        b.manifest.set
    );
    Ok(())
}

/// Fails if `path` is a symbolic link: kd-run writes through none.
pub fn refuse_link(path: &Path) -> Result<()> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        bail!("{} is a symbolic link; kd-run does not write through links: give the folder itself", path.display());
    }
    Ok(())
}

/// Creates `path` for writing, new: a stale file (or link) of that name is removed first, and the
/// file is created exclusively, so no link is followed.
pub(super) fn new_file(path: &Path) -> Result<File> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove the stale {}", path.display())),
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))
}

/// One shard as the manifest lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    /// File name inside the store's folder.
    pub file: String,
    /// Frames in it.
    pub frames: u64,
    /// Utterances in it.
    pub utterances: u64,
    /// The CRC-32 of its header: ties the manifest to these very shards.
    pub header_crc: u32,
    /// Bytes.
    pub bytes: u64,
}

/// Writes a store: utterances in, shards and the manifest out.
pub struct StoreWriter {
    dir: PathBuf,
    set: String,
    kind: FeatureKind,
    dim: usize,
    shard_frames: u64,
    shard: Option<ShardWriter>,
    shards: Vec<ShardEntry>,
    sum: Vec<f64>,
    sum_sq: Vec<f64>,
    frames: u64,
    utterances: u64,
    largest_label: Option<u32>,
    /// Classes the labels come from, when the source knows them (a corpus's tied states):
    /// the manifest's count even if the largest classes never occur in this split.
    declared_classes: Option<u64>,
    decoded: Vec<f32>,
}

impl StoreWriter {
    /// Starts a store in `dir` (created; not a symbolic link, and it must not hold a manifest
    /// yet), frames of `dim` values stored as `kind`, a new shard after about `shard_frames`
    /// frames, one of the splits of `set` (16 hex digits, [`new_set_id`]).
    pub fn create(dir: &Path, set: &str, kind: FeatureKind, dim: usize, shard_frames: u64) -> Result<Self> {
        ensure!(dim > 0, "frames must have at least one feature");
        ensure!(is_hex16(set), "store set '{set}': expected 16 hex digits");
        refuse_link(dir)?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create the store folder {}", dir.display()))?;
        refuse_link(dir)?;
        ensure!(
            !dir.join(MANIFEST).exists(),
            "{} already holds a frame store; remove it or write elsewhere",
            dir.display()
        );
        Ok(StoreWriter {
            dir: dir.to_path_buf(),
            set: set.to_string(),
            kind,
            dim,
            shard_frames: shard_frames.max(1),
            shard: None,
            shards: Vec::new(),
            sum: vec![0.0; dim],
            sum_sq: vec![0.0; dim],
            frames: 0,
            utterances: 0,
            largest_label: None,
            declared_classes: None,
            decoded: Vec::new(),
        })
    }

    /// Appends one utterance: `features` `[labels.len(), dim]` row-major, finite; one label a frame.
    pub fn push(&mut self, speaker: u32, features: &[f32], labels: &[u32]) -> Result<()> {
        let n = labels.len();
        ensure!(n > 0, "utterance {} has no frames", self.utterances);
        ensure!(
            features.len() == n * self.dim,
            "utterance {}: {} feature values for {n} frames of {}",
            self.utterances,
            features.len(),
            self.dim
        );
        if let Some(i) = features.iter().position(|v| !v.is_finite()) {
            bail!(
                "utterance {}: frame {}, feature {} is {}: features must be finite numbers",
                self.utterances,
                i / self.dim,
                i % self.dim,
                features[i]
            );
        }
        if self.shard.as_ref().is_some_and(|s| s.frames >= self.shard_frames) {
            self.close_shard()?;
        }
        if self.shard.is_none() {
            let name = format!("shard-{:05}.kdf", self.shards.len());
            self.shard = Some(ShardWriter::create(&self.dir.join(name), self.kind, self.dim)?);
        }
        let shard = self.shard.as_mut().expect("opened above");
        let bytes = shard.push(speaker, features, labels)?;
        // Statistics of the values as stored (after rounding to f16 or bf16).
        self.decoded.resize(features.len(), 0.0);
        self.kind.decode(bytes, &mut self.decoded);
        for frame in self.decoded.chunks_exact(self.dim) {
            for (c, &v) in frame.iter().enumerate() {
                self.sum[c] += f64::from(v);
                self.sum_sq[c] += f64::from(v) * f64::from(v);
            }
        }
        self.frames += n as u64;
        self.utterances += 1;
        let top = labels.iter().copied().max().expect("n > 0");
        self.largest_label = Some(self.largest_label.map_or(top, |l| l.max(top)));
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        if let Some(shard) = self.shard.take() {
            self.shards.push(shard.finish()?);
        }
        Ok(())
    }

    /// Declares the classes the labels come from (a corpus's tied states, `data.classes`): the
    /// manifest then says `classes` even when the largest labels do not occur in this split, so
    /// that every split of a store, and a network trained on it, has the source's classes.
    pub fn declare_classes(&mut self, classes: u64) {
        self.declared_classes = Some(classes);
    }

    /// Closes the last shard and writes the manifest (atomically, last: a store without one is
    /// unfinished). `source` says where the frames came from.
    pub fn finish(mut self, source: &str) -> Result<Manifest> {
        self.close_shard()?;
        ensure!(self.frames > 0, "no frames to store in {}", self.dir.display());
        let largest = u64::from(self.largest_label.expect("frames > 0"));
        if let Some(declared) = self.declared_classes {
            ensure!(
                largest < declared,
                "{}: label {largest} among frames of {declared} classes (labels 0 to {})",
                self.dir.display(),
                declared - 1
            );
        }
        let n = self.frames as f64;
        let mean: Vec<f64> = self.sum.iter().map(|s| s / n).collect();
        let std = self.sum_sq.iter().zip(&mean).map(|(s, m)| (s / n - m * m).max(0.0).sqrt().max(1e-6)).collect();
        let mut manifest = Manifest {
            format: VERSION,
            id: String::new(),
            set: self.set,
            feature_kind: self.kind,
            feature_dim: self.dim,
            frames: self.frames,
            utterances: self.utterances,
            classes: self.declared_classes.unwrap_or(largest + 1),
            source: source.to_string(),
            mean,
            std,
            shards: self.shards,
        };
        manifest.id = manifest.content_id()?;
        let text = toml::to_string(&manifest)?;
        let tmp = self.dir.join(format!("{MANIFEST}.tmp"));
        new_file(&tmp)?.write_all(text.as_bytes()).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, self.dir.join(MANIFEST))?;
        Ok(manifest)
    }
}

/// One shard being written: features streamed after the reserved header, the small sections
/// kept in memory until the end.
struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: BufWriter<File>,
    kind: FeatureKind,
    dim: usize,
    frames: u64,
    labels: Vec<u8>,
    offsets: Vec<u64>,
    speakers: Vec<u32>,
    checksums: Vec<u32>,
    bytes: Vec<u8>,
}

impl ShardWriter {
    fn create(path: &Path, kind: FeatureKind, dim: usize) -> Result<Self> {
        let tmp = path.with_extension("kdf.tmp");
        let mut file = BufWriter::with_capacity(1 << 20, new_file(&tmp)?);
        file.write_all(&[0u8; HEADER_BYTES as usize])?;
        Ok(ShardWriter {
            path: path.to_path_buf(),
            tmp,
            file,
            kind,
            dim,
            frames: 0,
            labels: Vec::new(),
            offsets: vec![0],
            speakers: Vec::new(),
            checksums: Vec::new(),
            bytes: Vec::new(),
        })
    }

    /// Writes an utterance; returns its feature bytes as stored.
    fn push(&mut self, speaker: u32, features: &[f32], labels: &[u32]) -> Result<&[u8]> {
        self.bytes.clear();
        self.kind.encode(features, &mut self.bytes);
        let start = self.labels.len();
        labels.iter().for_each(|l| self.labels.extend_from_slice(&l.to_le_bytes()));
        let mut crc = crc32fast::Hasher::new();
        crc.update(&self.bytes);
        crc.update(&self.labels[start..]);
        self.checksums.push(crc.finalize());
        self.file.write_all(&self.bytes).with_context(|| format!("cannot write {}", self.tmp.display()))?;
        self.frames += labels.len() as u64;
        self.offsets.push(self.frames);
        self.speakers.push(speaker);
        Ok(&self.bytes)
    }

    fn finish(mut self) -> Result<ShardEntry> {
        let features_at = HEADER_BYTES;
        let labels_at = features_at + self.frames * (self.dim * self.kind.bytes()) as u64;
        let offsets_at = labels_at + self.labels.len() as u64;
        let speakers_at = offsets_at + 8 * self.offsets.len() as u64;
        let checksums_at = speakers_at + 4 * self.speakers.len() as u64;
        let length = checksums_at + 4 * self.checksums.len() as u64;
        self.file.write_all(&self.labels)?;
        self.offsets.iter().try_for_each(|o| self.file.write_all(&o.to_le_bytes()))?;
        self.speakers.iter().try_for_each(|s| self.file.write_all(&s.to_le_bytes()))?;
        self.checksums.iter().try_for_each(|c| self.file.write_all(&c.to_le_bytes()))?;
        let utterances = self.speakers.len() as u64;
        let words = |w: &[u32]| crc32fast::hash(&w.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
        let offset_bytes: Vec<u8> = self.offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
        let header = Header {
            kind: self.kind,
            dim: self.dim as u32,
            frames: self.frames,
            utterances,
            sections: [features_at, labels_at, offsets_at, speakers_at, checksums_at],
            length,
            section_crcs: [crc32fast::hash(&offset_bytes), words(&self.speakers), words(&self.checksums)],
        };
        let bytes = header.to_bytes();
        let mut file = self.file.into_inner().map_err(|e| e.into_error())?;
        file.seek(SeekFrom::Start(0))?;
        file.write_all(&bytes)?;
        file.sync_all().with_context(|| format!("cannot write {}", self.tmp.display()))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path)?;
        let header_crc = crc32fast::hash(&bytes[..HEADER_FIELDS]);
        let file = self.path.file_name().expect("a file name").to_string_lossy().into_owned();
        Ok(ShardEntry { file, frames: self.frames, utterances, header_crc, bytes: length })
    }
}

/// A shard's header fields.
#[derive(Debug, Clone, PartialEq)]
struct Header {
    kind: FeatureKind,
    dim: u32,
    frames: u64,
    utterances: u64,
    /// Byte offsets of features, labels, offsets, speakers, checksums.
    sections: [u64; 5],
    length: u64,
    /// CRC-32 of the offsets, speakers and checksums sections.
    section_crcs: [u32; 3],
}

impl Header {
    fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_BYTES as usize);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&self.kind.code().to_le_bytes());
        b.extend_from_slice(&self.dim.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&self.frames.to_le_bytes());
        b.extend_from_slice(&self.utterances.to_le_bytes());
        self.sections.iter().for_each(|s| b.extend_from_slice(&s.to_le_bytes()));
        b.extend_from_slice(&self.length.to_le_bytes());
        self.section_crcs.iter().for_each(|c| b.extend_from_slice(&c.to_le_bytes()));
        debug_assert_eq!(b.len(), HEADER_FIELDS);
        sealed(b)
    }

    /// Parses and checks the header of `path`, whose file is `file_len` bytes.
    fn parse(bytes: &[u8], path: &Path, file_len: u64) -> Result<Header> {
        let shown = path.display();
        if bytes.len() < HEADER_FIELDS + 4 || &bytes[..8] != MAGIC {
            let start: String = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
            bail!(
                "{shown} is not a kd-run frame store shard: it does not start with \"KDFRAME1\" (its first bytes: {})",
                if start.is_empty() { "none, the file is empty".to_string() } else { start }
            );
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        ensure!(
            version == VERSION,
            "{shown}: shard format version {version}; this kd-run reads version {VERSION} (version 1 had no \
             checksums over its offsets and speakers): write the store again with `kd-run store write`"
        );
        let crc = crc32fast::hash(&bytes[..HEADER_FIELDS]);
        ensure!(
            crc == u32_at(HEADER_FIELDS),
            "{shown}: the header's checksum does not match its contents: the file is damaged"
        );
        // The rest of the header block is zeros (so no byte of the file is outside a check).
        ensure!(
            bytes[HEADER_FIELDS + 4..].iter().all(|&b| b == 0),
            "{shown}: the header's padding is not zeros: the file is damaged"
        );
        let kind = FeatureKind::from_code(u32_at(12))
            .with_context(|| format!("{shown}: unknown feature kind {}", u32_at(12)))?;
        let h = Header {
            kind,
            dim: u32_at(16),
            frames: u64_at(24),
            utterances: u64_at(32),
            sections: [u64_at(40), u64_at(48), u64_at(56), u64_at(64), u64_at(72)],
            length: u64_at(80),
            section_crcs: [u32_at(88), u32_at(92), u32_at(96)],
        };
        ensure!(
            file_len == h.length,
            "{shown} is {file_len} bytes, but its header says {}: the file is {}",
            h.length,
            if file_len < h.length { "truncated" } else { "longer than written (appended to?)" }
        );
        // Each section's size follows from the counts; checked so no read can leave the file.
        let sizes = [
            h.frames.checked_mul(u64::from(h.dim) * kind.bytes() as u64),
            h.frames.checked_mul(4),
            h.utterances.checked_add(1).and_then(|u| u.checked_mul(8)),
            h.utterances.checked_mul(4),
            h.utterances.checked_mul(4),
        ];
        let mut at = HEADER_BYTES;
        for (i, size) in sizes.into_iter().enumerate() {
            let size = size.with_context(|| format!("{shown}: section sizes overflow"))?;
            ensure!(h.sections[i] == at, "{shown}: section {i} starts at {}, expected {at}", h.sections[i]);
            at = at.checked_add(size).with_context(|| format!("{shown}: section sizes overflow"))?;
        }
        ensure!(
            at == h.length,
            "{shown}: the sections end at byte {at}, but the header says the file has {}",
            h.length
        );
        Ok(h)
    }
}

/// Reads `buf.len()` bytes of `file` at `at`: a short read (the file shrank since it was opened
/// and checked) is an error naming `path` and `what` was read.
pub(super) fn read_exact_at(file: &File, path: &Path, buf: &mut [u8], at: u64, what: &str) -> Result<()> {
    file.read_exact_at(buf, at).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            anyhow::anyhow!(
                "{}: {what} (bytes {at} to {}) lies past the end of the file: it was truncated or rewritten \
                 after it was opened; a store must not change while it is read",
                path.display(),
                at + buf.len() as u64
            )
        } else {
            anyhow::anyhow!("{}: cannot read {what}: {e}", path.display())
        }
    })
}

thread_local! {
    /// The bytes of the last utterance read on this thread (features then labels, or a top-k
    /// file's probabilities then ids): one buffer reused by every read.
    pub(super) static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// One shard, open for positioned reads.
pub struct Shard {
    path: PathBuf,
    file: File,
    header: Header,
    /// The header's first [`HEADER_FIELDS`] bytes, as read when opened.
    fields: Vec<u8>,
    /// First frame of each utterance, and the frame count at the end.
    offsets: Vec<u64>,
    speakers: Vec<u32>,
    checksums: Vec<u32>,
}

impl Shard {
    /// Opens `path` and checks its header, length and utterance offsets.
    pub fn open(path: &Path) -> Result<Shard> {
        crate::inputs::check_file(path, "frame store shard")?;
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let len = file.metadata()?.len();
        let mut head = vec![0u8; len.min(HEADER_BYTES) as usize];
        read_exact_at(&file, path, &mut head, 0, "the header")?;
        let header = Header::parse(&head, path, len)?;
        let [_, _, offsets_at, speakers_at, _] = header.sections;
        let u = header.utterances as usize;
        // Offsets, speakers and checksums: one read (they are adjacent, and end the file).
        let mut tail = vec![0u8; (header.length - offsets_at) as usize];
        read_exact_at(&file, path, &mut tail, offsets_at, "the offsets, speakers and checksums")?;
        let (offset_bytes, rest) = tail.split_at(8 * (u + 1));
        let (speaker_bytes, checksum_bytes) = rest.split_at((header.sections[4] - speakers_at) as usize);
        for (name, bytes, want) in [
            ("utterance offsets", offset_bytes, header.section_crcs[0]),
            ("speakers", speaker_bytes, header.section_crcs[1]),
            ("utterance checksums", checksum_bytes, header.section_crcs[2]),
        ] {
            ensure!(
                crc32fast::hash(bytes) == want,
                "{}: the {name} section does not match its checksum in the header: the shard is damaged",
                path.display()
            );
        }
        let offsets: Vec<u64> =
            offset_bytes.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))).collect();
        let ok = offsets[0] == 0 && offsets[u] == header.frames && offsets.windows(2).all(|w| w[0] < w[1]);
        ensure!(ok, "{}: the utterance offsets are not increasing from 0 to the frame count", path.display());
        let words = |b: &[u8]| -> Vec<u32> {
            b.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))).collect()
        };
        let (speakers, checksums) = (words(speaker_bytes), words(checksum_bytes));
        head.truncate(HEADER_FIELDS);
        Ok(Shard { path: path.to_path_buf(), file, header, fields: head, offsets, speakers, checksums })
    }

    /// Utterances in the shard.
    pub fn utterances(&self) -> usize {
        self.speakers.len()
    }

    /// Frames of utterance `u`.
    pub fn utterance_frames(&self, u: usize) -> usize {
        (self.offsets[u + 1] - self.offsets[u]) as usize
    }

    /// Speaker of utterance `u`.
    pub fn speaker(&self, u: usize) -> u32 {
        self.speakers[u]
    }

    /// Utterance `u`'s features (decoded into `features`, `[frames, dim]`) and labels (into
    /// `labels`), after checking its checksum and that its labels are below `classes`. The whole
    /// utterance is read (positioned reads into a buffer this thread reuses) and checked.
    ///
    /// `frames`, if given, is a range of the utterance's frames to decode (the checksum still
    /// covers the whole utterance).
    pub fn read_utterance(
        &self,
        (u, frames): (usize, Option<(usize, usize)>),
        classes: u64,
        features: &mut Vec<f32>,
        labels: &mut Vec<u32>,
    ) -> Result<()> {
        let (dim, kind) = (self.header.dim as usize, self.header.kind);
        let (a, b) = (self.offsets[u] as usize, self.offsets[u + 1] as usize);
        let (from, to) = frames.unwrap_or((0, b - a));
        ensure!(from < to && to <= b - a, "frames {from}..{to} of an utterance of {}", b - a);
        let row = dim * kind.bytes();
        let f_at = self.header.sections[0] + (a * row) as u64;
        let l_at = self.header.sections[1] + 4 * a as u64;
        let (fn_, ln) = ((b - a) * row, 4 * (b - a));
        SCRATCH.with_borrow_mut(|buf| {
            buf.resize(fn_ + ln, 0);
            let (fbytes, lbytes) = buf.split_at_mut(fn_);
            let what = || format!("utterance {u} (frames {a} to {b})");
            read_exact_at(&self.file, &self.path, fbytes, f_at, &format!("the features of {}", what()))?;
            read_exact_at(&self.file, &self.path, lbytes, l_at, &format!("the labels of {}", what()))?;
            let mut crc = crc32fast::Hasher::new();
            crc.update(fbytes);
            crc.update(lbytes);
            ensure!(
                crc.finalize() == self.checksums[u],
                "{}: {} does not match its checksum: the shard is damaged (or was rewritten while being read)",
                self.path.display(),
                what()
            );
            features.resize((to - from) * dim, 0.0);
            kind.decode(&fbytes[from * row..to * row], features);
            labels.clear();
            let lbytes = &lbytes[4 * from..4 * to];
            labels.extend(lbytes.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))));
            Ok(())
        })?;
        if let Some(l) = labels.iter().find(|&&l| u64::from(l) >= classes) {
            bail!("{}: utterance {u} has label {l}, but the store has {classes} classes", self.path.display());
        }
        Ok(())
    }
}

/// A store opened for reading: its manifest and open shards.
pub struct FrameStore {
    /// The folder.
    pub dir: PathBuf,
    /// What it holds.
    pub manifest: Manifest,
    /// The shards in order.
    pub shards: Vec<Shard>,
    /// (shard, utterance within it) of each utterance, in store order.
    pub index: Vec<(u32, u32)>,
}

impl FrameStore {
    /// Opens the store in `dir`: reads the manifest and opens and checks every shard against it.
    pub fn open(dir: &Path) -> Result<FrameStore> {
        let path = dir.join(MANIFEST);
        crate::inputs::check_file(&path, "frame store manifest")?;
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let manifest = Manifest::parse(&text, &path)?;
        let d = manifest.feature_dim;
        let mut shards = Vec::with_capacity(manifest.shards.len());
        let mut index = Vec::new();
        let (mut frames, mut utterances) = (0u64, 0u64);
        for (s, entry) in manifest.shards.iter().enumerate() {
            let shard = Shard::open(&dir.join(&entry.file))?;
            let h = &shard.header;
            let crc = crc32fast::hash(&shard.fields);
            ensure!(
                crc == entry.header_crc
                    && h.length == entry.bytes
                    && h.frames == entry.frames
                    && h.utterances == entry.utterances
                    && h.kind == manifest.feature_kind
                    && h.dim as usize == d,
                "{}: shard {} is not the one {} lists (its header: {} frames, {} utterances, {:?} x {}; the manifest: {} frames, {} utterances, {:?} x {d})",
                dir.display(),
                entry.file,
                MANIFEST,
                h.frames,
                h.utterances,
                h.kind,
                h.dim,
                entry.frames,
                entry.utterances,
                manifest.feature_kind
            );
            index.extend((0..shard.utterances() as u32).map(|u| (s as u32, u)));
            frames += h.frames;
            utterances += h.utterances;
            shards.push(shard);
        }
        ensure!(
            frames == manifest.frames && utterances == manifest.utterances,
            "{}: the shards hold {frames} frames in {utterances} utterances, the manifest says {} in {}",
            path.display(),
            manifest.frames,
            manifest.utterances
        );
        Ok(FrameStore { dir: dir.to_path_buf(), manifest, shards, index })
    }

    /// Frames of each utterance, in store order.
    pub fn utterance_lengths(&self) -> Vec<u32> {
        self.index.iter().map(|&(s, u)| self.shards[s as usize].utterance_frames(u as usize) as u32).collect()
    }

    /// Reads utterance `utt` (store order); see [`Shard::read_utterance`].
    pub fn read(&self, utt: usize, features: &mut Vec<f32>, labels: &mut Vec<u32>) -> Result<()> {
        let (s, u) = self.index[utt];
        self.shards[s as usize].read_utterance((u as usize, None), self.manifest.classes, features, labels)
    }

    /// Reads frames `from..to` of utterance `utt` (store order), checking the whole utterance's
    /// checksum; see [`Shard::read_utterance`].
    pub fn read_frames(
        &self,
        (utt, from, to): (usize, usize, usize),
        features: &mut Vec<f32>,
        labels: &mut Vec<u32>,
    ) -> Result<()> {
        let (s, u) = self.index[utt];
        let range = Some((from, to));
        self.shards[s as usize].read_utterance((u as usize, range), self.manifest.classes, features, labels)
    }

    /// Speaker of utterance `utt` (store order).
    pub fn speaker(&self, utt: usize) -> u32 {
        let (s, u) = self.index[utt];
        self.shards[s as usize].speaker(u as usize)
    }

    /// Bytes of all shards.
    pub fn bytes(&self) -> u64 {
        self.manifest.shards.iter().map(|s| s.bytes).sum()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testutil::TempDir;

    /// The set of the test stores.
    pub(crate) const SET: &str = "0123456789abcdef";

    fn utterances() -> Vec<(u32, Vec<f32>, Vec<u32>)> {
        (0..7u32)
            .map(|i| {
                let n = 3 + (i as usize * 5) % 11;
                let f: Vec<f32> = (0..n * 4).map(|j| (i as f32) * 0.5 - (j as f32) * 0.125).collect();
                let l: Vec<u32> = (0..n as u32).map(|j| (i + j) % 9).collect();
                (i % 3, f, l)
            })
            .collect()
    }

    fn write(dir: &Path, kind: FeatureKind, shard_frames: u64) -> Manifest {
        let mut w = StoreWriter::create(dir, SET, kind, 4, shard_frames).unwrap();
        for (s, f, l) in utterances() {
            w.push(s, &f, &l).unwrap();
        }
        w.finish("test").unwrap()
    }

    #[test]
    fn declared_classes_hold_for_labels_that_never_occur_and_bound_those_that_do() {
        let dir = TempDir::new("store-declared-classes");
        let mut w = StoreWriter::create(&dir.0, SET, FeatureKind::F32, 4, 100).unwrap();
        w.declare_classes(14_000);
        for (s, f, l) in utterances() {
            w.push(s, &f, &l).unwrap();
        }
        assert_eq!(w.finish("test").unwrap().classes, 14_000, "labels 0..9 of 14,000 classes");
        let dir = TempDir::new("store-declared-classes-too-few");
        let mut w = StoreWriter::create(&dir.0, SET, FeatureKind::F32, 4, 100).unwrap();
        w.declare_classes(5);
        for (s, f, l) in utterances() {
            w.push(s, &f, &l).unwrap();
        }
        let e = w.finish("test").unwrap_err().to_string();
        assert!(e.contains("label 8 among frames of 5 classes"), "{e}");
        assert!(!dir.0.join(MANIFEST).exists(), "no manifest for a store with labels out of range");
    }

    #[test]
    fn a_store_reads_back_what_was_written_in_every_kind() {
        for kind in [FeatureKind::F32, FeatureKind::F16, FeatureKind::Bf16] {
            let dir = TempDir::new(&format!("store-roundtrip-{kind:?}"));
            let m = write(&dir.0, kind, 20);
            assert!(m.shards.len() > 2, "several shards: {:?}", m.shards);
            let store = FrameStore::open(&dir.0).unwrap();
            let all = utterances();
            assert_eq!(store.manifest.frames, all.iter().map(|u| u.2.len() as u64).sum::<u64>());
            assert_eq!(store.manifest.classes, 9);
            let (mut f, mut l) = (Vec::new(), Vec::new());
            let mut values = Vec::new();
            for (i, (s, want_f, want_l)) in all.iter().enumerate() {
                store.read(i, &mut f, &mut l).unwrap();
                assert_eq!(&l, want_l);
                let (si, ui) = store.index[i];
                assert_eq!(store.shards[si as usize].speaker(ui as usize), *s);
                assert_eq!(store.speaker(i), *s);
                // Exact in f32; within half an ulp of the kind otherwise.
                let tol = match kind {
                    FeatureKind::F32 => 0.0,
                    FeatureKind::F16 => 1.0 / 1024.0,
                    FeatureKind::Bf16 => 1.0 / 128.0,
                };
                for (a, b) in f.iter().zip(want_f) {
                    assert!((a - b).abs() <= tol * b.abs().max(1.0), "{kind:?}: {a} vs {b}");
                }
                values.extend_from_slice(&f);
            }
            // The stored statistics are those of the stored values (two-pass reference).
            for c in 0..4 {
                let col: Vec<f64> = values.iter().skip(c).step_by(4).map(|&v| f64::from(v)).collect();
                let mean = col.iter().sum::<f64>() / col.len() as f64;
                let var = col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / col.len() as f64;
                assert!((store.manifest.mean[c] - mean).abs() < 1e-9, "mean of channel {c}");
                assert!((store.manifest.std[c] - var.sqrt()).abs() < 1e-9, "std of channel {c}");
            }
        }
    }

    #[test]
    fn damaged_truncated_foreign_and_swapped_shards_are_clear_errors() {
        let dir = TempDir::new("store-corrupt");
        let m = write(&dir.0, FeatureKind::F16, 20);
        let shard = dir.0.join(&m.shards[0].file);
        let good = std::fs::read(&shard).unwrap();
        let err = |bytes: &[u8]| {
            std::fs::write(&shard, bytes).unwrap();
            let e = FrameStore::open(&dir.0).and_then(|s| {
                let (mut f, mut l) = (Vec::new(), Vec::new());
                (0..s.index.len()).try_for_each(|u| s.read(u, &mut f, &mut l))
            });
            format!("{:#}", e.expect_err("an error"))
        };
        // A flipped feature byte: the utterance's checksum.
        let mut bad = good.clone();
        bad[HEADER_BYTES as usize + 3] ^= 0x40;
        let e = err(&bad);
        assert!(e.contains("shard-00000.kdf: utterance 0") && e.contains("does not match its checksum"), "{e}");
        // Truncated.
        let e = err(&good[..good.len() - 5]);
        assert!(e.contains("is truncated"), "{e}");
        let e = err(&good[..50]);
        assert!(e.contains("is truncated") || e.contains("not a kd-run frame store shard"), "{e}");
        // Foreign.
        let e = err(b"PK\x03\x04 a zip file, not a shard");
        assert!(e.contains("is not a kd-run frame store shard"), "{e}");
        let e = err(b"");
        assert!(e.contains("the file is empty"), "{e}");
        // A damaged header field.
        let mut bad = good.clone();
        bad[30] ^= 1;
        assert!(err(&bad).contains("header's checksum"));
        // Another store's shard in its place.
        let other = TempDir::new("store-corrupt-other");
        let mut w = StoreWriter::create(&other.0, SET, FeatureKind::F16, 4, 20).unwrap();
        w.push(0, &[1.0; 8], &[0, 1]).unwrap();
        let om = w.finish("other").unwrap();
        let e = err(&std::fs::read(other.0.join(&om.shards[0].file)).unwrap());
        assert!(e.contains("is not the one store.toml lists"), "{e}");
        std::fs::write(&shard, &good).unwrap();
        assert!(FrameStore::open(&dir.0).is_ok());
        // No manifest: not a store (or an unfinished one).
        std::fs::remove_file(dir.0.join(MANIFEST)).unwrap();
        let e = format!("{:#}", FrameStore::open(&dir.0).err().unwrap());
        assert!(e.contains("frame store manifest") && e.contains("does not exist"), "{e}");
    }

    #[test]
    fn a_shard_changed_while_open_is_an_error_naming_it_or_read_consistently() {
        let dir = TempDir::new("store-changed");
        let m = write(&dir.0, FeatureKind::F32, 1000);
        assert_eq!(m.shards.len(), 1);
        let shard = dir.0.join(&m.shards[0].file);
        let good = std::fs::read(&shard).unwrap();
        let read_all = |s: &FrameStore| {
            let (mut f, mut l) = (Vec::new(), Vec::new());
            (0..s.index.len()).try_for_each(|u| s.read(u, &mut f, &mut l)).map(|_| (f, l))
        };
        let want = read_all(&FrameStore::open(&dir.0).unwrap()).unwrap();
        // Truncated in place (as `cp` does before writing): a short read naming the shard.
        let store = FrameStore::open(&dir.0).unwrap();
        std::fs::OpenOptions::new().write(true).open(&shard).unwrap().set_len(HEADER_BYTES + 16).unwrap();
        let e = format!("{:#}", read_all(&store).unwrap_err());
        assert!(e.contains("shard-00000.kdf") && e.contains("past the end of the file"), "{e}");
        // Rewritten in place with other bytes of the same length: the utterance's checksum.
        let mut other = good.clone();
        other[HEADER_BYTES as usize..HEADER_BYTES as usize + 64].iter_mut().for_each(|b| *b ^= 0x55);
        std::fs::write(&shard, &good).unwrap();
        let store = FrameStore::open(&dir.0).unwrap();
        std::fs::write(&shard, &other).unwrap();
        let e = format!("{:#}", read_all(&store).unwrap_err());
        assert!(e.contains("shard-00000.kdf: utterance 0") && e.contains("checksum"), "{e}");
        // Rewritten with identical bytes: read as before.
        std::fs::write(&shard, &good).unwrap();
        assert_eq!(read_all(&store).unwrap(), want);
        // Replaced by a rename: the open file is still read, whole and unchanged.
        let store = FrameStore::open(&dir.0).unwrap();
        let tmp = dir.0.join("replacement");
        std::fs::write(&tmp, &other[..other.len() / 2]).unwrap();
        std::fs::rename(&tmp, &shard).unwrap();
        assert_eq!(read_all(&store).unwrap(), want);
    }

    #[test]
    fn every_manifest_field_is_validated_and_every_shard_byte_is_checksummed() {
        let dir = TempDir::new("store-manifest");
        let m = write(&dir.0, FeatureKind::F16, 20);
        let path = dir.0.join(MANIFEST);
        let good = std::fs::read_to_string(&path).unwrap();
        let open_with = |edit: &dyn Fn(&mut toml::Table)| {
            let mut t: toml::Table = toml::from_str(&good).unwrap();
            edit(&mut t);
            std::fs::write(&path, toml::to_string(&t).unwrap()).unwrap();
            format!("{:#}", FrameStore::open(&dir.0).err().expect("an error"))
        };
        let set = |key: &'static str, v: toml::Value| move |t: &mut toml::Table| drop(t.insert(key.into(), v.clone()));
        let floats = |v: [f64; 4]| toml::Value::Array(v.iter().map(|&x| toml::Value::Float(x)).collect());
        for (edit, want) in [
            (
                Box::new(set("mean", floats([0.0, f64::NAN, 0.0, 0.0]))) as Box<dyn Fn(&mut toml::Table)>,
                "mean[1] = NaN",
            ),
            (Box::new(set("mean", floats([f64::INFINITY, 0.0, 0.0, 0.0]))), "mean[0] = inf"),
            (Box::new(set("std", floats([1.0, 1.0, 0.0, 1.0]))), "std[2] = 0: expected a finite deviation > 0"),
            (Box::new(set("std", floats([1.0, -1.0, 1.0, 1.0]))), "std[1] = -1"),
            (Box::new(set("shards", toml::Value::Array(vec![]))), "lists no shards"),
            (
                Box::new(|t: &mut toml::Table| {
                    let shards = t["shards"].as_array_mut().unwrap();
                    shards[1] = shards[0].clone();
                }),
                "shard shard-00000.kdf is listed twice",
            ),
            (
                Box::new(|t: &mut toml::Table| {
                    t["shards"].as_array_mut().unwrap()[0]["file"] = toml::Value::String("../x.kdf".into())
                }),
                "expected a name shard-NNNNN.kdf",
            ),
            (Box::new(set("frames", toml::Value::Integer(3))), "frames = 3, utterances = 7"),
            (Box::new(set("classes", toml::Value::Integer(0))), "classes = 0"),
            (Box::new(set("source", toml::Value::String("edited".into()))), "it was changed after it was written"),
            (Box::new(set("set", toml::Value::String("x".into()))), "set = 'x': expected 16 hex digits"),
            (Box::new(set("format", toml::Value::Integer(1))), "store format 1"),
        ] {
            let e = open_with(&*edit);
            assert!(e.contains(want) && e.contains("store.toml"), "{want}: {e}");
        }
        std::fs::write(&path, &good).unwrap();
        FrameStore::open(&dir.0).unwrap();
        // A flipped byte in each section the utterance checksums do not cover.
        let shard = dir.0.join(&m.shards[0].file);
        let bytes = std::fs::read(&shard).unwrap();
        let h = Header::parse(&bytes[..HEADER_BYTES as usize], &shard, bytes.len() as u64).unwrap();
        for (section, name) in [(2, "utterance offsets"), (3, "speakers"), (4, "utterance checksums")] {
            let mut bad = bytes.clone();
            bad[h.sections[section] as usize] ^= 0x01;
            std::fs::write(&shard, &bad).unwrap();
            let e = format!("{:#}", FrameStore::open(&dir.0).err().unwrap());
            assert!(e.contains("shard-00000.kdf") && e.contains(&format!("the {name} section does not match")), "{e}");
        }
        // A shard of format 1.
        let mut old = bytes.clone();
        old[8..12].copy_from_slice(&1u32.to_le_bytes());
        std::fs::write(&shard, &old).unwrap();
        let e = format!("{:#}", FrameStore::open(&dir.0).err().unwrap());
        assert!(e.contains("shard format version 1") && e.contains("kd-run store write"), "{e}");
        std::fs::write(&shard, &bytes).unwrap();
        // Splits of different writes.
        let other = TempDir::new("store-manifest-other");
        let mut w = StoreWriter::create(&other.0, "fedcba9876543210", FeatureKind::F16, 4, 20).unwrap();
        w.push(0, &[1.0; 8], &[0, 1]).unwrap();
        w.finish("other").unwrap();
        let (a, b) = (FrameStore::open(&dir.0).unwrap(), FrameStore::open(&other.0).unwrap());
        let e = format!("{:#}", check_same_set(&a, &b).unwrap_err());
        assert!(e.contains("0123456789abcdef") && e.contains("fedcba9876543210"), "{e}");
        check_same_set(&a, &a).unwrap();
    }

    #[test]
    fn a_store_is_never_written_through_a_symbolic_link() {
        let dir = TempDir::new("store-link");
        std::fs::create_dir_all(dir.0.join("victim")).unwrap();
        std::os::unix::fs::symlink(dir.0.join("victim"), dir.0.join("link")).unwrap();
        let e = format!("{:#}", StoreWriter::create(&dir.0.join("link"), SET, FeatureKind::F32, 2, 10).err().unwrap());
        assert!(e.contains("is a symbolic link"), "{e}");
        // A link planted where a temporary goes is replaced, not written through.
        let store = dir.0.join("s");
        let mut w = StoreWriter::create(&store, SET, FeatureKind::F32, 2, 10).unwrap();
        std::os::unix::fs::symlink(dir.0.join("victim/m"), store.join(format!("{MANIFEST}.tmp"))).unwrap();
        w.push(0, &[1.0; 2], &[0]).unwrap();
        w.finish("t").unwrap();
        assert!(!dir.0.join("victim/m").exists());
        assert!(std::fs::read_dir(dir.0.join("victim")).unwrap().next().is_none());
        FrameStore::open(&store).unwrap();
    }

    #[test]
    fn bad_utterances_are_refused_when_written() {
        let dir = TempDir::new("store-bad-input");
        let mut w = StoreWriter::create(&dir.0, SET, FeatureKind::F32, 2, 100).unwrap();
        let e = format!("{:#}", w.push(0, &[1.0, f32::NAN], &[0]).err().unwrap());
        assert!(e.contains("frame 0, feature 1 is NaN"), "{e}");
        assert!(w.push(0, &[1.0; 3], &[0, 1]).is_err());
        assert!(w.push(0, &[], &[]).is_err());
        w.push(0, &[1.0; 2], &[3]).unwrap();
        w.finish("t").unwrap();
        let e = format!("{:#}", StoreWriter::create(&dir.0, SET, FeatureKind::F32, 2, 100).err().unwrap());
        assert!(e.contains("already holds a frame store"), "{e}");
    }
}
