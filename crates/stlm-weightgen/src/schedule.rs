//! DDPM noise schedules and samplers (Ho et al. 2020; the cosine schedule of Nichol & Dhariwal
//! 2021; DDIM, Song et al. 2021).
//!
//! With `beta_t` the variance added at step t (t = 0..T-1), `alpha_t = 1 - beta_t` and
//! `abar_t = prod_{s<=t} alpha_s`:
//! - forward: `x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`;
//! - the model predicts `eps`; then `x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`;
//! - ancestral step: `x_{t-1} = mu + sigma_t z` with the posterior mean
//!   `mu = (sqrt(abar_{t-1}) beta_t / (1 - abar_t)) x_0 + (sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t)) x_t`
//!   and variance `sigma_t^2 = beta_t (1 - abar_{t-1}) / (1 - abar_t)` (`abar_{-1} = 1`; no noise at t = 0);
//! - DDIM (eta = 0): `x_{t-1} = sqrt(abar_{t-1}) x_0 + sqrt(1 - abar_{t-1}) eps`.

use tch::{Kind, Tensor};

/// Bad schedule settings, naming the value.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// Zero steps, betas outside (0, 1), or a step outside the schedule.
    #[error("{0}")]
    Invalid(String),
}

/// How the betas are spaced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BetaSchedule {
    /// Ho et al.: betas linear from `start` to `end` (1e-4 to 0.02 for 1000 steps).
    Linear {
        /// beta_0.
        start: f64,
        /// beta_{T-1}.
        end: f64,
    },
    /// Nichol & Dhariwal: `abar(t) = cos^2(((t/T + s) / (1 + s)) pi/2)` normalised, s = 0.008,
    /// betas clipped at 0.999.
    Cosine,
}

/// The betas and their products for `steps` steps, in float64.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    betas: Vec<f64>,
    abar: Vec<f64>,
}

impl NoiseSchedule {
    /// A schedule of `steps` steps.
    pub fn new(kind: BetaSchedule, steps: usize) -> Result<Self, ScheduleError> {
        if steps == 0 {
            return Err(ScheduleError::Invalid("steps 0: a schedule needs at least one step".into()));
        }
        let betas: Vec<f64> = match kind {
            BetaSchedule::Linear { start, end } => {
                if !(start > 0.0 && end < 1.0 && start <= end) {
                    return Err(ScheduleError::Invalid(format!("betas {start} to {end}: need 0 < start <= end < 1")));
                }
                let n = (steps - 1).max(1) as f64;
                (0..steps).map(|t| start + (end - start) * t as f64 / n).collect()
            }
            BetaSchedule::Cosine => {
                let s = 0.008;
                let f = |t: f64| (((t / steps as f64) + s) / (1.0 + s) * std::f64::consts::FRAC_PI_2).cos().powi(2);
                (0..steps).map(|t| (1.0 - f(t as f64 + 1.0) / f(t as f64)).min(0.999)).collect()
            }
        };
        let mut abar = Vec::with_capacity(steps);
        let mut prod = 1.0;
        for b in &betas {
            prod *= 1.0 - b;
            abar.push(prod);
        }
        Ok(NoiseSchedule { betas, abar })
    }

    /// Number of steps T.
    pub fn steps(&self) -> usize {
        self.betas.len()
    }

    /// beta_t.
    pub fn beta(&self, t: usize) -> f64 {
        self.betas[t]
    }

    /// abar_t (1 before the first step, for t = -1).
    pub fn alpha_bar(&self, t: isize) -> f64 {
        if t < 0 {
            1.0
        } else {
            self.abar[t as usize]
        }
    }

    fn check(&self, t: usize) -> Result<(), ScheduleError> {
        if t >= self.steps() {
            return Err(ScheduleError::Invalid(format!("step {t}: the schedule has steps 0..{}", self.steps())));
        }
        Ok(())
    }

