//! `--loss soft`: train on the level *distribution* instead of a one-hot level (as DeQA-Score does). At
//! the position that predicts the level word, the target is a Gaussian around the sample's MOS (mapped
//! onto the levels 1..5 over the dataset's score range), integrated over each level's bin (the end bins
//! open), and the loss is its cross-entropy with the model's distribution; every other answer token keeps
//! the ordinary one-hot target. With a tiny σ the soft loss is exactly the official one.

use std::collections::HashMap;

use candle_core::{D, DType, Tensor};
use qalign_core::LevelSet;
use qalign_model::{OneAlignModel, TrainingSample};
use qalign_tokenizer::{Tokenizer, level_token_ids};

use crate::data::{Dataset, Sample};
use crate::error::{Result, TrainError};

/// Per-sample level distributions, in the order of the level words (best first).
#[derive(Debug, Clone)]
pub struct SoftTargets {
    level_ids: Vec<u32>,
    /// Sample index in the dataset → distribution over the levels.
    targets: HashMap<usize, Vec<f64>>,
}

/// The standard normal CDF (erf by Abramowitz–Stegun 7.1.26, error < 1.5e-7).
fn normal_cdf(x: f64) -> f64 {
    let z = x / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * z.abs());
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-z * z).exp();
    0.5 * (1.0 + if z >= 0.0 { erf } else { -erf })
}

/// N(μ, σ²) integrated over the bins of levels 1..=n (bin k is [k − ½, k + ½], the end bins open),
/// returned best level first.
pub fn gaussian_levels(mu: f64, sigma: f64, n: usize) -> Vec<f64> {
    let mut probs: Vec<f64> = (1..=n)
        .map(|k| {
            let hi = if k == n {
                1.0
            } else {
                normal_cdf((k as f64 + 0.5 - mu) / sigma)
            };
            let lo = if k == 1 {
                0.0
            } else {
                normal_cdf((k as f64 - 0.5 - mu) / sigma)
            };
            (hi - lo).max(0.0)
        })
        .collect();
    let sum: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    probs.reverse();
    probs
}

/// `−Σ w·log softmax(logits)` summed over rows and divided by `n`: with one-hot `w` this is the mean
/// cross-entropy. `logits`, `weights`: `[n, V]`.
pub fn weighted_cross_entropy(logits: &Tensor, weights: &Tensor, n: usize) -> Result<Tensor> {
    let log_probs = candle_nn_log_softmax(logits)?;
    Ok(((log_probs * weights)?.sum_all()? * (-1.0 / n as f64))?)
}

fn candle_nn_log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

impl SoftTargets {
    pub fn new(
        dataset: &Dataset,
        tokenizer: &Tokenizer,
        levels: &LevelSet,
        sigma: f64,
    ) -> Result<Self> {
        let (lo, hi) = dataset.mos_range().ok_or_else(|| {
            TrainError::Config(match dataset.samples.iter().find_map(|s| s.mos) {
                None => "the soft loss needs MOS values in the sample ids (`name->score`, as the \
                         syllabus writes them)"
                    .into(),
                Some(mos) => format!(
                    "every sample's MOS is {mos}: the soft loss maps MOS onto the levels over their \
                     range, which needs at least two different values"
                ),
            })
        })?;
        let words: Vec<&str> = levels.words().iter().map(String::as_str).collect();
        let level_ids = level_token_ids(tokenizer, &words)?;
        let n = words.len();
        let targets = dataset
            .samples
            .iter()
            .filter_map(|s| {
                let mos = s.mos?;
                s.level_word.as_ref()?;
                let mu = 1.0 + (n as f64 - 1.0) * (mos - lo) / (hi - lo);
                Some((s.index, gaussian_levels(mu, sigma, n)))
            })
            .collect();
        Ok(Self { level_ids, targets })
    }

    /// How many samples train on the one-hot answer instead (no MOS in the id, or an answer that
    /// does not end with a level word).
    pub fn one_hot_samples(&self, dataset: &Dataset) -> usize {
        dataset.samples.len() - self.targets.len()
    }

