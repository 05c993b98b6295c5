// The C ABI over the libtorch pieces that tch does not expose: fused optimizer steps, linear
// layers on oneDNN, the TF32 switches, and (with KD_NATIVE_GLOO / KD_NATIVE_NCCL) c10d process
// groups.
//
// Every function returns nullptr on success or a malloc'ed error message that the caller frees
// with kd_native_free_error: no C++ exception ever crosses into Rust. Tensors arrive as tch's
// `torch::Tensor*` (torch-sys's torch_api.h: `typedef torch::Tensor *tensor`); the shim never
// takes ownership of them.
//
// One translation unit on purpose: the torch headers make each one cost a minute or more.

#include <ATen/Context.h>
#include <ATen/Version.h>
#include <torch/headeronly/version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adam.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/_fused_sgd.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/threshold_backward.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <c10/util/Exception.h>
#include <c10/util/Logging.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#if defined(KD_NATIVE_GLOO) || defined(KD_NATIVE_NCCL)
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#endif
#ifdef KD_NATIVE_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef KD_NATIVE_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#ifdef KD_NATIVE_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <optional>

// Declared here rather than through ATen/cuda/CUDAContextLight.h, which pulls in cuBLAS and
// cuSPARSE headers that need CCCL; the function is exported by libtorch_cuda.
namespace at::cuda {
TORCH_CUDA_CPP_API cudaDeviceProp* getDeviceProperties(c10::DeviceIndex device);
}

// A graph, and while it is being captured, the side stream it is captured on (capture on the
// default stream is not allowed).
struct KdGraph {
  at::cuda::CUDAGraph graph;
  std::optional<c10::cuda::CUDAStreamGuard> capture_stream;
};
#else
struct KdGraph;
#endif

namespace {

char* copy_message(const char* what) {
  char* out = static_cast<char*>(std::malloc(std::strlen(what) + 1));
  if (out != nullptr) {
    std::strcpy(out, what);
  }
  return out;
}

// Runs `body`, turning any exception into a returned message. c10::Error's what() carries a
// C++ backtrace; the message without it is what a user needs.
template <typename F>
char* guarded(F body) {
  try {
    body();
    return nullptr;
  } catch (const c10::Error& e) {
    return copy_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return copy_message(e.what());
  } catch (...) {
    return copy_message("unknown C++ exception");
  }
}

std::vector<at::Tensor> tensor_list(at::Tensor* const* ts, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    out.push_back(*ts[i]);
  }
  return out;
}

}  // namespace

#if defined(KD_NATIVE_GLOO) || defined(KD_NATIVE_NCCL)

