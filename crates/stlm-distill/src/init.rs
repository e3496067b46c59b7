//! A student's first weights taken from its teacher: a subset of the teacher's blocks
//! (DistilBERT kept every second layer), each tensor cut to the student's leading dimensions
//! when the student is narrower.

use crate::{DistillError, Result};
use std::collections::HashMap;
use stlm_core::module::parameters;
use stlm_core::{OptionError, Parameter};
use stlm_model::DecoderModel;

/// Which teacher blocks the student's blocks start from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerChoice {
    /// Random initialisation (nothing copied).
    Random,
    /// Teacher blocks 0, k, 2k, ...
    Every(usize),
    /// These teacher blocks, in order.
    Layers(Vec<usize>),
}

impl std::str::FromStr for LayerChoice {
    type Err = DistillError;
    /// `random`, `every:K` or `layers:0,2,4`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            DistillError::from(OptionError::new("init", s, format!("{why}; expected random, every:K or layers:0,2,4")))
        };
        if s == "random" {
            return Ok(LayerChoice::Random);
        }
        if let Some(k) = s.strip_prefix("every:") {
            let k: usize = k.parse().map_err(|_| bad("K is not a number"))?;
            return if k == 0 { Err(bad("K must be at least 1")) } else { Ok(LayerChoice::Every(k)) };
        }
        if let Some(list) = s.strip_prefix("layers:") {
            let layers = list.split(',').map(|x| x.trim().parse::<usize>()).collect::<std::result::Result<Vec<_>, _>>();
            return match layers {
                Ok(l) if !l.is_empty() => Ok(LayerChoice::Layers(l)),
                _ => Err(bad("the layer list is not a comma-separated list of numbers")),
            };
        }
        Err(bad("unknown form"))
    }
}

impl LayerChoice {
    /// The teacher block of each student block, given both depths; errors when the choice and
    /// the student's depth disagree or a block does not exist.
    pub fn teacher_layers(&self, teacher_layers: usize, student_layers: usize) -> Result<Vec<usize>> {
        let layers: Vec<usize> = match self {
            LayerChoice::Random => return Ok(Vec::new()),
            LayerChoice::Every(k) => (0..teacher_layers).step_by(*k).collect(),
            LayerChoice::Layers(l) => l.clone(),
        };
        if let Some(&bad) = layers.iter().find(|&&l| l >= teacher_layers) {
            let why = format!("teacher layer {bad} does not exist (the teacher has {teacher_layers})");
            return Err(OptionError::no_value("init", why).into());
        }
        if layers.len() != student_layers {
            let why = format!(
                "picks {} teacher layers ({layers:?}) but the student has num_hidden_layers = {student_layers}",
                layers.len()
            );
            return Err(OptionError::no_value("init", why).into());
        }
        Ok(layers)
    }
}

