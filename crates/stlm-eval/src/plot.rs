//! Line plots as SVG or PNG files (plotters; text drawn with a font compiled into the binary,
//! so no system fonts are needed), and the CSV tables they are drawn from.

use crate::{EvalError, Result};
use plotters::prelude::*;
use std::path::Path;

/// One named line: `(x, y)` points in drawing order, optionally with a shaded band.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Series {
    /// Legend label.
    pub name: String,
    /// Points.
    pub points: Vec<(f64, f64)>,
    /// `(low, high)` per point, drawn as a shaded band around the line (empty: none).
    pub band: Vec<(f64, f64)>,
}

impl Series {
    /// A line without a band.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series { name: name.into(), points, band: Vec::new() }
    }
}

/// One chart of a figure.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    /// Chart title.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// Lines.
    pub series: Vec<Series>,
    /// Draw markers at the points (off for dense lines).
    pub markers: bool,
}

/// Lines of `rows` (a CSV table with a header; quoted cells may hold commas) grouped by column
/// `group` (one line per distinct value, in order of appearance; all rows in one line without
/// it), `y` against `x`. The error names the missing column or the row whose value is not a number.
pub fn series_from_csv(text: &str, x: &str, y: &str, group: Option<&str>) -> Result<Vec<Series>> {
    let mut reader = csv::ReaderBuilder::new().trim(csv::Trim::All).flexible(true).from_reader(text.as_bytes());
    let bad = |e: csv::Error| EvalError::Input(format!("not a valid CSV: {e}"));
    let header: Vec<String> = reader.headers().map_err(bad)?.iter().map(str::to_string).collect();
    if header.iter().all(String::is_empty) {
        return Err(EvalError::Input("the CSV is empty".into()));
    }
    let col = |name: &str| {
        header.iter().position(|h| h == name).ok_or_else(|| EvalError::Input(format!("no column `{name}` (columns: {})", header.join(", "))))
    };
    let (xi, yi) = (col(x)?, col(y)?);
    let gi = group.map(col).transpose()?;
    let mut out: Vec<Series> = Vec::new();
    for (n, record) in reader.records().enumerate() {
        let cells = record.map_err(bad)?;
        if cells.iter().all(str::is_empty) {
            continue;
        }
        let num = |i: usize, name: &str| {
            cells.get(i).and_then(|c| c.parse::<f64>().ok()).ok_or_else(|| EvalError::Input(format!("row {}: `{name}` is not a number", n + 2)))
        };
        let point = (num(xi, x)?, num(yi, y)?);
        let name = gi.and_then(|g| cells.get(g)).map_or(y.to_string(), |s| s.to_string());
        match out.iter_mut().find(|s| s.name == name) {
            Some(s) => s.points.push(point),
            None => out.push(Series::new(name, vec![point])),
        }
    }
    Ok(out)
}

/// Registers the compiled-in font as plotters' "sans-serif" (once).
fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TrueType font shipped with epaint_default_fonts.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, epaint_default_fonts::UBUNTU_LIGHT);
    });
}

