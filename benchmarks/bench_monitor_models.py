"""Cost of the ThermoMonitor where the step is realistic, in one process and under DDP.

Models (float32, random data, plain SGD): ResNet-18 in torchvision's layout (width 64, 32×32
images, b = 64), a ViT in timm's layout (32×32 images, patch 4, width 192, depth 6, 3 heads,
b = 64), a 4-layer GPT-2 (Hugging Face, width 256, 4 heads, vocabulary 2048, sequence length 128,
b = 8). Variants, timed interleaved step by step (every repetition runs ``--steps`` steps of each
variant in turn, each on its own model and monitor, which persist across repetitions: the first
repetition is a warm-up, and noise steps after it read the loop's own pass):

* plain     — zero_grad, forward, backward, optimizer step;
* floor     — plus one fused norm of every gradient after backward and of every parameter after
              the step: a lower bound for any monitor that reads each of them once (the balance
              columns need per-unit sums along one or two axes of each tensor, which cost more);
* units     — plus only the per-unit squared sums the balance columns need (``SquareSums`` of
              every gradient and every parameter, along the unit axes of the detected symmetries,
              with the monitor's own reduction: each tensor read once for all its unit axes,
              squared a block of rows at a time into a cache-sized buffer on a CPU), without the
              monitor's bookkeeping: the floor of per-unit monitoring;
* balance   — plus ThermoMonitor(every=1, noise_every=None): layer and unit gradient energies,
              balance ratios, charges with predicted and measured change (target ≤ 1.05×);
* noise/10  — plus the entropic terms and Tr Σ every 10 steps (target ≤ 1.10×). The ResNet's
              BatchNorm in train mode couples the samples: its noise terms are not recorded (a
              note), so its noise/10 row is balance plus that check.

``--before SRC`` adds the *units* and *balance* variants of another version of the package (the
``src/`` folder of an earlier checkout, e.g. ``git archive <commit> src | tar -x -C /tmp/before``),
imported under another name and interleaved with the current one step by step, so before and
after share the machine's load.

``--ddp`` runs the same variants in 2 processes (gloo on CPU, nccl on CUDA) with every model in
DistributedDataParallel, against a plain DDP step. Prints median wall and process CPU time per
step and the ratios to plain (with the range of the per-repetition CPU ratios), with the load average (other processes on the cores inflate wall
times; the CPU ratios are steadier). Usage::

    python benchmarks/bench_monitor_models.py [--models resnet18 vit gpt2] [--steps 10]
        [--reps 4] [--threads 1] [--ddp] [--device cpu] [--before /tmp/before/src]
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import socket
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import neurothermo as nt


def build(name: str, device: str) -> tuple[Callable[[], nn.Module], Any, Callable[[int], tuple[Any, Tensor]]]:
    """(model factory, loss_fn, batch(seed)) of a benchmark model."""
    import foreign_models as fm

    if name == "resnet18":
        def batch(seed: int) -> tuple[Any, Tensor]:
            g = torch.Generator().manual_seed(seed)
            return (torch.randn(64, 3, 32, 32, generator=g).to(device),
                    torch.randint(10, (64,), generator=g).to(device))
        return lambda: fm.resnet18(10, 64).to(device), nn.CrossEntropyLoss(), batch
    if name == "vit":
        def batch(seed: int) -> tuple[Any, Tensor]:
            g = torch.Generator().manual_seed(seed)
            return (torch.randn(64, 3, 32, 32, generator=g).to(device),
                    torch.randint(10, (64,), generator=g).to(device))
        return (lambda: fm.VisionTransformer(32, 4, 3, 10, embed_dim=192, depth=6, num_heads=3).to(device),
                nn.CrossEntropyLoss(), batch)
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        def make() -> nn.Module:
            cfg = GPT2Config(vocab_size=2048, n_embd=256, n_layer=4, n_head=4, n_positions=128,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=2047,
                             eos_token_id=2047)
            return GPT2LMHeadModel(cfg).to(device)

        def batch(seed: int) -> tuple[Any, Tensor]:
            g = torch.Generator().manual_seed(seed)
            ids = torch.randint(2048, (8, 128), generator=g).to(device)
            return {"input_ids": ids, "labels": ids}, ids
        return make, nt.model_loss, batch
    raise SystemExit(f"unknown model {name}")


def load_before(src: str) -> ModuleType:
    """Import the ``neurothermo`` package found in ``src`` as ``neurothermo_before`` (a copy with
    its own imports renamed), beside the current one."""
    tmp = Path(tempfile.mkdtemp(prefix="nt_before_"))
    shutil.copytree(Path(src) / "neurothermo", tmp / "neurothermo_before")
    pattern = re.compile(r"\b(from|import) neurothermo\b(?!_)")
    for f in (tmp / "neurothermo_before").rglob("*.py"):
        f.write_text(pattern.sub(r"\1 neurothermo_before", f.read_text()))
    sys.path.insert(0, str(tmp))
    return importlib.import_module("neurothermo_before")


class Runner:
    """One variant: a model (DDP-wrapped under --ddp), an optimizer and optionally a monitor."""

    def __init__(self, name: str, device: str, noise_every: int | None, monitor: bool,
                 syms: Any, ddp: bool, floor: bool = False, units: bool = False,
                 pkg: ModuleType = nt) -> None:
        make, self.loss_fn, self.batch = build(name, device)
        self.sums = importlib.import_module(pkg.__name__ + ".monitor.quantities").SquareSums
        torch.manual_seed(0)
        inner = make()
        self.hf = name == "gpt2"
        self.model: nn.Module = inner
        self.inner = inner
        if ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(inner)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.mon = None
        if monitor:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # notes (BatchNorm) are printed once below
                self.mon = pkg.ThermoMonitor(self.model, self.loss_fn, optimizer=self.opt,
                                            noise_every=noise_every, symmetries=syms)
        self.floor = floor
        self.units: list[tuple[str, int, tuple[int, ...] | None]] | None = None
        if units:
            from neurothermo.monitor.derive import deferred_charge
            from neurothermo.monitor.symmetries import track

            named = dict(inner.named_parameters())
            self.units = list(dict.fromkeys(
                (s.name, s.dim, s.view) for t in track(syms or [], named)
                if t.per_unit or deferred_charge(t) for s in t.sym.slices
                if s.role != "passive" and not s.buffer and s.dim is not None))
            self.scratch: tuple[dict[Any, Tensor], dict[Any, Tensor]] = ({}, {})
        self.kept: list[Any] = []
        self.step = 0
        rank = torch.distributed.get_rank() if ddp else 0
        self.batches = [self.batch(1000 * rank + i) for i in range(4)]

    def one(self) -> tuple[float, float]:
        """One training step (with the monitor's calls): its wall and process CPU seconds."""
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        x, y = self.batches[self.step % len(self.batches)]
        self.opt.zero_grad(set_to_none=True)
        loss = self.model(**x).loss if self.hf else self.loss_fn(self.model(x), y)
        loss.backward()
        if self.floor:
            self.kept.append(torch._foreach_norm([p.grad for p in self.model.parameters()
                                                  if p.grad is not None]))
        if self.units is not None:
            grads = {n: p.grad for n, p in self.inner.named_parameters()}
            self.kept.append(self.sums(grads, self.scratch[0]).prepare(self.units, list(grads)))
        if self.mon is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.mon.after_backward(self.step, x if self.hf else (x, y), loss=loss)
        self.opt.step()
        if self.floor:
            with torch.no_grad():
                self.kept.append(torch._foreach_norm(list(self.model.parameters())))
        if self.units is not None:
            with torch.no_grad():
                params = dict(self.inner.named_parameters())
                self.kept.append(self.sums(params, self.scratch[1]).prepare(self.units, list(params)))
        self.kept = self.kept[-2:]
        if self.mon is not None:
            self.mon.after_step(self.step)
        self.step += 1
        sync()
        return time.perf_counter() - t0, time.process_time() - c0

    def flush(self) -> tuple[float, float]:
        """The monitor's flush (derived columns, host copy): part of its cost."""
        t0, c0 = time.perf_counter(), time.process_time()
        if self.mon is not None:
            self.mon.flush()
        return time.perf_counter() - t0, time.process_time() - c0


def bench(name: str, args: argparse.Namespace, ddp: bool, rank: int = 0) -> None:
    make, _, batch = build(name, args.device)
    try:
        torch.manual_seed(0)
        x = batch(0)[0]
        # GPT2LMHeadModel.forward(input_ids): detection runs it on the positional tensor
        syms: Any = nt.find_symmetries(make(), x["input_ids"][:4] if isinstance(x, dict) else x[:4])
    except Exception as e:  # detection is a one-time cost; a model it cannot trace runs without
        syms = None
        if rank == 0:
            print(f"  ({name}: no symmetries: {type(e).__name__}: {str(e)[:100]})")
    variants = {"plain": Runner(name, args.device, None, False, syms, ddp),
                "floor": Runner(name, args.device, None, False, syms, ddp, floor=True),
                "units": Runner(name, args.device, None, False, syms, ddp, units=True),
                "balance": Runner(name, args.device, None, True, syms, ddp),
                "noise/10": Runner(name, args.device, 10, True, syms, ddp)}
    if args.before:  # the earlier version, interleaved with the current one
        old = sys.modules.get("neurothermo_before") or load_before(args.before)
        variants["units (before)"] = Runner(name, args.device, None, False, syms, ddp, units=True,
                                            pkg=old)
        variants["balance (before)"] = Runner(name, args.device, None, True, syms, ddp, pkg=old)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for rep in range(args.reps + 1):
        acc = {k: [0.0, 0.0] for k in variants}
        for _ in range(args.steps):  # variants alternate step by step: they share the load
            for k, r in variants.items():
                w, c = r.one()
                acc[k][0] += w
                acc[k][1] += c
        for k, r in variants.items():
            w, c = r.flush()
            acc[k][0] += w
            acc[k][1] += c
        if rep:  # the first repetition warms up (allocator, lazy imports, first extra pass)
            for k in variants:
                times[k].append((acc[k][0] / args.steps, acc[k][1] / args.steps))
    if rank:
        return
    wall = {k: statistics.median(t[0] for t in ts) for k, ts in times.items()}
    cpu = {k: statistics.median(t[1] for t in ts) for k, ts in times.items()}
    notes = variants["noise/10"].mon.history.meta["notes"]  # type: ignore[union-attr]
    n_par = sum(p.numel() for p in variants["plain"].model.parameters())
    print(f"{name} ({n_par / 1e6:.1f} M parameters){' under DDP x2' if ddp else ''}: "
          f"load average {os.getloadavg()[0]:.1f}")
    for k in variants:
        # spread: the CPU-time ratio of each repetition to plain's in the same repetition
        per_rep = [t[1] / p[1] for t, p in zip(times[k], times["plain"])]
        print(f"  {k:<16} wall {1e3 * wall[k]:8.1f} ms {wall[k] / wall['plain']:6.3f}x   "
              f"cpu {1e3 * cpu[k]:8.1f} ms {cpu[k] / cpu['plain']:6.3f}x  "
              f"(per repetition {min(per_rep):.3f}-{max(per_rep):.3f})")
    for k in variants:
        if k.endswith(" (before)"):  # paired: both versions ran in the same repetitions
            now = k[: -len(" (before)")]
            pair = sorted(a[1] / b[1] for a, b in zip(times[now], times[k]))
            print(f"  {now} now / before: cpu {statistics.median(pair):.3f}x "
                  f"(per repetition {pair[0]:.3f}-{pair[-1]:.3f})")
    for note in notes:
        print(f"  note: {note[:150]}")
    sys.stdout.flush()


def _ddp_main(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        args.device = f"cuda:{rank}"
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo", rank=rank,
                            world_size=world)
    for name in args.models:
        bench(name, args, True, rank)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "vit", "gpt2"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ddp", action="store_true", help="2 processes, DistributedDataParallel")
    ap.add_argument("--before", metavar="SRC", help="src/ folder of an earlier version: its units "
                    "and balance variants run interleaved with the current ones")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.steps} steps x {args.reps} reps (+1 warm-up), {args.threads} thread(s), "
          f"device {args.device}; median per step, ratios to plain")
    if args.ddp:
        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_ddp_main, args=(2, port, args), nprocs=2, join=True)
    else:
        for name in args.models:
            bench(name, args, False)


if __name__ == "__main__":
    main()
