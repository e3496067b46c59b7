//! What a training or evaluation pass is told and what it hands back besides its output: the
//! [`Mode`] a layer runs in (never read from libtorch's global grad mode), and the
//! [`BufferUpdate`]s of tensors that gradients do not train, applied after the optimizer step.

use tch::Tensor;

/// Whether a pass trains or evaluates. Layers that behave differently in training (capacity
/// limits of a Switch router, teacher terms of a distillation objective) read this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// A training step: training-only devices are on.
    Train,
    /// Validation, evaluation, generation: the model as it is used.
    #[default]
    Eval,
}

impl Mode {
    /// True for [`Mode::Train`].
    pub fn is_train(self) -> bool {
        self == Mode::Train
    }
}

/// `buffer += rule(stat)` once the optimizer has stepped: how a forward pass moves a tensor that
/// is not trained by gradients (an aux-free router's balancing bias) without a side channel. The
/// move is computed from a statistic of the pass (an expert-load histogram) so that data-parallel
/// training can sum that statistic over ranks first and every rank moves the buffer alike.
pub struct BufferUpdate {
    /// The tensor changed in place (a shallow clone of the layer's own).
    pub buffer: Tensor,
    /// The pass's statistic the move is computed from; additive over batches (summed over ranks).
    pub stat: Tensor,
    rule: Box<dyn Fn(&Tensor) -> Tensor>,
}

impl std::fmt::Debug for BufferUpdate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferUpdate").field("buffer", &self.buffer.size()).field("stat", &self.stat.size()).finish()
    }
}

impl BufferUpdate {
    /// An update of `buffer` by `rule(stat)`, `rule` giving the delta in the buffer's dtype.
    pub fn new(buffer: Tensor, stat: Tensor, rule: impl Fn(&Tensor) -> Tensor + 'static) -> Self {
        BufferUpdate { buffer, stat, rule: Box::new(rule) }
    }

    /// The delta this update adds.
    pub fn delta(&self) -> Tensor {
        let _guard = tch::no_grad_guard();
        (self.rule)(&self.stat)
    }

    /// Adds the delta to the buffer, without recording gradients.
    pub fn apply(&self) {
        let _guard = tch::no_grad_guard();
        let _ = self.buffer.shallow_clone().g_add_(&(self.rule)(&self.stat));
    }
}
