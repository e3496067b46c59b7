//! Position encodings that are not rotary: fixed sinusoidal embeddings (Vaswani et al. 2017) and
//! ALiBi's linear attention biases (Press et al. 2022, "Train Short, Test Long").

use crate::AttentionMask;
use tch::{Device, Kind, Tensor};

/// Sinusoidal position embeddings `[b, s, dim]` for integer `positions` `[b, s]`: dimension `2i`
/// is `sin(p / 10000^(2i/dim))` and `2i + 1` the cosine of the same angle (`dim` even).
pub fn sinusoidal_positions(positions: &Tensor, dim: i64, kind: Kind) -> Tensor {
    let device = positions.device();
    let exponents = Tensor::arange_start_step(0, dim, 2, (Kind::Double, device)) / dim as f64;
    let inv_freq = (exponents * 10000f64.ln()).exp().reciprocal(); // [dim / 2]
    let angles = positions.to_kind(Kind::Double).unsqueeze(-1) * inv_freq; // [b, s, dim / 2]
    let sizes = positions.size();
    Tensor::stack(&[angles.sin(), angles.cos()], -1).view([sizes[0], sizes[1], dim]).to_kind(kind)
}

/// ALiBi's head slopes: for `n` heads a power of two, `2^(-8i/n)` for `i = 1..=n`; otherwise the
/// slopes of the largest power of two below `n`, then every other slope of twice that (the
/// paper's reference code).
pub fn alibi_slopes(heads: i64) -> Vec<f64> {
    fn power_of_two(n: i64) -> Vec<f64> {
        (1..=n).map(|i| 2f64.powf(-8.0 * i as f64 / n as f64)).collect()
    }
    let lower = 1i64 << (63 - heads.max(1).leading_zeros() as i64);
    if lower == heads {
        return power_of_two(heads);
    }
    let mut slopes = power_of_two(lower);
    slopes.extend(power_of_two(2 * lower).into_iter().step_by(2).take((heads - lower) as usize));
    slopes
}

/// The additive ALiBi mask `[b or 1, heads, q_len, keys]`: `-slope_h · (i - j)` where query `i`
/// may see key `j` under `mask` (queries at positions `past..past + q_len`, keys `0..keys`), and
/// `-inf` elsewhere. `slopes` is `[heads]`.
pub fn alibi_mask(slopes: &Tensor, q_len: i64, keys: i64, mask: &AttentionMask, kind: Kind) -> Tensor {
    let device = slopes.device();
    let past = keys - q_len;
    let q = Tensor::arange_start(past, keys, (Kind::Float, device)).view([q_len, 1]);
    let k = Tensor::arange(keys, (Kind::Float, device)).view([1, keys]);
    let distance = (q - k).clamp_min(0.0); // [q, k]; future keys are masked below
    let bias = slopes.to_kind(Kind::Float).view([1, -1, 1, 1]) * distance.neg().view([1, 1, q_len, keys]);
    let allowed = match mask {
        AttentionMask::Causal => Some(Tensor::ones([q_len, keys], (Kind::Bool, device)).tril(past).view([1, 1, q_len, keys])),
        AttentionMask::Full => None,
        AttentionMask::Explicit(m) => Some(m.shallow_clone()),
    };
    let bias = match allowed {
        Some(a) => bias.masked_fill(&a.logical_not(), f64::NEG_INFINITY),
        None => bias,
    };
    bias.to_kind(kind)
}

/// `[heads]` ALiBi slopes as a float32 tensor on `device`.
pub fn alibi_slope_tensor(heads: i64, device: Device) -> Tensor {
    Tensor::from_slice(&alibi_slopes(heads)).to_kind(Kind::Float).to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::rand;
    use crate::{dense_attention, naive_attention};

    #[test]
    fn slopes_follow_the_paper() {
        let eight = alibi_slopes(8);
        assert_eq!(eight, (1..=8).map(|i| 0.5f64.powi(i)).collect::<Vec<_>>());
        // 6 heads: the 4 slopes of 4 heads, then slopes 1 and 3 of 8 heads.
        let six = alibi_slopes(6);
        assert_eq!(six.len(), 6);
        assert_eq!(&six[..4], &alibi_slopes(4)[..]);
        assert_eq!(six[4], alibi_slopes(8)[0]);
        assert_eq!(six[5], alibi_slopes(8)[2]);
        assert_eq!(alibi_slopes(1), vec![2f64.powi(-8)]);
    }

    /// Attention under the ALiBi mask equals the float64 definition: softmax(q·k/√d - m (i - j))
    /// over j <= i, for a whole sequence and for the last queries against all keys.
    #[test]
    fn alibi_attention_matches_float64() {
        tch::manual_seed(5);
        let (h, s, d) = (4, 9, 8);
        let (q, k, v) = (rand(&[2, h, s, d]), rand(&[2, h, s, d]), rand(&[2, h, s, d]));
        let slopes = Tensor::from_slice(&alibi_slopes(h));
        let i = Tensor::arange(s, (Kind::Double, Device::Cpu)).view([s, 1]);
        let j = Tensor::arange(s, (Kind::Double, Device::Cpu)).view([1, s]);
        let causal = j.le_tensor(&i);
        let scores = q.matmul(&k.transpose(-2, -1)) / (d as f64).sqrt() - slopes.view([1, h, 1, 1]) * (&i - &j);
        let want = scores.masked_fill(&causal.logical_not(), f64::NEG_INFINITY).softmax(-1, Kind::Double).matmul(&v);
        let f = |t: &Tensor| t.to_kind(Kind::Float);
        let mask = alibi_mask(&slopes, s, s, &AttentionMask::Causal, Kind::Float);
        let got = dense_attention(&f(&q), &f(&k), &f(&v), &AttentionMask::Explicit(mask), None);
        assert!((got.to_kind(Kind::Double) - &want).abs().max().double_value(&[]) < 1e-5);
        let tail = alibi_mask(&slopes, 3, s, &AttentionMask::causal(3, s - 3, None, Device::Cpu), Kind::Float);
        let got = dense_attention(&f(&q.narrow(2, s - 3, 3)), &f(&k), &f(&v), &AttentionMask::Explicit(tail), None);
        assert!((got.to_kind(Kind::Double) - want.narrow(2, s - 3, 3)).abs().max().double_value(&[]) < 1e-5);
        let _ = naive_attention; // the dense reference of the other kernels
    }

    #[test]
    fn sinusoids_are_the_transformer_table() {
        let pos = Tensor::from_slice(&[0i64, 3]).view([1, 2]);
        let pe = sinusoidal_positions(&pos, 6, Kind::Double);
        let at = |p: usize, c: i64| pe.double_value(&[0, p as i64, c]);
        assert_eq!((at(0, 0), at(0, 1)), (0.0, 1.0));
        let angle = 3.0 / 10000f64.powf(2.0 / 6.0);
        assert!((at(1, 2) - angle.sin()).abs() < 1e-12 && (at(1, 3) - angle.cos()).abs() < 1e-12);
    }
}
