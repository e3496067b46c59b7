//! Structured pruning's copy: each layer copies the units it keeps (heads, neurons, experts) and
//! every other tensor whole into a smaller layer of the same kind (see
//! [`crate::DecoderModel::keep_into`]). Errors name the parameter when the shapes do not fit.

use crate::layers::{DecoderLayer, FeedForward, Linear, Mlp, Norm, SelfAttention};
use crate::{ModelError, Result};
use tch::Tensor;

/// Copies `src` into the weight `dst` (of a smaller layer), refusing another shape by `name`.
pub(crate) fn copy_checked(dst: &Tensor, src: &Tensor, name: &str) -> Result<()> {
    if dst.size() != src.size() {
        return Err(ModelError::Input(format!("`{name}`: {:?} kept, the smaller one holds {:?}", src.size(), dst.size())));
    }
    let _guard = tch::no_grad_guard();
    dst.shallow_clone().copy_(src);
    Ok(())
}

/// `t` with only the entries `index` along `dim` (all of `t` when `None`).
fn select(t: &Tensor, dim: i64, index: Option<&Tensor>) -> Tensor {
    match index {
        Some(i) => t.index_select(dim, &i.to_device(t.device())),
        None => t.shallow_clone(),
    }
}

/// The rows `start..start + width` of every unit in `units` (unit `u` spans `u·width..(u+1)·width`).
pub fn unit_spans(units: &[i64], width: i64) -> Tensor {
    let idx: Vec<i64> = units.iter().flat_map(|&u| u * width..(u + 1) * width).collect();
    Tensor::from_slice(&idx)
}

impl Linear {
    /// Copies into the smaller `into` this layer's output features `rows` and input features
    /// `cols` (all when `None`); errors name `name` when the shapes do not fit.
    pub fn keep_into(&self, into: &Linear, rows: Option<&Tensor>, cols: Option<&Tensor>, name: &str) -> Result<()> {
        into.weight.assign(&select(&select(&self.weight.value(), 0, rows), 1, cols), &format!("{name}.weight"))?;
        match (&self.bias, &into.bias) {
            (Some(b), Some(ib)) => copy_checked(ib, &select(b, 0, rows), &format!("{name}.bias")),
            (None, None) => Ok(()),
            _ => Err(ModelError::Input(format!("`{name}.bias`: one of the layers has a bias and the other not"))),
        }
    }
}

/// Which units of a block a structured prune keeps (`None`: all of that kind).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeepUnits {
    /// Query heads kept.
    pub query_heads: Option<Vec<i64>>,
    /// Key/value heads kept.
    pub kv_heads: Option<Vec<i64>>,
    /// Hidden neurons of a dense MLP kept.
    pub neurons: Option<Vec<i64>>,
    /// Experts of an MoE layer kept.
    pub experts: Option<Vec<i64>>,
}

impl Norm {
    /// Copies this norm's weights into `into` (of the same width).
    pub fn copy_into(&self, into: &Norm, name: &str) -> Result<()> {
        copy_checked(&into.weight, &self.weight, &format!("{name}.weight"))?;
        if let (Some(b), Some(ib)) = (&self.bias, &into.bias) {
            copy_checked(ib, b, &format!("{name}.bias"))?;
        }
        Ok(())
    }
}

impl Mlp {
    /// Copies into the narrower `into` the hidden `neurons` kept (all when `None`): their gate
    /// and up rows and their down-projection columns.
    pub fn keep_into(&self, into: &Mlp, neurons: Option<&[i64]>, name: &str) -> Result<()> {
        let kept = neurons.map(|n| unit_spans(n, 1));
        match (&self.gate_proj, &into.gate_proj) {
            (Some(g), Some(ig)) => g.keep_into(ig, kept.as_ref(), None, &format!("{name}.gate_proj"))?,
            (None, None) => {}
            _ => return Err(ModelError::Input(format!("`{name}`: one MLP is gated and the other not"))),
        }
        self.up_proj.keep_into(&into.up_proj, kept.as_ref(), None, &format!("{name}.up_proj"))?;
        self.down_proj.keep_into(&into.down_proj, None, kept.as_ref(), &format!("{name}.down_proj"))
    }
}