struct KdGroup {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

namespace {

// Rank 0 serves the store unless the launcher already does (torchrun's agent store). The
// server does not wait for the others here: check_launch does, and names who is missing.
c10::intrusive_ptr<c10d::Store> connect_store(const char* host, uint16_t port, int rank, int size,
                                              bool launcher_store, std::chrono::milliseconds timeout) {
  c10d::TCPStoreOptions opts;
  opts.port = port;
  opts.isServer = rank == 0 && !launcher_store;
  opts.numWorkers = static_cast<size_t>(size);
  opts.waitWorkers = false;
  opts.timeout = timeout;
  return c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
}

std::string text_of(const std::vector<uint8_t>& bytes) {
  return std::string(bytes.begin(), bytes.end());
}

std::vector<uint8_t> bytes_of(const std::string& text) {
  return std::vector<uint8_t>(text.begin(), text.end());
}

// A value no other process of any round draws: random bits, the process id and the clock.
std::string fresh_nonce() {
  std::random_device bits;
  const auto now = std::chrono::steady_clock::now().time_since_epoch().count();
  std::ostringstream out;
  out << std::hex << bits() << bits() << '-' << getpid() << '-' << now;
  return out.str();
}

std::string missing_ranks_message(const std::string& missing, int size, std::chrono::milliseconds timeout) {
  return "waited " + std::to_string(timeout.count() / 1000) + " s for rank(s) " + missing + " of " +
         std::to_string(size) + " to join; they were not started, or started with another MASTER_ADDR or "
         "MASTER_PORT";
}

// The part of a launcher's store where this incarnation of the group meets. torchrun's agent
// keeps its store across restarts, so the keys of earlier incarnations are still there, and its
// restart count cannot name the incarnation: an agent whose ranks were healthy restarts them
// after a membership change without counting it, so the ranks of one incarnation can see
// different counts. Instead rank 0 draws a fresh round name and hands it to each rank that says
// hello with a fresh nonce of its own: a rank takes only the answer to its own nonce, so
// neither side can be misled by a key an earlier incarnation left (all of whose processes the
// agents stopped before starting this one). Rank 0 answers every hello it sees, stale ones
// included, until every rank of its world has joined the round.
std::string meet_round(c10d::Store& store, int rank, int size, std::chrono::milliseconds timeout,
                       std::chrono::steady_clock::time_point deadline) {
  const auto pause = std::chrono::milliseconds(20);
  if (rank != 0) {
    const std::string nonce = fresh_nonce();
    const std::string hello = "kd/hello/" + std::to_string(rank);
    const std::string welcome = "kd/welcome/" + std::to_string(rank);
    store.set(hello, bytes_of(nonce));
    for (;;) {
      if (store.check({welcome})) {
        const std::string answer = text_of(store.get(welcome));
        if (answer.rfind(nonce + ":", 0) == 0) {
          return answer.substr(nonce.size() + 1);
        }
      }
      if (std::chrono::steady_clock::now() >= deadline) {
        throw std::runtime_error(missing_ranks_message("0", size, timeout));
      }
      std::this_thread::sleep_for(pause);
    }
  }
  const std::string round = fresh_nonce();
  // Ranks past the world size are answered too, so that check_launch names them.
  std::vector<std::string> answered(static_cast<size_t>(size) + 1);
  while (std::chrono::steady_clock::now() < deadline) {
    bool all_joined = true;
    for (int r = 1; r <= size; ++r) {
      const std::string hello = "kd/hello/" + std::to_string(r);
      if (store.check({hello})) {
        const std::string nonce = text_of(store.get(hello));
        if (nonce != answered[static_cast<size_t>(r)]) {
          store.set("kd/welcome/" + std::to_string(r), bytes_of(nonce + ":" + round));
          answered[static_cast<size_t>(r)] = nonce;
        }
      }
      if (r < size && !store.check({"kd/round/" + round + "/kd/size/" + std::to_string(r)})) {
        all_joined = false;
      }
    }
    if (all_joined) {
      break;
    }
    std::this_thread::sleep_for(pause);
  }
  return round;
}

// Every rank announces itself (its rank, once, and its world size) in the store before the
// backend connects, and waits until every rank of its world has: a rank started twice, ranks
// started with different world sizes, and ranks that never come are named at once or when the
// timeout expires, not found by a backend that waits for connections that never come. A rank
// that finds a mismatch leaves its message under kd/abort for the others (rank 0, which serves
// the store, stays a moment so that they can read it).
void check_launch(c10d::Store& store, int rank, int size, bool serves, std::chrono::milliseconds timeout,
                  std::chrono::steady_clock::time_point deadline) {
  const std::string me = std::to_string(rank);
  const std::string world = std::to_string(size);
  if (store.add("kd/join/" + me, 1) > 1) {
    throw std::runtime_error("another process already joined as rank " + me +
                             ": two processes were started with RANK=" + me +
                             " (each rank must be started once)");
  }
  auto stop = [&](const std::string& why) {
    try {
      store.set("kd/abort", std::vector<uint8_t>(why.begin(), why.end()));
      if (serves) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1500));
      }
    } catch (...) {
    }
    throw std::runtime_error(why);
  };
  store.set("kd/size/" + me, std::vector<uint8_t>(world.begin(), world.end()));
  std::vector<bool> seen(static_cast<size_t>(size), false);
  seen[static_cast<size_t>(rank)] = true;
  for (;;) {
    std::string missing;
    try {
      if (store.check({"kd/abort"})) {
        throw std::runtime_error("another rank stopped the rendezvous: " + text_of(store.get("kd/abort")));
      }
      for (int r = 0; r <= size; ++r) {
        if (r < size && seen[static_cast<size_t>(r)]) {
          continue;
        }
        const std::string key = "kd/size/" + std::to_string(r);
        if (!store.check({key})) {
          continue;
        }
        const std::string theirs = text_of(store.get(key));
        if (theirs != world) {
          stop("rank " + std::to_string(r) + " was started with WORLD_SIZE=" + theirs + ", rank " + me +
               " with WORLD_SIZE=" + world + ": every rank must be started with the same world size");
        }
        if (r == size) {
          stop("a process joined as rank " + world + ", but WORLD_SIZE is " + world + " (ranks are 0 to " +
               std::to_string(size - 1) + ")");
        }
        seen[static_cast<size_t>(r)] = true;
      }
    } catch (const std::runtime_error&) {
      throw;
    } catch (const std::exception& e) {
      throw std::runtime_error(std::string("the rendezvous store went away while this rank waited for the others "
                                           "(rank 0 serves it: its error says why): ") + e.what());
    }
    for (int r = 0; r < size; ++r) {
      if (!seen[static_cast<size_t>(r)]) {
        missing += (missing.empty() ? "" : ", ") + std::to_string(r);
      }
    }
    if (missing.empty()) {
      return;
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      throw std::runtime_error(missing_ranks_message(missing, size, timeout));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

// What a rank prints when a C++ exception escapes a thread of the collective library (Gloo
// throws in its transport threads when ranks exchange data of different sizes): one line and
// exit status 1 instead of std::terminate's abort.
std::string terminate_prefix = "error: ";

[[noreturn]] void on_terminate() {
  std::string what = "an uncaught C++ exception";
  if (std::exception_ptr e = std::current_exception()) {
    try {
      std::rethrow_exception(e);
    } catch (const c10::Error& x) {
      what = x.what_without_backtrace();
    } catch (const std::exception& x) {
      what = x.what();
    } catch (...) {
    }
  }
  if (auto nl = what.find('\n'); nl != std::string::npos) {
    what.resize(nl);
  }
  std::string line = terminate_prefix +
                     "the collective library failed in one of its threads (the ranks exchanged data of different "
                     "sizes: they disagree on the data, the model or a setting): " +
                     what + "\n";
  ssize_t written = ::write(2, line.data(), line.size());
  (void)written;
  ::_exit(1);
}

void wait(const c10::intrusive_ptr<c10d::Work>& work, std::chrono::milliseconds timeout,
          const char* what) {
  if (!work->wait(timeout)) {
    throw std::runtime_error(std::string(what) + " did not complete within " +
                             std::to_string(timeout.count() / 1000.0) + " s");
  }
}

}  // namespace

#else
struct KdGroup;
#endif

extern "C" {

void kd_native_free_error(char* message) {
  std::free(message);
}

// A text about the libtorch this library runs on, to free with kd_native_free_error:
// 0 its version, 1 the CPU kernels it dispatches to (ATen's CPU capability: DEFAULT, AVX2, AVX512).
char* kd_native_libtorch_text(int which) {
  try {
    std::string text = which == 0 ? std::string(TORCH_VERSION) : at::get_cpu_capability();
    return copy_message(text.c_str());
  } catch (...) {
    return copy_message("unknown");
  }
}

// Which optional parts this library was compiled with: bit 0 Gloo, bit 1 NCCL.
int kd_native_features() {
  int features = 0;
#ifdef KD_NATIVE_GLOO
  features |= 1;
#endif
#ifdef KD_NATIVE_NCCL
  features |= 2;
#endif
  return features;
}

// ---- fused optimizer steps ----------------------------------------------------------------

// lr_tensor, when not null, is a 0-dim tensor on the parameters' device and replaces lr.
char* kd_native_fused_sgd(at::Tensor* const* params, at::Tensor* const* grads,
                          at::Tensor* const* momentum_buffers, size_t n, double weight_decay,
                          double momentum, double lr, const at::Tensor* lr_tensor,
                          double dampening, bool nesterov, bool is_first_step) {
  return guarded([&] {
    auto p = tensor_list(params, n);
    auto g = tensor_list(grads, n);
    auto b = momentum_buffers == nullptr ? std::vector<at::Tensor>{} : tensor_list(momentum_buffers, n);
    if (lr_tensor != nullptr) {
      at::_fused_sgd_(p, g, b, weight_decay, momentum, *lr_tensor, dampening, nesterov,
                      /*maximize=*/false, is_first_step);
    } else {
      at::_fused_sgd_(p, g, b, weight_decay, momentum, lr, dampening, nesterov,
                      /*maximize=*/false, is_first_step);
    }
  });
}

char* kd_native_fused_adam(at::Tensor* const* params, at::Tensor* const* grads,
                           at::Tensor* const* exp_avgs, at::Tensor* const* exp_avg_sqs,
                           at::Tensor* const* steps, size_t n, double lr,
                           const at::Tensor* lr_tensor, double beta1, double beta2,
                           double weight_decay, double eps, bool decoupled_weight_decay) {
  return guarded([&] {
    auto p = tensor_list(params, n);
    auto g = tensor_list(grads, n);
    auto m = tensor_list(exp_avgs, n);
    auto v = tensor_list(exp_avg_sqs, n);
    auto s = tensor_list(steps, n);
    std::vector<at::Tensor> max_v;  // amsgrad off
    if (decoupled_weight_decay) {
      if (lr_tensor != nullptr) {
        at::_fused_adamw_(p, g, m, v, max_v, s, *lr_tensor, beta1, beta2, weight_decay, eps,
                          false, false);
      } else {
        at::_fused_adamw_(p, g, m, v, max_v, s, lr, beta1, beta2, weight_decay, eps, false, false);
      }
    } else if (lr_tensor != nullptr) {
      at::_fused_adam_(p, g, m, v, max_v, s, *lr_tensor, beta1, beta2, weight_decay, eps, false,
                       false);
    } else {
      at::_fused_adam_(p, g, m, v, max_v, s, lr, beta1, beta2, weight_decay, eps, false, false);
    }
  });
}

// ---- linear layers on oneDNN --------------------------------------------------------------

}  // extern "C"

namespace {

// libtorch's oneDNN linear layer with an optional fused ReLU (the kernel PyTorch's inductor
// uses on the CPU): mkldnn::_linear_pointwise(Tensor X, Tensor W, Tensor? B, str attr,
// Scalar?[] scalars, str? algorithm) -> Tensor. Null where this libtorch lacks it.
const c10::OperatorHandle* onednn_linear_op() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return op.has_value() && op->hasKernelForDispatchKey(c10::DispatchKey::CPU) ? &*op : nullptr;
}

at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, bool relu) {
  const c10::OperatorHandle* op = onednn_linear_op();
  TORCH_CHECK(op != nullptr, "this libtorch has no oneDNN linear kernel (mkldnn::_linear_pointwise)");
  std::vector<c10::IValue> stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(w);
  stack.emplace_back(b.defined() ? c10::IValue(b) : c10::IValue());
  stack.emplace_back(std::string(relu ? "relu" : "none"));
  stack.emplace_back(c10::List<std::optional<c10::Scalar>>());
  stack.emplace_back(c10::IValue());
  op->callBoxed(&stack);
  return stack.at(0).toTensor();
}

