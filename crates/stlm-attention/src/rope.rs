//! Rotary position embedding (RoFormer; Hugging Face's `rotate_half` layout, as in Llama).

use tch::{Device, Kind, Tensor};

/// Rotary embedding frequencies for one head dimension.
#[derive(Debug)]
pub struct Rope {
    inv_freq: Tensor,
}

impl Rope {
    /// Frequencies `theta^(-2i/dim)` for `i < dim/2`, as transformers' default rope type.
    pub fn new(head_dim: i64, theta: f64, device: Device) -> Self {
        let exponents = Tensor::arange_start_step(0, head_dim, 2, (Kind::Float, device)) / head_dim as f64;
        let inv_freq = (exponents * theta.ln()).exp().reciprocal();
        Rope { inv_freq }
    }

    /// The frequencies `[head_dim / 2]` on the host (for kernels that rotate one position).
    pub fn inv_freq(&self) -> Vec<f32> {
        Vec::try_from(&self.inv_freq.to_device(Device::Cpu)).expect("float32 frequencies")
    }

    /// `(cos, sin)` of shape `[batch, 1, seq, head_dim]` for integer `positions` `[batch, seq]`,
    /// computed in float32 and cast to `kind`.
    pub fn cos_sin(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * &self.inv_freq; // [b, s, d/2]
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
    }
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    Tensor::cat(&[-x.narrow(3, half, half), x.narrow(3, 0, half)], -1)
}

/// Rotates `x` (`[batch, heads, seq, head_dim]`) by the angles in `cos`/`sin`.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    x * cos + rotate_half(x) * sin
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rotary attention scores depend only on relative position.
    #[test]
    fn scores_depend_on_relative_position() {
        tch::manual_seed(0);
        let rope = Rope::new(8, 10000.0, Device::Cpu);
        let q = Tensor::randn([1, 1, 1, 8], (Kind::Float, Device::Cpu));
        let k = Tensor::randn([1, 1, 1, 8], (Kind::Float, Device::Cpu));
        let score = |pq: i64, pk: i64| {
            let (cq, sq) = rope.cos_sin(&Tensor::from_slice(&[pq]).view([1, 1]), Kind::Float);
            let (ck, sk) = rope.cos_sin(&Tensor::from_slice(&[pk]).view([1, 1]), Kind::Float);
            (apply_rotary(&q, &cq, &sq) * apply_rotary(&k, &ck, &sk)).sum(Kind::Float).double_value(&[])
        };
        assert!((score(5, 2) - score(13, 10)).abs() < 1e-4);
        assert!((score(5, 2) - score(5, 4)).abs() > 1e-4);
    }
}