impl SelfAttention {
    /// Copies into the smaller `into` the query heads and key/value heads kept (all when
    /// `None`): their q/k/v rows, o columns, and what the kind learns per head (SSMax scales,
    /// Dynamic Mask Attention's `A` and `dt_proj` per key/value head).
    pub fn keep_into(&self, into: &SelfAttention, queries: Option<&[i64]>, kv: Option<&[i64]>, name: &str) -> Result<()> {
        // Every field named: a new one fails to compile here until the copy handles it (the
        // counts, `qkv`, ALiBi slopes and the tie are the smaller layer's own).
        let SelfAttention {
            q_proj: _, k_proj: _, v_proj: _, o_proj: _, num_heads: _, num_kv_heads: _, head_dim: _, qkv: _, attention: _, qk_norm: _,
            alibi_slopes: _, o_proj_tied: _,
        } = self;
        let d = self.head_dim;
        let q_rows = queries.map(|q| unit_spans(q, d));
        let kv_rows = kv.map(|k| unit_spans(k, d));
        self.q_proj.keep_into(&into.q_proj, q_rows.as_ref(), None, &format!("{name}.q_proj"))?;
        self.k_proj.keep_into(&into.k_proj, kv_rows.as_ref(), None, &format!("{name}.k_proj"))?;
        self.v_proj.keep_into(&into.v_proj, kv_rows.as_ref(), None, &format!("{name}.v_proj"))?;
        self.o_proj.keep_into(&into.o_proj, None, q_rows.as_ref(), &format!("{name}.o_proj"))?;
        let (q_heads, kv_heads) = (queries.map(|q| unit_spans(q, 1)), kv.map(|k| unit_spans(k, 1)));
        let (a, ia) = (&self.attention, &into.attention);
        if a.name() != ia.name() {
            return Err(ModelError::Input(format!("`{name}`: the layers have different attention kinds")));
        }
        if let (Some((_, s)), Some((_, is))) = (a.head_scale(), ia.head_scale()) {
            copy_checked(is, &select(s, 0, q_heads.as_ref()), &format!("{name}.head_scale"))?;
        }
        if let (Some(dm), Some(idm)) = (a.key_bias(), ia.key_bias()) {
            copy_checked(&idm.a, &select(&dm.a, 0, kv_heads.as_ref()), &format!("{name}.A"))?;
            dm.dt_proj.keep_into(&idm.dt_proj, kv_heads.as_ref(), kv_rows.as_ref(), &format!("{name}.dt_proj"))?;
        }
        if let (Some(p), Some(ip)) = (a.projections(), ia.projections()) {
            // Per-head projections (sharing none) follow the query heads; shared ones stay.
            let per_head = |t: &Tensor, it: &Tensor| if t.size()[0] == it.size()[0] { t.shallow_clone() } else { select(t, 0, q_heads.as_ref()) };
            copy_checked(&ip.e, &per_head(&p.e, &ip.e), &format!("{name}.linformer.e"))?;
            if let (Some(f), Some(jf)) = (&p.f, &ip.f) {
                copy_checked(jf, &per_head(f, jf), &format!("{name}.linformer.f"))?;
            }
        }
        if let (Some(n), Some(inn)) = (&self.qk_norm, &into.qk_norm) {
            n.q_norm.copy_into(&inn.q_norm, &format!("{name}.q_norm"))?;
            n.k_norm.copy_into(&inn.k_norm, &format!("{name}.k_norm"))?;
        }
        Ok(())
    }
}

