//! SparseGPT (Frantar & Alistarh 2023): prune a linear layer's weight and update the weights it
//! keeps so that the layer's output on calibration inputs changes least, one input column at a
//! time with the Optimal Brain Surgeon update, from a damped Hessian `X^T X`.
//!
//! Per column `i` (left to right), with `U` the upper Cholesky factor of `H^-1`: the weights of
//! column `i` that the mask prunes are set to zero and their error `(w - q) / U_ii` is spread over
//! the columns right of `i` by `U_i,i:`. The mask of a fraction pattern is chosen for a block of
//! columns at a time from the OBS saliency `w^2 / U_ii^2` (lowest first, over the whole block);
//! an N:M mask for each group of M columns when the column loop reaches it.

use crate::mask::Pattern;
use crate::{PruneError, Result};
use stlm_model::calibration::inverse_hessian_factor;
use tch::{Kind, Tensor};

/// SparseGPT's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SparseGptOptions {
    /// Columns whose mask is chosen together and whose updates are applied lazily (128 in the paper).
    pub block_size: i64,
    /// Added to the Hessian's diagonal as this fraction of its mean (0.01 in the paper).
    pub damp: f64,
}

impl Default for SparseGptOptions {
    fn default() -> Self {
        SparseGptOptions { block_size: 128, damp: 0.01 }
    }
}

