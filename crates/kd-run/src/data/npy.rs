//! Reader for NumPy `.npy` files: a 2-D float array as a feature matrix, a 1-D integer array as
//! labels.
//!
//! Layout: the magic `\x93NUMPY`, the format version (1.0: a 2-byte header length; 2.0 and 3.0:
//! 4 bytes, 3.0 allowing UTF-8), the header (a Python dict literal such as
//! `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 40), }`), then the data. Supported:
//! little-endian `<f4`, `<f8` (matrices) and `<i4`, `<i8` (labels), C order. Every malformed or
//! unsupported input gives an error naming the file and the problem; nothing here panics on bad
//! data.
//!
//! Why not tch's `Tensor::read_npy`: given a file whose data is shorter than its header's shape
//! (a copy cut short), it returns a tensor of the full shape, read past the end of its buffer
//! (a 3 x 4 `<f4` array cut to 28 of its 48 data bytes loads as 3 x 4, where NumPy reports
//! "could only read 7 elements"); a header claiming a 3,000,000 x 4,000 array in a 185-byte file
//! makes it allocate 48 GB before reading; and its errors name neither the file nor the field.
//! Here every size is checked against the bytes present before anything is allocated.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

#[cfg(test)]
use crate::data::kaldi::Matrix;

const MAGIC: &[u8] = b"\x93NUMPY";

/// npy: 2-D float array (`<f4` or `<f8`, converted to f32) -> Matrix, read whole (the tests;
/// features are read with [`NpyRows`]).
#[cfg(test)]
pub fn read_npy_matrix(path: &Path) -> Result<Matrix> {
    parse_npy_matrix(&read(path)?, path)
}

/// [`read_npy_matrix`] on the file's bytes; errors name `path`.
#[cfg(test)]
pub fn parse_npy_matrix(bytes: &[u8], path: &Path) -> Result<Matrix> {
    let array = parse(bytes).with_context(|| format!("{}: not a readable .npy file", path.display()))?;
    let (rows, cols) = matrix_shape(&array.layout, path)?;
    let mut data = Vec::new();
    decode_f32(array.layout.dtype, array.data, &mut data);
    Ok(Matrix { rows, cols, data })
}

/// npy: 1-D int array (`<i4` or `<i8`) -> labels.
pub fn read_npy_labels(path: &Path) -> Result<Vec<i64>> {
    parse_npy_labels(&read(path)?, path)
}

/// [`read_npy_labels`] on the file's bytes; errors name `path`.
pub fn parse_npy_labels(bytes: &[u8], path: &Path) -> Result<Vec<i64>> {
    let array = parse(bytes).with_context(|| format!("{}: not a readable .npy file", path.display()))?;
    labels_len(&array.layout, path)?;
    let mut out = Vec::new();
    decode_i64(array.layout.dtype, array.data, &mut out);
    Ok(out)
}

/// A `.npy` file read a few rows at a time, for arrays larger than memory: opening reads only
/// the header and checks the file's length against its shape (the errors of
/// [`read_npy_matrix`]); [`NpyRows::matrix_rows`] and [`NpyRows::labels`] then read the rows
/// in order, holding no more than the rows asked for.
///
/// ```ignore
/// let mut feats = NpyRows::matrix(Path::new("feats.npy"))?; // [frames, dim] '<f4' or '<f8'
/// let mut rows = Vec::new();
/// feats.matrix_rows(100, &mut rows)?; // the first 100 frames as f32, 100 x dim values
/// ```
pub struct NpyRows {
    path: PathBuf,
    file: File,
    layout: Layout,
    /// Values of one row: the columns of a matrix, 1 for labels.
    width: usize,
    /// Rows read so far.
    next: usize,
    bytes: Vec<u8>,
}

impl NpyRows {
    /// Opens a 2-D float array (frames x features).
    pub fn matrix(path: &Path) -> Result<Self> {
        let (file, layout) = open(path)?;
        let (_, cols) = matrix_shape(&layout, path)?;
        Ok(NpyRows { path: path.to_path_buf(), file, layout, width: cols, next: 0, bytes: Vec::new() })
    }

