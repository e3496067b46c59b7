//! Unstructured and N:M pruning of a model's linear layers by magnitude, Wanda or SparseGPT.
//!
//! Targets are the linear layers the model owns ([`DecoderModel::linears_mut`]: the blocks'
//! `self_attn.{q,k,v,o}_proj`, Doge's `dt_proj`, dense `mlp.{gate,up,down}_proj`, the width
//! projections of per-layer shapes, an untied `lm_head`), minus the skipped projections and
//! blocks. Embeddings are lookup tables, not products, and are never pruned; MoE experts are
//! stacked tensors, not linear layers, and are left dense.
//!
//! Wanda and SparseGPT calibrate block by block as in their papers
//! ([`stlm_model::calibration::blockwise_grams`]): the inputs of block `i`'s linears are recorded
//! (a Gram matrix each) while the calibration batches run through blocks `0..i` already pruned,
//! then block `i` is pruned.

use crate::mask::{global_keep_masks, keep_mask, Pattern, Scope};
use crate::report::{PruneReport, TargetReport};
use crate::sparsegpt::sparsegpt;
use crate::{PruneError, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::time::Instant;
use stlm_core::OptionError;
use stlm_model::calibration::blockwise_grams;
use stlm_model::layers::Linear;
use stlm_model::linears::LinearSite as Target;
use stlm_model::DecoderModel;
use tch::{Kind, Tensor};

pub use crate::options::{Method, PruneOptions};

/// Whether `opts` skips a linear layer (its projection or its block).
fn skipped(opts: &PruneOptions) -> impl Fn(&Target<'_>) -> bool + '_ {
    |t| opts.skip.contains(&t.projection) || t.block.is_some_and(|b| opts.skip_blocks.contains(&b))
}

/// The linear layers of `model` that `opts` prunes: every one the model owns (see
/// [`DecoderModel::linears_mut`]) except the skipped projections and blocks.
fn targets<'a>(model: &'a mut DecoderModel, opts: &PruneOptions) -> Vec<Target<'a>> {
    let skip = skipped(opts);
    model.linears_mut().into_iter().filter(|t| !skip(t)).collect()
}

/// Prunes `model` in place by `opts`, calibrating Wanda and SparseGPT on `calib` (int64 token
/// batches `[b, s]` on the model's device); returns the report (perplexities left empty).
pub fn prune(model: &mut DecoderModel, calib: &[Tensor], opts: &PruneOptions, progress: bool) -> Result<PruneReport> {
    let started = Instant::now();
    crate::refuse_shared_layers(&model.config)?;
    check_options(opts, calib)?;
    let nonzero_before = nonzero(model);
    let _guard = tch::no_grad_guard();
    let names: Vec<(String, Option<usize>)> = {
        let targets = targets(model, opts);
        if targets.is_empty() {
            let skipped: Vec<&str> = opts.skip.iter().map(|p| p.name()).collect();
            let why = format!("every linear layer is skipped (projections {skipped:?}, blocks {:?}): nothing to prune", opts.skip_blocks);
            return Err(OptionError::no_value("skip", why).into());
        }
        for t in &targets {
            opts.pattern.check(&t.name(), t.linear.weight.shape().1)?;
        }
        targets.iter().map(|t| (t.name(), t.block)).collect()
    };
    let bar = bar(names.len() as u64, progress);
    match (opts.method, opts.scope, opts.pattern) {
        (Method::Magnitude, Scope::Global, Pattern::Fraction { sparsity }) => {
            let mut targets = targets(model, opts);
            let scores: Vec<Tensor> = targets.iter().map(|t| t.linear.weight.value().abs()).collect();
            for (t, keep) in targets.iter_mut().zip(global_keep_masks(&scores, sparsity)) {
                apply_mask(t.linear, &keep)?;
                bar.inc(1);
            }
        }
        (Method::Magnitude, _, _) => {
            for t in targets(model, opts) {
                apply_mask(t.linear, &keep_mask(&t.linear.weight.value().abs(), opts.pattern, opts.scope)?)?;
                bar.inc(1);
            }
        }
        (Method::Wanda | Method::SparseGpt, _, _) => {
            let skip = skipped(opts);
            blockwise_grams(model, calib, &|t| !skip(t), |m, _, grams| {
                for (i, gram) in grams {
                    let t = m.linears_mut().swap_remove(i);
                    bar.set_message(t.name());
                    prune_calibrated(t, &gram, opts)?;
                    bar.inc(1);
                }
                Ok::<(), PruneError>(())
            })?;
        }
    }
    bar.finish_and_clear();
    let reports = targets(model, opts).iter().map(|t| TargetReport::of(&t.name(), &t.linear.weight.value())).collect();
    Ok(PruneReport::new(opts, reports, model.num_parameters(), nonzero_before, nonzero(model), started.elapsed().as_secs_f64()))
}

