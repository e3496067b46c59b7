//! The teacher-student objective as a model the trainer can train: [`Distiller`] wraps the
//! student, runs the teacher without gradients (or reads its cached targets from the batch's
//! extras) and returns the student's cross-entropy as the logged loss, with the distillation
//! terms as an aux loss. Validation ([`Mode::Eval`]) scores the student alone.

use crate::align::ByteAlignment;
use crate::loss::{cross_entropy, divergence, Divergence, LogitLoss, TeacherTargets, LOG_FLOOR};
use crate::{DistillError, Result};
use std::path::Path;
use stlm_core::OptionError;
use stlm_model::{Batch, BlockPass, DecoderModel, LanguageModel, Mode, ModelConfig, ModelError, ResidualStream, StepOutput};
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

/// File next to a checkpoint's `model.safetensors` holding the hidden-state projections.
pub const PROJECTIONS_FILE: &str = "distill.safetensors";

/// Feature losses between paired residual-stream states of student and teacher: hidden-state
/// MSE (TinyBERT), through a learned projection where the widths differ, and attention-map KL
/// (MiniLM-style KL(teacher || student) of each query's attention distribution) for the blocks
/// producing the paired states.
pub struct FeatureLoss {
    /// Weight of the hidden-state MSE (0: off).
    pub hidden_weight: f64,
    /// Weight of the attention-map KL (0: off).
    pub attention_weight: f64,
    /// (student state, teacher state) pairs; state 0 is the embedding output, state `i` the
    /// output of block `i` (whose attention the attention term compares).
    pub map: Vec<(usize, usize)>,
    /// One projection `[teacher hidden, student hidden]` per pair (None: same width or no MSE).
    projections: Vec<Option<Tensor>>,
    vs: nn::VarStore,
}

/// What the teacher contributes to the feature losses of one batch.
struct TeacherFeatures {
    states: Vec<Tensor>,
    /// Log attention probabilities of each attention pair, averaged into the student's heads.
    attention: Vec<Option<Tensor>>,
}

impl stlm_core::Layer for FeatureLoss {
    fn visit(&self, walk: &mut stlm_core::Walk<'_>) {
        for (k, p) in self.projections.iter().enumerate() {
            walk.param_opt(&format!("distill.hidden_proj.{k}.weight"), p.as_ref(), stlm_core::Role::Matrix);
        }
    }
}

impl FeatureLoss {
    /// The terms for `map` between `student` and `teacher`; projections start as the identity on
    /// the leading dimensions. The attention term needs dense softmax attention in the paired
    /// blocks and a teacher head count that is a multiple of the student's (teacher heads are
    /// averaged in groups); errors name what does not fit.
    pub fn new(hidden_weight: f64, attention_weight: f64, map: Vec<(usize, usize)>, student: &DecoderModel, teacher: &DecoderModel) -> Result<Self> {
        for (name, w) in [("hidden_weight", hidden_weight), ("attention_weight", attention_weight)] {
            if !(w >= 0.0 && w.is_finite()) {
                return Err(OptionError::new(name, w, "must be a non-negative number").into());
            }
        }
        let (ls, lt) = (student.depth(), teacher.depth());
        let shaped = |m: &DecoderModel| m.config.layer_shapes.is_some() || m.config.residual_root.is_some();
        if (hidden_weight > 0.0 || attention_weight > 0.0) && (shaped(student) || shaped(teacher)) {
            let why = "feature losses compare states of one width and head count; a model here has per-layer shapes or a residual root";
            return Err(OptionError::new("hidden_weight/attention_weight", format!("{hidden_weight}/{attention_weight}"), why).into());
        }
        if let Some(&(s, t)) = map.iter().find(|&&(s, t)| s > ls || t > lt) {
            let why = format!("states go up to {ls} in the student and {lt} in the teacher");
            return Err(OptionError::new("layer_map", format!("{s}:{t}"), why).into());
        }
        if attention_weight > 0.0 {
            let bad = |why: String| Err(OptionError::new("attention_weight", attention_weight, why).into());
            let (hs, ht) = (student.config.num_attention_heads, teacher.config.num_attention_heads);
            if ht % hs != 0 {
                return bad(format!("the teacher's {ht} heads are not a multiple of the student's {hs}"));
            }
            let pairs: Vec<_> = map.iter().filter(|(s, t)| *s > 0 && *t > 0).collect();
            if pairs.is_empty() {
                return bad("no pair of blocks in the layer map (state 0 has no attention)".into());
            }
            for &&(s, t) in &pairs {
                for (who, model, state) in [("student", student, s), ("teacher", teacher, t)] {
                    if !model.applied(state - 1).self_attn.has_attention_probs() {
                        return bad(format!(
                            "{who} block {} does not use dense softmax attention; attention maps are compared for dense attention only",
                            state - 1
                        ));
                    }
                }
            }
        }
        let (sh, th) = (student.config.hidden_size, teacher.config.hidden_size);
        let device = student.device();
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let projections = (0..map.len())
            .map(|k| {
                (hidden_weight > 0.0 && sh != th).then(|| {
                    let w = (&root / "distill" / "hidden_proj" / k).var("weight", &[th, sh], Init::Const(0.0));
                    let n = sh.min(th);
                    tch::no_grad(|| w.narrow(0, 0, n).narrow(1, 0, n).copy_(&Tensor::eye(n, (Kind::Float, device))));
                    w
                })
            })
            .collect();
        Ok(FeatureLoss { hidden_weight, attention_weight, map, projections, vs })
    }

