//! docs/experiment-files.md against the parser's own declaration of the keys: the field lists
//! serde derives from the `Raw*` structs (the lists it names in "unknown field" errors), the
//! stage kinds of `STAGE_KEYS`, the variants of the `kind`-like enums, and the defaults the
//! resolution applies. The page cannot fall behind a key that is added, renamed or removed.

use super::experiment::{Affinity, DataKind, FileSet, Objective, OptimizerKind, PaperFigures, Precision, ScheduleKind};
use super::raw::*;
use super::speech::CorpusConfig;
use super::*;
use serde::de::{self, Deserializer, Visitor};
use std::collections::BTreeSet;

/// What a derived `Deserialize` hands its deserializer: a struct's field names or an enum's
/// variant names, in declaration order (skipped fields left out, renames applied).
enum Names {
    Fields(&'static [&'static str]),
    Variants(&'static [&'static str]),
}

/// A deserializer that records the names and fails: driving `T::deserialize` with it reads the
/// list serde generated for `T`, the one its "unknown field" errors list.
struct Capture(Option<Names>);

impl<'de> Deserializer<'de> for &mut Capture {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct or an enum"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Self::Error> {
        self.0 = Some(Names::Fields(fields));
        Err(de::Error::custom("captured"))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        variants: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Self::Error> {
        self.0 = Some(Names::Variants(variants));
        Err(de::Error::custom("captured"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
        unit unit_struct newtype_struct seq tuple tuple_struct map identifier ignored_any
    }
}

/// The keys a table of type `T` accepts.
fn fields<T: for<'de> serde::Deserialize<'de>>() -> Vec<&'static str> {
    let mut capture = Capture(None);
    let _ = T::deserialize(&mut capture);
    match capture.0 {
        Some(Names::Fields(f)) => f.to_vec(),
        _ => panic!("{} does not deserialize as a struct", std::any::type_name::<T>()),
    }
}

/// The values an enum `T` accepts.
fn variants<T: for<'de> serde::Deserialize<'de>>() -> Vec<&'static str> {
    let mut capture = Capture(None);
    let _ = T::deserialize(&mut capture);
    match capture.0 {
        Some(Names::Variants(v)) => v.to_vec(),
        _ => panic!("{} does not deserialize as an enum", std::any::type_name::<T>()),
    }
}

fn page() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/experiment-files.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The cells of a Markdown table row, split at the `|`s that are not escaped (`\|`), as GitHub
/// splits them (also inside code spans), with `\|` read as `|`.
fn cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|');
    let inner = inner.strip_suffix('|').filter(|s| !s.ends_with('\\')).unwrap_or(inner);
    let mut out = vec![String::new()];
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                out.last_mut().unwrap().push('|');
                chars.next();
            }
            '|' => out.push(String::new()),
            c => out.last_mut().unwrap().push(c),
        }
    }
    out.into_iter().map(|c| c.trim().to_string()).collect()
}

/// The code spans of a cell, in order.
fn code(cell: &str) -> Vec<&str> {
    cell.split('`').skip(1).step_by(2).collect()
}

/// One table of the page's "Keys" section: its `###` heading, its header and its rows.
struct Table {
    heading: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn column(&self, name: &str) -> usize {
        self.header
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("`{}` has no column `{name}`", self.heading))
    }

    /// The row of `key` (the code span that is the whole first cell).
    fn row(&self, key: &str) -> &[String] {
        self.rows
            .iter()
            .find(|r| r[0] == format!("`{key}`"))
            .unwrap_or_else(|| panic!("`{}` has no row `{key}`", self.heading))
    }
}

