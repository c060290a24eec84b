//! Score ↔ level conversion (Q-Align paper, Eq. 1–4).
//!
//! Q-Align never regresses a number: training turns each human score into a rating word by
//! equal-width binning of the dataset's range (Eq. 1), and inference turns the model's logits
//! for those words back into a number by a softmax and a weighted mean (Eq. 2–4). Both
//! directions live here so that the syllabus, the model and the evaluation agree exactly.
//!
//! Conventions used throughout:
//! * A [`LevelSet`] lists its words **best → worst** (`excellent, good, fair, poor, bad`), the
//!   order of the level token ids and of every probability vector.
//! * A [`Level`] is numbered 1 (worst) ..= N (best), so level `i` *is* its score on the
//!   [`Scale::OneToFive`] scale.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::vocab::LEVEL_WORDS;

/// Errors from level sets, binning and level distributions.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LevelError {
    #[error("a level set needs at least 2 words, got {0}")]
    TooFewLevels(usize),
    #[error("level word {0:?} is empty, has surrounding spaces, or is repeated")]
    BadWord(String),
    #[error("invalid score range [{min}, {max}]: need finite min < max")]
    BadRange { min: f64, max: f64 },
    #[error("cannot take the range of an empty score list")]
    EmptyScores,
    #[error("score {score} is outside the range [{min}, {max}] (ask for clamping to allow this)")]
    OutOfRange { score: f64, min: f64, max: f64 },
    #[error("score is not a finite number ({0})")]
    NotFinite(f64),
    #[error("a level distribution needs at least 2 entries, got {0}")]
    TooFewEntries(usize),
    #[error("expected {expected} level entries (one per word), got {got}")]
    WrongCount { expected: usize, got: usize },
    #[error("logit {index} is not finite ({value})")]
    NonFiniteLogit { index: usize, value: f32 },
    #[error("probabilities must each lie in [0, 1] and sum to 1 (got sum {sum})")]
    BadProbabilities { sum: f64 },
}

/// The numeric scale a score is expressed on.
///
/// `OneToFive` is the level-number scale 1..=N (the HF `.score` output, 1..=5 for the ITU set);
/// `ZeroToOne` is the GitHub scorer's scale. For N levels the two are related by
/// `one_to_n = 1 + (N − 1) · zero_to_one` (for five levels: `hf = 1 + 4 · github`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Scale {
    #[serde(rename = "1-5")]
    OneToFive,
    #[serde(rename = "0-1")]
    ZeroToOne,
}

impl Scale {
    /// The serialised name: `"1-5"` or `"0-1"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scale::OneToFive => "1-5",
            Scale::ZeroToOne => "0-1",
        }
    }
}

impl fmt::Display for Scale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scale {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "1-5" => Ok(Scale::OneToFive),
            "0-1" => Ok(Scale::ZeroToOne),
            other => Err(format!(
                "unknown scale {other:?}: expected \"1-5\" or \"0-1\""
            )),
        }
    }
}

/// A score together with the scale it is on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Score {
    pub value: f64,
    pub scale: Scale,
}

/// A level number: 1 = worst ..= N = best. Equal to the level's score on [`Scale::OneToFive`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Level(usize);

impl Level {
    /// The level number, 1 (worst) ..= N (best).
    pub fn number(self) -> usize {
        self.0
    }
}

/// The closed score range `[min, max]` that Eq. 1 bins (a dataset's own range, or a given one).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ScoreRange {
    min: f64,
    max: f64,
}

impl ScoreRange {
    /// A range with finite `min < max`.
    pub fn new(min: f64, max: f64) -> Result<Self, LevelError> {
        if min.is_finite() && max.is_finite() && min < max {
            Ok(Self { min, max })
        } else {
            Err(LevelError::BadRange { min, max })
        }
    }

    /// The smallest and largest of `scores` (which must be finite and not all equal).
    pub fn of(scores: &[f64]) -> Result<Self, LevelError> {
        let first = *scores.first().ok_or(LevelError::EmptyScores)?;
        let mut min = first;
        let mut max = first;
        for &s in scores {
            if !s.is_finite() {
                return Err(LevelError::NotFinite(s));
            }
            min = min.min(s);
            max = max.max(s);
        }
        Self::new(min, max)
    }

    pub fn min(&self) -> f64 {
        self.min
    }

    pub fn max(&self) -> f64 {
        self.max
    }
}

/// The rating words of a level scale, best → worst, and the binning that maps scores to them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LevelSet {
    words: Vec<String>,
}

impl Default for LevelSet {
    fn default() -> Self {
        Self::itu()
    }
}

impl LevelSet {
    /// The five ITU words used by Q-Align: excellent, good, fair, poor, bad.
    pub fn itu() -> Self {
        Self {
            words: LEVEL_WORDS.iter().map(|w| w.to_string()).collect(),
        }
    }

