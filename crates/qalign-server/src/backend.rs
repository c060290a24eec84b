//! What the server needs from a model, with no HTTP types: score files for some queries and say
//! what it is. The engine owns one `Backend` on its own thread; tests drive the engine with a fake.

use std::ops::ControlFlow;
use std::path::PathBuf;

use qalign_core::LevelSet;
use qalign_model::{Query, ScoreError, ScoreOptions, Scored, Scorer};

/// A scoring model as the engine sees it.
pub trait Backend: Send + 'static {
    /// Scores every file for every query; one outcome per path, in order. An `Err` of the whole
    /// call means nothing could be scored (a bad query). `keep_going` is asked after each file:
    /// once it says false, the call may stop and return the outcomes it has (fewer than paths).
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
        let mut outcomes = Vec::with_capacity(paths.len());
        self.score_paths_with(
            paths,
            queries,
            options,
            &mut |item| {
                outcomes.push(item.result);
                if keep_going() {
                    ControlFlow::Continue(())
                } else {
                    ControlFlow::Break(())
                }
            },
            None,
        )?;
        Ok(outcomes)
    }

    fn levels(&self) -> &LevelSet {
        Scorer::levels(self)
    }
}
