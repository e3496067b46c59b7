//! Which parameters weight generation learns: `--layers 'norm,layers.3.mlp'`.
//!
//! A spec is a comma-separated list of patterns; a parameter is selected when any pattern matches
//! its name (the model's variable name, Hugging Face's: `model.layers.3.mlp.up_proj.weight`):
//! - `norm`: every normalisation layer's parameters (role `Norm` in the model's layer walk:
//!   `input_layernorm`, `post_attention_layernorm`, q/k norms, the final `model.norm`);
//! - `last`: the last block (`layers.{L-1}`);
//! - anything else: a run of whole dot-separated name segments, e.g. `layers.3.mlp` selects
//!   `model.layers.3.mlp.gate_proj.weight` but not `model.layers.13.mlp...`; `*` stands for any
//!   one segment (`layers.*.mlp.down_proj`).
//!
//! Every pattern must select something, so a typo is an error, not an empty selection.

use crate::WeightgenError;
use stlm_core::{OptionError, Role};

/// A parsed `--layers` spec.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSelector {
    spec: String,
    patterns: Vec<Pattern>,
}

#[derive(Debug, Clone, PartialEq)]
enum Pattern {
    Norm,
    Last,
    Segments(Vec<String>),
}

impl LayerSelector {
    /// Parses `spec`; an empty spec or an empty pattern is an error naming it.
    pub fn parse(spec: &str) -> Result<Self, WeightgenError> {
        let mut patterns = Vec::new();
        for raw in spec.split(',') {
            let p = raw.trim();
            if p.is_empty() {
                return Err(OptionError::new("layers", format!("`{spec}`"), "an empty pattern (between commas)").into());
            }
            patterns.push(match p {
                "norm" => Pattern::Norm,
                "last" => Pattern::Last,
                _ => {
                    let segs: Vec<String> = p.split('.').map(str::to_string).collect();
                    if segs.iter().any(String::is_empty) {
                        return Err(OptionError::new("layers", format!("pattern `{p}`"), "an empty name segment").into());
                    }
                    Pattern::Segments(segs)
                }
            });
        }
        Ok(LayerSelector { spec: spec.to_string(), patterns })
    }

    /// The spec as given.
    pub fn spec(&self) -> &str {
        &self.spec
    }

    /// The selected names among `params` (a model's parameters with their roles, whose blocks
    /// number `num_layers`), in the order given. Errors when a pattern selects nothing.
    pub fn select<'a>(
        &self,
        params: impl IntoIterator<Item = (&'a str, Role)>,
        num_layers: usize,
    ) -> Result<Vec<String>, WeightgenError> {
        let params: Vec<(&str, Role)> = params.into_iter().collect();
        let names: Vec<&str> = params.iter().map(|(n, _)| *n).collect();
        let mut used = vec![false; self.patterns.len()];
        let mut out = Vec::new();
        for (name, role) in &params {
            let mut hit = false;
            for (i, p) in self.patterns.iter().enumerate() {
                if p.matches(name, *role, num_layers) {
                    used[i] = true;
                    hit = true;
                }
            }
            if hit {
                out.push(name.to_string());
            }
        }
        if let Some(i) = used.iter().position(|u| !u) {
            let pattern = self.spec.split(',').nth(i).unwrap_or_default().trim();
            let like = names.iter().find(|n| n.contains("layers.")).or(names.first()).copied().unwrap_or("");
            let why = format!("selects no parameter of the model (names look like `{like}`)");
            return Err(OptionError::new("layers", format!("pattern `{pattern}`"), why).into());
        }
        Ok(out)
    }
}

impl Pattern {
    fn matches(&self, name: &str, role: Role, num_layers: usize) -> bool {
        let segs: Vec<&str> = name.split('.').collect();
        match self {
            Pattern::Norm => role == Role::Norm,
            Pattern::Last => {
                num_layers > 0 && contains_run(&segs, &["layers".to_string(), (num_layers - 1).to_string()])
            }
            Pattern::Segments(want) => contains_run(&segs, want),
        }
    }
}

/// Whether `want` appears as consecutive whole segments of `segs` (`*` matches any segment).
fn contains_run(segs: &[&str], want: &[String]) -> bool {
    want.len() <= segs.len() && segs.windows(want.len()).any(|w| w.iter().zip(want).all(|(s, p)| p == "*" || s == p))
}

/// The block index of a parameter name (`...layers.{i}...`), if it is inside a block.
pub fn block_index(name: &str) -> Option<usize> {
    let segs: Vec<&str> = name.split('.').collect();
    segs.windows(2).find(|w| w[0] == "layers" || w[0] == "h").and_then(|w| w[1].parse().ok())
}

/// A parameter's type: its name with the block index replaced by `*`
/// (`model.layers.*.mlp.up_proj.weight`), shared by the same parameter of every block.
pub fn layer_type(name: &str) -> String {
    let segs: Vec<&str> = name.split('.').collect();
    let mut out: Vec<&str> = Vec::with_capacity(segs.len());
    for (i, s) in segs.iter().enumerate() {
        let in_block = i > 0 && (segs[i - 1] == "layers" || segs[i - 1] == "h") && s.parse::<usize>().is_ok();
        out.push(if in_block { "*" } else { s });
    }
    out.join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: [&str; 9] = [
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.input_layernorm.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.11.mlp.up_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.norm.weight",
    ];

    /// The names with the roles a model's walk gives them.
    fn params() -> Vec<(&'static str, Role)> {
        NAMES.iter().map(|&n| (n, if n.contains("norm") { Role::Norm } else if n.contains("embed") { Role::Embedding } else { Role::Matrix })).collect()
    }

    fn pick(spec: &str) -> Vec<String> {
        LayerSelector::parse(spec).unwrap().select(params(), 12).unwrap()
    }

    #[test]
    fn patterns_match_whole_segments() {
        assert_eq!(
            pick("norm"),
            ["model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight", "model.norm.weight"]
        );
        assert_eq!(pick("layers.1.mlp"), ["model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"]);
        assert_eq!(pick("layers.*.mlp.up_proj").len(), 3);
        assert_eq!(pick("last"), ["model.layers.11.mlp.up_proj.weight"]);
        // A name selected by two patterns appears once, in model order.
        assert_eq!(pick("layers.1.mlp.down_proj,norm").len(), 4);
        assert_eq!(
            pick("norm,layers.1.mlp")[..2],
            ["model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight"]
        );
    }

    #[test]
    fn a_pattern_that_selects_nothing_is_an_error() {
        let err = LayerSelector::parse("norm,layers.3.mpl").unwrap().select(params(), 12).unwrap_err().to_string();
        assert!(err.contains("layers.3.mpl") && err.contains("model.layers.0"), "{err}");
        assert!(LayerSelector::parse("norm,,x").unwrap_err().to_string().contains("empty pattern"));
        assert!(LayerSelector::parse("layers..mlp").is_err());
    }

    #[test]
    fn block_index_and_type() {
        assert_eq!(block_index("model.layers.11.mlp.up_proj.weight"), Some(11));
        assert_eq!(block_index("model.norm.weight"), None);
        assert_eq!(layer_type("model.layers.11.mlp.up_proj.weight"), "model.layers.*.mlp.up_proj.weight");
        assert_eq!(layer_type("transformer.h.2.ln_1.weight"), "transformer.h.*.ln_1.weight");
    }
}
