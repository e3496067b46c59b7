//! The model's linear layers, each with the [`Projection`] it is, for whatever rewrites their
//! weights in place (pruning's masks and reconstructions, quantization): one listing that the
//! layer walk's names agree with (tested), so nothing outside the model enumerates its fields or
//! matches weight names to find them.
//!
//! Only layers a model owns are listed: a sub-layer tied to block 0 (`layer_sharing`) is block
//! 0's, and a head tied to the embedding is not a linear layer.

use crate::layers::{DecoderLayer, FeedForward, Linear};
use crate::model::DecoderModel;

/// What a linear layer computes in its block, named as Hugging Face names the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Projection {
    /// A block's projection from a narrower or wider incoming stream (`layer_shapes`).
    #[cfg_attr(feature = "clap", value(name = "in_proj"))]
    InProj,
    /// Attention queries.
    #[cfg_attr(feature = "clap", value(name = "q_proj"))]
    QProj,
    /// Attention keys.
    #[cfg_attr(feature = "clap", value(name = "k_proj"))]
    KProj,
    /// Attention values.
    #[cfg_attr(feature = "clap", value(name = "v_proj"))]
    VProj,
    /// Attention output.
    #[cfg_attr(feature = "clap", value(name = "o_proj"))]
    OProj,
    /// Doge's dynamic-mask projection of the values to per-head key biases.
    #[cfg_attr(feature = "clap", value(name = "dt_proj"))]
    DtProj,
    /// A gated MLP's gate.
    #[cfg_attr(feature = "clap", value(name = "gate_proj"))]
    GateProj,
    /// An MLP's up projection.
    #[cfg_attr(feature = "clap", value(name = "up_proj"))]
    UpProj,
    /// An MLP's down projection.
    #[cfg_attr(feature = "clap", value(name = "down_proj"))]
    DownProj,
    /// The projection back to the embedding width after a last block of another width.
    #[cfg_attr(feature = "clap", value(name = "out_proj"))]
    OutProj,
    /// The untied output head.
    #[cfg_attr(feature = "clap", value(name = "lm_head"))]
    LmHead,
}

impl Projection {
    /// Every projection, in forward order.
    pub const ALL: [Projection; 11] = [
        Projection::InProj,
        Projection::QProj,
        Projection::KProj,
        Projection::VProj,
        Projection::OProj,
        Projection::DtProj,
        Projection::GateProj,
        Projection::UpProj,
        Projection::DownProj,
        Projection::OutProj,
        Projection::LmHead,
    ];

    /// The layer's path inside its block, or in the model for those outside blocks.
    pub fn path(self) -> &'static str {
        match self {
            Projection::InProj => "in_proj",
            Projection::QProj => "self_attn.q_proj",
            Projection::KProj => "self_attn.k_proj",
            Projection::VProj => "self_attn.v_proj",
            Projection::OProj => "self_attn.o_proj",
            Projection::DtProj => "self_attn.dt_proj",
            Projection::GateProj => "mlp.gate_proj",
            Projection::UpProj => "mlp.up_proj",
            Projection::DownProj => "mlp.down_proj",
            Projection::OutProj => "model.out_proj",
            Projection::LmHead => "lm_head",
        }
    }

    /// The short name (`q_proj`, `lm_head`), as the command line takes it.
    pub fn name(self) -> &'static str {
        let path = self.path();
        path.rsplit('.').next().unwrap_or(path)
    }
}

/// A linear layer of a model: where it is and the layer itself.
pub struct LinearSite<'a> {
    /// The decoder block it belongs to (`None`: outside the blocks: `out_proj`, `lm_head`).
    pub block: Option<usize>,
    /// What it computes.
    pub projection: Projection,
    /// The layer.
    pub linear: &'a mut Linear,
}

impl LinearSite<'_> {
    /// Its Hugging Face name without `.weight` (`model.layers.0.self_attn.q_proj`).
    pub fn name(&self) -> String {
        match self.block {
            Some(i) => format!("model.layers.{i}.{}", self.projection.path()),
            None => self.projection.path().to_string(),
        }
    }
}

impl DecoderLayer {
    /// The linear layers this block owns, in forward order (tied sub-layers are block 0's).
    pub fn linears_mut(&mut self) -> Vec<(Projection, &mut Linear)> {
        let mut out = Vec::new();
        if let Some(p) = self.in_proj.as_mut() {
            out.push((Projection::InProj, p));
        }
        let tied_o = self.self_attn.o_proj_tied;
        let attn = &mut self.self_attn;
        out.push((Projection::QProj, &mut attn.q_proj));
        out.push((Projection::KProj, &mut attn.k_proj));
        out.push((Projection::VProj, &mut attn.v_proj));
        if !tied_o {
            out.push((Projection::OProj, &mut attn.o_proj));
        }
        if let Some(dm) = attn.attention.key_bias_mut() {
            out.push((Projection::DtProj, &mut dm.dt_proj));
        }
        match (&mut self.mlp, self.mlp_tied) {
            (FeedForward::Dense(mlp), false) => {
                if let Some(gate) = mlp.gate_proj.as_mut() {
                    out.push((Projection::GateProj, gate));
                }
                out.push((Projection::UpProj, &mut mlp.up_proj));
                out.push((Projection::DownProj, &mut mlp.down_proj));
            }
            // Routed experts are stacked tensors, not linear layers.
            (FeedForward::Dense(_), true) | (FeedForward::Moe(_) | FeedForward::CdMoe(_), _) => {}
        }
        out
    }
}