    /// The loss of a micro-batch (`samples` are the dataset samples behind `batch`, in order).
    pub fn loss(
        &self,
        model: &OneAlignModel,
        batch: &[TrainingSample],
        samples: &[&Sample],
    ) -> Result<Tensor> {
        let (hidden, targets) = model.training_hidden(batch)?;
        let n = targets.len();
        if n == 0 {
            return Err(TrainError::Config("the batch has no target tokens".into()));
        }
        let logits = model.lm_logits(&hidden)?.to_dtype(DType::F32)?;
        let vocab = logits.dim(1)?;
        let mut weights = vec![0f32; n * vocab];
        for (row, target) in targets.iter().enumerate() {
            let id = target.id;
            let dist = self.targets.get(&samples[target.sample].index);
            match dist.filter(|_| self.level_ids.contains(&id)) {
                Some(q) => {
                    for (&level, &p) in self.level_ids.iter().zip(q) {
                        weights[row * vocab + level as usize] = p as f32;
                    }
                }
                None => weights[row * vocab + id as usize] = 1.0,
            }
        }
        let weights = Tensor::from_vec(weights, (n, vocab), logits.device())?;
        weighted_cross_entropy(&logits, &weights, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use proptest::prelude::*;

    #[test]
    fn gaussian_levels_are_a_distribution_centred_on_the_mos() {
        let q = gaussian_levels(4.0, 0.5, 5);
        assert!((q.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // Best first: index 1 is level 4 ("good").
        let argmax = q
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(argmax, 1);
        // Symmetric around 3.
        let c = gaussian_levels(3.0, 0.7, 5);
        assert!((c[0] - c[4]).abs() < 1e-9 && (c[1] - c[3]).abs() < 1e-9);
        // σ → 0 is one-hot.
        let hard = gaussian_levels(2.0, 1e-4, 5);
        assert!((hard[3] - 1.0).abs() < 1e-9);
    }

    proptest! {
        #[test]
        fn soft_loss_gradient_is_softmax_minus_target(
            logits in prop::collection::vec(-4.0f32..4.0, 12),
            raw in prop::collection::vec(0.0f32..1.0, 12),
        ) {
            // Two rows of six classes; each row's weights sum to 1.
            let mut w = raw.clone();
            for row in w.chunks_mut(6) {
                let s: f32 = row.iter().sum::<f32>() + 1e-3;
                row.iter_mut().for_each(|x| *x = (*x + 1e-3 / 6.0) / s);
            }
            let x = Var::from_vec(logits.clone(), (2, 6), &Device::Cpu).unwrap();
            let wt = Tensor::from_vec(w.clone(), (2, 6), &Device::Cpu).unwrap();
            let loss = weighted_cross_entropy(x.as_tensor(), &wt, 2).unwrap();
            let grad: Vec<f32> = loss.backward().unwrap().get(x.as_tensor()).unwrap()
                .flatten_all().unwrap().to_vec1().unwrap();
            for r in 0..2 {
                let row = &logits[r * 6..r * 6 + 6];
                let m = row.iter().cloned().fold(f32::MIN, f32::max);
                let z: f32 = row.iter().map(|v| (v - m).exp()).sum();
                let wsum: f32 = w[r * 6..r * 6 + 6].iter().sum();
                for k in 0..6 {
                    let p = (row[k] - m).exp() / z;
                    let want = (p * wsum - w[r * 6 + k]) / 2.0;
                    prop_assert!((grad[r * 6 + k] - want).abs() < 1e-5, "{} vs {}", grad[r * 6 + k], want);
                }
            }
            // The loss itself: −Σ w·log p / n.
            let mut want = 0.0f64;
            for r in 0..2 {
                let row = &logits[r * 6..r * 6 + 6];
                let m = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
                let lse = row.iter().map(|v| (*v as f64 - m).exp()).sum::<f64>().ln() + m;
                for k in 0..6 {
                    want -= w[r * 6 + k] as f64 * (row[k] as f64 - lse);
                }
            }
            let got = loss.to_scalar::<f32>().unwrap() as f64;
            prop_assert!((got - want / 2.0).abs() < 1e-4, "{got} vs {}", want / 2.0);
        }
    }
}