/// Rejects option combinations that do not make sense, naming the option.
fn check_options(opts: &PruneOptions, calib: &[Tensor]) -> Result<()> {
    if opts.method.calibrated() && calib.is_empty() {
        let why = format!("the {} method needs calibration text", opts.method.name());
        return Err(OptionError::no_value("calib", why).into());
    }
    let (scope, why) = match (opts.method, opts.scope, opts.pattern) {
        (_, Scope::Global, Pattern::NOfM { .. }) => {
            ("global", "N:M groups are within rows; use the method's default scope".to_string())
        }
        (Method::Wanda | Method::SparseGpt, Scope::Global, _) => (
            "global",
            format!(
                "{} calibrates block by block, so it cannot compare all matrices at once; use row or layer",
                opts.method.name()
            ),
        ),
        (Method::SparseGpt, Scope::Row, _) => {
            ("row", "SparseGPT chooses its mask per block of columns (scope layer)".to_string())
        }
        _ => return Ok(()),
    };
    Err(OptionError::new("scope", scope, why).into())
}


/// Wanda's score `|W_ij| * ||X_j||` of `weight` `[out, in]` from the calibration Gram matrix
/// (the norms are the square roots of its diagonal).
pub fn wanda_scores(weight: &Tensor, gram: &Tensor) -> Tensor {
    weight.abs().to_kind(Kind::Double) * gram.diagonal(0, 0, 1).sqrt().unsqueeze(0)
}

/// Prunes one target with Wanda or SparseGPT from its inputs' Gram matrix.
fn prune_calibrated(t: Target<'_>, gram: &Tensor, opts: &PruneOptions) -> Result<()> {
    let w = &t.linear.weight.value();
    match opts.method {
        Method::Wanda => apply_mask(t.linear, &keep_mask(&wanda_scores(w, gram), opts.pattern, opts.scope)?)?,
        Method::SparseGpt => {
            let name = t.name();
            let pruned = sparsegpt(&name, w, &gram.to_device(w.device()), opts.pattern, opts.sparsegpt)?;
            t.linear.weight.assign(&pruned.to_kind(w.kind()), &name)?;
        }
        Method::Magnitude => unreachable!("magnitude needs no calibration"),
    }
    Ok(())
}

/// Zeroes the weights of `linear` where `keep` is false.
fn apply_mask(linear: &Linear, keep: &Tensor) -> Result<()> {
    let w = linear.weight.value();
    linear.weight.assign(&w.masked_fill(&keep.logical_not().to_device(w.device()), 0.0), "pruned weight")?;
    Ok(())
}

/// Non-zero entries over every variable of `model`.
fn nonzero(model: &DecoderModel) -> i64 {
    model.var_store().trainable_variables().iter().map(|v| v.count_nonzero(None::<i64>).int64_value(&[])).sum()
}

