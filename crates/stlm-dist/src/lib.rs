//! Data-parallel process groups on PyTorch's own distributed engine, c10d, which ships inside
//! libtorch: a TCPStore rendezvous, a gloo process group, and the collectives data-parallel
//! training needs (bucketed gradient averaging, parameter broadcast, config agreement).
//!
//! A process learns its place from the launcher's variables ([`Launch::from_env`]: torchrun,
//! Slurm, or plain `RANK`/`WORLD_SIZE`/`MASTER_ADDR`/`MASTER_PORT`), then [`ProcessGroup::connect`]s.
use std::ffi::{CStr, CString};
use std::os::raw::c_char;
use std::ptr::NonNull;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

mod ffi;
mod launch;
pub mod local;

pub use launch::Launch;
pub use local::{spawn_local, WorkerExit};

/// Bytes of gradient per all-reduce bucket (PyTorch DDP's default bucket size, 25 MiB).
pub const BUCKET_BYTES: usize = 25 << 20;

/// What can go wrong in a distributed run.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// The launcher's variables are missing or inconsistent.
    #[error("distributed launch: {0}")]
    Launch(String),
    /// c10d reported a failure: a rank that died, a store that cannot be reached, a timeout.
    #[error("distributed {what} failed on rank {rank} of {world}: {message}")]
    Collective {
        /// The operation that failed.
        what: &'static str,
        /// This process's rank.
        rank: usize,
        /// The world size.
        world: usize,
        /// c10d's message.
        message: String,
    },
    /// The ranks disagree about something that must be equal (the run's configuration).
    #[error("ranks disagree on {0}: start every rank with the same configuration and data")]
    Mismatch(String),
    /// The backend cannot be used with this build or device.
    #[error("distributed backend: {0}")]
    Backend(String),
}

/// A reduction for [`ProcessGroup::all_reduce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Elementwise sum.
    Sum,
    /// Elementwise maximum.
    Max,
    /// Elementwise minimum.
    Min,
}

/// Which c10d backend carries the collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// gloo: CPU tensors (CUDA tensors are staged through host memory).
    Gloo,
    /// NCCL: CUDA tensors, one device per process.
    Nccl,
}

impl Backend {
    /// Parses `auto`, `gloo` or `nccl` for a run on `device`. `auto` is gloo: this build has no
    /// NCCL, and gloo also carries CUDA tensors (through host memory).
    pub fn choose(name: &str, device: Device) -> Result<Backend, DistError> {
        let _ = device;
        let wanted = match name {
            "auto" | "gloo" => Backend::Gloo,
            "nccl" => Backend::Nccl,
            other => {
                return Err(DistError::Backend(format!("unknown backend `{other}` (expected auto, gloo or nccl)")))
            }
        };
        if wanted == Backend::Nccl {
            return Err(DistError::Backend(
                "NCCL is not built into this stlm (the shim links libtorch_cpu only); use backend gloo, which also \
                 carries CUDA tensors through host memory"
                    .into(),
            ));
        }
        Ok(wanted)
    }

    /// The backend's c10d name.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
}

/// A c10d process group joined by every rank of a run.
pub struct ProcessGroup {
    raw: NonNull<ffi::StlmPg>,
    rank: usize,
    world_size: usize,
}

// c10d process groups are used from several threads by PyTorch itself; calls enqueue work on the
// group's own worker threads.
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup").field("rank", &self.rank).field("world_size", &self.world_size).finish()
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        unsafe { ffi::stlm_dist_free(self.raw.as_ptr()) }
    }
}

impl ProcessGroup {
    /// The group of a worker started by a launcher (torchrun, Slurm, `--nproc`: `RANK` is set),
    /// on `device` (CUDA: the device of its `LOCAL_RANK`), with `backend` (`auto`, `gloo`,
    /// `nccl`) and collectives bounded by `timeout_secs`; `None` without launcher variables.
    pub fn join_launched(backend: &str, timeout_secs: f64, device: Device) -> Result<Option<(ProcessGroup, Device)>, DistError> {
        let Some(launch) = Launch::from_env()? else { return Ok(None) };
        let device = match device {
            Device::Cuda(_) => Device::Cuda(launch.local_rank),
            other => other,
        };
        if !(timeout_secs > 0.0 && timeout_secs.is_finite()) {
            return Err(DistError::Launch(format!("timeout {timeout_secs}: must be a positive number of seconds")));
        }
        let backend = Backend::choose(backend, device)?;
        Ok(Some((ProcessGroup::connect(&launch, backend, Duration::from_secs_f64(timeout_secs))?, device)))
    }

