//! Line charts as SVG files for reports (e.g. test error vs temperature, one curve per student size;
//! validation accuracy vs epoch, one curve per model).
//!
//! Drawn with `plotters`' SVG backend without its font features: text becomes plain `<text>` elements,
//! so no system font library or font file is needed. Log axes are drawn as linear axes over log10 of
//! the data, with ticks at 1-2-5 multiples of powers of 10 (or powers of 10 alone over wide ranges).

use anyhow::{bail, Context, Result};
use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, Ranged, ValueFormatter};
use plotters::prelude::*;
use std::path::Path;

const WIDTH: u32 = 800;
const HEIGHT: u32 = 500;

/// Tableau 10 colors: distinct from each other and from the black/grey axes and grid.
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// One named curve of (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Chart settings.
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub log_x: bool,
    pub log_y: bool,
}

/// Renders `series` as an SVG line chart with markers, axes with ticks, axis labels, title and a legend, to `path`,
/// atomically (write to a temporary file beside it, then rename). Errors (anyhow) name the path; empty series list,
/// series with no points, or non-finite / non-positive-on-log-axis values are errors, not panics.
pub fn line_chart(path: &Path, chart: &Chart, series: &[Series]) -> Result<()> {
    let svg = render(chart, series).with_context(|| format!("cannot draw chart {}", path.display()))?;
    crate::run::output::write_atomic(path, svg.as_bytes())
        .with_context(|| format!("cannot write chart {}", path.display()))
}

/// The largest magnitude drawn: beyond it a point is off the chart (the axis arithmetic, a range
/// and its padding, must stay finite).
pub const MAX_MAGNITUDE: f64 = 1e300;

/// Whether a point can be drawn on `chart`: finite, within [`MAX_MAGNITUDE`], and positive on a
/// log axis.
fn drawable(chart: &Chart, (x, y): (f64, f64)) -> bool {
    let fits = |v: f64, log: bool| v.is_finite() && v.abs() <= MAX_MAGNITUDE && (!log || v > 0.0);
    fits(x, chart.log_x) && fits(y, chart.log_y)
}

/// The points of `series` that `chart` can draw (see [`line_chart`]'s errors), series left with
/// none dropped, and how many points were left out: what a report draws from values read off
/// disk, which may be anything a CSV holds.
pub fn drawable_series(chart: &Chart, series: &[Series]) -> (Vec<Series>, usize) {
    let mut skipped = 0;
    let kept = series
        .iter()
        .filter_map(|s| {
            let points: Vec<(f64, f64)> = s.points.iter().copied().filter(|&p| drawable(chart, p)).collect();
            skipped += s.points.len() - points.len();
            (!points.is_empty()).then(|| Series { name: s.name.clone(), points })
        })
        .collect();
    (kept, skipped)
}

/// One axis: the plotted range and ticks, both in plot space (log10 of the data on a log axis).
struct Axis {
    range: (f64, f64),
    ticks: Vec<(f64, String)>,
}

impl Axis {
    fn new(values: impl Iterator<Item = f64> + Clone, log: bool) -> Axis {
        let to_plot = |v: f64| if log { v.log10() } else { v };
        let lo = values.clone().map(to_plot).fold(f64::INFINITY, f64::min);
        let hi = values.map(to_plot).fold(f64::NEG_INFINITY, f64::max);
        let spread = (hi - lo) * 0.05;
        // A spread lost to rounding (a range of a few ulps) counts as a single value.
        let pad = if hi > lo && lo - spread < lo && hi + spread > hi {
            spread
        } else if log {
            0.15
        } else {
            (lo.abs() * 0.1).max(1.0)
        };
        let (lo, hi) = (lo - pad, hi + pad);
        let ticks = if log {
            let ticks = log_ticks(lo, hi);
            if ticks.len() >= 2 {
                ticks
            } else {
                linear_ticks(10f64.powf(lo), 10f64.powf(hi))
                    .into_iter()
                    .map(|(v, l)| (v.log10(), l))
                    .filter(|(p, _)| p.is_finite())
                    .collect()
            }
        } else {
            linear_ticks(lo, hi)
        };
        Axis { range: (lo, hi), ticks }
    }
}

/// A linear plotters coordinate over plot space whose key points are exactly our ticks.
impl Ranged for Axis {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let frac = (value - self.range.0) / (self.range.1 - self.range.0);
        limit.0 + (frac * f64::from(limit.1 - limit.0)).round() as i32
    }

    /// Ticks as the bold points (grid lines and labels); no light grid lines.
    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            return Vec::new();
        }
        self.ticks.iter().map(|t| t.0).collect()
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.range.0..self.range.1
    }
}

