//! Datasets held on the training device, their splits, minibatch order and jitter.

use crate::config::DataSpec;
use crate::idx;
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// Examples and labels of one split, on the device.
pub struct Split {
    /// `[n, rows * cols]` float pixels in [0, 1].
    pub images: Tensor,
    /// `[n]` int64 class ids.
    pub labels: Tensor,
}

impl Split {
    /// Number of examples.
    pub fn len(&self) -> i64 {
        self.labels.size()[0]
    }

    fn narrow(&self, start: i64, len: i64) -> Split {
        Split { images: self.images.narrow(0, start, len), labels: self.labels.narrow(0, start, len) }
    }
}

/// Training, validation and test splits of an image-classification dataset.
pub struct Dataset {
    /// Training examples (the training file minus the validation split).
    pub train: Split,
    /// The last `validation` examples of the training file, if any.
    pub validation: Option<Split>,
    /// The test file.
    pub test: Split,
    /// Image height.
    pub rows: i64,
    /// Image width.
    pub cols: i64,
    /// Number of classes.
    pub num_classes: i64,
}

const NUM_CLASSES: u8 = 10;

/// Loads the IDX files named by `spec` onto `device` and carves the validation split.
pub fn load(spec: &DataSpec, device: Device) -> Result<Dataset> {
    let train = idx::load_image_set(&spec.dir, "train", NUM_CLASSES)?;
    let test = idx::load_image_set(&spec.dir, "t10k", NUM_CLASSES)?;
    let (rows, cols) = (train.rows as i64, train.cols as i64);
    let to_split = |set: idx::ImageSet, limit: Option<i64>| {
        let n = set.labels.size()[0];
        let n = limit.map_or(n, |l| l.min(n));
        Split { images: set.images.narrow(0, 0, n).to(device), labels: set.labels.narrow(0, 0, n).to(device) }
    };
    let all = to_split(train, spec.train_limit);
    let test = to_split(test, spec.test_limit);
    let n = all.len();
    let v = spec.validation as i64;
    if v >= n {
        bail!("data.validation = {v} leaves no training examples (the training set has {n})");
    }
    let (train, validation) = if v == 0 { (all, None) } else { (all.narrow(0, n - v), Some(all.narrow(n - v, v))) };
    Ok(Dataset { train, validation, test, rows, cols, num_classes: i64::from(NUM_CLASSES) })
}

/// A fresh random order of `n` examples cut into batches of `batch_size` (the last may be
/// smaller). The order comes from libtorch's generator, so seed it first.
pub fn batches(n: i64, batch_size: i64, device: Device) -> impl Iterator<Item = Tensor> {
    let order = Tensor::randperm(n, (Kind::Int64, device));
    (0..n).step_by(batch_size as usize).map(move |start| order.narrow(0, start, batch_size.min(n - start)))
}

/// Translates each image of `[b, rows * cols]` by its own random integer shift of up to
/// `max_shift` pixels in each direction, filling with zeros. Runs on the images' device with a
/// single gather, no per-example loop.
pub fn jitter(images: &Tensor, rows: i64, cols: i64, max_shift: i64) -> Tensor {
    if max_shift == 0 {
        return images.shallow_clone();
    }
    let (b, device) = (images.size()[0], images.device());
    let s = max_shift;
    let (pr, pc) = (rows + 2 * s, cols + 2 * s);
    let padded = images.view([b, rows, cols]).constant_pad_nd([s, s, s, s]).view([b, pr * pc]);
    // Output pixel (r, c) reads padded pixel (r + s - dy, c + s - dx).
    let r = Tensor::arange(rows, (Kind::Int64, device)).view([rows, 1]);
    let c = Tensor::arange(cols, (Kind::Int64, device)).view([1, cols]);
    let base = ((r + s) * pc + c + s).view([1, rows * cols]);
    let dy = Tensor::randint_low(-s, s + 1, [b, 1], (Kind::Int64, device));
    let dx = Tensor::randint_low(-s, s + 1, [b, 1], (Kind::Int64, device));
    padded.gather(1, &(base - dy * pc - dx), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_every_example_once() {
        tch::manual_seed(0);
        let seen: Vec<i64> = batches(10, 4, Device::Cpu).flat_map(|b| Vec::<i64>::try_from(b).unwrap()).collect();
        let sizes: Vec<i64> = batches(10, 4, Device::Cpu).map(|b| b.size()[0]).collect();
        assert_eq!(sizes, [4, 4, 2]);
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn jitter_is_a_zero_filled_translation_within_bounds() {
        // One bright pixel in the middle of a 7x7 image, many copies: every copy must hold the
        // pixel exactly once, moved by at most 2 in each direction, and every shift must occur.
        let (rows, cols, n) = (7i64, 7i64, 400i64);
        let mut img = vec![0f32; 49];
        img[3 * 7 + 3] = 1.0;
        let images = Tensor::from_slice(&img).view([1, 49]).repeat([n, 1]);
        let out = jitter(&images, rows, cols, 2);
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
        let out = jitter(&Tensor::from_slice(&corner).view([1, 49]).repeat([n, 1]), rows, cols, 2);
        let sums = Vec::<f32>::try_from(out.sum_dim_intlist(1, false, Kind::Float)).unwrap();
        assert!(sums.contains(&0.0) && sums.contains(&1.0));
        let last_rows = out.view([n, rows, cols]).narrow(1, 3, 4).sum(Kind::Float);
        assert_eq!(f32::try_from(last_rows).unwrap(), 0.0, "no wrap-around to the far side");
    }
}
