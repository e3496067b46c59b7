//! Logit losses between a teacher's and a student's next-token distributions.
//!
//! Both distributions are taken at temperature `T` (`softmax(z / T)`); each divergence is
//! averaged over the unmasked positions and multiplied by `T^2` (Hinton et al. 2015), so that
//! gradient sizes stay comparable as `T` changes. With a top-k teacher (large vocabularies, or a
//! cache), both distributions are reduced to the teacher's `k` most likely tokens plus one "rest"
//! bucket holding the remaining mass (from the log-sum-exp of the other tokens, so that a nearly
//! empty rest stays finite): a proper distribution over `k + 1` outcomes, exact when `k` is the
//! vocabulary size.
//!
//! | name | divergence | reference |
//! |------|------------|-----------|
//! | `fkl`  | KL(p ‖ q) | Hinton et al. 2015 |
//! | `rkl`  | KL(q ‖ p) | MiniLLM (Gu et al. 2024) |
//! | `js`   | ½ KL(p ‖ m) + ½ KL(q ‖ m), m = ½(p + q) | |
//! | `tvd`  | ½ Σ abs(p − q) | |
//! | `sfkl` | KL(p ‖ λp + (1 − λ)q) | DistiLLM (Ko et al. 2024) |
//! | `srkl` | KL(q ‖ λq + (1 − λ)p) | DistiLLM |
//!
//! p is the teacher, q the student.

use crate::align::next_byte_log_probs;
use crate::{DistillError, Result};
use clap::ValueEnum;
use stlm_core::OptionError;
use stlm_model::Extras;
use tch::{Kind, Tensor};

/// Log-probabilities below this are treated as this (a zero-mass bucket stays finite).
pub(crate) const LOG_FLOOR: f64 = -1e4;

/// Which divergence a logit loss uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Divergence {
    /// Forward KL(p ‖ q).
    #[value(name = "fkl")]
    ForwardKl,
    /// Reverse KL(q ‖ p).
    #[value(name = "rkl")]
    ReverseKl,
    /// Jensen-Shannon divergence.
    #[value(name = "js")]
    JensenShannon,
    /// Total variation distance.
    #[value(name = "tvd")]
    TotalVariation,
    /// Skew forward KL(p ‖ λp + (1 − λ)q).
    #[value(name = "sfkl")]
    SkewForwardKl,
    /// Skew reverse KL(q ‖ λq + (1 − λ)p).
    #[value(name = "srkl")]
    SkewReverseKl,
}

impl Divergence {
    /// The command-line name (`fkl`, `rkl`, ...).
    pub fn name(self) -> String {
        self.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default()
    }
}

impl std::str::FromStr for Divergence {
    type Err = DistillError;
    fn from_str(s: &str) -> Result<Self> {
        <Self as ValueEnum>::from_str(s, false).map_err(|_| {
            let names: Vec<String> = Self::value_variants().iter().map(|d| d.name()).collect();
            DistillError::Input(format!("unknown loss `{s}`; one of {}", names.join(", ")))
        })
    }
}

/// A logit loss: the divergence, its temperature and skew, and the top-k truncation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogitLoss {
    /// The divergence.
    pub divergence: Divergence,
    /// Temperature of both distributions (> 0).
    pub temperature: f64,
    /// Skew λ of `sfkl`/`srkl`, in (0, 1).
    pub skew: f64,
    /// Keep the teacher's top k tokens plus a rest bucket (`None`: the whole vocabulary).
    pub top_k: Option<i64>,
}

