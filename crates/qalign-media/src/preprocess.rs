//! The checkpoint's `preprocessor_config.json` (a transformers `CLIPImageProcessor`) and the full
//! Q-Align image pipeline: RGB8 → `expand2square` → resize → center crop → rescale → normalise →
//! CHW f32. Each step follows transformers 4.36 + Pillow so the tensor equals the official one.

use std::path::Path;

use image::RgbImage;
use serde::Deserialize;

use crate::MediaError;
use crate::image::{DecodeOptions, expand2square, load_rgb, square_layout};
use crate::resize::{ResampleFilter, expand2square_and_resize, resize};

/// CLIP's (and Q-Align's) normalisation constants.
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// A normalised image tensor: 3 channels (RGB), channel-first, `data[c * height * width + y *
/// width + x]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Pixels {
    pub data: Vec<f32>,
    pub height: usize,
    pub width: usize,
}

impl Pixels {
    pub const CHANNELS: usize = 3;

    /// The tensor shape, `[3, height, width]`.
    pub fn shape(&self) -> [usize; 3] {
        [Self::CHANNELS, self.height, self.width]
    }
}

/// Target of the resize step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTarget {
    /// The short side becomes `n`, the long side `int(n · long / short)` (aspect kept).
    ShortestEdge(u32),
    /// Exactly `width` × `height`.
    Exact { height: u32, width: u32 },
}

/// `size` as written in the JSON: `448`, `{"shortest_edge": 448}` or `{"height": h, "width": w}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Int(i64),
    Map(std::collections::BTreeMap<String, i64>),
}

fn positive(value: i64, what: &str) -> Result<u32, String> {
    u32::try_from(value)
        .ok()
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("{what} must be a positive integer, got {value}"))
}

impl TryFrom<RawSize> for ResizeTarget {
    type Error = String;
    fn try_from(raw: RawSize) -> Result<Self, String> {
        match raw {
            // transformers' get_size_dict(int, default_to_square=False) for CLIP.
            RawSize::Int(n) => Ok(Self::ShortestEdge(positive(n, "size")?)),
            RawSize::Map(map) => {
                let keys: Vec<&str> = map.keys().map(String::as_str).collect();
                match keys.as_slice() {
                    ["shortest_edge"] => Ok(Self::ShortestEdge(positive(
                        map["shortest_edge"],
                        "size.shortest_edge",
                    )?)),
                    ["height", "width"] => Ok(Self::Exact {
                        height: positive(map["height"], "size.height")?,
                        width: positive(map["width"], "size.width")?,
                    }),
                    _ => Err(format!(
                        "size must be an integer, {{\"shortest_edge\": n}} or {{\"height\": h, \"width\": w}}; got keys {keys:?}"
                    )),
                }
            }
        }
    }
}

impl<'de> Deserialize<'de> for ResizeTarget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawSize::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "size must be an integer or an object of integers ({\"shortest_edge\": n} or {\"height\": h, \"width\": w})",
            )
        })?;
        Self::try_from(raw).map_err(serde::de::Error::custom)
    }
}

impl ResizeTarget {
    /// Output `(width, height)` for an input of `width` × `height` (transformers'
    /// `get_resize_output_image_size`, `default_to_square=False`).
    pub fn output_size(self, width: u32, height: u32) -> (u32, u32) {
        match self {
            Self::Exact { height, width } => (width, height),
            Self::ShortestEdge(n) => {
                let (short, long) = (width.min(height), width.max(height));
                if short == 0 {
                    return (width, height);
                }
                // Python: int(n * long / short), true division then truncation.
                let new_long = (f64::from(n) * f64::from(long) / f64::from(short)) as u32;
                if width <= height {
                    (n, new_long)
                } else {
                    (new_long, n)
                }
            }
        }
    }
}

/// `crop_size`: `448` (square) or `{"height": h, "width": w}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropSize {
    pub height: u32,
    pub width: u32,
}

impl<'de> Deserialize<'de> for CropSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let message = "crop_size must be an integer or {\"height\": h, \"width\": w}";
        let raw = RawSize::deserialize(d).map_err(|_| serde::de::Error::custom(message))?;
        let crop = match raw {
            RawSize::Int(n) => {
                let n = positive(n, "crop_size").map_err(serde::de::Error::custom)?;
                CropSize {
                    height: n,
                    width: n,
                }
            }
            RawSize::Map(map) if map.len() == 2 && map.contains_key("height") => {
                let get = |k: &str| {
                    map.get(k)
                        .ok_or_else(|| format!("{message}; `{k}` is missing"))
                        .and_then(|&v| positive(v, &format!("crop_size.{k}")))
                        .map_err(serde::de::Error::custom)
                };
                CropSize {
                    height: get("height")?,
                    width: get("width")?,
                }
            }
            RawSize::Map(_) => return Err(serde::de::Error::custom(message)),
        };
        Ok(crop)
    }
}

