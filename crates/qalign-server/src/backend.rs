//! What the server needs from a model, with no HTTP types: score files for some queries and say
//! what it is. The engine owns one `Backend` on its own thread; tests drive the engine with a fake.

use std::ops::ControlFlow;
use std::path::PathBuf;

use qalign_core::LevelSet;
use qalign_model::{Query, ScoreError, ScoreOptions, Scored, Scorer};

/// A scoring model as the engine sees it.
pub trait Backend: Send + 'static {
    /// Scores every file for every query; one outcome per path, in order. An `Err` of the whole
    /// call means nothing could be scored (a bad query). `keep_going` is asked after each file
    /// and between a video's windows: once it says false, the call may stop and return the
    /// outcomes it has (fewer than paths).
    fn score(
        &self,
        paths: &[PathBuf],
        queries: &[Query],
        options: &ScoreOptions,
        keep_going: &dyn Fn() -> bool,
    ) -> Result<Vec<Result<Scored, ScoreError>>, ScoreError>;

    /// The level words, best first, as records name them.
    fn levels(&self) -> &LevelSet;
}

impl Backend for Scorer {
    fn score(
        &self,
        paths: &[PathBuf],
        queries: &[Query],
        options: &ScoreOptions,
        keep_going: &dyn Fn() -> bool,
    ) -> Result<Vec<Result<Scored, ScoreError>>, ScoreError> {
        let flow = || match keep_going() {
            true => ControlFlow::Continue(()),
            false => ControlFlow::Break(()),
        };
        let mut outcomes = Vec::with_capacity(paths.len());
        self.score_paths_with(
            paths,
            queries,
            options,
            &mut |item| {
                outcomes.push(item.result);
                flow()
            },
            // Between a video's windows too, so that a long clip stops once nobody waits.
            Some(&mut |progress| match progress.frames {
                Some(_) => flow(),
                None => ControlFlow::Continue(()),
            }),
        )?;
        Ok(outcomes)
    }

    fn levels(&self) -> &LevelSet {
        Scorer::levels(self)
    }
}

#[cfg(test)]
mod tests {
    //! The real scorer as the engine drives it, on the tiny fixture model.

    use std::cell::Cell;
    use std::path::Path;

    use qalign_core::Task;
    use qalign_model::{Device, Dtype};

    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).to_path_buf()
    }

    #[test]
    fn keep_going_stops_between_files_and_between_a_clip_s_windows() {
        let scorer = Scorer::builder()
            .model(fixtures().join("tiny-onealign").display().to_string())
            .device(Device::Cpu)
            .dtype(Dtype::F32)
            .offline(true)
            .build()
            .unwrap();
        let image = fixtures().join("images/boy_colorful.jpg");
        let queries = [Query::Task(Task::Quality)];
        let mut options = ScoreOptions {
            batch_size: 1,
            ..Default::default()
        };
        let nobody_waits = || false;
        let outcomes = Backend::score(
            &scorer,
            &[image.clone(), image.clone()],
            &queries,
            &options,
            &nobody_waits,
        )
        .unwrap();
        assert_eq!(outcomes.len(), 1);

        if std::process::Command::new("ffprobe")
            .arg("-version")
            .output()
            .is_err()
        {
            eprintln!("skipped the video half: ffmpeg is not installed");
            return;
        }
        // 8 frames in windows of at most 3: passes of 3, 3 and 2 frames. The client leaves
        // during the first: the clip stops there, and the image after it is never read.
        options.video.window = Some(3);
        let asked = Cell::new(0);
        let waits_for_one_window = || {
            asked.set(asked.get() + 1);
            asked.get() < 2
        };
        let clip = fixtures().join("video/baby.mp4");
        let outcomes = Backend::score(
            &scorer,
            &[clip, image],
            &queries,
            &options,
            &waits_for_one_window,
        )
        .unwrap();
        assert_eq!(outcomes.len(), 0);
        assert_eq!(asked.get(), 2);
    }
}
