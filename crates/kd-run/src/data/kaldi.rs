//! Readers for Kaldi feature and alignment files: archives (`.ark`), binary or text, and script
//! files (`.scp`) pointing into archives.
//!
//! An archive is a sequence of entries `<utt-id> <object>`. A binary object starts with `\0B`;
//! anything else is the text form. Supported objects:
//! - matrices: `FM ` (f32), `DM ` (f64), compressed `CM ` (one byte per value with per-column
//!   percentile headers), `CM2 ` (two bytes per value) and `CM3 ` (one byte per value), decoded as
//!   Kaldi's `CompressedMatrix::CopyToMat` does; text form `[ v v v \n v v v ]`;
//! - int32 vectors (alignments, pdf ids per frame): a size byte 4 and the int32 length, then a size
//!   byte 4 and the int32 value for each element; text form `v v v` up to the end of the line, as
//!   `copy-int-vector ark,t:` prints it, optionally between `[` and `]`.
//!
//! Sizes and counts in Kaldi binary are a size byte (4) and a little-endian int32. Empty matrices
//! (0 rows or 0 columns) are returned as 0 x 0. Every malformed input gives an error naming the
//! file, the utterance and the byte offset, and what was expected and found; nothing here panics
//! on bad data. Not supported: piped commands (`gunzip -c x.ark.gz |`), stdin, big-endian data.

use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

/// A matrix of frames x features as row-major f32 (converted from f64 / decompressed).
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    /// The empty matrix, which Kaldi writes for 0 rows or 0 columns.
    fn empty() -> Self {
        Matrix { rows: 0, cols: 0, data: Vec::new() }
    }
}

/// Longest utterance id accepted; a longer one means the bytes are not an archive.
const MAX_KEY_LEN: usize = 4096;
/// Longest number accepted in the text form.
const MAX_NUMBER_LEN: usize = 64;
/// Kaldi's `1.52590218966964e-05F`, the f32 nearest 1/65535.
const INV_65535: f32 = 1.0 / 65535.0;
const MATRIX_TOKENS: &str = "FM, DM, CM, CM2 or CM3";

/// Reads every (utt-id, matrix) of a binary (or text) Kaldi archive, in file order. (The
/// in-memory readers serve the tests; `data::for_each_utterance` streams with
/// [`MatrixEntries`] and [`Alignments`].)
#[cfg(test)]
pub fn read_matrix_ark(path: &Path) -> Result<Vec<(String, Matrix)>> {
    MatrixEntries::ark(path)?.collect()
}

/// Reads every (utt-id, int32 vector) of an alignment archive (pdf ids per frame).
#[cfg(test)]
pub fn read_int_vector_ark(path: &Path) -> Result<Vec<(String, Vec<i32>)>> {
    read_entries(Source::open(path)?, Source::read_int_vector)
}

/// [`read_matrix_ark`] on the bytes of an archive held in memory (the fuzz tests).
#[cfg(test)]
pub fn parse_matrix_ark(bytes: &[u8]) -> Result<Vec<(String, Matrix)>> {
    read_entries(Source::from_bytes(bytes), Source::read_matrix)
}

/// [`read_int_vector_ark`] on the bytes of an archive held in memory (the fuzz tests).
#[cfg(test)]
pub fn parse_int_vector_ark(bytes: &[u8]) -> Result<Vec<(String, Vec<i32>)>> {
    read_entries(Source::from_bytes(bytes), Source::read_int_vector)
}

/// Reads the matrices an scp file points to, in scp order. Each line is
/// `<utt-id> <path>[:<byte offset>][<row range>[,<column range>]]`, the offset pointing at the
/// object (just after `<utt-id> ` in the archive; no offset: the file holds one object), the
/// optional ranges inclusive as in Kaldi (`[0:99]`, `[0:99,0:12]`; an empty range means all).
/// A relative path is taken relative to the current directory, or, if it does not exist there,
/// relative to the scp file's folder.
#[cfg(test)]
pub fn read_matrix_scp(path: &Path) -> Result<Vec<(String, Matrix)>> {
    MatrixEntries::scp(path)?.collect()
}

/// The (utt-id, matrix) entries of an archive or an scp file, read one at a time in file
/// order: what [`read_matrix_ark`] and [`read_matrix_scp`] collect, for corpora larger than
/// memory. An scp file is read line by line; each archive it names is opened once and kept open.
///
/// ```ignore
/// let mut feats = MatrixEntries::scp(Path::new("data/train/feats.scp"))?;
/// while let Some((utt, m)) = feats.next_entry()? {
///     println!("{utt}: {} x {}", m.rows, m.cols);
/// }
/// ```
pub struct MatrixEntries(Entries);

enum Entries {
    Ark(Source),
    Scp(ScpReader),
}

impl MatrixEntries {
    /// The entries of a binary (or text) Kaldi archive.
    pub fn ark(path: &Path) -> Result<Self> {
        Ok(MatrixEntries(Entries::Ark(Source::open(path)?)))
    }

    /// The matrices an scp file points to (see [`read_matrix_scp`]).
    pub fn scp(path: &Path) -> Result<Self> {
        crate::inputs::check_file(path, "scp file")?;
        let file = File::open(path).with_context(|| format!("cannot read scp file {}", path.display()))?;
        Ok(MatrixEntries(Entries::Scp(ScpReader {
            path: path.to_path_buf(),
            dir: path.parent().unwrap_or_else(|| Path::new("")).to_path_buf(),
            lines: BufReader::new(file),
            line: Vec::new(),
            number: 0,
            sources: HashMap::new(),
        })))
    }

    /// The next entry, or `None` after the last.
    pub fn next_entry(&mut self) -> Result<Option<(String, Matrix)>> {
        match &mut self.0 {
            Entries::Ark(src) => next_entry(src, Source::read_matrix),
            Entries::Scp(scp) => scp.next_entry(),
        }
    }

    /// Every entry left, or the first error.
    #[cfg(test)]
    fn collect(mut self) -> Result<Vec<(String, Matrix)>> {
        let mut out = Vec::new();
        while let Some(entry) = self.next_entry()? {
            out.push(entry);
        }
        Ok(out)
    }
}

/// An scp file being read line by line, with the archives its lines have named so far.
struct ScpReader {
    path: PathBuf,
    dir: PathBuf,
    lines: BufReader<File>,
    line: Vec<u8>,
    /// The number of the line last read (from 1).
    number: usize,
    sources: HashMap<PathBuf, Source>,
}

