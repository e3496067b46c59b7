//! What an unstructured prune is asked to do: the scoring method and the options (a leaf: it
//! imports the mask patterns and SparseGPT's settings, nothing that prunes).

use crate::mask::{Pattern, Scope};
use crate::sparsegpt::SparseGptOptions;
use crate::{PruneError, Result};
use serde::Serialize;
use stlm_core::OptionError;
use clap::builder::TypedValueParser;
use stlm_model::linears::Projection;

/// How weights are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// `|W|`.
    Magnitude,
    /// `|W_ij| * ||X_j||` (Sun et al. 2023), compared within each output row by default.
    Wanda,
    /// Optimal Brain Surgeon reconstruction (Frantar & Alistarh 2023), see [`crate::sparsegpt`].
    #[value(name = "sparsegpt")]
    SparseGpt,
}

impl std::str::FromStr for Method {
    type Err = PruneError;
    fn from_str(s: &str) -> Result<Self> {
        [Method::Magnitude, Method::Wanda, Method::SparseGpt]
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| OptionError::new("method", s, "expected magnitude, wanda or sparsegpt").into())
    }
}

impl Method {
    /// The name `--method` takes.
    pub fn name(self) -> &'static str {
        match self {
            Method::Magnitude => "magnitude",
            Method::Wanda => "wanda",
            Method::SparseGpt => "sparsegpt",
        }
    }

    /// Whether the method needs calibration inputs.
    pub fn calibrated(self) -> bool {
        self != Method::Magnitude
    }

    /// The scope a method compares scores in unless told otherwise.
    pub fn default_scope(self) -> Scope {
        match self {
            Method::Magnitude => Scope::Layer,
            Method::Wanda => Scope::Row,
            Method::SparseGpt => Scope::Layer,
        }
    }
}

/// What to prune and how.
#[derive(Debug, Clone, PartialEq)]
pub struct PruneOptions {
    /// Scoring method.
    pub method: Method,
    /// How many weights each matrix loses.
    pub pattern: Pattern,
    /// Where scores compete (fraction patterns; SparseGPT chooses per column block).
    pub scope: Scope,
    /// Projections left dense (every block's, or the head).
    pub skip: Vec<Projection>,
    /// Decoder blocks left dense (by index).
    pub skip_blocks: Vec<usize>,
    /// SparseGPT's block size and damping.
    pub sparsegpt: SparseGptOptions,
}

/// A `--skip` value: a projection, or none.
#[derive(Debug, Clone, Copy)]
pub struct Skip(pub Option<Projection>);

impl Skip {
    /// Parses a projection's name, or `none`.
    pub fn parser() -> impl TypedValueParser<Value = Skip> {
        let names = Projection::ALL.iter().map(|p| p.name()).chain(["none"]);
        clap::builder::PossibleValuesParser::new(names).map(|s| Skip(Projection::ALL.into_iter().find(|p| p.name() == s)))
    }
}

/// How the sparsity is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Schedule {
    /// Prune once.
    OneShot,
    /// Raise the sparsity over `--stages` stages as `s * (1 - (1 - t/stages)^3)` (Zhu & Gupta
    /// 2017), fine-tuning `--stage-steps` steps after each (zeros kept).
    Cubic,
}
