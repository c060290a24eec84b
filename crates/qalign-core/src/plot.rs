//! Scatter plot of predictions against MOS, with the fitted logistic curve.
//!
//! A correlation coefficient hides *how* a model fails (saturation, a few outliers, a flipped
//! range); one picture shows it. Plotters' `ChartBuilder` draws axes, ticks and legend; text is
//! set in an embedded subset of DejaVu Sans (through `ab_glyph`, see THIRD-PARTY-NOTICES.md), so
//! no system font library (fontconfig/freetype) is needed to build or run. PNGs are encoded with
//! the `png` crate.

use std::path::Path;
use std::sync::OnceLock;

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
    #[error("cannot write {path}: {error}")]
    Write { path: String, error: std::io::Error },
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

/// DejaVu Sans 2.37, subset to printable ASCII and a few symbols (± · × – — … − ≈ ≤ ≥).
static FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSans-subset.ttf");
/// Registered under the generic family name, so SVG viewers show a sans-serif font too.
const FONT: &str = "sans-serif";

/// Register the embedded font with plotters once; false if it could not be parsed.
fn font_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY
        .get_or_init(|| plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok())
}

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
    let format = PlotFormat::of_path(path).ok_or_else(|| PlotError::UnknownFormat {
        path: shown.clone(),
    })?;
    let draw_error = |message: String| PlotError::Draw {
        path: shown.clone(),
        message,
    };
    if !font_ready() {
        return Err(draw_error(
            "the embedded font could not be loaded".to_string(),
        ));
    }
    let write_error = |error: std::io::Error| PlotError::Write {
        path: shown.clone(),
        error,
    };
    match format {
        PlotFormat::Png => {
            let mut rgb = vec![0u8; WIDTH as usize * HEIGHT as usize * 3];
            {
                let area =
                    BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
                render(&area, plot).map_err(|e| draw_error(e.to_string()))?;
                area.present().map_err(|e| draw_error(e.to_string()))?;
            }
            // Atomically: a failed write keeps the previous plot rather than a truncated PNG.
            crate::atomic::write_atomic(path, |file, _| {
                let mut out = std::io::BufWriter::new(file);
                encode_png(&mut out, &rgb).map_err(std::io::Error::other)?;
                std::io::Write::flush(&mut out)
            })
            .map_err(write_error)
        }
        PlotFormat::Svg => {
            let mut svg = String::new();
            {
                let area = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
                render(&area, plot).map_err(|e| draw_error(e.to_string()))?;
                area.present().map_err(|e| draw_error(e.to_string()))?;
            }
            crate::atomic::write_bytes_atomic(path, svg.as_bytes()).map_err(write_error)
        }
    }
}