// y = relu?(x W^T + b) with the forward product on oneDNN and the backward pass that of
// PyTorch's linear and ReLU: the same libtorch calls autograd makes for addmm and relu
// (threshold_backward on the output, then mm for the input and weight gradients, a sum over
// the rows for the bias). Not differentiable twice.
struct OnednnLinear : public torch::autograd::Function<OnednnLinear> {
  // The bias is optional: an undefined at::Tensor would be taken for a variable.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& w, const std::optional<at::Tensor>& b, bool relu) {
    at::Tensor y = onednn_linear(x, w, b.value_or(at::Tensor()), relu);
    ctx->save_for_backward({x, w, relu ? y : at::Tensor()});
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["bias"] = b.has_value();
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor g = grads.at(0);
    if (ctx->saved_data["relu"].toBool()) {
      g = at::threshold_backward(g, saved[2], 0);
    }
    at::Tensor gx = ctx->needs_input_grad(0) ? g.mm(saved[1]) : at::Tensor();
    at::Tensor gw = ctx->needs_input_grad(1) ? g.t().mm(saved[0]) : at::Tensor();
    at::Tensor gb = ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(2) ? g.sum(0)
                                                                                : at::Tensor();
    return {gx, gw, gb, at::Tensor()};
  }
};

}  // namespace

