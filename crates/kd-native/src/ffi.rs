//! The only module with `unsafe`: declarations of `shim.cpp`'s C functions and safe wrappers
//! over them. The other modules check their arguments and call these wrappers.
//!
//! # Safety argument
//! - Tensors cross as tch's `C_tensor` pointers, which are `torch::Tensor*` (torch-sys's
//!   `torch_api.h`). Every pointer comes from a `&Tensor` or `&mut Tensor` borrowed for the whole
//!   call, so it is live; the shim copies the `at::Tensor` handles (reference counted) and never
//!   keeps them after returning. A tensor that the C++ side writes into comes from a `&mut
//!   Tensor` or from a fresh tensor the caller owns (tch's own in-place ops work the same way on
//!   storage shared by shallow clones).
//! - Pointer arrays are built from slices and passed with their length; the shim reads exactly
//!   that many entries.
//! - No C++ exception crosses the boundary: every shim function catches them and returns a
//!   `malloc`'ed message (null on success), which [`check`] copies and frees exactly once.
//! - Strings passed in are `CString`s that outlive the call. The name buffer for device
//!   properties is a Rust array whose length is passed; the shim writes a NUL-terminated
//!   string within it (`snprintf`).
//! - `Group` and `Graph` own their C++ objects, created by the shim's `*_new` / `*_begin`
//!   functions, and free them once in `Drop`; they are neither `Clone` nor `Sync`. They are not
//!   `Send` either (raw pointers), which keeps each one on the thread that made it.
use std::ffi::{c_char, c_int, CStr, CString};
use tch::Tensor;
use torch_sys::C_tensor;

/// An error message returned by the shim.
pub(crate) type ShimResult<T> = Result<T, String>;

mod raw {
    use super::*;

    pub enum KdGroup {}
    pub enum KdGraph {}

    extern "C" {
        pub fn kd_native_free_error(message: *mut c_char);
        pub fn kd_native_features() -> c_int;
        pub fn kd_native_libtorch_text(which: c_int) -> *mut c_char;
        pub fn kd_native_fused_sgd(
            params: *const *mut C_tensor,
            grads: *const *mut C_tensor,
            momentum_buffers: *const *mut C_tensor,
            n: usize,
            weight_decay: f64,
            momentum: f64,
            lr: f64,
            lr_tensor: *const C_tensor,
            dampening: f64,
            nesterov: bool,
            is_first_step: bool,
        ) -> *mut c_char;
        pub fn kd_native_fused_adam(
            params: *const *mut C_tensor,
            grads: *const *mut C_tensor,
            exp_avgs: *const *mut C_tensor,
            exp_avg_sqs: *const *mut C_tensor,
            steps: *const *mut C_tensor,
            n: usize,
            lr: f64,
            lr_tensor: *const C_tensor,
            beta1: f64,
            beta2: f64,
            weight_decay: f64,
            eps: f64,
            decoupled_weight_decay: bool,
        ) -> *mut c_char;
        pub fn kd_native_onednn_linear_available() -> bool;
        pub fn kd_native_onednn_bf16_available() -> bool;
        pub fn kd_native_onednn_linear(
            x: *const C_tensor,
            weight: *const C_tensor,
            bias: *const C_tensor,
            relu: bool,
            out: *mut C_tensor,
        ) -> *mut c_char;
        pub fn kd_native_set_tf32(cublas: bool, cudnn: bool);
        pub fn kd_native_generator_state(device: c_int, out: *mut C_tensor) -> *mut c_char;
        pub fn kd_native_set_generator_state(device: c_int, state: *const C_tensor) -> *mut c_char;
        pub fn kd_native_tf32_cublas() -> bool;
        pub fn kd_native_tf32_cudnn() -> bool;
        pub fn kd_native_group_new(
            kind: c_int,
            host: *const c_char,
            port: u16,
            rank: c_int,
            size: c_int,
            launcher_store: bool,
            timeout_ms: i64,
            device_kind: c_int,
            device_arg: *const c_char,
            out: *mut *mut KdGroup,
        ) -> *mut c_char;
        pub fn kd_native_group_free(group: *mut KdGroup);
        pub fn kd_native_quiet_failures(prefix: *const c_char);
        pub fn kd_native_cuda_device_properties(
            device: c_int,
            name: *mut c_char,
            name_len: usize,
            total_memory: *mut i64,
            major: *mut c_int,
            minor: *mut c_int,
            multiprocessors: *mut c_int,
        ) -> *mut c_char;
        pub fn kd_native_graph_capture_begin(device: c_int, out: *mut *mut KdGraph) -> *mut c_char;
        pub fn kd_native_graph_capture_end(graph: *mut KdGraph) -> *mut c_char;
        pub fn kd_native_graph_replay(graph: *mut KdGraph) -> *mut c_char;
        pub fn kd_native_graph_free(graph: *mut KdGraph);
        pub fn kd_native_all_reduce_sum(group: *mut KdGroup, tensor: *mut C_tensor, timeout_ms: i64) -> *mut c_char;
        pub fn kd_native_broadcast(
            group: *mut KdGroup,
            tensor: *mut C_tensor,
            root: c_int,
            timeout_ms: i64,
        ) -> *mut c_char;
        pub fn kd_native_all_gather(
            group: *mut KdGroup,
            input: *mut C_tensor,
            outputs: *const *mut C_tensor,
            n_outputs: usize,
            timeout_ms: i64,
        ) -> *mut c_char;
        pub fn kd_native_barrier(group: *mut KdGroup, timeout_ms: i64) -> *mut c_char;
    }
}

