//! Layer weight sharing: blocks applied more than once (MobileLLM's immediate block-wise sharing,
//! ALBERT's all-layer sharing, a recursion depth chosen at run time) and weights tied across
//! blocks (Super Tiny Language Models' shared FFN and shared attention output projection).
//!
//! `num_hidden_layers` counts the blocks that hold weights (`model.layers.{j}`); the model
//! applies `num_hidden_layers · repeats` of them in the order the scheme gives, and its KV cache
//! has one slot per applied layer.

use serde::{Deserialize, Serialize};

/// The order in which stored blocks are applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShareScheme {
    /// Each block `repeats` times in a row, `0 0 1 1 2 2` (MobileLLM's immediate block-wise
    /// sharing: the repeat reuses the weights while they are still in cache).
    #[default]
    Immediate,
    /// The whole stack `repeats` times, `0 1 2 0 1 2` (a recurrent depth; with one block,
    /// ALBERT's all-layer sharing).
    Cycle,
}

/// How decoder blocks share weights (the `[model.layer_sharing]` table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSharing {
    /// Order in which the stored blocks repeat.
    #[serde(default)]
    pub scheme: ShareScheme,
    /// Applications of each stored block (1: each block once); `stlm generate --repeats` and
    /// `stlm eval ppl --repeats` choose another depth at run time.
    #[serde(default = "one")]
    pub repeats: i64,
    /// Every block uses block 0's feed-forward weights (`model.layers.0.mlp`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mlp: bool,
    /// Every block uses block 0's attention output projection (`model.layers.0.self_attn.o_proj`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub o_proj: bool,
    /// Rank of a LoRA delta every applied layer adds to the projections of its block
    /// (`model.lora.{i}`, see [`crate::lora`]); 0: none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lora_rank: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

fn one() -> i64 {
    1
}

impl LayerSharing {
    /// Checks the fields; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.repeats < 1 {
            return Err(format!("`repeats` must be at least 1, got {}", self.repeats));
        }
        if self.lora_rank < 0 {
            return Err(format!("`lora_rank` must be at least 0, got {}", self.lora_rank));
        }
        Ok(())
    }

    /// True when some weights are applied more than once (or carry per-layer deltas).
    pub fn shares(&self) -> bool {
        self.repeats > 1 || self.mlp || self.o_proj || self.lora_rank > 0
    }
}

/// The stored block that applied layer `i` runs (of `blocks · repeats`, in `scheme`'s order).
pub fn block_of(scheme: ShareScheme, blocks: usize, repeats: usize, i: usize) -> usize {
    match scheme {
        ShareScheme::Immediate => i / repeats.max(1),
        ShareScheme::Cycle => i % blocks.max(1),
    }
}

/// The stored block of every applied layer: `blocks · repeats` entries in `scheme`'s order.
pub fn schedule(scheme: ShareScheme, blocks: usize, repeats: usize) -> Vec<usize> {
    (0..blocks * repeats).map(|i| block_of(scheme, blocks, repeats, i)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_the_scheme() {
        assert_eq!(schedule(ShareScheme::Immediate, 3, 2), vec![0, 0, 1, 1, 2, 2]);
        assert_eq!(schedule(ShareScheme::Cycle, 3, 2), vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(schedule(ShareScheme::Cycle, 1, 4), vec![0, 0, 0, 0]);
        assert_eq!(schedule(ShareScheme::Immediate, 2, 1), vec![0, 1]);
    }

    #[test]
    fn repeats_below_one_are_refused() {
        let s = LayerSharing { scheme: ShareScheme::Cycle, repeats: 0, mlp: false, o_proj: false, lora_rank: 0 };
        assert!(s.validate().unwrap_err().contains("repeats"));
    }
}
