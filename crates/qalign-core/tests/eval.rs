//! Evaluation: the path-join rule, lenient metrics for degenerate predictions, and plots.

mod common;

use common::{assert_close, labels};
use qalign_core::MediaKind;
use qalign_core::dataset::{Columns, LabelItem, Prediction, read_labels};
use qalign_core::eval::{EvalOptions, evaluate, join, normalize_path};
use qalign_core::metrics::{BootstrapOptions, MetricError};
use qalign_core::plot::{PlotError, ScatterPlot, draw_scatter};

fn label(path: &str, score: f64) -> LabelItem {
    LabelItem {
        path: path.to_string(),
        score,
        kind: MediaKind::from_extension(std::path::Path::new(path)).unwrap_or(MediaKind::Image),
        id: None,
        answer: None,
    }
}

fn pred(path: &str, score: f64) -> Prediction {
    Prediction {
        path: path.to_string(),
        score,
        task: None,
    }
}

#[test]
fn normalisation() {
    assert_eq!(normalize_path("./a//b/./c.jpg"), "a/b/c.jpg");
    assert_eq!(
        normalize_path("C:\\data\\koniq\\1.jpg"),
        "C:/data/koniq/1.jpg"
    );
    assert_eq!(normalize_path("/abs/x.png"), "abs/x.png");
}

#[test]
fn join_rule_exact_then_unique_longest_suffix() {
    let labels = vec![
        label("koniq/1.jpg", 10.0),
        label("spaq/1.jpg", 20.0),
        label("koniq/2.jpg", 30.0),
        label("live/a/3.bmp", 40.0),
        label("live/b/3.bmp", 50.0),
        label("never.jpg", 60.0),
    ];
    let preds = vec![
        pred("./koniq/1.jpg", 1.0),          // exact after normalisation
        pred("/data/spaq/1.jpg", 2.0),       // suffix: spaq/1.jpg (2 components) beats koniq/1.jpg
        pred("D:\\sets\\koniq\\2.jpg", 3.0), // Windows path, suffix
        pred("3.bmp", 4.0),                  // ambiguous: a/3.bmp and b/3.bmp tie
        pred("/x/b/3.bmp", 5.0),             // suffix b/3.bmp is unique
        pred("koniq/1.jpg", 6.0),            // duplicate of the first
        pred("other.jpg", 7.0),              // no label
    ];
    let j = join(&preds, &labels);
    let got: Vec<(&str, f64, f64)> = j
        .pairs
        .iter()
        .map(|p| (p.label_path.as_str(), p.prediction, p.mos))
        .collect();
    assert_eq!(
        got,
        vec![
            ("koniq/1.jpg", 1.0, 10.0),
            ("spaq/1.jpg", 2.0, 20.0),
            ("koniq/2.jpg", 3.0, 30.0),
            ("live/b/3.bmp", 5.0, 50.0),
        ]
    );
    assert_eq!(j.ambiguous_predictions, ["3.bmp"]);
    assert_eq!(j.duplicate_predictions, ["koniq/1.jpg"]);
    assert_eq!(j.unmatched_predictions, ["other.jpg"]);
    assert_eq!(j.unmatched_labels, ["live/a/3.bmp", "never.jpg"]);
}