/// Turns a shim return value into a `Result`, freeing the message.
fn check(message: *mut c_char) -> ShimResult<()> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string from the shim's malloc, not yet freed.
    let text = unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned();
    // SAFETY: freed once, by the allocator's matching free, after the copy above.
    unsafe { raw::kd_native_free_error(message) };
    Err(text)
}

/// Pointers to the tensors of a list, for a call that reads them (or writes into tensors the
/// caller holds mutably: see the module's safety argument).
fn ptrs<'a>(ts: impl IntoIterator<Item = &'a Tensor>) -> Vec<*mut C_tensor> {
    ts.into_iter().map(|t| t.as_ptr() as *mut C_tensor).collect()
}

fn ptr_or_null(t: Option<&Tensor>) -> *const C_tensor {
    t.map_or(std::ptr::null(), Tensor::as_ptr)
}

/// A text about libtorch: 0 its version, 1 the CPU capability its kernels dispatch to.
pub(crate) fn libtorch_text(which: i32) -> String {
    // SAFETY: the shim returns a malloc'd NUL-terminated string (or null), freed here once.
    unsafe {
        let p = raw::kd_native_libtorch_text(which);
        if p.is_null() {
            return "unknown".into();
        }
        let text = CStr::from_ptr(p).to_string_lossy().into_owned();
        raw::kd_native_free_error(p);
        text
    }
}

/// See `kd_native_quiet_failures` in the shim: an exception escaping a thread of the collective
/// library ends the process with one line starting with `prefix` (status 1), and libtorch's own
/// warnings stay off stderr unless `TORCH_CPP_LOG_LEVEL` is set.
pub(crate) fn quiet_failures(prefix: &str) {
    let prefix = CString::new(prefix.replace('\0', " ")).expect("no NUL byte left");
    // SAFETY: the shim copies the string before returning.
    unsafe { raw::kd_native_quiet_failures(prefix.as_ptr()) }
}

/// Bit 0: built with Gloo; bit 1: built with NCCL.
pub(crate) fn features() -> i32 {
    // SAFETY: no arguments; reads compile-time constants.
    unsafe { raw::kd_native_features() }
}

/// The arguments of `at::_fused_sgd_` that are not tensor lists.
pub(crate) struct SgdArgs<'a> {
    pub weight_decay: f64,
    pub momentum: f64,
    pub lr: f64,
    pub lr_tensor: Option<&'a Tensor>,
    pub dampening: f64,
    pub nesterov: bool,
    pub is_first_step: bool,
}

/// `at::_fused_sgd_`; the caller has checked that the lists have equal lengths (`buffers` may be
/// empty when momentum is 0).
pub(crate) fn fused_sgd(
    params: &mut [Tensor],
    grads: &[Tensor],
    buffers: &mut [Tensor],
    a: &SgdArgs,
) -> ShimResult<()> {
    assert!(grads.len() == params.len() && (buffers.is_empty() || buffers.len() == params.len()));
    let (p, g, b) = (ptrs(params.iter()), ptrs(grads), ptrs(buffers.iter()));
    let b_ptr = if b.is_empty() { std::ptr::null() } else { b.as_ptr() };
    // SAFETY: see the module's argument; every array holds `params.len()` live tensors (or is null).
    check(unsafe {
        raw::kd_native_fused_sgd(
            p.as_ptr(),
            g.as_ptr(),
            b_ptr,
            p.len(),
            a.weight_decay,
            a.momentum,
            a.lr,
            ptr_or_null(a.lr_tensor),
            a.dampening,
            a.nesterov,
            a.is_first_step,
        )
    })
}

