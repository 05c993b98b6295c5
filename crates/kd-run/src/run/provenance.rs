//! Provenance files of shipped checkpoints: `X.provenance.toml` beside `X.safetensors` says how
//! the checkpoint was made (command, commit, test errors) and holds its SHA-256, which is checked
//! every time the checkpoint is read, so a truncated or replaced file is an error, not a model.
//! A record that cannot be read is an error, a renamed checkpoint is matched to the record it
//! left behind by its hash, and an experiment can pin a checkpoint's SHA-256 itself (`sha256`).

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

/// How a checkpoint's bytes were checked by [`verify`].
#[derive(Debug, PartialEq)]
pub enum Checked {
    /// Against this provenance record, read from this file: the one beside the checkpoint, or
    /// another in its folder whose hash is the checkpoint's (the checkpoint renamed).
    Record(Provenance, PathBuf),
    /// Against the SHA-256 the experiment pins, the checkpoint having no record.
    Pinned,
    /// Not at all: no record, no pin. The hash is computed for the caller's warning.
    Unchecked {
        /// Lower-case hex SHA-256 of the bytes.
        sha256: String,
    },
}

/// Checks a checkpoint's bytes (as read from `checkpoint`) against the SHA-256 the experiment
/// pins (`pin`) and against its provenance record:
///
/// - a pin that does not match is an error naming the file and both hashes;
/// - the record beside it (`X.provenance.toml`) is read and must match; one that is a
///   directory, a dangling link, unreadable or not a provenance file is an error naming it;
/// - without one (and without a matching pin), the folder's other records are looked at: one
///   whose SHA-256 is the checkpoint's verifies it (a renamed checkpoint); a record whose own
///   checkpoint is not there (`Y.provenance.toml` without `Y.safetensors`) makes an unmatched
///   checkpoint an error, since it may be that checkpoint renamed and damaged;
/// - otherwise the checkpoint has no record: [`Checked::Unchecked`].
pub fn verify(checkpoint: &Path, bytes: &[u8], pin: Option<&str>) -> Result<Checked> {
    let mut hash = None;
    let mut actual = || hash.get_or_insert_with(|| sha256_hex(bytes)).clone();
    if let Some(pin) = pin {
        let actual = actual();
        if actual != pin.to_ascii_lowercase() {
            bail!(
                "{} is not the file the experiment pins: its SHA-256 is {actual}, the stage's `sha256` is {pin}; \
                 restore the file, or pin the new one if it is meant to change",
                checkpoint.display()
            );
        }
    }
    let file = path_for(checkpoint);
    if let Some(record) = read_record(&file, checkpoint)? {
        let actual = actual();
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
        return Ok(Checked::Record(record, file));
    }
    if pin.is_some() {
        return Ok(Checked::Pinned);
    }
    let folder = match checkpoint.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut orphans = Vec::new();
    // A folder that cannot be listed has no records to find.
    for entry in std::fs::read_dir(folder).into_iter().flatten().flatten().take(MAX_FOLDER_ENTRIES) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".provenance.toml") else { continue };
        let other = folder.join(&name);
        let read = read_record(&other, &folder.join(format!("{stem}.safetensors")));
        if let Ok(Some(record)) = &read {
            if record.sha256.eq_ignore_ascii_case(&actual()) {
                tracing::info!(
                    "{} has no provenance file of its own name; its SHA-256 is that recorded in {}",
                    checkpoint.display(),
                    other.display()
                );
                return Ok(Checked::Record(record.clone(), other));
            }
        }
        if std::fs::symlink_metadata(folder.join(format!("{stem}.safetensors"))).is_err() {
            orphans.push(other);
        }
    }
    if let Some(orphan) = orphans.first() {
        bail!(
            "{} has no provenance file ({}), and {} beside it records a checkpoint that is not there: if {} is that \
             checkpoint renamed, it does not match the record (SHA-256 {}); restore the file and its name, or move the \
             record away if it belongs to no file here",
            checkpoint.display(),
            file.display(),
            orphan.display(),
            checkpoint.display(),
            actual()
        );
    }
    Ok(Checked::Unchecked { sha256: actual() })
}

/// Entries of a checkpoint's folder looked at for records of a renamed checkpoint.
const MAX_FOLDER_ENTRIES: usize = 100_000;

