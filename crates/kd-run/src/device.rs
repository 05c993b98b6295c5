//! Which device a setting or flag names (`auto`, `cpu`, `cuda`, `cuda:N`: the one parse and
//! selection that experiment files, `kd-run bench` and `kd-run store targets` share), and what
//! the GPU is: its name (from the CUDA driver) and its peak dense throughput, so that the share
//! of peak a training run reaches is logged without a setting.

use anyhow::{bail, Result};
use std::ffi::{c_char, c_int, c_void, CStr};
use tch::Device;

/// The device names every setting and flag accepts, for error messages.
pub const NAMES: &str = "\"auto\", \"cpu\", \"cuda\" or \"cuda:N\"";

/// A device as a setting or flag names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// The first GPU when libtorch sees one, else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// GPU `N` (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl std::str::FromStr for Choice {
    type Err = anyhow::Error;

    /// Parses `auto`, `cpu`, `cuda` (GPU 0) or `cuda:N`: the one parse of a device name.
    fn from_str(name: &str) -> Result<Choice> {
        let parsed = match name {
            "auto" => Some(Choice::Auto),
            "cpu" => Some(Choice::Cpu),
            "cuda" => Some(Choice::Cuda(0)),
            _ => name.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(Choice::Cuda),
        };
        parsed.ok_or_else(|| anyhow::anyhow!("expected {NAMES}, got {name:?}"))
    }
}

impl std::fmt::Display for Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Choice::Auto => f.write_str("auto"),
            Choice::Cpu => f.write_str("cpu"),
            Choice::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl serde::Serialize for Choice {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Choice {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Choice, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(|e: anyhow::Error| serde::de::Error::custom(e))
    }
}

impl Choice {
    /// The device chosen, checked against the CUDA devices libtorch sees; `what` names the
    /// setting or flag in the error (`device`, `--device`).
    pub fn select(self, what: &str) -> Result<Device> {
        let cuda = tch::Cuda::is_available();
        let count = if cuda { tch::Cuda::device_count().max(0) as usize } else { 0 };
        match self {
            Choice::Auto => Ok(Device::cuda_if_available()),
            Choice::Cpu => Ok(Device::Cpu),
            Choice::Cuda(index) if index < count => Ok(Device::Cuda(index)),
            Choice::Cuda(_) => {
                bail!("{what} = \"{self}\" but libtorch sees {count} CUDA device(s); use \"auto\" or \"cpu\"")
            }
        }
    }
}

/// How a device is named to PyTorch and in `kd-run`'s output: `cpu` or `cuda:N`.
pub fn torch_name(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}

/// Waits for the work queued on `device` (a GPU's stream) to finish; nothing on the CPU, whose
/// operations return when done. What a timing of GPU work must call before reading the clock.
pub fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Peak dense (not 2:4 sparse) tensor throughput of a GPU in TFLOP/s, from NVIDIA's data sheets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PeakTflops {
    /// bf16 matrix products with f32 accumulation.
    pub bf16: f64,
    /// TF32 matrix products (f32 tensors with TF32 tensor cores enabled).
    pub tf32: f64,
    /// Plain f32 (no tensor cores).
    pub fp32: f64,
}

/// The known GPUs: the tokens their CUDA name must contain (after "NVIDIA "), first match wins.
/// Dense figures of the SXM / PCIe data sheets (H100 and H200 share the Hopper SXM figures).
const KNOWN: [(&[&str], PeakTflops); 10] = [
    (&["H100", "PCIe"], PeakTflops { bf16: 756.0, tf32: 378.0, fp32: 51.0 }),
    (&["H100", "NVL"], PeakTflops { bf16: 835.0, tf32: 418.0, fp32: 60.0 }),
    (&["H200", "NVL"], PeakTflops { bf16: 835.0, tf32: 418.0, fp32: 60.0 }),
    (&["H100"], PeakTflops { bf16: 989.0, tf32: 494.0, fp32: 67.0 }),
    (&["H200"], PeakTflops { bf16: 989.0, tf32: 494.0, fp32: 67.0 }),
    (&["A100"], PeakTflops { bf16: 312.0, tf32: 156.0, fp32: 19.5 }),
    (&["L40S"], PeakTflops { bf16: 362.0, tf32: 183.0, fp32: 91.6 }),
    (&["L4"], PeakTflops { bf16: 121.0, tf32: 60.0, fp32: 30.3 }),
    (&["A10"], PeakTflops { bf16: 125.0, tf32: 62.5, fp32: 31.2 }),
    (&["A30"], PeakTflops { bf16: 165.0, tf32: 82.0, fp32: 10.3 }),
];

/// The peak throughput of the GPU called `name` (as the CUDA driver names it, e.g.
/// "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"), if it is one of the known ones. A name
/// matches when it holds each listed word as a whole token ("A10" does not match an A100 or an
/// A10G).
pub fn peak_tflops(name: &str) -> Option<PeakTflops> {
    let tokens: Vec<&str> = name.split([' ', '-', '_']).filter(|t| !t.is_empty()).collect();
    KNOWN
        .iter()
        .find(|(words, _)| words.iter().all(|w| tokens.iter().any(|t| t.eq_ignore_ascii_case(w))))
        .map(|(_, peak)| *peak)
}

