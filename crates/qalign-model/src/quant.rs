//! Which storage each linear layer got when the model loaded with quantised weights
//! ([`crate::LoadOptions::quant`]): a layer whose input dimension does not fit the asked block falls
//! back ([`Quant::for_in_dim`]), and users need to see where. The same report is also predicted from
//! config.json alone ([`QuantReport::plan`]), so `qalign info --quant` needs no tensor; a test holds
//! the prediction to what a real load records.

use std::borrow::Cow;
use std::sync::Mutex;

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ8_0, GgmlType};
use candle_core::quantized::{QStorage, QTensor};
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use rayon::prelude::*;
use serde::{Serialize, Serializer};

use half::f16;

use crate::config::ModelConfig;
use crate::cpu_quant::{Q4K_BYTES, Q4K_VALUES, scale_min};
use crate::device::Quant;
use crate::error::{ModelError, Result};
use crate::gguf::KernelCapture;

/// Quantises a weight matrix `[out, in]` (`in` a multiple of `format`'s block) into ggml blocks on
/// the weight's device. candle's `QTensor::quantize` runs on one thread (and on CUDA copies the
/// weight to the host to do so), which made loading the real OneAlign with `--quant q4k` take
/// minutes; every block is quantised on its own, so splitting the rows over rayon's threads gives
/// the same bytes.
pub(crate) fn quantize_weight(weight: &Tensor, format: Quant) -> Result<QTensor> {
    match format {
        Quant::Q8_0 => quantize_blocks::<BlockQ8_0>(weight, BlockQ8_0::from_float),
        Quant::Q4K => quantize_blocks::<BlockQ4K>(weight, q4k_from_float),
    }
}

fn quantize_blocks<B: GgmlType + 'static>(
    weight: &Tensor,
    from_float: fn(&[f32], &mut [B]),
) -> Result<QTensor> {
    let (out_dim, in_dim) = weight.dims2()?;
    if in_dim == 0 || !in_dim.is_multiple_of(B::BLCK_SIZE) {
        return Err(ModelError::Quant(format!(
            "a [{out_dim}, {in_dim}] weight does not split into {:?} blocks of {}",
            B::DTYPE,
            B::BLCK_SIZE
        )));
    }
    let device = weight.device().clone();
    let host = weight
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .contiguous()?;
    let blocks_per_row = in_dim / B::BLCK_SIZE;
    let mut blocks = vec![B::zeros(); out_dim * blocks_per_row];
    {
        let (storage, layout) = host.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(values)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        else {
            return Err(ModelError::Quant(
                "the weight to quantise is not a contiguous f32 host tensor".into(),
            ));
        };
        // Enough rows per task to keep rayon's overhead small, few enough to spread a matrix.
        let rows = (1usize << 16).div_ceil(in_dim);
        values[start..end]
            .par_chunks(rows * in_dim)
            .zip(blocks.par_chunks_mut(rows * blocks_per_row))
            .for_each(|(xs, ys)| from_float(xs, ys));
    }
    drop(host);
    let on_host = QTensor::new(QStorage::Cpu(Box::new(blocks)), (out_dim, in_dim))?;
    if device.is_cpu() {
        return Ok(on_host);
    }
    let bytes = on_host.data()?;
    let storage = QStorage::from_data(Cow::Borrowed(&bytes), &device, B::DTYPE)?;
    Ok(QTensor::new(storage, (out_dim, in_dim))?)
}

// The byte view in `q4k_from_float` relies on ggml's 144-byte layout without padding.
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == Q4K_BYTES);

/// Q4K blocks of `xs` (whole blocks of 256) by candle's rule (ggml's `make_qkx1_quants` search of
/// 2023, `BlockQ4K::from_float`), with one correction that ggml's later rule also makes: a
/// 32-value sub-block's min is clamped to ≤ 0 *before* testing for a constant run. candle tests
/// first, so 32 equal non-zero weights came out as zeros; every other block is candle's, byte
/// for byte. (ggml's current search, `make_qkx2_quants`, has ~4% less RMS error on the tiny
/// model's weights but takes about 4× as long, which `--quant q4k` would pay at every start.)
fn q4k_from_float(xs: &[f32], ys: &mut [BlockQ4K]) {
    // SAFETY: `BlockQ4K` is `repr(C)`, 144 bytes of f16s and u8s without padding (asserted
    // above), so every byte pattern is a valid block.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(ys.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(ys))
    };
    for (x, out) in xs
        .chunks_exact(Q4K_VALUES)
        .zip(bytes.chunks_exact_mut(Q4K_BYTES))
    {
        q4k_block(x, out);
    }
}

