//! The teacher-output cache in `OUT/.cache/`: entries keyed by the SHA-256 of the checkpoint's
//! bytes and the transfer set, each checksummed, so that a damaged entry is computed again instead of
//! read.

use super::output;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Name of the checksum tensor of a cache entry: per tensor of the entry, the first 8 bytes of
/// the SHA-256 of its values.
pub(super) const CHECKSUM_KEY: &str = "__checksum__";

/// The first 8 bytes of the SHA-256 of a tensor's values as little-endian bytes (i64, or else
/// as f32), on the CPU.
pub(super) fn tensor_checksum(t: &Tensor) -> Result<i64> {
    let flat = t.detach().to_device(Device::Cpu).contiguous().flatten(0, -1);
    let bytes: Vec<u8> = match t.kind() {
        Kind::Int64 => Vec::<i64>::try_from(&flat)?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        _ => Vec::<f32>::try_from(&flat.to_kind(Kind::Float))?.iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    let digest = Sha256::digest(&bytes);
    Ok(i64::from_le_bytes(digest[..8].try_into().expect("8 bytes")))
}

/// Writes a cache entry: the tensors and, under [`CHECKSUM_KEY`], a checksum of each.
pub(super) fn write_cache(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<()> {
    let sums = tensors.iter().map(|(_, t)| tensor_checksum(t)).collect::<Result<Vec<i64>>>()?;
    let mut named: Vec<(String, Tensor)> = tensors.iter().map(|(n, t)| (n.to_string(), t.shallow_clone())).collect();
    named.push((CHECKSUM_KEY.to_string(), Tensor::from_slice(&sums)));
    output::save_tensors(path, &named)
}

/// Reads a cache entry written by [`write_cache`]: the tensors `expected` names, if the entry
/// exists and each has its shape and its checksum. A damaged entry (unreadable,
/// truncated, altered, or from before entries were checksummed) is reported in the log and
/// taken as absent, so that it is computed and written again.
///
/// In a data-parallel run the entry is read only if every rank could read it; otherwise every
/// rank computes it (each its share), so that all take part in the same collectives.
pub(super) fn read_cache(path: &Path, expected: &[(&str, &[i64])]) -> Result<Option<Vec<Tensor>>> {
    let found = read_entry(path, expected);
    Ok(if crate::dist::world().all(found.is_some())? { found } else { None })
}

fn read_entry(path: &Path, expected: &[(&str, &[i64])]) -> Option<Vec<Tensor>> {
    if !path.exists() {
        return None;
    }
    let check = || -> Result<Vec<Tensor>> {
        let named = output::load_tensors(path)?;
        let get = |name: &str| named.iter().find(|(n, _)| n == name).map(|(_, t)| t.shallow_clone());
        let sums = get(CHECKSUM_KEY).context("it has no checksum")?;
        let sums = Vec::<i64>::try_from(&sums).context("its checksum is not a list of integers")?;
        if sums.len() != expected.len() {
            bail!("it has {} checksums for {} tensors", sums.len(), expected.len());
        }
        expected
            .iter()
            .zip(sums)
            .map(|((name, shape), sum)| {
                let t = get(name).with_context(|| format!("it has no `{name}`"))?;
                if t.size() != *shape {
                    bail!("`{name}` has shape {:?}, expected {shape:?}", t.size());
                }
                if tensor_checksum(&t)? != sum {
                    bail!("`{name}` does not match its checksum");
                }
                Ok(t)
            })
            .collect()
    };
    match check() {
        Ok(tensors) => Some(tensors),
        Err(e) => {
            tracing::warn!("the cache entry {} is damaged ({e:#}): computing it again", path.display());
            None
        }
    }
}

/// The key of a cache entry: the SHA-256 of several byte strings, each preceded by its length
/// (so that no two lists of parts share a key by where they split), in hexadecimal.
pub(super) fn content_key(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}
