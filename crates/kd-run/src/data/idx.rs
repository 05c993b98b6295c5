//! Reader for the IDX files MNIST ships in (`train-images-idx3-ubyte` and friends).
//!
//! IDX layout, big-endian: two zero bytes, a type byte (0x08 = unsigned byte, the only type
//! supported here), the rank, then one `u32` per dimension, then the data in row-major order.
//! Every malformed input is reported as an error naming the file and the problem; nothing here
//! panics on bad data.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use tch::{Kind, Tensor};

/// IDX type byte for unsigned bytes.
const UBYTE: u8 = 0x08;

/// A ubyte IDX array: dims and raw bytes (row-major).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// The element type an IDX type byte stands for, for error messages.
fn type_name(code: u8) -> &'static str {
    match code {
        0x08 => "unsigned byte",
        0x09 => "signed byte",
        0x0B => "16-bit integer",
        0x0C => "32-bit integer",
        0x0D => "32-bit float",
        0x0E => "64-bit float",
        _ => "not a valid IDX type",
    }
}

/// Parses bytes; `expected_rank` e.g. 3 for images, 1 for labels. Checks: at least 4 bytes;
/// first two bytes zero; type byte 0x08; rank matches; header length; data length equals the
/// product of dims exactly.
pub fn parse_idx(bytes: &[u8], expected_rank: usize) -> Result<IdxArray> {
    let [z0, z1, kind, rank, ..] = *bytes else {
        bail!("truncated header: {} bytes, but an IDX file starts with a 4-byte magic number", bytes.len());
    };
    if (z0, z1) == (0x1f, 0x8b) {
        bail!("bad magic number: this is gzip-compressed data; decompress it first");
    }
    ensure!(
        (z0, z1) == (0, 0),
        "bad magic number {z0:02x} {z1:02x} {kind:02x} {rank:02x}: an IDX file starts with two zero bytes"
    );
    ensure!(
        kind == UBYTE,
        "unsupported element type 0x{kind:02x} ({}), expected 0x08 (unsigned byte)",
        type_name(kind)
    );
    let rank = usize::from(rank);
    ensure!(rank == expected_rank, "wrong rank: {rank} dimensions, expected {expected_rank}");

    let header_len = 4 + 4 * rank;
    let Some(dim_bytes) = bytes.get(4..header_len) else {
        bail!(
            "truncated header: {} bytes, expected {header_len} (4-byte magic + {rank} 4-byte dimensions)",
            bytes.len()
        );
    };
    let mut dims = Vec::with_capacity(rank);
    for chunk in dim_bytes.chunks_exact(4) {
        let dim = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        dims.push(usize::try_from(dim).context("dimension does not fit in usize")?);
    }
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .with_context(|| format!("dimensions {dims:?} overflow: too large to be a real file"))?;

    let data = &bytes[header_len..];
    if data.len() < expected {
        bail!(
            "truncated data: dimensions {dims:?} need {expected} bytes after the {header_len}-byte header, found {}",
            data.len()
        );
    }
    if data.len() > expected {
        bail!(
            "trailing bytes: dimensions {dims:?} need {expected} bytes after the {header_len}-byte header, found {} ({} extra)",
            data.len(),
            data.len() - expected
        );
    }
    Ok(IdxArray { dims, data: data.to_vec() })
}

/// Reads and parses a file; errors name the path.
pub fn read_idx(path: &Path, expected_rank: usize) -> Result<IdxArray> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    ensure!(!bytes.is_empty(), "{} is empty: expected an IDX file", path.display());
    parse_idx(&bytes, expected_rank).with_context(|| format!("{} is not a valid IDX file", path.display()))
}

/// A labelled image set: images [n, rows*cols] as f32 in [0,1] (byte/255), labels [n] int64, on CPU.
pub struct ImageSet {
    pub images: Tensor,
    pub labels: Tensor,
    pub rows: usize,
    pub cols: usize,
}

/// Fails with setup instructions when an expected data file is absent.
pub(crate) fn ensure_present(path: &Path) -> Result<()> {
    if path.is_file() {
        return Ok(());
    }
    if std::fs::symlink_metadata(path).is_ok() {
        // There is something by that name: a directory, a dangling link, a device.
        return crate::inputs::check_file(path, "IDX file");
    }
    let mut gz = PathBuf::from(path);
    gz.as_mut_os_string().push(".gz");
    if gz.is_file() {
        bail!(
            "{} not found, but {} is: decompress it (gunzip), or run `scripts/fetch_mnist.py --out DIR --from DIR`",
            path.display(),
            gz.display()
        );
    }
    bail!(
        "{} not found: run `make setup` (or `scripts/setup.sh`) to fetch MNIST into data/mnist, \
         or point the experiment's `data.dir` at a folder holding the official uncompressed files",
        path.display()
    );
}