impl ScpReader {
    fn next_entry(&mut self) -> Result<Option<(String, Matrix)>> {
        let path = &self.path;
        let line = loop {
            self.line.clear();
            let n = self
                .lines
                .read_until(b'\n', &mut self.line)
                .with_context(|| format!("cannot read scp file {}", path.display()))?;
            if n == 0 {
                return Ok(None);
            }
            self.number += 1;
            let Ok(line) = std::str::from_utf8(&self.line) else {
                bail!("cannot read scp file {}: line {} is not UTF-8 text", path.display(), self.number);
            };
            let line = line.trim();
            if !line.is_empty() {
                break line;
            }
        };
        let here = format!("{}:{}", path.display(), self.number);
        let Some((utt, spec)) = line.split_once(|c: char| c.is_ascii_whitespace()) else {
            bail!("{here}: expected '<utterance-id> <ark path>:<byte offset>', found '{line}' (no path)");
        };
        let spec = spec.trim();
        let entry = ScpEntry::parse(spec).with_context(|| format!("{here}: utterance '{utt}'"))?;
        let ark = resolve(&entry.file, &self.dir).with_context(|| format!("{here}: utterance '{utt}'"))?;
        let src = match self.sources.entry(ark) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let src = Source::open(e.key()).with_context(|| format!("{here}: utterance '{utt}'"))?;
                e.insert(src)
            }
        };
        let offset = entry.offset.unwrap_or(0);
        if offset >= src.len {
            bail!(
                "{here}: utterance '{utt}': offset {offset} is past the end of {} ({} bytes)",
                src.path.display(),
                src.len
            );
        }
        src.utt = Some(utt.to_string());
        src.seek(offset)?;
        let mut m = src.read_matrix().with_context(|| format!("{here}: reading '{spec}' (is the offset right?)"))?;
        if let Some(ranges) = &entry.ranges {
            m = ranges.apply(&m).with_context(|| format!("{here}: utterance '{utt}'"))?;
        }
        Ok(Some((utt.to_string(), m)))
    }
}

/// The alignments of an archive, read one utterance at a time as its features arrive: opening
/// reads the archive once, checking every entry and keeping where each utterance's object starts
/// (an id and an offset per utterance, not the alignments); [`Alignments::take`] reads one back
/// and checks its length, [`Alignments::finish`] that features and alignments name the same
/// utterances.
///
/// ```ignore
/// let mut ali = Alignments::open(Path::new("ali.ark"))?;
/// while let Some((utt, m)) = feats.next_entry()? {
///     let Some(pdf_ids) = ali.take(&utt, m.rows)? else { continue }; // reported by finish
///     // ... one pdf id per frame of m
/// }
/// ali.finish()?; // features without alignments, alignments without features
/// ```
pub struct Alignments {
    src: Source,
    /// Utterance id -> (offset of its object, whether its features have arrived).
    at: HashMap<String, (u64, bool)>,
    /// Feature utterances seen.
    features: usize,
    /// Feature utterances without an alignment, in feature order.
    missing: Vec<String>,
    missing_set: HashSet<String>,
}

impl Alignments {
    /// Indexes the alignment archive `path`; an utterance id appearing twice is an error.
    pub fn open(path: &Path) -> Result<Self> {
        let mut src = Source::open(path)?;
        let mut at = HashMap::new();
        while let Some(id) = src.read_key()? {
            let offset = src.pos;
            src.read_int_vector()?;
            if at.insert(id.clone(), (offset, false)).is_some() {
                bail!("utterance '{id}' appears twice in the alignments");
            }
        }
        Ok(Alignments { src, at, features: 0, missing: Vec::new(), missing_set: HashSet::new() })
    }

    /// The alignment of feature utterance `id` of `frames` frames, or `None` if there is none
    /// (noted for [`Alignments::finish`], which then fails; from there on every utterance is
    /// only noted). Errors: `id` seen before, or an alignment of another length.
    pub fn take(&mut self, id: &str, frames: usize) -> Result<Option<Vec<i32>>> {
        self.features += 1;
        let Some((offset, used)) = self.at.get_mut(id) else {
            if !self.missing_set.insert(id.to_string()) {
                bail!("utterance '{id}' appears twice in the features");
            }
            self.missing.push(id.to_string());
            return Ok(None);
        };
        if *used {
            bail!("utterance '{id}' appears twice in the features");
        }
        *used = true;
        if !self.missing.is_empty() {
            return Ok(None); // finish() fails anyway
        }
        let offset = *offset;
        self.src.utt = Some(id.to_string());
        self.src.seek(offset)?;
        let v = self.src.read_int_vector()?;
        if v.len() != frames {
            bail!("utterance '{id}': the features have {frames} frames but the alignment has {} pdf ids", v.len());
        }
        Ok(Some(v))
    }

    /// Fails if a feature utterance had no alignment or an alignment no features.
    pub fn finish(self) -> Result<()> {
        let no_ali: Vec<&str> = self.missing.iter().map(String::as_str).collect();
        let mut no_feats: Vec<&str> =
            self.at.iter().filter(|(_, (_, used))| !used).map(|(id, _)| id.as_str()).collect();
        no_feats.sort_unstable();
        check_matched((&no_ali, self.features), (&no_feats, self.at.len()))
    }
}

/// The error for feature utterances without alignments (of `features` in all) and alignments
/// without features (of `alignments`), if there are any.
fn check_matched((no_ali, features): (&[&str], usize), (no_feats, alignments): (&[&str], usize)) -> Result<()> {
    let mut parts = Vec::new();
    if !no_ali.is_empty() {
        parts.push(format!(
            "{} of {features} feature utterances have no alignment ({})",
            no_ali.len(),
            first_few(no_ali)
        ));
    }
    if !no_feats.is_empty() {
        parts.push(format!("{} of {alignments} alignments have no features ({})", no_feats.len(), first_few(no_feats)));
    }
    if !parts.is_empty() {
        bail!("features and alignments do not match: {}", parts.join("; "));
    }
    Ok(())
}

/// Up to five names, quoted, and "..." if there are more.
fn first_few(names: &[&str]) -> String {
    let mut s: Vec<String> = names.iter().take(5).map(|n| format!("'{n}'")).collect();
    if names.len() > 5 {
        s.push("...".to_string());
    }
    s.join(", ")
}

/// Reads `<key> <object>` entries until the end of the file.
#[cfg(test)]
fn read_entries<R: Input, T>(
    mut src: Source<R>,
    mut read_object: impl FnMut(&mut Source<R>) -> Result<T>,
) -> Result<Vec<(String, T)>> {
    let mut out = Vec::new();
    while let Some(entry) = next_entry(&mut src, &mut read_object)? {
        out.push(entry);
    }
    Ok(out)
}

/// The next `<key> <object>` entry, or `None` at the end of the file.
fn next_entry<R: Input, T>(
    src: &mut Source<R>,
    mut read_object: impl FnMut(&mut Source<R>) -> Result<T>,
) -> Result<Option<(String, T)>> {
    let Some(key) = src.read_key()? else {
        return Ok(None);
    };
    Ok(Some((key, read_object(src)?)))
}

/// What a [`Source`] reads: a buffered file, or bytes in memory.
trait Input: BufRead {
    /// Moves the read position by `delta` bytes (keeping the buffer where it can).
    fn skip(&mut self, delta: i64) -> std::io::Result<()>;
}

impl Input for BufReader<File> {
    fn skip(&mut self, delta: i64) -> std::io::Result<()> {
        self.seek_relative(delta)
    }
}

