//! c10d over Gloo on loopback, with ranks as processes: this test binary starts copies of
//! itself that run only the `rank` test below, told their part by environment variables.
#![cfg(kd_native_gloo)]

use kd_native::dist::{Backend, GlooDevice, GroupOptions, ProcessGroup, Reduce};
use kd_native::launch::free_loopback_port;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

const SCENARIO: &str = "KD_NATIVE_TEST_SCENARIO";

fn options(port: u16, rank: usize, world: usize, timeout: Duration) -> GroupOptions {
    GroupOptions {
        timeout,
        gloo_device: GlooDevice::Hostname("127.0.0.1".into()),
        launcher_store: false,
        ..GroupOptions::new(Backend::Gloo, "127.0.0.1", port, rank, world)
    }
}

/// Starts `world` ranks of `scenario` and returns their outputs and exit statuses, killing any
/// rank still running after `deadline` (and then failing).
fn launch(scenario: &str, world: usize, deadline: Duration) -> Vec<(bool, String)> {
    let ranks: Vec<(usize, usize)> = (0..world).map(|r| (r, world)).collect();
    launch_as(scenario, &ranks, deadline).into_iter().map(|(status, out)| (status.success(), out)).collect()
}

/// Starts one process of `scenario` per `(rank, world size)` (a launch gone wrong may repeat a
/// rank or give ranks different world sizes) and returns their exit statuses and outputs.
fn launch_as(scenario: &str, ranks: &[(usize, usize)], deadline: Duration) -> Vec<(ExitStatus, String)> {
    launch_on(free_loopback_port(), scenario, ranks, deadline)
}

