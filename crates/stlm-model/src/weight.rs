//! How a [`crate::layers::Linear`] stores its `[out, in]` weight.
//!
//! Every reader of a projection's weight goes through [`Weight`]: the libtorch forward, the fused
//! decoder, pruning, LoRA, FLOP counting (through the layer walk) and model IO. Another
//! representation (block-quantized weights) is one more variant here: the methods below match
//! exhaustively, so the compiler lists every place that must decide what the new variant does.

use crate::error::{ModelError, Result};
use std::sync::Arc;
use stlm_core::kernels::{grad_enabled, small_batch_linear};
use stlm_core::qmatvec::with_quantized;
use stlm_core::quant::{QuantFormat, QuantMatrix};
use tch::{Device, Kind, Tensor};

/// The weight of a linear layer, `[out_features, in_features]`.
#[derive(Debug)]
pub enum Weight {
    /// A float tensor: the trained (and saved) variable itself.
    Dense(Tensor),
    /// Block-quantized (see [`Quantized`]): not trained, saved as its blocks.
    Quantized(Quantized),
}

/// A weight stored as ggml blocks, with its dequantized values for the libtorch paths.
#[derive(Debug)]
pub struct Quantized {
    /// The blocks (shared by the weights tied to this one).
    pub matrix: Arc<QuantMatrix>,
    /// The dequantized values `[out, in]` in the model's float kind and device (the layer's float
    /// variable, overwritten): what batches, prompts and every reader of the value compute with;
    /// one row on the CPU goes through the integer kernels instead.
    pub dense: Tensor,
}

impl Quantized {
    /// `matrix` with `dense` holding its values: `dense` is overwritten with the dequantized
    /// blocks (so its kind and device stay the model's).
    pub fn new(matrix: QuantMatrix, dense: Tensor) -> Result<Self> {
        let (rows, cols) = matrix.shape();
        if dense.size() != [rows as i64, cols as i64] {
            return Err(ModelError::Input(format!("a {} weight [{rows}, {cols}] given a tensor of shape {:?}", matrix.format().name(), dense.size())));
        }
        let values = Tensor::from_slice(&matrix.dequantize()).view([rows as i64, cols as i64]);
        let _guard = tch::no_grad_guard();
        dense.shallow_clone().copy_(&values);
        Ok(Quantized { matrix: Arc::new(matrix), dense })
    }

    /// Its format.
    pub fn format(&self) -> QuantFormat {
        self.matrix.format()
    }

    /// `x W^T + b`: one float32 row on the CPU without gradients through the integer kernel (the
    /// row quantized per block), anything else through libtorch over the dequantized values.
    pub(crate) fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Tensor {
        let (rows, cols) = self.matrix.shape();
        let one_row = x.numel() == cols && x.device() == Device::Cpu && x.kind() == Kind::Float && !grad_enabled();
        if !one_row {
            return x.linear(&self.dense, bias);
        }
        let input: Vec<f32> = match Vec::try_from(x.contiguous().view([-1])) {
            Ok(v) => v,
            Err(_) => return x.linear(&self.dense, bias),
        };
        let mut y: Vec<f32> = match bias {
            Some(b) => Vec::try_from(b.to_kind(Kind::Float).contiguous()).unwrap_or_else(|_| vec![0.0; rows]),
            None => vec![0.0; rows],
        };
        with_quantized(&input, |q| self.matrix.rows().matvec_add(q, &mut y));
        let mut shape = x.size();
        *shape.last_mut().expect("a vector has a last dimension") = rows as i64;
        Tensor::from_slice(&y).view(shape.as_slice())
    }
}

impl Weight {
    /// `(out_features, in_features)`.
    pub fn shape(&self) -> (i64, i64) {
        match self {
            Weight::Dense(w) => {
                let s = w.size();
                (s[0], s[1])
            }
            Weight::Quantized(q) => {
                let (r, c) = q.matrix.shape();
                (r as i64, c as i64)
            }
        }
    }

    /// The weight's value as a float tensor `[out, in]` (the variable itself for [`Weight::Dense`],
    /// so it carries gradients and shares storage; the dequantized values of a quantized one).
    pub fn value(&self) -> Tensor {
        match self {
            Weight::Dense(w) => w.shallow_clone(),
            Weight::Quantized(q) => q.dense.shallow_clone(),
        }
    }

    /// The float variable the weight is stored as, when it is stored as one (what an optimizer
    /// trains and what in-place edits such as fusing change).
    pub fn variable(&self) -> Option<&Tensor> {
        match self {
            Weight::Dense(w) => Some(w),
            Weight::Quantized(_) => None,
        }
    }

    /// The block format, when the weight is quantized.
    pub fn quantization(&self) -> Option<QuantFormat> {
        match self {
            Weight::Dense(_) => None,
            Weight::Quantized(q) => Some(q.format()),
        }
    }

