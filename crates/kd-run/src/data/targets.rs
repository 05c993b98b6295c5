//! A teacher's top-k soft targets for every frame of a [`FrameStore`], on disk beside it.
//!
//! One file (`<name>.kdt`):
//!
//! ```text
//! header (4096 bytes)  magic "KDTOPK01", version, k, bytes per class id, classes, frames,
//!                      utterances, the temperature, the store's id, the teacher's left and right
//!                      context, the byte offset of each section, the file length, the CRC-32 of
//!                      the checksums section, the kept mass (version 3: mean, min, p1, p5, p50
//!                      as f64), CRC-32 of the header
//! probs     [frames, k]  f16, the teacher's k largest probabilities at T, renormalized over them
//! ids       [frames, k]  their class ids: u8, u16 or u32, the smallest that holds the classes
//! checksums [utterances] u32 CRC-32 of each utterance's probability and id bytes
//! ```
//!
//! Rows follow the store's frames in store order. The file is tied to its store by the store's
//! id (a hash of its manifest, which lists every shard's header CRC), so targets computed for
//! another store (or a rewritten one) are refused, naming both ids; and to the context its
//! teacher's windows had, which a run must use too.
//! It is read like a shard: positioned reads through the descriptor opened, each utterance's
//! rows checked against their checksum (see [`super::store`]).
//!
//! The header records how much of the teacher's probability mass at T the top k keep
//! ([`KeptMass`]: per frame `sum_k softmax(v / T)[c_k]`, before the renormalization), since the
//! truncation is a choice to judge: its mean, its minimum and its 1st, 5th and 50th percentiles
//! over the frames. Version 2 files, written before it was recorded, still read, without it.

use super::store::{new_file, read_exact_at, refuse_link, sealed, FrameStore, HEADER_BYTES, SCRATCH};
use anyhow::{bail, ensure, Context, Result};
use half::f16;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The first bytes of a top-k targets file.
pub const MAGIC: &[u8; 8] = b"KDTOPK01";
const VERSION: u32 = 3;
/// The bytes of the header's fields before its CRC: version 2 (no kept mass), version 3.
const HEADER_FIELDS_V2: usize = 104;
const HEADER_FIELDS: usize = 144;

/// How much of the teacher's probability mass at T the top k of a targets file keep, over its
/// frames: `mass = sum_k softmax(v / T)[c_k]` per frame (`kd_core::top_k_mass`), `1 - mass` being
/// what the renormalized targets leave out. The percentiles come from a histogram of
/// [`MASS_BINS`] bins of width 1 / [`MASS_BINS`] over [0, 1]: each is the lower edge of the bin
/// holding that rank (nearest rank, `ceil(q n)`-th smallest), raised to the minimum if below it,
/// so the exact percentile lies in `[value, value + 1 / MASS_BINS)`; the mean and the minimum
/// are exact (of f32 values).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeptMass {
    /// The mean over the frames.
    pub mean: f64,
    /// The smallest.
    pub min: f64,
    /// The 1st percentile: 99% of the frames keep at least this.
    pub p1: f64,
    /// The 5th percentile.
    pub p5: f64,
    /// The median.
    pub p50: f64,
}

/// Bins of the kept-mass histogram (resolution 1e-4).
pub const MASS_BINS: usize = 10_000;

impl KeptMass {
    /// One line: `mean 0.9312, p50 0.9512, p5 0.8121, p1 0.7012, min 0.4100`.
    pub fn describe(&self) -> String {
        format!("mean {:.4}, p50 {:.4}, p5 {:.4}, p1 {:.4}, min {:.4}", self.mean, self.p50, self.p5, self.p1, self.min)
    }

    fn values(&self) -> [f64; 5] {
        [self.mean, self.min, self.p1, self.p5, self.p50]
    }
}

/// Accumulates per-frame kept masses into [`KeptMass`] in constant memory.
#[derive(Debug, Clone)]
pub struct MassHistogram {
    bins: Vec<u64>,
    n: u64,
    sum: f64,
    min: f64,
}

impl Default for MassHistogram {
    fn default() -> Self {
        MassHistogram { bins: vec![0; MASS_BINS], n: 0, sum: 0.0, min: f64::INFINITY }
    }
}

impl MassHistogram {
    /// Adds frames' masses (each clamped to [0, 1]; rounding may pass 1 by an ulp).
    pub fn add(&mut self, masses: &[f32]) -> Result<()> {
        for &m in masses {
            ensure!(m.is_finite(), "the teacher's kept probability mass is {m}: its logits are not finite");
            let m = f64::from(m).clamp(0.0, 1.0);
            self.bins[((m * MASS_BINS as f64) as usize).min(MASS_BINS - 1)] += 1;
            self.sum += m;
            self.min = self.min.min(m);
        }
        self.n += masses.len() as u64;
        Ok(())
    }

