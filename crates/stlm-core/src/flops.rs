//! Model FLOPs and the matmul peak they are compared with: model FLOPs per trained token as
//! nanoGPT's `estimate_mfu` counts them (PaLM, appendix B), and a float32 matmul timed in the
//! same process, so that model FLOPs utilisation is a ratio of two numbers from one machine.

use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Weights that enter a matrix product: every 2-D tensor but the embedding tables (lookups).
pub fn matmul_parameters<'a>(vars: impl IntoIterator<Item = (&'a String, &'a Tensor)>) -> i64 {
    vars.into_iter().filter(|(name, t)| t.dim() == 2 && !name.contains("embed")).map(|(_, t)| t.numel() as i64).sum()
}

/// FLOPs of one trained token (forward and backward): 6 per matmul weight plus
/// `12 · layers · hidden · seq` for the attention scores and weighted sums.
pub fn training_flops_per_token(matmul_params: i64, layers: i64, hidden: i64, seq: i64) -> f64 {
    6.0 * matmul_params as f64 + 12.0 * (layers * hidden * seq) as f64
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
        let vars: Vec<(String, Tensor)> = [("model.embed_tokens.weight", vec![10, 4]), ("q.weight", vec![4, 4]), ("norm.weight", vec![4])]
            .into_iter()
            .map(|(n, s)| (n.to_string(), Tensor::zeros(s.as_slice(), (Kind::Float, Device::Cpu))))
            .collect();
        let p = matmul_parameters(vars.iter().map(|(n, t)| (n, t)));
        assert_eq!(p, 16, "the embedding and the norm are not matmul weights");
        assert_eq!(training_flops_per_token(p, 2, 4, 8), 6.0 * 16.0 + 12.0 * 64.0);
        assert!(matmul_peak_gflops(Device::Cpu) > 0.0);
    }
}
