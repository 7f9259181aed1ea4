"""Cost of symmetry charges per training step, and of detection (issue 5).

MLP 784-512-512-10 (ReLU), b = 128, float32. Measured side by side in one process:

* step        — zero_grad, forward, backward, SGD step (the baseline);
* charges     — charge + imbalance + predict_charge of every charged symmetry found (two rescale
                symmetries, 512 units each): the monitor's per-step work, vectorised;
* naive loop  — the same per-unit charges and imbalances with a Python loop over units (the way
                hand-written per-neuron bookkeeping is often done), for comparison;
* detect      — find_symmetries on this MLP and on a small pre-LN transformer block (once each;
                includes tracing, shape propagation and the numerical verification).
* detect (real architectures, ``--real``; threads = 1, CPU time of this process, so the numbers
  hold under any load of the machine): torchvision-layout ResNet-18 (width 64, 1000 classes,
  4 images 224×224) in train mode (20 approximate conv → BatchNorm scale symmetries) and in eval
  mode, and a 6-layer BERT of base width (hidden 768, 12 heads, 4 sequences of 64 tokens with
  padding, captured by torch.dynamo). Budgets: 5 s (ResNet-18), 10 s (BERT). ``--baseline``
  also times the one-candidate-at-a-time verification (``verify_symmetry`` per candidate, as
  before joint verification) on the same candidates, side by side.

Prints median times and ratios. Usage: python benchmarks/bench_symmetry.py [--reps 15 --threads 1]
[--real [--baseline]]
"""
from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import neurothermo as nt


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10))


class Block(nn.Module):
    def __init__(self, d: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.h = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (m(h).view(b, t, self.h, d // self.h).transpose(1, 2) for m in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.h), -1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.relu(self.fc1(self.ln2(x))))


def timed(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def real(baseline: bool) -> None:
    """Detection + verification on ResNet-18 and a 6-layer base-width BERT (CPU seconds)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from transformers import BertConfig, BertForSequenceClassification

    from foreign_models import resnet18

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = resnet18(num_classes=1000, width=64)
    img = torch.randn(4, 3, 224, 224, generator=g)
    ids = torch.randint(0, 30522, (4, 64), generator=g)
    mask = torch.ones_like(ids)
    mask[:2, 48:] = 0
    bert = BertForSequenceClassification(BertConfig(  # BERT-base widths, 6 layers, no dropout
        num_hidden_layers=6, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    cases = [("ResNet-18 w64 train, 4×224²", lambda: net.train(), img, 5.0),
             ("ResNet-18 w64 eval,  4×224²", lambda: net.eval(), img, 5.0),
             ("BERT 6×768 (12 heads), 4×64 tok", lambda: bert.train(),
              {"input_ids": ids, "attention_mask": mask}, 10.0)]
    print("\nfind_symmetries on real architectures (threads 1; CPU s of this process; wall s "
          "under the current machine load)")
    for name, mode, inputs, budget in cases:
        mode()
        t0, w0 = time.process_time(), time.perf_counter()
        rep = nt.find_symmetries(mode(), inputs, explain=True, progress=False)
        cpu, wall = time.process_time() - t0, time.perf_counter() - w0
        line = (f"{name:34s} {cpu:6.2f} s CPU ({wall:6.1f} s wall)  budget {budget:4.1f} s  "
                f"{'OK ' if cpu <= budget else 'OVER'}  {len(rep)} symmetries "
                f"({len(rep.approximate)} approximate), capture: {rep.blocks[0].how}")
        if baseline:
            model = mode()
            t0 = time.process_time()
            for sym in rep:
                nt.verify_symmetry(model, sym, inputs)
            line += f"; one-by-one verification alone {time.process_time() - t0:6.2f} s CPU"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--real", action="store_true", help="also ResNet-18 and a 6-layer BERT")
    parser.add_argument("--baseline", action="store_true", help="with --real: one-by-one verify")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = mlp()
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    syms = [s for s in nt.find_symmetries(model, x[:8]) if s.has_charge]
    lr = 0.01

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    grads = {n: p.grad for n, p in model.named_parameters()}

    def charges() -> None:
        for s in syms:
            s.predict_charge(s.charge(model), grads, lr)

    def naive() -> None:
        layers = [m for m in model if isinstance(m, nn.Linear)]
        for a, b in itertools.pairwise(layers):
            pairs = ((a.weight.detach(), a.bias.detach(), b.weight.detach()),
                     (a.weight.grad, a.bias.grad, b.weight.grad))
            for w_in, b_in, w_out in pairs:
                _ = [float(w_in[i].pow(2).sum() + b_in[i] ** 2 - w_out[:, i].pow(2).sum())
                     for i in range(w_in.shape[0])]

    for fn in (step, charges, naive):
        fn()
    t_step, t_charge, t_naive = (timed(f, args.reps) for f in (step, charges, naive))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{len(syms)} charged symmetries ({', '.join(s.kind for s in syms)})")
    print(f"train step          {1e3 * t_step:8.2f} ms")
    print(f"charges (vectorised){1e3 * t_charge:8.2f} ms   {t_charge / t_step:6.3f}× step")
    print(f"charges (naive loop){1e3 * t_naive:8.2f} ms   {t_naive / t_step:6.3f}× step   "
          f"vectorised is {t_naive / t_charge:.0f}× faster")
    for name, net, inp in (("MLP 784-512-512-10", model, x[:8]),
                           ("transformer block d=64", Block(), torch.randn(4, 16, 64))):
        t = timed(lambda net=net, inp=inp: nt.find_symmetries(net, inp), 3)
        n = len(nt.find_symmetries(net, inp))
        print(f"find_symmetries {name:24s} {1e3 * t:8.1f} ms  ({n} symmetries)")
    if args.real:
        real(args.baseline)


if __name__ == "__main__":
    main()