impl FeedForward {
    /// Copies into the smaller `into` the `neurons` of a dense MLP or the `experts` of an MoE
    /// layer that are kept (all when `None`), and every other tensor whole.
    pub fn keep_into(&self, into: &FeedForward, neurons: Option<&[i64]>, experts: Option<&[i64]>, name: &str) -> Result<()> {
        let swiglu = |a: &stlm_moe::SwiGlu, b: &stlm_moe::SwiGlu, name: &str| -> Result<()> {
            copy_checked(&b.gate_proj, &a.gate_proj, &format!("{name}.gate_proj"))?;
            copy_checked(&b.up_proj, &a.up_proj, &format!("{name}.up_proj"))?;
            copy_checked(&b.down_proj, &a.down_proj, &format!("{name}.down_proj"))
        };
        match (self, into) {
            (FeedForward::Dense(m), FeedForward::Dense(im)) => m.keep_into(im, neurons, name),
            (FeedForward::Moe(m), FeedForward::Moe(im)) => {
                let kept = experts.map(|e| unit_spans(e, 1));
                copy_checked(&im.gate, &select(&m.gate, 0, kept.as_ref()), &format!("{name}.gate.weight"))?;
                if let (Some(b), Some(ib)) = (&m.bias, &im.bias) {
                    copy_checked(ib, &select(b, 0, kept.as_ref()), &format!("{name}.gate.e_score_correction_bias"))?;
                }
                copy_checked(&im.experts.gate_up_proj, &select(&m.experts.gate_up_proj, 0, kept.as_ref()), &format!("{name}.experts.gate_up_proj"))?;
                copy_checked(&im.experts.down_proj, &select(&m.experts.down_proj, 0, kept.as_ref()), &format!("{name}.experts.down_proj"))?;
                if let (Some(s), Some(is)) = (&m.shared_expert, &im.shared_expert) {
                    swiglu(s, is, &format!("{name}.shared_expert"))?;
                }
                if let (Some(g), Some(ig)) = (&m.shared_expert_gate, &im.shared_expert_gate) {
                    copy_checked(ig, g, &format!("{name}.shared_expert_gate.weight"))?;
                }
                Ok(())
            }
            (FeedForward::CdMoe(m), FeedForward::CdMoe(im)) => {
                swiglu(&m.shared, &im.shared, name)?;
                copy_checked(&im.router_gate, &m.router_gate, &format!("{name}.router_gate"))?;
                copy_checked(&im.down_embed, &m.down_embed, &format!("{name}.down_embed"))?;
                copy_checked(&im.up_embed, &m.up_embed, &format!("{name}.up_embed"))
            }
            _ => Err(ModelError::Input(format!("`{name}`: the blocks have different feed-forward kinds"))),
        }
    }
}

impl DecoderLayer {
    /// Copies this block into the smaller block `into` (`name`, e.g. `model.layers.3`), keeping
    /// the units `keep` names and every other tensor whole.
    pub fn keep_into(&self, into: &DecoderLayer, keep: &KeepUnits, name: &str) -> Result<()> {
        // Every field named: a new one fails to compile here until the copy handles it
        // (`in_proj` exists only with per-layer widths, which structured pruning refuses).
        let DecoderLayer {
            in_proj: _, input_layernorm: _, self_attn: _, post_attention_layernorm: _, mlp: _, input_residual: _, post_attention_residual: _,
            mlp_tied: _,
        } = self;
        self.input_layernorm.copy_into(&into.input_layernorm, &format!("{name}.input_layernorm"))?;
        let attn = format!("{name}.self_attn");
        self.self_attn.keep_into(&into.self_attn, keep.query_heads.as_deref(), keep.kv_heads.as_deref(), &attn)?;
        self.post_attention_layernorm.copy_into(&into.post_attention_layernorm, &format!("{name}.post_attention_layernorm"))?;
        self.mlp.keep_into(&into.mlp, keep.neurons.as_deref(), keep.experts.as_deref(), &format!("{name}.mlp"))?;
        for (a, b, field) in [
            (&self.input_residual, &into.input_residual, "input_residual"),
            (&self.post_attention_residual, &into.post_attention_residual, "post_attention_residual"),
        ] {
            if let (Some(a), Some(b)) = (a, b) {
                copy_checked(b, a, &format!("{name}.{field}"))?;
            }
        }
        Ok(())
    }
}