/// Copies into every `student` tensor its counterpart in `teacher` (student block j <- teacher
/// block `layers[j]`, paired through the layer walk; the rest by its place outside the blocks),
/// cut to the student's leading dimensions. Errors name the parameter when the teacher lacks it
/// or the student is larger in a dimension. Returns how many tensors were cut.
pub fn copy_from_teacher(student: &DecoderModel, teacher: &DecoderModel, layers: &[usize]) -> Result<usize> {
    let _guard = tch::no_grad_guard();
    // Each part of the student (outside the blocks, block j) with the teacher's part it copies
    // (outside the blocks, block `layers[j]`), tensors named by their place in the part.
    let named = |ps: Vec<Parameter>| ps.into_iter().map(|p| (p.name, p.tensor)).collect::<HashMap<_, _>>();
    let mut parts = vec![(String::new(), String::new(), student.outside_blocks(), named(teacher.outside_blocks()))];
    for (j, l) in student.layers.iter().enumerate() {
        let t = layers.get(j).copied().unwrap_or(j);
        let theirs = teacher.layers.get(t).map_or_else(HashMap::new, |b| named(parameters(b)));
        parts.push((format!("model.layers.{j}."), format!("model.layers.{t}."), parameters(l), theirs));
    }
    let mut plan = Vec::new();
    for (prefix, teacher_prefix, ours, theirs) in &parts {
        for Parameter { name: place, tensor: var, .. } in ours {
            let (name, source) = (format!("{prefix}{place}"), format!("{teacher_prefix}{place}"));
            let t = theirs.get(place).ok_or_else(|| {
                let why = format!(
                    "student parameter `{name}` has no teacher counterpart `{source}`: the architectures differ; start from a random initialisation (init random)"
                );
                DistillError::from(OptionError::no_value("init", why))
            })?;
            let (want, have) = (var.size(), t.size());
            if want.len() != have.len() || want.iter().zip(&have).any(|(w, h)| w > h) {
                return Err(DistillError::Input(format!(
                    "student parameter `{name}` {want:?} does not fit in teacher `{source}` {have:?}: a student may only be narrower"
                )));
            }
            plan.push((var, t, want != have));
        }
    }
    let mut cut = 0;
    for (var, t, narrower) in plan {
        let mut piece = t.shallow_clone();
        for (dim, &n) in var.size().iter().enumerate() {
            piece = piece.narrow(dim as i64, 0, n);
        }
        var.shallow_clone().copy_(&piece.to_kind(var.kind()).to_device(var.device()));
        cut += narrower as usize;
    }
    Ok(cut)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stlm_model::{DecoderModel, ModelConfig};
    use tch::{Device, Kind, Tensor};

    fn tiny(layers: i64, hidden: i64, inter: i64, heads: i64) -> ModelConfig {
        ModelConfig {
            vocab_size: 40,
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: heads,
            max_position_embeddings: 16,
            ..ModelConfig::llama()
        }
    }

    fn vars(m: &DecoderModel) -> Vec<(String, Tensor)> {
        m.var_store().variables().into_iter().collect()
    }

    #[test]
    fn parses_choices_and_names_bad_ones() {
        assert_eq!("every:2".parse::<LayerChoice>().unwrap(), LayerChoice::Every(2));
        assert_eq!("layers:0, 2,4".parse::<LayerChoice>().unwrap(), LayerChoice::Layers(vec![0, 2, 4]));
        assert_eq!("random".parse::<LayerChoice>().unwrap(), LayerChoice::Random);
        for bad in ["every:0", "every:x", "layers:", "layers:1,a", "half"] {
            assert!(bad.parse::<LayerChoice>().unwrap_err().to_string().contains(bad), "{bad}");
        }
        assert!(matches!("half".parse::<LayerChoice>(), Err(DistillError::Option(OptionError { name: "init", .. }))));
        assert_eq!(LayerChoice::Every(2).teacher_layers(6, 3).unwrap(), vec![0, 2, 4]);
        assert!(LayerChoice::Every(2).teacher_layers(6, 2).unwrap_err().to_string().contains("num_hidden_layers = 2"));
        assert!(LayerChoice::Layers(vec![0, 7]).teacher_layers(6, 2).unwrap_err().to_string().contains("layer 7"));
    }

    #[test]
    fn every_second_layer_gives_the_teacher_with_those_blocks() {
        let _g = crate::tests::RNG.lock();
        tch::manual_seed(1);
        let teacher = DecoderModel::new(tiny(4, 32, 64, 4), Device::Cpu).unwrap();
        let student = DecoderModel::new(tiny(2, 32, 64, 4), Device::Cpu).unwrap();
        let layers = LayerChoice::Every(2).teacher_layers(4, 2).unwrap();
        assert_eq!(copy_from_teacher(&student, &teacher, &layers).unwrap(), 0);
        // The student computes exactly blocks 0 and 2 of the teacher.
        let ids = Tensor::from_slice(&[3i64, 9, 1, 30, 7]).view([1, 5]);
        let tp = teacher.block_pass(&ids);
        let x = teacher.run_block(2, &tp, &teacher.run_block(0, &tp, &tp.input));
        let want = teacher.head(&teacher.norm.forward(&x));
        let got = student.forward(&ids);
        assert!(got.allclose(&want, 1e-5, 1e-5, false));
    }

    #[test]
    fn narrower_students_take_leading_dimensions_and_wider_ones_are_refused() {
        let _g = crate::tests::RNG.lock();
        tch::manual_seed(2);
        let teacher = DecoderModel::new(tiny(2, 32, 64, 4), Device::Cpu).unwrap();
        let t: HashMap<String, Tensor> = vars(&teacher).into_iter().collect();
        let student = DecoderModel::new(tiny(1, 16, 24, 2), Device::Cpu).unwrap();
        let cut = copy_from_teacher(&student, &teacher, &[1]).unwrap();
        assert!(cut > 0);
        let s: HashMap<String, Tensor> = vars(&student).into_iter().collect();
        let q = &s["model.layers.0.self_attn.q_proj.weight"];
        assert_eq!(q.size(), vec![16, 16]);
        let tq = t["model.layers.1.self_attn.q_proj.weight"].narrow(0, 0, 16).narrow(1, 0, 16);
        assert!(q.equal(&tq));
        assert!(s["model.embed_tokens.weight"].equal(&t["model.embed_tokens.weight"].narrow(1, 0, 16)));
        let wide = DecoderModel::new(tiny(1, 48, 64, 4), Device::Cpu).unwrap();
        let e = copy_from_teacher(&wide, &teacher, &[0]).unwrap_err().to_string();
        assert!(e.contains("only be narrower"), "{e}");
        let _ = Kind::Float;
    }
}
