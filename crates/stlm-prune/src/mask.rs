//! Which weights to prune: the lowest scores of a matrix by a pattern (a fraction, or N of every
//! M consecutive inputs) within a scope (each output row, the whole matrix, or every matrix).

use crate::{PruneError, Result};
use serde::Serialize;
use stlm_core::OptionError;
use tch::{Kind, Tensor};

/// How many weights a matrix loses.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Pattern {
    /// This fraction of the weights (in `[0, 1)`), wherever the scores are lowest.
    Fraction {
        /// Fraction pruned.
        sparsity: f64,
    },
    /// `n` of every `m` consecutive weights of a row (semi-structured, e.g. 2:4).
    NOfM {
        /// Pruned per group.
        n: i64,
        /// Group size along the input dimension.
        m: i64,
    },
}

impl Pattern {
    /// A fraction, checked to be in `[0, 1)`.
    pub fn fraction(sparsity: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&sparsity) {
            return Err(OptionError::new("sparsity", sparsity, "must be at least 0 and below 1").into());
        }
        Ok(Pattern::Fraction { sparsity })
    }

    /// Parses `N:M` (e.g. `2:4`), `0 < N < M`.
    pub fn parse_nm(s: &str) -> Result<Self> {
        let bad = || PruneError::from(OptionError::new("nm", s, "expected N:M with 0 < N < M, e.g. 2:4"));
        let (n, m) = s.split_once(':').ok_or_else(bad)?;
        let (n, m): (i64, i64) = (n.trim().parse().map_err(|_| bad())?, m.trim().parse().map_err(|_| bad())?);
        if !(0 < n && n < m) {
            return Err(bad());
        }
        Ok(Pattern::NOfM { n, m })
    }

    /// The fraction of weights this pattern prunes.
    pub fn sparsity(self) -> f64 {
        match self {
            Pattern::Fraction { sparsity } => sparsity,
            Pattern::NOfM { n, m } => n as f64 / m as f64,
        }
    }

    /// Checks that a matrix named `name` with `cols` inputs can take this pattern.
    pub fn check(self, name: &str, cols: i64) -> Result<()> {
        match self {
            Pattern::NOfM { m, .. } if cols % m != 0 => Err(PruneError::Input(format!(
                "{name}: {cols} inputs are not a multiple of the N:M group size {m}"
            ))),
            _ => Ok(()),
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Fraction { sparsity } => write!(f, "{:.0}%", sparsity * 100.0),
            Pattern::NOfM { n, m } => write!(f, "{n}:{m}"),
        }
    }
}

/// Where scores compete with each other for a fraction pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Within each output row (Wanda's comparison group).
    Row,
    /// Within each matrix.
    Layer,
    /// Across every matrix pruned.
    Global,
}

impl std::str::FromStr for Scope {
    type Err = PruneError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "row" => Ok(Scope::Row),
            "layer" => Ok(Scope::Layer),
            "global" => Ok(Scope::Global),
            _ => Err(OptionError::new("scope", s, "expected row, layer or global").into()),
        }
    }
}

/// `[.., k]` indices of the `k` lowest entries along the last dimension of `scores`.
fn lowest(scores: &Tensor, k: i64) -> Tensor {
    scores.topk(k, -1, false, false).1
}

/// Keep-mask (`true` = kept, bool, shape of `scores` `[out, in]`) pruning the lowest scores by
/// `pattern` within `scope` (`Row` or `Layer`; a fraction rounds down to whole weights). N:M
/// groups are consecutive inputs of a row, whatever the scope.
pub fn keep_mask(scores: &Tensor, pattern: Pattern, scope: Scope) -> Result<Tensor> {
    let (rows, cols) = match scores.size()[..] {
        [r, c] => (r, c),
        ref s => return Err(PruneError::Input(format!("scores must be a matrix, got shape {s:?}"))),
    };
    let keep = Tensor::ones([rows, cols], (Kind::Bool, scores.device()));
    let pruned = |flat: &Tensor, idx: &Tensor| keep.view_as(flat).scatter_value(-1, idx, 0).view([rows, cols]);
    match (pattern, scope) {
        (Pattern::NOfM { n, m }, _) => {
            pattern.check("scores", cols)?;
            let groups = scores.view([rows, cols / m, m]);
            Ok(pruned(&groups, &lowest(&groups, n)))
        }
        (Pattern::Fraction { sparsity }, Scope::Row) => {
            let k = (cols as f64 * sparsity).floor() as i64;
            Ok(pruned(scores, &lowest(scores, k)))
        }
        (Pattern::Fraction { sparsity }, Scope::Layer) => {
            let flat = scores.view([-1]);
            let k = (flat.size()[0] as f64 * sparsity).floor() as i64;
            Ok(pruned(&flat, &lowest(&flat, k)))
        }
        (Pattern::Fraction { .. }, Scope::Global) => {
            Err(PruneError::Input("a global scope compares several matrices: use global_keep_masks".into()))
        }
    }
}

