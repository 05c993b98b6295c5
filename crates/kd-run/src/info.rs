//! `kd-run info`: the libtorch this binary runs on, what the build holds, the CPU and the GPUs,
//! as text or (`--json`) one JSON object, so that a figure can be tied to the machine that made it.

use crate::device;
use anyhow::Result;
use serde::Serialize;

/// What `kd-run info` reports.
#[derive(Debug, Serialize)]
pub struct Info {
    kd_run: &'static str,
    libtorch: String,
    /// The CPU kernels ATen dispatches to (`ATEN_CPU_CAPABILITY` can lower it).
    cpu_capability: String,
    features: Features,
    cpu: Cpu,
    /// libtorch's intra-op thread count.
    threads: i64,
    cuda_available: bool,
    cudnn_available: bool,
    gpus: Vec<Gpu>,
}

#[derive(Debug, Serialize)]
struct Features {
    gloo: bool,
    nccl: bool,
    cuda_graphs: bool,
    /// Linear layers' forward products on oneDNN (`kd_native::linear`), in f32 and in bf16.
    onednn_linear: bool,
    onednn_linear_bf16: bool,
}

#[derive(Debug, Serialize)]
struct Cpu {
    model: String,
    /// The vector extensions that change which kernels run and how results round.
    extensions: Vec<&'static str>,
    logical_cores: usize,
}

#[derive(Debug, Serialize)]
struct Gpu {
    index: usize,
    name: String,
    /// Dense peak TFLOP/s (bf16, TF32, f32) where the model is known.
    peak_tflops: Option<[f64; 3]>,
}

impl Info {
    /// Gathers the report (starts libtorch's CUDA probe, no other side effect).
    pub fn gather() -> Info {
        let build = kd_native::build::info();
        let gpus = (0..tch::Cuda::device_count().max(0) as usize)
            .map(|index| {
                let name = device::cuda_device_name(index).unwrap_or_else(|| "(unnamed)".into());
                let peak_tflops = device::peak_tflops(&name).map(|p| [p.bf16, p.tf32, p.fp32]);
                Gpu { index, name, peak_tflops }
            })
            .collect();
        Info {
            kd_run: env!("CARGO_PKG_VERSION"),
            libtorch: build.libtorch_version,
            cpu_capability: build.cpu_capability,
            features: Features {
                gloo: build.gloo,
                nccl: build.nccl,
                cuda_graphs: build.cuda_graphs,
                onednn_linear: kd_native::linear::onednn_available(),
                onednn_linear_bf16: kd_native::linear::onednn_bf16_available(),
            },
            cpu: Cpu {
                model: cpu_model(),
                extensions: vector_extensions(),
                logical_cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            },
            threads: tch::get_num_threads() as i64,
            cuda_available: tch::Cuda::is_available(),
            cudnn_available: tch::Cuda::cudnn_is_available(),
            gpus,
        }
    }

    /// One JSON object on one line.
    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string(self)?)
    }

    /// Lines of `key: value`.
    pub fn to_text(&self) -> String {
        let yes = |b: bool, what: &str| format!("{what}: {}", if b { "yes" } else { "no" });
        let mut lines = vec![
            format!("kd-run {}", self.kd_run),
            format!("libtorch: {} ({} CPU kernels)", self.libtorch, self.cpu_capability),
            yes(self.features.gloo, "data parallelism on CPUs (Gloo)"),
            yes(self.features.nccl, "data parallelism on GPUs (NCCL, kd-native/nccl)"),
            yes(self.features.cuda_graphs, "CUDA graphs (kd-native/cuda)"),
            yes(self.features.onednn_linear, "linear layers on oneDNN (CPU, batches of 64 rows or more)"),
            yes(self.features.onednn_linear_bf16, "linear layers on oneDNN in bf16"),
            format!("cpu: {} ({} logical cores)", self.cpu.model, self.cpu.logical_cores),
            format!("cpu vector extensions: {}", self.cpu.extensions.join(" ")),
            format!("cpu threads: {}", self.threads),
            format!("cuda available: {}", self.cuda_available),
            format!("cudnn available: {}", self.cudnn_available),
            format!("cuda devices: {}", self.gpus.len()),
        ];
        for g in &self.gpus {
            let peak = g.peak_tflops.map_or("peak unknown".into(), |[bf16, tf32, fp32]| {
                format!("dense peak {bf16} TFLOP/s bf16, {tf32} TF32, {fp32} f32")
            });
            lines.push(format!("cuda:{}: {}, {peak}", g.index, g.name));
        }
        lines.join("\n") + "\n"
    }
}

/// The CPU's model name (`/proc/cpuinfo` on Linux), or `unknown`.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, v)| v.trim().to_owned()))
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The SIMD extensions this CPU has, of those libtorch's and oneDNN's kernels choose between.
fn vector_extensions() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        let found = [
            ("sse4.2", std::arch::is_x86_feature_detected!("sse4.2")),
            ("avx", std::arch::is_x86_feature_detected!("avx")),
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("fma", std::arch::is_x86_feature_detected!("fma")),
            ("f16c", std::arch::is_x86_feature_detected!("f16c")),
            ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
            ("avx512bw", std::arch::is_x86_feature_detected!("avx512bw")),
            ("avx512vl", std::arch::is_x86_feature_detected!("avx512vl")),
            ("avx512vnni", std::arch::is_x86_feature_detected!("avx512vnni")),
            ("avx512bf16", std::arch::is_x86_feature_detected!("avx512bf16")),
            ("avx512fp16", std::arch::is_x86_feature_detected!("avx512fp16")),
        ];
        found.into_iter().filter_map(|(name, has)| has.then_some(name)).collect()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_report_is_one_object_with_every_part() {
        let info = Info::gather();
        let v: serde_json::Value = serde_json::from_str(&info.to_json().unwrap()).unwrap();
        for key in ["kd_run", "libtorch", "cpu_capability", "features", "cpu", "threads", "cuda_available", "gpus"] {
            assert!(v.get(key).is_some(), "{key} missing from {v}");
        }
        assert!(v["libtorch"].as_str().unwrap().starts_with("2."), "{v}");
        assert_eq!(v["features"]["gloo"], kd_native::dist::available(kd_native::dist::Backend::Gloo));
        assert_eq!(v["features"]["onednn_linear"], kd_native::linear::onednn_available());
        assert!(v["threads"].as_i64().unwrap() >= 1);
        #[cfg(target_arch = "x86_64")]
        assert!(v["cpu"]["extensions"].as_array().unwrap().iter().any(|e| e == "sse4.2"), "{v}");
        let text = info.to_text();
        assert!(text.contains("libtorch: 2.") && text.contains("cpu threads: "), "{text}");
    }
}
