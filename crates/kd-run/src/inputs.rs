//! Checks shared by the readers of input files, so that their errors say what is actually wrong
//! (a directory, a dangling link, an empty file) and never echo a whole line of bad input.

use std::path::Path;

use anyhow::{bail, Result};

/// Most characters of input quoted in an error message; longer text is cut by [`clip`].
pub const MAX_ECHO: usize = 200;

/// Fails, naming `path` and calling it `what` (e.g. "IDX file", "checkpoint"), unless it is an
/// existing regular file (or a link to one): a directory, a dangling symbolic link, a device or a
/// missing file each get their own message.
pub fn check_file(path: &Path, what: &str) -> Result<()> {
    let shown = path.display();
    let link = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!("{what} {shown} does not exist"),
        Err(e) => bail!("cannot read {what} {shown}: {e}"),
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(_) if link.file_type().is_symlink() => {
            let target = std::fs::read_link(path).map(|t| t.display().to_string()).unwrap_or_default();
            bail!("{what} {shown} is a symbolic link to '{target}', which does not exist")
        }
        Err(e) => bail!("cannot read {what} {shown}: {e}"),
    };
    if meta.is_dir() {
        bail!("{what} {shown} is a directory, not a file");
    }
    if !meta.is_file() {
        bail!("{what} {shown} is not a regular file (a device, socket or pipe)");
    }
    Ok(())
}

/// `text` if it has at most `max` characters, else its first `max` characters and a mark
/// saying how much was cut: `aaaa... (1234 more characters)`.
pub fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_string(),
        Some((cut, _)) => format!("{}... ({} more characters)", &text[..cut], text[cut..].chars().count()),
    }
}

/// [`clip`] applied to every line of `text`.
pub fn clip_lines(text: &str, max: usize) -> String {
    text.lines().map(|l| clip(l, max)).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    #[test]
    fn clip_marks_the_cut() {
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(clip("abcdef", 3), "abc... (3 more characters)");
        assert_eq!(clip("ééééé", 2), "éé... (3 more characters)");
        assert_eq!(clip_lines("abcdef\nxy\n", 4), "abcd... (2 more characters)\nxy");
    }

    #[test]
    fn check_file_says_what_is_wrong() {
        let dir = TempDir::new("inputs-check");
        let file = dir.write("f", b"x");
        check_file(&file, "IDX file").expect("a regular file");
        let msg = |p: &Path| format!("{:#}", check_file(p, "IDX file").expect_err("not a file"));
        assert_eq!(msg(&dir.0.join("absent")), format!("IDX file {} does not exist", dir.0.join("absent").display()));
        assert!(msg(&dir.0).ends_with("is a directory, not a file"), "{}", msg(&dir.0));
        let link = dir.0.join("link");
        std::os::unix::fs::symlink(dir.0.join("nowhere"), &link).expect("symlink");
        assert!(msg(&link).contains("is a symbolic link to") && msg(&link).contains("nowhere', which does not exist"));
        assert!(msg(Path::new("/dev/null")).contains("not a regular file"));
        let good_link = dir.0.join("good");
        std::os::unix::fs::symlink(&file, &good_link).expect("symlink");
        check_file(&good_link, "IDX file").expect("a link to a file");
    }
}