impl Input for std::io::Cursor<&[u8]> {
    fn skip(&mut self, delta: i64) -> std::io::Result<()> {
        self.seek(SeekFrom::Current(delta)).map(|_| ())
    }
}

/// An archive opened for reading, with the byte offset and current utterance for messages.
struct Source<R = BufReader<File>> {
    path: PathBuf,
    reader: R,
    pos: u64,
    len: u64,
    utt: Option<String>,
}

impl Source {
    fn open(path: &Path) -> Result<Self> {
        crate::inputs::check_file(path, "archive")?;
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let len = file.metadata().with_context(|| format!("cannot read the size of {}", path.display()))?.len();
        Ok(Source { path: path.to_path_buf(), reader: BufReader::with_capacity(1 << 16, file), pos: 0, len, utt: None })
    }
}

#[cfg(test)]
impl<'a> Source<std::io::Cursor<&'a [u8]>> {
    fn from_bytes(bytes: &'a [u8]) -> Self {
        let len = bytes.len() as u64;
        Source { path: PathBuf::from("<memory>"), reader: std::io::Cursor::new(bytes), pos: 0, len, utt: None }
    }
}

impl<R: Input> Source<R> {
    /// An error at byte `at` naming the file and utterance.
    fn fail(&self, at: u64, msg: impl Display) -> anyhow::Error {
        match &self.utt {
            Some(u) => anyhow!("{}: utterance '{u}' at byte {at}: {msg}", self.path.display()),
            None => anyhow!("{}: at byte {at}: {msg}", self.path.display()),
        }
    }

    fn seek(&mut self, offset: u64) -> Result<()> {
        let delta = i64::try_from(offset).ok().zip(i64::try_from(self.pos).ok()).map(|(o, p)| o - p);
        let Some(delta) = delta else {
            return Err(self.fail(self.pos, format!("cannot seek to byte {offset}")));
        };
        if let Err(e) = self.reader.skip(delta) {
            return Err(self.fail(offset, format!("cannot seek: {e}")));
        }
        self.pos = offset;
        Ok(())
    }

    fn peek(&mut self) -> Result<Option<u8>> {
        match self.reader.fill_buf() {
            Ok(buf) => Ok(buf.first().copied()),
            Err(e) => Err(self.fail(self.pos, format!("read error: {e}"))),
        }
    }

    fn next_byte(&mut self) -> Result<Option<u8>> {
        let b = self.peek()?;
        if b.is_some() {
            self.reader.consume(1);
            self.pos += 1;
        }
        Ok(b)
    }

    /// Exactly `n` bytes of `what`; checks the file is long enough before allocating.
    fn take(&mut self, n: usize, what: &str) -> Result<Vec<u8>> {
        let at = self.pos;
        let left = self.len.saturating_sub(at);
        if n as u64 > left {
            return Err(
                self.fail(at, format!("truncated {what}: expected {n} bytes, but the file ends {left} bytes later"))
            );
        }
        let mut buf = vec![0; n];
        if let Err(e) = self.reader.read_exact(&mut buf) {
            return Err(self.fail(at, format!("cannot read {what}: {e}")));
        }
        self.pos += n as u64;
        Ok(buf)
    }

    fn skip_whitespace(&mut self) -> Result<()> {
        while matches!(self.peek()?, Some(b) if b.is_ascii_whitespace()) {
            self.next_byte()?;
        }
        Ok(())
    }

    /// The next utterance id and the space after it, or `None` at the end of the file.
    fn read_key(&mut self) -> Result<Option<String>> {
        self.utt = None;
        self.skip_whitespace()?;
        if self.peek()?.is_none() {
            return Ok(None);
        }
        let start = self.pos;
        let mut key = Vec::new();
        loop {
            match self.next_byte()? {
                Some(b' ' | b'\t') => break,
                None => {
                    return Err(self.fail(
                        start,
                        format!("truncated entry: the file ends after utterance id '{}'", key.escape_ascii()),
                    ))
                }
                Some(b) if b < 0x20 || b == 0x7f => {
                    return Err(self.fail(
                        self.pos - 1,
                        format!(
                            "expected a space after utterance id '{}', found byte 0x{b:02x} (not a Kaldi archive?)",
                            key.escape_ascii()
                        ),
                    ))
                }
                Some(b) => {
                    key.push(b);
                    if key.len() > MAX_KEY_LEN {
                        return Err(self.fail(
                            start,
                            format!("expected an utterance id, found {MAX_KEY_LEN} bytes without a space (not a Kaldi archive?)"),
                        ));
                    }
                }
            }
        }
        let key = String::from_utf8(key).map_err(|e| {
            self.fail(start, format!("utterance id '{}' is not UTF-8 text", e.as_bytes().escape_ascii()))
        })?;
        self.utt = Some(key.clone());
        Ok(Some(key))
    }

    /// Consumes `\0B` and returns true, or returns false (text form) if the next byte is not `\0`.
    fn read_binary_marker(&mut self) -> Result<bool> {
        if self.peek()? != Some(0) {
            return Ok(false);
        }
        let at = self.pos;
        let m = self.take(2, "binary marker")?;
        if m[1] != b'B' {
            return Err(self.fail(at, format!("expected the binary marker '\\0B', found {}", show(&m))));
        }
        Ok(true)
    }

    /// A size byte (4) and a little-endian int32.
    fn read_i32(&mut self, what: &str) -> Result<i32> {
        let at = self.pos;
        let b = self.take(5, what)?;
        if b[0] != 4 {
            return Err(self.fail(
                at,
                format!("bad size byte before {what}: expected 4 (int32), found {} ({})", b[0], describe_byte(b[0])),
            ));
        }
        Ok(i32::from_le_bytes([b[1], b[2], b[3], b[4]]))
    }

    /// A non-negative int32 count.
    fn read_count(&mut self, what: &str) -> Result<usize> {
        let at = self.pos;
        let v = self.read_i32(what)?;
        usize::try_from(v).map_err(|_| self.fail(at, format!("{what} is negative: {v}")))
    }

    fn read_matrix(&mut self) -> Result<Matrix> {
        if self.read_binary_marker()? {
            self.read_binary_matrix()
        } else {
            self.read_text_matrix()
        }
    }