/// The tables under `## Keys`, up to the next `## ` heading.
fn key_tables(page: &str) -> Vec<Table> {
    let start = page.find("\n## Keys\n").expect("the page has a `## Keys` section");
    let section = &page[start + 1..];
    let end = section[1..].find("\n## ").map_or(section.len(), |i| i + 1);
    let mut tables: Vec<Table> = Vec::new();
    for line in section[..end].lines() {
        if let Some(h) = line.strip_prefix("### ") {
            tables.push(Table { heading: h.trim().to_string(), header: Vec::new(), rows: Vec::new() });
        } else if line.starts_with('|') {
            let table = tables.last_mut().expect("a table under `## Keys` before any `###` heading");
            let row = cells(line);
            if table.header.is_empty() {
                table.header = row;
            } else if !row.iter().all(|c| c.chars().all(|c| c == '-' || c == ':')) {
                assert_eq!(row.len(), table.header.len(), "`{}`: a row of another width: {line}", table.heading);
                table.rows.push(row);
            }
        }
    }
    tables
}

/// Each table of the page: its heading and the keys its file table accepts, from the structs
/// the parser fills.
fn declared() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        ("Top level", fields::<RawExperiment>()),
        ("`[checkpoint]`", fields::<RawCheckpoint>()),
        ("`[data]`", fields::<RawData>()),
        ("`[data.speech]`", fields::<CorpusConfig>()),
        ("`[data.files]`", fields::<RawFiles>()),
        ("A split of `[data.files]`", fields::<FileSet>()),
        ("`[data.store]`", fields::<RawStore>()),
        ("`[defaults]`", fields::<RawTraining>()),
        ("`optimizer`", fields::<RawOptimizer>()),
        ("`schedule`", fields::<RawSchedule>()),
        ("`early_stopping`", fields::<RawEarlyStopping>()),
        ("`[[stages]]`", fields::<RawStage>()),
        ("`model`", fields::<RawModel>()),
        ("`sweep`", fields::<RawSweep>()),
        ("`shifts`", fields::<RawShifts>()),
        ("`kmeans`", fields::<RawKMeans>()),
        ("`paper`", fields::<PaperFigures>()),
    ]
}

#[test]
fn the_field_lists_are_those_of_the_parser() {
    // The capture reads what the parser itself rejects unknown keys against.
    let err = toml::from_str::<RawCheckpoint>("every_step = 1").err().expect("an unknown key is an error").to_string();
    for f in fields::<RawCheckpoint>() {
        assert!(err.contains(&format!("`{f}`")), "{err}");
    }
    assert_eq!(fields::<RawShifts>(), ["min", "max", "step"]);
    // A skipped field (`point`, set by sweep expansion) is no key.
    assert!(fields::<RawStage>().starts_with(&["name", "kind", "model"]) && !fields::<RawStage>().contains(&"point"));
    assert_eq!(variants::<OptimizerKind>(), ["sgd", "adam"]);
}

#[test]
fn the_page_documents_every_key_of_every_table_and_no_other() {
    let tables = key_tables(&page());
    let declared = declared();
    let headings: Vec<&str> = tables.iter().map(|t| t.heading.as_str()).collect();
    let expected: Vec<&str> = declared.iter().map(|(h, _)| *h).collect();
    assert_eq!(headings, expected, "the `###` tables under `## Keys`, in order");
    for (table, (_, keys)) in tables.iter().zip(&declared) {
        assert_eq!(table.header[0], "key", "`{}`", table.heading);
        let mut documented = Vec::new();
        for row in &table.rows {
            let spans = code(&row[0]);
            assert!(
                spans.len() == 1 && row[0] == format!("`{}`", spans[0]),
                "`{}`: the first cell of a row is one key as code, got `{}`",
                table.heading,
                row[0]
            );
            documented.push(spans[0]);
        }
        let unique: BTreeSet<&str> = documented.iter().copied().collect();
        assert_eq!(unique.len(), documented.len(), "`{}` lists a key twice: {documented:?}", table.heading);
        let accepted: BTreeSet<&str> = keys.iter().copied().collect();
        let missing: Vec<_> = accepted.difference(&unique).collect();
        let unknown: Vec<_> = unique.difference(&accepted).collect();
        assert!(
            missing.is_empty() && unknown.is_empty(),
            "`{}`: keys the parser accepts but the page omits: {missing:?}; keys the page lists but the parser \
             rejects: {unknown:?}",
            table.heading
        );
    }
}

