"""Cost of the ThermoMonitor against the plain training loop (issue 6, Performance).

MLP 784-512-512-10 (ReLU), b = 128, plain SGD, float32, on random data. Variants, run interleaved
in one process (each repetition times every variant on the same fresh model state):

* plain       — zero_grad, forward, backward, optimizer step;
* floor       — plus only the bare reductions the monitor cannot avoid, written as plain torch calls
                (no bookkeeping): per-unit squared sums of every gradient after backward and of
                every parameter after the step (rows of W1, rows and columns of W2, columns of W3,
                the biases). The balance target is measured against this floor;
* balance     — plus ThermoMonitor(every=1, noise_every=None): per-layer and per-unit gradient
                energies, balance ratios, both rescale charges with predicted and measured change;
* noise/10    — plus the entropic terms and Tr Σ every 10 steps (one per-sample-norm pass);
* train       — nt.train without a monitor (random batches gathered from the data set, loss
                finiteness checked every step);
* train+bal   — nt.train with the balance monitor (compare with ``train``).

Targets: balance ≤ 1.05× plain, noise/10 ≤ 1.20× plain. Prints the median wall-clock and process
CPU time per step and their ratios to plain for each variant. Usage: python benchmarks/bench_monitor.py [--steps 40 --reps 7
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


Timing = tuple[float, float]  # wall seconds per step, process CPU seconds per step


def reductions(ts: list[torch.Tensor], buf: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The floor: what any per-unit monitor of this MLP must compute from ``ts`` (one read each)."""
    w1, b1, w2, b2, w3, b3 = ts
    sq = torch.mul(w2, w2, out=buf)
    return (torch.linalg.vector_norm(w1, dim=1), b1 * b1, sq.sum(1), sq.sum(0), b2 * b2,
            (w3 * w3).sum(0), torch.linalg.vector_norm(b3))


def floor_loop(model: nn.Module, batches: list, lr: float) -> Timing:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    params, loss_fn, kept = list(model.parameters()), nn.CrossEntropyLoss(), []
    buf = torch.empty_like(params[2])
    t0, c0 = time.perf_counter(), time.process_time()
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        kept.append(reductions([p.grad for p in params], buf))  # type: ignore[misc]
        opt.step()
        kept.append(reductions([p.detach() for p in params], buf))
    n = len(batches)
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def loop(model: nn.Module, monitor: nt.ThermoMonitor | None, batches: list, lr: float) -> Timing:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    if monitor is not None:
        monitor.bind(opt)
    loss_fn = nn.CrossEntropyLoss()
    t0, c0 = time.perf_counter(), time.process_time()
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
    n = len(batches)
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


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

    def monitored(noise_every: int | None) -> Callable[[], Timing]:
        def run() -> Timing:
            model = mlp()
            mon = nt.ThermoMonitor(model, loss_fn, noise_every=noise_every, symmetries=syms)
            return loop(model, mon, batches, lr)
        return run

    def via_train(monitor: bool) -> Callable[[], Timing]:
        def run() -> Timing:
            model = mlp()
            mon = nt.ThermoMonitor(model, loss_fn, noise_every=None, symmetries=syms) if monitor else None
            t0, c0 = time.perf_counter(), time.process_time()
            nt.train(model, loss_fn, (x, y), lr=lr, batch_size=args.batch, steps=args.steps,
                     monitor=mon)
            return ((time.perf_counter() - t0) / args.steps,
                    (time.process_time() - c0) / args.steps)
        return run

    variants: dict[str, Callable[[], Timing]] = {
        "plain": lambda: loop(mlp(), None, batches, lr),
        "floor": lambda: floor_loop(mlp(), batches, lr),
        "balance": monitored(None),
        "noise/10": monitored(10),
        "train": via_train(False),
        "train+bal": via_train(True),
    }
    for f in variants.values():  # warm-up (allocator, lazy imports)
        f()
    times: dict[str, list[Timing]] = {k: [] for k in variants}
    for _ in range(args.reps):
        for k, f in variants.items():
            times[k].append(f())
    wall = {k: statistics.median(t[0] for t in ts) for k, ts in times.items()}
    cpu = {k: statistics.median(t[1] for t in ts) for k, ts in times.items()}
    print(f"MLP 784-512-512-10, b={args.batch}, SGD, {args.steps} steps x {args.reps} reps, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}")
    print("median per step; 'cpu' is this process's CPU time (less sensitive to other processes)")
    print(f"{'variant':<10} {'wall ms':>8} {'ratio':>6} {'cpu ms':>8} {'ratio':>6}  target")
    targets = {"balance": "<= 1.05", "noise/10": "<= 1.20", "train+bal": "<= 1.05 x train",
               "floor": "(bare reductions)"}
    for k in variants:
        print(f"{k:<10} {1e3 * wall[k]:8.2f} {wall[k] / wall['plain']:6.3f} {1e3 * cpu[k]:8.2f} "
              f"{cpu[k] / cpu['plain']:6.3f}  {targets.get(k, '')}")
    print(f"train+bal / train: wall {wall['train+bal'] / wall['train']:.3f}, "
          f"cpu {cpu['train+bal'] / cpu['train']:.3f}")
    print(f"balance over the floor: {1e3 * (wall['balance'] - wall['floor']):.2f} ms per step "
          f"(bookkeeping); the floor alone is {wall['floor'] / wall['plain']:.3f}x plain")


if __name__ == "__main__":
    main()
