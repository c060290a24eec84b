//! Scatter plot of predictions against MOS, with the fitted logistic curve.
//!
//! A correlation coefficient hides *how* a model fails (saturation, a few outliers, a flipped
//! range); one picture shows it. Plotters draws the shapes; text is drawn with a small built-in
//! 5×7 pixel font so that no system font library (fontconfig/freetype) is needed to build or run.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::metrics::Logistic4;

/// Errors while drawing a plot.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("plot file {path} must end in .png or .svg")]
    UnknownFormat { path: String },
    #[error("nothing to plot: {0}")]
    NoData(String),
    #[error("cannot draw {path}: {message}")]
    Draw { path: String, message: String },
}

/// What to draw.
#[derive(Debug, Clone, Copy)]
pub struct ScatterPlot<'a> {
    /// Horizontal axis: the predictions.
    pub prediction: &'a [f64],
    /// Vertical axis: the MOS.
    pub mos: &'a [f64],
    /// The fitted curve MOS ≈ f(prediction), drawn as a line.
    pub curve: Option<&'a Logistic4>,
    /// One line of text above the plot (e.g. "n=2010 SRCC=0.912 PLCC=0.921").
    pub title: &'a str,
}

/// The file formats a plot can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlotFormat {
    Png,
    Svg,
}

impl PlotFormat {
    /// The format named by the path's extension (case-insensitive), if supported.
    pub fn of_path(path: &Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "png" => Some(Self::Png),
            "svg" => Some(Self::Svg),
            _ => None,
        }
    }
}

const WIDTH: u32 = 800;
const HEIGHT: u32 = 600;
const LEFT: i32 = 80;
const RIGHT: i32 = 24;
const TOP: i32 = 48;
const BOTTOM: i32 = 64;