/// Images as f32 `byte / 255` with the given 2-d shape, labels as int64.
fn to_tensors(images: &[u8], labels: &[u8], shape: [i64; 2]) -> Result<(Tensor, Tensor), tch::TchError> {
    let images = Tensor::f_from_slice(images)?.f_view(shape)?.f_to_kind(Kind::Float)?.f_div_scalar(255.0)?;
    let labels = Tensor::f_from_slice(labels)?.f_to_kind(Kind::Int64)?;
    Ok((images, labels))
}

fn to_i64(n: usize) -> Result<i64> {
    i64::try_from(n).context("size does not fit in i64")
}

/// Loads `{dir}/{prefix}-images-idx3-ubyte` and `{dir}/{prefix}-labels-idx1-ubyte` (prefix
/// "train" or "t10k"); checks that the counts agree and that every label is `< num_classes`.
/// Missing files produce an error that says how to get them.
pub fn load_image_set(dir: &Path, prefix: &str, num_classes: u8) -> Result<ImageSet> {
    let image_path = dir.join(format!("{prefix}-images-idx3-ubyte"));
    let label_path = dir.join(format!("{prefix}-labels-idx1-ubyte"));
    ensure_present(&image_path)?;
    ensure_present(&label_path)?;
    let images = read_idx(&image_path, 3)?;
    let labels = read_idx(&label_path, 1)?;
    image_set(images, labels, &image_path, &label_path, num_classes)
}

/// The images (rank 3) and labels (rank 1) read from `image_path` and `label_path` as a set.
fn image_set(
    images: IdxArray,
    labels: IdxArray,
    image_path: &Path,
    label_path: &Path,
    num_classes: u8,
) -> Result<ImageSet> {
    let (n, rows, cols) = (images.dims[0], images.dims[1], images.dims[2]);
    ensure!(
        labels.dims[0] == n,
        "count mismatch: {} holds {n} images but {} holds {} labels",
        image_path.display(),
        label_path.display(),
        labels.dims[0]
    );
    ensure!(n > 0 && rows > 0 && cols > 0, "{} holds no pixels (dimensions {:?})", image_path.display(), images.dims);
    if let Some((i, &label)) = labels.data.iter().enumerate().find(|&(_, &l)| l >= num_classes) {
        bail!("{}: label {label} at index {i} is out of range (expected 0..{num_classes})", label_path.display());
    }

    let shape = [to_i64(n)?, to_i64(rows * cols)?];
    let (images, labels) = to_tensors(&images.data, &labels.data, shape)
        .with_context(|| format!("building tensors from {}", image_path.display()))?;
    Ok(ImageSet { images, labels, rows, cols })
}