    /// Opens a 1-D integer array (labels).
    pub fn labels(path: &Path) -> Result<Self> {
        let (file, layout) = open(path)?;
        labels_len(&layout, path)?;
        Ok(NpyRows { path: path.to_path_buf(), file, layout, width: 1, next: 0, bytes: Vec::new() })
    }

    /// Rows of the array (frames of a matrix, labels of a 1-D array).
    pub fn rows(&self) -> usize {
        self.layout.shape[0]
    }

    /// Values of a row (features of a matrix, 1 for labels).
    pub fn width(&self) -> usize {
        self.width
    }

    /// Bytes the reader holds for the rows it last read (at most those of the most rows asked
    /// for at once).
    #[cfg(test)]
    pub fn buffer_bytes(&self) -> usize {
        self.bytes.capacity()
    }

    /// The next `n` rows of a matrix as f32, row-major, into `out` (replacing its contents).
    pub fn matrix_rows(&mut self, n: usize, out: &mut Vec<f32>) -> Result<()> {
        matrix_shape(&self.layout, &self.path)?;
        self.read_rows(n)?;
        out.clear();
        decode_f32(self.layout.dtype, &self.bytes, out);
        Ok(())
    }

    /// The next `n` labels into `out` (replacing its contents).
    pub fn labels_next(&mut self, n: usize, out: &mut Vec<i64>) -> Result<()> {
        labels_len(&self.layout, &self.path)?;
        self.read_rows(n)?;
        out.clear();
        decode_i64(self.layout.dtype, &self.bytes, out);
        Ok(())
    }

    /// Reads the bytes of the next `n` rows into `self.bytes`.
    fn read_rows(&mut self, n: usize) -> Result<()> {
        let left = self.rows() - self.next;
        if n > left {
            bail!("{}: asked for {n} rows after row {}, but {left} are left", self.path.display(), self.next);
        }
        // The sizes fit: the whole array was checked against the file's length when opened.
        let row_bytes = self.width * self.layout.dtype.size();
        self.bytes.clear();
        self.bytes.reserve_exact(n * row_bytes);
        self.bytes.resize(n * row_bytes, 0);
        self.file
            .read_exact(&mut self.bytes)
            .with_context(|| format!("{}: cannot read rows {} to {}", self.path.display(), self.next, self.next + n))?;
        self.next += n;
        Ok(())
    }
}

/// Opens `path`, parses its header (reading only the header's bytes) and leaves the file at
/// the first data byte.
fn open(path: &Path) -> Result<(File, Layout)> {
    crate::inputs::check_file(path, "NumPy file")?;
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = file.metadata().with_context(|| format!("cannot read the size of {}", path.display()))?.len();
    if len == 0 {
        bail!("{} is empty: expected a .npy file", path.display());
    }
    let layout = parse_header(len, |n| {
        let mut head = vec![0; n];
        file.seek(SeekFrom::Start(0))?;
        file.read_exact(&mut head)?;
        Ok(head)
    })
    .with_context(|| format!("{}: not a readable .npy file", path.display()))?;
    file.seek(SeekFrom::Start(layout.data_start as u64)).with_context(|| format!("cannot read {}", path.display()))?;
    Ok((file, layout))
}

/// Rows and columns of a 2-D float array, or an error naming `path`.
fn matrix_shape(layout: &Layout, path: &Path) -> Result<(usize, usize)> {
    let [rows, cols] = layout.shape[..] else {
        bail!(
            "{}: expected a 2-D array (frames x features), found shape {}",
            path.display(),
            shape_text(&layout.shape)
        );
    };
    if let Dtype::I4 | Dtype::I8 = layout.dtype {
        bail!(
            "{}: expected a float array ('<f4' or '<f8') for features, found dtype '{}'",
            path.display(),
            layout.dtype.descr()
        );
    }
    Ok((rows, cols))
}