/// The arguments of `at::_fused_adam_` / `at::_fused_adamw_` that are not tensor lists.
pub(crate) struct AdamArgs<'a> {
    pub lr: f64,
    pub lr_tensor: Option<&'a Tensor>,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
    pub decoupled_weight_decay: bool,
}

/// `at::_fused_adam_` (or `_fused_adamw_`); the caller has checked that the lists have equal lengths.
pub(crate) fn fused_adam(
    params: &mut [Tensor],
    grads: &[Tensor],
    exp_avgs: &mut [Tensor],
    exp_avg_sqs: &mut [Tensor],
    steps: &mut [Tensor],
    a: &AdamArgs,
) -> ShimResult<()> {
    let n = params.len();
    assert!([grads.len(), exp_avgs.len(), exp_avg_sqs.len(), steps.len()].iter().all(|&l| l == n));
    let (p, g) = (ptrs(params.iter()), ptrs(grads));
    let (m, v, s) = (ptrs(exp_avgs.iter()), ptrs(exp_avg_sqs.iter()), ptrs(steps.iter()));
    // SAFETY: see the module's argument; every array holds `n` live tensors.
    check(unsafe {
        raw::kd_native_fused_adam(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            s.as_ptr(),
            n,
            a.lr,
            ptr_or_null(a.lr_tensor),
            a.beta1,
            a.beta2,
            a.weight_decay,
            a.eps,
            a.decoupled_weight_decay,
        )
    })
}

/// The state of the default generator of `device` (-1: the CPU).
pub(crate) fn generator_state(device: i32) -> ShimResult<Tensor> {
    let mut out = Tensor::empty([0], (tch::Kind::Uint8, tch::Device::Cpu));
    // SAFETY: `out` is a live tensor owned here; the shim assigns the state to it.
    check(unsafe { raw::kd_native_generator_state(device, out.as_mut_ptr()) })?;
    Ok(out)
}

/// Restores a state [`generator_state`] returned.
pub(crate) fn set_generator_state(device: i32, state: &Tensor) -> ShimResult<()> {
    // SAFETY: a live tensor, borrowed for the call.
    check(unsafe { raw::kd_native_set_generator_state(device, state.as_ptr()) })
}

pub(crate) fn onednn_linear_available() -> bool {
    // SAFETY: looks up an operator in libtorch's registry; no arguments.
    unsafe { raw::kd_native_onednn_linear_available() }
}

pub(crate) fn onednn_bf16_available() -> bool {
    // SAFETY: calls a libtorch operator without arguments.
    unsafe { raw::kd_native_onednn_bf16_available() }
}

/// `relu?(x W^T + b)` with the forward product on oneDNN; the caller has checked the arguments.
pub(crate) fn onednn_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, relu: bool) -> ShimResult<Tensor> {
    let mut out = Tensor::new();
    let bias = bias.map_or(std::ptr::null(), |b| b.as_ptr());
    // SAFETY: live tensors borrowed for the call (a null bias is allowed); the shim assigns the
    // result to `out`, a tensor owned here.
    check(unsafe { raw::kd_native_onednn_linear(x.as_ptr(), weight.as_ptr(), bias, relu, out.as_mut_ptr()) })?;
    Ok(out)
}

pub(crate) fn set_tf32(cublas: bool, cudnn: bool) {
    // SAFETY: sets two flags of libtorch's global context.
    unsafe { raw::kd_native_set_tf32(cublas, cudnn) }
}

pub(crate) fn tf32() -> (bool, bool) {
    // SAFETY: reads two flags of libtorch's global context.
    unsafe { (raw::kd_native_tf32_cublas(), raw::kd_native_tf32_cudnn()) }
}

/// The raw fields of `cudaDeviceProp` that [`crate::cuda::DeviceProperties`] exposes.
pub(crate) struct RawDeviceProperties {
    pub name: String,
    pub total_memory: i64,
    pub major: i32,
    pub minor: i32,
    pub multiprocessors: i32,
}

