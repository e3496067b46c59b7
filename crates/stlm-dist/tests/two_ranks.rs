//! Two gloo processes on 127.0.0.1: this test binary starts itself twice as ranks (the ignored
//! `worker` test, told its scenario by STLM_DIST_TEST_SCENARIO) and checks what they print.
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use stlm_dist::{Backend, Launch, ProcessGroup};
use tch::{Device, Kind, Tensor};

const DEADLINE: Duration = Duration::from_secs(90);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn spawn(scenario: &str, rank: usize, world: usize, port: u16) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "worker", "--nocapture", "--test-threads", "1"])
        .env("STLM_DIST_TEST_SCENARIO", scenario)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for every child within the deadline (killing the rest after it); returns (success, output).
fn finish(children: Vec<Child>) -> Vec<(bool, String)> {
    let start = Instant::now();
    let mut children: Vec<Option<Child>> = children.into_iter().map(Some).collect();
    let mut results: Vec<Option<(bool, String)>> = vec![None; children.len()];
    while results.iter().any(Option::is_none) {
        for (i, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            let done = child.try_wait().unwrap().is_some();
            if done || start.elapsed() > DEADLINE {
                if !done {
                    let _ = child.kill();
                }
                let out = slot.take().unwrap().wait_with_output().unwrap();
                let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
                results[i] = Some((done && out.status.success(), text));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(start.elapsed() <= DEADLINE + Duration::from_secs(5), "ranks did not finish within {DEADLINE:?}");
    results.into_iter().map(Option::unwrap).collect()
}

fn run(scenario: &str) -> Vec<(bool, String)> {
    let port = free_port();
    finish((0..2).map(|r| spawn(scenario, r, 2, port)).collect())
}

#[test]
fn two_ranks_average_broadcast_and_agree() {
    for (ok, out) in run("collectives") {
        assert!(ok && out.contains("collectives ok"), "{out}");
    }
}

#[test]
fn a_dead_rank_is_an_error_on_the_other_in_bounded_time() {
    let start = Instant::now();
    let results = run("dies");
    assert!(start.elapsed() < Duration::from_secs(60), "took {:?}", start.elapsed());
    let (ok, out) = &results[0];
    assert!(!ok, "rank 0 should fail: {out}");
    assert!(out.contains("distributed all-reduce failed on rank 0 of 2"), "{out}");
}

#[test]
fn an_unreachable_store_is_an_error_within_the_timeout() {
    let port = free_port();
    let start = Instant::now();
    let results = finish(vec![spawn("alone", 1, 2, port)]);
    let (ok, out) = &results[0];
    assert!(!ok && out.contains("distributed rendezvous failed on rank 1 of 2"), "{out}");
    assert!(start.elapsed() < Duration::from_secs(60), "took {:?}", start.elapsed());
}

#[test]
#[ignore = "a rank started by the tests above"]
fn worker() {
    let scenario = std::env::var("STLM_DIST_TEST_SCENARIO").expect("started by a two-rank test");
    let launch = Launch::from_env().unwrap().expect("RANK is set");
    let timeout = Duration::from_secs(if scenario == "alone" { 3 } else { 30 });
    let pg = match ProcessGroup::connect(&launch, Backend::Gloo, timeout) {
        Ok(pg) => pg,
        Err(e) => panic!("{e}"),
    };
    let r = pg.rank() as f32;
    match scenario.as_str() {
        "collectives" => {
            // Averaging: rank r holds r+1 everywhere, in tensors that span several buckets.
            let grads: Vec<Tensor> =
                [3i64, 5, 7].iter().map(|&n| Tensor::full([n], (r + 1.0) as f64, (Kind::Float, Device::Cpu))).collect();
            pg.average(&grads).unwrap();
            for g in &grads {
                assert!(Vec::<f32>::try_from(g).unwrap().iter().all(|&v| v == 1.5));
            }
            // Broadcast: every rank ends with rank 0's parameters, kinds kept.
            let params = vec![
                Tensor::full([2, 2], r as f64 + 7.0, (Kind::Float, Device::Cpu)),
                Tensor::full([3], r as f64 - 1.0, (Kind::Double, Device::Cpu)),
            ];
            pg.broadcast_all(&params).unwrap();
            assert!(Vec::<f32>::try_from(params[0].reshape([-1])).unwrap().iter().all(|&v| v == 7.0));
            assert!(Vec::<f64>::try_from(&params[1]).unwrap().iter().all(|&v| v == -1.0));
            assert_eq!(pg.sum_f64(&[r as f64, 1.0]).unwrap(), vec![1.0, 2.0]);
            assert!(pg.any(pg.rank() == 1).unwrap());
            assert!(!pg.any(false).unwrap());
            pg.check_same("config", b"same").unwrap();
            let e = pg.check_same("config.toml", if pg.rank() == 0 { b"a" } else { b"b" }).unwrap_err();
            assert!(e.to_string().contains("ranks disagree on config.toml"), "{e}");
            pg.barrier().unwrap();
            println!("collectives ok");
        }
        "dies" => {
            pg.barrier().unwrap();
            if pg.rank() == 1 {
                std::process::exit(3);
            }
            std::thread::sleep(Duration::from_millis(500));
            let t = Tensor::ones([4], (Kind::Float, Device::Cpu));
            match pg.all_reduce(&t, stlm_dist::ReduceOp::Sum) {
                Ok(()) => println!("all-reduce unexpectedly succeeded"),
                Err(e) => panic!("{e}"),
            }
        }
        other => panic!("unknown scenario {other}"),
    }
}
