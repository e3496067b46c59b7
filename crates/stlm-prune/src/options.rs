//! What an unstructured prune is asked to do: the scoring method and the options (a leaf: it
//! imports the mask patterns and SparseGPT's settings, nothing that prunes).

use crate::mask::{Pattern, Scope};
use crate::sparsegpt::SparseGptOptions;
use crate::{PruneError, Result};
use serde::Serialize;
use stlm_core::OptionError;
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

