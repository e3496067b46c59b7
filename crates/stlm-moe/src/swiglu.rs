//! The SwiGLU MLP `down(silu(gate x) * up x)` without biases: the shared expert beside routed
//! experts (Qwen-MoE, DeepSeek) and the shared MLP of Doge's cross-domain MoE.

use stlm_core::{Layer, Role, Walk};
use tch::nn::{self, Init};
use tch::Tensor;

/// A bias-free SwiGLU MLP with transformers' names (`gate_proj`, `up_proj`, `down_proj`).
#[derive(Debug)]
pub struct SwiGlu {
    /// `[intermediate, hidden]`.
    pub gate_proj: Tensor,
    /// `[intermediate, hidden]`.
    pub up_proj: Tensor,
    /// `[hidden, intermediate]`.
    pub down_proj: Tensor,
}

impl SwiGlu {
    /// An MLP of width `intermediate` at `path`: normal(0, `std`) inputs, normal(0, `resid_std`)
    /// output projection.
    pub fn new(path: &nn::Path, hidden: i64, intermediate: i64, std: f64, resid_std: f64) -> Self {
        let n = |s: f64| Init::Randn { mean: 0.0, stdev: s };
        SwiGlu {
            gate_proj: (path / "gate_proj").var("weight", &[intermediate, hidden], n(std)),
            up_proj: (path / "up_proj").var("weight", &[intermediate, hidden], n(std)),
            down_proj: (path / "down_proj").var("weight", &[hidden, intermediate], n(resid_std)),
        }
    }

    /// `[.., hidden] -> [.., hidden]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        (x.matmul(&self.gate_proj.tr()).silu() * x.matmul(&self.up_proj.tr())).matmul(&self.down_proj.tr())
    }

    /// A copy sharing the same weight tensors.
    pub fn shallow_clone(&self) -> SwiGlu {
        SwiGlu {
            gate_proj: self.gate_proj.shallow_clone(),
            up_proj: self.up_proj.shallow_clone(),
            down_proj: self.down_proj.shallow_clone(),
        }
    }
}

impl Layer for SwiGlu {
    fn visit(&self, walk: &mut Walk<'_>) {
        walk.param("gate_proj.weight", &self.gate_proj, Role::Matrix);
        walk.param("up_proj.weight", &self.up_proj, Role::Matrix);
        walk.param("down_proj.weight", &self.down_proj, Role::Matrix);
    }
}
