//! stlm's own type (`model_type: "stlm"`): `config.json` holds the whole [`ModelConfig`] and the
//! weights keep stlm's names, so any combination saves; transformers cannot load it.

use super::{parse, Family};
use crate::config::{ModelConfig, ModelType};
use crate::Result;
use serde_json::Value;
use std::path::Path;

/// Any config transformers has no class for.
pub(super) struct Stlm;

impl Family for Stlm {
    fn model_type(&self) -> ModelType {
        ModelType::Stlm
    }

    fn name(&self) -> &'static str {
        "stlm"
    }

    fn config_from_json(&self, value: Value, path: &Path) -> Result<ModelConfig> {
        parse(value, path)
    }

    fn config_to_json(&self, c: &ModelConfig) -> Value {
        serde_json::to_value(c).expect("a ModelConfig always serializes")
    }
}