    /// The default map: student state `i` (1..=Ls) against teacher state `round(i Lt / Ls)`.
    pub fn uniform_map(student_layers: usize, teacher_layers: usize) -> Vec<(usize, usize)> {
        (1..=student_layers).map(|i| (i, ((i * teacher_layers) as f64 / student_layers as f64).round() as usize)).collect()
    }

    /// Parses `s:t,s:t,...` (the states are checked by [`FeatureLoss::new`]).
    pub fn parse_map(spec: &str) -> Result<Vec<(usize, usize)>> {
        let bad = |why: String| DistillError::from(OptionError::new("layer_map", spec, why));
        spec.split(',')
            .map(|pair| {
                let (s, t) = pair.trim().split_once(':').ok_or_else(|| bad(format!("`{pair}` is not STUDENT:TEACHER")))?;
                let number = |x: &str| x.trim().parse::<usize>().map_err(|_| bad(format!("`{x}` is not a number")));
                Ok((number(s)?, number(t)?))
            })
            .collect()
    }

    /// The attention pairs: blocks `s - 1`, `t - 1` of each map pair without an embedding state.
    fn attention_pairs(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.map.iter().filter(|(s, t)| self.attention_weight > 0.0 && *s > 0 && *t > 0).map(|&(s, t)| (s - 1, t - 1))
    }

    /// The teacher's side (run under no_grad by the caller): its states and attention maps
    /// averaged into `student_heads` groups.
    fn teacher_features(&self, teacher: &DecoderModel, pass: &BlockPass, states: Vec<Tensor>, student_heads: i64) -> TeacherFeatures {
        let attention = self
            .attention_pairs()
            .map(|(_, t)| {
                let logp = teacher.attention_log_probs(t, pass, &states[t])?; // [b, ht, s, s]
                let (b, ht, s, _) = logp.size4().expect("4-d attention");
                let group = ht / student_heads;
                Some(logp.view([b, student_heads, group, s, s]).logsumexp([2], false) - (group as f64).ln())
            })
            .collect();
        TeacherFeatures { states, attention }
    }

    /// `hidden_weight * mean MSE + attention_weight * mean attention KL` over the pairs.
    fn loss(&self, student: &DecoderModel, pass: &BlockPass, states: &[Tensor], teacher: &TeacherFeatures) -> Tensor {
        let mut total = Tensor::zeros([], (Kind::Float, student.device()));
        if self.hidden_weight > 0.0 {
            let terms: Vec<Tensor> = self
                .map
                .iter()
                .zip(&self.projections)
                .map(|(&(s, t), proj)| {
                    let x = match proj {
                        Some(w) => states[s].matmul(&w.tr()),
                        None => states[s].shallow_clone(),
                    };
                    x.mse_loss(&teacher.states[t], tch::Reduction::Mean)
                })
                .collect();
            total += Tensor::stack(&terms, 0).mean(Kind::Float) * self.hidden_weight;
        }
        let terms: Vec<Tensor> = self
            .attention_pairs()
            .zip(&teacher.attention)
            .filter_map(|((s, _), lt)| {
                let ls = student.attention_log_probs(s, pass, &states[s])?;
                let kl = divergence(Divergence::ForwardKl, &lt.as_ref()?.clamp_min(LOG_FLOOR), &ls.clamp_min(LOG_FLOOR), 0.0);
                Some(kl.mean(Kind::Float))
            })
            .collect();
        if !terms.is_empty() {
            total += Tensor::stack(&terms, 0).mean(Kind::Float) * self.attention_weight;
        }
        total
    }
}

