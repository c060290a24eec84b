//! The Python extension `qalign._qalign`: a thin layer over [`qalign_model::Scorer`] that the pure
//! Python package (`python/qalign`) wraps. Records cross as the JSON of `qalign score --format json`,
//! so Python sees exactly the CLI's fields; compute runs with the GIL released.

use std::cell::RefCell;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use qalign_core::{MediaKind, Scale, Task};
use qalign_media::preprocess::check_square_side;
use qalign_media::{DecodeOptions, RgbImage};
use qalign_model::{
    Device, Dtype, ItemOutcome, Quant, Query, ScoreError, ScoreOptions, ScoreRecord, Scored,
    Scorer as RustScorer,
};

// Module `qalign` (where the wrapper re-exports it), so that pickle finds `qalign.QAlignError`.
create_exception!(
    qalign,
    QAlignError,
    PyException,
    "An error from qalign (bad input, model not loadable, ...), with the Rust message."
);

fn err(e: impl std::fmt::Display) -> PyErr {
    QAlignError::new_err(e.to_string())
}

fn tasks(names: Vec<String>) -> PyResult<Vec<Task>> {
    let mut out = Vec::new();
    for name in names {
        let named = if name.trim().eq_ignore_ascii_case("all") {
            Task::ALL.to_vec()
        } else {
            vec![name.parse::<Task>().map_err(err)?]
        };
        for task in named {
            if !out.contains(&task) {
                out.push(task);
            }
        }
    }
    if out.is_empty() {
        return Err(err("no task given: expected quality, aesthetics or all"));
    }
    Ok(out)
}

fn queries(tasks: &[Task]) -> Vec<Query> {
    tasks.iter().map(|&t| Query::Task(t)).collect()
}

/// One input's outcome: its records as JSON, or its error message.
type Outcome = (Option<Vec<String>>, Option<String>);

fn records_json(records: &[ScoreRecord]) -> PyResult<Vec<String>> {
    records
        .iter()
        .map(|r| serde_json::to_string(r).map_err(err))
        .collect()
}

/// A loaded model. Build it once; score many times.
#[pyclass(module = "qalign._qalign", frozen)]
struct Scorer {
    inner: RustScorer,
}

impl Scorer {
    /// `result` as records named `name`; `scored_from` is the spool file it was read from, if
    /// any, whose path errors show as `name`.
    fn outcome(
        &self,
        name: &str,
        queries: &[Query],
        scale: Scale,
        result: Result<Scored, ScoreError>,
        scored_from: Option<&Path>,
    ) -> Outcome {
        match result {
            Ok(scored) => {
                let records =
                    ScoreRecord::for_scored(name, queries, &scored, self.inner.levels(), scale);
                match records_json(&records) {
                    Ok(json) => (Some(json), None),
                    Err(e) => (None, Some(e.to_string())),
                }
            }
            Err(e) => {
                let message = e.to_string();
                match scored_from {
                    Some(path) => (None, Some(message.replace(&*path.to_string_lossy(), name))),
                    None => (None, Some(message)),
                }
            }
        }
    }

    /// [`RustScorer::score_paths_with`] with the GIL released. Python only sees Ctrl-C when it
    /// runs, so the progress callback polls for signals after every input and around every
    /// video window, and a pending one stops the run and is raised; with `stop_on_error` the
    /// first failed input ends it too (its outcome is the last one).
    fn run(
        &self,
        py: Python<'_>,
        paths: &[impl AsRef<Path> + Sync],
        queries: &[Query],
        options: &ScoreOptions,
        stop_on_error: bool,
    ) -> PyResult<Vec<ItemOutcome>> {
        let (result, interrupt) = py.detach(|| {
            let interrupt = RefCell::new(None::<PyErr>);
            let poll = || {
                let mut pending = interrupt.borrow_mut();
                if pending.is_none() {
                    *pending = Python::attach(|py| py.check_signals()).err();
                }
                match *pending {
                    Some(_) => ControlFlow::Break(()),
                    None => ControlFlow::Continue(()),
                }
            };
            let mut items = Vec::new();
            // `progress` hears of every finished input (just before `sink`) and every video window.
            let result = self.inner.score_paths_with(
                paths,
                queries,
                options,
                &mut |item| {
                    let failed = stop_on_error && item.result.is_err();
                    items.push(item);
                    if failed {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                },
                Some(&mut |_| poll()),
            );
            (result.map(|()| items), interrupt.into_inner())
        });
        if let Some(e) = interrupt {
            return Err(e);
        }
        result.map_err(err)
    }
}

#[pymethods]
impl Scorer {
    #[new]
    #[pyo3(signature = (model, device="cpu", dtype="f32", quant=None, lora=None, offline=false, revision=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model: String,
        device: &str,
        dtype: &str,
        quant: Option<&str>,
        lora: Option<PathBuf>,
        offline: bool,
        revision: Option<String>,
    ) -> PyResult<Self> {
        let device: Device = device.parse().map_err(err)?;
        let dtype: Dtype = dtype.parse().map_err(err)?;
        let quant = quant.map(|q| q.parse::<Quant>()).transpose().map_err(err)?;
        let mut builder = RustScorer::builder()
            .model(model)
            .device(device)
            .dtype(dtype)
            .quant(quant);
        // `offline=False` leaves the choice to HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE.
        if offline {
            builder = builder.offline(true);
        }
        if let Some(revision) = revision {
            builder = builder.revision(revision);
        }
        if let Some(dir) = lora {
            builder = builder.lora(dir);
        }
        let inner = py.detach(move || builder.build()).map_err(err)?;
        Ok(Self { inner })
    }

