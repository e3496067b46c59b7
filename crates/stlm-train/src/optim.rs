//! AdamW (Loshchilov and Hutter, "Decoupled Weight Decay Regularization"), as `torch.optim.AdamW`
//! computes it, on tch tensors, with moments that checkpoints save and restore; optionally on the
//! hypersphere ("tangent descent", our reading of the brainstorm's term, after the normalised
//! transformer nGPT): every matrix row kept at unit norm, its gradient and its Adam update
//! projected on the tangent space of the sphere at the row, then the row renormalised.

use crate::Result;
use std::collections::BTreeMap;
use stlm_core::Parameter;
use tch::{Kind, Tensor};

/// AdamW settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay (applied where the parameter's role says so, see
    /// [`stlm_core::Role::decays`]: matrices, not lookup tables or vectors; not to matrices on
    /// the hypersphere, whose norm is fixed).
    pub weight_decay: f64,
    /// Keep every row of every matrix (embeddings and head included) at unit L2 norm and
    /// update it along the sphere (see the module docs).
    pub hypersphere: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, hypersphere: false }
    }
}

/// One trained tensor and its moments.
struct Slot {
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    decay: bool,
    /// Rows kept at unit norm, updated along the sphere.
    sphere: bool,
    /// 1 where the parameter may change, 0 where it stays zero (a pruned model's mask).
    mask: Option<Tensor>,
}

/// AdamW over named parameters.
pub struct AdamW {
    config: AdamWConfig,
    slots: BTreeMap<String, Slot>,
    step: u64,
}

impl AdamW {
    /// An optimizer for `params` (a model's walk, [`stlm_core::module::parameters`]), moments at
    /// zero; each parameter's role decides its weight decay. On the hypersphere, the rows of
    /// every matrix are normalised to unit length here.
    pub fn new(params: impl IntoIterator<Item = Parameter>, config: AdamWConfig) -> Self {
        let slots = params
            .into_iter()
            .map(|Parameter { name, tensor: param, role }| {
                let sphere = config.hypersphere && param.dim() == 2;
                let decay = role.decays(&param) && !sphere;
                if sphere {
                    let _guard = tch::no_grad_guard();
                    param.shallow_clone().copy_(&unit_rows(&param));
                }
                let slot = Slot { exp_avg: param.zeros_like(), exp_avg_sq: param.zeros_like(), param, decay, sphere, mask: None };
                (name, slot)
            })
            .collect();
        AdamW { config, slots, step: 0 }
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Keeps the zero entries of the parameters `names` at zero from now on: their gradients are
    /// masked before clipping and the update, and the weights after it (fine-tuning a pruned model).
    pub fn keep_zeros(&mut self, names: &[String]) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for name in names {
            let slot = self.slots.get_mut(name).ok_or_else(|| {
                crate::TrainError::Config(format!("keep zeros of `{name}`: the model has no parameter of that name"))
            })?;
            slot.mask = Some(slot.param.ne(0.0).to_kind(slot.param.kind()));
        }
        Ok(())
    }

    /// Zeroes the gradients where a mask is zero.
    fn mask_grads(&mut self) {
        for slot in self.slots.values() {
            let mut grad = slot.param.grad();
            if let (Some(mask), true) = (&slot.mask, grad.defined()) {
                grad *= mask;
            }
        }
    }

    /// Applies one update with learning rate `lr` from the gradients in the parameters.
    pub fn step(&mut self, lr: f64) {
        let _guard = tch::no_grad_guard();
        self.mask_grads();
        self.step += 1;
        let c = self.config;
        let bias1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias2 = 1.0 - c.beta2.powi(self.step as i32);
        for slot in self.slots.values_mut() {
            let grad = slot.param.grad();
            if !grad.defined() {
                continue;
            }
            if slot.sphere {
                sphere_step(slot, &grad, lr, c, bias1, bias2);
                continue;
            }
            if slot.decay && c.weight_decay != 0.0 {
                let _ = slot.param.g_mul_scalar_(1.0 - lr * c.weight_decay);
            }
            // In place, as torch's single-tensor AdamW: m += (1 - b1)(g - m); v = b2 v + (1 - b2) g^2;
            // p -= lr / bias1 * m / (sqrt(v) / sqrt(bias2) + eps).
            let _ = slot.exp_avg.lerp_(&grad, 1.0 - c.beta1);
            let _ = slot.exp_avg_sq.g_mul_scalar_(c.beta2).addcmul_(&grad, &(&grad * (1.0 - c.beta2)));
            let mut denom = slot.exp_avg_sq.sqrt();
            let _ = denom.g_div_scalar_(bias2.sqrt()).g_add_scalar_(c.eps).g_mul_scalar_(-bias1 / lr);
            let _ = slot.param.addcdiv_(&slot.exp_avg, &denom);
            if let Some(mask) = &slot.mask {
                // The masked gradient leaves pruned entries at zero already; this keeps them exact.
                let _ = slot.param.g_mul_(mask);
            }
        }
    }