/// Where the teacher's targets come from.
pub enum Teacher {
    /// A model run on each batch, without gradients.
    Live(Box<DecoderModel>),
    /// Top-k targets each training batch carries in its extras (a `stlm distill cache`).
    Cached,
}

/// The student trained against a teacher: `(1 - alpha) CE + alpha * logit loss + feature terms`.
pub struct Distiller {
    /// The model being trained.
    pub student: DecoderModel,
    /// The teacher.
    pub teacher: Teacher,
    /// The logit loss.
    pub logit: LogitLoss,
    /// Weight of the logit loss against the next-token cross-entropy.
    pub alpha: f64,
    /// Hidden-state and attention terms, if any.
    pub features: Option<FeatureLoss>,
    /// The byte alignment, for a teacher with another tokenizer.
    pub align: Option<ByteAlignment>,
}

impl Distiller {
    /// Checks that the pieces fit: alpha in [0, 1]; the same vocabulary width unless aligned by
    /// bytes; feature terms and byte alignment only with a live teacher, and not together.
    pub fn new(
        student: DecoderModel,
        teacher: Teacher,
        logit: LogitLoss,
        alpha: f64,
        features: Option<FeatureLoss>,
        align: Option<ByteAlignment>,
    ) -> Result<Self> {
        logit.validate()?;
        if !(0.0..=1.0).contains(&alpha) {
            return Err(OptionError::new("alpha", alpha, "must be in [0, 1]").into());
        }
        if let (Teacher::Live(t), None) = (&teacher, &align) {
            if t.config.vocab_size != student.config.vocab_size {
                return Err(DistillError::Input(format!(
                    "the teacher's vocab_size {} and the student's {} differ: logit losses need one vocabulary",
                    t.config.vocab_size, student.config.vocab_size
                )));
            }
        }
        let cached = matches!(teacher, Teacher::Cached);
        if features.is_some() && cached {
            return Err(DistillError::Input("hidden-state and attention losses need the live teacher (a cache holds only logits)".into()));
        }
        if align.is_some() && (cached || features.is_some()) {
            let why = "works with the live teacher and logit losses only (no cache, hidden-state or attention terms)";
            return Err(OptionError::new("align", "bytes", why).into());
        }
        Ok(Distiller { student, teacher, logit, alpha, features, align })
    }