    /// The summary; `None` for no frames.
    pub fn summary(&self) -> Option<KeptMass> {
        if self.n == 0 {
            return None;
        }
        let at = |q: f64| {
            let rank = ((q * self.n as f64).ceil() as u64).max(1);
            let mut seen = 0;
            for (i, &c) in self.bins.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return (i as f64 / MASS_BINS as f64).max(self.min);
                }
            }
            1.0
        };
        Some(KeptMass { mean: self.sum / self.n as f64, min: self.min, p1: at(0.01), p5: at(0.05), p50: at(0.5) })
    }
}

/// Checks a temperature by the rule `run` applies to a stage's (`config::Temperature`): within
/// [`crate::config::MIN_TEMPERATURE`, `crate::config::MAX_TEMPERATURE`].
pub fn check_temperature(t: f64, what: &str) -> Result<()> {
    use crate::config::{MAX_TEMPERATURE, MIN_TEMPERATURE};
    ensure!(
        (MIN_TEMPERATURE..=MAX_TEMPERATURE).contains(&t),
        "{what} = {t}: expected a temperature in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}] (outside it f32 rounding \
         erases the soft targets: see docs/experiment-files.md)"
    );
    Ok(())
}

/// Bytes per class id for `classes` classes: 1, 2 or 4.
pub fn id_bytes(classes: u64) -> usize {
    if classes <= 1 << 8 {
        1
    } else if classes <= 1 << 16 {
        2
    } else {
        4
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Header {
    k: u32,
    id_bytes: u32,
    classes: u64,
    frames: u64,
    utterances: u64,
    temperature: f64,
    store_id: u64,
    context: (u32, u32),
    sections: [u64; 3],
    length: u64,
    checks_crc: u32,
    /// `None` in a version 2 file (and until the writer finishes).
    kept: Option<KeptMass>,
}

/// What a targets file is for: its store, k, temperature and the teacher's context.
struct Params {
    k: usize,
    classes: u64,
    frames: u64,
    utterances: u64,
    temperature: f64,
    store_id: u64,
    context: (u32, u32),
}

impl Header {
    fn new(p: Params, checks_crc: u32) -> Header {
        let Params { k, classes, frames, utterances, temperature, store_id, context } = p;
        let ib = id_bytes(classes) as u64;
        let probs_at = HEADER_BYTES;
        let ids_at = probs_at + frames * k as u64 * 2;
        let checks_at = ids_at + frames * k as u64 * ib;
        let length = checks_at + 4 * utterances;
        Header {
            k: k as u32,
            id_bytes: ib as u32,
            classes,
            frames,
            utterances,
            temperature,
            store_id,
            context,
            sections: [probs_at, ids_at, checks_at],
            length,
            checks_crc,
            kept: None,
        }
    }

    /// The header of a version 3 file, recording `kept`.
    fn to_bytes(&self, kept: &KeptMass) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_BYTES as usize);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&self.k.to_le_bytes());
        b.extend_from_slice(&self.id_bytes.to_le_bytes());
        b.extend_from_slice(&self.classes.to_le_bytes());
        b.extend_from_slice(&self.frames.to_le_bytes());
        b.extend_from_slice(&self.utterances.to_le_bytes());
        b.extend_from_slice(&self.temperature.to_le_bytes());
        b.extend_from_slice(&self.store_id.to_le_bytes());
        b.extend_from_slice(&self.context.0.to_le_bytes());
        b.extend_from_slice(&self.context.1.to_le_bytes());
        self.sections.iter().for_each(|s| b.extend_from_slice(&s.to_le_bytes()));
        b.extend_from_slice(&self.length.to_le_bytes());
        b.extend_from_slice(&self.checks_crc.to_le_bytes());
        kept.values().iter().for_each(|v| b.extend_from_slice(&v.to_le_bytes()));
        debug_assert_eq!(b.len(), HEADER_FIELDS);
        sealed(b)
    }

    fn parse(bytes: &[u8], path: &Path, file_len: u64) -> Result<Header> {
        let shown = path.display();
        ensure!(
            bytes.len() >= HEADER_FIELDS + 4 && &bytes[..8] == MAGIC,
            "{shown} is not a kd-run top-k targets file (it does not start with \"KDTOPK01\")"
        );
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let f64_at = |at: usize| f64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let fields = match u32_at(8) {
            VERSION => HEADER_FIELDS,
            2 => HEADER_FIELDS_V2,
            v => bail!(
                "{shown}: version {v}; this kd-run reads versions 2 and {VERSION} (version 1 recorded neither the \
                 store's id nor the teacher's context; a later version comes from a newer kd-run): compute the \
                 targets again with `kd-run store targets`"
            ),
        };
        ensure!(
            crc32fast::hash(&bytes[..fields]) == u32_at(fields),
            "{shown}: the header's checksum does not match its contents: the file is damaged"
        );
        // The rest of the header block is zeros (so no byte of the file is outside a check).
        ensure!(
            bytes[fields + 4..].iter().all(|&b| b == 0),
            "{shown}: the header's padding is not zeros: the file is damaged"
        );
        let kept = (fields == HEADER_FIELDS).then(|| KeptMass {
            mean: f64_at(104),
            min: f64_at(112),
            p1: f64_at(120),
            p5: f64_at(128),
            p50: f64_at(136),
        });
        if let Some(k) = &kept {
            ensure!(
                k.values().iter().all(|v| (0.0..=1.0).contains(v)) && k.min <= k.p1 && k.p1 <= k.p5 && k.p5 <= k.p50,
                "{shown}: the header's kept probability mass ({}) is not a set of ordered shares in [0, 1]: the \
                 file is damaged",
                k.describe()
            );
        }
        let h = Header {
            k: u32_at(12),
            id_bytes: u32_at(16),
            classes: u64_at(20),
            frames: u64_at(28),
            utterances: u64_at(36),
            temperature: f64::from_le_bytes(bytes[44..52].try_into().expect("8 bytes")),
            store_id: u64_at(52),
            context: (u32_at(60), u32_at(64)),
            sections: [u64_at(68), u64_at(76), u64_at(84)],
            length: u64_at(92),
            checks_crc: u32_at(100),
            kept,
        };
        ensure!(
            file_len == h.length,
            "{shown} is {file_len} bytes, but its header says {}: the file is {}",
            h.length,
            if file_len < h.length { "truncated" } else { "longer than written" }
        );
        // The sizes, checked before `Header::new` multiplies them.
        let fits = h.frames.checked_mul(u64::from(h.k) * 6).is_some() && h.utterances.checked_mul(4).is_some();
        ensure!(h.k > 0 && fits, "{shown}: the header's sizes do not fit together");
        let expect = Header::new(
            Params {
                k: h.k as usize,
                classes: h.classes,
                frames: h.frames,
                utterances: h.utterances,
                temperature: h.temperature,
                store_id: h.store_id,
                context: h.context,
            },
            h.checks_crc,
        );
        ensure!(Header { kept: h.kept, ..expect } == h, "{shown}: the header's sizes do not fit together");
        check_temperature(h.temperature, &format!("{shown}: the temperature"))?;
        Ok(h)
    }
}