/// One Q4K block: 256 values into 144 bytes (layout in [`crate::cpu_quant`]).
fn q4k_block(x: &[f32], out: &mut [u8]) {
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    for (j, sub) in x.chunks_exact(32).enumerate() {
        (scales[j], mins[j]) = q4k_scale_min(sub);
    }
    let max_scale = scales.iter().fold(0.0, |max, &val| val.max(max));
    let max_min = mins.iter().fold(0.0, |max, &val| val.max(max));
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..8 {
        let ls = nearest_int(inv_scale * scales[j]).min(63) as u8;
        let lm = nearest_int(inv_min * mins[j]).min(63) as u8;
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    let mut l = [0u8; Q4K_VALUES];
    for j in 0..8 {
        let (sc, m) = scale_min(j, &packed);
        let d = d.to_f32() * sc as f32;
        if d != 0.0 {
            let dm = dmin.to_f32() * m as f32;
            for i in 32 * j..32 * (j + 1) {
                l[i] = nearest_int((x[i] + dm) / d).clamp(0, 15) as u8;
            }
        }
    }
    out[0..2].copy_from_slice(&d.to_le_bytes());
    out[2..4].copy_from_slice(&dmin.to_le_bytes());
    out[4..16].copy_from_slice(&packed);
    for (q, pair) in out[16..].chunks_exact_mut(32).zip(l.chunks_exact(64)) {
        for (i, q) in q.iter_mut().enumerate() {
            *q = pair[i] | (pair[i + 32] << 4);
        }
    }
}

fn nearest_int(v: f32) -> i32 {
    v.round() as i32
}

/// The (scale, min) of one 32-value sub-block for 4-bit levels: candle's `make_qkx1_quants(15, 5)`
/// with the min clamped before the constant test (value ≈ scale·l − min).
fn q4k_scale_min(x: &[f32]) -> (f32, f32) {
    const NMAX: i32 = 15;
    let n = x.len();
    let mut l = [0u8; 32];
    let min = *x.iter().min_by(|a, b| a.total_cmp(b)).unwrap_or(&x[0]);
    let max = *x.iter().max_by(|a, b| a.total_cmp(b)).unwrap_or(&x[0]);
    let mut min = min.min(0.);
    if max == min {
        // Zero, or a constant run ≤ 0 (kept in the min); a positive run has min 0 < max.
        return (0.0, -min);
    }
    let mut iscale = NMAX as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    for _ in 0..5 {
        let mut sumlx = 0.0;
        let mut suml2 = 0;
        let mut did_change = false;
        for (i, value) in x.iter().enumerate() {
            let li = nearest_int(iscale * (value - min)).clamp(0, NMAX);
            if li as u8 != l[i] {
                l[i] = li as u8;
                did_change = true;
            }
            sumlx += (value - min) * li as f32;
            suml2 += li * li;
        }
        scale = sumlx / suml2 as f32;
        let sum: f32 = x
            .iter()
            .zip(l.iter())
            .map(|(xi, &li)| xi - scale * li as f32)
            .sum();
        min = sum / n as f32;
        if min > 0.0 {
            min = 0.0;
        }
        iscale = 1.0 / scale;
        if !did_change {
            break;
        }
    }
    (scale, -min)
}

impl Serialize for Quant {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// One linear layer (one matmul) and the storage its weight got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QuantLayer {
    /// The checkpoint prefix of the layer; fused layers name their parts in braces
    /// (`...self_attn.{k,v}_proj.multiway.0`).
    pub name: String,
    pub in_dim: usize,
    pub out_dim: usize,
    /// The block format, or `None` when the weight stayed dense f32.
    pub format: Option<Quant>,
}

impl QuantLayer {
    /// The layer's name with its layer indices replaced by `*` (`model.layers.*.mlp.down_proj`).
    pub fn kind(&self) -> String {
        self.name
            .split('.')
            .map(|part| {
                if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
                    "*"
                } else {
                    part
                }
            })
            .collect::<Vec<_>>()
            .join(".")
    }
}

/// The layers of one kind that share a storage format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KindCount {
    pub kind: String,
    pub count: usize,
    pub format: Option<Quant>,
}

/// Every linear layer of a model loaded with `asked`, in load order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QuantReport {
    pub asked: Quant,
    pub layers: Vec<QuantLayer>,
}

impl QuantReport {
    /// The layers that did not get the asked format (Q8_0 or f32 instead).
    pub fn fallbacks(&self) -> impl Iterator<Item = &QuantLayer> {
        self.layers
            .iter()
            .filter(move |l| l.format != Some(self.asked))
    }