    /// Q-Bench's binary form (good vs poor): the two-level special case.
    pub fn good_poor() -> Self {
        Self {
            words: vec!["good".to_string(), "poor".to_string()],
        }
    }

    /// Custom words, ordered best → worst. Needs at least 2 distinct, non-empty, trimmed words.
    pub fn new<I, S>(words: I) -> Result<Self, LevelError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let words: Vec<String> = words.into_iter().map(Into::into).collect();
        if words.len() < 2 {
            return Err(LevelError::TooFewLevels(words.len()));
        }
        for (i, w) in words.iter().enumerate() {
            if w.is_empty() || w.trim() != w || words[..i].contains(w) {
                return Err(LevelError::BadWord(w.clone()));
            }
        }
        Ok(Self { words })
    }

    /// Number of levels N.
    pub fn n_levels(&self) -> usize {
        self.words.len()
    }

    /// The words, best → worst.
    pub fn words(&self) -> &[String] {
        &self.words
    }

    /// The level with this number (1 = worst ..= N = best), if it exists.
    pub fn level(&self, number: usize) -> Option<Level> {
        (1..=self.n_levels())
            .contains(&number)
            .then_some(Level(number))
    }

    /// The best level (N).
    pub fn best(&self) -> Level {
        Level(self.n_levels())
    }

    /// The word of a level. Levels from another, larger set saturate at the best word.
    pub fn word(&self, level: Level) -> &str {
        let n = self.n_levels();
        let number = level.0.clamp(1, n);
        &self.words[n - number]
    }

    /// The level whose word is exactly `word`.
    pub fn level_of_word(&self, word: &str) -> Option<Level> {
        let n = self.n_levels();
        self.words
            .iter()
            .position(|w| w == word)
            .map(|idx| Level(n - idx))
    }

    /// Upper edge of level `i` (0 ≤ i ≤ N): `m + i·(M − m)/N`, evaluated in f64 exactly in this
    /// order (`i·(M − m)` first, then `/ N`, then `m +`). Edge 0 is `m` and edge N is `M` exactly.
    pub fn edge(&self, range: ScoreRange, i: usize) -> f64 {
        let n = self.n_levels();
        if i == 0 {
            range.min
        } else if i >= n {
            range.max
        } else {
            range.min + (i as f64) * (range.max - range.min) / (n as f64)
        }
    }

    /// Eq. 1: level `i` when `edge(i − 1) < s ≤ edge(i)`; the minimum itself is level 1.
    /// A score outside the range is an error (see [`LevelSet::level_of_clamped`]).
    pub fn level_of(&self, score: f64, range: ScoreRange) -> Result<Level, LevelError> {
        if !score.is_finite() {
            return Err(LevelError::NotFinite(score));
        }
        if score < range.min || score > range.max {
            return Err(LevelError::OutOfRange {
                score,
                min: range.min,
                max: range.max,
            });
        }
        Ok(self.bin(score, range))
    }

    /// As [`LevelSet::level_of`], but a score below the range is level 1 and above it level N.
    pub fn level_of_clamped(&self, score: f64, range: ScoreRange) -> Result<Level, LevelError> {
        if !score.is_finite() {
            return Err(LevelError::NotFinite(score));
        }
        Ok(self.bin(score.clamp(range.min, range.max), range))
    }

    fn bin(&self, score: f64, range: ScoreRange) -> Level {
        let n = self.n_levels();
        (1..n)
            .find(|&i| score <= self.edge(range, i))
            .map_or(Level(n), Level)
    }

    /// The score weights in word order (best → worst): N..=1 on `OneToFive`,
    /// 1, (N−2)/(N−1), …, 0 on `ZeroToOne` (1, 0.75, 0.5, 0.25, 0 for five levels).
    pub fn weights(&self, scale: Scale) -> Vec<f64> {
        level_weights(self.n_levels(), scale)
    }

    /// Convert a score between the two scales of this set (`one = 1 + (N − 1)·zero`).
    pub fn rescale(&self, score: Score, to: Scale) -> Score {
        rescale(self.n_levels(), score, to)
    }

    /// The softmax of this set's level logits (ordered like the words).
    pub fn distribution_from_logits(
        &self,
        logits: &[f32],
    ) -> Result<LevelDistribution, LevelError> {
        if logits.len() != self.n_levels() {
            return Err(LevelError::WrongCount {
                expected: self.n_levels(),
                got: logits.len(),
            });
        }
        LevelDistribution::from_logits(logits)
    }
}