    /// `x_t` from `x_0` and the noise `eps` (same shape).
    pub fn q_sample(&self, x0: &Tensor, t: usize, eps: &Tensor) -> Result<Tensor, ScheduleError> {
        self.check(t)?;
        let a = self.abar[t];
        Ok(x0 * a.sqrt() + eps * (1.0 - a).sqrt())
    }

    /// The `x_0` that `x_t` and a predicted `eps` imply.
    pub fn predict_x0(&self, xt: &Tensor, t: usize, eps: &Tensor) -> Result<Tensor, ScheduleError> {
        self.check(t)?;
        let a = self.abar[t];
        Ok((xt - eps * (1.0 - a).sqrt()) / a.sqrt())
    }

    /// The posterior mean of `x_{t-1}` given `x_t` and `x_0`, and its variance sigma_t^2.
    pub fn posterior(&self, xt: &Tensor, x0: &Tensor, t: usize) -> Result<(Tensor, f64), ScheduleError> {
        self.check(t)?;
        let (b, a, prev) = (self.betas[t], self.abar[t], self.alpha_bar(t as isize - 1));
        let c0 = prev.sqrt() * b / (1.0 - a);
        let ct = (1.0 - b).sqrt() * (1.0 - prev) / (1.0 - a);
        Ok((x0 * c0 + xt * ct, b * (1.0 - prev) / (1.0 - a)))
    }

    /// One ancestral (DDPM) step from `x_t` with the predicted noise `eps` and fresh noise `z`
    /// (unused at t = 0).
    pub fn ddpm_step(&self, xt: &Tensor, t: usize, eps: &Tensor, z: &Tensor) -> Result<Tensor, ScheduleError> {
        let x0 = self.predict_x0(xt, t, eps)?;
        let (mean, var) = self.posterior(xt, &x0, t)?;
        Ok(if t == 0 { mean } else { mean + z * var.sqrt() })
    }

    /// One deterministic DDIM step (eta = 0) from `x_t` to `x_{t_prev}` (`None`: to x_0).
    pub fn ddim_step(
        &self,
        xt: &Tensor,
        t: usize,
        t_prev: Option<usize>,
        eps: &Tensor,
    ) -> Result<Tensor, ScheduleError> {
        let x0 = self.predict_x0(xt, t, eps)?;
        let prev = match t_prev {
            Some(p) if p >= t => {
                return Err(ScheduleError::Invalid(format!("DDIM from step {t} to {p}: must go down")))
            }
            Some(p) => self.abar[p],
            None => 1.0,
        };
        Ok(x0 * prev.sqrt() + eps * (1.0 - prev).sqrt())
    }

