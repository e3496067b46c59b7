//! GPTQ (Frantar et al. 2022): quantize a linear layer's weight column by column, each column's
//! rounding error spread over the columns not yet quantized so that the layer's output on the
//! calibration inputs changes least (Optimal Brain Quantization), from the damped Hessian
//! `H = X^T X` of its inputs.
//!
//! With `U` the upper Cholesky factor of `H^-1`, for column `i` in processing order: `q_i` is the
//! column rounded into its blocks, `e = (w_i - q_i) / U_ii`, and `w_j -= e U_ij` for every later
//! column `j`; updates inside a batch of `block_size` columns are applied at once, those beyond
//! it lazily when the batch is done (the paper's "lazy batch" form, equal in exact arithmetic).
//!
//! The blocks are ggml's (32 consecutive columns of a row with one f16 scale), so a block's scale
//! must be chosen before its columns are rounded. In column order a block's scale comes from its
//! values when its first column is reached (already updated by the columns before it, as ggml's
//! round-to-nearest would choose it); with `act_order` (columns by decreasing `H_ii`, the paper's
//! option for outlier-heavy layers) every block's scale is fixed from the original weights
//! first ("static groups"). Values are rounded with ggml's rules for that scale, clamped to the
//! format's range (updated values can exceed the block's original largest magnitude).

use crate::{QuantError, Result};
use half::f16;
use stlm_core::quant::{BlockQ4_0, BlockQ8_0, QuantFormat, QuantMatrix, QK};
use stlm_model::calibration::inverse_hessian_factor;
use tch::{Kind, Tensor};

/// GPTQ's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqOptions {
    /// Columns updated together, the rest lazily (128 in the paper).
    pub block_size: i64,
    /// Added to the Hessian's diagonal as this fraction of its mean (0.01 in the paper).
    pub damp: f64,
    /// Quantize columns in order of decreasing Hessian diagonal.
    pub act_order: bool,
}

impl Default for GptqOptions {
    fn default() -> Self {
        GptqOptions { block_size: 128, damp: 0.01, act_order: false }
    }
}

/// Per row of one block: the float32 scale ggml quantizes with and the f16 scale it stores.
#[derive(Clone, Copy)]
struct Scale {
    inverse: f32,
    stored: u16,
}

impl Scale {
    /// ggml's scale of the 32 values `x` in `format` ([`QuantFormat::block_scale`]).
    fn of(format: QuantFormat, x: &[f32]) -> Self {
        let (d, inverse) = format.block_scale(x);
        Scale { inverse, stored: f16::from_f32(d).to_bits() }
    }

    /// The integer code of `v` ([`QuantFormat::code`]) and the value it stands for.
    fn round(self, format: QuantFormat, v: f32) -> (i32, f64) {
        let d = f16::from_bits(self.stored).to_f32() as f64;
        let q = format.code(v, self.inverse);
        let offset = if format == QuantFormat::Q4_0 { 8 } else { 0 };
        (q, (q - offset) as f64 * d)
    }
}