/// A label goes to the prediction that matches it most closely, wherever that prediction stands:
/// before, the first same-named prediction took it and the exact one became a "duplicate".
#[test]
fn the_closest_match_wins_regardless_of_order() {
    let labels = vec![label("a/1.jpg", 10.0), label("k/2.jpg", 20.0)];
    let preds = vec![
        pred("b/1.jpg", 1.0),    // other folder, same name: not this label's image
        pred("1.jpg", 2.0),      // a bare name: a suffix of the label, so a duplicate
        pred("/p/a/1.jpg", 3.0), // a suffix match, beaten by the exact path below
        pred("a/1.jpg", 4.0),    // exact
        pred("/q/k/2.jpg", 5.0), // suffix match, first of two equally close
        pred("/r/k/2.jpg", 6.0), // as close: a duplicate
    ];
    let j = join(&preds, &labels);
    let got: Vec<(&str, &str, f64)> = j
        .pairs
        .iter()
        .map(|p| {
            (
                p.label_path.as_str(),
                p.prediction_path.as_str(),
                p.prediction,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![("a/1.jpg", "a/1.jpg", 4.0), ("k/2.jpg", "/q/k/2.jpg", 5.0)]
    );
    assert_eq!(j.unmatched_predictions, ["b/1.jpg"]);
    assert_eq!(
        j.duplicate_predictions,
        ["1.jpg", "/p/a/1.jpg", "/r/k/2.jpg"]
    );
    assert!(j.ambiguous_predictions.is_empty() && j.unmatched_labels.is_empty());
}

/// A whole LIVE folder scored, evaluated on a split: LIVE reuses `img1.bmp` … in every
/// distortion folder, and first-come matching paired most of the split with other folders'
/// images (SRCC 0.75 instead of 0.99 on the official ft/live split 1). Expected values: scipy
/// `spearmanr` / `pearsonr` on the correct pairs.
#[test]
fn a_split_joins_to_its_own_images_in_a_whole_folder_of_predictions() {
    let ds = read_labels(&labels("live.json"), &Columns::default()).unwrap();
    // Predictions for every image, in directory-walk (sorted) order, MOS plus a fixed offset.
    let mut all: Vec<(&str, f64)> = ds
        .items
        .iter()
        .map(|l| (l.path.as_str(), l.score))
        .collect();
    all.sort_by(|a, b| a.0.cmp(b.0));
    let split: Vec<LabelItem> = ds.items.iter().step_by(5).cloned().collect();
    assert_eq!(split.len(), 197);
    for prefix in ["", "/data/"] {
        let preds: Vec<Prediction> = all
            .iter()
            .enumerate()
            .map(|(i, &(p, m))| pred(&format!("{prefix}{p}"), m + ((i * 37) % 101) as f64 * 0.1))
            .collect();
        let j = join(&preds, &split);
        assert_eq!(j.pairs.len(), 197, "{prefix:?}");
        for pair in &j.pairs {
            assert_eq!(pair.prediction_path, format!("{prefix}{}", pair.label_path));
        }
        assert_eq!(j.unmatched_predictions.len(), 982 - 197, "{prefix:?}");
        assert!(j.ambiguous_predictions.is_empty(), "{prefix:?}");
        assert!(j.duplicate_predictions.is_empty(), "{prefix:?}");
        assert!(j.unmatched_labels.is_empty(), "{prefix:?}");
        let options = EvalOptions {
            bootstrap: None,
            logistic: false,
        };
        let r = evaluate(&j.predictions(), &j.mos(), options, &|_| {}).unwrap();
        assert_close(r.srcc, 0.985556655130807, 1e-12, "srcc");
        assert_close(r.plcc, 0.9917106164383834, 1e-12, "plcc");
    }
}

#[test]
fn bare_file_names_match_when_unambiguous() {
    let ds = read_labels(&labels("konvid.json"), &Columns::default()).unwrap();
    let preds: Vec<Prediction> = ds
        .items
        .iter()
        .map(|l| pred(&format!("/videos/konvid/{}", l.path), l.score))
        .collect();
    let j = join(&preds, &ds.items);
    assert_eq!(j.pairs.len(), 1200);
    assert!(j.unmatched_labels.is_empty() && j.unmatched_predictions.is_empty());
}

#[test]
fn evaluate_reports_metrics_and_intervals() {
    let ds = read_labels(&labels("livec.json"), &Columns::default()).unwrap();
    let mos = ds.scores();
    let p: Vec<f64> = mos
        .iter()
        .enumerate()
        .map(|(i, &v)| v + ((i * 37) % 101) as f64 * 0.5)
        .collect();
    let opts = EvalOptions {
        bootstrap: Some(BootstrapOptions {
            resamples: 50,
            seed: 3,
            confidence: 0.9,
        }),
        logistic: true,
    };
    let r = evaluate(&p, &mos, opts, &|_| {}).unwrap();
    assert_eq!(r.n, 1169);
    // Same values as the scipy check in tests/metrics.rs (pred and MOS swapped: symmetric).
    assert_close(r.srcc, 0.7837840852667397, 1e-9, "srcc");
    assert_close(r.plcc, 0.8147046424909985, 1e-9, "plcc");
    assert_close(r.krcc, 0.5832343381285585, 1e-9, "krcc");
    assert_close(r.rmse, 28.937094394447357, 1e-9, "rmse");
    let ci = r.ci.clone().unwrap();
    assert_eq!((ci.resamples, ci.seed, ci.confidence), (50, 3, 0.9));
    assert!(ci.srcc.low < r.srcc && r.srcc < ci.srcc.high);
    let fit = r.logistic.unwrap();
    assert!(
        fit.plcc >= r.plcc - 1e-12,
        "a fitted PLCC is never worse than raw here"
    );
    assert!(r.warnings.is_empty());
    let json = serde_json::to_value(&r).unwrap();
    for key in [
        "n", "srcc", "plcc", "krcc", "rmse", "ci", "logistic", "warnings",
    ] {
        assert!(json.get(key).is_some(), "missing {key}");
    }
}

#[test]
fn constant_predictions_give_nan_with_a_warning() {
    let mos = [1.0, 2.0, 3.0, 4.0];
    let p = [3.0; 4];
    let r = evaluate(
        &p,
        &mos,
        EvalOptions {
            bootstrap: None,
            logistic: true,
        },
        &|_| {},
    )
    .unwrap();
    assert!(r.srcc.is_nan() && r.plcc.is_nan() && r.krcc.is_nan());
    assert_eq!(r.rmse, (6.0f64 / 4.0).sqrt());
    assert!(
        r.warnings
            .iter()
            .any(|w| w == "SRCC is undefined (NaN): all predictions are equal"),
        "{:?}",
        r.warnings
    );
    assert!(
        r.warnings
            .iter()
            .any(|w| w == "no logistic fit: all predictions are equal"),
        "{:?}",
        r.warnings
    );
    let json = serde_json::to_value(&r).unwrap();
    assert!(json["srcc"].is_null());
    // Too few pairs is an error, not NaN.
    assert_eq!(
        evaluate(&[1.0, 2.0], &[1.0, 2.0], EvalOptions::default(), &|_| {}).unwrap_err(),
        MetricError::TooFewPairs(2)
    );
}

/// The `<text>` contents of an SVG, in document order.
fn svg_texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| {
            let body = &t[t.find('>')? + 1..];
            Some(body[..body.find("</text>")?].trim().to_string())
        })
        .collect()
}