impl ValueFormatter<f64> for Axis {
    /// The label of the tick nearest to `pos` (plotters asks only for the key points).
    fn format_ext(&self, pos: &f64) -> String {
        self.ticks
            .iter()
            .min_by(|a, b| (a.0 - pos).abs().total_cmp(&(b.0 - pos).abs()))
            .map_or_else(|| format!("{pos}"), |t| t.1.clone())
    }
}

/// Ticks at 1-2-5 multiples of powers of 10 inside `[lo, hi]` (log10 space); only powers of 10, thinned to
/// at most 9, over wider ranges.
fn log_ticks(lo: f64, hi: f64) -> Vec<(f64, String)> {
    let decades = hi - lo;
    let mantissas: &[u32] = if decades <= 2.5 { &[1, 2, 5] } else { &[1] };
    let every = (decades / 9.0).ceil().max(1.0) as i32;
    let mut ticks = Vec::new();
    for e in (lo.floor() as i32)..=(hi.ceil() as i32) {
        if e.rem_euclid(every) != 0 {
            continue;
        }
        for &m in mantissas {
            let pos = f64::from(m).log10() + f64::from(e);
            if pos >= lo && pos <= hi {
                ticks.push((pos, number_label(i64::from(m), e)));
            }
        }
    }
    ticks
}

/// About 6 ticks at multiples of a 1-2-5 step inside `[lo, hi]`; the two ends alone where no
/// such step exists (a range too narrow or too wide for f64 steps).
fn linear_ticks(lo: f64, hi: f64) -> Vec<(f64, String)> {
    let ends = || vec![(lo, format!("{lo:.3e}")), (hi, format!("{hi:.3e}"))];
    let raw = (hi - lo) / 6.0;
    if !(raw.is_normal() && raw > 0.0) {
        return ends();
    }
    let mut e = raw.log10().floor() as i32;
    let norm = raw / 10f64.powi(e);
    let m = match norm {
        n if n < 1.5 => 1,
        n if n < 3.5 => 2,
        n if n < 7.5 => 5,
        _ => {
            e += 1;
            1
        }
    };
    let step = f64::from(m) * 10f64.powi(e);
    // The tolerance keeps ticks at the very ends despite rounding (-0.3 / 0.1 = -2.9999999999999996).
    let first = (lo / step - 1e-9).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    if !step.is_normal() || last.saturating_sub(first) > 20 {
        return ends();
    }
    (first..=last).map(|i| (i as f64 * step, number_label(i * i64::from(m), e))).collect()
}

/// Formats `k * 10^e` without floating-point noise: plain decimals for moderate exponents, else `ke<e>`.
fn number_label(k: i64, e: i32) -> String {
    if (-4..=5).contains(&e) {
        format!("{:.*}", (-e).max(0) as usize, k as f64 * 10f64.powi(e))
    } else {
        format!("{k}e{e}")
    }
}

fn check(chart: &Chart, series: &[Series]) -> Result<()> {
    if series.is_empty() {
        bail!("no series to plot");
    }
    for s in series {
        if s.points.is_empty() {
            bail!("series \"{}\" has no points", s.name);
        }
        for (i, &(x, y)) in s.points.iter().enumerate() {
            if !x.is_finite() || !y.is_finite() {
                bail!("series \"{}\" point {i} ({x}, {y}) is not finite", s.name);
            }
            if x.abs() > MAX_MAGNITUDE || y.abs() > MAX_MAGNITUDE {
                bail!("series \"{}\" point {i} ({x}, {y}) is beyond ±{MAX_MAGNITUDE:e}", s.name);
            }
            if chart.log_x && x <= 0.0 {
                bail!("series \"{}\" point {i} ({x}, {y}): x must be positive on a log axis", s.name);
            }
            if chart.log_y && y <= 0.0 {
                bail!("series \"{}\" point {i} ({x}, {y}): y must be positive on a log axis", s.name);
            }
        }
    }
    Ok(())
}

