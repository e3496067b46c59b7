//! The layer walk: every layer lists its named sub-layers and parameters with their [`Role`],
//! and whatever needs to know what a model holds (weight decay, FLOP counting, inspection,
//! save and load) asks the walk instead of matching parameter names.
//!
//! A walk is *stored* (every tensor the model owns once, under the name it is saved as: what the
//! optimizer and the weight file see) or *applied* (every layer once per application, tied
//! weights once per use: what a token's forward pass computes with, for FLOPs).

use tch::Tensor;

/// What a parameter is to the model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Role {
    /// The weight of a product every token goes through (`[out, in]`).
    Matrix,
    /// A lookup table whose rows are read by id (token embeddings, learned positions).
    Embedding,
    /// A norm's scale or shift.
    Norm,
    /// A product's bias.
    Bias,
    /// A learned vector or table added to or multiplied with the stream whole (residual scales,
    /// the residual root, a byte model's slot positions, a gate's logits).
    Scale,
    /// A tensor an attention kind learns (head scales, Doge's `A`, Linformer's sequence
    /// projections); its cost belongs to the attention term.
    KindParameter,
    /// The stacked weights `[experts, ..]` of routed experts, of which each token runs
    /// `per_token` on average.
    RoutedExperts {
        /// Experts stacked in the tensor.
        experts: i64,
        /// Experts a token is routed to (top-k, or the capacity factor of expert choice).
        per_token: f64,
    },
    /// A table `[experts, ..]` of which a router picks `per_token` rows for each token and
    /// multiplies with them (Doge's cross-domain MoE expert embeddings).
    RoutedRows {
        /// Rows in the table.
        experts: i64,
        /// Rows a token uses.
        per_token: f64,
    },
    /// State that gradients do not train (the aux-free router's bias).
    Buffer,
    /// A matrix stored as quantized blocks (its dequantized values here): multiplied like a
    /// matrix, never trained.
    QuantizedMatrix,
    /// A lookup table stored as quantized blocks (its dequantized values here): never trained.
    QuantizedEmbedding,
}

impl Role {
    /// Whether decoupled weight decay applies: to every tensor of two or more dimensions except
    /// lookup tables (norm scales, biases and other vectors never decay).
    pub fn decays(self, tensor: &Tensor) -> bool {
        tensor.dim() >= 2 && !matches!(self, Role::Embedding | Role::RoutedRows { .. } | Role::Buffer | Role::QuantizedMatrix | Role::QuantizedEmbedding)
    }

    /// The weights of `tensor` that one token multiplies with (each is 2 FLOPs forward): all of a
    /// matrix, a routed token's share of experts and routed rows, none of anything else.
    pub fn matmul_weights(self, tensor: &Tensor) -> f64 {
        let n = tensor.numel() as f64;
        match self {
            Role::Matrix | Role::QuantizedMatrix => n,
            Role::RoutedExperts { experts, per_token } | Role::RoutedRows { experts, per_token } => n * per_token / experts.max(1) as f64,
            Role::Embedding | Role::QuantizedEmbedding | Role::Norm | Role::Bias | Role::Scale | Role::KindParameter | Role::Buffer => 0.0,
        }
    }
}

/// A parameter found by a walk: its full name, the tensor (the model's own handle) and role.
#[derive(Debug)]
pub struct Parameter {
    /// The name it is saved under (`model.layers.0.self_attn.q_proj.weight`).
    pub name: String,
    /// The model's tensor (a shallow clone: the same storage).
    pub tensor: Tensor,
    /// What it is to the model.
    pub role: Role,
}

/// A layer that can list what it holds.
pub trait Layer {
    /// Visits every sub-layer ([`Walk::layer`]) and parameter ([`Walk::param`]) of this layer,
    /// named relative to it; sub-layers it shares with another layer go through [`Walk::tied`].
    fn visit(&self, walk: &mut Walk<'_>);
}

/// Which parameters a walk reaches (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkKind {
    /// Every owned tensor once, by its saved name.
    Stored,
    /// Every application of every layer, tied weights at each use.
    Applied,
}

/// A walk in progress: the name prefix of the layer being visited and what to do with each
/// parameter.
pub struct Walk<'a> {
    kind: WalkKind,
    prefix: String,
    on_param: &'a mut dyn FnMut(&str, &Tensor, Role),
}

impl<'a> Walk<'a> {
    /// A walk of `kind` that calls `on_param` with each parameter's full name, tensor and role.
    pub fn new(kind: WalkKind, on_param: &'a mut dyn FnMut(&str, &Tensor, Role)) -> Self {
        Walk { kind, prefix: String::new(), on_param }
    }

    /// Whether this walk counts applications (see [`WalkKind`]).
    pub fn kind(&self) -> WalkKind {
        self.kind
    }

    /// The parameter `name` of the layer being visited.
    pub fn param(&mut self, name: &str, tensor: &Tensor, role: Role) {
        let full = self.full(name);
        (self.on_param)(&full, tensor, role);
    }

    /// [`Walk::param`] when the layer has the parameter.
    pub fn param_opt(&mut self, name: &str, tensor: Option<&Tensor>, role: Role) {
        if let Some(t) = tensor {
            self.param(name, t, role);
        }
    }

    /// The sub-layer `name` (a dotted path relative to the layer being visited).
    pub fn layer(&mut self, name: &str, layer: &dyn Layer) {
        let saved = std::mem::take(&mut self.prefix);
        self.prefix = join(&saved, name);
        layer.visit(self);
        self.prefix = saved;
    }

