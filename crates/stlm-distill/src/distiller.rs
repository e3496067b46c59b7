//! The teacher-student objective as a model the trainer can train: [`Distiller`] wraps the
//! student, runs the teacher without gradients (or takes its cached targets) and returns the
//! student's cross-entropy as the logged loss, with the distillation terms as extra terms.

use crate::loss::{cross_entropy, LogitLoss, TeacherTargets};
use crate::{DistillError, Result};
use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use stlm_core::kernels::grad_enabled;
use stlm_model::{DecoderModel, LanguageModel, ModelConfig, ModelError};
use stlm_moe::MoeStats;
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

/// File next to a checkpoint's `model.safetensors` holding the hidden-state projections.
pub const PROJECTIONS_FILE: &str = "distill.safetensors";

/// Teacher targets of the next training batch, put there by a batch source that reads a cache.
pub type TeacherSlot = Rc<RefCell<Option<(Tensor, TeacherTargets)>>>;

/// Hidden-state MSE (TinyBERT): student residual-stream state `i` against teacher state `j` for
/// each pair of the map, through a learned projection where the widths differ.
pub struct HiddenLoss {
    /// Weight of the term in the objective.
    pub weight: f64,
    /// (student state, teacher state) pairs; state 0 is the embedding output, state `i` the
    /// output of block `i`.
    pub map: Vec<(usize, usize)>,
    /// One projection `[teacher hidden, student hidden]` per pair (None: same width).
    projections: Vec<Option<Tensor>>,
    vs: nn::VarStore,
}

impl HiddenLoss {
    /// The term for `map` between a student of width `student_hidden` and a teacher of width
    /// `teacher_hidden`; projections start as the identity on the leading dimensions.
    pub fn new(weight: f64, map: Vec<(usize, usize)>, student_hidden: i64, teacher_hidden: i64, device: tch::Device) -> Self {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let projections = (0..map.len())
            .map(|k| {
                (student_hidden != teacher_hidden).then(|| {
                    let w = (&root / "distill" / "hidden_proj" / k).var("weight", &[teacher_hidden, student_hidden], Init::Const(0.0));
                    let n = student_hidden.min(teacher_hidden);
                    tch::no_grad(|| w.narrow(0, 0, n).narrow(1, 0, n).copy_(&Tensor::eye(n, (Kind::Float, device))));
                    w
                })
            })
            .collect();
        HiddenLoss { weight, map, projections, vs }
    }

    /// The default map: student state `i` (1..=Ls) against teacher state `round(i Lt / Ls)`.
    pub fn uniform_map(student_layers: usize, teacher_layers: usize) -> Vec<(usize, usize)> {
        (1..=student_layers).map(|i| (i, ((i * teacher_layers) as f64 / student_layers as f64).round() as usize)).collect()
    }

    /// Parses `s:t,s:t,...`, checking the states exist.
    pub fn parse_map(spec: &str, student_layers: usize, teacher_layers: usize) -> Result<Vec<(usize, usize)>> {
        let bad = |why: String| DistillError::Input(format!("--layer-map {spec}: {why}"));
        spec.split(',')
            .map(|pair| {
                let (s, t) = pair.trim().split_once(':').ok_or_else(|| bad(format!("`{pair}` is not STUDENT:TEACHER")))?;
                let (s, t): (usize, usize) = (
                    s.trim().parse().map_err(|_| bad(format!("`{s}` is not a number")))?,
                    t.trim().parse().map_err(|_| bad(format!("`{t}` is not a number")))?,
                );
                if s > student_layers || t > teacher_layers {
                    return Err(bad(format!(
                        "`{pair}`: states go up to {student_layers} in the student and {teacher_layers} in the teacher (0 = embeddings)"
                    )));
                }
                Ok((s, t))
            })
            .collect()
    }

    /// Mean over the pairs of the MSE between the projected student state and the teacher's.
    fn loss(&self, student: &[Tensor], teacher: &[Tensor]) -> Tensor {
        let terms: Vec<Tensor> = self
            .map
            .iter()
            .zip(&self.projections)
            .map(|(&(s, t), proj)| {
                let x = match proj {
                    Some(w) => student[s].matmul(&w.tr()),
                    None => student[s].shallow_clone(),
                };
                x.mse_loss(&teacher[t], tch::Reduction::Mean)
            })
            .collect();
        Tensor::stack(&terms, 0).mean(Kind::Float)
    }
}