    /// Rendezvous through the TCP store at `launch`'s master address and build a gloo group.
    /// Every rank must call this; `timeout` bounds the rendezvous and every later collective.
    pub fn connect(launch: &Launch, backend: Backend, timeout: Duration) -> Result<ProcessGroup, DistError> {
        if backend != Backend::Gloo {
            return Err(DistError::Backend(format!("{} is not available in this build", backend.name())));
        }
        let fail = |message: String| DistError::Collective {
            what: "rendezvous",
            rank: launch.rank,
            world: launch.world_size,
            message,
        };
        let host = CString::new(launch.master_addr.clone()).map_err(|_| fail("MASTER_ADDR holds a NUL byte".into()))?;
        let (kind, arg) = match &launch.socket_ifname {
            Some(iface) => (2, iface.clone()),
            None if is_loopback(&launch.master_addr) => (1, launch.master_addr.clone()),
            None => (0, String::new()),
        };
        let arg = CString::new(arg).map_err(|_| fail("GLOO_SOCKET_IFNAME holds a NUL byte".into()))?;
        let mut raw = std::ptr::null_mut();
        let err = unsafe {
            ffi::stlm_dist_new(
                host.as_ptr(),
                launch.master_port,
                launch.serves_store() as i32,
                launch.rank as i32,
                launch.world_size as i32,
                timeout.as_millis().min(i64::MAX as u128) as i64,
                kind,
                arg.as_ptr(),
                &mut raw,
            )
        };
        check(err).map_err(|m| {
            fail(format!("{m} (store {}:{}, timeout {:?})", launch.master_addr, launch.master_port, timeout))
        })?;
        let raw = NonNull::new(raw).ok_or_else(|| fail("the shim returned no group".into()))?;
        Ok(ProcessGroup { raw, rank: launch.rank, world_size: launch.world_size })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Reduces `tensor` in place across ranks (a contiguous tensor; the result is on every rank).
    pub fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> Result<(), DistError> {
        let work = self.start_all_reduce(tensor, op)?;
        self.wait(work)
    }

    /// Broadcasts `tensors` in place from rank `root`.
    pub fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<(), DistError> {
        let ptrs: Vec<_> = tensors.iter().map(|t| t.as_ptr()).collect();
        let err = unsafe { ffi::stlm_dist_broadcast(self.raw.as_ptr(), ptrs.as_ptr(), ptrs.len(), root as i32) };
        check(err).map_err(|m| self.failed("broadcast", m))
    }

    /// Blocks until every rank arrives.
    pub fn barrier(&self) -> Result<(), DistError> {
        let err = unsafe { ffi::stlm_dist_barrier(self.raw.as_ptr()) };
        check(err).map_err(|m| self.failed("barrier", m))
    }

    /// Replaces each tensor by its mean over ranks: float32 buckets of about [`BUCKET_BYTES`],
    /// all started before the first is waited on (gloo works on them in the background).
    pub fn average(&self, tensors: &[Tensor]) -> Result<(), DistError> {
        let _guard = tch::no_grad_guard();
        let mut pending = Vec::new();
        for bucket in buckets(tensors, BUCKET_BYTES) {
            let flat = flatten(&tensors[bucket.clone()]);
            let work = self.start_all_reduce(&flat, ReduceOp::Sum)?;
            pending.push((bucket, flat, work));
        }
        let scale = 1.0 / self.world_size as f64;
        for (bucket, mut flat, work) in pending {
            self.wait(work)?;
            let _ = flat.g_mul_scalar_(scale);
            unflatten_into(&flat, &tensors[bucket]);
        }
        Ok(())
    }

    /// Overwrites every tensor with rank 0's values (parameters at the start of a run), in buckets.
    pub fn broadcast_all(&self, tensors: &[Tensor]) -> Result<(), DistError> {
        let _guard = tch::no_grad_guard();
        for bucket in buckets(tensors, BUCKET_BYTES) {
            let flat = flatten(&tensors[bucket.clone()]);
            self.broadcast(std::slice::from_ref(&flat), 0)?;
            unflatten_into(&flat, &tensors[bucket]);
        }
        Ok(())
    }

    /// Refuses to go on unless every rank passed the same `bytes` (a run's configuration):
    /// `what` names it in the error.
    pub fn check_same(&self, what: &str, bytes: &[u8]) -> Result<(), DistError> {
        let h = fnv1a(bytes) as i64;
        let t = Tensor::from_slice(&[h, h.wrapping_neg()]);
        self.all_reduce(&t, ReduceOp::Max)?;
        let v: Vec<i64> = Vec::try_from(&t).map_err(|e: tch::TchError| self.failed("check", e.to_string()))?;
        if v[0] != h || v[1] != h.wrapping_neg() {
            return Err(DistError::Mismatch(format!("{what} (rank {} differs from another rank)", self.rank)));
        }
        Ok(())
    }

    /// Sums `values` over ranks (float64, e.g. losses and token counts for logging).
    pub fn sum_f64(&self, values: &[f64]) -> Result<Vec<f64>, DistError> {
        let t = Tensor::from_slice(values);
        self.all_reduce(&t, ReduceOp::Sum)?;
        Vec::try_from(&t).map_err(|e: tch::TchError| self.failed("sum", e.to_string()))
    }

    /// Whether any rank passed `true` (a stop request on one rank stops all).
    pub fn any(&self, flag: bool) -> Result<bool, DistError> {
        let t = Tensor::from_slice(&[flag as i64]);
        self.all_reduce(&t, ReduceOp::Max)?;
        Ok(t.int64_value(&[0]) != 0)
    }

    fn start_all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> Result<NonNull<ffi::StlmWork>, DistError> {
        let op = match op {
            ReduceOp::Sum => 0,
            ReduceOp::Max => 1,
            ReduceOp::Min => 2,
        };
        let mut work = std::ptr::null_mut();
        let err = unsafe { ffi::stlm_dist_all_reduce(self.raw.as_ptr(), tensor.as_ptr(), op, &mut work) };
        check(err).map_err(|m| self.failed("all-reduce", m))?;
        NonNull::new(work).ok_or_else(|| self.failed("all-reduce", "the shim returned no work".into()))
    }

    fn wait(&self, work: NonNull<ffi::StlmWork>) -> Result<(), DistError> {
        let err = unsafe { ffi::stlm_dist_wait(work.as_ptr()) };
        check(err).map_err(|m| self.failed("all-reduce", m))
    }

    fn failed(&self, what: &'static str, message: String) -> DistError {
        DistError::Collective { what, rank: self.rank, world: self.world_size, message }
    }
}

/// Consecutive index ranges of `tensors` whose float32 sizes stay within `cap` bytes (a tensor
/// larger than `cap` is a bucket by itself).
pub fn buckets(tensors: &[Tensor], cap: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0usize);
    for (i, t) in tensors.iter().enumerate() {
        let b = t.numel() * 4;
        if i > start && bytes + b > cap {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += b;
    }
    if start < tensors.len() {
        out.push(start..tensors.len());
    }
    out
}

fn flatten(tensors: &[Tensor]) -> Tensor {
    let flat: Vec<Tensor> = tensors.iter().map(|t| t.reshape([-1]).to_kind(Kind::Float)).collect();
    Tensor::cat(&flat, 0).contiguous()
}

fn unflatten_into(flat: &Tensor, tensors: &[Tensor]) {
    let mut at = 0i64;
    for t in tensors {
        let n = t.numel() as i64;
        let mut dst = t.shallow_clone();
        let src = flat.narrow(0, at, n).view_as(t).to_kind(t.kind());
        dst.copy_(&src);
        at += n;
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3))
}