#[test]
fn the_page_gives_each_stage_key_the_kinds_that_accept_it() {
    let tables = key_tables(&page());
    let stages = tables.iter().find(|t| t.heading == "`[[stages]]`").expect("a `[[stages]]` table");
    let column = stages.column("stage kinds");
    let all: BTreeSet<&str> = variants::<StageKind>().into_iter().collect();
    for row in &stages.rows {
        let key = code(&row[0])[0];
        let written: BTreeSet<&str> =
            if row[column] == "every kind" { all.clone() } else { code(&row[column]).into_iter().collect() };
        let accepted: BTreeSet<&str> = match STAGE_KEYS.iter().find(|k| k.key == key) {
            Some(k) => k.kinds.iter().map(|kind| kind.as_str()).collect(),
            // `name` and `kind`: every stage has them.
            None => all.clone(),
        };
        assert_eq!(written, accepted, "the stage kinds of `{key}`");
    }
}

#[test]
fn the_page_names_every_value_of_each_kind_like_key() {
    let tables = key_tables(&page());
    let meaning = |heading: &str, key: &str| {
        let table = tables.iter().find(|t| t.heading == heading).unwrap_or_else(|| panic!("no table `{heading}`"));
        table.row(key)[table.column("meaning")].clone()
    };
    let enums = [
        ("Top level", "precision", variants::<Precision>()),
        ("`[data]`", "kind", variants::<DataKind>()),
        ("`[[stages]]`", "kind", variants::<StageKind>()),
        ("`[[stages]]`", "affinity", variants::<Affinity>()),
        ("`[[stages]]`", "objective", variants::<Objective>()),
        ("`optimizer`", "kind", variants::<OptimizerKind>()),
        ("`schedule`", "kind", variants::<ScheduleKind>()),
    ];
    for (heading, key, values) in enums {
        let text = meaning(heading, key);
        let named: BTreeSet<&str> = code(&text).into_iter().collect();
        for v in values {
            assert!(named.contains(v), "{heading} `{key}`: the value `{v}` is not named: {text}");
        }
    }
}

/// Experiments that leave every key with a default unset, for [`documented_defaults_are_the_defaults`].
const PLAIN: &str = r#"
name = "defaults"
[data]
dir = "mnist"
[defaults]
epochs = 1
batch_size = 10
optimizer = { kind = "sgd", lr = 0.1 }
[[stages]]
name = "train"
kind = "train"
model = { hidden = [4] }
"#;

const EVERY_KIND: &str = r#"
name = "defaults"
[data]
dir = "mnist"
validation = 100
[defaults]
epochs = 1
batch_size = 10
optimizer = { kind = "sgd", lr = 0.1 }
schedule = { kind = "constant" }
[[stages]]
name = "train"
kind = "train"
model = { hidden = [4] }
[[stages]]
name = "adam"
kind = "train"
model = { hidden = [4] }
optimizer = { kind = "adam", lr = 0.001 }
[[stages]]
name = "distill"
kind = "distill"
teacher = "train"
model = { hidden = [4] }
temperature = 2
[[stages]]
name = "evaluate"
kind = "evaluate"
from = "train"
[[stages]]
name = "bias_shift"
kind = "bias_shift"
from = "train"
classes = [3]
shifts = { min = 0.0, max = 1.0, step = 0.5 }
[[stages]]
name = "ensemble"
kind = "ensemble"
members = ["train", "adam"]
[[stages]]
name = "clusters"
kind = "clusters"
from = "train"
clusters = 3
[[stages]]
name = "specialists"
kind = "specialists"
from = "train"
subsets = "clusters"
"#;

const SPEECH: &str = r#"
name = "defaults"
[data]
kind = "speech"
[defaults]
epochs = 1
batch_size = 10
optimizer = { kind = "sgd", lr = 0.1 }
[[stages]]
name = "train"
kind = "train"
model = { hidden = [4] }
"#;

const STORE: &str = r#"
name = "defaults"
[data]
kind = "store"
store = { dir = "stores" }
[defaults]
epochs = 1
batch_size = 10
optimizer = { kind = "sgd", lr = 0.1 }
[[stages]]
name = "train"
kind = "train"
model = { hidden = [4] }
"#;

