//! Per-layer shapes and the residual stream's start: layers whose stream width, feed-forward
//! width, heads and context window differ with depth (a list, a pattern, or the brainstorm's
//! `diamond` and context patterns), and a learned residual root.
//!
//! A layer whose width differs from the stream it receives starts with a learned projection
//! (`model.layers.{i}.in_proj`); a last layer narrower or wider than the embedding ends in
//! `model.out_proj`, so the embedding, final norm and head keep `hidden_size`. Every layer keeps
//! the model's head width, so one rotary table serves all of them.

use serde::{Deserialize, Serialize};

/// Widths rising linearly from `hidden_size` at the first and last layer to a maximum at the
/// middle one(s), rounded to whole heads (and whole key/value groups).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Diamond {
    /// Stream width of the middle layer(s).
    pub max_hidden_size: i64,
}

/// Sliding windows short in the first and last layers and long in the middle ones: the window
/// grows geometrically from `min_window` to `max_window` and back (a layer whose window reaches
/// `max_position_embeddings` is dense).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextPattern {
    /// Window of the first and last layers.
    pub min_window: i64,
    /// Window of the middle layer(s).
    pub max_window: i64,
}

/// Shapes that differ per layer (the `[model.layer_shapes]` table). Each list has one entry per
/// layer or is a pattern repeated over the layers (its length divides `num_hidden_layers`); an
/// empty list follows the others: feed-forward width in proportion to the stream width (the
/// model's `intermediate_size / hidden_size`), heads as the width over `head_dim`, key/value
/// heads in the model's ratio.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerShapes {
    /// Stream width of each layer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hidden_size: Vec<i64>,
    /// Feed-forward width of each layer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub intermediate_size: Vec<i64>,
    /// Query heads of each layer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub num_attention_heads: Vec<i64>,
    /// Key/value heads of each layer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub num_key_value_heads: Vec<i64>,
    /// Stream widths from the diamond pattern (instead of `hidden_size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diamond: Option<Diamond>,
    /// Sliding windows from the context pattern (instead of the model's `attention` list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<ContextPattern>,
}

/// How the first layer's input mixes the learned root with the token embedding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RootMix {
    /// `root + E[token]`.
    #[default]
    Add,
    /// `(1 - σ(g)) ⊙ root + σ(g) ⊙ E[token]` with a learned per-channel gate `g` (starts at 0).
    Gate,
}

/// A learned vector the residual stream starts from (the `[model.residual_root]` table), mixed
/// with the (projected, when `width` differs) token embedding.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResidualRoot {
    /// Width of the root and of the stream it starts (`hidden_size` when absent); another width
    /// projects the embedding (`model.residual_root.embed_proj`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<i64>,
    /// How root and embedding mix.
    #[serde(default)]
    pub mix: RootMix,
}

/// The resolved shape of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerShape {
    /// Stream width.
    pub hidden_size: i64,
    /// Feed-forward width.
    pub intermediate_size: i64,
    /// Query heads.
    pub num_attention_heads: i64,
    /// Key/value heads.
    pub num_key_value_heads: i64,
}

/// Where layer `i` of `layers` sits between the ends (0) and the middle (1): `min(i, L-1-i)`
/// over its largest value, so both middle layers of an even stack reach 1.
pub fn rise(i: usize, layers: usize) -> f64 {
    let top = layers.saturating_sub(1) / 2;
    if top == 0 {
        return 0.0;
    }
    i.min(layers - 1 - i) as f64 / top as f64
}

/// Entry `i` of a per-layer list or pattern (`None` when empty).
pub fn entry(list: &[i64], i: usize) -> Option<i64> {
    (!list.is_empty()).then(|| list[i % list.len()])
}