impl LogitLoss {
    /// Checks the ranges; errors name the option.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(OptionError::new("temperature", self.temperature, "must be a positive number").into());
        }
        if !(self.skew > 0.0 && self.skew < 1.0) {
            return Err(OptionError::new("skew", self.skew, "must be in (0, 1)").into());
        }
        if let Some(k) = self.top_k.filter(|&k| k < 1) {
            return Err(OptionError::new("top_k", k, "must be at least 1").into());
        }
        Ok(())
    }

    /// The teacher's side of the loss from its raw logits `[.., vocab]`: the whole distribution
    /// or its top k at this loss's temperature.
    pub fn teacher_targets(&self, logits: &Tensor) -> TeacherTargets {
        let scaled = logits.to_kind(Kind::Float) / self.temperature;
        match self.top_k.filter(|&k| k < scaled.size()[scaled.dim() - 1]) {
            None => TeacherTargets::Full { log_probs: scaled.log_softmax(-1, Kind::Float) },
            Some(k) => {
                let (values, ids) = scaled.topk(k, -1, true, true);
                TeacherTargets::TopK { rest: rest_logsumexp(&scaled, &ids), ids, logits: values }
            }
        }
    }

    /// `T^2` times the divergence between `teacher` and the student's raw logits `[b, s, vocab]`,
    /// averaged over the positions where `mask` `[b, s]` is true (all positions without one).
    pub fn loss(&self, student_logits: &Tensor, teacher: &TeacherTargets, mask: Option<&Tensor>) -> Tensor {
        let student = student_logits.to_kind(Kind::Float) / self.temperature;
        let lq_full = student.log_softmax(-1, Kind::Float);
        let (lp, lq, aligned) = match teacher {
            TeacherTargets::Full { log_probs } => (log_probs.shallow_clone(), lq_full, None),
            TeacherTargets::TopK { ids, logits, rest } => {
                // Both sides over k + 1 outcomes, the rest from its own log-sum-exp (not 1 - sum,
                // which rounds to 0 where the top k hold nearly all the mass).
                let lp = Tensor::cat(&[logits.to_kind(Kind::Float), rest.to_kind(Kind::Float).unsqueeze(-1)], -1).log_softmax(-1, Kind::Float);
                let lq_rest = rest_logsumexp(&lq_full, ids).unsqueeze(-1);
                (lp, Tensor::cat(&[lq_full.gather(-1, ids, false), lq_rest], -1), None)
            }
            TeacherTargets::Bytes { log_probs, mask, bucket } => {
                (log_probs.shallow_clone(), next_byte_log_probs(&lq_full, bucket), Some(mask))
            }
        };
        let mask = match (mask, aligned) {
            (Some(a), Some(b)) => Some(a.logical_and(b)),
            (a, b) => a.or(b).map(Tensor::shallow_clone),
        };
        let per_position = divergence(self.divergence, &lp.clamp_min(LOG_FLOOR), &lq.clamp_min(LOG_FLOOR), self.skew);
        masked_mean(&per_position, mask.as_ref()) * (self.temperature * self.temperature)
    }
}

/// The teacher's next-token distributions at one temperature.
#[derive(Debug)]
pub enum TeacherTargets {
    /// Log-probabilities over the whole vocabulary `[.., vocab]`.
    Full {
        /// `log_softmax(z / T)`.
        log_probs: Tensor,
    },
    /// The `k` most likely tokens `[.., k]` (ids, `z / T`) and the log-sum-exp `[..]` of `z / T`
    /// over all other tokens: a distribution over k + 1 outcomes.
    TopK {
        /// Token ids, int64.
        ids: Tensor,
        /// Their scaled logits `z / T`.
        logits: Tensor,
        /// `logsumexp(z / T)` over the tokens not in `ids`.
        rest: Tensor,
    },
    /// Next-byte log-probabilities `[b, s, 257]` at the student's positions, for a teacher with
    /// another tokenizer (see [`crate::align`]).
    Bytes {
        /// The teacher's next-byte log-probabilities at `T`.
        log_probs: Tensor,
        /// Student positions that line up with a teacher position `[b, s]`.
        mask: Tensor,
        /// The student's token -> next-byte bucket map `[student vocab]`.
        bucket: Tensor,
    },
}

/// Names of a cached teacher's top-k targets among a batch's extras.
const EXTRA_IDS: &str = "teacher.top_k_ids";
const EXTRA_LOGITS: &str = "teacher.top_k_logits";
const EXTRA_REST: &str = "teacher.rest_logsumexp";

impl TeacherTargets {
    /// Puts top-k targets into a batch's extras (other kinds are computed from a live teacher and
    /// never travel with a batch: they are refused).
    pub fn into_extras(self, extras: &mut Extras) -> Result<()> {
        let TeacherTargets::TopK { ids, logits, rest } = self else {
            return Err(DistillError::Input("only top-k teacher targets travel with a batch".into()));
        };
        extras.insert(EXTRA_IDS, ids);
        extras.insert(EXTRA_LOGITS, logits);
        extras.insert(EXTRA_REST, rest);
        Ok(())
    }

    /// The top-k targets a batch source put into `extras` for windows `inputs` `[b, s]`; an error
    /// when they are missing or shaped for another batch.
    pub fn from_extras(extras: &Extras, inputs: &Tensor) -> Result<Self> {
        let get = |name: &str| {
            extras.get(name).map(Tensor::shallow_clone).ok_or_else(|| {
                DistillError::Input(format!("no cached teacher targets for this batch (the batch source did not provide `{name}`)"))
            })
        };
        let (ids, logits, rest) = (get(EXTRA_IDS)?, get(EXTRA_LOGITS)?, get(EXTRA_REST)?);
        let (want, ids_size) = (inputs.size(), ids.size());
        if ids_size.len() != 3 || ids_size[..2] != want[..] || logits.size() != ids_size || rest.size() != want {
            return Err(DistillError::Input(format!(
                "the cached teacher targets belong to another batch (ids {ids_size:?} for windows {want:?})"
            )));
        }
        Ok(TeacherTargets::TopK { ids, logits, rest })
    }
}

