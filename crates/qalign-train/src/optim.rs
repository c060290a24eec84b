//! The optimisation the official recipe gets from the Hugging Face Trainer, reproduced step for step:
//! torch's AdamW (decoupled weight decay, bias-corrected moments), the Trainer's rule that biases and
//! norm weights get no decay, `get_{cosine,linear,constant}_schedule_with_warmup`, and
//! `clip_grad_norm_` over all trainable gradients. State is f32 whatever the compute dtype: a model
//! computing in bf16 gets f32 master copies of its trainable tensors.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};
use qalign_model::Param;

use crate::error::{Result, TrainError};

/// Learning-rate schedule after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Half a cosine from the peak to 0 (`get_cosine_schedule_with_warmup`, the official recipe).
    Cosine,
    /// Straight down to 0 (`get_linear_schedule_with_warmup`).
    Linear,
    /// The peak rate after warm-up (`get_constant_schedule_with_warmup`).
    Constant,
}

impl std::str::FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cosine" => Ok(Self::Cosine),
            "linear" => Ok(Self::Linear),
            "constant" => Ok(Self::Constant),
            other => Err(format!(
                "unknown schedule `{other}` (cosine, linear or constant)"
            )),
        }
    }
}

/// Multiplier of the peak rate at optimizer step `step` (0-based), as the HF lambdas compute it.
pub fn lr_factor(schedule: Schedule, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
    match schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => {
            ((total as f64 - step as f64) / total.saturating_sub(warmup).max(1) as f64).max(0.0)
        }
        Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    }
}

/// Warm-up steps for a ratio, as the Trainer rounds them (`ceil(total · ratio)`).
pub fn warmup_steps(total: usize, ratio: f64) -> usize {
    (total as f64 * ratio).ceil() as usize
}

/// The Trainer's decay rule: no weight decay on biases and on LayerNorm/RMSNorm weights.
pub fn decays(name: &str) -> bool {
    let module = name.rsplit_once('.').map(|(m, _)| m).unwrap_or("");
    let is_norm = module
        .split('.')
        .any(|part| part.contains("norm") || part == "ffn_ln");
    !(name.contains("bias") || is_norm)
}

/// AdamW settings (torch defaults but for the rate).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    /// f32 copy of `var` when the model computes in another dtype.
    master: Option<Tensor>,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    decay: bool,
}

/// torch.optim.AdamW over the trainable tensors of a model.
pub struct AdamW {
    slots: Vec<Slot>,
    config: AdamWConfig,
    steps: usize,
}

