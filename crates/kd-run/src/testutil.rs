//! Helpers shared by unit tests.

use std::path::PathBuf;

/// A fresh directory under the system temp dir, of one test alone, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `<temp>/kd-run-<pid>-<n>-<name>`, `n` counting the directories this process made: no two
    /// tests share one, whatever names they pass. Emptied first (a process of the same pid may
    /// have left it behind).
    pub fn new(name: &str) -> Self {
        static MADE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("kd-run-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    /// Writes `bytes` to `name` inside the directory and returns its path.
    pub fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A format 1.0 `.npy` file of `descr` and `shape` holding `data`.
pub fn npy(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let shape = match shape {
        [n] => format!("({n},)"),
        s => format!("({})", s.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")),
    };
    let header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}\n");
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Value `c` of frame `i` of [`npy_corpus`].
pub fn corpus_value(i: usize, c: usize) -> f32 {
    ((i * 40 + c) % 4099) as f32 * 0.125 - 100.0
}

/// An NPY corpus of `frames` x 40 f32 frames in utterances of 50 to 999 frames: features,
/// labels and lengths files in `dir`.
pub fn npy_corpus(dir: &TempDir, frames: usize) -> crate::config::FileSet {
    let mut lengths = Vec::new();
    let (mut total, mut x) = (0usize, 12345u64);
    while total < frames {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let l = (50 + (x >> 33) as usize % 950).min(frames - total);
        lengths.push(l as i64);
        total += l;
    }
    let feats: Vec<u8> =
        (0..frames).flat_map(|i| (0..40).map(move |c| corpus_value(i, c))).flat_map(f32::to_le_bytes).collect();
    let labels: Vec<u8> = (0..frames as i64).flat_map(|i| (i * 7 % 61).to_le_bytes()).collect();
    let lens: Vec<u8> = lengths.iter().flat_map(|l| l.to_le_bytes()).collect();
    crate::config::FileSet {
        features: dir.write("feats.npy", &npy("<f4", &[frames, 40], &feats)),
        labels: dir.write("labels.npy", &npy("<i8", &[frames], &labels)),
        lengths: Some(dir.write("lengths.npy", &npy("<i8", &[lengths.len()], &lens))),
    }
}