fn level_weights(n: usize, scale: Scale) -> Vec<f64> {
    (0..n)
        .map(|idx| {
            let number = (n - idx) as f64;
            match scale {
                Scale::OneToFive => number,
                Scale::ZeroToOne => (number - 1.0) / ((n - 1) as f64),
            }
        })
        .collect()
}

fn rescale(n: usize, score: Score, to: Scale) -> Score {
    let span = (n - 1) as f64;
    let value = match (score.scale, to) {
        (Scale::OneToFive, Scale::OneToFive) | (Scale::ZeroToOne, Scale::ZeroToOne) => score.value,
        (Scale::ZeroToOne, Scale::OneToFive) => 1.0 + span * score.value,
        (Scale::OneToFive, Scale::ZeroToOne) => (score.value - 1.0) / span,
    };
    Score { value, scale: to }
}

/// Numerically stable softmax (the maximum is subtracted), computed in f64 and rounded to f32.
/// Non-finite logits give NaN entries; use [`LevelDistribution::from_logits`] to reject them.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let wide: Vec<f64> = logits.iter().map(|&z| f64::from(z)).collect();
    softmax_f64(&wide).into_iter().map(|p| p as f32).collect()
}

/// Numerically stable softmax in f64.
pub fn softmax_f64(logits: &[f64]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = logits.iter().map(|&z| (z - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// A probability distribution over N levels, ordered best → worst like the words.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LevelDistribution {
    probs: Vec<f64>,
}

/// Tolerance on the sum of externally supplied probabilities.
const PROB_SUM_TOLERANCE: f64 = 1e-6;

impl LevelDistribution {
    /// Eq. 2: softmax over only the level logits (best → worst), in f64.
    pub fn from_logits(logits: &[f32]) -> Result<Self, LevelError> {
        if logits.len() < 2 {
            return Err(LevelError::TooFewEntries(logits.len()));
        }
        if let Some((index, &value)) = logits.iter().enumerate().find(|(_, z)| !z.is_finite()) {
            return Err(LevelError::NonFiniteLogit { index, value });
        }
        let wide: Vec<f64> = logits.iter().map(|&z| f64::from(z)).collect();
        Ok(Self {
            probs: softmax_f64(&wide),
        })
    }

    /// Probabilities given directly (best → worst): each in [0, 1], summing to 1 within 1e-6.
    pub fn from_probs(probs: Vec<f64>) -> Result<Self, LevelError> {
        if probs.len() < 2 {
            return Err(LevelError::TooFewEntries(probs.len()));
        }
        let sum: f64 = probs.iter().sum();
        let in_unit = probs.iter().all(|p| (0.0..=1.0).contains(p));
        let sums_to_one = (sum - 1.0).abs() <= PROB_SUM_TOLERANCE;
        if !in_unit || !sums_to_one {
            return Err(LevelError::BadProbabilities { sum });
        }
        Ok(Self { probs })
    }

    /// The probabilities, best → worst.
    pub fn probs(&self) -> &[f64] {
        &self.probs
    }

    pub fn n_levels(&self) -> usize {
        self.probs.len()
    }

    /// Eq. 3–4: the probability-weighted mean of the level weights on `scale`.
    pub fn score(&self, scale: Scale) -> Score {
        let value = self.weighted(scale).map(|(p, w)| p * w).sum();
        Score { value, scale }
    }

    /// Standard deviation of the level value under this distribution, in units of `scale`
    /// (on `ZeroToOne` it is the `OneToFive` value divided by N − 1).
    pub fn std(&self, scale: Scale) -> f64 {
        let mean = self.score(scale).value;
        let var: f64 = self
            .weighted(scale)
            .map(|(p, w)| p * (w - mean) * (w - mean))
            .sum();
        var.max(0.0).sqrt()
    }

    /// Shannon entropy in nats, `−Σ p ln p` (0 · ln 0 = 0): 0 for a certain level,
    /// `ln N` for the uniform distribution.
    pub fn entropy(&self) -> f64 {
        -self
            .probs
            .iter()
            .filter(|&&p| p > 0.0)
            .map(|&p| p * p.ln())
            .sum::<f64>()
    }

    /// The most probable level (the better one on exact ties).
    pub fn most_likely(&self) -> Level {
        let n = self.n_levels();
        let mut best = 0;
        for (idx, &p) in self.probs.iter().enumerate() {
            if p > self.probs[best] {
                best = idx;
            }
        }
        Level(n - best)
    }

    /// Convert a score between this distribution's two scales.
    pub fn rescale(&self, score: Score, to: Scale) -> Score {
        rescale(self.n_levels(), score, to)
    }

    fn weighted(&self, scale: Scale) -> impl Iterator<Item = (f64, f64)> + '_ {
        self.probs
            .iter()
            .copied()
            .zip(level_weights(self.n_levels(), scale))
    }
}
