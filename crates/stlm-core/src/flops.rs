//! Model FLOPs and the matmul peak they are compared with: model FLOPs per trained token as
//! nanoGPT's `estimate_mfu` counts them (PaLM, appendix B), and a float32 matmul timed in the
//! same process, so that model FLOPs utilisation is a ratio of two numbers from one machine.

use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// FLOPs of one trained token (forward and backward): 6 per weight a token multiplies with
/// ([`crate::module::matmul_weights`]: matrices, a routed token's share of the experts) plus
/// `12 · layers · hidden · seq` for the attention scores and weighted sums.
pub fn training_flops_per_token(matmul_weights: f64, layers: i64, hidden: i64, seq: i64) -> f64 {
    6.0 * matmul_weights + 12.0 * (layers * hidden * seq) as f64
}

/// Float32 matmul GFLOP/s on `device`: the best of eight 1024x1024 products.
pub fn matmul_peak_gflops(device: Device) -> f64 {
    let n = 1024i64;
    let a = Tensor::randn([n, n], (Kind::Float, device));
    let b = Tensor::randn([n, n], (Kind::Float, device));
    let mut best = f64::INFINITY;
    for _ in 0..8 {
        let t = Instant::now();
        let c = a.matmul(&b);
        let _ = c.double_value(&[0, 0]); // waits for the device
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (n * n * n) as f64 / best / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_matmul_weights_and_attention() {
        use crate::module::{matmul_weights, Layer, Role, Walk};
        struct Tiny(Vec<(Tensor, Role)>);
        impl Layer for Tiny {
            fn visit(&self, walk: &mut Walk<'_>) {
                self.0.iter().enumerate().for_each(|(i, (t, role))| walk.param(&i.to_string(), t, *role));
            }
        }
        let z = |s: &[i64]| Tensor::zeros(s, (Kind::Float, Device::Cpu));
        let tiny = Tiny(vec![(z(&[10, 4]), Role::Embedding), (z(&[4, 4]), Role::Matrix), (z(&[4]), Role::Norm)]);
        let p = matmul_weights(&tiny);
        assert_eq!(p, 16.0, "the embedding and the norm are not matmul weights");
        assert_eq!(training_flops_per_token(p, 2, 4, 8), 6.0 * 16.0 + 12.0 * 64.0);
        assert!(matmul_peak_gflops(Device::Cpu) > 0.0);
    }
}
