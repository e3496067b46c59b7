//! Learning-rate schedules as a function of the step, so a resumed run continues the same curve.

use serde::{Deserialize, Serialize};

/// How the learning rate moves after the linear warmup.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum Schedule {
    /// Cosine from `lr` down to `min_lr` at the last step.
    Cosine,
    /// Warmup-stable-decay: `lr` until the last `decay_fraction` of the run, then linear to `min_lr`.
    Wsd {
        /// Share of the run spent decaying (0..=1).
        decay_fraction: f64,
    },
    /// `lr` after warmup, unchanged.
    Constant,
}

/// A schedule with its endpoints.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate.
    pub min_lr: f64,
    /// Steps of linear warmup from 0 to `lr`.
    pub warmup_steps: u64,
    /// Length of the whole run.
    pub max_steps: u64,
    /// Shape after warmup.
    pub schedule: Schedule,
}

impl LrSchedule {
    /// Learning rate of step `step` (0-based).
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.max_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).clamp(0.0, 1.0);
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Cosine => {
                self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            Schedule::Wsd { decay_fraction } => {
                let decay_start = 1.0 - decay_fraction.clamp(0.0, 1.0);
                if progress <= decay_start || decay_fraction <= 0.0 {
                    self.lr
                } else {
                    let t = (progress - decay_start) / decay_fraction;
                    self.lr + (self.min_lr - self.lr) * t
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn warmup_then_cosine() {
        let s = LrSchedule { lr: 1.0, min_lr: 0.1, warmup_steps: 10, max_steps: 110, schedule: Schedule::Cosine };
        assert!(close(s.at(0), 0.1));
        assert!(close(s.at(9), 1.0));
        assert!(close(s.at(10), 1.0));
        assert!(close(s.at(60), 0.55));
        assert!(close(s.at(110), 0.1));
        assert!(close(s.at(500), 0.1));
    }

    #[test]
    fn warmup_stable_decay() {
        let s = LrSchedule {
            lr: 1.0,
            min_lr: 0.0,
            warmup_steps: 0,
            max_steps: 100,
            schedule: Schedule::Wsd { decay_fraction: 0.2 },
        };
        assert!(close(s.at(0), 1.0));
        assert!(close(s.at(80), 1.0));
        assert!(close(s.at(90), 0.5));
        assert!(close(s.at(100), 0.0));
    }
}