/// Keep-masks of several score matrices pruned together: the lowest `sparsity` fraction of all
/// their scores (magnitude pruning with a global threshold).
pub fn global_keep_masks(scores: &[Tensor], sparsity: f64) -> Vec<Tensor> {
    let flat = Tensor::cat(&scores.iter().map(|s| s.reshape([-1]).to_kind(Kind::Float)).collect::<Vec<_>>(), 0);
    let k = (flat.size()[0] as f64 * sparsity).floor() as i64;
    let keep = flat.ones_like().to_kind(Kind::Bool).scatter_value(0, &lowest(&flat, k), 0);
    let mut offset = 0;
    scores
        .iter()
        .map(|s| {
            let n = s.numel() as i64;
            let mask = keep.narrow(0, offset, n).view_as(s);
            offset += n;
            mask
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn zeros_per_group(mask: &Tensor, m: i64) -> Vec<i64> {
        let (rows, cols) = (mask.size()[0], mask.size()[1]);
        let pruned = mask.logical_not().to_kind(Kind::Int64).view([rows, cols / m, m]).sum_dim_intlist(-1, false, Kind::Int64);
        Vec::try_from(pruned.view([-1])).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Every group of M consecutive inputs of every row loses exactly N weights, and they are
        /// its N lowest scores.
        #[test]
        fn n_of_m_masks_prune_exactly_n_per_group(rows in 1i64..6, groups in 1i64..5, nm in prop::sample::select(vec![(1i64, 2i64), (2, 4), (4, 8), (3, 4)]), seed in 0u64..1000) {
            let (n, m) = nm;
            let scores = Tensor::from_slice(&(0..rows * groups * m).map(|i| ((i as u64 * 2654435761 + seed * 97) % 1009) as f32).collect::<Vec<_>>()).view([rows, groups * m]);
            let mask = keep_mask(&scores, Pattern::NOfM { n, m }, Scope::Row).unwrap();
            prop_assert!(zeros_per_group(&mask, m).iter().all(|&z| z == n));
            // The largest pruned score of a group is at most its smallest kept score.
            let g = scores.view([rows, groups, m]);
            let kept = mask.view([rows, groups, m]);
            let max_pruned = g.masked_fill(&kept, f64::NEG_INFINITY).amax(-1, false);
            let min_kept = g.masked_fill(&kept.logical_not(), f64::INFINITY).amin(-1, false);
            prop_assert!(bool::try_from(max_pruned.le_tensor(&min_kept).all()).unwrap());
        }
    }

    #[test]
    fn fractions_round_down_per_row_or_per_matrix() {
        let scores = Tensor::from_slice(&[5.0f32, 1.0, 4.0, 2.0, 3.0, 0.5, 9.0, 8.0, 7.0, 6.0]).view([2, 5]);
        let row = keep_mask(&scores, Pattern::Fraction { sparsity: 0.5 }, Scope::Row).unwrap();
        // floor(2.5) = 2 per row: row 0 loses 1.0 and 2.0, row 1 loses 0.5 and 6.0.
        let expect = Tensor::from_slice(&[true, false, true, false, true, false, true, true, true, false]).view([2, 5]);
        assert!(row.equal(&expect));
        let layer = keep_mask(&scores, Pattern::Fraction { sparsity: 0.5 }, Scope::Layer).unwrap();
        // 5 of 10 over the matrix: 0.5, 1, 2, 3, 4.
        let expect = Tensor::from_slice(&[true, false, false, false, false, false, true, true, true, true]).view([2, 5]);
        assert!(layer.equal(&expect));
        let global = global_keep_masks(&[scores.narrow(0, 0, 1), scores.narrow(0, 1, 1)], 0.3);
        assert_eq!(Vec::<bool>::try_from(global[0].view([-1])).unwrap(), vec![true, false, true, false, true]);
        assert_eq!(Vec::<bool>::try_from(global[1].view([-1])).unwrap(), vec![false, true, true, true, true]);
    }

    #[test]
    fn bad_patterns_are_named() {
        assert!(Pattern::parse_nm("2:4").is_ok());
        for bad in ["4:2", "2-4", "0:4", "a:b"] {
            let e = Pattern::parse_nm(bad).unwrap_err();
            assert!(matches!(&e, PruneError::Option(OptionError { name: "nm", .. })), "{e}");
            assert!(e.to_string().contains(bad), "{e}");
        }
        assert!(matches!(Pattern::fraction(1.0), Err(PruneError::Option(OptionError { name: "sparsity", .. }))));
        assert!(matches!("everywhere".parse::<Scope>(), Err(PruneError::Option(OptionError { name: "scope", .. }))));
        let e = keep_mask(&Tensor::zeros([2, 6], (Kind::Float, tch::Device::Cpu)), Pattern::NOfM { n: 2, m: 4 }, Scope::Row).unwrap_err();
        assert!(e.to_string().contains("6 inputs"), "{e}");
    }
}