    /// Layer counts per kind and format, in first-seen order.
    pub fn kinds(&self) -> Vec<KindCount> {
        let mut kinds: Vec<KindCount> = Vec::new();
        for layer in &self.layers {
            let kind = layer.kind();
            match kinds
                .iter_mut()
                .find(|k| k.kind == kind && k.format == layer.format)
            {
                Some(k) => k.count += 1,
                None => kinds.push(KindCount {
                    kind,
                    count: 1,
                    format: layer.format,
                }),
            }
        }
        kinds
    }

    /// The report a load of a model of `config` with `asked` records, worked out from the
    /// config alone (the input dimension of every linear layer).
    pub fn plan(config: &ModelConfig, asked: Quant) -> Self {
        let mut layers = Vec::new();
        let mut add = |name: String, in_dim: usize, out_dim: usize| {
            layers.push(QuantLayer {
                name,
                in_dim,
                out_dim,
                format: asked.for_in_dim(in_dim),
            })
        };
        let v = &config.vision;
        for i in 0..v.num_layers {
            let p = format!("model.vision_model.encoder.layers.{i}");
            add(
                format!("{p}.self_attn.query_key_value"),
                v.hidden_size,
                3 * v.hidden_size,
            );
            add(format!("{p}.self_attn.dense"), v.hidden_size, v.hidden_size);
            add(format!("{p}.mlp.fc1"), v.hidden_size, v.intermediate_size);
            add(format!("{p}.mlp.fc2"), v.intermediate_size, v.hidden_size);
        }
        let a = &config.abstractor;
        let (d, m) = (a.hidden_size, a.intermediate_size);
        for i in 0..a.num_layers {
            let p = format!("model.visual_abstractor.encoder.layers.{i}.crossattention");
            for name in ["query", "key", "value"] {
                add(format!("{p}.attention.{name}"), d, d);
            }
            add(format!("{p}.output.out_proj"), d, d);
            add(format!("{p}.output.mlp.w1"), d, m);
            add(format!("{p}.output.mlp.w2"), m, d);
            add(format!("{p}.output.mlp.w3"), d, m);
        }
        add("model.visual_abstractor.visual_fc".into(), d, a.output_size);
        let l = &config.llm;
        let (d, q_dim, kv_dim) = (
            l.hidden_size,
            l.num_heads * l.head_dim,
            l.num_kv_heads * l.head_dim,
        );
        for i in 0..l.num_layers {
            let p = format!("model.layers.{i}");
            add(format!("{p}.self_attn.q_proj"), d, q_dim);
            for m in 0..2 {
                add(
                    format!("{p}.self_attn.{{k,v}}_proj.multiway.{m}"),
                    d,
                    2 * kv_dim,
                );
            }
            add(format!("{p}.self_attn.o_proj"), q_dim, d);
            add(format!("{p}.mlp.gate_proj"), d, l.intermediate_size);
            add(format!("{p}.mlp.up_proj"), d, l.intermediate_size);
            add(format!("{p}.mlp.down_proj"), l.intermediate_size, d);
        }
        Self { asked, layers }
    }
}

/// Where a loading model records its linear layers ([`crate::loader::Weights::with_quant`]).
#[derive(Debug)]
pub(crate) struct QuantLog {
    pub(crate) asked: Quant,
    layers: Mutex<Vec<QuantLayer>>,
    /// The kernels themselves, kept when the load is for `qalign quantize`.
    capture: Option<KernelCapture>,
}

impl QuantLog {
    pub(crate) fn new(asked: Quant) -> Self {
        Self {
            asked,
            layers: Mutex::new(Vec::new()),
            capture: None,
        }
    }

    /// A log that also keeps every layer's kernel, for writing them out.
    pub(crate) fn capturing(asked: Quant) -> Self {
        Self {
            capture: Some(KernelCapture::default()),
            ..Self::new(asked)
        }
    }

    pub(crate) fn capture(&self) -> Option<&KernelCapture> {
        self.capture.as_ref()
    }

    pub(crate) fn record(&self, layer: QuantLayer) {
        if let Ok(mut layers) = self.layers.lock() {
            layers.push(layer);
        }
    }

