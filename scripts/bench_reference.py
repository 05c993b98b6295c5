"""PyTorch eager reference for `kd-run bench`.

Mirrors kd-run's training loop step for step on the same synthetic workloads: gather a shuffled
batch, forward, loss, backward, SGD with momentum (or Adam, fused=True: PyTorch's fastest Adam on
the CPU), max-norm, and accumulate the epoch's loss and accuracy on the device. Started once by
`kd-run bench`; each line on stdin names a workload ("teacher", "distill" or "distill_adam") and
its batch size, and it answers "<workload> <examples per second>" after one pass.
"""
import argparse
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
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            if self.max_norm is not None:
                with torch.no_grad():
                    for w in self.weights:
                        w.renorm_(2, 0, self.max_norm)
            loss_sum += loss.detach() * idx.shape[0]
            correct += (logits.detach().argmax(1) == y).sum()
        return float(loss_sum) / n, int(correct) / n


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--examples", type=int, default=5120)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=20.0)
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    workloads = {}
    for line in sys.stdin:
        words = line.split()
        if words == ["quit"]:
            break
        name, batch = words[0], int(words[1])
        if name not in workloads:
            workloads[name] = Workload(name, args.examples, batch, args.temperature)
        w = workloads[name]
        start = time.perf_counter()
        w.epoch()
        rate = args.examples / (time.perf_counter() - start)
        print(f"{name} {rate:.3f}", flush=True)


if __name__ == "__main__":
    main()
