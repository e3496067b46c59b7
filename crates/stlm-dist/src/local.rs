//! Local data-parallel launches: the same command started as N ranks on this machine (as
//! torchrun's standalone mode does), joined over 127.0.0.1.

use crate::DistError;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A rank of a local launch exited with this code; the launcher exits with it too (the rank
/// printed its own message, or the lines of it shown by [`spawn_local`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rank {rank} exited with code {code}")]
pub struct WorkerExit {
    /// The rank that failed first.
    pub rank: usize,
    /// Its exit code.
    pub code: i32,
}

/// Why a local launch failed.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// A rank could not be started, or a port found.
    #[error(transparent)]
    Start(#[from] DistError),
    /// A rank failed.
    #[error(transparent)]
    Worker(#[from] WorkerExit),
}

/// Runs `exe args` as `nproc` local ranks (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`
/// and a free `MASTER_PORT` set) and waits for them. Rank 0 prints as usual; the others' stdout
/// is dropped and their stderr shown only if they fail (its error lines). When one rank fails
/// the others are stopped after a moment, and the error is that rank's exit.
pub fn spawn_local(exe: &Path, args: &[String], nproc: usize) -> Result<(), LocalError> {
    let launch = |m: String| LocalError::Start(DistError::Launch(m));
    if nproc == 0 {
        return Err(launch("nproc 0: give at least 1 process".into()));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| launch(format!("cannot find a free port on 127.0.0.1 for the ranks' store: {e}")))?
        .port();
    let mut children: Vec<(Child, Arc<Mutex<Vec<String>>>)> = Vec::new();
    for rank in 0..nproc {
        let mut cmd = Command::new(exe);
        cmd.args(args)
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
        let mut child = cmd.spawn().map_err(|e| launch(format!("cannot start rank {rank} ({}): {e}", exe.display())))?;
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
            match children[rank].0.try_wait().map_err(|e| launch(format!("waiting for rank {rank}: {e}")))? {
                Some(status) if !status.success() && failure.is_none() => failure = Some(WorkerExit { rank, code: status.code().unwrap_or(1) }),
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

/// The command line without `--nproc N` / `--nproc=N` (what each rank runs).
pub fn without_nproc(args: impl Iterator<Item = String>) -> Vec<String> {
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

    #[test]
    fn a_failing_rank_is_reported_with_its_code() {
        let err = spawn_local(Path::new("/bin/sh"), &["-c".into(), "exit $((3 + RANK))".into()], 2).unwrap_err();
        match err {
            LocalError::Worker(w) => assert!(w.code == 3 || w.code == 4, "{w}"),
            other => panic!("{other}"),
        }
        spawn_local(Path::new("/bin/sh"), &["-c".into(), "test \"$WORLD_SIZE\" = 3".into()], 3).unwrap();
        assert!(matches!(spawn_local(Path::new("/bin/sh"), &[], 0), Err(LocalError::Start(_))));
    }
}
