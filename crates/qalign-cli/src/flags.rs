//! clap value parsers for flag values that clap's built-in ones cannot check, so that every bad
//! flag value is a usage error (exit code 2, clap's message naming the flag) before any work starts.

use qalign_core::IMAGE_MARKER;

fn number(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(format!("expected a finite number, got `{s}`")),
    }
}

/// A positive, finite number (frames per second, a soft-target width).
pub fn positive(s: &str) -> Result<f64, String> {
    match number(s)? {
        v if v > 0.0 => Ok(v),
        _ => Err(format!("expected a number > 0, got `{s}`")),
    }
}

/// A duration in seconds above 0 and at most a day (timeouts, grace periods): a larger one is
/// surely a typo, and one past `Duration`'s range would not convert.
pub fn seconds(s: &str) -> Result<f64, String> {
    const DAY: f64 = 86_400.0;
    match positive(s)? {
        v if v <= DAY => Ok(v),
        _ => Err(format!("expected at most {DAY} seconds (a day), got `{s}`")),
    }
}

/// A finite number ≥ 0 (learning rate, weight decay, gradient-norm clip).
pub fn non_negative(s: &str) -> Result<f64, String> {
    match number(s)? {
        v if v >= 0.0 => Ok(v),
        _ => Err(format!("expected a number ≥ 0, got `{s}`")),
    }
}

/// Any finite number (LoRA alpha).
pub fn finite(s: &str) -> Result<f64, String> {
    number(s)
}

/// A fraction in [0, 1] (warm-up ratio).
pub fn unit_interval(s: &str) -> Result<f64, String> {
    match number(s)? {
        v if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("expected a number in [0, 1], got `{s}`")),
    }
}

/// A probability in [0, 1) (dropout).
pub fn dropout(s: &str) -> Result<f32, String> {
    match number(s)? {
        v if (0.0..1.0).contains(&v) => Ok(v as f32),
        _ => Err(format!("expected a number in [0, 1), got `{s}`")),
    }
}

/// A hub revision (`--revision`): a branch, tag or commit hash.
pub fn revision(s: &str) -> Result<String, String> {
    if qalign_model::hub::is_valid_revision(s) {
        Ok(s.to_string())
    } else {
        Err("expected a branch, tag or commit hash (no spaces, `..`, `~^:?*[\\`)".into())
    }
}

/// Prompt text (`--question`, `--answer-prefix`): not blank, and without the image marker,
/// which qalign places itself after the question.
pub fn prompt_text(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if s.contains(IMAGE_MARKER) {
        return Err(format!(
            "must not contain `{IMAGE_MARKER}`: qalign puts the image after the question itself"
        ));
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(positive("2.5"), Ok(2.5));
        assert!(positive("0").is_err() && positive("inf").is_err() && positive("nan").is_err());
        assert_eq!(non_negative("0"), Ok(0.0));
        assert!(non_negative("-1e-9").is_err());
        assert!(unit_interval("1").is_ok() && unit_interval("1.01").is_err());
        assert!(dropout("0").is_ok() && dropout("1").is_err());
        assert!(finite("-3").is_ok() && finite("NaN").is_err());
    }

    #[test]
    fn prompts() {
        assert!(prompt_text("How clear is it?").is_ok());
        assert!(prompt_text("  ").is_err());
        assert!(prompt_text("Rate <|image|> this").is_err());
    }
}

/// The model a command starts from, for commands that read its checkpoint themselves (train, merge,
/// quantize); scoring commands take `cmd::score::ModelArgs`, which adds the load options.
#[derive(clap::Args)]
pub struct BaseModel {
    /// Base model folder, or a Hugging Face hub id resolved through the HF cache (HF_HOME).
    #[arg(long, default_value = qalign_model::hub::DEFAULT_MODEL, env = "QALIGN_MODEL")]
    pub model: String,
    /// The branch, tag or commit hash of a hub id (default: main).
    #[arg(long, value_name = "REV", value_parser = revision)]
    pub revision: Option<String>,
    /// Never touch the network (also set by HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,
}

impl BaseModel {
    /// The model's folder (downloaded into the HF cache first for a hub id, unless offline).
    pub fn resolve(&self) -> anyhow::Result<std::path::PathBuf> {
        let offline = self.offline || qalign_model::hub::offline_from_env();
        let revision = self.revision.as_deref();
        Ok(qalign_model::hub::resolve_model_at(&self.model, revision, offline)?.dir)
    }
}