extern "C" {

// Whether this libtorch has the oneDNN linear kernel.
bool kd_native_onednn_linear_available() {
  try {
    return onednn_linear_op() != nullptr && at::globalContext().userEnabledMkldnn();
  } catch (...) {
    return false;
  }
}

// Whether oneDNN runs bf16 on this CPU (AVX-512 BF16, AMX or AVX-NE-CONVERT).
bool kd_native_onednn_bf16_available() {
  try {
    const auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_is_mkldnn_bf16_supported", ""});
    if (!op.has_value()) {
      return false;
    }
    std::vector<c10::IValue> stack;
    op->callBoxed(&stack);
    return stack.at(0).toBool();
  } catch (...) {
    return false;
  }
}

// *out = relu?(x W^T + b) on oneDNN (OnednnLinear); bias may be null.
char* kd_native_onednn_linear(const at::Tensor* x, const at::Tensor* weight, const at::Tensor* bias,
                              bool relu, at::Tensor* out) {
  return guarded([&] {
    std::optional<at::Tensor> b;
    if (bias != nullptr) {
      b = *bias;
    }
    *out = OnednnLinear::apply(*x, *weight, b, relu);
  });
}

// ---- TF32 ---------------------------------------------------------------------------------

// ---- random generators ----------------------------------------------------------------------

// The state of libtorch's default generator of a device (device < 0: the CPU's, else CUDA
// device `device`'s), copied into *out (a uint8 tensor), under the generator's lock.
char* kd_native_generator_state(int device, at::Tensor* out) {
  return guarded([&] {
    c10::Device d = device < 0 ? c10::Device(c10::kCPU)
                               : c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(device));
    at::Generator gen = at::globalContext().defaultGenerator(d);
    std::lock_guard<std::mutex> lock(gen.mutex());
    *out = gen.get_state();
  });
}

