//! Which frames of a clip the model sees. Pure arithmetic, kept apart from decoding so the
//! official rule (spec §7) and its generalisations can be tested exhaustively without video files.
//!
//! Official rule (`q_align.load_video`, decord): with `n` frames and average frame rate `f` (f64),
//! take `K = ⌊n / f⌋` frames at indices `⌊f·i⌋`, `i < K`: one frame per whole second.
//!
//! Generalisation to a sampling rate `r` frames per second: `step = f / r`, `K = ⌊n / step⌋`,
//! indices `⌊step·i⌋`. At `r = 1`, `f / 1.0 == f` exactly, so the arithmetic is bit-for-bit the
//! official one. A rate above the clip's own frame rate (`step < 1`) is clamped to `step = 1`
//! (every frame once) instead of repeating frames, but never below the official step `f`: a clip
//! slower than 1 fps (`f < 1`) keeps the official rule, which repeats each frame (decord gives
//! `[0, 0, 1, 1, …]` for 5 frames at 0.5 fps), so the model sees what the official loader gives.
//!
//! Cap: with `max_frames = N` and `K > N`, keep the N positions `p_j = ⌊(2j + 1)·K / (2N)⌋`
//! (integer arithmetic), the middle of N equal bins over the K candidates. The picks stay evenly
//! spread and symmetric over the clip, and the positions strictly increase because `K / N > 1`.
//!
//! Short clip: when `K = 0` (the clip is shorter than one sampling period, which crashes the
//! official code) the plan takes frame 0 and sets [`SamplingPlan::is_shorter_than_period`].

use crate::MediaError;

/// User-facing sampling settings: frames per second to take and an optional cap.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingOptions {
    rate: f64,
    max_frames: Option<usize>,
}

impl SamplingOptions {
    /// The official setting: 1 frame per second, no cap.
    pub const OFFICIAL: SamplingOptions = SamplingOptions {
        rate: 1.0,
        max_frames: None,
    };

    /// Checks `rate` (frames per second, finite and > 0) and `max_frames` (≥ 1 when given).
    pub fn new(rate: f64, max_frames: Option<usize>) -> Result<Self, MediaError> {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(MediaError::InvalidArgument {
                name: "fps".into(),
                message: format!(
                    "sampling rate must be a positive number of frames per second, got {rate}"
                ),
            });
        }
        if max_frames == Some(0) {
            return Err(MediaError::InvalidArgument {
                name: "max_frames".into(),
                message: "must be at least 1".into(),
            });
        }
        Ok(Self { rate, max_frames })
    }

    /// Frames per second to sample.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Upper bound on the number of sampled frames, if any.
    pub fn max_frames(&self) -> Option<usize> {
        self.max_frames
    }
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self::OFFICIAL
    }
}

/// The source frame indices to decode for one clip, with how they were derived.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingPlan {
    indices: Vec<usize>,
    n_frames: usize,
    avg_fps: f64,
    step: f64,
    uncapped_count: usize,
}

impl SamplingPlan {
    /// Plans the frames of a clip with `n_frames` frames (decord's `len(vr)`) at `avg_fps`
    /// (decord's `get_avg_fps()`). Fails only on an empty clip or a non-positive frame rate.
    pub fn new(
        n_frames: usize,
        avg_fps: f64,
        options: &SamplingOptions,
    ) -> Result<Self, MediaError> {
        if n_frames == 0 {
            return Err(MediaError::InvalidArgument {
                name: "n_frames".into(),
                message: "a clip with no frames cannot be sampled".into(),
            });
        }
        if !(avg_fps.is_finite() && avg_fps > 0.0) {
            return Err(MediaError::InvalidArgument {
                name: "avg_fps".into(),
                message: format!("average frame rate must be positive, got {avg_fps}"),
            });
        }
        // The clamp to one frame per step never goes below the official step (see the module docs).
        let step = (avg_fps / options.rate).max(avg_fps.min(1.0));
        // Python: int(n / fps), a float64 division truncated toward zero (both are positive).
        let uncapped_count = (n_frames as f64 / step).floor() as usize;
        let index_at = |i: usize| (step * i as f64).floor() as usize;

        let mut indices: Vec<usize> = match options.max_frames {
            Some(cap) if uncapped_count > cap => (0..cap)
                .map(|j| index_at(centred_position(j, cap, uncapped_count)))
                .collect(),
            _ => (0..uncapped_count).map(index_at).collect(),
        };
        if indices.is_empty() {
            indices.push(0);
        }
        Ok(Self {
            indices,
            n_frames,
            avg_fps,
            step,
            uncapped_count,
        })
    }