/// [`load_image_set`] on the bytes of the two files (the fuzz tests).
#[cfg(test)]
pub fn parse_image_set(images: &[u8], labels: &[u8], num_classes: u8) -> Result<ImageSet> {
    let (image_path, label_path) = (Path::new("images"), Path::new("labels"));
    let images = parse_idx(images, 3).context("images")?;
    let labels = parse_idx(labels, 1).context("labels")?;
    image_set(images, labels, image_path, label_path, num_classes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    /// IDX file contents with the given type byte, dims and data.
    fn idx_bytes(kind: u8, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0, 0, kind, u8::try_from(dims.len()).expect("rank fits in u8")];
        for d in dims {
            bytes.extend_from_slice(&d.to_be_bytes());
        }
        bytes.extend_from_slice(data);
        bytes
    }

    fn write_set(dir: &Path, images: &[u8], labels: &[u8]) {
        std::fs::write(dir.join("t-images-idx3-ubyte"), images).expect("write images");
        std::fs::write(dir.join("t-labels-idx1-ubyte"), labels).expect("write labels");
    }

    #[test]
    fn parses_valid_arrays() {
        let data: Vec<u8> = (0..12).collect();
        let images = parse_idx(&idx_bytes(0x08, &[2, 2, 3], &data), 3).expect("valid images");
        assert_eq!(images, IdxArray { dims: vec![2, 2, 3], data });

        // Dimensions are big-endian: 0x00000101 = 257.
        let labels = parse_idx(&idx_bytes(0x08, &[257], &[9; 257]), 1).expect("valid labels");
        assert_eq!(labels.dims, vec![257]);
        assert_eq!(labels.data, vec![9; 257]);

        let empty = parse_idx(&idx_bytes(0x08, &[0], &[]), 1).expect("empty array");
        assert_eq!(empty, IdxArray { dims: vec![0], data: vec![] });
    }

    #[test]
    fn rejects_corrupt_arrays() {
        let good = idx_bytes(0x08, &[2, 2, 3], &[7; 12]);
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            f(&mut b);
            b
        };
        let cases: Vec<(&str, Vec<u8>, usize, &str)> = vec![
            ("empty", vec![], 3, "truncated header: 0 bytes"),
            ("3 bytes", vec![0, 0, 8], 3, "truncated header: 3 bytes"),
            ("wrong magic", with(&|b| b[1] = 1), 3, "bad magic number 00 01 08 03"),
            ("gzip", with(&|b| b[..2].copy_from_slice(&[0x1f, 0x8b])), 3, "gzip-compressed"),
            ("wrong type", with(&|b| b[2] = 0x0D), 3, "element type 0x0d (32-bit float)"),
            ("unknown type", with(&|b| b[2] = 0x42), 3, "0x42 (not a valid IDX type)"),
            ("wrong rank", good.clone(), 1, "wrong rank: 3 dimensions, expected 1"),
            ("truncated header", good[..9].to_vec(), 3, "truncated header: 9 bytes, expected 16"),
            (
                "truncated data",
                good[..good.len() - 1].to_vec(),
                3,
                "truncated data: dimensions [2, 2, 3] need 12 bytes after the 16-byte header, found 11",
            ),
            ("trailing bytes", with(&|b| b.push(0)), 3, "trailing bytes: dimensions [2, 2, 3] need 12 bytes"),
            ("trailing count", with(&|b| b.extend([0; 5])), 3, "found 17 (5 extra)"),
            ("overflowing dims", idx_bytes(0x08, &[u32::MAX; 3], &[]), 3, "overflow"),
        ];
        for (name, bytes, rank, want) in cases {
            let err = parse_idx(&bytes, rank).expect_err(name);
            let msg = format!("{err:#}");
            assert!(msg.contains(want), "{name}: error {msg:?} should mention {want:?}");
        }
    }

    #[test]
    fn read_idx_names_the_file() {
        let tmp = TempDir::new("idx-read");
        let path = tmp.0.join("short-idx1-ubyte");
        std::fs::write(&path, idx_bytes(0x08, &[4], &[1, 2])).expect("write");
        let msg = format!("{:#}", read_idx(&path, 1).expect_err("truncated"));
        assert!(msg.contains("short-idx1-ubyte") && msg.contains("truncated data"), "{msg}");
        let msg = format!("{:#}", read_idx(&tmp.0.join("absent"), 1).expect_err("absent"));
        assert!(msg.contains("cannot read") && msg.contains("absent"), "{msg}");
    }

    #[test]
    fn loads_a_tiny_set() {
        let tmp = TempDir::new("idx-tiny");
        let pixels = [0, 255, 51, 102, 0, 0, 1, 2, 3, 4, 5, 6];
        write_set(&tmp.0, &idx_bytes(0x08, &[2, 2, 3], &pixels), &idx_bytes(0x08, &[2], &[1, 0]));
        let set = load_image_set(&tmp.0, "t", 10).expect("valid set");
        assert_eq!((set.rows, set.cols), (2, 3));
        assert_eq!(set.images.size(), [2, 6]);
        assert_eq!(set.images.kind(), Kind::Float);
        assert_eq!(set.labels.kind(), Kind::Int64);
        assert_eq!(Vec::<i64>::try_from(&set.labels).expect("labels"), [1, 0]);
        let images = Vec::<f32>::try_from(&set.images.view([-1])).expect("images");
        let want: Vec<f32> = pixels.iter().map(|&p| f32::from(p) / 255.0).collect();
        assert_eq!(images, want);
        assert_eq!((images[0], images[1], images[2]), (0.0, 1.0, 0.2));
    }

    #[test]
    fn rejects_bad_image_sets() {
        let images = idx_bytes(0x08, &[2, 2, 3], &[0; 12]);
        let labels = idx_bytes(0x08, &[2], &[1, 0]);
        // (name, images file, labels file, num_classes, what the error must mention)
        type Case = (&'static str, Vec<u8>, Vec<u8>, u8, &'static [&'static str]);
        let cases: Vec<Case> = vec![
            (
                "label out of range",
                images.clone(),
                idx_bytes(0x08, &[2], &[1, 10]),
                10,
                &["t-labels-idx1-ubyte", "label 10 at index 1 is out of range (expected 0..10)"],
            ),
            (
                "label out of range for fewer classes",
                images.clone(),
                labels.clone(),
                1,
                &["label 1 at index 0 is out of range (expected 0..1)"],
            ),
            (
                "count mismatch",
                images.clone(),
                idx_bytes(0x08, &[3], &[0, 1, 2]),
                10,
                &["count mismatch", "holds 2 images but", "holds 3 labels"],
            ),
            (
                "labels truncated",
                images.clone(),
                idx_bytes(0x08, &[3], &[0, 1]),
                10,
                &["t-labels-idx1-ubyte", "truncated data"],
            ),
            (
                "images of rank 1",
                labels.clone(),
                labels.clone(),
                10,
                &["t-images-idx3-ubyte", "wrong rank: 1 dimensions, expected 3"],
            ),
            ("no images", idx_bytes(0x08, &[0, 28, 28], &[]), idx_bytes(0x08, &[0], &[]), 10, &["holds no pixels"]),
        ];
        for (name, images, labels, num_classes, wants) in cases {
            let tmp = TempDir::new(&name.replace(' ', "-"));
            write_set(&tmp.0, &images, &labels);
            let msg = match load_image_set(&tmp.0, "t", num_classes) {
                Ok(_) => panic!("{name}: loaded a bad set"),
                Err(e) => format!("{e:#}"),
            };
            for want in wants {
                assert!(msg.contains(want), "{name}: error {msg:?} should mention {want:?}");
            }
        }
    }

    #[test]
    fn missing_files_say_how_to_get_them() {
        let tmp = TempDir::new("idx-missing");
        let msg = match load_image_set(&tmp.0, "train", 10) {
            Ok(_) => panic!("loaded from an empty dir"),
            Err(e) => format!("{e:#}"),
        };
        for want in ["train-images-idx3-ubyte not found", "make setup", "scripts/setup.sh", "data.dir"] {
            assert!(msg.contains(want), "error {msg:?} should mention {want:?}");
        }
        std::fs::write(tmp.0.join("train-images-idx3-ubyte.gz"), b"").expect("write");
        let msg = match load_image_set(&tmp.0, "train", 10) {
            Ok(_) => panic!("loaded a .gz"),
            Err(e) => format!("{e:#}"),
        };
        assert!(msg.contains("train-images-idx3-ubyte.gz is: decompress it"), "{msg}");
    }

    #[test]
    fn a_directory_a_dangling_link_or_an_empty_file_is_named_as_such() {
        let tmp = TempDir::new("idx-odd");
        let labels = idx_bytes(0x08, &[2], &[1, 0]);
        std::fs::write(tmp.0.join("train-labels-idx1-ubyte"), &labels).expect("write");
        let err = |dir: &Path| match load_image_set(dir, "train", 10) {
            Ok(_) => panic!("loaded a bad set"),
            Err(e) => format!("{e:#}"),
        };
        let images = tmp.0.join("train-images-idx3-ubyte");
        std::fs::create_dir(&images).expect("mkdir");
        let msg = err(&tmp.0);
        assert!(msg.contains("train-images-idx3-ubyte is a directory, not a file"), "{msg}");
        assert!(!msg.contains("make setup"), "{msg}");
        std::fs::remove_dir(&images).expect("rmdir");
        std::os::unix::fs::symlink(tmp.0.join("gone"), &images).expect("symlink");
        let msg = err(&tmp.0);
        assert!(msg.contains("is a symbolic link to") && msg.contains("gone', which does not exist"), "{msg}");
        std::fs::remove_file(&images).expect("rm");
        std::fs::write(&images, b"").expect("write");
        let msg = err(&tmp.0);
        assert!(msg.contains("train-images-idx3-ubyte is empty: expected an IDX file"), "{msg}");
    }

    /// The real data set in data/mnist, as `make setup` leaves it.
    #[test]
    fn real_mnist() {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/mnist"));
        let sets = [
            ("train", 60_000, [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]),
            ("t10k", 10_000, [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]),
        ];
        for (prefix, n, counts) in sets {
            let set = match load_image_set(dir, prefix, 10) {
                Ok(set) => set,
                Err(e) => panic!("this test needs the real MNIST files; run `make setup` first: {e:#}"),
            };
            assert_eq!((set.rows, set.cols), (28, 28));
            assert_eq!(set.images.size(), [n, 784]);
            assert_eq!(set.labels.size(), [n]);
            let got = Vec::<i64>::try_from(&set.labels.bincount::<Tensor>(None, 10)).expect("counts");
            assert_eq!(got, counts, "{prefix} label counts");
            assert_eq!(set.images.min().double_value(&[]), 0.0, "{prefix} min pixel");
            assert_eq!(set.images.max().double_value(&[]), 1.0, "{prefix} max pixel");
        }
    }
}