/// Where the teacher's targets come from.
pub enum Teacher {
    /// A model run on each batch, without gradients.
    Live(Box<DecoderModel>),
    /// Targets a batch source put in the slot (`stlm distill cache`).
    Cached(TeacherSlot),
}

/// The student trained against a teacher: `(1 - alpha) CE + alpha * logit loss + hidden terms`.
pub struct Distiller {
    /// The model being trained.
    pub student: DecoderModel,
    /// The teacher.
    pub teacher: Teacher,
    /// The logit loss.
    pub logit: LogitLoss,
    /// Weight of the logit loss against the next-token cross-entropy.
    pub alpha: f64,
    /// Hidden-state term, if any.
    pub hidden: Option<HiddenLoss>,
}

impl Distiller {
    /// Checks that the pieces fit: same vocabulary width, alpha in [0, 1], hidden states only
    /// with a live teacher.
    pub fn new(student: DecoderModel, teacher: Teacher, logit: LogitLoss, alpha: f64, hidden: Option<HiddenLoss>) -> Result<Self> {
        logit.validate()?;
        if !(0.0..=1.0).contains(&alpha) {
            return Err(DistillError::Input(format!("--alpha {alpha}: must be in [0, 1]")));
        }
        if let Teacher::Live(t) = &teacher {
            if t.config.vocab_size != student.config.vocab_size {
                return Err(DistillError::Input(format!(
                    "the teacher's vocab_size {} and the student's {} differ: logit losses need one vocabulary",
                    t.config.vocab_size, student.config.vocab_size
                )));
            }
        }
        if hidden.is_some() && matches!(teacher, Teacher::Cached(_)) {
            return Err(DistillError::Input("hidden-state losses need the live teacher (a cache holds only logits)".into()));
        }
        Ok(Distiller { student, teacher, logit, alpha, hidden })
    }

    /// The teacher's targets (and residual stream when the hidden term needs it) for `inputs`.
    fn teacher_side(&self, inputs: &Tensor) -> Result<(TeacherTargets, Vec<Tensor>)> {
        match &self.teacher {
            Teacher::Cached(slot) => {
                let (ids, targets) = slot.borrow_mut().take().ok_or_else(|| {
                    DistillError::Input("no cached teacher targets for this batch (the batch source did not provide them)".into())
                })?;
                if ids.size() != inputs.size() || !ids.to_device(inputs.device()).equal(inputs) {
                    return Err(DistillError::Input("the cached teacher targets belong to another batch".into()));
                }
                Ok((targets, Vec::new()))
            }
            Teacher::Live(t) => {
                let _guard = tch::no_grad_guard();
                let (logits, states) = match &self.hidden {
                    Some(_) => {
                        let states = t.residual_stream(inputs);
                        let last = states.last().expect("the stream has the embeddings");
                        (t.head(&t.norm.forward(last)), states)
                    }
                    None => (t.forward(inputs), Vec::new()),
                };
                let _ = t.take_moe_stats(); // the teacher's routers do not train
                Ok((self.logit.teacher_targets(&logits), states))
            }
        }
    }
}

