//! Paths in experiment files: a relative path is taken relative to the folder of the file that
//! holds it (a `--set` value: relative to the working directory), and resolved experiments
//! hold them absolute, so that a run's `config.toml` means the same files from any directory.

use std::path::{Component, Path, PathBuf};

/// The keys whose values are paths, wherever they appear (`data.dir`, `data.store.dir`, the
/// `features`, `labels` and `lengths` of `data.files`, a stage's checkpoint keys).
pub(crate) const PATH_KEYS: [&str; 6] = ["dir", "checkpoint", "teacher_checkpoint", "features", "labels", "lengths"];

/// `path` made absolute against `base` (itself absolute), with `.` and `..` components
/// removed lexically: `/repo/experiments` and `../data/mnist` give `/repo/data/mnist`.
pub(crate) fn absolute(base: &Path, path: &Path) -> PathBuf {
    let joined = if path.is_absolute() { path.to_path_buf() } else { base.join(path) };
    let mut out = PathBuf::new();
    for part in joined.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                if matches!(out.components().next_back(), Some(Component::Normal(_))) {
                    out.pop();
                } else if !out.has_root() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// Makes the relative paths in a `--set` value absolute against `base` (the working
/// directory): the value of a path key, or the path keys inside a table given as the value.
pub(crate) fn absolutize_value(key: &str, value: &mut toml::Value, base: &Path) {
    match value {
        toml::Value::String(s) if PATH_KEYS.contains(&key) => {
            *s = absolute(base, Path::new(s.as_str())).to_string_lossy().into_owned();
        }
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                absolutize_value(k, v, base);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_joined_and_normalized_lexically() {
        let base = Path::new("/repo/experiments/mnist");
        assert_eq!(absolute(base, Path::new("../../data/mnist")), Path::new("/repo/data/mnist"));
        assert_eq!(absolute(base, Path::new("./t.safetensors")), Path::new("/repo/experiments/mnist/t.safetensors"));
        assert_eq!(absolute(base, Path::new("/abs/x")), Path::new("/abs/x"));
        assert_eq!(absolute(Path::new("/"), Path::new("../x")), Path::new("/x"));
    }

    #[test]
    fn set_values_of_path_keys_are_made_absolute() {
        let mut v = toml::Value::String("d/mnist".into());
        absolutize_value("dir", &mut v, Path::new("/work"));
        assert_eq!(v.as_str(), Some("/work/d/mnist"));
        let mut t: toml::Value = toml::from_str::<toml::Table>("features = \"f.npy\"\nlabels = \"/l.npy\"\nx = \"y\"")
            .map(toml::Value::Table)
            .unwrap();
        absolutize_value("train", &mut t, Path::new("/work"));
        assert_eq!(t["features"].as_str(), Some("/work/f.npy"));
        assert_eq!(t["labels"].as_str(), Some("/l.npy"));
        assert_eq!(t["x"].as_str(), Some("y"), "not a path key");
        let mut name = toml::Value::String("run".into());
        absolutize_value("name", &mut name, Path::new("/work"));
        assert_eq!(name.as_str(), Some("run"));
    }
}