/// The pruned and updated weight `[out, in]` (float64; pruned entries exactly zero) of `weight`
/// `[out, in]` with calibration Gram matrix `gram` `[in, in]` (`X^T X`, its scale does not matter).
/// Inputs that were always zero (zero diagonal) get zero weights; weights that are zero already
/// stay zero (they are pruned first). `name` is used in errors.
pub fn sparsegpt(name: &str, weight: &Tensor, gram: &Tensor, pattern: Pattern, opts: SparseGptOptions) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let (rows, cols) = (weight.size()[0], weight.size()[1]);
    pattern.check(name, cols)?;
    if gram.size() != [cols, cols] {
        return Err(PruneError::Input(format!("{name}: Gram matrix of shape {:?} for {cols} inputs", gram.size())));
    }
    let block = match pattern {
        // An N:M group must not straddle two blocks.
        Pattern::NOfM { m, .. } => (opts.block_size.max(m) / m) * m,
        Pattern::Fraction { .. } => opts.block_size.max(1),
    };
    let mut w = weight.to_kind(Kind::Double).copy();
    // Weights that are zero already were pruned before (an iterative schedule): they are pruned
    // first again, whatever the updates from earlier columns made of them.
    let was_zero = w.eq(0.0);
    let (u, dead) = inverse_hessian_factor(gram, opts.damp).ok_or_else(|| {
        PruneError::Numerical(format!(
            "{name}: the damped Hessian is not positive definite; raise the damping (`damp`, now {}) or use more calibration data",
            opts.damp
        ))
    })?; // upper factor of H^-1
    let _ = w.masked_fill_(&dead.unsqueeze(0), 0.0);
    for start in (0..cols).step_by(block as usize) {
        let count = block.min(cols - start);
        let w1 = w.narrow(1, start, count).copy(); // [rows, count]
        let u1 = u.narrow(0, start, count).narrow(1, start, count);
        let d1 = u1.diagonal(0, 0, 1); // [count]
        let mut prune = Tensor::zeros([rows, count], (Kind::Bool, w.device()));
        if let Pattern::Fraction { sparsity } = pattern {
            let saliency = (w1.square() / d1.square().unsqueeze(0)).masked_fill(&was_zero.narrow(1, start, count), -1.0).view([-1]);
            let k = (saliency.size()[0] as f64 * sparsity).floor() as i64;
            prune = prune.view([-1]).scatter_value(0, &saliency.topk(k, 0, false, false).1, 1).view([rows, count]);
        }
        let errors = Tensor::zeros([rows, count], (Kind::Double, w.device()));
        for i in 0..count {
            if let Pattern::NOfM { n, m } = pattern {
                if i % m == 0 {
                    let group = (w1.narrow(1, i, m).square() / d1.narrow(0, i, m).square().unsqueeze(0))
                        .masked_fill(&was_zero.narrow(1, start + i, m), -1.0);
                    let idx = group.topk(n, 1, false, false).1 + i;
                    prune = prune.scatter_value(1, &idx, 1);
                }
            }
            let col = w1.select(1, i); // [rows]
            let kept = col.masked_fill(&prune.select(1, i), 0.0);
            let err = (&col - &kept) / d1.get(i); // [rows]
            // Column i becomes `kept`; the columns right of it absorb the error.
            let mut right = w1.narrow(1, i, count - i);
            right -= err.unsqueeze(1).matmul(&u1.get(i).narrow(0, i, count - i).unsqueeze(0));
            w1.select(1, i).copy_(&kept);
            errors.select(1, i).copy_(&err);
        }
        w.narrow(1, start, count).copy_(&w1);
        let rest = cols - start - count;
        if rest > 0 {
            let mut later = w.narrow(1, start + count, rest);
            later -= errors.matmul(&u.narrow(0, start, count).narrow(1, start + count, rest));
        }
    }
    Ok(w)
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

    /// SparseGPT as the sequence of Optimal Brain Surgeon steps it stands for, written from the
    /// definitions: for column `i`, the inverse of the damped Hessian restricted to columns `i..`
    /// (explicitly inverted, no Cholesky), saliency `w^2 / [H_F^-1]_ii`, and the update
    /// `w_F -= w_i / [H_F^-1]_ii * [H_F^-1]_i,:` for every pruned weight.
    fn reference(w: &[Vec<f64>], h: &[Vec<f64>], pattern: Pattern, block: usize, damp: f64) -> Vec<Vec<f64>> {
        let (rows, cols) = (w.len(), w[0].len());
        let mean = (0..cols).map(|i| h[i][i]).sum::<f64>() / cols as f64;
        let h: Vec<Vec<f64>> = (0..cols).map(|i| (0..cols).map(|j| h[i][j] + if i == j { damp * mean } else { 0.0 }).collect()).collect();
        let hinv_from = |i: usize| inverse(&h[i..].iter().map(|r| r[i..].to_vec()).collect::<Vec<_>>());
        let hinvs: Vec<Vec<Vec<f64>>> = (0..cols).map(hinv_from).collect();
        let mut w = w.to_vec();
        let mut prune = vec![vec![false; cols]; rows];
        for start in (0..cols).step_by(block) {
            let end = (start + block).min(cols);
            if let Pattern::Fraction { sparsity } = pattern {
                let mut sal: Vec<(f64, usize, usize)> =
                    (0..rows).flat_map(|r| (start..end).map(move |c| (r, c))).map(|(r, c)| (w[r][c].powi(2) / hinvs[c][0][0], r, c)).collect();
                sal.sort_by(|a, b| a.0.total_cmp(&b.0));
                let k = ((rows * (end - start)) as f64 * sparsity).floor() as usize;
                sal[..k].iter().for_each(|&(_, r, c)| prune[r][c] = true);
            }
            for i in start..end {
                if let Pattern::NOfM { n, m } = pattern {
                    let (n, m) = (n as usize, m as usize);
                    if (i - start) % m == 0 {
                        for (r, row) in prune.iter_mut().enumerate() {
                            let mut g: Vec<(f64, usize)> = (i..i + m).map(|c| (w[r][c].powi(2) / hinvs[c][0][0], c)).collect();
                            g.sort_by(|a, b| a.0.total_cmp(&b.0));
                            g[..n].iter().for_each(|&(_, c)| row[c] = true);
                        }
                    }
                }
                let hinv = &hinvs[i];
                for r in 0..rows {
                    if prune[r][i] {
                        let f = w[r][i] / hinv[0][0];
                        for j in i..cols {
                            w[r][j] -= f * hinv[0][j - i];
                        }
                        w[r][i] = 0.0;
                    }
                }
            }
        }
        w
    }

    fn random(rows: i64, cols: i64, seed: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::randn([rows, cols], (Kind::Double, Device::Cpu))
    }

    fn to_rows(t: &Tensor) -> Vec<Vec<f64>> {
        Vec::<Vec<f64>>::try_from(t).unwrap()
    }

    #[test]
    fn sparsegpt_matches_explicit_obs_steps() {
        let _lock = crate::tests::RNG.lock().unwrap_or_else(|e| e.into_inner());
        let (rows, cols) = (5, 12);
        let w = random(rows, cols, 1);
        let x = random(40, cols, 2) * Tensor::from_slice(&[1.0f64, 3.0, 0.5, 2.0, 1.0, 0.2, 1.5, 4.0, 1.0, 0.7, 2.5, 1.0]);
        let gram = x.tr().matmul(&x);
        for (pattern, block) in [
            (Pattern::Fraction { sparsity: 0.5 }, 4),
            (Pattern::Fraction { sparsity: 0.3 }, 12),
            (Pattern::NOfM { n: 2, m: 4 }, 8),
            (Pattern::NOfM { n: 1, m: 3 }, 6),
        ] {
            let ours = sparsegpt("w", &w, &gram, pattern, SparseGptOptions { block_size: block, damp: 0.01 }).unwrap();
            let expect = Tensor::from_slice2(&reference(&to_rows(&w), &to_rows(&gram), pattern, block as usize, 0.01));
            let diff = (&ours - &expect).abs().max().double_value(&[]);
            assert!(diff < 1e-9, "{pattern:?} block {block}: max |diff| {diff}");
            let zeros = ours.eq(0.0).sum(Kind::Int64).int64_value(&[]);
            assert_eq!(zeros as f64, ((rows * cols) as f64 * pattern.sparsity()).floor(), "{pattern:?}");
            // The update pays off: the output error on the calibration inputs is below that of
            // zeroing the same weights without it.
            let masked = w.masked_fill(&ours.eq(0.0), 0.0);
            let err = |v: &Tensor| (x.matmul(&(v - &w).tr())).square().sum(Kind::Double).double_value(&[]);
            assert!(err(&ours) < err(&masked), "{pattern:?}: {} vs {}", err(&ours), err(&masked));
        }
    }

    /// Pruning further keeps every earlier zero, although the updates of earlier columns reach
    /// them: weights zeroed before (as a fine-tuned iterative schedule leaves them) are pruned
    /// first again. Here the first block has no zeros, so its pruning updates the later blocks,
    /// each of which holds exactly its quota of earlier zeros.
    #[test]
    fn earlier_zeros_stay_zero() {
        let _lock = crate::tests::RNG.lock().unwrap_or_else(|e| e.into_inner());
        let x = random(50, 16, 6) * Tensor::linspace(0.2, 3.0, 16, (Kind::Double, Device::Cpu));
        let gram = x.tr().matmul(&x);
        let opts = SparseGptOptions { block_size: 4, damp: 0.01 };
        let (r, c) = (Tensor::arange(6, (Kind::Int64, Device::Cpu)).unsqueeze(1), Tensor::arange(16, (Kind::Int64, Device::Cpu)).unsqueeze(0));
        let zero = (&r + &c).remainder(2).eq(0).logical_and(&c.ge(4)); // half of columns 4..16
        for seed in 0..3 {
            let first = random(6, 16, 10 + seed).masked_fill(&zero, 0.0);
            let second = sparsegpt("w", &first, &gram, Pattern::Fraction { sparsity: 0.5 }, opts).unwrap();
            assert_eq!(second.masked_select(&zero).abs().max().double_value(&[]), 0.0, "seed {seed}");
        }
    }

    #[test]
    fn dead_inputs_get_zero_weights_and_bad_shapes_are_named() {
        let _lock = crate::tests::RNG.lock().unwrap_or_else(|e| e.into_inner());
        let w = random(3, 4, 3);
        let x = random(10, 4, 4) * Tensor::from_slice(&[1.0f64, 0.0, 1.0, 1.0]);
        let out = sparsegpt("w", &w, &x.tr().matmul(&x), Pattern::Fraction { sparsity: 0.25 }, SparseGptOptions::default()).unwrap();
        assert_eq!(out.select(1, 1).abs().sum(Kind::Double).double_value(&[]), 0.0);
        let e = sparsegpt("layer.q", &w, &Tensor::eye(3, (Kind::Double, Device::Cpu)), Pattern::Fraction { sparsity: 0.5 }, SparseGptOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("layer.q") && e.contains("[3, 3]"), "{e}");
    }
}
