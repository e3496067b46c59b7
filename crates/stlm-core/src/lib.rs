//! stlm-core: what every stlm crate shares.
//!
//! Device and dtype choice, the error type for file and tensor IO, seeding, safetensors reading
//! (memory-mapped) and writing (atomic), JSON reading with errors that name the field,
//! parameter and FLOP counting, the train/eval [`Mode`] of a pass, the CPU kernels (and their spinning thread pool) of batch-1 decoding, and ggml's Q8_0/Q4_0 weight blocks ([`quant`]).

pub mod device;
pub mod error;
pub mod flops;
pub mod io;
pub mod kernels;
pub mod memory;
pub mod module;
pub mod qmatvec;
pub mod quant;
pub mod spin;
pub mod step;

pub use device::{parse_device, seed_all, DType};
pub use error::{CoreError, OptionError, Result};
pub use step::{BufferUpdate, Mode};
pub use module::{Layer, Parameter, Role, Walk, WalkKind};
pub use io::{
    atomic_write, atomic_write_bytes, read_json, read_safetensors, temporary_path, toml_known_tables, toml_table,
    write_safetensors,
};

/// Number of elements in a list of tensors (for parameter counts).
pub fn numel(tensors: &[tch::Tensor]) -> i64 {
    tensors.iter().map(|t| t.numel() as i64).sum()
}