    fn read_binary_matrix(&mut self) -> Result<Matrix> {
        let at = self.pos;
        let mut token = Vec::new();
        loop {
            match self.next_byte()? {
                Some(b' ') => break,
                None => {
                    return Err(self.fail(
                        at,
                        format!(
                            "truncated header: expected a matrix type ({MATRIX_TOKENS}), found the end of the file after {}",
                            show(&token)
                        ),
                    ))
                }
                Some(b) => {
                    token.push(b);
                    if token.len() > 3 {
                        let hint = if token[0] == 4 {
                            " (this looks like an int32 vector, e.g. an alignment, not a matrix)"
                        } else {
                            ""
                        };
                        return Err(self.fail(
                            at,
                            format!(
                                "expected a matrix type ({MATRIX_TOKENS}) and a space, found {}{hint}",
                                show(&token)
                            ),
                        ));
                    }
                }
            }
        }
        match token.as_slice() {
            b"FM" => self.read_plain_matrix(4),
            b"DM" => self.read_plain_matrix(8),
            b"CM" => self.read_compressed_matrix(Compression::ColumnHeaders),
            b"CM2" => self.read_compressed_matrix(Compression::TwoByte),
            b"CM3" => self.read_compressed_matrix(Compression::OneByte),
            b"FV" | b"DV" => Err(self
                .fail(at, format!("found a vector ('{}'), expected a matrix ({MATRIX_TOKENS})", token.escape_ascii()))),
            _ => Err(self.fail(at, format!("unsupported matrix type {}, expected {MATRIX_TOKENS}", show(&token)))),
        }
    }

    /// `FM`/`DM` after the token: rows, columns, then row-major little-endian floats.
    fn read_plain_matrix(&mut self, width: usize) -> Result<Matrix> {
        let at = self.pos;
        let rows = self.read_count("the row count")?;
        let cols = self.read_count("the column count")?;
        let kind = if width == 4 { "float32" } else { "float64" };
        let Some(n) = rows.checked_mul(cols).filter(|n| n.checked_mul(width).is_some()) else {
            return Err(self.fail(at, format!("matrix size {rows} x {cols} overflows")));
        };
        let bytes = self.take(n * width, &format!("data ({rows} x {cols} {kind} values)"))?;
        if n == 0 {
            return Ok(Matrix::empty());
        }
        let data = if width == 4 {
            bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        } else {
            bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
                .collect()
        };
        Ok(Matrix { rows, cols, data })
    }

    /// `CM`/`CM2`/`CM3` after the token: min, range (f32), rows, cols (i32, no size bytes), then
    /// the data (see `Compression`).
    fn read_compressed_matrix(&mut self, format: Compression) -> Result<Matrix> {
        let at = self.pos;
        let h = self.take(16, "compressed-matrix header")?;
        let min = f32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let range = f32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let rows = i32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        let cols = i32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        let (Ok(rows), Ok(cols)) = (usize::try_from(rows), usize::try_from(cols)) else {
            return Err(self.fail(at, format!("negative size {rows} x {cols} in the compressed-matrix header")));
        };
        if cols == 0 {
            return Ok(Matrix::empty()); // Kaldi stops after the header here
        }
        let size = match format {
            Compression::ColumnHeaders => rows.checked_add(8).and_then(|r| r.checked_mul(cols)),
            Compression::TwoByte => rows.checked_mul(cols).and_then(|n| n.checked_mul(2)),
            Compression::OneByte => rows.checked_mul(cols),
        };
        let Some(size) = size else {
            return Err(self.fail(at, format!("compressed matrix size {rows} x {cols} overflows")));
        };
        let data = self.take(size, &format!("data ({rows} x {cols} compressed {})", format.token()))?;
        if rows == 0 {
            return Ok(Matrix::empty());
        }
        let mut out = vec![0f32; rows * cols];
        match format {
            Compression::ColumnHeaders => {
                // 4 uint16 percentiles per column, then the bytes column by column.
                let (headers, bytes) = data.split_at(8 * cols);
                let u16_to_f32 = |v: u16| min + range * INV_65535 * f32::from(v);
                for (c, (header, column)) in headers.chunks_exact(8).zip(bytes.chunks_exact(rows)).enumerate() {
                    let p = |i: usize| u16_to_f32(u16::from_le_bytes([header[2 * i], header[2 * i + 1]]));
                    let (p0, p25, p75, p100) = (p(0), p(1), p(2), p(3));
                    for (r, &v) in column.iter().enumerate() {
                        out[r * cols + c] = char_to_float(p0, p25, p75, p100, v);
                    }
                }
            }
            Compression::TwoByte => {
                let increment = (f64::from(range) * (1.0 / 65535.0)) as f32;
                for (o, c) in out.iter_mut().zip(data.chunks_exact(2)) {
                    *o = min + f32::from(u16::from_le_bytes([c[0], c[1]])) * increment;
                }
            }
            Compression::OneByte => {
                let increment = (f64::from(range) * (1.0 / 255.0)) as f32;
                for (o, &v) in out.iter_mut().zip(&data) {
                    *o = min + f32::from(v) * increment;
                }
            }
        }
        Ok(Matrix { rows, cols, data: out })
    }

    /// Text form: `[`, rows of numbers separated by line breaks, `]`.
    fn read_text_matrix(&mut self) -> Result<Matrix> {
        self.skip_whitespace()?;
        let start = self.pos;
        match self.next_byte()? {
            Some(b'[') => {}
            None => return Err(self.fail(start, "truncated entry: expected a matrix, found the end of the file")),
            Some(b) => {
                return Err(self.fail(
                    start,
                    format!(
                        "expected the binary marker '\\0B' or a text matrix starting with '[', found {}",
                        describe_byte(b)
                    ),
                ))
            }
        }
        let mut data = Vec::new();
        let (mut rows, mut cols, mut in_row) = (0usize, None::<usize>, 0usize);
        loop {
            let at = self.pos;
            let b = match self.next_byte()? {
                Some(b) => b,
                None => return Err(self.fail(start, "truncated text matrix: the file ends before the closing ']'")),
            };
            if b == b'\n' || b == b']' {
                if in_row > 0 {
                    match cols {
                        Some(c) if c != in_row => {
                            return Err(self.fail(
                                at,
                                format!("row {rows} of the text matrix has {in_row} values, expected {c} like row 0"),
                            ))
                        }
                        _ => cols = Some(in_row),
                    }
                    rows += 1;
                    in_row = 0;
                }
                if b == b']' {
                    break;
                }
                continue;
            }
            if b.is_ascii_whitespace() {
                continue;
            }
            let mut token = vec![b];
            while let Some(b) = self.peek()? {
                if b.is_ascii_whitespace() || b == b']' || token.len() > MAX_NUMBER_LEN {
                    break;
                }
                token.push(b);
                self.next_byte()?;
            }
            let value = std::str::from_utf8(&token).ok().and_then(|s| s.parse::<f32>().ok());
            let Some(value) = value else {
                return Err(
                    self.fail(at, format!("expected a number in the text matrix, found '{}'", token.escape_ascii()))
                );
            };
            data.push(value);
            in_row += 1;
        }
        match cols {
            Some(cols) if rows > 0 => Ok(Matrix { rows, cols, data }),
            _ => Ok(Matrix::empty()),
        }
    }