/// The blocks of `weight` `[out, in]` (`in` a multiple of 32) chosen by GPTQ from the
/// calibration Gram matrix `gram` `[in, in]` (`X^T X`; its scale does not matter). Inputs that
/// were always zero get zero weights. `name` is used in errors.
pub fn gptq(name: &str, weight: &Tensor, gram: &Tensor, format: QuantFormat, opts: GptqOptions) -> Result<QuantMatrix> {
    let _guard = tch::no_grad_guard();
    let (rows, cols) = weight.size2().map_err(|e| QuantError::Input(format!("`{name}`: {e}")))?;
    if cols as usize % QK != 0 {
        return Err(QuantError::Input(format!("`{name}`: rows of {cols} values do not divide into blocks of {QK}")));
    }
    if gram.size() != [cols, cols] {
        return Err(QuantError::Input(format!("`{name}`: Gram matrix of shape {:?} for {cols} inputs", gram.size())));
    }
    let cpu = tch::Device::Cpu;
    let mut w = weight.to_device(cpu).to_kind(Kind::Double).copy();
    let gram = gram.to_device(cpu).to_kind(Kind::Double);
    let diag: Vec<f64> = Vec::try_from(gram.diagonal(0, 0, 1))?;
    // Inputs that were always zero get zero weights.
    let _ = w.masked_fill_(&gram.diagonal(0, 0, 1).eq(0.0).unsqueeze(0), 0.0);
    // Static scales (act_order) come from the weights before any update.
    let original: Vec<f32> = Vec::try_from(w.to_kind(Kind::Float).contiguous().view([-1]))?;
    let (cols_u, blocks_per_row) = (cols as usize, cols as usize / QK);
    let mut scales: Vec<Option<Scale>> = vec![None; rows as usize * blocks_per_row];
    if opts.act_order {
        for (i, s) in scales.iter_mut().enumerate() {
            let (r, b) = (i / blocks_per_row, i % blocks_per_row);
            *s = Some(Scale::of(format, &original[r * cols_u + b * QK..r * cols_u + (b + 1) * QK]));
        }
    }
    let mut perm: Vec<i64> = (0..cols).collect();
    if opts.act_order {
        perm.sort_by(|&a, &b| diag[b as usize].total_cmp(&diag[a as usize]).then(a.cmp(&b)));
    }
    let p = Tensor::from_slice(&perm);
    let w = w.index_select(1, &p);
    let (u, _) = inverse_hessian_factor(&gram.index_select(0, &p).index_select(1, &p), opts.damp).ok_or_else(|| {
        QuantError::Input(format!(
            "`{name}`: the damped Hessian is not positive definite; raise the damping (now {}) or use more calibration text",
            opts.damp
        ))
    })?;
    let mut codes = vec![0i32; rows as usize * cols_u];
    // Batches are whole blocks of 32 columns, so a block's columns share a batch.
    let block = opts.block_size.max(QK as i64) / QK as i64 * QK as i64;
    for start in (0..cols).step_by(block as usize) {
        let count = block.min(cols - start);
        let w1 = w.narrow(1, start, count).copy();
        let u1 = u.narrow(0, start, count).narrow(1, start, count);
        let errors = Tensor::zeros([rows, count], (Kind::Double, cpu));
        for i in 0..count {
            let col = (start + i) as usize;
            let orig = perm[col] as usize;
            if !opts.act_order && orig % QK == 0 {
                // This block's scale, from its values as updated so far (they sit in this batch:
                // batches are whole blocks of 32 columns in column order).
                let values: Vec<f32> = Vec::try_from(w1.narrow(1, i, QK as i64).to_kind(Kind::Float).contiguous().view([-1]))?;
                for r in 0..rows as usize {
                    scales[r * blocks_per_row + orig / QK] = Some(Scale::of(format, &values[r * QK..(r + 1) * QK]));
                }
            }
            let column: Vec<f64> = Vec::try_from(w1.select(1, i))?;
            let mut rounded = Vec::with_capacity(rows as usize);
            for (r, &v) in column.iter().enumerate() {
                let scale = scales[r * blocks_per_row + orig / QK].expect("a block's scale is set before its columns");
                let (code, value) = scale.round(format, v as f32);
                codes[r * cols_u + orig] = code;
                rounded.push(value);
            }
            let rounded = Tensor::from_slice(&rounded);
            let err = (w1.select(1, i) - &rounded) / u1.double_value(&[i, i]);
            let mut right = w1.narrow(1, i, count - i);
            right -= err.unsqueeze(1).matmul(&u1.get(i).narrow(0, i, count - i).unsqueeze(0));
            w1.select(1, i).copy_(&rounded);
            errors.select(1, i).copy_(&err);
        }
        w.narrow(1, start, count).copy_(&w1);
        let rest = cols - start - count;
        if rest > 0 {
            let mut later = w.narrow(1, start + count, rest);
            later -= errors.matmul(&u.narrow(0, start, count).narrow(1, start + count, rest));
        }
    }
    let blocks = (0..rows as usize * blocks_per_row).map(|i| {
        let (r, b) = (i / blocks_per_row, i % blocks_per_row);
        let codes = &codes[r * cols_u + b * QK..r * cols_u + (b + 1) * QK];
        (scales[i].expect("every block was reached").stored, codes)
    });
    Ok(match format {
        QuantFormat::Q8_0 => QuantMatrix::Q8_0 {
            blocks: blocks.map(|(d, c)| BlockQ8_0 { d, qs: std::array::from_fn(|j| c[j] as i8) }).collect(),
            cols: cols_u,
        },
        QuantFormat::Q4_0 => QuantMatrix::Q4_0 {
            blocks: blocks.map(|(d, c)| BlockQ4_0 { d, qs: std::array::from_fn(|j| (c[j] | (c[j + QK / 2] << 4)) as u8) }).collect(),
            cols: cols_u,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The inverse of a small symmetric positive definite matrix by Gauss-Jordan elimination.
    fn inverse(a: &[Vec<f64>]) -> Vec<Vec<f64>> {
        let n = a.len();
        let mut m: Vec<Vec<f64>> = a.iter().enumerate().map(|(i, r)| r.iter().cloned().chain((0..n).map(|j| (i == j) as u8 as f64)).collect()).collect();
        for c in 0..n {
            let p = (c..n).max_by(|&x, &y| m[x][c].abs().total_cmp(&m[y][c].abs())).unwrap();
            m.swap(c, p);
            let pivot = m[c][c];
            m[c].iter_mut().for_each(|v| *v /= pivot);
            for r in 0..n {
                if r != c {
                    let f = m[r][c];
                    let pivot_row = m[c].clone();
                    m[r].iter_mut().zip(pivot_row).for_each(|(v, p)| *v -= f * p);
                }
            }
        }
        m.into_iter().map(|r| r[n..].to_vec()).collect()
    }

    /// GPTQ written from its definition, in float64: for column `i` (in column order), the
    /// inverse of the damped Hessian restricted to the columns not yet quantized (explicitly
    /// inverted), rounding with the block's scale chosen when its first column is reached, and
    /// the OBQ update `w_F -= (w_i - q_i) / [H_F^-1]_ii * [H_F^-1]_i,:` of the rest. Returns the
    /// dequantized weights.
    fn reference(w: &[Vec<f64>], h: &[Vec<f64>], format: QuantFormat, damp: f64) -> Vec<Vec<f64>> {
        let (rows, cols) = (w.len(), w[0].len());
        let mean = (0..cols).map(|i| h[i][i]).sum::<f64>() / cols as f64;
        let h: Vec<Vec<f64>> = (0..cols).map(|i| (0..cols).map(|j| h[i][j] + if i == j { damp * mean } else { 0.0 }).collect()).collect();
        let mut w = w.to_vec();
        let mut out = vec![vec![0.0; cols]; rows];
        let mut scales = vec![None; rows];
        for i in 0..cols {
            let hinv = inverse(&h[i..].iter().map(|r| r[i..].to_vec()).collect::<Vec<_>>());
            for r in 0..rows {
                if i % QK == 0 {
                    let block: Vec<f32> = w[r][i..i + QK].iter().map(|&v| v as f32).collect();
                    scales[r] = Some(Scale::of(format, &block));
                }
                let (_, q) = scales[r].unwrap().round(format, w[r][i] as f32);
                out[r][i] = q;
                let e = (w[r][i] - q) / hinv[0][0];
                for j in i..cols {
                    w[r][j] -= e * hinv[0][j - i];
                }
            }
        }
        out
    }

    /// A layer and inputs with correlated, unequally scaled columns (where GPTQ helps).
    fn layer(rows: i64, cols: i64, samples: i64) -> (Tensor, Tensor) {
        tch::manual_seed(3);
        let opts = (Kind::Double, Device::Cpu);
        let mix = Tensor::randn([cols, cols], opts) * 0.3 + Tensor::eye(cols, opts);
        let x = Tensor::randn([samples, cols], opts).matmul(&mix) * (Tensor::rand([cols], opts) * 2.0 + 0.2);
        (Tensor::randn([rows, cols], opts) * 0.1, x)
    }

    #[test]
    fn matches_the_float64_definition() {
        let (w, x) = layer(5, 64, 200);
        let gram = x.transpose(0, 1).matmul(&x);
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            // Batches of 32 and of all 64 columns: the lazy updates change nothing.
            for block_size in [32, 64] {
                let opts = GptqOptions { block_size, damp: 0.01, act_order: false };
                let ours = Tensor::from_slice(&gptq("w", &w, &gram, format, opts).unwrap().dequantize()).view([5, 64]);
                let want = reference(&Vec::try_from(&w).unwrap(), &Vec::try_from(&gram).unwrap(), format, 0.01);
                let want = Tensor::from_slice(&want.concat()).view([5, 64]).to_kind(Kind::Float);
                let differ = ours.ne_tensor(&want).sum(Kind::Int64).int64_value(&[]);
                assert_eq!(differ, 0, "{format:?} block {block_size}: {differ} of 320 values differ");
            }
        }
    }

    #[test]
    fn lower_output_error_than_round_to_nearest_on_the_calibration_inputs() {
        let (w, x) = layer(48, 128, 512);
        let gram = x.transpose(0, 1).matmul(&x);
        let w32 = w.to_kind(Kind::Float);
        let error = |m: &QuantMatrix| {
            let q = Tensor::from_slice(&m.dequantize()).view([48, 128]).to_kind(Kind::Double);
            (x.matmul(&(&w - q).transpose(0, 1))).square().sum(Kind::Double).double_value(&[])
        };
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            let values: Vec<f32> = Vec::try_from(w32.view([-1])).unwrap();
            let rtn = error(&QuantMatrix::quantize(format, &values, 128).unwrap());
            for act_order in [false, true] {
                let g = error(&gptq("w", &w, &gram, format, GptqOptions { act_order, ..GptqOptions::default() }).unwrap());
                assert!(g < 0.8 * rtn, "{format:?} act_order={act_order}: GPTQ {g:.4e} vs RTN {rtn:.4e}");
            }
        }
    }

    #[test]
    fn bad_shapes_are_named() {
        let (w, x) = layer(4, 64, 100);
        let gram = x.transpose(0, 1).matmul(&x);
        let e = gptq("layer.w", &w.narrow(1, 0, 40), &gram.narrow(0, 0, 40).narrow(1, 0, 40), QuantFormat::Q8_0, GptqOptions::default()).unwrap_err();
        assert!(e.to_string().contains("`layer.w`: rows of 40 values"), "{e}");
        let e = gptq("layer.w", &w, &gram.narrow(0, 0, 32), QuantFormat::Q8_0, GptqOptions::default()).unwrap_err();
        assert!(e.to_string().contains("Gram matrix of shape [32, 64]"), "{e}");
    }
}
