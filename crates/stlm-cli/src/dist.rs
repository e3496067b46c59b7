//! Data-parallel runs from the command line: `--nproc N` starts N local worker processes of
//! the same command (as torchrun would), and a worker (a process with `RANK` set by torchrun,
//! Slurm, `--nproc` or by hand) joins its process group.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::sync::Arc;
use stlm_dist::ProcessGroup;
use tch::Device;

/// Data-parallel options of `stlm train` and `stlm distill`.
#[derive(Args, Clone, Debug)]
pub struct DistArgs {
    /// Start this many local worker processes (ranks) of the same command on this machine, joined
    /// by gloo over 127.0.0.1. With torchrun or srun, leave it out: they set RANK and WORLD_SIZE.
    #[arg(long, value_name = "N")]
    pub nproc: Option<usize>,
    /// c10d backend of a distributed run (auto is gloo).
    #[arg(long, default_value = "auto", value_parser = ["auto", "gloo", "nccl"])]
    pub dist_backend: String,
    /// Seconds a rank waits for the others (rendezvous and each collective) before it fails.
    #[arg(long, default_value_t = 600.0)]
    pub dist_timeout: f64,
}

/// The process group of a worker started by a launcher, on `device` (CUDA: the device of its
/// `LOCAL_RANK`); `None` without launcher variables. Refuses `--nproc` inside a worker.
pub fn join(args: &DistArgs, device: Device) -> Result<(Option<Arc<ProcessGroup>>, Device)> {
    if let (Some(_), Some(rank)) = (args.nproc, std::env::var_os("RANK")) {
        bail!("--nproc inside a distributed worker (RANK={} is set): leave --nproc out", rank.to_string_lossy());
    }
    match ProcessGroup::join_launched(&args.dist_backend, args.dist_timeout, device).context("--dist-backend/--dist-timeout")? {
        Some((group, device)) => Ok((Some(Arc::new(group)), device)),
        None => Ok((None, device)),
    }
}

/// Runs this command again as `nproc` local ranks (without `--nproc`) and waits for them
/// (see [`stlm_dist::spawn_local`]); Ctrl-C reaches every rank, which stop after the same step
/// with a checkpoint, while the launcher waits.
pub fn spawn_local(nproc: usize) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the stlm executable to start the ranks")?;
    let args = stlm_dist::local::without_nproc(std::env::args().skip(1));
    let _ = ctrlc::set_handler(|| {});
    stlm_dist::spawn_local(&exe, &args, nproc).map_err(|e| match e {
        stlm_dist::local::LocalError::Worker(w) => anyhow::Error::new(w),
        other => anyhow::Error::new(other).context(format!("--nproc {nproc}")),
    })
}
