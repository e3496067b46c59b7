//! Rotary position embedding (RoFormer; Hugging Face's `rotate_half` layout, as in Llama), with
//! transformers' `rope_parameters` scalings: `linear` (position interpolation), `dynamic` (NTK
//! base scaling that grows with the sequence), `yarn` and `llama3`. Frequencies are computed as
//! transformers' `modeling_rope_utils` computes them (in float64 here, then float32).

use serde::{Deserialize, Serialize};
use std::f64::consts::PI;
use tch::{Device, Kind, Tensor};

/// A RoPE scaling (`rope_parameters` of transformers, without `rope_theta`), for contexts longer
/// than the model was trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RopeScaling {
    /// Positions divided by `factor` (all frequencies divided by it).
    Linear {
        /// Scale factor.
        factor: f64,
    },
    /// NTK-aware scaling of the base once a sequence is longer than `max_position_embeddings`:
    /// `theta · (factor · n / max - (factor - 1))^(dim / (dim - 2))` for `n` positions.
    Dynamic {
        /// Scale factor.
        factor: f64,
    },
    /// YaRN: frequencies interpolated by `factor` below a ramp between `beta_slow` and
    /// `beta_fast` rotations over the original context, kept above it, and cos/sin scaled by the
    /// attention factor (`0.1 ln(factor) + 1` unless given).
    Yarn {
        /// Scale factor.
        factor: f64,
        /// Context length before scaling.
        original_max_position_embeddings: i64,
        /// cos/sin multiplier; derived from `factor` (and `mscale`, `mscale_all_dim`) when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attention_factor: Option<f64>,
        /// Rotations where interpolation ends (32).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        beta_fast: Option<f64>,
        /// Rotations where interpolation starts (1).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        beta_slow: Option<f64>,
        /// DeepSeek's mscale.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mscale: Option<f64>,
        /// DeepSeek's mscale_all_dim.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mscale_all_dim: Option<f64>,
        /// Round the ramp's ends to whole dimensions (true).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        truncate: Option<bool>,
    },
    /// Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend between.
    Llama3 {
        /// Scale factor.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// Context length before scaling.
        original_max_position_embeddings: i64,
    },
}

impl RopeScaling {
    /// Checks the settings; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        let factor = match *self {
            RopeScaling::Linear { factor } | RopeScaling::Dynamic { factor } => factor,
            RopeScaling::Yarn { factor, original_max_position_embeddings: o, .. } => {
                if o < 1 {
                    return Err(format!("`original_max_position_embeddings` must be >= 1, got {o}"));
                }
                factor
            }
            RopeScaling::Llama3 { factor, low_freq_factor: lo, high_freq_factor: hi, original_max_position_embeddings: o } => {
                if !(lo > 0.0 && hi > lo) || o < 1 {
                    return Err(format!("need 0 < `low_freq_factor` < `high_freq_factor` and `original_max_position_embeddings` >= 1, got {lo}, {hi}, {o}"));
                }
                factor
            }
        };
        if factor >= 1.0 && factor.is_finite() {
            Ok(())
        } else {
            Err(format!("`factor` must be >= 1, got {factor}"))
        }
    }
}

/// Rotary embedding frequencies for the rotated part of a head.
#[derive(Debug)]
pub struct Rope {
    inv_freq: Tensor,
    /// cos and sin are multiplied by this (YaRN).
    attention_factor: f64,
    /// For dynamic scaling: `(theta, factor, max_position_embeddings)`.
    dynamic: Option<(f64, f64, i64)>,
    dim: i64,
}

/// `theta^(-2i/dim)` for `i < dim/2`, in float64.
fn default_inv_freq(dim: i64, theta: f64) -> Vec<f64> {
    (0..dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / dim as f64)).collect()
}

