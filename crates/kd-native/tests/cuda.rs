//! CUDA graphs, device properties and NCCL; these run where feature `cuda` is on and a GPU is
//! present, and check the error path where it is not.
#![cfg(feature = "cuda")]

use kd_native::cuda::{device_properties, CudaGraph};
use tch::{Device, Kind, Tensor};

#[test]
fn without_a_gpu_cuda_calls_are_errors() {
    if tch::Cuda::is_available() {
        return;
    }
    assert!(device_properties(0).is_err());
}

#[test]
fn device_properties_name_the_gpu() {
    if !tch::Cuda::is_available() {
        return;
    }
    let p = device_properties(0).unwrap();
    assert!(p.name.contains("NVIDIA") || p.name.contains("AMD"), "{p:?}");
    assert!(p.total_memory > 1 << 30 && p.multiprocessors > 0 && p.compute_capability.0 >= 3, "{p:?}");
    println!("{p:?}");
}

/// A captured `y = x * 2 + 1` replays on new values copied into `x`.
#[test]
fn a_captured_graph_replays_on_new_inputs() {
    if !tch::Cuda::is_available() {
        return;
    }
    let d = (Kind::Float, Device::Cuda(0));
    let x = Tensor::zeros([1024], d);
    let mut y = Tensor::zeros([1024], d);
    let body = || {
        y.copy_(&(&x * 2.0 + 1.0));
        Ok(())
    };
    // Warm up (allocator, lazy kernels) outside the capture.
    let _ = (&x * 2.0 + 1.0).sum(Kind::Float).double_value(&[]);
    let (mut graph, ()) = CudaGraph::capture(0, body).unwrap();
    for v in [3.0, -1.5] {
        let _ = x.shallow_clone().fill_(v);
        graph.replay().unwrap();
        let got = y.to(Device::Cpu);
        assert!(got.equal(&Tensor::full([1024], v * 2.0 + 1.0, (Kind::Float, Device::Cpu))), "x = {v}");
    }
}

/// NCCL plumbing with one rank on the GPU.
#[cfg(feature = "nccl")]
#[test]
fn nccl_world_of_one() {
    use kd_native::dist::{Backend, GroupOptions, ProcessGroup, Reduce};
    if !tch::Cuda::is_available() {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut o = GroupOptions::new(Backend::Nccl, "127.0.0.1", port, 0, 1);
    o.timeout = std::time::Duration::from_secs(60);
    let group = ProcessGroup::new(&o).unwrap();
    let mut ts = vec![Tensor::from_slice(&[1.0f32, 2.0]).to(Device::Cuda(0))];
    group.all_reduce(&mut ts, Reduce::Mean).unwrap();
    group.broadcast(&mut ts, 0).unwrap();
    let all = group.all_gather(&ts[0]).unwrap();
    assert_eq!(Vec::<f32>::try_from(&all[0].to(Device::Cpu)).unwrap(), [1.0, 2.0]);
}