/// Log-sum-exp `[..]` of `values` `[.., vocab]` over the entries not in `ids` `[.., k]`.
fn rest_logsumexp(values: &Tensor, ids: &Tensor) -> Tensor {
    values.scatter_value(-1, ids, f64::NEG_INFINITY).logsumexp([-1], false)
}

/// The divergence per position `[..]` between teacher log-probabilities `lp` and student `lq`
/// `[.., n]` (skew `lambda` for the skewed KLs).
pub fn divergence(kind: Divergence, lp: &Tensor, lq: &Tensor, lambda: f64) -> Tensor {
    let (p, q) = (lp.exp(), lq.exp());
    let kl = |a: &Tensor, la: &Tensor, lb: &Tensor| (a * (la - lb)).sum_dim_intlist(-1, false, Kind::Float);
    // log(w_a a + w_b b) from log a and log b.
    let log_mix = |wa: f64, la: &Tensor, wb: f64, lb: &Tensor| (la + wa.ln()).logaddexp(&(lb + wb.ln()));
    match kind {
        Divergence::ForwardKl => kl(&p, lp, lq),
        Divergence::ReverseKl => kl(&q, lq, lp),
        Divergence::JensenShannon => {
            let lm = log_mix(0.5, lp, 0.5, lq);
            (kl(&p, lp, &lm) + kl(&q, lq, &lm)) * 0.5
        }
        Divergence::TotalVariation => (&p - &q).abs().sum_dim_intlist(-1, false, Kind::Float) * 0.5,
        Divergence::SkewForwardKl => kl(&p, lp, &log_mix(lambda, lp, 1.0 - lambda, lq)),
        Divergence::SkewReverseKl => kl(&q, lq, &log_mix(lambda, lq, 1.0 - lambda, lp)),
    }
}

/// Mean of `values` `[b, s]` over the positions where `mask` is true (all without a mask).
pub fn masked_mean(values: &Tensor, mask: Option<&Tensor>) -> Tensor {
    match mask {
        None => values.mean(Kind::Float),
        Some(mask) => {
            let m = mask.to_kind(values.kind());
            (values * &m).sum(Kind::Float) / m.sum(Kind::Float).clamp_min(1.0)
        }
    }
}

