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

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::data::kaldi::Matrix;

const MAGIC: &[u8] = b"\x93NUMPY";

/// npy: 2-D float array (`<f4` or `<f8`, converted to f32) -> Matrix.
pub fn read_npy_matrix(path: &Path) -> Result<Matrix> {
    parse_npy_matrix(&read(path)?, path)
}

/// [`read_npy_matrix`] on the file's bytes; errors name `path`.
pub fn parse_npy_matrix(bytes: &[u8], path: &Path) -> Result<Matrix> {
    let array = parse(bytes).with_context(|| format!("{}: not a readable .npy file", path.display()))?;
    let [rows, cols] = array.shape[..] else {
        bail!("{}: expected a 2-D array (frames x features), found shape {}", path.display(), array.shape_text());
    };
    let data = match array.dtype {
        Dtype::F4 => array.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F8 => array
            .data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        Dtype::I4 | Dtype::I8 => bail!(
            "{}: expected a float array ('<f4' or '<f8') for features, found dtype '{}'",
            path.display(),
            array.dtype.descr()
        ),
    };
    Ok(Matrix { rows, cols, data })
}

/// npy: 1-D int array (`<i4` or `<i8`) -> labels.
pub fn read_npy_labels(path: &Path) -> Result<Vec<i64>> {
    parse_npy_labels(&read(path)?, path)
}

/// [`read_npy_labels`] on the file's bytes; errors name `path`.
pub fn parse_npy_labels(bytes: &[u8], path: &Path) -> Result<Vec<i64>> {
    let array = parse(bytes).with_context(|| format!("{}: not a readable .npy file", path.display()))?;
    if array.shape.len() != 1 {
        bail!("{}: expected a 1-D array of labels, found shape {}", path.display(), array.shape_text());
    }
    Ok(match array.dtype {
        Dtype::I4 => {
            array.data.chunks_exact(4).map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect()
        }
        Dtype::I8 => array
            .data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
        Dtype::F4 | Dtype::F8 => bail!(
            "{}: expected an integer array ('<i4' or '<i8') for labels, found dtype '{}'",
            path.display(),
            array.dtype.descr()
        ),
    })
}

/// The bytes of a file that must exist, be a regular file and not be empty.
fn read(path: &Path) -> Result<Vec<u8>> {
    crate::data::inputs::check_file(path, "NumPy file")?;
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

/// A parsed array; `data` holds exactly the product of `shape` elements.
struct Array<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    data: &'a [u8],
}

impl Array<'_> {
    fn shape_text(&self) -> String {
        shape_text(&self.shape)
    }
}

/// Python's tuple notation: `(5,)`, `(3, 40)`.
fn shape_text(shape: &[usize]) -> String {
    match shape {
        [n] => format!("({n},)"),
        s => format!("({})", s.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")),
    }
}

fn parse(bytes: &[u8]) -> Result<Array<'_>> {
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
    let Some(header) = bytes.get(start..start + header_len) else {
        bail!(
            "truncated header: the header length says {header_len} bytes from byte {start}, but the file has {}",
            bytes.len() - start
        );
    };
    let header = match std::str::from_utf8(header) {
        Ok(h) if utf8 || h.is_ascii() => h,
        _ => bail!("the header at byte {start} is not {} text", if utf8 { "UTF-8" } else { "ASCII" }),
    };
    let header = Header::parse(header).with_context(|| format!("bad header at byte {start}: {}", header.trim_end()))?;
    let data_start = start + header_len;
    let shape = shape_text(&header.shape);
    let count = header.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let Some(size) = count.and_then(|n| n.checked_mul(header.dtype.size())) else {
        bail!("shape {shape} overflows");
    };
    let data = &bytes[data_start..];
    if data.len() < size {
        bail!(
            "truncated data: shape {shape} of '{}' needs {size} bytes from byte {data_start}, found {}",
            header.dtype.descr(),
            data.len()
        );
    }
    if data.len() > size {
        bail!(
            "{} unexpected bytes after the data: shape {shape} of '{}' needs {size} bytes from byte {data_start}",
            data.len() - size,
            header.dtype.descr()
        );
    }
    Ok(Array { dtype: header.dtype, shape: header.shape, data })
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
    use crate::testutil::TempDir;
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
        }
    }
}
