//! Which storage each linear layer got when the model loaded with quantised weights
//! ([`crate::LoadOptions::quant`]): a layer whose input dimension does not fit the asked block falls
//! back ([`Quant::for_in_dim`]), and users need to see where. The same report is also predicted from
//! config.json alone ([`QuantReport::plan`]), so `qalign info --quant` needs no tensor; a test holds
//! the prediction to what a real load records.

use std::sync::Mutex;

use serde::{Serialize, Serializer};

use crate::config::ModelConfig;
use crate::device::Quant;
use crate::gguf::KernelCapture;

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