/// Cross-entropy of `logits` `[b, s, vocab]` against `targets` `[b, s]`, averaged over the
/// positions where `mask` is true.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, mask: Option<&Tensor>) -> Tensor {
    let nll = -logits.log_softmax(-1, Kind::Float).gather(-1, &targets.unsqueeze(-1), false).squeeze_dim(-1);
    masked_mean(&nll, mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Log-softmax of one row in float64.
    fn log_softmax(z: &[f64], t: f64) -> Vec<f64> {
        let m = z.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b / t));
        let lse = m + z.iter().map(|&x| (x / t - m).exp()).sum::<f64>().ln();
        z.iter().map(|&x| x / t - lse).collect()
    }

    /// The divergence of one position, written out from the definitions in float64.
    fn reference(kind: Divergence, p: &[f64], q: &[f64], lambda: f64) -> f64 {
        let kl = |a: &[f64], b: &[f64]| a.iter().zip(b).filter(|(x, _)| **x > 0.0).map(|(x, y)| x * (x / y).ln()).sum::<f64>();
        let mix = |wa: f64, a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| wa * x + (1.0 - wa) * y).collect::<Vec<_>>();
        match kind {
            Divergence::ForwardKl => kl(p, q),
            Divergence::ReverseKl => kl(q, p),
            Divergence::JensenShannon => {
                let m = mix(0.5, p, q);
                0.5 * kl(p, &m) + 0.5 * kl(q, &m)
            }
            Divergence::TotalVariation => 0.5 * p.iter().zip(q).map(|(a, b)| (a - b).abs()).sum::<f64>(),
            Divergence::SkewForwardKl => kl(p, &mix(lambda, p, q)),
            Divergence::SkewReverseKl => kl(q, &mix(lambda, q, p)),
        }
    }

    /// The whole loss in float64: mean over unmasked rows of T^2 * divergence, with the top-k
    /// reduction done by hand (sorting the teacher's probabilities).
    fn reference_loss(loss: &LogitLoss, s: &[Vec<f64>], t: &[Vec<f64>], mask: &[bool]) -> f64 {
        let temp = loss.temperature;
        let (mut sum, mut n) = (0.0, 0.0);
        for ((sz, tz), &keep) in s.iter().zip(t).zip(mask) {
            if !keep {
                continue;
            }
            let p: Vec<f64> = log_softmax(tz, temp).iter().map(|x| x.exp()).collect();
            let q: Vec<f64> = log_softmax(sz, temp).iter().map(|x| x.exp()).collect();
            let (p, q) = match loss.top_k {
                Some(k) if (k as usize) < p.len() => {
                    let mut order: Vec<usize> = (0..p.len()).collect();
                    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
                    let top = &order[..k as usize];
                    let reduce = |d: &[f64]| {
                        let mut v: Vec<f64> = top.iter().map(|&i| d[i]).collect();
                        v.push((0..d.len()).filter(|i| !top.contains(i)).map(|i| d[i]).sum());
                        v
                    };
                    (reduce(&p), reduce(&q))
                }
                _ => (p, q),
            };
            sum += temp * temp * reference(loss.divergence, &p, &q, loss.skew);
            n += 1.0;
        }
        sum / n
    }

    fn rows(t: &Tensor) -> Vec<Vec<f64>> {
        let v = t.size()[2];
        let flat: Vec<f64> = Vec::try_from(t.reshape([-1]).to_kind(Kind::Double)).unwrap();
        flat.chunks(v as usize).map(|c| c.to_vec()).collect()
    }

    fn cases() -> Vec<LogitLoss> {
        let mut out = Vec::new();
        for &divergence in Divergence::value_variants() {
            for (temperature, top_k) in [(1.0, None), (2.0, None), (0.7, Some(3)), (1.5, Some(11))] {
                out.push(LogitLoss { divergence, temperature, skew: 0.1, top_k });
            }
        }
        out
    }

    #[test]
    fn every_divergence_matches_float64_definitions_with_temperature_top_k_and_mask() {
        let _g = crate::tests::RNG.lock();
        tch::manual_seed(7);
        let (b, s, v) = (2, 5, 11);
        let student = Tensor::randn([b, s, v], (Kind::Double, Device::Cpu)) * 2.0;
        let teacher = Tensor::randn([b, s, v], (Kind::Double, Device::Cpu)) * 3.0;
        let mask = Tensor::rand([b, s], (Kind::Float, Device::Cpu)).gt(0.3);
        let mask_host: Vec<bool> = Vec::try_from(mask.reshape([-1])).unwrap();
        for loss in cases() {
            let targets = loss.teacher_targets(&teacher);
            for (m, keep) in [(None, vec![true; (b * s) as usize]), (Some(&mask), mask_host.clone())] {
                let got = loss.loss(&student, &targets, m).double_value(&[]);
                let want = reference_loss(&loss, &rows(&student), &rows(&teacher), &keep);
                let tol = 2e-5 * want.abs().max(1.0);
                assert!((got - want).abs() < tol, "{loss:?} mask {}: {got} vs {want}", m.is_some());
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences_of_the_float64_reference() {
        let _g = crate::tests::RNG.lock();
        tch::manual_seed(11);
        let (b, s, v) = (1, 3, 7);
        let teacher = Tensor::randn([b, s, v], (Kind::Double, Device::Cpu)) * 2.0;
        let base = Tensor::randn([b, s, v], (Kind::Double, Device::Cpu)) * 2.0;
        let keep = vec![true; (b * s) as usize];
        for loss in cases().into_iter().map(|l| LogitLoss { top_k: l.top_k.map(|k| k.min(4)), ..l }) {
            let student = base.to_kind(Kind::Float).set_requires_grad(true);
            loss.loss(&student, &loss.teacher_targets(&teacher), None).backward();
            let grad = rows(&student.grad().to_kind(Kind::Double));
            let s_rows = rows(&base);
            let t_rows = rows(&teacher);
            for (r, c) in [(0usize, 0usize), (1, 3), (2, 6), (2, 1)] {
                let h = 1e-5;
                let mut plus = s_rows.clone();
                plus[r][c] += h;
                let mut minus = s_rows.clone();
                minus[r][c] -= h;
                let fd = (reference_loss(&loss, &plus, &t_rows, &keep) - reference_loss(&loss, &minus, &t_rows, &keep)) / (2.0 * h);
                let tol = 1e-4 + 1e-3 * fd.abs();
                assert!((grad[r][c] - fd).abs() < tol, "{loss:?} d/dz[{r}][{c}]: autograd {} vs finite differences {fd}", grad[r][c]);
            }
        }
    }

    #[test]
    fn a_confident_teacher_keeps_a_finite_rest_bucket() {
        // The top 3 hold all but ~1e-16 of the mass: `1 - sum` would round the rest to 0 and make
        // the reverse KL of a spread-out student explode; its own log-sum-exp keeps it exact.
        let mut z = vec![0.0f64; 50];
        z[7] = 40.0;
        z[3] = 38.0;
        z[11] = 37.0;
        let teacher = Tensor::from_slice(&z).view([1, 1, 50]);
        let student = Tensor::zeros([1, 1, 50], (Kind::Double, Device::Cpu));
        for divergence in [Divergence::ReverseKl, Divergence::ForwardKl, Divergence::SkewReverseKl] {
            let loss = LogitLoss { divergence, temperature: 1.0, skew: 0.1, top_k: Some(3) };
            let got = loss.loss(&student, &loss.teacher_targets(&teacher), None).double_value(&[]);
            let want = reference_loss(&loss, &[vec![0.0; 50]], &[z.clone()], &[true]);
            assert!((got - want).abs() < 1e-4 * want.abs().max(1.0), "{divergence:?}: {got} vs {want}");
        }
    }

    #[test]
    fn zero_when_the_student_is_the_teacher_and_positive_otherwise() {
        let _g = crate::tests::RNG.lock();
        tch::manual_seed(3);
        let z = Tensor::randn([2, 4, 9], (Kind::Float, Device::Cpu));
        for loss in cases() {
            let t = loss.teacher_targets(&z);
            assert!(loss.loss(&z, &t, None).double_value(&[]).abs() < 1e-5, "{loss:?}");
            let other = Tensor::randn([2, 4, 9], (Kind::Float, Device::Cpu));
            assert!(loss.loss(&other, &t, None).double_value(&[]) > 1e-4, "{loss:?}");
        }
    }

    #[test]
    fn temperature_scales_by_its_square_and_masked_positions_do_not_count() {
        let _g = crate::tests::RNG.lock();
        tch::manual_seed(5);
        let (s, t) = (Tensor::randn([1, 3, 6], (Kind::Float, Device::Cpu)), Tensor::randn([1, 3, 6], (Kind::Float, Device::Cpu)));
        let base = LogitLoss { divergence: Divergence::ForwardKl, temperature: 1.0, skew: 0.1, top_k: None };
        // T = 2 on logits 2z is T^2 = 4 times T = 1 on z.
        let hot = LogitLoss { temperature: 2.0, ..base };
        let one = base.loss(&s, &base.teacher_targets(&t), None).double_value(&[]);
        let two = hot.loss(&(&s * 2.0), &hot.teacher_targets(&(&t * 2.0)), None).double_value(&[]);
        assert!((two - 4.0 * one).abs() < 1e-5 * one.abs().max(1.0), "{two} vs 4 x {one}");
        // Garbage at a masked position changes nothing.
        let mask = Tensor::from_slice(&[true, false, true]).view([1, 3]);
        let noisy = s.copy();
        noisy.get(0).get(1).copy_(&(Tensor::randn([6], (Kind::Float, Device::Cpu)) * 50.0));
        let a = base.loss(&s, &base.teacher_targets(&t), Some(&mask)).double_value(&[]);
        let b = base.loss(&noisy, &base.teacher_targets(&t), Some(&mask)).double_value(&[]);
        assert_eq!(a, b);
    }

    #[test]
    fn names_round_trip_and_bad_options_are_named() {
        let names: Vec<String> = Divergence::value_variants().iter().map(|d| d.name()).collect();
        assert_eq!(names, ["fkl", "rkl", "js", "tvd", "sfkl", "srkl"]);
        for &d in Divergence::value_variants() {
            assert_eq!(d.name().parse::<Divergence>().unwrap(), d);
        }
        assert!("kl".parse::<Divergence>().unwrap_err().to_string().contains("fkl, rkl"));
        let l = LogitLoss { divergence: Divergence::ForwardKl, temperature: 0.0, skew: 0.1, top_k: None };
        let named = |l: LogitLoss| match l.validate() {
            Err(DistillError::Option(e)) => e.name,
            other => panic!("{other:?}"),
        };
        assert_eq!(named(l), "temperature");
        assert!(l.validate().unwrap_err().to_string().starts_with("`temperature` 0: "));
        assert_eq!(named(LogitLoss { temperature: 1.0, skew: 1.0, ..l }), "skew");
        assert_eq!(named(LogitLoss { temperature: 1.0, top_k: Some(0), ..l }), "top_k");
    }
}