    /// Source frame indices to keep, each `< n_frames`: strictly increasing, except for a clip
    /// slower than 1 fps at the official rate, where each frame repeats as in decord.
    pub fn indices(&self) -> &[usize] {
        &self.indices
    }

    /// Frame count of the clip the plan was made for.
    pub fn n_frames(&self) -> usize {
        self.n_frames
    }

    /// Average frame rate the plan was made with.
    pub fn avg_fps(&self) -> f64 {
        self.avg_fps
    }

    /// Distance between consecutive candidate frames, in source frames (`avg_fps / rate`, at
    /// least `min(avg_fps, 1)`).
    pub fn step(&self) -> f64 {
        self.step
    }

    /// `K`: how many frames the rule gives before the cap (0 for a clip shorter than one period).
    pub fn uncapped_count(&self) -> usize {
        self.uncapped_count
    }

    /// True when `max_frames` cut the K candidates down.
    pub fn is_capped(&self) -> bool {
        self.indices.len() < self.uncapped_count
    }

    /// True when the clip is shorter than one sampling period (`K = 0`) and frame 0 stands in.
    pub fn is_shorter_than_period(&self) -> bool {
        self.uncapped_count == 0
    }
}

/// `⌊(2j + 1)·K / (2N)⌋`: the middle candidate of the j-th of N equal bins over K candidates.
fn centred_position(j: usize, cap: usize, count: usize) -> usize {
    let numerator = (2 * j as u128 + 1) * count as u128;
    (numerator / (2 * cap as u128)) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// decord's `get_avg_fps()` for baby.mp4: avg_frame_rate 2997/100 as a double.
    const BABY_FPS: f64 = 2997.0 / 100.0;

    fn plan(n: usize, fps: f64, rate: f64, cap: Option<usize>) -> SamplingPlan {
        SamplingPlan::new(n, fps, &SamplingOptions::new(rate, cap).unwrap()).unwrap()
    }

    #[test]
    fn official_rule_on_baby_mp4() {
        let p = plan(240, BABY_FPS, 1.0, None);
        assert_eq!(p.indices(), &[0, 29, 59, 89, 119, 149, 179, 209]);
        assert_eq!(p.uncapped_count(), 8);
        assert!(!p.is_capped() && !p.is_shorter_than_period());
    }

    #[test]
    fn ntsc_rate_matches_python_floats() {
        // Python: fps = 30000/1001; [int(fps*i) for i in range(int(300/fps))]
        let p = plan(300, 30000.0 / 1001.0, 1.0, None);
        assert_eq!(p.indices(), &[0, 29, 59, 89, 119, 149, 179, 209, 239, 269]);
    }

    #[test]
    fn exact_integer_products_are_not_rounded_down() {
        // 25 fps: 25·i is exact, so index 25·i, not 25·i − 1; 250 frames is exactly 10 s → K = 10.
        let p = plan(250, 25.0, 1.0, None);
        assert_eq!(
            p.indices(),
            &(0..10).map(|i| 25 * i).collect::<Vec<_>>()[..]
        );
    }

    #[test]
    fn higher_rate_samples_more_often() {
        // 30 fps at 2 fps: step 15, 90 frames → K = 6.
        let p = plan(90, 30.0, 2.0, None);
        assert_eq!(p.indices(), &[0, 15, 30, 45, 60, 75]);
        // Fractional step 29.97/4 = 7.4925.
        let p = plan(30, BABY_FPS, 4.0, None);
        assert_eq!(p.indices(), &[0, 7, 14, 22]);
    }

    #[test]
    fn rate_above_frame_rate_takes_every_frame_once() {
        let p = plan(12, 10.0, 25.0, None);
        assert_eq!(p.step(), 1.0);
        assert_eq!(p.indices(), &(0..12).collect::<Vec<_>>()[..]);
    }

    #[test]
    fn clip_slower_than_1_fps_repeats_frames_as_decord_does() {
        // decord 0.6.0 on 5 frames at 0.5 fps: K = int(5 / 0.5) = 10, indices int(0.5·i).
        let p = plan(5, 0.5, 1.0, None);
        assert_eq!(p.indices(), &[0, 0, 1, 1, 2, 2, 3, 3, 4, 4]);
        assert_eq!(p.step(), 0.5);
        // A rate above 1 fps never samples more often than the official rule.
        assert_eq!(plan(5, 0.5, 4.0, None).indices(), p.indices());
        // A lower rate spaces the picks out as usual: step 0.5 / 0.25 = 2.
        assert_eq!(plan(5, 0.5, 0.25, None).indices(), &[0, 2]);
    }

    #[test]
    fn short_clip_gives_first_frame_with_flag() {
        let p = plan(20, 30.0, 1.0, None);
        assert_eq!(p.indices(), &[0]);
        assert_eq!(p.uncapped_count(), 0);
        assert!(p.is_shorter_than_period());
        assert!(!p.is_capped());
    }

    #[test]
    fn cap_picks_bin_centres() {
        // 100 s at 10 fps → K = 100 candidates 0, 10, …, 990; N = 4 → positions 12, 37, 62, 87.
        let p = plan(1000, 10.0, 1.0, Some(4));
        assert_eq!(p.indices(), &[120, 370, 620, 870]);
        assert!(p.is_capped());
        assert_eq!(p.uncapped_count(), 100);
        // N = 1 → the middle candidate.
        assert_eq!(plan(1000, 10.0, 1.0, Some(1)).indices(), &[500]);
        // A cap that is not exceeded changes nothing.
        let p = plan(240, BABY_FPS, 1.0, Some(8));
        assert_eq!(p.indices(), &[0, 29, 59, 89, 119, 149, 179, 209]);
        assert!(!p.is_capped());
    }

    #[test]
    fn invalid_inputs_are_errors_naming_the_argument() {
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = SamplingOptions::new(rate, None).unwrap_err();
            assert!(err.to_string().contains("fps"), "{err}");
        }
        let err = SamplingOptions::new(1.0, Some(0)).unwrap_err();
        assert!(err.to_string().contains("max_frames"), "{err}");
        let opts = SamplingOptions::OFFICIAL;
        assert!(
            SamplingPlan::new(0, 30.0, &opts)
                .unwrap_err()
                .to_string()
                .contains("n_frames")
        );
        for fps in [0.0, -3.0, f64::NAN] {
            assert!(
                SamplingPlan::new(10, fps, &opts)
                    .unwrap_err()
                    .to_string()
                    .contains("avg_fps")
            );
        }
    }

    proptest! {
        #[test]
        fn indices_are_increasing_in_range_and_counted(
            n in 1usize..200_000,
            fps in 0.5f64..240.0,
            rate in 0.01f64..300.0,
            cap in proptest::option::of(1usize..64),
        ) {
            let p = plan(n, fps, rate, cap);
            let idx = p.indices();
            if fps >= 1.0 {
                prop_assert!(idx.windows(2).all(|w| w[0] < w[1]), "not strictly increasing: {idx:?}");
            } else {
                prop_assert!(idx.windows(2).all(|w| w[0] <= w[1]), "decreasing: {idx:?}");
            }
            prop_assert!(idx.iter().all(|&i| i < n));
            let step = (fps / rate).max(fps.min(1.0));
            let k = (n as f64 / step).floor() as usize;
            prop_assert_eq!(p.uncapped_count(), k);
            let expected_len = match cap { _ if k == 0 => 1, Some(c) => k.min(c), None => k };
            prop_assert_eq!(idx.len(), expected_len);
        }

        #[test]
        fn official_rate_equals_python_formula(n in 1usize..100_000, fps in 0.05f64..120.0) {
            let p = plan(n, fps, 1.0, None);
            let k = (n as f64 / fps) as usize;
            let expected: Vec<usize> = (0..k).map(|i| (fps * i as f64) as usize).collect();
            if k > 0 {
                prop_assert_eq!(p.indices(), &expected[..]);
            }
        }

        #[test]
        fn capped_plan_is_a_subset_of_the_uncapped_one(
            n in 1usize..50_000, fps in 1.0f64..60.0, cap in 1usize..40,
        ) {
            let full = plan(n, fps, 1.0, None);
            let capped = plan(n, fps, 1.0, Some(cap));
            prop_assert!(capped.indices().iter().all(|i| full.indices().binary_search(i).is_ok()));
        }
    }
}