/// Draws `series` as lines with markers into an SVG or PNG file at `path` (by its extension;
/// written to a temporary name, then renamed).
pub fn line_plot(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Result<()> {
    let panel = Panel { title: title.into(), x_label: x_label.into(), y_label: y_label.into(), series: series.to_vec(), markers: true };
    figure(path, &[panel], 1)
}

/// Draws `panels` into one SVG or PNG file at `path` (by its extension), `columns` charts per
/// row (written to a temporary name, then renamed). A panel without finite points is drawn empty
/// with "no data".
pub fn figure(path: &Path, panels: &[Panel], columns: usize) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).unwrap_or_default();
    if ext != "svg" && ext != "png" {
        return Err(EvalError::Input(format!("{}: plots are written as .svg or .png", path.display())));
    }
    if panels.iter().all(|p| bounds(&p.series).is_none()) {
        return Err(EvalError::Input("nothing to plot: no finite points".into()));
    }
    register_font();
    let columns = columns.clamp(1, panels.len().max(1));
    let rows = panels.len().div_ceil(columns);
    let size = if panels.len() == 1 { (900, 560) } else { (640 * columns as u32, 420 * rows as u32) };
    // The temporary name keeps the extension: the bitmap backend picks its encoder by it.
    let stem = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{stem}.tmp-{}.{ext}", std::process::id()));
    fn draw<DB: DrawingBackend>(root: DrawingArea<DB, plotters::coord::Shift>, panels: &[Panel], grid: (usize, usize)) -> std::result::Result<(), Box<dyn std::error::Error>>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        for (area, panel) in root.split_evenly(grid).iter().zip(panels) {
            draw_panel(area, panel)?;
        }
        root.present()?;
        Ok(())
    }
    let draw = || match ext.as_str() {
        "png" => draw(BitMapBackend::new(&tmp, size).into_drawing_area(), panels, (rows, columns)),
        _ => draw(SVGBackend::new(&tmp, size).into_drawing_area(), panels, (rows, columns)),
    };
    draw().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        EvalError::Input(format!("{}: cannot draw the plot: {e}", path.display()))
    })?;
    std::fs::rename(&tmp, path).map_err(|e| EvalError::Input(format!("{}: {e}", path.display())))
}

/// The panels of a training run from its metrics.jsonl text: loss and validation loss,
/// validation bits per byte (when logged), learning rate and tokens per second, against step.
/// A malformed line is an error naming its line number.
pub fn run_panels(metrics: &str) -> Result<Vec<Panel>> {
    let fields = ["loss", "val_loss", "val_bpb", "lr", "tokens_per_s", "grad_norm"];
    let mut columns: Vec<Vec<(f64, f64)>> = vec![Vec::new(); fields.len()];
    for (n, line) in metrics.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| EvalError::Input(format!("line {}: not JSON: {e}", n + 1)))?;
        let step = v.get("step").and_then(serde_json::Value::as_f64).ok_or_else(|| EvalError::Input(format!("line {}: no `step`", n + 1)))?;
        for (field, column) in fields.iter().zip(columns.iter_mut()) {
            if let Some(y) = v.get(*field).and_then(serde_json::Value::as_f64) {
                column.push((step, y));
            }
        }
    }
    if columns[0].is_empty() {
        return Err(EvalError::Input("no logged steps (no line with `step` and `loss`)".into()));
    }
    let [loss, val_loss, val_bpb, lr, tps, grad_norm]: [Vec<(f64, f64)>; 6] = columns.try_into().expect("six columns");
    let panel = |title: &str, y: &str, series: Vec<Series>| Panel { title: title.into(), x_label: "step".into(), y_label: y.into(), series, markers: false };
    let mut panels = vec![panel("loss", "nats", vec![Series::new("train", loss), Series::new("validation", val_loss)])];
    if !val_bpb.is_empty() {
        panels.push(panel("validation bits per byte", "bits/byte", vec![Series::new("validation", val_bpb)]));
    } else {
        panels.push(panel("gradient norm", "norm", vec![Series::new("grad_norm", grad_norm)]));
    }
    panels.push(panel("learning rate", "lr", vec![Series::new("lr", lr)]));
    panels.push(panel("throughput", "tokens/s", vec![Series::new("tokens/s", tps)]));
    Ok(panels)
}