    /// Replaces the weight's value by `value` `[out, in]` in place, without recording gradients
    /// (pruning masks, copies from a teacher, generated weights); an error names `name` when the
    /// shapes differ.
    pub fn assign(&self, value: &Tensor, name: &str) -> Result<()> {
        let (out, inp) = self.shape();
        if value.size() != [out, inp] {
            return Err(ModelError::Input(format!(
                "`{name}`: a value of shape {:?} given for a weight of shape [{out}, {inp}]",
                value.size()
            )));
        }
        let _guard = tch::no_grad_guard();
        match self {
            Weight::Dense(w) => w.shallow_clone().copy_(value),
            Weight::Quantized(q) => {
                return Err(ModelError::Input(format!("`{name}` is quantized ({}): its blocks are not rewritten in place", q.format().name())))
            }
        };
        Ok(())
    }

    /// The same weight (its storage, not a copy), for weights tied across blocks.
    pub fn share(&self) -> Weight {
        match self {
            Weight::Dense(w) => Weight::Dense(w.shallow_clone()),
            Weight::Quantized(q) => Weight::Quantized(Quantized { matrix: Arc::clone(&q.matrix), dense: q.dense.shallow_clone() }),
        }
    }

    /// `x W^T + b`, `[.., in] -> [.., out]`: a few rows of float32 on the CPU without gradients
    /// go through stlm-core's small-batch kernel, everything else through libtorch.
    pub fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Tensor {
        match self {
            Weight::Dense(w) => dense_linear(x, w, bias),
            Weight::Quantized(q) => q.forward(x, bias),
        }
    }
}

/// `x w^T + b` with a float weight, by the small-batch kernel where it applies.
pub(crate) fn dense_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
    small_batch_linear(x, weight, bias).unwrap_or_else(|| x.linear(weight, bias))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dense_weight_multiplies_reads_and_assigns_as_its_tensor() {
        let w = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        let weight = Weight::Dense(w.shallow_clone());
        assert_eq!(weight.shape(), (3, 4));
        let x = Tensor::randn([2, 5, 4], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([3], (Kind::Float, Device::Cpu));
        assert!(weight.forward(&x, Some(&b)).allclose(&x.linear(&w, Some(&b)), 1e-6, 1e-6, false));
        let shared = weight.share();
        let new = Tensor::ones([3, 4], (Kind::Float, Device::Cpu));
        weight.assign(&new, "w").unwrap();
        assert!(w.equal(&new) && shared.value().equal(&new), "assign writes the variable every sharer sees");
        let err = weight
            .assign(&Tensor::ones([4, 3], (Kind::Float, Device::Cpu)), "model.layers.0.mlp.up_proj.weight")
            .unwrap_err();
        assert!(
            err.to_string().contains("model.layers.0.mlp.up_proj.weight") && err.to_string().contains("[4, 3]"),
            "{err}"
        );
    }

    #[test]
    fn a_quantized_weight_multiplies_by_its_blocks_and_refuses_assignment() {
        let w = Tensor::randn([5, 64], (Kind::Float, Device::Cpu));
        let values: Vec<f32> = Vec::try_from(w.view([-1])).unwrap();
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            let m = QuantMatrix::quantize(format, &values, 64).unwrap();
            let deq = Tensor::from_slice(&m.dequantize()).view([5, 64]);
            let weight = Weight::Quantized(Quantized::new(m, w.copy()).unwrap());
            assert_eq!((weight.shape(), weight.quantization(), weight.variable().is_none()), ((5, 64), Some(format), true));
            assert!(weight.value().equal(&deq));
            let b = Tensor::randn([5], (Kind::Float, Device::Cpu));
            // Batches through libtorch over the dequantized values; one row through the integer
            // kernel, which quantizes the row too (error well under a percent of the output).
            let x = Tensor::randn([3, 2, 64], (Kind::Float, Device::Cpu));
            assert!(weight.forward(&x, Some(&b)).allclose(&x.linear(&deq, Some(&b)), 1e-5, 1e-5, false));
            let _g = tch::no_grad_guard();
            let row = Tensor::randn([1, 1, 64], (Kind::Float, Device::Cpu));
            let (got, want) = (weight.forward(&row, Some(&b)), row.linear(&deq, Some(&b)));
            assert_eq!(got.size(), [1, 1, 5]);
            let err = (&got - &want).abs().max().double_value(&[]);
            let scale = want.abs().max().double_value(&[]);
            assert!(err < 0.02 * scale.max(1.0), "{format:?}: {err} against {scale}");
            let e = weight.assign(&deq, "model.layers.0.mlp.up_proj.weight").unwrap_err().to_string();
            assert!(e.contains("up_proj") && e.contains(format.name()), "{e}");
        }
    }
}
