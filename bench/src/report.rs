//! Reports: every subcommand's JSON rendered as a Markdown table and SVG charts, and
//! `oc-bench report`, which re-renders a directory of results.
//!
//! The charts are grouped bar charts written as plain SVG here. A plotting crate would
//! need a font stack (ttf or ab_glyph plus a font file) only to measure label widths;
//! the charts need bars, axis ticks and a legend, which are a few dozen lines of SVG.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A grouped bar chart: `groups` along the x axis, one bar per series in each group.
pub struct Bars {
    pub title: String,
    pub y_label: String,
    pub groups: Vec<String>,
    /// (series name, one value per group; `None` draws no bar).
    pub series: Vec<(String, Vec<Option<f64>>)>,
}

const PALETTE: [&str; 6] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A round axis maximum at or above `max` (1, 2 or 5 times a power of ten).
fn nice_max(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let power = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|&v| v >= max)
        .unwrap_or(10.0 * power)
}

fn format_tick(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// The frame every chart shares: canvas, margins (the legend sits on the right) and
/// the y axis from 0 to a round maximum.
struct Frame {
    y_max: f64,
}

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 80.0;
const TOP: f64 = 50.0;
const PLOT_W: f64 = WIDTH - LEFT - 200.0;
const PLOT_H: f64 = HEIGHT - TOP - 60.0;

impl Frame {
    /// Opens the SVG with the title, the y grid and the y label.
    fn open(title: &str, y_label: &str, y_max: f64) -> (Frame, String) {
        let frame = Frame {
            y_max: nice_max(y_max),
        };
        let mut svg = String::new();
        let _ = write!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
        );
        let _ = write!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = write!(
            svg,
            r#"<text x="{}" y="24" font-size="15" text-anchor="middle">{}</text>"#,
            LEFT + PLOT_W / 2.0,
            escape(title)
        );
        for i in 0..=5 {
            let v = frame.y_max * f64::from(i) / 5.0;
            let yv = frame.y(v);
            let _ = write!(
                svg,
                r##"<line x1="{LEFT}" x2="{}" y1="{yv:.1}" y2="{yv:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                LEFT + PLOT_W,
                LEFT - 6.0,
                yv + 4.0,
                format_tick(v),
            );
        }
        let _ = write!(
            svg,
            r#"<text transform="translate(18,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
            TOP + PLOT_H / 2.0,
            escape(y_label)
        );
        (frame, svg)
    }

    fn y(&self, v: f64) -> f64 {
        TOP + PLOT_H * (1.0 - v / self.y_max)
    }

    /// Closes the SVG: both axes and a legend entry per series name.
    fn close<'a>(svg: &mut String, names: impl Iterator<Item = &'a str>) {
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{}" stroke="#333"/><line x1="{LEFT}" x2="{}" y1="{}" y2="{}" stroke="#333"/>"##,
            TOP + PLOT_H,
            LEFT + PLOT_W,
            TOP + PLOT_H,
            TOP + PLOT_H
        );
        for (s, name) in names.enumerate() {
            let ly = TOP + 10.0 + 20.0 * s as f64;
            let lx = LEFT + PLOT_W + 16.0;
            let _ = write!(
                svg,
                r#"<rect x="{lx}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{ly}">{}</text>"#,
                ly - 10.0,
                PALETTE[s % PALETTE.len()],
                lx + 18.0,
                escape(name)
            );
        }
        svg.push_str("</svg>\n");
    }
}

/// The chart as an SVG document.
pub fn bar_chart(chart: &Bars) -> String {
    let max = chart
        .series
        .iter()
        .flat_map(|(_, values)| values.iter().flatten())
        .fold(0.0f64, |m, &v| m.max(v));
    let (frame, mut svg) = Frame::open(&chart.title, &chart.y_label, max);
    let group_w = PLOT_W / chart.groups.len().max(1) as f64;
    let bar_w = group_w * 0.8 / chart.series.len().max(1) as f64;
    for (g, group) in chart.groups.iter().enumerate() {
        let x0 = LEFT + group_w * g as f64 + group_w * 0.1;
        for (s, (_, values)) in chart.series.iter().enumerate() {
            if let Some(Some(v)) = values.get(g) {
                let x = x0 + bar_w * s as f64;
                let _ = write!(
                    svg,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}</title></rect>"#,
                    frame.y(*v),
                    bar_w * 0.95,
                    (TOP + PLOT_H - frame.y(*v)).max(0.0),
                    PALETTE[s % PALETTE.len()],
                    escape(&format!("{}: {v:.0}", chart.series[s].0))
                );
            }
        }
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            LEFT + group_w * (g as f64 + 0.5),
            TOP + PLOT_H + 20.0,
            escape(group)
        );
    }
    Frame::close(&mut svg, chart.series.iter().map(|(name, _)| name.as_str()));
    svg
}