/// The legend goes in the corner (inside the plot) with the fewest data points near it.
fn legend_position(
    series: &[Series],
    to_plot: impl Fn((f64, f64)) -> (f64, f64),
    x: &Axis,
    y: &Axis,
) -> SeriesLabelPosition {
    let mut counts = [0usize; 4]; // upper right, upper left, lower right, lower left
    for &p in series.iter().flat_map(|s| &s.points) {
        let (px, py) = to_plot(p);
        let fx = (px - x.range.0) / (x.range.1 - x.range.0);
        let fy = (py - y.range.0) / (y.range.1 - y.range.0);
        let col = if fx > 0.55 {
            0
        } else if fx < 0.45 {
            1
        } else {
            continue;
        };
        let row = if fy > 0.55 {
            0
        } else if fy < 0.45 {
            2
        } else {
            continue;
        };
        counts[row + col] += 1;
    }
    match (0..4).min_by_key(|&i| counts[i]) {
        Some(1) => SeriesLabelPosition::UpperLeft,
        Some(2) => SeriesLabelPosition::LowerRight,
        Some(3) => SeriesLabelPosition::LowerLeft,
        _ => SeriesLabelPosition::UpperRight,
    }
}

fn render(chart: &Chart, series: &[Series]) -> Result<String> {
    check(chart, series)?;
    let points = || series.iter().flat_map(|s| s.points.iter().copied());
    let x_axis = Axis::new(points().map(|p| p.0), chart.log_x);
    let y_axis = Axis::new(points().map(|p| p.1), chart.log_y);
    let (log_x, log_y) = (chart.log_x, chart.log_y);
    let to_plot = move |(x, y): (f64, f64)| (if log_x { x.log10() } else { x }, if log_y { y.log10() } else { y });

    let legend_at = legend_position(series, to_plot, &x_axis, &y_axis);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut ctx = ChartBuilder::on(&root)
            .caption(chart.title, ("sans-serif", 26))
            .margin(15)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(x_axis, y_axis)?;
        ctx.configure_mesh()
            .x_desc(chart.x_label)
            .y_desc(chart.y_label)
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 18))
            .bold_line_style(BLACK.mix(0.12))
            .draw()?;
        for (i, s) in series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            ctx.draw_series(
                LineSeries::new(s.points.iter().map(|&p| to_plot(p)), color.filled().stroke_width(2)).point_size(3),
            )?
            .label(s.name.as_str())
            // A filled bar rather than a path, so the file holds exactly one polyline per series.
            .legend(move |(x, y)| Rectangle::new([(x, y - 1), (x + 20, y + 1)], color.filled()));
        }
        ctx.configure_series_labels()
            .position(legend_at)
            .label_font(("sans-serif", 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A fresh, empty directory under the system temp dir for one test.
    fn test_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kd-run-plot-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn chart(log_x: bool, log_y: bool) -> Chart<'static> {
        Chart { title: "Test error vs temperature", x_label: "temperature T", y_label: "test errors", log_x, log_y }
    }

    fn series(name: &str, points: &[(f64, f64)]) -> Series {
        Series { name: name.to_string(), points: points.to_vec() }
    }

    fn temperature_series() -> Vec<Series> {
        vec![
            series("student 30 units", &[(1.0, 146.0), (2.0, 121.0), (5.0, 104.0), (10.0, 98.0), (20.0, 101.0)]),
            series("student 300 units", &[(1.0, 88.0), (2.0, 79.0), (5.0, 74.0), (10.0, 72.0), (20.0, 75.0)]),
            series("a<b & c", &[(1.0, 70.0), (20.0, 60.0)]),
        ]
    }

    /// The `points` attribute of every polyline drawn in `color`, parsed into pixel coordinates.
    fn polylines_in(svg: &str, color: RGBColor) -> Vec<Vec<(f64, f64)>> {
        let stroke = format!("stroke=\"#{:02X}{:02X}{:02X}\"", color.0, color.1, color.2);
        svg.split("<polyline")
            .skip(1)
            .map(|tag| &tag[..tag.find("/>").unwrap()])
            .filter(|tag| tag.contains(&stroke))
            .map(|tag| {
                let start = tag.find("points=\"").unwrap() + 8;
                let end = start + tag[start..].find('"').unwrap();
                tag[start..end]
                    .split_whitespace()
                    .map(|p| {
                        let (x, y) = p.split_once(',').unwrap();
                        (x.parse().unwrap(), y.parse().unwrap())
                    })
                    .collect()
            })
            .collect()
    }

    /// The contents of all `<text>` elements (plotters puts them on their own line).
    fn texts(svg: &str) -> Vec<&str> {
        svg.split("<text").skip(1).map(|t| t[t.find('>').unwrap() + 1..t.find("</text>").unwrap()].trim()).collect()
    }

    /// Asserts that no temporary file is left in `dir`, then removes it.
    fn no_temp_files(dir: &Path) {
        let names: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(names.iter().all(|n| !n.to_string_lossy().ends_with(".tmp")), "temporary file left: {names:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn plot_writes_well_formed_svg_with_all_texts() {
        let dir = test_dir("texts");
        let path = dir.join("temps.svg");
        line_chart(&path, &chart(false, false), &temperature_series()).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") || svg.starts_with("<?xml"), "{}", &svg[..60]);
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains(&format!("width=\"{WIDTH}\"")) && svg.contains(&format!("height=\"{HEIGHT}\"")));
        let texts = texts(&svg);
        for text in
            ["Test error vs temperature", "temperature T", "test errors", "student 30 units", "student 300 units"]
        {
            assert!(texts.contains(&text), "missing text {text:?} in {texts:?}");
        }
        // Text is XML-escaped.
        assert!(texts.contains(&"a&lt;b &amp; c"), "{texts:?}");
        assert!(!svg.contains("a<b"));
        // Exactly one polyline per series, each with all its points.
        for (i, s) in temperature_series().iter().enumerate() {
            let lines = polylines_in(&svg, PALETTE[i]);
            assert_eq!(lines.len(), 1, "series {}", s.name);
            assert_eq!(lines[0].len(), s.points.len(), "series {}", s.name);
        }
        no_temp_files(&dir);
    }

    #[test]
    fn plot_maps_points_inside_plot_area_in_order() {
        let dir = test_dir("coords");
        let path = dir.join("coords.svg");
        let s = vec![series("only", &[(1.0, 10.0), (20.0, 90.0)])];
        line_chart(&path, &chart(false, false), &s).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let line = &polylines_in(&svg, PALETTE[0])[0];
        let (w, h) = (f64::from(WIDTH), f64::from(HEIGHT));
        let ((x0, y0), (x1, y1)) = (line[0], line[1]);
        // Smallest x in the left part, largest x in the right part; larger y is higher up (smaller pixel y).
        assert!(x0 > 0.05 * w && x0 < 0.3 * w, "x0 = {x0}");
        assert!(x1 > 0.8 * w && x1 < w, "x1 = {x1}");
        assert!(y0 > 0.7 * h && y0 < h, "y0 = {y0}");
        assert!(y1 > 0.0 && y1 < 0.3 * h, "y1 = {y1}");
        no_temp_files(&dir);
    }

    #[test]
    fn plot_log_axis_has_1_2_5_ticks_and_log_spacing() {
        let dir = test_dir("log");
        let path = dir.join("log.svg");
        line_chart(&path, &chart(true, false), &temperature_series()).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let texts = texts(&svg);
        for tick in ["1", "2", "5", "10", "20"] {
            assert!(texts.contains(&tick), "missing x tick {tick} in {texts:?}");
        }
        // On a log axis, 1 -> 2 spans the same width as 10 -> 20.
        let line = &polylines_in(&svg, PALETTE[0])[0];
        let (d12, d1020) = (line[1].0 - line[0].0, line[4].0 - line[3].0);
        assert!(d12 > 0.0 && (d12 - d1020).abs() <= 2.0, "{d12} vs {d1020}");
        no_temp_files(&dir);
    }

    #[test]
    fn plot_tick_helpers() {
        let labels = |t: Vec<(f64, String)>| t.into_iter().map(|t| t.1).collect::<Vec<_>>();
        assert_eq!(labels(log_ticks(-0.05, 1.35)), ["1", "2", "5", "10", "20"]);
        assert_eq!(labels(log_ticks(-3.1, 0.1)), ["0.001", "0.01", "0.1", "1"]);
        assert_eq!(
            labels(log_ticks(-8.0, 0.0)),
            ["1e-8", "1e-7", "1e-6", "1e-5", "0.0001", "0.001", "0.01", "0.1", "1"]
        );
        // Over 16 decades only every other power of 10 is labelled.
        assert_eq!(labels(log_ticks(-8.5, 8.5)), ["1e-8", "1e-6", "0.0001", "0.01", "1", "100", "10000", "1e6", "1e8"]);
        assert_eq!(labels(linear_ticks(0.0, 1.0)), ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
        assert_eq!(labels(linear_ticks(-0.3, 0.3)), ["-0.3", "-0.2", "-0.1", "0.0", "0.1", "0.2", "0.3"]);
        assert_eq!(labels(linear_ticks(0.0, 100.0)), ["0", "20", "40", "60", "80", "100"]);
    }

    #[test]
    fn plot_single_point_and_narrow_log_range_work() {
        let dir = test_dir("single");
        let path = dir.join("single.svg");
        line_chart(&path, &chart(true, true), &[series("one", &[(3.0, 0.5)])]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert_eq!(polylines_in(&svg, PALETTE[0]).len(), 1);
        // Ticks exist even though no power of 10 or 1-2-5 value lies near 3 on x.
        let texts = texts(&svg);
        assert!(texts.contains(&"3.0") && texts.contains(&"0.50"), "{texts:?}");
        no_temp_files(&dir);
    }

    #[test]
    fn plot_rejects_bad_input_with_helpful_errors() {
        let dir = test_dir("errors");
        let path = dir.join("bad.svg");
        let cases: Vec<(Chart, Vec<Series>, &str)> = vec![
            (chart(false, false), vec![], "no series"),
            (chart(false, false), vec![series("empty", &[])], "\"empty\" has no points"),
            (
                chart(false, false),
                vec![series("nan", &[(1.0, 2.0), (2.0, f64::NAN)])],
                "point 1 (2, NaN) is not finite",
            ),
            (chart(false, false), vec![series("inf", &[(f64::INFINITY, 2.0)])], "not finite"),
            (chart(true, false), vec![series("zero x", &[(0.0, 2.0)])], "x must be positive on a log axis"),
            (chart(false, true), vec![series("neg y", &[(1.0, -2.0)])], "y must be positive on a log axis"),
        ];
        for (c, s, want) in cases {
            let err = format!("{:#}", line_chart(&path, &c, &s).unwrap_err());
            assert!(err.contains(want), "{err:?} lacks {want:?}");
            assert!(err.contains(&path.display().to_string()), "{err:?} lacks the path");
        }
        assert!(!path.exists());
        no_temp_files(&dir);
    }

    #[test]
    fn extreme_values_are_drawn_or_left_out_never_a_panic() {
        let dir = test_dir("extreme");
        let path = dir.join("extreme.svg");
        // Values that overflowed the range arithmetic (1e306 - -1e306 padded) or left no 1-2-5
        // step (a range of a few ulps, subnormals).
        for (log_y, points) in [
            (false, vec![(1.0, 1e300), (2.0, -1e300)]),
            (false, vec![(1.0, 1e-320), (2.0, 1.5e-320)]),
            (false, vec![(1.0, 0.5), (2.0, 0.5000000000000001)]),
            (false, vec![(1.0, -1e300), (1e300, 1e300)]),
            (true, vec![(1.0, 5e-324), (2.0, 1e300)]),
        ] {
            line_chart(&path, &chart(false, log_y), &[series("s", &points)]).unwrap();
            assert_eq!(polylines_in(&std::fs::read_to_string(&path).unwrap(), PALETTE[0]).len(), 1, "{points:?}");
        }
        // What cannot be drawn is left out and counted; a series with nothing left is dropped.
        let raw = vec![
            series(
                "mixed",
                &[(1.0, 1.0), (2.0, f64::NAN), (3.0, f64::INFINITY), (4.0, 1e306), (5.0, -2.0), (6.0, 3.0)],
            ),
            series("none", &[(1.0, f64::NEG_INFINITY)]),
        ];
        let (linear, skipped) = drawable_series(&chart(false, false), &raw);
        assert_eq!((linear.len(), linear[0].points.len(), skipped), (1, 3, 4));
        let (log, skipped) = drawable_series(&chart(false, true), &raw);
        assert_eq!((log[0].points.clone(), skipped), (vec![(1.0, 1.0), (6.0, 3.0)], 5));
        line_chart(&path, &chart(false, true), &log).unwrap();
        let err = format!("{:#}", line_chart(&path, &chart(false, false), &raw[..1]).unwrap_err());
        assert!(err.contains("not finite"), "{err}");
        no_temp_files(&dir);
    }

    #[test]
    fn plot_write_error_names_path_and_leaves_no_temp_file() {
        let dir = test_dir("missing");
        let path = dir.join("no-such-dir").join("chart.svg");
        let err = format!("{:#}", line_chart(&path, &chart(false, false), &temperature_series()).unwrap_err());
        assert!(err.contains(&path.display().to_string()), "{err}");
        no_temp_files(&dir);
    }

    #[test]
    fn plot_replaces_existing_file() {
        let dir = test_dir("replace");
        let path = dir.join("chart.svg");
        std::fs::write(&path, "old").unwrap();
        line_chart(&path, &chart(false, false), &temperature_series()).unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().contains("student 30 units"));
        no_temp_files(&dir);
    }
}
