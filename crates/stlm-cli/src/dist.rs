//! Data-parallel runs from the command line: `--nproc N` starts N local worker processes of
//! the same command (as torchrun would), and a worker (a process with `RANK` set by torchrun,
//! Slurm, `--nproc` or by hand) joins its process group.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use stlm_dist::{Backend, Launch, ProcessGroup};
use tch::Device;

/// Data-parallel options of `stlm train` and `stlm distill`.
#[derive(Args, Clone, Debug)]
pub struct DistArgs {
    /// Start this many local worker processes (ranks) of the same command on this machine, joined
    /// by gloo over 127.0.0.1. With torchrun or srun, leave it out: they set RANK and WORLD_SIZE.
    #[arg(long, value_name = "N")]
    pub nproc: Option<usize>,
    /// c10d backend of a distributed run: auto, gloo or nccl.
    #[arg(long, default_value = "auto")]
    pub dist_backend: String,
    /// Seconds a rank waits for the others (rendezvous and each collective) before it fails.
    #[arg(long, default_value_t = 600.0)]
    pub dist_timeout: f64,
}

/// A worker exited with this code; the launcher exits with it too (its message is printed).
#[derive(Debug)]
pub struct WorkerExit {
    /// The rank that failed first.
    pub rank: usize,
    /// Its exit code.
    pub code: i32,
}

impl std::fmt::Display for WorkerExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank {} exited with code {}", self.rank, self.code)
    }
}

impl std::error::Error for WorkerExit {}

/// The process group of a worker started by a launcher, on `device` (CUDA: the device of its
/// `LOCAL_RANK`); `None` without launcher variables. Refuses `--nproc` inside a worker.
pub fn join(args: &DistArgs, device: Device) -> Result<(Option<Arc<ProcessGroup>>, Device)> {
    let Some(launch) = Launch::from_env()? else { return Ok((None, device)) };
    if args.nproc.is_some() {
        bail!("--nproc inside a distributed worker (RANK={} is set): leave --nproc out", launch.rank);
    }
    let device = match device {
        Device::Cuda(_) => Device::Cuda(launch.local_rank),
        other => other,
    };
    if !(args.dist_timeout > 0.0 && args.dist_timeout.is_finite()) {
        bail!("--dist-timeout {}: must be a positive number of seconds", args.dist_timeout);
    }
    let backend = Backend::choose(&args.dist_backend, device)?;
    let group = ProcessGroup::connect(&launch, backend, Duration::from_secs_f64(args.dist_timeout))?;
    Ok((Some(Arc::new(group)), device))
}

/// Runs this command again as `nproc` local ranks (without `--nproc`) and waits for them. Rank
/// 0 prints as usual; the others' stderr is shown only if they fail. When one rank fails the
/// others are stopped, and the error is that rank's exit code.
pub fn spawn_local(nproc: usize) -> Result<()> {
    if nproc == 0 {
        bail!("--nproc 0: give at least 1 process");
    }
    let exe = std::env::current_exe().context("cannot find the stlm executable to start the ranks")?;
    let args = without_nproc(std::env::args().skip(1));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("cannot find a free port on 127.0.0.1 for the ranks' store")?
        .port();
    // Ctrl-C reaches every rank (same process group): they stop after the same step with a
    // checkpoint; the launcher waits for them.
    let _ = ctrlc::set_handler(|| {});
    let mut children: Vec<(Child, Arc<Mutex<Vec<String>>>)> = Vec::new();
    for rank in 0..nproc {
        let mut cmd = Command::new(&exe);
        cmd.args(&args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env_remove("TORCHELASTIC_USE_AGENT_STORE");
        if rank > 0 {
            cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        }
        let mut child = cmd.spawn().with_context(|| format!("cannot start rank {rank} ({})", exe.display()))?;
        let tail = Arc::new(Mutex::new(Vec::new()));
        if let Some(err) = child.stderr.take() {
            let tail = Arc::clone(&tail);
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
                    t.push(line);
                    if t.len() > 20 {
                        t.remove(0);
                    }
                }
            });
        }
        children.push((child, tail));
    }
    let mut running: Vec<usize> = (0..nproc).collect();
    let mut failure: Option<WorkerExit> = None;
    while !running.is_empty() {
        let mut still = Vec::new();
        for &rank in &running {
            match children[rank].0.try_wait().context("waiting for a rank")? {
                Some(status) if !status.success() && failure.is_none() => {
                    let code = status.code().unwrap_or(1);
                    failure = Some(WorkerExit { rank, code });
                }
                Some(_) => {}
                None => still.push(rank),
            }
        }
        running = still;
        if failure.is_some() {
            // Give the others a moment to report the failure themselves, then stop them.
            std::thread::sleep(Duration::from_millis(500));
            for &rank in &running {
                let _ = children[rank].0.kill();
                let _ = children[rank].0.wait();
            }
            running.clear();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match failure {
        None => Ok(()),
        Some(f) => {
            if f.rank > 0 {
                std::thread::sleep(Duration::from_millis(100));
                let tail = children[f.rank].1.lock().unwrap_or_else(|p| p.into_inner()).clone();
                for line in tail.iter().filter(|l| l.starts_with("error") || l.contains("panicked")) {
                    eprintln!("rank {}: {line}", f.rank);
                }
            }
            Err(f.into())
        }
    }
}

/// The command line without `--nproc N` / `--nproc=N`.
fn without_nproc(args: impl Iterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut skip = false;
    for a in args {
        if std::mem::take(&mut skip) {
            continue;
        }
        if a == "--nproc" {
            skip = true;
        } else if !a.starts_with("--nproc=") {
            out.push(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nproc_is_removed_from_the_command_line() {
        let args = ["train", "--nproc", "2", "--config", "c.toml", "--nproc=3", "--out", "x"].map(String::from);
        assert_eq!(without_nproc(args.into_iter()), ["train", "--config", "c.toml", "--out", "x"]);
    }
}
