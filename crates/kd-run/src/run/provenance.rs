//! Provenance files of shipped checkpoints: `X.provenance.toml` beside `X.safetensors` says how
//! the checkpoint was made (command, commit, test errors) and holds its SHA-256, which is checked
//! every time the checkpoint is read, so a truncated or replaced file is an error, not a model.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// What a provenance file records.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// Lower-case hex SHA-256 of the checkpoint's bytes.
    pub sha256: String,
    /// The command that trained the model, as run from the repository root.
    pub command: String,
    /// The commit of the code that trained it.
    pub commit: String,
    /// The stage of that run the checkpoint is the final model of.
    pub stage: String,
    /// Its errors on the test set, and the size of the test set.
    pub test_errors: i64,
    pub test_examples: i64,
}

/// The provenance file of a checkpoint: `dir/X.provenance.toml` for `dir/X.safetensors`.
pub fn path_for(checkpoint: &Path) -> PathBuf {
    checkpoint.with_extension("provenance.toml")
}

/// Lower-case hex SHA-256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a checkpoint's bytes (as read from `checkpoint`) against its provenance file when it
/// has one: `Ok(None)` without one, `Ok(Some(_))` when the SHA-256 matches, an error naming both
/// files when it does not.
pub fn verify(checkpoint: &Path, bytes: &[u8]) -> Result<Option<Provenance>> {
    let file = path_for(checkpoint);
    if !file.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
    let record: Provenance =
        toml::from_str(&text).with_context(|| format!("{}: not a provenance file", file.display()))?;
    let actual = sha256_hex(bytes);
    if actual != record.sha256.to_ascii_lowercase() {
        bail!(
            "{} does not match {} (SHA-256 {actual}, expected {}): the file is damaged or was replaced; \
             restore it (`git checkout -- {}`) or retrain it with `{}`",
            checkpoint.display(),
            file.display(),
            record.sha256,
            checkpoint.display(),
            record.command
        );
    }
    Ok(Some(record))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(sha256: &str) -> Provenance {
        Provenance {
            sha256: sha256.into(),
            command: "kd-run run experiments/mnist/headline.toml --only teacher".into(),
            commit: "0123abc".into(),
            stage: "teacher".into(),
            test_errors: 68,
            test_examples: 10000,
        }
    }

    #[test]
    fn a_checkpoint_is_checked_against_its_provenance_file() {
        let temp = crate::testutil::TempDir::new("provenance");
        let dir = temp.0.clone();
        let ckpt = dir.join("teacher.safetensors");
        assert_eq!(path_for(&ckpt), dir.join("teacher.provenance.toml"));

        // No provenance file: nothing to check.
        assert_eq!(verify(&ckpt, b"abc").unwrap(), None);

        // SHA-256("abc"), the FIPS 180-2 test vector.
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_hex(b"abc"), abc);
        std::fs::write(path_for(&ckpt), toml::to_string(&record(abc)).unwrap()).unwrap();
        assert_eq!(verify(&ckpt, b"abc").unwrap(), Some(record(abc)));

        // One byte changed: an error that names both files and the way back.
        let err = format!("{:#}", verify(&ckpt, b"abd").unwrap_err());
        assert!(err.contains("teacher.safetensors") && err.contains("teacher.provenance.toml"), "{err}");
        assert!(err.contains("--only teacher"), "{err}");

        // A provenance file with a key it does not know is rejected, not ignored.
        std::fs::write(path_for(&ckpt), format!("{}extra = 1\n", toml::to_string(&record(abc)).unwrap())).unwrap();
        assert!(format!("{:#}", verify(&ckpt, b"abc").unwrap_err()).contains("not a provenance file"));
    }
}
