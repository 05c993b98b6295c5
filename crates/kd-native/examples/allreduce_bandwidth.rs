//! All-reduce bandwidth of c10d's Gloo backend between processes, for a few buffer sizes.
//!
//! ```text
//! cargo run --release -p kd-native --features gloo --example allreduce_bandwidth        # 2 ranks on loopback
//! torchrun --nproc-per-node 4 --no-python target/release/examples/allreduce_bandwidth   # any launcher
//! ```
//! Started without launch variables it starts itself as 2 ranks on loopback. Rank 0 prints one
//! line per size: the median time of an all-reduce (sum, f32) and the algorithm bandwidth
//! (bytes / time) and bus bandwidth (times 2 (n - 1) / n, the bytes each rank sends and
//! receives in a ring), as NCCL's tests report them.
use kd_native::dist::{Backend, GroupOptions, ProcessGroup, Reduce};
use kd_native::launch;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Some(l) = launch::from_env()? else {
        return spawn_two();
    };
    tch::set_num_threads(1);
    let group = ProcessGroup::new(&GroupOptions::from_launch(Backend::Gloo, &l, Duration::from_secs(60)))?;
    let n = l.world_size as f64;
    if l.rank == 0 {
        println!("# c10d Gloo all-reduce (sum, f32), {} ranks, 1 thread each", l.world_size);
        println!("# {:>10} {:>10} {:>14} {:>14}", "bytes", "ms", "algbw GB/s", "busbw GB/s");
    }
    for bytes in [4usize << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20] {
        let mut t = vec![Tensor::ones([(bytes / 4) as i64], (Kind::Float, Device::Cpu))];
        for _ in 0..3 {
            group.all_reduce(&mut t, Reduce::Sum)?;
        }
        // Rounds of about 0.2 s, the median of 5; every rank runs rank 0's count.
        let start = Instant::now();
        group.all_reduce(&mut t, Reduce::Sum)?;
        let once = start.elapsed().as_secs_f64().max(1e-6);
        let mut reps = vec![Tensor::from_slice(&[(0.2 / once).clamp(1.0, 10_000.0).round() as i64])];
        group.broadcast(&mut reps, 0)?;
        let reps = i64::try_from(&reps[0])? as usize;
        let mut times = Vec::new();
        for _ in 0..5 {
            let start = Instant::now();
            for _ in 0..reps {
                group.all_reduce(&mut t, Reduce::Sum)?;
            }
            times.push(start.elapsed().as_secs_f64() / reps as f64);
        }
        times.sort_by(f64::total_cmp);
        let s = times[2];
        if l.rank == 0 {
            let algbw = bytes as f64 / s / 1e9;
            println!("  {bytes:>10} {:>10.3} {algbw:>14.2} {:>14.2}", s * 1e3, algbw * 2.0 * (n - 1.0) / n);
        }
    }
    group.barrier()?;
    Ok(())
}

/// Runs this program as ranks 0 and 1 on loopback and waits for both.
fn spawn_two() -> Result<(), Box<dyn std::error::Error>> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let exe = std::env::current_exe()?;
    let children: Vec<_> = (0..2)
        .map(|rank| {
            std::process::Command::new(&exe)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("LOCAL_RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    for mut c in children {
        if !c.wait()?.success() {
            return Err("a rank failed".into());
        }
    }
    Ok(())
}
