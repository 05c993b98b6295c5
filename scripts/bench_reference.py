"""PyTorch eager reference for `kd-run bench`.

Mirrors kd-run's training loop step for step on the same synthetic workloads: gather a shuffled
batch, forward, loss, backward, SGD with momentum (or Adam, fused=True: PyTorch's fastest Adam on
the CPU), max-norm, and accumulate the epoch's loss and accuracy on the device. Started once by
`kd-run bench`; each line on stdin names a workload ("teacher", "distill", "distill_adam",
"acoustic", "acoustic_topk", the last two also with "_bf16", and "inference", "inference_1"), its
batch size and the examples of one pass, and it answers "<workload> <examples per second> <minor
page faults>" after one pass (the faults this process took during it).

The inference workloads run the MNIST teacher's forward pass alone in batches (1,024 examples, or
one), following PyTorch's advice for inference: the module in eval() mode, torch.inference_mode()
(no autograd bookkeeping, no version counters), no dropout modules in the graph.

The acoustic workloads follow PyTorch's own advice for speed: fused SGD, zero_grad(set_to_none=True),
torch.autocast for bf16, and the top-k soft targets read with a gather (no dense target). Subnormal
floats are flushed (torch.set_flush_denormal(True)) and glibc keeps freed memory for reuse
(keep_freed_memory), as kd-run does.
"""
import argparse
import ctypes
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


def mlp(sizes, p_in, p_hidden):
    layers = [nn.Dropout(p_in)] if p_in > 0 else []
    for i in range(len(sizes) - 2):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU()]
        if p_hidden > 0:
            layers.append(nn.Dropout(p_hidden))
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    return nn.Sequential(*layers)


def random_top_k(n, classes, k, t, device):
    """A teacher's top-k soft targets at T from random logits, chunk by chunk."""
    probs, ids = [], []
    for start in range(0, n, 1024):
        logits = torch.randn(min(1024, n - start), classes, device=device) * 4.0
        values, c = logits.topk(k, 1)
        probs.append(torch.softmax(values / t, 1))
        ids.append(c)
    return torch.cat(probs), torch.cat(ids)


class Acoustic:
    """A wide many-class ReLU network on speech windows: hard labels, or top-k soft targets at T
    (weight 0.5 on each term), SGD with momentum 0.9, f32 or bf16 autocast."""

    def __init__(self, name, examples, batch, sizes, k, t, device):
        torch.manual_seed(0)
        self.batch, self.t, self.device = batch, t, torch.device(device)
        self.bf16 = name.endswith("_bf16")
        self.top_k = name.startswith("acoustic_topk")
        self.net = mlp(sizes, 0.0, 0.0).to(self.device)
        self.net.train()
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.05, momentum=0.9, fused=True)
        self.inputs = torch.randn(examples, sizes[0], device=self.device)
        self.labels = torch.randint(sizes[-1], (examples,), device=self.device)
        if self.top_k:
            self.probs, self.classes = random_top_k(examples, sizes[-1], k, t, self.device)

    def loss(self, logits, y, idx):
        logits = logits.float()
        hard = F.cross_entropy(logits, y)
        if not self.top_k:
            return hard
        p, c = self.probs.index_select(0, idx), self.classes.index_select(0, idx)
        log_q = F.log_softmax(logits / self.t, 1)
        soft = -(p * log_q.gather(1, c)).sum(1).mean() * (self.t * self.t)
        return 0.5 * hard + 0.5 * soft

    def epoch(self):
        n = self.inputs.shape[0]
        order = torch.randperm(n, device=self.device)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for start in range(0, n, self.batch):
            idx = order[start:start + self.batch]
            x, y = self.inputs.index_select(0, idx), self.labels.index_select(0, idx)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits = self.net(x)
            loss = self.loss(logits, y, idx)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            loss_sum += loss.detach() * idx.shape[0]
            correct += (logits.detach().argmax(1) == y).sum()
        return float(loss_sum) / n, int(correct) / n