/// The name of CUDA device `ordinal` from the CUDA driver (`cuDeviceGetName` of `libcuda.so.1`,
/// the driver every CUDA program loads), or `None` without a driver or such a device.
pub fn cuda_device_name(ordinal: usize) -> Option<String> {
    type CuInit = unsafe extern "C" fn(c_int) -> c_int;
    type CuDeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
    type CuDeviceGetName = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;
    extern "C" {
        fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
        fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    }
    const RTLD_NOW: c_int = 2;
    let ordinal = c_int::try_from(ordinal).ok()?;
    // SAFETY: dlopen/dlsym get NUL-terminated strings; the library is never closed, so the
    // symbols stay valid; each symbol is called with the signature of the CUDA driver API
    // (cuda.h: CUresult cuInit(unsigned int), cuDeviceGet(CUdevice *, int),
    // cuDeviceGetName(char *, int, CUdevice)), into a buffer of the length passed.
    unsafe {
        let lib = dlopen(c"libcuda.so.1".as_ptr(), RTLD_NOW);
        if lib.is_null() {
            return None;
        }
        let symbol = |name: &CStr| {
            let f = dlsym(lib, name.as_ptr());
            (!f.is_null()).then_some(f)
        };
        let init: CuInit = std::mem::transmute(symbol(c"cuInit")?);
        let get: CuDeviceGet = std::mem::transmute(symbol(c"cuDeviceGet")?);
        let get_name: CuDeviceGetName = std::mem::transmute(symbol(c"cuDeviceGetName")?);
        if init(0) != 0 {
            return None;
        }
        let mut device: c_int = 0;
        if get(&mut device, ordinal) != 0 {
            return None;
        }
        let mut buffer = [0 as c_char; 256];
        if get_name(buffer.as_mut_ptr(), buffer.len() as c_int, device) != 0 {
            return None;
        }
        Some(CStr::from_ptr(buffer.as_ptr()).to_string_lossy().into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_are_recognized_by_their_cuda_names() {
        // (name, dense bf16 TFLOP/s, dense TF32 TFLOP/s)
        let cases: [(&str, Option<(f64, f64)>); 12] = [
            ("NVIDIA H100 80GB HBM3", Some((989.0, 494.0))),
            ("NVIDIA H200", Some((989.0, 494.0))),
            ("NVIDIA H100 PCIe", Some((756.0, 378.0))),
            ("NVIDIA H100 NVL", Some((835.0, 418.0))),
            ("NVIDIA A100-SXM4-80GB", Some((312.0, 156.0))),
            ("NVIDIA A100 80GB PCIe", Some((312.0, 156.0))),
            ("NVIDIA L4", Some((121.0, 60.0))),
            ("NVIDIA L40S", Some((362.0, 183.0))),
            ("NVIDIA A10", Some((125.0, 62.5))),
            // Not an A10, nor an L4, nor anything known.
            ("NVIDIA A10G", None),
            ("NVIDIA L40", None),
            ("Tesla T4", None),
        ];
        for (name, want) in cases {
            assert_eq!(peak_tflops(name).map(|p| (p.bf16, p.tf32)), want, "{name}");
        }
    }

    #[test]
    fn device_names_parse_once_print_back_and_others_are_refused() {
        let parse = |name: &str| name.parse::<Choice>().ok();
        assert_eq!(parse("auto"), Some(Choice::Auto));
        assert_eq!(parse("cpu"), Some(Choice::Cpu));
        assert_eq!(parse("cuda"), Some(Choice::Cuda(0)));
        assert_eq!(parse("cuda:3"), Some(Choice::Cuda(3)));
        for choice in [Choice::Auto, Choice::Cpu, Choice::Cuda(0), Choice::Cuda(3)] {
            assert_eq!(parse(&choice.to_string()), Some(choice), "{choice}");
        }
        for bad in ["gpu", "CPU", "cuda:", "cuda:x", "cuda:-1", "cuda0", ""] {
            let e = bad.parse::<Choice>().unwrap_err().to_string();
            assert_eq!(e, format!("expected {NAMES}, got {bad:?}"));
        }
        assert_eq!(Choice::Cpu.select("--device").unwrap(), Device::Cpu);
        assert_eq!(Choice::Auto.select("--device").unwrap(), Device::cuda_if_available());
        let e = Choice::Cuda(10_000).select("device").unwrap_err().to_string();
        assert!(e.starts_with("device = \"cuda:10000\" but libtorch sees"), "{e}");
        assert!(e.contains("CUDA device(s); use \"auto\" or \"cpu\""), "{e}");
        assert_eq!((torch_name(Device::Cpu), torch_name(Device::Cuda(2))), ("cpu".into(), "cuda:2".into()));
        let toml: toml::Table = toml::from_str("device = \"cuda:1\"").unwrap();
        assert_eq!(toml["device"].clone().try_into::<Choice>().unwrap(), Choice::Cuda(1));
    }

    #[test]
    fn no_name_for_a_device_that_does_not_exist() {
        assert_eq!(cuda_device_name(10_000), None);
    }
}