impl Diamond {
    /// Width of layer `i` of `layers`: `base` to `max_hidden_size` by [`rise`], rounded to a
    /// multiple of `unit` (at least one unit).
    pub fn width(&self, base: i64, unit: i64, i: usize, layers: usize) -> i64 {
        let w = base as f64 + (self.max_hidden_size - base) as f64 * rise(i, layers);
        ((w / unit as f64).round() as i64).max(1) * unit
    }
}

impl ContextPattern {
    /// Window of layer `i` of `layers`: `min_window · (max_window / min_window)^rise`, rounded.
    pub fn window(&self, i: usize, layers: usize) -> i64 {
        let ratio = self.max_window as f64 / self.min_window as f64;
        (self.min_window as f64 * ratio.powf(rise(i, layers))).round() as i64
    }

    /// Checks the fields; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.min_window < 1 || self.max_window < self.min_window {
            return Err(format!(
                "`context` needs 1 <= min_window <= max_window, got {} and {}",
                self.min_window, self.max_window
            ));
        }
        Ok(())
    }
}

impl LayerShapes {
    /// Checks what does not need the model: list lengths against `layers`, positive entries;
    /// the error names the field.
    pub fn validate(&self, layers: i64) -> Result<(), String> {
        for (name, list) in [
            ("hidden_size", &self.hidden_size),
            ("intermediate_size", &self.intermediate_size),
            ("num_attention_heads", &self.num_attention_heads),
            ("num_key_value_heads", &self.num_key_value_heads),
        ] {
            let n = list.len() as i64;
            if n > 0 && layers % n != 0 {
                return Err(format!("`{name}`: {n} entries cannot repeat over {layers} layers (give one per layer or a divisor)"));
            }
            if let Some(v) = list.iter().find(|&&v| v <= 0) {
                return Err(format!("`{name}`: entries must be positive, got {v}"));
            }
        }
        if self.diamond.is_some() && !self.hidden_size.is_empty() {
            return Err("`diamond` and `hidden_size`: give the widths one way".into());
        }
        if let Some(c) = &self.context {
            c.validate()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_peaks_in_the_middle() {
        let r: Vec<f64> = (0..5).map(|i| rise(i, 5)).collect();
        assert_eq!(r, vec![0.0, 0.5, 1.0, 0.5, 0.0]);
        let r: Vec<f64> = (0..4).map(|i| rise(i, 4)).collect();
        assert_eq!(r, vec![0.0, 1.0, 1.0, 0.0]);
        assert_eq!(rise(0, 1), 0.0);
        assert_eq!(rise(1, 2), 0.0);
    }

    #[test]
    fn diamond_and_context_follow_the_pattern() {
        let d = Diamond { max_hidden_size: 256 };
        let w: Vec<i64> = (0..5).map(|i| d.width(128, 32, i, 5)).collect();
        assert_eq!(w, vec![128, 192, 256, 192, 128]);
        let w: Vec<i64> = (0..4).map(|i| d.width(128, 48, i, 4)).collect();
        assert_eq!(w, vec![144, 240, 240, 144], "rounded to whole units");
        let c = ContextPattern { min_window: 16, max_window: 256 };
        let win: Vec<i64> = (0..5).map(|i| c.window(i, 5)).collect();
        assert_eq!(win, vec![16, 64, 256, 64, 16]);
        assert!(ContextPattern { min_window: 8, max_window: 4 }.validate().unwrap_err().contains("min_window"));
    }

    #[test]
    fn lists_are_checked() {
        let s = LayerShapes { hidden_size: vec![64, 96, 64], ..Default::default() };
        assert!(s.validate(3).is_ok());
        assert!(s.validate(4).unwrap_err().contains("hidden_size"));
        let s = LayerShapes { intermediate_size: vec![0], ..Default::default() };
        assert!(s.validate(2).unwrap_err().contains("positive"));
        let s = LayerShapes { hidden_size: vec![64], diamond: Some(Diamond { max_hidden_size: 96 }), ..Default::default() };
        assert!(s.validate(2).unwrap_err().contains("diamond"));
    }
}