/// A per-channel value, given as one number (applied to all channels) or three.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrThree {
    One(f64),
    Three([f64; 3]),
}

fn per_channel<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[f64; 3], D::Error> {
    match OneOrThree::deserialize(d) {
        Ok(OneOrThree::One(v)) => Ok([v; 3]),
        Ok(OneOrThree::Three(v)) => Ok(v),
        Err(_) => Err(serde::de::Error::custom(
            "expected a number or a list of 3 numbers (one per RGB channel)",
        )),
    }
}

fn resample_filter<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ResampleFilter, D::Error> {
    let code = i64::deserialize(d)?;
    u32::try_from(code)
        .ok()
        .and_then(ResampleFilter::from_pillow_code)
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "resample {code} is not supported (use 1 LANCZOS, 2 BILINEAR, 3 BICUBIC, 4 BOX or 5 HAMMING; 0 NEAREST is not implemented)"
            ))
        })
}

fn default_true() -> bool {
    true
}
fn default_rescale_factor() -> f64 {
    1.0 / 255.0
}
fn default_size() -> ResizeTarget {
    ResizeTarget::ShortestEdge(224)
}
fn default_crop() -> CropSize {
    CropSize {
        height: 224,
        width: 224,
    }
}
fn default_mean() -> [f64; 3] {
    CLIP_MEAN
}
fn default_std() -> [f64; 3] {
    CLIP_STD
}
fn default_filter() -> ResampleFilter {
    ResampleFilter::Bicubic
}

/// The fields of `preprocessor_config.json` that matter, with `CLIPImageProcessor`'s defaults
/// for missing ones. Other keys (`feature_extractor_type`, ...) are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PreprocessConfig {
    #[serde(default = "default_true")]
    pub do_resize: bool,
    #[serde(default = "default_size")]
    pub size: ResizeTarget,
    /// Pillow filter (`resample`, 3 = BICUBIC).
    #[serde(
        default = "default_filter",
        rename = "resample",
        deserialize_with = "resample_filter"
    )]
    pub resample: ResampleFilter,
    #[serde(default = "default_true")]
    pub do_center_crop: bool,
    #[serde(default = "default_crop")]
    pub crop_size: CropSize,
    #[serde(default = "default_true")]
    pub do_rescale: bool,
    #[serde(default = "default_rescale_factor")]
    pub rescale_factor: f64,
    #[serde(default = "default_true")]
    pub do_normalize: bool,
    #[serde(default = "default_mean", deserialize_with = "per_channel")]
    pub image_mean: [f64; 3],
    #[serde(default = "default_std", deserialize_with = "per_channel")]
    pub image_std: [f64; 3],
    /// Images are always converted to RGB by the decoder; kept for completeness.
    #[serde(default = "default_true")]
    pub do_convert_rgb: bool,
}

impl PreprocessConfig {
    /// The CLIP processor with a square `size` (OneAlign's checkpoint uses 448).
    pub fn clip(size: u32) -> Self {
        PreprocessConfig {
            do_resize: true,
            size: ResizeTarget::ShortestEdge(size),
            resample: ResampleFilter::Bicubic,
            do_center_crop: true,
            crop_size: CropSize {
                height: size,
                width: size,
            },
            do_rescale: true,
            rescale_factor: default_rescale_factor(),
            do_normalize: true,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            do_convert_rgb: true,
        }
    }

    /// Reads `preprocessor_config.json`.
    pub fn from_file(path: &Path) -> Result<Self, MediaError> {
        let text = std::fs::read_to_string(path).map_err(|source| MediaError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text, path)
    }