/// The length of a 1-D integer array, or an error naming `path`.
fn labels_len(layout: &Layout, path: &Path) -> Result<usize> {
    let [n] = layout.shape[..] else {
        bail!("{}: expected a 1-D array of labels, found shape {}", path.display(), shape_text(&layout.shape));
    };
    if let Dtype::F4 | Dtype::F8 = layout.dtype {
        bail!(
            "{}: expected an integer array ('<i4' or '<i8') for labels, found dtype '{}'",
            path.display(),
            layout.dtype.descr()
        );
    }
    Ok(n)
}

/// Appends the little-endian `<f4` / `<f8` values of `bytes` to `out` as f32.
fn decode_f32(dtype: Dtype, bytes: &[u8], out: &mut Vec<f32>) {
    match dtype {
        Dtype::F4 => out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        Dtype::F8 => out.extend(
            bytes.chunks_exact(8).map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32),
        ),
        Dtype::I4 | Dtype::I8 => unreachable!("matrix_shape refuses integer arrays"),
    }
}

/// Appends the little-endian `<i4` / `<i8` values of `bytes` to `out` as i64.
fn decode_i64(dtype: Dtype, bytes: &[u8], out: &mut Vec<i64>) {
    match dtype {
        Dtype::I4 => out.extend(bytes.chunks_exact(4).map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))),
        Dtype::I8 => out.extend(
            bytes.chunks_exact(8).map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])),
        ),
        Dtype::F4 | Dtype::F8 => unreachable!("labels_len refuses float arrays"),
    }
}

/// The bytes of a file that must exist, be a regular file and not be empty.
fn read(path: &Path) -> Result<Vec<u8>> {
    crate::inputs::check_file(path, "NumPy file")?;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.is_empty() {
        bail!("{} is empty: expected a .npy file", path.display());
    }
    Ok(bytes)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Dtype {
    F4,
    F8,
    I4,
    I8,
}

impl Dtype {
    fn descr(self) -> &'static str {
        match self {
            Dtype::F4 => "<f4",
            Dtype::F8 => "<f8",
            Dtype::I4 => "<i4",
            Dtype::I8 => "<i8",
        }
    }

    fn size(self) -> usize {
        match self {
            Dtype::F4 | Dtype::I4 => 4,
            Dtype::F8 | Dtype::I8 => 8,
        }
    }
}

/// What a header says: the dtype, the shape and where the data starts; the file's length was
/// checked to hold exactly the data the shape needs.
struct Layout {
    dtype: Dtype,
    shape: Vec<usize>,
    data_start: usize,
}

/// A parsed array; `data` holds exactly the product of `shape` elements.
struct Array<'a> {
    layout: Layout,
    data: &'a [u8],
}

/// Python's tuple notation: `(5,)`, `(3, 40)`.
fn shape_text(shape: &[usize]) -> String {
    match shape {
        [n] => format!("({n},)"),
        s => format!("({})", s.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")),
    }
}

fn parse(bytes: &[u8]) -> Result<Array<'_>> {
    let layout = parse_header(bytes.len() as u64, |n| Ok(bytes[..n].to_vec()))?;
    let data = &bytes[layout.data_start..];
    Ok(Array { layout, data })
}