fn check(err: *mut c_char) -> Result<(), String> {
    if err.is_null() {
        return Ok(());
    }
    let msg = unsafe { CStr::from_ptr(err) }.to_string_lossy().trim().to_string();
    unsafe { ffi::stlm_dist_free_error(err) };
    Err(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_tensor_in_order() {
        let ts: Vec<Tensor> = [10, 10, 30, 5, 5].iter().map(|&n| Tensor::zeros([n], (Kind::Float, Device::Cpu))).collect();
        assert_eq!(buckets(&ts, 80), vec![0..2, 2..3, 3..5]);
        assert_eq!(buckets(&ts, 1), vec![0..1, 1..2, 2..3, 3..4, 4..5]);
        assert_eq!(buckets(&ts, 1 << 20), vec![0..5]);
        assert!(buckets(&[], 10).is_empty());
    }

    #[test]
    fn flatten_round_trips() {
        let a = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]);
        let b = Tensor::arange(4, (Kind::Double, Device::Cpu));
        let flat = flatten(&[a.shallow_clone(), b.shallow_clone()]) * 2.0;
        unflatten_into(&flat, &[a.shallow_clone(), b.shallow_clone()]);
        assert_eq!(Vec::<f32>::try_from(a.reshape([-1])).unwrap(), vec![0., 2., 4., 6., 8., 10.]);
        assert_eq!(Vec::<f64>::try_from(&b).unwrap(), vec![0., 2., 4., 6.]);
    }

    #[test]
    fn backend_choice() {
        assert_eq!(Backend::choose("auto", Device::Cpu).unwrap(), Backend::Gloo);
        assert!(Backend::choose("nccl", Device::Cpu).unwrap_err().to_string().contains("NCCL"));
        assert!(Backend::choose("mpi", Device::Cpu).unwrap_err().to_string().contains("`mpi`"));
    }
}