fn encode_png<W: std::io::Write>(out: W, rgb: &[u8]) -> Result<(), png::EncodingError> {
    let mut encoder = png::Encoder::new(out, WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()
}

/// The finite values' range, padded by 4% (or ±0.5 around a single value), kept finite.
fn finite_range(values: &[f64]) -> (f64, f64) {
    let finite = || values.iter().copied().filter(|v| v.is_finite());
    let lo = finite().fold(f64::INFINITY, f64::min);
    let hi = finite().fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    // Half-differences so that a range spanning ±f64::MAX does not overflow.
    let half_span = hi / 2.0 - lo / 2.0;
    if half_span <= f64::EPSILON * lo.abs().max(1.0) / 2.0 {
        let pad = 0.5f64.max(lo.abs() * 1e-6);
        return (lo - pad, hi + pad);
    }
    let pad = half_span * 0.08;
    ((lo - pad).max(-f64::MAX), (hi + pad).min(f64::MAX))
}

/// How one axis shows its values: divided by 10^exponent when they are very large or very
/// small (the exponent goes into the axis description), so ticks read as plain decimals.
struct Axis {
    exponent: i32,
    divisor: f64,
}

impl Axis {
    fn of(values: &[f64]) -> Self {
        let magnitude = values
            .iter()
            .filter(|v| v.is_finite())
            .fold(0.0f64, |m, v| m.max(v.abs()));
        let exponent = if magnitude >= 1e6 || (magnitude > 0.0 && magnitude < 1e-3) {
            (magnitude.log10().floor() as i32).clamp(-307, 308)
        } else {
            0
        };
        Self {
            exponent,
            divisor: 10f64.powi(exponent),
        }
    }

    fn shown(&self, v: f64) -> f64 {
        if self.exponent == 0 {
            v
        } else {
            v / self.divisor
        }
    }

    fn describe(&self, name: &str) -> String {
        if self.exponent == 0 {
            name.to_string()
        } else {
            format!("{name} (×1e{})", self.exponent)
        }
    }
}

/// Tick label text on an axis spanning 2 · `half_span`: as many decimals as the spacing needs.
fn tick_label(value: f64, half_span: f64) -> String {
    // log10 of a tenth of the span: about the tick spacing.
    let step_log = half_span.log10() + std::f64::consts::LOG10_2 - 1.0;
    let decimals = (-step_log.floor()).clamp(0.0, 12.0) as usize;
    let text = format!("{value:.decimals$}");
    // "-0.00" reads as a bug.
    match text.strip_prefix('-') {
        Some(rest) if rest.chars().all(|c| c == '0' || c == '.') => rest.to_string(),
        _ => text,
    }
}

fn render<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    plot: &ScatterPlot<'_>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    area.fill(&WHITE)?;
    let (x_axis, y_axis) = (Axis::of(plot.prediction), Axis::of(plot.mos));
    let xs: Vec<f64> = plot.prediction.iter().map(|&v| x_axis.shown(v)).collect();
    let ys: Vec<f64> = plot.mos.iter().map(|&v| y_axis.shown(v)).collect();
    let (x0, x1) = finite_range(&xs);
    let (y0, y1) = finite_range(&ys);
    let ink = RGBColor(40, 40, 40);
    let red = RGBColor(214, 39, 40);
    let mut chart = ChartBuilder::on(area)
        .caption(plot.title, (FONT, 20).into_font().color(&ink))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    let (x_half, y_half) = (x1 / 2.0 - x0 / 2.0, y1 / 2.0 - y0 / 2.0);
    let x_fmt = |v: &f64| tick_label(*v, x_half);
    let y_fmt = |v: &f64| tick_label(*v, y_half);
    let (x_desc, y_desc) = (x_axis.describe("prediction"), y_axis.describe("MOS"));
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_labels(7)
        .y_labels(7)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .label_style((FONT, 14).into_font().color(&ink))
        .axis_desc_style((FONT, 16).into_font().color(&ink))
        .axis_style(ink)
        .bold_line_style(RGBColor(225, 225, 225))
        .light_line_style(RGBColor(245, 245, 245))
        .draw()?;

    let dot = RGBColor(31, 119, 180).mix(0.45).filled();
    chart.draw_series(
        xs.iter()
            .zip(&ys)
            .filter(|(p, m)| p.is_finite() && m.is_finite())
            .map(|(&p, &m)| Circle::new((p, m), 3, dot)),
    )?;

    if let Some(curve) = plot.curve {
        let steps = 240;
        let points: Vec<(f64, f64)> = (0..=steps)
            .map(|k| {
                let t = k as f64 / steps as f64;
                let x = x0 + x_half * 2.0 * t;
                (x, y_axis.shown(curve.eval(x * x_axis.divisor)))
            })
            .filter(|&(_, y)| (y0..=y1).contains(&y))
            .collect();
        chart
            .draw_series(LineSeries::new(points, red.stroke_width(2)))?
            .label("logistic fit")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], red.stroke_width(2)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font((FONT, 14).into_font().color(&ink))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .draw()?;
    }
    Ok(())
}
