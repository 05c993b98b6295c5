//! TensorBoard event files: the scalars of a run as TensorBoard reads them live.
//!
//! A run's rank 0 writes `tensorboard/events.out.tfevents.<seconds>.<host>.<pid>` in the run
//! directory, one file per process (a resumed run adds one; TensorBoard reads them all in
//! order), with, for each training stage `s`: `s/train_loss` every [`REPORT_EVERY`] steps (the
//! mean loss of those steps), and per epoch `s/lr`, `s/epoch_train_loss`,
//! `s/train_accuracy`, `s/val_loss`, `s/val_accuracy`, `s/soft_kl`,
//! `s/examples_per_second`, at the global step (epoch x steps per epoch + step).
//!
//! The format is TensorFlow's record file of `Event` protocol buffers, written here rather than
//! through a crate: a few fields of three messages (`Event`: `wall_time` 1, `step` 2,
//! `file_version` 3, `summary` 5; `Summary`: `value` 1; `Summary.Value`: `tag` 1,
//! `simple_value` 2), each record framed as
//!
//! ```text
//! u64 length (little-endian) | u32 masked CRC-32C of the length | data | u32 masked CRC-32C of data
//! masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8
//! ```
//!
//! The file is flushed after every epoch, so a killed run keeps every epoch it finished.
//!
//! [`REPORT_EVERY`]: super::fit::REPORT_EVERY

use anyhow::{Context, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The folder of the event files in a run directory.
pub const FOLDER: &str = "tensorboard";

/// How the name of every event file starts (TensorBoard looks for it).
pub const FILE_PREFIX: &str = "events.out.tfevents.";

/// An event file being written.
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates a new event file in `dir` (created if needed) and writes its version record.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let seconds = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let host: String = host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c)).collect();
        let path = dir.join(format!("{FILE_PREFIX}{seconds}.{host}.{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = EventWriter { file: BufWriter::new(file), path };
        let mut event = wall_time_and_step(0);
        bytes_field(&mut event, 3, b"brain.Event:2");
        w.record(&event)?;
        w.flush()?;
        Ok(w)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds `value` under `tag` at `step` (buffered until [`EventWriter::flush`]).
    pub fn scalar(&mut self, tag: &str, step: i64, value: f64) -> Result<()> {
        let mut value_msg = Vec::new();
        bytes_field(&mut value_msg, 1, tag.as_bytes());
        value_msg.push(2 << 3 | 5); // simple_value, fixed32
        value_msg.extend_from_slice(&(value as f32).to_le_bytes());
        let mut summary = Vec::new();
        bytes_field(&mut summary, 1, &value_msg);
        let mut event = wall_time_and_step(step);
        bytes_field(&mut event, 5, &summary);
        self.record(&event)
    }

    /// Writes what is buffered to the file.
    pub fn flush(&mut self) -> Result<()> {
        self.file.flush().with_context(|| format!("cannot write {}", self.path.display()))
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut out = Vec::with_capacity(data.len() + 16);
        out.extend_from_slice(&len);
        out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        out.extend_from_slice(data);
        out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        self.file.write_all(&out).with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// An `Event` with its `wall_time` (now) and `step`.
fn wall_time_and_step(step: i64) -> Vec<u8> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let mut event = vec![1 << 3 | 1]; // wall_time, fixed64
    event.extend_from_slice(&now.to_le_bytes());
    event.push(2 << 3); // step, varint
    varint(&mut event, step as u64);
    event
}

/// A length-delimited field (wire type 2): a string or an embedded message.
fn bytes_field(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    varint(out, field << 3 | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82f63b78), masked as TensorFlow's records are.
fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0x82f6_3b78 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    !data.iter().fold(!0u32, |c, &b| TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_its_check_value() {
        // The standard check value of CRC-32C, and RFC 3720's test vector of 32 zero bytes.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    }

    #[test]
    fn varints_and_fields_encode_as_protocol_buffers_do() {
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
        let mut f = Vec::new();
        bytes_field(&mut f, 3, b"ab");
        assert_eq!(f, [0x1a, 2, b'a', b'b']);
    }

    #[test]
    fn records_frame_their_data_with_checked_lengths() {
        let dir = crate::testutil::TempDir::new("events");
        let mut w = EventWriter::create(&dir.0).unwrap();
        w.scalar("s/loss", 7, 0.5).unwrap();
        w.flush().unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        // Two records, each: length, its CRC, the data, the data's CRC.
        let mut at = 0;
        let mut records = 0;
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            assert_eq!(
                u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()),
                masked_crc32c(&bytes[at..at + 8])
            );
            let data = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc32c(data));
            at += 16 + len;
            records += 1;
        }
        assert_eq!((at, records), (bytes.len(), 2));
    }
}