    /// Every parameter's gradient by name (sorted; undefined where no backward reached it).
    pub fn grads(&self) -> Vec<(String, Tensor)> {
        self.slots.iter().map(|(name, s)| (name.clone(), s.param.grad())).collect()
    }

    /// The parameters, by name (sorted).
    pub fn params(&self) -> Vec<Tensor> {
        self.slots.values().map(|s| s.param.shallow_clone()).collect()
    }

    /// Clears every gradient.
    pub fn zero_grad(&mut self) {
        for slot in self.slots.values_mut() {
            slot.param.zero_grad();
        }
    }

    /// Scales gradients so that their global L2 norm is at most `max_norm` (0: no clipping);
    /// returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let _guard = tch::no_grad_guard();
        self.mask_grads();
        let grads: Vec<Tensor> = self.slots.values().map(|s| s.param.grad()).filter(Tensor::defined).collect();
        if grads.is_empty() {
            return 0.0;
        }
        let norms: Vec<Tensor> = grads.iter().map(|g| g.to_kind(Kind::Float).norm()).collect();
        let norm = Tensor::stack(&norms, 0).norm().double_value(&[]);
        if max_norm > 0.0 && norm > max_norm {
            let scale = max_norm / (norm + 1e-6);
            for mut g in grads {
                let _ = g.g_mul_scalar_(scale);
            }
        }
        norm
    }

    /// The moments as named tensors, for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .flat_map(|(name, s)| {
                [
                    (format!("{name}.exp_avg"), s.exp_avg.shallow_clone()),
                    (format!("{name}.exp_avg_sq"), s.exp_avg_sq.shallow_clone()),
                ]
            })
            .collect()
    }

    /// Restores moments saved by [`AdamW::state_tensors`] and the step count.
    pub fn load_state(&mut self, tensors: &std::collections::HashMap<String, Tensor>, step: u64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for (name, slot) in self.slots.iter_mut() {
            for (suffix, dst) in [("exp_avg", &mut slot.exp_avg), ("exp_avg_sq", &mut slot.exp_avg_sq)] {
                let key = format!("{name}.{suffix}");
                let src = tensors
                    .get(&key)
                    .ok_or_else(|| crate::TrainError::Config(format!("optimizer state lacks `{key}`")))?;
                if src.size() != dst.size() {
                    return Err(crate::TrainError::Config(format!(
                        "optimizer state `{key}` has shape {:?}, expected {:?}",
                        src.size(),
                        dst.size()
                    )));
                }
                dst.copy_(src);
            }
        }
        self.step = step;
        Ok(())
    }
}

/// `t` `[rows, cols]` with every row scaled to unit L2 norm.
fn unit_rows(t: &Tensor) -> Tensor {
    t / t.square().sum_dim_intlist(-1, true, t.kind()).sqrt().clamp_min(1e-12)
}

/// `v` `[rows, cols]` without its component along each unit row of `w`: on the tangent space.
fn tangent(v: &Tensor, w: &Tensor) -> Tensor {
    v - (v * w).sum_dim_intlist(-1, true, v.kind()) * w
}

/// One Adam step of a matrix on the hypersphere: the gradient projected on the tangent space
/// feeds the moments, the bias-corrected update is projected again (the per-element scaling
/// leaves the tangent space), the row moves by `lr` times it and is renormalised.
fn sphere_step(slot: &mut Slot, grad: &Tensor, lr: f64, c: AdamWConfig, bias1: f64, bias2: f64) {
    let g = tangent(grad, &slot.param);
    let _ = slot.exp_avg.lerp_(&g, 1.0 - c.beta1);
    let _ = slot.exp_avg_sq.g_mul_scalar_(c.beta2).addcmul_(&g, &(&g * (1.0 - c.beta2)));
    let update = (&slot.exp_avg / bias1) / (slot.exp_avg_sq.sqrt() / bias2.sqrt() + c.eps);
    let moved = &slot.param - tangent(&update, &slot.param) * lr;
    let moved = match &slot.mask {
        Some(mask) => moved * mask,
        None => moved,
    };
    slot.param.shallow_clone().copy_(&unit_rows(&moved));
}

#[cfg(test)]
mod tests {
    use super::*;
    use stlm_core::Role;

