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

/// `buffer += delta` once the optimizer has stepped: how a forward pass moves a tensor that is
/// not trained by gradients (an aux-free router's balancing bias) without a side channel.
#[derive(Debug)]
pub struct BufferUpdate {
    /// The tensor changed in place (a shallow clone of the layer's own).
    pub buffer: Tensor,
    /// What is added, in the buffer's dtype.
    pub delta: Tensor,
}

impl BufferUpdate {
    /// Adds `delta` to the buffer, without recording gradients.
    pub fn apply(&self) {
        let _guard = tch::no_grad_guard();
        let _ = self.buffer.shallow_clone().g_add_(&self.delta);
    }
}