    /// `n` steps drawn uniformly from 0..T (int64), for training the noise predictor.
    pub fn random_steps(&self, n: i64) -> Tensor {
        Tensor::randint(self.steps() as i64, [n], (Kind::Int64, tch::Device::Cpu))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tch::Device;

    fn vecf(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(&t.to_kind(Kind::Double).view([-1])).unwrap()
    }

    #[test]
    fn schedules_match_their_definitions() {
        let s = NoiseSchedule::new(BetaSchedule::Linear { start: 1e-4, end: 0.02 }, 1000).unwrap();
        assert!((s.beta(0) - 1e-4).abs() < 1e-15 && (s.beta(999) - 0.02).abs() < 1e-15);
        // abar_999 of Ho et al.'s schedule is about 4.0e-5.
        let last = s.alpha_bar(999);
        let direct: f64 = (0..1000).map(|t| 1.0 - (1e-4 + (0.02 - 1e-4) * t as f64 / 999.0)).product();
        assert!((last - direct).abs() < 1e-18 && (last - 4.04e-5).abs() < 1e-6, "{last}");
        let c = NoiseSchedule::new(BetaSchedule::Cosine, 100).unwrap();
        let f = |t: f64| (((t / 100.0) + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2).cos().powi(2);
        for t in [0usize, 10, 50, 98] {
            assert!((c.alpha_bar(t as isize) - f(t as f64 + 1.0) / f(0.0)).abs() < 1e-12, "step {t}");
        }
        assert!(c.beta(99) <= 0.999);
        assert!(NoiseSchedule::new(BetaSchedule::Cosine, 0).is_err());
        assert!(NoiseSchedule::new(BetaSchedule::Linear { start: 0.5, end: 0.1 }, 10)
            .unwrap_err()
            .to_string()
            .contains("0.5"));
        assert!(s
            .q_sample(
                &Tensor::zeros([2], (Kind::Float, Device::Cpu)),
                1000,
                &Tensor::zeros([2], (Kind::Float, Device::Cpu))
            )
            .is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Every step against the equations in float64, on float32 tensors.
        #[test]
        fn steps_match_float64_equations(seed in 0i64..1000, t in 0usize..50, cosine: bool) {
        let _rng = crate::rng_lock();
            let s = NoiseSchedule::new(if cosine { BetaSchedule::Cosine } else { BetaSchedule::Linear { start: 1e-4, end: 0.05 } }, 50).unwrap();
            tch::manual_seed(seed);
            let o = (Kind::Float, Device::Cpu);
            let (x0, eps, z) = (Tensor::randn([7], o), Tensor::randn([7], o), Tensor::randn([7], o));
            let (a, b, prev) = (s.alpha_bar(t as isize), s.beta(t), s.alpha_bar(t as isize - 1));
            let (x0v, ev, zv) = (vecf(&x0), vecf(&eps), vecf(&z));
            let xt = s.q_sample(&x0, t, &eps).unwrap();
            let xtv = vecf(&xt);
            let step = vecf(&s.ddpm_step(&xt, t, &eps, &z).unwrap());
            let ddim = vecf(&s.ddim_step(&xt, t, t.checked_sub(1), &eps).unwrap());
            for i in 0..7 {
                let want_xt = a.sqrt() * x0v[i] + (1.0 - a).sqrt() * ev[i];
                prop_assert!((xtv[i] - want_xt).abs() < 1e-5);
                let x0_hat = (xtv[i] - (1.0 - a).sqrt() * ev[i]) / a.sqrt();
                let mean = prev.sqrt() * b / (1.0 - a) * x0_hat + (1.0 - b).sqrt() * (1.0 - prev) / (1.0 - a) * xtv[i];
                let var = b * (1.0 - prev) / (1.0 - a);
                let want = if t == 0 { mean } else { mean + var.sqrt() * zv[i] };
                let tol = 1e-4 / a.sqrt();
                prop_assert!((step[i] - want).abs() < tol, "ddpm {} vs {}", step[i], want);
                let want_ddim = prev.sqrt() * x0_hat + (1.0 - prev).sqrt() * ev[i];
                prop_assert!((ddim[i] - want_ddim).abs() < tol, "ddim {} vs {}", ddim[i], want_ddim);
            }
        }
    }

    /// With the true noise as the prediction, DDIM walks back to x_0 exactly (up to float error),
    /// and the ancestral sampler's last step lands on x_0 too.
    #[test]
    fn an_oracle_noise_predictor_recovers_x0() {
        let _rng = crate::rng_lock();
        let s = NoiseSchedule::new(BetaSchedule::Cosine, 40).unwrap();
        tch::manual_seed(3);
        let o = (Kind::Double, Device::Cpu);
        let (x0, eps) = (Tensor::randn([16], o), Tensor::randn([16], o));
        let mut x = s.q_sample(&x0, 39, &eps).unwrap();
        for t in (0..40).rev() {
            // The noise that explains x_t given x_0, as a perfect model would predict it.
            let e = (&x - &x0 * s.alpha_bar(t as isize).sqrt()) / (1.0 - s.alpha_bar(t as isize)).sqrt();
            x = s.ddim_step(&x, t, t.checked_sub(1), &e).unwrap();
        }
        let d = (&x - &x0).abs().max().double_value(&[]);
        assert!(d < 1e-9, "{d}");
        let xt = s.q_sample(&x0, 0, &eps).unwrap();
        let last = s.ddpm_step(&xt, 0, &eps, &Tensor::randn([16], o)).unwrap();
        assert!((&last - &x0).abs().max().double_value(&[]) < 1e-9);
    }
}