// Restores a state that kd_native_generator_state returned.
char* kd_native_set_generator_state(int device, const at::Tensor* state) {
  return guarded([&] {
    c10::Device d = device < 0 ? c10::Device(c10::kCPU)
                               : c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(device));
    at::Generator gen = at::globalContext().defaultGenerator(d);
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(*state);
  });
}

void kd_native_set_tf32(bool cublas, bool cudnn) {
  at::globalContext().setAllowTF32CuBLAS(cublas);
  at::globalContext().setAllowTF32CuDNN(cudnn);
}

bool kd_native_tf32_cublas() {
  return at::globalContext().allowTF32CuBLAS();
}

bool kd_native_tf32_cudnn() {
  return at::globalContext().allowTF32CuDNN();
}

// ---- c10d process groups ------------------------------------------------------------------


// kind: 0 Gloo, 1 NCCL. device_kind (Gloo): 0 default device, 1 interface named by device_arg,
// 2 hostname or address in device_arg.
// launcher_store: the launcher serves the store and keeps it across restarts of the ranks, so
// each incarnation of the group meets in a part of it of its own (meet_round).
char* kd_native_group_new(int kind, const char* host, uint16_t port, int rank, int size,
                          bool launcher_store, int64_t timeout_ms,
                          int device_kind, const char* device_arg, KdGroup** out) {
  *out = nullptr;
#if defined(KD_NATIVE_GLOO) || defined(KD_NATIVE_NCCL)
  return guarded([&] {
    std::chrono::milliseconds timeout(timeout_ms);
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    auto store = connect_store(host, port, rank, size, launcher_store, timeout);
    if (launcher_store) {
      const std::string round = meet_round(*store, rank, size, timeout, deadline);
      store = c10::make_intrusive<c10d::PrefixStore>("kd/round/" + round, store);
    }
    check_launch(*store, rank, size, rank == 0 && !launcher_store, timeout, deadline);
    c10::intrusive_ptr<c10d::Backend> backend;
    if (kind == 0) {
#ifdef KD_NATIVE_GLOO
      auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
      if (device_kind == 1) {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(device_arg));
      } else if (device_kind == 2) {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(device_arg));
      } else {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, opts);
#else
      throw std::runtime_error("kd-native was built without Gloo");
#endif
    } else {
#ifdef KD_NATIVE_NCCL
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, opts);
#else
      throw std::runtime_error("kd-native was built without NCCL");
#endif
    }
    *out = new KdGroup{store, backend, timeout};
  });