/// Parses the header of a file of `len` bytes whose first `n` bytes `head(n)` returns (`n` is
/// never more than `len`), and checks `len` against the shape: the one header parser of the
/// in-memory and the streaming reader.
fn parse_header(len: u64, mut head: impl FnMut(usize) -> std::io::Result<Vec<u8>>) -> Result<Layout> {
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    let mut read = |n: usize| head(n.min(len)).context("cannot read the header");
    let bytes = read(MAGIC.len() + 2 + 4)?;
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        let head = &bytes[..bytes.len().min(MAGIC.len())];
        bail!("bad magic: expected '\\x93NUMPY' at byte 0, found '{}'", head.escape_ascii());
    }
    let Some(&[major, minor]) = bytes.get(6..8) else {
        bail!("truncated header: the file ends inside the format version at byte 6");
    };
    let (len_size, utf8) = match major {
        1 => (2, false),
        2 => (4, false),
        3 => (4, true),
        _ => bail!("unsupported format version {major}.{minor} at byte 6, expected 1.0, 2.0 or 3.0"),
    };
    let Some(len_bytes) = bytes.get(8..8 + len_size) else {
        bail!("truncated header: the file ends inside the header length at byte 8");
    };
    let header_len = len_bytes.iter().rev().fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
    let start = 8 + len_size;
    if header_len > len - start {
        bail!(
            "truncated header: the header length says {header_len} bytes from byte {start}, but the file has {}",
            len - start
        );
    }
    let data_start = start + header_len;
    let bytes = read(data_start)?;
    let header = &bytes[start..];
    let header = match std::str::from_utf8(header) {
        Ok(h) if utf8 || h.is_ascii() => h,
        _ => bail!("the header at byte {start} is not {} text", if utf8 { "UTF-8" } else { "ASCII" }),
    };
    let header = Header::parse(header).with_context(|| format!("bad header at byte {start}: {}", header.trim_end()))?;
    let shape = shape_text(&header.shape);
    let count = header.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let Some(size) = count.and_then(|n| n.checked_mul(header.dtype.size())) else {
        bail!("shape {shape} overflows");
    };
    let present = len - data_start;
    if present < size {
        bail!(
            "truncated data: shape {shape} of '{}' needs {size} bytes from byte {data_start}, found {present}",
            header.dtype.descr()
        );
    }
    if present > size {
        bail!(
            "{} unexpected bytes after the data: shape {shape} of '{}' needs {size} bytes from byte {data_start}",
            present - size,
            header.dtype.descr()
        );
    }
    Ok(Layout { dtype: header.dtype, shape: header.shape, data_start })
}

/// The three keys of an npy header.
struct Header {
    dtype: Dtype,
    shape: Vec<usize>,
}

impl Header {
    fn parse(text: &str) -> Result<Self> {
        let mut p = Parser { s: text.as_bytes(), i: 0 };
        let Value::Dict(entries) = p.value()? else {
            bail!("expected a dict");
        };
        p.skip_ws();
        if p.i != p.s.len() {
            bail!("unexpected text after the dict");
        }
        let get = |key: &str| entries.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        let dtype = match get("descr") {
            Some(Value::Str(d)) => match d.as_str() {
                "<f4" => Dtype::F4,
                "<f8" => Dtype::F8,
                "<i4" => Dtype::I4,
                "<i8" => Dtype::I8,
                d if d.starts_with('>') => bail!(
                    "unsupported dtype '{d}': big-endian; save it as little-endian, e.g. arr.astype('<{}')",
                    &d[1..]
                ),
                d => bail!("unsupported dtype '{d}', expected '<f4', '<f8', '<i4' or '<i8'"),
            },
            Some(_) => bail!("unsupported dtype: a structured array, expected '<f4', '<f8', '<i4' or '<i8'"),
            None => bail!("no 'descr' key"),
        };
        match get("fortran_order") {
            Some(Value::Bool(false)) => {}
            Some(Value::Bool(true)) => {
                bail!("Fortran-order arrays are not supported; save np.ascontiguousarray(arr) instead")
            }
            Some(_) => bail!("'fortran_order' is not True or False"),
            None => bail!("no 'fortran_order' key"),
        }
        let shape = match get("shape") {
            Some(Value::Tuple(dims)) => dims
                .iter()
                .map(|d| match d {
                    Value::Int(n) => Ok(*n),
                    _ => bail!("'shape' holds something other than non-negative integers"),
                })
                .collect::<Result<Vec<usize>>>()?,
            Some(_) => bail!("'shape' is not a tuple"),
            None => bail!("no 'shape' key"),
        };
        Ok(Header { dtype, shape })
    }
}