class Inference:
    """The 784-1200-1200-10 teacher's forward pass in batches, eval() under inference_mode()."""

    def __init__(self, examples, batch, device):
        torch.manual_seed(0)
        self.batch, self.device = batch, torch.device(device)
        self.net = mlp([784, 1200, 1200, 10], 0.0, 0.0).to(self.device).eval()
        self.inputs = torch.rand(examples, 784, device=self.device)

    def epoch(self):
        n = self.inputs.shape[0]
        with torch.inference_mode():
            for start in range(0, n, self.batch):
                self.net(self.inputs[start:start + self.batch])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class Workload:
    def __init__(self, name, examples, batch, temperature):
        torch.manual_seed(0)
        self.name, self.batch, self.t = name, batch, temperature
        if name == "teacher":
            self.net, self.max_norm = mlp([784, 1200, 1200, 10], 0.2, 0.5), 3.5
        else:
            self.net, self.max_norm = mlp([784, 800, 800, 10], 0.0, 0.0), None
        self.net.train()
        if name == "distill_adam":
            self.opt = torch.optim.Adam(self.net.parameters(), lr=5e-4, fused=True)
        else:
            self.opt = torch.optim.SGD(self.net.parameters(), lr=0.01, momentum=0.9)
        self.images = torch.rand(examples, 784)
        self.labels = torch.randint(10, (examples,))
        self.soft = torch.softmax(torch.randn(examples, 10) * 3.0 / temperature, 1)
        self.weights = [m.weight for m in self.net if isinstance(m, nn.Linear)]

    def loss(self, logits, y, idx):
        if self.name == "teacher":
            return F.cross_entropy(logits, y)
        # Soft targets at T with the T^2 factor: cross-entropy with probability targets.
        return F.cross_entropy(logits / self.t, self.soft.index_select(0, idx)) * (self.t * self.t)

    def epoch(self):
        n = self.images.shape[0]
        order = torch.randperm(n)
        loss_sum, correct = torch.zeros(()), torch.zeros((), dtype=torch.int64)
        for start in range(0, n, self.batch):
            idx = order[start:start + self.batch]
            x, y = self.images.index_select(0, idx), self.labels.index_select(0, idx)
            logits = self.net(x)
            loss = self.loss(logits, y, idx)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            if self.max_norm is not None:
                with torch.no_grad():
                    for w in self.weights:
                        w.renorm_(2, 0, self.max_norm)
            loss_sum += loss.detach() * idx.shape[0]
            correct += (logits.detach().argmax(1) == y).sum()
        return float(loss_sum) / n, int(correct) / n


def keep_freed_memory():
    """The allocator policy kd-run sets for itself (`keep_freed_memory` in kd-run's main.rs): glibc
    takes blocks up to 32 MiB from its heap and keeps up to 256 MiB of it free for reuse instead of
    returning it to the system, so that a step's tensors do not fault in fresh pages each step (what
    PyTorch's performance guide gets with jemalloc or tcmalloc). Left alone where GLIBC_TUNABLES
    names a malloc setting, as kd-run does."""
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 256 << 20)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=20.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--acoustic-sizes", default="", help="layer sizes of the acoustic workloads, comma-separated")
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--acoustic-temperature", type=float, default=2.0)
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    keep_freed_memory()
    sizes = [int(s) for s in args.acoustic_sizes.split(",") if s]
    workloads = {}
    for line in sys.stdin:
        words = line.split()
        if words == ["quit"]:
            break
        name, batch, examples = words[0], int(words[1]), int(words[2])
        if name not in workloads:
            if name.startswith("inference"):
                workloads[name] = Inference(examples, batch, args.device)
            elif name.startswith("acoustic"):
                workloads[name] = Acoustic(
                    name, examples, batch, sizes, args.top_k, args.acoustic_temperature, args.device
                )
            else:
                workloads[name] = Workload(name, examples, batch, args.temperature)
        w = workloads[name]
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        w.epoch()
        rate = examples / (time.perf_counter() - start)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        print(f"{name} {rate:.3f} {faults}", flush=True)


if __name__ == "__main__":
    main()