#else
  (void)kind, (void)host, (void)port, (void)rank, (void)size, (void)launcher_store;
  (void)timeout_ms;
  (void)device_kind, (void)device_arg;
  return copy_message("kd-native was built without c10d process groups");
#endif
}

// Makes an exception that escapes a thread of the collective library end the process with one
// line starting with `prefix` and status 1 (see on_terminate), and keeps libtorch's own
// warnings and errors (logged with C++ stack traces) off stderr unless TORCH_CPP_LOG_LEVEL
// asks for them: the caller reports every failure itself.
void kd_native_quiet_failures(const char* prefix) {
#if defined(KD_NATIVE_GLOO) || defined(KD_NATIVE_NCCL)
  terminate_prefix = prefix;
  std::set_terminate(on_terminate);
#else
  (void)prefix;
#endif
  if (std::getenv("TORCH_CPP_LOG_LEVEL") == nullptr) {
    FLAGS_caffe2_log_level = 3;  // FATAL only
  }
}

void kd_native_group_free(KdGroup* group) {
#if defined(KD_NATIVE_GLOO) || defined(KD_NATIVE_NCCL)
  try {
    delete group;
  } catch (...) {
  }
#else
  (void)group;
#endif
}

#if defined(KD_NATIVE_GLOO) || defined(KD_NATIVE_NCCL)
#define KD_GROUP_OP(body) return guarded([&] { body; })
#else
#define KD_GROUP_OP(body) return copy_message("kd-native was built without c10d process groups")
#endif

char* kd_native_all_reduce_sum(KdGroup* group, at::Tensor* tensor, int64_t timeout_ms) {
  KD_GROUP_OP({
    std::chrono::milliseconds timeout(timeout_ms);
    std::vector<at::Tensor> ts{*tensor};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    opts.timeout = timeout;
    wait(group->backend->allreduce(ts, opts), timeout, "all-reduce");
  });
}

char* kd_native_broadcast(KdGroup* group, at::Tensor* tensor, int root, int64_t timeout_ms) {
  KD_GROUP_OP({
    std::chrono::milliseconds timeout(timeout_ms);
    std::vector<at::Tensor> ts{*tensor};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.timeout = timeout;
    wait(group->backend->broadcast(ts, opts), timeout, "broadcast");
  });
}