    /// Parses the JSON text of a `preprocessor_config.json`; `source` names it in errors.
    pub fn from_json_str(json: &str, source: &Path) -> Result<Self, MediaError> {
        let config: Self = serde_json::from_str(json).map_err(|e| MediaError::Decode {
            path: source.to_path_buf(),
            message: format!("invalid preprocessor config: {e}"),
        })?;
        config.validate().map_err(|message| MediaError::Decode {
            path: source.to_path_buf(),
            message: format!("invalid preprocessor config: {message}"),
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if !self.rescale_factor.is_finite() {
            return Err(format!(
                "rescale_factor must be finite, got {}",
                self.rescale_factor
            ));
        }
        if let Some(m) = self.image_mean.iter().find(|m| !m.is_finite()) {
            return Err(format!("image_mean must be finite, got {m}"));
        }
        if let Some(s) = self
            .image_std
            .iter()
            .find(|s| !(s.is_finite() && **s != 0.0))
        {
            return Err(format!("image_std must be finite and non-zero, got {s}"));
        }
        Ok(())
    }

    /// The `expand2square` fill colour: `int(255 · mean_c)` per channel ((122, 116, 104) for CLIP).
    pub fn background(&self) -> [u8; 3] {
        self.image_mean.map(|m| (255.0 * m).clamp(0.0, 255.0) as u8)
    }

    /// The Q-Align pipeline: `expand2square` with [`Self::background`], then the CLIP processor.
    /// Any size is processed; [`check_square_side`] says which ones the official code cannot
    /// (`preprocess_path` and video sampling refuse those).
    pub fn preprocess(&self, img: &RgbImage) -> Pixels {
        self.normalize(&self.pad_resize_and_crop(img))
    }

    /// The 8-bit stage of [`Self::preprocess`]: `expand2square`, resize, center crop. The padded
    /// canvas is never built when a resize follows (same bytes, see
    /// [`expand2square_and_resize`]).
    pub fn pad_resize_and_crop(&self, img: &RgbImage) -> RgbImage {
        if !self.do_resize {
            return self.crop(expand2square(img, self.background()));
        }
        let side = square_layout(img.width(), img.height()).side;
        let (width, height) = self.size.output_size(side, side);
        self.crop(expand2square_and_resize(
            img,
            self.background(),
            width,
            height,
            self.resample,
        ))
    }

    /// The CLIP processor alone (no square padding, as in the official `eval.py`).
    pub fn clip_process(&self, img: &RgbImage) -> Pixels {
        self.normalize(&self.resize_and_crop(img))
    }

    /// The 8-bit stage of the CLIP processor: Pillow resize (if `do_resize`), then center crop
    /// (if `do_center_crop`).
    pub fn resize_and_crop(&self, img: &RgbImage) -> RgbImage {
        let resized = if self.do_resize {
            let (w, h) = self.size.output_size(img.width(), img.height());
            resize(img, w, h, self.resample)
        } else {
            img.clone()
        };
        self.crop(resized)
    }

    fn crop(&self, img: RgbImage) -> RgbImage {
        let (width, height) = (self.crop_size.width, self.crop_size.height);
        if self.do_center_crop && img.dimensions() != (width, height) {
            center_crop(&img, width, height)
        } else {
            img
        }
    }

    /// The float stage: `float32(float64(u8) · rescale_factor)` (numpy's `image * scale` on a
    /// uint8 array, then `astype(float32)`), then `(x − mean_c) / std_c` in f32, laid out CHW.
    pub fn normalize(&self, img: &RgbImage) -> Pixels {
        // One lookup table per channel: the output depends only on (channel, byte).
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            let mean = self.image_mean[c] as f32;
            let std = self.image_std[c] as f32;
            for (byte, out) in table.iter_mut().enumerate() {
                let mut x = if self.do_rescale {
                    (byte as f64 * self.rescale_factor) as f32
                } else {
                    byte as f32
                };
                if self.do_normalize {
                    x = (x - mean) / std;
                }
                *out = x;
            }
        }
        let (width, height) = (img.width() as usize, img.height() as usize);
        let plane = width * height;
        let mut data = vec![0f32; 3 * plane];
        let (red, rest) = data.split_at_mut(plane);
        let (green, blue) = rest.split_at_mut(plane);
        for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
            red[i] = lut[0][usize::from(px[0])];
            green[i] = lut[1][usize::from(px[1])];
            blue[i] = lut[2][usize::from(px[2])];
        }
        Pixels {
            data,
            height,
            width,
        }
    }
}

/// transformers' `center_crop`: window at `((H − h) // 2, (W − w) // 2)` (floor division);
/// where the crop is larger than the image the missing pixels are 0.
pub fn center_crop(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_w, in_h) = img.dimensions();
    if (in_w, in_h) == (width, height) {
        return img.clone();
    }
    let top = (i64::from(in_h) - i64::from(height)).div_euclid(2);
    let left = (i64::from(in_w) - i64::from(width)).div_euclid(2);
    let mut out = RgbImage::new(width, height);
    // Overlap of the crop window with the image, in output coordinates.
    let x0 = (-left).clamp(0, i64::from(width)) as u32;
    let x1 = (i64::from(in_w) - left).clamp(0, i64::from(width)) as u32;
    let y0 = (-top).clamp(0, i64::from(height)) as u32;
    let y1 = (i64::from(in_h) - top).clamp(0, i64::from(height)) as u32;
    if x0 >= x1 {
        return out;
    }
    let out_stride = width as usize * 3;
    let in_stride = in_w as usize * 3;
    let span = (x1 - x0) as usize * 3;
    let src = img.as_raw();
    let dst: &mut [u8] = &mut out;
    for y in y0..y1 {
        let sy = (i64::from(y) + top) as usize;
        let sx = (i64::from(x0) + left) as usize;
        let from = sy * in_stride + sx * 3;
        let to = y as usize * out_stride + x0 as usize * 3;
        dst[to..to + span].copy_from_slice(&src[from..from + span]);
    }
    out
}