pub(crate) fn device_properties(device: i32) -> ShimResult<RawDeviceProperties> {
    let mut name = [0 as c_char; 256];
    let (mut total_memory, mut major, mut minor, mut multiprocessors) = (0i64, 0, 0, 0);
    // SAFETY: `name` is writable for its length, the other out-pointers are live locals.
    check(unsafe {
        raw::kd_native_cuda_device_properties(
            device,
            name.as_mut_ptr(),
            name.len(),
            &mut total_memory,
            &mut major,
            &mut minor,
            &mut multiprocessors,
        )
    })?;
    // SAFETY: the shim wrote a NUL-terminated string into `name` (snprintf within its length).
    let name = unsafe { CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned();
    Ok(RawDeviceProperties { name, total_memory, major, minor, multiprocessors })
}

/// A CUDA graph owned by the shim.
pub(crate) struct Graph(*mut raw::KdGraph);

impl Graph {
    pub fn capture_begin(device: i32) -> ShimResult<Graph> {
        let mut out = std::ptr::null_mut();
        // SAFETY: `out` is a live local; on success the shim stores a new graph in it.
        check(unsafe { raw::kd_native_graph_capture_begin(device, &mut out) })?;
        Ok(Graph(out))
    }

    pub fn capture_end(&mut self) -> ShimResult<()> {
        // SAFETY: `self.0` is the live graph from capture_begin.
        check(unsafe { raw::kd_native_graph_capture_end(self.0) })
    }

    pub fn replay(&mut self) -> ShimResult<()> {
        // SAFETY: `self.0` is the live graph from capture_begin.
        check(unsafe { raw::kd_native_graph_replay(self.0) })
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from capture_begin and is freed only here.
        unsafe { raw::kd_native_graph_free(self.0) }
    }
}

/// How the Gloo transport picks its network device.
pub(crate) enum GlooDeviceArg<'a> {
    Default,
    Interface(&'a str),
    Hostname(&'a str),
}

/// A c10d process group (with its TCPStore) owned by the shim.
pub(crate) struct Group(*mut raw::KdGroup);

fn cstring(s: &str, what: &str) -> ShimResult<CString> {
    CString::new(s).map_err(|_| format!("{what} `{s}` contains a NUL byte"))
}

impl Group {
    /// kind 0: Gloo, 1: NCCL; `launcher_store`: the store already runs (rank 0 connects too).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kind: i32,
        host: &str,
        port: u16,
        rank: i32,
        size: i32,
        launcher_store: bool,
        timeout_ms: i64,
        device: GlooDeviceArg,
    ) -> ShimResult<Group> {
        let host = cstring(host, "the master address")?;
        let (device_kind, device_arg) = match device {
            GlooDeviceArg::Default => (0, cstring("", "")?),
            GlooDeviceArg::Interface(s) => (1, cstring(s, "the network interface")?),
            GlooDeviceArg::Hostname(s) => (2, cstring(s, "the host name")?),
        };
        let mut out = std::ptr::null_mut();
        // SAFETY: the strings outlive the call, `out` is a live local; on success the shim stores a
        // new group in it.
        check(unsafe {
            raw::kd_native_group_new(
                kind,
                host.as_ptr(),
                port,
                rank,
                size,
                launcher_store,
                timeout_ms,
                device_kind,
                device_arg.as_ptr(),
                &mut out,
            )
        })?;
        Ok(Group(out))
    }
}

impl Group {
    /// Sums `tensor` (contiguous) in place across the group.
    pub fn all_reduce_sum(&self, tensor: &mut Tensor, timeout_ms: i64) -> ShimResult<()> {
        // SAFETY: live group and tensor, borrowed for the call.
        check(unsafe { raw::kd_native_all_reduce_sum(self.0, tensor.as_mut_ptr(), timeout_ms) })
    }

    pub fn broadcast(&self, tensor: &mut Tensor, root: i32, timeout_ms: i64) -> ShimResult<()> {
        // SAFETY: live group and tensor, borrowed for the call.
        check(unsafe { raw::kd_native_broadcast(self.0, tensor.as_mut_ptr(), root, timeout_ms) })
    }

    /// Fills `outputs` (one per rank, each shaped like `input`, owned by the caller).
    pub fn all_gather(&self, input: &Tensor, outputs: &mut [Tensor], timeout_ms: i64) -> ShimResult<()> {
        let outs = ptrs(outputs.iter());
        // SAFETY: live group and tensors; `outs` holds `outputs.len()` pointers.
        check(unsafe {
            raw::kd_native_all_gather(self.0, input.as_ptr() as *mut C_tensor, outs.as_ptr(), outs.len(), timeout_ms)
        })
    }

    pub fn barrier(&self, timeout_ms: i64) -> ShimResult<()> {
        // SAFETY: live group.
        check(unsafe { raw::kd_native_barrier(self.0, timeout_ms) })
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from kd_native_group_new and is freed only here.
        unsafe { raw::kd_native_group_free(self.0) }
    }
}