impl Rope {
    /// Unscaled frequencies `theta^(-2i/dim)` for `i < dim/2` (transformers' default rope type).
    pub fn new(dim: i64, theta: f64, device: Device) -> Self {
        Self::with_scaling(dim, theta, None, 0, device)
    }

    /// Frequencies for a rotated width `dim` (the head, or its rotated part), base `theta`, and
    /// `scaling` for a model of `max_positions` positions.
    pub fn with_scaling(dim: i64, theta: f64, scaling: Option<&RopeScaling>, max_positions: i64, device: Device) -> Self {
        let base = default_inv_freq(dim, theta);
        let mut attention_factor = 1.0;
        let mut dynamic = None;
        let inv_freq: Vec<f64> = match scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(&RopeScaling::Dynamic { factor }) => {
                dynamic = Some((theta, factor, max_positions));
                base
            }
            Some(&RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                attention_factor: given,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                truncate,
            }) => {
                let get_mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
                attention_factor = given.unwrap_or(match (mscale, mscale_all_dim) {
                    (Some(m), Some(a)) if m != 0.0 && a != 0.0 => get_mscale(factor, m) / get_mscale(factor, a),
                    _ => get_mscale(factor, 1.0),
                });
                let correction = |rotations: f64| {
                    dim as f64 * (original as f64 / (rotations * 2.0 * PI)).ln() / (2.0 * theta.ln())
                };
                let (mut low, mut high) = (correction(beta_fast.unwrap_or(32.0)), correction(beta_slow.unwrap_or(1.0)));
                if truncate.unwrap_or(true) {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min((dim - 1) as f64));
                if low == high {
                    high += 0.001;
                }
                base.iter()
                    .enumerate()
                    .map(|(i, &f)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        f / factor * (1.0 - extrapolation) + f * extrapolation
                    })
                    .collect()
            }
            Some(&RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
                let original = original_max_position_embeddings as f64;
                let (low_wavelen, high_wavelen) = (original / low_freq_factor, original / high_freq_factor);
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        let inv_freq = Tensor::from_slice(&inv_freq).to_kind(Kind::Float).to_device(device);
        Rope { inv_freq, attention_factor, dynamic, dim }
    }

    /// The frequencies `[dim / 2]` on the host, or `None` when they depend on the sequence
    /// (dynamic scaling), for kernels that rotate one position.
    pub fn inv_freq(&self) -> Option<Vec<f32>> {
        if self.dynamic.is_some() {
            return None;
        }
        Some(Vec::try_from(&self.inv_freq.to_device(Device::Cpu)).expect("float32 frequencies"))
    }

    /// The factor cos and sin are multiplied by (1 except for YaRN).
    pub fn attention_factor(&self) -> f64 {
        self.attention_factor
    }

    /// `(cos, sin)` of shape `[batch, 1, seq, dim]` for integer `positions` `[batch, seq]`,
    /// computed in float32 and cast to `kind`. Dynamic scaling uses the frequencies of
    /// `max(positions) + 1` positions when that exceeds the model's, as transformers does.
    pub fn cos_sin(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let inv_freq = match self.dynamic {
            Some((theta, factor, max)) => {
                let n = positions.max().int64_value(&[]) + 1;
                if n > max {
                    let d = self.dim as f64;
                    let theta = theta * (factor * n as f64 / max as f64 - (factor - 1.0)).powf(d / (d - 2.0));
                    let f = default_inv_freq(self.dim, theta);
                    Tensor::from_slice(&f).to_kind(Kind::Float).to_device(self.inv_freq.device())
                } else {
                    self.inv_freq.shallow_clone()
                }
            }
            None => self.inv_freq.shallow_clone(),
        };
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv_freq; // [b, s, d/2]
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        let (cos, sin) = (emb.cos(), emb.sin());
        if self.attention_factor == 1.0 {
            (cos.to_kind(kind), sin.to_kind(kind))
        } else {
            ((cos * self.attention_factor).to_kind(kind), (sin * self.attention_factor).to_kind(kind))
        }
    }
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    Tensor::cat(&[-x.narrow(3, half, half), x.narrow(3, 0, half)], -1)
}

