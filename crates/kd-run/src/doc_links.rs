//! The repository's Markdown pages link to files that exist and to headings those files have,
//! so that moving a section from one page to another cannot leave a link behind.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The `.md` files of the repository, outside build outputs, runs, dependencies and hidden
/// folders (and not through links).
fn pages(dir: &Path, out: &mut Vec<PathBuf>) {
    const SKIP: &[&str] = &["target", "deps", "runs", "runs-gpu", "stores", "dist", "node_modules"];
    let mut entries: Vec<_> = std::fs::read_dir(dir).expect("read_dir").flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(kind) = entry.file_type() else { continue };
        if kind.is_dir() && !name.starts_with('.') && !SKIP.contains(&name.as_str()) {
            pages(&entry.path(), out);
        } else if kind.is_file() && name.ends_with(".md") {
            out.push(entry.path());
        }
    }
}

/// Whether `line` opens or closes a fenced code block: three backticks or more and an info string
/// without a backtick (a line that starts with "``` `x` ```" is inline code).
fn fence(line: &str) -> bool {
    let line = line.trim_start();
    line.starts_with("```") && !line.trim_start_matches('`').contains('`')
}

/// The page's lines without their inline code spans, and blank inside fenced code blocks (so
/// that the index of a line is its line number less one).
fn prose(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if fence(line) {
            fenced = !fenced;
            lines.push(String::new());
        } else if fenced {
            lines.push(String::new());
        } else {
            lines.push(line.split('`').step_by(2).collect::<Vec<_>>().join(""));
        }
    }
    lines
}

/// GitHub's anchor of a heading: lower case, punctuation other than `-` and `_` dropped (code
/// spans keep their text), spaces as `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a page's headings (a repeated heading gets `-1`, `-2`, ... as on GitHub).
fn anchors(text: &str) -> HashSet<String> {
    let mut seen = HashSet::new();
    let mut fenced = false;
    for line in text.lines() {
        if fence(line) {
            fenced = !fenced;
            continue;
        }
        let Some(heading) = line.strip_prefix('#').map(|h| h.trim_start_matches('#')) else { continue };
        if fenced || !heading.starts_with(' ') {
            continue;
        }
        let base = slug(heading);
        let mut anchor = base.clone();
        let mut n = 0;
        while !seen.insert(anchor.clone()) {
            n += 1;
            anchor = format!("{base}-{n}");
        }
    }
    seen
}

/// The targets of the `[text](target)` links of a line.
fn targets(line: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let Some(end) = after.find(')') else { break };
        out.push(after[..end].trim());
        rest = &after[end..];
    }
    out
}

#[test]
fn every_relative_link_of_every_page_leads_to_a_file_and_heading_that_exist() {
    let root = root();
    let mut files = Vec::new();
    pages(&root, &mut files);
    assert!(files.iter().any(|f| f.ends_with("docs/README.md")), "the docs index is among the pages");
    let mut broken = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read page");
        for (i, line) in prose(&text).iter().enumerate() {
            for target in targets(line) {
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                let (path, anchor) = target.split_once('#').unwrap_or((target, ""));
                let linked = if path.is_empty() { file.clone() } else { file.parent().unwrap().join(path) };
                let shown = format!("{}:{}: {target}", file.strip_prefix(&root).unwrap_or(file).display(), i + 1);
                if !linked.exists() {
                    broken.push(format!("{shown} (no such file)"));
                } else if !anchor.is_empty() {
                    if linked.extension().is_none_or(|e| e != "md") {
                        continue;
                    }
                    let page = std::fs::read_to_string(&linked).expect("read linked page");
                    if !anchors(&page).contains(anchor) {
                        broken.push(format!("{shown} (no heading with that anchor)"));
                    }
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_docs_index_links_every_page_of_docs() {
    let docs = root().join("docs");
    let index = std::fs::read_to_string(docs.join("README.md")).expect("docs/README.md");
    let linked: HashSet<PathBuf> = prose(&index)
        .iter()
        .flat_map(|l| targets(l).into_iter().map(|t| t.split('#').next().unwrap_or("").to_string()).collect::<Vec<_>>())
        .map(|t| docs.join(t))
        .collect();
    let mut files = Vec::new();
    pages(&docs, &mut files);
    let missing: Vec<_> = files
        .iter()
        .filter(|f| !f.ends_with("docs/README.md") && !linked.contains(*f))
        .map(|f| f.strip_prefix(&docs).unwrap_or(f).display().to_string())
        .collect();
    assert!(missing.is_empty(), "docs/README.md does not link these pages: {missing:?}");
}

#[test]
fn slugs_are_those_github_makes() {
    assert_eq!(slug("Measured here (2 cores, shared)"), "measured-here-2-cores-shared");
    assert_eq!(slug("`[data.speech]`"), "dataspeech");
    assert_eq!(slug("The `kd-run` command"), "the-kd-run-command");
    assert_eq!(slug("Estimate: the 8 x 2560 acoustic DNN"), "estimate-the-8-x-2560-acoustic-dnn");
    let repeated = anchors("# A\n## A\n```\n# not a heading\n```\n#notaheading\n``` `x` ```\n# B\n");
    assert!(fence("```toml") && fence("  ```") && !fence("``` `x` ```"));
    assert_eq!(repeated, HashSet::from(["a".to_string(), "a-1".to_string(), "b".to_string()]));
}