/// Writes top-k targets utterance by utterance, in store order.
pub struct TargetsWriter {
    path: PathBuf,
    tmp: PathBuf,
    probs: BufWriter<File>,
    ids_tmp: PathBuf,
    ids: BufWriter<File>,
    header: Header,
    checksums: Vec<u32>,
    frames: u64,
    pb: Vec<u8>,
    ib: Vec<u8>,
    mass: MassHistogram,
}

impl TargetsWriter {
    /// Starts `path` (not a symbolic link, nor its folder) for `store`'s frames: `k` targets a
    /// frame made at `temperature` by a teacher of `context` (left, right) frames.
    pub fn create(path: &Path, store: &FrameStore, k: usize, temperature: f64, context: (u32, u32)) -> Result<Self> {
        check_temperature(temperature, "the temperature")?;
        refuse_link(path)?;
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            refuse_link(dir)?;
        }
        let m = &store.manifest;
        let params = Params {
            k,
            classes: m.classes,
            frames: m.frames,
            utterances: m.utterances,
            temperature,
            store_id: m.id_number(),
            context,
        };
        let header = Header::new(params, 0);
        let tmp = path.with_extension("kdt.tmp");
        let ids_tmp = path.with_extension("ids.tmp");
        let open = |p: &Path| -> Result<BufWriter<File>> { Ok(BufWriter::with_capacity(1 << 20, new_file(p)?)) };
        let mut probs = open(&tmp)?;
        probs.write_all(&[0u8; HEADER_BYTES as usize])?;
        Ok(TargetsWriter {
            path: path.to_path_buf(),
            tmp,
            probs,
            ids: open(&ids_tmp)?,
            ids_tmp,
            header,
            checksums: Vec::new(),
            frames: 0,
            pb: Vec::new(),
            ib: Vec::new(),
            mass: MassHistogram::default(),
        })
    }

    /// Appends the next utterance's rows: `probs` and `ids` `[frames, k]` row-major, and
    /// `kept`, each frame's share of the teacher's probability mass at T that its top k hold
    /// (before renormalization; `kd_core::top_k_mass`).
    pub fn push(&mut self, probs: &[f32], ids: &[i64], kept: &[f32]) -> Result<()> {
        let k = self.header.k as usize;
        ensure!(probs.len() == ids.len() && probs.len().is_multiple_of(k), "top-k rows of {k} values expected");
        ensure!(kept.len() * k == probs.len(), "one kept mass per frame expected");
        self.mass.add(kept)?;
        self.pb.clear();
        self.ib.clear();
        probs.iter().for_each(|p| self.pb.extend_from_slice(&f16::from_f32(*p).to_le_bytes()));
        for &c in ids {
            ensure!(c >= 0 && (c as u64) < self.header.classes, "class id {c} outside the store's classes");
            match self.header.id_bytes {
                1 => self.ib.push(c as u8),
                2 => self.ib.extend_from_slice(&(c as u16).to_le_bytes()),
                _ => self.ib.extend_from_slice(&(c as u32).to_le_bytes()),
            }
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&self.pb);
        crc.update(&self.ib);
        self.checksums.push(crc.finalize());
        self.probs.write_all(&self.pb)?;
        self.ids.write_all(&self.ib)?;
        self.frames += (probs.len() / k) as u64;
        Ok(())
    }

    /// Finishes the file (the ids appended after the probabilities, then the checksums, the
    /// header last) and returns its size in bytes and the kept mass it records.
    pub fn finish(mut self) -> Result<(u64, KeptMass)> {
        ensure!(
            self.frames == self.header.frames && self.checksums.len() as u64 == self.header.utterances,
            "top-k targets for {} frames in {} utterances, but the store has {} in {}",
            self.frames,
            self.checksums.len(),
            self.header.frames,
            self.header.utterances
        );
        self.ids.flush()?;
        drop(self.ids);
        let mut ids = File::open(&self.ids_tmp)?;
        std::io::copy(&mut ids, &mut self.probs)?;
        std::fs::remove_file(&self.ids_tmp)?;
        let checks: Vec<u8> = self.checksums.iter().flat_map(|c| c.to_le_bytes()).collect();
        self.probs.write_all(&checks)?;
        self.header.checks_crc = crc32fast::hash(&checks);
        // A store has at least one frame; an empty one would record a mass of 1.
        let kept = self.mass.summary().unwrap_or(KeptMass { mean: 1.0, min: 1.0, p1: 1.0, p5: 1.0, p50: 1.0 });
        let mut file = self.probs.into_inner().map_err(|e| e.into_error())?;
        file.seek(SeekFrom::Start(0))?;
        file.write_all(&self.header.to_bytes(&kept))?;
        file.sync_all()?;
        std::fs::rename(&self.tmp, &self.path)?;
        Ok((self.header.length, kept))
    }
}