    /// The teacher's targets (and features when a feature term needs them) for `batch`.
    fn teacher_side(&self, batch: &Batch) -> Result<(TeacherTargets, Option<TeacherFeatures>)> {
        let inputs = &batch.inputs;
        match &self.teacher {
            Teacher::Cached => Ok((TeacherTargets::from_extras(&batch.extras, inputs)?, None)),
            Teacher::Live(t) if self.align.is_some() => {
                let align = self.align.as_ref().expect("checked");
                let _guard = tch::no_grad_guard();
                let aligned = align.align(inputs)?;
                let logits = t.forward(&aligned.teacher_inputs).to_kind(Kind::Float) / self.logit.temperature;
                let log_probs = align.teacher_bytes(&logits.log_softmax(-1, Kind::Float), &aligned);
                Ok((TeacherTargets::Bytes { log_probs, mask: aligned.mask, bucket: align.student_bucket() }, None))
            }
            Teacher::Live(t) => {
                let _guard = tch::no_grad_guard();
                let (logits, features) = match &self.features {
                    Some(f) => {
                        let ResidualStream { pass, states, .. } = t.residual_stream_pass(inputs, Mode::Eval);
                        let last = states.last().expect("the stream has the embeddings");
                        let logits = t.head(&t.norm.forward(last));
                        (logits, Some(f.teacher_features(t, &pass, states, self.student.config.num_attention_heads)))
                    }
                    None => (t.forward(inputs), None),
                };
                Ok((self.logit.teacher_targets(&logits), features))
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
    fn parameters(&self) -> Vec<stlm_core::Parameter> {
        let mut params = self.student.parameters();
        if let Some(f) = &self.features {
            params.extend(stlm_core::module::parameters(f));
        }
        params
    }
    fn step(&self, batch: &Batch, mode: Mode) -> stlm_model::Result<StepOutput> {
        if !mode.is_train() {
            // Validation: the student's own loss, no teacher.
            return self.student.step(batch, mode);
        }
        let (teacher, teacher_features) = self.teacher_side(batch).map_err(|e| ModelError::Input(e.to_string()))?;
        let s = &self.student;
        let (logits, feature_loss, moe) = match (&self.features, &teacher_features) {
            (Some(f), Some(tf)) => {
                let ResidualStream { pass, states, moe } = s.residual_stream_pass(&batch.inputs, mode);
                let last = states.last().expect("the stream has the embeddings");
                (s.head(&s.norm.forward(last)), Some(f.loss(s, &pass, &states, tf)), moe)
            }
            _ => {
                let (logits, moe) = s.forward_mode(&batch.inputs, mode);
                (logits, None, moe)
            }
        };
        let ce = cross_entropy(&logits, &batch.targets, None);
        // Logged: the cross-entropy; trained: (1 - alpha) CE + alpha KD (+ feature terms).
        let mut extra = (self.logit.loss(&logits, &teacher, None) - &ce) * self.alpha;
        if let Some(f) = feature_loss {
            extra += f;
        }
        let updates = s.balance_updates(&moe);
        Ok(StepOutput::with_moe(ce, moe, Some(("distill", extra)), updates))
    }
    fn flops_per_token(&self, seq: i64) -> Option<f64> {
        Some(self.student.flops_per_token(seq)) // the student's training; the teacher's forward is extra
    }
    fn position_nats(&self, inputs: &Tensor, targets: &Tensor) -> stlm_model::Result<Tensor> {
        self.student.position_nats(inputs, targets)
    }
    fn save(&self, dir: &Path, tokenizer: Option<&Path>) -> stlm_model::Result<()> {
        self.student.save(dir, tokenizer)?;
        let vars: Vec<(String, Tensor)> = self.features.iter().flat_map(|f| f.vs.variables()).collect();
        if !vars.is_empty() {
            stlm_core::write_safetensors(&dir.join(PROJECTIONS_FILE), &vars)?;
        }
        Ok(())
    }
    fn load_weights(&self, path: &Path) -> stlm_model::Result<()> {
        // Check the projections before touching any weight.
        let projections = match &self.features {
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

    /// Head width 8: the 32-wide teacher has 4 heads, the 16-wide student 2.
    fn tiny(layers: i64, hidden: i64) -> ModelConfig {
        ModelConfig {
            vocab_size: 30,
            hidden_size: hidden,
            intermediate_size: 2 * hidden,
            num_hidden_layers: layers,
            num_attention_heads: hidden / 8,
            num_key_value_heads: hidden / 8,
            max_position_embeddings: 16,
            ..ModelConfig::llama()
        }
    }

    fn fkl() -> LogitLoss {
        LogitLoss { divergence: Divergence::ForwardKl, temperature: 2.0, skew: 0.1, top_k: None }
    }

    /// The logged loss and the sum of the aux terms of one pass over `batch` in `mode`.
    fn losses_of(d: &Distiller, batch: &Batch, mode: Mode) -> stlm_model::Result<(Tensor, Option<Tensor>)> {
        let out = d.step(batch, mode)?;
        Ok((out.loss, out.aux_losses.into_iter().map(|(_, t)| t).reduce(|a, b| a + b)))
    }

    /// [`losses_of`] a training pass over windows `x` with targets `y` and no extras.
    fn train_loss(d: &Distiller, x: &Tensor, y: &Tensor) -> stlm_model::Result<(Tensor, Option<Tensor>)> {
        losses_of(d, &Batch::new(x.shallow_clone(), y.shallow_clone()), Mode::Train)
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
        let map = FeatureLoss::uniform_map(1, 2);
        assert_eq!(map, vec![(1, 2)]);
        let features = FeatureLoss::new(0.3, 0.2, map, &student, &teacher).unwrap();
        let d = Distiller::new(student, Teacher::Live(Box::new(teacher)), fkl(), 0.25, Some(features), None).unwrap();
        let (ce, extra) = train_loss(&d, &x, &y).unwrap();
        let want_ce = cross_entropy(&s_logits, &y, None).double_value(&[]);
        let kd = fkl().loss(&s_logits, &fkl().teacher_targets(&t_logits), None).double_value(&[]);
        let Teacher::Live(t) = &d.teacher else { unreachable!() };
        let ts = t.residual_stream(&x);
        let ss = d.student.residual_stream(&x);
        let proj = ss[1].narrow(2, 0, 16);
        // The projection starts as the identity into the teacher's leading 16 dimensions.
        let padded = Tensor::cat(&[proj, Tensor::zeros([2, 6, 16], (Kind::Float, Device::Cpu))], 2);
        let mse = padded.mse_loss(&ts[2], tch::Reduction::Mean).double_value(&[]);
        // Attention: teacher block 1's 4 heads averaged in pairs against the student's block 0.
        let tp = t.residual_stream_pass(&x, Mode::Eval).pass;
        let sp = d.student.residual_stream_pass(&x, Mode::Eval).pass;
        let pt = t.attention_log_probs(1, &tp, &ts[1]).unwrap().exp().to_kind(Kind::Double).view([2, 2, 2, 6, 6]).mean_dim(2, false, Kind::Double);
        let ls = d.student.attention_log_probs(0, &sp, &ss[0]).unwrap().to_kind(Kind::Double);
        let terms = (&pt * (pt.clamp_min(1e-300).log() - ls.clamp_min(-1e4))).where_self(&pt.gt(0.0), &pt.zeros_like());
        let att = terms.sum_dim_intlist(-1, false, Kind::Double).mean(Kind::Double).double_value(&[]);
        assert!(att > 0.0);
        let total = ce.double_value(&[]) + extra.unwrap().double_value(&[]);
        assert!((ce.double_value(&[]) - want_ce).abs() < 1e-6);
        let want = 0.75 * want_ce + 0.25 * kd + 0.3 * mse + 0.2 * att;
        assert!((total - want).abs() < 1e-5, "{total} vs {want}");
        // Gradients reach the projection; the teacher gets none.
        let (ce, extra) = train_loss(&d, &x, &y).unwrap();
        (ce + extra.unwrap()).backward();
        let vars = d.parameters();
        let proj = vars.iter().find(|p| p.name.starts_with("distill.hidden_proj.0")).expect("projection is trainable");
        assert!(proj.tensor.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
        assert!(t.var_store().variables().values().all(|v| !v.grad().defined()));
        let _guard = tch::no_grad_guard();
        let (val, extra) = losses_of(&d, &Batch::new(x.shallow_clone(), y.shallow_clone()), Mode::Eval).unwrap();
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
            let features = FeatureLoss::new(1.0, 0.0, vec![(1, 2)], &student, &teacher).unwrap();
            Distiller::new(student, Teacher::Live(Box::new(teacher)), fkl(), 0.5, Some(features), None).unwrap()
        };
        let a = make();
        tch::no_grad(|| {
            for (_, mut v) in a.features.as_ref().unwrap().vs.variables() {
                let _ = v.fill_(0.5);
            }
        });
        a.save(dir.path(), None).unwrap();
        let b = make();
        b.load_weights(&dir.path().join("model.safetensors")).unwrap();
        let w = &b.features.as_ref().unwrap().vs.variables()["distill.hidden_proj.0.weight"];
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
        // Cached targets are top-k (what a cache stores), carried in the batch's extras.
        let top = LogitLoss { top_k: Some(8), ..fkl() };
        let d = Distiller::new(student, Teacher::Cached, top, 1.0, None, None).unwrap();
        let x = Tensor::randint(30, [1, 4], (Kind::Int64, Device::Cpu));
        let logits = Tensor::randn([1, 4, 30], (Kind::Float, Device::Cpu));
        let with_targets = |inputs: &Tensor| {
            let mut batch = Batch::new(inputs.copy(), inputs.copy());
            top.teacher_targets(&logits).into_extras(&mut batch.extras).unwrap();
            batch
        };
        let (ce, extra) = losses_of(&d, &with_targets(&x), Mode::Train).unwrap();
        let s = d.student.forward(&x);
        let kd = top.loss(&s, &top.teacher_targets(&logits), None).double_value(&[]);
        assert!((ce.double_value(&[]) + extra.unwrap().double_value(&[]) - kd).abs() < 1e-5);
        assert!(train_loss(&d, &x, &x).unwrap_err().to_string().contains("no cached teacher targets"));
        // Targets of 4 positions with windows of 3.
        let mut short = with_targets(&x);
        short.inputs = x.narrow(1, 0, 3);
        assert!(losses_of(&d, &short, Mode::Train).unwrap_err().to_string().contains("another batch"));
        assert!(fkl().teacher_targets(&logits).into_extras(&mut short.extras).is_err(), "full targets stay with a live teacher");
        let e = Distiller::new(DecoderModel::new(tiny(1, 16), Device::Cpu).unwrap(), Teacher::Cached, fkl(), 1.5, None, None);
        assert!(matches!(e.err().unwrap(), DistillError::Option(OptionError { name: "alpha", .. })));
    }

    #[test]
    fn feature_terms_name_what_does_not_fit() {
        let _g = crate::tests::RNG.lock();
        let teacher = DecoderModel::new(tiny(2, 32), Device::Cpu).unwrap();
        let three = DecoderModel::new(ModelConfig { num_attention_heads: 3, num_key_value_heads: 3, hidden_size: 24, ..tiny(1, 16) }, Device::Cpu).unwrap();
        let e = FeatureLoss::new(0.0, 1.0, vec![(1, 2)], &three, &teacher).err().unwrap().to_string();
        assert!(e.contains("not a multiple"), "{e}");
        let student = DecoderModel::new(tiny(1, 16), Device::Cpu).unwrap();
        let e = FeatureLoss::new(0.0, 1.0, vec![(0, 0)], &student, &teacher).err().unwrap().to_string();
        assert!(e.contains("no pair of blocks"), "{e}");
        let e = FeatureLoss::new(1.0, 0.0, vec![(2, 1)], &student, &teacher).err().unwrap().to_string();
        assert!(e.starts_with("`layer_map` 2:1: "), "{e}");
        let window = ModelConfig::from_toml_str(
            "model_type = \"stlm\"\nvocab_size = 30\nhidden_size = 16\nintermediate_size = 32\nnum_hidden_layers = 1\nnum_attention_heads = 2\nmax_position_embeddings = 16\nattention = [{ kind = \"sliding-window\", window = 4 }]\n",
            Path::new("w.toml"),
        )
        .unwrap();
        let windowed = DecoderModel::new(window, Device::Cpu).unwrap();
        let e = FeatureLoss::new(0.0, 1.0, vec![(1, 1)], &windowed, &teacher).err().unwrap().to_string();
        assert!(e.contains("student block 0"), "{e}");
        assert!(FeatureLoss::parse_map("1:x").unwrap_err().to_string().contains("`x`"));
    }

    #[test]
    fn byte_alignment_compares_next_bytes_and_vanishes_for_the_same_model() {
        let _g = crate::tests::RNG.lock();
        tch::manual_seed(12);
        let bytes = stlm_tokenizers::Tokenizer::bytes();
        let cfg = ModelConfig { vocab_size: 258, ..tiny(1, 16) };
        let teacher = DecoderModel::new(cfg.clone(), Device::Cpu).unwrap();
        let student = DecoderModel::new(cfg, Device::Cpu).unwrap();
        crate::copy_from_teacher(&student, &teacher, &[0]).unwrap();
        let align = ByteAlignment::new(&bytes, 258, stlm_tokenizers::Tokenizer::bytes(), 258, 16, Device::Cpu).unwrap();
        let d = Distiller::new(student, Teacher::Live(Box::new(teacher)), fkl(), 1.0, None, Some(align)).unwrap();
        let x = Tensor::from_slice(&b"the fox".map(i64::from)).view([1, 7]);
        let (ce, extra) = train_loss(&d, &x, &x).unwrap();
        let kd = ce.double_value(&[]) + extra.unwrap().double_value(&[]);
        assert!(kd.abs() < 1e-5, "the same model: {kd}");
        // A different student: a positive loss, and a cache or feature terms are refused.
        let other = DecoderModel::new(ModelConfig { vocab_size: 258, ..tiny(1, 16) }, Device::Cpu).unwrap();
        let Teacher::Live(t) = d.teacher else { unreachable!() };
        let align = || ByteAlignment::new(&bytes, 258, stlm_tokenizers::Tokenizer::bytes(), 258, 16, Device::Cpu).unwrap();
        let d = Distiller::new(other, Teacher::Live(t), fkl(), 1.0, None, Some(align())).unwrap();
        let (ce, extra) = train_loss(&d, &x, &x).unwrap();
        assert!(ce.double_value(&[]) + extra.unwrap().double_value(&[]) > 1e-4);
        let e = Distiller::new(d.student, Teacher::Cached, fkl(), 1.0, None, Some(align())).err().unwrap();
        assert!(e.to_string().starts_with("`align` bytes: "), "{e}");
    }
}