    /// [`Walk::layer`] when the layer has the sub-layer.
    pub fn layer_opt<L: Layer>(&mut self, name: &str, layer: Option<&L>) {
        if let Some(l) = layer {
            self.layer(name, l);
        }
    }

    /// A sub-layer owned (and listed) by another layer and used here too: visited by applied
    /// walks only.
    pub fn tied(&mut self, name: &str, layer: &dyn Layer) {
        if self.kind == WalkKind::Applied {
            self.layer(name, layer);
        }
    }

    /// A parameter owned (and listed) elsewhere and used here too (a tied output head):
    /// visited by applied walks only.
    pub fn tied_param(&mut self, name: &str, tensor: &Tensor, role: Role) {
        if self.kind == WalkKind::Applied {
            self.param(name, tensor, role);
        }
    }

    fn full(&self, name: &str) -> String {
        join(&self.prefix, name)
    }
}

fn join(prefix: &str, name: &str) -> String {
    match (prefix.is_empty(), name.is_empty()) {
        (true, _) => name.to_string(),
        (false, true) => prefix.to_string(),
        (false, false) => format!("{prefix}.{name}"),
    }
}

/// Every tensor `layer` owns, once, by the name it is saved under, in walk order.
pub fn parameters(layer: &dyn Layer) -> Vec<Parameter> {
    let mut out = Vec::new();
    let mut push = |name: &str, t: &Tensor, role: Role| out.push(Parameter { name: name.to_string(), tensor: t.shallow_clone(), role });
    layer.visit(&mut Walk::new(WalkKind::Stored, &mut push));
    out
}

/// The weights one token multiplies with in a forward pass through `layer` (see
/// [`Role::matmul_weights`]), every application counted.
pub fn matmul_weights(layer: &dyn Layer) -> f64 {
    let mut total = 0.0;
    let mut add = |_: &str, t: &Tensor, role: Role| total += role.matmul_weights(t);
    layer.visit(&mut Walk::new(WalkKind::Applied, &mut add));
    total
}

/// Elements of every tensor `layer` owns, by role (stored walk).
pub fn count_by_role(layer: &dyn Layer, mut keep: impl FnMut(Role) -> bool) -> i64 {
    let mut total = 0;
    let mut add = |_: &str, t: &Tensor, role: Role| {
        if keep(role) {
            total += t.numel() as i64;
        }
    };
    layer.visit(&mut Walk::new(WalkKind::Stored, &mut add));
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    struct Lin {
        w: Tensor,
        b: Option<Tensor>,
    }
    impl Layer for Lin {
        fn visit(&self, walk: &mut Walk<'_>) {
            walk.param("weight", &self.w, Role::Matrix);
            walk.param_opt("bias", self.b.as_ref(), Role::Bias);
        }
    }
    struct Block {
        own: Lin,
        shared: Lin,
        is_owner: bool,
    }
    impl Layer for Block {
        fn visit(&self, walk: &mut Walk<'_>) {
            walk.layer("own", &self.own);
            match self.is_owner {
                true => walk.layer("shared", &self.shared),
                false => walk.tied("shared", &self.shared),
            }
        }
    }
    struct Net(Vec<Block>, Tensor);
    impl Layer for Net {
        fn visit(&self, walk: &mut Walk<'_>) {
            walk.param("embed", &self.1, Role::Embedding);
            for (i, b) in self.0.iter().enumerate() {
                walk.layer(&format!("layers.{i}"), b);
            }
            walk.tied_param("head", &self.1, Role::Matrix);
        }
    }

    fn z(shape: &[i64]) -> Tensor {
        Tensor::zeros(shape, (Kind::Float, Device::Cpu))
    }

    #[test]
    fn stored_walks_list_each_tensor_once_and_applied_walks_each_use() {
        let shared = Lin { w: z(&[3, 2]), b: None };
        let share = || Lin { w: shared.w.shallow_clone(), b: None };
        let block = |owner: bool, s: Lin| Block { own: Lin { w: z(&[2, 2]), b: Some(z(&[2])) }, shared: s, is_owner: owner };
        let net = Net(vec![block(true, share()), block(false, share())], z(&[10, 2]));
        let names: Vec<String> = parameters(&net).into_iter().map(|p| p.name).collect();
        assert_eq!(
            names,
            ["embed", "layers.0.own.weight", "layers.0.own.bias", "layers.0.shared.weight", "layers.1.own.weight", "layers.1.own.bias"]
        );
        // Per token: two own matrices, the shared one twice, the tied head; no embedding, bias.
        assert_eq!(matmul_weights(&net), (4 + 4 + 6 + 6 + 20) as f64);
        assert_eq!(count_by_role(&net, |r| r == Role::Embedding), 20);
    }

    #[test]
    fn roles_decide_decay_and_routed_cost() {
        let (m, v) = (z(&[4, 4]), z(&[4]));
        assert!(Role::Matrix.decays(&m) && Role::Scale.decays(&m) && Role::KindParameter.decays(&z(&[1, 4, 4])));
        assert!(!Role::Embedding.decays(&m) && !Role::Norm.decays(&v) && !Role::Bias.decays(&v) && !Role::Scale.decays(&v));
        assert!(!Role::RoutedRows { experts: 4, per_token: 2.0 }.decays(&m) && !Role::Buffer.decays(&m));
        let experts = z(&[8, 6, 4]);
        assert_eq!(Role::RoutedExperts { experts: 8, per_token: 2.0 }.matmul_weights(&experts), 48.0);
        assert_eq!(Role::RoutedRows { experts: 4, per_token: 1.0 }.matmul_weights(&m), 4.0);
        assert_eq!(Role::KindParameter.matmul_weights(&m), 0.0);
    }
}
