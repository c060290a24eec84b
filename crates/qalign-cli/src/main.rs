//! `qalign`: a thin command-line layer. Each subcommand parses its flags into a validated
//! config and hands it to the library crates; nothing here does numerics.

mod cmd;
mod flags;
mod inputs;
mod output;
mod progress;
mod shard;
mod stdin;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "qalign",
    version,
    about = "Q-Align / OneAlign quality and aesthetics scoring",
    after_help = EXIT_CODES_HELP
)]
struct Cli {
    /// No progress bars (they are already hidden when stderr is not a terminal).
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

/// README's exit-code table, also shown by `qalign --help`.
const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success (also when a reader such as `| head` stops reading early)
  1  error: bad input file, model not found or not loadable, stdout closed or full, nothing could be done
  2  invalid command-line arguments (unknown flag, bad flag value)
  3  some inputs failed, or could not be read while searching directories and globs, and were skipped; \
the others were processed
  130  interrupted by Ctrl-C (SIGINT), 143 by SIGTERM: `train` keeps a checkpoint of the last completed step, \
`loadtest` prints the report of the requests that finished";

#[derive(Subcommand)]
enum Command {
    /// Score images and videos (quality, aesthetics or a custom question).
    Score(cmd::score::Args),
    /// Show what a checkpoint folder holds: config, parameter counts, dtypes, files.
    Info(cmd::info::Args),
    /// Turn human-score label files into the official SFT JSON (the level syllabus).
    Syllabus(cmd::syllabus::Args),
    /// Compare predictions with human scores: SRCC, PLCC, KRCC, RMSE with confidence intervals.
    Eval(cmd::eval::Args),
    /// Fine-tune on your own ratings: LoRA (official recipe) or full SFT on the official SFT JSON.
    Train(cmd::train::Args),
    /// Bake a LoRA adapter into its base model and write a plain checkpoint.
    Merge(cmd::train::MergeArgs),
    /// Write a pre-quantised copy of a model (GGUF) that --model loads directly.
    Quantize(cmd::quantize::Args),
    /// Time each stage of scoring (load, preprocessing, encode, LLM, end to end, video) on a model.
    Bench(cmd::bench::Args),
    /// Serve the scorer over HTTP: a batching JSON API, a web page, health and metrics.
    Serve(cmd::serve::Args),
    /// Load-test a running `qalign serve`: throughput and latency percentiles as JSON.
    Loadtest(cmd::loadtest::Args),
}

/// candle runs elementwise ops on a spin-waiting thread pool of its own, beside rayon's pool for
/// matmuls; on a machine with two CPUs the two pools fight over the cores (docs/PERFORMANCE.md:
/// "CPU threads"). Unless the user has chosen (`CANDLE_NUM_THREADS`), elementwise ops stay on the
/// calling thread there; matmuls still use every core. Quantised matmuls run on candle's pool,
/// so with `--quant` it keeps its default size.
fn tune_cpu_threads(quantised: bool) {
    let small = std::thread::available_parallelism().is_ok_and(|n| n.get() <= 2);
    if small && !quantised && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: called in `main` after parsing the flags, before any other thread exists.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tune_cpu_threads(match &cli.command {
        Command::Score(args) => args.model.loads_quantised(),
        Command::Bench(args) => args.model.loads_quantised(),
        Command::Serve(args) => args.model.loads_quantised(),
        Command::Quantize(_) => true,
        _ => false,
    });
    let conflict = match &cli.command {
        Command::Score(args) => args.model.conflict(),
        Command::Bench(args) => args.model.conflict(),
        Command::Serve(args) => args.model.conflict(),
        _ => None,
    };
    if let Some(message) = conflict {
        return cmd::usage_error(&message);
    }
    progress::set_quiet(cli.quiet);
    let writes_stdout = !matches!(
        cli.command,
        Command::Train(_) | Command::Merge(_) | Command::Quantize(_) | Command::Serve(_)
    );
    if writes_stdout && let Err(err) = output::ensure_stdout_open() {
        eprintln!("error: {err}");
        return ExitCode::from(cmd::EXIT_ERROR);
    }
    let result = match cli.command {
        Command::Score(args) => cmd::score::run(args),
        Command::Info(args) => cmd::info::run(args),
        Command::Syllabus(args) => cmd::syllabus::run(args),
        Command::Eval(args) => cmd::eval::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Train(args) => cmd::train::run(args),
        Command::Merge(args) => cmd::train::run_merge(args),
        Command::Quantize(args) => cmd::quantize::run(args),
        Command::Serve(args) => cmd::serve::run(args),
        Command::Loadtest(args) => cmd::loadtest::run(args),
    };
    match result {
        Ok(code) if code == ExitCode::SUCCESS && inputs::unreadable() > 0 => {
            eprintln!(
                "{} path(s) could not be read while searching the inputs (see the errors above)",
                inputs::unreadable()
            );
            ExitCode::from(cmd::EXIT_PARTIAL)
        }
        Ok(code) => code,
        // The reader of stdout went away (`qalign score … | head`): stop quietly, like ripgrep.
        Err(err) if output::find_stdout_error(&err).is_some_and(|e| e.is_broken_pipe()) => {
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {}", error_chain(&err));
            if let Some(hint) = hint(&err) {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(cmd::EXIT_ERROR)
        }
    }
}

/// What the user can do about an error the library reports in its own terms (it never names
/// flags): the hint names the flag or the build option.
fn hint(err: &anyhow::Error) -> Option<&'static str> {
    use qalign_model::hub::{DownloadFailure, HubError};
    use qalign_model::{ModelError, ScoreError};
    err.chain().find_map(|cause| {
        let score = cause.downcast_ref::<ScoreError>();
        let model = cause.downcast_ref::<ModelError>().or(match score {
            Some(ScoreError::Model(e)) => Some(e),
            _ => None,
        });
        let hub = cause.downcast_ref::<HubError>().or(match score {
            Some(ScoreError::Hub(e)) => Some(e),
            _ => None,
        });
        if let Some(ModelError::NoCuda { .. }) = model {
            return Some("rebuild with `cargo build --release --features cuda` (needs the CUDA toolkit)");
        }
        match hub? {
            HubError::NotCached { .. } => Some(
                "download it once with network access (run without --offline, HF_HUB_OFFLINE=1 \
                 and TRANSFORMERS_OFFLINE=1), or pass --model DIR with a local checkpoint folder",
            ),
            hub if hub.download_failure() == Some(DownloadFailure::Unreachable) => Some(
                "check the network connection (and HF_ENDPOINT), or pass --offline to use the cache only",
            ),
            _ => None,
        }
    })
}

/// The error and its causes joined by ": ", leaving out a cause whose text the message
/// before it already includes (library errors often print their source themselves).
fn error_chain(err: &anyhow::Error) -> String {
    let mut text = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}
