//! Line plots as SVG files (plotters' SVG backend, no system fonts needed), and the CSV tables
//! they are drawn from.

use crate::{EvalError, Result};
use plotters::prelude::*;
use std::path::Path;

/// One named line: `(x, y)` points in drawing order.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend label.
    pub name: String,
    /// Points.
    pub points: Vec<(f64, f64)>,
}

/// Lines of `rows` (a CSV table with a header) grouped by column `group` (one line per distinct
/// value, in order of appearance; all rows in one line without it), `y` against `x`. The error
/// names the missing column or the row whose value is not a number.
pub fn series_from_csv(text: &str, x: &str, y: &str, group: Option<&str>) -> Result<Vec<Series>> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines.next().ok_or_else(|| EvalError::Input("the CSV is empty".into()))?.split(',').map(str::trim).collect();
    let col = |name: &str| {
        header.iter().position(|h| *h == name).ok_or_else(|| EvalError::Input(format!("no column `{name}` (columns: {})", header.join(", "))))
    };
    let (xi, yi) = (col(x)?, col(y)?);
    let gi = group.map(col).transpose()?;
    let mut out: Vec<Series> = Vec::new();
    for (n, line) in lines.enumerate() {
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        let num = |i: usize, name: &str| {
            cells.get(i).and_then(|c| c.parse::<f64>().ok()).ok_or_else(|| EvalError::Input(format!("row {}: `{name}` is not a number", n + 2)))
        };
        let point = (num(xi, x)?, num(yi, y)?);
        let name = gi.and_then(|g| cells.get(g)).map_or(y.to_string(), |s| s.to_string());
        match out.iter_mut().find(|s| s.name == name) {
            Some(s) => s.points.push(point),
            None => out.push(Series { name, points: vec![point] }),
        }
    }
    Ok(out)
}

/// Draws `series` as lines with markers into an SVG file at `path` (written to a temporary
/// name, then renamed).
pub fn line_plot(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Result<()> {
    let points = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points.filter(|(x, y)| x.is_finite() && y.is_finite()) {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if !x0.is_finite() {
        return Err(EvalError::Input("nothing to plot: no finite points".into()));
    }
    let pad = |lo: f64, hi: f64| {
        let d = ((hi - lo) * 0.05).max(1e-9);
        (lo - d, hi + d)
    };
    let ((x0, x1), (y0, y1)) = (pad(x0, x1), pad(y0, y1));
    let tmp = path.with_file_name(format!(".{}.tmp-{}", path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), std::process::id()));
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(&tmp, (900, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        chart.configure_mesh().x_desc(x_label).y_desc(y_label).draw()?;
        for (i, s) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)))?
                .label(s.name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        EvalError::Input(format!("{}: cannot draw the plot: {e}", path.display()))
    })?;
    std::fs::rename(&tmp, path).map_err(|e| EvalError::Input(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_groups_and_svg_is_written() {
        let csv = "model,step,bpb\na,1,3.0\nb,1,2.5\na,2,2.0\n";
        let s = series_from_csv(csv, "step", "bpb", Some("model")).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0], Series { name: "a".into(), points: vec![(1.0, 3.0), (2.0, 2.0)] });
        let e = series_from_csv(csv, "time", "bpb", None).unwrap_err().to_string();
        assert!(e.contains("`time`") && e.contains("model, step, bpb"), "{e}");
        let e = series_from_csv("x,y\n1,oops\n", "x", "y", None).unwrap_err().to_string();
        assert!(e.contains("row 2") && e.contains("`y`"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.svg");
        line_plot(&path, "bits per byte", "step", "bpb", &s).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("bits per byte") && svg.contains("\na\n</text>"), "{}", &svg[..200]);
        assert!(line_plot(&path, "t", "x", "y", &[]).is_err());
    }
}