/// The provenance record at `file` (of `checkpoint`): `None` when nothing is there; an error
/// naming it when it is a directory, a dangling link, not a regular file, unreadable or not a
/// provenance file.
fn read_record(file: &Path, checkpoint: &Path) -> Result<Option<Provenance>> {
    let (shown, of) = (file.display(), checkpoint.display());
    match std::fs::symlink_metadata(file) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => bail!("cannot inspect {shown}, the provenance file of {of}: {e}"),
        Ok(_) => {}
    }
    let meta = std::fs::metadata(file).map_err(|e| {
        anyhow::anyhow!("{shown}, the provenance file of {of}, is a symbolic link to nothing ({e}); restore its target or remove it")
    })?;
    if meta.is_dir() {
        bail!("{shown}, the provenance file of {of}, is a directory; the SHA-256 of {of} cannot be checked");
    }
    if !meta.is_file() {
        bail!("{shown}, the provenance file of {of}, is not a regular file; the SHA-256 of {of} cannot be checked");
    }
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {shown}, the provenance file of {of}"))?;
    let record: Provenance = toml::from_str(&text).with_context(|| format!("{shown}: not a provenance file"))?;
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
        assert!(matches!(verify(&ckpt, b"abc", None).unwrap(), Checked::Unchecked { .. }));

        // SHA-256("abc"), the FIPS 180-2 test vector.
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_hex(b"abc"), abc);
        std::fs::write(path_for(&ckpt), toml::to_string(&record(abc)).unwrap()).unwrap();
        assert_eq!(verify(&ckpt, b"abc", None).unwrap(), Checked::Record(record(abc), path_for(&ckpt)));

        // One byte changed: an error that names both files and the way back.
        let err = format!("{:#}", verify(&ckpt, b"abd", None).unwrap_err());
        assert!(err.contains("teacher.safetensors") && err.contains("teacher.provenance.toml"), "{err}");
        assert!(err.contains("--only teacher"), "{err}");

        // A provenance file with a key it does not know is rejected, not ignored.
        std::fs::write(path_for(&ckpt), format!("{}extra = 1\n", toml::to_string(&record(abc)).unwrap())).unwrap();
        assert!(format!("{:#}", verify(&ckpt, b"abc", None).unwrap_err()).contains("not a provenance file"));
    }

    /// SHA-256("abc").
    const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn a_record_that_cannot_be_read_is_an_error_naming_it() {
        let temp = crate::testutil::TempDir::new("provenance-unreadable");
        let ckpt = temp.0.join("teacher.safetensors");
        let record = path_for(&ckpt);
        std::fs::create_dir(&record).unwrap();
        let err = format!("{:#}", verify(&ckpt, b"abc", None).unwrap_err());
        assert!(err.contains("teacher.provenance.toml") && err.contains("is a directory"), "{err}");
        std::fs::remove_dir(&record).unwrap();
        std::os::unix::fs::symlink(temp.0.join("gone.toml"), &record).unwrap();
        let err = format!("{:#}", verify(&ckpt, b"abc", None).unwrap_err());
        assert!(err.contains("teacher.provenance.toml") && err.contains("symbolic link to nothing"), "{err}");
        // A pin that matches does not excuse a record that cannot be read.
        assert!(verify(&ckpt, b"abc", Some(ABC)).is_err());
    }

    #[test]
    fn a_renamed_checkpoint_is_checked_against_the_record_it_left_behind() {
        let temp = crate::testutil::TempDir::new("provenance-renamed");
        let dir = &temp.0;
        std::fs::write(dir.join("teacher.provenance.toml"), toml::to_string(&record(ABC)).unwrap()).unwrap();
        // `teacher.safetensors` renamed `copy.safetensors`: the record beside it is found by hash.
        let copy = dir.join("copy.safetensors");
        assert_eq!(
            verify(&copy, b"abc", None).unwrap(),
            Checked::Record(record(ABC), dir.join("teacher.provenance.toml"))
        );
        // Renamed and damaged: the record whose checkpoint is gone makes it an error.
        let err = format!("{:#}", verify(&copy, b"abd", None).unwrap_err());
        assert!(err.contains("copy.safetensors") && err.contains("teacher.provenance.toml"), "{err}");
        // With the record's own checkpoint present, another file of the folder is not its copy.
        std::fs::write(dir.join("teacher.safetensors"), b"abc").unwrap();
        assert!(matches!(verify(&copy, b"abd", None).unwrap(), Checked::Unchecked { .. }));
    }

    #[test]
    fn a_pinned_hash_must_match() {
        let temp = crate::testutil::TempDir::new("provenance-pinned");
        let ckpt = temp.0.join("model.safetensors");
        assert_eq!(verify(&ckpt, b"abc", Some(ABC)).unwrap(), Checked::Pinned);
        assert_eq!(verify(&ckpt, b"abc", Some(&ABC.to_ascii_uppercase())).unwrap(), Checked::Pinned);
        let err = format!("{:#}", verify(&ckpt, b"abd", Some(ABC)).unwrap_err());
        assert!(err.contains("model.safetensors") && err.contains(ABC) && err.contains(&sha256_hex(b"abd")), "{err}");
        assert_eq!(verify(&ckpt, b"abd", None).unwrap(), Checked::Unchecked { sha256: sha256_hex(b"abd") });
    }
}