/// A panel of a run's position_loss.jsonl: validation loss by context position, one line with
/// a 95% band per logged step (at most `max_lines`, evenly spaced, the last always included).
pub fn position_panel(text: &str, max_lines: usize) -> Result<Panel> {
    let mut logs = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| EvalError::Input(format!("line {}: not JSON: {e}", n + 1)))?;
        let numbers = |key: &str| -> Option<Vec<f64>> { v.get(key)?.as_array()?.iter().map(|x| x.as_f64().or(Some(f64::NAN))).collect() };
        match (v.get("step").and_then(serde_json::Value::as_u64), numbers("loss"), numbers("stderr")) {
            (Some(step), Some(loss), Some(stderr)) if loss.len() == stderr.len() => logs.push((step, loss, stderr)),
            _ => return Err(EvalError::Input(format!("line {}: expected `step`, and `loss` and `stderr` lists of one length", n + 1))),
        }
    }
    if logs.is_empty() {
        return Err(EvalError::Input("no position loss lines".into()));
    }
    let keep = max_lines.clamp(1, logs.len());
    let picked: Vec<usize> = (0..keep).map(|i| if keep == 1 { logs.len() - 1 } else { i * (logs.len() - 1) / (keep - 1) }).collect();
    let series = picked
        .iter()
        .map(|&i| {
            let (step, loss, stderr) = &logs[i];
            Series {
                name: format!("step {step}"),
                points: loss.iter().enumerate().map(|(p, &l)| ((p + 1) as f64, l)).collect(),
                band: loss.iter().zip(stderr).map(|(&l, &e)| (l - 1.96 * e, l + 1.96 * e)).collect(),
            }
        })
        .collect();
    Ok(Panel { title: "validation loss by context position".into(), x_label: "position".into(), y_label: "nats (95% band)".into(), series, markers: false })
}

/// The figure of a training run's curves in `out`: loss, validation loss, bits per byte,
/// learning rate and tokens/s against step (`RUN/metrics.jsonl`), and validation loss by context
/// position when the run logged it (`RUN/position_loss.jsonl`). Returns the number of panels.
pub fn run_figure(run: &Path, out: &Path) -> Result<usize> {
    let read = |path: &Path| std::fs::read_to_string(path).map_err(|e| EvalError::Input(format!("{}: cannot read: {e}", path.display())));
    let in_file = |path: &Path, e: EvalError| EvalError::Input(format!("{}: {e}", path.display()));
    let metrics = run.join("metrics.jsonl");
    let mut panels = run_panels(&read(&metrics)?).map_err(|e| in_file(&metrics, e))?;
    let positions = run.join("position_loss.jsonl");
    if positions.is_file() {
        panels.push(position_panel(&read(&positions)?, 6).map_err(|e| in_file(&positions, e))?);
    }
    figure(out, &panels, 2)?;
    Ok(panels.len())
}

