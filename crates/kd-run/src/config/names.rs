//! Experiment and stage names: one safe path component each, and none that a run derives from
//! another stage's name.

use super::experiment::{Job, Stage};

/// The longest experiment or stage name, in characters: with what a run appends to a stage's
/// name in its files (`.<m>.resume.safetensors.<pid>.tmp`), a file name stays far below the 255
/// bytes that file systems allow.
pub const MAX_NAME_LEN: usize = 100;

/// What makes `name` unusable as an experiment or stage name, if anything. A name becomes one
/// component of a path (`OUT/<name>/`, `checkpoints/<stage>.safetensors`), so it may hold only
/// ASCII letters, digits, `_`, `-` and `.`, must start with a letter, digit or `_` (no `.`, `..`
/// or hidden file, nothing a command line takes for an option), and has at most
/// [`MAX_NAME_LEN`] characters. No separator (`/`, `\`), NUL, control character or space can
/// get in.
pub fn name_problem(name: &str) -> Option<String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "_-.".contains(c);
    if name.is_empty() {
        Some("it is empty".into())
    } else if let Some(c) = name.chars().find(|&c| !allowed(c)) {
        Some(format!("{c:?} is not allowed (only ASCII letters, digits, `_`, `-` and `.`)"))
    } else if !name.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
        Some("it must start with a letter, a digit or `_`".into())
    } else if name.chars().count() > MAX_NAME_LEN {
        Some(format!("it has {} characters, more than {MAX_NAME_LEN}", name.chars().count()))
    } else {
        None
    }
}

/// Whether a stage named `name` (a specialists stage if `specialists`) would share a name that a
/// run derives from a stage's name with one of the `earlier` stages. A run derives: the row
/// `<stage>-fixed` (a bias_shift stage's fixed shift; the tables count any `<stage>-fixed` row
/// as `<stage>`'s), the checkpoints `<stage>.resume` and `<stage>.best` (while a stage trains),
/// and for a specialists stage, specialist m's checkpoint, folder and `--only` name `<stage>.<m>`.
pub(crate) fn derived_name_clash(name: &str, specialists: bool, earlier: &[Stage]) -> Option<String> {
    for kind in ["resume", "best"] {
        if name.ends_with(&format!(".{kind}")) {
            return Some(format!(
                "names ending in `.{kind}` are reserved for a stage's {kind} checkpoint `<stage>.{kind}.safetensors`"
            ));
        }
    }
    let fixed_of = |a: &str, b: &str| a.strip_suffix("-fixed") == Some(b);
    let specialist_of = |a: &str, b: &Stage| matches!(b.job, Job::Specialists(_)) && name_is_specialist_of(a, &b.name);
    earlier.iter().find_map(|t| {
        let t_name = t.name.as_str();
        if fixed_of(name, t_name) || fixed_of(t_name, name) {
            let (base, fixed) = if fixed_of(name, t_name) { (t_name, name) } else { (name, t_name) };
            Some(format!(
                "`{fixed}` is the name of the row that stage `{base}` records with its fixed shift (a bias_shift \
                 stage's `fixed_shift`; rows named `<stage>-fixed` belong to `<stage>`), so no stage can have it \
                 beside `{base}`"
            ))
        } else if specialist_of(name, t) {
            Some(format!("`{name}` names a specialist of the specialists stage `{t_name}` (`<stage>.<m>`)"))
        } else if specialists && name_is_specialist_of(t_name, name) {
            Some(format!(
                "stage `{t_name}` has the name of one of this specialists stage's specialists (`<stage>.<m>`)"
            ))
        } else {
            None
        }
    })
}

/// Whether `a` is `<stage>.<m>`, a specialist's name, for the specialists stage `stage`.
pub(crate) fn name_is_specialist_of(a: &str, stage: &str) -> bool {
    a.strip_prefix(stage)
        .and_then(|r| r.strip_prefix('.'))
        .is_some_and(|m| !m.is_empty() && (m.bytes().all(|c| c.is_ascii_digit()) || m.parse::<usize>().is_ok()))
}