impl LanguageModel for Distiller {
    fn var_store(&self) -> &nn::VarStore {
        self.student.var_store()
    }
    fn model_config(&self) -> &ModelConfig {
        &self.student.config
    }
    fn trainable_variables(&self) -> Vec<(String, Tensor)> {
        let mut vars: Vec<(String, Tensor)> = self.student.var_store().variables().into_iter().collect();
        if let Some(h) = &self.hidden {
            vars.extend(h.vs.variables());
        }
        vars
    }
    fn train_loss(&self, inputs: &Tensor, targets: &Tensor) -> stlm_model::Result<(Tensor, Option<Tensor>)> {
        if !grad_enabled() {
            // Validation: the student's own loss, no teacher.
            return self.student.train_loss(inputs, targets);
        }
        let (teacher, teacher_states) = self.teacher_side(inputs).map_err(|e| ModelError::Input(e.to_string()))?;
        let (logits, states) = match &self.hidden {
            Some(_) => {
                let states = self.student.residual_stream(inputs);
                let last = states.last().expect("the stream has the embeddings");
                (self.student.head(&self.student.norm.forward(last)), states)
            }
            None => (self.student.forward(inputs), Vec::new()),
        };
        let ce = cross_entropy(&logits, targets, None);
        // Logged: the cross-entropy; trained: (1 - alpha) CE + alpha KD (+ hidden).
        let mut extra = (self.logit.loss(&logits, &teacher, None) - &ce) * self.alpha;
        if let Some(h) = &self.hidden {
            extra += h.loss(&states, &teacher_states) * h.weight;
        }
        Ok((ce, Some(extra)))
    }
    fn position_nats(&self, inputs: &Tensor, targets: &Tensor) -> stlm_model::Result<Tensor> {
        self.student.position_nats(inputs, targets)
    }
    fn take_moe_stats(&self) -> Vec<(usize, MoeStats)> {
        self.student.take_moe_stats()
    }
    fn update_moe_balance(&self, stats: &[(usize, MoeStats)]) {
        self.student.update_moe_balance(stats)
    }
    fn save(&self, dir: &Path, tokenizer: Option<&Path>) -> stlm_model::Result<()> {
        self.student.save(dir, tokenizer)?;
        if let Some(h) = &self.hidden {
            let vars: Vec<(String, Tensor)> = h.vs.variables().into_iter().collect();
            stlm_core::write_safetensors(&dir.join(PROJECTIONS_FILE), &vars)?;
        }
        Ok(())
    }
    fn load_weights(&self, path: &Path) -> stlm_model::Result<()> {
        // Check the projections before touching any weight.
        let projections = match &self.hidden {
            Some(h) if !h.vs.variables().is_empty() => {
                let file = path.with_file_name(PROJECTIONS_FILE);
                let saved = stlm_core::read_safetensors(&file)?;
                let vars = h.vs.variables();
                for (name, var) in &vars {
                    match saved.get(name) {
                        Some(t) if t.size() == var.size() => {}
                        _ => {
                            return Err(ModelError::Weights { path: file, message: format!("projection `{name}` is missing or has another shape") })
                        }
                    }
                }
                Some((vars, saved))
            }
            _ => None,
        };
        self.student.load_weights(path)?;
        if let Some((vars, saved)) = projections {
            let _guard = tch::no_grad_guard();
            for (name, mut var) in vars {
                var.copy_(&saved[&name]);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::Divergence;
    use tch::Device;

    fn tiny(layers: i64, hidden: i64) -> ModelConfig {
        ModelConfig {
            vocab_size: 30,
            hidden_size: hidden,
            intermediate_size: 2 * hidden,
            num_hidden_layers: layers,
            num_attention_heads: 2,
            num_key_value_heads: 2,
            max_position_embeddings: 16,
            ..ModelConfig::llama()
        }
    }

    fn fkl() -> LogitLoss {
        LogitLoss { divergence: Divergence::ForwardKl, temperature: 2.0, skew: 0.1, top_k: None }
    }

    #[test]
    fn objective_is_the_weighted_sum_and_validation_sees_only_the_student() {
        let _g = crate::tests::RNG.lock();
        tch::manual_seed(4);
        let teacher = DecoderModel::new(tiny(2, 32), Device::Cpu).unwrap();
        let student = DecoderModel::new(tiny(1, 16), Device::Cpu).unwrap();
        let x = Tensor::randint(30, [2, 6], (Kind::Int64, Device::Cpu));
        let y = Tensor::randint(30, [2, 6], (Kind::Int64, Device::Cpu));
        let t_logits = teacher.forward(&x).detach();
        let s_logits = student.forward(&x).detach();
        let map = HiddenLoss::uniform_map(1, 2);
        assert_eq!(map, vec![(1, 2)]);
        let hidden = HiddenLoss::new(0.3, map, 16, 32, Device::Cpu);
        let d = Distiller::new(student, Teacher::Live(Box::new(teacher)), fkl(), 0.25, Some(hidden)).unwrap();
        let (ce, extra) = d.train_loss(&x, &y).unwrap();
        let want_ce = cross_entropy(&s_logits, &y, None).double_value(&[]);
        let kd = fkl().loss(&s_logits, &fkl().teacher_targets(&t_logits), None).double_value(&[]);
        let Teacher::Live(t) = &d.teacher else { unreachable!() };
        let ts = t.residual_stream(&x);
        let ss = d.student.residual_stream(&x);
        let proj = ss[1].narrow(2, 0, 16);
        // The projection starts as the identity into the teacher's leading 16 dimensions.
        let padded = Tensor::cat(&[proj, Tensor::zeros([2, 6, 16], (Kind::Float, Device::Cpu))], 2);
        let mse = padded.mse_loss(&ts[2], tch::Reduction::Mean).double_value(&[]);
        let total = ce.double_value(&[]) + extra.unwrap().double_value(&[]);
        assert!((ce.double_value(&[]) - want_ce).abs() < 1e-6);
        let want = 0.75 * want_ce + 0.25 * kd + 0.3 * mse;
        assert!((total - want).abs() < 1e-5, "{total} vs {want}");
        // Gradients reach the projection; the teacher gets none.
        let (ce, extra) = d.train_loss(&x, &y).unwrap();
        (ce + extra.unwrap()).backward();
        let vars = d.trainable_variables();
        let proj = vars.iter().find(|(n, _)| n.starts_with("distill.hidden_proj.0")).expect("projection is trainable");
        assert!(proj.1.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
        assert!(t.var_store().variables().values().all(|v| !v.grad().defined()));
        let _guard = tch::no_grad_guard();
        let (val, extra) = d.train_loss(&x, &y).unwrap();
        assert!(extra.is_none() && (val.double_value(&[]) - want_ce).abs() < 1e-6);
    }

    #[test]
    fn checkpoints_carry_the_projections_and_refuse_a_missing_file() {
        let _g = crate::tests::RNG.lock();
        tch::manual_seed(6);
        let dir = tempfile::tempdir().unwrap();
        let make = || {
            let teacher = DecoderModel::new(tiny(2, 32), Device::Cpu).unwrap();
            let student = DecoderModel::new(tiny(1, 16), Device::Cpu).unwrap();
            let hidden = HiddenLoss::new(1.0, vec![(1, 2)], 16, 32, Device::Cpu);
            Distiller::new(student, Teacher::Live(Box::new(teacher)), fkl(), 0.5, Some(hidden)).unwrap()
        };
        let a = make();
        tch::no_grad(|| {
            for (_, mut v) in a.hidden.as_ref().unwrap().vs.variables() {
                let _ = v.fill_(0.5);
            }
        });
        a.save(dir.path(), None).unwrap();
        let b = make();
        b.load_weights(&dir.path().join("model.safetensors")).unwrap();
        let w = &b.hidden.as_ref().unwrap().vs.variables()["distill.hidden_proj.0.weight"];
        assert_eq!(w.mean(Kind::Float).double_value(&[]), 0.5);
        std::fs::remove_file(dir.path().join(PROJECTIONS_FILE)).unwrap();
        let e = b.load_weights(&dir.path().join("model.safetensors")).unwrap_err().to_string();
        assert!(e.contains(PROJECTIONS_FILE), "{e}");
    }

    #[test]
    fn cached_targets_must_belong_to_the_batch_and_mismatches_are_refused() {
        let _g = crate::tests::RNG.lock();
        tch::manual_seed(8);
        let student = DecoderModel::new(tiny(1, 16), Device::Cpu).unwrap();
        let slot: TeacherSlot = Default::default();
        let d = Distiller::new(student, Teacher::Cached(slot.clone()), fkl(), 1.0, None).unwrap();
        let x = Tensor::randint(30, [1, 4], (Kind::Int64, Device::Cpu));
        let logits = Tensor::randn([1, 4, 30], (Kind::Float, Device::Cpu));
        *slot.borrow_mut() = Some((x.copy(), fkl().teacher_targets(&logits)));
        let (ce, extra) = d.train_loss(&x, &x).unwrap();
        let s = d.student.forward(&x);
        let kd = fkl().loss(&s, &fkl().teacher_targets(&logits), None).double_value(&[]);
        assert!((ce.double_value(&[]) + extra.unwrap().double_value(&[]) - kd).abs() < 1e-5);
        assert!(d.train_loss(&x, &x).unwrap_err().to_string().contains("no cached teacher targets"));
        *slot.borrow_mut() = Some((&x + 1, fkl().teacher_targets(&logits)));
        assert!(d.train_loss(&x, &x).unwrap_err().to_string().contains("another batch"));
        let e = Distiller::new(DecoderModel::new(tiny(1, 16), Device::Cpu).unwrap(), Teacher::Cached(slot), fkl(), 1.5, None);
        assert!(e.err().unwrap().to_string().contains("--alpha"));
    }
}