    pub(crate) fn report(&self) -> QuantReport {
        QuantReport {
            asked: self.asked,
            layers: self.layers.lock().map(|l| l.clone()).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_quantisation_gives_candles_bytes() {
        // Rows that split unevenly over the tasks, and values with a spread that exercises the
        // blocks' scales and mins.
        let (out_dim, in_dim) = (300, 512);
        let values: Vec<f32> = (0..out_dim * in_dim)
            .map(|i| ((i as f32 * 0.7131).sin() * 3.0 + (i % 97) as f32 * 0.01).powi(3))
            .collect();
        let w = Tensor::from_vec(values, (out_dim, in_dim), &Device::Cpu).unwrap();
        for format in [Quant::Q8_0, Quant::Q4K] {
            let ours = quantize_weight(&w, format).unwrap();
            let candle = QTensor::quantize(&w, format.ggml()).unwrap();
            assert_eq!(ours.dtype(), candle.dtype());
            assert_eq!(ours.shape(), candle.shape());
            assert!(ours.data().unwrap() == candle.data().unwrap(), "{format}");
        }
        let bf16 = w.to_dtype(DType::BF16).unwrap();
        let ours = quantize_weight(&bf16, Quant::Q4K).unwrap();
        let candle = QTensor::quantize(&bf16, Quant::Q4K.ggml()).unwrap();
        assert!(ours.data().unwrap() == candle.data().unwrap());
    }

    fn decoded(q: &QTensor) -> Vec<f32> {
        q.dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn q4k_keeps_runs_of_one_value() {
        // Sub-blocks 1..4 hold one value each; candle's rule stored the non-zero ones as 0.
        // ggml's reference quantiser (llama.cpp's quantize_row_q4_K_ref) decodes this row's
        // runs to 0.04908 and -0.04999.
        let mut row: Vec<f32> = (0..512).map(|i| (i as f32 * 0.37).sin() * 0.1).collect();
        row[32..64].fill(0.05);
        row[64..96].fill(-0.05);
        row[96..128].fill(0.0);
        row[256..].fill(1.0); // a whole block of one positive value
        let w = Tensor::from_vec(row.clone(), (1, 512), &Device::Cpu).unwrap();
        let ours = decoded(&quantize_weight(&w, Quant::Q4K).unwrap());
        // Within the block's step (its range 0.2 over 15 levels), as the other values are.
        let step = 0.2 / 15.0;
        for (range, want, tol) in [
            (32..64, 0.05, step / 2.0),
            (64..96, -0.05, step / 2.0),
            (96..128, 0.0, 0.0),
            (256..512, 1.0, 0.001),
        ] {
            for &v in &ours[range.clone()] {
                assert!((v - want).abs() <= tol, "{range:?}: {v} for {want}");
            }
        }
        // The rest of the row as candle quantises it.
        let candle = decoded(&QTensor::quantize(&w, Quant::Q4K.ggml()).unwrap());
        assert_eq!(
            candle[40], 0.0,
            "candle's rule, which this replaces, loses the run"
        );
        let err = |d: &[f32]| {
            (0..32)
                .chain(128..256)
                .map(|i| (d[i] - row[i]).abs())
                .fold(0f32, f32::max)
        };
        assert!(err(&ours) <= step, "{}", err(&ours));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Away from constant runs the blocks are candle's, byte for byte, including sub-blocks
        /// that are all positive or all negative.
        #[test]
        fn q4k_blocks_are_candles_without_constant_runs(
            seed in 0u32..10_000, amplitude in 0.001f32..50.0, offset in -2.0f32..2.0,
        ) {
            let values: Vec<f32> = (0..4 * 256)
                .map(|i| ((i as f32 + seed as f32) * 0.7131).sin() * amplitude + offset * amplitude)
                .collect();
            let w = Tensor::from_vec(values, (4, 256), &Device::Cpu).unwrap();
            let ours = quantize_weight(&w, Quant::Q4K).unwrap();
            let candle = QTensor::quantize(&w, Quant::Q4K.ggml()).unwrap();
            proptest::prop_assert!(ours.data().unwrap() == candle.data().unwrap());
        }
    }

    #[test]
    fn a_row_that_does_not_fill_blocks_is_an_error() {
        let w = Tensor::zeros((4, 100), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            quantize_weight(&w, Quant::Q4K),
            Err(ModelError::Quant(_))
        ));
        let v = Tensor::zeros(256, DType::F32, &Device::Cpu).unwrap();
        assert!(quantize_weight(&v, Quant::Q8_0).is_err());
    }

    fn layer(name: &str, format: Option<Quant>) -> QuantLayer {
        QuantLayer {
            name: name.into(),
            in_dim: 64,
            out_dim: 64,
            format,
        }
    }

    #[test]
    fn kinds_group_layer_indices_and_formats() {
        let report = QuantReport {
            asked: Quant::Q4K,
            layers: vec![
                layer("model.layers.0.mlp.down_proj", Some(Quant::Q4K)),
                layer("model.layers.1.mlp.down_proj", Some(Quant::Q4K)),
                layer("model.layers.0.mlp.up_proj", Some(Quant::Q8_0)),
                layer("model.layers.1.mlp.up_proj", None),
            ],
        };
        assert_eq!(report.layers[0].kind(), "model.layers.*.mlp.down_proj");
        let kinds = report.kinds();
        assert_eq!(kinds.len(), 3);
        assert_eq!((kinds[0].count, kinds[0].format), (2, Some(Quant::Q4K)));
        assert_eq!(report.fallbacks().count(), 2);
    }
}
