//! The C interface of `csrc/shim.cpp`. Tensors pass as tch's `C_tensor` (an `at::Tensor*`).
use std::os::raw::{c_char, c_int};
use torch_sys::C_tensor;

/// A TCPStore plus a gloo process group, owned by the shim.
#[repr(C)]
pub(crate) struct StlmPg {
    _private: [u8; 0],
}

/// An outstanding collective.
#[repr(C)]
pub(crate) struct StlmWork {
    _private: [u8; 0],
}

extern "C" {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn stlm_dist_new(
        host: *const c_char,
        port: u16,
        is_server: c_int,
        rank: c_int,
        world: c_int,
        timeout_ms: i64,
        device_kind: c_int,
        device_arg: *const c_char,
        out: *mut *mut StlmPg,
    ) -> *mut c_char;
    pub(crate) fn stlm_dist_free(pg: *mut StlmPg);
    pub(crate) fn stlm_dist_all_reduce(
        pg: *mut StlmPg,
        tensor: *const C_tensor,
        op: c_int,
        work: *mut *mut StlmWork,
    ) -> *mut c_char;
    pub(crate) fn stlm_dist_wait(work: *mut StlmWork) -> *mut c_char;
    pub(crate) fn stlm_dist_broadcast(pg: *mut StlmPg, tensors: *const *const C_tensor, n: usize, root: c_int) -> *mut c_char;
    pub(crate) fn stlm_dist_barrier(pg: *mut StlmPg) -> *mut c_char;
    pub(crate) fn stlm_dist_free_error(msg: *mut c_char);
}