/// Refuses a `width` × `height` image whose `expand2square` side is 1 or 3 pixels (see
/// [`MediaError::DegenerateSquare`]): there is no official tensor to match for it.
pub fn check_square_side(path: &Path, width: u32, height: u32) -> Result<(), MediaError> {
    let side = square_layout(width, height).side;
    if side == 1 || side == 3 {
        return Err(MediaError::DegenerateSquare {
            path: path.to_path_buf(),
            width,
            height,
            side,
        });
    }
    Ok(())
}

/// Loads an image file and runs the Q-Align pipeline on it; images the official pipeline
/// cannot preprocess are refused ([`check_square_side`]).
pub fn preprocess_path(
    path: &Path,
    config: &PreprocessConfig,
    opts: &DecodeOptions,
) -> Result<Pixels, MediaError> {
    let img = load_rgb(path, opts)?;
    check_square_side(path, img.width(), img.height())?;
    Ok(config.preprocess(&img))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<PreprocessConfig, MediaError> {
        PreprocessConfig::from_json_str(json, Path::new("preprocessor_config.json"))
    }

    fn error_text(json: &str) -> String {
        parse(json).unwrap_err().to_string()
    }

    #[test]
    fn clip_defaults_apply_to_missing_fields() {
        let cfg = parse(r#"{"size": 448, "crop_size": 448}"#).unwrap();
        assert_eq!(cfg, PreprocessConfig::clip(448));
        assert_eq!(cfg.rescale_factor, 1.0 / 255.0);
        assert!(cfg.do_rescale && cfg.do_normalize && cfg.do_convert_rgb);
        let empty = parse("{}").unwrap();
        assert_eq!(empty.size, ResizeTarget::ShortestEdge(224));
        assert_eq!(empty.resample, ResampleFilter::Bicubic);
    }

    #[test]
    fn size_and_crop_accept_every_transformers_form() {
        let cfg = parse(
            r#"{"size": {"shortest_edge": 336}, "crop_size": {"height": 300, "width": 320},
                "image_mean": 0.5, "image_std": [0.1, 0.2, 0.3], "resample": 2}"#,
        )
        .unwrap();
        assert_eq!(cfg.size, ResizeTarget::ShortestEdge(336));
        assert_eq!(
            cfg.crop_size,
            CropSize {
                height: 300,
                width: 320
            }
        );
        assert_eq!(cfg.image_mean, [0.5; 3]);
        assert_eq!(cfg.resample, ResampleFilter::Bilinear);
        let exact = parse(r#"{"size": {"height": 10, "width": 20}}"#).unwrap();
        assert_eq!(
            exact.size,
            ResizeTarget::Exact {
                height: 10,
                width: 20
            }
        );
    }

    #[test]
    fn bad_configs_are_rejected_with_the_reason() {
        assert!(error_text(r#"{"resample": 0}"#).contains("resample 0 is not supported"));
        assert!(error_text(r#"{"resample": 7}"#).contains("resample 7"));
        assert!(error_text(r#"{"size": 0}"#).contains("size must be a positive integer"));
        assert!(error_text(r#"{"size": {"longest_edge": 5}}"#).contains("longest_edge"));
        assert!(error_text(r#"{"size": "big"}"#).contains("size must be an integer"));
        assert!(error_text(r#"{"crop_size": {"height": 4}}"#).contains("crop_size"));
        assert!(error_text(r#"{"image_mean": [0.1, 0.2]}"#).contains("3 numbers"));
        assert!(error_text(r#"{"image_std": [0.1, 0.0, 0.2]}"#).contains("non-zero"));
        assert!(error_text("{").contains("preprocessor_config.json"));
        assert!(error_text("{").contains("invalid preprocessor config"));
    }

    #[test]
    fn missing_config_file_names_the_path() {
        let err = PreprocessConfig::from_file(Path::new("/nonexistent/pp.json")).unwrap_err();
        assert!(matches!(err, MediaError::Io { .. }));
        assert!(err.to_string().contains("/nonexistent/pp.json"));
    }

    #[test]
    fn background_is_int_of_255_times_mean() {
        assert_eq!(PreprocessConfig::clip(448).background(), [122, 116, 104]);
        let mut cfg = PreprocessConfig::clip(448);
        cfg.image_mean = [0.5, 1.0, 0.0];
        assert_eq!(cfg.background(), [127, 255, 0]);
    }

    #[test]
    fn shortest_edge_truncates_the_long_side_like_python_int() {
        let target = ResizeTarget::ShortestEdge(448);
        assert_eq!(target.output_size(1620, 1080), (672, 448));
        assert_eq!(target.output_size(120, 333), (448, 1243)); // 448*333/120 = 1243.2
        assert_eq!(target.output_size(300, 200), (672, 448));
        assert_eq!(target.output_size(512, 512), (448, 448));
        assert_eq!(ResizeTarget::ShortestEdge(7).output_size(3, 10), (7, 23)); // 23.33
    }

    #[test]
    fn rescale_by_f64_product_equals_f32_division_for_every_byte() {
        // The spec (numpy: float32(float64(u8) * (1/255))) and the fixtures README (float32
        // division u8 / 255) describe the same numbers; pin that.
        for byte in 0..=255u8 {
            let product = (f64::from(byte) * (1.0 / 255.0)) as f32;
            let division = f32::from(byte) / 255.0;
            assert_eq!(product.to_bits(), division.to_bits(), "byte {byte}");
        }
    }

    #[test]
    fn normalize_is_channel_first_and_uses_mean_and_std() {
        let cfg = PreprocessConfig::clip(2);
        let img = RgbImage::from_raw(2, 1, vec![0, 128, 255, 10, 20, 30]).unwrap();
        let px = cfg.normalize(&img);
        assert_eq!(px.shape(), [3, 1, 2]);
        let expect = |byte: u8, c: usize| {
            (f32::from(byte) / 255.0 - cfg.image_mean[c] as f32) / cfg.image_std[c] as f32
        };
        let want = [
            expect(0, 0),
            expect(10, 0),
            expect(128, 1),
            expect(20, 1),
            expect(255, 2),
            expect(30, 2),
        ];
        assert_eq!(px.data, want);
        let mut raw = cfg.clone();
        raw.do_rescale = false;
        raw.do_normalize = false;
        assert_eq!(
            raw.normalize(&img).data,
            [0.0, 10.0, 128.0, 20.0, 255.0, 30.0]
        );
    }

    #[test]
    fn center_crop_matches_transformers_offsets_and_zero_padding() {
        let img = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8, y as u8, 9]));
        // Smaller crop: top = (4-2)//2 = 1, left = (5-2)//2 = 1.
        let small = center_crop(&img, 2, 2);
        assert_eq!(small.get_pixel(0, 0).0, [1, 1, 9]);
        assert_eq!(small.get_pixel(1, 1).0, [2, 2, 9]);
        // Larger crop: top = (4-7)//2 = -2, left = (5-6)//2 = -1 -> zero borders.
        let big = center_crop(&img, 6, 7);
        assert_eq!(big.dimensions(), (6, 7));
        assert_eq!(big.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(big.get_pixel(1, 2).0, [0, 0, 9]);
        assert_eq!(big.get_pixel(5, 5).0, [4, 3, 9]);
        assert_eq!(big.get_pixel(5, 6).0, [0, 0, 0]);
        let count_image = big.pixels().filter(|p| p[2] == 9).count();
        assert_eq!(count_image, 20);
    }

    #[test]
    fn pipeline_handles_non_square_targets_and_disabled_steps() {
        let img = RgbImage::from_fn(30, 10, |x, y| image::Rgb([x as u8 * 8, y as u8 * 20, 50]));
        let mut cfg = PreprocessConfig::clip(12);
        let px = cfg.preprocess(&img);
        assert_eq!(px.shape(), [3, 12, 12]);
        cfg.do_resize = false;
        cfg.do_center_crop = false;
        assert_eq!(cfg.preprocess(&img).shape(), [3, 30, 30]);
        cfg.do_center_crop = true;
        assert_eq!(cfg.preprocess(&img).shape(), [3, 12, 12]);
        // Without padding (eval.py path) the shortest edge goes to 12, then the crop.
        let clip_only = PreprocessConfig::clip(12);
        assert_eq!(clip_only.resize_and_crop(&img).dimensions(), (12, 12));
    }
}
