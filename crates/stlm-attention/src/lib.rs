//! stlm-attention: attention kernels, position encodings, masks and the KV cache.
//!
//! Tensors use the layout `[batch, heads, seq, head_dim]` for queries, keys and values. The dense
//! causal kernel is the baseline every other variant is compared against; it calls libtorch's
//! `scaled_dot_product_attention` (with grouped-query heads through `enable_gqa`).
//! [`sliding_window_attention`] is the local-window variant (with optional global tokens),
//! computed by blocks in O(n·w); [`fixed_sparse_attention`] is the fixed pattern of Sparse
//! Transformers, computed block-sparse. [`AttentionKind`] is the one interface over all of them that
//! model configs name per layer, for training over a full sequence and for cached decoding.

pub mod cache;
pub mod dense;
pub mod dma;
pub mod kind;
pub mod linformer;
pub mod mask;
pub mod positions;
pub mod rope;
pub mod scores;
pub mod sliding;
pub mod sparse;
#[cfg(test)]
mod testing;

pub use cache::{CachedKeys, KvCache};
pub use dense::{dense_attention, naive_attention};
pub use dma::{dynamic_mask, dynamic_mask_attention};
pub use kind::{Attention, AttentionKind, Build, Given, GivenTensors, KernelTensors, KindSettings, Learned, Settings, ATTENTION_KINDS};
pub use linformer::{linformer_attention, LinformerProjection, LinformerSharing};
pub use mask::AttentionMask;
pub use positions::{alibi_mask, alibi_slope_tensor, alibi_slopes, sinusoidal_positions};
pub use rope::{apply_rotary, Rope, RopeScaling};
pub use scores::{power_attention, ssmax_attention, temperature_attention};
pub use sliding::{sliding_window_attention, sliding_window_mask};
pub use sparse::{fixed_sparse_attention, fixed_sparse_mask, strided_sparse_attention, strided_sparse_mask};
