//! Scores image or video files with the library's front door, as an application would:
//! build a scorer from a folder or hub id, score the paths for quality and aesthetics, and read
//! each input's outcome.
//!
//! ```text
//! cargo run --release -p qalign-model --example score_files -- tests/fixtures/tiny-onealign \
//!     tests/fixtures/images/boy_colorful.jpg tests/fixtures/video/baby.mp4
//! ```

use qalign_model::{Device, Dtype, Scale, Scorer, Task};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .ok_or("usage: score_files MODEL_DIR_OR_HUB_ID FILE...")?;
    let paths: Vec<String> = args.collect();
    let scorer = Scorer::builder()
        .model(model)
        .device(Device::Cpu)
        .dtype(Dtype::F32)
        .build()?;
    let tasks = [Task::Quality, Task::Aesthetics];
    for item in scorer.score_paths(&paths, &tasks)? {
        match item.result {
            Ok(scored) => {
                for (task, scores) in tasks.iter().zip(scored.scores()) {
                    let best = scores.distribution.most_likely();
                    println!(
                        "{}\t{}\t{task}\t{:.4}\t{}",
                        item.path.display(),
                        scored.kind(),
                        scores.score(Scale::OneToFive),
                        scorer.levels().word(best)
                    );
                }
                for warning in scored.warnings() {
                    eprintln!("warning: {}: {warning}", item.path.display());
                }
            }
            Err(err) if err.names_path(&item.path) => eprintln!("error: {err}"),
            Err(err) => eprintln!("error: {}: {err}", item.path.display()),
        }
    }
    Ok(())
}
