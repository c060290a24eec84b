//! The Python extension `qalign._qalign`: a thin layer over [`qalign_model::Scorer`] that the pure
//! Python package (`python/qalign`) wraps. Records cross as the JSON of `qalign score --format json`,
//! so Python sees exactly the CLI's fields; compute runs with the GIL released.

use std::path::PathBuf;

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use qalign_core::{Scale, Task};
use qalign_media::RgbImage;
use qalign_model::{
    Device, Dtype, ItemOutcome, Quant, Query, ScoreOptions, ScoreRecord, Scorer as RustScorer,
};

create_exception!(
    _qalign,
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
        if name.eq_ignore_ascii_case("all") {
            out.extend(Task::ALL);
        } else {
            out.push(name.parse::<Task>().map_err(err)?);
        }
    }
    if out.is_empty() {
        return Err(err("no task given: expected quality, aesthetics or all"));
    }
    Ok(out)
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
    fn outcome(&self, name: &str, tasks: &[Task], scale: Scale, item: ItemOutcome) -> Outcome {
        let queries: Vec<Query> = tasks.iter().map(|&t| Query::Task(t)).collect();
        match item.result {
            Ok(scored) => {
                let records =
                    ScoreRecord::for_scored(name, &queries, &scored, self.inner.levels(), scale);
                match records_json(&records) {
                    Ok(json) => (Some(json), None),
                    Err(e) => (None, Some(e.to_string())),
                }
            }
            Err(e) => {
                let spool = item.path.display().to_string();
                (None, Some(e.to_string().replace(&spool, name)))
            }
        }
    }
}

#[pymethods]
impl Scorer {
    #[new]
    #[pyo3(signature = (model, device="cpu", dtype="f32", quant=None, lora=None, offline=false))]
    fn new(
        py: Python<'_>,
        model: String,
        device: &str,
        dtype: &str,
        quant: Option<&str>,
        lora: Option<PathBuf>,
        offline: bool,
    ) -> PyResult<Self> {
        let device: Device = device.parse().map_err(err)?;
        let dtype: Dtype = dtype.parse().map_err(err)?;
        let quant = quant.map(|q| q.parse::<Quant>()).transpose().map_err(err)?;
        let mut builder = RustScorer::builder()
            .model(model)
            .device(device)
            .dtype(dtype)
            .quant(quant)
            .offline(offline);
        if let Some(dir) = lora {
            builder = builder.lora(dir);
        }
        let inner = py.detach(move || builder.build()).map_err(err)?;
        Ok(Self { inner })
    }

    /// Scores image and video files; one `(records, error)` per path, in order.
    #[pyo3(signature = (paths, tasks, scale="1-5", batch_size=8))]
    fn score_paths(
        &self,
        py: Python<'_>,
        paths: Vec<PathBuf>,
        tasks: Vec<String>,
        scale: &str,
        batch_size: usize,
    ) -> PyResult<Vec<Outcome>> {
        let tasks = crate::tasks(tasks)?;
        let scale: Scale = scale.parse().map_err(err)?;
        if batch_size == 0 {
            return Err(err("batch_size must be at least 1"));
        }
        let queries: Vec<Query> = tasks.iter().map(|&t| Query::Task(t)).collect();
        let options = ScoreOptions {
            batch_size,
            ..ScoreOptions::default()
        };
        let items = py.detach(|| {
            let mut items = Vec::with_capacity(paths.len());
            self.inner
                .score_paths_with(
                    &paths,
                    &queries,
                    &options,
                    &mut |item| {
                        items.push(item);
                        std::ops::ControlFlow::Continue(())
                    },
                    None,
                )
                .map(|()| items)
        });
        let items = items.map_err(err)?;
        Ok(items
            .into_iter()
            .map(|item| {
                let name = item.path.display().to_string();
                self.outcome(&name, &tasks, scale, item)
            })
            .collect())
    }

    /// Scores the encoded file `data` (an image or a video), naming its records `name`.
    #[pyo3(signature = (data, name, tasks, scale="1-5"))]
    fn score_bytes(
        &self,
        py: Python<'_>,
        data: Vec<u8>,
        name: String,
        tasks: Vec<String>,
        scale: &str,
    ) -> PyResult<Outcome> {
        let tasks = crate::tasks(tasks)?;
        let scale: Scale = scale.parse().map_err(err)?;
        let queries: Vec<Query> = tasks.iter().map(|&t| Query::Task(t)).collect();
        let item = py.detach(|| -> std::io::Result<ItemOutcome> {
            let mut spool = tempfile::Builder::new().prefix("qalign-py-").tempfile()?;
            std::io::Write::write_all(&mut spool, &data)?;
            let path = spool.path().to_owned();
            let mut item = None;
            let result = self.inner.score_paths_with(
                &[&path],
                &queries,
                &ScoreOptions::default(),
                &mut |outcome| {
                    item = Some(outcome);
                    std::ops::ControlFlow::Continue(())
                },
                None,
            );
            Ok(match (result, item) {
                (Ok(()), Some(item)) => item,
                (Err(e), _) => ItemOutcome {
                    index: 0,
                    path,
                    result: Err(e),
                },
                (Ok(()), None) => unreachable!("one path gives one outcome"),
            })
        });
        let item = item.map_err(err)?;
        Ok(self.outcome(&name, &tasks, scale, item))
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
        let tasks = crate::tasks(tasks)?;
        let scale: Scale = scale.parse().map_err(err)?;
        let (width, height) = size;
        if width == 0 || height == 0 {
            return Err(err(format!("{name}: an empty image ({width}×{height})")));
        }
        let image = RgbImage::from_raw(width, height, data).ok_or_else(|| {
            err(format!(
                "{name}: expected {width}×{height}×3 bytes of RGB pixels"
            ))
        })?;
        let queries: Vec<Query> = tasks.iter().map(|&t| Query::Task(t)).collect();
        let scores = py
            .detach(|| {
                let pixels = self.inner.preprocess_rgb(&image);
                self.inner.score_images(&[&pixels], &queries)
            })
            .map_err(err)?;
        let records: Vec<ScoreRecord> = tasks
            .iter()
            .zip(&scores[0])
            .map(|(task, s)| {
                ScoreRecord::image(&name, task.as_str(), s, self.inner.levels(), scale)
            })
            .collect();
        records_json(&records)
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