impl DecoderModel {
    /// [`DecoderModel::linears_mut`] read-only: each layer with its name (without `.weight`).
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out: Vec<(String, &Linear)> = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let DecoderLayer { in_proj, self_attn: a, mlp, mlp_tied, .. } = layer;
            let mut found: Vec<(Projection, &Linear)> = Vec::new();
            if let Some(l) = in_proj {
                found.push((Projection::InProj, l));
            }
            found.extend([(Projection::QProj, &a.q_proj), (Projection::KProj, &a.k_proj), (Projection::VProj, &a.v_proj)]);
            if !a.o_proj_tied {
                found.push((Projection::OProj, &a.o_proj));
            }
            if let Some(dm) = a.attention.key_bias() {
                found.push((Projection::DtProj, &dm.dt_proj));
            }
            if let (FeedForward::Dense(m), false) = (mlp, *mlp_tied) {
                if let Some(g) = &m.gate_proj {
                    found.push((Projection::GateProj, g));
                }
                found.extend([(Projection::UpProj, &m.up_proj), (Projection::DownProj, &m.down_proj)]);
            }
            out.extend(found.into_iter().map(|(p, l)| (format!("model.layers.{i}.{}", p.path()), l)));
        }
        for (p, l) in [(Projection::OutProj, self.out_proj.as_ref()), (Projection::LmHead, self.lm_head.as_ref())] {
            if let Some(l) = l {
                out.push((p.path().to_string(), l));
            }
        }
        out
    }

    /// Every linear layer the model owns, in forward order: the blocks', then `out_proj` and an
    /// untied head.
    pub fn linears_mut(&mut self) -> Vec<LinearSite<'_>> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            out.extend(layer.linears_mut().into_iter().map(|(projection, linear)| LinearSite { block: Some(i), projection, linear }));
        }
        if let Some(p) = self.out_proj.as_mut() {
            out.push(LinearSite { block: None, projection: Projection::OutProj, linear: p });
        }
        if let Some(head) = self.lm_head.as_mut() {
            out.push(LinearSite { block: None, projection: Projection::LmHead, linear: head });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use stlm_core::Role;
    use tch::Device;

    fn model(extra: &str) -> DecoderModel {
        let text = format!(
            "vocab_size = 40\nhidden_size = 32\nintermediate_size = 48\nnum_hidden_layers = 3\nnum_attention_heads = 4\n\
             num_key_value_heads = 2\nmax_position_embeddings = 64\n{extra}"
        );
        let cfg = ModelConfig::from_toml_str(&text, std::path::Path::new("t.toml")).unwrap();
        DecoderModel::new(cfg, Device::Cpu).unwrap()
    }

    /// The listing names each layer as the stored walk names its weight, and misses no matrix
    /// of a linear layer the walk finds (routed experts and the tied head are not linear layers).
    #[test]
    fn the_listing_agrees_with_the_walk() {
        let configs = [
            "tie_word_embeddings = false\n",
            "tie_word_embeddings = true\n",
            "tie_word_embeddings = false\nmodel_type = \"stlm\"\nattention = [{ kind = \"doge-dma\", keep_window_size = 8 }]\n",
            "model_type = \"stlm\"\nlayer_shapes = { hidden_size = [32, 48, 16] }\n",
            "model_type = \"stlm\"\nlayer_sharing = { mlp = true, o_proj = true }\n",
        ];
        let mut seen = std::collections::HashSet::new();
        for extra in configs {
            let mut m = model(extra);
            seen.extend(m.linears_mut().iter().map(|s| s.projection));
            let matrices: Vec<String> = stlm_core::module::parameters(&m)
                .into_iter()
                .filter(|p| p.role == Role::Matrix && p.tensor.dim() == 2)
                .map(|p| p.name)
                .collect();
            let listed: Vec<String> = m.linears_mut().iter().map(|s| format!("{}.weight", s.name())).collect();
            for name in &listed {
                assert!(matrices.contains(name), "{extra}: {name} is not a stored matrix");
            }
            let tied_head = m.lm_head.is_none();
            for name in &matrices {
                let head = tied_head && name == "lm_head.weight";
                assert!(head || listed.contains(name), "{extra}: the walk's {name} is not listed");
            }
            assert!(m.linears_mut().iter().all(|s| s.name().ends_with(s.projection.name())));
            let read_only: Vec<String> = m.linears().into_iter().map(|(n, _)| format!("{n}.weight")).collect();
            assert_eq!(read_only, listed, "{extra}");
        }
        assert_eq!(seen.len(), Projection::ALL.len(), "every projection occurs in one of the configs: {seen:?}");
    }
}