/// Decode a PNG: (width, height, RGB bytes).
fn decode_png(path: &std::path::Path) -> (u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

fn count_pixels(rgb: &[u8], rows: std::ops::Range<usize>, want: impl Fn(&[u8]) -> bool) -> usize {
    rgb.chunks_exact(3)
        .enumerate()
        .filter(|(i, p)| rows.contains(&(i / 800)) && want(p))
        .count()
}

#[test]
fn plots_are_written_as_png_and_svg() {
    let dir = tempfile::tempdir().unwrap();
    let x: Vec<f64> = (0..300).map(|i| 1.0 + 4.0 * i as f64 / 299.0).collect();
    let y: Vec<f64> = x
        .iter()
        .enumerate()
        .map(|(i, v)| 20.0 * v + (i % 13) as f64)
        .collect();
    let curve = qalign_core::metrics::Logistic4::fit(&x, &y).unwrap();
    let plot = ScatterPlot {
        prediction: &x,
        mos: &y,
        curve: Some(&curve),
        title: "N=300 SRCC=0.99",
    };
    let png = dir.path().join("s.png");
    draw_scatter(&png, &plot).unwrap();
    let (w, h, rgb) = decode_png(&png);
    assert_eq!((w, h), (800, 600));
    let all = 0..600;
    let white = count_pixels(&rgb, all.clone(), |p| p == [255, 255, 255]);
    assert!(white > 800 * 600 / 2, "mostly white background: {white}");
    // The logistic curve is drawn in red, the dots in translucent blue.
    let red = count_pixels(&rgb, all.clone(), |p| p == [214, 39, 40]);
    assert!(red > 500, "curve pixels: {red}");
    let blue = count_pixels(&rgb, all.clone(), |p| {
        p[2] > 150 && p[0] < 200 && p[2] > p[0] + 40
    });
    assert!(blue > 1000, "dot pixels: {blue}");
    // Text: anti-aliased dark glyphs in the title band and in the x-axis label band.
    let dark = |p: &[u8]| p.iter().all(|&c| c < 120);
    assert!(count_pixels(&rgb, 0..40, dark) > 100, "title text");
    assert!(
        count_pixels(&rgb, 560..600, dark) > 100,
        "axis description text"
    );
    let grey = |p: &[u8]| p[0] == p[1] && p[1] == p[2] && p[0] > 60 && p[0] < 230;
    assert!(
        count_pixels(&rgb, 0..40, grey) > 20,
        "anti-aliased glyph edges"
    );

    let svg_path = dir.path().join("s.SVG");
    draw_scatter(&svg_path, &plot).unwrap();
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("<circle") && svg.contains("<polyline"));
    let texts = svg_texts(&svg);
    for want in ["N=300 SRCC=0.99", "prediction", "MOS", "logistic fit"] {
        assert!(texts.iter().any(|t| t == want), "{want} in {texts:?}");
    }
    // Tick labels: numbers inside the data's padded range, and more than a handful per axis.
    let ticks: Vec<f64> = texts.iter().filter_map(|t| t.parse().ok()).collect();
    let on_x = ticks.iter().filter(|&&v| (0.8..=5.2).contains(&v)).count();
    let on_y = ticks
        .iter()
        .filter(|&&v| (15.0..=120.0).contains(&v))
        .count();
    assert!(on_x >= 4 && on_y >= 4, "{ticks:?}");
    assert!(
        svg.contains("font-family=\"sans-serif\""),
        "portable font family"
    );

    // Without a curve: no red and no legend.
    let plain = ScatterPlot {
        curve: None,
        ..plot
    };
    draw_scatter(&png, &plain).unwrap();
    let (_, _, rgb) = decode_png(&png);
    assert_eq!(count_pixels(&rgb, 0..600, |p| p == [214, 39, 40]), 0);
    draw_scatter(&svg_path, &plain).unwrap();
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(!svg_texts(&svg).iter().any(|t| t == "logistic fit"));

    assert!(matches!(
        draw_scatter(&dir.path().join("s.gif"), &plot),
        Err(PlotError::UnknownFormat { .. })
    ));
    let empty = ScatterPlot {
        prediction: &[],
        mos: &[],
        curve: None,
        title: "",
    };
    assert!(matches!(
        draw_scatter(&png, &empty),
        Err(PlotError::NoData(_))
    ));
    assert!(matches!(
        draw_scatter(&dir.path().join("no/such/dir/s.png"), &plain),
        Err(PlotError::Write { .. })
    ));
}