// outputs: one tensor per rank, each shaped like input.
char* kd_native_all_gather(KdGroup* group, at::Tensor* input, at::Tensor* const* outputs,
                           size_t n_outputs, int64_t timeout_ms) {
  KD_GROUP_OP({
    std::chrono::milliseconds timeout(timeout_ms);
    std::vector<at::Tensor> in{*input};
    std::vector<std::vector<at::Tensor>> out{tensor_list(outputs, n_outputs)};
    c10d::AllgatherOptions opts;
    opts.timeout = timeout;
    wait(group->backend->allgather(out, in, opts), timeout, "all-gather");
  });
}

char* kd_native_barrier(KdGroup* group, int64_t timeout_ms) {
  KD_GROUP_OP({
    std::chrono::milliseconds timeout(timeout_ms);
    c10d::BarrierOptions opts;
    opts.timeout = timeout;
    wait(group->backend->barrier(opts), timeout, "barrier");
  });
}

// ---- CUDA ---------------------------------------------------------------------------------

char* kd_native_cuda_device_properties(int device, char* name, size_t name_len, int64_t* total_memory,
                                       int* major, int* minor, int* multiprocessors) {
#ifdef KD_NATIVE_CUDA
  return guarded([&] {
    const cudaDeviceProp* p = at::cuda::getDeviceProperties(static_cast<c10::DeviceIndex>(device));
    std::snprintf(name, name_len, "%s", p->name);
    *total_memory = static_cast<int64_t>(p->totalGlobalMem);
    *major = p->major;
    *minor = p->minor;
    *multiprocessors = p->multiProcessorCount;
  });
#else
  (void)device, (void)name, (void)name_len, (void)total_memory, (void)major, (void)minor;
  (void)multiprocessors;
  return copy_message("kd-native was built without CUDA (feature `cuda`)");
#endif
}

// Starts capturing the work the calling thread queues on `device` into a new graph.
char* kd_native_graph_capture_begin(int device, KdGraph** out) {
  *out = nullptr;
#ifdef KD_NATIVE_CUDA
  return guarded([&] {
    auto index = static_cast<c10::DeviceIndex>(device);
    c10::cuda::CUDAGuard device_guard(index);
    c10::cuda::device_synchronize();
    auto graph = std::make_unique<KdGraph>();
    graph->capture_stream.emplace(c10::cuda::getStreamFromPool(false, index));
    try {
      graph->graph.capture_begin();
    } catch (...) {
      graph->capture_stream.reset();
      throw;
    }
    *out = graph.release();
  });
#else
  (void)device;
  return copy_message("kd-native was built without CUDA (feature `cuda`)");
#endif
}

// Ends a capture begun by kd_native_graph_capture_begin; the graph stays valid on error only
// for kd_native_graph_free.
char* kd_native_graph_capture_end(KdGraph* graph) {
#ifdef KD_NATIVE_CUDA
  return guarded([&] {
    try {
      graph->graph.capture_end();
    } catch (...) {
      graph->capture_stream.reset();
      throw;
    }
    graph->capture_stream.reset();
    c10::cuda::device_synchronize();
  });
#else
  (void)graph;
  return copy_message("kd-native was built without CUDA (feature `cuda`)");
#endif
}

char* kd_native_graph_replay(KdGraph* graph) {
#ifdef KD_NATIVE_CUDA
  return guarded([&] { graph->graph.replay(); });
#else
  (void)graph;
  return copy_message("kd-native was built without CUDA (feature `cuda`)");
#endif
}

void kd_native_graph_free(KdGraph* graph) {
#ifdef KD_NATIVE_CUDA
  try {
    delete graph;
  } catch (...) {
  }
#else
  (void)graph;
#endif
}

}  // extern "C"