    /// Three steps against the update written out in float64, with weight decay on a matrix and
    /// none on a vector.
    #[test]
    fn matches_float64_adamw() {
        tch::manual_seed(0);
        let opts = (Kind::Float, tch::Device::Cpu);
        let w = Tensor::randn([3, 4], opts).set_requires_grad(true);
        let b = Tensor::randn([4], opts).set_requires_grad(true);
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1, hypersphere: false };
        let mut opt = AdamW::new([param("w", &w, Role::Matrix), param("norm.weight", &b, Role::Norm)], cfg);
        let (mut wd, mut bd) = (w.to_kind(Kind::Double).detach(), b.to_kind(Kind::Double).detach());
        let (mut mw, mut vw) = (wd.zeros_like(), wd.zeros_like());
        let (mut mb, mut vb) = (bd.zeros_like(), bd.zeros_like());
        for t in 1..=3 {
            let lr = 0.01 * t as f64;
            opt.zero_grad();
            let loss = (w.matmul(&b.unsqueeze(1)).square()).sum(Kind::Float);
            loss.backward();
            let (gw, gb) = (w.grad().to_kind(Kind::Double), b.grad().to_kind(Kind::Double));
            opt.step(lr);
            let (b1, b2) = (1.0 - 0.9f64.powi(t), 1.0 - 0.99f64.powi(t));
            wd = &wd * (1.0 - lr * 0.1);
            mw = &mw * 0.9 + &gw * 0.1;
            vw = &vw * 0.99 + gw.square() * 0.01;
            wd = &wd - (&mw / b1) / ((&vw / b2).sqrt() + 1e-8) * lr;
            mb = &mb * 0.9 + &gb * 0.1;
            vb = &vb * 0.99 + gb.square() * 0.01;
            bd = &bd - (&mb / b1) / ((&vb / b2).sqrt() + 1e-8) * lr;
        }
        let dw = (w.to_kind(Kind::Double) - wd).abs().max().double_value(&[]);
        let db = (b.to_kind(Kind::Double) - bd).abs().max().double_value(&[]);
        assert!(dw < 1e-6 && db < 1e-6, "{dw} {db}");
    }

    /// On the hypersphere: three steps against the projected update written out in float64;
    /// every row of the matrix stays at unit norm, the vector is an ordinary AdamW parameter.
    #[test]
    fn hypersphere_steps_keep_unit_rows_and_match_the_equations() {
        tch::manual_seed(3);
        let opts = (Kind::Float, tch::Device::Cpu);
        let w = Tensor::randn([5, 8], opts).set_requires_grad(true);
        let b = Tensor::randn([8], opts).set_requires_grad(true);
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1, hypersphere: true };
        let mut opt = AdamW::new([param("w", &w, Role::Matrix), param("b", &b, Role::Bias)], cfg);
        let norms = |t: &Tensor| t.to_kind(Kind::Double).square().sum_dim_intlist(-1, false, Kind::Double).sqrt();
        let unit = |t: &Tensor| (norms(t) - 1.0).abs().max().double_value(&[]);
        assert!(unit(&w) < 1e-6, "rows normalised at the start");
        let x = Tensor::randn([8, 3], opts);
        let mut wd = w.to_kind(Kind::Double).detach();
        let (mut m, mut v) = (wd.zeros_like(), wd.zeros_like());
        let proj = |u: &Tensor, w: &Tensor| u - (u * w).sum_dim_intlist(-1, true, Kind::Double) * w;
        for t in 1..=3 {
            let lr = 0.05 * t as f64;
            opt.zero_grad();
            ((w.matmul(&x) * &b.narrow(0, 0, 3)).sin().sum(Kind::Float) + b.square().sum(Kind::Float)).backward();
            let g = proj(&w.grad().to_kind(Kind::Double), &wd);
            opt.step(lr);
            let (b1, b2) = (1.0 - 0.9f64.powi(t), 1.0 - 0.99f64.powi(t));
            m = &m * 0.9 + &g * 0.1;
            v = &v * 0.99 + g.square() * 0.01;
            let u = proj(&((&m / b1) / ((&v / b2).sqrt() + 1e-8)), &wd);
            let moved = &wd - u * lr;
            wd = &moved / norms(&moved).unsqueeze(-1);
            assert!(unit(&w) < 1e-6, "step {t}: rows off the sphere by {}", unit(&w));
            let diff = (w.to_kind(Kind::Double) - &wd).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "step {t}: {diff} from the float64 equations");
        }
        assert!(norms(&b.unsqueeze(0)).double_value(&[0]) > 1.5, "vectors are not normalised");
    }

    fn param(name: &str, t: &Tensor, role: Role) -> Parameter {
        Parameter { name: name.to_string(), tensor: t.shallow_clone(), role }
    }

    #[test]
    fn decay_skips_vectors_and_embeddings() {
        let m = Tensor::zeros([2, 2], (Kind::Float, tch::Device::Cpu));
        let v = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu));
        let decays = |role: Role, t: &Tensor| {
            let opt = AdamW::new([param("p", t, role)], AdamWConfig::default());
            opt.slots["p"].decay
        };
        assert!(decays(Role::Matrix, &m), "projections (up_proj, lm_head) decay");
        assert!(!decays(Role::Embedding, &m), "embedding tables do not");
        assert!(!decays(Role::Norm, &v) && !decays(Role::Bias, &v), "nor norms and biases");
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let p = Tensor::ones([4], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let mut opt = AdamW::new([param("p", &p, Role::Bias)], AdamWConfig::default());
        (p.sum(Kind::Float) * 3.0).backward(); // gradient 3 everywhere: norm 6
        let norm = opt.clip_grad_norm(1.5);
        assert!((norm - 6.0).abs() < 1e-6);
        let after = p.grad().square().sum(Kind::Float).sqrt().double_value(&[]);
        assert!((after - 1.5).abs() < 1e-4, "{after}");
    }
}