impl AdamW {
    pub fn new(params: &[Param], config: AdamWConfig) -> Result<Self> {
        let slots = params
            .iter()
            .map(|p| {
                let t = p.var.as_tensor();
                let master = (t.dtype() != DType::F32)
                    .then(|| t.to_dtype(DType::F32))
                    .transpose()?;
                Ok(Slot {
                    name: p.name.clone(),
                    var: p.var.clone(),
                    master,
                    exp_avg: Tensor::zeros(t.shape(), DType::F32, t.device())?,
                    exp_avg_sq: Tensor::zeros(t.shape(), DType::F32, t.device())?,
                    decay: decays(&p.name),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            slots,
            config,
            steps: 0,
        })
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// One update with gradients in parameter order (`None`: the tensor got no gradient this step and
    /// is left alone, as torch skips parameters whose `.grad` is None).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        if grads.len() != self.slots.len() {
            return Err(TrainError::Internal(format!(
                "{} gradients for {} parameters",
                grads.len(),
                self.slots.len()
            )));
        }
        self.steps += 1;
        let c = self.config;
        let bias_correction1 = 1.0 - c.beta1.powi(self.steps as i32);
        let bias_correction2_sqrt = (1.0 - c.beta2.powi(self.steps as i32)).sqrt();
        let step_size = lr / bias_correction1;
        for (slot, grad) in self.slots.iter_mut().zip(grads) {
            let Some(grad) = grad else { continue };
            let grad = grad.to_dtype(DType::F32)?;
            let mut p = match &slot.master {
                Some(m) => m.clone(),
                None => slot.var.as_tensor().detach(),
            };
            if c.weight_decay != 0.0 && slot.decay {
                p = (p * (1.0 - lr * c.weight_decay))?;
            }
            // exp_avg.lerp_(grad, 1 − β1); exp_avg_sq.mul_(β2).addcmul_(grad, grad, 1 − β2)
            slot.exp_avg = (&slot.exp_avg + ((&grad - &slot.exp_avg)? * (1.0 - c.beta1))?)?;
            slot.exp_avg_sq = ((&slot.exp_avg_sq * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((slot.exp_avg_sq.sqrt()? / bias_correction2_sqrt)? + c.eps)?;
            let p = (p - ((&slot.exp_avg / denom)? * step_size)?)?;
            match &mut slot.master {
                Some(master) => {
                    slot.var.set(&p.to_dtype(slot.var.dtype())?)?;
                    *master = p;
                }
                None => slot.var.set(&p)?,
            }
        }
        Ok(())
    }

    /// The f32 master copies by parameter name (only for parameters computed in another dtype).
    pub fn masters(&self) -> HashMap<String, Tensor> {
        self.slots
            .iter()
            .filter_map(|s| s.master.as_ref().map(|m| (s.name.clone(), m.clone())))
            .collect()
    }

    /// The state to checkpoint: `exp_avg/<name>`, `exp_avg_sq/<name>` and `master/<name>`.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for s in &self.slots {
            out.insert(format!("exp_avg/{}", s.name), s.exp_avg.clone());
            out.insert(format!("exp_avg_sq/{}", s.name), s.exp_avg_sq.clone());
            if let Some(m) = &s.master {
                out.insert(format!("master/{}", s.name), m.clone());
            }
        }
        out
    }

    /// Restores [`AdamW::state`] and the step count (parameters are restored by the caller).
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, steps: usize) -> Result<()> {
        for s in &mut self.slots {
            let get = |kind: &str| -> Result<Tensor> {
                let key = format!("{kind}/{}", s.name);
                let t = state
                    .get(&key)
                    .ok_or_else(|| TrainError::Resume(format!("optimizer state has no `{key}`")))?;
                if t.dims() != s.var.dims() {
                    return Err(TrainError::Resume(format!(
                        "optimizer state `{key}` has shape {:?}, the parameter {:?}",
                        t.dims(),
                        s.var.dims()
                    )));
                }
                Ok(t.to_device(s.var.device())?.to_dtype(DType::F32)?)
            };
            s.exp_avg = get("exp_avg")?;
            s.exp_avg_sq = get("exp_avg_sq")?;
            if s.master.is_some() {
                s.master = Some(get("master")?);
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// Total L2 norm of the gradients (accumulated in f64), as `clip_grad_norm_` reports it.
pub fn grad_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut sum = 0.0;
    for g in grads.iter().flatten() {
        sum += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(sum.sqrt())
}

/// `clip_grad_norm_(max_norm)`: scales every gradient by `max_norm / (norm + 1e-6)` when that is < 1.
pub fn clip(grads: &mut [Option<Tensor>], norm: f64, max_norm: f64) -> Result<()> {
    if max_norm <= 0.0 {
        return Ok(());
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = (&*g * coef)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cosine_schedule_follows_the_hf_formula() {
        // 100 steps, 3 warm-up: 0, 1/3, 2/3, then 1 at step 3 down to ~0 at the end.
        assert_eq!(lr_factor(Schedule::Cosine, 0, 3, 100), 0.0);
        assert!((lr_factor(Schedule::Cosine, 1, 3, 100) - 1.0 / 3.0).abs() < 1e-15);
        assert_eq!(lr_factor(Schedule::Cosine, 3, 3, 100), 1.0);
        let mid = 3 + 97 / 2;
        let want = 0.5 * (1.0 + (std::f64::consts::PI * (mid - 3) as f64 / 97.0).cos());
        assert_eq!(lr_factor(Schedule::Cosine, mid, 3, 100), want);
        assert!(lr_factor(Schedule::Cosine, 99, 3, 100) < 1e-3);
        assert_eq!(lr_factor(Schedule::Linear, 50, 0, 100), 0.5);
        assert_eq!(lr_factor(Schedule::Constant, 7, 0, 10), 1.0);
        assert_eq!(warmup_steps(100, 0.03), 3);
        assert_eq!(warmup_steps(10, 0.03), 1);
        assert_eq!(warmup_steps(10, 0.0), 0);
    }

    proptest! {
        #[test]
        fn schedules_stay_in_unit_range(step in 0usize..500, warmup in 0usize..50, total in 1usize..500) {
            for s in [Schedule::Cosine, Schedule::Linear, Schedule::Constant] {
                let f = lr_factor(s, step, warmup, total);
                prop_assert!((0.0..=1.0).contains(&f), "{s:?} {f}");
            }
        }
    }

    #[test]
    fn norms_and_biases_do_not_decay() {
        for name in [
            "model.layers.0.input_layernorm.multiway.0.weight",
            "model.norm.weight",
            "model.visual_abstractor.encoder.layers.0.crossattention.norm1.weight",
            "model.visual_abstractor.encoder.layers.0.crossattention.output.mlp.ffn_ln.weight",
            "model.visual_abstractor.visual_fc.bias",
            "model.vision_model.pre_layernorm.weight",
        ] {
            assert!(!decays(name), "{name}");
        }
        for name in [
            "model.layers.0.self_attn.q_proj.lora_A.weight",
            "model.visual_abstractor.query_embeds",
            "model.visual_abstractor.visual_fc.weight",
            "lm_head.weight",
        ] {
            assert!(decays(name), "{name}");
        }
    }

    #[test]
    fn adamw_matches_torch_on_a_hand_computed_step() {
        let var = Var::from_vec(vec![1.0f32, -2.0], 2, &candle_core::Device::Cpu).unwrap();
        let params = [Param {
            name: "w".into(),
            var: var.clone(),
        }];
        let config = AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new(&params, config).unwrap();
        let g = Tensor::new(&[0.5f32, -0.25], &candle_core::Device::Cpu).unwrap();
        opt.step(&[Some(g)], 0.01).unwrap();
        // Step 1: p·(1 − lr·wd), then p − lr·m̂/(√v̂ + eps) with m̂ = g, √v̂ = |g|: p − lr·sign(g).
        let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        let want = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) + 0.01];
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let d = candle_core::Device::Cpu;
        let mut grads = vec![
            Some(Tensor::new(&[3.0f32], &d).unwrap()),
            Some(Tensor::new(&[4.0f32], &d).unwrap()),
        ];
        let norm = grad_norm(&grads).unwrap();
        assert_eq!(norm, 5.0);
        clip(&mut grads, norm, 1.0).unwrap();
        assert!((grad_norm(&grads).unwrap() - 1.0).abs() < 1e-6);
    }
}
