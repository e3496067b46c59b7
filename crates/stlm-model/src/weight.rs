//! How a [`crate::layers::Linear`] stores its `[out, in]` weight.
//!
//! Every reader of a projection's weight goes through [`Weight`]: the libtorch forward, the fused
//! decoder, pruning, LoRA, FLOP counting (through the layer walk) and model IO. Another
//! representation (block-quantized weights) is one more variant here: the methods below match
//! exhaustively, so the compiler lists every place that must decide what the new variant does.

use crate::error::{ModelError, Result};
use stlm_core::kernels::small_batch_linear;
use tch::Tensor;

/// The weight of a linear layer, `[out_features, in_features]`.
#[derive(Debug)]
pub enum Weight {
    /// A float tensor: the trained (and saved) variable itself.
    Dense(Tensor),
}

impl Weight {
    /// `(out_features, in_features)`.
    pub fn shape(&self) -> (i64, i64) {
        match self {
            Weight::Dense(w) => {
                let s = w.size();
                (s[0], s[1])
            }
        }
    }

    /// The weight's value as a float tensor `[out, in]` (the variable itself for [`Weight::Dense`],
    /// so it carries gradients and shares storage).
    pub fn value(&self) -> Tensor {
        match self {
            Weight::Dense(w) => w.shallow_clone(),
        }
    }

    /// The float variable the weight is stored as, when it is stored as one (what an optimizer
    /// trains and what in-place edits such as fusing change).
    pub fn variable(&self) -> Option<&Tensor> {
        match self {
            Weight::Dense(w) => Some(w),
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
        }
        Ok(())
    }

    /// The same weight (its storage, not a copy), for weights tied across blocks.
    pub fn share(&self) -> Weight {
        match self {
            Weight::Dense(w) => Weight::Dense(w.shallow_clone()),
        }
    }

    /// `x W^T + b`, `[.., in] -> [.., out]`: a few rows of float32 on the CPU without gradients
    /// go through stlm-core's small-batch kernel, everything else through libtorch.
    pub fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Tensor {
        match self {
            Weight::Dense(w) => dense_linear(x, w, bias),
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
    use tch::{Device, Kind};

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
}
