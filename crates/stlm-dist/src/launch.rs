//! Where this process sits in a distributed run, read as torchrun sets it up: `RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` (and torchrun's agent store), with
//! Slurm's `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID` as fallbacks.
use crate::DistError;

/// One process's place in a run and where its rendezvous store is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// This process's rank, `0..world_size`.
    pub rank: usize,
    /// How many processes train together.
    pub world_size: usize,
    /// The rank among processes on this machine (picks the CUDA device).
    pub local_rank: usize,
    /// Host of the TCP store (rank 0's machine, or torchrun's agent).
    pub master_addr: String,
    /// Port of the TCP store.
    pub master_port: u16,
    /// torchrun's agent already serves the store (`TORCHELASTIC_USE_AGENT_STORE=True`): every rank is a client.
    pub agent_store: bool,
    /// The network interface gloo binds to (`GLOO_SOCKET_IFNAME`), if set.
    pub socket_ifname: Option<String>,
}

impl Launch {
    /// Reads the process environment; `None` when no launcher set a rank (a single process).
    pub fn from_env() -> Result<Option<Launch>, DistError> {
        Launch::from_vars(|k| std::env::var(k).ok())
    }

    /// As [`Launch::from_env`], reading variables through `get` (for tests and launchers).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>, DistError> {
        let pick = |names: &[&'static str]| -> Option<(&'static str, String)> {
            names.iter().find_map(|n| get(n).filter(|v| !v.trim().is_empty()).map(|v| (*n, v)))
        };
        let Some(rank) = pick(&["RANK", "SLURM_PROCID"]) else {
            return Ok(None);
        };
        let world = pick(&["WORLD_SIZE", "SLURM_NTASKS"])
            .ok_or(DistError::Launch("RANK is set but WORLD_SIZE (or SLURM_NTASKS) is not".into()))?;
        let rank_n = number(rank.0, &rank.1)?;
        let world_n = number(world.0, &world.1)?;
        if world_n == 0 || rank_n >= world_n {
            return Err(DistError::Launch(format!(
                "{}={} must be below {}={} (and the world at least 1)",
                rank.0, rank.1, world.0, world.1
            )));
        }
        let local_rank = match pick(&["LOCAL_RANK", "SLURM_LOCALID"]) {
            Some((k, v)) => number(k, &v)?,
            None => 0,
        };
        let master_addr = get("MASTER_ADDR").filter(|v| !v.is_empty()).ok_or_else(|| {
            DistError::Launch(format!("{}={} is set but MASTER_ADDR is not (the host of rank 0)", rank.0, rank.1))
        })?;
        let port = get("MASTER_PORT").ok_or_else(|| {
            DistError::Launch(format!("{}={} is set but MASTER_PORT is not (a free TCP port on MASTER_ADDR)", rank.0, rank.1))
        })?;
        let master_port = port
            .trim()
            .parse::<u16>()
            .map_err(|_| DistError::Launch(format!("MASTER_PORT={port} is not a TCP port (1..65535)")))?;
        let agent_store = get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
        let socket_ifname = get("GLOO_SOCKET_IFNAME").filter(|v| !v.is_empty());
        Ok(Some(Launch { rank: rank_n, world_size: world_n, local_rank, master_addr, master_port, agent_store, socket_ifname }))
    }

    /// Whether this process serves the TCP store: rank 0, unless torchrun's agent does.
    pub fn serves_store(&self) -> bool {
        self.rank == 0 && !self.agent_store
    }
}

fn number(name: &str, value: &str) -> Result<usize, DistError> {
    value.trim().parse().map_err(|_| DistError::Launch(format!("{name}={value} is not a non-negative integer")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn launch(vars: &[(&str, &str)]) -> Result<Option<Launch>, DistError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Launch::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn no_rank_is_a_single_process() {
        assert_eq!(launch(&[("MASTER_ADDR", "x")]).unwrap(), None);
    }

    #[test]
    fn torchrun_variables() {
        let l = launch(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((l.rank, l.world_size, l.local_rank, l.master_port), (3, 4, 1, 29500));
        assert!(l.agent_store && !l.serves_store());
    }

    #[test]
    fn slurm_fallbacks() {
        let l = launch(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "0"),
            ("MASTER_ADDR", "node1"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((l.rank, l.world_size), (0, 2));
        assert!(l.serves_store());
    }

    #[test]
    fn errors_name_the_variable() {
        let e = launch(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "1")]).unwrap_err();
        assert!(e.to_string().contains("RANK=2"), "{e}");
        let e = launch(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).unwrap_err();
        assert!(e.to_string().contains("MASTER_ADDR"), "{e}");
        let e = launch(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "x")]).unwrap_err();
        assert!(e.to_string().contains("MASTER_PORT=x"), "{e}");
        let e = launch(&[("RANK", "a"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(e.to_string().contains("RANK=a"), "{e}");
    }
}