/// The padded x and y ranges of the finite points (bands included), if any.
fn bounds(series: &[Series]) -> Option<((f64, f64), (f64, f64))> {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for s in series {
        let band = s.points.iter().zip(&s.band).flat_map(|(&(x, _), &(lo, hi))| [(x, lo), (x, hi)]);
        for (x, y) in s.points.iter().copied().chain(band).filter(|(x, y)| x.is_finite() && y.is_finite()) {
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
    }
    let pad = |lo: f64, hi: f64| {
        let d = ((hi - lo) * 0.05).max(1e-9);
        (lo - d, hi + d)
    };
    x0.is_finite().then(|| (pad(x0, x1), pad(y0, y1)))
}

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, plotters::coord::Shift>, panel: &Panel) -> std::result::Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    let Some(((x0, x1), (y0, y1))) = bounds(&panel.series) else {
        area.titled(&format!("{}: no data", panel.title), ("sans-serif", 18))?;
        return Ok(());
    };
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    chart.configure_mesh().x_desc(&panel.x_label).y_desc(&panel.y_label).draw()?;
    for (i, s) in panel.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        if !s.band.is_empty() {
            let upper = s.points.iter().zip(&s.band).map(|(&(x, _), &(_, hi))| (x, hi));
            let lower = s.points.iter().zip(&s.band).rev().map(|(&(x, _), &(lo, _))| (x, lo));
            let outline: Vec<(f64, f64)> = upper.chain(lower).filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
            chart.draw_series(std::iter::once(Polygon::new(outline, color.mix(0.2).filled())))?;
        }
        let line: Vec<(f64, f64)> = s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
        chart
            .draw_series(LineSeries::new(line.iter().copied(), color.stroke_width(2)))?
            .label(s.name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        if panel.markers {
            chart.draw_series(line.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_groups_and_svg_is_written() {
        let csv = "model,step,bpb\na,1,3.0\nb,1,2.5\na,2,2.0\n";
        let s = series_from_csv(csv, "step", "bpb", Some("model")).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0], Series::new("a", vec![(1.0, 3.0), (2.0, 2.0)]));
        let e = series_from_csv(csv, "time", "bpb", None).unwrap_err().to_string();
        assert!(e.contains("`time`") && e.contains("model, step, bpb"), "{e}");
        // A sweep's labels are quoted and may hold commas (`lr=1e-3, wd=0.1`).
        let quoted = "variant,steps,loss\n\"lr=0.001, wd=0.1\",10,3.5\n\"lr=0.002, wd=0\",10,3.25\n\"lr=0.001, wd=0.1\",20,3.0\n";
        let q = series_from_csv(quoted, "steps", "loss", Some("variant")).unwrap();
        assert_eq!(q.len(), 2);
        assert_eq!(q[0], Series::new("lr=0.001, wd=0.1", vec![(10.0, 3.5), (20.0, 3.0)]));
        assert_eq!(q[1], Series::new("lr=0.002, wd=0", vec![(10.0, 3.25)]));
        let e = series_from_csv("x,y\n1,oops\n", "x", "y", None).unwrap_err().to_string();
        assert!(e.contains("row 2") && e.contains("`y`"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.svg");
        line_plot(&path, "bits per byte", "step", "bpb", &s).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("bits per byte") && svg.contains("\na\n</text>"), "{}", &svg[..200]);
        assert!(line_plot(&path, "t", "x", "y", &[]).is_err());
        // PNG from the same call, text drawn with the compiled-in font; other extensions refused.
        let png = dir.path().join("p.png");
        line_plot(&png, "bits per byte", "step", "bpb", &s).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 5000, "{}", bytes.len());
        let e = line_plot(&dir.path().join("p.jpg"), "t", "x", "y", &s).unwrap_err().to_string();
        assert!(e.contains(".svg or .png"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "no temporary files left");
    }

    #[test]
    fn run_panels_from_metrics() {
        let metrics = "{\"step\":10,\"loss\":5.0,\"lr\":0.001,\"tokens_per_s\":900.0}\n{\"step\":20,\"loss\":4.0,\"val_loss\":4.2,\"val_bpb\":1.5,\"lr\":0.002,\"tokens_per_s\":950.0}\n";
        let panels = run_panels(metrics).unwrap();
        let titles: Vec<&str> = panels.iter().map(|p| p.title.as_str()).collect();
        assert_eq!(titles, ["loss", "validation bits per byte", "learning rate", "throughput"]);
        assert_eq!(panels[0].series[0].points, vec![(10.0, 5.0), (20.0, 4.0)]);
        assert_eq!(panels[0].series[1].points, vec![(20.0, 4.2)]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.svg");
        figure(&path, &panels, 2).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("throughput") && svg.contains("learning rate"));
        let e = run_panels("{\"step\":1,\"loss\":2}\nnot json\n").unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        assert!(run_panels("").is_err());
    }

    #[test]
    fn position_panel_picks_evenly_spaced_steps() {
        let lines: String = (1..=5).map(|s| format!("{{\"step\":{s},\"windows\":4,\"loss\":[{s}.0,1.0],\"stderr\":[0.1,0.1]}}\n")).collect();
        let p = position_panel(&lines, 3).unwrap();
        let names: Vec<&str> = p.series.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["step 1", "step 3", "step 5"]);
        assert_eq!(p.series[2].points, vec![(1.0, 5.0), (2.0, 1.0)]);
        assert!((p.series[2].band[0].1 - 5.196).abs() < 1e-9);
        assert!(position_panel("{\"step\":1,\"loss\":[1.0]}\n", 3).unwrap_err().to_string().contains("line 1"));
    }

    #[test]
    fn bands_are_drawn_and_bound_the_axes() {
        let s = Series { name: "m".into(), points: vec![(0.0, 1.0), (1.0, 2.0)], band: vec![(0.5, 1.5), (1.0, 9.0)] };
        assert_eq!(bounds(std::slice::from_ref(&s)).map(|(_, (_, hi))| hi > 9.0), Some(true));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("band.svg");
        line_plot(&path, "loss by position", "position", "nats", &[s]).unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().contains("<polygon"));
    }
}