/// The Python literals an npy header uses.
enum Value {
    Str(String),
    Int(usize),
    Bool(bool),
    Tuple(Vec<Value>),
    /// A list (the `descr` of a structured array); its items are parsed but not kept.
    List,
    Dict(Vec<(String, Value)>),
}

/// A recursive-descent parser for those literals, with a depth limit.
struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn skip_ws(&mut self) {
        while self.s.get(self.i).is_some_and(u8::is_ascii_whitespace) {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.i).copied()
    }

    fn expect(&mut self, c: u8) -> Result<()> {
        match self.peek() {
            Some(b) if b == c => {
                self.i += 1;
                Ok(())
            }
            Some(b) => bail!("expected '{}' at header byte {}, found '{}'", c as char, self.i, b as char),
            None => bail!("expected '{}' at header byte {}, found the end of the header", c as char, self.i),
        }
    }

    fn value(&mut self) -> Result<Value> {
        self.value_at_depth(0)
    }

    fn value_at_depth(&mut self, depth: usize) -> Result<Value> {
        if depth > 16 {
            bail!("nested too deeply");
        }
        match self.peek() {
            Some(b'{') => {
                self.i += 1;
                let mut entries = Vec::new();
                while self.peek() != Some(b'}') {
                    let Value::Str(key) = self.value_at_depth(depth + 1)? else {
                        bail!("dict key at header byte {} is not a string", self.i);
                    };
                    self.expect(b':')?;
                    entries.push((key, self.value_at_depth(depth + 1)?));
                    if self.peek() != Some(b'}') {
                        self.expect(b',')?;
                    }
                }
                self.i += 1;
                Ok(Value::Dict(entries))
            }
            Some(open @ (b'(' | b'[')) => {
                self.i += 1;
                let close = if open == b'(' { b')' } else { b']' };
                let mut items = Vec::new();
                while self.peek() != Some(close) {
                    items.push(self.value_at_depth(depth + 1)?);
                    if self.peek() != Some(close) {
                        self.expect(b',')?;
                    }
                }
                self.i += 1;
                Ok(if open == b'(' { Value::Tuple(items) } else { Value::List })
            }
            Some(q @ (b'\'' | b'"')) => {
                let start = self.i + 1;
                let Some(len) = self.s[start..].iter().position(|&b| b == q) else {
                    bail!("unterminated string at header byte {}", self.i);
                };
                self.i = start + len + 1;
                Ok(Value::Str(String::from_utf8_lossy(&self.s[start..start + len]).into_owned()))
            }
            Some(b'0'..=b'9') => {
                let start = self.i;
                while self.s.get(self.i).is_some_and(u8::is_ascii_digit) {
                    self.i += 1;
                }
                // Python 2 numpy wrote longs as `3L`.
                if self.s.get(self.i) == Some(&b'L') {
                    self.i += 1;
                }
                let digits = String::from_utf8_lossy(&self.s[start..self.i]);
                let n =
                    digits.trim_end_matches('L').parse().with_context(|| format!("number '{digits}' is too large"))?;
                Ok(Value::Int(n))
            }
            Some(_) => {
                for (word, b) in [("True", true), ("False", false)] {
                    if self.s[self.i..].starts_with(word.as_bytes()) {
                        self.i += word.len();
                        return Ok(Value::Bool(b));
                    }
                }
                let rest = String::from_utf8_lossy(&self.s[self.i..]);
                bail!("unexpected '{}' at header byte {}", rest.chars().take(12).collect::<String>(), self.i)
            }
            None => bail!("the header ends where a value was expected"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{npy, TempDir};
    use std::path::PathBuf;
    use tch::{Kind, Tensor};

    const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/kaldi");

    fn fixture(name: &str) -> PathBuf {
        Path::new(DIR).join(name)
    }

    /// The error's full chain; asserts it names `path` and contains every `needles`.
    fn assert_err<T: std::fmt::Debug>(r: Result<T>, path: &Path, needles: &[&str]) {
        let msg = format!("{:#}", r.expect_err("expected an error"));
        assert!(msg.contains(&path.display().to_string()), "error does not name {}: {msg}", path.display());
        for n in needles {
            assert!(msg.contains(n), "error lacks '{n}': {msg}");
        }
    }

    /// `bytes` with `from` replaced by `to` (same length, so the header length stays right).
    fn replace(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
        assert_eq!(from.len(), to.len());
        let at = bytes.windows(from.len()).position(|w| w == from).expect("pattern in fixture");
        let mut out = bytes.to_vec();
        out[at..at + from.len()].copy_from_slice(to);
        out
    }

    #[test]
    fn npy_matrices_match_tch() {
        for (name, shape) in [("npy_f32.npy", (5, 4)), ("npy_f64.npy", (5, 4)), ("npy_f32_v2.npy", (3, 2))] {
            let m = read_npy_matrix(&fixture(name)).unwrap();
            let t = Tensor::read_npy(fixture(name)).unwrap();
            assert_eq!(t.size(), [shape.0, shape.1], "{name}");
            assert_eq!((m.rows as i64, m.cols as i64), shape, "{name}");
            let want = Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap();
            assert_eq!(m.data, want, "{name}");
        }
    }

    #[test]
    fn npy_labels_match_tch() {
        for name in ["npy_i64.npy", "npy_i32.npy"] {
            let labels = read_npy_labels(&fixture(name)).unwrap();
            let t = Tensor::read_npy(fixture(name)).unwrap();
            assert_eq!(t.size(), [9], "{name}");
            assert_eq!(labels, Vec::<i64>::try_from(t.to_kind(Kind::Int64)).unwrap(), "{name}");
            assert!(
                labels.iter().any(|&l| l < 0) || labels.iter().any(|&l| l > 255),
                "{name}: values exercise the width"
            );
        }
    }

    #[test]
    fn npy_wrong_rank_or_kind_is_an_error() {
        let p = fixture("npy_i64.npy");
        assert_err(read_npy_matrix(&p), &p, &["expected a 2-D array (frames x features), found shape (9,)"]);
        let p = fixture("npy_f32.npy");
        assert_err(read_npy_labels(&p), &p, &["expected a 1-D array of labels, found shape (5, 4)"]);
        let dir = TempDir::new("npy-kind");
        let flat = replace(&std::fs::read(fixture("npy_i32.npy")).unwrap(), b"'<i4'", b"'<f4'");
        let p = dir.write("flat.npy", &flat);
        assert_err(
            read_npy_labels(&p),
            &p,
            &["expected an integer array ('<i4' or '<i8') for labels, found dtype '<f4'"],
        );
        let ints = replace(&std::fs::read(fixture("npy_f32.npy")).unwrap(), b"'<f4'", b"'<i4'");
        let p = dir.write("ints.npy", &ints);
        assert_err(
            read_npy_matrix(&p),
            &p,
            &["expected a float array ('<f4' or '<f8') for features, found dtype '<i4'"],
        );
    }

    #[test]
    fn npy_corrupted_files_give_clear_errors() {
        let dir = TempDir::new("npy-corrupt");
        let good = std::fs::read(fixture("npy_f32.npy")).unwrap();
        let cases: [(&str, Vec<u8>, &str); 10] = [
            (
                "magic.npy",
                replace(&good, b"NUMPY", b"NUMPZ"),
                "bad magic: expected '\\x93NUMPY' at byte 0, found '\\x93NUMPZ'",
            ),
            ("empty.npy", Vec::new(), "empty.npy is empty: expected a .npy file"),
            ("version.npy", replace(&good, b"NUMPY\x01", b"NUMPY\x07"), "unsupported format version 7.0"),
            (
                "dtype.npy",
                replace(&good, b"'<f4'", b"'<f2'"),
                "unsupported dtype '<f2', expected '<f4', '<f8', '<i4' or '<i8'",
            ),
            ("big.npy", replace(&good, b"'<f4'", b"'>f4'"), "unsupported dtype '>f4': big-endian"),
            ("fortran.npy", replace(&good, b"False", b"True "), "Fortran-order arrays are not supported"),
            ("header.npy", good[..40].to_vec(), "truncated header: the header length says 118 bytes from byte 10"),
            ("data.npy", good[..good.len() - 3].to_vec(), "truncated data: shape (5, 4) of '<f4' needs 80 bytes"),
            ("trailing.npy", [good.as_slice(), b"xx"].concat(), "2 unexpected bytes after the data"),
            ("shape.npy", replace(&good, b"(5, 4)", b"(5, x)"), "unexpected 'x)"),
        ];
        for (name, bytes, needle) in cases {
            let p = dir.write(name, &bytes);
            assert_err(read_npy_matrix(&p), &p, &[needle]);
            // The streaming reader finds the same from the header and the file's length.
            assert_err(NpyRows::matrix(&p).map(|r| r.rows()), &p, &[needle]);
        }
    }

    #[test]
    fn npy_rows_are_read_in_pieces_holding_only_the_rows_asked_for() {
        let dir = TempDir::new("npy-rows");
        let (rows, cols) = (1000usize, 8usize);
        let values: Vec<f64> = (0..rows * cols).map(|i| i as f64 * 0.25 - 7.0).collect();
        let f4: Vec<u8> = values.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect();
        let f8: Vec<u8> = values.iter().flat_map(|&v| v.to_le_bytes()).collect();
        let labels: Vec<i64> = (0..rows as i64).map(|i| i * 1_000_003 % 4093 - 11).collect();
        let i4: Vec<u8> = labels.iter().flat_map(|&v| (v as i32).to_le_bytes()).collect();
        let i8: Vec<u8> = labels.iter().flat_map(|&v| v.to_le_bytes()).collect();
        for (descr, data, size) in [("<f4", f4, 4), ("<f8", f8, 8)] {
            let p = dir.write("m.npy", &npy(descr, &[rows, cols], &data));
            let whole = read_npy_matrix(&p).unwrap();
            let mut reader = NpyRows::matrix(&p).unwrap();
            assert_eq!((reader.rows(), reader.width()), (rows, cols));
            let (mut got, mut piece) = (Vec::new(), Vec::new());
            let mut left = rows;
            while left > 0 {
                let n = left.min(7);
                reader.matrix_rows(n, &mut piece).unwrap();
                assert_eq!(piece.len(), n * cols);
                assert!(reader.buffer_bytes() <= 7 * cols * size, "{descr}: {} bytes held", reader.buffer_bytes());
                got.extend_from_slice(&piece);
                left -= n;
            }
            assert_eq!(got, whole.data, "{descr}");
            assert_eq!(got[3 * cols + 5], (3 * cols + 5) as f32 * 0.25 - 7.0);
            assert_err(reader.matrix_rows(1, &mut piece), &p, &["asked for 1 rows after row 1000, but 0 are left"]);
            assert_err(reader.labels_next(1, &mut Vec::new()), &p, &["expected a 1-D array of labels"]);
        }
        for (descr, data) in [("<i4", i4), ("<i8", i8)] {
            let p = dir.write("l.npy", &npy(descr, &[rows], &data));
            let mut reader = NpyRows::labels(&p).unwrap();
            let (mut got, mut piece) = (Vec::new(), Vec::new());
            for n in [1, 998, 1] {
                reader.labels_next(n, &mut piece).unwrap();
                got.extend_from_slice(&piece);
            }
            assert_eq!(got, labels, "{descr}");
            assert_eq!(got, read_npy_labels(&p).unwrap());
            assert_err(NpyRows::matrix(&p).map(|r| r.rows()), &p, &["expected a 2-D array"]);
        }
    }
}