/// Extreme magnitudes plot without overflow: ticks in scientific notation, the data on screen.
#[test]
fn plots_at_extreme_magnitudes() {
    let dir = tempfile::tempdir().unwrap();
    for k in [1e155, 1e-155] {
        let x: Vec<f64> = (0..50).map(|i| (1.0 + i as f64) * k).collect();
        let y: Vec<f64> = (0..50).map(|i| (100.0 - i as f64) * k).collect();
        let plot = ScatterPlot {
            prediction: &x,
            mos: &y,
            curve: None,
            title: "extreme",
        };
        let svg_path = dir.path().join("x.svg");
        draw_scatter(&svg_path, &plot).unwrap();
        let svg = std::fs::read_to_string(&svg_path).unwrap();
        // The axes show the values over a power of ten, named in the axis description.
        let texts = svg_texts(&svg);
        let (ex, ey) = if k > 1.0 { (156, 157) } else { (-154, -153) };
        assert!(
            texts.contains(&format!("prediction (×1e{ex})")),
            "{texts:?}"
        );
        assert!(texts.contains(&format!("MOS (×1e{ey})")), "{texts:?}");
        let ticks: Vec<f64> = texts.iter().filter_map(|t| t.parse().ok()).collect();
        let on_x = ticks.iter().filter(|&&v| (0.0..=5.2).contains(&v)).count();
        let on_y = ticks.iter().filter(|&&v| (0.0..=1.1).contains(&v)).count();
        assert!(on_x >= 4 && on_y >= 4, "{k:e}: {ticks:?}");
        assert_eq!(svg.matches("<circle").count(), 50);
        draw_scatter(&dir.path().join("x.png"), &plot).unwrap();
    }
    // A range spanning ±f64::MAX still draws.
    let x = [-f64::MAX, 0.0, f64::MAX];
    let plot = ScatterPlot {
        prediction: &x,
        mos: &x,
        curve: None,
        title: "",
    };
    draw_scatter(&dir.path().join("max.svg"), &plot).unwrap();
    draw_scatter(&dir.path().join("max.png"), &plot).unwrap();
}