fn bar(len: u64, progress: bool) -> ProgressBar {
    let bar = if progress { ProgressBar::new(len) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("pruning {bar:30} {pos}/{len} layers {msg} [{elapsed_precise}]").expect("valid template"));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sparsegpt::SparseGptOptions;
    use std::sync::{Arc, Mutex};
    use stlm_model::layers::InputGram;
    use stlm_model::linears::Projection;
    use stlm_model::ModelConfig;
    use tch::Device;

    fn model(seed: i64) -> DecoderModel {
        let text = "vocab_size = 40\nhidden_size = 32\nintermediate_size = 48\nnum_hidden_layers = 2\nnum_attention_heads = 4\nnum_key_value_heads = 2\nmax_position_embeddings = 64\ntie_word_embeddings = false\n";
        let cfg = ModelConfig::from_toml_str(text, std::path::Path::new("t.toml")).unwrap();
        tch::manual_seed(seed);
        DecoderModel::new(cfg, Device::Cpu).unwrap()
    }

    fn calib() -> Vec<Tensor> {
        vec![Tensor::randint(40, [3, 16], (Kind::Int64, Device::Cpu)), Tensor::randint(40, [2, 16], (Kind::Int64, Device::Cpu))]
    }

    fn opts(method: Method, pattern: Pattern) -> PruneOptions {
        PruneOptions { method, pattern, scope: method.default_scope(), skip: vec![], skip_blocks: vec![], sparsegpt: SparseGptOptions::default() }
    }

    fn weights(m: &DecoderModel) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = m.var_store().variables().into_iter().map(|(n, t)| (n, t.copy())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Wanda's mask from a tapped linear layer equals one computed in float64 from the raw
    /// inputs: per output row, the lowest `|W_ij| * sqrt(sum_t x_tj^2)` go.
    #[test]
    fn wanda_mask_matches_float64_metric_from_raw_inputs() {
        let _lock = crate::tests::RNG.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(7);
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let mut linear = Linear::new(vs.root(), 6, 3, false, 1.0);
        let tap = Arc::new(Mutex::new(InputGram::default()));
        linear.tap = Some(Arc::clone(&tap));
        let x = Tensor::randn([2, 5, 6], (Kind::Float, Device::Cpu)) * Tensor::from_slice(&[0.1f32, 3.0, 1.0, 0.5, 2.0, 1.0]);
        let _ = linear.forward(&x);
        let _ = Linear::forward_concat(&[&linear], &x.narrow(1, 0, 2));
        let gram = tap.lock().unwrap().gram.take().unwrap();
        assert_eq!(tap.lock().unwrap().rows, 14);
        let keep = keep_mask(&wanda_scores(&linear.weight.value(), &gram), Pattern::Fraction { sparsity: 0.5 }, Scope::Row).unwrap();

        let xs: Vec<Vec<f64>> = Vec::try_from(Tensor::cat(&[x.view([-1, 6]), x.narrow(1, 0, 2).reshape([-1, 6])], 0).to_kind(Kind::Double)).unwrap();
        let w: Vec<Vec<f64>> = Vec::try_from(linear.weight.value().to_kind(Kind::Double)).unwrap();
        let norms: Vec<f64> = (0..6).map(|j| xs.iter().map(|r| r[j] * r[j]).sum::<f64>().sqrt()).collect();
        for (r, row) in w.iter().enumerate() {
            let mut order: Vec<usize> = (0..6).collect();
            order.sort_by(|&a, &b| (row[a].abs() * norms[a]).total_cmp(&(row[b].abs() * norms[b])));
            for (rank, &j) in order.iter().enumerate() {
                assert_eq!(keep.int64_value(&[r as i64, j as i64]) == 1, rank >= 3, "row {r} column {j}");
            }
        }
    }

    #[test]
    fn every_method_reaches_the_pattern_on_every_target() {
        let _lock = crate::tests::RNG.lock().unwrap_or_else(|e| e.into_inner());
        for method in [Method::Magnitude, Method::Wanda, Method::SparseGpt] {
            for pattern in [Pattern::Fraction { sparsity: 0.5 }, Pattern::NOfM { n: 2, m: 4 }] {
                let mut m = model(1);
                let report = prune(&mut m, &calib(), &opts(method, pattern), false).unwrap();
                assert_eq!(report.pruned.len(), 2 * 7 + 1, "{method:?}");
                for t in &report.pruned {
                    assert!((t.sparsity - 0.5).abs() < 1e-9, "{method:?} {pattern}: {} {}", t.name, t.sparsity);
                }
                assert!(report.nonzero_after < report.nonzero_before);
                if let Pattern::NOfM { .. } = pattern {
                    let w = m.layers[1].mlp.dense().unwrap().down_proj.weight.value().view([32, 12, 4]);
                    let zeros = w.eq(0.0).sum_dim_intlist(-1, false, Kind::Int64);
                    assert!(bool::try_from(zeros.eq(2).all()).unwrap(), "{method:?}: 2 zeros in every group of 4");
                }
            }
        }
    }

    /// Calibration is sequential: block 1 sees the outputs of block 0 already pruned, so pruning
    /// everything at once equals pruning block 0 alone and then block 1 alone.
    #[test]
    fn calibration_runs_through_the_pruned_blocks_before() {
        let _lock = crate::tests::RNG.lock().unwrap_or_else(|e| e.into_inner());
        let data = calib();
        for method in [Method::Wanda, Method::SparseGpt] {
            let o = PruneOptions { skip: vec![Projection::LmHead], ..opts(method, Pattern::Fraction { sparsity: 0.5 }) };
            let mut once = model(2);
            prune(&mut once, &data, &o, false).unwrap();
            let mut steps = model(2);
            prune(&mut steps, &data, &PruneOptions { skip_blocks: vec![1], ..o.clone() }, false).unwrap();
            prune(&mut steps, &data, &PruneOptions { skip_blocks: vec![0], ..o.clone() }, false).unwrap();
            for ((name, a), (_, b)) in weights(&once).into_iter().zip(weights(&steps)) {
                let diff = (&a - &b).abs().max().double_value(&[]);
                assert!(diff < 1e-6, "{method:?} {name}: {diff}");
            }
            if method == Method::Wanda {
                continue; // its masks of block 1 may well not change
            }
            // ... and differs from calibrating block 1 on the unpruned block 0.
            let mut unpruned_first = model(2);
            prune(&mut unpruned_first, &data, &PruneOptions { skip_blocks: vec![0], ..o.clone() }, false).unwrap();
            let w1 = |m: &DecoderModel| m.layers[1].self_attn.q_proj.weight.value().copy();
            assert!(!w1(&unpruned_first).equal(&w1(&once)), "{method:?}");
        }
    }

    #[test]
    fn global_magnitude_prunes_the_smallest_weights_of_all_targets() {
        let _lock = crate::tests::RNG.lock().unwrap_or_else(|e| e.into_inner());
        let mut m = model(3);
        let before: Vec<Tensor> = m.linears_mut().iter().map(|t| t.linear.weight.value().abs()).collect();
        let o = PruneOptions { scope: Scope::Global, ..opts(Method::Magnitude, Pattern::Fraction { sparsity: 0.3 }) };
        let report = prune(&mut m, &[], &o, false).unwrap();
        let total: i64 = report.pruned.iter().map(|t| t.params).sum();
        let zeros: i64 = report.pruned.iter().map(|t| t.zeros).sum();
        assert_eq!(zeros, (total as f64 * 0.3).floor() as i64);
        // Sparsity differs between matrices (one threshold for all), and nothing kept is smaller
        // than anything pruned.
        assert!(report.pruned.iter().any(|t| (t.sparsity - 0.3).abs() > 0.02));
        let after: Vec<Tensor> = m.linears_mut().iter().map(|t| t.linear.weight.value().copy()).collect();
        let max_pruned = before.iter().zip(&after).map(|(b, a)| b.masked_select(&a.eq(0.0)).max().double_value(&[])).fold(0.0, f64::max);
        let min_kept = before.iter().zip(&after).map(|(b, a)| b.masked_select(&a.ne(0.0)).min().double_value(&[])).fold(f64::MAX, f64::min);
        assert!(max_pruned <= min_kept);
    }

    #[test]
    fn bad_option_combinations_are_named() {
        let mut m = model(4);
        let e = prune(&mut m, &[], &opts(Method::Wanda, Pattern::Fraction { sparsity: 0.5 }), false).unwrap_err();
        assert!(matches!(&e, PruneError::Option(OptionError { name: "calib", value: None, .. })), "{e}");
        assert!(e.to_string().starts_with("`calib`: the wanda method needs calibration text"), "{e}");
        let o = PruneOptions { scope: Scope::Global, ..opts(Method::Magnitude, Pattern::NOfM { n: 2, m: 4 }) };
        let e = prune(&mut m, &[], &o, false).unwrap_err();
        assert!(e.to_string().starts_with("`scope` global: N:M"), "{e}");
        let o = PruneOptions { scope: Scope::Row, ..opts(Method::SparseGpt, Pattern::Fraction { sparsity: 0.5 }) };
        let e = prune(&mut m, &[Tensor::zeros([1, 4], (Kind::Int64, tch::Device::Cpu))], &o, false).unwrap_err();
        assert!(e.to_string().starts_with("`scope` row: SparseGPT"), "{e}");
        let o = PruneOptions { skip: vec![Projection::LmHead], skip_blocks: vec![0, 1], ..opts(Method::Magnitude, Pattern::Fraction { sparsity: 0.5 }) };
        let e = prune(&mut m, &[], &o, false).unwrap_err();
        assert!(
            matches!(&e, PruneError::Option(OptionError { name: "skip", .. }))
                && e.to_string().contains("nothing to prune"),
            "{e}"
        );
        let o = opts(Method::Magnitude, Pattern::NOfM { n: 2, m: 5 });
        let e = prune(&mut m, &[], &o, false).unwrap_err().to_string();
        assert!(e.contains("model.layers.0.self_attn.q_proj") && e.contains("group size 5"), "{e}");
    }
}