/// A top-k targets file, open for positioned reads, checked against its store.
pub struct TopKFile {
    path: PathBuf,
    file: File,
    header: Header,
    /// First frame of each utterance (store order), and the frame count at the end.
    starts: Vec<u64>,
    /// Each utterance's checksum, read when opened.
    checksums: Vec<u32>,
}

impl TopKFile {
    /// Opens `path` and checks it belongs to `store` (its id and counts) and was made by a
    /// teacher of `context` (left, right) frames.
    pub fn open(path: &Path, store: &FrameStore, context: (u32, u32)) -> Result<TopKFile> {
        crate::inputs::check_file(path, "top-k targets file")?;
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let len = file.metadata()?.len();
        let mut head = vec![0u8; len.min(HEADER_BYTES) as usize];
        read_exact_at(&file, path, &mut head, 0, "the header")?;
        let header = Header::parse(&head, path, len)?;
        let m = &store.manifest;
        ensure!(
            header.store_id == m.id_number() && header.frames == m.frames && header.utterances == m.utterances,
            "{} was computed for another frame store than {} (the file's store id {:016x}, the store's {}; or the \
             store was rewritten since)",
            path.display(),
            store.dir.display(),
            header.store_id,
            m.id
        );
        ensure!(
            header.context == context,
            "{} was computed by a teacher of context [{}, {}], but the run's windows are [{}, {}] (data.context)",
            path.display(),
            header.context.0,
            header.context.1,
            context.0,
            context.1
        );
        let mut starts = Vec::with_capacity(store.index.len() + 1);
        let mut at = 0u64;
        starts.push(0);
        for l in store.utterance_lengths() {
            at += u64::from(l);
            starts.push(at);
        }
        let mut bytes = vec![0u8; 4 * header.utterances as usize];
        read_exact_at(&file, path, &mut bytes, header.sections[2], "the checksums")?;
        ensure!(
            crc32fast::hash(&bytes) == header.checks_crc,
            "{}: the checksums section does not match its checksum in the header: the file is damaged",
            path.display()
        );
        let checksums = bytes.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
        Ok(TopKFile { path: path.to_path_buf(), file, header, starts, checksums })
    }

