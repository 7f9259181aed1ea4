"""Cost of the ThermoMonitor against the plain training loop (issue 6, Performance).

MLP 784-512-512-10 (ReLU), b = 128, plain SGD, float32, on random data. Variants, run interleaved
in one process (each repetition times every variant on the same fresh model state):

* plain       — zero_grad, forward, backward, optimizer step;
* balance     — plus ThermoMonitor(every=1, noise_every=None): per-layer and per-unit gradient
                energies, balance ratios, both rescale charges with predicted and measured change;
* noise/10    — plus the entropic terms and Tr Σ every 10 steps (one per-sample-norm pass);
* train       — nt.train without a monitor (random batches gathered from the data set, loss
                finiteness checked every step);
* train+bal   — nt.train with the balance monitor (compare with ``train``).

Targets: balance ≤ 1.05× plain, noise/10 ≤ 1.20× plain. Prints the median time per step and the
ratio to plain for each variant. Usage: python benchmarks/bench_monitor.py [--steps 40 --reps 7
--threads 1] (one thread gives stable numbers when other processes share the cores).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import neurothermo as nt


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10))


def loop(model: nn.Module, monitor: nt.ThermoMonitor | None, batches: list, lr: float) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    if monitor is not None:
        monitor.bind(opt)
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        if monitor is not None:
            monitor.after_backward(step, (x, y), loss=loss)
        opt.step()
        if monitor is not None:
            monitor.after_step(step)
    if monitor is not None:
        monitor.flush()  # the host copy is part of the cost
    return (time.perf_counter() - t0) / len(batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n = args.steps * args.batch
    x, y = torch.randn(n, 784, generator=g), torch.randint(10, (n,), generator=g)
    batches = [(x[i:i + args.batch], y[i:i + args.batch]) for i in range(0, n, args.batch)]
    lr, loss_fn = 0.01, nn.CrossEntropyLoss()
    example = x[:8]
    syms = nt.find_symmetries(mlp(), example)  # detection is a one-time cost, kept out of timing

    def monitored(noise_every: int | None) -> Callable[[], float]:
        def run() -> float:
            model = mlp()
            mon = nt.ThermoMonitor(model, loss_fn, noise_every=noise_every, symmetries=syms)
            return loop(model, mon, batches, lr)
        return run

    def via_train(monitor: bool) -> Callable[[], float]:
        def run() -> float:
            model = mlp()
            mon = nt.ThermoMonitor(model, loss_fn, noise_every=None, symmetries=syms) if monitor else None
            t0 = time.perf_counter()
            nt.train(model, loss_fn, (x, y), lr=lr, batch_size=args.batch, steps=args.steps,
                     monitor=mon)
            return (time.perf_counter() - t0) / args.steps
        return run

    variants: dict[str, Callable[[], float]] = {
        "plain": lambda: loop(mlp(), None, batches, lr),
        "balance": monitored(None),
        "noise/10": monitored(10),
        "train": via_train(False),
        "train+bal": via_train(True),
    }
    for f in variants.values():  # warm-up (allocator, lazy imports)
        f()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.reps):
        for k, f in variants.items():
            times[k].append(f())
    base = statistics.median(times["plain"])
    print(f"MLP 784-512-512-10, b={args.batch}, SGD, {args.steps} steps x {args.reps} reps, "
          f"{torch.get_num_threads()} threads (median per step); load average "
          f"{os.getloadavg()[0]:.1f} (other processes on the cores inflate the ratios)")
    print(f"{'variant':<10} {'ms/step':>8} {'ratio':>7}  target")
    targets = {"balance": "<= 1.05", "noise/10": "<= 1.20", "train+bal": "<= 1.05 x train"}
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"{k:<10} {1e3 * med:8.2f} {med / base:7.3f}  {targets.get(k, '')}")
    tb = statistics.median(times["train+bal"]) / statistics.median(times["train"])
    print(f"train+bal / train = {tb:.3f}")


if __name__ == "__main__":
    main()