/// Rotates `x` (`[batch, heads, seq, head_dim]`) by the angles in `cos`/`sin`; when they are
/// narrower than the head (partial rotary), only the leading dimensions rotate.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let (d, r) = (x.size()[3], cos.size()[3]);
    if r == d {
        return x * cos + rotate_half(x) * sin;
    }
    let head = x.narrow(3, 0, r);
    Tensor::cat(&[&head * cos + rotate_half(&head) * sin, x.narrow(3, r, d - r)], 3)
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

    /// Partial rotary: only the leading dimensions move, and they move as a full rotation of
    /// that width would.
    #[test]
    fn partial_rotary_rotates_the_leading_dimensions() {
        tch::manual_seed(1);
        let x = Tensor::randn([1, 2, 3, 8], (Kind::Float, Device::Cpu));
        let pos = Tensor::from_slice(&[0i64, 4, 9]).view([1, 3]);
        let (cos, sin) = Rope::new(4, 10000.0, Device::Cpu).cos_sin(&pos, Kind::Float);
        let y = apply_rotary(&x, &cos, &sin);
        assert!(y.narrow(3, 4, 4).equal(&x.narrow(3, 4, 4)));
        assert!(y.narrow(3, 0, 4).allclose(&apply_rotary(&x.narrow(3, 0, 4), &cos, &sin), 1e-6, 1e-6, false));
        assert!(!y.narrow(3, 0, 4).allclose(&x.narrow(3, 0, 4), 1e-3, 1e-3, false));
    }

    /// Every scaling leaves the highest frequency (dimension 0) alone except linear and llama3's
    /// long wavelengths, and divides long wavelengths by the factor, as transformers does.
    #[test]
    fn scalings_change_the_low_frequencies() {
        let freqs = |s: Option<RopeScaling>| Rope::with_scaling(16, 10000.0, s.as_ref(), 32, Device::Cpu).inv_freq().unwrap();
        let base = freqs(None);
        let linear = freqs(Some(RopeScaling::Linear { factor: 4.0 }));
        assert!(base.iter().zip(&linear).all(|(b, l)| (b / 4.0 - l).abs() < 1e-9));
        let yarn = freqs(Some(RopeScaling::Yarn {
            factor: 4.0,
            original_max_position_embeddings: 32,
            attention_factor: None,
            beta_fast: None,
            beta_slow: None,
            mscale: None,
            mscale_all_dim: None,
            truncate: None,
        }));
        assert_eq!(yarn[0], base[0]);
        assert!((yarn[7] - base[7] / 4.0).abs() < 1e-9);
        let llama3 = freqs(Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 32,
        }));
        assert_eq!(llama3[0], base[0]);
        assert!((llama3[7] - base[7] / 8.0).abs() < 1e-9);
        let dynamic = Rope::with_scaling(16, 10000.0, Some(&RopeScaling::Dynamic { factor: 2.0 }), 32, Device::Cpu);
        assert!(dynamic.inv_freq().is_none(), "depends on the length");
        let short = dynamic.cos_sin(&Tensor::arange(32, (Kind::Int64, Device::Cpu)).view([1, 32]), Kind::Float);
        let plain = Rope::new(16, 10000.0, Device::Cpu).cos_sin(&Tensor::arange(32, (Kind::Int64, Device::Cpu)).view([1, 32]), Kind::Float);
        assert!(short.0.equal(&plain.0), "no change within the trained length");
        let long = dynamic.cos_sin(&Tensor::arange(64, (Kind::Int64, Device::Cpu)).view([1, 64]), Kind::Float);
        assert!(!long.0.narrow(2, 0, 32).allclose(&plain.0, 1e-4, 1e-4, false), "a longer sequence scales the base");
    }
}