/// Draw the plot to `path` (`.png` or `.svg`).
pub fn draw_scatter(path: &Path, plot: &ScatterPlot<'_>) -> Result<(), PlotError> {
    let shown = path.display().to_string();
    if plot.prediction.is_empty() || plot.prediction.len() != plot.mos.len() {
        return Err(PlotError::NoData(format!(
            "{} predictions and {} MOS values",
            plot.prediction.len(),
            plot.mos.len()
        )));
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let draw_error = |e: String| PlotError::Draw {
        path: shown.clone(),
        message: e,
    };
    match ext.as_deref() {
        Some("png") => {
            let area = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
            render(&area, plot).map_err(|e| draw_error(e.to_string()))?;
            area.present().map_err(|e| draw_error(e.to_string()))
        }
        Some("svg") => {
            let area = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
            render(&area, plot).map_err(|e| draw_error(e.to_string()))?;
            area.present().map_err(|e| draw_error(e.to_string()))
        }
        _ => Err(PlotError::UnknownFormat { path: shown }),
    }
}

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// Maps data coordinates to pixels inside the plotting box.
struct Frame {
    x_range: (f64, f64),
    y_range: (f64, f64),
}

impl Frame {
    fn px(&self, x: f64) -> i32 {
        let w = (WIDTH as i32 - LEFT - RIGHT) as f64;
        LEFT + ((x - self.x_range.0) / (self.x_range.1 - self.x_range.0) * w).round() as i32
    }
    fn py(&self, y: f64) -> i32 {
        let h = (HEIGHT as i32 - TOP - BOTTOM) as f64;
        HEIGHT as i32
            - BOTTOM
            - ((y - self.y_range.0) / (self.y_range.1 - self.y_range.0) * h).round() as i32
    }
}

fn finite_range(values: &[f64]) -> (f64, f64) {
    let lo = values
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(f64::INFINITY, f64::min);
    let hi = values
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo <= f64::EPSILON * lo.abs().max(1.0) {
        return (lo - 0.5, hi + 0.5);
    }
    let pad = (hi - lo) * 0.04;
    (lo - pad, hi + pad)
}

/// A "nice" tick step (1, 2 or 5 × 10^k) giving about `target` ticks over `span`.
fn tick_step(span: f64, target: f64) -> f64 {
    let raw = span / target;
    let magnitude = 10f64.powf(raw.log10().floor());
    let residual = raw / magnitude;
    let nice = if residual < 1.5 {
        1.0
    } else if residual < 3.5 {
        2.0
    } else if residual < 7.5 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

fn ticks(range: (f64, f64)) -> (Vec<f64>, usize) {
    let step = tick_step(range.1 - range.0, 6.0);
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let first = (range.0 / step).ceil() as i64;
    let last = (range.1 / step).floor() as i64;
    ((first..=last).map(|k| k as f64 * step).collect(), decimals)
}

fn render<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    plot: &ScatterPlot<'_>,
) -> DrawResult<DB> {
    area.fill(&WHITE)?;
    let frame = Frame {
        x_range: finite_range(plot.prediction),
        y_range: finite_range(plot.mos),
    };
    let (x0, x1) = (LEFT, WIDTH as i32 - RIGHT);
    let (y0, y1) = (TOP, HEIGHT as i32 - BOTTOM);
    let grid = RGBColor(225, 225, 225);
    let ink = RGBColor(40, 40, 40);

    let (xt, xd) = ticks(frame.x_range);
    for &t in &xt {
        let x = frame.px(t);
        area.draw(&PathElement::new(vec![(x, y0), (x, y1)], grid))?;
        area.draw(&PathElement::new(vec![(x, y1), (x, y1 + 5)], ink))?;
        let label = format!("{t:.xd$}");
        draw_text(
            area,
            &label,
            x - text_width(&label, 2) / 2,
            y1 + 10,
            2,
            &ink,
        )?;
    }
    let (yt, yd) = ticks(frame.y_range);
    for &t in &yt {
        let y = frame.py(t);
        area.draw(&PathElement::new(vec![(x0, y), (x1, y)], grid))?;
        area.draw(&PathElement::new(vec![(x0 - 5, y), (x0, y)], ink))?;
        let label = format!("{t:.yd$}");
        draw_text(
            area,
            &label,
            x0 - 10 - text_width(&label, 2),
            y - 7,
            2,
            &ink,
        )?;
    }
    area.draw(&Rectangle::new([(x0, y0), (x1, y1)], ink.stroke_width(1)))?;

    let dot = RGBColor(31, 119, 180).mix(0.45).filled();
    for (&p, &m) in plot.prediction.iter().zip(plot.mos) {
        if p.is_finite() && m.is_finite() {
            area.draw(&Circle::new((frame.px(p), frame.py(m)), 3, dot))?;
        }
    }

    if let Some(curve) = plot.curve {
        let steps = 240;
        let points: Vec<(i32, i32)> = (0..=steps)
            .map(|k| {
                let x =
                    frame.x_range.0 + (frame.x_range.1 - frame.x_range.0) * k as f64 / steps as f64;
                (frame.px(x), frame.py(curve.eval(x)))
            })
            .filter(|&(_, py)| (y0..=y1).contains(&py))
            .collect();
        area.draw(&PathElement::new(
            points,
            RGBColor(214, 39, 40).stroke_width(2),
        ))?;
    }

    draw_text(area, plot.title, x0, 16, 2, &ink)?;
    let x_label = "PREDICTION";
    draw_text(
        area,
        x_label,
        (x0 + x1 - text_width(x_label, 2)) / 2,
        HEIGHT as i32 - 26,
        2,
        &ink,
    )?;
    draw_text(area, "MOS", 8, y0 - 2, 2, &ink)?;
    if plot.curve.is_some() {
        let legend = "LOGISTIC FIT";
        let lx = x1 - text_width(legend, 2) - 10;
        area.draw(&Rectangle::new(
            [(lx - 42, y0 + 4), (x1 - 4, y0 + 30)],
            WHITE.mix(0.85).filled(),
        ))?;
        area.draw(&PathElement::new(
            vec![(lx - 34, y0 + 17), (lx - 8, y0 + 17)],
            RGBColor(214, 39, 40).stroke_width(2),
        ))?;
        draw_text(area, legend, lx, y0 + 10, 2, &ink)?;
    }
    Ok(())
}

/// Glyph rows (top to bottom), 5 bits each, most significant bit on the left.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1E],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x0A, 0x04, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '[' => [0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E],
        ']' => [0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E],
        '/' => [0x01, 0x02, 0x02, 0x04, 0x08, 0x08, 0x10],
        '_' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        ' ' => [0x00; 7],
        _ => [0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F],
    }
}

/// Advance per character: 5 pixels of glyph and 1 of spacing, times `scale`.
fn text_width(text: &str, scale: i32) -> i32 {
    text.chars().count() as i32 * 6 * scale
}

/// Draw `text` with its top-left corner at (x, y), each font pixel a `scale`×`scale` square.
fn draw_text<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    text: &str,
    x: i32,
    y: i32,
    scale: i32,
    color: &RGBColor,
) -> DrawResult<DB> {
    for (k, c) in text.chars().enumerate() {
        let gx = x + k as i32 * 6 * scale;
        for (row, bits) in glyph(c).iter().enumerate() {
            for col in 0..5 {
                if bits & (0x10 >> col) != 0 {
                    let px = gx + col * scale;
                    let py = y + row as i32 * scale;
                    area.draw(&Rectangle::new(
                        [(px, py), (px + scale, py + scale)],
                        color.filled(),
                    ))?;
                }
            }
        }
    }
    Ok(())
}
