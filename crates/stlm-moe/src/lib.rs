//! stlm-moe: mixture-of-experts layers for stlm.
//!
//! - [`router`]: the routers behind one interface ([`RouterKind::route`] turns router logits into
//!   a flat list of (token, expert, weight) assignments): top-k with softmax or sigmoid gates
//!   (Mixtral, Qwen-MoE's `norm_topk_prob`), Switch top-1 with a capacity, DeepSeek-V3's
//!   auxiliary-loss-free balancing (a per-expert bias that changes which experts are chosen, not
//!   their weights), and expert choice (not causal: refused where the model is).
//! - [`dispatch`]: tokens grouped by expert with one sort, one gather and one scatter-add per
//!   layer (as MegaBlocks does), over expert weights stacked `[E, ...]` ([`Experts`]).
//! - [`losses`]: the Switch load-balancing loss and the router z-loss, and per-expert load.
//! - [`layer`]: [`MoeLayer`], the feed-forward layer models use, configured by [`MoeConfig`]
//!   (expert width, a shared expert with an optional sigmoid gate, which layers have experts).
//! - [`swiglu`]: the bias-free SwiGLU MLP used as a shared expert.
//! - [`cdmoe`]: Doge's Cross Domain MoE (shared MLP plus product-key retrieval experts), in
//!   transformers' token-mixing mode for published weights and a causal mode for training.

pub mod cdmoe;
pub mod dispatch;
pub mod layer;
pub mod losses;
pub mod router;
pub mod swiglu;

pub use cdmoe::{product_keys, CdMoe, CdmoeConfig, CdmoeRouting};
pub use dispatch::{moe_forward, Experts};
pub use layer::{load_entropy, MoeConfig, MoeLayer, MoeStats, SharedExpertConfig};
pub use losses::{expert_load, load_balancing_loss, load_balancing_loss_with, z_loss};
pub use router::{balance_bias_step, update_balance_bias, Gate, RouterKind, Routing};
pub use swiglu::SwiGlu;