/// [`launch_as`] with a master port of the caller's.
fn launch_on(port: u16, scenario: &str, ranks: &[(usize, usize)], deadline: Duration) -> Vec<(ExitStatus, String)> {
    let exe = std::env::current_exe().unwrap();
    let mut children: Vec<Child> = ranks
        .iter()
        .map(|&(rank, world)| {
            Command::new(&exe)
                .args(["rank", "--exact", "--ignored", "--nocapture", "--test-threads", "1"])
                .env(SCENARIO, scenario)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let start = Instant::now();
    while children.iter_mut().any(|c| c.try_wait().unwrap().is_none()) {
        if start.elapsed() > deadline {
            for c in &mut children {
                let _ = c.kill();
            }
            let outs: Vec<String> = children.into_iter().map(output).collect();
            panic!("{scenario}: ranks still running after {deadline:?}:\n{}", outs.join("\n----\n"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    children
        .into_iter()
        .map(|mut c| {
            let status = c.wait().unwrap();
            (status, output(c))
        })
        .collect()
}

fn output(c: Child) -> String {
    let o = c.wait_with_output().unwrap();
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn assert_all_ok(scenario: &str, results: &[(bool, String)]) {
    for (rank, (ok, out)) in results.iter().enumerate() {
        assert!(ok, "{scenario}: rank {rank} failed:\n{out}");
    }
}

#[test]
fn collectives_over_two_processes() {
    assert_all_ok("collectives", &launch("collectives", 2, Duration::from_secs(120)));
}

#[test]
fn a_dead_peer_is_an_error_for_the_survivor() {
    let results = launch("peer_dies", 2, Duration::from_secs(120));
    assert_all_ok("peer_dies", &results);
    assert!(results[0].1.contains("survivor saw: all-reduce failed"), "{}", results[0].1);
}

#[test]
fn a_hung_peer_is_an_error_after_the_timeout() {
    let results = launch("peer_hangs", 2, Duration::from_secs(120));
    assert!(results[0].0, "rank 0:\n{}", results[0].1);
    assert!(results[0].1.contains("survivor saw: all-reduce failed"), "{}", results[0].1);
}

/// A rank whose peers never come fails the rendezvous within its timeout, naming the address
/// and the ranks that did not join.
#[test]
fn a_missing_peer_fails_the_rendezvous() {
    let port = free_loopback_port();
    let started = Instant::now();
    let err = ProcessGroup::new(&options(port, 0, 2, Duration::from_secs(2))).unwrap_err().to_string();
    assert!(err.starts_with("rendezvous failed: rank 0 of 2 at 127.0.0.1:"), "{err}");
    assert!(err.contains("waited 2 s for rank(s) 1 of 2 to join"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
}

/// Ranks started with different world sizes are named at once, well within the timeout (30 s).
#[test]
fn ranks_with_different_world_sizes_are_named_at_the_rendezvous() {
    let started = Instant::now();
    let results = launch_as("join", &[(0, 2), (1, 3)], Duration::from_secs(120));
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    // Whichever rank sees the mismatch first names it; the other reads its message.
    for (rank, (status, out)) in results.iter().enumerate() {
        assert!(status.success() && out.contains(&format!("join error: rendezvous failed: rank {rank} of ")), "{out}");
        let named = out.contains("rank 1 was started with WORLD_SIZE=3, rank 0 with WORLD_SIZE=2")
            || out.contains("rank 0 was started with WORLD_SIZE=2, rank 1 with WORLD_SIZE=3");
        assert!(named && out.contains("every rank must be started with the same world size"), "{out}");
    }
}

/// A rank started twice: the second process to join as that rank is told so at once; the
/// others form the group.
#[test]
fn a_rank_started_twice_is_named() {
    let results = launch_as("join", &[(0, 2), (1, 2), (1, 2)], Duration::from_secs(120));
    let joined = results.iter().filter(|(s, out)| s.success() && out.contains("rank ... joined")).count();
    let twice: Vec<&String> = results
        .iter()
        .filter(|(s, out)| s.success() && out.contains("another process already joined as rank 1"))
        .map(|(_, out)| out)
        .collect();
    assert!(joined == 2 && twice.len() == 1, "{results:#?}");
    assert!(twice[0].contains("two processes were started with RANK=1"), "{}", twice[0]);
}

/// Ranks that exchange tensors of different sizes make Gloo throw in its transport thread,
/// which would abort the process: with [`kd_native::dist::quiet_failures`] a rank ends with
/// status 1 and one line, or sees an error, never a signal.
#[test]
fn mismatched_collectives_end_without_an_abort() {
    let results = launch_as("sizes_differ", &[(0, 2), (1, 2)], Duration::from_secs(120));
    for (rank, (status, out)) in results.iter().enumerate() {
        assert!(status.signal().is_none(), "rank {rank} died by signal {:?}:\n{out}", status.signal());
        assert!(
            (status.code() == Some(1) && out.contains(&format!("[rank {rank}] error: the collective library failed")))
                || (status.success() && out.contains("saw: ")),
            "rank {rank} ({status}):\n{out}"
        );
        assert!(!out.contains("terminate called") && !out.contains("frame #"), "rank {rank}:\n{out}");
    }
}

#[test]
fn a_port_in_use_fails_the_rendezvous() {
    let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let err = ProcessGroup::new(&options(port, 0, 2, Duration::from_secs(2))).unwrap_err().to_string();
    assert!(err.contains(&format!(":{port}")) && err.to_lowercase().contains("in use"), "{err}");
}

/// A launcher's store outlives the ranks (torchrun's agent keeps one across restarts): each
/// incarnation of the group meets in a part of it of its own, whatever keys the earlier ones
/// left. Here the test serves the store (as rank 0 of a world of one) and three incarnations of
/// a two-rank group come and go, the last one's rank 1 started a while after its rank 0.
#[test]
fn restarted_groups_meet_in_a_store_that_outlives_them() {
    let port = free_loopback_port();
    let _store = ProcessGroup::new(&options(port, 0, 1, Duration::from_secs(10))).unwrap();
    for (incarnation, scenario) in ["agent_store", "agent_store", "agent_store_late"].iter().enumerate() {
        let results = launch_on(port, scenario, &[(0, 2), (1, 2)], Duration::from_secs(120));
        for (rank, (status, out)) in results.iter().enumerate() {
            assert!(
                status.success() && out.contains("collectives ok"),
                "incarnation {incarnation}, rank {rank}:\n{out}"
            );
        }
    }
}

/// A world of one needs no peer: collectives are the identity (a mean divides by 1).
#[test]
fn a_world_of_one() {
    let group = ProcessGroup::new(&options(free_loopback_port(), 0, 1, Duration::from_secs(10))).unwrap();
    let mut ts = vec![Tensor::from_slice(&[1.5f32, -2.0])];
    group.all_reduce(&mut ts, Reduce::Mean).unwrap();
    assert_eq!(Vec::<f32>::try_from(&ts[0]).unwrap(), [1.5, -2.0]);
    assert_eq!(group.all_gather(&ts[0]).unwrap().len(), 1);
    group.agree("a value", 3).unwrap();
    group.barrier().unwrap();
}

/// The body of one rank, started by [`launch`] with `--ignored`.
#[test]
#[ignore = "one rank of the multi-process tests, which start it"]
fn rank() {
    let Ok(scenario) = std::env::var(SCENARIO) else { return };
    let launch = kd_native::launch::from_env().unwrap().expect("launch variables");
    let (rank, world) = (launch.rank, launch.world_size);
    let timeout = match scenario.as_str() {
        "peer_hangs" => Duration::from_secs(1),
        _ => Duration::from_secs(10),
    };
    kd_native::dist::quiet_failures(&format!("[rank {rank}] error: "));
    if scenario == "agent_store_late" && rank == 1 {
        std::thread::sleep(Duration::from_millis(500));
    }
    let opts = GroupOptions {
        launcher_store: scenario.starts_with("agent_store"),
        ..options(launch.master_port, rank, world, timeout)
    };
    let group = match ProcessGroup::new(&opts) {
        Ok(group) => group,
        Err(e) if scenario == "join" => {
            println!("join error: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let r = rank as f64;
    match scenario.as_str() {
        "join" => {
            group.barrier().unwrap();
            println!("joined");
            // Stay, as a training rank would, so that a late duplicate finds the store.
            std::thread::sleep(Duration::from_secs(3));
        }
        "sizes_differ" => {
            let mut ts = vec![Tensor::ones([4 + 1000 * rank as i64], (Kind::Float, Device::Cpu))];
            if let Err(e) = group.all_reduce(&mut ts, Reduce::Sum) {
                println!("saw: {e}");
                return;
            }
            let mut ts = vec![Tensor::ones([4], (Kind::Float, Device::Cpu))];
            match group.all_reduce(&mut ts, Reduce::Sum) {
                Ok(()) => panic!("a mismatched all-reduce went through"),
                Err(e) => println!("saw: {e}"),
            }
        }
        "collectives" => collectives(&group, r, world as f64),
        "agent_store" | "agent_store_late" => {
            collectives(&group, r, world as f64);
            println!("collectives ok");
        }
        "peer_dies" | "peer_hangs" => {
            let mut ts = vec![Tensor::ones([4], (Kind::Float, Device::Cpu))];
            group.all_reduce(&mut ts, Reduce::Sum).unwrap();
            if rank == 1 {
                if scenario == "peer_dies" {
                    // Exit without closing anything, as a crash would.
                    std::process::exit(0);
                }
                // Hang past the survivor's timeout, then leave.
                std::thread::sleep(Duration::from_secs(5));
                std::process::exit(0);
            }
            match group.all_reduce(&mut ts, Reduce::Sum) {
                Ok(()) => panic!("the all-reduce with a missing peer succeeded"),
                Err(e) => println!("survivor saw: {e}"),
            }
            // Exit at once, as a training process would with this error.
            std::process::exit(0);
        }
        other => panic!("unknown scenario {other}"),
    }
}

fn collectives(group: &ProcessGroup, r: f64, world: f64) {
    let cpu = (Kind::Float, Device::Cpu);
    // Sum over a list of tensors of different shapes, one of them not contiguous.
    let a = Tensor::arange(6, cpu).view([2, 3]) + r;
    let b = Tensor::arange(6, cpu).view([3, 2]).tr() * (r + 1.0);
    let mut ts = vec![a, b.shallow_clone()];
    group.all_reduce(&mut ts, Reduce::Sum).unwrap();
    // sum_r (x + r) = 2x + 1 ; sum_r x (r + 1) = 3x over ranks 0 and 1.
    let want_a = Tensor::arange(6, cpu).view([2, 3]) * 2.0 + 1.0;
    let want_b = Tensor::arange(6, cpu).view([3, 2]).tr() * 3.0;
    assert!(ts[0].equal(&want_a), "sum: {:?}", ts[0]);
    assert!(ts[1].equal(&want_b) && b.equal(&want_b), "sum (non-contiguous): {:?}", ts[1]);

    // Mean in small buckets (each tensor alone) equals the mean in one buffer.
    let make = || (0..5).map(|i| Tensor::full([i + 1], r * 10.0 + i as f64, cpu)).collect::<Vec<_>>();
    let (mut one, mut many) = (make(), make());
    group.all_reduce(&mut one, Reduce::Mean).unwrap();
    group.all_reduce_bucketed(&mut many, Reduce::Mean, 8).unwrap();
    for (i, (x, y)) in one.iter().zip(&many).enumerate() {
        // (i + (10 + i)) / 2
        let want = Tensor::full([i as i64 + 1], i as f64 + 5.0, cpu);
        assert!(x.equal(&want) && y.equal(&want), "mean {i}: {x:?} {y:?}");
    }

    // Integer sums are exact.
    let mut ints = vec![Tensor::from_slice(&[1i64 << 40, r as i64])];
    group.all_reduce(&mut ints, Reduce::Sum).unwrap();
    assert_eq!(Vec::<i64>::try_from(&ints[0]).unwrap(), [1i64 << 41, 1]);
    let err = group.all_reduce(&mut ints, Reduce::Mean).unwrap_err().to_string();
    assert!(err.contains("a mean of Int64 tensors"), "{err}");

    // Broadcast from rank 1 overwrites rank 0's tensors.
    let mut ts = vec![Tensor::full([3], r, cpu), Tensor::full([2, 2], -r, (Kind::Double, Device::Cpu))];
    let err = group.broadcast(&mut ts, 1).unwrap_err().to_string();
    assert!(err.contains("tensor 1 is Double"), "{err}");
    let mut ts = vec![Tensor::full([3], r, cpu), Tensor::full([2, 2], -r, cpu)];
    group.broadcast(&mut ts, 1).unwrap();
    assert!(ts[0].equal(&Tensor::full([3], 1.0, cpu)) && ts[1].equal(&Tensor::full([2, 2], -1.0, cpu)));

    // All-gather returns every rank's tensor in rank order.
    let mine = Tensor::from_slice(&[r as f32, 100.0 + r as f32]).view([1, 2]);
    let all = group.all_gather(&mine).unwrap();
    assert_eq!(all.len(), world as usize);
    for (k, t) in all.iter().enumerate() {
        assert_eq!(Vec::<f32>::try_from(t.view([-1])).unwrap(), [k as f32, 100.0 + k as f32], "rank {k}'s part");
    }

    // Agreement on a value: the same everywhere passes, a rank-dependent one names the rank.
    group.agree("the configuration hash", 0x5eed).unwrap();
    let err = group.agree("the parameter checksum", 7 + r as i64).unwrap_err().to_string();
    assert_eq!(err, "the parameter checksum differs across ranks: rank 0 has 7, rank 1 has 8");
    group.barrier().unwrap();
}
