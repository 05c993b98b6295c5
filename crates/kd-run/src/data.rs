//! Datasets held on the training device, their splits, minibatch order and jitter.

use crate::config::{DataSpec, SpeechSpec};
use crate::idx;
use crate::speech;
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

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
}

const NUM_CLASSES: u8 = 10;

/// Loads the dataset named by `spec` onto `device` and carves the validation split.
pub fn load(spec: &DataSpec, device: Device) -> Result<Dataset> {
    match &spec.speech {
        Some(speech) => load_speech(speech, device),
        None => load_images(spec, device),
    }
}

fn load_images(spec: &DataSpec, device: Device) -> Result<Dataset> {
    let dir = spec.dir.as_deref().unwrap_or(std::path::Path::new("data/mnist"));
    let train = idx::load_image_set(dir, "train", NUM_CLASSES)?;
    let test = idx::load_image_set(dir, "t10k", NUM_CLASSES)?;
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
    Ok(Dataset { train, validation, test, geometry: Some((rows, cols)), num_classes: i64::from(NUM_CLASSES) })
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
    let train = frames(&train)?;
    let (mean, std) = speech::normalization(&train);
    let width = spec.left + 1 + spec.right;
    let (mean, std) = (mean.repeat([width]).view([1, -1]), std.clamp_min(1e-6).repeat([width]).view([1, -1]));
    let split = |set: speech::FrameSet| Split {
        images: set.features.shallow_clone(),
        labels: set.labels.shallow_clone(),
        windows: Some(Windows { frames: set, left: spec.left, right: spec.right, mean: mean.copy(), std: std.copy() }),
    };
    Ok(Dataset {
        train: split(train),
        validation: Some(split(frames(&dev)?)),
        test: split(frames(&test)?),
        geometry: None,
        num_classes: spec.corpus.states as i64,
    })
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