    /// Fails unless a distill stage `stage` that streams these targets asks for them: its
    /// `teacher_top_k` is this file's k and its temperature the file's.
    pub fn check_stage(&self, stage: &str, top_k: Option<i64>, temperature: Option<f64>) -> Result<()> {
        let (k, t) = (self.k(), self.temperature());
        ensure!(
            top_k == Some(k as i64),
            "stage `{stage}`: teacher_top_k = {}, but the targets it streams ({}) keep the top {k}: set teacher_top_k = {k}",
            top_k.map_or("(unset)".to_string(), |k| k.to_string()),
            self.path.display()
        );
        ensure!(
            temperature == Some(t),
            "stage `{stage}`: temperature T = {}, but the targets it streams ({}) were made at T = {t}",
            temperature.map_or("(none)".to_string(), |t| t.to_string()),
            self.path.display()
        );
        Ok(())
    }

    /// Targets per frame.
    pub fn k(&self) -> usize {
        self.header.k as usize
    }

    /// The temperature they were made at.
    pub fn temperature(&self) -> f64 {
        self.header.temperature
    }

    /// The share of the teacher's probability mass the top k keep over the frames; `None` for
    /// a version 2 file, which did not record it.
    pub fn kept_mass(&self) -> Option<KeptMass> {
        self.header.kept
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The frames it holds targets for.
    pub fn frames(&self) -> u64 {
        self.header.frames
    }

    /// Utterance `utt`'s rows, appended to `probs` and `ids`, after checking its checksum.
    #[cfg(test)]
    pub fn read(&self, utt: usize, probs: &mut Vec<f32>, ids: &mut Vec<i64>) -> Result<()> {
        let n = (self.starts[utt + 1] - self.starts[utt]) as usize;
        self.read_frames((utt, 0, n), probs, ids)
    }

    /// Rows `from..to` of utterance `utt`, appended to `probs` and `ids`, after checking the
    /// utterance's checksum.
    pub fn read_frames(
        &self,
        (utt, from, to): (usize, usize, usize),
        probs: &mut Vec<f32>,
        ids: &mut Vec<i64>,
    ) -> Result<()> {
        let k = self.k();
        let ib = self.header.id_bytes as usize;
        let (a, b) = (self.starts[utt], self.starts[utt + 1]);
        let [p_at, i_at, _] = self.header.sections;
        let (pn, inn) = ((b - a) as usize * k * 2, (b - a) as usize * k * ib);
        SCRATCH.with_borrow_mut(|buf| {
            buf.resize(pn + inn, 0);
            let (pbytes, ibytes) = buf.split_at_mut(pn);
            let what = |part: &str| format!("the {part} of utterance {utt}");
            read_exact_at(&self.file, &self.path, pbytes, p_at + a * k as u64 * 2, &what("probabilities"))?;
            read_exact_at(&self.file, &self.path, ibytes, i_at + a * (k * ib) as u64, &what("class ids"))?;
            let mut crc = crc32fast::Hasher::new();
            crc.update(pbytes);
            crc.update(ibytes);
            if crc.finalize() != self.checksums[utt] {
                bail!(
                    "{}: the targets of utterance {utt} do not match their checksum: the file is damaged (or was \
                     rewritten while being read)",
                    self.path.display()
                );
            }
            let (pbytes, ibytes) = (&pbytes[from * k * 2..to * k * 2], &ibytes[from * k * ib..to * k * ib]);
            probs.extend(pbytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()));
            match ib {
                1 => ids.extend(ibytes.iter().map(|&c| i64::from(c))),
                2 => ids.extend(ibytes.chunks_exact(2).map(|c| i64::from(u16::from_le_bytes([c[0], c[1]])))),
                _ => {
                    ids.extend(ibytes.chunks_exact(4).map(|c| i64::from(u32::from_le_bytes(c.try_into().expect("4")))))
                }
            }
            Ok(())
        })
    }
}