/// Loads `text` from a file of its own in a fresh folder, with `overrides`.
fn load_text(dir: &std::path::Path, text: &str, overrides: &[String]) -> Result<Experiment> {
    let path = dir.join("experiment.toml");
    std::fs::write(&path, text)?;
    load(&path, overrides)
}

#[test]
fn documented_defaults_are_the_defaults() {
    let tables = key_tables(&page());
    let dir = crate::testutil::TempDir::new("doc-defaults");
    let mut checked = 0;
    for table in &tables {
        let default = table.column("default");
        for row in &table.rows {
            let key = code(&row[0])[0];
            // Only a default written as code is a value; the others describe what happens.
            let cell = &row[default];
            if !cell.starts_with('`') {
                continue;
            }
            let value = code(cell)[0];
            let (base, path) = match table.heading.as_str() {
                "Top level" => (PLAIN, key.to_string()),
                "`[checkpoint]`" => (PLAIN, format!("checkpoint.{key}")),
                "`[data]`" if key == "context" => (SPEECH, format!("data.{key}")),
                "`[data]`" => (PLAIN, format!("data.{key}")),
                "`[data.speech]`" => (SPEECH, format!("data.speech.{key}")),
                "`[data.store]`" => (STORE, format!("data.store.{key}")),
                "`[defaults]`" => (PLAIN, format!("defaults.{key}")),
                "`optimizer`" if code(&row[table.column("optimizer")]).contains(&"sgd") => {
                    (EVERY_KIND, format!("defaults.optimizer.{key}"))
                }
                "`optimizer`" => (EVERY_KIND, format!("stages.adam.optimizer.{key}")),
                "`schedule`" => (EVERY_KIND, format!("defaults.schedule.{key}")),
                "`model`" => (EVERY_KIND, format!("stages.train.model.{key}")),
                "`kmeans`" => (EVERY_KIND, format!("stages.clusters.kmeans.{key}")),
                "`[[stages]]`" => {
                    // The stage of the first kind the key applies to.
                    let kind = code(&row[table.column("stage kinds")])[0];
                    (EVERY_KIND, format!("stages.{kind}.{key}"))
                }
                other => panic!("`{other}` `{key}`: a default written as code in a table this test has no base for"),
            };
            let unset = load_text(&dir.0, base, &[]).unwrap_or_else(|e| panic!("{e:#}"));
            let set = load_text(&dir.0, base, &[format!("{path}={value}")])
                .unwrap_or_else(|e| panic!("{} `{key}` = {value}, the documented default: {e:#}", table.heading));
            assert!(set == unset, "{} `{key}`: the documented default {value} is not the default", table.heading);
            checked += 1;
        }
    }
    // The page writes most defaults as values: a change of style that left none would check nothing.
    assert!(checked >= 40, "only {checked} defaults were checked");
}

/// The page's example experiment is a valid file with a stage of every kind.
#[test]
fn the_example_is_a_valid_experiment_with_every_stage_kind() {
    let page = page();
    let start = page.find("## An example").expect("an `## An example` section");
    let block = &page[start..];
    let body = &block[block.find("```toml\n").expect("a toml block") + 8..];
    let body = &body[..body.find("\n```").expect("the block's end")];
    let dir = crate::testutil::TempDir::new("doc-example");
    let exp = load_text(&dir.0, body, &[]).unwrap_or_else(|e| panic!("the example: {e:#}"));
    let kinds: BTreeSet<&str> = exp.stages.iter().map(|s| s.job.kind_name()).collect();
    let all: BTreeSet<&str> = variants::<StageKind>().into_iter().collect();
    assert_eq!(kinds, all, "the example's stage kinds");
    // Its comment on `kind` names them all too.
    let comment = body.lines().find(|l| l.starts_with("kind = \"train\"")).expect("a train stage");
    for k in &all {
        assert!(comment.contains(k), "the comment on `kind` omits `{k}`: {comment}");
    }
}