/// A line chart: one polyline per series over a linear y axis from 0.
pub struct Lines {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Where the x axis is labelled, and with what; empty: five round steps from 0 to
    /// the largest x. With ticks, the axis ends at the last one.
    pub x_ticks: Vec<(f64, String)>,
    /// (series name, (x, y) points in x order).
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

/// The chart as an SVG document.
pub fn line_chart(chart: &Lines) -> String {
    let points = || chart.series.iter().flat_map(|(_, points)| points.iter());
    let ticks = if chart.x_ticks.is_empty() {
        let x_max = nice_max(points().map(|p| p.0).fold(0.0, f64::max));
        (0..=5)
            .map(|i| {
                let v = x_max * f64::from(i) / 5.0;
                (v, format_tick(v))
            })
            .collect()
    } else {
        chart.x_ticks.clone()
    };
    let x_max = ticks.last().map_or(1.0, |t| t.0).max(f64::MIN_POSITIVE);
    let x = |v: f64| LEFT + PLOT_W * v.min(x_max) / x_max;
    let (frame, mut svg) = Frame::open(
        &chart.title,
        &chart.y_label,
        points().map(|p| p.1).fold(0.0, f64::max),
    );
    for (v, label) in &ticks {
        let xv = x(*v);
        let _ = write!(
            svg,
            r##"<line x1="{xv:.1}" x2="{xv:.1}" y1="{TOP}" y2="{}" stroke="#eee"/><text x="{xv:.1}" y="{}" text-anchor="middle">{}</text>"##,
            TOP + PLOT_H,
            TOP + PLOT_H + 20.0,
            escape(label)
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        LEFT + PLOT_W / 2.0,
        HEIGHT - 12.0,
        escape(&chart.x_label)
    );
    for (s, (_, points)) in chart.series.iter().enumerate() {
        let line: Vec<String> = points
            .iter()
            .map(|(px, py)| format!("{:.1},{:.1}", x(*px), frame.y(*py)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
            PALETTE[s % PALETTE.len()],
            line.join(" ")
        );
    }
    Frame::close(&mut svg, chart.series.iter().map(|(name, _)| name.as_str()));
    svg
}

/// Latency by percentile, the plot latency work is read from: x is the percentile on
/// a log scale of 1/(1 − p) (0 %, 90 %, 99 %, 99.9 %, …), y the latency in µs; one
/// line per series (`latency::percentile_curve`). The 100 % point (the max) sits at
/// the right edge.
pub fn percentile_plot(
    title: &str,
    series: &[(String, crate::latency::PercentileCurve)],
) -> String {
    let nines = |p: f64| (1.0 / (1.0 - p / 100.0)).log10();
    let x_max = series
        .iter()
        .flat_map(|(_, curve)| curve.iter())
        .filter(|(p, _)| *p < 100.0)
        .map(|(p, _)| nines(*p))
        .fold(3.0f64, f64::max)
        .ceil()
        .min(7.0);
    let x_ticks = (0..=x_max as i32)
        .map(|n| {
            let label = match n {
                0 => "0%".to_string(),
                n => format!("{}%", 100.0 - 100.0 / 10f64.powi(n)),
            };
            (f64::from(n), label)
        })
        .collect();
    line_chart(&Lines {
        title: title.to_string(),
        x_label: "percentile".into(),
        y_label: "µs".into(),
        x_ticks,
        series: series
            .iter()
            .map(|(name, curve)| {
                let points = curve
                    .iter()
                    .map(|(p, us)| (if *p >= 100.0 { x_max } else { nines(*p) }, *us as f64))
                    .collect();
                (name.clone(), points)
            })
            .collect(),
    })
}

/// Prints the Markdown; with a JSON path, writes the JSON there and the Markdown and
/// charts beside it (`<stem>.md`, `<stem>-<chart>.svg`).
pub fn write_outputs<R: Serialize>(
    report: &R,
    json: Option<&Path>,
    markdown: String,
    svgs: Vec<(String, String)>,
) -> Result<()> {
    print!("{markdown}");
    let Some(json) = json else {
        return Ok(());
    };
    write_output(json, &serde_json::to_string_pretty(report)?)?;
    let dir = json.parent().unwrap_or(Path::new("."));
    let stem = json
        .file_stem()
        .map_or_else(|| "report".into(), |s| s.to_string_lossy().into_owned());
    write_rendered(dir, &stem, &markdown, &svgs)
}

/// Writes one output file, creating its directory first, so a result is not lost at the
/// end of a long run for a directory not made yet; an error names the file.
pub fn write_output(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Writes each histogram as `<json stem>-<name>.hgrm` beside the JSON
/// (`latency::hgrm`), and all of them in `<json stem>.hlog` (`latency::hlog`), the
/// run (`run` long, which they cover) as one interval per histogram, tagged with its
/// name.
pub fn write_histograms(
    json: &Path,
    histograms: &[(&str, hdrhistogram::Histogram<u64>)],
    run: std::time::Duration,
) -> Result<()> {
    let dir = json.parent().unwrap_or(Path::new("."));
    let stem = json
        .file_stem()
        .map_or_else(|| "report".into(), |s| s.to_string_lossy().into_owned());
    let kept: Vec<_> = histograms.iter().filter(|(_, h)| !h.is_empty()).collect();
    for (name, h) in &kept {
        let path = dir.join(format!("{stem}-{name}.hgrm"));
        std::fs::write(&path, crate::latency::hgrm(h))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let path = dir.join(format!("{stem}.hlog"));
    let started = std::time::SystemTime::now() - run;
    std::fs::write(&path, crate::latency::hlog(&kept, started, run)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn write_rendered(dir: &Path, stem: &str, markdown: &str, svgs: &[(String, String)]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let md = dir.join(format!("{stem}.md"));
    std::fs::write(&md, markdown).with_context(|| format!("writing {}", md.display()))?;
    for (chart, svg) in svgs {
        let path = dir.join(format!("{stem}-{chart}.svg"));
        std::fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct ReportArgs {
    /// Directory holding results (`wal.json`, `engine.json`, `peers.json`, `http.json`).
    #[arg(long = "in")]
    input: PathBuf,
    /// Directory for the Markdown tables and SVG charts.
    #[arg(long)]
    out: PathBuf,
}

fn load<R: DeserializeOwned>(path: &Path) -> Result<Option<R>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("{} is not a result this oc-bench can read", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// A chart set: (chart name, SVG document).
type Charts = Vec<(String, String)>;

/// Renders `<input>/<name>.json` into `out` if it exists; says whether it did.
fn render_one<R: DeserializeOwned>(
    input: &Path,
    out: &Path,
    name: &str,
    markdown: fn(&R) -> String,
    svgs: fn(&R) -> Charts,
) -> Result<bool> {
    let Some(report) = load::<R>(&input.join(format!("{name}.json")))? else {
        return Ok(false);
    };
    write_rendered(out, name, &markdown(&report), &svgs(&report))?;
    Ok(true)
}

/// Renders every known result file in `input` into `out`; returns what it rendered.
pub fn render_dir(input: &Path, out: &Path) -> Result<Vec<String>> {
    use crate::{ask, engine, http, peers, recovery, wal};
    let rendered = [
        (
            "wal",
            render_one(input, out, "wal", wal::markdown, wal::svgs)?,
        ),
        (
            "engine",
            render_one(input, out, "engine", engine::markdown, engine::svgs)?,
        ),
        (
            "recovery",
            render_one(input, out, "recovery", recovery::markdown, |_| Vec::new())?,
        ),
        (
            "peers",
            render_one(input, out, "peers", peers::markdown, peers::svgs)?,
        ),
        (
            "http",
            render_one(input, out, "http", http::markdown, http::svgs)?,
        ),
        (
            "ask",
            render_one(input, out, "ask", ask::markdown, ask::svgs)?,
        ),
    ];
    Ok(rendered
        .into_iter()
        .filter(|(_, done)| *done)
        .map(|(name, _)| name.to_string())
        .collect())
}

pub fn run(args: ReportArgs) -> Result<()> {
    let rendered = render_dir(&args.input, &args.out)?;
    if rendered.is_empty() {
        anyhow::bail!(
            "{} holds none of wal.json, engine.json, recovery.json, peers.json, http.json, ask.json",
            args.input.display()
        );
    }
    eprintln!(
        "rendered {} into {}",
        rendered.join(", "),
        args.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A results path in a directory not made yet is made; one that cannot be written
    /// is an error naming it.
    #[test]
    fn outputs_make_their_directory_and_name_the_file_they_fail_on() {
        let root = std::env::temp_dir().join(format!("oc-bench-output-{}", std::process::id()));
        let path = root.join("a/b/run.json");
        write_output(&path, "{}").expect("written");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "{}");
        let under_a_file = path.join("x.json");
        let error = write_output(&under_a_file, "{}").expect_err("a file is not a directory");
        assert!(
            format!("{error:#}").contains(&path.display().to_string()),
            "{error:#}"
        );
        std::fs::remove_dir_all(&root).expect("cleaned up");
    }

    #[test]
    fn the_committed_results_still_load_and_render() {
        let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/bench");
        let out = std::env::temp_dir().join(format!("oc-bench-report-{}", std::process::id()));
        let rendered = render_dir(&committed, &out).expect("renders");
        for name in ["wal", "engine", "recovery", "http", "ask"] {
            assert!(
                rendered.iter().any(|r| r == name),
                "{name} not rendered: {rendered:?}"
            );
            let md = std::fs::read_to_string(out.join(format!("{name}.md"))).expect("markdown");
            assert!(md.contains("|---"), "{name}.md has a table");
        }
        let charts = std::fs::read_dir(&out)
            .expect("out dir")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "svg"))
            })
            .count();
        assert!(charts >= 5, "{charts} charts");
        let _ = std::fs::remove_dir_all(&out);
    }

    #[test]
    fn axis_maxima_are_round_and_cover_the_data() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(7.0), 10.0);
        assert_eq!(nice_max(120.0), 200.0);
        assert_eq!(nice_max(5000.0), 5000.0);
        assert_eq!(nice_max(50001.0), 100000.0);
    }

    #[test]
    fn a_chart_has_one_bar_per_present_value_and_a_legend_entry_per_series() {
        let svg = bar_chart(&Bars {
            title: "writes <durable>".into(),
            y_label: "writes/s".into(),
            groups: vec!["1".into(), "64".into()],
            series: vec![
                ("oc".into(), vec![Some(10.0), Some(200.0)]),
                ("sqlite".into(), vec![Some(5.0), None]),
            ],
        });
        assert_eq!(svg.matches("<title>").count(), 3);
        assert!(svg.contains("writes &lt;durable&gt;"));
        assert!(svg.contains(">oc</text>") && svg.contains(">sqlite</text>"));
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
    }

    #[test]
    fn a_percentile_plot_has_a_line_per_series_inside_the_plot_and_nines_on_x() {
        let curve = |scale: u64| {
            vec![
                (0.0, scale),
                (90.0, 2 * scale),
                (99.9, 5 * scale),
                (100.0, 9 * scale),
            ]
        };
        let svg = percentile_plot(
            "reads & writes",
            &[("reads".into(), curve(100)), ("writes".into(), curve(300))],
        );
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains(">reads</text>") && svg.contains(">writes</text>"));
        assert!(svg.contains("reads &amp; writes"));
        for tick in [">0%<", ">90%<", ">99%<", ">99.9%<"] {
            assert!(svg.contains(tick), "{tick}");
        }
        // Every point lies in the plot area (x 80–560, y 50–360).
        for line in svg.split("points=\"").skip(1) {
            for point in line.split('"').next().expect("points").split(' ') {
                let (x, y) = point.split_once(',').expect("x,y");
                let (x, y): (f64, f64) = (x.parse().expect("x"), y.parse().expect("y"));
                assert!(
                    (80.0..=560.0).contains(&x) && (50.0..=360.0).contains(&y),
                    "{point}"
                );
            }
        }
    }
}