    fn read_int_vector(&mut self) -> Result<Vec<i32>> {
        if !self.read_binary_marker()? {
            return self.read_text_int_vector();
        }
        let at = self.pos;
        if let Some(b @ (b'F' | b'D' | b'C')) = self.peek()? {
            return Err(self.fail(
                at,
                format!(
                    "bad size byte before the vector length: expected 4 (int32), found {} (this looks like a matrix, not an int32 vector)",
                    describe_byte(b)
                ),
            ));
        }
        let n = self.read_count("the vector length")?;
        let data_at = self.pos;
        let Some(size) = n.checked_mul(5) else {
            return Err(self.fail(at, format!("vector length {n} overflows")));
        };
        let bytes = self.take(size, &format!("data ({n} int32 values, 5 bytes each)"))?;
        let mut out = Vec::with_capacity(n);
        for (i, c) in bytes.chunks_exact(5).enumerate() {
            if c[0] != 4 {
                return Err(self.fail(
                    data_at + 5 * i as u64,
                    format!("bad size byte before element {i}: expected 4 (int32), found {}", describe_byte(c[0])),
                ));
            }
            out.push(i32::from_le_bytes([c[1], c[2], c[3], c[4]]));
        }
        Ok(out)
    }

    /// Text form: integers up to the end of the line, optionally between `[` and `]`.
    fn read_text_int_vector(&mut self) -> Result<Vec<i32>> {
        let start = self.pos;
        let mut line = Vec::new();
        while let Some(b) = self.next_byte()? {
            if b == b'\n' {
                break;
            }
            line.push(b);
        }
        let mut tokens = tokens(&line).peekable();
        if tokens.peek().is_some_and(|(_, t)| *t == b"[") {
            tokens.next();
        }
        let mut out = Vec::new();
        let mut closed = false;
        for (i, token) in tokens {
            let at = start + i as u64;
            if closed {
                return Err(
                    self.fail(at, format!("expected the end of the line after ']', found '{}'", token.escape_ascii()))
                );
            }
            if token == b"]" {
                closed = true;
                continue;
            }
            let value = std::str::from_utf8(token).ok().and_then(|s| s.parse::<i32>().ok());
            let Some(value) = value else {
                let hint = if token.first() == Some(&b'[') { " (is this a matrix archive?)" } else { "" };
                return Err(self.fail(
                    at,
                    format!("expected an int32 in the text vector, found '{}'{hint}", token.escape_ascii()),
                ));
            };
            out.push(value);
        }
        Ok(out)
    }
}

/// The whitespace-separated tokens of `line` with their byte offsets.
fn tokens(line: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < line.len() && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == line.len() {
            return None;
        }
        let start = i;
        while i < line.len() && !line[i].is_ascii_whitespace() {
            i += 1;
        }
        Some((start, &line[start..i]))
    })
}

/// `'XM'` for printable ASCII, else the bytes in hex: `ff 13 37 00`.
fn show(bytes: &[u8]) -> String {
    if bytes.iter().all(u8::is_ascii_graphic) {
        format!("'{}'", bytes.escape_ascii())
    } else {
        let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        format!("bytes {}", hex.join(" "))
    }
}

/// `0x46 ('F')` for printable bytes, `0x00` otherwise.
fn describe_byte(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("0x{b:02x} ('{}')", b as char)
    } else {
        format!("0x{b:02x}")
    }
}

/// Kaldi's compressed-matrix formats.
#[derive(Clone, Copy)]
enum Compression {
    /// `CM`, kOneByteWithColHeaders: per column 4 uint16 percentiles (0, 25, 75, 100) on the
    /// global min/range scale, then one byte per value, column by column, mapped piecewise
    /// linearly between the percentiles.
    ColumnHeaders,
    /// `CM2`, kTwoByte: uint16 per value, row-major, `min + v * range / 65535`.
    TwoByte,
    /// `CM3`, kOneByte: uint8 per value, row-major, `min + v * range / 255`.
    OneByte,
}

impl Compression {
    fn token(self) -> &'static str {
        match self {
            Compression::ColumnHeaders => "CM",
            Compression::TwoByte => "CM2",
            Compression::OneByte => "CM3",
        }
    }
}

/// Kaldi's `CompressedMatrix::CharToFloat`, with its float/double arithmetic.
fn char_to_float(p0: f32, p25: f32, p75: f32, p100: f32, v: u8) -> f32 {
    let (base, span, steps, scale) = if v <= 64 {
        (p0, p25 - p0, v, 1.0 / 64.0)
    } else if v <= 192 {
        (p25, p75 - p25, v - 64, 1.0 / 128.0)
    } else {
        (p75, p100 - p75, v - 192, 1.0 / 63.0)
    };
    (f64::from(base) + f64::from(span * f32::from(steps)) * scale) as f32
}

/// One scp line's `<path>[:<offset>][<ranges>]`.
struct ScpEntry {
    file: String,
    offset: Option<u64>,
    ranges: Option<Ranges>,
}

impl ScpEntry {
    fn parse(spec: &str) -> Result<Self> {
        if spec.ends_with('|') {
            bail!("'{spec}' is a piped command, which is not supported: write the archive to a file first");
        }
        let (rest, ranges) = match spec.strip_suffix(']').and_then(|s| s.rsplit_once('[')) {
            Some((rest, r)) => (rest, Some(Ranges::parse(r).with_context(|| format!("bad range in '{spec}'"))?)),
            None => (spec, None),
        };
        let (file, offset) = match rest.rsplit_once(':') {
            Some((file, off)) if !off.is_empty() && off.bytes().all(|b| b.is_ascii_digit()) => {
                let off =
                    off.parse::<u64>().with_context(|| format!("byte offset '{off}' in '{spec}' is too large"))?;
                (file, Some(off))
            }
            _ => (rest, None),
        };
        if file.is_empty() {
            bail!("no file name in '{spec}'");
        }
        Ok(ScpEntry { file: file.to_string(), offset, ranges })
    }
}

/// Inclusive row and column ranges of an scp entry; `None` is all.
struct Ranges {
    rows: Option<(usize, usize)>,
    cols: Option<(usize, usize)>,
}

impl Ranges {
    fn parse(s: &str) -> Result<Self> {
        let (rows, cols) = match s.split_once(',') {
            Some((r, c)) => (r, Some(c)),
            None => (s, None),
        };
        Ok(Ranges { rows: parse_range(rows)?, cols: cols.map(parse_range).transpose()?.flatten() })
    }

    fn apply(&self, m: &Matrix) -> Result<Matrix> {
        let (r0, r1) = check_range(self.rows, m.rows, "row")?;
        let (c0, c1) = check_range(self.cols, m.cols, "column")?;
        let mut data = Vec::with_capacity((r1 - r0) * (c1 - c0));
        for r in r0..r1 {
            data.extend_from_slice(&m.data[r * m.cols + c0..r * m.cols + c1]);
        }
        Ok(Matrix { rows: r1 - r0, cols: c1 - c0, data })
    }
}

/// `a:b` (inclusive) or empty for all.
fn parse_range(s: &str) -> Result<Option<(usize, usize)>> {
    let s = s.trim();
    if s.is_empty() || s == ":" {
        return Ok(None);
    }
    let parsed = s.split_once(':').and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)));
    match parsed {
        Some((a, b)) if a <= b => Ok(Some((a, b))),
        _ => bail!("expected a range 'first:last' with first <= last, found '{s}'"),
    }
}