    /// Scores image and video files; one `(records, error)` per path, in order. With
    /// `stop_on_error`, the outcomes end at the first failed path.
    #[pyo3(signature = (paths, tasks, scale="1-5", batch_size=8, stop_on_error=false))]
    fn score_paths(
        &self,
        py: Python<'_>,
        paths: Vec<PathBuf>,
        tasks: Vec<String>,
        scale: &str,
        batch_size: usize,
        stop_on_error: bool,
    ) -> PyResult<Vec<Outcome>> {
        let queries = queries(&crate::tasks(tasks)?);
        let scale: Scale = scale.parse().map_err(err)?;
        if batch_size == 0 {
            return Err(err("batch_size must be at least 1"));
        }
        let options = ScoreOptions {
            // No bigger than the input: a huge one would only size allocations.
            batch_size: batch_size.min(paths.len()).max(1),
            ..ScoreOptions::default()
        };
        let items = self.run(py, &paths, &queries, &options, stop_on_error)?;
        Ok(items
            .into_iter()
            .map(|item| {
                let name = item.path.display().to_string();
                self.outcome(&name, &queries, scale, item.result, None)
            })
            .collect())
    }

    /// Scores the encoded file `data` (an image or a video), naming its records and errors
    /// `name`. Images decode from memory; only videos (which ffmpeg reads from a file) are
    /// spooled to a temporary file.
    #[pyo3(signature = (data, name, tasks, scale="1-5"))]
    fn score_bytes(
        &self,
        py: Python<'_>,
        data: PyBackedBytes,
        name: String,
        tasks: Vec<String>,
        scale: &str,
    ) -> PyResult<Outcome> {
        let queries = queries(&crate::tasks(tasks)?);
        let scale: Scale = scale.parse().map_err(err)?;
        if MediaKind::sniff(&data) == Some(MediaKind::Video) {
            let spooled = py.detach(|| -> std::io::Result<_> {
                let mut spool = tempfile::Builder::new().prefix("qalign-py-").tempfile()?;
                std::io::Write::write_all(&mut spool, &data)?;
                Ok(spool.into_temp_path())
            });
            let spool = match spooled {
                Ok(spool) => spool,
                Err(e) => {
                    let dir = std::env::temp_dir();
                    let message = format!(
                        "{name}: cannot spool the video to a temporary file in {} (set TMPDIR): {}",
                        dir.display(),
                        std::io::Error::from(e.kind())
                    );
                    return Ok((None, Some(message)));
                }
            };
            let options = ScoreOptions::default();
            let item = self.run(py, &[&spool], &queries, &options, false)?.pop();
            let item = item.ok_or_else(|| err("one path gives one outcome"))?;
            return Ok(self.outcome(&name, &queries, scale, item.result, Some(&spool)));
        }
        let result = py.detach(|| -> Result<Scored, ScoreError> {
            // The Python Scorer never turns EXIF orientation on: the builder's default.
            let source = Path::new(&name);
            let image = qalign_media::read_rgb(&data[..], source, &DecodeOptions::default())?;
            check_square_side(source, image.width(), image.height())?;
            let pixels = self.inner.preprocess_rgb(&image);
            let mut scores = self.inner.score_images(&[&pixels], &queries)?;
            Ok(Scored::Image(scores.remove(0)))
        });
        Ok(self.outcome(&name, &queries, scale, result, None))
    }

    /// Scores decoded pixels: `data` is `height × width × 3` bytes of RGB, row-major; `size` is
    /// `(width, height)`.
    #[pyo3(signature = (data, size, name, tasks, scale="1-5"))]
    fn score_rgb(
        &self,
        py: Python<'_>,
        data: Vec<u8>,
        size: (u32, u32),
        name: String,
        tasks: Vec<String>,
        scale: &str,
    ) -> PyResult<Vec<String>> {
        let queries = queries(&crate::tasks(tasks)?);
        let scale: Scale = scale.parse().map_err(err)?;
        let (width, height) = size;
        if width == 0 || height == 0 {
            return Err(err(format!("{name}: an empty image ({width}×{height})")));
        }
        check_square_side(Path::new(&name), width, height).map_err(err)?;
        let image = RgbImage::from_raw(width, height, data).ok_or_else(|| {
            err(format!(
                "{name}: expected {width}×{height}×3 bytes of RGB pixels"
            ))
        })?;
        let mut scores = py
            .detach(|| {
                let pixels = self.inner.preprocess_rgb(&image);
                self.inner.score_images(&[&pixels], &queries)
            })
            .map_err(err)?;
        let scored = Scored::Image(scores.remove(0));
        records_json(&ScoreRecord::for_scored(
            &name,
            &queries,
            &scored,
            self.inner.levels(),
            scale,
        ))
    }

    /// The five level words, best first.
    fn levels(&self) -> Vec<String> {
        self.inner.levels().words().to_vec()
    }
}

#[pymodule]
fn _qalign(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Scorer>()?;
    m.add("QAlignError", m.py().get_type::<QAlignError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