/// Computes a teacher's top-k targets for every frame of `store` in one pass, in store order,
/// `batch` windows of `left + 1 + right` frames at a time through `teacher` (logits at T = 1
/// in; `objective` makes the top k at its temperature), and writes them to `path`. Returns the
/// file's size in bytes and the share of the teacher's probability mass the top k keep.
#[allow(clippy::too_many_arguments)]
pub fn write_top_k(
    store: &FrameStore,
    path: &Path,
    teacher: &dyn Fn(&Tensor) -> Result<Tensor>,
    objective: &kd_core::Objective,
    k: usize,
    (left, right): (usize, usize),
    batch: usize,
    device: Device,
) -> Result<(u64, KeptMass)> {
    let temperature = objective.temperature().context("top-k targets need a soft-target objective")?;
    let mut w = TargetsWriter::create(path, store, k, temperature, (left as u32, right as u32))?;
    let d = store.manifest.feature_dim;
    let mean: Vec<f32> = store.manifest.mean.iter().map(|&v| v as f32).collect();
    let inv: Vec<f32> = store.manifest.std.iter().map(|&v| (1.0 / v) as f32).collect();
    let (mut f, mut l) = (Vec::new(), Vec::new());
    let mut x: Vec<f32> = Vec::new();
    let mut lens: Vec<usize> = Vec::new();
    let n = store.index.len();
    let flush = |x: &mut Vec<f32>, lens: &mut Vec<usize>, w: &mut TargetsWriter| -> Result<()> {
        if lens.is_empty() {
            return Ok(());
        }
        let rows: usize = lens.iter().sum();
        let xt = Tensor::from_slice(x).view([rows as i64, -1]).to_device(device);
        let z = tch::no_grad(|| teacher(&xt))?;
        let z = z.to_kind(Kind::Float);
        let t = objective.top_k_targets(&z, k as i64)?;
        let top = t.as_top_k().context("top-k targets")?;
        let kept = kd_core::top_k_mass(&z, top.classes, temperature)?;
        let probs = Vec::<f32>::try_from(top.probs.to_device(Device::Cpu).to_kind(Kind::Float).view([-1]))?;
        let ids = Vec::<i64>::try_from(top.classes.to_device(Device::Cpu).view([-1]))?;
        let kept = Vec::<f32>::try_from(kept.to_device(Device::Cpu))?;
        let mut at = 0;
        for &len in lens.iter() {
            w.push(&probs[at * k..(at + len) * k], &ids[at * k..(at + len) * k], &kept[at..at + len])?;
            at += len;
        }
        x.clear();
        lens.clear();
        Ok(())
    };
    for u in 0..n {
        store.read(u, &mut f, &mut l)?;
        let len = l.len() as i64;
        for v in f.chunks_exact_mut(d) {
            v.iter_mut().zip(&mean).zip(&inv).for_each(|((v, m), s)| *v = (*v - m) * s);
        }
        for t in 0..len {
            for o in -(left as i64)..=right as i64 {
                let src = (t + o).clamp(0, len - 1) as usize;
                x.extend_from_slice(&f[src * d..(src + 1) * d]);
            }
        }
        lens.push(len as usize);
        if lens.iter().sum::<usize>() >= batch {
            flush(&mut x, &mut lens, &mut w)?;
        }
    }
    flush(&mut x, &mut lens, &mut w)?;
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::store::tests::SET;
    use crate::data::store::{FeatureKind, StoreWriter};
    use crate::testutil::TempDir;

    #[test]
    fn top_k_targets_round_trip_and_refuse_damage_and_other_stores() {
        let _generator = kd_core::lock_global_generator();
        let dir = TempDir::new("topk");
        let mut sw = StoreWriter::create(&dir.0.join("s"), SET, FeatureKind::F16, 2, 50).unwrap();
        for u in 0..5usize {
            let n = 3 + u * 4;
            let f: Vec<f32> = (0..2 * n).map(|i| (i as f32 * 0.37 + u as f32).sin()).collect();
            // Labels up to 42: 43 classes, as the teacher has.
            sw.push(
                0,
                &f,
                &(0..n as u32)
                    .map(|t| if u == 4 && t == 0 { 42 } else { (t * 11 + u as u32 * 3) % 42 })
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        }
        sw.finish("t").unwrap();
        let store = FrameStore::open(&dir.0.join("s")).unwrap();
        assert_eq!(store.manifest.classes, 43);
        // A linear teacher over the 3-frame windows, 43 classes (ids fit in one byte).
        tch::manual_seed(1);
        let wt = Tensor::randn([6, 43], (Kind::Float, Device::Cpu));
        let teacher = |x: &Tensor| Ok(x.matmul(&wt));
        let objective = kd_core::Objective::soft_targets(2.0, kd_core::LossWeights::default()).unwrap();
        let path = dir.0.join("s/teacher.kdt");
        let (bytes, kept) = write_top_k(&store, &path, &teacher, &objective, 4, (1, 1), 7, Device::Cpu).unwrap();
        let frames = store.manifest.frames;
        assert_eq!(bytes, HEADER_BYTES + frames * 4 * (2 + 1) + 4 * 5, "f16 probabilities, u8 ids");
        let file = TopKFile::open(&path, &store, (1, 1)).unwrap();
        assert_eq!((file.k(), file.temperature()), (4, 2.0));
        assert_eq!(file.kept_mass(), Some(kept), "the header records what the writer returned");
        // Against the same teacher run on the whole corpus at once; the kept mass against the
        // dense softmax at T of every frame in f64, its k largest summed.
        let mut masses: Vec<f64> = Vec::new();
        let (mut f, mut l) = (Vec::new(), Vec::new());
        for u in 0..5 {
            store.read(u, &mut f, &mut l).unwrap();
            let n = l.len() as i64;
            let x = Tensor::from_slice(&f).view([n, 2]);
            let m = Tensor::from_slice(&store.manifest.mean.iter().map(|&v| v as f32).collect::<Vec<_>>());
            let s = Tensor::from_slice(&store.manifest.std.iter().map(|&v| v as f32).collect::<Vec<_>>());
            let x = (x - m) / s;
            let idx = Tensor::arange(n, (Kind::Int64, Device::Cpu));
            let prev = (&idx - 1).clamp(0, n - 1);
            let next = (&idx + 1).clamp(0, n - 1);
            let windows = Tensor::cat(&[x.index_select(0, &prev), x.shallow_clone(), x.index_select(0, &next)], 1);
            let dense = (teacher(&windows).unwrap().to_kind(Kind::Double) / 2.0).softmax(1, Kind::Double);
            let top4 = dense.sort(1, true).0.narrow(1, 0, 4).sum_dim_intlist(1, false, Kind::Double);
            masses.extend(Vec::<f64>::try_from(top4).unwrap());
            let want = objective.top_k_targets(&teacher(&windows).unwrap(), 4).unwrap();
            let want = want.as_top_k().unwrap();
            let (mut p, mut c) = (Vec::new(), Vec::new());
            file.read(u, &mut p, &mut c).unwrap();
            assert_eq!(c, Vec::<i64>::try_from(want.classes.view([-1])).unwrap(), "utterance {u}");
            for (a, b) in p.iter().zip(Vec::<f32>::try_from(want.probs.view([-1])).unwrap()) {
                assert!((a - b).abs() <= 1e-3, "{a} vs {b}");
            }
        }
        assert_eq!(masses.len() as u64, frames);
        masses.sort_by(f64::total_cmp);
        let n = masses.len() as f64;
        let mean = masses.iter().sum::<f64>() / n;
        assert!((kept.mean - mean).abs() < 1e-6, "mean {} vs {mean}", kept.mean);
        assert!((kept.min - masses[0]).abs() < 1e-6, "min {} vs {}", kept.min, masses[0]);
        // Nearest rank: the ceil(q n)-th smallest lies in [value, value + 1e-4).
        for (q, got) in [(0.01, kept.p1), (0.05, kept.p5), (0.5, kept.p50)] {
            let exact = masses[((q * n).ceil() as usize).max(1) - 1];
            assert!(got <= exact + 1e-6 && exact < got + 1e-4 + 1e-6, "q = {q}: {got} for {exact}");
        }
        assert!(kept.min < kept.p50 && kept.p50 < 1.0, "a spread of masses: {kept:?}");
        drop(file);
        // A version 2 file (the same rows, the header without the kept mass) still reads,
        // without it; another version is refused, naming the versions read.
        let good = std::fs::read(&path).unwrap();
        let mut v2 = good.clone();
        v2[8..12].copy_from_slice(&2u32.to_le_bytes());
        v2[HEADER_FIELDS_V2..HEADER_BYTES as usize].fill(0);
        let crc = crc32fast::hash(&v2[..HEADER_FIELDS_V2]);
        v2[HEADER_FIELDS_V2..HEADER_FIELDS_V2 + 4].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&path, &v2).unwrap();
        let old = TopKFile::open(&path, &store, (1, 1)).unwrap();
        assert_eq!((old.k(), old.kept_mass()), (4, None));
        let (mut p, mut c) = (Vec::new(), Vec::new());
        old.read(4, &mut p, &mut c).unwrap();
        assert_eq!(c.len(), p.len());
        let mut v4 = good.clone();
        v4[8..12].copy_from_slice(&4u32.to_le_bytes());
        std::fs::write(&path, &v4).unwrap();
        let e = format!("{:#}", TopKFile::open(&path, &store, (1, 1)).err().unwrap());
        assert!(e.contains("version 4; this kd-run reads versions 2 and 3"), "{e}");
        // A kept mass out of order in a header whose checksum matches: damaged.
        let mut bad = good.clone();
        bad[112..120].copy_from_slice(&0.99f64.to_le_bytes());
        let crc = crc32fast::hash(&bad[..HEADER_FIELDS]);
        bad[HEADER_FIELDS..HEADER_FIELDS + 4].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&path, &bad).unwrap();
        let e = format!("{:#}", TopKFile::open(&path, &store, (1, 1)).err().unwrap());
        assert!(e.contains("kept probability mass") && e.contains("damaged"), "{e}");
        std::fs::write(&path, &good).unwrap();
        // A flipped byte, a truncated file, another store.
        let mut bad = good.clone();
        bad[HEADER_BYTES as usize + 1] ^= 8;
        std::fs::write(&path, &bad).unwrap();
        let e = TopKFile::open(&path, &store, (1, 1)).unwrap().read(0, &mut vec![], &mut vec![]).err().unwrap();
        assert!(format!("{e}").contains("utterance 0 do not match their checksum"), "{e}");
        std::fs::write(&path, &good[..good.len() - 1]).unwrap();
        assert!(format!("{:#}", TopKFile::open(&path, &store, (1, 1)).err().unwrap()).contains("truncated"));
        std::fs::write(&path, &good).unwrap();
        let mut other = StoreWriter::create(&dir.0.join("o"), SET, FeatureKind::F16, 2, 50).unwrap();
        other.push(0, &[0.0; 4], &[1, 2]).unwrap();
        other.finish("o").unwrap();
        let other = FrameStore::open(&dir.0.join("o")).unwrap();
        let e = format!("{:#}", TopKFile::open(&path, &other, (1, 1)).err().unwrap());
        assert!(e.contains("was computed for another frame store"), "{e}");
        assert!(e.contains(&store.manifest.id) && e.contains(&other.manifest.id), "both ids: {e}");
        // Another context than the teacher's, a stage's k or temperature other than the file's.
        let e = format!("{:#}", TopKFile::open(&path, &store, (20, 5)).err().unwrap());
        assert!(e.contains("teacher of context [1, 1]") && e.contains("[20, 5]"), "{e}");
        let file = TopKFile::open(&path, &store, (1, 1)).unwrap();
        file.check_stage("s", Some(4), Some(2.0)).unwrap();
        let e = format!("{:#}", file.check_stage("s", Some(10), Some(2.0)).unwrap_err());
        assert!(e.contains("teacher_top_k = 10") && e.contains("keep the top 4"), "{e}");
        let e = format!("{:#}", file.check_stage("s", None, Some(2.0)).unwrap_err());
        assert!(e.contains("teacher_top_k = (unset)"), "{e}");
        let e = format!("{:#}", file.check_stage("s", Some(4), Some(3.0)).unwrap_err());
        assert!(e.contains("made at T = 2"), "{e}");
        // Temperatures `run` refuses are refused here too.
        for t in [0.0, -1.0, f64::NAN, 1e7] {
            let e = format!("{:#}", TargetsWriter::create(&dir.0.join("t.kdt"), &store, 4, t, (1, 1)).err().unwrap());
            assert!(e.contains("expected a temperature in [0.01, 1000000]"), "{t}: {e}");
        }
    }

    #[test]
    fn the_kept_mass_histogram_gives_nearest_rank_percentiles_to_its_resolution() {
        // 1000 masses i / 1000 (i = 1..=1000), shuffled into three pushes.
        let mut all: Vec<f32> = (1..=1000).map(|i| i as f32 / 1000.0).collect();
        all.reverse();
        let mut h = MassHistogram::default();
        assert_eq!(h.summary(), None);
        for part in all.chunks(400) {
            h.add(part).unwrap();
        }
        let m = h.summary().unwrap();
        assert!((m.mean - 0.5005).abs() < 1e-6, "{m:?}");
        assert!((m.min - 0.001).abs() < 1e-7, "{m:?}");
        // The 10th, 50th and 500th smallest: 0.010, 0.050, 0.500, to 1e-4 from below.
        let exact = |i: i32| f64::from(i as f32 / 1000.0);
        for (got, exact) in [(m.p1, exact(10)), (m.p5, exact(50)), (m.p50, exact(500))] {
            assert!(got <= exact + 1e-7 && exact < got + 1e-4, "{got} for {exact}");
        }
        // Rounding past 1 counts as 1; a non-finite mass is refused.
        h.add(&[1.000_000_1]).unwrap();
        assert!(h.add(&[f32::NAN]).is_err());
    }
}