/// The half-open bounds of an inclusive range within `n`.
fn check_range(range: Option<(usize, usize)>, n: usize, what: &str) -> Result<(usize, usize)> {
    match range {
        None => Ok((0, n)),
        Some((a, b)) if b < n => Ok((a, b + 1)),
        Some((a, b)) => bail!("{what} range {a}:{b} is outside the matrix, which has {n} {what}s"),
    }
}

/// `file` as given if absolute or present relative to the current directory, else relative to
/// the scp file's folder.
fn resolve(file: &str, scp_dir: &Path) -> Result<PathBuf> {
    let p = Path::new(file);
    if p.is_absolute() || p.exists() {
        return Ok(p.to_path_buf());
    }
    let q = scp_dir.join(p);
    if q.exists() {
        return Ok(q);
    }
    bail!("archive '{file}' not found, neither relative to the current directory nor as {}", q.display())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;
    use tch::{Kind, Tensor};

    const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/kaldi");
    const UTTS: [(&str, usize); 3] = [("spk1-utt1", 7), ("spk1-utt2", 3), ("spk2-utt1", 11)];

    fn fixture(name: &str) -> PathBuf {
        Path::new(DIR).join(name)
    }

    /// `expected.npz`, written by make_fixtures.py: name -> tensor.
    fn expected() -> HashMap<String, Tensor> {
        Tensor::read_npz(fixture("expected.npz")).expect("read expected.npz").into_iter().collect()
    }

    fn expected_f32(exp: &HashMap<String, Tensor>, key: &str) -> Vec<f32> {
        let t = exp.get(key).unwrap_or_else(|| panic!("{key} in expected.npz"));
        Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).expect("tensor to Vec<f32>")
    }

    fn expected_i32(exp: &HashMap<String, Tensor>, key: &str) -> Vec<i32> {
        let t = exp.get(key).unwrap_or_else(|| panic!("{key} in expected.npz"));
        Vec::<i32>::try_from(t.to_kind(Kind::Int).flatten(0, -1)).expect("tensor to Vec<i32>")
    }

    /// Checks ids, shapes (n x 40) and values (exact, or within `rel` relative tolerance).
    fn check(got: &[(String, Matrix)], prefix: &str, utts: &[(&str, usize)], rel: f32) {
        let exp = expected();
        let ids: Vec<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
        let want: Vec<&str> = utts.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, want);
        for ((id, m), (_, rows)) in got.iter().zip(utts) {
            assert_eq!((m.rows, m.cols, m.data.len()), (*rows, 40, rows * 40), "{prefix} {id}");
            let want = expected_f32(&exp, &format!("{prefix}__{id}"));
            for (i, (a, b)) in m.data.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= rel * b.abs().max(1.0), "{prefix} {id}[{i}]: {a} vs {b}");
            }
        }
    }

    fn bytes(name: &str) -> Vec<u8> {
        std::fs::read(fixture(name)).expect("read fixture")
    }

    /// The error's full chain; asserts it names `path` and contains every `needles`.
    fn assert_err<T: std::fmt::Debug>(r: Result<T>, path: &Path, needles: &[&str]) -> String {
        let msg = format!("{:#}", r.expect_err("expected an error"));
        assert!(msg.contains(&path.display().to_string()), "error does not name {}: {msg}", path.display());
        for n in needles {
            assert!(msg.contains(n), "error lacks '{n}': {msg}");
        }
        msg
    }

    #[test]
    fn kaldi_float32_ark_matches_expected() {
        check(&read_matrix_ark(&fixture("feats_f32.ark")).unwrap(), "f32", &UTTS, 0.0);
    }

    #[test]
    fn kaldi_float64_ark_matches_expected() {
        // The f64 values rounded to f32, exactly as numpy's astype(float32) does.
        check(&read_matrix_ark(&fixture("feats_f64.ark")).unwrap(), "f64", &UTTS, 0.0);
    }

    #[test]
    fn kaldi_compressed_arks_match_kaldiio() {
        let exp = expected();
        for (name, prefix, step) in [
            ("feats_cm.ark", "cm", None),
            ("feats_cm2.ark", "cm2", Some(65535.0)),
            ("feats_cm3.ark", "cm3", Some(255.0)),
        ] {
            let got = read_matrix_ark(&fixture(name)).unwrap();
            check(&got, prefix, &UTTS, 1e-5);
            // And close to the originals: within half a quantization step for CM2/CM3.
            for (id, m) in &got {
                let orig = expected_f32(&exp, &format!("f32__{id}"));
                let (lo, hi) = orig.iter().fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
                let tol = step.map_or((hi - lo) / 20.0, |s: f32| (hi - lo) / s * 0.51 + 1e-5);
                for (a, b) in m.data.iter().zip(&orig) {
                    assert!((a - b).abs() <= tol, "{name} {id}: {a} vs original {b} (tolerance {tol})");
                }
            }
        }
    }

    #[test]
    fn kaldi_text_ark_matches_expected_and_mixes_with_binary() {
        let text = read_matrix_ark(&fixture("feats_text.ark")).unwrap();
        check(&text, "f32", &UTTS[1..2], 0.0);
        // Text and binary entries in one archive, and a 0 x 0 "[ ]" entry.
        let dir = TempDir::new("kaldi-mixed");
        let mut mixed = bytes("feats_text.ark");
        mixed.extend_from_slice(b"empty [ ]\n");
        mixed.extend(bytes("feats_f32.ark"));
        mixed.extend_from_slice(b"one-row [ 1 2.5 -3e2 ]\n");
        let got = read_matrix_ark(&dir.write("mixed.ark", &mixed)).unwrap();
        let ids: Vec<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["spk1-utt2", "empty", "spk1-utt1", "spk1-utt2", "spk2-utt1", "one-row"]);
        assert_eq!(got[1].1, Matrix::empty());
        assert_eq!(got[0].1, got[3].1);
        assert_eq!(got[5].1, Matrix { rows: 1, cols: 3, data: vec![1.0, 2.5, -300.0] });
    }

    #[test]
    fn kaldi_alignment_arks_match_expected() {
        let exp = expected();
        for name in ["ali.ark", "ali_text.ark"] {
            let got = read_int_vector_ark(&fixture(name)).unwrap();
            assert_eq!(got.len(), 3, "{name}");
            for ((id, v), (want_id, n)) in got.iter().zip(UTTS) {
                assert_eq!(id, want_id);
                assert_eq!(v.len(), n);
                assert_eq!(*v, expected_i32(&exp, &format!("ali__{id}")), "{name} {id}");
            }
        }
        // kaldiio's text form, with brackets.
        let dir = TempDir::new("kaldi-ali-brackets");
        let p = dir.write("a.ark", b"u1 [ 3 -1 7 ]\nu2 \nu3 5\n");
        assert_eq!(
            read_int_vector_ark(&p).unwrap(),
            [("u1".to_string(), vec![3, -1, 7]), ("u2".to_string(), vec![]), ("u3".to_string(), vec![5])]
        );
    }

    #[test]
    fn kaldi_scp_follows_scp_order_and_offsets() {
        // The scp names the ark relative to its own folder, not to the test's working directory.
        assert!(!Path::new("feats_f32.ark").exists());
        let ark = read_matrix_ark(&fixture("feats_f32.ark")).unwrap();
        assert_eq!(read_matrix_scp(&fixture("feats.scp")).unwrap(), ark);
        let reordered = read_matrix_scp(&fixture("feats_reordered.scp")).unwrap();
        assert_eq!(reordered, vec![ark[2].clone(), ark[0].clone(), ark[1].clone()]);

        // Absolute paths, offsets computed here, a file holding one object, and ranges.
        let dir = TempDir::new("kaldi-scp");
        let data = bytes("feats_f32.ark");
        let offset_of = |key: &str| {
            let k = format!("{key} \0B");
            data.windows(k.len()).position(|w| w == k.as_bytes()).unwrap() + key.len() + 1
        };
        let (o2, o3) = (offset_of("spk1-utt2"), offset_of("spk2-utt1"));
        let single = dir.write("single.mat", &data[o2..o3 - "spk2-utt1 ".len()]);
        let abs = fixture("feats_f32.ark");
        let scp = format!(
            "b {a}:{o3}\n\na {s}\nc {a}:{o2}[1:2]\nd {a}:{o3}[,3:5]\ne {a}:{o3}[0:0,39:39]\n",
            a = abs.display(),
            s = single.display()
        );
        let got = read_matrix_scp(&dir.write("x.scp", scp.as_bytes())).unwrap();
        let ids: Vec<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["b", "a", "c", "d", "e"]);
        assert_eq!(got[0].1, ark[2].1);
        assert_eq!(got[1].1, ark[1].1);
        assert_eq!(got[2].1, Matrix { rows: 2, cols: 40, data: ark[1].1.data[40..120].to_vec() });
        let d = &got[3].1;
        assert_eq!((d.rows, d.cols), (11, 3));
        assert_eq!(d.data[3..6], ark[2].1.data[43..46]);
        assert_eq!(got[4].1.data, [ark[2].1.data[39]]);
    }

    /// Pairs `feats` with the alignments `ali` (written as a text archive in `dir`) as a stream
    /// does: [`Alignments::take`] per feature utterance, then [`Alignments::finish`].
    fn pair(
        dir: &TempDir,
        feats: &[(String, Matrix)],
        ali: &[(String, Vec<i32>)],
    ) -> Result<Vec<(String, Matrix, Vec<i32>)>> {
        let text: String = ali
            .iter()
            .map(|(id, v)| format!("{id} {}\n", v.iter().map(i32::to_string).collect::<Vec<_>>().join(" ")))
            .collect();
        let mut alignments = Alignments::open(&dir.write("ali.ark", text.as_bytes()))?;
        let mut out = Vec::new();
        for (id, m) in feats {
            if let Some(v) = alignments.take(id, m.rows)? {
                out.push((id.clone(), m.clone(), v));
            }
        }
        alignments.finish()?;
        Ok(out)
    }

    #[test]
    fn kaldi_pairing_succeeds_and_reports_mismatches() {
        let dir = TempDir::new("kaldi-pairing");
        let feats = read_matrix_ark(&fixture("feats_f32.ark")).unwrap();
        let ali = read_int_vector_ark(&fixture("ali.ark")).unwrap();
        let mut ali_shuffled = ali.clone();
        ali_shuffled.reverse();
        let paired = pair(&dir, &feats, &ali_shuffled).unwrap();
        assert_eq!(paired.len(), 3);
        for ((id, m, v), ((fid, fm), (aid, av))) in paired.iter().zip(feats.iter().zip(&ali)) {
            assert_eq!((id, m, v), (fid, fm, av));
            assert_eq!(id, aid);
        }
        // The binary alignment archive, read back by offset.
        let mut binary = Alignments::open(&fixture("ali.ark")).unwrap();
        for ((id, m), (_, v)) in feats.iter().zip(&ali).rev() {
            assert_eq!(binary.take(id, m.rows).unwrap().as_ref(), Some(v));
        }
        binary.finish().unwrap();

        let err = |r: Result<Vec<(String, Matrix, Vec<i32>)>>| format!("{:#}", r.expect_err("expected an error"));
        let msg = err(pair(&dir, &feats, &ali[..2]));
        assert!(msg.contains("1 of 3 feature utterances have no alignment ('spk2-utt1')"), "{msg}");
        let msg = err(pair(&dir, &feats[1..], &ali));
        assert!(msg.contains("1 of 3 alignments have no features ('spk1-utt1')"), "{msg}");
        let msg = err(pair(&dir, &feats[..1], &ali[2..]));
        assert!(
            msg.contains("1 of 1 feature utterances have no alignment ('spk1-utt1'); 1 of 1 alignments have no features ('spk2-utt1')"),
            "{msg}"
        );
        let mut short = ali.clone();
        short[1].1.pop();
        let msg = err(pair(&dir, &feats, &short));
        assert!(msg.contains("utterance 'spk1-utt2': the features have 3 frames but the alignment has 2"), "{msg}");
        let mut twice = ali.clone();
        twice.push(ali[0].clone());
        let msg = err(pair(&dir, &feats, &twice));
        assert!(msg.contains("'spk1-utt1' appears twice in the alignments"), "{msg}");
        for feats_twice in [[&feats[..], &feats[1..2]].concat(), [&feats[..], &feats[..]].concat()] {
            let msg = err(pair(&dir, &feats_twice, &ali[1..]));
            assert!(msg.contains("appears twice in the features"), "{msg}");
        }
    }

    #[test]
    fn kaldi_corrupted_matrix_arks_give_clear_errors() {
        let dir = TempDir::new("kaldi-corrupt-matrix");
        let good = bytes("feats_f32.ark");
        let first = "spk1-utt1 ".len(); // offset of "\0B"
        let corrupt = |name: &str, f: &dyn Fn(&mut Vec<u8>)| -> PathBuf {
            let mut b = good.clone();
            f(&mut b);
            dir.write(name, &b)
        };

        let p = corrupt("header.ark", &|b: &mut Vec<u8>| b.truncate(first + 7));
        assert_err(read_matrix_ark(&p), &p, &["utterance 'spk1-utt1'", "truncated the row count", "byte 15"]);
        let p = corrupt("data.ark", &|b: &mut Vec<u8>| b.truncate(b.len() - 10));
        assert_err(
            read_matrix_ark(&p),
            &p,
            &["utterance 'spk2-utt1'", "truncated data (11 x 40 float32 values): expected 1760 bytes"],
        );
        let p = corrupt("token.ark", &|b: &mut Vec<u8>| b[first + 2] = b'X');
        assert_err(read_matrix_ark(&p), &p, &["at byte 12", "unsupported matrix type 'XM', expected FM, DM"]);
        let p = corrupt("cm4.ark", &|b: &mut Vec<u8>| {
            b[first + 2..first + 4].copy_from_slice(b"CM");
            b.insert(first + 4, b'4');
        });
        assert_err(read_matrix_ark(&p), &p, &["unsupported matrix type 'CM4'"]);
        let p = corrupt("size.ark", &|b: &mut Vec<u8>| b[first + 5] = 8);
        assert_err(read_matrix_ark(&p), &p, &["bad size byte before the row count: expected 4 (int32), found 8"]);
        let p = corrupt("garbage.ark", &|b: &mut Vec<u8>| {
            b[first + 2..first + 6].copy_from_slice(&[0xff, 0x13, 0x37, 0x00])
        });
        assert_err(
            read_matrix_ark(&p),
            &p,
            &["expected a matrix type (FM, DM, CM, CM2 or CM3) and a space, found bytes ff 13 37 00"],
        );
        let p = corrupt("marker.ark", &|b: &mut Vec<u8>| b[first + 1] = b'Q');
        assert_err(read_matrix_ark(&p), &p, &["expected the binary marker '\\0B', found bytes 00 51"]);
        let p = corrupt("negative.ark", &|b: &mut Vec<u8>| {
            b[first + 6..first + 10].copy_from_slice(&(-7i32).to_le_bytes())
        });
        assert_err(read_matrix_ark(&p), &p, &["the row count is negative: -7"]);
        let p =
            corrupt("huge.ark", &|b: &mut Vec<u8>| b[first + 6..first + 10].copy_from_slice(&i32::MAX.to_le_bytes()));
        assert_err(read_matrix_ark(&p), &p, &["truncated data (2147483647 x 40 float32 values)"]);
        let p = corrupt("nospace.ark", &|b: &mut Vec<u8>| b[first - 1] = b'\n');
        assert_err(read_matrix_ark(&p), &p, &["expected a space after utterance id 'spk1-utt1', found byte 0x0a"]);
        let p = corrupt("key-only.ark", &|b: &mut Vec<u8>| b.extend_from_slice(b"dangling"));
        assert_err(read_matrix_ark(&p), &p, &["truncated entry: the file ends after utterance id 'dangling'"]);
        let p = dir.write("ali-as-matrix.ark", &bytes("ali.ark"));
        assert_err(read_matrix_ark(&p), &p, &["found bytes 04 07 00 00 (this looks like an int32 vector"]);

        let cm = bytes("feats_cm.ark");
        let p = dir.write("cm-header.ark", &cm[..first + 5 + 10]);
        assert_err(read_matrix_ark(&p), &p, &["truncated compressed-matrix header: expected 16 bytes"]);
        let p = dir.write("cm-data.ark", &cm[..cm.len() - 1]);
        assert_err(read_matrix_ark(&p), &p, &["spk2-utt1", "truncated data (11 x 40 compressed CM)"]);

        let p = dir.write("text.ark", b"u1 [ 1 2\n 3 ]\n");
        assert_err(read_matrix_ark(&p), &p, &["row 1 of the text matrix has 1 values, expected 2"]);
        let p = dir.write("text-nan.ark", b"u1 [ 1 x2 ]\n");
        assert_err(read_matrix_ark(&p), &p, &["at byte 7", "expected a number in the text matrix, found 'x2'"]);
        let p = dir.write("text-open.ark", b"u1 [ 1 2\n");
        assert_err(read_matrix_ark(&p), &p, &["the file ends before the closing ']'"]);
        let p = dir.write("text-bracket.ark", b"u1 1 2\n");
        assert_err(read_matrix_ark(&p), &p, &["or a text matrix starting with '[', found 0x31 ('1')"]);
    }

    #[test]
    fn kaldi_corrupted_alignment_arks_give_clear_errors() {
        let dir = TempDir::new("kaldi-corrupt-ali");
        let good = bytes("ali.ark");
        let first = "spk1-utt1 ".len();
        let p = dir.write("short.ark", &good[..good.len() - 3]);
        assert_err(read_int_vector_ark(&p), &p, &["utterance 'spk2-utt1'", "truncated data (11 int32 values"]);
        let mut b = good.clone();
        b[first + 2 + 5 + 5] = 2; // the size byte of element 1
        let p = dir.write("element.ark", &b);
        assert_err(
            read_int_vector_ark(&p),
            &p,
            &["at byte 22", "bad size byte before element 1: expected 4 (int32), found 0x02"],
        );
        let p = dir.write("matrix.ark", &bytes("feats_f32.ark"));
        assert_err(read_int_vector_ark(&p), &p, &["found 0x46 ('F') (this looks like a matrix"]);
        let p = dir.write("text.ark", b"u1 1 2 x\n");
        assert_err(read_int_vector_ark(&p), &p, &["at byte 7", "expected an int32 in the text vector, found 'x'"]);
    }

    #[test]
    fn kaldi_bad_scp_files_give_clear_errors() {
        let dir = TempDir::new("kaldi-bad-scp");
        let ark = fixture("feats_f32.ark");
        let len = std::fs::metadata(&ark).unwrap().len();
        let write = |name: &str, text: String| dir.write(name, text.as_bytes());

        let p = write("past.scp", format!("u1 {}:10\nu2 {}:{len}\n", ark.display(), ark.display()));
        let msg = assert_err(read_matrix_scp(&p), &p, &["past.scp:2: utterance 'u2': offset", "is past the end"]);
        assert!(msg.contains(&ark.display().to_string()), "{msg}");
        // Read line by line: the first entry comes before the second line is looked at.
        let mut entries = MatrixEntries::scp(&p).unwrap();
        assert_eq!(entries.next_entry().unwrap().map(|(id, m)| (id, m.rows)), Some(("u1".to_string(), 7)));
        assert_err(entries.next_entry(), &p, &["past.scp:2"]);
        let p = write("mid.scp", format!("u1 {}:3\n", ark.display()));
        assert_err(read_matrix_scp(&p), &p, &["mid.scp:1", "utterance 'u1' at byte 3", "found 0x31 ('1')"]);
        let p = write("missing.scp", "u1 nowhere.ark:10\n".to_string());
        assert_err(read_matrix_scp(&p), &p, &["utterance 'u1'", "archive 'nowhere.ark' not found"]);
        let p = write("nopath.scp", "u1\n".to_string());
        assert_err(read_matrix_scp(&p), &p, &["nopath.scp:1: expected '<utterance-id> <ark path>:<byte offset>'"]);
        let p = write("pipe.scp", "u1 gunzip -c x.ark.gz |\n".to_string());
        assert_err(read_matrix_scp(&p), &p, &["piped command"]);
        let p = write("range.scp", format!("u1 {}:10[5:9]\n", ark.display()));
        assert_err(read_matrix_scp(&p), &p, &["row range 5:9 is outside the matrix, which has 7 rows"]);
        let p = write("bad-range.scp", format!("u1 {}:10[9:5]\n", ark.display()));
        assert_err(read_matrix_scp(&p), &p, &["expected a range 'first:last' with first <= last, found '9:5'"]);
    }
}
